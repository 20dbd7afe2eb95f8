//! The boundary for Rust VMMs: guest memory as `vm-memory` regions.
//!
//! A VMM that keeps its guest RAM in a [`GuestMemoryMmap`] hands it to faultline as is: the
//! regions become [`HostRegion`]s for userfaultfd and dirty tracking, and their guest-physical
//! layout becomes the [`Layout`] both sides check at the handshake.
//!
//! Each [`HostRegion`] holds the region's mapping, so the memory stays mapped for as long
//! as faultline uses it, whatever the VMM does with its `GuestMemoryMmap`.
//!
//! `vmm-shim/examples/embed.rs` is a whole program to copy: a destination and a source
//! around `GuestMemoryMmap`s in one process (`cargo run --release -p vmm-shim --example
//! embed`); `tests/tests/embedding.rs` runs it.
//!
//! # Example: the destination side of a VMM
//!
//! ```no_run
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//! use vmm_shim::{guest, DestOptions, Listener};
//! use transport::tls::{load_cert, Identity};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Guest RAM as the VMM already has it (memfd-backed in a real VMM).
//! let memory: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)])?;
//! let listener = Listener::bind(DestOptions {
//!     expected_vm_id: Some("vm0".into()),
//!     ..DestOptions::new(
//!         "0.0.0.0:4433".parse()?,
//!         Identity::load("dest.crt.pem".as_ref(), "dest.key.pem".as_ref())?,
//!         load_cert("source.crt.pem".as_ref())?,
//!     )
//! })?;
//! // Registered with userfaultfd before the source connects; `on_resume` receives the
//! // source's vCPU/device state blob: restore the vCPUs from it and run them there.
//! let report = listener.receive_vm(&guest::regions(&memory)?, &guest::layout(&memory), |state| {
//!     let _vcpu_state = state; // e.g. refvmm::VmSnapshot::from_bytes(...)
//! })?;
//! println!("all {} pages present after {} ms", report.pages, report.session.total_ms);
//! # Ok(())
//! # }
//! ```
//!
//! The source side is the mirror image: pause the vCPUs, serialise their state, and call
//! [`crate::send_with_state`] with a reader over the paused memory
//! (`unsafe {` [`crate::replica::PausedMemory::new`]`(&guest::regions(&memory)?) }`: the
//! `unsafe` is the VMM's promise that nothing writes guest memory while it is read).

use std::sync::Arc;

use thiserror::Error;
use transport::message::{Layout, RegionDesc};
use transport::PAGE_SIZE;
use uffd_core::{HostRegion, MappedMemory};
use vm_memory::bitmap::Bitmap;
use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// A guest memory region faultline cannot work with.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RegionError {
    /// faultline installs pages into guest memory and reads it to send it: the mapping
    /// must be readable and writable.
    #[error("guest memory region at guest address {guest_addr:#x} is not mapped read/write (prot {prot:#x})")]
    NotReadWrite {
        /// Where the region starts in guest-physical memory.
        guest_addr: u64,
        /// The region's `PROT_*` flags.
        prot: i32,
    },
}

/// One `vm-memory` mapping, held by every [`HostRegion`] made from it.
struct VmMemoryRegion<B>(Arc<MmapRegion<B>>);

// SAFETY: an `MmapRegion` is a mapping that vm-memory's own safe accessors read and write
// for as long as it lives: an owned one is unmapped only when dropped, and one made by
// `MmapRegion::build_raw` carries its caller's promise that the range is a valid mapping.
// Holding the `Arc` keeps it alive; `regions` checked that it is readable and writable;
// address, size and flags are fixed at construction.
unsafe impl<B: Bitmap + Send + Sync + 'static> MappedMemory for VmMemoryRegion<B> {
    fn as_ptr(&self) -> *mut u8 {
        self.0.as_ptr()
    }

    fn size(&self) -> usize {
        self.0.size()
    }

    fn is_shared(&self) -> bool {
        self.0.flags() & libc::MAP_SHARED != 0
    }

    fn backing_file(&self) -> Option<(std::os::fd::BorrowedFd<'_>, u64)> {
        use std::os::fd::AsFd;
        let f = self.0.file_offset()?;
        Some((f.file().as_fd(), f.start()))
    }
}

/// The host mappings of every region, in guest-physical order. Each [`HostRegion`] holds
/// its `vm-memory` mapping, so the memory stays mapped while faultline uses it, even if
/// the VMM drops its `GuestMemoryMmap` first. Shared mappings (memfd, the form VMMs use
/// for migration and for vhost-user) are shared memory to userfaultfd.
pub fn regions<B: Bitmap + Send + Sync + 'static>(
    mem: &GuestMemoryMmap<B>,
) -> Result<Vec<HostRegion>, RegionError> {
    mem.iter()
        .map(|r| {
            let mapping = r.get_mmap();
            let rw = libc::PROT_READ | libc::PROT_WRITE;
            if mapping.prot() & rw != rw {
                return Err(RegionError::NotReadWrite {
                    guest_addr: r.start_addr().0,
                    prot: mapping.prot(),
                });
            }
            Ok(HostRegion::new(Arc::new(VmMemoryRegion(mapping))))
        })
        .collect()
}

/// The guest-physical layout both sides compare at the handshake.
pub fn layout<B: Bitmap>(mem: &GuestMemoryMmap<B>) -> Layout {
    Layout {
        page_size: PAGE_SIZE as u32,
        regions: mem
            .iter()
            .map(|r| RegionDesc {
                guest_addr: r.start_addr().0,
                len: r.len(),
            })
            .collect(),
        disks: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn regions_and_layout_follow_guest_physical_order() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(1 << 32), 2 << 20),
        ])
        .unwrap();
        let l = layout(&mem);
        assert_eq!(l.total_pages(), 768);
        assert_eq!(l.regions[1].guest_addr, 1 << 32);
        let r = regions(&mem).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].len(), 2 << 20);
        assert!(!r[0].is_shmem(), "anonymous regions are private memory");
    }

    #[test]
    fn a_region_keeps_its_memory_after_the_vmm_drops_it() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        mem.write_obj(0xfeed_u64, GuestAddress(64)).unwrap();
        let r = regions(&mem).unwrap();
        drop(mem);
        // SAFETY: `r[0]` holds the mapping, so it is still mapped and readable.
        let v = unsafe { ((r[0].host_addr() + 64) as *const u64).read() };
        assert_eq!(v, 0xfeed);
    }

    #[test]
    fn read_only_memory_is_refused() {
        use vm_memory::mmap::MmapRegionBuilder;
        use vm_memory::GuestRegionMmap;
        let ro = MmapRegionBuilder::<()>::new(1 << 20)
            .with_mmap_prot(libc::PROT_READ)
            .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .unwrap();
        let region = GuestRegionMmap::new(ro, GuestAddress(1 << 30)).unwrap();
        let mem = GuestMemoryMmap::from_regions(vec![region]).unwrap();
        assert_eq!(
            regions(&mem).unwrap_err(),
            RegionError::NotReadWrite {
                guest_addr: 1 << 30,
                prot: libc::PROT_READ
            }
        );
    }
}
