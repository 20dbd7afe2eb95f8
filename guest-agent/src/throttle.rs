//! Keeps the agent's scanning under a CPU budget: after each batch of work it sleeps long
//! enough that the calling thread's CPU time stays at most `max_cpu_pct` percent of wall
//! time (a duty cycle). CPU time includes the kernel's work for our reads of `/proc`, which
//! is most of the cost.

use std::time::Duration;

/// CPU time used by the calling thread so far.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass, which lives on our stack.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time used by the whole process so far (all threads, user + system).
pub fn process_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: as above.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A per-thread duty-cycle limiter.
#[derive(Debug)]
pub struct Throttle {
    pct: u32,
    mark: Duration,
    /// CPU time measured between pauses, for the report.
    used: Duration,
    slept: Duration,
}

impl Throttle {
    /// A limiter to `max_cpu_pct` percent (1..=100; 100 never sleeps), starting now.
    pub fn new(max_cpu_pct: u32) -> Throttle {
        Throttle {
            pct: max_cpu_pct.clamp(1, 100),
            mark: thread_cpu_time(),
            used: Duration::ZERO,
            slept: Duration::ZERO,
        }
    }

    /// How long to sleep after using `cpu` to stay at `pct` percent.
    pub fn sleep_for(pct: u32, cpu: Duration) -> Duration {
        let pct = pct.clamp(1, 100);
        cpu * (100 - pct) / pct
    }

    /// Sleeps for the CPU used since the last call (or since `new`).
    pub fn pause(&mut self) {
        let now = thread_cpu_time();
        let cpu = now.saturating_sub(self.mark);
        self.used += cpu;
        let nap = Self::sleep_for(self.pct, cpu);
        if !nap.is_zero() {
            std::thread::sleep(nap);
            self.slept += nap;
        }
        self.mark = thread_cpu_time();
    }

    /// CPU time used by the throttled work so far.
    pub fn used(&self) -> Duration {
        self.used + thread_cpu_time().saturating_sub(self.mark)
    }

    /// Time spent sleeping so far.
    pub fn slept(&self) -> Duration {
        self.slept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duty_cycle_arithmetic() {
        assert_eq!(
            Throttle::sleep_for(100, Duration::from_millis(10)),
            Duration::ZERO
        );
        assert_eq!(
            Throttle::sleep_for(50, Duration::from_millis(10)),
            Duration::from_millis(10)
        );
        assert_eq!(
            Throttle::sleep_for(5, Duration::from_millis(10)),
            Duration::from_millis(190)
        );
        assert_eq!(
            Throttle::sleep_for(0, Duration::from_millis(1)),
            Duration::from_millis(99)
        );
    }

    #[test]
    fn measures_cpu() {
        let mut t = Throttle::new(100);
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        t.pause();
        assert!(t.used() > Duration::ZERO);
        assert_eq!(t.slept(), Duration::ZERO);
    }
}
