//! `faultline demo --replica`: a standby process and a source process on loopback; the
//! source's guest keeps writing while it is replicated, then it is evacuated into the
//! replica and only stale pages cross (with `--wan-*`, through an emulated WAN link).

use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::Value;

use super::demo::{spawn_listening, DemoArgs, DemoLink, DemoWan, Reaper};

pub(super) struct DemoCerts {
    pub src_crt: String,
    pub src_key: String,
    pub dst_crt: String,
    pub dst_key: String,
}

#[derive(Debug, Serialize)]
struct Latency {
    p50: u64,
    p99: u64,
    max: u64,
}

/// `faultline demo --replica --json` prints exactly this.
#[derive(Debug, Serialize)]
struct ReplicaDemoReport {
    digest_match: bool,
    source_digest: String,
    dest_digest: String,
    memory_bytes: u64,
    pages: u64,
    tracker: String,
    replication_pages_sent: u64,
    replication_wire_bytes: u64,
    source_writes: u64,
    stale_pct_requested: Option<f64>,
    pages_stale: u64,
    pages_from_replica: u64,
    vulnerability_ms: f64,
    resume_ms: f64,
    total_ms: f64,
    wire_bytes: u64,
    faults: u64,
    fault_latency_us: Latency,
    pages_pushed: u64,
    pages_faulted: u64,
    pages_zero: u64,
    /// The guest's disk, if it had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    disk: Option<DiskDemo>,
    wall_ms: f64,
    /// The emulated WAN link the evacuation crossed and what it carried (with `--wan-*`).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    wan: Option<DemoLink>,
}

/// What the demo shows of the guest's disk.
#[derive(Debug, Serialize)]
struct DiskDemo {
    digest_match: bool,
    bytes: u64,
    blocks: u64,
    blocks_written_during_replication: u64,
    stale_pct_requested: f64,
    blocks_stale: u64,
    blocks_from_replica: u64,
    disk_wire_bytes: u64,
    disk_total_ms: f64,
    stale_reads: u64,
    stale_read_p99_us: u64,
}

/// A disk image of `bytes` with distinct non-zero blocks, for the demo's guest.
fn write_disk_image(path: &Path, bytes: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let mut block = vec![0u8; 4096];
    for b in 0..bytes / 4096 {
        for (i, c) in block.chunks_mut(8).enumerate() {
            c.copy_from_slice(&(b << 16 | i as u64 | 1).to_le_bytes());
        }
        f.write_all(&block)?;
    }
    f.flush()?;
    Ok(())
}

pub(super) fn run(
    a: &DemoArgs,
    exe: &Path,
    certs: &DemoCerts,
    wall: Instant,
) -> anyhow::Result<ExitCode> {
    let size = a.size.to_string();
    let replica_dir = tempfile::Builder::new()
        .prefix("faultline-demo-")
        .tempdir_in("/dev/shm")
        .context("creating the replica directory on /dev/shm (tmpfs)")?;
    let dir = replica_dir.path().display().to_string();
    // The guest's disk: an image at the source, its replica at the standby (on disk).
    let disk_dir = tempfile::Builder::new()
        .prefix("faultline-demo-disk-")
        .tempdir()
        .context("creating a directory for the demo's disk")?;
    let with_disk = a.disk_size > 0;
    let disk_image = disk_dir.path().join("demo-disk.img");
    if with_disk {
        write_disk_image(&disk_image, a.disk_size)?;
    }
    let disk_size = a.disk_size.to_string();
    let standby_disk_dir = disk_dir.path().join("standby").display().to_string();
    let mut cmd = Command::new(exe);
    cmd.args([
        "standby",
        "--listen",
        "127.0.0.1:0",
        "--size",
        &size,
        "--json",
    ])
    .args(["--progress", "--vm-id", "demo", "--replica-dir", &dir])
    .args([
        "--workers",
        &a.workers.to_string(),
        "--accept-timeout",
        "120",
    ])
    .args(["--cert", &certs.dst_crt, "--key", &certs.dst_key])
    .args(["--peer-cert", &certs.src_crt]);
    if with_disk {
        cmd.args(["--disk", &format!("vda={disk_size}")])
            .args(["--disk-dir", &standby_disk_dir]);
    }
    let mut wan = DemoWan::from_args(a)?;
    if let Some(w) = &wan {
        w.tune(&mut cmd);
    }
    let (mut standby, addr, _events, relay) = spawn_listening(&mut cmd, "standby")?;

    let mut source = Command::new(exe);
    source
        .args([
            "replicate",
            "--connect",
            &addr,
            "--synthetic",
            &size,
            "--json",
        ])
        .args(["--vm-id", "demo", "--seed", &a.seed.to_string()])
        .args(["--evacuate-after", &a.replicate_secs.to_string()])
        .args(["--cert", &certs.src_crt, "--key", &certs.src_key])
        .args(["--peer-cert", &certs.dst_crt]);
    if let Some(p) = a.stale_pct {
        source.args(["--stale-pct", &p.to_string()]);
    }
    // Replication goes the direct way, as over a site's own replication path; the
    // evacuation crosses the emulated link.
    if let Some(w) = &mut wan {
        w.tune(&mut source);
        source.args(["--evacuate-connect", &w.relay_to(&addr)?]);
    }
    if with_disk {
        source
            .args(["--disk", &format!("vda={}", disk_image.display())])
            .args(["--disk-write-rate", "500"])
            .args(["--disk-stale-pct", &a.disk_stale_pct.to_string()]);
    }
    let mut source = Reaper(Some(
        source
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the source process")?,
    ));

    let spinner = ProgressBar::new_spinner();
    spinner.set_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    spinner.set_message("replicating to the standby while the guest writes, then evacuating");
    spinner.enable_steady_tick(Duration::from_millis(100));
    let src_out = source.finish("source")?;
    spinner.finish_and_clear();
    let dst_out = standby.finish("standby")?;
    let _ = relay.join();

    let src: Value = serde_json::from_str(src_out.trim()).context("parsing the source's report")?;
    let dst: Value =
        serde_json::from_str(dst_out.trim()).context("parsing the standby's report")?;
    let u = |v: &Value| v.as_u64().unwrap_or(0);
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let m = &dst["metrics"];
    let source_digest = src["digest"].as_str().unwrap_or_default().to_string();
    let dest_digest = dst["digest"].as_str().unwrap_or_default().to_string();
    let r = ReplicaDemoReport {
        digest_match: !source_digest.is_empty() && source_digest == dest_digest,
        source_digest,
        dest_digest,
        memory_bytes: a.size,
        pages: a.size / 4096,
        tracker: src["replication"]["tracker"].as_str().unwrap_or("?").into(),
        replication_pages_sent: u(&src["replication"]["pages_sent"]),
        replication_wire_bytes: u(&src["replication"]["wire_bytes"]),
        source_writes: u(&src["writers"]["writes"]),
        stale_pct_requested: a.stale_pct,
        pages_stale: u(&dst["pages_stale"]),
        pages_from_replica: u(&dst["pages_from_replica"]),
        vulnerability_ms: f(&dst["vulnerability_ms"]),
        resume_ms: f(&dst["resume_ms"]),
        total_ms: f(&dst["total_ms"]),
        wire_bytes: u(&dst["wire_bytes"]),
        faults: u(&m["faults"]),
        fault_latency_us: Latency {
            p50: u(&m["fault_latency_us"]["p50"]),
            p99: u(&m["fault_latency_us"]["p99"]),
            max: u(&m["fault_latency_us"]["max"]),
        },
        pages_pushed: u(&m["pages_pushed"]),
        pages_faulted: u(&m["pages_faulted"]),
        pages_zero: u(&m["pages_zero"]),
        disk: with_disk.then(|| {
            let d = &dst["disks"][0];
            let digest = |v: &Value| v["disk_digests"][0]["digest"].as_str().map(str::to_string);
            DiskDemo {
                digest_match: digest(&src).is_some() && digest(&src) == digest(&dst),
                bytes: a.disk_size,
                blocks: a.disk_size / 4096,
                blocks_written_during_replication: u(&src["disk_blocks_written"]),
                stale_pct_requested: a.disk_stale_pct,
                blocks_stale: u(&d["blocks_stale"]),
                blocks_from_replica: u(&d["blocks_from_replica"]),
                disk_wire_bytes: u(&d["disk_wire_bytes"]),
                disk_total_ms: f(&d["disk_total_ms"]),
                stale_reads: u(&d["reads_waited"]),
                stale_read_p99_us: u(&d["wait_us_p99"]),
            }
        }),
        wall_ms: wall.elapsed().as_secs_f64() * 1e3,
        wan: wan.map(|w| w.finish(f(&dst["total_ms"]))),
    };
    if a.json {
        super::outcome::print_report(&r)?;
    } else {
        print_text(&r, a.replicate_secs);
    }
    Ok(
        if r.digest_match && r.disk.as_ref().is_none_or(|d| d.digest_match) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}

fn print_text(r: &ReplicaDemoReport, secs: f64) {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let path = match &r.wan {
        Some(w) => format!(" through an emulated WAN ({})", w.link),
        None => String::new(),
    };
    println!(
        "faultline demo --replica: {} MiB guest, replicated to a standby, then evacuated{path}",
        r.memory_bytes >> 20
    );
    println!(
        "  normal times  {secs} s of replication with {} tracking while the guest made {} writes ({} pages sent, {:.0} MiB)",
        r.tracker,
        r.source_writes,
        r.replication_pages_sent,
        mib(r.replication_wire_bytes)
    );
    println!(
        "  evacuation    {} stale pages ({:.1}%) crossed; {} pages served from the replica",
        r.pages_stale,
        100.0 * r.pages_stale as f64 / r.pages.max(1) as f64,
        r.pages_from_replica
    );
    println!(
        "  resume        {:.1} ms after the source connected; vulnerable for {:.0} ms; done in {:.0} ms",
        r.resume_ms, r.vulnerability_ms, r.total_ms
    );
    println!(
        "  wire          {:.1} MiB at evacuation, for {:.0} MiB of guest memory",
        mib(r.wire_bytes),
        mib(r.memory_bytes)
    );
    println!(
        "  faults        {} (p50 {} us, p99 {} us); {} pages pushed, {} on demand",
        r.faults, r.fault_latency_us.p50, r.fault_latency_us.p99, r.pages_pushed, r.pages_faulted
    );
    if let Some(w) = &r.wan {
        w.print("link          ");
    }
    if let Some(d) = &r.disk {
        println!(
            "  disk          {:.0} MiB, {} blocks written during replication; {} of {} blocks stale ({:.1}%) crossed ({:.1} MiB) in {:.0} ms, {} served from the replica; {} guest reads waited for a stale block (p99 {} us); digest {}",
            mib(d.bytes),
            d.blocks_written_during_replication,
            d.blocks_stale,
            d.blocks,
            100.0 * d.blocks_stale as f64 / d.blocks.max(1) as f64,
            mib(d.disk_wire_bytes),
            d.disk_total_ms,
            d.blocks_from_replica,
            d.stale_reads,
            d.stale_read_p99_us,
            if d.digest_match { "MATCH" } else { "MISMATCH" }
        );
    }
    println!(
        "  digest        source {} {} destination {}: {}",
        r.source_digest,
        if r.digest_match { "=" } else { "!=" },
        r.dest_digest,
        if r.digest_match { "MATCH" } else { "MISMATCH" }
    );
}
