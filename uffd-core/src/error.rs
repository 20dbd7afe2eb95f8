//! Error types of the crate. Every fallible public function returns one of these; none
//! of them panics on bad input.
//!
//! An error's `Display` says what failed and leaves out its [`source`](std::error::Error::source),
//! which an error chain prints next (`anyhow`'s `{:#}`, or [`chain`] for logs and for errors
//! turned into text), so that no cause is printed twice.

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
    Open {
        /// Why opening `/dev/userfaultfd` (or its `USERFAULTFD_IOC_NEW` ioctl) failed.
        dev: io::Error,
        /// Why the `userfaultfd(2)` syscall, tried second, failed.
        syscall: io::Error,
    },
    /// The kernel does not offer a feature the caller asked for.
    #[error("kernel userfaultfd lacks feature(s) {missing:?} (kernel offers {supported:?}); a newer kernel is needed")]
    MissingFeature {
        /// Requested features the kernel did not grant.
        missing: Features,
        /// Every feature the kernel offers, to tell how far off it is.
        supported: Features,
    },
    /// Address or length not page aligned, empty, or overflowing.
    #[error("invalid range {addr:#x}+{len:#x}: must be non-empty and 4096-byte aligned")]
    InvalidRange {
        /// Start address of the rejected range, in bytes.
        addr: u64,
        /// Length of the rejected range, in bytes.
        len: u64,
    },
    /// Registration succeeded but the kernel does not allow an ioctl we need on the range.
    #[error("range {addr:#x}+{len:#x} does not allow UFFDIO_{ioctl}")]
    IoctlNotAllowed {
        /// Start address of the registered range.
        addr: u64,
        /// Length of the registered range, in bytes.
        len: u64,
        /// The missing ioctl, without the `UFFDIO_` prefix (e.g. `"COPY"`).
        ioctl: &'static str,
    },
    /// A userfaultfd ioctl or read failed.
    #[error("{op} failed")]
    Sys {
        /// The operation that failed, e.g. `"UFFDIO_REGISTER"` or `"read(userfaultfd)"`.
        op: &'static str,
        /// The OS error it returned.
        #[source]
        source: io::Error,
    },
}

/// What the administrator can change so userfaultfd becomes available. Shown verbatim
/// by [`UffdError::PermissionDenied`].
#[derive(Debug)]
pub struct PermissionHint {
    /// Why opening `/dev/userfaultfd` failed (EACCES/EPERM, or not found).
    pub dev_error: io::Error,
    /// Why the `userfaultfd(2)` syscall failed (EPERM/EACCES).
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
    /// The requested length in bytes is 0 or not a multiple of [`crate::PAGE_SIZE`].
    #[error("guest memory length {0} must be a non-zero multiple of 4096")]
    BadLength(usize),
    /// The memfd name has an interior NUL, so it cannot be passed to `memfd_create`.
    #[error("memfd name must not contain a NUL byte")]
    BadName,
    /// `mmap`, `memfd_create` or `ftruncate` failed (e.g. out of address space or
    /// memory).
    #[error("{op} failed")]
    Sys {
        /// The system call that failed.
        op: &'static str,
        /// The OS error it returned.
        #[source]
        source: io::Error,
    },
}

/// Errors building a [`crate::RegionMap`].
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// A region is empty, or its start or length is not a multiple of
    /// [`crate::PAGE_SIZE`].
    #[error("region {index} ({addr:#x}+{len:#x}) must be non-empty and 4096-byte aligned")]
    Misaligned {
        /// Position of the region in the list given.
        index: usize,
        /// Its host start address.
        addr: usize,
        /// Its length in bytes.
        len: usize,
    },
    /// A region overlaps another one, or `addr + len` wraps past the end of the address
    /// space. Of two overlapping regions, the one at the higher address is named.
    #[error(
        "region {index} ({addr:#x}+{len:#x}) overlaps another region or wraps the address space"
    )]
    Overlap {
        /// Position of the region in the list given.
        index: usize,
        /// Its host start address.
        addr: usize,
        /// Its length in bytes.
        len: usize,
    },
}

/// Errors installing a page. Memory is untouched whenever one is returned for bad input.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The page (or the last page of a run) is past the end of guest memory.
    #[error("page {page} is out of range (guest has {total} pages)")]
    PageOutOfRange {
        /// The offending global page index.
        page: u64,
        /// Pages the guest has; valid indices are `0..total`.
        total: u64,
    },
    /// The data is not exactly one page ([`crate::Installer::install`]) or not a
    /// non-zero multiple of a page ([`crate::Installer::install_run`]).
    #[error("page data is {len} bytes; expected a non-zero multiple of 4096 (exactly 4096 for one page)")]
    BadLength {
        /// Length of the data given, in bytes.
        len: usize,
    },
    /// The fill ioctl kept answering EAGAIN (about a second of retries), which means a
    /// userfaultfd event stays unread: the fault loop is stuck or gone. The page may
    /// be retried later.
    #[error("page {page}: kernel kept answering EAGAIN")]
    Busy {
        /// The page that could not be filled.
        page: u64,
    },
    /// The fill ioctl (or the wake after it) failed for another reason.
    #[error("installing page {page} failed")]
    Uffd {
        /// The page being filled (the first page of the ioctl's range for a run).
        page: u64,
        /// What the userfaultfd reported.
        #[source]
        source: UffdError,
    },
}

/// Errors of the fault loop and of [`crate::Destination`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening, registering, reading or unregistering the userfaultfd failed.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// The regions given do not form a valid [`crate::RegionMap`].
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// Installing a page failed.
    #[error(transparent)]
    Install(#[from] InstallError),
    /// [`crate::Destination::register_with_table`] got a table whose size differs from
    /// the pages of the regions; nothing was registered.
    #[error("page table has {table} pages but the regions have {regions}")]
    TableSizeMismatch {
        /// Pages in the table given.
        table: u64,
        /// Pages in the regions given.
        regions: u64,
    },
    /// A system call of the fault loop itself failed (eventfd, poll, thread spawn, the
    /// stop signal).
    #[error("{op} failed")]
    Sys {
        /// The operation that failed.
        op: &'static str,
        /// The OS error it returned.
        #[source]
        source: io::Error,
    },
    /// The fault loop thread panicked; faults in the registered memory are no longer
    /// served.
    #[error("fault loop thread panicked")]
    LoopPanicked,
}

/// Errors of source-side dirty tracking ([`crate::dirty`]).
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// The regions given are not a valid layout (misaligned or overlapping); bad input,
    /// so [`crate::TrackerChoice::Auto`] does not fall back to hashing on it.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// No userfaultfd could be opened (the source carries the permission hint).
    #[error("uffd-wp-async dirty tracking unavailable")]
    Uffd(#[source] UffdError),
    /// The kernel's userfaultfd lacks a feature the async write-protect tracker needs.
    #[error(
        "uffd-wp-async dirty tracking needs userfaultfd feature(s) {missing:?}, which kernel \
         {kernel} does not offer (it offers {supported:?}); WP_UNPOPULATED needs Linux 6.4+ \
         and WP_ASYNC Linux 6.7+"
    )]
    MissingFeature {
        /// Needed features the kernel did not grant.
        missing: Features,
        /// Every feature the kernel offers.
        supported: Features,
        /// The running kernel's release string (`/proc/sys/kernel/osrelease`).
        kernel: String,
    },
    /// `/proc/self/pagemap` cannot be opened or has no `PAGEMAP_SCAN` ioctl.
    #[error("uffd-wp-async dirty tracking needs the PAGEMAP_SCAN ioctl on /proc/self/pagemap (Linux 6.7+); kernel {kernel}")]
    NoPagemapScan {
        /// The running kernel's release string.
        kernel: String,
        /// The open error, or ENOTTY from the ioctl.
        #[source]
        source: io::Error,
    },
    /// The range cannot be registered for write-protect tracking (e.g. already
    /// registered with another userfaultfd, or a mapping type userfaultfd refuses).
    #[error("cannot register {addr:#x}+{len:#x} for userfaultfd write-protect")]
    Register {
        /// Start address of the region.
        addr: u64,
        /// Length of the region, in bytes.
        len: u64,
        /// The failing register or write-protect call's error.
        #[source]
        source: UffdError,
    },
    /// PAGEMAP_SCAN met memory in the range that is not registered for async
    /// write-protect (EPERM from `PM_SCAN_CHECK_WPASYNC`): the region was remapped.
    #[error("PAGEMAP_SCAN: {start:#x}..{end:#x} is no longer registered for async write-protect (was the region remapped?)")]
    NotWpAsync {
        /// Where the refused `PAGEMAP_SCAN` call started (the walk may have got past
        /// the start of the range before).
        start: u64,
        /// End address (exclusive) of the scanned range.
        end: u64,
    },
    /// The kernel answered PAGEMAP_SCAN with something impossible; never trusted.
    #[error("PAGEMAP_SCAN of {start:#x}..{end:#x} returned an inconsistent answer: {what}")]
    BadScan {
        /// Start address of the scanned range.
        start: u64,
        /// End address (exclusive) of the scanned range.
        end: u64,
        /// What was inconsistent: a run outside the range or misaligned, or a
        /// `walk_end` that does not advance.
        what: String,
    },
    /// Guest memory could not be read (unmapped or protected).
    #[error("reading guest memory at {addr:#x}+{len:#x} failed")]
    Read {
        /// Start address of the read.
        addr: u64,
        /// Bytes asked for.
        len: usize,
        /// The error from `process_vm_readv` (e.g. EFAULT), or `UnexpectedEof` for a
        /// short read.
        #[source]
        source: io::Error,
    },
    /// [`crate::DirtyTracker::replicated`] was given a page past the tracked ones.
    #[error("page {page} is out of range (tracking {total} pages)")]
    PageOutOfRange {
        /// The offending global page index.
        page: u64,
        /// Pages tracked; valid indices are `0..total`.
        total: u64,
    },
    /// [`crate::DirtyTracker::replicated`] was given content that is not one page.
    #[error("replicated content of page {page} is {len} bytes; expected 4096")]
    BadContentLength {
        /// The page the content was for.
        page: u64,
        /// Length of the content given, in bytes.
        len: usize,
    },
    /// `PAGEMAP_SCAN` failed with an error other than the ones above.
    #[error("{op} failed")]
    Sys {
        /// The operation that failed.
        op: &'static str,
        /// The OS error it returned.
        #[source]
        source: io::Error,
    },
}

/// An error and all its sources, `: `-separated, as `anyhow`'s `{:#}` prints them.
///
/// An error's own `Display` leaves its source out (the chain prints it once), so this is what
/// to log or to turn into text wherever the whole error would otherwise be lost: a `tracing`
/// field (`error = %chain(&e)`), a message for a peer, an error that holds a `String`.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `e`'s own message does not hold `cause`; its chain holds it exactly once.
    fn cause_once(e: &(dyn std::error::Error + 'static), cause: &str) {
        let (own, all) = (e.to_string(), chain(e));
        assert!(!own.contains(cause), "{own:?} repeats its source {cause:?}");
        assert_eq!(all.matches(cause).count(), 1, "{all:?}");
    }

    fn os(code: i32) -> (io::Error, String) {
        let e = io::Error::from_raw_os_error(code);
        let text = e.to_string();
        (e, text)
    }

    #[test]
    fn display_leaves_the_source_to_the_chain() {
        let (source, text) = os(libc::EEXIST);
        let e = UffdError::Sys {
            op: "UFFDIO_COPY",
            source,
        };
        assert_eq!(e.to_string(), "UFFDIO_COPY failed");
        cause_once(&e, &text);

        // Nested: the chain prints every level once, outermost first.
        let e = Error::Install(InstallError::Uffd { page: 7, source: e });
        assert_eq!(
            chain(&e),
            format!("installing page 7 failed: UFFDIO_COPY failed: {text}")
        );
        cause_once(&e, &text);

        let (source, text) = os(libc::ENOMEM);
        cause_once(&MemoryError::Sys { op: "mmap", source }, &text);

        let (source, text) = os(libc::ENOTTY);
        cause_once(
            &DirtyError::NoPagemapScan {
                kernel: "6.6.1".into(),
                source,
            },
            &text,
        );

        let (source, text) = os(libc::ENOSPC);
        cause_once(
            &crate::ReplicaError::Io {
                op: "pwrite",
                path: "/r/mem".into(),
                source,
            },
            &text,
        );
    }

    #[test]
    fn chain_of_an_error_without_source_is_its_message() {
        let e = MemoryError::BadLength(3);
        assert_eq!(chain(&e), e.to_string());
    }
}
