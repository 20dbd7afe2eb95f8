//! [`StatedStart`]: a congestion controller that starts at the path's stated BDP and then
//! leaves everything to the controller it wraps (BBR by default).
//!
//! quinn's BBR leaves its startup early on a migration's first round trips (measured through
//! the WAN emulator at 1 Gbit/s × 20 ms: ~450 Mbit/s for the first quarter second, with its
//! initial window already at the BDP), which costs a short evacuation a fifth of its time.
//! CUBIC with the same initial window fills the link within two round trips but collapses
//! under random loss (docs/wan.md). When the operator states the path's BDP, this wrapper
//! keeps the window at least that large until the first congestion event; from then on the
//! wrapped controller alone decides, below an optional ceiling
//! ([`StatedStartConfig::with_ceiling`]: `TransportTuning::in_flight_cap`, which keeps
//! quinn's BBR, whose window is about twice the BDP and which ignores random loss, from
//! filling the bottleneck's queue). (Ending the floor as soon as BBR's own window first
//! reached it was tried: BBR then drained to ~10% of the link for a fifth of a second.) A
//! statement that is wrong therefore costs at most the first loss, the ceiling (1.25 × the
//! same BDP) still caps what is in flight, and quinn paces the window over the measured
//! RTT, so it does not burst.

use std::sync::Arc;
use std::time::Instant;

use quinn::congestion::{Controller, ControllerFactory};

use super::shaped::{Shape, Shaped};

/// Builds [`StatedStart`] controllers around `inner`'s.
pub struct StatedStartConfig {
    inner: Arc<dyn ControllerFactory + Send + Sync>,
    floor: u64,
    ceiling: Option<u64>,
}

impl StatedStartConfig {
    /// Controllers from `inner`, kept at no less than `floor` bytes of window at the start.
    pub fn new(inner: Arc<dyn ControllerFactory + Send + Sync>, floor: u64) -> StatedStartConfig {
        StatedStartConfig {
            inner,
            floor,
            ceiling: None,
        }
    }

    /// Also caps the window at `ceiling` bytes for the whole connection.
    pub fn with_ceiling(mut self, ceiling: u64) -> StatedStartConfig {
        self.ceiling = Some(ceiling);
        self
    }
}

impl ControllerFactory for StatedStartConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        let mut c = StatedStart::new(self.inner.clone().build(now, current_mtu), self.floor);
        c.shape.ceiling = self.ceiling;
        Box::new(c)
    }
}

/// A controller whose window is at least the stated BDP until something is lost.
pub type StatedStart = Shaped<StartBounds>;

/// [`StatedStart`]'s bounds on the window.
#[derive(Clone, Debug)]
pub struct StartBounds {
    /// `None` once the start is over.
    floor: Option<u64>,
    /// The most the window may be, ever.
    ceiling: Option<u64>,
}

impl Shape for StartBounds {
    fn window(&self, inner: u64) -> u64 {
        let w = inner.max(self.floor.unwrap_or(0));
        self.ceiling.map_or(w, |c| w.min(c))
    }

    fn on_congestion_event(&mut self) {
        self.floor = None;
    }
}

impl StatedStart {
    /// Wraps `inner`, keeping the window at no less than `floor` bytes until the first
    /// congestion event.
    pub fn new(inner: Box<dyn Controller>, floor: u64) -> StatedStart {
        Shaped::wrap(
            inner,
            StartBounds {
                floor: Some(floor),
                ceiling: None,
            },
        )
    }

    /// Whether the stated window still holds.
    pub fn in_start(&self) -> bool {
        self.shape.floor.is_some()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::super::shaped::fixed::Fixed;
    use super::*;

    fn wrapped(inner: u64, floor: u64) -> (StatedStart, Arc<std::sync::atomic::AtomicU64>) {
        let (c, w) = Fixed::boxed(inner);
        (StatedStart::new(c, floor), w)
    }

    #[test]
    fn the_stated_window_is_a_floor_until_a_loss() {
        let now = Instant::now();
        let (mut c, inner) = wrapped(14_720, 2_500_000);
        assert_eq!(c.window(), 2_500_000);
        assert_eq!(c.initial_window(), 2_500_000);
        assert_eq!(c.metrics().congestion_window, 2_500_000);
        // The inner controller may go above the floor, and back below it.
        inner.store(3_000_000, Ordering::Relaxed);
        c.on_end_acks(now, 0, false, None);
        assert_eq!(c.window(), 3_000_000);
        inner.store(200_000, Ordering::Relaxed);
        c.on_end_acks(now, 0, false, None);
        assert!(c.in_start());
        assert_eq!(c.window(), 2_500_000);
        // After a loss it alone decides, also downwards.
        c.on_congestion_event(now, now, false, 1200);
        assert_eq!(c.window(), 200_000);
    }

    #[test]
    fn the_ceiling_holds_before_and_after_a_loss() {
        let now = Instant::now();
        let (mut c, w) = wrapped(14_720, 1_000_000);
        c.shape.ceiling = Some(1_250_000);
        assert_eq!(c.window(), 1_000_000);
        assert_eq!(c.initial_window(), 1_000_000);
        w.store(2_500_000, Ordering::Relaxed);
        assert_eq!(c.window(), 1_250_000);
        c.on_congestion_event(now, now, false, 1200);
        assert_eq!(c.window(), 1_250_000, "random loss does not lift the cap");
        assert_eq!(c.clone_box().window(), 1_250_000);
        w.store(300_000, Ordering::Relaxed);
        assert_eq!(
            c.window(),
            300_000,
            "below the cap the inner controller decides"
        );
    }

    #[test]
    fn the_first_loss_ends_the_start() {
        let now = Instant::now();
        let (mut c, _inner) = wrapped(14_720, 12_500_000);
        let copy = c.clone_box();
        c.on_congestion_event(now, now, false, 1200);
        assert!(!c.in_start());
        assert_eq!(c.window(), 14_720);
        // A clone taken before keeps its own state.
        assert_eq!(copy.window(), 12_500_000);
    }
}
