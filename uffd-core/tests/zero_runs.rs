//! Zero runs against the real kernel userfaultfd: one fill per run, and no fill at all
//! where a memfd is still a hole.

mod common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::Duration;

use common::*;
use uffd_core::install::HOLE_MIN_PAGES;
use uffd_core::{Destination, GuestMemory, InstallError, Origin, PageData, PageState, PAGE_SIZE};

const TIMEOUT: Duration = Duration::from_secs(30);

fn page_addr(mem: &GuestMemory, page: u64) -> usize {
    mem.as_ptr() as usize + page as usize * PAGE_SIZE
}

#[test]
fn zero_run_in_anonymous_memory_is_one_zeropage_per_stretch() {
    let mem = GuestMemory::anonymous(64 * PAGE_SIZE).unwrap();
    let regions = [mem.host_region()];
    let source = DoubleSource::new(64);
    let dest = Destination::register(&regions, source.clone()).unwrap();
    let inst = dest.installer();
    let data = vec![0x5Au8; PAGE_SIZE];
    inst.install(5, PageData::Raw(&data), Origin::Push).unwrap();

    let run = inst.install_zero_run(0, 64, Origin::Push).unwrap();
    // [0, 5) and [6, 64): one UFFDIO_ZEROPAGE each; private memory is never left as a hole.
    assert_eq!(run.ioctls, 2, "{run:?}");
    assert_eq!((run.installed, run.already_present, run.holes), (63, 1, 0));
    assert!(dest.table().is_complete());
    for p in 0..64u64 {
        let want = if p == 5 {
            data.clone()
        } else {
            vec![0; PAGE_SIZE]
        };
        assert_eq!(read_page(page_addr(&mem, p)), want, "page {p}");
    }
    let snap = dest.finish().unwrap();
    assert_eq!((snap.pages_pushed, snap.pages_zero), (64, 63));
    assert_eq!(snap.pages_zero_holes, 0);
    assert!(source.counts().iter().all(|&c| c == 0));
}

#[test]
fn zero_run_over_a_memfd_hole_is_left_as_the_hole() {
    let pages = 2 * HOLE_MIN_PAGES;
    let mem = GuestMemory::memfd("zero-run", pages as usize * PAGE_SIZE).unwrap();
    let regions = [mem.host_region()];
    let source = DoubleSource::new(pages);
    let dest = Destination::register(&regions, source.clone()).unwrap();
    let inst = dest.installer().clone();
    let data = vec![0xC3u8; PAGE_SIZE];
    inst.install(3, PageData::Raw(&data), Origin::Push).unwrap();

    // A thread blocked on a page of the run before it arrives: the source double never
    // answers, so only the run can release it.
    let blocked = page_addr(&mem, 300);
    let reader = std::thread::spawn(move || read_page(blocked));
    assert!(wait_until(TIMEOUT, || source.count(300) == 1));
    assert_eq!(dest.table().state(300), PageState::Requested);

    let run = inst.install_zero_run(0, pages, Origin::Push).unwrap();
    // [0, 3) is too short to leave: one fill. [4, pages) is left as it is: no fill.
    assert_eq!(run.ioctls, 1, "{run:?}");
    assert_eq!(run.installed, pages - 1);
    assert_eq!(run.already_present, 1);
    assert_eq!(run.holes, pages - 4);
    assert!(dest.table().is_complete());
    assert!((0..pages).all(|p| dest.table().state(p) == PageState::Present));
    // The reader the unregister released reads zeros. Join it before looking at the file:
    // its read fault on the shmem hole may allocate page 300, and measuring while it runs
    // races with it.
    within(TIMEOUT, move || {
        assert_eq!(reader.join().unwrap(), vec![0; PAGE_SIZE]);
    });
    // Nothing was allocated for the hole: only pages 0..4 are in the file, and page 300 if
    // the reader's fault allocated it.
    let res = resident(mem.as_ptr() as usize, pages as usize);
    assert!(res[..4].iter().all(|&r| r), "{:?}", &res[..4]);
    let stray: Vec<usize> = (4..pages as usize)
        .filter(|&p| res[p] && p != 300)
        .collect();
    assert!(stray.is_empty(), "resident in the hole: {stray:?}");
    let bytes = mem.file().unwrap().metadata().unwrap().blocks() * 512;
    let want = if res[300] { 5 } else { 4 } * 4096;
    assert_eq!(
        bytes, want,
        "bytes in the file (page 300 resident: {})",
        res[300]
    );

    for p in 0..pages {
        let want = if p == 3 {
            data.clone()
        } else {
            vec![0; PAGE_SIZE]
        };
        assert_eq!(read_page(page_addr(&mem, p)), want, "page {p}");
    }
    // A late copy of a page left as a hole is settled, not an error.
    assert!(inst
        .install(200, PageData::Zero, Origin::Demand)
        .unwrap()
        .eq(&uffd_core::Installed::AlreadyPresent));
    let snap = dest.finish().unwrap();
    assert_eq!(snap.pages_zero, pages - 1);
    assert_eq!(snap.pages_zero_holes, pages - 4);
}

#[test]
fn zero_run_where_the_memfd_holds_data_is_filled_and_keeps_the_data() {
    let pages = 2 * HOLE_MIN_PAGES;
    let mem = GuestMemory::memfd("zero-run-data", pages as usize * PAGE_SIZE).unwrap();
    // In the file's page cache but never mapped here: not a hole, whatever the table says.
    let data = vec![0x77u8; PAGE_SIZE];
    mem.file()
        .unwrap()
        .write_all_at(&data, 100 * PAGE_SIZE as u64)
        .unwrap();
    let regions = [mem.host_region()];
    let dest = Destination::register(&regions, DoubleSource::new(pages)).unwrap();
    let run = dest
        .installer()
        .install_zero_run(0, pages, Origin::Push)
        .unwrap();
    // [0, 100) filled up to the page that exists, which is counted once (EEXIST) and keeps
    // its data; only the stretch after it, a hole, is left as it is.
    assert_eq!(run.raced, 1, "{run:?}");
    assert_eq!(run.installed, pages - 1);
    assert_eq!(run.holes, pages - 101);
    assert!(dest.table().is_complete());
    assert_eq!(read_page(page_addr(&mem, 100)), data);
    assert_eq!(read_page(page_addr(&mem, 99)), vec![0; PAGE_SIZE]);
    assert_eq!(read_page(page_addr(&mem, 101)), vec![0; PAGE_SIZE]);
    dest.finish().unwrap();
}

#[test]
fn bad_zero_runs_change_nothing() {
    let mem = GuestMemory::memfd("zero-run-bad", 16 * PAGE_SIZE).unwrap();
    let regions = [mem.host_region()];
    let dest = Destination::register(&regions, DoubleSource::new(16)).unwrap();
    let inst = dest.installer();
    assert!(matches!(
        inst.install_zero_run(0, 0, Origin::Push),
        Err(InstallError::BadLength { len: 0 })
    ));
    for (first, n) in [(10, 7), (16, 1), (u64::MAX, 2)] {
        assert!(matches!(
            inst.install_zero_run(first, n, Origin::Push),
            Err(InstallError::PageOutOfRange { .. })
        ));
    }
    assert_eq!(dest.table().resolved(), 0);
    assert!(resident(mem.as_ptr() as usize, 16).iter().all(|&r| !r));
    dest.finish().unwrap();
}
