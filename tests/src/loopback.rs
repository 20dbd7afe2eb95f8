//! A reference-VMM guest migrated with hints, both ends in this process, over QUIC on
//! loopback into userfaultfd-registered memory: what `tests/tests/hints.rs` and the
//! `hinted_postcopy` bench run.
//!
//! Bare-metal guests cannot run the Linux agent, so the agent's side is played by
//! [`reference_hot`] (what the agent would call hot in a reference guest: its page tables,
//! code, data areas, stacks and the hot part of its working set) and [`agent_report`]
//! (those ranges as agent protocol bytes). The bytes reach a [`HintBoard`] through a Unix
//! socket ([`feed_agent`]), exactly as an agent's would.
//!
//! One [`SourceGuest`] can be migrated several times: its memory is frozen once paused.
//! [`Check::Held`] verifies all memory (the destination guests hash their slices first and
//! wait; the host hashes all memory as at switchover); [`Check::Running`] lets the guests
//! run freely (what a measurement needs) and verifies every page they cannot write.

use std::io::Write;
use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_agent::proto::{report_frames, Hello, PfnRange};
use serde::Serialize;
use thiserror::Error;
use transport::bitmap::Bitmap;
use transport::encoding::EncodingPolicy;
use transport::tls::Identity;
use transport::{Layout, PAGE_SIZE};
use uffd_core::error::chain;
use uffd_core::{DirtyError, LatencySummary};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use wan_emu::{LinkConfig, WanEmulator};

use refvmm::layout::{
    CODE_ADDR, CODE_MAX, DATA_BASE, DATA_STRIDE, PD_ADDR, STACK_BASE, STACK_SIZE,
};
use refvmm::rate::{rate_between, RateSampler, Sample};
use refvmm::{memory, KvmDirtyLog, Vm, VmConfig, VmError, VmOptions, VmSnapshot};
use vmm_shim::hints::{
    skippable_free, zeroed_digest, zeroed_digest_except, DirtyBaseline, HintBoard, HintPlan,
    HintedReport, Hints, WrittenSince,
};
use vmm_shim::replica::PausedMemory;
use vmm_shim::{DestOptions, Listener, RoleError, SourceOptions};

const PAGE: u64 = PAGE_SIZE as u64;
/// How often the destination guests' op counters are sampled.
const SAMPLE_PERIOD: Duration = Duration::from_millis(10);

/// What went wrong in a loopback run.
#[derive(Debug, Error)]
pub enum LoopbackError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Role(#[from] RoleError),
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    #[error(transparent)]
    Digest(#[from] vmm_shim::digest::GuestReadError),
    #[error(transparent)]
    Tls(#[from] transport::tls::TlsError),
    #[error("agent channel failed")]
    Io(#[from] std::io::Error),
    #[error("the WAN emulator failed")]
    Wan(#[from] wan_emu::WanError),
    #[error("destination: {0}")]
    Dest(String),
}

/// The guest to migrate.
#[derive(Clone, Debug)]
pub struct GuestSpec {
    pub config: VmConfig,
    /// How long the guest runs on the source before switchover.
    pub run: Duration,
    /// Pages the host fills with pseudo-random bytes before boot: the old contents of a
    /// guest's page cache and freed memory, which a fresh memfd would not have.
    pub filled: Range<u64>,
    pub seed: u64,
}

/// Page ranges an agent in the reference guest would report hot: page tables, program
/// code, the vCPUs' data areas and stacks (kernel-like memory the agent counts as hot), and
/// the part of the working set the program favours ([`refvmm::Program::hot_ranges`]). Sorted,
/// adjacent allowed.
pub fn reference_hot(config: &VmConfig) -> Vec<PfnRange> {
    let gib = config.mem_size.div_ceil(1 << 30);
    let mut hot = vec![
        // GDT, IDT, PML4, PDPT and one page directory per GiB.
        (PD_ADDR / PAGE - 3)..(PD_ADDR / PAGE + gib),
        CODE_ADDR / PAGE..(CODE_ADDR + CODE_MAX as u64) / PAGE,
        DATA_BASE / PAGE..(DATA_BASE + config.vcpus as u64 * DATA_STRIDE) / PAGE,
        STACK_BASE / PAGE..(STACK_BASE + config.vcpus as u64 * STACK_SIZE) / PAGE,
    ];
    for i in 0..config.vcpus {
        for r in config.program.hot_ranges(i, config.vcpus) {
            if r.end - r.start >= PAGE {
                hot.push(r.start / PAGE..r.end / PAGE);
            }
        }
    }
    hot.sort_by_key(|r| r.start);
    hot.into_iter()
        .filter(|r| r.start < r.end)
        .map(|r| PfnRange::new(r.start, r.end - r.start))
        .collect()
}

/// Pages the reference guest's vCPUs can write: their data areas, stacks and working-set
/// slices. Everything else stays as it was at switchover while the guest runs.
pub fn guest_writable(config: &VmConfig) -> Bitmap {
    let mut w = Bitmap::new(config.mem_size / PAGE);
    let mut set = |r: Range<u64>| {
        for p in r.start / PAGE..r.end.div_ceil(PAGE) {
            w.set(p);
        }
    };
    set(DATA_BASE..DATA_BASE + config.vcpus as u64 * DATA_STRIDE);
    set(STACK_BASE..STACK_BASE + config.vcpus as u64 * STACK_SIZE);
    for i in 0..config.vcpus {
        let (base, len) = config.program.slice(i, config.vcpus);
        set(base..base + len);
    }
    w
}

/// One agent report as the agent sends it: `Hello`, then the hot and free lists as report
/// `seq`, at most 4096 ranges a message (the agent's default).
pub fn agent_report(
    seq: u64,
    mem_bytes: u64,
    poison_on_free: bool,
    hot: &[PfnRange],
    free: &[PfnRange],
) -> Vec<u8> {
    let hello = Hello {
        version: guest_agent::proto::PROTOCOL_VERSION,
        agent_version: "reference-guest".into(),
        page_size: PAGE_SIZE as u32,
        poison_on_free,
        mem_total_bytes: mem_bytes,
    };
    // Only ranges that break the protocol's rules fail to encode; the callers build
    // sorted, non-overlapping ones, and a bad list simply yields no bytes.
    report_frames(&hello, seq, hot, free, 4096).unwrap_or_default()
}

/// Bytes the agent writes, after a pause.
#[derive(Clone, Debug)]
pub struct AgentChunk {
    pub after: Duration,
    pub bytes: Vec<u8>,
}

/// What [`feed_agent`] saw.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FeedReport {
    pub bytes: u64,
    pub reads: u64,
    /// Largest [`HintBoard::buffered_bytes`] after any read.
    pub max_buffered: usize,
}

/// Sends `chunks` through a Unix socket pair (a thread plays the agent) and feeds the
/// board from the other end until the agent hangs up.
pub fn feed_agent(board: &mut HintBoard, chunks: Vec<AgentChunk>) -> std::io::Result<FeedReport> {
    let (mut agent, mut host) = UnixStream::pair()?;
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        for c in chunks {
            std::thread::sleep(c.after);
            agent.write_all(&c.bytes)?;
        }
        Ok(())
    });
    let mut report = FeedReport::default();
    loop {
        let n = board.read_from(&mut host)?;
        if n == 0 {
            break;
        }
        report.bytes += n as u64;
        report.reads += 1;
        report.max_buffered = report.max_buffered.max(board.buffered_bytes());
    }
    writer
        .join()
        .map_err(|_| std::io::Error::other("agent thread panicked"))??;
    Ok(report)
}

/// A source guest with dirty tracking armed before the agent is heard.
pub struct SourceGuest {
    pub spec: GuestSpec,
    vm: Vm,
    tracker: KvmDirtyLog,
    /// Armed at boot; consumed by the final harvest the first time a plan needs it.
    baseline: Option<DirtyBaseline>,
    baseline_at: Instant,
    written: Option<WrittenSince>,
    snapshot: Option<VmSnapshot>,
    /// The skip decision is taken once per mode and report (it harvests the dirty log) and
    /// reused for later migrations of the same frozen memory.
    plan: Option<(Mode, Option<u64>, HintPlan, Option<String>)>,
}

/// What the source does with the hints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// No hints: the plain push order, every page's content.
    Plain,
    /// Hot ranges pushed first.
    HotFirst,
    /// Hot ranges first, and skippable free pages sent as zero pages.
    HotFirstSkipFree,
}

/// How the destination checks memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// The source arms the switchover digest; destination guests hash their slices first
    /// and wait until every page is present; all memory is compared.
    Held,
    /// The guests run their program freely from the first instruction (for measuring);
    /// when every page is present they run `after` more and are paused, and every page
    /// they cannot write is compared.
    Running { after: Duration },
}

fn fill(mem: &GuestMemoryMmap, pages: Range<u64>, seed: u64) -> Result<(), VmError> {
    const CHUNK: usize = 1 << 20;
    let mut x = seed | 1;
    let mut buf = vec![0u8; CHUNK];
    let (mut at, end) = (pages.start * PAGE, pages.end * PAGE);
    while at < end {
        let n = (end - at).min(CHUNK as u64) as usize;
        for w in buf[..n].chunks_exact_mut(8) {
            // xorshift64*: fast, and incompressible enough that lz4 gives up on it.
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            w.copy_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        mem.write_slice(&buf[..n], GuestAddress(at))
            .map_err(|e| VmError::Memory(format!("fill at {at:#x}: {e}")))?;
        at += n as u64;
    }
    Ok(())
}

impl SourceGuest {
    /// Builds the VM with KVM's dirty log, fills `spec.filled`, and arms dirty tracking;
    /// the guest does not run yet.
    pub fn boot(spec: GuestSpec) -> Result<SourceGuest, LoopbackError> {
        let vm = Vm::new_with_options(spec.config.clone(), VmOptions { dirty_log: true })?;
        fill(vm.guest_memory(), spec.filled.clone(), spec.seed)?;
        let mut tracker = vm.dirty_tracker()?;
        let baseline = DirtyBaseline::arm(&mut tracker)?;
        Ok(SourceGuest {
            spec,
            vm,
            tracker,
            baseline_at: baseline.at(),
            baseline: Some(baseline),
            written: None,
            snapshot: None,
            plan: None,
        })
    }

    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    pub fn layout(&self) -> Layout {
        Layout::single(self.spec.config.mem_size)
    }

    /// When dirty tracking began: agent reports must have been scanned after this for
    /// their free pages to be skipped.
    pub fn tracking_since(&self) -> Instant {
        self.baseline_at
    }

    /// Pages written since tracking began (vCPUs and this VMM), harvested once on the
    /// paused guest.
    fn written(&mut self) -> Result<&WrittenSince, String> {
        if let Some(b) = self.baseline.take() {
            let host = self.vm.vmm_written_pages();
            let pages = self.spec.config.mem_size / PAGE;
            let w = b
                .finish(&mut self.tracker, &host, pages)
                .map_err(|e| chain(&e))?;
            self.written = Some(w);
        }
        self.written
            .as_ref()
            .ok_or_else(|| "the final dirty-log harvest failed earlier".to_string())
    }

    /// Runs the guest for `spec.run`, then pauses it at a progress report.
    pub fn run_and_pause(&mut self) -> Result<(), LoopbackError> {
        self.vm.start()?;
        let end = Instant::now() + self.spec.run;
        while Instant::now() < end {
            self.vm.check_vcpus()?;
            std::thread::sleep(Duration::from_millis(10));
        }
        self.snapshot = Some(self.vm.pause_at_report(Duration::from_secs(2))?);
        Ok(())
    }

    /// The plan for `mode` and `hints`. The free-page decision rests on one final harvest
    /// of the dirty log, taken the first time it is needed on the paused guest and kept
    /// for every later plan. A refused skip falls back to hot-first and says why.
    pub fn plan(&mut self, mode: Mode, hints: Option<&Hints>) -> (HintPlan, Option<String>) {
        let seq = hints.map(|h| h.seq);
        if let Some((m, s, p, why)) = &self.plan {
            if *m == mode && *s == seq {
                return (p.clone(), why.clone());
            }
        }
        let (plan, why) = match (mode, hints) {
            (Mode::Plain, _) | (_, None) => (HintPlan::default(), None),
            (Mode::HotFirst, Some(h)) => (HintPlan::hot_first(h), None),
            (Mode::HotFirstSkipFree, Some(h)) => {
                let decided = self
                    .written()
                    .and_then(|w| skippable_free(h, w).map_err(|e| e.to_string()));
                match decided {
                    Ok(skip) => (HintPlan::with_free_skip(h, skip), None),
                    Err(why) => (HintPlan::hot_first(h), Some(why)),
                }
            }
        };
        self.plan = Some((mode, seq, plan.clone(), why.clone()));
        (plan, why)
    }
}

/// One migration's measurements and checks.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub mode: Mode,
    pub check: Check,
    /// The emulated link between the ends; `None`: straight over loopback.
    pub link: Option<LinkConfig>,
    pub memory_bytes: u64,
    pub vcpus: usize,
    /// Start of this migration (the source guest is paused already, and may have been
    /// migrated before) → first destination vCPU run (same process, same clock).
    pub downtime_ms: f64,
    /// Source connected → every page present.
    pub total_ms: f64,
    pub wire_bytes: u64,
    pub faults: u64,
    pub blocked_ms: f64,
    pub vcpu_blocked_ms: Vec<f64>,
    pub fault_latency_us: LatencySummary,
    pub pages_faulted: u64,
    pub pages_pushed: u64,
    pub pages_zero: u64,
    /// Guest ops per second from the first destination run until every page was present.
    pub ops_per_s_during: f64,
    /// Guest ops per second over the first 250 ms, 500 ms and 1 s after the first
    /// destination run (sampled every 10 ms): how soon the guest gets going again, which
    /// is what pushing its hot memory first is for. With [`Check::Held`] the guests hash
    /// their slices first, so these measure that.
    pub ops_per_s_first: [Option<f64>; 3],
    /// The guests' total op count every 10 ms, from the first destination vCPU run.
    #[serde(skip)]
    pub progress: Vec<Sample>,
    #[serde(flatten)]
    pub source: HintedReport,
    /// Why free pages were not skipped although the mode asked for it.
    pub skip_refused: Option<String>,
    /// What the source expects (with skipped pages zeroed) and what the destination has,
    /// over all memory ([`Check::Held`]) or the pages the guest cannot write.
    pub expected_digest: String,
    pub dest_digest: String,
    pub pages_compared: u64,
    /// `Check::Held`: each guest's digest of its slice equals the source's.
    pub guest_digests_match: Option<bool>,
    pub digest_match: bool,
}

/// The destination's side of one run, on its own thread.
struct DestRun {
    report: vmm_shim::DestReport,
    vm: Vm,
    mem: GuestMemoryMmap,
    /// Samples the guests' op counters from the restore on.
    sampler: RateSampler,
    origin: Instant,
    first_run: Instant,
    ops_at_complete: u64,
    complete_at: Instant,
}

fn dest_side(listener: Listener, config: VmConfig, hold: bool) -> Result<DestRun, LoopbackError> {
    let size = usize::try_from(config.mem_size).map_err(|_| LoopbackError::Dest("size".into()))?;
    let mem = memory::create_guest_memory(size)?;
    let regions = memory::host_regions(&mem)?;
    let layout = Layout::single(config.mem_size);
    type Restored = Result<(Vm, RateSampler, Instant), String>;
    let slot: Arc<Mutex<Option<Restored>>> = Arc::default();
    let (slot2, mem2, config2) = (slot.clone(), mem.clone(), config.clone());
    let report = listener.receive_vm(&regions, &layout, move |blob| {
        // Runs on the network driver: restore and start, touch no guest memory.
        let r = (|| -> Restored {
            let blob = blob.ok_or("the source sent no VM state")?;
            let snap = VmSnapshot::from_bytes(blob).map_err(|e| chain(&e))?;
            let mut vm = Vm::restore(config2, mem2, snap).map_err(|e| chain(&e))?;
            vm.set_hold_after_digest(hold);
            let origin = Instant::now();
            let sampler = RateSampler::start(vm.progress_probe(), origin, SAMPLE_PERIOD);
            vm.start().map_err(|e| chain(&e))?;
            Ok((vm, sampler, origin))
        })();
        *slot2.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
    });
    let complete_at = Instant::now();
    let restored = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
    let report = report?;
    let (vm, sampler, origin) = match restored {
        Some(Ok(r)) => r,
        Some(Err(e)) => return Err(LoopbackError::Dest(e)),
        None => return Err(LoopbackError::Dest("the guest was never resumed".into())),
    };
    // Every page is present now, so reading the counters faults nothing in.
    let ops_at_complete = vm
        .guest_counters()
        .unwrap_or_else(|_| vm.progress())
        .iter()
        .sum();
    let first_run = vm
        .first_run_at()
        .ok_or_else(|| LoopbackError::Dest("no vCPU ran".into()))?;
    Ok(DestRun {
        report,
        vm,
        mem,
        sampler,
        origin,
        first_run,
        ops_at_complete,
        complete_at,
    })
}

/// Migrates the paused `src` once, with the hints (if any) used as `mode` says, and checks
/// memory as `check` says. `Check::Held` arms the switchover digest on the source, so run
/// `Check::Running` migrations of a source first.
pub fn migrate(
    src: &mut SourceGuest,
    hints: Option<&Hints>,
    mode: Mode,
    check: Check,
    encoding: EncodingPolicy,
) -> Result<Outcome, LoopbackError> {
    migrate_over(src, hints, mode, check, encoding, None)
}

/// [`migrate`] through an emulated WAN link ([`WanEmulator`] relaying between the two
/// ends, both directions alike) when `link` is given. Size the QUIC windows for the link
/// first (`FAULTLINE_EXPECTED_BDP`, see `transport::quic`), as an operator would.
pub fn migrate_over(
    src: &mut SourceGuest,
    hints: Option<&Hints>,
    mode: Mode,
    check: Check,
    encoding: EncodingPolicy,
    link: Option<&LinkConfig>,
) -> Result<Outcome, LoopbackError> {
    let snapshot = src
        .snapshot
        .clone()
        .ok_or_else(|| LoopbackError::Dest("the source guest was not run and paused".into()))?;
    let (plan, skip_refused) = src.plan(mode, hints);
    let hold = check == Check::Held;
    if hold {
        src.vm.arm_switchover_digest()?;
    }
    let config = src.spec.config.clone();
    let layout = src.layout();
    let zero = plan
        .skip_free
        .clone()
        .unwrap_or_else(|| Bitmap::new(layout.total_pages()));
    let writable = guest_writable(&config);
    let src_mem = src.vm.guest_memory().clone();
    // What the destination must end with; hashed before sending, so that the hashing
    // takes no CPU from the migration it checks.
    let expected = if hold {
        zeroed_digest(&src_mem, &zero, &[])?
    } else {
        zeroed_digest_except(&src_mem, &zero, &writable)?
    };
    let (src_id, dst_id) = (Identity::generate("source")?, Identity::generate("dest")?);
    let listener = Listener::bind(DestOptions {
        listen: "127.0.0.1:0".parse().expect("literal address"),
        identity: dst_id.clone(),
        peer_cert: src_id.cert.clone(),
        expected_vm_id: Some("hinted".into()),
        accept_timeout: Duration::from_secs(60),
        progress: None,
        recover_timeout: None,
        hand_over_timeout: vmm_shim::dest::HAND_OVER_TIMEOUT,
    })?;
    let dest_addr = listener.local_addr()?;
    let wan = match link {
        Some(l) => Some(WanEmulator::start(
            "127.0.0.1:0".parse().expect("literal address"),
            dest_addr,
            l.clone(),
        )?),
        None => None,
    };
    let addr = wan.as_ref().map_or(dest_addr, WanEmulator::local_addr);
    let dest_config = config.clone();
    let dest = std::thread::spawn(move || dest_side(listener, dest_config, hold));

    let opts = SourceOptions {
        connect: addr,
        identity: src_id,
        peer_cert: dst_id.cert,
        vm_id: "hinted".into(),
        connect_timeout: Duration::from_secs(30),
        push: true,
        encoding,
        early_push: true,
        stopper: vmm_shim::Stopper::new(),
        progress: None,
        recover_timeout: None,
        rate_limit: None,
    };
    let regions = src.vm.host_regions()?;
    // The guest stopped long ago when a frozen source is migrated again: downtime counts
    // from the start of this migration.
    let started = Instant::now();
    // SAFETY: the source guest is paused for good (frozen once paused, see `SourceGuest`)
    // and nothing else writes its memory.
    let sent = unsafe { PausedMemory::new(&regions) }.and_then(|paused| {
        vmm_shim::send_with_hints(
            Arc::new(paused),
            &layout,
            &opts,
            Some(snapshot.as_bytes().to_vec()),
            &plan,
        )
    });
    let dest = dest
        .join()
        .map_err(|_| LoopbackError::Dest("thread panicked".into()));
    let sent = sent?;
    let mut d = dest??;

    let (dest_digest, guest_digests_match) = if hold {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !d.vm.held().iter().all(|&h| h) {
            d.vm.check_vcpus()?;
            if Instant::now() > deadline {
                return Err(LoopbackError::Dest(
                    "guests not all held within 60 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        let digest = d.vm.switchover_memory_digest()?;
        let slices = refvmm::slice_digests(&src_mem, &config)?;
        let (guest, _) = d.vm.digests();
        let ok = guest.len() == slices.len()
            && guest
                .iter()
                .zip(&slices)
                .all(|(g, s)| g.is_some_and(|g| g.guest == *s && g.host == *s));
        d.vm.release_hold();
        (digest, Some(ok))
    } else {
        if let Check::Running { after } = check {
            std::thread::sleep(after);
        }
        d.vm.pause()?;
        (
            zeroed_digest_except(&d.mem, &Bitmap::new(0), &writable)?,
            None,
        )
    };
    d.vm.stop()?;
    let series = d.sampler.stop();
    let shift = d
        .first_run
        .saturating_duration_since(d.origin)
        .as_secs_f64()
        * 1e3;
    let ops_per_s_first = [250.0, 500.0, 1000.0].map(|ms| rate_between(&series, shift, shift + ms));
    let progress: Vec<Sample> = series
        .iter()
        .filter(|s| s.t_ms >= shift)
        .map(|s| Sample {
            t_ms: s.t_ms - shift,
            ops: s.ops,
        })
        .collect();
    let postcopy_s = d
        .complete_at
        .saturating_duration_since(d.first_run)
        .as_secs_f64();
    let ops_before: u64 = snapshot.counters().iter().sum();
    let m = &d.report.metrics;
    let pages = layout.total_pages();
    drop(wan);
    Ok(Outcome {
        mode,
        check,
        link: link.cloned(),
        memory_bytes: config.mem_size,
        vcpus: config.vcpus,
        downtime_ms: d.first_run.saturating_duration_since(started).as_secs_f64() * 1e3,
        total_ms: d.report.session.total_ms as f64,
        wire_bytes: d.report.session.wire_bytes,
        faults: m.faults,
        blocked_ms: m.blocked_ns as f64 / 1e6,
        vcpu_blocked_ms: d
            .vm
            .vcpu_thread_ids()
            .iter()
            .map(|t| m.blocked_ns_by_thread.get(t).copied().unwrap_or(0) as f64 / 1e6)
            .collect(),
        fault_latency_us: m.fault_latency_us,
        pages_faulted: m.pages_faulted,
        pages_pushed: m.pages_pushed,
        pages_zero: m.pages_zero,
        ops_per_s_during: d.ops_at_complete.saturating_sub(ops_before) as f64
            / postcopy_s.max(1e-9),
        ops_per_s_first,
        progress,
        source: sent,
        skip_refused,
        digest_match: expected == dest_digest && guest_digests_match != Some(false),
        expected_digest: expected,
        dest_digest,
        pages_compared: if hold {
            pages
        } else {
            pages - writable.count_ones()
        },
        guest_digests_match,
    })
}
