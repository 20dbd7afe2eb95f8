//! The blocking driver around [`Session`]: listens on a Unix socket or TCP, and for each
//! client runs one reader thread (socket → session → requests) and a small pool of
//! workers that run requests on the [`BlockDevice`] and write their replies, so a request
//! that blocks (a block fetched over the WAN) does not stall the others on the same
//! connection. Replies go out as they complete, matched by cookie, each written whole
//! under the connection's write lock.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use super::proto::{BlockSizes, Command, Event, Export, Request, Session};
use super::wire::{self, nbd_errno, simple_reply, SIMPLE_REPLY_LEN};
use crate::device::{BlockDevice, DiskError};

/// Bytes read from a socket at a time.
const READ_BUFFER: usize = 128 << 10;
/// A write payload at least this large still to come is read straight into its buffer.
const DIRECT_PAYLOAD: usize = 16 << 10;
/// A worker keeps a reply buffer up to this size between requests.
const KEEP_REPLY_BUFFER: usize = 4 << 20;
/// Requests a connection holds (queued or running) before its reader stops reading.
const MAX_IN_FLIGHT: usize = 256;
/// Bytes of write payload a connection holds (queued or running) before its reader stops
/// reading: a client cannot make the server buffer more than this plus one request.
const MAX_IN_FLIGHT_BYTES: usize = 64 << 20;

/// How a [`Server`] serves its export.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The export's name (clients may also ask for the default export, `""`).
    pub export_name: String,
    /// The size constraints advertised with `NBD_INFO_BLOCK_SIZE` and enforced.
    pub block_sizes: BlockSizes,
    /// Requests one connection runs at once (each on a thread of its own, started when
    /// needed); further requests wait for one of them to finish.
    pub workers_per_connection: usize,
    /// Clients served at once; a client beyond this is disconnected at once (and logged).
    pub max_connections: usize,
    /// How long a client may take over each read during the handshake (`None`: forever).
    pub handshake_timeout: Option<Duration>,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            export_name: String::new(),
            block_sizes: BlockSizes::DEFAULT,
            workers_per_connection: 16,
            max_connections: 64,
            handshake_timeout: Some(Duration::from_secs(30)),
        }
    }
}

/// Why a server could not start listening. Each names the address.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Binding the Unix socket failed.
    #[error("cannot listen on the Unix socket {path}")]
    BindUnix {
        /// The socket's path.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: io::Error,
    },
    /// The path exists and is not a socket (it is not replaced).
    #[error("{path} exists and is not a socket")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// Another server is listening on the Unix socket.
    #[error("another server is listening on {path}")]
    InUse {
        /// The socket's path.
        path: PathBuf,
    },
    /// Binding the TCP address failed.
    #[error("cannot listen on {addr}")]
    BindTcp {
        /// The address.
        addr: SocketAddr,
        /// The system's error.
        #[source]
        source: io::Error,
    },
    /// The accept thread could not be started.
    #[error("cannot start the accept thread")]
    Thread(#[source] io::Error),
    /// [`Server::stop`] was called.
    #[error("the server is stopped")]
    Stopped,
}

/// What a server has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Clients that connected (including those refused).
    pub connections: u64,
    /// Connections ended because the client broke the protocol (bad magic, garbage,
    /// vanishing mid-message).
    pub protocol_errors: u64,
    /// `NBD_CMD_READ`s run.
    pub reads: u64,
    /// `NBD_CMD_WRITE`s run.
    pub writes: u64,
    /// `NBD_CMD_FLUSH`es run.
    pub flushes: u64,
    /// `NBD_CMD_TRIM`s run.
    pub trims: u64,
    /// `NBD_CMD_WRITE_ZEROES` run.
    pub write_zeroes: u64,
    /// Requests answered with an error (by the disk or refused before it).
    pub errors: u64,
    /// Bytes read for clients.
    pub bytes_read: u64,
    /// Bytes written for clients.
    pub bytes_written: u64,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    protocol_errors: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    trims: AtomicU64,
    write_zeroes: AtomicU64,
    errors: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// An NBD server of one [`BlockDevice`]: listen with [`Server::serve_unix`] and
/// [`Server::serve_tcp`] (as often as wanted), end with [`Server::stop`] (or drop).
pub struct Server {
    inner: Arc<Inner>,
}

struct Inner {
    device: Arc<dyn BlockDevice>,
    export: Export,
    config: ServerConfig,
    stopping: AtomicBool,
    counters: Counters,
    listeners: Mutex<Vec<ListenerHandle>>,
    connections: Mutex<HashMap<u64, Connection>>,
    next_id: AtomicU64,
}

/// A running connection: its socket (to shut down) and its reader thread.
type Connection = (Arc<Stream>, JoinHandle<()>);

struct ListenerHandle {
    wake: UnixStream,
    thread: Option<JoinHandle<()>>,
    unix_path: Option<PathBuf>,
}

impl Server {
    /// A server of `device` (its size and read-only state are the export's), not yet
    /// listening.
    pub fn new(device: Arc<dyn BlockDevice>, config: ServerConfig) -> Server {
        let export = Export {
            name: config.export_name.clone(),
            size: device.size(),
            read_only: device.read_only(),
            block_sizes: config.block_sizes,
        };
        Server {
            inner: Arc::new(Inner {
                device,
                export,
                config,
                stopping: AtomicBool::new(false),
                counters: Counters::default(),
                listeners: Mutex::new(Vec::new()),
                connections: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
            }),
        }
    }

    /// The export as clients see it.
    pub fn export(&self) -> &Export {
        &self.inner.export
    }

    /// Listens on a Unix socket at `path` (a stale socket there is replaced; the socket
    /// is removed at [`Server::stop`]). Clients connect to `nbd+unix:///NAME?socket=PATH`.
    pub fn serve_unix(&self, path: impl AsRef<Path>) -> Result<PathBuf, ServeError> {
        let path = path.as_ref().to_path_buf();
        self.check_running()?;
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(ServeError::NotASocket { path });
            }
            if UnixStream::connect(&path).is_ok() {
                return Err(ServeError::InUse { path });
            }
            let _ = std::fs::remove_file(&path);
        }
        let bind_err = |source| ServeError::BindUnix {
            path: path.clone(),
            source,
        };
        let listener = UnixListener::bind(&path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        self.spawn_acceptor(Listener::Unix(listener), Some(path.clone()))?;
        Ok(path)
    }

    /// Listens on TCP at `addr` (port 0 picks one) and returns the bound address. Clients
    /// connect to `nbd://HOST:PORT/NAME`; Nagle's algorithm is off on every connection.
    pub fn serve_tcp(&self, addr: SocketAddr) -> Result<SocketAddr, ServeError> {
        self.check_running()?;
        let bind_err = |source| ServeError::BindTcp { addr, source };
        let listener = TcpListener::bind(addr).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let local = listener.local_addr().map_err(bind_err)?;
        self.spawn_acceptor(Listener::Tcp(listener), None)?;
        Ok(local)
    }

    /// Serves one client already connected on `stream` (a socket pair a VMM handed over,
    /// say), as if it had connected to a listener.
    pub fn serve_connection(&self, stream: UnixStream) -> Result<(), ServeError> {
        self.check_running()?;
        self.inner.clone().start_connection(Stream::Unix(stream));
        Ok(())
    }

    /// What the server has done so far.
    pub fn stats(&self) -> Stats {
        let c = &self.inner.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            connections: g(&c.connections),
            protocol_errors: g(&c.protocol_errors),
            reads: g(&c.reads),
            writes: g(&c.writes),
            flushes: g(&c.flushes),
            trims: g(&c.trims),
            write_zeroes: g(&c.write_zeroes),
            errors: g(&c.errors),
            bytes_read: g(&c.bytes_read),
            bytes_written: g(&c.bytes_written),
        }
    }

    /// Clients connected now.
    pub fn active_connections(&self) -> usize {
        lock(&self.inner.connections).len()
    }

    /// Stops listening, lets every connection finish the requests it has received (their
    /// replies are sent), closes them and waits for all of it. Idempotent.
    pub fn stop(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        let listeners: Vec<ListenerHandle> = lock(&self.inner.listeners).drain(..).collect();
        for mut l in listeners {
            let _ = (&l.wake).write_all(&[1]);
            if let Some(t) = l.thread.take() {
                let _ = t.join();
            }
            if let Some(p) = &l.unix_path {
                let _ = std::fs::remove_file(p);
            }
        }
        let conns: Vec<_> = lock(&self.inner.connections).drain().collect();
        for (_, (stream, _)) in &conns {
            // The reader sees the end of its input and winds the connection down.
            let _ = stream.shutdown(std::net::Shutdown::Read);
        }
        for (_, (_, thread)) in conns {
            let _ = thread.join();
        }
    }

    fn check_running(&self) -> Result<(), ServeError> {
        if self.inner.stopping.load(Ordering::SeqCst) {
            Err(ServeError::Stopped)
        } else {
            Ok(())
        }
    }

    fn spawn_acceptor(
        &self,
        listener: Listener,
        unix_path: Option<PathBuf>,
    ) -> Result<(), ServeError> {
        let (wake, wake_rx) = UnixStream::pair().map_err(ServeError::Thread)?;
        let inner = self.inner.clone();
        let thread = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || inner.accept_loop(listener, wake_rx))
            .map_err(ServeError::Thread)?;
        lock(&self.inner.listeners).push(ListenerHandle {
            wake,
            thread: Some(thread),
            unix_path,
        });
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("export", &self.inner.export)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data: consistent between statements even after a panic elsewhere.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn fd(&self) -> RawFd {
        match self {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                Ok(Stream::Unix(s))
            }
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
        }
    }
}

/// Waits until `a` or `b` is readable.
fn poll2(a: RawFd, b: RawFd) -> io::Result<()> {
    let mut fds = [
        libc::pollfd {
            fd: a,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is a valid array of two pollfd structs that outlives the call.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

/// A client's socket.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => (&*s).read(buf),
            Stream::Tcp(s) => (&*s).read(buf),
        }
    }

    fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        match self {
            Stream::Unix(s) => (&*s).write_all(buf),
            Stream::Tcp(s) => (&*s).write_all(buf),
        }
    }

    fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        }
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }

    fn peer(&self) -> String {
        match self {
            Stream::Unix(_) => "a Unix socket client".into(),
            Stream::Tcp(s) => s
                .peer_addr()
                .map_or_else(|_| "a TCP client".into(), |a| a.to_string()),
        }
    }
}

impl Inner {
    fn accept_loop(self: Arc<Self>, listener: Listener, wake: UnixStream) {
        loop {
            if let Err(e) = poll2(listener.fd(), wake.as_raw_fd()) {
                tracing::error!("nbd: poll on the listener failed: {e}");
                return;
            }
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            match listener.accept() {
                Ok(stream) => self.clone().start_connection(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of descriptors, say: do not spin.
                    tracing::warn!("nbd: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    fn start_connection(self: Arc<Self>, stream: Stream) {
        bump(&self.counters.connections, 1);
        let stream = Arc::new(stream);
        let peer = stream.peer();
        let mut conns = lock(&self.connections);
        if conns.len() >= self.config.max_connections {
            tracing::warn!(
                "nbd: refusing {peer}: {} clients connected already",
                conns.len()
            );
            return;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let inner = self.clone();
        let s = stream.clone();
        let spawned = std::thread::Builder::new()
            .name("nbd-conn".into())
            .spawn(move || {
                inner.run_connection(s, &peer);
                lock(&inner.connections).remove(&id);
            });
        match spawned {
            Ok(t) => {
                conns.insert(id, (stream, t));
            }
            Err(e) => tracing::warn!("nbd: cannot start a connection thread: {e}"),
        }
    }

    /// One client, from greeting to close: reads, feeds the session, dispatches requests.
    fn run_connection(self: &Arc<Self>, stream: Arc<Stream>, peer: &str) {
        let conn = Arc::new(Conn {
            stream,
            write_lock: Mutex::new(()),
        });
        let _ = conn.stream.set_read_timeout(self.config.handshake_timeout);
        let mut session = Session::new(self.export.clone());
        let pool = Pool::new(self.config.workers_per_connection.max(1));
        let mut buf = vec![0u8; READ_BUFFER];
        let end = 'conn: loop {
            if session.has_output() {
                if let Err(e) = conn.send(&session.take_output()) {
                    break format!("sending to the client failed: {e}");
                }
            }
            while let Some(event) = session.poll_event() {
                match event {
                    Event::Transmission => {
                        let _ = conn.stream.set_read_timeout(None);
                        tracing::debug!("nbd: {peer} entered transmission");
                    }
                    Event::Request(r) => pool.dispatch(r, self, &conn),
                    Event::Disconnect => break 'conn "the client disconnected".into(),
                    Event::Close(e) => {
                        bump(&self.counters.protocol_errors, 1);
                        tracing::warn!("nbd: closing the connection of {peer}: {e}");
                        break 'conn format!("closed: {e}");
                    }
                }
            }
            pool.take_spares(&mut session);
            // Back-pressure: the client waits while too much is queued here.
            pool.wait_for_room();
            let direct = session
                .payload_buffer()
                .filter(|b| b.len() >= DIRECT_PAYLOAD);
            let (n, was_direct) = match direct {
                Some(target) => (conn.stream.read(target), true),
                None => (conn.stream.read(&mut buf), false),
            };
            match n {
                Ok(0) => match session.end_of_input() {
                    Ok(()) => break "the client closed the connection".into(),
                    Err(e) => {
                        bump(&self.counters.protocol_errors, 1);
                        tracing::warn!("nbd: {peer} went away: {e}");
                        break format!("{e}");
                    }
                },
                Ok(n) if was_direct => session.payload_received(n),
                Ok(n) => session.handle_input(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    bump(&self.counters.protocol_errors, 1);
                    tracing::warn!("nbd: {peer} did not finish the handshake in time");
                    break "handshake timed out".into();
                }
                Err(e) => {
                    if session.end_of_input().is_err() {
                        bump(&self.counters.protocol_errors, 1);
                    }
                    tracing::info!("nbd: reading from {peer} failed: {e}");
                    break format!("reading failed: {e}");
                }
            }
        };
        // Requests already received run to the end and are answered.
        pool.finish();
        let _ = conn.stream.shutdown(std::net::Shutdown::Both);
        tracing::debug!("nbd: connection of {peer} ended: {end}");
    }
}

/// What a connection's reader and workers share.
struct Conn {
    stream: Arc<Stream>,
    write_lock: Mutex<()>,
}

impl Conn {
    /// Sends one whole message (replies never interleave).
    fn send(&self, bytes: &[u8]) -> io::Result<()> {
        let _g = lock(&self.write_lock);
        self.stream.write_all(bytes)
    }
}

/// A connection's workers: started when a request finds none waiting, up to a maximum.
struct Pool {
    shared: Arc<PoolShared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    max: usize,
}

struct PoolShared {
    state: Mutex<PoolState>,
    ready: Condvar,
    /// Signalled when a request finishes (for [`Pool::wait_for_room`]).
    done: Condvar,
}

#[derive(Default)]
struct PoolState {
    jobs: VecDeque<Request>,
    /// Workers waiting for a job.
    idle: usize,
    /// Requests queued or running.
    in_flight: usize,
    /// Write payload bytes queued or running.
    in_flight_bytes: usize,
    /// Whether the reader waits in [`Pool::wait_for_room`].
    reader_waiting: bool,
    closed: bool,
    /// Write buffers done with, for the session to reuse.
    spares: Vec<Vec<u8>>,
}

impl Pool {
    fn new(max: usize) -> Pool {
        Pool {
            shared: Arc::new(PoolShared {
                state: Mutex::new(PoolState::default()),
                ready: Condvar::new(),
                done: Condvar::new(),
            }),
            threads: Mutex::new(Vec::new()),
            max,
        }
    }

    fn dispatch(&self, r: Request, inner: &Arc<Inner>, conn: &Arc<Conn>) {
        let mut s = lock(&self.shared.state);
        s.in_flight += 1;
        s.in_flight_bytes += payload_len(&r);
        s.jobs.push_back(r);
        // Every queued job needs a waiting worker of its own, or a new one: a job must not
        // wait behind one that blocks.
        let short = s.jobs.len() > s.idle;
        let wake = s.idle > 0;
        drop(s);
        if wake {
            self.shared.ready.notify_one();
        }
        let mut threads = lock(&self.threads);
        if short && threads.len() < self.max {
            let (shared, inner, conn) = (self.shared.clone(), inner.clone(), conn.clone());
            match std::thread::Builder::new()
                .name("nbd-worker".into())
                .spawn(move || worker(&shared, &inner, &conn))
            {
                Ok(t) => threads.push(t),
                // The existing workers will get to it.
                Err(e) => tracing::warn!("nbd: cannot start a worker: {e}"),
            }
        }
    }

    /// Waits until fewer than [`MAX_IN_FLIGHT`] requests and [`MAX_IN_FLIGHT_BYTES`] of
    /// payload are held.
    fn wait_for_room(&self) {
        let mut s = lock(&self.shared.state);
        while s.in_flight >= MAX_IN_FLIGHT || s.in_flight_bytes >= MAX_IN_FLIGHT_BYTES {
            s.reader_waiting = true;
            s = self.shared.done.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.reader_waiting = false;
    }

    fn take_spares(&self, session: &mut Session) {
        for b in lock(&self.shared.state).spares.drain(..) {
            session.recycle(b);
        }
    }

    /// Lets the workers finish every queued job, then joins them.
    fn finish(&self) {
        lock(&self.shared.state).closed = true;
        self.shared.ready.notify_all();
        for t in lock(&self.threads).drain(..) {
            let _ = t.join();
        }
    }
}

fn worker(shared: &PoolShared, inner: &Inner, conn: &Conn) {
    let mut reply = Vec::new();
    loop {
        let job = {
            let mut s = lock(&shared.state);
            loop {
                if let Some(j) = s.jobs.pop_front() {
                    break Some(j);
                }
                if s.closed {
                    break None;
                }
                s.idle += 1;
                s = shared.ready.wait(s).unwrap_or_else(|p| p.into_inner());
                s.idle -= 1;
            }
        };
        let Some(job) = job else { return };
        let bytes = payload_len(&job);
        let (len, spare) = execute(inner, job, &mut reply);
        if conn.send(&reply[..len]).is_err() {
            // The client is gone: make the reader notice too.
            let _ = conn.stream.shutdown(std::net::Shutdown::Both);
        }
        if reply.capacity() > KEEP_REPLY_BUFFER {
            reply = Vec::new();
        }
        let mut s = lock(&shared.state);
        s.in_flight -= 1;
        s.in_flight_bytes -= bytes;
        if let Some(b) = spare {
            s.spares.push(b);
        }
        let wake = s.reader_waiting;
        drop(s);
        if wake {
            shared.done.notify_one();
        }
    }
}

fn payload_len(r: &Request) -> usize {
    match &r.command {
        Command::Write { data } => data.len(),
        _ => 0,
    }
}

/// Runs a request on the device and puts its reply in `reply` (its first `len` bytes);
/// gives back a write's payload buffer.
fn execute(inner: &Inner, req: Request, reply: &mut Vec<u8>) -> (usize, Option<Vec<u8>>) {
    let dev = &*inner.device;
    let c = &inner.counters;
    let Request {
        cookie,
        offset,
        command,
        fua,
    } = req;
    let (result, spare, read_len, is_write) = match command {
        Command::Read { len } => {
            let total = SIMPLE_REPLY_LEN + len as usize;
            if reply.len() < total {
                reply.resize(total, 0);
            }
            let r = dev.read_at(&mut reply[SIMPLE_REPLY_LEN..total], offset);
            bump(&c.reads, 1);
            if r.is_ok() {
                bump(&c.bytes_read, u64::from(len));
            }
            (r, None, len as usize, false)
        }
        Command::Write { data } => {
            let r = dev.write_at(&data, offset, fua);
            bump(&c.writes, 1);
            if r.is_ok() {
                bump(&c.bytes_written, data.len() as u64);
            }
            (r, Some(data), 0, true)
        }
        Command::Flush => {
            bump(&c.flushes, 1);
            (dev.flush(), None, 0, false)
        }
        Command::Trim { len } => {
            bump(&c.trims, 1);
            let r =
                dev.trim(offset, u64::from(len))
                    .and_then(|()| if fua { dev.flush() } else { Ok(()) });
            (r, None, 0, true)
        }
        // NBD_CMD_FLAG_NO_HOLE needs nothing more: BlockDevice::write_zeroes of a RawFile
        // keeps the range allocated (see docs/disks.md).
        Command::WriteZeroes { len, no_hole: _ } => {
            bump(&c.write_zeroes, 1);
            (dev.write_zeroes(offset, u64::from(len), fua), None, 0, true)
        }
    };
    let error = match &result {
        Ok(()) => 0,
        Err(e) => {
            bump(&c.errors, 1);
            error_code(e, is_write)
        }
    };
    if reply.len() < SIMPLE_REPLY_LEN {
        reply.resize(SIMPLE_REPLY_LEN, 0);
    }
    reply[..SIMPLE_REPLY_LEN].copy_from_slice(&simple_reply(cookie, error));
    let len = if error == 0 {
        SIMPLE_REPLY_LEN + read_len
    } else {
        SIMPLE_REPLY_LEN
    };
    (len, spare)
}

/// The NBD error for a failed disk operation; device failures are logged.
fn error_code(e: &DiskError, is_write: bool) -> u32 {
    match e {
        DiskError::OutOfRange { .. } if is_write => wire::ENOSPC,
        DiskError::Io { .. } | DiskError::Unavailable { .. } => {
            tracing::warn!("nbd: {}", chain(e));
            nbd_errno(e.errno())
        }
        _ => nbd_errno(e.errno()),
    }
}

/// An error and its causes, each once, for a log line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}
