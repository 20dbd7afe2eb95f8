//! Order of the background push: sequential, restarted near each demand fault for locality.

use std::ops::Range;

use crate::bitmap::Bitmap;

/// Decides which pages the source pushes next. Every page is handed out exactly once,
/// whether by the push or as the reply to a demand request.
#[derive(Debug)]
pub struct PushSchedule {
    sent: Bitmap,
    cursor: u64,
}

impl PushSchedule {
    pub fn new(pages: u64) -> PushSchedule {
        PushSchedule {
            sent: Bitmap::new(pages),
            cursor: 0,
        }
    }

    /// A schedule that pushes only the pages set in `pages` (the stale set at evacuation).
    pub fn only(pages: &Bitmap) -> PushSchedule {
        PushSchedule {
            sent: pages.complement(),
            cursor: 0,
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
    pub fn next_run(&mut self, max: usize) -> Option<Range<u64>> {
        let start = self
            .sent
            .next_clear(self.cursor)
            .or_else(|| self.sent.next_clear(0))?;
        let mut end = start;
        while end < self.sent.len() && end - start < max as u64 && !self.sent.get(end) {
            self.sent.set(end);
            end += 1;
        }
        self.cursor = end;
        Some(start..end)
    }

    /// Pages in the schedule.
    pub fn pages(&self) -> u64 {
        self.sent.len()
    }

    /// Pages handed out so far.
    pub fn sent(&self) -> u64 {
        self.sent.count_ones()
    }

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
}
