//! A link outage during a push (docs/recovery.md): how soon the session runs again after the
//! link is back, and how much it sends again, against what was in flight at the cut.
//!
//! Real processes on loopback, `faultline dest` (no guest workers: a push only) and
//! `faultline source` migrating a random image (nothing compresses, no zero page; encoding
//! off), with the [`wan_emu::WanEmulator`] in the bench process between them: 1 Gbit/s,
//! 20 ms RTT, both processes' QUIC windows sized for it. Once 30% of the image's bytes have
//! crossed, the bench cuts the link for 1 s, 10 s or 45 s, then restores it. Every round
//! checks that the digests of all guest memory are equal on both sides.
//!
//! Measured per round:
//! * `resume_ms_after_restore` from both processes' reports (docs/recovery.md: from the new
//!   connection being up to `Resumed`; 0 when the session never paused);
//! * `restore_to_connected_ms`, `restore_to_resumed_ms`: from the bench's `restore()` to the
//!   source's log lines `reconnected; resuming the session` and `the session runs again`
//!   (their timestamps, same wall clock; `null` when the session never paused);
//! * `restore_to_flowing_ms`: from the restore until 64 KiB more of source → destination
//!   bytes have been delivered by the emulator (more than a reconnection's handshake sends),
//!   whether or not the session paused;
//! * `handshake_ms`: a fresh, fully authenticated QUIC connection on the same link, measured
//!   in the same round: [`HANDSHAKE_SAMPLES`] times, a new client endpoint with the source's
//!   identity connects through an idle emulator of the same link to a listener with the
//!   destination's identity and the destination's acceptor (stateless Retry first, then
//!   with the address-validation token an earlier sample received, as the source's
//!   reconnection presents its first connection's); the median is the round's figure;
//! * `in_flight_at_cut_wire_bytes`: the emulator's `cut_in_flight_bytes` for source →
//!   destination: UDP payload the source had handed to the link that the destination had not
//!   received when the link was cut (inside the emulated link, or in the relay's socket), and
//!   that the cut dropped. `in_flight_at_cut_bytes` converts it to page bytes by this run's
//!   own wire cost per page byte (UDP bytes delivered to the destination / page bytes they
//!   carried), the unit `bytes_resent` is counted in;
//! * `bytes_resent` (source's report: page bytes sent on a later connection after they had
//!   been sent on a lost one) and the destination's (duplicates dropped on arrival).
//!
//! Targets (from the issue): `resume_ms_after_restore` ≤ 3 RTT + the handshake, and
//! `bytes_resent` / bytes in flight at the cut ≤ 1.5. One summary line per outage gives the
//! median and p99 (nearest rank: with 3 rounds, the largest) of each figure, the ratios, and
//! whether every round met each target; `restore_to_flowing_ms` is held to the same bound as
//! `resume_ms_after_restore`.
//!
//! Environment: `FAULTLINE_BENCH_BYTES` (1G), `FAULTLINE_BENCH_OUTAGES` (seconds,
//! comma-separated, `1,10,45`), `FAULTLINE_BENCH_ROUNDS` (3: rounds of outages under 30 s),
//! `FAULTLINE_BENCH_LONG_ROUNDS` (1: rounds of outages of 30 s or more),
//! `FAULTLINE_BENCH_CUT_AT` (0.3: the fraction of the image's bytes that crossed before the
//! cut), `FAULTLINE_BENCH_DIR` (`/var/tmp`: where the image is written). Rounds are
//! interleaved (1 s, 10 s, 45 s, 1 s, 10 s, ...), so drift in the machine's load spreads
//! over the cases. The defaults take about 3 minutes.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use faultline_benches::e2e::{
    check, check_digests, log_time, set_expected_bdp, write_random_image,
};
use faultline_benches::stats::{median, nearest_rank};
use faultline_benches::{emit, env_size, runtime};
use faultline_tests::{run_source, Certs, DestProcess};
use serde_json::{json, Value};
use transport::quic::accept::{AcceptLimits, Acceptor};
use transport::quic::{client_endpoint, connect, server_endpoint};
use wan_emu::{DirectionCounters, LinkConfig, WanEmulator};

const BENCH: &str = "recovery";
const RATE_BPS: u64 = 1_000_000_000;
const RTT: Duration = Duration::from_millis(20);
const TIMEOUT: Duration = Duration::from_secs(600);
/// Target: the session runs again at most this many RTTs plus a handshake after the restore.
const TARGET_RESUME_RTTS: f64 = 3.0;
/// Target: `bytes_resent` / bytes in flight at the cut.
const TARGET_RESENT_OVER_IN_FLIGHT: f64 = 1.5;
/// Source → destination bytes delivered after the restore that mean page data flows again:
/// a reconnection's handshake (two Initials, the client's certificate and Finished, the
/// `Hello`) sends about 10 kB this way.
const FLOWING_BYTES: u64 = 64 << 10;
/// Fresh connections timed per round.
const HANDSHAKE_SAMPLES: usize = 5;
/// Outages this long or longer get `FAULTLINE_BENCH_LONG_ROUNDS` rounds.
const LONG_OUTAGE: Duration = Duration::from_secs(30);
/// The source's log lines (docs/recovery.md) whose timestamps the bench reads.
const LOG_CONNECTED: &str = "reconnected; resuming the session";
const LOG_RESUMED: &str = "the session runs again";

fn link() -> LinkConfig {
    LinkConfig::new(RTT, RATE_BPS)
}

fn main() -> anyhow::Result<()> {
    let bytes = env_size("FAULTLINE_BENCH_BYTES", 1 << 30);
    let outages: Vec<Duration> = std::env::var("FAULTLINE_BENCH_OUTAGES")
        .unwrap_or_else(|_| "1,10,45".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<f64>()
                .map(Duration::from_secs_f64)
                .with_context(|| format!("FAULTLINE_BENCH_OUTAGES: {s:?} is not seconds"))
        })
        .collect::<anyhow::Result<_>>()?;
    let rounds = env_size("FAULTLINE_BENCH_ROUNDS", 3).max(1);
    let long_rounds = env_size("FAULTLINE_BENCH_LONG_ROUNDS", 1).max(1);
    let cut_at: f64 = match std::env::var("FAULTLINE_BENCH_CUT_AT") {
        Ok(v) => v
            .parse()
            .ok()
            .filter(|f| (0.0..1.0).contains(f))
            .with_context(|| format!("FAULTLINE_BENCH_CUT_AT={v:?} is not a fraction"))?,
        Err(_) => 0.3,
    };
    let rounds_of = |o: &Duration| {
        if *o >= LONG_OUTAGE {
            long_rounds
        } else {
            rounds
        }
    };

    set_expected_bdp(RATE_BPS, RTT);
    // The source's reconnection and resume, with timestamps, on its stderr; no colours.
    std::env::set_var("FAULTLINE_LOG", "warn,transport::quic::source=info");
    std::env::set_var("NO_COLOR", "1");
    let certs = Certs::new();
    let dir = tempfile::tempdir_in(
        std::env::var("FAULTLINE_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()),
    )
    .context("a directory for the image")?;
    let image = dir.path().join("memory.img");
    write_random_image(&image, bytes)?;
    let rt = runtime()?;

    let mut rows: Vec<Vec<Value>> = vec![Vec::new(); outages.len()];
    for round in 0..outages.iter().map(rounds_of).max().unwrap_or(0) {
        for (i, outage) in outages.iter().enumerate() {
            if round >= rounds_of(outage) {
                continue;
            }
            let handshake = rt.block_on(handshake_samples(&certs, HANDSHAKE_SAMPLES))?;
            let mut row = measure(&certs, &image, bytes, *outage, cut_at)?;
            row["round"] = json!(round);
            row["handshake_ms_samples"] = json!(handshake);
            row["handshake_ms"] = json!(median(&handshake));
            emit(&row);
            rows[i].push(row);
        }
    }
    for (outage, rows) in outages.iter().zip(&rows) {
        emit(&summary(*outage, bytes, rows));
    }
    Ok(())
}

fn case_name(outage: Duration) -> String {
    format!("outage_{}s", outage.as_secs_f64())
}

/// What the bench's hand on the link saw.
struct Hand {
    /// Source → destination counters just before the cut.
    before: DirectionCounters,
    /// Wall clock of the restore, for the source's log timestamps.
    restored_wall: SystemTime,
    /// Restore → the first source → destination datagram delivered after it, ms.
    first_datagram_ms: Option<f64>,
    /// Restore → [`FLOWING_BYTES`] more delivered, ms.
    flowing_ms: Option<f64>,
}

/// Waits until `cut_after` bytes crossed, cuts the link for `outage`, restores it, and
/// times the traffic that follows. `None` if the migration ended before the cut.
fn cut_and_restore(
    wan: &WanEmulator,
    cut_after: u64,
    outage: Duration,
    done: &AtomicBool,
) -> Option<Hand> {
    while wan.counters().client_to_server.bytes < cut_after {
        if done.load(Ordering::Relaxed) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let before = wan.counters().client_to_server;
    let cut = Instant::now();
    wan.cut();
    std::thread::sleep(outage.saturating_sub(cut.elapsed()));
    let at_restore = wan.counters().client_to_server;
    let restored_wall = SystemTime::now();
    let restored = Instant::now();
    wan.restore();
    let ms = |t: Instant| t.duration_since(restored).as_secs_f64() * 1e3;
    let mut first_datagram_ms = None;
    let mut flowing_ms = None;
    let deadline = restored + Duration::from_secs(120);
    while flowing_ms.is_none() && Instant::now() < deadline && !done.load(Ordering::Relaxed) {
        let c = wan.counters().client_to_server;
        let now = Instant::now();
        if first_datagram_ms.is_none() && c.packets > at_restore.packets {
            first_datagram_ms = Some(ms(now));
        }
        if c.bytes >= at_restore.bytes + FLOWING_BYTES {
            flowing_ms = Some(ms(now));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Some(Hand {
        before,
        restored_wall,
        first_datagram_ms,
        flowing_ms,
    })
}

/// One migration of `image` with an outage of `outage` once `cut_at` of its bytes crossed;
/// a JSON row.
fn measure(
    certs: &Certs,
    image: &Path,
    bytes: u64,
    outage: Duration,
    cut_at: f64,
) -> anyhow::Result<Value> {
    let size = bytes.to_string();
    let dest = DestProcess::start(certs, &["--size", &size, "--workers", "0"]);
    let dest_addr: SocketAddr = dest.addr.parse().context("destination address")?;
    let wan = WanEmulator::start("127.0.0.1:0".parse()?, dest_addr, link())?;
    let via = wan.local_addr().to_string();
    let image_arg = image.display().to_string();
    let done = AtomicBool::new(false);
    let cut_after = (bytes as f64 * cut_at) as u64;
    let (src, hand) = std::thread::scope(|s| {
        let hand = s.spawn(|| cut_and_restore(&wan, cut_after, outage, &done));
        let src = run_source(
            certs,
            "source",
            &via,
            &["--image", &image_arg, "--encoding", "off"],
            TIMEOUT,
        );
        done.store(true, Ordering::Relaxed);
        (src, hand.join())
    });
    let dst = dest.wait(TIMEOUT);
    check(&src, "source")?;
    check(&dst, "destination")?;
    check_digests(&src, &dst)?;
    let Some(hand) = hand.map_err(|_| anyhow::anyhow!("the bench's hand on the link panicked"))?
    else {
        bail!("the migration ended before {cut_after} B crossed: nothing was cut");
    };
    let (s, d) = (&src.json, &dst.json);
    let wan_counters = wan.counters();
    let c2s = wan_counters.client_to_server;
    let u = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    // This run's wire cost per page byte: UDP payload delivered to the destination over the
    // page bytes it carried (every page once, plus the duplicates the destination dropped).
    let page_bytes_delivered = bytes + u(d, "bytes_resent");
    let wire_per_page_byte = c2s.bytes as f64 / page_bytes_delivered as f64;
    let in_flight_wire = c2s.cut_in_flight_bytes;
    let in_flight = in_flight_wire as f64 / wire_per_page_byte;
    let resent = u(s, "bytes_resent");
    let restore_to = |line: &str| log_time(&src, line).map(|t| ms_between(hand.restored_wall, t));
    let paused = u(s, "pauses") > 0;
    Ok(json!({
        "bench": BENCH,
        "case": case_name(outage),
        "part": "round",
        "outage_s": outage.as_secs_f64(),
        "rate_bps": RATE_BPS,
        "rtt_ms": RTT.as_secs_f64() * 1e3,
        "memory_bytes": bytes,
        "cut_after_bytes": hand.before.bytes,
        "held_bytes_before_cut": hand.before.held_bytes,
        "in_flight_at_cut_wire_bytes": in_flight_wire,
        "wire_per_page_byte": wire_per_page_byte,
        "in_flight_at_cut_bytes": in_flight.round(),
        "bytes_resent": resent,
        "dest_bytes_resent": d["bytes_resent"],
        "resent_over_in_flight": resent as f64 / in_flight,
        "session_paused": paused,
        "pauses": s["pauses"],
        "dest_pauses": d["pauses"],
        "paused_ms": s["paused_ms"],
        "dest_paused_ms": d["paused_ms"],
        "resume_ms_after_restore": s["resume_ms_after_restore"],
        "dest_resume_ms_after_restore": d["resume_ms_after_restore"],
        "restore_to_connected_ms": restore_to(LOG_CONNECTED),
        "restore_to_resumed_ms": restore_to(LOG_RESUMED),
        "restore_to_first_datagram_ms": hand.first_datagram_ms,
        "restore_to_flowing_ms": hand.flowing_ms,
        "total_ms": d["total_ms"],
        "source_total_ms": s["total_ms"],
        "digests_equal": true,
        "wan": wan_counters,
    }))
}

/// `samples` fresh connections through an idle emulator of the same link, ms each: a new
/// client endpoint with the source's identity, the destination's identity and acceptor
/// (a stateless Retry for the first, a token from an earlier one for the rest, then the
/// handshake) on the other side; connected = the client's
/// handshake completed, as when the source's reconnection returns.
async fn handshake_samples(certs: &Certs, samples: usize) -> anyhow::Result<Vec<f64>> {
    let (source, dest) = (certs.identity("source"), certs.identity("dest"));
    let server = server_endpoint("127.0.0.1:0".parse()?, &dest, source.cert.clone())?;
    let mut acceptor = Acceptor::start(server.clone(), AcceptLimits::default());
    // Keep the accepted connections until the end, so none closes during another's timing.
    let keep = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Some(c) = acceptor.next().await {
            conns.push(c);
        }
        conns
    });
    let wan = WanEmulator::start("127.0.0.1:0".parse()?, server.local_addr()?, link())?;
    let mut ms = Vec::with_capacity(samples);
    for _ in 0..samples {
        let client = client_endpoint("127.0.0.1:0".parse()?, &source, dest.cert.clone())?;
        let t = Instant::now();
        let conn = connect(&client, wan.local_addr())
            .await
            .context("a fresh connection through the emulator")?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        conn.close(0u32.into(), b"measured");
        let _ = tokio::time::timeout(Duration::from_secs(1), client.wait_idle()).await;
    }
    server.close(0u32.into(), b"done");
    keep.abort();
    drop(wan);
    Ok(ms)
}

/// `to` − `from` in ms (negative if `to` is earlier).
fn ms_between(from: SystemTime, to: SystemTime) -> f64 {
    match to.duration_since(from) {
        Ok(d) => d.as_secs_f64() * 1e3,
        Err(e) => -e.duration().as_secs_f64() * 1e3,
    }
}

/// Median, p99 (nearest rank), min and max of the rounds' `key`; `null` if no round has it.
fn spread(rows: &[Value], key: &str) -> Value {
    let mut v: Vec<f64> = rows.iter().filter_map(|r| r[key].as_f64()).collect();
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_by(f64::total_cmp);
    json!({
        "median": median(&v),
        "p99": nearest_rank(&v, 99.0),
        "min": v[0],
        "max": v[v.len() - 1],
        "n": v.len(),
    })
}

fn summary(outage: Duration, bytes: u64, rows: &[Value]) -> Value {
    let all = |k: &str| {
        let v: Vec<f64> = rows.iter().filter_map(|r| r[k].as_f64()).collect();
        v
    };
    let handshakes: Vec<f64> = rows
        .iter()
        .filter_map(|r| r["handshake_ms_samples"].as_array())
        .flatten()
        .filter_map(Value::as_f64)
        .collect();
    let handshake = median(&handshakes);
    let target_ms = TARGET_RESUME_RTTS * RTT.as_secs_f64() * 1e3 + handshake;
    // Every round within `limit` (a round without the figure fails it).
    let meets = |k: &str, limit: f64| {
        let v = all(k);
        v.len() == rows.len() && v.iter().all(|x| *x <= limit)
    };
    let over = |k: &str, by: f64| {
        let s = spread(rows, k);
        if s.is_null() {
            return s;
        }
        json!({
            "median": s["median"].as_f64().unwrap_or(f64::NAN) / by,
            "p99": s["p99"].as_f64().unwrap_or(f64::NAN) / by,
        })
    };
    let resume_ok = meets("resume_ms_after_restore", target_ms);
    let restore_ok = meets("restore_to_flowing_ms", target_ms);
    let resent_ok = meets("resent_over_in_flight", TARGET_RESENT_OVER_IN_FLIGHT);
    json!({
        "bench": BENCH,
        "case": case_name(outage),
        "part": "summary",
        "outage_s": outage.as_secs_f64(),
        "rate_bps": RATE_BPS,
        "rtt_ms": RTT.as_secs_f64() * 1e3,
        "memory_bytes": bytes,
        "rounds": rows.len(),
        "rounds_paused": rows.iter().filter(|r| r["session_paused"] == true).count(),
        "handshake_ms": {
            "median": handshake,
            "p99": if handshakes.is_empty() { f64::NAN } else {
                let mut h = handshakes.clone();
                h.sort_by(f64::total_cmp);
                nearest_rank(&h, 99.0)
            },
            "n": handshakes.len(),
        },
        "resume_target_ms": target_ms,
        "resume_ms_after_restore": spread(rows, "resume_ms_after_restore"),
        "dest_resume_ms_after_restore": spread(rows, "dest_resume_ms_after_restore"),
        "resume_over_target": over("resume_ms_after_restore", target_ms),
        "resume_meets_target": resume_ok,
        "restore_to_connected_ms": spread(rows, "restore_to_connected_ms"),
        "restore_to_resumed_ms": spread(rows, "restore_to_resumed_ms"),
        "restore_to_first_datagram_ms": spread(rows, "restore_to_first_datagram_ms"),
        "restore_to_flowing_ms": spread(rows, "restore_to_flowing_ms"),
        "restore_to_flowing_over_target": over("restore_to_flowing_ms", target_ms),
        "restore_to_flowing_meets_target": restore_ok,
        "in_flight_at_cut_bytes": spread(rows, "in_flight_at_cut_bytes"),
        "in_flight_at_cut_wire_bytes": spread(rows, "in_flight_at_cut_wire_bytes"),
        "bytes_resent": spread(rows, "bytes_resent"),
        "dest_bytes_resent": spread(rows, "dest_bytes_resent"),
        "resent_over_in_flight": spread(rows, "resent_over_in_flight"),
        "resent_target": TARGET_RESENT_OVER_IN_FLIGHT,
        "resent_meets_target": resent_ok,
        "paused_ms": spread(rows, "paused_ms"),
        "total_ms": spread(rows, "total_ms"),
        "digests_equal": rows.iter().all(|r| r["digests_equal"] == true),
        "meets_targets": resume_ok && restore_ok && resent_ok,
    })
}
