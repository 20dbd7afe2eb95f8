//! Dirty tracking with userfaultfd async write-protect and `PAGEMAP_SCAN`.

use crate::dirty::pagemap::{PagemapScanner, DEFAULT_SCAN_CAPACITY};
use crate::dirty::{first_pages, kernel_release, DirtyTracker};
use crate::error::{DirtyError, UffdError};
use crate::layout::{HostRegion, RegionMap};
use crate::uffd::{Features, Userfaultfd};
use crate::PAGE_SIZE;

/// Userfaultfd features the tracker negotiates: writes to protected pages resolve
/// themselves in the kernel (no message, no handler thread), and pages that were never
/// populated are protected too (a PTE marker stands in for them).
pub const WP_ASYNC_FEATURES: Features = Features::WP_ASYNC.union(Features::WP_UNPOPULATED);

/// Tracks writes to process memory through the PTE write-protect bit.
///
/// At open, every region is registered in WP mode with a dedicated async-WP userfaultfd
/// and write-protected. A write to a protected page makes the kernel clear the bit
/// (on the writing thread, no message). [`DirtyTracker::harvest`] runs `PAGEMAP_SCAN`,
/// which reports pages whose bit is clear and sets it again under the page-table lock,
/// page by page, in one walk; the TLB is flushed before the ioctl returns. So a write
/// either lands before its page is re-protected (reported now, and the replicator,
/// reading after the harvest, sees it) or faults on the re-protected page afterwards
/// (reported next time). Writers are never blocked beyond that minor fault.
///
/// Works for private anonymous and shared memfd/shmem mappings alike. Limits:
/// - Only writes through page tables of this process are seen (a guest writing via
///   KVM goes through the same PTEs). Writes to a memfd through another mapping, another
///   process or `write(2)` are not.
/// - Discarding anonymous memory (`MADV_DONTNEED`) zeroes it without a write; the kernel
///   drops the page's marker, and the page is only reported once it is written again.
/// - A range can carry only one userfaultfd per mode, so the regions must not already
///   be WP-registered elsewhere; closing the tracker releases the registration.
/// - If a region is unmapped while tracked its pages are simply no longer reported; if
///   something else is mapped there, harvest fails with [`DirtyError::NotWpAsync`].
#[derive(Debug)]
pub struct WpAsyncTracker {
    uffd: Userfaultfd,
    scanner: PagemapScanner,
    map: RegionMap,
    first_page: Vec<u64>,
    /// Next harvest reports everything (first harvest, or after an error).
    report_all: bool,
}

impl WpAsyncTracker {
    /// Registers and write-protects `regions`; fails, saying what is missing, when the
    /// kernel or the permissions do not allow it.
    pub fn new(regions: &[HostRegion]) -> Result<WpAsyncTracker, DirtyError> {
        Self::with_scan_capacity(regions, DEFAULT_SCAN_CAPACITY)
    }

    /// As [`WpAsyncTracker::new`], with `capacity` runs per `PAGEMAP_SCAN` call.
    pub fn with_scan_capacity(
        regions: &[HostRegion],
        capacity: usize,
    ) -> Result<WpAsyncTracker, DirtyError> {
        let map = RegionMap::new(regions.to_vec())?;
        let uffd = Userfaultfd::open(WP_ASYNC_FEATURES).map_err(|e| match e {
            UffdError::MissingFeature { missing, supported } => DirtyError::MissingFeature {
                missing,
                supported,
                kernel: kernel_release(),
            },
            other => DirtyError::Uffd(other),
        })?;
        let scanner = PagemapScanner::open(capacity)?;
        for r in map.regions() {
            let (addr, len) = (r.host_addr() as u64, r.len() as u64);
            let register = |source| DirtyError::Register { addr, len, source };
            uffd.register_wp(addr, len).map_err(register)?;
            uffd.writeprotect(addr, len, true).map_err(register)?;
        }
        let mut tracker = WpAsyncTracker {
            uffd,
            scanner,
            first_page: first_pages(map.regions()),
            map,
            report_all: true,
        };
        // Probe PAGEMAP_SCAN now so an old kernel fails here, not at the first harvest.
        // Everything was just protected, and the first harvest reports all pages anyway.
        tracker.scan(&mut Vec::new())?;
        Ok(tracker)
    }

    /// Features granted by the kernel to the tracker's userfaultfd.
    pub fn features(&self) -> Features {
        self.uffd.features()
    }

    fn scan(&mut self, out: &mut Vec<u64>) -> Result<(), DirtyError> {
        for (r, &first) in self.map.regions().iter().zip(&self.first_page) {
            let base = r.host_addr() as u64;
            self.scanner
                .scan_written(base, base + r.len() as u64, |start, end| {
                    let from = first + (start - base) / PAGE_SIZE as u64;
                    let to = first + (end - base) / PAGE_SIZE as u64;
                    out.extend(from..to);
                })?;
        }
        Ok(())
    }
}

impl DirtyTracker for WpAsyncTracker {
    fn harvest(&mut self, out: &mut Vec<u64>) -> Result<(), DirtyError> {
        out.clear();
        // Pages re-protected by a walk that then failed were reported to nobody:
        // remember to report everything next time.
        let report_all = std::mem::replace(&mut self.report_all, true);
        self.scan(out)?;
        if report_all {
            out.clear();
            out.extend(0..self.map.total_pages());
        }
        self.report_all = false;
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "uffd-wp-async"
    }
}
