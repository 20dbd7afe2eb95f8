//! Errors of the migration roles.

use std::time::Duration;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum RoleError {
    #[error(transparent)]
    Uffd(#[from] uffd_core::Error),
    #[error(transparent)]
    Memory(#[from] uffd_core::MemoryError),
    #[error(transparent)]
    Transport(#[from] transport::quic::DriverError),
    #[error("cannot start the network runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Dirty(#[from] uffd_core::DirtyError),
    #[error(transparent)]
    Replica(#[from] uffd_core::ReplicaError),
    #[error("I/O error: {0}")]
    Io(std::io::Error),
    #[error("no source connected within {0:?}")]
    AcceptTimeout(Duration),
    #[error("the listening endpoint was closed before a source connected")]
    EndpointClosed,
    #[error("the guest memory regions do not match the memory layout")]
    LayoutDoesNotFitMemory,
}
