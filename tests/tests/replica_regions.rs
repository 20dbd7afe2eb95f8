//! A guest of two memory regions (with a gap in guest-physical memory between them)
//! replicated to a standby and evacuated into it: pages are numbered across the regions,
//! so a run of written pages can end one region and begin the next. Such a run must
//! replicate like any other, and only the pages written after the last harvest may cross.
//! Real dirty tracking, real userfaultfd at the standby, QUIC on loopback; all guest memory
//! compared by digest.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use faultline_tests::{loopback_listener, replicator_options, wait_caught_up, Certs, ShmDir};
use transport::message::{Layout, RegionDesc, PAGE_SIZE};
use uffd_core::{open_tracker, GuestMemory, MemoryTier, TrackerChoice};
use vmm_shim::replica::StandbySink;
use vmm_shim::replica::{evacuate, PausedMemory, Replica, Replicator};
use vmm_shim::SourceOptions;

/// Each region's size: 512 pages.
const REGION: usize = 2 << 20;
const REGION_PAGES: u64 = (REGION / PAGE_SIZE) as u64;

/// Writes `salt` into the first word of page `page`, numbered across both regions.
fn write_page(regions: &[GuestMemory; 2], page: u64, salt: u64) {
    let (r, p) = if page < REGION_PAGES {
        (&regions[0], page)
    } else {
        (&regions[1], page - REGION_PAGES)
    };
    assert!(p < REGION_PAGES, "page {page} out of range");
    // SAFETY: the offset lies inside the region's read-write mapping (checked above),
    // which lives as long as `regions`; the word is 8-byte aligned (page-aligned). Every
    // access to it from this process is atomic: this store, and replication's loads
    // (`HostRegion::read_shared`).
    let w = unsafe { AtomicU64::from_ptr(r.as_ptr().add(p as usize * PAGE_SIZE) as *mut u64) };
    w.store(
        salt ^ page.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        Ordering::Relaxed,
    );
}

#[test]
fn a_run_of_pages_across_two_regions_replicates_and_only_stale_pages_cross() {
    let certs = Certs::new();
    let shm = ShmDir::new("two-regions");
    let layout = Layout {
        regions: vec![
            RegionDesc {
                guest_addr: 0,
                len: REGION as u64,
            },
            // A hole in guest-physical memory, as below and above 4 GiB on a PC.
            RegionDesc {
                guest_addr: 1 << 32,
                len: REGION as u64,
            },
        ],
        ..Layout::single(0)
    };
    let pages = 2 * REGION_PAGES;

    // The standby: a memory replica on tmpfs.
    let sink = Arc::new(StandbySink::new(Replica::Memory(
        MemoryTier::create(&shm.0, pages).unwrap(),
    )));
    let (listener, stopper, addr) = loopback_listener(&certs, "vm0");
    let standby = {
        let (sink, layout) = (sink.clone(), layout.clone());
        std::thread::spawn(move || listener.serve_standby(sink, &layout, |_, _| {}))
    };

    // The source: two regions, every page written once, replicated until caught up.
    let memory = [
        GuestMemory::anonymous(REGION).unwrap(),
        GuestMemory::anonymous(REGION).unwrap(),
    ];
    for p in 0..pages {
        write_page(&memory, p, 1);
    }
    let regions = [memory[0].host_region(), memory[1].host_region()];
    let epoch = 0x2e91_u64;
    let tracker = open_tracker(&regions, TrackerChoice::Auto).unwrap();
    let replicator = Replicator::start(
        &regions,
        layout.clone(),
        tracker,
        replicator_options(&certs, addr, "vm0", epoch),
    )
    .unwrap();
    let caught_up = |since: u64, what: &str| wait_caught_up(&replicator, since, what);
    let h = caught_up(0, "the first copy");

    // Normal times: the guest writes a run of 16 pages across the boundary, the last 8 of
    // the first region and the first 8 of the second. The replicator must send it.
    let boundary: Vec<u64> = (REGION_PAGES - 8..REGION_PAGES + 8).collect();
    for &p in &boundary {
        write_page(&memory, p, 2);
    }
    caught_up(h, "the run across the boundary");
    let state = replicator.stop().unwrap();

    // After the last harvest: 10 pages, 5 in each region, one of them at each side of the
    // boundary again. Only these are stale.
    let stale: Vec<u64> = [0, 100, 300, 509, REGION_PAGES - 1]
        .into_iter()
        .chain([
            REGION_PAGES,
            REGION_PAGES + 3,
            REGION_PAGES + 200,
            pages - 2,
            pages - 1,
        ])
        .collect();
    for &p in &stale {
        write_page(&memory, p, 3);
    }
    let digest = |slices: &[&[u8]]| vmm_shim::digest::digest(&slices.concat());
    // SAFETY: the mappings live as long as `memory`; nothing writes them from here on.
    let (a, b) = unsafe {
        (
            std::slice::from_raw_parts(memory[0].as_ptr(), REGION),
            std::slice::from_raw_parts(memory[1].as_ptr(), REGION),
        )
    };
    let at_switchover = digest(&[a, b]);

    // SAFETY: nothing writes the source memory from here on.
    let paused = unsafe { PausedMemory::new(&regions) }.unwrap();
    let opts = SourceOptions::new(
        addr,
        certs.identity("source"),
        certs.identity("dest").cert,
        "vm0",
    );
    let sent = evacuate(paused, &layout, state, epoch, &opts, None).unwrap();
    let report = standby.join().unwrap().unwrap();

    assert_eq!(
        sent.pages_stale_source,
        stale.len() as u64,
        "only the pages written after the last harvest are stale"
    );
    assert_eq!(report.evacuation.pages_stale, stale.len() as u64);
    assert_eq!(
        report.evacuation.pages_from_replica,
        pages - stale.len() as u64
    );
    let dst = sink.guest_region().unwrap();
    assert_eq!(dst.len(), 2 * REGION);
    // SAFETY: the evacuation is over (userfaultfd unregistered); nothing writes it.
    let d = unsafe { std::slice::from_raw_parts(dst.host_addr() as *const u8, 2 * REGION) };
    assert_eq!(digest(&[d]), at_switchover, "guest memory arrived whole");
    drop(stopper);
}
