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
use quinn::rustls::pki_types::CertificateDer;
use transport::quic::{accept, client_endpoint, connect, server_endpoint};

/// Child role: answers each fixed-size request on one bidirectional stream with a fixed-size
/// response. Arguments: certificate directory, request bytes, response bytes, and optionally
/// `tasks` to run the loop as a spawned task (see [`LoopPlacement`]).
pub const ROLE_RTT_SERVER: &str = "quinn-rtt-server";
/// Child role: sends a given number of bytes on one unidirectional stream as fast as it can.
/// Arguments: certificate directory, total bytes, chunk bytes, and optionally `tasks` (see
/// [`LoopPlacement`]).
pub const ROLE_STREAM_SENDER: &str = "quinn-stream-sender";
/// Child role: sends a given number of bytes on one plain TCP connection (no TLS) as fast as
/// it can. Arguments: total bytes, chunk bytes.
pub const ROLE_TCP_SENDER: &str = "tcp-stream-sender";

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
    role == ROLE_RTT_SERVER || role == ROLE_STREAM_SENDER || role == ROLE_TCP_SENDER
}

/// Runs the child side of a baseline in this (child) process. Call from `main` when
/// [`crate::child::child_role`] returns a role; fails on a role that is not a baseline role.
pub fn run_child(role: &str, args: &[String]) -> anyhow::Result<()> {
    let arg = |i: usize| -> anyhow::Result<&str> {
        args.get(i)
            .map(String::as_str)
            .with_context(|| format!("child {role}: missing argument {i} (got {args:?})"))
    };
    if role == ROLE_TCP_SENDER {
        let bytes: u64 = arg(0)?.parse()?;
        let chunk: usize = arg(1)?.parse()?;
        return tcp_sender(bytes, chunk).with_context(|| format!("child {role}"));
    }
    let rt = runtime()?;
    let r = match role {
        ROLE_RTT_SERVER => {
            let dir = Path::new(arg(0)?);
            let req: usize = arg(1)?.parse()?;
            let resp: usize = arg(2)?.parse()?;
            if args.get(3).map(String::as_str) == Some("tasks") {
                let dir = dir.to_path_buf();
                rt.block_on(async move {
                    tokio::spawn(async move { rtt_server(&dir, req, resp).await }).await?
                })
            } else {
                rt.block_on(rtt_server(dir, req, resp))
            }
        }
        ROLE_STREAM_SENDER => {
            let dir = Path::new(arg(0)?);
            let bytes: u64 = arg(1)?.parse()?;
            let chunk: usize = arg(2)?.parse()?;
            if args.get(3).map(String::as_str) == Some("tasks") {
                let dir = dir.to_path_buf();
                rt.block_on(async move {
                    tokio::spawn(async move { stream_sender(&dir, bytes, chunk).await }).await?
                })
            } else {
                rt.block_on(stream_sender(dir, bytes, chunk))
            }
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
/// for faultline's demand-fault latency. (See [`RttSession`] to interleave with other work.)
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
    let mut session = RttSession::start(p.request_bytes, p.response_bytes)?;
    session.sample(p.warmup)?;
    let samples = session.sample(p.samples)?;
    session.finish()?;
    Ok(Summary::from_durations(&samples))
}

/// Where both ends of a baseline ([`RttSession`], [`quinn_stream_throughput_with`]) run their
/// application loop.
///
/// With [`LoopPlacement::BlockOn`] (what [`RttSession::start`], [`quinn_rtt`] and
/// [`quinn_stream_throughput`] use) each loop runs in `Runtime::block_on`, i.e. on the
/// process's main thread, while quinn's connection and endpoint drivers run on the runtime's
/// worker threads: every exchange between the loop and quinn is a cross-thread wake-up plus a
/// contended lock on quinn's connection state, at each end. With [`LoopPlacement::Tasks`] both
/// loops are spawned onto the worker threads, next to the drivers, as a quinn application (or
/// faultline's own drivers) would run them: the tighter floor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoopPlacement {
    BlockOn,
    Tasks,
}

/// A live raw-quinn request/response connection to a child server, for benches that want to
/// interleave baseline batches with their own measurements (A/B/A/B) instead of measuring the
/// baseline once: on a shared VM the round-trip floor moves with the host's load.
///
/// Start it from a long-lived thread (see [`crate::child::spawn_child`]). It owns its own
/// 2-worker runtime, so do not call its methods from inside another runtime's async context.
pub struct RttSession {
    client: Option<RttClient>,
    mode: LoopPlacement,
    rt: tokio::runtime::Runtime,
    request: Vec<u8>,
    response: Vec<u8>,
    child: ChildProcess,
    _certs: CertDir,
}

struct RttClient {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    conn: quinn::Connection,
    ep: quinn::Endpoint,
}

impl RttSession {
    /// Starts a child server answering every `request_bytes` request with `response_bytes`,
    /// connects to it and opens the one bidirectional stream. Nothing is measured yet (make
    /// some warm-up round trips with [`Self::sample`] first).
    pub fn start(request_bytes: usize, response_bytes: usize) -> anyhow::Result<RttSession> {
        Self::start_with(request_bytes, response_bytes, LoopPlacement::BlockOn)
    }

    /// [`Self::start`] with the loops of both ends run as `mode` says.
    pub fn start_with(
        request_bytes: usize,
        response_bytes: usize,
        mode: LoopPlacement,
    ) -> anyhow::Result<RttSession> {
        ensure!(request_bytes > 0, "requests must be at least one byte");
        let certs = CertDir::generate()?;
        let mut args = vec![
            certs.arg(),
            request_bytes.to_string(),
            response_bytes.to_string(),
        ];
        if mode == LoopPlacement::Tasks {
            args.push("tasks".into());
        }
        let mut child = spawn_child(ROLE_RTT_SERVER, &args)?;
        let addr = child_addr(&mut child)?;
        let rt = runtime()?;
        let client = rt.block_on(async {
            let ep = client_endpoint(loopback(), &certs.client, certs.server.cert.clone())?;
            let conn = connect(&ep, addr).await?;
            let (send, recv) = conn.open_bi().await?;
            anyhow::Ok(RttClient {
                send,
                recv,
                conn,
                ep,
            })
        })?;
        Ok(RttSession {
            client: Some(client),
            mode,
            rt,
            request: vec![0x5A; request_bytes],
            response: vec![0; response_bytes],
            child,
            _certs: certs,
        })
    }

    /// `n` sequential round trips; each is timed from just before writing the request to the
    /// last byte of the response read.
    pub fn sample(&mut self, n: usize) -> anyhow::Result<Vec<Duration>> {
        if self.mode == LoopPlacement::Tasks {
            return self.sample_in_task(n);
        }
        let c = self.client.as_mut().context("session already finished")?;
        let (request, response) = (&self.request, &mut self.response);
        let budget = Duration::from_secs(30) + Duration::from_millis(10) * n as u32;
        self.rt.block_on(async {
            tokio::time::timeout(budget, async {
                let mut samples = Vec::with_capacity(n);
                for _ in 0..n {
                    let t = Instant::now();
                    c.send.write_all(request).await?;
                    c.recv.read_exact(response).await?;
                    samples.push(t.elapsed());
                }
                anyhow::Ok(samples)
            })
            .await
            .with_context(|| format!("{n} round trips did not finish within {budget:?}"))?
        })
    }

    /// [`Self::sample`] with the loop spawned onto a worker thread ([`LoopPlacement::Tasks`]).
    fn sample_in_task(&mut self, n: usize) -> anyhow::Result<Vec<Duration>> {
        let mut c = self.client.take().context("session already finished")?;
        let request = self.request.clone();
        let mut response = std::mem::take(&mut self.response);
        let budget = Duration::from_secs(30) + Duration::from_millis(10) * n as u32;
        let task = self.rt.spawn(async move {
            let r = tokio::time::timeout(budget, async {
                let mut samples = Vec::with_capacity(n);
                for _ in 0..n {
                    let t = Instant::now();
                    c.send.write_all(&request).await?;
                    c.recv.read_exact(&mut response).await?;
                    samples.push(t.elapsed());
                }
                anyhow::Ok(samples)
            })
            .await;
            (c, response, r)
        });
        let (c, response, r) = self.rt.block_on(task)?;
        self.client = Some(c);
        self.response = response;
        r.with_context(|| format!("{n} round trips did not finish within {budget:?}"))?
    }

    /// Ends the stream and the connection cleanly and checks that the child exited with
    /// success. (Dropping the session instead kills the child.)
    pub fn finish(mut self) -> anyhow::Result<()> {
        let mut c = self.client.take().context("session already finished")?;
        let limit = self.response.len();
        self.rt.block_on(async {
            c.send.finish()?;
            let rest = c.recv.read_to_end(limit).await?;
            ensure!(
                rest.is_empty(),
                "server sent {} unexpected bytes",
                rest.len()
            );
            c.conn.close(VarInt::from_u32(0), b"done");
            c.ep.wait_idle().await;
            anyhow::Ok(())
        })?;
        drop(c);
        self.child.wait_success(EXIT_TIMEOUT)?;
        Ok(())
    }
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
    /// CPU seconds (user + system) the receiving process used during the run; compare with
    /// `secs_with_setup` to see whether the receiver was CPU-bound.
    pub recv_cpu_secs: f64,
    /// CPU seconds (user + system) the sending child used over its whole life (start-up and
    /// filling an 8 MiB random buffer included, a few ms).
    pub send_cpu_secs: f64,
    /// Increase of the host-wide UDP `RcvbufErrors` counter (`/proc/net/snmp`) during the run:
    /// datagrams dropped because a socket receive buffer was full, which quinn sees as loss.
    /// Host-wide, so other traffic on the machine can add to it; `null` if unreadable.
    pub udp_rcvbuf_errors: Option<u64>,
}

impl StreamRun {
    /// The timed figures of a stream of `total` bytes (`bytes` expected), whose first read
    /// of `first_len` bytes ended at `t_first`: connecting began at `t0`, was done at
    /// `t_conn`, the stream ended at `t_end`. CPU and drop counts are left for the caller.
    fn timed(total: u64, first_len: u64, [t0, t_conn, t_first, t_end]: [Instant; 4]) -> StreamRun {
        let secs = (t_end - t_first).as_secs_f64();
        let secs_with_setup = (t_end - t0).as_secs_f64();
        StreamRun {
            bytes: total,
            gbps: (total - first_len) as f64 / secs / 1e9,
            secs,
            gbps_with_setup: total as f64 / secs_with_setup / 1e9,
            secs_with_setup,
            connect_ms: (t_conn - t0).as_secs_f64() * 1e3,
            recv_cpu_secs: f64::NAN,
            send_cpu_secs: f64::NAN,
            udp_rcvbuf_errors: None,
        }
    }
}

/// Throughput of ONE raw quinn unidirectional stream between two processes on loopback: the
/// floor for faultline's bulk push.
///
/// A child process listens, accepts the parent's connection, opens a unidirectional stream and
/// writes `bytes` as fast as it can in 256 KiB [`Bytes`] chunks sliced (zero-copy) from a
/// pre-filled random buffer, so nothing is compressible. The parent receives with
/// `read_chunk`, so it copies nothing beyond what quinn does, and checks the byte count.
/// Both loops run in `block_on` ([`LoopPlacement::BlockOn`]).
pub fn quinn_stream_throughput(bytes: u64) -> anyhow::Result<StreamRun> {
    quinn_stream_throughput_with(bytes, LoopPlacement::BlockOn)
}

/// [`quinn_stream_throughput`] with the sending and receiving loops placed as `mode` says.
pub fn quinn_stream_throughput_with(bytes: u64, mode: LoopPlacement) -> anyhow::Result<StreamRun> {
    ensure!(bytes > 0, "nothing to send");
    let certs = CertDir::generate()?;
    let mut args = vec![
        certs.arg(),
        bytes.to_string(),
        STREAM_CHUNK_BYTES.to_string(),
    ];
    if mode == LoopPlacement::Tasks {
        args.push("tasks".into());
    }
    let mut child = spawn_child(ROLE_STREAM_SENDER, &args)?;
    let addr = child_addr(&mut child)?;
    let children_cpu0 = cpu_secs(libc::RUSAGE_CHILDREN);
    let drops0 = udp_rcvbuf_errors();
    let rt = runtime()?;
    let self_cpu0 = cpu_secs(libc::RUSAGE_SELF);
    // Generous: a 2-core machine under load still moves well over 10 MB/s on loopback.
    let budget = Duration::from_secs(60 + bytes / 10_000_000);
    let (me, peer) = (certs.client.clone(), certs.server.cert.clone());
    let receive = async move {
        tokio::time::timeout(budget, stream_receiver(me, peer, addr, bytes))
            .await
            .with_context(|| format!("stream transfer did not finish within {budget:?}"))?
    };
    let mut run = match mode {
        LoopPlacement::BlockOn => rt.block_on(receive)?,
        LoopPlacement::Tasks => rt.block_on(rt.spawn(receive))??,
    };
    run.recv_cpu_secs = cpu_secs(libc::RUSAGE_SELF) - self_cpu0;
    drop(rt);
    child.wait_success(EXIT_TIMEOUT)?;
    run.send_cpu_secs = cpu_secs(libc::RUSAGE_CHILDREN) - children_cpu0;
    run.udp_rcvbuf_errors = match (drops0, udp_rcvbuf_errors()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    Ok(run)
}

/// `runs` independent [`quinn_stream_throughput`] runs (a fresh child and connection each),
/// so the caller can report the median (see [`crate::stats::median`]) and the spread.
pub fn quinn_stream_runs(bytes: u64, runs: usize) -> anyhow::Result<Vec<StreamRun>> {
    (0..runs).map(|_| quinn_stream_throughput(bytes)).collect()
}

async fn stream_receiver(
    me: transport::tls::Identity,
    peer: CertificateDer<'static>,
    addr: SocketAddr,
    bytes: u64,
) -> anyhow::Result<StreamRun> {
    let ep = client_endpoint(loopback(), &me, peer)?;
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
    Ok(StreamRun::timed(
        total,
        first_len,
        [t0, t_conn, t_first, t_end],
    ))
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
// Plain TCP: the kernel's own stream, no TLS, no user-space transport.

/// Throughput of ONE plain TCP connection between two processes on loopback: what the
/// kernel alone moves (QEMU's postcopy runs over such a stream). The child writes `bytes` of
/// incompressible data from a pre-filled buffer in [`STREAM_CHUNK_BYTES`] writes; the parent
/// reads into one reused buffer. Same fields as [`quinn_stream_throughput`]
/// (`udp_rcvbuf_errors` is `None`; `connect_ms` is the TCP connect).
pub fn tcp_stream_throughput(bytes: u64) -> anyhow::Result<StreamRun> {
    use std::io::Read;
    ensure!(bytes > 0, "nothing to send");
    let args = vec![bytes.to_string(), STREAM_CHUNK_BYTES.to_string()];
    let mut child = spawn_child(ROLE_TCP_SENDER, &args)?;
    let addr = child_addr(&mut child)?;
    let children_cpu0 = cpu_secs(libc::RUSAGE_CHILDREN);
    let self_cpu0 = cpu_secs(libc::RUSAGE_SELF);
    let t0 = Instant::now();
    let mut conn = std::net::TcpStream::connect(addr).context("connecting to the TCP sender")?;
    let t_conn = Instant::now();
    let mut buf = vec![0u8; STREAM_CHUNK_BYTES];
    let first_len = conn.read(&mut buf)? as u64;
    ensure!(first_len > 0, "stream ended before any data");
    let t_first = Instant::now();
    let mut total = first_len;
    loop {
        match conn.read(&mut buf)? {
            0 => break,
            n => total += n as u64,
        }
    }
    let t_end = Instant::now();
    let recv_cpu_secs = cpu_secs(libc::RUSAGE_SELF) - self_cpu0;
    drop(conn);
    child.wait_success(EXIT_TIMEOUT)?;
    ensure!(total == bytes, "received {total} bytes, expected {bytes}");
    Ok(StreamRun {
        recv_cpu_secs,
        send_cpu_secs: cpu_secs(libc::RUSAGE_CHILDREN) - children_cpu0,
        ..StreamRun::timed(total, first_len, [t0, t_conn, t_first, t_end])
    })
}

fn tcp_sender(bytes: u64, chunk: usize) -> anyhow::Result<()> {
    use std::io::Write;
    ensure!(chunk > 0, "chunk size must be positive");
    let data = random_bytes(STREAM_SOURCE_BYTES.max(chunk));
    let listener = std::net::TcpListener::bind(loopback())?;
    emit(&json!({ "role": ROLE_TCP_SENDER, "addr": listener.local_addr()?.to_string() }));
    let (mut conn, _) = listener.accept()?;
    let (mut left, mut off) = (bytes, 0usize);
    while left > 0 {
        let n = (chunk as u64).min(left) as usize;
        if off + n > data.len() {
            off = 0;
        }
        conn.write_all(&data[off..off + n])?;
        off += n;
        left -= n as u64;
    }
    conn.shutdown(std::net::Shutdown::Write)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Helpers.

fn loopback() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

/// User + system CPU seconds of `who` (`RUSAGE_SELF`, or `RUSAGE_CHILDREN`: children that
/// have been waited for).
fn cpu_secs(who: libc::c_int) -> f64 {
    // SAFETY: rusage is plain integers, for which all-zero bytes are a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes the struct it is given, which lives across the call.
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return f64::NAN;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The host-wide UDP `RcvbufErrors` counter from `/proc/net/snmp`.
fn udp_rcvbuf_errors() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next()?, udp.next()?);
    let i = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(i)?.parse().ok()
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
