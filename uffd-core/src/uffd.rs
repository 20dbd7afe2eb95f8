//! Safe owner of one userfaultfd file descriptor.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

use crate::error::{PermissionHint, UffdError};
use crate::sys;
use crate::PAGE_SIZE;

macro_rules! bitmask {
    ($(#[$m:meta])* $name:ident { $($(#[$cm:meta])* $c:ident = $v:expr;)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name(u64);

        impl $name {
            $($(#[$cm])* pub const $c: Self = Self($v);)*

            /// No bit set.
            pub const fn empty() -> Self { Self(0) }
            /// Wraps raw kernel bits as they are, keeping bits this crate has no name for
            /// (`Debug` shows those in hex).
            pub const fn from_bits_retain(bits: u64) -> Self { Self(bits) }
            /// The raw bits, as passed to or received from the kernel.
            pub const fn bits(self) -> u64 { self.0 }
            /// True if every bit of `other` is set in `self` (always true for an empty
            /// `other`).
            pub const fn contains(self, other: Self) -> bool { self.0 & other.0 == other.0 }
            /// True if no bit is set.
            pub const fn is_empty(self) -> bool { self.0 == 0 }
            /// The bits of `self` that are not in `other`, e.g. the features asked for
            /// but not granted.
            pub const fn difference(self, other: Self) -> Self { Self(self.0 & !other.0) }
            /// The bits set in either; a `const` form of `|` for use in constants.
            pub const fn union(self, other: Self) -> Self { Self(self.0 | other.0) }
        }

        impl std::ops::BitOr for $name {
            type Output = Self;
            fn bitor(self, rhs: Self) -> Self { Self(self.0 | rhs.0) }
        }
        impl std::ops::BitOrAssign for $name {
            fn bitor_assign(&mut self, rhs: Self) { self.0 |= rhs.0 }
        }
        impl std::ops::BitAnd for $name {
            type Output = Self;
            fn bitand(self, rhs: Self) -> Self { Self(self.0 & rhs.0) }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let mut rest = self.0;
                let mut first = true;
                write!(f, "{}(", stringify!($name))?;
                $(
                    if $v != 0 && self.0 & $v == $v {
                        if !first { write!(f, " | ")?; }
                        write!(f, "{}", stringify!($c))?;
                        first = false;
                        rest &= !$v;
                    }
                )*
                if rest != 0 {
                    if !first { write!(f, " | ")?; }
                    write!(f, "{rest:#x}")?;
                }
                write!(f, ")")
            }
        }
    };
}

bitmask! {
    /// `UFFD_FEATURE_*` bits negotiated in the UFFDIO_API handshake.
    Features {
        /// Fault messages may carry the write-protect flag ([`FaultFlags::wp`]).
        PAGEFAULT_FLAG_WP = sys::UFFD_FEATURE_PAGEFAULT_FLAG_WP;
        /// fork(2) of the process hands the child's userfaultfd over in a message.
        EVENT_FORK = sys::UFFD_FEATURE_EVENT_FORK;
        /// mremap(2) of a registered range is reported as a message.
        EVENT_REMAP = sys::UFFD_FEATURE_EVENT_REMAP;
        /// MADV_DONTNEED / MADV_REMOVE of a registered range is reported as
        /// [`Event::Remove`], so dropped pages are not fetched.
        EVENT_REMOVE = sys::UFFD_FEATURE_EVENT_REMOVE;
        /// Missing-page registration is allowed on hugetlbfs mappings.
        MISSING_HUGETLBFS = sys::UFFD_FEATURE_MISSING_HUGETLBFS;
        /// Missing-page registration is allowed on shmem (memfd, tmpfs) mappings.
        MISSING_SHMEM = sys::UFFD_FEATURE_MISSING_SHMEM;
        /// munmap(2) of a registered range is reported as a message.
        EVENT_UNMAP = sys::UFFD_FEATURE_EVENT_UNMAP;
        /// Faults raise SIGBUS in the faulting thread instead of queueing a message.
        SIGBUS = sys::UFFD_FEATURE_SIGBUS;
        /// Fault messages carry the faulting thread's id (`thread_id` of
        /// [`Event::PageFault`]).
        THREAD_ID = sys::UFFD_FEATURE_THREAD_ID;
        /// Minor-fault registration (page cached but not mapped) on hugetlbfs.
        MINOR_HUGETLBFS = sys::UFFD_FEATURE_MINOR_HUGETLBFS;
        /// Minor-fault registration (page cached but not mapped) on shmem.
        MINOR_SHMEM = sys::UFFD_FEATURE_MINOR_SHMEM;
        /// Fault addresses are reported exactly instead of rounded down to the page.
        EXACT_ADDRESS = sys::UFFD_FEATURE_EXACT_ADDRESS;
        /// Write-protect registration is allowed on hugetlbfs and shmem mappings.
        WP_HUGETLBFS_SHMEM = sys::UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
        /// Write protection also covers pages never populated, so their first write is
        /// caught too (Linux 6.4+).
        WP_UNPOPULATED = sys::UFFD_FEATURE_WP_UNPOPULATED;
        /// The UFFDIO_POISON ioctl is available (Linux 6.6+).
        POISON = sys::UFFD_FEATURE_POISON;
        /// Write-protect faults are resolved by the kernel without a message: a write
        /// just clears the protection, which `PAGEMAP_SCAN` then reports (Linux 6.7+).
        WP_ASYNC = sys::UFFD_FEATURE_WP_ASYNC;
        /// The UFFDIO_MOVE ioctl is available (Linux 6.8+).
        MOVE = sys::UFFD_FEATURE_MOVE;
    }
}

bitmask! {
    /// Bitmask of ioctls the kernel allows (`1 << _UFFDIO_*`), as returned by
    /// UFFDIO_API and UFFDIO_REGISTER.
    Ioctls {
        /// UFFDIO_REGISTER: register a range.
        REGISTER = 1u64 << sys::_UFFDIO_REGISTER;
        /// UFFDIO_UNREGISTER: unregister a range.
        UNREGISTER = 1u64 << sys::_UFFDIO_UNREGISTER;
        /// UFFDIO_WAKE: wake threads blocked on faults in a range.
        WAKE = 1u64 << sys::_UFFDIO_WAKE;
        /// UFFDIO_COPY: fill missing pages from a buffer.
        COPY = 1u64 << sys::_UFFDIO_COPY;
        /// UFFDIO_ZEROPAGE: fill missing pages with zeros (not on shmem).
        ZEROPAGE = 1u64 << sys::_UFFDIO_ZEROPAGE;
        /// UFFDIO_MOVE: move pages into the range instead of copying them.
        MOVE = 1u64 << sys::_UFFDIO_MOVE;
        /// UFFDIO_WRITEPROTECT: set or clear write protection.
        WRITEPROTECT = 1u64 << sys::_UFFDIO_WRITEPROTECT;
        /// UFFDIO_CONTINUE: map a page already in the page cache (minor faults).
        CONTINUE = 1u64 << sys::_UFFDIO_CONTINUE;
        /// UFFDIO_POISON: make a range raise SIGBUS when touched.
        POISON = 1u64 << sys::_UFFDIO_POISON;
        /// UFFDIO_API: the handshake.
        API = 1u64 << sys::_UFFDIO_API;
    }
}

/// How a UFFDIO_COPY / UFFDIO_ZEROPAGE call ended when it was not a hard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyOutcome {
    /// The whole range was filled.
    Copied,
    /// Nothing was filled: the first page of the range already exists.
    Exists,
    /// `copied` bytes were filled (possibly 0); retry from `dst + copied`. The kernel
    /// stops early when its mm is changing under it, or at a page that exists (then
    /// the retry reports [`CopyOutcome::Exists`]).
    Again,
}

/// Result of a fill ioctl: bytes filled from the start of the range and why it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyResult {
    /// Bytes filled from the start of the range, in whole pages: the full length for
    /// [`CopyOutcome::Copied`], 0 for [`CopyOutcome::Exists`].
    pub copied: usize,
    /// Why the call stopped.
    pub outcome: CopyOutcome,
}

/// Flags of a page fault message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultFlags {
    /// The access was a write (`UFFD_PAGEFAULT_FLAG_WRITE`); false for a read.
    pub write: bool,
    /// The page is write-protected rather than missing (`UFFD_PAGEFAULT_FLAG_WP`).
    pub wp: bool,
    /// A minor fault: the page is in the page cache but not mapped
    /// (`UFFD_PAGEFAULT_FLAG_MINOR`); only on ranges registered for minor faults.
    pub minor: bool,
}

/// A decoded `uffd_msg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// `thread_id` is 0 unless [`Features::THREAD_ID`] was negotiated.
    PageFault {
        /// Host address that faulted, rounded down to its page by the kernel unless
        /// [`Features::EXACT_ADDRESS`] was negotiated (the fault loop does not rely on
        /// either).
        addr: u64,
        /// What kind of access faulted.
        flags: FaultFlags,
        /// Kernel thread id (TID) of the faulting thread, or 0.
        thread_id: u32,
    },
    /// `[start, end)` was dropped with MADV_DONTNEED/MADV_REMOVE.
    Remove {
        /// First host address dropped.
        start: u64,
        /// End of the dropped range (exclusive).
        end: u64,
    },
    /// An event this crate does not act on (fork, remap, unmap, or a future one).
    Other(u8),
}

impl Event {
    /// Decodes one message read from the fd. Never fails: fault flags this crate does
    /// not name are dropped, and unknown event types become [`Event::Other`] with the
    /// raw `UFFD_EVENT_*` code.
    pub fn decode(msg: &sys::UffdMsg) -> Event {
        match msg.event {
            sys::UFFD_EVENT_PAGEFAULT => {
                let (flags, addr, thread_id) = msg.pagefault();
                Event::PageFault {
                    addr,
                    flags: FaultFlags {
                        write: flags & sys::UFFD_PAGEFAULT_FLAG_WRITE != 0,
                        wp: flags & sys::UFFD_PAGEFAULT_FLAG_WP != 0,
                        minor: flags & sys::UFFD_PAGEFAULT_FLAG_MINOR != 0,
                    },
                    thread_id,
                }
            }
            sys::UFFD_EVENT_REMOVE => {
                let (start, end) = msg.remove();
                Event::Remove { start, end }
            }
            other => Event::Other(other),
        }
    }
}

/// An open, API-negotiated userfaultfd.
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
    features: Features,
}

const OPEN_FLAGS: libc::c_int = libc::O_CLOEXEC | libc::O_NONBLOCK;

fn last_err() -> io::Error {
    io::Error::last_os_error()
}

fn is_permission(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
}

fn open_raw() -> Result<OwnedFd, UffdError> {
    let dev_error = match open_via_dev() {
        Ok(fd) => return Ok(fd),
        Err(e) => e,
    };
    // SAFETY: userfaultfd(2) takes one int flags argument and returns a new fd or -1;
    // no memory is passed.
    let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, OPEN_FLAGS) };
    if ret >= 0 {
        // SAFETY: the syscall just returned this fd to us; nothing else owns it.
        return Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) });
    }
    let syscall_error = last_err();
    // A missing device node is not a permission problem by itself; the syscall decides.
    let dev_denied = is_permission(&dev_error) || dev_error.kind() == io::ErrorKind::NotFound;
    if dev_denied && is_permission(&syscall_error) {
        let dev_mode = std::fs::metadata("/dev/userfaultfd")
            .ok()
            .map(|m| (m.mode(), m.uid(), m.gid()));
        let unprivileged_sysctl = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
            .ok()
            .map(|s| s.trim().to_owned());
        return Err(UffdError::PermissionDenied(PermissionHint {
            dev_error,
            syscall_error,
            dev_mode,
            unprivileged_sysctl,
        }));
    }
    Err(UffdError::Open {
        dev: dev_error,
        syscall: syscall_error,
    })
}

fn open_via_dev() -> io::Result<OwnedFd> {
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/userfaultfd")?;
    // SAFETY: USERFAULTFD_IOC_NEW takes the open flags as an integer argument (no
    // pointer) and returns a new fd or -1; `dev` is a valid open fd for the call.
    let ret = unsafe { libc::ioctl(dev.as_raw_fd(), sys::USERFAULTFD_IOC_NEW as _, OPEN_FLAGS) };
    if ret < 0 {
        return Err(last_err());
    }
    // SAFETY: the ioctl just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(ret) })
}

/// UFFDIO_API with `features`; returns the kernel's reply.
fn api(fd: &OwnedFd, features: Features) -> io::Result<sys::uffdio_api> {
    let mut arg = sys::uffdio_api {
        api: sys::UFFD_API,
        features: features.bits(),
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes exactly one uffdio_api, which `arg` is, and
    // it lives for the whole call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), sys::UFFDIO_API as _, &mut arg) };
    if ret < 0 {
        Err(last_err())
    } else {
        Ok(arg)
    }
}

fn check_range(addr: u64, len: u64) -> Result<(), UffdError> {
    let page = PAGE_SIZE as u64;
    if len == 0
        || !addr.is_multiple_of(page)
        || !len.is_multiple_of(page)
        || addr.checked_add(len).is_none()
    {
        return Err(UffdError::InvalidRange { addr, len });
    }
    Ok(())
}

impl Userfaultfd {
    /// Opens a userfaultfd (device first, then the syscall) and negotiates `features`.
    pub fn open(features: Features) -> Result<Userfaultfd, UffdError> {
        let fd = open_raw()?;
        match api(&fd, features) {
            Ok(reply) => {
                let granted = Features::from_bits_retain(reply.features);
                if !granted.contains(features) {
                    return Err(UffdError::MissingFeature {
                        missing: features.difference(granted),
                        supported: granted,
                    });
                }
                Ok(Userfaultfd {
                    fd,
                    features: granted,
                })
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // The kernel refuses the whole request if any bit is unknown, without
                // saying which; the API can be negotiated once per fd, so ask a fresh
                // one with no features for the full list.
                let supported = api(&open_raw()?, Features::empty())
                    .map(|r| Features::from_bits_retain(r.features))
                    .map_err(|source| UffdError::Sys {
                        op: "UFFDIO_API",
                        source,
                    })?;
                let missing = features.difference(supported);
                if missing.is_empty() {
                    return Err(UffdError::Sys {
                        op: "UFFDIO_API",
                        source: e,
                    });
                }
                Err(UffdError::MissingFeature { missing, supported })
            }
            Err(source) => Err(UffdError::Sys {
                op: "UFFDIO_API",
                source,
            }),
        }
    }

    /// Features granted in the handshake.
    pub fn features(&self) -> Features {
        self.features
    }

    /// The fd, e.g. to poll(2) it next to other fds. Still owned by this value: do not
    /// close it or use it after this value is dropped.
    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn ioctl<T>(&self, req: u64, arg: &mut T) -> io::Result<()> {
        // SAFETY: every caller passes the struct type that `req` encodes (the sizes are
        // pinned in `sys`), and `arg` is a live exclusive reference for the whole call.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), req as _, arg as *mut T) };
        if ret < 0 {
            Err(last_err())
        } else {
            Ok(())
        }
    }

    /// Registers `[addr, addr+len)` for missing-page faults. Returns the ioctls the
    /// kernel allows on it (no ZEROPAGE on shmem, for instance).
    pub fn register_missing(&self, addr: u64, len: u64) -> Result<Ioctls, UffdError> {
        self.register(addr, len, sys::UFFDIO_REGISTER_MODE_MISSING)
    }

    /// Registers `[addr, addr+len)` for write-protect tracking
    /// (`UFFDIO_REGISTER_MODE_WP`). With [`Features::WP_ASYNC`] a write to a protected
    /// page just clears the protection, without a message.
    pub fn register_wp(&self, addr: u64, len: u64) -> Result<Ioctls, UffdError> {
        self.register(addr, len, sys::UFFDIO_REGISTER_MODE_WP)
    }

    fn register(&self, addr: u64, len: u64, mode: u64) -> Result<Ioctls, UffdError> {
        check_range(addr, len)?;
        let mut arg = sys::uffdio_register {
            range: sys::uffdio_range { start: addr, len },
            mode,
            ioctls: 0,
        };
        self.ioctl(sys::UFFDIO_REGISTER, &mut arg)
            .map_err(|source| UffdError::Sys {
                op: "UFFDIO_REGISTER",
                source,
            })?;
        Ok(Ioctls::from_bits_retain(arg.ioctls))
    }

    /// Unregisters `[addr, addr+len)` from every mode. Threads blocked on faults there
    /// are woken and fault again without userfaultfd, so they see whatever the memory
    /// holds (zero pages on anonymous memory). A bad range is refused with
    /// [`UffdError::InvalidRange`] before the kernel is asked.
    pub fn unregister(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        check_range(addr, len)?;
        let mut arg = sys::uffdio_range { start: addr, len };
        self.ioctl(sys::UFFDIO_UNREGISTER, &mut arg)
            .map_err(|source| UffdError::Sys {
                op: "UFFDIO_UNREGISTER",
                source,
            })
    }

    /// Sets (`protect`) or clears write protection on `[addr, addr+len)`, which must be
    /// registered with [`Userfaultfd::register_wp`]. Clearing also wakes writers
    /// blocked in synchronous WP mode.
    pub fn writeprotect(&self, addr: u64, len: u64, protect: bool) -> Result<(), UffdError> {
        check_range(addr, len)?;
        let mut arg = sys::uffdio_writeprotect {
            range: sys::uffdio_range { start: addr, len },
            mode: if protect {
                sys::UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                0
            },
        };
        self.ioctl(sys::UFFDIO_WRITEPROTECT, &mut arg)
            .map_err(|source| UffdError::Sys {
                op: "UFFDIO_WRITEPROTECT",
                source,
            })
    }

    /// Wakes threads blocked on faults in `[addr, addr+len)`.
    pub fn wake(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        check_range(addr, len)?;
        let mut arg = sys::uffdio_range { start: addr, len };
        self.ioctl(sys::UFFDIO_WAKE, &mut arg)
            .map_err(|source| UffdError::Sys {
                op: "UFFDIO_WAKE",
                source,
            })
    }

    /// Atomically fills the missing pages `[dst, dst+src.len())` from `src`.
    ///
    /// Safe because the kernel only populates pages that are not mapped yet, so no
    /// existing Rust-visible byte changes; `src` is borrowed for the call.
    pub fn copy(&self, dst: u64, src: &[u8], wake: bool) -> Result<CopyResult, UffdError> {
        let len = src.len() as u64;
        check_range(dst, len)?;
        let mut arg = sys::uffdio_copy {
            dst,
            src: src.as_ptr() as u64,
            len,
            mode: if wake {
                0
            } else {
                sys::UFFDIO_COPY_MODE_DONTWAKE
            },
            copy: 0,
        };
        let res = self.ioctl(sys::UFFDIO_COPY, &mut arg);
        fill_result("UFFDIO_COPY", res, arg.copy, len)
    }

    /// Fills `[dst, dst+len)` with zero pages (anonymous memory only).
    pub fn zeropage(&self, dst: u64, len: u64, wake: bool) -> Result<CopyResult, UffdError> {
        check_range(dst, len)?;
        let mut arg = sys::uffdio_zeropage {
            range: sys::uffdio_range { start: dst, len },
            mode: if wake {
                0
            } else {
                sys::UFFDIO_ZEROPAGE_MODE_DONTWAKE
            },
            zeropage: 0,
        };
        let res = self.ioctl(sys::UFFDIO_ZEROPAGE, &mut arg);
        fill_result("UFFDIO_ZEROPAGE", res, arg.zeropage, len)
    }

    /// Reads as many messages as fit in `buf` with one read(2). Returns 0 when none is
    /// pending.
    pub fn read_messages(&self, buf: &mut [sys::UffdMsg]) -> Result<usize, UffdError> {
        if buf.is_empty() {
            return Ok(0);
        }
        let bytes = std::mem::size_of_val(buf);
        loop {
            // SAFETY: `buf` is an exclusive slice of `bytes` bytes of plain-integer
            // structs, so any bytes the kernel writes form valid values.
            let ret = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), bytes) };
            if ret >= 0 {
                return Ok(ret as usize / std::mem::size_of::<sys::UffdMsg>());
            }
            let e = last_err();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(0),
                _ => {
                    return Err(UffdError::Sys {
                        op: "read(userfaultfd)",
                        source: e,
                    })
                }
            }
        }
    }
}

impl AsRawFd for Userfaultfd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Userfaultfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Maps the kernel's (return value, progress field) pair of a fill ioctl to data.
fn fill_result(
    op: &'static str,
    res: io::Result<()>,
    progress: i64,
    len: u64,
) -> Result<CopyResult, UffdError> {
    match res {
        Ok(()) => Ok(CopyResult {
            copied: len as usize,
            outcome: CopyOutcome::Copied,
        }),
        Err(e) => {
            let copied = if progress > 0 { progress as usize } else { 0 };
            match e.raw_os_error() {
                Some(libc::EEXIST) if copied == 0 => Ok(CopyResult {
                    copied,
                    outcome: CopyOutcome::Exists,
                }),
                // A partial fill is reported as EAGAIN with a positive progress field.
                Some(libc::EAGAIN) | Some(libc::EEXIST) => Ok(CopyResult {
                    copied,
                    outcome: CopyOutcome::Again,
                }),
                _ => Err(UffdError::Sys { op, source: e }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_debug_and_ops() {
        let f = Features::EVENT_REMOVE | Features::MISSING_SHMEM;
        assert!(f.contains(Features::EVENT_REMOVE));
        assert!(!f.contains(Features::MOVE));
        assert_eq!(format!("{f:?}"), "Features(EVENT_REMOVE | MISSING_SHMEM)");
        assert_eq!(
            format!("{:?}", Features::from_bits_retain(1 << 40)),
            "Features(0x10000000000)"
        );
        assert_eq!(
            f.difference(Features::EVENT_REMOVE),
            Features::MISSING_SHMEM
        );
    }

    #[test]
    fn decode_events() {
        let mut m = sys::UffdMsg {
            event: sys::UFFD_EVENT_REMOVE,
            ..Default::default()
        };
        m.arg = [0x1000, 0x3000, 0];
        assert_eq!(
            Event::decode(&m),
            Event::Remove {
                start: 0x1000,
                end: 0x3000
            }
        );
        m.event = sys::UFFD_EVENT_PAGEFAULT;
        m.arg = [
            sys::UFFD_PAGEFAULT_FLAG_WRITE | sys::UFFD_PAGEFAULT_FLAG_MINOR,
            0x5000,
            0,
        ];
        assert_eq!(
            Event::decode(&m),
            Event::PageFault {
                addr: 0x5000,
                flags: FaultFlags {
                    write: true,
                    wp: false,
                    minor: true
                },
                thread_id: 0
            }
        );
        m.event = 0xEE;
        assert_eq!(Event::decode(&m), Event::Other(0xEE));
    }

    #[test]
    fn fill_result_mapping() {
        let err = |n| Err(io::Error::from_raw_os_error(n));
        let r = fill_result("x", Ok(()), 8192, 8192).unwrap();
        assert_eq!((r.copied, r.outcome), (8192, CopyOutcome::Copied));
        let r = fill_result("x", err(libc::EEXIST), -(libc::EEXIST as i64), 8192).unwrap();
        assert_eq!((r.copied, r.outcome), (0, CopyOutcome::Exists));
        let r = fill_result("x", err(libc::EAGAIN), 4096, 8192).unwrap();
        assert_eq!((r.copied, r.outcome), (4096, CopyOutcome::Again));
        let r = fill_result("x", err(libc::EAGAIN), -(libc::EAGAIN as i64), 8192).unwrap();
        assert_eq!((r.copied, r.outcome), (0, CopyOutcome::Again));
        assert!(fill_result("x", err(libc::ENOENT), -2, 8192).is_err());
    }

    #[test]
    fn open_negotiates_and_reads_nothing() {
        let uffd = Userfaultfd::open(Features::EVENT_REMOVE | Features::MISSING_SHMEM).unwrap();
        assert!(uffd.features().contains(Features::EVENT_REMOVE));
        let mut buf = [sys::UffdMsg::default(); 4];
        assert_eq!(uffd.read_messages(&mut buf).unwrap(), 0);
    }

    #[test]
    fn unknown_feature_is_reported_as_missing() {
        let bogus = Features::from_bits_retain(1 << 62);
        match Userfaultfd::open(Features::EVENT_REMOVE | bogus) {
            Err(UffdError::MissingFeature { missing, supported }) => {
                assert_eq!(missing, bogus);
                assert!(supported.contains(Features::EVENT_REMOVE));
            }
            other => panic!("expected MissingFeature, got {other:?}"),
        }
    }

    #[test]
    fn bad_ranges_are_rejected_before_the_kernel() {
        let uffd = Userfaultfd::open(Features::empty()).unwrap();
        assert!(matches!(
            uffd.register_missing(0x1001, 4096),
            Err(UffdError::InvalidRange { .. })
        ));
        assert!(matches!(
            uffd.wake(0x1000, 0),
            Err(UffdError::InvalidRange { .. })
        ));
        assert!(matches!(
            uffd.zeropage(u64::MAX - 4095, 8192, true),
            Err(UffdError::InvalidRange { .. })
        ));
    }

    #[test]
    fn register_copy_exists_zeropage() {
        let mem = crate::GuestMemory::anonymous(4 * PAGE_SIZE).unwrap();
        let base = mem.as_ptr() as u64;
        let uffd = Userfaultfd::open(Features::EVENT_REMOVE).unwrap();
        let ioctls = uffd.register_missing(base, mem.len() as u64).unwrap();
        assert!(ioctls.contains(Ioctls::COPY | Ioctls::ZEROPAGE | Ioctls::WAKE));
        let src = vec![0xA5u8; 2 * PAGE_SIZE];
        let r = uffd.copy(base, &src, true).unwrap();
        assert_eq!((r.copied, r.outcome), (2 * PAGE_SIZE, CopyOutcome::Copied));
        let r = uffd.copy(base, &src[..PAGE_SIZE], true).unwrap();
        assert_eq!(r.outcome, CopyOutcome::Exists);
        let r = uffd
            .zeropage(base + 2 * PAGE_SIZE as u64, PAGE_SIZE as u64, true)
            .unwrap();
        assert_eq!(r.outcome, CopyOutcome::Copied);
        let r = uffd
            .copy(base + 3 * PAGE_SIZE as u64, &src[..PAGE_SIZE], true)
            .unwrap();
        assert_eq!(r.outcome, CopyOutcome::Copied);
        // SAFETY: the 4 pages are mapped and now populated, so reading never faults.
        let bytes = unsafe { std::slice::from_raw_parts(mem.as_ptr(), mem.len()) };
        assert!(bytes[..2 * PAGE_SIZE].iter().all(|&b| b == 0xA5));
        assert!(bytes[2 * PAGE_SIZE..3 * PAGE_SIZE].iter().all(|&b| b == 0));
        uffd.unregister(base, mem.len() as u64).unwrap();
    }

    #[test]
    fn partial_copy_is_reported_as_again_with_progress() {
        let mem = crate::GuestMemory::anonymous(3 * PAGE_SIZE).unwrap();
        let base = mem.as_ptr() as u64;
        let uffd = Userfaultfd::open(Features::empty()).unwrap();
        uffd.register_missing(base, mem.len() as u64).unwrap();
        let src = vec![7u8; 3 * PAGE_SIZE];
        uffd.zeropage(base + PAGE_SIZE as u64, PAGE_SIZE as u64, true)
            .unwrap();
        let r = uffd.copy(base, &src, true).unwrap();
        assert_eq!((r.copied, r.outcome), (PAGE_SIZE, CopyOutcome::Again));
    }

    #[test]
    fn permission_hint_says_what_to_change() {
        let hint = PermissionHint {
            dev_error: io::Error::from_raw_os_error(libc::EACCES),
            syscall_error: io::Error::from_raw_os_error(libc::EPERM),
            dev_mode: Some((0o20600, 0, 0)),
            unprivileged_sysctl: Some("0".into()),
        };
        let s = UffdError::PermissionDenied(hint).to_string();
        assert!(s.contains("mode 0600"), "{s}");
        assert!(s.contains("chmod"), "{s}");
        assert!(s.contains("sysctl -w vm.unprivileged_userfaultfd=1"), "{s}");
        assert!(s.contains("currently 0"), "{s}");
        assert!(s.contains("CAP_SYS_PTRACE"), "{s}");
    }
}
