//! How fast the fleet model runs: the flow-level simulator and the planner on 10,000 VMs
//! over 100 links (the target: a simulation in under a second), with the predictions they
//! make, so a change to the model shows up here too.
//!
//! A deterministic fleet (seeded): links of 100 Mbit/s, 1 Gbit/s and 10 Gbit/s at 5-150 ms,
//! half with faultline's default window and half with 1.25 × their BDP; VMs of 2-64 GiB
//! memory and up to 256 GiB of disk, 0.2-5% stale, dirtying 0-200 Mbit/s, working sets of
//! a twentieth of the rest, priorities 1-5. The deadline is 15 minutes: the 10 Gbit/s
//! links can move everything by then, the slower ones cannot, so the planner has choices
//! to make.
//!
//! Cases (a JSON line each, `"case"` says which; times in ms over `rounds` rounds:
//! `median_ms`, `p99_ms` nearest rank, `min_ms`, `max_ms`):
//! * `ideal_pass`: the baseline: one pass over the VMs summing stale bytes per link (what
//!   any model costs at least);
//! * `sim_planned`, `sim_all_at_once`, `sim_one_at_a_time`: one simulation of the planner's
//!   schedule and of the two baselines; `meets_target` is `median_ms` < 1000;
//! * `plan`: the whole planner (every candidate on every link, simulated against the
//!   margin; then the chosen schedule and the baselines at both rates);
//! * `replan`: a re-plan a minute in, every VM measured (done, transferring, in setup or
//!   waiting), as the orchestrator makes one every second (`replan_keeping`);
//! * `sim_all_at_once_one_link`: the simulator's worst case, all 10,000 VMs at once on one
//!   link (every event recomputes 10,000 rates).
//!
//! Environment: `FAULTLINE_BENCH_ROUNDS` (default 11), `FAULTLINE_BENCH_VMS` (10000),
//! `FAULTLINE_BENCH_LINKS` (100).

use std::time::{Duration, Instant};

use faultline_benches::stats::{median, nearest_rank};
use faultline_benches::{emit, env_size};
use fleet::plan::{
    all_at_once, one_at_a_time_smallest_first, plan, replan_keeping, Measured, Plan, PlanOptions,
    Policy, VmMeasure, VmState,
};
use fleet::sim::{simulate, Outcome, Schedule, SimOptions};
use fleet::{Costs, Fleet, Link, Vm};
use serde_json::{json, Map, Value};

const BENCH: &str = "fleet_sim";
const TARGET_MS: f64 = 1000.0;

/// splitmix64: a small deterministic generator, so every run simulates the same fleet.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn fleet(vms: usize, links: usize, seed: u64) -> Fleet {
    const GIB: u64 = 1 << 30;
    let mut rng = Rng(seed);
    let links: Vec<Link> = (0..links)
        .map(|i| {
            let rate_bps = [100_000_000, 1_000_000_000, 10_000_000_000][rng.range(0, 3) as usize];
            let rtt = Duration::from_millis(rng.range(5, 151));
            let bdp = rate_bps as f64 / 8.0 * rtt.as_secs_f64();
            let window = if rng.range(0, 2) == 0 {
                fleet::model::DEFAULT_WINDOW_BYTES
            } else {
                (1.25 * bdp) as u64
            };
            Link {
                name: format!("link-{i}"),
                rate_bps,
                rtt,
                shared_rate_bps: None,
                per_flow_window_bytes: window,
                replication_budget_bps: None,
            }
        })
        .collect();
    let n_links = links.len() as u64;
    let vms = (0..vms)
        .map(|i| {
            let memory = rng.range(2, 65) * GIB;
            let disk = rng.range(0, 257) * GIB;
            let total = memory + disk;
            let stale = (total as f64 * (0.002 + 0.048 * rng.unit())) as u64;
            let ws = stale + (total - stale) / 20;
            Vm {
                name: format!("vm-{i}"),
                link: rng.range(0, n_links) as usize,
                memory_bytes: memory,
                disk_bytes: disk,
                stale_bytes: stale,
                dirty_rate_bps: rng.range(0, 201) * 1_000_000,
                working_set_bytes: ws,
                replication_budget_bps: rng.range(0, 101) * 1_000_000,
                weight: rng.range(1, 6) as f64,
                max_rate_bps: None,
                // Raw, as when this bench's figures were first taken.
                wire_ratio: 1.0,
            }
        })
        .collect();
    Fleet::new(links, vms, Costs::default()).expect("a consistent generated fleet")
}

/// Runs `f` `rounds` times: its last result and the times in ms.
fn time<T>(rounds: usize, mut f: impl FnMut() -> T) -> (T, Vec<f64>) {
    let mut times = Vec::with_capacity(rounds);
    let mut last = None;
    for _ in 0..rounds {
        let t = Instant::now();
        let r = std::hint::black_box(f());
        times.push(t.elapsed().as_secs_f64() * 1e3);
        last = Some(r);
    }
    (last.expect("at least one round"), times)
}

fn line(case: &str, f: &Fleet, times: &[f64]) -> Map<String, Value> {
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mut m = Map::new();
    m.insert("bench".into(), json!(BENCH));
    m.insert("case".into(), json!(case));
    m.insert("vms".into(), json!(f.vms.len()));
    m.insert("links".into(), json!(f.links.len()));
    m.insert("rounds".into(), json!(times.len()));
    m.insert("median_ms".into(), json!(median(times)));
    m.insert("p99_ms".into(), json!(nearest_rank(&sorted, 99.0)));
    m.insert("min_ms".into(), json!(sorted[0]));
    m.insert("max_ms".into(), json!(sorted[sorted.len() - 1]));
    m
}

fn sim_line(case: &str, f: &Fleet, s: &Schedule, rounds: usize, deadline: f64) {
    let (o, times): (Outcome, _) = time(rounds, || {
        simulate(f, s, &SimOptions::default()).expect("a schedule of this fleet")
    });
    let mut m = line(case, f, &times);
    m.insert("target_ms".into(), json!(TARGET_MS));
    m.insert("meets_target".into(), json!(median(&times) < TARGET_MS));
    m.insert("makespan_s".into(), json!(o.makespan_s()));
    m.insert("mean_completion_s".into(), json!(o.mean_completion_s()));
    m.insert("deadline_s".into(), json!(deadline));
    m.insert("saved".into(), json!(o.saved(deadline)));
    m.insert("saved_weight".into(), json!(o.saved_weight(f, deadline)));
    emit(&Value::Object(m));
}

/// What an orchestrator would measure `now_s` into plan `p`: the VMs done by then, those
/// under way (in setup before their switchover, else transferring with the share of their
/// bytes the plan says is left), and the rest waiting.
fn measured_at(f: &Fleet, p: &Plan, now_s: f64) -> Measured {
    let vms = p
        .vms
        .iter()
        .zip(&f.vms)
        .map(|(v, vm)| {
            let (start, switchover, finish) = (
                v.start_s.unwrap_or(f64::INFINITY),
                v.switchover_s.unwrap_or(f64::INFINITY),
                v.finish_s.unwrap_or(f64::INFINITY),
            );
            let state = if finish <= now_s {
                VmState::Done { finished_s: finish }
            } else if switchover <= now_s {
                let left = (finish - now_s) / (finish - switchover);
                VmState::Transferring {
                    remaining_bytes: (vm.stale_bytes as f64 * left) as u64,
                    switchover_s: switchover,
                    started_s: start,
                }
            } else if start <= now_s {
                VmState::Setup {
                    started_s: start,
                    stale_bytes: vm.stale_bytes,
                }
            } else {
                VmState::Waiting {
                    stale_bytes: vm.stale_at(now_s) as u64,
                }
            };
            VmMeasure {
                vm: v.name.clone(),
                state,
                wire_ratio: None,
            }
        })
        .collect();
    Measured {
        now_s,
        links: Vec::new(),
        vms,
    }
}

fn main() {
    let rounds = env_size("FAULTLINE_BENCH_ROUNDS", 11).max(1) as usize;
    let n_vms = env_size("FAULTLINE_BENCH_VMS", 10_000) as usize;
    let n_links = env_size("FAULTLINE_BENCH_LINKS", 100).max(1) as usize;
    let f = fleet(n_vms, n_links, 0xF1EE7);
    let deadline = 900.0;
    eprintln!(
        "[{BENCH}] {} VMs over {} links, deadline {deadline:.0} s, {rounds} rounds",
        f.vms.len(),
        f.links.len()
    );

    let (_, times) = time(rounds, || {
        let mut per_link = vec![0.0f64; f.links.len()];
        for v in &f.vms {
            per_link[v.link] += v.stale_bytes as f64;
        }
        per_link
    });
    emit(&Value::Object(line("ideal_pass", &f, &times)));

    let opts = PlanOptions::new(deadline);
    let (p, times) = time(rounds, || plan(&f, &opts));
    let mut m = line("plan", &f, &times);
    m.insert("deadline_s".into(), json!(deadline));
    m.insert("margin".into(), json!(opts.margin));
    m.insert("saved".into(), json!(p.totals.saved));
    m.insert("saved_weight".into(), json!(p.totals.saved_weight));
    m.insert("makespan_s".into(), json!(p.totals.makespan_s));
    m.insert("ideal_makespan_s".into(), json!(p.totals.ideal_makespan_s));
    m.insert(
        "mean_completion_s".into(),
        json!(p.totals.mean_completion_s),
    );
    m.insert(
        "all_at_once_saved_weight".into(),
        json!(p.baselines.all_at_once.saved_weight),
    );
    m.insert(
        "one_at_a_time_saved_weight".into(),
        json!(p.baselines.one_at_a_time_smallest_first.saved_weight),
    );
    // The planner's decision time against what it plans (the target: at most 1%
    // of the evacuation, here up to the deadline, when the power goes), and against the
    // orchestrator's re-plan interval (it re-plans every second).
    let decision_s = median(&times) / 1000.0;
    let evacuation_s = p.totals.makespan_s.min(deadline);
    m.insert(
        "decision_over_evacuation".into(),
        json!(decision_s / evacuation_s),
    );
    m.insert(
        "decision_meets_target".into(),
        json!(decision_s / evacuation_s <= 0.01),
    );
    m.insert("decision_over_replan_interval".into(), json!(decision_s));
    emit(&Value::Object(m));

    // A re-plan a minute in, as the orchestrator makes one every second: every VM
    // measured (done, transferring half-way, in setup, or waiting with its stale bytes).
    let measured = measured_at(&f, &p, 60.0);
    let (r, times) = time(rounds, || {
        replan_keeping(&f, &opts, &measured, Policy::Planner, &p.schedule)
    });
    let mut m = line("replan", &f, &times);
    m.insert("now_s".into(), json!(measured.now_s));
    m.insert("measured_vms".into(), json!(measured.vms.len()));
    let done = measured
        .vms
        .iter()
        .filter(|v| matches!(v.state, VmState::Done { .. }))
        .count();
    m.insert("done_by_now".into(), json!(done));
    m.insert("ok".into(), json!(r.is_ok()));
    if let Ok(r) = &r {
        // Of the VMs not done yet.
        m.insert("saved".into(), json!(r.totals.saved));
        m.insert("makespan_s".into(), json!(r.totals.makespan_s));
    }
    // Against the interval it runs at: the share of one core the orchestrator spends
    // re-planning.
    m.insert(
        "decision_over_replan_interval".into(),
        json!(median(&times) / 1000.0),
    );
    emit(&Value::Object(m));

    sim_line("sim_planned", &f, &p.schedule, rounds, deadline);
    sim_line("sim_all_at_once", &f, &all_at_once(&f), rounds, deadline);
    sim_line(
        "sim_one_at_a_time",
        &f,
        &one_at_a_time_smallest_first(&f),
        rounds,
        deadline,
    );

    let mut one = f.clone();
    one.links.truncate(1);
    for v in &mut one.vms {
        v.link = 0;
    }
    sim_line(
        "sim_all_at_once_one_link",
        &one,
        &all_at_once(&one),
        rounds.min(3),
        deadline,
    );
}
