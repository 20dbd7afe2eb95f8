//! The source's replicator: a long-running, best-effort task that harvests dirty pages and
//! sends them to the standby within a bandwidth budget.
//!
//! It runs on its own thread at `SCHED_IDLE` priority (and its network runtime too), so it
//! only uses CPU the guest leaves idle: the guest pays the tracking cost and nothing else.
//! One replication session (one session id) lasts the replicator's life: if the connection
//! is lost (a restart of the standby, the network), the session pauses, the driver
//! reconnects (overlapping attempts) and the session resumes with a fresh handshake, in which the
//! standby tells which pages it cannot serve (docs/recovery.md). Nothing is harvested or
//! sent while paused: the tracker keeps the writes, and what was in flight and not
//! acknowledged goes out again.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;
use transport::message::{Layout, Pages, SessionKind, MAX_PAGES_PER_MESSAGE};
use transport::proto::{SourceConfig, SourceSession};
use transport::quic::{self, Outages, ReplicationEvent, Update};
use transport::tls::{CertificateDer, Identity};
use transport::PAGE_SIZE;
use uffd_core::{DirtyTracker, HostRegion, RegionMap};

use super::pace::HarvestPace;
use super::Ledger;
use crate::disks::{ReplicatedDisk, VmTracker};
use crate::error::RoleError;

/// How the replicator reaches the standby and how much it may send.
#[derive(Clone)]
pub struct ReplicatorOptions {
    /// The standby's address.
    pub connect: SocketAddr,
    /// This side's certificate and key.
    pub identity: Identity,
    /// The only certificate the standby may present.
    pub peer_cert: CertificateDer<'static>,
    /// The VM's name, which the standby may insist on.
    pub vm_id: String,
    /// Replication epoch: random per source run, so a standby can tell our versions apart
    /// from another run's.
    pub epoch: u64,
    /// Payload budget in bytes per second (e.g. 50 Mbit/s = 6_250_000).
    pub budget_bytes_per_sec: u64,
    /// Harvest and send period.
    pub interval: Duration,
    /// How long to keep trying to reach the standby before giving up, for a session's
    /// first connection.
    pub connect_timeout: Duration,
    /// Give up once the connection has been lost this long (the session pauses and
    /// reconnects meanwhile); `None`: never.
    pub recover_timeout: Option<Duration>,
    /// Run at `SCHED_IDLE` (the default in the CLI): replication only uses CPU the guest
    /// leaves idle. Off, it competes normally (tests on a loaded machine use that, so the
    /// replica fills in bounded time).
    pub idle_priority: bool,
}

/// Live counters, readable while the replicator runs.
#[derive(Debug, Default)]
pub struct ReplicatorStats {
    /// Pages whose current version the standby has not acknowledged, as of the end of the
    /// last round.
    pub stale_pages: AtomicU64,
    /// Pages handed to a connection for sending; pages lost with a connection and sent
    /// again count again.
    pub pages_sent: AtomicU64,
    /// Acknowledgements the standby returned, one per page and version stored.
    pub pages_acked: AtomicU64,
    /// Harvests of the dirty tracker by the replicator (evacuation's final one is not
    /// counted).
    pub harvests: AtomicU64,
    /// Time spent in those harvests, in nanoseconds.
    pub harvest_ns: AtomicU64,
    /// Connections made to the standby: each session's first plus every reconnect that
    /// resumed it (so `connections - sessions` is at most `pauses`).
    pub connections: AtomicU64,
    /// Replication sessions: 1, unless a session failed (not a lost connection: the
    /// standby refused it) and a new one started.
    pub sessions: AtomicU64,
    /// Times the connection was lost and the session paused.
    pub pauses: AtomicU64,
    /// UDP bytes sent and received over all the replicator's connections; 0 until it
    /// stops, as it is summed from each session's report when that session ends.
    pub wire_bytes: AtomicU64,
    /// Time spent paused, all pauses together, ms; summed from each session's report when
    /// that session ends.
    pub paused_ms: AtomicU64,
    /// Longest time from a new connection being up to the session running again, ms (from
    /// the sessions' reports too).
    pub resume_ms_after_restore: AtomicU64,
    /// Page bytes sent again at the version they were in flight at when a connection was
    /// lost, as of the last round.
    pub bytes_resent: AtomicU64,
    /// Whether a connection to the standby is up and the session runs on it (not paused).
    pub connected: AtomicBool,
    /// UDP bytes sent to the standby so far, live (see [`LinkBytes::sent`]).
    pub link: LinkBytes,
    /// What an evacuation's push would make of the pages the guest writes, from a sample
    /// of those replication sends again.
    pub written: super::WrittenPages,
}

/// UDP bytes the replicator sent over all its connections, readable while it runs: the
/// connections of sessions that ended, plus the current session's so far.
#[derive(Default)]
pub struct LinkBytes {
    ended: AtomicU64,
    current: std::sync::Mutex<Option<Arc<crate::progress::Connections>>>,
}

impl std::fmt::Debug for LinkBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkBytes")
            .field("sent", &self.sent())
            .finish()
    }
}

impl LinkBytes {
    /// UDP bytes sent so far, over every connection of every session (QUIC headers,
    /// acknowledgements and retransmissions included).
    pub fn sent(&self) -> u64 {
        let current = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(0, |c| c.sample(None, 0).bytes_sent);
        self.ended.load(Ordering::Relaxed) + current
    }

    /// A new session runs on `conns`; the previous session's bytes are kept.
    fn follow(&self, conns: Arc<crate::progress::Connections>) {
        let mut g = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = g.replace(conns) {
            self.ended
                .fetch_add(old.sample(None, 0).bytes_sent, Ordering::Relaxed);
        }
    }
}

/// A snapshot of [`ReplicatorStats`].
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReplicationSummary {
    /// The dirty tracker's kind (`DirtyTracker::kind`).
    pub tracker: &'static str,
    /// [`ReplicatorStats::stale_pages`] when the replicator stopped.
    pub stale_pages: u64,
    /// [`ReplicatorStats::pages_sent`].
    pub pages_sent: u64,
    /// [`ReplicatorStats::pages_acked`].
    pub pages_acked: u64,
    /// [`ReplicatorStats::harvests`].
    pub harvests: u64,
    /// [`ReplicatorStats::harvest_ns`], in milliseconds.
    pub harvest_ms_total: f64,
    /// [`ReplicatorStats::connections`].
    pub connections: u64,
    /// [`ReplicatorStats::sessions`].
    pub sessions: u64,
    /// [`ReplicatorStats::wire_bytes`].
    pub wire_bytes: u64,
    /// What link outages did (docs/recovery.md): `pauses`, `paused_ms`,
    /// `resume_ms_after_restore`, `bytes_resent`, from the stats of the same names.
    #[serde(flatten)]
    pub outages: Outages,
}

/// What the replicator hands back when stopped: everything evacuation needs.
pub struct ReplicatorState {
    /// What the standby holds, with the acknowledgements of the last session collected.
    pub ledger: Ledger,
    /// The dirty tracker, still armed: its next harvest (evacuation's final one) reports
    /// every page written since the replicator's last harvest, so none is missed.
    pub tracker: Box<dyn DirtyTracker>,
    /// The counters when the replicator stopped.
    pub summary: ReplicationSummary,
}

/// A running replicator.
pub struct Replicator {
    stop: Arc<AtomicBool>,
    stats: Arc<ReplicatorStats>,
    thread: Option<JoinHandle<Result<ReplicatorState, RoleError>>>,
    /// The threads running at idle priority ([`ReplicatorOptions::idle_priority`]), for
    /// [`Replicator::hurry`].
    idle: IdleThreads,
}

/// Thread ids of the replicator's threads that run at idle priority, and whether they
/// were told to leave it (threads that start after that stay at normal priority).
#[derive(Clone, Default)]
struct IdleThreads(Arc<std::sync::Mutex<(Vec<libc::pid_t>, bool)>>);

impl IdleThreads {
    /// Puts the calling thread at idle priority and remembers it, unless the replicator
    /// was hurried already, or this process could not put it back ([`may_leave_idle`]):
    /// a replicator stuck at idle priority would do the evacuation's catch-up and last
    /// round on CPU the guest leaves, while the evacuation waits for them.
    fn enter(&self) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if g.1 || !may_leave_idle() {
            return;
        }
        // SAFETY: sched_param is plain data; pid 0 means the calling thread. Failure only
        // leaves the thread at normal priority.
        let r = unsafe {
            let param = libc::sched_param { sched_priority: 0 };
            libc::sched_setscheduler(0, libc::SCHED_IDLE, &param)
        };
        if r == 0 {
            // SAFETY: gettid has no arguments and cannot fail.
            g.0.push(unsafe { libc::gettid() });
        }
    }

    /// Whether [`IdleThreads::leave`] was called: the replicator was hurried.
    fn hurried(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).1
    }

    /// How long the replicator sleeps between rounds: `normal`, or a millisecond once
    /// hurried, so that an evacuation waiting for its last round or its end does not wait
    /// out a whole interval (20 ms) for each.
    fn interval(&self, normal: Duration) -> Duration {
        if self.hurried() {
            normal.min(Duration::from_millis(1))
        } else {
            normal
        }
    }

    /// Puts every remembered thread back at normal priority, for good.
    fn leave(&self) {
        let tids = {
            let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
            g.1 = true;
            std::mem::take(&mut g.0)
        };
        for tid in tids {
            // SAFETY: as in `enter`; `tid` names a thread of this process (if it ended
            // meanwhile the call fails with ESRCH and changes nothing).
            let r = unsafe {
                let param = libc::sched_param { sched_priority: 0 };
                libc::sched_setscheduler(tid, libc::SCHED_OTHER, &param)
            };
            let e = std::io::Error::last_os_error();
            if r != 0 && e.raw_os_error() != Some(libc::ESRCH) {
                tracing::warn!(tid, error = %e, "a replicator thread stays at idle priority");
            }
        }
    }
}

/// Whether this process may put a thread back from `SCHED_IDLE` to normal priority
/// ([`probe_leave_idle`]), found once. Says why (a warning) when not.
fn may_leave_idle() -> bool {
    static MAY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *MAY.get_or_init(|| {
        let may = match probe_leave_idle() {
            Ok(may) => may,
            Err(e) => {
                tracing::warn!("the replicator does not lower its priority: no probe thread: {e}");
                return false;
            }
        };
        // SAFETY: reads the calling thread's policy; no memory is touched.
        let idle_already = unsafe { libc::sched_getscheduler(0) } == libc::SCHED_IDLE;
        if !may && idle_already {
            tracing::warn!(
                "this process runs at idle priority (chrt -i) and may not leave it: the \
                 replicator's catch-up and last round for an evacuation will run there too, \
                 on CPU the guest leaves (leaving it needs CAP_SYS_NICE, or an RLIMIT_NICE \
                 that allows its nice value: ulimit -e 20)"
            );
        } else if !may {
            tracing::warn!(
                "the replicator does not lower its priority: this process may not put a \
                 thread back from idle priority for the evacuation (that needs CAP_SYS_NICE, \
                 or an RLIMIT_NICE that allows its nice value: ulimit -e 20)"
            );
        }
        may
    })
}

/// Tries, on a scratch thread, to set `SCHED_IDLE` and then `SCHED_OTHER`: whether this
/// process may leave idle priority (CAP_SYS_NICE in the initial user namespace, or an
/// RLIMIT_NICE that allows its nice value, `ulimit -e`), found by trying rather than
/// guessed from capabilities a container may show without holding. Errors: the thread
/// could not be started.
fn probe_leave_idle() -> std::io::Result<bool> {
    let probe = std::thread::Builder::new()
        .name("idle-probe".into())
        .spawn(|| {
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: pid 0 is the calling thread, this scratch one, which ends right
            // after; the calls read `param` and touch no other memory.
            unsafe {
                libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) == 0
                    && libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) == 0
            }
        })?;
    Ok(probe.join().unwrap_or(false))
}

/// Guest memory and disks the replicator reads: the regions stay mapped while it runs.
struct GuestPages {
    map: RegionMap,
    memory_pages: u64,
    disks: Vec<(std::ops::Range<u64>, Arc<dyn disk::BlockDevice>)>,
}

impl GuestPages {
    /// Copies `count` pages from `first` into `out`: pages of memory (across regions as
    /// they come: a run of the ledger may span two), then pages of disks.
    fn read(&self, first: u64, count: usize, out: &mut Vec<u8>) -> bool {
        out.resize(count * PAGE_SIZE, 0);
        let in_memory = self.memory_pages.saturating_sub(first).min(count as u64) as usize;
        if in_memory > 0 && !self.read_memory(first, &mut out[..in_memory * PAGE_SIZE]) {
            return false;
        }
        let mut page = first + in_memory as u64;
        let mut at = in_memory * PAGE_SIZE;
        while at < out.len() {
            let Some((range, dev)) = self.disks.iter().find(|(r, _)| r.contains(&page)) else {
                return false;
            };
            let n = ((out.len() - at) / PAGE_SIZE).min((range.end - page) as usize);
            // A guest write racing this read may tear the copy; it also marks the block,
            // so the next harvest supersedes this version (as for memory below).
            let buf = &mut out[at..at + n * PAGE_SIZE];
            if let Err(e) = dev.read_at(buf, (page - range.start) * PAGE_SIZE as u64) {
                tracing::warn!(page, error = %uffd_core::error::chain(&e), "disk read for replication failed");
                return false;
            }
            page += n as u64;
            at += n * PAGE_SIZE;
        }
        true
    }

    fn read_memory(&self, first: u64, out: &mut [u8]) -> bool {
        // The guest may write the pages meanwhile; a torn copy is harmless because such a
        // write also marks the page dirty, so the copy's version is superseded by the next
        // harvest before the page can count as fresh.
        self.map.read_shared(first, out)
    }
}

impl Replicator {
    /// Starts replicating `regions` (laid out as `layout`) using `tracker`.
    pub fn start(
        regions: &[HostRegion],
        layout: Layout,
        tracker: Box<dyn DirtyTracker>,
        opts: ReplicatorOptions,
    ) -> Result<Replicator, RoleError> {
        Replicator::start_with_disks(regions, &[], layout, tracker, opts)
    }

    /// [`Replicator::start`] for a VM with disks: their blocks replicate with the memory,
    /// in one session, within the same budget. `layout` is guest memory's; the disks are
    /// appended to it (see [`crate::disks::with_disks`]), and [`crate::replica::evacuate_with_disks`]
    /// must get the same disks.
    pub fn start_with_disks(
        regions: &[HostRegion],
        disks: &[ReplicatedDisk],
        layout: Layout,
        tracker: Box<dyn DirtyTracker>,
        opts: ReplicatorOptions,
    ) -> Result<Replicator, RoleError> {
        let map = RegionMap::new(regions.to_vec()).map_err(uffd_core::Error::from)?;
        let sources: Vec<_> = disks.iter().map(ReplicatedDisk::source).collect();
        let layout = crate::disks::layout_with(&layout, &sources)?;
        let tracker: Box<dyn DirtyTracker> = if disks.is_empty() {
            tracker
        } else {
            Box::new(VmTracker::new(tracker, &layout, disks))
        };
        let guest = GuestPages {
            map,
            memory_pages: layout.memory_pages(),
            disks: disks
                .iter()
                .enumerate()
                .map(|(i, d)| (layout.disk_pages(i), d.device.clone()))
                .collect(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(ReplicatorStats::default());
        let idle = IdleThreads::default();
        let (stop2, stats2, idle2) = (stop.clone(), stats.clone(), idle.clone());
        let thread = std::thread::Builder::new()
            .name("replicator".into())
            .spawn(move || {
                if opts.idle_priority {
                    idle2.enter();
                }
                run(guest, layout, tracker, opts, &stop2, stats2, idle2)
            })
            .map_err(RoleError::Io)?;
        Ok(Replicator {
            stop,
            stats,
            thread: Some(thread),
            idle,
        })
    }

    /// The live counters.
    pub fn stats(&self) -> &ReplicatorStats {
        &self.stats
    }

    /// The live counters, shared: for a reader that outlives this borrow (a metrics
    /// exporter's thread). They stay readable after the replicator stops.
    pub fn stats_handle(&self) -> Arc<ReplicatorStats> {
        self.stats.clone()
    }

    /// Pages whose current version the standby has not acknowledged (as of the last round).
    pub fn stale_pages(&self) -> u64 {
        self.stats.stale_pages.load(Ordering::Relaxed)
    }

    /// Runs the replicator at normal priority from now on, if it ran at idle priority: an
    /// evacuation waits for it (its last round, the session's end), and on a host busy
    /// evacuating other VMs idle-priority threads get hardly any CPU. [`Replicator::stop`]
    /// calls it; call it earlier where the evacuation waits for replication to catch up.
    pub fn hurry(&self) {
        self.idle.leave();
    }

    /// Whether the replicator thread is still running (it ends on a fatal error).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops replicating (the session ends cleanly) and returns the ledger and tracker.
    pub fn stop(mut self) -> Result<ReplicatorState, RoleError> {
        self.hurry();
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            _ => Err(RoleError::Io(std::io::Error::other(
                "replicator thread panicked",
            ))),
        }
    }
}

impl Drop for Replicator {
    fn drop(&mut self) {
        // Off idle priority first: an error path drops it with the guest still running,
        // and joining a starved thread would wait for CPU the guest leaves idle.
        self.hurry();
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Longest time between two harvests while a backlog is being sent.
const MAX_HARVEST_INTERVAL: Duration = Duration::from_secs(1);

/// Wait before a new session when the last one failed (not a lost connection, which the
/// session itself survives).
const NEW_SESSION_AFTER: Duration = Duration::from_secs(1);

/// The replication session: its update sender and event receiver.
struct Link {
    updates: mpsc::Sender<Update>,
    events: mpsc::UnboundedReceiver<ReplicationEvent>,
    driver: tokio::task::JoinHandle<Result<quic::ReplicationReport, quic::DriverError>>,
    /// Paused: nothing is sent until the session resumes.
    paused: bool,
}

fn run(
    guest: GuestPages,
    layout: Layout,
    mut tracker: Box<dyn DirtyTracker>,
    opts: ReplicatorOptions,
    stop: &AtomicBool,
    stats: Arc<ReplicatorStats>,
    idle: IdleThreads,
) -> Result<ReplicatorState, RoleError> {
    let idle_priority = opts.idle_priority;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("replicator-net")
        .on_thread_start({
            let idle = idle.clone();
            move || {
                if idle_priority {
                    idle.enter();
                }
            }
        })
        .enable_all()
        .build()
        .map_err(RoleError::Runtime)?;
    let endpoint = {
        let _g = rt.enter();
        quic::client_endpoint(
            crate::source::unspecified_for(opts.connect),
            &opts.identity,
            opts.peer_cert.clone(),
        )?
    };
    let mut ledger = Ledger::new(layout.total_pages());
    let mut written = super::written::WrittenSample::new();
    let mut dirty = Vec::new();
    let mut runs = Vec::new();
    let mut buf = Vec::new();
    let mut link: Option<Link> = None;
    let mut tokens = 0f64;
    let mut last = Instant::now();
    let burst = opts.budget_bytes_per_sec as f64 * opts.interval.as_secs_f64() * 4.0;
    let mut ended = SessionsEnded::default();
    let mut last_harvest = Instant::now() - MAX_HARVEST_INTERVAL;
    let mut pace = HarvestPace::new();

    while !stop.load(Ordering::Relaxed) {
        // A new session if there is none, or the last one failed for good. A lost
        // connection does not end a session: it pauses and resumes on its own.
        if link.as_ref().is_none_or(|l| l.driver.is_finished()) {
            if let Some(old) = link.take() {
                let failed = ended.add(&rt, old, &mut ledger, &stats);
                match failed {
                    Some(e) if fatal(&e) => return Err(e.into()),
                    Some(e) => {
                        tracing::warn!(error = %uffd_core::error::chain(&e),
                            "the replication session failed; starting a new one");
                    }
                    None => {}
                }
                sleep_unless_stopped(NEW_SESSION_AFTER, stop);
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
            link = Some(connect(&rt, &endpoint, &layout, &opts, stop, &stats)?);
            stats.sessions.fetch_add(1, Ordering::Relaxed);
        }
        let Some(l) = link.as_mut() else { break };
        while let Ok(ev) = l.events.try_recv() {
            apply(&mut ledger, ev, &stats, &mut l.paused);
        }
        if l.paused {
            // Nothing is harvested or sent: the tracker keeps what the guest writes.
            std::thread::sleep(idle.interval(opts.interval));
            continue;
        }

        // Harvest only when the backlog is nearly sent (or now and then). A harvest re-arms
        // tracking of every page written since the last one, and with WP_ASYNC each re-armed
        // page costs the guest a protection fault on its next write; re-arming pages faster
        // than the budget can send them would slow the guest for nothing. Pages written
        // meanwhile are caught by a later harvest, at the latest the final one at switchover.
        let backlog = ledger.unsent_count();
        let per_interval = (opts.budget_bytes_per_sec as f64 * opts.interval.as_secs_f64()
            / PAGE_SIZE as f64) as u64;
        // Nor, not hurried, more often than the walk's share allows (`pace`): the walk
        // costs the same whatever the guest wrote.
        let since = last_harvest.elapsed();
        if (backlog <= 2 * per_interval.max(1) && pace.allows(since, idle.hurried()))
            || since >= MAX_HARVEST_INTERVAL
        {
            let t = Instant::now();
            tracker.harvest(&mut dirty)?;
            let took = t.elapsed();
            pace.walked(took);
            stats
                .harvest_ns
                .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
            stats.harvests.fetch_add(1, Ordering::Relaxed);
            ledger.mark_dirty(&dirty);
            last_harvest = Instant::now();
        }

        let now = Instant::now();
        tokens = (tokens
            + now.duration_since(last).as_secs_f64() * opts.budget_bytes_per_sec as f64)
            .min(burst.max(PAGE_SIZE as f64));
        last = now;
        // Hurried (an evacuation waits for the last round), the budget no longer applies:
        // what is left is sent at once.
        let pages = if idle.hurried() {
            usize::MAX
        } else {
            (tokens / PAGE_SIZE as f64) as usize
        };
        ledger.next_batch(pages, &mut runs);
        let mut sent = 0usize;
        'send: for (first, versions) in &runs {
            for (i, chunk) in versions.chunks(MAX_PAGES_PER_MESSAGE).enumerate() {
                let start = first + (i * MAX_PAGES_PER_MESSAGE) as u64;
                if !guest.read(start, chunk.len(), &mut buf) {
                    continue;
                }
                for (k, page) in buf.chunks_exact(PAGE_SIZE).enumerate() {
                    tracker.replicated(start + k as u64, page)?;
                    if ledger.was_acked(start + k as u64) {
                        written.offer(page);
                    }
                }
                let update = Update {
                    pages: Pages::from_memory(start, &buf),
                    versions: chunk.to_vec(),
                };
                if l.updates.blocking_send(update).is_err() {
                    // The session ended; a new one learns what the standby holds, and
                    // what was not acknowledged goes out again (forget_in_flight).
                    break 'send;
                }
                sent += chunk.len();
            }
        }
        tokens -= (sent * PAGE_SIZE) as f64;
        stats.pages_sent.fetch_add(sent as u64, Ordering::Relaxed);
        written.publish(&stats.written);
        stats
            .stale_pages
            .store(ledger.stale_count(), Ordering::Relaxed);
        stats
            .bytes_resent
            .store(ledger.pages_resent() * PAGE_SIZE as u64, Ordering::Relaxed);
        std::thread::sleep(idle.interval(opts.interval));
    }

    // End the session cleanly (also while paused) and collect the last acknowledgements.
    if let Some(l) = link.take() {
        if let Some(e) = ended.add(&rt, l, &mut ledger, &stats) {
            tracing::warn!(error = %uffd_core::error::chain(&e), "the replication session ended with an error");
        }
    }
    // The close goes out now; its draining (three probe timeouts, about 0.1 s even on
    // loopback, since quinn's PTO counts the peer's 25 ms maximum ACK delay) finishes on a
    // thread of its own. An evacuation waits for this state before it connects, and the
    // draining was half of its `prep.connect_ms` (fleet_evacuation, docs/fleet.md).
    {
        let _g = rt.enter();
        endpoint.close(0u32.into(), b"done");
    }
    let drain = move || {
        rt.block_on(async {
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        });
    };
    if let Err(e) = std::thread::Builder::new()
        .name("replicator-close".into())
        .spawn(drain)
    {
        // The close was sent; only its retransmissions are lost without the thread.
        tracing::debug!(error = %e, "no thread to drain the replication connection's close");
    }
    stats
        .stale_pages
        .store(ledger.stale_count(), Ordering::Relaxed);
    stats
        .bytes_resent
        .store(ledger.pages_resent() * PAGE_SIZE as u64, Ordering::Relaxed);
    let summary = summary(tracker.kind(), &stats);
    Ok(ReplicatorState {
        ledger,
        tracker,
        summary,
    })
}

/// What the sessions that ended add up to.
#[derive(Default)]
struct SessionsEnded {
    wire_bytes: u64,
}

impl SessionsEnded {
    /// Waits for a session's driver to end (its update sender must be dropped, or the
    /// driver already finished), applies its last events, adds its report to `stats` and
    /// returns its error, if any. Whatever was in flight may never have arrived.
    fn add(
        &mut self,
        rt: &tokio::runtime::Runtime,
        l: Link,
        ledger: &mut Ledger,
        stats: &ReplicatorStats,
    ) -> Option<quic::DriverError> {
        let Link {
            updates,
            mut events,
            driver,
            mut paused,
        } = l;
        drop(updates);
        let result = rt.block_on(driver);
        stats.connected.store(false, Ordering::Relaxed);
        while let Ok(ev) = events.try_recv() {
            apply(ledger, ev, stats, &mut paused);
        }
        ledger.forget_in_flight();
        match result {
            Ok(Ok(r)) => {
                self.wire_bytes += r.udp_tx_bytes + r.udp_rx_bytes;
                stats.wire_bytes.store(self.wire_bytes, Ordering::Relaxed);
                stats
                    .paused_ms
                    .fetch_add(r.outages.paused_ms, Ordering::Relaxed);
                stats
                    .resume_ms_after_restore
                    .fetch_max(r.outages.resume_ms_after_restore, Ordering::Relaxed);
                None
            }
            Ok(Err(e)) => Some(e),
            Err(e) => Some(quic::DriverError::Task(e.to_string())),
        }
    }
}

/// Whether a failed session ends replication rather than a new session starting: the
/// connection stayed lost past the recover timeout, or the application stopped.
fn fatal(e: &quic::DriverError) -> bool {
    matches!(
        e,
        quic::DriverError::RecoverTimeout { .. } | quic::DriverError::Stopped
    )
}

fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) {
    let until = Instant::now() + d;
    while Instant::now() < until && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn apply(ledger: &mut Ledger, ev: ReplicationEvent, stats: &ReplicatorStats, paused: &mut bool) {
    match ev {
        ReplicationEvent::Invalid(b) => ledger.invalidate(&b),
        ReplicationEvent::Acked(entries) => {
            stats
                .pages_acked
                .fetch_add(entries.len() as u64, Ordering::Relaxed);
            for (p, v) in entries {
                ledger.ack(p, v);
            }
        }
        ReplicationEvent::Paused => {
            // Pages in flight may never arrive; updates handed over from now on are
            // dropped by the driver.
            ledger.forget_in_flight();
            stats.pauses.fetch_add(1, Ordering::Relaxed);
            stats.connected.store(false, Ordering::Relaxed);
            *paused = true;
        }
        ReplicationEvent::Resumed => {
            stats.connected.store(true, Ordering::Relaxed);
            *paused = false;
        }
    }
}

fn summary(tracker: &'static str, s: &ReplicatorStats) -> ReplicationSummary {
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    ReplicationSummary {
        tracker,
        stale_pages: get(&s.stale_pages),
        pages_sent: get(&s.pages_sent),
        pages_acked: get(&s.pages_acked),
        harvests: get(&s.harvests),
        harvest_ms_total: get(&s.harvest_ns) as f64 / 1e6,
        connections: get(&s.connections),
        sessions: get(&s.sessions),
        wire_bytes: get(&s.wire_bytes),
        outages: Outages {
            pauses: get(&s.pauses),
            paused_ms: get(&s.paused_ms),
            resume_ms_after_restore: get(&s.resume_ms_after_restore),
            bytes_resent: get(&s.bytes_resent),
        },
    }
}

/// Starts a session: its first connection (retried until `opts.connect_timeout`), then the
/// driver, which keeps the session across lost connections.
fn connect(
    rt: &tokio::runtime::Runtime,
    endpoint: &quic::Endpoint,
    layout: &Layout,
    opts: &ReplicatorOptions,
    stop: &AtomicBool,
    stats: &Arc<ReplicatorStats>,
) -> Result<Link, RoleError> {
    let deadline = Instant::now() + opts.connect_timeout;
    let conn = loop {
        match rt.block_on(quic::connect(endpoint, opts.connect)) {
            Ok(c) => break c,
            Err(e) => {
                if Instant::now() > deadline || stop.load(Ordering::Relaxed) {
                    return Err(e.into());
                }
                tracing::info!(error = %uffd_core::error::chain(&e), "standby not reachable; retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    stats.connections.fetch_add(1, Ordering::Relaxed);
    stats.connected.store(true, Ordering::Relaxed);
    let conns = crate::progress::Connections::new(&conn);
    stats.link.follow(conns.clone());
    let session = SourceSession::new(SourceConfig {
        kind: SessionKind::Replicate,
        epoch: opts.epoch,
        ..SourceConfig::migrate(opts.vm_id.clone(), layout.clone())
    });
    let counted = stats.clone();
    let recovery = quic::SourceRecovery {
        endpoint: endpoint.clone(),
        addr: opts.connect,
        recover_timeout: opts.recover_timeout,
        stopped: None,
        on_connection: Some(Arc::new(move |c: &quic::Connection| {
            counted.connections.fetch_add(1, Ordering::Relaxed);
            conns.replace(c);
        })),
        on_handover: None,
    };
    // A few batches in flight keep the link busy without buffering much stale data.
    let (updates, rx) = mpsc::channel(8);
    let (tx, events) = mpsc::unbounded_channel();
    let driver = rt.spawn(quic::run_replication_recovering(
        conn,
        session,
        rx,
        tx,
        Some(recovery),
    ));
    Ok(Link {
        updates,
        events,
        driver,
        paused: false,
    })
}

#[cfg(test)]
mod idle_tests {
    use super::IdleThreads;

    fn policy_of(tid: libc::pid_t) -> i32 {
        // SAFETY: reads the policy of a thread of this process; no memory is touched.
        unsafe { libc::sched_getscheduler(tid) }
    }

    /// What the kernel's rule says of this process, where it can be told from outside the
    /// probe: `Some(true)` if its RLIMIT_NICE allows its nice value, or it holds
    /// CAP_SYS_NICE in the initial user namespace; `Some(false)` if it holds neither; `None`
    /// if it shows the capability in another user namespace (where it does not count for
    /// this).
    fn kernel_allows_leaving_idle() -> Option<bool> {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the rlimit it is given, which lives on this stack.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NICE, &mut lim) }, 0);
        // SAFETY: reads the calling thread's nice value; no memory is touched.
        let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        let needed = (20 - nice) as libc::rlim_t;
        if lim.rlim_cur == libc::RLIM_INFINITY || lim.rlim_cur >= needed {
            return Some(true);
        }
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let cap_eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
            .unwrap();
        // CAP_SYS_NICE is capability 23 (linux/capability.h).
        let cap_sys_nice = cap_eff & (1 << 23) != 0;
        // The initial user namespace has a fixed inode (PROC_USER_INIT_INO).
        let initial_ns = std::fs::read_link("/proc/self/ns/user")
            .is_ok_and(|l| l.as_os_str() == "user:[4026531837]");
        match (cap_sys_nice, initial_ns) {
            (false, _) => Some(false),
            (true, true) => Some(true),
            (true, false) => None,
        }
    }

    #[test]
    fn the_probe_agrees_with_the_kernels_rule() {
        let probed = super::probe_leave_idle().unwrap();
        if let Some(allowed) = kernel_allows_leaving_idle() {
            assert_eq!(probed, allowed);
        }
        assert_eq!(super::may_leave_idle(), probed);
    }

    #[test]
    fn hurried_threads_leave_idle_priority_and_later_ones_never_enter_it() {
        let idle = IdleThreads::default();
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::spawn({
            let idle = idle.clone();
            move || {
                idle.enter();
                // SAFETY: gettid has no arguments and cannot fail.
                tx.send(unsafe { libc::gettid() }).unwrap();
                let _ = done_rx.recv();
            }
        });
        let tid = rx.recv().unwrap();
        // A process that could not put it back never puts it at idle priority.
        let entered = if super::may_leave_idle() {
            libc::SCHED_IDLE
        } else {
            libc::SCHED_OTHER
        };
        assert_eq!(policy_of(tid), entered);
        idle.leave();
        assert_eq!(policy_of(tid), libc::SCHED_OTHER);
        // A thread starting after the hurry stays at normal priority.
        let late = std::thread::spawn({
            let idle = idle.clone();
            move || {
                idle.enter();
                policy_of(0)
            }
        });
        assert_eq!(late.join().unwrap(), libc::SCHED_OTHER);
        done_tx.send(()).unwrap();
        worker.join().unwrap();
    }
}

#[cfg(test)]
mod guest_pages_tests {
    use super::GuestPages;
    use uffd_core::{GuestMemory, RegionMap, PAGE_SIZE};

    /// A run of the ledger may span two regions (its pages are numbered across them):
    /// it is read whole, not skipped, which would leave its pages stale until written
    /// again.
    #[test]
    fn a_run_across_two_regions_is_read_whole() {
        let (a, b) = (
            GuestMemory::anonymous(2 * PAGE_SIZE).unwrap(),
            GuestMemory::anonymous(2 * PAGE_SIZE).unwrap(),
        );
        for (m, first) in [(&a, 0u8), (&b, 2)] {
            for p in 0..2 {
                // SAFETY: inside the mapping, which `m` keeps alive; nothing else uses it.
                unsafe { m.as_ptr().add(p * PAGE_SIZE).write(first + p as u8 + 1) };
            }
        }
        let guest = GuestPages {
            map: RegionMap::new(vec![a.host_region(), b.host_region()]).unwrap(),
            memory_pages: 4,
            disks: Vec::new(),
        };
        let mut out = Vec::new();
        assert!(guest.read(1, 3, &mut out));
        let firsts: Vec<u8> = out.chunks_exact(PAGE_SIZE).map(|p| p[0]).collect();
        assert_eq!(firsts, [2, 3, 4]);
        // Past guest memory (and no disk there): refused.
        assert!(!guest.read(3, 2, &mut out));
    }
}
