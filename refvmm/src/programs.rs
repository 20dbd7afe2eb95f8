//! Bare-metal 64-bit guest programs, assembled from Rust with iced-x86's `CodeAssembler`.
//!
//! Every program is one loop. On entry `rdi` holds the vCPU's data area; the loop keeps its
//! state in registers and writes it back to the data area on every iteration, so after a
//! save/restore (registers and memory) it continues where it stopped instead of restarting.
//! Each iteration is one "op" and increments the 64-bit op counter at `[rdi + OFF_COUNTER]`;
//! every `report_every` ops the counter is reported with two 32-bit `out`s: high half to
//! [`PORT_PROGRESS_HI`], then low half to [`PORT_PROGRESS_LO`] (the VMM records the value
//! when the low half arrives, and checks for pause/stop requests at these exits).
//!
//! Digest: when the VMM sets `[rdi + OFF_DIGEST_REQ]`, the guest, at its next report, hashes
//! its working-set slice (FNV-1a over little-endian 8-byte words, see [`slice_digest`]),
//! stores the hash at `[rdi + OFF_DIGEST]`, clears the request and reports the hash on
//! [`PORT_DIGEST_HI`] / [`PORT_DIGEST_LO`]. Slices are disjoint, so the VMM can hash the same
//! bytes while that vCPU waits in the port exit and compare.

use iced_x86::code_asm::*;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::error::VmError;
use super::layout::{data_area, CODE_MAX, WORKSET_BASE};
use super::memory::write_u64;

/// Port that receives the high 32 bits of the op counter.
pub const PORT_PROGRESS_HI: u16 = 0xf0;
/// Port that receives the low 32 bits of the op counter; completes a progress report.
pub const PORT_PROGRESS_LO: u16 = 0xf1;
/// High 32 bits of a requested digest of the vCPU's working-set slice.
pub const PORT_DIGEST_HI: u16 = 0xf2;
/// Low 32 bits of the digest; completes a digest report.
pub const PORT_DIGEST_LO: u16 = 0xf3;

pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
pub const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Data area fields (byte offsets from the vCPU's data area).
pub const OFF_COUNTER: u64 = 0x00;
pub const OFF_RNG: u64 = 0x08;
pub const OFF_WS_BASE: u64 = 0x10;
pub const OFF_WS_MASK: u64 = 0x18;
pub const OFF_REPORT_MASK: u64 = 0x20;
pub const OFF_CURSOR: u64 = 0x28;
pub const OFF_HOT_MASK: u64 = 0x30;
pub const OFF_VCPU_ID: u64 = 0x38;
pub const OFF_DIGEST_REQ: u64 = 0x40;
pub const OFF_DIGEST: u64 = 0x48;

/// Share of hot/cold ops that go to the hot eighth of the working set, out of 256.
const HOT_OF_256: i32 = 230;

/// A guest workload. Memory workloads split `working_set` bytes (from guest-physical
/// `WORKSET_BASE`) evenly between vCPUs, each slice rounded down to a power of two.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Program {
    /// Increments the op counter; touches only its data area.
    Counter,
    /// xorshift64 addresses over the slice: an 8-byte read every op, and on half of the ops
    /// (top bit of the random value) a write of `old + random`.
    RandomRw { working_set: u64 },
    /// Adds 1 to one 8-byte word per 64-byte line, walking the slice and wrapping around.
    SeqScan { working_set: u64 },
    /// Read-modify-write at xorshift addresses, 90% of them in the first eighth of the slice.
    HotCold { working_set: u64 },
    /// Read-modify-write at xorshift addresses in [`SCATTER_CHUNK`]-byte chunks that make up
    /// an eighth of the slice, one at the start of every `8 × SCATTER_CHUNK` bytes; the rest
    /// of the slice stays untouched. A working set as a long-running guest has it: spread
    /// over physical memory by its page allocator, among memory nothing uses now.
    Scattered { working_set: u64 },
}

/// Size of one chunk of [`Program::Scattered`] (64 KiB: 16 pages).
pub const SCATTER_CHUNK: u64 = 1 << SCATTER_SHIFT;
const SCATTER_SHIFT: u32 = 16;

impl Program {
    pub fn working_set(&self) -> u64 {
        match *self {
            Program::Counter => 0,
            Program::RandomRw { working_set }
            | Program::SeqScan { working_set }
            | Program::HotCold { working_set }
            | Program::Scattered { working_set } => working_set,
        }
    }

    /// Guest-physical start and length of vCPU `i`'s working-set slice, which its digest
    /// covers (for the Counter program: the first 8 bytes of the working-set area).
    pub fn slice(&self, i: usize, vcpus: usize) -> (u64, u64) {
        let len = self.slice_len(vcpus);
        (WORKSET_BASE + i as u64 * len, len.max(8))
    }

    /// Bytes of working set each of `vcpus` gets.
    pub fn slice_len(&self, vcpus: usize) -> u64 {
        let per = self.working_set() / vcpus.max(1) as u64;
        if per == 0 {
            0
        } else {
            1 << per.ilog2()
        }
    }

    /// Guest-physical byte ranges of vCPU `i`'s slice that the program favours: the hot
    /// eighth of `HotCold` (one block), the chunks of `Scattered` (all it touches), the
    /// whole slice for the uniform programs, nothing for `Counter`. Sorted,
    /// non-overlapping.
    #[allow(clippy::single_range_in_vec_init)] // a list holding one range, as meant
    pub fn hot_ranges(&self, i: usize, vcpus: usize) -> Vec<std::ops::Range<u64>> {
        let len = self.slice_len(vcpus);
        let (base, _) = self.slice(i, vcpus);
        match self {
            Program::Counter => Vec::new(),
            Program::RandomRw { .. } | Program::SeqScan { .. } => vec![base..base + len],
            Program::HotCold { .. } => vec![base..base + len / 8],
            Program::Scattered { .. } => {
                let hot = len / 8;
                if hot <= SCATTER_CHUNK {
                    return vec![base..base + hot];
                }
                (0..hot / SCATTER_CHUNK)
                    .map(|c| {
                        let start = base + c * 8 * SCATTER_CHUNK;
                        start..start + SCATTER_CHUNK
                    })
                    .collect()
            }
        }
    }

    pub(crate) fn validate(&self, mem_size: u64, vcpus: usize) -> Result<(), VmError> {
        if matches!(self, Program::Counter) {
            return Ok(());
        }
        let ws = self.working_set();
        if self.slice_len(vcpus) < 64 << 10 {
            return Err(VmError::Config(format!(
                "working set {ws} gives each of {vcpus} vCPUs less than 64 KiB"
            )));
        }
        if WORKSET_BASE + ws > mem_size {
            return Err(VmError::Config(format!(
                "working set {ws} at {WORKSET_BASE:#x} does not fit in {mem_size} bytes of memory"
            )));
        }
        Ok(())
    }

    /// Machine code of the program, to be loaded at guest-physical (= virtual) `ip`.
    pub fn assemble(&self, ip: u64) -> Result<Vec<u8>, VmError> {
        let code = assemble(*self, ip).map_err(|e| VmError::Assemble(e.to_string()))?;
        if code.len() > CODE_MAX {
            return Err(VmError::Assemble(format!("{} bytes of code", code.len())));
        }
        Ok(code)
    }

    /// Initial data area of vCPU `i`: counter 0, a distinct non-zero seed, its slice.
    pub(crate) fn init_data(
        &self,
        mem: &GuestMemoryMmap,
        i: usize,
        vcpus: usize,
        report_every: u64,
    ) -> Result<(), VmError> {
        let area = data_area(i);
        let slice = self.slice_len(vcpus);
        let seed = 0x9e37_79b9_7f4a_7c15u64 ^ ((i as u64 + 1) << 32 | 0x2545);
        write_u64(mem, area + OFF_COUNTER, 0)?;
        write_u64(mem, area + OFF_RNG, seed)?;
        write_u64(mem, area + OFF_WS_BASE, WORKSET_BASE + i as u64 * slice)?;
        write_u64(mem, area + OFF_WS_MASK, slice.saturating_sub(1) & !7)?;
        write_u64(mem, area + OFF_REPORT_MASK, report_every - 1)?;
        write_u64(mem, area + OFF_CURSOR, 0)?;
        write_u64(mem, area + OFF_HOT_MASK, (slice / 8).saturating_sub(1) & !7)?;
        write_u64(mem, area + OFF_VCPU_ID, i as u64)?;
        write_u64(mem, area + OFF_DIGEST_REQ, 0)?;
        write_u64(mem, area + OFF_DIGEST, 0)
    }
}

/// The digest the guest computes: FNV-1a over the slice's little-endian 8-byte words.
pub fn slice_digest(mem: &GuestMemoryMmap, base: u64, len: u64) -> Result<u64, VmError> {
    let mut h = FNV_OFFSET;
    let mut buf = vec![0u8; (1 << 20).min(len as usize)];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        mem.read_slice(&mut buf[..n], GuestAddress(base + off))
            .map_err(|e| VmError::Memory(format!("read at {:#x}: {e}", base + off)))?;
        for w in buf[..n].chunks_exact(8) {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            h = (h ^ u64::from_le_bytes(b)).wrapping_mul(FNV_PRIME);
        }
        off += n as u64;
    }
    Ok(h)
}

/// xorshift64 step on `rsi` (clobbers `rax`), the new state stored to the data area.
fn xorshift(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(rax, rsi)?; // rax = x
    a.shl(rax, 13)?;
    a.xor(rsi, rax)?; // x ^= x << 13
    a.mov(rax, rsi)?;
    a.shr(rax, 7)?;
    a.xor(rsi, rax)?; // x ^= x >> 7
    a.mov(rax, rsi)?;
    a.shl(rax, 17)?;
    a.xor(rsi, rax)?; // x ^= x << 17
    a.mov(qword_ptr(rdi + OFF_RNG), rsi)
}

fn assemble(program: Program, ip: u64) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut top = a.create_label();
    // Entry: load the loop's registers from the data area (rdi).
    a.mov(r8, qword_ptr(rdi + OFF_REPORT_MASK))?;
    a.mov(r9, qword_ptr(rdi + OFF_WS_BASE))?;
    a.mov(r10, qword_ptr(rdi + OFF_WS_MASK))?;
    a.mov(r11, qword_ptr(rdi + OFF_HOT_MASK))?;
    a.mov(rsi, qword_ptr(rdi + OFF_RNG))?;
    a.set_label(&mut top)?;
    match program {
        Program::Counter => {}
        Program::RandomRw { .. } => {
            let mut skip = a.create_label();
            xorshift(&mut a)?;
            a.mov(rax, rsi)?;
            a.and(rax, r10)?;
            a.add(rax, r9)?; // rax = base + (x & mask)
            a.mov(rcx, qword_ptr(rax))?; // read
            a.bt(rsi, 63)?;
            a.jnc(skip)?; // half of the ops only read
            a.add(rcx, rsi)?;
            a.mov(qword_ptr(rax), rcx)?; // write old + x
            a.set_label(&mut skip)?;
        }
        Program::SeqScan { .. } => {
            a.mov(rax, qword_ptr(rdi + OFF_CURSOR))?;
            a.mov(rcx, r9)?;
            a.add(rcx, rax)?; // rcx = base + cursor
            a.add(qword_ptr(rcx), 1)?;
            a.add(rax, 64)?;
            a.and(rax, r10)?; // next line, wrapping
            a.mov(qword_ptr(rdi + OFF_CURSOR), rax)?;
        }
        Program::Scattered { .. } => {
            xorshift(&mut a)?;
            a.mov(rax, rsi)?;
            a.shr(rax, 8)?;
            a.and(rax, r11)?; // an offset i into an eighth of the slice
                              // → chunk i / C at (i / C) × 8C, plus i % C.
            a.mov(rcx, rax)?;
            a.and(rcx, (SCATTER_CHUNK - 1) as i32)?;
            a.shr(rax, SCATTER_SHIFT)?;
            a.shl(rax, SCATTER_SHIFT + 3)?;
            a.or(rax, rcx)?;
            a.add(rax, r9)?;
            a.add(qword_ptr(rax), rsi)?;
        }
        Program::HotCold { .. } => {
            let mut cold = a.create_label();
            let mut go = a.create_label();
            xorshift(&mut a)?;
            a.mov(rax, rsi)?;
            a.shr(rax, 8)?; // address bits
            a.mov(rcx, rsi)?;
            a.and(ecx, 0xff)?; // choice bits
            a.cmp(ecx, HOT_OF_256)?;
            a.jae(cold)?;
            a.and(rax, r11)?; // hot: first eighth
            a.jmp(go)?;
            a.set_label(&mut cold)?;
            a.and(rax, r10)?; // cold: whole slice
            a.set_label(&mut go)?;
            a.add(rax, r9)?;
            a.add(qword_ptr(rax), rsi)?;
        }
    }
    // One op done: counter += 1; report every report_every ops.
    a.mov(rax, qword_ptr(rdi + OFF_COUNTER))?;
    a.inc(rax)?;
    a.mov(qword_ptr(rdi + OFF_COUNTER), rax)?;
    a.test(rax, r8)?;
    a.jnz(top)?;
    a.mov(rcx, rax)?;
    a.shr(rax, 32)?;
    a.mov(edx, u32::from(PORT_PROGRESS_HI))?;
    a.out(dx, eax)?; // high half
    a.mov(eax, ecx)?;
    a.mov(edx, u32::from(PORT_PROGRESS_LO))?;
    a.out(dx, eax)?; // low half: report complete
                     // Digest requested? Hash [base, base + slice) into rbx.
    let mut words = a.create_label();
    a.cmp(qword_ptr(rdi + OFF_DIGEST_REQ), 0)?;
    a.je(top)?;
    a.mov(rbx, FNV_OFFSET)?;
    a.mov(r13, FNV_PRIME)?;
    a.mov(rcx, r9)?; // word pointer
    a.lea(r12, qword_ptr(r9 + r10 + 8))?; // end = base + mask + 8 = base + slice
    a.set_label(&mut words)?;
    a.xor(rbx, qword_ptr(rcx))?; // h ^= word
    a.imul_2(rbx, r13)?; // h *= prime
    a.add(rcx, 8)?;
    a.cmp(rcx, r12)?;
    a.jb(words)?;
    a.mov(qword_ptr(rdi + OFF_DIGEST), rbx)?;
    a.mov(qword_ptr(rdi + OFF_DIGEST_REQ), 0)?;
    a.mov(rax, rbx)?;
    a.shr(rax, 32)?;
    a.mov(edx, u32::from(PORT_DIGEST_HI))?;
    a.out(dx, eax)?;
    a.mov(eax, ebx)?;
    a.mov(edx, u32::from(PORT_DIGEST_LO))?;
    a.out(dx, eax)?;
    a.jmp(top)?;
    a.assemble(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_program_assembles() {
        for p in [
            Program::Counter,
            Program::RandomRw {
                working_set: 1 << 24,
            },
            Program::SeqScan {
                working_set: 1 << 24,
            },
            Program::HotCold {
                working_set: 1 << 24,
            },
            Program::Scattered {
                working_set: 1 << 24,
            },
        ] {
            let code = p.assemble(0x10_0000).unwrap();
            assert!(
                !code.is_empty() && code.len() < 512,
                "{p:?}: {}",
                code.len()
            );
        }
    }

    #[test]
    fn slices_are_powers_of_two() {
        let p = Program::RandomRw {
            working_set: 48 << 20,
        };
        assert_eq!(p.slice_len(1), 32 << 20);
        assert_eq!(p.slice_len(3), 16 << 20);
        assert!(p.validate(64 << 20, 4).is_ok());
        assert!(p.validate(32 << 20, 4).is_err());
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn scattered_chunks_make_an_eighth_of_each_slice() {
        let p = Program::Scattered {
            working_set: 64 << 20,
        };
        for i in 0..2 {
            let (base, len) = p.slice(i, 2);
            let hot = p.hot_ranges(i, 2);
            assert_eq!(hot.len() as u64, len / 8 / SCATTER_CHUNK);
            assert_eq!(hot.iter().map(|r| r.end - r.start).sum::<u64>(), len / 8);
            assert_eq!(hot[0].start, base);
            assert_eq!(hot[1].start - hot[0].start, 8 * SCATTER_CHUNK);
            assert!(hot.last().unwrap().end <= base + len);
        }
        // A slice too small for one stride keeps its hot eighth in one block.
        let small = Program::Scattered {
            working_set: 256 << 10,
        };
        let (base, len) = small.slice(0, 1);
        assert_eq!(small.hot_ranges(0, 1), vec![base..base + len / 8]);
    }
}
