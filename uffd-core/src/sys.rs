//! Raw binding of the kernel's `linux/userfaultfd.h` uapi, plus the `PAGEMAP_SCAN` part
//! of `linux/fs.h` used for dirty tracking.
//!
//! Written by hand instead of generated so the crate builds without libclang, and so
//! it carries features newer than the distribution headers (WP_ASYNC, POISON, MOVE).
//! Ioctl numbers use the asm-generic `_IOC` encoding (x86, arm, riscv); every struct
//! size is pinned at compile time against the kernel's.

#![allow(missing_docs)]

use std::mem::size_of;

/// Base of every userfaultfd ioctl (`UFFDIO` / `USERFAULTFD_IOC`).
pub const UFFDIO: u64 = 0xAA;
/// API version spoken in the `UFFDIO_API` handshake.
pub const UFFD_API: u64 = 0xAA;

const IOC_NRBITS: u64 = 8;
const IOC_TYPEBITS: u64 = 8;
const IOC_SIZEBITS: u64 = 14;
const IOC_NRSHIFT: u64 = 0;
const IOC_TYPESHIFT: u64 = IOC_NRSHIFT + IOC_NRBITS;
const IOC_SIZESHIFT: u64 = IOC_TYPESHIFT + IOC_TYPEBITS;
const IOC_DIRSHIFT: u64 = IOC_SIZESHIFT + IOC_SIZEBITS;
const IOC_NONE: u64 = 0;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

/// `_IOC(dir, type, nr, size)`.
pub const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
    (dir << IOC_DIRSHIFT)
        | (ty << IOC_TYPESHIFT)
        | (nr << IOC_NRSHIFT)
        | ((size as u64) << IOC_SIZESHIFT)
}
/// `_IO(type, nr)`.
pub const fn io(ty: u64, nr: u64) -> u64 {
    ioc(IOC_NONE, ty, nr, 0)
}
/// `_IOR(type, nr, size)`.
pub const fn ior(ty: u64, nr: u64, size: usize) -> u64 {
    ioc(IOC_READ, ty, nr, size)
}
/// `_IOWR(type, nr, size)`.
pub const fn iowr(ty: u64, nr: u64, size: usize) -> u64 {
    ioc(IOC_READ | IOC_WRITE, ty, nr, size)
}

// Ioctl command indices; also the bit positions in the `ioctls` masks the kernel returns.
pub const _UFFDIO_REGISTER: u64 = 0x00;
pub const _UFFDIO_UNREGISTER: u64 = 0x01;
pub const _UFFDIO_WAKE: u64 = 0x02;
pub const _UFFDIO_COPY: u64 = 0x03;
pub const _UFFDIO_ZEROPAGE: u64 = 0x04;
pub const _UFFDIO_MOVE: u64 = 0x05;
pub const _UFFDIO_WRITEPROTECT: u64 = 0x06;
pub const _UFFDIO_CONTINUE: u64 = 0x07;
pub const _UFFDIO_POISON: u64 = 0x08;
pub const _UFFDIO_API: u64 = 0x3F;

/// On `/dev/userfaultfd`: create a new userfaultfd; the argument is the open flags.
pub const USERFAULTFD_IOC_NEW: u64 = io(UFFDIO, 0x00);
pub const UFFDIO_API: u64 = iowr(UFFDIO, _UFFDIO_API, size_of::<uffdio_api>());
pub const UFFDIO_REGISTER: u64 = iowr(UFFDIO, _UFFDIO_REGISTER, size_of::<uffdio_register>());
// The kernel declares these two as _IOR although they are written by user space; the
// encoding is part of the ABI, so we copy it.
pub const UFFDIO_UNREGISTER: u64 = ior(UFFDIO, _UFFDIO_UNREGISTER, size_of::<uffdio_range>());
pub const UFFDIO_WAKE: u64 = ior(UFFDIO, _UFFDIO_WAKE, size_of::<uffdio_range>());
pub const UFFDIO_COPY: u64 = iowr(UFFDIO, _UFFDIO_COPY, size_of::<uffdio_copy>());
pub const UFFDIO_ZEROPAGE: u64 = iowr(UFFDIO, _UFFDIO_ZEROPAGE, size_of::<uffdio_zeropage>());
pub const UFFDIO_MOVE: u64 = iowr(UFFDIO, _UFFDIO_MOVE, size_of::<uffdio_move>());
pub const UFFDIO_WRITEPROTECT: u64 = iowr(
    UFFDIO,
    _UFFDIO_WRITEPROTECT,
    size_of::<uffdio_writeprotect>(),
);
pub const UFFDIO_CONTINUE: u64 = iowr(UFFDIO, _UFFDIO_CONTINUE, size_of::<uffdio_continue>());
pub const UFFDIO_POISON: u64 = iowr(UFFDIO, _UFFDIO_POISON, size_of::<uffdio_poison>());

/// `userfaultfd(2)` flag: only handle faults from user mode. Never used here: KVM guest
/// accesses fault in kernel mode and would get SIGBUS/EFAULT.
pub const UFFD_USER_MODE_ONLY: i32 = 1;

// uffd_msg.event
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const UFFD_EVENT_FORK: u8 = 0x13;
pub const UFFD_EVENT_REMAP: u8 = 0x14;
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
pub const UFFD_EVENT_UNMAP: u8 = 0x16;

// uffd_msg.arg.pagefault.flags
pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
pub const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
pub const UFFD_PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;

// uffdio_api.features
pub const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
pub const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const UFFD_FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;
pub const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
pub const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
pub const UFFD_FEATURE_SIGBUS: u64 = 1 << 7;
pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
pub const UFFD_FEATURE_MINOR_HUGETLBFS: u64 = 1 << 9;
pub const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
pub const UFFD_FEATURE_EXACT_ADDRESS: u64 = 1 << 11;
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const UFFD_FEATURE_POISON: u64 = 1 << 14;
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
pub const UFFD_FEATURE_MOVE: u64 = 1 << 16;

// uffdio_register.mode
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;

// per-ioctl modes
pub const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
pub const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
pub const UFFDIO_CONTINUE_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_CONTINUE_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_POISON_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_MOVE_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES: u64 = 1 << 1;

/// `struct uffd_msg`, as returned by read(2) on the userfaultfd.
///
/// The kernel's union is kept as three raw words so no `unsafe` union read is needed;
/// [`UffdMsg::pagefault`] and friends give the typed views.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct uffd_msg {
    pub event: u8,
    pub reserved1: u8,
    pub reserved2: u16,
    pub reserved3: u32,
    pub arg: [u64; 3],
}

/// The crate-facing name of [`uffd_msg`].
pub type UffdMsg = uffd_msg;

impl uffd_msg {
    /// `arg.pagefault`: (flags, address, ptid).
    pub fn pagefault(&self) -> (u64, u64, u32) {
        let ptid_bytes = self.arg[2].to_ne_bytes();
        // ptid is the first u32 of the third word in memory order, whatever the endianness.
        let ptid = u32::from_ne_bytes([ptid_bytes[0], ptid_bytes[1], ptid_bytes[2], ptid_bytes[3]]);
        (self.arg[0], self.arg[1], ptid)
    }

    /// `arg.remove`: (start, end).
    pub fn remove(&self) -> (u64, u64) {
        (self.arg[0], self.arg[1])
    }
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_api {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_range {
    pub start: u64,
    pub len: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_register {
    pub range: uffdio_range,
    pub mode: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_copy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    /// Bytes copied, or a negative errno if nothing was.
    pub copy: i64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_zeropage {
    pub range: uffdio_range,
    pub mode: u64,
    /// Bytes zeroed, or a negative errno if nothing was.
    pub zeropage: i64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_writeprotect {
    pub range: uffdio_range,
    pub mode: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_continue {
    pub range: uffdio_range,
    pub mode: u64,
    pub mapped: i64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_poison {
    pub range: uffdio_range,
    pub mode: u64,
    pub updated: i64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_move {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub move_: i64,
}

// ---- `linux/fs.h`: PAGEMAP_SCAN on /proc/<pid>/pagemap (Linux 6.7+) ----

/// `PAGEMAP_SCAN` ioctl type (`'f'`).
pub const PAGEMAP_IOC_MAGIC: u64 = b'f' as u64;
pub const PAGEMAP_SCAN: u64 = iowr(PAGEMAP_IOC_MAGIC, 16, size_of::<pm_scan_arg>());

// Page categories (pm_scan_arg masks and page_region.categories).
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_FILE: u64 = 1 << 2;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
pub const PAGE_IS_HUGE: u64 = 1 << 6;
pub const PAGE_IS_SOFT_DIRTY: u64 = 1 << 7;

// pm_scan_arg.flags
/// Write-protect the pages that matched (and were reported) in the same walk.
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Fail with EPERM on a VMA that is not registered with an async-WP userfaultfd.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// `struct page_region`: `[start, end)` pages sharing `categories`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct page_region {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

/// `struct pm_scan_arg`. `size` must be `size_of::<pm_scan_arg>()`; the kernel writes
/// back `walk_end` (where the walk stopped; `end` when it completed).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct pm_scan_arg {
    pub size: u64,
    pub flags: u64,
    pub start: u64,
    pub end: u64,
    pub walk_end: u64,
    /// User address of a `page_region` array.
    pub vec: u64,
    pub vec_len: u64,
    /// 0 = unlimited.
    pub max_pages: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

// A size mismatch would silently change the ioctl numbers and corrupt kernel copies.
const _: () = assert!(size_of::<uffd_msg>() == 32);
const _: () = assert!(size_of::<uffdio_api>() == 24);
const _: () = assert!(size_of::<uffdio_range>() == 16);
const _: () = assert!(size_of::<uffdio_register>() == 32);
const _: () = assert!(size_of::<uffdio_copy>() == 40);
const _: () = assert!(size_of::<uffdio_zeropage>() == 32);
const _: () = assert!(size_of::<uffdio_writeprotect>() == 24);
const _: () = assert!(size_of::<uffdio_continue>() == 32);
const _: () = assert!(size_of::<uffdio_poison>() == 32);
const _: () = assert!(size_of::<uffdio_move>() == 40);
const _: () = assert!(size_of::<page_region>() == 24);
const _: () = assert!(size_of::<pm_scan_arg>() == 96);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_kernel_headers() {
        // Values printed by a C program including <linux/userfaultfd.h>.
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
        assert_eq!(UFFDIO_CONTINUE, 0xc020_aa07);
        assert_eq!(USERFAULTFD_IOC_NEW, 0xaa00);
        // From newer kernels' headers.
        assert_eq!(UFFDIO_MOVE, 0xc028_aa05);
        assert_eq!(UFFDIO_POISON, 0xc020_aa08);
    }

    #[test]
    fn pagemap_scan_ioctl_number() {
        // _IOWR('f', 16, struct pm_scan_arg): dir READ|WRITE = 3 << 30 = 0xC000_0000;
        // size = 12 u64 fields = 96 = 0x60, << 16 = 0x0060_0000; type 'f' = 0x66 << 8 =
        // 0x6600; nr 16 = 0x10. Sum: 0xC060_6610 (as in linux/fs.h of 6.7+).
        assert_eq!(size_of::<pm_scan_arg>(), 96);
        assert_eq!(PAGEMAP_SCAN, 0xc060_6610);
        assert_eq!(std::mem::offset_of!(pm_scan_arg, walk_end), 32);
        assert_eq!(std::mem::offset_of!(pm_scan_arg, return_mask), 88);
    }

    #[test]
    fn struct_layouts() {
        assert_eq!(std::mem::offset_of!(uffd_msg, arg), 8);
        assert_eq!(std::mem::offset_of!(uffdio_copy, copy), 32);
        assert_eq!(std::mem::offset_of!(uffdio_zeropage, zeropage), 24);
        assert_eq!(std::mem::offset_of!(uffdio_register, ioctls), 24);
    }

    #[test]
    fn pagefault_view_reads_ptid_from_first_half_word() {
        let mut m = uffd_msg {
            event: UFFD_EVENT_PAGEFAULT,
            ..Default::default()
        };
        m.arg[0] = UFFD_PAGEFAULT_FLAG_WRITE;
        m.arg[1] = 0x7f00_0000_1000;
        let mut w = [0u8; 8];
        w[..4].copy_from_slice(&1234u32.to_ne_bytes());
        m.arg[2] = u64::from_ne_bytes(w);
        assert_eq!(
            m.pagefault(),
            (UFFD_PAGEFAULT_FLAG_WRITE, 0x7f00_0000_1000, 1234)
        );
    }
}
