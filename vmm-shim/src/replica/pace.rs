//! How often the replicator harvests while it is not hurried.
//!
//! A harvest walks the page tables (or the dirty log) of all guest memory, whatever the
//! guest wrote: its cost grows with the guest's size, not with its writes. At the
//! replicator's 20 ms round the walks of a 1 GiB guest writing 100 pages a second cost its
//! replicator thread about 0.6 ms each, 31 ms of CPU a second (3% of a core) on the bench
//! machine, and a host's waiting VMs add up. [`HarvestPace`] spaces harvests so that
//! walking takes at most 1/[`GAP_OVER_WALK`] of the replicator's time: a small guest still
//! harvests every round, that one every 60 ms or so (its thread: 10 ms a second). The
//! writes a harvest finds later go out later, at most [`MAX_GAP`] later; the evacuation's
//! own harvests (hurried: its catch-up and the final one) are never spaced.

use std::time::Duration;

/// The gap after a harvest, in units of its walk's time: walks take at most 1/100 of the
/// replicator's time while it is not hurried.
pub const GAP_OVER_WALK: u32 = 100;

/// The longest gap the pace puts between two harvests: how much later than at every round
/// a write may be found. A slow walk (a large guest, or a replicator at idle priority on a
/// busy host, whose walk is measured in wall time) backs off to this and no further.
pub const MAX_GAP: Duration = Duration::from_millis(500);

/// The gap to keep between harvests, from how long the last walk took.
#[derive(Clone, Copy, Debug, Default)]
pub struct HarvestPace {
    last_walk: Duration,
}

impl HarvestPace {
    /// A pace that allows the first harvest at once.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records how long a harvest's walk took (wall time).
    pub fn walked(&mut self, took: Duration) {
        self.last_walk = took;
    }

    /// The least time from the end of the last harvest to the next: the last walk times
    /// [`GAP_OVER_WALK`], at most [`MAX_GAP`].
    pub fn gap(&self) -> Duration {
        self.last_walk.saturating_mul(GAP_OVER_WALK).min(MAX_GAP)
    }

    /// Whether a harvest may run `since_last` after the last one ended; always when
    /// `hurried` (an evacuation waits for it).
    pub fn allows(&self, since_last: Duration, hurried: bool) -> bool {
        hurried || since_last >= self.gap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_first_harvest_is_not_held() {
        let p = HarvestPace::new();
        assert_eq!(p.gap(), Duration::ZERO);
        assert!(p.allows(Duration::ZERO, false));
    }

    #[test]
    fn walks_take_at_most_their_share() {
        let mut p = HarvestPace::new();
        // A 1 GiB guest's walk on the bench machine: about 0.6 ms.
        p.walked(Duration::from_micros(600));
        assert_eq!(p.gap(), MS * 60);
        assert!(!p.allows(MS * 59, false));
        assert!(p.allows(MS * 60, false));
        // A small guest's walk: its gap is below the 20 ms round, so every round harvests.
        p.walked(Duration::from_micros(150));
        assert_eq!(p.gap(), MS * 15);
        assert!(p.allows(MS * 20, false));
    }

    #[test]
    fn a_slow_walk_backs_off_no_further_than_the_cap() {
        let mut p = HarvestPace::new();
        p.walked(MS * 40);
        assert_eq!(p.gap(), MAX_GAP);
        assert!(!p.allows(MAX_GAP - MS, false));
        assert!(p.allows(MAX_GAP, false));
    }

    #[test]
    fn a_hurried_replicator_harvests_at_once() {
        let mut p = HarvestPace::new();
        p.walked(MS * 40);
        assert!(p.allows(Duration::ZERO, true));
    }
}
