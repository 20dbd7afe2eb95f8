//! The destination's tasks beside its control loop: one page reader per data stream (the
//! urgent replies and the bulk push, so a reply never waits behind pushed pages), and the
//! forwarder of the fault loop's demand requests.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use quinn::RecvStream;

use super::super::frame::{read_frame, FrameError};
use super::super::read_ahead::{Held, ReadAhead};
use super::super::DriverError;
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
    // Pages arrive only once the handshake is done: the features are known then.
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
                        .get_or_insert_with(|| PageDecoder::new(dest.link.session().features()));
                    dest.install(pages, channel, decoder).await?;
                }
                // A run partly present already: only its new pages.
                Some(Delivery::PageRuns(runs)) => {
                    let decoder = decoder
                        .get_or_insert_with(|| PageDecoder::new(dest.link.session().features()));
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
            self.link.session().request(&decoded.unresolved);
            self.link.flush().await?;
        }
        if self.sink.is_complete() {
            self.progress.notify_one();
        }
        Ok(())
    }
}

/// Sends the fault loop's demand requests, batching what queued up meanwhile.
pub(super) async fn forward_requests(dest: Arc<Dest>, requests: super::SharedRequests) {
    let mut requests = requests.lock().await;
    while let Some(mut batch) = requests.recv().await {
        while let Ok(more) = requests.try_recv() {
            batch.extend(more);
        }
        dest.link.session().request(&batch);
        if let Err(e) = dest.link.flush().await {
            dest.link.task_ended(Err(e));
            return;
        }
    }
}
