//! The source role: serves a frozen memory image to one destination.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use transport::encoding::EncodingPolicy;
use transport::proto::{SourceConfig, SourceSession};
use transport::quic::{self, PageReader, SourceReport};
use transport::tls::{CertificateDer, Identity};
use transport::Layout;

use crate::dest::runtime;
use crate::error::RoleError;

/// Where the source connects and how it authenticates.
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
    /// Called about ten times a second while the session runs, and once when it ends
    /// (also on failure), with the bytes sent and received (see [`crate::Progress`]).
    pub progress: Option<crate::ProgressFn>,
    /// A lost connection pauses the session and the source reconnects (overlapping attempts)
    /// (docs/recovery.md); with a limit, the session fails once the connection has been
    /// down this long. `None`: no limit.
    pub recover_timeout: Option<Duration>,
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
    let pages = config.layout.total_pages();
    let session = SourceSession::new(config);
    let rt = runtime()?;
    rt.block_on(async {
        let endpoint = quic::client_endpoint(
            unspecified_for(opts.connect),
            &opts.identity,
            opts.peer_cert.clone(),
        )?;
        let _stoppable = opts.stopper.watch(&endpoint);
        let conn = connect_retrying(&endpoint, opts.connect, opts.connect_timeout).await?;
        let conns = crate::progress::Connections::new(&conn);
        let handed = Arc::new(AtomicBool::new(false));
        let sample = {
            let (conns, handed) = (conns.clone(), handed.clone());
            move || crate::Progress {
                handed_over: handed.load(Ordering::Relaxed),
                ..conns.sample(None, pages)
            }
        };
        // One sample at the switchover itself, not at the next tick.
        let on_handover = opts.progress.clone().map(|f| {
            let sample = sample.clone();
            Arc::new(move || {
                handed.store(true, Ordering::Relaxed);
                f(sample());
            }) as quic::OnHandover
        });
        let ticker = opts
            .progress
            .clone()
            .map(|f| crate::progress::spawn_ticker(f, sample.clone()));
        let stopper = opts.stopper.clone();
        let recovery = quic::SourceRecovery {
            endpoint: endpoint.clone(),
            addr: opts.connect,
            recover_timeout: opts.recover_timeout,
            stopped: Some(Arc::new(move || stopper.reason().is_some())),
            on_connection: Some(conns.follower()),
            on_handover,
        };
        let report = quic::run_source_recovering(conn, session, memory, Some(recovery)).await;
        if let Some(t) = ticker {
            t.abort();
        }
        if let Some(f) = &opts.progress {
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
    })
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
    let pages = layout.total_pages();
    let mut hot_set = transport::bitmap::Bitmap::new(pages);
    for r in &plan.hot {
        for p in r.start..r.end.min(pages) {
            hot_set.set(p);
        }
    }
    let skip = plan
        .skip_free
        .as_ref()
        .filter(|s| s.count_ones() > 0 && s.len() == pages);
    let memory: Arc<dyn PageReader> = match skip {
        Some(s) => Arc::new(crate::hints::SkipFreeReader::new(memory, s.clone())),
        None => memory,
    };
    let config = SourceConfig {
        push: opts.push,
        encoding: opts.encoding,
        early_push: opts.early_push,
        vm_state,
        hot: plan.hot.clone(),
        zero_filled: skip.cloned(),
        ..SourceConfig::migrate(opts.vm_id.clone(), layout.clone())
    };
    let report = run_session(memory, config, opts)?;
    Ok(crate::hints::HintedReport {
        pages_pushed_hot: report.pages_pushed_hot,
        session: report,
        pages_hot: hot_set.count_ones(),
        pages_skipped_free: skip.map_or(0, |s| s.count_ones()),
    })
}
