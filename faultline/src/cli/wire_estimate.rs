//! A source's estimate of what its evacuation's encoding will make of its stale pages
//! where it will plant them (`replicate --stale-pct`: a uniform sample of memory; `vm
//! source --stale-pct`: pages of the guest's working set; each page's first word
//! changed), from those pages sampled while the VM waits for its turn: the orchestrator
//! plans the VM in the bytes that will cross (docs/fleet.md, "Encoded VMs"). Without
//! planting the stale pages are pages the guest wrote, which the replicator samples
//! (`vmm_shim::replica::WrittenPages`).

use transport::encoding::{EncodingPolicy, WireSample};
use uffd_core::{HostRegion, PAGE_SIZE};

/// Pages added at each [`MemorySample::take`] (lz4 of a page takes a few µs).
const PAGES: usize = 8;
/// On the first call: enough for an estimate within a few per cent at once (a page's
/// ratio varies by about 0.4 in a mixed image: 1,024 pages put the mean within about
/// 0.012).
const FIRST_PAGES: usize = 1024;

/// Samples guest memory at random for [`WireSample`], each page changed as planting will
/// change it.
pub(super) struct MemorySample {
    regions: Vec<HostRegion>,
    /// The pages planting will change (page numbers across the regions, in order); empty:
    /// a uniform sample of all of them.
    only: Vec<u64>,
    sample: WireSample,
    x: u64,
    page: Vec<u8>,
}

impl MemorySample {
    pub(super) fn new(regions: Vec<HostRegion>, policy: EncodingPolicy, seed: u64) -> MemorySample {
        MemorySample {
            regions,
            only: Vec::new(),
            sample: WireSample::new(policy),
            x: seed | 1,
            page: vec![0; PAGE_SIZE],
        }
    }

    /// Samples only `pages` (page numbers across the regions, in order): those planting
    /// will change.
    pub(super) fn only(mut self, pages: Vec<u64>) -> MemorySample {
        self.only = pages;
        self
    }

    /// Samples a few more pages; returns (pages sampled, their encoded bytes), `None`
    /// before any page was sampled.
    pub(super) fn take(&mut self) -> Option<(u64, u64)> {
        let total = match self.only.len() as u64 {
            0 => self.regions.iter().map(|r| r.pages()).sum(),
            n => n,
        };
        let want = if self.sample.pages() == 0 {
            FIRST_PAGES
        } else {
            PAGES
        };
        for _ in 0..if total > 0 { want } else { 0 } {
            self.x ^= self.x << 13;
            self.x ^= self.x >> 7;
            self.x ^= self.x << 17;
            let i = self.x % total;
            let n = self.only.get(i as usize).copied().unwrap_or(i);
            if !self.read(n) {
                continue;
            }
            // As planting will change it (`workload::dirty_fraction`): a zero page becomes
            // a small lz4 block, or a whole page without lz4.
            let w = u64::from_ne_bytes(self.page[..8].try_into().expect("a page"));
            self.page[..8].copy_from_slice(&w.wrapping_add(1).to_ne_bytes());
            self.sample.add(&self.page);
        }
        (self.sample.pages() > 0).then(|| (self.sample.pages(), self.sample.bytes()))
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
        // Nothing to sample: no estimate.
        assert_eq!(
            MemorySample::new(Vec::new(), EncodingPolicy::AUTO, 7).take(),
            None
        );
    }
}
