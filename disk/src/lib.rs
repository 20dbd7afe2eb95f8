//! faultline's virtual disks. A disk is a raw image file; writes that pass through
//! faultline's own front ends are tracked at block granularity, so replication to a
//! standby and evacuation know exactly which blocks changed, with no guessing.
//!
//! - [`BlockDevice`]: what a front end serves (byte-addressed reads and writes, flush,
//!   trim, write-zeroes), implemented by [`RawFile`] and wrapped by [`Tracked`].
//! - [`WriteTracker`]: the dirty-block bitmap a source harvests.
//! - [`PostcopyDisk`]: a disk served at a destination while its stale blocks arrive.
//! - Front ends serve any [`BlockDevice`]: [`nbd`] (an NBD server on a Unix socket or
//!   TCP) and [`vhost_user`] (a virtio-blk device for a VMM over a vhost-user socket).
//!
//! The crate knows nothing about a command line or KVM: a VMM links it as it links
//! `vmm-shim`.

#![warn(missing_docs)]

mod device;
mod file;
pub mod nbd;
pub mod postcopy;
mod tracker;
pub mod vhost_user;

pub use device::{check_range, BlockDevice, DiskError};
pub use file::{OpenError, RawFile};
pub use postcopy::{BlockFetcher, PostcopyDisk, PostcopyStats, UNIT};
pub use tracker::{BlockSize, Tracked, WriteTracker};
