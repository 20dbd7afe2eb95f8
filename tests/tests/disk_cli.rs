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

/// Waits for a Unix socket to appear (an export that starts when the VM resumes).
fn wait_for_socket(path: &std::path::Path, what: &str) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !path.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} never appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn qemu_tools_use_the_disk_at_the_source_and_at_an_evacuating_standby() {
    use faultline_tests::nbd::{qemu_io_ok, qemu_tool};
    use std::os::unix::fs::FileExt;
    let certs = Certs::new();
    let shm = ShmDir::new("disk-nbd");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vda.img");
    faultline_tests::block_image(&image, DISK_BLOCKS);
    let (src_sock, dst_sock) = (dir.path().join("src.sock"), dir.path().join("dst.sock"));
    let uri = |p: &std::path::Path| format!("nbd+unix:///?socket={}", p.display());
    let disk_dir = dir.path().join("standby-disks");
    let standby = DestProcess::standby(
        &certs,
        "127.0.0.1:0",
        &[
            "--size",
            "32M",
            "--replica-dir",
            &shm.arg(),
            "--disk",
            "vda=32M",
            "--disk-dir",
            &disk_dir.display().to_string(),
            "--disk-nbd-unix",
            &format!("vda={}", dst_sock.display()),
            "--serve-after",
        ],
    );
    // The evacuation crosses a slow link (20 Mbit/s, 20 ms): ~2.7 s for the 20% of the disk
    // that is stale, during which QEMU's tools use the disk at the standby.
    let wan = wan_emu::WanEmulator::start(
        "127.0.0.1:0".parse().unwrap(),
        standby.addr.parse().unwrap(),
        wan_emu::LinkConfig::new(Duration::from_millis(20), 20_000_000),
    )
    .unwrap();
    let src = Background::replicate(
        &certs,
        &standby.addr,
        &[
            "--synthetic",
            "32M",
            "--evacuate-after",
            "3",
            "--stale-pct",
            "0",
            "--disk",
            &format!("vda={}", image.display()),
            "--disk-nbd-unix",
            &format!("vda={}", src_sock.display()),
            "--disk-stale-pct",
            "20",
            "--evacuate-connect",
            &wan.local_addr().to_string(),
        ],
    );

    // Normal times: QEMU writes the source's disk through faultline's export (tracked).
    wait_for_socket(&src_sock, "the source's export");
    qemu_io_ok(
        &uri(&src_sock),
        &[
            "write -P 0xa1 1M 64k",
            "write -P 0xa2 33554400 32",
            "read -P 0xa1 1M 64k",
        ],
    );

    // The standby resumes the VM: its export appears while stale blocks are still coming.
    // The source's image is final from the switchover on: QEMU compares the whole disk
    // through the standby's export (stale blocks fetched as it reads), then writes.
    wait_for_socket(&dst_sock, "the standby's export");
    let compare = |want: &std::path::Path| {
        let out = std::process::Command::new(qemu_tool("qemu-img"))
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(uri(&dst_sock))
            .arg(want)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "qemu-img compare: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    compare(&image);
    qemu_io_ok(
        &uri(&dst_sock),
        &[
            "write -P 0xb2 8M 4k",
            "write -P 0xc3 16777316 300",
            "read -P 0xb2 8M 4k",
            "read -P 0xc3 16777316 300",
        ],
    );
    let src = src.wait(TIMEOUT);
    assert!(src.status.success(), "replicate failed: {}", src.stderr);

    // After the evacuation (still exported with --serve-after): the standby's disk is the
    // source's at switchover plus what QEMU wrote at the standby.
    let want = dir.path().join("want.img");
    std::fs::copy(&image, &want).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&want).unwrap();
    f.write_all_at(&[0xb2; 4096], 8 << 20).unwrap();
    f.write_all_at(&[0xc3; 300], 16777316).unwrap();
    compare(&want);
    let map = std::process::Command::new(qemu_tool("qemu-img"))
        .args(["map", "-f", "raw", "--output=json"])
        .arg(uri(&dst_sock))
        .output()
        .unwrap();
    assert!(
        map.status.success(),
        "{}",
        String::from_utf8_lossy(&map.stderr)
    );

    // SAFETY: kill only reads its integer arguments; the pid is our running child's.
    unsafe { libc::kill(standby.pid() as libc::pid_t, libc::SIGTERM) };
    let dst = standby.wait(TIMEOUT);
    assert!(dst.status.success(), "standby failed: {}", dst.stderr);
    let (s, d) = (&src.json, &dst.json);
    assert_eq!(s["digest"], d["digest"], "memory differs");
    let r = &d["disks"][0];
    // 20% of the blocks; QEMU's writes at the source were replicated before the pause.
    assert_eq!(r["blocks_stale"], 1638, "{r}");
    assert!(
        r["postcopy"].is_null() && r["units_fetched"].as_u64().unwrap() > 0,
        "{r}"
    );
    assert_eq!(
        d["disk_digests"][0]["digest"].as_str().unwrap(),
        vmm_shim::digest::digest(&std::fs::read(&want).unwrap())
    );
}
