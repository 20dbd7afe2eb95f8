//! What the reference VMM sends across switchover besides memory: the vCPU snapshot plus
//! the wall-clock moment the source finished pausing (so the destination can report
//! downtime against its own clock; both ends must share a clock, as two processes on one
//! machine do, or NTP-synchronised hosts to within its error) and which vCPUs paused
//! cleanly at a progress report.
//!
//! Byte form: `MAGIC (8) | version u32 LE | paused_at unix ns u64 LE | vCPU count u32 LE |
//! one byte per vCPU (1: paused at a report) | VmSnapshot blob`. Decoding never panics;
//! the embedded snapshot carries its own version and checksum.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::error::StateError;
use super::VmSnapshot;

pub const SWITCHOVER_MAGIC: [u8; 8] = *b"FLTSWOV\0";
pub const SWITCHOVER_VERSION: u32 = 1;
const FIXED: usize = 8 + 4 + 8 + 4;

/// The reference VMM's state blob for `send_with_state` / `receive_vm`.
#[derive(Clone, Debug)]
pub struct Switchover {
    /// When the source's last vCPU stopped (wall clock).
    pub paused_at: SystemTime,
    /// Per vCPU: paused right after a progress report (see `Vm::pause_at_report`).
    pub paused_at_report: Vec<bool>,
    pub snapshot: VmSnapshot,
}

impl Switchover {
    pub fn encode(&self) -> Vec<u8> {
        let ns = self
            .paused_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let snap = self.snapshot.as_bytes();
        let mut out = Vec::with_capacity(FIXED + self.paused_at_report.len() + snap.len());
        out.extend_from_slice(&SWITCHOVER_MAGIC);
        out.extend_from_slice(&SWITCHOVER_VERSION.to_le_bytes());
        out.extend_from_slice(&ns.to_le_bytes());
        out.extend_from_slice(&(self.paused_at_report.len() as u32).to_le_bytes());
        out.extend(self.paused_at_report.iter().map(|&b| u8::from(b)));
        out.extend_from_slice(snap);
        out
    }

    pub fn decode(blob: &[u8]) -> Result<Switchover, StateError> {
        if blob.len() < FIXED {
            return Err(StateError::TruncatedHeader {
                len: blob.len(),
                needed: FIXED,
            });
        }
        if blob[..8] != SWITCHOVER_MAGIC {
            return Err(StateError::BadMagic);
        }
        let u32_at =
            |i: usize| u32::from_le_bytes([blob[i], blob[i + 1], blob[i + 2], blob[i + 3]]);
        let version = u32_at(8);
        if version != SWITCHOVER_VERSION {
            return Err(StateError::Version {
                found: version,
                expected: SWITCHOVER_VERSION,
            });
        }
        let mut ns = [0u8; 8];
        ns.copy_from_slice(&blob[12..20]);
        let ns = u64::from_le_bytes(ns);
        let n = u32_at(20) as usize;
        let flags =
            blob.get(FIXED..FIXED.saturating_add(n))
                .ok_or(StateError::TruncatedPayload {
                    expected: n as u64,
                    found: (blob.len() - FIXED) as u64,
                })?;
        let snapshot = VmSnapshot::from_bytes(blob[FIXED + n..].to_vec())?;
        if snapshot.state().vcpus.len() != n {
            return Err(StateError::Malformed(format!(
                "{n} pause flags for {} vCPUs",
                snapshot.state().vcpus.len()
            )));
        }
        Ok(Switchover {
            paused_at: UNIX_EPOCH + Duration::from_nanos(ns),
            paused_at_report: flags.iter().map(|&b| b != 0).collect(),
            snapshot,
        })
    }
}

/// An `Instant` of this process as wall-clock time (for comparison with another process).
pub fn wall_clock(t: std::time::Instant) -> SystemTime {
    SystemTime::now()
        .checked_sub(t.elapsed())
        .unwrap_or(UNIX_EPOCH)
}

/// Milliseconds from `a` to `b` (negative if `b` is earlier).
pub fn ms_between(a: SystemTime, b: SystemTime) -> f64 {
    match b.duration_since(a) {
        Ok(d) => d.as_secs_f64() * 1e3,
        Err(e) => -e.duration().as_secs_f64() * 1e3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_and_truncation_are_typed_errors() {
        assert!(matches!(
            Switchover::decode(b"short"),
            Err(StateError::TruncatedHeader { .. })
        ));
        let mut b = vec![0u8; 64];
        assert_eq!(Switchover::decode(&b).unwrap_err(), StateError::BadMagic);
        b[..8].copy_from_slice(&SWITCHOVER_MAGIC);
        b[8] = 9;
        assert!(matches!(
            Switchover::decode(&b),
            Err(StateError::Version { found: 9, .. })
        ));
        b[8] = 1;
        b[20..24].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(
            Switchover::decode(&b),
            Err(StateError::TruncatedPayload { .. })
        ));
        b[20..24].copy_from_slice(&1u32.to_le_bytes());
        assert!(Switchover::decode(&b).is_err()); // the embedded snapshot is garbage
    }
}
