//! Threads that stand in for vCPUs on the destination: they read and write guest memory
//! at random while postcopy runs, so faults arrive concurrently, as from a running guest.
//!
//! Writes store back the value just read. The guest thus dirties pages (write faults, the
//! same fault path as real stores) while the final memory still equals the source's image,
//! which is what lets every run compare digests of all memory.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use serde::Serialize;
use uffd_core::HostRegion;

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
    /// Starts `threads` threads over `regions`. The regions must stay mapped until
    /// [`Workload::stop`] returns.
    pub fn start(regions: &[HostRegion], threads: usize, seed: u64) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let writes = Arc::new(AtomicU64::new(0));
        let handles = (0..threads)
            .map(|t| {
                let regions = regions.to_vec();
                let (stop, ops, writes) = (stop.clone(), ops.clone(), writes.clone());
                std::thread::Builder::new()
                    .name(format!("vcpu-{t}"))
                    .spawn(move || run(&regions, seed ^ (t as u64 + 1), &stop, &ops, &writes))
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

fn run(regions: &[HostRegion], seed: u64, stop: &AtomicBool, ops: &AtomicU64, writes: &AtomicU64) {
    let words: u64 = regions.iter().map(|r| (r.len / 8) as u64).sum();
    if words == 0 {
        return;
    }
    let mut x = seed | 1;
    let mut local = 0u64;
    let mut local_writes = 0u64;
    while !stop.load(Ordering::Relaxed) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut w = x % words;
        let Some(r) = regions.iter().find(|r| {
            let n = (r.len / 8) as u64;
            if w < n {
                true
            } else {
                w -= n;
                false
            }
        }) else {
            break;
        };
        let p = (r.host_addr + w as usize * 8) as *mut u64;
        // SAFETY: p is 8-byte aligned (regions are page aligned) and inside a region the
        // caller keeps mapped until stop() joins this thread. Volatile accesses because other
        // threads (and the kernel, via userfaultfd) write this memory concurrently; the write
        // stores back the value just read, so content never changes.
        unsafe {
            let v = std::ptr::read_volatile(p);
            if x % 4 == 0 {
                std::ptr::write_volatile(p, v);
                local_writes += 1;
            }
        }
        local += 1;
        if local % 1024 == 0 {
            ops.fetch_add(1024, Ordering::Relaxed);
        }
    }
    ops.fetch_add(local % 1024, Ordering::Relaxed);
    writes.fetch_add(local_writes, Ordering::Relaxed);
}
