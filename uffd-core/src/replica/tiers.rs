//! The two tiers: tmpfs (can become guest memory) and disk (read back page by page).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::ReplicaError;
use super::files::{punch_hole, DirLock, Mapping, OpenReport, ReplicaFiles, MEMORY_FILE};
use super::{ReplicaStore, Tier};
use crate::layout::{HostRegion, MappedMemory};
use crate::PAGE_SIZE;

/// Where [`MemoryTier::open_default`] keeps replicas: one directory per VM.
pub const DEFAULT_MEMORY_BASE: &str = "/dev/shm/faultline";

macro_rules! delegate_store {
    ($ty:ty) => {
        impl ReplicaStore for $ty {
            fn total_pages(&self) -> u64 {
                self.inner.total_pages
            }
            fn epoch(&self) -> u64 {
                self.inner.epoch()
            }
            fn set_epoch(&self, epoch: u64) -> Result<(), ReplicaError> {
                self.inner.set_epoch(epoch)
            }
            fn store(&self, first: u64, versions: &[u64], data: &[u8]) -> Result<(), ReplicaError> {
                self.inner.store(first, versions, data)
            }
            fn version(&self, page: u64) -> u64 {
                self.inner.version(page)
            }
            fn read(&self, page: u64, out: &mut [u8]) -> Result<Option<u64>, ReplicaError> {
                self.inner.read(page, out)
            }
            fn sync(&self) -> Result<(), ReplicaError> {
                self.inner.sync()
            }
            fn tier(&self) -> Tier {
                self.inner.tier
            }
            fn torn_pages(&self) -> u64 {
                self.inner.torn_pages()
            }
        }

        impl $ty {
            /// The replica directory.
            pub fn dir(&self) -> &Path {
                &self.inner.dir
            }

            /// The image file (`memory.img`): the replicated content, page `p` at byte
            /// `p * 4096`. A disk replica's image is the disk itself at evacuation.
            pub fn image_path(&self) -> std::path::PathBuf {
                self.inner.mem_path()
            }

            /// What opening found: created, re-initialised, verified and torn pages.
            pub fn open_report(&self) -> &OpenReport {
                self.inner.report()
            }
        }
    };
}

/// Replica on tmpfs: survives a restart of the standby daemon (not of the machine),
/// and at switchover its file becomes the guest memory without a copy.
#[derive(Debug)]
pub struct MemoryTier {
    inner: ReplicaFiles,
}

/// Replica on a disk filesystem: survives a machine crash for everything acknowledged
/// after [`ReplicaStore::sync`]; at evacuation pages are read back with
/// [`ReplicaStore::read`].
#[derive(Debug)]
pub struct DiskTier {
    inner: ReplicaFiles,
}

delegate_store!(MemoryTier);
delegate_store!(DiskTier);

impl MemoryTier {
    /// `/dev/shm/faultline/<vm_id>`; `vm_id` must be a plain directory name.
    pub fn default_dir(vm_id: &str) -> Result<PathBuf, ReplicaError> {
        if vm_id.is_empty()
            || vm_id == "."
            || vm_id == ".."
            || vm_id.contains('/')
            || vm_id.contains('\0')
        {
            return Err(ReplicaError::BadVmId(vm_id.into()));
        }
        Ok(Path::new(DEFAULT_MEMORY_BASE).join(vm_id))
    }

    /// Opens the replica in `dir` (created if missing), which must be on tmpfs, then
    /// verifies every stored page. See [`ReplicaStore`] for what counts as an error
    /// and what re-initialises.
    pub fn open(dir: impl AsRef<Path>, total_pages: u64) -> Result<MemoryTier, ReplicaError> {
        Ok(MemoryTier {
            inner: ReplicaFiles::open(dir.as_ref(), total_pages, Tier::Memory, false)?,
        })
    }

    /// [`MemoryTier::open`] on [`MemoryTier::default_dir`].
    pub fn open_default(vm_id: &str, total_pages: u64) -> Result<MemoryTier, ReplicaError> {
        Self::open(Self::default_dir(vm_id)?, total_pages)
    }

    /// Creates an empty replica in `dir`, discarding whatever was there (e.g. after
    /// [`ReplicaError::NotAReplica`] or [`ReplicaError::PageCountMismatch`]).
    pub fn create(dir: impl AsRef<Path>, total_pages: u64) -> Result<MemoryTier, ReplicaError> {
        Ok(MemoryTier {
            inner: ReplicaFiles::open(dir.as_ref(), total_pages, Tier::Memory, true)?,
        })
    }

    /// Turns the replica into guest memory.
    ///
    /// Every page that is invalid (version 0) or `stale` is punched out of
    /// `memory.img` (one `fallocate` per run of such pages) and its index entry cleared;
    /// then the whole file is mapped shared, read/write. Registered with userfaultfd
    /// (MISSING, shmem), exactly the punched pages fault; the rest is served by the
    /// kernel from the page cache. Returns the mapping and, per page, whether it is
    /// present (see [`super::present_page_table`]).
    ///
    /// The directory stays locked while the mapping lives, so no standby daemon can
    /// store into live guest memory. Reopening the directory as a replica afterwards is
    /// safe: pages the guest changed fail verification and become invalid.
    pub fn into_guest_memory(
        self,
        stale: impl Fn(u64) -> bool,
    ) -> Result<(GuestMapping, Vec<bool>), ReplicaError> {
        let inner = self.inner;
        let total = inner.total_pages;
        let present: Vec<bool> = (0..total)
            .map(|p| inner.version(p) != 0 && !stale(p))
            .collect();
        inner.invalidate_absent(&present);
        let mem_path = inner.dir.join(MEMORY_FILE);
        let mut holes = 0u64;
        let mut p = 0usize;
        while p < present.len() {
            if present[p] {
                p += 1;
                continue;
            }
            let q = present[p..]
                .iter()
                .position(|&here| here)
                .map_or(present.len(), |k| p + k);
            punch_hole(
                &inner.memory,
                (p * PAGE_SIZE) as u64,
                ((q - p) * PAGE_SIZE) as u64,
            )
            .map_err(|e| ReplicaError::io("fallocate(PUNCH_HOLE)", &mem_path, e))?;
            holes += 1;
            p = q;
        }
        let map = Mapping::shared(&inner.memory, inner.mem_len, &mem_path)?;
        let absent = present.iter().filter(|&&h| !h).count() as u64;
        tracing::info!(
            path = %mem_path.display(),
            pages = total,
            absent,
            holes,
            "replica became guest memory"
        );
        let (file, lock) = inner.into_memory_and_lock();
        Ok((
            GuestMapping {
                map: Arc::new(LockedMapping { map, _lock: lock }),
                file,
                holes,
                absent,
            },
            present,
        ))
    }
}

impl DiskTier {
    /// Opens the replica in `dir` (created if missing) and verifies every stored page.
    pub fn open(dir: impl AsRef<Path>, total_pages: u64) -> Result<DiskTier, ReplicaError> {
        Ok(DiskTier {
            inner: ReplicaFiles::open(dir.as_ref(), total_pages, Tier::Disk, false)?,
        })
    }

    /// Creates an empty replica in `dir`, discarding whatever was there.
    pub fn create(dir: impl AsRef<Path>, total_pages: u64) -> Result<DiskTier, ReplicaError> {
        Ok(DiskTier {
            inner: ReplicaFiles::open(dir.as_ref(), total_pages, Tier::Disk, true)?,
        })
    }
}

/// `memory.img` of a [`MemoryTier`] mapped as guest memory; unmapped when this value and
/// every [`HostRegion`] made from it are dropped (the file stays on tmpfs).
#[derive(Debug)]
pub struct GuestMapping {
    map: Arc<LockedMapping>,
    file: File,
    holes: u64,
    absent: u64,
}

/// The mapping with the replica directory's lock: the directory stays locked while the
/// mapping lives, whoever holds it last, so no standby stores into live guest memory.
#[derive(Debug)]
struct LockedMapping {
    map: Mapping,
    _lock: DirLock,
}

// SAFETY: `Mapping::shared` mapped the range, and `Mapping` unmaps it only when dropped,
// with this value; its fields are private to the crate and never changed.
unsafe impl MappedMemory for LockedMapping {
    fn as_ptr(&self) -> *mut u8 {
        self.map.addr() as *mut u8
    }

    fn size(&self) -> usize {
        self.map.len()
    }

    fn is_shared(&self) -> bool {
        true
    }
}

impl GuestMapping {
    /// Start of guest memory. Only a raw pointer: the kernel and vCPU threads write it
    /// concurrently.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.map.size()
    }

    /// Never true (a replica has at least one page); here for API completeness.
    pub fn is_empty(&self) -> bool {
        self.map.size() == 0
    }

    /// The shmem file backing the mapping (e.g. to hand its fd to a VMM).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Region descriptor for [`crate::Destination::register_with_table`] (shmem); it
    /// keeps the mapping, and the directory's lock, alive.
    pub fn host_region(&self) -> HostRegion {
        HostRegion::new(self.map.clone())
    }

    /// `fallocate(PUNCH_HOLE)` calls made: one per run of absent pages.
    pub fn holes_punched(&self) -> u64 {
        self.holes
    }

    /// Pages punched out (stale or invalid); they fault when touched.
    pub fn absent_pages(&self) -> u64 {
        self.absent
    }
}
