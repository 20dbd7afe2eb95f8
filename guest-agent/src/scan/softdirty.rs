//! Pages written during an interval, from soft-dirty bits: `echo 4 >
//! /proc/PID/clear_refs` clears them (and write-protects the process's page tables), the
//! next write to a page sets its bit again, and `/proc/PID/pagemap` bit 55 shows it. This is
//! the fallback when the kernel has no idle page tracking (Debian's kernels are built
//! without `CONFIG_IDLE_PAGE_TRACKING` but with `CONFIG_MEM_SOFT_DIRTY`). It sees writes
//! only, not reads, and costs each process one minor fault per page it writes per interval.

use std::io;

use super::bitmap::PfnBitmap;
use crate::procfs::{self, Mapping, Pagemap, PM_PFN_MASK, PM_PRESENT, PM_SOFT_DIRTY};
use crate::throttle::Throttle;

/// Entries read from a pagemap per `pread` (32 KiB).
const CHUNK: usize = 4096;

/// What one collection saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SoftDirtyStats {
    /// Processes whose pagemap was read.
    pub processes: u32,
    /// Pagemap entries read.
    pub entries: u64,
    /// Present, soft-dirty entries (a frame mapped twice counts twice).
    pub written: u64,
}

/// Soft-dirty tracking over all processes.
#[derive(Debug)]
pub struct SoftDirty {
    page_size: u64,
    entries: Vec<u64>,
}

impl SoftDirty {
    /// Checks that soft-dirty bits work here: clears our own, writes a page, and looks for
    /// the bit. `None` if they do not (kernel without `CONFIG_MEM_SOFT_DIRTY`, no /proc).
    pub fn probe() -> Option<SoftDirty> {
        let pid = std::process::id() as i32;
        let page_size = procfs::page_size();
        let mut page = vec![0u8; 2 * page_size as usize];
        // A page-aligned address inside the buffer.
        let addr = (page.as_ptr() as u64).next_multiple_of(page_size);
        let idx = (addr - page.as_ptr() as u64) as usize;
        page[idx] = 1;
        procfs::clear_refs(pid, "4").ok()?;
        page[idx] = 2;
        std::hint::black_box(&mut page);
        let pm = Pagemap::open(pid).ok()?;
        let mut e = [0u64; 1];
        pm.read(addr, &mut e).ok()?;
        (e[0] & PM_SOFT_DIRTY != 0).then(|| SoftDirty {
            page_size,
            entries: vec![0; CHUNK],
        })
    }

    /// Clears the soft-dirty bits of every process: the start of an interval.
    pub fn arm_all(&self, throttle: &mut Throttle) {
        for pid in procfs::pids().unwrap_or_default() {
            // Kernel threads and processes that just exited fail or do nothing: fine.
            let _ = procfs::clear_refs(pid, "4");
            throttle.pause();
        }
    }

    /// Sets in `written` the frames of every page some process wrote since its bits were
    /// cleared, and clears them again (so intervals follow each other without a gap).
    pub fn collect(&mut self, written: &mut PfnBitmap, throttle: &mut Throttle) -> SoftDirtyStats {
        let mut stats = SoftDirtyStats::default();
        for pid in procfs::pids().unwrap_or_default() {
            if let Ok(n) = self.collect_pid(pid, written, throttle) {
                if n.entries > 0 {
                    stats.processes += 1;
                }
                stats.entries += n.entries;
                stats.written += n.written;
            }
            let _ = procfs::clear_refs(pid, "4");
            throttle.pause();
        }
        stats
    }

    fn collect_pid(
        &mut self,
        pid: i32,
        written: &mut PfnBitmap,
        throttle: &mut Throttle,
    ) -> io::Result<SoftDirtyStats> {
        let mut stats = SoftDirtyStats::default();
        let maps = procfs::maps(pid)?;
        if maps.is_empty() {
            return Ok(stats); // a kernel thread
        }
        let pm = Pagemap::open(pid)?;
        for m in maps.iter().filter(|m| tracked(m)) {
            let mut addr = m.start;
            while addr < m.end {
                let want = (((m.end - addr) / self.page_size) as usize).min(CHUNK);
                let n = pm.read(addr, &mut self.entries[..want])?;
                if n == 0 {
                    break;
                }
                for &e in &self.entries[..n] {
                    if e & PM_PRESENT != 0 && e & PM_SOFT_DIRTY != 0 {
                        written.set(e & PM_PFN_MASK);
                        stats.written += 1;
                    }
                }
                stats.entries += n as u64;
                addr += n as u64 * self.page_size;
                throttle.pause();
            }
        }
        Ok(stats)
    }
}

/// Mappings that can hold written pages: writable ones, except the kernel's
/// pseudo-mappings.
fn tracked(m: &Mapping) -> bool {
    m.write && !m.is_special()
}
