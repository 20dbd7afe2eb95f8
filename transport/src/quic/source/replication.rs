//! The source's replication driver: updates on the bulk stream, the standby's answers
//! back to the replicator.

use std::sync::Arc;
use std::time::Duration;

use quinn::{Connection, SendStream, VarInt};
use serde::Serialize;
use tokio::sync::mpsc;

use super::super::frame::{write_message, FrameError};
use super::super::link::{ControlReader, Link};
use super::super::{close_with, closed_or, stream_error, DriverError, CLOSE_OK};
use super::{handshake, open_streams};
use crate::bitmap::Bitmap;
use crate::message::{Message, Pages};
use crate::proto::{Channel, SourceEvent, SourceSession};

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
    /// The pages' contents.
    pub pages: Pages,
    /// One version per page.
    pub versions: Vec<u64>,
}

/// What a replication session moved.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReplicationReport {
    /// Pages sent in updates.
    pub pages_sent: u64,
    /// Update messages sent.
    pub updates_sent: u64,
    /// Acknowledgements counted by the driver (not tracked: always 0).
    pub acks: u64,
    /// UDP bytes sent, as counted by this side's QUIC stack.
    pub udp_tx_bytes: u64,
    /// UDP bytes received.
    pub udp_rx_bytes: u64,
}

/// Runs a `Replicate` session: sends every [`Update`] the replicator produces on the bulk
/// stream and reports the standby's answers on `events`. Ends cleanly (close code 0) when
/// the replicator drops its sender.
pub async fn run_replication(
    conn: Connection,
    session: SourceSession,
    updates: mpsc::Receiver<Update>,
    events: mpsc::UnboundedSender<ReplicationEvent>,
) -> Result<ReplicationReport, DriverError> {
    let result = replicate(&conn, session, updates, events).await;
    match result {
        Ok(r) => {
            conn.close(VarInt::from_u32(CLOSE_OK), b"replication stopped");
            Ok(r)
        }
        Err(e) => {
            close_with(&conn, &e);
            Err(e)
        }
    }
}

async fn replicate(
    conn: &Connection,
    session: SourceSession,
    mut updates: mpsc::Receiver<Update>,
    events: mpsc::UnboundedSender<ReplicationEvent>,
) -> Result<ReplicationReport, DriverError> {
    let (link, _failures, streams) =
        open_streams(conn, Arc::new(std::sync::Mutex::new(session))).await?;
    let link = Arc::new(link);
    let mut control = ControlReader::start(streams.ctl_recv);
    handshake(&link, &mut control, |ev| on_event(ev, &events)).await?;
    let mut bulk = streams.bulk;
    let mut report = ReplicationReport::default();
    let acks = tokio::spawn(read_acks(link.clone(), control, events));
    tokio::pin!(acks);
    loop {
        tokio::select! {
            next = updates.recv() => match next {
                Some(Update { pages, versions }) => {
                    report.pages_sent += versions.len() as u64;
                    report.updates_sent += 1;
                    write_update(&mut bulk, pages, versions)
                        .await
                        .map_err(|e| stream_error(conn, Channel::Bulk, e))?;
                }
                None => break,
            },
            r = &mut acks => {
                r.map_err(|_| DriverError::Timeout("ack reader stopped"))??;
                return Err(closed_or(conn, "the standby closed the control stream"));
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
        // This driver never reports a lost connection to the session (a lost connection
        // ends the session with an error, as before the resume work), so these never come.
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
