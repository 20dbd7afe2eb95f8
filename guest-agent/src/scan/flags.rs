//! Bits of `/proc/kpageflags`, from the kernel's `include/uapi/linux/kernel-page-flags.h`
//! (bits 0-26; `KPF_PGTABLE` = 26 exists since Linux 4.18, the Debian 6.1 guest kernel has
//! it) and `include/linux/kernel-page-flags.h` (the kernel-internal bits 32 and up, also
//! exported). See `Documentation/admin-guide/mm/pagemap.rst`.

/// Page is being locked for I/O.
pub const KPF_LOCKED: u64 = 1 << 0;
/// Referenced since the last LRU scan (`PG_referenced`, set by reclaim and by
/// `mark_page_accessed`, not by hardware).
pub const KPF_REFERENCED: u64 = 1 << 2;
/// On an LRU list (user memory: anonymous and page cache).
pub const KPF_LRU: u64 = 1 << 5;
/// On the active LRU list.
pub const KPF_ACTIVE: u64 = 1 << 6;
/// Kernel slab memory.
pub const KPF_SLAB: u64 = 1 << 7;
/// First page of a free block of the buddy allocator (only the first page is flagged).
pub const KPF_BUDDY: u64 = 1 << 10;
/// Mapped into some process.
pub const KPF_MMAP: u64 = 1 << 11;
/// Anonymous memory.
pub const KPF_ANON: u64 = 1 << 12;
/// First page of a compound page (huge page, slab of order > 0, ...).
pub const KPF_COMPOUND_HEAD: u64 = 1 << 15;
/// Other pages of a compound page.
pub const KPF_COMPOUND_TAIL: u64 = 1 << 16;
/// Hardware-poisoned.
pub const KPF_HWPOISON: u64 = 1 << 19;
/// No struct page at this frame (a hole).
pub const KPF_NOPAGE: u64 = 1 << 20;
/// Transparent huge page.
pub const KPF_THP: u64 = 1 << 22;
/// Logically offline (ballooned out, ...).
pub const KPF_OFFLINE: u64 = 1 << 23;
/// The kernel's shared zero page.
pub const KPF_ZERO_PAGE: u64 = 1 << 24;
/// Idle per page_idle tracking.
pub const KPF_IDLE: u64 = 1 << 25;
/// A page-table page.
pub const KPF_PGTABLE: u64 = 1 << 26;
/// Reserved (kernel image, firmware, memblock reservations).
pub const KPF_RESERVED: u64 = 1 << 32;

/// Flags a compound tail page takes over from its head when classifying. Linux before 6.9
/// reports the tail's own `page->flags`, which lack LRU/active; since 6.9 it reports the
/// head's (folio's) flags, in which case this changes nothing.
pub const INHERITED_BY_TAILS: u64 = KPF_LRU | KPF_ACTIVE | KPF_SLAB | KPF_PGTABLE;

/// Flags that make a page hot whatever the access tracking says: the active LRU list (user
/// memory used repeatedly), slab (kernel objects) and page tables (walked on every access
/// through them).
pub const ALWAYS_HOT: u64 = KPF_ACTIVE | KPF_SLAB | KPF_PGTABLE;

/// Flags that make a page never hot (no memory, free, or unusable).
pub const NEVER_HOT: u64 = KPF_NOPAGE | KPF_BUDDY | KPF_OFFLINE | KPF_HWPOISON;
