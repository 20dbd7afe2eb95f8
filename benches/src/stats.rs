//! Latency summaries.
//!
//! Percentiles use the **nearest-rank** method on the sorted samples: the p-th percentile of
//! `n` samples is the sample at 1-based rank `ceil(p/100 * n)` (at least 1). Every reported
//! value is therefore an actually observed sample, never an interpolation, and `p100 == max`.
//! Samples are sorted exactly (no histogram bucketing); bench sample counts are small enough
//! that this costs nothing.

use std::time::Duration;

use serde::Serialize;

/// Distribution of one measured quantity. Latencies are in **microseconds** (f64).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    /// Number of samples.
    pub count: usize,
    /// Median (nearest rank).
    pub p50: f64,
    /// 90th percentile (nearest rank).
    pub p90: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
    /// Largest sample.
    pub max: f64,
    /// Arithmetic mean.
    pub mean: f64,
}

impl Summary {
    /// Summarises samples already in the unit to report (µs for latencies). NaN samples are
    /// dropped. An empty input gives `count: 0` and all other fields NaN (serialised as `null`).
    pub fn from_samples(mut samples: Vec<f64>) -> Summary {
        samples.retain(|x| !x.is_nan());
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        if n == 0 {
            return Summary {
                count: 0,
                p50: f64::NAN,
                p90: f64::NAN,
                p99: f64::NAN,
                max: f64::NAN,
                mean: f64::NAN,
            };
        }
        Summary {
            count: n,
            p50: nearest_rank(&samples, 50.0),
            p90: nearest_rank(&samples, 90.0),
            p99: nearest_rank(&samples, 99.0),
            max: samples[n - 1],
            mean: samples.iter().sum::<f64>() / n as f64,
        }
    }

    /// Summarises durations, converted to microseconds.
    pub fn from_durations(samples: &[Duration]) -> Summary {
        Summary::from_samples(samples.iter().map(|d| d.as_secs_f64() * 1e6).collect())
    }

    /// The summary as a JSON object (`count`, `p50`, `p90`, `p99`, `max`, `mean`), ready to be
    /// extended with labels before [`crate::emit`].
    pub fn to_json(&self) -> serde_json::Map<String, serde_json::Value> {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => unreachable!("a struct serialises to an object"),
        }
    }
}

/// The p-th percentile (0 < p <= 100) of **sorted** samples by nearest rank.
pub fn nearest_rank(sorted: &[f64], p: f64) -> f64 {
    assert!(!sorted.is_empty(), "percentile of no samples");
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Median of a few repeated measurements (e.g. throughput runs): the middle value, or the mean
/// of the two middle values for an even count. NaN for no values.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// For each of `keys`, the median (`{key}_median`) and p99 (`{key}_p99`) of its numeric
/// values over `rows` (a bench's JSON lines of one case); a key no row has is left out.
pub fn key_medians<'a>(
    keys: &[&str],
    rows: impl Iterator<Item = &'a serde_json::Value> + Clone,
) -> serde_json::Map<String, serde_json::Value> {
    let mut out = serde_json::Map::new();
    for k in keys {
        let v: Vec<f64> = rows.clone().filter_map(|r| r[*k].as_f64()).collect();
        if v.is_empty() {
            continue;
        }
        out.insert(format!("{k}_median"), median(&v).into());
        out.insert(format!("{k}_p99"), Summary::from_samples(v).p99.into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_medians_skip_what_no_row_has() {
        let rows = [
            serde_json::json!({"a": 1.0, "b": "x"}),
            serde_json::json!({"a": 3.0}),
            serde_json::json!({"a": 2.0}),
        ];
        let m = key_medians(&["a", "b", "c"], rows.iter());
        assert_eq!(m["a_median"], 2.0);
        assert_eq!(m["a_p99"], 3.0);
        assert!(!m.contains_key("b_median") && !m.contains_key("c_median"));
    }

    #[test]
    fn nearest_rank_percentiles() {
        let s = Summary::from_samples((1..=100).rev().map(f64::from).collect());
        assert_eq!(s.count, 100);
        assert_eq!((s.p50, s.p90, s.p99, s.max), (50.0, 90.0, 99.0, 100.0));
        assert_eq!(s.mean, 50.5);

        let s = Summary::from_samples(vec![7.0, 3.0, 5.0]);
        assert_eq!((s.p50, s.p90, s.p99, s.max), (5.0, 7.0, 7.0, 7.0));

        let one = Summary::from_samples(vec![4.0]);
        assert_eq!((one.p50, one.p99), (4.0, 4.0));
        assert_eq!(Summary::from_samples(vec![]).count, 0);
    }

    #[test]
    fn durations_are_microseconds() {
        let s = Summary::from_durations(&[Duration::from_micros(10), Duration::from_millis(1)]);
        assert_eq!((s.p50, s.max), (10.0, 1000.0));
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
