//! Guest memory: one memfd-backed `MAP_SHARED` region at guest-physical 0, as VMMs that
//! migrate use it (a memfd can be handed to another process, registered with userfaultfd
//! MISSING/MINOR, and have holes punched in it).

use std::fs::File;
use std::os::fd::FromRawFd;

use uffd_core::HostRegion;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};
use xxhash_rust::xxh3::Xxh3;

use super::error::VmError;

const CHUNK: usize = 1 << 20;

/// Create `size` bytes of zeroed guest memory at guest-physical 0, backed by a memfd and
/// mapped `MAP_SHARED`. `size` must be a non-zero multiple of 2 MiB.
pub fn create_guest_memory(size: usize) -> Result<GuestMemoryMmap, VmError> {
    if size == 0 || !size.is_multiple_of(2 << 20) {
        return Err(VmError::Config(format!(
            "memory size {size} must be a non-zero multiple of 2 MiB"
        )));
    }
    // SAFETY: memfd_create takes a NUL-terminated name and flags; the returned fd is checked.
    let fd = unsafe { libc::memfd_create(c"faultline-guest".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(VmError::Memory(format!(
            "memfd_create: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64)
        .map_err(|e| VmError::Memory(format!("ftruncate memfd to {size} bytes: {e}")))?;
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        size,
        Some(FileOffset::new(file, 0)),
    )])
    .map_err(|e| VmError::Memory(format!("mmap {size} bytes of memfd: {e}")))
}

/// Guest memory at guest-physical 0 over an existing `MAP_SHARED` mapping that something
/// else owns: a standby's replica file, which is already registered with userfaultfd and
/// must be the very mapping the vCPUs fault on (a second mapping of the same file would
/// not be registered). The size must be a non-zero multiple of 2 MiB.
///
/// # Safety
///
/// `region` must describe a live read-write `MAP_SHARED` mapping that stays mapped for as
/// long as the returned memory, and every clone of it (a [`super::Vm`] holds one), lives.
pub unsafe fn guest_memory_over(region: &HostRegion) -> Result<GuestMemoryMmap, VmError> {
    if region.is_empty() || !region.len().is_multiple_of(2 << 20) {
        return Err(VmError::Config(format!(
            "memory size {} must be a non-zero multiple of 2 MiB",
            region.len()
        )));
    }
    // SAFETY: the caller guarantees the mapping is live, read-write and shared, and outlives
    // the region; `build_raw` does not take ownership, so it never unmaps it.
    let mapping = unsafe {
        MmapRegion::build_raw(
            region.host_addr() as *mut u8,
            region.len(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
    }
    .map_err(|e| VmError::Memory(format!("wrapping the replica mapping: {e}")))?;
    let region = GuestRegionMmap::new(mapping, GuestAddress(0)).ok_or_else(|| {
        VmError::Memory("the replica mapping overflows guest-physical space".into())
    })?;
    GuestMemoryMmap::from_regions(vec![region])
        .map_err(|e| VmError::Memory(format!("guest memory over the replica: {e}")))
}

/// Total guest memory size in bytes.
pub fn memory_size(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// Each region's host mapping, for userfaultfd registration and dirty tracking
/// ([`vmm_shim::guest::regions`]: each keeps its mapping alive; memfd-backed, so shmem).
pub fn host_regions(mem: &GuestMemoryMmap) -> Result<Vec<HostRegion>, VmError> {
    vmm_shim::guest::regions(mem).map_err(|e| VmError::Memory(e.to_string()))
}

/// xxh3-128 of all guest memory in guest-physical order, as 32 hex digits (the same form as
/// `vmm_shim::digest`). Read through vm-memory's volatile accessors, so it is sound while
/// vCPUs run, but only meaningful while they are paused or stopped.
pub fn digest(mem: &GuestMemoryMmap) -> Result<String, VmError> {
    let mut h = Xxh3::new();
    let mut buf = vec![0u8; CHUNK];
    for region in mem.iter() {
        let start = region.start_addr().0;
        let len = region.len();
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(CHUNK as u64) as usize;
            mem.read_slice(&mut buf[..n], GuestAddress(start + off))
                .map_err(|e| VmError::Memory(format!("read at {:#x}: {e}", start + off)))?;
            h.update(&buf[..n]);
            off += n as u64;
        }
    }
    Ok(format!("{:032x}", h.digest128()))
}

/// Like [`digest`], with some little-endian u64 words of guest memory (guest-physical
/// address, value) hashed as if they held the given values. The words must not straddle a
/// chunk boundary, which holds for 8-byte-aligned addresses.
pub fn digest_patched(mem: &GuestMemoryMmap, patches: &[(u64, u64)]) -> Result<String, VmError> {
    if let Some((gpa, _)) = patches.iter().find(|(gpa, _)| gpa % 8 != 0) {
        return Err(VmError::Memory(format!(
            "patched word at {gpa:#x} is not 8-byte aligned"
        )));
    }
    let mut h = Xxh3::new();
    let mut buf = vec![0u8; CHUNK];
    for region in mem.iter() {
        let start = region.start_addr().0;
        let len = region.len();
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(CHUNK as u64) as usize;
            let at = start + off;
            mem.read_slice(&mut buf[..n], GuestAddress(at))
                .map_err(|e| VmError::Memory(format!("read at {at:#x}: {e}")))?;
            for &(gpa, v) in patches {
                if (at..at + n as u64).contains(&gpa) {
                    let i = (gpa - at) as usize;
                    buf[i..i + 8].copy_from_slice(&v.to_le_bytes());
                }
            }
            h.update(&buf[..n]);
            off += n as u64;
        }
    }
    Ok(format!("{:032x}", h.digest128()))
}

/// Copy all of `src` into `dst` (same size), as a migration's destination ends up with.
pub fn copy_memory(src: &GuestMemoryMmap, dst: &GuestMemoryMmap) -> Result<(), VmError> {
    let (a, b) = (memory_size(src), memory_size(dst));
    if a != b {
        return Err(VmError::Memory(format!(
            "cannot copy {a} bytes of guest memory into {b} bytes"
        )));
    }
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < a {
        let n = (a - off).min(CHUNK as u64) as usize;
        src.read_slice(&mut buf[..n], GuestAddress(off))
            .map_err(|e| VmError::Memory(format!("read at {off:#x}: {e}")))?;
        dst.write_slice(&buf[..n], GuestAddress(off))
            .map_err(|e| VmError::Memory(format!("write at {off:#x}: {e}")))?;
        off += n as u64;
    }
    Ok(())
}

/// Read a little-endian u64 of guest memory.
pub fn read_u64(mem: &GuestMemoryMmap, gpa: u64) -> Result<u64, VmError> {
    mem.read_obj::<u64>(GuestAddress(gpa))
        .map_err(|e| VmError::Memory(format!("read u64 at {gpa:#x}: {e}")))
}

/// Writes one little-endian u64 at guest-physical `gpa`.
pub fn write_u64(mem: &GuestMemoryMmap, gpa: u64, v: u64) -> Result<(), VmError> {
    mem.write_obj(v, GuestAddress(gpa))
        .map_err(|e| VmError::Memory(format!("write u64 at {gpa:#x}: {e}")))
}

pub(crate) fn write_bytes(mem: &GuestMemoryMmap, gpa: u64, bytes: &[u8]) -> Result<(), VmError> {
    mem.write_slice(bytes, GuestAddress(gpa))
        .map_err(|e| VmError::Memory(format!("write {} bytes at {gpa:#x}: {e}", bytes.len())))
}
