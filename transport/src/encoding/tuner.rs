//! Choosing the encoding from measurements: the cost of a wire byte (how long the push
//! waits for the link to take it), the CPU cost of compressing and hashing, what lz4 makes
//! of the pages it shrinks, how many pages it cannot shrink, and how often a hashed page
//! repeats one already sent.
//!
//! **lz4.** A page either shrinks under lz4 or goes raw anyway (the encoder's per-page
//! fallback), so the two kinds of page are measured apart. On a page that shrinks, lz4 costs
//! `cpu_c` per byte and saves `(1 − ratio_c) × link`; on one that does not, it costs
//! `cpu_i` (lz4 skips fast over data without matches) and saves nothing. Whether lz4 *pays*
//! is decided from the shrinking pages alone, with hysteresis: that does not change when
//! the memory runs through a stretch of incompressible data, so lz4 is not switched off
//! for a compressible region that follows (the old tuner's loss on a real guest's RAM,
//! docs/encoding.md). Whether it is *tried on every page* follows the share `s` of recent
//! tried pages that shrank (a moving average per batch): every page while
//! `s × gain_c > (1 − s) × cpu_i`, otherwise a pseudo-random [`SAMPLE_RATE`] of pages, whose
//! results bring `s` back up within a batch or two of compressible data. When lz4 does not
//! pay (a link faster than the compressor, such as loopback), pages go raw and every
//! [`PROBE_EVERY`]th batch is compressed to keep the estimates current.
//!
//! **Deduplication.** A reference can only name a page that was hashed when it was sent,
//! so the content index is kept complete: every non-zero page is hashed while a hash costs
//! less than what the repeats it finds save, `hash_cpu < page_wire × max(hit_rate,
//! MIN_HIT_RATE)`, where `hit_rate` is the share of hashed pages found in the index over
//! the whole session (not a recent average: copies are clustered, and a stretch without any
//! says little about the next) and `page_wire` what a page costs on the wire as encoded.
//! On any WAN a hash is far cheaper than that; on a link faster than hashing (loopback
//! with few repeats) pages are hashed at [`SAMPLE_RATE`], which keeps the hit rate measured.
//!
//! The push runs on one thread beside the QUIC driver on a machine whose cores are shared,
//! so the model charges CPU time serially rather than assuming it overlaps the link. When
//! the push, not the link, is the bottleneck, the measured link cost falls towards zero and
//! so does what compression can save.
//!
//! The tuner is a pure state machine: [`Tuner::choose`] before each batch,
//! [`Tuner::observe`] with what it measured after.

use super::{EncodingPolicy, Mode};
use crate::PAGE_SIZE;

/// While lz4 does not pay, compress every this many batches to re-measure it.
pub const PROBE_EVERY: u64 = 32;
/// Weight of a new window in the cost averages.
const ALPHA: f64 = 0.5;
/// Weight of a new batch in the share of tried pages that shrank: fast, so that lz4 is
/// tried on every page again within a batch or two of compressible data.
const SHARE_ALPHA: f64 = 0.5;
/// Batches summed before the cost averages move: one batch's write time is too noisy on a
/// shared machine (a descheduled thread looks like a slow link).
pub const WINDOW: u64 = 8;
/// The lower rate of pages tried with lz4 or hashed, so that the other estimates stay
/// measured.
pub const SAMPLE_RATE: f64 = 1.0 / 16.0;
/// The hit rate assumed at least when deciding whether to hash every page: an index is
/// worth keeping complete if one page in 32 repeats.
pub const MIN_HIT_RATE: f64 = 1.0 / 32.0;
/// Weight of a new window in the link's and the sending CPU's averages: slower than the
/// others, as a CPU-bound push measures them in bursts (with and without a backlog).
const LINK_ALPHA: f64 = 0.25;
/// lz4 is switched on when it saves 1/ON_MARGIN times its CPU, and off only when it
/// saves less than OFF_MARGIN times its CPU: hysteresis against noise, wider on the way
/// off because lz4 kept on by mistake costs its CPU on the pages that shrink, while lz4
/// off by mistake costs the link what they would have saved.
const ON_MARGIN: f64 = 0.9;
const OFF_MARGIN: f64 = 0.75;

/// What to do for the next batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Choice {
    /// Share of non-zero pages (not sent as references) tried with lz4, 0 to 1; a page that
    /// does not shrink still goes raw.
    pub lz4_rate: f64,
    /// Share of non-zero pages hashed for deduplication, 0 to 1.
    pub dedup_rate: f64,
}

/// What one pushed batch measured.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BatchSample {
    /// Bytes written to the stream for this batch.
    pub wire_bytes: u64,
    /// Of those, the bytes whose cost on the link was measured (`write_ns`): none before
    /// the link's rate is first measured, as the first writes go into an empty send buffer
    /// and how long they wait says nothing about the link.
    pub link_bytes: u64,
    /// What the link took to carry `link_bytes`: the time the push waited for the stream to
    /// take them, or the connection's measured rate once the push is ahead of the wire
    /// (near zero when the link is faster than the push).
    pub write_ns: u64,
    /// CPU time the source process spent, besides building this batch, from the last
    /// batch's write to this one's: mostly the QUIC stack encrypting and sending.
    pub send_cpu_ns: u64,
    /// Input bytes of the non-zero pages tried with lz4.
    pub lz4_in: u64,
    /// What they came to on the wire, bytes with length prefixes; a page that did not
    /// shrink counts as a full page.
    pub lz4_out: u64,
    /// CPU time spent compressing, ns.
    pub lz4_ns: u64,
    /// Of the pages tried, those that shrank.
    pub lz4_shrunk: u64,
    /// Their wire bytes (with length prefixes).
    pub lz4_shrunk_out: u64,
    /// CPU time spent compressing them, ns.
    pub lz4_shrunk_ns: u64,
    /// Pages hashed for deduplication.
    pub hashed: u64,
    /// Of those, pages found in the content index (sent as references).
    pub hits: u64,
    /// CPU time spent hashing and looking up, ns.
    pub hash_ns: u64,
}

impl BatchSample {
    fn add(&mut self, b: &BatchSample) {
        self.wire_bytes += b.wire_bytes;
        self.link_bytes += b.link_bytes;
        self.write_ns += b.write_ns;
        self.send_cpu_ns += b.send_cpu_ns;
        self.lz4_in += b.lz4_in;
        self.lz4_out += b.lz4_out;
        self.lz4_ns += b.lz4_ns;
        self.lz4_shrunk += b.lz4_shrunk;
        self.lz4_shrunk_out += b.lz4_shrunk_out;
        self.lz4_shrunk_ns += b.lz4_shrunk_ns;
        self.hashed += b.hashed;
        self.hits += b.hits;
        self.hash_ns += b.hash_ns;
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Avg(Option<f64>);

impl Avg {
    fn add(&mut self, x: f64, alpha: f64) {
        if x.is_finite() {
            self.0 = Some(match self.0 {
                Some(a) => a + alpha * (x - a),
                None => x,
            });
        }
    }
}

/// Picks the share of pages tried with lz4 and the dedup rate, batch by batch.
#[derive(Clone, Debug)]
pub struct Tuner {
    policy: EncodingPolicy,
    /// ns per wire byte the push waits for the link.
    link: Avg,
    /// ns of the process's CPU per wire byte, besides encoding.
    send_cpu: Avg,
    /// lz4 ns per input byte and output over input, over every page tried (for the
    /// report and a page's wire cost).
    lz4_cpu: Avg,
    lz4_ratio: Avg,
    /// The same over the pages that shrank.
    cpu_c: Avg,
    ratio_c: Avg,
    /// lz4 ns per input byte over the pages that did not shrink.
    cpu_i: Avg,
    /// Share of recently tried pages that shrank.
    share: Avg,
    hash_cpu: Avg,
    /// Pages hashed and hits over the session.
    hashed: u64,
    hits: u64,
    batches: u64,
    /// Whether lz4 pays on the pages it shrinks (with hysteresis).
    lz4_pays: bool,
    dedup_rate: f64,
    /// Sums over the batches since the averages last moved.
    window: BatchSample,
}

impl Tuner {
    /// A tuner for `policy`. Modes `On` and `Off` are obeyed as they are; `Auto` starts
    /// with lz4 tried on every page and every page hashed, until measurements say
    /// otherwise.
    pub fn new(policy: EncodingPolicy) -> Tuner {
        Tuner {
            policy,
            link: Avg::default(),
            send_cpu: Avg::default(),
            lz4_cpu: Avg::default(),
            lz4_ratio: Avg::default(),
            cpu_c: Avg::default(),
            ratio_c: Avg::default(),
            cpu_i: Avg::default(),
            share: Avg::default(),
            hash_cpu: Avg::default(),
            hashed: 0,
            hits: 0,
            batches: 0,
            lz4_pays: policy.lz4 != Mode::Off,
            dedup_rate: match policy.dedup {
                Mode::Off => 0.0,
                Mode::On | Mode::Auto => 1.0,
            },
            window: BatchSample::default(),
        }
    }

    /// The policy it was made for.
    pub fn policy(&self) -> EncodingPolicy {
        self.policy
    }

    /// The encoding for the next batch.
    pub fn choose(&mut self) -> Choice {
        let lz4_rate = match self.policy.lz4 {
            Mode::Off => 0.0,
            Mode::On => 1.0,
            Mode::Auto if !self.lz4_pays => {
                if self.batches.is_multiple_of(PROBE_EVERY) {
                    1.0
                } else {
                    0.0
                }
            }
            Mode::Auto => self.lz4_try_rate(),
        };
        Choice {
            lz4_rate,
            dedup_rate: self.dedup_rate,
        }
    }

    /// While lz4 pays: every page, unless recent pages rarely shrank and trying costs
    /// more than the few that do save.
    fn lz4_try_rate(&self) -> f64 {
        let (Some(link), Some(cpu_i), Some(s)) = (self.wire_cost(), self.cpu_i.0, self.share.0)
        else {
            // Every page tried so far shrank, or nothing is measured yet.
            return 1.0;
        };
        // Until a page has shrunk, assume one would halve for free: optimistic, so that
        // sampling goes on.
        let gain_c = match (self.cpu_c.0, self.ratio_c.0) {
            (Some(cpu), Some(ratio)) => (1.0 - ratio) * link - cpu,
            _ => 0.5 * link,
        };
        if s * gain_c >= (1.0 - s) * cpu_i {
            1.0
        } else {
            SAMPLE_RATE
        }
    }

    /// Takes a batch's measurements and updates the choice.
    pub fn observe(&mut self, b: &BatchSample) {
        self.batches += 1;
        self.hashed += b.hashed;
        self.hits += b.hits;
        if b.lz4_in > 0 {
            let tried = b.lz4_in as f64 / PAGE_SIZE as f64;
            self.share.add(b.lz4_shrunk as f64 / tried, SHARE_ALPHA);
        }
        self.window.add(b);
        // The first batch seeds the estimates at once.
        if self.batches > 1 && !self.batches.is_multiple_of(WINDOW) {
            return;
        }
        let s = std::mem::take(&mut self.window);
        // Until the link's cost is measured nothing is decided on it: lz4 and hashing stay
        // as they started (on, for `auto`).
        if s.link_bytes > 0 {
            self.link
                .add(s.write_ns as f64 / s.link_bytes as f64, LINK_ALPHA);
        }
        if s.wire_bytes > 0 {
            self.send_cpu
                .add(s.send_cpu_ns as f64 / s.wire_bytes as f64, LINK_ALPHA);
        }
        if s.lz4_in > 0 {
            self.lz4_cpu.add(s.lz4_ns as f64 / s.lz4_in as f64, ALPHA);
            self.lz4_ratio
                .add(s.lz4_out as f64 / s.lz4_in as f64, ALPHA);
        }
        let shrunk_in = s.lz4_shrunk * PAGE_SIZE as u64;
        if shrunk_in > 0 {
            self.cpu_c
                .add(s.lz4_shrunk_ns as f64 / shrunk_in as f64, ALPHA);
            self.ratio_c
                .add(s.lz4_shrunk_out as f64 / shrunk_in as f64, ALPHA);
        }
        let other_in = s.lz4_in.saturating_sub(shrunk_in);
        if other_in > 0 {
            let ns = s.lz4_ns.saturating_sub(s.lz4_shrunk_ns);
            self.cpu_i.add(ns as f64 / other_in as f64, ALPHA);
        }
        if s.hashed > 0 {
            self.hash_cpu.add(
                s.hash_ns as f64 / (s.hashed as f64 * PAGE_SIZE as f64),
                ALPHA,
            );
        }
        if self.policy.lz4 == Mode::Auto {
            if let (Some(link), Some(cpu), Some(ratio)) =
                (self.wire_cost(), self.cpu_c.0, self.ratio_c.0)
            {
                let saves = (1.0 - ratio) * link;
                if self.lz4_pays && saves < cpu * OFF_MARGIN {
                    self.lz4_pays = false;
                } else if !self.lz4_pays && saves * ON_MARGIN > cpu {
                    self.lz4_pays = true;
                }
            }
        }
        if self.policy.dedup == Mode::Auto {
            if let (Some(link), Some(hash)) = (self.wire_cost(), self.hash_cpu.0) {
                // Per page: a hit saves the page's wire cost as currently encoded.
                let ratio = if self.lz4_pays {
                    self.lz4_ratio.0.unwrap_or(1.0)
                } else {
                    1.0
                };
                let page_wire = link * PAGE_SIZE as f64 * ratio;
                let hit_rate = self.hits as f64 / self.hashed.max(1) as f64;
                let gain = hit_rate.max(MIN_HIT_RATE) * page_wire;
                let cost = hash * PAGE_SIZE as f64;
                self.dedup_rate = if gain > cost { 1.0 } else { SAMPLE_RATE };
            }
        }
    }

    /// What a wire byte costs, ns: the link's pace, or the CPU the source spends sending
    /// it where that is more (the push, not the link, then sets the pace).
    fn wire_cost(&self) -> Option<f64> {
        let link = self.link.0?;
        Some(link.max(self.send_cpu.0.unwrap_or(0.0)))
    }

    /// The estimate of the source's CPU per wire byte besides encoding.
    pub fn send_cpu_estimate(&self) -> Option<f64> {
        self.send_cpu.0
    }

    /// Current estimates: (link ns per wire byte, lz4 ns per input byte, lz4 output over
    /// input over the pages tried, dedup hit rate over the session).
    pub fn estimates(&self) -> (Option<f64>, Option<f64>, Option<f64>, Option<f64>) {
        (
            self.link.0,
            self.lz4_cpu.0,
            self.lz4_ratio.0,
            (self.hashed > 0).then(|| self.hits as f64 / self.hashed as f64),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Pages per modelled batch (the push's).
    const PAGES: u64 = 16;

    /// A stretch of memory and the machine it is pushed on, per byte.
    #[derive(Clone, Copy, Debug)]
    struct Region {
        /// Link, ns per wire byte.
        link: f64,
        /// Share of non-zero pages that shrink under lz4.
        shrinks: f64,
        /// What they shrink to.
        ratio: f64,
        /// lz4 ns per byte on pages that shrink and on pages that do not.
        cpu_c: f64,
        cpu_i: f64,
        /// Share of hashed pages that repeat one already sent.
        hits: f64,
        /// Hash ns per byte.
        hash: f64,
        /// The source's CPU per wire byte besides encoding (the QUIC stack).
        send: f64,
    }

    /// A WAN at 200 Mbit/s with the real guest's costs (docs/encoding.md).
    const WAN: Region = Region {
        link: 40.0,
        shrinks: 1.0,
        ratio: 0.3,
        cpu_c: 1.4,
        cpu_i: 0.34,
        hits: 0.0,
        hash: 0.12,
        send: 2.0,
    };

    #[derive(Default)]
    struct Totals {
        batches: u64,
        lz4_full: u64,
        tried: u64,
        hashed: u64,
        dedup_full: u64,
    }

    /// Pushes `batches` modelled batches of `r` through `t`.
    fn run(t: &mut Tuner, r: Region, batches: u64) -> Totals {
        let mut out = Totals::default();
        for _ in 0..batches {
            let c = t.choose();
            out.batches += 1;
            out.lz4_full += u64::from(c.lz4_rate >= 1.0);
            out.dedup_full += u64::from(c.dedup_rate >= 1.0);
            let b = model(r, c);
            out.tried += b.lz4_in / PAGE_SIZE as u64;
            out.hashed += b.hashed;
            t.observe(&b);
        }
        out
    }

    /// What a batch of `r` measures when encoded as `c` (expected values, rounded).
    fn model(r: Region, c: Choice) -> BatchSample {
        let page = PAGE_SIZE as f64;
        let hashed = (PAGES as f64 * c.dedup_rate).ceil() as u64;
        let hits = (hashed as f64 * r.hits).round() as u64;
        let left = PAGES - hits;
        let tried = (left as f64 * c.lz4_rate).ceil() as u64;
        let shrunk = (tried as f64 * r.shrinks).round() as u64;
        let shrunk_out = (shrunk as f64 * page * r.ratio) as u64;
        let shrunk_ns = (shrunk as f64 * page * r.cpu_c) as u64;
        let other_ns = ((tried - shrunk) as f64 * page * r.cpu_i) as u64;
        let wire = shrunk_out + (left - shrunk) * PAGE_SIZE as u64 + hits * 25;
        BatchSample {
            wire_bytes: wire,
            link_bytes: wire,
            write_ns: (wire as f64 * r.link) as u64,
            send_cpu_ns: (wire as f64 * r.send) as u64,
            lz4_in: tried * PAGE_SIZE as u64,
            lz4_out: shrunk_out + (tried - shrunk) * PAGE_SIZE as u64,
            lz4_ns: shrunk_ns + other_ns,
            lz4_shrunk: shrunk,
            lz4_shrunk_out: shrunk_out,
            lz4_shrunk_ns: shrunk_ns,
            hashed,
            hits,
            hash_ns: (hashed as f64 * page * r.hash) as u64,
        }
    }

    #[test]
    fn a_slow_link_compresses() {
        let mut t = Tuner::new(EncodingPolicy::AUTO);
        let n = run(&mut t, WAN, 200);
        assert_eq!(n.lz4_full, 200);
        // CPU-bound at 1 Gbit/s, the push measures less than the link's 8 ns per byte.
        let mut t = Tuner::new(EncodingPolicy::AUTO);
        let n = run(&mut t, Region { link: 6.0, ..WAN }, 200);
        assert_eq!(n.lz4_full, 200);
    }

    #[test]
    fn a_push_slower_than_the_link_compresses_if_sending_costs_more_cpu() {
        // The push hardly waits for the link, but each wire byte costs 5 ns of the
        // source's CPU to send (QUIC): fewer bytes are worth lz4's 1.4 ns per byte.
        let mut t = Tuner::new(EncodingPolicy::AUTO);
        let cpu_bound = Region {
            link: 0.1,
            send: 5.0,
            hits: 0.3,
            ..WAN
        };
        let n = run(&mut t, cpu_bound, 200);
        assert_eq!(n.lz4_full, 200);
        assert_eq!(t.choose().dedup_rate, 1.0);
    }

    /// A push whose link's rate is not measured yet learns nothing of the link: lz4 stays
    /// on however short the writes' waits, where the same waits measured as the link's
    /// cost turn it off.
    #[test]
    fn an_unmeasured_link_keeps_lz4_on() {
        let free = Region {
            link: 0.0,
            send: 0.1,
            ..WAN
        };
        let mut t = Tuner::new(EncodingPolicy::AUTO);
        for _ in 0..64 {
            let c = t.choose();
            assert_eq!(c.lz4_rate, 1.0, "after {} batches", t.batches);
            let mut b = model(free, c);
            b.link_bytes = 0;
            t.observe(&b);
        }
        let mut t = Tuner::new(EncodingPolicy::AUTO);
        let n = run(&mut t, free, 64);
        assert!(n.lz4_full <= 1 + 64 / PROBE_EVERY, "{} batches", n.lz4_full);
    }

    #[test]
    fn a_fast_link_sends_raw() {
        // Loopback: 0.6 ns per byte and cheap sending; lz4 costs more CPU than the bytes
        // it saves.
        let mut t = Tuner::new(EncodingPolicy::AUTO);
        let n = run(
            &mut t,
            Region {
                link: 0.6,
                send: 0.5,
                ..WAN
            },
            200,
        );
        // The first window, then probes only.
        assert!(
            n.lz4_full <= 1 + 200 / PROBE_EVERY,
            "{} batches",
            n.lz4_full
        );
        assert!(t.choose().lz4_rate == 0.0 || t.batches.is_multiple_of(PROBE_EVERY));
    }

    #[test]
    fn a_stretch_of_incompressible_pages_is_tried_at_the_sample_rate() {
        let mut t = Tuner::new(EncodingPolicy::AUTO);
        run(
            &mut t,
            Region {
                shrinks: 0.8,
                ..WAN
            },
            100,
        );
        let random = run(
            &mut t,
            Region {
                shrinks: 0.0,
                ..WAN
            },
            400,
        );
        // A few batches while the share of shrinking pages decays, then one in 16.
        assert!(
            random.tried < 10 * PAGES + 400 * PAGES / 8,
            "{} of {} pages tried",
            random.tried,
            400 * PAGES
        );
        // Compressible memory after it is compressed at once: one batch to notice.
        let text = run(&mut t, WAN, 100);
        assert!(
            text.lz4_full >= 98,
            "lz4 on every page in {} of 100",
            text.lz4_full
        );
    }

    #[test]
    fn memory_that_never_shrinks_is_sampled() {
        let mut t = Tuner::new(EncodingPolicy::AUTO);
        let n = run(
            &mut t,
            Region {
                shrinks: 0.0,
                ..WAN
            },
            400,
        );
        assert!(n.tried < 400 * PAGES / 8, "{} pages tried", n.tried);
    }

    #[test]
    fn fixed_policies_are_obeyed() {
        for (policy, rate) in [(EncodingPolicy::OFF, 0.0), (EncodingPolicy::ALL, 1.0)] {
            let mut t = Tuner::new(policy);
            for r in [
                WAN,
                Region {
                    link: 0.1,
                    shrinks: 0.0,
                    ..WAN
                },
            ] {
                for _ in 0..100 {
                    let c = t.choose();
                    assert_eq!((c.lz4_rate, c.dedup_rate), (rate, rate));
                    t.observe(&model(r, c));
                }
            }
        }
    }

    #[test]
    fn the_index_stays_complete_through_a_stretch_without_repeats() {
        let mut t = Tuner::new(EncodingPolicy::AUTO);
        let copies = run(&mut t, Region { hits: 0.5, ..WAN }, 100);
        let unique = run(&mut t, WAN, 500);
        assert_eq!(copies.dedup_full + unique.dedup_full, 600);
        // Likewise at 1 Gbit/s, CPU-bound.
        let mut t = Tuner::new(EncodingPolicy::AUTO);
        run(
            &mut t,
            Region {
                hits: 0.5,
                link: 6.0,
                ..WAN
            },
            100,
        );
        let unique = run(&mut t, Region { link: 6.0, ..WAN }, 500);
        assert_eq!(unique.dedup_full, 500);
    }

    #[test]
    fn a_fast_link_hashes_only_when_repeats_pay() {
        let fast = Region {
            link: 0.6,
            send: 0.5,
            hash: 0.3,
            ..WAN
        };
        let mut t = Tuner::new(EncodingPolicy::AUTO);
        run(&mut t, fast, 200);
        assert_eq!(t.choose().dedup_rate, SAMPLE_RATE);
        let mut t = Tuner::new(EncodingPolicy::AUTO);
        run(&mut t, Region { hits: 0.5, ..fast }, 200);
        assert_eq!(t.choose().dedup_rate, 1.0);
    }

    fn region() -> impl Strategy<Value = Region> {
        (
            0.05f64..100.0,
            prop_oneof![Just(0.0), Just(1.0), 0.0f64..1.0],
            0.05f64..1.0,
            0.1f64..5.0,
            0.05f64..1.0,
            0.0f64..1.0,
            0.05f64..1.0,
            0.0f64..10.0,
        )
            .prop_map(
                |(link, shrinks, ratio, cpu_c, cpu_i, hits, hash, send)| Region {
                    link,
                    shrinks,
                    ratio,
                    cpu_c,
                    cpu_i,
                    hits,
                    hash,
                    send,
                },
            )
    }

    fn policy() -> impl Strategy<Value = EncodingPolicy> {
        let mode = || prop_oneof![Just(Mode::Off), Just(Mode::On), Just(Mode::Auto)];
        (mode(), mode()).prop_map(|(lz4, dedup)| EncodingPolicy { lz4, dedup })
    }

    proptest! {
        /// Whatever it measures, the tuner picks one of its rates and obeys fixed modes.
        #[test]
        fn choices_are_rates_and_fixed_modes_hold(
            policy in policy(),
            regions in prop::collection::vec((region(), 1u64..40), 1..12),
        ) {
            let mut t = Tuner::new(policy);
            for (r, n) in regions {
                for _ in 0..n {
                    let c = t.choose();
                    for (mode, rate) in [(policy.lz4, c.lz4_rate), (policy.dedup, c.dedup_rate)] {
                        match mode {
                            Mode::Off => prop_assert_eq!(rate, 0.0),
                            Mode::On => prop_assert_eq!(rate, 1.0),
                            Mode::Auto => prop_assert!([0.0, SAMPLE_RATE, 1.0].contains(&rate)),
                        }
                    }
                    t.observe(&model(r, c));
                }
            }
            let (link, cpu, ratio, hits) = t.estimates();
            for x in [link, cpu, ratio, hits].into_iter().flatten() {
                prop_assert!(x.is_finite() && x >= 0.0);
            }
        }

        /// Where compressing pays several times over (a WAN), a batch in which at least
        /// half the pages tried shrank (one page, in a sampled batch) is followed by one
        /// that tries every page, whatever came before.
        #[test]
        fn on_a_wan_compressible_pages_are_compressed_at_once(
            shares in prop::collection::vec(prop_oneof![Just(0.0), Just(1.0), 0.0f64..1.0], 1..300),
            link in 8.0f64..100.0,
        ) {
            let mut t = Tuner::new(EncodingPolicy::AUTO);
            let mut shrank = false;
            for shrinks in shares {
                let c = t.choose();
                if shrank {
                    prop_assert_eq!(c.lz4_rate, 1.0);
                }
                let b = model(Region { link, shrinks, ..WAN }, c);
                shrank = b.lz4_in > 0 && 2 * b.lz4_shrunk * PAGE_SIZE as u64 >= b.lz4_in;
                t.observe(&b);
            }
        }
    }
}
