//! The vhost-user-blk front end under a real Linux guest: `faultline disk serve --vhost-user` serves a
//! 64 MiB raw image pre-filled with a known pattern, QEMU (TCG) attaches it as
//! `vhost-user-blk-pci` over guest memory shared through a memfd, and the guest (Debian's
//! kernel, the busybox initramfs of `scripts/guest-image.sh` with the virtio modules, plus
//! this test's script and data) writes known data at several offsets with O_DIRECT, reads
//! it back and checks its SHA-256, checks the untouched pattern, checks the serial number
//! and size, fsyncs (a FLUSH), discards a range and reads zeroes there, then powers off.
//! The host then checks that the image is byte for byte the pattern with the guest's
//! writes and the discard applied, and that the blocks `disk serve` reports as written are
//! exactly the blocks the guest wrote or discarded. A second guest finds a `--read-only`
//! disk read-only (a write fails; the image does not change). The last test runs a VM's
//! disk through an evacuation with a QEMU guest at each end: at the source while
//! `replicate --disk-vhost-user` tracks and replicates its writes, and at a standby that
//! serves the disk from the moment it resumes the VM, while stale blocks still cross.
//!
//! Skipped, with the reason, only if QEMU or the kernel cannot be installed (not root, no
//! package registry), as the guest-agent test is: run `scripts/guest-image.sh` as root.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use faultline_tests::faultline_bin;
use faultline_tests::qemu::{guest_image, initrd_with, Guest, GuestImage, InitrdFile};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const DISK: u64 = 64 * MIB;
const TRACK: u64 = 4096;
const SERIAL: &str = "fl-vhost-test";

/// The image's initial contents: a pattern no two 8-byte words of which are alike.
fn pattern(len: u64) -> Vec<u8> {
    (0..len / 8)
        .flat_map(|i| splitmix(i ^ 0x5eed).to_le_bytes())
        .collect()
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What the guest writes: (name, byte offset, length), each a whole number of sectors.
const WRITES: &[(&str, u64, u64)] = &[
    ("w0", 0, 64 * 1024),             // the first blocks
    ("w1", MIB + 3 * 4096, 4096),     // one block
    ("w2", 5 * MIB + 512, 512),       // one sector inside a block
    ("w3", 40 * MIB + 1024, 3 * MIB), // large, unaligned to blocks
    ("w4", DISK - 8192, 8192),        // the last two blocks
];
/// What the guest discards (offset, length) and the pattern region it checks untouched.
const DISCARD: (u64, u64) = (48 * MIB, MIB);
const UNTOUCHED: (u64, u64) = (16 * MIB, 4 * MIB);

/// The start of every guest script: mount, load the virtio modules, wait for /dev/vda and
/// check its size and serial; `fail` prints the result line and powers off.
const PROLOGUE: &str = r#"#!/bin/busybox sh
# The disk test's guest: see tests/tests/disk_vhost.rs.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() {
  echo "DISKTEST_RESULT fail $*"
  poweroff -f
  while true; do sleep 1; done
}
. /data/env
echo "DISKTEST_INIT uptime=$(cut -d' ' -f1 /proc/uptime)"
/bin/faultline-modules
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
[ -b /dev/vda ] || fail "no /dev/vda (modules: $(cut -d' ' -f1 /proc/modules | tr '\n' ' '))"
[ "$(cat /sys/block/vda/size)" = "$SECTORS" ] || fail "size $(cat /sys/block/vda/size), want $SECTORS"
[ "$(cat /sys/block/vda/serial)" = "$SERIAL" ] || fail "serial '$(cat /sys/block/vda/serial)'"
sum() { sha256sum | cut -d' ' -f1; }
readdisk() { dd if=/dev/vda bs=65536 iflag=skip_bytes,count_bytes,direct skip=$1 count=$2 2>/dev/null; }
"#;

/// Writes, reads back, checks the pattern, fsyncs and discards.
const READ_WRITE: &str = r#"
[ "$(cat /sys/block/vda/ro)" = 0 ] || fail "read-only"
while read -r name off len; do
  dd if=/data/$name of=/dev/vda bs=65536 oflag=seek_bytes,direct seek=$off conv=notrunc 2>/tmp/dd.err ||
    fail "writing $name: $(cat /tmp/dd.err)"
done </data/plan
while read -r name off len; do
  [ "$(readdisk $off $len | sum)" = "$(sum </data/$name)" ] || fail "$name read back differs"
done </data/plan
[ "$(readdisk $UNTOUCHED_OFF $UNTOUCHED_LEN | sum)" = "$(sum </data/untouched)" ] ||
  fail "the pattern at $UNTOUCHED_OFF differs"
# fsync of the block device: a FLUSH request.
dd if=/data/w1 of=/dev/vda bs=4096 seek=$((W1_OFF / 4096)) conv=notrunc,fsync 2>/tmp/dd.err ||
  fail "fsync: $(cat /tmp/dd.err)"
blkdiscard -o $DISCARD_OFF -l $DISCARD_LEN /dev/vda || fail "blkdiscard"
[ "$(readdisk $DISCARD_OFF $DISCARD_LEN | sum)" = "$(dd if=/dev/zero bs=$DISCARD_LEN count=1 2>/dev/null | sum)" ] ||
  fail "the discarded range does not read as zeroes"
echo "DISKTEST_RESULT ok uptime=$(cut -d' ' -f1 /proc/uptime)"
poweroff -f
"#;

/// On a read-only disk: the kernel knows it is, a write fails, the pattern reads back.
const READ_ONLY: &str = r#"
[ "$(cat /sys/block/vda/ro)" = 1 ] || fail "not read-only"
dd if=/data/untouched of=/dev/vda bs=4096 count=1 oflag=direct conv=notrunc 2>/dev/null &&
  fail "a write to the read-only disk succeeded"
[ "$(readdisk $UNTOUCHED_OFF $UNTOUCHED_LEN | sum)" = "$(sum </data/untouched)" ] ||
  fail "the pattern at $UNTOUCHED_OFF differs"
echo "DISKTEST_RESULT ok uptime=$(cut -d' ' -f1 /proc/uptime)"
poweroff -f
"#;

/// The `disk serve --vhost-user` process; killed on drop if still running.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(image: &Path, socket: &Path, extra: &[&str]) -> Server {
    let child = Command::new(faultline_bin())
        .args(["disk", "serve", "--json", "--serial", SERIAL, "--image"])
        .arg(image)
        .arg("--vhost-user")
        .arg(socket)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn faultline disk serve --vhost-user");
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "disk serve never created its socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

/// Waits (bounded) for the server to exit; its JSON report, exit code and stderr.
fn finish(mut s: Server, timeout: Duration) -> (Value, i32, String) {
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = s.0.try_wait().expect("try_wait") {
            break st;
        }
        assert!(Instant::now() < deadline, "disk serve did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    let mut err = String::new();
    s.0.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    s.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let v: Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("disk serve printed no JSON ({e}): {out}\n{err}"));
    (v, status.code().unwrap_or(-1), err)
}

/// The guest image, or `None` (the test is then skipped, as the guest-agent test is).
fn image_or_skip(test: &str) -> Option<GuestImage> {
    match guest_image() {
        Ok(i) => Some(i),
        Err(why) => {
            eprintln!(
                "SKIPPED {test}: the guest image cannot be built here (run scripts/guest-image.sh as root): {why}"
            );
            None
        }
    }
}

/// The data each write of [`WRITES`] puts on the disk.
fn write_data() -> Vec<Vec<u8>> {
    WRITES
        .iter()
        .enumerate()
        .map(|(k, &(_, _, len))| {
            (0..len / 8)
                .flat_map(|i| splitmix(i ^ ((k as u64 + 1) << 40)).to_le_bytes())
                .collect()
        })
        .collect()
}

/// The guest image with `PROLOGUE` + `body` as its init, `env` as /data/env and `files`
/// under /data, in `dir`.
fn guest_with(
    image: GuestImage,
    dir: &Path,
    body: &str,
    env: &str,
    files: &[(String, Vec<u8>)],
) -> GuestImage {
    let script = format!("{PROLOGUE}{body}");
    let mut all = vec![
        InitrdFile {
            path: "disk-test",
            mode: 0o755,
            data: script.as_bytes(),
        },
        InitrdFile {
            path: "data/env",
            mode: 0o644,
            data: env.as_bytes(),
        },
    ];
    for (p, d) in files {
        all.push(InitrdFile {
            path: p,
            mode: 0o644,
            data: d,
        });
    }
    let initrd = dir.join("initrd.cpio");
    initrd_with(&image.initrd, &all, &initrd);
    GuestImage { initrd, ..image }
}

/// Boots `image` with the vhost-user-blk device on `socket` and waits for it to power off;
/// its result line (checked `ok`) and console.
fn boot_and_wait(image: &GuestImage, socket: &Path) -> (String, String) {
    let t0 = Instant::now();
    let mem = 256;
    let mut guest = Guest::boot_with(
        image,
        mem,
        "rdinit=/disk-test",
        &[
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
            "-numa".into(),
            "node,memdev=mem".into(),
            "-chardev".into(),
            format!("socket,id=blk,path={}", socket.display()),
            "-device".into(),
            "vhost-user-blk-pci,chardev=blk".into(),
        ],
    );
    let status = guest.wait_exit(Duration::from_secs(90));
    let console = guest.console();
    assert!(
        status.is_some(),
        "the guest did not power off within 90 s:\n{console}"
    );
    let result = console
        .lines()
        .find(|l| l.starts_with("DISKTEST_RESULT"))
        .unwrap_or_else(|| panic!("the guest printed no result:\n{console}"))
        .to_string();
    assert!(
        result.starts_with("DISKTEST_RESULT ok"),
        "{result}\n{console}"
    );
    eprintln!("guest ran in {:.1} s: {result}", t0.elapsed().as_secs_f64());
    (result, console)
}

/// Serves `img` with `disk serve --vhost-user` (plus `server_args`), boots the guest with
/// `PROLOGUE` + `body` as its init and the test's data, and waits for it to power off.
/// Returns the guest's result line and the server's JSON report, after checking both
/// ended well.
fn run_guest(image: GuestImage, img: &Path, body: &str, server_args: &[&str]) -> (String, Value) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("blk.sock");
    let plan: String = WRITES
        .iter()
        .map(|(n, off, len)| format!("{n} {off} {len}\n"))
        .collect();
    let env = format!(
        "SECTORS={}\nSERIAL={SERIAL}\nUNTOUCHED_OFF={}\nUNTOUCHED_LEN={}\nDISCARD_OFF={}\nDISCARD_LEN={}\nW1_OFF={}\n",
        DISK / 512,
        UNTOUCHED.0,
        UNTOUCHED.1,
        DISCARD.0,
        DISCARD.1,
        WRITES[1].1,
    );
    let untouched =
        pattern(DISK)[UNTOUCHED.0 as usize..(UNTOUCHED.0 + UNTOUCHED.1) as usize].to_vec();
    let mut files = vec![
        ("data/plan".to_string(), plan.into_bytes()),
        ("data/untouched".to_string(), untouched),
    ];
    for ((n, ..), d) in WRITES.iter().zip(write_data()) {
        files.push((format!("data/{n}"), d));
    }
    let image = guest_with(image, dir.path(), body, &env, &files);

    let server = start_server(img, &socket, server_args);
    let (result, _) = boot_and_wait(&image, &socket);

    // QEMU is gone: the backend saw the disconnect and reports.
    let (report, code, stderr) = finish(server, Duration::from_secs(20));
    assert_eq!(code, 0, "{report}\n{stderr}");
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["ended"], "disconnected", "{report}");
    assert_eq!(
        report["stopped_by"], "the frontend disconnected",
        "{report}"
    );
    assert_eq!(report["block_size"], TRACK, "{report}");
    for k in ["malformed", "unanswered", "unsupported", "disk_errors"] {
        assert_eq!(report["vhost_user"][k], 0, "{k} in {report}");
    }
    assert!(
        report["vhost_user"]["get_ids"].as_u64().unwrap() >= 1,
        "no GET_ID: {report}"
    );
    (result, report)
}

#[test]
fn a_linux_guest_reads_and_writes_a_disk_over_vhost_user_blk() {
    let Some(image) = image_or_skip("disk_vhost read-write") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let mut expect = pattern(DISK);
    std::fs::write(&img, &expect).unwrap();
    let mut want_blocks = BTreeSet::new();
    for (&(_, off, len), d) in WRITES.iter().zip(&write_data()) {
        expect[off as usize..(off + len) as usize].copy_from_slice(d);
        want_blocks.extend(off / TRACK..(off + len).div_ceil(TRACK));
    }
    expect[DISCARD.0 as usize..(DISCARD.0 + DISCARD.1) as usize].fill(0);
    want_blocks.extend(DISCARD.0 / TRACK..(DISCARD.0 + DISCARD.1).div_ceil(TRACK));

    let (_, report) = run_guest(image, &img, READ_WRITE, &[]);
    let r = &report["vhost_user"];
    assert!(r["flushes"].as_u64().unwrap() >= 1, "no FLUSH: {report}");
    assert!(r["discards"].as_u64().unwrap() >= 1, "no DISCARD: {report}");

    // The image is the pattern with the guest's writes and the discard, byte for byte.
    let got = std::fs::read(&img).unwrap();
    if let Some(i) = (0..got.len()).find(|&i| got[i] != expect[i]) {
        panic!(
            "the image differs from the expected one first at byte {i} (block {})",
            i as u64 / TRACK
        );
    }

    // The blocks reported written are exactly those the guest wrote or discarded.
    let mut reported = BTreeSet::new();
    for r in report["written_ranges"].as_array().expect("written ranges") {
        let (first, last) = (r[0].as_u64().unwrap(), r[1].as_u64().unwrap());
        reported.extend(first..=last);
    }
    let missing: Vec<_> = want_blocks.difference(&reported).collect();
    assert!(
        missing.is_empty(),
        "written blocks not reported: {missing:?}"
    );
    let extra: Vec<_> = reported.difference(&want_blocks).collect();
    assert!(
        extra.is_empty(),
        "blocks reported but not written: {extra:?}"
    );
    assert_eq!(report["blocks_written"], want_blocks.len() as u64);
}

#[test]
fn a_read_only_disk_is_read_only_to_the_guest() {
    let Some(image) = image_or_skip("disk_vhost read-only") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let before = pattern(DISK);
    std::fs::write(&img, &before).unwrap();
    let (_, report) = run_guest(image, &img, READ_ONLY, &["--read-only"]);
    assert_eq!(report["read_only"], true, "{report}");
    assert_eq!(report["blocks_written"], 0, "{report}");
    assert_eq!(report["vhost_user"]["writes"], 0, "{report}");
    assert!(
        std::fs::read(&img).unwrap() == before,
        "the read-only image changed"
    );
}

#[test]
fn disk_vhost_reports_and_exits_on_sigterm_without_a_frontend() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; MIB as usize]).unwrap();
    let socket = dir.path().join("blk.sock");
    let server = start_server(&img, &socket, &["--read-only"]);
    let pid = server.0.id().to_string();
    let kill = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(kill.success());
    let (report, code, stderr) = finish(server, Duration::from_secs(10));
    assert_eq!(code, 0, "{report}\n{stderr}");
    assert_eq!(report["ended"], "stopped", "{report}");
    assert_eq!(report["blocks_written"], 0);
    assert!(
        report["stopped_by"]
            .as_str()
            .unwrap_or("")
            .contains("SIGTERM"),
        "{report}"
    );
    assert!(!socket.exists(), "the socket file was left behind");
}

/// The whole disk's digest as the guest first reads it, then the plan's writes, each read
/// back (at the source and at the standby alike).
const SUM_THEN_WRITE: &str = r#"
echo "DISKTEST_SUM $(readdisk 0 $DISK_BYTES | sum)"
while read -r name off len; do
  dd if=/data/$name of=/dev/vda bs=65536 oflag=seek_bytes,direct seek=$off conv=notrunc,fsync 2>/tmp/dd.err ||
    fail "writing $name: $(cat /tmp/dd.err)"
  [ "$(readdisk $off $len | sum)" = "$(sum </data/$name)" ] || fail "$name read back differs"
done </data/plan
echo "DISKTEST_RESULT ok uptime=$(cut -d' ' -f1 /proc/uptime)"
poweroff -f
"#;

/// One guest's writes, (name, byte offset, length), and their data (seeded by `seed`).
type Writes = Vec<(String, u64, u64, Vec<u8>)>;

fn writes(plan: &[(&str, u64, u64)], seed: u64) -> Writes {
    plan.iter()
        .enumerate()
        .map(|(k, &(n, off, len))| {
            let data = (0..len / 8)
                .flat_map(|i| splitmix(i ^ ((k as u64 + seed) << 40)).to_le_bytes())
                .collect();
            (n.to_string(), off, len, data)
        })
        .collect()
}

/// The guest image that runs `SUM_THEN_WRITE` with `w` on a disk of `disk` bytes, in `dir`.
fn sum_then_write_guest(image: GuestImage, dir: &Path, disk: u64, w: &Writes) -> GuestImage {
    std::fs::create_dir_all(dir).unwrap();
    let plan: String = w
        .iter()
        .map(|(n, off, len, _)| format!("{n} {off} {len}\n"))
        .collect();
    let env = format!("SECTORS={}\nSERIAL=vda\nDISK_BYTES={disk}\n", disk / 512);
    let mut files = vec![("data/plan".to_string(), plan.into_bytes())];
    for (n, _, _, d) in w {
        files.push((format!("data/{n}"), d.clone()));
    }
    guest_with(image, dir, SUM_THEN_WRITE, &env, &files)
}

/// The digest a guest printed.
fn guest_sum(console: &str) -> String {
    console
        .lines()
        .find_map(|l| l.strip_prefix("DISKTEST_SUM "))
        .unwrap_or_else(|| panic!("no digest from the guest:\n{console}"))
        .trim()
        .to_string()
}

fn wait_for_socket(socket: &Path, deadline: Instant, what: &str) {
    while !socket.exists() {
        assert!(Instant::now() < deadline, "{what}'s socket never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// A VM's disk on real VMMs at both ends of an evacuation. At the source, `replicate`
/// serves the disk over vhost-user-blk with writes tracked while it replicates: a QEMU
/// guest reads it (the image as created), writes checksummed data and reads it back, then
/// powers off, and SIGUSR1 starts the evacuation. The standby serves the disk over
/// vhost-user-blk from the moment it resumes the VM, while a fifth of the disk (the blocks
/// written since the last replication round) is still crossing a slow link. A second
/// QEMU guest attaches it, reads the whole disk (the stale blocks it reaches first are
/// fetched on demand) and finds exactly the source's disk at the switchover, then writes.
/// After the evacuation, the standby's disk is the source's plus the guest's writes.
#[test]
fn a_linux_guest_uses_its_disk_at_the_source_and_at_an_evacuating_standby_over_vhost_user_blk() {
    use faultline_tests::{Background, Certs, DestProcess, ShmDir};
    use std::os::unix::fs::FileExt;
    const EVAC_DISK: u64 = 32 * MIB;
    const TIMEOUT: Duration = Duration::from_secs(180);
    let Some(image) = image_or_skip("disk_vhost evacuation") else {
        return;
    };
    let certs = Certs::new();
    let shm = ShmDir::new("disk-vhost");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vda.img");
    faultline_tests::block_image(&img, EVAC_DISK / TRACK);
    let created = sha256(&img);
    // Each guest writes one block and an unaligned run of sectors.
    let at_source = writes(&[("s0", 4 * MIB, 8192), ("s1", 20 * MIB + 1536, 2560)], 3);
    let at_standby = writes(&[("e0", 8 * MIB, 4096), ("e1", 16 * MIB + 512, 3072)], 7);
    let source_guest = sum_then_write_guest(
        image.clone(),
        &dir.path().join("g-src"),
        EVAC_DISK,
        &at_source,
    );
    let standby_guest =
        sum_then_write_guest(image, &dir.path().join("g-standby"), EVAC_DISK, &at_standby);

    let socket = dir.path().join("vda.sock");
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
            &dir.path().join("standby-disks").display().to_string(),
            "--disk-vhost-user",
            &format!("vda={}", socket.display()),
            "--serve-after",
        ],
    );
    // 4 Mbit/s, 20 ms: the 6.4 MiB of stale blocks take ~13 s to cross, so the guest boots
    // and reads while most of them are still on their way.
    let wan = wan_emu::WanEmulator::start(
        "127.0.0.1:0".parse().unwrap(),
        standby.addr.parse().unwrap(),
        wan_emu::LinkConfig::new(Duration::from_millis(20), 4_000_000),
    )
    .unwrap();
    let src_socket = dir.path().join("src-vda.sock");
    let src = Background::replicate(
        &certs,
        &standby.addr,
        &[
            "--synthetic",
            "32M",
            "--evacuate-after",
            "600",
            "--stale-pct",
            "0",
            "--disk",
            &format!("vda={}", img.display()),
            "--disk-stale-pct",
            "20",
            "--disk-vhost-user",
            &format!("vda={}", src_socket.display()),
            "--evacuate-connect",
            &wan.local_addr().to_string(),
        ],
    );

    // At the source, while it replicates.
    let deadline = Instant::now() + TIMEOUT;
    wait_for_socket(&src_socket, deadline, "the source");
    let (_, console) = boot_and_wait(&source_guest, &src_socket);
    assert_eq!(
        guest_sum(&console),
        created,
        "the source guest read another disk"
    );
    let f = std::fs::File::open(&img).unwrap();
    for (n, off, len, d) in &at_source {
        let mut got = vec![0; *len as usize];
        f.read_exact_at(&mut got, *off).unwrap();
        assert!(
            got == *d,
            "the source guest's write {n} is not in the image"
        );
    }
    // The warning: evacuate now.
    // SAFETY: kill only reads its integer arguments; the pid is our running child's.
    unsafe { libc::kill(src.pid() as libc::pid_t, libc::SIGUSR1) };

    // At the standby: the socket appears when it resumes the VM.
    wait_for_socket(&socket, deadline, "the standby");
    let (_, console) = boot_and_wait(&standby_guest, &socket);
    let seen = guest_sum(&console);

    let src = src.wait(TIMEOUT);
    assert!(src.status.success(), "replicate failed: {}", src.stderr);
    // The source's image is final from the switchover on: the guest read exactly it.
    assert_eq!(seen, sha256(&img), "the standby guest read another disk");
    assert_ne!(
        seen, created,
        "the source's writes did not reach the standby"
    );

    // SAFETY: kill only reads its integer arguments; the pid is our running child's.
    unsafe { libc::kill(standby.pid() as libc::pid_t, libc::SIGTERM) };
    let dst = standby.wait(TIMEOUT);
    assert!(dst.status.success(), "standby failed: {}", dst.stderr);
    let (s, d) = (&src.json, &dst.json);
    assert_eq!(s["digest"], d["digest"], "memory differs");
    let r = &d["disks"][0];
    assert_eq!(r["blocks_stale"], 1638, "{r}");
    assert!(
        r["units_fetched"].as_u64().unwrap() > 0,
        "the guest fetched no stale block on demand: {r}"
    );
    // The standby's disk: the source's at the switchover plus the guest's writes.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    for (_, off, _, d) in &at_standby {
        f.write_all_at(d, *off).unwrap();
    }
    assert_eq!(
        d["disk_digests"][0]["digest"].as_str().unwrap(),
        vmm_shim::digest::digest(&std::fs::read(&img).unwrap())
    );
}
