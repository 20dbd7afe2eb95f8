//! `faultline disk serve`: a raw disk image exported over NBD (`disk::nbd`) or served to a
//! VMM as a vhost-user-blk device (`disk::vhost_user`), with write tracking on; when it
//! stops (SIGTERM or SIGINT; for vhost-user also the frontend leaving) the blocks written
//! are reported.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgGroup, Args, Subcommand};
use disk::nbd::{BlockSizes, Server, ServerConfig, Stats};
use disk::vhost_user::{BlkListener, BlkOptions, BlkStats, Ended, StopHandle, VhostUserBlk};
use disk::{BlockDevice, BlockSize, RawFile, Tracked, WriteTracker};
use serde::Serialize;

use super::parse_bytes;

#[derive(Args, Debug)]
pub struct DiskArgs {
    #[command(subcommand)]
    pub command: DiskCommand,
}

#[derive(Subcommand, Debug)]
pub enum DiskCommand {
    /// Export a raw image over NBD, or serve it to a VMM over vhost-user-blk, with write
    /// tracking; on SIGTERM or SIGINT (vhost-user: also when the VMM leaves) stop and
    /// report the blocks written.
    Serve(ServeArgs),
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("listen").required(true).multiple(true).args(["nbd_unix", "nbd_tcp", "vhost_user"])))]
pub struct ServeArgs {
    /// The raw disk image (a whole number of 4 KiB blocks).
    #[arg(long)]
    pub image: PathBuf,
    /// NBD: listen on this Unix socket; clients use `nbd+unix:///NAME?socket=PATH`.
    #[arg(long)]
    pub nbd_unix: Option<PathBuf>,
    /// NBD: listen on this TCP address (port 0 picks one); clients use
    /// `nbd://HOST:PORT/NAME`.
    #[arg(long)]
    pub nbd_tcp: Option<SocketAddr>,
    /// vhost-user-blk: listen on this Unix socket for a VMM (QEMU: `-chardev
    /// socket,path=PATH -device vhost-user-blk-pci`); serves one VMM, and stops when it
    /// disconnects. A stale socket file there is replaced. Not with the NBD listeners.
    #[arg(long, conflicts_with_all = ["nbd_unix", "nbd_tcp", "export"])]
    pub vhost_user: Option<PathBuf>,
    /// Refuse writes (NBD: clients see NBD_FLAG_READ_ONLY; vhost-user: VIRTIO_BLK_F_RO).
    #[arg(long)]
    pub read_only: bool,
    /// NBD: the export's name; clients asking for the default export ("") get it too.
    #[arg(long, default_value = "")]
    pub export: String,
    /// vhost-user: the serial number the guest reads (GET_ID), at most 20 bytes.
    #[arg(long, default_value = "faultline", requires = "vhost_user")]
    pub serial: String,
    /// vhost-user: the logical block size the guest sees (virtio-blk `blk_size`): 512,
    /// 1024, 2048 or 4096.
    #[arg(long, default_value_t = 512, requires = "vhost_user")]
    pub logical_block_size: u32,
    /// vhost-user: threads that run requests (a read that blocks holds one of them).
    #[arg(long, default_value_t = 4, requires = "vhost_user")]
    pub workers: usize,
    /// vhost-user: request queues (the guest uses at most one per vCPU).
    #[arg(long, default_value_t = 1, requires = "vhost_user")]
    pub queues: u16,
    /// Granularity of write tracking (a power of two from 4K to 1M); NBD also advertises
    /// it as the preferred block size.
    #[arg(long, value_parser = parse_block_size, default_value = "4096")]
    pub block_size: BlockSize,
    /// Do not track writes (to measure what tracking costs).
    #[arg(long)]
    pub no_track: bool,
    /// Print one JSON object at exit instead of text (on stdout; `listening on` lines go to
    /// stderr either way).
    #[arg(long)]
    pub json: bool,
}

fn parse_block_size(s: &str) -> Result<BlockSize, String> {
    let bytes = parse_bytes(s)?;
    u32::try_from(bytes)
        .ok()
        .and_then(BlockSize::new)
        .ok_or_else(|| format!("{s:?} is not a power of two from 4K to 1M"))
}

/// The image served and what was written to it: the part of both reports that is the same.
#[derive(Debug, Serialize)]
pub struct ImageReport {
    pub image: String,
    pub size_bytes: u64,
    pub read_only: bool,
    /// Whether writes were tracked.
    pub tracking: bool,
    /// The tracking granularity in bytes.
    pub block_size: u64,
    /// Blocks written (by writes, trims / discards and write-zeroes) while it served;
    /// `null` without tracking.
    pub blocks_written: Option<u64>,
    /// The written blocks as inclusive `[first, last]` ranges of block indices, ascending.
    pub written_ranges: Option<Vec<[u64; 2]>>,
}

impl ImageReport {
    fn new(a: &ServeArgs, size_bytes: u64, tracker: Option<&WriteTracker>) -> ImageReport {
        let written_ranges = tracker.map(|t| ranges(&t.harvest()));
        ImageReport {
            image: a.image.display().to_string(),
            size_bytes,
            read_only: a.read_only,
            tracking: tracker.is_some(),
            block_size: a.block_size.bytes(),
            blocks_written: written_ranges
                .as_ref()
                .map(|r| r.iter().map(|[a, b]| b - a + 1).sum()),
            written_ranges,
        }
    }
}

/// What `faultline disk serve --json` prints when it stops.
#[derive(Debug, Serialize)]
pub struct ServeOutput {
    #[serde(flatten)]
    pub disk: ImageReport,
    pub export: String,
    /// Where it listened, as NBD URIs.
    pub listen: Vec<String>,
    /// What the NBD server did.
    pub nbd: Stats,
    /// Why it stopped.
    pub stopped_by: String,
}

/// What `faultline disk serve --vhost-user --json` prints when it stops (the NBD report's
/// fields where they apply).
#[derive(Debug, Serialize)]
pub struct VhostServeOutput {
    #[serde(flatten)]
    pub disk: ImageReport,
    /// The vhost-user socket it listened on.
    pub socket: String,
    /// What the device saw.
    pub vhost_user: BlkStats,
    /// `disconnected` (the frontend went away) or `stopped` (a signal).
    pub ended: Ended,
    /// Why it stopped, in words.
    pub stopped_by: String,
}

pub fn run(a: DiskArgs) -> anyhow::Result<ExitCode> {
    match a.command {
        DiskCommand::Serve(a) => match a.vhost_user.clone() {
            Some(socket) => serve_vhost(a, &socket),
            None => serve(a),
        },
    }
}

/// A device and, when writes are tracked, its tracker.
type Device = (Arc<dyn BlockDevice>, Option<Arc<WriteTracker>>);

/// The image as a device, tracked unless `--no-track`.
fn open_device(a: &ServeArgs) -> anyhow::Result<Device> {
    let image = RawFile::open(&a.image, a.read_only)?;
    Ok(if a.no_track {
        (Arc::new(image), None)
    } else {
        let tracked = Tracked::new(image, a.block_size);
        let tracker = tracked.tracker().clone();
        (Arc::new(tracked), Some(tracker))
    })
}

fn serve(a: ServeArgs) -> anyhow::Result<ExitCode> {
    let (device, tracker) = open_device(&a)?;
    let size = device.size();
    let block_sizes = BlockSizes::new(
        1,
        a.block_size.bytes() as u32,
        BlockSizes::DEFAULT.max_payload(),
    )
    .context("the block size does not fit NBD's size constraints")?;
    let server = Server::new(
        device,
        ServerConfig {
            export_name: a.export.clone(),
            block_sizes,
            ..ServerConfig::default()
        },
    );
    let name = uri_name(&a.export);
    let mut listen = Vec::new();
    if let Some(path) = &a.nbd_unix {
        let path = server.serve_unix(path)?;
        listen.push(format!("nbd+unix:///{name}?socket={}", path.display()));
    }
    if let Some(addr) = a.nbd_tcp {
        let addr = server.serve_tcp(addr)?;
        listen.push(format!("nbd://{addr}/{name}"));
    }
    // Always on stderr (with --json too: stdout holds only the final object), so a parent
    // process learns a port it let the system pick.
    for uri in &listen {
        eprintln!("listening on {uri}");
    }
    let stopped_by = loop {
        if let Some(why) = super::stopper().reason() {
            break why;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    server.stop();
    let out = ServeOutput {
        disk: ImageReport::new(&a, size, tracker.as_deref()),
        export: a.export,
        listen,
        nbd: server.stats(),
        stopped_by,
    };
    if a.json {
        super::outcome::print_report(&out)?;
    } else {
        print_text(&out);
    }
    Ok(ExitCode::SUCCESS)
}

fn serve_vhost(a: ServeArgs, socket: &std::path::Path) -> anyhow::Result<ExitCode> {
    let (device, tracker) = open_device(&a)?;
    let size = device.size();
    let opts = BlkOptions {
        serial: a.serial.clone(),
        logical_block_size: a.logical_block_size,
        num_queues: a.queues,
        workers: a.workers,
        ..BlkOptions::default()
    };
    let blk = VhostUserBlk::new(device, opts)?;
    let stop = StopHandle::new().context("creating the stop event")?;
    // SIGTERM and SIGINT reach the process's stopper (see `main`); pass them on.
    let done = Arc::new(AtomicBool::new(false));
    {
        let (stop, done) = (stop.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if super::stopper().reason().is_some() {
                    stop.stop();
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
    }
    let listener = BlkListener::bind(socket)?;
    // Always on stderr (with --json too: stdout holds only the final object).
    eprintln!("listening on vhost-user {}", socket.display());
    let ended = listener.serve(blk.clone(), &stop);
    done.store(true, Ordering::Relaxed);
    let ended = ended?;

    let stopped_by = match ended {
        Ended::Disconnected => "the frontend disconnected".to_string(),
        Ended::Stopped => super::stopper()
            .reason()
            .unwrap_or_else(|| "stopped".into()),
    };
    let out = VhostServeOutput {
        disk: ImageReport::new(&a, size, tracker.as_deref()),
        socket: socket.display().to_string(),
        vhost_user: blk.stats(),
        ended,
        stopped_by,
    };
    if a.json {
        super::outcome::print_report(&out)?;
    } else {
        let s = &out.vhost_user;
        println!("stopped: {}", out.stopped_by);
        println!(
            "served {} ({} bytes{}) on vhost-user {}: {} requests ({} reads, {} writes, {} flushes, {} discards, {} write-zeroes), {} malformed, {} unanswered, {} unsupported, {} disk errors",
            out.disk.image,
            out.disk.size_bytes,
            if out.disk.read_only { ", read-only" } else { "" },
            out.socket,
            s.requests,
            s.reads,
            s.writes,
            s.flushes,
            s.discards,
            s.write_zeroes,
            s.malformed,
            s.unanswered,
            s.unsupported,
            s.disk_errors,
        );
        print_written(
            out.disk.block_size,
            &out.disk.blocks_written,
            &out.disk.written_ranges,
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The export name as it appears in an NBD URI's path.
fn uri_name(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Ascending block indices as inclusive runs.
fn ranges(blocks: &[u64]) -> Vec<[u64; 2]> {
    let mut out: Vec<[u64; 2]> = Vec::new();
    for &b in blocks {
        match out.last_mut() {
            Some(r) if r[1] + 1 == b => r[1] = b,
            _ => out.push([b, b]),
        }
    }
    out
}

fn print_text(o: &ServeOutput) {
    println!("stopped: {}", o.stopped_by);
    println!(
        "served {} ({} bytes{}) to {} connection(s): {} reads, {} writes, {} flushes, {} trims, {} write-zeroes, {} errors",
        o.disk.image,
        o.disk.size_bytes,
        if o.disk.read_only { ", read-only" } else { "" },
        o.nbd.connections,
        o.nbd.reads,
        o.nbd.writes,
        o.nbd.flushes,
        o.nbd.trims,
        o.nbd.write_zeroes,
        o.nbd.errors,
    );
    print_written(
        o.disk.block_size,
        &o.disk.blocks_written,
        &o.disk.written_ranges,
    );
}

fn print_written(block_size: u64, written: &Option<u64>, ranges: &Option<Vec<[u64; 2]>>) {
    match (written, ranges) {
        (Some(n), Some(r)) => {
            let list: Vec<String> = r
                .iter()
                .map(|[a, b]| {
                    if a == b {
                        format!("{a}")
                    } else {
                        format!("{a}-{b}")
                    }
                })
                .collect();
            println!(
                "blocks written ({block_size} bytes each): {n}{}{}",
                if list.is_empty() { "" } else { ": " },
                list.join(", ")
            );
        }
        _ => println!("writes were not tracked"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_names() {
        assert_eq!(ranges(&[]), Vec::<[u64; 2]>::new());
        assert_eq!(ranges(&[0, 1, 2, 5, 7, 8]), vec![[0, 2], [5, 5], [7, 8]]);
        assert_eq!(uri_name("vda"), "vda");
        assert_eq!(uri_name("a b/c"), "a%20b%2Fc");
        assert!(parse_block_size("64K").is_ok());
        assert!(parse_block_size("1000").is_err());
        assert!(parse_block_size("8M").is_err());
    }
}
