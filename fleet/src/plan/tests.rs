//! The planner on cases whose answer is known.

use std::time::Duration;

use super::*;
use crate::model::{Costs, Link, Vm, DEFAULT_WINDOW_BYTES};

const GB: u64 = 1_000_000_000;
const MB: u64 = 1_000_000;

fn link(name: &str, mbps: u64, rtt_ms: u64, window: u64) -> Link {
    Link {
        name: name.into(),
        rate_bps: mbps * 1_000_000,
        rtt: Duration::from_millis(rtt_ms),
        shared_rate_bps: None,
        per_flow_window_bytes: window,
        replication_budget_bps: None,
    }
}

fn vm(name: &str, link: usize, stale: u64) -> Vm {
    Vm::idle(name, link, stale)
}

fn fleet(links: Vec<Link>, vms: Vec<Vm>) -> Fleet {
    Fleet::new(links, vms, Costs::default()).unwrap()
}

fn by_name<'a>(p: &'a Plan, name: &str) -> &'a VmPlan {
    p.vms.iter().find(|v| v.name == name).unwrap()
}

#[test]
fn a_long_fat_link_gets_just_enough_flows_to_fill_it() {
    // 1 Gbit/s × 100 ms with faultline's default window (3.9 MB): one flow moves
    // 312.5 Mbit/s, so four fill the link. 20 VMs of 1 GB: the ideal is 160 s.
    let l = link("wan", 1000, 100, DEFAULT_WINDOW_BYTES);
    let vms = (0..20).map(|i| vm(&format!("vm{i}"), 0, GB)).collect();
    let f = fleet(vec![l], vms);
    let p = plan(&f, &PlanOptions::new(3600.0));
    assert_eq!(p.links[0].concurrency, 4, "{:?}", p.links[0]);
    let ideal = p.totals.ideal_makespan_s;
    assert!((ideal - 160.0).abs() < 1e-9);
    // The wire overhead (4%), one setup, and the last flows, which cannot fill the link
    // alone (the plan favours the mean completion over the makespan).
    assert!(p.totals.makespan_s < 1.12 * ideal, "{:?}", p.totals);
    // One at a time leaves 69% of the link idle.
    let one = &p.baselines.one_at_a_time_smallest_first;
    assert!(one.makespan_s > 3.0 * ideal, "{one:?}");
    assert_eq!(p.totals.saved, 20);
}

#[test]
fn all_at_once_keeps_every_vm_exposed_longest() {
    let l = link("wan", 1000, 20, 100 * MB);
    let vms = (1..=10).map(|i| vm(&format!("vm{i}"), 0, i * GB)).collect();
    let f = fleet(vec![l], vms);
    let p = plan(&f, &PlanOptions::new(3600.0));
    let all = &p.baselines.all_at_once;
    assert!(
        p.totals.mean_exposure_s * 3.0 < all.mean_exposure_s,
        "{:?} vs {all:?}",
        p.totals
    );
    assert!(p.totals.mean_completion_s < all.mean_completion_s);
    // One bottleneck that one flow fills: every busy schedule ends about together.
    assert!((p.totals.makespan_s - all.makespan_s).abs() < 1.0);
}

#[test]
fn smallest_first_saves_the_most_vms_by_the_deadline() {
    // 8 Gbit/s = 1 GB/s, one flow fills it. 1..=10 GB: by 16 s the five smallest (15 GB)
    // fit with the overheads; all at once saves only the smallest (at 11.6 s, when every
    // VM has received 1 GB).
    let l = link("wan", 8000, 10, 1 << 30);
    let vms = (1..=10)
        .rev()
        .map(|i| vm(&format!("vm{i}"), 0, i * GB))
        .collect();
    let f = fleet(vec![l], vms);
    let mut o = PlanOptions::new(16.0 / 0.9 + 1.0);
    o.margin = 0.1;
    let p = plan(&f, &o);
    assert_eq!(p.totals.saved, 5, "{:?}", p.totals);
    assert_eq!(p.baselines.all_at_once.saved, 1);
    for i in 1..=5 {
        assert_eq!(by_name(&p, &format!("vm{i}")).status, Status::Saved);
    }
    let v6 = by_name(&p, "vm6");
    assert_eq!(v6.status, Status::Misses);
    assert!(
        v6.reason.as_deref().unwrap().starts_with("no room"),
        "{v6:?}"
    );
    // The order is by size.
    assert_eq!(by_name(&p, "vm1").order, Some(1));
    assert_eq!(by_name(&p, "vm10").order, Some(10));
}

#[test]
fn a_vm_is_planned_by_what_its_encoding_puts_on_the_wire() {
    // 1 GB/s, one flow fills it. "big" has 4 GB of stale pages that lz4 makes a quarter
    // of: 1 GB crosses, less than "raw"'s 2 GB, so it goes first.
    let l = link("wan", 8000, 10, 1 << 30);
    let big = Vm {
        wire_ratio: 0.25,
        ..vm("big", 0, 4 * GB)
    };
    let f = fleet(vec![l], vec![vm("raw", 0, 2 * GB), big]);
    let p = plan(&f, &PlanOptions::new(3600.0));
    assert_eq!(by_name(&p, "big").order, Some(1));
    assert_eq!(by_name(&p, "big").bytes_to_cross, Some(GB));
    assert_eq!(p.totals.bytes_to_cross, 3 * GB);
    assert!((p.totals.ideal_makespan_s - 3.0).abs() < 1e-9);
    assert!((p.links[0].ideal_s - 3.0).abs() < 1e-9);
    assert_eq!(p.links[0].stale_bytes_now, 6 * GB);
    let one = one_at_a_time_smallest_first(&f);
    assert_eq!(one.links[0].order, vec![1, 0]);
    // Its source measures the push at 0.75 of a page: 3 GB, now after "raw"; a ratio no
    // encoding gives is refused, naming the VM.
    let measured = |r: f64| Measured {
        now_s: 0.0,
        links: Vec::new(),
        vms: vec![VmMeasure {
            vm: "big".into(),
            state: VmState::Waiting {
                stale_bytes: 4 * GB,
            },
            wire_ratio: Some(r),
        }],
    };
    let p = replan(&f, &PlanOptions::new(3600.0), &measured(0.75)).unwrap();
    assert_eq!(by_name(&p, "big").order, Some(2));
    assert_eq!(by_name(&p, "big").bytes_to_cross, Some(3 * GB));
    let e = replan(&f, &PlanOptions::new(3600.0), &measured(2.0)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "vm \"big\": measured wire_ratio must be between 1/4096 and 1.1 (got 2)"
    );
}

#[test]
fn a_vm_that_cannot_make_it_even_alone_is_marked_and_goes_last() {
    let l = link("wan", 800, 10, 1 << 30); // 100 MB/s
    let f = fleet(
        vec![l],
        vec![vm("huge", 0, 500 * GB), vm("a", 0, GB), vm("b", 0, 2 * GB)],
    );
    let p = plan(&f, &PlanOptions::new(60.0));
    let huge = by_name(&p, "huge");
    assert_eq!(huge.status, Status::Misses);
    let why = huge.reason.as_deref().unwrap();
    assert!(
        why.starts_with("too big: alone on link \"wan\" it needs"),
        "{why}"
    );
    assert!(why.contains("the deadline is in 60.0 s"), "{why}");
    assert_eq!(huge.order, Some(3));
    assert_eq!(p.totals.saved, 2);
}

#[test]
fn a_heavy_vm_wins_over_several_light_ones() {
    // 1 GB/s; the deadline leaves room for 10 GB: either "db" (10 GB, priority 5) or the
    // four light ones (2 GB each, priority 1). Weighted, db is worth more.
    let l = link("wan", 8000, 10, 1 << 30);
    let mut db = vm("db", 0, 10 * GB);
    db.weight = 5.0;
    let mut vms = vec![db];
    vms.extend((0..4).map(|i| vm(&format!("web{i}"), 0, 2 * GB)));
    let f = fleet(vec![l], vms);
    let mut o = PlanOptions::new(11.5);
    o.margin = 0.0;
    let p = plan(&f, &o);
    assert_eq!(by_name(&p, "db").status, Status::Saved, "{:#?}", p.vms);
    assert_eq!(p.totals.saved_weight, 5.0);
    // Without the priority the four light ones are saved instead.
    let mut f2 = f.clone();
    f2.vms[0].weight = 1.0;
    let p2 = plan(&f2, &o);
    assert_eq!(p2.totals.saved, 4);
    assert_eq!(by_name(&p2, "db").status, Status::Misses);
}

#[test]
fn a_vm_that_makes_it_only_at_full_rate_is_at_risk() {
    let l = link("wan", 800, 10, 1 << 30); // 100 MB/s
    let f = fleet(vec![l], vec![vm("a", 0, 5 * GB)]);
    // 52 s at full rate, 58 s with a 10% margin.
    let p = plan(&f, &PlanOptions::new(55.0));
    let a = by_name(&p, "a");
    assert_eq!(a.status, Status::AtRisk, "{a:?}");
    assert!(a.finish_s.unwrap() < 55.0 && a.finish_margin_s.unwrap() > 55.0);
    assert!(a
        .reason
        .as_deref()
        .unwrap()
        .contains("only at the full rate"));
    assert_eq!(p.totals.saved, 0);
    assert_eq!(p.totals.saved_at_full_rate, 1);
}

#[test]
fn pinned_vms_go_first_and_skipped_ones_not_at_all() {
    let l = link("wan", 8000, 10, 1 << 30);
    let f = fleet(
        vec![l],
        vec![vm("a", 0, GB), vm("b", 0, 2 * GB), vm("big", 0, 9 * GB)],
    );
    let mut o = PlanOptions::new(3600.0);
    o.first = vec![2];
    o.skip = vec![0];
    let p = plan(&f, &o);
    assert_eq!(by_name(&p, "big").order, Some(1));
    assert_eq!(by_name(&p, "b").order, Some(2));
    let a = by_name(&p, "a");
    assert_eq!(a.status, Status::Skipped);
    assert_eq!(a.order, None);
    assert_eq!(p.totals.vms, 2);
    assert_eq!(p.schedule.links[0].order[0], 2);
    // Named twice by a caller (the plan file refuses it): placed once, at its first place.
    o.first = vec![2, 1, 2];
    o.skip.clear();
    let p = plan(&f, &o);
    assert_eq!(p.schedule.links[0].order, vec![2, 1, 0]);
}

#[test]
fn links_are_planned_on_their_own() {
    let f = fleet(
        vec![
            link("fast", 10_000, 10, 1 << 30),
            link("slow", 100, 50, 1 << 30),
        ],
        vec![vm("a", 0, GB), vm("b", 1, GB), vm("c", 1, 100 * MB)],
    );
    let p = plan(&f, &PlanOptions::new(3600.0));
    assert_eq!(p.links[0].vms, 1);
    assert_eq!(p.links[1].vms, 2);
    // The slow link sets the makespan: 1.1 GB at 12.5 MB/s is 88 s, plus overheads.
    assert!((p.totals.ideal_makespan_s - 88.0).abs() < 1e-9);
    assert!(p.totals.makespan_s > 88.0 && p.totals.makespan_s < 95.0);
    // Ranked by start, then by position in the fleet: a and c start at once.
    assert_eq!(by_name(&p, "a").order, Some(1));
    assert_eq!(by_name(&p, "c").order, Some(2));
    assert_eq!(by_name(&p, "b").order, Some(3));
}

#[test]
fn fast_dirtying_vms_are_frozen_early() {
    // Two VMs of 1 GB at 100 MB/s. "hot" dirties 800 Mbit/s (100 MB/s) up to 20 GB:
    // waiting 10 s behind the other would double its stale bytes. Its switchover comes
    // first (whether it then moves first or waits its turn at the destination).
    let l = link("wan", 800, 10, 1 << 30);
    let mut hot = vm("hot", 0, GB);
    hot.dirty_rate_bps = 800_000_000;
    hot.working_set_bytes = 20 * GB;
    let f = fleet(vec![l], vec![vm("cold", 0, GB), hot]);
    let p = plan(&f, &PlanOptions::new(3600.0));
    let hot = by_name(&p, "hot");
    assert!(hot.switchover_s.unwrap() < 0.1, "{hot:?}");
    assert!(hot.bytes_to_cross.unwrap() < GB + 10 * MB, "{hot:?}");
    let one = &p.baselines.one_at_a_time_smallest_first;
    assert!(p.totals.bytes_to_cross < one.bytes_to_cross);
}

#[test]
fn replanning_keeps_what_runs_and_uses_what_was_measured() {
    let l = link("wan", 800, 10, 1 << 30); // 100 MB/s
    let f = fleet(
        vec![l],
        vec![
            vm("a", 0, GB),
            vm("b", 0, GB),
            vm("c", 0, 2 * GB),
            vm("d", 0, 3 * GB),
        ],
    );
    let opts = PlanOptions::new(100.0);
    let first = plan(&f, &opts);
    assert_eq!(first.totals.saved, 4);
    // 12 s in: a is done, b is moving, c and d wait; the link turns out to deliver only
    // 40 MB/s.
    let measured = Measured {
        now_s: 12.0,
        links: vec![LinkMeasure {
            link: "wan".into(),
            rate_bps: Some(320_000_000),
            shared_rate_bps: None,
            rtt: None,
        }],
        vms: vec![
            VmMeasure {
                vm: "a".into(),
                wire_ratio: None,
                state: VmState::Done { finished_s: 10.5 },
            },
            VmMeasure {
                vm: "b".into(),
                wire_ratio: None,
                state: VmState::Transferring {
                    remaining_bytes: 500 * MB,
                    switchover_s: 10.5,
                    started_s: 10.4,
                },
            },
        ],
    };
    let p = replan(&f, &opts, &measured).unwrap();
    assert_eq!(p.now_s, 12.0);
    assert_eq!(p.deadline_s, 100.0);
    let a = by_name(&p, "a");
    assert_eq!((a.status, a.finish_s), (Status::Done, Some(10.5)));
    // b continues first: 0.5 GB at 40 MB/s.
    let b = by_name(&p, "b");
    assert_eq!(b.order, Some(1));
    assert!((b.finish_s.unwrap() - (12.0 + 0.52 * 1e9 / 40e6 + 0.005)).abs() < 0.1);
    // c (2 GB) makes it, d (3 GB) no longer does: 5.5 GB at 40 MB/s is 143 s.
    assert_eq!(by_name(&p, "c").status, Status::Saved);
    assert_eq!(by_name(&p, "d").status, Status::Misses);
    assert_eq!(p.totals.vms, 3);
    // Unknown names are refused, naming them.
    let mut bad = measured.clone();
    bad.vms[0].vm = "zz".into();
    assert_eq!(
        replan(&f, &opts, &bad).unwrap_err().to_string(),
        "plan: measured names vm \"zz\", which is not defined"
    );
    let mut bad = measured.clone();
    bad.links[0].link = "nope".into();
    assert_eq!(
        replan(&f, &opts, &bad).unwrap_err().to_string(),
        "plan: link \"nope\" is not defined"
    );
    // A VM measured twice, or under way though the plan skips it, is refused, not a panic.
    let mut bad = measured.clone();
    bad.vms.push(VmMeasure {
        vm: "b".into(),
        wire_ratio: None,
        state: VmState::Done { finished_s: 11.0 },
    });
    assert_eq!(
        replan(&f, &opts, &bad).unwrap_err().to_string(),
        "vm \"b\": measured twice in one re-plan"
    );
    let skipping = PlanOptions {
        skip: vec![1],
        ..opts.clone()
    };
    assert_eq!(
        replan(&f, &skipping, &measured).unwrap_err().to_string(),
        "vm \"b\": measured under way, yet the plan skips it"
    );
}

/// Re-planned every second, a near tie keeps the order the last plan gave it: b and c
/// (500 and 505 MB, one at a time on a link one flow fills) swap under `replan` once c's
/// figure falls to 498 MB, not under `replan_keeping`; at 300 MB the new order is clearly
/// better and wins there too.
#[test]
fn a_replan_keeps_the_last_order_through_a_near_tie() {
    let l = link("wan", 800, 10, 1 << 30); // 100 MB/s
    let f = fleet(
        vec![l],
        vec![vm("a", 0, GB), vm("b", 0, 500 * MB), vm("c", 0, 505 * MB)],
    );
    let opts = PlanOptions::new(1000.0);
    let first = plan(&f, &opts);
    let order = |p: &Plan, n: &str| by_name(p, n).order.unwrap();
    assert!(order(&first, "b") < order(&first, "c"));
    // 1 s in: a moves; c's source now says 498 MB (or 300).
    let measured = |c_stale: u64| Measured {
        now_s: 1.0,
        links: Vec::new(),
        vms: vec![
            VmMeasure {
                vm: "a".into(),
                wire_ratio: None,
                state: VmState::Transferring {
                    remaining_bytes: 900 * MB,
                    switchover_s: 0.05,
                    started_s: 0.0,
                },
            },
            VmMeasure {
                vm: "c".into(),
                wire_ratio: None,
                state: VmState::Waiting {
                    stale_bytes: c_stale,
                },
            },
        ],
    };
    let keeping =
        |m: &Measured, policy| replan_keeping(&f, &opts, m, policy, &first.schedule).unwrap();
    let swapped = replan(&f, &opts, &measured(498 * MB)).unwrap();
    assert!(order(&swapped, "c") < order(&swapped, "b"));
    let kept = keeping(&measured(498 * MB), Policy::Planner);
    assert!(order(&kept, "b") < order(&kept, "c"));
    assert_eq!(order(&kept, "a"), 1);
    assert_eq!(kept.links[0].policy, KEPT_ORDER);
    let clearly = keeping(&measured(300 * MB), Policy::Planner);
    assert!(order(&clearly, "c") < order(&clearly, "b"));
    assert_ne!(clearly.links[0].policy, KEPT_ORDER);
    // A baseline orders its own way: smallest first.
    let baseline = keeping(&measured(498 * MB), Policy::SmallestFirst);
    assert!(order(&baseline, "c") < order(&baseline, "b"));
    // A VM of the last plan that failed since is left out of the order kept.
    let mut gone = measured(498 * MB);
    gone.vms.push(VmMeasure {
        vm: "b".into(),
        wire_ratio: None,
        state: VmState::Failed,
    });
    let without_b = keeping(&gone, Policy::Planner);
    assert_eq!((order(&without_b, "a"), order(&without_b, "c")), (1, 2));
    assert_eq!(by_name(&without_b, "b").order, None);
}

#[test]
fn a_replan_keeps_the_transfers_in_the_order_they_started_not_switched_over() {
    let l = link("wan", 800, 10, 1 << 30);
    let f = fleet(
        vec![l],
        vec![
            vm("a", 0, GB),
            vm("b", 0, GB),
            vm("c", 0, GB),
            vm("d", 0, GB),
        ],
    );
    let opts = PlanOptions::new(100.0);
    let moving = |remaining_mb: u64, switchover_s: f64, started_s: f64| VmState::Transferring {
        remaining_bytes: remaining_mb * MB,
        switchover_s,
        started_s,
    };
    let measured = |a: VmState, b: VmState, c: VmState| Measured {
        now_s: 2.0,
        links: Vec::new(),
        vms: ["a", "b", "c"]
            .into_iter()
            .zip([a, b, c])
            .map(|(vm, state)| VmMeasure {
                vm: vm.into(),
                wire_ratio: None,
                state,
            })
            .collect(),
    };
    // c started last but its setup was the shortest: it switched over first. a and b
    // started together; b has fewer bytes left. d waits.
    let p = replan(
        &f,
        &opts,
        &measured(
            moving(600, 1.0, 0.0),
            moving(500, 1.1, 0.0),
            moving(100, 0.5, 0.2),
        ),
    )
    .unwrap();
    let order = |p: &Plan, n: &str| by_name(p, n).order;
    assert_eq!(
        [
            order(&p, "b"),
            order(&p, "a"),
            order(&p, "c"),
            order(&p, "d")
        ],
        [Some(1), Some(2), Some(3), Some(4)]
    );
    // A VM still in setup comes after every transfer, however early it started.
    let p = replan(
        &f,
        &opts,
        &measured(
            VmState::Setup {
                started_s: 0.0,
                stale_bytes: 700 * MB,
            },
            moving(500, 1.1, 0.1),
            moving(100, 0.5, 0.2),
        ),
    )
    .unwrap();
    assert_eq!(
        [order(&p, "b"), order(&p, "c"), order(&p, "a")],
        [Some(1), Some(2), Some(3)]
    );
}

#[test]
fn replanning_at_time_zero_is_planning() {
    let l = link("wan", 800, 10, 1 << 30);
    let f = fleet(vec![l], vec![vm("a", 0, GB), vm("b", 0, 2 * GB)]);
    let opts = PlanOptions::new(100.0);
    let p = plan(&f, &opts);
    let r = replan(&f, &opts, &Measured::default()).unwrap();
    assert_eq!(p.totals, r.totals);
    assert_eq!(p.schedule, r.schedule);
}

/// VM "a", 1 GB stale, its stale set growing 10 MB/s up to 2 GB.
fn one_vm_dirtying_10_mb_a_second() -> Fleet {
    let l = link("wan", 800, 10, 1 << 30);
    let mut a = vm("a", 0, GB);
    a.dirty_rate_bps = 80_000_000;
    a.working_set_bytes = 2 * GB;
    fleet(vec![l], vec![a])
}

#[test]
fn waiting_vms_not_measured_grow_as_the_model_says() {
    let f = one_vm_dirtying_10_mb_a_second();
    let r = replan(
        &f,
        &PlanOptions::new(1000.0),
        &Measured {
            now_s: 50.0,
            ..Measured::default()
        },
    )
    .unwrap();
    // 1 GB + 50 s × 10 MB/s, and 0.08 s more of growth during its setup.
    let bytes = r.vms[0].bytes_to_cross.unwrap();
    assert!((bytes as f64 - 1.5e9 - 10e6 * 0.08).abs() < 1e3, "{bytes}");
}

#[test]
fn a_vm_in_setup_moves_the_stale_set_measured_at_its_start() {
    let f = one_vm_dirtying_10_mb_a_second();
    let measured = Measured {
        now_s: 50.0,
        links: Vec::new(),
        vms: vec![VmMeasure {
            vm: "a".into(),
            wire_ratio: None,
            state: VmState::Setup {
                started_s: 49.95,
                stale_bytes: 1_200_000_000,
            },
        }],
    };
    let r = replan(&f, &PlanOptions::new(1000.0), &measured).unwrap();
    // Its stale set at the start, not the 1.5 GB the model would have grown it to by now
    // (and 0.03 s of growth to its switchover).
    let bytes = r.vms[0].bytes_to_cross.unwrap();
    assert!((bytes as f64 - 1.2e9 - 10e6 * 0.03).abs() < 1e3, "{bytes}");
}

#[test]
fn the_replication_budget_goes_where_it_saves_most() {
    // One link with 100 Mbit/s of budget. Working set per dirty rate: c 6 GB / 20 Mbit/s,
    // a 10 GB / 50 Mbit/s, b 1 GB / 100 Mbit/s. c gets its 20, a its 50, b the 30 left:
    // b's steady stale bytes are 1 GB × (1 - 30/100) = 0.7 GB, the others' none.
    let mut l = link("wan", 1000, 10, 1 << 30);
    l.replication_budget_bps = Some(100_000_000);
    let mk = |name: &str, ws: u64, d: u64, cur: u64| {
        let mut v = vm(name, 0, 0);
        v.working_set_bytes = ws;
        v.dirty_rate_bps = d;
        v.replication_budget_bps = cur;
        v
    };
    let f = fleet(
        vec![l],
        vec![
            mk("a", 10 * GB, 50_000_000, 34_000_000),
            mk("b", GB, 100_000_000, 33_000_000),
            mk("c", 6 * GB, 20_000_000, 33_000_000),
        ],
    );
    let s = split_replication_budget(&f);
    let rec: Vec<u64> = s.vms.iter().map(|v| v.recommended_bps).collect();
    assert_eq!(rec, vec![50_000_000, 30_000_000, 20_000_000]);
    assert!((s.steady_stale_recommended_bytes - 0.7e9).abs() < 1.0);
    // Today's even split leaves a with 10 GB × 16/50 and b with 1 GB × 67/100 stale.
    assert!((s.steady_stale_current_bytes - (3.2e9 + 0.67e9)).abs() < 1.0);
    assert_eq!(s.links[0].spare_bps, 0);
    // Without a link budget, the VMs' budgets summed are split.
    let mut f2 = f.clone();
    f2.links[0].replication_budget_bps = None;
    assert_eq!(
        split_replication_budget(&f2).links[0].budget_bps,
        100_000_000
    );
}

#[test]
fn steady_state_stale_bytes() {
    assert_eq!(steady_stale_bytes(1000, 0, 0), 0.0);
    assert_eq!(steady_stale_bytes(1000, 100, 0), 1000.0);
    assert_eq!(steady_stale_bytes(1000, 100, 25), 750.0);
    assert_eq!(steady_stale_bytes(1000, 100, 100), 0.0);
    assert_eq!(steady_stale_bytes(1000, 100, 500), 0.0);
}

#[test]
fn a_measured_rate_keeps_the_shared_rate_at_most_the_rate() {
    let mut l = link("wan", 1000, 10, 1 << 30);
    l.shared_rate_bps = Some(900_000_000);
    let f = fleet(vec![l], vec![vm("a", 0, GB), vm("b", 0, GB)]);
    let opts = PlanOptions::new(100.0);
    let measured = |rate_bps, shared_rate_bps| Measured {
        now_s: 1.0,
        links: vec![LinkMeasure {
            link: "wan".into(),
            rate_bps,
            shared_rate_bps,
            rtt: None,
        }],
        vms: Vec::new(),
    };
    // One flow measured at 800 Mbit/s: several cannot get the file's 900.
    let p = replan(&f, &opts, &measured(Some(800_000_000), None)).unwrap();
    let l = &p.links[0];
    assert_eq!(
        (l.rate_bps, l.shared_rate_bps),
        (800_000_000, Some(800_000_000))
    );
    // Several measured at 950: one flow gets at least that, the file's 1 Gbit/s stands.
    let p = replan(&f, &opts, &measured(None, Some(950_000_000))).unwrap();
    let l = &p.links[0];
    assert_eq!(
        (l.rate_bps, l.shared_rate_bps),
        (1_000_000_000, Some(950_000_000))
    );
    // Several measured at 1.2 Gbit/s: the link carries that much, for one flow too.
    let p = replan(&f, &opts, &measured(None, Some(1_200_000_000))).unwrap();
    let l = &p.links[0];
    assert_eq!(
        (l.rate_bps, l.shared_rate_bps),
        (1_200_000_000, Some(1_200_000_000))
    );
}

#[test]
fn one_vm_more_saved_is_never_a_tie_however_much_is_saved() {
    // 10,000 VMs of the highest priority saved, against as many less one of the lowest.
    let score = |saved_weight: f64, sum_completion: f64| Score {
        saved_weight,
        sum_completion,
        makespan: 1.0,
        sum_exposure: 1.0,
    };
    let most = 10_000.0 * 1000.0;
    let (more, less) = (score(most, 2e6), score(most - 0.001, 1e6));
    assert!(more.better_than(&less) && more.clearly_better_than(&less));
    assert!(!less.better_than(&more) && !less.clearly_better_than(&more));
    // As much saved: the shorter completion wins.
    assert!(score(most, 1e6).better_than(&score(most, 2e6)));
}
