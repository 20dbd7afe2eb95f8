//! The NBD front end against QEMU's own NBD server, with QEMU's own client on both sides.
//!
//! One raw image (random bytes, in the page cache) is exported twice over Unix sockets:
//! by `faultline disk serve` (release build, write tracking on) and by
//! `qemu-storage-daemon --blockdev driver=file,cache.direct=off,aio=threads --export
//! type=nbd`. `qemu-img bench -f raw -t none` runs the same workload against each, in
//! interleaved rounds (who goes first alternates), and the time `qemu-img bench` reports
//! for its run is the sample:
//!
//! | case | flags | what |
//! | --- | --- | --- |
//! | `rand4k_read` | `-s 4096 -S 32436224 -d 32 -c N` | 4 KiB reads, 32 in flight |
//! | `rand4k_write` | the same with `-w` | 4 KiB writes |
//! | `seq1m_read` | `-s 1M -S 1M -d 8 -c M` | 1 MiB sequential reads, 8 in flight |
//! | `seq1m_write` | the same with `-w` | 1 MiB sequential writes |
//!
//! `qemu-img bench` has no random mode: it adds the step (`-S`) to the offset and wraps
//! modulo (image size − request size). A step of 7919 blocks (a prime, 32,436,224 bytes)
//! walks the 4 KiB blocks of the image in a scattered order that visits every block
//! before repeating, the same order for both servers.
//!
//! Then the cost of write tracking: the two write cases against `faultline disk serve`
//! with tracking on and with `--no-track`, interleaved the same way; and the cost of
//! tracking and replication together: the disk exported by a `faultline replicate` whose
//! replicator sends the written blocks to a `faultline standby` on loopback (at its
//! default SCHED_IDLE priority, and at normal priority) against a fresh `--no-track`
//! server on a fresh copy of the image.
//!
//! Prints one JSON line per case and server (`unit: "ms"` per run: count, p50, p90, p99,
//! max, mean; and throughput at the median), and one `ratio` line per comparison: the
//! median throughput of ours over QEMU's (target ≥ 0.8), and of tracking on over off
//! (target ≥ 0.9).
//!
//! Environment: `FAULTLINE_BENCH_ROUNDS` (default 5), `FAULTLINE_BENCH_DISK` (image size,
//! default 256M), `FAULTLINE_BENCH_OPS` (4 KiB requests per run, default 50000).

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};
use faultline_benches::stats::Summary;
use faultline_benches::{emit, env_size};
use faultline_tests::nbd::{qemu_tool, DiskServer, QemuExport};
use serde_json::{json, Value};

const BENCH: &str = "disk_io";
const STEP_BLOCKS: u64 = 7919;

#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    size: u64,
    step: u64,
    depth: u32,
    write: bool,
}

const CASES: [Case; 4] = [
    Case {
        name: "rand4k_read",
        size: 4096,
        step: 4096 * STEP_BLOCKS,
        depth: 32,
        write: false,
    },
    Case {
        name: "rand4k_write",
        size: 4096,
        step: 4096 * STEP_BLOCKS,
        depth: 32,
        write: true,
    },
    Case {
        name: "seq1m_read",
        size: 1 << 20,
        step: 1 << 20,
        depth: 8,
        write: false,
    },
    Case {
        name: "seq1m_write",
        size: 1 << 20,
        step: 1 << 20,
        depth: 8,
        write: true,
    },
];

impl Case {
    /// Requests per run: `ops` 4 KiB requests, or four passes over the image in 1 MiB.
    fn count(self, ops: u64, image: u64) -> u64 {
        if self.size == 4096 {
            ops
        } else {
            4 * image / self.size
        }
    }

    fn args(self, count: u64) -> Vec<String> {
        let mut a = vec![
            "bench".into(),
            "-f".into(),
            "raw".into(),
            "-t".into(),
            "none".into(),
            "-c".into(),
            count.to_string(),
            "-d".into(),
            self.depth.to_string(),
            "-s".into(),
            self.size.to_string(),
            "-S".into(),
            self.step.to_string(),
        ];
        if self.write {
            a.push("-w".into());
        }
        a
    }
}

/// Runs `qemu-img bench` and returns the run time it reports, in ms.
fn bench(case: Case, count: u64, uri: &str) -> anyhow::Result<f64> {
    let out = Command::new(qemu_tool("qemu-img"))
        .args(case.args(count))
        .arg(uri)
        .output()
        .context("running qemu-img bench")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "qemu-img bench {} on {uri} failed: {text}{}",
            case.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let secs: f64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("Run completed in ")?
                .strip_suffix(" seconds.")
        })
        .with_context(|| format!("no run time in qemu-img bench output: {text}"))?
        .parse()?;
    Ok(secs * 1e3)
}

fn make_image(path: &Path, size: u64) -> anyhow::Result<()> {
    let mut x = 0x243F_6A88_85A3_08D3u64;
    let mut chunk = vec![0u8; 1 << 20];
    let mut f = std::fs::File::create(path)?;
    for _ in 0..size / chunk.len() as u64 {
        for w in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        std::io::Write::write_all(&mut f, &chunk)?;
    }
    f.sync_all()?;
    Ok(())
}

/// Interleaved rounds of `cases` against each `(label, uri)`; samples per case and target.
fn measure(
    cases: &[Case],
    targets: &[(&str, &str)],
    rounds: u64,
    ops: u64,
    image: u64,
) -> anyhow::Result<Vec<Vec<Vec<f64>>>> {
    let mut samples = vec![vec![Vec::new(); targets.len()]; cases.len()];
    for round in 0..rounds {
        for (c, &case) in cases.iter().enumerate() {
            for k in 0..targets.len() {
                // Who goes first alternates.
                let t = (k + round as usize) % targets.len();
                let (label, uri) = targets[t];
                let ms = bench(case, case.count(ops, image), uri)
                    .with_context(|| format!("{} against {label}", case.name))?;
                eprintln!("[{BENCH}] round {round} {} {label}: {ms:.1} ms", case.name);
                samples[c][t].push(ms);
            }
        }
    }
    Ok(samples)
}

fn report(
    what: &str,
    cases: &[Case],
    targets: &[(&str, &str)],
    samples: Vec<Vec<Vec<f64>>>,
    ops: u64,
    image: u64,
) {
    for (case, per_target) in cases.iter().zip(samples) {
        let count = case.count(ops, image);
        let bytes = count * case.size;
        let summaries: Vec<Summary> = per_target.into_iter().map(Summary::from_samples).collect();
        for ((label, _), s) in targets.iter().zip(&summaries) {
            let mut line = serde_json::Map::new();
            line.insert("bench".into(), json!(BENCH));
            line.insert("case".into(), json!(case.name));
            line.insert("server".into(), json!(label));
            line.insert("unit".into(), json!("ms"));
            line.insert("requests".into(), json!(count));
            line.insert("request_bytes".into(), json!(case.size));
            line.insert("depth".into(), json!(case.depth));
            line.insert("iops_at_p50".into(), json!(count as f64 / (s.p50 / 1e3)));
            line.insert(
                "mib_per_s_at_p50".into(),
                json!(bytes as f64 / (1 << 20) as f64 / (s.p50 / 1e3)),
            );
            line.extend(s.to_json());
            emit(&Value::Object(line));
        }
        emit(&json!({
            "bench": BENCH,
            "case": "ratio",
            "of": case.name,
            "what": what,
            "ratio": summaries[1].p50 / summaries[0].p50,
        }));
    }
}

fn main() -> anyhow::Result<()> {
    let rounds = env_size("FAULTLINE_BENCH_ROUNDS", 5).max(1);
    let image_size = env_size("FAULTLINE_BENCH_DISK", 256 << 20).max(16 << 20) & !((1 << 20) - 1);
    let ops = env_size("FAULTLINE_BENCH_OPS", 50_000).max(1000);
    let dir = tempfile::Builder::new()
        .prefix("faultline-disk-io-")
        .tempdir()?;
    let image = dir.path().join("disk.img");
    make_image(&image, image_size)?;
    // In the page cache for both servers alike.
    std::io::copy(&mut std::fs::File::open(&image)?, &mut std::io::sink())?;

    let sock = |n: &str| dir.path().join(n).display().to_string();
    let ours = DiskServer::start(&image, &["--nbd-unix", &sock("faultline.sock")]);
    let qemu = QemuExport::start(&image, &dir.path().join("qemu.sock"), "");
    let targets = [
        ("faultline", ours.uri.as_str()),
        ("qemu-storage-daemon", qemu.uri.as_str()),
    ];
    let samples = measure(&CASES, &targets, rounds, ops, image_size)?;
    report(
        "median throughput of faultline's NBD server over qemu-storage-daemon's, same client, same run (target >= 0.8)",
        &CASES,
        &targets,
        samples,
        ops,
        image_size,
    );
    drop(qemu);

    let untracked = DiskServer::start(
        &image,
        &["--nbd-unix", &sock("untracked.sock"), "--no-track"],
    );
    let writes = [CASES[1], CASES[3]];
    let targets = [
        ("tracked", ours.uri.as_str()),
        ("untracked", untracked.uri.as_str()),
    ];
    let samples = measure(&writes, &targets, rounds, ops, image_size)?;
    report(
        "median write throughput with tracking on over off (target >= 0.9)",
        &writes,
        &targets,
        samples,
        ops,
        image_size,
    );
    let tracked = ours.stop();
    anyhow::ensure!(
        tracked.status.success() && tracked.json["tracking"] == true,
        "the tracked server did not end cleanly: {}",
        tracked.stderr
    );
    emit(&json!({
        "bench": BENCH,
        "case": "tracked_blocks",
        "blocks_written": tracked.json["blocks_written"],
        "image_blocks": image_size / 4096,
        "nbd": tracked.json["nbd"],
    }));
    // The source as it runs in normal times: the disk exported by `faultline replicate`
    // (tracked) while its replicator sends the written blocks to a standby on loopback,
    // at the replicator's default SCHED_IDLE priority and at normal priority.
    for (label, normal) in [("replicating_idle", false), ("replicating_normal", true)] {
        let copy = dir.path().join(format!("{label}.img"));
        std::fs::copy(&image, &copy)?;
        let certs = faultline_tests::Certs::new();
        let standby_dir = dir.path().join(format!("{label}-standby"));
        let standby = faultline_tests::DestProcess::standby(
            &certs,
            "127.0.0.1:0",
            &[
                "--size",
                "16M",
                "--replica-dir",
                &faultline_tests::ShmDir::new("disk-io").arg(),
                "--disk",
                &format!("vda={image_size}"),
                "--disk-dir",
                &standby_dir.display().to_string(),
            ],
        );
        let socket = dir.path().join(format!("{label}.sock"));
        let tls = certs.args("source", "dest");
        let image_arg = format!("vda={}", copy.display());
        let sock_arg = format!("vda={}", socket.display());
        let mut args = vec![
            "replicate",
            "--connect",
            &standby.addr,
            "--synthetic",
            "16M",
            "--writers",
            "0",
            "--evacuate-after",
            "100000",
            "--disk",
            &image_arg,
            "--disk-nbd-unix",
            &sock_arg,
        ];
        args.extend(tls.iter().map(String::as_str));
        if normal {
            args.push("--replicator-normal-priority");
        }
        let replicate = faultline_tests::Background::spawn(&args);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !socket.exists() {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the source's export never appeared"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // The baseline under the same conditions: a fresh process on a fresh copy. (The
        // long-running `untracked` server above, which has written gigabytes by now, took
        // twice as long for 50,000 4 KiB writes as a fresh `replicate` in the same run.)
        let off_copy = dir.path().join(format!("{label}-off.img"));
        std::fs::copy(&image, &off_copy)?;
        let off = DiskServer::start(
            &off_copy,
            &[
                "--nbd-unix",
                &sock(&format!("{label}-off.sock")),
                "--no-track",
            ],
        );
        let uri = format!("nbd+unix:///?socket={}", socket.display());
        let targets = [(label, uri.as_str()), ("untracked", off.uri.as_str())];
        let samples = measure(&writes, &targets, rounds, ops, image_size)?;
        report(
            "median write throughput of a replicating source (tracking and replication on) over tracking off (target >= 0.9)",
            &writes,
            &targets,
            samples,
            ops,
            image_size,
        );
        replicate.kill();
        let _ = off.stop();
        drop(standby);
    }
    let _ = untracked.stop();
    Ok(())
}
