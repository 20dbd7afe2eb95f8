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
use crate::disks::{DestDisk, DiskReport, DiskSet};
use disk::{PostcopyDisk, RawFile};

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
    /// Replicated pages that arrived at the version the replica already held (sent again
    /// after a lost connection, their acknowledgement lost with it).
    stored_again: AtomicU64,
    live: OnceLock<Live>,
    pages_from_replica: Arc<AtomicU64>,
    stale_at_switchover: AtomicU64,
    switchover: OnceLock<Instant>,
    completed: OnceLock<Instant>,
    /// Pages of guest memory: the session's pages before the disks'.
    total_pages: u64,
    /// The disks' replicas, in session order after memory.
    disks: Vec<StandbyDisk>,
    /// The disks being served, from the switchover on.
    live_disks: OnceLock<(Vec<DestDisk>, Arc<DiskSet>)>,
    /// Page bytes of replication stored (raw page size), sent again or not.
    bytes_received: AtomicU64,
    /// The session running now, for the live figures.
    link: SessionLink,
}

/// The connections of the session a standby runs now, and the pauses of those that ended.
#[derive(Default)]
struct SessionLink {
    pauses_ended: AtomicU64,
    /// The current session's connections and how many times it moved to a new one.
    current: Mutex<Option<(Arc<crate::progress::Connections>, u64)>>,
}

/// One disk's replica at a standby: a replica store of its 4 KiB blocks, whose image file
/// becomes the disk itself at evacuation.
struct StandbyDisk {
    name: String,
    tier: DiskTier,
    pages: std::ops::Range<u64>,
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
        StandbySink::with_disks(replica, Vec::new())
    }

    /// A sink for a VM with disks: memory into `replica`, each disk's blocks into its own
    /// [`DiskTier`] (named as the source names the disk, in the session's order; the
    /// tier's page count is the disk's size in 4 KiB blocks). At evacuation each disk
    /// tier's image becomes the disk, served from the switchover on (see
    /// [`StandbySink::disk_devices`]): its fresh blocks locally, stale ones fetched.
    pub fn with_disks(replica: Replica, disks: Vec<(String, DiskTier)>) -> StandbySink {
        let total_pages = replica.store().total_pages();
        let mut next = total_pages;
        let disks = disks
            .into_iter()
            .map(|(name, tier)| {
                let n = tier.total_pages();
                next += n;
                StandbyDisk {
                    name,
                    tier,
                    pages: next - n..next,
                }
            })
            .collect();
        StandbySink {
            disks,
            live_disks: OnceLock::new(),
            replica: Mutex::new(Some(replica)),
            requests: Mutex::new(None),
            pending_acks: Mutex::new(Vec::new()),
            stored_again: AtomicU64::new(0),
            live: OnceLock::new(),
            pages_from_replica: Arc::new(AtomicU64::new(0)),
            stale_at_switchover: AtomicU64::new(0),
            switchover: OnceLock::new(),
            completed: OnceLock::new(),
            total_pages,
            bytes_received: AtomicU64::new(0),
            link: SessionLink::default(),
        }
    }

    /// Pages of guest memory the replica is for (the disks' blocks not included).
    pub fn memory_pages(&self) -> u64 {
        self.total_pages
    }

    /// Page bytes of replication received and stored so far (raw page size; a page sent
    /// again after a lost connection counts again).
    pub fn bytes_received(&self) -> u64 {
        self.bytes_received.load(Ordering::Relaxed)
    }

    /// Whether a session (replication or evacuation) runs on a live connection now.
    pub fn is_connected(&self) -> bool {
        lock(&self.link.current)
            .as_ref()
            .is_some_and(|(c, _)| c.is_open())
    }

    /// Times a session's connection was lost and the session paused: those of the sessions
    /// that ended, the current session's reconnections, and 1 while it is paused now.
    pub fn pauses(&self) -> u64 {
        let now = lock(&self.link.current)
            .as_ref()
            .map_or(0, |(c, n)| n + u64::from(!c.is_open()));
        self.link.pauses_ended.load(Ordering::Relaxed) + now
    }

    /// A session starts on `conns` (see [`StandbySink::pauses`]).
    pub(crate) fn session_started(&self, conns: Arc<crate::progress::Connections>) {
        *lock(&self.link.current) = Some((conns, 0));
    }

    /// The current session moved to a new connection after a pause.
    pub(crate) fn session_reconnected(&self) {
        if let Some((_, n)) = lock(&self.link.current).as_mut() {
            *n += 1;
        }
    }

    /// The current session ended, having paused `pauses` times (its report's count; `None`
    /// when it failed without one, then its reconnections count).
    pub(crate) fn session_ended(&self, pauses: Option<u64>) {
        if let Some((_, n)) = lock(&self.link.current).take() {
            self.link
                .pauses_ended
                .fetch_add(pauses.unwrap_or(n).max(n), Ordering::Relaxed);
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

    /// Replicated pages that arrived at the version the replica already held: sent again
    /// by a replicator whose connection was lost before their acknowledgement came.
    pub fn pages_stored_again(&self) -> u64 {
        self.stored_again.load(Ordering::Relaxed)
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

    /// Pages of the whole session: memory, then the disks.
    fn session_pages(&self) -> u64 {
        self.disks.last().map_or(self.total_pages, |d| d.pages.end)
    }

    /// The first disk page, if there are disks.
    fn first_disk_page(&self) -> Option<u64> {
        self.disks.first().map(|d| d.pages.start)
    }

    /// The disks served since the evacuation's switchover, by name (empty before).
    pub fn disk_devices(&self) -> Vec<(String, Arc<PostcopyDisk<RawFile>>)> {
        self.live_disks.get().map_or_else(Vec::new, |(disks, _)| {
            disks
                .iter()
                .map(|d| (d.name().to_string(), d.device().clone()))
                .collect()
        })
    }

    /// Each disk's evacuation figures (empty before the switchover).
    pub fn disk_reports(&self) -> Vec<DiskReport> {
        self.live_disks
            .get()
            .map_or_else(Vec::new, |(_, set)| set.reports())
    }

    /// Requests for disk blocks still missing fail with `reason` (the session failed).
    pub(crate) fn fail_disks(&self, reason: &str) {
        if let Some((_, set)) = self.live_disks.get() {
            set.fail(reason);
        }
    }

    /// Serves the disks at the switchover: fresh blocks (valid in the replica, not in
    /// `stale`) locally, every other block fetched through `requests`.
    fn prepare_disks(
        &self,
        stale: &Bitmap,
        requests: &UnboundedSender<Vec<u64>>,
    ) -> Result<(), SinkError> {
        if self.disks.is_empty() {
            return Ok(());
        }
        let mut layout = transport::message::Layout::single(self.total_pages * PAGE_SIZE as u64);
        let mut dest = Vec::new();
        for d in &self.disks {
            let file = RawFile::open(&d.tier.image_path(), false).map_err(sink_err)?;
            let present = |u: u64| d.tier.version(u) != 0 && !stale.get(d.pages.start + u);
            dest.push(DestDisk::new(d.name.clone(), file, present));
            layout = layout.with_disk(d.name.clone(), d.tier.total_pages() * PAGE_SIZE as u64);
            // The image is the live disk from now on. Its index is left as it was (a new
            // epoch would punch the content out): every entry's checksum covers the content
            // it was written for, so a block changed since (arrived or written here) no
            // longer verifies and a later open treats it as invalid, never as fresh.
        }
        let set = Arc::new(DiskSet::connect(&dest, &layout, requests).map_err(sink_err)?);
        self.live_disks
            .set((dest, set))
            .map_err(|_| SinkError("switchover happened twice".into()))
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
        let (memory, disk) = split_at_page(pages, self.first_disk_page())?;
        if let Some(m) = memory {
            live.sink.install(&m, channel)?;
        }
        if let Some(d) = disk {
            let (_, set) = self
                .live_disks
                .get()
                .ok_or_else(|| SinkError("disk data before the switchover".into()))?;
            set.install(&d)?;
        }
        let _ = self.is_complete();
        Ok(())
    }

    fn is_complete(&self) -> bool {
        let done = self.live.get().is_some_and(|l| l.table.is_complete())
            && self
                .live_disks
                .get()
                .is_none_or(|(_, set)| set.is_complete());
        if done {
            let _ = self.completed.set(Instant::now());
        }
        done
    }

    fn read_page(&self, page: u64, out: &mut [u8]) -> bool {
        match (self.first_disk_page(), self.live_disks.get()) {
            (Some(f), Some((_, set))) if page >= f => set.read_page(page, out),
            _ => self.live.get().is_some_and(|l| l.sink.read_page(page, out)),
        }
    }

    fn invalid_pages(&self, kind: SessionKind, epoch: u64) -> Result<Bitmap, SinkError> {
        let guard = lock(&self.replica);
        let store = guard
            .as_ref()
            .ok_or_else(|| SinkError("the replica is already guest memory".into()))?
            .store();
        let mut valid = Bitmap::new(self.session_pages());
        let mut stores: Vec<(u64, &dyn ReplicaStore)> = vec![(0, store)];
        stores.extend(
            self.disks
                .iter()
                .map(|d| (d.pages.start, &d.tier as &dyn ReplicaStore)),
        );
        for (first, store) in stores {
            if store.epoch() != epoch {
                if kind == SessionKind::Replicate {
                    tracing::info!(
                        old = store.epoch(),
                        new = epoch,
                        "new replication epoch: the replica starts over"
                    );
                    store.set_epoch(epoch).map_err(sink_err)?;
                }
                continue;
            }
            for p in store.valid_pages() {
                valid.set(first + p);
            }
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
        let remote: Arc<dyn PageSource> = Arc::new(ChannelSource(requests.clone()));
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
        self.prepare_disks(stale, &requests)
    }

    fn store(&self, pages: &Pages, versions: &[u64]) -> Result<(), SinkError> {
        if versions.len() != pages.count() {
            return Err(SinkError("a version per page expected".into()));
        }
        let data = raw_pages(pages);
        let mut stores: Vec<(std::ops::Range<u64>, &dyn ReplicaStore)> = Vec::new();
        let guard = lock(&self.replica);
        let memory = guard
            .as_ref()
            .ok_or_else(|| SinkError("the replica is already guest memory".into()))?
            .store();
        stores.push((0..self.total_pages, memory));
        stores.extend(
            self.disks
                .iter()
                .map(|d| (d.pages.clone(), &d.tier as &dyn ReplicaStore)),
        );
        // The run may span memory and disks: each store gets its part.
        let end = pages.first + versions.len() as u64;
        for (range, store) in stores {
            let (a, b) = (pages.first.max(range.start), end.min(range.end));
            if a >= b {
                continue;
            }
            let (i, j) = ((a - pages.first) as usize, (b - pages.first) as usize);
            let again = (a..b)
                .zip(&versions[i..j])
                .filter(|&(p, &v)| store.version(p - range.start) == v)
                .count();
            self.stored_again.fetch_add(again as u64, Ordering::Relaxed);
            store
                .store(
                    a - range.start,
                    &versions[i..j],
                    &data[i * PAGE_SIZE..j * PAGE_SIZE],
                )
                .map_err(sink_err)?;
        }
        if end > self.session_pages() {
            return Err(SinkError(format!("pages up to {end} are past the replica")));
        }
        self.bytes_received
            .fetch_add((versions.len() * PAGE_SIZE) as u64, Ordering::Relaxed);
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
        for d in &self.disks {
            d.tier.sync().map_err(sink_err)?;
        }
        Ok(acks)
    }
}

/// Page contents of a run of raw and zero pages (replication sends no other kind).
fn raw_pages(pages: &Pages) -> Vec<u8> {
    let mut data = Vec::with_capacity(pages.count() * PAGE_SIZE);
    let mut payload = &pages.payload[..];
    for &k in pages.kinds.iter() {
        if k == PageKind::Zero as u8 {
            data.resize(data.len() + PAGE_SIZE, 0);
        } else {
            let (page, rest) = payload.split_at(PAGE_SIZE.min(payload.len()));
            data.extend_from_slice(page);
            data.resize(data.len() + PAGE_SIZE - page.len(), 0);
            payload = rest;
        }
    }
    data
}

/// `pages` split into its memory part and its disk part (disks start at `first_disk`).
fn split_at_page(
    pages: &Pages,
    first_disk: Option<u64>,
) -> Result<(Option<Pages>, Option<Pages>), SinkError> {
    let end = pages.first + pages.count() as u64;
    match first_disk {
        None => Ok((Some(pages.clone()), None)),
        Some(f) if end <= f => Ok((Some(pages.clone()), None)),
        Some(f) if pages.first >= f => Ok((None, Some(pages.clone()))),
        Some(f) => {
            let (m, d) = pages
                .split_at((f - pages.first) as usize)
                .ok_or_else(|| SinkError("page payload shorter than its kinds".into()))?;
            Ok((Some(m), Some(d)))
        }
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
