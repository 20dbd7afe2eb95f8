//! The source's bookkeeping of what the standby holds: a version per page, the version the
//! standby acknowledged, and the version in flight.
//!
//! A page is **fresh** at the standby only when the standby acknowledged the version the
//! source holds now; everything else is **stale**. Versions are born when a harvest of the
//! dirty tracker reports the page written, and page contents are read for sending only after
//! that harvest, so a write that lands after the read is reported by a later harvest and makes
//! the page stale again. That is why a page dirtied while its replication is in flight stays
//! stale, and why the stale set at switchover (after a final harvest with the guest paused)
//! never misses a page whose standby copy differs from the source.

use transport::bitmap::Bitmap;

/// Per-page versions on the source side of replication.
#[derive(Clone, Debug)]
pub struct Ledger {
    version: Vec<u64>,
    acked: Vec<u64>,
    sent: Vec<u64>,
    cursor: usize,
    /// Pages that were in flight at their current version when a connection was lost:
    /// sending one again counts as a resend.
    lost_in_flight: Bitmap,
    pages_resent: u64,
}

impl Ledger {
    /// Every page starts at version 1, unacknowledged: the standby has nothing yet.
    pub fn new(pages: u64) -> Ledger {
        let n = pages as usize;
        Ledger {
            version: vec![1; n],
            acked: vec![0; n],
            sent: vec![0; n],
            cursor: 0,
            lost_in_flight: Bitmap::new(pages),
            pages_resent: 0,
        }
    }

    /// Pages tracked, fixed at [`Ledger::new`].
    pub fn pages(&self) -> u64 {
        self.version.len() as u64
    }

    /// A harvest reported these pages written: each gets a new version.
    pub fn mark_dirty(&mut self, pages: &[u64]) {
        for &p in pages {
            if let Some(v) = self.version.get_mut(p as usize) {
                *v += 1;
                // A new version is news, not a resend.
                self.lost_in_flight.clear(p);
            }
        }
    }

    /// The standby cannot serve these pages (never stored, torn, other epoch).
    pub fn invalidate(&mut self, invalid: &Bitmap) {
        for p in invalid.iter_ones() {
            if let (Some(a), Some(s)) = (
                self.acked.get_mut(p as usize),
                self.sent.get_mut(p as usize),
            ) {
                *a = 0;
                *s = 0;
            }
        }
    }

    /// The connection to the standby was lost: whatever was in flight may never arrive.
    /// Pages in flight at their current version count as resent when sent again.
    pub fn forget_in_flight(&mut self) {
        for (p, ((s, a), v)) in self
            .sent
            .iter()
            .zip(&self.acked)
            .zip(&self.version)
            .enumerate()
        {
            if s != a && s == v {
                self.lost_in_flight.set(p as u64);
            }
        }
        self.sent.copy_from_slice(&self.acked);
    }

    /// Pages sent again at the version they were in flight at when a connection was lost
    /// (see [`Ledger::forget_in_flight`]).
    pub fn pages_resent(&self) -> u64 {
        self.pages_resent
    }

    /// The standby stored `page` at `version`.
    pub fn ack(&mut self, page: u64, version: u64) {
        if let Some(a) = self.acked.get_mut(page as usize) {
            *a = (*a).max(version);
        }
    }

    /// Whether the standby acknowledged `page` at its current version (false for a page
    /// outside the ledger).
    pub fn is_fresh(&self, page: u64) -> bool {
        let p = page as usize;
        p < self.version.len() && self.acked[p] == self.version[p]
    }

    /// Whether the standby acknowledged some version of `page` (false for a page outside
    /// the ledger, and again after [`Ledger::invalidate`]): sending it now is then sending
    /// what the guest wrote since, not its first copy.
    pub fn was_acked(&self, page: u64) -> bool {
        self.acked.get(page as usize).is_some_and(|&a| a > 0)
    }

    /// The current version of `page`: 1 plus the harvests that reported it written; 0 for a
    /// page outside the ledger.
    pub fn version(&self, page: u64) -> u64 {
        self.version.get(page as usize).copied().unwrap_or(0)
    }

    /// Stale pages not yet sent at their current version, in address order from where the
    /// last batch ended, as runs of consecutive pages: at most `max_pages` in all. Each page
    /// returned is recorded as sent at its current version.
    pub fn next_batch(&mut self, max_pages: usize, runs: &mut Vec<(u64, Vec<u64>)>) {
        runs.clear();
        let n = self.version.len();
        if n == 0 {
            return;
        }
        let mut budget = max_pages;
        let mut scanned = 0;
        let mut p = self.cursor % n;
        while budget > 0 && scanned < n {
            let wanted = self.sent[p] != self.version[p] && self.acked[p] != self.version[p];
            if wanted {
                self.sent[p] = self.version[p];
                if self.lost_in_flight.clear(p as u64) {
                    self.pages_resent += 1;
                }
                match runs.last_mut() {
                    Some((first, versions)) if *first + versions.len() as u64 == p as u64 => {
                        versions.push(self.version[p])
                    }
                    _ => runs.push((p as u64, vec![self.version[p]])),
                }
                budget -= 1;
            }
            scanned += 1;
            // Runs never wrap: at page 0 the run check above starts a new one.
            p = (p + 1) % n;
        }
        self.cursor = p;
    }

    /// Pages whose current version the standby has not acknowledged.
    pub fn stale_set(&self) -> Bitmap {
        let mut b = Bitmap::new(self.pages());
        for (p, (v, a)) in self.version.iter().zip(&self.acked).enumerate() {
            if v != a {
                b.set(p as u64);
            }
        }
        b
    }

    /// Stale pages not yet sent at their current version: the replicator's backlog.
    pub fn unsent_count(&self) -> u64 {
        self.version
            .iter()
            .zip(self.acked.iter().zip(&self.sent))
            .filter(|(v, (a, s))| *a != *v && *s != *v)
            .count() as u64
    }

    /// Pages whose current version the standby has not acknowledged (the size of
    /// [`Ledger::stale_set`]).
    pub fn stale_count(&self) -> u64 {
        self.version
            .iter()
            .zip(&self.acked)
            .filter(|(v, a)| v != a)
            .count() as u64
    }
}

#[cfg(test)]
#[path = "ledger_tests.rs"]
mod tests;
