//! Order of the background push: optional priority ranges first (the guest agent's hot
//! set), then sequential, restarted near each demand fault for locality.

use std::collections::VecDeque;
use std::ops::Range;

use crate::bitmap::Bitmap;

/// Decides which pages the source pushes next. Every page is handed out exactly once,
/// whether by the push or as the reply to a demand request.
#[derive(Debug)]
pub struct PushSchedule {
    sent: Bitmap,
    cursor: u64,
    /// Ranges to push before the normal order, front first; the front's start advances as
    /// its pages go out.
    priority: VecDeque<Range<u64>>,
    /// If set, no run mixes pages inside this set with pages outside it (see
    /// [`PushSchedule::with_uniform_runs`]).
    uniform: Option<Bitmap>,
}

impl PushSchedule {
    /// A schedule that pushes all of `pages` pages, from page 0 up.
    pub fn new(pages: u64) -> PushSchedule {
        PushSchedule::from_sent(Bitmap::new(pages))
    }

    /// A schedule that pushes only the pages set in `pages` (the stale set at evacuation).
    pub fn only(pages: &Bitmap) -> PushSchedule {
        PushSchedule::from_sent(pages.complement())
    }

    fn from_sent(sent: Bitmap) -> PushSchedule {
        PushSchedule {
            sent,
            cursor: 0,
            priority: VecDeque::new(),
            uniform: None,
        }
    }

    /// Pushes the pages of `ranges` first, in the order given (the guest agent's hot ranges
    /// are sorted by address, which is also what the destination's readahead likes), then
    /// everything else in the normal order. Ranges are clipped to the schedule; empty,
    /// overlapping or repeated ranges are harmless (a page is still handed out once).
    /// Demand requests keep priority over both.
    pub fn with_priority(mut self, ranges: &[Range<u64>]) -> PushSchedule {
        let pages = self.sent.len();
        self.priority = ranges
            .iter()
            .map(|r| r.start.min(pages)..r.end.min(pages))
            .filter(|r| r.start < r.end)
            .collect();
        self
    }

    /// Runs never mix pages set in `class` with pages clear in it. A source that serves
    /// the pages of `class` from a shared zero buffer (free pages it skips) can then answer
    /// every run with one slice: all zeros, or all real memory. Splitting costs one message
    /// header (16 bytes) per boundary crossed, nothing per page. A `class` of another length
    /// than the schedule is treated as clear past its end.
    pub fn with_uniform_runs(mut self, class: Bitmap) -> PushSchedule {
        self.uniform = Some(class);
        self
    }

    /// Marks `pages` (a set of the schedule's length) as handed out, e.g. pushed before
    /// this schedule replaced another one.
    pub fn mark_sent(&mut self, pages: &Bitmap) {
        if pages.len() == self.sent.len() {
            self.sent.union_with(pages);
        }
    }

    /// Pages still to push.
    pub fn remaining(&self) -> u64 {
        self.sent.len() - self.sent.count_ones()
    }

    /// A demand request for `page` is being served: it needs no push, and the push continues
    /// right after it, because a guest that faults on a page tends to touch its neighbours next.
    pub fn on_demand(&mut self, page: u64) -> bool {
        let fresh = self.sent.set(page);
        if page < self.sent.len() {
            self.cursor = page + 1;
        }
        fresh
    }

    /// Up to `max` consecutive unsent pages, marked sent; `None` once every page was sent.
    /// Priority ranges come first; then the cursor order.
    pub fn next_run(&mut self, max: usize) -> Option<Range<u64>> {
        self.next_run_from(max).map(|(r, _)| r)
    }

    /// [`PushSchedule::next_run`], also saying whether the run came from the priority
    /// ranges.
    pub fn next_run_from(&mut self, max: usize) -> Option<(Range<u64>, bool)> {
        self.next_run_sized(|_| max)
    }

    /// [`PushSchedule::next_run_from`] with the longest run decided once its first page is
    /// known: `max(start)`. A source that knows which pages are zero without reading them
    /// asks for a long run there and a short one elsewhere. A `max` of 0 takes nothing and
    /// returns `None` although pages remain; nothing changes then.
    pub fn next_run_sized(&mut self, max: impl FnOnce(u64) -> usize) -> Option<(Range<u64>, bool)> {
        while let Some(front) = self.priority.front().cloned() {
            // First unsent page of the front range, if any.
            let start = match self.sent.next_clear(front.start) {
                Some(p) if p < front.end => p,
                _ => {
                    self.priority.pop_front();
                    continue;
                }
            };
            let max = max(start) as u64;
            if max == 0 {
                return None;
            }
            let limit = front.end.min(start.saturating_add(max));
            let end = self.take_run(start, limit);
            if let Some(f) = self.priority.front_mut() {
                f.start = end;
            }
            return Some((start..end, true));
        }
        let start = self
            .sent
            .next_clear(self.cursor)
            .or_else(|| self.sent.next_clear(0))?;
        let max = max(start) as u64;
        if max == 0 {
            return None;
        }
        let end = self.take_run(start, start.saturating_add(max));
        self.cursor = end;
        Some((start..end, false))
    }

    /// Marks unsent pages from `start` (unsent) up to `limit` as sent, stopping at the first
    /// page already sent or of another uniform class; returns the end of the run.
    fn take_run(&mut self, start: u64, limit: u64) -> u64 {
        let limit = limit.min(self.sent.len());
        let class = |p: u64| self.uniform.as_ref().is_some_and(|u| u.get(p));
        let first_class = class(start);
        let mut end = start;
        while end < limit && !self.sent.get(end) && class(end) == first_class {
            end += 1;
        }
        for p in start..end {
            self.sent.set(p);
        }
        end
    }

    /// Pages in the schedule.
    pub fn pages(&self) -> u64 {
        self.sent.len()
    }

    /// Pages handed out so far.
    pub fn sent(&self) -> u64 {
        self.sent.count_ones()
    }

    /// Whether every page was handed out.
    pub fn is_done(&self) -> bool {
        self.sent.is_full()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_covers_every_page_once_and_restarts_near_faults() {
        let mut s = PushSchedule::new(100);
        assert_eq!(s.next_run(10), Some(0..10));
        assert!(s.on_demand(50));
        assert_eq!(s.next_run(10), Some(51..61));
        assert!(!s.on_demand(55), "already pushed");
        assert_eq!(s.next_run(10), Some(61..71));
        let mut seen = [false; 100];
        for p in (0..10).chain([50]).chain(51..71) {
            seen[p] = true;
        }
        while let Some(r) = s.next_run(7) {
            for p in r {
                assert!(!seen[p as usize], "page {p} handed out twice");
                seen[p as usize] = true;
            }
        }
        assert!(seen.iter().all(|&x| x));
        assert!(s.is_done());
        assert_eq!(s.sent(), 100);
    }

    #[test]
    fn sized_runs_follow_the_first_page_and_a_zero_size_takes_nothing() {
        let mut s = PushSchedule::new(100);
        assert_eq!(
            s.next_run_sized(|start| if start == 0 { 40 } else { 5 }),
            Some((0..40, false))
        );
        assert_eq!(s.next_run_sized(|_| 0), None);
        assert_eq!(s.remaining(), 60, "a declined run takes nothing");
        assert_eq!(
            s.next_run_sized(|start| start as usize / 8),
            Some((40..45, false))
        );
        let hot = [6..9, 9..9];
        let mut p = PushSchedule::new(10).with_priority(&hot);
        assert_eq!(p.next_run_sized(|_| 0), None);
        assert_eq!(p.next_run_sized(|_| 100), Some((6..9, true)));
        assert_eq!(p.next_run_sized(|_| 100), Some((0..6, false)));
    }

    #[test]
    fn runs_stop_at_pages_already_sent() {
        let mut s = PushSchedule::new(10);
        s.on_demand(3);
        s.cursor = 0;
        assert_eq!(s.next_run(10), Some(0..3));
        assert_eq!(s.next_run(10), Some(4..10));
        assert_eq!(s.next_run(10), None);
    }

    #[test]
    fn out_of_range_demand_is_ignored() {
        let mut s = PushSchedule::new(4);
        assert!(!s.on_demand(4));
        assert_eq!(s.next_run(8), Some(0..4));
    }

    /// Every page exactly once, whatever the order; returns the order.
    fn drain(s: &mut PushSchedule, max: usize) -> Vec<(Range<u64>, bool)> {
        let mut out = Vec::new();
        while let Some(r) = s.next_run_from(max) {
            assert!(r.0.start < r.0.end && r.0.end - r.0.start <= max as u64);
            out.push(r);
        }
        out
    }

    /// Pages handed out from the priority ranges.
    fn priority_pages(runs: &[(Range<u64>, bool)]) -> u64 {
        runs.iter()
            .filter(|(_, hot)| *hot)
            .map(|(r, _)| r.end - r.start)
            .sum()
    }

    fn assert_each_page_once(runs: &[(Range<u64>, bool)], pages: u64, already: &[u64]) {
        let mut seen = vec![0u8; pages as usize];
        for &p in already {
            seen[p as usize] += 1;
        }
        for (r, _) in runs {
            for p in r.clone() {
                seen[p as usize] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n == 1), "{seen:?}");
    }

    #[test]
    fn priority_ranges_go_first_in_their_order_then_the_normal_order() {
        let mut s = PushSchedule::new(100).with_priority(&[70..75, 10..12, 90..200, 5..5]);
        let runs = drain(&mut s, 4);
        assert_eq!(
            &runs[..5],
            &[
                (70..74, true),
                (74..75, true),
                (10..12, true),
                (90..94, true),
                (94..98, true),
            ]
        );
        assert_eq!(runs[5], (98..100, true), "clipped to the schedule");
        assert_eq!(runs[6], (0..4, false), "then from page 0");
        assert_eq!(priority_pages(&runs), 5 + 2 + 10);
        assert_each_page_once(&runs, 100, &[]);
        assert!(s.is_done());
    }

    #[test]
    fn demand_served_hot_pages_are_skipped_and_not_counted_as_priority() {
        let mut s = PushSchedule::new(64).with_priority(&[8..16, 8..12, 40..48]);
        assert!(s.on_demand(9));
        assert!(s.on_demand(44));
        let runs = drain(&mut s, 64);
        assert_eq!(
            &runs[..4],
            &[(8..9, true), (10..16, true), (40..44, true), (45..48, true)]
        );
        assert_eq!(
            priority_pages(&runs),
            14,
            "8..16 and 40..48 less two demand pages"
        );
        // After the priority ranges, the push continues after the last demand fault.
        assert_eq!(runs[4], (48..64, false));
        assert_each_page_once(&runs, 64, &[9, 44]);
    }

    #[test]
    fn priority_works_on_a_stale_only_schedule() {
        let mut stale = Bitmap::new(32);
        for p in [1, 2, 3, 20, 21] {
            stale.set(p);
        }
        let mut s = PushSchedule::only(&stale).with_priority(std::slice::from_ref(&(20..32)));
        assert_eq!(s.next_run_from(8), Some((20..22, true)));
        assert_eq!(s.next_run_from(8), Some((1..4, false)));
        assert_eq!(s.next_run_from(8), None);
    }

    #[test]
    fn uniform_runs_never_mix_classes() {
        let mut class = Bitmap::new(50);
        for p in (5..9).chain(20..40) {
            class.set(p);
        }
        let mut s = PushSchedule::new(50)
            .with_priority(std::slice::from_ref(&(3..25)))
            .with_uniform_runs(class.clone());
        let runs = drain(&mut s, 16);
        for (r, _) in &runs {
            let c = class.get(r.start);
            assert!(r.clone().all(|p| class.get(p) == c), "{r:?} mixes classes");
        }
        assert_eq!(
            runs.iter().map(|(r, _)| r.clone()).collect::<Vec<_>>(),
            vec![3..5, 5..9, 9..20, 20..25, 0..3, 25..40, 40..50]
        );
        assert_each_page_once(&runs, 50, &[]);
    }

    #[test]
    fn random_priorities_demands_and_classes_hand_out_every_page_once() {
        // A small deterministic generator: no proptest needed for this shape.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for _ in 0..200 {
            let pages = 1 + rnd(300);
            let ranges: Vec<Range<u64>> = (0..rnd(6))
                .map(|_| {
                    let a = rnd(pages + 20);
                    a..a + rnd(80)
                })
                .collect();
            let mut class = Bitmap::new(pages);
            for _ in 0..rnd(40) {
                class.set(rnd(pages));
            }
            let mut s = PushSchedule::new(pages)
                .with_priority(&ranges)
                .with_uniform_runs(class);
            let mut demanded = Vec::new();
            let mut runs = Vec::new();
            loop {
                if rnd(4) == 0 {
                    let p = rnd(pages);
                    if s.on_demand(p) {
                        demanded.push(p);
                    }
                }
                match s.next_run_from(1 + rnd(70) as usize) {
                    Some(r) => runs.push(r),
                    None => break,
                }
            }
            assert_each_page_once(&runs, pages, &demanded);
        }
    }
}
