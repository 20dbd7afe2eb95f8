//! The QUIC driver's recovery (docs/recovery.md) on real loopback sockets, through a small
//! in-test UDP relay that can cut the link and move the source to a new port: a session
//! paused past the silence limit resumes on a new connection from a new port, demand
//! requests made while paused are served after it, another session is told the destination
//! is busy meanwhile, and a cut that never ends fails on both sides after the recover
//! timeout; a one-way cut that only the destination notices pauses the source too. Memory
//! is compared byte for byte.
//!
//! Replication the same way: one session for the replicator's life, paused by a cut and
//! resumed (from a new port) with a fresh handshake, sending again only what the standby
//! had not acknowledged; a paused replication gives way to another session and comes back
//! in a new one.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use transport::encoding::EncodingPolicy;
use transport::message::{ErrorCode, PAGE_SIZE};
use transport::proto::{DestConfig, DestSession, SourceConfig, SourceSession};
use transport::quic::accept::{AcceptLimits, Acceptor};
use transport::quic::{
    self, DestHooks, DestRecovery, DestReport, DriverError, SourceRecovery, SourceReport,
};
use transport::tls::Identity;
use transport::Layout;

mod common;
use common::{Image, MemSink, Slow};

/// A UDP relay between one client and `server` that can drop everything (a cut) and send
/// on from a new socket (the client seems to come from a new port).
struct Relay {
    listen: Arc<UdpSocket>,
    up: Mutex<Arc<UdpSocket>>,
    client: Mutex<Option<SocketAddr>>,
    cut: AtomicBool,
    /// Drops only what the client sends (a one-way cut).
    cut_up: AtomicBool,
    server: SocketAddr,
    /// Datagrams the server sent to each upstream socket, newest last.
    from_server: Mutex<Vec<Arc<AtomicU64>>>,
}

impl Relay {
    async fn start(server: SocketAddr) -> Arc<Relay> {
        let listen = Arc::new(UdpSocket::bind(localhost()).await.unwrap());
        let up = Arc::new(UdpSocket::bind(localhost()).await.unwrap());
        let relay = Arc::new(Relay {
            listen,
            up: Mutex::new(up.clone()),
            client: Mutex::new(None),
            cut: AtomicBool::new(false),
            cut_up: AtomicBool::new(false),
            server,
            from_server: Mutex::new(Vec::new()),
        });
        relay.spawn_downstream(up);
        let r = relay.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = r.listen.recv_from(&mut buf).await {
                *r.client.lock().unwrap() = Some(from);
                if !r.cut.load(Ordering::Relaxed) && !r.cut_up.load(Ordering::Relaxed) {
                    let up = r.up.lock().unwrap().clone();
                    let _ = up.send_to(&buf[..n], r.server).await;
                }
            }
        });
        relay
    }

    fn spawn_downstream(self: &Arc<Self>, up: Arc<UdpSocket>) {
        let count = Arc::new(AtomicU64::new(0));
        self.from_server.lock().unwrap().push(count.clone());
        let r = self.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = up.recv(&mut buf).await {
                count.fetch_add(1, Ordering::Relaxed);
                let client = *r.client.lock().unwrap();
                if let (false, Some(c)) = (r.cut.load(Ordering::Relaxed), client) {
                    let _ = r.listen.send_to(&buf[..n], c).await;
                }
            }
        });
    }

    fn addr(&self) -> SocketAddr {
        self.listen.local_addr().unwrap()
    }

    /// From now on the client's datagrams reach the server from a new port.
    async fn new_port(self: &Arc<Self>) {
        let up = Arc::new(UdpSocket::bind(localhost()).await.unwrap());
        self.spawn_downstream(up.clone());
        *self.up.lock().unwrap() = up;
    }

    fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::Relaxed);
    }

    /// Cuts (or restores) the client → server direction only.
    fn set_cut_up(&self, cut: bool) {
        self.cut_up.store(cut, Ordering::Relaxed);
    }
}

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn image(pages: usize) -> Vec<u8> {
    let mut v = vec![0u8; pages * PAGE_SIZE];
    let mut x = 0x243F6A8885A308D3u64;
    for b in v.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    v
}

/// A destination behind a listener with recovery, and a source connected through `relay`,
/// pages on demand only (`demand` feeds the destination's requests).
struct Setup {
    relay: Arc<Relay>,
    sink: Arc<MemSink>,
    img: Arc<Image>,
    demand: tokio::sync::mpsc::UnboundedSender<Vec<u64>>,
    dest: tokio::task::JoinHandle<Result<DestReport, DriverError>>,
    source: tokio::task::JoinHandle<Result<SourceReport, DriverError>>,
    ids: (Identity, Identity),
    server: SocketAddr,
    /// New connections the source and the destination were told of.
    told: (Arc<AtomicU64>, Arc<AtomicU64>),
    /// Hand-overs the source was told of.
    handovers: Arc<AtomicU64>,
}

fn counter(n: &Arc<AtomicU64>) -> quic::OnConnection {
    let n = n.clone();
    Arc::new(move |_: &quic::Connection| {
        n.fetch_add(1, Ordering::Relaxed);
    })
}

async fn start(pages: usize, recover_timeout: Option<Duration>) -> Setup {
    start_with(pages, recover_timeout, Pushing::No, image(pages)).await
}

/// Whether the source pushes, and how slowly it reads its memory.
#[derive(Clone, Copy)]
enum Pushing {
    No,
    /// Every read of memory takes this long.
    ReadingEach(Duration),
}

async fn start_with(
    pages: usize,
    recover_timeout: Option<Duration>,
    pushing: Pushing,
    img: Vec<u8>,
) -> Setup {
    let src_id = Identity::generate("source").unwrap();
    let dst_id = Identity::generate("dest").unwrap();
    let server = quic::server_endpoint(localhost(), &dst_id, src_id.cert.clone()).unwrap();
    let addr = server.local_addr().unwrap();
    let layout = Layout::single((pages * PAGE_SIZE) as u64);
    let sink = Arc::new(MemSink::new(pages));
    let (demand, requests) = tokio::sync::mpsc::unbounded_channel();
    let told = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let dest_told = counter(&told.1);
    let (dest_layout, dest_sink) = (layout.clone(), sink.clone());
    let dest = tokio::spawn(async move {
        let mut acceptor = Acceptor::start(server.clone(), AcceptLimits::default());
        let conn = acceptor.next().await.expect("a connection");
        let session = DestSession::new(DestConfig::migrate(dest_layout));
        let recovery = DestRecovery {
            incoming: Some(&mut acceptor),
            recover_timeout,
            on_connection: Some(dest_told),
            ..Default::default()
        };
        let hooks = DestHooks::default();
        quic::run_dest_recovering(conn, session, dest_sink, requests, hooks, recovery).await
    });
    let relay = Relay::start(addr).await;
    let img = Arc::new(Image(img));
    let client = quic::client_endpoint(localhost(), &src_id, dst_id.cert.clone()).unwrap();
    let conn = quic::connect(&client, relay.addr()).await.unwrap();
    let (push, per_read) = match pushing {
        Pushing::No => (false, Duration::ZERO),
        Pushing::ReadingEach(d) => (true, d),
    };
    let session = SourceSession::new(SourceConfig {
        push,
        encoding: EncodingPolicy::ALL,
        ..SourceConfig::migrate("vm", layout)
    });
    let handovers = Arc::new(AtomicU64::new(0));
    let recovery = SourceRecovery {
        endpoint: client,
        addr: relay.addr(),
        recover_timeout,
        stopped: None,
        on_connection: Some(counter(&told.0)),
        on_handover: Some({
            let n = handovers.clone();
            Arc::new(move || {
                n.fetch_add(1, Ordering::Relaxed);
            })
        }),
    };
    let reader = Arc::new(Slow {
        inner: img.clone(),
        on_read: Arc::new(tokio::sync::Notify::new()),
        per_read,
    });
    let source = tokio::spawn(async move {
        quic::run_source_recovering(conn, session, reader, Some(recovery)).await
    });
    Setup {
        relay,
        sink,
        img,
        demand,
        dest,
        source,
        ids: (src_id, dst_id),
        server: addr,
        told,
        handovers,
    }
}

/// [`start`] without a recover timeout, once the first 100 pages asked for are present.
async fn start_serving(pages: usize) -> Setup {
    let s = start(pages, None).await;
    s.demand.send((0..100).collect()).unwrap();
    wait_until("the first pages", Duration::from_secs(10), || {
        s.sink.count.load(Ordering::Relaxed) == 100
    })
    .await;
    s
}

/// Waits for the 200 pages asked for so far, asks for the rest and waits for both sides to
/// end; memory must be equal.
async fn finish_serving(s: &mut Setup, pages: usize) -> (SourceReport, DestReport) {
    wait_until(
        "the requests made while paused",
        Duration::from_secs(20),
        || s.sink.count.load(Ordering::Relaxed) == 200,
    )
    .await;
    s.demand.send((200..pages as u64).collect()).unwrap();
    let src = (&mut s.source).await.unwrap().expect("the source");
    let dst = (&mut s.dest).await.unwrap().expect("the destination");
    assert_eq!(*s.sink.mem.lock().unwrap(), s.img.0, "memory differs");
    (src, dst)
}

async fn wait_until(what: &str, timeout: Duration, f: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_past_the_silence_limit_resumes_from_a_new_port_and_serves_requests_made_meanwhile() {
    const PAGES: usize = 512;
    let mut s = start_serving(PAGES).await;
    let present = || s.sink.count.load(Ordering::Relaxed) as usize;

    s.relay.set_cut(true);
    let cut = Instant::now();
    // The guest goes on faulting while the link is down: these wait in the session.
    s.demand.send((100..200).collect()).unwrap();
    tokio::time::sleep(quic::SILENCE_LOST + Duration::from_millis(1500)).await;
    assert_eq!(present(), 100, "nothing crosses a cut link");

    // Paused: another session (its own Hello) is told the destination is busy.
    let (src_id, dst_id) = &s.ids;
    let other = quic::client_endpoint(localhost(), src_id, dst_id.cert.clone()).unwrap();
    let other_conn = quic::connect(&other, s.server).await.unwrap();
    let other_session = SourceSession::new(SourceConfig::migrate(
        "vm",
        Layout::single((PAGES * PAGE_SIZE) as u64),
    ));
    let refused = quic::run_source(other_conn, other_session, s.img.clone()).await;
    match refused {
        Err(DriverError::PeerClosed {
            code: ErrorCode::Busy,
            reason,
        }) => assert_eq!(reason, quic::BUSY_REASON),
        other => panic!("another session was not told busy: {other:?}"),
    }

    s.relay.new_port().await;
    s.relay.set_cut(false);
    let restored = Instant::now();
    let (src, dst) = finish_serving(&mut s, PAGES).await;
    assert_eq!(
        s.sink.installs.load(Ordering::Relaxed),
        PAGES as u64,
        "a page installed twice"
    );
    assert!(
        src.outages.pauses >= 1 && dst.outages.pauses >= 1,
        "{src:?} {dst:?}"
    );
    // The pause is dated from the silence watchdog's last poll (every 200 ms) that saw a
    // datagram: up to a poll late. The resume follows the restore within an attempt
    // interval and a handshake.
    let outage = restored.duration_since(cut).as_millis() as u64;
    assert!(
        src.outages.paused_ms + 500 >= outage,
        "{} < {outage}",
        src.outages.paused_ms
    );
    assert!(
        dst.outages.paused_ms + 500 >= outage,
        "{} < {outage}",
        dst.outages.paused_ms
    );
    assert!(src.outages.resume_ms_after_restore < 5_000, "{src:?}");
    let told = (
        s.told.0.load(Ordering::Relaxed),
        s.told.1.load(Ordering::Relaxed),
    );
    assert_eq!(told, (1, 1), "each side resumed on one new connection");
    assert_eq!(
        s.handovers.load(Ordering::Relaxed),
        1,
        "one hand-over, not another at the resume"
    );
    // The session went on through the new socket: the destination answered the source at
    // its new port.
    let counts = s.relay.from_server.lock().unwrap();
    let newest = counts.last().unwrap().load(Ordering::Relaxed);
    assert!(
        newest > 10,
        "the new port carried {newest} datagrams from the server"
    );
}

/// The push after a resumed connection encodes as the destination agreed at the handshake:
/// memory of text pages crosses compressed before and after a cut (before, the resumed
/// connection's driver started with no features, and its push went raw).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_push_after_a_resume_encodes_as_agreed_at_the_handshake() {
    const PAGES: usize = 2048;
    let mut img = vec![0u8; PAGES * PAGE_SIZE];
    for (i, page) in img.chunks_mut(PAGE_SIZE).enumerate() {
        let line = format!("page {i} of a migration that resumes; ");
        for (b, c) in page.iter_mut().zip(line.bytes().cycle()) {
            *b = c;
        }
    }
    // 128 batches of 16 pages at 10 ms a read: over a second of push, cut midway.
    let mut s = start_with(
        PAGES,
        None,
        Pushing::ReadingEach(Duration::from_millis(10)),
        img,
    )
    .await;
    let present = || s.sink.count.load(Ordering::Relaxed) as usize;
    wait_until("the push under way", Duration::from_secs(10), || {
        present() >= 64
    })
    .await;
    s.relay.set_cut(true);
    tokio::time::sleep(quic::SILENCE_LOST + Duration::from_millis(1500)).await;
    let before = present();
    assert!(before < PAGES, "the push ended before the cut");
    s.relay.new_port().await;
    s.relay.set_cut(false);
    let src = (&mut s.source).await.unwrap().expect("the source");
    let dst = (&mut s.dest).await.unwrap().expect("the destination");
    assert_eq!(*s.sink.mem.lock().unwrap(), s.img.0, "memory differs");
    assert!(src.outages.pauses >= 1, "{src:?}");
    // No demand: every page was pushed, and every one compressed, after the resume too.
    let e = &src.encoding;
    assert_eq!(e.raw_pages, 0, "{e:?}");
    assert!(e.lz4_pages + e.ref_pages >= PAGES as u64, "{e:?}");
    assert!(dst.pages_received as usize == PAGES, "{dst:?}");
}

/// Only the source's datagrams are lost for a while (a congested or broken path one way):
/// the destination judges the silence a lost connection and drops it to wait, while the
/// source, still hearing it, learns of that from the destination's dropped streams and its
/// close, in whatever order they come. The source must pause and reconnect, not end the
/// session: after the hand-over that would lose the VM (as in the fleet bench).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_way_cut_that_only_the_destination_notices_pauses_the_source_too() {
    const PAGES: usize = 512;
    let mut s = start_serving(PAGES).await;

    s.relay.set_cut_up(true);
    s.demand.send((100..200).collect()).unwrap();
    tokio::time::sleep(quic::SILENCE_LOST + Duration::from_millis(900)).await;
    assert!(
        !s.source.is_finished(),
        "the source gave up: {:?}",
        s.source
    );
    s.relay.set_cut_up(false);
    let (src, dst) = finish_serving(&mut s, PAGES).await;
    assert!(dst.outages.pauses >= 1, "{dst:?}");
    assert!(src.outages.pauses >= 1, "{src:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_that_never_ends_fails_both_sides_after_the_recover_timeout() {
    let limit = Duration::from_secs(1);
    let s = start(64, Some(limit)).await;
    s.demand.send(vec![0, 1, 2]).unwrap();
    wait_until("the first pages", Duration::from_secs(10), || {
        s.sink.count.load(Ordering::Relaxed) == 3
    })
    .await;
    s.relay.set_cut(true);
    let cut = Instant::now();
    let (src, dst) = (s.source.await.unwrap(), s.dest.await.unwrap());
    let took = cut.elapsed();
    for r in [src.map(|_| ()), dst.map(|_| ())] {
        // In mid-postcopy: giving up loses the VM, and the cause is the timeout.
        let r: Result<(), _> = match r {
            Err(DriverError::VmLost {
                vulnerability_ms,
                cause,
                ..
            }) => {
                assert!(vulnerability_ms > 0);
                Err(*cause)
            }
            other => panic!("not a lost VM: {other:?}"),
        };
        match r {
            Err(DriverError::RecoverTimeout {
                limit: l,
                outage_ms,
            }) => {
                assert_eq!(l, limit);
                assert!(outage_ms >= 1_000, "{outage_ms}");
            }
            other => panic!("not a recover timeout: {other:?}"),
        }
    }
    // Noticed after SILENCE_LOST, then the limit (counted from the last datagram) is over.
    assert!(
        took < quic::SILENCE_LOST + Duration::from_secs(4),
        "{took:?}"
    );
}

// Replication (docs/recovery.md, "Other sessions"): one session for the replicator's whole
// life, paused by a cut and resumed on a new connection with a fresh handshake.

use transport::bitmap::Bitmap;
use transport::message::{PageRef, Pages, SessionKind};
use transport::proto::Channel;
use transport::quic::{PageSink, ReplicationEvent, ReplicationReport, SinkError, Update};

/// A standby's replica in plain memory: a version per page, acknowledged once synced.
struct Replica {
    mem: Mutex<Vec<u8>>,
    version: Mutex<Vec<u64>>,
    epoch: Mutex<u64>,
    acks: Mutex<Vec<(u64, u64)>>,
    /// Pages stored at a version they already had: sent again.
    again: AtomicU64,
}

impl Replica {
    fn new(pages: usize) -> Replica {
        Replica {
            mem: Mutex::new(vec![0xAA; pages * PAGE_SIZE]),
            version: Mutex::new(vec![0; pages]),
            epoch: Mutex::new(0),
            acks: Mutex::new(Vec::new()),
            again: AtomicU64::new(0),
        }
    }
}

impl PageSink for Replica {
    fn install(&self, _: &Pages, _: Channel) -> Result<(), SinkError> {
        Err(SinkError("no evacuation here".into()))
    }

    fn is_complete(&self) -> bool {
        false
    }

    fn invalid_pages(&self, _: SessionKind, epoch: u64) -> Result<Bitmap, SinkError> {
        let mut version = self.version.lock().unwrap();
        if std::mem::replace(&mut *self.epoch.lock().unwrap(), epoch) != epoch {
            version.fill(0);
        }
        let mut valid = Bitmap::new(version.len() as u64);
        for (p, _) in version.iter().enumerate().filter(|(_, &v)| v != 0) {
            valid.set(p as u64);
        }
        Ok(valid.complement())
    }

    fn store(&self, pages: &Pages, versions: &[u64]) -> Result<(), SinkError> {
        let mut mem = self.mem.lock().unwrap();
        let mut version = self.version.lock().unwrap();
        for ((p, page), &v) in pages.iter().zip(versions) {
            let at = p as usize * PAGE_SIZE;
            match page {
                PageRef::Raw(d) => mem[at..at + PAGE_SIZE].copy_from_slice(d),
                PageRef::Zero => mem[at..at + PAGE_SIZE].fill(0),
                _ => return Err(SinkError("replication sends raw and zero pages".into())),
            }
            if std::mem::replace(&mut version[p as usize], v) == v {
                self.again.fetch_add(1, Ordering::Relaxed);
            }
            self.acks.lock().unwrap().push((p, v));
        }
        Ok(())
    }

    fn sync(&self) -> Result<Vec<(u64, u64)>, SinkError> {
        Ok(std::mem::take(&mut *self.acks.lock().unwrap()))
    }
}

/// A replicator in the test: guest memory, a version per page, what the standby
/// acknowledged and what went out on the current connection (like vmm-shim's ledger).
struct Replicating {
    mem: Vec<u8>,
    version: Vec<u64>,
    acked: Vec<u64>,
    sent: Vec<u64>,
    updates: tokio::sync::mpsc::Sender<Update>,
    events: tokio::sync::mpsc::UnboundedReceiver<ReplicationEvent>,
    driver: tokio::task::JoinHandle<Result<ReplicationReport, DriverError>>,
    /// Pages sent again after a pause at the version sent before it.
    resent: u64,
    in_flight_at_pause: Vec<(u64, u64)>,
    paused: bool,
    /// The standby told its invalid pages (the session runs).
    answered: bool,
}

impl Replicating {
    /// Starts a session (`epoch`, a random session id) on `conn`, reconnecting to `addr`.
    fn start(
        conn: quic::Connection,
        endpoint: quic::Endpoint,
        addr: SocketAddr,
        img: &[u8],
        epoch: u64,
    ) -> Replicating {
        let pages = img.len() / PAGE_SIZE;
        let layout = Layout::single(img.len() as u64);
        let session = SourceSession::new(SourceConfig {
            kind: SessionKind::Replicate,
            epoch,
            ..SourceConfig::migrate("vm", layout)
        });
        let recovery = SourceRecovery {
            endpoint,
            addr,
            recover_timeout: None,
            stopped: None,
            on_connection: None,
            on_handover: None,
        };
        let (updates, rx) = tokio::sync::mpsc::channel(8);
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let driver = tokio::spawn(quic::run_replication_recovering(
            conn,
            session,
            rx,
            tx,
            Some(recovery),
        ));
        Replicating {
            mem: img.to_vec(),
            version: vec![1; pages],
            acked: vec![0; pages],
            sent: vec![0; pages],
            updates,
            events,
            driver,
            resent: 0,
            in_flight_at_pause: Vec::new(),
            paused: false,
            answered: false,
        }
    }

    /// The guest writes page `p`.
    fn write(&mut self, p: usize) {
        self.mem[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].fill(self.version[p] as u8 ^ 0x5C);
        self.version[p] += 1;
    }

    /// Sends every page neither acknowledged nor sent at its version; returns how many.
    async fn send_stale(&mut self) -> u64 {
        assert!(!self.paused, "a replicator sends nothing while paused");
        let mut n = 0;
        for p in 0..self.version.len() {
            let v = self.version[p];
            if self.acked[p] == v || self.sent[p] == v {
                continue;
            }
            if self.in_flight_at_pause.contains(&(p as u64, v)) {
                self.resent += 1;
            }
            self.sent[p] = v;
            let data = &self.mem[p * PAGE_SIZE..(p + 1) * PAGE_SIZE];
            let update = Update {
                pages: Pages::from_memory(p as u64, data),
                versions: vec![v],
            };
            self.updates.send(update).await.expect("the driver runs");
            n += 1;
        }
        n
    }

    fn apply(&mut self, ev: ReplicationEvent) {
        match ev {
            ReplicationEvent::Acked(entries) => {
                for (p, v) in entries {
                    let a = &mut self.acked[p as usize];
                    *a = (*a).max(v);
                }
            }
            ReplicationEvent::Invalid(b) => {
                self.answered = true;
                for p in b.iter_ones() {
                    self.acked[p as usize] = 0;
                    self.sent[p as usize] = 0;
                }
            }
            ReplicationEvent::Paused => {
                self.paused = true;
                self.in_flight_at_pause = (0..self.version.len())
                    .filter(|&p| self.sent[p] != self.acked[p])
                    .map(|p| (p as u64, self.sent[p]))
                    .collect();
                self.sent.copy_from_slice(&self.acked);
            }
            ReplicationEvent::Resumed => self.paused = false,
        }
    }

    /// Applies events until `done` holds.
    async fn until(&mut self, what: &str, done: impl Fn(&Replicating) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !done(self) {
            let ev = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
                .expect("the driver ended");
            self.apply(ev);
        }
    }

    fn all_acked(&self) -> bool {
        self.acked == self.version
    }

    /// Ends the session cleanly.
    async fn stop(self) -> ReplicationReport {
        drop(self.updates);
        self.driver.await.unwrap().expect("replication")
    }
}

/// A standby: `sessions` sessions one after the other on `acceptor`, each a new
/// `DestSession` like `Listener::serve_standby`; their reports.
async fn standby(
    mut acceptor: Acceptor,
    replica: Arc<Replica>,
    layout: Layout,
    sessions: usize,
    told: Arc<AtomicU64>,
) -> Vec<DestReport> {
    let mut reports = Vec::new();
    for _ in 0..sessions {
        let conn = acceptor.next().await.expect("a connection");
        let session = DestSession::new(DestConfig {
            accept: vec![SessionKind::Replicate, SessionKind::Evacuate],
            ..DestConfig::migrate(layout.clone())
        });
        let recovery = DestRecovery {
            incoming: Some(&mut acceptor),
            recover_timeout: None,
            on_connection: Some(counter(&told)),
            ..Default::default()
        };
        let (_requests, rx) = tokio::sync::mpsc::unbounded_channel();
        let sink = replica.clone();
        let hooks = DestHooks::default();
        let r = quic::run_dest_recovering(conn, session, sink, rx, hooks, recovery).await;
        reports.push(r.expect("a replication session"));
    }
    reports
}

/// A standby serving `sessions` sessions, and a replicator connected to it through a
/// relay.
struct ReplicationSetup {
    relay: Arc<Relay>,
    replica: Arc<Replica>,
    standby: tokio::task::JoinHandle<Vec<DestReport>>,
    /// New connections the standby's sessions were told of.
    told: Arc<AtomicU64>,
    ids: (Identity, Identity),
    server: SocketAddr,
    endpoint: quic::Endpoint,
    img: Vec<u8>,
}

async fn start_replication(pages: usize, sessions: usize) -> (ReplicationSetup, Replicating) {
    let src_id = Identity::generate("source").unwrap();
    let dst_id = Identity::generate("dest").unwrap();
    let server = quic::server_endpoint(localhost(), &dst_id, src_id.cert.clone()).unwrap();
    let addr = server.local_addr().unwrap();
    let layout = Layout::single((pages * PAGE_SIZE) as u64);
    let replica = Arc::new(Replica::new(pages));
    let told = Arc::new(AtomicU64::new(0));
    let acceptor = Acceptor::start(server.clone(), AcceptLimits::default());
    let standby = tokio::spawn(standby(
        acceptor,
        replica.clone(),
        layout,
        sessions,
        told.clone(),
    ));
    let relay = Relay::start(addr).await;
    let img = image(pages);
    let client = quic::client_endpoint(localhost(), &src_id, dst_id.cert.clone()).unwrap();
    let conn = quic::connect(&client, relay.addr()).await.unwrap();
    let r = Replicating::start(conn, client, relay.addr(), &img, 7);
    let setup = ReplicationSetup {
        relay,
        replica,
        standby,
        told,
        ids: (src_id, dst_id),
        server: addr,
        endpoint: server,
        img,
    };
    (setup, r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replication_pauses_resumes_on_the_same_session_and_resends_only_what_was_not_acknowledged(
) {
    const PAGES: usize = 256;
    // In flight at the cut, and written while paused.
    const IN_FLIGHT: usize = 40;
    const WRITTEN: usize = 24;
    let (s, mut r) = start_replication(PAGES, 1).await;
    r.until("the standby's answer", |r| r.answered).await;
    assert_eq!(r.send_stale().await, PAGES as u64);
    r.until("every page acknowledged", Replicating::all_acked)
        .await;

    // Nothing to send for longer than the silence limit: keep-alives keep the connection.
    let quiet = quic::SILENCE_LOST + Duration::from_secs(2);
    if let Ok(ev) = tokio::time::timeout(quiet, r.events.recv()).await {
        panic!("a quiet replication heard {ev:?}");
    }

    // Cut with updates in flight: they never arrive.
    s.relay.set_cut(true);
    for p in 0..IN_FLIGHT {
        r.write(p);
    }
    assert_eq!(r.send_stale().await, IN_FLIGHT as u64);
    r.until("the pause", |r| r.paused).await;
    let paused_seen = Instant::now();
    // The guest writes on while paused: kept, sent after the resume.
    for p in IN_FLIGHT..IN_FLIGHT + WRITTEN {
        r.write(p);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.relay.new_port().await;
    s.relay.set_cut(false);
    let restored = Instant::now();
    r.until("the resume", |r| !r.paused).await;
    // Only what the standby never acknowledged goes out again.
    assert_eq!(r.send_stale().await, (IN_FLIGHT + WRITTEN) as u64);
    assert_eq!(r.resent, IN_FLIGHT as u64);
    r.until("every page acknowledged again", Replicating::all_acked)
        .await;
    let mem = r.mem.clone();
    let src = r.stop().await;

    let reports = s.standby.await.unwrap();
    let dst = &reports[0];
    assert_eq!(*s.replica.mem.lock().unwrap(), mem, "the replica differs");
    assert_ne!(mem, s.img, "the guest wrote");
    // One session on the standby too, resumed on one new connection.
    assert_eq!(dst.kind, Some(SessionKind::Replicate));
    assert_eq!(s.told.load(Ordering::Relaxed), 1);
    assert_eq!(src.outages.pauses, 1, "{src:?}");
    assert_eq!(dst.outages.pauses, 1, "{dst:?}");
    // The source paused before it said so and resumed after the link came back. (When
    // the destination noticed the cut depends on its watchdog's scheduling: on a starved
    // machine, late; its pause only has to be counted.)
    let seen_paused = restored.duration_since(paused_seen).as_millis() as u64;
    assert!(src.outages.paused_ms >= seen_paused, "{src:?}");
    assert!(dst.outages.paused_ms > 0, "{dst:?}");
    assert!(src.outages.resume_ms_after_restore < 5_000, "{src:?}");
    // The updates in flight at the cut never arrived; nothing was stored twice.
    assert_eq!(
        src.pages_sent,
        (PAGES + 2 * IN_FLIGHT + WRITTEN) as u64,
        "{src:?}"
    );
    assert_eq!(dst.pages_replicated, (PAGES + IN_FLIGHT + WRITTEN) as u64);
    assert_eq!(s.replica.again.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_replication_gives_way_to_another_session_and_then_resumes_in_a_new_one() {
    const PAGES: usize = 128;
    // Three sessions on the standby: the first replication (paused, then given up), another
    // replicator's (another epoch: the replica starts over), the first one's again.
    let (s, mut a) = start_replication(PAGES, 3).await;
    a.until("the standby's answer", |r| r.answered).await;
    a.send_stale().await;
    a.until("every page acknowledged", Replicating::all_acked)
        .await;
    s.relay.set_cut(true);
    a.until("the pause", |r| r.paused).await;

    // Another replicator connects directly while the first one is cut off.
    let (src_id, dst_id) = &s.ids;
    let other = quic::client_endpoint(localhost(), src_id, dst_id.cert.clone()).unwrap();
    let conn = quic::connect(&other, s.server).await.unwrap();
    let img_b = image(PAGES).iter().map(|b| b ^ 0xFF).collect::<Vec<_>>();
    let mut b = Replicating::start(conn, other, s.server, &img_b, 8);
    b.until("the standby's answer", |r| r.answered).await;
    b.send_stale().await;
    b.until(
        "every page of the other acknowledged",
        Replicating::all_acked,
    )
    .await;
    assert_eq!(*s.replica.mem.lock().unwrap(), img_b);
    let b_report = b.stop().await;
    assert_eq!(b_report.outages.pauses, 0);

    // The first replicator comes back: a new session at the standby takes its Hello, with
    // every page invalid (another epoch was stored since).
    s.relay.set_cut(false);
    a.until("the resume", |r| !r.paused).await;
    assert!(a.acked.iter().all(|&v| v == 0), "every page invalid");
    a.send_stale().await;
    a.until("every page acknowledged again", Replicating::all_acked)
        .await;
    let mem = a.mem.clone();
    let a_report = a.stop().await;
    assert_eq!(*s.replica.mem.lock().unwrap(), mem, "the replica differs");
    assert_eq!(a_report.outages.pauses, 1, "{a_report:?}");
    let reports = s.standby.await.unwrap();
    assert_eq!(reports.len(), 3);
    assert_eq!(reports[0].outages.pauses, 1, "{:?}", reports[0]);
    assert!(reports
        .iter()
        .all(|r| r.kind == Some(SessionKind::Replicate)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replication_resumes_into_a_restarted_standby() {
    const PAGES: usize = 128;
    let (s, mut r) = start_replication(PAGES, 1).await;
    r.until("the standby's answer", |r| r.answered).await;
    r.send_stale().await;
    r.until("every page acknowledged", Replicating::all_acked)
        .await;
    // The standby's process ends (its endpoint closes, without a reason) and a new one
    // starts on the same address with the same identity and the replica it left behind.
    s.standby.abort();
    let _ = s.standby.await;
    s.endpoint.close(0u32.into(), b"");
    s.endpoint.wait_idle().await;
    drop(s.endpoint);
    r.until("the pause", |r| r.paused).await;
    for p in 0..10 {
        r.write(p);
    }
    let (src_id, dst_id) = &s.ids;
    let deadline = Instant::now() + Duration::from_secs(10);
    let server = loop {
        match quic::server_endpoint(s.server, dst_id, src_id.cert.clone()) {
            Ok(e) => break e,
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot bind again: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let layout = Layout::single((PAGES * PAGE_SIZE) as u64);
    let told = Arc::new(AtomicU64::new(0));
    let acceptor = Acceptor::start(server, AcceptLimits::default());
    let restarted = tokio::spawn(standby(acceptor, s.replica.clone(), layout, 1, told));
    // The same session comes back; the new standby takes its Hello as a new session's.
    r.until("the resume", |r| !r.paused).await;
    assert_eq!(r.send_stale().await, 10, "only the pages written since");
    r.until("every page acknowledged again", Replicating::all_acked)
        .await;
    let mem = r.mem.clone();
    let src = r.stop().await;
    let dst = restarted.await.unwrap();
    assert_eq!(*s.replica.mem.lock().unwrap(), mem, "the replica differs");
    assert_eq!(src.outages.pauses, 1, "{src:?}");
    assert_eq!(dst[0].outages.pauses, 0, "a new session: {:?}", dst[0]);
    assert_eq!(dst[0].pages_replicated, 10);
}
