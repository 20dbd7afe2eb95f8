//! The plan file: a fleet, its deadline and margin, in TOML (docs/fleet.md).
//!
//! ```toml
//! deadline = "15m"                 # from now; or 2026-12-01T12:00:00Z (RFC 3339)
//! margin = 0.10                    # plan for links 10% slower than stated
//! first = ["db-1"]                 # optional: start these first, in this order
//! skip = ["scratch-7"]             # optional: do not evacuate these (each named below)
//!
//! [costs]                          # optional; these are the defaults
//! handshake_rtts = 3
//! switchover_ms = 50
//! wire_overhead = 0.04
//! finish_ms = 40
//!
//! [[link]]
//! name = "wan-a"
//! rate_bps = "1G"                  # bits per second, one flow alone
//! shared_rate_bps = "940M"         # two or more flows together (default: rate_bps)
//! rtt_ms = 20
//! window_bytes = "3.1M"            # per-flow window: 1.25 x --expected-bdp
//!
//! [[vm]]
//! name = "db-1"
//! link = "wan-a"
//! memory_bytes = "64G"
//! disk_bytes = "500G"
//! stale_bytes = "3G"
//! dirty_rate_bps = "200M"
//! working_set_bytes = "16G"
//! replication_budget_bps = "50M"
//! priority = 3
//! wire_ratio = 0.5                 # optional: what the encoding makes of a byte (1: raw)
//!
//! [[vm]]
//! name = "scratch-7"
//! memory_bytes = "8G"
//! ```
//!
//! Every number may be a TOML number or a string with a suffix; errors name the entry and
//! the key (`vm "db-3": disk_bytes cannot be negative (got -5)`). [`parse`] is pure: the caller
//! reads the file and says what time it is.

use std::time::Duration;

use thiserror::Error;
use toml::{Table, Value};

use crate::model::{Costs, Entry, Fleet, InputError, Link, Problem, Vm, DEFAULT_WINDOW_BYTES};
use crate::plan::{PlanOptions, DEFAULT_MARGIN};
use crate::units::{
    days_from_civil, fmt_rate, fmt_rfc3339, parse_duration, parse_rate, parse_size,
};

mod control;
pub use control::{parse_addr, ControlAddr, ControlPlan, VmControl};

/// A plan file, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanFile {
    pub fleet: Fleet,
    /// Where each VM's source listens for `faultline evacuate`, and the certificates.
    pub control: ControlPlan,
    /// The deadline as seconds from `now`, the margin, pinned and skipped VMs.
    pub options: PlanOptions,
    pub deadline: Deadline,
}

/// The deadline as the file gave it.
#[derive(Clone, Debug, PartialEq)]
pub enum Deadline {
    /// Seconds from now.
    In(f64),
    /// An absolute time: seconds since the Unix epoch, and as RFC 3339 in UTC.
    At { unix_s: f64, rfc3339: String },
}

/// Why a plan file was refused.
#[derive(Debug, Error)]
pub enum PlanFileError {
    /// Not TOML at all: where, and what was expected.
    #[error(transparent)]
    Syntax(TomlSyntax),
    /// An entry is wrong: it is named.
    #[error(transparent)]
    Input(#[from] InputError),
}

/// A TOML syntax error as the parser words it (`TOML parse error at line 1, column 11`,
/// the line with a caret, what was expected), without its trailing newline.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct TomlSyntax(String);

/// The furthest a deadline may be: an evacuation is planned for minutes or hours, so one
/// further off than a year is a slip of the pen (and would print as hundreds of digits).
pub const MAX_DEADLINE_S: f64 = 366.0 * 86_400.0;

const TOP_KEYS: &str = "deadline, margin, first, skip, costs, link, vm, cert, key, peer_cert";
const COSTS_KEYS: &str = "handshake_rtts, switchover_ms, wire_overhead, finish_ms";
const LINK_KEYS: &str =
    "name, rate_bps, shared_rate_bps, rtt_ms, window_bytes, replication_budget_bps";
const VM_KEYS: &str = "name, link, memory_bytes, disk_bytes, stale_bytes, dirty_rate_bps, \
                       working_set_bytes, replication_budget_bps, priority, max_rate_bps, \
                       wire_ratio, control, peer_cert";

const SIZE_EXAMPLES: &str = "4096, \"512M\", \"64G\"";
const RATE_EXAMPLES: &str = "1000000000, \"100M\", \"1G\", \"2.5Gbit/s\"";

/// Parses and checks a plan file; `now_unix_s` is the time now (seconds since the Unix
/// epoch), against which the deadline is taken.
pub fn parse(text: &str, now_unix_s: f64) -> Result<PlanFile, PlanFileError> {
    let doc: Table = toml::from_str(text).map_err(|e: toml::de::Error| {
        PlanFileError::Syntax(TomlSyntax(e.to_string().trim_end().to_string()))
    })?;
    let top = Entry::Top;
    for key in doc.keys() {
        if !TOP_KEYS.split(", ").any(|k| k == key) {
            return Err(top
                .problem(Problem::UnknownKey {
                    key: key.clone(),
                    known: TOP_KEYS,
                })
                .into());
        }
    }
    let costs = match doc.get("costs") {
        None => Costs::default(),
        Some(Value::Table(t)) => parse_costs(t)?,
        Some(other) => return Err(wrong_type(top, "costs", "a table ([costs])", other).into()),
    };
    let links_raw = array_of_tables(&doc, "link")?;
    let vms_raw = array_of_tables(&doc, "vm")?;
    if links_raw.is_empty() {
        return Err(Entry::Top.problem(Problem::NoLinks).into());
    }
    let mut links = Vec::with_capacity(links_raw.len());
    for (i, t) in links_raw.iter().enumerate() {
        links.push(parse_link(t, i)?);
    }
    let link_names: Vec<String> = links.iter().map(|l| l.name.clone()).collect();
    for (i, name) in link_names.iter().enumerate() {
        if link_names[..i].contains(name) {
            return Err(Entry::Link(name.clone()).problem(Problem::Duplicate).into());
        }
    }
    let mut vms = Vec::with_capacity(vms_raw.len());
    let mut control = control::parse_top(&doc)?;
    for (i, t) in vms_raw.iter().enumerate() {
        let vm = parse_vm(t, i, &link_names)?;
        control
            .vms
            .push(control::parse_vm(&Entry::Vm(vm.name.clone()), t)?);
        vms.push(vm);
    }
    let fleet = Fleet::new(links, vms, costs)?;

    let deadline = parse_deadline(&doc, now_unix_s)?;
    let deadline_s = match &deadline {
        Deadline::In(s) => *s,
        Deadline::At { unix_s, .. } => unix_s - now_unix_s,
    };
    let margin = match doc.get("margin") {
        None => DEFAULT_MARGIN,
        Some(v) => {
            let m = fraction(top.clone(), "margin", v)?;
            // The planner keeps at least 1% of a link (`plan::plan_from`).
            if !(0.0..=0.99).contains(&m) {
                return Err(top
                    .problem(Problem::OutOfRange {
                        key: "margin",
                        value: m.to_string(),
                        range: "0 and 0.99, as 0.1 or \"10%\"",
                    })
                    .into());
            }
            m
        }
    };
    let first = vm_list(&doc, "first", &fleet)?;
    let skip = vm_list(&doc, "skip", &fleet)?;
    if let Some(&i) = first.iter().find(|i| skip.contains(i)) {
        return Err(top
            .problem(Problem::FirstAndSkip(fleet.vms[i].name.clone()))
            .into());
    }
    Ok(PlanFile {
        fleet,
        control,
        options: PlanOptions {
            deadline_s,
            margin,
            first,
            skip,
        },
        deadline,
    })
}

fn array_of_tables<'a>(doc: &'a Table, key: &'static str) -> Result<Vec<&'a Table>, InputError> {
    match doc.get(key) {
        None => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::Table(t) => Ok(t),
                other => Err(wrong_type(
                    Entry::Top,
                    key,
                    "an array of tables ([[...]] entries)",
                    other,
                )),
            })
            .collect(),
        Some(other) => Err(wrong_type(
            Entry::Top,
            key,
            "an array of tables ([[...]] entries)",
            other,
        )),
    }
}

fn check_keys(t: &Table, entry: &Entry, known: &'static str) -> Result<(), InputError> {
    for key in t.keys() {
        if !known.split(", ").any(|k| k == key.as_str()) {
            return Err(entry.clone().problem(Problem::UnknownKey {
                key: key.clone(),
                known,
            }));
        }
    }
    Ok(())
}

fn wrong_type(entry: Entry, key: &str, expected: &'static str, got: &Value) -> InputError {
    entry.problem(Problem::WrongType {
        key: key.to_string(),
        expected,
        got: describe(got),
    })
}

fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Integer(i) => i.to_string(),
        // 1e300 rather than its 301 digits, 1e-300 rather than its 300 zeros.
        Value::Float(f) if *f != 0.0 && !(1e-3..1e9).contains(&f.abs()) => format!("{f:e}"),
        Value::Float(f) => f.to_string(),
        Value::Boolean(b) => b.to_string(),
        Value::Datetime(d) => d.to_string(),
        Value::Array(_) => "an array".into(),
        Value::Table(_) => "a table".into(),
    }
}

fn name_of(t: &Table, entry_at: Entry) -> Result<String, InputError> {
    match t.get("name") {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(entry_at.problem(Problem::EmptyName)),
        Some(other) => Err(wrong_type(entry_at, "name", "a string", other)),
        None => Err(entry_at.problem(Problem::Missing { key: "name" })),
    }
}

/// A non-negative quantity: a number, or a string `parse` understands.
fn quantity(
    entry: &Entry,
    key: &'static str,
    v: &Value,
    parse: fn(&str) -> Option<f64>,
    what: &'static str,
    examples: &'static str,
) -> Result<f64, InputError> {
    let x = match v {
        Value::Integer(i) => *i as f64,
        Value::Float(f) if f.is_finite() => *f,
        Value::String(s) => {
            let t = s.trim();
            if let Some(rest) = t.strip_prefix('-') {
                if parse(rest).is_some_and(|x| x > 0.0) {
                    return Err(entry.clone().problem(Problem::Negative {
                        key,
                        value: format!("{s:?}"),
                    }));
                }
            }
            parse(t).ok_or_else(|| {
                entry.clone().problem(Problem::Unparsable {
                    key,
                    value: s.clone(),
                    what,
                    examples,
                })
            })?
        }
        other => return Err(wrong_type(entry.clone(), key, what, other)),
    };
    if x < 0.0 {
        return Err(entry.clone().problem(Problem::Negative {
            key,
            value: describe(v),
        }));
    }
    Ok(x)
}

fn to_u64(x: f64) -> u64 {
    if x >= u64::MAX as f64 {
        u64::MAX
    } else {
        x.round() as u64
    }
}

fn size(entry: &Entry, t: &Table, key: &'static str) -> Result<Option<u64>, InputError> {
    t.get(key)
        .map(|v| {
            if let Value::Float(f) = v {
                // A plain number is bytes; a fraction of one is a slip (`"1.5G"` is fine).
                if f.is_finite() && f.fract() != 0.0 {
                    return Err(entry.clone().problem(Problem::NotWhole {
                        key,
                        value: describe(v),
                    }));
                }
            }
            let x = quantity(entry, key, v, parse_size, "a size in bytes", SIZE_EXAMPLES)?;
            // Refused here, as written, rather than as the number it would round to.
            if x > crate::model::MAX_BYTES as f64 {
                return Err(entry.clone().problem(Problem::OutOfRange {
                    key,
                    value: describe(v),
                    range: "0 and 1 EiB (2^60 bytes)",
                }));
            }
            Ok(to_u64(x))
        })
        .transpose()
}

fn rate(entry: &Entry, t: &Table, key: &'static str) -> Result<Option<u64>, InputError> {
    t.get(key)
        .map(|v| {
            if let Value::String(s) = v {
                if let Some(bits) = bytes_a_second(s) {
                    return Err(entry.clone().problem(Problem::BytesPerSecond {
                        key,
                        value: s.clone(),
                        bits: fmt_rate(bits),
                    }));
                }
            }
            quantity(entry, key, v, parse_rate, "a rate in bit/s", RATE_EXAMPLES).map(to_u64)
        })
        .transpose()
}

/// A rate written in bytes a second (`100MB/s`, `1GBps`: an upper-case B before `/s` or
/// `ps`, any case after it), which `parse_rate` refuses rather than read as bits: the bits
/// a second it means, if the rest is a rate.
fn bytes_a_second(s: &str) -> Option<f64> {
    let t = s.trim();
    let unit = t.len().checked_sub(3).filter(|&i| t.is_char_boundary(i))?;
    let (body, tail) = t.split_at(unit);
    let tail = tail.to_ascii_lowercase();
    if !(tail == "bps" || tail == "b/s") || !t[unit..].starts_with('B') || body.is_empty() {
        return None;
    }
    parse_rate(body).map(|bytes| bytes * 8.0)
}

fn millis(entry: &Entry, t: &Table, key: &'static str) -> Result<Option<f64>, InputError> {
    t.get(key)
        .map(|v| {
            quantity(
                entry,
                key,
                v,
                |s| parse_duration(s, 1e-3).map(|x| x * 1e3),
                "a time in milliseconds",
                "20, \"20ms\", \"0.1s\"",
            )
        })
        .transpose()
}

/// `key` in milliseconds (as [`millis`]) as a [`Duration`]; out of range past about
/// 584 million years, which `Duration` cannot hold.
fn duration_ms(
    entry: &Entry,
    t: &Table,
    key: &'static str,
) -> Result<Option<Duration>, InputError> {
    millis(entry, t, key)?
        .map(|ms| {
            Duration::try_from_secs_f64(ms / 1e3).map_err(|_| {
                entry.clone().problem(Problem::OutOfRange {
                    key,
                    value: format!("{ms:e} ms"),
                    range: "0 and 1.8e22 ms",
                })
            })
        })
        .transpose()
}

fn number(entry: &Entry, t: &Table, key: &'static str) -> Result<Option<f64>, InputError> {
    t.get(key)
        .map(|v| {
            quantity(
                entry,
                key,
                v,
                |s| s.trim().parse().ok(),
                "a number",
                "1, 2.5",
            )
        })
        .transpose()
}

fn required<T>(entry: &Entry, key: &'static str, v: Option<T>) -> Result<T, InputError> {
    v.ok_or_else(|| entry.clone().problem(Problem::Missing { key }))
}

fn fraction(entry: Entry, key: &'static str, v: &Value) -> Result<f64, InputError> {
    let pct = |s: &str| {
        let s = s.trim();
        match s.strip_suffix('%') {
            Some(p) => p.trim().parse::<f64>().ok().map(|x| x / 100.0),
            None => s.parse().ok(),
        }
    };
    quantity(&entry, key, v, pct, "a fraction", "0.1, \"10%\"")
}

fn parse_costs(t: &Table) -> Result<Costs, InputError> {
    let e = Entry::Costs;
    check_keys(t, &e, COSTS_KEYS)?;
    let d = Costs::default();
    Ok(Costs {
        handshake_rtts: number(&e, t, "handshake_rtts")?.unwrap_or(d.handshake_rtts),
        switchover: duration_ms(&e, t, "switchover_ms")?.unwrap_or(d.switchover),
        wire_overhead: number(&e, t, "wire_overhead")?.unwrap_or(d.wire_overhead),
        finish: duration_ms(&e, t, "finish_ms")?.unwrap_or(d.finish),
    })
}

fn parse_link(t: &Table, i: usize) -> Result<Link, InputError> {
    let name = name_of(t, Entry::LinkAt(i))?;
    let e = Entry::Link(name.clone());
    check_keys(t, &e, LINK_KEYS)?;
    let rtt = required(&e, "rtt_ms", duration_ms(&e, t, "rtt_ms")?)?;
    if rtt.is_zero() {
        return Err(e.problem(Problem::NotPositive("rtt_ms")));
    }
    Ok(Link {
        name,
        rate_bps: required(&e, "rate_bps", rate(&e, t, "rate_bps")?)?,
        rtt,
        shared_rate_bps: rate(&e, t, "shared_rate_bps")?,
        per_flow_window_bytes: size(&e, t, "window_bytes")?.unwrap_or(DEFAULT_WINDOW_BYTES),
        replication_budget_bps: rate(&e, t, "replication_budget_bps")?,
    })
}

fn parse_vm(t: &Table, i: usize, links: &[String]) -> Result<Vm, InputError> {
    let name = name_of(t, Entry::VmAt(i))?;
    let e = Entry::Vm(name.clone());
    check_keys(t, &e, VM_KEYS)?;
    let link = match t.get("link") {
        Some(Value::String(l)) => links
            .iter()
            .position(|n| n == l)
            .ok_or_else(|| e.clone().problem(Problem::UnknownLink(l.clone())))?,
        Some(other) => return Err(wrong_type(e, "link", "a link's name", other)),
        None if links.len() == 1 => 0,
        None => return Err(e.problem(Problem::WhichLink(links.join(", ")))),
    };
    let memory = required(&e, "memory_bytes", size(&e, t, "memory_bytes")?)?;
    let disk = size(&e, t, "disk_bytes")?.unwrap_or(0);
    let total = memory.saturating_add(disk);
    let weight = number(&e, t, "priority")?.unwrap_or(1.0);
    if weight <= 0.0 {
        return Err(e.problem(Problem::NotPositive("priority")));
    }
    Ok(Vm {
        name,
        link,
        memory_bytes: memory,
        disk_bytes: disk,
        // No replica: everything crosses.
        stale_bytes: size(&e, t, "stale_bytes")?.unwrap_or(total),
        dirty_rate_bps: rate(&e, t, "dirty_rate_bps")?.unwrap_or(0),
        working_set_bytes: size(&e, t, "working_set_bytes")?.unwrap_or(memory),
        replication_budget_bps: rate(&e, t, "replication_budget_bps")?.unwrap_or(0),
        weight,
        max_rate_bps: rate(&e, t, "max_rate_bps")?,
        // Checked against its range with the rest of the fleet (`Fleet::new`).
        wire_ratio: number(&e, t, "wire_ratio")?.unwrap_or(1.0),
    })
}

fn vm_list(doc: &Table, key: &'static str, fleet: &Fleet) -> Result<Vec<usize>, InputError> {
    let arr = match doc.get(key) {
        None => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(other) => return Err(wrong_type(Entry::Top, key, "an array of VM names", other)),
    };
    let mut out = Vec::with_capacity(arr.len());
    for v in arr {
        let Value::String(name) = v else {
            return Err(wrong_type(Entry::Top, key, "an array of VM names", v));
        };
        let i = fleet.vm_index(name).ok_or_else(|| {
            Entry::Top.problem(Problem::UnknownVm {
                key,
                vm: name.clone(),
            })
        })?;
        if out.contains(&i) {
            return Err(Entry::Top.problem(Problem::Repeated {
                key,
                vm: name.clone(),
            }));
        }
        out.push(i);
    }
    Ok(out)
}

fn parse_deadline(doc: &Table, now: f64) -> Result<Deadline, InputError> {
    let top = Entry::Top;
    let v = doc
        .get("deadline")
        .ok_or_else(|| top.clone().problem(Problem::Missing { key: "deadline" }))?;
    let too_far = |shown: String| {
        top.clone().problem(Problem::OutOfRange {
            key: "deadline",
            value: shown,
            range: "now and a year from now",
        })
    };
    let absolute = |dt: &toml::value::Datetime| -> Result<Deadline, InputError> {
        let unix = datetime_unix(dt).ok_or_else(|| {
            top.clone().problem(Problem::Other(format!(
                "deadline {dt} needs a date, a time and a UTC offset \
                 (2026-12-01T12:00:00Z or 2026-12-01T14:00:00+02:00)"
            )))
        })?;
        if unix <= now {
            return Err(top.clone().problem(Problem::DeadlineInPast {
                deadline: dt.to_string(),
                now: fmt_rfc3339(now),
            }));
        }
        if unix - now > MAX_DEADLINE_S {
            return Err(too_far(dt.to_string()));
        }
        Ok(Deadline::At {
            unix_s: unix,
            rfc3339: fmt_rfc3339(unix),
        })
    };
    let relative = |secs: f64, shown: String| -> Result<Deadline, InputError> {
        if secs <= 0.0 {
            return Err(top.clone().problem(Problem::DeadlineNotAhead(shown)));
        }
        if secs > MAX_DEADLINE_S {
            return Err(too_far(shown));
        }
        Ok(Deadline::In(secs))
    };
    match v {
        Value::Datetime(dt) => absolute(dt),
        Value::Integer(i) => relative(*i as f64, i.to_string()),
        Value::Float(f) if f.is_finite() => relative(*f, describe(v)),
        Value::String(s) => {
            if let Ok(dt) = s.trim().parse::<toml::value::Datetime>() {
                return absolute(&dt);
            }
            match parse_duration(s, 1.0) {
                Some(secs) => relative(secs, format!("{s:?}")),
                None => Err(top.problem(Problem::Unparsable {
                    key: "deadline",
                    value: s.clone(),
                    what: "a time from now or an RFC 3339 time",
                    examples: "900, \"15m\", \"2026-12-01T12:00:00Z\"",
                })),
            }
        }
        other => Err(wrong_type(
            top,
            "deadline",
            "a time from now or an RFC 3339 time",
            other,
        )),
    }
}

/// Seconds since the Unix epoch of a TOML datetime with a date, a time and an offset.
fn datetime_unix(dt: &toml::value::Datetime) -> Option<f64> {
    let (date, time, offset) = (dt.date?, dt.time?, dt.offset?);
    let days = days_from_civil(
        i64::from(date.year),
        u32::from(date.month),
        u32::from(date.day),
    );
    let secs = days * 86_400
        + i64::from(time.hour) * 3600
        + i64::from(time.minute) * 60
        + i64::from(time.second.unwrap_or(0));
    let offset_min = match offset {
        toml::value::Offset::Z => 0,
        toml::value::Offset::Custom { minutes } => i64::from(minutes),
    };
    Some((secs - offset_min * 60) as f64 + f64::from(time.nanosecond.unwrap_or(0)) * 1e-9)
}

#[cfg(test)]
mod tests;
