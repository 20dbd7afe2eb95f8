//! The migration protocol as sans-IO state machines, in the style of quinn-proto: they consume
//! decoded messages and produce messages to send and events for the application, and never
//! touch a socket, a clock or guest memory. The QUIC driver in [`crate::quic`] is a thin shell
//! around them.

mod dest;
mod push;
mod source;

pub use dest::{Delivery, DestConfig, DestEvent, DestSession};
pub use push::PushSchedule;
pub use source::{SourceConfig, SourceEvent, SourceSession, SourceStats};

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
}

/// A message the driver must send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub channel: Channel,
    pub message: Message,
}

/// Why a session failed. Errors found locally are also queued to the peer as `Message::Error`.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtoError {
    #[error("protocol version mismatch: we speak {ours}, the peer speaks {theirs}")]
    VersionMismatch { ours: u16, theirs: u16 },
    #[error("memory layout mismatch: this side has {expected}, the peer sent {got}")]
    LayoutMismatch { expected: String, got: String },
    #[error("VM id mismatch: expected {expected:?}, the peer sent {got:?}")]
    VmIdMismatch { expected: String, got: String },
    #[error("page range {first}+{count} is outside the {total} pages of guest memory")]
    PageOutOfRange { first: u64, count: u64, total: u64 },
    #[error("unexpected {message} on the {channel:?} channel while {state}")]
    Unexpected {
        message: &'static str,
        channel: Channel,
        state: &'static str,
    },
    #[error("the peer's {0:?} page set is malformed: {1}")]
    BadPageSet(SetKind, &'static str),
    #[error("the peer asked for a {0:?} session, which this side does not accept")]
    KindRefused(crate::message::SessionKind),
    #[error("the peer counted {got} pages, expected {expected}")]
    CountMismatch { expected: u64, got: u64 },
    #[error("the peer reported an error ({code:?}): {message}")]
    Peer { code: ErrorCode, message: String },
    #[error("malformed frame: {0}")]
    Codec(#[from] CodecError),
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
        }
    }

    /// The message that tells the peer about this error.
    pub fn to_message(&self) -> Message {
        Message::Error {
            code: self.code(),
            message: self.to_string(),
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
    format!("page size {} regions [{}]", l.page_size, regions.join(", "))
}

#[cfg(test)]
mod tests;
