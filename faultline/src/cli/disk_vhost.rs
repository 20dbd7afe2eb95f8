//! `faultline disk-vhost`: serves a raw disk image to a VMM as a virtio-blk device over a
//! vhost-user socket (`disk::vhost_user`), tracking the blocks the guest writes
//! (`disk::Tracked`). It serves one frontend; when the frontend disconnects, or on SIGTERM
//! or SIGINT, it prints the blocks written (with `--json` as one JSON object) and exits 0.
//!
//! (To be folded into `faultline disk serve --vhost-user PATH` beside the NBD front end.)

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use disk::vhost_user::{BlkListener, BlkOptions, BlkStats, Ended, StopHandle, VhostUserBlk};
use disk::{BlockDevice, BlockSize, RawFile, Tracked};
use serde::Serialize;

use super::parse_bytes;

#[derive(Args, Debug)]
pub struct DiskVhostArgs {
    /// Raw disk image to serve (its size, a multiple of 4096 bytes, is the disk's).
    #[arg(long)]
    pub image: PathBuf,
    /// Unix socket to listen on; the VMM connects to it (QEMU: `-chardev socket,path=`).
    /// A stale socket file there is replaced.
    #[arg(long)]
    pub socket: PathBuf,
    /// Serve the disk read-only (VIRTIO_BLK_F_RO; writes fail).
    #[arg(long)]
    pub read_only: bool,
    /// The serial number the guest reads (GET_ID), at most 20 bytes.
    #[arg(long, default_value = "faultline")]
    pub serial: String,
    /// Granularity of write tracking (a power of two from 4K to 1M), as `disk serve`'s.
    #[arg(long, value_parser = parse_block_size, default_value = "4096")]
    pub block_size: BlockSize,
    /// The logical block size the guest sees (virtio-blk `blk_size`): 512, 1024, 2048 or
    /// 4096.
    #[arg(long, default_value_t = 512)]
    pub logical_block_size: u32,
    /// Threads that run requests: a read that blocks holds one of them.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Request queues (the guest uses at most one per vCPU).
    #[arg(long, default_value_t = 1)]
    pub queues: u16,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What `disk-vhost --json` prints when it ends (the fields `disk serve` has, where they
/// apply).
#[derive(Serialize)]
struct Report {
    image: String,
    /// The vhost-user socket it listened on.
    socket: String,
    size_bytes: u64,
    read_only: bool,
    /// Writes are always tracked here.
    tracking: bool,
    /// The tracking granularity in bytes.
    block_size: u64,
    /// Blocks written (by writes, discards and write-zeroes) while it served.
    blocks_written: u64,
    /// The written blocks as inclusive `[first, last]` ranges of block indices, ascending.
    written_ranges: Vec<[u64; 2]>,
    /// What the device saw.
    vhost_user: BlkStats,
    /// `disconnected` (the frontend went away) or `stopped` (a signal).
    ended: Ended,
    /// Why it stopped, in words.
    stopped_by: String,
}

fn parse_block_size(s: &str) -> Result<BlockSize, String> {
    let bytes = parse_bytes(s)?;
    u32::try_from(bytes)
        .ok()
        .and_then(BlockSize::new)
        .ok_or_else(|| format!("{s:?} is not a power of two from 4K to 1M"))
}

pub fn run(a: DiskVhostArgs) -> anyhow::Result<ExitCode> {
    let track = a.block_size;
    let raw = RawFile::open(&a.image, a.read_only)?;
    let size = raw.size();
    let tracked = Tracked::new(raw, track);
    let tracker = tracked.tracker().clone();
    let opts = BlkOptions {
        serial: a.serial.clone(),
        logical_block_size: a.logical_block_size,
        num_queues: a.queues,
        workers: a.workers,
        ..BlkOptions::default()
    };
    let blk = VhostUserBlk::new(Arc::new(tracked), opts)?;

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
    let listener = BlkListener::bind(&a.socket)?;
    // Always on stderr (with --json too: stdout holds only the final object).
    eprintln!("listening on vhost-user {}", a.socket.display());
    let ended = listener.serve(blk.clone(), &stop);
    done.store(true, Ordering::Relaxed);
    let ended = ended?;

    let blocks = tracker.harvest();
    let stopped_by = match ended {
        Ended::Disconnected => "the frontend disconnected".to_string(),
        Ended::Stopped => super::stopper()
            .reason()
            .unwrap_or_else(|| "stopped".into()),
    };
    let report = Report {
        image: a.image.display().to_string(),
        socket: a.socket.display().to_string(),
        size_bytes: size,
        read_only: a.read_only,
        tracking: true,
        block_size: track.bytes(),
        blocks_written: blocks.len() as u64,
        written_ranges: ranges(&blocks),
        vhost_user: blk.stats(),
        ended,
        stopped_by,
    };
    if a.json {
        super::outcome::print_report(&report)?;
    } else {
        let s = &report.vhost_user;
        println!("stopped: {}", report.stopped_by);
        println!(
            "served {} ({} bytes{}) on {}: {} requests ({} reads, {} writes, {} flushes, {} discards, {} write-zeroes), {} malformed, {} unanswered, {} unsupported, {} disk errors",
            report.image,
            report.size_bytes,
            if report.read_only { ", read-only" } else { "" },
            report.socket,
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
        println!(
            "{} blocks of {} bytes written",
            report.blocks_written, report.block_size
        );
    }
    Ok(ExitCode::SUCCESS)
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

#[cfg(test)]
mod tests {
    #[test]
    fn blocks_become_inclusive_runs() {
        assert_eq!(
            super::ranges(&[0, 1, 2, 5, 7, 8]),
            vec![[0, 2], [5, 5], [7, 8]]
        );
        assert!(super::ranges(&[]).is_empty());
    }
}
