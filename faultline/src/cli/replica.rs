//! `faultline replicate` (source, normal times, then evacuation) and `faultline standby`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use faultline::image::SourceImage;
use faultline::metrics::{
    EvacuationState, Exporter, ReplicateMetrics, ReplicateSample, StandbyMetrics, StandbySample,
};
use faultline::workload::{
    dirty_fraction, move_fraction, Mutator, Pattern, Workload, WorkloadReport,
};
use serde::Serialize;
use transport::quic::RateLimit;
use transport::Layout;
use uffd_core::{open_tracker, DiskTier, MemoryTier, TrackerChoice};
use vmm_shim::digest::digest_all;
use vmm_shim::replica::{
    evacuate_over, EvacuationReport, Replica, ReplicationSummary, Replicator, ReplicatorOptions,
    ReplicatorStats, StandbySink,
};
use vmm_shim::{DestOptions, EarlyConnection, Listener, SourceOptions, StandbyReport};

use fleet::control::{EvacState, ReplState, Status};
use tokio::sync::watch;

use super::roles::{emit_event, identity};
use super::source_control::SourceControl;
use super::vm_disks::{
    digest_disk, dirty_disks, export_received, finish_exports, open_standby_disks, DiskDigest,
    DiskExports, DiskReaders, DiskWriters, ReceiveDiskArgs, SourceDiskArgs, SourceDisks,
};
use super::wire_estimate::MemorySample;
use super::{parse_size, TlsArgs};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum TrackerArg {
    /// userfaultfd write-protect (async) with PAGEMAP_SCAN if the kernel has it, else hashing.
    Auto,
    WpAsync,
    Hash,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum TierArg {
    /// tmpfs file that becomes guest memory at evacuation.
    Memory,
    /// Sparse file on disk, read back at evacuation.
    Disk,
}

#[derive(Args, Debug)]
pub struct ReplicateArgs {
    /// Address of the standby.
    #[arg(long)]
    pub connect: SocketAddr,
    /// Size of the built-in guest image.
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    pub synthetic: u64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, default_value = "vm0")]
    pub vm_id: String,
    /// Threads writing to the guest's working set during replication.
    #[arg(long, default_value_t = 1)]
    pub writers: usize,
    /// Writes per second per writer thread (0: as fast as possible).
    #[arg(long, default_value_t = 20_000)]
    pub write_rate: u64,
    /// Share of guest pages the writers touch, in percent.
    #[arg(long, default_value_t = 10.0)]
    pub hot_pct: f64,
    /// Replication bandwidth budget in Mbit/s of page payload.
    #[arg(long, default_value_t = 800.0)]
    pub budget_mbps: f64,
    #[arg(long, value_enum, default_value_t = TrackerArg::Auto)]
    pub tracker: TrackerArg,
    /// Run the replicator at normal priority instead of SCHED_IDLE (only CPU the guest leaves
    /// idle). Useful when other work keeps every CPU busy and the replica must fill anyway.
    #[arg(long)]
    pub replicator_normal_priority: bool,
    /// Seconds of replication before the evacuation starts; SIGUSR1 starts it at once (the
    /// disaster warning). Default 3 s; with `--control`, never: only the orchestrator's
    /// `Evacuate` (or SIGUSR1) starts it, unless this is given too.
    #[arg(long)]
    pub evacuate_after: Option<f64>,
    /// Listen here for the orchestrator (`faultline evacuate`): QUIC with mutual TLS,
    /// presenting `--cert` and accepting only `--control-peer-cert` (docs/fleet.md).
    #[arg(long, requires = "control_peer_cert")]
    pub control: Option<SocketAddr>,
    /// The orchestrator's certificate (PEM), pinned on the control endpoint.
    #[arg(long, requires = "control")]
    pub control_peer_cert: Option<PathBuf>,
    /// Make exactly this percentage of pages stale at evacuation: wait until replication has
    /// caught up, stop it, then write to that many pages.
    #[arg(long)]
    pub stale_pct: Option<f64>,
    /// With --stale-pct: make this percentage of pages stale too, by copying into each the
    /// content of another page (page migration or compaction in a guest). The replica holds
    /// that content already, so with deduplication these cross as references.
    #[arg(long, requires = "stale_pct")]
    pub stale_moved_pct: Option<f64>,
    /// Evacuate through this address instead of `--connect` (for example a WAN emulator in
    /// front of the standby, while replication went the direct way).
    #[arg(long)]
    pub evacuate_connect: Option<SocketAddr>,
    /// Send the evacuation at most this fast, bits per second (`40M`, `1G`): a share of
    /// the link or the NIC. `faultline evacuate` holds it lower while other VMs have the
    /// link; no orchestrator's request lifts or raises it. Without it, no limit but the
    /// orchestrator's. It holds where the rate × the round trip is at least two
    /// datagrams (docs/fleet.md#rate-limits).
    #[arg(long, value_name = "RATE", value_parser = super::wan::parse_rate)]
    pub evacuate_max_rate: Option<u64>,
    /// Give up once the connection has been lost for this many seconds (the session
    /// pauses and reconnects meanwhile; docs/recovery.md). Without it, no limit.
    #[arg(long, value_name = "SECS")]
    pub recover_timeout: Option<u64>,
    /// How the evacuation encodes pages (see `faultline source --encoding`).
    #[arg(long, value_enum, default_value_t = super::EncodingArg::Auto)]
    pub encoding: super::EncodingArg,
    /// Wait for the standby's answer before pushing the stale pages (see `faultline
    /// source --no-early-push`).
    #[arg(long)]
    pub no_early_push: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464; port 0:
    /// any, logged). Off by default. See docs/operations.md#metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub disk: SourceDiskArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct StandbyArgs {
    #[arg(long, default_value = "0.0.0.0:4433")]
    pub listen: SocketAddr,
    /// Guest memory size; must equal the source's.
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    pub size: u64,
    #[arg(long, value_enum, default_value_t = TierArg::Memory)]
    pub tier: TierArg,
    /// Replica directory (memory tier default: /dev/shm/faultline/<vm-id>; must be tmpfs).
    #[arg(long)]
    pub replica_dir: Option<PathBuf>,
    #[arg(long, default_value = "vm0")]
    pub vm_id: String,
    /// Threads running on the guest memory after evacuation (stand-ins for vCPUs).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Touches of guest memory per second per worker (0: as fast as it can). Paced workers
    /// still fault on missing pages but leave the cores to other work: for several standbys
    /// on one test machine, standing in for hosts of their own.
    #[arg(long, default_value_t = 0)]
    pub touch_rate: u64,
    /// Seconds to wait for each connection from the source.
    #[arg(long, default_value_t = 300)]
    pub accept_timeout: u64,
    /// Give up once the connection has been lost for this many seconds (the session
    /// pauses and reconnects meanwhile; docs/recovery.md). Without it, no limit.
    #[arg(long, value_name = "SECS")]
    pub recover_timeout: Option<u64>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464; port 0:
    /// any, logged). Off by default. See docs/operations.md#metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub disk: ReceiveDiskArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[arg(long)]
    pub json: bool,
    /// Write machine-readable events to stderr (used by `faultline demo`).
    #[arg(long)]
    pub progress: bool,
}

/// What `faultline replicate --json` prints.
#[derive(Debug, Serialize)]
pub struct ReplicateOutput {
    pub vm_id: String,
    pub memory_bytes: u64,
    /// Digest of guest memory at switchover (guest paused).
    pub digest: String,
    pub stale_pct_requested: Option<f64>,
    pub replication: ReplicationSummary,
    pub writers: WorkloadReport,
    pub evacuation: EvacuationReport,
    /// Each disk at switchover (guest paused): name, size, digest.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub disk_digests: Vec<DiskDigest>,
    /// Blocks the stand-in guest wrote to the disks during replication.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_blocks_written: Option<u64>,
    /// Blocks written after replication stopped (`--disk-stale-pct`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_blocks_dirtied: Option<u64>,
    /// From the evacuation being asked for to the source connecting.
    pub prep: PrepTimes,
    /// From the guest's pause to the standby's answer to `Hello` (it resumes the guest as
    /// it answers), milliseconds: the downtime, give or take half a round trip (`None` if
    /// the session never got that far). The connection is made before the pause
    /// (`prep.connect_ms`); with `--stale-pct` the pause comes first and this includes the
    /// catch-up and the planting.
    pub downtime_ms: Option<f64>,
}

/// What `faultline standby --json` prints.
#[derive(Debug, Serialize)]
pub struct StandbyOutput {
    pub tier: &'static str,
    pub digest: String,
    #[serde(flatten)]
    pub report: StandbyReport,
    pub workload: WorkloadReport,
    /// Each disk when the evacuation ended: name, size, digest.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub disk_digests: Vec<DiskDigest>,
    /// The stand-in guest's disk reads after the switchover.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_reads: Option<DiskReads>,
}

/// Reads the stand-in guest made on the disks at the standby, and how many failed.
#[derive(Debug, Serialize)]
pub struct DiskReads {
    pub reads: u64,
    pub errors: u64,
}

/// A replication epoch: random enough per source run.
pub(super) fn epoch() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (t ^ (u64::from(std::process::id()) << 32)) | 1
}

/// Logs where metrics are served (tests read the line for the port).
fn log_metrics(e: &Exporter) {
    eprintln!("metrics listening on http://{}/metrics", e.local_addr());
}

/// `replicate --metrics-listen`: the exporter, bound before anything starts, and the
/// metrics it serves. The replicator's live counters are read once they exist (`stats`).
fn replicate_metrics(
    addr: SocketAddr,
    vm_id: &str,
    budget_bytes_per_sec: u64,
    stats: Arc<OnceLock<Arc<ReplicatorStats>>>,
) -> anyhow::Result<(Exporter, ReplicateMetrics)> {
    let (m, registry) = ReplicateMetrics::new(vm_id, budget_bytes_per_sec);
    let m2 = m.clone();
    let every = Some(faultline::metrics::SAMPLE_INTERVAL);
    let exporter = Exporter::start(addr, registry, every, move || {
        if let Some(s) = stats.get() {
            let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            m2.update(
                &ReplicateSample {
                    stale_pages: get(&s.stale_pages),
                    pages_sent: get(&s.pages_sent),
                    pages_acked: get(&s.pages_acked),
                    link_bytes_sent: s.link.sent(),
                    pauses: get(&s.pauses),
                    connected: s.connected.load(Ordering::Relaxed),
                },
                Instant::now(),
            );
        }
    })?;
    log_metrics(&exporter);
    Ok((exporter, m))
}

pub fn replicate(a: ReplicateArgs) -> anyhow::Result<ExitCode> {
    let mut control = None;
    let r = replicate_under(a, &mut control);
    SourceControl::fail_unfinished(control, &r);
    r
}

/// [`replicate`], with the orchestrator's endpoint (if any) in `control`, so that an error
/// on any path is published to the orchestrator.
fn replicate_under(
    a: ReplicateArgs,
    control: &mut Option<SourceControl>,
) -> anyhow::Result<ExitCode> {
    let (me, peer) = identity(&a.tls)?;
    // The evacuation's rate ceiling: from the command line, changed by the orchestrator.
    let rate_limit = RateLimit::new(a.evacuate_max_rate);
    // First: the orchestrator may ask for the status while the guest is being set up.
    // With --stale-pct (and --stale-moved-pct) the evacuation first lets replication
    // catch up, then makes exactly those pages stale: the status reports what will cross,
    // the planted pages only (the stale count meanwhile is replication's lag).
    let planted = a.stale_pct.map(|_| planted_pages(&a));
    *control = SourceControl::start(
        a.control.zip(a.control_peer_cert.as_deref()),
        &a.vm_id,
        &me,
        a.synthetic,
        planted,
        rate_limit.clone(),
    )?;
    let budget_bytes_per_sec = (a.budget_mbps * 1e6 / 8.0) as u64;
    let live_stats: Arc<OnceLock<Arc<ReplicatorStats>>> = Arc::default();
    let metrics = a
        .metrics_listen
        .map(|addr| replicate_metrics(addr, &a.vm_id, budget_bytes_per_sec, live_stats.clone()))
        .transpose()?;
    let image = SourceImage::synthetic(a.synthetic, a.seed)?;
    let region = image
        .host_region()
        .context("synthetic images live in memory")?;
    let regions = [region];
    if let Some(c) = control.as_mut() {
        // --stale-pct plants its pages in a uniform sample of memory.
        // (--stale-moved-pct pages take another page's content: not counted.)
        let planted = a.stale_pct.map(|pct| {
            MemorySample::new(regions.to_vec(), a.encoding.policy(), a.seed ^ 0xe571)
                .planted_share(pct / 100.0)
        });
        c.estimate_encoding(a.encoding.policy(), planted);
    }
    let layout = Layout::single(a.synthetic);
    let choice = match a.tracker {
        TrackerArg::Auto => TrackerChoice::Auto,
        TrackerArg::WpAsync => TrackerChoice::WpAsync,
        TrackerArg::Hash => TrackerChoice::Hash,
    };
    let tracker = open_tracker(&regions, choice).context("starting dirty tracking")?;
    let epoch = epoch();
    let opts = ReplicatorOptions {
        connect: a.connect,
        identity: me.clone(),
        peer_cert: peer.clone(),
        vm_id: a.vm_id.clone(),
        epoch,
        budget_bytes_per_sec,
        interval: Duration::from_millis(20),
        connect_timeout: Duration::from_secs(30),
        recover_timeout: a.recover_timeout.map(Duration::from_secs),
        idle_priority: !a.replicator_normal_priority,
    };
    let disks = SourceDisks::open(&a.disk)?;
    if let Some(c) = &control {
        c.disks(
            disks
                .disks
                .iter()
                .map(|(_, d)| disk::BlockDevice::size(&**d))
                .sum(),
        );
    }
    let plan = a.disk.exports();
    plan.check(disks.disks.iter().map(|(n, _)| n.as_str()))?;
    let exports = DiskExports::start(&disks.devices(), &plan)?;
    let replicated = disks.replicated();
    let replicator =
        Replicator::start_with_disks(&regions, &replicated, layout.clone(), tracker, opts)?;
    let _ = live_stats.set(replicator.stats_handle());
    let mutator = Mutator::start(&regions, a.writers, a.seed, a.hot_pct / 100.0, a.write_rate);
    let disk_writers = DiskWriters::start(&disks, a.disk.disk_write_rate, a.seed);
    let evacuate_after = match (a.evacuate_after, &control) {
        (Some(s), _) => Some(s),
        (None, Some(_)) => None,
        (None, None) => Some(3.0),
    };
    let until = evacuate_after.map(|s| Instant::now() + Duration::from_secs_f64(s));
    // Wakes every 10 ms so that an evacuation asked for starts at once (an orchestrator
    // counts this wait in every VM's setup); the status is refreshed every 100 ms.
    let mut last_status = Instant::now();
    while until.is_none_or(|u| Instant::now() < u) && !super::evacuate_now().load(Ordering::Relaxed)
    {
        if !replicator.is_running() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
        if last_status.elapsed() < Duration::from_millis(100) {
            continue;
        }
        last_status = Instant::now();
        if let Some(c) = control.as_mut() {
            c.publish_replication(&replicator);
        }
        if !a.json {
            eprint!("\rreplicating: {:>8} pages stale", replicator.stale_pages());
        }
    }
    if let Some(c) = control.as_mut() {
        c.starting();
    }
    let result = evacuate(
        &a,
        &me,
        &peer,
        Evacuation {
            image: &image,
            regions: &regions,
            layout: &layout,
            epoch,
            replicator,
            mutator,
            disk_writers,
            exports,
            disks: &disks,
            replicated: &replicated,
            control: control.as_ref(),
            metrics: metrics.as_ref().map(|(_, m)| m),
            rate_limit,
        },
    );
    if let Some(c) = control.take() {
        c.finish(match &result {
            Ok(out) => Ok((
                out.evacuation.session.udp_tx_bytes,
                out.evacuation.session.pages_stale,
            )),
            Err(e) => Err(format!("{e:#}")),
        });
    }
    let out = result?;
    if a.json {
        super::outcome::print_report(&out)?;
    } else {
        println!(
            "replicated with {} ({} pages sent, {} acknowledged, {} pauses), then evacuated {} stale pages of {} in {} ms\nsource digest at switchover {}",
            out.replication.tracker,
            out.replication.pages_sent,
            out.replication.pages_acked,
            out.replication.outages.pauses,
            out.evacuation.session.pages_stale,
            a.synthetic / 4096,
            out.evacuation.session.total_ms,
            out.digest
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The guest's writers: running, or paused with what they did.
enum Guest {
    Running(Mutator, DiskWriters, DiskExports),
    Paused(WorkloadReport, u64),
}

impl Guest {
    /// Stops the memory and disk writers (NBD clients and the VMM's vhost-user-blk device
    /// are part of the guest: they pause with it, the device's connection closed once its
    /// requests are answered); what they did, and the disk blocks written. A paused guest
    /// stays as it is.
    fn pause(self) -> (WorkloadReport, u64) {
        match self {
            Guest::Running(mutator, disk_writers, exports) => {
                let writers = mutator.stop();
                let blocks = disk_writers.stop();
                exports.stop();
                (writers, blocks)
            }
            Guest::Paused(writers, blocks) => (writers, blocks),
        }
    }
}

/// What `replicate` has running when its evacuation starts.
struct Evacuation<'a> {
    image: &'a SourceImage,
    regions: &'a [uffd_core::HostRegion],
    layout: &'a Layout,
    epoch: u64,
    replicator: Replicator,
    mutator: Mutator,
    disk_writers: DiskWriters,
    exports: DiskExports,
    disks: &'a SourceDisks,
    replicated: &'a [vmm_shim::disks::ReplicatedDisk],
    control: Option<&'a SourceControl>,
    metrics: Option<&'a ReplicateMetrics>,
    /// The evacuation's rate ceiling (the orchestrator's share of the link).
    rate_limit: RateLimit,
}

/// Stops replication, connects to the standby, pauses the guest and evacuates into the
/// standby (with `--stale-pct`: pauses first, see below).
fn evacuate(
    a: &ReplicateArgs,
    me: &transport::tls::Identity,
    peer: &transport::tls::CertificateDer<'static>,
    e: Evacuation<'_>,
) -> anyhow::Result<ReplicateOutput> {
    let Evacuation {
        image,
        regions,
        layout,
        epoch,
        replicator,
        mutator,
        disk_writers,
        exports,
        disks,
        replicated,
        control,
        metrics,
        rate_limit,
    } = e;
    let mut prep = PrepTimes::start();
    let planting = a.stale_pct.is_some() || a.disk.disk_stale_pct.is_some();
    // Normally replication stops while the guest still runs and the evacuation's
    // connection is made before the pause (what the guest writes meanwhile is in the final
    // harvest): the QUIC and TLS handshakes are not downtime. With --stale-pct the guest
    // pauses first, replication catches up and the stale pages are planted after it.
    let mut guest = Guest::Running(mutator, disk_writers, exports);
    let mut paused_at = None;
    // From here the evacuation waits for the replicator: off idle priority, or a host busy
    // evacuating other VMs starves it (its catch-up and last round took 0.2 s there).
    replicator.hurry();
    if planting {
        let (writers, blocks) = guest.pause();
        guest = Guest::Paused(writers, blocks);
        paused_at = Some(Instant::now());
        // Caught up: a round that began after the writers stopped (two harvests on: the
        // count of stale pages is stored at the end of a round) left nothing stale.
        let harvests = || replicator.stats().harvests.load(Ordering::Relaxed);
        let since = harvests();
        let deadline = Instant::now() + Duration::from_secs(120);
        while (replicator.stale_pages() > 0 || harvests() < since + 2) && replicator.is_running() {
            if Instant::now() > deadline {
                bail!(
                    "replication did not catch up within 120 s ({} pages stale); raise --budget-mbps",
                    replicator.stale_pages()
                );
            }
            // A hurried replicator's round takes a millisecond or two: a coarser poll
            // would be most of the catch-up, which an orchestrator counts in the setup.
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    prep.caught_up();
    let state = replicator.stop().context("replication failed")?;
    // What will cross, as far as known before the final harvest.
    let stale_pages = state.summary.stale_pages + planted_pages(a);
    let publish: vmm_shim::ProgressFn = match control {
        Some(c) => c.replication_stopped(stale_pages),
        None => super::outcome::recorder(),
    };
    let progress: vmm_shim::ProgressFn = match metrics {
        Some(m) => {
            m.set_evacuation(EvacuationState::Evacuating);
            let m = m.clone();
            Arc::new(move |p: vmm_shim::Progress| {
                m.evacuation_sent(p.bytes_sent);
                publish(p);
            })
        }
        None => publish,
    };
    // When the session was handed over (the standby's `HelloAck`): the downtime's end.
    let handed_over: Arc<OnceLock<Instant>> = Arc::default();
    let progress: vmm_shim::ProgressFn = {
        let handed_over = handed_over.clone();
        Arc::new(move |p: vmm_shim::Progress| {
            if p.handed_over {
                handed_over.get_or_init(Instant::now);
            }
            progress(p);
        })
    };
    let opts = SourceOptions {
        connect: a.evacuate_connect.unwrap_or(a.connect),
        identity: me.clone(),
        peer_cert: peer.clone(),
        vm_id: a.vm_id.clone(),
        connect_timeout: Duration::from_secs(30),
        push: true,
        encoding: a.encoding.policy(),
        early_push: !a.no_early_push,
        stopper: super::stopper(),
        progress: Some(progress),
        recover_timeout: a.recover_timeout.map(Duration::from_secs),
        rate_limit: Some(rate_limit),
    };
    let early = EarlyConnection::open(&opts).with_context(|| {
        format!(
            "connecting to the standby at {} to evacuate{}",
            opts.connect,
            if planting {
                ""
            } else {
                " (the guest was not paused)"
            }
        )
    })?;
    prep.connected();
    // The pause (unless --stale-pct paused already): from here the guest's memory and
    // disks are what the standby must end up with.
    let (writers, disk_blocks_written) = guest.pause();
    let paused_at = paused_at.unwrap_or_else(Instant::now);
    if let Some(pct) = a.stale_moved_pct {
        move_fraction(regions, pct / 100.0, a.seed ^ 0x30fe);
    }
    if let Some(pct) = a.stale_pct {
        dirty_fraction(regions, pct / 100.0, a.seed ^ 0xd1e7);
    }
    let disk_blocks_dirtied = match a.disk.disk_stale_pct {
        Some(pct) => Some(dirty_disks(disks, pct, a.seed ^ 0xd15c)?),
        None => None,
    };
    let disk_digests = disks.digests()?;
    if !a.json {
        eprintln!();
    }
    let replication = state.summary.clone();
    prep.planted();
    // SAFETY: the mutator is stopped and the last host writes (dirty_fraction) are done:
    // nothing writes the image while it is evacuated.
    let memory = unsafe { vmm_shim::replica::PausedMemory::new(regions) }?;
    let evacuation = evacuate_over(early, memory, replicated, layout, state, epoch, None);
    if let Some(m) = metrics {
        m.set_evacuation(if evacuation.is_ok() {
            EvacuationState::Done
        } else {
            EvacuationState::Failed
        });
    }
    let evacuation = evacuation?;
    // The guest stayed paused throughout, so its memory is still what it was at the
    // switchover: hashing it here keeps 256 MiB-1 GiB of hashing out of the setup.
    let digest = image.digest()?;
    Ok(ReplicateOutput {
        vm_id: a.vm_id.clone(),
        memory_bytes: a.synthetic,
        digest,
        stale_pct_requested: a.stale_pct,
        replication,
        writers,
        evacuation,
        disk_blocks_written: (!disks.disks.is_empty()).then_some(disk_blocks_written),
        disk_blocks_dirtied,
        disk_digests,
        prep,
        downtime_ms: handed_over
            .get()
            .map(|h| h.saturating_duration_since(paused_at).as_secs_f64() * 1e3),
    })
}

/// Where the time went between the evacuation being asked for and the source connecting,
/// milliseconds (an orchestrator counts all of it in the VM's setup).
#[derive(Debug, Serialize)]
pub struct PrepTimes {
    #[serde(skip)]
    since: Instant,
    /// Waiting for replication to catch up (`--stale-pct`, `--disk-stale-pct`; 0 without).
    pub catch_up_ms: f64,
    /// Stopping replication and connecting to the standby (QUIC, TLS): before the pause,
    /// except with `--stale-pct` / `--disk-stale-pct`.
    pub connect_ms: f64,
    /// Pausing the guest and planting the stale pages and blocks asked for.
    pub plant_ms: f64,
}

impl PrepTimes {
    fn start() -> PrepTimes {
        PrepTimes {
            since: Instant::now(),
            catch_up_ms: 0.0,
            connect_ms: 0.0,
            plant_ms: 0.0,
        }
    }

    fn lap(&mut self) -> f64 {
        let ms = self.since.elapsed().as_secs_f64() * 1e3;
        self.since = Instant::now();
        ms
    }

    fn caught_up(&mut self) {
        self.catch_up_ms = self.lap();
    }

    fn connected(&mut self) {
        self.connect_ms = self.lap();
    }

    fn planted(&mut self) {
        self.plant_ms = self.lap();
    }
}

const PAGE: u64 = 4096;

/// Pages `--stale-pct` and `--stale-moved-pct` make stale at the evacuation.
fn planted_pages(a: &ReplicateArgs) -> u64 {
    [a.stale_pct, a.stale_moved_pct]
        .iter()
        .flatten()
        .map(|p| (p / 100.0 * (a.synthetic / PAGE) as f64) as u64)
        .sum()
}

/// The status a control endpoint publishes before anything happened: all memory stale.
pub(super) fn idle_status_of(vm_id: &str, memory_bytes: u64) -> Status {
    Status {
        vm_id: vm_id.to_string(),
        memory_bytes,
        stale_bytes: memory_bytes,
        dirty_rate_bps: 0,
        stale_growth_bps: None,
        replication: ReplState::Running,
        evacuation: EvacState::Idle,
        bytes_sent: 0,
        pages_remaining: None,
        progress_age_ms: None,
        progress_measured: None,
        pages_stale: None,
        error: None,
        pages_pushed: None,
        wire_bytes_pushed: None,
        pages_sampled: None,
        wire_bytes_sampled: None,
        disk_bytes: None,
        // The control endpoint says it as it sends the status.
        own_rate_cap_bps: None,
    }
}

/// A progress callback that records (for a failure report) and publishes the evacuation's
/// progress on the control endpoint: `transferring` from the session's hand-over (its
/// switchover), `done` from its last sample; the pages left are estimated from the stream
/// bytes sent.
pub(super) fn progress_to(
    status: Arc<watch::Sender<Status>>,
    stale_pages: u64,
) -> vmm_shim::ProgressFn {
    Arc::new(move |p: vmm_shim::Progress| {
        super::outcome::record_progress(p);
        status.send_modify(|s| {
            if s.evacuation.is_final() {
                return;
            }
            s.bytes_sent = p.bytes_sent;
            s.progress_measured = Some(Instant::now());
            if p.pushed.pages > 0 {
                s.pages_pushed = Some(p.pushed.pages);
                s.wire_bytes_pushed = Some(p.pushed.wire_bytes);
            }
            if let Some(pages) = p.pages_stale {
                // Every page is at the standby: done, before the connection's closing
                // handshake and the source's own reporting, which the VM does not wait for.
                s.evacuation = EvacState::Done;
                s.pages_stale = Some(pages);
                s.pages_remaining = Some(0);
                return;
            }
            if !p.handed_over {
                // Connected, handshake and switchover under way: still starting.
                return;
            }
            s.evacuation = EvacState::Transferring;
            // From the stream bytes that left, not those the push wrote: it writes up to a
            // stream window ahead, several round trips at the link's rate. Counted at what
            // the push's frames cost a page so far, which the encoding decides: about a
            // page with `--encoding off`, less when compressed or deduplicated.
            s.pages_remaining = Some(stale_pages.saturating_sub(p.pages_sent()));
        });
    })
}

/// The guest's dirty rate, estimated from the replicator's counters: pages that went
/// stale per second are the change of the stale count plus the pages acknowledged
/// meanwhile (an upper bound: an acknowledgement of a version already superseded counts
/// too), smoothed over about two seconds. Beside it, the net growth of the stale count
/// (replication keeps running while the VM waits for its evacuation, so this, not the
/// dirty rate, is how its stale bytes grow meanwhile).
#[derive(Default)]
pub(super) struct DirtyRate {
    last: Option<(Instant, u64, u64)>,
    pages_per_s: f64,
    growth_pages_per_s: f64,
}

impl DirtyRate {
    /// A new sample of the stale and acknowledged counts; the estimates in bits per
    /// second: (dirty rate, net growth of the stale set).
    pub(super) fn sample(&mut self, stale: u64, acked: u64) -> (u64, u64) {
        self.sample_at(Instant::now(), stale, acked)
    }

    fn sample_at(&mut self, now: Instant, stale: u64, acked: u64) -> (u64, u64) {
        match self.last {
            Some((t, s0, a0)) if now.duration_since(t) >= Duration::from_millis(500) => {
                let dt = now.duration_since(t).as_secs_f64();
                let grew = stale as f64 - s0 as f64;
                let went_stale = (grew + acked.saturating_sub(a0) as f64).max(0.0);
                self.pages_per_s = 0.5 * self.pages_per_s + 0.5 * went_stale / dt;
                self.growth_pages_per_s = 0.5 * self.growth_pages_per_s + 0.5 * grew.max(0.0) / dt;
                self.last = Some((now, stale, acked));
            }
            Some(_) => {}
            None => self.last = Some((now, stale, acked)),
        }
        let bps = |pages_per_s: f64| (pages_per_s * (PAGE * 8) as f64) as u64;
        (bps(self.pages_per_s), bps(self.growth_pages_per_s))
    }
}

/// `standby --metrics-listen`: the exporter, bound before anything starts, and reading
/// the standby's live figures once its sink exists (`sink`).
fn standby_metrics(
    addr: SocketAddr,
    vm_id: &str,
    sink: Arc<OnceLock<Arc<StandbySink>>>,
) -> anyhow::Result<Exporter> {
    let (m, registry) = StandbyMetrics::new(vm_id);
    let exporter = Exporter::start(addr, registry, None, move || {
        if let Some(s) = sink.get() {
            m.update(&StandbySample {
                pages: s.memory_pages(),
                valid_pages: s.valid_pages(),
                bytes_received: s.bytes_received(),
                pauses: s.pauses(),
                connected: s.is_connected(),
            });
        }
    })?;
    log_metrics(&exporter);
    Ok(exporter)
}

pub fn standby(a: StandbyArgs) -> anyhow::Result<ExitCode> {
    let (me, peer) = identity(&a.tls)?;
    let live_sink: Arc<OnceLock<Arc<StandbySink>>> = Arc::default();
    let _metrics = a
        .metrics_listen
        .map(|addr| standby_metrics(addr, &a.vm_id, live_sink.clone()))
        .transpose()?;
    // Bind first: a port in use must not leave a replica created (or a 16 MiB file) behind.
    let mut listener = Listener::bind(DestOptions {
        listen: a.listen,
        identity: me,
        peer_cert: peer,
        expected_vm_id: Some(a.vm_id.clone()),
        accept_timeout: Duration::from_secs(a.accept_timeout),
        progress: Some(super::outcome::recorder()),
        recover_timeout: a.recover_timeout.map(Duration::from_secs),
        hand_over_timeout: vmm_shim::dest::HAND_OVER_TIMEOUT,
    })?;
    listener.stop_on(&super::stopper());
    let pages = a.size / 4096;
    let replica = match a.tier {
        TierArg::Memory => {
            let dir = match &a.replica_dir {
                Some(d) => d.clone(),
                None => MemoryTier::default_dir(&a.vm_id)?,
            };
            Replica::Memory(
                MemoryTier::open(&dir, pages)
                    .with_context(|| format!("opening the replica in {}", dir.display()))?,
            )
        }
        TierArg::Disk => {
            let dir = a
                .replica_dir
                .clone()
                .context("--tier disk needs --replica-dir on a disk filesystem")?;
            Replica::Disk(Arc::new(DiskTier::open(&dir, pages).with_context(
                || format!("opening the replica in {}", dir.display()),
            )?))
        }
    };
    a.disk.check()?;
    let disk_replicas = open_standby_disks(&a.disk)?;
    let layout = a
        .disk
        .disks
        .iter()
        .fold(Layout::single(a.size), |l, (n, size)| {
            l.with_disk(n.clone(), *size)
        });
    let sink = Arc::new(StandbySink::with_disks(replica, disk_replicas));
    let _ = live_sink.set(sink.clone());
    let addr = listener.local_addr()?;
    if a.progress {
        emit_event(serde_json::json!({
            "event": "listening",
            "addr": addr.to_string(),
            "replica_valid_pages": sink.valid_pages(),
            "torn_pages": sink.torn_pages(),
        }));
    } else if !a.json {
        eprintln!(
            "standby listening on {addr}; replica holds {} valid pages ({} torn found at open)",
            sink.valid_pages(),
            sink.torn_pages()
        );
    }
    type Running = (Workload, DiskReaders, anyhow::Result<DiskExports>);
    let workload: Arc<Mutex<Option<Running>>> = Arc::default();
    let started = workload.clone();
    let (workers, touch_rate) = (a.workers, a.touch_rate);
    let readers = a.disk.disk_readers;
    let disk_sink = sink.clone();
    let plan = a.disk.exports();
    let result = listener.serve_standby(sink.clone(), &layout, move |region, _state| {
        // The disks are served from here on: to the VMM, the NBD clients and the stand-in
        // readers.
        let exports = export_received(disk_sink.disk_devices(), &plan);
        let w = Workload::start_paced(&[region], workers, 0x5eed, Pattern::Random, touch_rate);
        let devices = disk_sink
            .disk_devices()
            .into_iter()
            .map(|(_, d)| d)
            .collect();
        let r = DiskReaders::start(devices, readers);
        *started.lock().unwrap_or_else(|p| p.into_inner()) = Some((w, r, exports));
    });
    let running = workload.lock().unwrap_or_else(|p| p.into_inner()).take();
    let (workload, disk_reads, exports) = match running {
        Some((w, r, e)) => (w.stop(), Some(r.stop()), Some(e)),
        None => (WorkloadReport::default(), None, None),
    };
    let report = result?;
    let exports = exports.transpose()?;
    finish_exports(exports, &a.disk, a.json, "evacuation");
    let disk_digests = sink
        .disk_devices()
        .iter()
        .map(|(n, d)| digest_disk(n, &**d))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let region = sink
        .guest_region()
        .context("the evacuation ended without guest memory")?;
    // SAFETY: the guest memory stays mapped while `sink` lives, the workload threads were
    // joined above and userfaultfd is unregistered, so nothing writes it while we read.
    let bytes =
        unsafe { std::slice::from_raw_parts(region.host_addr() as *const u8, region.len()) };
    let out = StandbyOutput {
        tier: match a.tier {
            TierArg::Memory => "memory",
            TierArg::Disk => "disk",
        },
        digest: digest_all([bytes]),
        report,
        workload,
        disk_digests,
        disk_reads: disk_reads.map(|(reads, errors)| DiskReads { reads, errors }),
    };
    if a.json {
        super::outcome::print_report(&out)?;
    } else {
        println!(
            "evacuation received: {} pages from the replica, {} stale pages over the network in {:.0} ms (vulnerable {:.0} ms)\ndestination digest {}",
            out.report.evacuation.pages_from_replica,
            out.report.evacuation.pages_stale,
            out.report.session.total_ms,
            out.report.evacuation.vulnerability_ms,
            out.digest
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BITS_PER_PAGE: u64 = PAGE * 8;

    #[test]
    fn the_pages_left_follow_the_stream_bytes_and_say_when_they_were_measured() {
        let status = Arc::new(watch::channel(idle_status_of("vm", 1 << 30)).0);
        let report = progress_to(status.clone(), 1000);
        let sample = |stream_bytes_sent: u64| vmm_shim::Progress {
            pages: 1 << 18,
            // UDP bytes run ahead of the stream's (headers, retransmissions); the pages
            // left are counted from the stream's.
            bytes_sent: stream_bytes_sent * 2,
            stream_bytes_sent,
            handed_over: true,
            ..Default::default()
        };
        report(sample(400 * PAGE));
        let s = status.borrow().clone();
        assert_eq!(s.evacuation, EvacState::Transferring);
        assert_eq!(s.pages_remaining, Some(600));
        assert_eq!(s.bytes_sent, 800 * PAGE);
        let measured = s.progress_measured.expect("when it was measured");
        let age = s.stamped().progress_age_ms.unwrap();
        assert!(age < 1000, "{age}");
        report(sample(2000 * PAGE));
        let s = status.borrow().clone();
        assert_eq!(s.pages_remaining, Some(0), "never below none");
        assert!(s.progress_measured.unwrap() >= measured);
    }

    #[test]
    fn the_pages_left_count_what_the_encoding_made_of_a_page() {
        let status = Arc::new(watch::channel(idle_status_of("vm", 1 << 30)).0);
        let report = progress_to(status.clone(), 1000);
        // At the switchover the push has handed out nothing: pages of bytes, no ratio.
        report(vmm_shim::Progress {
            handed_over: true,
            ..Default::default()
        });
        let s = status.borrow().clone();
        assert_eq!(s.pages_remaining, Some(1000));
        assert_eq!((s.pages_pushed, s.wire_ratio()), (None, None));
        // Then 800 pages compressed to a quarter of a page each, of which a quarter of
        // the stream bytes (frame headers included) left.
        report(vmm_shim::Progress {
            stream_bytes_sent: 50 * PAGE + 200 * 15,
            handed_over: true,
            pushed: transport::proto::Pushed {
                pages: 800,
                wire_bytes: 200 * PAGE,
                stream_bytes: 200 * PAGE + 800 * 15,
                done: false,
            },
            ..Default::default()
        });
        let s = status.borrow().clone();
        // 200 pages sent, 800 left (counted as pages of bytes, 950).
        assert_eq!(s.pages_remaining, Some(800));
        assert_eq!(s.pages_pushed, Some(800));
        assert_eq!(s.wire_bytes_pushed, Some(200 * PAGE));
        assert_eq!(s.wire_ratio(), Some(0.25));
    }

    #[test]
    fn replication_that_keeps_up_is_dirty_rate_without_growth() {
        let t0 = Instant::now();
        let mut r = DirtyRate::default();
        assert_eq!(
            r.sample_at(t0, 100, 0),
            (0, 0),
            "no estimate from one sample"
        );
        // 1,000 pages acknowledged in a second, the stale count unchanged: 1,000 pages/s
        // dirtied (half of it after one smoothing step), nothing grows.
        let (dirty, growth) = r.sample_at(t0 + Duration::from_secs(1), 100, 1000);
        assert_eq!(dirty, 500 * BITS_PER_PAGE);
        assert_eq!(growth, 0);
        let (dirty, growth) = r.sample_at(t0 + Duration::from_secs(2), 100, 2000);
        assert_eq!(dirty, 750 * BITS_PER_PAGE);
        assert_eq!(growth, 0);
    }

    #[test]
    fn a_growing_stale_set_counts_in_both_and_shrinking_is_not_negative() {
        let t0 = Instant::now();
        let mut r = DirtyRate::default();
        r.sample_at(t0, 0, 0);
        // 400 more stale and 600 acknowledged in a second: 1,000 dirtied, 400 grew.
        let (dirty, growth) = r.sample_at(t0 + Duration::from_secs(1), 400, 600);
        assert_eq!((dirty, growth), (500 * BITS_PER_PAGE, 200 * BITS_PER_PAGE));
        // Samples closer than 500 ms apart change nothing.
        assert_eq!(
            r.sample_at(t0 + Duration::from_millis(1200), 10_000, 600),
            (dirty, growth)
        );
        // Replication catching up: the stale count falls; growth decays, never below 0.
        let (_, growth) = r.sample_at(t0 + Duration::from_secs(2), 0, 1000);
        assert_eq!(growth, 100 * BITS_PER_PAGE);
    }
}
