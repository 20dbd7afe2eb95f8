//! Source driver: serves demand requests and pushes every page in the background.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{Connection, RecvStream, SendStream, VarInt};
use serde::Serialize;
use tokio::sync::mpsc;

use super::frame::{
    read_frame, write_final, write_message, write_pages, write_pages_batch, FrameError,
};
use super::{
    close_with, connection_lost, DriverError, PRIO_BULK, PRIO_CONTROL, PRIO_URGENT, TAG_BULK,
    TAG_CONTROL, TAG_URGENT,
};
use crate::bitmap::Bitmap;
use crate::encoding::{EncodingStats, PageEncoder};
use crate::message::{Pages, MAX_PAGES_PER_MESSAGE, PAGE_SIZE};
use crate::proto::{Channel, SourceEvent, SourceSession};

/// Guest memory as the source sees it: frozen at switchover, read-only for the session.
pub trait PageReader: Send + Sync + 'static {
    /// The bytes of `count` consecutive pages starting at page `first`.
    fn pages(&self, first: u64, count: usize) -> Result<&[u8], String>;
}

/// What the source did, for the migration report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SourceReport {
    pub pages_served: u64,
    pub pages_pushed: u64,
    /// Of those, pushed beside the handshake, before the destination answered.
    pub pages_pushed_early: u64,
    /// Pages that had to cross: all for a migration, the stale set at evacuation.
    pub pages_stale: u64,
    pub push_ms: u64,
    pub total_ms: u64,
    pub udp_tx_bytes: u64,
    pub udp_rx_bytes: u64,
    /// Pushed and served page bytes by kind, the compression ratio and what the tuner chose.
    pub encoding: EncodingStats,
}

/// Pages per push message: 256 KiB keeps quinn's send buffer fed without large latency.
const PUSH_RUN: usize = 64;
/// Longest the push waits for the replica's content index (about the time to hash 2 GiB on
/// one core here); without it the push starts and references only what it pushed itself.
const REPLICA_INDEX_WAIT: Duration = Duration::from_millis(250);

type Shared = Arc<Mutex<SourceSession>>;
type ControlSend = Arc<tokio::sync::Mutex<SendStream>>;
/// A send stream that the push and the demand replies may share.
type SharedSend = Arc<tokio::sync::Mutex<SendStream>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, SourceSession> {
    // A poisoned lock means another task panicked mid-update; the session state is a plain
    // value that stays consistent between statements, so carrying on is sound.
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sends whatever the session queued (the source only ever queues control messages).
async fn flush(session: &Shared, control: &ControlSend) -> Result<(), DriverError> {
    let out: Vec<_> = std::iter::from_fn(|| lock(session).poll_transmit()).collect();
    if out.is_empty() {
        return Ok(());
    }
    let mut send = control.lock().await;
    for t in out {
        debug_assert_eq!(t.channel, Channel::Control);
        let written = if matches!(t.message, crate::message::Message::Error { .. }) {
            write_final(&mut send, &t.message).await
        } else {
            write_message(&mut send, &t.message).await
        };
        written.map_err(|source| DriverError::Stream {
            channel: Channel::Control,
            source,
        })?;
    }
    Ok(())
}

/// Runs the source side of one migration over an established connection.
pub async fn run_source(
    conn: Connection,
    session: SourceSession,
    reader: Arc<dyn PageReader>,
) -> Result<SourceReport, DriverError> {
    let started = Instant::now();
    let session: Shared = Arc::new(Mutex::new(session));
    let result = drive(&conn, &session, reader).await;
    match result {
        Ok(mut report) => {
            // The destination closes once it has our CompleteAck; wait for that briefly so
            // the acknowledgement is not lost with our own endpoint.
            let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
            let stats = conn.stats();
            report.udp_tx_bytes = stats.udp_tx.bytes;
            report.udp_rx_bytes = stats.udp_rx.bytes;
            report.total_ms = started.elapsed().as_millis() as u64;
            Ok(report)
        }
        Err(e) => {
            close_with(&conn, &e);
            Err(e)
        }
    }
}

struct Streams {
    control: ControlSend,
    ctl_recv: RecvStream,
    urg_send: SendStream,
    urg_recv: RecvStream,
    bulk: SendStream,
}

/// Opens the three tagged streams and sends the `Hello`.
async fn open_streams(conn: &Connection, session: &Shared) -> Result<Streams, DriverError> {
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
        s.write_all(&[tag]).await.map_err(|e| DriverError::Stream {
            channel: Channel::Control,
            source: e.into(),
        })?;
    }
    let control: ControlSend = Arc::new(tokio::sync::Mutex::new(ctl_send));
    flush(session, &control).await?;
    Ok(Streams {
        control,
        ctl_recv,
        urg_send,
        urg_recv,
        bulk,
    })
}

/// Reads control messages until the session runs (HelloAck, and for a standby its invalid
/// pages); returns the events the handshake produced.
async fn handshake(
    conn: &Connection,
    session: &Shared,
    control: &ControlSend,
    ctl_recv: &mut RecvStream,
) -> Result<Vec<SourceEvent>, DriverError> {
    let mut events = Vec::new();
    while !lock(session).is_running() {
        let reply = tokio::time::timeout(Duration::from_secs(30), read_frame(ctl_recv))
            .await
            .map_err(|_| DriverError::Timeout("waiting for the destination's handshake"))?;
        let reply = match reply {
            Ok(Some(m)) => m,
            Ok(None) => return Err(closed_or(conn, "the destination closed the control stream")),
            Err(FrameError::Codec(c)) => {
                let err = lock(session).handle_decode_error(c);
                flush(session, control).await.ok();
                return Err(err.into());
            }
            Err(e) => return Err(stream_error(conn, Channel::Control, e)),
        };
        let handled = lock(session).handle(Channel::Control, reply);
        flush(session, control).await?;
        handled?;
        events.extend(std::iter::from_fn(|| lock(session).poll_event()));
    }
    Ok(events)
}

async fn drive(
    conn: &Connection,
    session: &Shared,
    reader: Arc<dyn PageReader>,
) -> Result<SourceReport, DriverError> {
    let Streams {
        control,
        mut ctl_recv,
        urg_send,
        urg_recv,
        bulk,
    } = open_streams(conn, session).await?;
    let bulk: SharedSend = Arc::new(tokio::sync::Mutex::new(bulk));
    // The push starts beside the handshake with what must cross anyway; raw, as nothing is
    // negotiated yet (a round trip saved on a long link).
    let push_started = Instant::now();
    let early_encoder: SharedEncoder = Arc::new(Mutex::new(PageEncoder::new(
        crate::encoding::EncodingPolicy::OFF,
        0,
    )));
    let early = tokio::spawn(push_early(
        session.clone(),
        bulk.clone(),
        reader.clone(),
        conn.clone(),
        early_encoder.clone(),
    ));
    // A failed early push (memory unreadable, the stream refused) ends the session before
    // the destination may resume a guest this source is about to abandon.
    let mut early = Some(early);
    let events = {
        let hs = handshake(conn, session, &control, &mut ctl_recv);
        tokio::pin!(hs);
        loop {
            tokio::select! {
                r = &mut hs => match r {
                    Ok(events) => break events,
                    Err(e) => {
                        if let Some(t) = early.take() {
                            t.abort();
                        }
                        return Err(e);
                    }
                },
                r = async {
                    match early.as_mut() {
                        Some(t) => t.await,
                        None => std::future::pending().await,
                    }
                }, if early.is_some() => {
                    early = None;
                    joined(r)?;
                }
            }
        }
    };
    let features = events
        .iter()
        .find_map(|e| match e {
            SourceEvent::Established { features } => Some(*features),
            _ => None,
        })
        .unwrap_or(0);
    let policy = lock(session).encoding();
    let replies_on_bulk = lock(session).replies_on_bulk();
    let replica_index = lock(session).replica_index();
    // Each task encodes with its own encoder; the report reads their counts once at the
    // end (the tasks are stopped by then), so nothing is copied per reply or batch.
    let reply_encoder: SharedEncoder = Arc::new(Mutex::new(PageEncoder::new(policy, features)));
    let push_encoder: SharedEncoder = Arc::new(Mutex::new(match replica_index {
        Some(index) => PageEncoder::new(policy, features).with_replica_index(index),
        None => PageEncoder::new(policy, features),
    }));
    // Replies normally have a stream of their own, ahead of the push in priority; the
    // comparison mode queues them behind the push on the bulk stream instead.
    let (replies, _unused_urgent): (SharedSend, _) = if replies_on_bulk {
        (bulk.clone(), Some(urg_send))
    } else {
        (Arc::new(tokio::sync::Mutex::new(urg_send)), None)
    };
    let (err_tx, mut err_rx) = mpsc::unbounded_channel::<DriverError>();
    let urgent = tokio::spawn(serve_urgent(
        session.clone(),
        control.clone(),
        urg_recv,
        replies,
        reader.clone(),
        err_tx.clone(),
        conn.clone(),
        reply_encoder.clone(),
    ));
    // Demand replies run at once; the push continues after the early push's last batch,
    // which may still be waiting for flow-control credit.
    let push = tokio::spawn({
        let (session, control, conn) = (session.clone(), control.clone(), conn.clone());
        let (errors, encoder) = (err_tx.clone(), push_encoder.clone());
        async move {
            if let Some(t) = early {
                if let Err(e) = joined(t.await) {
                    let _ = errors.send(e);
                    return;
                }
            }
            push_all(session, control, bulk, reader, errors, conn, encoder).await
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

    let outcome = loop {
        tokio::select! {
            frame = ctl_rx.recv() => match frame {
                Some(Ok(Some(msg))) => {
                    let handled = lock(session).handle(Channel::Control, msg);
                    flush(session, &control).await?;
                    handled?;
                    if lock(session).is_finished() {
                        break Ok(());
                    }
                }
                Some(Ok(None)) | None => {
                    break Err(closed_or(conn, "the destination closed the control stream"))
                }
                Some(Err(FrameError::Codec(c))) => {
                    let err = lock(session).handle_decode_error(c);
                    flush(session, &control).await.ok();
                    break Err(err.into());
                }
                Some(Err(e)) => break Err(stream_error(conn, Channel::Control, e)),
            },
            Some(e) = err_rx.recv() => break Err(e),
        }
    };
    let push_ms = push_started.elapsed().as_millis() as u64;
    ctl_reader.abort();
    push.abort();
    urgent.abort();
    // Stopped for good before their counts are read.
    let _ = tokio::join!(ctl_reader, push, urgent);
    outcome?;
    let replies = lock_encoder(&reply_encoder).stats();
    let mut encoding = lock_encoder(&push_encoder).stats();
    encoding.merge(&replies);
    encoding.merge(&lock_encoder(&early_encoder).stats());
    let s = lock(session);
    Ok(SourceReport {
        // Replies actually sent: a request that crossed the destination's `Complete` may
        // have been cut short when the session ended.
        pages_served: replies.pages(),
        pages_pushed: s.pages_pushed(),
        pages_pushed_early: s.pages_pushed_early(),
        pages_stale: s.pages_stale(),
        push_ms,
        encoding,
        ..SourceReport::default()
    })
}

/// What the replication driver tells the replicator.
#[derive(Debug)]
pub enum ReplicationEvent {
    /// The standby cannot serve these pages: treat them as never acknowledged.
    Invalid(Bitmap),
    /// The standby stored these (page, version) pairs.
    Acked(Vec<(u64, u64)>),
}

/// One batch of replicated pages: consecutive pages from `pages.first` at `versions`.
#[derive(Debug)]
pub struct Update {
    pub pages: Pages,
    pub versions: Vec<u64>,
}

/// What a replication session moved.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReplicationReport {
    pub pages_sent: u64,
    pub updates_sent: u64,
    pub acks: u64,
    pub udp_tx_bytes: u64,
    pub udp_rx_bytes: u64,
}

/// Runs a `Replicate` session: sends every [`Update`] the replicator produces on the bulk
/// stream and reports the standby's answers on `events`. Ends cleanly (close code 0) when
/// the replicator drops its sender.
pub async fn run_replication(
    conn: Connection,
    session: SourceSession,
    mut updates: mpsc::Receiver<Update>,
    events: mpsc::UnboundedSender<ReplicationEvent>,
) -> Result<ReplicationReport, DriverError> {
    let session: Shared = Arc::new(Mutex::new(session));
    let result: Result<ReplicationReport, DriverError> = async {
        let mut streams = open_streams(&conn, &session).await?;
        for ev in handshake(&conn, &session, &streams.control, &mut streams.ctl_recv).await? {
            if let SourceEvent::Invalid(b) = ev {
                let _ = events.send(ReplicationEvent::Invalid(b));
            }
        }
        let Streams {
            control,
            mut ctl_recv,
            mut bulk,
            ..
        } = streams;
        let mut report = ReplicationReport::default();
        let ack_session = session.clone();
        let ack_control = control.clone();
        let ack_events = events.clone();
        let ack_conn = conn.clone();
        let acks = tokio::spawn(async move {
            let mut acked = 0u64;
            loop {
                let msg = match read_frame(&mut ctl_recv).await {
                    Ok(Some(m)) => m,
                    Ok(None) => return Ok(acked),
                    Err(FrameError::Codec(c)) => {
                        let err = lock(&ack_session).handle_decode_error(c);
                        flush(&ack_session, &ack_control).await.ok();
                        return Err(DriverError::from(err));
                    }
                    Err(e) => return Err(stream_error(&ack_conn, Channel::Control, e)),
                };
                let handled = lock(&ack_session).handle(Channel::Control, msg);
                flush(&ack_session, &ack_control).await?;
                handled?;
                while let Some(ev) = lock(&ack_session).poll_event() {
                    if let SourceEvent::Acked(entries) = ev {
                        acked += entries.len() as u64;
                        let _ = ack_events.send(ReplicationEvent::Acked(entries));
                    }
                }
            }
        });
        tokio::pin!(acks);
        loop {
            tokio::select! {
                next = updates.recv() => match next {
                    Some(u) => {
                        let Update { pages, versions } = u;
                        report.pages_sent += versions.len() as u64;
                        report.updates_sent += 1;
                        write_update(&mut bulk, pages, versions)
                            .await
                            .map_err(|e| stream_error(&conn, Channel::Bulk, e))?;
                    }
                    None => break,
                },
                r = &mut acks => {
                    r.map_err(|_| DriverError::Timeout("ack reader stopped"))??;
                    return Err(closed_or(&conn, "the standby closed the control stream"));
                }
            }
        }
        let _ = bulk.finish();
        // Give in-flight acknowledgements a moment, so the replicator's view is current.
        let _ = tokio::time::timeout(Duration::from_millis(200), bulk.stopped()).await;
        acks.abort();
        let stats = conn.stats();
        report.udp_tx_bytes = stats.udp_tx.bytes;
        report.udp_rx_bytes = stats.udp_rx.bytes;
        Ok(report)
    }
    .await;
    match result {
        Ok(r) => {
            conn.close(VarInt::from_u32(super::CLOSE_OK), b"replication stopped");
            Ok(r)
        }
        Err(e) => {
            close_with(&conn, &e);
            Err(e)
        }
    }
}

async fn write_update(
    bulk: &mut SendStream,
    pages: Pages,
    versions: Vec<u64>,
) -> Result<(), FrameError> {
    write_message(bulk, &crate::message::Message::Update { pages, versions }).await
}

/// A task's encoder, shared with the driver so it can read the counts at the end. Locked
/// only around encoding (never across an await), so the lock is never contended.
type SharedEncoder = Arc<Mutex<PageEncoder>>;

fn lock_encoder(e: &SharedEncoder) -> std::sync::MutexGuard<'_, PageEncoder> {
    e.lock().unwrap_or_else(|p| p.into_inner())
}

#[allow(clippy::too_many_arguments)]
async fn serve_urgent(
    session: Shared,
    control: ControlSend,
    mut recv: RecvStream,
    send: SharedSend,
    reader: Arc<dyn PageReader>,
    errors: mpsc::UnboundedSender<DriverError>,
    conn: Connection,
    encoder: SharedEncoder,
) {
    let result: Result<(), DriverError> = async {
        loop {
            let msg = match read_frame(&mut recv).await {
                Ok(Some(m)) => m,
                Ok(None) => return Ok(()),
                Err(FrameError::Codec(c)) => {
                    let err = lock(&session).handle_decode_error(c);
                    flush(&session, &control).await.ok();
                    return Err(err.into());
                }
                Err(e) => return Err(stream_error(&conn, Channel::Urgent, e)),
            };
            let handled = lock(&session).handle(Channel::Urgent, msg);
            if let Err(e) = handled {
                flush(&session, &control).await.ok();
                return Err(e.into());
            }
            let events: Vec<_> = std::iter::from_fn(|| lock(&session).poll_event()).collect();
            for ev in events {
                if let SourceEvent::Serve(pages) = ev {
                    for page in pages {
                        let data = reader.pages(page, 1).map_err(DriverError::Reader)?;
                        let pages = lock_encoder(&encoder).encode_reply(page, data);
                        write_pages(&mut *send.lock().await, &pages)
                            .await
                            .map_err(|e| stream_error(&conn, Channel::Urgent, e))?;
                    }
                }
            }
        }
    }
    .await;
    report(result, &session, &errors);
}

/// The outcome of a driver task.
fn joined(r: Result<Result<(), DriverError>, tokio::task::JoinError>) -> Result<(), DriverError> {
    r.map_err(|e| DriverError::Task(e.to_string()))?
}

/// Fills `batch` with up to PUSH_RUN pages, in as many runs as the schedule hands out:
/// one run when the pages are contiguous, up to PUSH_RUN frames when they are scattered
/// (a stale set). Empty when the schedule has nothing more; for the `early` push, also
/// as soon as the session runs (the rest is [`push_all`]'s, encoded, and so is the
/// `PushDone` at its end).
fn next_batch(
    session: &Shared,
    reader: &dyn PageReader,
    encoder: &SharedEncoder,
    batch: &mut Vec<Pages>,
    early: bool,
) -> Result<(), DriverError> {
    let mut enc = lock_encoder(encoder);
    let mut count = 0;
    while count < PUSH_RUN {
        let next = {
            let mut s = lock(session);
            if early && !s.may_push_early() {
                None
            } else {
                s.next_push(PUSH_RUN - count)
            }
        };
        let Some(run) = next else { break };
        let n = (run.end - run.start) as usize;
        let data = reader.pages(run.start, n).map_err(DriverError::Reader)?;
        debug_assert_eq!(data.len(), n * PAGE_SIZE);
        batch.push(enc.encode_push(run.start, data));
        count += n;
    }
    Ok(())
}

/// The push before the destination answered the handshake (see
/// [`SourceSession::may_push_early`]): unencoded pages on the bulk stream, until the session
/// runs (then [`push_all`] takes over) or the early schedule is empty.
///
/// It writes only as fast as the link takes it, keeping at most [`EARLY_BACKLOG`] bytes
/// unsent: it fills a round trip the link would idle through, and what it left queued
/// when the session starts would cross unencoded where it could have been encoded.
async fn push_early(
    session: Shared,
    bulk: SharedSend,
    reader: Arc<dyn PageReader>,
    conn: Connection,
    encoder: SharedEncoder,
) -> Result<(), DriverError> {
    let sent = || conn.stats().udp_tx.bytes;
    let start = sent();
    let mut written = 0u64;
    let mut batch = Vec::new();
    while lock(&session).may_push_early() {
        if written > sent().saturating_sub(start) + EARLY_BACKLOG {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        next_batch(&session, &*reader, &encoder, &mut batch, true)?;
        if batch.is_empty() {
            break;
        }
        written += batch
            .iter()
            .map(|p| (p.kinds.len() + p.payload.len()) as u64)
            .sum::<u64>();
        write_pages_batch(&mut *bulk.lock().await, &batch)
            .await
            .map_err(|e| stream_error(&conn, Channel::Bulk, e))?;
        batch.clear();
    }
    Ok(())
}

/// Unsent bytes the early push leaves in the send buffer at most (two batches).
const EARLY_BACKLOG: u64 = 2 * (PUSH_RUN * PAGE_SIZE) as u64;

async fn push_all(
    session: Shared,
    control: ControlSend,
    bulk: SharedSend,
    reader: Arc<dyn PageReader>,
    errors: mpsc::UnboundedSender<DriverError>,
    conn: Connection,
    encoder: SharedEncoder,
) {
    const { assert!(PUSH_RUN <= MAX_PAGES_PER_MESSAGE) };
    let mut meter = LinkMeter::new(&conn);
    let result: Result<(), DriverError> = async {
        // References into the replica need its index, which the application builds beside
        // the handshake (it hashes the fresh memory): hold the push, not demand replies,
        // for it a bounded while. The handshake already took a round trip of it.
        let deadline = Instant::now() + REPLICA_INDEX_WAIT;
        while lock_encoder(&encoder).replica_index_pending() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut batch = Vec::new();
        loop {
            // Up to PUSH_RUN pages per write, in as many runs as the schedule hands out:
            // one run when the pages are contiguous, up to PUSH_RUN frames when they are
            // scattered (a stale set).
            next_batch(&session, &*reader, &encoder, &mut batch, false)?;
            if batch.is_empty() {
                break;
            }
            let wire: u64 = batch
                .iter()
                .map(|p| (p.kinds.len() + p.payload.len()) as u64)
                .sum();
            // How long the stream takes to accept the batch is the link's pace once the
            // send window is full: the tuner's measure of what a wire byte costs.
            let t = Instant::now();
            write_pages_batch(&mut *bulk.lock().await, &batch)
                .await
                .map_err(|e| stream_error(&conn, Channel::Bulk, e))?;
            batch.clear();
            let cost = meter.cost(&conn, wire, t.elapsed().as_nanos() as u64);
            lock_encoder(&encoder).observe_write(wire, cost);
        }
        // A bulk stream that also carries demand replies stays open until the session ends.
        if !lock(&session).replies_on_bulk() {
            let _ = bulk.lock().await.finish();
        }
        flush(&session, &control).await
    }
    .await;
    report(result, &session, &errors);
}

/// What a wire byte of the push costs, for the encoding tuner.
///
/// The time a write waits measures the link only once quinn's send buffer is full; a push
/// smaller than that buffer (a 10% evacuation, say) is buffered at once and would look free.
/// So while the push is ahead of the wire by more than [`LinkMeter::BACKLOG`] (bytes written
/// minus UDP bytes sent), the link sets the pace, and a byte costs what the connection's send
/// rate says, measured over intervals of at least [`LinkMeter::INTERVAL`] (UDP bytes leave
/// in bursts, so shorter intervals would mostly see none or many).
struct LinkMeter {
    written: u64,
    last: Instant,
    last_tx: u64,
    ns_per_byte: Option<f64>,
}

impl LinkMeter {
    const BACKLOG: u64 = 256 * 1024;
    const INTERVAL: Duration = Duration::from_millis(50);

    /// UDP bytes sent and not declared lost: what the link actually carried. (Sent bytes
    /// alone overstate a link whose bottleneck queue overflows.)
    fn delivered(conn: &Connection) -> u64 {
        let s = conn.stats();
        s.udp_tx.bytes.saturating_sub(s.path.lost_bytes)
    }

    fn new(conn: &Connection) -> LinkMeter {
        let tx = Self::delivered(conn);
        LinkMeter {
            written: tx,
            last: Instant::now(),
            last_tx: tx,
            ns_per_byte: None,
        }
    }

    /// The cost in ns of the `wire` bytes just written, whose write waited `write_ns`.
    fn cost(&mut self, conn: &Connection, wire: u64, write_ns: u64) -> u64 {
        self.written += wire;
        let tx = Self::delivered(conn);
        let now = Instant::now();
        let dt = now.duration_since(self.last);
        if dt >= Self::INTERVAL {
            let dtx = tx.saturating_sub(self.last_tx);
            if dtx > 0 {
                self.ns_per_byte = Some(dt.as_nanos() as f64 / dtx as f64);
            }
            self.last = now;
            self.last_tx = tx;
        }
        match self.ns_per_byte {
            Some(ns) if self.written.saturating_sub(tx) > Self::BACKLOG => {
                (ns * wire as f64).max(write_ns as f64) as u64
            }
            _ => write_ns,
        }
    }
}

/// Errors after the session finished are the destination hanging up, which is fine.
fn report(
    result: Result<(), DriverError>,
    session: &Shared,
    errors: &mpsc::UnboundedSender<DriverError>,
) {
    if let Err(e) = result {
        if !lock(session).is_finished() {
            let _ = errors.send(e);
        }
    }
}

/// A stream failing because the connection went away is reported as the connection's reason.
pub(crate) fn stream_error(
    conn: &Connection,
    channel: Channel,
    e: super::frame::FrameError,
) -> DriverError {
    match conn.close_reason() {
        Some(reason) => connection_lost(reason),
        None => DriverError::Stream { channel, source: e },
    }
}

pub(crate) fn closed_or(conn: &Connection, what: &'static str) -> DriverError {
    match conn.close_reason() {
        Some(reason) => connection_lost(reason),
        None => DriverError::PeerClosed {
            code: crate::message::ErrorCode::Aborted,
            reason: what.to_string(),
        },
    }
}
