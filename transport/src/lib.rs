//! The faultline migration transport: the wire protocol as a sans-IO state machine
//! ([`proto`]), its binary codec ([`codec`]), and the QUIC driver ([`quic`]) with mutual,
//! pinned TLS ([`tls`]). Nothing here knows about userfaultfd: the destination hands page data
//! to a [`quic::PageSink`], and the source reads pages from a [`quic::PageReader`].
//!
//! What this crate owns:
//!
//! - [`message`]: the protocol's messages, limits and feature bits, independent of framing;
//! - [`codec`]: their binary framing, whose decoders reject malformed input with an error
//!   and never panic;
//! - [`proto`]: the source and destination sessions as sans-IO state machines (handshake,
//!   demand requests, background push schedule, completion, replication and evacuation);
//! - [`encoding`]: how pages travel (zero flags, lz4, references to content the destination
//!   holds) and the tuner that chooses among them while the migration runs;
//! - [`quic`]: the async driver that moves the state machines' messages over QUIC streams,
//!   with the transport tuning (flow-control windows, congestion control);
//! - [`tls`]: identities and mutual TLS with pinned peer certificates;
//! - [`bitmap`] and [`units`]: the page bitmap the sessions share and byte-count parsing.
//!
//! What it must not know about:
//!
//! - userfaultfd and guest memory: page data leaves through the [`quic::PageSink`] trait on
//!   the destination and comes in through the [`quic::PageReader`] trait on the source;
//!   `vmm-shim` implements them on top of `uffd-core`;
//! - the WAN emulator: it is the separate `wan-emu` crate (a UDP relay adding delay, rate
//!   limits, loss and cuts), used only by tests, benches and the CLI. The driver here only
//!   ever sees a socket address.
//!
//! The wire protocol is described in `docs/protocol.md`.

#![warn(missing_docs)]

pub mod bitmap;
pub mod codec;
pub mod crash;
pub mod encoding;
pub mod message;
pub mod proto;

pub use message::{Layout, Message, RegionDesc, PAGE_SIZE, PROTOCOL_VERSION};
pub mod quic;
pub mod tls;
pub mod units;

pub use crash::crash_point;

/// An error and all its sources, `: `-separated, as `anyhow`'s `{:#}` prints them. An error's
/// own `Display` leaves its source to the chain, so this is the text to send to a peer or to
/// log. (The public helper is `uffd_core::error::chain`; this crate must not depend on
/// `uffd-core`, hence its own copy.)
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod error_tests {
    use crate::codec::CodecError;
    use crate::message::{ErrorCode, Message};
    use crate::proto::ProtoError;
    use crate::quic::{DriverError, SinkError};

    #[test]
    fn display_leaves_the_source_to_the_chain() {
        let codec = CodecError::UnknownType(0x7f);
        let cause = codec.to_string();
        let proto = ProtoError::Codec(codec);
        assert_eq!(proto.to_string(), "malformed frame");
        assert_eq!(crate::chain(&proto), format!("malformed frame: {cause}"));
        // What the peer is told holds the cause.
        let Message::Error { code, message } = proto.to_message() else {
            panic!("not an Error message");
        };
        assert_eq!(
            (code, message.matches(&*cause).count()),
            (ErrorCode::Malformed, 1)
        );

        let e = DriverError::Protocol(proto);
        assert!(!e.to_string().contains(&cause), "{e}");
        assert_eq!(
            crate::chain(&e),
            format!("protocol error: malformed frame: {cause}")
        );

        let e = DriverError::Sink(SinkError("page 3: out of memory".into()));
        assert_eq!(e.to_string(), "installing pages failed");
        assert_eq!(
            crate::chain(&e),
            "installing pages failed: page 3: out of memory"
        );
    }
}
