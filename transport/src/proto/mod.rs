//! The migration protocol as sans-IO state machines, in the style of quinn-proto: they consume
//! decoded messages and produce messages to send and events for the application, and never
//! touch a socket, a clock or guest memory. The QUIC driver in [`crate::quic`] is a thin shell
//! around them.

mod dest;
mod push;
mod source;

pub use dest::{DestConfig, DestEvent, DestSession};
pub use push::PushSchedule;
pub use source::{SourceConfig, SourceEvent, SourceSession};

use thiserror::Error;

use crate::codec::CodecError;
use crate::message::{ErrorCode, Layout, Message};

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
            ProtoError::Unexpected { .. } | ProtoError::CountMismatch { .. } => {
                ErrorCode::UnexpectedMessage
            }
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
