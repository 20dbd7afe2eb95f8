//! Evacuation across an emulated WAN: how close to the link's ideal, how fast demand faults
//! are while the push fills the link, and what page encoding buys.
//!
//! Real processes on loopback (`faultline dest`/`source`, or `standby`/`replicate` for the
//! replica cases) with the [`wan_emu::WanEmulator`] in the bench process between the
//! source and the destination. The destination runs one workload thread that reads and writes
//! random pages during postcopy, so demand faults happen while the push is running. A 1 GiB
//! synthetic image with realistic content (25% zero, 35% unique text, 10% duplicated text,
//! 30% random pages).
//!
//! Parts (each a JSON line per run, `"part"` says which):
//! * `ideal`: links of 100 Mbit/s and 1 Gbit/s at 20 and 100 ms RTT; `replica_10pct` (a
//!   standby replicated over a direct path, then evacuated through the link with 10% of
//!   memory stale) and `full` (plain postcopy, every page); encoding off. `ideal_ms` = bytes
//!   that must cross (the non-zero pages to move) × 8 / rate + one RTT; target
//!   `total_over_ideal` ≤ 1.15. `total_ms` is the destination's session start → every page
//!   present; `closed_ms` (and `closed_over_ideal`) adds the completion acknowledgement's
//!   round trip, after which the session is closed.
//! * `faults`: demand-fault latency (p50/p99, also in RTTs) while the push saturates the
//!   link, at 1 Gbit/s and 20 ms: replies on their own stream (the design) against replies
//!   queued behind the push on the bulk stream (`--replies-on-bulk`). Target p99 ≤ 1.5 RTT.
//! * `lossy`: plain postcopy (`full`) at 200 Mbit/s × 50 ms and 1 Gbit/s × 20 ms with 0,
//!   0.1% and 1% random loss per datagram both ways: `utilisation` = ideal / total (target
//!   ≥ 0.9 with loss) and the demand-fault p99 (target ≤ 2 RTT).
//! * `encoding`: off, lz4, dedup, all and auto on a slow link (100 Mbit/s, 20 ms, the
//!   replica case; and the replica case with half the stale pages copied from other pages,
//!   which references into the replica serve) and on loopback (no emulator, full
//!   migration); auto must be no slower
//!   than the fastest fixed choice (within noise), and the row says what it chose.
//!
//! Environment: `FAULTLINE_BENCH_BYTES` (1G), `FAULTLINE_BENCH_PARTS` (comma-separated subset
//! of `ideal,faults,lossy,encoding`; default all), `FAULTLINE_BENCH_LINKS` (only the `ideal` and
//! `encoding` links whose name contains one of these, e.g. `1000Mbit` or `loopback`),
//! `FAULTLINE_BENCH_EARLY` (`on`, `off` or `both`: the `ideal` rows with the push beside
//! the handshake, without it, or both back to back).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use faultline_benches::e2e::{check, check_digests, with_link_timeline};
use faultline_benches::stats::median;
use faultline_benches::{emit, env_size};
use faultline_tests::{run_source, Background, Certs, DestProcess, Finished, ShmDir};
use serde_json::{json, Value};
use transport::quic::{bdp_bytes, ENV_EXPECTED_BDP};
use wan_emu::{LinkConfig, WanEmulator};

const BENCH: &str = "wan_evacuation";
const TARGET_OVER_IDEAL: f64 = 1.15;
const TARGET_P99_RTT: f64 = 1.5;
/// `lossy`: the share of the link used (ideal / total) at 0.1% and 1% random loss.
const TARGET_LOSSY_UTILISATION: f64 = 0.9;
/// `lossy`: demand-fault p99 in round trips.
const TARGET_LOSSY_P99_RTT: f64 = 2.0;
const STALE_PCT: u32 = 10;
const TIMEOUT: Duration = Duration::from_secs(600);
const ENCODINGS: [&str; 5] = ["off", "lz4", "dedup", "all", "auto"];

#[derive(Clone, Copy)]
struct Link {
    /// None: loopback, no emulator.
    rate_bps: Option<u64>,
    rtt_ms: u64,
    /// Random loss per datagram, both ways.
    loss: f64,
}

impl Link {
    fn name(&self) -> String {
        match self.rate_bps {
            None => "loopback".into(),
            Some(r) if self.loss > 0.0 => {
                format!(
                    "{}Mbit_{}ms_loss{}pct",
                    r / 1_000_000,
                    self.rtt_ms,
                    self.loss * 100.0
                )
            }
            Some(r) => format!("{}Mbit_{}ms", r / 1_000_000, self.rtt_ms),
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Case {
    Full,
    Replica,
    /// 10% stale as well, half of it written and half copied from other pages (page
    /// migration in a guest): the replica holds the copies' content already.
    ReplicaMoved,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::Full => "full",
            Case::Replica => "replica_10pct",
            Case::ReplicaMoved => "replica_5pct_written_5pct_moved",
        }
    }
}

struct Run {
    link: Link,
    case: Case,
    encoding: &'static str,
    replies_on_bulk: bool,
    /// Push beside the handshake (the default); off with `--no-early-push`.
    early_push: bool,
}

fn main() -> anyhow::Result<()> {
    let bytes = env_size("FAULTLINE_BENCH_BYTES", 1 << 30);
    let parts = std::env::var("FAULTLINE_BENCH_PARTS")
        .unwrap_or_else(|_| "ideal,faults,lossy,encoding".into());
    let certs = Certs::new();
    let slow = Link {
        rate_bps: Some(100_000_000),
        rtt_ms: 20,
        loss: 0.0,
    };
    let gig20 = Link {
        rate_bps: Some(1_000_000_000),
        rtt_ms: 20,
        loss: 0.0,
    };
    // FAULTLINE_BENCH_LINKS: only the links whose name contains one of these.
    let only = std::env::var("FAULTLINE_BENCH_LINKS").ok();
    let wanted = |l: &Link| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|w| l.name().contains(w.trim())))
    };
    // FAULTLINE_BENCH_EARLY: `on` (default), `off` (--no-early-push) or `both` (each
    // `ideal` row twice, back to back, to compare in the same run).
    let early_modes: Vec<bool> = match std::env::var("FAULTLINE_BENCH_EARLY").as_deref() {
        Ok("off") => vec![false],
        Ok("both") => vec![true, false],
        _ => vec![true],
    };
    if parts.contains("ideal") {
        for link in [
            slow,
            Link {
                rate_bps: Some(100_000_000),
                rtt_ms: 100,
                loss: 0.0,
            },
            gig20,
            Link {
                rate_bps: Some(1_000_000_000),
                rtt_ms: 100,
                loss: 0.0,
            },
        ]
        .into_iter()
        .filter(wanted)
        {
            for (case, early_push) in [Case::Replica, Case::Full]
                .into_iter()
                .flat_map(|c| early_modes.iter().map(move |&e| (c, e)))
            {
                let run = Run {
                    link,
                    case,
                    encoding: "off",
                    replies_on_bulk: false,
                    early_push,
                };
                let mut row = measure(&certs, bytes, &run)?;
                let total = row["total_ms"].as_f64().unwrap_or(f64::NAN);
                let ideal = row["ideal_ms"].as_f64().unwrap_or(f64::NAN);
                row["part"] = json!("ideal");
                row["total_over_ideal"] = json!(total / ideal);
                row["closed_over_ideal"] =
                    json!(row["closed_ms"].as_f64().unwrap_or(f64::NAN) / ideal);
                row["meets_target"] = json!(total / ideal <= TARGET_OVER_IDEAL);
                emit(&row);
            }
        }
    }
    if parts.contains("faults") {
        for replies_on_bulk in [false, true] {
            let run = Run {
                link: gig20,
                case: Case::Full,
                encoding: "off",
                replies_on_bulk,
                early_push: true,
            };
            let mut row = measure(&certs, bytes, &run)?;
            row["part"] = json!("faults");
            let p99 = row["fault_p99_rtt"].as_f64().unwrap_or(f64::NAN);
            row["target_p99_rtt"] = json!(TARGET_P99_RTT);
            row["meets_target"] = json!(p99 <= TARGET_P99_RTT);
            emit(&row);
        }
    }
    if parts.contains("lossy") {
        let lossy = [(200_000_000, 50), (1_000_000_000, 20)]
            .into_iter()
            .flat_map(|(rate, rtt)| {
                [0.0, 0.001, 0.01].map(|loss| Link {
                    rate_bps: Some(rate),
                    rtt_ms: rtt,
                    loss,
                })
            });
        for link in lossy.filter(wanted) {
            let run = Run {
                link,
                case: Case::Full,
                encoding: "off",
                replies_on_bulk: false,
                early_push: true,
            };
            let mut row = measure(&certs, bytes, &run)?;
            let total = row["total_ms"].as_f64().unwrap_or(f64::NAN);
            let ideal = row["ideal_ms"].as_f64().unwrap_or(f64::NAN);
            let p99 = row["fault_p99_rtt"].as_f64().unwrap_or(f64::NAN);
            row["part"] = json!("lossy");
            row["loss"] = json!(link.loss);
            row["utilisation"] = json!(ideal / total);
            row["target_utilisation"] = json!(TARGET_LOSSY_UTILISATION);
            row["target_fault_p99_rtt"] = json!(TARGET_LOSSY_P99_RTT);
            row["meets_target"] =
                json!(ideal / total >= TARGET_LOSSY_UTILISATION && p99 <= TARGET_LOSSY_P99_RTT);
            emit(&row);
        }
    }
    if parts.contains("encoding") {
        let rounds = env_size("FAULTLINE_BENCH_ROUNDS", 1).max(1);
        let loopback = Link {
            rate_bps: None,
            rtt_ms: 0,
            loss: 0.0,
        };
        for (link, case) in [
            (slow, Case::Replica),
            (slow, Case::ReplicaMoved),
            (loopback, Case::Full),
        ]
        .into_iter()
        .filter(|(l, _)| wanted(l))
        {
            // Rounds of all five, interleaved, so that drift in the machine's load spreads
            // over every encoding alike; the summary compares medians.
            let mut rows = Vec::new();
            for round in 0..rounds {
                for encoding in ENCODINGS {
                    let run = Run {
                        link,
                        case,
                        encoding,
                        replies_on_bulk: false,
                        early_push: true,
                    };
                    let mut row = measure(&certs, bytes, &run)?;
                    row["part"] = json!("encoding");
                    row["round"] = json!(round);
                    emit(&row);
                    rows.push(row);
                }
            }
            let median_ms = |e: &str| {
                let v: Vec<f64> = rows
                    .iter()
                    .filter(|r| r["encoding"] == e)
                    .map(|r| r["total_ms"].as_f64().unwrap_or(f64::INFINITY))
                    .collect();
                median(&v)
            };
            let (best, best_ms) = ENCODINGS[..4]
                .iter()
                .map(|&e| (e, median_ms(e)))
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap_or(("off", f64::NAN));
            let auto_ms = median_ms("auto");
            let chose: Vec<&Value> = rows
                .iter()
                .filter(|r| r["encoding"] == "auto")
                .map(|r| &r["chosen"])
                .collect();
            emit(&json!({
                "bench": BENCH,
                "case": "encoding_summary",
                "part": "encoding",
                "link": link.name(),
                "scenario": case.name(),
                "rounds": rounds,
                "median_ms": ENCODINGS.iter().map(|&e| (e, median_ms(e))).collect::<std::collections::BTreeMap<_, _>>(),
                "fastest_fixed": best,
                "fastest_fixed_ms": best_ms,
                "auto_ms": auto_ms,
                "auto_chose": chose,
                "auto_over_fastest": auto_ms / best_ms,
            }));
        }
    }
    Ok(())
}

/// `FAULTLINE_BENCH_BDP_FACTOR`: state this multiple of the link's BDP to both processes
/// (default 1; for measuring what the window is worth).
fn bdp_factor() -> f64 {
    std::env::var("FAULTLINE_BENCH_BDP_FACTOR")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|f: &f64| *f > 0.0)
        .unwrap_or(1.0)
}

/// One migration through `run.link`; a JSON row with the measurements.
fn measure(certs: &Certs, bytes: u64, run: &Run) -> anyhow::Result<Value> {
    // Both processes size their QUIC windows for the link, as an operator would with
    // FAULTLINE_EXPECTED_BDP (docs/wan.md); on loopback the built-in default applies.
    match run.link.rate_bps {
        Some(rate) => std::env::set_var(
            ENV_EXPECTED_BDP,
            ((bdp_bytes(rate, Duration::from_millis(run.link.rtt_ms)) as f64 * bdp_factor())
                as u64)
                .to_string(),
        ),
        None => std::env::remove_var(ENV_EXPECTED_BDP),
    }
    let size = bytes.to_string();
    let dir = ShmDir::new("bench-wan");
    let dir_arg = dir.arg();
    let dest = match run.case {
        Case::Full => DestProcess::start(certs, &["--size", &size, "--workers", "1"]),
        Case::Replica | Case::ReplicaMoved => DestProcess::standby(
            certs,
            "127.0.0.1:0",
            &[
                "--size",
                &size,
                "--vm-id",
                "vm0",
                "--replica-dir",
                &dir_arg,
                "--workers",
                "1",
            ],
        ),
    };
    let dest_addr: SocketAddr = dest.addr.parse().context("destination address")?;
    let wan = match run.link.rate_bps {
        Some(rate) => Some(WanEmulator::start(
            "127.0.0.1:0".parse()?,
            dest_addr,
            LinkConfig::new(Duration::from_millis(run.link.rtt_ms), rate)
                .with_loss(run.link.loss, 0x1055),
        )?),
        None => None,
    };
    let via = wan
        .as_ref()
        .map_or(dest_addr, WanEmulator::local_addr)
        .to_string();
    let mut extra: Vec<&str> = vec!["--encoding", run.encoding];
    if run.replies_on_bulk {
        extra.push("--replies-on-bulk");
    }
    if !run.early_push {
        extra.push("--no-early-push");
    }
    let pct = STALE_PCT.to_string();
    let half = (STALE_PCT / 2).to_string();
    // FAULTLINE_BENCH_TIMELINE=1: the link's rate every 50 ms, to see where a run loses time.
    let (src, timeline) = with_link_timeline(wan.as_ref(), || {
        run_case(certs, run, &dest.addr, &via, &size, &pct, &half, extra)
    });
    let dst = dest.wait(TIMEOUT);
    check(&src, "source")?;
    check(&dst, "destination")?;
    check_digests(&src, &dst)?;
    let (s, d) = (&src.json, &dst.json);
    let enc = match run.case {
        Case::Full => &s["encoding"],
        Case::Replica | Case::ReplicaMoved => &s["evacuation"]["encoding"],
    };
    let pages = bytes / 4096;
    // Bytes that must cross: every non-zero page to move.
    let must_cross = match run.case {
        Case::Full => (pages - s["mix"]["zero"].as_u64().unwrap_or(0)) * 4096,
        Case::Replica | Case::ReplicaMoved => d["pages_stale"].as_u64().unwrap_or(0) * 4096,
    };
    let total_ms = d["total_ms"].as_f64().unwrap_or(f64::NAN);
    let ideal_ms = run
        .link
        .rate_bps
        .map(|r| must_cross as f64 * 8.0 / r as f64 * 1e3 + run.link.rtt_ms as f64);
    let metrics = &d["metrics"];
    let lat = &metrics["fault_latency_us"];
    let rtt_us = run.link.rtt_ms as f64 * 1e3;
    let in_rtt = |v: &Value| v.as_f64().map(|us| us / rtt_us).filter(|x| x.is_finite());
    let wan_counters = wan
        .as_ref()
        .map(|w| serde_json::to_value(w.counters()).unwrap_or_default());
    Ok(json!({
        "bench": BENCH,
        "case": format!("{}_{}_{}{}{}", run.link.name(), run.case.name(), run.encoding,
            if run.replies_on_bulk { "_replies_on_bulk" } else { "" },
            if run.early_push { "" } else { "_no_early_push" }),
        "early_push": run.early_push,
        "early_push_bytes": d["early_push_bytes"],
        "link": run.link.name(),
        "rate_bps": run.link.rate_bps,
        "rtt_ms": run.link.rtt_ms,
        "loss": run.link.loss,
        "scenario": run.case.name(),
        "encoding": run.encoding,
        "replies_on_bulk": run.replies_on_bulk,
        "memory_bytes": bytes,
        "must_cross_bytes": must_cross,
        "total_ms": total_ms,
        "closed_ms": d["closed_ms"],
        "ideal_ms": ideal_ms,
        // Connected → the guest may run (the standby's stale set handled; the plain
        // destination's handshake).
        "resume_ms": d["resume_ms"].as_f64().or(d["established_ms"].as_f64()),
        "wire_bytes": d["wire_bytes"],
        "raw_bytes": enc["raw_bytes"],
        "lz4_bytes": enc["lz4_bytes"],
        "zero_bytes": enc["zero_bytes"],
        "ref_bytes": enc["ref_bytes"],
        "ref_replica_pages": enc["ref_replica_pages"],
        "compression_ratio": enc["compression_ratio"],
        "chosen": enc["chosen"],
        "faults": metrics["faults"],
        // Plain postcopy only: demand replies, and those sent again for echoed requests.
        "pages_served": s["pages_served"],
        "pages_echoed": s["pages_echoed"],
        "fault_p50_us": lat["p50"],
        "fault_p99_us": lat["p99"],
        "fault_p50_rtt": in_rtt(&lat["p50"]),
        "fault_p99_rtt": in_rtt(&lat["p99"]),
        "digest_match": true,
        "wan": wan_counters,
        "link_timeline_mbps": timeline.mbps,
        "link_timeline_rtt_ms": timeline.rtt_ms,
        "link_timeline_late_ms": timeline.late_ms,
    }))
}

/// Starts the source side of `run` (the source, or the replicator that evacuates) and
/// waits for it.
#[allow(clippy::too_many_arguments)]
fn run_case<'a>(
    certs: &Certs,
    run: &Run,
    dest_addr: &str,
    via: &'a str,
    size: &'a str,
    pct: &'a str,
    half: &'a str,
    mut extra: Vec<&'a str>,
) -> Finished {
    match run.case {
        Case::Full => {
            extra.extend(["--synthetic", size]);
            run_source(certs, "source", via, &extra, TIMEOUT)
        }
        Case::Replica | Case::ReplicaMoved => {
            // Replication takes the direct path; only the evacuation crosses the link.
            extra.extend([
                "--synthetic",
                size,
                "--vm-id",
                "vm0",
                "--evacuate-after",
                "1",
                "--evacuate-connect",
                via,
            ]);
            if run.case == Case::Replica {
                extra.extend(["--stale-pct", pct]);
            } else {
                extra.extend(["--stale-pct", half, "--stale-moved-pct", half]);
            }
            Background::replicate(certs, dest_addr, &extra).wait(TIMEOUT)
        }
    }
}
