//! Choosing the encoding from measurements: the cost of a wire byte (how long the push
//! waits for the link to take it), the CPU cost of compressing and hashing, the compression
//! ratio and the deduplication hit rate, all as moving averages over pushed batches.
//!
//! Per page byte, sending raw costs `link`; compressing costs `lz4_cpu + ratio × link`.
//! The push runs on one thread beside the QUIC driver on a machine whose cores are shared,
//! so the model charges CPU time serially rather than assuming it overlaps the link. Hashing
//! a page costs `hash_cpu`; it saves `hit_rate × (page wire cost − reference size)`.
//!
//! Estimates go stale, so the option not in use is probed every [`PROBE_EVERY`] batches.

use super::{EncodingPolicy, Mode};
use crate::PAGE_SIZE;

/// Re-measure the option not chosen every this many batches.
pub const PROBE_EVERY: u64 = 32;
/// Weight of a new window in the moving averages.
const ALPHA: f64 = 0.5;
/// Batches summed before the averages move: one batch's write time is too noisy on a
/// shared machine (a descheduled thread looks like a slow link).
pub const WINDOW: u64 = 8;
/// The lower dedup rate, kept so that the hit rate stays measured.
pub const SAMPLE_RATE: f64 = 1.0 / 16.0;
/// Require this much gain before switching (hysteresis against noise).
const MARGIN: f64 = 0.9;

/// What to do for the next batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Choice {
    /// Compress non-zero pages with lz4 (a page that does not shrink still goes raw).
    pub lz4: bool,
    /// Share of non-zero pages hashed for deduplication, 0 to 1.
    pub dedup_rate: f64,
}

/// What one pushed batch measured.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BatchSample {
    /// Bytes written to the stream for this batch.
    pub wire_bytes: u64,
    /// Time the push waited for the stream to take them (the link's pace once the send
    /// window is full; near zero when the link is faster than the push).
    pub write_ns: u64,
    /// Input bytes of the non-zero pages compressed.
    pub lz4_in: u64,
    /// What they came to on the wire, bytes with length prefixes; a page that did not
    /// shrink counts as a full page.
    pub lz4_out: u64,
    /// CPU time spent compressing, ns.
    pub lz4_ns: u64,
    /// Pages hashed for deduplication.
    pub hashed: u64,
    /// Of those, pages found in the content index (sent as references).
    pub hits: u64,
    /// CPU time spent hashing and looking up, ns.
    pub hash_ns: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Avg(Option<f64>);

impl Avg {
    fn add(&mut self, x: f64) {
        if x.is_finite() {
            self.0 = Some(match self.0 {
                Some(a) => a + ALPHA * (x - a),
                None => x,
            });
        }
    }
}

/// Picks lz4 on/off and the dedup rate, batch by batch.
#[derive(Clone, Debug)]
pub struct Tuner {
    policy: EncodingPolicy,
    link: Avg,
    lz4_cpu: Avg,
    lz4_ratio: Avg,
    hash_cpu: Avg,
    hit_rate: Avg,
    batches: u64,
    lz4: bool,
    dedup_rate: f64,
    /// Sums over the batches since the averages last moved.
    window: BatchSample,
}

impl Tuner {
    /// A tuner for `policy`. Modes `On` and `Off` are obeyed as they are; `Auto` lz4 starts
    /// raw, and `Auto` deduplication starts hashing about one page in 16 (`SAMPLE_RATE`).
    pub fn new(policy: EncodingPolicy) -> Tuner {
        Tuner {
            policy,
            link: Avg::default(),
            lz4_cpu: Avg::default(),
            lz4_ratio: Avg::default(),
            hash_cpu: Avg::default(),
            hit_rate: Avg::default(),
            batches: 0,
            lz4: policy.lz4 == Mode::On,
            dedup_rate: match policy.dedup {
                Mode::Off => 0.0,
                Mode::On => 1.0,
                Mode::Auto => SAMPLE_RATE,
            },
            window: BatchSample::default(),
        }
    }

    /// The encoding for the next batch.
    pub fn choose(&mut self) -> Choice {
        let n = self.batches;
        let lz4 = match self.policy.lz4 {
            Mode::Off => false,
            Mode::On => true,
            // The first batch measures the link raw, the second measures lz4; then the
            // cheaper one, with the other probed now and then.
            Mode::Auto if n == 0 => false,
            Mode::Auto if n == 1 || self.lz4_cpu.0.is_none() => true,
            Mode::Auto if n.is_multiple_of(PROBE_EVERY) => !self.lz4,
            Mode::Auto => self.lz4,
        };
        Choice {
            lz4,
            dedup_rate: self.dedup_rate,
        }
    }

    /// Takes a batch's measurements and updates the choice.
    pub fn observe(&mut self, b: &BatchSample) {
        self.batches += 1;
        let w = &mut self.window;
        w.wire_bytes += b.wire_bytes;
        w.write_ns += b.write_ns;
        w.lz4_in += b.lz4_in;
        w.lz4_out += b.lz4_out;
        w.lz4_ns += b.lz4_ns;
        w.hashed += b.hashed;
        w.hits += b.hits;
        w.hash_ns += b.hash_ns;
        // The first two batches (raw, then lz4) seed the estimates at once.
        if self.batches > 2 && !self.batches.is_multiple_of(WINDOW) {
            return;
        }
        let s = std::mem::take(&mut self.window);
        if s.wire_bytes > 0 {
            self.link.add(s.write_ns as f64 / s.wire_bytes as f64);
        }
        if s.lz4_in > 0 {
            self.lz4_cpu.add(s.lz4_ns as f64 / s.lz4_in as f64);
            self.lz4_ratio.add(s.lz4_out as f64 / s.lz4_in as f64);
        }
        if s.hashed > 0 {
            self.hash_cpu
                .add(s.hash_ns as f64 / (s.hashed as f64 * PAGE_SIZE as f64));
            self.hit_rate.add(s.hits as f64 / s.hashed as f64);
        }
        if self.policy.lz4 == Mode::Auto {
            if let (Some(link), Some(cpu), Some(ratio)) =
                (self.link.0, self.lz4_cpu.0, self.lz4_ratio.0)
            {
                let raw = link;
                let lz4 = cpu + ratio * link;
                if self.lz4 && raw < lz4 * MARGIN {
                    self.lz4 = false;
                } else if !self.lz4 && lz4 < raw * MARGIN {
                    self.lz4 = true;
                }
            }
        }
        if self.policy.dedup == Mode::Auto {
            if let (Some(link), Some(hash), Some(hits)) =
                (self.link.0, self.hash_cpu.0, self.hit_rate.0)
            {
                // Per page: a hit saves the page's wire cost (as currently encoded).
                let page_wire = link
                    * PAGE_SIZE as f64
                    * if self.lz4 {
                        self.lz4_ratio.0.unwrap_or(1.0)
                    } else {
                        1.0
                    };
                let gain = hits * page_wire;
                let cost = hash * PAGE_SIZE as f64;
                self.dedup_rate = if gain > cost { 1.0 } else { SAMPLE_RATE };
            }
        }
    }

    /// Current estimates: (link ns per wire byte, lz4 ns per input byte, lz4 ratio,
    /// dedup hit rate).
    pub fn estimates(&self) -> (Option<f64>, Option<f64>, Option<f64>, Option<f64>) {
        (
            self.link.0,
            self.lz4_cpu.0,
            self.lz4_ratio.0,
            self.hit_rate.0,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `batches` batches of 1 MiB of page data through a tuner against a modelled
    /// link (`link_ns` per wire byte) and CPU (`lz4_ns` per input byte, `ratio`).
    fn simulate(link_ns: f64, lz4_ns: f64, ratio: f64, batches: u64) -> (Tuner, u64) {
        let mut t = Tuner::new(EncodingPolicy::AUTO);
        let mut lz4_batches = 0;
        for _ in 0..batches {
            let c = t.choose();
            let input = 1u64 << 20;
            let (wire, lz4_ns_total) = if c.lz4 {
                lz4_batches += 1;
                (
                    (input as f64 * ratio) as u64,
                    (input as f64 * lz4_ns) as u64,
                )
            } else {
                (input, 0)
            };
            t.observe(&BatchSample {
                wire_bytes: wire,
                write_ns: (wire as f64 * link_ns) as u64,
                lz4_in: if c.lz4 { input } else { 0 },
                lz4_out: if c.lz4 { wire } else { 0 },
                lz4_ns: lz4_ns_total,
                ..BatchSample::default()
            });
        }
        (t, lz4_batches)
    }

    #[test]
    fn a_slow_link_compresses() {
        // 100 Mbit/s = 80 ns per byte; lz4 at 1 GB/s halving the data.
        let (mut t, n) = simulate(80.0, 1.0, 0.5, 200);
        assert!(t.choose().lz4 || t.batches % PROBE_EVERY == 0);
        assert!(n > 180, "lz4 in only {n} of 200 batches");
    }

    #[test]
    fn a_fast_link_sends_raw() {
        // Loopback: 0.6 ns per byte; lz4 costs more CPU than the bytes it saves.
        let (_, n) = simulate(0.6, 1.0, 0.5, 200);
        assert!(n < 12, "lz4 in {n} of 200 batches (only probes expected)");
    }

    #[test]
    fn incompressible_data_is_sent_raw_even_on_a_slow_link() {
        let (_, n) = simulate(80.0, 1.0, 1.0, 200);
        assert!(n < 12, "lz4 in {n} of 200 batches");
    }

    #[test]
    fn fixed_policies_are_obeyed() {
        for (policy, lz4) in [(EncodingPolicy::OFF, false), (EncodingPolicy::ALL, true)] {
            let mut t = Tuner::new(policy);
            for _ in 0..100 {
                assert_eq!(t.choose().lz4, lz4);
                t.observe(&BatchSample {
                    wire_bytes: 1000,
                    write_ns: 1_000_000,
                    lz4_in: 1000,
                    lz4_out: 999,
                    lz4_ns: 10_000_000,
                    ..BatchSample::default()
                });
            }
        }
    }

    #[test]
    fn dedup_rate_follows_hits() {
        let mut t = Tuner::new(EncodingPolicy::AUTO);
        let sample = |hits| BatchSample {
            wire_bytes: 1 << 20,
            write_ns: 80 << 20,
            hashed: 256,
            hits,
            hash_ns: 256 * 400,
            ..BatchSample::default()
        };
        for _ in 0..20 {
            t.observe(&sample(64));
        }
        assert_eq!(t.choose().dedup_rate, 1.0);
        // Hashing is cheap next to a slow link, so even a rare hit pays; only when hits
        // stop altogether does the rate fall back to sampling.
        for _ in 0..200 {
            t.observe(&sample(0));
        }
        assert_eq!(t.choose().dedup_rate, SAMPLE_RATE);
    }
}
