//! Disks on the command line, between real `faultline` processes: `replicate --disk`
//! tracks and replicates a disk image with memory while a stand-in guest writes it, then
//! evacuates both; `standby --disk` keeps the disk's replica and serves it from the
//! switchover on while its stand-in guest reads it. Memory and disk digests must match
//! the source's at switchover, and only stale blocks may cross.

use std::io::Write;
use std::time::Duration;

use faultline_tests::{Background, Certs, DestProcess, ShmDir};

const TIMEOUT: Duration = Duration::from_secs(180);
const DISK_BLOCKS: u64 = 8192; // 32 MiB

#[test]
fn a_disk_replicates_and_evacuates_with_memory_moving_only_its_stale_blocks() {
    let certs = Certs::new();
    let shm = ShmDir::new("disk-cli");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vda.img");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&image).unwrap());
        for b in 0..DISK_BLOCKS {
            f.write_all(&[(b % 251) as u8; 4096]).unwrap();
        }
    }
    let disk_dir = dir.path().join("standby-disks");
    let standby = DestProcess::standby(
        &certs,
        "127.0.0.1:0",
        &[
            "--size",
            "64M",
            "--replica-dir",
            &shm.arg(),
            "--disk",
            "vda=32M",
            "--disk-dir",
            &disk_dir.display().to_string(),
        ],
    );
    let src = Background::replicate(
        &certs,
        &standby.addr,
        &[
            "--synthetic",
            "64M",
            "--evacuate-after",
            "1",
            "--stale-pct",
            "2",
            "--disk",
            &format!("vda={}", image.display()),
            "--disk-write-rate",
            "500",
            "--disk-stale-pct",
            "5",
        ],
    )
    .wait(TIMEOUT);
    let dst = standby.wait(TIMEOUT);
    assert!(src.status.success(), "replicate failed: {}", src.stderr);
    assert!(dst.status.success(), "standby failed: {}", dst.stderr);
    let (s, d) = (&src.json, &dst.json);
    assert_eq!(s["digest"], d["digest"], "memory differs");
    assert_eq!(
        s["disk_digests"], d["disk_digests"],
        "disk differs: {s} {d}"
    );
    assert_eq!(d["disk_digests"][0]["name"], "vda");
    assert!(s["disk_blocks_written"].as_u64().unwrap() > 0, "{s}");
    // Exactly the 5% written after replication caught up is stale (410 of 8192 blocks).
    let r = &d["disks"][0];
    assert_eq!(r["blocks_stale"], 410, "{r}");
    assert_eq!(r["blocks_from_replica"], DISK_BLOCKS - 410, "{r}");
    assert!(r["disk_wire_bytes"].as_u64().unwrap() <= 410 * 4096, "{r}");
    assert_eq!(d["disk_reads"]["errors"], 0, "{d}");
    // The replica directory now holds the evacuated disk itself.
    let standby_img = disk_dir.join("vda").join("memory.img");
    assert_eq!(
        vmm_shim::digest::digest(&std::fs::read(&standby_img).unwrap()),
        s["disk_digests"][0]["digest"].as_str().unwrap()
    );
}

#[test]
fn a_plain_migration_moves_a_disk_with_memory() {
    let certs = Certs::new();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vda.img");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&image).unwrap());
        for b in 0..DISK_BLOCKS {
            f.write_all(&[(b % 7) as u8; 4096]).unwrap();
        }
    }
    let disk_dir = dir.path().join("dest-disks");
    let dest = DestProcess::start(
        &certs,
        &[
            "--size",
            "32M",
            "--disk",
            "vda=32M",
            "--disk-dir",
            &disk_dir.display().to_string(),
        ],
    );
    let src = faultline_tests::run_source(
        &certs,
        "source",
        &dest.addr,
        &[
            "--synthetic",
            "32M",
            "--disk",
            &format!("vda={}", image.display()),
        ],
        TIMEOUT,
    );
    let dst = dest.wait(TIMEOUT);
    assert!(src.status.success(), "source failed: {}", src.stderr);
    assert!(dst.status.success(), "dest failed: {}", dst.stderr);
    let (s, d) = (&src.json, &dst.json);
    assert_eq!(s["digest"], d["digest"], "memory differs");
    assert_eq!(s["disk_digests"], d["disk_digests"], "disk differs");
    let r = &d["disks"][0];
    assert_eq!(
        (
            r["blocks_stale"].as_u64(),
            r["blocks_from_replica"].as_u64()
        ),
        (Some(DISK_BLOCKS), Some(0)),
        "{r}"
    );
    assert_eq!(d["disk_reads"]["errors"], 0, "{d}");
}
