//! `faultline replicate --control ADDR`: the endpoint the orchestrator (`faultline
//! evacuate`) drives a source through. QUIC with mutual TLS like every other endpoint of
//! faultline (the `transport` crate's pinned-certificate server endpoint and its
//! [`Acceptor`]: address validation, bounded handshakes, only the pinned orchestrator gets
//! through). The protocol is `fleet::control`: `Status`; `Evacuate`, which starts the
//! evacuation as SIGUSR1 does and streams events back until it is done or failed; and
//! `SetRate`, which changes the evacuation's rate limit (a [`RateLimit`] the evacuation's
//! connection follows from its next acknowledgement) within the evacuation's own.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fleet::control::{
    EvacState, Reply, Request, Status, CLOSE_TOO_MANY, EVENT_INTERVAL_MS, MAX_CONTROL_CONNECTIONS,
    RESET_EVENTS_UNREAD,
};
use tokio::sync::{watch, Notify};
use transport::quic::accept::{AcceptLimits, Acceptor};
use transport::quic::RateLimit;
use transport::tls::{CertificateDer, Identity};

use super::control_io::{read_msg, write_msg};

mod pacing;
use pacing::{Paced, Pacing};

/// How long a peer may take to send its request on a new stream.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one event may wait for stream credit: the orchestrator reads every event as
/// it comes (its silence timeout fails a VM whose events stop for a few seconds), so a
/// stream whose window (`transport::quic::CONTROL_STREAM_WINDOW`, a few hundred events)
/// filled and stays full this long has an orchestrator that stopped reading.
const EVENT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Why a connection beyond [`MAX_CONTROL_CONNECTIONS`] is closed, as its peer reads it.
const TOO_MANY_REASON: &str = "too many control connections open to this source";
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
        mut initial: Status,
        limit: RateLimit,
        evacuate: fn(),
    ) -> anyhow::Result<ControlServer> {
        // Every status says it (its updates change other fields).
        initial.own_rate_cap_bps = limit.get();
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
            pacing: Pacing::new(limit),
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
    pacing: Pacing,
    evacuate: fn(),
}

async fn serve(mut acceptor: Acceptor, shared: Arc<Shared>) {
    let mut turned_away = 0u64;
    while let Some(conn) = acceptor.next().await {
        let shared = shared.clone();
        // Only this task adds to the count, so it cannot pass the bound between the load
        // and the add.
        if shared.streams.connections.load(Ordering::Acquire) >= MAX_CONTROL_CONNECTIONS {
            turned_away += 1;
            // A peer that reconnects in a loop must not flood the log: the 1st, 2nd, 4th...
            if turned_away.is_power_of_two() {
                tracing::warn!(
                    peer = %conn.remote_address(),
                    turned_away,
                    "a control connection beyond the {MAX_CONTROL_CONNECTIONS} open: turned away"
                );
            }
            conn.close(CLOSE_TOO_MANY.into(), TOO_MANY_REASON.as_bytes());
            continue;
        }
        shared.streams.connections.fetch_add(1, Ordering::AcqRel);
        // A later flood is logged from its first again.
        turned_away = 0;
        tokio::spawn(async move {
            // What this orchestrator set.
            let paced = Arc::new(Paced::default());
            let end = loop {
                match conn.accept_bi().await {
                    Ok((send, recv)) => {
                        let shared = shared.clone();
                        let paced = paced.clone();
                        tokio::spawn(async move {
                            if let Err(e) = answer(send, recv, &shared, &paced).await {
                                tracing::warn!("control stream: {e:#}");
                            }
                        });
                    }
                    Err(e) => break e,
                }
            };
            let gave_up = matches!(&end, quinn::ConnectionError::ApplicationClosed(c)
                if c.error_code == fleet::control::CLOSE_GAVE_UP.into());
            // The orchestrator that shared the link by its limits is gone (it ended, or
            // crashed): see `Pacing::hang_up`.
            if shared.pacing.hang_up(&paced, gave_up) {
                tracing::info!(
                    own = ?shared.pacing.own(),
                    "the orchestrator is gone: the evacuation's own rate limit is back"
                );
            }
            shared.streams.ended(&shared.streams.connections);
        });
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
        pacing,
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
        Some(Request::SetRate { rate_cap_bps, seq }) => {
            let (applied, in_force) = pacing.set_rate(paced, seq, rate_cap_bps);
            if applied {
                tracing::debug!(?rate_cap_bps, ?seq, "evacuation rate limit set");
            } else {
                // Its answer says the limit in force; the orchestrator stopped waiting for
                // it when it sent the newer one.
                tracing::debug!(?rate_cap_bps, ?seq, "an older rate limit, not applied");
            }
            let reply = Reply::RateSet {
                rate_cap_bps: in_force,
                seq,
            };
            // An orchestrator that gave up waiting (it asked again, or sent a newer limit)
            // stopped reading: nothing to warn of.
            if let Err(e) = write_msg(&mut send, &reply).await {
                tracing::debug!(?seq, "the answer to a rate limit: {e:#}");
            }
            let _ = send.finish();
            Ok(())
        }
        Some(Request::Evacuate { rate_cap_bps }) => {
            if !pacing.evacuate(paced, rate_cap_bps) {
                tracing::debug!(?rate_cap_bps, "a newer rate limit came first: kept");
            }
            evacuate();
            streams.open.fetch_add(1, Ordering::AcqRel);
            let r = events(&mut send, status, EVENT_WRITE_TIMEOUT).await;
            if r.is_ok() {
                let _ = send.finish();
                // Until the orchestrator has the last event (or gives up).
                let _ = tokio::time::timeout(FLUSH_TIMEOUT, send.stopped()).await;
            }
            streams.ended(&streams.open);
            r
        }
    }
}

/// `Accepted`, then an event at every change of the evacuation's state, when its last
/// pages have left (`pages_remaining` reaches 0: the orchestrator hands the link on then),
/// and every [`EVENT_INTERVAL_MS`], until it is done or failed. A write that waits for the
/// orchestrator longer than `write_timeout` ends the stream with a reset of code
/// [`RESET_EVENTS_UNREAD`], so the orchestrator learns why; one that fails otherwise, with
/// code 0.
async fn events(
    send: &mut quinn::SendStream,
    status: &watch::Sender<Status>,
    write_timeout: Duration,
) -> anyhow::Result<()> {
    let r = write_events(send, status, write_timeout).await;
    if let Err(e) = &r {
        // Nothing more will be written, nor what waits in it read.
        let code = if e.is::<Unread>() {
            RESET_EVENTS_UNREAD
        } else {
            0
        };
        let _ = send.reset(code.into());
    }
    r
}

/// An event the orchestrator did not take within the write timeout.
#[derive(Debug, thiserror::Error)]
#[error("the orchestrator took no event for {} s", .0.as_secs_f64())]
struct Unread(Duration);

async fn write_events(
    send: &mut quinn::SendStream,
    status: &watch::Sender<Status>,
    write_timeout: Duration,
) -> anyhow::Result<()> {
    let accepted = Reply::Accepted {
        rate_cap_honoured: true,
    };
    write_within(send, &accepted, write_timeout).await?;
    let mut rx = status.subscribe();
    let interval = Duration::from_millis(EVENT_INTERVAL_MS);
    loop {
        let now = rx.borrow_and_update().clone().stamped();
        let state = now.evacuation;
        let all_sent = sent_all(&now);
        write_within(send, &Reply::Event(now), write_timeout).await?;
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
                        write_within(send, &Reply::Event(last), write_timeout).await?;
                        return Ok(());
                    }
                    let s = rx.borrow_and_update();
                    if s.evacuation != state || (!all_sent && sent_all(&s)) {
                        break;
                    }
                }
                _ = tokio::time::sleep_until(next) => break,
            }
        }
    }
}

/// Writes `reply`, waiting at most `within` for the orchestrator to take it: one that stops
/// reading while its connection lives would otherwise hold the writing task for good.
async fn write_within(
    send: &mut quinn::SendStream,
    reply: &Reply,
    within: Duration,
) -> anyhow::Result<()> {
    match tokio::time::timeout(within, write_msg(send, reply)).await {
        Ok(written) => written,
        Err(_) => Err(Unread(within).into()),
    }
}

/// A transfer whose last pages have left: what an orchestrator waits for to hand the link
/// on, so it is reported at once rather than at the next interval.
fn sent_all(s: &Status) -> bool {
    s.evacuation == EvacState::Transferring && s.pages_remaining == Some(0)
}

/// A source's control endpoint in process, for the tests here and the orchestrator's.
#[cfg(test)]
pub(crate) struct TestEndpoint {
    pub(crate) server: ControlServer,
    /// The evacuation's rate limit, as the endpoint sets it.
    pub(crate) limit: RateLimit,
    source: Identity,
    orchestrator: Identity,
}

#[cfg(test)]
impl TestEndpoint {
    /// An endpoint whose evacuation has a limit of its own, `own`, and an idle status.
    pub(crate) fn start(own: Option<u64>) -> TestEndpoint {
        let (source, orchestrator) = (
            Identity::generate("source").unwrap(),
            Identity::generate("orchestrator").unwrap(),
        );
        let limit = RateLimit::new(own);
        let server = ControlServer::start(
            "127.0.0.1:0".parse().unwrap(),
            &source,
            orchestrator.cert.clone(),
            super::replica::idle_status_of("vm", 1 << 20),
            limit.clone(),
            || {},
        )
        .unwrap();
        TestEndpoint {
            server,
            limit,
            source,
            orchestrator,
        }
    }

    /// The orchestrator's endpoint to reach it (within a tokio runtime).
    pub(crate) fn orchestrator(&self) -> quinn::Endpoint {
        transport::quic::control_client_endpoint(
            "127.0.0.1:0".parse().unwrap(),
            &self.orchestrator,
            self.source.cert.clone(),
        )
        .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source's control endpoint, with its own rate limit `own`, and an orchestrator's
    /// connection to it, in process.
    struct Harness {
        rt: tokio::runtime::Runtime,
        server: ControlServer,
        ep: quinn::Endpoint,
        conn: quinn::Connection,
        limit: RateLimit,
    }

    impl Harness {
        fn new(own: Option<u64>) -> Harness {
            let endpoint = TestEndpoint::start(own);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let (ep, conn) = rt.block_on(async {
                let ep = endpoint.orchestrator();
                let conn = transport::quic::connect(&ep, endpoint.server.local_addr())
                    .await
                    .unwrap();
                (ep, conn)
            });
            let TestEndpoint { server, limit, .. } = endpoint;
            Harness {
                rt,
                server,
                ep,
                conn,
                limit,
            }
        }

        /// The first answer to `req`, on a stream of its own.
        fn ask(&self, req: &Request) -> Option<Reply> {
            self.rt.block_on(async {
                let (mut send, mut recv) = self.conn.open_bi().await.unwrap();
                write_msg(&mut send, req).await.unwrap();
                read_msg(&mut recv).await.unwrap()
            })
        }

        fn set_rate(&self, cap: Option<u64>, seq: Option<u64>) -> Option<Reply> {
            self.ask(&Request::SetRate {
                rate_cap_bps: cap,
                seq,
            })
        }

        /// Closes the connection with `code`; the limit in force once the endpoint has
        /// seen the close.
        fn close(self, code: u32) -> Option<u64> {
            self.conn.close(code.into(), b"test");
            self.rt.block_on(self.ep.wait_idle());
            // The endpoint counts the connection out once it has acted on its end.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while self.server.streams.connections.load(Ordering::Acquire) > 0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the close was not seen"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            let after = self.limit.get();
            self.server.finish();
            after
        }
    }

    /// A source's control endpoint with its own limit of 10 Mbit/s, an orchestrator that
    /// holds it to 2 Mbit/s and then closes its connection with `code`: the limit in
    /// force once the endpoint has seen the close.
    fn limit_after_a_hold_and_a_close(code: u32) -> Option<u64> {
        let h = Harness::new(Some(10_000_000));
        assert_eq!(
            h.set_rate(Some(2_000_000), Some(1)),
            Some(Reply::RateSet {
                rate_cap_bps: Some(2_000_000),
                seq: Some(1),
            })
        );
        assert_eq!(h.limit.get(), Some(2_000_000));
        h.close(code)
    }

    /// Over QUIC, each request on its stream: the answer echoes the place and says the
    /// limit in force; one arriving after a newer one leaves that in force (the rules
    /// themselves: `pacing::tests`).
    #[test]
    fn a_rate_limit_arriving_after_a_newer_one_is_answered_with_the_newer() {
        let in_force = |cap: Option<u64>, seq: u64| {
            Some(Reply::RateSet {
                rate_cap_bps: cap,
                seq: Some(seq),
            })
        };
        let h = Harness::new(Some(10_000_000));
        // Its status says its own limit, which a lifted hold goes back to.
        match h.ask(&Request::Status) {
            Some(Reply::Status(s)) => assert_eq!(s.own_rate_cap_bps, Some(10_000_000)),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            h.set_rate(Some(3_000_000), Some(2)),
            in_force(Some(3_000_000), 2)
        );
        // The first copy of the one before, asked again and answered meanwhile.
        assert_eq!(
            h.set_rate(Some(1_000_000), Some(1)),
            in_force(Some(3_000_000), 1)
        );
        // The evacuation's request, overtaken by the limit sent after it.
        assert_eq!(
            h.ask(&Request::Evacuate {
                rate_cap_bps: Some(5_000_000)
            }),
            Some(Reply::Accepted {
                rate_cap_honoured: true
            })
        );
        assert_eq!(h.limit.get(), Some(3_000_000));
        // A lift goes back to the own limit, and nothing raises it (`fleet::control::within_own`).
        assert_eq!(h.set_rate(None, Some(3)), in_force(Some(10_000_000), 3));
        assert_eq!(
            h.set_rate(Some(50_000_000), Some(4)),
            in_force(Some(10_000_000), 4)
        );
        assert_eq!(h.close(0), Some(10_000_000), "nothing to take back");
    }

    /// The next event for which `want` holds, skipping the others (periodic events that a
    /// slow machine lets in between).
    async fn next_event(recv: &mut quinn::RecvStream, want: impl Fn(&Status) -> bool) -> Status {
        loop {
            match read_msg::<Reply>(recv).await.unwrap() {
                Some(Reply::Event(s)) if want(&s) => return s,
                Some(Reply::Event(_)) => {}
                other => panic!("{other:?}"),
            }
        }
    }

    /// The orchestrator hands the link on when a transfer's last pages have left, so that
    /// moment is an event of its own, not one of the periodic ones.
    #[test]
    fn the_last_pages_leaving_is_reported_at_once() {
        let h = Harness::new(None);
        let events = h.rt.block_on(async {
            let (mut send, mut recv) = h.conn.open_bi().await.unwrap();
            let req = Request::Evacuate { rate_cap_bps: None };
            write_msg(&mut send, &req).await.unwrap();
            let accepted: Option<Reply> = read_msg(&mut recv).await.unwrap();
            assert!(
                matches!(accepted, Some(Reply::Accepted { .. })),
                "{accepted:?}"
            );
            let idle = next_event(&mut recv, |_| true).await;
            h.server.update(|s| {
                s.evacuation = EvacState::Transferring;
                s.pages_remaining = Some(100);
            });
            let transferring =
                next_event(&mut recv, |s| s.evacuation == EvacState::Transferring).await;
            // None left is an event at once (fewer left is not: a periodic event may come
            // between, on a slow machine, and is skipped). Without it, the next event
            // would come about 250 ms after the last.
            h.server.update(|s| s.pages_remaining = Some(10));
            let asked = tokio::time::Instant::now();
            h.server.update(|s| s.pages_remaining = Some(0));
            next_event(&mut recv, |s| s.pages_remaining == Some(0)).await;
            let waited = asked.elapsed();
            h.server.update(|s| s.evacuation = EvacState::Done);
            let done = next_event(&mut recv, |s| s.evacuation.is_final()).await;
            (idle, transferring, waited, done)
        });
        let (idle, transferring, waited, done) = events;
        assert_eq!(idle.evacuation, EvacState::Idle);
        assert_eq!(transferring.pages_remaining, Some(100));
        assert!(
            waited < Duration::from_millis(EVENT_INTERVAL_MS * 4 / 5),
            "reported after {waited:?}, as a periodic event"
        );
        assert_eq!(done.evacuation, EvacState::Done);
        h.close(0);
    }

    /// Even the pinned orchestrator cannot open control connections without bound: one
    /// beyond the bound is closed with a reason that says why, and once one of those open
    /// ends, a new one is answered again.
    #[test]
    fn connections_beyond_the_bound_are_turned_away_with_a_reason() {
        let endpoint = TestEndpoint::start(None);
        let addr = endpoint.server.local_addr();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let test = async {
            let ep = endpoint.orchestrator();
            let status = |conn: quinn::Connection| async move {
                let (mut send, mut recv) = conn.open_bi().await?;
                write_msg(&mut send, &Request::Status).await?;
                read_msg::<Reply>(&mut recv).await
            };
            let mut open = Vec::new();
            for _ in 0..MAX_CONTROL_CONNECTIONS {
                let conn = transport::quic::connect(&ep, addr).await.unwrap();
                let answer = status(conn.clone()).await.unwrap();
                assert!(matches!(answer, Some(Reply::Status(_))), "{answer:?}");
                open.push(conn);
            }
            let extra = transport::quic::connect(&ep, addr).await.unwrap();
            assert!(
                status(extra.clone()).await.is_err(),
                "answered beyond the bound"
            );
            match extra.close_reason() {
                Some(quinn::ConnectionError::ApplicationClosed(c)) => {
                    assert_eq!(c.error_code, CLOSE_TOO_MANY.into());
                    assert_eq!(&c.reason[..], TOO_MANY_REASON.as_bytes());
                }
                other => panic!("closed with {other:?}"),
            }
            // One of those open hangs up: room for another.
            open.pop().unwrap().close(0u32.into(), b"bye");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while endpoint.server.streams.connections.load(Ordering::Acquire)
                >= MAX_CONTROL_CONNECTIONS
            {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the close was not seen"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let again = transport::quic::connect(&ep, addr).await.unwrap();
            let answer = status(again.clone()).await.unwrap();
            assert!(matches!(answer, Some(Reply::Status(_))), "{answer:?}");
            for conn in open.iter().chain([&again]) {
                conn.close(0u32.into(), b"done");
            }
            ep.wait_idle().await;
        };
        // Keep-alives hold an unanswered connection open: a regression fails, not hangs.
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(60), test).await })
            .expect("stuck");
        endpoint.server.finish();
    }

    /// An orchestrator that stops reading the events while its connection lives: the
    /// writes wait for stream credit at most the write timeout, then the events end with
    /// an error that says so, instead of holding the task for good.
    #[test]
    fn events_nobody_reads_end_after_the_write_timeout() {
        let (source, orchestrator) = (
            Identity::generate("source").unwrap(),
            Identity::generate("orchestrator").unwrap(),
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let ended = rt.block_on(async {
            let server = transport::quic::control_server_endpoint(
                "127.0.0.1:0".parse().unwrap(),
                &source,
                orchestrator.cert.clone(),
            )
            .unwrap();
            let client = transport::quic::control_client_endpoint(
                "127.0.0.1:0".parse().unwrap(),
                &orchestrator,
                source.cert.clone(),
            )
            .unwrap();
            let addr = server.local_addr().unwrap();
            let (conn, accepted) = tokio::join!(
                transport::quic::connect(&client, addr),
                transport::quic::accept(&server)
            );
            let (conn, accepted) = (conn.unwrap(), accepted.unwrap().unwrap());
            let (mut req, mut recv) = conn.open_bi().await.unwrap();
            write_msg(&mut req, &Request::Evacuate { rate_cap_bps: None })
                .await
                .unwrap();
            let (mut send, _) = accepted.accept_bi().await.unwrap();
            // Events of a few kilobytes each (a long error text), one at every change.
            let status = Arc::new(watch::Sender::new(Status {
                error: Some("x".repeat(2_000)),
                ..super::super::replica::idle_status_of("vm", 1 << 20)
            }));
            let events = tokio::spawn({
                let status = status.clone();
                async move { events(&mut send, &status, Duration::from_millis(300)).await }
            });
            // The orchestrator reads the first answer, then no more.
            let first: Option<Reply> = read_msg(&mut recv).await.unwrap();
            assert!(matches!(first, Some(Reply::Accepted { .. })), "{first:?}");
            let flipping = tokio::spawn(async move {
                for i in 0u32.. {
                    status.send_modify(|s| {
                        s.evacuation = if i % 2 == 0 {
                            EvacState::Starting
                        } else {
                            EvacState::Idle
                        }
                    });
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            });
            let ended = tokio::time::timeout(Duration::from_secs(20), events).await;
            flipping.abort();
            // What the orchestrator reads when it comes back: the stream reset, with the
            // code that says why.
            let reset = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    match read_msg::<Reply>(&mut recv).await {
                        Ok(Some(_)) => {}
                        other => break other,
                    }
                }
            })
            .await;
            conn.close(0u32.into(), b"done");
            (ended, reset)
        });
        let (ended, reset) = ended;
        let error = ended
            .expect("the events still waiting for a reader after 20 s")
            .unwrap()
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "the orchestrator took no event for 0.3 s"
        );
        let reset = reset
            .expect("the stream neither reset nor ended")
            .unwrap_err();
        assert!(
            matches!(
                reset.downcast_ref::<quinn::ReadExactError>(),
                Some(quinn::ReadExactError::ReadError(quinn::ReadError::Reset(code)))
                    if *code == RESET_EVENTS_UNREAD.into()
            ),
            "{reset:#}"
        );
    }

    #[test]
    fn a_hold_is_taken_back_when_the_orchestrator_hangs_up_but_not_when_it_gave_up() {
        assert_eq!(limit_after_a_hold_and_a_close(0), Some(10_000_000));
        assert_eq!(
            limit_after_a_hold_and_a_close(fleet::control::CLOSE_GAVE_UP),
            Some(2_000_000),
            "the VMs planned in its place have the link"
        );
    }
}
