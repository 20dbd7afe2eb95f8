//! Helpers for the benches that drive real `faultline` processes (started with
//! `faultline_tests`) through the WAN emulator: checking how a process ended, sizing the
//! QUIC windows for the emulated link, and a random image to migrate.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::bail;

use crate::cpu::{CpuReport, ThreadCpu};
use faultline_tests::{Background, DestProcess, Finished};
use transport::quic::{bdp_bytes, ENV_EXPECTED_BDP};
use wan_emu::{Direction, DirectionCounters, WanCounters, WanEmulator};

/// Fails unless `f` (the `what` process) exited successfully with its JSON report.
pub fn check(f: &Finished, what: &str) -> anyhow::Result<()> {
    if !f.status.success() || f.json.is_null() {
        bail!("the {what} failed ({}): {}", f.status, f.stderr);
    }
    Ok(())
}

/// Waits for a source and its destination (at most `timeout` each) while sampling both
/// processes' CPU per thread (labels `source` and `dest`), then checks that both exited
/// successfully with their reports.
pub fn finish_sampled(
    src: Background,
    dest: DestProcess,
    timeout: Duration,
) -> anyhow::Result<(Finished, Finished, Option<CpuReport>)> {
    let cpu = ThreadCpu::start(
        vec![("source".into(), src.pid()), ("dest".into(), dest.pid())],
        Duration::from_millis(20),
    );
    let src = src.wait(timeout);
    let dst = dest.wait(timeout);
    let cpu = cpu.stop();
    check(&src, "source")?;
    check(&dst, "destination")?;
    Ok((src, dst, cpu))
}

/// Fails unless both reports carry the same digest of all guest memory.
pub fn check_digests(src: &Finished, dst: &Finished) -> anyhow::Result<()> {
    let (s, d) = (&src.json["digest"], &dst.json["digest"]);
    if !s.is_string() || s != d {
        bail!("digests differ: source {s} destination {d}");
    }
    Ok(())
}

/// Both processes (started after this) size their QUIC windows for a link of `rate_bps`
/// and `rtt`, as an operator would with `FAULTLINE_EXPECTED_BDP` (docs/wan.md).
pub fn set_expected_bdp(rate_bps: u64, rtt: Duration) {
    std::env::set_var(ENV_EXPECTED_BDP, bdp_bytes(rate_bps, rtt).to_string());
}

/// Writes `bytes` of pseudo-random data (xorshift64, fixed seed) to `path`: nothing
/// compresses, no page is a zero page, so every page costs its full size on the wire.
pub fn write_random_image(path: &Path, bytes: u64) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut s = 0x2545_f491_4f6c_dd1du64;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        for c in buf.chunks_exact_mut(8) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            c.copy_from_slice(&s.to_le_bytes());
        }
        let n = left.min(buf.len() as u64);
        f.write_all(&buf[..n as usize])?;
        left -= n;
    }
    f.flush()?;
    Ok(())
}

/// The timestamp of the first line of `f`'s stderr that contains `what`, in the format of
/// `faultline`'s log (`tracing`'s default: an RFC 3339 UTC time first, e.g.
/// `2026-12-04T12:39:48.123456Z`; run it with `NO_COLOR=1`). Set `FAULTLINE_LOG` so that
/// the line is logged.
pub fn log_time(f: &Finished, what: &str) -> Option<SystemTime> {
    f.stderr
        .lines()
        .find(|l| l.contains(what))
        .and_then(|l| parse_rfc3339_utc(l.split_whitespace().next()?))
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction]Z` as a time; `None` for anything else.
pub fn parse_rfc3339_utc(s: &str) -> Option<SystemTime> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.splitn(3, ':').map(|p| p.parse::<u64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    if frac.is_empty() || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let nanos: u32 = format!("{frac:0<9}").get(..9)?.parse().ok()?;
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    Some(SystemTime::UNIX_EPOCH + Duration::new(secs, nanos))
}

/// What a WAN emulator did every 50 ms of a run (`with_link_timeline`), from its first bin
/// that carried source → destination data: where a run loses time, and whether the
/// emulated path is what delays it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LinkTimeline {
    /// The rate it carried source → destination, Mbit/s.
    pub mbps: Vec<f64>,
    /// The round trip the link model gave the bin's datagrams: the mean modelled delay
    /// (propagation, jitter, queueing and serialisation) source → destination plus the mean
    /// back, ms (`None`: a direction carried nothing in the bin).
    pub rtt_ms: Vec<Option<f64>>,
    /// How late the relay sent the bin's datagrams after their delivery time, the mean of
    /// each direction added, ms: delay the emulator's threads added on a busy machine, which
    /// a real link would not (`None`: a direction carried nothing).
    pub late_ms: Vec<Option<f64>>,
}

impl LinkTimeline {
    /// Nothing sampled (no `FAULTLINE_BENCH_TIMELINE`, no emulator, or no data).
    pub fn is_empty(&self) -> bool {
        self.mbps.is_empty()
    }

    /// Appends the bin between two snapshots `secs` apart.
    fn push(&mut self, before: &WanCounters, after: &WanCounters, secs: f64) {
        let bytes = after.client_to_server.bytes - before.client_to_server.bytes;
        self.mbps.push((bytes as f64 * 8.0 / secs / 1e6).round());
        // Mean per datagram of a summed counter over the bin, ms; None if none was sent.
        let mean = |dir: Direction, sum: fn(&DirectionCounters) -> u64| {
            let (a, b) = (before.get(dir), after.get(dir));
            let n = b.timed_packets.checked_sub(a.timed_packets)?;
            (n > 0).then(|| sum(b).saturating_sub(sum(a)) as f64 / n as f64 / 1e6)
        };
        let both = |sum: fn(&DirectionCounters) -> u64, scale: f64| {
            let one_way = Direction::BOTH.map(|d| mean(d, sum));
            Some(((one_way[0]? + one_way[1]?) * scale).round() / scale)
        };
        self.rtt_ms.push(both(|c| c.modelled_delay_ns, 10.0));
        self.late_ms.push(both(|c| c.send_lateness_ns, 100.0));
    }

    /// Drops the bins before the first that carried data.
    fn trim_start(&mut self) {
        let first = self.mbps.iter().position(|&m| m >= 1.0);
        let skip = first.unwrap_or(self.mbps.len());
        self.mbps.drain(..skip);
        self.rtt_ms.drain(..skip);
        self.late_ms.drain(..skip);
    }
}

/// Runs `f` while sampling, when `FAULTLINE_BENCH_TIMELINE` is set, what `wan` did every
/// 50 ms ([`LinkTimeline`]). Empty without the variable or without an emulator.
pub fn with_link_timeline<T>(
    wan: Option<&WanEmulator>,
    f: impl FnOnce() -> T,
) -> (T, LinkTimeline) {
    const BIN: Duration = Duration::from_millis(50);
    let done = std::sync::atomic::AtomicBool::new(false);
    let sample = || {
        let mut timeline = LinkTimeline::default();
        let Some(w) = wan else { return timeline };
        if std::env::var_os("FAULTLINE_BENCH_TIMELINE").is_none() {
            return timeline;
        }
        let mut last = w.counters();
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(BIN);
            let now = w.counters();
            timeline.push(&last, &now, BIN.as_secs_f64());
            last = now;
        }
        timeline.trim_start();
        timeline
    };
    std::thread::scope(|sc| {
        let sampler = sc.spawn(sample);
        let out = f();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        (out, sampler.join().unwrap_or_default())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_timeline_bins_means_per_datagram() {
        let snap = |bytes, c2s: (u64, u64, u64), s2c: (u64, u64, u64)| {
            let dir = |bytes, (n, delay, late)| DirectionCounters {
                bytes,
                timed_packets: n,
                modelled_delay_ns: delay,
                send_lateness_ns: late,
                ..Default::default()
            };
            WanCounters {
                client_to_server: dir(bytes, c2s),
                server_to_client: dir(0, s2c),
                clients: 1,
            }
        };
        let a = snap(0, (0, 0, 0), (0, 0, 0));
        // A bin of handshakes only (under 1 Mbit/s), trimmed.
        let b = snap(100, (2, 50_000_000, 0), (2, 50_000_000, 0));
        // 625,000 bytes in 50 ms: 100 Mbit/s; 100 datagrams at 26 ms and 0.5 ms late each
        // way on average, acks 10 at 25 ms and 0.25 ms late.
        let c = snap(
            625_100,
            (102, 50_000_000 + 2_600_000_000, 50_000_000),
            (12, 50_000_000 + 250_000_000, 2_500_000),
        );
        // Nothing back in this bin: no round trip to tell.
        let d = snap(
            625_100,
            (102, 2_650_000_000, 50_000_000),
            (12, 300_000_000, 2_500_000),
        );
        let mut t = LinkTimeline::default();
        for (x, y) in [(&a, &b), (&b, &c), (&c, &d)] {
            t.push(x, y, 0.05);
        }
        t.trim_start();
        assert_eq!(t.mbps, vec![100.0, 0.0]);
        assert_eq!(t.rtt_ms, vec![Some(51.0), None]);
        assert_eq!(t.late_ms, vec![Some(0.75), None]);
        assert!(!t.is_empty());
    }

    #[test]
    fn log_timestamps() {
        let t = parse_rfc3339_utc("2026-12-04T12:39:48.123456Z").unwrap();
        let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(d.as_secs(), 1_796_387_988);
        assert_eq!(d.subsec_nanos(), 123_456_000);
        let leap = parse_rfc3339_utc("2024-02-29T00:00:01Z").unwrap();
        assert_eq!(
            leap.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            1_709_164_801
        );
        assert_eq!(
            parse_rfc3339_utc("1970-01-01T00:00:00Z"),
            Some(SystemTime::UNIX_EPOCH)
        );
        for bad in [
            "2026-13-04T12:39:48Z",
            "INFO",
            "2026-12-04T12:39:48.Z",
            "2026-12-04",
        ] {
            assert!(parse_rfc3339_utc(bad).is_none(), "{bad}");
        }
    }
}
