//! faultline's virtual disks. A disk is a raw image file; writes that pass through
//! faultline's own front ends are tracked at block granularity, so replication to a
//! standby and evacuation know exactly which blocks changed, with no guessing.
//!
//! - [`BlockDevice`]: what a front end serves (byte-addressed reads and writes, flush,
//!   trim, write-zeroes), implemented by [`RawFile`] and wrapped by [`Tracked`].
//! - [`WriteTracker`]: the dirty-block bitmap a source harvests.
//! - Front ends (NBD, vhost-user-blk) serve any [`BlockDevice`]: [`vhost_user`] serves one
//!   to a VMM as a virtio-blk device over a vhost-user socket.
//!
//! The crate knows nothing about a command line or KVM: a VMM links it as it links
//! `vmm-shim`.

#![warn(missing_docs)]

mod device;
mod file;
mod tracker;
pub mod vhost_user;

pub use device::{check_range, BlockDevice, DiskError};
pub use file::{OpenError, RawFile};
pub use tracker::{BlockSize, Tracked, WriteTracker};
