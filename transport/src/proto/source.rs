//! The source side of a migration session.

use std::collections::VecDeque;
use std::ops::Range;

use super::{Channel, ProtoError, PushSchedule, Transmit};
use crate::message::{Layout, Message, PROTOCOL_VERSION};

#[derive(Clone, Debug)]
pub struct SourceConfig {
    pub vm_id: String,
    pub layout: Layout,
    pub features: u64,
    /// Push pages in the background. Off, pages move only on demand (for measuring
    /// demand-fault latency alone).
    pub push: bool,
}

/// What the source application must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceEvent {
    /// The destination accepted the handshake; the push may start.
    Established { features: u64 },
    /// Pages the destination is blocked on: read and send them on the urgent channel now.
    Serve(Vec<u64>),
    /// The destination has every page; the session is over.
    Finished,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    HelloSent,
    Running,
    Finished,
    Failed,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::HelloSent => "awaiting the handshake reply",
            State::Running => "migrating",
            State::Finished => "finished",
            State::Failed => "failed",
        }
    }
}

/// Source session: sends the handshake, serves demand requests, schedules the push.
#[derive(Debug)]
pub struct SourceSession {
    config: SourceConfig,
    state: State,
    push: PushSchedule,
    push_done_sent: bool,
    pages_served: u64,
    pages_pushed: u64,
    transmits: VecDeque<Transmit>,
    events: VecDeque<SourceEvent>,
}

impl SourceSession {
    /// A new session; the `Hello` is queued at once.
    pub fn new(config: SourceConfig) -> SourceSession {
        let pages = config.layout.total_pages();
        let mut s = SourceSession {
            state: State::HelloSent,
            push: PushSchedule::new(pages),
            push_done_sent: false,
            pages_served: 0,
            pages_pushed: 0,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            config,
        };
        s.send(
            Channel::Control,
            Message::Hello {
                version: PROTOCOL_VERSION,
                vm_id: s.config.vm_id.clone(),
                layout: s.config.layout.clone(),
                features: s.config.features,
            },
        );
        s
    }

    pub fn total_pages(&self) -> u64 {
        self.push.pages()
    }

    pub fn is_running(&self) -> bool {
        self.state == State::Running
    }

    pub fn is_finished(&self) -> bool {
        self.state == State::Finished
    }

    /// Pages sent as replies to demand requests.
    pub fn pages_served(&self) -> u64 {
        self.pages_served
    }

    /// Pages handed to the background push.
    pub fn pages_pushed(&self) -> u64 {
        self.pages_pushed
    }

    /// Feeds one message received on `channel`.
    pub fn handle(&mut self, channel: Channel, msg: Message) -> Result<(), ProtoError> {
        let result = self.handle_inner(channel, msg);
        if let Err(e) = &result {
            if !matches!(e, ProtoError::Peer { .. }) && self.state != State::Failed {
                self.send(Channel::Control, e.to_message());
            }
            self.state = State::Failed;
        }
        result
    }

    /// Reports a codec error on incoming bytes: the session fails and tells the peer.
    pub fn handle_decode_error(&mut self, e: crate::codec::CodecError) -> ProtoError {
        let e = ProtoError::Codec(e);
        if self.state != State::Failed {
            self.send(Channel::Control, e.to_message());
            self.state = State::Failed;
        }
        e
    }

    fn handle_inner(&mut self, channel: Channel, msg: Message) -> Result<(), ProtoError> {
        match (self.state, channel, msg) {
            (_, _, Message::Error { code, message }) => Err(ProtoError::Peer { code, message }),
            (State::HelloSent, Channel::Control, Message::HelloAck { version, features }) => {
                if version != PROTOCOL_VERSION {
                    return Err(ProtoError::VersionMismatch {
                        ours: PROTOCOL_VERSION,
                        theirs: version,
                    });
                }
                self.state = State::Running;
                self.events.push_back(SourceEvent::Established { features });
                Ok(())
            }
            (State::Running, Channel::Urgent, Message::Request { pages }) => {
                let total = self.total_pages();
                if let Some(&bad) = pages.iter().find(|&&p| p >= total) {
                    return Err(ProtoError::PageOutOfRange {
                        first: bad,
                        count: 1,
                        total,
                    });
                }
                for &p in &pages {
                    self.push.on_demand(p);
                }
                self.pages_served += pages.len() as u64;
                self.events.push_back(SourceEvent::Serve(pages));
                Ok(())
            }
            (State::Running, Channel::Control, Message::Complete { pages_received }) => {
                let total = self.total_pages();
                if pages_received != total {
                    return Err(ProtoError::CountMismatch {
                        expected: total,
                        got: pages_received,
                    });
                }
                self.state = State::Finished;
                self.send(Channel::Control, Message::CompleteAck);
                self.events.push_back(SourceEvent::Finished);
                Ok(())
            }
            (state, channel, msg) => Err(ProtoError::Unexpected {
                message: msg.name(),
                channel,
                state: state.name(),
            }),
        }
    }

    /// The next run of pages to push, at most `max` long. When every page has been handed out
    /// this queues `PushDone` once and returns `None`.
    pub fn next_push(&mut self, max: usize) -> Option<Range<u64>> {
        if self.state != State::Running || !self.config.push {
            return None;
        }
        match self.push.next_run(max) {
            Some(r) => {
                self.pages_pushed += r.end - r.start;
                Some(r)
            }
            None => {
                if !self.push_done_sent {
                    self.push_done_sent = true;
                    let pages_sent = self.push.sent();
                    self.send(Channel::Control, Message::PushDone { pages_sent });
                }
                None
            }
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<SourceEvent> {
        self.events.pop_front()
    }

    fn send(&mut self, channel: Channel, message: Message) {
        self.transmits.push_back(Transmit { channel, message });
    }
}
