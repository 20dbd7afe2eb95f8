//! Write tracking at a source: every write, trim and write-zeroes that passes through
//! faultline's front end marks the blocks it touched, and replication harvests the marks.
//!
//! A block is marked **after** the write completed. The replicator harvests (clears the
//! marks it takes) and only then reads the blocks it sends, so a write that lands after
//! that read finds its mark cleared and sets it again: the next harvest reports it. Marking
//! before the write would lose exactly that write (harvest, read the old data, write, no
//! mark left). The same rule makes the memory replica's stale set exact (see
//! `vmm_shim::replica::Ledger`).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::device::{BlockDevice, DiskError};

/// The granularity of tracking and replication: a power of two from 4 KiB to 1 MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockSize(u32);

impl BlockSize {
    /// 4 KiB: a guest page, and the unit the wire moves.
    pub const DEFAULT: BlockSize = BlockSize(4096);

    /// `bytes` if it is a power of two from 4 KiB to 1 MiB.
    pub fn new(bytes: u32) -> Option<BlockSize> {
        (bytes.is_power_of_two() && (4096..=1 << 20).contains(&bytes)).then_some(BlockSize(bytes))
    }

    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        u64::from(self.0)
    }

    /// The blocks that `len` bytes at `offset` touch, as a half-open range (empty for
    /// `len == 0`).
    pub fn blocks_touched(self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let b = self.bytes();
        offset / b..(offset.saturating_add(len - 1)) / b + 1
    }

    /// Blocks in a disk of `size` bytes (a partial last block counts).
    pub fn blocks_in(self, size: u64) -> u64 {
        size.div_ceil(self.bytes())
    }
}

impl Default for BlockSize {
    fn default() -> BlockSize {
        BlockSize::DEFAULT
    }
}

/// A bitmap of blocks written since the last harvest; marks and harvests may run on
/// different threads at once.
#[derive(Debug)]
pub struct WriteTracker {
    words: Vec<AtomicU64>,
    blocks: u64,
    block_size: BlockSize,
}

impl WriteTracker {
    /// A tracker for a disk of `size` bytes, nothing marked.
    pub fn new(size: u64, block_size: BlockSize) -> WriteTracker {
        let blocks = block_size.blocks_in(size);
        WriteTracker {
            words: (0..blocks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            blocks,
            block_size,
        }
    }

    /// The tracking granularity.
    pub fn block_size(&self) -> BlockSize {
        self.block_size
    }

    /// Blocks tracked.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Marks the blocks `len` bytes at `offset` touched (those past the end are ignored).
    pub fn mark(&self, offset: u64, len: u64) {
        let r = self.block_size.blocks_touched(offset, len);
        let end = r.end.min(self.blocks);
        let mut b = r.start;
        while b < end {
            let word = (b / 64) as usize;
            let first = b % 64;
            let last = (end - word as u64 * 64).min(64);
            let mask = if last - first == 64 {
                u64::MAX
            } else {
                ((1u64 << (last - first)) - 1) << first
            };
            self.words[word].fetch_or(mask, Ordering::Release);
            b = word as u64 * 64 + last;
        }
    }

    /// Takes every mark: the blocks written since the last harvest, ascending.
    pub fn harvest(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, w) in self.words.iter().enumerate() {
            if w.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut bits = w.swap(0, Ordering::Acquire);
            while bits != 0 {
                let t = u64::from(bits.trailing_zeros());
                out.push(i as u64 * 64 + t);
                bits &= bits - 1;
            }
        }
        out
    }

    /// Blocks marked now (a snapshot).
    pub fn marked(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }
}

/// A disk whose writes are tracked: what a source's front end serves.
pub struct Tracked<D> {
    inner: D,
    tracker: std::sync::Arc<WriteTracker>,
}

impl<D: BlockDevice> Tracked<D> {
    /// Tracks writes to `inner` at `block_size`.
    pub fn new(inner: D, block_size: BlockSize) -> Tracked<D> {
        let tracker = std::sync::Arc::new(WriteTracker::new(inner.size(), block_size));
        Tracked { inner, tracker }
    }

    /// The tracker, for replication to harvest.
    pub fn tracker(&self) -> &std::sync::Arc<WriteTracker> {
        &self.tracker
    }

    /// The disk underneath.
    pub fn inner(&self) -> &D {
        &self.inner
    }
}

impl<D: BlockDevice> BlockDevice for Tracked<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_only(&self) -> bool {
        self.inner.read_only()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        self.inner.read_at(buf, offset)
    }

    // Each write marks after it completed, also when it failed part way (a failed
    // pwrite may have changed some bytes).
    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), DiskError> {
        let r = self.inner.write_at(data, offset, fua);
        if !matches!(r, Err(DiskError::OutOfRange { .. } | DiskError::ReadOnly)) {
            self.tracker.mark(offset, data.len() as u64);
        }
        r
    }

    fn flush(&self) -> Result<(), DiskError> {
        self.inner.flush()
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        let r = self.inner.trim(offset, len);
        if !matches!(r, Err(DiskError::OutOfRange { .. } | DiskError::ReadOnly)) {
            self.tracker.mark(offset, len);
        }
        r
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), DiskError> {
        let r = self.inner.write_zeroes(offset, len, fua);
        if !matches!(r, Err(DiskError::OutOfRange { .. } | DiskError::ReadOnly)) {
            self.tracker.mark(offset, len);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn block_sizes_are_powers_of_two_from_4k_to_1m() {
        assert!(BlockSize::new(4096).is_some());
        assert!(BlockSize::new(1 << 20).is_some());
        assert!(BlockSize::new(2048).is_none());
        assert!(BlockSize::new(12288).is_none());
        assert!(BlockSize::new(2 << 20).is_none());
        let b = BlockSize::DEFAULT;
        assert_eq!(b.blocks_touched(4095, 2), 0..2);
        assert_eq!(b.blocks_touched(4096, 4096), 1..2);
        assert_eq!(b.blocks_touched(10, 0), 0..0);
        assert_eq!(b.blocks_in(4097), 2);
    }

    proptest! {
        #[test]
        fn harvest_returns_exactly_the_blocks_touched(
            writes in proptest::collection::vec((0u64..1 << 22, 0u64..300_000), 0..20),
            shift in 12u32..16,
        ) {
            let size = 1u64 << 22;
            let bs = BlockSize::new(1 << shift).unwrap();
            let t = WriteTracker::new(size, bs);
            let mut want = std::collections::BTreeSet::new();
            for &(off, len) in &writes {
                t.mark(off, len);
                for b in bs.blocks_touched(off, len) {
                    if b < t.blocks() {
                        want.insert(b);
                    }
                }
            }
            prop_assert_eq!(t.marked(), want.len() as u64);
            let got = t.harvest();
            prop_assert_eq!(got, want.into_iter().collect::<Vec<_>>());
            prop_assert!(t.harvest().is_empty());
        }
    }
}
