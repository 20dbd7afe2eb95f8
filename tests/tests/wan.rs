//! End-to-end migrations between real `faultline dest` and `faultline source` processes
//! through the user-space WAN emulator (`wan-emu` crate): delay, jitter, loss, a bandwidth
//! limit and a link cut in the middle of postcopy. The source connects to an in-test
//! emulator whose upstream is the destination's listener, so every datagram of the session
//! crosses the emulated link. Every test compares the digest of all guest memory on both
//! sides and checks, from the emulator's counters, that the link really carried the
//! session.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use faultline_tests::{
    assert_migrated, run_source, Background, Certs, DestProcess, Finished, ShmDir,
};
use serde_json::Value;
use wan_emu::{LinkConfig, WanCounters, WanEmulator};

const TIMEOUT: Duration = Duration::from_secs(60);
const SIZE: &str = "64M";

/// One migration through the emulator.
struct Run {
    src: Finished,
    dst: Finished,
    counters: WanCounters,
    /// From starting the source process until it exited.
    elapsed: Duration,
}

/// Migrates a 64 MiB synthetic image (seed `seed`) from a source process to a destination
/// process with two workload threads, through an emulator with `link`. `during` runs on
/// its own thread while the migration is under way, with the emulator (to cut it).
fn migrate(link: LinkConfig, seed: u64, during: impl FnOnce(&WanEmulator) + Send) -> Run {
    let certs = Certs::new();
    let dest = DestProcess::start(&certs, &["--size", SIZE, "--workers", "2"]);
    let upstream: SocketAddr = dest.addr.parse().expect("destination address");
    let wan = WanEmulator::start("127.0.0.1:0".parse().unwrap(), upstream, link).unwrap();
    let relay = wan.local_addr().to_string();
    let seed = seed.to_string();
    let started = Instant::now();
    let (src, elapsed) = std::thread::scope(|s| {
        s.spawn(|| during(&wan));
        let src = run_source(
            &certs,
            "source",
            &relay,
            &["--synthetic", SIZE, "--seed", &seed],
            TIMEOUT,
        );
        (src, started.elapsed())
    });
    let dst = dest.wait(TIMEOUT);
    let counters = wan.counters();
    wan.shutdown();
    Run {
        src,
        dst,
        counters,
        elapsed,
    }
}

/// Digests equal, every page installed once, and the emulator carried the session: one
/// client, datagrams both ways, and at least 90% of the UDP bytes the destination's QUIC
/// stack counted (the rest is the loss and the last packets after its count).
fn assert_carried(run: &Run) -> Value {
    assert!(
        run.src.status.success() && run.dst.status.success(),
        "source {}: {}\ndestination {}: {}\nlink: {:?}",
        run.src.status,
        run.src.stderr,
        run.dst.status,
        run.dst.stderr,
        run.counters
    );
    let r = assert_migrated(&run.src, &run.dst);
    let m = &r["metrics"];
    assert_eq!(
        m["pages_pushed"].as_u64().unwrap() + m["pages_faulted"].as_u64().unwrap(),
        r["pages"].as_u64().unwrap(),
        "every page installed exactly once: {r}"
    );
    let c = &run.counters;
    assert_eq!(c.clients, 1, "one source flow: {c:?}");
    assert!(
        c.client_to_server.packets > 1000 && c.server_to_client.packets > 10,
        "{c:?}"
    );
    let relayed = c.client_to_server.bytes + c.server_to_client.bytes;
    let wire = r["wire_bytes"].as_u64().unwrap();
    assert!(
        relayed as f64 >= 0.9 * wire as f64,
        "the emulator relayed {relayed} B but the destination counted {wire} B: {c:?}"
    );
    r
}

fn rtt_ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

#[test]
fn migrates_over_20ms_rtt() {
    let run = migrate(LinkConfig::delayed(rtt_ms(20) / 2), 11, |_| {});
    let r = assert_carried(&run);
    // Demand faults happened (below), each a round trip; the closing exchange is a round
    // trip of its own after every page is present.
    let (total, closed) = (
        r["total_ms"].as_f64().unwrap(),
        r["closed_ms"].as_f64().unwrap(),
    );
    assert!(
        total >= 20.0,
        "every page present in under a round trip: {r}"
    );
    assert!(
        closed >= total + 19.0,
        "the session closed less than a round trip after every page was present: {r}"
    );
    let up = &run.counters.client_to_server;
    assert_eq!(
        up.dropped_loss + up.dropped_queue + up.dropped_cut,
        0,
        "{up:?}"
    );
    assert!(r["metrics"]["faults"].as_u64().unwrap() > 0, "{r}");
}

#[test]
fn migrates_over_20ms_rtt_with_5ms_jitter() {
    let link = LinkConfig::delayed(rtt_ms(20) / 2).with_jitter(rtt_ms(5));
    let run = migrate(link, 12, |_| {});
    let r = assert_carried(&run);
    assert!(r["total_ms"].as_f64().unwrap() >= 30.0, "{r}");
}

#[test]
fn migrates_with_one_percent_loss() {
    let link = LinkConfig::delayed(rtt_ms(10) / 2).with_loss(0.01, 0xFA17);
    let run = migrate(link, 13, |_| {});
    assert_carried(&run);
    let (up, down) = (
        &run.counters.client_to_server,
        &run.counters.server_to_client,
    );
    // About 1% of tens of thousands of datagrams; the exact set depends only on the seed.
    assert!(up.dropped_loss > 50, "the link lost nothing: {up:?}");
    let offered = up.packets + up.dropped_loss;
    let rate = up.dropped_loss as f64 / offered as f64;
    assert!((0.005..0.02).contains(&rate), "loss rate {rate}: {up:?}");
    assert_eq!(up.dropped_queue + down.dropped_queue, 0);
    // The path is long and lossy: faults' requests were echoed and the source, seeing
    // the loss, answered them a second time (the copies were dropped, not installed
    // twice: assert_carried counted every page once).
    let echoed = run.src.json["pages_echoed"].as_u64().unwrap();
    let served = run.src.json["pages_served"].as_u64().unwrap();
    assert!(
        echoed > 0 && echoed <= served + 64,
        "{echoed} echoed, {served} served"
    );
}

#[test]
fn a_bandwidth_limit_bounds_the_migration_time() {
    const RATE: u64 = 200_000_000;
    let run = migrate(LinkConfig::new(rtt_ms(10), RATE), 14, |_| {});
    let r = assert_carried(&run);
    let up = &run.counters.client_to_server;
    // The destination's session starts after the QUIC handshake, so allow those bytes.
    let floor_s = up.bytes.saturating_sub(64 << 10) as f64 * 8.0 / RATE as f64;
    let total_s = r["total_ms"].as_f64().unwrap() / 1e3;
    assert!(
        total_s >= floor_s,
        "{} B through {RATE} bit/s need {floor_s:.3} s, the session took {total_s:.3} s",
        up.bytes
    );
    assert!(
        run.elapsed.as_secs_f64() >= floor_s,
        "{:?} < {floor_s}",
        run.elapsed
    );
    assert!(floor_s > 0.3, "the limit was not exercised: {up:?}");
}

#[test]
fn a_one_second_cut_in_mid_postcopy_pauses_the_session() {
    const RATE: u64 = 200_000_000;
    let link = LinkConfig::new(rtt_ms(20), RATE);
    let cut_at = std::sync::Mutex::new(None::<(u64, Instant, Instant)>);
    let run = migrate(link, 15, |wan| {
        // Cut once the push is well under way: after 8 MB crossed (a 64 MiB image sends
        // 25-50 MB), hold it for a second, then restore.
        let deadline = Instant::now() + TIMEOUT;
        while wan.counters().client_to_server.bytes < 8_000_000 {
            if Instant::now() > deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let at = wan.counters().client_to_server.bytes;
        let cut = Instant::now();
        wan.cut();
        std::thread::sleep(Duration::from_secs(1));
        wan.restore();
        *cut_at.lock().unwrap() = Some((at, cut, Instant::now()));
    });
    let (at, cut, restored) = cut_at
        .into_inner()
        .unwrap()
        .expect("the migration ended before the cut");
    // The session survives the cut: both sides notice the silence (`SILENCE_LOST`), pause,
    // and resume on a new connection once the link is back (docs/recovery.md); the
    // migration completes with every page intact.
    let r = assert_carried(&run);
    let c = &run.counters;
    assert!(
        c.client_to_server.dropped_cut + c.server_to_client.dropped_cut > 0,
        "nothing was in flight during the cut: {c:?}"
    );
    assert!(
        at < c.client_to_server.bytes / 2,
        "cut after {at} of {} B: not mid-postcopy",
        c.client_to_server.bytes
    );
    assert!(
        restored.duration_since(cut) >= Duration::from_secs(1),
        "the cut lasted {:?}",
        restored.duration_since(cut)
    );
    let total_ms = r["total_ms"].as_f64().unwrap();
    assert!(total_ms >= 1000.0, "the session cannot outrun the cut: {r}");
    eprintln!(
        "cut at {at} B for {:?}; session {total_ms:.0} ms, dropped while cut {} + {} datagrams",
        restored.duration_since(cut),
        c.client_to_server.dropped_cut,
        c.server_to_client.dropped_cut
    );
}

#[test]
fn demo_through_an_emulated_wan_reports_the_link() {
    let v = faultline_tests::demo_json(&[
        "--size",
        SIZE,
        "--wan-rtt",
        "20ms",
        "--wan-rate",
        "200M",
        "--wan-jitter",
        "1ms",
        "--wan-loss",
        "0.1%",
    ]);
    assert_eq!(v["digest_match"], true, "{v}");
    let link = &v["link"];
    assert_eq!(link["rtt_ms"], 20.0, "{v}");
    assert_eq!(link["jitter_us"], 1000);
    assert_eq!(link["rate_bps"], 200_000_000);
    assert_eq!(link["loss"], 0.001);
    // Windows sized for the link: 200 Mbit/s × (20 ms + 2 × 1 ms of jitter).
    assert_eq!(v["expected_bdp_bytes"], 550_000, "{v}");
    let up = &v["wan_counters"]["client_to_server"];
    assert!(up["bytes"].as_u64().unwrap() > 10 << 20, "{v}");
    let util = v["link_utilization"].as_f64().unwrap();
    assert!(util > 0.0 && util <= 1.05, "{v}");
}

/// The evacuation runs over 40 ms × 100 Mbit/s with the default encoding (`auto`): it pushes
/// beside the handshake, and compresses from its first batch on (a link too slow for raw
/// pages to pay, whose cost the push cannot know before it measured it).
#[test]
fn an_evacuation_over_40ms_rtt_pushes_beside_the_handshake() {
    let certs = Certs::new();
    let dir = ShmDir::new("wan-evac");
    let standby = DestProcess::standby(
        &certs,
        "127.0.0.1:0",
        &["--size", SIZE, "--replica-dir", &dir.arg()],
    );
    let upstream: SocketAddr = standby.addr.parse().expect("standby address");
    let wan = WanEmulator::start(
        "127.0.0.1:0".parse().unwrap(),
        upstream,
        LinkConfig::delayed(rtt_ms(40) / 2).with_rate(100_000_000),
    )
    .unwrap();
    // Replication goes the direct way; only the evacuation crosses the emulated link.
    let relay = wan.local_addr().to_string();
    let src = Background::replicate(
        &certs,
        &standby.addr,
        &[
            "--synthetic",
            SIZE,
            "--evacuate-after",
            "1",
            "--stale-pct",
            "10",
            "--writers",
            "1",
            "--evacuate-connect",
            &relay,
        ],
    )
    .wait(TIMEOUT);
    let dst = standby.wait(TIMEOUT);
    let counters = wan.counters();
    wan.shutdown();
    assert!(src.status.success(), "replicate failed: {}", src.stderr);
    assert!(dst.status.success(), "standby failed: {}", dst.stderr);
    let (s, d) = (&src.json, &dst.json);
    assert_eq!(
        s["digest"], d["digest"],
        "memory differs after the evacuation"
    );
    let stale = d["pages_stale"].as_u64().unwrap();
    assert!(stale > 0, "{d}");
    // The source pushed beside the handshake (it had a round trip to do so), only pages
    // it knew were stale; the standby read them ahead while it prepared, and installed
    // none of them twice.
    let pushed_early = s["evacuation"]["pages_pushed_early"].as_u64().unwrap();
    assert!(pushed_early > 0, "nothing pushed before the answer: {s}");
    assert!(pushed_early <= stale, "{s}");
    let early = d["early_push_bytes"].as_u64().unwrap();
    assert!(early > 0, "nothing read before the session ran: {d}");
    assert!(early <= (stale * 4200).max(1 << 20), "{early} B early: {d}");
    let m = &d["metrics"];
    assert_eq!(
        m["pages_pushed"].as_u64().unwrap() + m["pages_faulted"].as_u64().unwrap(),
        stale,
        "{d}"
    );
    // lz4 on (nearly) every batch: none went raw while the link's cost was unmeasured (before,
    // the push's first writes into an empty send buffer looked free and turned lz4 off).
    let e = &s["evacuation"]["encoding"];
    let (lz4, batches) = (
        e["batches_lz4"].as_u64().unwrap(),
        e["batches"].as_u64().unwrap(),
    );
    assert!(batches > 0 && lz4 * 100 >= batches * 99, "{e}");
    assert!(
        // (a quarter: the early push is lz4 whatever the tuner would decide)
        counters.client_to_server.bytes >= stale * 4096 / 4,
        "the evacuation did not cross the emulator: {counters:?}"
    );
}
