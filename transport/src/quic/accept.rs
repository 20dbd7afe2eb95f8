//! Accepting connections so that only authenticated peers reach the caller.
//!
//! A destination listens on a public address at the worst possible moment. Whoever can send
//! it UDP must not be able to end it, stall it, or make it hold state:
//!
//! * **Address validation first**: an Initial from an address that has not proved it can
//!   receive (no valid token) is answered with a stateless Retry and forgotten, so spoofed
//!   or replayed Initials cost one small packet and no memory.
//! * **Handshakes run concurrently**, at most [`AcceptLimits::max_handshakes`] at once and
//!   [`AcceptLimits::max_handshakes_per_peer`] from one peer (an IPv4 address, an IPv6
//!   /64: validated, so not spoofed), each bounded by [`AcceptLimits::handshake_timeout`];
//!   beyond a bound new attempts are ignored. So one host that completes address
//!   validation and then stalls its handshakes holds a share of the places, not all of
//!   them. A handshake that fails (an unpinned certificate, garbage, a timeout) is logged
//!   and dropped; it never ends the listener.
//! * **Busy**: while the caller is in a session ([`Acceptor::set_busy`]), an authenticated
//!   peer is told at once, with [`ErrorCode::Busy`] and a reason, instead of waiting.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{Connection, Endpoint, Incoming, VarInt};
use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;

use super::dest::Candidate;
use crate::message::ErrorCode;

/// Bounds on the handshakes an [`Acceptor`] runs: start from `AcceptLimits::default()` and
/// change the fields that matter (more may come).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AcceptLimits {
    /// Most handshakes in progress at once; attempts beyond it are ignored (the peer's
    /// Initial goes unanswered, as if lost, and a real client retransmits it).
    pub max_handshakes: usize,
    /// Most of them from one peer ([`peer_of`]: an IPv4 address, an IPv6 /64). Peers that
    /// share an address (behind one NAT, in one /64) share this too: a host there that
    /// stalls its handshakes keeps the others waiting, where it would take the whole
    /// bound from a peer elsewhere.
    pub max_handshakes_per_peer: usize,
    /// Longest one handshake may take from its validated Initial to an authenticated
    /// connection.
    pub handshake_timeout: Duration,
    /// A peer at [`AcceptLimits::max_handshakes_per_peer`] gives up its oldest handshake
    /// for a new one once that one has run this long: a reconnecting source starts an
    /// attempt every 25 ms and abandons each after 2 s (`recovery::ATTEMPT_TIMEOUT`), so
    /// attempts that stalled in a flapping link's gaps must not keep it out until they
    /// time out here. A host that stalls its handshakes on purpose gets at most
    /// `max_handshakes_per_peer` new ones each time this passes.
    pub handshake_stale_after: Duration,
}

impl Default for AcceptLimits {
    fn default() -> Self {
        AcceptLimits {
            // Enough that a flood of unauthenticated handshakes does not crowd out the real
            // peer (an ignored Initial costs it a ~1 s retransmission timeout): with 64, the
            // handshake_flood bench's real source waited ~1 s in half its rounds under 1,000
            // unpinned clients. A pending handshake holds a few kilobytes.
            max_handshakes: 1024,
            // A real peer needs one or two at once (a source's replication and its
            // evacuation; an orchestrator's control connection and `plan --live`); this
            // leaves room for reconnections and a few peers behind one address. Measured
            // (`handshake_flood`, 1,000 unpinned clients from one host): at 8 the real
            // source's start took 1.9 x its clean time, at 32 5.6-9.5 x, unbounded 39-51 x.
            max_handshakes_per_peer: 8,
            handshake_timeout: Duration::from_secs(10),
            handshake_stale_after: Duration::from_secs(2),
        }
    }
}

/// What an [`Acceptor`] did with the connection attempts it saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AcceptCounts {
    /// Initials answered with a stateless Retry (address not yet validated).
    pub retried: u64,
    /// Attempts ignored because [`AcceptLimits::max_handshakes`] were in progress.
    pub ignored: u64,
    /// Attempts ignored because their peer had [`AcceptLimits::max_handshakes_per_peer`]
    /// in progress.
    pub ignored_per_peer: u64,
    /// Handshakes given up for a newer one of their peer's, having run longer than
    /// [`AcceptLimits::handshake_stale_after`].
    pub stale_given_up: u64,
    /// Handshakes that failed or timed out (unknown peer, garbage, silence).
    pub failed: u64,
    /// Authenticated peers told the listener is busy.
    pub busy: u64,
    /// Authenticated connections handed to the caller.
    pub accepted: u64,
}

#[derive(Default)]
struct Counters {
    retried: AtomicU64,
    ignored: AtomicU64,
    ignored_per_peer: AtomicU64,
    stale_given_up: AtomicU64,
    failed: AtomicU64,
    busy: AtomicU64,
    accepted: AtomicU64,
}

struct Shared {
    counts: Counters,
    /// While `Some`, authenticated peers are closed with this reason.
    busy: Mutex<Option<String>>,
    /// Handshakes in progress, by peer ([`peer_of`]); a peer with none has no entry.
    handshaking: Mutex<HashMap<IpAddr, Vec<InProgress>>>,
    /// The next [`InProgress::id`].
    next_id: AtomicU64,
    /// Handshakes refused since the last authenticated peer was handed over: which of
    /// them are logged as warnings ([`refused`]).
    refused_lately: AtomicU64,
}

/// One handshake in progress, for its peer's bound.
struct InProgress {
    id: u64,
    since: Instant,
    /// Its task, to give it up for a newer one ([`AcceptLimits::handshake_stale_after`]);
    /// `None` for the moment between taking the place and spawning the task.
    task: Option<tokio::task::AbortHandle>,
}

/// Accepts connections on a listening endpoint in the background and hands over only
/// authenticated ones (see the module docs). Dropping it stops accepting.
pub struct Acceptor {
    accepted: mpsc::Receiver<Connection>,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
    /// A connection a session screened (streams open, `Hello` read) and handed back for
    /// the next session: a replication gives way to another session (see
    /// [`super::DestRecovery::incoming`]).
    handed_back: Option<Candidate>,
    /// The handed-back connection [`Acceptor::next`] returned last, for
    /// [`super::run_dest_recovering`] to take over with its streams.
    claimable: Option<Candidate>,
}

impl Acceptor {
    /// Starts accepting on `endpoint` (a server endpoint: its TLS configuration pins the
    /// peer's certificate). Must be called within a tokio runtime.
    pub fn start(endpoint: Endpoint, limits: AcceptLimits) -> Acceptor {
        let shared = Arc::new(Shared {
            counts: Counters::default(),
            busy: Mutex::new(None),
            handshaking: Mutex::default(),
            next_id: AtomicU64::new(0),
            refused_lately: AtomicU64::new(0),
        });
        // Room for a few authenticated peers the caller has not taken yet; more wait in
        // their handshake task (each holds a slot of the bound) until it takes them.
        let (tx, accepted) = mpsc::channel(4);
        let task = tokio::spawn(accept_loop(endpoint, limits, shared.clone(), tx));
        Acceptor {
            accepted,
            shared,
            task,
            handed_back: None,
            claimable: None,
        }
    }

    /// The next authenticated connection; `None` once the endpoint is closed. A connection
    /// an earlier session handed back comes first: give it to
    /// [`super::run_dest_recovering`] with this acceptor, which takes over its open
    /// streams.
    pub async fn next(&mut self) -> Option<Connection> {
        if let Some(c) = self.handed_back.take() {
            let conn = c.conn.clone();
            self.claimable = Some(c);
            return Some(conn);
        }
        self.claimable = None;
        self.accepted.recv().await
    }

    /// Keeps `c` for the next session (see [`Acceptor::next`]).
    pub(super) fn hand_back(&mut self, c: Candidate) {
        self.handed_back = Some(c);
    }

    /// The handed-back connection `next` returned as `conn`, if it was one.
    pub(super) fn claim(&mut self, conn: &Connection) -> Option<Candidate> {
        self.claimable
            .take()
            .filter(|c| c.conn.stable_id() == conn.stable_id())
    }

    /// While `reason` is `Some`, authenticated peers are closed at once with
    /// [`ErrorCode::Busy`] and that reason, instead of being handed over.
    pub fn set_busy(&self, reason: Option<String>) {
        self.busy_switch().set(reason);
    }

    /// A handle that sets [`Acceptor::set_busy`] from elsewhere (a session's hook).
    pub fn busy_switch(&self) -> BusySwitch {
        BusySwitch(self.shared.clone())
    }

    /// What was done so far.
    pub fn counts(&self) -> AcceptCounts {
        let c = &self.shared.counts;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        AcceptCounts {
            retried: get(&c.retried),
            ignored: get(&c.ignored),
            ignored_per_peer: get(&c.ignored_per_peer),
            stale_given_up: get(&c.stale_given_up),
            failed: get(&c.failed),
            busy: get(&c.busy),
            accepted: get(&c.accepted),
        }
    }
}

/// Sets whether an [`Acceptor`] turns authenticated peers away as busy.
#[derive(Clone)]
pub struct BusySwitch(Arc<Shared>);

impl BusySwitch {
    /// See [`Acceptor::set_busy`].
    pub fn set(&self, reason: Option<String>) {
        *self.0.busy.lock().unwrap_or_else(|p| p.into_inner()) = reason;
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(
    endpoint: Endpoint,
    limits: AcceptLimits,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Connection>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_handshakes.max(1)));
    let mut handshakes = tokio::task::JoinSet::new();
    while let Some(incoming) = endpoint.accept().await {
        // Reap finished handshake tasks so the set does not grow with every attempt.
        while handshakes.try_join_next().is_some() {}
        if !incoming.remote_address_validated() && incoming.may_retry() {
            // Stateless: the Retry carries everything needed to validate the next Initial.
            if incoming.retry().is_ok() {
                shared.counts.retried.fetch_add(1, Ordering::Relaxed);
            }
            continue;
        }
        let peer = peer_of(incoming.remote_address());
        let Some(peer_slot) = PeerSlot::take(&shared, peer, &limits) else {
            let n = shared
                .counts
                .ignored_per_peer
                .fetch_add(1, Ordering::Relaxed)
                + 1;
            if n.is_power_of_two() {
                tracing::warn!(%peer, ignored = n, "ignoring a handshake: this peer already has \
                    {} in progress", limits.max_handshakes_per_peer);
            }
            incoming.ignore();
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            let n = shared.counts.ignored.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(
                    ignored = n,
                    "ignoring a handshake: {} in progress",
                    limits.max_handshakes
                );
            }
            incoming.ignore();
            continue;
        };
        let id = peer_slot.id;
        let task = {
            let (shared, tx) = (shared.clone(), tx.clone());
            handshakes.spawn(async move {
                let _slot = slot;
                let peer = incoming.remote_address();
                let r = tokio::time::timeout(limits.handshake_timeout, handshake(incoming)).await;
                // The handshake is over: its peer's place is free (an authenticated
                // connection waiting for the caller is not given up for a newer attempt).
                drop(peer_slot);
                match r {
                    Ok(Ok(conn)) => hand_over(conn, &shared, &tx).await,
                    Ok(Err(e)) => refused(&shared, peer, &e.to_string()),
                    Err(_) => refused(&shared, peer, "the handshake timed out"),
                }
            })
        };
        PeerSlot::started(&shared, peer, id, task);
    }
    handshakes.abort_all();
}

/// Whom a handshake is counted against for [`AcceptLimits::max_handshakes_per_peer`]: an
/// IPv4 address (also when mapped into IPv6), or an IPv6 address's /64, the least a
/// host is given, so that one host's many addresses count as one.
pub fn peer_of(addr: SocketAddr) -> IpAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

/// One of a peer's places among the handshakes in progress, given back when dropped.
struct PeerSlot {
    shared: Arc<Shared>,
    peer: IpAddr,
    id: u64,
}

impl PeerSlot {
    /// A place for `peer`: one of its [`AcceptLimits::max_handshakes_per_peer`], or the
    /// place of its oldest handshake if that one has run longer than
    /// [`AcceptLimits::handshake_stale_after`] (it is given up); else none.
    fn take(shared: &Arc<Shared>, peer: IpAddr, limits: &AcceptLimits) -> Option<PeerSlot> {
        let mut map = shared.handshaking.lock().unwrap_or_else(|p| p.into_inner());
        let list = map.entry(peer).or_default();
        if list.len() >= limits.max_handshakes_per_peer.max(1) {
            let (i, oldest) = list.iter().enumerate().min_by_key(|(_, h)| h.since)?;
            if oldest.since.elapsed() < limits.handshake_stale_after {
                return None;
            }
            if let Some(task) = list.swap_remove(i).task {
                task.abort();
            }
            shared.counts.stale_given_up.fetch_add(1, Ordering::Relaxed);
        }
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        list.push(InProgress {
            id,
            since: Instant::now(),
            task: None,
        });
        Some(PeerSlot {
            shared: shared.clone(),
            peer,
            id,
        })
    }

    /// The handshake with place `id` runs as `task` (unless it ended already).
    fn started(shared: &Shared, peer: IpAddr, id: u64, task: tokio::task::AbortHandle) {
        let mut map = shared.handshaking.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = map
            .get_mut(&peer)
            .and_then(|list| list.iter_mut().find(|h| h.id == id))
        {
            h.task = Some(task);
        }
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut map = self
            .shared
            .handshaking
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(list) = map.get_mut(&self.peer) {
            // Not there if it was given up for a newer one.
            list.retain(|h| h.id != self.id);
            if list.is_empty() {
                map.remove(&self.peer);
            }
        }
    }
}

async fn handshake(incoming: Incoming) -> Result<Connection, quinn::ConnectionError> {
    incoming.accept()?.await
}

fn refused(shared: &Shared, peer: SocketAddr, why: &str) {
    shared.counts.failed.fetch_add(1, Ordering::Relaxed);
    // A flood of unpinned peers must not become a flood of log lines: the 1st, 2nd, 4th,
    // 8th, ... since the last peer handed over are warnings with that count, the rest
    // debug; so after a flood the next refusal is a warning again.
    let n = shared.refused_lately.fetch_add(1, Ordering::Relaxed) + 1;
    if n.is_power_of_two() {
        tracing::warn!(%peer, refused = n, "refused a connection: {why}");
    } else {
        tracing::debug!(%peer, refused = n, "refused a connection: {why}");
    }
}

async fn hand_over(conn: Connection, shared: &Shared, tx: &mpsc::Sender<Connection>) {
    let busy = shared
        .busy
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if let Some(reason) = busy {
        shared.counts.busy.fetch_add(1, Ordering::Relaxed);
        tracing::info!(peer = %conn.remote_address(), "refused a peer: {reason}");
        conn.close(VarInt::from_u32(ErrorCode::Busy as u32), reason.as_bytes());
        return;
    }
    shared.counts.accepted.fetch_add(1, Ordering::Relaxed);
    shared.refused_lately.store(0, Ordering::Relaxed);
    // A closed receiver means the caller stopped listening; the connection just drops.
    let _ = tx.send(conn).await;
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Condvar;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};

    use super::*;
    use crate::quic;
    use crate::tls::{CertificateDer, Identity, ALPN};

    #[test]
    fn a_peer_is_an_ipv4_address_or_an_ipv6_slash_64() {
        let peer = |s: &str| peer_of(s.parse().unwrap());
        assert_eq!(peer("192.0.2.7:4433"), peer("192.0.2.7:9"));
        assert_ne!(peer("192.0.2.7:4433"), peer("192.0.2.8:4433"));
        assert_eq!(peer("[::ffff:192.0.2.7]:1"), peer("192.0.2.7:2"));
        assert_eq!(
            peer("[2001:db8:1:2:aaaa::1]:1"),
            peer("[2001:db8:1:2:bbbb::9]:2")
        );
        assert_ne!(peer("[2001:db8:1:2::1]:1"), peer("[2001:db8:1:3::1]:1"));
    }

    /// Whether the stalled clients may go on, and how many got as far as the listener's
    /// certificate (their handshake holds a place from then on).
    #[derive(Debug, Default)]
    struct Stall {
        released: Mutex<bool>,
        wake: Condvar,
        entered: AtomicUsize,
    }

    /// A client's certificate check that waits until the test releases it (at most 30 s),
    /// then fails: the listener's handshake, past address validation, hears nothing more.
    #[derive(Debug)]
    struct Stalling(Arc<Stall>);

    impl ServerCertVerifier for Stalling {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            let stall = &self.0;
            stall.entered.fetch_add(1, Ordering::AcqRel);
            let released = stall.released.lock().unwrap();
            let _ = stall
                .wake
                .wait_timeout_while(released, Duration::from_secs(30), |r| !*r)
                .unwrap();
            Err(rustls::Error::General("released".into()))
        }

        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::General("not reached".into()))
        }

        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::General("not reached".into()))
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    /// A client from `ip` that passes address validation and then stalls its handshake
    /// until `stall` is released, on a thread of its own (its check blocks the thread).
    fn stalled_client(ip: &str, to: SocketAddr, stall: Arc<Stall>) -> std::thread::JoinHandle<()> {
        let bind: SocketAddr = format!("{ip}:0").parse().unwrap();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let mut tls = rustls::ClientConfig::builder_with_provider(provider)
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .unwrap()
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(Stalling(stall)))
                    .with_no_client_auth();
                tls.alpn_protocols = vec![ALPN.to_vec()];
                let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
                let mut ep = Endpoint::client(bind).unwrap();
                ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
                let _ = ep.connect(to, "faultline").unwrap().await;
            });
        })
    }

    /// A listener on loopback with `limits`, its identity and the pinned client's.
    fn listener(limits: AcceptLimits) -> (Identity, Identity, SocketAddr, Acceptor) {
        let (server, client) = (
            Identity::generate("dest").unwrap(),
            Identity::generate("source").unwrap(),
        );
        let ep =
            quic::server_endpoint("127.0.0.1:0".parse().unwrap(), &server, client.cert.clone())
                .unwrap();
        let addr = ep.local_addr().unwrap();
        (server, client, addr, Acceptor::start(ep, limits))
    }

    /// The pinned `client`, from `ip`, connects while the stalled clients hold their places
    /// (at most 5 s, and as many for the listener to hand it over); then they are released.
    /// How many had stalled by the time it was through, or why it was not.
    async fn pinned_connects_beside(
        ip: &str,
        (server, client, addr): (&Identity, &Identity, SocketAddr),
        acceptor: &mut Acceptor,
        stall: &Stall,
        stalled_threads: Vec<std::thread::JoinHandle<()>>,
    ) -> Result<usize, String> {
        let bind = format!("{ip}:0").parse().unwrap();
        let ep = quic::client_endpoint(bind, client, server.cert.clone()).unwrap();
        let (conn, got) = tokio::join!(
            tokio::time::timeout(Duration::from_secs(5), quic::connect(&ep, addr)),
            tokio::time::timeout(Duration::from_secs(5), acceptor.next()),
        );
        let entered = stall.entered.load(Ordering::Acquire);
        *stall.released.lock().unwrap() = true;
        stall.wake.notify_all();
        for t in stalled_threads {
            t.join().unwrap();
        }
        conn.map_err(|_| "kept waiting")?
            .map_err(|e| e.to_string())?;
        got.map_err(|_| "not handed over")?
            .ok_or("the endpoint closed")?;
        Ok(entered)
    }

    /// Waits (at most 10 s) until `n` stalled clients hold places and `ignored` attempts of
    /// theirs were ignored for their peer's bound.
    async fn stalled(stall: &Stall, acceptor: &Acceptor, n: usize, ignored: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while stall.entered.load(Ordering::Acquire) < n
            || acceptor.counts().ignored_per_peer < ignored
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} stalled, {:?}",
                stall.entered.load(Ordering::Acquire),
                acceptor.counts()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A peer at its bound, both its handshakes stalled (a source's reconnect attempts
    /// caught in a flapping link's gaps), gets a new one in place of the oldest once that
    /// has run `handshake_stale_after`, rather than being kept out until they time out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_whose_handshakes_stalled_gets_a_new_one_in_place_of_the_oldest() {
        let (server, client, addr, mut acceptor) = listener(AcceptLimits {
            max_handshakes: 4,
            max_handshakes_per_peer: 2,
            handshake_timeout: Duration::from_secs(30),
            handshake_stale_after: Duration::from_millis(300),
        });
        let stall = Arc::new(Stall::default());
        let stalled_threads: Vec<_> = (0..2)
            .map(|_| stalled_client("127.0.0.3", addr, stall.clone()))
            .collect();
        stalled(&stall, &acceptor, 2, 0).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        // The same address: the peer whose places the stalled handshakes hold.
        let ends = (&server, &client, addr);
        pinned_connects_beside("127.0.0.3", ends, &mut acceptor, &stall, stalled_threads)
            .await
            .expect("kept out by its own stalled handshakes");
        let c = acceptor.counts();
        assert!(c.stale_given_up >= 1, "{c:?}");
        assert_eq!(c.accepted, 1, "{c:?}");
    }

    /// One host stalling more handshakes than its share holds its share of the places,
    /// and the real peer, from another address, still gets one at once. (With the whole
    /// bound open to one peer, the stalled clients take every place and the real peer's
    /// Initials go unanswered until their handshakes time out.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_host_that_stalls_its_handshakes_holds_only_its_share_of_the_places() {
        let (server, client, addr, mut acceptor) = listener(AcceptLimits {
            max_handshakes: 4,
            max_handshakes_per_peer: 2,
            handshake_timeout: Duration::from_secs(30),
            // The stalled clients' retransmissions must not take the places over.
            handshake_stale_after: Duration::from_secs(30),
        });
        let stall = Arc::new(Stall::default());
        let stalled_threads: Vec<_> = (0..5)
            .map(|_| stalled_client("127.0.0.2", addr, stall.clone()))
            .collect();
        // Two handshakes of theirs hold places; the other three are ignored.
        stalled(&stall, &acceptor, 2, 3).await;
        let ends = (&server, &client, addr);
        let entered =
            pinned_connects_beside("127.0.0.1", ends, &mut acceptor, &stall, stalled_threads)
                .await
                .expect("the real peer");
        assert_eq!(entered, 2, "the stalling host got more than its share");
        let c = acceptor.counts();
        assert_eq!((c.accepted, c.ignored), (1, 0), "{c:?}");
    }
}
