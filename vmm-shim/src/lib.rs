//! What a Rust VMM links to migrate with faultline: the source and destination roles that
//! wire guest memory to `uffd-core` (userfaultfd on the destination) and `transport`
//! (the protocol over QUIC), replication to a standby and evacuation into it, and the host
//! side of the guest agent's hints. Guest memory comes in as `vm-memory` regions
//! ([`guest`]).
//!
//! This crate must not know about any command line, KVM, guest programs, synthetic images
//! or the WAN emulator: those live in the `faultline`, `refvmm` and `wan-emu` crates, and a
//! test (`tests/tests/layout.rs`) fails if one of them enters this crate's dependencies.

#![warn(missing_docs)]

pub mod dest;
pub mod digest;
pub mod disks;
pub mod error;
pub mod guest;
pub mod hints;
pub mod progress;
pub mod replica;
pub mod source;
pub mod stop;

pub use dest::{DestOptions, DestReport, Listener, StandbyReport};
pub use error::RoleError;
pub use progress::{Progress, ProgressFn};
pub use source::{
    send, send_with_hints, send_with_state, EarlyConnection, PreparedSource, SourceOptions,
};
pub use stop::Stopper;
