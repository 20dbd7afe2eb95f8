//! A source's estimate of what its evacuation's encoding will make of its stale pages
//! where it will plant them (`replicate --stale-pct`: a uniform sample of memory; `vm
//! source --stale-pct`: pages of the guest's working set; each page's first word
//! changed), from those pages sampled while the VM waits for its turn: the orchestrator
//! plans the VM in the bytes that will cross (docs/fleet.md, "Encoded VMs"). Without
//! planting the stale pages are pages the guest wrote, which the replicator samples
//! (`vmm_shim::replica::WrittenPages`).

use transport::encoding::{EncodingPolicy, WireSample};
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

/// Samples guest memory at random for [`WireSample`], each page changed as planting will
/// change it.
pub(super) struct MemorySample {
    regions: Vec<HostRegion>,
    /// The pages planting will change (page numbers across the regions, in order); `None`:
    /// a uniform sample of all of them.
    only: Option<Vec<u64>>,
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
        self
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
        let total = match &self.only {
            None => self.regions.iter().map(|r| r.pages()).sum(),
            Some(pages) => pages.len() as u64,
        };
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
            if !self.read(n) {
                continue;
            }
            // As planting will change it (`workload::dirty_fraction`): a zero page becomes
            // a small lz4 block, or a whole page without lz4.
            let w = u64::from_ne_bytes(self.page[..8].try_into().expect("a page"));
            self.page[..8].copy_from_slice(&w.wrapping_add(1).to_ne_bytes());
            sample.add(&self.page);
        }
        (sample.pages() > 0).then(|| (sample.pages(), sample.bytes()))
    }

    /// Copies page `n` of the regions (in order) into `self.page`.
    fn read(&mut self, mut n: u64) -> bool {
        for r in &self.regions {
            if n < r.pages() {
                let at = r.host_addr() + n as usize * PAGE_SIZE;
                // SAFETY: the page lies inside the region (n < its pages), which the
                // `HostRegion` keeps mapped while this holds it. The guest may write it
                // meanwhile; a torn copy only skews one sample of an estimate.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        at as *const u8,
                        self.page.as_mut_ptr(),
                        PAGE_SIZE,
                    );
                }
                return true;
            }
            n -= r.pages();
        }
        false
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
}
