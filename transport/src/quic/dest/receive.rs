//! The destination's tasks beside its control loop: one page reader per data stream (the
//! urgent replies and the bulk push, so a reply never waits behind pushed pages), the
//! forwarder of the fault loop's demand requests, and on a long path their echo.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::{RecvStream, SendStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::super::frame::{read_frame, write_message, FrameError};
use super::super::link::Session;
use super::super::read_ahead::{Held, ReadAhead};
use super::super::{connection_lost, stream_error, DriverError, PRIO_URGENT, TAG_ECHO};
use super::{Dest, SinkError};
use crate::encoding::PageDecoder;
use crate::message::{Message, Pages};
use crate::proto::{Channel, Delivery};

/// Counters the page readers share; read once they stopped.
#[derive(Default)]
pub(super) struct Received {
    stored: AtomicU64,
    lz4: AtomicU64,
    refs: AtomicU64,
    refetched: AtomicU64,
}

impl Received {
    /// Replication: pages stored in the replica.
    pub(super) fn stored(&self) -> u64 {
        self.stored.load(Relaxed)
    }
    pub(super) fn lz4(&self) -> u64 {
        self.lz4.load(Relaxed)
    }
    pub(super) fn refs(&self) -> u64 {
        self.refs.load(Relaxed)
    }
    pub(super) fn refetched(&self) -> u64 {
        self.refetched.load(Relaxed)
    }
}

/// Where a page reader gets its messages: straight from the stream (urgent replies), or
/// through a [`ReadAhead`] (the bulk push, which may start before the session runs).
pub(super) enum Frames {
    Stream(RecvStream),
    Ahead(ReadAhead),
}

impl Frames {
    /// The next message, with what keeps its read-ahead budget held while it is handled.
    async fn next(&mut self) -> (Result<Option<Message>, FrameError>, Option<Held>) {
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

/// Reads `channel`'s messages until the stream ends, installing page data in the sink (or
/// storing it in the replica).
pub(super) async fn receive_pages(dest: Arc<Dest>, channel: Channel, mut frames: Frames) {
    // Pages arrive only once the handshake is done: the encodings are known then.
    let mut decoder: Option<PageDecoder> = None;
    let result = async {
        loop {
            let (read, _held) = frames.next().await;
            let Some(msg) = dest.link.checked(channel, read).await? else {
                return Ok(());
            };
            match dest.link.handle(channel, msg).await? {
                Some(Delivery::Pages(pages)) => {
                    let decoder = decoder
                        .get_or_insert_with(|| PageDecoder::new(dest.link.session().decodes()));
                    dest.install(pages, channel, decoder).await?;
                }
                // A run partly present already: only its new pages.
                Some(Delivery::PageRuns(runs)) => {
                    let decoder = decoder
                        .get_or_insert_with(|| PageDecoder::new(dest.link.session().decodes()));
                    for pages in runs {
                        dest.install(pages, channel, decoder).await?;
                    }
                }
                Some(Delivery::Update { pages, versions }) => {
                    dest.sink.store(&pages, &versions)?;
                    dest.counts.stored.fetch_add(versions.len() as u64, Relaxed);
                    dest.progress.notify_one();
                }
                None => {}
            }
        }
    }
    .await;
    dest.link.task_ended(result);
}

impl Dest {
    /// Decodes `pages` and installs them; references whose content is not here (any more)
    /// are fetched again on demand.
    async fn install(
        &self,
        pages: Pages,
        channel: Channel,
        decoder: &mut PageDecoder,
    ) -> Result<(), DriverError> {
        let decoded = decoder
            .decode(pages, |p, out| self.sink.read_page(p, out))
            .map_err(|e| SinkError(format!("undecodable pages from the source: {e}")))?;
        for run in &decoded.runs {
            self.sink.install(run, channel)?;
        }
        self.counts.lz4.fetch_add(decoded.lz4_pages, Relaxed);
        self.counts.refs.fetch_add(decoded.ref_pages, Relaxed);
        if !decoded.unresolved.is_empty() {
            let n = decoded.unresolved.len() as u64;
            self.counts.refetched.fetch_add(n, Relaxed);
            self.link.session().refetch(&decoded.unresolved);
            self.link.flush().await?;
        }
        if self.sink.is_complete() {
            self.progress.notify_one();
        }
        Ok(())
    }
}

/// Paths whose round trip without queues is shorter than this get no echo: a lost packet
/// there costs about a millisecond (quinn's loss timers' granularity), no more than an echo
/// would save.
const ECHO_MIN_RTT: Duration = Duration::from_millis(1);

/// The least time between a request and its echo, so that the two travel in different
/// datagrams even on a short path.
const ECHO_MIN_DELAY: Duration = Duration::from_millis(1);

/// How long after a demand request its echo goes out: an eighth of the round trip. Late
/// enough that the copies (and the replies that follow them) do not share a datagram,
/// early enough that an echoed fault still takes well under two round trips.
fn echo_delay(rtt: Duration) -> Duration {
    (rtt / 8).max(ECHO_MIN_DELAY)
}

/// Demand requests to echo: when each went out, and its pages.
pub(super) type EchoQueue = mpsc::UnboundedSender<(Instant, Vec<u64>)>;

/// The echo stream's page reader, once the stream is open; stopped with the other tasks.
pub(super) type EchoReader = Arc<Mutex<Option<JoinHandle<()>>>>;

/// Sends the fault loop's demand requests, batching what queued up meanwhile; on a long
/// path each batch is queued for its echo too.
pub(super) async fn forward_requests(
    dest: Arc<Dest>,
    requests: super::SharedRequests,
    echo: EchoQueue,
) {
    let mut requests = requests.lock().await;
    // The least round trip seen only shrinks: once short, the path stays short.
    let mut short = false;
    while let Some(mut batch) = requests.recv().await {
        while let Ok(more) = requests.try_recv() {
            batch.extend(more);
        }
        dest.link.session().request(&batch);
        if let Err(e) = dest.link.flush().await {
            dest.link.task_ended(Err(e));
            return;
        }
        short = short || dest.link.conn.stats().path.min_rtt < ECHO_MIN_RTT;
        if !short {
            let _ = echo.send((Instant::now(), batch));
        }
    }
}

/// Sends every queued request again on the echo stream ([`crate::proto::Channel::Echo`])
/// after [`echo_delay`], for the pages that have not arrived by then. The stream is opened
/// at the first echo, with a page reader for its replies.
pub(super) async fn echo_requests(
    dest: Arc<Dest>,
    mut queue: mpsc::UnboundedReceiver<(Instant, Vec<u64>)>,
    reader: EchoReader,
) {
    let conn = &dest.link.conn;
    let mut stream: Option<SendStream> = None;
    let result = async {
        while let Some((sent, pages)) = queue.recv().await {
            tokio::time::sleep_until(sent + echo_delay(conn.rtt())).await;
            let requests = {
                let mut s = dest.link.session();
                if s.current() != dest.link.number() {
                    return Ok(());
                }
                s.echo(&pages)
            };
            if requests.is_empty() {
                continue;
            }
            let send = match &mut stream {
                Some(send) => send,
                None => {
                    let (mut send, recv) = conn.open_bi().await.map_err(connection_lost)?;
                    let _ = send.set_priority(PRIO_URGENT);
                    send.write_all(&[TAG_ECHO])
                        .await
                        .map_err(|e| stream_error(conn, Channel::Echo, e.into()))?;
                    let task = receive_pages(dest.clone(), Channel::Echo, Frames::Stream(recv));
                    *reader.lock().unwrap_or_else(|p| p.into_inner()) = Some(tokio::spawn(task));
                    stream.insert(send)
                }
            };
            for m in &requests {
                write_message(send, m)
                    .await
                    .map_err(|e| stream_error(conn, Channel::Echo, e))?;
            }
        }
        Ok(())
    }
    .await;
    dest.link.task_ended(result);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_waits_an_eighth_of_the_round_trip_and_at_least_a_millisecond() {
        assert_eq!(
            echo_delay(Duration::from_millis(50)),
            Duration::from_micros(6250)
        );
        assert_eq!(
            echo_delay(Duration::from_millis(20)),
            Duration::from_micros(2500)
        );
        assert_eq!(echo_delay(Duration::from_micros(300)), ECHO_MIN_DELAY);
    }
}
