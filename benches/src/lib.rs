//! Shared infrastructure for faultline's benchmark binaries.
//!
//! Every bench is a `harness = false` binary run with `cargo bench --bench <name>` (release
//! build). It prints one JSON object per measured configuration on stdout ([`emit`]) and logs
//! to stderr, and it measures its own baseline in the same run so results can be reported as
//! ratios that survive a noisy machine.
//!
//! * [`stats`]: latency summaries (nearest-rank percentiles) and medians.
//! * [`child`]: re-executing the bench binary as a second process with a role, so a bench
//!   can put the two ends of a connection in different processes.
//! * [`certs`]: a throw-away directory with two pinned TLS identities that both processes load.
//! * [`baseline`]: raw-quinn floors (request/response latency, one-stream throughput) using
//!   the same TLS and transport configuration as faultline.
//! * [`migration`]: one real faultline migration, destination in the bench process and source
//!   in a child process.
//! * [`cpu`]: per-thread CPU time of both processes while a measurement runs.
//! * [`e2e`]: for benches driving real `faultline` processes through the WAN emulator:
//!   process checks, QUIC windows sized for the link, a random image.

pub mod baseline;
pub mod certs;
pub mod child;
pub mod cpu;
pub mod e2e;
pub mod machine;
pub mod migration;
pub mod stats;

use std::io::Write;

/// Prints `obj` as one JSON line on stdout and flushes, so a consumer reading the pipe sees
/// each result (or, in a child process, each handshake message) as soon as it is produced.
///
/// For readability the keys `bench` and `case` of an object come first; the remaining keys
/// follow in alphabetical order (serde_json's default map order).
///
/// Panics if stdout is closed: a bench whose results cannot be written has failed.
pub fn emit(obj: &serde_json::Value) {
    let line = to_line(obj);
    let mut out = std::io::stdout().lock();
    out.write_all(line.as_bytes())
        .and_then(|()| out.flush())
        .expect("cannot write to stdout");
}

/// One JSON line (with the trailing newline) for `obj`, `bench` and `case` keys first.
fn to_line(obj: &serde_json::Value) -> String {
    const FIRST: [&str; 2] = ["bench", "case"];
    let mut line = String::new();
    match obj {
        serde_json::Value::Object(map) => {
            let first = FIRST.iter().filter_map(|k| map.get_key_value(*k));
            let rest = map.iter().filter(|(k, _)| !FIRST.contains(&k.as_str()));
            line.push('{');
            for (i, (k, v)) in first.chain(rest).enumerate() {
                if i > 0 {
                    line.push(',');
                }
                line.push_str(&serde_json::Value::String(k.clone()).to_string());
                line.push(':');
                line.push_str(&v.to_string());
            }
            line.push('}');
        }
        other => line.push_str(&other.to_string()),
    }
    line.push('\n');
    line
}

/// The tokio runtime every bench process uses: multi-threaded with 2 workers (the size of the
/// benchmark machine), timers and I/O enabled.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// Reads a size from environment variable `name`, or `default` if it is unset.
///
/// Accepts a plain integer or one with a binary suffix `K`, `M`, `G` or `T` (optionally
/// followed by `i`/`iB`/`B`, e.g. `64M`, `1GiB`). Panics with a clear message on anything else,
/// since a silently ignored override would mislabel a result.
pub fn env_size(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => parse_size(&v).unwrap_or_else(|| panic!("{name}={v:?} is not a size")),
        Err(_) => default,
    }
}

/// Parses `123`, `4K`, `64M`, `1G`, `1GiB`, `2TB` (binary multiples). `None` if malformed or
/// if it overflows `u64`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, suffix) = s.split_at(digits);
    let n: u64 = num.parse().ok()?;
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KI" | "KIB" => 10,
        "M" | "MB" | "MI" | "MIB" => 20,
        "G" | "GB" | "GI" | "GIB" => 30,
        "T" | "TB" | "TI" | "TIB" => 40,
        _ => return None,
    };
    n.checked_mul(1u64 << shift)
}

#[cfg(test)]
mod tests {
    use super::{parse_size, to_line};

    #[test]
    fn lines_put_bench_and_case_first() {
        let v = serde_json::json!({"a": 1, "case": "x", "bench": "b", "z": [1, 2]});
        let line = to_line(&v);
        assert_eq!(
            line,
            "{\"bench\":\"b\",\"case\":\"x\",\"a\":1,\"z\":[1,2]}\n"
        );
        assert_eq!(serde_json::from_str::<serde_json::Value>(&line).unwrap(), v);
        assert_eq!(to_line(&serde_json::json!(3)), "3\n");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("4K"), Some(4096));
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size(" 2gb "), Some(2 << 30));
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("1X"), None);
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("99999999999T"), None);
    }
}

/// An emulated WAN link of a bench: rate and round-trip time.
#[derive(Clone, Copy, Debug)]
pub struct Link {
    pub rate_bps: u64,
    pub rtt_ms: u64,
}

impl Link {
    /// `100Mbit_20ms`: the `link` field of the JSON lines.
    pub fn name(&self) -> String {
        format!("{}Mbit_{}ms", self.rate_bps / 1_000_000, self.rtt_ms)
    }
}
