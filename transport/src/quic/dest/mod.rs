//! Destination driver: checks the handshake, forwards demand requests, hands page data to a
//! [`PageSink`] and ends the session once the sink holds every page.
//!
//! One session runs in four steps ([`run_dest`]): accept the source's streams, the
//! handshake, the run, the teardown. The control loop ([`Driver`]) is the only consumer of
//! the session's events; the urgent and bulk streams each have a reader task of their own
//! ([`receive`]), so a demand reply never waits behind pushed pages, and demand requests
//! from the fault loop go out from a third.

mod receive;
mod report;

pub use report::{DecodeStats, DestReport};

use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::{Connection, RecvStream, SendStream, VarInt};
use thiserror::Error;
use tokio::sync::{mpsc, Notify};
use tokio::task::{JoinHandle, JoinSet};

use super::accept::Acceptor;
use super::frame::{read_frame, FrameError};
use super::link::{ControlReader, Link, Shared};
use super::read_ahead::ReadAhead;
use super::recovery::{lost, silent_for, Pauses};
use super::{
    close_with, closed_or, connection_lost, read_tag, DriverError, CLOSE_OK, RECONNECTING,
    REPLICATION_STOPPED, TAG_BULK, TAG_CONTROL, TAG_URGENT,
};
use crate::bitmap::Bitmap;
use crate::message::{Message, Pages, SessionKind};
use crate::proto::{Channel, DestEvent, DestSession, SessionState};
use receive::{echo_requests, forward_requests, receive_pages, EchoReader, Frames, Received};

/// Installing page data failed; the session ends with this reason.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct SinkError(pub String);

/// Where the destination driver puts page data: guest memory, through userfaultfd in
/// faultline, or anything else in tests. Pages arrive already checked against the layout.
/// The replica methods matter only on a standby; a plain destination keeps the defaults,
/// which refuse replication and evacuation sessions.
pub trait PageSink: Send + Sync + 'static {
    /// Installs `pages`, which arrived on `channel` (urgent replies or the bulk push).
    fn install(&self, pages: &Pages, channel: Channel) -> Result<(), SinkError>;
    /// Whether every page of guest memory is present.
    fn is_complete(&self) -> bool;

    /// Copies page `page` into `out` (one page) if this side holds it, to resolve a content
    /// reference; the content is verified by the caller. The default holds nothing, so
    /// references are fetched again on demand.
    fn read_page(&self, page: u64, out: &mut [u8]) -> bool {
        let _ = (page, out);
        false
    }

    /// A `Replicate` or `Evacuate` session starts with replication epoch `epoch`: the pages
    /// the local replica cannot serve at that epoch.
    fn invalid_pages(&self, kind: SessionKind, epoch: u64) -> Result<Bitmap, SinkError> {
        let _ = epoch;
        Err(SinkError(format!(
            "this destination has no replica and cannot take a {kind:?} session"
        )))
    }

    /// Evacuation: every page in `stale` must come from the source. Make them absent and get
    /// ready to install them; the guest resumes when this returns.
    fn prepare_stale(&self, stale: &Bitmap) -> Result<(), SinkError> {
        let _ = stale;
        Err(SinkError("this destination has no replica".into()))
    }

    /// Replication: stores page contents at their versions.
    fn store(&self, pages: &Pages, versions: &[u64]) -> Result<(), SinkError> {
        let _ = (pages, versions);
        Err(SinkError("this destination has no replica".into()))
    }

    /// Replication: makes everything stored so far durable and returns the (page, version)
    /// pairs to acknowledge.
    fn sync(&self) -> Result<Vec<(u64, u64)>, SinkError> {
        Ok(Vec::new())
    }
}

/// Called once the handshake is accepted, with the VM id and the VM state the source sent
/// (if any): the place to restore vCPUs and resume the guest.
pub type OnEstablished = Box<dyn FnOnce(&str, Option<&[u8]>) + Send>;

/// What the application hooks into a destination session.
#[derive(Default)]
pub struct DestHooks {
    /// Called once the handshake is accepted, with the VM id and the VM state the source
    /// sent (if any): the place to restore vCPUs and resume the guest. Not called for a
    /// replication session.
    pub on_established: Option<OnEstablished>,
}

/// The destination's half of a session on one connection, shared by its tasks.
struct Dest {
    link: Link<DestSession>,
    sink: Arc<dyn PageSink>,
    /// Woken when pages arrived: the sink may be complete, or have something to acknowledge.
    progress: Notify,
    /// Shared by every connection of the session.
    counts: Arc<Received>,
}

/// The fault loop's requests, taken by the forwarder of the current connection (or, while
/// paused, by the wait for the next one).
type SharedRequests = Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Vec<u64>>>>;

/// Runs the destination side of one migration over an accepted connection. Demand requests
/// arrive on `requests` (from the fault loop); the session ends when `sink` is complete. A
/// lost connection ends the session with an error ([`run_dest_recovering`] resumes it).
pub async fn run_dest(
    conn: Connection,
    session: DestSession,
    sink: Arc<dyn PageSink>,
    requests: mpsc::UnboundedReceiver<Vec<u64>>,
    hooks: DestHooks,
) -> Result<DestReport, DriverError> {
    let recovery = DestRecovery::default();
    run_dest_recovering(conn, session, sink, requests, hooks, recovery).await
}

/// Where a destination takes the connections that resume its session, and for how long it
/// waits for one.
#[derive(Default)]
pub struct DestRecovery<'a> {
    /// The listener's acceptor. While a session runs (or is paused) every authenticated
    /// connection it hands over is screened: one that belongs to this session (the session
    /// id in its `Hello`) resumes it, whatever address it comes from. Any other is closed as
    /// busy during a migration or evacuation; during a replication it is held, and handed
    /// back to the acceptor (its next [`Acceptor::next`]) once the replication ends (or at
    /// once if it is paused: replication never hands the VM over, so another session may
    /// take its place). `None`: a lost connection ends the session with an error.
    pub incoming: Option<&'a mut Acceptor>,
    /// Fail once the connection has been down this long; `None`: wait for ever.
    pub recover_timeout: Option<Duration>,
    /// Called with each new connection before the session resumes on it.
    pub on_connection: Option<super::OnConnection>,
    /// How long a connection may wait, after its handshake, for the source's VM state (a
    /// source that connects before it pauses its VM sends it only then): past it the
    /// session fails with [`DriverError::HandOverTimeout`] and the source is told.
    /// Keep-alives hold the connection meanwhile. `None`: no bound.
    pub hand_over_timeout: Option<Duration>,
}

/// What a destination tells an authenticated peer of another session.
pub const BUSY_REASON: &str = "this side is already in a migration session";

/// [`run_dest`] for a session that outlives its connection (docs/recovery.md): when the
/// connection is lost (not when the source closes it with an error), the session pauses, the
/// guest keeps running and its demand requests queue in the session; the next connection of
/// the same session from `recovery.incoming` resumes it. A replication session resumes the
/// same way, with a fresh handshake (the replica's invalid pages again); it ends when its
/// replicator closes it, or when another session's connection arrives while it is paused
/// (that connection goes back to the acceptor for the caller's next session).
///
/// `conn` may be a connection that [`Acceptor::next`] returned after an earlier session
/// handed it back (its streams open, its `Hello` read): pass the same acceptor in
/// `recovery.incoming`.
pub async fn run_dest_recovering(
    conn: Connection,
    session: DestSession,
    sink: Arc<dyn PageSink>,
    requests: mpsc::UnboundedReceiver<Vec<u64>>,
    hooks: DestHooks,
    recovery: DestRecovery<'_>,
) -> Result<DestReport, DriverError> {
    let mut incoming = recovery.incoming;
    let opened = incoming
        .as_mut()
        .and_then(|a| a.claim(&conn))
        .and_then(|c| c.opened);
    let mut screen = Screen {
        incoming,
        recover_timeout: recovery.recover_timeout,
        screens: JoinSet::new(),
        pending: None,
        replicating: false,
        hand_over_timeout: recovery.hand_over_timeout,
    };
    let first = Candidate { conn, opened };
    let result = run_session(
        first,
        session,
        sink,
        requests,
        hooks,
        recovery.on_connection,
        &mut screen,
    )
    .await;
    screen.hand_back().await;
    result
}

/// [`run_dest_recovering`] once the screen is set up.
async fn run_session(
    first: Candidate,
    session: DestSession,
    sink: Arc<dyn PageSink>,
    requests: mpsc::UnboundedReceiver<Vec<u64>>,
    hooks: DestHooks,
    on_connection: Option<super::OnConnection>,
    screen: &mut Screen<'_>,
) -> Result<DestReport, DriverError> {
    let mut across = Across {
        session: Arc::new(std::sync::Mutex::new(session)),
        sink,
        requests: Arc::new(tokio::sync::Mutex::new(requests)),
        counts: Arc::new(Received::default()),
        started: Instant::now(),
        report: DestReport::default(),
        on_established: std::sync::Mutex::new(hooks.on_established),
        vm_state: None,
        pauses: Pauses::default(),
        wire_bytes: 0,
    };
    let mut next = first;
    loop {
        let conn = next.conn.clone();
        let ended = run_connection(next, &mut across, screen).await;
        across.wire_bytes += {
            let s = conn.stats();
            s.udp_tx.bytes + s.udp_rx.bytes
        };
        let e = match ended {
            Ok(Ended::Finished) => {
                conn.close(VarInt::from_u32(CLOSE_OK), b"migration complete");
                let mut report = std::mem::take(&mut across.report);
                across.pauses.finish();
                across.fill(&mut report);
                report.wire_bytes = across.wire_bytes;
                report.closed(across.started.elapsed().as_millis() as u64);
                return Ok(report);
            }
            Ok(Ended::Superseded(candidate)) => {
                tracing::info!(
                    peer = %candidate.conn.remote_address(),
                    "the source reconnected before this side saw the connection fail"
                );
                conn.close(VarInt::from_u32(CLOSE_OK), b"superseded");
                across.pauses.lost();
                next = *candidate;
                if let Some(f) = &on_connection {
                    f(&next.conn);
                }
                across.pauses.connected();
                across.session().resume();
                continue;
            }
            Err(e) => super::recovery::settle(&conn, e).await,
        };
        let resumable = screen.incoming.is_some() && lost(&e) && {
            let s = across.session();
            !matches!(
                s.session_state(),
                SessionState::Failed | SessionState::Completed
            )
        };
        if !resumable {
            close_with(&conn, &e);
            return Err(across.vm_lost(e));
        }
        let (guest_runs, missing, replicating) = {
            let s = across.session();
            (
                s.guest_may_run(),
                s.total_pages() - s.held().count_ones(),
                s.kind() == SessionKind::Replicate,
            )
        };
        if replicating {
            tracing::warn!(
                error = %crate::chain(&e),
                "the connection to the replicator was lost; the replication pauses and waits \
                 for it (the replica keeps what it stored)"
            );
        } else if guest_runs && missing > 0 {
            tracing::warn!(
                error = %crate::chain(&e),
                pages_missing = missing,
                vulnerability_ms = across.ms().saturating_sub(across.report.established_ms),
                "the connection to the source was lost after switchover: the guest runs on \
                 here, but pages it lacks are only at the source; the session pauses and \
                 waits for the source (if it is gone, the VM is lost: --recover-timeout \
                 bounds the wait)"
            );
        } else if guest_runs {
            tracing::warn!(
                error = %crate::chain(&e),
                "the connection to the source was lost; every page is here, the guest runs on"
            );
        } else {
            tracing::warn!(
                error = %crate::chain(&e),
                "the connection to the source was lost before switchover: nothing runs here; \
                 waiting for the source"
            );
        }
        conn.close(VarInt::from_u32(CLOSE_OK), RECONNECTING);
        across.session().connection_lost();
        across.pauses.lost_since(silent_for(&e));
        let done = across.session().complete_sent() && across.sink.is_complete();
        next = match screen.wait(&across, done).await {
            Ok(Waited::Resume(candidate)) => *candidate,
            Ok(Waited::Ended) => {
                // Every page is here and the source was told so: a source that finished
                // does not come back, and the guest needs nothing more from it. Or another
                // session takes the place of a paused replication.
                tracing::info!("the paused session ends without its source");
                let mut report = std::mem::take(&mut across.report);
                across.pauses.finish();
                across.fill(&mut report);
                report.wire_bytes = across.wire_bytes;
                report.closed(across.started.elapsed().as_millis() as u64);
                return Ok(report);
            }
            Err(e) => return Err(across.vm_lost(e)),
        };
        if let Some(f) = &on_connection {
            f(&next.conn);
        }
        across.pauses.connected();
        across.session().resume();
    }
}

/// What the connections of one destination session share.
struct Across {
    session: Shared<DestSession>,
    sink: Arc<dyn PageSink>,
    requests: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Vec<u64>>>>,
    counts: Arc<Received>,
    started: Instant,
    report: DestReport,
    /// Behind a lock only so that `Across` may be shared while a paused session waits.
    on_established: std::sync::Mutex<Option<OnEstablished>>,
    /// The VM state the source sent, for the `on_established` hook.
    vm_state: Option<Vec<u8>>,
    pauses: Pauses,
    /// UDP bytes of the connections that ended.
    wire_bytes: u64,
}

impl Across {
    fn session(&self) -> std::sync::MutexGuard<'_, DestSession> {
        self.session.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// A failure while the guest runs here and pages are still missing: the VM is lost,
    /// and the error says so (docs/recovery.md, semantics).
    fn vm_lost(&self, e: DriverError) -> DriverError {
        let missing = {
            let s = self.session();
            if !s.guest_may_run() || s.is_finished() || self.sink.is_complete() {
                return e;
            }
            s.total_pages() - s.held().count_ones()
        };
        if missing == 0 || matches!(e, DriverError::VmLost { .. }) {
            return e;
        }
        DriverError::VmLost {
            vulnerability_ms: self.ms().saturating_sub(self.report.established_ms),
            pages_missing: Some(missing),
            cause: Box::new(e),
        }
    }

    /// The counts of the whole session, into `report`.
    fn fill(&self, report: &mut DestReport) {
        let stats = self.session().stats();
        report.outages = self.pauses.outages(
            stats.pauses,
            stats.pages_duplicate * crate::PAGE_SIZE as u64,
        );
    }
}

/// A connection to run the session on, with its streams already opened and its first
/// message (the `Hello`) read if it was screened.
pub(super) struct Candidate {
    pub(super) conn: Connection,
    opened: Option<(Streams, Message)>,
}

/// How a paused session's wait ended.
enum Waited {
    /// A connection of this session came: it resumes.
    Resume(Box<Candidate>),
    /// The session ends without its source: every page is here (and the source was told),
    /// or another session's connection came while a replication was paused.
    Ended,
}

/// How one connection ended without an error.
enum Ended {
    Finished,
    /// A new connection of this session arrived while this one still looked up.
    Superseded(Box<Candidate>),
}

/// Screens the connections the listener hands over while a session runs or is paused.
struct Screen<'a> {
    incoming: Option<&'a mut Acceptor>,
    recover_timeout: Option<Duration>,
    /// Connections being screened, each in a task of its own.
    screens: JoinSet<Option<Candidate>>,
    /// Another session's connection that came during a replication: it waits for the
    /// replication to end (or to pause), then goes back to the acceptor.
    pending: Option<Candidate>,
    /// The session is a replication (known once its handshake is done).
    replicating: bool,
    /// [`DestRecovery::hand_over_timeout`].
    hand_over_timeout: Option<Duration>,
}

impl Screen<'_> {
    /// The next connection from the listener; never while there is no listener, and `None`
    /// once it closed (the endpoint was closed: a stop).
    async fn next_incoming(incoming: &mut Option<&mut Acceptor>) -> Option<Connection> {
        match incoming.as_mut() {
            Some(a) => a.next().await,
            None => std::future::pending().await,
        }
    }

    /// The next connection that passed its screening; never while none is being screened.
    /// One that failed (its task logged why) is passed over here: were it handed to a
    /// `select!` as `None`, that branch would sleep until another branch woke the loop,
    /// and a good connection screened just after it would wait as long (a reconnecting
    /// source's overlapping attempts end that way: the loser fails, the winner follows).
    async fn next_screened(screens: &mut JoinSet<Option<Candidate>>) -> Candidate {
        loop {
            match screens.join_next().await {
                Some(Ok(Some(c))) => return c,
                Some(_) => {}
                None => return std::future::pending().await,
            }
        }
    }

    /// Opens a new connection's streams and reads its first message in a task of its own,
    /// so a slow or silent peer holds nothing up.
    fn screen(screens: &mut JoinSet<Option<Candidate>>, conn: Connection) {
        screens.spawn(async move {
            let opened = async {
                let mut streams = accept_streams(&conn).await?;
                let first = tokio::time::timeout(
                    Duration::from_secs(10),
                    read_frame(&mut streams.control.1),
                )
                .await
                .map_err(|_| DriverError::Timeout("waiting for a new connection's Hello"))?;
                match first {
                    Ok(Some(msg)) => Ok((streams, msg)),
                    Ok(None) => Err(closed_or(&conn, "the peer closed the control stream")),
                    Err(e) => Err(DriverError::Stream {
                        channel: Channel::Control,
                        source: e,
                    }),
                }
            }
            .await;
            match opened {
                Ok(opened) => Some(Candidate {
                    conn,
                    opened: Some(opened),
                }),
                Err(e) => {
                    tracing::warn!(peer = %conn.remote_address(), error = %crate::chain(&e),
                        "dropped a new connection");
                    close_with(&conn, &e);
                    None
                }
            }
        });
    }

    /// Whether `c` belongs to the session: its `Hello` names the session's id, or the
    /// session has none yet.
    fn ours(session: &DestSession, c: &Candidate) -> bool {
        let id = session.session_id();
        // Before the guest ran here and while nothing arrived, a source that restarted (with
        // a session of its own) may start over: nothing here is its predecessor's.
        let fresh = session.kind() != SessionKind::Replicate
            && !session.guest_may_run()
            && session.received().count_ones() == 0;
        matches!(&c.opened, Some((_, Message::Hello { session_id, .. }))
            if id == 0 || *session_id == id || fresh)
    }

    /// A connection of another session: held during a replication (see
    /// [`DestRecovery::incoming`]; a connection held before is told this side is busy),
    /// else closed as busy.
    fn other(&mut self, kind: SessionKind, c: Candidate) {
        if kind == SessionKind::Replicate {
            tracing::info!(peer = %c.conn.remote_address(),
                "another session waits for the replication to end or pause");
            self.replicating = true;
            if let Some(older) = self.pending.replace(c) {
                busy(&older);
            }
        } else {
            busy(&c);
        }
    }

    /// Waits, paused, for a connection of this session while the fault loop's requests
    /// queue in the session. [`Waited::Ended`] when `done` (every page is here and the
    /// source was told) and no connection came within a grace period, or when another
    /// session's connection is waiting for a paused replication.
    async fn wait(&mut self, across: &Across, done: bool) -> Result<Waited, DriverError> {
        let kind = across.session().kind();
        if kind == SessionKind::Replicate && self.pending.is_some() {
            return Ok(Waited::Ended);
        }
        let paused_at = across.pauses.paused_since().unwrap_or_else(Instant::now);
        let limit = match (self.recover_timeout, done) {
            (Some(t), true) => Some(t.min(DONE_GRACE)),
            (None, true) => Some(DONE_GRACE),
            (t, false) => t,
        };
        let deadline = limit.map(|t| tokio::time::Instant::from_std(paused_at + t));
        let mut requests_open = true;
        loop {
            tokio::select! {
                conn = Self::next_incoming(&mut self.incoming) => match conn {
                    Some(conn) => Self::screen(&mut self.screens, conn),
                    None => return Err(DriverError::Stopped),
                },
                c = Self::next_screened(&mut self.screens) => {
                    if Self::ours(&across.session(), &c) {
                        return Ok(Waited::Resume(Box::new(c)));
                    }
                    self.other(kind, c);
                    if self.pending.is_some() {
                        return Ok(Waited::Ended);
                    }
                }
                batch = async { across.requests.lock().await.recv().await }, if requests_open => {
                    match batch {
                        Some(pages) => across.session().request(&pages),
                        None => requests_open = false,
                    }
                }
                _ = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                } => {
                    if done {
                        return Ok(Waited::Ended);
                    }
                    let limit = limit.unwrap_or_default();
                    return Err(super::recovery::recover_timeout(limit, paused_at));
                }
            }
        }
    }

    /// The session ended: a connection of another session that waited for it (and any
    /// still being screened, given a few seconds) goes back to the acceptor for the next
    /// session. Only a replication holds such connections.
    async fn hand_back(&mut self) {
        if !self.replicating {
            return;
        }
        if self.pending.is_some() || !self.screens.is_empty() {
            let settle = async {
                while let Some(joined) = self.screens.join_next().await {
                    if let Ok(Some(c)) = joined {
                        if let Some(older) = self.pending.replace(c) {
                            busy(&older);
                        }
                    }
                }
            };
            let _ = tokio::time::timeout(SETTLE, settle).await;
            self.screens.abort_all();
        }
        if let (Some(c), Some(a)) = (self.pending.take(), self.incoming.as_mut()) {
            tracing::info!(peer = %c.conn.remote_address(), "the next session takes over");
            a.hand_back(c);
        }
    }
}

/// How long a replication that ended waits for connections still being screened.
const SETTLE: Duration = Duration::from_secs(5);

/// Tells the peer of `c` that this side is in another session.
fn busy(c: &Candidate) {
    tracing::info!(peer = %c.conn.remote_address(), "refused a peer: {BUSY_REASON}");
    c.conn.close(
        VarInt::from_u32(crate::message::ErrorCode::Busy as u32),
        BUSY_REASON.as_bytes(),
    );
}

/// The crash points of a `Hello` that arrived and is not answered yet: `dest-hello-migrate`,
/// `dest-hello-replicate`, `dest-hello-evacuate` (see [`crate::crash`]).
fn crash_at_hello(msg: &Message) {
    if let Message::Hello { kind, .. } = msg {
        crate::crash_point(match kind {
            SessionKind::Migrate => "dest-hello-migrate",
            SessionKind::Replicate => "dest-hello-replicate",
            SessionKind::Evacuate => "dest-hello-evacuate",
        });
    }
}

/// How long a destination that holds every page waits for the source to come back and
/// acknowledge it.
const DONE_GRACE: Duration = Duration::from_secs(30);

/// One connection of the session: the streams, the handshake (or the resume handshake),
/// the run.
async fn run_connection(
    next: Candidate,
    across: &mut Across,
    screen: &mut Screen<'_>,
) -> Result<Ended, DriverError> {
    let Candidate { conn, opened } = next;
    let (streams, first) = match opened {
        Some((streams, hello)) => (streams, Some(hello)),
        None => (accept_streams(&conn).await?, None),
    };
    let watch = screen.incoming.is_some();
    let (mut driver, mut readers) = Driver::new(&conn, across, streams);
    // A session that can resume notices a cut within seconds, not at the idle timeout.
    let _watchdog = watch.then(|| driver.link().watch_silence());
    if let Some(hello) = first {
        crash_at_hello(&hello);
        driver.link().handle(Channel::Control, hello).await?;
        driver.on_events().await?;
    }
    driver
        .handshake(&mut readers.bulk, screen.hand_over_timeout)
        .await?;
    screen.replicating = driver.kind() == SessionKind::Replicate;
    driver.run(readers, screen).await
}

/// The streams the source opens, by their tags.
struct Streams {
    control: (SendStream, RecvStream),
    urgent: (SendStream, RecvStream),
    bulk: RecvStream,
}

/// Accepts the source's three streams (within 30 s) and tells them apart by their tags.
async fn accept_streams(conn: &Connection) -> Result<Streams, DriverError> {
    let accept = async {
        let mut control = None;
        let mut urgent = None;
        for _ in 0..2 {
            let (send, mut recv) = conn.accept_bi().await.map_err(connection_lost)?;
            match read_tag(&mut recv).await? {
                TAG_CONTROL => control = Some((send, recv)),
                TAG_URGENT => urgent = Some((send, recv)),
                other => return Err(DriverError::UnknownStream(other)),
            }
        }
        let mut bulk = conn.accept_uni().await.map_err(connection_lost)?;
        match read_tag(&mut bulk).await? {
            TAG_BULK => {}
            other => return Err(DriverError::UnknownStream(other)),
        }
        let (Some(control), Some(urgent)) = (control, urgent) else {
            return Err(DriverError::UnknownStream(0));
        };
        Ok(Streams {
            control,
            urgent,
            bulk,
        })
    };
    tokio::time::timeout(Duration::from_secs(30), accept)
        .await
        .map_err(|_| DriverError::Timeout("waiting for the source to open its streams"))?
}

/// The streams the page readers take over once the session runs.
struct Readers {
    urgent: RecvStream,
    /// Read from the start: the source may push before the session runs.
    bulk: ReadAhead,
}

/// The control loop of one connection: it reads the control stream, acts on every session
/// event, and decides when the session is over.
struct Driver<'a> {
    dest: Arc<Dest>,
    control: ControlReader,
    /// The first failure of a reader task.
    failures: mpsc::UnboundedReceiver<DriverError>,
    st: &'a mut Across,
}

impl<'a> Driver<'a> {
    fn new(conn: &Connection, st: &'a mut Across, streams: Streams) -> (Driver<'a>, Readers) {
        let Streams {
            control: (ctl_send, ctl_recv),
            urgent: (urg_send, urg_recv),
            bulk,
        } = streams;
        let (link, failures) =
            Link::new(conn.clone(), st.session.clone(), ctl_send, Some(urg_send));
        let dest = Arc::new(Dest {
            link,
            sink: st.sink.clone(),
            progress: Notify::new(),
            counts: st.counts.clone(),
        });
        let driver = Driver {
            dest,
            control: ControlReader::start(ctl_recv),
            failures,
            st,
        };
        let readers = Readers {
            urgent: urg_recv,
            bulk: ReadAhead::start(bulk, BULK_READ_AHEAD),
        };
        (driver, readers)
    }

    fn link(&self) -> &Link<DestSession> {
        &self.dest.link
    }

    /// Reads control messages until the session runs (the source's `Hello`; for a standby
    /// also the stale set and the VM state; on a resumed connection the `ResumeAck`), then
    /// lets the guest resume if it has not yet. Nothing touches guest memory before the
    /// handshake is accepted.
    async fn handshake(
        &mut self,
        bulk: &mut ReadAhead,
        hand_over_timeout: Option<Duration>,
    ) -> Result<(), DriverError> {
        // When the wait for the VM state began (a prepared source's VM still runs there).
        let mut awaiting_since: Option<tokio::time::Instant> = None;
        while !matches!(
            self.link().session().session_state(),
            SessionState::Running | SessionState::Completed
        ) {
            let deadline = match (hand_over_timeout, self.link().session().awaits_vm_state()) {
                (Some(t), true) => {
                    Some(*awaiting_since.get_or_insert_with(tokio::time::Instant::now) + t)
                }
                _ => None,
            };
            let bound = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let read = tokio::select! {
                read = self.control.next() => read,
                Some(e) = self.failures.recv() => return Err(e),
                _ = bound => {
                    let t = hand_over_timeout.unwrap_or_default();
                    return Err(DriverError::HandOverTimeout(t));
                }
            };
            let Some(msg) = self.link().checked(Channel::Control, read).await? else {
                return Err(closed_or(
                    &self.link().conn,
                    "the source closed the control stream",
                ));
            };
            crash_at_hello(&msg);
            self.link().handle(Channel::Control, msg).await?;
            self.on_events().await?;
        }
        let kind = self.link().session().kind();
        if self.st.report.kind.is_none() {
            self.st.report.kind = Some(kind);
            self.st.report.established_ms = self.st.ms();
            self.st.report.early_push_bytes = bulk.held_bytes() as u64;
        }
        bulk.shrink_to(BULK_READ_AHEAD_RUNNING);
        if kind != SessionKind::Replicate {
            let hook = self
                .st
                .on_established
                .get_mut()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(f) = hook {
                f(&self.st.report.vm_id, self.st.vm_state.as_deref());
            }
        }
        Ok(())
    }

    /// The one place the session's events are acted on, in both the handshake and the run.
    async fn on_events(&mut self) -> Result<(), DriverError> {
        // Accepting a standby's session produces events of its own: drain until none is left.
        loop {
            let events = self.link().events();
            if events.is_empty() {
                return Ok(());
            }
            for ev in events {
                match ev {
                    DestEvent::HelloReceived { kind, epoch, .. } => {
                        let invalid = self.dest.sink.invalid_pages(kind, epoch)?;
                        self.link().session().accept(&invalid);
                        self.link().flush().await?;
                    }
                    DestEvent::StaleSet(stale) => {
                        self.st.report.pages_stale = stale.count_ones();
                        self.dest.sink.prepare_stale(&stale)?;
                    }
                    DestEvent::VmState(blob) => self.st.vm_state = Some(blob),
                    DestEvent::Established { vm_id, .. } => {
                        // A handshake that started over after a pause ends the pause too.
                        self.st.pauses.resumed();
                        self.st.report.vm_id = vm_id;
                    }
                    // Informational: from here on missing pages come on demand only.
                    DestEvent::PushDone { pages_sent } => {
                        tracing::debug!(pages_sent, "the source pushed every page")
                    }
                    // Informational: the run loop ends on `is_finished`, checked after
                    // every control message.
                    DestEvent::Finished => tracing::debug!("the source acknowledged completion"),
                    DestEvent::Paused { resumable } => {
                        tracing::debug!(resumable, "the session paused")
                    }
                    DestEvent::Resumed { conn_epoch } => {
                        self.st.pauses.resumed();
                        tracing::info!(conn_epoch, "the session runs again");
                    }
                }
            }
        }
    }

    /// Runs the session to its end with the page readers and the request forwarder beside
    /// the control loop, then stops them and completes the report.
    async fn run(
        mut self,
        readers: Readers,
        screen: &mut Screen<'_>,
    ) -> Result<Ended, DriverError> {
        let tasks = Tasks::spawn(&self.dest, readers, self.st.requests.clone());
        let outcome = match self.control_loop(screen).await {
            // A stream error may be the peer dropping the connection, its close on the
            // way: judged by the close, not closed over (see the source driver).
            Err(e) => Err(super::recovery::settle(&self.dest.link.conn, e).await),
            ok => ok,
        };
        if let Err(e) = &outcome {
            // Tell the peer why before the tasks stop and their streams end (see the
            // source driver); a lost connection tells nothing.
            if !lost(e) {
                close_with(&self.dest.link.conn, e);
            }
        }
        self.control.stop().await;
        tasks.stop().await;
        self.teardown()?;
        outcome
    }

    async fn control_loop(&mut self, screen: &mut Screen<'_>) -> Result<Ended, DriverError> {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let mut listening = true;
        loop {
            let screening = listening && screen.incoming.is_some();
            tokio::select! {
                read = self.control.next() => if self.on_control(read).await? {
                    return Ok(Ended::Finished);
                },
                Some(e) = self.failures.recv() => {
                    // A replication the source closed ends normally.
                    self.task_failed(e)?;
                    return Ok(Ended::Finished);
                }
                _ = self.dest.progress.notified() => {}
                _ = tick.tick() => {}
                conn = Screen::next_incoming(&mut screen.incoming), if screening => match conn {
                    Some(conn) => Screen::screen(&mut screen.screens, conn),
                    None => listening = false,
                },
                c = Screen::next_screened(&mut screen.screens) => {
                    if Screen::ours(&self.link().session(), &c) {
                        return Ok(Ended::Superseded(Box::new(c)));
                    }
                    screen.other(self.kind(), c);
                }
            }
            if self.link().session().is_finished() {
                return Ok(Ended::Finished);
            }
            self.after_progress().await?;
        }
    }

    fn kind(&self) -> SessionKind {
        self.st.report.kind.unwrap_or(SessionKind::Migrate)
    }

    /// Acts on one read of the control stream; `true` once the session is over.
    async fn on_control(
        &mut self,
        read: Result<Option<Message>, FrameError>,
    ) -> Result<bool, DriverError> {
        let conn = &self.dest.link.conn;
        let replicating = self.kind() == SessionKind::Replicate;
        if matches!(&read, Err(e) if !matches!(e, FrameError::Codec(_)))
            && replicating
            && conn.close_reason().is_some()
        {
            return end_of_replication(conn, self.kind(), "").map(|()| true);
        }
        let Some(msg) = self.link().checked(Channel::Control, read).await? else {
            // Every page is here and the source was told so: a source that hangs up
            // without waiting to acknowledge loses nothing.
            if self.link().session().complete_sent() && self.dest.sink.is_complete() {
                tracing::info!("the source closed before acknowledging completion");
                return Ok(true);
            }
            let what = "the source closed the control stream";
            return end_of_replication(conn, self.kind(), what).map(|()| true);
        };
        self.link().handle(Channel::Control, msg).await?;
        self.on_events().await?;
        Ok(self.link().session().is_finished())
    }

    /// A reader task failed. A replication session the source closed ends normally.
    fn task_failed(&self, e: DriverError) -> Result<(), DriverError> {
        let conn = &self.dest.link.conn;
        if self.kind() == SessionKind::Replicate && conn.close_reason().is_some() {
            return end_of_replication(conn, self.kind(), "");
        }
        Err(e)
    }

    /// After anything happened: a standby acknowledges what its replica made durable; a
    /// destination that holds every page tells the source.
    async fn after_progress(&mut self) -> Result<(), DriverError> {
        let sink = &self.dest.sink;
        if self.kind() == SessionKind::Replicate {
            // Acknowledge only what the replica made durable.
            let acks = sink.sync()?;
            if !acks.is_empty() {
                self.link().session().ack(&acks);
                self.link().flush().await?;
            }
            return Ok(());
        }
        if sink.is_complete() {
            let at = self.st.ms();
            let completes = {
                let mut s = self.dest.link.session();
                let completes = s.is_running() && !s.is_finished() && !s.complete_sent();
                if completes {
                    s.complete();
                }
                completes
            };
            if completes {
                self.st.report.present_at(at);
            }
            self.link().flush().await?;
        }
        Ok(())
    }

    /// With every task stopped: what arrived is made durable (replication) and counted.
    fn teardown(&mut self) -> Result<(), DriverError> {
        if self.kind() == SessionKind::Replicate {
            // Whatever arrived before the end is stored; make it durable too.
            self.dest.sink.sync()?;
        }
        let counts = &self.dest.counts;
        self.st.report.pages_replicated = counts.stored();
        self.st.report.decoded = DecodeStats {
            pages_lz4: counts.lz4(),
            pages_ref: counts.refs(),
            refs_refetched: counts.refetched(),
        };
        let received = self.link().session().received().count_ones();
        self.st.report.pages_received = received;
        Ok(())
    }
}

/// The tasks beside the control loop while the session runs.
struct Tasks {
    readers: [JoinHandle<()>; 2],
    requests: JoinHandle<()>,
    echo: JoinHandle<()>,
    /// The echo stream's reader, if the echo task opened the stream.
    echo_reader: EchoReader,
}

impl Tasks {
    fn spawn(dest: &Arc<Dest>, readers: Readers, requests: SharedRequests) -> Tasks {
        let read = |channel, frames| tokio::spawn(receive_pages(dest.clone(), channel, frames));
        let (echo_queue, echoes) = mpsc::unbounded_channel();
        let echo_reader = EchoReader::default();
        Tasks {
            readers: [
                read(Channel::Urgent, Frames::Stream(readers.urgent)),
                read(Channel::Bulk, Frames::Ahead(readers.bulk)),
            ],
            requests: tokio::spawn(forward_requests(dest.clone(), requests, echo_queue)),
            echo: tokio::spawn(echo_requests(dest.clone(), echoes, echo_reader.clone())),
            echo_reader,
        }
    }

    /// Stops every task for good (an install in progress finishes) before the counts are
    /// read.
    async fn stop(self) {
        self.requests.abort();
        self.echo.abort();
        for r in &self.readers {
            r.abort();
        }
        let _ = self.requests.await;
        // Only the echo task sets its reader: once it stopped, the slot holds the last word.
        let _ = self.echo.await;
        let echo_reader = self
            .echo_reader
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        for r in self.readers.into_iter().chain(echo_reader) {
            r.abort();
            let _ = r.await;
        }
    }
}

/// A replication session ends when the source hangs up normally (close code 0 with the
/// reason [`REPLICATION_STOPPED`], or its control stream ended without a close); for the
/// other kinds, and for any other close, the connection's end is an error. (A close with
/// code 0 and another reason is a source dropping the connection to reconnect: the
/// session pauses.)
fn end_of_replication(
    conn: &Connection,
    kind: SessionKind,
    what: &'static str,
) -> Result<(), DriverError> {
    if kind == SessionKind::Replicate {
        match conn.close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(c))
                if c.error_code.into_inner() == u64::from(CLOSE_OK)
                    && &c.reason[..] == REPLICATION_STOPPED =>
            {
                return Ok(());
            }
            None => return Ok(()),
            _ => {}
        }
    }
    Err(closed_or(conn, what))
}

/// At most this much of the bulk stream is read and not yet handled: what arrives while
/// the session is being set up (a round trip and a standby's preparation at 1 Gbit/s is
/// ~20 MB), beyond the flow-control window the transport already grants.
const BULK_READ_AHEAD: usize = 64 << 20;
/// Once the session runs the read-ahead only smooths the readers' pace; flow control
/// (the transport's window) is again what holds a source back from a slow destination.
/// What is read ahead counts as read for flow control, so it lets the source run that much
/// further ahead: 2 MiB (two of the largest frames). With 4 MiB compressed guest RAM over
/// 1 Gbit/s × 20 ms took 1.20-1.21 × its own ideal against 1.14-1.15 (4-BDP stream window),
/// the raw push on loopback the same (1.12 and 1.08 GB/s, docs/wan.md); measured before the
/// source's push gave its connection's driver turns, which was the cause
/// (docs/encoding.md), and not measured again since.
const BULK_READ_AHEAD_RUNNING: usize = 2 << 20;
// The reader charges a message before it hands it on: the largest must fit the budget.
const _: () = assert!(BULK_READ_AHEAD_RUNNING >= crate::codec::MAX_FRAME_LEN);
