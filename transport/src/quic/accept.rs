//! Accepting connections so that only authenticated peers reach the caller.
//!
//! A destination listens on a public address at the worst possible moment. Whoever can send
//! it UDP must not be able to end it, stall it, or make it hold state:
//!
//! * **Address validation first**: an Initial from an address that has not proved it can
//!   receive (no valid token) is answered with a stateless Retry and forgotten, so spoofed
//!   or replayed Initials cost one small packet and no memory.
//! * **Handshakes run concurrently**, at most [`AcceptLimits::max_handshakes`] at once,
//!   each bounded by [`AcceptLimits::handshake_timeout`]; beyond the bound new attempts are
//!   ignored. A handshake that fails (an unpinned certificate, garbage, a timeout) is
//!   logged and dropped; it never ends the listener.
//! * **Busy**: while the caller is in a session ([`Acceptor::set_busy`]), an authenticated
//!   peer is told at once, with [`ErrorCode::Busy`] and a reason, instead of waiting.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::{Connection, Endpoint, Incoming, VarInt};
use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;

use super::dest::Candidate;
use crate::message::ErrorCode;

/// Bounds on the handshakes an [`Acceptor`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcceptLimits {
    /// Most handshakes in progress at once; attempts beyond it are ignored (the peer's
    /// Initial goes unanswered, as if lost, and a real client retransmits it).
    pub max_handshakes: usize,
    /// Longest one handshake may take from its validated Initial to an authenticated
    /// connection.
    pub handshake_timeout: Duration,
}

impl Default for AcceptLimits {
    fn default() -> Self {
        AcceptLimits {
            // Enough that a flood of unauthenticated handshakes does not crowd out the real
            // peer (an ignored Initial costs it a ~1 s retransmission timeout): with 64, the
            // handshake_flood bench's real source waited ~1 s in half its rounds under 1,000
            // unpinned clients. A pending handshake holds a few kilobytes.
            max_handshakes: 1024,
            handshake_timeout: Duration::from_secs(10),
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
    failed: AtomicU64,
    busy: AtomicU64,
    accepted: AtomicU64,
}

struct Shared {
    counts: Counters,
    /// While `Some`, authenticated peers are closed with this reason.
    busy: Mutex<Option<String>>,
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
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            shared.counts.ignored.fetch_add(1, Ordering::Relaxed);
            incoming.ignore();
            continue;
        };
        let (shared, tx) = (shared.clone(), tx.clone());
        handshakes.spawn(async move {
            let _slot = slot;
            let peer = incoming.remote_address();
            match tokio::time::timeout(limits.handshake_timeout, handshake(incoming)).await {
                Ok(Ok(conn)) => hand_over(conn, &shared, &tx).await,
                Ok(Err(e)) => refused(&shared, peer, &e.to_string()),
                Err(_) => refused(&shared, peer, "the handshake timed out"),
            }
        });
    }
    handshakes.abort_all();
}

async fn handshake(incoming: Incoming) -> Result<Connection, quinn::ConnectionError> {
    incoming.accept()?.await
}

fn refused(shared: &Shared, peer: SocketAddr, why: &str) {
    shared.counts.failed.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(%peer, "refused a connection: {why}");
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
    // A closed receiver means the caller stopped listening; the connection just drops.
    let _ = tx.send(conn).await;
}
