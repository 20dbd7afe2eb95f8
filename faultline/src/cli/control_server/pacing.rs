//! The evacuation's rate limit as orchestrators set it through the control endpoint.
//!
//! Each request travels on a QUIC stream of its own, so two of one connection's limits can
//! arrive out of order, and one connection can end while a limit of another's is in force.
//! Every change made here takes one lock and makes a new generation of the limit: a
//! connection applies only a limit newer (by its `seq`) than the last it applied, and one
//! that ends takes back only a limit that is still the one it set, not an equal one set
//! since by another. No limit an orchestrator sends lifts or raises the evacuation's own
//! (`--evacuate-max-rate`): it is a ceiling ([`within_own`]).

use std::sync::{Mutex, MutexGuard, PoisonError};

use fleet::control::within_own;
use transport::quic::RateLimit;

/// The evacuation's rate limit, and which change made it.
pub(super) struct Pacing {
    limit: RateLimit,
    /// The evacuation's own limit (`--evacuate-max-rate`), as the endpoint started.
    own: Option<u64>,
    generation: Mutex<u64>,
}

/// What one orchestrator's connection set.
#[derive(Default)]
pub(super) struct Paced(Mutex<PacedState>);

#[derive(Default)]
struct PacedState {
    /// The last limit it set, and the generation that set made.
    last: Option<(Option<u64>, u64)>,
    /// The highest place among its `SetRate`s applied (0: none with one).
    seq: u64,
    /// It ended: what is still on its way is not applied.
    closed: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Pacing {
    pub(super) fn new(limit: RateLimit) -> Pacing {
        Pacing {
            own: limit.get(),
            limit,
            generation: Mutex::new(0),
        }
    }

    pub(super) fn own(&self) -> Option<u64> {
        self.own
    }

    /// A `SetRate` of `paced`'s connection with place `seq` (`None`: from an orchestrator
    /// before places, always applied), its `cap` taken within the own limit (`None`: back
    /// to that): whether it was applied, and the limit in force after it.
    pub(super) fn set_rate(
        &self,
        paced: &Paced,
        seq: Option<u64>,
        cap: Option<u64>,
    ) -> (bool, Option<u64>) {
        let mut p = lock(&paced.0);
        let mut generation = lock(&self.generation);
        let newer = seq.is_none_or(|seq| seq > p.seq);
        if p.closed || !newer {
            return (false, self.limit.get());
        }
        if let Some(seq) = seq {
            p.seq = seq;
        }
        *generation += 1;
        self.limit.set(within_own(cap, self.own));
        p.last = Some((self.limit.get(), *generation));
        (true, self.limit.get())
    }

    /// An `Evacuate` of `paced`'s connection: its cap, within the own limit, becomes the
    /// limit (`None`: the evacuation's own, whatever an earlier orchestrator left), unless a `SetRate` with a
    /// place came first: the orchestrator sends those only once it asked for the
    /// evacuation, so theirs is newer. Whether it was applied.
    pub(super) fn evacuate(&self, paced: &Paced, cap: Option<u64>) -> bool {
        let mut p = lock(&paced.0);
        let mut generation = lock(&self.generation);
        if p.closed || p.seq > 0 {
            return false;
        }
        *generation += 1;
        self.limit.set(within_own(cap, self.own));
        if cap.is_some() {
            p.last = Some((self.limit.get(), *generation));
        }
        true
    }

    /// `paced`'s connection ended (`gave_up`: the orchestrator closed it with
    /// `CLOSE_GAVE_UP`). Nobody shares the link for us by its limits any more, so one it
    /// left lower than the evacuation's own (a VM held behind another at a twentieth of
    /// the link) must not outlive it; one it lifted back to the own stays, so does one left
    /// on a VM it gave up on (the VMs planned in its place have the link), and so does one
    /// another connection set since. Its own requests still arriving are not applied.
    /// Whether the own limit is back.
    pub(super) fn hang_up(&self, paced: &Paced, gave_up: bool) -> bool {
        let mut p = lock(&paced.0);
        p.closed = true;
        let mut generation = lock(&self.generation);
        match p.last {
            Some((last, made)) if !gave_up && made == *generation && lower(last, self.own) => {
                *generation += 1;
                self.limit.set(self.own);
                true
            }
            _ => false,
        }
    }
}

/// Whether `limit` holds the evacuation below `own` (`None`: no limit).
fn lower(limit: Option<u64>, own: Option<u64>) -> bool {
    match (limit, own) {
        (Some(limit), Some(own)) => limit < own,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: Option<u64> = Some(10);

    fn fresh() -> Pacing {
        Pacing::new(RateLimit::new(OWN))
    }

    #[test]
    fn a_hold_is_taken_back_when_its_connection_ends_unless_it_gave_up() {
        for (gave_up, after) in [(false, OWN), (true, Some(2))] {
            let (pacing, a) = (fresh(), Paced::default());
            assert_eq!(pacing.set_rate(&a, Some(1), Some(2)), (true, Some(2)));
            assert_eq!(pacing.hang_up(&a, gave_up), !gave_up);
            assert_eq!(pacing.limit.get(), after, "gave up: {gave_up}");
        }
    }

    #[test]
    fn only_a_hold_below_the_own_limit_that_the_connection_set_is_taken_back() {
        let (pacing, a) = (fresh(), Paced::default());
        pacing.set_rate(&a, Some(1), Some(5));
        pacing.set_rate(&a, Some(2), None);
        assert!(!pacing.hang_up(&a, false), "lifted");
        assert_eq!(pacing.limit.get(), OWN);
        // With no limit of its own, any hold is lower.
        let (pacing, a) = (Pacing::new(RateLimit::new(None)), Paced::default());
        pacing.set_rate(&a, Some(1), Some(5));
        assert!(pacing.hang_up(&a, false));
        assert_eq!(pacing.limit.get(), None);
        // A connection that set nothing takes nothing back.
        let (pacing, a, b) = (fresh(), Paced::default(), Paced::default());
        pacing.set_rate(&a, Some(1), Some(5));
        assert!(!pacing.hang_up(&b, false));
        assert_eq!(pacing.limit.get(), Some(5));
    }

    #[test]
    fn a_hold_another_connection_set_since_stays_even_when_it_is_the_same() {
        let (pacing, a, b) = (fresh(), Paced::default(), Paced::default());
        pacing.set_rate(&a, Some(1), Some(2));
        // Another orchestrator holds the VM at the same figure (the hold is a fixed
        // share of the link), then the first one's connection idles out.
        pacing.set_rate(&b, Some(1), Some(2));
        assert!(!pacing.hang_up(&a, false));
        assert_eq!(pacing.limit.get(), Some(2));
        assert!(pacing.hang_up(&b, false));
        assert_eq!(pacing.limit.get(), OWN);
    }

    #[test]
    fn a_limit_that_arrives_after_its_connection_ended_is_not_applied() {
        let (pacing, a) = (fresh(), Paced::default());
        pacing.set_rate(&a, Some(1), Some(2));
        pacing.hang_up(&a, false);
        assert_eq!(pacing.set_rate(&a, Some(2), Some(3)), (false, OWN));
        assert!(!pacing.evacuate(&a, Some(3)));
        assert_eq!(pacing.limit.get(), OWN);
    }

    #[test]
    fn a_limit_older_than_one_applied_is_not_applied_nor_an_evacuations_cap() {
        let (pacing, a) = (fresh(), Paced::default());
        assert_eq!(pacing.set_rate(&a, Some(2), Some(3)), (true, Some(3)));
        assert_eq!(pacing.set_rate(&a, Some(1), Some(1)), (false, Some(3)));
        assert_eq!(pacing.set_rate(&a, Some(2), Some(1)), (false, Some(3)));
        assert!(!pacing.evacuate(&a, Some(5)));
        assert!(!pacing.evacuate(&a, None));
        assert_eq!(pacing.limit.get(), Some(3));
        // Without a place: applied as it comes (an orchestrator before places).
        assert_eq!(pacing.set_rate(&a, None, Some(4)), (true, Some(4)));
        assert_eq!(pacing.set_rate(&a, Some(3), None), (true, OWN));
        // Another connection's places are its own.
        let b = Paced::default();
        assert_eq!(pacing.set_rate(&b, Some(1), Some(6)), (true, Some(6)));
    }

    #[test]
    fn no_orchestrator_lifts_or_raises_the_own_limit() {
        let (pacing, a) = (fresh(), Paced::default());
        assert_eq!(pacing.set_rate(&a, Some(1), Some(20)), (true, OWN));
        assert_eq!(pacing.set_rate(&a, Some(2), None), (true, OWN));
        assert_eq!(pacing.set_rate(&a, None, Some(u64::MAX)), (true, OWN));
        assert_eq!(
            pacing.set_rate(&a, None, Some(0)),
            (true, OWN),
            "0 is no limit"
        );
        assert!(
            !pacing.hang_up(&a, false),
            "nothing below the own limit to take back"
        );
        assert_eq!(pacing.limit.get(), OWN);
        let (pacing, a) = (fresh(), Paced::default());
        assert!(pacing.evacuate(&a, Some(20)));
        assert_eq!(pacing.limit.get(), OWN);
        // Without a limit of its own, the orchestrator's is the only one, and a lift lifts.
        let (pacing, a) = (Pacing::new(RateLimit::new(None)), Paced::default());
        assert_eq!(pacing.set_rate(&a, Some(1), Some(20)), (true, Some(20)));
        assert_eq!(pacing.set_rate(&a, Some(2), None), (true, None));
    }

    #[test]
    fn an_evacuations_cap_is_the_limit_and_none_the_own_one() {
        let (pacing, a) = (fresh(), Paced::default());
        assert!(pacing.evacuate(&a, Some(4)));
        assert_eq!(pacing.limit.get(), Some(4));
        let b = Paced::default();
        // A second orchestrator's evacuation without a cap: the own limit, and nothing
        // of its own to take back.
        assert!(pacing.evacuate(&b, None));
        assert_eq!(pacing.limit.get(), OWN);
        assert!(!pacing.hang_up(&b, false));
        assert!(!pacing.hang_up(&a, false), "set since");
    }
}
