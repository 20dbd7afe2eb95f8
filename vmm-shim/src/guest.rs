//! The boundary for Rust VMMs: guest memory as `vm-memory` regions.
//!
//! A VMM that keeps its guest RAM in a [`GuestMemoryMmap`] hands it to faultline as is: the
//! regions become [`HostRegion`]s for userfaultfd and dirty tracking, and their guest-physical
//! layout becomes the [`Layout`] both sides check at the handshake.
//!
//! # Example: the destination side of a VMM
//!
//! ```no_run
//! use std::time::Duration;
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//! use vmm_shim::{guest, DestOptions, Listener};
//! use transport::tls::{load_cert, Identity};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Guest RAM as the VMM already has it (memfd-backed in a real VMM).
//! let memory: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)])?;
//! let listener = Listener::bind(DestOptions {
//!     listen: "0.0.0.0:4433".parse()?,
//!     identity: Identity::load("dest.crt.pem".as_ref(), "dest.key.pem".as_ref())?,
//!     peer_cert: load_cert("source.crt.pem".as_ref())?,
//!     expected_vm_id: Some("vm0".into()),
//!     accept_timeout: Duration::from_secs(60),
//!     progress: None,
//! })?;
//! // Registered with userfaultfd before the source connects; `on_resume` receives the
//! // source's vCPU/device state blob: restore the vCPUs from it and run them there.
//! let report = listener.receive_vm(&guest::regions(&memory), &guest::layout(&memory), |state| {
//!     let _vcpu_state = state; // e.g. refvmm::VmSnapshot::from_bytes(...)
//! })?;
//! println!("all {} pages present after {} ms", report.pages, report.session.total_ms);
//! # Ok(())
//! # }
//! ```
//!
//! The source side is the mirror image: pause the vCPUs, serialise their state, and call
//! [`crate::send_with_state`] with a reader over the paused memory
//! ([`crate::replica::PausedMemory::new`]`(&guest::regions(&memory))`).

use transport::message::{Layout, RegionDesc};
use transport::PAGE_SIZE;
use uffd_core::HostRegion;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// The host mappings of every region, in guest-physical order. File-backed regions (memfd,
/// the form VMMs use for migration and for vhost-user) are shared memory to userfaultfd.
pub fn regions(mem: &GuestMemoryMmap) -> Vec<HostRegion> {
    mem.iter()
        .map(|r| HostRegion::new(r.as_ptr(), r.len() as usize, r.file_offset().is_some()))
        .collect()
}

/// The guest-physical layout both sides compare at the handshake.
pub fn layout(mem: &GuestMemoryMmap) -> Layout {
    Layout {
        page_size: PAGE_SIZE as u32,
        regions: mem
            .iter()
            .map(|r| RegionDesc {
                guest_addr: r.start_addr().0,
                len: r.len(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn regions_and_layout_follow_guest_physical_order() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(1 << 32), 2 << 20),
        ])
        .unwrap();
        let l = layout(&mem);
        assert_eq!(l.total_pages(), 768);
        assert_eq!(l.regions[1].guest_addr, 1 << 32);
        let r = regions(&mem);
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].len, 2 << 20);
        assert!(!r[0].shmem, "anonymous regions are private memory");
    }
}
