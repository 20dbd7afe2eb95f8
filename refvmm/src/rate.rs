//! The guest's op rate over time: a sampler thread reads the vCPUs' reported progress at a
//! fixed period, and pure functions turn the series into rates (before, during and after
//! postcopy) and the time until the guest is back to a share of its old rate.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::ProgressProbe;

/// One sample: milliseconds since the series' origin, and the guests' total op count.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub t_ms: f64,
    pub ops: u64,
}

/// Samples a [`ProgressProbe`] on its own thread until stopped.
pub struct RateSampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Sample>>>,
}

impl RateSampler {
    /// Starts sampling every `period`; times are measured from `origin`.
    pub fn start(probe: ProgressProbe, origin: Instant, period: Duration) -> RateSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("rate-sampler".into())
            .spawn(move || {
                let mut out = Vec::new();
                while !stop2.load(Ordering::Relaxed) {
                    out.push(Sample {
                        t_ms: origin.elapsed().as_secs_f64() * 1e3,
                        ops: probe.total(),
                    });
                    std::thread::sleep(period);
                }
                out
            })
            .ok();
        RateSampler { stop, thread }
    }

    /// Stops sampling and returns the series (empty if the thread could not start).
    pub fn stop(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for RateSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The op count at `t_ms`: the last sample at or before it (0 before the first).
fn ops_at(series: &[Sample], t_ms: f64) -> Option<Sample> {
    series.iter().take_while(|s| s.t_ms <= t_ms).last().copied()
}

/// Ops per second between the samples nearest to `from_ms` and `to_ms` (at or before each).
/// `None` when the interval holds fewer than two samples.
pub fn rate_between(series: &[Sample], from_ms: f64, to_ms: f64) -> Option<f64> {
    let a = ops_at(series, from_ms).or_else(|| series.first().copied())?;
    let b = ops_at(series, to_ms)?;
    let dt = (b.t_ms - a.t_ms) / 1e3;
    (dt > 0.0).then(|| b.ops.saturating_sub(a.ops) as f64 / dt)
}

/// The first time at or after `from_ms` when the rate over the following `window_ms`
/// reaches `target` ops/s. `None` if it never does within the series.
pub fn time_to_rate(series: &[Sample], from_ms: f64, window_ms: f64, target: f64) -> Option<f64> {
    let start = series.iter().position(|s| s.t_ms >= from_ms)?;
    for (i, a) in series.iter().enumerate().skip(start) {
        let Some(b) = series[i..].iter().find(|b| b.t_ms >= a.t_ms + window_ms) else {
            break;
        };
        let rate = b.ops.saturating_sub(a.ops) as f64 / ((b.t_ms - a.t_ms) / 1e3);
        if rate >= target {
            return Some(a.t_ms - from_ms);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1000 ops/ms until 100 ms, 100 ops/ms until 300 ms, then 1000 ops/ms again.
    fn series() -> Vec<Sample> {
        let mut ops = 0;
        (0..=600)
            .step_by(10)
            .map(|t| {
                let s = Sample {
                    t_ms: t as f64,
                    ops,
                };
                ops += if (100..300).contains(&t) {
                    1000
                } else {
                    10_000
                };
                s
            })
            .collect()
    }

    #[test]
    fn rates_over_intervals() {
        let s = series();
        assert_eq!(rate_between(&s, 0.0, 100.0), Some(1e6));
        assert_eq!(rate_between(&s, 100.0, 300.0), Some(1e5));
        assert_eq!(rate_between(&s, 300.0, 600.0), Some(1e6));
        assert_eq!(rate_between(&s, 50.0, 50.0), None);
        assert_eq!(rate_between(&[], 0.0, 1.0), None);
    }

    #[test]
    fn time_back_to_a_share_of_the_old_rate() {
        let s = series();
        // From 100 ms the rate is low until 300 ms; a 50 ms window reaches 90% of 1e6 when it
        // starts at 300 ms.
        assert_eq!(time_to_rate(&s, 100.0, 50.0, 0.9e6), Some(200.0));
        assert_eq!(time_to_rate(&s, 0.0, 50.0, 0.9e6), Some(0.0));
        assert_eq!(time_to_rate(&s, 100.0, 50.0, 2e6), None);
        assert_eq!(time_to_rate(&s, 10_000.0, 50.0, 1.0), None);
    }
}
