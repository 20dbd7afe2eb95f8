//! [`RateLimit`]: a ceiling on one connection's sending rate that can be changed while it
//! runs (an orchestrator's bandwidth share for one VM's evacuation, a NIC share), and
//! [`RateLimited`], the congestion controller wrapper that applies it.
//!
//! quinn has no rate limit of its own, but it never has more than the congestion window in
//! flight and paces that window over the smoothed round-trip time. A window of
//! limit × smoothed RTT therefore moves at most the limit: below the bottleneck's rate no
//! queue builds and the RTT stays at the path's; where several flows overfill a link, the
//! queue raises every flow's RTT and with it its window, so a capped flow keeps its rate
//! rather than collapsing. The wrapped controller still decides below the ceiling (a
//! congested path slows a capped flow as it would any other).
//!
//! The window never drops below [`MIN_WINDOW_PACKETS`] datagrams of the path's size: quinn
//! sends nothing while a whole datagram does not fit in the window. So a limit holds only
//! where limit × RTT is at least that (at 20 ms, two 1,452-byte datagrams are 1.2 Mbit/s);
//! on loopback, with 64 KiB datagrams and a round trip of a few tens of microseconds, it
//! does not bind below several Gbit/s.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory};
use quinn_proto::RttEstimator;

use super::bdp_bytes;
use super::shaped::{Shape, Shaped};

/// The smallest window a limit leaves, in datagrams of the path's current size.
pub const MIN_WINDOW_PACKETS: u64 = 2;

/// A limit on a connection's sending rate, in bits per second; shared, so that whoever
/// holds a clone can change it while the connection runs. `None`: no limit.
#[derive(Clone, Debug, Default)]
pub struct RateLimit(Arc<AtomicU64>);

impl RateLimit {
    /// A limit of `bps` bits per second (`None` or 0: none yet).
    pub fn new(bps: Option<u64>) -> RateLimit {
        let l = RateLimit::default();
        l.set(bps);
        l
    }

    /// Changes the limit; connections using it follow from their next acknowledgement.
    pub fn set(&self, bps: Option<u64>) {
        self.0.store(bps.unwrap_or(0), Ordering::Relaxed);
    }

    /// The limit now, bits per second.
    pub fn get(&self) -> Option<u64> {
        Some(self.0.load(Ordering::Relaxed)).filter(|&b| b > 0)
    }

    /// The window that moves at most the limit over `rtt`, at least `floor` bytes; `None`
    /// without a limit.
    fn window(&self, rtt: Duration, floor: u64) -> Option<u64> {
        self.get().map(|bps| bdp_bytes(bps, rtt).max(floor))
    }
}

/// Two limits are equal when they limit to the same rate now (a tuning compared in a test
/// compares what it does, not which handle it holds).
impl PartialEq for RateLimit {
    fn eq(&self, other: &RateLimit) -> bool {
        self.get() == other.get()
    }
}

impl Eq for RateLimit {}

/// Builds [`RateLimited`] controllers around `inner`'s, all following one [`RateLimit`].
pub struct RateLimitedConfig {
    inner: Arc<dyn ControllerFactory + Send + Sync>,
    limit: RateLimit,
}

impl RateLimitedConfig {
    /// Controllers from `inner`, their windows capped by `limit`.
    pub fn new(inner: Arc<dyn ControllerFactory + Send + Sync>, limit: RateLimit) -> Self {
        RateLimitedConfig { inner, limit }
    }
}

impl ControllerFactory for RateLimitedConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Shaped::wrap(
            self.inner.clone().build(now, current_mtu),
            RateCeiling {
                limit: self.limit.clone(),
                srtt: None,
                mtu: current_mtu,
            },
        ))
    }
}

/// A controller whose window is at most its [`RateLimit`] × the smoothed round-trip time.
pub type RateLimited = Shaped<RateCeiling>;

/// [`RateLimited`]'s bound on the window.
#[derive(Clone, Debug)]
pub struct RateCeiling {
    limit: RateLimit,
    /// The last smoothed RTT an acknowledgement brought; `None` before the first, when the
    /// limit does not apply yet (the handshake's own packets bring the first sample,
    /// before any data is sent).
    srtt: Option<Duration>,
    mtu: u16,
}

impl Shape for RateCeiling {
    fn window(&self, inner: u64) -> u64 {
        let floor = MIN_WINDOW_PACKETS * u64::from(self.mtu);
        let ceiling = self.srtt.and_then(|rtt| self.limit.window(rtt, floor));
        ceiling.map_or(inner, |c| inner.min(c))
    }

    fn initial_window(&self, inner: u64) -> u64 {
        inner
    }

    fn on_ack(&mut self, _now: Instant, _bytes: u64, rtt: &RttEstimator) {
        self.srtt = Some(rtt.get());
    }

    fn on_mtu_update(&mut self, mtu: u16) {
        self.mtu = mtu;
    }
}

#[cfg(test)]
mod tests {
    use super::super::shaped::fixed::Fixed;
    use super::*;

    fn limited(inner: u64, limit: &RateLimit, srtt: Option<Duration>) -> RateLimited {
        let (c, _) = Fixed::boxed(inner);
        Shaped::wrap(
            c,
            RateCeiling {
                limit: limit.clone(),
                srtt,
                mtu: 1452,
            },
        )
    }

    #[test]
    fn a_limit_is_shared_and_none_or_zero_is_no_limit() {
        let l = RateLimit::new(Some(50_000_000));
        let copy = l.clone();
        assert_eq!(copy.get(), Some(50_000_000));
        l.set(Some(20_000_000));
        assert_eq!(copy.get(), Some(20_000_000));
        l.set(None);
        assert_eq!(copy.get(), None);
        assert_eq!(RateLimit::new(Some(0)).get(), None);
        assert_eq!(RateLimit::new(None), RateLimit::default());
        assert_ne!(RateLimit::new(Some(1)), RateLimit::default());
    }

    #[test]
    fn the_window_is_the_limit_times_the_smoothed_rtt() {
        let l = RateLimit::new(Some(100_000_000));
        let c = limited(10_000_000, &l, Some(Duration::from_millis(20)));
        // 100 Mbit/s × 20 ms = 250 kB.
        assert_eq!(c.window(), 250_000);
        assert_eq!(c.metrics().congestion_window, 250_000);
        // A queue that doubles the RTT doubles the window: the rate stays the limit.
        let c = limited(10_000_000, &l, Some(Duration::from_millis(40)));
        assert_eq!(c.window(), 500_000);
    }

    #[test]
    fn below_the_limit_the_inner_controller_decides() {
        let l = RateLimit::new(Some(100_000_000));
        let c = limited(100_000, &l, Some(Duration::from_millis(20)));
        assert_eq!(c.window(), 100_000);
    }

    #[test]
    fn no_limit_and_no_rtt_sample_leave_the_window_alone() {
        let none = RateLimit::default();
        let c = limited(3_000_000, &none, Some(Duration::from_millis(20)));
        assert_eq!(c.window(), 3_000_000);
        let l = RateLimit::new(Some(1_000_000));
        let c = limited(3_000_000, &l, None);
        assert_eq!(c.window(), 3_000_000);
        assert_eq!(c.initial_window(), 14_720, "the inner controller's");
    }

    #[test]
    fn the_window_keeps_room_for_two_datagrams() {
        let l = RateLimit::new(Some(1_000_000));
        let mut c = limited(3_000_000, &l, Some(Duration::from_micros(50)));
        assert_eq!(c.window(), 2 * 1452);
        c.on_mtu_update(65_495);
        assert_eq!(c.window(), 2 * 65_495);
    }

    #[test]
    fn a_change_of_limit_applies_at_once_and_to_clones() {
        let l = RateLimit::new(Some(100_000_000));
        let c = limited(10_000_000, &l, Some(Duration::from_millis(20)));
        let copy = c.clone_box();
        l.set(Some(50_000_000));
        assert_eq!(c.window(), 125_000);
        assert_eq!(copy.window(), 125_000);
        l.set(None);
        assert_eq!(c.window(), 10_000_000);
    }
}
