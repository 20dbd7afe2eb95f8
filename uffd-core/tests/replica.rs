//! Replica store tests on real files: memory tier on /dev/shm, disk tier on /tmp.

mod common;

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tempfile::TempDir;
use uffd_core::replica::{
    present_page_table, DiskTier, MemoryTier, ReplicaError, ReplicaStore, Tier,
};
use uffd_core::{Destination, PAGE_SIZE};

const TIMEOUT: Duration = Duration::from_secs(30);
const INDEX_HEADER: u64 = 4096;

fn shm_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("replica-test-")
        .tempdir_in("/dev/shm")
        .unwrap()
}

fn disk_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("replica-test-")
        .tempdir_in(std::env::temp_dir())
        .unwrap()
}

/// Replica content of `page` at `version`; differs from `common::content`.
fn page_data(page: u64, version: u64) -> Vec<u8> {
    let mut v = vec![0u8; PAGE_SIZE];
    let mut x =
        page.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ version.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    for chunk in v.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    v[..8].copy_from_slice(&page.to_le_bytes());
    v[8..16].copy_from_slice(&version.to_le_bytes());
    v
}

fn batch(first: u64, n: u64, version: impl Fn(u64) -> u64) -> (Vec<u64>, Vec<u8>) {
    let versions: Vec<u64> = (first..first + n).map(&version).collect();
    let data = (first..first + n)
        .flat_map(|p| page_data(p, version(p)))
        .collect();
    (versions, data)
}

fn open_tier(tier: Tier, dir: &Path, pages: u64) -> Result<Box<dyn ReplicaStore>, ReplicaError> {
    Ok(match tier {
        Tier::Memory => Box::new(MemoryTier::open(dir, pages)?),
        Tier::Disk => Box::new(DiskTier::open(dir, pages)?),
    })
}

fn dir_for(tier: Tier) -> TempDir {
    match tier {
        Tier::Memory => shm_dir(),
        Tier::Disk => disk_dir(),
    }
}

fn read_back(s: &dyn ReplicaStore, page: u64) -> Option<(u64, Vec<u8>)> {
    let mut buf = vec![0u8; PAGE_SIZE];
    s.read(page, &mut buf).unwrap().map(|v| (v, buf))
}

fn roundtrip(tier: Tier) {
    let dir = dir_for(tier);
    let s = open_tier(tier, dir.path(), 64).unwrap();
    assert_eq!(s.tier(), tier);
    assert_eq!(s.total_pages(), 64);
    assert_eq!(s.epoch(), 0);
    let (versions, data) = batch(4, 8, |p| p + 100);
    assert!(matches!(
        s.store(4, &versions, &data),
        Err(ReplicaError::NoEpoch)
    ));
    s.set_epoch(0xfeed).unwrap();
    s.store(4, &versions, &data).unwrap();
    // A zero page is stored like any other.
    s.store(20, &[7], &[0u8; PAGE_SIZE]).unwrap();
    s.sync().unwrap();
    for p in 0..64 {
        let want = match p {
            4..12 => p + 100,
            20 => 7,
            _ => 0,
        };
        assert_eq!(s.version(p), want, "page {p}");
        match read_back(s.as_ref(), p) {
            Some((v, bytes)) => {
                assert_eq!(v, want);
                if p == 20 {
                    assert!(bytes.iter().all(|&b| b == 0));
                } else {
                    assert_eq!(bytes, page_data(p, want));
                }
            }
            None => assert_eq!(want, 0, "page {p} should be readable"),
        }
    }
    assert_eq!(
        s.valid_pages().collect::<Vec<_>>(),
        [4, 5, 6, 7, 8, 9, 10, 11, 20]
    );
    let stale = |p: u64| p.is_multiple_of(2);
    assert_eq!(s.fresh_pages(&stale).collect::<Vec<_>>(), [5, 7, 9, 11]);
    // Overwrite with a newer version.
    let (v2, d2) = batch(5, 2, |_| 999);
    s.store(5, &v2, &d2).unwrap();
    assert_eq!(read_back(s.as_ref(), 6).unwrap(), (999, page_data(6, 999)));

    // Bad input: typed errors, nothing changes.
    let mut buf = vec![0u8; PAGE_SIZE];
    assert!(matches!(
        s.store(60, &[1; 5], &vec![0; 5 * PAGE_SIZE]),
        Err(ReplicaError::PageOutOfRange {
            page: 64,
            total: 64
        })
    ));
    assert!(matches!(
        s.store(u64::MAX, &[1, 1], &vec![0; 2 * PAGE_SIZE]),
        Err(ReplicaError::PageOutOfRange { .. })
    ));
    assert!(matches!(
        s.store(0, &[1, 2], &vec![0; PAGE_SIZE]),
        Err(ReplicaError::BadDataLength {
            len: 4096,
            expected: 8192
        })
    ));
    assert!(matches!(
        s.store(0, &[1, 0], &vec![0; 2 * PAGE_SIZE]),
        Err(ReplicaError::ZeroVersion { page: 1 })
    ));
    assert!(matches!(
        s.read(64, &mut buf),
        Err(ReplicaError::PageOutOfRange { .. })
    ));
    assert!(matches!(
        s.read(4, &mut buf[..100]),
        Err(ReplicaError::BadBufferLength { len: 100 })
    ));
    assert_eq!(s.version(64), 0);
    assert_eq!(s.version(u64::MAX), 0);
    s.store(0, &[], &[]).unwrap();
    assert_eq!(s.version(0), 0);
    assert_eq!(s.version(4), 104);

    // A second store on the same directory is refused while this one is open.
    assert!(matches!(
        open_tier(tier, dir.path(), 64),
        Err(ReplicaError::Locked { .. })
    ));

    // set_epoch: same epoch keeps everything, a new one invalidates all.
    s.set_epoch(0xfeed).unwrap();
    assert_eq!(s.version(4), 104);
    s.set_epoch(0xbeef).unwrap();
    assert_eq!(s.epoch(), 0xbeef);
    assert_eq!(s.valid_pages().count(), 0);
    assert!(read_back(s.as_ref(), 4).is_none());
    s.store(4, &[1], &page_data(4, 1)).unwrap();
    s.sync().unwrap();
    drop(s);
    // The new epoch and its single page persist.
    let s = open_tier(tier, dir.path(), 64).unwrap();
    assert_eq!(s.epoch(), 0xbeef);
    assert_eq!(s.valid_pages().collect::<Vec<_>>(), [4]);
    assert_eq!(s.torn_pages(), 0);
}

#[test]
fn roundtrip_memory_tier() {
    roundtrip(Tier::Memory);
}

#[test]
fn roundtrip_disk_tier() {
    roundtrip(Tier::Disk);
}

fn persists_across_reopen(tier: Tier) {
    let dir = dir_for(tier);
    {
        let s = open_tier(tier, dir.path(), 300).unwrap();
        s.set_epoch(42).unwrap();
        let (v, d) = batch(0, 300, |p| if p.is_multiple_of(3) { 0 } else { p * 2 + 1 });
        // Store in runs that skip every third page.
        for first in (1..300).step_by(3) {
            let n = 2.min(300 - first);
            let idx = first as usize;
            s.store(
                first,
                &v[idx..idx + n as usize],
                &d[idx * PAGE_SIZE..(idx + n as usize) * PAGE_SIZE],
            )
            .unwrap();
        }
        s.sync().unwrap();
    } // daemon "restarts"
    let s = open_tier(tier, dir.path(), 300).unwrap();
    assert_eq!(s.epoch(), 42);
    assert_eq!(s.torn_pages(), 0);
    for p in 0..300u64 {
        if p.is_multiple_of(3) {
            assert_eq!(s.version(p), 0);
        } else {
            assert_eq!(
                read_back(s.as_ref(), p).unwrap(),
                (p * 2 + 1, page_data(p, p * 2 + 1))
            );
        }
    }
    let meta = std::fs::metadata(dir.path().join("memory.img")).unwrap();
    assert_eq!(meta.len(), 300 * PAGE_SIZE as u64);
    let meta = std::fs::metadata(dir.path().join("index.bin")).unwrap();
    assert_eq!(meta.len(), INDEX_HEADER + 300 * 16);
}

#[test]
fn persists_across_reopen_memory_tier() {
    persists_across_reopen(Tier::Memory);
}

#[test]
fn persists_across_reopen_disk_tier() {
    persists_across_reopen(Tier::Disk);
}

fn populate(tier: Tier, dir: &Path, pages: u64) {
    let s = open_tier(tier, dir, pages).unwrap();
    s.set_epoch(7).unwrap();
    let (v, d) = batch(0, pages, |p| p + 1);
    s.store(0, &v, &d).unwrap();
    s.sync().unwrap();
}

fn torn_pages_detected(tier: Tier) {
    let dir = dir_for(tier);
    populate(tier, dir.path(), 32);
    // A crash mid-write: part of page 5's new content landed, its entry is old.
    let mem = OpenOptions::new()
        .write(true)
        .open(dir.path().join("memory.img"))
        .unwrap();
    mem.write_all_at(&[0xee; 100], 5 * PAGE_SIZE as u64 + 1000)
        .unwrap();
    // A torn index entry: page 9's checksum half-written.
    let idx = OpenOptions::new()
        .write(true)
        .open(dir.path().join("index.bin"))
        .unwrap();
    idx.write_all_at(&[0x11; 4], INDEX_HEADER + 9 * 16 + 8)
        .unwrap();
    // And page 12's version bumped without the checksum.
    idx.write_all_at(&99u64.to_le_bytes(), INDEX_HEADER + 12 * 16)
        .unwrap();
    drop((mem, idx));

    let s = open_tier(tier, dir.path(), 32).unwrap();
    assert_eq!(s.torn_pages(), 3);
    for p in 0..32 {
        if [5, 9, 12].contains(&p) {
            assert_eq!(s.version(p), 0, "page {p}");
            assert!(read_back(s.as_ref(), p).is_none());
        } else {
            assert_eq!(
                read_back(s.as_ref(), p).unwrap(),
                (p + 1, page_data(p, p + 1))
            );
        }
    }
    drop(s);
    // Torn pages were cleared: the next open finds nothing torn.
    let s = open_tier(tier, dir.path(), 32).unwrap();
    assert_eq!(s.torn_pages(), 0);
    assert_eq!(s.valid_pages().count(), 29);
}

#[test]
fn torn_pages_detected_memory_tier() {
    torn_pages_detected(Tier::Memory);
}

#[test]
fn torn_pages_detected_disk_tier() {
    torn_pages_detected(Tier::Disk);
}

#[test]
fn stale_entry_cannot_validate_other_content() {
    let dir = disk_dir();
    populate(Tier::Disk, dir.path(), 8);
    // Swap pages 2 and 3 in memory.img, and separately copy entry 4 over entry 6 with
    // page 4's content: every entry only validates its own (page, version, epoch).
    let mem = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.path().join("memory.img"))
        .unwrap();
    mem.write_all_at(&page_data(3, 4), 2 * PAGE_SIZE as u64)
        .unwrap();
    mem.write_all_at(&page_data(2, 3), 3 * PAGE_SIZE as u64)
        .unwrap();
    mem.write_all_at(&page_data(4, 5), 6 * PAGE_SIZE as u64)
        .unwrap();
    let idx = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.path().join("index.bin"))
        .unwrap();
    let mut e4 = [0u8; 16];
    idx.read_exact_at(&mut e4, INDEX_HEADER + 4 * 16).unwrap();
    idx.write_all_at(&e4, INDEX_HEADER + 6 * 16).unwrap();
    drop((mem, idx));
    let s = DiskTier::open(dir.path(), 8).unwrap();
    assert_eq!(s.torn_pages(), 3);
    assert_eq!(s.valid_pages().collect::<Vec<_>>(), [0, 1, 4, 5, 7]);
}

#[test]
fn damaged_index_files() {
    let dir = disk_dir();
    let idx_path = dir.path().join("index.bin");
    let set = |bytes: &[u8]| std::fs::write(&idx_path, bytes).unwrap();

    // Foreign or too short: typed error, file left alone.
    for garbage in [&b""[..], &b"hello"[..], &[0u8; 8192][..], &[0xff; 5000][..]] {
        set(garbage);
        let e = DiskTier::open(dir.path(), 16).unwrap_err();
        assert!(matches!(e, ReplicaError::NotAReplica { .. }), "{e}");
        assert_eq!(std::fs::read(&idx_path).unwrap(), garbage);
    }

    std::fs::remove_file(&idx_path).unwrap();
    populate(Tier::Disk, dir.path(), 16);
    let good = std::fs::read(&idx_path).unwrap();

    // Another page count: refused, not clobbered.
    let e = DiskTier::open(dir.path(), 17).unwrap_err();
    assert!(matches!(
        e,
        ReplicaError::PageCountMismatch {
            found: 16,
            expected: 17,
            ..
        }
    ));
    // A future format version: refused.
    let mut future = good.clone();
    future[8] = 2;
    set(&future);
    assert!(matches!(
        DiskTier::open(dir.path(), 16),
        Err(ReplicaError::UnsupportedFormat {
            format_version: 2,
            ..
        })
    ));

    // Ours but truncated: clean re-init, everything invalid.
    for cut in [48, 100, 4096, 4096 + 16 * 7 + 3] {
        set(&good[..cut]);
        let s = DiskTier::open(dir.path(), 16).unwrap();
        assert!(s.open_report().reinitialized.is_some(), "cut at {cut}");
        assert_eq!(s.valid_pages().count(), 0);
        assert_eq!(s.epoch(), 0);
        drop(s);
        set(&good);
    }
    // Ours but a torn header (epoch written, checksum not): re-init.
    let mut torn = good.clone();
    torn[24] ^= 0x55;
    set(&torn);
    let s = DiskTier::open(dir.path(), 16).unwrap();
    assert!(s.open_report().reinitialized.is_some());
    assert_eq!(s.valid_pages().count(), 0);
    drop(s);

    // Arbitrary garbage at every length never panics.
    let mut x = 0x1234_5678_9abc_def0u64;
    for len in [
        0usize,
        1,
        47,
        48,
        49,
        4095,
        4096,
        4097,
        4096 + 16 * 16,
        9000,
    ] {
        for keep_header in [false, true] {
            let mut bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            if keep_header {
                let n = len.min(48);
                bytes[..n].copy_from_slice(&good[..n]);
            }
            set(&bytes);
            if let Ok(s) = DiskTier::open(dir.path(), 16) {
                // Whatever survived must verify.
                for p in s.valid_pages().collect::<Vec<_>>() {
                    let (v, data) = read_back(&s, p).unwrap();
                    assert_eq!(data, page_data(p, v));
                }
            }
        }
    }

    // `create` wipes on purpose.
    set(b"not a replica");
    let s = DiskTier::create(dir.path(), 16).unwrap();
    assert!(s.open_report().created);
    assert_eq!(s.valid_pages().count(), 0);
}

#[test]
fn memory_tier_needs_tmpfs_and_valid_sizes() {
    let dir = disk_dir();
    if std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/tmp") && l.contains("tmpfs"))
    {
        eprintln!("/tmp is tmpfs here; skipping the NotTmpfs check");
    } else {
        assert!(matches!(
            MemoryTier::open(dir.path(), 4),
            Err(ReplicaError::NotTmpfs { .. })
        ));
    }
    assert!(matches!(
        DiskTier::open(dir.path(), 0),
        Err(ReplicaError::BadPageCount { pages: 0 })
    ));
    assert!(matches!(
        DiskTier::open(dir.path(), u64::MAX / 2),
        Err(ReplicaError::BadPageCount { .. })
    ));
    for bad in ["", ".", "..", "a/b", "x\0"] {
        assert!(matches!(
            MemoryTier::default_dir(bad),
            Err(ReplicaError::BadVmId(_))
        ));
    }
    assert_eq!(
        MemoryTier::default_dir("vm-1").unwrap(),
        Path::new("/dev/shm/faultline/vm-1")
    );
}

/// Replica with pages: 0..PAGES valid except the never-stored ones; some are zero pages.
const SWITCH_PAGES: u64 = 96;

fn switchover_replica(dir: &Path) -> (MemoryTier, Vec<bool>) {
    let s = MemoryTier::open(dir, SWITCH_PAGES).unwrap();
    s.set_epoch(5).unwrap();
    let never_stored = |p: u64| (40..52).contains(&p) || p == 95;
    for p in 0..SWITCH_PAGES {
        if never_stored(p) {
            continue;
        }
        let data = if p % 10 == 1 {
            vec![0u8; PAGE_SIZE]
        } else {
            page_data(p, 3)
        };
        s.store(p, &[3], &data).unwrap();
    }
    let stale = |p: u64| p.is_multiple_of(7) || (60..70).contains(&p);
    let expect_present: Vec<bool> = (0..SWITCH_PAGES)
        .map(|p| !never_stored(p) && !stale(p))
        .collect();
    (s, expect_present)
}

fn replica_page(p: u64) -> Vec<u8> {
    if p % 10 == 1 {
        vec![0u8; PAGE_SIZE]
    } else {
        page_data(p, 3)
    }
}

#[test]
fn into_guest_memory_punches_stale_and_invalid_pages() {
    let dir = shm_dir();
    let (s, expect_present) = switchover_replica(dir.path());
    let (mapping, present) = s
        .into_guest_memory(|p| p.is_multiple_of(7) || (60..70).contains(&p))
        .unwrap();
    assert_eq!(present, expect_present);
    assert_eq!(mapping.len(), SWITCH_PAGES as usize * PAGE_SIZE);
    assert!(mapping.host_region().is_shmem());
    assert_eq!(
        mapping.absent_pages(),
        present.iter().filter(|&&h| !h).count() as u64
    );
    // Runs: 0, 7, 14, 21, 28, 35, 40..52 (with 42, 49), 56, 60..=70 (with 63), 77, 84,
    // 91, 95 -> 13 fallocate calls.
    assert_eq!(mapping.holes_punched(), 13);
    // Without userfaultfd, holes read as zeros and the rest as the replica content.
    for p in 0..SWITCH_PAGES {
        let got = read_page(mapping.as_ptr() as usize + p as usize * PAGE_SIZE);
        if present[p as usize] {
            assert_eq!(got, replica_page(p), "page {p}");
        } else {
            assert!(got.iter().all(|&b| b == 0), "page {p} should be a hole");
        }
    }
    // The directory stays locked while it is guest memory.
    assert!(matches!(
        MemoryTier::open(dir.path(), SWITCH_PAGES),
        Err(ReplicaError::Locked { .. })
    ));
    // Writes through the mapping land in the file.
    // SAFETY: page 1 lies inside the mapping, which nobody else touches here.
    unsafe { mapping.as_ptr().add(PAGE_SIZE).write(0x5a) };
    let mut b = [0u8; 1];
    mapping
        .file()
        .read_exact_at(&mut b, PAGE_SIZE as u64)
        .unwrap();
    assert_eq!(b[0], 0x5a);
    drop(mapping);
    // Reopened as a replica: the guest-written page fails verification, punched ones
    // were invalidated before the punch, the rest is intact.
    let s = MemoryTier::open(dir.path(), SWITCH_PAGES).unwrap();
    assert_eq!(s.torn_pages(), 1);
    let want: Vec<u64> = (0..SWITCH_PAGES)
        .filter(|&p| present[p as usize] && p != 1)
        .collect();
    assert_eq!(s.valid_pages().collect::<Vec<_>>(), want);
}

#[test]
fn into_guest_memory_only_stale_pages_fault() {
    let dir = shm_dir();
    let (s, expect_present) = switchover_replica(dir.path());
    let (mapping, present) = s
        .into_guest_memory(|p| p.is_multiple_of(7) || (60..70).contains(&p))
        .unwrap();
    assert_eq!(present, expect_present);
    let absent: Vec<u64> = (0..SWITCH_PAGES)
        .filter(|&p| !present[p as usize])
        .collect();
    let region = mapping.host_region();
    let source = DoubleSource::new(SWITCH_PAGES);
    let table = Arc::new(present_page_table(&present));
    assert_eq!(table.resolved(), SWITCH_PAGES - absent.len() as u64);
    let dest =
        Destination::register_with_table(std::slice::from_ref(&region), table, source.clone())
            .unwrap();
    let server = Server::start(&source, dest.installer().clone());
    let base = region.host_addr();
    within(TIMEOUT, move || {
        for p in 0..SWITCH_PAGES {
            let _ = read_page(base + p as usize * PAGE_SIZE);
        }
    });
    assert!(dest.wait_complete(TIMEOUT));
    for p in 0..SWITCH_PAGES {
        let want = u32::from(!present[p as usize]);
        assert_eq!(
            source.count(p),
            want,
            "page {p} requested {} times",
            source.count(p)
        );
    }
    // Final memory: replica content where fresh, installed content where punched.
    for p in 0..SWITCH_PAGES {
        let got = read_page(base + p as usize * PAGE_SIZE);
        let want = if present[p as usize] {
            replica_page(p)
        } else {
            expected_page(p)
        };
        assert_eq!(got, want, "page {p}");
    }
    server.stop();
    let snap = dest.finish().unwrap();
    // One thread touched each page once: exactly the punched pages faulted.
    assert_eq!(snap.faults, absent.len() as u64);
    assert_eq!(snap.pages_faulted, absent.len() as u64);
    drop(mapping);
}

#[test]
fn verification_speed() {
    // FAULTLINE_VERIFY_MIB=1024 measures a full-size guest.
    let mib: u64 = std::env::var("FAULTLINE_VERIFY_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let pages = mib * 1024 * 1024 / PAGE_SIZE as u64;
    for tier in [Tier::Memory, Tier::Disk] {
        let dir = dir_for(tier);
        {
            let s = open_tier(tier, dir.path(), pages).unwrap();
            s.set_epoch(1).unwrap();
            const BATCH: u64 = 256;
            let mut data = vec![0u8; BATCH as usize * PAGE_SIZE];
            for first in (0..pages).step_by(BATCH as usize) {
                for (k, chunk) in data.chunks_exact_mut(PAGE_SIZE).enumerate() {
                    chunk[..8].copy_from_slice(&(first + k as u64).to_le_bytes());
                    chunk[100] = k as u8;
                }
                s.store(first, &[9; BATCH as usize], &data).unwrap();
            }
            s.sync().unwrap();
        }
        let t = Instant::now();
        let s = match tier {
            Tier::Memory => MemoryTier::open(dir.path(), pages)
                .unwrap()
                .open_report()
                .clone(),
            Tier::Disk => DiskTier::open(dir.path(), pages)
                .unwrap()
                .open_report()
                .clone(),
        };
        let open_time = t.elapsed();
        assert_eq!(s.verified_pages, pages);
        assert_eq!(s.torn_pages, 0);
        let secs = s.verify_time.as_secs_f64();
        println!(
            "verification {tier:?} tier: {mib} MiB ({pages} pages) in {:.1} ms = {:.2} GiB/s \
             (open total {:.1} ms, page cache warm)",
            secs * 1e3,
            mib as f64 / 1024.0 / secs,
            open_time.as_secs_f64() * 1e3
        );
        // The time is printed, not asserted: a loaded machine may take any time, and speed
        // belongs to benchmarks.
    }
}

// ---- crash test: a child process stores in a loop and is SIGKILLed at random times.

const CRASH_ENV: &str = "FAULTLINE_REPLICA_CRASH_CHILD";
const CRASH_PAGES: u64 = 512;

/// Not a test on its own: the body of the child process of `crash_at_any_point`.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CRASH_ENV) else {
        return;
    };
    let (tier, dir) = match dir.split_once(':') {
        Some(("disk", d)) => (Tier::Disk, d.to_string()),
        Some((_, d)) => (Tier::Memory, d.to_string()),
        None => return,
    };
    let s = open_tier(tier, Path::new(&dir), CRASH_PAGES).unwrap();
    s.set_epoch(77).unwrap();
    let mut x = std::process::id() as u64 | 1;
    let mut version = 1 + (s.valid_pages().map(|p| s.version(p)).max().unwrap_or(0));
    println!("child ready");
    loop {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let first = x % CRASH_PAGES;
        let n = 1 + (x >> 20) % 32.min(CRASH_PAGES - first);
        let (v, d) = batch(first, n, |_| version);
        s.store(first, &v, &d).unwrap();
        version += 1;
        if version.is_multiple_of(64) {
            s.sync().unwrap();
        }
    }
}

fn crash_at_any_point(tier: Tier) {
    let dir = dir_for(tier);
    let exe = std::env::current_exe().unwrap();
    let tag = match tier {
        Tier::Disk => "disk",
        Tier::Memory => "memory",
    };
    let mut torn_total = 0;
    for round in 0..12u64 {
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(CRASH_ENV, format!("{tag}:{}", dir.path().display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait until it is storing, then kill it a little later.
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while out.read_line(&mut line).unwrap() > 0 && !line.contains("child ready") {
            line.clear();
        }
        std::thread::sleep(Duration::from_millis(1 + round * 7 % 20));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let s = open_tier(tier, dir.path(), CRASH_PAGES).unwrap();
        torn_total += s.torn_pages();
        for p in s.valid_pages().collect::<Vec<_>>() {
            let (v, data) = read_back(s.as_ref(), p).expect("valid page reads");
            assert_eq!(
                data,
                page_data(p, v),
                "round {round}: page {p} wrong at version {v}"
            );
        }
    }
    println!("{tier:?} crash test: 12 kills, {torn_total} torn pages detected and dropped");
}

#[test]
fn crash_at_any_point_memory_tier() {
    crash_at_any_point(Tier::Memory);
}

#[test]
fn crash_at_any_point_disk_tier() {
    crash_at_any_point(Tier::Disk);
}
