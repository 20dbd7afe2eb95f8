//! KVM's dirty log (`KVM_MEM_LOG_DIRTY_PAGES` / `KVM_GET_DIRTY_LOG`) as a
//! [`uffd_core::DirtyTracker`], so a KVM guest can be replicated to a standby.
//!
//! Build a [`super::Vm`] with [`super::VmOptions::dirty_log`] set (its memory slots are then
//! registered with `KVM_MEM_LOG_DIRTY_PAGES`) and take the tracker with
//! [`super::Vm::dirty_tracker`].
//!
//! **Only guest writes are logged.** KVM marks a page dirty when a vCPU writes it (through
//! the guest's stage-2 mapping); writes the host makes to guest memory through its own
//! mapping (device emulation, `vm-memory` accessors, a restore copying bytes in) are not
//! seen. A VMM that writes guest memory from the host must report those pages itself, or
//! combine this tracker with one that sees host writes (uffd-wp-async, content hashing).

use std::io;
use std::sync::Arc;

use kvm_ioctls::VmFd;
use uffd_core::error::DirtyError;
use uffd_core::DirtyTracker;

/// Page size of the bitmaps (`KVM_GET_DIRTY_LOG` has one bit per host page) and of the
/// global page indices [`DirtyTracker`] reports.
const PAGE: u64 = 4096;

/// One memory slot: KVM slot id, its size in bytes, and its first global page index.
#[derive(Clone, Copy, Debug)]
struct Slot {
    id: u32,
    size: u64,
    first_page: u64,
}

/// [`DirtyTracker`] over a VM's memory slots, backed by KVM's dirty log.
///
/// Pages are 4 KiB, numbered globally over the slots in guest-physical order (the order of
/// [`super::Vm::host_regions`]). The first harvest reports every page (the standby has
/// nothing yet); each later one reports the pages vCPUs wrote since the previous harvest.
/// `KVM_GET_DIRTY_LOG` returns and clears a slot's bitmap atomically in the kernel, so a
/// write racing with a harvest is reported by it or by the next one.
///
/// Host writes to guest memory are **not** logged: see the [module docs](self).
///
/// KVM errs on the side of reporting: when it first maps a page for the guest after a
/// harvest it may map it writable and mark it dirty at once, even for a read or an
/// instruction fetch, so a page the guest only reads can be reported once. Sending it again
/// is harmless for a replica; nothing written by a vCPU is missed.
///
/// It shares the VM fd, so it stays usable (harvests return nothing new) after the
/// [`super::Vm`] stops.
pub struct KvmDirtyLog {
    vm_fd: Arc<VmFd>,
    slots: Vec<Slot>,
    total_pages: u64,
    /// Report every page at the next harvest (first harvest, or after an error).
    report_all: bool,
}

impl KvmDirtyLog {
    /// A tracker over `slots` (KVM slot id and size in bytes, in guest-physical order), each
    /// of which must have been registered with `KVM_MEM_LOG_DIRTY_PAGES` on `vm_fd`.
    pub fn new(vm_fd: Arc<VmFd>, slots: &[(u32, u64)]) -> Result<KvmDirtyLog, DirtyError> {
        // SAFETY: sysconf has no memory-safety preconditions; the result is checked.
        let host_page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if host_page != PAGE as libc::c_long {
            return Err(DirtyError::Sys {
                op: "KVM dirty log (needs 4 KiB host pages)",
                source: io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        let mut next = 0u64;
        let mut out = Vec::with_capacity(slots.len());
        for &(id, size) in slots {
            if size == 0 || size % PAGE != 0 {
                return Err(DirtyError::Sys {
                    op: "KVM dirty log (slot size must be a non-zero multiple of 4 KiB)",
                    source: io::Error::from_raw_os_error(libc::EINVAL),
                });
            }
            out.push(Slot {
                id,
                size,
                first_page: next,
            });
            next += size / PAGE;
        }
        Ok(KvmDirtyLog {
            vm_fd,
            slots: out,
            total_pages: next,
            report_all: true,
        })
    }

    /// Pages tracked (over all slots).
    pub fn pages(&self) -> u64 {
        self.total_pages
    }

    fn harvest_inner(&mut self, out: &mut Vec<u64>) -> Result<(), DirtyError> {
        out.clear();
        for slot in &self.slots {
            // Returns and clears the slot's bitmap in one ioctl.
            let bitmap = self
                .vm_fd
                .get_dirty_log(slot.id, slot.size as usize)
                .map_err(|e| DirtyError::Sys {
                    op: "KVM_GET_DIRTY_LOG",
                    source: io::Error::from_raw_os_error(e.errno()),
                })?;
            if self.report_all {
                // Still had to clear the log above, so the next harvest starts from here.
                continue;
            }
            let pages = slot.size / PAGE;
            for (w, &word) in bitmap.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let b = bits.trailing_zeros() as u64;
                    bits &= bits - 1;
                    let p = w as u64 * 64 + b;
                    if p < pages {
                        out.push(slot.first_page + p);
                    }
                }
            }
        }
        if self.report_all {
            out.extend(0..self.total_pages);
        }
        Ok(())
    }
}

impl DirtyTracker for KvmDirtyLog {
    fn harvest(&mut self, out: &mut Vec<u64>) -> Result<(), DirtyError> {
        match self.harvest_inner(out) {
            Ok(()) => {
                self.report_all = false;
                Ok(())
            }
            Err(e) => {
                // Some slots' logs may already be cleared: report everything next time.
                self.report_all = true;
                out.clear();
                Err(e)
            }
        }
    }

    fn kind(&self) -> &'static str {
        "kvm-dirty-log"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_dirty_log_is_send() {
        fn send<T: Send>() {}
        send::<KvmDirtyLog>();
    }
}
