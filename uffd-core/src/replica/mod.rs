//! Standby-side replica of guest memory: page content with the version the source gave
//! it, kept in normal times so that at evacuation only stale pages cross the WAN.
//!
//! Two tiers share one format and one implementation: [`MemoryTier`] (tmpfs; its
//! file becomes the guest memory at switchover, see [`MemoryTier::into_guest_memory`])
//! and [`DiskTier`] (a disk filesystem; pages are read back with
//! [`ReplicaStore::read`]).
//!
//! # Files
//! A replica directory holds `memory.img` (the guest memory image, sparse, exactly
//! `total_pages * 4096` bytes) and `index.bin` (a checksummed header, then a
//! `{version, checksum}` entry per page; layout in the `format` module docs). The
//! index is mmapped shared and updated in place. The directory is `flock`ed while open.
//!
//! # Crash safety
//! [`ReplicaStore::store`] writes the page data (`pwrite`) before the index entries,
//! and every entry's checksum covers the content, page number, version and epoch. So
//! after a crash at any point, each page is at its old version, at its new version, or
//! fails verification on reopen (and is then invalid, version 0, counted in
//! [`ReplicaStore::torn_pages`]) — never valid with the wrong content, short of an
//! xxh3-64 collision. [`ReplicaStore::set_epoch`] clears all entries before it writes
//! the new epoch into the header. On the disk tier the same holds after a machine
//! crash for whatever writeback order the kernel chose; what [`ReplicaStore::sync`]
//! adds is that pages stored before it are still there (unless a later, unsynced store
//! of the same page tore it).
//!
//! # Opening
//! `open(dir, pages)` creates a missing replica. An index that is not ours (too short,
//! wrong magic), of another format version or of another page count is refused with a
//! typed error and left alone ([`MemoryTier::create`] / [`DiskTier::create`] wipe on
//! purpose). An index that is ours but damaged (header checksum fails, e.g. a torn
//! epoch update, or wrong file length) is re-initialised empty with a warning, reported
//! in [`OpenReport::reinitialized`]: losing a replica only costs WAN traffic. Then every
//! entry that claims a version is verified against `memory.img` in parallel.

mod error;
mod files;
mod format;
mod tiers;

pub use error::ReplicaError;
pub use files::OpenReport;
pub use tiers::{DiskTier, GuestMapping, MemoryTier, DEFAULT_MEMORY_BASE};

use crate::page_table::PageTable;

/// Which medium a replica lives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Tier {
    /// tmpfs: survives a daemon restart, not a machine restart.
    Memory,
    /// A disk filesystem: survives a machine crash once synced.
    Disk,
}

/// A standby's store of replicated pages.
///
/// Every page argument is bounds-checked: out of range is
/// [`ReplicaError::PageOutOfRange`] (or version 0 from [`ReplicaStore::version`]).
/// Writers are serialised internally; readers run concurrently with each other.
pub trait ReplicaStore: Send + Sync {
    /// Pages in the replica, fixed at open; valid page indices are `0..total_pages()`.
    fn total_pages(&self) -> u64;

    /// Current replication epoch; 0 until the first [`ReplicaStore::set_epoch`].
    fn epoch(&self) -> u64;

    /// Starts a new epoch: every page becomes invalid (version 0) unless `epoch`
    /// equals the current one, in which case nothing changes.
    fn set_epoch(&self, epoch: u64) -> Result<(), ReplicaError>;

    /// Stores `versions.len()` consecutive pages from `first`; `data` is exactly
    /// `versions.len() * 4096` bytes (all-zero pages included as real zeros). Versions
    /// must be non-zero; an epoch must be set. Any non-zero version is accepted (the
    /// source orders them). On error, pages of this call may have become invalid but
    /// none is valid with wrong content.
    fn store(&self, first: u64, versions: &[u64], data: &[u8]) -> Result<(), ReplicaError>;

    /// Version held for `page`; 0 = nothing valid (also for out-of-range pages).
    fn version(&self, page: u64) -> u64;

    /// Copies `page` into `out` (exactly 4096 bytes) if it is valid and its content
    /// still matches its checksum, returning its version; otherwise `Ok(None)` (and
    /// `out` is zeroed if the content was read but did not match).
    fn read(&self, page: u64, out: &mut [u8]) -> Result<Option<u64>, ReplicaError>;

    /// Makes what `store` wrote survive the medium's failure model: nothing for the
    /// memory tier, `fdatasync(memory.img)` then `msync(index.bin)` for the disk tier.
    /// Acknowledge stores only after this returns.
    fn sync(&self) -> Result<(), ReplicaError>;

    /// The medium this store lives on.
    fn tier(&self) -> Tier;

    /// Pages found torn (content not matching their entry) since open, on open and
    /// on later reads; each was made invalid.
    fn torn_pages(&self) -> u64;

    /// Pages holding a valid version, ascending.
    fn valid_pages(&self) -> Box<dyn Iterator<Item = u64> + '_> {
        Box::new((0..self.total_pages()).filter(move |&p| self.version(p) != 0))
    }

    /// Valid pages that are not `stale`: the ones to serve locally at evacuation.
    fn fresh_pages<'a>(
        &'a self,
        stale: &'a dyn Fn(u64) -> bool,
    ) -> Box<dyn Iterator<Item = u64> + 'a> {
        Box::new(self.valid_pages().filter(move |&p| !stale(p)))
    }
}

/// A page table with `present[p]` pages Present and the rest Absent, for
/// [`crate::Destination::register_with_table`].
pub fn present_page_table(present: &[bool]) -> PageTable {
    let table = PageTable::new(present.len() as u64);
    for (p, _) in present.iter().enumerate().filter(|(_, &here)| here) {
        table.set_present(p as u64);
    }
    table
}
