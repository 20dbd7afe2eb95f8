//! The standby replica for KVM guests: `faultline vm source --replicate` replicates the
//! running guest (KVM's dirty log as the tracker) to `faultline vm dest --replica-dir`, then
//! evacuates into it with the vCPU state, so only stale pages cross.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use refvmm::layout::WORKSET_BASE;
use refvmm::{memory, Vm, VmSnapshot};
use serde::Serialize;
use transport::tls::{CertificateDer, Identity};
use transport::{Layout, PAGE_SIZE};
use uffd_core::{HostRegion, MemoryTier};
use vmm_shim::replica::{
    Replica, ReplicationSummary, Replicator, ReplicatorOptions, ReplicatorState, StandbySink,
};

use super::replica::epoch;

/// `faultline vm source` options for replicating before the evacuation.
#[derive(Args, Debug, Clone)]
pub struct ReplicaArgs {
    /// Replicate the running guest to the standby at `--connect` (a `faultline vm dest
    /// --replica-dir`) for `--run-secs`, then evacuate into it: only stale pages cross.
    #[arg(long)]
    pub replicate: bool,
    /// With --replicate: make exactly this percentage of guest memory stale at evacuation.
    /// The guest is paused (at a progress report, as for any switchover), replication
    /// catches up, and the VMM writes to that many working-set pages, recording them as
    /// dirty as it would for device DMA. That preparation pause is reported as
    /// `stale_prep_ms` and is not counted in the downtime, which starts when the
    /// evacuation does.
    #[arg(long, requires = "replicate")]
    pub stale_pct: Option<f64>,
    /// With --replicate: replication bandwidth budget in Mbit/s of page payload.
    #[arg(long, default_value_t = 800.0)]
    pub budget_mbps: f64,
    /// With --replicate: run the replicator at SCHED_IDLE (only CPU the guest and the host
    /// leave idle) until the evacuation, as `faultline replicate` does by default. Off by
    /// default: an unthrottled vCPU starves it on a small host (see --cpu-throttle).
    #[arg(long, requires = "replicate")]
    pub replicator_idle_priority: bool,
    /// With --replicate: listen here for the orchestrator (`faultline evacuate`), QUIC with
    /// mutual TLS, presenting `--cert` and accepting only `--control-peer-cert`. The guest
    /// then runs until the orchestrator's `Evacuate` or SIGUSR1, not for `--run-secs`
    /// (docs/fleet.md).
    #[arg(long, requires_all = ["replicate", "control_peer_cert"])]
    pub control: Option<std::net::SocketAddr>,
    /// The orchestrator's certificate (PEM), pinned on the control endpoint.
    #[arg(long, requires = "control")]
    pub control_peer_cert: Option<std::path::PathBuf>,
    /// With --replicate: the standby's address for the evacuation, if not `--connect`
    /// (replication takes one path, the evacuation another: an emulated WAN link).
    #[arg(long, requires = "replicate")]
    pub evacuate_connect: Option<std::net::SocketAddr>,
    /// With --replicate: hold the evacuation to this rate (e.g. 40M, 1G; bits per
    /// second); the orchestrator may change it. Without it, no limit.
    #[arg(long, value_name = "RATE", value_parser = super::wan::parse_rate, requires = "replicate")]
    pub evacuate_max_rate: Option<u64>,
    /// With --replicate: how the evacuation encodes pages (see `faultline source
    /// --encoding`); `off` makes the bytes that cross the stale pages, as a fleet's
    /// prediction assumes.
    #[arg(long, value_enum, default_value = "auto", requires = "replicate")]
    pub encoding: super::EncodingArg,
}

/// Replication of a running guest, started with the VM.
pub struct Replication {
    pub replicator: Replicator,
    pub epoch: u64,
}

/// What `vm source --replicate` adds to its report.
#[derive(Debug, Serialize, serde::Deserialize, Clone)]
pub struct SourceReplicaReport {
    pub tracker: String,
    pub pages_sent: u64,
    pub pages_acked: u64,
    pub harvests: u64,
    pub wire_bytes: u64,
    pub stale_pct_requested: Option<f64>,
    /// Pages the VMM wrote to reach `stale_pct_requested` (0 without it).
    pub pages_dirtied_by_vmm: u64,
    /// Pages the source counted stale after the final harvest.
    pub pages_stale_source: u64,
    /// Pages that crossed at evacuation (the source's stale set plus what the standby could
    /// not serve).
    pub pages_stale: u64,
    pub final_harvest_ms: f64,
    /// With `stale_pct_requested`: the guest's pause before the evacuation while
    /// replication caught up and the VMM wrote the stale pages (not part of the downtime).
    pub stale_prep_ms: f64,
    /// Replication's link outages: `pauses`, `paused_ms`, `resume_ms_after_restore`,
    /// `bytes_resent`.
    #[serde(flatten)]
    pub outages: transport::quic::Outages,
}

impl SourceReplicaReport {
    pub fn new(summary: &ReplicationSummary, stale_pct: Option<f64>, f: &Finished) -> Self {
        SourceReplicaReport {
            tracker: summary.tracker.to_string(),
            pages_sent: summary.pages_sent,
            pages_acked: summary.pages_acked,
            harvests: summary.harvests,
            wire_bytes: summary.wire_bytes,
            stale_pct_requested: stale_pct,
            pages_dirtied_by_vmm: f.dirtied,
            stale_prep_ms: f.prep_ms,
            pages_stale_source: 0,
            pages_stale: 0,
            final_harvest_ms: 0.0,
            outages: summary.outages,
        }
    }
}

/// Starts replicating `vm` (built with the dirty log on) to the standby `src.connect`
/// names, as `src.replica` says.
pub fn start(
    vm: &Vm,
    layout: &Layout,
    src: &super::vm::VmSourceArgs,
    me: &Identity,
    peer: &CertificateDer<'static>,
) -> anyhow::Result<Replication> {
    let a = &src.replica;
    let tracker = vm.dirty_tracker().context("KVM dirty log")?;
    let epoch = epoch();
    let opts = ReplicatorOptions {
        connect: src.connect,
        identity: me.clone(),
        peer_cert: peer.clone(),
        vm_id: src.vm_id.clone(),
        epoch,
        budget_bytes_per_sec: (a.budget_mbps * 1e6 / 8.0) as u64,
        interval: Duration::from_millis(20),
        connect_timeout: Duration::from_secs(30),
        recover_timeout: src.recover_timeout.map(Duration::from_secs),
        // Unthrottled, the vCPU threads would starve an idle-priority replicator on 2 cores.
        idle_priority: a.replicator_idle_priority,
    };
    let replicator =
        Replicator::start(&vm.host_regions()?, layout.clone(), Box::new(tracker), opts)
            .context("starting replication")?;
    Ok(Replication { replicator, epoch })
}

/// Replication ended: what evacuation needs.
pub struct Finished {
    pub state: ReplicatorState,
    pub epoch: u64,
    /// Pages the VMM wrote to reach the requested stale share.
    pub dirtied: u64,
    /// With a requested stale share: the guest is already paused, in this state, and
    /// `prep_ms` went into the preparation.
    pub snapshot: Option<VmSnapshot>,
    pub prep_ms: f64,
}

/// Ends replication while the guest keeps running (the dirty log keeps recording; the
/// final harvest at evacuation picks up what the guest writes meanwhile). With `stale_pct`,
/// first makes that share of memory stale (see [`ReplicaArgs::stale_pct`]).
pub fn finish(r: Replication, vm: &mut Vm, stale_pct: Option<f64>) -> anyhow::Result<Finished> {
    let epoch = r.epoch;
    let Some(pct) = stale_pct else {
        let state = r.replicator.stop().context("replication failed")?;
        return Ok(Finished {
            state,
            epoch,
            dirtied: 0,
            snapshot: None,
            prep_ms: 0.0,
        });
    };
    let t = Instant::now();
    let snapshot = vm
        .pause_at_report(Duration::from_secs(2))
        .context("pausing the guest to let replication catch up")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    // Caught up: a round that began after the pause (two harvests on: the stale count is
    // stored at the end of a round) left nothing stale. The count before it misses what
    // the guest wrote since the last harvest, which would cross beside the planted pages.
    // (The fleet bench's KVM guest sending 1.2-1.3 x its planted bytes was not this but
    // demand replies for pages already pushed: docs/fleet.md.)
    r.replicator.hurry();
    let harvests = || {
        r.replicator
            .stats()
            .harvests
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let since = harvests();
    while r.replicator.stale_pages() > 0 || harvests() < since + 2 {
        if !r.replicator.is_running() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "replication did not catch up within 120 s ({} pages stale); raise --budget-mbps",
                r.replicator.stale_pages()
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut state = r.replicator.stop().context("replication failed")?;
    let pages = working_set_pages(vm, pct)?;
    for &p in &pages {
        let gpa = p * PAGE_SIZE as u64;
        let v = memory::read_u64(vm.guest_memory(), gpa)?;
        memory::write_u64(vm.guest_memory(), gpa, v ^ 0x5a5a_5a5a_5a5a_5a5a)?;
    }
    // The dirty log sees only vCPU writes: the VMM records its own, as it must for DMA.
    state.ledger.mark_dirty(&pages);
    Ok(Finished {
        state,
        epoch,
        dirtied: pages.len() as u64,
        snapshot: Some(snapshot),
        prep_ms: t.elapsed().as_secs_f64() * 1e3,
    })
}

/// `pct` percent of guest memory as pages spread over the working set (deterministic).
pub(super) fn working_set_pages(vm: &Vm, pct: f64) -> anyhow::Result<Vec<u64>> {
    let config = vm.config();
    let total = config.mem_size / PAGE_SIZE as u64;
    let want = ((total as f64) * pct.clamp(0.0, 100.0) / 100.0).round() as u64;
    let ws_pages = config.program.working_set() / PAGE_SIZE as u64;
    if want > ws_pages {
        bail!(
            "--stale-pct {pct}: {want} pages do not fit in the {} MiB working set",
            config.program.working_set() >> 20
        );
    }
    let first = WORKSET_BASE / PAGE_SIZE as u64;
    let n = ws_pages.max(1);
    // i * stride mod n visits distinct pages when the stride is coprime with n.
    let mut stride = (n as f64 * 0.618_033_988_75) as u64 | 1;
    while gcd(stride, n) != 1 {
        stride += 2;
    }
    Ok((0..want).map(|i| first + (i * stride) % n).collect())
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// A standby's replica for a guest of `size` bytes in `dir` (tmpfs).
pub fn open_standby(dir: &Path, size: u64) -> anyhow::Result<Arc<StandbySink>> {
    let tier = MemoryTier::open(dir, size / PAGE_SIZE as u64)
        .with_context(|| format!("opening the replica in {}", dir.display()))?;
    Ok(Arc::new(StandbySink::new(Replica::Memory(tier))))
}

/// Guest memory over the standby's replica mapping, which userfaultfd has registered.
///
/// # Safety
///
/// The sink that owns `region` must outlive the returned memory and every VM built on it.
pub unsafe fn memory_over(region: &HostRegion) -> anyhow::Result<vm_memory::GuestMemoryMmap> {
    // SAFETY: forwarded to the caller; the replica mapping is a read-write MAP_SHARED
    // mapping of the tmpfs file (MemoryTier).
    Ok(unsafe { memory::guest_memory_over(region) }?)
}
