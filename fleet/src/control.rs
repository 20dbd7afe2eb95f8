//! The control protocol between `faultline evacuate` (the orchestrator) and each VM's
//! source (`faultline replicate --control ADDR`): typed messages and their framing, pure.
//!
//! The transport is QUIC with mutual TLS, each side pinning the other's certificate (the
//! `transport` crate's endpoints); this module only says what crosses it. One request per
//! bidirectional stream, orchestrator → source; the source answers on the same stream:
//!
//! * [`Request::Status`] → one [`Reply::Status`], then the stream ends;
//! * [`Request::Evacuate`] → [`Reply::Accepted`] (or [`Reply::Refused`]), then a
//!   [`Reply::Event`] at every state change and every [`EVENT_INTERVAL_MS`] while the
//!   evacuation runs, until one whose state is [`EvacState::Done`] or
//!   [`EvacState::Failed`]; then the stream ends;
//! * [`Request::SetRate`] → one [`Reply::RateSet`], then the stream ends: the
//!   orchestrator's share of the link for this VM, changed while its evacuation runs (or
//!   before it starts).
//!
//! A frame is a 4-byte big-endian length and that many bytes of JSON, at most
//! [`MAX_FRAME`]. Input from the network never panics a decoder: a frame too long, cut
//! short or not one of these messages is a [`ControlError`].
//!
//! Versions: every field added since the first version is optional (absent from an older
//! peer, it reads as `None`), and a field a receiver does not know is ignored, so an
//! orchestrator and sources of different releases work together (sources on many hosts
//! are not upgraded at once). A new field whose meaning a receiver must not miss comes
//! with an answer that says it was honoured, as [`Reply::Accepted`] does for a rate cap.
//! A message type a receiver does not know, or a known field of the wrong type, is an
//! error.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Largest frame body either side accepts, bytes.
pub const MAX_FRAME: usize = 64 * 1024;

/// How often a source sends an event while its evacuation runs, even without a change:
/// the orchestrator takes a longer silence as a dead source.
pub const EVENT_INTERVAL_MS: u64 = 250;

/// The QUIC application close code with which an orchestrator hangs up on a source it gave
/// up on (it counts the VM failed: silent, or its stream broken). A source that receives it
/// keeps the rate limit it was left: the VMs planned in its place have the link. On any
/// other end of the orchestrator's connection (code 0, or none: it crashed, or the close
/// was lost on a cut path and the connection idled out) a source puts back its own limit if
/// the orchestrator's last one was lower and nothing changed the limit since, since nobody
/// shares the link for it any more.
pub const CLOSE_GAVE_UP: u32 = 2;

/// The QUIC application close code with which a source turns away a control connection
/// beyond [`MAX_CONTROL_CONNECTIONS`]; its reason says so.
pub const CLOSE_TOO_MANY: u32 = 3;

/// The QUIC stream reset code with which a source ends an evacuation's events stream it
/// could not write to: the orchestrator read none of its events for the source's write
/// timeout (counted from when the stream's window filled). The evacuation goes on; only
/// its events end. (Another failure to write them ends the stream with code 0.)
pub const RESET_EVENTS_UNREAD: u32 = 1;

/// Control connections a source keeps open at once. An orchestrator needs one (and
/// `faultline plan --live` another); the rest leave room for one that reconnects before
/// its old connection has timed out. Each holds a task and its windows, so even the
/// pinned peer cannot open them without bound.
pub const MAX_CONTROL_CONNECTIONS: usize = 16;

/// The most characters of free text (a failure's reason) a side puts in a message: a long
/// error chain must not make every later frame too long to send ([`MAX_FRAME`]).
pub const MAX_TEXT_CHARS: usize = 2048;

/// `text` as it may cross the control protocol or reach an operator's terminal: control
/// characters (a peer's terminal escapes, newlines) each shown as `\u{..}`, and at most
/// [`MAX_TEXT_CHARS`] characters, the last "…" where it was cut. Cleaning it again
/// changes nothing.
pub fn clean_text(text: &str) -> String {
    let mut shown = text.chars().flat_map(|c| {
        let escaped = c.is_control().then(|| c.escape_unicode());
        let plain = (!c.is_control()).then_some(c);
        escaped.into_iter().flatten().chain(plain)
    });
    let mut out: String = shown.by_ref().take(MAX_TEXT_CHARS).collect();
    if shown.next().is_some() {
        out.pop();
        out.push('…');
    }
    out
}

/// What the orchestrator asks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Where the VM is.
    Status,
    /// Start the evacuation now (as SIGUSR1 does). `rate_cap_bps`: a limit on its rate,
    /// bits per second, within the source's own ([`within_own`]; `None`: the source's own,
    /// usually none); a source that cannot pace says so in [`Reply::Accepted`].
    Evacuate { rate_cap_bps: Option<u64> },
    /// Limit the evacuation's rate to `rate_cap_bps` bits per second from now on, within
    /// the source's own limit ([`within_own`]: `None` lifts the limit back to that one, a
    /// cap above it gets that one), whether it runs yet or not.
    SetRate {
        rate_cap_bps: Option<u64>,
        /// Its place among the limits set on this connection, counting from 1, a new one
        /// for every request (absent from an orchestrator before 2026-12-07: each is
        /// applied as it arrives). A source applies a limit only if it is newer than every
        /// one it applied on the connection, and then no longer applies the cap of an
        /// `Evacuate` that arrives late: requests travel on streams of their own, so one
        /// asked again after it went unanswered, whose first copy arrives after a newer
        /// limit, must not undo it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
    },
}

/// What a source answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Status(Status),
    /// The evacuation starts (or had started: a second request follows the same one).
    Accepted {
        /// Whether the source paces its evacuation to the limits it is sent: the requested
        /// cap (within the source's own, [`within_own`]), unless a newer `SetRate` of the
        /// connection arrived first (then that one's).
        rate_cap_honoured: bool,
    },
    /// The request cannot be done; the reason, in words.
    Refused {
        reason: String,
    },
    /// The VM's status after a change, or as a heartbeat.
    Event(Status),
    /// The answer to [`Request::SetRate`]: the limit now in force, bits per second.
    RateSet {
        rate_cap_bps: Option<u64>,
        /// The request's place, echoed (absent from a source before 2026-12-07, which
        /// applies every limit as it arrives: once an answer shows that, an orchestrator
        /// does not ask again, since a first copy arriving late would undo the one after
        /// it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
    },
}

/// Where a VM's replication stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplState {
    /// Replicating to the standby.
    Running,
    /// Replication ended (the evacuation started, or the replicator stopped on an error).
    Stopped,
}

/// Where a VM's evacuation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvacState {
    /// Not asked yet.
    Idle,
    /// Asked: replication stops, the guest pauses, the session to the standby is set up.
    Starting,
    /// Connected to the standby, the stale set sent with the handshake: the standby runs
    /// the guest and the stale pages cross.
    Transferring,
    /// Every stale page is at the standby.
    Done,
    /// The evacuation failed ([`Status::error`] says why).
    Failed,
}

impl EvacState {
    /// Done or failed: nothing more will happen.
    pub fn is_final(self) -> bool {
        matches!(self, EvacState::Done | EvacState::Failed)
    }
}

/// A VM as its source sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub vm_id: String,
    pub memory_bytes: u64,
    /// Bytes not acknowledged by the standby now (the last replication round's count;
    /// frozen when the evacuation starts).
    pub stale_bytes: u64,
    /// How fast the guest makes clean bytes stale, bits per second (an estimate over the
    /// last seconds).
    pub dirty_rate_bps: u64,
    /// How fast the stale bytes grow while replication runs: the dirty rate less what
    /// replication acknowledges, bits per second, never negative (`None` from a source
    /// that does not measure it). While a VM waits for its evacuation its replication
    /// keeps running, so this is how its stale bytes grow meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_growth_bps: Option<u64>,
    pub replication: ReplState,
    pub evacuation: EvacState,
    /// UDP bytes the evacuation sent so far.
    pub bytes_sent: u64,
    /// Stale pages left to send: an estimate from the stale set and the stream bytes sent
    /// (`None` before the evacuation).
    pub pages_remaining: Option<u64>,
    /// How long before this status was sent `bytes_sent` and `pages_remaining` were
    /// measured, milliseconds (`None` from a source that does not say). A source measures
    /// its progress every 100 ms (every 10 ms once its push has written its last page) and
    /// reports every [`EVENT_INTERVAL_MS`] (and at once when no page is left), so without
    /// this an orchestrator extrapolating a transfer's end is up to 100 ms late.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_age_ms: Option<u64>,
    /// When `bytes_sent` and `pages_remaining` were measured, on the source's clock: what
    /// `progress_age_ms` is computed from as the status is sent. Never on the wire.
    #[serde(skip)]
    pub progress_measured: Option<std::time::Instant>,
    /// Pages that crossed, when the evacuation is done.
    pub pages_stale: Option<u64>,
    /// Why the evacuation failed.
    pub error: Option<String>,
    /// Pages the evacuation's push handed to its stream so far, and their bytes as the
    /// encoding made them (past the frame headers): together, what the encoding makes of a
    /// page ([`Status::wire_ratio`]). `None` from a source that does not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages_pushed: Option<u64>,
    /// See `pages_pushed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wire_bytes_pushed: Option<u64>,
    /// Before the push: pages its source sampled (those the guest rewrote, or those it
    /// will plant) and what the push's encoding would make of them (see
    /// `transport::encoding::WireSample`), its estimate of the wire ratio
    /// ([`Status::estimated_wire_ratio`]). `None` from a source that does not sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages_sampled: Option<u64>,
    /// See `pages_sampled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wire_bytes_sampled: Option<u64>,
    /// The bytes of its disks, whose blocks `stale_bytes` counts beside memory's pages
    /// (`None` from a source without disks, or one that does not say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
    /// The evacuation's own rate limit (`--evacuate-max-rate`), bits per second: the most
    /// an orchestrator's limit lets it send, and what a lifted hold goes back to (`None`:
    /// it has none, or it is a source before 2026-12-07, whose holds lift to no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub own_rate_cap_bps: Option<u64>,
}

/// An orchestrator's limit `cap` (`None`: unheld) as an evacuation with its own limit `own`
/// (`--evacuate-max-rate`, an operator's share of the source's NIC; `None`: none) takes it:
/// never above the own limit, and unheld means that one. Sources apply it to every
/// `SetRate` and `Evacuate` cap (since 2026-12-08); orchestrators send it too, for sources
/// before that, whose `null` lifted the own limit as well.
///
/// A cap of 0 is no cap, as `transport::quic::RateLimit` takes it: it too gets the own limit.
pub fn within_own(cap: Option<u64>, own: Option<u64>) -> Option<u64> {
    let cap = cap.filter(|&c| c > 0);
    match (cap, own) {
        (Some(cap), Some(own)) => Some(cap.min(own)),
        (cap, None) => cap,
        (None, own) => own,
    }
}

/// Bytes of a page in these messages' page counts: a guest page.
pub const PAGE_BYTES: u64 = 4096;

pub use crate::model::WIRE_RATIO_RANGE;
use crate::model::{Vm, MAX_BYTES};

/// The most a status's `progress_age_ms` is believed: a source's figures are at most one
/// [`EVENT_INTERVAL_MS`] old when it reports, so a larger age is a fault, not a fact.
pub const MAX_PROGRESS_AGE_MS: u64 = 1000;

impl Status {
    /// This status as sent now: `progress_age_ms` from when its progress was measured.
    pub fn stamped(mut self) -> Status {
        self.progress_age_ms = self
            .progress_measured
            .map(|t| t.elapsed().as_millis() as u64);
        self
    }

    /// The evacuation's own rate limit, if it has one (a figure of 0 is none, as
    /// `RateLimit` takes it).
    pub fn own_rate_cap(&self) -> Option<u64> {
        self.own_rate_cap_bps.filter(|&b| b > 0)
    }

    /// What the evacuation's encoding made of a page so far: its bytes on the wire per
    /// byte of guest page, about 1 with `--encoding off`, less with compression,
    /// references into the replica and zero runs; clamped to [`WIRE_RATIO_RANGE`]. `None`
    /// before the push handed out a page, or from a source that does not say.
    pub fn wire_ratio(&self) -> Option<f64> {
        ratio_of(self.pages_pushed, self.wire_bytes_pushed)
    }

    /// What the evacuation's encoding would make of a page, estimated by its source before
    /// the push from a sample of the pages that will be stale (`pages_sampled`), clamped like
    /// [`Status::wire_ratio`]; `None` without a sample.
    pub fn estimated_wire_ratio(&self) -> Option<f64> {
        ratio_of(self.pages_sampled, self.wire_bytes_sampled)
    }

    /// The wire ratio to plan with: measured once the push handed out pages, estimated
    /// before.
    pub fn planning_wire_ratio(&self) -> Option<f64> {
        self.wire_ratio().or_else(|| self.estimated_wire_ratio())
    }

    /// How long before it was received its progress was measured, seconds: its
    /// `progress_age_ms` (0 if absent), at most [`MAX_PROGRESS_AGE_MS`].
    pub fn progress_age_s(&self) -> f64 {
        self.progress_age_ms.unwrap_or(0).min(MAX_PROGRESS_AGE_MS) as f64 / 1000.0
    }

    /// `vm` as this status, its source's, measures it, over what the plan file says:
    /// what `faultline evacuate` and `faultline plan --live` plan with. The figures come
    /// from the network: sizes are kept within what a plan file may say (`MAX_BYTES`),
    /// stale bytes and the working set within the VM, a wire ratio within its range.
    pub fn apply_to(&self, vm: &mut Vm) {
        let cap = |b: u64| b.min(MAX_BYTES);
        vm.memory_bytes = vm.memory_bytes.max(cap(self.memory_bytes));
        vm.disk_bytes = vm.disk_bytes.max(cap(self.disk_bytes.unwrap_or(0)));
        vm.stale_bytes = self.stale_bytes.min(vm.total_bytes());
        // Replication keeps running while a VM waits for its evacuation: its stale bytes
        // grow by the net growth its source measures, not by the whole dirty rate.
        vm.dirty_rate_bps = self.stale_growth_bps.unwrap_or(self.dirty_rate_bps);
        vm.working_set_bytes = vm.working_set_bytes.min(vm.total_bytes());
        // Its source sees what its pages compress to; the file can only guess.
        if let Some(r) = self.planning_wire_ratio() {
            vm.wire_ratio = r;
        }
        // Its own limit bounds every limit the orchestrator sends it, so its flow runs at
        // most at that.
        if let Some(own) = self.own_rate_cap() {
            vm.max_rate_bps = Some(vm.max_rate_bps.map_or(own, |m| m.min(own)));
        }
    }
}

/// `bytes` per byte of `pages` pages, clamped to [`WIRE_RATIO_RANGE`].
fn ratio_of(pages: Option<u64>, bytes: Option<u64>) -> Option<f64> {
    let pages = pages.filter(|&p| p > 0)?;
    let ratio = bytes? as f64 / (pages as f64 * PAGE_BYTES as f64);
    Some(ratio.clamp(*WIRE_RATIO_RANGE.start(), *WIRE_RATIO_RANGE.end()))
}

/// Why a frame was refused.
#[derive(Debug, Error)]
pub enum ControlError {
    /// The length prefix announces more than [`MAX_FRAME`].
    #[error("a control frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLong { len: u64, max: usize },
    /// The buffer ended inside a frame.
    #[error("the control frame is cut short: {have} of {need} bytes")]
    Truncated { have: usize, need: usize },
    /// The body is not one of the protocol's messages.
    #[error("malformed control message")]
    Malformed(#[source] serde_json::Error),
    /// A message could not be encoded (it does not happen for these types).
    #[error("cannot encode a control message")]
    Encode(#[source] serde_json::Error),
}

/// One frame: the length prefix and the JSON body of `msg`.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ControlError> {
    let body = serde_json::to_vec(msg).map_err(ControlError::Encode)?;
    if body.len() > MAX_FRAME {
        return Err(ControlError::TooLong {
            len: body.len() as u64,
            max: MAX_FRAME,
        });
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// The body length a frame's 4-byte prefix announces, checked against [`MAX_FRAME`].
pub fn body_len(prefix: [u8; 4]) -> Result<usize, ControlError> {
    let len = u32::from_be_bytes(prefix);
    if len as usize > MAX_FRAME {
        return Err(ControlError::TooLong {
            len: u64::from(len),
            max: MAX_FRAME,
        });
    }
    Ok(len as usize)
}

/// A message from a frame's body.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ControlError> {
    serde_json::from_slice(body).map_err(ControlError::Malformed)
}

/// The first frame of `buf`: the message and the bytes it took. A buffer holding less than
/// a whole frame is [`ControlError::Truncated`] (a stream reader waits for more instead).
pub fn decode<T: DeserializeOwned>(buf: &[u8]) -> Result<(T, usize), ControlError> {
    let Some(prefix) = buf.get(..4) else {
        return Err(ControlError::Truncated {
            have: buf.len(),
            need: 4,
        });
    };
    let mut p = [0u8; 4];
    p.copy_from_slice(prefix);
    let len = body_len(p)?;
    let Some(body) = buf.get(4..4 + len) else {
        return Err(ControlError::Truncated {
            have: buf.len(),
            need: 4 + len,
        });
    };
    Ok((decode_body(body)?, 4 + len))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_limit_is_never_above_the_sources_own_and_unheld_is_its_own() {
        assert_eq!(within_own(Some(5), Some(10)), Some(5));
        assert_eq!(within_own(Some(20), Some(10)), Some(10));
        assert_eq!(within_own(None, Some(10)), Some(10));
        assert_eq!(within_own(Some(20), None), Some(20));
        assert_eq!(within_own(None, None), None);
        // 0, which a rate limit takes as none, is no way around the own limit.
        assert_eq!(within_own(Some(0), Some(10)), Some(10));
        assert_eq!(within_own(Some(0), None), None);
    }

    /// A source's status: a 64 MiB VM waiting, replicating.
    pub(crate) fn status() -> Status {
        Status {
            vm_id: "web-1".into(),
            memory_bytes: 64 << 20,
            stale_bytes: 4096 * 10,
            dirty_rate_bps: 8_000_000,
            stale_growth_bps: Some(1_000_000),
            replication: ReplState::Running,
            evacuation: EvacState::Idle,
            bytes_sent: 0,
            pages_remaining: None,
            progress_age_ms: None,
            progress_measured: None,
            pages_stale: None,
            error: None,
            pages_pushed: None,
            wire_bytes_pushed: None,
            pages_sampled: None,
            wire_bytes_sampled: None,
            disk_bytes: None,
            own_rate_cap_bps: None,
        }
    }

    #[test]
    fn free_text_is_clipped_and_its_control_characters_shown() {
        assert_eq!(clean_text("disk full"), "disk full");
        assert_eq!(clean_text("a\x1b[2Jb\nc"), "a\\u{1b}[2Jb\\u{a}c");
        let long = "é".repeat(MAX_TEXT_CHARS + 10);
        let cut = clean_text(&long);
        assert_eq!(cut.chars().count(), MAX_TEXT_CHARS);
        assert!(cut.ends_with('…'));
        assert_eq!(clean_text(&cut), cut, "cleaned once");
        let exact = "é".repeat(MAX_TEXT_CHARS);
        assert_eq!(clean_text(&exact), exact, "not cut");
        let escaped = clean_text(&"\u{7}".repeat(MAX_TEXT_CHARS));
        assert_eq!(escaped.chars().count(), MAX_TEXT_CHARS);
        assert_eq!(clean_text(&escaped), escaped, "cleaned once");
        // A status with the longest reason, escaped as JSON, still fits a frame.
        let s = Status {
            error: Some(clean_text(&"\u{1}".repeat(10 * MAX_TEXT_CHARS))),
            ..status()
        };
        assert!(encode(&Reply::Event(s)).is_ok());
    }

    #[test]
    fn a_sources_own_rate_limit_bounds_its_vms_flow_in_the_plan() {
        let planned = |plan_max: Option<u64>, own: Option<u64>| {
            let mut v = Vm::idle("vm1", 0, 1 << 20);
            v.max_rate_bps = plan_max;
            Status {
                own_rate_cap_bps: own,
                ..status()
            }
            .apply_to(&mut v);
            v.max_rate_bps
        };
        assert_eq!(planned(Some(20), Some(10)), Some(10));
        assert_eq!(planned(None, Some(10)), Some(10));
        assert_eq!(planned(Some(5), Some(10)), Some(5));
        assert_eq!(planned(Some(5), None), Some(5));
        // A figure of 0 is no limit, as the source takes it.
        assert_eq!(planned(None, Some(0)), None);
    }

    #[test]
    fn a_sources_figures_stay_within_what_a_plan_file_could_say() {
        let mut v = Vm::idle("vm1", 0, 1 << 20);
        Status {
            memory_bytes: u64::MAX,
            disk_bytes: Some(u64::MAX),
            stale_bytes: u64::MAX,
            stale_growth_bps: None,
            dirty_rate_bps: 5,
            ..status()
        }
        .apply_to(&mut v);
        assert_eq!(v.memory_bytes, MAX_BYTES);
        assert_eq!(v.disk_bytes, MAX_BYTES);
        assert_eq!(v.stale_bytes, v.total_bytes());
        assert_eq!(v.dirty_rate_bps, 5);
    }

    #[test]
    fn what_the_encoding_makes_of_a_page_is_counted_from_the_push() {
        let ratio = |pushed: Option<(u64, u64)>| {
            Status {
                pages_pushed: pushed.map(|p| p.0),
                wire_bytes_pushed: pushed.map(|p| p.1),
                ..status()
            }
            .wire_ratio()
        };
        assert_eq!(ratio(None), None);
        // Nothing pushed yet: no ratio.
        assert_eq!(ratio(Some((0, 0))), None);
        // Four pages in a page's bytes.
        assert_eq!(ratio(Some((4, 4096))), Some(0.25));
        // What no encoding makes of a page is not believed: clamped to its range.
        assert_eq!(ratio(Some((4, 0))), Some(1.0 / 4096.0));
        assert_eq!(ratio(Some((1, 7 * 4096))), Some(1.1));
        assert_eq!(ratio(Some((u64::MAX, u64::MAX))), Some(1.0 / 4096.0));
        // The counts cross the wire.
        let s = Status {
            pages_pushed: Some(9),
            wire_bytes_pushed: Some(12_345),
            ..status()
        };
        let f = encode(&Reply::Event(s.clone())).unwrap();
        assert_eq!(decode::<Reply>(&f).unwrap().0, Reply::Event(s));
    }

    #[test]
    fn the_sampled_ratio_plans_a_vm_until_its_push_measures_one() {
        let s = Status {
            pages_sampled: Some(64),
            wire_bytes_sampled: Some(64 * 1024),
            ..status()
        };
        assert_eq!(s.estimated_wire_ratio(), Some(0.25));
        assert_eq!(s.planning_wire_ratio(), Some(0.25));
        let pushed = Status {
            pages_pushed: Some(10),
            wire_bytes_pushed: Some(10 * 2048),
            ..s.clone()
        };
        assert_eq!(pushed.planning_wire_ratio(), Some(0.5));
        // A sample of nothing, or absurd, is no estimate / clamped.
        let none = Status {
            pages_sampled: Some(0),
            ..s.clone()
        };
        assert_eq!(none.planning_wire_ratio(), None);
        let absurd = Status {
            wire_bytes_sampled: Some(u64::MAX),
            ..s.clone()
        };
        assert_eq!(absurd.estimated_wire_ratio(), Some(1.1));
        let s = Status {
            disk_bytes: Some(8 << 30),
            ..s
        };
        let f = encode(&Reply::Event(s.clone())).unwrap();
        assert_eq!(decode::<Reply>(&f).unwrap().0, Reply::Event(s));
    }

    #[test]
    fn a_newer_peers_fields_are_ignored_and_an_older_peers_missing_ones_are_none() {
        let frame = |v: serde_json::Value| {
            let body = v.to_string();
            [&(body.len() as u32).to_be_bytes()[..], body.as_bytes()].concat()
        };
        // A newer source's status carries a field this release does not know.
        let mut v = serde_json::to_value(Reply::Event(status())).unwrap();
        v["cpu_share"] = serde_json::json!(0.5);
        assert_eq!(
            decode::<Reply>(&frame(v.clone())).unwrap().0,
            Reply::Event(status())
        );
        // An older source's has none of the optional fields.
        for key in [
            "stale_growth_bps",
            "progress_age_ms",
            "pages_stale",
            "error",
        ] {
            v.as_object_mut().unwrap().remove(key);
        }
        let mut older = status();
        older.stale_growth_bps = None;
        assert_eq!(decode::<Reply>(&frame(v)).unwrap().0, Reply::Event(older));
        // A newer orchestrator's request.
        let req = serde_json::json!({"type": "evacuate", "rate_cap_bps": 5, "priority": 1});
        assert_eq!(
            decode::<Request>(&frame(req)).unwrap().0,
            Request::Evacuate {
                rate_cap_bps: Some(5)
            }
        );
        // An older orchestrator's rate limit has no place among the connection's.
        let req = serde_json::json!({"type": "set_rate", "rate_cap_bps": 5});
        assert_eq!(
            decode::<Request>(&frame(req)).unwrap().0,
            Request::SetRate {
                rate_cap_bps: Some(5),
                seq: None
            }
        );
        let wire = String::from_utf8(
            encode(&Request::SetRate {
                rate_cap_bps: None,
                seq: None,
            })
            .unwrap()[4..]
                .to_vec(),
        )
        .unwrap();
        assert!(!wire.contains("seq"), "{wire}");
    }

    #[test]
    fn a_status_says_how_old_its_progress_is_and_keeps_its_instant_off_the_wire() {
        let measured = std::time::Instant::now() - std::time::Duration::from_millis(80);
        let s = Status {
            evacuation: EvacState::Transferring,
            progress_measured: Some(measured),
            ..status()
        }
        .stamped();
        let age = s.progress_age_ms.unwrap();
        assert!((80..1000).contains(&age), "{age}");
        let f = encode(&Reply::Event(s.clone())).unwrap();
        let (Reply::Event(back), _) = decode::<Reply>(&f).unwrap() else {
            panic!("not an event");
        };
        assert_eq!(back.progress_age_ms, Some(age));
        assert_eq!(back.progress_measured, None);
        assert!((back.progress_age_s() - age as f64 / 1000.0).abs() < 1e-9);
        // Nothing measured: no age; an absurd age counts as the most believed.
        assert_eq!(status().stamped().progress_age_ms, None);
        assert_eq!(status().progress_age_s(), 0.0);
        let absurd = Status {
            progress_age_ms: Some(u64::MAX),
            ..status()
        };
        assert_eq!(absurd.progress_age_s(), MAX_PROGRESS_AGE_MS as f64 / 1000.0);
    }

    #[test]
    fn every_message_round_trips() {
        let reqs = [
            Request::Status,
            Request::Evacuate { rate_cap_bps: None },
            Request::Evacuate {
                rate_cap_bps: Some(100_000_000),
            },
            Request::SetRate {
                rate_cap_bps: Some(40_000_000),
                seq: Some(3),
            },
            Request::SetRate {
                rate_cap_bps: None,
                seq: None,
            },
        ];
        for r in reqs {
            let f = encode(&r).unwrap();
            assert_eq!(decode::<Request>(&f).unwrap(), (r, f.len()));
        }
        let failed = Status {
            evacuation: EvacState::Failed,
            error: Some("the standby refused".into()),
            ..status()
        };
        let replies = [
            Reply::Status(status()),
            Reply::Accepted {
                rate_cap_honoured: false,
            },
            Reply::Refused {
                reason: "done already".into(),
            },
            Reply::Event(failed),
            Reply::RateSet {
                rate_cap_bps: Some(40_000_000),
                seq: Some(3),
            },
            Reply::RateSet {
                rate_cap_bps: None,
                seq: None,
            },
        ];
        for r in replies {
            let f = encode(&r).unwrap();
            assert_eq!(decode::<Reply>(&f).unwrap(), (r, f.len()));
        }
    }

    #[test]
    fn two_frames_in_a_row_decode_one_after_the_other() {
        let mut buf = encode(&Request::Status).unwrap();
        buf.extend(
            encode(&Request::Evacuate {
                rate_cap_bps: Some(5),
            })
            .unwrap(),
        );
        let (a, n) = decode::<Request>(&buf).unwrap();
        let (b, m) = decode::<Request>(&buf[n..]).unwrap();
        assert_eq!(a, Request::Status);
        assert_eq!(
            b,
            Request::Evacuate {
                rate_cap_bps: Some(5)
            }
        );
        assert_eq!(n + m, buf.len());
    }

    #[test]
    fn bad_frames_are_typed_errors() {
        let f = encode(&Request::Status).unwrap();
        assert!(matches!(
            decode::<Request>(&f[..2]),
            Err(ControlError::Truncated { have: 2, need: 4 })
        ));
        assert!(matches!(
            decode::<Request>(&f[..f.len() - 1]),
            Err(ControlError::Truncated { .. })
        ));
        let huge = [0xff, 0xff, 0xff, 0xff];
        let e = decode::<Request>(&huge).unwrap_err();
        assert!(matches!(e, ControlError::TooLong { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "a control frame of 4294967295 bytes exceeds the limit of 65536 bytes"
        );
        let junk = [&3u32.to_be_bytes()[..], b"{x}"].concat();
        assert!(matches!(
            decode::<Request>(&junk),
            Err(ControlError::Malformed(_))
        ));
        // A reply where a request belongs, an unknown type, a field of the wrong type.
        for body in [
            r#"{"type":"accepted","rate_cap_honoured":true}"#,
            r#"{"type":"reboot"}"#,
            r#"{"type":"evacuate","rate_cap_bps":1.5}"#,
            r#"{"type":"evacuate","rate_cap_bps":-1}"#,
            r#"{"type":"set_rate","rate_cap_bps":"fast"}"#,
            r#"{"type":"rate_set","rate_cap_bps":1}"#,
        ] {
            let f = [&(body.len() as u32).to_be_bytes()[..], body.as_bytes()].concat();
            assert!(
                matches!(decode::<Request>(&f), Err(ControlError::Malformed(_))),
                "{body}"
            );
        }
        // The Display leaves the JSON error to the chain.
        let e = decode::<Request>(&junk).unwrap_err();
        assert_eq!(e.to_string(), "malformed control message");
        assert!(std::error::Error::source(&e).is_some());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<Request>(&bytes);
            let _ = decode::<Reply>(&bytes);
        }

        #[test]
        fn random_bodies_never_panic(body in "\\PC{0,200}") {
            let f = [&(body.len() as u32).to_be_bytes()[..], body.as_bytes()].concat();
            let _ = decode::<Reply>(&f);
        }
    }
}
