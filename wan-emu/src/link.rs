//! The pure model of one direction of an emulated WAN link: no sockets, no threads, no clock.
//!
//! The caller passes the arrival time of every packet (nanoseconds on any monotonic clock it
//! likes) and gets back a [`Verdict`]: drop it, and why, or deliver it at a given time on
//! the same clock. The relay ([`super::relay`]) feeds it the kernel's receive timestamps on
//! a monotonic clock; the unit tests feed it a virtual clock, so every behaviour is checked
//! exactly and instantly.
//!
//! A packet of `N` bytes arriving at `t` goes through, in order:
//!
//! 1. **cut**: while the link is cut, it is dropped ([`DropReason::Cut`]);
//! 2. **bottleneck queue** (only with a rate limit): a FIFO drained at `rate_bps`. If the
//!    packet would wait in it, with its own serialisation, longer than `queue_bytes` take to
//!    drain, it is tail-dropped ([`DropReason::QueueFull`]). Otherwise it leaves the
//!    bottleneck at `departure = max(t, previous departure) + (N + overhead) * 8 / rate`;
//! 3. **random loss** on the wire with probability `loss` ([`DropReason::Loss`]). The lost
//!    packet has used its share of the bottleneck, as on a real lossy link behind a router;
//! 4. **propagation**: `delivery = departure + delay + jitter sample`, never earlier than
//!    the departure. Unless [`LinkConfig::reorder`] is set, a packet is also never delivered
//!    before the one in front of it, which keeps per-direction order as a single FIFO path
//!    does (jitter then bunches packets instead of swapping them).
//!
//! Reproducibility: the loss decision draws exactly one number per offered packet (even one
//! that is cut or tail-dropped) from a generator seeded by `seed`, so the n-th packet's fate
//! depends on n and the seed only, not on timing. Jitter uses a second, independent stream.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::rng::Rng;

/// Nanoseconds on the caller's clock.
pub type Nanos = u64;

/// The smallest default bottleneck queue: a bandwidth-delay product is tiny on a short, slow
/// link, and a queue smaller than a few dozen full-size packets makes even a paced sender
/// lose packets to its own bursts.
pub const MIN_DEFAULT_QUEUE_BYTES: u64 = 64 * 1024;

/// Upper bound on `delay` and on the jitter bound: keeps all time arithmetic far from `u64`
/// overflow, and no emulated WAN needs more.
pub const MAX_DELAY: Duration = Duration::from_secs(3600);
/// Default IP MTU: Ethernet's, what a WAN path carries end to end.
pub const ETHERNET_MTU: u32 = 1500;
/// Smallest MTU accepted: IPv6's minimum, which QUIC's 1200-byte datagrams fit.
pub const MIN_MTU: u32 = 1280;
/// IPv4 and UDP headers, counted against the MTU.
pub const IP_UDP_HEADER_BYTES: u64 = 28;

/// Salt that separates the jitter stream from the loss stream of the same seed.
const JITTER_STREAM_SALT: u64 = 0x6A09_E667_F3BC_C909;

/// How jitter samples are drawn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JitterDist {
    /// Uniform in `[-jitter, +jitter]`.
    #[default]
    Uniform,
    /// Normal with standard deviation `jitter`, truncated to `±3 × jitter` (0.27% of samples
    /// are clamped) so that delivery times stay bounded.
    Normal,
}

/// The impairments of one direction of an emulated link.
///
/// The default is a perfect link: no delay, no rate limit, no loss. In JSON, durations are
/// integer microseconds under `delay_us` / `jitter_us`, and every field may be omitted:
///
/// ```json
/// {"delay_us": 20000, "jitter_us": 1000, "rate_bps": 100000000, "loss": 0.01, "seed": 7}
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LinkConfig {
    /// One-way propagation delay (half the round-trip time of a symmetric link).
    #[serde(rename = "delay_us", with = "micros")]
    pub delay: Duration,
    /// Jitter around `delay`: the half-width of the uniform range, or the standard
    /// deviation of the normal distribution (see [`JitterDist`]).
    #[serde(rename = "jitter_us", with = "micros")]
    pub jitter: Duration,
    /// Distribution of the jitter samples.
    pub jitter_dist: JitterDist,
    /// Let jitter reorder packets. Off by default: a real bottleneck path is one FIFO, and
    /// QUIC treats reordering as a loss signal, which would exaggerate the impairment.
    pub reorder: bool,
    /// Bottleneck rate in bits per second; `None` is unlimited.
    pub rate_bps: Option<u64>,
    /// Bottleneck queue in bytes (tail drop). `None` with a rate limit means one
    /// bandwidth-delay product, taking `2 × delay` as the round-trip time, but at least
    /// [`MIN_DEFAULT_QUEUE_BYTES`]. Ignored without a rate limit (nothing ever queues).
    pub queue_bytes: Option<u64>,
    /// Bytes added to every packet for the rate limit and the queue, e.g. 28 to count the
    /// IPv4 and UDP headers like a real link does. The default, 0, counts UDP payload only.
    pub overhead_bytes: u32,
    /// IP MTU of the link, bytes: a datagram whose UDP payload plus the 28 bytes of IPv4
    /// and UDP headers exceeds it is dropped, as a router drops a packet with
    /// don't-fragment set (QUIC always sets it). The default, [`ETHERNET_MTU`], is what a
    /// WAN path carries; `None` carries anything (loopback's 64 KiB). JSON: `null` for none.
    pub mtu: Option<u32>,
    /// Probability in `[0, 1]` that a packet is lost on the wire.
    pub loss: f64,
    /// Seed of the loss and jitter decisions.
    pub seed: u64,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            jitter_dist: JitterDist::Uniform,
            reorder: false,
            rate_bps: None,
            queue_bytes: None,
            overhead_bytes: 0,
            mtu: Some(ETHERNET_MTU),
            loss: 0.0,
            seed: 0x5EED,
        }
    }
}

/// A [`LinkConfig`] that cannot be emulated.
#[derive(Debug, Error, PartialEq)]
pub enum ConfigError {
    /// `loss` is not in `[0, 1]` (or is NaN).
    #[error("loss must be a probability in [0, 1], got {0}")]
    Loss(f64),
    /// `rate_bps` is `Some(0)`.
    #[error("rate_bps must be positive (omit it for an unlimited link)")]
    ZeroRate,
    /// `queue_bytes` is `Some(0)`.
    #[error("queue_bytes must be positive (omit it for the default queue)")]
    ZeroQueue,
    /// `mtu` is below the 1280 bytes every IPv6 link carries (QUIC needs 1228).
    #[error("mtu must be at least {MIN_MTU} bytes, got {0}")]
    SmallMtu(u32),
    /// `delay` plus the jitter bound exceeds [`MAX_DELAY`].
    #[error("delay plus the jitter bound must not exceed {MAX_DELAY:?}, got {0:?}")]
    TooLong(Duration),
}

impl LinkConfig {
    /// A link with round-trip time `rtt` (so a one-way delay of `rtt / 2`) and a bottleneck
    /// of `rate_bps` bits per second, with the default queue and no loss or jitter.
    pub fn new(rtt: Duration, rate_bps: u64) -> LinkConfig {
        LinkConfig {
            delay: rtt / 2,
            rate_bps: Some(rate_bps),
            ..LinkConfig::default()
        }
    }

    /// A link that only delays, by `delay` one way.
    pub fn delayed(delay: Duration) -> LinkConfig {
        LinkConfig {
            delay,
            ..LinkConfig::default()
        }
    }

    /// Sets uniform jitter of `±jitter`.
    pub fn with_jitter(mut self, jitter: Duration) -> LinkConfig {
        self.jitter = jitter;
        self
    }

    /// Sets the bottleneck rate.
    pub fn with_rate(mut self, rate_bps: u64) -> LinkConfig {
        self.rate_bps = Some(rate_bps);
        self
    }

    /// Sets the bottleneck queue size.
    pub fn with_queue_bytes(mut self, bytes: u64) -> LinkConfig {
        self.queue_bytes = Some(bytes);
        self
    }

    /// Sets the IP MTU (`None`: no limit).
    pub fn with_mtu(mut self, mtu: Option<u32>) -> LinkConfig {
        self.mtu = mtu;
        self
    }

    /// Sets the loss probability and its seed.
    pub fn with_loss(mut self, loss: f64, seed: u64) -> LinkConfig {
        self.loss = loss;
        self.seed = seed;
        self
    }

    /// Checks that the configuration can be emulated.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.loss) {
            // Also catches NaN, which is in no range.
            return Err(ConfigError::Loss(self.loss));
        }
        if self.rate_bps == Some(0) {
            return Err(ConfigError::ZeroRate);
        }
        if self.queue_bytes == Some(0) {
            return Err(ConfigError::ZeroQueue);
        }
        if let Some(mtu) = self.mtu.filter(|&m| m < MIN_MTU) {
            return Err(ConfigError::SmallMtu(mtu));
        }
        let longest = self.delay.saturating_add(self.jitter_bound());
        if longest > MAX_DELAY {
            return Err(ConfigError::TooLong(longest));
        }
        Ok(())
    }

    /// The largest deviation from `delay` a jitter sample can have.
    pub fn jitter_bound(&self) -> Duration {
        match self.jitter_dist {
            JitterDist::Uniform => self.jitter,
            JitterDist::Normal => self.jitter.saturating_mul(3),
        }
    }

    /// The queue bound in force: `queue_bytes`, else the default bandwidth-delay product;
    /// `None` without a rate limit.
    pub fn effective_queue_bytes(&self) -> Option<u64> {
        let rate = self.rate_bps?;
        Some(self.queue_bytes.unwrap_or_else(|| {
            let rtt_ns = 2 * self.delay.as_nanos();
            let bdp = u128::from(rate) * rtt_ns / 8 / 1_000_000_000;
            u64::try_from(bdp)
                .unwrap_or(u64::MAX)
                .max(MIN_DEFAULT_QUEUE_BYTES)
        }))
    }
}

/// Why a packet was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Random loss on the wire.
    Loss,
    /// The bottleneck queue was full (tail drop).
    QueueFull,
    /// The link was cut.
    Cut,
    /// Larger than the link's MTU.
    TooBig,
}

/// What happens to an offered packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver it at this time (same clock as the arrival time).
    Deliver(Nanos),
    /// Drop it.
    Drop(DropReason),
}

/// The state of one direction of an emulated link.
#[derive(Clone, Debug)]
pub struct Link {
    cfg: LinkConfig,
    /// Serialisation time of `effective_queue_bytes`: the longest a packet may spend in the
    /// bottleneck, its own serialisation included.
    queue_limit_ns: Option<Nanos>,
    loss_rng: Rng,
    jitter_rng: Rng,
    /// When the bottleneck finishes serialising everything admitted so far.
    busy_until: Nanos,
    /// Delivery time of the previous packet (for in-order delivery).
    last_delivery: Nanos,
    /// Latest arrival time seen: time never runs backwards for the model.
    last_arrival: Nanos,
    cut: bool,
}

impl Link {
    /// A link in its initial state: empty queue, not cut.
    pub fn new(cfg: LinkConfig) -> Result<Link, ConfigError> {
        cfg.validate()?;
        Ok(Link {
            queue_limit_ns: queue_limit_ns(&cfg),
            loss_rng: Rng::new(cfg.seed),
            jitter_rng: Rng::new(cfg.seed ^ JITTER_STREAM_SALT),
            busy_until: 0,
            last_delivery: 0,
            last_arrival: 0,
            cut: false,
            cfg,
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &LinkConfig {
        &self.cfg
    }

    /// Changes the impairments from now on. Packets already queued keep their times and
    /// the queue keeps its backlog. The random streams restart from the new seed only if
    /// the seed changed, so changing, say, the delay does not replay the loss pattern.
    pub fn set_config(&mut self, cfg: LinkConfig) -> Result<(), ConfigError> {
        cfg.validate()?;
        if cfg.seed != self.cfg.seed {
            self.loss_rng = Rng::new(cfg.seed);
            self.jitter_rng = Rng::new(cfg.seed ^ JITTER_STREAM_SALT);
        }
        self.queue_limit_ns = queue_limit_ns(&cfg);
        self.cfg = cfg;
        Ok(())
    }

    /// Cuts (`true`) or restores (`false`) the link. While cut every offered packet is
    /// dropped with [`DropReason::Cut`] and uses no queue space.
    pub fn set_cut(&mut self, cut: bool) {
        self.cut = cut;
    }

    /// Whether the link is cut.
    pub fn is_cut(&self) -> bool {
        self.cut
    }

    /// Bytes (wire bytes, overhead included) still waiting in or being serialised by the
    /// bottleneck at `now`; 0 without a rate limit.
    pub fn backlog_bytes(&self, now: Nanos) -> u64 {
        match self.cfg.rate_bps {
            Some(rate) => {
                let ns = u128::from(self.busy_until.saturating_sub(now));
                u64::try_from(ns * u128::from(rate) / 8 / 1_000_000_000).unwrap_or(u64::MAX)
            }
            None => 0,
        }
    }

    /// The arrival time the last [`Link::offer`] used: its `now`, or later if arrivals went
    /// backwards.
    pub fn last_arrival(&self) -> Nanos {
        self.last_arrival
    }

    /// Decides the fate of a packet of `len` bytes arriving at `now`. Arrival times should
    /// not go backwards; if they do, the packet is treated as arriving at the latest time
    /// seen, never earlier.
    pub fn offer(&mut self, now: Nanos, len: usize) -> Verdict {
        // Receive timestamps of datagrams read by different threads can interleave by a
        // few microseconds.
        let now = now.max(self.last_arrival);
        self.last_arrival = now;
        // Drawn first and unconditionally: see the module documentation.
        let lost = self.loss_rng.chance(self.cfg.loss);
        if self.cut {
            return Verdict::Drop(DropReason::Cut);
        }
        if self
            .cfg
            .mtu
            .is_some_and(|mtu| len as u64 + IP_UDP_HEADER_BYTES > u64::from(mtu))
        {
            return Verdict::Drop(DropReason::TooBig);
        }
        let wire = len as u64 + u64::from(self.cfg.overhead_bytes);
        let departure = match self.cfg.rate_bps {
            None => now,
            Some(rate) => {
                let start = self.busy_until.max(now);
                let done = start.saturating_add(serialisation_ns(wire, rate));
                // An idle bottleneck always takes a packet, even one larger than the queue,
                // so a tiny queue cannot black-hole big datagrams.
                let idle = self.busy_until <= now;
                if let Some(limit) = self.queue_limit_ns {
                    if !idle && done - now > limit {
                        return Verdict::Drop(DropReason::QueueFull);
                    }
                }
                self.busy_until = done;
                done
            }
        };
        if lost {
            return Verdict::Drop(DropReason::Loss);
        }
        let mut at = departure
            .saturating_add(self.cfg.delay.as_nanos() as u64)
            .saturating_add_signed(self.jitter_sample_ns())
            .max(departure);
        if !self.cfg.reorder {
            at = at.max(self.last_delivery);
        }
        self.last_delivery = self.last_delivery.max(at);
        Verdict::Deliver(at)
    }

    /// A signed jitter sample in nanoseconds, within `±jitter_bound()`.
    fn jitter_sample_ns(&mut self) -> i64 {
        let j = self.cfg.jitter.as_nanos() as f64;
        if j == 0.0 {
            return 0;
        }
        let sample = match self.cfg.jitter_dist {
            JitterDist::Uniform => (2.0 * self.jitter_rng.next_f64() - 1.0) * j,
            JitterDist::Normal => (self.jitter_rng.next_normal() * j).clamp(-3.0 * j, 3.0 * j),
        };
        // Bounded by MAX_DELAY (validated), so the cast cannot overflow.
        sample as i64
    }
}

/// Nanoseconds to serialise `bytes` at `rate` bits per second, rounded up.
fn serialisation_ns(bytes: u64, rate: u64) -> Nanos {
    let ns = (u128::from(bytes) * 8 * 1_000_000_000).div_ceil(u128::from(rate));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

fn queue_limit_ns(cfg: &LinkConfig) -> Option<Nanos> {
    Some(serialisation_ns(
        cfg.effective_queue_bytes()?,
        cfg.rate_bps?,
    ))
}

/// Serde adapter: a `Duration` as integer microseconds.
mod micros {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_micros(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Nanos = 1_000_000;
    const US: Nanos = 1_000;

    fn link(cfg: LinkConfig) -> Link {
        Link::new(cfg).unwrap()
    }

    fn deliver(v: Verdict) -> Nanos {
        match v {
            Verdict::Deliver(at) => at,
            Verdict::Drop(r) => panic!("dropped: {r:?}"),
        }
    }

    #[test]
    fn perfect_link_delivers_at_once() {
        let mut l = link(LinkConfig::default());
        for t in [0, 5, 5, 1_000_000] {
            assert_eq!(l.offer(t, 1200), Verdict::Deliver(t));
        }
    }

    #[test]
    fn delay_is_added_exactly() {
        let mut l = link(LinkConfig::delayed(Duration::from_millis(20)));
        assert_eq!(deliver(l.offer(0, 1200)), 20 * MS);
        assert_eq!(deliver(l.offer(7 * MS, 1)), 27 * MS);
        assert_eq!(
            LinkConfig::new(Duration::from_millis(40), 1).delay,
            Duration::from_millis(20)
        );
    }

    #[test]
    fn rate_limit_serialises_back_to_back_packets() {
        // 10 Mbit/s: 1250 bytes take exactly 1 ms.
        let mut l = link(
            LinkConfig::delayed(Duration::from_millis(5))
                .with_rate(10_000_000)
                .with_queue_bytes(10_000_000),
        );
        for i in 0..1000 {
            // All arrive at t = 0: the n-th leaves the bottleneck at (n + 1) ms.
            assert_eq!(deliver(l.offer(0, 1250)), (i + 1) * MS + 5 * MS);
        }
        // The link is busy until 1 s; a packet arriving later starts on an idle link.
        assert_eq!(l.backlog_bytes(500 * MS), 625_000);
        assert_eq!(deliver(l.offer(2000 * MS, 1250)), 2001 * MS + 5 * MS);
        assert_eq!(l.backlog_bytes(2000 * MS), 1250);
        assert_eq!(l.backlog_bytes(3000 * MS), 0);
    }

    #[test]
    fn paced_sender_below_rate_sees_no_queueing() {
        let mut l = link(LinkConfig::default().with_rate(8_000_000)); // 1 byte per µs
        for i in 0..100 {
            let t = i * 2000 * US; // 1000 bytes every 2 ms: half the rate
            assert_eq!(deliver(l.offer(t, 1000)), t + 1000 * US);
        }
    }

    #[test]
    fn throughput_never_exceeds_rate() {
        // Random sizes and arrival bursts; any window of deliveries carries at most
        // rate × window + one packet.
        let rate = 40_000_000;
        let mut l = link(
            LinkConfig::default()
                .with_rate(rate)
                .with_queue_bytes(1 << 30)
                .with_mtu(None),
        );
        let mut r = Rng::new(3);
        let mut t = 0;
        let mut out = Vec::new();
        for _ in 0..20_000 {
            t += r.next_u64() % 200 * US;
            let len = 1 + (r.next_u64() % 1500) as usize;
            out.push((deliver(l.offer(t, len)), len as u64));
        }
        for w in out.windows(50) {
            let span = w[49].0 - w[0].0;
            let bytes: u64 = w[1..].iter().map(|x| x.1).sum();
            assert!(
                bytes * 8 * 1_000_000_000 <= u128::from(span) as u64 * rate + 8 * 1_000_000_000,
                "{bytes} in {span} ns"
            );
        }
    }

    #[test]
    fn overhead_counts_towards_the_rate() {
        let cfg = LinkConfig {
            overhead_bytes: 250,
            ..LinkConfig::default().with_rate(10_000_000)
        };
        let mut l = link(cfg);
        assert_eq!(deliver(l.offer(0, 1000)), MS);
    }

    #[test]
    fn full_queue_tail_drops_and_bounds_queueing_delay() {
        // 8 Mbit/s = 1 byte/µs; a 10 000-byte queue is 10 ms of buffering.
        let cfg = LinkConfig::delayed(Duration::from_millis(30))
            .with_rate(8_000_000)
            .with_queue_bytes(10_000);
        let mut l = link(cfg);
        let (mut ok, mut full) = (0, 0);
        for _ in 0..100 {
            match l.offer(0, 1000) {
                Verdict::Deliver(at) => {
                    ok += 1;
                    assert!(at <= 30 * MS + 10 * MS, "{at}");
                }
                Verdict::Drop(DropReason::QueueFull) => full += 1,
                v => panic!("{v:?}"),
            }
        }
        assert_eq!((ok, full), (10, 90));
        assert_eq!(l.backlog_bytes(0), 10_000);
        // As the queue drains, room reappears for exactly what has left.
        assert_eq!(
            l.offer(1000 * US, 1000),
            Verdict::Deliver(11 * MS + 30 * MS)
        );
        assert_eq!(
            l.offer(1000 * US, 1000),
            Verdict::Drop(DropReason::QueueFull)
        );
        // A smaller packet that still fits is taken (tail drop is per packet, not per size).
        assert_eq!(
            l.offer(1500 * US, 500),
            Verdict::Deliver(11 * MS + 500 * US + 30 * MS)
        );
        // Once drained the queue accepts a full load again.
        for i in 0..10 {
            assert_eq!(
                l.offer(100 * MS, 1000),
                Verdict::Deliver(100 * MS + (i + 1) * MS + 30 * MS)
            );
        }
    }

    #[test]
    fn idle_bottleneck_takes_a_packet_larger_than_the_queue() {
        let mut l = link(
            LinkConfig::default()
                .with_rate(8_000_000)
                .with_queue_bytes(100),
        );
        assert_eq!(l.offer(0, 1000), Verdict::Deliver(1000 * US));
        assert_eq!(l.offer(0, 10), Verdict::Drop(DropReason::QueueFull));
        assert_eq!(l.offer(1000 * US, 1000), Verdict::Deliver(2000 * US));
    }

    #[test]
    fn default_queue_is_one_bdp_with_a_floor() {
        // 100 Mbit/s, 50 ms one way: RTT 100 ms, BDP 1.25 MB.
        let cfg = LinkConfig::new(Duration::from_millis(100), 100_000_000);
        assert_eq!(cfg.effective_queue_bytes(), Some(1_250_000));
        // 1 Mbit/s, 1 ms: BDP 250 bytes, floored.
        let cfg = LinkConfig::new(Duration::from_millis(2), 1_000_000);
        assert_eq!(cfg.effective_queue_bytes(), Some(MIN_DEFAULT_QUEUE_BYTES));
        assert_eq!(
            cfg.clone().with_queue_bytes(5).effective_queue_bytes(),
            Some(5)
        );
        assert_eq!(
            LinkConfig::delayed(Duration::from_millis(2)).effective_queue_bytes(),
            None
        );
        // The default bound is enforced: 1.25 MB = 1000 packets of 1250 bytes.
        let mut l = link(LinkConfig::new(Duration::from_millis(100), 100_000_000));
        let taken = (0..2000)
            .filter(|_| matches!(l.offer(0, 1250), Verdict::Deliver(_)))
            .count();
        assert_eq!(taken, 1000);
    }

    #[test]
    fn loss_rate_is_within_tolerance_and_reproducible() {
        let cfg = LinkConfig::default().with_loss(0.1, 42);
        let pattern = |cfg: &LinkConfig| -> Vec<bool> {
            let mut l = link(cfg.clone());
            (0..20_000)
                .map(|i| l.offer(i * US, 100) == Verdict::Drop(DropReason::Loss))
                .collect()
        };
        let a = pattern(&cfg);
        let lost = a.iter().filter(|&&x| x).count();
        // Binomial(20000, 0.1): mean 2000, sd 42; allow 5 sd.
        assert!((1790..=2210).contains(&lost), "{lost}");
        assert_eq!(a, pattern(&cfg));
        assert_ne!(
            a,
            pattern(&LinkConfig {
                seed: 43,
                ..cfg.clone()
            })
        );
    }

    #[test]
    fn loss_pattern_does_not_depend_on_timing_rate_or_jitter() {
        let base = LinkConfig::default().with_loss(0.2, 9);
        let fates = |cfg: LinkConfig, step: Nanos| -> Vec<bool> {
            let mut l = link(cfg);
            (0..2000)
                .map(|i| l.offer(i * step, 1000) == Verdict::Drop(DropReason::Loss))
                .collect()
        };
        let reference = fates(base.clone(), 1);
        let shaped = LinkConfig {
            jitter: Duration::from_millis(3),
            ..base
                .clone()
                .with_rate(1_000_000_000)
                .with_queue_bytes(1 << 30)
        };
        assert_eq!(fates(shaped, 7 * US), reference);
        assert_eq!(
            fates(
                LinkConfig::delayed(Duration::from_secs(1)).with_loss(0.2, 9),
                MS
            ),
            reference
        );
    }

    #[test]
    fn loss_extremes() {
        let mut never = link(LinkConfig::default().with_loss(0.0, 1));
        let mut always = link(LinkConfig::default().with_loss(1.0, 1));
        for t in 0..10_000 {
            assert!(matches!(never.offer(t, 10), Verdict::Deliver(_)));
            assert_eq!(always.offer(t, 10), Verdict::Drop(DropReason::Loss));
        }
    }

    #[test]
    fn lost_packets_still_use_the_bottleneck() {
        let mut l = link(LinkConfig::default().with_rate(8_000_000).with_loss(1.0, 1));
        assert_eq!(l.offer(0, 1000), Verdict::Drop(DropReason::Loss));
        assert_eq!(l.backlog_bytes(0), 1000);
    }

    fn one_way_delays(cfg: LinkConfig, n: u64, step: Nanos) -> Vec<i64> {
        let mut l = link(cfg);
        (0..n)
            .map(|i| deliver(l.offer(i * step, 1200)) as i64 - (i * step) as i64)
            .collect()
    }

    #[test]
    fn uniform_jitter_stays_in_bounds_covers_them_and_keeps_order() {
        let cfg =
            LinkConfig::delayed(Duration::from_millis(20)).with_jitter(Duration::from_millis(5));
        let mut l = link(cfg.clone());
        let mut last = 0;
        let (mut lo, mut hi) = (i64::MAX, i64::MIN);
        for i in 0..10_000u64 {
            // Sparse packets (100 ms apart) show the raw distribution.
            let t = i * 100 * MS;
            let at = deliver(l.offer(t, 1200));
            assert!(at >= last, "reordered");
            last = at;
            let d = (at - t) as i64;
            lo = lo.min(d);
            hi = hi.max(d);
        }
        assert!(lo >= 15 * MS as i64 && hi <= 25 * MS as i64, "{lo}..{hi}");
        assert!(
            lo < 15_100 * US as i64 && hi > 24_900 * US as i64,
            "{lo}..{hi}"
        );
        // Dense packets: order is kept, so some wait for the one in front, but the bounds
        // still hold.
        let d = one_way_delays(cfg, 10_000, 10 * US);
        assert!(d
            .iter()
            .all(|&x| (15 * MS as i64..=25 * MS as i64).contains(&x)));
    }

    #[test]
    fn reordering_jitter_reorders_within_bounds() {
        let cfg = LinkConfig {
            reorder: true,
            ..LinkConfig::delayed(Duration::from_millis(20)).with_jitter(Duration::from_millis(5))
        };
        let mut l = link(cfg);
        let times: Vec<Nanos> = (0..1000)
            .map(|i| deliver(l.offer(i * 100 * US, 1200)))
            .collect();
        let swaps = times.windows(2).filter(|w| w[1] < w[0]).count();
        assert!(swaps > 100, "{swaps}");
        for (i, at) in times.iter().enumerate() {
            let d = at - i as u64 * 100 * US;
            assert!((15 * MS..=25 * MS).contains(&d), "{d}");
        }
    }

    #[test]
    fn normal_jitter_has_the_configured_deviation_and_is_truncated() {
        let cfg = LinkConfig {
            jitter_dist: JitterDist::Normal,
            reorder: true,
            ..LinkConfig::delayed(Duration::from_millis(50)).with_jitter(Duration::from_millis(4))
        };
        assert_eq!(cfg.jitter_bound(), Duration::from_millis(12));
        let d = one_way_delays(cfg, 50_000, US);
        let n = d.len() as f64;
        let mean = d.iter().map(|&x| x as f64).sum::<f64>() / n;
        let sd = (d.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!((mean - 50e6).abs() < 0.1e6, "{mean}");
        assert!((sd - 4e6).abs() < 0.1e6, "{sd}");
        assert!(d
            .iter()
            .all(|&x| (38 * MS as i64..=62 * MS as i64).contains(&x)));
    }

    #[test]
    fn jitter_larger_than_delay_never_delivers_before_departure() {
        let cfg = LinkConfig {
            reorder: true,
            ..LinkConfig::delayed(Duration::from_millis(1)).with_jitter(Duration::from_millis(10))
        };
        let d = one_way_delays(cfg, 10_000, MS);
        assert!(d.iter().all(|&x| (0..=11 * MS as i64).contains(&x)));
        assert!(d.iter().filter(|&&x| x == 0).count() > 1000);
    }

    #[test]
    fn cut_drops_everything_without_using_the_queue() {
        let mut l = link(
            LinkConfig::delayed(Duration::from_millis(10))
                .with_rate(8_000_000)
                .with_loss(0.5, 1),
        );
        l.set_cut(true);
        assert!(l.is_cut());
        for t in 0..1000 {
            assert_eq!(l.offer(t, 1000), Verdict::Drop(DropReason::Cut));
        }
        assert_eq!(l.backlog_bytes(0), 0);
        l.set_cut(false);
        let delivered = (0..100)
            .filter(|&i| matches!(l.offer(i * 10 * MS, 1000), Verdict::Deliver(_)))
            .count();
        assert!((25..=75).contains(&delivered), "{delivered}");
    }

    #[test]
    fn cut_packets_consume_loss_draws() {
        // The n-th packet's loss decision is fixed by n, cut or not.
        let cfg = LinkConfig::default().with_loss(0.3, 5);
        let mut a = link(cfg.clone());
        let mut b = link(cfg);
        b.set_cut(true);
        for t in 0..100 {
            a.offer(t, 1);
            b.offer(t, 1);
        }
        b.set_cut(false);
        for t in 100..1000 {
            assert_eq!(a.offer(t, 1), b.offer(t, 1));
        }
    }

    #[test]
    fn set_config_keeps_the_queue_and_the_loss_stream() {
        let cfg = LinkConfig::default()
            .with_rate(8_000_000)
            .with_queue_bytes(1 << 20)
            .with_loss(0.5, 11);
        let mut a = link(cfg.clone());
        let mut reference = link(cfg.clone());
        let fate = |v: Verdict| matches!(v, Verdict::Drop(DropReason::Loss));
        for _ in 0..10 {
            assert_eq!(fate(a.offer(0, 1000)), fate(reference.offer(0, 1000)));
        }
        let backlog = a.backlog_bytes(0);
        a.set_config(LinkConfig {
            delay: Duration::from_millis(1),
            ..cfg.clone()
        })
        .unwrap();
        assert_eq!(a.backlog_bytes(0), backlog);
        for _ in 0..100 {
            assert_eq!(fate(a.offer(0, 1000)), fate(reference.offer(0, 1000)));
        }
        assert_eq!(a.config().delay, Duration::from_millis(1));
        assert_eq!(
            a.set_config(LinkConfig { loss: 2.0, ..cfg }),
            Err(ConfigError::Loss(2.0))
        );
    }

    #[test]
    fn invalid_configs_are_refused() {
        let bad = [
            (
                LinkConfig {
                    loss: -0.1,
                    ..LinkConfig::default()
                },
                "loss",
            ),
            (
                LinkConfig {
                    loss: f64::NAN,
                    ..LinkConfig::default()
                },
                "loss",
            ),
            (
                LinkConfig {
                    rate_bps: Some(0),
                    ..LinkConfig::default()
                },
                "rate_bps",
            ),
            (
                LinkConfig {
                    queue_bytes: Some(0),
                    ..LinkConfig::default()
                },
                "queue_bytes",
            ),
            (
                LinkConfig::delayed(Duration::from_secs(3599)).with_jitter(Duration::from_secs(2)),
                "delay",
            ),
        ];
        for (cfg, word) in bad {
            let e = Link::new(cfg).unwrap_err();
            assert!(e.to_string().contains(word), "{e}");
        }
        assert!(Link::new(LinkConfig::delayed(MAX_DELAY)).is_ok());
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        let mut l = link(
            LinkConfig::delayed(MAX_DELAY)
                .with_rate(1)
                .with_queue_bytes(u64::MAX)
                .with_mtu(None),
        );
        assert!(matches!(l.offer(u64::MAX / 2, 65_535), Verdict::Deliver(_)));
        assert!(matches!(l.offer(u64::MAX / 2, 65_535), Verdict::Deliver(_)));
        let mut l = link(LinkConfig::default().with_rate(u64::MAX).with_mtu(None));
        assert_eq!(l.offer(5, 65_535), Verdict::Deliver(6));
    }

    #[test]
    fn datagrams_above_the_mtu_are_dropped_without_using_the_link() {
        let mut l = link(LinkConfig::default().with_rate(8_000_000)); // 1 byte per µs
        assert_eq!(l.offer(0, 1472), Verdict::Deliver(1472 * US));
        assert_eq!(l.offer(0, 1473), Verdict::Drop(DropReason::TooBig));
        // The dropped datagram took no time on the bottleneck.
        assert_eq!(l.offer(0, 100), Verdict::Deliver(1572 * US));
        let mut jumbo = link(LinkConfig::default().with_mtu(Some(9000)));
        assert_eq!(jumbo.offer(0, 8972), Verdict::Deliver(0));
        assert_eq!(jumbo.offer(0, 8973), Verdict::Drop(DropReason::TooBig));
        let mut open = link(LinkConfig::default().with_mtu(None));
        assert_eq!(open.offer(0, 65_507), Verdict::Deliver(0));
        assert_eq!(
            LinkConfig::default().with_mtu(Some(1279)).validate(),
            Err(ConfigError::SmallMtu(1279))
        );
    }

    #[test]
    fn arrivals_going_backwards_count_as_the_latest_one() {
        let mut l = link(LinkConfig::delayed(Duration::from_millis(1)).with_rate(8_000_000));
        assert_eq!(l.offer(10 * MS, 1000), Verdict::Deliver(12 * MS));
        // Arrives "earlier": treated as arriving at 10 ms, so it queues behind the first.
        assert_eq!(l.offer(5 * MS, 1000), Verdict::Deliver(13 * MS));
    }
}
