//! vCPU state: what is saved from and restored into a KVM vCPU, and its opaque, versioned
//! byte form.
//!
//! The blob is `MAGIC (8) | version u32 LE | payload length u64 LE | xxh3-64 of payload u64 LE
//! | payload (JSON)`. The structs below mirror the kernel's (`kvm_regs`, `kvm_sregs`,
//! `kvm_fpu`) field by field, so the blob does not depend on how a bindings crate lays them
//! out. A blob of another version, a truncated one or a corrupted one is a typed
//! [`StateError`]; decoding never panics.

use kvm_bindings::{kvm_dtable, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use super::error::{kvm_err, StateError, VmError};

pub const STATE_MAGIC: [u8; 8] = *b"FLTVCPU\0";
pub const STATE_VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 8 + 8;

/// The MSRs that a long-mode guest's behaviour depends on, saved when the host supports them.
pub const SAVED_MSRS: &[u32] = &[
    0x0000_0010, // IA32_TSC
    0x0000_0174, // IA32_SYSENTER_CS
    0x0000_0175, // IA32_SYSENTER_ESP
    0x0000_0176, // IA32_SYSENTER_EIP
    0x0000_0277, // IA32_PAT
    0xc000_0080, // EFER
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0100, // FS_BASE
    0xc000_0101, // GS_BASE
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Regs {
    pub gpr: [u64; 16], // rax rbx rcx rdx rsi rdi rsp rbp r8..r15
    pub rip: u64,
    pub rflags: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    /// type, present, dpl, db, s, l, g, avl, unusable
    pub attrs: [u8; 9],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DTable {
    pub base: u64,
    pub limit: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sregs {
    /// cs ds es fs gs ss tr ldt
    pub segs: [Segment; 8],
    pub gdt: DTable,
    pub idt: DTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
    pub interrupt_bitmap: [u64; 4],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fpu {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

/// Everything the reference VMM saves of one vCPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: Regs,
    pub sregs: Sregs,
    pub fpu: Fpu,
    /// (index, value) of each of [`SAVED_MSRS`] the host supports.
    pub msrs: Vec<(u32, u64)>,
}

/// The state of a whole paused VM, as carried across switchover.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    pub mem_size: u64,
    pub vcpus: Vec<VcpuState>,
    /// Each vCPU's op counter as read from guest memory at pause.
    pub counters: Vec<u64>,
}

impl From<&kvm_regs> for Regs {
    fn from(r: &kvm_regs) -> Self {
        Regs {
            gpr: [
                r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11,
                r.r12, r.r13, r.r14, r.r15,
            ],
            rip: r.rip,
            rflags: r.rflags,
        }
    }
}

impl From<&Regs> for kvm_regs {
    fn from(r: &Regs) -> Self {
        let g = r.gpr;
        kvm_regs {
            rax: g[0],
            rbx: g[1],
            rcx: g[2],
            rdx: g[3],
            rsi: g[4],
            rdi: g[5],
            rsp: g[6],
            rbp: g[7],
            r8: g[8],
            r9: g[9],
            r10: g[10],
            r11: g[11],
            r12: g[12],
            r13: g[13],
            r14: g[14],
            r15: g[15],
            rip: r.rip,
            rflags: r.rflags,
        }
    }
}

impl From<&kvm_segment> for Segment {
    fn from(s: &kvm_segment) -> Self {
        Segment {
            base: s.base,
            limit: s.limit,
            selector: s.selector,
            attrs: [
                s.type_, s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl, s.unusable,
            ],
        }
    }
}

impl From<&Segment> for kvm_segment {
    fn from(s: &Segment) -> Self {
        let a = s.attrs;
        kvm_segment {
            base: s.base,
            limit: s.limit,
            selector: s.selector,
            type_: a[0],
            present: a[1],
            dpl: a[2],
            db: a[3],
            s: a[4],
            l: a[5],
            g: a[6],
            avl: a[7],
            unusable: a[8],
            padding: 0,
        }
    }
}

impl From<&kvm_dtable> for DTable {
    fn from(d: &kvm_dtable) -> Self {
        DTable {
            base: d.base,
            limit: d.limit,
        }
    }
}

impl From<&DTable> for kvm_dtable {
    fn from(d: &DTable) -> Self {
        kvm_dtable {
            base: d.base,
            limit: d.limit,
            padding: [0; 3],
        }
    }
}

impl From<&kvm_sregs> for Sregs {
    fn from(s: &kvm_sregs) -> Self {
        Sregs {
            segs: [s.cs, s.ds, s.es, s.fs, s.gs, s.ss, s.tr, s.ldt].map(|x| Segment::from(&x)),
            gdt: (&s.gdt).into(),
            idt: (&s.idt).into(),
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.apic_base,
            interrupt_bitmap: s.interrupt_bitmap,
        }
    }
}

impl From<&Sregs> for kvm_sregs {
    fn from(s: &Sregs) -> Self {
        let seg = |i: usize| kvm_segment::from(&s.segs[i]);
        kvm_sregs {
            cs: seg(0),
            ds: seg(1),
            es: seg(2),
            fs: seg(3),
            gs: seg(4),
            ss: seg(5),
            tr: seg(6),
            ldt: seg(7),
            gdt: (&s.gdt).into(),
            idt: (&s.idt).into(),
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.apic_base,
            interrupt_bitmap: s.interrupt_bitmap,
        }
    }
}

impl From<&kvm_fpu> for Fpu {
    fn from(f: &kvm_fpu) -> Self {
        Fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&Fpu> for kvm_fpu {
    fn from(f: &Fpu) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

fn msrs_of(entries: &[(u32, u64)]) -> Result<Msrs, VmError> {
    let e: Vec<kvm_msr_entry> = entries
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&e).map_err(|e| VmError::Config(format!("too many MSRs: {e:?}")))
}

impl VcpuState {
    /// Read the state of a vCPU that is not running. A vCPU that last exited for port I/O
    /// must first have completed it (KVM_RUN with `immediate_exit`), see `vcpu.rs`.
    pub fn save(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, VmError> {
        let regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let fpu = vcpu.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?;
        let wanted: Vec<(u32, u64)> = msr_indices.iter().map(|&i| (i, 0)).collect();
        let mut msrs = msrs_of(&wanted)?;
        let n = vcpu.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        if n != wanted.len() {
            return Err(VmError::Config(format!(
                "KVM_GET_MSRS read {n} of {} MSRs (first unreadable: {:#x})",
                wanted.len(),
                wanted[n].0
            )));
        }
        Ok(VcpuState {
            regs: (&regs).into(),
            sregs: (&sregs).into(),
            fpu: (&fpu).into(),
            msrs: msrs.as_slice().iter().map(|e| (e.index, e.data)).collect(),
        })
    }

    /// Load this state into a vCPU (CPUID must already be set, so EFER.LME is accepted).
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), VmError> {
        vcpu.set_sregs(&(&self.sregs).into())
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        let msrs = msrs_of(&self.msrs)?;
        let n = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        if n != self.msrs.len() {
            return Err(VmError::Config(format!(
                "KVM_SET_MSRS wrote {n} of {} MSRs (first refused: {:#x})",
                self.msrs.len(),
                self.msrs[n].0
            )));
        }
        vcpu.set_fpu(&(&self.fpu).into())
            .map_err(kvm_err("KVM_SET_FPU"))?;
        vcpu.set_regs(&(&self.regs).into())
            .map_err(kvm_err("KVM_SET_REGS"))
    }
}

impl VmState {
    /// The opaque, versioned byte form.
    pub fn encode(&self) -> Vec<u8> {
        let payload = serde_json::to_vec(self).expect("VmState serializes to JSON");
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(&STATE_MAGIC);
        out.extend_from_slice(&STATE_VERSION.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&xxh3_64(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Parse and check a blob made by [`VmState::encode`].
    pub fn decode(blob: &[u8]) -> Result<VmState, StateError> {
        if blob.len() < HEADER_LEN {
            if blob.len() >= 8 && blob[..8] != STATE_MAGIC {
                return Err(StateError::BadMagic);
            }
            return Err(StateError::TruncatedHeader {
                len: blob.len(),
                needed: HEADER_LEN,
            });
        }
        if blob[..8] != STATE_MAGIC {
            return Err(StateError::BadMagic);
        }
        let u32_at = |o: usize| u32::from_le_bytes(blob[o..o + 4].try_into().unwrap_or([0; 4]));
        let u64_at = |o: usize| u64::from_le_bytes(blob[o..o + 8].try_into().unwrap_or([0; 8]));
        let version = u32_at(8);
        if version != STATE_VERSION {
            return Err(StateError::Version {
                found: version,
                expected: STATE_VERSION,
            });
        }
        let len = u64_at(12);
        let sum = u64_at(20);
        let payload = &blob[HEADER_LEN..];
        if payload.len() as u64 != len {
            return Err(StateError::TruncatedPayload {
                expected: len,
                found: payload.len() as u64,
            });
        }
        if xxh3_64(payload) != sum {
            return Err(StateError::Checksum);
        }
        let state: VmState =
            serde_json::from_slice(payload).map_err(|e| StateError::Malformed(e.to_string()))?;
        if state.vcpus.is_empty() || state.vcpus.len() != state.counters.len() {
            return Err(StateError::Malformed(format!(
                "{} vCPU states and {} counters",
                state.vcpus.len(),
                state.counters.len()
            )));
        }
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmState {
        let mut sregs = kvm_sregs::default();
        crate::layout::long_mode_sregs(&mut sregs);
        let v = VcpuState {
            regs: Regs {
                gpr: [7; 16],
                rip: 0x10_0000,
                rflags: 2,
            },
            sregs: (&sregs).into(),
            fpu: (&kvm_fpu::default()).into(),
            msrs: vec![(0xc000_0080, 0x500)],
        };
        VmState {
            mem_size: 64 << 20,
            vcpus: vec![v.clone(), v],
            counters: vec![1, 2],
        }
    }

    #[test]
    fn round_trips_and_mirrors_kvm_structs() {
        let s = sample();
        assert_eq!(VmState::decode(&s.encode()).unwrap(), s);
        let k: kvm_sregs = (&s.vcpus[0].sregs).into();
        assert_eq!(Sregs::from(&k), s.vcpus[0].sregs);
    }

    #[test]
    fn every_truncation_and_bit_flip_is_a_typed_error() {
        let blob = sample().encode();
        for n in 0..blob.len() {
            assert!(VmState::decode(&blob[..n]).is_err(), "prefix {n} accepted");
        }
        for i in (0..blob.len()).step_by(7) {
            let mut b = blob.clone();
            b[i] ^= 0x40;
            assert!(VmState::decode(&b).is_err(), "flip at {i} accepted");
        }
    }
}
