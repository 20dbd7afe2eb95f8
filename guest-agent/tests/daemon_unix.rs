//! The agent binary on this machine (no VM), over a Unix socket: Hello, a report on
//! ReportNow, Error answers to bad input, pre-touching of a child process on
//! PostcopyStarted, and a clean exit when the host hangs up. Needs root for
//! `/proc/kpageflags` (skipped otherwise). Uses `hot_method=flags` so the test does not
//! clear the soft-dirty bits of every process on the machine.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use guest_agent::proto::{
    encode, ErrorCode, FrameReader, Message, RangeKind, ReportAssembler, PROTOCOL_VERSION,
};

struct Host {
    stream: UnixStream,
    reader: FrameReader,
    queue: std::collections::VecDeque<Message>,
}

impl Host {
    fn recv_until<T>(
        &mut self,
        timeout: Duration,
        mut f: impl FnMut(&Message) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 65536];
        loop {
            while let Some(m) = self.queue.pop_front() {
                if let Some(t) = f(&m) {
                    return Some(t);
                }
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            match self.stream.read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => {
                    let q = &mut self.queue;
                    self.reader.push(&buf[..n], |item| {
                        if let Ok(m) = item {
                            q.push_back(m);
                        }
                    });
                }
                Err(_) => {}
            }
        }
    }

    fn send(&mut self, m: &Message) {
        self.stream.write_all(&encode(m).unwrap()).unwrap();
    }
}

#[test]
fn agent_over_a_unix_socket() {
    if std::fs::File::open("/proc/kpageflags").is_err() {
        eprintln!(
            "SKIPPED agent_over_a_unix_socket: /proc/kpageflags is not readable (needs root)"
        );
        return;
    }
    let dir = std::env::temp_dir().join(format!("guest-agent-daemon-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("agent.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let mut target = Command::new("sleep").arg("60").spawn().unwrap();
    let mut agent = Command::new(env!("CARGO_BIN_EXE_guest-agent"))
        .arg(format!("device=unix:{}", sock.display()))
        .args([
            "interval_ms=200",
            "max_cpu_pct=100",
            "hot_method=flags",
            "report_every_ms=0",
        ])
        .args(["touch_mode=all", "touch_threads=2"])
        .arg(format!("touch=pid:{}", target.id()))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (stream, _) = listener.accept().unwrap();
    let mut host = Host {
        stream,
        reader: FrameReader::new(),
        queue: Default::default(),
    };

    let hello = host.recv_until(Duration::from_secs(10), |m| match m {
        Message::Hello(h) => Some(h.clone()),
        _ => None,
    });
    let hello = hello.expect("Hello");
    assert_eq!(hello.version, PROTOCOL_VERSION);
    assert!(hello.mem_total_bytes > 0);

    host.send(&Message::ReportNow);
    let mut asm = ReportAssembler::new(1 << 22);
    let (mut hot, mut free) = (None, None);
    let t = Instant::now();
    host.recv_until(Duration::from_secs(60), |m| {
        match asm.push(m).expect("parts join") {
            Some(r) if r.kind == RangeKind::Hot => hot = Some(r.ranges),
            Some(r) => free = Some(r.ranges),
            None => {}
        }
        (hot.is_some() && free.is_some()).then_some(())
    })
    .expect("a report");
    let (hot, free) = (hot.unwrap(), free.unwrap());
    eprintln!(
        "report in {:?}: {} hot ranges, {} free ranges ({} free pages)",
        t.elapsed(),
        hot.len(),
        free.len(),
        free.iter().map(|r| r.count).sum::<u64>()
    );
    assert!(
        !hot.is_empty(),
        "a running machine has slab and page tables"
    );
    assert!(!free.is_empty());
    assert_eq!(guest_agent::scan::ranges::subtract(&hot, &free), hot);

    // Bad input: an unknown but well-framed message type gets an Error; garbage does not.
    host.stream.write_all(b"noise\xF1\xF1").unwrap();
    let mut unknown = encode(&Message::ReportNow).unwrap();
    unknown[2] = 200;
    host.stream.write_all(&unknown).unwrap();
    let err = host.recv_until(Duration::from_secs(10), |m| match m {
        Message::Error { code, .. } => Some(*code),
        _ => None,
    });
    assert_eq!(err, Some(ErrorCode::UNEXPECTED));

    host.send(&Message::PostcopyStarted);
    let touched = host.recv_until(Duration::from_secs(30), |m| match m {
        Message::Touched(t) => Some(*t),
        _ => None,
    });
    let touched = touched.expect("Touched");
    assert_eq!(touched.processes, 1);
    assert!(touched.pages > 0, "{touched:?}");
    host.send(&Message::PostcopyFinished);

    // Hanging up ends the agent.
    drop(host);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = agent.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not exit after the host hung up"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut log = String::new();
    agent
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    eprintln!("{log}");
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("pre-touched processes=1"), "{log}");
    let _ = target.kill();
    let _ = target.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
