//! How far a role got, for a VMM's progress display and for a failure report: a role calls
//! its [`ProgressFn`] about ten times a second while its session runs (a source a hundred
//! times, from when its push is done: when its last bytes leave matters to an
//! orchestrator) and once more when it ends, whether it succeeded or not, so the last value
//! says what was done.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

/// One sample of a role's progress.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Progress {
    /// Pages of guest memory present at a destination (none for a source or a standby,
    /// which cannot see it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pages_present: Option<u64>,
    /// Pages of guest memory in the session.
    pub pages: u64,
    /// UDP payload bytes this side received on the session's connection.
    pub bytes_received: u64,
    /// UDP payload bytes this side sent on the session's connection.
    pub bytes_sent: u64,
    /// Of those, the stream data, estimated ([`transport::quic::stream_bytes_sent`]): how
    /// far a push got. Retransmissions and packet headers are not in it.
    pub stream_bytes_sent: u64,
    /// Set on a source's last sample once its session completed (every stale page is at
    /// the destination), before the connection's closing handshake: the pages that were
    /// stale at its switchover. An orchestrator can count the VM as done from here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pages_stale: Option<u64>,
    /// A source's session has handed the VM over to the destination (its switchover): set
    /// on every sample from then on, and one sample is taken at that moment.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub handed_over: bool,
    /// A source's push so far: with `stream_bytes_sent`, how many pages have left
    /// ([`Progress::pages_sent`]) and what the encoding makes of a page. Zero elsewhere.
    #[serde(skip)]
    pub pushed: transport::proto::Pushed,
}

impl Progress {
    /// A source's pages that have left: its stream bytes sent, at the push's frame bytes
    /// per page ([`transport::proto::Pushed::pages_sent`]); before the push handed out a
    /// page, the stream bytes over the page size.
    pub fn pages_sent(&self) -> u64 {
        self.pushed
            .pages_sent(self.stream_bytes_sent)
            .unwrap_or(self.stream_bytes_sent / transport::message::PAGE_SIZE as u64)
    }
}

/// A role's progress callback (see [`Progress`]).
pub type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

/// How often a running role samples its progress.
pub(crate) const INTERVAL: Duration = Duration::from_millis(100);

/// Bytes on `conn` so far, into a sample.
pub(crate) fn sample(
    conn: &transport::quic::Connection,
    pages_present: Option<u64>,
    pages: u64,
) -> Progress {
    let s = conn.stats();
    Progress {
        pages_present,
        pages,
        bytes_received: s.udp_rx.bytes,
        bytes_sent: s.udp_tx.bytes,
        stream_bytes_sent: transport::quic::stream_bytes_sent(&s),
        pages_stale: None,
        handed_over: false,
        pushed: Default::default(),
    }
}

/// The connection a session runs on, which changes when it resumes on a new one, and the
/// bytes of the connections before it: the bytes a session moved over all its connections.
pub(crate) struct Connections(std::sync::Mutex<(transport::quic::Connection, Earlier)>);

/// What the connections before the current one moved.
#[derive(Clone, Copy, Default)]
pub(crate) struct Earlier {
    bytes_received: u64,
    bytes_sent: u64,
    stream_bytes_sent: u64,
}

impl Connections {
    pub(crate) fn new(conn: &transport::quic::Connection) -> std::sync::Arc<Connections> {
        std::sync::Arc::new(Connections(std::sync::Mutex::new((
            conn.clone(),
            Earlier::default(),
        ))))
    }

    /// The session moved on to `conn`.
    pub(crate) fn replace(&self, conn: &transport::quic::Connection) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let p = sample(&g.0, None, 0);
        g.1.bytes_received += p.bytes_received;
        g.1.bytes_sent += p.bytes_sent;
        g.1.stream_bytes_sent += p.stream_bytes_sent;
        g.0 = conn.clone();
    }

    /// [`sample`] over every connection so far.
    pub(crate) fn sample(&self, pages_present: Option<u64>, pages: u64) -> Progress {
        let g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let p = sample(&g.0, pages_present, pages);
        Progress {
            bytes_received: p.bytes_received + g.1.bytes_received,
            bytes_sent: p.bytes_sent + g.1.bytes_sent,
            stream_bytes_sent: p.stream_bytes_sent + g.1.stream_bytes_sent,
            ..p
        }
    }

    /// Whether the current connection is still open.
    pub(crate) fn is_open(&self) -> bool {
        let g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.0.close_reason().is_none()
    }

    /// A callback that follows the session's new connections.
    pub(crate) fn follower(self: &std::sync::Arc<Self>) -> transport::quic::OnConnection {
        let me = self.clone();
        std::sync::Arc::new(move |c: &transport::quic::Connection| me.replace(c))
    }
}

/// How often a source samples once its push has handed out its last page
/// ([`transport::proto::Pushed::done`]), until its session ends: when its last bytes leave
/// is when an orchestrator hands the link on to the VM held behind it, and sampled every
/// [`INTERVAL`] that moment was known up to 100 ms late, or guessed from the rate (the
/// link idle, or two flows overfilling it, meanwhile). The push writes up to a stream
/// window ahead, so this lasts a few round trips.
pub(crate) const FINAL_INTERVAL: Duration = Duration::from_millis(10);

/// At most this many samples in a row at [`FINAL_INTERVAL`] (5 s of them): a session whose
/// last bytes take longer (its connection lost and recovering, say) goes back to
/// [`INTERVAL`] until a resume gives its push pages again.
pub(crate) const MAX_FINAL_SAMPLES: u32 = 500;

/// The wait after `sample`, the `fine`-th in a row with its push done (0 if not done).
fn next_interval(sample: &Progress, fine: u32) -> Duration {
    if sample.pushed.done && fine <= MAX_FINAL_SAMPLES {
        FINAL_INTERVAL
    } else {
        INTERVAL
    }
}

/// Calls `f` with `sample()` at once, then every [`INTERVAL`] ([`FINAL_INTERVAL`] once the
/// push is done, see [`MAX_FINAL_SAMPLES`]), until the returned task is aborted.
pub(crate) fn spawn_ticker(
    f: ProgressFn,
    sample: impl Fn() -> Progress + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut fine = 0u32;
        loop {
            let p = sample();
            fine = if p.pushed.done {
                fine.saturating_add(1)
            } else {
                0
            };
            let wait = next_interval(&p, fine);
            f(p);
            tokio::time::sleep(wait).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_sample_has_no_pages_present_in_json() {
        let p = Progress {
            pages_present: None,
            pages: 8,
            bytes_received: 1,
            bytes_sent: 2,
            stream_bytes_sent: 1,
            pages_stale: None,
            handed_over: false,
            pushed: Default::default(),
        };
        let v = serde_json::to_value(p).unwrap();
        assert!(v.get("pages_present").is_none());
        assert_eq!(v["bytes_sent"], 2);
        let d = Progress {
            pages_present: Some(3),
            ..p
        };
        assert_eq!(serde_json::to_value(d).unwrap()["pages_present"], 3);
    }

    #[test]
    fn pages_sent_are_counted_at_the_pushs_cost_of_a_page() {
        let page = transport::PAGE_SIZE as u64;
        let mut p = Progress {
            stream_bytes_sent: 100 * page,
            ..Progress::default()
        };
        // Nothing pushed yet: the stream bytes over a page.
        assert_eq!(p.pages_sent(), 100);
        // Pages that cost a quarter of a page on the stream.
        p.pushed = transport::proto::Pushed {
            pages: 1_000,
            wire_bytes: 250 * page - 15_000,
            stream_bytes: 250 * page,
            done: false,
        };
        assert_eq!(p.pages_sent(), 400);
    }

    #[test]
    fn a_source_samples_finely_once_its_push_is_done_for_a_while() {
        let mut p = Progress::default();
        assert_eq!(next_interval(&p, 0), INTERVAL);
        p.pushed.done = true;
        assert_eq!(next_interval(&p, 1), FINAL_INTERVAL);
        assert_eq!(next_interval(&p, MAX_FINAL_SAMPLES), FINAL_INTERVAL);
        assert_eq!(next_interval(&p, MAX_FINAL_SAMPLES + 1), INTERVAL);
    }
}
