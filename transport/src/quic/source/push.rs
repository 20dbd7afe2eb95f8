//! The source's push: pages on the bulk stream, beside the handshake ([`push_early`]) and
//! then encoded until the schedule is empty ([`push_all`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::Connection;

use super::super::frame::write_pages_batch;
use super::super::{stream_error, DriverError};
use super::driver_turn::DriverTurn;
use super::{lock_encoder, Extent, SharedEncoder, SharedSend, Source};
use crate::encoding::cpu_ns;
use crate::message::{Pages, MAX_PAGES_PER_MESSAGE, MAX_ZERO_RUN, PAGE_SIZE};
use crate::proto::Channel;

/// Pages per push message (64 KiB). A message is installed only once all of it arrived, so
/// when a connection is lost the destination drops the one it was receiving, and the
/// source holds one it had not handed to the stream yet: both go out again on the next
/// connection. Small messages keep that resend small against the bytes that were in flight
/// (docs/recovery.md, bench `recovery`); a message header per 64 KiB costs nothing.
const PUSH_RUN: usize = 16;
/// Longest the push waits for the replica's content index (about the time to hash 2 GiB on
/// one core here); without it the push starts and references only what it pushed itself.
const REPLICA_INDEX_WAIT: Duration = Duration::from_millis(250);
/// Unsent bytes the early push leaves in the send buffer at most.
const EARLY_BACKLOG: u64 = 512 * 1024;

/// Fills `batch` with up to PUSH_RUN pages, in as many runs as the schedule hands out:
/// one run when the pages are contiguous, up to PUSH_RUN frames when they are scattered
/// (a stale set). Empty when the schedule has nothing more; for the `early` push, also
/// as soon as the session runs (the rest is [`push_all`]'s, encoded as negotiated, and so is the
/// `PushDone` at its end).
///
/// The early push stops at pages the reader knows to be zero (the rest waits for
/// [`push_all`]). Zero pages do not count against PUSH_RUN once the destination takes long zero runs
/// ([`crate::message::FEATURE_ZERO_RUNS`]): consecutive ones join into one run of up to
/// [`MAX_ZERO_RUN`] pages, a frame of a dozen bytes. Pages the reader knows to be zero
/// ([`Extent::Zero`]) are not read at all.
fn next_batch(
    src: &Source,
    encoder: &SharedEncoder,
    batch: &mut Vec<Pages>,
    early: bool,
) -> Result<(), DriverError> {
    let mut enc = lock_encoder(encoder);
    // Nothing is agreed during the early push: short runs only, which every peer reads.
    let long_zeros = !early && enc.zero_runs();
    let mut count = 0;
    let mut zeros = 0;
    // Whether the last run in `batch` is a zero run this call built (it may grow).
    let mut zero_tail = false;
    while count < PUSH_RUN && zeros < MAX_ZERO_RUN {
        let room = PUSH_RUN - count;
        let mut known_zero = false;
        let next = {
            let mut s = src.link.session();
            // Only the push of the session's current connection takes from its schedule.
            if s.connection() != src.link.number() || (early && !s.may_push_early()) {
                None
            } else {
                s.next_push_sized(|start| {
                    match src.reader.extent(start, MAX_ZERO_RUN as u64) {
                        // The early push ends at known zeros: as short runs they would
                        // cost the destination a fill each, and after the handshake
                        // they cross as long ones, for nothing.
                        Extent::Zero(_) if early => 0,
                        Extent::Zero(n) => {
                            known_zero = true;
                            let cap = if long_zeros {
                                MAX_ZERO_RUN - zeros
                            } else {
                                room
                            };
                            (n.min(cap as u64) as usize).max(1)
                        }
                        Extent::Data(n) => (n.min(room as u64) as usize).max(1),
                        Extent::Unknown => room,
                    }
                })
            }
        };
        let Some(run) = next else { break };
        let n = (run.end - run.start) as usize;
        let pages = if known_zero {
            enc.encode_zeros(run.start, n)
                .ok_or_else(|| DriverError::Reader(format!("zero run of {n} pages")))?
        } else {
            let data = src
                .reader
                .pages(run.start, n)
                .map_err(DriverError::Reader)?;
            debug_assert_eq!(data.len(), n * PAGE_SIZE);
            enc.encode_push(run.start, &data)
        };
        if long_zeros && (known_zero || pages.is_zero_run()) {
            zeros += n;
            match batch.last_mut() {
                // A run of data pages that turned out zero may take the joined run past
                // the largest a message holds (`zeros` capped only the known ones): it
                // then starts a run of its own.
                Some(last)
                    if zero_tail
                        && last.first + last.count() as u64 == run.start
                        && last.count() + n <= MAX_ZERO_RUN =>
                {
                    let joined = Pages::zeros(last.first, last.count() + n);
                    *last = joined.ok_or_else(|| {
                        DriverError::Reader(format!("zero run of {} pages", last.count() + n))
                    })?;
                }
                _ => batch.push(pages),
            }
            zero_tail = true;
        } else {
            count += n;
            batch.push(pages);
            zero_tail = false;
        }
    }
    Ok(())
}

/// Bytes of the frames of `batch` past their headers ([`Pages::wire_len`]).
fn wire_bytes(batch: &[Pages]) -> u64 {
    batch.iter().map(Pages::wire_len).sum()
}

/// Writes `batch` on the bulk stream, after telling the session where its frames end
/// (for requests the push answers, [`crate::proto::SourceSession::note_pushed`]).
async fn write_batch(src: &Source, bulk: &SharedSend, batch: &[Pages]) -> Result<(), DriverError> {
    src.link.session().note_pushed(src.link.number(), batch);
    write_pages_batch(&mut *bulk.lock().await, batch)
        .await
        .map_err(|e| stream_error(&src.link.conn, Channel::Bulk, e))
}

/// The push before the destination answered the handshake (see
/// [`crate::proto::SourceSession::may_push_early`]): pages on the bulk stream, lz4 or raw
/// (`encoder`, [`crate::encoding::EncodingPolicy::before_answer`]), until the session runs
/// (then [`push_all`] takes over) or the early schedule is empty.
///
/// It writes only as fast as the link takes it, keeping at most [`EARLY_BACKLOG`] bytes
/// unsent: it fills a round trip the link would idle through, and what it left queued
/// when the session starts would cross without the references the push may use.
pub(super) async fn push_early(
    src: Arc<Source>,
    bulk: SharedSend,
    encoder: SharedEncoder,
) -> Result<(), DriverError> {
    let conn = &src.link.conn;
    let sent = || conn.stats().udp_tx.bytes;
    let start = sent();
    let mut written = 0u64;
    let mut batch = Vec::new();
    let mut turn = DriverTurn::new();
    while src.link.session().may_push_early() {
        if written > sent().saturating_sub(start) + EARLY_BACKLOG {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        next_batch(&src, &encoder, &mut batch, true)?;
        if batch.is_empty() {
            break;
        }
        written += wire_bytes(&batch);
        write_batch(&src, &bulk, &batch).await?;
        batch.clear();
        turn.give().await;
    }
    Ok(())
}

/// The push once the session runs: every page the schedule still holds, encoded as
/// negotiated, then `PushDone`.
pub(super) async fn push_all(
    src: Arc<Source>,
    bulk: SharedSend,
    encoder: SharedEncoder,
) -> Result<(), DriverError> {
    const { assert!(PUSH_RUN <= MAX_PAGES_PER_MESSAGE) };
    let conn = &src.link.conn;
    // References into the replica need its index, which the application builds beside
    // the handshake (it hashes the fresh memory): hold the push, not demand replies,
    // for it a bounded while. The handshake already took a round trip of it.
    let deadline = Instant::now() + REPLICA_INDEX_WAIT;
    while lock_encoder(&encoder).replica_index_pending() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // After the wait: an interval that spans it would put idle time in the link's rate.
    let mut meter = LinkMeter::new(conn);
    let mut batch = Vec::new();
    // The CPU clocks are system calls: read them only for a tuner that uses them.
    let tunes = lock_encoder(&encoder).tunes();
    let cpu_now = |clock| if tunes { cpu_ns(clock) } else { 0 };
    let mut cpu_mark = cpu_now(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID);
    let mut turn = DriverTurn::new();
    loop {
        let built = cpu_now(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID);
        next_batch(&src, &encoder, &mut batch, false)?;
        let built = cpu_now(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).saturating_sub(built);
        if batch.is_empty() {
            break;
        }
        let wire = wire_bytes(&batch);
        // How long the stream takes to accept the batch is the link's pace once the
        // send window is full: the tuner's measure of what a wire byte costs.
        let t = Instant::now();
        write_batch(&src, &bulk, &batch).await?;
        batch.clear();
        let cost = meter.cost(conn, wire, t.elapsed().as_nanos() as u64);
        if let Some(bytes) = meter.in_flight(conn) {
            src.link.session().set_push_in_flight(bytes);
        }
        turn.give().await;
        // The process's CPU time since the last batch was written, besides building this
        // one: mostly the QUIC stack encrypting and sending. When it, not the link, sets
        // the pace, a wire byte costs that CPU.
        let cpu = cpu_now(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID);
        let send_cpu = cpu.saturating_sub(cpu_mark).saturating_sub(built);
        cpu_mark = cpu;
        lock_encoder(&encoder).observe_write(wire, cost, send_cpu);
    }
    src.link.session().note_push_written(src.link.number());
    // A bulk stream that also carries demand replies stays open until the session ends.
    if !src.link.session().replies_on_bulk() {
        let _ = bulk.lock().await.finish();
    }
    src.link.flush().await
}

/// What a wire byte of the push costs, for the encoding tuner.
///
/// The time a write waits measures the link only once quinn's send buffer is full; a push
/// smaller than that buffer (a 10% evacuation, say) is buffered at once and would look free.
/// So while the push is ahead of the wire by more than [`LinkMeter::BACKLOG`] (bytes written
/// minus UDP bytes sent), the link sets the pace, and a byte costs what the connection's send
/// rate says, measured over intervals of at least [`LinkMeter::INTERVAL`] (UDP bytes leave
/// in bursts, so shorter intervals would mostly see none or many). Before the first interval
/// the cost is unknown: the first writes go into an empty send buffer, and taken as their
/// (near zero) waits, they turned lz4 off at the push's first batch (measured: a 256 MiB
/// evacuation at 100 Mbit/s sent ~500 compressible pages raw before it came back on).
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

    /// What leaves between the destination reading a pushed byte and the source reading a
    /// request it sent then: the delivery rate over the round trip (quinn's smoothed one,
    /// queues included). `None` until a rate was measured.
    fn in_flight(&self, conn: &Connection) -> Option<u64> {
        let ns = self.ns_per_byte?;
        Some((conn.rtt().as_nanos() as f64 / ns) as u64)
    }

    /// The cost in ns of the `wire` bytes just written, whose write waited `write_ns`; `None`
    /// while it cannot be known.
    fn cost(&mut self, conn: &Connection, wire: u64, write_ns: u64) -> Option<u64> {
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
        let ahead = self.written.saturating_sub(tx) > Self::BACKLOG;
        let ns = self.ns_per_byte?;
        Some(if ahead {
            (ns * wire as f64).max(write_ns as f64) as u64
        } else {
            write_ns
        })
    }
}
