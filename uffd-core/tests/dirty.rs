//! Source-side dirty tracking against the real kernel: both trackers, anonymous and
//! memfd memory, concurrent writers, and the PAGEMAP_SCAN continuation loop.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::within;
use uffd_core::{
    open_tracker, DirtyError, DirtyTracker, GuestMemory, HashTracker, HostRegion, MemoryKind,
    TrackerChoice, WpAsyncTracker, PAGE_SIZE,
};

const PAGES: usize = 1024; // 4 MiB
const TIMEOUT: Duration = Duration::from_secs(60);
const WORDS: usize = PAGE_SIZE / 8;

fn memory(kind: MemoryKind, pages: usize) -> GuestMemory {
    match kind {
        MemoryKind::Anonymous => GuestMemory::anonymous(pages * PAGE_SIZE).unwrap(),
        MemoryKind::Memfd => GuestMemory::memfd("dirty-test", pages * PAGE_SIZE).unwrap(),
    }
}

/// Word `word` of page `page` of `m`, as an atomic so test writers and readers never
/// race in Rust's sense.
fn word(m: &GuestMemory, page: usize, word: usize) -> &AtomicU64 {
    assert!(page < m.len() / PAGE_SIZE && word < WORDS);
    // SAFETY: the address is inside the mapping (checked above), 8-byte aligned, and
    // the mapping lives as long as the borrow of `m`; all test accesses are atomic.
    unsafe { &*(m.as_ptr().add(page * PAGE_SIZE + word * 8) as *const AtomicU64) }
}

fn write(m: &GuestMemory, page: usize, v: u64) {
    word(m, page, 0).store(v, Ordering::Relaxed);
}

fn read_page(m: &GuestMemory, page: usize) -> Vec<u8> {
    (0..WORDS)
        .flat_map(|w| word(m, page, w).load(Ordering::Relaxed).to_ne_bytes())
        .collect()
}

/// Whether the page at `addr` is mapped to a page frame, from /proc/self/pagemap.
fn present(addr: usize) -> bool {
    let f = File::open("/proc/self/pagemap").unwrap();
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, (addr / PAGE_SIZE * 8) as u64)
        .unwrap();
    u64::from_ne_bytes(e) & (1 << 63) != 0
}

fn open(choice: TrackerChoice, regions: &[HostRegion]) -> Box<dyn DirtyTracker> {
    let t = open_tracker(regions, choice).unwrap();
    let want = match choice {
        TrackerChoice::Hash => "content-hash",
        _ => "uffd-wp-async",
    };
    assert_eq!(t.kind(), want);
    t
}

fn harvest(t: &mut dyn DirtyTracker) -> Vec<u64> {
    let mut out = vec![1234]; // harvest replaces, never appends
    t.harvest(&mut out).unwrap();
    out
}

fn basic(choice: TrackerChoice, kind: MemoryKind) {
    within(TIMEOUT, move || {
        let m = memory(kind, PAGES);
        let mut t = open(choice, &[m.host_region()]);
        let all: Vec<u64> = (0..PAGES as u64).collect();
        assert_eq!(harvest(&mut *t), all, "first harvest reports everything");
        assert_eq!(
            harvest(&mut *t),
            Vec::<u64>::new(),
            "no writes, nothing dirty"
        );
        if choice != TrackerChoice::Hash {
            // The WP tracker never touches memory: these pages were never populated,
            // so only the WP_UNPOPULATED marker can catch their first write.
            for p in [3, 17, 1000, 500] {
                assert!(!present(m.as_ptr() as usize + p * PAGE_SIZE), "page {p}");
            }
        }
        for p in [1000, 3, 17] {
            write(&m, p, 0xA000 + p as u64);
        }
        assert_eq!(harvest(&mut *t), vec![3, 17, 1000]);
        assert_eq!(harvest(&mut *t), Vec::<u64>::new());
        write(&m, 17, 1);
        write(&m, 3, 2);
        assert_eq!(
            harvest(&mut *t),
            vec![3, 17],
            "written again after a harvest"
        );
        // A read (zero page for anonymous memory, a new shmem page for memfd) is not a
        // write; the first write after it is.
        assert_eq!(word(&m, 500, 9).load(Ordering::Relaxed), 0);
        assert_eq!(harvest(&mut *t), Vec::<u64>::new(), "a read is not a write");
        write(&m, 500, 5);
        assert_eq!(harvest(&mut *t), vec![500]);
        // Many writes to one page between harvests: reported once.
        for v in 0..100 {
            write(&m, 999, v + 10);
        }
        assert_eq!(harvest(&mut *t), vec![999]);
    });
}

#[test]
fn wp_async_anonymous() {
    basic(TrackerChoice::WpAsync, MemoryKind::Anonymous);
}

#[test]
fn wp_async_memfd() {
    basic(TrackerChoice::WpAsync, MemoryKind::Memfd);
}

#[test]
fn hash_anonymous() {
    basic(TrackerChoice::Hash, MemoryKind::Anonymous);
}

#[test]
fn hash_memfd() {
    basic(TrackerChoice::Hash, MemoryKind::Memfd);
}

/// One writer stores a fresh sequence number into random pages while the main thread
/// harvests and replicates like the real source. Checks that every page's last write
/// was covered by a harvest that reported it, and that the standby ends equal to the
/// source byte for byte.
fn concurrent(choice: TrackerChoice, kind: MemoryKind) {
    within(TIMEOUT, move || {
        let m = Arc::new(memory(kind, PAGES));
        let mut t = open(choice, &[m.host_region()]);
        let seq = Arc::new(AtomicU64::new(0));
        let last_written: Arc<Vec<AtomicU64>> =
            Arc::new((0..PAGES).map(|_| AtomicU64::new(0)).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (m, seq, last_written, stop) =
                (m.clone(), seq.clone(), last_written.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut x = 0x9E37_79B9_7F4A_7C15u64;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Pause now and then so a harvest sees only part of memory dirty.
                    n += 1;
                    if n.is_multiple_of(16) {
                        std::thread::sleep(Duration::from_micros(20));
                    }
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let page = (x % PAGES as u64) as usize;
                    // The sequence number is taken before the write starts, so a write
                    // numbered above a harvest's end mark began after that harvest.
                    let s = seq.fetch_add(1, Ordering::SeqCst) + 1;
                    last_written[page].store(s, Ordering::SeqCst);
                    // First and last word, so a hashing reader can see the write torn.
                    word(&m, page, 0).store(s, Ordering::SeqCst);
                    word(&m, page, WORDS - 1).store(s, Ordering::SeqCst);
                }
            })
        };
        let mut standby = vec![vec![0u8; PAGE_SIZE]; PAGES];
        // Sequence mark at the end of the latest harvest that reported each page, and
        // right after the page was last read for the standby.
        let mut reported_at = vec![0u64; PAGES];
        let mut read_at = vec![0u64; PAGES];
        let mut out = Vec::new();
        let mut harvests = 0u64;
        let mut replicate = |t: &mut dyn DirtyTracker, out: &mut Vec<u64>| {
            t.harvest(out).unwrap();
            let mark = seq.load(Ordering::SeqCst);
            for &p in out.iter() {
                let p = p as usize;
                reported_at[p] = mark;
                standby[p] = read_page(&m, p);
                read_at[p] = seq.load(Ordering::SeqCst);
                t.replicated(p as u64, &standby[p]).unwrap();
            }
            harvests += 1;
        };
        let deadline = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < deadline {
            replicate(&mut *t, &mut out);
            std::thread::sleep(Duration::from_micros(300));
        }
        stop.store(true, Ordering::SeqCst);
        writer.join().unwrap();
        replicate(&mut *t, &mut out);
        let writes = seq.load(Ordering::SeqCst);
        for p in 0..PAGES {
            let w = last_written[p].load(Ordering::SeqCst);
            // The write tracker reports every write itself. The hash tracker compares
            // against the bytes sent (`replicated`), so a write that landed between a
            // harvest and the replicator's read is rightly never reported: it was sent.
            let covered = match choice {
                TrackerChoice::Hash => read_at[p],
                _ => reported_at[p],
            };
            assert!(
                w <= covered,
                "page {p}: write #{w} lost (last report #{}, last read #{})",
                reported_at[p],
                read_at[p]
            );
            assert_eq!(standby[p], read_page(&m, p), "standby page {p} is stale");
        }
        println!(
            "{} {kind:?}: {writes} writes, {harvests} harvests, final harvest {} pages",
            t.kind(),
            out.len()
        );
        assert!(
            writes > 10_000 && harvests > 10,
            "{writes} writes, {harvests} harvests"
        );
        assert_eq!(harvest(&mut *t), Vec::<u64>::new());
    });
}

#[test]
fn wp_async_concurrent_anonymous() {
    concurrent(TrackerChoice::WpAsync, MemoryKind::Anonymous);
}

#[test]
fn wp_async_concurrent_memfd() {
    concurrent(TrackerChoice::WpAsync, MemoryKind::Memfd);
}

#[test]
fn hash_concurrent_anonymous() {
    concurrent(TrackerChoice::Hash, MemoryKind::Anonymous);
}

#[test]
fn hash_concurrent_memfd() {
    concurrent(TrackerChoice::Hash, MemoryKind::Memfd);
}

#[test]
fn tiny_scan_vector_still_reports_everything() {
    within(TIMEOUT, || {
        let a = memory(MemoryKind::Anonymous, PAGES);
        let b = memory(MemoryKind::Memfd, 64);
        let regions = [a.host_region(), b.host_region()];
        let mut t = WpAsyncTracker::with_scan_capacity(&regions, 2).unwrap();
        let total = (PAGES + 64) as u64;
        assert_eq!(harvest(&mut t), (0..total).collect::<Vec<_>>());
        // 300 separate runs in the first region, one 20-page run, runs in the second.
        let mut want: Vec<u64> = (0..600).step_by(2).collect();
        want.extend(700..720);
        for &p in &want {
            write(&a, p as usize, 1);
        }
        for p in [0, 5, 6, 7, 63] {
            write(&b, p, 1);
            want.push(PAGES as u64 + p as u64);
        }
        assert_eq!(harvest(&mut t), want);
        assert_eq!(harvest(&mut t), Vec::<u64>::new());
    });
}

#[test]
fn regions_map_to_global_pages_in_given_order() {
    for choice in [TrackerChoice::WpAsync, TrackerChoice::Hash] {
        within(TIMEOUT, move || {
            let a = memory(MemoryKind::Memfd, 8);
            let b = memory(MemoryKind::Anonymous, 8);
            let mut t = open(choice, &[a.host_region(), b.host_region()]);
            harvest(&mut *t);
            write(&b, 0, 1);
            write(&a, 7, 1);
            write(&b, 7, 1);
            assert_eq!(harvest(&mut *t), vec![7, 8, 15]);
        });
    }
}

#[test]
fn auto_picks_wp_async_here() {
    let m = memory(MemoryKind::Anonymous, 4);
    let t = open_tracker(&[m.host_region()], TrackerChoice::Auto).unwrap();
    assert_eq!(t.kind(), "uffd-wp-async");
    drop(t);
    let t = open_tracker(&[m.host_region()], TrackerChoice::Hash).unwrap();
    assert_eq!(t.kind(), "content-hash");
}

#[test]
fn second_wp_registration_is_refused_and_auto_falls_back() {
    let m = memory(MemoryKind::Anonymous, 4);
    let regions = [m.host_region()];
    let _first = WpAsyncTracker::new(&regions).unwrap();
    let err = WpAsyncTracker::new(&regions).unwrap_err();
    assert!(matches!(err, DirtyError::Register { .. }), "{err}");
    assert!(err.to_string().contains("write-protect"), "{err}");
    println!("second registration: {}", uffd_core::error::chain(&err));
    // Auto falls back to hashing rather than failing.
    let t = open_tracker(&regions, TrackerChoice::Auto).unwrap();
    assert_eq!(t.kind(), "content-hash");
}

#[test]
fn bad_input_is_an_error() {
    // SAFETY: the misaligned region is refused before anything touches it.
    let bad = unsafe { HostRegion::from_raw(0x1001 as *mut u8, PAGE_SIZE, false) };
    for choice in [
        TrackerChoice::Auto,
        TrackerChoice::WpAsync,
        TrackerChoice::Hash,
    ] {
        assert!(matches!(
            open_tracker(std::slice::from_ref(&bad), choice),
            Err(DirtyError::Layout(_))
        ));
    }
    // Inaccessible memory: the hash tracker refuses it instead of crashing.
    // SAFETY: a fresh PROT_NONE reservation at a kernel-chosen address overlaps nothing.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE_SIZE,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED);
    // SAFETY: the reservation stays mapped until after the tracker is dropped below.
    let region = unsafe { HostRegion::from_raw(addr.cast(), PAGE_SIZE, false) };
    let err = HashTracker::new(&[region]).unwrap_err();
    assert!(matches!(err, DirtyError::Read { .. }), "{err}");
    // SAFETY: unmaps exactly the reservation made above, which nothing references.
    unsafe { libc::munmap(addr, PAGE_SIZE) };

    let m = memory(MemoryKind::Anonymous, 2);
    let mut t = HashTracker::new(&[m.host_region()]).unwrap();
    assert!(matches!(
        t.replicated(2, &[0; PAGE_SIZE]),
        Err(DirtyError::PageOutOfRange { page: 2, total: 2 })
    ));
    assert!(matches!(
        t.replicated(u64::MAX, &[0; PAGE_SIZE]),
        Err(DirtyError::PageOutOfRange { .. })
    ));
    assert!(matches!(
        t.replicated(1, &[0; 100]),
        Err(DirtyError::BadContentLength { page: 1, len: 100 })
    ));
}

/// The A→B→A case: with `replicated`, the hash tracker compares against what was sent.
#[test]
fn hash_compares_against_replicated_bytes() {
    let m = memory(MemoryKind::Anonymous, 4);
    let mut t = HashTracker::new(&[m.host_region()]).unwrap();
    harvest(&mut t);
    // Harvest observed A (zeros); the replicator then reads B, and the page returns to A.
    write(&m, 1, 7);
    let sent = read_page(&m, 1);
    t.replicated(1, &sent).unwrap();
    write(&m, 1, 0);
    assert_eq!(harvest(&mut t), vec![1]);
}

/// Harvest cost over 256 MiB with 1% of pages dirty. Run with
/// `cargo test -p uffd-core --release --test dirty -- --ignored --nocapture`.
#[test]
#[ignore = "measurement"]
fn harvest_cost_256mib_1pct() {
    const BIG: usize = 256 << 20;
    let pages = BIG / PAGE_SIZE;
    for kind in [MemoryKind::Anonymous, MemoryKind::Memfd] {
        for choice in [TrackerChoice::WpAsync, TrackerChoice::Hash] {
            let m = memory(kind, pages);
            for p in 0..pages {
                write(&m, p, p as u64 + 1);
            }
            let mut t = open(choice, &[m.host_region()]);
            let mut out = Vec::new();
            let start = Instant::now();
            t.harvest(&mut out).unwrap();
            let first = start.elapsed();
            let mut times = Vec::new();
            for round in 0..5u64 {
                for p in (round as usize..pages).step_by(100) {
                    write(&m, p, round + 7);
                }
                let start = Instant::now();
                t.harvest(&mut out).unwrap();
                times.push(start.elapsed());
                assert_eq!(out.len(), (pages - round as usize).div_ceil(100));
            }
            times.sort();
            println!(
                "{:14} {kind:?}: first harvest {first:?}, 1% dirty harvest median {:?} \
                 (min {:?}, {} pages)",
                t.kind(),
                times[2],
                times[0],
                out.len()
            );
        }
    }
}
