//! The fleet model against real runs (issue 14): N real `faultline replicate` /
//! `faultline standby` pairs evacuated by one `faultline evacuate` orchestrator through one
//! shared emulated bottleneck, under the planner's schedule and the two baselines; per VM
//! the model's completion time against the measured one.
//!
//! Set-up per run: N pairs of the built-in synthetic image (of 256 MiB, 512 MiB, 1 GiB,
//! 256 MiB in turn: `FAULTLINE_BENCH_SIZES`; `FAULTLINE_BENCH_BYTES` for one size for all),
//! replication the direct way on loopback; each source plants a different share of
//! stale pages at its evacuation (`--stale-pct`, spread from 5% to 40% over the fleet, in a
//! shuffled order) and writes at a different rate while it replicates. The last
//! `FAULTLINE_BENCH_KVM` VMs of each fleet (default 1 where /dev/kvm is, else 0) are KVM
//! guests of the reference VMM instead, of the smallest size: `faultline vm source
//! --replicate --control` (one vCPU running `scattered` over half its memory, throttled to a
//! quarter of its time, the KVM dirty
//! log as tracker, its own share planted with `--stale-pct`) into `faultline vm dest
//! --replica-dir`, their digests of
//! all guest memory at switchover compared. Every evacuation goes
//! through `--evacuate-connect` to ONE [`WanEmulator`]: one route per standby
//! ([`WanEmulator::add_route`]), all routes sharing the same rate, queue and delay. The
//! processes are told the path's bandwidth-delay product (`FAULTLINE_EXPECTED_BDP`, as
//! docs/wan.md says to), and evacuate with `--encoding off` (`FAULTLINE_BENCH_ENCODING`), so
//! that the bytes that cross are the stale bytes the model is given. (With an encoding,
//! the model gets each VM's wire ratio as its source estimated it before its start, the
//! report's `wire_ratio_at_start`.) The plan file states
//! the same link (rate, RTT, the window 1.25 × BDP) and a deadline of 70% of the
//! all-at-once makespan the model predicts from the planted stale bytes, so that it binds.
//! (With an encoding, what the first run's `faultline plan --live` predicts from the
//! sources' own figures as it starts, kept for the fleet's other runs: only the sources
//! know what their pages compress to.)
//!
//! Calibration (`FAULTLINE_BENCH_CALIBRATE=0` to skip): before the fleets, per link, one VM
//! alone and four at once are evacuated; what one evacuation and four together delivered
//! while their bytes moved (switchover to done, less the model's tail: `Costs::tail_s`;
//! on a 2-core machine the processes, not the emulated link, can be the bottleneck) are
//! given to the model and to the plan file as the link's rate (`rate_bps`: the more of the
//! two, at most the nominal), its rate for several flows (`shared_rate_bps`: four flows',
//! if less than one's) and, where four beat one clearly, each VM's own limit
//! (`max_rate_bps`: one flow's), all measured in stale bytes and turned into the model's
//! wire bytes ([`wire_rate`]). The ideal keeps the nominal rate.
//!
//! Two predictions per VM: the model's plan (`fleet::plan::plan_with`, the same schedule
//! policy) on the fleet as measured (each VM's stale bytes are the pages that crossed, no
//! growth while waiting, the run's median setup); and the **replay**, the simulator given
//! the schedule as it ran (each VM released at its measured start,
//! [`SimOptions::replay`]), which checks the flow model apart from the orchestrator's
//! re-planning decisions. `orchestrator_finish_s` is what the orchestrator itself
//! predicted at time 0 from the sources' status (per run, `orchestrator_error_median` and
//! `_worst`): the prediction an operator has in advance. Times are seconds from the
//! orchestrator's start (after the sources answered).
//!
//! Lines (`case`): `calibration` (per link), `vm` (per VM and run), `run` (per run: median
//! and worst per-VM error of the plan and of the replay, makespan and mean completion
//! predicted against measured, saved by the deadline, the ideal makespan = the bytes that
//! had to cross (stale bytes × each VM's measured wire ratio) × 8 / nominal rate, and on
//! the bytes the emulator carried, its queue drops), `summary` (per fleet size and link:
//! the ranking of the three schedules by mean completion, model against measured; planner
//! against all at once; the targets, pass or fail).
//! Every VM's memory digest must be equal on both sides, or the bench fails.
//!
//! Environment: `FAULTLINE_BENCH_FLEET` (fleet sizes, `4,8`), `FAULTLINE_BENCH_LINKS`
//! (`100M:20,1G:50`: rate and RTT in ms), `FAULTLINE_BENCH_SIZES` (the VMs' memory in
//! turn, `256M,512M,1G,256M`; their mean is the calibration's), `FAULTLINE_BENCH_BYTES`
//! (one size for every VM, instead),
//! `FAULTLINE_BENCH_SCHEDULES` (`planner,all-at-once,smallest-first`),
//! `FAULTLINE_BENCH_ROUNDS` (repeats of each run, 1), `FAULTLINE_BENCH_ENCODING` (`off`),
//! `FAULTLINE_BENCH_STATED_BDP` (`0`: the default window instead), `FAULTLINE_BENCH_CALIBRATE`,
//! `FAULTLINE_BENCH_EVENTS` (set: each run line carries `orchestrator_events`, its event
//! lines), `FAULTLINE_BENCH_TIMELINE` (set: each run line carries `link_timeline_mbps`, the link's
//! rate every 50 ms, `link_timeline_rtt_ms`, the round trip the link model gave each 50 ms's
//! datagrams, `link_timeline_late_ms`, how late the emulator's threads sent them, and
//! `rate_limits`, the orchestrator's holds and releases),
//! `FAULTLINE_BENCH_IDLE_REPLICATORS` (the image sources' replicators at SCHED_IDLE, as
//! `replicate` runs them by default, and a throttled KVM guest's too; `0`: at normal
//! priority),
//! `FAULTLINE_BENCH_GUEST_THROTTLE` (the KVM guests' `--cpu-throttle`, 75) and
//! `FAULTLINE_BENCH_TOUCH_RATE` (the image standbys' `--touch-rate`, 50000; `0`: unpaced):
//! every process here stands in for a host of its own but shares two cores. Each run line
//! carries `machine_before` (idle and stolen cores over half a second before the run, the
//! load average, and `faultline` processes or `/dev/shm/faultline-test-*` entries left by
//! an earlier run, which also get a warning on stderr) and `machine_during` (idle and
//! stolen cores averaged over the run; a warning when the hypervisor took more than
//! `machine::STEAL_WARNING_CORES`): on this shared machine the same command has given
//! 20–39% and 1–4% per-VM error half an hour apart.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use faultline_benches::e2e::{check, check_digests, set_expected_bdp, with_link_timeline};
use faultline_benches::machine;
use faultline_benches::stats::{median, Summary};
use faultline_benches::{emit, env_size, parse_size};
use faultline_tests::{
    free_tcp_port, free_udp_port, wait_replicated, Background, Certs, DestProcess, Finished, ShmDir,
};
use fleet::model::{Costs, Fleet, Link, Vm, DEFAULT_WINDOW_BYTES};
use fleet::plan::{plan_with, PlanOptions, Policy};
use fleet::sim::{simulate, LinkSchedule, Schedule, Sharing, SimOptions};
use serde_json::{json, Value};
use transport::quic::{bdp_bytes, ENV_EXPECTED_BDP};
use transport::tls::Identity;
use wan_emu::{LinkConfig, WanEmulator};

const BENCH: &str = "fleet_evacuation";
const PAGE: u64 = 4096;
const TIMEOUT: Duration = Duration::from_secs(900);
/// How long a standby may take to exit once its source has.
const STANDBY_AFTER_SOURCE: Duration = Duration::from_secs(120);
const DEADLINE_SHARE: f64 = 0.7;
/// The VMs' memory sizes, taken in turn (`FAULTLINE_BENCH_SIZES`): 256 MiB to 1 GiB, 512 MiB
/// on average, so that 16 VMs at both ends hold 16 GiB.
const DEFAULT_SIZES: &str = "256M,512M,1G,256M";
/// Each process here stands in for a host of its own, but all share this machine's cores.
/// A KVM guest's vCPU spinning at full speed (and its replicator keeping up with it) took
/// a quarter of the two cores until its turn, from the transfers under way; throttled
/// (`vm --cpu-throttle`) it runs a quarter of the time.
const GUEST_THROTTLE: u8 = 75;
/// The same for the image standbys' stand-in guests: unpaced, each spins on memory from
/// its resume until its evacuation ends. At this rate it still faults on missing pages.
const TOUCH_RATE: u64 = 50_000;
const TARGET_VM_ERR: f64 = 0.10;
const TARGET_MAKESPAN_ERR: f64 = 0.10;
const TARGET_MEAN_RATIO: f64 = 0.7;
const TARGET_OVER_IDEAL: f64 = 1.05;
/// Two schedules whose measured mean completions differ by less than this share are tied
/// (`same_ranking_within_tie`).
const RANK_TIE: f64 = 0.01;
const SCHEDULES: [&str; 3] = ["planner", "all-at-once", "smallest-first"];

#[derive(Clone, Copy)]
struct WanLink {
    rate_bps: u64,
    rtt_ms: u64,
    /// The processes are told the path's bandwidth-delay product (`FAULTLINE_EXPECTED_BDP`),
    /// as docs/wan.md says to: each flow's window is then 1.25 × BDP, one flow fills the
    /// link, and several at once overfill the queue by less.
    stated_bdp: bool,
    /// What the machine delivers, measured before the fleets run ([`calibrate`]); the model
    /// and the plan file are given these, the ideal keeps the nominal rate.
    calibrated: Option<Calibration>,
}

/// The platform as measured: on a 2-core machine running every source, standby and the
/// emulator, the processes rather than the emulated link can be the bottleneck.
#[derive(Clone, Copy)]
struct Calibration {
    /// One evacuation alone: stale bytes × its wire ratio × 8 / (finish − switchover −
    /// the model's tail).
    flow_bps: u64,
    /// Four at once: all their stale bytes × their wire ratios × 8 / (last finish − first
    /// switchover − the model's tail).
    aggregate_bps: u64,
}

/// A calibrated rate (stale bytes, payload) in the model's terms: the model counts a
/// link's rate and a flow's cap in wire bytes and adds [`Costs::wire_overhead`] to every
/// VM's stale bytes, so a payload rate taken as it is would count the overhead twice
/// (predictions about 4% long).
fn wire_rate(payload_bps: u64) -> u64 {
    (payload_bps as f64 * (1.0 + Costs::default().wire_overhead)) as u64
}

impl WanLink {
    /// The link's rate as the model and the plan file are told it: the more of what one
    /// evacuation alone and four at once delivered (at most the nominal rate).
    fn model_rate_bps(&self) -> u64 {
        self.calibrated.map_or(self.rate_bps, |c| {
            wire_rate(c.flow_bps.max(c.aggregate_bps)).min(self.rate_bps)
        })
    }

    /// The link's rate for several flows together (`Link::shared_rate_bps`): what four at
    /// once delivered, if less than one alone.
    fn model_shared_rate_bps(&self) -> Option<u64> {
        self.calibrated
            .map(|c| wire_rate(c.aggregate_bps))
            .filter(|&r| r < self.model_rate_bps())
    }

    /// One evacuation's own limit, when four at once delivered clearly more than one alone
    /// (the processes, not the link, limited one flow).
    fn flow_cap_bps(&self) -> Option<u64> {
        self.calibrated
            .map(|c| wire_rate(c.flow_bps))
            .filter(|&f| (f as f64) < 0.95 * self.model_rate_bps() as f64)
    }

    fn rtt(&self) -> Duration {
        Duration::from_millis(self.rtt_ms)
    }

    fn bdp_bytes(&self) -> u64 {
        bdp_bytes(self.rate_bps, self.rtt())
    }

    /// One flow's window: what the destinations use, and what the plan file says.
    fn window_bytes(&self) -> u64 {
        if self.stated_bdp {
            self.bdp_bytes() + self.bdp_bytes() / 4
        } else {
            DEFAULT_WINDOW_BYTES
        }
    }

    fn name(&self) -> String {
        format!("{}Mbit_{}ms", self.rate_bps / 1_000_000, self.rtt_ms)
    }
}

/// One VM of the fleet: its memory, stale share planted at its evacuation, writes per
/// second.
#[derive(Clone)]
struct VmSpec {
    name: String,
    /// Guest memory, bytes.
    mem: u64,
    stale_pct: f64,
    write_rate: u64,
    /// A KVM guest of the reference VMM (`vm source --replicate --control` into `vm dest
    /// --replica-dir`) rather than an image source (`replicate --synthetic`).
    kvm: bool,
}

fn policy(schedule: &str) -> Policy {
    match schedule {
        "all-at-once" => Policy::AllAtOnce,
        "smallest-first" => Policy::SmallestFirst,
        _ => Policy::Planner,
    }
}

/// `n` VMs, memory sizes taken in turn from `mems` (a KVM guest: the smallest), stale
/// shares spread evenly over 5-40%, in a shuffled order (a fixed stride) so that the
/// fleet's order is not the size order; write rates 100-800 per second; the last `kvm` of
/// them KVM guests.
fn fleet_specs(n: usize, kvm: usize, mems: &[u64]) -> Vec<VmSpec> {
    let smallest = mems.iter().copied().min().unwrap_or(256 << 20);
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    // A stride prime to n: every share once.
    let stride = (3..).find(|&s| gcd(s, n.max(1)) == 1).unwrap_or(1);
    (0..n)
        .map(|i| {
            let k = (i * stride + 1) % n;
            let pct = if n > 1 {
                5.0 + 35.0 * k as f64 / (n - 1) as f64
            } else {
                20.0
            };
            let kvm = i + kvm >= n;
            VmSpec {
                name: format!("vm{i:02}"),
                // The reference VMM's guest runs on this machine's cores: kept small.
                mem: if kvm {
                    smallest
                } else {
                    mems.get(i % mems.len().max(1)).copied().unwrap_or(smallest)
                },
                stale_pct: (pct * 10.0).round() / 10.0,
                write_rate: 100 + 100 * (i as u64 % 8),
                kvm,
            }
        })
        .collect()
}

fn parse_links(s: &str) -> anyhow::Result<Vec<WanLink>> {
    s.split(',')
        .map(|l| {
            let (rate, rtt) = l
                .trim()
                .split_once(':')
                .with_context(|| format!("link {l:?} is not RATE:RTT_MS (e.g. 100M:20)"))?;
            let rate_bps = match rate.trim().to_ascii_uppercase().as_str() {
                r if r.ends_with('G') => r.trim_end_matches('G').parse::<u64>()? * 1_000_000_000,
                r if r.ends_with('M') => r.trim_end_matches('M').parse::<u64>()? * 1_000_000,
                r => r.parse::<u64>()?,
            };
            Ok(WanLink {
                rate_bps,
                rtt_ms: rtt.trim().parse()?,
                stated_bdp: true,
                calibrated: None,
            })
        })
        .collect()
}

fn model_link(link: WanLink) -> Link {
    Link {
        name: "wan".into(),
        rate_bps: link.model_rate_bps(),
        rtt: link.rtt(),
        shared_rate_bps: link.model_shared_rate_bps(),
        per_flow_window_bytes: link.window_bytes(),
        replication_budget_bps: None,
    }
}

/// A VM as the model is given it: name, memory, stale bytes, wire ratio.
type ModelVm = (String, u64, u64, f64);

/// The model's fleet: one link, each VM with its stale bytes and no growth.
fn model_fleet(link: WanLink, vms: &[ModelVm], costs: Costs) -> anyhow::Result<Fleet> {
    let vms = vms
        .iter()
        .map(|(name, mem, stale, wire_ratio)| {
            let mut v = Vm::idle(name.clone(), 0, *stale);
            v.wire_ratio = *wire_ratio;
            v.memory_bytes = *mem;
            v.working_set_bytes = *mem;
            v.max_rate_bps = link.flow_cap_bps();
            v
        })
        .collect();
    Ok(Fleet::new(vec![model_link(link)], vms, costs)?)
}

fn main() -> anyhow::Result<()> {
    let sizes: Vec<usize> = std::env::var("FAULTLINE_BENCH_FLEET")
        .unwrap_or_else(|_| "4,8".into())
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()
        .context("FAULTLINE_BENCH_FLEET: fleet sizes, e.g. 4,8")?;
    let mut links = parse_links(
        &std::env::var("FAULTLINE_BENCH_LINKS").unwrap_or_else(|_| "100M:20,1G:50".into()),
    )?;
    let stated_bdp = std::env::var("FAULTLINE_BENCH_STATED_BDP").map_or(true, |v| v != "0");
    for l in &mut links {
        l.stated_bdp = stated_bdp;
    }
    // Each VM's memory: FAULTLINE_BENCH_BYTES for all, else FAULTLINE_BENCH_SIZES in turn.
    let mems: Vec<u64> = match std::env::var("FAULTLINE_BENCH_BYTES") {
        Ok(_) => vec![env_size("FAULTLINE_BENCH_BYTES", 256 << 20)],
        Err(_) => std::env::var("FAULTLINE_BENCH_SIZES")
            .unwrap_or_else(|_| DEFAULT_SIZES.into())
            .split(',')
            .map(|s| parse_size(s).with_context(|| format!("FAULTLINE_BENCH_SIZES: {s:?}")))
            .collect::<anyhow::Result<_>>()?,
    };
    if mems.is_empty() || mems.iter().any(|&m| m < 16 << 20 || m % PAGE != 0) {
        bail!("FAULTLINE_BENCH_SIZES: sizes of at least 16M, in whole pages");
    }
    // The calibration's VMs: of the sizes' mean, so that what one evacuation and four
    // deliver is measured on transfers as long as the fleets' (on the smallest, at 1 Gbit/s
    // a flow's start weighed more and the model ran 5-15% long).
    let mem = (mems.iter().sum::<u64>() / mems.len() as u64) / PAGE * PAGE;
    let schedules: Vec<String> = std::env::var("FAULTLINE_BENCH_SCHEDULES")
        .map(|s| s.split(',').map(|x| x.trim().to_string()).collect())
        .unwrap_or_else(|_| SCHEDULES.iter().map(|s| s.to_string()).collect());
    if let Some(bad) = schedules.iter().find(|s| !SCHEDULES.contains(&s.as_str())) {
        bail!("FAULTLINE_BENCH_SCHEDULES: unknown schedule {bad:?} (known: {SCHEDULES:?})");
    }
    let rounds = env_size("FAULTLINE_BENCH_ROUNDS", 1).max(1);
    // `off` by default: then the bytes that cross are the stale bytes (plus QUIC's
    // overhead); with `auto` the planted pages compress to about 0.6, and the model is
    // given what each source estimated of that before its run (docs/fleet.md).
    let encoding = std::env::var("FAULTLINE_BENCH_ENCODING").unwrap_or_else(|_| "off".into());
    let certs = Certs::new();
    Identity::generate("orchestrator")?.save(
        &certs.dir.path().join("orchestrator.crt"),
        &certs.dir.path().join("orchestrator.key"),
    )?;
    let calibrating = std::env::var("FAULTLINE_BENCH_CALIBRATE").map_or(true, |v| v != "0");
    // One reference-VMM guest per fleet by default, where KVM is (each spins a vCPU, a
    // whole core of this 2-core machine).
    let kvm = match std::env::var("FAULTLINE_BENCH_KVM") {
        Ok(v) => v
            .trim()
            .parse()
            .context("FAULTLINE_BENCH_KVM: a number of VMs")?,
        Err(_) => usize::from(faultline_tests::kvm_present()),
    };
    // Source and standby each hold the guest: refuse what would not fit.
    let largest = sizes.iter().max().copied().unwrap_or(0);
    let need: u64 = fleet_specs(largest, kvm.min(largest), &mems)
        .iter()
        .map(|s| s.mem * 2)
        .sum();
    if need > 16 << 30 {
        bail!("{need} bytes of guest memory (source + standby) is more than this bench allows (16 GiB)");
    }
    for link in &mut links {
        set_bdp(link);
        if calibrating {
            let bed = Bed {
                certs: &certs,
                link: *link,
                mem,
                encoding: &encoding,
            };
            let c = calibrate(bed).with_context(|| format!("calibrating {}", link.name()))?;
            emit(&json!({
                "bench": BENCH, "case": "calibration", "link": link.name(),
                "flow_bps": c.flow_bps, "aggregate_bps": c.aggregate_bps,
                "flow_over_rate": c.flow_bps as f64 / link.rate_bps as f64,
                "aggregate_over_rate": c.aggregate_bps as f64 / link.rate_bps as f64,
            }));
            link.calibrated = Some(c);
        }
    }
    for &n in &sizes {
        for &link in &links {
            set_bdp(&link);
            let specs = fleet_specs(n, kvm.min(n), &mems);
            // The deadline: 70% of the all-at-once makespan the model predicts. Raw, from
            // the planted stale bytes. With an encoding only the sources know what their
            // pages compress to: the first run asks them (`faultline plan --live`) as it
            // starts, and the others keep its deadline.
            let mut deadline_s = if encoding == "off" {
                let planted: Vec<ModelVm> = specs
                    .iter()
                    .map(|s| {
                        (
                            s.name.clone(),
                            s.mem,
                            planted_bytes(s.mem, s.stale_pct),
                            1.0,
                        )
                    })
                    .collect();
                let f = model_fleet(link, &planted, Costs::default())?;
                let aao = plan_with(&f, &PlanOptions::new(1e9), Policy::AllAtOnce);
                Some(DEADLINE_SHARE * aao.totals.makespan_s)
            } else {
                None
            };
            let mut runs: Vec<(String, Value)> = Vec::new();
            for schedule in &schedules {
                for round in 0..rounds {
                    let bed = Bed {
                        certs: &certs,
                        link,
                        mem,
                        encoding: &encoding,
                    };
                    let (r, deadline) = run(bed, &specs, schedule, deadline_s)
                        .with_context(|| format!("{n} VMs, {}, {schedule}", link.name()))?;
                    deadline_s = Some(deadline);
                    let mut line = r.clone();
                    line["bench"] = json!(BENCH);
                    line["case"] = json!("run");
                    line["round"] = json!(round);
                    emit(&line);
                    runs.push((schedule.clone(), r));
                }
            }
            emit(&summary(n, link, &runs));
        }
    }
    Ok(())
}

/// The KVM guests' CPU throttle, percent (`FAULTLINE_BENCH_GUEST_THROTTLE`, default
/// [`GUEST_THROTTLE`]).
fn guest_throttle() -> anyhow::Result<u8> {
    let pct = env_or("FAULTLINE_BENCH_GUEST_THROTTLE", GUEST_THROTTLE)?;
    if pct > refvmm::MAX_THROTTLE_PCT {
        bail!(
            "FAULTLINE_BENCH_GUEST_THROTTLE={pct}: at most {}",
            refvmm::MAX_THROTTLE_PCT
        );
    }
    Ok(pct)
}

/// Touches per second of each image standby's stand-in guest once it runs
/// (`FAULTLINE_BENCH_TOUCH_RATE`, default [`TOUCH_RATE`]; 0: unpaced).
fn touch_rate() -> anyhow::Result<u64> {
    env_or("FAULTLINE_BENCH_TOUCH_RATE", TOUCH_RATE)
}

/// The variable's value, or `default` if it is unset; a value that does not parse is an
/// error naming it.
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v}: not a number")),
        Err(_) => Ok(default),
    }
}

/// Whether the image sources' replicators run at SCHED_IDLE, as `replicate` runs them by
/// default (`FAULTLINE_BENCH_IDLE_REPLICATORS=0`: at normal priority). On a real site each
/// source has its own host; here every VM waiting for its turn shares the two cores with the
/// transfer under way, and replicators at normal priority took enough of them to leave the
/// link below its rate (docs/fleet.md).
fn idle_replicators() -> bool {
    std::env::var("FAULTLINE_BENCH_IDLE_REPLICATORS").map_or(true, |v| v != "0")
}

/// Every process the runs start inherits the link's bandwidth-delay product, if stated.
fn set_bdp(link: &WanLink) {
    if link.stated_bdp {
        set_expected_bdp(link.rate_bps, link.rtt());
    } else {
        std::env::remove_var(ENV_EXPECTED_BDP);
    }
}

fn planted_bytes(mem: u64, pct: f64) -> u64 {
    (pct / 100.0 * (mem / PAGE) as f64) as u64 * PAGE
}

/// What every run over one link shares.
#[derive(Clone, Copy)]
struct Bed<'a> {
    certs: &'a Certs,
    link: WanLink,
    /// The calibration VMs' memory, bytes, the fleet's sizes' mean (the fleets' VMs have
    /// their own).
    mem: u64,
    encoding: &'a str,
}

/// Starts the fleet, evacuates it with `schedule`, checks every digest, compares.
/// A run's line and the deadline it was given (`deadline_s`, or if `None` the one
/// [`evacuate`] asked the sources for).
fn run(
    bed: Bed<'_>,
    specs: &[VmSpec],
    schedule: &str,
    deadline_s: Option<f64>,
) -> anyhow::Result<(Value, f64)> {
    let Bed { link, encoding, .. } = bed;
    // How idle the shared machine was just before, and what earlier runs left running:
    // at 1 Gbit/s it decides the first seconds more than the code does (docs/fleet.md).
    let machine = machine::before_run(Duration::from_millis(500));
    if let Some(why) = machine.leftovers() {
        eprintln!("fleet_evacuation: warning: {why}");
    }
    let watch = machine::CpuWatch::start();
    let (report, orch, counters, deadline_s) = evacuate(bed, specs, schedule, deadline_s)?;
    // And what the hypervisor took while it ran (the fleet's start, its replication, the
    // evacuation): a run it slowed is told apart by this, not by its figures.
    let during = watch.since();
    if let Some(c) = during.filter(|c| c.steal_cores > machine::STEAL_WARNING_CORES) {
        eprintln!(
            "fleet_evacuation: warning: the hypervisor took {:.2} cores on average during this \
             run ({} VMs, {schedule}): its figures are the machine's, not the code's",
            c.steal_cores,
            specs.len()
        );
    }
    let mut line = compare(link, specs, schedule, &report, true, &orch)?;
    line["machine_before"] = json!(machine);
    line["machine_during"] = json!(during);
    if let Some(c) = counters {
        // Toward the standbys: what the bottleneck carried and what its queue dropped.
        // The ideal on those bytes counts QUIC's headers (and any resends) as bytes that
        // had to cross; `makespan_over_ideal` counts the encoded stale bytes only.
        let wire_ideal_s = c.client_to_server.bytes as f64 * 8.0 / link.rate_bps as f64;
        if let Some(mk) = line["makespan_s"].as_f64() {
            line["makespan_over_wire_ideal"] = json!(mk / wire_ideal_s);
        }
        line["wan_delivered_bytes"] = json!(c.client_to_server.bytes);
        line["wan_delivered_packets"] = json!(c.client_to_server.packets);
        line["wan_queue_drops"] = json!(c.client_to_server.dropped_queue);
    }
    line["encoding"] = json!(encoding);
    line["idle_replicators"] = json!(idle_replicators());
    line["digests_unverified"] = report["digests_unverified"].clone();
    if !report["orchestrator_events"].is_null() {
        line["orchestrator_events"] = report["orchestrator_events"].clone();
    }
    if !report["link_timeline_mbps"].is_null() {
        for key in [
            "link_timeline_mbps",
            "link_timeline_rtt_ms",
            "link_timeline_late_ms",
        ] {
            line[key] = report[key].clone();
        }
        // Beside it, when the orchestrator held and released whom: [t_s, vm, limit].
        let limits: Vec<Value> = orch
            .stderr
            .lines()
            .filter_map(|l| l.strip_prefix("@faultline "))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["event"] == "rate" || e["event"] == "started")
            .map(|e| json!([e["t_s"], e["vm"], e["rate_cap_bps"]]))
            .collect();
        line["rate_limits"] = json!(limits);
    }
    if let Some(c) = link.calibrated {
        line["calibrated_flow_bps"] = json!(c.flow_bps);
        line["calibrated_aggregate_bps"] = json!(c.aggregate_bps);
    }
    line["deadline_from_sources"] = json!(bed.encoding != "off");
    Ok((line, deadline_s))
}

/// Measures what one evacuation alone and four at once deliver on this machine through
/// `link` (40% and 20% of each VM stale, all at once, nominal plan).
fn calibrate(bed: Bed<'_>) -> anyhow::Result<Calibration> {
    let spec = |i: usize, pct: f64| VmSpec {
        name: format!("cal{i}"),
        mem: bed.mem,
        stale_pct: pct,
        write_rate: 100,
        kvm: false,
    };
    // (stale bytes, switchover, finish) of each VM of a run.
    let timeline = |report: &Value| -> anyhow::Result<Vec<(f64, f64, f64)>> {
        report["vms"]
            .as_array()
            .context("the report has no vms")?
            .iter()
            .map(|v| {
                let m = &v["measured"];
                // As its encoding put them on the wire (1 with `--encoding off`): the
                // model moves a VM's stale bytes × its wire ratio at these rates.
                let ratio = f64_of(&v["wire_ratio"]).unwrap_or(1.0);
                Ok((
                    v["pages_stale"].as_u64().context("no pages_stale")? as f64
                        * PAGE as f64
                        * ratio,
                    f64_of(&m["switchover_s"]).context("no switchover")?,
                    f64_of(&m["finish_s"]).context("no finish")?,
                ))
            })
            .collect()
    };
    // The time bytes moved: the model adds its tail (the answer's round trip and the ends'
    // last work) after every VM's last byte, which a rate over switchover → finish would
    // count a second time.
    let tail = Costs::default().tail_s(&model_link(bed.link));
    let alone = evacuate(bed, &[spec(0, 40.0)], "all-at-once", Some(3600.0))?;
    let one = timeline(&alone.0)?;
    let flow_bps = one[0].0 * 8.0 / (one[0].2 - one[0].1 - tail).max(1e-3);
    let specs: Vec<VmSpec> = (0..4).map(|i| spec(i, 20.0)).collect();
    let four = evacuate(bed, &specs, "all-at-once", Some(3600.0))?;
    let all = timeline(&four.0)?;
    let bytes: f64 = all.iter().map(|v| v.0).sum();
    let first = all.iter().map(|v| v.1).fold(f64::INFINITY, f64::min);
    let last = all.iter().map(|v| v.2).fold(0.0, f64::max);
    let aggregate_bps = bytes * 8.0 / (last - first - tail).max(1e-3);
    Ok(Calibration {
        flow_bps: flow_bps as u64,
        aggregate_bps: aggregate_bps as u64,
    })
}

/// Waits (at most 3 minutes) until every source's replication lags by less than its bound
/// (`faultline_replicate_stale_bytes` on its `--metrics-listen`). Without it the
/// first sources asked to evacuate spent seconds finishing their first pass, 16 of them
/// sharing the machine's two cores: a setup the model, which gives every VM the median one,
/// cannot know.
fn wait_caught_up(metrics: &[(String, f64)]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(180);
    for (addr, lag) in metrics {
        loop {
            let text = faultline_tests::http::scrape(addr);
            let stale = text
                .lines()
                .find(|l| l.starts_with("faultline_replicate_stale_bytes{"))
                .and_then(|l| l.split_whitespace().last())
                .and_then(|v| v.parse::<f64>().ok());
            match stale {
                Some(b) if b <= *lag => break,
                _ if Instant::now() > deadline => {
                    anyhow::bail!("replication at {addr} never caught up: {stale:?} bytes stale")
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
    Ok(())
}

/// Starts the fleet and evacuates it with `schedule` by `deadline_s` (`None`:
/// [`DEADLINE_SHARE`] of the all-at-once makespan `faultline plan --live` predicts from the
/// sources' figures as the run starts); every digest must be equal. The orchestrator's
/// report, its process, the emulator's counters, the deadline.
fn evacuate(
    bed: Bed<'_>,
    specs: &[VmSpec],
    schedule: &str,
    deadline_s: Option<f64>,
) -> anyhow::Result<(Value, Finished, Option<wan_emu::WanCounters>, f64)> {
    let Bed {
        certs,
        link,
        encoding,
        ..
    } = bed;
    let cfg = LinkConfig::new(link.rtt(), link.rate_bps);
    let mut wan: Option<WanEmulator> = None;
    let mut pairs = Vec::new();
    let mut metrics = Vec::new();
    for s in specs {
        let size = s.mem.to_string();
        // A KVM guest: 1 vCPU writing an eighth of a working set of half its memory
        // (`--stale-pct` plants its share, up to 40%, in the working set).
        let ws = (s.mem / 2).to_string();
        let guest = [
            "--size",
            &size,
            "--vcpus",
            "1",
            "--program",
            "scattered",
            "--working-set",
            &ws,
            // Often enough that a starved vCPU still reaches one when its VMM pauses it.
            "--report-every",
            "4096",
        ];
        let dir = ShmDir::new(&s.name);
        let at_standby = [
            "--replica-dir",
            &dir.arg(),
            "--vm-id",
            &s.name,
            "--run-secs",
            "1",
        ];
        let (throttle, touches) = (guest_throttle()?.to_string(), touch_rate()?.to_string());
        let guest = [&guest[..], &["--cpu-throttle", &throttle]].concat();
        let standby = if s.kvm {
            DestProcess::vm(certs, &[&guest[..], &at_standby].concat())
        } else {
            DestProcess::standby(
                certs,
                "127.0.0.1:0",
                &[
                    &["--size", &size, "--touch-rate", &touches][..],
                    &at_standby[..4],
                ]
                .concat(),
            )
        };
        let upstream = standby.addr.parse().context("the standby's address")?;
        let any = "127.0.0.1:0".parse().context("an address")?;
        let relay = match &mut wan {
            None => {
                let w = WanEmulator::start(any, upstream, cfg.clone())?;
                let a = w.local_addr();
                wan = Some(w);
                a
            }
            Some(w) => w.add_route(any, upstream)?,
        };
        let port = free_udp_port();
        let control = format!("127.0.0.1:{port}");
        let orch = certs.cert("orchestrator");
        if s.kvm {
            let pct = s.stale_pct.to_string();
            let relay = relay.to_string();
            let args = [
                "--vm-id",
                &s.name,
                "--replicate",
                "--stale-pct",
                &pct,
                "--control",
                &control,
                "--control-peer-cert",
                &orch,
                "--evacuate-connect",
                &relay,
                "--encoding",
                encoding,
            ];
            // Throttled, its vCPU leaves an idle-priority replicator room.
            let idle: &[&str] = if idle_replicators() && guest_throttle()? > 0 {
                &["--replicator-idle-priority"]
            } else {
                &[]
            };
            let source =
                Background::vm_source(certs, &standby.addr, &[&guest[..], &args, idle].concat());
            pairs.push((s.clone(), port, standby, source, dir));
            continue;
        }
        let scrape = format!("127.0.0.1:{}", free_tcp_port());
        let args = [
            "--metrics-listen",
            &scrape,
            "--synthetic",
            &size,
            "--vm-id",
            &s.name,
            "--write-rate",
            &s.write_rate.to_string(),
            "--stale-pct",
            &s.stale_pct.to_string(),
            "--control",
            &control,
            "--control-peer-cert",
            &orch,
            "--evacuate-connect",
            &relay.to_string(),
            "--encoding",
            encoding,
        ];
        let source = Background::replicate_at(certs, &standby.addr, &args, !idle_replicators());
        pairs.push((s.clone(), port, standby, source, dir));
        // Caught up: a lag of 1% of memory, plus two seconds of the guest's writes.
        let lag = s.mem as f64 / 100.0 + 2.0 * s.write_rate as f64 * PAGE as f64;
        metrics.push((scrape, lag));
    }
    // The replicas filled (most of the synthetic image is not zero pages), then every
    // replication caught up, as in normal times when the warning comes.
    // (A KVM guest's replica stays sparse, its memory mostly zero: its source's
    // `--stale-pct` waits for replication to catch up at the evacuation.)
    for (s, _, _, _, dir) in &pairs {
        if !s.kvm {
            wait_replicated(dir, s.mem / PAGE, 0.6);
        }
    }
    wait_caught_up(&metrics)?;
    std::thread::sleep(Duration::from_secs(1));
    let deadline_s = match deadline_s {
        Some(d) => d,
        None => DEADLINE_SHARE * live_all_at_once_s(&plan_file(certs, link, 3600.0, &pairs)?)?,
    };
    let plan = plan_file(certs, link, deadline_s, &pairs)?;
    // FAULTLINE_BENCH_TIMELINE=1: the link's rate every 50 ms (from the first evacuation
    // bytes: replication runs beside the emulator), to see where a schedule leaves it idle.
    let (orch, timeline) = with_link_timeline(wan.as_ref(), || {
        Background::spawn(&[
            "evacuate",
            "--json",
            "--progress",
            "--schedule",
            schedule,
            "--plan",
            &plan.display().to_string(),
        ])
        .wait(TIMEOUT)
    });
    let mut report = orch.json.clone();
    if !timeline.is_empty() {
        report["link_timeline_mbps"] = json!(timeline.mbps);
        report["link_timeline_rtt_ms"] = json!(timeline.rtt_ms);
        report["link_timeline_late_ms"] = json!(timeline.late_ms);
    }
    // FAULTLINE_BENCH_EVENTS=1: the orchestrator's event lines (starts, rate limits,
    // switchovers, done), to line up with the timeline.
    if std::env::var_os("FAULTLINE_BENCH_EVENTS").is_some() {
        let events: Vec<Value> = orch
            .stderr
            .lines()
            .filter_map(|l| serde_json::from_str(l.strip_prefix("@faultline ")?).ok())
            .collect();
        report["orchestrator_events"] = json!(events);
    }
    let mut failures = Vec::new();
    let mut unverified = Vec::new();
    for (s, _, standby, source, _) in pairs {
        let src = source.wait(TIMEOUT);
        if !src.status.success() {
            // Before the standby's wait, which may not end if its source failed.
            eprintln!("{}: the source failed: {}", s.name, src.stderr);
        }
        // A standby ends within seconds of its source (it hashes its memory); one that does
        // not is hung, and its wait panics with what its threads were blocked in.
        let dst = standby.wait(STANDBY_AFTER_SOURCE);
        // What the setup was made of, from the source's own report.
        if let Some(vms) = report["vms"].as_array_mut() {
            if let Some(v) = vms.iter_mut().find(|v| v["name"] == s.name.as_str()) {
                v["source_prep"] = src.json["prep"].clone();
                v["source_downtime_ms"] = src.json["downtime_ms"].clone();
                // Its connection's packets, losses and congestion window (a `vm source`
                // report has them at its top).
                v["source_path"] = if s.kvm {
                    src.json["path"].clone()
                } else {
                    src.json["evacuation"]["path"].clone()
                };
                // Times the evacuation's connection was judged lost and the session resumed
                // on a new one (docs/recovery.md), as the standby counted them.
                v["pauses"] = dst.json["pauses"].clone();
            }
        }
        let digests = |src: &Finished, dst: &Finished| {
            if !s.kvm {
                return check_digests(src, dst).map(|()| true);
            }
            // A vCPU paused off a progress report (its VMM gave up waiting for one after
            // 2 s, a vCPU starved on this machine) finishes the write it was in at the
            // standby before it hashes: the two digests are then not of the same memory.
            let off_report = src.json["paused_at_report"]
                .as_array()
                .is_some_and(|a| a.iter().any(|v| v != true));
            if off_report {
                return Ok(false);
            }
            // The guest's memory at switchover, hashed by both VMMs.
            let (a, b) = (&src.json["memory_digest"], &dst.json["switchover_digest"]);
            if !a.is_string() || a != b {
                bail!("digests differ: source {a} standby {b}");
            }
            Ok(true)
        };
        match check(&src, if s.kvm { "vm source" } else { "replicate" })
            .and_then(|()| check(&dst, "standby"))
            .and_then(|()| digests(&src, &dst))
        {
            Ok(true) => {}
            Ok(false) => unverified.push(s.name.clone()),
            Err(e) => failures.push(format!("{}: {e:#}", s.name)),
        }
    }
    // Reported in the run's line (`digests_unverified`).
    report["digests_unverified"] = json!(unverified);
    if !failures.is_empty() {
        bail!("memory not equal on both sides: {}", failures.join("; "));
    }
    if report["ok"] != true {
        bail!("faultline evacuate failed: {} {}", report, orch.stderr);
    }
    let counters = wan.take().map(|w| w.counters());
    Ok((report, orch, counters, deadline_s))
}

/// The all-at-once makespan `faultline plan --live` predicts for `plan` from what its
/// sources measure now (their stale bytes, the wire ratio their encoding will give).
fn live_all_at_once_s(plan: &std::path::Path) -> anyhow::Result<f64> {
    // Generous: 16 sources and a KVM guest share two cores, and a source planned as
    // failed would leave the baseline, and the deadline, short.
    let p = Background::spawn(&[
        "plan",
        "--live",
        "--json",
        "--connect-timeout",
        "30",
        &plan.display().to_string(),
    ])
    .wait(TIMEOUT);
    check(&p, "plan --live")?;
    let unheard = p.json["unreachable"]
        .as_array()
        .is_some_and(|u| !u.is_empty());
    if p.json["live"] != true || unheard {
        bail!("plan --live did not hear every source: {}", p.json);
    }
    f64_of(&p.json["baselines"]["all_at_once"]["makespan_s"])
        .with_context(|| format!("no all-at-once makespan in {}", p.json))
}

/// The plan file: one link as emulated, the VMs' control endpoints, the deadline.
fn plan_file(
    certs: &Certs,
    link: WanLink,
    deadline_s: f64,
    pairs: &[(VmSpec, u16, DestProcess, Background, ShmDir)],
) -> anyhow::Result<PathBuf> {
    let mut s = format!(
        "deadline = {deadline_s:.3}\ncert = {:?}\nkey = {:?}\npeer_cert = {:?}\n\n\
         [[link]]\nname = \"wan\"\nrate_bps = {}\nrtt_ms = {}\nwindow_bytes = {}\n",
        certs.cert("orchestrator"),
        certs.key("orchestrator"),
        certs.cert("source"),
        link.model_rate_bps(),
        link.rtt_ms,
        link.window_bytes(),
    );
    if let Some(shared) = link.model_shared_rate_bps() {
        s += &format!("shared_rate_bps = {shared}\n");
    }
    for (spec, port, ..) in pairs {
        s += &format!(
            "\n[[vm]]\nname = {:?}\nlink = \"wan\"\nmemory_bytes = {}\ncontrol = \"127.0.0.1:{port}\"\n",
            spec.name, spec.mem
        );
        if let Some(cap) = link.flow_cap_bps() {
            s += &format!("max_rate_bps = {cap}\n");
        }
    }
    let path = certs.dir.path().join("fleet.toml");
    std::fs::write(&path, s)?;
    Ok(path)
}

fn f64_of(v: &Value) -> Option<f64> {
    v.as_f64()
}

/// Per VM and per run: the model on the fleet as measured against the measured timeline.
fn compare(
    link: WanLink,
    specs: &[VmSpec],
    schedule: &str,
    report: &Value,
    digests_equal: bool,
    orch: &Finished,
) -> anyhow::Result<Value> {
    let vms = report["vms"].as_array().context("the report has no vms")?;
    let deadline_s = f64_of(&report["deadline_s"]).context("no deadline_s")?;
    let mut measured_fleet = Vec::new();
    let mut setups = Vec::new();
    for v in vms {
        let name = v["name"].as_str().context("a vm without a name")?;
        let pages = v["pages_stale"].as_u64().context("no pages_stale")?;
        // What its source estimated its encoding would make of a page before it ran (1
        // with `--encoding off`): the model is given what an orchestrator knows then.
        let ratio = f64_of(&v["wire_ratio_at_start"]).unwrap_or(1.0);
        let mem = specs
            .iter()
            .find(|s| s.name == name)
            .with_context(|| format!("vm {name} is not in the fleet"))?
            .mem;
        measured_fleet.push((name.to_string(), mem, pages * PAGE, ratio));
        let m = &v["measured"];
        if let (Some(start), Some(switchover)) = (f64_of(&m["start_s"]), f64_of(&m["switchover_s"]))
        {
            setups.push(switchover - start);
        }
    }
    // The fleet as measured: its stale bytes, and the setup its VMs took (the median; the
    // model's default, 3 RTT + 50 ms, leaves out the source's own preparation).
    let mut costs = Costs::default();
    let setup_s = (!setups.is_empty()).then(|| median(&setups));
    if let Some(s) = setup_s {
        let rtts = costs.handshake_rtts * link.rtt_ms as f64 / 1e3;
        costs.switchover = Duration::from_secs_f64((s - rtts).max(0.0));
    }
    let f = model_fleet(link, &measured_fleet, costs)?;
    let predicted = plan_with(&f, &PlanOptions::new(deadline_s), policy(schedule));
    // The simulator on the schedule as it ran: each VM released at its measured start
    // (the orchestrator re-plans from measurements, so its starts differ from the plan's).
    let starts: Vec<f64> = vms
        .iter()
        .map(|v| f64_of(&v["measured"]["start_s"]).unwrap_or(0.0))
        .collect();
    let mut order: Vec<usize> = (0..vms.len()).collect();
    order.sort_by(|&a, &b| starts[a].total_cmp(&starts[b]));
    let replayed = simulate(
        &f,
        &Schedule {
            links: vec![LinkSchedule {
                order,
                concurrency: vms.len(),
                sharing: Sharing::Fair,
                prestart: false,
            }],
        },
        &SimOptions::replay(starts),
    )
    .context("replaying the run in the simulator")?;
    let mut replay_errors = Vec::new();
    // The orchestrator's own prediction at time 0, from the sources' figures then: what an
    // operator is told in advance.
    let mut orch_errors = Vec::new();
    let mut errors = Vec::new();
    let (mut pred_fin, mut meas_fin) = (Vec::new(), Vec::new());
    let mut same_order = true;
    for (i, v) in vms.iter().enumerate() {
        let p = &predicted.vms[i];
        let m = &v["measured"];
        let meas = f64_of(&m["finish_s"]).context("no measured finish")?;
        let pred = p.finish_s.context("no predicted finish")?;
        let err = (meas - pred) / pred;
        errors.push(err.abs());
        if let Some(o) = f64_of(&v["planned"]["finish_s"]).filter(|&o| o > 0.0) {
            orch_errors.push(((meas - o) / o).abs());
        }
        let replay = replayed.vms[i].finish_s;
        let replay_err = (meas - replay) / replay;
        replay_errors.push(replay_err.abs());
        pred_fin.push(pred);
        meas_fin.push(meas);
        if p.order != v["planned"]["order"].as_u64().map(|o| o as usize) {
            same_order = false;
        }
        emit(&json!({
            "bench": BENCH, "case": "vm", "link": link.name(), "vms": vms.len(),
            "schedule": schedule, "vm": v["name"],
            "memory_bytes": measured_fleet[i].1,
            "stale_bytes": measured_fleet[i].2, "bytes_sent": v["bytes_sent"],
            "wire_ratio_estimated": measured_fleet[i].3, "wire_ratio": v["wire_ratio"],
            "order_predicted": p.order, "order_run": v["planned"]["order"],
            "start_predicted_s": p.start_s, "start_s": m["start_s"],
            "switchover_predicted_s": p.switchover_s, "switchover_s": m["switchover_s"],
            "finish_predicted_s": pred, "finish_s": meas,
            // When, by its source's last report, its last byte left: from there to
            // `finish_s` is its end (the last installs, the answer, the report).
            "last_byte_s": m["last_byte_s"],
            "orchestrator_finish_s": v["planned"]["finish_s"],
            "rel_error": err,
            "finish_replayed_s": replay, "replay_rel_error": replay_err,
            // The source's preparation (catch-up, connect, planting) and its pause until
            // the standby's answer, both inside the setup.
            "source_prep_ms": v["source_prep"], "source_downtime_ms": v["source_downtime_ms"],
            "pauses": v["pauses"],
            "source_path": v["source_path"],
        }));
    }
    let n = vms.len() as f64;
    let mean = |x: &[f64]| x.iter().sum::<f64>() / n;
    let max = |x: &[f64]| x.iter().copied().fold(0.0, f64::max);
    // What had to cross: each VM's stale bytes as its encoding made them (its measured wire
    // ratio; raw, 4,097/4,096: the kind byte), frame and packet headers left out.
    let stale: u64 = measured_fleet.iter().map(|(_, _, b, _)| b).sum();
    let crossing: u64 = vms
        .iter()
        .zip(&measured_fleet)
        .map(|(v, (_, _, b, _))| (*b as f64 * f64_of(&v["wire_ratio"]).unwrap_or(1.0)) as u64)
        .sum();
    let ideal_s = crossing as f64 * 8.0 / link.rate_bps as f64;
    let (mk_pred, mk_meas) = (max(&pred_fin), max(&meas_fin));
    let saved = meas_fin.iter().filter(|&&t| t <= deadline_s).count();
    let saved_pred = pred_fin.iter().filter(|&&t| t <= deadline_s).count();
    let sent: u64 = vms.iter().filter_map(|v| v["bytes_sent"].as_u64()).sum();
    Ok(json!({
        "link": link.name(), "vms": vms.len(), "schedule": schedule,
        "memory_bytes": measured_fleet.iter().map(|v| v.1).sum::<u64>(),
        "stale_bytes": stale, "bytes_to_cross": crossing,
        "udp_bytes_sent": sent,
        "error_median": median(&errors), "error_worst": max(&errors),
        "replay_error_median": median(&replay_errors),
        "replay_error_worst": max(&replay_errors),
        "orchestrator_error_median": (!orch_errors.is_empty()).then(|| median(&orch_errors)),
        "orchestrator_error_worst": (!orch_errors.is_empty()).then(|| max(&orch_errors)),
        "replay_makespan_error": (mk_meas - replayed.makespan_s()) / replayed.makespan_s(),
        "makespan_predicted_s": mk_pred, "makespan_s": mk_meas,
        "makespan_error": (mk_meas - mk_pred) / mk_pred,
        "mean_completion_predicted_s": mean(&pred_fin), "mean_completion_s": mean(&meas_fin),
        "ideal_s": ideal_s, "makespan_over_ideal": mk_meas / ideal_s,
        "deadline_s": deadline_s, "saved": saved, "saved_predicted": saved_pred,
        // The orchestrator's rate limits (VMs held behind those that fill an in-order link,
        // and released): how often it paced the run.
        "rate_events": orch.stderr.matches("\"event\":\"rate\"").count(),
        "orchestrator_planned_makespan_s": report["totals"]["planned_makespan_s"],
        "setup_median_s": setup_s,
        "same_order_as_run": same_order, "digests_equal": digests_equal,
        "orchestrator_stderr_lines": orch.stderr.lines().count(),
    }))
}

/// Per fleet size and link: the three schedules ranked, planner against all at once, the
/// issue's targets.
fn summary(n: usize, link: WanLink, runs: &[(String, Value)]) -> Value {
    let med = |schedule: &str, key: &str| -> Option<f64> {
        let xs: Vec<f64> = runs
            .iter()
            .filter(|(s, _)| s == schedule)
            .filter_map(|(_, r)| r[key].as_f64())
            .collect();
        (!xs.is_empty()).then(|| median(&xs))
    };
    let rank = |key: &str| -> Vec<String> {
        let mut v: Vec<(f64, &str)> = SCHEDULES
            .iter()
            .filter_map(|s| med(s, key).map(|x| (x, *s)))
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v.into_iter().map(|(_, s)| s.to_string()).collect()
    };
    let (rank_model, rank_real) = (
        rank("mean_completion_predicted_s"),
        rank("mean_completion_s"),
    );
    // Beside the strict ranking: no pair of schedules the model orders one way ran the
    // other way by more than RANK_TIE (two schedules that make the same decisions, such as
    // the planner and smallest-first on a small fleet, tie within the machine's noise).
    let ranked_within_tie = SCHEDULES.iter().all(|a| {
        SCHEDULES.iter().all(|b| {
            let pair = (
                med(a, "mean_completion_predicted_s"),
                med(b, "mean_completion_predicted_s"),
                med(a, "mean_completion_s"),
                med(b, "mean_completion_s"),
            );
            match pair {
                (Some(pa), Some(pb), Some(ma), Some(mb)) if pa < pb => ma <= mb * (1.0 + RANK_TIE),
                _ => true,
            }
        })
    });
    let all_errors: Vec<f64> = runs
        .iter()
        .filter_map(|(_, r)| r["error_worst"].as_f64())
        .collect();
    let mk_errors: Vec<f64> = runs
        .iter()
        .filter_map(|(_, r)| r["makespan_error"].as_f64().map(f64::abs))
        .collect();
    let ratio =
        |key: &str| -> Option<f64> { Some(med("planner", key)? / med("all-at-once", key)?) };
    let worst_vm = all_errors.iter().copied().fold(0.0, f64::max);
    let worst_mk = mk_errors.iter().copied().fold(0.0, f64::max);
    let mean_ratio = ratio("mean_completion_s");
    let planner_over_ideal = med("planner", "makespan_over_ideal");
    let (saved_p, saved_a) = (med("planner", "saved"), med("all-at-once", "saved"));
    let errs = Summary::from_samples(
        runs.iter()
            .filter_map(|(_, r)| r["error_median"].as_f64())
            .collect(),
    );
    json!({
        "bench": BENCH, "case": "summary", "vms": n, "link": link.name(),
        "runs": runs.len(),
        "ranking_model": rank_model, "ranking_measured": rank_real,
        "same_ranking": rank_model == rank_real,
        "same_ranking_within_tie": ranked_within_tie,
        "planner_over_all_at_once_mean_completion": mean_ratio,
        "planner_over_all_at_once_makespan_over_ideal":
            ratio("makespan_over_ideal"),
        "planner_makespan_over_ideal": planner_over_ideal,
        "all_at_once_makespan_over_ideal": med("all-at-once", "makespan_over_ideal"),
        "planner_makespan_over_wire_ideal": med("planner", "makespan_over_wire_ideal"),
        "replay_worst_vm_error": runs.iter().filter_map(|(_, r)| r["replay_error_worst"].as_f64()).fold(0.0, f64::max),
        "replay_worst_makespan_error": runs.iter().filter_map(|(_, r)| r["replay_makespan_error"].as_f64().map(f64::abs)).fold(0.0, f64::max),
        "saved_planner": saved_p, "saved_all_at_once": saved_a,
        "saved_smallest_first": med("smallest-first", "saved"),
        "per_run_median_error": errs.to_json(),
        "worst_vm_error": worst_vm, "worst_makespan_error": worst_mk,
        "targets": {
            "vm_error_le_10pct": worst_vm <= TARGET_VM_ERR,
            "makespan_error_le_10pct": worst_mk <= TARGET_MAKESPAN_ERR,
            "same_ranking": rank_model == rank_real,
            "planner_mean_completion_le_0.7x_all_at_once":
                mean_ratio.is_some_and(|r| r <= TARGET_MEAN_RATIO),
            "planner_makespan_le_1.05x_ideal":
                planner_over_ideal.is_some_and(|r| r <= TARGET_OVER_IDEAL),
            "planner_saved_ge_all_at_once":
                matches!((saved_p, saved_a), (Some(p), Some(a)) if p >= a),
        },
    })
}
