//! The orchestrator's decisions on small fleets whose answer is known.

use std::time::Duration;

use super::*;
use crate::model::{Costs, Link, Vm, DEFAULT_WINDOW_BYTES};

const MB: u64 = 1_000_000;

/// One 1 Gbit/s link of 100 ms with the default window: one flow moves 312.5 Mbit/s, so
/// the planner runs several at once.
fn fleet(n: usize) -> Fleet {
    let link = Link {
        name: "wan".into(),
        rate_bps: 1_000_000_000,
        rtt: Duration::from_millis(100),
        shared_rate_bps: None,
        per_flow_window_bytes: DEFAULT_WINDOW_BYTES,
        replication_budget_bps: None,
    };
    let vms = (0..n)
        .map(|i| Vm::idle(format!("vm{i}"), 0, (i as u64 + 1) * 100 * MB))
        .collect();
    Fleet::new(vec![link], vms, Costs::default()).unwrap()
}

/// [`fleet`] with a window of 1 GiB: one flow fills the link, so the planner runs one at
/// a time and prestarts the next.
pub(super) fn one_flow_fills_the_link(n: usize) -> Orchestration {
    let mut f = fleet(n);
    f.links[0].per_flow_window_bytes = 1 << 30;
    Orchestration::new(f, PlanOptions::new(3600.0), &[]).unwrap()
}

#[test]
fn starts_follow_the_plans_order_and_concurrency() {
    let o = Orchestration::new(fleet(10), PlanOptions::new(3600.0), &[]).unwrap();
    let ls = &o.plan().schedule.links[0];
    let due = o.due(0.0);
    assert_eq!(due.len(), ls.concurrency, "{due:?}");
    assert_eq!(due, ls.order[..ls.concurrency].to_vec());
}

#[test]
fn a_slot_frees_when_a_vm_is_done_or_fails_and_the_next_one_starts() {
    let mut o = Orchestration::new(fleet(10), PlanOptions::new(3600.0), &[]).unwrap();
    let first = o.due(0.0);
    for &i in &first {
        o.started(i, 0.0);
    }
    assert!(o.due(0.1).is_empty(), "every slot is taken");
    assert!(o.progress(first[0], 0.4, Some(50 * MB), 1000));
    assert!(
        !o.progress(first[0], 0.5, Some(40 * MB), 2000),
        "one switchover"
    );
    o.done(first[0], 2.0, 3000, Some(100));
    o.failed(first[1], 2.0, "the source died".into());
    o.replan(2.0).unwrap();
    let next = o.due(2.0);
    assert_eq!(next.len(), 2, "{next:?}");
    assert!(next.iter().all(|i| !first.contains(i)));
    assert_eq!(o.phase(first[0]), Phase::Done);
    assert_eq!(o.phase(first[1]), Phase::Failed);
    // Nothing changes a final VM any more.
    o.done(first[1], 3.0, 0, None);
    assert_eq!(o.phase(first[1]), Phase::Failed);
}

#[test]
fn unreachable_and_skipped_vms_never_start_and_the_rest_finishes() {
    let mut opts = PlanOptions::new(3600.0);
    opts.skip = vec![3];
    let why = "no answer \x1b[31mfrom vm \"x\"\x1b[0m".to_string();
    let mut o = Orchestration::new(fleet(4), opts, &[(1, why)]).unwrap();
    let mut started = Vec::new();
    let mut t = 0.0;
    while !o.is_finished() {
        for i in o.due(t) {
            o.started(i, t);
            started.push(i);
        }
        for i in 0..4 {
            if o.phase(i).is_under_way() {
                o.progress(i, t + 0.1, Some(0), 10);
                o.done(i, t + 0.5, 10, Some(1));
            }
        }
        t += 1.0;
        o.replan(t).unwrap();
        assert!(t < 20.0, "does not finish");
    }
    started.sort();
    assert_eq!(started, vec![0, 2]);
    let r = o.report();
    assert_eq!(r.totals.done, 2);
    assert_eq!(r.totals.failed, 1);
    assert_eq!(r.totals.skipped, 1);
    assert_eq!(r.totals.saved_by_deadline, 2);
    let vm1 = &r.vms[1];
    assert_eq!(vm1.outcome, Phase::Failed);
    assert_eq!(
        vm1.error.as_deref(),
        Some("no answer \\u{1b}[31mfrom vm \"x\"\\u{1b}[0m"),
        "cleaned as every failure's reason"
    );
    assert_eq!(vm1.measured, Timeline::default());
    let vm0 = &r.vms[0];
    assert_eq!(vm0.measured.start_s, Some(0.0));
    assert_eq!(vm0.measured.switchover_s, Some(0.1));
    assert_eq!(vm0.measured.finish_s, Some(0.5));
    assert!(vm0.planned.finish_s.is_some());
    assert_eq!(r.vms[3].outcome, Phase::Skipped);
}

#[test]
fn measured_progress_reaches_the_replan() {
    let mut o = Orchestration::new(fleet(2), PlanOptions::new(3600.0), &[]).unwrap();
    o.waiting(1, 7 * MB);
    o.started(0, 0.0);
    o.progress(0, 0.5, Some(20 * MB), 1);
    let m = o.measured(1.0);
    assert_eq!(m.vms.len(), 2);
    assert_eq!(
        m.vms[0].state,
        VmState::Transferring {
            remaining_bytes: 20 * MB,
            switchover_s: 0.5,
            started_s: 0.0,
        }
    );
    assert_eq!(
        m.vms[1].state,
        VmState::Waiting {
            stale_bytes: 7 * MB
        }
    );
    o.replan(1.0).unwrap();
    assert_eq!(o.plan().now_s, 1.0);
}

#[test]
fn a_vm_done_after_the_deadline_is_not_saved() {
    let mut o = Orchestration::new(fleet(1), PlanOptions::new(10.0), &[]).unwrap();
    o.started(0, 0.0);
    o.done(0, 11.0, 1, None);
    let r = o.report();
    assert!(!r.vms[0].saved_by_deadline);
    assert_eq!(r.totals.saved_by_deadline, 0);
    assert_eq!(r.totals.makespan_s, Some(11.0));
    // Switchover not reported: it is taken to be at the finish.
    assert_eq!(r.vms[0].measured.switchover_s, Some(11.0));
}

/// Four VMs of 400 MB under way at once on [`fleet`]'s 1 Gbit/s link (four flows of
/// 312.5 Mbit/s fill it), the sources' bytes growing together by `bytes_per_s` a second
/// (`moving` of them; the others stop after 2 s), re-planned every second to 4 s.
fn four_under_way(bytes_per_s: u64, moving: usize) -> Orchestration {
    let mut f = fleet(4);
    for v in &mut f.vms {
        v.stale_bytes = 400 * MB;
        v.memory_bytes = 400 * MB;
        v.working_set_bytes = 400 * MB;
    }
    let mut o = Orchestration::new(f, PlanOptions::new(3600.0), &[]).unwrap();
    for vm in 0..4 {
        o.started(vm, 0.0);
        o.progress(vm, 0.1, Some(400 * MB), 0);
    }
    assert_eq!(o.link_rate(0), None, "nothing measured yet");
    for s in 1..=4u64 {
        for vm in 0..4 {
            let secs = if vm < moving { s } else { s.min(2) };
            let sent = secs * bytes_per_s / 4;
            o.progress(vm, s as f64, Some(400 * MB - sent), sent);
        }
        o.replan(s as f64).unwrap();
        if s < 4 {
            assert_eq!(o.link_rate(0), None, "only {s} s of samples");
        }
    }
    o
}

#[test]
fn a_full_link_is_measured_and_the_replan_uses_its_rate() {
    // The link delivers only half its 1 Gbit/s: 62.5 MB a second.
    let mut o = four_under_way(62_500_000, 4);
    let planned_finish = o.first_plan().totals.makespan_s;
    let rate = o.link_rate(0).unwrap();
    assert!((rate as f64 - 500e6).abs() < 1e6, "{rate}");
    // Four flows carried it: that is its shared rate, not what one flow alone gets; one
    // flow, not measured yet, is planned at it too, as the rate limits take it.
    let m = &o.measured(4.0).links[0];
    assert_eq!((m.rate_bps, m.shared_rate_bps), (Some(rate), Some(rate)));
    // A time that is not one is refused while the link is full, and leaves its samples
    // as they were.
    assert!(o.replan(f64::NAN).is_err());
    assert!(o.link_samples[0].at.iter().all(|&(t, _)| t.is_finite()));
    assert_eq!(o.link_rate(0), Some(rate));
    // The 1,350 MB left (and 4% overhead) at the measured 500 Mbit/s: 22.5 s from now;
    // at the plan file's 1 Gbit/s it would have been 11.2 s.
    let makespan = o.plan().totals.makespan_s;
    assert!(
        makespan > 4.0 + 22.0,
        "{makespan} (planned {planned_finish})"
    );

    // A link its transfers cannot fill (one VM left) tells nothing: the window restarts,
    // and the shared rate measured is kept for the re-plans (one flow's is not known).
    for vm in 1..4 {
        o.done(vm, 4.5, 62_500_000, None);
    }
    o.replan(5.0).unwrap();
    assert_eq!(
        o.link_rate(0),
        Some(rate),
        "one flow carries it now, not measured yet: the shared rate stands for it"
    );
    let m = &o.measured(5.0).links;
    assert_eq!(m.len(), 1);
    assert_eq!(
        (m[0].rate_bps, m[0].shared_rate_bps),
        (Some(rate), Some(rate))
    );
}

#[test]
fn a_kept_shared_rate_below_one_flows_cap_holds_steadily() {
    // Four flows of 312.5 Mbit/s measured at 300 Mbit/s together.
    let mut o = four_under_way(37_500_000, 4);
    assert!((o.link_rate(0).unwrap() as f64 - 300e6).abs() < 1e6);
    let ls = &o.plan().schedule.links[0];
    assert!(
        ls.sharing == Sharing::InOrder || ls.prestart,
        "a link that holds VMs: {ls:?}"
    );
    // One flow fills 300 Mbit/s: the other three are held, so one flow carries the link,
    // at its cap, beside the held VMs' trickle (15 Mbit/s each): one flow's rate comes out
    // at 357 Mbit/s. The holds stay: with one flow's rate (or, before it is measured, the
    // plan file's) in place of the shared one, a second flow went through, two flows
    // made the class shared again, whose rate held it again, every turn.
    let (mut sent, mut held) = ([37_500_000u64; 4], Vec::new());
    for s in 5..=12u64 {
        let now = s as f64;
        for (vm, bytes) in sent.iter_mut().enumerate() {
            *bytes += if vm == 0 { 39_062_500 } else { 1_875_000 };
            o.progress(vm, now, Some(400 * MB - *bytes), *bytes);
        }
        o.replan(now).unwrap();
        held.push(o.rate_caps(now).iter().filter(|c| c.is_some()).count());
    }
    assert_eq!(held, vec![3; 8]);
    let one = o.measured(12.0).links[0].rate_bps.unwrap();
    assert!((one as f64 - 357e6).abs() < 2e6, "{one}");
}

#[test]
fn a_transfer_that_fails_takes_the_rates_it_sat_through_with_it() {
    // Two of the four stop after 2 s while counted as filling the link: the link seemed to
    // deliver 2 × 15.6 MB a second from then on.
    let mut o = four_under_way(62_500_000, 2);
    assert!(o.link_rate(0).is_some());
    // Kept when the class changes, as at the next turn.
    o.link_samples[0].restart();
    assert!(o.link_rate(0).is_some(), "kept");
    // One of those that moved fails: its last move (4 s) is the window's end, so the
    // rate stays...
    o.failed(0, 5.0, "its source died".into());
    assert!(o.link_rate(0).is_some());
    // ...and one that sat since 2 s takes it with it.
    o.failed(3, 5.0, "its source went silent".into());
    assert_eq!(o.link_rate(0), None);
    assert!(o.measured(5.0).links.is_empty());
}

#[test]
fn each_class_keeps_its_last_full_window_and_a_stall_since_drops_it() {
    let mut s = LinkSamples::default();
    let fill = |s: &mut LinkSamples, from: u64, secs: u64, bytes_per_s: u64| {
        for t in from..=from + secs {
            s.at.push_back((t as f64, t * bytes_per_s));
        }
    };
    // One flow, 2 s: too short to say anything, so nothing is kept.
    fill(&mut s, 0, 2, 100_000_000);
    s.restart();
    assert_eq!((s.rate(false), s.rate(true)), (None, None));
    // One flow, 4 s at 800 Mbit/s; then several, 3 s at 400.
    fill(&mut s, 10, 4, 100_000_000);
    s.restart();
    s.shared = true;
    fill(&mut s, 20, 3, 50_000_000);
    assert_eq!(
        (s.rate(false), s.rate(true)),
        (Some(800_000_000), Some(400_000_000))
    );
    s.restart();
    s.shared = false;
    // A window of its class under way replaces the kept rate once it is long enough.
    fill(&mut s, 30, 2, 110_000_000);
    assert_eq!(s.rate(false), Some(800_000_000), "2 s of the new window");
    s.at.push_back((33.0, 33 * 110_000_000));
    assert_eq!(s.rate(false), Some(880_000_000));
    assert_eq!(
        s.rate(true),
        Some(400_000_000),
        "the other class keeps its rate"
    );
    // A transfer found stalled, not moving since 21 s: the shared window (to 23 s) and the
    // one under way held its trickle; one flow's kept window ended at 14 s.
    s.forget_since(21.0);
    assert_eq!((s.rate(false), s.rate(true)), (Some(800_000_000), None));
    // A window that ended when the VM last moved is kept.
    s.forget_since(14.0);
    assert_eq!(s.rate(false), Some(800_000_000));
    // A window over which no bytes were sent says nothing and replaces nothing.
    fill(&mut s, 40, 4, 0);
    s.restart();
    assert_eq!(s.rate(false), Some(800_000_000));
    s.forget_since(13.0);
    assert_eq!((s.rate(false), s.rate(true)), (None, None));
}

#[test]
fn the_baselines_start_as_they_say() {
    let opts = PlanOptions::new(3600.0);
    // Largest first in the fleet's order, so that smallest first has to reorder.
    let mut f = fleet(5);
    f.vms.reverse();
    let all = Orchestration::with_policy(f.clone(), opts.clone(), &[], Policy::AllAtOnce).unwrap();
    let mut due = all.due(0.0);
    due.sort_unstable();
    assert_eq!(due, vec![0, 1, 2, 3, 4], "every VM at once");
    assert_eq!(all.plan().links[0].policy, "all_at_once");

    let mut one = Orchestration::with_policy(f, opts, &[], Policy::SmallestFirst).unwrap();
    assert_eq!(one.due(0.0), vec![4], "the smallest, alone");
    one.started(4, 0.0);
    assert!(one.due(0.1).is_empty());
    one.done(4, 1.0, 100 * MB, None);
    // Re-planning keeps the baseline: the next smallest, still alone.
    one.replan(1.0).unwrap();
    assert_eq!(one.due(1.0), vec![3]);
    assert_eq!(one.plan().schedule.links[0].concurrency, 1);
}

#[test]
fn measured_tails_replace_the_plan_files_finish() {
    // 100 ms of RTT: the file's tail is 0.1 s + 40 ms. Three transfers reported their last
    // bytes gone at 1.0 s and were done at 1.15, 1.17 and 1.35 s: beyond the round trip,
    // 50, 70 and 250 ms; the median, 70 ms, is the finish the rest are planned with.
    let mut o = Orchestration::new(fleet(6), PlanOptions::new(3600.0), &[]).unwrap();
    let tail = |o: &Orchestration| o.fleet().costs.tail_s(&o.fleet().links[0]);
    assert!((tail(&o) - 0.14).abs() < 1e-9);
    for (vm, done) in [(0, 1.15), (1, 1.17), (2, 1.35)] {
        o.started(vm, 0.0);
        o.progress(vm, 0.5, Some(10 * MB), 1);
        o.progress(vm, 1.0, Some(0), 1);
        o.done(vm, done, 10 * MB, None);
    }
    // One heard of only when done says nothing of its tail.
    o.started(3, 0.0);
    o.done(3, 5.0, 10 * MB, None);
    o.replan(5.0).unwrap();
    assert_eq!(o.fleet().costs.finish, Duration::from_millis(70));
    assert!((tail(&o) - 0.17).abs() < 1e-9);
    // The report's timeline says when each last byte left.
    let r = o.report();
    assert_eq!(r.vms[0].measured.last_byte_s, Some(1.0));
    assert_eq!(r.vms[3].measured.last_byte_s, None);
}

#[test]
fn measured_setups_replace_the_plan_files_switchover() {
    // 100 ms of RTT × 3 round trips + 50 ms: the file's setup is 0.35 s. The two VMs that
    // started took 0.6 s and 0.8 s to switch over: the median beyond the round trips is
    // 0.5 s, so the waiting VMs are planned with a setup of 0.8 s.
    let mut o = Orchestration::new(fleet(6), PlanOptions::new(3600.0), &[]).unwrap();
    let setup = |o: &Orchestration, vm: usize| {
        let p = &o.plan().vms[vm];
        p.switchover_s.unwrap() - p.start_s.unwrap()
    };
    assert!((setup(&o, 5) - 0.35).abs() < 1e-9, "{}", setup(&o, 5));
    o.started(0, 0.0);
    o.started(1, 0.0);
    o.progress(0, 0.6, Some(10 * MB), 1);
    o.progress(1, 0.8, Some(10 * MB), 1);
    // Two more were heard of only when done: their setups were not measured, and taking
    // start → finish (4.7 s beyond the round trips) for one would move the median.
    for vm in [2, 3] {
        o.started(vm, 0.0);
        o.done(vm, 5.0, 10 * MB, None);
    }
    // One started by its source (SIGUSR1) and heard of transferring: its start here is
    // when it was heard, its switchover 0.2 s before (its report's age); not a setup.
    let elsewhere = crate::control::Status {
        evacuation: crate::control::EvacState::Transferring,
        pages_remaining: Some(100),
        progress_age_ms: Some(200),
        ..crate::control::tests::status()
    };
    let change = o.hear_status(4, &elsewhere, 0.9);
    assert_eq!(change, StatusChange::UnderWayElsewhere);
    o.started(4, 0.9);
    assert_eq!(o.hear_event(4, &elsewhere, 0.9), Change::Switchover);
    o.replan(1.0).unwrap();
    assert_eq!(o.fleet().costs.switchover, Duration::from_millis(500));
    let waiting = (2..6).find(|&i| o.phase(i) == Phase::Waiting).unwrap();
    assert!(
        (setup(&o, waiting) - 0.8).abs() < 1e-6,
        "{}",
        setup(&o, waiting)
    );
}

#[test]
fn the_next_prestart_is_foreseen_from_the_plan() {
    // One link a single flow fills: the planner runs one at a time and prestarts the next.
    let mut o = one_flow_fills_the_link(3);
    assert!(o.plan().schedule.links[0].prestart);
    assert_eq!(o.next_due_s(0.0), None, "nothing transfers yet");
    let first = o.due(0.0);
    assert_eq!(first.len(), 1, "{first:?}");
    o.started(first[0], 0.0);
    assert!(o.progress(first[0], 0.2, Some(100 * MB), 0));
    o.replan(0.2).unwrap();
    let at = o.next_due_s(0.2).expect("a prestart is foreseen");
    // One setup and the lead before its last byte leaves, one tail before its finish.
    let (link, costs) = (&o.fleet().links[0], &o.fleet().costs);
    let (setup, tail) = (costs.setup_s(link), costs.tail_s(link));
    let finish = o.plan().vms[first[0]].finish_s.unwrap();
    assert!(
        (at - (finish - tail - setup - PRESTART_LEAD_S)).abs() < 1e-9,
        "{at} vs {finish} - {tail} - {setup} - {PRESTART_LEAD_S}"
    );
    assert!(o.due(at - 0.01).is_empty(), "not yet");
    assert_eq!(o.due(at).len(), 1, "due then");
    assert_eq!(
        o.next_due_s(at + 0.01),
        None,
        "passed: a start waits for news"
    );
}

/// `o` with its link shared in order, `k` at once.
fn in_order(mut o: Orchestration, k: usize) -> Orchestration {
    let ls = &mut o.current.schedule.links[0];
    ls.sharing = Sharing::InOrder;
    ls.concurrency = k;
    o
}

/// `vms` VMs on one link that runs two at once in order, without prestart (a stall's
/// effect on the places is then the only one), against a deadline `deadline_s` away.
fn two_at_once(vms: usize, deadline_s: f64) -> Orchestration {
    let mut o = in_order(
        Orchestration::new(fleet(vms), PlanOptions::new(deadline_s), &[]).unwrap(),
        2,
    );
    o.current.schedule.links[0].prestart = false;
    o
}

#[test]
fn in_order_links_hold_the_vms_beyond_what_fills_the_link() {
    // 312.5 Mbit/s per flow on 1 Gbit/s: four flows fill it, the fifth and sixth wait.
    let mut o = in_order(
        Orchestration::new(fleet(8), PlanOptions::new(3600.0), &[]).unwrap(),
        6,
    );
    let due = o.due(0.0);
    assert_eq!(due.len(), 6);
    assert_eq!(o.rate_caps(0.0), vec![None; 8], "nothing under way yet");
    for (k, &i) in due.iter().enumerate() {
        o.started(i, k as f64 * 0.01);
    }
    // Switchovers in the reverse order of the starts: the starts (the plan's order) decide.
    for (k, &i) in due.iter().rev().enumerate() {
        o.progress(i, 0.5 + k as f64 * 0.1, Some(100 * MB), 0);
    }
    let caps = o.rate_caps(1.0);
    let hold = Some((1e9 * HOLD_SHARE) as u64);
    for (k, &i) in due.iter().enumerate() {
        let want = if k < 4 { None } else { hold };
        assert_eq!(caps[i], want, "start #{k} (vm {i}): {caps:?}");
    }
    for i in (0..8).filter(|i| !due.contains(i)) {
        assert_eq!(caps[i], None, "vm {i} waits: no limit to send");
    }
    // The first transfer ends: the fifth takes its place, the sixth still waits.
    let first = due[0];
    o.done(first, 2.0, 0, Some(1));
    let caps = o.rate_caps(2.0);
    assert_eq!(caps[due[4]], None, "{caps:?}");
    assert_eq!(caps[due[5]], hold, "{caps:?}");
    assert_eq!(caps[first], None);
}

#[test]
fn vms_started_together_take_the_link_fewest_bytes_left_first() {
    // Three started at once; one flow fills the link (the stated window of a 1 Gbit/s
    // path), so one at a time.
    let together = || {
        let mut o = in_order(
            Orchestration::new(fleet(3), PlanOptions::new(3600.0), &[]).unwrap(),
            3,
        );
        o.fleet.links[0].per_flow_window_bytes = 20 * MB;
        for vm in 0..3 {
            o.started(vm, 0.0);
        }
        o
    };
    let hold = Some((1e9 * HOLD_SHARE) as u64);
    // vm2 has the fewest bytes left, then vm0; vm1 switched over first.
    let mut o = together();
    o.progress(1, 0.3, Some(90 * MB), 0);
    o.progress(0, 0.4, Some(80 * MB), 0);
    o.progress(2, 0.5, Some(30 * MB), 0);
    assert_eq!(o.rate_caps(0.6), vec![hold, hold, None]);
    // While the others are still in setup, the transfer goes first.
    let mut o = together();
    o.progress(1, 0.3, Some(90 * MB), 0);
    assert_eq!(o.rate_caps(0.6), vec![hold, None, hold]);
}

#[test]
fn a_vm_in_setup_queues_behind_the_transfers_and_fair_links_hold_only_prestarts() {
    let mut o = in_order(
        Orchestration::new(fleet(6), PlanOptions::new(3600.0), &[]).unwrap(),
        5,
    );
    let due = o.due(0.0);
    for &i in &due {
        o.started(i, 0.0);
    }
    // Four transfers fill the link; the VM still in setup (started first) is held.
    for &i in &due[1..] {
        o.progress(i, 0.5, Some(100 * MB), 0);
    }
    let caps = o.rate_caps(0.5);
    assert!(caps[due[0]].is_some(), "{caps:?}");
    assert!(due[1..].iter().all(|&i| caps[i].is_none()), "{caps:?}");
    // Shared fairly, the transfers are not limited, however many; the (prestarted) VM in
    // setup still waits behind them.
    let ls = &mut o.current.schedule.links[0];
    ls.sharing = Sharing::Fair;
    ls.prestart = true;
    let caps = o.rate_caps(0.5);
    assert!(caps[due[0]].is_some(), "{caps:?}");
    assert!(due[1..].iter().all(|&i| caps[i].is_none()), "{caps:?}");
    // Without prestart (the baselines) nothing is limited.
    o.current.schedule.links[0].prestart = false;
    assert_eq!(o.rate_caps(0.5), vec![None; 6]);
}

#[test]
fn a_prestarted_vm_is_held_only_while_the_transfer_ahead_fills_the_link() {
    // One flow fills the link: one at a time, the next prestarted.
    let mut o = one_flow_fills_the_link(3);
    assert!(o.plan().schedule.links[0].prestart);
    let first = o.due(0.0)[0];
    o.started(first, 0.0);
    assert_eq!(o.rate_caps(0.0), vec![None; 3], "alone in its setup");
    o.progress(first, 0.3, Some(100 * MB), 0);
    o.replan(0.3).unwrap();
    let at = o.next_due_s(0.3).unwrap();
    let next = o.due(at)[0];
    o.started(next, at);
    assert!(o.rate_caps(at)[next].is_some(), "held behind the transfer");
    o.done(first, at + 1.0, 100 * MB, Some(1));
    assert_eq!(o.rate_caps(at + 1.0), vec![None; 3], "its turn");
}

#[test]
fn a_held_vm_takes_the_link_as_the_transfer_ahead_is_expected_to_end() {
    let mut o = one_flow_fills_the_link(3);
    let first = o.due(0.0)[0];
    o.started(first, 0.0);
    // 100 MB left, no rate measured yet: at the link's 1 Gbit/s its last bytes go at
    // 1.1 s; the link's round trip is 0.1 s.
    o.progress(first, 0.3, Some(100 * MB), 0);
    o.replan(0.3).unwrap();
    let at = o.next_due_s(0.3).unwrap();
    let next = o.due(at)[0];
    o.started(next, at);
    let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
    let end = o.expected_end_s(first).unwrap();
    assert!(close(end, 1.1), "{end}");
    let handoff = o.next_handoff_s(at).unwrap();
    assert!(close(handoff, 1.1), "{handoff}");
    assert!(o.rate_caps(1.09)[next].is_some(), "still held");
    assert_eq!(o.rate_caps(1.101), vec![None; 3], "its turn, before `done`");
    assert_eq!(o.next_handoff_s(1.101), None, "nothing more foreseen");
    // It turns out to send at 400 Mbit/s (35 MB in 0.7 s), 65 MB left: its end is
    // expected at 2.3 s, and the VM behind it is held again until then.
    o.progress(first, 1.0, Some(65 * MB), 35 * MB);
    assert!(close(o.expected_end_s(first).unwrap(), 2.3));
    assert!(o.rate_caps(1.05)[next].is_some());
    assert!(close(o.next_handoff_s(1.05).unwrap(), 2.3));
    // A report right after another does not measure a rate over milliseconds.
    o.progress(first, 1.01, Some(64 * MB), 35 * MB);
    assert!(close(
        o.expected_end_s(first).unwrap(),
        1.01 + 64.0 * 8e6 / 400e6
    ));
    // Its source reports the moment its last pages left (at 1.5 s, before the end its
    // rate foretold): the VM behind takes the link at once.
    o.progress(first, 1.5, Some(0), 99 * MB);
    assert!(close(o.expected_end_s(first).unwrap(), 1.5));
    assert_eq!(o.rate_caps(1.5), vec![None; 3]);
    // Without a VM behind it there is no hand-off to time.
    o.done(next, 1.6, 0, Some(1));
    assert_eq!(o.next_handoff_s(1.55), None);
}

#[test]
fn a_slow_link_holds_at_least_the_minimum() {
    let mut f = fleet(3);
    f.links[0].rate_bps = 10_000_000;
    let mut o = in_order(
        Orchestration::new(f, PlanOptions::new(3600.0), &[]).unwrap(),
        3,
    );
    for i in o.due(0.0) {
        o.started(i, 0.0);
        o.progress(i, 0.5 + i as f64, Some(MB), 0);
    }
    let caps = o.rate_caps(0.5);
    assert_eq!(caps[0], None);
    assert_eq!(caps[1], Some(MIN_HOLD_BPS), "{caps:?}");
    assert_eq!(caps[2], Some(MIN_HOLD_BPS));
    // Below 4 Mbit/s the minimum would be most of the link: a quarter of it.
    assert_eq!(hold_bps(2_000_000, STALL_AFTER_S), 500_000);
    assert_eq!(hold_bps(4_000_000, STALL_AFTER_S), MIN_HOLD_BPS);
    assert_eq!(hold_bps(1_000_000_000, STALL_AFTER_S), 50_000_000);
    // But enough that a held setup is seen moving: twice 128 KiB within the stall
    // timeout (10 s: 210 kbit/s; 3 s: 699 kbit/s), whatever that leaves of the link.
    assert_eq!(hold_bps(400_000, STALL_AFTER_S), 209_715);
    assert_eq!(hold_bps(2_000_000, MIN_STALL_AFTER_S), 699_050);
    assert_eq!(hold_bps(1, STALL_AFTER_S), 209_715);
}

#[test]
fn a_report_dated_before_the_start_or_the_last_report_counts_as_of_the_latest_it_can_be() {
    let mut o = one_flow_fills_the_link(3);
    let first = o.due(0.0)[0];
    o.started(first, 0.5);
    // A switchover dated before the start (an age larger than the setup) is at the start.
    assert!(o.progress(first, 0.2, Some(100 * MB), 0));
    let sw = o.report().vms[first].measured.switchover_s;
    assert_eq!(sw, Some(0.5));
    // 100 MB left at 0.5 s, at the link's 1 Gbit/s: its end at 1.3 s.
    let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
    assert!(close(o.expected_end_s(first).unwrap(), 1.3));
    // A later report dated before the last one is taken as of the last one: no rate
    // over a negative span, and the bytes left count from then.
    o.progress(first, 0.4, Some(90 * MB), 10 * MB);
    assert!(close(o.expected_end_s(first).unwrap(), 0.5 + 0.72));
}

#[test]
fn an_encoded_transfer_is_timed_in_pages_and_replanned_in_wire_bytes() {
    let mut o = one_flow_fills_the_link(3);
    let first = o.due(0.0)[0];
    o.started(first, 0.0);
    let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
    // At the switchover its source has pushed nothing yet: 100 MB of pages left, and no
    // ratio; at the link's 1 Gbit/s its end is 0.8 s later.
    o.progress(first, 0.2, Some(100 * MB), 0);
    assert!(close(o.expected_end_s(first).unwrap(), 1.0));
    // Its pages cost a quarter of a page on the wire: before a rate is measured, the
    // 100 MB left cross as 25 MB, in 0.2 s.
    o.set_wire_ratio(first, 0.25);
    assert!(close(o.expected_end_s(first).unwrap(), 0.4));
    // 40 MB of pages left in 0.25 s: 1.28 Gbit/s of pages, whatever the ratio did
    // meanwhile (counting the first report at a page a page and this one at a quarter,
    // 100 MB - 15 MB of wire bytes would be 2.72 Gbit/s).
    o.progress(first, 0.45, Some(60 * MB), 10 * MB);
    assert!(close(
        o.expected_end_s(first).unwrap(),
        0.45 + 60.0 * 8e6 / 1.28e9
    ));
    // The re-plan is given its pages left and its ratio, and moves them as the link
    // carries them.
    let m = o.measured(0.5);
    assert_eq!(
        m.vms[first].state,
        VmState::Transferring {
            remaining_bytes: 60 * MB,
            switchover_s: 0.2,
            started_s: 0.0,
        }
    );
    assert_eq!(m.vms[first].wire_ratio, Some(0.25));
    let p = crate::plan::replan(o.fleet(), &PlanOptions::new(3600.0), &m).unwrap();
    assert_eq!(p.vms[first].bytes_to_cross, Some(15 * MB));
    // Of two transfers started together, the one with fewer bytes on the wire left takes
    // the link first, whatever its pages: vm1's 600 MB of pages at a quarter are 150 MB.
    let mut o = in_order(
        Orchestration::new(fleet(3), PlanOptions::new(3600.0), &[]).unwrap(),
        3,
    );
    o.fleet.links[0].per_flow_window_bytes = 20 * MB;
    for vm in 0..3 {
        o.started(vm, 0.0);
    }
    o.progress(0, 0.3, Some(200 * MB), 0);
    o.set_wire_ratio(1, 0.25);
    o.progress(1, 0.3, Some(600 * MB), 0);
    o.progress(2, 0.3, Some(300 * MB), 0);
    let hold = Some((1e9 * HOLD_SHARE) as u64);
    assert_eq!(o.rate_caps(0.4), vec![hold, None, hold]);
    // A source never has more left than its VM holds (`fleet`'s are a TiB of memory).
    o.progress(2, 0.7, Some(u64::MAX), 0);
    assert!(matches!(
        o.measured(0.7).vms[2].state,
        VmState::Transferring {
            remaining_bytes: 1_099_511_627_776,
            ..
        }
    ));
    // A ratio no encoding gives is not taken.
    let mut o = one_flow_fills_the_link(3);
    o.started(first, 0.0);
    o.progress(first, 0.2, Some(100 * MB), 0);
    o.set_wire_ratio(first, 0.25);
    o.progress(first, 0.45, Some(60 * MB), 10 * MB);
    o.set_wire_ratio(first, f64::NAN);
    o.set_wire_ratio(first, -1.0);
    o.set_wire_ratio(first, 1.5);
    assert_eq!(o.measured(0.5).vms[first].wire_ratio, Some(0.25));
    assert!(close(
        o.expected_end_s(first).unwrap(),
        0.45 + 60.0 * 8e6 / 1.28e9
    ));
}

#[test]
fn absurd_byte_counts_from_sources_are_not_taken() {
    // Two sources on one link each claim 2^63 bytes sent: not taken (nor summed into an
    // overflow, which a debug build would panic on); the report counts what was believable.
    let mut o = Orchestration::new(fleet(2), PlanOptions::new(3600.0), &[]).unwrap();
    for vm in 0..2 {
        o.started(vm, 0.0);
        o.setting_up(vm, 0.2, 3 * MB);
        o.progress(vm, 0.5, Some(MB), 1 << 63);
    }
    o.replan(1.0).unwrap();
    o.replan(2.0).unwrap();
    o.done(0, 2.5, 1 << 63, None);
    o.done(1, 2.5, u64::MAX, None);
    let r = o.report();
    assert_eq!(r.totals.bytes_sent, 6 * MB);

    // A link measured full at 500 Mbit/s; then one source claims a petabyte: the
    // link's rate stays at most what it delivered (the others sent nothing more since),
    // in the window and as kept (with the claim taken: 2.6 Pbit/s).
    let mut o = four_under_way(62_500_000, 4);
    let rate = o.link_rate(0).unwrap();
    o.progress(0, 4.5, Some(250 * MB), 1 << 50);
    o.replan(4.5).unwrap();
    assert!(o.link_rate(0).unwrap() <= rate);
    for vm in 1..4 {
        o.done(vm, 4.6, 62_500_000, None);
    }
    o.replan(5.0).unwrap();
    assert!(o.link_rate(0).unwrap() <= rate, "kept");
    // Samples of a petabit a second (a VM whose size its own status raised, its jump
    // taken) are at most ten times the file's rate.
    let mut j = four_under_way(62_500_000, 4);
    let (t, b) = *j.link_samples[0].at.back().unwrap();
    j.link_samples[0].at.push_back((t + 1.0, b + (1 << 47)));
    assert_eq!(j.link_rate(0), Some(10_000_000_000));
    assert_eq!(
        j.measured(5.0).links[0].shared_rate_bps,
        Some(10_000_000_000)
    );
    // As much as a VM could send (four times its 400 MB, and the slack) is taken.
    let most = 4 * 400 * MB + SENT_SLACK_BYTES;
    o.done(0, 5.5, most, None);
    assert_eq!(o.report().totals.bytes_sent, most + 3 * 62_500_000);
}

#[test]
fn a_link_one_flow_carries_is_measured_as_its_rate_for_one_flow() {
    // One flow fills the 1 Gbit/s link by itself and delivers 960 Mbit/s.
    let mut o = one_flow_fills_the_link(2);
    let first = o.due(0.0)[0];
    o.started(first, 0.0);
    o.progress(first, 0.1, Some(1000 * MB), 0);
    for s in 1..=4u64 {
        let sent = s * 120 * MB;
        o.progress(first, s as f64, Some(1000 * MB - sent), sent);
        o.replan(s as f64).unwrap();
    }
    let m = &o.measured(4.0).links[0];
    let rate = m.rate_bps.expect("measured as one flow's");
    assert!((rate as f64 - 960e6).abs() < 1e6, "{rate}");
    assert_eq!(m.shared_rate_bps, None);
}

/// `first` transferring with 90 MB left at 1.0, re-planned then; `next` prestarted at 5.0
/// (the first's place went to its setup). Three VMs.
fn first_with_next_prestarted() -> (Orchestration, usize, usize) {
    let mut o = one_flow_fills_the_link(3);
    let first = o.due(0.0)[0];
    o.started(first, 0.0);
    o.progress(first, 0.3, Some(100 * MB), 0);
    o.progress(first, 1.0, Some(90 * MB), 10 * MB);
    o.replan(1.0).unwrap();
    let next = o.due(5.0);
    assert_eq!(next.len(), 1, "{next:?}");
    let next = next[0];
    o.started(next, 5.0);
    (o, first, next)
}

/// [`first_with_next_prestarted`], `first` stopped since 1.0, `next` held behind it,
/// trickling; re-planned every second to 10.0, so the link's rate is measured.
fn stopped_with_one_behind() -> (Orchestration, usize, usize) {
    let (mut o, first, next) = first_with_next_prestarted();
    o.progress(next, 5.3, Some(200 * MB), 0);
    // Alive and reporting, but not moving (its probes still count as bytes sent), while
    // the VM held behind it trickles: the link carries it.
    for k in 2..=10 {
        let now = k as f64;
        o.progress(first, now, Some(90 * MB), 10 * MB + k * 1000);
        o.progress(next, now + 0.5, Some(200 * MB - k * MB), 0);
        o.replan(now).unwrap();
        assert!(o.stalls(now).is_empty(), "moved at 1.0, now {k}");
    }
    (o, first, next)
}

#[test]
fn a_stalled_transfer_gives_the_link_to_the_vm_behind_it_and_comes_back_behind_it() {
    let (mut o, first, next) = stopped_with_one_behind();
    let hold = Some((1e9 * HOLD_SHARE) as u64);
    assert!(o.stalls(10.9).is_empty());
    assert!(o.rate_caps(10.9)[next].is_some(), "held behind it");
    let sat = o.link_rate(0);
    assert!(sat.is_some(), "measured while it sat");
    // One flow carried it: several flows' rate is the plan file's.
    let m = &o.measured(10.9).links[0];
    assert_eq!((m.rate_bps, m.shared_rate_bps), (sat, None));
    // Had the class changed just before (the window kept), that rate is not the link's
    // either: the stalled VM sat through it.
    o.link_samples[0].restart();
    assert!(o.link_rate(0).is_some(), "kept");
    assert_eq!(
        o.stalls(11.0),
        vec![StallChange::Stalled {
            vm: first,
            since_s: 1.0,
            remaining_bytes: 90 * MB
        }]
    );
    assert!(o.stalls(11.5).is_empty(), "said once");
    assert_eq!(o.stalled_since(first), Some(1.0));
    // The next VM takes the link: the stalled one is held, and planned as lost.
    let caps = o.rate_caps(11.0);
    assert_eq!((caps[first], caps[next]), (hold, None), "{caps:?}");
    assert_eq!(o.expected_end_s(first), None);
    assert_eq!(
        o.link_rate(0),
        None,
        "what the link carried while it sat is not its rate"
    );
    assert!(o.measured(11.0).links.is_empty());
    o.replan(11.0).unwrap();
    assert_eq!(o.plan().vms[first].status, Status::Failed);
    assert!(o.plan().vms[next].finish_s.is_some());
    let r = o.report();
    assert_eq!(r.vms[first].stalled_since_s, Some(1.0));
    assert_eq!(r.totals.stalled, 1);
    // A page is not moving again...
    o.progress(first, 11.5, Some(90 * MB - 4096), 10 * MB);
    assert!(o.stalls(11.5).is_empty());
    // ...a megabyte is: it takes a place again, behind the VM that runs in its place.
    o.progress(first, 12.0, Some(89 * MB), 11 * MB);
    assert_eq!(
        o.stalls(12.0),
        vec![StallChange::Moving {
            vm: first,
            stalled_for_s: 11.0
        }]
    );
    assert_eq!(o.stalled_since(first), None);
    let caps = o.rate_caps(12.0);
    assert!(caps[first].is_some() && caps[next].is_none(), "{caps:?}");
    assert!(o.expected_end_s(first).is_some());
    o.done(first, 14.0, 100 * MB, Some(1));
    let r = o.report();
    assert_eq!(r.totals.stalled, 0);
    assert_eq!(
        r.vms[first].stalls,
        [StallSpan {
            since_s: 1.0,
            until_s: Some(12.0)
        }]
    );
    assert!(r.vms[next].stalls.is_empty());
}

#[test]
fn a_stalled_vm_frees_its_place_on_a_link_that_runs_k_at_once() {
    let mut o = two_at_once(4, 3600.0);
    let due = o.due(0.0);
    assert_eq!(due.len(), 2);
    for &i in &due {
        o.started(i, 0.0);
        o.progress(i, 0.5, Some(100 * MB), 0);
    }
    o.progress(due[1], 10.0, Some(90 * MB), 0);
    assert!(o.due(10.4).is_empty(), "both places taken");
    let stalls = o.stalls(10.5);
    assert!(
        matches!(stalls[..], [StallChange::Stalled { vm, since_s, .. }] if vm == due[0] && since_s == 0.5),
        "{stalls:?}"
    );
    let third = o.due(10.5);
    assert_eq!(third.len(), 1, "{third:?}");
    assert!(!due.contains(&third[0]));
}

#[test]
fn a_setup_moves_as_it_sends_and_stalls_when_it_does_not() {
    let mut o = Orchestration::new(fleet(3), PlanOptions::new(3600.0), &[]).unwrap();
    o.set_stall_after(1.0); // taken as the least, 3 s
    o.set_stall_after(f64::NAN); // ignored
    let due = o.due(0.0);
    assert_eq!(due.len(), 3, "{due:?}");
    let (a, b, c) = (due[0], due[1], due[2]);
    for &i in &due {
        o.started(i, 0.0);
    }
    // `c` moves throughout; `b`'s setup is held and sends its stale set slowly; `a`
    // sends only keep-alives.
    for k in 1..=5 {
        let now = k as f64;
        o.progress(c, now, Some(100 * MB - k * MB), 0);
        o.setting_up(b, now, k * MOVE_BYTES);
        o.setting_up(a, now, k * 100);
        let stalls = o.stalls(now);
        if k < 3 {
            assert!(stalls.is_empty(), "at {k}: {stalls:?}");
        }
    }
    assert_eq!(o.stalled_since(a), Some(0.0), "keep-alives are not moving");
    assert_eq!(o.stalled_since(b), None);
    assert_eq!(o.stalled_since(c), None);
    // Its switchover is moving again; its setup is not learnt from.
    o.progress(a, 6.0, Some(50 * MB), 10 * MB);
    assert!(matches!(o.stalls(6.0)[..], [StallChange::Moving { vm, .. }] if vm == a));
    o.replan(6.0).unwrap();
    // (`c`'s 1 s less the handshake's round trips; with `a`'s, the median would be 5.7 s.)
    let learnt = o.fleet().costs.switchover;
    assert!(learnt < Duration::from_secs(1), "{learnt:?}");
}

#[test]
fn a_source_without_a_count_moves_as_it_sends_more_than_keep_alives() {
    let mut o = Orchestration::new(fleet(2), PlanOptions::new(3600.0), &[]).unwrap();
    o.set_stall_after(3.0);
    let (a, b) = (o.due(0.0)[0], o.due(0.0)[1]);
    o.started(a, 0.0);
    o.started(b, 0.0);
    o.progress(a, 0.5, None, MOVE_BYTES);
    o.progress(b, 0.5, Some(100 * MB), 0);
    o.progress(a, 2.0, None, 2 * MOVE_BYTES);
    for k in 3..=5 {
        let now = k as f64;
        o.progress(b, now, Some(100 * MB - k * MB), 0);
        o.progress(a, now, None, 2 * MOVE_BYTES + k * 100);
        let stalls = o.stalls(now);
        assert_eq!(stalls.is_empty(), k < 5, "at {k}: {stalls:?}");
    }
    assert_eq!(o.stalled_since(a), Some(2.0));
    // Keep-alives over a long time do not add up to a move.
    for k in 6..=30 {
        o.progress(b, k as f64, Some(90 * MB - k * MB), 0);
        o.progress(a, k as f64, None, 2 * MOVE_BYTES + 500 + k * 5000);
        assert!(o.stalls(k as f64).is_empty(), "at {k}");
    }
    o.progress(a, 31.0, None, 5 * MOVE_BYTES);
    assert!(matches!(o.stalls(31.0)[..], [StallChange::Moving { vm, .. }] if vm == a));
    // A stalled VM that fails is failed, not stalled.
    o.progress(b, 33.5, Some(50 * MB), 0);
    assert_eq!(o.stalls(34.0).len(), 1);
    assert_eq!(o.report().totals.stalled, 1);
    o.failed(a, 35.0, "its source went silent".into());
    assert_eq!(o.stalled_since(a), None);
    assert_eq!(o.report().totals.stalled, 0);
}

#[test]
fn a_transfer_in_its_last_bytes_moves_as_it_sends() {
    let mut o = Orchestration::new(fleet(2), PlanOptions::new(3600.0), &[]).unwrap();
    let (a, b) = (o.due(0.0)[0], o.due(0.0)[1]);
    o.started(a, 0.0);
    o.started(b, 0.0);
    o.progress(a, 0.5, Some(10 * MB), 0);
    o.progress(a, 1.0, Some(64 * 1024), 10 * MB);
    // Its last 64 KiB are sent, and it goes on sending (what its tail asks again).
    for k in 2..=20 {
        let now = k as f64;
        o.progress(b, now, Some(100 * MB - k * MB), 0);
        o.progress(a, now, Some(0), 10 * MB + k * MOVE_BYTES);
        assert!(o.stalls(now).is_empty(), "at {k}");
    }
    // Then it stops: stalled, and its sending again ends the stall.
    for k in 21..=30 {
        o.progress(b, k as f64, Some(80 * MB - k * MB), 0);
        o.progress(a, k as f64, Some(0), 10 * MB + 20 * MOVE_BYTES);
    }
    assert_eq!(o.stalls(30.0).len(), 1);
    assert_eq!(o.stalled_since(a), Some(20.0));
    // (Counted from the report before, within the window: the burst counts at once.)
    o.progress(a, 31.0, Some(0), 10 * MB + 22 * MOVE_BYTES);
    assert!(matches!(o.stalls(31.0)[..], [StallChange::Moving { vm, .. }] if vm == a));
}

/// `first` and `next` transferring side by side on a link that runs two at once (no
/// prestart), both stopped from about 6 on (`next` last moved at 5.8, `first` at 6.1),
/// reporting every second; two more VMs waiting. The stall watch is asked at each report
/// to 16.0.
fn two_stopped_together() -> (Orchestration, usize, usize) {
    let mut o = two_at_once(4, 3600.0);
    let due = o.due(0.0);
    assert_eq!(due.len(), 2, "{due:?}");
    let (first, next) = (due[0], due[1]);
    for &i in &due {
        o.started(i, 0.0);
    }
    o.progress(first, 0.3, Some(100 * MB), 0);
    o.progress(next, 0.5, Some(200 * MB), 0);
    // The link goes down (or both standbys do) at 6: both stop within a report of each
    // other.
    o.progress(next, 5.8, Some(199 * MB), MB);
    o.progress(first, 6.1, Some(80 * MB), 20 * MB);
    for k in 7..=16 {
        o.progress(first, k as f64 + 0.1, Some(80 * MB), 20 * MB);
        o.progress(next, k as f64, Some(199 * MB), MB);
        assert!(o.stalls(k as f64).is_empty(), "at {k}");
        assert!(o.due(k as f64).is_empty(), "at {k}: both places taken");
    }
    (o, first, next)
}

#[test]
fn vms_that_stop_together_start_one_more_into_an_outage_and_no_more() {
    let (mut o, first, next) = two_stopped_together();
    // Both stuck for the timeout: one (the one stuck longest, though later in the plan)
    // is stalled, to tell an outage from lost standbys...
    let stalls = o.stalls(16.1);
    assert!(
        matches!(stalls[..], [StallChange::Stalled { vm, since_s, .. }] if vm == next && since_s == 5.8),
        "{stalls:?}"
    );
    let third = o.due(16.1);
    assert_eq!(third.len(), 1, "{third:?}");
    let third = third[0];
    o.started(third, 16.1);
    // ...and the one started in its place stops too: an outage. No more are stalled, the
    // other stuck VM keeps its place, and the fourth VM waits.
    for k in 17..=60 {
        let now = k as f64;
        o.progress(first, now, Some(80 * MB), 20 * MB);
        o.progress(next, now + 0.1, Some(199 * MB), MB);
        o.setting_up(third, now, 100);
        assert!(o.stalls(now).is_empty(), "at {k}");
        assert!(o.due(now).is_empty(), "at {k}");
    }
    assert_eq!(o.report().totals.stalled, 1);
    // The outage ends: all move.
    o.progress(first, 61.0, Some(70 * MB), 30 * MB);
    o.progress(next, 61.0, Some(190 * MB), 10 * MB);
    o.setting_up(third, 61.0, 10 * MB);
    let stalls = o.stalls(61.0);
    assert!(
        matches!(stalls[..], [StallChange::Moving { vm, .. }] if vm == next),
        "{stalls:?}"
    );
    assert_eq!(o.report().totals.stalled, 0);
    assert_eq!(
        o.tracks[next].watch.requeued_s, None,
        "an outage: its place kept"
    );
}

#[test]
fn vms_whose_standbys_stop_together_are_stalled_once_the_vm_started_moves() {
    let (mut o, first, next) = two_stopped_together();
    assert_eq!(o.stalls(16.1).len(), 1);
    let third = o.due(16.1)[0];
    o.started(third, 16.1);
    // The third's standby is alive: it switches over and moves, so the link carries and
    // the other stuck VM's stall is its own too.
    o.progress(third, 17.0, Some(300 * MB), 0);
    o.progress(first, 17.0, Some(80 * MB), 20 * MB);
    o.progress(next, 17.1, Some(199 * MB), MB);
    let stalls = o.stalls(17.1);
    assert!(
        matches!(stalls[..], [StallChange::Stalled { vm, .. }] if vm == first),
        "{stalls:?}"
    );
    assert_eq!(o.report().totals.stalled, 2);
    let fourth = o.due(17.1);
    assert_eq!(fourth.len(), 1, "the second place is free: {fourth:?}");
    // The third carries on; when the first stalled moves again, it goes behind it.
    for k in 18..=40 {
        o.progress(third, k as f64, Some(300 * MB - (k - 17) * MB), 0);
        assert!(o.stalls(k as f64).is_empty(), "at {k}");
    }
    o.progress(next, 41.0, Some(180 * MB), 20 * MB);
    assert!(matches!(o.stalls(41.0)[..], [StallChange::Moving { vm, .. }] if vm == next));
    assert_eq!(
        o.tracks[next].watch.requeued_s,
        Some(41.0),
        "its stall was its own: behind the third"
    );
}

#[test]
fn a_stuck_setup_started_early_is_stalled_before_the_transfer_whose_place_it_took() {
    // The transfer's place went to the next VM's setup (a prestart), and both stop: the
    // transfer since 1.0, the setup since its start.
    let (mut o, first, next) = first_with_next_prestarted();
    for k in 6..=14 {
        let now = k as f64;
        o.progress(first, now, Some(90 * MB), 10 * MB + k * 1000);
        o.setting_up(next, now, 100);
        assert!(o.stalls(now).is_empty(), "at {k}");
    }
    // Stalling the transfer would free nothing: the setup is stalled, and the third starts.
    let stalls = o.stalls(15.0);
    assert!(
        matches!(stalls[..], [StallChange::Stalled { vm, since_s, .. }] if vm == next && since_s == 5.0),
        "{stalls:?}"
    );
    let third = o.due(15.0);
    assert_eq!(third.len(), 1, "{third:?}");
    assert!(![first, next].contains(&third[0]));
}

#[test]
fn of_a_transfer_and_a_setup_stuck_together_the_transfer_is_stalled() {
    let mut o = two_at_once(3, 3600.0);
    let due = o.due(0.0);
    assert_eq!(due.len(), 2, "{due:?}");
    let (a, b) = (due[0], due[1]);
    // `b` sits in its setup from 0; `a` switches over at 1 and stops there.
    o.started(b, 0.0);
    o.started(a, 0.5);
    o.progress(a, 1.0, Some(100 * MB), 0);
    for k in 2..=10 {
        let now = k as f64;
        o.progress(a, now, Some(100 * MB), 0);
        o.setting_up(b, now, 100);
        assert!(o.stalls(now).is_empty(), "at {k}");
    }
    let stalls = o.stalls(11.0);
    assert!(
        matches!(stalls[..], [StallChange::Stalled { vm, .. }] if vm == a),
        "{stalls:?}"
    );
    assert_eq!(o.due(11.0).len(), 1);
}

#[test]
fn vms_stuck_together_with_none_waiting_are_not_stalled() {
    let mut o = two_at_once(2, 3600.0);
    let both = o.due(0.0);
    for &i in &both {
        o.started(i, 0.0);
        o.progress(i, 0.5, Some(50 * MB), 0);
    }
    // Stalling one would start nothing: an outage or not, they stay where they are.
    for k in 1..=40 {
        assert!(o.stalls(k as f64).is_empty(), "at {k}");
    }
}

#[test]
fn a_vm_alone_on_its_link_that_stops_lets_one_more_start_and_no_more() {
    let mut o = one_flow_fills_the_link(4);
    let first = o.due(0.0)[0];
    o.started(first, 0.0);
    o.progress(first, 0.3, Some(100 * MB), 0);
    assert_eq!(o.stalls(10.3).len(), 1, "alone: not told from an outage");
    let second = o.due(10.3);
    assert_eq!(second.len(), 1);
    let second = second[0];
    o.started(second, 10.3);
    // The second stops in its setup too: an outage, so no third...
    assert!(o.stalls(25.0).is_empty());
    assert!(o.due(25.0).is_empty(), "the second holds its place");
    // ...but if it gets going, the link carries: the first's stall is its own, and a
    // second stuck VM is stalled as the first was.
    o.progress(second, 26.0, Some(200 * MB), 0);
    o.progress(second, 27.0, Some(190 * MB), 0);
    assert!(o.stalls(27.0).is_empty());
    assert_eq!(
        o.stalls(37.0).len(),
        1,
        "alone again, with the first's stall resolved"
    );
    assert_eq!(o.stalled_since(second), Some(27.0));
    let third = o.due(37.0);
    assert_eq!(third.len(), 1, "{third:?}");
}

#[test]
fn a_vm_caught_alone_in_an_outage_keeps_its_place_when_it_ends() {
    let mut o = one_flow_fills_the_link(3);
    let first = o.due(0.0)[0];
    o.started(first, 0.0);
    o.progress(first, 0.3, Some(100 * MB), 0);
    assert_eq!(o.stalls(10.3).len(), 1, "alone: not told from an outage");
    let second = o.due(10.3)[0];
    o.started(second, 10.3);
    // The outage ends: the second switches over, the first moves again.
    o.progress(second, 20.0, Some(200 * MB), 0);
    o.progress(first, 20.0, Some(90 * MB), 10 * MB);
    assert!(matches!(o.stalls(20.0)[..], [StallChange::Moving { vm, .. }] if vm == first));
    let caps = o.rate_caps(20.0);
    assert_eq!(caps[first], None, "ahead, where it was: {caps:?}");
    assert!(caps[second].is_some(), "{caps:?}");
}

#[test]
fn an_evacuation_that_stopped_moving_ends_past_the_deadline() {
    let mut f = fleet(2);
    f.links[0].per_flow_window_bytes = 1 << 30;
    let mut o = Orchestration::new(f, PlanOptions::new(30.0), &[]).unwrap();
    let first = o.due(0.0)[0];
    o.started(first, 0.0);
    o.progress(first, 0.5, Some(100 * MB), 0);
    o.replan(0.5).unwrap();
    let second = o.due(5.0)[0];
    o.started(second, 5.0);
    o.progress(second, 6.0, Some(200 * MB), 0);
    o.progress(second, 10.0, Some(190 * MB), 0);
    assert!(!o.is_stuck_past_deadline(10.0));
    assert_eq!(o.stalls(10.5).len(), 1);
    o.progress(second, 31.0, Some(180 * MB), 0);
    assert!(!o.is_stuck_past_deadline(31.0), "the second still moves");
    o.done(second, 33.0, 100 * MB, Some(1));
    assert!(
        !o.is_stuck_past_deadline(29.0),
        "before the deadline it may still move"
    );
    assert!(o.is_stuck_past_deadline(41.0));
    assert!(!o.is_stuck_past_deadline(f64::NAN));
    assert!(!o.is_finished());
    let r = o.report();
    assert_eq!((r.totals.not_finished, r.totals.stalled), (1, 1));
    assert_eq!(
        r.vms[first].stalls,
        [StallSpan {
            since_s: 0.5,
            until_s: None
        }]
    );
    // Two VMs stopped together (an outage, or their standbys gone) end it too.
    let mut o = two_at_once(2, 30.0);
    let both = o.due(0.0);
    assert_eq!(both.len(), 2);
    for &i in &both {
        o.started(i, 0.0);
        o.progress(i, 0.5, Some(50 * MB), 0);
    }
    assert!(
        o.stalls(40.0).is_empty(),
        "none waits to start in their place"
    );
    assert!(!o.is_stuck_past_deadline(29.0));
    assert!(o.is_stuck_past_deadline(40.0));
}

#[test]
fn times_that_are_not_numbers_change_nothing() {
    let mut o = one_flow_fills_the_link(2);
    let first = o.due(0.0)[0];
    o.started(first, f64::NAN);
    assert_eq!(o.phase(first), Phase::Waiting);
    o.started(first, 0.0);
    assert!(!o.progress(first, f64::INFINITY, Some(MB), 0));
    assert!(!o.progress(first, f64::NAN, Some(MB), 0));
    assert_eq!(o.phase(first), Phase::Starting);
    o.setting_up(first, f64::INFINITY, 10 * MOVE_BYTES);
    assert!(o.stalls(f64::NAN).is_empty());
    assert_eq!(o.stalls(10.0).len(), 1, "nothing above counted as moving");
}

#[test]
fn a_vm_found_alone_whose_link_then_carried_goes_behind_when_it_moves() {
    let mut o = one_flow_fills_the_link(3);
    let first = o.due(0.0)[0];
    o.started(first, 0.0);
    o.progress(first, 0.3, Some(100 * MB), 0);
    assert_eq!(o.stalls(10.3).len(), 1);
    let second = o.due(10.3)[0];
    o.started(second, 10.3);
    // The second carries for a minute: the first's stall was its own.
    for k in 11..=70 {
        o.progress(second, k as f64, Some(300 * MB - k * MB), 0);
        assert!(o.stalls(k as f64).is_empty(), "at {k}");
    }
    o.progress(first, 70.0, Some(90 * MB), 10 * MB);
    assert!(matches!(o.stalls(70.0)[..], [StallChange::Moving { vm, .. }] if vm == first));
    let caps = o.rate_caps(70.0);
    assert!(caps[first].is_some(), "behind the second: {caps:?}");
    assert_eq!(caps[second], None, "{caps:?}");
}

#[test]
fn an_evacuation_past_its_deadline_goes_on_while_a_vm_can_start() {
    let mut o = one_flow_fills_the_link(2);
    o.opts.deadline_s = 30.0;
    let first = o.due(0.0)[0];
    o.started(first, 0.0);
    o.progress(first, 0.5, Some(100 * MB), 0);
    // Done just now: the second can start, so this is no end.
    o.done(first, 40.0, 100 * MB, Some(1));
    assert!(!o.due(40.0).is_empty());
    assert!(!o.is_stuck_past_deadline(40.0));
}

#[test]
fn a_stuck_link_with_more_under_way_than_it_runs_stalls_enough_to_free_a_place() {
    let mut o = two_at_once(4, 3600.0);
    // Three under way on a link that runs two (as after an outage, when the VM caught in
    // it took its place back beside the one started in its place), all stopped at 1.
    let order = o.plan().schedule.links[0].order.clone();
    for &i in &order[..3] {
        o.started(i, 0.0);
        o.progress(i, 1.0, Some(100 * MB), 0);
    }
    assert!(o.stalls(10.5).is_empty());
    let stalls = o.stalls(11.0);
    assert_eq!(stalls.len(), 2, "{stalls:?}");
    assert_eq!(o.due(11.0), vec![order[3]]);
}
