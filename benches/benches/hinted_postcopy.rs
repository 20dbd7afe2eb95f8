//! The guest agent's hints on a running KVM guest: hot-first push and free-page skipping.
//!
//! Both ends in this process (the reference VMM, real KVM vCPUs, QUIC on loopback,
//! userfaultfd on the destination; `faultline_tests::loopback`). The guest is 1 GiB with 2
//! vCPUs running `hot-cold` (read-modify-write, 90% of it in the first eighth of each
//! vCPU's slice) over a 256 MiB working set; memory above the working set holds
//! pseudo-random bytes (old page cache), and the top quarter of memory is what the agent
//! calls free. Bare-metal guests cannot run the Linux agent, so the bench plays it: it
//! writes agent protocol bytes (`Hello`, `HotRanges` = page tables, code, data areas,
//! stacks and the hot eighths, `FreeRanges` = the free quarter, `poison_on_free = false`)
//! into a Unix socket that a `HintBoard` reads, after dirty tracking (KVM's dirty log)
//! started.
//!
//! Each round boots one source guest, runs it, pauses it at a progress report and then
//! migrates the same frozen guest once per case, in an order that rotates each round:
//! * `plain`: the normal push order (page 0 up, restarted after demand faults);
//! * `hot_first`: the hot ranges pushed first;
//! * `hot_first_skip_free`: hot first, and the free pages that the dirty log shows
//!   unwritten sent as zero pages (no payload).
//!
//! In these measured runs the destination guests run their program from the first
//! instruction; when every page is present they run 100 ms more and are paused, and the
//! destination's digest over every page the guest cannot write (all but its slices, data
//! areas and stacks; the free pages included) must equal the source's with the skipped
//! pages zeroed. Then each case is migrated once more with the guests held after their
//! switchover digest, and the digest of **all** memory (and each guest's digest of its
//! slice) must equal the source's at switchover with the skipped pages zeroed. A mismatch
//! fails the bench.
//!
//! One JSON line per run, one per case with medians and p99s over the rounds, and a
//! `summary` with ratios against `plain` (and `hot_first` for the bytes): ratios of the
//! medians, and `paired_*`, the median over rounds of the ratio within each round (the
//! same source guest migrated each way), which the differences between rounds do not
//! blur. Fields: `blocked_ms` (all faulting threads), `vcpu_blocked_ms`, `faults`,
//! `fault_latency_us`, `total_ms` (source stop → every page present), `downtime_ms` (start of
//! the migration → first destination vCPU run), `ops_per_s_during` (first destination run
//! → every page present), `ops_per_s_first_250ms` / `_500ms` / `_1s` (the guests' op rate
//! over that long after the first destination run, sampled every 10 ms),
//! `time_to_25pct_ms` / `time_to_50pct_ms` (first destination run → the first 100 ms window
//! whose rate is at least that share of the run's peak 100 ms rate: when the guest "takes
//! off"), `wire_bytes` (UDP
//! both ways, as the destination's QUIC stack counts them), `page_bytes` (what the pages
//! cost inside `Pages` messages: payloads plus a kind byte each, pushed and served),
//! `pages_pushed_hot`, `pages_skipped_free`.
//!
//! Environment: `FAULTLINE_BENCH_BYTES` (1G; 256M for a quick run),
//! `FAULTLINE_BENCH_WORKING_SET` (256M, at most half of memory), `FAULTLINE_BENCH_VCPUS`
//! (2), `FAULTLINE_BENCH_RUNS` (5 rounds), `FAULTLINE_BENCH_RUN_SECS` (2),
//! `FAULTLINE_BENCH_FREE_PCT` (25), `FAULTLINE_BENCH_ENCODING` (`auto` or `off`);
//! `FAULTLINE_BENCH_SERIES=1` also prints each measured run's op counts every 100 ms on
//! stderr.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use faultline_benches::stats::{median, Summary};
use faultline_benches::{emit, env_size};
use faultline_tests::loopback::{
    agent_report, feed_agent, migrate, migrate_over, reference_hot, AgentChunk, Check, GuestSpec,
    Mode, Outcome, SourceGuest,
};
use refvmm::layout::WORKSET_BASE;
use refvmm::rate::time_to_rate;
use refvmm::{Program, VmConfig};
use serde_json::{json, Map, Value};
use transport::encoding::EncodingPolicy;
use transport::quic::{bdp_bytes, ENV_EXPECTED_BDP};
use vmm_shim::hints::agent_proto::PfnRange;
use vmm_shim::hints::{BoardLimits, HintBoard};
use wan_emu::LinkConfig;

const BENCH: &str = "hinted_postcopy";
const PAGE: u64 = 4096;
/// Rate window for the take-off times.
const WINDOW_MS: f64 = 100.0;
const CASES: [Mode; 3] = [Mode::Plain, Mode::HotFirst, Mode::HotFirstSkipFree];

fn name(m: Mode) -> &'static str {
    match m {
        Mode::Plain => "plain",
        Mode::HotFirst => "hot_first",
        Mode::HotFirstSkipFree => "hot_first_skip_free",
    }
}

struct Params {
    bytes: u64,
    working_set: u64,
    program: fn(u64) -> Program,
    program_name: String,
    /// The emulated link for the measured runs (`None`: straight over loopback).
    link: Option<LinkConfig>,
    link_name: String,
    vcpus: usize,
    run_secs: u64,
    free_pct: u64,
    encoding: EncodingPolicy,
}

fn main() -> anyhow::Result<()> {
    if !std::path::Path::new("/dev/kvm").exists() {
        bail!("/dev/kvm is absent: this bench needs KVM (load kvm_intel or kvm_amd)");
    }
    let bytes = env_size("FAULTLINE_BENCH_BYTES", 1 << 30);
    let program_name =
        std::env::var("FAULTLINE_BENCH_PROGRAM").unwrap_or_else(|_| "scattered".into());
    let program: fn(u64) -> Program = match program_name.as_str() {
        "scattered" => |working_set| Program::Scattered { working_set },
        "hot-cold" => |working_set| Program::HotCold { working_set },
        other => bail!("FAULTLINE_BENCH_PROGRAM={other:?}: use scattered or hot-cold"),
    };
    let link_name = std::env::var("FAULTLINE_BENCH_LINK").unwrap_or_else(|_| "1000/20".into());
    let link = parse_link(&link_name)?;
    if let Some(l) = &link {
        // Both ends run in this process: one setting sizes both QUIC stacks for the link.
        let rate = l.rate_bps.unwrap_or(u64::MAX);
        std::env::set_var(ENV_EXPECTED_BDP, bdp_bytes(rate, 2 * l.delay).to_string());
    }
    let p = Params {
        bytes,
        program,
        program_name,
        link,
        link_name,
        working_set: env_size("FAULTLINE_BENCH_WORKING_SET", 256 << 20)
            .min(1 << (bytes / 2).ilog2()),
        vcpus: env_size("FAULTLINE_BENCH_VCPUS", 2) as usize,
        run_secs: env_size("FAULTLINE_BENCH_RUN_SECS", 2),
        free_pct: env_size("FAULTLINE_BENCH_FREE_PCT", 25).min(50),
        encoding: match std::env::var("FAULTLINE_BENCH_ENCODING").as_deref() {
            Ok("off") => EncodingPolicy::OFF,
            Ok("auto") | Err(_) => EncodingPolicy::AUTO,
            Ok(other) => bail!("FAULTLINE_BENCH_ENCODING={other:?}: use auto or off"),
        },
    };
    let runs = env_size("FAULTLINE_BENCH_RUNS", 5).max(1) as usize;
    let started = Instant::now();
    let mut rows: Vec<(Mode, Value)> = Vec::new();
    for round in 0..runs {
        for (mode, row) in round_of(&p, round).with_context(|| format!("round {round}"))? {
            emit(&row);
            rows.push((mode, row));
        }
    }
    summarize(&p, runs, &rows, started);
    Ok(())
}

/// `loopback`, or `MBITS/RTT_MS` (`1000/20`: 1 Gbit/s, 20 ms round trip).
fn parse_link(s: &str) -> anyhow::Result<Option<LinkConfig>> {
    if s == "loopback" {
        return Ok(None);
    }
    let parsed = s
        .split_once('/')
        .and_then(|(r, t)| Some((r.parse::<u64>().ok()?, t.parse::<u64>().ok()?)));
    match parsed {
        Some((mbits, rtt_ms)) if mbits > 0 => Ok(Some(LinkConfig::new(
            Duration::from_millis(rtt_ms),
            mbits * 1_000_000,
        ))),
        _ => bail!("FAULTLINE_BENCH_LINK={s:?}: use loopback or MBITS/RTT_MS, e.g. 1000/20"),
    }
}

/// One source guest, migrated once per case (measured, guests running), then once per case
/// with the guests held for the all-memory digest.
fn round_of(p: &Params, round: usize) -> anyhow::Result<Vec<(Mode, Value)>> {
    let pages = p.bytes / PAGE;
    let config = VmConfig {
        mem_size: p.bytes,
        vcpus: p.vcpus,
        program: (p.program)(p.working_set),
        report_every: 1 << 16,
    };
    let free_pages = pages * p.free_pct / 100;
    let filled = (WORKSET_BASE + p.working_set) / PAGE..pages;
    if pages - free_pages < filled.start {
        bail!("{}% free does not fit above the working set", p.free_pct);
    }
    let spec = GuestSpec {
        config: config.clone(),
        run: Duration::from_secs(p.run_secs),
        filled,
        seed: 0x5eed + round as u64,
    };
    let mut src = SourceGuest::boot(spec).context("booting the source guest")?;

    // The agent's report, through a socket into the board. Dirty tracking started at boot;
    // the report is built now, so its scan is later (no scan age to allow for).
    let hot = reference_hot(&config);
    let free = [PfnRange::new(pages - free_pages, free_pages)];
    let mut board = HintBoard::new(
        &src.layout(),
        BoardLimits {
            max_scan_age: Duration::ZERO,
            ..BoardLimits::default()
        },
    )?;
    let fed = feed_agent(
        &mut board,
        vec![AgentChunk {
            after: Duration::ZERO,
            bytes: agent_report(round as u64 + 1, p.bytes, false, &hot, &free),
        }],
    )?;
    let errors = board.take_errors();
    let hints = board
        .take_hints()
        .with_context(|| format!("the board refused the agent's report: {errors:?}"))?;
    eprintln!(
        "round {round}: hints seq {} with {} hot pages in {} ranges, {} free pages ({} bytes over the socket)",
        hints.seq,
        hints.hot_pages(),
        hints.hot.len(),
        hints.free_pages(),
        fed.bytes
    );
    src.run_and_pause().context("running the source guest")?;

    let order: Vec<Mode> = (0..CASES.len())
        .map(|i| CASES[(i + round) % CASES.len()])
        .collect();
    let after = Check::Running {
        after: Duration::from_millis(100),
    };
    let mut measured = Vec::new();
    for &mode in &order {
        let o = migrate_over(
            &mut src,
            Some(&hints),
            mode,
            after,
            p.encoding,
            p.link.as_ref(),
        )
        .with_context(|| format!("{} (measured)", name(mode)))?;
        if !o.digest_match {
            bail!(
                "{}: destination memory differs from the source's outside the guest's writable pages: {} vs {}",
                name(mode),
                o.dest_digest,
                o.expected_digest
            );
        }
        if std::env::var_os("FAULTLINE_BENCH_SERIES").is_some() {
            let base = o.progress.first().map_or(0, |s| s.ops);
            let pts: Vec<String> = o
                .progress
                .iter()
                .step_by(10)
                .map(|s| format!("{:.0}:{}", s.t_ms, (s.ops - base) / 1000))
                .collect();
            eprintln!("{} series (ms:kops) {}", name(mode), pts.join(" "));
        }
        measured.push(o);
    }
    let mut out = Vec::new();
    // The all-memory checks need no link: they verify content, not speed.
    for o in measured {
        let v = migrate(&mut src, Some(&hints), o.mode, Check::Held, p.encoding)
            .with_context(|| format!("{} (verification)", name(o.mode)))?;
        if !v.digest_match {
            bail!(
                "{}: all-memory digest mismatch: destination {} vs source (skipped pages zeroed) {}; guest digests {:?}",
                name(o.mode),
                v.dest_digest,
                v.expected_digest,
                v.guest_digests_match
            );
        }
        out.push((o.mode, row(round, &o, &v)));
    }
    Ok(out)
}

/// The guests' peak rate over any 100 ms window of the run, and how long after the first
/// destination run the rate first reached `share` of it.
fn takeoff(o: &Outcome, share: f64) -> (f64, Option<f64>) {
    let s = &o.progress;
    let peak = s
        .iter()
        .enumerate()
        .filter_map(|(i, a)| {
            let b = s[i..].iter().find(|b| b.t_ms >= a.t_ms + WINDOW_MS)?;
            Some(b.ops.saturating_sub(a.ops) as f64 / ((b.t_ms - a.t_ms) / 1e3))
        })
        .fold(0.0, f64::max);
    (peak, time_to_rate(s, 0.0, WINDOW_MS, share * peak))
}

fn row(round: usize, o: &Outcome, v: &Outcome) -> Value {
    let (peak, t25) = takeoff(o, 0.25);
    let (_, t50) = takeoff(o, 0.5);
    json!({
        "bench": BENCH,
        "case": name(o.mode),
        "round": round,
        "link": o.link.as_ref().map(|l| json!({"rtt_ms": 2 * l.delay.as_millis() as u64, "rate_bps": l.rate_bps})),
        "memory_bytes": o.memory_bytes,
        "vcpus": o.vcpus,
        "downtime_ms": o.downtime_ms,
        "total_ms": o.total_ms,
        "blocked_ms": o.blocked_ms,
        "vcpu_blocked_ms": o.vcpu_blocked_ms,
        "faults": o.faults,
        "fault_latency_us": o.fault_latency_us,
        "pages_faulted": o.pages_faulted,
        "pages_pushed": o.pages_pushed,
        "pages_zero": o.pages_zero,
        "ops_per_s_during": o.ops_per_s_during,
        "ops_per_s_first_250ms": o.ops_per_s_first[0],
        "ops_per_s_first_500ms": o.ops_per_s_first[1],
        "ops_per_s_first_1s": o.ops_per_s_first[2],
        "ops_per_s_peak": peak,
        "time_to_25pct_ms": t25,
        "time_to_50pct_ms": t50,
        "wire_bytes": o.wire_bytes,
        "page_bytes": o.source.session.encoding.wire_bytes(),
        "pages_hot": o.source.pages_hot,
        "pages_pushed_hot": o.source.pages_pushed_hot,
        "pages_served": o.source.session.pages_served,
        "pages_skipped_free": o.source.pages_skipped_free,
        "skip_refused": o.skip_refused,
        "digest_match": o.digest_match,
        "pages_compared": o.pages_compared,
        "verified_digest_match": v.digest_match,
        "verified_guest_digests_match": v.guest_digests_match,
        "verified_digest": v.dest_digest,
        "verified_pages_skipped_free": v.source.pages_skipped_free,
    })
}

fn summarize(p: &Params, runs: usize, rows: &[(Mode, Value)], started: Instant) {
    let keys = [
        "blocked_ms",
        "faults",
        "total_ms",
        "downtime_ms",
        "ops_per_s_during",
        "ops_per_s_first_250ms",
        "ops_per_s_first_500ms",
        "ops_per_s_first_1s",
        "time_to_25pct_ms",
        "time_to_50pct_ms",
        "wire_bytes",
        "page_bytes",
        "pages_pushed_hot",
        "pages_skipped_free",
    ];
    let mut medians: Map<String, Value> = Map::new();
    for mode in CASES {
        let mut out = Map::new();
        out.insert("bench".into(), json!(BENCH));
        out.insert("case".into(), json!(format!("{}_summary", name(mode))));
        out.insert("runs".into(), json!(runs));
        let of = |k: &str| -> Vec<f64> {
            rows.iter()
                .filter(|(m, _)| *m == mode)
                .map(|(_, r)| r[k].as_f64().unwrap_or(f64::NAN))
                .collect()
        };
        for k in keys {
            let v = of(k);
            out.insert(format!("{k}_median"), json!(median(&v)));
            out.insert(format!("{k}_p99"), json!(Summary::from_samples(v).p99));
        }
        let p99s: Vec<f64> = rows
            .iter()
            .filter(|(m, _)| *m == mode)
            .map(|(_, r)| r["fault_latency_us"]["p99"].as_f64().unwrap_or(f64::NAN))
            .collect();
        out.insert("fault_p99_us_median".into(), json!(median(&p99s)));
        medians.insert(name(mode).into(), Value::Object(out.clone()));
        emit(&Value::Object(out));
    }
    let m = |mode: Mode, k: &str| {
        medians[name(mode)][format!("{k}_median")]
            .as_f64()
            .unwrap_or(f64::NAN)
    };
    // Ratios within each round (same source guest, same memory), then their median: the
    // rounds differ more from each other than the cases within a round do.
    let paired = |a: Mode, b: Mode, k: &str| {
        let v: Vec<f64> = (0..runs)
            .map(|round| {
                let get = |mode: Mode| {
                    rows.iter()
                        .find(|(m, r)| *m == mode && r["round"] == json!(round))
                        .and_then(|(_, r)| r[k].as_f64())
                        .unwrap_or(f64::NAN)
                };
                get(a) / get(b)
            })
            .collect();
        median(&v)
    };
    let pages = p.bytes / PAGE;
    let free_bytes = (pages * p.free_pct / 100 * PAGE) as f64;
    let all_verified = rows.iter().all(|(_, r)| {
        r["digest_match"] == json!(true) && r["verified_digest_match"] == json!(true)
    });
    emit(&json!({
        "bench": BENCH,
        "case": "summary",
        "memory_bytes": p.bytes,
        "working_set": p.working_set,
        "program": p.program_name,
        "link": p.link_name,
        "vcpus": p.vcpus,
        "free_pct": p.free_pct,
        "rounds": runs,
        "hot_first_over_plain_blocked_ms": m(Mode::HotFirst, "blocked_ms") / m(Mode::Plain, "blocked_ms"),
        "hot_first_over_plain_faults": m(Mode::HotFirst, "faults") / m(Mode::Plain, "faults"),
        "hot_first_over_plain_ops_during": m(Mode::HotFirst, "ops_per_s_during") / m(Mode::Plain, "ops_per_s_during"),
        "hot_first_over_plain_time_to_25pct": m(Mode::HotFirst, "time_to_25pct_ms") / m(Mode::Plain, "time_to_25pct_ms"),
        "hot_first_over_plain_time_to_50pct": m(Mode::HotFirst, "time_to_50pct_ms") / m(Mode::Plain, "time_to_50pct_ms"),
        "hot_first_over_plain_ops_first_250ms": m(Mode::HotFirst, "ops_per_s_first_250ms") / m(Mode::Plain, "ops_per_s_first_250ms"),
        "hot_first_over_plain_ops_first_500ms": m(Mode::HotFirst, "ops_per_s_first_500ms") / m(Mode::Plain, "ops_per_s_first_500ms"),
        "hot_first_over_plain_ops_first_1s": m(Mode::HotFirst, "ops_per_s_first_1s") / m(Mode::Plain, "ops_per_s_first_1s"),
        "skip_free_over_hot_first_wire_bytes": m(Mode::HotFirstSkipFree, "wire_bytes") / m(Mode::HotFirst, "wire_bytes"),
        "skip_free_over_hot_first_total_ms": m(Mode::HotFirstSkipFree, "total_ms") / m(Mode::HotFirst, "total_ms"),
        "wire_bytes_saved_over_free_bytes": (m(Mode::HotFirst, "wire_bytes") - m(Mode::HotFirstSkipFree, "wire_bytes")) / free_bytes,
        "skip_free_over_hot_first_page_bytes": m(Mode::HotFirstSkipFree, "page_bytes") / m(Mode::HotFirst, "page_bytes"),
        "page_bytes_saved_over_free_bytes": (m(Mode::HotFirst, "page_bytes") - m(Mode::HotFirstSkipFree, "page_bytes")) / free_bytes,
        "free_fraction_of_memory": p.free_pct as f64 / 100.0,
        "paired_hot_first_over_plain_blocked_ms": paired(Mode::HotFirst, Mode::Plain, "blocked_ms"),
        "paired_hot_first_over_plain_faults": paired(Mode::HotFirst, Mode::Plain, "faults"),
        "paired_hot_first_over_plain_time_to_50pct": paired(Mode::HotFirst, Mode::Plain, "time_to_50pct_ms"),
        "paired_skip_free_over_hot_first_page_bytes": paired(Mode::HotFirstSkipFree, Mode::HotFirst, "page_bytes"),
        "paired_skip_free_over_hot_first_wire_bytes": paired(Mode::HotFirstSkipFree, Mode::HotFirst, "wire_bytes"),
        "paired_skip_free_over_hot_first_total_ms": paired(Mode::HotFirstSkipFree, Mode::HotFirst, "total_ms"),
        "paired_skip_free_over_hot_first_blocked_ms": paired(Mode::HotFirstSkipFree, Mode::HotFirst, "blocked_ms"),
        "all_digests_match": all_verified,
        "wall_s": started.elapsed().as_secs_f64(),
    }));
}
