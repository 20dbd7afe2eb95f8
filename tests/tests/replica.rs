//! End-to-end standby replication and evacuation between real `faultline` processes: a
//! source guest that keeps writing while it is replicated with real dirty tracking over real
//! QUIC, then evacuated into the standby's replica. Every test compares the digest of all
//! guest memory at the destination with the source's at switchover.

use std::time::Duration;

use faultline_tests::{assert_evacuated, free_udp_port, Background, Certs, DestProcess, ShmDir};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(180);
const SIZE: &str = "64M";
const PAGES: u64 = 16384;
const SIZE_BYTES: u64 = PAGES * 4096;

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// A standby (`standby_args` after its size) and `faultline replicate` of the built-in
/// guest (`replicate_args` after its size) until the evacuation ends; both reports, with
/// memory checked equal.
fn replicate_and_evacuate(standby_args: &[&str], replicate_args: &[&str]) -> (Value, Value) {
    let certs = Certs::new();
    let standby = DestProcess::standby(
        &certs,
        "127.0.0.1:0",
        &[&["--size", SIZE][..], standby_args].concat(),
    );
    let src = Background::replicate(
        &certs,
        &standby.addr,
        &[&["--synthetic", SIZE][..], replicate_args].concat(),
    )
    .wait(TIMEOUT);
    let dst = standby.wait(TIMEOUT);
    assert_evacuated(&src, &dst)
}

#[test]
fn evacuation_into_a_memory_replica_moves_only_stale_pages() {
    let dir = ShmDir::new("mem");
    let (s, d) = replicate_and_evacuate(
        &["--replica-dir", &dir.arg()],
        &[
            "--evacuate-after",
            "1.5",
            "--stale-pct",
            "10",
            "--writers",
            "1",
        ],
    );

    // The guest kept writing during replication, tracked by userfaultfd write-protection.
    assert_eq!(s["replication"]["tracker"], "uffd-wp-async", "{s}");
    assert!(u(&s["writers"]["writes"]) > 0, "{s}");
    assert!(u(&s["replication"]["pages_acked"]) >= PAGES, "{s}");
    // Exactly the 10% written after replication caught up are stale; the rest is local.
    let stale = (PAGES as f64 * 0.10).round() as u64;
    assert_eq!(u(&s["evacuation"]["pages_stale"]), stale, "{s}");
    assert!(u(&s["evacuation"]["path"]["sent_packets"]) > 0, "{s}");
    assert_eq!(u(&d["pages_stale"]), stale, "{d}");
    assert_eq!(u(&d["pages_from_replica"]), PAGES - stale, "{d}");
    // Only stale pages crossed: pushed or served on demand, nothing else. A page can cross
    // twice when a fault's request passes the push of the same page on the wire. The
    // slack over their bytes is QUIC's: headers, acknowledgements and retransmissions of
    // 64 KiB datagrams on a loopback shared by both processes and the test (5.8 to 8.1 MB
    // for these 6.7 MB of pages across runs; in one, the source's QUIC sent 7.48 MB for
    // 6.56 MB of payload and the destination counted the same bytes both ways). Non-stale
    // pages crossing in bulk would add far more: the other 90% are 60 MB.
    let m = &d["metrics"];
    assert_eq!(u(&m["pages_pushed"]) + u(&m["pages_faulted"]), stale, "{d}");
    let most = (stale + u(&m["faults"])) * 4096 * 130 / 100 + (256 << 10);
    assert!(u(&d["wire_bytes"]) < most, "{d}");
    assert!(d["vulnerability_ms"].as_f64().unwrap() > 0.0);
}

/// Stale pages whose content the replica already holds elsewhere (copied from other pages,
/// as page migration in a guest does) cross as references to those pages, verified by the
/// standby; memory ends equal.
#[test]
fn moved_pages_cross_as_references_into_the_replica() {
    let dir = ShmDir::new("moved");
    // No workload on the standby: its demand faults would be served as raw replies (never
    // encoded), and how many there are before the push gets there depends on the load.
    let (s, d) = replicate_and_evacuate(
        &["--replica-dir", &dir.arg(), "--workers", "0"],
        &[
            "--evacuate-after",
            "1",
            "--stale-pct",
            "0",
            "--stale-moved-pct",
            "10",
            "--writers",
            "1",
            "--encoding",
            "dedup",
            // The early push sends no references; on loopback it would carry most of this
            // small stale set before the references are negotiated.
            "--no-early-push",
        ],
    );
    let e = &s["evacuation"];
    let enc = &e["encoding"];
    let moved = (PAGES as f64 * 0.10).round() as u64;
    eprintln!(
        "index {} contents in {} ms; encoding {enc}; {} wire bytes",
        e["replica_index_contents"], e["replica_index_ms"], d["wire_bytes"]
    );
    assert_eq!(u(&e["pages_stale"]), moved, "{s}");
    assert!(u(&e["replica_index_contents"]) > PAGES / 2, "{e}");
    // A quarter of the image is zero pages (copies of those cross as zero flags); the
    // other copies name the page they came from, unless a duplicate's index entry or an
    // earlier push of the same content is named instead.
    let refs = u(&enc["ref_replica_pages"]);
    assert!(
        refs > moved / 2,
        "only {refs} of {moved} moved pages referenced the replica: {enc}"
    );
    assert!(u(&enc["ref_pages"]) >= refs);
    // Each reference is 25 bytes instead of 4 KiB.
    assert!(
        u(&d["wire_bytes"]) < moved * 4096 / 2,
        "{} wire bytes for {moved} stale pages",
        d["wire_bytes"]
    );
}

/// Waits (up to a minute) until the memory replica in `dir` holds `frac` of the guest:
/// its image is sparse on tmpfs, so allocated blocks are stored pages.
fn wait_replicated(dir: &ShmDir, frac: f64) {
    faultline_tests::wait_replicated(dir, PAGES, frac)
}

#[test]
fn standby_restarted_before_evacuation_keeps_its_replica() {
    let certs = Certs::new();
    let dir = ShmDir::new("restart");
    let port = free_udp_port();
    let listen = format!("127.0.0.1:{port}");
    let args = ["--size", SIZE, "--replica-dir", &dir.arg()];
    let first = DestProcess::standby(&certs, &listen, &args);
    let src = Background::replicate(
        &certs,
        &first.addr,
        &[
            "--synthetic",
            SIZE,
            "--evacuate-after",
            "4",
            "--stale-pct",
            "5",
            "--write-rate",
            "5000",
        ],
    );
    // Let replication fill the replica, then crash the standby and start it again.
    wait_replicated(&dir, 0.9);
    first.kill();
    let second = DestProcess::standby(&certs, &listen, &args);
    let src = src.wait(TIMEOUT);
    let dst = second.wait(TIMEOUT);
    let (s, d) = assert_evacuated(&src, &dst);
    let r = &s["replication"];
    assert!(u(&r["connections"]) >= 2, "the replicator reconnected: {s}");
    // Its session paused and resumed into the restarted standby, which took the Hello of
    // a session it did not know as a new replication session.
    assert_eq!(u(&r["sessions"]), 1, "{r}");
    assert!(u(&r["pauses"]) >= 1, "{r}");
    assert_eq!(u(&d["replication_sessions"]), 1, "{d}");
    // The restarted standby found most pages still valid and served them locally.
    assert!(u(&d["replica_valid_pages"]) > PAGES / 2, "{d}");
    let stale = (PAGES as f64 * 0.05).round() as u64;
    assert_eq!(u(&d["pages_stale"]), stale, "{d}");
    assert_eq!(u(&d["pages_from_replica"]), PAGES - stale);
}

#[test]
fn torn_replica_page_is_detected_and_never_served() {
    let certs = Certs::new();
    let dir = ShmDir::new("torn");
    let port = free_udp_port();
    let listen = format!("127.0.0.1:{port}");
    let args = ["--size", SIZE, "--replica-dir", &dir.arg()];
    let first = DestProcess::standby(&certs, &listen, &args);
    let src = Background::replicate(
        &certs,
        &first.addr,
        &[
            "--synthetic",
            SIZE,
            "--evacuate-after",
            "4",
            "--write-rate",
            "1000",
            "--hot-pct",
            "1",
        ],
    );
    // Replication goes in address order: at 90% page 9000 (55%) is stored.
    wait_replicated(&dir, 0.9);
    first.kill();
    // A crash in the middle of a write: part of page 9000's bytes changed in the replica
    // file while its index entry still describes the old content.
    let img = dir.0.join("memory.img");
    let mut bytes = std::fs::read(&img).expect("replica image");
    let at = 9000 * 4096 + 100;
    for b in &mut bytes[at..at + 64] {
        *b ^= 0xA5;
    }
    std::fs::write(&img, &bytes).unwrap();
    drop(bytes);
    let second = DestProcess::standby(&certs, &listen, &args);
    let src = src.wait(TIMEOUT);
    let dst = second.wait(TIMEOUT);
    // Equal digests prove the torn content was not served: it was fetched again.
    let (_, d) = assert_evacuated(&src, &dst);
    // Page 9000, and in a rare case a page the kill itself tore between data and index.
    assert!(u(&d["torn_pages_at_open"]) >= 1, "{d}");
}

#[test]
fn evacuation_from_a_disk_replica_prefetches_fresh_pages() {
    let dir = tempfile::tempdir().unwrap();
    let (_, d) = replicate_and_evacuate(
        &[
            "--tier",
            "disk",
            "--replica-dir",
            dir.path().to_str().unwrap(),
        ],
        &["--evacuate-after", "1.5", "--stale-pct", "5"],
    );
    assert_eq!(d["tier"], "disk");
    let stale = (PAGES as f64 * 0.05).round() as u64;
    assert_eq!(u(&d["pages_stale"]), stale, "{d}");
    // Every fresh page was installed from the disk replica (prefetch or local fault).
    assert_eq!(u(&d["pages_from_replica"]), PAGES - stale, "{d}");
}

#[test]
fn demo_with_a_replica_prints_one_json_report() {
    // Evacuated through an emulated WAN: only the evacuation crosses it.
    let v = faultline_tests::demo_json(&[
        "--replica",
        "--stale-pct",
        "10",
        "--size",
        SIZE,
        "--replicate-secs",
        "1.5",
        "--wan-rtt",
        "10ms",
        "--wan-rate",
        "200M",
    ]);
    assert_eq!(v["digest_match"], true, "{v}");
    assert_eq!(
        u(&v["pages_stale"]),
        (PAGES as f64 * 0.10).round() as u64,
        "{v}"
    );
    assert_eq!(v["link"]["rate_bps"], 200_000_000, "{v}");
    assert_eq!(v["expected_bdp_bytes"], 250_000, "{v}");
    // The stale pages (and the disk's) crossed the link, not the first copy of memory,
    // which replication sent the direct way.
    let crossed = u(&v["wan_counters"]["client_to_server"]["bytes"]);
    assert!(crossed > 1 << 20 && crossed < SIZE_BYTES / 2, "{v}");
    assert!(u(&v["replication_pages_sent"]) >= PAGES, "{v}");
    let util = v["link_utilization"].as_f64().unwrap();
    assert!(util > 0.0 && util <= 1.05, "{v}");
    for key in [
        "pages_from_replica",
        "vulnerability_ms",
        "wire_bytes",
        "total_ms",
    ] {
        assert!(v[key].is_number(), "{key} missing in {v}");
    }
    // The guest's disk (64 MiB by default) moved with it: exactly the 5% written after
    // replication caught up crossed, and the digests match.
    let d = &v["disk"];
    assert_eq!(d["digest_match"], true, "{v}");
    assert_eq!(u(&d["blocks_stale"]), 819, "{v}");
    assert_eq!(u(&d["blocks_from_replica"]), 16384 - 819, "{v}");
}
