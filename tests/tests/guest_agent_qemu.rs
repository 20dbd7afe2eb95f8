//! The guest agent in a real Linux guest (Debian's kernel under QEMU TCG, busybox
//! initramfs built by `scripts/guest-image.sh`): the workload `faultline-touch` keeps a
//! 64 MiB buffer hot and prints its guest-physical frames on the console. The host side is
//! the library's `vmm_shim::hints::AgentLink` on QEMU's Unix socket for the agent's serial
//! port: it asks for a report, and the hints its `HintBoard` accepted must cover every frame
//! of the buffer with hot ranges and none with free pages. Then hostile input (raw bytes)
//! gets `Error` answers without stopping the agent; then the link's `PostcopyStarted` makes
//! the agent pre-touch the workload and answer `Touched`.
//!
//! Skipped, with the reason, only if QEMU or the kernel cannot be installed (not root, no
//! package registry).

use std::time::{Duration, Instant};

use faultline_tests::qemu::{guest_image, AgentConn, Guest};
use guest_agent::proto::{encode, ErrorCode, Message, PfnRange, PROTOCOL_VERSION};
use transport::Layout;
use vmm_shim::hints::{AgentLink, BoardLimits};

const TOUCH_MIB: u64 = 64;
const GUEST_MIB: u64 = 512;

/// Parses `TOUCH_PFNS a+n,b+m,...`.
fn parse_touch_pfns(line: &str) -> Vec<PfnRange> {
    let list = line
        .trim()
        .strip_prefix("TOUCH_PFNS ")
        .unwrap_or_else(|| panic!("not a TOUCH_PFNS line: {line}"));
    list.split(',')
        .map(|r| {
            let (a, n) = r
                .split_once('+')
                .unwrap_or_else(|| panic!("bad range {r:?} in {line}"));
            PfnRange::new(a.parse().expect("first"), n.parse().expect("count"))
        })
        .collect()
}

/// Frames of `a` that are also in `b` (both sorted, non-overlapping).
fn overlap(a: &[PfnRange], b: &[PfnRange]) -> u64 {
    let mut n = 0;
    let mut j = 0;
    for r in a {
        while j < b.len() && b[j].end() <= r.first {
            j += 1;
        }
        let mut k = j;
        while k < b.len() && b[k].first < r.end() {
            n += r.end().min(b[k].end()) - r.first.max(b[k].first);
            k += 1;
        }
    }
    n
}

/// Host page ranges as frame ranges (frame = page for this guest).
fn as_pfn_ranges(r: &[std::ops::Range<u64>]) -> Vec<PfnRange> {
    r.iter()
        .map(|r| PfnRange::new(r.start, r.end - r.start))
        .collect()
}

#[test]
fn guest_agent_in_qemu_reports_hot_and_free_pages_and_pretouches() {
    let image = match guest_image() {
        Ok(i) => i,
        Err(why) => {
            eprintln!("SKIPPED guest_agent_in_qemu: the guest image cannot be built here: {why}");
            return;
        }
    };
    let t0 = Instant::now();
    let mut guest = Guest::boot(
        &image,
        GUEST_MIB as u32,
        &format!(
            "init_on_free=1 touch_mb={TOUCH_MIB} agent.max_cpu_pct=50 agent.report_every_ms=0 agent.interval_ms=1000"
        ),
    );
    let init = guest.wait_for(Duration::from_secs(60), |l| l.starts_with("FAULTLINE_INIT"));
    assert!(
        init.is_some(),
        "the guest did not reach /init:\n{}",
        guest.console()
    );
    let boot_s = guest.started.elapsed().as_secs_f64();
    let touch = guest.wait_for(Duration::from_secs(30), |l| l.starts_with("TOUCH_PFNS "));
    let touch =
        touch.unwrap_or_else(|| panic!("faultline-touch printed no frames:\n{}", guest.console()));
    assert!(!touch.contains("unavailable"), "{touch}");
    // The host's side is the library's: an AgentLink on QEMU's socket for the agent's
    // serial port, feeding a HintBoard for this guest's memory (one region at
    // guest-physical 0, so a frame number is a page number).
    let layout = Layout::single(GUEST_MIB << 20);
    let agent_socket = guest.agent_socket.clone();
    let connect = || {
        AgentLink::connect(
            &agent_socket,
            &layout,
            BoardLimits::default(),
            Duration::from_secs(10),
        )
        .expect("connect to the agent's serial socket")
    };
    let link = connect();

    // 1. A report: the buffer is hot, and not free.
    let buffer_pages = TOUCH_MIB * 256;
    let mut tries = 0;
    let (hints, buffer, covered) = loop {
        tries += 1;
        let hints = link
            .fresh_hints(Duration::from_secs(30))
            .expect("ReportNow sent")
            .unwrap_or_else(|| {
                panic!(
                    "no report accepted within 30 s; refused: {:?}",
                    link.take_errors()
                )
            });
        // The newest frames the workload printed (the kernel may move pages, and
        // faultline-touch prints them again when it does).
        let line = guest
            .wait_for(Duration::ZERO, |l| l.starts_with("TOUCH_PFNS "))
            .expect("TOUCH_PFNS");
        let buffer = parse_touch_pfns(&line);
        assert_eq!(buffer.iter().map(|r| r.count).sum::<u64>(), buffer_pages);
        let covered = overlap(&buffer, &as_pfn_ranges(&hints.hot));
        // A page moved between the workload's print and the scan is the one excuse for a
        // miss; asking again after the workload re-printed settles it.
        if covered == buffer_pages || tries == 3 {
            break (hints, buffer, covered);
        }
        std::thread::sleep(Duration::from_millis(1500));
    };
    let h = link.hello().expect("a Hello before the report");
    assert_eq!(h.version, PROTOCOL_VERSION);
    assert_eq!(h.page_size, 4096);
    assert!(
        h.poison_on_free && hints.poison_on_free,
        "init_on_free=1 is on the guest's command line"
    );
    assert!(
        (400 << 20..=GUEST_MIB << 20).contains(&h.mem_total_bytes),
        "MemTotal {}",
        h.mem_total_bytes
    );
    let hot_pages = hints.hot_pages();
    let free_pages = hints.free_pages();
    let free_in_buffer: u64 = buffer
        .iter()
        .flat_map(|r| r.first..r.end())
        .filter(|&p| hints.free.get(p))
        .count() as u64;
    let report_line = guest
        .wait_for(Duration::from_secs(5), |l| {
            l.contains("guest-agent: report seq=")
        })
        .unwrap_or_default();
    eprintln!(
        "guest booted to /init in {boot_s:.1} s; report {} after {} tries: hot {hot_pages} pages in {} ranges, \
         free {free_pages} pages; buffer {buffer_pages} pages in {} ranges, {covered} hot ({:.1}%), {free_in_buffer} free; \
         board {:?}\n{report_line}",
        hints.seq,
        tries,
        hints.hot.len(),
        buffer.len(),
        100.0 * covered as f64 / buffer_pages as f64,
        link.stats(),
    );
    assert_eq!(
        covered,
        buffer_pages,
        "hot ranges miss {} of the buffer's {buffer_pages} frames",
        buffer_pages - covered
    );
    assert_eq!(
        free_in_buffer, 0,
        "free ranges include frames of the buffer"
    );
    // (A page both hot and free would have made the board refuse the report.)
    // Most of a 512 MiB guest that runs two small programs is free.
    assert!(free_pages > 256 * 100, "only {free_pages} free pages");
    drop(link);

    // The raw protocol for what the library never sends.
    let mut agent = AgentConn::connect(&guest.agent_socket, Duration::from_secs(10));
    // 2. Hostile input: garbage is skipped, bad frames get an Error, the agent goes on.
    agent.send_raw(b"\x00\xFFgarbage\xF1\x7A\x01\x02");
    let mut unknown = encode(&Message::ReportNow).unwrap();
    unknown[2] = 99; // a message type that does not exist, correctly framed
    agent.send_raw(&unknown);
    agent.send(&Message::HotRanges {
        seq: 1,
        last: true,
        ranges: vec![PfnRange::new(1, 1)],
    }); // a guest→host message sent the wrong way
    let mut errors = Vec::new();
    agent.recv_until(Duration::from_secs(15), |m| {
        if let Message::Error { code, message } = m {
            errors.push((*code, message.clone()));
        }
        (errors.len() >= 2).then_some(())
    });
    assert!(
        errors.len() >= 2 && errors.iter().all(|(c, _)| *c == ErrorCode::UNEXPECTED),
        "expected two UNEXPECTED errors, got {errors:?}"
    );

    // 3. Postcopy, from the library again: the agent pre-touches the workload and says so.
    drop(agent);
    let link = connect();
    link.postcopy_started().expect("PostcopyStarted sent");
    let touched = link
        .wait_touched(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("no Touched answer:\n{}", guest.console()));
    eprintln!("pre-touch: {touched:?}");
    assert_eq!(
        touched.processes, 1,
        "faultline-touch is the one configured target"
    );
    // Hot mode touches the present pages whose frame is hot: the whole buffer at least.
    assert!(touched.pages >= buffer_pages, "{touched:?}");
    assert!(
        guest
            .wait_for(Duration::from_secs(5), |l| l
                .contains("guest-agent: pre-touched"))
            .is_some(),
        "no pre-touch log line:\n{}",
        guest.console()
    );
    link.postcopy_finished().expect("PostcopyFinished sent");
    // Scanning resumes: a fresh report arrives.
    let after = link
        .fresh_hints(Duration::from_secs(30))
        .expect("ReportNow sent")
        .expect("a report after PostcopyFinished");
    assert!(!after.hot.is_empty());
    eprintln!("total test time {:.1} s", t0.elapsed().as_secs_f64());
}
