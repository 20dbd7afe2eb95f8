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
use disk::vhost_user::{serve, BlkOptions, BlkStats, Ended, StopHandle, VhostUserBlk};
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
    /// The logical block size the guest sees (blk_size): 512, 1024, 2048 or 4096.
    #[arg(long, default_value_t = 512)]
    pub block_size: u32,
    /// The granularity at which writes are tracked and reported, 4K to 1M (a power of
    /// two): what replication would move.
    #[arg(long, value_parser = parse_bytes, default_value = "4096")]
    pub track_block_size: u64,
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

/// What `disk-vhost` prints when it ends.
#[derive(Serialize)]
struct Report {
    image: PathBuf,
    socket: PathBuf,
    size: u64,
    read_only: bool,
    /// `disconnected` (the frontend went away) or `stopped` (a signal).
    ended: Ended,
    /// The signal's reason, when stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// The tracking granularity in bytes.
    track_block_size: u64,
    /// Blocks written, trimmed or zeroed while served.
    blocks_written: u64,
    /// The same blocks as half-open index ranges `[first, end)`, ascending.
    written: Vec<[u64; 2]>,
    /// Requests seen, and how many failed and why.
    requests: BlkStats,
}

pub fn run(a: DiskVhostArgs) -> anyhow::Result<ExitCode> {
    let track = u32::try_from(a.track_block_size)
        .ok()
        .and_then(BlockSize::new)
        .with_context(|| {
            format!(
                "--track-block-size {}: a power of two from 4K to 1M",
                a.track_block_size
            )
        })?;
    let raw = RawFile::open(&a.image, a.read_only)?;
    let size = raw.size();
    let tracked = Tracked::new(raw, track);
    let tracker = tracked.tracker().clone();
    let opts = BlkOptions {
        serial: a.serial.clone(),
        logical_block_size: a.block_size,
        num_queues: a.queues,
        workers: a.workers,
        ..BlkOptions::default()
    };
    let blk = VhostUserBlk::new(Arc::new(tracked), opts)
        .context("--serial, --block-size, --queues or --workers")?;
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
    eprintln!(
        "faultline disk-vhost: serving {} ({size} bytes{}) on {}",
        a.image.display(),
        if a.read_only { ", read-only" } else { "" },
        a.socket.display()
    );
    let ended = serve(&a.socket, blk.clone(), &stop);
    done.store(true, Ordering::Relaxed);
    let ended = ended?;

    let blocks = tracker.harvest();
    let report = Report {
        image: a.image,
        socket: a.socket,
        size,
        read_only: a.read_only,
        ended,
        reason: super::stopper().reason(),
        track_block_size: track.bytes(),
        blocks_written: blocks.len() as u64,
        written: ranges(&blocks),
        requests: blk.stats(),
    };
    if a.json {
        super::outcome::print_report(&report)?;
    } else {
        let how = match report.ended {
            Ended::Disconnected => "the frontend disconnected".to_string(),
            Ended::Stopped => report.reason.clone().unwrap_or_else(|| "stopped".into()),
        };
        println!(
            "{how}: {} blocks of {} bytes written; {} requests ({} malformed, {} unanswered, {} unsupported, {} disk errors)",
            report.blocks_written,
            report.track_block_size,
            report.requests.requests,
            report.requests.malformed,
            report.requests.unanswered,
            report.requests.unsupported,
            report.requests.disk_errors,
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Ascending block indices as half-open ranges.
fn ranges(blocks: &[u64]) -> Vec<[u64; 2]> {
    let mut out: Vec<[u64; 2]> = Vec::new();
    for &b in blocks {
        match out.last_mut() {
            Some(r) if r[1] == b => r[1] = b + 1,
            _ => out.push([b, b + 1]),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn blocks_become_ranges() {
        assert_eq!(
            super::ranges(&[0, 1, 2, 5, 7, 8]),
            vec![[0, 3], [5, 6], [7, 9]]
        );
        assert!(super::ranges(&[]).is_empty());
    }
}
