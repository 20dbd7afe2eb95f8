//! vCPU threads: one OS thread per vCPU runs `KVM_RUN` in a loop, handles the progress port,
//! and parks on a pause request after saving its state.
//!
//! Pausing: the controller sets the shared request to `PAUSE` and sends [`kick_signal`] to
//! each vCPU thread, repeating until every thread has answered (a signal that lands just
//! before the thread enters `KVM_RUN` is covered by the next kick). `KVM_RUN` returns
//! `EINTR`, the thread sees the request, completes any pending port I/O with a
//! `KVM_RUN` under `immediate_exit` (as the KVM API requires before saving state), saves its
//! state and waits for `Resume` or `Stop`.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, CpuId};
use kvm_ioctls::{VcpuExit, VcpuFd};
use uffd_core::error::chain;

use super::error::{kvm_err, VmError};
use super::layout::{data_area, long_mode_sregs, stack_top, BOOT_RFLAGS, CODE_ADDR};
use super::memory::read_u64;
use super::programs::{
    slice_digest, OFF_DIGEST, PORT_DIGEST_HI, PORT_DIGEST_LO, PORT_PROGRESS_HI, PORT_PROGRESS_LO,
};
use super::state::VcpuState;

pub(crate) const REQ_RUN: u8 = 0;
pub(crate) const REQ_PAUSE: u8 = 1;
pub(crate) const REQ_STOP: u8 = 2;
const NO_VALUE: u64 = u64::MAX;

/// The real-time signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 3
}

extern "C" fn on_kick(_: libc::c_int) {}

/// Install a no-op handler for [`kick_signal`] (once per process), without `SA_RESTART`, so
/// a kick makes `KVM_RUN` return `EINTR` instead of killing the process.
pub(crate) fn install_kick_handler() -> Result<(), VmError> {
    static ONCE: Once = Once::new();
    static RESULT: OnceLock<Result<(), String>> = OnceLock::new();
    ONCE.call_once(|| {
        // SAFETY: sigaction is plain data; zeroed is a valid initial value.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_kick as *const () as usize;
        sa.sa_flags = 0;
        // SAFETY: sa.sa_mask is a valid sigset_t owned by us.
        unsafe { libc::sigemptyset(&mut sa.sa_mask) };
        // SAFETY: installs an async-signal-safe no-op handler for a signal nothing else uses.
        let rc = unsafe { libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) };
        let r = if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error().to_string())
        };
        let _ = RESULT.set(r);
    });
    match RESULT.get() {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(VmError::Config(format!(
            "cannot install the vCPU kick signal handler: {e}"
        ))),
        None => Err(VmError::Config("kick signal handler not installed".into())),
    }
}

/// Send the kick signal to a vCPU thread.
pub(crate) fn kick(thread: libc::pthread_t) {
    // SAFETY: `thread` is a thread of this process that has not been joined yet (the caller
    // holds its JoinHandle); the signal has a no-op handler installed.
    unsafe {
        libc::pthread_kill(thread, kick_signal());
    }
}

/// A digest of a vCPU's working-set slice: what the guest reported through port I/O, and
/// what the VMM computed over the same bytes while that vCPU waited in the port exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestDigest {
    pub guest: u64,
    pub host: u64,
}

impl GuestDigest {
    pub fn matches(&self) -> bool {
        self.guest == self.host
    }
}

/// State shared between the VM handle and its vCPU threads.
pub(crate) struct Shared {
    pub request: AtomicU8,
    /// Latest reported op counter per vCPU.
    pub progress: Vec<AtomicU64>,
    /// First report per vCPU since the VM was started or restored (`u64::MAX`: none yet).
    pub first_progress: Vec<AtomicU64>,
    pub reports: Vec<AtomicU64>,
    /// Latest digest report per vCPU, and how many there were.
    pub digests: Vec<Mutex<Option<GuestDigest>>>,
    pub digest_reports: Vec<AtomicU64>,
    /// First time any vCPU entered `KVM_RUN` since the last start/resume.
    pub first_run: Mutex<Option<Instant>>,
    /// Whether each vCPU's last park came right after a progress-report port exit (so the
    /// guest's next step is the digest check, with no write to its slice in between).
    pub parked_at_report: Vec<AtomicBool>,
    /// Kernel thread id of each vCPU thread (0 until it starts): userfaultfd reports which
    /// thread faulted, and this maps that back to a vCPU.
    pub thread_ids: Vec<std::sync::atomic::AtomicU32>,
    /// While set, a vCPU that completes a digest report waits in that port exit (not in
    /// `KVM_RUN`, so it writes nothing) until it is cleared or a pause/stop is requested.
    pub hold_after_digest: AtomicBool,
    /// Which vCPUs are waiting in that hold.
    pub held: Vec<AtomicBool>,
    /// When each vCPU last entered that hold.
    pub held_at: Vec<Mutex<Option<Instant>>>,
    /// Percent of its time each vCPU is kept off the CPU ([`Throttle`]); 0: none.
    pub throttle_pct: AtomicU8,
}

impl Shared {
    pub fn new(vcpus: usize) -> Shared {
        let v = |x| (0..vcpus).map(|_| AtomicU64::new(x)).collect();
        Shared {
            request: AtomicU8::new(REQ_RUN),
            progress: v(0),
            first_progress: v(NO_VALUE),
            reports: v(0),
            digests: (0..vcpus).map(|_| Mutex::new(None)).collect(),
            digest_reports: v(0),
            first_run: Mutex::new(None),
            parked_at_report: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
            thread_ids: (0..vcpus)
                .map(|_| std::sync::atomic::AtomicU32::new(0))
                .collect(),
            hold_after_digest: AtomicBool::new(false),
            held: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
            held_at: (0..vcpus).map(|_| Mutex::new(None)).collect(),
            throttle_pct: AtomicU8::new(0),
        }
    }

    pub fn first_progress(&self) -> Vec<Option<u64>> {
        self.first_progress
            .iter()
            .map(|a| Some(a.load(Ordering::Relaxed)).filter(|&v| v != NO_VALUE))
            .collect()
    }
}

/// How long a throttled vCPU runs before it naps: long enough that the naps cost little,
/// short enough that the guest's progress stays smooth (QEMU's throttle uses 10 ms).
const THROTTLE_SLICE: Duration = Duration::from_millis(2);

/// The most CPU time one nap answers for: a guest that reports seldom is throttled less
/// (it runs what it ran beyond this unpaid), not held for a nap out of proportion.
const THROTTLE_MAX_RAN: Duration = Duration::from_millis(20);

/// Keeps a vCPU off the CPU for a share of its time, as QEMU's `cpu-throttle` does, but
/// counted in CPU time rather than as a wall-clock duty cycle: after a slice of CPU time
/// it naps `pct / (100 - pct)` of it, so it uses at most `100 - pct` percent of a core. A
/// vCPU parked by a pause, held after a digest, waiting for a missing page or preempted
/// has not run, and owes no nap for it (so on a busy host the guest slows by less than
/// `pct`).
pub(crate) struct Throttle {
    /// The thread's CPU time at its last nap; `None`: count from the next report (the
    /// throttle was off, or the VMM's own work ran on the thread).
    cpu_at: Option<Duration>,
}

impl Throttle {
    pub(crate) fn new() -> Throttle {
        Throttle { cpu_at: None }
    }

    /// Forgets the CPU time used so far: the VMM's own work on the vCPU thread (hashing a
    /// slice for a digest report) is not the guest's.
    pub(crate) fn restart(&mut self) {
        self.cpu_at = None;
    }

    /// How long to nap after running `ran` at `pct` percent (0 below one slice).
    pub(crate) fn nap(ran: Duration, pct: u8) -> Duration {
        let pct = u32::from(pct.min(MAX_THROTTLE_PCT));
        if pct == 0 || ran < THROTTLE_SLICE {
            return Duration::ZERO;
        }
        ran.min(THROTTLE_MAX_RAN) * pct / (100 - pct)
    }

    /// Called at each progress report: naps if a slice has run, in steps that end as soon as
    /// a pause or stop is requested or the throttle is lifted.
    fn at_report(&mut self, shared: &Shared) {
        let pct = shared.throttle_pct.load(Ordering::Relaxed);
        if pct == 0 {
            // Off: nothing is owed, and no clock is read.
            self.cpu_at = None;
            return;
        }
        let now = thread_cpu_time();
        let Some(since) = self.cpu_at else {
            self.cpu_at = Some(now);
            return;
        };
        let nap = Throttle::nap(now.saturating_sub(since), pct);
        if nap.is_zero() {
            return;
        }
        let until = Instant::now() + nap;
        while shared.request.load(Ordering::Acquire) == REQ_RUN
            && shared.throttle_pct.load(Ordering::Relaxed) != 0
        {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(Duration::from_millis(1)));
        }
        self.cpu_at = Some(thread_cpu_time());
    }
}

/// CPU time the calling thread has used, guest mode included (KVM accounts it to the
/// thread that ran `KVM_RUN`).
fn thread_cpu_time() -> Duration {
    // The calling thread's own clock always exists; were it unreadable, no time passes
    // and the throttle idles.
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or(Duration::ZERO)
}

/// The most a vCPU may be throttled, percent.
pub const MAX_THROTTLE_PCT: u8 = 99;

/// Commands to a paused vCPU thread.
pub(crate) enum Cmd {
    Resume,
    Stop,
}

/// What a vCPU thread tells the controller.
pub(crate) enum Report {
    Paused(usize, Box<VcpuState>),
    Exited(usize, String),
}

/// Set the guest's CPUID (so long mode is allowed) with the vCPU's own APIC id.
pub(crate) fn set_cpuid(vcpu: &VcpuFd, base: &CpuId, id: usize) -> Result<(), VmError> {
    let mut cpuid = base.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            0x1 => e.ebx = (e.ebx & 0x00ff_ffff) | ((id as u32) << 24),
            0xb | 0x1f => e.edx = id as u32,
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))
}

/// KVM's paravirtual feature leaf and its asynchronous page fault bit.
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
const KVM_FEATURE_ASYNC_PF: u32 = 1 << 4;

/// Whether `cpuid` advertises KVM's asynchronous page faults to the guest.
pub(crate) fn advertises_async_pf(cpuid: &CpuId) -> bool {
    cpuid
        .as_slice()
        .iter()
        .any(|e| e.function == KVM_CPUID_FEATURES && e.eax & KVM_FEATURE_ASYNC_PF != 0)
}

/// Boot state of vCPU `id`: long mode, at the program entry, with its stack and data area.
pub(crate) fn setup_boot_state(vcpu: &VcpuFd, id: usize) -> Result<(), VmError> {
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    long_mode_sregs(&mut sregs);
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    let regs = kvm_regs {
        rip: CODE_ADDR,
        rsp: stack_top(id),
        rdi: data_area(id),
        rflags: BOOT_RFLAGS,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))
}

pub(crate) struct VcpuThread {
    pub id: usize,
    pub vcpu: VcpuFd,
    pub shared: std::sync::Arc<Shared>,
    pub cmds: Receiver<Cmd>,
    pub reports: Sender<Report>,
    pub msr_indices: Vec<u32>,
    pub memory: vm_memory::GuestMemoryMmap,
    /// This vCPU's data area and working-set slice (start, length).
    pub data_area: u64,
    pub slice: (u64, u64),
}

impl VcpuThread {
    pub fn run(mut self) {
        let id = self.id;
        // SAFETY: gettid has no preconditions and cannot fail.
        let tid = unsafe { libc::gettid() } as u32;
        if let Some(t) = self.shared.thread_ids.get(id) {
            t.store(tid, Ordering::Relaxed);
        }
        if let Err(reason) = self.run_loop() {
            let _ = self.reports.send(Report::Exited(id, reason));
        }
    }

    /// Runs until stopped (`Ok`) or until the guest or KVM fails (`Err` with the reason).
    fn run_loop(&mut self) -> Result<(), String> {
        let id = self.id;
        // High half of a report in progress. A pause can fall between the two `out`s; the
        // counter does not change in between, so after a restore the high half is that of
        // the counter saved at the pause (which `progress` starts from).
        let mut high: u64 = self.shared.progress[id].load(Ordering::Relaxed) >> 32;
        // Same for a digest report; the guest stores the digest before reporting it, so a
        // low half without its high half (a pause fell in between) reads the high half from
        // guest memory. Read lazily: after a postcopy restore the data area may not be
        // present yet, and the vCPU must not wait for it before its first `KVM_RUN`.
        let mut digest_high: Option<u64> = None;
        // Whether the last exit was a progress report (a clean place to pause).
        let mut at_report = false;
        let mut noted_first_run = false;
        let mut throttle = Throttle::new();
        loop {
            match self.shared.request.load(Ordering::Acquire) {
                REQ_STOP => return Ok(()),
                REQ_PAUSE => {
                    self.shared.parked_at_report[id].store(at_report, Ordering::Release);
                    if !self.park()? {
                        return Ok(());
                    }
                    noted_first_run = false;
                    continue;
                }
                _ => {}
            }
            if !noted_first_run {
                noted_first_run = true;
                let mut first = self
                    .shared
                    .first_run
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                first.get_or_insert_with(Instant::now);
            }
            let exit = self.vcpu.run();
            at_report = matches!(
                exit,
                Ok(VcpuExit::IoOut(PORT_PROGRESS_HI | PORT_PROGRESS_LO, _))
            );
            match exit {
                Ok(VcpuExit::IoOut(port, data)) => {
                    let mut b = [0u8; 4];
                    let n = data.len().min(4);
                    b[..n].copy_from_slice(&data[..n]);
                    let v = u64::from(u32::from_le_bytes(b));
                    match port {
                        PORT_PROGRESS_HI => high = v,
                        PORT_PROGRESS_LO => {
                            let value = high << 32 | v;
                            self.shared.progress[id].store(value, Ordering::Relaxed);
                            let _ = self.shared.first_progress[id].compare_exchange(
                                NO_VALUE,
                                value,
                                Ordering::Relaxed,
                                Ordering::Relaxed,
                            );
                            self.shared.reports[id].fetch_add(1, Ordering::Relaxed);
                            // At a report, a clean place to pause, so a nap never holds
                            // a pause up (it ends on the request).
                            throttle.at_report(&self.shared);
                        }
                        PORT_DIGEST_HI => digest_high = Some(v),
                        PORT_DIGEST_LO => {
                            let hi = match digest_high.take() {
                                Some(h) => h,
                                None => {
                                    read_u64(&self.memory, self.data_area + OFF_DIGEST)
                                        .map_err(|e| chain(&e))?
                                        >> 32
                                }
                            };
                            let (base, len) = self.slice;
                            let host =
                                slice_digest(&self.memory, base, len).map_err(|e| chain(&e))?;
                            let d = GuestDigest {
                                guest: hi << 32 | v,
                                host,
                            };
                            *self.shared.digests[id]
                                .lock()
                                .unwrap_or_else(|e| e.into_inner()) = Some(d);
                            throttle.restart();
                            self.shared.digest_reports[id].fetch_add(1, Ordering::Relaxed);
                            self.hold();
                        }
                        _ => {}
                    }
                }
                Ok(VcpuExit::IoIn(_, data)) => data.fill(0xff),
                Ok(VcpuExit::Hlt) => return Err("guest halted".into()),
                Ok(VcpuExit::Shutdown) => {
                    let rip = self.vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                    return Err(format!("guest triple-faulted (shutdown) near rip {rip:#x}"));
                }
                Ok(other) => return Err(format!("unexpected exit {other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => return Err(format!("KVM_RUN: {e}")),
            }
        }
    }

    /// Wait in the digest port exit while the VMM holds the guest there (see
    /// [`Shared::hold_after_digest`]); a pause or stop request ends the wait.
    fn hold(&self) {
        let id = self.id;
        if !self.shared.hold_after_digest.load(Ordering::Acquire) {
            return;
        }
        *self.shared.held_at[id]
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        self.shared.held[id].store(true, Ordering::Release);
        while self.shared.hold_after_digest.load(Ordering::Acquire)
            && self.shared.request.load(Ordering::Acquire) == REQ_RUN
        {
            std::thread::sleep(Duration::from_micros(200));
        }
        self.shared.held[id].store(false, Ordering::Release);
    }

    /// Complete pending I/O, save state, report it and wait. `Ok(true)`: resume.
    fn park(&mut self) -> Result<bool, String> {
        self.vcpu.set_kvm_immediate_exit(1);
        let completed = match self.vcpu.run() {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Ok(exit) => Err(format!("exit {exit:?} while completing I/O for pause")),
            Err(e) => Err(format!("KVM_RUN (immediate_exit): {e}")),
        };
        self.vcpu.set_kvm_immediate_exit(0);
        completed?;
        let state = VcpuState::save(&self.vcpu, &self.msr_indices).map_err(|e| chain(&e))?;
        if self
            .reports
            .send(Report::Paused(self.id, Box::new(state)))
            .is_err()
        {
            return Ok(false);
        }
        match self.cmds.recv() {
            Ok(Cmd::Resume) => Ok(true),
            Ok(Cmd::Stop) | Err(_) => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttled_vcpu_naps_its_share_after_each_slice() {
        let ms = Duration::from_millis;
        assert_eq!(Throttle::nap(ms(10), 0), Duration::ZERO);
        // Below one slice it runs on; the time it ran is kept for the next report.
        assert_eq!(Throttle::nap(ms(1), 75), Duration::ZERO);
        assert_eq!(Throttle::nap(ms(2), 50), ms(2));
        assert_eq!(Throttle::nap(ms(4), 75), ms(12));
        assert_eq!(Throttle::nap(ms(2), 99), ms(198));
        // Above the most allowed, the most.
        assert_eq!(Throttle::nap(ms(2), 100), ms(198));
        // A late report answers for at most 20 ms of running.
        assert_eq!(Throttle::nap(ms(5000), 75), ms(60));
    }

    #[test]
    fn thread_cpu_time_counts_this_threads_work_only() {
        // Another thread spins while this one sleeps: a process-wide clock would count it.
        let spin = |d: Duration| {
            let t = Instant::now();
            let mut x = 1u64;
            while t.elapsed() < d {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        };
        let other = std::thread::spawn(move || spin(Duration::from_millis(40)));
        let before = thread_cpu_time();
        std::thread::sleep(Duration::from_millis(30));
        let slept = thread_cpu_time() - before;
        other.join().unwrap();
        let t = Instant::now();
        let mut x = 1u64;
        while t.elapsed() < Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let spun = thread_cpu_time() - before - slept;
        assert!(
            slept < Duration::from_millis(10),
            "asleep, yet {slept:?} of CPU"
        );
        assert!(spun > Duration::ZERO, "spinning used no CPU");
    }
}
