//! `faultline vm source`, `faultline vm dest` and `faultline demo --vm`: migrate a running
//! KVM guest of the reference VMM by postcopy.
//!
//! Source: boot, run, pause at a progress report, arm the switchover digest, send memory and
//! the [`Switchover`] blob; hash memory and every vCPU's slice meanwhile (memory is frozen).
//! Destination: memfd memory registered with userfaultfd, restore and start the vCPUs in
//! `on_resume`; each guest first hashes its slice (faulting it in), and is held in that port
//! exit until every page is present so that all memory can be hashed as it was at
//! switchover; then it keeps running.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use refvmm::layout::WORKSET_BASE;
use refvmm::rate::{rate_between, RateSampler, Sample};
use refvmm::switchover::{ms_between, wall_clock};
use refvmm::{memory, slice_digests, Program, Switchover, Vm, VmConfig, VmOptions, VmSnapshot};
use serde::{Deserialize, Serialize};
use transport::{Layout, PAGE_SIZE};
use uffd_core::{LatencySummary, MetricsSnapshot};
use vmm_shim::replica::{evacuate, evacuate_over, PausedMemory};
use vmm_shim::SourceOptions;

use super::demo::{spawn_listening, DemoArgs, Reaper};
use super::demo_replica::DemoCerts;
use super::roles::{bind_listener, identity, ListenSettings};
use super::source_control::SourceControl;
use super::vm_agent::{AgentArgs, DestAgent, DestAgentReport, SourceAgent, SourceHintsReport};
use super::vm_replica::{self, ReplicaArgs, SourceReplicaReport};
use super::wire_estimate::MemorySample;
use super::{parse_size, TlsArgs};

/// How often the guests' progress is sampled for the rate series.
const SAMPLE_PERIOD: Duration = Duration::from_millis(10);

#[derive(Args, Debug)]
pub struct VmArgs {
    #[command(subcommand)]
    pub command: VmCommand,
}

impl VmArgs {
    /// A source the orchestrator drives evacuates on SIGUSR1 too (the warning).
    pub fn evacuates_on_sigusr1(&self) -> bool {
        matches!(&self.command, VmCommand::Source(s) if s.replica.control.is_some())
    }
}

#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// Boot a KVM guest, run it, pause it and migrate it to `faultline vm dest`.
    Source(VmSourceArgs),
    /// Receive a KVM guest by postcopy, resume it at once, keep it running, report.
    Dest(VmDestArgs),
}

/// The guest programs of the reference VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmProgram {
    /// Increments its counter; touches only its data area.
    Counter,
    /// Random 8-byte reads, half of them followed by a write, over the working set.
    RandomRw,
    /// Sequential read-modify-write, one word per cache line.
    SeqScan,
    /// Read-modify-write, 90% of it in the hot eighth of the working set.
    HotCold,
    /// Read-modify-write only in 64 KiB chunks, 512 KiB apart: an eighth of the working set.
    Scattered,
}

/// What runs in the guest; both ends must be given the same.
#[derive(Args, Debug, Clone)]
pub struct GuestArgs {
    /// Guest memory size (a multiple of 2 MiB).
    #[arg(long, value_parser = parse_size, default_value = "256M")]
    pub size: u64,
    /// vCPUs, 1 to 4.
    #[arg(long, default_value_t = 1)]
    pub vcpus: usize,
    /// Guest workload.
    #[arg(long, value_enum, default_value_t = VmProgram::RandomRw)]
    pub program: VmProgram,
    /// Working set shared by the vCPUs [default: 256M or the largest power of two that fits
    /// above the guest's 8 MiB of fixed areas, whichever is smaller].
    #[arg(long, value_parser = parse_size)]
    pub working_set: Option<u64>,
    /// Ops between two progress reports (a power of two; each report is two VM exits).
    #[arg(long, default_value_t = 1 << 16)]
    pub report_every: u64,
    /// Seconds the guest runs before switchover (source) or after migration (destination).
    #[arg(long, default_value_t = 2.0)]
    pub run_secs: f64,
    /// Percent of its time each vCPU is kept off the CPU, like QEMU's cpu-throttle but in
    /// CPU time (0 to 99), on this end (from boot on the source, from the restore on the
    /// destination): each vCPU uses at most the rest of a core, and the guest writes less.
    /// vCPUs nap at their progress reports (--report-every). For several guests on one
    /// test machine, standing in for hosts of their own.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=99))]
    pub cpu_throttle: u8,
}

impl GuestArgs {
    fn config(&self) -> anyhow::Result<VmConfig> {
        let ws = self.working_set.unwrap_or_else(|| {
            let room = self.size.saturating_sub(WORKSET_BASE);
            if room == 0 {
                0
            } else {
                (1u64 << room.ilog2()).min(256 << 20)
            }
        });
        let program = match self.program {
            VmProgram::Counter => Program::Counter,
            VmProgram::RandomRw => Program::RandomRw { working_set: ws },
            VmProgram::SeqScan => Program::SeqScan { working_set: ws },
            VmProgram::HotCold => Program::HotCold { working_set: ws },
            VmProgram::Scattered => Program::Scattered { working_set: ws },
        };
        Ok(VmConfig {
            mem_size: self.size,
            vcpus: self.vcpus,
            program,
            report_every: self.report_every,
        })
    }

    fn run_for(&self) -> anyhow::Result<Duration> {
        Duration::try_from_secs_f64(self.run_secs)
            .map_err(|e| anyhow::anyhow!("--run-secs {}: {e}", self.run_secs))
    }
}

#[derive(Args, Debug)]
pub struct VmSourceArgs {
    /// Address of the destination.
    #[arg(long)]
    pub connect: SocketAddr,
    #[command(flatten)]
    pub guest: GuestArgs,
    /// VM id announced to the destination.
    #[arg(long, default_value = "vm0")]
    pub vm_id: String,
    /// Seconds to keep retrying while the destination is not up yet.
    #[arg(long, default_value_t = 30)]
    pub connect_timeout: u64,
    /// Give up once the connection has been lost for this many seconds (the session
    /// pauses and reconnects meanwhile; docs/recovery.md). Without it, no limit.
    #[arg(long, value_name = "SECS")]
    pub recover_timeout: Option<u64>,
    #[command(flatten)]
    pub replica: ReplicaArgs,
    #[command(flatten)]
    pub agent: AgentArgs,
    /// Do not ask the guests to hash their slices when they resume: they go straight on with
    /// their workload (for rate measurements; pair with `vm dest --no-verify`).
    #[arg(long)]
    pub no_guest_digest: bool,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct VmDestArgs {
    /// Address to listen on (port 0 picks a free one; `--progress` reports it).
    #[arg(long, default_value = "0.0.0.0:4433")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub guest: GuestArgs,
    /// VM id the source must announce (any if unset).
    #[arg(long)]
    pub vm_id: Option<String>,
    /// Seconds to wait for the source.
    #[arg(long, default_value_t = 120)]
    pub accept_timeout: u64,
    /// Give up once the connection has been lost for this many seconds (the session
    /// pauses and reconnects meanwhile; docs/recovery.md). Without it, no limit.
    #[arg(long, value_name = "SECS")]
    pub recover_timeout: Option<u64>,
    /// Give up on a source that connected before pausing its guest (`vm source` does) and
    /// has not handed the VM over after this many seconds: its guest still runs there.
    #[arg(long, value_name = "SECS", default_value_t = vmm_shim::dest::HAND_OVER_TIMEOUT.as_secs())]
    pub hand_over_timeout: u64,
    /// Do not hold the guests after their switchover digest to hash all memory; they
    /// continue their workload at once (no `switchover_digest` in the report).
    #[arg(long)]
    pub no_verify: bool,
    /// Be a standby: keep a replica of the guest in this directory (on tmpfs), filled by
    /// `vm source --replicate`, and become the destination when the source evacuates.
    #[arg(long)]
    pub replica_dir: Option<PathBuf>,
    #[command(flatten)]
    pub agent: AgentArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Write machine-readable progress events to stderr (used by `faultline demo --vm`).
    #[arg(long)]
    pub progress: bool,
}

/// What `faultline vm source --json` prints.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmSourceOutput {
    pub vm_id: String,
    /// What link outages did (docs/recovery.md).
    #[serde(flatten)]
    pub outages: transport::quic::Outages,
    pub memory_bytes: u64,
    pub vcpus: usize,
    pub program: VmProgram,
    pub working_set: u64,
    /// Each vCPU's op counter when it paused.
    pub guest_progress_at_switchover: Vec<u64>,
    /// Ops per second over the second half of the run before switchover (steady state),
    /// all vCPUs together.
    pub ops_per_s_before: f64,
    /// Replication before the evacuation (`--replicate`).
    pub replica: Option<SourceReplicaReport>,
    /// Each vCPU stopped right after a progress report (needed for the guest digest check).
    pub paused_at_report: Vec<bool>,
    /// Pause requested → every vCPU stopped and saved.
    pub pause_ms: f64,
    /// Wall clock when the last vCPU stopped, ms since the Unix epoch.
    pub paused_at_unix_ms: f64,
    /// xxh3-128 of all guest memory at switchover (as sent).
    pub memory_digest: String,
    /// Per vCPU: FNV-1a of its working-set slice at switchover, 16 hex digits.
    pub slice_digests: Vec<String>,
    pub pages_served: u64,
    /// Pages sent a second time for requests the destination echoed on a lossy path.
    #[serde(default)]
    pub pages_echoed: u64,
    /// Requested pages left to the push, whose copy had already left.
    #[serde(default)]
    pub pages_on_their_way: u64,
    pub pages_pushed: u64,
    pub push_ms: u64,
    pub total_ms: u64,
    /// What the guest agent's hints did (`--agent-socket`).
    #[serde(default)]
    pub hints: Option<SourceHintsReport>,
    /// Packets, losses and the congestion window (absent from older reports).
    #[serde(default)]
    pub path: transport::quic::PathReport,
}

/// What `faultline vm dest --json` prints.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmDestOutput {
    pub vm_id: String,
    /// What link outages did (docs/recovery.md).
    #[serde(flatten)]
    pub outages: transport::quic::Outages,
    pub memory_bytes: u64,
    pub vcpus: usize,
    pub program: VmProgram,
    /// Last source vCPU stopped → first destination vCPU entered `KVM_RUN` (wall clocks of
    /// the two processes; the source's travels in the state blob).
    pub downtime_ms: f64,
    /// Of the downtime: last source vCPU stopped → the VM state in the destination's
    /// resume hook (wall clocks of the two processes).
    pub state_ms: f64,
    /// Of the downtime: the VM state decoded, the vCPUs' registers restored and their
    /// threads started (the rest is their first `KVM_RUN`). The KVM VM and its vCPUs are
    /// built before the source connects, except into a standby's replica, where this
    /// includes building them.
    pub restore_ms: f64,
    /// Source connected → vCPUs restored and started (the `on_resume` hook returned). The
    /// source connects before it pauses, so this includes its guest's last run there.
    pub resume_ms: f64,
    /// Source's last vCPU stopped → every page present here: the migration, downtime
    /// included (wall clocks of the two processes, as `downtime_ms`).
    pub total_ms: f64,
    /// Source connected → every page present (the session's own clock).
    pub session_ms: f64,
    pub wire_bytes: u64,
    pub faults: u64,
    pub pages_faulted: u64,
    pub pages_pushed: u64,
    pub pages_zero: u64,
    /// Of the zero pages, those left as holes of the guest's memfd (nothing allocated).
    pub pages_zero_holes: u64,
    pub fault_latency_us: LatencySummary,
    /// Sum over faulting threads (vCPUs and host accesses) of time waiting for pages.
    pub blocked_ms: f64,
    /// Time each vCPU waited for remote pages (like QEMU's postcopy blocktime), by vCPU index.
    pub vcpu_blocked_ms: Vec<f64>,
    /// The guest's CPUID advertises KVM's asynchronous page faults (the host supports them).
    pub async_pf_exposed: bool,
    pub guest_progress_at_switchover: Vec<u64>,
    /// First counter each vCPU reported after the restore (≥ the switchover value: the
    /// guest continued rather than restarted).
    pub guest_progress_first: Vec<Option<u64>>,
    pub guest_progress_final: Vec<u64>,
    /// Every vCPU resumed from its switchover counter and then made progress.
    pub continued: bool,
    pub paused_at_report: Vec<bool>,
    /// Per vCPU: the digest the guest computed of its slice right after resuming, and the
    /// destination host's hash of the same bytes at that moment.
    pub guest_digests: Vec<Option<String>>,
    pub host_digests: Vec<Option<String>>,
    /// All memory as it was at switchover, hashed while the guests were held after their
    /// digest (absent with `--no-verify`).
    pub switchover_digest: Option<String>,
    /// First vCPU ran → the last guest finished its switchover digest (reading its whole
    /// slice, by demand faults where the push had not brought it yet). With `--no-verify`:
    /// first run → all digests seen by this process.
    pub digest_ms: f64,
    /// Last guest held → released: waiting for the rest of memory and the hash.
    pub held_ms: f64,
    /// Ops per second after the hold was released, all vCPUs together.
    pub ops_per_s_after: f64,
    /// First vCPU ran → every page present (from the session's own timing).
    pub postcopy_ms: f64,
    /// Ops per second from the first run until every page was present (with the hold on,
    /// this includes the time the guests spent held).
    pub ops_per_s_during: Option<f64>,
    /// The guests' total op count every 10 ms, from the first destination vCPU run.
    pub progress_series: Vec<Sample>,
    /// What the standby held and fetched (`--replica-dir`).
    pub replica: Option<DestReplicaReport>,
    /// What the guest agent was told (`--agent-socket`).
    #[serde(default)]
    pub agent: Option<DestAgentReport>,
}

/// What a standby (`vm dest --replica-dir`) adds to its report.
#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct DestReplicaReport {
    pub replication_sessions: u64,
    pub pages_replicated: u64,
    /// Replication's link outages (`pauses`, `paused_ms`, `resume_ms_after_restore`,
    /// `bytes_resent`), all sessions together.
    #[serde(default)]
    pub replication: transport::quic::Outages,
    /// Pages the replica held valid when the evacuation began.
    pub replica_valid_pages: u64,
    pub pages_from_replica: u64,
    pub pages_stale: u64,
    /// Switchover → last stale page present.
    pub vulnerability_ms: f64,
}

pub fn run(a: VmArgs) -> anyhow::Result<ExitCode> {
    match a.command {
        VmCommand::Source(a) => source(a),
        VmCommand::Dest(a) => dest(a),
    }
}

fn hex(v: u64) -> String {
    format!("{v:016x}")
}

/// Sleep for `d`, failing early if a vCPU stops on its own.
fn run_guest(vm: &Vm, d: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        vm.check_vcpus()?;
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(20)));
    }
    vm.check_vcpus()?;
    Ok(())
}

fn source(a: VmSourceArgs) -> anyhow::Result<ExitCode> {
    let mut control = None;
    let r = source_under(a, &mut control);
    SourceControl::fail_unfinished(control, &r);
    r
}

/// [`source`], with the orchestrator's endpoint (if any) in `control`, so that an error on
/// any path is published to the orchestrator.
fn source_under(a: VmSourceArgs, control: &mut Option<SourceControl>) -> anyhow::Result<ExitCode> {
    let (me, peer) = identity(&a.tls)?;
    let config = a.guest.config()?;
    let run_for = a.guest.run_for()?;
    if a.replica.replicate && a.agent.agent_socket.is_some() {
        bail!("--agent-socket and --replicate both need the dirty log; use one of them");
    }
    let options = VmOptions {
        dirty_log: a.replica.replicate || a.agent.agent_socket.is_some(),
    };
    // The evacuation's rate ceiling, which an orchestrator sets; its endpoint listens
    // before the guest boots, so that it reaches this source at once.
    let rate_limit = transport::quic::RateLimit::new(a.replica.evacuate_max_rate);
    let listen = a
        .replica
        .control
        .zip(a.replica.control_peer_cert.as_deref());
    // With --stale-pct, what will cross is the planted pages (replication catches up
    // first).
    let planted = a
        .replica
        .stale_pct
        .map(|p| (p / 100.0 * (config.mem_size / PAGE_SIZE as u64) as f64) as u64);
    *control = SourceControl::start(
        listen,
        &a.vm_id,
        &me,
        config.mem_size,
        planted,
        rate_limit.clone(),
    )?;
    let mut vm = Vm::new_with_options(config.clone(), options).context("booting the source VM")?;
    vm.set_cpu_throttle(a.guest.cpu_throttle)?;
    let layout = Layout::single(config.mem_size);
    let agent = match a.agent.agent_socket {
        Some(_) => Some(SourceAgent::arm(&vm, &a.agent)?),
        None => None,
    };
    let mut opts = SourceOptions {
        connect: a.connect,
        identity: me,
        peer_cert: peer,
        vm_id: a.vm_id.clone(),
        connect_timeout: Duration::from_secs(a.connect_timeout),
        push: true,
        encoding: a.replica.encoding.policy(),
        early_push: true,
        stopper: super::stopper(),
        progress: Some(super::outcome::recorder()),
        recover_timeout: a.recover_timeout.map(Duration::from_secs),
        rate_limit: a.replica.replicate.then_some(rate_limit),
    };
    vm.start()?;
    let started = Instant::now();
    let sampler = RateSampler::start(vm.progress_probe(), started, SAMPLE_PERIOD);
    let replication = if a.replica.replicate {
        Some(vm_replica::start(
            &vm,
            &layout,
            &a,
            &opts.identity,
            &opts.peer_cert,
        )?)
    } else {
        None
    };
    // Connect, authenticate and shake hands while the guest runs, so that none of it is
    // downtime; a failure here leaves the guest unpaused. (An evacuation connects to the
    // standby it replicated to when it pauses: `vm_replica`.)
    let mut prepared = if replication.is_none() {
        Some(
            vmm_shim::PreparedSource::connect(&layout, &opts).with_context(|| {
                format!(
                    "connecting to the destination at {} (the guest was not paused)",
                    a.connect
                )
            })?,
        )
    } else {
        None
    };
    match (control.as_mut(), &replication) {
        // Driven by an orchestrator: until it asks (or SIGUSR1).
        (Some(c), Some(r)) => {
            // --stale-pct plants its pages in the guest's working set.
            let planted = match a.replica.stale_pct {
                Some(pct) => Some(
                    MemorySample::new(vm.host_regions()?, opts.encoding, 0xe571)
                        .only(vm_replica::working_set_pages(&vm, pct)?),
                ),
                None => None,
            };
            c.estimate_encoding(opts.encoding, planted);
            c.run_until_asked(&r.replicator, || vm.check_vcpus().map_err(Into::into))?;
            c.starting();
        }
        _ => run_guest(&vm, run_for)?,
    }
    // The agent scans the running guest; its report decides the plan after the pause.
    let asked_agent = match &agent {
        Some(ag) => Some(ag.ask(&layout)?),
        None => None,
    };
    let ran_ms = started.elapsed().as_secs_f64() * 1e3;
    let series = sampler.stop();
    let ops_per_s_before = rate_between(&series, ran_ms / 2.0, ran_ms).unwrap_or(0.0);
    let mut replicated = match replication {
        Some(r) => Some(vm_replica::finish(r, &mut vm, a.replica.stale_pct)?),
        None => None,
    };
    if let Some(f) = &replicated {
        if let Some(c) = control.as_ref() {
            // What will cross, as far as known before the final harvest.
            let stale = f.state.summary.stale_pages + f.dirtied;
            opts.progress = Some(c.replication_stopped(stale));
        }
        if let Some(to) = a.replica.evacuate_connect {
            opts.connect = to;
        }
    }
    // An evacuation connects to its standby once replication has stopped (the standby
    // takes one session at a time) and, unless --stale-pct paused the guest to plant its
    // pages, before the pause: QUIC's and TLS's handshakes are then not downtime.
    let mut early = match &replicated {
        Some(_) => Some(vmm_shim::EarlyConnection::open(&opts).with_context(|| {
            format!("connecting to the standby at {} to evacuate", opts.connect)
        })?),
        None => None,
    };

    if prepared.as_ref().is_some_and(|p| p.has_failed()) {
        let e = prepared.take().map(|p| p.abandon());
        match e {
            Some(Err(e)) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "the session with the destination at {} ended before the switchover \
                     (the guest was not paused)",
                    a.connect
                )))
            }
            _ => bail!(
                "the session with the destination at {} ended before the switchover",
                a.connect
            ),
        }
    }
    let asked = Instant::now();
    let (snapshot, paused_at) = match replicated.as_mut().and_then(|f| f.snapshot.take()) {
        // Paused already to prepare the stale set; the switchover starts now.
        Some(snapshot) => (snapshot, asked),
        None => {
            let snapshot = vm
                .pause_at_report(Duration::from_secs(2))
                .context("pausing the source VM")?;
            (snapshot, vm.paused_at().context("pause time missing")?)
        }
    };
    let pause_ms = asked.elapsed().as_secs_f64() * 1e3;
    let paused_at = wall_clock(paused_at);
    let paused_at_report = vm.paused_at_report();
    if !a.no_guest_digest {
        vm.arm_switchover_digest()?;
        if let Some(f) = replicated.as_mut() {
            // The dirty log does not see the VMM's own writes.
            f.state.ledger.mark_dirty(&vm.vmm_written_pages());
        }
    }
    let blob = Switchover {
        paused_at,
        paused_at_report: paused_at_report.clone(),
        snapshot: snapshot.clone(),
    }
    .encode();
    // After the VMM's last write to guest memory (the digest request): the dirty log's
    // final harvest must see it.
    let (plan, hints_report) = match (agent, &asked_agent) {
        (Some(ag), Some(asked)) => {
            let (plan, r) = ag.plan(&vm, asked, layout.total_pages())?;
            (Some(plan), Some(r))
        }
        _ => (None, None),
    };
    drop(asked_agent);
    let mut hints_out = None;

    let regions = vm.host_regions()?;
    let mut replica = None;
    let report = match replicated {
        Some(f) => {
            let mut r = SourceReplicaReport::new(&f.state.summary, a.replica.stale_pct, &f);
            // SAFETY: the vCPUs are paused (switchover) and the VMM writes no guest
            // memory until the migration ends.
            unsafe { PausedMemory::new(&regions) }
                .and_then(|m| match early.take() {
                    Some(c) => evacuate_over(c, m, &[], &layout, f.state, f.epoch, Some(blob)),
                    None => evacuate(m, &layout, f.state, f.epoch, &opts, Some(blob)),
                })
                .map(|e| {
                    r.pages_stale_source = e.pages_stale_source;
                    r.pages_stale = e.session.pages_stale;
                    r.final_harvest_ms = e.final_harvest_ms;
                    replica = Some(r);
                    e.session
                })
        }
        // SAFETY: as above, the vCPUs are paused and nothing else writes guest memory.
        None => unsafe { PausedMemory::new(&regions) }.and_then(|paused| {
            let paused = Arc::new(paused);
            match (prepared, &plan) {
                (Some(p), Some(plan)) => p.send_with_hints(paused, blob, plan).map(|sent| {
                    hints_out = hints_report.map(|r| r.with_sent(&sent));
                    sent.session
                }),
                (Some(p), None) => p.send_with_state(paused, blob),
                // Not reached: only an evacuation has no prepared session.
                (None, Some(plan)) => {
                    vmm_shim::send_with_hints(paused, &layout, &opts, Some(blob), plan).map(
                        |sent| {
                            hints_out = hints_report.map(|r| r.with_sent(&sent));
                            sent.session
                        },
                    )
                }
                (None, None) => vmm_shim::send_with_state(paused, &layout, &opts, blob),
            }
        }),
    };
    if let Some(c) = control.take() {
        c.finish(match &report {
            Ok(r) => Ok((r.udp_tx_bytes, r.pages_stale)),
            Err(e) => Err(uffd_core::error::chain(e)),
        });
    }
    let report = report.context("migrating the VM")?;
    // Memory stays frozen until the VM stops: hash it after the migration, not beside it,
    // where a second of hashing on one core competed with the switchover and the push
    // (on two cores, the destination's restore and the push wait for it).
    let mem = vm.guest_memory().clone();
    let memory_digest = memory::digest(&mem)?;
    let slices = slice_digests(&mem, &config)?;
    vm.stop()?;

    let counters = snapshot.counters().to_vec();
    let out = VmSourceOutput {
        outages: report.outages,
        vm_id: a.vm_id,
        memory_bytes: config.mem_size,
        vcpus: config.vcpus,
        program: a.guest.program,
        working_set: config.program.working_set(),
        ops_per_s_before,
        replica,
        guest_progress_at_switchover: counters,
        paused_at_report,
        pause_ms,
        paused_at_unix_ms: paused_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64()
            * 1e3,
        memory_digest,
        slice_digests: slices.into_iter().map(hex).collect(),
        pages_served: report.pages_served,
        pages_echoed: report.pages_echoed,
        pages_on_their_way: report.pages_on_their_way,
        pages_pushed: report.pages_pushed,
        push_ms: report.push_ms,
        total_ms: report.total_ms,
        hints: hints_out,
        path: report.path,
    };
    if a.json {
        super::outcome::print_report(&out)?;
    } else {
        println!(
            "migrated a {} MiB, {}-vCPU {:?} guest to {} in {} ms ({} pages pushed, {} on demand)\n\
             progress at switchover {:?}; memory digest {}",
            out.memory_bytes >> 20,
            out.vcpus,
            out.program,
            a.connect,
            out.total_ms,
            out.pages_pushed,
            out.pages_served,
            out.guest_progress_at_switchover,
            out.memory_digest
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The restored VM, its switchover state, and the rate sampler started with it.
struct Resumed {
    vm: Vm,
    sw: Switchover,
    sampler: RateSampler,
    origin: Instant,
    /// See [`VmDestReport::state_ms`].
    state_ms: f64,
    /// See [`VmDestReport::restore_ms`].
    restore_ms: f64,
    /// Source's last vCPU stopped → this side's vCPUs started (wall clocks).
    stopped_to_started_ms: f64,
}

type Restored = Result<Resumed, String>;

/// In `on_resume`: decode the blob, restore the VM into the (userfaultfd-registered)
/// memory and start it. Touches no guest memory itself: this runs on the network driver,
/// which must stay free to fetch the pages the vCPUs fault on.
/// What a destination restores the VM into.
enum RestoreInto {
    /// A VM made by [`Vm::prepare_restore`] before the state arrived.
    Prepared(Vm),
    /// Guest memory only (a standby's replica mapping, known once the evacuation starts).
    Memory(vm_memory::GuestMemoryMmap),
}

fn restore_and_start(
    config: VmConfig,
    into: RestoreInto,
    blob: Option<Vec<u8>>,
    hold: bool,
    cpu_throttle: u8,
) -> anyhow::Result<Resumed> {
    let state_at = std::time::SystemTime::now();
    let blob = blob.context("the source sent no VM state")?;
    let sw = Switchover::decode(&blob).context("decoding the switchover state")?;
    let snapshot = VmSnapshot::from_bytes(sw.snapshot.as_bytes().to_vec())?;
    let restoring = Instant::now();
    let mut vm = match into {
        RestoreInto::Prepared(mut vm) => {
            vm.load_state(snapshot).context("restoring the VM")?;
            vm
        }
        RestoreInto::Memory(mem) => {
            Vm::restore(config, mem, snapshot).context("restoring the VM")?
        }
    };
    vm.set_hold_after_digest(hold);
    vm.set_cpu_throttle(cpu_throttle)?;
    let origin = Instant::now();
    let sampler = RateSampler::start(vm.progress_probe(), origin, SAMPLE_PERIOD);
    vm.start()?;
    let restore_ms = restoring.elapsed().as_secs_f64() * 1e3;
    let started_at = std::time::SystemTime::now();
    Ok(Resumed {
        state_ms: ms_between(sw.paused_at, state_at),
        restore_ms,
        stopped_to_started_ms: ms_between(sw.paused_at, started_at),
        vm,
        sw,
        sampler,
        origin,
    })
}

/// Wait until `done` holds for the VM, failing if a vCPU stops or `timeout` passes.
fn wait_until(
    vm: &Vm,
    timeout: Duration,
    what: &str,
    done: impl Fn(&Vm) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !done(vm) {
        vm.check_vcpus()?;
        if Instant::now() > deadline {
            bail!("{what} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(())
}

/// What either way of receiving (plain destination or standby) reports.
struct Received {
    /// VM id, total time and wire bytes, as the session measured them.
    session: transport::quic::DestReport,
    memory_bytes: u64,
    resume_ms: f64,
    metrics: MetricsSnapshot,
    replica: Option<DestReplicaReport>,
}

fn dest(a: VmDestArgs) -> anyhow::Result<ExitCode> {
    let config = a.guest.config()?;
    let run_for = a.guest.run_for()?;
    let hold = !a.no_verify;
    let throttle = a.guest.cpu_throttle;
    let listener = bind_listener(ListenSettings {
        tls: &a.tls,
        listen: a.listen,
        vm_id: a.vm_id.clone(),
        accept_timeout: Duration::from_secs(a.accept_timeout),
        recover_timeout: a.recover_timeout.map(Duration::from_secs),
        hand_over_timeout: Duration::from_secs(a.hand_over_timeout),
        progress: a.progress,
        json: a.json,
    })?;

    let size = usize::try_from(config.mem_size).context("memory size does not fit")?;
    let layout = Layout::single(config.mem_size);
    // Declared before the VM, so dropped after it: a standby's replica mapping is the
    // guest memory the VM's memory slot points into.
    let standby = match &a.replica_dir {
        Some(dir) => Some(vm_replica::open_standby(dir, config.mem_size)?),
        None => None,
    };
    let slot: Arc<Mutex<Option<Restored>>> = Arc::default();
    let (slot2, config2) = (slot.clone(), config.clone());
    let agent = a
        .agent
        .agent_socket
        .as_ref()
        .map(|_| DestAgent::new(&a.agent, &layout));
    let agent2 = agent.clone();
    let received = match &standby {
        None => {
            let mem = memory::create_guest_memory(size)?;
            // Each region keeps its mapping alive until the session has unregistered it.
            let regions = memory::host_regions(&mem)?;
            // The KVM VM, its memory slot and vCPUs are made now, while no source is
            // connected: only the registers are left for the downtime.
            let prepared = Vm::prepare_restore(config.clone(), mem).context("preparing the VM")?;
            let r = listener.receive_vm(&regions, &layout, move |blob| {
                let r = restore_and_start(
                    config2,
                    RestoreInto::Prepared(prepared),
                    blob,
                    hold,
                    throttle,
                )
                .map_err(|e| format!("{e:#}"));
                if let (Ok(_), Some(agent)) = (&r, &agent2) {
                    agent.resumed();
                }
                *slot2.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
            });
            r.context("receiving the VM").map(|r| Received {
                session: r.session,
                memory_bytes: r.memory_bytes,
                resume_ms: r.resume_ms,
                metrics: r.metrics,
                replica: None,
            })
        }
        Some(sink) => {
            let r = listener.serve_standby(sink.clone(), &layout, move |region, blob| {
                // SAFETY: `standby` owns the replica mapping and is dropped after the VM
                // (see its declaration); the mapping is read-write MAP_SHARED tmpfs.
                let r = unsafe { vm_replica::memory_over(&region) }
                    .and_then(|mem| {
                        restore_and_start(config2, RestoreInto::Memory(mem), blob, hold, throttle)
                    })
                    .map_err(|e| format!("{e:#}"));
                if let (Ok(_), Some(agent)) = (&r, &agent2) {
                    agent.resumed();
                }
                *slot2.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
            });
            r.context("receiving the VM into the standby")
                .and_then(|r| {
                    Ok(Received {
                        session: r.session,
                        memory_bytes: r.memory_bytes,
                        resume_ms: r.resume_ms,
                        metrics: r
                            .metrics
                            .context("the evacuation ended before the guest resumed")?,
                        replica: Some(DestReplicaReport {
                            replication_sessions: r.replication_sessions,
                            pages_replicated: r.pages_replicated,
                            replication: r.replication,
                            replica_valid_pages: r.replica_valid_pages,
                            pages_from_replica: r.evacuation.pages_from_replica,
                            pages_stale: r.evacuation.pages_stale,
                            vulnerability_ms: r.evacuation.vulnerability_ms,
                        }),
                    })
                })
        }
    };
    let restored = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
    // Every page is present (or the session failed): the agent hears so either way.
    let agent_report = agent.as_ref().map(DestAgent::finish);
    let report = received?;
    let Resumed {
        mut vm,
        sw,
        sampler,
        origin,
        state_ms,
        restore_ms,
        stopped_to_started_ms,
    } = match restored {
        Some(Ok(r)) => r,
        Some(Err(e)) => bail!("{e}"),
        None => bail!("the migration ended without resuming the VM"),
    };
    let first_run_at = vm.first_run_at().context("no vCPU ever ran")?;
    let first_run = wall_clock(first_run_at);

    // Every guest hashes its slice first (the source armed the request); wait for it.
    let (switchover_digest, digest_ms, held_ms) = if hold {
        wait_until(&vm, Duration::from_secs(60), "guests not all held", |vm| {
            vm.held().iter().all(|&h| h)
        })?;
        let all_held = vm
            .held_at()
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(first_run_at);
        let d = vm.switchover_memory_digest()?;
        vm.release_hold();
        let digest_ms = all_held.duration_since(first_run_at).as_secs_f64() * 1e3;
        (Some(d), digest_ms, all_held.elapsed().as_secs_f64() * 1e3)
    } else {
        (None, 0.0, 0.0)
    };
    let (digests, _) = vm.digests();
    let released = Instant::now();
    let progress_released: u64 = vm.progress().iter().sum();
    run_guest(&vm, run_for)?;
    let final_snapshot = vm.pause().context("pausing the destination VM")?;
    let after = released.elapsed().as_secs_f64();
    let first = vm.first_progress();
    vm.stop()?;
    // Times relative to the first destination vCPU run.
    let shift = first_run_at.saturating_duration_since(origin).as_secs_f64() * 1e3;
    let series: Vec<Sample> = sampler
        .stop()
        .into_iter()
        .filter(|s| s.t_ms >= shift)
        .map(|s| Sample {
            t_ms: s.t_ms - shift,
            ops: s.ops,
        })
        .collect();
    // The session's clock starts at the connect, which a source may make long before it
    // pauses (connect-before-pause); the guest resumed `resume_ms` after it. The migration
    // is timed from the source's stop.
    let session_ms = report.session.total_ms as f64;
    let postcopy_ms = (session_ms - report.resume_ms).max(0.0);
    let total_ms = stopped_to_started_ms + postcopy_ms;

    let at_switchover = sw.snapshot.counters().to_vec();
    let fin = final_snapshot.counters().to_vec();
    let continued = at_switchover
        .iter()
        .zip(&first)
        .zip(&fin)
        .all(|((s, f), e)| f.is_some_and(|f| f >= *s) && e > s);
    let m = &report.metrics;
    let out = VmDestOutput {
        outages: report.session.outages,
        vm_id: report.session.vm_id.clone(),
        memory_bytes: report.memory_bytes,
        vcpus: config.vcpus,
        program: a.guest.program,
        downtime_ms: ms_between(sw.paused_at, first_run),
        state_ms,
        restore_ms,
        resume_ms: report.resume_ms,
        total_ms,
        session_ms,
        wire_bytes: report.session.wire_bytes,
        faults: m.faults,
        pages_faulted: m.pages_faulted,
        pages_pushed: m.pages_pushed,
        pages_zero: m.pages_zero,
        pages_zero_holes: m.pages_zero_holes,
        fault_latency_us: m.fault_latency_us,
        blocked_ms: m.blocked_ns as f64 / 1e6,
        async_pf_exposed: vm.async_pf_exposed(),
        vcpu_blocked_ms: vm
            .vcpu_thread_ids()
            .iter()
            .map(|t| m.blocked_ns_by_thread.get(t).copied().unwrap_or(0) as f64 / 1e6)
            .collect(),
        guest_progress_at_switchover: at_switchover,
        guest_progress_first: first,
        ops_per_s_after: (fin.iter().sum::<u64>().saturating_sub(progress_released)) as f64
            / after.max(1e-9),
        guest_progress_final: fin,
        continued,
        paused_at_report: sw.paused_at_report.clone(),
        guest_digests: digests.iter().map(|d| d.map(|d| hex(d.guest))).collect(),
        host_digests: digests.iter().map(|d| d.map(|d| hex(d.host))).collect(),
        switchover_digest,
        digest_ms,
        held_ms,
        postcopy_ms,
        ops_per_s_during: rate_between(&series, 0.0, postcopy_ms),
        progress_series: series,
        replica: report.replica,
        agent: agent_report,
    };
    if a.json {
        super::outcome::print_report(&out)?;
    } else {
        println!(
            "received a {} MiB, {}-vCPU guest: downtime {:.1} ms, resumed {:.1} ms after connect, \
             all pages in {:.0} ms\n{} faults (p50 {} us, p99 {} us); progress {:?} -> {:?}\n\
             switchover digest {}",
            out.memory_bytes >> 20,
            out.vcpus,
            out.downtime_ms,
            out.resume_ms,
            out.total_ms,
            out.faults,
            out.fault_latency_us.p50,
            out.fault_latency_us.p99,
            out.guest_progress_at_switchover,
            out.guest_progress_final,
            out.switchover_digest.as_deref().unwrap_or("(not verified)")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `faultline demo --vm --json` prints exactly this.
#[derive(Debug, Serialize)]
struct VmDemoReport {
    /// Destination memory as at switchover (hashed while the guests were held) equals the
    /// source's memory at switchover.
    digest_match: bool,
    /// Each guest's own digest of its slice, right after resuming at the destination,
    /// equals the source host's hash of that slice at switchover (and the destination
    /// host's hash of the same bytes).
    guest_digest_match: bool,
    /// Every vCPU continued from its switchover counter and made progress.
    continued: bool,
    memory_bytes: u64,
    vcpus: usize,
    program: VmProgram,
    working_set: u64,
    downtime_ms: f64,
    resume_ms: f64,
    total_ms: f64,
    faults: u64,
    fault_latency_us: LatencySummary,
    blocked_ms: f64,
    vcpu_blocked_ms: Vec<f64>,
    pages_faulted: u64,
    pages_pushed: u64,
    pages_zero: u64,
    wire_bytes: u64,
    guest_progress_at_switchover: Vec<u64>,
    guest_progress_final: Vec<u64>,
    ops_per_s_before: f64,
    ops_per_s_after: f64,
    digest_ms: f64,
    held_ms: f64,
    source_digest: String,
    dest_digest: Option<String>,
    /// With --replica: what replication sent, and what crossed at evacuation.
    replica_source: Option<SourceReplicaReport>,
    replica_dest: Option<DestReplicaReport>,
    wall_ms: f64,
}

pub(super) fn run_demo(
    a: &DemoArgs,
    exe: &std::path::Path,
    certs: &DemoCerts,
    wall: Instant,
) -> anyhow::Result<ExitCode> {
    let guest: Vec<String> = vec![
        "--size".into(),
        a.size.to_string(),
        "--vcpus".into(),
        a.vcpus.to_string(),
        "--program".into(),
        a.program
            .to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_else(|| "random-rw".into()),
    ];
    // With --replica the source replicates for --replicate-secs before it evacuates.
    let source_secs = if a.replica {
        a.replicate_secs
    } else {
        a.run_secs
    };
    let replica_dir = if a.replica {
        Some(
            tempfile::Builder::new()
                .prefix("faultline-demo-vm-")
                .tempdir_in("/dev/shm")
                .context("creating the replica directory on /dev/shm (tmpfs)")?,
        )
    } else {
        None
    };
    let mut cmd = Command::new(exe);
    cmd.args([
        "vm",
        "dest",
        "--listen",
        "127.0.0.1:0",
        "--json",
        "--progress",
    ])
    .args(["--accept-timeout", "120"])
    .args(&guest)
    .args(["--run-secs", &a.run_secs.to_string()])
    .args(["--cert", &certs.dst_crt, "--key", &certs.dst_key])
    .args(["--peer-cert", &certs.src_crt]);
    if let Some(dir) = &replica_dir {
        cmd.arg("--replica-dir").arg(dir.path());
    }
    let (mut dest, addr, _events, relay) = spawn_listening(&mut cmd, "destination VMM")?;
    if !a.json {
        eprintln!(
            "booting a {} MiB guest with {} vCPU(s) running {:?}; {} {} s ...",
            a.size >> 20,
            a.vcpus,
            a.program,
            if a.replica {
                "replicating it to the standby, then evacuating after"
            } else {
                "migrating after"
            },
            source_secs
        );
    }
    let mut src_cmd = Command::new(exe);
    src_cmd
        .args(["vm", "source", "--connect", &addr, "--json"])
        .args(&guest)
        .args(["--run-secs", &source_secs.to_string()])
        .args(["--cert", &certs.src_crt, "--key", &certs.src_key])
        .args(["--peer-cert", &certs.dst_crt]);
    if a.replica {
        src_cmd.arg("--replicate");
        if let Some(p) = a.stale_pct {
            src_cmd.args(["--stale-pct", &p.to_string()]);
        }
    }
    let mut source = Reaper(Some(
        src_cmd
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the source VMM process")?,
    ));
    let src_out = source.finish("source VMM")?;
    let dst_out = dest.finish("destination VMM")?;
    let _ = relay.join();
    let src: VmSourceOutput =
        serde_json::from_str(src_out.trim()).context("parsing the source's report")?;
    let dst: VmDestOutput =
        serde_json::from_str(dst_out.trim()).context("parsing the destination's report")?;
    let guest_digest_match = dst.guest_digests.len() == src.slice_digests.len()
        && dst
            .guest_digests
            .iter()
            .zip(&dst.host_digests)
            .zip(&src.slice_digests)
            .all(|((g, h), s)| g.as_ref() == Some(s) && h.as_ref() == Some(s));
    let r = VmDemoReport {
        digest_match: dst.switchover_digest.as_ref() == Some(&src.memory_digest),
        guest_digest_match,
        continued: dst.continued
            && dst.guest_progress_at_switchover == src.guest_progress_at_switchover,
        memory_bytes: src.memory_bytes,
        vcpus: src.vcpus,
        program: src.program,
        working_set: src.working_set,
        downtime_ms: dst.downtime_ms,
        resume_ms: dst.resume_ms,
        total_ms: dst.total_ms,
        faults: dst.faults,
        fault_latency_us: dst.fault_latency_us,
        blocked_ms: dst.blocked_ms,
        vcpu_blocked_ms: dst.vcpu_blocked_ms.clone(),
        pages_faulted: dst.pages_faulted,
        pages_pushed: dst.pages_pushed,
        pages_zero: dst.pages_zero,
        wire_bytes: dst.wire_bytes,
        guest_progress_at_switchover: src.guest_progress_at_switchover,
        guest_progress_final: dst.guest_progress_final,
        ops_per_s_before: src.ops_per_s_before,
        ops_per_s_after: dst.ops_per_s_after,
        digest_ms: dst.digest_ms,
        held_ms: dst.held_ms,
        source_digest: src.memory_digest,
        dest_digest: dst.switchover_digest,
        replica_source: src.replica,
        replica_dest: dst.replica,
        wall_ms: wall.elapsed().as_secs_f64() * 1e3,
    };
    let ok = r.digest_match && r.guest_digest_match && r.continued;
    if a.json {
        super::outcome::print_report(&r)?;
    } else {
        print_text(&r);
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_text(r: &VmDemoReport) {
    let yes = |b: bool| if b { "MATCH" } else { "MISMATCH" };
    println!(
        "faultline demo --vm: a running {} MiB KVM guest, {} vCPU(s), {:?} over {} MiB, migrated by postcopy over QUIC on loopback",
        r.memory_bytes >> 20,
        r.vcpus,
        r.program,
        r.working_set >> 20
    );
    println!(
        "  downtime   {:.1} ms (last source vCPU stopped -> first destination vCPU ran); resumed {:.1} ms after the source connected",
        r.downtime_ms, r.resume_ms
    );
    println!(
        "  postcopy   every page present after {:.0} ms: {} pushed, {} on demand, {} zero; {:.1} MiB on the wire",
        r.total_ms,
        r.pages_pushed,
        r.pages_faulted,
        r.pages_zero,
        r.wire_bytes as f64 / (1 << 20) as f64
    );
    println!(
        "  faults     {} (latency p50 {} us, p99 {} us, max {} us); {:.1} ms blocked in all",
        r.faults,
        r.fault_latency_us.p50,
        r.fault_latency_us.p99,
        r.fault_latency_us.max,
        r.blocked_ms
    );
    println!(
        "  guest      progress {:?} at switchover -> {:?} at the end; {:.2e} ops/s before, {:.2e} after",
        r.guest_progress_at_switchover, r.guest_progress_final, r.ops_per_s_before, r.ops_per_s_after
    );
    println!(
        "  check      guests hashed their slices {:.0} ms after resuming, held {:.0} ms for the memory hash",
        r.digest_ms, r.held_ms
    );
    println!(
        "  digests    guest: {}; all memory: source {} vs destination {}: {}; continued: {}",
        yes(r.guest_digest_match),
        r.source_digest,
        r.dest_digest.as_deref().unwrap_or("-"),
        yes(r.digest_match),
        if r.continued { "yes" } else { "NO" }
    );
    if let (Some(s), Some(d)) = (&r.replica_source, &r.replica_dest) {
        let pages = (r.memory_bytes / 4096).max(1);
        println!(
            "  replica    {} pages replicated with the {} tracker ({} harvests) while the guest ran; \
             at evacuation {} pages ({:.1}%) were stale and crossed, {} came from the replica",
            s.pages_sent,
            s.tracker,
            s.harvests,
            d.pages_stale,
            100.0 * d.pages_stale as f64 / pages as f64,
            d.pages_from_replica
        );
    }
}
