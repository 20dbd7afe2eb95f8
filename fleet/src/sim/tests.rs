//! Hand-computed cases of the simulator: max-min sharing, the window cap, stale growth
//! while waiting, setup, prestart, wire overhead, VMs under way at time 0.

use std::time::Duration;

use super::*;
use crate::model::{Link, Vm};

const MB: u64 = 1_000_000;

/// A link of `mbps` Mbit/s, `rtt_ms`, and a window that never limits.
fn link(mbps: u64, rtt_ms: u64) -> Link {
    Link {
        name: "l".into(),
        rate_bps: mbps * 1_000_000,
        rtt: Duration::from_millis(rtt_ms),
        shared_rate_bps: None,
        per_flow_window_bytes: 1 << 40,
        replication_budget_bps: None,
    }
}

fn vm(name: &str, stale: u64) -> Vm {
    Vm::idle(name, 0, stale)
}

fn free() -> Costs {
    Costs {
        handshake_rtts: 0.0,
        switchover: Duration::ZERO,
        wire_overhead: 0.0,
        finish: Duration::ZERO,
    }
}

fn fleet(l: Link, vms: Vec<Vm>, costs: Costs) -> Fleet {
    Fleet::new(vec![l], vms, costs).unwrap()
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

fn run(f: &Fleet, s: &Schedule) -> Outcome {
    simulate(f, s, &SimOptions::default()).unwrap()
}

#[track_caller]
fn close(got: f64, want: f64) {
    assert!(
        (got - want).abs() < 1e-9 * want.abs().max(1.0),
        "got {got}, want {want}"
    );
}

/// With a 1 ms RTT (and no `finish`) every VM is done a millisecond after its last byte
/// left.
const TAIL: f64 = 0.001;

#[test]
fn max_min_fair_sharing_by_hand() {
    // 100 Mbit/s = 12.5 MB/s shared by 10, 20 and 30 MB: 12.5/3 each until the first ends
    // at 10 / (12.5/3) = 2.4 s; then 6.25 each, the second's remaining 10 MB take 1.6 s
    // (4.0 s); the third's remaining 10 MB alone take 0.8 s (4.8 s = 60 MB / 12.5 MB/s).
    let f = fleet(
        link(100, 1),
        vec![vm("a", 10 * MB), vm("b", 20 * MB), vm("c", 30 * MB)],
        free(),
    );
    let o = run(&f, &one_link(vec![0, 1, 2], 3, Sharing::Fair, false));
    close(o.vms[0].finish_s, 2.4 + TAIL);
    close(o.vms[1].finish_s, 4.0 + TAIL);
    close(o.vms[2].finish_s, 4.8 + TAIL);
    close(o.makespan_s(), 4.8 + TAIL);
    for v in &o.vms {
        assert_eq!(v.start_s, 0.0);
        assert_eq!(v.switchover_s, 0.0);
    }
    close(o.vms[2].bytes, 30e6);
}

#[test]
fn a_shared_link_delivers_its_shared_rate_and_one_flow_alone_its_rate() {
    // 100 Mbit/s alone, 80 shared (10 MB/s); a of 10 MB (capped at `a_cap`), b of 20 MB.
    let two_vms = |sharing: Sharing, a_cap: Option<u64>| {
        let mut l = link(100, 1);
        l.shared_rate_bps = Some(80_000_000);
        let mut a = vm("a", 10 * MB);
        a.max_rate_bps = a_cap;
        let f = fleet(l, vec![a, vm("b", 20 * MB)], free());
        let o = run(&f, &one_link(vec![0, 1], 2, sharing, false));
        (o.vms[0].finish_s, o.vms[1].finish_s)
    };
    // Fair: 5 MB/s each until a ends at 2 s; b's last 10 MB alone at 12.5 MB/s take 0.8 s.
    let (a, b) = two_vms(Sharing::Fair, None);
    close(a, 2.0 + TAIL);
    close(b, 2.8 + TAIL);
    // In order, a flow that fills the link by itself has it alone at the full rate: 0.8 s
    // and 2.4 s, as without a shared rate.
    let (a, b) = two_vms(Sharing::InOrder, None);
    close(a, 0.8 + TAIL);
    close(b, 2.4 + TAIL);
    // A first flow capped below the shared rate (4 MB/s) shares it: b gets the other
    // 6 MB/s until a ends at 2.5 s (15 MB of b moved); b's last 5 MB alone take 0.4 s.
    let (a, b) = two_vms(Sharing::InOrder, Some(32_000_000));
    close(a, 2.5 + TAIL);
    close(b, 2.9 + TAIL);
    // A first flow capped between the two rates (90 Mbit/s, 11.25 MB/s) carries the link
    // alone at its cap: a's 10 MB take 0.889 s, then b's 20 MB alone 1.6 s.
    let (a, b) = two_vms(Sharing::InOrder, Some(90_000_000));
    close(a, 10.0 / 11.25 + TAIL);
    close(b, 10.0 / 11.25 + 1.6 + TAIL);
}

#[test]
fn water_filling_gives_a_capped_flow_its_cap_and_the_rest_to_the_others() {
    // a is capped at 16 Mbit/s (2 MB/s); b and c share the other 10.5 MB/s: 5.25 each.
    // a's 4 MB end at 2 s; b and c have moved 10.5 MB each. Then 6.25 each: b's remaining
    // 10.5 MB take 1.68 s (3.68 s); c's remaining 21 MB alone at 12.5 take 1.68 s (5.36 s,
    // = 67 MB / 12.5 MB/s: no bandwidth was left unused).
    let mut a = vm("a", 4 * MB);
    a.max_rate_bps = Some(16_000_000);
    let f = fleet(
        link(100, 1),
        vec![a, vm("b", 21 * MB), vm("c", 42 * MB)],
        free(),
    );
    let o = run(&f, &one_link(vec![0, 1, 2], 3, Sharing::Fair, false));
    close(o.vms[0].finish_s, 2.0 + TAIL);
    close(o.vms[1].finish_s, 3.68 + TAIL);
    close(o.vms[2].finish_s, 5.36 + TAIL);
}

#[test]
fn two_capped_flows_leave_the_link_partly_idle() {
    // Both capped at 4 MB/s on a 12.5 MB/s link: each gets its cap, 4.5 MB/s unused.
    let mut a = vm("a", 8 * MB);
    let mut b = vm("b", 12 * MB);
    a.max_rate_bps = Some(32_000_000);
    b.max_rate_bps = Some(32_000_000);
    let f = fleet(link(100, 1), vec![a, b], free());
    let o = run(&f, &one_link(vec![0, 1], 2, Sharing::Fair, false));
    close(o.vms[0].finish_s, 2.0 + TAIL);
    close(o.vms[1].finish_s, 3.0 + TAIL);
}

#[test]
fn in_order_sharing_serves_the_earliest_flow_first() {
    // Same as the fair case, but strict priority: 0.8 s, 2.4 s, 4.8 s.
    let f = fleet(
        link(100, 1),
        vec![vm("a", 10 * MB), vm("b", 20 * MB), vm("c", 30 * MB)],
        free(),
    );
    let o = run(&f, &one_link(vec![0, 1, 2], 3, Sharing::InOrder, false));
    close(o.vms[0].finish_s, 0.8 + TAIL);
    close(o.vms[1].finish_s, 2.4 + TAIL);
    close(o.vms[2].finish_s, 4.8 + TAIL);
    // A capped first flow leaves the rest to the next.
    let mut a = vm("a", 4 * MB);
    a.max_rate_bps = Some(16_000_000);
    let f = fleet(link(100, 1), vec![a, vm("b", 21 * MB)], free());
    let o = run(&f, &one_link(vec![0, 1], 2, Sharing::InOrder, false));
    close(o.vms[0].finish_s, 2.0 + TAIL);
    // b moved 10.5 MB/s for 2 s (21 MB): done at the same time.
    close(o.vms[1].finish_s, 2.0 + TAIL);
}

#[test]
fn a_flow_moves_at_most_window_over_rtt() {
    // 1 Gbit/s, 100 ms, 4 MB window: 40 MB/s per flow, the link is 125 MB/s.
    let mut l = link(1000, 100);
    l.per_flow_window_bytes = 4 * MB;
    let f = fleet(l.clone(), vec![vm("a", 400 * MB)], free());
    let o = run(&f, &one_link(vec![0], 1, Sharing::Fair, false));
    close(o.vms[0].finish_s, 10.0 + 0.1);
    // Three flows: 40 MB/s each (3 × 40 < 125), still 10 s each.
    let f = fleet(
        l.clone(),
        vec![vm("a", 400 * MB), vm("b", 400 * MB), vm("c", 400 * MB)],
        free(),
    );
    let o = run(&f, &one_link(vec![0, 1, 2], 3, Sharing::Fair, false));
    for v in &o.vms {
        close(v.finish_s, 10.1);
    }
    // Four: the link is the limit, 31.25 MB/s each: 12.8 s.
    let f = fleet(
        l,
        vec![
            vm("a", 400 * MB),
            vm("b", 400 * MB),
            vm("c", 400 * MB),
            vm("d", 400 * MB),
        ],
        free(),
    );
    let o = run(&f, &one_link(vec![0, 1, 2, 3], 4, Sharing::Fair, false));
    for v in &o.vms {
        close(v.finish_s, 12.9);
    }
}

#[test]
fn stale_bytes_grow_while_a_vm_waits() {
    // 8 Mbit/s = 1 MB/s. a: 1 MB, not dirtying. b: 1 MB, dirtying 1 MB/s, working set
    // 10 MB. One at a time: a's last byte leaves at 1 s, it is done one tail later; b
    // starts then with 2 MB stale (and a tail's more): ends 2 s later.
    let mut b = vm("b", MB);
    b.dirty_rate_bps = 8_000_000;
    b.working_set_bytes = 10 * MB;
    let f = fleet(link(8, 1), vec![vm("a", MB), b.clone()], free());
    let o = run(&f, &one_link(vec![0, 1], 1, Sharing::Fair, false));
    close(o.vms[0].finish_s, 1.0 + TAIL);
    close(o.vms[1].start_s, 1.0 + TAIL);
    close(o.vms[1].bytes, 2e6 + TAIL * 1e6);
    close(o.vms[1].finish_s, 3.0 + 3.0 * TAIL);
    // Its working set caps the growth: 1.5 MB.
    b.working_set_bytes = 1_500_000;
    let f = fleet(link(8, 1), vec![vm("a", MB), b.clone()], free());
    let o = run(&f, &one_link(vec![0, 1], 1, Sharing::Fair, false));
    close(o.vms[1].bytes, 1.5e6);
    close(o.vms[1].finish_s, 2.5 + 2.0 * TAIL);
    // Started first, it has nothing to add: its stale set is fixed at its switchover.
    b.working_set_bytes = 10 * MB;
    let f = fleet(link(8, 1), vec![vm("a", MB), b], free());
    let o = run(&f, &one_link(vec![1, 0], 1, Sharing::Fair, false));
    close(o.vms[1].bytes, 1e6);
    close(o.makespan_s(), 2.0 + 2.0 * TAIL);
}

#[test]
fn setup_tail_and_prestart() {
    // 100 ms RTT, 3 RTTs + 50 ms = 0.35 s of setup, 0.1 s of tail; 1 MB each at 1 MB/s.
    let costs = Costs {
        handshake_rtts: 3.0,
        switchover: Duration::from_millis(50),
        wire_overhead: 0.0,
        finish: Duration::ZERO,
    };
    let f = fleet(link(8, 100), vec![vm("a", MB), vm("b", MB)], costs);
    let o = run(&f, &one_link(vec![0, 1], 1, Sharing::Fair, false));
    close(o.vms[0].switchover_s, 0.35);
    close(o.vms[0].finish_s, 1.45);
    close(o.vms[0].exposure_s(), 1.1);
    // Without prestart b starts when a is done, one tail after its last byte left.
    close(o.vms[1].start_s, 1.45);
    close(o.vms[1].finish_s, 2.90);
    // With it, b's setup overlaps the end of a's flow: its flow starts as a's ends.
    let o = run(&f, &one_link(vec![0, 1], 1, Sharing::Fair, true));
    close(o.vms[1].start_s, 1.0);
    close(o.vms[1].switchover_s, 1.35);
    close(o.vms[1].finish_s, 2.45);
}

#[test]
fn prestart_of_a_flow_shorter_than_a_setup_hands_over_at_once() {
    // 0.35 s setups, flows of 0.1 s: each next setup starts as soon as the flow before
    // it starts; the link idles 0.25 s between flows instead of 0.35 s.
    let costs = Costs {
        handshake_rtts: 3.0,
        switchover: Duration::from_millis(50),
        wire_overhead: 0.0,
        finish: Duration::ZERO,
    };
    let f = fleet(
        link(8, 100),
        vec![vm("a", 100_000), vm("b", 100_000), vm("c", 100_000)],
        costs,
    );
    let o = run(&f, &one_link(vec![0, 1, 2], 1, Sharing::Fair, true));
    close(o.vms[1].start_s, 0.35);
    close(o.vms[2].start_s, 0.70);
    close(o.vms[2].finish_s, 1.05 + 0.1 + 0.1);
}

#[test]
fn wire_overhead_stretches_the_transfer() {
    let mut c = free();
    c.wire_overhead = 0.04;
    let f = fleet(link(8, 1), vec![vm("a", MB)], c);
    let o = run(&f, &one_link(vec![0], 1, Sharing::Fair, false));
    close(o.vms[0].finish_s, 1.04 + TAIL);
    close(o.vms[0].bytes, 1e6);
}

#[test]
fn vms_under_way_at_time_zero_continue() {
    let f = fleet(
        link(8, 1),
        vec![vm("a", 5 * MB), vm("b", 3 * MB), vm("c", MB)],
        free(),
    );
    let opts = SimOptions {
        rate_factor: 1.0,
        initial: vec![
            Phase::Transfer {
                remaining_bytes: 1e6,
                switchover_s: -4.0,
            },
            Phase::Setup {
                switchover_in_s: 0.5,
            },
            Phase::Waiting,
        ],
        release_s: Vec::new(),
    };
    let s = one_link(vec![0, 1, 2], 2, Sharing::InOrder, false);
    let o = simulate(&f, &s, &opts).unwrap();
    close(o.vms[0].finish_s, 1.0 + TAIL);
    close(o.vms[0].exposure_s(), 5.0 + TAIL);
    close(o.vms[1].switchover_s, 0.5);
    // b gets what a leaves: nothing until a ends at 1 s, then 1 MB/s: 3 MB by 4 s.
    close(o.vms[1].finish_s, 4.0 + TAIL);
    // c starts when a's place frees, as a is done; InOrder gives it nothing until b ends.
    close(o.vms[2].start_s, 1.0 + TAIL);
    close(o.vms[2].finish_s, 5.0 + TAIL);
}

#[test]
fn a_rate_factor_slows_every_link() {
    let f = fleet(link(8, 1), vec![vm("a", MB)], free());
    let opts = SimOptions {
        rate_factor: 0.5,
        initial: Vec::new(),
        release_s: Vec::new(),
    };
    let o = simulate(&f, &one_link(vec![0], 1, Sharing::Fair, false), &opts).unwrap();
    close(o.vms[0].finish_s, 2.0 + TAIL);
    assert_eq!(o.saved(2.0), 0);
    assert_eq!(o.saved(2.01), 1);
}

#[test]
fn vms_left_out_are_not_run_and_bad_schedules_are_refused() {
    let f = fleet(link(8, 1), vec![vm("a", MB), vm("b", MB)], free());
    let o = run(&f, &one_link(vec![1], 1, Sharing::Fair, false));
    assert!(!o.vms[0].ran());
    assert!(o.vms[1].ran());
    close(o.mean_completion_s(), 1.0 + TAIL);
    let err = |s: Schedule| simulate(&f, &s, &SimOptions::default()).unwrap_err();
    assert_eq!(
        err(one_link(vec![0, 0], 1, Sharing::Fair, false)),
        ScheduleError::Twice(0)
    );
    assert_eq!(
        err(one_link(vec![0], 0, Sharing::Fair, false)),
        ScheduleError::NoConcurrency(0)
    );
    assert_eq!(
        err(Schedule { links: vec![] }),
        ScheduleError::LinkCount { got: 0, want: 1 }
    );
    let opts = SimOptions {
        rate_factor: 1.0,
        initial: vec![
            Phase::Waiting,
            Phase::Setup {
                switchover_in_s: 0.0,
            },
        ],
        release_s: Vec::new(),
    };
    assert_eq!(
        simulate(&f, &one_link(vec![0], 1, Sharing::Fair, false), &opts).unwrap_err(),
        ScheduleError::UnderWayNotScheduled(1)
    );
}

#[test]
fn a_vm_with_nothing_stale_finishes_after_its_setup_and_tail() {
    let f = fleet(link(8, 1), vec![vm("a", 0), vm("b", MB)], free());
    let o = run(&f, &one_link(vec![0, 1], 1, Sharing::Fair, false));
    close(o.vms[0].finish_s, TAIL);
    close(o.vms[1].finish_s, 1.0 + 2.0 * TAIL);
}

#[test]
fn release_times_replay_a_schedule_as_it_ran() {
    // 1 MB/s. a alone for 0.5 s (0.5 MB left), then both at 0.5 MB/s: a ends at 1.5 s,
    // b (0.5 MB moved by then) alone at 1 MB/s ends at 2.0 s.
    let f = fleet(link(8, 1), vec![vm("a", MB), vm("b", MB)], free());
    let o = simulate(
        &f,
        &one_link(vec![0, 1], 2, Sharing::Fair, false),
        &SimOptions::replay(vec![0.0, 0.5]),
    )
    .unwrap();
    close(o.vms[1].start_s, 0.5);
    close(o.vms[0].finish_s, 1.5 + TAIL);
    close(o.vms[1].finish_s, 2.0 + TAIL);
    // A release in the middle of a gap: the link idles until it.
    let o = simulate(
        &f,
        &one_link(vec![0, 1], 1, Sharing::Fair, false),
        &SimOptions::replay(vec![0.0, 3.0]),
    )
    .unwrap();
    close(o.vms[1].start_s, 3.0);
    close(o.vms[1].finish_s, 4.0 + TAIL);
}
