//! Disks on `faultline replicate` and `faultline standby`: the source's disk images
//! (tracked, replicated, evacuated with memory) and the standby's disk replicas (served
//! from the switchover on), with stand-in guest disk I/O on both sides.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{ArgGroup, Args};
use disk::vhost_user::{BlkListener, BlkOptions, Ended, StopHandle, VhostUserBlk};
use disk::{BlockDevice, BlockSize, PostcopyDisk, RawFile, Tracked};
use serde::Serialize;
use uffd_core::DiskTier;
use vmm_shim::disks::ReplicatedDisk;

use super::parse_size;

/// `NAME=VALUE`, for `--disk`.
fn split_named(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((n, v)) if !n.is_empty() && !v.is_empty() => Ok((n.to_string(), v.to_string())),
        _ => Err(format!("expected NAME=VALUE, got {s:?}")),
    }
}

fn parse_disk_path(s: &str) -> Result<(String, PathBuf), String> {
    split_named(s).map(|(n, p)| (n, PathBuf::from(p)))
}

fn parse_disk_size(s: &str) -> Result<(String, u64), String> {
    let (n, v) = split_named(s)?;
    Ok((n, parse_size(&v)?))
}

fn parse_block_size(s: &str) -> Result<BlockSize, String> {
    let b = parse_size(s)?;
    u32::try_from(b)
        .ok()
        .and_then(BlockSize::new)
        .ok_or_else(|| format!("{s}: a block size is a power of two from 4K to 1M"))
}

/// The disks `faultline source` sends with memory.
#[derive(Args, Debug)]
pub struct PlainDiskArgs {
    /// A disk image to migrate with memory, as NAME=PATH (repeatable; nothing may write it
    /// during the migration). The destination needs `--disk NAME=SIZE`.
    #[arg(long = "disk", value_parser = parse_disk_path)]
    pub disks: Vec<(String, PathBuf)>,
}

impl PlainDiskArgs {
    /// The disks, opened read-only, with their digests.
    pub fn open(&self) -> anyhow::Result<(Vec<vmm_shim::disks::SourceDisk>, Vec<DiskDigest>)> {
        let mut disks = Vec::new();
        let mut digests = Vec::new();
        for (name, path) in &self.disks {
            let d = Arc::new(RawFile::open(path, true)?);
            digests.push(digest_disk(name, &*d)?);
            disks.push(vmm_shim::disks::SourceDisk {
                name: name.clone(),
                device: d,
            });
        }
        Ok((disks, digests))
    }
}

/// A plain destination's disks, created empty in DIR/NAME.img: every block comes from the
/// source.
pub fn create_dest_disks(a: &ReceiveDiskArgs) -> anyhow::Result<Vec<vmm_shim::disks::DestDisk>> {
    if a.disks.is_empty() {
        return Ok(Vec::new());
    }
    let dir = a
        .disk_dir
        .clone()
        .context("--disk needs --disk-dir for the disk images")?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut out = Vec::new();
    for (name, size) in &a.disks {
        let path = dir.join(format!("{name}.img"));
        let f =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        f.set_len(*size)
            .with_context(|| format!("sizing {}", path.display()))?;
        let file = RawFile::open(&path, false)?;
        out.push(vmm_shim::disks::DestDisk::new(name.clone(), file, |_| {
            false
        }));
    }
    Ok(out)
}

/// The source's disks (`faultline replicate`).
#[derive(Args, Debug)]
pub struct SourceDiskArgs {
    /// A disk image to replicate and evacuate with memory, as NAME=PATH (repeatable; a raw
    /// image, a whole number of 4 KiB blocks). The standby needs `--disk NAME=SIZE`.
    #[arg(long = "disk", value_parser = parse_disk_path)]
    pub disks: Vec<(String, PathBuf)>,
    /// Granularity of write tracking and replication of disks.
    #[arg(long, value_parser = parse_block_size, default_value = "4K")]
    pub disk_block_size: BlockSize,
    /// Stand-in guest disk writes during replication: random whole blocks per second, per
    /// disk (0: none).
    #[arg(long, default_value_t = 0)]
    pub disk_write_rate: u64,
    /// Make this percentage of each disk's blocks stale at evacuation: wait until
    /// replication caught up, stop it, then write that many blocks.
    #[arg(long)]
    pub disk_stale_pct: Option<f64>,
    /// Export disk NAME over NBD on the Unix socket PATH while it replicates (writes are
    /// tracked), as NAME=PATH (repeatable); the export stops when the guest pauses.
    #[arg(long = "disk-nbd-unix", value_parser = parse_disk_path)]
    pub nbd_unix: Vec<(String, PathBuf)>,
    /// Serve disk NAME to a VMM as a vhost-user-blk device on the Unix socket PATH while it
    /// replicates (writes are tracked), as NAME=PATH (repeatable); the device stops (the
    /// connection is closed) when the guest pauses.
    #[arg(long = "disk-vhost-user", value_parser = parse_disk_path)]
    pub vhost_user: Vec<(String, PathBuf)>,
}

impl SourceDiskArgs {
    /// The exports asked for.
    pub fn exports(&self) -> ExportPlan {
        ExportPlan {
            nbd_unix: self.nbd_unix.clone(),
            vhost_user: self.vhost_user.clone(),
        }
    }
}

/// The disks a receiving side serves (`faultline standby`, `faultline dest`).
#[derive(Args, Debug)]
#[command(group(ArgGroup::new("disk_exports").multiple(true).args(["nbd_unix", "vhost_user"])))]
pub struct ReceiveDiskArgs {
    /// A disk of the VM, as NAME=SIZE (repeatable, in the source's order).
    #[arg(long = "disk", value_parser = parse_disk_size)]
    pub disks: Vec<(String, u64)>,
    /// Where the disks live: for `standby`, the replicas (one subdirectory per disk, kept
    /// across restarts; at evacuation each becomes the disk itself: DIR/NAME/memory.img);
    /// for `dest`, DIR/NAME.img, created empty.
    #[arg(long)]
    pub disk_dir: Option<PathBuf>,
    /// Stand-in guest disk I/O after the switchover: threads reading random blocks of
    /// each disk until it is complete.
    #[arg(long, default_value_t = 1)]
    pub disk_readers: usize,
    /// Export disk NAME over NBD on the Unix socket PATH from the moment the VM resumes
    /// (`nbd+unix:///?socket=PATH`), as NAME=PATH (repeatable). Blocks not here yet are
    /// fetched when a client reads them.
    #[arg(long = "disk-nbd-unix", value_parser = parse_disk_path)]
    pub nbd_unix: Vec<(String, PathBuf)>,
    /// Serve disk NAME to a VMM as a vhost-user-blk device on the Unix socket PATH from the
    /// moment the VM resumes (QEMU: `-chardev socket,path=PATH -device
    /// vhost-user-blk-pci`), as NAME=PATH (repeatable). Blocks not here yet are fetched
    /// when the guest reads them. One VMM at a time; another may connect after it leaves.
    #[arg(long = "disk-vhost-user", value_parser = parse_disk_path)]
    pub vhost_user: Vec<(String, PathBuf)>,
    /// Keep exporting the disks after the migration ended, until SIGTERM or SIGINT (the
    /// report is printed then; a VMM still attached is disconnected).
    #[arg(long, requires = "disk_exports")]
    pub serve_after: bool,
}

impl ReceiveDiskArgs {
    /// Checks that every exported disk is one of `--disk`.
    pub fn check(&self) -> anyhow::Result<()> {
        self.exports()
            .check(self.disks.iter().map(|(n, _)| n.as_str()))
    }

    /// The exports asked for.
    pub fn exports(&self) -> ExportPlan {
        ExportPlan {
            nbd_unix: self.nbd_unix.clone(),
            vhost_user: self.vhost_user.clone(),
        }
    }
}

/// Which disks to export where: NBD on Unix sockets (`--disk-nbd-unix`) and vhost-user-blk
/// (`--disk-vhost-user`), each as (disk name, socket path).
#[derive(Clone, Debug, Default)]
pub struct ExportPlan {
    pub nbd_unix: Vec<(String, PathBuf)>,
    pub vhost_user: Vec<(String, PathBuf)>,
}

impl ExportPlan {
    /// Checks that every exported disk is one of `names` and that no socket is used twice.
    pub fn check<'a>(&self, names: impl Iterator<Item = &'a str>) -> anyhow::Result<()> {
        let names: Vec<&str> = names.collect();
        let mut paths = Vec::new();
        for (flag, list) in [
            ("--disk-nbd-unix", &self.nbd_unix),
            ("--disk-vhost-user", &self.vhost_user),
        ] {
            for (n, p) in list {
                if !names.contains(&n.as_str()) {
                    bail!("{flag} names disk {n:?}, which no --disk gives");
                }
                if paths.contains(&p) {
                    bail!("{flag}: socket {} is given twice", p.display());
                }
                paths.push(p);
            }
        }
        Ok(())
    }
}

/// Exports the devices of the disks a receiving side serves, once it resumes the VM.
pub fn export_received(
    devices: Vec<(String, Arc<PostcopyDisk<RawFile>>)>,
    plan: &ExportPlan,
) -> anyhow::Result<DiskExports> {
    let devices: Vec<(String, Arc<dyn BlockDevice>)> = devices
        .into_iter()
        .map(|(n, d)| (n, d as Arc<dyn BlockDevice>))
        .collect();
    DiskExports::start(&devices, plan)
}

/// A VM's disks served to its VMM and tools: NBD servers (`--disk-nbd-unix`) and
/// vhost-user-blk devices (`--disk-vhost-user`) over the same `BlockDevice`s. Stopped by
/// [`DiskExports::stop`] or when dropped.
#[derive(Default)]
pub struct DiskExports {
    nbd: Vec<disk::nbd::Server>,
    vhost: Vec<VhostExport>,
}

/// One disk served over vhost-user-blk: a thread serving one frontend at a time on the
/// socket, listening again when it leaves, until stopped.
struct VhostExport {
    name: String,
    stop: StopHandle,
    thread: Option<JoinHandle<()>>,
}

impl DiskExports {
    /// Exports each disk `plan` names on its socket; every socket is listening when this
    /// returns.
    pub fn start(
        devices: &[(String, Arc<dyn BlockDevice>)],
        plan: &ExportPlan,
    ) -> anyhow::Result<DiskExports> {
        let find = |name: &str| {
            devices
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, d)| d.clone())
                .with_context(|| format!("no disk {name:?} to export"))
        };
        // Dropped (everything started so far stopped) if one fails.
        let mut out = DiskExports::default();
        for (name, path) in &plan.nbd_unix {
            let server = disk::nbd::Server::new(find(name)?, disk::nbd::ServerConfig::default());
            server
                .serve_unix(path)
                .with_context(|| format!("exporting disk {name}"))?;
            tracing::info!(disk = %name, socket = %path.display(), "disk exported over NBD");
            out.nbd.push(server);
        }
        for (name, path) in &plan.vhost_user {
            let export = VhostExport::start(name, find(name)?, path)
                .with_context(|| format!("serving disk {name} over vhost-user-blk"))?;
            tracing::info!(disk = %name, socket = %path.display(), "disk served over vhost-user-blk");
            out.vhost.push(export);
        }
        Ok(out)
    }

    /// Stops every export: NBD connections finish the requests they received; a VMM still
    /// attached over vhost-user is disconnected once the requests it made are answered.
    pub fn stop(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        for s in &self.nbd {
            s.stop();
        }
        for v in &self.vhost {
            v.stop.stop();
        }
        for v in &mut self.vhost {
            if let Some(t) = v.thread.take() {
                if t.join().is_err() {
                    tracing::error!(disk = %v.name, "the vhost-user-blk export panicked");
                }
            }
        }
    }
}

impl Drop for DiskExports {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// The serial number a disk shows the guest (`/sys/block/vdX/serial`): its name, cut to
/// what virtio-blk carries.
fn serial_for(name: &str) -> String {
    let mut end = name.len().min(disk::vhost_user::SERIAL_LEN);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}

impl VhostExport {
    fn start(name: &str, device: Arc<dyn BlockDevice>, path: &Path) -> anyhow::Result<VhostExport> {
        let opts = BlkOptions {
            serial: serial_for(name),
            ..BlkOptions::default()
        };
        // Checked now, so a bad disk is reported here rather than in the thread.
        let blk = VhostUserBlk::new(device.clone(), opts.clone())?;
        let listener = BlkListener::bind(path)?;
        let stop = StopHandle::new().context("creating the stop event")?;
        let thread = {
            let (stop, name, path) = (stop.clone(), name.to_string(), path.to_path_buf());
            std::thread::Builder::new()
                .name(format!("vhost-{name}"))
                .spawn(move || serve_frontends(&name, &path, device, opts, listener, blk, &stop))
                .context("starting the vhost-user-blk thread")?
        };
        Ok(VhostExport {
            name: name.to_string(),
            stop,
            thread: Some(thread),
        })
    }
}

/// Serves `first` to the frontend that connects to `listener`, then a fresh device to the
/// next frontend on a socket bound again, and so on until `stop`.
fn serve_frontends(
    name: &str,
    path: &Path,
    device: Arc<dyn BlockDevice>,
    opts: BlkOptions,
    listener: BlkListener,
    first: VhostUserBlk,
    stop: &StopHandle,
) {
    let (mut listener, mut blk) = (listener, first);
    loop {
        match listener.serve(blk.clone(), stop) {
            Ok(Ended::Stopped) => return,
            Ok(Ended::Disconnected) => {
                tracing::info!(disk = %name, stats = ?blk.stats(), "the vhost-user frontend disconnected");
            }
            Err(e) => {
                let e = format!("{:#}", anyhow::Error::from(e));
                tracing::warn!(disk = %name, error = %e, "the vhost-user connection failed");
                // Not at full speed if it fails again at once.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        if stop.stopped() {
            return;
        }
        // The socket file went with the last listener: listen again, with a device
        // that starts afresh (its memory map and queues were the last frontend's).
        let next = BlkListener::bind(path)
            .map_err(anyhow::Error::from)
            .and_then(|l| Ok((l, VhostUserBlk::new(device.clone(), opts.clone())?)));
        match next {
            Ok(n) => (listener, blk) = n,
            Err(e) => {
                tracing::error!(disk = %name, error = %format!("{e:#}"), "cannot listen for another vhost-user frontend");
                return;
            }
        }
    }
}

/// The end of a receiving side's session (`what` completed): with `--serve-after` the
/// exports keep serving until SIGTERM or SIGINT, then they stop.
pub fn finish_exports(
    exports: Option<DiskExports>,
    disk: &ReceiveDiskArgs,
    json: bool,
    what: &str,
) {
    if disk.serve_after {
        if !json {
            eprintln!("{what} complete; serving the disks until SIGTERM or SIGINT");
        }
        wait_for_stop();
    }
    if let Some(e) = exports {
        e.stop();
    }
}

/// Waits for SIGTERM or SIGINT (the process's stopper).
fn wait_for_stop() -> String {
    loop {
        if let Some(why) = super::stopper().reason() {
            return why;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A source disk, tracked.
pub struct SourceDisks {
    pub disks: Vec<(String, Arc<Tracked<RawFile>>)>,
}

impl SourceDisks {
    pub fn open(a: &SourceDiskArgs) -> anyhow::Result<SourceDisks> {
        let mut disks = Vec::new();
        for (name, path) in &a.disks {
            let file = RawFile::open(path, false)?;
            disks.push((
                name.clone(),
                Arc::new(Tracked::new(file, a.disk_block_size)),
            ));
        }
        Ok(SourceDisks { disks })
    }

    /// The disks as devices to export.
    pub fn devices(&self) -> Vec<(String, Arc<dyn BlockDevice>)> {
        self.disks
            .iter()
            .map(|(n, d)| (n.clone(), d.clone() as Arc<dyn BlockDevice>))
            .collect()
    }

    pub fn replicated(&self) -> Vec<ReplicatedDisk> {
        self.disks
            .iter()
            .map(|(n, d)| ReplicatedDisk::tracked(n.clone(), d.clone()))
            .collect()
    }

    /// Digests of each disk (the guest must be paused).
    pub fn digests(&self) -> anyhow::Result<Vec<DiskDigest>> {
        self.disks
            .iter()
            .map(|(n, d)| digest_disk(n, &**d))
            .collect()
    }
}

/// A disk's name, size and content digest.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct DiskDigest {
    pub name: String,
    pub bytes: u64,
    pub digest: String,
}

pub fn digest_disk(name: &str, d: &dyn BlockDevice) -> anyhow::Result<DiskDigest> {
    let mut h = vmm_shim::digest::Digester::default();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < d.size() {
        let n = (d.size() - off).min(buf.len() as u64) as usize;
        d.read_at(&mut buf[..n], off)
            .with_context(|| format!("reading disk {name} for its digest"))?;
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(DiskDigest {
        name: name.to_string(),
        bytes: d.size(),
        digest: h.finish(),
    })
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A block's content for the stand-in writers: distinct per block and write.
fn block_content(block: u64, n: u64, out: &mut [u8]) {
    let mut s = splitmix(block ^ n.rotate_left(32));
    for c in out.chunks_mut(8) {
        s = splitmix(s);
        c.copy_from_slice(&s.to_le_bytes()[..c.len()]);
    }
}

/// Random whole-block writes to the source's disks while it runs (stand-in guest I/O).
pub struct DiskWriters {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<u64>>,
}

impl DiskWriters {
    pub fn start(disks: &SourceDisks, rate: u64, seed: u64) -> DiskWriters {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = if rate == 0 {
            Vec::new()
        } else {
            disks
                .disks
                .iter()
                .enumerate()
                .map(|(i, (_, d))| {
                    let (d, stop) = (d.clone(), stop.clone());
                    std::thread::spawn(move || {
                        let blocks = d.size() / 4096;
                        let mut buf = vec![0u8; 4096];
                        let mut n = 0u64;
                        let period = Duration::from_secs_f64(1.0 / rate as f64);
                        while !stop.load(Ordering::Relaxed) {
                            let b = splitmix(seed ^ (i as u64) << 48 ^ n) % blocks;
                            block_content(b, n, &mut buf);
                            if d.write_at(&buf, b * 4096, false).is_err() {
                                break;
                            }
                            n += 1;
                            std::thread::sleep(period);
                        }
                        n
                    })
                })
                .collect()
        };
        DiskWriters { stop, threads }
    }

    /// Stops the writers (the guest pauses); the blocks they wrote.
    pub fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.threads.into_iter().filter_map(|t| t.join().ok()).sum()
    }
}

/// Writes `pct`% of each disk's blocks (distinct, random), after replication stopped: these
/// are exactly the stale blocks at evacuation.
pub fn dirty_disks(disks: &SourceDisks, pct: f64, seed: u64) -> anyhow::Result<u64> {
    let mut total = 0;
    let mut buf = vec![0u8; 4096];
    for (i, (name, d)) in disks.disks.iter().enumerate() {
        let blocks = d.size() / 4096;
        let n = ((blocks as f64 * pct / 100.0).round() as u64).min(blocks);
        // A random permutation's first n blocks: an affine map with an odd multiplier.
        let mul = (splitmix(seed ^ i as u64) | 1) % blocks.max(1);
        let mul = if gcd(mul, blocks) == 1 { mul } else { 1 };
        let add = splitmix(seed.wrapping_add(i as u64)) % blocks.max(1);
        for k in 0..n {
            let b = (k.wrapping_mul(mul) + add) % blocks;
            block_content(b, u64::MAX - k, &mut buf);
            d.write_at(&buf, b * 4096, false)
                .with_context(|| format!("writing disk {name}"))?;
        }
        total += n;
    }
    Ok(total)
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The standby's disk replicas, opened (created if missing).
pub fn open_standby_disks(a: &ReceiveDiskArgs) -> anyhow::Result<Vec<(String, DiskTier)>> {
    if a.disks.is_empty() {
        return Ok(Vec::new());
    }
    let dir = a
        .disk_dir
        .clone()
        .context("--disk needs --disk-dir for the disk replicas")?;
    let mut out = Vec::new();
    for (name, size) in &a.disks {
        if *size == 0 || size % 4096 != 0 {
            bail!("disk {name}: {size} bytes is not a non-zero multiple of 4096");
        }
        let d = dir.join(name);
        let tier = DiskTier::open(&d, size / 4096)
            .with_context(|| format!("opening the replica of disk {name} in {}", d.display()))?;
        out.push((name.clone(), tier));
    }
    Ok(out)
}

/// Stand-in guest disk I/O at the standby: random block reads until each disk is complete.
pub struct DiskReaders {
    threads: Vec<JoinHandle<u64>>,
    stop: Arc<AtomicBool>,
    errors: Arc<AtomicU64>,
}

impl DiskReaders {
    pub fn start(disks: Vec<Arc<PostcopyDisk<RawFile>>>, per_disk: usize) -> DiskReaders {
        let stop = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for (i, d) in disks.into_iter().enumerate() {
            for t in 0..per_disk {
                let (d, stop, errors) = (d.clone(), stop.clone(), errors.clone());
                threads.push(std::thread::spawn(move || {
                    let blocks = d.size() / 4096;
                    let mut buf = vec![0u8; 4096];
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) && !d.is_complete() {
                        let b = splitmix((i as u64) << 40 ^ (t as u64) << 32 ^ n) % blocks;
                        if d.read_at(&mut buf, b * 4096).is_err() {
                            errors.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        n += 1;
                    }
                    n
                }));
            }
        }
        DiskReaders {
            threads,
            stop,
            errors,
        }
    }

    /// Stops the readers: the reads made and the reads that failed.
    pub fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let reads = self.threads.into_iter().filter_map(|t| t.join().ok()).sum();
        (reads, self.errors.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_arguments_parse_and_refuse_clearly() {
        assert_eq!(
            parse_disk_size("vda=16M").unwrap(),
            ("vda".to_string(), 16 << 20)
        );
        assert!(parse_disk_size("vda").unwrap_err().contains("NAME=VALUE"));
        assert!(parse_disk_path("=x").is_err());
        assert_eq!(parse_block_size("64K").unwrap().bytes(), 65536);
        assert!(parse_block_size("3K").is_err());
    }

    #[test]
    fn dirtying_writes_exactly_the_share_of_distinct_blocks_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1000 * 4096)
            .unwrap();
        let disks = SourceDisks {
            disks: vec![(
                "vda".into(),
                Arc::new(Tracked::new(
                    RawFile::open(&path, false).unwrap(),
                    BlockSize::DEFAULT,
                )),
            )],
        };
        assert_eq!(dirty_disks(&disks, 5.0, 7).unwrap(), 50);
        assert_eq!(disks.disks[0].1.tracker().harvest().len(), 50);
    }
}
