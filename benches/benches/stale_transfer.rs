//! Stale transfer: what an evacuation into a standby replica sends, against plain postcopy,
//! and what dirty tracking costs the source while it replicates.
//!
//! **Evacuation cases** (one per stale fraction). The bench process is the standby: a fresh
//! [`MemoryTier`] in a temporary directory on `/dev/shm` (removed afterwards),
//! [`StandbySink`], [`Listener::serve_standby`]; nothing runs on the guest memory after the
//! evacuation (`on_resume` does nothing), so every stale page arrives by push. A child process
//! is the source and follows `faultline replicate --stale-pct` (faultline/src/cli/replica.rs):
//! synthetic image, dirty tracker (`TrackerChoice::Auto`), [`Replicator`] with a generous
//! budget until the initial copy is acknowledged, the mutator writing to 10% of the pages for
//! a while, mutator paused, replication caught up (`stale_pages() == 0`), replicator stopped,
//! [`dirty_fraction`] makes exactly `pct`% of the pages stale, [`evacuate`]. Reported from the
//! standby's [`vmm_shim::StandbyReport`]: `wire_bytes` (UDP bytes both ways of the evacuation
//! session) and `total_ms` (evacuation connected → every page present).
//! Afterwards the standby's guest memory must have the digest the source computed at
//! switchover.
//!
//! The 0% case is the **fixed overhead** (handshake, TLS, the invalid and stale page bitmaps
//! of 8 bytes per 64 pages each, session close); it always runs, first. For the other
//! fractions: `wire_over_stale` = (wire_bytes − fixed) / stale_bytes, and `meets_target` =
//! wire_bytes ≤ 1.05 × stale_bytes + fixed.
//!
//! **Baseline**: plain postcopy of the same image (the synthetic `mix` image, same seed),
//! push on, nothing touching the memory: [`faultline_benches::migration::migrate`]. It runs
//! once before and once after the evacuation cases; ratios use the mean of the two.
//!
//! **Tracking cost**: one child process runs [`Mutator`] (1 thread, 10% hot set, unlimited
//! rate) for a few seconds in each mode: `none` (no tracker), `wp` and `hash` (a tracker
//! harvested every 20 ms by a normal-priority thread that only harvests: the tracking cost
//! alone, at the full cadence), `wp-replicator` and `hash-replicator` (a real [`Replicator`]
//! to a live standby in the bench process, measured after its initial copy: tracking plus
//! reading and sending pages, at `SCHED_IDLE` as the replicator runs, so on a busy machine it
//! may hardly harvest; `harvests` says how often it did). Rounds alternate the order; ops/s
//! are medians over the rounds, `throughput_ratio` = mode / none, `per_cpu_ratio` the same
//! per CPU-second the mutator thread got (less sensitive to other load).
//! The last replicator phase ends with an evacuation so the standby returns (and its digest
//! is checked too).
//!
//! Lines: `postcopy` (per run), `fixed_overhead`, `evacuation` (per stale fraction),
//! `tracking` (per mode), `summary`.
//!
//! Environment: `FAULTLINE_BENCH_BYTES` (1G), `FAULTLINE_BENCH_STALE_PCTS` (`0,1,10,50,100`),
//! `FAULTLINE_BENCH_SEED` (1), `FAULTLINE_BENCH_BUDGET_MBPS` (2000, replication payload
//! budget), `FAULTLINE_BENCH_MUTATE_MS` (1000, mutator time before the stale set is made),
//! `FAULTLINE_BENCH_TRACKING_MS` (3000 per mode and round), `FAULTLINE_BENCH_TRACKING_ROUNDS`
//! (2), `FAULTLINE_BENCH_TRACKING_MODES` (`none,wp,hash,wp-replicator,hash-replicator`; empty
//! skips), `FAULTLINE_BENCH_POSTCOPY_RUNS` (2; 0 skips the baseline).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use faultline::workload::{dirty_fraction, Mutator};
use faultline::SourceImage;
use faultline_benches::certs::{self, CertDir};
use faultline_benches::child::{self, spawn_child};
use faultline_benches::migration::{self, cpu_secs, ImageKind, MigrationSpec};
use faultline_benches::stats::median;
use faultline_benches::{emit, env_size};
use serde_json::{json, Value};
use transport::{Layout, PAGE_SIZE};
use uffd_core::{open_tracker, HostRegion, MemoryTier, TrackerChoice};
use vmm_shim::digest::digest_all;
use vmm_shim::replica::{
    evacuate, Replica, Replicator, ReplicatorOptions, ReplicatorState, StandbySink,
};
use vmm_shim::{DestOptions, Listener, SourceOptions, StandbyReport};

const BENCH: &str = "stale_transfer";
/// Target: wire bytes at most this many times the stale pages' bytes, plus the fixed overhead.
const TARGET: f64 = 1.05;
const VM_ID: &str = "bench-vm";
/// Child role: replicate, make `pct`% stale, evacuate.
const ROLE_STALE: &str = "stale-source";
/// Child role: the mutator with and without tracking.
const ROLE_TRACKING: &str = "tracking-source";
/// The replicator's harvest period, as in `faultline replicate`.
const INTERVAL: Duration = Duration::from_millis(20);
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(600);
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long replication may take to catch up (initial copy of the hash tracker included).
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(300);
const HOT_FRACTION: f64 = 0.1;
/// Writes per second of the mutator before the stale set is made (the CLI's default).
const MUTATE_RATE: u64 = 20_000;

fn main() -> anyhow::Result<()> {
    if let Some(role) = child::child_role() {
        let args = child::child_args();
        return match role.as_str() {
            ROLE_STALE => stale_source(&args),
            ROLE_TRACKING => tracking_source(&args),
            _ if migration::is_child_role(&role) => migration::run_child(&role, &args),
            other => bail!("unknown child role {other:?}"),
        };
    }
    let bytes = env_size("FAULTLINE_BENCH_BYTES", 1 << 30);
    ensure!(
        bytes > 0 && bytes.is_multiple_of(PAGE_SIZE as u64),
        "FAULTLINE_BENCH_BYTES must be a non-zero multiple of {PAGE_SIZE}"
    );
    let seed = env_size("FAULTLINE_BENCH_SEED", 1);
    let budget_mbps = env_size("FAULTLINE_BENCH_BUDGET_MBPS", 2000);
    let budget = budget_mbps * 1_000_000 / 8;
    let mutate_ms = env_size("FAULTLINE_BENCH_MUTATE_MS", 1000);
    let tracking_ms = env_size("FAULTLINE_BENCH_TRACKING_MS", 3000);
    let tracking_rounds = env_size("FAULTLINE_BENCH_TRACKING_ROUNDS", 2).max(1);
    let postcopy_runs = env_size("FAULTLINE_BENCH_POSTCOPY_RUNS", 2);
    let mut pcts = env_list("FAULTLINE_BENCH_STALE_PCTS", "0,1,10,50,100")
        .iter()
        .map(|s| s.parse::<f64>().with_context(|| format!("stale pct {s:?}")))
        .collect::<anyhow::Result<Vec<f64>>>()?;
    ensure!(
        pcts.iter().all(|p| (0.0..=100.0).contains(p)),
        "stale percentages must be within 0..=100"
    );
    // The 0% case is the fixed overhead every other case is judged with: run it first.
    pcts.retain(|&p| p != 0.0);
    pcts.insert(0, 0.0);
    let modes = env_list(
        "FAULTLINE_BENCH_TRACKING_MODES",
        "none,wp,hash,wp-replicator,hash-replicator",
    );
    for m in &modes {
        ensure!(
            ["none", "wp", "hash", "wp-replicator", "hash-replicator"].contains(&m.as_str()),
            "unknown tracking mode {m:?}"
        );
    }
    let pages = bytes / PAGE_SIZE as u64;
    eprintln!(
        "[{BENCH}] {bytes} bytes ({pages} pages), stale % {pcts:?}, budget {budget_mbps} Mbit/s, \
         load average at start: {}",
        loadavg()
    );

    let mut postcopy: Vec<Value> = Vec::new();
    let run_postcopy = |postcopy: &mut Vec<Value>| -> anyhow::Result<()> {
        let run = postcopy.len() + 1;
        eprintln!("[{BENCH}] plain postcopy run {run}, mix image, push on");
        let m = migration::migrate(
            MigrationSpec {
                bytes,
                image: ImageKind::Mix,
                seed,
                push: true,
            },
            |_| {},
        )
        .context("plain postcopy baseline")?;
        let d = &m.dest;
        let v = json!({
            "bench": BENCH,
            "case": "postcopy",
            "run": run,
            "bytes": bytes,
            "image": "mix",
            "wire_bytes": d.session.wire_bytes,
            "total_ms": d.session.total_ms as f64,
            "resume_ms": d.resume_ms,
            "pages_pushed": d.metrics.pages_pushed,
            "pages_zero": d.metrics.pages_zero,
            "pages_checked": m.pages_checked,
            "source_session_cpu_secs": m.source.session_cpu_secs,
            "loadavg": loadavg(),
        });
        eprintln!(
            "[{BENCH}]   postcopy: {} wire bytes in {:.0} ms",
            d.session.wire_bytes, d.session.total_ms
        );
        emit(&v);
        postcopy.push(v);
        Ok(())
    };
    if postcopy_runs > 0 {
        run_postcopy(&mut postcopy)?;
    }

    let mut cases: Vec<Value> = Vec::new();
    for &pct in &pcts {
        eprintln!("[{BENCH}] evacuation with {pct}% stale");
        cases.push(stale_case(bytes, seed, pct, budget, mutate_ms)?);
    }
    for _ in 1..postcopy_runs {
        run_postcopy(&mut postcopy)?;
    }

    let pc_col = |k: &str| -> Option<f64> {
        let v: Vec<f64> = postcopy.iter().filter_map(|r| r[k].as_f64()).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let (pc_wire, pc_ms) = (pc_col("wire_bytes"), pc_col("total_ms"));
    let fixed = cases[0]["wire_bytes"]
        .as_u64()
        .context("0% case wire bytes")?;
    emit(&json!({
        "bench": BENCH,
        "case": "fixed_overhead",
        "bytes": bytes,
        "pages": pages,
        "wire_bytes": fixed,
        "total_ms": cases[0]["total_ms"],
        "bitmap_bytes_each": pages.div_ceil(64) * 8,
        "note": "0% stale evacuation: handshake, TLS, invalid + stale page bitmaps, close",
    }));
    let mut verdicts = Vec::new();
    for c in &mut cases {
        let wire = c["wire_bytes"].as_u64().unwrap_or(0);
        let stale_bytes = c["stale_bytes"].as_u64().unwrap_or(0);
        let ms = c["total_ms"].as_f64().unwrap_or(f64::NAN);
        let over = (stale_bytes > 0).then(|| (wire as f64 - fixed as f64) / stale_bytes as f64);
        let meets = wire as f64 <= TARGET * stale_bytes as f64 + fixed as f64;
        if stale_bytes > 0 {
            verdicts.push(meets);
        }
        let o = c.as_object_mut().expect("case is an object");
        o.insert("fixed_overhead_bytes".into(), json!(fixed));
        o.insert("wire_over_stale".into(), json!(over));
        o.insert("target".into(), json!(TARGET));
        o.insert("meets_target".into(), json!(meets));
        o.insert(
            "postcopy_wire_bytes".into(),
            json!(pc_wire.map(|w| w as u64)),
        );
        o.insert("postcopy_total_ms".into(), json!(pc_ms));
        o.insert(
            "wire_ratio_vs_postcopy".into(),
            json!(pc_wire.map(|w| wire as f64 / w)),
        );
        o.insert(
            "time_ratio_vs_postcopy".into(),
            json!(pc_ms.map(|p| ms / p)),
        );
        emit(c);
    }

    let mut tracking = Vec::new();
    if !modes.is_empty() {
        eprintln!("[{BENCH}] tracking cost: modes {modes:?}, {tracking_rounds} rounds of {tracking_ms} ms");
        tracking = tracking_cost(bytes, seed, budget, tracking_ms, tracking_rounds, &modes)?;
        for t in &tracking {
            emit(t);
        }
    }

    emit(&json!({
        "bench": BENCH,
        "case": "summary",
        "bytes": bytes,
        "stale_pcts": pcts,
        "fixed_overhead_bytes": fixed,
        "postcopy_wire_bytes": pc_wire.map(|w| w as u64),
        "postcopy_total_ms": pc_ms,
        "wire_over_stale": cases.iter().map(|c| json!([c["stale_pct"], c["wire_over_stale"]])).collect::<Vec<_>>(),
        "target": TARGET,
        "meets_target": verdicts.iter().all(|&m| m),
        "throughput_ratio": tracking.iter().map(|t| json!([t["mode"], t["throughput_ratio"]])).collect::<Vec<_>>(),
        "loadavg_end": loadavg(),
    }));
    Ok(())
}

/// A comma-separated list from the environment (`default` if unset); empty items dropped.
fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The 1, 5 and 15 minute load averages, to flag runs that overlapped with other load.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// A standby in this process on a fresh memory-tier replica under `/dev/shm`.
///
/// Fields drop in declaration order: the sink (which holds the guest mapping of the replica
/// file after the evacuation) before the directory, which is then removed.
struct Standby {
    sink: Arc<StandbySink>,
    listener: Option<Listener>,
    addr: SocketAddr,
    certs: CertDir,
    _dir: tempfile::TempDir,
}

impl Standby {
    fn new(bytes: u64) -> anyhow::Result<Standby> {
        let dir = tempfile::Builder::new()
            .prefix("faultline-bench-replica-")
            .tempdir_in("/dev/shm")
            .context("creating the replica directory on /dev/shm")?;
        let tier = MemoryTier::open(dir.path(), bytes / PAGE_SIZE as u64)
            .context("opening the memory-tier replica")?;
        let sink = Arc::new(StandbySink::new(Replica::Memory(tier)));
        let certs = CertDir::generate()?;
        let listener = Listener::bind(DestOptions {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            identity: certs.server.clone(),
            peer_cert: certs.client.cert.clone(),
            expected_vm_id: Some(VM_ID.into()),
            accept_timeout: ACCEPT_TIMEOUT,
            progress: None,
            recover_timeout: None,
            hand_over_timeout: vmm_shim::dest::HAND_OVER_TIMEOUT,
        })?;
        let addr = listener.local_addr()?;
        Ok(Standby {
            sink,
            listener: Some(listener),
            addr,
            certs,
            _dir: dir,
        })
    }

    /// Serves replication sessions until the evacuation ends (nothing runs on the guest
    /// memory); returns the report and the digest of all guest memory afterwards.
    fn serve(&mut self, bytes: u64) -> anyhow::Result<(StandbyReport, String)> {
        let listener = self.listener.take().context("the standby already served")?;
        let report = listener
            .serve_standby(self.sink.clone(), &Layout::single(bytes), |_, _| {})
            .context("standby")?;
        let region = self
            .sink
            .guest_region()
            .context("the evacuation ended without guest memory")?;
        // SAFETY: the guest mapping lives as long as `self.sink`; serve_standby returned, so
        // the fault loop is stopped, userfaultfd unregistered and nothing writes the memory.
        let mem =
            unsafe { std::slice::from_raw_parts(region.host_addr() as *const u8, region.len()) };
        Ok((report, digest_all([mem])))
    }
}

/// One evacuation with `pct`% of the pages stale; the JSON line without the derived figures.
fn stale_case(
    bytes: u64,
    seed: u64,
    pct: f64,
    budget: u64,
    mutate_ms: u64,
) -> anyhow::Result<Value> {
    let mut standby = Standby::new(bytes)?;
    let mut child = spawn_child(
        ROLE_STALE,
        &[
            standby.certs.arg(),
            standby.addr.to_string(),
            bytes.to_string(),
            seed.to_string(),
            pct.to_string(),
            budget.to_string(),
            mutate_ms.to_string(),
        ],
    )?;
    let load_start = loadavg();
    let (report, digest) = standby.serve(bytes)?;
    let line = child
        .recv_json(EXIT_TIMEOUT)
        .context("the source's report")?;
    child.wait_success(EXIT_TIMEOUT)?;
    ensure!(
        line["digest"] == json!(digest),
        "standby memory after the evacuation differs from the source's at switchover ({pct}% stale)"
    );
    let stale_pages = report.evacuation.pages_stale;
    let dirtied = line["dirtied"].as_u64().unwrap_or(0);
    let ev = &line["evacuation"];
    if ev["pages_stale_source"].as_u64() != Some(dirtied) {
        eprintln!(
            "[{BENCH}]   note: the source counted {} stale pages, {dirtied} were dirtied",
            ev["pages_stale_source"]
        );
    }
    let m = report.metrics.clone().unwrap_or_default();
    eprintln!(
        "[{BENCH}]   {pct}%: {stale_pages} stale pages, {} wire bytes, {:.0} ms (resume {:.1} ms)",
        report.session.wire_bytes, report.session.total_ms, report.resume_ms
    );
    Ok(json!({
        "bench": BENCH,
        "case": "evacuation",
        "bytes": bytes,
        "stale_pct": pct,
        "stale_pages": stale_pages,
        "stale_bytes": stale_pages * PAGE_SIZE as u64,
        "pages_dirtied": dirtied,
        "wire_bytes": report.session.wire_bytes,
        "total_ms": report.session.total_ms as f64,
        "resume_ms": report.resume_ms,
        "vulnerability_ms": report.evacuation.vulnerability_ms,
        "pages_from_replica": report.evacuation.pages_from_replica,
        "replica_valid_pages": report.replica_valid_pages,
        "replication_sessions": report.replication_sessions,
        "pages_pushed": m.pages_pushed,
        "pages_faulted": m.pages_faulted,
        "pages_zero": m.pages_zero,
        "source": {
            "udp_tx_bytes": ev["udp_tx_bytes"],
            "udp_rx_bytes": ev["udp_rx_bytes"],
            "pages_pushed": ev["pages_pushed"],
            "pages_served": ev["pages_served"],
            "pages_stale_source": ev["pages_stale_source"],
            "final_harvest_ms": ev["final_harvest_ms"],
            "push_ms": ev["push_ms"],
            "total_ms": ev["total_ms"],
            "evacuation_cpu_secs": line["evacuation_cpu_secs"],
        },
        "replication": line["replication"],
        "initial_copy_ms": line["initial_copy_ms"],
        "catch_up_ms": line["catch_up_ms"],
        "writers": line["writers"],
        "digest_checked": true,
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
    }))
}

/// A unique replication epoch (as `faultline replicate` makes one).
fn new_epoch() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (t ^ (u64::from(std::process::id()) << 32)) | 1
}

/// Waits until the standby acknowledged every page, as counted by a replicator round whose
/// number is at least `min_round`.
///
/// Within a round the replicator counts its harvest, sends, then stores the stale count. So
/// once the harvest counter reads `n`, the stored count is from round `n - 1` or later.
fn wait_caught_up(r: &Replicator, min_round: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + CATCH_UP_TIMEOUT;
    loop {
        ensure!(r.is_running(), "the replicator stopped");
        let rounds = r.stats().harvests.load(Ordering::Relaxed);
        if rounds > min_round && r.stale_pages() == 0 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "replication did not catch up within {CATCH_UP_TIMEOUT:?} ({} pages stale)",
            r.stale_pages()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// After the writers stopped: the first round whose harvest surely started after that.
fn round_after_now(r: &Replicator) -> u64 {
    // The round counted next may have harvested before; the one after cannot have.
    r.stats().harvests.load(Ordering::Relaxed) + 2
}

fn arg(args: &[String], i: usize) -> anyhow::Result<&str> {
    args.get(i)
        .map(String::as_str)
        .with_context(|| format!("missing child argument {i} (got {args:?})"))
}

fn replicator_options(
    dir: &Path,
    connect: SocketAddr,
    epoch: u64,
    budget: u64,
) -> anyhow::Result<ReplicatorOptions> {
    let (me, peer) = certs::load_client(dir)?;
    Ok(ReplicatorOptions {
        connect,
        identity: me,
        peer_cert: peer,
        vm_id: VM_ID.into(),
        epoch,
        budget_bytes_per_sec: budget,
        interval: INTERVAL,
        connect_timeout: Duration::from_secs(30),
        recover_timeout: None,
        idle_priority: true,
    })
}

/// Evacuates the paused guest into the standby that `opts` points at.
fn evacuate_into(
    regions: &[HostRegion],
    layout: &Layout,
    state: ReplicatorState,
    opts: &ReplicatorOptions,
) -> anyhow::Result<vmm_shim::replica::EvacuationReport> {
    // SAFETY: the guest workload was stopped before the evacuation (the caller's contract).
    let memory = unsafe { vmm_shim::replica::PausedMemory::new(regions) }?;
    Ok(evacuate(
        memory,
        layout,
        state,
        opts.epoch,
        &SourceOptions {
            connect: opts.connect,
            identity: opts.identity.clone(),
            peer_cert: opts.peer_cert.clone(),
            vm_id: VM_ID.into(),
            connect_timeout: Duration::from_secs(30),
            push: true,
            // wire_over_stale measures the protocol's overhead: no compression.
            encoding: transport::encoding::EncodingPolicy::OFF,
            early_push: true,
            stopper: vmm_shim::Stopper::new(),
            progress: None,
            recover_timeout: None,
            rate_limit: None,
        },
        None,
    )?)
}

/// Child: the sequence of `faultline replicate --stale-pct` (faultline/src/cli/replica.rs).
/// Arguments: certificate directory, standby address, bytes, seed, stale %, budget (B/s),
/// mutator milliseconds.
fn stale_source(args: &[String]) -> anyhow::Result<()> {
    let dir = Path::new(arg(args, 0)?);
    let connect: SocketAddr = arg(args, 1)?.parse()?;
    let bytes: u64 = arg(args, 2)?.parse()?;
    let seed: u64 = arg(args, 3)?.parse()?;
    let pct: f64 = arg(args, 4)?.parse()?;
    let budget: u64 = arg(args, 5)?.parse()?;
    let mutate_ms: u64 = arg(args, 6)?.parse()?;

    let image = SourceImage::synthetic(bytes, seed)?;
    let regions = [image
        .host_region()
        .context("synthetic images live in memory")?];
    let layout = Layout::single(bytes);
    let tracker = open_tracker(&regions, TrackerChoice::Auto)?;
    let opts = replicator_options(dir, connect, new_epoch(), budget)?;
    let replicator = Replicator::start(&regions, layout.clone(), tracker, opts.clone())?;
    let t = Instant::now();
    wait_caught_up(&replicator, 1).context("initial copy")?;
    let initial_copy_ms = t.elapsed().as_secs_f64() * 1e3;
    // The guest runs for a while, replicated.
    let mutator = Mutator::start(&regions, 1, seed, HOT_FRACTION, MUTATE_RATE);
    std::thread::sleep(Duration::from_millis(mutate_ms));
    // Pause the guest: from here its memory is what the standby must end up with.
    let writers = mutator.stop();
    let t = Instant::now();
    // As an evacuation's catch-up does: harvests unspaced (`HarvestPace`), at normal priority.
    replicator.hurry();
    wait_caught_up(&replicator, round_after_now(&replicator)).context("catching up")?;
    let catch_up_ms = t.elapsed().as_secs_f64() * 1e3;
    let state = replicator.stop().context("replication failed")?;
    let replication = state.summary.clone();
    let dirtied = dirty_fraction(&regions, pct / 100.0, seed ^ 0xd1e7);
    let digest = image.digest()?;
    let cpu0 = cpu_secs();
    let evacuation = evacuate_into(&regions, &layout, state, &opts)?;
    emit(&json!({
        "role": ROLE_STALE,
        "evacuation": evacuation,
        "evacuation_cpu_secs": cpu_secs() - cpu0,
        "replication": replication,
        "writers": writers,
        "dirtied": dirtied,
        "digest": digest,
        "initial_copy_ms": initial_copy_ms,
        "catch_up_ms": catch_up_ms,
    }));
    Ok(())
}

/// Runs the tracking-cost child against a standby here; returns one line per mode.
fn tracking_cost(
    bytes: u64,
    seed: u64,
    budget: u64,
    ms: u64,
    rounds: u64,
    modes: &[String],
) -> anyhow::Result<Vec<Value>> {
    let with_replicator = modes.iter().any(|m| m.ends_with("-replicator"));
    let mut standby = Standby::new(bytes)?;
    let mut child = spawn_child(
        ROLE_TRACKING,
        &[
            standby.certs.arg(),
            standby.addr.to_string(),
            bytes.to_string(),
            seed.to_string(),
            budget.to_string(),
            ms.to_string(),
            rounds.to_string(),
            modes.join(","),
        ],
    )?;
    let load_start = loadavg();
    let standby_digest = if with_replicator {
        Some(standby.serve(bytes)?.1)
    } else {
        None
    };
    // The child measures for minutes when it replicates (initial copies).
    let line = child
        .recv_json(CATCH_UP_TIMEOUT * 2)
        .context("the tracking child's report")?;
    child.wait_success(EXIT_TIMEOUT)?;
    if let Some(d) = standby_digest {
        ensure!(
            line["digest"] == json!(d),
            "standby memory after the tracking run's evacuation differs from the source's"
        );
    }
    let phases = line["phases"].as_array().context("phases")?;
    let col = |mode: &str, key: &str| -> Vec<f64> {
        phases
            .iter()
            .filter(|p| p["mode"] == mode)
            .filter_map(|p| p[key].as_f64())
            .collect()
    };
    let base = col("none", "ops_per_sec");
    let base_median = (!base.is_empty()).then(|| median(&base));
    let base_cpu = col("none", "ops_per_mutator_cpu_sec");
    let base_cpu_median = (!base_cpu.is_empty()).then(|| median(&base_cpu));
    let mut out = Vec::new();
    for mode in modes {
        let ops = col(mode, "ops_per_sec");
        let med = median(&ops);
        let per_cpu = median(&col(mode, "ops_per_mutator_cpu_sec"));
        let share = median(&col(mode, "mutator_cpu_share"));
        out.push(json!({
            "bench": BENCH,
            "case": "tracking",
            "mode": mode,
            "bytes": bytes,
            "hot_fraction": HOT_FRACTION,
            "harvest_interval_ms": INTERVAL.as_millis() as u64,
            "measure_ms": ms,
            "ops_per_sec_median": med,
            "ops_per_sec_runs": ops,
            "ops_per_sec_none_median": base_median,
            "throughput_ratio": base_median.map(|b| med / b),
            "mutator_cpu_share_median": share,
            "ops_per_mutator_cpu_sec_median": per_cpu,
            "per_cpu_ratio": base_cpu_median.map(|b| per_cpu / b),
            "phases": phases.iter().filter(|p| p["mode"] == json!(mode)).collect::<Vec<_>>(),
            "loadavg_start": load_start,
            "loadavg_end": loadavg(),
        }));
    }
    Ok(out)
}

/// Child: the mutator with no tracking, with a tracker harvested every 20 ms, and with a
/// real replicator. Arguments: certificate directory, standby address, bytes, seed, budget
/// (B/s), milliseconds per phase, rounds, modes (comma-separated).
fn tracking_source(args: &[String]) -> anyhow::Result<()> {
    let dir = Path::new(arg(args, 0)?);
    let connect: SocketAddr = arg(args, 1)?.parse()?;
    let bytes: u64 = arg(args, 2)?.parse()?;
    let seed: u64 = arg(args, 3)?.parse()?;
    let budget: u64 = arg(args, 4)?.parse()?;
    let ms: u64 = arg(args, 5)?.parse()?;
    let rounds: u64 = arg(args, 6)?.parse()?;
    let modes: Vec<&str> = arg(args, 7)?.split(',').collect();
    let window = Duration::from_millis(ms);

    let image = SourceImage::synthetic(bytes, seed)?;
    let regions = [image
        .host_region()
        .context("synthetic images live in memory")?];
    let layout = Layout::single(bytes);
    // Harvest-only modes alternate among themselves, as do replicator modes; replicator
    // phases come last in a round, so the very last phase is one and can evacuate.
    let (plain, rep): (Vec<&str>, Vec<&str>) =
        modes.iter().partition(|m| !m.ends_with("-replicator"));
    let mut phases = Vec::new();
    let mut last_state: Option<(ReplicatorState, ReplicatorOptions)> = None;
    for r in 0..rounds {
        let mut order: Vec<&str> = plain.clone();
        let mut order_rep: Vec<&str> = rep.clone();
        if r % 2 == 1 {
            order.reverse();
            order_rep.reverse();
        }
        order.extend(order_rep);
        for mode in order {
            // A tracker from the previous replicator phase must be gone before the next
            // registers the same memory.
            last_state = None;
            eprintln!("[{BENCH}] tracking round {}/{rounds}: {mode}", r + 1);
            let mut p = serde_json::Map::new();
            p.insert("mode".into(), json!(mode));
            p.insert("round".into(), json!(r + 1));
            match mode {
                "none" => {
                    mutate(&regions, seed + r, window).record(&mut p);
                }
                "wp" | "hash" => {
                    let choice = if mode == "wp" {
                        TrackerChoice::WpAsync
                    } else {
                        TrackerChoice::Hash
                    };
                    let mut tracker = open_tracker(&regions, choice)?;
                    // The first harvest reports every page; take it before measuring.
                    tracker.harvest(&mut Vec::new())?;
                    let stop = Arc::new(AtomicBool::new(false));
                    let (harvests, harvest_ns, dirty) = (
                        Arc::new(AtomicU64::new(0)),
                        Arc::new(AtomicU64::new(0)),
                        Arc::new(AtomicU64::new(0)),
                    );
                    let harvester = {
                        let (stop, harvests, harvest_ns, dirty) = (
                            stop.clone(),
                            harvests.clone(),
                            harvest_ns.clone(),
                            dirty.clone(),
                        );
                        std::thread::Builder::new().name("harvester".into()).spawn(
                            move || -> anyhow::Result<()> {
                                // Normal priority (the replicator runs SCHED_IDLE): on a
                                // busy machine an idle-class thread barely runs, and this
                                // mode is to measure the cost of the full 20 ms cadence.
                                let mut out = Vec::new();
                                while !stop.load(Ordering::Relaxed) {
                                    let t = Instant::now();
                                    tracker.harvest(&mut out)?;
                                    harvest_ns.fetch_add(
                                        t.elapsed().as_nanos() as u64,
                                        Ordering::Relaxed,
                                    );
                                    harvests.fetch_add(1, Ordering::Relaxed);
                                    dirty.fetch_add(out.len() as u64, Ordering::Relaxed);
                                    std::thread::sleep(INTERVAL);
                                }
                                Ok(())
                            },
                        )?
                    };
                    let w = mutate(&regions, seed + r, window);
                    stop.store(true, Ordering::Relaxed);
                    harvester
                        .join()
                        .map_err(|_| anyhow::anyhow!("harvester panicked"))??;
                    let n = harvests.load(Ordering::Relaxed);
                    w.record(&mut p);
                    p.insert("harvests".into(), json!(n));
                    p.insert(
                        "harvest_ms_mean".into(),
                        json!(harvest_ns.load(Ordering::Relaxed) as f64 / 1e6 / n.max(1) as f64),
                    );
                    p.insert(
                        "dirty_pages_per_harvest".into(),
                        json!(dirty.load(Ordering::Relaxed) as f64 / n.max(1) as f64),
                    );
                }
                _ => {
                    let choice = if mode == "wp-replicator" {
                        TrackerChoice::WpAsync
                    } else {
                        TrackerChoice::Hash
                    };
                    let tracker = open_tracker(&regions, choice)?;
                    let opts = replicator_options(dir, connect, new_epoch(), budget)?;
                    let replicator =
                        Replicator::start(&regions, layout.clone(), tracker, opts.clone())?;
                    let t = Instant::now();
                    wait_caught_up(&replicator, 1).context("initial copy")?;
                    p.insert(
                        "initial_copy_ms".into(),
                        json!(t.elapsed().as_secs_f64() * 1e3),
                    );
                    let s = replicator.stats();
                    let (sent0, h0, hns0) = (
                        s.pages_sent.load(Ordering::Relaxed),
                        s.harvests.load(Ordering::Relaxed),
                        s.harvest_ns.load(Ordering::Relaxed),
                    );
                    let w = mutate(&regions, seed + r, window);
                    let s = replicator.stats();
                    let n = s.harvests.load(Ordering::Relaxed) - h0;
                    w.record(&mut p);
                    p.insert(
                        "pages_sent_in_window".into(),
                        json!(s.pages_sent.load(Ordering::Relaxed) - sent0),
                    );
                    p.insert("harvests".into(), json!(n));
                    p.insert(
                        "harvest_ms_mean".into(),
                        json!(
                            (s.harvest_ns.load(Ordering::Relaxed) - hns0) as f64
                                / 1e6
                                / n.max(1) as f64
                        ),
                    );
                    p.insert("stale_pages_at_end".into(), json!(replicator.stale_pages()));
                    replicator.hurry();
                    wait_caught_up(&replicator, round_after_now(&replicator))
                        .context("catching up")?;
                    let state = replicator.stop().context("replication failed")?;
                    last_state = Some((state, opts));
                }
            }
            eprintln!("[{BENCH}]   {}", Value::Object(p.clone()));
            phases.push(Value::Object(p));
        }
    }
    // End the standby's service with an evacuation of the (caught-up) last replicator phase.
    let mut digest = Value::Null;
    if let Some((state, opts)) = last_state {
        digest = json!(image.digest()?);
        evacuate_into(&regions, &layout, state, &opts)?;
    }
    emit(&json!({ "role": ROLE_TRACKING, "phases": phases, "digest": digest }));
    Ok(())
}

/// One measuring window of the mutator.
struct Window {
    ops_per_sec: f64,
    /// CPU seconds the mutator thread got during the window.
    mutator_cpu_secs: f64,
    /// CPU seconds of the whole (source) process during the window.
    process_cpu_secs: f64,
    secs: f64,
}

impl Window {
    fn record(&self, p: &mut serde_json::Map<String, Value>) {
        p.insert("ops_per_sec".into(), json!(self.ops_per_sec));
        p.insert(
            "mutator_cpu_share".into(),
            json!(self.mutator_cpu_secs / self.secs),
        );
        p.insert(
            "ops_per_mutator_cpu_sec".into(),
            json!(self.ops_per_sec * self.secs / self.mutator_cpu_secs),
        );
        p.insert("process_cpu_secs".into(), json!(self.process_cpu_secs));
    }
}

/// Runs the mutator (1 thread, 10% hot, unlimited rate) for `window`.
fn mutate(regions: &[HostRegion], seed: u64, window: Duration) -> Window {
    let cpu0 = cpu_secs();
    let t = Instant::now();
    let m = Mutator::start(regions, 1, seed, HOT_FRACTION, 0);
    std::thread::sleep(window);
    let mutator_cpu_secs = thread_cpu_secs("mutator-0");
    let r = m.stop();
    Window {
        ops_per_sec: r.ops_per_sec,
        mutator_cpu_secs,
        process_cpu_secs: cpu_secs() - cpu0,
        secs: t.elapsed().as_secs_f64(),
    }
}

/// User + system CPU seconds of this process's threads named `name`.
fn thread_cpu_secs(name: &str) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut total = 0.0;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return f64::NAN;
    };
    for t in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ... ; fields after the comm: utime is the 12th, stime the 13th.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if &stat[open + 1..close] != name {
            continue;
        }
        let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        total += (tick(11) + tick(12)) / hz;
    }
    total
}
