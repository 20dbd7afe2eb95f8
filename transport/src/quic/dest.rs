//! Destination driver: checks the handshake, forwards demand requests, hands page data to a
//! [`PageSink`] and ends the session once the sink holds every page.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{Connection, RecvStream, SendStream, VarInt};
use serde::Serialize;
use thiserror::Error;
use tokio::sync::{mpsc, Notify};

use super::frame::{read_frame, write_final, write_message};
use super::read_ahead::{Held, ReadAhead};
use super::source::{closed_or, stream_error};
use super::{
    close_with, connection_lost, DriverError, CLOSE_OK, TAG_BULK, TAG_CONTROL, TAG_URGENT,
};
use crate::bitmap::Bitmap;
use crate::encoding::PageDecoder;
use crate::message::{Message, Pages, SessionKind};
use crate::proto::{Channel, Delivery, DestEvent, DestSession};

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

#[derive(Default)]
pub struct DestHooks {
    pub on_established: Option<OnEstablished>,
}

/// What the destination saw, for the migration report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DestReport {
    pub vm_id: String,
    pub kind: Option<SessionKind>,
    /// Evacuation: pages that had to cross (the stale set).
    pub pages_stale: u64,
    /// Replication: pages stored in the replica.
    pub pages_replicated: u64,
    /// From the start of the session to the moment the guest could resume.
    pub established_ms: u64,
    /// From the start of the session to every page present: from then on the guest no
    /// longer depends on the source. (A replication session: to its end.)
    pub total_ms: u64,
    /// From the start of the session to its orderly end, after the source acknowledged
    /// completion: `total_ms` plus about one round trip.
    pub closed_ms: u64,
    /// When every page was present (ms since the start), once known.
    #[serde(skip)]
    present_at: Option<u64>,
    pub pages_received: u64,
    pub udp_tx_bytes: u64,
    pub udp_rx_bytes: u64,
    /// Pages that arrived compressed, as references, and references that failed
    /// verification (fetched again on demand).
    pub pages_lz4: u64,
    pub pages_ref: u64,
    pub refs_refetched: u64,
    /// Bulk bytes read before the session ran, rounded up to KiB per message: the source's
    /// push beside the handshake, and what arrived while the destination prepared (a
    /// standby punching its holes), which would otherwise have stalled flow control.
    pub early_push_bytes: u64,
}

/// Counters the page readers share.
#[derive(Default)]
struct Received {
    stored: std::sync::atomic::AtomicU64,
    lz4: std::sync::atomic::AtomicU64,
    refs: std::sync::atomic::AtomicU64,
    refetched: std::sync::atomic::AtomicU64,
}

type Shared = Arc<Mutex<DestSession>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, DestSession> {
    // See the source driver: the session stays consistent between statements.
    s.lock().unwrap_or_else(|p| p.into_inner())
}

struct Outbound {
    control: tokio::sync::Mutex<SendStream>,
    urgent: tokio::sync::Mutex<SendStream>,
}

async fn flush(session: &Shared, out: &Outbound) -> Result<(), DriverError> {
    let queued: Vec<_> = std::iter::from_fn(|| lock(session).poll_transmit()).collect();
    for t in queued {
        let stream = match t.channel {
            Channel::Urgent => &out.urgent,
            _ => &out.control,
        };
        let mut send = stream.lock().await;
        let written = if matches!(t.message, crate::message::Message::Error { .. }) {
            write_final(&mut send, &t.message).await
        } else {
            write_message(&mut send, &t.message).await
        };
        written.map_err(|source| DriverError::Stream {
            channel: t.channel,
            source,
        })?;
    }
    Ok(())
}

/// Runs the destination side of one migration over an accepted connection. Demand requests
/// arrive on `requests` (from the fault loop); the session ends when `sink` is complete.
pub async fn run_dest(
    conn: Connection,
    session: DestSession,
    sink: Arc<dyn PageSink>,
    requests: mpsc::UnboundedReceiver<Vec<u64>>,
    hooks: DestHooks,
) -> Result<DestReport, DriverError> {
    let started = Instant::now();
    let session: Shared = Arc::new(Mutex::new(session));
    match drive(&conn, &session, sink, requests, hooks, started).await {
        Ok(mut report) => {
            conn.close(VarInt::from_u32(CLOSE_OK), b"migration complete");
            let stats = conn.stats();
            report.udp_tx_bytes = stats.udp_tx.bytes;
            report.udp_rx_bytes = stats.udp_rx.bytes;
            report.pages_received = lock(&session).received().count_ones();
            report.closed_ms = started.elapsed().as_millis() as u64;
            report.total_ms = report.present_at.unwrap_or(report.closed_ms);
            Ok(report)
        }
        Err(e) => {
            close_with(&conn, &e);
            Err(e)
        }
    }
}

async fn accept_streams(
    conn: &Connection,
) -> Result<(SendStream, RecvStream, SendStream, RecvStream, RecvStream), DriverError> {
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
    let (Some((cs, cr)), Some((us, ur))) = (control, urgent) else {
        return Err(DriverError::UnknownStream(0));
    };
    Ok((cs, cr, us, ur, bulk))
}

async fn read_tag(recv: &mut RecvStream) -> Result<u8, DriverError> {
    let mut tag = [0u8];
    recv.read_exact(&mut tag)
        .await
        .map_err(|e| DriverError::Stream {
            channel: Channel::Control,
            source: match e {
                quinn::ReadExactError::FinishedEarly(_) => super::FrameError::Truncated,
                quinn::ReadExactError::ReadError(e) => super::FrameError::Read(e),
            },
        })?;
    Ok(tag[0])
}

async fn drive(
    conn: &Connection,
    session: &Shared,
    sink: Arc<dyn PageSink>,
    mut requests: mpsc::UnboundedReceiver<Vec<u64>>,
    mut hooks: DestHooks,
    started: Instant,
) -> Result<DestReport, DriverError> {
    let (ctl_send, mut ctl_recv, urg_send, urg_recv, bulk_recv) =
        tokio::time::timeout(Duration::from_secs(30), accept_streams(conn))
            .await
            .map_err(|_| DriverError::Timeout("waiting for the source to open its streams"))??;
    // The source may push before the session runs; read it now, handle it then.
    let mut bulk_ahead = ReadAhead::start(bulk_recv, BULK_READ_AHEAD);
    let out = Arc::new(Outbound {
        control: tokio::sync::Mutex::new(ctl_send),
        urgent: tokio::sync::Mutex::new(urg_send),
    });

    // Handshake: nothing touches guest memory before it is accepted.
    let hello = match read_frame(&mut ctl_recv).await {
        Ok(Some(m)) => m,
        Ok(None) => return Err(closed_or(conn, "the source closed the control stream")),
        Err(e) => {
            if let super::FrameError::Codec(c) = e {
                let err = lock(session).handle_decode_error(c);
                flush(session, &out).await.ok();
                return Err(err.into());
            }
            return Err(stream_error(conn, Channel::Control, e));
        }
    };
    let handled = lock(session).handle(Channel::Control, hello);
    flush(session, &out).await?;
    handled?;
    let mut report = DestReport::default();
    let mut vm_state: Option<Vec<u8>> = None;

    // The rest of the handshake: replica state, the stale set, until the session runs.
    loop {
        let events: Vec<_> = std::iter::from_fn(|| lock(session).poll_event()).collect();
        for ev in events {
            match ev {
                DestEvent::HelloReceived { kind, epoch, .. } => {
                    let invalid = sink.invalid_pages(kind, epoch)?;
                    lock(session).accept(&invalid);
                    flush(session, &out).await?;
                }
                DestEvent::StaleSet(stale) => {
                    report.pages_stale = stale.count_ones();
                    sink.prepare_stale(&stale)?;
                }
                DestEvent::Established { vm_id, .. } => report.vm_id = vm_id,
                DestEvent::VmState(blob) => vm_state = Some(blob),
                other => tracing::debug!(?other, "destination event"),
            }
        }
        if lock(session).is_running() {
            break;
        }
        let msg = match read_frame(&mut ctl_recv).await {
            Ok(Some(m)) => m,
            Ok(None) => return Err(closed_or(conn, "the source closed the control stream")),
            Err(super::FrameError::Codec(c)) => {
                let err = lock(session).handle_decode_error(c);
                flush(session, &out).await.ok();
                return Err(err.into());
            }
            Err(e) => return Err(stream_error(conn, Channel::Control, e)),
        };
        let handled = lock(session).handle(Channel::Control, msg);
        flush(session, &out).await?;
        handled?;
    }
    let kind = lock(session).kind();
    report.kind = Some(kind);
    report.established_ms = started.elapsed().as_millis() as u64;
    report.early_push_bytes = bulk_ahead.held_bytes() as u64;
    bulk_ahead.shrink_to(BULK_READ_AHEAD_RUNNING);
    if kind != SessionKind::Replicate {
        if let Some(f) = hooks.on_established.take() {
            f(&report.vm_id, vm_state.as_deref());
        }
    }

    let progress = Arc::new(Notify::new());
    let counts = Arc::new(Received::default());
    let (err_tx, mut err_rx) = mpsc::unbounded_channel::<DriverError>();
    let readers = [
        (Channel::Urgent, Frames::Stream(urg_recv)),
        (Channel::Bulk, Frames::Ahead(bulk_ahead)),
    ]
    .map(|(channel, frames)| {
        tokio::spawn(receive_pages(
            channel,
            frames,
            session.clone(),
            out.clone(),
            sink.clone(),
            progress.clone(),
            counts.clone(),
            err_tx.clone(),
            conn.clone(),
        ))
    });
    let req_session = session.clone();
    let req_out = out.clone();
    let req_err = err_tx.clone();
    let requester = tokio::spawn(async move {
        while let Some(mut batch) = requests.recv().await {
            while let Ok(more) = requests.try_recv() {
                batch.extend(more);
            }
            lock(&req_session).request(&batch);
            if let Err(e) = flush(&req_session, &req_out).await {
                if !lock(&req_session).is_finished() {
                    let _ = req_err.send(e);
                }
                return;
            }
        }
    });
    drop(err_tx);

    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel();
    let ctl_reader = tokio::spawn(async move {
        loop {
            let r = read_frame(&mut ctl_recv).await;
            let end = !matches!(r, Ok(Some(_)));
            if ctl_tx.send(r).is_err() || end {
                break;
            }
        }
    });

    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let outcome = loop {
        tokio::select! {
            frame = ctl_rx.recv() => match frame {
                Some(Ok(Some(msg))) => {
                    let handled = lock(session).handle(Channel::Control, msg);
                    flush(session, &out).await?;
                    handled?;
                    while let Some(ev) = lock(session).poll_event() {
                        tracing::debug!(?ev, "destination event");
                    }
                    if lock(session).is_finished() {
                        break Ok(());
                    }
                }
                Some(Ok(None)) | None => {
                    // Every page is here and the source was told so: a source that hangs up
                    // without waiting to acknowledge loses nothing.
                    if lock(session).complete_sent() && sink.is_complete() {
                        tracing::info!("the source closed before acknowledging completion");
                        break Ok(());
                    }
                    break end_of_replication(conn, kind, "the source closed the control stream")
                }
                Some(Err(super::FrameError::Codec(c))) => {
                    let err = lock(session).handle_decode_error(c);
                    flush(session, &out).await.ok();
                    break Err(err.into());
                }
                Some(Err(e)) => {
                    if kind == SessionKind::Replicate && conn.close_reason().is_some() {
                        break end_of_replication(conn, kind, "");
                    }
                    break Err(stream_error(conn, Channel::Control, e));
                }
            },
            Some(e) = err_rx.recv() => {
                if kind == SessionKind::Replicate && conn.close_reason().is_some() {
                    break end_of_replication(conn, kind, "");
                }
                break Err(e);
            }
            _ = progress.notified() => {}
            _ = tick.tick() => {}
        }
        if kind == SessionKind::Replicate {
            // Acknowledge only what the replica made durable.
            let acks = sink.sync()?;
            if !acks.is_empty() {
                lock(session).ack(&acks);
                flush(session, &out).await?;
            }
            continue;
        }
        if sink.is_complete() {
            {
                let mut s = lock(session);
                if s.is_running() && !s.is_finished() && !s.complete_sent() {
                    report.present_at = Some(started.elapsed().as_millis() as u64);
                    s.complete();
                }
            }
            flush(session, &out).await?;
        }
    };
    ctl_reader.abort();
    requester.abort();
    for r in &readers {
        r.abort();
    }
    // Stopped for good (an install in progress finishes) before their counts are read.
    for r in readers {
        let _ = r.await;
    }
    let _ = tokio::join!(ctl_reader, requester);
    if kind == SessionKind::Replicate {
        // Whatever arrived before the end is stored; make it durable too.
        sink.sync()?;
    }
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    report.pages_replicated = load(&counts.stored);
    report.pages_lz4 = load(&counts.lz4);
    report.pages_ref = load(&counts.refs);
    report.refs_refetched = load(&counts.refetched);
    outcome?;
    Ok(report)
}

/// A replication session ends when the source hangs up normally (close code 0); for the
/// other kinds, and for any other close, the connection's end is an error.
fn end_of_replication(
    conn: &Connection,
    kind: SessionKind,
    what: &'static str,
) -> Result<(), DriverError> {
    if kind == SessionKind::Replicate {
        match conn.close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(c))
                if c.error_code.into_inner() == u64::from(CLOSE_OK) =>
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
const BULK_READ_AHEAD_RUNNING: usize = 4 << 20;
// The reader charges a message before it hands it on: the largest must fit the budget.
const _: () = assert!(BULK_READ_AHEAD_RUNNING >= crate::codec::MAX_FRAME_LEN);

/// Where a page reader gets its messages: straight from the stream (urgent replies), or
/// through a [`ReadAhead`] (the bulk push, which may start before the session runs).
enum Frames {
    Stream(RecvStream),
    Ahead(ReadAhead),
}

impl Frames {
    /// The next message, with what keeps its read-ahead budget held while it is handled.
    async fn next(&mut self) -> (Result<Option<Message>, super::FrameError>, Option<Held>) {
        match self {
            Frames::Stream(recv) => (read_frame(recv).await, None),
            Frames::Ahead(ahead) => match ahead.next().await {
                Some((read, permit)) => (read, Some(permit)),
                // The reader stopped without an end: only when this session is ending.
                None => (Ok(None), None),
            },
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn receive_pages(
    channel: Channel,
    mut frames: Frames,
    session: Shared,
    out: Arc<Outbound>,
    sink: Arc<dyn PageSink>,
    progress: Arc<Notify>,
    counts: Arc<Received>,
    errors: mpsc::UnboundedSender<DriverError>,
    conn: Connection,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut decoder: Option<PageDecoder> = None;
    let result: Result<(), DriverError> = async {
        loop {
            let (read, _held) = frames.next().await;
            let msg = match read {
                Ok(Some(m)) => m,
                Ok(None) => return Ok(()),
                Err(super::FrameError::Codec(c)) => {
                    let err = lock(&session).handle_decode_error(c);
                    flush(&session, &out).await.ok();
                    return Err(err.into());
                }
                Err(e) => return Err(stream_error(&conn, channel, e)),
            };
            let handled = lock(&session).handle(channel, msg);
            match handled {
                Ok(Some(Delivery::Pages(pages))) => {
                    // Pages arrive only once the handshake is done: the features are known.
                    let decoder =
                        decoder.get_or_insert_with(|| PageDecoder::new(lock(&session).features()));
                    let decoded = decoder
                        .decode(pages, |p, out| sink.read_page(p, out))
                        .map_err(|e| {
                            SinkError(format!("undecodable pages from the source: {e}"))
                        })?;
                    for run in &decoded.runs {
                        sink.install(run, channel)?;
                    }
                    counts.lz4.fetch_add(decoded.lz4_pages, Relaxed);
                    counts.refs.fetch_add(decoded.ref_pages, Relaxed);
                    if !decoded.unresolved.is_empty() {
                        // Content that changed (or is gone) here: fetch the page itself.
                        counts
                            .refetched
                            .fetch_add(decoded.unresolved.len() as u64, Relaxed);
                        lock(&session).request(&decoded.unresolved);
                        flush(&session, &out).await?;
                    }
                    if sink.is_complete() {
                        progress.notify_one();
                    }
                }
                Ok(Some(Delivery::Update { pages, versions })) => {
                    sink.store(&pages, &versions)?;
                    counts.stored.fetch_add(versions.len() as u64, Relaxed);
                    progress.notify_one();
                }
                Ok(None) => {}
                Err(e) => {
                    flush(&session, &out).await.ok();
                    return Err(e.into());
                }
            }
        }
    }
    .await;
    if let Err(e) = result {
        if !lock(&session).is_finished() {
            let _ = errors.send(e);
        }
    }
}
