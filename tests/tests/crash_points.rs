//! Crash points (docs/recovery.md, "Crash points"): real `faultline` processes killed with
//! SIGKILL across replication, the handshake, postcopy and completion, and what the
//! surviving side does, checked against the written semantics:
//!
//! - before switchover, a crash of the destination leaves the VM at the source (which
//!   reconnects and finishes with a destination started again; the standby's replica
//!   intact), and a crash of the source leaves nothing running at the destination, which
//!   takes the next source;
//! - after switchover, a crash of either side loses the VM: the survivor says so when it
//!   notices (within `SILENCE_LOST`) and ends with the kind `vm_lost` and the exposure
//!   window, never hangs and never starts the VM over from an older state;
//! - once every page is at the destination, a crash of the source loses nothing.
//!
//! Points inside the protocol (a `Hello` arrived and is not answered, the `Hello` went out,
//! the `Complete` arrived) are the processes' own crash points (`FAIL_POINTS=<name>=return`:
//! the process kills itself with SIGKILL there); points in mid-transfer are SIGKILLs sent
//! from here once enough bytes crossed the WAN emulator. The standby killed in the middle of
//! replication and started again is `standby_restarted_before_evacuation_keeps_its_replica`
//! in replica.rs.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use faultline::image::SourceImage;
use faultline_tests::{
    assert_evacuated, assert_migrated, free_udp_port, kvm_present, wait_replicated, Background,
    Certs, DestProcess, Finished, ShmDir,
};
use serde_json::Value;
use wan_emu::{LinkConfig, WanEmulator};

const TIMEOUT: Duration = Duration::from_secs(90);

fn crash_at(point: &str) -> String {
    format!("{point}=return")
}

fn listen_addr() -> String {
    format!("127.0.0.1:{}", free_udp_port())
}

/// Waits until `bytes` went from the source through `wan`; panics after 60 s.
fn wait_for_bytes(wan: &WanEmulator, bytes: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while wan.counters().client_to_server.bytes < bytes {
        assert!(Instant::now() < deadline, "{bytes} B never crossed");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The survivor of a crash after switchover: it failed with kind `vm_lost` (exit 9), said
/// so with the exposure window, and told the operator when it noticed the loss.
fn assert_vm_lost(side: &str, f: &Finished) -> Value {
    assert_eq!(f.status.code(), Some(9), "{side}: {}\n{}", f.json, f.stderr);
    let v = &f.json;
    assert_eq!(v["ok"], false, "{side}: {v}");
    assert_eq!(v["error"]["kind"], "vm_lost", "{side}: {v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("the VM is lost"), "{side}: {message}");
    assert!(
        v["vm_lost"]["vulnerability_ms"].as_u64().unwrap_or(0) > 0,
        "{side}: {v}"
    );
    v.clone()
}

/// A source through a slow link (returned: it lives as long as the caller keeps it) to
/// `dest_addr`, once `after` bytes crossed.
fn in_mid_postcopy(
    certs: &Certs,
    dest_addr: &str,
    size: &str,
    after: u64,
) -> (Background, WanEmulator) {
    let upstream: SocketAddr = dest_addr.parse().unwrap();
    let link = LinkConfig::new(Duration::from_millis(20), 50_000_000);
    let wan = WanEmulator::start("127.0.0.1:0".parse().unwrap(), upstream, link).unwrap();
    let relay = wan.local_addr().to_string();
    let src = Background::source(certs, "source", &relay, &["--synthetic", size], &[]);
    wait_for_bytes(&wan, after);
    (src, wan)
}

#[test]
fn destination_killed_before_answering_the_hello_leaves_the_vm_at_the_source() {
    // Point: a `Hello` arrived at the destination and is not answered. The source owns the
    // VM, reconnects, and a destination started again on the same address takes it whole.
    let certs = Certs::new();
    let listen = listen_addr();
    let at = crash_at("dest-hello-migrate");
    let env = [("FAIL_POINTS", at.as_str())];
    let first = DestProcess::start_env(&certs, &["dest"], &listen, &["--size", "16M"], &env);
    let src = Background::source(&certs, "source", &listen, &["--synthetic", "16M"], &[]);
    let first = first.wait(TIMEOUT);
    assert!(
        first.stderr.contains("crash point dest-hello-migrate"),
        "{}",
        first.stderr
    );
    let second = DestProcess::start_env(&certs, &["dest"], &listen, &["--size", "16M"], &[]);
    let src = src.wait(TIMEOUT);
    let dst = second.wait(TIMEOUT);
    assert_migrated(&src, &dst);
    assert!(
        src.stderr
            .contains("before switchover: the VM is still here"),
        "{}",
        src.stderr
    );
}

#[test]
fn source_killed_after_its_hello_leaves_nothing_running_and_the_next_source_is_taken() {
    // Point: the destination answered the source's `Hello`; the VM state, which hands the VM
    // over, was not sent. The destination never ran the guest; a source started again (a
    // new session) migrates to it.
    if !kvm_present() {
        return;
    }
    let certs = Certs::new();
    let guest = ["--size", "32M", "--vcpus", "1", "--run-secs", "0.3"];
    let dest = DestProcess::vm(&certs, &guest);
    let at = crash_at("source-hello-answered");
    let vm_source = |env: &[(&str, &str)]| {
        let mut args = vec!["vm", "source", "--connect", &dest.addr, "--json"];
        let tls = certs.args("source", "dest");
        args.extend(tls.iter().map(String::as_str));
        args.extend(guest);
        Background::spawn_env(&args, env).wait(TIMEOUT)
    };
    let first = vm_source(&[("FAIL_POINTS", at.as_str())]);
    assert!(
        first.stderr.contains("crash point source-hello-answered"),
        "{}",
        first.stderr
    );
    let second = vm_source(&[]);
    let dst = dest.wait(TIMEOUT);
    assert!(second.status.success(), "{}", second.stderr);
    assert!(dst.status.success(), "{}", dst.stderr);
    assert_eq!(
        second.json["memory_digest"], dst.json["switchover_digest"],
        "{}\n{}",
        second.json, dst.json
    );
    assert_eq!(dst.json["pauses"], 1, "the first source's session paused");
}

#[test]
fn standby_killed_before_answering_the_evacuation_keeps_its_replica_and_the_vm_its_source() {
    // Point: the evacuation's `Hello` arrived at the standby (replication ran before it).
    // The replicator still owns the VM; the standby started again on its replica takes it,
    // and only the stale pages cross.
    let certs = Certs::new();
    let dir = ShmDir::new("crash-evac-hello");
    let listen = listen_addr();
    let args = ["--size", "32M", "--replica-dir", &dir.arg()];
    let at = crash_at("dest-hello-evacuate");
    let env = [("FAIL_POINTS", at.as_str())];
    let first = DestProcess::start_env(&certs, &["standby"], &listen, &args, &env);
    let src = Background::replicate(
        &certs,
        &listen,
        &[
            "--synthetic",
            "32M",
            "--evacuate-after",
            "3",
            "--stale-pct",
            "10",
        ],
    );
    let first = first.wait(TIMEOUT);
    assert!(
        first.stderr.contains("crash point dest-hello-evacuate"),
        "{}",
        first.stderr
    );
    let second = DestProcess::start_env(&certs, &["standby"], &listen, &args, &[]);
    let src = src.wait(TIMEOUT);
    let dst = second.wait(TIMEOUT);
    let (_, d) = assert_evacuated(&src, &dst);
    assert_eq!(d["pages_stale"], 819, "only the stale 10% crossed: {d}");
}

#[test]
fn replicator_killed_while_replicating_leaves_the_standby_and_its_replica() {
    // Point: in the middle of replication. The standby keeps listening with its replica; a
    // replicator started again evacuates into it.
    let certs = Certs::new();
    let dir = ShmDir::new("crash-repl");
    let standby = DestProcess::standby(
        &certs,
        "127.0.0.1:0",
        &["--size", "32M", "--replica-dir", &dir.arg()],
    );
    let first = Background::replicate(&certs, &standby.addr, &["--synthetic", "32M"]);
    wait_replicated(&dir, 8192, 0.5);
    first.kill();
    let second = Background::replicate(
        &certs,
        &standby.addr,
        &["--synthetic", "32M", "--evacuate-after", "2"],
    );
    let src = second.wait(TIMEOUT);
    let dst = standby.wait(TIMEOUT);
    assert_evacuated(&src, &dst);
}

#[test]
fn source_killed_in_mid_postcopy_loses_the_vm_and_the_destination_says_so() {
    let certs = Certs::new();
    let dest = DestProcess::start(
        &certs,
        &["--size", "64M", "--workers", "2", "--recover-timeout", "2"],
    );
    let (src, _wan) = in_mid_postcopy(&certs, &dest.addr, "64M", 8_000_000);
    src.kill();
    let killed = Instant::now();
    let dst = dest.wait(TIMEOUT);
    let took = killed.elapsed();
    let v = assert_vm_lost("destination", &dst);
    assert!(v["vm_lost"]["pages_missing"].as_u64().unwrap() > 0, "{v}");
    eprintln!(
        "destination: {} after the kill: {}",
        took.as_millis(),
        v["vm_lost"]
    );
    assert!(
        dst.stderr
            .contains("lost after switchover: the guest runs on here"),
        "{}",
        dst.stderr
    );
    // 0.6 s of silence, then the 2 s recover timeout.
    assert!(took < Duration::from_secs(15), "gave up after {took:?}");
}

#[test]
fn destination_killed_in_mid_postcopy_is_never_replaced_by_a_fresh_one() {
    // The source handed the VM over; a destination started again on the same address does
    // not hold the session and refuses it: the source reports the VM lost at once, and no
    // guest starts over from the source's older memory.
    let certs = Certs::new();
    let listen = listen_addr();
    let first = DestProcess::start_env(
        &certs,
        &["dest"],
        &listen,
        &["--size", "64M", "--workers", "2"],
        &[],
    );
    let (src, _wan) = in_mid_postcopy(&certs, &listen, "64M", 8_000_000);
    first.kill();
    let second = DestProcess::start_env(&certs, &["dest"], &listen, &["--size", "64M"], &[]);
    let started = Instant::now();
    let src = src.wait(TIMEOUT);
    let took = started.elapsed();
    let dst = second.wait(TIMEOUT);
    let v = assert_vm_lost("source", &src);
    eprintln!(
        "source: {} after the restart: {}",
        took.as_millis(),
        v["vm_lost"]
    );
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("does not hold that session"), "{message}");
    // The loss is noticed after 0.6 s of silence; the reconnect is refused at once.
    assert!(took < Duration::from_secs(15), "reported after {took:?}");
    assert!(
        !dst.status.success(),
        "the fresh destination ran: {}",
        dst.json
    );
    assert!(dst.json["digest"].is_null(), "{}", dst.json);
}

/// An evacuation of 64 MiB (half stale) from `replicate` into a standby (replication the
/// direct way, the evacuation through a slow link), once 6 MB of it crossed; the extra
/// arguments go to each side. The emulator, the directory and the certificates are
/// returned to live as long as the caller needs them.
struct Evacuating {
    standby: DestProcess,
    src: Background,
    _wan: WanEmulator,
    _dir: ShmDir,
    _certs: Certs,
}

fn in_mid_evacuation(tag: &str, standby_extra: &[&str], src_extra: &[&str]) -> Evacuating {
    let certs = Certs::new();
    let dir = ShmDir::new(tag);
    let replica = dir.arg();
    let standby_args = [
        &["--size", "64M", "--replica-dir", &replica, "--workers", "2"][..],
        standby_extra,
    ]
    .concat();
    let standby = DestProcess::standby(&certs, "127.0.0.1:0", &standby_args);
    let upstream: SocketAddr = standby.addr.parse().unwrap();
    let link = LinkConfig::new(Duration::from_millis(20), 50_000_000);
    let wan = WanEmulator::start("127.0.0.1:0".parse().unwrap(), upstream, link).unwrap();
    let relay = wan.local_addr().to_string();
    let src_args = [
        &[
            "--synthetic",
            "64M",
            "--evacuate-after",
            "1",
            "--stale-pct",
            "50",
            "--evacuate-connect",
            &relay,
        ][..],
        src_extra,
    ]
    .concat();
    let src = Background::replicate(&certs, &standby.addr, &src_args);
    wait_for_bytes(&wan, 6_000_000);
    Evacuating {
        standby,
        src,
        _wan: wan,
        _dir: dir,
        _certs: certs,
    }
}

#[test]
fn replicator_killed_in_mid_evacuation_loses_the_vm_and_the_standby_says_so() {
    let run = in_mid_evacuation("crash-evac-src", &["--recover-timeout", "2"], &[]);
    run.src.kill();
    let killed = Instant::now();
    let dst = run.standby.wait(TIMEOUT);
    let took = killed.elapsed();
    let v = assert_vm_lost("standby", &dst);
    eprintln!(
        "standby: {} after the kill: {}",
        took.as_millis(),
        v["vm_lost"]
    );
    assert!(v["vm_lost"]["pages_missing"].as_u64().unwrap() > 0, "{v}");
}

#[test]
fn standby_killed_in_mid_evacuation_loses_the_vm_and_the_replicator_says_so() {
    let run = in_mid_evacuation("crash-evac-dst", &[], &["--recover-timeout", "2"]);
    run.standby.kill();
    let killed = Instant::now();
    let src = run.src.wait(TIMEOUT);
    let took = killed.elapsed();
    let v = assert_vm_lost("replicator", &src);
    eprintln!(
        "replicator: {} after the kill: {}",
        took.as_millis(),
        v["vm_lost"]
    );
    assert!(took < Duration::from_secs(15), "gave up after {took:?}");
    assert!(
        src.stderr
            .contains("lost after switchover: the VM runs there"),
        "{}",
        src.stderr
    );
}

#[test]
fn source_killed_once_every_page_arrived_loses_nothing() {
    // Point: the destination's `Complete` arrived at the source. The guest needs nothing
    // more from it: the destination ends normally with all memory equal to the source's.
    let certs = Certs::new();
    let dest = DestProcess::start(
        &certs,
        &["--size", "16M", "--workers", "1", "--recover-timeout", "1"],
    );
    let at = crash_at("source-complete-received");
    let src = Background::source(
        &certs,
        "source",
        &dest.addr,
        &["--synthetic", "16M", "--seed", "7"],
        &[("FAIL_POINTS", at.as_str())],
    )
    .wait(TIMEOUT);
    assert!(
        src.stderr.contains("crash point source-complete-received"),
        "{}",
        src.stderr
    );
    let dst = dest.wait(TIMEOUT);
    assert!(dst.status.success(), "{}", dst.stderr);
    let expected = SourceImage::synthetic(16 << 20, 7)
        .unwrap()
        .digest()
        .unwrap();
    assert_eq!(dst.json["digest"], expected.as_str(), "{}", dst.json);
}

#[test]
fn a_bad_crash_point_setting_is_a_usage_error() {
    let certs = Certs::new();
    let src = Background::source(
        &certs,
        "source",
        "127.0.0.1:9",
        &["--synthetic", "1M"],
        &[("FAIL_POINTS", "source-hello-answered")],
    )
    .wait(TIMEOUT);
    assert_eq!(src.status.code(), Some(2), "{}", src.stderr);
    assert!(src.stderr.contains("FAIL_POINTS"), "{}", src.stderr);
}
