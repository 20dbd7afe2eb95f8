//! glibc malloc settings for a process that moves gigabytes through short-lived buffers.
//!
//! Every batch of pages lives in a buffer of a few hundred KiB to a few MiB: the source
//! fills one per batch and hands it to QUIC, which frees it once the peer acknowledged it;
//! the destination reads each frame into one. glibc serves allocations above its mmap
//! threshold (128 KiB at start) with a fresh `mmap` each, so every batch paid its `munmap`,
//! a page fault per 4 KiB written and the kernel zeroing each of those pages, on both
//! sides. Measured on loopback (`lan_postcopy`, raw push of 1 GiB, 2 cores): 0.97 GB/s
//! with 0.95 + 1.09 CPU-s per GiB (source + destination) against 1.28 GB/s with 0.78 +
//! 0.89 once freed buffers are reused ([docs/benchmarks.md](../../docs/benchmarks.md)).
//!
//! So the process keeps such buffers in its heap: allocations up to 32 MiB (glibc's
//! largest threshold) come from the heap, and up to 128 MiB of free heap is kept rather
//! than returned to the kernel. A VMM linking the library picks its own allocator; these
//! are the settings that matter for glibc's.

/// The mmap threshold: glibc's maximum on 64-bit.
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free heap kept before trimming.
const TRIM_THRESHOLD: i32 = 128 << 20;

/// Applies the settings unless `GLIBC_TUNABLES` sets malloc's itself (an operator's
/// choice wins). Call before any thread starts.
pub fn tune() {
    if !applies(std::env::var("GLIBC_TUNABLES").ok().as_deref()) {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's parameters; it takes the arena locks
    // itself and is called here before the process starts any thread. A refused value
    // (return 0) leaves glibc's default, which is correct, only slower.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

/// Whether to apply the settings, given `GLIBC_TUNABLES`.
fn applies(tunables: Option<&str>) -> bool {
    !tunables.is_some_and(|t| {
        t.contains("glibc.malloc.mmap_threshold") || t.contains("glibc.malloc.trim_threshold")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operators_malloc_tunables_win() {
        assert!(applies(None));
        assert!(applies(Some("glibc.pthread.rseq=0")));
        assert!(!applies(Some("glibc.malloc.mmap_threshold=131072")));
        assert!(!applies(Some(
            "glibc.pthread.rseq=0:glibc.malloc.trim_threshold=0"
        )));
    }
}
