//! The faultline guest agent: a daemon inside a Linux guest that finds hot and free
//! guest-physical ranges, reports them to the host, and pre-touches hot memory when
//! postcopy starts, so the guest's own faults on absent pages overlap.
//!
//! [`proto`] is the wire protocol and is all the host side needs; the other modules are the
//! daemon (see `docs/guest-agent.md`).

pub mod config;
pub mod daemon;
pub mod procfs;
pub mod proto;
pub mod scan;
pub mod sysinfo;
pub mod throttle;
pub mod touch;
pub mod transport;
