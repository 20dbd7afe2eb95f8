//! Where the CPU went: per-thread CPU time of the bench's processes, sampled from
//! `/proc/<pid>/task/<tid>/stat` while a measurement runs.
//!
//! Threads of interest are short-lived (a destination's runtime and fault loop live only as
//! long as one migration), so their CPU time cannot be read once the measurement is over. A
//! [`ThreadCpu`] sampler thread reads every thread's cumulative user + system time every few
//! milliseconds and keeps the last value it saw; at [`ThreadCpu::stop`] the time each thread
//! used since the sampler started is summed per process and per thread name (`comm`, which
//! Linux truncates to 15 bytes: tokio workers of vmm-shim are `faultline-net`, the fault
//! loop is `uffd-fault-loop`, tokio's default is `tokio-runtime-w`).
//!
//! Resolution is the kernel's clock tick (usually 10 ms), and up to one sampling interval of
//! a thread that exits is lost: good for "which thread burnt the seconds", not for µs.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

/// CPU time of all threads of one name in one process.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ThreadGroupCpu {
    /// The label the process was given in [`ThreadCpu::start`].
    pub process: String,
    /// Thread name (`comm`).
    pub thread: String,
    /// How many threads of that name were seen.
    pub threads: usize,
    /// User + system seconds they used while sampled.
    pub cpu_secs: f64,
}

/// The per-thread CPU of a sampled interval.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CpuReport {
    /// Wall-clock seconds the sampler ran.
    pub wall_secs: f64,
    /// Per process label: total CPU seconds (sum of its thread groups).
    pub process_cpu_secs: BTreeMap<String, f64>,
    /// Thread groups, largest CPU first.
    pub threads: Vec<ThreadGroupCpu>,
}

#[derive(Clone)]
struct Seen {
    label: usize,
    comm: String,
    first: u64,
    last: u64,
}

/// A running per-thread CPU sampler (see the module documentation).
pub struct ThreadCpu {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<CpuReport>>,
}

impl ThreadCpu {
    /// Starts sampling the processes `procs` (label, pid) every `interval`. The first
    /// snapshot is taken before this returns, so threads that already exist are counted from
    /// now; threads created later are counted from their start.
    pub fn start(procs: Vec<(String, u32)>, interval: Duration) -> ThreadCpu {
        let stop = Arc::new(AtomicBool::new(false));
        let mut seen: BTreeMap<(u32, u32), Seen> = BTreeMap::new();
        let started = Instant::now();
        sample(&procs, &mut seen, true);
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("bench-cpu-sampler".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(interval);
                    sample(&procs, &mut seen, false);
                }
                sample(&procs, &mut seen, false);
                report(&procs, &seen, started.elapsed())
            })
            .ok();
        ThreadCpu { stop, handle }
    }

    /// Stops sampling and returns what was used since [`Self::start`]; `None` if the sampler
    /// thread could not be started.
    pub fn stop(mut self) -> Option<CpuReport> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().and_then(|h| h.join().ok())
    }
}

impl Drop for ThreadCpu {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn sample(procs: &[(String, u32)], seen: &mut BTreeMap<(u32, u32), Seen>, initial: bool) {
    for (label, (_, pid)) in procs.iter().enumerate() {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for entry in dir.flatten() {
            let Some(tid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Some((comm, ticks)) = read_stat(*pid, tid) else {
                continue;
            };
            seen.entry((*pid, tid))
                .and_modify(|s| {
                    s.last = ticks;
                    s.comm.clone_from(&comm);
                })
                .or_insert(Seen {
                    label,
                    comm,
                    // A thread first seen after the start used all its time in the interval.
                    first: if initial { ticks } else { 0 },
                    last: ticks,
                });
        }
    }
}

/// `(comm, utime + stime in clock ticks)` of one thread.
fn read_stat(pid: u32, tid: u32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    // comm is in parentheses and may contain spaces or parentheses: split at the last ')'.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    // Fields after comm start at field 3 (state); utime and stime are fields 14 and 15.
    let mut rest = stat.get(close + 2..)?.split_whitespace();
    let utime: u64 = rest.nth(11)?.parse().ok()?;
    let stime: u64 = rest.next()?.parse().ok()?;
    Some((comm, utime + stime))
}

fn report(procs: &[(String, u32)], seen: &BTreeMap<(u32, u32), Seen>, wall: Duration) -> CpuReport {
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    let mut groups: BTreeMap<(usize, String), (usize, u64)> = BTreeMap::new();
    for s in seen.values() {
        let g = groups.entry((s.label, s.comm.clone())).or_default();
        g.0 += 1;
        g.1 += s.last.saturating_sub(s.first);
    }
    let mut threads: Vec<ThreadGroupCpu> = groups
        .into_iter()
        .map(|((label, comm), (n, ticks))| ThreadGroupCpu {
            process: procs[label].0.clone(),
            thread: comm,
            threads: n,
            cpu_secs: ticks as f64 / hz,
        })
        .collect();
    threads.sort_by(|a, b| b.cpu_secs.total_cmp(&a.cpu_secs));
    let mut process_cpu_secs = BTreeMap::new();
    for t in &threads {
        *process_cpu_secs.entry(t.process.clone()).or_insert(0.0) += t.cpu_secs;
    }
    threads.retain(|t| t.cpu_secs > 0.0);
    CpuReport {
        wall_secs: wall.as_secs_f64(),
        process_cpu_secs,
        threads,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread_cpu() -> Duration {
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
            .map(Duration::from)
            .unwrap()
    }

    #[test]
    fn sees_a_busy_thread_of_this_process() {
        let cpu = ThreadCpu::start(
            vec![("self".into(), std::process::id())],
            Duration::from_millis(5),
        );
        std::thread::Builder::new()
            .name("busy-test".into())
            .spawn(|| {
                // Spin until this thread has had 150 ms of CPU, however busy the machine is.
                let mut x = 0u64;
                while thread_cpu() < Duration::from_millis(150) {
                    for _ in 0..10_000 {
                        x = std::hint::black_box(x.wrapping_add(1));
                    }
                }
            })
            .unwrap()
            .join()
            .unwrap();
        let r = cpu.stop().unwrap();
        let busy = r.threads.iter().find(|t| t.thread == "busy-test");
        assert!(busy.is_some_and(|b| b.cpu_secs > 0.05), "{r:?}");
        assert!(r.process_cpu_secs["self"] > 0.05, "{r:?}");
    }
}
