//! Evacuating a disk across an emulated WAN: how close to the link's ideal, and how fast a
//! guest's read of a stale block is while the push fills the link; against the same disk
//! without a replica, in the same run.
//!
//! Real processes on loopback: `faultline standby --disk` (one disk replica, stand-in guest
//! reading random blocks from the switchover on) and `faultline replicate --disk` (the
//! source: replicates a 64 MiB memory and the disk over the direct path until caught up,
//! then writes `--disk-stale-pct` of the disk's blocks and evacuates through the
//! [`wan_emu::WanEmulator`] in this process). The case without a replica is `faultline
//! dest --disk` / `faultline source --disk`: every block crosses. The disk's blocks are
//! random bytes (nothing compresses, no zero block).
//!
//! Each run prints a JSON line: `total_ms` (the standby's session start → every page and
//! block present), `ideal_ms` (the bytes that must cross × 8 / rate + one RTT),
//! `total_over_ideal` (target ≤ 1.15), the stale-read latency p50/p99 in µs and in RTTs
//! (target p99 ≤ 1.5 RTT), and the disk's own figures. A summary line per link gives the
//! no-replica time over each replica case's.
//!
//! Environment: `FAULTLINE_BENCH_DISK` (2G), `FAULTLINE_BENCH_STALE` (comma-separated
//! percentages, `1,5,20`), `FAULTLINE_BENCH_LINKS` (only links whose name contains one of
//! these, e.g. `1000Mbit`), `FAULTLINE_BENCH_FULL` (`all` (default), `fast` (the
//! no-replica case only on links of 1 Gbit/s and more: at 100 Mbit/s it takes minutes) or
//! `none`).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use faultline_benches::e2e::{check, set_expected_bdp, write_random_image};
use faultline_benches::{emit, env_size, Link};
use faultline_tests::{run_source, Background, Certs, DestProcess, Finished, ShmDir};
use serde_json::{json, Value};
use wan_emu::{LinkConfig, WanEmulator};

const BENCH: &str = "disk_evacuation";
const TARGET_OVER_IDEAL: f64 = 1.15;
const TARGET_P99_RTT: f64 = 1.5;
const MEMORY: &str = "64M";
const TIMEOUT: Duration = Duration::from_secs(900);
/// Stand-in guest threads reading random blocks at the destination (each waits for the
/// stale block it hit, so more threads give more latency samples per run);
/// `FAULTLINE_BENCH_READERS` overrides.
fn readers() -> String {
    std::env::var("FAULTLINE_BENCH_READERS").unwrap_or_else(|_| "4".into())
}

fn main() -> anyhow::Result<()> {
    let disk_bytes = env_size("FAULTLINE_BENCH_DISK", 2 << 30);
    let stale: Vec<f64> = std::env::var("FAULTLINE_BENCH_STALE")
        .unwrap_or_else(|_| "1,5,20".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let only = std::env::var("FAULTLINE_BENCH_LINKS").ok();
    let full = std::env::var("FAULTLINE_BENCH_FULL").unwrap_or_else(|_| "all".into());
    let links = [
        Link {
            rate_bps: 100_000_000,
            rtt_ms: 20,
        },
        Link {
            rate_bps: 1_000_000_000,
            rtt_ms: 20,
        },
    ];
    let certs = Certs::new();
    let dir = tempfile::tempdir_in(
        std::env::var("FAULTLINE_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()),
    )
    .context("a directory for the disk images")?;
    let image = dir.path().join("vda.img");
    write_random_image(&image, disk_bytes)?;
    for link in links.iter().filter(|l| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|w| l.name().contains(w.trim())))
    }) {
        set_expected_bdp(link.rate_bps, Duration::from_millis(link.rtt_ms));
        let mut replica_ms = Vec::new();
        for &pct in &stale {
            let row = replica_run(&certs, dir.path(), &image, disk_bytes, link, pct)?;
            replica_ms.push((pct, row["total_ms"].as_f64().unwrap_or(f64::NAN)));
            emit(&row);
        }
        let run_full = full == "all" || (full == "fast" && link.rate_bps >= 1_000_000_000);
        if run_full {
            let row = full_run(&certs, dir.path(), &image, disk_bytes, link)?;
            let full_ms = row["total_ms"].as_f64().unwrap_or(f64::NAN);
            emit(&row);
            emit(&json!({
                "bench": BENCH,
                "case": format!("{}_summary", link.name()),
                "link": link.name(),
                "disk_bytes": disk_bytes,
                "no_replica_ms": full_ms,
                "no_replica_over_replica": replica_ms
                    .iter()
                    .map(|(p, ms)| (format!("{p}pct"), full_ms / ms))
                    .collect::<std::collections::BTreeMap<_, _>>(),
            }));
        }
    }
    Ok(())
}

fn emulator(dest: &str, link: &Link) -> anyhow::Result<WanEmulator> {
    let addr: SocketAddr = dest.parse().context("destination address")?;
    Ok(WanEmulator::start(
        "127.0.0.1:0".parse()?,
        addr,
        LinkConfig::new(Duration::from_millis(link.rtt_ms), link.rate_bps),
    )?)
}

fn replica_run(
    certs: &Certs,
    dir: &Path,
    image: &Path,
    disk_bytes: u64,
    link: &Link,
    pct: f64,
) -> anyhow::Result<Value> {
    let shm = ShmDir::new("bench-disk");
    let disk_dir = dir.join(format!("standby-{}-{pct}", link.name()));
    let disk_arg = format!("vda={disk_bytes}");
    let readers = readers();
    let standby = DestProcess::standby(
        certs,
        "127.0.0.1:0",
        &[
            "--size",
            MEMORY,
            "--replica-dir",
            &shm.arg(),
            "--workers",
            "0",
            "--disk",
            &disk_arg,
            "--disk-dir",
            &disk_dir.display().to_string(),
            "--disk-readers",
            &readers,
        ],
    );
    let wan = emulator(&standby.addr, link)?;
    let via = wan.local_addr().to_string();
    let pct_arg = pct.to_string();
    let image_arg = format!("vda={}", image.display());
    let src = Background::replicate(
        certs,
        &standby.addr,
        &[
            "--synthetic",
            MEMORY,
            "--writers",
            "0",
            "--evacuate-after",
            "0",
            "--stale-pct",
            "0",
            "--budget-mbps",
            "20000",
            "--encoding",
            "off",
            "--evacuate-connect",
            &via,
            "--disk",
            &image_arg,
            "--disk-stale-pct",
            &pct_arg,
        ],
    )
    .wait(TIMEOUT);
    let dst = standby.wait(TIMEOUT);
    let row = row(
        &src,
        &dst,
        link,
        &format!("{}_replica_{pct}pct", link.name()),
    )?;
    let _ = std::fs::remove_dir_all(&disk_dir);
    Ok(row)
}

fn full_run(
    certs: &Certs,
    dir: &Path,
    image: &Path,
    disk_bytes: u64,
    link: &Link,
) -> anyhow::Result<Value> {
    let disk_dir = dir.join(format!("dest-{}", link.name()));
    let disk_arg = format!("vda={disk_bytes}");
    let readers = readers();
    let dest = DestProcess::start(
        certs,
        &[
            "--size",
            MEMORY,
            "--workers",
            "0",
            "--disk",
            &disk_arg,
            "--disk-dir",
            &disk_dir.display().to_string(),
            "--disk-readers",
            &readers,
        ],
    );
    let wan = emulator(&dest.addr, link)?;
    let via = wan.local_addr().to_string();
    let image_arg = format!("vda={}", image.display());
    let src = run_source(
        certs,
        "source",
        &via,
        &[
            "--synthetic",
            MEMORY,
            "--encoding",
            "off",
            "--disk",
            &image_arg,
        ],
        TIMEOUT,
    );
    let dst = dest.wait(TIMEOUT);
    let row = row(&src, &dst, link, &format!("{}_no_replica", link.name()))?;
    let _ = std::fs::remove_dir_all(&disk_dir);
    Ok(row)
}

/// The JSON row of one run, with both sides' digests checked.
fn row(src: &Finished, dst: &Finished, link: &Link, case: &str) -> anyhow::Result<Value> {
    check(src, "source")?;
    check(dst, "destination")?;
    let (s, d) = (&src.json, &dst.json);
    if s["digest"] != d["digest"] || s["disk_digests"] != d["disk_digests"] {
        bail!("digests differ: source {s} destination {d}");
    }
    let disk = &d["disks"][0];
    let stale = disk["blocks_stale"].as_u64().unwrap_or(0);
    // Memory pages that crossed: the standby's stale pages (the memory is idle: few or
    // none), or without a replica every non-zero page of the synthetic image.
    let mem_stale = match d["pages_stale"].as_u64() {
        Some(n) => n,
        None => {
            let pages = d["memory_bytes"].as_u64().unwrap_or(0) / 4096;
            pages - s["mix"]["zero"].as_u64().unwrap_or(0).min(pages)
        }
    };
    let must_cross = (stale + mem_stale) * 4096;
    let ideal_ms = must_cross as f64 * 8.0 / link.rate_bps as f64 * 1e3 + link.rtt_ms as f64;
    let total_ms = d["total_ms"].as_f64().unwrap_or(f64::NAN);
    let rtt_us = link.rtt_ms as f64 * 1e3;
    let p50 = disk["wait_us_p50"].as_f64().unwrap_or(f64::NAN);
    let p99 = disk["wait_us_p99"].as_f64().unwrap_or(f64::NAN);
    Ok(json!({
        "bench": BENCH,
        "case": case,
        "link": link.name(),
        "rate_bps": link.rate_bps,
        "rtt_ms": link.rtt_ms,
        "disk_bytes": disk["bytes"],
        "blocks_stale": stale,
        "blocks_from_replica": disk["blocks_from_replica"],
        "memory_pages_stale": mem_stale,
        "must_cross_bytes": must_cross,
        "total_ms": total_ms,
        "disk_total_ms": disk["disk_total_ms"],
        "ideal_ms": ideal_ms,
        "total_over_ideal": total_ms / ideal_ms,
        "meets_target": total_ms / ideal_ms <= TARGET_OVER_IDEAL,
        "disk_wire_bytes": disk["disk_wire_bytes"],
        "wire_bytes": d["wire_bytes"],
        "stale_reads": disk["reads_waited"],
        "stale_read_p50_us": p50,
        "stale_read_p99_us": p99,
        "stale_read_max_us": disk["wait_us_max"],
        "stale_read_p50_rtt": p50 / rtt_us,
        "stale_read_p99_rtt": p99 / rtt_us,
        "read_target_p99_rtt": TARGET_P99_RTT,
        "read_meets_target": p99 / rtt_us <= TARGET_P99_RTT,
        "digest_match": true,
    }))
}
