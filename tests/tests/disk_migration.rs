//! A VM's memory and its disk move in one session, with the guest doing disk I/O at the
//! destination while postcopy runs: every read returns the source's data (never the stale
//! bytes the destination's file held), writes made at the destination survive late
//! arrivals, and at the end memory and disk equal the source's (plus the destination's
//! writes) by digest. Real userfaultfd memory, real QUIC on loopback, real files.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use disk::{BlockDevice, RawFile};
use faultline_tests::Certs;
use transport::message::Layout;
use uffd_core::GuestMemory;
use vmm_shim::disks::{with_disks, DestDisk, SourceDisk};
use vmm_shim::replica::PausedMemory;
use vmm_shim::{DestOptions, Listener, SourceOptions};

const MEMORY: usize = 8 << 20;
const DISK: u64 = 32 << 20;
const BLOCK: u64 = 4096;
const BLOCKS: u64 = DISK / BLOCK;

/// The source disk's block `b`: distinct per block, every 5th block zero.
fn source_block(b: u64) -> Vec<u8> {
    if b.is_multiple_of(5) {
        return vec![0; BLOCK as usize];
    }
    (0..BLOCK)
        .map(|i| (b.wrapping_mul(31) ^ (i / 8)) as u8)
        .collect()
}

fn write_image(path: &Path, block: impl Fn(u64) -> Vec<u8>) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for b in 0..BLOCKS {
        f.write_all(&block(b)).unwrap();
    }
}

fn digest_file(path: &Path) -> String {
    vmm_shim::digest::digest(&std::fs::read(path).unwrap())
}

fn memory_with_pattern() -> GuestMemory {
    let m = GuestMemory::anonymous(MEMORY).unwrap();
    // SAFETY: the mapping is ours and nothing else uses it yet.
    let bytes = unsafe { std::slice::from_raw_parts_mut(m.as_ptr(), m.len()) };
    for (i, chunk) in bytes.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&(i as u64 * 0x9E37_79B9).to_le_bytes());
    }
    m
}

fn memory_digest(m: &GuestMemory) -> String {
    // SAFETY: the session is over (userfaultfd unregistered); nothing writes the mapping.
    let bytes = unsafe { std::slice::from_raw_parts(m.as_ptr(), m.len()) };
    vmm_shim::digest::digest(bytes)
}

/// What the destination's guest did to the disk, to compare the result with.
struct GuestIo {
    /// (block, byte) written whole at the destination.
    whole: Vec<(u64, u8)>,
    /// (offset, bytes) written partly.
    partial: Vec<(u64, Vec<u8>)>,
}

/// The destination's guest: reads blocks all over the disk (checking each against the
/// source), writes some whole blocks near the end (likely before the push reaches them)
/// and some partial ones, then reads the whole disk when `read_all`.
fn guest_io(dev: &dyn BlockDevice, read_all: bool) -> GuestIo {
    let mut buf = vec![0u8; 3 * BLOCK as usize];
    let mut io = GuestIo {
        whole: Vec::new(),
        partial: Vec::new(),
    };
    for i in 0..64u64 {
        let b = (i * 2654435761) % (BLOCKS - 3);
        if b >= BLOCKS - 64 {
            continue; // the blocks written below
        }
        dev.read_at(&mut buf, b * BLOCK).unwrap();
        for k in 0..3 {
            let got = &buf[(k * BLOCK) as usize..((k + 1) * BLOCK) as usize];
            assert!(got == source_block(b + k), "block {} differs", b + k);
        }
    }
    for b in BLOCKS - 32..BLOCKS {
        let byte = b as u8 | 0x80;
        dev.write_at(&vec![byte; BLOCK as usize], b * BLOCK, false)
            .unwrap();
        io.whole.push((b, byte));
    }
    for b in [7u64, 1001, 4000] {
        let data = vec![0x5A; 100];
        let offset = b * BLOCK + 1000;
        dev.write_at(&data, offset, false).unwrap();
        io.partial.push((offset, data));
    }
    if read_all {
        let mut big = vec![0u8; 1 << 20];
        for off in (0..DISK).step_by(big.len()) {
            dev.read_at(&mut big, off).unwrap();
        }
    }
    io
}

fn expected_image(path: &Path, io: &GuestIo) {
    write_image(path, source_block);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    use std::os::unix::fs::FileExt;
    for &(b, byte) in &io.whole {
        f.write_all_at(&vec![byte; BLOCK as usize], b * BLOCK)
            .unwrap();
    }
    for (off, data) in &io.partial {
        f.write_all_at(data, *off).unwrap();
    }
}

fn migrate(push: bool) -> (vmm_shim::DestReport, Arc<disk::PostcopyDisk<RawFile>>) {
    let certs = Certs::new();
    let dir = tempfile::tempdir().unwrap();
    let (src_img, dst_img, want_img) = (
        dir.path().join("src.img"),
        dir.path().join("dst.img"),
        dir.path().join("want.img"),
    );
    write_image(&src_img, source_block);
    // The destination's file holds stale bytes everywhere: none may ever be served.
    write_image(&dst_img, |_| vec![0xEE; BLOCK as usize]);

    let src_mem = memory_with_pattern();
    let dst_mem = GuestMemory::anonymous(MEMORY).unwrap();
    let listener = Listener::bind(DestOptions::new(
        "127.0.0.1:0".parse().unwrap(),
        certs.identity("dest"),
        certs.identity("source").cert,
    ))
    .unwrap();
    let addr = listener.local_addr().unwrap();
    let dest_disk = DestDisk::new("vda", RawFile::open(&dst_img, false).unwrap(), |_| false);
    let dev = dest_disk.device().clone();
    let layout = Layout::single(MEMORY as u64).with_disk("vda", DISK);
    let region = dst_mem.host_region();
    let (resumed_tx, resumed_rx) = std::sync::mpsc::channel();
    let dest = std::thread::spawn(move || {
        listener.receive_vm_with_disks(&[region], &[dest_disk], &layout, move |_| {
            let _ = resumed_tx.send(());
        })
    });
    // The guest's disk I/O starts when the destination resumes it.
    let guest_dev = dev.clone();
    let guest = std::thread::spawn(move || {
        resumed_rx.recv().unwrap();
        // Without a push, blocks come only when read: read the whole disk.
        guest_io(&*guest_dev, !push)
    });

    let src_disk = SourceDisk {
        name: "vda".into(),
        device: Arc::new(RawFile::open(&src_img, true).unwrap()),
    };
    // SAFETY: nothing writes the source memory while it is read.
    let paused = unsafe { PausedMemory::new(&[src_mem.host_region()]) }.unwrap();
    let (reader, layout) = with_disks(
        Arc::new(paused),
        &Layout::single(MEMORY as u64),
        &[src_disk],
    )
    .unwrap();
    let opts = SourceOptions {
        push,
        ..SourceOptions::new(
            addr,
            certs.identity("source"),
            certs.identity("dest").cert,
            "vm0",
        )
    };
    let source = std::thread::spawn(move || vmm_shim::send(reader, &layout, &opts));
    let io = guest.join().unwrap();
    if !push {
        // Memory moves on demand only: read every page through userfaultfd.
        let ptr = dst_mem.as_ptr() as usize;
        for off in (0..MEMORY).step_by(4096) {
            // SAFETY: inside the registered mapping; a read faults the page in.
            unsafe { std::ptr::read_volatile((ptr + off) as *const u8) };
        }
    }
    let report = dest.join().unwrap().unwrap();
    source.join().unwrap().unwrap();

    assert_eq!(memory_digest(&dst_mem), memory_digest(&src_mem));
    expected_image(&want_img, &io);
    assert_eq!(digest_file(&dst_img), digest_file(&want_img));
    (report, dev)
}

#[test]
fn memory_and_a_disk_move_in_one_session_while_the_guest_uses_the_disk() {
    let (report, dev) = migrate(true);
    let d = &report.disks[0];
    assert_eq!((d.name.as_str(), d.bytes), ("vda", DISK));
    assert_eq!((d.blocks_stale, d.blocks_from_replica), (BLOCKS, 0));
    assert!(d.disk_total_ms > 0.0, "{d:?}");
    // Zero blocks cross as flags; the rest as raw payload (less what the guest owned).
    assert!(d.disk_wire_bytes <= (BLOCKS - BLOCKS / 5) * BLOCK, "{d:?}");
    assert!(dev.is_complete());
    let s = dev.stats();
    assert_eq!(s.units_local, 0);
    assert_eq!(
        s.units_fetched + s.units_pushed + s.units_owned,
        BLOCKS,
        "{s:?}"
    );
}

#[test]
fn without_a_push_the_guest_s_reads_fetch_the_disk_on_demand() {
    let (report, dev) = migrate(false);
    let s = dev.stats();
    assert_eq!(s.units_pushed, 0, "{s:?}");
    assert_eq!(s.units_owned, 32, "{s:?}");
    assert_eq!(s.units_fetched, BLOCKS - 32, "{s:?}");
    assert!(s.reads_waited > 0 && s.wait_us_p99 > 0, "{s:?}");
    assert_eq!(report.disks[0].postcopy.units_fetched, BLOCKS - 32);
}
