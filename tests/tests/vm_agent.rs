//! The guest agent's channel on the command line: `faultline vm source --agent-socket` and
//! `faultline vm dest --agent-socket`, two real processes migrating a running KVM guest.
//! Bare-metal reference guests run no agent, so the test plays it on both sockets with the
//! agent's protocol: the source side answers `ReportNow` with a report (hot ranges, a free
//! region the guest never writes, `poison_on_free = false`); the destination side expects
//! `PostcopyStarted`, answers `Touched`, then expects `PostcopyFinished`.
//! Skipped (with a message) only where /dev/kvm does not exist.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread::JoinHandle;
use std::time::Duration;

use faultline_tests::loopback::{agent_report, reference_hot};
use faultline_tests::{kvm_present, run_vm_source, Certs, DestProcess};
use guest_agent::proto::{encode, FrameReader, Message, PfnRange, TouchReport};
use refvmm::{Program, VmConfig};

const MEM: u64 = 64 << 20;
const PAGES: u64 = MEM / 4096;
/// The top 16 MiB: above the guest's 8 MiB of fixed areas and 32 MiB working set.
const FREE: PfnRange = PfnRange {
    first: 48 << 8,
    count: 16 << 8,
};
const _: () = assert!(FREE.first + FREE.count == PAGES);

fn guest_args() -> Vec<&'static str> {
    vec![
        "--size",
        "64M",
        "--vcpus",
        "2",
        "--program",
        "scattered",
        "--working-set",
        "32M",
        "--report-every",
        "16384",
        "--run-secs",
        "1",
    ]
}

fn config() -> VmConfig {
    VmConfig {
        mem_size: MEM,
        vcpus: 2,
        program: Program::Scattered {
            working_set: 32 << 20,
        },
        report_every: 16384,
    }
}

/// Messages from the host on `conn`, handed to `on` until it returns false or the host
/// hangs up; returns them all.
fn serve(
    mut conn: UnixStream,
    mut on: impl FnMut(&Message, &mut UnixStream) -> bool,
) -> Vec<Message> {
    let mut reader = FrameReader::new();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) | Err(_) => return seen,
            Ok(n) => n,
        };
        let mut data = &buf[..n];
        while !data.is_empty() {
            let used = reader.feed(data);
            data = &data[used..];
            while let Some(m) = reader.next_frame() {
                let m = m.expect("the host sends well-formed frames");
                let go = on(&m, &mut conn);
                seen.push(m);
                if !go {
                    return seen;
                }
            }
        }
    }
}

/// The source side's agent: answers every `ReportNow` with `reply`.
fn source_agent(listener: UnixListener, reply: Vec<u8>) -> JoinHandle<Vec<Message>> {
    std::thread::spawn(move || {
        let (conn, _) = listener.accept().expect("the source connects");
        serve(conn, |m, conn| {
            if *m == Message::ReportNow {
                conn.write_all(&reply).expect("answer ReportNow");
            }
            true
        })
    })
}

/// The destination side's agent: `Touched` after `PostcopyStarted`, done after
/// `PostcopyFinished`.
fn dest_agent(listener: UnixListener, touched: TouchReport) -> JoinHandle<Vec<Message>> {
    std::thread::spawn(move || {
        let (conn, _) = listener.accept().expect("the destination connects");
        serve(conn, |m, conn| {
            if *m == Message::PostcopyStarted {
                conn.write_all(&encode(&Message::Touched(touched)).unwrap())
                    .expect("answer PostcopyStarted");
            }
            *m != Message::PostcopyFinished
        })
    })
}

struct Run {
    src: serde_json::Value,
    dst: serde_json::Value,
    source_agent_saw: Vec<Message>,
    dest_agent_saw: Vec<Message>,
}

/// `faultline vm dest` and `faultline vm source` on the test guest, each with its extra
/// arguments; both must succeed. Their JSON reports, source first.
fn migrate(src_extra: &[&str], dest_extra: &[&str]) -> (serde_json::Value, serde_json::Value) {
    let certs = Certs::new();
    let dest = DestProcess::vm(&certs, &[&guest_args()[..], dest_extra].concat());
    let src = run_vm_source(
        &certs,
        &dest.addr,
        &[&guest_args()[..], src_extra].concat(),
        Duration::from_secs(90),
    );
    let dst = dest.wait(Duration::from_secs(90));
    assert!(src.status.success(), "source failed: {}", src.stderr);
    assert!(dst.status.success(), "destination failed: {}", dst.stderr);
    (src.json, dst.json)
}

fn migrate_with_agent(reply: Vec<u8>, touched: TouchReport) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let (s_sock, d_sock) = (dir.path().join("src-agent"), dir.path().join("dst-agent"));
    let s_agent = source_agent(UnixListener::bind(&s_sock).unwrap(), reply);
    let d_agent = dest_agent(UnixListener::bind(&d_sock).unwrap(), touched);
    let (s_arg, d_arg) = (s_sock.display().to_string(), d_sock.display().to_string());
    // The played agent answers at once: its scan is certainly newer than the dirty
    // tracking, so no scan age need be allowed for.
    let (src, dst) = migrate(
        &["--agent-socket", &s_arg, "--agent-scan-age", "0"],
        &["--agent-socket", &d_arg],
    );
    eprintln!(
        "source hints: {}\ndestination agent: {}",
        src["hints"], dst["agent"]
    );
    // All memory as at switchover, and each guest's own digest of its slice.
    assert!(src["memory_digest"].is_string());
    assert_eq!(
        src["memory_digest"], dst["switchover_digest"],
        "destination memory differs from the source's at switchover"
    );
    assert_eq!(dst["guest_digests"], dst["host_digests"]);
    Run {
        source_agent_saw: s_agent.join().unwrap(),
        dest_agent_saw: d_agent.join().unwrap(),
        src,
        dst,
    }
}

#[test]
fn agent_hints_steer_the_push_and_the_destination_tells_the_agent() {
    if !kvm_present() {
        return;
    }
    let hot = reference_hot(&config());
    let hot_pages: u64 = hot.iter().map(|r| r.count).sum();
    let touched = TouchReport {
        processes: 1,
        pages: 1234,
        failed_pages: 0,
        elapsed_ms: 7,
    };
    let run = migrate_with_agent(agent_report(5, MEM, false, &hot, &[FREE]), touched);
    let h = &run.src["hints"];
    assert_eq!(h["seq"], 5, "{h}");
    assert_eq!(h["pages_hot"], hot_pages);
    assert!(h["pages_pushed_hot"].as_u64().unwrap() > 0, "{h}");
    assert_eq!(h["pages_reported_free"], FREE.count);
    // The guest never writes the free region: every free page is skipped.
    assert_eq!(h["pages_skipped_free"], FREE.count, "{h}");
    assert!(h["skip_refused"].is_null(), "{h}");
    assert!(run.source_agent_saw.contains(&Message::ReportNow));

    let a = &run.dst["agent"];
    assert!(a["started_sent_ms"].is_number(), "{a}");
    assert_eq!(a["finished_sent"], true, "{a}");
    assert_eq!(a["touched_pages"], 1234, "{a}");
    assert_eq!(
        run.dest_agent_saw,
        vec![Message::PostcopyStarted, Message::PostcopyFinished]
    );
}

#[test]
fn a_hostile_agent_costs_the_hints_not_the_migration() {
    if !kvm_present() {
        return;
    }
    // Garbage, then a report whose hot list names frames past the guest's end: the board
    // refuses it whole, the source migrates without hints, and says why.
    let mut reply = b"\x00\xffnot a frame at all\x13\x37".to_vec();
    reply.extend(agent_report(
        9,
        MEM,
        false,
        &[PfnRange::new(PAGES - 4, 1 << 20)],
        &[FREE],
    ));
    let run = migrate_with_agent(reply, TouchReport::default());
    let h = &run.src["hints"];
    assert!(h["seq"].is_null(), "{h}");
    assert_eq!(h["pages_skipped_free"], 0);
    assert_eq!(h["pages_pushed_hot"], 0);
    let errors = h["agent_errors"].as_array().expect("agent_errors");
    assert!(
        errors
            .iter()
            .any(|e| e.as_str().unwrap_or("").contains("not guest memory")),
        "{h}"
    );
    assert_eq!(run.dst["agent"]["finished_sent"], true);
}

#[test]
fn an_unreachable_agent_costs_the_hints_not_the_evacuation() {
    if !kvm_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-agent-here");
    let missing_arg = missing.display().to_string();
    let (src, dst) = migrate(
        &["--agent-socket", &missing_arg, "--agent-timeout", "0.5"],
        &[],
    );
    let h = &src["hints"];
    assert!(h["seq"].is_null(), "{h}");
    let why = h["skip_refused"].as_str().unwrap_or_default();
    assert!(
        why.contains(&missing_arg),
        "the reason names the socket: {h}"
    );
    assert_eq!(src["memory_digest"], dst["switchover_digest"]);
}
