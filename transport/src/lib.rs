//! The faultline migration transport: the wire protocol as a sans-IO state machine
//! ([`proto`]), its binary codec ([`codec`]), and the QUIC driver ([`quic`]) with mutual,
//! pinned TLS ([`tls`]). Nothing here knows about userfaultfd: the destination hands page data
//! to a [`quic::PageSink`], and the source reads pages from a [`quic::PageReader`].

pub mod bitmap;
pub mod codec;
pub mod encoding;
pub mod message;
pub mod proto;

pub use message::{Layout, Message, RegionDesc, PAGE_SIZE, PROTOCOL_VERSION};
pub mod quic;
pub mod tls;
pub mod units;
