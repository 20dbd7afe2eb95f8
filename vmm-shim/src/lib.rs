//! What a Rust VMM links to migrate with faultline: the source and destination roles that
//! wire guest memory to `uffd-core` (userfaultfd on the destination) and `transport`
//! (the protocol over QUIC), plus the pieces the `faultline` command-line tool is built from.

#![warn(clippy::undocumented_unsafe_blocks)]

pub mod dest;
pub mod digest;
pub mod error;
pub mod guest;
pub mod hints;
pub mod image;
pub mod replica;
pub mod source;
pub mod vm;
pub mod workload;

pub use dest::{DestOptions, DestReport, Listener, StandbyReport};
pub use error::RoleError;
pub use image::SourceImage;
pub use source::{send, send_with_hints, send_with_state, SourceOptions};
