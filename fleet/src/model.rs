//! The fleet being evacuated: links, VMs and the fixed cost of one evacuation.
//!
//! Units are in the names: sizes in **bytes**, rates in **bits per second** (`_bps`, the
//! unit of `faultline wan-emu --rate` and `--budget-mbps`), round-trip times as
//! [`Duration`]s. The simulator works in seconds and bytes per second internally
//! (`f64`).
//!
//! One evacuation, as faultline does it with a standby replica ([`Costs`]): a handshake of
//! a few round trips (QUIC address validation, TLS, `Hello`), the switchover (pause, final
//! harvest, stale set, the standby punches its holes, resume), then postcopy of the stale
//! bytes, and only those, at whatever rate the link gives the flow. Until its switchover a
//! VM runs at the source and keeps writing: its stale bytes grow at its dirty rate, up to
//! its working set ([`Vm::stale_at`]).

use std::fmt;
use std::time::Duration;

use serde::Serialize;
use thiserror::Error;

/// The most one faultline migration has in flight when no expected BDP is given: the
/// destination's per-stream receive window, 1.25 × 3.125 MB (`transport::quic::STREAM_WINDOW`).
/// With `--expected-bdp B` it is 1.25 × B, the congestion window's ceiling
/// (`TransportTuning::in_flight_cap`).
pub const DEFAULT_WINDOW_BYTES: u64 = 3_906_250;

/// The most a VM's memory, or its disks together, may hold: 1 EiB. A larger figure is a
/// typo or a wrapped number, and the fleet's sums of such sizes would overflow.
pub const MAX_BYTES: u64 = 1 << 60;

/// A network path from the site being evacuated to a standby site, modelled as one
/// bottleneck. Every VM uses exactly one link.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Link {
    pub name: String,
    /// The bottleneck's rate, bits per second: what one flow alone gets through it.
    pub rate_bps: u64,
    /// What it delivers while two or more flows share it, bits per second, at most
    /// `rate_bps`; `None`: the same. Flows that contend in its queue lose packets there
    /// and send them again, and on a busy host they share its CPU too: measured here, four
    /// flows delivered 2.7% less than one at 100 Mbit/s and 5-12% less at 1 Gbit/s
    /// (docs/fleet.md).
    pub shared_rate_bps: Option<u64>,
    /// Round-trip time of the path.
    #[serde(serialize_with = "ser_ms")]
    pub rtt: Duration,
    /// How much one migration can have in flight: 1.25 × `--expected-bdp`
    /// (`TransportTuning::in_flight_cap`). One flow moves at most window / RTT.
    pub per_flow_window_bytes: u64,
    /// What replication may use of this link in normal times, bits per second; `None`: the
    /// sum of its VMs' current budgets.
    pub replication_budget_bps: Option<u64>,
}

fn ser_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

impl Link {
    /// The round-trip time in seconds.
    pub fn rtt_s(&self) -> f64 {
        self.rtt.as_secs_f64()
    }

    /// What it delivers to `flows` flows together, bits per second (see
    /// [`Link::shared_rate_bps`]).
    pub fn rate_for(&self, flows: usize) -> u64 {
        match flows {
            0 | 1 => self.rate_bps,
            _ => self.shared_rate_bps.unwrap_or(self.rate_bps),
        }
    }

    /// What one flow can move, bits per second: window / RTT.
    pub fn flow_cap_bps(&self) -> f64 {
        self.per_flow_window_bytes as f64 * 8.0 / self.rtt_s()
    }

    /// The link's bandwidth-delay product, bytes.
    pub fn bdp_bytes(&self) -> f64 {
        self.rate_bps as f64 / 8.0 * self.rtt_s()
    }
}

/// The priorities (weights) a VM may have: the planner tells one VM saved more or fewer
/// from a near tie of sums by a tolerance far below the smallest
/// ([`crate::plan`]'s `SAVED_WEIGHT_TOL`), and a sum of 10,000 VMs at the largest is
/// still exact enough for it.
pub const PRIORITY_RANGE: std::ops::RangeInclusive<f64> = 0.001..=1000.0;

/// One VM to evacuate.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Vm {
    pub name: String,
    /// Index of its link in [`Fleet::links`].
    pub link: usize,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    /// Memory and disk bytes that went stale since their last acknowledged replication,
    /// now (at the plan's time 0). Only these cross at evacuation. Without a replica this
    /// is `memory_bytes + disk_bytes`.
    pub stale_bytes: u64,
    /// How fast the VM makes clean bytes stale while it still runs at the source, bits per
    /// second (memory and disk writes together).
    pub dirty_rate_bps: u64,
    /// The bytes it writes at all over minutes: stale bytes never grow beyond this.
    pub working_set_bytes: u64,
    /// Its replication budget in normal times, bits per second (`--budget-mbps`).
    pub replication_budget_bps: u64,
    /// How much saving it counts: a VM of weight 3 counts as three VMs. Positive.
    pub weight: f64,
    /// A limit of its own on its evacuation rate, bits per second (the source host's share
    /// of a NIC, the standby's install rate); `None`: only the link and its window limit it.
    pub max_rate_bps: Option<u64>,
    /// What its evacuation's encoding makes of a stale byte: bytes handed to the stream per
    /// byte of guest page, before [`Costs::wire_overhead`]. 1 (raw) by default; about 0.5
    /// for memory lz4 halves; within [`WIRE_RATIO_RANGE`]. Its source estimates it while
    /// the VM waits and measures it once the push runs (`fleet::control::Status`).
    pub wire_ratio: f64,
}

/// The wire ratios believed ([`Vm::wire_ratio`]): a page of data encodes to at least its
/// kind byte, and never to much more than the page. (A long zero run is a dozen bytes for
/// up to 65,536 pages; clamped, a push of them counts as costing more than it does.)
pub const WIRE_RATIO_RANGE: std::ops::RangeInclusive<f64> = (1.0 / 4096.0)..=1.1;

impl Vm {
    /// A VM on link `link` with `stale_bytes` to move and nothing else: a memory far larger
    /// than that (1 TiB), no disk, no writes while it waits, no replication budget, weight
    /// 1, no rate limit of its own. Set the other fields on the result.
    pub fn idle(name: impl Into<String>, link: usize, stale_bytes: u64) -> Vm {
        Vm {
            name: name.into(),
            link,
            memory_bytes: 1 << 40,
            disk_bytes: 0,
            stale_bytes,
            dirty_rate_bps: 0,
            working_set_bytes: 0,
            replication_budget_bps: 0,
            weight: 1.0,
            max_rate_bps: None,
            wire_ratio: 1.0,
        }
    }

    /// Memory and disk, bytes.
    pub fn total_bytes(&self) -> u64 {
        self.memory_bytes.saturating_add(self.disk_bytes)
    }

    /// Its stale bytes `t_s` seconds after time 0 if it is still running at the source:
    /// growing at the dirty rate up to the working set, never shrinking (no replication
    /// runs during an evacuation).
    ///
    /// Linear growth is an upper bound: with writes spread at random over the working set
    /// some land on pages already stale, so the growth slows as it nears the working set.
    pub fn stale_at(&self, t_s: f64) -> f64 {
        let s0 = self.stale_bytes as f64;
        let ws = self.working_set_bytes as f64;
        if s0 >= ws || t_s <= 0.0 {
            return s0;
        }
        (s0 + self.dirty_rate_bps as f64 / 8.0 * t_s).min(ws)
    }

    /// The bytes its evacuation will hand to the stream if it starts `t_s` seconds after
    /// time 0: its stale bytes then, as its encoding makes them ([`Vm::wire_ratio`]).
    pub fn wire_at(&self, t_s: f64) -> f64 {
        self.stale_at(t_s) * self.wire_ratio
    }

    /// Its stale bytes now as its encoding makes them.
    pub fn wire_bytes(&self) -> f64 {
        self.stale_bytes as f64 * self.wire_ratio
    }

    /// Dirty rate in bytes per second.
    pub fn dirty_bytes_per_s(&self) -> f64 {
        self.dirty_rate_bps as f64 / 8.0
    }
}

/// The fixed cost of one evacuation, beside moving its stale bytes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Costs {
    /// Round trips from starting an evacuation to its switchover: QUIC address validation
    /// (Retry), the TLS handshake, `Hello`/`HelloAck` (docs/wan.md). The link is not used
    /// meanwhile (the early push is ignored). Default 3, at most [`MAX_HANDSHAKE_RTTS`].
    pub handshake_rtts: f64,
    /// The switchover itself: pause, final harvest, stale set, the standby's hole punching,
    /// resume. Default 50 ms (`resume_ms` of `wan_evacuation`, less its round trip).
    #[serde(serialize_with = "ser_ms")]
    pub switchover: Duration,
    /// Wire bytes beyond the payload, per payload byte: QUIC and frame headers. Default
    /// 0.04 (`wan_evacuation` measures 3-4%). What the encoding makes of the payload is
    /// each VM's [`Vm::wire_ratio`].
    pub wire_overhead: f64,
    /// From the last page at the standby, and the standby's answer back at the source, to
    /// the source reporting the evacuation done: the two ends' last work (the standby's
    /// last installs and its completion, the source's close and report). Default 40 ms:
    /// on the bench machine a transfer alone took 96–98 ms at 1 Gbit/s × 50 ms and 65 ms
    /// at 100 Mbit/s × 20 ms beyond its bytes at the link's rate, about one round trip and
    /// 40 ms (docs/fleet.md).
    #[serde(serialize_with = "ser_ms")]
    pub finish: Duration,
}

impl Default for Costs {
    fn default() -> Self {
        Costs {
            handshake_rtts: 3.0,
            switchover: Duration::from_millis(50),
            wire_overhead: 0.04,
            finish: Duration::from_millis(40),
        }
    }
}

impl Costs {
    /// Seconds from starting a VM's evacuation on `link` to its switchover.
    pub fn setup_s(&self, link: &Link) -> f64 {
        self.handshake_rtts * link.rtt_s() + self.switchover.as_secs_f64()
    }

    /// Seconds from a VM's last byte leaving to its evacuation being done, as its source
    /// reports it: the last byte's way to the standby, the answer's way back (one RTT),
    /// and [`Costs::finish`]. The link is free for other flows meanwhile, but a schedule
    /// starts the next VM in a freed place only then (the orchestrator hears `done`), unless
    /// it prestarts.
    pub fn tail_s(&self, link: &Link) -> f64 {
        link.rtt_s() + self.finish.as_secs_f64()
    }
}

/// Links, VMs and costs, checked ([`Fleet::new`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Fleet {
    pub links: Vec<Link>,
    pub vms: Vec<Vm>,
    pub costs: Costs,
}

impl Fleet {
    /// Checks that the fleet is consistent: names unique and not empty, links exist, rates,
    /// round-trip times and windows positive, stale bytes and working sets within memory +
    /// disk, weights positive, wire ratios in [`WIRE_RATIO_RANGE`], costs finite and not
    /// negative, a setup's round trips at most [`MAX_HANDSHAKE_RTTS`].
    pub fn new(links: Vec<Link>, vms: Vec<Vm>, costs: Costs) -> Result<Fleet, InputError> {
        check_costs(&costs)?;
        let mut seen = std::collections::HashSet::new();
        for (i, l) in links.iter().enumerate() {
            let entry = Entry::link(&l.name, i);
            if l.name.is_empty() {
                return Err(entry.problem(Problem::EmptyName));
            }
            if !seen.insert(l.name.as_str()) {
                return Err(entry.problem(Problem::Duplicate));
            }
            if l.rate_bps == 0 {
                return Err(entry.problem(Problem::NotPositive("rate_bps")));
            }
            if l.rtt.is_zero() {
                return Err(entry.problem(Problem::NotPositive("rtt_ms")));
            }
            if l.shared_rate_bps == Some(0) {
                return Err(entry.problem(Problem::NotPositive("shared_rate_bps")));
            }
            if let Some(sr) = l.shared_rate_bps.filter(|&sr| sr > l.rate_bps) {
                return Err(entry.problem(Problem::Other(format!(
                    "shared_rate_bps ({sr}) exceeds rate_bps ({}): several flows get at most \
                     what one gets; a limit of each flow is a VM's max_rate_bps",
                    l.rate_bps
                ))));
            }
            if l.per_flow_window_bytes == 0 {
                return Err(entry.problem(Problem::NotPositive("window_bytes")));
            }
        }
        if vms.is_empty() {
            return Err(Entry::Top.problem(Problem::NoVms));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, v) in vms.iter().enumerate() {
            let entry = Entry::vm(&v.name, i);
            if v.name.is_empty() {
                return Err(entry.problem(Problem::EmptyName));
            }
            if !seen.insert(v.name.as_str()) {
                return Err(entry.problem(Problem::Duplicate));
            }
            if v.link >= links.len() {
                return Err(entry.problem(Problem::UnknownLink(format!("#{}", v.link))));
            }
            for (key, value) in [
                ("memory_bytes", v.memory_bytes),
                ("disk_bytes", v.disk_bytes),
            ] {
                if value > MAX_BYTES {
                    return Err(entry.problem(Problem::TooLarge {
                        key,
                        value,
                        limit: MAX_BYTES,
                    }));
                }
            }
            if v.total_bytes() == 0 {
                return Err(entry.problem(Problem::NotPositive("memory_bytes + disk_bytes")));
            }
            if v.stale_bytes > v.total_bytes() {
                return Err(entry.problem(Problem::Exceeds {
                    key: "stale_bytes",
                    value: v.stale_bytes,
                    limit: v.total_bytes(),
                }));
            }
            if v.working_set_bytes > v.total_bytes() {
                return Err(entry.problem(Problem::Exceeds {
                    key: "working_set_bytes",
                    value: v.working_set_bytes,
                    limit: v.total_bytes(),
                }));
            }
            if !(v.weight.is_finite() && v.weight > 0.0) {
                return Err(entry.problem(Problem::NotPositive("priority")));
            }
            if !PRIORITY_RANGE.contains(&v.weight) {
                return Err(entry.problem(Problem::OutOfRange {
                    key: "priority",
                    value: v.weight.to_string(),
                    range: "0.001 and 1000",
                }));
            }
            if !WIRE_RATIO_RANGE.contains(&v.wire_ratio) {
                return Err(entry.problem(Problem::OutOfRange {
                    key: "wire_ratio",
                    value: v.wire_ratio.to_string(),
                    range: "1/4096 and 1.1",
                }));
            }
            if v.max_rate_bps == Some(0) {
                return Err(entry.problem(Problem::NotPositive("max_rate_bps")));
            }
        }
        Ok(Fleet { links, vms, costs })
    }

    /// The index of the VM named `name`.
    pub fn vm_index(&self, name: &str) -> Option<usize> {
        self.vms.iter().position(|v| v.name == name)
    }

    /// The index of the link named `name`.
    pub fn link_index(&self, name: &str) -> Option<usize> {
        self.links.iter().position(|l| l.name == name)
    }

    /// What one of `vm`'s flows can move at most, bits per second: the link's window / RTT,
    /// the VM's own limit, and the link's rate.
    pub fn flow_cap_bps(&self, vm: usize) -> f64 {
        let v = &self.vms[vm];
        let link = &self.links[v.link];
        let mut cap = link.flow_cap_bps().min(link.rate_bps as f64);
        if let Some(m) = v.max_rate_bps {
            cap = cap.min(m as f64);
        }
        cap
    }
}

/// The most round trips a setup may take ([`Costs::handshake_rtts`]); a real one takes 3.
pub const MAX_HANDSHAKE_RTTS: f64 = 100.0;

fn check_costs(c: &Costs) -> Result<(), InputError> {
    let e = Entry::Costs;
    if !(c.handshake_rtts.is_finite() && c.handshake_rtts >= 0.0) {
        return Err(e.problem(Problem::Negative {
            key: "handshake_rtts",
            value: c.handshake_rtts.to_string(),
        }));
    }
    // Finite is not enough: 1e308 round trips of a link are an infinite setup, after
    // which the simulator has no time to give the VM's switchover and finish.
    if c.handshake_rtts > MAX_HANDSHAKE_RTTS {
        return Err(e.problem(Problem::OutOfRange {
            key: "handshake_rtts",
            value: c.handshake_rtts.to_string(),
            range: "0 and 100",
        }));
    }
    if !(c.wire_overhead.is_finite() && (0.0..10.0).contains(&c.wire_overhead)) {
        return Err(e.problem(Problem::OutOfRange {
            key: "wire_overhead",
            value: c.wire_overhead.to_string(),
            range: "0 and 10",
        }));
    }
    Ok(())
}

/// Which part of the input an [`InputError`] is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// The plan as a whole (its top-level keys).
    Top,
    /// The `[costs]` table.
    Costs,
    /// A link, by name.
    Link(String),
    /// A link without a usable name: its position (0-based) among the links.
    LinkAt(usize),
    /// A VM, by name.
    Vm(String),
    /// A VM without a usable name: its position (0-based) among the VMs.
    VmAt(usize),
}

impl Entry {
    /// The link `name` (its position if the name is empty).
    pub fn link(name: &str, i: usize) -> Entry {
        if name.is_empty() {
            Entry::LinkAt(i)
        } else {
            Entry::Link(name.to_string())
        }
    }

    /// The VM `name` (its position if the name is empty).
    pub fn vm(name: &str, i: usize) -> Entry {
        if name.is_empty() {
            Entry::VmAt(i)
        } else {
            Entry::Vm(name.to_string())
        }
    }

    /// This entry with what is wrong with it.
    pub fn problem(self, problem: Problem) -> InputError {
        InputError {
            entry: self,
            problem,
        }
    }
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Entry::Top => f.write_str("plan"),
            Entry::Costs => f.write_str("[costs]"),
            Entry::Link(n) => write!(f, "link {n:?}"),
            Entry::LinkAt(i) => write!(f, "link #{} ([[link]] entry {})", i + 1, i + 1),
            Entry::Vm(n) => write!(f, "vm {n:?}"),
            Entry::VmAt(i) => write!(f, "vm #{} ([[vm]] entry {})", i + 1, i + 1),
        }
    }
}

/// What is wrong with an entry.
#[derive(Clone, Debug, PartialEq, Error)]
pub enum Problem {
    #[error("name must not be empty")]
    EmptyName,
    #[error("the name is used twice")]
    Duplicate,
    #[error("{key} is missing")]
    Missing { key: &'static str },
    #[error("unknown key {key:?} (known: {known})")]
    UnknownKey { key: String, known: &'static str },
    #[error("{key} must be {expected} (got {got})")]
    WrongType {
        key: String,
        expected: &'static str,
        got: String,
    },
    #[error("{key} cannot be negative (got {value})")]
    Negative { key: &'static str, value: String },
    #[error("{0} must be > 0")]
    NotPositive(&'static str),
    #[error("{key} must be between {range} (got {value})")]
    OutOfRange {
        key: &'static str,
        value: String,
        range: &'static str,
    },
    #[error("{key} = {value} is not a whole number of bytes (\"1.5G\" is fine)")]
    NotWhole { key: &'static str, value: String },
    #[error("{key} = {value:?} is in bytes a second: rates are bits a second (write {bits:?})")]
    BytesPerSecond {
        key: &'static str,
        value: String,
        bits: String,
    },
    #[error("{key} = {value:?} is not {what} (examples: {examples})")]
    Unparsable {
        key: &'static str,
        value: String,
        what: &'static str,
        examples: &'static str,
    },
    #[error("{key} ({value} bytes) exceeds memory_bytes + disk_bytes ({limit} bytes)")]
    Exceeds {
        key: &'static str,
        value: u64,
        limit: u64,
    },
    #[error("{key} ({value} bytes) is more than any VM holds (at most {limit} bytes, 1 EiB)")]
    TooLarge {
        key: &'static str,
        value: u64,
        limit: u64,
    },
    #[error("link {0:?} is not defined")]
    UnknownLink(String),
    #[error("{key} names vm {vm:?}, which is not defined")]
    UnknownVm { key: &'static str, vm: String },
    #[error("{key} names vm {vm:?} twice")]
    Repeated { key: &'static str, vm: String },
    #[error("vm {0:?} is both in first and in skip")]
    FirstAndSkip(String),
    #[error("has no VMs ([[vm]] entries)")]
    NoVms,
    #[error("has no links ([[link]] entries)")]
    NoLinks,
    #[error("link is missing: there are several links, say which ({0})")]
    WhichLink(String),
    #[error("deadline {deadline} is in the past (now is {now})")]
    DeadlineInPast { deadline: String, now: String },
    #[error("deadline {0} must be in the future")]
    DeadlineNotAhead(String),
    #[error("{0}")]
    Other(String),
}

/// Bad input: which entry, and what is wrong with it. Displays as `vm "db-3": disk_bytes
/// cannot be negative (got -5)`.
#[derive(Clone, Debug, PartialEq, Error)]
#[error("{entry}: {problem}")]
pub struct InputError {
    pub entry: Entry,
    pub problem: Problem,
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn link(name: &str, rate_bps: u64, rtt_ms: u64, window: u64) -> Link {
        Link {
            name: name.into(),
            rate_bps,
            rtt: Duration::from_millis(rtt_ms),
            shared_rate_bps: None,
            per_flow_window_bytes: window,
            replication_budget_bps: None,
        }
    }

    fn vm(name: &str, stale: u64) -> Vm {
        Vm {
            memory_bytes: 1 << 30,
            dirty_rate_bps: 8_000_000,
            working_set_bytes: 10_000_000,
            ..Vm::idle(name, 0, stale)
        }
    }

    #[test]
    fn stale_bytes_grow_at_the_dirty_rate_up_to_the_working_set() {
        let v = vm("a", 1_000_000);
        assert_eq!(v.stale_at(0.0), 1e6);
        assert_eq!(v.stale_at(-1.0), 1e6);
        // 8 Mbit/s = 1 MB/s.
        assert_eq!(v.stale_at(2.0), 3e6);
        assert_eq!(v.stale_at(9.0), 1e7);
        assert_eq!(v.stale_at(100.0), 1e7);
        // Already beyond its working set: stays where it is.
        let big = vm("b", 50_000_000);
        assert_eq!(big.stale_at(100.0), 5e7);
    }

    #[test]
    fn a_flow_is_capped_at_window_over_rtt() {
        // 4 MB over 100 ms: 320 Mbit/s on a 1 Gbit/s link.
        let l = link("l", 1_000_000_000, 100, 4_000_000);
        assert!((l.flow_cap_bps() - 320e6).abs() < 1e-3);
        assert!((l.bdp_bytes() - 12.5e6).abs() < 1e-6);
        let mut v = vm("a", 0);
        let f = Fleet::new(vec![l.clone()], vec![v.clone()], Costs::default()).unwrap();
        assert!((f.flow_cap_bps(0) - 320e6).abs() < 1e-3);
        v.max_rate_bps = Some(100_000_000);
        let f = Fleet::new(vec![l], vec![v], Costs::default()).unwrap();
        assert_eq!(f.flow_cap_bps(0), 1e8);
        // A big window: the link's rate is the cap.
        let wide = link("w", 1_000_000_000, 10, 100_000_000);
        let f = Fleet::new(vec![wide], vec![vm("a", 0)], Costs::default()).unwrap();
        assert_eq!(f.flow_cap_bps(0), 1e9);
    }

    #[test]
    fn setup_is_a_few_round_trips_and_the_switchover() {
        let l = link("l", 1_000_000_000, 20, DEFAULT_WINDOW_BYTES);
        let c = Costs::default();
        assert!((c.setup_s(&l) - 0.11).abs() < 1e-12);
        assert!((c.tail_s(&l) - 0.06).abs() < 1e-12);
    }

    #[test]
    fn inconsistent_fleets_are_refused_naming_the_entry() {
        let l = || vec![link("wan", 1_000_000_000, 20, DEFAULT_WINDOW_BYTES)];
        let err = |links: Vec<Link>, vms: Vec<Vm>| {
            Fleet::new(links, vms, Costs::default())
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err(l(), vec![vm("a", 0), vm("a", 0)]),
            "vm \"a\": the name is used twice"
        );
        let mut v = vm("db-3", 2 << 30);
        assert_eq!(
            err(l(), vec![v.clone()]),
            "vm \"db-3\": stale_bytes (2147483648 bytes) exceeds memory_bytes + disk_bytes \
             (1073741824 bytes)"
        );
        v.stale_bytes = 0;
        v.link = 3;
        assert_eq!(
            err(l(), vec![v.clone()]),
            "vm \"db-3\": link \"#3\" is not defined"
        );
        v.link = 0;
        v.wire_ratio = 1.5;
        assert_eq!(
            err(l(), vec![v.clone()]),
            "vm \"db-3\": wire_ratio must be between 1/4096 and 1.1 (got 1.5)"
        );
        v.wire_ratio = f64::NAN;
        assert!(err(l(), vec![v.clone()]).contains("(got NaN)"));
        v.wire_ratio = 0.5;
        v.weight = 0.0;
        assert_eq!(err(l(), vec![v]), "vm \"db-3\": priority must be > 0");
        let mut bad = l();
        bad[0].rate_bps = 0;
        assert_eq!(
            err(bad, vec![vm("a", 0)]),
            "link \"wan\": rate_bps must be > 0"
        );
        assert_eq!(err(l(), vec![]), "plan: has no VMs ([[vm]] entries)");
        assert_eq!(
            err(l(), vec![vm("", 0)]),
            "vm #1 ([[vm]] entry 1): name must not be empty"
        );
    }
}
