//! Free frames from `/proc/kpageflags`.
//!
//! A free block of the buddy allocator is 2^order naturally aligned pages. Only its first
//! page carries the kernel's `PageBuddy` mark, and the order lives in `page->private`, which
//! no `/proc` or `/sys` file exports. What `/proc/kpageflags` says about the other pages
//! depends on the kernel:
//!
//! * **Linux 4.6 and later** (commit "proc/kpageflags: return KPF_BUDDY for "tail" buddy
//!   pages"): `stable_page_flags()` also sets `KPF_BUDDY` on every other page of a free
//!   block (`page_count == 0 && is_free_buddy_page()`). Free frames are then exactly the
//!   frames flagged `KPF_BUDDY` ([`FreeMode::EveryPage`]). Verified on the Debian 6.1 guest:
//!   the frames flagged add up to the sum of `/proc/buddyinfo`.
//! * **Older kernels** flag the first page only, and the extent of each block must be
//!   inferred ([`FreeMode::HeadOnly`]): a block of order k starts at a frame aligned to 2^k,
//!   k is at most the largest order (columns of `/proc/buddyinfo` minus one), and every other
//!   page of the block has no flag at all (flags are cleared when a page is freed). The
//!   inferred block is the largest aligned power of two from the head whose other pages all
//!   have flags 0. That is an upper bound: an allocated page with no flags (a vmalloc or
//!   kernel-stack page) right after a smaller free block is counted in. Since every
//!   inferred order is at least the true one, an inferred total equal to the `buddyinfo`
//!   total proves the inference exact, and a larger one bounds the over-count; the scanner
//!   reports both totals.
//!
//! Either way, free pages sitting in the per-CPU page lists are not `KPF_BUDDY` and are not
//! reported (an under-count, the safe direction), and a page free during the scan may be
//! allocated right after it: free ranges are advice.

use super::flags::KPF_BUDDY;
use super::ranges::RangeBuilder;
use crate::proto::PfnRange;

/// The largest buddy order when `/proc/buddyinfo` cannot be read (x86-64's `MAX_ORDER`).
pub const DEFAULT_MAX_ORDER: u32 = 10;

/// What `KPF_BUDDY` marks on the running kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreeMode {
    /// Every page of a free block (Linux 4.6 and later).
    EveryPage,
    /// Only the first page of a free block (older kernels): extents are inferred.
    HeadOnly,
}

impl FreeMode {
    /// The mode of a kernel release string such as `6.1.0-56-amd64`; `EveryPage` if it
    /// does not parse (any kernel still in use is newer than 4.6).
    pub fn for_release(release: &str) -> FreeMode {
        let mut it = release.trim().split(|c: char| !c.is_ascii_digit());
        let major: u32 = it.next().and_then(|v| v.parse().ok()).unwrap_or(u32::MAX);
        let minor: u32 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        if (major, minor) >= (4, 6) {
            FreeMode::EveryPage
        } else {
            FreeMode::HeadOnly
        }
    }

    /// The name used in logs.
    pub fn name(self) -> &'static str {
        match self {
            FreeMode::EveryPage => "every-page",
            FreeMode::HeadOnly => "head-only",
        }
    }
}

/// Streams frames in ascending order and collects the free frames.
#[derive(Debug)]
pub struct BuddyTracker {
    mode: FreeMode,
    max_order: u32,
    /// Head frame and the end of the largest block it could start.
    open: Option<(u64, u64)>,
    out: RangeBuilder,
}

impl BuddyTracker {
    /// A tracker for a kernel marking free pages per `mode`, whose largest buddy order is
    /// `max_order` (used in [`FreeMode::HeadOnly`] only).
    pub fn new(mode: FreeMode, max_order: u32) -> BuddyTracker {
        BuddyTracker {
            mode,
            max_order: max_order.min(40),
            open: None,
            out: RangeBuilder::new(),
        }
    }

    /// Takes the flags of frame `pfn`; frames must come in ascending order without gaps
    /// (a gap ends an open block there).
    pub fn push(&mut self, pfn: u64, flags: u64) {
        if self.mode == FreeMode::EveryPage {
            if flags & KPF_BUDDY != 0 {
                self.out.push_pfn(pfn);
            }
            return;
        }
        if let Some((head, limit)) = self.open {
            if pfn < limit && flags == 0 {
                return;
            }
            self.close(head, pfn.min(limit));
        }
        if flags & KPF_BUDDY != 0 {
            let align = if pfn == 0 {
                self.max_order
            } else {
                pfn.trailing_zeros().min(self.max_order)
            };
            self.open = Some((pfn, pfn + (1u64 << align)));
        }
    }

    /// Ends the stream: `end` is one past the last frame pushed. Returns the free ranges.
    pub fn finish(mut self, end: u64) -> Vec<PfnRange> {
        if let Some((head, limit)) = self.open.take() {
            self.close(head, end.min(limit));
        }
        self.out.finish()
    }

    /// Records the block at `head`: the largest power of two that fits before `stop`.
    fn close(&mut self, head: u64, stop: u64) {
        self.open = None;
        let room = stop.saturating_sub(head).max(1);
        let size = 1u64 << (63 - room.leading_zeros());
        self.out.push_range(head, size);
    }
}

/// Sum of the free pages `/proc/buddyinfo` lists (count × 2^order over all zones), and the
/// largest order (columns − 1). `None` if the text has no zone line.
pub fn parse_buddyinfo(text: &str) -> Option<(u64, u32)> {
    let mut total = 0u64;
    let mut orders = None;
    for line in text.lines() {
        // "Node 0, zone   Normal   1   2   3 ..."
        let Some((_, counts)) = line.split_once("zone") else {
            continue;
        };
        let mut fields = counts.split_whitespace();
        fields.next()?; // the zone name
        let mut n = 0u32;
        for (order, f) in fields.enumerate() {
            let c: u64 = f.parse().ok()?;
            total = total.saturating_add(c.saturating_mul(1u64 << order.min(62)));
            n += 1;
        }
        orders = Some(orders.map_or(n, |o: u32| o.max(n)));
    }
    let n = orders?;
    Some((total, n.saturating_sub(1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::flags::{KPF_LRU, KPF_NOPAGE};

    /// Runs the tracker over `flags` (frame i has flags[i]).
    fn infer(flags: &[u64], max_order: u32) -> Vec<(u64, u64)> {
        let mut t = BuddyTracker::new(FreeMode::HeadOnly, max_order);
        for (pfn, &f) in flags.iter().enumerate() {
            t.push(pfn as u64, f);
        }
        let r = t.finish(flags.len() as u64);
        r.iter().map(|r| (r.first, r.count)).collect()
    }

    const B: u64 = KPF_BUDDY;
    const U: u64 = KPF_LRU; // some in-use page

    #[test]
    fn whole_aligned_blocks() {
        // An order-3 block at 0, an order-2 block at 8, an order-2 at 12 (kept separate
        // heads, coalesced into one range by the builder).
        let mut f = vec![0; 16];
        f[0] = B;
        f[8] = B;
        f[12] = B;
        assert_eq!(infer(&f, 10), vec![(0, 16)]);
    }

    #[test]
    fn block_ends_at_first_flagged_page() {
        // Head at 8 (aligned to 8), in-use page at 11: the block can only be 2 pages.
        let mut f = vec![U; 16];
        f[8] = B;
        f[9] = 0;
        f[10] = 0;
        assert_eq!(infer(&f, 10), vec![(8, 2)]);
    }

    #[test]
    fn alignment_bounds_the_order() {
        // Head at 6 (aligned to 2 only): at most 2 pages even if zeros follow.
        let mut f = vec![0; 16];
        f[6] = B;
        assert_eq!(infer(&f, 10), vec![(6, 2)]);
        // Head at 5: a single page.
        let mut f = vec![0; 16];
        f[5] = B;
        assert_eq!(infer(&f, 10), vec![(5, 1)]);
    }

    #[test]
    fn max_order_bounds_the_size() {
        let mut f = vec![0; 64];
        f[0] = B;
        f[32] = U;
        assert_eq!(infer(&f, 3), vec![(0, 8)]);
        assert_eq!(infer(&f, 10), vec![(0, 32)]);
    }

    #[test]
    fn holes_and_the_end_of_memory_end_blocks() {
        let mut f = vec![0; 8];
        f[0] = B;
        f[3] = KPF_NOPAGE;
        assert_eq!(infer(&f, 10), vec![(0, 2)]);
        let mut f = vec![0; 6];
        f[4] = B;
        assert_eq!(infer(&f, 10), vec![(4, 2)]);
    }

    #[test]
    fn zero_flag_pages_without_a_head_are_not_free() {
        assert_eq!(infer(&[0; 32], 10), vec![]);
        let mut f = vec![0; 8];
        f[1] = B;
        assert_eq!(infer(&f, 10), vec![(1, 1)]);
    }

    #[test]
    fn every_page_mode_takes_the_flag_as_is() {
        // Zero-flag pages after a flagged one are allocated, not free, on new kernels.
        let f = [B, B, B, 0, 0, U, B, 0];
        let mut t = BuddyTracker::new(FreeMode::EveryPage, 10);
        for (pfn, &fl) in f.iter().enumerate() {
            t.push(pfn as u64, fl);
        }
        let r: Vec<(u64, u64)> = t.finish(8).iter().map(|r| (r.first, r.count)).collect();
        assert_eq!(r, vec![(0, 3), (6, 1)]);
    }

    #[test]
    fn mode_from_release() {
        assert_eq!(FreeMode::for_release("6.1.0-56-amd64"), FreeMode::EveryPage);
        assert_eq!(FreeMode::for_release("4.6.0"), FreeMode::EveryPage);
        assert_eq!(FreeMode::for_release("4.5.7-generic"), FreeMode::HeadOnly);
        assert_eq!(
            FreeMode::for_release("3.10.0-1160.el7.x86_64"),
            FreeMode::HeadOnly
        );
        assert_eq!(FreeMode::for_release("weird"), FreeMode::EveryPage);
    }

    #[test]
    fn buddyinfo() {
        let text = "Node 0, zone      DMA      1      1      0      0      2      1      1      0      1      1      3 \n\
                    Node 0, zone    DMA32      3      2      2      3      3      2      3      2      2      2     97 \n";
        let (total, max) = parse_buddyinfo(text).unwrap();
        assert_eq!(max, 10);
        let dma = 1 + 2 + 2 * 16 + 32 + 64 + 256 + 512 + 3 * 1024;
        let dma32 = 3 + 4 + 8 + 24 + 48 + 64 + 192 + 256 + 512 + 1024 + 97 * 1024;
        assert_eq!(total, dma + dma32);
        assert_eq!(parse_buddyinfo(""), None);
        assert_eq!(parse_buddyinfo("Node 0, zone DMA x"), None);
    }
}
