//! [`AgentLink`]: the host end of a live agent channel. A VMM exposes the guest's agent
//! port as a Unix socket on the host (QEMU's `-chardev socket` behind a serial or
//! virtio-console port; Cloud Hypervisor's and Firecracker's consoles likewise). The link
//! connects to it, reads everything the agent says on its own thread into a [`HintBoard`]
//! (untrusted input, bounded memory, typed errors), and writes the host's side of the
//! protocol: `ReportNow`, `PostcopyStarted` (the destination resumed the guest: pre-touch)
//! and `PostcopyFinished`.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use guest_agent::proto::{encode, Hello, Message, TouchReport};
use thiserror::Error;
use transport::Layout;

use super::{BoardLimits, BoardStats, HintBoard, HintError, Hints, MapError};

/// What went wrong on the agent channel itself (the agent's content errors are
/// [`HintError`]s, kept on the board).
#[derive(Debug, Error)]
pub enum AgentLinkError {
    /// [`AgentLink::connect`] could not connect to the socket before its timeout.
    #[error("cannot connect to the agent socket {path} (is the VMM running with the agent port on that socket?)")]
    Connect {
        /// The socket path tried.
        path: PathBuf,
        /// The last connect attempt's error.
        source: std::io::Error,
    },
    /// Cloning the stream, spawning the reader thread, or writing a host message failed.
    #[error("the agent channel failed")]
    Io(#[from] std::io::Error),
    /// A host message was not sent because the reader already saw the channel end; holds
    /// why it ended (end of stream or the read error).
    #[error("the agent channel is closed: {0}")]
    Closed(String),
    /// The guest's layout cannot be mapped for hints, so no board could be made.
    #[error(transparent)]
    Map(#[from] MapError),
}

/// What the reader thread and the callers share.
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

struct State {
    board: HintBoard,
    /// Set when the reader stopped: end of stream or a read error.
    closed: Option<String>,
}

/// A connected agent channel. Dropping it closes the connection and joins the reader.
pub struct AgentLink {
    shared: Arc<Shared>,
    stream: UnixStream,
    reader: Option<JoinHandle<()>>,
}

impl AgentLink {
    /// Connects to the agent's socket at `path`, retrying until `timeout` (the VMM may be
    /// creating it), with a board for a guest of `layout`.
    pub fn connect(
        path: &Path,
        layout: &Layout,
        limits: BoardLimits,
        timeout: Duration,
    ) -> Result<AgentLink, AgentLinkError> {
        let board = HintBoard::new(layout, limits)?;
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(AgentLinkError::Connect {
                        path: path.to_path_buf(),
                        source: e,
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        AgentLink::over(stream, board)
    }

    /// A link over a connected stream (an accepted connection, a socket pair).
    pub fn over(stream: UnixStream, board: HintBoard) -> Result<AgentLink, AgentLinkError> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                board,
                closed: None,
            }),
            changed: Condvar::new(),
        });
        let mut rx = stream.try_clone()?;
        let sh = shared.clone();
        let reader = std::thread::Builder::new()
            .name("agent-link".into())
            .spawn(move || read_loop(&mut rx, &sh))?;
        Ok(AgentLink {
            shared,
            stream,
            reader: Some(reader),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, msg: &Message) -> Result<(), AgentLinkError> {
        if let Some(why) = &self.state().closed {
            return Err(AgentLinkError::Closed(why.clone()));
        }
        // Host messages carry no lists: they always encode.
        let bytes = encode(msg).map_err(|e| AgentLinkError::Io(std::io::Error::other(e)))?;
        (&self.stream).write_all(&bytes)?;
        Ok(())
    }

    /// Asks the agent for a report now.
    pub fn request_report(&self) -> Result<(), AgentLinkError> {
        self.send(&Message::ReportNow)
    }

    /// Tells the agent that postcopy started (the guest runs at the destination): it
    /// pre-touches its targets and answers `Touched` ([`AgentLink::wait_touched`]).
    pub fn postcopy_started(&self) -> Result<(), AgentLinkError> {
        self.send(&Message::PostcopyStarted)
    }

    /// Tells the agent that every page is present again; it resumes scanning.
    pub fn postcopy_finished(&self) -> Result<(), AgentLinkError> {
        self.send(&Message::PostcopyFinished)
    }

    /// Waits until `ready` holds for the state, the channel closes, or `timeout` passes.
    fn wait<T>(&self, timeout: Duration, mut ready: impl FnMut(&State) -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut st = self.state();
        loop {
            if let Some(t) = ready(&st) {
                return Some(t);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            if st.closed.is_some() {
                return None;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The latest accepted report, once one newer than `after_seq` arrived (`None` after
    /// `timeout` or when the channel closed first).
    pub fn wait_hints(&self, after_seq: Option<u64>, timeout: Duration) -> Option<Hints> {
        self.wait(timeout, |st| {
            st.board
                .hints()
                .filter(|h| after_seq.is_none_or(|s| h.seq > s))
                .cloned()
        })
    }

    /// Asks for a report and waits for it: a report newer than the one held now.
    pub fn fresh_hints(&self, timeout: Duration) -> Result<Option<Hints>, AgentLinkError> {
        let held = self.hints().map(|h| h.seq);
        self.request_report()?;
        Ok(self.wait_hints(held, timeout))
    }

    /// The agent's answer to `PostcopyStarted`.
    pub fn wait_touched(&self, timeout: Duration) -> Option<TouchReport> {
        self.wait(timeout, |st| st.board.touched())
    }

    /// The latest accepted report.
    pub fn hints(&self) -> Option<Hints> {
        self.state().board.hints().cloned()
    }

    /// The agent's last acceptable `Hello`.
    pub fn hello(&self) -> Option<Hello> {
        self.state().board.hello().cloned()
    }

    /// What the agent sent that was refused, oldest first (see [`HintBoard::take_errors`]).
    pub fn take_errors(&self) -> Vec<HintError> {
        self.state().board.take_errors()
    }

    /// A copy of the board's counters now (see [`HintBoard::stats`]).
    pub fn stats(&self) -> BoardStats {
        self.state().board.stats().clone()
    }

    /// Why the channel closed, if it did.
    pub fn closed(&self) -> Option<String> {
        self.state().closed.clone()
    }
}

impl Drop for AgentLink {
    fn drop(&mut self) {
        // Unblocks the reader's read with end of stream.
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

fn read_loop(rx: &mut UnixStream, shared: &Shared) {
    let mut buf = vec![0u8; 16 << 10];
    let why = loop {
        match rx.read(&mut buf) {
            Ok(0) => break "the agent's end closed".to_string(),
            Ok(n) => {
                let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
                st.board.feed_bytes(&buf[..n]);
                drop(st);
                shared.changed.notify_all();
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => break format!("reading: {e}"),
        }
    };
    shared
        .state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .closed = Some(why);
    shared.changed.notify_all();
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_agent::proto::{report_frames, FrameReader, Hello, PfnRange};

    /// The frames of one whole agent report.
    fn agent_report(seq: u64, mem_bytes: u64, hot: &[PfnRange], free: &[PfnRange]) -> Vec<u8> {
        let hello = Hello {
            version: guest_agent::proto::PROTOCOL_VERSION,
            agent_version: "test".into(),
            page_size: 4096,
            poison_on_free: false,
            mem_total_bytes: mem_bytes,
        };
        report_frames(&hello, seq, hot, free, 4096).unwrap()
    }

    fn link(pages: u64) -> (AgentLink, UnixStream) {
        let (host, agent) = UnixStream::pair().unwrap();
        let board = HintBoard::new(&Layout::single(pages * 4096), BoardLimits::default()).unwrap();
        (AgentLink::over(host, board).unwrap(), agent)
    }

    /// Reads frames from the agent's end until `n` messages came.
    fn host_messages(agent: &mut UnixStream, n: usize) -> Vec<Message> {
        let mut reader = FrameReader::new();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while got.len() < n {
            let k = agent.read(&mut buf).unwrap();
            assert!(k > 0, "host closed");
            let mut data = &buf[..k];
            while !data.is_empty() {
                let used = reader.feed(data);
                data = &data[used..];
                while let Some(m) = reader.next_frame() {
                    got.push(m.unwrap());
                }
            }
        }
        got
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn reports_reach_the_board_and_host_messages_reach_the_agent() {
        let (link, mut agent) = link(1024);
        link.request_report().unwrap();
        link.postcopy_started().unwrap();
        link.postcopy_finished().unwrap();
        assert_eq!(
            host_messages(&mut agent, 3),
            vec![
                Message::ReportNow,
                Message::PostcopyStarted,
                Message::PostcopyFinished
            ]
        );
        let hot = [PfnRange::new(10, 5)];
        let free = [PfnRange::new(100, 50)];
        agent
            .write_all(&agent_report(7, 1024 * 4096, &hot, &free))
            .unwrap();
        let h = link
            .wait_hints(None, Duration::from_secs(5))
            .expect("hints");
        assert_eq!((h.seq, h.hot.clone()), (7, vec![10..15]));
        assert_eq!(h.free_pages(), 50);
        assert!(link
            .wait_hints(Some(7), Duration::from_millis(50))
            .is_none());
        assert!(link.hello().is_some());
        agent
            .write_all(&encode(&Message::Touched(TouchReport::default())).unwrap())
            .unwrap();
        assert!(link.wait_touched(Duration::from_secs(5)).is_some());
    }

    #[test]
    fn hostile_bytes_are_errors_and_a_closed_channel_is_reported() {
        let (link, mut agent) = link(1024);
        agent.write_all(b"\x00garbage\xffnot a frame").unwrap();
        // A report naming frames past the guest's end is refused whole.
        agent
            .write_all(&agent_report(
                1,
                1024 * 4096,
                &[PfnRange::new(4000, 8)],
                &[],
            ))
            .unwrap();
        drop(agent);
        assert!(link.wait_hints(None, Duration::from_secs(2)).is_none());
        let errors = link.take_errors();
        assert!(
            errors
                .iter()
                .any(|e| matches!(e, HintError::OutsideGuest { .. })),
            "{errors:?}"
        );
        assert!(link.stats().garbage_bytes > 0);
        assert!(link.closed().is_some());
        assert!(matches!(
            link.postcopy_started(),
            Err(AgentLinkError::Closed(_))
        ));
    }

    #[test]
    fn connect_names_the_missing_socket() {
        let err = AgentLink::connect(
            Path::new("/nonexistent/agent.sock"),
            &Layout::single(1 << 20),
            BoardLimits::default(),
            Duration::ZERO,
        )
        .err()
        .expect("no socket there");
        assert!(err.to_string().contains("/nonexistent/agent.sock"), "{err}");
        // The OS error is the source: the chain prints it once, after the hint.
        let AgentLinkError::Connect { source, .. } = &err else {
            panic!("not a connect error: {err}");
        };
        let cause = source.to_string();
        assert!(!err.to_string().contains(&cause), "{err}");
        let all = uffd_core::error::chain(&err);
        assert!(
            all.ends_with(&format!("on that socket?): {cause}")),
            "{all}"
        );
        assert_eq!(all.matches(&*cause).count(), 1, "{all}");
    }
}
