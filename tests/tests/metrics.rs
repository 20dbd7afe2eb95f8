//! `--metrics-listen` on `faultline replicate` and `faultline standby`: both serve
//! Prometheus metrics over real HTTP while replication runs, with plausible values, survive
//! a client that sends garbage, and the evacuation still ends with equal memory.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use faultline_tests::http::{http, scrape};
use faultline_tests::{assert_evacuated, free_tcp_port, Background, Certs, DestProcess, ShmDir};

const SIZE: &str = "64M";
const BYTES: f64 = 64.0 * 1024.0 * 1024.0;

/// The value of the sample `name` with the label `vm="vm0"`.
fn value(text: &str, name: &str) -> f64 {
    let prefix = format!("{name}{{vm=\"vm0\"}} ");
    let line = text
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} in\n{text}"));
    line[prefix.len()..].parse().expect("a number")
}

/// Scrapes `addr` until `ok` holds of the text (at most 20 s).
fn scrape_until(addr: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = scrape(addr);
        if ok(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "never {what}:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn replicate_and_standby_serve_metrics_while_replicating() {
    let t0 = Instant::now();
    let certs = Certs::new();
    let dir = ShmDir::new("metrics");
    let standby_metrics = format!("127.0.0.1:{}", free_tcp_port());
    let source_metrics = format!("127.0.0.1:{}", free_tcp_port());
    let standby = DestProcess::standby(
        &certs,
        "127.0.0.1:0",
        &[
            "--size",
            SIZE,
            "--replica-dir",
            &dir.arg(),
            "--metrics-listen",
            &standby_metrics,
        ],
    );
    // Evacuation waits for SIGUSR1, sent once the metrics were checked.
    let src = Background::replicate(
        &certs,
        &standby.addr,
        &[
            "--synthetic",
            SIZE,
            "--evacuate-after",
            "60",
            "--writers",
            "1",
            "--metrics-listen",
            &source_metrics,
        ],
    );

    // The source: replication under way and acknowledged, still growing as the guest writes.
    let a = scrape_until(&source_metrics, "replicated and connected", |t| {
        value(t, "faultline_replicate_replicated_bytes_total") > 0.0
            && value(t, "faultline_replicate_connected") == 1.0
    });
    std::thread::sleep(Duration::from_millis(800));
    let b = scrape(&source_metrics);
    let replicated = |t: &str| value(t, "faultline_replicate_replicated_bytes_total");
    assert!(replicated(&b) > replicated(&a), "not growing:\n{a}\n{b}");
    for t in [&a, &b] {
        let stale = value(t, "faultline_replicate_stale_bytes");
        assert!((0.0..=BYTES).contains(&stale), "{t}");
        assert!(
            value(t, "faultline_replicate_predicted_evacuation_seconds") >= 0.0,
            "{t}"
        );
        assert_eq!(value(t, "faultline_replicate_evacuation_state"), 0.0, "{t}");
        assert_eq!(value(t, "faultline_replicate_pauses_total"), 0.0, "{t}");
        assert_eq!(
            value(t, "faultline_replicate_evacuation_sent_bytes_total"),
            0.0,
            "{t}"
        );
    }
    // The link carried the pages (zero pages cross as a flag, so it can be fewer bytes).
    let link = value(&b, "faultline_replicate_link_sent_bytes_total");
    assert!(link > 0.0, "{b}");
    assert!(
        value(&b, "faultline_replicate_sent_bytes_total") > 0.0,
        "{b}"
    );
    assert!(
        value(&b, "faultline_replicate_link_rate_bytes_per_second") > 0.0,
        "{b}"
    );
    assert!(
        b.contains("# TYPE faultline_replicate_replicated_bytes_total counter"),
        "{b}"
    );

    // The standby: the replica fills, what arrived is counted, the session is connected.
    let s = scrape_until(&standby_metrics, "holding pages", |t| {
        value(t, "faultline_standby_replica_pages") > 0.0
    });
    let held = value(&s, "faultline_standby_replica_pages");
    let invalid = value(&s, "faultline_standby_invalid_pages");
    assert_eq!(held + invalid, BYTES / 4096.0, "{s}");
    assert_eq!(
        value(&s, "faultline_standby_replica_bytes"),
        held * 4096.0,
        "{s}"
    );
    assert!(
        value(&s, "faultline_standby_received_bytes_total") >= held * 4096.0,
        "{s}"
    );
    assert_eq!(value(&s, "faultline_standby_connected"), 1.0, "{s}");
    assert_eq!(value(&s, "faultline_standby_pauses_total"), 0.0, "{s}");

    // Garbage and an unknown path: no crash, no metrics, and the next scrape still works.
    for addr in [&source_metrics, &standby_metrics] {
        let junk = http(
            addr,
            b"\x16\x03\x01\x02\x00\x01\xff\xfe\r\n\r\nnot http at all\r\n\r\n",
        );
        assert!(!junk.unwrap_or_default().contains("faultline_"));
        let other = http(
            addr,
            b"GET /other HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(other.unwrap().starts_with("HTTP/1.1 404"));
        let _ = TcpStream::connect(addr.as_str()).expect("still listening");
    }
    assert!(replicated(&scrape(&source_metrics)) >= replicated(&b));

    // The warning: evacuate now. Memory ends equal, as without metrics.
    // SAFETY: kill(2) with a pid this test spawned and a valid signal number.
    let rc = unsafe { libc::kill(src.pid() as libc::pid_t, libc::SIGUSR1) };
    assert_eq!(rc, 0);
    let src = src.wait(Duration::from_secs(60));
    let dst = standby.wait(Duration::from_secs(60));
    let (s, _) = assert_evacuated(&src, &dst);
    assert!(
        src.stderr.contains("metrics listening on http://"),
        "{}",
        src.stderr
    );
    assert!(s["replication"]["pages_acked"].as_u64().unwrap() > 0, "{s}");
    eprintln!("metrics test took {:?}", t0.elapsed());
}
