//! `faultline replicate --control ADDR`: the endpoint the orchestrator (`faultline
//! evacuate`) drives a source through. QUIC with mutual TLS like every other endpoint of
//! faultline (the `transport` crate's pinned-certificate server endpoint and its
//! [`Acceptor`]: address validation, bounded handshakes, only the pinned orchestrator gets
//! through). The protocol is `fleet::control`: `Status`; `Evacuate`, which starts the
//! evacuation as SIGUSR1 does and streams events back until it is done or failed; and
//! `SetRate`, which changes the evacuation's rate limit (a [`RateLimit`] the evacuation's
//! connection follows from its next acknowledgement).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fleet::control::{EvacState, Reply, Request, Status, EVENT_INTERVAL_MS};
use tokio::sync::{watch, Notify};
use transport::quic::accept::{AcceptLimits, Acceptor};
use transport::quic::RateLimit;
use transport::tls::{CertificateDer, Identity};

use super::control_io::{read_msg, write_msg};

/// How long a peer may take to send its request on a new stream.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`ControlServer::finish`] waits for the last events to reach the orchestrator.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(3);

/// The running endpoint; the VM's status is published through it.
pub struct ControlServer {
    runtime: tokio::runtime::Runtime,
    endpoint: quinn::Endpoint,
    status: Arc<watch::Sender<Status>>,
    streams: Arc<Streams>,
    addr: SocketAddr,
}

/// Evacuation streams still delivering events, and connections still open.
#[derive(Default)]
struct Streams {
    open: AtomicUsize,
    connections: AtomicUsize,
    closed: Notify,
}

impl Streams {
    fn ended(&self, count: &AtomicUsize) {
        count.fetch_sub(1, Ordering::AcqRel);
        self.closed.notify_waiters();
    }
}

impl ControlServer {
    /// Listens on `listen`, presenting `me` and accepting only `orchestrator`. `evacuate`
    /// runs when an `Evacuate` request arrives (it sets the same flag as SIGUSR1); the
    /// rate caps the orchestrator asks for go to `limit`.
    pub fn start(
        listen: SocketAddr,
        me: &Identity,
        orchestrator: CertificateDer<'static>,
        initial: Status,
        limit: RateLimit,
        evacuate: fn(),
    ) -> anyhow::Result<ControlServer> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("control")
            .enable_all()
            .build()
            .context("starting the control endpoint's runtime")?;
        let endpoint = {
            let _guard = runtime.enter();
            transport::quic::control_server_endpoint(listen, me, orchestrator)
                .with_context(|| format!("binding the control endpoint on {listen}"))?
        };
        let addr = endpoint.local_addr().context("the control endpoint")?;
        let status = Arc::new(watch::Sender::new(initial));
        let streams = Arc::new(Streams::default());
        let acceptor = {
            let _guard = runtime.enter();
            Acceptor::start(endpoint.clone(), AcceptLimits::default())
        };
        let shared = Arc::new(Shared {
            status: status.clone(),
            streams: streams.clone(),
            limit,
            evacuate,
        });
        runtime.spawn(serve(acceptor, shared));
        Ok(ControlServer {
            runtime,
            endpoint,
            status,
            streams,
            addr,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes the published status; watchers see the change.
    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        self.status.send_modify(f);
    }

    /// A handle to update the status from elsewhere (a progress callback).
    pub fn publisher(&self) -> Arc<watch::Sender<Status>> {
        self.status.clone()
    }

    /// Waits (a few seconds at most) until every evacuation stream delivered its last
    /// event and every peer hung up, then closes the endpoint. An orchestrator following
    /// the evacuation hangs up at its last event; one that only asks for the status (the
    /// evacuation was started by SIGUSR1 or a timer) does so once it has seen how it ended.
    pub fn finish(self) {
        let streams = self.streams.clone();
        self.runtime.block_on(async {
            let _ = tokio::time::timeout(FLUSH_TIMEOUT, async {
                loop {
                    let closed = streams.closed.notified();
                    if streams.open.load(Ordering::Acquire) == 0
                        && streams.connections.load(Ordering::Acquire) == 0
                    {
                        return;
                    }
                    closed.await;
                }
            })
            .await;
            self.endpoint.close(0u32.into(), b"done");
            let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        });
        self.runtime.shutdown_timeout(Duration::from_millis(200));
    }
}

/// What every control stream's task works with.
struct Shared {
    status: Arc<watch::Sender<Status>>,
    streams: Arc<Streams>,
    limit: RateLimit,
    evacuate: fn(),
}

async fn serve(mut acceptor: Acceptor, shared: Arc<Shared>) {
    while let Some(conn) = acceptor.next().await {
        let shared = shared.clone();
        shared.streams.connections.fetch_add(1, Ordering::AcqRel);
        tokio::spawn(async move {
            // The evacuation's limit before this orchestrator first changed it.
            let paced = Arc::new(Paced::default());
            while let Ok((send, recv)) = conn.accept_bi().await {
                let shared = shared.clone();
                let paced = paced.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(send, recv, &shared, &paced).await {
                        tracing::warn!("control stream: {e:#}");
                    }
                });
            }
            // The orchestrator that shared the link by these limits is gone (it ended, or
            // gave up on this VM): nobody shares it for us any more, so a limit it left
            // lower than the evacuation's own (a VM held behind another at a twentieth of
            // the link) must not outlive it. One it lifted or raised stays.
            if let Some(before) = paced.before() {
                let now = shared.limit.get();
                let lower = match (now, before) {
                    (Some(now), Some(own)) => now < own,
                    (Some(_), None) => true,
                    (None, _) => false,
                };
                if lower {
                    shared.limit.set(before);
                    tracing::info!(
                        ?before,
                        "the orchestrator is gone: the evacuation's own rate limit is back"
                    );
                }
            }
            shared.streams.ended(&shared.streams.connections);
        });
    }
}

/// The evacuation's rate limit before one orchestrator's connection first changed it.
#[derive(Default)]
struct Paced(std::sync::Mutex<Option<Option<u64>>>);

impl Paced {
    /// Keeps `limit` as it is now, unless a limit was kept already.
    fn remember(&self, limit: &RateLimit) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g.get_or_insert(limit.get());
    }

    /// The limit kept, if the connection changed it.
    fn before(&self) -> Option<Option<u64>> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One request and its answer.
async fn answer(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    shared: &Shared,
    paced: &Paced,
) -> anyhow::Result<()> {
    let Shared {
        status,
        streams,
        limit,
        evacuate,
    } = shared;
    let req = tokio::time::timeout(REQUEST_TIMEOUT, read_msg::<Request>(&mut recv))
        .await
        .context("no request within 10 s")??;
    match req {
        None => Ok(()),
        Some(Request::Status) => {
            let now = status.borrow().clone().stamped();
            write_msg(&mut send, &Reply::Status(now)).await?;
            let _ = send.finish();
            Ok(())
        }
        Some(Request::SetRate { rate_cap_bps }) => {
            paced.remember(limit);
            limit.set(rate_cap_bps);
            tracing::debug!(?rate_cap_bps, "evacuation rate limit set");
            write_msg(
                &mut send,
                &Reply::RateSet {
                    rate_cap_bps: limit.get(),
                },
            )
            .await?;
            let _ = send.finish();
            Ok(())
        }
        Some(Request::Evacuate { rate_cap_bps }) => {
            if rate_cap_bps.is_some() {
                paced.remember(limit);
                limit.set(rate_cap_bps);
            }
            evacuate();
            streams.open.fetch_add(1, Ordering::AcqRel);
            let r = events(&mut send, status).await;
            let _ = send.finish();
            // Until the orchestrator has the last event (or gives up).
            let _ = tokio::time::timeout(FLUSH_TIMEOUT, send.stopped()).await;
            streams.ended(&streams.open);
            r
        }
    }
}

/// `Accepted`, then an event at every change of the evacuation's state and every
/// [`EVENT_INTERVAL_MS`], until it is done or failed.
async fn events(
    send: &mut quinn::SendStream,
    status: &watch::Sender<Status>,
) -> anyhow::Result<()> {
    write_msg(
        send,
        &Reply::Accepted {
            rate_cap_honoured: true,
        },
    )
    .await?;
    let mut rx = status.subscribe();
    let interval = Duration::from_millis(EVENT_INTERVAL_MS);
    loop {
        let now = rx.borrow_and_update().clone().stamped();
        let state = now.evacuation;
        write_msg(send, &Reply::Event(now)).await?;
        if state.is_final() {
            return Ok(());
        }
        let next = tokio::time::Instant::now() + interval;
        loop {
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        // The process is ending without a final state.
                        let mut last = rx.borrow().clone();
                        last.evacuation = EvacState::Failed;
                        last.error.get_or_insert_with(|| "the source stopped".into());
                        write_msg(send, &Reply::Event(last)).await?;
                        return Ok(());
                    }
                    if rx.borrow_and_update().evacuation != state {
                        break;
                    }
                }
                _ = tokio::time::sleep_until(next) => break,
            }
        }
    }
}
