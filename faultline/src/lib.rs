//! What the `faultline` command-line tool, the end-to-end tests and the benches share, and a
//! VMM does not need: memory images to migrate from ([`image`]: a synthetic image with a
//! realistic mix of pages, or a raw RAM dump file) and stand-in guest workloads
//! ([`workload`]) that write memory during replication or touch it during postcopy, and the
//! Prometheus metrics of `replicate` and `standby` ([`metrics`]).
//!
//! The CLI itself is the crate's binary. A VMM links `vmm-shim`, never this crate.

pub mod image;
pub mod metrics;
pub mod workload;

pub use image::SourceImage;
