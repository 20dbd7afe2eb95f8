//! Raw-quinn baselines: the floor faultline's own numbers are compared against.
//!
//! Both measurements put the two ends in different processes on loopback (the server is a
//! [`child`](crate::child) re-execution of the bench binary) and use exactly faultline's QUIC
//! set-up: [`transport::quic::server_endpoint`] / [`transport::quic::client_endpoint`] with
//! mutual TLS 1.3 and pinned certificates, and [`transport::quic::transport_config`] windows.
//! Each process runs a 2-worker tokio runtime ([`crate::runtime`]). What is left out is
//! faultline itself: no framing, no protocol state machine, no page handling.
//!
//! A bench binary using these must hand its child roles to [`run_child`]:
//!
//! ```no_run
//! use faultline_benches::{baseline, child};
//! fn main() -> anyhow::Result<()> {
//!     if let Some(role) = child::child_role() {
//!         return baseline::run_child(&role, &child::child_args());
//!     }
//!     let rtt = baseline::quinn_rtt(2000)?;
//!     println!("p50 {} us", rtt.p50);
//!     Ok(())
//! }
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use quinn::{ReadExactError, VarInt};
use serde::Serialize;
use serde_json::json;

use crate::certs::{self, CertDir};
use crate::child::{spawn_child, ChildProcess};
use crate::stats::Summary;
use crate::{emit, runtime};
use transport::quic::{accept, client_endpoint, connect, server_endpoint};

/// Child role: answers each fixed-size request on one bidirectional stream with a fixed-size
/// response. Arguments: certificate directory, request bytes, response bytes.
pub const ROLE_RTT_SERVER: &str = "quinn-rtt-server";
/// Child role: sends a given number of bytes on one unidirectional stream as fast as it can.
/// Arguments: certificate directory, total bytes, chunk bytes.
pub const ROLE_STREAM_SENDER: &str = "quinn-stream-sender";

/// Size of each request in [`quinn_rtt`].
pub const RTT_REQUEST_BYTES: usize = 16;
/// Size of each response in [`quinn_rtt`]: one guest page.
pub const RTT_RESPONSE_BYTES: usize = 4096;
/// Round trips made before measuring in [`quinn_rtt`].
pub const RTT_WARMUP: usize = 200;
/// Size of each `write_chunk` in [`quinn_stream_throughput`].
pub const STREAM_CHUNK_BYTES: usize = 256 << 10;
/// Size of the random buffer the stream sender cycles through (chunks are zero-copy slices).
const STREAM_SOURCE_BYTES: usize = 8 << 20;

/// How long a child may take to bind and announce its address.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a child may take to exit after the parent closed the connection.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether `role` is one of this module's child roles (see [`run_child`]).
pub fn is_child_role(role: &str) -> bool {
    role == ROLE_RTT_SERVER || role == ROLE_STREAM_SENDER
}

/// Runs the child side of a baseline in this (child) process. Call from `main` when
/// [`crate::child::child_role`] returns a role; fails on a role that is not a baseline role.
pub fn run_child(role: &str, args: &[String]) -> anyhow::Result<()> {
    let arg = |i: usize| -> anyhow::Result<&str> {
        args.get(i)
            .map(String::as_str)
            .with_context(|| format!("child {role}: missing argument {i} (got {args:?})"))
    };
    let rt = runtime()?;
    let r = match role {
        ROLE_RTT_SERVER => {
            let dir = Path::new(arg(0)?);
            let req: usize = arg(1)?.parse()?;
            let resp: usize = arg(2)?.parse()?;
            rt.block_on(rtt_server(dir, req, resp))
        }
        ROLE_STREAM_SENDER => {
            let dir = Path::new(arg(0)?);
            let bytes: u64 = arg(1)?.parse()?;
            let chunk: usize = arg(2)?.parse()?;
            rt.block_on(stream_sender(dir, bytes, chunk))
        }
        other => bail!("unknown bench child role {other:?}"),
    };
    r.with_context(|| format!("child {role}"))
}

// ---------------------------------------------------------------------------------------------
// Request/response latency.

/// Shape of a [`quinn_rtt_with`] measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RttParams {
    /// Measured round trips.
    pub samples: usize,
    /// Unmeasured round trips made first (connection warm, congestion window open, caches hot).
    pub warmup: usize,
    /// Bytes the client writes per round trip.
    pub request_bytes: usize,
    /// Bytes the server answers with per round trip.
    pub response_bytes: usize,
}

impl Default for RttParams {
    fn default() -> Self {
        RttParams {
            samples: 2000,
            warmup: RTT_WARMUP,
            request_bytes: RTT_REQUEST_BYTES,
            response_bytes: RTT_RESPONSE_BYTES,
        }
    }
}

/// Request/response latency of raw quinn between two processes on loopback, in µs: the floor
/// for faultline's demand-fault latency.
///
/// One connection, ONE bidirectional stream; `n` times, sequentially, the parent writes a
/// 16-byte request and reads the child's 4096-byte response, timing each round trip from just
/// before the write to the last response byte read. 200 warm-up round trips are not counted.
pub fn quinn_rtt(n: usize) -> anyhow::Result<Summary> {
    quinn_rtt_with(RttParams {
        samples: n,
        ..RttParams::default()
    })
}

/// [`quinn_rtt`] with explicit warm-up and message sizes.
pub fn quinn_rtt_with(p: RttParams) -> anyhow::Result<Summary> {
    ensure!(p.request_bytes > 0, "requests must be at least one byte");
    let certs = CertDir::generate()?;
    let mut child = spawn_child(
        ROLE_RTT_SERVER,
        &[
            certs.arg(),
            p.request_bytes.to_string(),
            p.response_bytes.to_string(),
        ],
    )?;
    let addr = child_addr(&mut child)?;
    let rt = runtime()?;
    let budget =
        Duration::from_secs(60) + Duration::from_millis(10) * (p.samples + p.warmup) as u32;
    let samples = rt.block_on(async {
        tokio::time::timeout(budget, rtt_client(&certs, addr, p))
            .await
            .with_context(|| format!("RTT measurement did not finish within {budget:?}"))?
    })?;
    drop(rt);
    child.wait_success(EXIT_TIMEOUT)?;
    Ok(Summary::from_durations(&samples))
}

async fn rtt_client(
    certs: &CertDir,
    addr: SocketAddr,
    p: RttParams,
) -> anyhow::Result<Vec<Duration>> {
    let ep = client_endpoint(loopback(), &certs.client, certs.server.cert.clone())?;
    let conn = connect(&ep, addr).await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let request = vec![0x5Au8; p.request_bytes];
    let mut response = vec![0u8; p.response_bytes];
    let mut samples = Vec::with_capacity(p.samples);
    for i in 0..p.warmup + p.samples {
        let t = Instant::now();
        send.write_all(&request).await?;
        recv.read_exact(&mut response).await?;
        let dt = t.elapsed();
        if i >= p.warmup {
            samples.push(dt);
        }
    }
    send.finish()?;
    let rest = recv.read_to_end(p.response_bytes).await?;
    ensure!(
        rest.is_empty(),
        "server sent {} unexpected bytes",
        rest.len()
    );
    conn.close(VarInt::from_u32(0), b"done");
    ep.wait_idle().await;
    Ok(samples)
}

async fn rtt_server(dir: &Path, req: usize, resp: usize) -> anyhow::Result<()> {
    let (me, peer) = certs::load_server(dir)?;
    let ep = server_endpoint(loopback(), &me, peer)?;
    emit(&json!({ "role": ROLE_RTT_SERVER, "addr": ep.local_addr()?.to_string() }));
    let conn = accept(&ep)
        .await?
        .context("endpoint closed before a connection")?;
    let (mut send, mut recv) = conn.accept_bi().await?;
    let response = random_bytes(resp);
    let mut request = vec![0u8; req];
    loop {
        match recv.read_exact(&mut request).await {
            Ok(()) => send.write_all(&response).await?,
            Err(ReadExactError::FinishedEarly(0)) => break,
            Err(e) => return Err(e.into()),
        }
    }
    send.finish()?;
    conn.closed().await;
    ep.wait_idle().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Single-stream throughput.

/// One [`quinn_stream_throughput`] run. Rates are GB/s (1e9 bytes per second).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StreamRun {
    /// Bytes received on the stream.
    pub bytes: u64,
    /// Transfer rate from the first byte received to the end of the stream, counting the bytes
    /// after the first chunk (the ones that arrived inside the timed interval).
    pub gbps: f64,
    /// Seconds from the first byte received to the end of the stream.
    pub secs: f64,
    /// All bytes over the time from starting to connect (UDP + TLS handshake) to the end.
    pub gbps_with_setup: f64,
    /// Seconds from starting to connect to the end of the stream.
    pub secs_with_setup: f64,
    /// Milliseconds from starting to connect until the connection was established.
    pub connect_ms: f64,
}

/// Throughput of ONE raw quinn unidirectional stream between two processes on loopback: the
/// floor for faultline's bulk push.
///
/// A child process listens, accepts the parent's connection, opens a unidirectional stream and
/// writes `bytes` as fast as it can in 256 KiB [`Bytes`] chunks sliced (zero-copy) from a
/// pre-filled random buffer, so nothing is compressible. The parent receives with
/// `read_chunk`, so it copies nothing beyond what quinn does, and checks the byte count.
pub fn quinn_stream_throughput(bytes: u64) -> anyhow::Result<StreamRun> {
    ensure!(bytes > 0, "nothing to send");
    let certs = CertDir::generate()?;
    let mut child = spawn_child(
        ROLE_STREAM_SENDER,
        &[
            certs.arg(),
            bytes.to_string(),
            STREAM_CHUNK_BYTES.to_string(),
        ],
    )?;
    let addr = child_addr(&mut child)?;
    let rt = runtime()?;
    // Generous: a 2-core machine under load still moves well over 10 MB/s on loopback.
    let budget = Duration::from_secs(60 + bytes / 10_000_000);
    let run = rt.block_on(async {
        tokio::time::timeout(budget, stream_receiver(&certs, addr, bytes))
            .await
            .with_context(|| format!("stream transfer did not finish within {budget:?}"))?
    })?;
    drop(rt);
    child.wait_success(EXIT_TIMEOUT)?;
    Ok(run)
}

/// `runs` independent [`quinn_stream_throughput`] runs (a fresh child and connection each),
/// so the caller can report the median (see [`crate::stats::median`]) and the spread.
pub fn quinn_stream_runs(bytes: u64, runs: usize) -> anyhow::Result<Vec<StreamRun>> {
    (0..runs).map(|_| quinn_stream_throughput(bytes)).collect()
}

async fn stream_receiver(
    certs: &CertDir,
    addr: SocketAddr,
    bytes: u64,
) -> anyhow::Result<StreamRun> {
    let ep = client_endpoint(loopback(), &certs.client, certs.server.cert.clone())?;
    let t0 = Instant::now();
    let conn = connect(&ep, addr).await?;
    let t_conn = Instant::now();
    let mut recv = conn.accept_uni().await?;
    let first = recv
        .read_chunk(usize::MAX, true)
        .await?
        .context("stream ended before any data")?;
    let t_first = Instant::now();
    let first_len = first.bytes.len() as u64;
    drop(first);
    let mut total = first_len;
    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
        total += chunk.bytes.len() as u64;
    }
    let t_end = Instant::now();
    conn.close(VarInt::from_u32(0), b"done");
    ep.wait_idle().await;
    ensure!(total == bytes, "received {total} bytes, expected {bytes}");
    let secs = (t_end - t_first).as_secs_f64();
    let secs_with_setup = (t_end - t0).as_secs_f64();
    Ok(StreamRun {
        bytes,
        gbps: (total - first_len) as f64 / secs / 1e9,
        secs,
        gbps_with_setup: total as f64 / secs_with_setup / 1e9,
        secs_with_setup,
        connect_ms: (t_conn - t0).as_secs_f64() * 1e3,
    })
}

async fn stream_sender(dir: &Path, bytes: u64, chunk: usize) -> anyhow::Result<()> {
    ensure!(chunk > 0, "chunk size must be positive");
    let data = random_bytes(STREAM_SOURCE_BYTES.max(chunk));
    let (me, peer) = certs::load_server(dir)?;
    let ep = server_endpoint(loopback(), &me, peer)?;
    emit(&json!({ "role": ROLE_STREAM_SENDER, "addr": ep.local_addr()?.to_string() }));
    let conn = accept(&ep)
        .await?
        .context("endpoint closed before a connection")?;
    let mut send = conn.open_uni().await?;
    let mut left = bytes;
    let mut off = 0usize;
    while left > 0 {
        let n = (chunk as u64).min(left) as usize;
        if off + n > data.len() {
            off = 0;
        }
        send.write_chunk(data.slice(off..off + n)).await?;
        off += n;
        left -= n as u64;
    }
    send.finish()?;
    // The parent closes the connection once it has read the whole stream.
    conn.closed().await;
    ep.wait_idle().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Helpers.

fn loopback() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

/// Reads the child's `{"addr": "..."}` handshake line.
fn child_addr(child: &mut ChildProcess) -> anyhow::Result<SocketAddr> {
    let hello = child.recv_json(HANDSHAKE_TIMEOUT)?;
    let addr = hello["addr"]
        .as_str()
        .with_context(|| format!("child {} handshake has no addr: {hello}", child.role()))?;
    Ok(addr.parse()?)
}

/// `len` pseudo-random bytes (splitmix64, seeded from the clock): incompressible filler.
pub fn random_bytes(len: usize) -> Bytes {
    let mut state = Instant::now().elapsed().as_nanos() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
        ^ 0x9E37_79B9_7F4A_7C15;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        v.extend_from_slice(&z.to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}
