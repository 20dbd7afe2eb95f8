//! Lock-free per-page state of the destination's guest memory.
//!
//! Transitions only move forward: Absent → Requested → Present, and any state →
//! Discarded. Present never overrides Discarded: once the memory owner dropped a page,
//! a late install of old data must not make the table claim the page holds it.
//! `resolved` counts each page once, at its first move into Present or Discarded.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// State of one guest page at the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PageState {
    /// Not here and nobody asked for it yet.
    Absent = 0,
    /// A request went out; data is on its way.
    Requested = 1,
    /// Installed.
    Present = 2,
    /// Dropped by the memory owner (MADV_DONTNEED/REMOVE); reads as zero.
    Discarded = 3,
}

impl PageState {
    fn from_u8(v: u8) -> PageState {
        match v {
            0 => PageState::Absent,
            1 => PageState::Requested,
            2 => PageState::Present,
            _ => PageState::Discarded,
        }
    }

    /// Present or Discarded: nothing more will be fetched for it.
    pub fn is_resolved(self) -> bool {
        matches!(self, PageState::Present | PageState::Discarded)
    }
}

/// Per-page state table.
#[derive(Debug)]
pub struct PageTable {
    states: Vec<AtomicU8>,
    resolved: AtomicU64,
    done: Mutex<bool>,
    done_cv: Condvar,
}

impl PageTable {
    /// A table of `total` pages, all Absent. With `total == 0` it is complete at once.
    pub fn new(total: u64) -> PageTable {
        let table = PageTable {
            states: (0..total).map(|_| AtomicU8::new(0)).collect(),
            resolved: AtomicU64::new(0),
            done: Mutex::new(false),
            done_cv: Condvar::new(),
        };
        if total == 0 {
            table.notify_complete();
        }
        table
    }

    /// Number of pages; valid indices are `0..total()`.
    pub fn total(&self) -> u64 {
        self.states.len() as u64
    }

    /// Out-of-range pages read as Discarded so callers never fetch them.
    pub fn state(&self, page: u64) -> PageState {
        match self.states.get(page as usize) {
            // SeqCst pairs with Metrics: the fault loop records a fault then reads the
            // state, an installer sets the state then reads the fault record; with
            // SeqCst on both sides at least one of them sees the other.
            Some(s) => PageState::from_u8(s.load(Ordering::SeqCst)),
            None => PageState::Discarded,
        }
    }

    /// True for exactly one caller per page: the one that moves it Absent → Requested.
    pub fn try_request(&self, page: u64) -> bool {
        self.states.get(page as usize).is_some_and(|s| {
            s.compare_exchange(
                PageState::Absent as u8,
                PageState::Requested as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        })
    }

    /// Marks `page` Present unless it already is Present or Discarded; returns the state
    /// it had. A return of Absent/Requested means this call resolved it.
    pub fn set_present(&self, page: u64) -> PageState {
        self.advance(page, PageState::Present)
    }

    /// Marks `page` Discarded; returns the state it had.
    pub fn discard(&self, page: u64) -> PageState {
        self.advance(page, PageState::Discarded)
    }

    fn advance(&self, page: u64, to: PageState) -> PageState {
        let Some(slot) = self.states.get(page as usize) else {
            return PageState::Discarded;
        };
        let mut cur = slot.load(Ordering::Acquire);
        loop {
            let from = PageState::from_u8(cur);
            let allowed = match to {
                PageState::Present => !from.is_resolved(),
                _ => from != PageState::Discarded,
            };
            if !allowed {
                return from;
            }
            match slot.compare_exchange_weak(cur, to as u8, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => {
                    if !from.is_resolved() {
                        let now = self.resolved.fetch_add(1, Ordering::AcqRel) + 1;
                        if now == self.total() {
                            self.notify_complete();
                        }
                    }
                    return from;
                }
                Err(actual) => cur = actual,
            }
        }
    }

    fn notify_complete(&self) {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        *done = true;
        self.done_cv.notify_all();
    }

    /// Pages Present or Discarded, each counted once.
    pub fn resolved(&self) -> u64 {
        self.resolved.load(Ordering::Acquire)
    }

    /// True once every page is Present or Discarded; nothing more will be fetched.
    pub fn is_complete(&self) -> bool {
        self.resolved() == self.total()
    }

    /// Waits until every page is resolved; false on timeout.
    pub fn wait_complete(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        while !*done {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            done = self
                .done_cv
                .wait_timeout(done, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Pages still Absent (never requested), e.g. to ask again after a network break.
    pub fn absent_pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.pages_in(PageState::Absent)
    }

    /// Pages currently in `state`.
    pub fn pages_in(&self, state: PageState) -> impl Iterator<Item = u64> + '_ {
        self.states
            .iter()
            .enumerate()
            .filter(move |(_, s)| s.load(Ordering::Acquire) == state as u8)
            .map(|(i, _)| i as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    #[test]
    fn transitions() {
        let t = PageTable::new(4);
        assert!(t.try_request(0));
        assert!(!t.try_request(0));
        assert_eq!(t.set_present(0), PageState::Requested);
        assert_eq!(t.set_present(0), PageState::Present);
        assert_eq!(t.set_present(1), PageState::Absent);
        assert_eq!(t.discard(1), PageState::Present);
        assert_eq!(t.set_present(1), PageState::Discarded);
        assert_eq!(t.state(1), PageState::Discarded);
        assert_eq!(t.discard(2), PageState::Absent);
        assert_eq!(t.resolved(), 3);
        assert_eq!(t.absent_pages().collect::<Vec<_>>(), vec![3]);
        assert!(!t.wait_complete(Duration::from_millis(10)));
        t.set_present(3);
        assert!(t.is_complete());
        assert!(t.wait_complete(Duration::from_millis(10)));
        // Out of range never panics.
        assert!(!t.try_request(99));
        assert_eq!(t.state(99), PageState::Discarded);
        assert_eq!(t.set_present(99), PageState::Discarded);
        assert_eq!(t.resolved(), 4);
    }

    #[test]
    fn empty_table_is_complete() {
        assert!(PageTable::new(0).wait_complete(Duration::ZERO));
    }

    #[test]
    fn racing_threads_count_each_page_once() {
        const PAGES: u64 = 4096;
        let t = Arc::new(PageTable::new(PAGES));
        let requests = Arc::new(AtomicUsize::new(0));
        let resolved_by_call = Arc::new(AtomicUsize::new(0));
        let waiter = {
            let t = t.clone();
            std::thread::spawn(move || t.wait_complete(Duration::from_secs(20)))
        };
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let workers: Vec<_> = (0..8u64)
            .map(|k| {
                let (t, requests, resolved_by_call, barrier) = (
                    t.clone(),
                    requests.clone(),
                    resolved_by_call.clone(),
                    barrier.clone(),
                );
                std::thread::spawn(move || {
                    // Every thread walks all pages from a different start.
                    for i in 0..PAGES {
                        if t.try_request((i + k * 517) % PAGES) {
                            requests.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    barrier.wait();
                    for i in 0..PAGES {
                        let p = (i + k * 517) % PAGES;
                        let prev = if (p + k).is_multiple_of(5) {
                            t.discard(p)
                        } else {
                            t.set_present(p)
                        };
                        if !prev.is_resolved() {
                            resolved_by_call.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        assert!(waiter.join().unwrap());
        assert_eq!(requests.load(Ordering::Relaxed) as u64, PAGES);
        assert_eq!(resolved_by_call.load(Ordering::Relaxed) as u64, PAGES);
        assert_eq!(t.resolved(), PAGES);
        assert_eq!(t.absent_pages().count(), 0);
    }
}
