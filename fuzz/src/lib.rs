//! faultline's fuzz targets as plain functions, one per target, each taking the fuzzer's
//! bytes. `cargo test` replays a seed corpus and pseudo-random inputs through every one of
//! them (`tests/replay.rs`); the cargo-fuzz package in `fuzz/cargo-fuzz` wraps each in a
//! `fuzz_target!` for coverage-guided fuzzing on stable Rust (`scripts/fuzz.sh`; see
//! `docs/fuzzing.md`).
//!
//! A target panics when it finds a bug: input from the network, a file or a guest made
//! the code under test panic, or broke one of the properties the target checks.

pub mod codec;
pub mod control;
pub mod guest_agent;
pub mod input;
pub mod nbd;
pub mod orchestrate;
pub mod plan_file;
pub mod proto;
pub mod replica;
pub mod samples;
pub mod vhost_blk;

/// A fuzz target: its name (also its corpus directory) and its body.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, by name.
pub const TARGETS: &[Target] = &[
    ("codec", codec::codec),
    ("proto", proto::proto),
    ("guest_agent", guest_agent::guest_agent),
    ("replica", replica::replica),
    ("nbd", nbd::nbd),
    ("vhost_blk", vhost_blk::vhost_blk),
    ("control", control::control),
    ("plan_file", plan_file::plan_file),
    ("orchestrate", orchestrate::orchestrate),
];

/// The target called `name`.
pub fn target(name: &str) -> Option<fn(&[u8])> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|&(_, f)| f)
}

/// The generated seeds of target `name` (what `fuzz/seeds/NAME` holds, from
/// `cargo run -p faultline-fuzz --bin make-seeds`).
pub fn seeds(name: &str) -> Vec<Vec<u8>> {
    match name {
        "codec" => codec::seeds(),
        "proto" => proto::seeds(),
        "guest_agent" => guest_agent::seeds(),
        "replica" => replica::seeds(),
        "nbd" => nbd::seeds(),
        "vhost_blk" => vhost_blk::seeds(),
        "control" => control::seeds(),
        "plan_file" => plan_file::seeds(),
        "orchestrate" => orchestrate::seeds(),
        _ => Vec::new(),
    }
}
