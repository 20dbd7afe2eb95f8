//! End-to-end postcopy migrations between two real `faultline` processes over QUIC on
//! loopback, into userfaultfd-registered memory. Every test compares the digest of all
//! guest memory on both sides.

use std::time::Duration;

use faultline_tests::{assert_migrated, run_source, Certs, DestProcess};

const TIMEOUT: Duration = Duration::from_secs(180);

fn pages_of(v: &serde_json::Value) -> u64 {
    v["pages"].as_u64().expect("pages")
}

#[test]
fn several_threads_faulting_on_the_same_page_make_one_request() {
    let certs = Certs::new();
    // No push: every page moves because a thread faulted on it. Eight threads walk the
    // same page order in step, so they fault on the same page at once.
    let dest = DestProcess::start(
        &certs,
        &["--size", "64M", "--workers", "8", "--pattern", "same-pages"],
    );
    let src = run_source(
        &certs,
        "source",
        &dest.addr,
        &["--synthetic", "64M", "--no-push"],
        TIMEOUT,
    );
    let dst = dest.wait(TIMEOUT);
    let r = assert_migrated(&src, &dst);
    let pages = pages_of(&r);
    let m = &r["metrics"];
    assert_eq!(m["pages_faulted"].as_u64(), Some(pages), "{r}");
    assert!(
        m["faults"].as_u64().unwrap() > pages,
        "threads in step should fault together on pages: {r}"
    );
    assert_eq!(
        src.json["pages_served"].as_u64(),
        Some(pages),
        "one request per page however many threads faulted on it"
    );
    assert_eq!(m["fault_latency_us"]["count"], m["faults"]);
}

#[test]
fn threads_faulting_on_different_pages_at_once() {
    let certs = Certs::new();
    let dest = DestProcess::start(
        &certs,
        &["--size", "64M", "--workers", "8", "--pattern", "spread"],
    );
    let src = run_source(
        &certs,
        "source",
        &dest.addr,
        &["--synthetic", "64M", "--no-push", "--seed", "3"],
        TIMEOUT,
    );
    let dst = dest.wait(TIMEOUT);
    let r = assert_migrated(&src, &dst);
    let pages = pages_of(&r);
    assert_eq!(r["metrics"]["pages_faulted"].as_u64(), Some(pages), "{r}");
    assert_eq!(src.json["pages_served"].as_u64(), Some(pages));
    assert!(
        src.json["path"]["sent_packets"].as_u64() > Some(0),
        "{}",
        src.json
    );
    assert!(r["metrics"]["blocked_ns"].as_u64().unwrap() > 0);
}

#[test]
fn push_and_demand_faults_race_for_the_same_pages() {
    let certs = Certs::new();
    // The push runs in address order; so do these threads, from staggered offsets, so
    // demand requests and pushed data for the same page cross on the wire.
    let dest = DestProcess::start(
        &certs,
        &[
            "--size",
            "128M",
            "--workers",
            "4",
            "--pattern",
            "sequential",
        ],
    );
    let src = run_source(
        &certs,
        "source",
        &dest.addr,
        &["--synthetic", "128M", "--seed", "5"],
        TIMEOUT,
    );
    let dst = dest.wait(TIMEOUT);
    let r = assert_migrated(&src, &dst);
    let m = &r["metrics"];
    let (pushed, faulted) = (
        m["pages_pushed"].as_u64().unwrap(),
        m["pages_faulted"].as_u64().unwrap(),
    );
    assert_eq!(
        pushed + faulted,
        pages_of(&r),
        "every page installed exactly once: {r}"
    );
    assert!(m["faults"].as_u64().unwrap() > 0, "{r}");
    assert!(pushed > 0, "{r}");
    // The source's encoding report counts every page it sent, pushed, served on demand or
    // sent again for an echoed request, by kind (read from its encoders once the session
    // ended). Echoes are rare here: loopback under load can look like a 1 ms path.
    let s = &src.json;
    let e = &s["encoding"];
    let by_kind: u64 = ["raw_pages", "zero_pages", "lz4_pages", "ref_pages"]
        .iter()
        .map(|k| e[k].as_u64().unwrap_or_else(|| panic!("{k} missing: {e}")))
        .sum();
    let sent = ["pages_pushed", "pages_served", "pages_echoed"]
        .iter()
        .map(|k| s[k].as_u64().unwrap_or_else(|| panic!("{k} missing: {s}")))
        .sum::<u64>();
    assert_eq!(by_kind, sent, "{s}");
}

#[test]
fn raw_memory_image_file_as_the_source() {
    let certs = Certs::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("guest-ram.img");
    // A RAM dump of sorts: zero pages, repeated pages and unique pages.
    let pages = 16384usize;
    let mut img = vec![0u8; pages * 4096];
    for (i, page) in img.chunks_mut(4096).enumerate() {
        match i % 5 {
            0 => {}
            1 => page.fill(0x5a),
            _ => {
                for (j, b) in page.iter_mut().enumerate() {
                    *b = (i.wrapping_mul(31) ^ j.wrapping_mul(7)) as u8;
                }
            }
        }
    }
    std::fs::write(&path, &img).unwrap();
    let expected = vmm_shim::digest::digest(&img);

    let dest = DestProcess::start(&certs, &["--size", "64M", "--workers", "2"]);
    let src = run_source(
        &certs,
        "source",
        &dest.addr,
        &["--image", path.to_str().unwrap()],
        TIMEOUT,
    );
    let dst = dest.wait(TIMEOUT);
    let r = assert_migrated(&src, &dst);
    assert_eq!(
        r["digest"].as_str(),
        Some(expected.as_str()),
        "destination differs from the file"
    );
    assert_eq!(
        r["metrics"]["pages_zero"].as_u64(),
        Some(pages.div_ceil(5) as u64)
    );
}

#[test]
fn memfd_backed_destination_memory() {
    let certs = Certs::new();
    let dest = DestProcess::start(&certs, &["--size", "128M", "--memfd", "--workers", "2"]);
    let src = run_source(
        &certs,
        "source",
        &dest.addr,
        &["--synthetic", "128M", "--seed", "9"],
        TIMEOUT,
    );
    let dst = dest.wait(TIMEOUT);
    let r = assert_migrated(&src, &dst);
    assert_eq!(r["memory"], "memfd");
    let m = &r["metrics"];
    assert_eq!(
        m["pages_pushed"].as_u64().unwrap() + m["pages_faulted"].as_u64().unwrap(),
        pages_of(&r)
    );
    assert!(
        m["pages_zero"].as_u64().unwrap() > 0,
        "zero pages on shmem go through COPY: {r}"
    );
}

#[test]
fn demo_prints_one_json_report_with_matching_digests() {
    let v = faultline_tests::demo_json(&["--size", "64M"]);
    assert_eq!(v["digest_match"], true);
    for key in [
        "memory_bytes",
        "pages",
        "total_ms",
        "resume_ms",
        "faults",
        "wire_bytes",
        "pages_pushed",
        "pages_faulted",
        "pages_zero",
    ] {
        assert!(v[key].is_number(), "{key} missing in {v}");
    }
    for key in ["p50", "p99", "max"] {
        assert!(
            v["fault_latency_us"][key].is_number(),
            "fault_latency_us.{key} missing"
        );
    }
    assert_eq!(v["memory_bytes"], 64 << 20);
}
