//! A small reference VMM on `kvm-ioctls`: memfd-backed guest memory, 1 to 4 vCPUs in
//! identity-mapped 64-bit long mode, bare-metal guest programs assembled from Rust, and vCPU
//! state save/restore to an opaque versioned blob — the pieces a postcopy migration moves.
//!
//! It is faultline's stand-in for a real Rust VMM: it embeds `vmm-shim` the way one would
//! (its memory reaches faultline through [`vmm_shim::guest::regions`]), and nothing a VMM
//! links depends on it. It knows nothing about the command line, the network or the
//! migration protocol; the `faultline vm` commands drive it.
//!
//! ```no_run
//! use refvmm::{memory, Program, Vm, VmConfig};
//!
//! # fn main() -> Result<(), refvmm::VmError> {
//! let config = VmConfig {
//!     mem_size: 64 << 20,
//!     vcpus: 2,
//!     program: Program::RandomRw { working_set: 32 << 20 },
//!     ..VmConfig::default()
//! };
//! let mut vm = Vm::new(config.clone())?;
//! vm.start()?;
//! std::thread::sleep(std::time::Duration::from_millis(100));
//! let snapshot = vm.pause()?; // all vCPUs stopped, state saved
//! let blob = snapshot.as_bytes().to_vec(); // what crosses the wire with the memory
//! vm.stop()?;
//!
//! // "Destination": fresh memory with the source's bytes, and the blob.
//! let memory = memory::create_guest_memory(config.mem_size as usize)?;
//! memory::copy_memory(vm.guest_memory(), &memory)?;
//! let mut dest = Vm::restore(config, memory, refvmm::VmSnapshot::from_bytes(blob)?)?;
//! dest.start()?; // the guest continues from where it stopped
//! # Ok(()) }
//! ```

pub mod dirty_log;
pub mod error;
pub mod layout;
pub mod memory;
pub mod programs;
pub mod rate;
pub mod state;
pub mod switchover;
pub mod vcpu;

use std::os::unix::thread::JoinHandleExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use uffd_core::HostRegion;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

pub use dirty_log::KvmDirtyLog;
pub use error::{StateError, VmError};
pub use programs::Program;
pub use state::{VcpuState, VmState, STATE_VERSION};
pub use switchover::Switchover;
pub use vcpu::GuestDigest;

use error::kvm_err;
pub use vcpu::MAX_THROTTLE_PCT;
use vcpu::{Cmd, Report, Shared, VcpuThread, REQ_PAUSE, REQ_RUN, REQ_STOP};

const KVM_PATH: &str = "/dev/kvm";
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
const TSS_ADDR: usize = 0xfffb_d000;

/// What to build: memory size, vCPU count and the guest program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// Guest memory in bytes, a multiple of 2 MiB (default 1 GiB).
    pub mem_size: u64,
    /// 1 to 4.
    pub vcpus: usize,
    pub program: Program,
    /// Ops between progress reports (a power of two; each report is two port exits).
    pub report_every: u64,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            mem_size: 1 << 30,
            vcpus: 1,
            program: Program::Counter,
            report_every: 1 << 16,
        }
    }
}

impl VmConfig {
    fn validate(&self) -> Result<(), VmError> {
        if !(1..=layout::MAX_VCPUS).contains(&self.vcpus) {
            return Err(VmError::Config(format!(
                "{} vCPUs; 1 to {} are supported",
                self.vcpus,
                layout::MAX_VCPUS
            )));
        }
        if !self.report_every.is_power_of_two() {
            return Err(VmError::Config(format!(
                "report_every {} must be a power of two",
                self.report_every
            )));
        }
        layout::check_mem_size(self.mem_size)?;
        self.program.validate(self.mem_size, self.vcpus)
    }
}

/// How the VM's memory slots are set up, beyond [`VmConfig`]. The default keeps the plain
/// behaviour.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmOptions {
    /// Register the guest memory slot(s) with `KVM_MEM_LOG_DIRTY_PAGES`, so that
    /// [`Vm::dirty_tracker`] can report the pages vCPUs write (default false). KVM then
    /// write-protects guest memory in its stage-2 tables, which costs the guest a little.
    pub dirty_log: bool,
}

/// The saved state of a paused VM: an opaque versioned blob (see [`state`]) plus its parsed
/// form. Guest memory travels separately.
#[derive(Clone, Debug)]
pub struct VmSnapshot {
    blob: Vec<u8>,
    state: VmState,
}

impl VmSnapshot {
    /// Parse and check a blob; another version, truncation or corruption is a typed error.
    pub fn from_bytes(blob: Vec<u8>) -> Result<VmSnapshot, StateError> {
        let state = VmState::decode(&blob)?;
        Ok(VmSnapshot { blob, state })
    }

    fn from_state(state: VmState) -> VmSnapshot {
        VmSnapshot {
            blob: state.encode(),
            state,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.blob
    }

    pub fn state(&self) -> &VmState {
        &self.state
    }

    /// Each vCPU's op counter in guest memory at the moment of the pause.
    pub fn counters(&self) -> &[u64] {
        &self.state.counters
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RunState {
    /// Built by [`Vm::prepare_restore`]: waits for [`Vm::load_state`].
    AwaitingState,
    Created,
    Running,
    Paused,
    Stopped,
}

impl RunState {
    fn name(self) -> &'static str {
        match self {
            RunState::AwaitingState => "waiting for its state",
            RunState::Created => "not started",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Stopped => "stopped",
        }
    }
}

/// A KVM virtual machine running one of the bare-metal [`Program`]s.
pub struct Vm {
    config: VmConfig,
    run_state: RunState,
    shared: Arc<Shared>,
    /// vCPUs not yet handed to their threads.
    unstarted: Vec<VcpuFd>,
    threads: Vec<JoinHandle<()>>,
    cmds: Vec<Sender<Cmd>>,
    reports: Option<Receiver<Report>>,
    msr_indices: Vec<u32>,
    paused_at: Option<Instant>,
    /// The guest's CPUID advertises KVM's asynchronous page faults (see [`Vm::async_pf_exposed`]).
    async_pf: bool,
    options: VmOptions,
    /// Shared with [`KvmDirtyLog`] trackers.
    vm_fd: Arc<VmFd>,
    _kvm: Kvm,
    /// Dropped last: KVM's memory slot points into it.
    memory: GuestMemoryMmap,
}

/// Open `/dev/kvm` and check the capabilities the VMM uses. The error says what to change.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let path = Path::new(KVM_PATH);
    if !path.exists() {
        return Err(VmError::KvmUnavailable(format!(
            "{KVM_PATH} does not exist: load the KVM module (`modprobe kvm_intel` or \
             `modprobe kvm_amd`), enable VT-x/AMD-V in the firmware, or on a virtual machine \
             enable nested virtualisation"
        )));
    }
    let kvm = Kvm::new().map_err(|e| {
        let owner = std::fs::metadata(path)
            .map(|m| {
                use std::os::unix::fs::{MetadataExt, PermissionsExt};
                format!(
                    "mode {:o}, owner uid {} gid {}",
                    m.permissions().mode() & 0o777,
                    m.uid(),
                    m.gid()
                )
            })
            .unwrap_or_default();
        let hint = match e.errno() {
            libc::EACCES | libc::EPERM => format!(
                "permission denied ({owner}): run as root, add this user to the group that owns \
                 {KVM_PATH} (usually `kvm`: `sudo usermod -aG kvm $USER`, then log in again), \
                 or `sudo chmod 0666 {KVM_PATH}`"
            ),
            libc::ENXIO | libc::ENODEV | libc::ENOENT => format!(
                "the KVM module is not loaded: `modprobe kvm_intel` or `modprobe kvm_amd` \
                 (and enable VT-x/AMD-V in the firmware) ({owner})"
            ),
            _ => format!("cannot open {KVM_PATH} ({owner}): {e}"),
        };
        VmError::KvmUnavailable(hint)
    })?;
    if kvm.get_api_version() != 12 {
        return Err(VmError::KvmUnavailable(format!(
            "KVM API version {} (12 expected): use a newer kernel",
            kvm.get_api_version()
        )));
    }
    for (cap, name) in [
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::KvmUnavailable(format!(
                "the kernel's KVM lacks {name}: use Linux 4.11 or newer"
            )));
        }
    }
    Ok(kvm)
}

/// Whether `state` fits `config` and `memory` (sizes, vCPU count).
fn check_state(
    config: &VmConfig,
    memory: &GuestMemoryMmap,
    state: &VmState,
) -> Result<(), VmError> {
    let mem = memory::memory_size(memory);
    if state.mem_size != config.mem_size || mem != config.mem_size {
        return Err(StateError::Mismatch(format!(
            "snapshot of {} bytes of memory, config {} bytes, memory given {mem} bytes",
            state.mem_size, config.mem_size
        ))
        .into());
    }
    if state.vcpus.len() != config.vcpus {
        return Err(StateError::Mismatch(format!(
            "snapshot has {} vCPUs, config {}",
            state.vcpus.len(),
            config.vcpus
        ))
        .into());
    }
    Ok(())
}

impl Vm {
    /// Build a VM with fresh memory: page tables, GDT, the program and each vCPU's data area
    /// are written to guest memory and the vCPUs set to start at the program in long mode.
    pub fn new(config: VmConfig) -> Result<Vm, VmError> {
        Vm::new_with_options(config, VmOptions::default())
    }

    /// [`Vm::new`] with memory-slot options (e.g. KVM dirty logging for a replica).
    pub fn new_with_options(config: VmConfig, options: VmOptions) -> Result<Vm, VmError> {
        config.validate()?;
        let memory = memory::create_guest_memory(config.mem_size as usize)?;
        layout::write_system_tables(&memory, config.mem_size)?;
        let code = config.program.assemble(layout::CODE_ADDR)?;
        memory::write_bytes(&memory, layout::CODE_ADDR, &code)?;
        for i in 0..config.vcpus {
            config
                .program
                .init_data(&memory, i, config.vcpus, config.report_every)?;
        }
        Vm::build(config, memory, None, options)
    }

    /// Build a VM from guest memory that already holds a paused VM's contents (a copy, or a
    /// migration's destination memory) and the snapshot taken at the pause. Nothing is
    /// written to guest memory; the vCPUs continue where they were paused.
    pub fn restore(
        config: VmConfig,
        memory: GuestMemoryMmap,
        snapshot: VmSnapshot,
    ) -> Result<Vm, VmError> {
        Vm::restore_with_options(config, memory, snapshot, VmOptions::default())
    }

    /// [`Vm::restore`] with memory-slot options (e.g. KVM dirty logging for a replica).
    pub fn restore_with_options(
        config: VmConfig,
        memory: GuestMemoryMmap,
        snapshot: VmSnapshot,
        options: VmOptions,
    ) -> Result<Vm, VmError> {
        config.validate()?;
        check_state(&config, &memory, &snapshot.state)?;
        Vm::build(config, memory, Some(snapshot.state), options)
    }

    /// Build the VM a migration will restore into before its state arrives: the KVM VM, its
    /// memory slot and its vCPUs (with CPUID) are made now, so that only the registers are
    /// left for [`Vm::load_state`], which must come before [`Vm::start`]. A destination
    /// does this while it waits for the source, taking the rest out of the downtime.
    pub fn prepare_restore(config: VmConfig, memory: GuestMemoryMmap) -> Result<Vm, VmError> {
        config.validate()?;
        let mem = memory::memory_size(&memory);
        if mem != config.mem_size {
            return Err(StateError::Mismatch(format!(
                "config {} bytes of memory, memory given {mem} bytes",
                config.mem_size
            ))
            .into());
        }
        // `build` gives the vCPUs boot registers (sregs, regs); `load_state` overwrites
        // those and the rest it restores before anything runs.
        let mut vm = Vm::build(config, memory, None, VmOptions::default())?;
        vm.run_state = RunState::AwaitingState;
        Ok(vm)
    }

    /// Restore a paused VM's vCPUs from `snapshot` into a VM made by
    /// [`Vm::prepare_restore`] (see [`Vm::restore`]). A snapshot of another shape is refused
    /// and the VM keeps waiting.
    pub fn load_state(&mut self, snapshot: VmSnapshot) -> Result<(), VmError> {
        if self.run_state != RunState::AwaitingState {
            return Err(self.wrong("load_state"));
        }
        let state = snapshot.state;
        check_state(&self.config, &self.memory, &state)?;
        for (i, fd) in self.unstarted.iter().enumerate() {
            state.vcpus[i].restore(fd)?;
            self.shared.progress[i].store(state.counters[i], Ordering::Relaxed);
        }
        self.run_state = RunState::Created;
        Ok(())
    }

    fn build(
        config: VmConfig,
        memory: GuestMemoryMmap,
        state: Option<VmState>,
        options: VmOptions,
    ) -> Result<Vm, VmError> {
        vcpu::install_kick_handler()?;
        let kvm = open_kvm()?;
        let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm_fd
            .set_tss_address(TSS_ADDR)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        for (slot, r) in memory.iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: if options.dirty_log {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping of `r.len()` bytes owned by `memory`, which
            // the Vm keeps (and drops after the vCPU fds) for as long as vCPUs can run. A
            // `KvmDirtyLog` may keep the VM fd (and so the slot) alive longer; KVM follows the
            // host unmapping through its MMU notifier, and only reads the slot's dirty bitmap.
            unsafe { vm_fd.set_user_memory_region(region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let supported = kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
        let msr_indices: Vec<u32> = state::SAVED_MSRS
            .iter()
            .copied()
            .filter(|i| supported.as_slice().contains(i))
            .collect();
        let shared = Arc::new(Shared::new(config.vcpus));
        let mut unstarted = Vec::with_capacity(config.vcpus);
        for i in 0..config.vcpus {
            let fd = vm_fd
                .create_vcpu(i as u64)
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            vcpu::set_cpuid(&fd, &cpuid, i)?;
            match &state {
                Some(s) => {
                    s.vcpus[i].restore(&fd)?;
                    shared.progress[i].store(s.counters[i], Ordering::Relaxed);
                }
                None => vcpu::setup_boot_state(&fd, i)?,
            }
            unstarted.push(fd);
        }
        Ok(Vm {
            config,
            run_state: RunState::Created,
            shared,
            unstarted,
            threads: Vec::new(),
            cmds: Vec::new(),
            reports: None,
            msr_indices,
            paused_at: None,
            async_pf: vcpu::advertises_async_pf(&cpuid),
            options,
            vm_fd: Arc::new(vm_fd),
            _kvm: kvm,
            memory,
        })
    }

    fn wrong(&self, op: &'static str) -> VmError {
        VmError::WrongState {
            op,
            state: self.run_state.name(),
        }
    }

    /// Start one thread per vCPU.
    pub fn start(&mut self) -> Result<(), VmError> {
        if self.run_state != RunState::Created {
            return Err(self.wrong("start"));
        }
        let (report_tx, report_rx) = mpsc::channel();
        self.shared.request.store(REQ_RUN, Ordering::Release);
        for (id, fd) in std::mem::take(&mut self.unstarted).into_iter().enumerate() {
            let (cmd_tx, cmd_rx) = mpsc::channel();
            let t = VcpuThread {
                id,
                vcpu: fd,
                shared: self.shared.clone(),
                cmds: cmd_rx,
                reports: report_tx.clone(),
                msr_indices: self.msr_indices.clone(),
                memory: self.memory.clone(),
                data_area: layout::data_area(id),
                slice: self.config.program.slice(id, self.config.vcpus),
            };
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || t.run())
                .map_err(VmError::Thread)?;
            self.threads.push(handle);
            self.cmds.push(cmd_tx);
        }
        self.reports = Some(report_rx);
        self.run_state = RunState::Running;
        Ok(())
    }

    /// Stop every vCPU (kicking them out of `KVM_RUN`), save their state and return it. The
    /// vCPUs stay parked until [`Vm::resume`] or [`Vm::stop`]; nothing writes guest memory
    /// meanwhile.
    pub fn pause(&mut self) -> Result<VmSnapshot, VmError> {
        self.pause_inner(Duration::ZERO)
    }

    /// Pause at a clean point for a migration: each vCPU stops at its next progress report
    /// (its next `out`, within `report_every` ops), so after a restore the guest's first step
    /// is its digest check, with nothing written to its working-set slice in between. vCPUs
    /// that have not reported within `grace` are kicked out of `KVM_RUN` wherever they are;
    /// [`Vm::paused_at_report`] tells which ones stopped cleanly.
    pub fn pause_at_report(&mut self, grace: Duration) -> Result<VmSnapshot, VmError> {
        self.pause_inner(grace)
    }

    fn pause_inner(&mut self, kick_after: Duration) -> Result<VmSnapshot, VmError> {
        if self.run_state != RunState::Running {
            return Err(self.wrong("pause"));
        }
        let rx = self.reports.as_ref().ok_or_else(|| self.wrong("pause"))?;
        self.shared.request.store(REQ_PAUSE, Ordering::Release);
        let n = self.config.vcpus;
        let mut states: Vec<Option<VcpuState>> = vec![None; n];
        let asked = Instant::now();
        let deadline = asked + kick_after + PAUSE_TIMEOUT;
        while states.iter().any(Option::is_none) {
            if asked.elapsed() >= kick_after {
                for (i, t) in self.threads.iter().enumerate() {
                    if states[i].is_none() {
                        vcpu::kick(t.as_pthread_t());
                    }
                }
            }
            match rx.recv_timeout(Duration::from_millis(1)) {
                Ok(Report::Paused(i, s)) => states[i] = Some(*s),
                Ok(Report::Exited(vcpu, reason)) => {
                    return Err(VmError::VcpuExited { vcpu, reason });
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(VmError::VcpuExited {
                        vcpu: 0,
                        reason: "all vCPU threads ended".into(),
                    })
                }
            }
            if Instant::now() > deadline {
                return Err(VmError::Timeout {
                    what: "pause",
                    ms: PAUSE_TIMEOUT.as_millis() as u64,
                });
            }
        }
        self.paused_at = Some(Instant::now());
        self.run_state = RunState::Paused;
        let state = VmState {
            mem_size: self.config.mem_size,
            vcpus: states.into_iter().flatten().collect(),
            counters: self.guest_counters()?,
        };
        Ok(VmSnapshot::from_state(state))
    }

    /// For each vCPU, whether its last pause came right after a progress report (see
    /// [`Vm::pause_at_report`]) rather than at an arbitrary instruction.
    pub fn paused_at_report(&self) -> Vec<bool> {
        self.shared
            .parked_at_report
            .iter()
            .map(|a| a.load(Ordering::Acquire))
            .collect()
    }

    /// Migration check, on a paused source: clear each vCPU's last digest and set its
    /// digest request in guest memory, so that the guest, resumed at the destination after
    /// [`Vm::pause_at_report`], hashes its whole slice (faulting it in over postcopy) before
    /// it writes anything. Its digest then equals the source's hash of the slice now.
    pub fn arm_switchover_digest(&self) -> Result<(), VmError> {
        if self.run_state == RunState::Running {
            return Err(self.wrong("arm the switchover digest of"));
        }
        for i in 0..self.config.vcpus {
            let area = layout::data_area(i);
            memory::write_u64(&self.memory, area + programs::OFF_DIGEST, 0)?;
            memory::write_u64(&self.memory, area + programs::OFF_DIGEST_REQ, 1)?;
        }
        Ok(())
    }

    /// Guest pages this VMM itself writes while the guest is paused
    /// ([`Vm::arm_switchover_digest`], [`Vm::request_digests`]): the vCPU data areas. KVM's
    /// dirty log records only vCPU writes, so a replicating VMM must mark these dirty itself
    /// (as it must for device DMA) or the standby would keep an older copy.
    pub fn vmm_written_pages(&self) -> Vec<u64> {
        (0..self.config.vcpus)
            .map(|i| layout::data_area(i) / uffd_core::PAGE_SIZE as u64)
            .collect()
    }

    /// Hold each vCPU in the port exit of its next digest report until
    /// [`Vm::release_hold`] (or a pause/stop). Set before [`Vm::start`] on a migration's
    /// destination, so that all memory can be hashed in the state it had at switchover.
    pub fn set_hold_after_digest(&self, on: bool) {
        self.shared.hold_after_digest.store(on, Ordering::Release);
    }

    /// Let vCPUs held by [`Vm::set_hold_after_digest`] continue.
    pub fn release_hold(&self) {
        self.set_hold_after_digest(false);
    }

    /// Which vCPUs are waiting in the hold after their digest report.
    pub fn held(&self) -> Vec<bool> {
        self.shared
            .held
            .iter()
            .map(|a| a.load(Ordering::Acquire))
            .collect()
    }

    /// When each vCPU last entered the hold after a digest report.
    pub fn held_at(&self) -> Vec<Option<Instant>> {
        self.shared
            .held_at
            .iter()
            .map(|m| *m.lock().unwrap_or_else(|e| e.into_inner()))
            .collect()
    }

    /// xxh3-128 of all guest memory as it was at the source's switchover, taken on a
    /// destination whose vCPUs all wait in the hold after their switchover digest report
    /// (see [`Vm::arm_switchover_digest`]). Between the restore and the hold each guest
    /// wrote exactly two words, its digest and its cleared request; they are hashed with the
    /// values they had at switchover (digest 0, request 1). Everything else is hashed as is.
    pub fn switchover_memory_digest(&self) -> Result<String, VmError> {
        if self.run_state == RunState::Running && !self.held().iter().all(|&h| h) {
            return Err(self.wrong("take the switchover digest (vCPUs not all held) of"));
        }
        let mut patches = Vec::with_capacity(self.config.vcpus * 2);
        for i in 0..self.config.vcpus {
            let area = layout::data_area(i);
            patches.push((area + programs::OFF_DIGEST, 0));
            patches.push((area + programs::OFF_DIGEST_REQ, 1));
        }
        memory::digest_patched(&self.memory, &patches)
    }

    /// Host-side digests of each vCPU's working-set slice, the same function the guest
    /// computes ([`programs::slice_digest`]); refused while vCPUs run.
    pub fn slice_digests(&self) -> Result<Vec<u64>, VmError> {
        if self.run_state == RunState::Running {
            return Err(self.wrong("digest the slices of"));
        }
        slice_digests(&self.memory, &self.config)
    }

    /// Let paused vCPUs continue.
    pub fn resume(&mut self) -> Result<(), VmError> {
        if self.run_state != RunState::Paused {
            return Err(self.wrong("resume"));
        }
        *self
            .shared
            .first_run
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        self.shared.request.store(REQ_RUN, Ordering::Release);
        for c in &self.cmds {
            let _ = c.send(Cmd::Resume);
        }
        self.run_state = RunState::Running;
        Ok(())
    }

    /// Stop and join every vCPU thread. Idempotent. Guest memory stays readable.
    pub fn stop(&mut self) -> Result<(), VmError> {
        self.shared.request.store(REQ_STOP, Ordering::Release);
        for c in &self.cmds {
            let _ = c.send(Cmd::Stop);
        }
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while self.threads.iter().any(|t| !t.is_finished()) {
            for t in self.threads.iter().filter(|t| !t.is_finished()) {
                vcpu::kick(t.as_pthread_t());
            }
            if Instant::now() > deadline {
                self.run_state = RunState::Stopped;
                return Err(VmError::Timeout {
                    what: "stop",
                    ms: PAUSE_TIMEOUT.as_millis() as u64,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.unstarted.clear();
        self.run_state = RunState::Stopped;
        Ok(())
    }

    /// First problem reported by a vCPU thread that ended on its own, if any.
    pub fn check_vcpus(&self) -> Result<(), VmError> {
        if let Some(rx) = &self.reports {
            if let Ok(Report::Exited(vcpu, reason)) = rx.try_recv() {
                return Err(VmError::VcpuExited { vcpu, reason });
            }
        }
        Ok(())
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Keeps every vCPU off the CPU for `pct` percent of its time from now on (0: not at
    /// all; at most [`MAX_THROTTLE_PCT`]), like QEMU's `cpu-throttle-percentage` but counted
    /// in the vCPU thread's CPU time rather than as a wall-clock duty cycle: each vCPU uses
    /// at most `100 - pct` percent of a core, and on a busy host, where it gets less anyway,
    /// the guest slows by less than `pct`. The vCPUs nap at their progress reports, each
    /// nap paying for at most 20 ms of CPU, so a guest reporting seldom is throttled less; a
    /// pause, a stop or a lifted throttle ends a nap at once.
    pub fn set_cpu_throttle(&self, pct: u8) -> Result<(), VmError> {
        if pct > MAX_THROTTLE_PCT {
            return Err(VmError::Config(format!(
                "a CPU throttle of {pct}%: at most {MAX_THROTTLE_PCT}%"
            )));
        }
        self.shared.throttle_pct.store(pct, Ordering::Relaxed);
        Ok(())
    }

    /// The CPU throttle set by [`Vm::set_cpu_throttle`], percent.
    pub fn cpu_throttle(&self) -> u8 {
        self.shared.throttle_pct.load(Ordering::Relaxed)
    }

    /// The latest op counter each vCPU reported through port I/O (after a restore: the
    /// counter at the pause until the first new report).
    pub fn progress(&self) -> Vec<u64> {
        self.shared
            .progress
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect()
    }

    /// The first counter each vCPU reported since this Vm was started (`None`: none yet).
    /// After a restore this shows whether the guest continued or restarted from zero.
    pub fn first_progress(&self) -> Vec<Option<u64>> {
        self.shared.first_progress()
    }

    /// Number of progress reports each vCPU made.
    pub fn reports(&self) -> Vec<u64> {
        self.shared
            .reports
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect()
    }

    /// Each vCPU's op counter read from its data area in guest memory.
    pub fn guest_counters(&self) -> Result<Vec<u64>, VmError> {
        (0..self.config.vcpus)
            .map(|i| memory::read_u64(&self.memory, layout::data_area(i) + programs::OFF_COUNTER))
            .collect()
    }

    /// Ask every vCPU's guest program to hash its working-set slice at its next progress
    /// report; see [`Vm::digests`] for the results.
    pub fn request_digests(&self) -> Result<(), VmError> {
        for i in 0..self.config.vcpus {
            memory::write_u64(
                &self.memory,
                layout::data_area(i) + programs::OFF_DIGEST_REQ,
                1,
            )?;
        }
        Ok(())
    }

    /// The latest digest each vCPU reported (guest and host side), and how many each made.
    pub fn digests(&self) -> (Vec<Option<GuestDigest>>, Vec<u64>) {
        let d = self
            .shared
            .digests
            .iter()
            .map(|m| *m.lock().unwrap_or_else(|e| e.into_inner()))
            .collect();
        let n = self
            .shared
            .digest_reports
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect();
        (d, n)
    }

    /// The memory-slot options the VM was built with.
    pub fn options(&self) -> VmOptions {
        self.options
    }

    /// A [`KvmDirtyLog`] over all guest memory (slots in guest-physical order, the page
    /// numbering of [`Vm::host_regions`]), sharing this VM's fd. Needs
    /// [`VmOptions::dirty_log`]; more than one tracker would steal each other's bits, so
    /// take one per VM. Only vCPU writes are logged, not the host's (see [`dirty_log`]).
    pub fn dirty_tracker(&self) -> Result<KvmDirtyLog, VmError> {
        if !self.options.dirty_log {
            return Err(VmError::Config(
                "dirty tracking needs the VM built with VmOptions { dirty_log: true }".into(),
            ));
        }
        let mut regions: Vec<(u64, u32, u64)> = self
            .memory
            .iter()
            .enumerate()
            .map(|(slot, r)| (r.start_addr().0, slot as u32, r.len()))
            .collect();
        regions.sort_unstable();
        let slots: Vec<(u32, u64)> = regions.into_iter().map(|(_, s, l)| (s, l)).collect();
        KvmDirtyLog::new(self.vm_fd.clone(), &slots)
            .map_err(|e| VmError::Memory(format!("KVM dirty log: {}", uffd_core::error::chain(&e))))
    }

    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Host mappings of guest memory, for userfaultfd and dirty tracking.
    pub fn host_regions(&self) -> Result<Vec<HostRegion>, VmError> {
        memory::host_regions(&self.memory)
    }

    /// xxh3-128 of all guest memory; refused while vCPUs run (it would not be stable).
    pub fn memory_digest(&self) -> Result<String, VmError> {
        if self.run_state == RunState::Running {
            return Err(self.wrong("digest the memory of"));
        }
        memory::digest(&self.memory)
    }

    /// When the last pause completed (every vCPU stopped and saved).
    pub fn paused_at(&self) -> Option<Instant> {
        self.paused_at
    }

    /// Whether the guest's CPUID advertises KVM's asynchronous page fault feature
    /// (`KVM_FEATURE_ASYNC_PF`, leaf 0x4000_0001). The vCPUs get the CPUID the host's KVM
    /// supports, so this is exposed exactly where the host has it. A guest kernel that enables
    /// it (`MSR_KVM_ASYNC_PF_EN`) is told "page not present, run something else" when a vCPU
    /// touches a page still in flight, instead of stalling; the bare-metal programs here do
    /// not enable it (they have no interrupt handling), so their vCPUs stall in `KVM_RUN`
    /// until userfaultfd installs the page. See docs/vm.md.
    pub fn async_pf_exposed(&self) -> bool {
        self.async_pf
    }

    /// Kernel thread id of each vCPU thread (0 for one not started yet).
    pub fn vcpu_thread_ids(&self) -> Vec<u32> {
        self.shared
            .thread_ids
            .iter()
            .map(|t| t.load(Ordering::Relaxed))
            .collect()
    }

    /// A handle that reads the guests' progress from another thread (a rate sampler),
    /// without access to the `Vm` itself.
    pub fn progress_probe(&self) -> ProgressProbe {
        ProgressProbe {
            memory: self.memory.clone(),
            counters: (0..self.config.vcpus)
                .map(|i| layout::data_area(i) + programs::OFF_COUNTER)
                .collect(),
        }
    }

    /// When a vCPU first entered `KVM_RUN` after the last start or resume.
    pub fn first_run_at(&self) -> Option<Instant> {
        *self
            .shared
            .first_run
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

/// Reads the guests' op counters straight from their data areas in guest memory, where
/// each program stores its counter on every op: one-op resolution with no VM exit (the
/// port-I/O reports come only every `report_every` ops, and a guest that is mostly waiting
/// for pages may make none for a long while). `Send`, cheap.
///
/// On a postcopy destination the first read may fault the data-area page in; the vCPU
/// touches that page on its first op anyway.
#[derive(Clone)]
pub struct ProgressProbe {
    memory: GuestMemoryMmap,
    counters: Vec<u64>,
}

impl ProgressProbe {
    /// The sum over vCPUs of their op counters (a counter that cannot be read counts 0).
    pub fn total(&self) -> u64 {
        self.counters
            .iter()
            .map(|&gpa| memory::read_u64(&self.memory, gpa).unwrap_or(0))
            .sum()
    }
}

/// Host-side digest of each vCPU's working-set slice in `mem`, as the guest program of
/// `config` computes it. Only meaningful while the VM is paused (or its memory is a copy).
pub fn slice_digests(mem: &GuestMemoryMmap, config: &VmConfig) -> Result<Vec<u64>, VmError> {
    (0..config.vcpus)
        .map(|i| {
            let (base, len) = config.program.slice(i, config.vcpus);
            programs::slice_digest(mem, base, len)
        })
        .collect()
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
