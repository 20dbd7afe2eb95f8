//! The migration protocol as sans-IO state machines, in the style of quinn-proto: they consume
//! decoded messages and produce messages to send and events for the application, and never
//! touch a socket, a clock or guest memory. The QUIC driver in [`crate::quic`] is a thin shell
//! around them.
//!
//! # A session outlives its connection
//!
//! A session has an id (random, chosen by the source, in every `Hello`) and a *connection
//! epoch*: 0 for the first connection, then a larger number for each later one, chosen by
//! the destination and carried in its `HelloAck` or `Resume`. What the driver must do:
//!
//! - When a connection dies (any stream or the connection fails, an idle timeout), call
//!   `connection_lost()` on the session. It pauses (never an error): queued messages are
//!   dropped, nothing more is queued, incoming messages are ignored. The destination keeps
//!   taking demand requests from its fault loop; they go out when the session resumes.
//! - On a new, fully authenticated connection call `resume()` on both sides (it reports the
//!   loss first if that was not done). It returns the side's number for the connection:
//!   the destination's is the connection epoch it will announce; the source's is its own
//!   count (the source also queues its `Hello` again).
//! - Feed every message with the number of the connection it came on,
//!   `handle_in(number, ..)`. Messages of lost or older connections are ignored, so a late
//!   frame of a dead connection (a reader task that lost the race with the reconnect) is
//!   harmless.
//! - [`SourceEvent::Paused`]/[`SourceEvent::Resumed`] and [`DestEvent::Paused`]/
//!   [`DestEvent::Resumed`] mark the state changes: the driver times `paused_ms` and
//!   `resume_ms_after_restore` between them and its own calls (the sessions have no clock).
//!
//! The destination answers the `Hello` of a later connection with either a `HelloAck` (it
//! never resumed the guest: the handshake starts over, the source pushes everything again)
//! or a `Resume` carrying the bitmap of the pages it holds; the source recomputes the push
//! from it and acknowledges with `ResumeAck`. See `docs/recovery.md`.
//!
//! Disks need nothing of their own: their blocks are pages of the same session (see
//! [`crate::message::Layout`]), held, pushed and requested like memory. A replication session
//! (normal times) pauses like the others, but the standby has no guest to keep: it answers
//! the next connection's `Hello` with a fresh handshake (its invalid pages again), and the
//! replicator re-sends whatever was not acknowledged, as it does today when it reconnects.
//! What replication would still need to resume without that round of invalid pages is the
//! standby's acknowledged versions in the `Resume` instead of a received bitmap.

mod dest;
mod push;
mod push_log;
mod pushed;
mod source;

pub use dest::{Delivery, DestConfig, DestEvent, DestSession, DestStats};
pub use push::PushSchedule;
pub use pushed::{PushTally, Pushed};
pub use source::{SourceConfig, SourceEvent, SourceSession, SourceStats};

/// Where a session is, as the driver and the reports see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SessionState {
    /// The handshake is under way (or starts over on a new connection).
    Handshake,
    /// Connected and moving pages (or replicating).
    Running,
    /// The connection was lost; nothing moves until a new one is resumed.
    Paused,
    /// A new connection is up; the resume handshake is under way.
    Resuming,
    /// The session ended normally.
    Completed,
    /// The session failed with an error; it cannot resume.
    Failed,
}

/// Where the VM may run, as the source sees it. The source moves forward only: it never
/// takes the VM back once it handed it over, whatever happens to the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ownership {
    /// Nothing that lets the destination resume the guest was queued: the VM is the
    /// source's, which may resume it if the session fails now.
    Source,
    /// The message after which the destination may resume the guest was queued: the VM is
    /// the destination's from now on; the source must never run it again.
    Destination,
    /// The destination holds every page; the source may release the VM's memory.
    Released,
}

use thiserror::Error;

use crate::bitmap::Bitmap;
use crate::codec::CodecError;
use crate::message::{ErrorCode, Layout, Message, SetKind, MAX_SET_WORDS};

/// The logical channel a message travels on. The driver maps each onto QUIC streams:
/// urgent traffic has its own high-priority stream and never queues behind the bulk push.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Channel {
    /// Handshake, completion and errors.
    Control,
    /// Demand requests and their replies.
    Urgent,
    /// The background push.
    Bulk,
    /// Demand requests sent a second time, a little after the first, and their replies,
    /// on a stream of their own: on a lossy path a fault then waits for a retransmission
    /// only when both copies lost a packet. The destination opens it when the path is long
    /// enough for a retransmission to cost more than the copy
    /// ([`crate::proto::DestSession::echo`]); the source answers every echoed request
    /// while it sees loss, otherwise only those whose first copy it has not served
    /// ([`crate::proto::SourceSession::set_echo_all`]).
    Echo,
}

/// A message the driver must send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// The channel to send it on.
    pub channel: Channel,
    /// The message. Within a channel, messages must go out in the order they are polled.
    pub message: Message,
}

/// Why a session failed. Errors found locally are also queued to the peer as `Message::Error`.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtoError {
    /// The peer's `Hello` or `HelloAck` carries another protocol version.
    #[error("protocol version mismatch: we speak {ours}, the peer speaks {theirs}")]
    VersionMismatch {
        /// This build's [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION).
        ours: u16,
        /// The version the peer announced.
        theirs: u16,
    },
    /// The source's layout differs from the one the destination prepared.
    #[error("memory layout mismatch: this side has {expected}, the peer sent {got}")]
    LayoutMismatch {
        /// This side's layout: page size and regions as `address+length`, in hex.
        expected: String,
        /// The layout the peer sent, in the same form.
        got: String,
    },
    /// The source announced another VM id than [`DestConfig::expected_vm_id`].
    #[error("VM id mismatch: expected {expected:?}, the peer sent {got:?}")]
    VmIdMismatch {
        /// The id this side expects.
        expected: String,
        /// The id the peer announced.
        got: String,
    },
    /// A `Pages`, `Update`, `Request` or `Ack` named pages outside the layout (an `Ack` with
    /// version 0 is reported the same way).
    #[error("page range {first}+{count} is outside the {total} pages of guest memory")]
    PageOutOfRange {
        /// The first page of the offending range.
        first: u64,
        /// Pages in the range (1 for a single requested or acknowledged page).
        count: u64,
        /// Pages in the layout.
        total: u64,
    },
    /// A message that the session does not take in its state or on that channel.
    #[error("unexpected {message} on the {channel:?} channel while {state}")]
    Unexpected {
        /// The message's name ([`Message::name`]).
        message: &'static str,
        /// The channel it came on.
        channel: Channel,
        /// What the session was doing, e.g. "awaiting the handshake".
        state: &'static str,
    },
    /// `PageSet` chunks of the given set that are of another kind, out of order, beyond the
    /// layout, or that end before covering it; the text says which.
    #[error("the peer's {0:?} page set is malformed: {1}")]
    BadPageSet(SetKind, &'static str),
    /// The `Hello` asked for a session kind not in [`DestConfig::accept`].
    #[error("the peer asked for a {0:?} session, which this side does not accept")]
    KindRefused(crate::message::SessionKind),
    /// The destination's `Complete` counts another number of pages than the source has.
    #[error("the peer counted {got} pages, expected {expected}")]
    CountMismatch {
        /// Pages in the source's layout.
        expected: u64,
        /// Pages the destination reported.
        got: u64,
    },
    /// The peer sent an `Error`; nothing is sent back.
    #[error("the peer reported an error ({code:?}): {message}")]
    Peer {
        /// The peer's code.
        code: ErrorCode,
        /// The peer's text.
        message: String,
    },
    /// Incoming bytes did not decode.
    #[error("malformed frame")]
    Codec(#[from] CodecError),
    /// A resume named another session: the peer restarted (or is someone else's), so the
    /// state this side kept is not the peer's.
    #[error(
        "session id mismatch: this side resumes session {expected:032x}, the peer's is {got:032x}"
    )]
    SessionMismatch {
        /// This side's session id.
        expected: u128,
        /// The id the peer sent.
        got: u128,
    },
    /// A source reconnected to resume a session whose VM it had handed over, and this
    /// destination does not hold that session: it restarted (or is another host), so the
    /// guest's state since switchover is not here.
    #[error(
        "the source resumes session {session_id:032x} after handing its VM over, but this \
         destination does not hold that session (it restarted?): the VM's state since \
         switchover is not here"
    )]
    NotHeld {
        /// The session the source resumes.
        session_id: u128,
    },
    /// The destination's held set does not cover exactly the layout's pages.
    #[error("resume refused: the held set covers {got} pages, the layout has {expected}")]
    HeldLength {
        /// Pages in this side's layout.
        expected: u64,
        /// Pages the `Resume` announced.
        got: u64,
    },
    /// The held set that arrived does not hash to the checksum the `Resume` announced.
    #[error("resume refused: held set checksum mismatch: announced {announced:#018x}, received {got:#018x}")]
    HeldChecksum {
        /// The checksum in the `Resume`.
        announced: u64,
        /// The checksum of the words that arrived.
        got: u64,
    },
}

impl ProtoError {
    /// The code sent to the peer for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtoError::VersionMismatch { .. } => ErrorCode::VersionMismatch,
            ProtoError::LayoutMismatch { .. } => ErrorCode::LayoutMismatch,
            ProtoError::VmIdMismatch { .. } => ErrorCode::VmIdMismatch,
            ProtoError::PageOutOfRange { .. } => ErrorCode::PageOutOfRange,
            ProtoError::Unexpected { .. }
            | ProtoError::CountMismatch { .. }
            | ProtoError::KindRefused(_) => ErrorCode::UnexpectedMessage,
            ProtoError::BadPageSet(..) => ErrorCode::Malformed,
            ProtoError::Peer { code, .. } => *code,
            ProtoError::Codec(_) => ErrorCode::Malformed,
            ProtoError::SessionMismatch { .. }
            | ProtoError::NotHeld { .. }
            | ProtoError::HeldLength { .. }
            | ProtoError::HeldChecksum { .. } => ErrorCode::ResumeRefused,
        }
    }

    /// The message that tells the peer about this error.
    pub fn to_message(&self) -> Message {
        Message::Error {
            code: self.code(),
            message: crate::chain(self),
        }
    }
}

/// `bitmap` as a sequence of `PageSet` messages; the last one has `last` set.
pub(crate) fn page_set_messages(kind: SetKind, bitmap: &Bitmap) -> Vec<Message> {
    let words = bitmap.words();
    let mut out: Vec<Message> = words
        .chunks(MAX_SET_WORDS)
        .enumerate()
        .map(|(i, chunk)| Message::PageSet {
            kind,
            first_word: (i * MAX_SET_WORDS) as u64,
            words: chunk.to_vec(),
            last: false,
        })
        .collect();
    match out.last_mut() {
        Some(Message::PageSet { last, .. }) => *last = true,
        _ => out.push(Message::PageSet {
            kind,
            first_word: 0,
            words: Vec::new(),
            last: true,
        }),
    }
    out
}

/// Collects `PageSet` chunks of one kind into a bitmap, checking them against the layout.
#[derive(Debug)]
pub(crate) struct PageSetAssembler {
    kind: SetKind,
    bitmap: Bitmap,
    next_word: u64,
}

impl PageSetAssembler {
    pub(crate) fn new(kind: SetKind, pages: u64) -> PageSetAssembler {
        PageSetAssembler {
            kind,
            bitmap: Bitmap::new(pages),
            next_word: 0,
        }
    }

    /// Adds one chunk; returns the whole set after the last chunk.
    pub(crate) fn add(
        &mut self,
        kind: SetKind,
        first_word: u64,
        words: &[u64],
        last: bool,
    ) -> Result<Option<Bitmap>, ProtoError> {
        if kind != self.kind {
            return Err(ProtoError::BadPageSet(kind, "unexpected set kind"));
        }
        // Chunks arrive in order on one stream; anything else is a broken or hostile peer.
        if first_word != self.next_word {
            return Err(ProtoError::BadPageSet(kind, "chunks out of order"));
        }
        let total_words = self.bitmap.len().div_ceil(64);
        if first_word + words.len() as u64 > total_words {
            return Err(ProtoError::BadPageSet(
                kind,
                "more words than the layout has pages",
            ));
        }
        for (i, &w) in words.iter().enumerate() {
            self.bitmap.or_word(first_word + i as u64, w);
        }
        self.next_word += words.len() as u64;
        if !last {
            return Ok(None);
        }
        if self.next_word != total_words {
            return Err(ProtoError::BadPageSet(
                kind,
                "set ended before covering every page",
            ));
        }
        Ok(Some(std::mem::replace(&mut self.bitmap, Bitmap::new(0))))
    }
}

pub(crate) fn describe_layout(l: &Layout) -> String {
    let regions: Vec<String> = l
        .regions
        .iter()
        .map(|r| format!("{:#x}+{:#x}", r.guest_addr, r.len))
        .collect();
    let disks: Vec<String> = l
        .disks
        .iter()
        .map(|d| format!("{:?} {:#x}", d.name, d.len))
        .collect();
    if disks.is_empty() {
        format!("page size {} regions [{}]", l.page_size, regions.join(", "))
    } else {
        format!(
            "page size {} regions [{}] disks [{}]",
            l.page_size,
            regions.join(", "),
            disks.join(", ")
        )
    }
}

#[cfg(test)]
mod resume_tests;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;
