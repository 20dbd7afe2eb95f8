//! Dirty tracking by comparing a per-page xxh3-64 of the content between harvests.

use std::io;

use xxhash_rust::xxh3::xxh3_64;

use crate::dirty::{first_pages, DirtyTracker};
use crate::error::DirtyError;
use crate::layout::{HostRegion, RegionMap};
use crate::PAGE_SIZE;

/// Pages read per system call.
const CHUNK_PAGES: usize = 256;

/// Reports pages whose content hash changed; needs nothing from the kernel beyond
/// `process_vm_readv(2)` on the own process.
///
/// Cost: every harvest reads and hashes **all** tracked memory (and on shmem the first
/// read allocates every never-touched page), whatever the dirty fraction.
///
/// Guarantee. Each harvest reads a page (possibly torn by a concurrent write) and stores
/// the hash of what it observed. A page is reported when the observed content differs
/// from the reference of the previous harvest. The reference is the hash observed
/// at that harvest, or, if the replicator called [`DirtyTracker::replicated`] since, the
/// hash of the bytes it actually sent. Hence:
/// - A write concurrent with the hashing of its page is not lost: the stored hash is of
///   the content observed before (or half-way through) the write, which differs from the
///   content once the write completes, so the next harvest reports the page.
/// - With [`DirtyTracker::replicated`] called for every page sent, the guarantee is
///   exact: after writers stop, a harvest reports every page whose content differs from
///   the standby's copy (up to 64-bit hash collisions, ~2^-64 per changed page).
/// - Without it, the reference is the content observed at the harvest, not the content
///   the replicator read later. A page that goes A (observed) → B (read and sent) → A
///   (next harvest) is *not* reported and the standby keeps B. Lock words and flags do
///   exactly this, so replicators must call `replicated`.
/// - Unlike [`crate::WpAsyncTracker`], a write that restores the previous content is
///   invisible, which is harmless for replication; memory discarded to zero (e.g.
///   `MADV_DONTNEED`) is caught, since only content counts.
#[derive(Debug)]
pub struct HashTracker {
    map: RegionMap,
    first_page: Vec<u64>,
    hashes: Vec<u64>,
    buf: Vec<u8>,
    /// Next harvest reports everything (first harvest, or after an error).
    report_all: bool,
}

impl HashTracker {
    /// Tracks `regions`, which must stay mapped and readable while the tracker lives;
    /// a region that is not readable now is refused, and one that stops being readable
    /// later makes harvest fail with [`DirtyError::Read`] (never a crash: memory is read
    /// by the kernel through `process_vm_readv`).
    pub fn new(regions: &[HostRegion]) -> Result<HashTracker, DirtyError> {
        let map = RegionMap::new(regions.to_vec())?;
        let total = map.total_pages() as usize;
        let mut buf = vec![0u8; CHUNK_PAGES * PAGE_SIZE];
        for r in map.regions() {
            read_memory(r.host_addr(), &mut buf[..PAGE_SIZE])?;
        }
        Ok(HashTracker {
            first_page: first_pages(map.regions()),
            map,
            hashes: vec![0; total],
            buf,
            report_all: true,
        })
    }

    fn scan(&mut self, out: &mut Vec<u64>, report_all: bool) -> Result<(), DirtyError> {
        for (r, &first) in self.map.regions().iter().zip(&self.first_page) {
            let mut off = 0;
            while off < r.len() {
                let n = (r.len() - off).min(self.buf.len());
                let chunk = &mut self.buf[..n];
                read_memory(r.host_addr() + off, chunk)?;
                let page0 = first + (off / PAGE_SIZE) as u64;
                for (i, content) in chunk.chunks_exact(PAGE_SIZE).enumerate() {
                    let page = page0 + i as u64;
                    let h = xxh3_64(content);
                    let slot = &mut self.hashes[page as usize];
                    if report_all || *slot != h {
                        out.push(page);
                    }
                    *slot = h;
                }
                off += n;
            }
        }
        Ok(())
    }
}

impl DirtyTracker for HashTracker {
    fn harvest(&mut self, out: &mut Vec<u64>) -> Result<(), DirtyError> {
        out.clear();
        // A failed scan has updated some hashes without reporting: report all next time.
        let report_all = std::mem::replace(&mut self.report_all, true);
        self.scan(out, report_all)?;
        self.report_all = false;
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "content-hash"
    }

    fn replicated(&mut self, page: u64, content: &[u8]) -> Result<(), DirtyError> {
        let total = self.hashes.len() as u64;
        let slot = usize::try_from(page)
            .ok()
            .and_then(|i| self.hashes.get_mut(i))
            .ok_or(DirtyError::PageOutOfRange { page, total })?;
        if content.len() != PAGE_SIZE {
            return Err(DirtyError::BadContentLength {
                page,
                len: content.len(),
            });
        }
        *slot = xxh3_64(content);
        Ok(())
    }
}

/// Copies `buf.len()` bytes of this process's memory at `addr` into `buf` through the
/// kernel, so unmapped memory is an error rather than a fault, and a concurrent writer
/// is no data race in Rust's sense (the kernel does the reading).
fn read_memory(addr: usize, buf: &mut [u8]) -> Result<(), DirtyError> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let err = |source| DirtyError::Read {
        addr: addr as u64,
        len: buf.len(),
        source,
    };
    loop {
        // SAFETY: `local` describes `buf`, exclusively borrowed for the call, so the
        // kernel writes only there; `remote` is only read, and the kernel validates it
        // (unmapped memory gives EFAULT or a short count, never a fault in this process).
        let ret = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(err(e));
        }
        if ret as usize != buf.len() {
            return Err(err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("short read of {ret} bytes (part of the range is not mapped)"),
            )));
        }
        return Ok(());
    }
}
