//! The QUIC driver's recovery (docs/recovery.md) on real loopback sockets, through a small
//! in-test UDP relay that can cut the link and move the source to a new port: a session
//! paused past the silence limit resumes on a new connection from a new port, demand
//! requests made while paused are served after it, another session is told the destination
//! is busy meanwhile, and a cut that never ends fails on both sides after the recover
//! timeout. Memory is compared byte for byte.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use transport::message::{ErrorCode, PAGE_SIZE};
use transport::proto::{DestConfig, DestSession, SourceConfig, SourceSession};
use transport::quic::accept::{AcceptLimits, Acceptor};
use transport::quic::{
    self, DestHooks, DestRecovery, DestReport, DriverError, SourceRecovery, SourceReport,
};
use transport::tls::Identity;
use transport::Layout;

mod common;
use common::{Image, MemSink};

/// A UDP relay between one client and `server` that can drop everything (a cut) and send
/// on from a new socket (the client seems to come from a new port).
struct Relay {
    listen: Arc<UdpSocket>,
    up: Mutex<Arc<UdpSocket>>,
    client: Mutex<Option<SocketAddr>>,
    cut: AtomicBool,
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
            server,
            from_server: Mutex::new(Vec::new()),
        });
        relay.spawn_downstream(up);
        let r = relay.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = r.listen.recv_from(&mut buf).await {
                *r.client.lock().unwrap() = Some(from);
                if !r.cut.load(Ordering::Relaxed) {
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
}

fn counter(n: &Arc<AtomicU64>) -> quic::OnConnection {
    let n = n.clone();
    Arc::new(move |_: &quic::Connection| {
        n.fetch_add(1, Ordering::Relaxed);
    })
}

async fn start(pages: usize, recover_timeout: Option<Duration>) -> Setup {
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
        };
        let hooks = DestHooks::default();
        quic::run_dest_recovering(conn, session, dest_sink, requests, hooks, recovery).await
    });
    let relay = Relay::start(addr).await;
    let img = Arc::new(Image(image(pages)));
    let client = quic::client_endpoint(localhost(), &src_id, dst_id.cert.clone()).unwrap();
    let conn = quic::connect(&client, relay.addr()).await.unwrap();
    let session = SourceSession::new(SourceConfig {
        push: false,
        ..SourceConfig::migrate("vm", layout)
    });
    let recovery = SourceRecovery {
        endpoint: client,
        addr: relay.addr(),
        recover_timeout,
        stopped: None,
        on_connection: Some(counter(&told.0)),
    };
    let reader = img.clone();
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
    }
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
    let s = start(PAGES, None).await;
    let present = || s.sink.count.load(Ordering::Relaxed) as usize;
    s.demand.send((0..100).collect()).unwrap();
    wait_until("the first pages", Duration::from_secs(10), || {
        present() == 100
    })
    .await;

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
    wait_until(
        "the requests made while paused",
        Duration::from_secs(20),
        || present() == 200,
    )
    .await;
    s.demand.send((200..PAGES as u64).collect()).unwrap();

    let src = s.source.await.unwrap().expect("the source");
    let dst = s.dest.await.unwrap().expect("the destination");
    assert_eq!(*s.sink.mem.lock().unwrap(), s.img.0, "memory differs");
    assert_eq!(
        s.sink.installs.load(Ordering::Relaxed),
        PAGES as u64,
        "a page installed twice"
    );
    assert!(
        src.outages.pauses >= 1 && dst.outages.pauses >= 1,
        "{src:?} {dst:?}"
    );
    let outage = restored.duration_since(cut).as_millis() as u64;
    assert!(
        src.outages.paused_ms >= outage,
        "{} < {outage}",
        src.outages.paused_ms
    );
    assert!(
        dst.outages.paused_ms >= outage,
        "{} < {outage}",
        dst.outages.paused_ms
    );
    assert!(src.outages.resume_ms_after_restore < 5_000, "{src:?}");
    let told = (
        s.told.0.load(Ordering::Relaxed),
        s.told.1.load(Ordering::Relaxed),
    );
    assert_eq!(told, (1, 1), "each side resumed on one new connection");
    // The session went on through the new socket: the destination answered the source at
    // its new port.
    let counts = s.relay.from_server.lock().unwrap();
    let newest = counts.last().unwrap().load(Ordering::Relaxed);
    assert!(
        newest > 10,
        "the new port carried {newest} datagrams from the server"
    );
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
