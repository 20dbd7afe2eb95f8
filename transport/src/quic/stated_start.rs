//! [`StatedStart`]: a congestion controller that holds the window at the path's stated BDP
//! until the path shows it was wrong, and otherwise leaves everything to the controller it
//! wraps (BBR by default).
//!
//! quinn's BBR leaves its startup early on a migration's first round trips (measured through
//! the WAN emulator at 1 Gbit/s × 20 ms: ~450 Mbit/s for the first quarter second, with its
//! initial window already at the BDP), and on a clean path it never raised its own window
//! above one BDP, which leaves the link a few percent short. CUBIC with the same initial
//! window fills the link within two round trips but collapses under random loss
//! (docs/wan.md). When the operator states the path's BDP, this wrapper starts the window
//! there and, once a round trip was measured, holds it at the ceiling
//! ([`StatedStartConfig::with_ceiling`]: `TransportTuning::in_flight_cap`, 1.25 × the BDP;
//! `StartBounds::floor` says why that moment) until losses say the statement was too
//! large: persistent congestion, or more than 1/[`HEAVY_LOSS_DENOMINATOR`] of the bytes of
//! the last round trip or two lost ([`LossRounds`]). A bottleneck whose rate was overstated
//! drops what exceeds it once its queue is full (half of what arrives at twice its rate);
//! random loss of a few tenths of a percent to a percent does not end the floor. (Ending it
//! at the first loss, as this did before, handed a 1 Gbit/s × 20 ms path at 0.1% or 1% loss
//! to BBR in loss recovery from the window then in flight, ~120 KB, for its first quarter
//! second; ending it as soon as BBR's own window first reached it made BBR drain to ~10% of
//! the link for a fifth of a second.) From then on the wrapped controller alone decides,
//! below the ceiling, which keeps quinn's BBR, whose window is about twice the BDP and which
//! ignores random loss, from filling the bottleneck's queue. A statement that is wrong
//! therefore costs queueing up to the ceiling and the loss that shows it, and quinn paces
//! the window over the measured RTT, so it does not burst.

use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory};

use quinn_proto::RttEstimator;

use super::shaped::{Shape, Shaped};

/// Builds [`StatedStart`] controllers around `inner`'s.
pub struct StatedStartConfig {
    inner: Arc<dyn ControllerFactory + Send + Sync>,
    floor: u64,
    ceiling: Option<u64>,
}

impl StatedStartConfig {
    /// Controllers from `inner`, starting with a window of at least `floor` bytes.
    pub fn new(inner: Arc<dyn ControllerFactory + Send + Sync>, floor: u64) -> StatedStartConfig {
        StatedStartConfig {
            inner,
            floor,
            ceiling: None,
        }
    }

    /// Also caps the window at `ceiling` bytes for the whole connection, and holds it there
    /// from the first round-trip sample until losses end the start (see the module docs).
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

/// Losses above this fraction of the bytes of the last round trip or two (lost and
/// acknowledged) end the stated floor: 1/32, about 3%, three times the heaviest random loss
/// the benches run at, and far below what an overstated bottleneck drops once its queue is
/// full.
pub const HEAVY_LOSS_DENOMINATOR: u64 = 32;

/// Fewer bytes than this in the rounds judged say too little to judge: a loss among the
/// handshake's few packets does not end the floor (the ceiling still bounds the window).
pub const MIN_JUDGED_BYTES: u64 = 64 * 1200;

/// A controller whose window is at least the stated BDP until losses say it is too large.
pub type StatedStart = Shaped<StartBounds>;

/// [`StatedStart`]'s bounds on the window.
#[derive(Clone, Debug)]
pub struct StartBounds {
    /// The window before the first round-trip sample: the stated BDP.
    initial: u64,
    /// Whether the stated floor still holds (`false` once losses ended it).
    held: bool,
    /// The round-trip estimate at the first acknowledgement.
    first_rtt: Option<Duration>,
    /// Whether the round-trip estimate has moved since (a real sample is in it).
    sampled: bool,
    /// The most the window may be, ever; also the floor once sampled.
    ceiling: Option<u64>,
    losses: LossRounds,
}

impl StartBounds {
    /// The least the window may be now.
    ///
    /// The stated BDP until the first acknowledgement, then the ceiling (the in-flight cap,
    /// 1.25 BDP: one BDP in flight leaves the link a few percent short, since acknowledgements
    /// come late by the receiver's delay and the processing on both ends; measured 0.93-0.95
    /// of 1 Gbit/s × 20 ms against 1.0). The change is also what makes quinn size its pacing
    /// bursts for the real round trip: quinn-proto 0.11's pacer computes its burst from the
    /// smoothed RTT only when the window or the datagram size changes, and at the start that
    /// RTT is the 333 ms default, so a window that never changed kept bursts a seventeenth of
    /// their size and the push at ~530 Mbit/s until MTU discovery changed the datagram size
    /// (measured, 1 Gbit/s × 20 ms, the first 450 ms).
    fn floor(&self) -> u64 {
        match (self.held, self.sampled) {
            (false, _) => 0,
            (true, false) => self.initial,
            (true, true) => self.ceiling.map_or(self.initial, |c| c.max(self.initial)),
        }
    }
}

impl Shape for StartBounds {
    fn window(&self, inner: u64) -> u64 {
        let w = inner.max(self.floor());
        self.ceiling.map_or(w, |c| w.min(c))
    }

    fn on_ack(&mut self, now: Instant, bytes: u64, rtt: &RttEstimator) {
        // quinn reports the first acknowledgement before its round trip enters the estimate
        // (which is then still the configured initial RTT, 333 ms by default): a sample
        // counts once the estimate moved from what the first acknowledgement saw.
        let srtt = rtt.get();
        match self.first_rtt {
            None => self.first_rtt = Some(srtt),
            Some(first) if first != srtt => self.sampled = true,
            Some(_) => {}
        }
        self.losses.acked(now, bytes, srtt);
    }

    fn on_congestion_event(&mut self, _now: Instant, persistent: bool, lost_bytes: u64) {
        self.losses.lost(lost_bytes);
        if persistent || self.losses.heavy() {
            self.held = false;
        }
    }
}

/// Bytes acknowledged and lost in the current round trip and the one before it, rounds
/// being a smoothed RTT long: how much of what the path carried it lost, lately.
#[derive(Clone, Debug, Default)]
pub struct LossRounds {
    /// When the current round began; `None` before the first acknowledgement.
    start: Option<Instant>,
    /// (acknowledged, lost) bytes in the current round.
    current: (u64, u64),
    /// The same for the round before it.
    previous: (u64, u64),
}

impl LossRounds {
    /// `bytes` were acknowledged at `now`, with a smoothed RTT of `srtt`.
    pub fn acked(&mut self, now: Instant, bytes: u64, srtt: Duration) {
        match self.start {
            Some(start) if now.saturating_duration_since(start) < srtt => {}
            Some(_) | None => {
                self.previous = self.current;
                self.current = (0, 0);
                self.start = Some(now);
            }
        }
        self.current.0 = self.current.0.saturating_add(bytes);
    }

    /// `bytes` were declared lost.
    pub fn lost(&mut self, bytes: u64) {
        self.current.1 = self.current.1.saturating_add(bytes);
    }

    /// Whether more than 1/[`HEAVY_LOSS_DENOMINATOR`] of the bytes of the last two rounds
    /// were lost, with at least [`MIN_JUDGED_BYTES`] to judge by.
    pub fn heavy(&self) -> bool {
        let acked = self.current.0.saturating_add(self.previous.0);
        let lost = self.current.1.saturating_add(self.previous.1);
        let all = acked.saturating_add(lost);
        all >= MIN_JUDGED_BYTES && lost.saturating_mul(HEAVY_LOSS_DENOMINATOR) > all
    }
}

impl StatedStart {
    /// Wraps `inner`, keeping the window at no less than `floor` bytes (and, once a round
    /// trip was measured, the ceiling if there is one) until losses are heavy or persistent.
    pub fn new(inner: Box<dyn Controller>, floor: u64) -> StatedStart {
        Shaped::wrap(
            inner,
            StartBounds {
                initial: floor,
                held: true,
                first_rtt: None,
                sampled: false,
                ceiling: None,
                losses: LossRounds::default(),
            },
        )
    }

    /// Whether the stated window still holds.
    pub fn in_start(&self) -> bool {
        self.shape.held
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use super::super::shaped::fixed::Fixed;
    use super::*;

    fn wrapped(inner: u64, floor: u64) -> (StatedStart, Arc<std::sync::atomic::AtomicU64>) {
        let (c, w) = Fixed::boxed(inner);
        (StatedStart::new(c, floor), w)
    }

    const RTT: Duration = Duration::from_millis(20);

    /// `bytes` acknowledged in one round trip, at `now` (what `on_ack` does, without the
    /// `RttEstimator` that only quinn can make).
    fn carried(c: &mut StatedStart, now: Instant, bytes: u64) {
        c.shape.sampled = true;
        c.shape.losses.acked(now, bytes, RTT);
    }

    #[test]
    fn the_stated_window_is_a_floor_until_losses_are_heavy() {
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
        // Random loss, 1% of a round trip's bytes: the floor holds.
        carried(&mut c, now, 2_500_000);
        c.on_congestion_event(now, now, false, 25_000);
        assert!(c.in_start());
        assert_eq!(c.window(), 2_500_000);
        // A tenth of the round lost: the statement was too large; the inner controller
        // alone decides from now on, also downwards.
        c.on_congestion_event(now, now, false, 250_000);
        assert!(!c.in_start());
        assert_eq!(c.window(), 200_000);
    }

    #[test]
    fn persistent_congestion_ends_the_start() {
        let now = Instant::now();
        let (mut c, _inner) = wrapped(14_720, 2_500_000);
        carried(&mut c, now, 2_500_000);
        c.on_congestion_event(now, now, true, 1200);
        assert!(!c.in_start());
        assert_eq!(c.window(), 14_720);
    }

    #[test]
    fn a_loss_among_a_few_packets_is_not_judged() {
        let now = Instant::now();
        let (mut c, _inner) = wrapped(14_720, 2_500_000);
        // A handshake packet lost before anything much was acknowledged.
        carried(&mut c, now, 3 * 1200);
        c.on_congestion_event(now, now, false, 1200);
        assert!(c.in_start());
        // The same share of a full round is heavy.
        carried(&mut c, now, MIN_JUDGED_BYTES);
        c.on_congestion_event(now, now, false, MIN_JUDGED_BYTES / 2);
        assert!(!c.in_start());
    }

    #[test]
    fn loss_rounds_forget_all_but_the_last_two() {
        let t0 = Instant::now();
        let mut r = LossRounds::default();
        r.acked(t0, 1_000_000, RTT);
        r.lost(100_000);
        assert!(r.heavy(), "10% lost");
        // One round later the loss still counts, against both rounds' bytes.
        r.acked(t0 + RTT, 1_000_000, RTT);
        assert!(r.heavy(), "5% of two rounds");
        // Two rounds later it is forgotten.
        r.acked(t0 + 2 * RTT, 1_000_000, RTT);
        assert!(!r.heavy());
        // Within a round, acknowledgements add up.
        r.acked(t0 + 2 * RTT + RTT / 2, 1_000_000, RTT);
        r.lost(1_000_000 * 3 / HEAVY_LOSS_DENOMINATOR);
        assert!(!r.heavy(), "just under 1/32 of 3 MB");
        r.lost(1_000_000 / HEAVY_LOSS_DENOMINATOR);
        assert!(r.heavy());
    }

    #[test]
    fn the_floor_rises_to_the_ceiling_once_a_round_trip_is_measured() {
        let now = Instant::now();
        let (mut c, _inner) = wrapped(14_720, 1_000_000);
        c.shape.ceiling = Some(1_250_000);
        assert_eq!(c.initial_window(), 1_000_000);
        assert_eq!(c.window(), 1_000_000);
        carried(&mut c, now, 100_000);
        assert_eq!(c.window(), 1_250_000);
        c.on_congestion_event(now, now, true, 1200);
        assert_eq!(c.window(), 14_720);
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
        c.on_congestion_event(now, now, true, 1200);
        assert_eq!(c.window(), 1_250_000, "loss does not lift the cap");
        assert_eq!(c.clone_box().window(), 1_250_000);
        w.store(300_000, Ordering::Relaxed);
        assert_eq!(
            c.window(),
            300_000,
            "below the cap the inner controller decides"
        );
    }

    #[test]
    fn a_clone_keeps_its_own_start() {
        let now = Instant::now();
        let (mut c, _inner) = wrapped(14_720, 12_500_000);
        let copy = c.clone_box();
        c.on_congestion_event(now, now, true, 1200);
        assert!(!c.in_start());
        assert_eq!(c.window(), 14_720);
        assert_eq!(copy.window(), 12_500_000);
    }
}
