//! What the destination driver reports of a session.

use serde::Serialize;

use crate::message::SessionKind;

/// What the destination driver measured of one session.
///
/// Serialized, it is what every destination role prints of its session: a role's report
/// (vmm-shim's `DestReport` and `StandbyReport`) embeds it with `#[serde(flatten)]`
/// rather than copying it. The fields marked as not serialized are for the role to use
/// (or to print under its own names).
#[derive(Clone, Debug, Default, Serialize)]
pub struct DestReport {
    /// The VM id the source announced.
    pub vm_id: String,
    /// From the start of the session to every page present: from then on the guest no
    /// longer depends on the source. (A replication session: to its end.)
    pub total_ms: u64,
    /// From the start of the session to its orderly end, after the source acknowledged
    /// completion: `total_ms` plus about one round trip.
    pub closed_ms: u64,
    /// UDP bytes both ways, as counted by this side's QUIC stack.
    pub wire_bytes: u64,
    /// Bulk bytes read before the session ran, rounded up to KiB per message: the source's
    /// push beside the handshake, and what arrived while the destination prepared (a
    /// standby punching its holes), which would otherwise have stalled flow control.
    pub early_push_bytes: u64,
    /// What link outages did (docs/recovery.md).
    #[serde(flatten)]
    pub outages: crate::quic::Outages,
    /// The kind of session the source asked for. Not serialized.
    #[serde(skip)]
    pub kind: Option<SessionKind>,
    /// From the start of the session to the moment the guest could resume. Not serialized:
    /// a role measures its own resume time around its hook.
    #[serde(skip)]
    pub established_ms: u64,
    /// Evacuation: pages that had to cross (the stale set). Not serialized.
    #[serde(skip)]
    pub pages_stale: u64,
    /// Replication: pages stored in the replica. Not serialized: a standby sums them over
    /// its sessions.
    #[serde(skip)]
    pub pages_replicated: u64,
    /// Pages received from the source at least once. Not serialized.
    #[serde(skip)]
    pub pages_received: u64,
    /// How page data arrived. Not serialized: a plain destination prints it, a standby
    /// does not.
    #[serde(skip)]
    pub decoded: DecodeStats,
    /// When every page was present (ms since the start), once known.
    #[serde(skip)]
    present_at: Option<u64>,
}

impl DestReport {
    /// Every page was present `ms` after the start.
    pub(super) fn present_at(&mut self, ms: u64) {
        self.present_at = Some(ms);
    }

    /// The session closed `ms` after the start; a session that never saw every page
    /// present (replication) took until then.
    pub(super) fn closed(&mut self, ms: u64) {
        self.closed_ms = ms;
        self.total_ms = self.present_at.unwrap_or(ms);
    }
}

/// How the destination's page data arrived.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DecodeStats {
    /// Pages that arrived lz4-compressed.
    pub pages_lz4: u64,
    /// Pages that arrived as content references.
    pub pages_ref: u64,
    /// References that failed verification here (the content they named had changed or was
    /// gone) and were fetched again on demand.
    pub refs_refetched: u64,
}
