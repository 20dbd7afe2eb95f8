//! How pages travel: zero pages as flags, lz4 blocks, and references to content the
//! destination already holds (deduplication by xxh3-128), with the choice tuned while the
//! migration runs.
//!
//! - [`PageEncoder`] (source) turns runs of guest memory into `Pages` messages, keeps the
//!   content index that references point into, and counts wire bytes by kind.
//! - [`PageDecoder`] (destination) turns them back into raw and zero pages, verifying each
//!   reference against the content it points at; what cannot be verified is asked for again.
//! - [`Tuner`] decides, from measured link and CPU costs, whether compression pays and at
//!   what rate pages are hashed for deduplication. It is pure and tested with synthetic
//!   measurements.
//!
//! A reference names a page `p` the destination holds and the hash of its content. The
//! source only names pages whose content it knows the destination has: pages it pushed
//! earlier on the same (ordered) bulk stream in this session, or pages the standby's replica
//! holds fresh. The guest may have changed `p` since, so the destination hashes what it
//! reads and falls back to a demand request on a mismatch: a reference can cost a round
//! trip, never correctness.

mod decoder;
mod encoder;
mod estimate;
mod tuner;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_128;

pub use decoder::{DecodeError, Decoded, PageDecoder};
pub use encoder::PageEncoder;
pub use estimate::WireSample;
pub use tuner::{BatchSample, Choice, Tuner};

/// Whether an encoding is used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Never used.
    Off,
    /// Always used once negotiated, without measuring.
    On,
    /// Measured while migrating: on when it makes the transfer faster.
    #[default]
    Auto,
}

/// The source's encoding policy; the destination always decodes everything.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncodingPolicy {
    /// lz4 compression of pushed pages.
    pub lz4: Mode,
    /// References to content the destination already holds.
    pub dedup: Mode,
}

impl EncodingPolicy {
    /// Zero pages as flags only.
    pub const OFF: EncodingPolicy = EncodingPolicy {
        lz4: Mode::Off,
        dedup: Mode::Off,
    };
    /// Both on, without tuning.
    pub const ALL: EncodingPolicy = EncodingPolicy {
        lz4: Mode::On,
        dedup: Mode::On,
    };
    /// Both tuned while migrating (the default).
    pub const AUTO: EncodingPolicy = EncodingPolicy {
        lz4: Mode::Auto,
        dedup: Mode::Auto,
    };

    /// The policy for the pages pushed before the destination answers the `Hello` (the
    /// early push, protocol version 6): lz4 wherever this policy allows it, as every
    /// destination decodes lz4 once the `Hello` offered it; no references, as nothing says
    /// yet what the destination holds.
    pub fn before_answer(&self) -> EncodingPolicy {
        EncodingPolicy {
            lz4: match self.lz4 {
                Mode::Off => Mode::Off,
                Mode::On | Mode::Auto => Mode::On,
            },
            dedup: Mode::Off,
        }
    }

    /// The feature bits to announce.
    pub fn features(&self) -> u64 {
        let mut f = 0;
        if self.lz4 != Mode::Off {
            f |= crate::message::FEATURE_LZ4;
        }
        if self.dedup != Mode::Off {
            f |= crate::message::FEATURE_DEDUP;
        }
        f
    }
}

/// Wire bytes by kind, and what was chosen.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EncodingStats {
    /// Pages sent raw.
    pub raw_pages: u64,
    /// Their wire bytes, kind bytes included (4097 per page).
    pub raw_bytes: u64,
    /// All-zero pages, sent as a kind byte alone.
    pub zero_pages: u64,
    /// Zero pages cost their one-byte kind.
    pub zero_bytes: u64,
    /// Pages sent lz4-compressed.
    pub lz4_pages: u64,
    /// Compressed bytes on the wire (with their length prefixes and kinds).
    pub lz4_bytes: u64,
    /// Page bytes those compressed pages stand for.
    pub lz4_input_bytes: u64,
    /// Pages sent as references to content the destination holds.
    pub ref_pages: u64,
    /// Their wire bytes: 25 per page (the kind byte, a page number and a hash).
    pub ref_bytes: u64,
    /// Of `ref_pages`, references to pages the standby's replica held (see
    /// [`ReplicaIndex`]) rather than to pages pushed earlier in this session.
    #[serde(default)]
    pub ref_replica_pages: u64,
    /// Pages hashed for deduplication (the rest were skipped by the partial rate).
    pub pages_hashed: u64,
    /// Wire bytes over page bytes, for the pages these stats cover (zero pages included).
    pub compression_ratio: f64,
    /// The encoding used for most pushed bytes: `raw`, `lz4`, `raw+dedup`, `lz4+dedup`.
    pub chosen: String,
    /// Push batches encoded (urgent replies are not batches).
    pub batches: u64,
    /// Of those, batches that tried lz4 on every page (rather than on a sample, or none).
    pub batches_lz4: u64,
    /// Of those, batches that hashed pages for deduplication, at any rate.
    pub batches_dedup: u64,
    /// The tuner's last estimate of the link's cost, ns per wire byte (`None` until
    /// measured); it and the estimates below are for the report.
    pub link_ns_per_byte: Option<f64>,
    /// The tuner's estimate of the source's CPU time per wire byte besides encoding (the
    /// QUIC stack sending); a wire byte costs at least this when the CPU sets the pace.
    #[serde(default)]
    pub send_cpu_ns_per_byte: Option<f64>,
    /// The tuner's estimate of lz4's CPU cost, ns per input byte.
    pub lz4_ns_per_byte: Option<f64>,
    /// The tuner's estimate of lz4's output bytes over input bytes.
    pub lz4_ratio: Option<f64>,
    /// The tuner's estimate of the share of hashed pages found in the content index.
    pub dedup_hit_rate: Option<f64>,
}

impl EncodingStats {
    /// All wire bytes these stats count (payloads plus one kind byte per page).
    pub fn wire_bytes(&self) -> u64 {
        self.raw_bytes + self.zero_bytes + self.lz4_bytes + self.ref_bytes
    }

    /// Pages these stats count, of all kinds.
    pub fn pages(&self) -> u64 {
        self.raw_pages + self.zero_pages + self.lz4_pages + self.ref_pages
    }

    /// Adds `other`'s page and byte counts (for example urgent replies to the push) and
    /// recomputes the ratio and the choice; `other`'s batch counts and estimates are not
    /// added, as they describe the push alone.
    pub fn merge(&mut self, other: &EncodingStats) {
        self.raw_pages += other.raw_pages;
        self.raw_bytes += other.raw_bytes;
        self.zero_pages += other.zero_pages;
        self.zero_bytes += other.zero_bytes;
        self.lz4_pages += other.lz4_pages;
        self.lz4_bytes += other.lz4_bytes;
        self.lz4_input_bytes += other.lz4_input_bytes;
        self.ref_pages += other.ref_pages;
        self.ref_bytes += other.ref_bytes;
        self.ref_replica_pages += other.ref_replica_pages;
        self.pages_hashed += other.pages_hashed;
        self.finish();
    }

    fn finish(&mut self) {
        let input = self.pages() * crate::PAGE_SIZE as u64;
        self.compression_ratio = if input == 0 {
            1.0
        } else {
            self.wire_bytes() as f64 / input as f64
        };
        let lz4 = self.batches_lz4 * 2 > self.batches;
        let dedup = self.batches_dedup * 2 > self.batches;
        self.chosen = match (lz4, dedup) {
            (false, false) => "raw",
            (true, false) => "lz4",
            (false, true) => "raw+dedup",
            (true, true) => "lz4+dedup",
        }
        .into();
    }
}

/// What the standby's replica holds at evacuation, by content: xxh3-128 of a fresh,
/// non-zero page → that page. Filled once (by the source, from its own memory, while the
/// evacuation starts) and read by the push's encoder from then on; until it is set, only
/// pages pushed earlier in the session are referenced.
pub type ReplicaIndex = std::sync::Arc<std::sync::OnceLock<std::collections::HashMap<u128, u64>>>;

/// CPU time of `clock` (`ClockId::CLOCK_PROCESS_CPUTIME_ID` or
/// `ClockId::CLOCK_THREAD_CPUTIME_ID`), ns; 0 if it cannot be read.
pub(crate) fn cpu_ns(clock: nix::time::ClockId) -> u64 {
    match nix::time::clock_gettime(clock) {
        Ok(ts) => (ts.tv_sec().max(0) as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(ts.tv_nsec().max(0) as u64),
        Err(_) => 0,
    }
}

/// `page` as an lz4 block in `scratch` (at least lz4's bound for a page): its length, if
/// the block with its 2-byte length is smaller than the page (otherwise the page goes raw).
pub(crate) fn lz4_page(page: &[u8], scratch: &mut [u8]) -> Option<usize> {
    match lz4_flex::block::compress_into(page, scratch) {
        Ok(len) if len > 0 && len + 2 < crate::message::PAGE_SIZE => Some(len),
        _ => None,
    }
}

/// The content hash that references carry.
pub fn page_hash(page: &[u8]) -> u128 {
    xxh3_128(page)
}
