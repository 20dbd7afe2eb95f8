//! Sorted lists of frame ranges: building them from ascending frames, union, difference,
//! membership. The lists are what the protocol carries ([`PfnRange`]): sorted,
//! non-overlapping, non-empty, and coalesced (adjacent ranges merged).

use crate::proto::PfnRange;

/// Builds a coalesced range list from frames or ranges pushed in ascending order. Pushing
/// out of order is allowed but costs a sort in [`RangeBuilder::finish`].
#[derive(Debug, Default, Clone)]
pub struct RangeBuilder {
    ranges: Vec<PfnRange>,
    sorted: bool,
}

impl RangeBuilder {
    /// An empty builder.
    pub fn new() -> RangeBuilder {
        RangeBuilder {
            ranges: Vec::new(),
            sorted: true,
        }
    }

    /// Adds frame `pfn`.
    pub fn push_pfn(&mut self, pfn: u64) {
        self.push_range(pfn, 1);
    }

    /// Adds frames `first..first + count` (nothing if `count` is 0).
    pub fn push_range(&mut self, first: u64, count: u64) {
        if count == 0 {
            return;
        }
        let end = first.saturating_add(count);
        if let Some(last) = self.ranges.last_mut() {
            if first >= last.first && first <= last.end() {
                if end > last.end() {
                    last.count = end - last.first;
                }
                return;
            }
            if first < last.first {
                self.sorted = false;
            }
        }
        self.ranges.push(PfnRange::new(first, end - first));
    }

    /// Frames added so far may be counted twice if they were pushed out of order.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The coalesced list.
    pub fn finish(self) -> Vec<PfnRange> {
        if self.sorted {
            self.ranges
        } else {
            normalize(self.ranges)
        }
    }
}

/// Sorts `ranges` and merges overlapping and adjacent ones; empty ranges are dropped.
pub fn normalize(mut ranges: Vec<PfnRange>) -> Vec<PfnRange> {
    ranges.sort_unstable();
    let mut b = RangeBuilder::new();
    for r in ranges {
        b.push_range(r.first, r.count);
    }
    b.ranges
}

/// Frames in `a` or `b` (both sorted and non-overlapping).
pub fn union(a: &[PfnRange], b: &[PfnRange]) -> Vec<PfnRange> {
    let mut out = RangeBuilder::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        let take_a = j >= b.len() || (i < a.len() && a[i].first <= b[j].first);
        let r = if take_a {
            i += 1;
            a[i - 1]
        } else {
            j += 1;
            b[j - 1]
        };
        out.push_range(r.first, r.count);
    }
    out.ranges
}

/// Frames in `a` and not in `b` (both sorted and non-overlapping).
pub fn subtract(a: &[PfnRange], b: &[PfnRange]) -> Vec<PfnRange> {
    let mut out = RangeBuilder::new();
    let mut j = 0;
    for r in a {
        let mut cur = r.first;
        let end = r.end();
        while j < b.len() && b[j].end() <= cur {
            j += 1;
        }
        let mut k = j;
        while cur < end && k < b.len() && b[k].first < end {
            if b[k].first > cur {
                out.push_range(cur, b[k].first - cur);
            }
            cur = cur.max(b[k].end());
            k += 1;
        }
        if cur < end {
            out.push_range(cur, end - cur);
        }
    }
    out.ranges
}

/// Whether `pfn` is in the sorted list `ranges` (binary search).
pub fn contains(ranges: &[PfnRange], pfn: u64) -> bool {
    let i = ranges.partition_point(|r| r.end() <= pfn);
    ranges.get(i).is_some_and(|r| r.contains(pfn))
}

/// Total frames in `ranges`.
pub fn pages(ranges: &[PfnRange]) -> u64 {
    ranges.iter().map(|r| r.count).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(v: &[(u64, u64)]) -> Vec<PfnRange> {
        v.iter().map(|&(a, b)| PfnRange::new(a, b)).collect()
    }

    #[test]
    fn builder_coalesces_ascending_frames() {
        let mut b = RangeBuilder::new();
        for p in [1, 2, 3, 5, 6, 9] {
            b.push_pfn(p);
        }
        b.push_range(9, 3);
        b.push_range(10, 1);
        b.push_range(12, 0);
        assert_eq!(b.finish(), r(&[(1, 3), (5, 2), (9, 3)]));
    }

    #[test]
    fn builder_sorts_when_pushed_out_of_order() {
        let mut b = RangeBuilder::new();
        for p in [9, 3, 4, 1, 2, 10, 3] {
            b.push_pfn(p);
        }
        assert_eq!(b.finish(), r(&[(1, 4), (9, 2)]));
    }

    #[test]
    fn union_and_subtract() {
        let a = r(&[(0, 10), (20, 5), (40, 1)]);
        let b = r(&[(5, 10), (24, 2), (30, 1)]);
        assert_eq!(union(&a, &b), r(&[(0, 15), (20, 6), (30, 1), (40, 1)]));
        assert_eq!(subtract(&a, &b), r(&[(0, 5), (20, 4), (40, 1)]));
        assert_eq!(subtract(&b, &a), r(&[(10, 5), (25, 1), (30, 1)]));
        assert_eq!(subtract(&a, &[]), a);
        assert_eq!(subtract(&a, &r(&[(0, 100)])), vec![]);
        // One range of `b` cutting several holes in one range of `a`, and vice versa.
        assert_eq!(
            subtract(&r(&[(0, 100)]), &r(&[(10, 5), (20, 5), (99, 10)])),
            r(&[(0, 10), (15, 5), (25, 74)])
        );
    }

    #[test]
    fn membership() {
        let a = r(&[(0, 10), (20, 5), (40, 1)]);
        for (p, want) in [
            (0, true),
            (9, true),
            (10, false),
            (24, true),
            (25, false),
            (40, true),
            (41, false),
        ] {
            assert_eq!(contains(&a, p), want, "{p}");
        }
        assert_eq!(pages(&a), 16);
    }

    #[test]
    fn results_are_valid_protocol_lists() {
        let a = r(&[(0, 10), (20, 5)]);
        let b = r(&[(10, 10)]);
        let u = union(&a, &b);
        assert_eq!(u, r(&[(0, 25)]));
        crate::proto::validate_ranges(&u, 0).unwrap();
    }
}
