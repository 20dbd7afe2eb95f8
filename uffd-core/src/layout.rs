//! Host regions of guest memory and the global page index across them.
//!
//! Pages are numbered region after region in the order the regions were given, so the
//! index is stable across hosts as long as both sides list regions in the same order.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::LayoutError;
use crate::PAGE_SIZE;

/// Memory mapped at one address for as long as the value lives: what a [`HostRegion`]
/// keeps alive, so that faultline never touches memory its owner has unmapped.
///
/// # Safety
///
/// An implementor promises that `as_ptr()..as_ptr() + size()` is one readable and
/// writable mapping that stays mapped at that address, and is never unmapped or remapped
/// (by the implementor or anyone it lets do so), until the value is dropped; and that both
/// methods return the same values every time. faultline reads, writes and registers that
/// range with userfaultfd from any thread while the value lives.
pub unsafe trait MappedMemory: Send + Sync + 'static {
    /// The start of the mapping, page-aligned.
    fn as_ptr(&self) -> *mut u8;
    /// Its length in bytes, a multiple of the page size.
    fn size(&self) -> usize;
    /// Whether it is shared memory (memfd, tmpfs): userfaultfd's shmem rules apply (MINOR
    /// faults and UFFDIO_CONTINUE; UFFDIO_ZEROPAGE only where the kernel's registration
    /// reports it, and it allocates a page of the file; holes of the file can be left).
    fn is_shared(&self) -> bool;

    /// The file a shared mapping maps and the file offset of its first byte, if it is
    /// known: then the mapping's bytes are the file's, and a hole of the file (found with
    /// `SEEK_DATA`) reads as zeros without being read. `None` (the default) for
    /// anonymous memory and whenever the file is not known.
    fn backing_file(&self) -> Option<(std::os::fd::BorrowedFd<'_>, u64)> {
        None
    }
}

/// One contiguous host mapping of guest memory, and what keeps it mapped.
///
/// A region made by [`HostRegion::new`] holds a reference to its [`MappedMemory`]: the
/// memory stays mapped while any clone of the region, or anything built from it (a
/// [`RegionMap`], an [`crate::Installer`], a [`crate::Destination`], a dirty tracker),
/// lives. Only [`HostRegion::from_raw`] makes a region that owns nothing, and it is
/// `unsafe` for that reason. The fields are private, so a region cannot be re-pointed.
#[derive(Clone)]
pub struct HostRegion {
    host_addr: usize,
    len: usize,
    shmem: bool,
    /// `None` only for [`HostRegion::from_raw`], whose caller keeps the memory mapped.
    _owner: Option<Arc<dyn MappedMemory>>,
}

impl HostRegion {
    /// The whole of `memory`, which the region keeps mapped.
    pub fn new<M: MappedMemory>(memory: Arc<M>) -> HostRegion {
        HostRegion {
            host_addr: memory.as_ptr() as usize,
            len: memory.size(),
            shmem: memory.is_shared(),
            _owner: Some(memory),
        }
    }

    /// A region over memory the caller keeps mapped itself.
    ///
    /// # Safety
    ///
    /// If the region (or anything built from it: a [`RegionMap`], an
    /// [`crate::Installer`], a [`crate::Destination`], a dirty tracker, a page reader)
    /// is used to touch memory, `host_addr..host_addr + len` must be one readable and
    /// writable mapping (shared memory if `shmem`) that stays mapped at that address until
    /// the last of those values is dropped. A region that is only used for page
    /// arithmetic (for example [`RegionMap::page_of`]) touches nothing.
    pub unsafe fn from_raw(host_addr: *mut u8, len: usize, shmem: bool) -> HostRegion {
        HostRegion {
            host_addr: host_addr as usize,
            len,
            shmem,
            _owner: None,
        }
    }

    /// The start of the mapping.
    pub fn host_addr(&self) -> usize {
        self.host_addr
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region has no bytes (such a region is refused by [`RegionMap::new`]).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Shared memory (memfd/tmpfs): UFFDIO_ZEROPAGE only where the registration reports
    /// it (it allocates a page of the file), and zero stretches can stay holes.
    pub fn is_shmem(&self) -> bool {
        self.shmem
    }

    /// The file behind a shared region and the offset of the region's first byte in it,
    /// when its [`MappedMemory`] knows them ([`MappedMemory::backing_file`]).
    pub fn backing_file(&self) -> Option<(std::os::fd::BorrowedFd<'_>, u64)> {
        if !self.shmem {
            return None;
        }
        self._owner.as_ref()?.backing_file()
    }

    /// Whole pages in the region.
    pub fn pages(&self) -> u64 {
        (self.len / PAGE_SIZE) as u64
    }

    /// Copies whole pages of the region, from its page `first` on, into `out` (a whole
    /// number of pages long), and says whether it did: false, copying nothing, if `out`
    /// is not whole pages or they do not all lie in the region.
    ///
    /// For memory someone else may be writing meanwhile (a KVM guest, a stand-in vCPU):
    /// every 8-byte word is read once, with a relaxed atomic load, so a concurrent write
    /// leaves a torn copy (old and new words mixed), never a read the compiler may assume
    /// unchanged, merge or repeat. A thread of this process that writes guest memory with
    /// atomic stores (faultline's stand-in vCPUs do) is then no data race; a guest writing
    /// through KVM, or the kernel through userfaultfd, writes from outside the program. On
    /// x86-64 a relaxed load is a plain move, as a volatile read is. Callers must tolerate
    /// a torn copy: check the content, or know that the write will be seen again.
    ///
    /// False as well for a region whose start is not 8-byte aligned (every mapping is
    /// page-aligned; only [`HostRegion::from_raw`] could make one).
    ///
    /// On memory registered with userfaultfd, reading a page that is not installed
    /// blocks until it is: read only pages known to be present.
    pub fn read_shared(&self, first: u64, out: &mut [u8]) -> bool {
        let whole = out.len().is_multiple_of(PAGE_SIZE);
        let pages = (out.len() / PAGE_SIZE) as u64;
        if !whole
            || !self.host_addr.is_multiple_of(8)
            || first
                .checked_add(pages)
                .is_none_or(|end| end > self.pages())
        {
            return false;
        }
        let src = (self.host_addr + first as usize * PAGE_SIZE) as *const u64;
        for (i, word) in out.chunks_exact_mut(8).enumerate() {
            // SAFETY: the words lie inside the region (checked above): one mapping that
            // is readable and writable while this region lives (`MappedMemory`'s contract,
            // or `from_raw`'s caller's promise), 8-byte aligned (checked above, and pages
            // are whole), so every word is an aligned `AtomicU64` for as long as this
            // borrow of the region. Atomic because the guest may write them (see above).
            let w = unsafe { AtomicU64::from_ptr(src.add(i).cast_mut()) }.load(Ordering::Relaxed);
            word.copy_from_slice(&w.to_ne_bytes());
        }
        true
    }
}

impl fmt::Debug for HostRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostRegion")
            .field("host_addr", &format_args!("{:#x}", self.host_addr))
            .field("len", &self.len)
            .field("shmem", &self.shmem)
            .field("owned", &self._owner.is_some())
            .finish()
    }
}

/// Regions are equal when they describe the same range the same way, whoever owns it.
impl PartialEq for HostRegion {
    fn eq(&self, other: &HostRegion) -> bool {
        (self.host_addr, self.len, self.shmem) == (other.host_addr, other.len, other.shmem)
    }
}

impl Eq for HostRegion {}

/// Ordered regions with page ↔ address translation.
#[derive(Debug, Clone)]
pub struct RegionMap {
    regions: Vec<HostRegion>,
    /// First global page of each region (same order as `regions`).
    first_page: Vec<u64>,
    /// Region indices sorted by host address, for address lookups.
    by_addr: Vec<usize>,
    total_pages: u64,
}

impl RegionMap {
    /// Numbers the pages of `regions` in the order given. Fails with
    /// [`LayoutError::Misaligned`] for an empty or non-page-aligned region and
    /// [`LayoutError::Overlap`] for regions that overlap or wrap the address space.
    /// An empty list is valid and has no pages.
    pub fn new(regions: Vec<HostRegion>) -> Result<RegionMap, LayoutError> {
        let mut first_page = Vec::with_capacity(regions.len());
        let mut total_pages = 0u64;
        for (index, r) in regions.iter().enumerate() {
            if r.len == 0 || r.len % PAGE_SIZE != 0 || r.host_addr % PAGE_SIZE != 0 {
                return Err(LayoutError::Misaligned {
                    index,
                    addr: r.host_addr,
                    len: r.len,
                });
            }
            if r.host_addr.checked_add(r.len).is_none() {
                return Err(LayoutError::Overlap {
                    index,
                    addr: r.host_addr,
                    len: r.len,
                });
            }
            first_page.push(total_pages);
            total_pages += r.pages();
        }
        let mut by_addr: Vec<usize> = (0..regions.len()).collect();
        by_addr.sort_by_key(|&i| regions[i].host_addr);
        for w in by_addr.windows(2) {
            let (a, b) = (&regions[w[0]], &regions[w[1]]);
            if a.host_addr + a.len > b.host_addr {
                return Err(LayoutError::Overlap {
                    index: w[1],
                    addr: b.host_addr,
                    len: b.len,
                });
            }
        }
        Ok(RegionMap {
            regions,
            first_page,
            by_addr,
            total_pages,
        })
    }

    /// The regions, in page-numbering order (as given to [`RegionMap::new`]).
    pub fn regions(&self) -> &[HostRegion] {
        &self.regions
    }

    /// Pages across all regions; global page indices are `0..total_pages()`.
    pub fn total_pages(&self) -> u64 {
        self.total_pages
    }

    /// Global page containing `host_addr`, if it lies in a region.
    pub fn page_of(&self, host_addr: usize) -> Option<u64> {
        let pos = self
            .by_addr
            .partition_point(|&i| self.regions[i].host_addr <= host_addr);
        let idx = *self.by_addr.get(pos.checked_sub(1)?)?;
        let r = &self.regions[idx];
        let off = host_addr - r.host_addr;
        (off < r.len).then(|| self.first_page[idx] + (off / PAGE_SIZE) as u64)
    }

    /// Index of the region holding `page`.
    pub fn region_index_of(&self, page: u64) -> Option<usize> {
        if page >= self.total_pages {
            return None;
        }
        Some(self.first_page.partition_point(|&f| f <= page) - 1)
    }

    /// Region holding `page`.
    pub fn region_of(&self, page: u64) -> Option<&HostRegion> {
        self.region_index_of(page).map(|i| &self.regions[i])
    }

    /// Host address of the start of `page`.
    pub fn host_addr_of(&self, page: u64) -> Option<usize> {
        let idx = self.region_index_of(page)?;
        let off = (page - self.first_page[idx]) as usize * PAGE_SIZE;
        Some(self.regions[idx].host_addr + off)
    }

    /// Copies pages `first..` (global page numbers, across regions as they come) into
    /// `out`, whole pages, with [`HostRegion::read_shared`], and says whether it did:
    /// false, copying nothing, if they do not all exist.
    pub fn read_shared(&self, first: u64, out: &mut [u8]) -> bool {
        let pages = (out.len() / PAGE_SIZE) as u64;
        let fits = first
            .checked_add(pages)
            .is_some_and(|end| end <= self.total_pages);
        if !out.len().is_multiple_of(PAGE_SIZE) || !fits {
            return false;
        }
        let (mut page, mut at) = (first, 0);
        while at < out.len() {
            let Some(idx) = self.region_index_of(page) else {
                return false;
            };
            let (region, local) = (&self.regions[idx], page - self.first_page[idx]);
            let n = (region.pages() - local).min(((out.len() - at) / PAGE_SIZE) as u64);
            let end = at + n as usize * PAGE_SIZE;
            if !region.read_shared(local, &mut out[at..end]) {
                return false;
            }
            page += n;
            at = end;
        }
        true
    }

    /// How many of the `n` pages starting at `page` lie in `page`'s region (0 if `page`
    /// is out of range), so one fill ioctl never spans two mappings.
    pub fn run_within_region(&self, page: u64, n: u64) -> u64 {
        match self.region_index_of(page) {
            Some(idx) => {
                let end = self.first_page[idx] + self.regions[idx].pages();
                n.min(end - page)
            }
            None => 0,
        }
    }

    /// Global pages overlapping host range `[start, end)`, clipped per region, as
    /// (first page, page count, region index) triples.
    pub fn pages_in_host_range(&self, start: usize, end: usize) -> Vec<(u64, u64, usize)> {
        let mut out = Vec::new();
        for (idx, r) in self.regions.iter().enumerate() {
            let lo = start.max(r.host_addr);
            let hi = end.min(r.host_addr + r.len);
            if lo >= hi {
                continue;
            }
            let first = (lo - r.host_addr) / PAGE_SIZE;
            let last = (hi - r.host_addr).div_ceil(PAGE_SIZE);
            out.push((
                self.first_page[idx] + first as u64,
                (last - first) as u64,
                idx,
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(addr: usize, pages: usize) -> HostRegion {
        // SAFETY: these regions are only used for page arithmetic; nothing touches them.
        unsafe { HostRegion::from_raw(addr as *mut u8, pages * PAGE_SIZE, false) }
    }

    #[test]
    fn global_index_follows_given_order() {
        // Second region sits below the first in the address space on purpose.
        let m = RegionMap::new(vec![r(0x10_0000, 4), r(0x1000, 2)]).unwrap();
        assert_eq!(m.total_pages(), 6);
        assert_eq!(m.page_of(0x10_0000), Some(0));
        assert_eq!(m.page_of(0x10_3fff), Some(3));
        assert_eq!(m.page_of(0x10_4000), None);
        assert_eq!(m.page_of(0x1000), Some(4));
        assert_eq!(m.page_of(0x2abc), Some(5));
        assert_eq!(m.page_of(0x0fff), None);
        assert_eq!(m.page_of(0x3000), None);
        assert_eq!(m.host_addr_of(0), Some(0x10_0000));
        assert_eq!(m.host_addr_of(5), Some(0x2000));
        assert_eq!(m.host_addr_of(6), None);
        assert_eq!(m.run_within_region(2, 10), 2);
        assert_eq!(m.run_within_region(2, 1), 1);
        assert_eq!(m.run_within_region(4, 10), 2);
        assert_eq!(m.run_within_region(6, 10), 0);
        assert_eq!(m.region_of(4).unwrap().host_addr(), 0x1000);
    }

    #[test]
    fn shared_reads_copy_whole_pages_of_one_region_only() {
        let a = crate::GuestMemory::anonymous(3 * PAGE_SIZE).unwrap();
        let b = crate::GuestMemory::anonymous(2 * PAGE_SIZE).unwrap();
        for (m, base) in [(&a, 0u8), (&b, 3)] {
            for p in 0..m.len() / PAGE_SIZE {
                // SAFETY: inside the mapping, which `m` keeps alive; nothing else uses it.
                unsafe { m.as_ptr().add(p * PAGE_SIZE + 5).write(base + p as u8 + 1) };
            }
        }
        let map = RegionMap::new(vec![a.host_region(), b.host_region()]).unwrap();
        let mut two = vec![0xffu8; 2 * PAGE_SIZE];
        assert!(map.read_shared(1, &mut two));
        assert_eq!((two[5], two[PAGE_SIZE + 5]), (2, 3));
        assert_eq!(two.iter().filter(|&&x| x != 0).count(), 2);
        assert!(map.read_shared(3, &mut two));
        assert_eq!((two[5], two[PAGE_SIZE + 5]), (4, 5));
        // The map's pages run on from one region into the next; a region's do not.
        assert!(map.read_shared(2, &mut two));
        assert_eq!((two[5], two[PAGE_SIZE + 5]), (3, 4));
        assert!(!a.host_region().read_shared(2, &mut two));
        // Past the last page, or not whole pages: nothing.
        let before = two.clone();
        assert!(!map.read_shared(4, &mut two));
        assert!(!map.read_shared(u64::MAX, &mut two));
        assert!(!map.read_shared(0, &mut two[..PAGE_SIZE + 8]));
        assert!(!a.host_region().read_shared(u64::MAX, &mut two));
        assert_eq!(two, before);
        assert!(map.read_shared(0, &mut []));
    }

    #[test]
    fn host_range_is_clipped_per_region() {
        let m = RegionMap::new(vec![r(0x1000, 2), r(0x3000, 2)]).unwrap();
        assert_eq!(
            m.pages_in_host_range(0x2000, 0x4000),
            vec![(1, 1, 0), (2, 1, 1)]
        );
        assert!(m.pages_in_host_range(0x9000, 0xa000).is_empty());
    }

    #[test]
    fn rejects_bad_regions() {
        assert!(matches!(
            RegionMap::new(vec![r(0x1001, 1)]),
            Err(LayoutError::Misaligned { .. })
        ));
        assert!(matches!(
            RegionMap::new(vec![r(0x1000, 0)]),
            Err(LayoutError::Misaligned { .. })
        ));
        assert!(matches!(
            RegionMap::new(vec![r(0x1000, 4), r(0x2000, 1)]),
            Err(LayoutError::Overlap { .. })
        ));
        assert!(matches!(
            RegionMap::new(vec![r(usize::MAX - 0xfff, 2)]),
            Err(LayoutError::Overlap { .. })
        ));
        assert_eq!(RegionMap::new(vec![]).unwrap().total_pages(), 0);
    }
}
