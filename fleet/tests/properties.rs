//! The known facts about evacuating many VMs, as properties over random fleets:
//!
//! * on one bottleneck, every schedule that keeps the link busy has the same makespan (the
//!   sum of the stale bytes over the rate), up to the fixed costs;
//! * one at a time, smallest first minimises the mean completion and finishes the most VMs
//!   by any deadline;
//! * the planner never saves fewer (weighted) VMs than all at once or one at a time;
//! * no schedule beats the link: the makespan is at least the wire bytes over the rate;
//! * the replication budget split leaves the fewest steady-state stale bytes.

use std::time::Duration;

use fleet::plan::{
    all_at_once, one_at_a_time_smallest_first, plan, split_replication_budget, steady_stale_bytes,
    PlanOptions,
};
use fleet::sim::{simulate, LinkSchedule, Schedule, Sharing, SimOptions};
use fleet::{Costs, Fleet, Link, Vm};
use proptest::prelude::*;

const MB: u64 = 1_000_000;

fn vm(i: usize, link: usize, stale: u64) -> Vm {
    Vm::idle(format!("vm{i}"), link, stale)
}

/// One link of `mbps` that a single flow fills (a window far above its BDP).
fn wide_link(mbps: u64, rtt_ms: u64) -> Link {
    Link {
        name: "l".into(),
        rate_bps: mbps * 1_000_000,
        rtt: Duration::from_millis(rtt_ms),
        shared_rate_bps: None,
        per_flow_window_bytes: 1 << 40,
        replication_budget_bps: None,
    }
}

fn free() -> Costs {
    Costs {
        handshake_rtts: 0.0,
        switchover: Duration::ZERO,
        wire_overhead: 0.0,
        finish: Duration::ZERO,
    }
}

fn one_link(order: Vec<usize>, concurrency: usize, sharing: Sharing, prestart: bool) -> Schedule {
    Schedule {
        links: vec![LinkSchedule {
            order,
            concurrency,
            sharing,
            prestart,
        }],
    }
}

/// A random permutation of `0..n` from `keys`.
fn permutation(keys: &[u64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..keys.len()).collect();
    idx.sort_by_key(|&i| (keys[i], i));
    idx
}

fn sizes() -> impl Strategy<Value = Vec<u64>> {
    prop::collection::vec(1..2_000u64, 1..12).prop_map(|v| v.into_iter().map(|x| x * MB).collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn every_busy_schedule_on_one_bottleneck_has_the_same_makespan(
        sizes in sizes(),
        keys in prop::collection::vec(any::<u64>(), 12),
        concurrency in 1usize..12,
        fair in any::<bool>(),
        prestart in any::<bool>(),
        mbps in 10u64..10_000,
        rtt_ms in 1u64..200,
    ) {
        let n = sizes.len();
        let vms = sizes.iter().enumerate().map(|(i, &s)| vm(i, 0, s)).collect();
        let link = wide_link(mbps, rtt_ms);
        let tail = link.rtt.as_secs_f64();
        let rate = mbps as f64 * 1e6 / 8.0;
        let total: f64 = sizes.iter().map(|&s| s as f64).sum();
        let sharing = if fair { Sharing::Fair } else { Sharing::InOrder };
        let order = permutation(&keys[..n]);

        // Without fixed costs: the bytes over the rate and the last VM's tail, exactly with
        // prestart; without it a VM may wait for the one ahead to be done, one tail each
        // at most.
        let tails = if prestart { 1.0 } else { n as f64 };
        let f = Fleet::new(vec![link.clone()], vms, free()).unwrap();
        let o = simulate(&f, &one_link(order.clone(), concurrency, sharing, prestart),
                         &SimOptions::default()).unwrap();
        let (ideal, m) = (total / rate + tail, o.makespan_s());
        prop_assert!(m >= ideal - 1e-9 * ideal, "{m} < {ideal}");
        prop_assert!(m <= ideal + (tails - 1.0) * tail + 1e-9 * ideal, "{m} > {ideal} + tails");

        // With them: between one setup and one per VM more.
        let f = Fleet { costs: Costs::default(), ..f };
        let setup = f.costs.setup_s(&link);
        let tail = f.costs.tail_s(&link);
        let wire = total * (1.0 + f.costs.wire_overhead) / rate;
        let o = simulate(&f, &one_link(order, concurrency, sharing, prestart),
                         &SimOptions::default()).unwrap();
        let m = o.makespan_s();
        prop_assert!(m >= wire + setup + tail - 1e-9 * m, "{m} < {}", wire + setup + tail);
        let most = wire + n as f64 * setup + tails * tail;
        prop_assert!(m <= most + 1e-9 * m, "{m} > {most}");
    }

    #[test]
    fn smallest_first_minimises_mean_completion_and_saves_the_most(
        sizes in sizes(),
        keys in prop::collection::vec(any::<u64>(), 12),
        deadline_frac in 0.0f64..1.2,
        costs in any::<bool>(),
    ) {
        let n = sizes.len();
        let vms = sizes.iter().enumerate().map(|(i, &s)| vm(i, 0, s)).collect();
        let f = Fleet::new(vec![wide_link(1000, 20)], vms,
                           if costs { Costs::default() } else { free() }).unwrap();
        let smallest = simulate(&f, &one_at_a_time_smallest_first(&f), &SimOptions::default()).unwrap();
        let random = simulate(&f, &one_link(permutation(&keys[..n]), 1, Sharing::Fair, false),
                              &SimOptions::default()).unwrap();
        let eps = 1e-9 * smallest.mean_completion_s();
        prop_assert!(smallest.mean_completion_s() <= random.mean_completion_s() + eps);
        let deadline = deadline_frac * smallest.makespan_s();
        prop_assert!(smallest.saved(deadline) >= random.saved(deadline));
    }

    #[test]
    fn no_schedule_moves_bytes_faster_than_the_link(
        sizes in sizes(),
        dirty in prop::collection::vec(0u64..400, 12),
        keys in prop::collection::vec(any::<u64>(), 12),
        concurrency in 1usize..12,
        fair in any::<bool>(),
        window_kb in 64u64..100_000,
    ) {
        let n = sizes.len();
        let vms = sizes.iter().enumerate().map(|(i, &s)| {
            let mut v = vm(i, 0, s);
            v.dirty_rate_bps = dirty[i] * 1_000_000;
            v.working_set_bytes = 3 * s;
            v
        }).collect();
        let mut link = wide_link(1000, 50);
        link.per_flow_window_bytes = window_kb * 1000;
        let f = Fleet::new(vec![link.clone()], vms, Costs::default()).unwrap();
        let sharing = if fair { Sharing::Fair } else { Sharing::InOrder };
        let o = simulate(&f, &one_link(permutation(&keys[..n]), concurrency, sharing, true),
                         &SimOptions::default()).unwrap();
        let rate = 1000.0 * 1e6 / 8.0;
        let wire: f64 = o.vms.iter().map(|v| v.bytes).sum::<f64>() * 1.04;
        prop_assert!(o.makespan_s() >= wire / rate);
        for (i, v) in o.vms.iter().enumerate() {
            // Stale bytes as they were at the switchover; never less than at the start.
            prop_assert!((v.bytes - f.vms[i].stale_at(v.switchover_s)).abs() < 1e-6);
            prop_assert!(v.bytes >= f.vms[i].stale_bytes as f64);
            // No flow beats its cap.
            let cap = f.flow_cap_bps(i) / 8.0;
            prop_assert!(v.finish_s - v.switchover_s >= v.bytes * 1.04 / cap - 1e-9);
            prop_assert!(v.start_s <= v.switchover_s && v.switchover_s <= v.finish_s);
        }
    }

    #[test]
    fn the_planner_never_saves_less_than_the_baselines(
        spec in prop::collection::vec(
            (0usize..3, 1u64..4_000, 0u64..2_000, 1u64..4, 1u32..5), 1..16),
        links in prop::collection::vec((1u64..100, 1u64..150, 1u64..64), 3),
        deadline in 1.0f64..120.0,
        margin in 0.0f64..0.3,
    ) {
        let links: Vec<Link> = links.iter().enumerate().map(|(i, &(r, rtt, w))| Link {
            name: format!("l{i}"),
            rate_bps: r * 100_000_000,
            rtt: Duration::from_millis(rtt),
            shared_rate_bps: None,
            per_flow_window_bytes: w * MB,
            replication_budget_bps: None,
        }).collect();
        let vms: Vec<Vm> = spec.iter().enumerate().map(|(i, &(l, stale, dirty, ws, w))| {
            let mut v = vm(i, l, stale * MB);
            v.dirty_rate_bps = dirty * 1_000_000;
            v.working_set_bytes = ws * stale * MB;
            v.weight = f64::from(w);
            v
        }).collect();
        let f = Fleet::new(links, vms, Costs::default()).unwrap();
        let opts = PlanOptions { margin, ..PlanOptions::new(deadline) };
        let p = plan(&f, &opts);
        let with_margin = SimOptions { rate_factor: 1.0 - margin, initial: Vec::new(), release_s: Vec::new() };
        let tol = 1e-6 * p.totals.weight;
        for s in [all_at_once(&f), one_at_a_time_smallest_first(&f)] {
            let o = simulate(&f, &s, &with_margin).unwrap();
            prop_assert!(p.totals.saved_weight + tol >= o.saved_weight(&f, deadline),
                         "plan {} < baseline {}", p.totals.saved_weight, o.saved_weight(&f, deadline));
        }
        prop_assert!(p.totals.saved_weight + tol >= p.baselines.all_at_once.saved_weight);
        prop_assert!(p.totals.saved_weight + tol >= p.baselines.one_at_a_time_smallest_first.saved_weight);
        // The plan's own schedule, simulated again, gives what the plan says.
        let o = simulate(&f, &p.schedule, &with_margin).unwrap();
        prop_assert!((o.saved_weight(&f, deadline) - p.totals.saved_weight).abs() <= tol);
        prop_assert_eq!(p.totals.vms, f.vms.len());
    }

    #[test]
    fn the_budget_split_leaves_the_fewest_stale_bytes(
        spec in prop::collection::vec((1u64..100, 0u64..500), 1..10),
        budget in 0u64..2_000,
        shares in prop::collection::vec(0.0f64..1.0, 10),
    ) {
        let mut link = wide_link(1000, 10);
        link.replication_budget_bps = Some(budget * 1_000_000);
        let vms: Vec<Vm> = spec.iter().enumerate().map(|(i, &(ws, d))| {
            let mut v = vm(i, 0, 0);
            v.working_set_bytes = ws * 100 * MB;
            v.dirty_rate_bps = d * 1_000_000;
            v
        }).collect();
        let f = Fleet::new(vec![link], vms, free()).unwrap();
        let s = split_replication_budget(&f);
        let given: u64 = s.vms.iter().map(|v| v.recommended_bps).sum();
        prop_assert!(given <= budget * 1_000_000);
        for (v, b) in f.vms.iter().zip(&s.vms) {
            prop_assert!(b.recommended_bps <= v.dirty_rate_bps);
        }
        // Any other split of the same budget (random shares, each capped at the VM's dirty
        // rate) leaves at least as many stale bytes.
        let total_share: f64 = shares[..f.vms.len()].iter().sum::<f64>().max(1e-9);
        let other: f64 = f.vms.iter().zip(&shares).map(|(v, &sh)| {
            let b = ((sh / total_share) * (budget * 1_000_000) as f64) as u64;
            steady_stale_bytes(v.working_set_bytes, v.dirty_rate_bps, b.min(v.dirty_rate_bps))
        }).sum();
        prop_assert!(s.steady_stale_recommended_bytes <= other * (1.0 + 1e-9) + 1.0,
                     "{} > {other}", s.steady_stale_recommended_bytes);
    }
}
