//! The standby: stores replicated pages in normal times, and at evacuation becomes the
//! destination, serving fresh pages from its replica and fetching only stale ones.
//!
//! - **Memory tier**: the replica file on tmpfs becomes guest memory. Stale and invalid
//!   pages are punched out before the guest resumes; registered with userfaultfd (MISSING on
//!   shmem) only those fault, and the kernel serves every fresh page with no userspace
//!   round trip.
//! - **Disk tier**: guest memory is fresh anonymous memory, all absent. A fault on a page
//!   that is fresh in the replica is served from the disk file by a local worker, and a
//!   background prefetch installs every fresh page, while stale pages come over QUIC.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;
use transport::bitmap::Bitmap;
use transport::message::{PageKind, Pages, SessionKind};
use transport::proto::Channel;
use transport::quic::{PageSink, SinkError};
use transport::PAGE_SIZE;
use uffd_core::replica::present_page_table;
use uffd_core::{
    Destination, DiskTier, GuestMapping, GuestMemory, HostRegion, MemoryTier, MetricsSnapshot,
    Origin, PageData, PageSource, PageTable, ReplicaStore,
};

use crate::dest::{ChannelSource, UffdSink};

/// The replica a standby keeps.
pub enum Replica {
    /// Replica on tmpfs: at evacuation its file becomes guest memory without a copy, and
    /// only stale and invalid pages fault.
    Memory(MemoryTier),
    /// Replica on a disk filesystem: at evacuation guest memory is fresh anonymous memory,
    /// filled from the file on demand and by a background prefetch (which shares it).
    Disk(Arc<DiskTier>),
}

impl Replica {
    fn store(&self) -> &dyn ReplicaStore {
        match self {
            Replica::Memory(m) => m,
            Replica::Disk(d) => d.as_ref(),
        }
    }
}

/// Guest memory once the standby has become the destination.
enum Guest {
    Mapping(GuestMapping),
    Memory(GuestMemory),
}

struct Live {
    dest: Mutex<Option<Destination>>,
    sink: UffdSink,
    table: Arc<PageTable>,
    guest: Guest,
    prefetch: Mutex<Option<JoinHandle<()>>>,
}

/// A standby's [`PageSink`]: the replica in normal times, guest memory after evacuation.
pub struct StandbySink {
    replica: Mutex<Option<Replica>>,
    requests: Mutex<Option<UnboundedSender<Vec<u64>>>>,
    pending_acks: Mutex<Vec<(u64, u64)>>,
    live: OnceLock<Live>,
    pages_from_replica: Arc<AtomicU64>,
    stale_at_switchover: AtomicU64,
    switchover: OnceLock<Instant>,
    completed: OnceLock<Instant>,
    total_pages: u64,
}

/// What the standby measured at evacuation.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct EvacuationStats {
    /// Pages served from the replica rather than from the source: the pages present at
    /// switchover (memory tier), or the pages installed from the disk file so far (disk
    /// tier).
    pub pages_from_replica: u64,
    /// Pages the replica could not serve at switchover (stale, invalid or never stored),
    /// which had to come from the source.
    pub pages_stale: u64,
    /// Switchover → last stale page present: how long losing the source would lose data.
    pub vulnerability_ms: f64,
    /// Pages of the replica found torn (content not matching its entry) when the standby
    /// started serving; each was made invalid, so the source sends it again.
    pub torn_pages_at_open: u64,
}

/// The error, with its sources (which its own message leaves out), as the session's reason.
fn sink_err(e: impl std::error::Error + 'static) -> SinkError {
    SinkError(uffd_core::error::chain(&e))
}

impl StandbySink {
    /// A sink that stores replication into `replica` until an evacuation.
    pub fn new(replica: Replica) -> StandbySink {
        let total_pages = replica.store().total_pages();
        StandbySink {
            replica: Mutex::new(Some(replica)),
            requests: Mutex::new(None),
            pending_acks: Mutex::new(Vec::new()),
            live: OnceLock::new(),
            pages_from_replica: Arc::new(AtomicU64::new(0)),
            stale_at_switchover: AtomicU64::new(0),
            switchover: OnceLock::new(),
            completed: OnceLock::new(),
            total_pages,
        }
    }

    /// Where demand requests go for the next session.
    pub fn set_requests(&self, tx: UnboundedSender<Vec<u64>>) {
        *lock(&self.requests) = Some(tx);
    }

    /// Pages the replica holds at a valid version.
    pub fn valid_pages(&self) -> u64 {
        lock(&self.replica)
            .as_ref()
            .map_or(0, |r| r.store().valid_pages().count() as u64)
    }

    /// Pages of the replica found torn (content not matching its entry) since it was
    /// opened, each made invalid; 0 once the replica has become guest memory.
    pub fn torn_pages(&self) -> u64 {
        lock(&self.replica)
            .as_ref()
            .map_or(0, |r| r.store().torn_pages())
    }

    /// Guest memory after evacuation (None before).
    pub fn guest_region(&self) -> Option<HostRegion> {
        self.live.get().map(|l| match &l.guest {
            Guest::Mapping(m) => m.host_region(),
            Guest::Memory(m) => m.host_region(),
        })
    }

    /// Stops the fault loop and unregisters guest memory; returns its metrics.
    pub fn finish(&self) -> Result<Option<MetricsSnapshot>, uffd_core::Error> {
        let Some(live) = self.live.get() else {
            return Ok(None);
        };
        // Stopping the fault loop drops the tiered source and with it the prefetch worker's
        // channel, so the worker can be joined after.
        let metrics = match lock(&live.dest).take() {
            Some(d) => d.finish().map(Some),
            None => Ok(None),
        };
        if let Some(t) = lock(&live.prefetch).take() {
            let _ = t.join();
        }
        metrics
    }

    /// What was measured at evacuation, with `torn_at_open` (the caller's
    /// [`StandbySink::torn_pages`] before the first session) reported as is. Before an
    /// evacuation, or until every stale page is present, the vulnerability is 0.
    pub fn evacuation_stats(&self, torn_at_open: u64) -> EvacuationStats {
        let vulnerability = match (self.switchover.get(), self.completed.get()) {
            (Some(a), Some(b)) => b.duration_since(*a).as_secs_f64() * 1e3,
            _ => 0.0,
        };
        EvacuationStats {
            pages_from_replica: self.pages_from_replica.load(Ordering::Relaxed),
            pages_stale: self.stale_at_switchover.load(Ordering::Relaxed),
            vulnerability_ms: vulnerability,
            torn_pages_at_open: torn_at_open,
        }
    }

    fn all_invalid(&self) -> Bitmap {
        Bitmap::new(self.total_pages).complement()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PageSink for StandbySink {
    fn install(&self, pages: &Pages, channel: Channel) -> Result<(), SinkError> {
        let live = self
            .live
            .get()
            .ok_or_else(|| SinkError("page data before the switchover".into()))?;
        live.sink.install(pages, channel)?;
        if live.table.is_complete() {
            let _ = self.completed.set(Instant::now());
        }
        Ok(())
    }

    fn is_complete(&self) -> bool {
        let done = self.live.get().is_some_and(|l| l.table.is_complete());
        if done {
            let _ = self.completed.set(Instant::now());
        }
        done
    }

    fn read_page(&self, page: u64, out: &mut [u8]) -> bool {
        self.live.get().is_some_and(|l| l.sink.read_page(page, out))
    }

    fn invalid_pages(&self, kind: SessionKind, epoch: u64) -> Result<Bitmap, SinkError> {
        let guard = lock(&self.replica);
        let store = guard
            .as_ref()
            .ok_or_else(|| SinkError("the replica is already guest memory".into()))?
            .store();
        if store.epoch() != epoch {
            if kind == SessionKind::Replicate {
                tracing::info!(
                    old = store.epoch(),
                    new = epoch,
                    "new replication epoch: the replica starts over"
                );
                store.set_epoch(epoch).map_err(sink_err)?;
            }
            return Ok(self.all_invalid());
        }
        let mut valid = Bitmap::new(self.total_pages);
        for p in store.valid_pages() {
            valid.set(p);
        }
        Ok(valid.complement())
    }

    fn prepare_stale(&self, stale: &Bitmap) -> Result<(), SinkError> {
        let _ = self.switchover.set(Instant::now());
        let replica = lock(&self.replica)
            .take()
            .ok_or_else(|| SinkError("the replica is already guest memory".into()))?;
        let requests = lock(&self.requests)
            .clone()
            .ok_or_else(|| SinkError("no request channel".into()))?;
        let remote: Arc<dyn PageSource> = Arc::new(ChannelSource(requests));
        let live = match replica {
            Replica::Memory(tier) => {
                let (mapping, present) =
                    tier.into_guest_memory(|p| stale.get(p)).map_err(sink_err)?;
                let local = present.iter().filter(|&&h| h).count() as u64;
                self.pages_from_replica.store(local, Ordering::Relaxed);
                self.stale_at_switchover
                    .store(self.total_pages - local, Ordering::Relaxed);
                let table = Arc::new(present_page_table(&present));
                let dest = Destination::register_with_table(
                    &[mapping.host_region()],
                    table.clone(),
                    remote,
                )
                .map_err(sink_err)?;
                Live {
                    sink: UffdSink::new(dest.installer().clone(), table.clone()),
                    dest: Mutex::new(Some(dest)),
                    table,
                    guest: Guest::Mapping(mapping),
                    prefetch: Mutex::new(None),
                }
            }
            Replica::Disk(tier) => self.prepare_disk(tier, stale, remote)?,
        };
        if self.live.set(live).is_err() {
            return Err(SinkError("switchover happened twice".into()));
        }
        Ok(())
    }

    fn store(&self, pages: &Pages, versions: &[u64]) -> Result<(), SinkError> {
        let mut data = Vec::with_capacity(versions.len() * PAGE_SIZE);
        let mut payload = &pages.payload[..];
        for &k in pages.kinds.iter() {
            if k == PageKind::Zero as u8 {
                data.resize(data.len() + PAGE_SIZE, 0);
            } else {
                let (page, rest) = payload.split_at(PAGE_SIZE.min(payload.len()));
                data.extend_from_slice(page);
                payload = rest;
            }
        }
        let guard = lock(&self.replica);
        let store = guard
            .as_ref()
            .ok_or_else(|| SinkError("the replica is already guest memory".into()))?
            .store();
        store
            .store(pages.first, versions, &data)
            .map_err(sink_err)?;
        let mut acks = lock(&self.pending_acks);
        acks.extend(
            versions
                .iter()
                .enumerate()
                .map(|(i, &v)| (pages.first + i as u64, v)),
        );
        Ok(())
    }

    fn sync(&self) -> Result<Vec<(u64, u64)>, SinkError> {
        let acks = std::mem::take(&mut *lock(&self.pending_acks));
        if acks.is_empty() {
            return Ok(acks);
        }
        if let Some(r) = lock(&self.replica).as_ref() {
            r.store().sync().map_err(sink_err)?;
        }
        Ok(acks)
    }
}

/// Serves faults on pages that are fresh in a disk replica from the replica, and sends the
/// rest to the network.
struct TieredSource {
    fresh: Arc<Bitmap>,
    local: std::sync::mpsc::Sender<Vec<u64>>,
    remote: Arc<dyn PageSource>,
}

impl PageSource for TieredSource {
    fn request(&self, pages: &[u64]) {
        let (local, remote): (Vec<u64>, Vec<u64>) = pages.iter().partition(|&&p| self.fresh.get(p));
        if !local.is_empty() {
            let _ = self.local.send(local);
        }
        if !remote.is_empty() {
            self.remote.request(&remote);
        }
    }
}

impl StandbySink {
    fn prepare_disk(
        &self,
        tier: Arc<DiskTier>,
        stale: &Bitmap,
        remote: Arc<dyn PageSource>,
    ) -> Result<Live, SinkError> {
        let mut fresh = Bitmap::new(self.total_pages);
        for p in tier.valid_pages() {
            if !stale.get(p) {
                fresh.set(p);
            }
        }
        self.stale_at_switchover
            .store(self.total_pages - fresh.count_ones(), Ordering::Relaxed);
        let fresh = Arc::new(fresh);
        let memory =
            GuestMemory::anonymous(self.total_pages as usize * PAGE_SIZE).map_err(sink_err)?;
        let table = Arc::new(PageTable::new(self.total_pages));
        let (local_tx, local_rx) = std::sync::mpsc::channel::<Vec<u64>>();
        let source = Arc::new(TieredSource {
            fresh: fresh.clone(),
            local: local_tx,
            remote,
        });
        let dest = Destination::register_with_table(&[memory.host_region()], table.clone(), source)
            .map_err(sink_err)?;
        let installer = dest.installer().clone();

        // Faults on fresh pages: read from disk, install. Then the prefetch of the rest.
        let counter = self.pages_from_replica.clone();
        let worker = std::thread::Builder::new()
            .name("replica-prefetch".into())
            .spawn(move || {
                let mut buf = vec![0u8; PAGE_SIZE];
                let mut install = |p: u64, origin: Origin| {
                    if let Ok(Some(_)) = tier.read(p, &mut buf) {
                        if let Ok(uffd_core::Installed::Installed) =
                            installer.install(p, PageData::Raw(&buf), origin)
                        {
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                    } else {
                        // Torn since the switchover: fetch it like a stale page. This cannot
                        // happen on a healthy disk; it is here so a bad block costs a round
                        // trip instead of serving wrong data.
                        tracing::warn!(page = p, "replica page unreadable at evacuation");
                    }
                };
                let mut prefetch = fresh.iter_ones();
                loop {
                    // Demand first: a vCPU is waiting on these.
                    while let Ok(pages) = local_rx.try_recv() {
                        for p in pages {
                            install(p, Origin::Demand);
                        }
                    }
                    match prefetch.next() {
                        Some(p) => install(p, Origin::Push),
                        None => break,
                    }
                }
                // Prefetch is done; late demand faults on fresh pages find them present.
                while let Ok(pages) = local_rx.recv() {
                    for p in pages {
                        install(p, Origin::Demand);
                    }
                }
            })
            .map_err(sink_err)?;
        Ok(Live {
            sink: UffdSink::new(dest.installer().clone(), table.clone()),
            dest: Mutex::new(Some(dest)),
            table,
            guest: Guest::Memory(memory),
            prefetch: Mutex::new(Some(worker)),
        })
    }
}
