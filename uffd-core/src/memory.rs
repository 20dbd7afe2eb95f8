//! Guest RAM backing: one mmap'ed range, anonymous or memfd-backed.
//!
//! Only raw pointers are handed out: vCPU and worker threads touch guest memory
//! concurrently and the kernel fills it behind our back, so a `&mut [u8]` would be a lie.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

use crate::error::MemoryError;
use crate::layout::HostRegion;
use crate::PAGE_SIZE;

/// What backs a [`GuestMemory`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryKind {
    /// Private anonymous memory.
    Anonymous,
    /// A shared mapping of a memfd (shmem).
    Memfd,
}

/// An owned mapping of guest RAM, unmapped on drop.
#[derive(Debug)]
pub struct GuestMemory {
    addr: usize,
    len: usize,
    kind: MemoryKind,
    file: Option<File>,
}

// SAFETY: GuestMemory only owns the mapping's address range and an fd; it never creates
// references into the mapping, so sharing or moving it between threads cannot create
// data races by itself. Whoever dereferences `as_ptr()` owns that synchronisation.
unsafe impl Send for GuestMemory {}
// SAFETY: see Send; all methods take &self and only read immutable fields.
unsafe impl Sync for GuestMemory {}

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
            addr,
            len,
            kind: MemoryKind::Anonymous,
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
        Ok(GuestMemory {
            addr,
            len,
            kind: MemoryKind::Memfd,
            file: Some(file),
        })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true (zero-length memory is refused); here for API completeness.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn file(&self) -> Option<&File> {
        self.file.as_ref()
    }

    pub fn kind(&self) -> MemoryKind {
        self.kind
    }

    /// The region descriptor for a [`crate::RegionMap`].
    pub fn host_region(&self) -> HostRegion {
        HostRegion::new(self.as_ptr(), self.len, self.kind == MemoryKind::Memfd)
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: (addr, len) is exactly the mapping this value created and owns; no
        // reference into it can outlive self because none is ever handed out.
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
        assert!(m.host_region().shmem);
        // SAFETY: the mapping is 8192 bytes, readable and writable, and unregistered.
        unsafe {
            m.as_ptr().add(4096).write(9);
            assert_eq!(m.as_ptr().add(4096).read(), 9);
        }
    }
}
