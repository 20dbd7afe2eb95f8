//! Stalls: a VM under way whose source reports while it does not move (its standby
//! stopped or crashed, or its own path cut). Its source does not fail it: a session rides
//! out a lost connection for as long as it takes (docs/recovery.md), so without this one
//! dead standby would hold every VM behind it on its link for good.

use serde::Serialize;

use super::{Orchestration, Phase};

/// How long a VM under way may go without moving before it is
/// [stalled](Orchestration::stalls), seconds. Its source reports every 250 ms; a setup takes
/// about a second with a KVM guest; a VM held behind a transfer moves at
/// [`super::HOLD_SHARE`] of its link, at least [`super::MIN_HOLD_BPS`] (a page every 33 ms)
/// where that is at most a quarter of the link, and never less than twice [`MOVE_BYTES`]
/// within this timeout.
pub const STALL_AFTER_S: f64 = 10.0;

/// The least [`Orchestration::set_stall_after`] takes, seconds: moves are dated up to a
/// second back, and reported every 250 ms, so a shorter wait would find VMs that move
/// stalled.
pub const MIN_STALL_AFTER_S: f64 = 3.0;

/// How recently another VM must have made progress on a link for a VM that stopped there
/// to be stalled rather than caught in an outage: half the stall timeout, at least this,
/// seconds.
const MIN_ALIVE_WINDOW_S: f64 = 2.0;

/// Bytes sent within a stall timeout that count as a move where no fall in the bytes left
/// can (a setup, a source that does not count its pages left, a transfer's last bytes),
/// and the fall in the bytes left that ends a stall: more than a stopped peer's keep-alives
/// and probes send in that time; at a held rate of 1 Mbit/s, one second (a hold is never
/// so low that it takes more than half the stall timeout).
pub const MOVE_BYTES: u64 = 128 * 1024;

/// What the stall watch knows of one VM.
#[derive(Clone, Debug, Default)]
pub(super) struct Watch {
    /// When it last moved: its start, its switchover, its bytes left falling, or
    /// [`MOVE_BYTES`] more sent where those say nothing.
    moved_s: Option<f64>,
    /// Its bytes sent when counting them last began: (time, bytes).
    sent_mark: Option<(f64, u64)>,
    /// Its bytes sent at the report before: (time, bytes).
    sent_last: Option<(f64, u64)>,
    /// When its bytes sent last counted as a move.
    sent_moved_s: Option<f64>,
    /// While it is stalled.
    pub(super) stalled: Option<Stalled>,
    /// It stalled in its setup (which then measured the stall, not a setup).
    pub(super) stalled_in_setup: bool,
    /// When it took its place back after a stall of its own: it runs behind the transfers
    /// started meanwhile.
    pub(super) requeued_s: Option<f64>,
    /// Its stalls, in order.
    pub(super) history: Vec<StallSpan>,
}

/// One stall of a VM, as the report keeps it. Times in seconds from the evacuation's start.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct StallSpan {
    /// When it last moved before the stall.
    pub since_s: f64,
    /// When it moved again, finished or failed (`None`: stalled when the report was made).
    pub until_s: Option<f64>,
}

/// A stall as it was found.
#[derive(Clone, Debug)]
pub(super) struct Stalled {
    /// When it last moved.
    pub(super) since_s: f64,
    /// When it was found stalled.
    found_s: f64,
    /// Its bytes left and whether it was past its switchover, then.
    remaining_bytes: u64,
    transferring: bool,
    /// Found with its whole link stuck, so not told from an outage.
    link_stuck: bool,
    /// When its link was first seen making progress after it was found.
    carried_s: Option<f64>,
}

impl Watch {
    /// Its stall, if any, ended at `now_s` (it moved again, finished or failed).
    pub(super) fn end_stall(&mut self, now_s: f64) {
        if self.stalled.take().is_some() {
            if let Some(last) = self.history.last_mut() {
                last.until_s = Some(now_s.max(last.since_s));
            }
        }
    }

    /// When it last moved, if it has.
    pub(super) fn moved_s(&self) -> Option<f64> {
        self.moved_s
    }

    pub(super) fn moved(&mut self, now_s: f64) {
        self.moved_s = Some(self.moved_s.map_or(now_s, |m| m.max(now_s)));
    }

    /// Its source sent `bytes_sent` by `now_s`: a move (returns true) if [`MOVE_BYTES`]
    /// more than when counting began, within `window_s`. Counting begins again after a
    /// move, and, once the window has passed, from the report before this one (or this
    /// one, if that is out of the window too), so that a trickle of keep-alives never adds
    /// up to one and a burst in this report still counts.
    pub(super) fn sent(&mut self, now_s: f64, bytes_sent: u64, window_s: f64) -> bool {
        let last = self.sent_last.replace((now_s, bytes_sent));
        let in_window = |m: &(f64, u64)| now_s - m.0 <= window_s;
        let mark = match self.sent_mark.filter(in_window) {
            Some(m) => m,
            None => {
                let m = last.filter(in_window).unwrap_or((now_s, bytes_sent));
                self.sent_mark = Some(m);
                m
            }
        };
        if bytes_sent < mark.1.saturating_add(MOVE_BYTES) {
            return false;
        }
        self.sent_mark = Some((now_s, bytes_sent));
        self.sent_moved_s = Some(self.sent_moved_s.map_or(now_s, |m| m.max(now_s)));
        self.moved(now_s);
        true
    }
}

/// A VM that stalled or moved again ([`Orchestration::stalls`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StallChange {
    /// It has not moved since `since_s`, with this many bytes (as pages) left.
    Stalled {
        vm: usize,
        since_s: f64,
        remaining_bytes: u64,
    },
    /// It moved again, this long after it last had.
    Moving { vm: usize, stalled_for_s: f64 },
}

impl Orchestration {
    /// Since when VM `vm` has been stalled, if it is ([`Orchestration::stalls`]).
    pub fn stalled_since(&self, vm: usize) -> Option<f64> {
        self.tracks[vm].watch.stalled.as_ref().map(|s| s.since_s)
    }

    /// The window within which [`MOVE_BYTES`] sent count as a move: the stall timeout.
    pub(super) fn sent_window_s(&self) -> f64 {
        self.stall_after_s
    }

    /// Sets how long a VM under way may go without moving before it is stalled
    /// ([`STALL_AFTER_S`] by default; at least [`MIN_STALL_AFTER_S`]); a value that is not
    /// a finite number of seconds is ignored.
    pub fn set_stall_after(&mut self, seconds: f64) {
        if seconds.is_finite() {
            self.stall_after_s = seconds.max(MIN_STALL_AFTER_S);
        }
    }

    /// The VMs that stalled or moved again by `now_s`, in VM order; call it before
    /// [`Orchestration::due`].
    ///
    /// A VM under way moves at its start and its switchover, when its bytes left fall,
    /// and when it sent [`MOVE_BYTES`] more within a stall timeout where those say nothing
    /// (in its setup, from a source that does not count its pages, or with less than that
    /// left to send). One that has not moved for the stall timeout
    /// ([`STALL_AFTER_S`]) is stalled if
    ///
    /// * another VM made progress on its link (a switchover, bytes left falling, a VM done)
    ///   within the last half of the timeout (at least 2 s): the link carries, so its own
    ///   standby or path is stuck; or
    /// * every VM holding a place on its link (it alone, or all of them) has gone the
    ///   timeout without moving, none stalled there without the link having made progress
    ///   since, and a VM waits to start on it: that cannot be told from an outage, so as
    ///   many are stalled as free one place (one, unless more hold places than the link
    ///   runs at once): first those that take a place (not a transfer that gave its place
    ///   to the next VM's setup already), then transfers before setups, then the one
    ///   stuck longest. The waiting VM starts, and its progress shows which it was.
    ///
    /// VMs that stop together are a link outage or standbys lost together (a standby
    /// host's crash). The VM started in the place of the one stalled tells them apart: if
    /// it moves, the link carries and the others are stalled in turn; if it stops too, the
    /// others ride the outage out where they are (docs/recovery.md) and no more start into
    /// it.
    ///
    /// A stalled VM gives its place on its link to the VMs behind it, takes none of the
    /// link's rate in [`Orchestration::rate_caps`] (held, where its link holds VMs, until
    /// it moves again), and re-plans count it lost; a transfer's stall also restarts its
    /// link's measured rate and drops the rates kept of windows that ended since it last
    /// moved (what the link carried while it sat is not its rate). It moves
    /// again when it switches over, its bytes left fall by [`MOVE_BYTES`] since it stalled, or
    /// its bytes sent count as a move again: it then takes a place again, behind the
    /// transfers started meanwhile if the stall was its own (found while its link carried),
    /// where it was if it was caught in an outage.
    pub fn stalls(&mut self, now_s: f64) -> Vec<StallChange> {
        if !now_s.is_finite() {
            return Vec::new();
        }
        // Per link: whether every VM holding a place there has gone the stall timeout
        // without moving, and the VMs stalled without the link having made progress since.
        let n = self.fleet.links.len();
        let (mut all_stuck, mut unresolved) = (vec![true; n], vec![0usize; n]);
        // The VMs holding a place (in the order they would be stalled if none can be told
        // from an outage), how many of them take one for `due` (a transfer that already
        // gave its place to the next VM's setup does not), and whether a VM waits there.
        let mut holders: Vec<Vec<(bool, bool, f64, usize)>> = vec![Vec::new(); n];
        let (mut busy, mut waiting) = (vec![0usize; n], vec![false; n]);
        for (vm, t) in self.tracks.iter().enumerate() {
            let li = self.fleet.vms[vm].link;
            waiting[li] |= t.phase == Phase::Waiting;
            if t.holds_place() {
                let moved = t.moved_s(now_s);
                if now_s - moved < self.stall_after_s {
                    all_stuck[li] = false;
                }
                let takes = self.takes_place(vm, now_s);
                busy[li] += usize::from(takes);
                // Those that free a place first, then transfers, then the one stuck
                // longest.
                holders[li].push((!takes, t.phase != Phase::Transferring, moved, vm));
            }
            if let Some(st) = &t.watch.stalled {
                if !self.link_progressed_s[li].is_some_and(|p| p > st.found_s) {
                    unresolved[li] += 1;
                }
            }
        }
        // On a link stuck whole, with a VM waiting and no stall there unresolved: the VMs
        // to stall so that one place frees (more than one where more hold places than the
        // link runs at once, as after an outage some took theirs back).
        let link_stuck: Vec<Vec<usize>> = holders
            .into_iter()
            .enumerate()
            .map(|(li, mut h)| {
                if !(all_stuck[li] && waiting[li] && unresolved[li] == 0) {
                    return Vec::new();
                }
                let k = self
                    .current
                    .schedule
                    .links
                    .get(li)
                    .map_or(1, |ls| ls.concurrency.max(1));
                // A total order (`total_cmp` on the times): `sort_by` may panic on one that
                // is not.
                h.sort_by(|a, b| {
                    (a.0, a.1)
                        .cmp(&(b.0, b.1))
                        .then(a.2.total_cmp(&b.2))
                        .then(a.3.cmp(&b.3))
                });
                let m = (busy[li] + 1).saturating_sub(k).max(1);
                h.into_iter().take(m).map(|(_, _, _, vm)| vm).collect()
            })
            .collect();
        let window = (self.stall_after_s / 2.0).max(MIN_ALIVE_WINDOW_S);
        let mut out = Vec::new();
        for (vm, t) in self.tracks.iter_mut().enumerate() {
            if !t.phase.is_under_way() {
                t.watch.end_stall(now_s);
                continue;
            }
            let li = self.fleet.vms[vm].link;
            if let Some(st) = &mut t.watch.stalled {
                let progressed = self.link_progressed_s[li].filter(|&p| p > st.found_s);
                st.carried_s = st.carried_s.or(progressed);
                let transferring = t.phase == Phase::Transferring;
                let moving = (!st.transferring && transferring)
                    || t.remaining_bytes.saturating_add(MOVE_BYTES) <= st.remaining_bytes
                    || t.watch.sent_moved_s.is_some_and(|m| m > st.since_s);
                if moving {
                    out.push(StallChange::Moving {
                        vm,
                        stalled_for_s: now_s - st.since_s,
                    });
                    // A transfer whose stall was its own goes behind the transfers started
                    // meanwhile. One caught in an outage keeps its place: found with its
                    // link stuck, the link making no progress from then until it (and
                    // whatever was started to tell) moved again, within the window. So does
                    // a setup (the re-plans take a setup's start for its place).
                    let outage = st.link_stuck && !st.carried_s.is_some_and(|p| p < now_s - window);
                    if st.transferring && !outage {
                        t.watch.requeued_s = Some(now_s);
                    }
                    t.watch.end_stall(now_s);
                    t.watch.moved(now_s);
                }
                continue;
            }
            let moved = t.moved_s(now_s);
            if now_s - moved < self.stall_after_s {
                continue;
            }
            let carries = self.link_progressed_s[li].is_some_and(|p| p >= now_s - window);
            let link_stuck = link_stuck[li].contains(&vm);
            if !carries && !link_stuck {
                continue;
            }
            let transferring = t.phase == Phase::Transferring;
            t.watch.stalled = Some(Stalled {
                since_s: moved,
                found_s: now_s,
                remaining_bytes: t.remaining_bytes,
                transferring,
                link_stuck: !carries,
                carried_s: None,
            });
            t.watch.stalled_in_setup |= !transferring;
            t.watch.history.push(StallSpan {
                since_s: moved,
                until_s: None,
            });
            if !carries {
                unresolved[li] += 1;
            }
            if transferring {
                if let Some(samples) = self.link_samples.get_mut(li) {
                    samples.forget_since(moved);
                }
            }
            out.push(StallChange::Stalled {
                vm,
                since_s: moved,
                remaining_bytes: t.remaining_bytes,
            });
        }
        out
    }

    /// Whether the evacuation may end though not every VM is final: `now_s` is past the
    /// deadline, no VM waits for a free place ([`Orchestration::due`]), and no VM under way
    /// has moved for the stall timeout (they are stalled, or stopped together on a link
    /// whose outage, or whose standbys, outlast the power).
    pub fn is_stuck_past_deadline(&self, now_s: f64) -> bool {
        if now_s.is_nan()
            || now_s <= self.opts.deadline_s
            || self.is_finished()
            || !self.due(now_s).is_empty()
        {
            return false;
        }
        let mut any = false;
        for t in self.tracks.iter().filter(|t| t.phase.is_under_way()) {
            if now_s - t.moved_s(now_s) < self.stall_after_s {
                return false;
            }
            any = true;
        }
        any
    }
}
