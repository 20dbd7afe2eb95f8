//! The source role: serves a frozen memory image to one destination.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use transport::bitmap::Bitmap;
use transport::encoding::EncodingPolicy;
use transport::proto::{SourceConfig, SourceSession};
use transport::quic::{self, PageReader, SourceReport};
use transport::tls::{CertificateDer, Identity};
use transport::Layout;

use crate::dest::runtime;
use crate::error::RoleError;

/// Where the source connects and how it authenticates.
#[derive(Clone)]
pub struct SourceOptions {
    /// The destination's address.
    pub connect: SocketAddr,
    /// This side's certificate and key.
    pub identity: Identity,
    /// The only certificate the destination may present.
    pub peer_cert: CertificateDer<'static>,
    /// The VM's name, which the destination may insist on.
    pub vm_id: String,
    /// How long to keep trying to reach a destination that is not listening yet.
    pub connect_timeout: Duration,
    /// Push every page in the background (the normal case); off, pages move on demand only.
    pub push: bool,
    /// How pushed pages are encoded ([`EncodingPolicy::AUTO`] tunes it while migrating).
    pub encoding: EncodingPolicy,
    /// Start the push beside the handshake (see [`SourceConfig::early_push`]).
    pub early_push: bool,
    /// Ends the session from outside with a reason the destination reports at once.
    pub stopper: crate::Stopper,
    /// Called about ten times a second while the session runs (a hundred times, for at
    /// most 5 s, once its push has written its last page), and once when it ends (also on
    /// failure), with the bytes sent and received (see [`crate::Progress`]).
    pub progress: Option<crate::ProgressFn>,
    /// A lost connection pauses the session and the source reconnects (overlapping attempts)
    /// (docs/recovery.md); with a limit, the session fails once the connection has been
    /// down this long. `None`: no limit.
    pub recover_timeout: Option<Duration>,
    /// A ceiling on the session's sending rate, changeable while it runs (an
    /// orchestrator's share of the link; see [`quic::RateLimit`] for where it holds).
    /// `None`: the congestion controller alone decides.
    pub rate_limit: Option<quic::RateLimit>,
}

impl SourceOptions {
    /// Options with the defaults: 30 s to reach the destination, every page pushed in
    /// the background (beside the handshake), encoding tuned while migrating.
    pub fn new(
        connect: SocketAddr,
        identity: Identity,
        peer_cert: CertificateDer<'static>,
        vm_id: impl Into<String>,
    ) -> SourceOptions {
        SourceOptions {
            connect,
            identity,
            peer_cert,
            vm_id: vm_id.into(),
            connect_timeout: Duration::from_secs(30),
            push: true,
            encoding: EncodingPolicy::AUTO,
            early_push: true,
            stopper: crate::Stopper::new(),
            progress: None,
            recover_timeout: None,
            rate_limit: None,
        }
    }
}

/// Migrates `memory` (frozen for the whole call) to the destination, serving its demand
/// requests and pushing every page in the background.
pub fn send(
    memory: Arc<dyn PageReader>,
    layout: &Layout,
    opts: &SourceOptions,
) -> Result<SourceReport, RoleError> {
    let config = SourceConfig {
        push: opts.push,
        encoding: opts.encoding,
        early_push: opts.early_push,
        ..SourceConfig::migrate(opts.vm_id.clone(), layout.clone())
    };
    run_session(memory, config, opts)
}

/// Like [`send`], and carries the VMM's vCPU and device state (an opaque blob the VMM
/// versions itself) to the destination, which gets it before it resumes the guest.
pub fn send_with_state(
    memory: Arc<dyn PageReader>,
    layout: &Layout,
    opts: &SourceOptions,
    vm_state: Vec<u8>,
) -> Result<SourceReport, RoleError> {
    let config = SourceConfig {
        push: opts.push,
        encoding: opts.encoding,
        early_push: opts.early_push,
        vm_state: Some(vm_state),
        ..SourceConfig::migrate(opts.vm_id.clone(), layout.clone())
    };
    run_session(memory, config, opts)
}

/// Runs one source session of any kind over a fresh connection, with a session
/// configuration the caller builds (for settings [`SourceOptions`] does not carry, such as
/// [`SourceConfig::replies_on_bulk`]); `opts` gives the connection and identity.
pub fn run_session(
    memory: Arc<dyn PageReader>,
    config: SourceConfig,
    opts: &SourceOptions,
) -> Result<SourceReport, RoleError> {
    let rt = runtime()?;
    let (endpoint, conn) = rt.block_on(open(opts))?;
    rt.block_on(drive(
        endpoint,
        conn,
        config,
        Run::Now(memory),
        Context::of(opts),
    ))
}

/// A connection to the destination opened while the VM still runs (QUIC, address
/// validation, mutual TLS), for a session whose first message can only be written after
/// the pause: an evacuation's `Hello` carries the stale set, which the final harvest of
/// the paused guest completes ([`crate::replica::evacuate_over`]). The handshakes, a round
/// trip or two (more when the connect needs a retry), are then not downtime; what is left
/// of the switchover is the `Hello` round trip.
pub struct EarlyConnection {
    runtime: tokio::runtime::Runtime,
    endpoint: quic::Endpoint,
    conn: quic::Connection,
    opts: SourceOptions,
}

impl EarlyConnection {
    /// Connects to `opts.connect` now, retrying for `opts.connect_timeout`; the session
    /// that follows uses `opts` too.
    pub fn open(opts: &SourceOptions) -> Result<EarlyConnection, RoleError> {
        let runtime = runtime()?;
        let (endpoint, conn) = runtime.block_on(open(opts))?;
        Ok(EarlyConnection {
            runtime,
            endpoint,
            conn,
            opts: opts.clone(),
        })
    }

    /// The options it was opened with (and the session will run with).
    pub fn options(&self) -> &SourceOptions {
        &self.opts
    }

    /// Runs one session over the connection; if the destination closed it meanwhile (a
    /// restart, an idle timeout), over a fresh one, as [`run_session`] would.
    pub fn run_session(
        self,
        memory: Arc<dyn PageReader>,
        config: SourceConfig,
    ) -> Result<SourceReport, RoleError> {
        let EarlyConnection {
            runtime,
            endpoint,
            conn,
            opts,
        } = self;
        let (endpoint, conn) = match conn.close_reason() {
            None => (endpoint, conn),
            Some(reason) => {
                tracing::warn!(%reason, "the early connection closed before the session; connecting again");
                runtime.block_on(open(&opts))?
            }
        };
        runtime.block_on(drive(
            endpoint,
            conn,
            config,
            Run::Now(memory),
            Context::of(&opts),
        ))
    }
}

/// What a session task needs of [`SourceOptions`], owned.
struct Context {
    addr: SocketAddr,
    stopper: crate::Stopper,
    progress: Option<crate::ProgressFn>,
    recover_timeout: Option<Duration>,
}

impl Context {
    fn of(opts: &SourceOptions) -> Context {
        Context {
            addr: opts.connect,
            stopper: opts.stopper.clone(),
            progress: opts.progress.clone(),
            recover_timeout: opts.recover_timeout,
        }
    }
}

/// How a session gets its memory: at once, or at the hand-over of a [`PreparedSource`].
enum Run {
    Now(Arc<dyn PageReader>),
    Prepared {
        hand_over: oneshot::Receiver<quic::HandOver>,
        ready: oneshot::Sender<()>,
    },
}

/// The client endpoint and a connection to `opts.connect` (QUIC and mutual TLS done).
async fn open(opts: &SourceOptions) -> Result<(quic::Endpoint, quic::Connection), RoleError> {
    let tuning = quic::TransportTuning {
        rate_limit: opts.rate_limit.clone(),
        ..quic::TransportTuning::from_env_or_default()
    };
    let endpoint = quic::client_endpoint_tuned(
        unspecified_for(opts.connect),
        &opts.identity,
        opts.peer_cert.clone(),
        &tuning,
    )?;
    let conn = {
        // A stop during the connect ends it.
        let _stoppable = opts.stopper.watch(&endpoint);
        connect_retrying(&endpoint, opts.connect, opts.connect_timeout).await?
    };
    Ok((endpoint, conn))
}

/// Runs the session over `conn` to its end, with the progress reports and the stopper.
async fn drive(
    endpoint: quic::Endpoint,
    conn: quic::Connection,
    config: SourceConfig,
    run: Run,
    cx: Context,
) -> Result<SourceReport, RoleError> {
    let pages = config.layout.total_pages();
    let session = SourceSession::new(config);
    let pushed = session.push_tally();
    let _stoppable = cx.stopper.watch(&endpoint);
    let conns = crate::progress::Connections::new(&conn);
    let handed = Arc::new(AtomicBool::new(false));
    let sample = {
        let (conns, handed) = (conns.clone(), handed.clone());
        move || crate::Progress {
            handed_over: handed.load(Ordering::Relaxed),
            pushed: pushed.snapshot(),
            ..conns.sample(None, pages)
        }
    };
    // One sample at the switchover itself, not at the next tick.
    let on_handover = cx.progress.clone().map(|f| {
        let sample = sample.clone();
        Arc::new(move || {
            handed.store(true, Ordering::Relaxed);
            f(sample());
        }) as quic::OnHandover
    });
    let ticker = cx
        .progress
        .clone()
        .map(|f| crate::progress::spawn_ticker(f, sample.clone()));
    let stopper = cx.stopper.clone();
    let recovery = quic::SourceRecovery {
        endpoint: endpoint.clone(),
        addr: cx.addr,
        recover_timeout: cx.recover_timeout,
        stopped: Some(Arc::new(move || stopper.reason().is_some())),
        on_connection: Some(conns.follower()),
        on_handover,
    };
    let report = match run {
        Run::Now(memory) => {
            quic::run_source_recovering(conn, session, memory, Some(recovery)).await
        }
        Run::Prepared { hand_over, ready } => {
            quic::run_source_prepared(conn, session, hand_over, ready, Some(recovery)).await
        }
    };
    if let Some(t) = ticker {
        t.abort();
    }
    if let Some(f) = &cx.progress {
        // Before the closing handshake (about three probe timeouts): the pages are
        // all at the destination now.
        let mut last = sample();
        last.pages_stale = report.as_ref().ok().map(|r| r.pages_stale);
        f(last);
    }
    let report = report?;
    endpoint.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    Ok(report)
}

/// A migration whose connection, authentication and handshake are done while the VM still
/// runs: the VMM makes one before it pauses its vCPUs, then hands it the frozen memory and
/// the vCPU and device state ([`PreparedSource::send_with_state`],
/// [`PreparedSource::send_with_hints`]). What remains between the pause and the
/// destination's resume is then one message, the `VmState`, instead of QUIC's and TLS's
/// handshakes and faultline's `Hello`: a round trip and a half less downtime, more on a
/// path where the connect needs a retry.
///
/// While it waits the connection is kept up by keep-alives; if it is lost, the session
/// reconnects (within [`SourceOptions::recover_timeout`]) and repeats its handshake, as
/// before any switchover. The destination bounds the wait
/// ([`crate::DestOptions::hand_over_timeout`]). Dropping a `PreparedSource` without a send
/// ends the session: the destination is told and the VM stays here.
///
/// ```no_run
/// # fn demo(opts: vmm_shim::SourceOptions, layout: transport::Layout,
/// #         memory: std::sync::Arc<dyn transport::quic::PageReader>) -> Result<(), vmm_shim::RoleError> {
/// let prepared = vmm_shim::PreparedSource::connect(&layout, &opts)?; // the VM still runs
/// // ... pause the vCPUs, save their state ...
/// let state = vec![0u8; 64];
/// let report = prepared.send_with_state(memory, state)?;
/// # let _ = report; Ok(()) }
/// ```
pub struct PreparedSource {
    runtime: tokio::runtime::Runtime,
    task: tokio::task::JoinHandle<Result<SourceReport, RoleError>>,
    hand_over: oneshot::Sender<quic::HandOver>,
    pages: u64,
}

impl PreparedSource {
    /// Connects to `opts.connect` (retrying within [`SourceOptions::connect_timeout`]),
    /// authenticates both sides and runs faultline's handshake for a migration of
    /// `layout` with VM state, then returns while the session waits for the hand-over.
    /// Every failure of those steps (nobody listening, a certificate other than the pinned
    /// one, another layout or VM id at the destination, a busy destination) is returned
    /// here, before the caller has paused anything.
    pub fn connect(layout: &Layout, opts: &SourceOptions) -> Result<PreparedSource, RoleError> {
        let config = SourceConfig {
            push: opts.push,
            encoding: opts.encoding,
            // The memory is not frozen before the hand-over: nothing may be pushed early.
            early_push: false,
            state_later: true,
            ..SourceConfig::migrate(opts.vm_id.clone(), layout.clone())
        };
        let runtime = runtime()?;
        let (endpoint, conn) = runtime.block_on(open(opts))?;
        let (hand_over, hand_over_rx) = oneshot::channel();
        let (ready_tx, ready) = oneshot::channel();
        let run = Run::Prepared {
            hand_over: hand_over_rx,
            ready: ready_tx,
        };
        let mut task = runtime.spawn(drive(endpoint, conn, config, run, Context::of(opts)));
        // Either the session is ready for the hand-over, or it ended (with an error: it
        // cannot finish without the hand-over).
        // The task's result is taken where it completes: a finished JoinHandle must not
        // be polled again.
        let ended = runtime.block_on(async {
            tokio::select! {
                r = ready => match r {
                    Ok(()) => None,
                    // The session dropped `ready` unsent: it is ending; wait for its end.
                    Err(_) => Some((&mut task).await),
                },
                r = &mut task => Some(r),
            }
        });
        if let Some(r) = ended {
            return Err(match r {
                Ok(Err(e)) => e,
                Ok(Ok(_)) => RoleError::Transport(quic::DriverError::Abandoned),
                Err(e) => RoleError::Transport(quic::DriverError::Task(e.to_string())),
            });
        }
        Ok(PreparedSource {
            runtime,
            task,
            hand_over,
            pages: layout.total_pages(),
        })
    }

    /// Whether the session has already ended (it failed while waiting: the destination
    /// refused it or went away for longer than the recover timeout). A VMM may check this
    /// just before pausing; the send then returns the error.
    pub fn has_failed(&self) -> bool {
        self.task.is_finished()
    }

    /// Gives the migration up before the hand-over (the VMM decided not to migrate, or
    /// [`PreparedSource::has_failed`]): the destination is told and the VM stays here.
    /// Returns the session's error if it had already failed.
    pub fn abandon(self) -> Result<(), RoleError> {
        let PreparedSource {
            runtime,
            task,
            hand_over,
            ..
        } = self;
        drop(hand_over);
        match runtime.block_on(task) {
            Ok(Ok(_)) | Ok(Err(RoleError::Transport(quic::DriverError::Abandoned))) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(RoleError::Transport(quic::DriverError::Task(e.to_string()))),
        }
    }

    /// Hands over the frozen `memory` (paused from now until this returns) and the VMM's
    /// vCPU and device state, and runs the migration as [`send_with_state`] does.
    pub fn send_with_state(
        self,
        memory: Arc<dyn PageReader>,
        vm_state: Vec<u8>,
    ) -> Result<SourceReport, RoleError> {
        self.finish(quic::HandOver {
            reader: memory,
            vm_state,
            hot: Vec::new(),
            zero_filled: None,
        })
    }

    /// [`PreparedSource::send_with_state`] with the guest agent's hints, as
    /// [`send_with_hints`] uses them.
    pub fn send_with_hints(
        self,
        memory: Arc<dyn PageReader>,
        vm_state: Vec<u8>,
        plan: &crate::hints::HintPlan,
    ) -> Result<crate::hints::HintedReport, RoleError> {
        let (memory, hot_set, skip) = apply_plan(memory, self.pages, plan);
        let report = self.finish(quic::HandOver {
            reader: memory,
            vm_state,
            hot: plan.hot.clone(),
            zero_filled: skip.clone(),
        })?;
        Ok(hinted(report, &hot_set, skip.as_ref()))
    }

    fn finish(self, h: quic::HandOver) -> Result<SourceReport, RoleError> {
        let PreparedSource {
            runtime,
            task,
            hand_over,
            ..
        } = self;
        // A session that already ended returns its error below.
        let _ = hand_over.send(h);
        match runtime.block_on(task) {
            Ok(r) => r,
            Err(e) => Err(RoleError::Transport(quic::DriverError::Task(e.to_string()))),
        }
    }
}

/// The wildcard address of `peer`'s family, port 0: where a client endpoint binds.
pub(crate) fn unspecified_for(peer: SocketAddr) -> SocketAddr {
    match peer {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    }
}

/// A destination may still be starting; retry timed-out connects until `timeout`, which
/// bounds the whole connect (an attempt to a port nobody listens on would otherwise wait
/// for QUIC's idle timeout). TLS failures (wrong certificate) are final and returned at
/// once.
async fn connect_retrying(
    endpoint: &quic::Endpoint,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<quic::Connection, RoleError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, quic::connect(endpoint, addr)).await {
            Err(_) => return Err(RoleError::ConnectTimeout { addr, timeout }),
            Ok(Ok(c)) => return Ok(c),
            Ok(Err(quic::DriverError::Connection(quinn::ConnectionError::TimedOut))) => {
                tokio::time::sleep_until(
                    deadline.min(tokio::time::Instant::now() + Duration::from_millis(100)),
                )
                .await;
            }
            Ok(Err(e)) => return Err(e.into()),
        }
    }
}

/// [`send_with_state`] (or [`send`] without a state blob) using the guest agent's hints
/// (see [`crate::hints`]): the push sends `plan.hot` first, then the rest in the normal
/// order, and the pages of `plan.skip_free` cross as zero pages without their content.
/// The report counts the hot pages pushed first and the free pages skipped.
///
/// With skipped pages the destination ends with the source's memory **with those pages
/// zeroed**; `plan.skip_free` must come from [`crate::hints::skippable_free`], which only
/// allows it for free pages the guest cannot tell apart from zeros.
pub fn send_with_hints(
    memory: Arc<dyn PageReader>,
    layout: &Layout,
    opts: &SourceOptions,
    vm_state: Option<Vec<u8>>,
    plan: &crate::hints::HintPlan,
) -> Result<crate::hints::HintedReport, RoleError> {
    let (memory, hot_set, skip) = apply_plan(memory, layout.total_pages(), plan);
    let config = SourceConfig {
        push: opts.push,
        encoding: opts.encoding,
        early_push: opts.early_push,
        vm_state,
        hot: plan.hot.clone(),
        zero_filled: skip.clone(),
        ..SourceConfig::migrate(opts.vm_id.clone(), layout.clone())
    };
    let report = run_session(memory, config, opts)?;
    Ok(hinted(report, &hot_set, skip.as_ref()))
}

/// The hot pages of `plan`, and its free pages to skip (if they fit the layout) with the
/// reader that serves them as zeros.
fn apply_plan(
    memory: Arc<dyn PageReader>,
    pages: u64,
    plan: &crate::hints::HintPlan,
) -> (Arc<dyn PageReader>, Bitmap, Option<Bitmap>) {
    let mut hot_set = Bitmap::new(pages);
    for r in &plan.hot {
        for p in r.start..r.end.min(pages) {
            hot_set.set(p);
        }
    }
    let skip = plan
        .skip_free
        .as_ref()
        .filter(|s| s.count_ones() > 0 && s.len() == pages)
        .cloned();
    let memory: Arc<dyn PageReader> = match &skip {
        Some(s) => Arc::new(crate::hints::SkipFreeReader::new(memory, s.clone())),
        None => memory,
    };
    (memory, hot_set, skip)
}

fn hinted(
    report: SourceReport,
    hot_set: &Bitmap,
    skip: Option<&Bitmap>,
) -> crate::hints::HintedReport {
    crate::hints::HintedReport {
        pages_pushed_hot: report.pages_pushed_hot,
        session: report,
        pages_hot: hot_set.count_ones(),
        pages_skipped_free: skip.map_or(0, |s| s.count_ones()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nobody listens: the prepared connect fails by itself (the VMM has paused nothing
    /// yet), with an error that names the address.
    #[test]
    fn a_prepared_connect_to_nobody_fails_naming_the_address() {
        let id = Identity::generate("source").unwrap();
        let addr = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .unwrap();
        let mut opts = SourceOptions::new(addr, id, CertificateDer::from(vec![1, 2, 3]), "vm");
        opts.connect_timeout = Duration::from_millis(300);
        let e = match PreparedSource::connect(&Layout::single(1 << 20), &opts) {
            Err(e) => e,
            Ok(_) => panic!("connected to nobody"),
        };
        assert!(
            matches!(e, RoleError::ConnectTimeout { addr: a, .. } if a == addr),
            "{e:?}"
        );
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
    }
}
