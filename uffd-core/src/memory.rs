//! Guest RAM backing: one mmap'ed range, anonymous or memfd-backed.
//!
//! Only raw pointers are handed out: vCPU and worker threads touch guest memory
//! concurrently and the kernel fills it behind our back, so a `&mut [u8]` would be a lie.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use crate::error::MemoryError;
use crate::layout::{HostRegion, MappedMemory};
use crate::PAGE_SIZE;

/// What backs a [`GuestMemory`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryKind {
    /// Private anonymous memory.
    Anonymous,
    /// A shared mapping of a memfd (shmem).
    Memfd,
}

/// Guest RAM: one mapping, unmapped when the last clone of this handle and the last
/// [`HostRegion`] made from it are dropped.
#[derive(Debug, Clone)]
pub struct GuestMemory {
    map: Arc<Mapping>,
    file: Option<Arc<File>>,
}

/// The mapping itself, shared by every clone of a [`GuestMemory`] and its regions.
#[derive(Debug)]
struct Mapping {
    addr: usize,
    len: usize,
    kind: MemoryKind,
    /// The memfd a [`MemoryKind::Memfd`] mapping maps from offset 0.
    file: Option<Arc<File>>,
}

// SAFETY: `Mapping` maps its range in `map` below and unmaps it only in `drop`; nothing
// else can unmap or move it (the address is private). Both methods return fixed fields.
unsafe impl MappedMemory for Mapping {
    fn as_ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    fn size(&self) -> usize {
        self.len
    }

    fn is_shared(&self) -> bool {
        self.kind == MemoryKind::Memfd
    }

    fn backing_file(&self) -> Option<(std::os::fd::BorrowedFd<'_>, u64)> {
        use std::os::fd::AsFd;
        self.file.as_ref().map(|f| (f.as_fd(), 0))
    }
}

fn check_len(len: usize) -> Result<(), MemoryError> {
    if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
        return Err(MemoryError::BadLength(len));
    }
    Ok(())
}

fn map(len: usize, flags: libc::c_int, fd: libc::c_int) -> Result<usize, MemoryError> {
    // SAFETY: a fresh mapping at a kernel-chosen address cannot overlap memory Rust
    // already uses; the arguments are plain values.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(MemoryError::Sys {
            op: "mmap",
            source: io::Error::last_os_error(),
        });
    }
    Ok(ptr as usize)
}

impl GuestMemory {
    /// Private anonymous memory; NORESERVE because postcopy fills it lazily and most of
    /// a large guest may never be touched on this host.
    pub fn anonymous(len: usize) -> Result<GuestMemory, MemoryError> {
        check_len(len)?;
        let addr = map(
            len,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
        )?;
        Ok(GuestMemory {
            map: Arc::new(Mapping {
                addr,
                len,
                kind: MemoryKind::Anonymous,
                file: None,
            }),
            file: None,
        })
    }

    /// A memfd of `len` bytes mapped shared; the file is kept so callers can hand its
    /// fd to a VMM or punch holes in it.
    pub fn memfd(name: &str, len: usize) -> Result<GuestMemory, MemoryError> {
        check_len(len)?;
        let cname = CString::new(name).map_err(|_| MemoryError::BadName)?;
        // SAFETY: `cname` is a valid NUL-terminated string for the call.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::Sys {
                op: "memfd_create",
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: memfd_create just returned this fd; the File becomes its only owner.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64)
            .map_err(|source| MemoryError::Sys {
                op: "ftruncate",
                source,
            })?;
        let addr = map(len, libc::MAP_SHARED, file.as_raw_fd())?;
        let file = Arc::new(file);
        Ok(GuestMemory {
            map: Arc::new(Mapping {
                addr,
                len,
                kind: MemoryKind::Memfd,
                file: Some(file.clone()),
            }),
            file: Some(file),
        })
    }

    /// The start of guest memory. Only a raw pointer: the kernel and other threads write
    /// it concurrently, so no reference into it is ever handed out.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.map.len
    }

    /// Never true (zero-length memory is refused); here for API completeness.
    pub fn is_empty(&self) -> bool {
        self.map.len == 0
    }

    /// The memfd behind memfd-backed memory (to hand its fd to a VMM or punch holes).
    pub fn file(&self) -> Option<&File> {
        self.file.as_deref()
    }

    /// What backs the memory.
    pub fn kind(&self) -> MemoryKind {
        self.map.kind
    }

    /// The region descriptor for a [`crate::RegionMap`]; it keeps the memory mapped.
    pub fn host_region(&self) -> HostRegion {
        HostRegion::new(self.map.clone())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: (addr, len) is exactly the mapping `map` created for this value, which
        // is dropped once no GuestMemory or HostRegion refers to it; no Rust reference into
        // the range exists (only raw pointers are handed out).
        unsafe {
            libc::munmap(self.addr as *mut libc::c_void, self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_lengths() {
        assert!(matches!(
            GuestMemory::anonymous(0),
            Err(MemoryError::BadLength(0))
        ));
        assert!(matches!(
            GuestMemory::anonymous(4097),
            Err(MemoryError::BadLength(4097))
        ));
        assert!(matches!(
            GuestMemory::memfd("x", 100),
            Err(MemoryError::BadLength(100))
        ));
        assert!(matches!(
            GuestMemory::memfd("a\0b", 4096),
            Err(MemoryError::BadName)
        ));
    }

    #[test]
    fn kinds_and_files() {
        let a = GuestMemory::anonymous(8192).unwrap();
        assert_eq!(a.kind(), MemoryKind::Anonymous);
        assert!(a.file().is_none());
        assert_eq!(a.as_ptr() as usize % PAGE_SIZE, 0);
        let m = GuestMemory::memfd("guest", 8192).unwrap();
        assert_eq!(m.kind(), MemoryKind::Memfd);
        assert_eq!(m.file().unwrap().metadata().unwrap().len(), 8192);
        assert!(m.host_region().is_shmem());
        // SAFETY: the mapping is 8192 bytes, readable and writable, and unregistered.
        unsafe {
            m.as_ptr().add(4096).write(9);
            assert_eq!(m.as_ptr().add(4096).read(), 9);
        }
    }

    #[test]
    fn a_region_keeps_its_memory_mapped_after_the_handle_is_dropped() {
        let m = GuestMemory::memfd("kept", 8192).unwrap();
        // SAFETY: the mapping is live, readable and writable, and unregistered.
        unsafe { m.as_ptr().write(42) };
        let region = m.host_region();
        drop(m);
        // SAFETY: `region` keeps the mapping alive: the byte is still there to read.
        let byte = unsafe { (region.host_addr() as *const u8).read() };
        assert_eq!(byte, 42);
    }
}
