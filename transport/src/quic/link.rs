//! What both drivers share: a session behind its lock with the streams its messages go out
//! on, the one way a task reads a frame (a malformed one fails the session and tells the
//! peer), and the control stream read ahead so a driver's main loop can select on it.

use std::sync::{Arc, Mutex, MutexGuard};

use quinn::{Connection, RecvStream, SendStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::frame::{read_frame, write_final, write_message, FrameError};
use super::{stream_error, DriverError};
use crate::codec::CodecError;
use crate::message::Message;
use crate::proto::{
    Channel, DestEvent, DestSession, ProtoError, SourceEvent, SourceSession, Transmit,
};

/// What the drivers' shared code needs of a sans-IO session.
pub(crate) trait Session: Send + 'static {
    /// What handling a message hands the driver besides events (page data, pages to serve).
    type Output;
    /// What the application hears about.
    type Event;
    /// Feeds a message of this side's connection number `connection`.
    fn handle_in(
        &mut self,
        connection: u32,
        channel: Channel,
        msg: Message,
    ) -> Result<Self::Output, ProtoError>;
    /// This side's number for the current connection.
    fn current(&self) -> u32;
    fn handle_decode_error(&mut self, e: CodecError) -> ProtoError;
    fn poll_transmit(&mut self) -> Option<Transmit>;
    fn poll_event(&mut self) -> Option<Self::Event>;
    fn is_finished(&self) -> bool;
}

macro_rules! session_impl {
    ($ty:ty, $output:ty, $event:ty, $current:ident) => {
        impl Session for $ty {
            type Output = $output;
            type Event = $event;
            fn handle_in(
                &mut self,
                connection: u32,
                channel: Channel,
                msg: Message,
            ) -> Result<$output, ProtoError> {
                <$ty>::handle_in(self, connection, channel, msg)
            }
            fn current(&self) -> u32 {
                <$ty>::$current(self)
            }
            fn handle_decode_error(&mut self, e: CodecError) -> ProtoError {
                <$ty>::handle_decode_error(self, e)
            }
            fn poll_transmit(&mut self) -> Option<Transmit> {
                <$ty>::poll_transmit(self)
            }
            fn poll_event(&mut self) -> Option<$event> {
                <$ty>::poll_event(self)
            }
            fn is_finished(&self) -> bool {
                <$ty>::is_finished(self)
            }
        }
    };
}

session_impl!(SourceSession, Vec<u64>, SourceEvent, connection);
session_impl!(
    DestSession,
    Option<crate::proto::Delivery>,
    DestEvent,
    conn_epoch
);

/// A session that outlives its connections, shared by the links of each.
pub(crate) type Shared<S> = Arc<Mutex<S>>;

/// A session with one of its connections and the streams its queued messages go out on,
/// shared by a driver's tasks. Messages read here are fed as this connection's (see
/// [`crate::proto::SourceSession::handle_in`]), and what the session queued goes out here
/// only while this is its current connection: a task of a lost connection can neither
/// change the session nor take the messages meant for the next one.
pub(crate) struct Link<S> {
    pub(crate) conn: Connection,
    session: Shared<S>,
    /// This side's number for the connection.
    number: u32,
    control: tokio::sync::Mutex<SendStream>,
    /// Where `Channel::Urgent` messages go (the destination's demand requests); `None` on
    /// the source, whose session queues only control messages.
    urgent: Option<tokio::sync::Mutex<SendStream>>,
    /// A task's failure, for the driver's main loop.
    errors: mpsc::UnboundedSender<DriverError>,
}

impl<S: Session> Link<S> {
    /// The link and the receiving end of its tasks' failures.
    pub(crate) fn new(
        conn: Connection,
        session: Shared<S>,
        control: SendStream,
        urgent: Option<SendStream>,
    ) -> (Link<S>, mpsc::UnboundedReceiver<DriverError>) {
        let (errors, failures) = mpsc::unbounded_channel();
        let number = session.lock().unwrap_or_else(|p| p.into_inner()).current();
        let link = Link {
            conn,
            session,
            number,
            control: tokio::sync::Mutex::new(control),
            urgent: urgent.map(tokio::sync::Mutex::new),
            errors,
        };
        (link, failures)
    }

    /// This side's number for the connection.
    pub(crate) fn number(&self) -> u32 {
        self.number
    }

    /// Watches the connection for silence (see [`super::recovery::silence`]); a silent peer
    /// is reported to the main loop as a lost connection. Stops when the task is aborted.
    pub(crate) fn watch_silence(&self) -> Watchdog {
        let (conn, errors) = (self.conn.clone(), self.errors.clone());
        Watchdog(tokio::spawn(async move {
            let e = super::recovery::silence(conn).await;
            let _ = errors.send(e);
        }))
    }

    /// The session. A poisoned lock means another task panicked mid-update; the session is
    /// a plain value that stays consistent between statements, so carrying on is sound.
    pub(crate) fn session(&self) -> MutexGuard<'_, S> {
        self.session.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends whatever the session queued. A fatal `Error` is the last thing on its stream
    /// and waits (briefly) for the peer to have it.
    pub(crate) async fn flush(&self) -> Result<(), DriverError> {
        let queued: Vec<_> = {
            let mut s = self.session();
            if s.current() != self.number {
                return Ok(());
            }
            std::iter::from_fn(|| s.poll_transmit()).collect()
        };
        for t in queued {
            let stream = match (t.channel, &self.urgent) {
                (Channel::Urgent, Some(urgent)) => urgent,
                _ => &self.control,
            };
            let mut send = stream.lock().await;
            let written = if matches!(t.message, Message::Error { .. }) {
                write_final(&mut send, &t.message).await
            } else {
                write_message(&mut send, &t.message).await
            };
            written.map_err(|e| stream_error(&self.conn, t.channel, e))?;
        }
        Ok(())
    }

    /// A read from `channel` as the driver acts on it: a malformed frame fails the session,
    /// which tells the peer why; a stream that failed with the connection reports the
    /// connection's reason. `Ok(None)`: the stream ended at a frame boundary.
    pub(crate) async fn checked(
        &self,
        channel: Channel,
        read: Result<Option<Message>, FrameError>,
    ) -> Result<Option<Message>, DriverError> {
        match read {
            Ok(m) => Ok(m),
            Err(FrameError::Codec(c)) => {
                let err = self.session().handle_decode_error(c);
                self.flush().await.ok();
                Err(err.into())
            }
            Err(e) => Err(stream_error(&self.conn, channel, e)),
        }
    }

    /// Feeds `msg` to the session and sends what it queued. When the session refuses the
    /// message, its reason (already queued for the peer) is the error, whether or not
    /// sending it worked.
    pub(crate) async fn handle(
        &self,
        channel: Channel,
        msg: Message,
    ) -> Result<S::Output, DriverError> {
        let handled = self.session().handle_in(self.number, channel, msg);
        let flushed = self.flush().await;
        let output = handled?;
        flushed?;
        Ok(output)
    }

    /// The events the session produced so far, in order.
    pub(crate) fn events(&self) -> Vec<S::Event> {
        std::iter::from_fn(|| self.session().poll_event()).collect()
    }

    /// A task stopped with `result`: a failure goes to the main loop, unless the session
    /// already finished (then it is the peer hanging up, which is fine).
    pub(crate) fn task_ended(&self, result: Result<(), DriverError>) {
        if let Err(e) = result {
            if !self.session().is_finished() {
                let _ = self.errors.send(e);
            }
        }
    }
}

/// A connection's silence watch ([`Link::watch_silence`]); it stops when dropped.
pub(crate) struct Watchdog(JoinHandle<()>);

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The control stream, read by a task of its own so a main loop can select on it (a read
/// in progress is not cancel-safe; a channel receive is).
pub(crate) struct ControlReader {
    rx: mpsc::UnboundedReceiver<Result<Option<Message>, FrameError>>,
    task: Option<JoinHandle<()>>,
}

impl ControlReader {
    pub(crate) fn start(mut recv: RecvStream) -> ControlReader {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let read = read_frame(&mut recv).await;
                let end = !matches!(read, Ok(Some(_)));
                if tx.send(read).is_err() || end {
                    break;
                }
            }
        });
        ControlReader {
            rx,
            task: Some(task),
        }
    }

    /// The next read, in stream order; after the end (or an error) `Ok(None)`.
    pub(crate) async fn next(&mut self) -> Result<Option<Message>, FrameError> {
        self.rx.recv().await.unwrap_or(Ok(None))
    }

    /// Stops the reader and waits until it has.
    pub(crate) async fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for ControlReader {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}
