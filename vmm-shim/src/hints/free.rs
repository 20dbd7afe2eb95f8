//! Free-page skipping: which reported-free pages may cross as zero pages, and the page
//! reader that sends them so.
//!
//! # The rules
//!
//! A page the agent reported free is zero-filled at the destination, without its content
//! crossing, only if all of these hold ([`skippable_free`] checks them):
//!
//! 1. **The guest does not poison freed pages** (`Hello.poison_on_free == false`). With
//!    `page_poison=1` the guest kernel fills freed pages with a pattern and may check it
//!    when it allocates them again, so a zero page would read as corruption; the `Hello`
//!    flag does not say whether the kernel zeroes (`init_on_free`) or poisons, so any
//!    overwrite-on-free keeps every page's content. Without it, a free page's content is
//!    garbage that the guest kernel overwrites or zeroes before any use.
//! 2. **Dirty tracking ran since before the agent's scan**: the tracker's baseline
//!    ([`DirtyBaseline::arm`]) precedes [`super::Hints::scanned_after`]. A page allocated
//!    after the scan is written before use, so it shows up dirty.
//! 3. **The page is clean since the baseline** at the final harvest, taken with the guest
//!    paused, and no host-side writer (the VMM, device DMA) wrote it — dirty logs such as
//!    KVM's see only vCPU writes, so the VMM passes the pages it wrote itself.
//!
//! The result is the only thing in faultline that makes destination memory differ from the
//! source's on purpose: after migration the destination holds the source's memory at
//! switchover **with the skipped pages zeroed** ([`zeroed_digest`] computes that digest
//! on the source).
//!
//! # How the pages are sent
//!
//! Skipped pages go through the normal protocol as `PageKind::Zero` (one kind byte, no
//! payload): [`SkipFreeReader`] answers them from a static zero buffer, and the encoder
//! flags all-zero pages as zero pages. The alternative — leaving them out of the push and
//! announcing them in a page set — would need a protocol change on both sides and still
//! cost the destination a zero-page install per page; a kind byte per page (64 KiB per GiB
//! skipped) is all the in-band way costs. A `PageReader` returns one borrowed slice per
//! run, which cannot mix a zero buffer with guest memory, so the session keeps skipped
//! pages in runs of their own (`SourceConfig::zero_filled`); that adds one message header
//! per boundary between skipped and other pages, nothing per page.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use thiserror::Error;
use transport::bitmap::Bitmap;
use transport::message::MAX_PAGES_PER_MESSAGE;
use transport::quic::{Extent, PageReader};
use transport::PAGE_SIZE;
use uffd_core::{DirtyError, DirtyTracker};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use xxhash_rust::xxh3::Xxh3;

use super::Hints;
use crate::digest::GuestReadError;

/// Why reported-free pages may not be skipped.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SkipRefused {
    /// The agent said the guest kernel overwrites pages it frees ([`Hints::poison_on_free`]):
    /// a zero page could read as corruption, so no free page is skipped.
    #[error(
        "the guest poisons or zeroes freed pages (poison_on_free): free pages keep their content"
    )]
    PoisonOnFree,
    /// The report's scan may have started before dirty tracking did, so a page allocated
    /// and written between the two would not show as written. A later report, whose first
    /// part arrives at least [`super::BoardLimits::max_scan_age`] after
    /// [`DirtyBaseline::arm`], can pass.
    #[error("the agent's scan may predate dirty tracking (scan started after {scanned_after:?}, tracking since {tracking:?}); wait for a later report")]
    NotFresh {
        /// [`Hints::scanned_after`]; `None` (the bound is earlier than the clock can say)
        /// is always refused.
        scanned_after: Option<Instant>,
        /// When dirty tracking began ([`WrittenSince::since`]).
        tracking: Instant,
    },
    /// The hints and the dirty tracking are not for the same number of pages: they
    /// describe different memory.
    #[error("the hints cover {hints} pages, dirty tracking {tracked}")]
    Size {
        /// Pages of [`Hints::free`].
        hints: u64,
        /// Pages of [`WrittenSince::pages`].
        tracked: u64,
    },
}

/// Dirty tracking armed for free-page skipping: the first harvest, which sets the baseline
/// every later write is measured from.
///
/// The tracker must be harvested by nothing else until [`DirtyBaseline::finish`]: another
/// harvest would swallow writes that one must see. `finish` consumes the baseline, so the
/// final harvest happens once.
#[derive(Debug)]
pub struct DirtyBaseline {
    at: Instant,
}

impl DirtyBaseline {
    /// Harvests `tracker` once (a first harvest reports every page; they are dropped) and
    /// records when. Writes from here on are reported by the next harvest.
    pub fn arm(tracker: &mut dyn DirtyTracker) -> Result<DirtyBaseline, DirtyError> {
        let mut scratch = Vec::new();
        tracker.harvest(&mut scratch)?;
        // Taken after the harvest: a later baseline only makes the freshness rule stricter.
        Ok(DirtyBaseline { at: Instant::now() })
    }

    /// When the baseline was taken (just after its harvest); a report's scan must start
    /// no earlier than this for its free pages to be skipped.
    pub fn at(&self) -> Instant {
        self.at
    }

    /// The final harvest, on the paused source at switchover: every page of the `pages`
    /// tracked that was written since [`DirtyBaseline::arm`], by vCPUs (the tracker) or by
    /// the host (`host_written`: the VMM's own writes, device DMA, which a dirty log of
    /// guest writes does not see).
    pub fn finish(
        self,
        tracker: &mut dyn DirtyTracker,
        host_written: &[u64],
        pages: u64,
    ) -> Result<WrittenSince, DirtyError> {
        let mut dirty = Vec::new();
        tracker.harvest(&mut dirty)?;
        let mut written = Bitmap::new(pages);
        for &p in dirty.iter().chain(host_written) {
            written.set(p);
        }
        Ok(WrittenSince {
            since: self.at,
            pages: written,
        })
    }
}

/// Pages written between a [`DirtyBaseline`] and the switchover.
#[derive(Clone, Debug)]
pub struct WrittenSince {
    since: Instant,
    pages: Bitmap,
}

impl WrittenSince {
    /// When tracking began.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// The pages written, one bit per page (vCPU writes from the tracker and the host's
    /// own writes).
    pub fn pages(&self) -> &Bitmap {
        &self.pages
    }
}

/// The pages to skip, and why the others of the free list were kept.
#[derive(Clone, Debug)]
pub struct FreeSkip {
    /// The pages to send as zero pages, one bit per page: reported free and not written
    /// since the baseline.
    pub pages: Bitmap,
    /// Pages the agent reported free.
    pub reported_free: u64,
    /// Of those, pages written since the baseline (by vCPUs or by the host).
    pub written_since: u64,
}

impl FreeSkip {
    /// Pages to skip (`reported_free - written_since`).
    pub fn skipped(&self) -> u64 {
        self.pages.count_ones()
    }
}

/// The free pages of `hints` that may be zero-filled, given what was `written` between the
/// dirty-tracking baseline and the switchover.
///
/// A page reported free is skipped only if all of these hold:
///
/// 1. The guest kernel does not overwrite pages it frees (`poison_on_free` is false): with
///    page poisoning it may check the pattern when it allocates the page again, so a zero
///    page would read as corruption.
/// 2. The agent's scan started no earlier than the baseline (`scanned_after` is at or
///    after `written.since()`): a page allocated after the scan is written before use, so
///    it shows as written.
/// 3. The page was not written since the baseline, by vCPUs or by the host.
///
/// The first two, and that both bitmaps have the same number of pages, hold for the whole
/// report or it is refused ([`SkipRefused`]); the third is decided page by page.
pub fn skippable_free(hints: &Hints, written: &WrittenSince) -> Result<FreeSkip, SkipRefused> {
    if hints.poison_on_free {
        return Err(SkipRefused::PoisonOnFree);
    }
    if hints.scanned_after.is_none_or(|t| t < written.since) {
        return Err(SkipRefused::NotFresh {
            scanned_after: hints.scanned_after,
            tracking: written.since,
        });
    }
    if hints.free.len() != written.pages.len() {
        return Err(SkipRefused::Size {
            hints: hints.free.len(),
            tracked: written.pages.len(),
        });
    }
    let mut pages = Bitmap::new(hints.free.len());
    let mut dropped = 0;
    for p in hints.free.iter_ones() {
        if written.pages.get(p) {
            dropped += 1;
        } else {
            pages.set(p);
        }
    }
    Ok(FreeSkip {
        reported_free: hints.free.count_ones(),
        written_since: dropped,
        pages,
    })
}

/// Enough zeros for the longest run the protocol carries.
static ZEROS: [u8; MAX_PAGES_PER_MESSAGE * PAGE_SIZE] = [0; MAX_PAGES_PER_MESSAGE * PAGE_SIZE];

/// A [`PageReader`] that serves the pages of `skip` as zeros without reading them, and
/// everything else from `inner`.
///
/// A run must be all skipped or all not: the session splits its push runs that way when
/// `SourceConfig::zero_filled` is the same set, and demand replies are single pages. A
/// mixed run is an error (a misconfigured session), never a silent copy of the skipped
/// pages' content or zeros over real pages.
pub struct SkipFreeReader {
    inner: Arc<dyn PageReader>,
    skip: Bitmap,
}

impl SkipFreeReader {
    /// Serves the pages set in `skip` as zeros and the rest from `inner`.
    pub fn new(inner: Arc<dyn PageReader>, skip: Bitmap) -> SkipFreeReader {
        SkipFreeReader { inner, skip }
    }

    /// The pages served as zeros.
    pub fn skipped(&self) -> &Bitmap {
        &self.skip
    }
}

impl PageReader for SkipFreeReader {
    fn pages(&self, first: u64, count: usize) -> Result<Cow<'_, [u8]>, String> {
        let end = first.saturating_add(count as u64);
        let skipped = (first..end).filter(|&p| self.skip.get(p)).count();
        if skipped == 0 {
            return self.inner.pages(first, count);
        }
        if skipped < count {
            return Err(format!(
                "pages {first}+{count} mix {skipped} skipped free pages with others; \
                 the session must keep zero-filled pages in runs of their own"
            ));
        }
        ZEROS
            .get(..count * PAGE_SIZE)
            .map(Cow::Borrowed)
            .ok_or_else(|| format!("a run of {count} pages is longer than any message"))
    }

    fn extent(&self, first: u64, max: u64) -> Extent {
        if self.skip.get(first) {
            let end = self.skip.next_clear(first).unwrap_or(self.skip.len());
            return Extent::Zero((end - first).min(max));
        }
        // What `inner` knows, up to the next skipped page.
        let end = self.skip.next_set(first).unwrap_or(u64::MAX);
        self.inner.extent(first, max.min(end - first))
    }
}

/// xxh3-128 of all of `mem` with the pages of `zeroed` read as zeros and some u64 words
/// (guest-physical address, value; 8-byte aligned) as given, in the same form as
/// `refvmm::memory::digest` and `refvmm::Vm::switchover_memory_digest`: the digest a destination
/// must have after a migration that skipped `zeroed`. Pages are numbered from guest
/// address 0 across regions in address order (the reference VMM's single region).
pub fn zeroed_digest(
    mem: &GuestMemoryMmap,
    zeroed: &Bitmap,
    patches: &[(u64, u64)],
) -> Result<String, GuestReadError> {
    digest_pages(mem, zeroed, None, patches)
}

/// [`zeroed_digest`] of every page except those of `except`: for comparing a destination
/// whose guest went on running, and so may have written the pages of `except` (its
/// writable memory), with the source at switchover.
pub fn zeroed_digest_except(
    mem: &GuestMemoryMmap,
    zeroed: &Bitmap,
    except: &Bitmap,
) -> Result<String, GuestReadError> {
    digest_pages(mem, zeroed, Some(except), &[])
}

fn digest_pages(
    mem: &GuestMemoryMmap,
    zeroed: &Bitmap,
    except: Option<&Bitmap>,
    patches: &[(u64, u64)],
) -> Result<String, GuestReadError> {
    let mut h = Xxh3::new();
    let mut page = vec![0u8; PAGE_SIZE];
    let mut regions: Vec<_> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    regions.sort_unstable();
    let mut index = 0u64;
    for (start, len) in regions {
        for off in (0..len).step_by(PAGE_SIZE) {
            let gpa = start + off;
            let i = index;
            index += 1;
            if except.is_some_and(|e| e.get(i)) {
                continue;
            }
            if zeroed.get(i) {
                page.fill(0);
            } else {
                mem.read_slice(&mut page, GuestAddress(gpa))
                    .map_err(|source| GuestReadError { gpa, source })?;
            }
            for &(at, v) in patches {
                if (gpa..gpa + PAGE_SIZE as u64).contains(&at) && at % 8 == 0 {
                    let o = (at - gpa) as usize;
                    page[o..o + 8].copy_from_slice(&v.to_le_bytes());
                }
            }
            h.update(&page);
        }
    }
    Ok(format!("{:032x}", h.digest128()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ops::Range;

    struct Counting(Vec<u8>);
    impl PageReader for Counting {
        fn pages(&self, first: u64, count: usize) -> Result<Cow<'_, [u8]>, String> {
            let a = first as usize * PAGE_SIZE;
            self.0
                .get(a..a + count * PAGE_SIZE)
                .map(Cow::Borrowed)
                .ok_or_else(|| "out of range".to_string())
        }
    }

    struct Log(Vec<Vec<u64>>);
    impl DirtyTracker for Log {
        fn harvest(&mut self, out: &mut Vec<u64>) -> Result<(), DirtyError> {
            out.clear();
            if !self.0.is_empty() {
                out.extend(self.0.remove(0));
            }
            Ok(())
        }
        fn kind(&self) -> &'static str {
            "test"
        }
    }

    fn hints(free: Range<u64>, poison: bool, scanned_after: Option<Instant>) -> Hints {
        let mut f = Bitmap::new(16);
        for p in free {
            f.set(p);
        }
        Hints {
            seq: 1,
            hot: vec![],
            free: f,
            poison_on_free: poison,
            scanned_after,
        }
    }

    #[test]
    fn free_pages_written_since_the_baseline_are_not_skipped() {
        let mut t = Log(vec![(0..16).collect(), vec![3, 9]]);
        let base = DirtyBaseline::arm(&mut t).unwrap();
        let h = hints(2..10, false, Some(Instant::now()));
        let w = base.finish(&mut t, &[5, 12], 16).unwrap();
        let s = skippable_free(&h, &w).unwrap();
        assert_eq!(s.pages.iter_ones().collect::<Vec<_>>(), vec![2, 4, 6, 7, 8]);
        assert_eq!((s.reported_free, s.written_since, s.skipped()), (8, 3, 5));
    }

    #[test]
    fn poisoned_or_stale_reports_are_refused() {
        let mut t = Log(vec![]);
        let early = Instant::now();
        let w = DirtyBaseline::arm(&mut t)
            .unwrap()
            .finish(&mut t, &[], 16)
            .unwrap();
        let r = skippable_free(&hints(0..4, true, Some(Instant::now())), &w);
        assert_eq!(r.unwrap_err(), SkipRefused::PoisonOnFree);
        for scanned in [None, Some(early)] {
            let r = skippable_free(&hints(0..4, false, scanned), &w);
            assert!(matches!(r, Err(SkipRefused::NotFresh { .. })), "{r:?}");
        }
        let w32 = DirtyBaseline::arm(&mut t)
            .unwrap()
            .finish(&mut t, &[], 32)
            .unwrap();
        let r = skippable_free(&hints(0..4, false, Some(Instant::now())), &w32);
        assert_eq!(
            r.unwrap_err(),
            SkipRefused::Size {
                hints: 16,
                tracked: 32
            }
        );
    }

    #[test]
    fn reader_serves_skipped_runs_as_zeros_and_refuses_mixed_runs() {
        let mem: Vec<u8> = (0..8 * PAGE_SIZE)
            .map(|i| (i / PAGE_SIZE) as u8 + 1)
            .collect();
        let mut skip = Bitmap::new(8);
        skip.set(2);
        skip.set(3);
        let r = SkipFreeReader::new(Arc::new(Counting(mem.clone())), skip);
        assert_eq!(r.pages(0, 2).unwrap(), &mem[..2 * PAGE_SIZE]);
        assert!(r.pages(2, 2).unwrap().iter().all(|&b| b == 0));
        assert!(r.pages(3, 1).unwrap().iter().all(|&b| b == 0));
        let e = r.pages(1, 3).unwrap_err();
        assert!(e.contains("mix 2 skipped"), "{e}");
        assert_eq!(r.pages(4, 4).unwrap(), &mem[4 * PAGE_SIZE..]);
    }

    #[test]
    fn zeroed_digest_matches_a_memory_with_those_pages_zeroed() {
        let a = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let mut want = vec![0u8; 4 << 20];
        for p in 0..1024u64 {
            let v = vec![(p % 200) as u8 + 1; PAGE_SIZE];
            a.write_slice(&v, GuestAddress(p * 4096)).unwrap();
            if !(100..110).contains(&p) {
                want[p as usize * PAGE_SIZE..][..PAGE_SIZE].copy_from_slice(&v);
            }
        }
        want[8..16].copy_from_slice(&7u64.to_le_bytes());
        let want = crate::digest::digest(&want);
        let mut z = Bitmap::new(1024);
        for p in 100..110 {
            z.set(p);
        }
        assert_eq!(zeroed_digest(&a, &z, &[(8, 7)]).unwrap(), want);
        assert_ne!(
            zeroed_digest(&a, &Bitmap::new(1024), &[(8, 7)]).unwrap(),
            want
        );
    }
}
