//! A source's estimate of what its evacuation's encoding will make of its stale pages
//! where it will plant them (`replicate --stale-pct`: a uniform sample of memory; `vm
//! source --stale-pct`: pages of the guest's working set; each page's first word
//! changed), from those pages sampled while the VM waits for its turn: the orchestrator
//! plans the VM in the bytes that will cross (docs/fleet.md, "Encoded VMs"). Without
//! planting the stale pages are pages the guest wrote, which the replicator samples
//! (`vmm_shim::replica::WrittenPages`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use transport::encoding::{page_hash, EncodingPolicy, Mode, WireSample};
use uffd_core::{HostRegion, PAGE_SIZE};

/// Pages in one estimate: enough for one within a few per cent (a page's ratio varies by
/// about 0.4 in a mixed image: 1,024 pages put the mean within about 0.012). lz4 of a
/// page takes a few µs, so one estimate a few ms.
const PAGES: usize = 1024;
/// A fresh estimate every this many [`MemorySample::take`]s (a source's statuses come
/// every 100 ms: every second, about 0.3% of a core). Fresh rather than accumulated: a
/// running guest changes the pages that will be planted (the reference VMM's guest fills
/// its working set as it runs: sampled as it started, its planted pages compressed to a
/// quarter to a half of what crossed seconds later).
const EVERY: u32 = 10;
/// How often the census of the pages planting will change is taken again (a guest's
/// writes change which contents repeat, slowly).
const CENSUS_EVERY: Duration = Duration::from_secs(30);

/// How many times each content occurs among the pages planting will change (by a 64-bit
/// share of its hash): a content the push sends `k` times goes once encoded and `k - 1`
/// times as a reference, which a sample of a thousand pages cannot see.
type Census = HashMap<u64, u32>;
/// Samples guest memory at random for [`WireSample`], each page changed as planting will
/// change it.
pub(super) struct MemorySample {
    regions: Vec<HostRegion>,
    /// The pages planting will change (page numbers across the regions, in order); `None`:
    /// a uniform sample of all of them.
    only: Option<Vec<u64>>,
    /// The share of the sampled population planting will change (1 with `only`).
    planted_share: f64,
    /// The thread that takes the census (`None` before the first estimate, without
    /// references in the policy, without pages, or once stopped).
    census: Option<CensusThread>,
    /// The latest census it published (`None` until its first is done).
    counts: Option<Arc<Census>>,
    policy: EncodingPolicy,
    /// The last estimate: (pages, their encoded bytes).
    last: Option<(u64, u64)>,
    calls: u32,
    x: u64,
    page: Vec<u8>,
}

impl MemorySample {
    pub(super) fn new(regions: Vec<HostRegion>, policy: EncodingPolicy, seed: u64) -> MemorySample {
        MemorySample {
            regions,
            only: None,
            planted_share: 1.0,
            census: None,
            counts: None,
            policy,
            last: None,
            calls: 0,
            x: seed | 1,
            page: vec![0; PAGE_SIZE],
        }
    }

    /// Samples only `pages` (page numbers across the regions, in order): those planting
    /// will change.
    pub(super) fn only(mut self, pages: Vec<u64>) -> MemorySample {
        self.only = Some(pages);
        self.planted_share = 1.0;
        self
    }

    /// Without [`MemorySample::only`]: planting will change this share of memory's pages,
    /// chosen at random and each changed alike, so of a content's other copies about that
    /// share will be pushed too.
    pub(super) fn planted_share(mut self, share: f64) -> MemorySample {
        self.planted_share = if share.is_finite() {
            share.clamp(0.0, 1.0)
        } else {
            1.0
        };
        self
    }

    /// How many copies of `page`'s content the push will send, from the latest census (1
    /// before there is one).
    fn copies(&self, page: &[u8]) -> f64 {
        let Some(counts) = &self.counts else {
            return 1.0;
        };
        let in_memory = counts.get(&(page_hash(page) as u64)).copied().unwrap_or(1);
        1.0 + f64::from(in_memory.max(1) - 1) * self.planted_share
    }

    /// The pages planting will change.
    fn population(&self) -> u64 {
        match &self.only {
            None => self.regions.iter().map(|r| r.pages()).sum(),
            Some(pages) => pages.len() as u64,
        }
    }

    /// Starts the census thread once, if the policy allows references; takes what it
    /// published last (without waiting for it).
    fn follow_census(&mut self) {
        if self.census.is_none()
            && self.counts.is_none()
            && self.policy.dedup != Mode::Off
            && self.population() > 0
        {
            // Without the thread the estimate leaves references out, as it did before.
            self.census = CensusThread::start(self.regions.clone(), self.only.clone()).ok();
        }
        if let Some(latest) = self.census.as_ref().and_then(CensusThread::latest) {
            self.counts = Some(latest);
        }
    }

    /// Stops the census thread (the evacuation starts: what will cross is fixed); the
    /// estimates keep its last census.
    pub(super) fn stop_census(&mut self) {
        if let Some(latest) = self.census.take().and_then(|c| c.latest()) {
            self.counts = Some(latest);
        }
    }

    /// The estimate: (pages sampled, their encoded bytes), a fresh one at the first call
    /// and every [`EVERY`] calls after; `None` if there is no page to sample.
    pub(super) fn take(&mut self) -> Option<(u64, u64)> {
        let fresh = self.calls.is_multiple_of(EVERY);
        self.calls = self.calls.wrapping_add(1);
        if fresh {
            self.last = self.estimate();
        }
        self.last
    }

    fn estimate(&mut self) -> Option<(u64, u64)> {
        self.follow_census();
        let total = self.population();
        let mut sample = WireSample::new(self.policy);
        for _ in 0..if total > 0 { PAGES } else { 0 } {
            self.x ^= self.x << 13;
            self.x ^= self.x >> 7;
            self.x ^= self.x << 17;
            let i = self.x % total;
            let n = match &self.only {
                None => i,
                Some(pages) => pages[i as usize],
            };
            if !read_page(&self.regions, n, &mut self.page) {
                continue;
            }
            // Copies are counted before planting changes the page: it changes each copy
            // alike.
            let copies = self.copies(&self.page);
            // As planting will change it (`workload::dirty_fraction`): a zero page becomes
            // a small lz4 block, or a whole page without lz4.
            let w = u64::from_ne_bytes(self.page[..8].try_into().expect("a page"));
            self.page[..8].copy_from_slice(&w.wrapping_add(1).to_ne_bytes());
            sample.add_copies(&self.page, copies);
        }
        (sample.pages() > 0).then(|| (sample.pages(), sample.bytes()))
    }
}

/// Copies page `n` of `regions` (in order) into `out`; false past their end. The guest
/// may write it meanwhile; a torn copy only skews one sample of an estimate.
fn read_page(regions: &[HostRegion], mut n: u64, out: &mut [u8]) -> bool {
    for r in regions {
        if n < r.pages() {
            return r.read_shared(n, out);
        }
        n -= r.pages();
    }
    false
}

/// The thread that counts the contents of the pages planting will change (`only`, or all
/// of `regions`) every [`CENSUS_EVERY`], at `SCHED_IDLE` (it only takes CPU nothing else
/// wants: a 1 GiB guest, a few hundred ms). Dropping it stops and joins the thread, which
/// checks before every page it reads: it never reads after its owner is gone.
struct CensusThread {
    shared: Arc<CensusShared>,
    handle: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct CensusShared {
    latest: Mutex<Option<Arc<Census>>>,
    stop: AtomicBool,
    /// Wakes the thread's sleep between censuses when it is told to stop.
    wake: Condvar,
    sleeping: Mutex<()>,
}

impl CensusThread {
    fn start(regions: Vec<HostRegion>, only: Option<Vec<u64>>) -> std::io::Result<CensusThread> {
        let shared = Arc::new(CensusShared::default());
        let theirs = shared.clone();
        let handle = std::thread::Builder::new()
            .name("wire-census".into())
            .spawn(move || take_censuses(&regions, only.as_deref(), &theirs))?;
        Ok(CensusThread {
            shared,
            handle: Some(handle),
        })
    }

    /// The latest census, if one is done and the thread is not publishing right now.
    fn latest(&self) -> Option<Arc<Census>> {
        self.shared.latest.try_lock().ok()?.clone()
    }
}

impl Drop for CensusThread {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // Under the sleep's lock, so that the wake cannot fall between its check and its wait.
        let guard = self
            .shared
            .sleeping
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.shared.wake.notify_all();
        drop(guard);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn take_censuses(regions: &[HostRegion], only: Option<&[u64]>, shared: &CensusShared) {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sets this thread's own policy (pid 0) from a valid `sched_param`; a failure
    // only leaves it at normal priority.
    unsafe {
        libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
    }
    let mut page = vec![0u8; PAGE_SIZE];
    let total: u64 = match only {
        Some(pages) => pages.len() as u64,
        None => regions.iter().map(|r| r.pages()).sum(),
    };
    loop {
        let mut counts = Census::new();
        for i in 0..total {
            // Before every read: the regions' owner may drop them once this has stopped.
            if shared.stop.load(Ordering::Relaxed) {
                return;
            }
            let n = only.map_or(i, |pages| pages[i as usize]);
            if read_page(regions, n, &mut page) {
                *counts.entry(page_hash(&page) as u64).or_insert(0) += 1;
            }
        }
        // Only contents that repeat count; the others are 1 by default.
        counts.retain(|_, k| *k > 1);
        counts.shrink_to_fit();
        // The old census is freed after the lock is released.
        let old = shared
            .latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(Arc::new(counts));
        drop(old);
        let asleep = shared.sleeping.lock().unwrap_or_else(|e| e.into_inner());
        let _ = shared.wake.wait_timeout_while(asleep, CENSUS_EVERY, |_| {
            !shared.stop.load(Ordering::Relaxed)
        });
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(pages: &[u8]) -> (memmap2::MmapMut, Vec<HostRegion>) {
        let mut m = memmap2::MmapMut::map_anon(pages.len() * PAGE_SIZE).unwrap();
        for (i, &fill) in pages.iter().enumerate() {
            let p = &mut m[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
            if fill == 0xff {
                // Incompressible.
                let mut x = i as u64 + 1;
                for b in p.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
            } else {
                p.fill(fill);
            }
        }
        // SAFETY: `m` is returned with the region and outlives every use in these tests.
        let r = unsafe { HostRegion::from_raw(m.as_mut_ptr(), m.len(), false) };
        (m, vec![r])
    }

    #[test]
    fn the_estimate_is_what_the_push_would_make_of_the_planted_pages() {
        // Half zero, half incompressible.
        let (_m, regions) = image(&[0, 0xff, 0, 0xff, 0, 0xff, 0, 0xff]);
        let ratio = |s: &mut MemorySample| {
            let (pages, bytes) = s.take().unwrap();
            bytes as f64 / (pages * PAGE_SIZE as u64) as f64
        };
        // Each page with a word changed: a zero page then a small lz4 block, or a whole
        // page without lz4.
        let mut lz4 = MemorySample::new(regions.clone(), EncodingPolicy::AUTO, 7);
        let r = ratio(&mut lz4);
        assert!((0.3..0.7).contains(&r), "{r}");
        let mut raw = MemorySample::new(regions, EncodingPolicy::OFF, 7);
        assert!(ratio(&mut raw) > 1.0);
        // Only the pages planting will change: the zero ones, each a small lz4 block.
        let (_m, regions) = image(&[0, 0xff, 0, 0xff]);
        let mut zeros = MemorySample::new(regions, EncodingPolicy::AUTO, 7).only(vec![0, 2]);
        assert!(ratio(&mut zeros) < 0.02);
        // Compressible pages.
        let (_m, text) = image(&[1, 2, 3, 4]);
        let mut lz4 = MemorySample::new(text, EncodingPolicy::AUTO, 7);
        assert!(ratio(&mut lz4) < 0.05);
        // The planted pages change as the guest runs: the estimate follows within EVERY
        // calls.
        let (mut m, regions) = image(&[0, 0, 0, 0]);
        let mut s = MemorySample::new(regions, EncodingPolicy::AUTO, 7);
        assert!(ratio(&mut s) < 0.02);
        let (written, _) = image(&[0xff; 4]);
        m.copy_from_slice(&written);
        for _ in 1..EVERY {
            assert!(ratio(&mut s) < 0.02);
        }
        assert!(ratio(&mut s) > 1.0);
        // Nothing to sample, or no page planted: no estimate.
        let (_m, regions) = image(&[1]);
        let mut none = MemorySample::new(regions, EncodingPolicy::AUTO, 7).only(Vec::new());
        assert_eq!(none.take(), None);
        assert_eq!(
            MemorySample::new(Vec::new(), EncodingPolicy::AUTO, 7).take(),
            None
        );
    }

    /// Memory of 32 copies of one incompressible page and 32 unique ones.
    fn duplicated() -> (memmap2::MmapMut, Vec<HostRegion>) {
        let (mut m, regions) = image(&[0xff; 64]);
        let first = m[..PAGE_SIZE].to_vec();
        for i in 1..32 {
            m[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].copy_from_slice(&first);
        }
        (m, regions)
    }

    /// A fresh estimate (every `EVERY` takes) from `s`, once its census is in.
    fn settled_ratio(s: &mut MemorySample) -> f64 {
        s.take();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while s.counts.is_none() {
            s.follow_census();
            assert!(std::time::Instant::now() < deadline, "no census");
            std::thread::sleep(Duration::from_millis(10));
        }
        for _ in 1..EVERY {
            s.take();
        }
        let (pages, bytes) = s.take().unwrap();
        bytes as f64 / (pages * PAGE_SIZE as u64) as f64
    }

    #[test]
    fn copies_of_a_page_count_as_references_after_the_first() {
        let (_m, regions) = duplicated();
        // Half the pages: one content 32 times (one raw copy, 31 references); half unique.
        let mut all = MemorySample::new(regions.clone(), EncodingPolicy::ALL, 7);
        let r = settled_ratio(&mut all);
        assert!((0.45..0.6).contains(&r), "{r}");
        // A quarter of memory planted: of a page's 31 other copies about 8 are pushed too.
        let mut quarter =
            MemorySample::new(regions.clone(), EncodingPolicy::ALL, 7).planted_share(0.25);
        let q = settled_ratio(&mut quarter);
        assert!(q > r + 0.02 && q < 0.7, "{q} against {r}");
        // Without references every page goes raw, and no census is taken.
        let mut off = MemorySample::new(regions, EncodingPolicy::OFF, 7);
        assert!(off.take().unwrap().1 > 1024 * PAGE_SIZE as u64);
        assert!(off.census.is_none());
        // Stopped (the evacuation starts), the estimate keeps the last census.
        all.stop_census();
        assert!(all.census.is_none());
        let again = settled_ratio(&mut all);
        assert!((0.45..0.6).contains(&again), "{again}");
    }
}
