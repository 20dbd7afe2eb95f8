//! What an exposed listener and an unlucky operator meet (issue: hardening), with real
//! `faultline` processes: timeouts that mean what they say, junk and unauthenticated
//! peers that cannot end or stall a listener.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use faultline_tests::{
    assert_migrated, faultline_bin, run_source, Background, Certs, DestProcess, Finished, Reaped,
    ShmDir,
};
use serde_json::Value;
use transport::quic;

/// A loopback UDP port nobody listens on (bound, then released).
fn closed_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().port()
}

#[test]
fn connect_timeout_bounds_the_connect_when_nobody_listens() {
    let certs = Certs::new();
    let addr = format!("127.0.0.1:{}", closed_port());
    for secs in ["2", "0"] {
        let started = Instant::now();
        let out = Command::new(faultline_bin())
            .args([
                "source",
                "--connect",
                &addr,
                "--synthetic",
                "4M",
                "--connect-timeout",
                secs,
            ])
            .args(certs.args("source", "dest"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .expect("run faultline source");
        let took = started.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains("no destination answered") && stderr.contains(&addr),
            "{stderr}"
        );
        // Before, every attempt waited for QUIC's 30 s idle timeout (0 never ended).
        assert!(
            took < Duration::from_secs(15),
            "took {took:?} with --connect-timeout {secs}"
        );
    }
}

const TIMEOUT: Duration = Duration::from_secs(120);

/// xorshift64*: junk that is different in every datagram.
fn junk(state: &mut u64, out: &mut [u8]) {
    for b in out.iter_mut() {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *b = (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8;
    }
}

/// `n` 1,200-byte datagrams shaped as QUIC v1 Initials (long header 0xC3, version 1,
/// random 8-byte connection ids and payload), from ten source ports.
fn send_junk_initials(to: &str, n: usize) {
    let socks: Vec<_> = (0..10)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut d = [0u8; 1200];
    for i in 0..n {
        junk(&mut state, &mut d);
        d[0] = 0xC3;
        d[1..5].copy_from_slice(&1u32.to_be_bytes());
        d[5] = 8; // destination connection id length
        d[14] = 8; // source connection id length
        socks[i % socks.len()].send_to(&d, to).unwrap();
    }
}

/// The first datagram a real `faultline source` sends (its client Initial), caught by a
/// socket standing where the destination would be.
fn captured_initial(certs: &Certs) -> Vec<u8> {
    let trap = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    trap.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let addr = trap.local_addr().unwrap().to_string();
    let mut source = Command::new(faultline_bin())
        .args(["source", "--connect", &addr, "--synthetic", "4M"])
        .args(certs.args("source", "dest"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn faultline source");
    let mut buf = vec![0u8; 65536];
    let got = trap.recv_from(&mut buf);
    let _ = source.kill();
    let _ = source.wait();
    let (n, _) = got.expect("the source sent an Initial");
    buf.truncate(n);
    buf
}

/// A real source migrates into `dest` afterwards, byte for byte.
fn real_source_migrates(certs: &Certs, dest: DestProcess) -> Finished {
    let src = run_source(
        certs,
        "source",
        &dest.addr,
        &["--synthetic", "16M"],
        TIMEOUT,
    );
    let dst = dest.wait(TIMEOUT);
    assert_migrated(&src, &dst);
    dst
}

#[test]
fn a_destination_survives_junk_replayed_and_unpinned_peers() {
    let certs = Certs::new();
    let dest = DestProcess::start(&certs, &["--size", "16M"]);
    attack_listener(&certs, &dest.addr);
    let dst = real_source_migrates(&certs, dest);
    // A hundred refusals, logged at the 1st, 2nd, 4th, ... 64th: the flood does not become
    // a flood of log lines.
    let logged = dst
        .stderr
        .lines()
        .filter(|l| l.contains("refused a connection") && !l.contains("DEBUG"))
        .count();
    assert_eq!(logged, 7, "{logged} lines:\n{}", dst.stderr);
}

/// `n` QUIC clients with a certificate nobody pins connect to `addr` at once, from twenty
/// loopback addresses (127.0.0.2 to .21: a listener takes at most 8 handshakes at a time
/// from one, `AcceptLimits::max_handshakes_per_peer`, and the rest would wait on their
/// retransmission timers); how many were refused.
fn unpinned_clients(certs: &Certs, addr: &str, n: usize) -> usize {
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let stranger = transport::tls::Identity::generate("stranger").unwrap();
    let dest_cert = certs.identity("dest").cert;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let attempts: Vec<_> = (0..n)
            .map(|i| {
                let (id, cert) = (stranger.clone(), dest_cert.clone());
                let bind = format!("127.0.0.{}:0", 2 + i % 20).parse().unwrap();
                tokio::spawn(async move {
                    let ep = quic::client_endpoint(bind, &id, cert).expect("client endpoint");
                    let r = tokio::time::timeout(Duration::from_secs(20), async {
                        let conn = quic::connect(&ep, addr).await?;
                        // The handshake can complete on the client before the server has
                        // checked the client's certificate: wait for its verdict.
                        Err::<(), _>(quic::DriverError::Connection(conn.closed().await))
                    })
                    .await;
                    ep.close(0u32.into(), b"");
                    matches!(r, Ok(Err(_)))
                })
            })
            .collect();
        let mut refused = 0;
        for a in attempts {
            refused += usize::from(a.await.unwrap());
        }
        refused
    })
}

/// What the attacker sends a listener before the real peer comes.
fn attack_listener(certs: &Certs, addr: &str) {
    send_junk_initials(addr, 1000);
    // One real client Initial replayed from 100 source ports.
    let initial = captured_initial(certs);
    for _ in 0..100 {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.send_to(&initial, addr).unwrap();
    }
    assert_eq!(
        unpinned_clients(certs, addr, 100),
        100,
        "every unpinned client is refused"
    );
}

#[test]
fn a_standby_survives_junk_replayed_and_unpinned_peers_then_replicates_and_evacuates() {
    let certs = Certs::new();
    let dir = ShmDir::new("hardening");
    let standby = DestProcess::standby(
        &certs,
        "127.0.0.1:0",
        &["--size", "16M", "--replica-dir", &dir.arg()],
    );
    attack_listener(&certs, &standby.addr);
    let src = Background::replicate(
        &certs,
        &standby.addr,
        &[
            "--synthetic",
            "16M",
            "--evacuate-after",
            "1",
            "--stale-pct",
            "10",
        ],
    )
    .wait(TIMEOUT);
    let dst = standby.wait(TIMEOUT);
    assert!(src.status.success(), "replicate failed: {}", src.stderr);
    assert!(dst.status.success(), "standby failed: {}", dst.stderr);
    assert!(src.json["digest"].is_string(), "{}", src.json);
    assert_eq!(
        src.json["digest"], dst.json["digest"],
        "memory differs after evacuation"
    );
}

#[test]
fn a_destination_in_a_session_tells_a_second_source_it_is_busy() {
    let certs = Certs::new();
    // No push and no workload: the first session runs until it is killed.
    let dest = DestProcess::start(&certs, &["--size", "16M", "--workers", "0"]);
    let mut first = Reaped::new(
        Command::new(faultline_bin())
            .args([
                "source",
                "--connect",
                &dest.addr,
                "--synthetic",
                "16M",
                "--no-push",
            ])
            .args(certs.args("source", "dest"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the first source"),
    );
    std::thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    let second = run_source(
        &certs,
        "source",
        &dest.addr,
        &["--synthetic", "16M"],
        TIMEOUT,
    );
    let took = started.elapsed();
    let _ = first.kill();
    let _ = first.wait();
    dest.kill();
    assert!(!second.status.success());
    assert_eq!(
        second.json["error"]["kind"], "peer_refused",
        "{}",
        second.json
    );
    assert_eq!(second.status.code(), Some(4));
    assert!(
        second
            .stderr
            .contains("Busy: this side is already in a migration session"),
        "{}",
        second.stderr
    );
    // Told at once, not after an idle timeout.
    assert!(took < Duration::from_secs(15), "took {took:?}");
}

/// Runs `faultline source` with `args` and `--json`; its exit code and its one JSON object.
fn source_json(certs: &Certs, me: &str, args: &[&str]) -> (Option<i32>, Value) {
    let out = Command::new(faultline_bin())
        .args(["source", "--json"])
        .args(args)
        .args(certs.args(me, "dest"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run faultline source");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {stdout:?}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), v)
}

fn assert_failure(got: (Option<i32>, Value), kind: &str, code: i32, says: &str) {
    let (rc, v) = got;
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["error"]["kind"], kind, "{v}");
    assert_eq!(v["error"]["exit_code"], code, "{v}");
    assert_eq!(rc, Some(code), "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains(says), "{v}");
    // Said once: not with clap's own "error: " before it (stderr had "error: error:").
    assert!(!message.starts_with("error:"), "{v}");
    // Each cause is said once (an error's Display leaves its source to the chain).
    let parts: Vec<&str> = message.split(": ").collect();
    for w in parts.windows(2) {
        assert_ne!(w[0], w[1], "a cause repeated: {message}");
    }
}

#[test]
fn json_failures_are_one_object_with_a_documented_kind_and_exit_code() {
    let certs = Certs::new();
    let nobody = format!("127.0.0.1:{}", closed_port());
    let quick = ["--synthetic", "4M", "--connect-timeout", "1", "--connect"];

    let mut usage = quick.to_vec();
    usage.extend([nobody.as_str(), "--no-such-option"]);
    assert_failure(
        source_json(&certs, "source", &usage),
        "usage",
        2,
        "--no-such-option",
    );

    let mut network = quick.to_vec();
    network.push(&nobody);
    let got = source_json(&certs, "source", &network);
    assert_failure(got, "network", 5, "no destination answered");

    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().display().to_string();
    let local = ["--connect", &nobody, "--image", &image];
    let got = source_json(&certs, "source", &local);
    assert_failure(got, "local_io", 6, "is not a regular file (a directory)");

    // A source whose certificate the destination does not pin; the destination lives on.
    let dest = DestProcess::start(&certs, &["--size", "4M"]);
    let mut intruder = quick.to_vec();
    intruder.push(&dest.addr);
    let got = source_json(&certs, "intruder", &intruder);
    assert_failure(got, "authentication", 3, "certificate");
    let src = run_source(
        &certs,
        "source",
        &dest.addr,
        &["--synthetic", "4M"],
        TIMEOUT,
    );
    assert_eq!(src.json["ok"], true, "{}", src.json);
    assert_migrated(&src, &dest.wait(TIMEOUT));
}

#[test]
fn a_standby_on_a_busy_port_fails_before_creating_its_replica() {
    let certs = Certs::new();
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let replica = dir.path().join("replica");
    let out = Command::new(faultline_bin())
        .args(["standby", "--json", "--listen", &listen, "--size", "16M"])
        .args(["--replica-dir", &replica.display().to_string()])
        .args(certs.args("dest", "source"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run faultline standby");
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["error"]["kind"], "local_io", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains(&listen),
        "{v}"
    );
    assert!(
        !replica.exists(),
        "the replica was created before the bind failed"
    );
}

#[test]
fn an_image_truncated_mid_migration_is_a_clean_error_on_both_sides() {
    use std::io::Write;
    let certs = Certs::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("guest.img");
    {
        // 256 MiB of non-zero bytes: pages that must cross one by one on demand.
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0x5Au8; 1 << 20];
        for _ in 0..256 {
            f.write_all(&chunk).unwrap();
        }
    }
    // No push: pages move only as the destination's worker faults on them, slowly enough
    // that the truncation lands mid-migration.
    let dest = DestProcess::start(&certs, &["--size", "256M", "--pattern", "sequential"]);
    let image = path.display().to_string();
    let source = Background::source(
        &certs,
        "source",
        &dest.addr,
        &["--no-push", "--image", &image],
        &[],
    );
    std::thread::sleep(Duration::from_secs(1));
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let truncated = Instant::now();
    let out = source.wait(TIMEOUT);
    let source_took = truncated.elapsed();
    let dst = dest.wait(TIMEOUT);
    let dest_took = truncated.elapsed();

    // No SIGBUS: an exit code, one JSON object, the file named.
    let stderr = &out.stderr;
    assert!(out.status.code().is_some(), "killed by a signal: {stderr}");
    assert!(!out.status.success(), "{stderr}");
    let v = &out.json;
    assert!(v.is_object(), "one JSON object: {stderr}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("guest.img") && message.contains("shrank"),
        "{v}"
    );
    // What was done before the failure: the source sent pages, the destination holds some.
    assert!(v["done"]["bytes_sent"].as_u64().unwrap() > 1 << 20, "{v}");
    // The destination is told at once, with the reason.
    assert!(!dst.status.success());
    assert!(dst.stderr.contains("shrank"), "{}", dst.stderr);
    let done = &dst.json["done"];
    let present = done["pages_present"].as_u64().unwrap();
    assert!(present > 0 && present < 65536, "{}", dst.json);
    assert_eq!(done["pages"], 65536, "{}", dst.json);
    assert!(
        done["bytes_received"].as_u64().unwrap() > present * 4096,
        "{}",
        dst.json
    );
    assert!(
        source_took < Duration::from_secs(10),
        "source took {source_took:?}"
    );
    assert!(
        dest_took < Duration::from_secs(10),
        "destination took {dest_took:?}"
    );
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// A destination and a source in a session that never ends by itself (no push, no workload).
fn idle_session(certs: &Certs) -> (DestProcess, Reaped) {
    let dest = DestProcess::start(certs, &["--size", "16M", "--workers", "0"]);
    let source = Reaped::new(
        Command::new(faultline_bin())
            .args([
                "source",
                "--json",
                "--no-push",
                "--synthetic",
                "16M",
                "--connect",
                &dest.addr,
            ])
            .args(certs.args("source", "dest"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn faultline source"),
    );
    std::thread::sleep(Duration::from_secs(2));
    (dest, source)
}

#[test]
fn sigterm_and_sigint_end_the_session_with_a_reason_the_peer_reports_at_once() {
    let certs = Certs::new();

    // SIGTERM to the destination: the source hears why at once.
    let (dest, source) = idle_session(&certs);
    let sent = Instant::now();
    signal(dest.pid(), "-TERM");
    let out = source.into_inner().wait_with_output().unwrap();
    let took = sent.elapsed();
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    // The guest ran at the destination (a migration without VM state is handed over with
    // its Hello) and lacked pages: stopping either side loses the VM, said first, with why.
    assert_eq!(v["error"]["kind"], "vm_lost", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("the destination was stopped by SIGTERM"),
        "{v}"
    );
    assert!(
        took < Duration::from_secs(5),
        "the source heard after {took:?}"
    );
    let dst = dest.wait(TIMEOUT);
    assert_eq!(dst.json["error"]["kind"], "vm_lost", "{}", dst.json);
    assert!(
        dst.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("stopped by SIGTERM"),
        "{}",
        dst.json
    );
    assert_eq!(dst.status.code(), Some(9));

    // SIGINT to the source: the destination hears why at once.
    let (dest, source) = idle_session(&certs);
    let sent = Instant::now();
    signal(source.id(), "-INT");
    let dst = dest.wait(TIMEOUT);
    let took = sent.elapsed();
    assert_eq!(dst.json["error"]["kind"], "vm_lost", "{}", dst.json);
    assert!(
        dst.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("the source was stopped by SIGINT"),
        "{}",
        dst.json
    );
    assert!(
        took < Duration::from_secs(5),
        "the destination heard after {took:?}"
    );
    let out = source.into_inner().wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(9));
}

#[test]
fn a_vm_destination_survives_junk_replayed_and_unpinned_peers_then_migrates_a_running_guest() {
    if !faultline_tests::kvm_present() {
        return;
    }
    let certs = Certs::new();
    let guest = [
        "--size",
        "64M",
        "--vcpus",
        "1",
        "--program",
        "counter",
        "--run-secs",
        "1",
    ];
    let dest = DestProcess::vm(&certs, &guest);
    attack_listener(&certs, &dest.addr);
    let src = faultline_tests::run_vm_source(&certs, &dest.addr, &guest, TIMEOUT);
    let dst = dest.wait(TIMEOUT);
    assert!(src.status.success(), "source failed: {}", src.stderr);
    assert!(dst.status.success(), "destination failed: {}", dst.stderr);
    assert!(src.json["memory_digest"].is_string(), "{}", src.json);
    assert_eq!(
        dst.json["switchover_digest"], src.json["memory_digest"],
        "all guest memory at switchover"
    );
}
