//! The source role: serves a frozen memory image to one destination.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use transport::encoding::EncodingPolicy;
use transport::proto::{SourceConfig, SourceSession};
use transport::quic::{self, PageReader, SourceReport};
use transport::tls::{CertificateDer, Identity};
use transport::Layout;

use crate::dest::runtime;
use crate::error::RoleError;

/// Where the source connects and how it authenticates.
pub struct SourceOptions {
    pub connect: SocketAddr,
    pub identity: Identity,
    /// The only certificate the destination may present.
    pub peer_cert: CertificateDer<'static>,
    pub vm_id: String,
    /// How long to keep trying to reach a destination that is not listening yet.
    pub connect_timeout: Duration,
    /// Push every page in the background (the normal case); off, pages move on demand only.
    pub push: bool,
    /// How pushed pages are encoded ([`EncodingPolicy::AUTO`] tunes it while migrating).
    pub encoding: EncodingPolicy,
}

/// Migrates `memory` (frozen for the whole call) to the destination, serving its demand
/// requests and pushing every page in the background.
pub fn send(
    memory: Arc<dyn PageReader>,
    layout: &Layout,
    opts: &SourceOptions,
) -> Result<SourceReport, RoleError> {
    let config = SourceConfig {
        push: opts.push,
        encoding: opts.encoding,
        ..SourceConfig::migrate(opts.vm_id.clone(), layout.clone())
    };
    run_session(memory, config, opts)
}

/// Like [`send`], and carries the VMM's vCPU and device state (an opaque blob the VMM
/// versions itself) to the destination, which gets it before it resumes the guest.
pub fn send_with_state(
    memory: Arc<dyn PageReader>,
    layout: &Layout,
    opts: &SourceOptions,
    vm_state: Vec<u8>,
) -> Result<SourceReport, RoleError> {
    let config = SourceConfig {
        push: opts.push,
        encoding: opts.encoding,
        vm_state: Some(vm_state),
        ..SourceConfig::migrate(opts.vm_id.clone(), layout.clone())
    };
    run_session(memory, config, opts)
}

/// Runs one source session of any kind over a fresh connection.
pub(crate) fn run_session(
    memory: Arc<dyn PageReader>,
    config: SourceConfig,
    opts: &SourceOptions,
) -> Result<SourceReport, RoleError> {
    let rt = runtime()?;
    rt.block_on(async {
        let endpoint = quic::client_endpoint(
            unspecified_for(opts.connect),
            &opts.identity,
            opts.peer_cert.clone(),
        )?;
        let conn = connect_retrying(&endpoint, opts.connect, opts.connect_timeout).await?;
        let session = SourceSession::new(config);
        let report = quic::run_source(conn, session, memory).await?;
        endpoint.close(0u32.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        Ok(report)
    })
}

/// The wildcard address of `peer`'s family, port 0: where a client endpoint binds.
pub(crate) fn unspecified_for(peer: SocketAddr) -> SocketAddr {
    match peer {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    }
}

/// A destination may still be starting; retry refused/timed-out connects until `timeout`.
/// TLS failures (wrong certificate) are final and returned at once.
async fn connect_retrying(
    endpoint: &quic::Endpoint,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<quic::Connection, RoleError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match quic::connect(endpoint, addr).await {
            Ok(c) => return Ok(c),
            Err(quic::DriverError::Connection(quinn::ConnectionError::TimedOut))
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}
