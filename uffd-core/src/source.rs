//! Where missing pages come from, as seen by the fault loop.

/// A supplier of page contents: the network, a local cache tier, or a test double.
pub trait PageSource: Send + Sync + 'static {
    /// Asks for `pages` (global page indices). Must not block: the fault loop calls it
    /// between reads, and every vCPU waits on that loop. The data comes back later
    /// through [`crate::Installer::install`] on any thread.
    fn request(&self, pages: &[u64]);
}
