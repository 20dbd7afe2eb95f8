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
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};
use transport::Layout;
use uffd_core::LatencySummary;
use vmm_shim::replica::PausedMemory;
use vmm_shim::vm::layout::WORKSET_BASE;
use vmm_shim::vm::switchover::{ms_between, wall_clock};
use vmm_shim::vm::{memory, slice_digests, Program, Switchover, Vm, VmConfig, VmSnapshot};
use vmm_shim::SourceOptions;

use super::demo::{spawn_listening, DemoArgs, Reaper};
use super::demo_replica::DemoCerts;
use super::roles::{bind_listener, identity};
use super::{parse_size, TlsArgs};

#[derive(Args, Debug)]
pub struct VmArgs {
    #[command(subcommand)]
    pub command: VmCommand,
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
    /// Do not hold the guests after their switchover digest to hash all memory; they
    /// continue their workload at once (no `switchover_digest` in the report).
    #[arg(long)]
    pub no_verify: bool,
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
    pub memory_bytes: u64,
    pub vcpus: usize,
    pub program: VmProgram,
    pub working_set: u64,
    /// Each vCPU's op counter when it paused.
    pub guest_progress_at_switchover: Vec<u64>,
    /// Ops per second over the run before switchover, all vCPUs together.
    pub ops_per_s_before: f64,
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
    pub pages_pushed: u64,
    pub push_ms: u64,
    pub total_ms: u64,
}

/// What `faultline vm dest --json` prints.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmDestOutput {
    pub vm_id: String,
    pub memory_bytes: u64,
    pub vcpus: usize,
    pub program: VmProgram,
    /// Last source vCPU stopped → first destination vCPU entered `KVM_RUN` (wall clocks of
    /// the two processes; the source's travels in the state blob).
    pub downtime_ms: f64,
    /// Source connected → vCPUs restored and started (the `on_resume` hook returned).
    pub resume_ms: f64,
    /// Source connected → every page present.
    pub total_ms: f64,
    pub wire_bytes: u64,
    pub faults: u64,
    pub pages_faulted: u64,
    pub pages_pushed: u64,
    pub pages_zero: u64,
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
    let (me, peer) = identity(&a.tls)?;
    let config = a.guest.config()?;
    let run_for = a.guest.run_for()?;
    let mut vm = Vm::new(config.clone()).context("booting the source VM")?;
    vm.start()?;
    let started = Instant::now();
    run_guest(&vm, run_for)?;

    let asked = Instant::now();
    let snapshot = vm
        .pause_at_report(Duration::from_secs(2))
        .context("pausing the source VM")?;
    let pause_ms = asked.elapsed().as_secs_f64() * 1e3;
    let ran = started.elapsed().as_secs_f64();
    let paused_at = wall_clock(vm.paused_at().context("pause time missing")?);
    let paused_at_report = vm.paused_at_report();
    vm.arm_switchover_digest()?;
    let blob = Switchover {
        paused_at,
        paused_at_report: paused_at_report.clone(),
        snapshot: snapshot.clone(),
    }
    .encode();

    let layout = Layout::single(config.mem_size);
    let regions = vm.host_regions();
    let paused = Arc::new(PausedMemory::new(&regions)?);
    let opts = SourceOptions {
        connect: a.connect,
        identity: me,
        peer_cert: peer,
        vm_id: a.vm_id.clone(),
        connect_timeout: Duration::from_secs(a.connect_timeout),
        push: true,
    };
    // Memory is frozen while paused: hash it beside the migration, not before it, so the
    // digests add nothing to the downtime.
    let mem = vm.guest_memory().clone();
    let (report, digests) = std::thread::scope(|s| {
        let hashing = s.spawn(|| -> anyhow::Result<(String, Vec<u64>)> {
            Ok((memory::digest(&mem)?, slice_digests(&mem, &config)?))
        });
        let report = vmm_shim::send_with_state(paused, &layout, &opts, blob);
        let digests = hashing
            .join()
            .map_err(|_| anyhow::anyhow!("the hashing thread panicked"))
            .and_then(|r| r);
        (report, digests)
    });
    let report = report.context("migrating the VM")?;
    let (memory_digest, slices) = digests?;
    vm.stop()?;

    let counters = snapshot.counters().to_vec();
    let out = VmSourceOutput {
        vm_id: a.vm_id,
        memory_bytes: config.mem_size,
        vcpus: config.vcpus,
        program: a.guest.program,
        working_set: config.program.working_set(),
        ops_per_s_before: counters.iter().sum::<u64>() as f64 / ran.max(1e-9),
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
        pages_pushed: report.pages_pushed,
        push_ms: report.push_ms,
        total_ms: report.total_ms,
    };
    if a.json {
        println!("{}", serde_json::to_string(&out)?);
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

type Restored = Result<(Vm, Switchover), String>;

/// In `on_resume`: decode the blob, restore the VM into the (userfaultfd-registered)
/// memory and start it. Touches no guest memory itself: this runs on the network driver,
/// which must stay free to fetch the pages the vCPUs fault on.
fn restore_and_start(
    config: VmConfig,
    mem: vm_memory::GuestMemoryMmap,
    blob: Option<Vec<u8>>,
    hold: bool,
) -> anyhow::Result<(Vm, Switchover)> {
    let blob = blob.context("the source sent no VM state")?;
    let sw = Switchover::decode(&blob).context("decoding the switchover state")?;
    let snapshot = VmSnapshot::from_bytes(sw.snapshot.as_bytes().to_vec())?;
    let mut vm = Vm::restore(config, mem, snapshot).context("restoring the VM")?;
    vm.set_hold_after_digest(hold);
    vm.start()?;
    Ok((vm, sw))
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

fn dest(a: VmDestArgs) -> anyhow::Result<ExitCode> {
    let config = a.guest.config()?;
    let run_for = a.guest.run_for()?;
    let hold = !a.no_verify;
    let listener = bind_listener(
        &a.tls,
        a.listen,
        a.vm_id.clone(),
        a.accept_timeout,
        a.progress,
        a.json,
    )?;

    let size = usize::try_from(config.mem_size).context("memory size does not fit")?;
    let mem = memory::create_guest_memory(size)?;
    let regions = memory::host_regions(&mem);
    let layout = Layout::single(config.mem_size);
    let slot: Arc<Mutex<Option<Restored>>> = Arc::default();
    let (slot2, mem2, config2) = (slot.clone(), mem.clone(), config.clone());
    let received = listener.receive_vm(&regions, &layout, move |blob| {
        let r = restore_and_start(config2, mem2, blob, hold).map_err(|e| format!("{e:#}"));
        *slot2.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
    });
    let restored = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
    let report = received.context("receiving the VM")?;
    let (mut vm, sw) = match restored {
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
        wait_until(&vm, Duration::from_secs(60), "no digest reports", |vm| {
            vm.digests().1.iter().all(|&n| n > 0)
        })?;
        (None, first_run_at.elapsed().as_secs_f64() * 1e3, 0.0)
    };
    let (digests, _) = vm.digests();
    let released = Instant::now();
    let progress_released: u64 = vm.progress().iter().sum();
    run_guest(&vm, run_for)?;
    let final_snapshot = vm.pause().context("pausing the destination VM")?;
    let after = released.elapsed().as_secs_f64();
    let first = vm.first_progress();
    vm.stop()?;

    let at_switchover = sw.snapshot.counters().to_vec();
    let fin = final_snapshot.counters().to_vec();
    let continued = at_switchover
        .iter()
        .zip(&first)
        .zip(&fin)
        .all(|((s, f), e)| f.is_some_and(|f| f >= *s) && e > s);
    let m = &report.metrics;
    let out = VmDestOutput {
        vm_id: report.vm_id.clone(),
        memory_bytes: report.memory_bytes,
        vcpus: config.vcpus,
        program: a.guest.program,
        downtime_ms: ms_between(sw.paused_at, first_run),
        resume_ms: report.resume_ms,
        total_ms: report.total_ms,
        wire_bytes: report.wire_bytes,
        faults: m.faults,
        pages_faulted: m.pages_faulted,
        pages_pushed: m.pages_pushed,
        pages_zero: m.pages_zero,
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
    };
    if a.json {
        println!("{}", serde_json::to_string(&out)?);
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
        "--run-secs".into(),
        a.run_secs.to_string(),
    ];
    let mut cmd = Command::new(exe);
    cmd.args([
        "vm",
        "dest",
        "--listen",
        "127.0.0.1:0",
        "--json",
        "--progress",
    ])
    .args(["--accept-timeout", "60"])
    .args(&guest)
    .args(["--cert", &certs.dst_crt, "--key", &certs.dst_key])
    .args(["--peer-cert", &certs.src_crt]);
    let (mut dest, addr, _events, relay) = spawn_listening(&mut cmd, "destination VMM")?;
    if !a.json {
        eprintln!(
            "booting a {} MiB guest with {} vCPU(s) running {:?}; migrating after {} s ...",
            a.size >> 20,
            a.vcpus,
            a.program,
            a.run_secs
        );
    }
    let mut source = Reaper(Some(
        Command::new(exe)
            .args(["vm", "source", "--connect", &addr, "--json"])
            .args(&guest)
            .args(["--cert", &certs.src_crt, "--key", &certs.src_key])
            .args(["--peer-cert", &certs.dst_crt])
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
        wall_ms: wall.elapsed().as_secs_f64() * 1e3,
    };
    let ok = r.digest_match && r.guest_digest_match && r.continued;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
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
}
