//! Error types of the crate. Every fallible public function returns one of these; none
//! of them panics on bad input.

use std::io;

use crate::uffd::Features;

/// Errors from the userfaultfd itself.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// Neither `/dev/userfaultfd` nor the `userfaultfd(2)` syscall is allowed.
    #[error("{0}")]
    PermissionDenied(PermissionHint),
    /// The kernel has no userfaultfd at all, or another open failure.
    #[error("cannot create a userfaultfd: /dev/userfaultfd: {dev}; userfaultfd(2): {syscall}")]
    Open { dev: io::Error, syscall: io::Error },
    /// The kernel does not offer a feature the caller asked for.
    #[error("kernel userfaultfd lacks feature(s) {missing:?} (kernel offers {supported:?}); a newer kernel is needed")]
    MissingFeature {
        missing: Features,
        supported: Features,
    },
    /// Address or length not page aligned, empty, or overflowing.
    #[error("invalid range {addr:#x}+{len:#x}: must be non-empty and 4096-byte aligned")]
    InvalidRange { addr: u64, len: u64 },
    /// Registration succeeded but the kernel does not allow an ioctl we need on the range.
    #[error("range {addr:#x}+{len:#x} does not allow UFFDIO_{ioctl}")]
    IoctlNotAllowed {
        addr: u64,
        len: u64,
        ioctl: &'static str,
    },
    /// A userfaultfd ioctl or read failed.
    #[error("{op} failed: {source}")]
    Sys {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// What the administrator can change so userfaultfd becomes available. Shown verbatim
/// by [`UffdError::PermissionDenied`].
#[derive(Debug)]
pub struct PermissionHint {
    pub dev_error: io::Error,
    pub syscall_error: io::Error,
    /// Mode, uid and gid of /dev/userfaultfd, if it exists.
    pub dev_mode: Option<(u32, u32, u32)>,
    /// Content of /proc/sys/vm/unprivileged_userfaultfd, if readable.
    pub unprivileged_sysctl: Option<String>,
}

impl std::fmt::Display for PermissionHint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "userfaultfd is not permitted for this process \
             (/dev/userfaultfd: {}; userfaultfd(2): {}). Fix one of: ",
            self.dev_error, self.syscall_error
        )?;
        match self.dev_mode {
            Some((mode, uid, gid)) => write!(
                f,
                "(1) grant this user read/write access to /dev/userfaultfd, currently mode {:04o} \
                 owner {uid}:{gid} (e.g. `chgrp kvm /dev/userfaultfd && chmod 0660 /dev/userfaultfd` \
                 and add the user to that group); ",
                mode & 0o7777
            )?,
            None => write!(
                f,
                "(1) /dev/userfaultfd is missing: load/enable it (kernel >= 6.1) and grant this user \
                 read/write access; "
            )?,
        }
        let current = self.unprivileged_sysctl.as_deref().unwrap_or("unknown");
        write!(
            f,
            "(2) `sysctl -w vm.unprivileged_userfaultfd=1` (currently {current}); \
             (3) run with CAP_SYS_PTRACE or as root"
        )
    }
}

/// Errors building guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory length {0} must be a non-zero multiple of 4096")]
    BadLength(usize),
    #[error("memfd name must not contain a NUL byte")]
    BadName,
    #[error("{op} failed: {source}")]
    Sys {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Errors building a [`crate::RegionMap`].
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("region {index} ({addr:#x}+{len:#x}) must be non-empty and 4096-byte aligned")]
    Misaligned {
        index: usize,
        addr: usize,
        len: usize,
    },
    #[error(
        "region {index} ({addr:#x}+{len:#x}) overlaps another region or wraps the address space"
    )]
    Overlap {
        index: usize,
        addr: usize,
        len: usize,
    },
}

/// Errors installing a page. Memory is untouched whenever one is returned for bad input.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("page {page} is out of range (guest has {total} pages)")]
    PageOutOfRange { page: u64, total: u64 },
    #[error("page data is {len} bytes; expected a non-zero multiple of 4096 (exactly 4096 for one page)")]
    BadLength { len: usize },
    #[error("page {page}: kernel kept answering EAGAIN")]
    Busy { page: u64 },
    #[error("page {page}: {source}")]
    Uffd {
        page: u64,
        #[source]
        source: UffdError,
    },
}

/// Errors of the fault loop and of [`crate::Destination`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Uffd(#[from] UffdError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Install(#[from] InstallError),
    #[error("page table has {table} pages but the regions have {regions}")]
    TableSizeMismatch { table: u64, regions: u64 },
    #[error("{op} failed: {source}")]
    Sys {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("fault loop thread panicked")]
    LoopPanicked,
}

/// Errors of source-side dirty tracking ([`crate::dirty`]).
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// No userfaultfd could be opened (the message carries the permission hint).
    #[error("uffd-wp-async dirty tracking unavailable: {0}")]
    Uffd(#[source] UffdError),
    /// The kernel's userfaultfd lacks a feature the async write-protect tracker needs.
    #[error(
        "uffd-wp-async dirty tracking needs userfaultfd feature(s) {missing:?}, which kernel \
         {kernel} does not offer (it offers {supported:?}); WP_UNPOPULATED needs Linux 6.4+ \
         and WP_ASYNC Linux 6.7+"
    )]
    MissingFeature {
        missing: Features,
        supported: Features,
        kernel: String,
    },
    /// `/proc/self/pagemap` cannot be opened or has no `PAGEMAP_SCAN` ioctl.
    #[error("uffd-wp-async dirty tracking needs the PAGEMAP_SCAN ioctl on /proc/self/pagemap (Linux 6.7+); kernel {kernel}: {source}")]
    NoPagemapScan {
        kernel: String,
        #[source]
        source: io::Error,
    },
    /// The range cannot be registered for write-protect tracking (e.g. already
    /// registered with another userfaultfd, or a mapping type userfaultfd refuses).
    #[error("cannot register {addr:#x}+{len:#x} for userfaultfd write-protect: {source}")]
    Register {
        addr: u64,
        len: u64,
        #[source]
        source: UffdError,
    },
    /// PAGEMAP_SCAN met memory in the range that is not registered for async
    /// write-protect (EPERM from `PM_SCAN_CHECK_WPASYNC`): the region was remapped.
    #[error("PAGEMAP_SCAN: {start:#x}..{end:#x} is no longer registered for async write-protect (was the region remapped?)")]
    NotWpAsync { start: u64, end: u64 },
    /// The kernel answered PAGEMAP_SCAN with something impossible; never trusted.
    #[error("PAGEMAP_SCAN of {start:#x}..{end:#x} returned an inconsistent answer: {what}")]
    BadScan { start: u64, end: u64, what: String },
    /// Guest memory could not be read (unmapped or protected).
    #[error("reading guest memory at {addr:#x}+{len:#x} failed: {source}")]
    Read {
        addr: u64,
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("page {page} is out of range (tracking {total} pages)")]
    PageOutOfRange { page: u64, total: u64 },
    #[error("replicated content of page {page} is {len} bytes; expected 4096")]
    BadContentLength { page: u64, len: usize },
    #[error("{op} failed: {source}")]
    Sys {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}
