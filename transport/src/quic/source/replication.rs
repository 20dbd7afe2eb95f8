//! The source's replication driver: updates on the bulk stream, the standby's answers
//! back to the replicator. With recovery (docs/recovery.md) one session outlives its
//! connections: a lost one pauses it, a new one resumes it with a fresh handshake (the
//! standby's invalid pages again), and the replicator sends again what was not
//! acknowledged.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{Connection, SendStream, VarInt};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::super::frame::{write_message, FrameError};
use super::super::link::{ControlReader, Link, Shared};
use super::super::recovery::{lost, settle, silent_for, Outages, Pauses, SourceRecovery};
use super::super::{
    close_with, closed_or, stream_error, DriverError, CLOSE_OK, RECONNECTING, REPLICATION_STOPPED,
};
use super::driver_turn::DriverTurn;
use super::{handshake, open_streams};
use crate::bitmap::Bitmap;
use crate::message::{Message, Pages};
use crate::proto::{Channel, SessionState, SourceEvent, SourceSession};

/// What the replication driver tells the replicator.
#[derive(Debug)]
pub enum ReplicationEvent {
    /// The standby cannot serve these pages: treat them as never acknowledged.
    Invalid(Bitmap),
    /// The standby stored these (page, version) pairs.
    Acked(Vec<(u64, u64)>),
    /// The connection was lost and the session paused: updates sent and not acknowledged
    /// may never have arrived, and updates handed over from now on until
    /// [`ReplicationEvent::Resumed`] are dropped. (With recovery only.)
    Paused,
    /// A new connection runs the session again; the standby's invalid pages came just
    /// before (as [`ReplicationEvent::Invalid`]).
    Resumed,
}

/// One batch of replicated pages: consecutive pages from `pages.first` at `versions`.
#[derive(Debug)]
pub struct Update {
    /// The pages' contents.
    pub pages: Pages,
    /// One version per page.
    pub versions: Vec<u64>,
}

/// What a replication session moved.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReplicationReport {
    /// Pages sent in updates (on every connection).
    pub pages_sent: u64,
    /// Update messages sent.
    pub updates_sent: u64,
    /// Acknowledgements counted by the driver (not tracked: always 0).
    pub acks: u64,
    /// UDP bytes sent over all the session's connections, as counted by this side's QUIC
    /// stack.
    pub udp_tx_bytes: u64,
    /// UDP bytes received.
    pub udp_rx_bytes: u64,
    /// What link outages did. `bytes_resent` is 0 here: which pages went out again after
    /// a pause is the replicator's to count (its ledger knows what was in flight).
    #[serde(flatten)]
    pub outages: Outages,
}

impl ReplicationReport {
    fn add_udp(&mut self, conn: &Connection) {
        let stats = conn.stats();
        self.udp_tx_bytes += stats.udp_tx.bytes;
        self.udp_rx_bytes += stats.udp_rx.bytes;
    }
}

/// Runs a `Replicate` session on one connection: sends every [`Update`] the replicator
/// produces on the bulk stream and reports the standby's answers on `events`. Ends cleanly
/// (close code 0) when the replicator drops its sender; a lost connection ends it with an
/// error ([`run_replication_recovering`] resumes it).
pub async fn run_replication(
    conn: Connection,
    session: SourceSession,
    updates: mpsc::Receiver<Update>,
    events: mpsc::UnboundedSender<ReplicationEvent>,
) -> Result<ReplicationReport, DriverError> {
    run_replication_recovering(conn, session, updates, events, None).await
}

/// [`run_replication`] for a session that outlives its connection, like
/// [`super::run_source_recovering`]: when the connection is lost (0.6 s of silence, the idle
/// timeout, a reset; not the standby closing it with an error) the session pauses and the
/// replicator hears [`ReplicationEvent::Paused`]; `recovery` connects again (overlapping attempts),
/// and on the new connection the session sends its `Hello` again (same session id). The
/// standby answers with a fresh handshake and its invalid pages, then
/// [`ReplicationEvent::Resumed`]. Updates handed over while paused are dropped (the
/// replicator sends again whatever was not acknowledged). Dropping the update sender ends
/// the session, also while paused.
pub async fn run_replication_recovering(
    conn: Connection,
    session: SourceSession,
    mut updates: mpsc::Receiver<Update>,
    events: mpsc::UnboundedSender<ReplicationEvent>,
    recovery: Option<SourceRecovery>,
) -> Result<ReplicationReport, DriverError> {
    let session: Shared<SourceSession> = Arc::new(Mutex::new(session));
    let mut report = ReplicationReport::default();
    let mut pauses = Pauses::default();
    let mut conn = conn;
    let recovering = recovery.is_some();
    let ended = loop {
        let mut on = OnConnection {
            conn: &conn,
            session: &session,
            events: &events,
            report: &mut report,
            pauses: &mut pauses,
            recovering,
        };
        let result = on.run(&mut updates).await;
        report.add_udp(&conn);
        let e = match result {
            Ok(()) => break Ok(()),
            Err(e) => e,
        };
        let failed = session_of(&session).session_state() == SessionState::Failed;
        let Some(recovery) = recovery.as_ref().filter(|_| !failed && lost(&e)) else {
            break Err(e);
        };
        tracing::warn!(
            error = %crate::chain(&e),
            "the connection to the standby was lost; replication pauses and reconnects"
        );
        session_of(&session).connection_lost();
        pauses.lost_since(silent_for(&e));
        let _ = events.send(ReplicationEvent::Paused);
        let paused_at = pauses.paused_since().unwrap_or_else(Instant::now);
        let next = tokio::select! {
            c = recovery.reconnect(paused_at) => Some(c),
            () = drop_updates(&mut updates) => None,
        };
        conn = match next {
            Some(Ok(c)) => c,
            Some(Err(e)) => break Err(e),
            // The replicator stopped while the session waited.
            None => break Ok(()),
        };
        if let Some(f) = &recovery.on_connection {
            f(&conn);
        }
        tracing::info!(peer = %conn.remote_address(), "reconnected; replication resumes");
        pauses.connected();
        session_of(&session).resume();
    };
    pauses.finish();
    let stats = session_of(&session).stats();
    report.outages = pauses.outages(stats.pauses, 0);
    ended.map(|()| report)
}

fn session_of(s: &Shared<SourceSession>) -> std::sync::MutexGuard<'_, SourceSession> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Takes and drops updates until the replicator drops its sender.
async fn drop_updates(updates: &mut mpsc::Receiver<Update>) {
    while updates.recv().await.is_some() {}
}

/// One connection of a replication session.
struct OnConnection<'a> {
    conn: &'a Connection,
    session: &'a Shared<SourceSession>,
    events: &'a mpsc::UnboundedSender<ReplicationEvent>,
    report: &'a mut ReplicationReport,
    pauses: &'a mut Pauses,
    recovering: bool,
}

impl OnConnection<'_> {
    /// Opens the streams (the `Hello`), runs the handshake, then sends updates until the
    /// replicator stops (`Ok`) or the connection fails. The connection is closed before
    /// its streams are dropped: a stream finished on drop must not look like an end of
    /// replication to the standby.
    async fn run(&mut self, updates: &mut mpsc::Receiver<Update>) -> Result<(), DriverError> {
        let conn = self.conn;
        let (link, mut failures, streams) = match open_streams(conn, self.session.clone()).await {
            Ok(opened) => opened,
            Err(e) => return Err(self.closed(e).await),
        };
        let link = Arc::new(link);
        // A session that can resume notices a cut within seconds, not at the idle timeout.
        // Keep-alives (every 2 s) keep a replication with nothing to send from looking
        // silent.
        let _watchdog = self.recovering.then(|| link.watch_silence());
        let mut control = ControlReader::start(streams.ctl_recv);
        let mut bulk = streams.bulk;
        let events = self.events;
        let shaken = tokio::select! {
            r = handshake(&link, &mut control, |ev| on_event(ev, events)) => r,
            Some(e) = failures.recv() => Err(e),
        };
        if let Err(e) = shaken {
            return Err(self.closed(e).await);
        }
        if self.pauses.paused_since().is_some() {
            self.pauses.resumed();
            let _ = events.send(ReplicationEvent::Resumed);
        }
        let mut acks = Some(tokio::spawn(read_acks(
            link.clone(),
            control,
            events.clone(),
        )));
        let sent = self
            .send(updates, &mut bulk, &mut failures, &mut acks)
            .await;
        let outcome = match sent {
            Ok(()) => {
                let _ = bulk.finish();
                // Give in-flight acknowledgements a moment, so the replicator's view is
                // current.
                let _ = tokio::time::timeout(Duration::from_millis(200), bulk.stopped()).await;
                conn.close(VarInt::from_u32(CLOSE_OK), REPLICATION_STOPPED);
                Ok(())
            }
            Err(e) => Err(self.closed(e).await),
        };
        // Not if it ended (a join handle must not be awaited twice).
        if let Some(acks) = acks {
            acks.abort();
            let _ = acks.await;
        }
        outcome
    }

    /// Closes the connection after `e`: without a reason if the session may resume on
    /// another (the standby then waits for it), else with `e`.
    async fn closed(&self, e: DriverError) -> DriverError {
        let e = settle(self.conn, e).await;
        if self.recovering && lost(&e) {
            self.conn.close(VarInt::from_u32(CLOSE_OK), RECONNECTING);
        } else {
            close_with(self.conn, &e);
        }
        e
    }

    /// Sends every update the replicator hands over until it drops its sender.
    async fn send(
        &mut self,
        updates: &mut mpsc::Receiver<Update>,
        bulk: &mut SendStream,
        failures: &mut mpsc::UnboundedReceiver<DriverError>,
        acks: &mut Option<Acks>,
    ) -> Result<(), DriverError> {
        let conn = self.conn;
        // A hurried replicator hands over its whole backlog at once; writes that find room
        // must not keep the connection's driver waiting behind them.
        let mut turn = DriverTurn::new();
        loop {
            turn.give().await;
            let next = tokio::select! {
                next = updates.recv() => next,
                r = acks_joined(acks) => return Err(acks_ended(conn, r)),
                Some(e) = failures.recv() => return Err(e),
            };
            let Some(Update { pages, versions }) = next else {
                return Ok(());
            };
            let count = versions.len() as u64;
            // A write waiting for flow control on a cut link gives way to the silence
            // watchdog.
            tokio::select! {
                r = write_update(bulk, pages, versions) => {
                    r.map_err(|e| stream_error(conn, Channel::Bulk, e))?
                }
                r = acks_joined(acks) => return Err(acks_ended(conn, r)),
                Some(e) = failures.recv() => return Err(e),
            }
            self.report.pages_sent += count;
            self.report.updates_sent += 1;
        }
    }
}

/// The task reading acknowledgements.
type Acks = JoinHandle<Result<(), DriverError>>;

/// Resolves when the task reading acknowledgements ended, and forgets its handle then.
async fn acks_joined(
    acks: &mut Option<Acks>,
) -> Result<Result<(), DriverError>, tokio::task::JoinError> {
    match acks.as_mut() {
        Some(task) => {
            let r = task.await;
            *acks = None;
            r
        }
        None => std::future::pending().await,
    }
}

/// Why the task reading acknowledgements ended.
fn acks_ended(
    conn: &Connection,
    r: Result<Result<(), DriverError>, tokio::task::JoinError>,
) -> DriverError {
    match r {
        Ok(Ok(())) => closed_or(conn, "the standby closed the control stream"),
        Ok(Err(e)) => e,
        Err(_) => DriverError::Timeout("ack reader stopped"),
    }
}

/// The one place a replication session's events are acted on: the replicator hears them.
fn on_event(ev: SourceEvent, events: &mpsc::UnboundedSender<ReplicationEvent>) {
    // A replicator that stopped listening is ending the session itself.
    let _ = match ev {
        SourceEvent::Invalid(b) => events.send(ReplicationEvent::Invalid(b)),
        SourceEvent::Acked(entries) => events.send(ReplicationEvent::Acked(entries)),
        // Informational: replication starts when the handshake returns.
        SourceEvent::Established { .. } => Ok(()),
        // Only a migration or an evacuation completes; a replication session ends when
        // the replicator stops it.
        SourceEvent::Finished => Ok(()),
        // The driver tells the replicator itself, when it pauses and once the handshake on
        // the new connection is done.
        SourceEvent::Paused | SourceEvent::Resumed { .. } => Ok(()),
    };
}

/// Reads the standby's control messages (acknowledgements) until the stream ends.
async fn read_acks(
    link: Arc<Link<SourceSession>>,
    mut control: ControlReader,
    events: mpsc::UnboundedSender<ReplicationEvent>,
) -> Result<(), DriverError> {
    loop {
        let read = control.next().await;
        let Some(msg) = link.checked(Channel::Control, read).await? else {
            return Ok(());
        };
        link.handle(Channel::Control, msg).await?;
        for ev in link.events() {
            on_event(ev, &events);
        }
    }
}

async fn write_update(
    bulk: &mut SendStream,
    pages: Pages,
    versions: Vec<u64>,
) -> Result<(), FrameError> {
    write_message(bulk, &Message::Update { pages, versions }).await
}
