//! Issue 15 (downtime): `faultline vm source` connects, authenticates and runs faultline's
//! handshake before it pauses its guest, and hands the session the paused memory and vCPU
//! state afterwards. Real `faultline vm` processes over QUIC on loopback; skipped (with a
//! message) where /dev/kvm does not exist.

use std::time::{Duration, Instant};

use faultline_tests::{kvm_present, run_vm_source, Background, Certs, DestProcess};
use serde_json::Value;

const GUEST: [&str; 10] = [
    "--size",
    "64M",
    "--vcpus",
    "1",
    "--program",
    "random-rw",
    "--working-set",
    "32M",
    "--report-every",
    "16384",
];

/// A source that connects as it boots and then runs its guest for 3 s before pausing (the
/// destination waits in the handshake all that while, kept up by keep-alives) still
/// migrates the guest byte for byte.
#[test]
fn a_source_connected_long_before_it_pauses_migrates_byte_exact() {
    if !kvm_present() {
        return;
    }
    let certs = Certs::new();
    let run_secs = 3.0;
    let secs = run_secs.to_string();
    let dest = DestProcess::vm(&certs, &[&GUEST[..], &["--run-secs", "1"]].concat());
    let src = run_vm_source(
        &certs,
        &dest.addr,
        &[&GUEST[..], &["--run-secs", &secs]].concat(),
        Duration::from_secs(90),
    );
    let dst = dest.wait(Duration::from_secs(90));
    assert!(src.status.success(), "source failed: {}", src.stderr);
    assert!(dst.status.success(), "destination failed: {}", dst.stderr);
    let (s, d) = (&src.json, &dst.json);
    eprintln!("source: {s}\ndestination: {d}");
    // All memory at switchover, hashed on both sides, and the guest's own digest of its
    // slice after resuming.
    assert!(s["memory_digest"].is_string());
    assert_eq!(d["switchover_digest"], s["memory_digest"], "memory differs");
    assert_eq!(d["guest_digests"], s["slice_digests"], "guest digests");
    assert_eq!(d["continued"], true);
    assert_eq!(
        d["guest_progress_at_switchover"],
        s["guest_progress_at_switchover"]
    );
    // The session began before the guest's run (the destination's clock starts at the
    // connect): the resume came after at least that run. (A lower bound the source's own
    // sleep guarantees, not a measurement.)
    let resume_ms = d["resume_ms"].as_f64().expect("resume_ms");
    assert!(
        resume_ms >= run_secs * 1e3,
        "the source connected only {resume_ms} ms before the resume: not before its run"
    );
    // No reconnect was needed while it waited.
    assert_eq!(s["pauses"], Value::from(0), "{s}");
}

/// A destination nobody listens at: the source says so, naming the address, and fails
/// before it pauses its guest (it never reaches the switchover, so it prints no report).
#[test]
fn a_connect_failure_is_reported_before_the_guest_is_paused() {
    if !kvm_present() {
        return;
    }
    let certs = Certs::new();
    // A port that was free a moment ago.
    let addr = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port")
        .to_string();
    let src = run_vm_source(
        &certs,
        &addr,
        &[&GUEST[..], &["--run-secs", "30"]].concat(),
        Duration::from_secs(60),
    );
    assert!(!src.status.success(), "the source migrated to nobody");
    assert_not_paused(&src, &addr);
}

/// A destination that refuses the session in faultline's handshake (it expects another VM
/// id) is reported before the pause too: the handshake ran while the guest ran.
#[test]
fn a_refused_handshake_is_reported_before_the_guest_is_paused() {
    if !kvm_present() {
        return;
    }
    let certs = Certs::new();
    let dest = DestProcess::vm(
        &certs,
        &[&GUEST[..], &["--run-secs", "0", "--vm-id", "another-vm"]].concat(),
    );
    let addr = dest.addr.clone();
    let src = run_vm_source(
        &certs,
        &addr,
        &[&GUEST[..], &["--run-secs", "30"]].concat(),
        Duration::from_secs(60),
    );
    let _ = dest.wait(Duration::from_secs(60));
    assert!(!src.status.success(), "the source migrated a refused VM");
    assert_not_paused(&src, &addr);
}

/// `vm dest --hand-over-timeout`: a source that connected but does not hand its VM over
/// in time is given up on, with an error that says so, instead of after the default 300 s.
#[test]
fn the_destination_gives_up_on_a_source_that_does_not_hand_over() {
    if !kvm_present() {
        return;
    }
    let certs = Certs::new();
    let dest = DestProcess::vm(
        &certs,
        &[&GUEST[..], &["--run-secs", "0", "--hand-over-timeout", "2"]].concat(),
    );
    let tls = certs.args("source", "dest");
    let mut args = vec!["vm", "source", "--connect", &dest.addr, "--json"];
    args.extend(tls.iter().map(String::as_str));
    args.extend_from_slice(&GUEST);
    // Its guest runs far longer than the destination waits.
    args.extend_from_slice(&["--run-secs", "60"]);
    let started = Instant::now();
    let src = Background::spawn(&args);
    let dst = dest.wait(Duration::from_secs(60));
    let waited = started.elapsed();
    src.kill();
    assert!(!dst.status.success(), "the destination did not give up");
    let said = format!("{} {}", dst.json, dst.stderr);
    assert!(
        said.contains("did not hand the VM over within 2s"),
        "unclear error: {said}"
    );
    assert!(
        waited < Duration::from_secs(30),
        "gave up only after {waited:?}"
    );
}

/// `src` failed with `--json`'s error report (no migration report: it never paused), and
/// the error names `addr` and says the guest was not paused.
fn assert_not_paused(src: &faultline_tests::Finished, addr: &str) {
    assert_eq!(
        src.json["ok"],
        Value::Bool(false),
        "{} (status {}, stderr {})",
        src.json,
        src.status,
        src.stderr
    );
    assert!(
        src.json.get("pause_ms").is_none() && src.json.get("downtime_ms").is_none(),
        "a migration report: {}",
        src.json
    );
    let message = src.json["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(addr),
        "the address is not named: {message}"
    );
    assert!(
        message.contains("the guest was not paused"),
        "unclear error: {message}"
    );
}
