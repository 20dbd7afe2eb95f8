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
    /// Pages stale and not sent at their current version: [`Ledger::next_batch`]'s
    /// candidates, their count the backlog.
    wanted: Bitmap,
    /// Pages whose current version the standby has not acknowledged.
    stale: u64,
}

// `wanted` and `stale` follow each page as it changes, so a replicator's round (a batch, the
// backlog, the stale count) costs what changed, not the guest's size: scanning the three
// version arrays every 20 ms round cost a 1 GiB guest's replicator about 0.6 ms a round (3%
// of a core, as much as its harvests' walks) with almost nothing written (docs/fleet.md).

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
            wanted: Bitmap::new(pages).complement(),
            stale: pages,
        }
    }

    /// Whether `p` is stale, and whether it is wanted (stale and not sent at its current
    /// version).
    fn state(&self, p: usize) -> (bool, bool) {
        let (v, a, s) = (self.version[p], self.acked[p], self.sent[p]);
        (a != v, a != v && s != v)
    }

    /// Brings `wanted` and `stale` up to date with page `p`, which was in state `before`.
    fn account(&mut self, p: usize, before: (bool, bool)) {
        let after = self.state(p);
        if before.0 != after.0 {
            if after.0 {
                self.stale += 1;
            } else {
                self.stale -= 1;
            }
        }
        if after.1 {
            self.wanted.set(p as u64);
        } else {
            self.wanted.clear(p as u64);
        }
    }

    /// Rebuilds `wanted` and `stale` from the version arrays (after a change to every page).
    fn recount(&mut self) {
        self.wanted = Bitmap::new(self.pages());
        self.stale = 0;
        for p in 0..self.version.len() {
            let (stale, wanted) = self.state(p);
            self.stale += u64::from(stale);
            if wanted {
                self.wanted.set(p as u64);
            }
        }
    }

    /// Pages tracked, fixed at [`Ledger::new`].
    pub fn pages(&self) -> u64 {
        self.version.len() as u64
    }

    /// A harvest reported these pages written: each gets a new version.
    pub fn mark_dirty(&mut self, pages: &[u64]) {
        for &p in pages {
            let i = p as usize;
            if i < self.version.len() {
                let before = self.state(i);
                self.version[i] += 1;
                self.account(i, before);
                // A new version is news, not a resend.
                self.lost_in_flight.clear(p);
            }
        }
    }

    /// The standby cannot serve these pages (never stored, torn, other epoch).
    pub fn invalidate(&mut self, invalid: &Bitmap) {
        for p in invalid.iter_ones() {
            let i = p as usize;
            if i < self.version.len() {
                let before = self.state(i);
                self.acked[i] = 0;
                self.sent[i] = 0;
                self.account(i, before);
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
        self.recount();
    }

    /// Pages sent again at the version they were in flight at when a connection was lost
    /// (see [`Ledger::forget_in_flight`]).
    pub fn pages_resent(&self) -> u64 {
        self.pages_resent
    }

    /// The standby stored `page` at `version`.
    pub fn ack(&mut self, page: u64, version: u64) {
        let i = page as usize;
        if i < self.version.len() {
            let before = self.state(i);
            self.acked[i] = self.acked[i].max(version);
            self.account(i, before);
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
        let start = self.cursor % n;
        let mut budget = max_pages;
        // From `start` to the end, then from page 0 back to `start`: the wanted pages in
        // address order, found word by word in `wanted`.
        let mut from = start;
        let mut wrapped = false;
        while budget > 0 {
            let next = self.wanted.next_set(from as u64).map(|q| q as usize);
            let p = match next {
                Some(p) if !wrapped || p < start => p,
                _ if !wrapped && start > 0 => {
                    wrapped = true;
                    from = 0;
                    continue;
                }
                _ => break,
            };
            let before = self.state(p);
            self.sent[p] = self.version[p];
            self.account(p, before);
            if self.lost_in_flight.clear(p as u64) {
                self.pages_resent += 1;
            }
            match runs.last_mut() {
                // Runs never wrap: page 0 never follows the last page.
                Some((first, versions)) if *first + versions.len() as u64 == p as u64 => {
                    versions.push(self.version[p])
                }
                _ => runs.push((p as u64, vec![self.version[p]])),
            }
            budget -= 1;
            from = p + 1;
        }
        // Where the next batch begins: after the last page taken if the budget ran out,
        // else where this one began (it took everything).
        self.cursor = match runs.last() {
            Some((first, versions)) if budget == 0 => (*first as usize + versions.len()) % n,
            _ => start,
        };
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
        self.wanted.count_ones()
    }

    /// Pages whose current version the standby has not acknowledged (the size of
    /// [`Ledger::stale_set`]).
    pub fn stale_count(&self) -> u64 {
        self.stale
    }
}

#[cfg(test)]
#[path = "ledger_tests.rs"]
mod tests;
