//! Demand-fault latency: what a guest thread waits for one absent page, push off.
//!
//! The bench process is the faultline destination (64 MiB of anonymous guest memory by
//! default, registered with userfaultfd); a child process is the source serving the
//! realistic-mix synthetic image with the background push **off**, so every page moves only
//! because it was faulted. When the guest resumes, ONE thread ("toucher") visits every page in
//! a random permutation, one at a time, and times the first touch of each (a volatile one-byte
//! read) with `Instant`: fault → fault loop → request over QUIC → source → reply → install
//! (UFFDIO_COPY or UFFDIO_ZEROPAGE) → wake. uffd-core's own histogram (fault message read →
//! page installed) is reported beside it.
//!
//! The floor is a raw quinn 16-byte request / 4096-byte response round trip between two
//! processes on the same loopback, with the same TLS and transport configuration
//! ([`faultline_benches::baseline::RttSession`]). Since the machine's idle-CPU wake-up cost
//! moves that floor from run to run, baseline batches are interleaved with the faultline runs:
//! baseline, faultline, baseline, faultline, baseline (with the default 2 rounds), and the
//! ratio is taken against the median of the baseline batches.
//!
//! Two floors are measured in each batch. `quinn_rtt_4k` is `RttSession::start` as is: both
//! ends run their loop in `block_on` on the main thread, so each round trip also pays two
//! cross-thread wake-ups between that thread and the runtime's workers. `quinn_rtt_4k_tasks`
//! runs both loops as tasks on the workers ([`faultline_benches::baseline::LoopPlacement::Tasks`]),
//! which is the tighter floor. The target verdict `meets_target` is against the first (the
//! floor as specified); `meets_target_vs_tasks_floor` is against the second.
//!
//! Prints JSON lines on stdout (latencies in µs):
//! * `{"bench":"fault_latency","case":"quinn_rtt_4k","batch":i,...}` and
//!   `{"bench":"fault_latency","case":"quinn_rtt_4k_tasks","batch":i,...}` per baseline batch;
//! * `{"bench":"fault_latency","case":"faultline_4k","run":i,...}` per faultline run, with
//!   `zero_pages` / `data_pages` (the same touches split by what the page held),
//!   `uffd_fault_latency_us`, counters and per-thread CPU of both processes;
//! * `{"bench":"fault_latency","case":"summary",...}` with `ratio_p50`, `ratio_p99`,
//!   `target_ratio_p50` (1.5) and `meets_target`, and the same against the tasks floor.
//!
//! Environment: `FAULTLINE_BENCH_BYTES` (guest memory, default 64M), `FAULTLINE_BENCH_SAMPLES`
//! (round trips per baseline batch, default 10000), `FAULTLINE_BENCH_ROUNDS` (faultline runs,
//! default 2; there is one more baseline batch than runs), `FAULTLINE_BENCH_SEED` (image and
//! visiting order, default 1).

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use faultline::image::{page_class, PageClass};
use faultline_benches::baseline::{
    self, LoopPlacement, RttSession, RTT_REQUEST_BYTES, RTT_RESPONSE_BYTES,
};
use faultline_benches::migration::{self, ImageKind, MigrationSpec};
use faultline_benches::stats::{median, Summary};
use faultline_benches::{child, emit, env_size};
use serde_json::{json, Map, Value};
use uffd_core::{HostRegion, PAGE_SIZE};

const BENCH: &str = "fault_latency";
/// Target: faultline's p50 at most this many times the raw quinn round trip.
const TARGET_RATIO_P50: f64 = 1.5;
/// Round trips made (and dropped) before each baseline batch.
const REWARM: usize = baseline::RTT_WARMUP;

fn main() -> anyhow::Result<()> {
    if let Some(role) = child::child_role() {
        let args = child::child_args();
        if baseline::is_child_role(&role) {
            return baseline::run_child(&role, &args);
        }
        return migration::run_child(&role, &args);
    }
    let bytes = env_size("FAULTLINE_BENCH_BYTES", 64 << 20);
    let samples = env_size("FAULTLINE_BENCH_SAMPLES", 10_000).max(1) as usize;
    let rounds = env_size("FAULTLINE_BENCH_ROUNDS", 2).max(1) as usize;
    let seed = env_size("FAULTLINE_BENCH_SEED", 1);

    let mut rtt = RttSession::start(RTT_REQUEST_BYTES, RTT_RESPONSE_BYTES)
        .context("starting the quinn baseline")?;
    let mut rtt_tasks =
        RttSession::start_with(RTT_REQUEST_BYTES, RTT_RESPONSE_BYTES, LoopPlacement::Tasks)
            .context("starting the quinn baseline (tasks)")?;
    let mut baselines = Vec::with_capacity(rounds + 1);
    let mut tasks = Vec::with_capacity(rounds + 1);
    let mut runs = Vec::with_capacity(rounds);
    baselines.push(baseline_batch(
        &mut rtt,
        LoopPlacement::BlockOn,
        0,
        samples,
    )?);
    tasks.push(baseline_batch(
        &mut rtt_tasks,
        LoopPlacement::Tasks,
        0,
        samples,
    )?);
    for r in 0..rounds {
        runs.push(faultline_run(r, bytes, seed.wrapping_add(r as u64))?);
        baselines.push(baseline_batch(
            &mut rtt,
            LoopPlacement::BlockOn,
            r + 1,
            samples,
        )?);
        tasks.push(baseline_batch(
            &mut rtt_tasks,
            LoopPlacement::Tasks,
            r + 1,
            samples,
        )?);
    }
    rtt.finish().context("closing the quinn baseline")?;
    rtt_tasks
        .finish()
        .context("closing the quinn baseline (tasks)")?;

    let med = |v: &[Summary], f: fn(&Summary) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    let (fl_p50, fl_p99) = (med(&runs, |s| s.p50), med(&runs, |s| s.p99));
    let (q_p50, q_p99) = (med(&baselines, |s| s.p50), med(&baselines, |s| s.p99));
    let (t_p50, t_p99) = (med(&tasks, |s| s.p50), med(&tasks, |s| s.p99));
    let ratio_p50 = fl_p50 / q_p50;
    let tasks_ratio_p50 = fl_p50 / t_p50;
    emit(&json!({
        "bench": BENCH,
        "case": "summary",
        "unit": "us",
        "faultline_runs": runs.len(),
        "baseline_batches": baselines.len(),
        "faultline_p50": fl_p50,
        "faultline_p99": fl_p99,
        "quinn_rtt_p50": q_p50,
        "quinn_rtt_p99": q_p99,
        "quinn_rtt_p50_batches": baselines.iter().map(|s| s.p50).collect::<Vec<_>>(),
        "ratio_p50": ratio_p50,
        "ratio_p99": fl_p99 / q_p99,
        "target_ratio_p50": TARGET_RATIO_P50,
        "meets_target": ratio_p50 <= TARGET_RATIO_P50,
        "quinn_rtt_tasks_p50": t_p50,
        "quinn_rtt_tasks_p99": t_p99,
        "quinn_rtt_tasks_p50_batches": tasks.iter().map(|s| s.p50).collect::<Vec<_>>(),
        "ratio_p50_vs_tasks_floor": tasks_ratio_p50,
        "ratio_p99_vs_tasks_floor": fl_p99 / t_p99,
        "meets_target_vs_tasks_floor": tasks_ratio_p50 <= TARGET_RATIO_P50,
    }));
    Ok(())
}

/// Re-warms the raw quinn connection, then measures and emits one batch of round trips.
fn baseline_batch(
    rtt: &mut RttSession,
    mode: LoopPlacement,
    batch: usize,
    samples: usize,
) -> anyhow::Result<Summary> {
    let case = match mode {
        LoopPlacement::BlockOn => "quinn_rtt_4k",
        LoopPlacement::Tasks => "quinn_rtt_4k_tasks",
    };
    eprintln!("[{BENCH}] {case} batch {batch}: {samples} round trips");
    rtt.sample(REWARM)?;
    let s = Summary::from_durations(&rtt.sample(samples)?);
    let mut line = Map::new();
    line.insert("bench".into(), json!(BENCH));
    line.insert("case".into(), json!(case));
    line.insert("batch".into(), json!(batch));
    line.insert("loop".into(), json!(mode));
    line.insert("unit".into(), json!("us"));
    line.insert("request_bytes".into(), json!(RTT_REQUEST_BYTES));
    line.insert("response_bytes".into(), json!(RTT_RESPONSE_BYTES));
    line.insert("warmup".into(), json!(REWARM));
    line.extend(s.to_json());
    emit(&Value::Object(line));
    Ok(s)
}

/// First-touch time of each page, in visiting order.
struct Touches {
    pages: Vec<u64>,
    times: Vec<Duration>,
    wall: Duration,
}

/// One migration with push off and one toucher thread; emits its line, returns the touches'
/// summary.
fn faultline_run(run: usize, bytes: u64, seed: u64) -> anyhow::Result<Summary> {
    eprintln!(
        "[{BENCH}] faultline run {run}: {} MiB, push off, one toucher",
        bytes >> 20
    );
    let spec = MigrationSpec {
        bytes,
        image: ImageKind::Mix,
        seed,
        push: false,
    };
    let slot: Arc<Mutex<Option<JoinHandle<Touches>>>> = Arc::default();
    let started = slot.clone();
    let m = migration::migrate(spec, move |region| {
        let h = std::thread::Builder::new()
            .name("toucher".into())
            .spawn(move || touch_all(region, seed))
            .expect("spawning the toucher thread");
        *started.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
    })?;
    let touches = slot
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .context("the guest never resumed")?
        .join()
        .map_err(|_| anyhow::anyhow!("the toucher thread panicked"))?;
    drop(m.memory);

    let all = Summary::from_durations(&touches.times);
    let (mut zero, mut data) = (Vec::new(), Vec::new());
    for (&p, &d) in touches.pages.iter().zip(&touches.times) {
        let us = d.as_secs_f64() * 1e6;
        match page_class(seed, p) {
            PageClass::Zero => zero.push(us),
            _ => data.push(us),
        }
    }
    let metrics = &m.dest.metrics;
    let mut line = Map::new();
    line.insert("bench".into(), json!(BENCH));
    line.insert("case".into(), json!("faultline_4k"));
    line.insert("run".into(), json!(run));
    line.insert("unit".into(), json!("us"));
    line.insert("bytes".into(), json!(bytes));
    line.insert("image".into(), json!(spec.image));
    line.insert("push".into(), json!(false));
    line.extend(all.to_json());
    line.insert("zero_pages".into(), json!(Summary::from_samples(zero)));
    line.insert("data_pages".into(), json!(Summary::from_samples(data)));
    line.insert(
        "uffd_fault_latency_us".into(),
        json!(metrics.fault_latency_us),
    );
    line.insert("faults".into(), json!(metrics.faults));
    line.insert("pages_faulted".into(), json!(metrics.pages_faulted));
    line.insert("pages_pushed".into(), json!(metrics.pages_pushed));
    line.insert("pages_zero".into(), json!(metrics.pages_zero));
    line.insert("source_pages_served".into(), json!(m.source.pages_served));
    line.insert(
        "faults_per_sec".into(),
        json!(touches.times.len() as f64 / touches.wall.as_secs_f64()),
    );
    line.insert("resume_ms".into(), json!(m.dest.resume_ms));
    line.insert("total_ms".into(), json!(m.dest.session.total_ms as f64));
    line.insert("wire_bytes".into(), json!(m.dest.session.wire_bytes));
    line.insert("pages_checked".into(), json!(m.pages_checked));
    line.insert("cpu".into(), json!(m.cpu));
    emit(&Value::Object(line));
    Ok(all)
}

/// Visits every page of `region` once in a random order, timing each first touch.
fn touch_all(region: HostRegion, seed: u64) -> Touches {
    let pages = region.pages();
    let mut order: Vec<u64> = (0..pages).collect();
    // Fisher-Yates with splitmix64.
    let mut state = seed ^ 0x7061_6765_735f_6f72;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for i in (1..order.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    let mut times = Vec::with_capacity(order.len());
    let t0 = Instant::now();
    for &p in &order {
        let addr = (region.host_addr() + p as usize * PAGE_SIZE) as *const u8;
        let t = Instant::now();
        // SAFETY: `addr` is inside the guest memory mapping, which stays mapped until this
        // thread is joined (see `migration::Migration::memory`). The page is absent and
        // registered with userfaultfd, so the read blocks until faultline installs it.
        let _ = unsafe { std::ptr::read_volatile(addr) };
        times.push(t.elapsed());
    }
    Touches {
        pages: order,
        times,
        wall: t0.elapsed(),
    }
}
