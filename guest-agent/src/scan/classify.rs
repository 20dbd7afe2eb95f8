//! Per-frame classification into hot and free, fed frame by frame in ascending order. Pure:
//! the I/O is in [`super::kpage`] and [`super::softdirty`], so this is tested with made-up
//! flags.

use super::flags::{
    ALWAYS_HOT, INHERITED_BY_TAILS, KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL, KPF_LRU, NEVER_HOT,
};
use super::free::{BuddyTracker, FreeMode};
use super::ranges::{self, RangeBuilder};
use crate::proto::PfnRange;

/// What one frame's access tracking says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// From `/sys/kernel/mm/page_idle/bitmap`: `Some(true)` if the frame's idle bit is still
    /// set (not accessed since it was set), `None` if idle tracking is not in use.
    pub idle: Option<bool>,
    /// From soft-dirty tracking: some process wrote the frame during the interval.
    pub written: bool,
}

/// Hot and free ranges of one pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Classified {
    /// Hot frames, free frames removed.
    pub hot: Vec<PfnRange>,
    /// Free frames (see [`super::free`]).
    pub free: Vec<PfnRange>,
}

/// Classifies frames pushed in ascending order.
#[derive(Debug)]
pub struct Classifier {
    hot: RangeBuilder,
    free: BuddyTracker,
    /// Flags of the last compound head, passed on to its tails.
    head_flags: u64,
    next: u64,
}

impl Classifier {
    /// A classifier for a kernel that marks free pages per `mode` and whose largest buddy
    /// order is `max_order`.
    pub fn new(mode: FreeMode, max_order: u32) -> Classifier {
        Classifier {
            hot: RangeBuilder::new(),
            free: BuddyTracker::new(mode, max_order),
            head_flags: 0,
            next: 0,
        }
    }

    /// Whether a frame with (effective) `flags` and `access` is hot: accessed during the
    /// interval (idle bit cleared on an LRU page, or written), or on the active list, slab
    /// or a page table; never if free, a hole, offline or poisoned.
    pub fn is_hot(flags: u64, access: Access) -> bool {
        if flags & NEVER_HOT != 0 {
            return false;
        }
        let accessed_idle = access.idle == Some(false) && flags & KPF_LRU != 0;
        access.written || accessed_idle || flags & ALWAYS_HOT != 0
    }

    /// Takes frame `pfn` (must be the frame after the previous one; a gap is treated as
    /// frames with no page).
    pub fn push(&mut self, pfn: u64, flags: u64, access: Access) {
        debug_assert!(pfn >= self.next);
        self.next = pfn + 1;
        self.free.push(pfn, flags);
        let effective = if flags & KPF_COMPOUND_HEAD != 0 {
            self.head_flags = flags;
            flags
        } else if flags & KPF_COMPOUND_TAIL != 0 {
            flags | (self.head_flags & INHERITED_BY_TAILS)
        } else {
            flags
        };
        if Self::is_hot(effective, access) {
            self.hot.push_pfn(pfn);
        }
    }

    /// The result; `end` is one past the last frame pushed. A frame both written during the
    /// interval and free now was freed since: it is reported free only.
    pub fn finish(self, end: u64) -> Classified {
        let free = self.free.finish(end);
        let hot = ranges::subtract(&self.hot.finish(), &free);
        Classified { hot, free }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::flags::*;

    fn run(frames: &[(u64, Access)]) -> Classified {
        let mut c = Classifier::new(FreeMode::HeadOnly, 10);
        for (pfn, &(flags, access)) in frames.iter().enumerate() {
            c.push(pfn as u64, flags, access);
        }
        c.finish(frames.len() as u64)
    }

    const NONE: Access = Access {
        idle: None,
        written: false,
    };
    const IDLE: Access = Access {
        idle: Some(true),
        written: false,
    };
    const USED: Access = Access {
        idle: Some(false),
        written: false,
    };
    const WRITTEN: Access = Access {
        idle: None,
        written: true,
    };

    fn r(v: &[(u64, u64)]) -> Vec<PfnRange> {
        v.iter().map(|&(a, b)| PfnRange::new(a, b)).collect()
    }

    #[test]
    fn idle_tracking_counts_only_lru_pages() {
        // A non-LRU page reads "not idle" from the bitmap (the kernel skips it): not hot.
        let c = run(&[
            (KPF_LRU | KPF_ANON, USED),
            (KPF_LRU | KPF_ANON, IDLE),
            (0, USED),
            (KPF_RESERVED, USED),
            (KPF_LRU, USED),
        ]);
        assert_eq!(c.hot, r(&[(0, 1), (4, 1)]));
    }

    #[test]
    fn active_slab_and_page_tables_are_hot_without_access() {
        let c = run(&[
            (KPF_LRU | KPF_ACTIVE, IDLE),
            (KPF_SLAB, NONE),
            (KPF_PGTABLE, NONE),
            (KPF_LRU, NONE),
            (KPF_RESERVED, NONE),
        ]);
        assert_eq!(c.hot, r(&[(0, 3)]));
    }

    #[test]
    fn compound_tails_inherit_from_their_head() {
        // A 4-page THP whose tails report only COMPOUND_TAIL (Linux < 6.9).
        let head = KPF_COMPOUND_HEAD | KPF_THP | KPF_LRU | KPF_ANON;
        let tail = KPF_COMPOUND_TAIL | KPF_THP | KPF_ANON;
        let c = run(&[
            (head, USED),
            (tail, USED),
            (tail, USED),
            (tail, USED),
            (0, USED),
        ]);
        assert_eq!(c.hot, r(&[(0, 4)]));
        // An idle THP stays cold, tails too.
        let c = run(&[(head, IDLE), (tail, IDLE), (tail, IDLE), (tail, IDLE)]);
        assert_eq!(c.hot, vec![]);
        // A slab of order 1: the tail is slab too.
        let c = run(&[
            (KPF_COMPOUND_HEAD | KPF_SLAB, NONE),
            (KPF_COMPOUND_TAIL, NONE),
        ]);
        assert_eq!(c.hot, r(&[(0, 2)]));
    }

    #[test]
    fn written_frames_are_hot_unless_free_now() {
        // Frames 4..8 are a free block now, though frame 5 was written during the interval.
        let mut frames = vec![(KPF_LRU, NONE); 4];
        frames.push((KPF_BUDDY, NONE));
        frames.push((0, WRITTEN));
        frames.push((0, NONE));
        frames.push((0, NONE));
        frames[1].1 = WRITTEN;
        let c = run(&frames);
        assert_eq!(c.hot, r(&[(1, 1)]));
        assert_eq!(c.free, r(&[(4, 4)]));
    }

    #[test]
    fn holes_and_free_heads_are_never_hot() {
        let c = run(&[
            (KPF_NOPAGE, WRITTEN),
            (KPF_BUDDY, USED),
            (KPF_OFFLINE | KPF_ACTIVE, USED),
        ]);
        assert_eq!(c.hot, vec![]);
        assert_eq!(c.free, r(&[(1, 1)]));
    }

    #[test]
    fn hot_and_free_never_overlap() {
        // Pseudo-random flags: whatever they are, the two lists are disjoint and valid.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let choices = [
            0,
            KPF_BUDDY,
            KPF_LRU,
            KPF_ACTIVE,
            KPF_SLAB,
            KPF_COMPOUND_TAIL,
            KPF_NOPAGE,
        ];
        let frames: Vec<(u64, Access)> = (0..5000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let f = choices[(x % choices.len() as u64) as usize];
                (
                    f,
                    Access {
                        idle: Some(x & 64 == 0),
                        written: x & 128 == 0,
                    },
                )
            })
            .collect();
        let c = run(&frames);
        crate::proto::validate_ranges(&c.hot, 0).unwrap();
        crate::proto::validate_ranges(&c.free, 0).unwrap();
        assert_eq!(ranges::subtract(&c.hot, &c.free), c.hot);
    }
}
