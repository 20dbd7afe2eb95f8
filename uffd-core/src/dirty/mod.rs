//! Source-side dirty tracking: which guest pages were written since the last harvest,
//! so the replicator sends only those to the standby.
//!
//! Two implementations sit behind [`DirtyTracker`]:
//! - [`WpAsyncTracker`]: userfaultfd async write-protect + `PAGEMAP_SCAN` (Linux 6.7+).
//!   Cost is proportional to the page tables walked, not to memory size in bytes.
//! - [`HashTracker`]: an xxh3-64 per page, compared at every harvest. Works anywhere,
//!   but reads all tracked memory at every harvest.
//!
//! [`open_tracker`] picks one. Trackers never own the memory: the caller keeps the
//! regions mapped for the tracker's lifetime (see each tracker for what happens if not).

mod hash;
mod pagemap;
mod wp_async;

pub use hash::HashTracker;
pub use pagemap::DEFAULT_SCAN_CAPACITY;
pub use wp_async::{WpAsyncTracker, WP_ASYNC_FEATURES};

use crate::error::DirtyError;
use crate::layout::HostRegion;

/// Source of "pages that changed since the last harvest".
///
/// Pages are global indices over the tracked regions in the order given (as in
/// [`crate::RegionMap`]), 4 KiB each.
///
/// Replication protocol the trackers are built for: call [`DirtyTracker::harvest`], then
/// read and send every reported page (reading *after* `harvest` returns), then
/// optionally tell the tracker what was sent with [`DirtyTracker::replicated`]. Under that
/// protocol, once writers stop, a final harvest plus its sends leaves the standby equal
/// to the source byte for byte.
pub trait DirtyTracker: Send {
    /// Replaces the contents of `out` with the pages written since the previous harvest
    /// (every page on the first call: the standby has nothing yet), in ascending order,
    /// and re-arms tracking for them. A write that races with the harvest is reported
    /// by this harvest or by the next one, never lost. If an error is returned, the
    /// next successful harvest reports every page again, so nothing is lost either.
    fn harvest(&mut self, out: &mut Vec<u64>) -> Result<(), DirtyError>;

    /// Short name for reports ("uffd-wp-async", "content-hash", ...).
    fn kind(&self) -> &'static str;

    /// Tells the tracker the exact bytes of `page` that were sent after the latest
    /// harvest. Trackers that detect writes ignore it (the default); trackers that
    /// compare content ([`HashTracker`]) compare the next harvest against these bytes,
    /// which closes the A→B→A hole described there.
    fn replicated(&mut self, page: u64, content: &[u8]) -> Result<(), DirtyError> {
        let _ = (page, content);
        Ok(())
    }
}

/// Which tracker [`open_tracker`] should build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TrackerChoice {
    /// uffd-wp-async if the kernel supports it, else content hashing (with a warning).
    #[default]
    Auto,
    /// uffd-wp-async or an error saying what is missing.
    WpAsync,
    /// Content hashing.
    Hash,
}

/// Builds a tracker over `regions`. The regions must stay mapped while it lives.
pub fn open_tracker(
    regions: &[HostRegion],
    prefer: TrackerChoice,
) -> Result<Box<dyn DirtyTracker>, DirtyError> {
    match prefer {
        TrackerChoice::WpAsync => Ok(Box::new(WpAsyncTracker::new(regions)?)),
        TrackerChoice::Hash => Ok(Box::new(HashTracker::new(regions)?)),
        TrackerChoice::Auto => match WpAsyncTracker::new(regions) {
            Ok(t) => Ok(Box::new(t)),
            // Bad input is not a kernel limitation; hashing would not help.
            Err(e @ DirtyError::Layout(_)) => Err(e),
            Err(e) => {
                tracing::warn!(
                    reason = %crate::error::chain(&e),
                    "uffd-wp-async dirty tracking unavailable; falling back to content \
                     hashing, which reads all guest memory at every harvest"
                );
                Ok(Box::new(HashTracker::new(regions)?))
            }
        },
    }
}

/// The running kernel's release string, for error messages.
pub(crate) fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "of unknown version".to_owned())
}

/// First global page of each region.
pub(crate) fn first_pages(regions: &[HostRegion]) -> Vec<u64> {
    regions
        .iter()
        .scan(0u64, |next, r| {
            let first = *next;
            *next += r.pages();
            Some(first)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{PermissionHint, UffdError};
    use crate::uffd::Features;

    #[test]
    fn unavailable_wp_async_says_what_is_missing() {
        let e = DirtyError::MissingFeature {
            missing: Features::WP_ASYNC,
            supported: Features::WP_UNPOPULATED,
            kernel: "6.1.0".into(),
        };
        let s = e.to_string();
        assert!(s.contains("Features(WP_ASYNC)"), "{s}");
        assert!(s.contains("6.1.0") && s.contains("Linux 6.7+"), "{s}");

        let e = DirtyError::NoPagemapScan {
            kernel: "6.6.1".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOTTY),
        };
        let s = e.to_string();
        assert!(
            s.contains("PAGEMAP_SCAN") && s.contains("Linux 6.7+"),
            "{s}"
        );

        let e = DirtyError::Uffd(UffdError::PermissionDenied(PermissionHint {
            dev_error: std::io::Error::from_raw_os_error(libc::EACCES),
            syscall_error: std::io::Error::from_raw_os_error(libc::EPERM),
            dev_mode: Some((0o20600, 0, 0)),
            unprivileged_sysctl: Some("0".into()),
        }));
        let s = crate::error::chain(&e);
        assert!(
            s.starts_with("uffd-wp-async dirty tracking unavailable: "),
            "{s}"
        );
        // The hint is the source's: in the chain, not in the error's own message.
        assert!(s.contains("sysctl -w vm.unprivileged_userfaultfd=1"), "{s}");
        assert!(!e.to_string().contains("sysctl"), "{e}");
    }

    #[test]
    fn first_pages_accumulate() {
        // SAFETY: only page counts are read from these regions; nothing touches them.
        let r = |pages: usize| unsafe {
            HostRegion::from_raw(0x1000 as *mut u8, pages * crate::PAGE_SIZE, false)
        };
        assert_eq!(first_pages(&[r(3), r(1), r(5)]), vec![0, 3, 4]);
        assert!(first_pages(&[]).is_empty());
    }

    #[test]
    fn trackers_are_send() {
        fn send<T: Send>() {}
        send::<WpAsyncTracker>();
        send::<HashTracker>();
        send::<Box<dyn DirtyTracker>>();
    }
}
