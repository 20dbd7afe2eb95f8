//! Source driver: serves demand requests and pushes every page in the background.
//!
//! One session runs in four steps ([`run_source`]): open the streams (and send the
//! `Hello`), the handshake with the early push beside it, the run, the teardown. The
//! control loop ([`Driver`]) is the only consumer of the session's events; demand
//! requests are served by a task of their own on the urgent stream, so a reply never
//! waits behind the push, which runs in a third ([`push`]).

mod driver_turn;
mod push;
mod replication;

pub use replication::{
    run_replication, run_replication_recovering, ReplicationEvent, ReplicationReport, Update,
};

use std::borrow::Cow;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use quinn::{Connection, RecvStream, SendStream, VarInt};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::frame::{read_frame, write_pages};
use super::link::{ControlReader, Link, Shared};
use super::loss::LossGauge;
use super::recovery::{lost, settle, silent_for, Outages, Pauses, SourceRecovery};
use super::{
    close_with, closed_or, connection_lost, stream_error, DriverError, CLOSE_OK, PRIO_BULK,
    PRIO_CONTROL, PRIO_URGENT, RECONNECTING, TAG_BULK, TAG_CONTROL, TAG_ECHO, TAG_URGENT,
};
use crate::bitmap::Bitmap;
use crate::encoding::{EncodingStats, PageEncoder};
use crate::proto::{Channel, Ownership, SessionState, SourceEvent, SourceSession};

/// Guest memory as the source sees it: frozen at switchover, read-only for the session.
pub trait PageReader: Send + Sync + 'static {
    /// The bytes of `count` consecutive pages starting at page `first`: borrowed from
    /// memory that holds them (no copy), or read into a buffer (a file read with `pread`,
    /// which fails cleanly where a mapping of a shrinking file would raise SIGBUS). An
    /// error ends the session and its text is the reason the destination is told.
    fn pages(&self, first: u64, count: usize) -> Result<Cow<'_, [u8]>, String>;

    /// What the reader knows of the pages from `first` without reading them, looking at
    /// most `max` pages ahead. The push sends a [`Extent::Zero`] stretch as a zero run
    /// without reading it (reading a hole of a memfd through its mapping would allocate
    /// a page for it), and stops a read at the end of a [`Extent::Data`] stretch. The
    /// default knows nothing.
    fn extent(&self, first: u64, max: u64) -> Extent {
        let _ = (first, max);
        Extent::Unknown
    }
}

/// What a [`PageReader`] knows of some pages without reading them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extent {
    /// Nothing.
    Unknown,
    /// This many pages (at least 1) are all zero: a hole of the file behind them, say.
    Zero(u64),
    /// This many pages (at least 1) hold data, which may still be zero bytes.
    Data(u64),
}

/// What the source did, for the migration report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SourceReport {
    /// Pages sent as demand replies.
    pub pages_served: u64,
    /// Pages sent a second time on the echo stream, for requests the destination echoed
    /// on a lossy or long path ([`crate::proto::Channel::Echo`]).
    pub pages_echoed: u64,
    /// Requested pages not answered because their pushed copy had already left and would
    /// arrive first (docs/protocol.md, "Requests for pages already on the way").
    pub pages_on_their_way: u64,
    /// Pages handed to the background push.
    pub pages_pushed: u64,
    /// Of those, pushed beside the handshake, before the destination answered.
    pub pages_pushed_early: u64,
    /// Of those, pushed from the hot ranges before any other page
    /// ([`crate::proto::SourceConfig::hot`]). Not serialized here: only a send with the
    /// guest agent's hints has hot ranges, and its report prints the count.
    #[serde(skip)]
    pub pages_pushed_hot: u64,
    /// Pages that had to cross: all for a migration, the stale set at evacuation.
    pub pages_stale: u64,
    /// From the start of the push (beside the handshake) to the end of the session.
    pub push_ms: u64,
    /// From the start of the session until the destination closed it (or 5 s after the
    /// source acknowledged completion).
    pub total_ms: u64,
    /// UDP bytes sent, as counted by this side's QUIC stack.
    pub udp_tx_bytes: u64,
    /// UDP bytes received.
    pub udp_rx_bytes: u64,
    /// Pushed and served page bytes by kind, the compression ratio and what the tuner chose.
    pub encoding: EncodingStats,
    /// What link outages did (docs/recovery.md).
    #[serde(flatten)]
    pub outages: Outages,
    /// Packets, losses and the congestion window over the session's connections.
    pub path: super::PathReport,
}

/// A send stream that the push and the demand replies may share.
type SharedSend = Arc<tokio::sync::Mutex<SendStream>>;

/// A task's encoder, shared with the driver so it can read the counts at the end. Locked
/// only around encoding (never across an await), so the lock is never contended.
type SharedEncoder = Arc<Mutex<PageEncoder>>;

fn lock_encoder(e: &SharedEncoder) -> std::sync::MutexGuard<'_, PageEncoder> {
    e.lock().unwrap_or_else(|p| p.into_inner())
}

/// The source's half of a session, shared by its tasks.
struct Source {
    link: Link<SourceSession>,
    reader: Arc<dyn PageReader>,
}

/// What a session made with [`crate::proto::SourceConfig::state_later`] waits for after its
/// handshake: the frozen memory and the VM state (see [`run_source_prepared`]).
pub struct HandOver {
    /// Guest memory, frozen from now on.
    pub reader: Arc<dyn PageReader>,
    /// The VMM's vCPU and device state.
    pub vm_state: Vec<u8>,
    /// Pages to push first ([`crate::proto::SourceConfig::hot`]).
    pub hot: Vec<Range<u64>>,
    /// Pages `reader` serves as zeros ([`crate::proto::SourceConfig::zero_filled`]).
    pub zero_filled: Option<Bitmap>,
}

/// The reader of a prepared session: empty until the hand-over. The session neither pushes
/// nor serves before it (see [`SourceSession::hand_over`]), so the empty case is only
/// reached by a bug, and then fails the session instead of reading anything.
#[derive(Default)]
struct LateReader(OnceLock<Arc<dyn PageReader>>);

impl PageReader for LateReader {
    fn pages(&self, first: u64, count: usize) -> Result<Cow<'_, [u8]>, String> {
        match self.0.get() {
            Some(r) => r.pages(first, count),
            None => Err("guest memory was read before it was handed over".into()),
        }
    }

    fn extent(&self, first: u64, max: u64) -> Extent {
        self.0
            .get()
            .map_or(Extent::Unknown, |r| r.extent(first, max))
    }
}

/// A prepared session's side of the hand-over.
struct Pending {
    late: Arc<LateReader>,
    hand_over: Option<oneshot::Receiver<HandOver>>,
    ready: Option<oneshot::Sender<()>>,
}

/// [`run_source_recovering`] for a session made with
/// [`crate::proto::SourceConfig::state_later`], whose handshake runs while the VM still
/// runs here: the `Hello` goes out and the destination's answer is read, then `ready` is
/// sent and the session waits (keep-alives hold the connection; a lost one is reconnected
/// through `recovery` as usual, with a fresh handshake) until the application sends the
/// [`HandOver`] on `hand_over`. From there on it is a plain migration: the `VmState`
/// goes out at once and the push starts.
///
/// Dropping the hand-over's sender before sending ends the session with
/// [`DriverError::Abandoned`] (the destination is told). Errors before `ready` (TLS was
/// done by the connect; here: a refused `Hello`, another layout or VM id, a lost
/// connection without `recovery`) leave `ready` unsent, so the application learns of them
/// before it pauses its VM.
pub async fn run_source_prepared(
    conn: Connection,
    session: SourceSession,
    hand_over: oneshot::Receiver<HandOver>,
    ready: oneshot::Sender<()>,
    recovery: Option<SourceRecovery>,
) -> Result<SourceReport, DriverError> {
    let started = Instant::now();
    let late = Arc::new(LateReader::default());
    let reader: Arc<dyn PageReader> = late.clone();
    let mut pending = Pending {
        late,
        hand_over: Some(hand_over),
        ready: Some(ready),
    };
    run_to_end(conn, session, reader, recovery, started, Some(&mut pending)).await
}

/// Runs the source side of one migration over an established connection. A lost
/// connection ends the session with an error ([`run_source_recovering`] resumes it).
pub async fn run_source(
    conn: Connection,
    session: SourceSession,
    reader: Arc<dyn PageReader>,
) -> Result<SourceReport, DriverError> {
    run_source_recovering(conn, session, reader, None).await
}

/// [`run_source`] for a session that outlives its connection (docs/recovery.md): when the
/// connection or one of its streams is lost (not when the destination closes it with an
/// error), the session pauses, `recovery` connects again (overlapping attempts), and the session
/// resumes on the new connection, pushing only what the destination does not hold. Without
/// `recovery` a lost connection ends the session with an error.
pub async fn run_source_recovering(
    conn: Connection,
    session: SourceSession,
    reader: Arc<dyn PageReader>,
    recovery: Option<SourceRecovery>,
) -> Result<SourceReport, DriverError> {
    run_to_end(conn, session, reader, recovery, Instant::now(), None).await
}

/// The body of [`run_source_recovering`] and [`run_source_prepared`].
async fn run_to_end(
    conn: Connection,
    session: SourceSession,
    reader: Arc<dyn PageReader>,
    recovery: Option<SourceRecovery>,
    started: Instant,
    pending: Option<&mut Pending>,
) -> Result<SourceReport, DriverError> {
    let session: Shared<SourceSession> = Arc::new(Mutex::new(session));
    let mut totals = Totals::default();
    let result = recovering(
        conn,
        &session,
        &reader,
        recovery,
        &mut totals,
        started,
        pending,
    )
    .await;
    result.map_err(|e| vm_lost(&session, &totals, e))
}

/// A failure after the hand-over and before the end: the VM is lost, and the error says so.
fn vm_lost(session: &Shared<SourceSession>, totals: &Totals, e: DriverError) -> DriverError {
    let owner = session
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .ownership();
    match (owner, totals.handed_over_at) {
        (Ownership::Destination, Some(at)) if !matches!(e, DriverError::VmLost { .. }) => {
            DriverError::VmLost {
                vulnerability_ms: at.elapsed().as_millis() as u64,
                pages_missing: None,
                cause: Box::new(e),
            }
        }
        _ => e,
    }
}

async fn recovering(
    conn: Connection,
    session: &Shared<SourceSession>,
    reader: &Arc<dyn PageReader>,
    recovery: Option<SourceRecovery>,
    totals: &mut Totals,
    started: Instant,
    mut pending: Option<&mut Pending>,
) -> Result<SourceReport, DriverError> {
    let mut conn = conn;
    loop {
        let watch = recovery.is_some();
        let on_handover = recovery.as_ref().and_then(|r| r.on_handover.as_ref());
        let result = run_connection(
            &conn,
            session,
            reader,
            totals,
            watch,
            on_handover,
            pending.as_deref_mut(),
        )
        .await;
        let e = match result {
            Ok(()) => break,
            Err(e) => settle(&conn, e).await,
        };
        let resumable = {
            let s = session.lock().unwrap_or_else(|p| p.into_inner());
            !matches!(
                s.session_state(),
                SessionState::Failed | SessionState::Completed
            )
        };
        let Some(recovery) = recovery.as_ref().filter(|_| resumable && lost(&e)) else {
            close_with(&conn, &e);
            return Err(e);
        };
        if totals.handed_over_at.is_some() {
            tracing::warn!(
                error = %crate::chain(&e),
                "the connection to the destination was lost after switchover: the VM runs \
                 there and pages it lacks are only here; the session pauses and reconnects \
                 (if the destination is gone, the VM is lost: --recover-timeout bounds the wait)"
            );
        } else {
            tracing::warn!(
                error = %crate::chain(&e),
                "the connection to the destination was lost before switchover: the VM is \
                 still here; the session pauses and reconnects"
            );
        }
        // Nothing the peer should take as the session's end: it may be up still.
        conn.close(VarInt::from_u32(CLOSE_OK), RECONNECTING);
        totals.add_udp(&conn);
        session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .connection_lost();
        totals.pauses.lost_since(silent_for(&e));
        let paused_at = totals.pauses.paused_since().unwrap_or_else(Instant::now);
        conn = recovery.reconnect(paused_at).await?;
        if let Some(f) = &recovery.on_connection {
            f(&conn);
        }
        tracing::info!(peer = %conn.remote_address(), "reconnected; resuming the session");
        totals.pauses.connected();
        session.lock().unwrap_or_else(|p| p.into_inner()).resume();
    }
    // The destination closes once it has our CompleteAck; wait for that briefly so the
    // acknowledgement is not lost with our own endpoint.
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    totals.add_udp(&conn);
    totals.pauses.finish();
    let stats = session.lock().unwrap_or_else(|p| p.into_inner()).stats();
    let encoding = totals.encoding.take().unwrap_or_default();
    Ok(SourceReport {
        // Replies actually sent: a request that crossed the destination's `Complete` may
        // have been cut short when the session ended.
        pages_served: encoding.replies.pages(),
        pages_echoed: encoding.echoes.pages(),
        pages_on_their_way: stats.pages_on_their_way,
        pages_pushed: stats.pages_pushed,
        pages_pushed_early: stats.pages_pushed_early,
        pages_pushed_hot: stats.pages_pushed_hot,
        pages_stale: stats.pages_stale,
        push_ms: totals.push_ms,
        total_ms: started.elapsed().as_millis() as u64,
        udp_tx_bytes: totals.udp_tx,
        udp_rx_bytes: totals.udp_rx,
        encoding: encoding.all,
        outages: totals.pauses.outages(stats.pauses, stats.bytes_resent),
        path: totals.path,
    })
}

/// What the connections of one session add up to.
#[derive(Default)]
struct Totals {
    encoding: Option<Encoding>,
    /// When the (first) push started.
    push_started: Option<Instant>,
    push_ms: u64,
    udp_tx: u64,
    udp_rx: u64,
    path: super::PathReport,
    pauses: Pauses,
    /// When the VM was handed over to the destination (the handshake that queued it ended).
    handed_over_at: Option<Instant>,
}

impl Totals {
    fn add_udp(&mut self, conn: &Connection) {
        let stats = conn.stats();
        self.udp_tx += stats.udp_tx.bytes;
        self.udp_rx += stats.udp_rx.bytes;
        self.path.add(&stats);
    }

    fn add_encoding(&mut self, e: Encoding) {
        match &mut self.encoding {
            Some(total) => {
                total.replies.merge(&e.replies);
                total.echoes.merge(&e.echoes);
                total.all.merge(&e.all);
            }
            None => self.encoding = Some(e),
        }
    }
}

/// One connection of the session: open the streams (the `Hello` that `resume` queued, or
/// the first one), the handshake or the resume handshake, the run. `Ok` once the session
/// finished.
async fn run_connection(
    conn: &Connection,
    session: &Shared<SourceSession>,
    reader: &Arc<dyn PageReader>,
    totals: &mut Totals,
    watch: bool,
    on_handover: Option<&super::recovery::OnHandover>,
    pending: Option<&mut Pending>,
) -> Result<(), DriverError> {
    let (mut driver, data) = Driver::open(conn, session.clone(), reader.clone()).await?;
    // A session that can resume notices a cut within seconds, not at the idle timeout.
    let _watchdog = watch.then(|| driver.link().watch_silence());
    let early = driver.handshake(&data, totals).await?;
    if let Some(p) = pending {
        if driver.link().session().awaits_hand_over() {
            driver.await_hand_over(p).await?;
        }
    }
    if totals.handed_over_at.is_none()
        && session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ownership()
            == Ownership::Destination
    {
        totals.handed_over_at = Some(Instant::now());
        if let Some(f) = on_handover {
            f();
        }
    }
    driver.run(data, early, totals).await
}

/// The streams a session opens, after the control stream's sending half went into its
/// [`Link`].
struct Streams {
    ctl_recv: RecvStream,
    urg_send: SendStream,
    urg_recv: RecvStream,
    bulk: SendStream,
}

/// Opens the three tagged streams and sends the `Hello`.
async fn open_streams(
    conn: &Connection,
    session: Shared<SourceSession>,
) -> Result<
    (
        Link<SourceSession>,
        mpsc::UnboundedReceiver<DriverError>,
        Streams,
    ),
    DriverError,
> {
    let open = |e| connection_lost(e);
    let (mut ctl_send, ctl_recv) = conn.open_bi().await.map_err(open)?;
    let (mut urg_send, urg_recv) = conn.open_bi().await.map_err(open)?;
    let mut bulk = conn.open_uni().await.map_err(open)?;
    for (s, prio, tag) in [
        (&mut ctl_send, PRIO_CONTROL, TAG_CONTROL),
        (&mut urg_send, PRIO_URGENT, TAG_URGENT),
        (&mut bulk, PRIO_BULK, TAG_BULK),
    ] {
        let _ = s.set_priority(prio);
        s.write_all(&[tag])
            .await
            .map_err(|e| stream_error(conn, Channel::Control, e.into()))?;
    }
    let (link, failures) = Link::new(conn.clone(), session, ctl_send, None);
    link.flush().await?;
    let streams = Streams {
        ctl_recv,
        urg_send,
        urg_recv,
        bulk,
    };
    Ok((link, failures, streams))
}

/// Reads control messages until the session runs (HelloAck, and for a standby its invalid
/// pages), handing every event to `on_event`.
async fn handshake(
    link: &Link<SourceSession>,
    control: &mut ControlReader,
    mut on_event: impl FnMut(SourceEvent),
) -> Result<(), DriverError> {
    // A new connection runs once the destination answered its `Hello`, as on the first
    // (`HelloAck`), or once its held set arrived (`Resume`).
    while matches!(
        link.session().session_state(),
        SessionState::Handshake | SessionState::Resuming
    ) {
        let read = tokio::time::timeout(Duration::from_secs(30), control.next())
            .await
            .map_err(|_| DriverError::Timeout("waiting for the destination's handshake"))?;
        let msg = control_message(link, read).await?;
        if matches!(msg, crate::message::Message::HelloAck { .. }) {
            // Answered, and (with VM state to send) the VM not handed over yet.
            crate::crash_point("source-hello-answered");
        }
        link.handle(Channel::Control, msg).await?;
        link.events().into_iter().for_each(&mut on_event);
    }
    Ok(())
}

/// A read of the control stream as a message; its end is the destination hanging up.
async fn control_message(
    link: &Link<SourceSession>,
    read: Result<Option<crate::message::Message>, super::frame::FrameError>,
) -> Result<crate::message::Message, DriverError> {
    link.checked(Channel::Control, read)
        .await?
        .ok_or_else(|| closed_or(&link.conn, "the destination closed the control stream"))
}

/// The streams the data tasks take over.
struct DataStreams {
    urg_send: SendStream,
    urg_recv: RecvStream,
    /// Shared by the early push and the push, and with demand replies in the comparison
    /// mode ([`crate::proto::SourceConfig::replies_on_bulk`]).
    bulk: SharedSend,
}

/// The early push's task and its encoder.
struct EarlyPush {
    task: Option<JoinHandle<Result<(), DriverError>>>,
    encoder: SharedEncoder,
    started: Instant,
}

/// The control loop: it reads the control stream, acts on every session event, and decides
/// when the session is over.
struct Driver {
    src: Arc<Source>,
    control: ControlReader,
    /// The first failure of a data task.
    failures: mpsc::UnboundedReceiver<DriverError>,
    /// What the destination agreed to, from [`SourceEvent::Established`].
    features: u64,
}

impl Driver {
    /// Opens the session's streams and sends the `Hello`.
    async fn open(
        conn: &Connection,
        session: Shared<SourceSession>,
        reader: Arc<dyn PageReader>,
    ) -> Result<(Driver, DataStreams), DriverError> {
        // A resumed connection keeps what the destination agreed to at the handshake; a
        // handshake (restarted or first) says it again.
        let features = session.lock().unwrap_or_else(|p| p.into_inner()).features();
        let (link, failures, streams) = open_streams(conn, session).await?;
        let driver = Driver {
            src: Arc::new(Source { link, reader }),
            control: ControlReader::start(streams.ctl_recv),
            failures,
            features,
        };
        let data = DataStreams {
            urg_send: streams.urg_send,
            urg_recv: streams.urg_recv,
            bulk: Arc::new(tokio::sync::Mutex::new(streams.bulk)),
        };
        Ok((driver, data))
    }

    fn link(&self) -> &Link<SourceSession> {
        &self.src.link
    }

    /// A prepared session after its handshake: tells the application it is ready, then
    /// waits for the hand-over while watching the connection, and queues the `VmState`.
    async fn await_hand_over(&mut self, p: &mut Pending) -> Result<(), DriverError> {
        if let Some(ready) = p.ready.take() {
            // The application may have stopped listening; the hand-over decides.
            let _ = ready.send(());
        }
        let Some(rx) = p.hand_over.as_mut() else {
            return Err(DriverError::Abandoned);
        };
        loop {
            tokio::select! {
                h = &mut *rx => {
                    p.hand_over = None;
                    let h = h.map_err(|_| DriverError::Abandoned)?;
                    let _ = p.late.0.set(h.reader);
                    self.link().session().hand_over(h.vm_state, h.hot, h.zero_filled);
                    self.link().flush().await?;
                    return Ok(());
                }
                read = self.control.next() => {
                    // Nothing is expected here but an `Error` (the session fails on it) or,
                    // from a faulty peer, a message the session refuses.
                    let msg = control_message(self.link(), read).await?;
                    self.link().handle(Channel::Control, msg).await?;
                    for ev in self.link().events() {
                        tracing::debug!(?ev, "a session event while awaiting the hand-over");
                    }
                }
                Some(e) = self.failures.recv() => return Err(e),
            }
        }
    }

    /// The one place the session's events are acted on, in both the handshake and the run.
    fn on_event(features: &mut u64, pauses: &mut Pauses, ev: SourceEvent) {
        match ev {
            SourceEvent::Established { features: f } => *features = f,
            SourceEvent::Resumed {
                conn_epoch,
                handshake_restarted,
                pages_to_push,
            } => {
                pauses.resumed();
                tracing::info!(
                    conn_epoch,
                    handshake_restarted,
                    pages_to_push,
                    "the session runs again"
                );
            }
            // Informational: the run loop ends on `is_finished`, checked after every
            // control message.
            SourceEvent::Finished => {
                tracing::debug!("the destination has every page");
                crate::crash_point("source-complete-received");
            }
            // Only a replication session produces these (see `run_replication`).
            SourceEvent::Invalid(_) | SourceEvent::Acked(_) => {
                tracing::debug!(?ev, "a replication event in a migration")
            }
            SourceEvent::Paused => tracing::debug!("the session paused"),
        }
    }

    /// The handshake, with the push starting beside it with what must cross anyway: lz4
    /// where the policy allows it and otherwise raw, as nothing else is agreed yet (a round
    /// trip saved on a long link; see
    /// [`crate::encoding::EncodingPolicy::before_answer`]). A failed early
    /// push (memory unreadable, the stream refused) ends the session before the
    /// destination may resume a guest this source is about to abandon.
    async fn handshake(
        &mut self,
        data: &DataStreams,
        totals: &mut Totals,
    ) -> Result<EarlyPush, DriverError> {
        let started = Instant::now();
        let encoder = {
            let s = self.link().session();
            PageEncoder::before_answer(s.encoding(), s.offered())
        };
        let encoder: SharedEncoder = Arc::new(Mutex::new(encoder));
        let mut task = Some(tokio::spawn(push::push_early(
            self.src.clone(),
            data.bulk.clone(),
            encoder.clone(),
        )));
        let Driver {
            src,
            control,
            features,
            failures,
        } = self;
        let pauses = &mut totals.pauses;
        let hs = handshake(&src.link, control, |ev| {
            Self::on_event(features, pauses, ev)
        });
        tokio::pin!(hs);
        let result = loop {
            tokio::select! {
                r = &mut hs => break r,
                Some(e) = failures.recv() => break Err(e),
                r = async {
                    match task.as_mut() {
                        Some(t) => t.await,
                        None => std::future::pending().await,
                    }
                }, if task.is_some() => {
                    task = None;
                    if let Err(e) = joined(r) {
                        break Err(e);
                    }
                }
            }
        };
        if let Err(e) = result {
            // Stopped for good before the session may move on to another connection.
            if let Some(t) = task {
                t.abort();
                let _ = t.await;
            }
            return Err(e);
        }
        Ok(EarlyPush {
            task,
            encoder,
            started,
        })
    }

    /// Runs the session to its end with the demand server and the push beside the control
    /// loop, then stops them and makes the report.
    async fn run(
        mut self,
        data: DataStreams,
        early: EarlyPush,
        totals: &mut Totals,
    ) -> Result<(), DriverError> {
        let tasks = Tasks::spawn(&self.src, data, early, self.features);
        let outcome = match self.control_loop(&mut totals.pauses).await {
            // A stream the destination stopped or ended may be it dropping the connection
            // to reconnect, its close still on the way: closing over it here would turn a
            // pause into the session's end (the VM lost). Judged by the close instead.
            Err(e) => Err(settle(&self.link().conn, e).await),
            ok => ok,
        };
        if let Err(e) = &outcome {
            // Tell the peer why before the tasks stop: their streams finish as they drop,
            // and the destination would otherwise see a stream end before the reason. A
            // lost connection tells nothing: the session may resume on another.
            if !lost(e) {
                close_with(&self.link().conn, e);
            }
        }
        let push_started = *totals.push_started.get_or_insert(tasks.push_started);
        totals.push_ms = push_started.elapsed().as_millis() as u64;
        self.control.stop().await;
        totals.add_encoding(tasks.stop().await);
        outcome
    }

    async fn control_loop(&mut self, pauses: &mut Pauses) -> Result<(), DriverError> {
        // A finished session that resumed only to acknowledge the `Complete` again.
        if self.link().session().is_finished() {
            return Ok(());
        }
        loop {
            tokio::select! {
                read = self.control.next() => {
                    let msg = control_message(self.link(), read).await?;
                    self.link().handle(Channel::Control, msg).await?;
                    for ev in self.link().events() {
                        Self::on_event(&mut self.features, pauses, ev);
                    }
                    if self.link().session().is_finished() {
                        return Ok(());
                    }
                }
                Some(e) = self.failures.recv() => return Err(e),
            }
        }
    }
}

/// The data tasks beside the control loop while the session runs.
struct Tasks {
    urgent: JoinHandle<()>,
    /// Waits for the destination's echo stream, then serves it.
    echo: JoinHandle<()>,
    push: JoinHandle<()>,
    push_started: Instant,
    encoders: [SharedEncoder; 4],
    /// The urgent stream's sending half when replies go on the bulk stream.
    _idle_urgent: Option<SendStream>,
}

/// The encoders' counts once their tasks stopped.
#[derive(Default)]
struct Encoding {
    replies: EncodingStats,
    echoes: EncodingStats,
    all: EncodingStats,
}

impl Tasks {
    fn spawn(src: &Arc<Source>, data: DataStreams, early: EarlyPush, features: u64) -> Tasks {
        let (policy, replies_on_bulk, replica_index) = {
            let s = src.link.session();
            (s.encoding(), s.replies_on_bulk(), s.replica_index())
        };
        // Each task encodes with its own encoder; the report reads their counts once at
        // the end (the tasks are stopped by then), so nothing is copied per reply or batch.
        let reply_encoder: SharedEncoder = Arc::new(Mutex::new(PageEncoder::new(policy, features)));
        let echo_encoder: SharedEncoder = Arc::new(Mutex::new(PageEncoder::new(policy, features)));
        let push_encoder: SharedEncoder = Arc::new(Mutex::new(match replica_index {
            Some(index) => PageEncoder::new(policy, features).with_replica_index(index),
            None => PageEncoder::new(policy, features),
        }));
        // Replies normally have a stream of their own, ahead of the push in priority; the
        // comparison mode queues them behind the push on the bulk stream instead (the
        // urgent stream's sending half then stays unused, open until the end).
        let (replies, idle_urgent) = if replies_on_bulk {
            (data.bulk.clone(), Some(data.urg_send))
        } else {
            (Arc::new(tokio::sync::Mutex::new(data.urg_send)), None)
        };
        // The comparison mode queues the replies to echoed requests behind the push too.
        let echo_replies = replies_on_bulk.then(|| data.bulk.clone());
        let urgent = tokio::spawn(serve_requests(
            src.clone(),
            Channel::Urgent,
            data.urg_recv,
            replies,
            reply_encoder.clone(),
        ));
        let echo = tokio::spawn(serve_echo(src.clone(), echo_replies, echo_encoder.clone()));
        // Demand replies run at once; the push continues after the early push's last
        // batch, which may still be waiting for flow-control credit.
        let push = tokio::spawn({
            let (src, bulk, encoder) = (src.clone(), data.bulk, push_encoder.clone());
            let early_encoder = early.encoder.clone();
            async move {
                if let Some(t) = early.task {
                    if let Err(e) = joined(t.await) {
                        return src.link.task_ended(Err(e));
                    }
                }
                // Every page the early push indexed is on the stream ahead of the push's
                // frames now: references may name them.
                let index = lock_encoder(&early_encoder).take_index();
                lock_encoder(&encoder).adopt_index(index);
                let result = push::push_all(src.clone(), bulk, encoder).await;
                src.link.task_ended(result)
            }
        });
        Tasks {
            urgent,
            echo,
            push,
            push_started: early.started,
            encoders: [reply_encoder, echo_encoder, push_encoder, early.encoder],
            _idle_urgent: idle_urgent,
        }
    }

    /// Stops the tasks for good, then reads their encoders' counts.
    async fn stop(self) -> Encoding {
        self.push.abort();
        self.urgent.abort();
        self.echo.abort();
        let _ = tokio::join!(self.push, self.urgent, self.echo);
        let [replies, echoes, push, early] = self.encoders.map(|e| lock_encoder(&e).stats());
        let mut all = push;
        all.merge(&replies);
        all.merge(&echoes);
        all.merge(&early);
        Encoding {
            replies,
            echoes,
            all,
        }
    }
}

/// Serves demand requests on `channel` (urgent, or echo): each requested page is read and
/// sent at once on `replies`. On the echo channel the path's loss rate decides, before each
/// request, whether pages already served are sent again.
async fn serve_requests(
    src: Arc<Source>,
    channel: Channel,
    mut recv: RecvStream,
    replies: SharedSend,
    encoder: SharedEncoder,
) {
    let conn = &src.link.conn;
    let mut gauge = LossGauge::default();
    let result = async {
        loop {
            let read = read_frame(&mut recv).await;
            let Some(msg) = src.link.checked(channel, read).await? else {
                return Ok(());
            };
            if channel == Channel::Echo {
                let path = conn.stats().path;
                let lossy = gauge.observe(path.sent_packets, path.lost_packets);
                src.link.session().set_echo_all(lossy);
            }
            for page in src.link.handle(channel, msg).await? {
                let data = src.reader.pages(page, 1).map_err(DriverError::Reader)?;
                let pages = lock_encoder(&encoder).encode_reply(page, &data);
                write_pages(&mut *replies.lock().await, &pages)
                    .await
                    .map_err(|e| stream_error(conn, channel, e))?;
            }
        }
    }
    .await;
    src.link.task_ended(result);
}

/// Waits for the destination to open its echo stream (only on a long path, and only once
/// a fault waited; see [`Channel::Echo`]), then serves it like the urgent one, replying on
/// it or on `replies` (the comparison mode's bulk stream). A connection that ends first
/// ends this quietly: the control loop reports why.
async fn serve_echo(src: Arc<Source>, replies: Option<SharedSend>, encoder: SharedEncoder) {
    let conn = &src.link.conn;
    let Ok((send, mut recv)) = conn.accept_bi().await else {
        return;
    };
    let tag = match super::read_tag(&mut recv).await {
        Ok(tag) => tag,
        Err(e) => return src.link.task_ended(Err(e)),
    };
    if tag != TAG_ECHO {
        return src.link.task_ended(Err(DriverError::UnknownStream(tag)));
    }
    let _ = send.set_priority(PRIO_URGENT);
    let replies = replies.unwrap_or_else(|| Arc::new(tokio::sync::Mutex::new(send)));
    serve_requests(src, Channel::Echo, recv, replies, encoder).await;
}

/// The outcome of a driver task.
fn joined(r: Result<Result<(), DriverError>, tokio::task::JoinError>) -> Result<(), DriverError> {
    r.map_err(|e| DriverError::Task(e.to_string()))?
}
