//! The destination side of a migration session.

use std::collections::VecDeque;

use super::{describe_layout, Channel, ProtoError, Transmit};
use crate::bitmap::Bitmap;
use crate::message::{Layout, Message, Pages, MAX_REQUEST_PAGES, PROTOCOL_VERSION};

#[derive(Clone, Debug)]
pub struct DestConfig {
    /// The layout of the memory this side prepared; the source must send exactly this one.
    pub layout: Layout,
    /// If set, the VM id the source must announce.
    pub expected_vm_id: Option<String>,
    pub features: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DestEvent {
    /// The handshake was accepted; the application may resume the guest.
    Established { vm_id: String, features: u64 },
    /// The source has handed out every page.
    PushDone { pages_sent: u64 },
    /// The source acknowledged completion; the session is over.
    Finished,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    AwaitHello,
    Running,
    CompleteSent,
    Finished,
    Failed,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::AwaitHello => "awaiting the handshake",
            State::Running => "migrating",
            State::CompleteSent => "completing",
            State::Finished => "finished",
            State::Failed => "failed",
        }
    }
}

/// Destination session: checks the handshake, validates page data, batches demand requests
/// and keeps the received bitmap a resumed session would start from.
#[derive(Debug)]
pub struct DestSession {
    config: DestConfig,
    state: State,
    received: Bitmap,
    pending_requests: Vec<u64>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<DestEvent>,
}

impl DestSession {
    pub fn new(config: DestConfig) -> DestSession {
        DestSession {
            state: State::AwaitHello,
            received: Bitmap::new(config.layout.total_pages()),
            pending_requests: Vec::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            config,
        }
    }

    pub fn total_pages(&self) -> u64 {
        self.received.len()
    }

    /// Pages received from the source at least once.
    pub fn received(&self) -> &Bitmap {
        &self.received
    }

    pub fn is_running(&self) -> bool {
        matches!(self.state, State::Running | State::CompleteSent)
    }

    pub fn is_finished(&self) -> bool {
        self.state == State::Finished
    }

    /// Feeds one message received on `channel`. Page data comes back as `Ok(Some(pages))`,
    /// already checked against the layout, for the application to install.
    pub fn handle(&mut self, channel: Channel, msg: Message) -> Result<Option<Pages>, ProtoError> {
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

    fn handle_inner(
        &mut self,
        channel: Channel,
        msg: Message,
    ) -> Result<Option<Pages>, ProtoError> {
        match (self.state, channel, msg) {
            (_, _, Message::Error { code, message }) => Err(ProtoError::Peer { code, message }),
            (
                State::AwaitHello,
                Channel::Control,
                Message::Hello {
                    version,
                    vm_id,
                    layout,
                    features,
                },
            ) => {
                if version != PROTOCOL_VERSION {
                    return Err(ProtoError::VersionMismatch {
                        ours: PROTOCOL_VERSION,
                        theirs: version,
                    });
                }
                if layout != self.config.layout {
                    return Err(ProtoError::LayoutMismatch {
                        expected: describe_layout(&self.config.layout),
                        got: describe_layout(&layout),
                    });
                }
                if let Some(expected) = &self.config.expected_vm_id {
                    if *expected != vm_id {
                        return Err(ProtoError::VmIdMismatch {
                            expected: expected.clone(),
                            got: vm_id,
                        });
                    }
                }
                let features = features & self.config.features;
                self.state = State::Running;
                self.send(
                    Channel::Control,
                    Message::HelloAck {
                        version: PROTOCOL_VERSION,
                        features,
                    },
                );
                let pending = std::mem::take(&mut self.pending_requests);
                self.queue_requests(&pending);
                self.events
                    .push_back(DestEvent::Established { vm_id, features });
                Ok(None)
            }
            (
                State::Running | State::CompleteSent,
                Channel::Urgent | Channel::Bulk,
                Message::Pages(pages),
            ) => {
                let total = self.total_pages();
                let count = pages.count() as u64;
                if pages.first.checked_add(count).is_none_or(|end| end > total) {
                    return Err(ProtoError::PageOutOfRange {
                        first: pages.first,
                        count,
                        total,
                    });
                }
                for p in pages.first..pages.first + count {
                    self.received.set(p);
                }
                Ok(Some(pages))
            }
            (
                State::Running | State::CompleteSent,
                Channel::Control,
                Message::PushDone { pages_sent },
            ) => {
                self.events.push_back(DestEvent::PushDone { pages_sent });
                Ok(None)
            }
            (State::CompleteSent, Channel::Control, Message::CompleteAck) => {
                self.state = State::Finished;
                self.events.push_back(DestEvent::Finished);
                Ok(None)
            }
            (state, channel, msg) => Err(ProtoError::Unexpected {
                message: msg.name(),
                channel,
                state: state.name(),
            }),
        }
    }

    /// Queues demand requests for `pages`. Before the handshake completes they are held back.
    pub fn request(&mut self, pages: &[u64]) {
        match self.state {
            State::AwaitHello => self.pending_requests.extend_from_slice(pages),
            State::Running => self.queue_requests(pages),
            _ => {}
        }
    }

    fn queue_requests(&mut self, pages: &[u64]) {
        for chunk in pages.chunks(MAX_REQUEST_PAGES) {
            self.send(
                Channel::Urgent,
                Message::Request {
                    pages: chunk.to_vec(),
                },
            );
        }
    }

    /// Every page is present locally: tell the source, which then releases the VM.
    pub fn complete(&mut self) {
        if self.state == State::Running {
            self.state = State::CompleteSent;
            let pages_received = self.total_pages();
            self.send(Channel::Control, Message::Complete { pages_received });
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<DestEvent> {
        self.events.pop_front()
    }

    fn send(&mut self, channel: Channel, message: Message) {
        self.transmits.push_back(Transmit { channel, message });
    }
}
