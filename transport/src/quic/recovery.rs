//! What both drivers share to let a session outlive its connection (docs/recovery.md): which
//! failures are a lost connection (the session pauses) rather than the end of the session,
//! the source's reconnect with backoff, and the timing of pauses for the reports.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::{Connection, Endpoint};

use super::frame::FrameError;
use super::{connect, DriverError};

/// A new reconnect attempt starts this often while none succeeded: the link may come back
/// at any moment, and an attempt whose Initial was lost only retransmits it on QUIC's
/// backed-off timer (about 1 s, then 2 s), so a fresh attempt is what notices the link is
/// back within this interval.
pub const ATTEMPT_INTERVAL: Duration = Duration::from_millis(25);
/// Longest one connection attempt may take: a handshake whose packets are lost is given
/// up after this, rather than left to back off for QUIC's idle timeout. With
/// [`ATTEMPT_INTERVAL`], at most 80 attempts are under way at once (an Initial of 1,200
/// bytes each, and their retransmissions: about 100 kB/s while the link is down).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Keep-alive interval of every connection: both sides send at least this often, so a
/// healthy link is never quiet for long, however idle the session (a keep-alive is a
/// QUIC PING of some 40 bytes, acknowledged: well under 1 kB/s each way).
pub const KEEP_ALIVE: Duration = Duration::from_millis(200);

/// Least silence after which a connection whose session can resume counts as lost:
/// nothing at all arrived from the peer for three keep-alive intervals. A longer round trip
/// raises it (see [`silence_limit`]).
///
/// Far shorter than QUIC's idle timeout, and short enough that even a 1 s cut pauses the
/// session: QUIC itself would ride such a cut out, but its probe timer backs off
/// exponentially while the link is down (after a 1 s cut the next probe is some 0.5 s
/// away), where a paused session's reconnect attempts, every [`ATTEMPT_INTERVAL`], see
/// the link back within a round trip or two (docs/recovery.md).
pub const SILENCE_LOST: Duration = Duration::from_millis(600);

/// How often the silence watch looks at the connection.
const SILENCE_POLL: Duration = Duration::from_millis(50);

/// The silence after which a connection with smoothed round trip `rtt` counts as lost:
/// [`SILENCE_LOST`], or four round trips where that is longer (a keep-alive's answer takes
/// one, and a queue building up on the path stretches it).
pub fn silence_limit(rtt: Duration) -> Duration {
    SILENCE_LOST.max(rtt.saturating_mul(4))
}

/// Resolves once nothing has arrived on `conn` for its [`silence_limit`], with the error that
/// says so.
///
/// Only silence the watch itself saw counts: when it was not scheduled for a while (a
/// machine so busy that this task waited, which holds up the endpoint's receiving task as
/// much), the datagrams that arrived meanwhile may not be counted yet, so that stretch
/// starts a new window instead of ending the connection.
pub(crate) async fn silence(conn: Connection) -> DriverError {
    let datagrams = || conn.stats().udp_rx.datagrams;
    let mut last = datagrams();
    // When a datagram was last seen to arrive, and when the silence being timed began (a
    // starved stretch restarts the timing, not what was heard).
    let mut heard = Instant::now();
    let mut since = heard;
    let mut polled = heard;
    loop {
        tokio::time::sleep(SILENCE_POLL).await;
        let now = datagrams();
        let woke = Instant::now();
        let starved = woke.duration_since(polled) > 4 * SILENCE_POLL;
        polled = woke;
        if now != last {
            last = now;
            heard = woke;
            since = woke;
        } else if starved {
            since = woke;
        } else if since.elapsed() >= silence_limit(conn.rtt()) {
            return DriverError::Silent {
                ms: heard.elapsed().as_millis() as u64,
                last_heard: heard,
            };
        }
    }
}

/// Whether a QUIC connection error is the network's (or a vanished peer's) doing, after
/// which a new connection may resume the session. An application close is the peer's
/// decision and ends the session; so do a local close (a stop), a failed TLS handshake (an
/// unpinned certificate) and a version mismatch.
pub(crate) fn transient(e: &quinn::ConnectionError) -> bool {
    use quinn::ConnectionError as E;
    let tls = |code: u64| (0x100..=0x1ff).contains(&code);
    match e {
        E::TimedOut | E::Reset => true,
        E::TransportError(t) => !tls(u64::from(t.code)),
        E::ConnectionClosed(c) => !tls(u64::from(c.error_code)),
        E::ApplicationClosed(_) | E::LocallyClosed | E::VersionMismatch | E::CidsExhausted => false,
    }
}

/// Whether `e` means the connection was lost (see [`transient`]), so the session pauses and
/// waits for a new one instead of failing.
pub(crate) fn lost(e: &DriverError) -> bool {
    let dropped = |c: &quinn::ConnectionError| {
        matches!(c, quinn::ConnectionError::ApplicationClosed(a)
            if a.error_code.into_inner() == u64::from(super::CLOSE_OK))
    };
    let ok = u64::from(super::CLOSE_OK);
    match e {
        // The peer dropped the connection without a reason: it reconnects.
        DriverError::Connection(c) => dropped(c) || transient(c),
        DriverError::Stream {
            source: FrameError::Read(quinn::ReadError::ConnectionLost(c)),
            ..
        }
        | DriverError::Stream {
            source: FrameError::Write(quinn::WriteError::ConnectionLost(c)),
            ..
        } => dropped(c) || transient(c),
        // The peer dropped its end of the stream, which it does only with the whole
        // connection (nothing here stops or resets a stream on purpose), and its close did
        // not follow within [`settle`]'s wait: it dropped the connection to reconnect (it
        // thought it lost it), or it is gone.
        DriverError::Stream {
            source: FrameError::Write(quinn::WriteError::Stopped(code)),
            ..
        }
        | DriverError::Stream {
            source: FrameError::Read(quinn::ReadError::Reset(code)),
            ..
        } => code.into_inner() == ok,
        // The peer went silent during a handshake without the connection timing out.
        DriverError::Timeout(_) | DriverError::Silent { .. } => true,
        _ => false,
    }
}

/// Least time [`settle`] waits for the close behind a stream error.
pub(crate) const CLOSE_SETTLE: Duration = Duration::from_millis(300);

/// A stream error can arrive ahead of the connection close that explains it. A peer that
/// drops a connection, to reconnect (it judged the connection lost) or because its session
/// failed, drops its streams with it: quinn stops those it was reading (code 0) and finishes
/// those it was writing, and those frames may leave before its CONNECTION_CLOSE. Judged
/// alone, the error would end a session the peer means to resume (a VM lost for a pause),
/// or hide the peer's reason.
///
/// So for such an error this waits for the connection to close (at least
/// [`CLOSE_SETTLE`], three round trips where that is longer) and returns the close instead
/// (see [`super::connection_lost`]); if none came, or this side closed it, the error as it
/// was.
pub(crate) async fn settle(conn: &Connection, e: DriverError) -> DriverError {
    let ahead = matches!(
        &e,
        DriverError::Stream {
            source: FrameError::Write(quinn::WriteError::Stopped(_))
                | FrameError::Read(quinn::ReadError::Reset(_))
                | FrameError::Truncated,
            ..
        } | DriverError::PeerClosed {
            code: crate::message::ErrorCode::Aborted,
            ..
        }
    );
    if !ahead {
        return e;
    }
    let wait = CLOSE_SETTLE.max(conn.rtt().saturating_mul(3));
    match tokio::time::timeout(wait, conn.closed()).await {
        // Closed over `e` by this side already (after an earlier `settle`): quinn then
        // reports its own close, even over the peer's, so `e` says more.
        Ok(quinn::ConnectionError::LocallyClosed) => e,
        Ok(reason) => super::connection_lost(reason),
        Err(_) => e,
    }
}

/// How long before now the peer fell silent, by what `e` says.
pub(crate) fn silent_for(e: &DriverError) -> Duration {
    match e {
        // Counted to now: the connection's tasks stopped since the watchdog spoke.
        DriverError::Silent { last_heard, .. } => last_heard.elapsed(),
        _ => Duration::ZERO,
    }
}

/// How long the sessions were paused, measured by the driver (the sessions have no clock).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Pauses {
    paused_at: Option<Instant>,
    conn_up: Option<Instant>,
    /// Sum of the pauses so far, ms.
    pub(crate) paused_ms: u64,
    /// Longest time from a new connection being up to the session running again, ms.
    pub(crate) resume_ms_after_restore: u64,
}

impl Pauses {
    /// The connection was lost now (a second call during the same pause changes nothing).
    pub(crate) fn lost(&mut self) {
        self.lost_since(Duration::ZERO);
    }

    /// The connection was lost, `ago` before now (when the peer fell silent).
    pub(crate) fn lost_since(&mut self, ago: Duration) {
        let at = Instant::now().checked_sub(ago).unwrap_or_else(Instant::now);
        self.paused_at.get_or_insert(at);
        self.conn_up = None;
    }

    /// When the current pause began, if paused.
    pub(crate) fn paused_since(&self) -> Option<Instant> {
        self.paused_at
    }

    /// A new connection is up now.
    pub(crate) fn connected(&mut self) {
        if self.paused_at.is_some() {
            self.conn_up = Some(Instant::now());
        }
    }

    /// The session runs again.
    pub(crate) fn resumed(&mut self) {
        if let Some(p) = self.paused_at.take() {
            self.paused_ms += p.elapsed().as_millis() as u64;
        }
        if let Some(c) = self.conn_up.take() {
            let ms = c.elapsed().as_millis() as u64;
            self.resume_ms_after_restore = self.resume_ms_after_restore.max(ms);
        }
    }

    /// The pause still under way when the session ended counts too.
    pub(crate) fn finish(&mut self) {
        if let Some(p) = self.paused_at.take() {
            self.paused_ms += p.elapsed().as_millis() as u64;
        }
    }
}

/// What link outages did to a session (docs/recovery.md), as every report shows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Outages {
    /// Times the connection was lost and the session paused.
    pub pauses: u64,
    /// Time spent paused, all pauses together, ms.
    pub paused_ms: u64,
    /// Longest time from a new connection being up to the session running again, ms.
    pub resume_ms_after_restore: u64,
    /// Page bytes (raw page size, before any encoding) that crossed again: at the source,
    /// sent on a later connection after they had been sent on a lost one; at the
    /// destination, arrived when already here (a resend crossing a reply, or pages in
    /// flight at a cut) and dropped.
    pub bytes_resent: u64,
}

impl Outages {
    /// Adds the outages of another session (or connection) of the same role: counts and
    /// times add up, the slowest resume stays.
    pub fn merge(&mut self, other: &Outages) {
        self.pauses += other.pauses;
        self.paused_ms += other.paused_ms;
        self.resume_ms_after_restore = self
            .resume_ms_after_restore
            .max(other.resume_ms_after_restore);
        self.bytes_resent += other.bytes_resent;
    }
}

impl Pauses {
    /// The report of these pauses, with the session's counts.
    pub(crate) fn outages(&self, pauses: u64, bytes_resent: u64) -> Outages {
        Outages {
            pauses,
            paused_ms: self.paused_ms,
            resume_ms_after_restore: self.resume_ms_after_restore,
            bytes_resent,
        }
    }
}

/// The error of a pause that outlasted the recover timeout.
pub(crate) fn recover_timeout(limit: Duration, paused_at: Instant) -> DriverError {
    DriverError::RecoverTimeout {
        limit,
        outage_ms: paused_at.elapsed().as_millis() as u64,
    }
}

/// Told of every new connection a session resumes on (to follow its counters, say).
pub type OnConnection = Arc<dyn Fn(&Connection) + Send + Sync>;

/// Tells whether the application stopped the session (a stop closes the endpoint, which
/// ends a connection attempt, but not a wait between two).
pub type StopCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// Called once, when a source session hands the VM over to the destination (its
/// switchover: from here the VM runs there).
pub type OnHandover = Arc<dyn Fn() + Send + Sync>;

/// How a source gets a new connection when it lost one: the same endpoint (so the same
/// pinned certificates), the same address, a fresh, fully authenticated handshake each time
/// (never 0-RTT), a new attempt every [`ATTEMPT_INTERVAL`] until one connects.
#[derive(Clone)]
pub struct SourceRecovery {
    /// The client endpoint the first connection came from.
    pub endpoint: Endpoint,
    /// The destination's address.
    pub addr: SocketAddr,
    /// Fail once the connection has been down this long; `None`: never give up.
    pub recover_timeout: Option<Duration>,
    /// Whether the application stopped the session; checked between attempts.
    pub stopped: Option<StopCheck>,
    /// Called with each new connection before the session resumes on it.
    pub on_connection: Option<OnConnection>,
    /// Called once at the hand-over (source sessions only).
    pub on_handover: Option<OnHandover>,
}

impl SourceRecovery {
    /// Connects again until a connection is up, the recover timeout (counted from
    /// `paused_at`) runs out, an attempt fails for good (a certificate other than the pinned
    /// one, the endpoint closed by a stop), or the application stops. Attempts overlap: a new
    /// one starts every [`ATTEMPT_INTERVAL`], each lives at most [`ATTEMPT_TIMEOUT`], the
    /// first that connects wins and the others are dropped.
    pub(crate) async fn reconnect(&self, paused_at: Instant) -> Result<Connection, DriverError> {
        let deadline = self.recover_timeout.map(|t| paused_at + t);
        let mut attempts = tokio::task::JoinSet::new();
        let mut next = tokio::time::Instant::now();
        loop {
            if self.stopped.as_ref().is_some_and(|s| s()) {
                return Err(DriverError::Stopped);
            }
            if let (Some(d), Some(limit)) = (deadline, self.recover_timeout) {
                if Instant::now() >= d {
                    return Err(recover_timeout(limit, paused_at));
                }
            }
            let now = tokio::time::Instant::now();
            if now >= next {
                let (endpoint, addr) = (self.endpoint.clone(), self.addr);
                attempts.spawn(async move {
                    tokio::time::timeout(ATTEMPT_TIMEOUT, connect(&endpoint, addr)).await
                });
                next = now + ATTEMPT_INTERVAL;
            }
            tokio::select! {
                Some(done) = attempts.join_next() => match done {
                    Ok(Ok(Ok(conn))) => return Ok(conn),
                    Ok(Ok(Err(DriverError::Connection(c)))) if transient(&c) => {
                        tracing::debug!(error = %c, "reconnect attempt failed");
                    }
                    Ok(Ok(Err(e))) => return Err(e),
                    Ok(Err(_)) => tracing::debug!("reconnect attempt timed out"),
                    Err(e) => return Err(DriverError::Task(e.to_string())),
                },
                // Wake for the next attempt (and to check for a stop or the deadline).
                _ = tokio::time::sleep_until(next) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::VarInt;

    #[test]
    fn only_the_network_losing_a_connection_pauses() {
        use quinn::ConnectionError as E;
        assert!(lost(&DriverError::Connection(E::TimedOut)));
        assert!(lost(&DriverError::Connection(E::Reset)));
        assert!(!lost(&DriverError::Connection(E::LocallyClosed)));
        let app = quinn::ApplicationClose {
            error_code: quinn::VarInt::from_u32(3),
            reason: bytes::Bytes::from_static(b"no"),
        };
        assert!(!lost(&DriverError::Connection(E::ApplicationClosed(app))));
        let dropped = quinn::ApplicationClose {
            error_code: quinn::VarInt::from_u32(0),
            reason: bytes::Bytes::new(),
        };
        assert!(lost(&DriverError::Connection(E::ApplicationClosed(
            dropped
        ))));
        assert!(!lost(&DriverError::Stopped));
        assert!(!lost(&DriverError::Reader("gone".into())));
    }

    /// How the server end of [`a_stream_the_peer_dropped`] leaves.
    #[derive(Clone, Copy)]
    enum Leaves {
        /// Closes the connection as a peer that will reconnect does.
        ToReconnect,
        /// Closes it with a reason: its session failed.
        Failing,
        /// Never closes it.
        Silently,
    }

    /// A client writing a stream whose server end drops it (quinn stops it with code 0) and
    /// then, 50 ms later, leaves as `how` says. Returns `settle`'s verdict on the client's
    /// write error, and how long `settle` took. With `closed_here`, the client closes the
    /// connection itself 200 ms after the error, before `settle`.
    async fn a_stream_the_peer_dropped(how: Leaves, closed_here: bool) -> (DriverError, Duration) {
        use super::super::{accept, client_endpoint_tuned, server_endpoint_tuned, TransportTuning};
        use crate::tls::Identity;
        let (src, dst) = (
            Identity::generate("source").unwrap(),
            Identity::generate("dest").unwrap(),
        );
        let tuning = TransportTuning::default();
        let local = SocketAddr::from(([127, 0, 0, 1], 0));
        let server = server_endpoint_tuned(local, &dst, src.cert.clone(), &tuning).unwrap();
        let to = server.local_addr().unwrap();
        let peer = tokio::spawn(async move {
            let conn = accept(&server).await.unwrap().unwrap();
            let mut recv = conn.accept_uni().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = recv.read(&mut buf).await;
            drop(recv);
            tokio::time::sleep(Duration::from_millis(50)).await;
            match how {
                Leaves::ToReconnect => conn.close(
                    VarInt::from_u32(super::super::CLOSE_OK),
                    super::super::RECONNECTING,
                ),
                Leaves::Failing => conn.close(
                    VarInt::from_u32(crate::message::ErrorCode::Malformed as u32),
                    b"bad frame",
                ),
                Leaves::Silently => {}
            }
            // Keeps the endpoint (and a silent connection) up while the client judges.
            tokio::time::sleep(Duration::from_secs(3)).await;
            drop(conn);
        });
        let client = client_endpoint_tuned(local, &src, dst.cert.clone(), &tuning).unwrap();
        let conn = connect(&client, to).await.unwrap();
        let mut send = conn.open_uni().await.unwrap();
        let chunk = vec![7u8; 16 * 1024];
        let err = loop {
            if let Err(e) = send.write_all(&chunk).await {
                break e;
            }
        };
        assert!(
            matches!(err, quinn::WriteError::Stopped(c) if c.into_inner() == 0),
            "{err:?}"
        );
        let e = DriverError::Stream {
            channel: crate::proto::Channel::Bulk,
            source: FrameError::Write(err),
        };
        if closed_here {
            tokio::time::sleep(Duration::from_millis(200)).await;
            conn.close(VarInt::from_u32(7), b"closed here");
        }
        let started = Instant::now();
        let judged = settle(&conn, e).await;
        let took = started.elapsed();
        peer.abort();
        (judged, took)
    }

    fn is_stopped_write(e: &DriverError) -> bool {
        matches!(
            e,
            DriverError::Stream {
                source: FrameError::Write(quinn::WriteError::Stopped(_)),
                ..
            }
        )
    }

    /// The server end's stream stop arrives ahead of its close: the stream error alone would
    /// end the session (a VM lost for a pause, in the fleet bench), so `settle` waits for the
    /// close and judges by it.
    #[tokio::test]
    async fn a_stream_stopped_ahead_of_a_reconnecting_close_is_a_lost_connection() {
        let (e, took) = a_stream_the_peer_dropped(Leaves::ToReconnect, false).await;
        assert!(matches!(e, DriverError::Connection(_)), "{e:?}");
        assert!(lost(&e), "{e:?}");
        assert!(took < Duration::from_millis(250), "{took:?}");
    }

    #[tokio::test]
    async fn a_stream_stopped_ahead_of_a_failing_close_gives_the_peers_reason() {
        let (e, _) = a_stream_the_peer_dropped(Leaves::Failing, false).await;
        match &e {
            DriverError::PeerClosed { code, reason } => {
                assert_eq!(*code, crate::message::ErrorCode::Malformed);
                assert_eq!(reason, "bad frame");
            }
            other => panic!("expected the peer's close, got {other:?}"),
        }
        assert!(!lost(&e));
    }

    #[tokio::test]
    async fn a_stream_stopped_with_no_close_after_counts_as_lost() {
        let (e, took) = a_stream_the_peer_dropped(Leaves::Silently, false).await;
        assert!(is_stopped_write(&e), "{e:?}");
        assert!(took >= CLOSE_SETTLE, "{took:?}");
        assert!(lost(&e), "{e:?}");
    }

    /// Once this side closed the connection over the error, quinn reports its own close
    /// (even over the peer's): the error as it was says more, and no time is spent.
    #[tokio::test]
    async fn a_stream_error_this_side_closed_over_stays_as_it_was() {
        let (e, took) = a_stream_the_peer_dropped(Leaves::Failing, true).await;
        assert!(is_stopped_write(&e), "{e:?}");
        assert!(took < Duration::from_millis(100), "{took:?}");
    }

    #[test]
    fn pauses_add_up_and_resumes_take_the_longest() {
        let mut p = Pauses::default();
        p.connected();
        p.resumed();
        assert_eq!(
            (p.paused_ms, p.resume_ms_after_restore),
            (0, 0),
            "not paused"
        );
        p.lost();
        std::thread::sleep(Duration::from_millis(20));
        p.connected();
        std::thread::sleep(Duration::from_millis(10));
        p.resumed();
        assert!(p.paused_ms >= 30, "{p:?}");
        assert!(p.resume_ms_after_restore >= 10, "{p:?}");
        assert!(p.resume_ms_after_restore + 20 <= p.paused_ms, "{p:?}");
        assert!(p.paused_since().is_none());
    }
}
