//! Sizes, rates and durations as operators write them, and as reports print them.
//!
//! * sizes: bytes, binary multiples: `4096`, `512K`, `64G`, `1.5T`, `64GiB`;
//! * rates: bits per second, decimal multiples: `100M` = 100 Mbit/s, `1G`, `2.5G`,
//!   `100Mbit`, `1Gbit/s` (as `faultline wan-emu --rate`);
//! * durations: `20ms`, `1.5s`, `15m`, `2h`, `500us`.
//!
//! Parsers return `None` for anything malformed; the plan file turns that into an error
//! naming the entry. A leading `-` is reported as negative by the caller.

/// Bytes with an optional binary suffix (K, M, G, T, P, E, also as KB/KiB, any case); with a
/// suffix a decimal fraction is allowed (`1.5G`) and rounded to a whole byte.
pub fn parse_size(s: &str) -> Option<f64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let n: f64 = num.parse().ok()?;
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "P" | "PB" | "PIB" => 50,
        "E" | "EB" | "EIB" => 60,
        _ => return None,
    };
    // Without a suffix it is bytes, whole ones.
    if shift == 0 && num.contains('.') {
        return None;
    }
    let v = (n * (1u64 << shift) as f64).round();
    v.is_finite().then_some(v)
}

/// Bits per second with an optional decimal suffix (k, M, G, T) and unit (`bit`, `bit/s`,
/// `bps`, `b/s`). Bytes a second (`B/s`, `Bps`, an upper-case B) are refused, not read as
/// bits: `100MB/s` is 800 Mbit/s, and taking it for 100 would plan a link 8 times slower.
pub fn parse_rate(s: &str) -> Option<f64> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let (body, unit) = ["bit/s", "bps", "bit", "b/s"]
        .iter()
        .find_map(|u| lower.strip_suffix(u).map(|b| (b, *u)))
        .unwrap_or((&lower, ""));
    if unit.starts_with('b') && !unit.starts_with("bit") && t[body.len()..].starts_with('B') {
        return None;
    }
    let body = body.trim();
    let (num, mult) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 1e3),
        Some('m') => (&body[..body.len() - 1], 1e6),
        Some('g') => (&body[..body.len() - 1], 1e9),
        Some('t') => (&body[..body.len() - 1], 1e12),
        _ => (body, 1.0),
    };
    let v: f64 = num.trim().parse().ok()?;
    let bps = (v * mult).round();
    bps.is_finite().then_some(bps)
}

/// Seconds from `20ms`, `1.5s`, `15m`, `2h`, `500us`; a bare number is `default_unit`
/// seconds (1e-3 for milliseconds).
pub fn parse_duration(s: &str, default_unit: f64) -> Option<f64> {
    let t = s.trim().to_ascii_lowercase();
    let units: [(&str, f64); 6] = [
        ("ms", 1e-3),
        ("us", 1e-6),
        ("s", 1.0),
        ("min", 60.0),
        ("m", 60.0),
        ("h", 3600.0),
    ];
    let (num, scale) = units
        .iter()
        .find_map(|(u, k)| t.strip_suffix(u).map(|n| (n, *k)))
        .unwrap_or((t.as_str(), default_unit));
    let v: f64 = num.trim().parse().ok()?;
    let secs = v * scale;
    secs.is_finite().then_some(secs)
}

/// `1.5 GiB`, `312 MiB`, `4.0 KiB`, `12 B`.
pub fn fmt_bytes(b: f64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if !b.is_finite() {
        return "-".into();
    }
    let mut v = b;
    let mut u = 0;
    while v.abs() >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} B")
    } else if v.abs() >= 100.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `1 Gbit/s`, `2.5 Gbit/s`, `312 Mbit/s`.
pub fn fmt_rate(bps: f64) -> String {
    if !bps.is_finite() {
        return "-".into();
    }
    let (v, u) = if bps >= 1e12 {
        (bps / 1e12, "Tbit/s")
    } else if bps >= 1e9 {
        (bps / 1e9, "Gbit/s")
    } else if bps >= 1e6 {
        (bps / 1e6, "Mbit/s")
    } else if bps >= 1e3 {
        (bps / 1e3, "kbit/s")
    } else {
        (bps, "bit/s")
    };
    let s = format!("{v:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s} {u}")
}

/// `0.11 s`, `12.3 s`, `1234 s`.
pub fn fmt_secs(s: f64) -> String {
    if !s.is_finite() {
        "-".into()
    } else if s.abs() < 10.0 {
        format!("{s:.2} s")
    } else if s.abs() < 1000.0 {
        format!("{s:.1} s")
    } else {
        format!("{s:.0} s")
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01: (year, month, day).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Seconds since the Unix epoch as RFC 3339 in UTC, to the second: `2026-12-01T12:00:00Z`.
pub fn fmt_rfc3339(unix_s: f64) -> String {
    let s = unix_s.floor() as i64;
    let (days, secs) = (s.div_euclid(86_400), s.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_rates_and_durations_parse() {
        assert_eq!(parse_size("4096"), Some(4096.0));
        assert_eq!(parse_size("64G"), Some((64u64 << 30) as f64));
        assert_eq!(parse_size("1.5k"), Some(1536.0));
        assert_eq!(parse_size("2 GiB"), Some((2u64 << 30) as f64));
        assert_eq!(parse_size("12X"), None);
        assert_eq!(parse_size("-1"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("1E"), Some((1u64 << 60) as f64));
        assert_eq!(parse_size("1024P"), Some((1u64 << 60) as f64));
        assert_eq!(parse_size("1EiB"), Some((1u64 << 60) as f64));
        assert_eq!(parse_size("1.5"), None, "a fraction of a byte");
        assert_eq!(parse_rate("1G"), Some(1e9));
        assert_eq!(parse_rate("2.5Gbit/s"), Some(2.5e9));
        assert_eq!(parse_rate("100 Mbit"), Some(1e8));
        assert_eq!(parse_rate("500k"), Some(5e5));
        assert_eq!(parse_rate("fast"), None);
        assert_eq!(parse_rate("1Gbps"), Some(1e9));
        assert_eq!(parse_rate("40 Mb/s"), Some(4e7));
        assert_eq!(parse_rate("1 GBit/s"), Some(1e9));
        // Bytes a second: refused, not taken for bits.
        assert_eq!(parse_rate("100MB/s"), None);
        assert_eq!(parse_rate("1 GBps"), None);
        assert_eq!(parse_rate("125MBPS"), None);
        assert_eq!(parse_duration("20ms", 1.0), Some(0.02));
        assert_eq!(parse_duration("15m", 1.0), Some(900.0));
        assert_eq!(parse_duration("2h", 1.0), Some(7200.0));
        assert_eq!(parse_duration("1.5", 1e-3), Some(0.0015));
        assert_eq!(parse_duration("soon", 1.0), None);
    }

    #[test]
    fn formats() {
        assert_eq!(fmt_bytes(1536.0), "1.5 KiB");
        assert_eq!(fmt_bytes((300u64 << 20) as f64), "300 MiB");
        assert_eq!(fmt_bytes(12.0), "12 B");
        assert_eq!(fmt_rate(1e9), "1 Gbit/s");
        assert_eq!(fmt_rate(2.5e9), "2.5 Gbit/s");
        assert_eq!(fmt_rate(312.5e6), "312.5 Mbit/s");
        assert_eq!(fmt_secs(0.111), "0.11 s");
        assert_eq!(fmt_secs(123.45), "123.5 s");
    }

    #[test]
    fn dates_round_trip() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        for z in [-1000, 0, 11_016, 11_017, 20_000, 60_000] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
        assert_eq!(fmt_rfc3339(0.0), "1970-01-01T00:00:00Z");
        assert_eq!(fmt_rfc3339(1_796_126_400.0), "2026-12-01T12:00:00Z");
    }
}
