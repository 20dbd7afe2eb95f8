//! The machine as a run starts: how idle its CPUs are, and what earlier runs left behind.
//!
//! The bench machine is shared, and an end-to-end bench at 1 Gbit/s needs most of its
//! cores: the same fleet command gave 20–39% per-VM error one half hour and 1–4% the next
//! (docs/fleet.md, "Setups beside transfers, and what the first seconds carry"), with no
//! change of code. A run line that says how idle the machine was just before, and whether
//! `faultline` processes or `/dev/shm/faultline-test-*` directories of an earlier (killed)
//! run were still there, lets such a run be told apart afterwards.

use std::time::Duration;

use faultline_tests::ShmDir;
use serde::Serialize;

/// What [`before_run`] saw.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MachineState {
    /// Idle CPUs over the window (idle and I/O wait), in cores.
    pub idle_cores: f64,
    /// CPUs the hypervisor gave to others over the window (`steal`), in cores.
    pub steal_cores: f64,
    /// The online CPUs.
    pub cores: usize,
    /// The 1-minute load average.
    pub loadavg_1m: Option<f64>,
    /// `faultline` processes running (other than this one): none should be, between runs.
    pub faultline_processes: usize,
    /// `/dev/shm/faultline-test-*` entries: none should be, between runs.
    pub shm_leftovers: usize,
}

/// Reads the machine's state over `window` (the idle CPU is a difference of two readings
/// of `/proc/stat`). Fields it cannot read are 0 or `None`: a bench on another system runs
/// on.
pub fn before_run(window: Duration) -> MachineState {
    let first = read_cpu_times();
    std::thread::sleep(window);
    let second = read_cpu_times();
    let (idle_cores, steal_cores, cores) = match (first, second) {
        (Some(a), Some(b)) => a.cores_between(&b),
        _ => (0.0, 0.0, 0),
    };
    MachineState {
        idle_cores,
        steal_cores,
        cores,
        loadavg_1m: std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok()),
        faultline_processes: faultline_processes(),
        shm_leftovers: std::fs::read_dir("/dev/shm").map_or(0, |d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with(ShmDir::PREFIX))
                .count()
        }),
    }
}

/// The CPU over a stretch (a whole run), from [`CpuWatch::start`] to [`CpuWatch::since`]:
/// the hypervisor of a shared machine can take a large share of it for minutes (42–47% of
/// both cores in a stretch of 2026-12-08, while a fleet ran at a third below its link's
/// rate), which an idle reading before the run does not show.
pub struct CpuWatch(Option<CpuTimes>);

/// What [`CpuWatch::since`] saw, in cores averaged over the stretch.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct CpuShare {
    /// Idle (and waiting for I/O).
    pub idle_cores: f64,
    /// Given by the hypervisor to others (`steal`).
    pub steal_cores: f64,
}

/// Stolen cores over a run above which its figures say more about the machine than about
/// the code: a tenth of a core.
pub const STEAL_WARNING_CORES: f64 = 0.1;

impl CpuWatch {
    pub fn start() -> CpuWatch {
        CpuWatch(read_cpu_times())
    }

    /// Since the start; `None` where `/proc/stat` cannot be read.
    pub fn since(&self) -> Option<CpuShare> {
        let (idle_cores, steal_cores, _) = self.0?.cores_between(&read_cpu_times()?);
        Some(CpuShare {
            idle_cores,
            steal_cores,
        })
    }
}

impl MachineState {
    /// What a run should not start beside, said in a sentence; `None` if nothing.
    pub fn leftovers(&self) -> Option<String> {
        (self.faultline_processes > 0 || self.shm_leftovers > 0).then(|| {
            format!(
                "{} faultline process(es) and {} /dev/shm/{}* entries beside this run (left by \
                 a killed run, or another's running): they take CPU and memory from it",
                self.faultline_processes,
                self.shm_leftovers,
                ShmDir::PREFIX
            )
        })
    }
}

/// The aggregate line of `/proc/stat`, in clock ticks, and the number of CPUs.
#[derive(Clone, Copy, Debug, PartialEq)]
struct CpuTimes {
    idle: u64,
    steal: u64,
    total: u64,
    cores: usize,
}

impl CpuTimes {
    /// (idle cores, stolen cores, cores) between `self` and a later reading.
    fn cores_between(&self, later: &CpuTimes) -> (f64, f64, usize) {
        let total = later.total.saturating_sub(self.total);
        if total == 0 {
            return (0.0, 0.0, later.cores);
        }
        let share = |a: u64, b: u64| b.saturating_sub(a) as f64 / total as f64;
        let n = later.cores as f64;
        (
            share(self.idle, later.idle) * n,
            share(self.steal, later.steal) * n,
            later.cores,
        )
    }
}

fn read_cpu_times() -> Option<CpuTimes> {
    parse_proc_stat(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// `cpu  user nice system idle iowait irq softirq steal ...` and one `cpuN` line per CPU.
fn parse_proc_stat(text: &str) -> Option<CpuTimes> {
    let mut lines = text.lines();
    let mut fields = lines.next()?.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let ticks: Vec<u64> = fields.map_while(|f| f.parse().ok()).collect();
    if ticks.len() < 8 {
        return None;
    }
    // Guest time is counted in user time already.
    let total = ticks[..8].iter().sum();
    let cores = lines
        .filter(|l| {
            l.strip_prefix("cpu")
                .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
        })
        .count();
    Some(CpuTimes {
        idle: ticks[3] + ticks[4],
        steal: ticks[7],
        total,
        cores,
    })
}

fn faultline_processes() -> usize {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            let pid = e.file_name();
            let pid = pid.to_string_lossy();
            pid.chars().all(|c| c.is_ascii_digit()) && pid != me
        })
        .filter(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                let argv0 = c.split(|&b| b == 0).next().unwrap_or(&[]);
                let argv0 = String::from_utf8_lossy(argv0);
                std::path::Path::new(argv0.as_ref())
                    .file_name()
                    .is_some_and(|n| n == "faultline")
            })
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  100 5 50 800 20 3 2 10 0 0\n\
                        cpu0 50 2 25 400 10 1 1 5 0 0\n\
                        cpu1 50 3 25 400 10 2 1 5 0 0\n\
                        intr 12345\n";

    #[test]
    fn proc_stat_gives_idle_steal_total_and_cores() {
        let t = parse_proc_stat(STAT).unwrap();
        assert_eq!(
            t,
            CpuTimes {
                idle: 820,
                steal: 10,
                total: 990,
                cores: 2
            }
        );
        assert_eq!(parse_proc_stat("intr 1\n"), None);
        assert_eq!(parse_proc_stat("cpu 1 2 3\n"), None);
    }

    #[test]
    fn cores_between_two_readings() {
        let a = parse_proc_stat(STAT).unwrap();
        // 200 ticks later: 150 idle, 10 stolen, on 2 CPUs: 1.5 cores idle, 0.1 stolen.
        let b = CpuTimes {
            idle: a.idle + 150,
            steal: a.steal + 10,
            total: a.total + 200,
            cores: 2,
        };
        let (idle, steal, cores) = a.cores_between(&b);
        assert!((idle - 1.5).abs() < 1e-9, "{idle}");
        assert!((steal - 0.1).abs() < 1e-9, "{steal}");
        assert_eq!(cores, 2);
        // No time between them: nothing measured.
        assert_eq!(a.cores_between(&a), (0.0, 0.0, 2));
    }

    #[test]
    fn this_machine_reads_as_some_cores_none_idler_than_there_are() {
        let s = before_run(Duration::from_millis(50));
        assert!(s.cores >= 1, "{s:?}");
        let n = s.cores as f64;
        assert!((0.0..=n + 1e-9).contains(&s.idle_cores), "{s:?}");
        assert!((0.0..=n + 1e-9).contains(&s.steal_cores), "{s:?}");
        assert!(s.loadavg_1m.is_some_and(|l| l >= 0.0), "{s:?}");
    }

    #[test]
    fn a_watch_over_a_stretch_reads_no_more_cores_than_there_are() {
        let watch = CpuWatch::start();
        std::thread::sleep(Duration::from_millis(50));
        let s = watch.since().expect("this machine has /proc/stat");
        let n = before_run(Duration::ZERO).cores as f64;
        assert!((0.0..=n + 1e-9).contains(&s.idle_cores), "{s:?}");
        assert!((0.0..=n + 1e-9).contains(&s.steal_cores), "{s:?}");
    }

    #[test]
    fn leftovers_are_said_only_when_there_are_some() {
        let mut s = MachineState {
            idle_cores: 2.0,
            steal_cores: 0.0,
            cores: 2,
            loadavg_1m: Some(0.1),
            faultline_processes: 0,
            shm_leftovers: 0,
        };
        assert_eq!(s.leftovers(), None);
        s.shm_leftovers = 12;
        assert!(s
            .leftovers()
            .unwrap()
            .contains("12 /dev/shm/faultline-test-*"));
    }
}
