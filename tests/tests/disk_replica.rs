//! A disk replicated to a standby in normal times, then evacuated with the VM's memory in
//! one session: only the blocks written since their last acknowledged replication cross;
//! the standby serves the disk from the switchover on (fresh blocks locally, stale ones
//! fetched when read), and at the end its disk equals the source's at switchover plus the
//! standby guest's writes, by digest. Real userfaultfd, QUIC on loopback, files.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use disk::{BlockDevice, BlockSize, RawFile, Tracked};
use faultline_tests::{loopback_listener, replicator_options, wait_caught_up, Certs, ShmDir};
use transport::message::Layout;
use uffd_core::{open_tracker, DiskTier, GuestMemory, MemoryTier, TrackerChoice};
use vmm_shim::disks::ReplicatedDisk;
use vmm_shim::replica::{evacuate_with_disks, PausedMemory, Replica, Replicator, StandbySink};
use vmm_shim::SourceOptions;

const MEMORY: usize = 4 << 20;
const DISK: u64 = 16 << 20;
const BLOCK: u64 = 4096;
const BLOCKS: u64 = DISK / BLOCK;

fn digest_file(path: &Path) -> String {
    vmm_shim::digest::digest(&std::fs::read(path).unwrap())
}

fn block(b: u64, salt: u8) -> Vec<u8> {
    (0..BLOCK)
        .map(|i| (b as u8).wrapping_mul(7) ^ salt ^ (i / 16) as u8)
        .collect()
}

#[test]
fn a_replicated_disk_evacuates_with_memory_moving_only_stale_blocks() {
    let d = replicate_and_evacuate(true);
    assert_eq!(
        d.postcopy.units_fetched + d.postcopy.units_pushed + d.postcopy.units_owned,
        101
    );
}

#[test]
fn without_a_push_the_standby_fetches_stale_blocks_as_its_guest_reads_them() {
    let d = replicate_and_evacuate(false);
    let p = &d.postcopy;
    assert_eq!(
        (p.units_fetched, p.units_pushed, p.units_owned),
        (101, 0, 0),
        "{d:?}"
    );
    assert!(p.reads_waited >= 100 && p.wait_us_p99 > 0, "{d:?}");
}

#[test]
fn a_standby_restarted_with_a_torn_block_serves_it_from_the_source() {
    let d = replicate_and_evacuate_with(true, true);
    // The 101 dirtied blocks and the one torn while the standby was down.
    assert_eq!(d.blocks_stale, 102, "{d:?}");
}

/// A running standby with memory and disk replicas.
struct Standby {
    addr: std::net::SocketAddr,
    sink: Arc<StandbySink>,
    thread: std::thread::JoinHandle<Result<vmm_shim::StandbyReport, vmm_shim::RoleError>>,
    stopper: vmm_shim::Stopper,
    resumed: std::sync::mpsc::Receiver<()>,
}

impl Standby {
    /// Starts a standby on a new port; `create` starts from empty replicas, otherwise the
    /// existing ones are opened (a restart).
    fn start(certs: &Certs, shm: &ShmDir, dir: &Path, layout: &Layout, create: bool) -> Standby {
        let pages = (MEMORY / 4096) as u64;
        let (memory, disk) = if create {
            (
                MemoryTier::create(&shm.0, pages).unwrap(),
                DiskTier::create(dir.join("vda-replica"), BLOCKS).unwrap(),
            )
        } else {
            (
                MemoryTier::open(&shm.0, pages).unwrap(),
                DiskTier::open(dir.join("vda-replica"), BLOCKS).unwrap(),
            )
        };
        let sink = Arc::new(StandbySink::with_disks(
            Replica::Memory(memory),
            vec![("vda".into(), disk)],
        ));
        let (listener, stopper, addr) = loopback_listener(certs, "vm0");
        let (resumed_tx, resumed) = std::sync::mpsc::channel();
        let thread = {
            let (sink, layout) = (sink.clone(), layout.clone());
            std::thread::spawn(move || {
                listener.serve_standby(sink, &layout, move |_, _| {
                    let _ = resumed_tx.send(());
                })
            })
        };
        Standby {
            addr,
            sink,
            thread,
            stopper,
            resumed,
        }
    }
}

fn replicate_and_evacuate(push: bool) -> vmm_shim::disks::DiskReport {
    replicate_and_evacuate_with(push, false)
}

/// Replicates, dirties 101 blocks after the last harvest, evacuates (with the push or
/// not) while the standby's guest reads and writes; checks digests; the disk's report.
/// With `restart`, the standby is stopped after replication, one block of its disk
/// replica is torn, and it is started again from its files before the evacuation.
fn replicate_and_evacuate_with(push: bool, restart: bool) -> vmm_shim::disks::DiskReport {
    let certs = Certs::new();
    let dir = tempfile::tempdir().unwrap();
    let shm = ShmDir::new("disk-replica");
    let src_img = dir.path().join("src.img");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src_img).unwrap());
        for b in 0..BLOCKS {
            f.write_all(&block(b, 1)).unwrap();
        }
    }

    // The standby: a memory replica on tmpfs and a disk replica on a disk filesystem.
    let layout = Layout::single(MEMORY as u64).with_disk("vda", DISK);
    let mut standby = Standby::start(&certs, &shm, dir.path(), &layout, true);
    let addr = standby.addr;

    // The source: memory and a tracked disk, replicated until the standby holds it all.
    let memory = GuestMemory::anonymous(MEMORY).unwrap();
    let regions = [memory.host_region()];
    let disk = Arc::new(Tracked::new(
        RawFile::open(&src_img, false).unwrap(),
        BlockSize::DEFAULT,
    ));
    let disks = [ReplicatedDisk::tracked("vda", disk.clone())];
    let epoch = 0x5eed_u64;
    let tracker = open_tracker(&regions, TrackerChoice::Auto).unwrap();
    let replicator = Replicator::start_with_disks(
        &regions,
        &disks,
        Layout::single(MEMORY as u64),
        tracker,
        replicator_options(&certs, addr, "vm0", epoch),
    )
    .unwrap();
    let caught_up = |since: u64| wait_caught_up(&replicator, since, "replication");
    let h = caught_up(0);
    // The first copy is not what the guest writes: nothing sampled for the wire ratio.
    assert_eq!(replicator.stats().written.estimate(true), None);
    // Normal times go on: the guest writes 200 blocks, replicated again before the pause
    // (so fresh at the standby), ...
    for b in (0..BLOCKS).step_by(BLOCKS as usize / 200).take(200) {
        disk.write_at(&block(b, 2), b * BLOCK, false).unwrap();
    }
    caught_up(h);
    // ... one in 16 of them sampled for what a push would make of a rewritten page
    // (these blocks are raw-sized without lz4).
    let (pages, raw) = replicator.stats().written.estimate(false).unwrap();
    assert!((10..=13).contains(&pages), "{pages}");
    assert_eq!(raw, pages * (1 + BLOCK));
    let state = replicator.stop().unwrap();
    // ... and, after the replicator's last harvest, 100 more blocks (one partly): stale.
    let stale_blocks: Vec<u64> = (0..100).map(|i| i * 37 + 5).collect();
    for &b in &stale_blocks {
        disk.write_at(&block(b, 3), b * BLOCK, false).unwrap();
    }
    disk.write_at(&[0xAB; 10], 3000 * BLOCK + 7, false).unwrap();
    let src_at_switchover = digest_file(&src_img);

    if restart {
        // The standby goes down; a block of its disk replica is torn meanwhile (2001 is
        // fresh: written once, replicated, never dirtied); it comes back from its files.
        standby.stopper.stop("maintenance");
        assert!(standby.thread.join().unwrap().is_err());
        drop(standby.sink);
        let image = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("vda-replica").join("memory.img"))
            .unwrap();
        image.write_all_at(b"torn", 2001 * BLOCK + 100).unwrap();
        standby = Standby::start(&certs, &shm, dir.path(), &layout, false);
        assert_eq!(standby.sink.torn_pages(), 0, "memory replica intact");
    }
    let addr = standby.addr;

    // Evacuate. The standby's guest reads stale and fresh blocks and writes some.
    let guest = {
        let sink = standby.sink.clone();
        let stale = stale_blocks.clone();
        let resumed_rx = std::mem::replace(&mut standby.resumed, std::sync::mpsc::channel().1);
        std::thread::spawn(move || {
            resumed_rx.recv().unwrap();
            let devs = sink.disk_devices();
            assert_eq!(devs.len(), 1);
            let dev = devs[0].1.clone();
            let mut buf = vec![0u8; BLOCK as usize];
            // Without a push, blocks come only when read: read all the stale ones.
            let n = if push { 20 } else { stale.len() };
            if !push {
                dev.read_at(&mut buf, 3000 * BLOCK).unwrap();
            }
            for &b in stale.iter().take(n) {
                dev.read_at(&mut buf, b * BLOCK).unwrap();
                assert!(buf == block(b, 3), "stale block {b} served wrong");
            }
            dev.read_at(&mut buf, BLOCK).unwrap();
            assert!(buf == block(1, 1));
            dev.read_at(&mut buf, 2001 * BLOCK).unwrap();
            assert!(buf == block(2001, 1), "the torn block was served");
            dev.write_at(&[0xCD; BLOCK as usize], 4000 * BLOCK, false)
                .unwrap();
            dev.write_at(&[0xCD; BLOCK as usize], stale[99] * BLOCK, false)
                .unwrap();
            dev
        })
    };
    // SAFETY: nothing writes the source memory from here on.
    let paused = unsafe { PausedMemory::new(&regions) }.unwrap();
    let opts = SourceOptions {
        push,
        ..SourceOptions::new(
            addr,
            certs.identity("source"),
            certs.identity("dest").cert,
            "vm0",
        )
    };
    let sent = evacuate_with_disks(
        paused,
        &disks,
        &Layout::single(MEMORY as u64),
        state,
        epoch,
        &opts,
        None,
    )
    .unwrap();
    let dev = guest.join().unwrap();
    let report = standby.thread.join().unwrap().unwrap();

    // Only stale blocks crossed: the 100 written after the last harvest and the partly
    // written one (and with `restart` the torn one).
    let d = &report.disks[0];
    let n = if restart { 102 } else { 101 };
    assert_eq!(d.blocks_stale, n, "{d:?}");
    assert_eq!(d.blocks_from_replica, BLOCKS - n, "{d:?}");
    assert!(d.disk_wire_bytes <= n * BLOCK, "{d:?}");
    assert!(
        sent.pages_stale_source >= 101,
        "{}",
        sent.pages_stale_source
    );
    assert!(dev.is_complete());

    // The standby's disk is the source's at switchover plus the standby guest's writes.
    let want = dir.path().join("want.img");
    std::fs::copy(&src_img, &want).unwrap();
    assert_eq!(digest_file(&want), src_at_switchover);
    let f = std::fs::OpenOptions::new().write(true).open(&want).unwrap();
    f.write_all_at(&[0xCD; BLOCK as usize], 4000 * BLOCK)
        .unwrap();
    f.write_all_at(&[0xCD; BLOCK as usize], stale_blocks[99] * BLOCK)
        .unwrap();
    let standby_img = dir.path().join("vda-replica").join("memory.img");
    assert_eq!(digest_file(&standby_img), digest_file(&want));
    // And memory arrived whole.
    let dst = standby.sink.guest_region().unwrap();
    // SAFETY: the evacuation is over (userfaultfd unregistered); nothing writes either side.
    let (a, b) = unsafe {
        (
            std::slice::from_raw_parts(memory.as_ptr(), MEMORY),
            std::slice::from_raw_parts(dst.host_addr() as *const u8, MEMORY),
        )
    };
    assert_eq!(vmm_shim::digest::digest(a), vmm_shim::digest::digest(b));
    d.clone()
}
