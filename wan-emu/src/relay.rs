//! The relay: runs a [`Link`] per direction on real UDP sockets.
//!
//! Threads (all named `wan-*`, so a profiler or `/proc/<pid>/task` shows their CPU):
//!
//! * `wan-c2s-rx`: reads datagrams from clients on the listen socket, gives each one to the
//!   client → server [`Link`], and hands the survivors to `wan-c2s-tx`. A datagram from a
//!   client address not seen before creates a *flow*: an upstream socket connected to the
//!   server, used for that client only, so the server sees one distinct peer per client
//!   and replies are routed back by socket alone.
//! * `wan-s2c-rx` (one per flow): reads the server's datagrams from the flow's upstream
//!   socket and hands them, through the server → client [`Link`], to `wan-s2c-tx`.
//! * `wan-c2s-tx`, `wan-s2c-tx`: hold the packets of one direction in delivery-time order,
//!   sleep until the next one is due, and send everything due with one `sendmmsg`. Sparse
//!   traffic is timed precisely (1 µs timer slack, then a yielding spin for the last
//!   80 µs); dense traffic sleeps at least 200 µs and leaves in batches, which is what
//!   keeps the relay's CPU cost at about 2-4 µs per datagram.
//!
//! Tokio is not used: its timer has a 1 ms granularity, and at 1 Gbit/s a direction carries
//! about 85 000 packets per second. What keeps the per-packet cost down (measured in
//! docs/wan-emulator.md):
//!
//! * `recvmmsg` / `sendmmsg`: one system call per batch, not per datagram;
//! * UDP GRO on receive and GSO (`UDP_SEGMENT`) on send: quinn sends runs of equal-size
//!   datagrams as one GSO buffer; the relay receives such a run as one buffer, splits it for
//!   the model, and re-joins what falls due together into one GSO send;
//! * kernel receive timestamps (`SO_TIMESTAMPNS`) as arrival times, so that a receiver
//!   thread that was descheduled for a while does not turn the backlog into a burst;
//! * an `Inbox` that wakes a sender only when a new packet is due before its timer.
//!
//! Every socket has a 50 ms read timeout, so every thread notices shutdown within that
//! time. Nothing a peer sends can make the relay panic: datagrams are opaque bytes,
//! and a poisoned lock (which would need a bug elsewhere) is recovered, not propagated.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::link::{ConfigError, DropReason, Link, LinkConfig, Nanos, Verdict};
use super::{sys, Direction, WanConfig};

/// How often blocked threads wake up to check for shutdown.
const POLL: Duration = Duration::from_millis(50);

/// The last stretch before a packet is due is spent spinning (yielding the CPU on every
/// turn) instead of sleeping: a sleep with 1 µs timer slack still oversleeps by 20-80 µs
/// on this kind of machine (measured: p50 22-76 µs, p99 up to 120 µs).
const SPIN: Duration = Duration::from_micros(80);

/// Spin only for a packet due at least this long after the previous send: sparse traffic
/// (pings, handshakes, up to ~2000 packets/s) gets precise timing for a few percent of a
/// core. Dense traffic would have a core spinning all the time; it sleeps instead, and the
/// packets that fall due during the oversleep leave together, tens of µs late.
const SPARSE_GAP: Nanos = 500_000;

/// Dense traffic sleeps at least this long between sends. Every sleep costs a timer and a
/// wake-up, which in this VM is the relay's biggest CPU cost: measured at 0.75-0.9 Gbit/s,
/// 7 µs of relay CPU per packet without a minimum, 3 µs with 100 µs, 2 µs with 200 µs.
/// The price is timing granularity: dense traffic leaves in bunches, up to about 0.25 ms
/// late (the average rate is unaffected).
const DENSE_MIN_SLEEP: Duration = Duration::from_micros(200);

/// Receive buffers per `recvmmsg` call (each may hold several datagrams, with GRO).
pub(super) const RECV_BATCH: usize = 32;

/// Most datagrams per `sendmmsg` call.
pub(super) const SEND_BATCH: usize = 64;

/// Largest UDP payload (IPv6 jumbograms aside), so no datagram is ever truncated.
pub(super) const MAX_DATAGRAM: usize = 65_536;

/// Clients (distinct source addresses) relayed at once; the least recently active flow is
/// closed to make room for a new one. Each flow costs a socket and a thread.
const MAX_CLIENTS: usize = 64;

/// Bytes a direction may hold in the relay's memory, whatever the link config says (an
/// unlimited link with an hour of delay would otherwise store an hour of traffic).
/// Packets beyond it are dropped and counted as queue drops.
const MAX_HELD_BYTES: u64 = 256 << 20;

/// Why the emulator could not start or be reconfigured. Problems with individual packets
/// or peers after start are not errors: they are counted in [`WanCounters`] and logged.
#[derive(Debug, Error)]
pub enum WanError {
    /// A direction's [`LinkConfig`] is invalid.
    #[error("invalid WAN link configuration")]
    Config(#[from] ConfigError),
    /// The upstream address is unspecified (`0.0.0.0`, `::`) or has port 0.
    #[error("cannot relay to {0}: the upstream needs a specific address and a non-zero port")]
    BadUpstream(SocketAddr),
    /// The listen socket (or a flow's upstream socket) could not be bound.
    #[error("cannot bind the relay socket at {addr}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// A socket option or `connect` failed.
    #[error("cannot configure the relay socket: {0}")]
    Socket(io::Error),
    /// The operating system refused a thread.
    #[error("cannot start a relay thread: {0}")]
    Spawn(io::Error),
}

/// What one direction has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionCounters {
    /// Datagrams delivered (sent on to the far side).
    pub packets: u64,
    /// Payload bytes of those datagrams.
    pub bytes: u64,
    /// Datagrams dropped by random loss.
    pub dropped_loss: u64,
    /// Datagrams tail-dropped by the bottleneck queue (or, in extremis, by the relay's own
    /// memory cap of 256 MiB per direction).
    pub dropped_queue: u64,
    /// Datagrams dropped because the link was cut when they arrived or when they were due.
    pub dropped_cut: u64,
    /// Datagrams dropped because they were larger than the link's MTU (QUIC's path MTU
    /// probes, on a path that does not carry them).
    #[serde(default)]
    pub dropped_too_big: u64,
    /// Datagrams the operating system refused to send (for example the upstream port is
    /// closed), or whose client flow could not be set up.
    pub send_errors: u64,
    /// Payload bytes currently held in the relay, waiting for their delivery time.
    pub held_bytes: u64,
    /// Payload bytes of the datagrams a cut took out of the link: already inside it when it
    /// was cut (waiting for their delivery time, or received by the relay's socket before
    /// the cut and read after it) and dropped because it was still cut when they fell due.
    /// What was in flight at a cut, as opposed to what arrived while cut (those count in
    /// `dropped_cut` only).
    #[serde(default)]
    pub cut_in_flight_bytes: u64,
    /// Datagrams handed to the far side's socket whose times are summed in
    /// `modelled_delay_ns` and `send_lateness_ns` (those in `packets`, and those the operating
    /// system refused at the last step).
    #[serde(default)]
    pub timed_packets: u64,
    /// The one-way delay the link model gave those datagrams, summed: queueing and
    /// serialisation at the bottleneck, propagation delay and jitter, from their arrival in
    /// the model to their delivery time. Over an interval, its growth divided by
    /// `timed_packets`' growth is the mean modelled delay of that interval's datagrams.
    #[serde(default)]
    pub modelled_delay_ns: u64,
    /// The delay the relay's own threads added to those datagrams, summed (descheduled, or
    /// batching dense traffic), which a real link would not have: how late each was sent
    /// after its delivery time (read just before the send, so a lower bound), plus how much
    /// later than its arrival at the socket the model took it. Sums wrap after about 46
    /// days at 1 Gbit/s, far beyond a run.
    #[serde(default)]
    pub send_lateness_ns: u64,
}

impl DirectionCounters {
    /// All drops, whatever the reason.
    pub fn dropped(&self) -> u64 {
        self.dropped_loss
            + self.dropped_queue
            + self.dropped_cut
            + self.dropped_too_big
            + self.send_errors
    }
}

/// A snapshot of both directions' counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WanCounters {
    /// Client → server.
    pub client_to_server: DirectionCounters,
    /// Server → client.
    pub server_to_client: DirectionCounters,
    /// Distinct client addresses seen since start.
    pub clients: u64,
}

impl WanCounters {
    /// The counters of one direction.
    pub fn get(&self, dir: Direction) -> &DirectionCounters {
        match dir {
            Direction::ClientToServer => &self.client_to_server,
            Direction::ServerToClient => &self.server_to_client,
        }
    }
}

#[derive(Default)]
struct AtomicCounters {
    packets: AtomicU64,
    bytes: AtomicU64,
    dropped_loss: AtomicU64,
    dropped_queue: AtomicU64,
    dropped_cut: AtomicU64,
    dropped_too_big: AtomicU64,
    send_errors: AtomicU64,
    held_bytes: AtomicU64,
    cut_in_flight_bytes: AtomicU64,
    timed_packets: AtomicU64,
    modelled_delay_ns: AtomicU64,
    send_lateness_ns: AtomicU64,
}

impl AtomicCounters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> DirectionCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        // First, and pairing with `transmit`'s release: the sums read below hold at least
        // these datagrams' times.
        let timed_packets = self.timed_packets.load(Ordering::Acquire);
        DirectionCounters {
            packets: get(&self.packets),
            bytes: get(&self.bytes),
            dropped_loss: get(&self.dropped_loss),
            dropped_queue: get(&self.dropped_queue),
            dropped_cut: get(&self.dropped_cut),
            dropped_too_big: get(&self.dropped_too_big),
            send_errors: get(&self.send_errors),
            held_bytes: get(&self.held_bytes),
            cut_in_flight_bytes: get(&self.cut_in_flight_bytes),
            timed_packets,
            modelled_delay_ns: get(&self.modelled_delay_ns),
            send_lateness_ns: get(&self.send_lateness_ns),
        }
    }
}

/// State shared by the handle and every relay thread.
struct Shared {
    epoch: Instant,
    stop: AtomicBool,
    cut: AtomicBool,
    /// When the current cut began (relay clock); `u64::MAX` while not cut.
    cut_at: AtomicU64,
    links: [Mutex<Link>; 2],
    counters: [AtomicCounters; 2],
    clients: AtomicU64,
    /// Threads started after `start` (one per flow), joined at shutdown.
    flow_threads: Mutex<Vec<JoinHandle<()>>>,
}

/// Locks ignoring poison: the data behind these locks stays consistent even if a holder
/// panicked, and the relay must keep running.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn now(&self) -> Nanos {
        self.epoch.elapsed().as_nanos() as Nanos
    }

    /// Reads both clocks once per received batch, to convert kernel receive timestamps.
    fn batch_clock(&self) -> BatchClock {
        // Wall clock first: if the thread is preempted between the two reads, `now` is
        // late, so arrivals come out late (harmless) rather than early (which would
        // deliver packets before their delay is up).
        let realtime_ns = sys::realtime_ns();
        BatchClock {
            now: self.now(),
            realtime_ns,
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn counters(&self, dir: Direction) -> &AtomicCounters {
        &self.counters[dir.index()]
    }

    /// Runs one received datagram through the link of `dir`; a survivor is added to
    /// `out`, to be handed to the sender with the rest of its batch.
    fn route(&self, dir: Direction, now: Nanos, data: &[u8], to: Outbound, out: &mut Vec<Packet>) {
        let (verdict, arrived) = {
            let mut link = lock(&self.links[dir.index()]);
            let verdict = link.offer(now, data.len());
            (verdict, link.last_arrival())
        };
        let c = self.counters(dir);
        let at = match verdict {
            Verdict::Deliver(at) => at,
            Verdict::Drop(DropReason::Loss) => return AtomicCounters::add(&c.dropped_loss, 1),
            Verdict::Drop(DropReason::QueueFull) => {
                return AtomicCounters::add(&c.dropped_queue, 1)
            }
            Verdict::Drop(DropReason::TooBig) => return AtomicCounters::add(&c.dropped_too_big, 1),
            Verdict::Drop(DropReason::Cut) => {
                // Received by the kernel before the cut, read by us after it: it was in
                // flight at the cut.
                if now < self.cut_at.load(Ordering::SeqCst) {
                    AtomicCounters::add(&c.cut_in_flight_bytes, data.len() as u64);
                }
                return AtomicCounters::add(&c.dropped_cut, 1);
            }
        };
        let len = data.len() as u64;
        if c.held_bytes.fetch_add(len, Ordering::Relaxed) + len > MAX_HELD_BYTES {
            c.held_bytes.fetch_sub(len, Ordering::Relaxed);
            return AtomicCounters::add(&c.dropped_queue, 1);
        }
        out.push(Packet {
            at,
            arrived,
            // Taken late (after a later batch of another receiver thread): the relay's
            // delay, not the link's.
            late_in: arrived.saturating_sub(now),
            data: data.to_vec(),
            out: to,
        });
    }
}

/// Hands packets from the receivers of one direction to its sender.
///
/// Unlike a channel, it does not wake the sender for every packet: the sender publishes
/// when it means to wake up (`wake_at`), and a receiver wakes it only for a packet due
/// before that. Without reordering a new packet is never due before the ones already
/// waiting, so a busy link costs no wake-ups, only one lock per received batch.
struct Inbox {
    queue: Mutex<Vec<Packet>>,
    /// The delivery time the sender is sleeping towards (it wakes then, or a little
    /// later); 0 while it is awake (it will look at the queue before sleeping again),
    /// `u64::MAX` when it holds nothing.
    wake_at: AtomicU64,
    sender: OnceLock<Thread>,
}

impl Inbox {
    fn new() -> Inbox {
        Inbox {
            queue: Mutex::new(Vec::new()),
            wake_at: AtomicU64::new(0),
            sender: OnceLock::new(),
        }
    }

    /// Queues `packets` (emptying the vector) and wakes the sender if one of them is due
    /// before it would wake up anyway.
    fn push(&self, packets: &mut Vec<Packet>) {
        let Some(first) = packets.iter().map(|p| p.at).min() else {
            return;
        };
        lock(&self.queue).append(packets);
        // SeqCst pairs with the sender's store-then-recheck in `sender`: either it sees
        // these packets in the queue, or we see its wake_at and unpark it.
        if first < self.wake_at.load(Ordering::SeqCst) {
            if let Some(t) = self.sender.get() {
                t.unpark();
            }
        }
    }
}

/// Converts the kernel's receive timestamps (wall clock, taken when the datagram reached
/// the socket) into the relay's monotonic clock.
///
/// The arrival time fed to the [`Link`] is when the datagram reached the relay's socket,
/// not when the relay thread got around to reading it. Otherwise, whenever the thread is
/// descheduled for a millisecond on a busy machine, a millisecond of traffic would enter the
/// model as one instantaneous burst and overflow the queue, a drop the real link would not
/// have made.
struct BatchClock {
    now: Nanos,
    realtime_ns: i128,
}

impl BatchClock {
    /// The arrival time of a datagram stamped `stamp_ns` (wall clock); `now` if unstamped
    /// or if the stamp is implausible (in the future, or older than a second: the wall clock
    /// was stepped).
    fn arrival(&self, stamp_ns: Option<i128>) -> Nanos {
        match stamp_ns.map(|s| self.realtime_ns - s) {
            Some(age) if (0..1_000_000_000).contains(&age) => self.now.saturating_sub(age as u64),
            _ => self.now,
        }
    }
}

/// Where a packet goes: out of `sock`, to `dest`.
pub(super) struct Outbound {
    pub(super) sock: Arc<UdpSocket>,
    pub(super) dest: SocketAddr,
}

/// A datagram waiting for its delivery time.
pub(super) struct Packet {
    pub(super) at: Nanos,
    /// Its arrival as the link model took it: when it reached the relay's socket, or
    /// later if another receiver thread's later arrival went into the model first.
    pub(super) arrived: Nanos,
    /// How much later than it reached the socket the model took it (`arrived` less that).
    pub(super) late_in: Nanos,
    pub(super) data: Vec<u8>,
    pub(super) out: Outbound,
}

/// A packet in a sender's heap, ordered by delivery time, then by arrival at the sender
/// (so equal times keep their order).
struct Queued {
    at: Nanos,
    seq: u64,
    packet: Packet,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// One client: its address and the upstream socket that carries its traffic.
struct Flow {
    client: SocketAddr,
    sock: Arc<UdpSocket>,
    closed: AtomicBool,
    last_active: AtomicU64,
}

/// A running WAN emulator. Dropping it stops its threads and drops the packets still held;
/// that blocks the dropping thread for up to about 50 ms (the receivers' read timeout),
/// which is harmless in tests but worth knowing inside an async task.
pub struct WanEmulator {
    shared: Arc<Shared>,
    local: SocketAddr,
    upstream: SocketAddr,
    threads: Vec<JoinHandle<()>>,
    config: Mutex<WanConfig>,
    /// The senders' queues, for the receivers of [`WanEmulator::add_route`].
    inboxes: (Arc<Inbox>, Arc<Inbox>),
}

impl std::fmt::Debug for WanEmulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WanEmulator")
            .field("local", &self.local)
            .field("upstream", &self.upstream)
            .field("cut", &self.is_cut())
            .finish_non_exhaustive()
    }
}

impl WanEmulator {
    /// Binds a UDP socket at `listen` (port 0 picks a free port, see
    /// [`local_addr`](Self::local_addr)) and relays between whoever sends to it and
    /// `upstream`, applying `cfg` (a [`LinkConfig`] for both directions, or a
    /// [`WanConfig`]).
    pub fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        cfg: impl Into<WanConfig>,
    ) -> Result<WanEmulator, WanError> {
        let cfg = cfg.into();
        cfg.validate()?;
        let (sock, local) = bind_route(listen, upstream)?;
        let listen_sock = Arc::new(sock);

        let shared = Arc::new(Shared {
            epoch: Instant::now(),
            stop: AtomicBool::new(false),
            cut: AtomicBool::new(false),
            cut_at: AtomicU64::new(u64::MAX),
            links: [
                Mutex::new(Link::new(cfg.client_to_server.clone())?),
                Mutex::new(Link::new(cfg.server_to_client.clone())?),
            ],
            counters: Default::default(),
            clients: AtomicU64::new(0),
            flow_threads: Mutex::new(Vec::new()),
        });
        let mut emu = WanEmulator {
            shared: shared.clone(),
            local,
            upstream,
            threads: Vec::new(),
            config: Mutex::new(cfg),
            inboxes: (Arc::new(Inbox::new()), Arc::new(Inbox::new())),
        };
        // On an error below, dropping `emu` stops whatever already started.
        let (c2s, s2c) = emu.inboxes.clone();
        for (name, dir, inbox) in [
            ("wan-c2s-tx", Direction::ClientToServer, c2s.clone()),
            ("wan-s2c-tx", Direction::ServerToClient, s2c.clone()),
        ] {
            let sh = shared.clone();
            emu.threads
                .push(spawn(name, move || sender(&sh, dir, &inbox))?);
        }
        let receiver = ClientReceiver {
            shared,
            listen: listen_sock,
            upstream,
            c2s,
            s2c,
            flows: HashMap::new(),
        };
        emu.threads
            .push(spawn("wan-c2s-rx", move || receiver.run())?);
        Ok(emu)
    }

    /// Also relays between whoever sends to `listen` and another server, `upstream`,
    /// through the **same** links: every route shares each direction's rate, queue, delay,
    /// loss and cuts, as flows to several servers behind one bottleneck do. Returns the
    /// address clients of this route send to. Counters count all routes together.
    pub fn add_route(
        &mut self,
        listen: SocketAddr,
        upstream: SocketAddr,
    ) -> Result<SocketAddr, WanError> {
        let (sock, local) = bind_route(listen, upstream)?;
        let receiver = ClientReceiver {
            shared: self.shared.clone(),
            listen: Arc::new(sock),
            upstream,
            c2s: self.inboxes.0.clone(),
            s2c: self.inboxes.1.clone(),
            flows: HashMap::new(),
        };
        self.threads
            .push(spawn("wan-c2s-rx", move || receiver.run())?);
        Ok(local)
    }

    /// The address clients send to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The address the relay forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Cuts the link: from now until [`restore`](Self::restore), every packet in either
    /// direction is dropped (counted in `dropped_cut`), including packets already inside
    /// the emulated link whose delivery time falls during the cut.
    pub fn cut(&self) {
        self.set_cut(true);
    }

    /// Restores a cut link. Packets dropped while cut stay lost.
    pub fn restore(&self) {
        self.set_cut(false);
    }

    /// Whether the link is cut.
    pub fn is_cut(&self) -> bool {
        self.shared.cut.load(Ordering::SeqCst)
    }

    fn set_cut(&self, cut: bool) {
        if cut {
            // Kept from the first of repeated cuts.
            let now = self.shared.now();
            let _ = self.shared.cut_at.compare_exchange(
                u64::MAX,
                now,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
        }
        // The senders check the flag, the receivers the links: set both.
        self.shared.cut.store(cut, Ordering::SeqCst);
        for link in &self.shared.links {
            lock(link).set_cut(cut);
        }
        if !cut {
            self.shared.cut_at.store(u64::MAX, Ordering::SeqCst);
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> WanConfig {
        lock(&self.config).clone()
    }

    /// Changes the impairments of both directions from now on (see [`Link::set_config`]:
    /// queued packets keep their times, and a direction's loss sequence continues unless
    /// its seed changes). Nothing changes if either direction is invalid.
    pub fn set_config(&self, cfg: impl Into<WanConfig>) -> Result<(), WanError> {
        let cfg = cfg.into();
        cfg.validate()?;
        let mut current = lock(&self.config);
        for dir in Direction::BOTH {
            lock(&self.shared.links[dir.index()]).set_config(cfg.get(dir).clone())?;
        }
        *current = cfg;
        Ok(())
    }

    /// Changes the impairments of one direction.
    pub fn set_link_config(&self, dir: Direction, cfg: LinkConfig) -> Result<(), WanError> {
        let mut both = self.config();
        match dir {
            Direction::ClientToServer => both.client_to_server = cfg,
            Direction::ServerToClient => both.server_to_client = cfg,
        }
        self.set_config(both)
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> WanCounters {
        WanCounters {
            client_to_server: self.shared.counters(Direction::ClientToServer).snapshot(),
            server_to_client: self.shared.counters(Direction::ServerToClient).snapshot(),
            clients: self.shared.clients.load(Ordering::Relaxed),
        }
    }

    /// Stops the relay and waits for its threads. Same as dropping it, made explicit.
    pub fn shutdown(self) {}

    fn stop_threads(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Senders may be parked for up to POLL; receivers wait out their read timeout.
        for t in &self.threads {
            t.thread().unpark();
        }
        // The client receiver first: it closes the flows, whose threads then exit too.
        for t in self.threads.drain(..).rev() {
            let _ = t.join();
        }
        let flows = std::mem::take(&mut *lock(&self.shared.flow_threads));
        for t in flows {
            let _ = t.join();
        }
    }
}

impl Drop for WanEmulator {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, WanError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(WanError::Spawn)
}

/// Read timeout so blocked threads see shutdown; write timeout so a send can never hang.
/// The socket clients of a route to `upstream` send to, bound at `listen`, and its address.
fn bind_route(
    listen: SocketAddr,
    upstream: SocketAddr,
) -> Result<(UdpSocket, SocketAddr), WanError> {
    if upstream.ip().is_unspecified() || upstream.port() == 0 {
        return Err(WanError::BadUpstream(upstream));
    }
    let sock = sys::bind_udp(listen).map_err(|source| WanError::Bind {
        addr: listen,
        source,
    })?;
    set_timeouts(&sock).map_err(WanError::Socket)?;
    let local = sock.local_addr().map_err(WanError::Socket)?;
    Ok((sock, local))
}

fn set_timeouts(sock: &UdpSocket) -> io::Result<()> {
    sock.set_read_timeout(Some(POLL))?;
    sock.set_write_timeout(Some(POLL))
}

/// An error and all its sources, `: `-separated, as `anyhow`'s `{:#}` prints them: for logs,
/// since an error's own `Display` leaves its source to the chain. (The public helper is
/// `uffd_core::error::chain`; this crate depends on none of faultline's.)
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// True for the errors a receive loop just retries: timeouts, signals, and ICMP errors
/// reported on a connected socket (the server's port was closed for a while).
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
            | io::ErrorKind::Interrupted
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
    )
}

/// The `wan-c2s-rx` thread: datagrams from clients.
struct ClientReceiver {
    shared: Arc<Shared>,
    listen: Arc<UdpSocket>,
    upstream: SocketAddr,
    c2s: Arc<Inbox>,
    s2c: Arc<Inbox>,
    flows: HashMap<SocketAddr, Arc<Flow>>,
}

impl ClientReceiver {
    fn run(mut self) {
        let mut batch = sys::RecvBatch::new();
        let mut out = Vec::new();
        sys::enable_rx_offloads(&self.listen);
        while !self.shared.stopping() {
            let n = match batch.recv(&self.listen) {
                Ok(n) => n,
                Err(e) if is_transient(&e) => continue,
                Err(e) => {
                    tracing::warn!("WAN emulator: receive from clients failed: {e}");
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
            };
            let clock = self.shared.batch_clock();
            for i in 0..n {
                let dgram = batch.get(i);
                let Some(from) = dgram.from else { continue };
                let at = clock.arrival(dgram.stamp_ns);
                let Some(flow) = self.flow(from, at) else {
                    let c = self.shared.counters(Direction::ClientToServer);
                    AtomicCounters::add(&c.send_errors, dgram.segments().count() as u64);
                    continue;
                };
                flow.last_active.store(at, Ordering::Relaxed);
                for data in dgram.segments() {
                    let to = Outbound {
                        sock: flow.sock.clone(),
                        dest: self.upstream,
                    };
                    self.shared
                        .route(Direction::ClientToServer, at, data, to, &mut out);
                }
            }
            self.c2s.push(&mut out);
        }
        for flow in self.flows.values() {
            flow.closed.store(true, Ordering::SeqCst);
        }
    }

    /// The flow of `client`, created on its first datagram.
    fn flow(&mut self, client: SocketAddr, now: Nanos) -> Option<Arc<Flow>> {
        if let Some(f) = self.flows.get(&client) {
            return Some(f.clone());
        }
        if self.flows.len() >= MAX_CLIENTS {
            let oldest = self
                .flows
                .values()
                .min_by_key(|f| f.last_active.load(Ordering::Relaxed))
                .map(|f| f.client)?;
            if let Some(f) = self.flows.remove(&oldest) {
                tracing::info!("WAN emulator: too many clients, forgetting {oldest}");
                f.closed.store(true, Ordering::SeqCst);
            }
        }
        match self.open_flow(client, now) {
            Ok(f) => {
                self.flows.insert(client, f.clone());
                self.shared.clients.fetch_add(1, Ordering::Relaxed);
                Some(f)
            }
            Err(e) => {
                tracing::warn!(
                    "WAN emulator: cannot relay for client {client}: {}",
                    chain(&e)
                );
                None
            }
        }
    }

    fn open_flow(&mut self, client: SocketAddr, now: Nanos) -> Result<Arc<Flow>, WanError> {
        let any: IpAddr = match self.upstream {
            SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        let addr = SocketAddr::new(any, 0);
        let sock = sys::bind_udp(addr).map_err(|source| WanError::Bind { addr, source })?;
        // Connected: the kernel then only hands us the server's datagrams on this socket.
        sock.connect(self.upstream).map_err(WanError::Socket)?;
        set_timeouts(&sock).map_err(WanError::Socket)?;
        let flow = Arc::new(Flow {
            client,
            sock: Arc::new(sock),
            closed: AtomicBool::new(false),
            last_active: AtomicU64::new(now),
        });
        let (shared, f, listen, tx) = (
            self.shared.clone(),
            flow.clone(),
            self.listen.clone(),
            self.s2c.clone(),
        );
        let handle = spawn("wan-s2c-rx", move || {
            server_receiver(&shared, &f, &listen, &tx)
        })?;
        let mut threads = lock(&self.shared.flow_threads);
        threads.retain(|t| !t.is_finished());
        threads.push(handle);
        Ok(flow)
    }
}

/// A `wan-s2c-rx` thread: the server's datagrams for one client.
fn server_receiver(shared: &Shared, flow: &Flow, listen: &Arc<UdpSocket>, inbox: &Inbox) {
    let mut batch = sys::RecvBatch::new();
    let mut out = Vec::new();
    sys::enable_rx_offloads(&flow.sock);
    while !shared.stopping() && !flow.closed.load(Ordering::Relaxed) {
        let n = match batch.recv(&flow.sock) {
            Ok(n) => n,
            Err(e) if is_transient(&e) => continue,
            Err(e) => {
                tracing::warn!("WAN emulator: receive from the server failed: {e}");
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
        };
        let clock = shared.batch_clock();
        for i in 0..n {
            let dgram = batch.get(i);
            let at = clock.arrival(dgram.stamp_ns);
            for data in dgram.segments() {
                let to = Outbound {
                    sock: listen.clone(),
                    dest: flow.client,
                };
                shared.route(Direction::ServerToClient, at, data, to, &mut out);
            }
        }
        inbox.push(&mut out);
    }
}

/// A `wan-*-tx` thread: sends each packet of `dir` at its delivery time.
fn sender(shared: &Shared, dir: Direction, inbox: &Inbox) {
    sys::set_timer_slack_ns(1_000);
    let _ = inbox.sender.set(std::thread::current());
    let mut heap: BinaryHeap<Reverse<Queued>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut incoming: Vec<Packet> = Vec::new();
    let mut due: Vec<Packet> = Vec::with_capacity(SEND_BATCH);
    let mut batch = sys::SendBatch::new();
    let mut last_send: Nanos = 0;
    loop {
        std::mem::swap(&mut *lock(&inbox.queue), &mut incoming);
        for packet in incoming.drain(..) {
            seq += 1;
            heap.push(Reverse(Queued {
                at: packet.at,
                seq,
                packet,
            }));
        }
        if shared.stopping() {
            return;
        }
        let now = shared.now();
        let next = heap.peek().map(|q| q.0.at);
        if next.is_some_and(|at| at <= now) {
            while due.len() < SEND_BATCH && heap.peek().is_some_and(|q| q.0.at <= now) {
                if let Some(Reverse(q)) = heap.pop() {
                    due.push(q.packet);
                }
            }
            transmit(shared, dir, &mut due, &mut batch);
            last_send = now;
            continue;
        }
        let wait = next.map_or(POLL, |at| Duration::from_nanos(at - now));
        let sparse = next.is_some_and(|at| at.saturating_sub(last_send) >= SPARSE_GAP);
        if wait <= SPIN && sparse {
            // Spin, yielding the CPU to anyone who wants it, for precision.
            std::thread::yield_now();
            continue;
        }
        // Publish when we mean to wake, then look at the queue once more: a receiver that
        // queued a packet after our swap above either sees wake_at and unparks us, or
        // its packet is in the queue now.
        inbox
            .wake_at
            .store(next.unwrap_or(u64::MAX), Ordering::SeqCst);
        if lock(&inbox.queue).is_empty() {
            // Sparse traffic wakes early and spins the rest; dense traffic sleeps the whole
            // wait but at least DENSE_MIN_SLEEP, and leaves in batches.
            let sleep = if sparse {
                wait.saturating_sub(SPIN)
            } else {
                wait.max(DENSE_MIN_SLEEP)
            };
            std::thread::park_timeout(sleep.min(POLL));
        }
        inbox.wake_at.store(0, Ordering::SeqCst);
    }
}

/// Sends (or, while cut, drops) the due packets, batching runs that leave by one socket.
fn transmit(shared: &Shared, dir: Direction, due: &mut Vec<Packet>, batch: &mut sys::SendBatch) {
    let c = shared.counters(dir);
    let held: u64 = due.iter().map(|p| p.data.len() as u64).sum();
    c.held_bytes.fetch_sub(held, Ordering::Relaxed);
    if shared.cut.load(Ordering::SeqCst) {
        AtomicCounters::add(&c.dropped_cut, due.len() as u64);
        AtomicCounters::add(&c.cut_in_flight_bytes, held);
        due.clear();
        return;
    }
    // Before the sends: a lower bound on how late they leave.
    let now = shared.now();
    let (delay, late) = due.iter().fold((0u64, 0u64), |(d, l), p| {
        let late = now.saturating_sub(p.at).saturating_add(p.late_in);
        (
            d.saturating_add(p.at.saturating_sub(p.arrived)),
            l.saturating_add(late),
        )
    });
    // The sums before the count, which `snapshot` reads first: a snapshot that counts
    // these datagrams has their times.
    AtomicCounters::add(&c.modelled_delay_ns, delay);
    AtomicCounters::add(&c.send_lateness_ns, late);
    c.timed_packets
        .fetch_add(due.len() as u64, Ordering::Release);
    let mut start = 0;
    while start < due.len() {
        let sock = &due[start].out.sock;
        let end = start
            + due[start..]
                .iter()
                .take_while(|p| Arc::ptr_eq(&p.out.sock, sock))
                .count();
        let run = &due[start..end];
        let (sent, bytes, failed) = batch.send(sock, run);
        AtomicCounters::add(&c.packets, sent);
        AtomicCounters::add(&c.bytes, bytes);
        AtomicCounters::add(&c.send_errors, failed);
        start = end;
    }
    due.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_leaves_the_source_to_the_chain() {
        let source = io::Error::from(io::ErrorKind::AddrInUse);
        let cause = source.to_string();
        let e = WanError::Bind {
            addr: "127.0.0.1:9".parse().unwrap(),
            source,
        };
        assert_eq!(e.to_string(), "cannot bind the relay socket at 127.0.0.1:9");
        assert_eq!(chain(&e), format!("{e}: {cause}"));

        let config = ConfigError::ZeroRate;
        let cause = config.to_string();
        let e = WanError::from(config);
        assert!(!e.to_string().contains(&cause), "{e}");
        assert_eq!(chain(&e).matches(&*cause).count(), 1, "{}", chain(&e));
    }
}
