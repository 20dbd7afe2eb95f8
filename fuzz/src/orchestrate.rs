//! Target `orchestrate`: the orchestrator's state machine (`fleet::orchestrate`), fed what
//! `faultline evacuate` feeds it from the network. A plan file's fleet takes each source's
//! first status (`Status::apply_to`), then the orchestrator hears statuses and events
//! (`Orchestration::hear_status`, `hear_event`, as `faultline evacuate` does) and takes its
//! turns (stalls, starts, rate limits, re-plans) as time goes on.
//!
//! Checks: no input panics; a VM done, failed or skipped stays so; only waiting VMs are
//! due to start, and one started is under way; every rate limit, and every link rate a
//! re-plan takes as measured, is above 0; the report serializes, with every VM of the
//! fleet once.

use fleet::control::{EvacState, ReplState, Status};
use fleet::orchestrate::{Orchestration, Phase, StatusChange};
use fleet::plan::Policy;

use crate::input::Input;
use crate::plan_file::{NOW_UNIX_S, PLAN_FILES};

/// A number as a source might send it: small, middling or any.
fn figure(inp: &mut Input<'_>) -> u64 {
    match inp.below(4) {
        0 => u64::from(inp.u16()),
        1 => u64::from(inp.u32()) << 8,
        2 => inp.u64(),
        _ => 0,
    }
}

fn maybe(inp: &mut Input<'_>) -> Option<u64> {
    inp.bool().then(|| figure(inp))
}

/// A status from the input, as a source's control endpoint could send it.
fn status(inp: &mut Input<'_>, name: &str) -> Status {
    Status {
        vm_id: name.into(),
        memory_bytes: figure(inp),
        stale_bytes: figure(inp),
        dirty_rate_bps: figure(inp),
        stale_growth_bps: maybe(inp),
        replication: ReplState::Running,
        evacuation: match inp.below(5) {
            0 => EvacState::Idle,
            1 => EvacState::Starting,
            2 => EvacState::Transferring,
            3 => EvacState::Done,
            _ => EvacState::Failed,
        },
        bytes_sent: figure(inp),
        pages_remaining: maybe(inp),
        progress_age_ms: maybe(inp),
        progress_measured: None,
        pages_stale: maybe(inp),
        error: None,
        pages_pushed: maybe(inp),
        wire_bytes_pushed: maybe(inp),
        pages_sampled: maybe(inp),
        wire_bytes_sampled: maybe(inp),
        disk_bytes: maybe(inp),
        own_rate_cap_bps: maybe(inp),
    }
}

/// The target.
pub fn orchestrate(data: &[u8]) {
    let Some((o, now)) = run(data) else {
        return;
    };
    let n = o.fleet().vms.len();
    let report = o.report_ended(now);
    match serde_json::to_value(&report) {
        Ok(v) => {
            let vms = v["vms"].as_array().map_or(0, Vec::len);
            assert_eq!(vms, n, "the report holds {vms} of {n} VMs");
        }
        Err(e) => panic!("the report does not serialize: {e}"),
    }
}

/// Runs the input's evacuation, checking as it goes; the orchestration and the time at
/// its end (`None` if the plan was refused).
fn run(data: &[u8]) -> Option<(Orchestration, f64)> {
    let mut inp = Input::new(data);
    let texts = PLAN_FILES;
    let text = texts[inp.below(texts.len() as u64) as usize];
    let Ok(pf) = fleet::file::parse(text, NOW_UNIX_S) else {
        panic!("a built-in plan file is refused");
    };
    let mut fleet = pf.fleet;
    let n = fleet.vms.len();
    // Each source's first status, or none (it did not answer: it has no link).
    let mut unreachable = Vec::new();
    let mut first = vec![None; n];
    for (i, v) in fleet.vms.iter_mut().enumerate() {
        if inp.below(8) == 0 {
            unreachable.push((i, "did not answer".to_string()));
        } else {
            let s = status(&mut inp, &v.name.clone());
            s.apply_to(v);
            first[i] = Some(s);
        }
    }
    let policy = match inp.below(3) {
        0 => Policy::Planner,
        1 => Policy::AllAtOnce,
        _ => Policy::SmallestFirst,
    };
    let mut o = Orchestration::with_policy(fleet, pf.options, &unreachable, policy).ok()?;
    // `--stall-timeout`: 3 s to a day.
    o.set_stall_after(3.0 + f64::from(inp.u16()) * (86_397.0 / 65_535.0));
    let linked = |o: &Orchestration, i: usize| first[i].is_some() && o.phase(i) != Phase::Skipped;
    // A source that started by itself before it was heard: its first status is its first
    // event.
    for (i, s) in first.iter().enumerate() {
        if let Some(s) = s.as_ref().filter(|s| s.evacuation != EvacState::Idle) {
            if linked(&o, i) {
                hear(&mut o, i, s, 0.0, true);
            }
        }
    }
    let mut now = 0.0f64;
    let mut ops = 0;
    while !inp.is_empty() && ops < 400 {
        ops += 1;
        let before: Vec<Phase> = (0..n).map(|i| o.phase(i)).collect();
        let vm = inp.below(n as u64) as usize;
        match inp.below(8) {
            // Time goes on: mostly a fraction of a second, now and then minutes.
            0 | 1 => {
                now += match inp.below(8) {
                    0 => f64::from(inp.u16()),
                    _ => f64::from(inp.u16()) / 1000.0,
                }
            }
            // A turn of the orchestrator's loop.
            2 => {
                let _ = o.stalls(now);
                let _ = o.is_stuck_past_deadline(now);
                for i in o.due(now) {
                    assert_eq!(o.phase(i), Phase::Waiting, "vm {i} due but not waiting");
                    o.started(i, now);
                    assert!(
                        o.phase(i).is_under_way(),
                        "vm {i} started but not under way"
                    );
                }
                for cap in o.rate_caps(now).into_iter().flatten() {
                    assert!(cap > 0, "a rate limit of 0 (a source takes 0 as none)");
                }
                let _ = o.next_due_s(now);
                let _ = o.next_handoff_s(now);
                let _ = o.replan(now);
                // What a re-plan takes as measured: a rate of 0 would be refused.
                for l in o.measured(now).links {
                    assert!(l.rate_bps != Some(0) && l.shared_rate_bps != Some(0));
                }
            }
            // What a source says: a status until it is started, events after.
            _ => {
                let s = status(&mut inp, &o.fleet().vms[vm].name.clone());
                if linked(&o, vm) {
                    let waiting = o.phase(vm) == Phase::Waiting;
                    hear(&mut o, vm, &s, now, waiting);
                }
            }
        }
        for (i, was) in before.into_iter().enumerate() {
            if was.is_final() {
                assert_eq!(o.phase(i), was, "vm {i} left {was:?}");
            }
        }
        if o.is_finished() {
            break;
        }
    }
    Some((o, now))
}

/// What `faultline evacuate`'s `handle` does with a source's status (`as_status`: its link
/// is waiting to start it) or event, heard at `now`, its link taking every start.
fn hear(o: &mut Orchestration, vm: usize, s: &Status, now: f64, as_status: bool) {
    if !as_status {
        o.hear_event(vm, s, now);
    } else if o.hear_status(vm, s, now) == StatusChange::UnderWayElsewhere {
        o.started(vm, now);
    }
}

/// Writes inputs the way [`orchestrate`] reads them.
struct Seed(Vec<u8>);

impl Seed {
    /// A [`figure`]: `v` as a small one.
    fn figure(&mut self, v: u16) {
        self.0.push(0);
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    /// A [`figure`]: `v << 8` as a middling one.
    fn figure_256(&mut self, v: u32) {
        self.0.push(1);
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    /// A [`maybe`]: none, or `v`.
    fn maybe(&mut self, v: Option<u16>) {
        match v {
            None => self.0.push(0),
            Some(v) => {
                self.0.push(1);
                self.figure(v);
            }
        }
    }

    /// A [`status`]: `state` (its index in [`status`]'s choice), `left` pages, `sent`.
    fn status(&mut self, state: u8, left: Option<u16>, sent: u16) {
        self.figure_256(1 << 22); // memory_bytes: 1 GiB
        self.figure_256(200_000); // stale_bytes: 51.2 MB
        self.figure(1_000); // dirty_rate_bps
        self.maybe(None); // stale_growth_bps
        self.0.push(state);
        self.figure(sent);
        self.maybe(left);
        self.maybe(Some(100)); // progress_age_ms
        self.maybe(left.map(|_| 5)); // pages_stale
        for _ in 0..6 {
            self.maybe(None); // pushed, sampled, disk, own limit
        }
    }
}

/// Per fleet, twice: every source answers idle, then turns and statuses take every VM
/// through its setup, transfer and end; the second time the sources stay quiet for the
/// first 4 s, so that the VMs the orchestrator started stall (after the shortest stall
/// timeout, 3 s), before they all move. At most 400 steps are read: 28 rounds of 14 at 12 VMs.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for quiet in [0u16, 8] {
        // The example (12 VMs), four on one link, and three on two links.
        for (fleet, n) in [(0u8, 12u8), (1, 4), (2, 3)] {
            let mut s = Seed(vec![fleet]);
            for _ in 0..n {
                s.0.push(1); // answered
                s.status(0, None, 0);
            }
            s.0.push(0); // the planner
            s.0.extend_from_slice(&[0, 0]); // the shortest stall timeout
            for round in 0..quiet + 20 {
                s.0.extend_from_slice(&[0, 2]); // a turn
                s.0.extend_from_slice(&[0, 0, 1, 0xf4, 0x01]); // 0.5 s on
                for vm in 0..n {
                    s.0.extend_from_slice(&[vm, 3]);
                    match round.checked_sub(quiet) {
                        None => s.status(0, None, 0),
                        Some(0) => s.status(1, None, 10),
                        Some(r @ 1..=18) => s.status(2, Some(1000 - 50 * r), 100 * r),
                        Some(_) => s.status(3, Some(0), 2000),
                    }
                }
            }
            seeds.push(s.0);
        }
    }
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seeds_take_every_vm_through_its_evacuation() {
        for (k, seed) in seeds().iter().enumerate() {
            let (o, now) = run(seed).expect("planned");
            // Moving every half second, none stalls; quiet for 4 s, the VMs the example
            // fleet (seed 3) runs first stall, since others wait behind them on their links.
            // (The planner runs the four-VM fleet all at once and the three-VM one with one
            // VM per link: nothing waits there, and nothing is stalled.)
            let stalled = o.report_ended(now).vms.iter().any(|v| !v.stalls.is_empty());
            assert_eq!(stalled, k == 3, "seed {k}");
            for i in 0..o.fleet().vms.len() {
                let phase = o.phase(i);
                assert!(
                    phase == Phase::Done || phase == Phase::Skipped,
                    "seed {k}: vm {i} {phase:?}"
                );
            }
        }
    }
}
