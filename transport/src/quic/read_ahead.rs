//! Reading a stream ahead of the code that handles its messages, bounded in bytes.
//!
//! The destination reads the bulk stream from the moment the source opens it, also while
//! the session does not run yet: the source pushes beside the handshake, and a destination
//! that left the stream unread would stop QUIC's flow-control window for that whole time
//! (a standby punching its holes, a round trip of handshake). What was read waits here,
//! at most `limit` bytes, until the session handles it in order; past the limit the
//! reader stops, and flow control holds the source back as before.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use quinn::RecvStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::frame::{read_frame, FrameError};
use crate::message::Message;

/// One read as the reader task sends it: a message, the end of the stream, or an error;
/// with its share of the budget.
type Charged = (Result<Option<Message>, FrameError>, OwnedSemaphorePermit);

/// One read as the consumer gets it.
pub(crate) type Read = (Result<Option<Message>, FrameError>, Held);

/// A message's share of the budget: returned when dropped, or kept back to pay for a
/// [`ReadAhead::shrink_to`].
pub(crate) struct Held {
    permit: Option<OwnedSemaphorePermit>,
    debt: Arc<AtomicUsize>,
}

impl Drop for Held {
    fn drop(&mut self) {
        let Some(mut permit) = self.permit.take() else {
            return;
        };
        let n = permit.num_permits();
        let owed = self
            .debt
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |d| {
                Some(d.saturating_sub(n))
            })
            .unwrap_or(0);
        let pay = owed.min(n);
        if pay > 0 {
            if let Some(p) = permit.split(pay) {
                p.forget();
            }
        }
    }
}

/// Budget unit: messages are charged in KiB, rounded up.
const UNIT: usize = 1024;

/// A task reading `recv` ahead; dropping this stops it.
pub(crate) struct ReadAhead {
    rx: mpsc::UnboundedReceiver<Charged>,
    budget: Arc<Semaphore>,
    /// The budget in units, after [`ReadAhead::shrink_to`].
    units: usize,
    /// Units still to take out of the semaphore after a shrink; held messages pay it
    /// when they are dropped.
    debt: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl ReadAhead {
    /// Starts reading `recv`, holding at most about `limit` bytes (plus the one message
    /// being charged) that nobody took yet.
    pub(crate) fn start(mut recv: RecvStream, limit: usize) -> ReadAhead {
        let units = limit.div_ceil(UNIT).clamp(1, Semaphore::MAX_PERMITS);
        let budget = Arc::new(Semaphore::new(units));
        let (tx, rx) = mpsc::unbounded_channel();
        let b = budget.clone();
        let task = tokio::spawn(async move {
            loop {
                let read = read_frame(&mut recv).await;
                let end = !matches!(read, Ok(Some(_)));
                let cost = match &read {
                    Ok(Some(m)) => message_bytes(m).div_ceil(UNIT).clamp(1, units),
                    _ => 1,
                };
                let Ok(permit) = b.clone().acquire_many_owned(cost as u32).await else {
                    return;
                };
                if tx.send((read, permit)).is_err() || end {
                    return;
                }
            }
        });
        ReadAhead {
            rx,
            budget,
            units,
            debt: Arc::default(),
            task,
        }
    }

    /// Lowers the limit to `limit` bytes (never raises it): the budget that held the
    /// handshake's worth of push returns to a steady-state bound, so flow control pushes
    /// back on the source when the consumer is slower than the link.
    pub(crate) fn shrink_to(&mut self, limit: usize) {
        let units = limit.div_ceil(UNIT).max(1);
        if units >= self.units {
            return;
        }
        let excess = self.units - units;
        self.units = units;
        // What is free now goes at once; the rest as held messages are dropped.
        let now = self.budget.forget_permits(excess);
        self.debt.fetch_add(excess - now, Ordering::SeqCst);
    }

    /// The next message in stream order; its budget returns when the permit is dropped,
    /// so hold it while handling the message. `None` once the reader stopped.
    pub(crate) async fn next(&mut self) -> Option<Read> {
        let (read, permit) = self.rx.recv().await?;
        let held = Held {
            permit: Some(permit),
            debt: self.debt.clone(),
        };
        Some((read, held))
    }

    /// Bytes read and not yet released (rounded up to KiB per message).
    pub(crate) fn held_bytes(&self) -> usize {
        let total = self.units + self.debt.load(Ordering::SeqCst);
        total.saturating_sub(self.budget.available_permits()) * UNIT
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a message holds in memory, near enough for a budget.
fn message_bytes(m: &Message) -> usize {
    match m {
        Message::Pages(p) | Message::Update { pages: p, .. } => p.kinds.len() + p.payload.len(),
        _ => 64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Pages, PAGE_SIZE};
    use crate::quic::{client_endpoint, server_endpoint, write_message};
    use crate::tls::Identity;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_ahead_up_to_its_limit_and_hands_out_messages_in_order() {
        let local = "127.0.0.1:0".parse().unwrap();
        let (src, dst) = (
            Identity::generate("source").unwrap(),
            Identity::generate("dest").unwrap(),
        );
        let server = server_endpoint(local, &dst, src.cert.clone()).unwrap();
        let addr = server.local_addr().unwrap();
        let client = client_endpoint(local, &src, dst.cert.clone()).unwrap();
        let (conn, peer) = tokio::join!(
            crate::quic::connect(&client, addr),
            crate::quic::accept(&server)
        );
        let (conn, peer) = (conn.unwrap(), peer.unwrap().unwrap());

        // 40 messages of 16 pages (64 KiB each, 2.5 MiB in all) against a 256 KiB limit.
        let mut send = conn.open_uni().await.unwrap();
        let writer = tokio::spawn(async move {
            for i in 0..40u64 {
                let data = vec![i as u8 + 1; 16 * PAGE_SIZE];
                let msg = Message::Pages(Pages::from_memory(i * 16, &data));
                write_message(&mut send, &msg).await.unwrap();
            }
            send.finish().unwrap();
            send
        });
        let recv = peer.accept_uni().await.unwrap();
        let mut ahead = ReadAhead::start(recv, 256 * 1024);
        // Nobody takes anything: the reader stops at the limit (plus the message it is
        // charging), however much the source sent.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while ahead.held_bytes() == 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let held = ahead.held_bytes();
        assert!(held > 0, "it read ahead");
        assert!(held <= 256 * 1024, "held {held} B against a 256 KiB limit");

        // Down to 128 KiB: what is held stays, the reader resumes only below the new limit.
        ahead.shrink_to(128 * 1024);
        assert_eq!(ahead.held_bytes(), held, "shrinking drops nothing");
        for i in 0..40u64 {
            if i == 20 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let held = ahead.held_bytes();
                assert!(held <= 128 * 1024, "held {held} B against a 128 KiB limit");
            }
            let (read, permit) = ahead.next().await.expect("a message");
            let Ok(Some(Message::Pages(p))) = read else {
                panic!("message {i}: {read:?}");
            };
            assert_eq!(p.first, i * 16, "in stream order");
            assert!(p.payload.iter().all(|&b| b == i as u8 + 1));
            drop(permit);
        }
        let (end, _) = ahead.next().await.expect("the end");
        assert!(matches!(end, Ok(None)), "{end:?}");
        assert!(ahead.next().await.is_none());
        assert_eq!(ahead.held_bytes(), 0);
        let _ = writer.await.unwrap();
    }
}
