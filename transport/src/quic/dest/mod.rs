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
use tokio::task::JoinHandle;

use super::frame::FrameError;
use super::link::{ControlReader, Link};
use super::read_ahead::ReadAhead;
use super::{
    close_with, closed_or, connection_lost, DriverError, CLOSE_OK, TAG_BULK, TAG_CONTROL,
    TAG_URGENT,
};
use crate::bitmap::Bitmap;
use crate::message::{Message, Pages, SessionKind};
use crate::proto::{Channel, DestEvent, DestSession};
use receive::{forward_requests, receive_pages, Frames, Received};

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

/// The destination's half of a session, shared by its tasks.
struct Dest {
    link: Link<DestSession>,
    sink: Arc<dyn PageSink>,
    /// Woken when pages arrived: the sink may be complete, or have something to acknowledge.
    progress: Notify,
    counts: Received,
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
    let result = async {
        let streams = accept_streams(&conn).await?;
        let (mut driver, mut readers) = Driver::new(&conn, session, sink, streams, started);
        driver.handshake(hooks, &mut readers.bulk).await?;
        driver.run(readers, requests).await
    }
    .await;
    match result {
        Ok(mut report) => {
            conn.close(VarInt::from_u32(CLOSE_OK), b"migration complete");
            let stats = conn.stats();
            report.wire_bytes = stats.udp_tx.bytes + stats.udp_rx.bytes;
            report.closed(started.elapsed().as_millis() as u64);
            Ok(report)
        }
        Err(e) => {
            close_with(&conn, &e);
            Err(e)
        }
    }
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

async fn read_tag(recv: &mut RecvStream) -> Result<u8, DriverError> {
    let mut tag = [0u8];
    recv.read_exact(&mut tag)
        .await
        .map_err(|e| DriverError::Stream {
            channel: Channel::Control,
            source: match e {
                quinn::ReadExactError::FinishedEarly(_) => FrameError::Truncated,
                quinn::ReadExactError::ReadError(e) => FrameError::Read(e),
            },
        })?;
    Ok(tag[0])
}

/// The streams the page readers take over once the session runs.
struct Readers {
    urgent: RecvStream,
    /// Read from the start: the source may push before the session runs.
    bulk: ReadAhead,
}

/// The control loop: it reads the control stream, acts on every session event, and decides
/// when the session is over.
struct Driver {
    dest: Arc<Dest>,
    control: ControlReader,
    /// The first failure of a reader task.
    failures: mpsc::UnboundedReceiver<DriverError>,
    started: Instant,
    report: DestReport,
    /// The VM state the source sent, for the `on_established` hook.
    vm_state: Option<Vec<u8>>,
}

impl Driver {
    fn new(
        conn: &Connection,
        session: DestSession,
        sink: Arc<dyn PageSink>,
        streams: Streams,
        started: Instant,
    ) -> (Driver, Readers) {
        let Streams {
            control: (ctl_send, ctl_recv),
            urgent: (urg_send, urg_recv),
            bulk,
        } = streams;
        let (link, failures) = Link::new(conn.clone(), session, ctl_send, Some(urg_send));
        let dest = Arc::new(Dest {
            link,
            sink,
            progress: Notify::new(),
            counts: Received::default(),
        });
        let driver = Driver {
            dest,
            control: ControlReader::start(ctl_recv),
            failures,
            started,
            report: DestReport::default(),
            vm_state: None,
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

    fn ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Reads control messages until the session runs (the source's `Hello`; for a standby
    /// also the stale set and the VM state), then lets the guest resume. Nothing touches
    /// guest memory before the handshake is accepted.
    async fn handshake(
        &mut self,
        hooks: DestHooks,
        bulk: &mut ReadAhead,
    ) -> Result<(), DriverError> {
        while !self.link().session().is_running() {
            let read = self.control.next().await;
            let Some(msg) = self.link().checked(Channel::Control, read).await? else {
                return Err(closed_or(
                    &self.link().conn,
                    "the source closed the control stream",
                ));
            };
            self.link().handle(Channel::Control, msg).await?;
            self.on_events().await?;
        }
        let kind = self.link().session().kind();
        self.report.kind = Some(kind);
        self.report.established_ms = self.ms();
        self.report.early_push_bytes = bulk.held_bytes() as u64;
        bulk.shrink_to(BULK_READ_AHEAD_RUNNING);
        if kind != SessionKind::Replicate {
            if let Some(f) = hooks.on_established {
                f(&self.report.vm_id, self.vm_state.as_deref());
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
                        self.report.pages_stale = stale.count_ones();
                        self.dest.sink.prepare_stale(&stale)?;
                    }
                    DestEvent::VmState(blob) => self.vm_state = Some(blob),
                    DestEvent::Established { vm_id, .. } => self.report.vm_id = vm_id,
                    // Informational: from here on missing pages come on demand only.
                    DestEvent::PushDone { pages_sent } => {
                        tracing::debug!(pages_sent, "the source pushed every page")
                    }
                    // Informational: the run loop ends on `is_finished`, checked after
                    // every control message.
                    DestEvent::Finished => tracing::debug!("the source acknowledged completion"),
                    // This driver never reports a lost connection to the session (a lost
                    // connection still ends it with an error), so these never come.
                    DestEvent::Paused { .. } | DestEvent::Resumed { .. } => {
                        tracing::debug!(?ev, "a resume event without resuming")
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
        requests: mpsc::UnboundedReceiver<Vec<u64>>,
    ) -> Result<DestReport, DriverError> {
        let tasks = Tasks::spawn(&self.dest, readers, requests);
        let outcome = self.control_loop().await;
        if let Err(e) = &outcome {
            // Tell the peer why before the tasks stop and their streams end (see the
            // source driver).
            close_with(&self.dest.link.conn, e);
        }
        self.control.stop().await;
        tasks.stop().await;
        self.teardown()?;
        outcome?;
        Ok(self.report)
    }

    async fn control_loop(&mut self) -> Result<(), DriverError> {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tokio::select! {
                read = self.control.next() => if self.on_control(read).await? {
                    return Ok(());
                },
                Some(e) = self.failures.recv() => return self.task_failed(e),
                _ = self.dest.progress.notified() => {}
                _ = tick.tick() => {}
            }
            self.after_progress().await?;
        }
    }

    fn kind(&self) -> SessionKind {
        self.report.kind.unwrap_or(SessionKind::Migrate)
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
            let at = self.ms();
            let completes = {
                let mut s = self.dest.link.session();
                let completes = s.is_running() && !s.is_finished() && !s.complete_sent();
                if completes {
                    s.complete();
                }
                completes
            };
            if completes {
                self.report.present_at(at);
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
        self.report.pages_replicated = counts.stored();
        self.report.decoded = DecodeStats {
            pages_lz4: counts.lz4(),
            pages_ref: counts.refs(),
            refs_refetched: counts.refetched(),
        };
        let received = self.link().session().received().count_ones();
        self.report.pages_received = received;
        Ok(())
    }
}

/// The tasks beside the control loop while the session runs.
struct Tasks {
    readers: [JoinHandle<()>; 2],
    requests: JoinHandle<()>,
}

impl Tasks {
    fn spawn(
        dest: &Arc<Dest>,
        readers: Readers,
        requests: mpsc::UnboundedReceiver<Vec<u64>>,
    ) -> Tasks {
        let read = |channel, frames| tokio::spawn(receive_pages(dest.clone(), channel, frames));
        Tasks {
            readers: [
                read(Channel::Urgent, Frames::Stream(readers.urgent)),
                read(Channel::Bulk, Frames::Ahead(readers.bulk)),
            ],
            requests: tokio::spawn(forward_requests(dest.clone(), requests)),
        }
    }

    /// Stops every task for good (an install in progress finishes) before the counts are
    /// read.
    async fn stop(self) {
        self.requests.abort();
        for r in &self.readers {
            r.abort();
        }
        for r in self.readers {
            let _ = r.await;
        }
        let _ = self.requests.await;
    }
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
