//! Threads that stand in for vCPUs on the destination: they read and write guest memory
//! at random while postcopy runs, so faults arrive concurrently, as from a running guest.
//!
//! Writes store back the value just read. The guest thus dirties pages (write faults, the
//! same fault path as real stores) while the final memory still equals the source's image,
//! which is what lets every run compare digests of all memory.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use uffd_core::{HostRegion, PAGE_SIZE};

/// How the threads walk guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pattern {
    /// Random words anywhere, until stopped.
    #[default]
    Random,
    /// Every thread visits every page in the same pseudo-random order, in step, so several
    /// threads fault on the same page at once. Each thread stops after its walk.
    SamePages,
    /// The threads split one pseudo-random order of all pages between them, so they fault
    /// on different pages at once. Each thread stops after its share.
    Spread,
    /// Each thread walks all pages in address order from its own offset, racing the push,
    /// which also runs in address order. Each thread stops after its walk.
    Sequential,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct WorkloadReport {
    pub threads: usize,
    pub ops: u64,
    pub writes: u64,
    pub ops_per_sec: f64,
}

/// Running workload threads; [`Workload::stop`] joins them.
pub struct Workload {
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    writes: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
    started: Instant,
}

impl Workload {
    /// Starts `threads` threads over `regions`; each thread holds the regions, which keep
    /// the memory mapped until it is joined.
    pub fn start(regions: &[HostRegion], threads: usize, seed: u64, pattern: Pattern) -> Workload {
        Workload::start_paced(regions, threads, seed, pattern, 0)
    }

    /// [`Workload::start`] with each thread of [`Pattern::Random`] doing at most `rate`
    /// touches per second (0: as fast as it can). A guest that does other work than touch
    /// memory: it still faults on missing pages, but leaves the host's cores to the rest.
    pub fn start_paced(
        regions: &[HostRegion],
        threads: usize,
        seed: u64,
        pattern: Pattern,
        rate: u64,
    ) -> Workload {
        Workload::spawn(regions, threads, "vcpu", move |walker, t| match pattern {
            Pattern::Random => walker.random(seed ^ (t as u64 + 1), rate),
            _ => walker.pages(pattern, t, threads, seed),
        })
    }

    /// Runs `body(walker, thread index)` on `threads` named threads sharing the counters.
    fn spawn(
        regions: &[HostRegion],
        threads: usize,
        name: &str,
        body: impl Fn(&mut Walker<'_>, usize) + Clone + Send + 'static,
    ) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let writes = Arc::new(AtomicU64::new(0));
        let handles = (0..threads)
            .map(|t| {
                let regions = regions.to_vec();
                let (stop, ops, writes) = (stop.clone(), ops.clone(), writes.clone());
                let body = body.clone();
                std::thread::Builder::new()
                    .name(format!("{name}-{t}"))
                    .spawn(move || {
                        let mut walker = Walker {
                            regions: &regions,
                            stop: &stop,
                            ops: &ops,
                            writes: &writes,
                        };
                        body(&mut walker, t)
                    })
                    .expect("spawning a workload thread")
            })
            .collect();
        Workload {
            stop,
            ops,
            writes,
            threads: handles,
            started: Instant::now(),
        }
    }

    pub fn stop(self) -> WorkloadReport {
        self.stop.store(true, Ordering::Relaxed);
        let threads = self.threads.len();
        // A rate-limited writer waits parked between its bursts (at 100 writes/s a burst of
        // 64 is followed by 0.64 s): wake it, or the pause waits that out.
        for t in &self.threads {
            t.thread().unpark();
        }
        for t in self.threads {
            let _ = t.join();
        }
        let ops = self.ops.load(Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        WorkloadReport {
            threads,
            ops,
            writes: self.writes.load(Ordering::Relaxed),
            ops_per_sec: ops as f64 / secs,
        }
    }
}

struct Walker<'a> {
    regions: &'a [HostRegion],
    stop: &'a AtomicBool,
    ops: &'a AtomicU64,
    writes: &'a AtomicU64,
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl<'a> Walker<'a> {
    /// The aligned word at byte `offset` of guest memory (regions in order).
    ///
    /// Guest memory is accessed as atomic words, each with relaxed ordering: replication
    /// and the wire census read it concurrently with `HostRegion::read_shared`, which
    /// loads the same words atomically, so the stand-in vCPUs' writes are no data race.
    fn word(&self, mut offset: usize) -> Option<&'a AtomicU64> {
        let r = self.regions.iter().find(|r| {
            if offset < r.len() {
                true
            } else {
                offset -= r.len();
                false
            }
        })?;
        let p = (r.host_addr() + (offset & !7)) as *mut u64;
        // Regions are mappings, page-aligned; one made by hand (`HostRegion::from_raw`)
        // could break that, and `from_ptr` needs it.
        debug_assert!(p.is_aligned(), "guest memory region not 8-byte aligned");
        // SAFETY: `offset & !7` lies inside the region (found above), whose mapping is
        // readable and writable and stays mapped while the region lives (`HostRegion`'s
        // contract), and the caller keeps `regions` for 'a; the region is page-aligned, so
        // the word is 8-byte aligned. Every access to it from this process is atomic.
        Some(unsafe { AtomicU64::from_ptr(p) })
    }

    /// Reads the word at byte `offset` of guest memory; if `write`, stores it back.
    fn touch(&self, offset: usize, write: bool) {
        let Some(w) = self.word(offset) else { return };
        // The write stores back the value just read, so the content never changes (the
        // kernel, through userfaultfd, may be installing the page meanwhile).
        let v = w.load(Ordering::Relaxed);
        if write {
            w.store(v, Ordering::Relaxed);
        }
    }

    fn random(&mut self, seed: u64, rate: u64) {
        let bytes: usize = self.regions.iter().map(|r| r.len()).sum();
        if bytes == 0 {
            return;
        }
        let mut x = seed | 1;
        let mut local = 0u64;
        let mut local_writes = 0u64;
        let pacer = Pacer::new(rate);
        while !self.stop.load(Ordering::Relaxed) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let write = x.is_multiple_of(4);
            self.touch((x >> 3) as usize % bytes, write);
            local_writes += u64::from(write);
            local += 1;
            if local.is_multiple_of(BURST) {
                self.ops.fetch_add(BURST, Ordering::Relaxed);
                pacer.wait(local);
            }
        }
        self.ops.fetch_add(local % BURST, Ordering::Relaxed);
        self.writes.fetch_add(local_writes, Ordering::Relaxed);
    }

    /// Visits pages in one of the page-walk patterns, writing to every other page.
    fn pages(&mut self, pattern: Pattern, t: usize, threads: usize, seed: u64) {
        let n = self
            .regions
            .iter()
            .map(|r| r.len() / PAGE_SIZE)
            .sum::<usize>() as u64;
        if n == 0 {
            return;
        }
        let perm = Permutation::new(n, seed);
        let order = |i: u64| match pattern {
            Pattern::Sequential => (i + t as u64 * n / threads as u64) % n,
            _ => perm.at(i),
        };
        let (start, step) = match pattern {
            Pattern::Spread => (t as u64, threads as u64),
            _ => (0, 1),
        };
        let mut i = start;
        let mut done = 0;
        while i < n && !self.stop.load(Ordering::Relaxed) {
            let page = order(i);
            let write = page % 2 == 0;
            self.touch(
                page as usize * PAGE_SIZE + (page as usize * 8) % PAGE_SIZE,
                write,
            );
            self.writes.fetch_add(u64::from(write), Ordering::Relaxed);
            done += 1;
            i += step;
        }
        self.ops.fetch_add(done, Ordering::Relaxed);
    }
}

/// Touches between two looks at the clock (and the shared counters) of a stand-in vCPU.
const BURST: u64 = 1024;

/// Writes between two looks at the clock of a rate-limited writer.
const MUTATE_BURST: u64 = 64;

/// Holds a thread to `rate` operations per second on average since its start (0: no
/// limit), checked after each burst. A thread held up (a fault on a missing page) catches
/// up unpaced until it is back on schedule.
struct Pacer {
    rate: u64,
    started: Instant,
}

impl Pacer {
    fn new(rate: u64) -> Pacer {
        Pacer {
            rate,
            started: Instant::now(),
        }
    }

    /// After `done` operations: waits until they are due.
    fn wait(&self, done: u64) {
        if self.rate == 0 {
            return;
        }
        let due = Duration::from_secs_f64(done as f64 / self.rate as f64);
        if let Some(wait) = due.checked_sub(self.started.elapsed()) {
            // Parked, not asleep: `Workload::stop` unparks it. (A spurious wake only ends
            // the wait early; the next burst's due time holds the rate.)
            std::thread::park_timeout(wait);
        }
    }
}

/// Threads that change guest memory the way a running guest dirties its working set: each
/// write adds one to a word of a page in the hot set. Used on the source during replication.
pub struct Mutator {
    inner: Workload,
}

impl Mutator {
    /// Starts `threads` writers over the first `hot_fraction` of a pseudo-random page order,
    /// each doing at most `rate` writes per second (0: as fast as it can).
    pub fn start(
        regions: &[HostRegion],
        threads: usize,
        seed: u64,
        hot_fraction: f64,
        rate: u64,
    ) -> Mutator {
        Mutator {
            inner: Workload::spawn(regions, threads, "mutator", move |walker, t| {
                walker.mutate(seed ^ ((t as u64 + 1) * 0x9E37), hot_fraction, rate)
            }),
        }
    }

    /// Pauses the guest: joins the writers.
    pub fn stop(self) -> WorkloadReport {
        self.inner.stop()
    }
}

/// Changes one word in each of `fraction` of all pages (distinct pages, chosen by `seed`);
/// returns how many pages were written. With the guest paused and replication caught up,
/// exactly these pages are stale.
pub fn dirty_fraction(regions: &[HostRegion], fraction: f64, seed: u64) -> u64 {
    with_paused_walker(regions, |w, n| {
        let count = ((n as f64) * fraction.clamp(0.0, 1.0)).round() as u64;
        let order = Permutation::new(n, seed);
        for i in 0..count {
            w.bump(order.at(i) as usize * PAGE_SIZE);
        }
        count
    })
}

/// Runs `f` with a walker over `regions` outside any workload (the guest paused), and the
/// number of pages they hold.
fn with_paused_walker<R>(regions: &[HostRegion], f: impl FnOnce(&Walker<'_>, u64) -> R) -> R {
    let n = regions.iter().map(|r| r.len() / PAGE_SIZE).sum::<usize>() as u64;
    let stop = AtomicBool::new(false);
    let (ops, writes) = (AtomicU64::new(0), AtomicU64::new(0));
    let w = Walker {
        regions,
        stop: &stop,
        ops: &ops,
        writes: &writes,
    };
    f(&w, n)
}

/// Copies into each of `fraction` of all pages the content of another page (distinct
/// pages, chosen by `seed`), as a guest's page migration or compaction moves data: the
/// copies are stale, but a replica already holds their content at the page they came from
/// (unless that page is written later). Returns how many pages were written. Call with the
/// guest paused.
pub fn move_fraction(regions: &[HostRegion], fraction: f64, seed: u64) -> u64 {
    with_paused_walker(regions, |w, n| {
        let count = (((n as f64) * fraction.clamp(0.0, 0.5)).round() as u64).min(n / 2);
        let order = Permutation::new(n, seed);
        for i in 0..count {
            let (to, from) = (order.at(i), order.at(count + i));
            for word in 0..PAGE_SIZE / 8 {
                let at = |page: u64| w.word(page as usize * PAGE_SIZE + word * 8);
                let (Some(src), Some(dst)) = (at(from), at(to)) else {
                    continue;
                };
                dst.store(src.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
        count
    })
}

/// i -> (a*i + b) mod n: a permutation of 0..n when gcd(a, n) = 1.
struct Permutation {
    n: u64,
    a: u64,
    b: u64,
}

impl Permutation {
    fn new(n: u64, seed: u64) -> Permutation {
        let n = n.max(1);
        let mut a = (n as f64 * 0.618_033_988_75) as u64 | 1;
        while gcd(a, n) != 1 {
            a += 2;
        }
        Permutation { n, a, b: seed % n }
    }

    fn at(&self, i: u64) -> u64 {
        ((u128::from(self.a) * u128::from(i % self.n) % u128::from(self.n)) as u64 + self.b)
            % self.n
    }
}

impl Walker<'_> {
    /// Adds one to the word at byte `offset` of guest memory.
    fn bump(&self, offset: usize) {
        let Some(w) = self.word(offset) else { return };
        // A load and a store, not `fetch_add`: two vCPUs racing on a word may lose an
        // increment, as plain guest stores would, and a locked add costs far more.
        w.store(w.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
    }

    fn mutate(&self, seed: u64, hot_fraction: f64, rate: u64) {
        let n = self
            .regions
            .iter()
            .map(|r| r.len() / PAGE_SIZE)
            .sum::<usize>() as u64;
        let hot = ((n as f64 * hot_fraction.clamp(0.0, 1.0)) as u64).max(1);
        let order = Permutation::new(n, 0x5eed);
        let mut x = seed | 1;
        let pacer = Pacer::new(rate);
        let mut done = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            for _ in 0..MUTATE_BURST {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let page = order.at(x % hot);
                let word = (x >> 40) as usize % (PAGE_SIZE / 8);
                self.bump(page as usize * PAGE_SIZE + word * 8);
            }
            done += MUTATE_BURST;
            pacer.wait(done);
        }
        self.ops.fetch_add(done, Ordering::Relaxed);
        self.writes.fetch_add(done, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::{Mutator, Pattern, Workload};

    /// A writer at 10 writes/s waits 6.4 s after its first burst of 64; stopping it (the
    /// guest's pause) must not wait that out.
    #[test]
    fn a_slow_writer_stops_at_once() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let regions = vmm_shim::guest::regions(&mem).unwrap();
        let m = Mutator::start(&regions, 1, 7, 1.0, 10);
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        let report = m.stop();
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "stop took {:?}",
            t.elapsed()
        );
        assert!(
            report.writes >= 64,
            "at least the first burst: {}",
            report.writes
        );
    }

    /// A stand-in vCPU held to 10,000 touches a second makes about that many, not the
    /// millions it makes unpaced, and stops at once.
    #[test]
    fn a_paced_stand_in_guest_keeps_its_rate() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let regions = vmm_shim::guest::regions(&mem).unwrap();
        let w = Workload::start_paced(&regions, 1, 7, Pattern::Random, 10_000);
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        let report = w.stop();
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "stop took {:?}",
            t.elapsed()
        );
        // 3,000 due in 0.3 s, in bursts of 1,024; a slow start may fall behind, never ahead.
        assert!(
            (1024..=5 * 1024).contains(&report.ops),
            "{} touches in 0.3 s at 10,000/s",
            report.ops
        );
    }
}
