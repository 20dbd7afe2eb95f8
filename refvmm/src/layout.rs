//! Guest-physical layout, identity-mapped page tables, GDT and the long-mode special
//! registers. The guest starts directly in 64-bit mode; no firmware, no real-mode stub.
//!
//! The guest programs run at CPL 3 with IOPL 3 (so `out` is allowed) on user-accessible
//! pages. They need no privileged instruction, and it matters for speed on KVM backends
//! that virtualise in software: this development machine's KVM is `kvm_pvm`, which runs
//! ring-3 guest code natively (2.6e9 loop iterations/s measured) but emulates ring-0 code
//! instruction by instruction (about 1e6/s). With VMX/SVM both rings run natively.
//!
//! ```text
//! 0x0000_1000  GDT: null, code64 DPL3 (0x08), data DPL3 (0x10), TSS (0x18)
//! 0x0000_1800  IDT (empty: any exception triple-faults, which the VMM reports)
//! 0x0000_2000  PML4
//! 0x0000_3000  PDPT
//! 0x0000_4000  page directories, 2 MiB pages, contiguous (one 4 KiB PD per GiB)
//! 0x0010_0000  guest program code (at most 64 KiB)
//! 0x0020_0000  per-vCPU data areas, 4 KiB each (see `programs` for the fields)
//! 0x0030_0000  per-vCPU stacks, 64 KiB each
//! 0x0080_0000  working set of the memory workloads, up to the end of memory
//! ```

use kvm_bindings::{kvm_segment, kvm_sregs};
use vm_memory::GuestMemoryMmap;

use super::error::VmError;
use super::memory::{write_bytes, write_u64};

pub const GDT_ADDR: u64 = 0x1000;
pub const IDT_ADDR: u64 = 0x1800;
pub const PML4_ADDR: u64 = 0x2000;
pub const PDPT_ADDR: u64 = 0x3000;
pub const PD_ADDR: u64 = 0x4000;
pub const CODE_ADDR: u64 = 0x10_0000;
pub const CODE_MAX: usize = 0x1_0000;
pub const DATA_BASE: u64 = 0x20_0000;
pub const DATA_STRIDE: u64 = 0x1000;
pub const STACK_BASE: u64 = 0x30_0000;
pub const STACK_SIZE: u64 = 0x1_0000;
pub const WORKSET_BASE: u64 = 0x80_0000;

/// Smallest guest: the fixed areas above plus 8 MiB of working set.
pub const MIN_MEM: u64 = 16 << 20;
/// Largest guest the page directories between `PD_ADDR` and `CODE_ADDR` can map.
pub const MAX_MEM: u64 = ((CODE_ADDR - PD_ADDR) / 0x1000) << 30;
pub const MAX_VCPUS: usize = 4;

const PAGE_2M: u64 = 2 << 20;
/// Present, writable, user-accessible.
const PTE_PRESENT_RW_USER: u64 = 0x7;
const PTE_PAGE_SIZE: u64 = 0x80;
/// Accessed and Dirty, set in advance: otherwise the first page walk through an entry (or
/// first write to a 2 MiB page) makes the CPU write them into guest memory, and a guest that
/// reads memory it never touched before changes the page tables. That would make "guest
/// memory after resuming equals memory at switchover" false for reasons no program controls.
const PTE_ACCESSED: u64 = 0x20;
const PTE_DIRTY: u64 = 0x40;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const SEL_CODE: u16 = 0x08;
const SEL_DATA: u16 = 0x10;
const SEL_TSS: u16 = 0x18;
/// Requested/descriptor privilege level of the guest's code and data: ring 3.
const RPL3: u16 = 3;
/// RFLAGS of a fresh vCPU: reserved bit 1 and IOPL 3 (port I/O allowed at CPL 3).
pub const BOOT_RFLAGS: u64 = 0x2 | 3 << 12;

/// Guest-physical address of vCPU `i`'s data area.
pub fn data_area(i: usize) -> u64 {
    DATA_BASE + i as u64 * DATA_STRIDE
}

/// Initial stack pointer of vCPU `i` (top of its stack, 16-byte aligned).
pub fn stack_top(i: usize) -> u64 {
    STACK_BASE + (i as u64 + 1) * STACK_SIZE
}

/// A GDT descriptor from its flags (access byte and the high flags nibble), base and limit.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0xffff)
}

fn gdt() -> [u64; 4] {
    [
        0,
        gdt_entry(0xa0fb, 0, 0xfffff), // code: present, DPL3, exec/read, L=1, G=1
        gdt_entry(0xc0f3, 0, 0xfffff), // data: present, DPL3, read/write, D/B=1, G=1
        gdt_entry(0x808b, 0, 0xfffff), // TSS: present, busy 64-bit TSS
    ]
}

/// Write the GDT, an empty IDT and identity-mapping page tables covering all of `mem_size`.
pub fn write_system_tables(mem: &GuestMemoryMmap, mem_size: u64) -> Result<(), VmError> {
    check_mem_size(mem_size)?;
    for (i, e) in gdt().iter().enumerate() {
        write_u64(mem, GDT_ADDR + i as u64 * 8, *e)?;
    }
    write_u64(mem, IDT_ADDR, 0)?;
    write_u64(
        mem,
        PML4_ADDR,
        PDPT_ADDR | PTE_PRESENT_RW_USER | PTE_ACCESSED,
    )?;
    let gibs = mem_size.div_ceil(1 << 30);
    for i in 0..gibs {
        write_u64(
            mem,
            PDPT_ADDR + i * 8,
            (PD_ADDR + i * 0x1000) | PTE_PRESENT_RW_USER | PTE_ACCESSED,
        )?;
    }
    // The page directories are contiguous, so entry j of the whole run maps 2 MiB page j.
    let pages = mem_size / PAGE_2M;
    let mut pd = Vec::with_capacity(pages as usize * 8);
    for j in 0..pages {
        let pde = (j * PAGE_2M) | PTE_PRESENT_RW_USER | PTE_PAGE_SIZE | PTE_ACCESSED | PTE_DIRTY;
        pd.extend_from_slice(&pde.to_le_bytes());
    }
    write_bytes(mem, PD_ADDR, &pd)
}

pub fn check_mem_size(mem_size: u64) -> Result<(), VmError> {
    if !(MIN_MEM..=MAX_MEM).contains(&mem_size) || !mem_size.is_multiple_of(PAGE_2M) {
        return Err(VmError::Config(format!(
            "memory size {mem_size} must be a multiple of 2 MiB between {} MiB and {} GiB",
            MIN_MEM >> 20,
            MAX_MEM >> 30
        )));
    }
    Ok(())
}

fn segment(selector: u16, type_: u8, s: u8, l: u8, db: u8) -> kvm_segment {
    let dpl = (selector & 3) as u8;
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db,
        s,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Turn KVM's reset-state special registers into 64-bit long mode with paging on, CPL 3.
pub fn long_mode_sregs(sregs: &mut kvm_sregs) {
    let code = segment(SEL_CODE | RPL3, 0xb, 1, 1, 0);
    let data = segment(SEL_DATA | RPL3, 0x3, 1, 0, 1);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(SEL_TSS, 0xb, 0, 0, 0);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt().len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_match_the_architectural_encoding() {
        assert_eq!(gdt()[1], 0x00af_fb00_0000_ffff);
        assert_eq!(gdt()[2], 0x00cf_f300_0000_ffff);
        assert_eq!(gdt()[3], 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn areas_do_not_overlap() {
        const {
            assert!(PD_ADDR + (MAX_MEM >> 30) * 0x1000 <= CODE_ADDR);
            assert!(CODE_ADDR + CODE_MAX as u64 <= DATA_BASE);
        }
        assert!(data_area(MAX_VCPUS) <= STACK_BASE);
        assert!(stack_top(MAX_VCPUS - 1) <= WORKSET_BASE);
        assert!(check_mem_size(64 << 20).is_ok());
        assert!(check_mem_size((64 << 20) + 4096).is_err());
        assert!(check_mem_size(8 << 20).is_err());
    }
}
