//! Safe wrapper of the `PAGEMAP_SCAN` ioctl on `/proc/self/pagemap`, restricted to the
//! one query dirty tracking needs: "report written pages and write-protect them again".

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::error::DirtyError;
use crate::sys;
use crate::PAGE_SIZE;

/// Default number of `page_region` slots per ioctl (24 bytes each). A slot holds one run
/// of consecutive written pages, so this is a batch size, not a limit.
pub const DEFAULT_SCAN_CAPACITY: usize = 512;

pub(crate) struct PagemapScanner {
    file: File,
    buf: Vec<sys::page_region>,
}

impl std::fmt::Debug for PagemapScanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagemapScanner")
            .field("capacity", &self.buf.len())
            .finish_non_exhaustive()
    }
}

impl PagemapScanner {
    /// Opens `/proc/self/pagemap` with an output vector of `capacity` (at least 1) runs.
    pub(crate) fn open(capacity: usize) -> Result<PagemapScanner, DirtyError> {
        let file =
            File::open("/proc/self/pagemap").map_err(|source| DirtyError::NoPagemapScan {
                kernel: super::kernel_release(),
                source,
            })?;
        Ok(PagemapScanner {
            file,
            buf: vec![sys::page_region::default(); capacity.max(1)],
        })
    }

    /// Walks `[start, end)`: calls `on_run(first, end)` for every run of pages written
    /// since they were last write-protected, and write-protects exactly those pages in
    /// the same page-table-locked walk. When the output vector fills, the kernel stops
    /// at `walk_end` (nothing past it was touched) and the walk continues from there.
    pub(crate) fn scan_written(
        &mut self,
        start: u64,
        end: u64,
        mut on_run: impl FnMut(u64, u64),
    ) -> Result<(), DirtyError> {
        let bad = |what: String| DirtyError::BadScan { start, end, what };
        let mut at = start;
        while at < end {
            let mut arg = sys::pm_scan_arg {
                size: std::mem::size_of::<sys::pm_scan_arg>() as u64,
                flags: sys::PM_SCAN_WP_MATCHING | sys::PM_SCAN_CHECK_WPASYNC,
                start: at,
                end,
                walk_end: 0,
                vec: self.buf.as_mut_ptr() as u64,
                vec_len: self.buf.len() as u64,
                max_pages: 0,
                category_inverted: 0,
                category_mask: sys::PAGE_IS_WRITTEN,
                category_anyof_mask: 0,
                return_mask: sys::PAGE_IS_WRITTEN,
            };
            // SAFETY: PAGEMAP_SCAN reads and writes back one pm_scan_arg (`arg`, size
            // pinned in `sys`) and writes at most `vec_len` page_regions to `vec`, which
            // points to `self.buf`, exclusively borrowed and alive for the whole call.
            // It changes page protections only (write-protect), never memory contents.
            let ret =
                unsafe { libc::ioctl(self.file.as_raw_fd(), sys::PAGEMAP_SCAN as _, &mut arg) };
            if ret < 0 {
                let e = io::Error::last_os_error();
                return Err(match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::ENOTTY) => DirtyError::NoPagemapScan {
                        kernel: super::kernel_release(),
                        source: e,
                    },
                    Some(libc::EPERM) => DirtyError::NotWpAsync { start: at, end },
                    _ => DirtyError::Sys {
                        op: "PAGEMAP_SCAN",
                        source: e,
                    },
                });
            }
            let n = ret as usize;
            if n > self.buf.len() {
                return Err(bad(format!("{n} runs for {} slots", self.buf.len())));
            }
            let page = PAGE_SIZE as u64;
            for r in &self.buf[..n] {
                if r.start < at
                    || r.end > end
                    || r.start >= r.end
                    || !r.start.is_multiple_of(page)
                    || !r.end.is_multiple_of(page)
                {
                    return Err(bad(format!("run {:#x}..{:#x}", r.start, r.end)));
                }
                on_run(r.start, r.end);
            }
            if arg.walk_end <= at || arg.walk_end > end {
                return Err(bad(format!(
                    "walk stopped at {:#x} (from {at:#x})",
                    arg.walk_end
                )));
            }
            at = arg.walk_end;
        }
        Ok(())
    }
}
