//! The QUIC driver: a thin async shell around the [`crate::proto`] state machines.
//!
//! The source connects; the destination listens. The source opens three streams, each
//! starting with a one-byte tag: control (bidirectional), urgent (bidirectional: requests
//! flow destination → source, replies source → destination) and bulk (unidirectional push).
//! Urgent replies are sent at a higher stream priority than the push, so quinn packs them
//! ahead of queued bulk data and a fault never waits behind pushed pages.

mod dest;
mod frame;
mod source;

pub use dest::{run_dest, DestHooks, DestReport, PageSink, SinkError};
pub use frame::{read_frame, write_message, write_pages, FrameError};
pub use source::{
    run_replication, run_source, PageReader, ReplicationEvent, ReplicationReport, SourceReport,
    Update,
};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
pub use quinn::{Connection, Endpoint};
use quinn::{TransportConfig, VarInt};
use rustls::pki_types::CertificateDer;
use thiserror::Error;

use crate::message::ErrorCode;
use crate::proto::{Channel, ProtoError};
use crate::tls::{client_tls, server_tls, Identity, TlsError};

/// First byte of each stream, telling the destination what the stream carries.
pub const TAG_CONTROL: u8 = 0xC0;
pub const TAG_URGENT: u8 = 0xC1;
pub const TAG_BULK: u8 = 0xC2;

/// Stream priorities: higher is sent first.
pub const PRIO_URGENT: i32 = 100;
pub const PRIO_CONTROL: i32 = 50;
pub const PRIO_BULK: i32 = 0;

/// Application close code of a session that ended normally.
pub const CLOSE_OK: u32 = 0;

/// Where the peer or the network ended a session.
#[derive(Debug, Error)]
pub enum DriverError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error(
        "QUIC connection failed: {0} (a TLS failure here usually means the peer presented a \
         certificate other than the pinned one)"
    )]
    Connection(#[from] quinn::ConnectionError),
    #[error("the peer closed the session with {code:?}: {reason}")]
    PeerClosed { code: ErrorCode, reason: String },
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtoError),
    #[error("stream error on the {channel:?} channel: {source}")]
    Stream {
        channel: Channel,
        source: FrameError,
    },
    #[error("the peer opened an unknown stream (tag {0:#04x})")]
    UnknownStream(u8),
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("page source failed: {0}")]
    Reader(String),
    #[error("installing pages failed: {0}")]
    Sink(#[from] SinkError),
}

/// Transport parameters sized for migration on a fast path (loopback or LAN).
///
/// BBR paces the push at the rate the path delivers instead of filling every queue until
/// loss, and the per-stream window caps how much pushed data can be in flight or unread
/// ahead of a demand reply. Measured on loopback (docs/benchmarks.md): with CUBIC and a
/// 32 MiB window the demand-fault p50 under a full push was about 10 ms; with BBR and
/// 4 MiB it is about 0.3 ms, and the push was no slower. A long fat link needs a window of
/// at least its bandwidth-delay product (12.5 MB at 1 Gbit/s and 100 ms).
pub fn transport_config() -> TransportConfig {
    let mut t = TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(STREAM_WINDOW));
    t.receive_window(VarInt::from_u32(4 * STREAM_WINDOW));
    t.send_window(4 * u64::from(STREAM_WINDOW));
    t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    t.max_concurrent_bidi_streams(VarInt::from_u32(8));
    t.max_concurrent_uni_streams(VarInt::from_u32(8));
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    t.max_idle_timeout(Some(VarInt::from_u32(30_000).into()));
    t
}

/// Per-stream flow-control window; see [`transport_config`].
pub const STREAM_WINDOW: u32 = 4 << 20;

/// UDP socket buffer size asked for. At the default (about 200 KiB) a burst of bulk data
/// overflows the receive queue on a fast path, and every drop costs quinn a loss recovery.
pub const UDP_BUFFER_BYTES: usize = 16 << 20;

/// Binds a UDP socket with large send and receive buffers. Where the system limit
/// (`net.core.rmem_max`) is lower and we are not privileged to exceed it, the kernel's cap
/// applies; that is a slowdown, not an error.
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use std::os::fd::AsRawFd;
    let sock = std::net::UdpSocket::bind(addr)?;
    let size = UDP_BUFFER_BYTES as libc::c_int;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        for opt in [force, plain] {
            // SAFETY: setsockopt reads exactly size_of::<c_int>() bytes from a live c_int
            // on a socket this function owns.
            let r = unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if r == 0 {
                break;
            }
        }
    }
    Ok(sock)
}

/// Endpoint configuration whose stateless-reset key and connection-id key are derived from
/// this side's private key.
///
/// A restarted daemon (same identity, same port) then recognises the connection ids of its
/// previous incarnation and answers their packets with a valid stateless reset, so peers
/// drop the dead connection within a round trip instead of waiting out the idle timeout:
/// a standby that restarts is reconnected to at once.
fn endpoint_config(me: &Identity) -> quinn::EndpointConfig {
    let derive = |label: &[u8]| {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(label);
        ctx.update(me.key.secret_der());
        ctx.finish()
    };
    let reset = derive(b"faultline stateless reset key v1");
    let cid = derive(b"faultline connection id key v1");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&cid.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut config = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        reset.as_ref(),
    )));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    config
}

fn endpoint(
    addr: SocketAddr,
    me: &Identity,
    server: Option<quinn::ServerConfig>,
) -> Result<Endpoint, DriverError> {
    let bind = |source| DriverError::Bind { addr, source };
    let socket = bind_udp(addr).map_err(bind)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| bind(std::io::Error::other("no async runtime is running")))?;
    Endpoint::new(endpoint_config(me), server, socket, runtime).map_err(bind)
}

/// A listening endpoint that presents `me` and accepts only clients presenting `peer`.
pub fn server_endpoint(
    addr: SocketAddr,
    me: &Identity,
    peer: CertificateDer<'static>,
) -> Result<Endpoint, DriverError> {
    let tls = server_tls(me, peer)?;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport_config()));
    endpoint(addr, me, Some(cfg))
}

/// A client endpoint that presents `me` and accepts only a server presenting `peer`.
pub fn client_endpoint(
    bind: SocketAddr,
    me: &Identity,
    peer: CertificateDer<'static>,
) -> Result<Endpoint, DriverError> {
    let tls = client_tls(me, peer)?;
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport_config()));
    let mut ep = endpoint(bind, me, None)?;
    ep.set_default_client_config(cfg);
    Ok(ep)
}

/// Connects to `addr`; the TLS handshake (and certificate pinning) completes here.
pub async fn connect(ep: &Endpoint, addr: SocketAddr) -> Result<quinn::Connection, DriverError> {
    let connecting = ep
        .connect(addr, "faultline")
        .map_err(|e| DriverError::Connect {
            addr,
            reason: e.to_string(),
        })?;
    Ok(connecting.await?)
}

/// Accepts one connection; `None` if the endpoint was closed.
pub async fn accept(ep: &Endpoint) -> Result<Option<quinn::Connection>, DriverError> {
    match ep.accept().await {
        Some(incoming) => Ok(Some(incoming.await?)),
        None => Ok(None),
    }
}

/// Closes `conn` telling the peer why.
pub(crate) fn close_with(conn: &quinn::Connection, err: &DriverError) {
    let code = match err {
        DriverError::Protocol(p) => p.code(),
        DriverError::Stream { .. } => ErrorCode::Malformed,
        _ => ErrorCode::Internal,
    };
    let reason = err.to_string();
    let reason = &reason.as_bytes()[..reason.len().min(512)];
    conn.close(VarInt::from_u32(code as u32), reason);
}

/// Maps a connection loss to the most useful error: the peer's own reason when it gave one.
pub(crate) fn connection_lost(e: quinn::ConnectionError) -> DriverError {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => DriverError::PeerClosed {
            code: ErrorCode::from_u16(u16::try_from(c.error_code.into_inner()).unwrap_or(0)),
            reason: String::from_utf8_lossy(&c.reason).into_owned(),
        },
        other => DriverError::Connection(other),
    }
}
