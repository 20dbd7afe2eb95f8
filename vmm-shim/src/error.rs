//! Errors of the migration roles.

use std::time::Duration;

use thiserror::Error;

/// Why a migration role (source, destination, standby, replicator, evacuation) failed.
///
/// The wrapped errors of `uffd-core` and `transport` convert with `?`; the other variants
/// are this crate's own checks.
#[derive(Debug, Error)]
pub enum RoleError {
    /// userfaultfd or guest-region setup failed: registering the destination's memory, the
    /// fault loop, installing a page, or regions that do not form a valid region map
    /// (misaligned or overlapping, e.g. in [`crate::replica::PausedMemory::new`]).
    #[error(transparent)]
    Uffd(#[from] uffd_core::Error),
    /// Building guest memory failed (bad length, `memfd_create`/`mmap`/`ftruncate`); for a
    /// VMM that allocates its memory with `uffd-core` and propagates with `?`.
    #[error(transparent)]
    Memory(#[from] uffd_core::MemoryError),
    /// The QUIC side failed: binding or connecting the endpoint, TLS, a protocol violation,
    /// a timeout, or the peer closing the session with an error.
    #[error(transparent)]
    Transport(#[from] transport::quic::DriverError),
    /// The tokio runtime that drives QUIC could not be built (thread creation failed).
    #[error("cannot start the network runtime: {0}")]
    Runtime(std::io::Error),
    /// The dirty tracker failed: setting it up, or a harvest during replication or at the
    /// final harvest of evacuation.
    #[error(transparent)]
    Dirty(#[from] uffd_core::DirtyError),
    /// The replica store failed (out-of-range page, I/O, a damaged or foreign index); for
    /// a standby host that opens its replica and propagates with `?`.
    #[error(transparent)]
    Replica(#[from] uffd_core::ReplicaError),
    /// Any other OS error: reading the endpoint's local address, spawning the replicator
    /// thread, or that thread panicking (reported as an `io::Error` with that message).
    #[error("I/O error: {0}")]
    Io(std::io::Error),
    /// The destination or standby waited its accept timeout (the value held, from
    /// [`crate::DestOptions::accept_timeout`]) and no source connected.
    #[error("no source connected within {0:?}")]
    AcceptTimeout(Duration),
    /// The source could not reach a destination at `addr` within its connect timeout
    /// ([`crate::SourceOptions::connect_timeout`]): nobody answered, or the path is down.
    #[error("no destination answered at {addr} within {timeout:?}")]
    ConnectTimeout {
        /// Where the source tried to connect.
        addr: std::net::SocketAddr,
        /// The connect timeout that ran out.
        timeout: Duration,
    },
    /// The listening endpoint closed while the destination or standby was waiting for a
    /// source to connect.
    #[error("the listening endpoint was closed before a source connected")]
    EndpointClosed,
    /// The regions handed to the destination do not match the layout: a page size other
    /// than 4096 bytes, a different number of regions, or a region of a different length.
    /// Checked before anything is registered.
    #[error("the guest memory regions do not match the memory layout")]
    LayoutDoesNotFitMemory,
    /// The VM's disks cannot join the session (a size that is not whole blocks, or disks
    /// that do not match the layout's).
    #[error(transparent)]
    Disks(#[from] crate::disks::DiskSetupError),
}

#[cfg(test)]
mod tests {
    use super::RoleError;
    use crate::hints::HintError;
    use guest_agent::proto::{DecodeError, RangeError};
    use uffd_core::error::chain;

    /// `e`'s own message does not hold `cause`; its chain holds it exactly once.
    fn cause_once(e: &(dyn std::error::Error + 'static), cause: &str) {
        let (own, all) = (e.to_string(), chain(e));
        assert!(!own.contains(cause), "{own:?} repeats its source {cause:?}");
        assert_eq!(all.matches(cause).count(), 1, "{all:?}");
    }

    #[test]
    fn display_leaves_the_source_to_the_chain() {
        let io = std::io::Error::from_raw_os_error(libc::EEXIST);
        let cause = io.to_string();
        let e = RoleError::from(uffd_core::Error::Install(uffd_core::InstallError::Uffd {
            page: 9,
            source: uffd_core::UffdError::Sys {
                op: "UFFDIO_COPY",
                source: io,
            },
        }));
        assert_eq!(
            chain(&e),
            format!("installing page 9 failed: UFFDIO_COPY failed: {cause}")
        );
        cause_once(&e, &cause);

        let ranges = RangeError::Empty { index: 0 };
        let cause = ranges.to_string();
        let e = HintError::Decode(DecodeError::Ranges(ranges));
        assert_eq!(
            chain(&e),
            format!("undecodable agent input: invalid ranges: {cause}")
        );
        cause_once(&e, &cause);
    }
}
