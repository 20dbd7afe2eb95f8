//! Evacuation on the source: pause, final harvest, stale set, postcopy of the stale pages
//! into the standby's replica.

use std::borrow::Cow;
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use transport::bitmap::Bitmap;
use transport::encoding::{page_hash, Mode, ReplicaIndex};
use transport::message::{is_zero, Layout, SessionKind};
use transport::proto::SourceConfig;
use transport::quic::{Extent, PageReader, SourceReport};
use transport::PAGE_SIZE;
use uffd_core::{HostRegion, RegionMap};

use super::ReplicatorState;
use crate::disks::{with_disks, ReplicatedDisk, SourceDisk};
use crate::error::RoleError;
use crate::source::{run_session, EarlyConnection, SourceOptions};

/// Guest memory served at evacuation. Valid only while the guest is paused: that is what
/// makes it the memory "at switchover".
pub struct PausedMemory {
    map: RegionMap,
    /// The last stretch [`PageReader::extent`] found in a backing file, as (first page,
    /// end page, all zero): memory is frozen, so it stays true while the reader lives.
    extent: Mutex<Option<(u64, u64, bool)>>,
    /// Whether any region has a backing file to ask for holes.
    has_files: bool,
}

impl PausedMemory {
    /// A reader over `regions`, which it keeps mapped.
    ///
    /// # Safety
    ///
    /// Nothing may write the regions while the reader lives (pause the vCPUs and stop
    /// device DMA first): the pages it hands out are shared slices of guest memory, and a
    /// concurrent write into one would be a data race.
    pub unsafe fn new(regions: &[HostRegion]) -> Result<PausedMemory, RoleError> {
        Ok(PausedMemory {
            has_files: regions.iter().any(|r| r.backing_file().is_some()),
            map: RegionMap::new(regions.to_vec()).map_err(uffd_core::Error::from)?,
            extent: Mutex::new(None),
        })
    }

    /// Pages `first..first + count`, which must lie in one region.
    fn region_slice(&self, first: u64, count: usize) -> Result<&[u8], String> {
        let addr = self
            .map
            .host_addr_of(first)
            .ok_or_else(|| format!("page {first} is outside guest memory"))?;
        if count == 0 || (self.map.run_within_region(first, count as u64) as usize) < count {
            return Err(format!("pages {first}+{count} run past guest memory"));
        }
        // SAFETY: the pages lie inside one region (checked above), which `map` keeps mapped;
        // nothing writes them while this reader lives (the contract of `new`).
        Ok(unsafe { std::slice::from_raw_parts(addr as *const u8, count * PAGE_SIZE) })
    }

    /// The stretch of the backing file around page `first`: `(end page, all zero)`, from
    /// `SEEK_DATA` / `SEEK_HOLE` on the file of a shared region (whose bytes are the
    /// file's; a hole reads as zeros, and shmem counts swapped-out pages as data). `None`
    /// when the region has no known file or the file cannot say.
    fn file_extent(&self, first: u64) -> Option<(u64, bool)> {
        let idx = self.map.region_index_of(first)?;
        let region = self.map.regions().get(idx)?;
        let (fd, base) = region.backing_file()?;
        let ps = PAGE_SIZE as u64;
        let addr = self.map.host_addr_of(first)? as u64;
        let left = self.map.run_within_region(first, u64::MAX);
        let off = base + (addr - region.host_addr() as u64);
        let end = off + left * ps;
        let seek = |whence| -> Option<u64> {
            // SAFETY: lseek takes an fd, an offset and a whence, and touches no memory; the
            // fd is borrowed from the region's mapping owner, which keeps it open. (It
            // moves the file position, which nothing uses: the memory is read by mapping.)
            let r = unsafe { libc::lseek(fd.as_raw_fd(), off as libc::off_t, whence) };
            if r >= 0 {
                Some(r as u64)
            } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                // No data at or after `off`: the rest of the file is a hole.
                Some(u64::MAX)
            } else {
                None
            }
        };
        let data = seek(libc::SEEK_DATA)?;
        let zero_pages = (data.min(end) - off) / ps;
        if zero_pages > 0 {
            return Some((first + zero_pages, true));
        }
        let hole = seek(libc::SEEK_HOLE)?;
        let data_pages = (hole.min(end) - off).div_ceil(ps).max(1);
        Some((first + data_pages, false))
    }
}

impl PageReader for PausedMemory {
    /// A run inside one region is borrowed; one that crosses into the next region (the
    /// push asks for up to 16 pages where it knows no extent, and a page served on demand
    /// shifts its runs off any alignment) is copied from each.
    fn pages(&self, first: u64, count: usize) -> Result<Cow<'_, [u8]>, String> {
        let within = self.map.run_within_region(first, count as u64) as usize;
        if within == count {
            return Ok(Cow::Borrowed(self.region_slice(first, count)?));
        }
        let mut out = Vec::with_capacity(count * PAGE_SIZE);
        let mut page = first;
        let end = first + count as u64;
        while page < end {
            let n = self.map.run_within_region(page, end - page) as usize;
            out.extend_from_slice(self.region_slice(page, n)?);
            page += n as u64;
        }
        Ok(Cow::Owned(out))
    }

    fn extent(&self, first: u64, max: u64) -> Extent {
        if max == 0 {
            return Extent::Unknown;
        }
        if !self.has_files {
            // Without a file to ask, the region's end is all this knows.
            return match self.map.run_within_region(first, max) {
                0 => Extent::Unknown,
                n => Extent::Data(n),
            };
        }
        let mut cached = self.extent.lock().unwrap_or_else(|e| e.into_inner());
        let (end, zero) = match *cached {
            Some((a, b, zero)) if a <= first && first < b => (b, zero),
            _ => match self.file_extent(first) {
                Some((end, zero)) => {
                    *cached = Some((first, end, zero));
                    (end, zero)
                }
                None => {
                    return match self.map.run_within_region(first, max) {
                        0 => Extent::Unknown,
                        n => Extent::Data(n),
                    }
                }
            },
        };
        let n = (end - first).min(max);
        if zero {
            Extent::Zero(n)
        } else {
            Extent::Data(n)
        }
    }
}

/// What the source saw at evacuation.
#[derive(Clone, Debug, Serialize)]
pub struct EvacuationReport {
    /// Pages the source itself counted stale after the final harvest. (The pages that
    /// crossed, this stale set plus what the standby could not serve, are the session's
    /// `pages_stale`.)
    pub pages_stale_source: u64,
    /// Final harvest and stale-set computation, with the guest paused.
    pub final_harvest_ms: f64,
    /// Distinct contents of the fresh pages indexed for references into the replica
    /// (`None`: deduplication off, or the session ended before the index was built).
    pub replica_index_contents: Option<u64>,
    /// How long building that index took, in milliseconds, beside the session rather than
    /// in the downtime (`None` as for `replica_index_contents`).
    pub replica_index_ms: Option<f64>,
    /// The evacuation session's own report (flattened into this one when serialized).
    #[serde(flatten)]
    pub session: SourceReport,
}

/// Evacuates the paused guest in `memory` into the standby the replicator fed.
/// `vm_state` is the VMM's opaque vCPU and device state; the standby gets it before the
/// guest may resume (see [`crate::send_with_state`]).
pub fn evacuate(
    memory: PausedMemory,
    layout: &Layout,
    state: ReplicatorState,
    epoch: u64,
    opts: &SourceOptions,
    vm_state: Option<Vec<u8>>,
) -> Result<EvacuationReport, RoleError> {
    evacuate_with_disks(memory, &[], layout, state, epoch, opts, vm_state)
}

/// [`evacuate`] for a VM with disks: the same `disks` the replicator had (see
/// [`crate::replica::Replicator::start_with_disks`]), which nothing may write any more
/// (the guest is paused): their stale blocks cross with the stale pages, in one session.
pub fn evacuate_with_disks(
    memory: PausedMemory,
    disks: &[ReplicatedDisk],
    layout: &Layout,
    state: ReplicatorState,
    epoch: u64,
    opts: &SourceOptions,
    vm_state: Option<Vec<u8>>,
) -> Result<EvacuationReport, RoleError> {
    let session = Session::Fresh(opts);
    evacuate_inner(memory, disks, layout, state, epoch, vm_state, session)
}

/// [`evacuate_with_disks`] over a connection opened while the guest still ran
/// ([`EarlyConnection::open`] with the options the session runs with): the QUIC and TLS
/// handshakes are then not downtime. Open it once replication has stopped
/// ([`crate::replica::Replicator::stop`]: the standby takes one session at a time), then
/// pause the guest and call this; pages written in between are in the final harvest.
pub fn evacuate_over(
    early: EarlyConnection,
    memory: PausedMemory,
    disks: &[ReplicatedDisk],
    layout: &Layout,
    state: ReplicatorState,
    epoch: u64,
    vm_state: Option<Vec<u8>>,
) -> Result<EvacuationReport, RoleError> {
    let session = Session::Early(Box::new(early));
    evacuate_inner(memory, disks, layout, state, epoch, vm_state, session)
}

/// How an evacuation gets its connection.
enum Session<'a> {
    /// Connects when the session starts.
    Fresh(&'a SourceOptions),
    /// Was connected before the pause.
    Early(Box<EarlyConnection>),
}

impl Session<'_> {
    fn opts(&self) -> &SourceOptions {
        match self {
            Session::Fresh(o) => o,
            Session::Early(e) => e.options(),
        }
    }

    fn run(
        self,
        memory: Arc<dyn PageReader>,
        config: SourceConfig,
    ) -> Result<SourceReport, RoleError> {
        match self {
            Session::Fresh(opts) => run_session(memory, config, opts),
            Session::Early(e) => (*e).run_session(memory, config),
        }
    }
}

fn evacuate_inner(
    memory: PausedMemory,
    disks: &[ReplicatedDisk],
    layout: &Layout,
    mut state: ReplicatorState,
    epoch: u64,
    vm_state: Option<Vec<u8>>,
    session: Session<'_>,
) -> Result<EvacuationReport, RoleError> {
    let opts = session.opts();
    let sources: Vec<SourceDisk> = disks.iter().map(ReplicatedDisk::source).collect();
    let (memory, layout) = with_disks(Arc::new(memory), layout, &sources)?;
    let layout = &layout;
    let t = Instant::now();
    let mut dirty = Vec::new();
    state.tracker.harvest(&mut dirty)?;
    state.ledger.mark_dirty(&dirty);
    let stale = state.ledger.stale_set();
    let final_harvest_ms = t.elapsed().as_secs_f64() * 1e3;
    let pages_stale_source = stale.count_ones();
    // Stale pages whose content the replica holds elsewhere (moved, copied, duplicated)
    // can cross as references; the index of what it holds is built beside the session,
    // not before it, so it adds nothing to the downtime.
    let index: Option<ReplicaIndex> = (opts.encoding.dedup != Mode::Off).then(Default::default);
    let pages = layout.total_pages();
    let fresh_of = stale.clone();
    let config = SourceConfig {
        kind: SessionKind::Evacuate,
        epoch,
        stale: Some(stale),
        push: opts.push,
        encoding: opts.encoding,
        early_push: opts.early_push,
        vm_state,
        replica_index: index.clone(),
        ..SourceConfig::migrate(opts.vm_id.clone(), layout.clone())
    };
    let stop = AtomicBool::new(false);
    let (session, indexed) = std::thread::scope(|s| {
        let indexer = index.as_ref().map(|index| {
            let (memory, stop) = (&memory, &stop);
            s.spawn(move || {
                let t = Instant::now();
                let map = index_fresh(&**memory, &fresh_of, pages, stop)?;
                let n = map.len() as u64;
                index.set(map).ok()?;
                Some((n, t.elapsed().as_secs_f64() * 1e3))
            })
        });
        let session = session.run(memory.clone(), config);
        stop.store(true, Ordering::Relaxed);
        let indexed = indexer.and_then(|h| h.join().ok().flatten());
        (session, indexed)
    });
    let session = session?;
    Ok(EvacuationReport {
        pages_stale_source,
        final_harvest_ms,
        replica_index_contents: indexed.map(|(n, _)| n),
        replica_index_ms: indexed.map(|(_, ms)| ms),
        session,
    })
}

/// Content hash → page for every page not in `stale` (fresh in the replica) and not zero
/// (zero pages cross as flags anyway). `None` if `stop` was set first.
fn index_fresh(
    memory: &dyn PageReader,
    stale: &Bitmap,
    pages: u64,
    stop: &AtomicBool,
) -> Option<HashMap<u128, u64>> {
    let mut map = HashMap::new();
    for p in 0..pages {
        if p % 4096 == 0 && stop.load(Ordering::Relaxed) {
            return None;
        }
        if stale.get(p) {
            continue;
        }
        match memory.pages(p, 1) {
            Ok(data) if !is_zero(&data) => {
                map.entry(page_hash(&data)).or_insert(p);
            }
            _ => {}
        }
    }
    Some(map)
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;

    /// Two anonymous regions of 256 pages, every page filled with its own number.
    fn two_regions() -> GuestMemoryMmap<()> {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(1 << 32), 1 << 20),
        ])
        .unwrap();
        for p in 0..512u64 {
            let addr = if p < 256 {
                p << 12
            } else {
                (1 << 32) + ((p - 256) << 12)
            };
            mem.write_slice(&[p as u8; PAGE_SIZE], GuestAddress(addr))
                .unwrap();
        }
        mem
    }

    #[test]
    fn a_run_across_two_regions_is_read_from_both() {
        let mem = two_regions();
        // SAFETY: nothing writes `mem` while the reader lives.
        let r = unsafe { PausedMemory::new(&crate::guest::regions(&mem).unwrap()) }.unwrap();
        let run = r.pages(250, 16).unwrap();
        assert!(matches!(run, Cow::Owned(_)), "copied from two regions");
        let firsts: Vec<u8> = run.chunks(PAGE_SIZE).map(|p| p[0]).collect();
        let want: Vec<u8> = (250..266u64).map(|p| p as u8).collect();
        assert_eq!(firsts, want);
        assert!(run.chunks(PAGE_SIZE).all(|p| p.iter().all(|&b| b == p[0])));
        assert!(matches!(r.pages(10, 16).unwrap(), Cow::Borrowed(_)));
    }

    #[test]
    fn without_files_the_extent_ends_at_the_region() {
        let mem = two_regions();
        // SAFETY: nothing writes `mem` while the reader lives.
        let r = unsafe { PausedMemory::new(&crate::guest::regions(&mem).unwrap()) }.unwrap();
        assert_eq!(r.extent(250, 16), Extent::Data(6));
        assert_eq!(r.extent(256, 16), Extent::Data(16));
        assert_eq!(r.extent(512, 16), Extent::Unknown, "past guest memory");
    }

    #[test]
    fn a_run_past_guest_memory_is_an_error() {
        let mem = two_regions();
        // SAFETY: nothing writes `mem` while the reader lives.
        let r = unsafe { PausedMemory::new(&crate::guest::regions(&mem).unwrap()) }.unwrap();
        let e = r.pages(510, 4).unwrap_err();
        assert!(e.contains("outside guest memory"), "{e}");
        assert!(r.pages(600, 1).is_err());
    }
}
