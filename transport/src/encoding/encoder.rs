//! The source side: encode runs of pages for the wire and count what it cost.

use std::collections::HashMap;
use std::time::Instant;

use bytes::Bytes;

use super::tuner::{BatchSample, Choice, Tuner};
use super::{cpu_ns, lz4_page, page_hash, EncodingPolicy, EncodingStats, Mode, ReplicaIndex};
use crate::message::{
    is_zero, PageKind, Pages, FEATURE_DEDUP, FEATURE_LZ4, FEATURE_ZERO_RUNS, PAGE_SIZE, REF_LEN,
};

/// Encodes pages for one session. Push batches use the tuned encoding and may reference
/// content pushed earlier; urgent replies are never references (they travel on their own
/// stream, so nothing orders them against the pages they would point at).
pub struct PageEncoder {
    lz4_allowed: bool,
    dedup_allowed: bool,
    zero_runs: bool,
    /// Hashes every non-zero page into `held` without ever writing a reference: the early
    /// push's encoder, whose index the push after it takes over
    /// ([`PageEncoder::before_answer`]).
    index_only: bool,
    tuner: Tuner,
    /// Content hash → a page the destination holds (or will, in stream order) with it.
    held: HashMap<u128, u64>,
    /// What the standby's replica held at evacuation, once known.
    replica: Option<ReplicaIndex>,
    stats: EncodingStats,
    scratch: Vec<u8>,
    /// What the batch being built measured, until [`PageEncoder::observe_write`].
    pending: BatchSample,
}

impl PageEncoder {
    /// An encoder for `policy`, limited to what the destination accepted (`features`).
    pub fn new(policy: EncodingPolicy, features: u64) -> PageEncoder {
        PageEncoder {
            lz4_allowed: features & FEATURE_LZ4 != 0,
            dedup_allowed: features & FEATURE_DEDUP != 0,
            zero_runs: features & FEATURE_ZERO_RUNS != 0,
            index_only: false,
            tuner: Tuner::new(policy),
            held: HashMap::new(),
            replica: None,
            stats: EncodingStats::default(),
            scratch: vec![0; lz4_flex::block::get_maximum_output_size(PAGE_SIZE)],
            pending: BatchSample::default(),
        }
    }

    /// The encoder for the pages pushed before the destination answers, for a session whose
    /// `Hello` offered `offered` under `policy`: lz4 as the policy allows it and the `Hello`
    /// offered it ([`EncodingPolicy::before_answer`]), never references, no long zero runs.
    /// Where the `Hello` offers references it still indexes every page it sends, so that
    /// the push after the answer may name them ([`PageEncoder::take_index`]).
    pub fn before_answer(policy: EncodingPolicy, offered: u64) -> PageEncoder {
        let mut e = PageEncoder::new(policy.before_answer(), offered & FEATURE_LZ4);
        e.index_only = policy.dedup != Mode::Off && offered & FEATURE_DEDUP != 0;
        e
    }

    /// The content index built so far, emptied: what [`PageEncoder::adopt_index`] of the
    /// encoder whose frames follow on the same stream may reference.
    pub fn take_index(&mut self) -> HashMap<u128, u64> {
        std::mem::take(&mut self.held)
    }

    /// Takes over the content `index` of pages sent earlier on this encoder's stream (the
    /// early push's), if references are allowed; pages already indexed here keep theirs.
    pub fn adopt_index(&mut self, index: HashMap<u128, u64>) {
        if !self.dedup_allowed {
            return;
        }
        for (h, n) in index {
            self.held.entry(h).or_insert(n);
        }
    }

    /// References may also name pages of the standby's replica, once `index` is set. The
    /// caller vouches that each page in it holds that content at the destination (fresh in
    /// the replica); the destination still verifies every reference it resolves.
    pub fn with_replica_index(mut self, index: ReplicaIndex) -> PageEncoder {
        if self.dedup_allowed {
            self.replica = Some(index);
        }
        self
    }

    /// Whether the tuner decides anything (an `Auto` mode the destination allows): only then
    /// are the push's CPU and time measurements used.
    pub fn tunes(&self) -> bool {
        let p = self.tuner.policy();
        (p.lz4 == Mode::Auto && self.lz4_allowed) || (p.dedup == Mode::Auto && self.dedup_allowed)
    }

    /// Whether the destination takes zero runs longer than one `Pages` message
    /// ([`FEATURE_ZERO_RUNS`]).
    pub fn zero_runs(&self) -> bool {
        self.zero_runs
    }

    /// `count` zero pages from `first`, known to be zero without reading them, as one run
    /// (at most [`crate::message::MAX_ZERO_RUN`] pages; `None` otherwise), counted like
    /// zero pages [`PageEncoder::encode_push`] finds.
    pub fn encode_zeros(&mut self, first: u64, count: usize) -> Option<Pages> {
        let p = Pages::zeros(first, count)?;
        self.stats.zero_pages += count as u64;
        self.stats.zero_bytes += count as u64;
        Some(p)
    }

    /// A replica index was given and is not filled yet.
    pub fn replica_index_pending(&self) -> bool {
        self.replica.as_ref().is_some_and(|r| r.get().is_none())
    }

    /// Encodes whole pages `data` starting at page `first` for the push, with the tuned
    /// choice; call [`PageEncoder::observe_write`] once they are written.
    pub fn encode_push(&mut self, first: u64, data: &[u8]) -> Pages {
        let c = self.tuner.choose();
        let choice = Choice {
            lz4_rate: if self.lz4_allowed { c.lz4_rate } else { 0.0 },
            dedup_rate: if self.dedup_allowed {
                c.dedup_rate
            } else {
                0.0
            },
        };
        self.stats.batches += 1;
        self.stats.batches_lz4 += u64::from(choice.lz4_rate >= 1.0);
        self.stats.batches_dedup += u64::from(choice.dedup_rate > 0.0);
        // Compression and hashing are timed per page on the wall clock, which also counts
        // the time the thread was descheduled (on a busy machine, often): scale what this
        // call measured by its CPU time over its wall time.
        // Only a tuned batch that compressed or hashed has timings to correct (two system
        // calls a batch otherwise spent for nothing).
        if !self.tunes() || (choice.lz4_rate <= 0.0 && choice.dedup_rate <= 0.0) {
            return self.encode(first, data, choice, true);
        }
        let before = self.pending;
        let wall = Instant::now();
        let cpu = cpu_ns(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID);
        let pages = self.encode(first, data, choice, true);
        let wall = wall.elapsed().as_nanos() as u64;
        let cpu = cpu_ns(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).saturating_sub(cpu);
        if cpu > 0 && cpu < wall {
            let scale = |now: &mut u64, then: u64| {
                *now = then + ((*now - then) as u128 * cpu as u128 / wall as u128) as u64;
            };
            let p = &mut self.pending;
            scale(&mut p.lz4_ns, before.lz4_ns);
            scale(&mut p.lz4_shrunk_ns, before.lz4_shrunk_ns);
            scale(&mut p.hash_ns, before.hash_ns);
        }
        pages
    }

    /// Encodes pages for an urgent reply: zero flags, otherwise raw (lowest latency).
    pub fn encode_reply(&mut self, first: u64, data: &[u8]) -> Pages {
        let choice = Choice {
            lz4_rate: 0.0,
            dedup_rate: 0.0,
        };
        self.encode(first, data, choice, false)
    }

    /// The link took `write_ns` to carry the last batch's bytes (`None` where that could not
    /// be measured: see [`BatchSample::link_bytes`]), and the process spent `send_cpu_ns` of
    /// CPU besides building the batch since the one before (see
    /// [`BatchSample::send_cpu_ns`]).
    pub fn observe_write(&mut self, wire_bytes: u64, write_ns: Option<u64>, send_cpu_ns: u64) {
        let mut s = std::mem::take(&mut self.pending);
        s.wire_bytes = wire_bytes;
        s.link_bytes = if write_ns.is_some() { wire_bytes } else { 0 };
        s.write_ns = write_ns.unwrap_or(0);
        s.send_cpu_ns = send_cpu_ns;
        self.tuner.observe(&s);
    }

    /// What was sent so far, by kind, with the tuner's estimates.
    pub fn stats(&self) -> EncodingStats {
        let mut s = self.stats.clone();
        let (link, lz4, ratio, hits) = self.tuner.estimates();
        s.link_ns_per_byte = link;
        s.send_cpu_ns_per_byte = self.tuner.send_cpu_estimate();
        s.lz4_ns_per_byte = lz4;
        s.lz4_ratio = ratio;
        s.dedup_hit_rate = hits;
        s.merge(&EncodingStats::default());
        s
    }

    fn encode(&mut self, first: u64, data: &[u8], choice: Choice, index: bool) -> Pages {
        debug_assert_eq!(data.len() % PAGE_SIZE, 0);
        let count = data.len() / PAGE_SIZE;
        let mut kinds = Vec::with_capacity(count);
        let mut payload = Vec::with_capacity(data.len());
        let threshold = rate_threshold(choice.dedup_rate);
        let lz4_threshold = rate_threshold(choice.lz4_rate);
        // Pages of this batch join the index after it: the destination decodes a whole
        // message before it installs any of it, so a reference must point further back.
        let mut new_held = Vec::new();
        for (i, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
            let n = first + i as u64;
            if is_zero(page) {
                kinds.push(PageKind::Zero as u8);
                self.stats.zero_pages += 1;
                self.stats.zero_bytes += 1;
                continue;
            }
            if self.index_only || (choice.dedup_rate > 0.0 && sampled(n, threshold)) {
                let t = Instant::now();
                let h = page_hash(page);
                let held = if self.index_only {
                    None
                } else {
                    self.held.get(&h).copied().map(|p| (p, false)).or_else(|| {
                        let replica = self.replica.as_ref()?.get()?;
                        replica.get(&h).map(|&p| (p, true))
                    })
                };
                self.pending.hash_ns += t.elapsed().as_nanos() as u64;
                self.pending.hashed += 1;
                self.stats.pages_hashed += 1;
                match held {
                    Some((p, from_replica)) if p != n => {
                        self.pending.hits += 1;
                        self.stats.ref_replica_pages += u64::from(from_replica);
                        kinds.push(PageKind::Ref as u8);
                        payload.extend_from_slice(&p.to_le_bytes());
                        payload.extend_from_slice(&h.to_le_bytes());
                        self.stats.ref_pages += 1;
                        self.stats.ref_bytes += 1 + REF_LEN as u64;
                        continue;
                    }
                    Some(_) => {}
                    None if index => new_held.push((h, n)),
                    None => {}
                }
            }
            // A different subset from the hashed one (the page number salted).
            if choice.lz4_rate > 0.0 && sampled(n ^ LZ4_SALT, lz4_threshold) {
                let t = Instant::now();
                let out = lz4_page(page, &mut self.scratch);
                let lz4_ns = t.elapsed().as_nanos() as u64;
                self.pending.lz4_ns += lz4_ns;
                self.pending.lz4_in += PAGE_SIZE as u64;
                match out {
                    Some(len) => {
                        self.pending.lz4_out += (len + 2) as u64;
                        self.pending.lz4_shrunk += 1;
                        self.pending.lz4_shrunk_out += (len + 2) as u64;
                        self.pending.lz4_shrunk_ns += lz4_ns;
                        kinds.push(PageKind::Lz4 as u8);
                        payload.extend_from_slice(&(len as u16).to_le_bytes());
                        payload.extend_from_slice(&self.scratch[..len]);
                        self.stats.lz4_pages += 1;
                        self.stats.lz4_bytes += 3 + len as u64;
                        self.stats.lz4_input_bytes += PAGE_SIZE as u64;
                        continue;
                    }
                    None => self.pending.lz4_out += PAGE_SIZE as u64,
                }
            }
            kinds.push(PageKind::Raw as u8);
            payload.extend_from_slice(page);
            self.stats.raw_pages += 1;
            self.stats.raw_bytes += 1 + PAGE_SIZE as u64;
        }
        for (h, n) in new_held {
            self.held.entry(h).or_insert(n);
        }
        Pages {
            first,
            kinds: Bytes::from(kinds),
            payload: Bytes::from(payload),
        }
    }
}

/// Salt for the pages tried with lz4 at a partial rate.
const LZ4_SALT: u64 = 0x5bd1_e995_2f6c_1a4b;

/// The [`sampled`] threshold for a rate from 0 to 1.
fn rate_threshold(rate: f64) -> u64 {
    if rate >= 1.0 {
        u64::MAX
    } else {
        (rate * u64::MAX as f64) as u64
    }
}

/// Whether page `n` is among those hashed at this rate: a fixed pseudo-random subset, so
/// that the same pages are looked up and indexed.
fn sampled(n: u64, threshold: u64) -> bool {
    if threshold == u64::MAX {
        return true;
    }
    // splitmix64 finaliser: spreads consecutive page numbers over the whole range.
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) <= threshold
}
