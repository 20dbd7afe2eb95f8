//! Postcopy on a fast path: loopback, where the cost is CPU, not the link (issue 15).
//!
//! Real `faultline` processes on loopback (release build), against two floors measured in
//! the same run, between two processes each:
//! * `tcp_stream`: one plain TCP connection carrying 1 GiB of random bytes (what the kernel
//!   alone moves; QEMU's postcopy runs over such a stream);
//! * `quinn_stream`: one default quinn unidirectional stream with faultline's TLS and
//!   transport configuration ([`faultline_benches::baseline::quinn_stream_throughput`]).
//!
//! and three migrations:
//! * `zero_guest`: `faultline vm source/dest --size 1G --vcpus 1 --program counter`: a KVM
//!   guest whose memory is all zero but its code and counters (target `total_ms` ≤ 150);
//! * `random_rw_guest`: the same with `--program random-rw --working-set 256M`: random 8-byte
//!   reads and writes over 256 MiB (target `total_ms` ≤ 400, vCPU blocked ≤ 270 ms);
//! * `raw_push`: `faultline source --image` of 1 GiB of random data (in `/dev/shm`) with
//!   `--encoding off` into `faultline dest --size 1G` (target ≥ 1.0 GB/s of page data over
//!   the destination's `total_ms`).
//!
//! Downtime (last source vCPU stop → first destination vCPU run) is reported for the guests
//! (target ≤ 5 ms), with its parts `state_ms` (stop → the VM state in the destination's
//! resume hook) and `restore_ms` (KVM VM built, vCPUs restored and started). CPU: user + system seconds of each process from `/proc` while it runs
//! ([`faultline_benches::cpu::ThreadCpu`]), without the guests' vCPU threads (`vcpu<N>`, the
//! guest's own work), per GiB of guest memory moved. The source's count includes booting
//! the VM and its non-vCPU threads while the guest runs before the switchover.
//!
//! Measured guest runs do not hold or hash the guests (`--no-guest-digest`, `--no-verify`);
//! one verification run per guest case (`FAULTLINE_BENCH_VERIFY=0` skips them) holds both
//! guests and compares the digest of all memory on both sides, as the tests do. Every
//! `raw_push` run compares the source's and destination's digests of all memory.
//!
//! One JSON line per run (`"case"`, `"round"`), one `<case>_summary` per case with medians
//! and p99s, then a `summary` with the targets, whether each is met, and the ratios to the
//! floors. Cases alternate in every round so load from elsewhere lands on all.
//!
//! Environment: `FAULTLINE_BENCH_BYTES` (1G), `FAULTLINE_BENCH_WORKING_SET` (256M),
//! `FAULTLINE_BENCH_RUNS` (3), `FAULTLINE_BENCH_VERIFY` (1), `FAULTLINE_BENCH_CASES`
//! (comma-separated subset of the case names; default all).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use faultline_benches::baseline::{self, StreamRun};
use faultline_benches::cpu::CpuReport;
use faultline_benches::e2e::{check_digests, finish_sampled, write_random_image};
use faultline_benches::stats::key_medians;
use faultline_benches::{child, emit, env_size};
use faultline_tests::{kvm_present, Background, Certs, DestProcess};
use serde_json::{json, Map, Value};

const BENCH: &str = "lan_postcopy";
const TIMEOUT: Duration = Duration::from_secs(300);
/// Seconds the source guest runs before the switchover, and the destination's after every
/// page is present.
const SOURCE_RUN_SECS: &str = "1";
const DEST_RUN_SECS: &str = "0.5";

const TARGET_ZERO_TOTAL_MS: f64 = 150.0;
const TARGET_RW_TOTAL_MS: f64 = 400.0;
const TARGET_RW_VCPU_BLOCKED_MS: f64 = 270.0;
const TARGET_PUSH_GBPS: f64 = 1.0;
const TARGET_DOWNTIME_MS: f64 = 5.0;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Case {
    TcpStream,
    QuinnStream,
    ZeroGuest,
    RandomRwGuest,
    RawPush,
}

const CASES: [Case; 5] = [
    Case::TcpStream,
    Case::QuinnStream,
    Case::ZeroGuest,
    Case::RandomRwGuest,
    Case::RawPush,
];

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::TcpStream => "tcp_stream",
            Case::QuinnStream => "quinn_stream",
            Case::ZeroGuest => "zero_guest",
            Case::RandomRwGuest => "random_rw_guest",
            Case::RawPush => "raw_push",
        }
    }

    fn is_guest(self) -> bool {
        matches!(self, Case::ZeroGuest | Case::RandomRwGuest)
    }
}

struct Params {
    bytes: u64,
    working_set: u64,
}

fn main() -> anyhow::Result<()> {
    if let Some(role) = child::child_role() {
        return baseline::run_child(&role, &child::child_args());
    }
    let p = Params {
        bytes: env_size("FAULTLINE_BENCH_BYTES", 1 << 30),
        working_set: env_size("FAULTLINE_BENCH_WORKING_SET", 256 << 20),
    };
    let runs = env_size("FAULTLINE_BENCH_RUNS", 3).max(1);
    let verify = env_size("FAULTLINE_BENCH_VERIFY", 1) != 0;
    let cases = selected_cases()?;
    if cases.iter().any(|c| c.is_guest()) && !kvm_present() {
        bail!("/dev/kvm is absent: the guest cases need KVM (load kvm_intel or kvm_amd)");
    }
    let certs = Certs::new();
    // The raw push's image lives in memory, so reading it costs what guest memory would.
    let image = tempfile::Builder::new()
        .prefix("lan-postcopy-")
        .tempfile_in("/dev/shm")
        .context("a file in /dev/shm for the random image")?;
    if cases.contains(&Case::RawPush) {
        write_random_image(image.path(), p.bytes)?;
    }
    let image_path = image.path().to_str().context("image path")?.to_string();

    let mut rows: Vec<(Case, Value)> = Vec::new();
    for round in 0..runs {
        for &case in &cases {
            let mut row = measure(&certs, &p, case, &image_path, false)
                .with_context(|| format!("{} round {round}", case.name()))?;
            row["round"] = json!(round);
            emit(&row);
            rows.push((case, row));
        }
    }
    let mut verified = Map::new();
    if verify {
        for &case in cases.iter().filter(|c| c.is_guest()) {
            let row = measure(&certs, &p, case, &image_path, true)
                .with_context(|| format!("{} verification", case.name()))?;
            emit(&row);
            verified.insert(case.name().into(), row["digest_match"].clone());
        }
    }

    let keys = [
        "gbps",
        "total_ms",
        "downtime_ms",
        "state_ms",
        "restore_ms",
        "blocked_ms",
        "vcpu_blocked_ms",
        "source_cpu_s",
        "dest_cpu_s",
        "source_cpu_s_per_gib",
        "dest_cpu_s_per_gib",
        "wire_bytes",
    ];
    let mut medians: BTreeMap<Case, Map<String, Value>> = BTreeMap::new();
    for &case in &cases {
        let mut out = Map::new();
        out.insert("bench".into(), json!(BENCH));
        out.insert("case".into(), json!(format!("{}_summary", case.name())));
        out.insert("runs".into(), json!(runs));
        out.extend(key_medians(
            &keys,
            rows.iter().filter(|(c, _)| *c == case).map(|(_, r)| r),
        ));
        emit(&Value::Object(out.clone()));
        medians.insert(case, out);
    }
    let m = |case: Case, k: &str| -> Option<f64> {
        medians.get(&case)?.get(&format!("{k}_median"))?.as_f64()
    };
    let at_most = |v: Option<f64>, t: f64| v.map(|v| v <= t);
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    let push = m(Case::RawPush, "gbps");
    emit(&json!({
        "bench": BENCH,
        "case": "summary",
        "memory_bytes": p.bytes,
        "working_set": p.working_set,
        "runs": runs,
        "zero_guest_total_ms": m(Case::ZeroGuest, "total_ms"),
        "target_zero_guest_total_ms": TARGET_ZERO_TOTAL_MS,
        "meets_zero_guest": at_most(m(Case::ZeroGuest, "total_ms"), TARGET_ZERO_TOTAL_MS),
        "random_rw_total_ms": m(Case::RandomRwGuest, "total_ms"),
        "target_random_rw_total_ms": TARGET_RW_TOTAL_MS,
        "random_rw_vcpu_blocked_ms": m(Case::RandomRwGuest, "vcpu_blocked_ms"),
        "target_random_rw_vcpu_blocked_ms": TARGET_RW_VCPU_BLOCKED_MS,
        "meets_random_rw": at_most(m(Case::RandomRwGuest, "total_ms"), TARGET_RW_TOTAL_MS)
            .zip(at_most(m(Case::RandomRwGuest, "vcpu_blocked_ms"), TARGET_RW_VCPU_BLOCKED_MS))
            .map(|(a, b)| a && b),
        "raw_push_gbps": push,
        "target_raw_push_gbps": TARGET_PUSH_GBPS,
        "meets_raw_push": push.map(|g| g >= TARGET_PUSH_GBPS),
        "raw_push_over_tcp": ratio(push, m(Case::TcpStream, "gbps")),
        "raw_push_over_quinn": ratio(push, m(Case::QuinnStream, "gbps")),
        "downtime_ms": {
            "zero_guest": m(Case::ZeroGuest, "downtime_ms"),
            "random_rw_guest": m(Case::RandomRwGuest, "downtime_ms"),
        },
        "target_downtime_ms": TARGET_DOWNTIME_MS,
        "meets_downtime": at_most(m(Case::ZeroGuest, "downtime_ms"), TARGET_DOWNTIME_MS)
            .zip(at_most(m(Case::RandomRwGuest, "downtime_ms"), TARGET_DOWNTIME_MS))
            .map(|(a, b)| a && b),
        "cpu_s_per_gib": {
            "raw_push": [m(Case::RawPush, "source_cpu_s_per_gib"), m(Case::RawPush, "dest_cpu_s_per_gib")],
            "random_rw_guest": [m(Case::RandomRwGuest, "source_cpu_s_per_gib"), m(Case::RandomRwGuest, "dest_cpu_s_per_gib")],
            "tcp_stream": [m(Case::TcpStream, "source_cpu_s_per_gib"), m(Case::TcpStream, "dest_cpu_s_per_gib")],
            "quinn_stream": [m(Case::QuinnStream, "source_cpu_s_per_gib"), m(Case::QuinnStream, "dest_cpu_s_per_gib")],
        },
        "digest_match": verified,
    }));
    Ok(())
}

fn selected_cases() -> anyhow::Result<Vec<Case>> {
    let Ok(list) = std::env::var("FAULTLINE_BENCH_CASES") else {
        return Ok(CASES.to_vec());
    };
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|name| {
            CASES
                .iter()
                .copied()
                .find(|c| c.name() == name)
                .with_context(|| {
                    let names: Vec<_> = CASES.iter().map(|c| c.name()).collect();
                    format!("FAULTLINE_BENCH_CASES: unknown case {name:?} (one of {names:?})")
                })
        })
        .collect()
}

fn measure(
    certs: &Certs,
    p: &Params,
    case: Case,
    image: &str,
    verify: bool,
) -> anyhow::Result<Value> {
    match case {
        Case::TcpStream => Ok(stream_row(case, &baseline::tcp_stream_throughput(p.bytes)?)),
        Case::QuinnStream => Ok(stream_row(
            case,
            &baseline::quinn_stream_throughput(p.bytes)?,
        )),
        Case::ZeroGuest | Case::RandomRwGuest => guest(certs, p, case, verify),
        Case::RawPush => raw_push(certs, p, image),
    }
}

fn stream_row(case: Case, r: &StreamRun) -> Value {
    let gib = r.bytes as f64 / (1u64 << 30) as f64;
    json!({
        "bench": BENCH,
        "case": case.name(),
        "gbps": r.gbps,
        "gbps_with_setup": r.gbps_with_setup,
        "total_ms": r.secs_with_setup * 1e3,
        "connect_ms": r.connect_ms,
        "source_cpu_s": r.send_cpu_secs,
        "dest_cpu_s": r.recv_cpu_secs,
        "source_cpu_s_per_gib": r.send_cpu_secs / gib,
        "dest_cpu_s_per_gib": r.recv_cpu_secs / gib,
        "udp_rcvbuf_errors": r.udp_rcvbuf_errors,
    })
}

/// One KVM guest migrated on loopback; `verify` holds both guests for the digest checks.
fn guest(certs: &Certs, p: &Params, case: Case, verify: bool) -> anyhow::Result<Value> {
    let (size, ws) = (p.bytes.to_string(), p.working_set.to_string());
    let mut guest = vec!["--size", &size, "--vcpus", "1"];
    match case {
        Case::ZeroGuest => guest.extend(["--program", "counter"]),
        _ => guest.extend(["--program", "random-rw", "--working-set", &ws]),
    }
    let mut dest_extra = [&guest[..], &["--run-secs", DEST_RUN_SECS]].concat();
    if !verify {
        dest_extra.push("--no-verify");
    }
    let dest = DestProcess::vm(certs, &dest_extra);
    let tls = certs.args("source", "dest");
    let mut src_args: Vec<&str> = vec![
        "vm",
        "source",
        "--connect",
        &dest.addr,
        "--json",
        "--connect-timeout",
        "10",
        "--run-secs",
        SOURCE_RUN_SECS,
    ];
    src_args.extend(tls.iter().map(String::as_str));
    src_args.extend(&guest);
    if !verify {
        src_args.push("--no-guest-digest");
    }
    let (src, dst, cpu) = finish_sampled(Background::spawn(&src_args), dest, TIMEOUT)?;
    let (s, d) = (&src.json, &dst.json);
    let mut row = json!({
        "bench": BENCH,
        "case": if verify { format!("{}_verify", case.name()) } else { case.name().to_string() },
        "memory_bytes": d["memory_bytes"],
        "total_ms": d["total_ms"],
        "resume_ms": d["resume_ms"],
        "downtime_ms": d["downtime_ms"],
        "state_ms": d["state_ms"],
        "restore_ms": d["restore_ms"],
        "pause_ms": s["pause_ms"],
        "blocked_ms": d["blocked_ms"],
        "vcpu_blocked_ms": sum(&d["vcpu_blocked_ms"]),
        "faults": d["faults"],
        "pages_pushed": d["pages_pushed"],
        "pages_zero": d["pages_zero"],
        "pages_zero_holes": d["pages_zero_holes"],
        "wire_bytes": d["wire_bytes"],
    });
    add_cpu(&mut row, cpu.as_ref(), p.bytes);
    if verify {
        let guest_ok =
            d["guest_digests"] == s["slice_digests"] && d["host_digests"] == s["slice_digests"];
        let ok = d["switchover_digest"] == s["memory_digest"] && guest_ok;
        row["digest_match"] = json!(ok);
        if !ok {
            bail!("{} verification: digests differ: {row}", case.name());
        }
    }
    Ok(row)
}

/// 1 GiB of random data pushed raw from a file into anonymous memory.
fn raw_push(certs: &Certs, p: &Params, image: &str) -> anyhow::Result<Value> {
    let size = p.bytes.to_string();
    let dest = DestProcess::start(certs, &["--size", &size]);
    let src = Background::source(
        certs,
        "source",
        &dest.addr,
        &["--image", image, "--encoding", "off"],
        &[],
    );
    let (src, dst, cpu) = finish_sampled(src, dest, TIMEOUT)?;
    check_digests(&src, &dst)?;
    let d = &dst.json;
    let total_ms = d["total_ms"].as_f64().unwrap_or(f64::NAN);
    let mut row = json!({
        "bench": BENCH,
        "case": Case::RawPush.name(),
        "memory_bytes": p.bytes,
        "total_ms": total_ms,
        "gbps": p.bytes as f64 / (total_ms / 1e3) / 1e9,
        "wire_bytes": d["wire_bytes"],
        "pages_pushed": d["pages_pushed"],
        "faults": d["faults"],
        "digest_match": true,
    });
    add_cpu(&mut row, cpu.as_ref(), p.bytes);
    Ok(row)
}

/// CPU seconds per side without the guests' vCPU threads, in total and per GiB moved, and
/// the busiest thread groups.
fn add_cpu(row: &mut Value, cpu: Option<&CpuReport>, bytes: u64) {
    let Some(cpu) = cpu else { return };
    let gib = bytes as f64 / (1u64 << 30) as f64;
    for side in ["source", "dest"] {
        let secs: f64 = cpu
            .threads
            .iter()
            .filter(|t| t.process == side && !t.thread.starts_with("vcpu"))
            .map(|t| t.cpu_secs)
            // Not `sum`, which starts at -0.0 and prints an idle side as "-0.0".
            .fold(0.0, |a, b| a + b);
        row[format!("{side}_cpu_s")] = json!(secs);
        row[format!("{side}_cpu_s_per_gib")] = json!(secs / gib);
    }
    row["cpu_threads"] = json!(cpu
        .threads
        .iter()
        .take(8)
        .map(|t| json!([t.process, t.thread, t.cpu_secs]))
        .collect::<Vec<_>>());
}

/// The sum of a JSON array of numbers (per-vCPU figures), or the number itself.
fn sum(v: &Value) -> Value {
    match v {
        Value::Array(a) => json!(a.iter().filter_map(Value::as_f64).sum::<f64>()),
        other => other.clone(),
    }
}
