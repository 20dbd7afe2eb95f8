//! End-to-end tests against the real kernel userfaultfd.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use common::*;
use uffd_core::{
    Destination, FaultLoop, GuestMemory, HostRegion, InstallError, Installed, Installer, Metrics,
    Origin, PageData, PageState, PageTable, RegionMap, Userfaultfd, DESTINATION_FEATURES,
    PAGE_SIZE,
};

const TIMEOUT: Duration = Duration::from_secs(30);
const MIB: usize = 1 << 20;

fn region_pages(regions: &[HostRegion]) -> Vec<usize> {
    // Global page -> host address, for the touching threads.
    let mut v = Vec::new();
    for r in regions {
        v.extend(
            (0..r.len())
                .step_by(PAGE_SIZE)
                .map(|off| r.host_addr() + off),
        );
    }
    v
}

/// 8 threads fault on one shared page at once, then on every page in different orders.
fn demand_all(mems: Vec<GuestMemory>) {
    let regions: Vec<HostRegion> = mems.iter().map(GuestMemory::host_region).collect();
    let (dest, source, server) = serve(&regions);
    let total = dest.table().total();
    let addrs = Arc::new(region_pages(&regions));
    let barrier = Arc::new(Barrier::new(8));
    let mismatches = Arc::new(Mutex::new(Vec::new()));
    let tids = Arc::new(Mutex::new(Vec::new()));
    {
        let (addrs, mismatches, tids) = (addrs.clone(), mismatches.clone(), tids.clone());
        run_threads(8, TIMEOUT, move |t| {
            // SAFETY: gettid has no preconditions.
            tids.lock().unwrap().push(unsafe { libc::gettid() } as u32);
            barrier.wait();
            let shared = 7u64;
            if read_page(addrs[shared as usize]) != expected_page(shared) {
                mismatches.lock().unwrap().push(shared);
            }
            let n = addrs.len();
            for i in 0..n {
                let p = (i + t * n / 8) % n;
                if read_page(addrs[p]) != expected_page(p as u64) {
                    mismatches.lock().unwrap().push(p as u64);
                }
            }
        });
    }
    assert!(
        mismatches.lock().unwrap().is_empty(),
        "{:?}",
        mismatches.lock().unwrap()
    );
    assert!(dest.wait_complete(TIMEOUT));
    assert!(
        source.counts().iter().all(|&c| c == 1),
        "each page requested exactly once"
    );
    assert_eq!(memory_digest(&regions), expected_digest(total));
    server.stop();
    let snap = dest.finish().unwrap();
    assert_eq!(snap.pages_faulted, total);
    assert_eq!(snap.pages_pushed, 0);
    assert_eq!(
        snap.pages_zero,
        (0..total).filter(|p| p % 5 == 3).count() as u64
    );
    assert!(snap.faults >= total);
    // Every fault message was on a page that got installed, so each got a latency.
    assert_eq!(snap.fault_latency_us.count, snap.faults);
    assert!(snap.blocked_ns > 0);
    // Blocked time is charged to the threads that faulted, and only to them.
    let tids = tids.lock().unwrap();
    assert!(!snap.blocked_ns_by_thread.is_empty());
    assert!(
        snap.blocked_ns_by_thread.keys().all(|t| tids.contains(t)),
        "{:?} vs {tids:?}",
        snap.blocked_ns_by_thread
    );
    assert_eq!(
        snap.blocked_ns_by_thread.values().sum::<u64>(),
        snap.blocked_ns
    );
    // Unregistered: another userfaultfd may now register the same ranges (EBUSY otherwise).
    let other = Userfaultfd::open(DESTINATION_FEATURES).unwrap();
    for r in &regions {
        other
            .register_missing(r.host_addr() as u64, r.len() as u64)
            .unwrap();
    }
}

#[test]
fn demand_faults_anonymous() {
    demand_all(vec![
        GuestMemory::anonymous(2 * MIB).unwrap(),
        GuestMemory::anonymous(MIB).unwrap(),
    ]);
}

#[test]
fn demand_faults_memfd() {
    demand_all(vec![
        GuestMemory::memfd("guest0", 2 * MIB).unwrap(),
        GuestMemory::memfd("guest1", MIB).unwrap(),
    ]);
}

#[test]
fn push_races_with_faults() {
    let mems = [
        GuestMemory::anonymous(2 * MIB).unwrap(),
        GuestMemory::memfd("guest", 2 * MIB).unwrap(),
    ];
    let regions: Vec<HostRegion> = mems.iter().map(GuestMemory::host_region).collect();
    let (dest, source, server) = serve(&regions);
    let total = dest.table().total();
    let pushed_ok = Arc::new(AtomicU64::new(0));
    let pusher = {
        let (installer, pushed_ok) = (dest.installer().clone(), pushed_ok.clone());
        std::thread::spawn(move || {
            // Push from the end while the faulting threads start at the front.
            for p in (0..total).rev() {
                match install_content(&installer, p, Origin::Push).unwrap() {
                    Installed::Installed | Installed::Raced => {
                        pushed_ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Installed::AlreadyPresent => {}
                    Installed::Dropped => panic!("nothing was discarded"),
                }
            }
        })
    };
    let addrs = Arc::new(region_pages(&regions));
    {
        let addrs = addrs.clone();
        run_threads(4, TIMEOUT, move |t| {
            for (p, &a) in addrs.iter().enumerate().skip(t).step_by(2) {
                assert_eq!(read_page(a), expected_page(p as u64), "page {p}");
            }
        });
    }
    pusher.join().unwrap();
    assert!(dest.wait_complete(TIMEOUT));
    server.stop();
    assert!(source.counts().iter().all(|&c| c <= 1));
    assert_eq!(memory_digest(&regions), expected_digest(total));
    let snap = dest.finish().unwrap();
    assert_eq!(snap.pages_pushed + snap.pages_faulted, total);
    assert_eq!(snap.pages_pushed, pushed_ok.load(Ordering::SeqCst));
    assert!(snap.pages_pushed > 0);
}

#[test]
fn install_run_splits_at_present_pages_and_regions() {
    let mems = [
        GuestMemory::anonymous(8 * PAGE_SIZE).unwrap(),
        GuestMemory::anonymous(8 * PAGE_SIZE).unwrap(),
    ];
    let regions: Vec<HostRegion> = mems.iter().map(GuestMemory::host_region).collect();
    let source = DoubleSource::new(16);
    let dest = Destination::register(&regions, source.clone()).unwrap();
    let inst = dest.installer();
    assert_eq!(
        install_content(inst, 3, Origin::Push).unwrap(),
        Installed::Installed
    );
    assert_eq!(
        install_content(inst, 5, Origin::Push).unwrap(),
        Installed::Installed
    );
    // Page 12 filled behind the table's back, as a racing installer would: the run
    // must hit EEXIST there and carry on.
    let odd = vec![0xEEu8; PAGE_SIZE];
    let addr12 = dest.regions().host_addr_of(12).unwrap();
    dest.uffd().copy(addr12 as u64, &odd, true).unwrap();

    let data: Vec<u8> = (0..16).flat_map(expected_page).collect();
    let run = inst.install_run(0, &data, Origin::Push).unwrap();
    // [0,3) [4,5) [6,8) | [8,16) stops at 12, [12] EEXIST, [13,16)
    assert_eq!(run.ioctls, 6, "{run:?}");
    assert_eq!(run.installed, 13);
    assert_eq!(run.raced, 1);
    assert_eq!(run.already_present, 2);
    assert!(dest.table().is_complete());
    for p in 0..16u64 {
        let want = if p == 12 {
            odd.clone()
        } else {
            expected_page(p)
        };
        let got = read_page(dest.regions().host_addr_of(p).unwrap());
        assert_eq!(got, want, "page {p}");
    }
    let again = inst.install_run(0, &data, Origin::Push).unwrap();
    assert_eq!((again.already_present, again.ioctls), (16, 0));
    let snap = dest.finish().unwrap();
    assert_eq!(snap.pages_pushed, 16);
    assert!(source.counts().iter().all(|&c| c == 0));
}

#[test]
fn bad_input_changes_nothing() {
    let mem = GuestMemory::anonymous(16 * PAGE_SIZE).unwrap();
    let regions = [mem.host_region()];
    let source = DoubleSource::new(16);
    let dest = Destination::register(&regions, source).unwrap();
    let inst = dest.installer();
    assert_eq!(
        install_content(inst, 2, Origin::Push).unwrap(),
        Installed::Installed
    );
    let before = dest.metrics().snapshot();

    let short = [1u8; 100];
    assert!(matches!(
        inst.install(2, PageData::Raw(&short), Origin::Push),
        Err(InstallError::BadLength { len: 100 })
    ));
    assert!(matches!(
        inst.install(4, PageData::Raw(&short), Origin::Push),
        Err(InstallError::BadLength { len: 100 })
    ));
    let page = vec![1u8; PAGE_SIZE];
    for bad in [16, 17, u64::MAX] {
        assert!(matches!(
            inst.install(bad, PageData::Raw(&page), Origin::Demand),
            Err(InstallError::PageOutOfRange { total: 16, .. })
        ));
    }
    assert!(matches!(
        inst.install_run(0, &short, Origin::Push),
        Err(InstallError::BadLength { .. })
    ));
    assert!(matches!(
        inst.install_run(0, &[], Origin::Push),
        Err(InstallError::BadLength { len: 0 })
    ));
    let eight = vec![1u8; 8 * PAGE_SIZE];
    assert!(matches!(
        inst.install_run(10, &eight, Origin::Push),
        Err(InstallError::PageOutOfRange { .. })
    ));
    assert!(matches!(
        inst.install_run(u64::MAX - 1, &eight, Origin::Push),
        Err(InstallError::PageOutOfRange { .. })
    ));

    let mut want = vec![false; 16];
    want[2] = true;
    assert_eq!(resident(mem.as_ptr() as usize, 16), want);
    assert_eq!(dest.table().resolved(), 1);
    assert_eq!(dest.table().state(4), PageState::Absent);
    assert_eq!(dest.metrics().snapshot(), before);
    assert_eq!(
        read_page(mem.as_ptr() as usize + 2 * PAGE_SIZE),
        expected_page(2)
    );
    dest.finish().unwrap();
}

fn madvise_dontneed(addr: usize, len: usize) {
    // madvise blocks until the fault loop reads the REMOVE event; bound it.
    within(TIMEOUT, move || {
        // SAFETY: the range lies inside a live private anonymous mapping; dropping its
        // pages is what the test wants.
        let r = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    });
}

#[test]
fn remove_discards_pages_and_they_read_zero() {
    let mem = GuestMemory::anonymous(MIB).unwrap();
    let regions = [mem.host_region()];
    let (dest, source, server) = serve(&regions);
    let total = dest.table().total();
    let base = mem.as_ptr() as usize;
    // Page 200 is never served: a thread blocks on it until REMOVE discards it.
    source.withhold.lock().unwrap().insert(200);
    {
        run_threads(1, TIMEOUT, move |_| {
            for p in 0..total {
                if p != 200 {
                    assert_eq!(read_page(base + p as usize * PAGE_SIZE), expected_page(p));
                }
            }
        });
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(read_page(base + 200 * PAGE_SIZE));
    });
    let table = dest.table().clone();
    assert!(wait_until(TIMEOUT, || table.state(200) == PageState::Requested));
    assert!(!dest.table().is_complete());

    madvise_dontneed(base + 16 * PAGE_SIZE, 32 * PAGE_SIZE);
    madvise_dontneed(base + 200 * PAGE_SIZE, PAGE_SIZE);
    let blocked = rx
        .recv_timeout(TIMEOUT)
        .expect("thread blocked on page 200 was released");
    assert!(blocked.iter().all(|&b| b == 0));
    assert!(dest.wait_complete(TIMEOUT));

    run_threads(2, TIMEOUT, move |_| {
        for p in 16..48usize {
            assert!(
                read_page(base + p * PAGE_SIZE).iter().all(|&b| b == 0),
                "page {p}"
            );
        }
        assert_eq!(read_page(base + 15 * PAGE_SIZE), expected_page(15));
        assert_eq!(read_page(base + 48 * PAGE_SIZE), expected_page(48));
    });
    for p in (16..48).chain([200]) {
        assert_eq!(dest.table().state(p), PageState::Discarded);
    }
    // Late data for discarded pages is dropped, not installed.
    let late = vec![9u8; PAGE_SIZE];
    assert_eq!(
        dest.installer()
            .install(20, PageData::Raw(&late), Origin::Demand)
            .unwrap(),
        Installed::Dropped
    );
    assert_eq!(
        dest.installer()
            .install(200, PageData::Raw(&late), Origin::Demand)
            .unwrap(),
        Installed::Dropped
    );
    assert!(read_page(base + 20 * PAGE_SIZE).iter().all(|&b| b == 0));
    server.stop();
    let snap = dest.finish().unwrap();
    assert_eq!(snap.pages_discarded, 33);
    assert_eq!(snap.pages_faulted, total - 1);
}

#[test]
fn register_with_table_skips_present_pages() {
    let mem = GuestMemory::anonymous(32 * PAGE_SIZE).unwrap();
    let base = mem.as_ptr() as usize;
    // Pages 0..8 are "fresh replica" pages already in memory.
    for p in 0..8usize {
        let bytes = expected_page(p as u64);
        // SAFETY: page p lies in the live, not yet registered mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (base + p * PAGE_SIZE) as *mut u8,
                PAGE_SIZE,
            )
        };
    }
    let table = Arc::new(PageTable::new(32));
    for p in 0..8 {
        table.set_present(p);
    }
    let source = DoubleSource::new(32);
    let dest =
        Destination::register_with_table(&[mem.host_region()], table, source.clone()).unwrap();
    let server = Server::start(&source, dest.installer().clone());
    run_threads(2, TIMEOUT, move |t| {
        for p in (t..32).step_by(2) {
            assert_eq!(read_page(base + p * PAGE_SIZE), expected_page(p as u64));
        }
    });
    assert!(dest.wait_complete(TIMEOUT));
    assert!((0..8).all(|p| source.count(p) == 0));
    assert!((8..32).all(|p| source.count(p) == 1));
    server.stop();
    assert_eq!(dest.finish().unwrap().pages_faulted, 24);

    let wrong = Arc::new(PageTable::new(31));
    let mem2 = GuestMemory::anonymous(32 * PAGE_SIZE).unwrap();
    assert!(matches!(
        Destination::register_with_table(&[mem2.host_region()], wrong, DoubleSource::new(32)),
        Err(uffd_core::Error::TableSizeMismatch {
            table: 31,
            regions: 32
        })
    ));
}

#[test]
fn fault_loop_stops_and_drop_stops() {
    let mem = GuestMemory::anonymous(4 * PAGE_SIZE).unwrap();
    let regions = Arc::new(RegionMap::new(vec![mem.host_region()]).unwrap());
    let uffd = Arc::new(Userfaultfd::open(DESTINATION_FEATURES).unwrap());
    uffd.register_missing(mem.as_ptr() as u64, mem.len() as u64)
        .unwrap();
    let table = Arc::new(PageTable::new(4));
    let metrics = Arc::new(Metrics::new(4));
    let installer = Installer::new(
        uffd.clone(),
        regions.clone(),
        table.clone(),
        metrics.clone(),
    );
    let spawn = || {
        FaultLoop::spawn(
            uffd.clone(),
            regions.clone(),
            table.clone(),
            metrics.clone(),
            DoubleSource::new(4),
            installer.clone(),
        )
        .unwrap()
    };
    let h = spawn();
    assert!(h.is_running());
    within(TIMEOUT, move || h.stop().unwrap());
    let h = spawn();
    within(TIMEOUT, move || drop(h));
}
