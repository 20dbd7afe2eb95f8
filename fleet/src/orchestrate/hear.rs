//! Hearing a source: what its status (while its link waits to start it) or its event (once
//! started) changes in the orchestration. The decisions only; `faultline evacuate` tells
//! the links and writes the event lines from what these return, and the fuzz target
//! `orchestrate` drives the same calls.

use super::{Orchestration, Phase};
use crate::control::{EvacState, Status as SourceStatus, PAGE_BYTES};

/// What a source's event changed, worth an event line.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// Nothing to tell.
    Nothing,
    /// It switched over: the first report of its transfer.
    Switchover,
    /// Every stale page of it is at the standby.
    Done,
    /// It failed, and why (its source's reason, or that it reported a failure).
    Failed(String),
}

/// What a source's status changed.
#[derive(Clone, Debug, PartialEq)]
pub enum StatusChange {
    /// Nothing to tell: still waiting (its stale bytes and wire ratio taken), or over
    /// already for the orchestrator.
    Nothing,
    /// Started by someone else (SIGUSR1, its timer) and under way: to follow it, its link
    /// must be told to start, then [`Orchestration::started`].
    UnderWayElsewhere,
    /// Over already (started by someone else, or by us while the status was on its way):
    /// taken as its last event. `started`: it was waiting, and is now counted as started
    /// by its source.
    Over { started: bool, change: Change },
}

impl Orchestration {
    /// A status from `vm`'s source, heard at `now_s` while its link waits to start it.
    pub fn hear_status(&mut self, vm: usize, s: &SourceStatus, now_s: f64) -> StatusChange {
        self.take_wire_ratio(vm, s);
        self.waiting(vm, s.stale_bytes);
        if s.evacuation.is_final() && !self.phase(vm).is_final() {
            let started = self.phase(vm) == Phase::Waiting;
            if started {
                self.started(vm, now_s);
            }
            let change = self.hear_event(vm, s, now_s);
            return StatusChange::Over { started, change };
        }
        if s.evacuation != EvacState::Idle && self.phase(vm) == Phase::Waiting {
            self.tracks[vm].started_elsewhere = true;
            return StatusChange::UnderWayElsewhere;
        }
        StatusChange::Nothing
    }

    /// An event from `vm`'s source, started, heard at `now_s`; its progress is as of
    /// its stated age before.
    pub fn hear_event(&mut self, vm: usize, s: &SourceStatus, now_s: f64) -> Change {
        self.take_wire_ratio(vm, s);
        let measured = now_s - s.progress_age_s();
        match s.evacuation {
            EvacState::Idle => Change::Nothing,
            // A setup held behind a transfer sends its stale set at the held rate.
            EvacState::Starting => {
                self.setting_up(vm, measured, s.bytes_sent);
                Change::Nothing
            }
            EvacState::Transferring => {
                // Pages, in bytes (the wire ratio makes them the link's bytes).
                let remaining = s.pages_remaining.map(|p| p.saturating_mul(PAGE_BYTES));
                if self.progress(vm, measured, remaining, s.bytes_sent) {
                    Change::Switchover
                } else {
                    Change::Nothing
                }
            }
            _ if self.phase(vm).is_final() => Change::Nothing,
            EvacState::Done => {
                self.done(vm, now_s, s.bytes_sent, s.pages_stale);
                Change::Done
            }
            EvacState::Failed => {
                // Its text reaches the operator's terminal: clipped, escapes shown.
                let why = s.error.as_deref().map_or_else(
                    || "the source reported a failure".into(),
                    crate::control::clean_text,
                );
                self.failed(vm, now_s, why.clone());
                Change::Failed(why)
            }
        }
    }

    /// What its encoding makes of a page: estimated while it waits, measured once its
    /// push runs; the bytes it has left cross the link at that.
    fn take_wire_ratio(&mut self, vm: usize, s: &SourceStatus) {
        if let Some(ratio) = s.planning_wire_ratio() {
            self.set_wire_ratio(vm, ratio);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two VMs on one link that one flow fills: one at a time.
    fn orchestration() -> Orchestration {
        super::super::tests::one_flow_fills_the_link(2)
    }

    /// `vm1`'s source, in `evacuation`, 100 pages left as of 200 ms ago.
    fn status(evacuation: EvacState) -> SourceStatus {
        SourceStatus {
            vm_id: "vm1".into(),
            evacuation,
            bytes_sent: 5000,
            pages_remaining: Some(100),
            progress_age_ms: Some(200),
            pages_stale: Some(3),
            error: (evacuation == EvacState::Failed).then(|| "its standby went away".into()),
            ..crate::control::tests::status()
        }
    }

    #[test]
    fn a_waiting_vms_status_says_whether_it_is_under_way_or_over_elsewhere() {
        let mut o = orchestration();
        assert_eq!(
            o.hear_status(1, &status(EvacState::Idle), 1.0),
            StatusChange::Nothing
        );
        // Under way, started by its source: followed only once its link is told.
        assert_eq!(
            o.hear_status(1, &status(EvacState::Transferring), 1.0),
            StatusChange::UnderWayElsewhere
        );
        assert_eq!(o.phase(1), Phase::Waiting);
        // Evacuated by its own source between two status requests: started and done.
        assert_eq!(
            o.hear_status(1, &status(EvacState::Done), 2.0),
            StatusChange::Over {
                started: true,
                change: Change::Done
            }
        );
        assert_eq!(o.phase(1), Phase::Done);
        assert_eq!(
            o.report().vms[1].measured.start_s,
            Some(2.0),
            "counted as started"
        );
        // Once final, a later status changes nothing.
        assert_eq!(
            o.hear_status(1, &status(EvacState::Failed), 3.0),
            StatusChange::Nothing
        );
        assert_eq!(o.phase(1), Phase::Done);
        // Started by us while a failure was on its way: failed, with its reason.
        let mut o = orchestration();
        o.started(1, 1.0);
        assert_eq!(
            o.hear_status(1, &status(EvacState::Failed), 2.0),
            StatusChange::Over {
                started: false,
                change: Change::Failed("its standby went away".into())
            }
        );
        assert_eq!(
            o.report().vms[1].error.as_deref(),
            Some("its standby went away")
        );
    }

    #[test]
    fn events_tell_the_switchover_and_the_end_once() {
        let mut o = orchestration();
        o.started(0, 0.0);
        let heard =
            |o: &mut Orchestration, e: EvacState, now: f64| o.hear_event(0, &status(e), now);
        assert_eq!(heard(&mut o, EvacState::Starting, 0.5), Change::Nothing);
        assert_eq!(
            heard(&mut o, EvacState::Transferring, 1.0),
            Change::Switchover
        );
        // Dated back by its age: the switchover as the source measured it.
        assert_eq!(o.report().vms[0].measured.switchover_s, Some(0.8));
        assert_eq!(heard(&mut o, EvacState::Transferring, 1.5), Change::Nothing);
        assert_eq!(heard(&mut o, EvacState::Done, 2.0), Change::Done);
        assert_eq!(heard(&mut o, EvacState::Done, 2.5), Change::Nothing);
        assert_eq!(heard(&mut o, EvacState::Failed, 3.0), Change::Nothing);
        assert_eq!(o.phase(0), Phase::Done);
        // A failure without a reason gets one.
        let mut o = orchestration();
        o.started(0, 0.0);
        let mut s = status(EvacState::Failed);
        s.error = None;
        assert_eq!(
            o.hear_event(0, &s, 1.0),
            Change::Failed("the source reported a failure".into())
        );
        // A reason with a terminal's escapes, and far too long, is clipped and shown.
        let mut o = orchestration();
        o.started(0, 0.0);
        s.error = Some(format!("\x1b]0;owned\x07{}", "x".repeat(100_000)));
        let Change::Failed(why) = o.hear_event(0, &s, 1.0) else {
            panic!("failed")
        };
        assert!(why.starts_with("\\u{1b}]0;owned\\u{7}xx"), "{why}");
        assert_eq!(why.chars().count(), crate::control::MAX_TEXT_CHARS);
        assert_eq!(o.report().vms[0].error.as_deref(), Some(why.as_str()));
    }
}
