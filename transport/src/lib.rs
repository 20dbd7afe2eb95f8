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
pub mod encoding;
pub mod message;
pub mod proto;

pub use message::{Layout, Message, RegionDesc, PAGE_SIZE, PROTOCOL_VERSION};
pub mod quic;
pub mod tls;
pub mod units;
