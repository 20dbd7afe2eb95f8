//! Destination-side userfaultfd fault handling for faultline postcopy migration.
//!
//! Guest memory ([`GuestMemory`]) is registered with a [`Userfaultfd`]; a
//! [`FaultLoop`] thread turns missing-page faults into requests to a [`PageSource`],
//! and whoever holds the data installs it through an [`Installer`]. A lock-free
//! [`PageTable`] makes sure each page is requested and counted once, and [`Metrics`]
//! measures how long guest threads were blocked. [`Destination`] wires it all up.
//!
//! # What this crate owns
//!
//! - userfaultfd registration of guest memory: the fd itself ([`Userfaultfd`]) and the
//!   host regions it covers, numbered into one global page index ([`HostRegion`],
//!   [`RegionMap`]);
//! - the per-page state table ([`PageTable`]): Absent, Requested, Present, Discarded;
//! - the fault loop ([`FaultLoop`]): the thread that reads fault messages and asks for
//!   each missing page once;
//! - page installation with UFFDIO_COPY / UFFDIO_ZEROPAGE ([`Installer`]);
//! - the standby's replica store and its tiers ([`ReplicaStore`], [`MemoryTier`],
//!   [`DiskTier`]);
//! - source-side dirty tracking ([`DirtyTracker`], [`open_tracker`]);
//! - metrics of a destination ([`Metrics`], [`MetricsSnapshot`]).
//!
//! # What it must not know about
//!
//! Nothing here knows about the network (that is the `transport` crate), `vm-memory` or
//! KVM (that is the VMM glue, `vmm-shim`). Memory comes in as plain host mappings
//! ([`MappedMemory`], [`HostRegion`]), and a page source is a trait ([`PageSource`]), so
//! the fault loop does not care where pages come from: the network, a local replica
//! tier or a test double. Dependencies point from those crates to this one, never back;
//! keep it that way so the fault path can be tested without a network or a VM.

#![warn(missing_docs)]

pub mod destination;
pub mod dirty;
pub mod error;
pub mod fault_loop;
pub mod install;
pub mod layout;
pub mod memory;
pub mod metrics;
pub mod page_table;
pub mod replica;
pub mod source;
pub mod sys;
pub mod uffd;

/// Guest page size handled by this crate.
pub const PAGE_SIZE: usize = 4096;

pub use destination::{Destination, DESTINATION_FEATURES};
pub use dirty::{open_tracker, DirtyTracker, HashTracker, TrackerChoice, WpAsyncTracker};
pub use error::{
    DirtyError, Error, InstallError, LayoutError, MemoryError, PermissionHint, UffdError,
};
pub use fault_loop::{FaultLoop, FaultLoopHandle};
pub use install::{Installed, Installer, Origin, PageData, RunInstalled};
pub use layout::{HostRegion, MappedMemory, RegionMap};
pub use memory::{GuestMemory, MemoryKind};
pub use metrics::{LatencySummary, Metrics, MetricsSnapshot};
pub use page_table::{PageState, PageTable};
pub use replica::{
    present_page_table, DiskTier, GuestMapping, MemoryTier, OpenReport, ReplicaError, ReplicaStore,
    Tier,
};
pub use source::PageSource;
pub use sys::UffdMsg;
pub use uffd::{CopyOutcome, CopyResult, Event, FaultFlags, Features, Ioctls, Userfaultfd};

#[cfg(test)]
mod tests {
    fn send_sync<T: Send + Sync>() {}

    #[test]
    fn shared_types_are_send_and_sync() {
        send_sync::<crate::Installer>();
        send_sync::<crate::Destination>();
        send_sync::<crate::GuestMemory>();
        send_sync::<crate::RegionMap>();
        send_sync::<crate::PageTable>();
        send_sync::<crate::Metrics>();
        send_sync::<crate::Userfaultfd>();
        send_sync::<crate::FaultLoopHandle>();
    }
}
