//! Raw-quinn baselines between two processes on loopback (see `faultline_benches::baseline`).
//!
//! Prints two JSON lines on stdout:
//! * `{"bench":"quinn_baseline","case":"rtt_4k", count, p50, p90, p99, max, mean, ...}`:
//!   16-byte request / 4096-byte response round trips on one stream, in µs;
//! * `{"bench":"quinn_baseline","case":"stream","bytes":..,"gbps_median":..,"runs":[..]}`:
//!   one unidirectional stream, GB/s (1e9 B/s).
//!
//! Environment: `FAULTLINE_BENCH_SAMPLES` (round trips, default 2000), `FAULTLINE_BENCH_BYTES`
//! (stream size, default 1 GiB; suffixes K/M/G accepted), `FAULTLINE_BENCH_RUNS` (stream runs,
//! default 3). Arguments (cargo passes `--bench`) are ignored.

use anyhow::Context;
use faultline_benches::baseline::{self, RttParams};
use faultline_benches::stats::median;
use faultline_benches::{child, emit, env_size};
use serde_json::{json, Value};

const BENCH: &str = "quinn_baseline";

fn main() -> anyhow::Result<()> {
    if let Some(role) = child::child_role() {
        return baseline::run_child(&role, &child::child_args());
    }
    let samples = env_size("FAULTLINE_BENCH_SAMPLES", 2000) as usize;
    let bytes = env_size("FAULTLINE_BENCH_BYTES", 1 << 30);
    let runs = env_size("FAULTLINE_BENCH_RUNS", 3).max(1) as usize;

    let p = RttParams {
        samples,
        ..RttParams::default()
    };
    eprintln!(
        "[{BENCH}] rtt: {} round trips after {} warm-up",
        p.samples, p.warmup
    );
    let rtt = baseline::quinn_rtt_with(p).context("rtt baseline")?;
    let mut line = serde_json::Map::new();
    line.insert("bench".into(), json!(BENCH));
    line.insert("case".into(), json!("rtt_4k"));
    line.insert("unit".into(), json!("us"));
    line.insert("request_bytes".into(), json!(p.request_bytes));
    line.insert("response_bytes".into(), json!(p.response_bytes));
    line.insert("warmup".into(), json!(p.warmup));
    line.extend(rtt.to_json());
    emit(&Value::Object(line));

    let mut all = Vec::with_capacity(runs);
    for i in 0..runs {
        eprintln!("[{BENCH}] stream: run {}/{runs}, {bytes} bytes", i + 1);
        let r = baseline::quinn_stream_throughput(bytes).context("stream baseline")?;
        eprintln!(
            "[{BENCH}]   {:.3} GB/s ({:.3} GB/s with {:.1} ms connection setup); \
             CPU s: receiver {:.2}, sender {:.2}; UDP rcvbuf drops {:?}",
            r.gbps,
            r.gbps_with_setup,
            r.connect_ms,
            r.recv_cpu_secs,
            r.send_cpu_secs,
            r.udp_rcvbuf_errors
        );
        all.push(r);
    }
    let gbps: Vec<f64> = all.iter().map(|r| r.gbps).collect();
    let with_setup: Vec<f64> = all.iter().map(|r| r.gbps_with_setup).collect();
    emit(&json!({
        "bench": BENCH,
        "case": "stream",
        "unit": "GB/s",
        "bytes": bytes,
        "chunk_bytes": baseline::STREAM_CHUNK_BYTES,
        "gbps_median": median(&gbps),
        "gbps_with_setup_median": median(&with_setup),
        "runs": all,
    }));
    Ok(())
}
