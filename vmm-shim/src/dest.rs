//! The destination role: guest memory registered with userfaultfd, filled on demand and by
//! the source's push over QUIC.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;
use transport::message::{PageKind, Pages};
use transport::proto::{Channel, DestConfig, DestSession};
use transport::quic::accept::{AcceptLimits, Acceptor};
use transport::quic::{self, DestHooks, PageSink, SinkError};
use transport::tls::Identity;
use transport::{Layout, PAGE_SIZE};
use uffd_core::error::chain;
use uffd_core::{
    Destination, HostRegion, Installer, MetricsSnapshot, Origin, PageSource, PageTable,
};

use crate::disks::{DestDisk, DiskSet, VmSink};
use crate::error::RoleError;

/// How the destination listens and whom it accepts.
pub struct DestOptions {
    /// Where to listen (port 0: any; see [`Listener::local_addr`]).
    pub listen: SocketAddr,
    /// This side's certificate and key.
    pub identity: Identity,
    /// The only certificate the source may present.
    pub peer_cert: transport::tls::CertificateDer<'static>,
    /// If set, the VM id the source must announce.
    pub expected_vm_id: Option<String>,
    /// How long to wait for the source to connect.
    pub accept_timeout: Duration,
    /// Called about ten times a second while a session runs, and once when it ends (also
    /// on failure), with what this side holds and the bytes it received and sent.
    pub progress: Option<crate::ProgressFn>,
    /// A lost connection pauses a migration (the guest runs on) until the source
    /// reconnects (docs/recovery.md); with a limit, the session fails once the connection
    /// has been down this long. `None`: no limit.
    pub recover_timeout: Option<Duration>,
    /// How long a source that completed its handshake may take to hand the VM over: a
    /// source that connects before it pauses its VM ([`crate::source::PreparedSource`])
    /// keeps the session waiting while its guest runs on. Past it the session fails (and
    /// the source is told), so a source that hangs cannot hold this side for ever.
    pub hand_over_timeout: Duration,
}

/// Default of [`DestOptions::hand_over_timeout`]: a source normally pauses seconds after
/// connecting.
pub const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(300);

impl DestOptions {
    /// Options with the defaults: any VM id, 60 s for the source to connect, no progress
    /// callback, [`HAND_OVER_TIMEOUT`] for a connected source to hand the VM over.
    pub fn new(
        listen: SocketAddr,
        identity: Identity,
        peer_cert: transport::tls::CertificateDer<'static>,
    ) -> DestOptions {
        DestOptions {
            listen,
            identity,
            peer_cert,
            expected_vm_id: None,
            accept_timeout: Duration::from_secs(60),
            progress: None,
            recover_timeout: None,
            hand_over_timeout: HAND_OVER_TIMEOUT,
        }
    }
}

/// What the destination measured: the session's own report, with what this role adds.
#[derive(Clone, Debug, Serialize)]
pub struct DestReport {
    /// The VM id, total and close times (from the source's connection), wire bytes and
    /// early push bytes, as the driver measured them.
    #[serde(flatten)]
    pub session: quic::DestReport,
    /// Size of guest memory in bytes.
    pub memory_bytes: u64,
    /// Guest pages (4 KiB) in all.
    pub pages: u64,
    /// Source connected → guest resumed (handshake and layout check included).
    pub resume_ms: f64,
    /// Pages that arrived lz4-compressed and as content references, and references that
    /// failed verification here (the guest had changed the page they named) and were
    /// fetched again: the session's [`quic::DestReport::decoded`], which a plain
    /// destination prints.
    #[serde(flatten)]
    pub decoded: quic::DecodeStats,
    /// The fault loop's and installer's counters: faults, blocked time, latency, pages by
    /// how they arrived.
    pub metrics: MetricsSnapshot,
    /// Each disk's figures (none for a VM without disks).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<crate::disks::DiskReport>,
}

/// Demand requests from the fault loop go to the QUIC driver through a channel; sending on
/// an unbounded tokio channel never blocks the fault loop thread.
pub(crate) struct ChannelSource(pub(crate) UnboundedSender<Vec<u64>>);

impl PageSource for ChannelSource {
    fn request(&self, pages: &[u64]) {
        // A closed channel means the session is over; the fault loop is being stopped.
        let _ = self.0.send(pages.to_vec());
    }
}

/// Installs page data from the wire into guest memory through userfaultfd.
pub(crate) struct UffdSink {
    installer: Installer,
    table: Arc<PageTable>,
}

impl UffdSink {
    pub(crate) fn new(installer: Installer, table: Arc<PageTable>) -> UffdSink {
        UffdSink { installer, table }
    }
}

impl PageSink for UffdSink {
    fn install(&self, pages: &Pages, channel: Channel) -> Result<(), SinkError> {
        let origin = match channel {
            Channel::Urgent | Channel::Echo => Origin::Demand,
            _ => Origin::Push,
        };
        let kinds = &pages.kinds[..];
        let mut offset = 0;
        let mut i = 0;
        while i < kinds.len() {
            let page = pages.first + i as u64;
            if kinds[i] == PageKind::Zero as u8 {
                // A run of zero pages: one fill, or none where the memory's file is still
                // a hole there (uffd_core::Installer::install_zero_run).
                let run = kinds[i..]
                    .iter()
                    .take_while(|&&k| k == PageKind::Zero as u8)
                    .count();
                self.installer
                    .install_zero_run(page, run as u64, origin)
                    .map_err(|e| SinkError(chain(&e)))?;
                i += run;
                continue;
            }
            // Consecutive raw pages have consecutive payloads: one copy for the run.
            let run = kinds[i..]
                .iter()
                .take_while(|&&k| k == PageKind::Raw as u8)
                .count();
            let data = pages
                .payload
                .get(offset..offset + run * PAGE_SIZE)
                .ok_or_else(|| SinkError("page payload shorter than its kinds".into()))?;
            self.installer
                .install_run(page, data, origin)
                .map_err(|e| SinkError(chain(&e)))?;
            offset += run * PAGE_SIZE;
            i += run;
        }
        Ok(())
    }

    fn is_complete(&self) -> bool {
        self.table.is_complete()
    }

    fn read_page(&self, page: u64, out: &mut [u8]) -> bool {
        self.installer.read_present(page, out)
    }
}

/// A bound destination endpoint: bind first, so the caller can learn the address (port 0),
/// then [`Listener::receive`].
///
/// From the moment it is bound it accepts in the background (`transport::quic::accept`):
/// spoofed and replayed Initials get a stateless Retry, handshakes run concurrently with a
/// timeout each, a peer that fails authentication is logged and dropped, and while a
/// migration or evacuation runs (or is paused by a lost connection) an authenticated peer of
/// another session is told at once that this side is busy, while a new connection of the
/// same session (its source coming back, from any address) resumes it. Only an
/// authenticated peer can start a session or end one.
pub struct Listener {
    runtime: tokio::runtime::Runtime,
    endpoint: quic::Endpoint,
    acceptor: Acceptor,
    /// Set by [`Listener::stop_on`]; the stopper holds the endpoint while this lives.
    _stop_watch: Option<crate::stop::Watch>,
    opts: DestOptions,
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, RoleError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("faultline-net")
        .enable_all()
        .build()
        .map_err(RoleError::Runtime)
}

impl Listener {
    /// Binds the listening QUIC endpoint (mutual TLS, pinning `opts.peer_cert`) on its own
    /// network runtime; nothing is accepted until [`Listener::receive`] (or
    /// [`Listener::serve_standby`]) runs.
    pub fn bind(opts: DestOptions) -> Result<Listener, RoleError> {
        let runtime = runtime()?;
        let (endpoint, acceptor) = {
            let _guard = runtime.enter();
            let endpoint =
                quic::server_endpoint(opts.listen, &opts.identity, opts.peer_cert.clone())?;
            let acceptor = Acceptor::start(endpoint.clone(), AcceptLimits::default());
            (endpoint, acceptor)
        };
        Ok(Listener {
            runtime,
            endpoint,
            acceptor,
            _stop_watch: None,
            opts,
        })
    }

    /// Lets `stopper` end this listener's session (or its wait for one): the endpoint
    /// closes with the stop's reason, which the peer reports at once.
    pub fn stop_on(&mut self, stopper: &crate::Stopper) {
        self._stop_watch = Some(stopper.watch(&self.endpoint));
    }

    /// The bound address (the port the system chose for port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, RoleError> {
        self.endpoint.local_addr().map_err(RoleError::Io)
    }

    /// Receives one migration into `regions`, whose layout must equal the source's.
    ///
    /// The regions are registered with userfaultfd before the source connects; nothing may
    /// touch them until `on_resume` runs (that is where the caller resumes its vCPUs).
    /// When this returns the regions hold the source's memory and are unregistered. On
    /// error no page was installed from a rejected peer: the handshake and every frame are
    /// checked before anything is written.
    pub fn receive(
        self,
        regions: &[HostRegion],
        layout: &Layout,
        on_resume: impl FnOnce() + Send + 'static,
    ) -> Result<DestReport, RoleError> {
        self.receive_vm(regions, layout, move |_| on_resume())
    }

    /// [`Listener::receive`] for a VMM: `on_resume` gets the vCPU and device state blob the
    /// source sent (see `send_with_state`), to restore before it runs the vCPUs.
    pub fn receive_vm(
        self,
        regions: &[HostRegion],
        layout: &Layout,
        on_resume: impl FnOnce(Option<Vec<u8>>) + Send + 'static,
    ) -> Result<DestReport, RoleError> {
        self.receive_vm_with_disks(regions, &[], layout, on_resume)
    }

    /// [`Listener::receive_vm`] for a VM with disks: `layout` names them (in this order,
    /// with these sizes) after its memory regions. Serve each [`DestDisk::device`] to the
    /// guest when `on_resume` runs: a block not here yet is fetched when the guest reads
    /// it, and the push brings the rest. The report gives each disk's figures.
    pub fn receive_vm_with_disks(
        mut self,
        regions: &[HostRegion],
        disks: &[DestDisk],
        layout: &Layout,
        on_resume: impl FnOnce(Option<Vec<u8>>) + Send + 'static,
    ) -> Result<DestReport, RoleError> {
        check_layout(regions, layout)?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let disk_set = Arc::new(DiskSet::connect(disks, layout, &tx)?);
        let dest = Destination::register(regions, Arc::new(ChannelSource(tx)))?;
        let sink = Arc::new(VmSink {
            memory: UffdSink {
                installer: dest.installer().clone(),
                table: dest.table().clone(),
            },
            disks: disk_set.clone(),
        });
        let table = dest.table().clone();
        let resumed_at: Arc<Mutex<Option<Instant>>> = Arc::default();
        // The last sample, taken after the session ended; reported below however it ended.
        let last: Arc<Mutex<Option<crate::Progress>>> = Arc::default();
        let opts = &self.opts;
        let endpoint = &self.endpoint;
        let acceptor = &mut self.acceptor;

        let result = self.runtime.block_on(async {
            let conn = tokio::time::timeout(opts.accept_timeout, acceptor.next())
                .await
                .map_err(|_| RoleError::AcceptTimeout(opts.accept_timeout))?
                .ok_or(RoleError::EndpointClosed)?;
            // From here on the session screens new connections: its own source coming back
            // resumes it, any other peer is told this side is busy.
            let connected = Instant::now();
            let conns = crate::progress::Connections::new(&conn);
            let sample = {
                let (table, conns) = (table.clone(), conns.clone());
                move || conns.sample(Some(table.resolved()), table.total())
            };
            let ticker = opts
                .progress
                .clone()
                .map(|f| crate::progress::spawn_ticker(f, sample.clone()));
            let session = DestSession::new(DestConfig {
                expected_vm_id: opts.expected_vm_id.clone(),
                ..DestConfig::migrate(layout.clone())
            });
            let resumed = resumed_at.clone();
            let clock = disk_set.clone();
            let hooks = DestHooks {
                on_established: Some(Box::new(move |_vm_id: &str, state: Option<&[u8]>| {
                    clock.start_clock();
                    on_resume(state.map(<[u8]>::to_vec));
                    *resumed.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                })),
            };
            let recovery = quic::DestRecovery {
                incoming: Some(&mut *acceptor),
                recover_timeout: opts.recover_timeout,
                on_connection: Some(conns.follower()),
                hand_over_timeout: Some(opts.hand_over_timeout),
            };
            let r = quic::run_dest_recovering(conn, session, sink, rx, hooks, recovery).await;
            if let Some(t) = ticker {
                t.abort();
            }
            *last.lock().unwrap_or_else(|p| p.into_inner()) = Some(sample());
            // Let the close reach the source before the endpoint goes away.
            let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
            Ok::<_, RoleError>((r?, connected))
        });
        let metrics = dest.finish();
        if let Some(f) = &self.opts.progress {
            let last = last.lock().unwrap_or_else(|p| p.into_inner()).take();
            f(crate::Progress {
                pages_present: Some(table.resolved()),
                ..last.unwrap_or(crate::Progress {
                    pages: table.total(),
                    ..Default::default()
                })
            });
        }
        if let Err(e) = &result {
            disk_set.fail(&uffd_core::error::chain(e));
        }
        let metrics = metrics?;
        let (net, connected) = result?;
        let resume = resumed_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|t| t.duration_since(connected))
            .unwrap_or_default();
        Ok(DestReport {
            decoded: net.decoded,
            session: net,
            memory_bytes: layout.memory_bytes(),
            pages: layout.total_pages(),
            resume_ms: resume.as_secs_f64() * 1e3,
            metrics,
            disks: disk_set.reports(),
        })
    }
}

/// What a standby did, from its first replication session to the end of evacuation.
#[derive(Clone, Debug, Serialize)]
pub struct StandbyReport {
    /// The evacuation session's report: VM id, total and close times (from the
    /// evacuation's connection), wire bytes and early push bytes.
    #[serde(flatten)]
    pub session: quic::DestReport,
    /// Size of guest memory in bytes.
    pub memory_bytes: u64,
    /// Guest pages (4 KiB) in all.
    pub pages: u64,
    /// Replication sessions served before the evacuation: one per replicator run (a lost
    /// connection pauses a session, which resumes on the next: see `replication`); more
    /// when a replicator started over (a new source run, a session that failed).
    pub replication_sessions: u64,
    /// Pages stored in the replica over all replication sessions (a page counts each
    /// time a newer version of it was stored).
    pub pages_replicated: u64,
    /// What link outages did to replication, all sessions together (docs/recovery.md):
    /// `pauses`, `paused_ms`, `resume_ms_after_restore`, and in `bytes_resent` the page
    /// bytes that arrived at the version the replica already held. (The evacuation's own
    /// outages are the top-level fields of the same names.)
    pub replication: quic::Outages,
    /// Pages the replica held valid when the evacuation began.
    pub replica_valid_pages: u64,
    /// Evacuation connected → guest resumed (stale set received, holes punched, registered).
    pub resume_ms: f64,
    /// What the evacuation moved: pages from the replica, stale pages, the exposure window.
    #[serde(flatten)]
    pub evacuation: crate::replica::EvacuationStats,
    /// The fault loop's counters during the evacuation (`None` if it never began).
    pub metrics: Option<MetricsSnapshot>,
    /// Each disk's evacuation figures (none for a VM without disks).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<crate::disks::DiskReport>,
}

impl Listener {
    /// Runs a standby: serves replication sessions into `sink`'s replica (reconnects
    /// included) until a source evacuates into it, then receives the stale pages while the
    /// guest runs. `on_resume` gets the guest memory region when the guest may resume, and
    /// the VMM's state blob if the source sent one (see [`crate::replica::evacuate()`]).
    pub fn serve_standby(
        mut self,
        sink: Arc<crate::replica::StandbySink>,
        layout: &Layout,
        on_resume: impl FnOnce(HostRegion, Option<Vec<u8>>) + Send + 'static,
    ) -> Result<StandbyReport, RoleError> {
        use transport::message::SessionKind;
        let torn_at_open = sink.torn_pages();
        let on_resume = Arc::new(Mutex::new(Some(on_resume)));
        let opts = &self.opts;
        let endpoint = &self.endpoint;
        let acceptor = &mut self.acceptor;
        let mut sessions = 0u64;
        let mut replicated = 0u64;
        let mut outages = quic::Outages::default();
        let result = self.runtime.block_on(async {
            loop {
                // Peers that fail authentication never get here (see `Listener`). A
                // replication's own connections resume it; another session's connection
                // that came during a replication (the source coming to evacuate before this
                // side saw the replication close, or a new replicator) waits for it to end,
                // or ends it if it is paused, and comes first here.
                let conn = tokio::time::timeout(opts.accept_timeout, acceptor.next())
                    .await
                    .map_err(|_| RoleError::AcceptTimeout(opts.accept_timeout))?
                    .ok_or(RoleError::EndpointClosed)?;
                let valid_before = sink.valid_pages();
                let connected = Instant::now();
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                sink.set_requests(tx);
                let session = DestSession::new(DestConfig {
                    expected_vm_id: opts.expected_vm_id.clone(),
                    accept: vec![SessionKind::Replicate, SessionKind::Evacuate],
                    ..DestConfig::migrate(layout.clone())
                });
                let resumed: Arc<Mutex<Option<Instant>>> = Arc::default();
                let (resumed2, hook, sink2) = (resumed.clone(), on_resume.clone(), sink.clone());
                // Called for an evacuation only (a replication session has no guest to
                // resume): from here on this standby is the guest's host, and the session
                // screens new connections (its source coming back resumes it, any other
                // peer is told this side is busy).
                let hooks = DestHooks {
                    on_established: Some(Box::new(move |_vm: &str, state: Option<&[u8]>| {
                        *resumed2.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                        let f = hook.lock().unwrap_or_else(|p| p.into_inner()).take();
                        if let (Some(f), Some(region)) = (f, sink2.guest_region()) {
                            f(region, state.map(<[u8]>::to_vec));
                        }
                    })),
                };
                let pages = layout.total_pages();
                let conns = crate::progress::Connections::new(&conn);
                let sample = {
                    let conns = conns.clone();
                    move || conns.sample(None, pages)
                };
                let ticker = opts
                    .progress
                    .clone()
                    .map(|f| crate::progress::spawn_ticker(f, sample.clone()));
                sink.session_started(conns.clone());
                let follower = conns.follower();
                let sink3 = sink.clone();
                let recovery = quic::DestRecovery {
                    incoming: Some(&mut *acceptor),
                    recover_timeout: opts.recover_timeout,
                    on_connection: Some(Arc::new(move |c: &quic::Connection| {
                        sink3.session_reconnected();
                        follower(c);
                    })),
                    hand_over_timeout: Some(opts.hand_over_timeout),
                };
                let r = quic::run_dest_recovering(conn, session, sink.clone(), rx, hooks, recovery)
                    .await;
                sink.session_ended(r.as_ref().ok().map(|rep| rep.outages.pauses));
                if let Some(t) = ticker {
                    t.abort();
                }
                if let Some(f) = &opts.progress {
                    f(sample());
                }
                match r {
                    Ok(rep) if rep.kind == Some(SessionKind::Replicate) => {
                        sessions += 1;
                        replicated += rep.pages_replicated;
                        outages.merge(&rep.outages);
                        tracing::info!(
                            pages = rep.pages_replicated,
                            pauses = rep.outages.pauses,
                            "replication session ended"
                        );
                    }
                    Ok(rep) => {
                        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle())
                            .await;
                        let resume = resumed
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .map(|t| t.duration_since(connected))
                            .unwrap_or_default();
                        return Ok::<_, RoleError>((rep, resume, valid_before));
                    }
                    Err(e) if sink.guest_region().is_none() => {
                        // Replication broke (the source went away, the network failed):
                        // what was acknowledged is stored; wait for the next session.
                        sessions += 1;
                        tracing::warn!(error = %chain(&e), "replication session failed");
                    }
                    Err(e) => {
                        sink.fail_disks(&uffd_core::error::chain(&e));
                        return Err(e.into());
                    }
                }
            }
        });
        let metrics = sink.finish()?;
        let (net, resume, valid_before) = result?;
        Ok(StandbyReport {
            session: net,
            memory_bytes: layout.memory_bytes(),
            pages: layout.total_pages(),
            replication_sessions: sessions,
            pages_replicated: replicated,
            replication: quic::Outages {
                bytes_resent: sink.pages_stored_again() * PAGE_SIZE as u64,
                ..outages
            },
            replica_valid_pages: valid_before,
            resume_ms: resume.as_secs_f64() * 1e3,
            evacuation: sink.evacuation_stats(torn_at_open),
            metrics,
            disks: sink.disk_reports(),
        })
    }
}

/// The memory handed to us must be what the layout describes, region by region.
fn check_layout(regions: &[HostRegion], layout: &Layout) -> Result<(), RoleError> {
    let ok = layout.page_size as usize == PAGE_SIZE
        && regions.len() == layout.regions.len()
        && regions
            .iter()
            .zip(&layout.regions)
            .all(|(h, l)| h.len() as u64 == l.len);
    if ok {
        Ok(())
    } else {
        Err(RoleError::LayoutDoesNotFitMemory)
    }
}
