//! Counters and fault latency of a postcopy destination.
//!
//! Latency is measured per page from the first fault message read for it until the
//! page is installed, on whatever thread installs it, and recorded once per fault
//! message (waiter) so the histogram reflects how long vCPUs were actually blocked.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Live metrics, shared between the fault loop and installers.
#[derive(Debug)]
pub struct Metrics {
    epoch: Instant,
    faults: AtomicU64,
    pages_faulted: AtomicU64,
    pages_pushed: AtomicU64,
    pages_zero: AtomicU64,
    pages_zero_holes: AtomicU64,
    pages_discarded: AtomicU64,
    blocked_ns: AtomicU64,
    latency_us: Mutex<Histogram<u64>>,
    /// Per page: its unresolved faults as one [`Pending`] word (0 = none). One word,
    /// so a fault read while the page is being resolved is either in the resolver's
    /// swap or starts a new entry, never half in each.
    pending: Vec<AtomicU64>,
    /// Pages with faults pending → the faulting threads' ids (when the kernel reports them).
    pending_threads: Mutex<HashMap<u64, Vec<u32>>>,
    /// Thread id → ns it spent blocked on missing pages.
    blocked_by_thread: Mutex<HashMap<u32, u64>>,
}

/// Summary of the fault latency histogram, in microseconds. Values come from an
/// hdrhistogram kept at 3 significant figures, from 1 µs to 1 h.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Faults recorded: one per fault message (waiter), not per page. All fields are 0
    /// when this is.
    pub count: u64,
    /// Median latency, µs.
    pub p50: u64,
    /// 90th percentile latency, µs.
    pub p90: u64,
    /// 99th percentile latency, µs.
    pub p99: u64,
    /// Largest latency recorded, µs.
    pub max: u64,
    /// Mean latency, µs.
    pub mean: f64,
}

/// Plain copy of [`Metrics`] at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricsSnapshot {
    /// Fault messages read, including faults outside every region and repeated faults
    /// on a page already requested.
    pub faults: u64,
    /// Pages installed with [`crate::Origin::Demand`] (answers to requests), each
    /// counted once.
    pub pages_faulted: u64,
    /// Pages installed with [`crate::Origin::Push`] (ahead of any fault), each counted
    /// once.
    pub pages_pushed: u64,
    /// Of the installed pages (demand or push), those installed as
    /// [`crate::PageData::Zero`].
    pub pages_zero: u64,
    /// Of those zero pages, the ones left as holes of their shared-memory file
    /// ([`crate::Installer::with_zero_holes`]): nothing was allocated or mapped for them.
    #[serde(default)]
    pub pages_zero_holes: u64,
    /// Pages newly marked Discarded by REMOVE events (MADV_DONTNEED/MADV_REMOVE).
    pub pages_discarded: u64,
    /// Total time guest threads spent blocked on missing pages, in ns: for each fault
    /// message, from the page's first fault until the page became readable (installed,
    /// or zero-filled after a discard), at least 1 µs.
    pub blocked_ns: u64,
    /// Blocked time per faulting thread id (e.g. per vCPU thread), in ns; each waiter is
    /// charged from the page's first fault until it was installed.
    pub blocked_ns_by_thread: BTreeMap<u32, u64>,
    /// Distribution of per-fault latency, µs.
    pub fault_latency_us: LatencySummary,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain maps of counters: consistent between statements even after a panic elsewhere.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What an install was, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InstallKind {
    Demand,
    Push,
}

impl Metrics {
    /// Zeroed metrics for a guest of `total_pages` pages (one 8-byte pending-fault
    /// word each). Faults on pages past that are counted but their latency is not.
    pub fn new(total_pages: u64) -> Metrics {
        // 1 µs .. 1 h at 3 significant figures; constant bounds that hdrhistogram accepts.
        let hist = Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds");
        Metrics {
            epoch: Instant::now(),
            faults: AtomicU64::new(0),
            pages_faulted: AtomicU64::new(0),
            pages_pushed: AtomicU64::new(0),
            pages_zero: AtomicU64::new(0),
            pages_zero_holes: AtomicU64::new(0),
            pages_discarded: AtomicU64::new(0),
            blocked_ns: AtomicU64::new(0),
            latency_us: Mutex::new(hist),
            pending: (0..total_pages).map(|_| AtomicU64::new(0)).collect(),
            pending_threads: Mutex::new(HashMap::new()),
            blocked_by_thread: Mutex::new(HashMap::new()),
        }
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// A fault message was read for `page` (the caller checks the state afterwards, so a
    /// page resolved concurrently is still accounted by one side or the other).
    pub(crate) fn fault_read(&self, page: u64, thread_id: u32) {
        self.faults.fetch_add(1, Ordering::Relaxed);
        let Some(slot) = self.pending.get(page as usize) else {
            return;
        };
        let now = self.now_us();
        let add = || {
            // The closure never returns None, so the update always succeeds.
            let _ = slot.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |word| {
                Some(Pending::from_word(word).add_waiter(now).word())
            });
        };
        if thread_id == 0 {
            add();
            return;
        }
        // The thread joins the page's list and its waiter count together, so a resolver
        // (which takes both under the same lock) charges it exactly when it counts it.
        let mut threads = lock(&self.pending_threads);
        threads.entry(page).or_default().push(thread_id);
        add();
    }
    /// A fault message whose page was not in any region.
    pub(crate) fn stray_fault(&self) {
        self.faults.fetch_add(1, Ordering::Relaxed);
    }

    /// `page` became readable: records its latency once per waiting fault. Safe to call
    /// from several threads; only the first sees the waiters.
    pub(crate) fn page_ready(&self, page: u64) {
        let Some(slot) = self.pending.get(page as usize) else {
            return;
        };
        // Cheap exit for the common push case where nobody faulted. SeqCst with the fault
        // side's update and the page table's SeqCst state: a fault recorded before the
        // page was seen absent is seen here, or the fault loop resolves it itself.
        if slot.load(Ordering::SeqCst) == 0 {
            return;
        }
        let (word, threads) = {
            let mut pending = lock(&self.pending_threads);
            (slot.swap(0, Ordering::SeqCst), pending.remove(&page))
        };
        let Some(p) = Pending::from_word(word).get() else {
            return;
        };
        let waiters = p.waiters;
        // At least 1 µs, like the histogram: a waiter was blocked, however briefly.
        let ns = p.elapsed_us(self.now_us()).max(1) * 1000;
        self.blocked_ns
            .fetch_add(ns.saturating_mul(waiters), Ordering::Relaxed);
        if let Some(threads) = threads {
            let mut by = lock(&self.blocked_by_thread);
            for t in threads {
                *by.entry(t).or_default() += ns;
            }
        }
        let mut h = self.latency_us.lock().unwrap_or_else(|e| e.into_inner());
        h.saturating_record_n(ns / 1000, waiters);
    }

    pub(crate) fn installed(&self, kind: InstallKind, zero: bool, pages: u64) {
        match kind {
            InstallKind::Demand => &self.pages_faulted,
            InstallKind::Push => &self.pages_pushed,
        }
        .fetch_add(pages, Ordering::Relaxed);
        if zero {
            self.pages_zero.fetch_add(pages, Ordering::Relaxed);
        }
    }

    pub(crate) fn zero_holes(&self, pages: u64) {
        self.pages_zero_holes.fetch_add(pages, Ordering::Relaxed);
    }

    pub(crate) fn discarded(&self, pages: u64) {
        self.pages_discarded.fetch_add(pages, Ordering::Relaxed);
    }

    /// Copies the counters and summarises the latency histogram. May be called at any
    /// time, from any thread; the counters are read one by one, so a snapshot taken
    /// while pages are being installed need not be consistent across fields.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let h = self.latency_us.lock().unwrap_or_else(|e| e.into_inner());
        let fault_latency_us = if h.is_empty() {
            LatencySummary::default()
        } else {
            LatencySummary {
                count: h.len(),
                p50: h.value_at_quantile(0.50),
                p90: h.value_at_quantile(0.90),
                p99: h.value_at_quantile(0.99),
                max: h.max(),
                mean: h.mean(),
            }
        };
        MetricsSnapshot {
            faults: self.faults.load(Ordering::Relaxed),
            pages_faulted: self.pages_faulted.load(Ordering::Relaxed),
            pages_pushed: self.pages_pushed.load(Ordering::Relaxed),
            pages_zero: self.pages_zero.load(Ordering::Relaxed),
            pages_zero_holes: self.pages_zero_holes.load(Ordering::Relaxed),
            pages_discarded: self.pages_discarded.load(Ordering::Relaxed),
            blocked_ns: self.blocked_ns.load(Ordering::Relaxed),
            blocked_ns_by_thread: lock(&self.blocked_by_thread)
                .iter()
                .map(|(&t, &ns)| (t, ns))
                .collect(),
            fault_latency_us,
        }
    }
}

/// The faults waiting for one page, packed into a `u64`: the first fault's time in µs
/// since the epoch, modulo 2^44 (200 days; elapsed times are taken modulo the same, so a
/// long-lived destination keeps measuring right), above a waiter count (20 bits,
/// saturating).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pending {
    since_us: u64,
    waiters: u64,
}

impl Pending {
    const WAITER_BITS: u32 = 20;
    const MAX_WAITERS: u64 = (1 << Self::WAITER_BITS) - 1;
    const MAX_SINCE: u64 = (1 << (64 - Self::WAITER_BITS)) - 1;

    fn from_word(word: u64) -> Pending {
        Pending {
            since_us: word >> Self::WAITER_BITS,
            waiters: word & Self::MAX_WAITERS,
        }
    }

    fn word(self) -> u64 {
        ((self.since_us & Self::MAX_SINCE) << Self::WAITER_BITS)
            | self.waiters.min(Self::MAX_WAITERS)
    }

    /// µs from the first fault to `now_us` (a time on the same epoch, not wrapped).
    fn elapsed_us(self, now_us: u64) -> u64 {
        now_us.wrapping_sub(self.since_us) & Self::MAX_SINCE
    }

    /// Some when at least one fault is waiting.
    fn get(self) -> Option<Pending> {
        (self.waiters > 0).then_some(self)
    }

    /// One more fault; the first one sets the time.
    fn add_waiter(self, now_us: u64) -> Pending {
        match self.get() {
            None => Pending {
                since_us: now_us & Self::MAX_SINCE,
                waiters: 1,
            },
            Some(p) => Pending {
                waiters: (p.waiters + 1).min(Self::MAX_WAITERS),
                ..p
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_is_recorded_once_per_waiter() {
        let m = Metrics::new(4);
        m.fault_read(1, 0);
        m.fault_read(1, 0);
        m.fault_read(1, 0);
        std::thread::sleep(std::time::Duration::from_millis(2));
        m.page_ready(1);
        m.page_ready(1); // second call finds nobody waiting
        m.page_ready(2); // nobody faulted
        m.fault_read(99, 0); // out of range: counted, not tracked
        m.installed(InstallKind::Demand, false, 1);
        m.installed(InstallKind::Push, true, 2);
        m.discarded(3);
        let s = m.snapshot();
        assert_eq!(s.faults, 4);
        assert_eq!(s.fault_latency_us.count, 3);
        assert!(s.fault_latency_us.p50 >= 2000, "{s:?}");
        assert!(s.blocked_ns >= 3 * 2_000_000, "{s:?}");
        assert_eq!((s.pages_faulted, s.pages_pushed, s.pages_zero), (1, 2, 2));
        assert_eq!(s.pages_discarded, 3);
    }

    #[test]
    fn blocked_time_is_charged_to_each_faulting_thread() {
        let m = Metrics::new(8);
        m.fault_read(5, 100);
        m.fault_read(5, 200);
        m.fault_read(6, 100);
        std::thread::sleep(std::time::Duration::from_millis(2));
        m.page_ready(5);
        m.page_ready(6);
        m.page_ready(5);
        let s = m.snapshot();
        assert_eq!(s.blocked_ns_by_thread.len(), 2, "{s:?}");
        assert!(s.blocked_ns_by_thread[&200] >= 2_000_000);
        assert!(s.blocked_ns_by_thread[&100] >= 2 * 2_000_000 - 1_000_000);
        let sum: u64 = s.blocked_ns_by_thread.values().sum();
        assert_eq!(sum, s.blocked_ns, "every blocked ns is charged to a thread");
        assert!(lock(&m.pending_threads).is_empty());
    }

    #[test]
    fn faults_read_while_their_page_resolves_are_each_recorded_once() {
        // The fault loop records a fault and then, seeing the page present, resolves it
        // itself, while installers resolve the same pages: the histogram must hold
        // exactly one entry per fault whichever side wins.
        let m = std::sync::Arc::new(Metrics::new(64));
        let faulters: Vec<_> = (0..3)
            .map(|t| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000u64 {
                        let page = (i * 7 + t) % 64;
                        m.fault_read(page, t as u32 + 1);
                        if i % 3 == 0 {
                            m.page_ready(page);
                        }
                    }
                })
            })
            .collect();
        let resolver = {
            let m = m.clone();
            std::thread::spawn(move || {
                for i in 0..60_000u64 {
                    m.page_ready(i % 64);
                }
            })
        };
        for f in faulters {
            f.join().unwrap();
        }
        resolver.join().unwrap();
        for page in 0..64 {
            m.page_ready(page);
        }
        let s = m.snapshot();
        assert_eq!(s.faults, 60_000);
        assert_eq!(s.fault_latency_us.count, s.faults, "{s:?}");
        let by_thread: u64 = s.blocked_ns_by_thread.values().sum();
        assert_eq!(
            by_thread, s.blocked_ns,
            "each waiter charged to its thread once"
        );
        assert!(lock(&m.pending_threads).is_empty());
    }

    #[test]
    fn pending_word_packs_time_and_saturates_waiters() {
        let p = Pending::from_word(0).add_waiter(1234);
        assert_eq!(
            p,
            Pending {
                since_us: 1234,
                waiters: 1
            }
        );
        let p = Pending::from_word(p.word()).add_waiter(9999);
        assert_eq!(
            p,
            Pending {
                since_us: 1234,
                waiters: 2
            },
            "first fault's time kept"
        );
        let full = Pending {
            since_us: u64::MAX,
            waiters: u64::MAX,
        };
        let back = Pending::from_word(full.word());
        assert_eq!(back.waiters, Pending::MAX_WAITERS);
        assert_eq!(back.since_us, Pending::MAX_SINCE);
        assert_eq!(back.add_waiter(0).waiters, Pending::MAX_WAITERS);
        assert_eq!(Pending::from_word(0).get(), None);
        // Past 2^44 µs the stored time wraps, and elapsed times with it.
        let late = 1u64 << 44;
        let p = Pending::from_word(Pending::from_word(0).add_waiter(late + 5).word());
        assert_eq!(p.elapsed_us(late + 305), 300);
        let p = Pending::from_word(Pending::from_word(0).add_waiter(late - 100).word());
        assert_eq!(p.elapsed_us(late + 200), 300, "across the wrap");
    }

    #[test]
    fn snapshot_serializes_to_json() {
        let m = Metrics::new(1);
        m.fault_read(0, 0);
        m.page_ready(0);
        let json = serde_json::to_string(&m.snapshot()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["faults"], 1);
        assert_eq!(v["fault_latency_us"]["count"], 1);
        for key in ["p50", "p90", "p99", "max", "mean"] {
            assert!(v["fault_latency_us"][key].is_number(), "{key} in {json}");
        }
        let back: MetricsSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m.snapshot());
    }
}
