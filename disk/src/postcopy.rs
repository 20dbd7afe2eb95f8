//! A disk served at a destination while its stale blocks are still on their way: fresh
//! units are read locally, a unit that is not here yet is fetched on demand (the guest's
//! request waits for it), and a unit the guest writes here is the guest's from then on.
//!
//! The unit is 4 KiB, the size the wire moves. Each unit is in one state:
//!
//! | state        | meaning                                   | a read      | an arrival |
//! | ------------ | ----------------------------------------- | ----------- | ---------- |
//! | `Absent`     | stale: the local copy must not be served  | requests it, waits | stored |
//! | `Requested`  | asked for, not here yet                   | waits       | stored     |
//! | `Installing` | an arrival is being written               | waits       | —          |
//! | `Writing`    | the guest is writing the whole unit       | waits       | discarded  |
//! | `Present`    | fresh, arrived, or written by the guest   | served      | discarded  |
//!
//! `Present` is final, so once a unit is present nothing but the guest writes it: a late
//! arrival (a push that crossed a guest write) is dropped, never written over the guest's
//! data. Transitions happen under the unit's stripe lock; the `Present` test on the read
//! path is a single atomic load (Acquire, paired with the Release store made after the
//! data was written).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use serde::Serialize;

use crate::device::{check_range, BlockDevice, DiskError};

/// The unit a postcopy disk tracks and the wire moves.
pub const UNIT: u64 = 4096;

const ABSENT: u8 = 0;
const REQUESTED: u8 = 1;
const INSTALLING: u8 = 2;
const WRITING: u8 = 3;
const PRESENT: u8 = 4;

const STRIPES: usize = 64;

/// Where a postcopy disk asks for units it does not have.
pub trait BlockFetcher: Send + Sync {
    /// Asks for `units` urgently. Must not block; the units arrive through
    /// [`PostcopyDisk::install`] (or the session fails, [`PostcopyDisk::fail`]).
    fn request(&self, units: &[u64]);
}

/// What a postcopy disk counted.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PostcopyStats {
    /// Units present at the start (fresh in the local replica).
    pub units_local: u64,
    /// Units that arrived after a read or a partial write asked for them.
    pub units_fetched: u64,
    /// Units that arrived without being asked for (the background push).
    pub units_pushed: u64,
    /// Units the guest wrote whole before they arrived: never fetched.
    pub units_owned: u64,
    /// Arrivals dropped because the unit was already present.
    pub arrivals_discarded: u64,
    /// Guest requests that asked for units or waited for them to arrive.
    pub reads_waited: u64,
    /// Those waits, in microseconds: median, 99th percentile and maximum.
    pub wait_us_p50: u64,
    /// See [`PostcopyStats::wait_us_p50`].
    pub wait_us_p99: u64,
    /// See [`PostcopyStats::wait_us_p50`].
    pub wait_us_max: u64,
}

struct Stripe {
    lock: Mutex<()>,
    cv: Condvar,
}

/// A disk image served while its stale units arrive (see the module docs).
pub struct PostcopyDisk<D> {
    file: D,
    state: Vec<AtomicU8>,
    stripes: Vec<Stripe>,
    fetcher: Arc<dyn BlockFetcher>,
    missing: AtomicU64,
    failed: AtomicBool,
    reason: Mutex<Option<String>>,
    units_local: u64,
    fetched: AtomicU64,
    pushed: AtomicU64,
    owned: AtomicU64,
    discarded: AtomicU64,
    waits: Mutex<Vec<u64>>,
}

impl<D: BlockDevice> PostcopyDisk<D> {
    /// Serves `file`, whose units for which `present(unit)` holds are fresh; every other
    /// unit is fetched through `fetcher` before it is served.
    pub fn new(
        file: D,
        present: impl Fn(u64) -> bool,
        fetcher: Arc<dyn BlockFetcher>,
    ) -> PostcopyDisk<D> {
        let units = file.size().div_ceil(UNIT);
        let state: Vec<AtomicU8> = (0..units)
            .map(|u| AtomicU8::new(if present(u) { PRESENT } else { ABSENT }))
            .collect();
        let local = state
            .iter()
            .filter(|s| s.load(Ordering::Relaxed) == PRESENT)
            .count() as u64;
        PostcopyDisk {
            file,
            state,
            stripes: (0..STRIPES)
                .map(|_| Stripe {
                    lock: Mutex::new(()),
                    cv: Condvar::new(),
                })
                .collect(),
            fetcher,
            missing: AtomicU64::new(units - local),
            failed: AtomicBool::new(false),
            reason: Mutex::new(None),
            units_local: local,
            fetched: AtomicU64::new(0),
            pushed: AtomicU64::new(0),
            owned: AtomicU64::new(0),
            discarded: AtomicU64::new(0),
            waits: Mutex::new(Vec::new()),
        }
    }

    /// Units in the disk.
    pub fn units(&self) -> u64 {
        self.state.len() as u64
    }

    /// Units not present yet.
    pub fn missing(&self) -> u64 {
        self.missing.load(Ordering::Acquire)
    }

    /// Whether every unit is present: the evacuation of this disk is over.
    pub fn is_complete(&self) -> bool {
        self.missing() == 0
    }

    /// Whether `unit` is present (false outside the disk).
    pub fn is_present(&self, unit: u64) -> bool {
        self.state
            .get(unit as usize)
            .is_some_and(|s| s.load(Ordering::Acquire) == PRESENT)
    }

    /// The disk underneath.
    pub fn file(&self) -> &D {
        &self.file
    }

    /// A unit arrived from the source with `data` (exactly [`UNIT`] bytes, or `None` for
    /// a unit of zeroes). Stored unless the unit is present already (a late arrival, or
    /// the guest wrote it here); returns whether it was stored.
    pub fn install(&self, unit: u64, data: Option<&[u8]>) -> Result<bool, DiskError> {
        let Some(st) = self.state.get(unit as usize) else {
            return Err(DiskError::OutOfRange {
                offset: unit.saturating_mul(UNIT),
                len: UNIT,
                size: self.file.size(),
            });
        };
        if data.is_some_and(|d| d.len() as u64 != UNIT) {
            return Err(DiskError::OutOfRange {
                offset: unit * UNIT,
                len: data.map_or(0, |d| d.len() as u64),
                size: self.file.size(),
            });
        }
        let was = {
            let _g = self.stripe(unit);
            let was = st.load(Ordering::Acquire);
            if was != ABSENT && was != REQUESTED {
                self.discarded.fetch_add(1, Ordering::Relaxed);
                return Ok(false);
            }
            st.store(INSTALLING, Ordering::Release);
            was
        };
        let offset = unit * UNIT;
        let len = UNIT.min(self.file.size() - offset);
        let r = match data {
            Some(d) => self.file.write_at(&d[..len as usize], offset, false),
            None => self.file.write_zeroes(offset, len, false),
        };
        let g = self.stripe(unit);
        if r.is_err() {
            // Not stored: whoever waits for it keeps waiting for another arrival.
            st.store(was, Ordering::Release);
            drop(g);
            return r.map(|()| false);
        }
        st.store(PRESENT, Ordering::Release);
        self.missing.fetch_sub(1, Ordering::AcqRel);
        if was == REQUESTED {
            self.fetched.fetch_add(1, Ordering::Relaxed);
        } else {
            self.pushed.fetch_add(1, Ordering::Relaxed);
        }
        drop(g);
        self.stripes[unit as usize % STRIPES].cv.notify_all();
        Ok(true)
    }

    /// The units can no longer arrive (the session ended): requests waiting for one, and
    /// later ones that need one, fail with `reason`. Present units are still served.
    pub fn fail(&self, reason: String) {
        *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
        self.failed.store(true, Ordering::Release);
        for s in &self.stripes {
            let _g = s.lock.lock().unwrap_or_else(|p| p.into_inner());
            s.cv.notify_all();
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> PostcopyStats {
        let mut w = self.waits.lock().unwrap_or_else(|p| p.into_inner()).clone();
        w.sort_unstable();
        let pct = |q: f64| {
            if w.is_empty() {
                0
            } else {
                w[((w.len() - 1) as f64 * q).round() as usize]
            }
        };
        PostcopyStats {
            units_local: self.units_local,
            units_fetched: self.fetched.load(Ordering::Relaxed),
            units_pushed: self.pushed.load(Ordering::Relaxed),
            units_owned: self.owned.load(Ordering::Relaxed),
            arrivals_discarded: self.discarded.load(Ordering::Relaxed),
            reads_waited: w.len() as u64,
            wait_us_p50: pct(0.5),
            wait_us_p99: pct(0.99),
            wait_us_max: w.last().copied().unwrap_or(0),
        }
    }

    fn stripe(&self, unit: u64) -> MutexGuard<'_, ()> {
        self.stripes[unit as usize % STRIPES]
            .lock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn unavailable(&self, unit: u64) -> DiskError {
        let reason = self
            .reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "the session ended".into());
        DiskError::Unavailable {
            block: unit,
            reason,
        }
    }

    /// Makes `units` present: requests the absent ones (in one call), then waits for all.
    fn make_present(&self, units: impl Iterator<Item = u64> + Clone) -> Result<(), DiskError> {
        let mut want = Vec::new();
        for u in units.clone() {
            if self.is_present(u) {
                continue;
            }
            let _g = self.stripe(u);
            let st = &self.state[u as usize];
            if st.load(Ordering::Acquire) == ABSENT {
                st.store(REQUESTED, Ordering::Release);
                want.push(u);
            }
        }
        let start = Instant::now();
        // A request that asked for a unit counts even if the unit arrived before the check
        // below (a fast path): its latency is what a guest sees for a stale block.
        let mut waited = !want.is_empty();
        if !want.is_empty() {
            if self.failed.load(Ordering::Acquire) {
                return Err(self.unavailable(want[0]));
            }
            self.fetcher.request(&want);
        }
        for u in units {
            if self.is_present(u) {
                continue;
            }
            waited = true;
            let stripe = &self.stripes[u as usize % STRIPES];
            let mut g = self.stripe(u);
            while self.state[u as usize].load(Ordering::Acquire) != PRESENT {
                if self.failed.load(Ordering::Acquire) {
                    return Err(self.unavailable(u));
                }
                g = stripe.cv.wait(g).unwrap_or_else(|p| p.into_inner());
            }
        }
        if waited {
            let us = start.elapsed().as_micros() as u64;
            self.waits
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(us);
        }
        Ok(())
    }

    /// Runs `write`, which changes `len` bytes at `offset`, so that no stale byte is ever
    /// served and no arrival lands on it afterwards: units the write covers partly are
    /// fetched first; units it covers whole are claimed (an arrival for them is dropped).
    fn guest_write(
        &self,
        offset: u64,
        len: u64,
        write: impl FnOnce() -> Result<(), DiskError>,
    ) -> Result<(), DiskError> {
        if self.file.read_only() {
            return Err(DiskError::ReadOnly);
        }
        check_range(offset, len, self.file.size())?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let size = self.file.size();
        let first = offset / UNIT;
        let last = (end - 1) / UNIT;
        let whole = |u: u64| offset <= u * UNIT && end >= ((u + 1) * UNIT).min(size);
        let partial = [first, last];
        let partial = partial.iter().copied().filter(|&u| !whole(u));
        // At most the first and the last unit are partial (the same one twice is harmless).
        self.make_present(partial.clone().collect::<Vec<_>>().into_iter())?;
        let mut claimed = Vec::new();
        for u in first..=last {
            if !whole(u) || self.is_present(u) {
                continue;
            }
            let stripe = &self.stripes[u as usize % STRIPES];
            let mut g = self.stripe(u);
            loop {
                let st = &self.state[u as usize];
                match st.load(Ordering::Acquire) {
                    ABSENT | REQUESTED => {
                        st.store(WRITING, Ordering::Release);
                        claimed.push(u);
                        break;
                    }
                    PRESENT => break,
                    _ => g = stripe.cv.wait(g).unwrap_or_else(|p| p.into_inner()),
                }
            }
        }
        let r = write();
        for &u in &claimed {
            let g = self.stripe(u);
            let st = &self.state[u as usize];
            if r.is_ok() {
                st.store(PRESENT, Ordering::Release);
                self.missing.fetch_sub(1, Ordering::AcqRel);
                self.owned.fetch_add(1, Ordering::Relaxed);
            } else {
                // The write may have left the unit half written: fetch it after all.
                st.store(REQUESTED, Ordering::Release);
            }
            drop(g);
            self.stripes[u as usize % STRIPES].cv.notify_all();
        }
        if r.is_err() && !claimed.is_empty() {
            self.fetcher.request(&claimed);
        }
        r
    }
}

impl<D: BlockDevice> BlockDevice for PostcopyDisk<D> {
    fn size(&self) -> u64 {
        self.file.size()
    }

    fn read_only(&self) -> bool {
        self.file.read_only()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_range(offset, buf.len() as u64, self.file.size())?;
        if !buf.is_empty() {
            let last = (offset + buf.len() as u64 - 1) / UNIT;
            self.make_present(offset / UNIT..last + 1)?;
        }
        self.file.read_at(buf, offset)
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), DiskError> {
        self.guest_write(offset, data.len() as u64, || {
            self.file.write_at(data, offset, fua)
        })
    }

    fn flush(&self) -> Result<(), DiskError> {
        self.file.flush()
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.guest_write(offset, len, || self.file.trim(offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), DiskError> {
        self.guest_write(offset, len, || self.file.write_zeroes(offset, len, fua))
    }
}

#[cfg(test)]
#[path = "postcopy_tests.rs"]
mod tests;
