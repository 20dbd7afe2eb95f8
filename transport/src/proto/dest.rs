//! The destination side of a session: plain migration, a standby receiving replication, or
//! a standby becoming the destination at evacuation.

use std::collections::VecDeque;

use super::{describe_layout, page_set_messages, Channel, PageSetAssembler, ProtoError, Transmit};
use crate::bitmap::Bitmap;
use crate::message::{
    Layout, Message, Pages, SessionKind, SetKind, MAX_ACKS, MAX_REQUEST_PAGES, PROTOCOL_VERSION,
};

/// How a destination session is set up: the memory it prepared and what it accepts.
#[derive(Clone, Debug)]
pub struct DestConfig {
    /// The layout of the memory this side prepared; the source must send exactly this one.
    pub layout: Layout,
    /// If set, the VM id the source must announce.
    pub expected_vm_id: Option<String>,
    /// Encodings this side decodes ([`FEATURE_LZ4`](crate::message::FEATURE_LZ4),
    /// [`FEATURE_DEDUP`](crate::message::FEATURE_DEDUP)); the `HelloAck` answers with those
    /// the `Hello` also offered.
    pub features: u64,
    /// Session kinds this side accepts (a plain destination only `Migrate`; a standby
    /// `Replicate` and `Evacuate`).
    pub accept: Vec<SessionKind>,
}

impl DestConfig {
    /// A plain postcopy destination for `layout`.
    pub fn migrate(layout: Layout) -> DestConfig {
        DestConfig {
            layout,
            expected_vm_id: None,
            // This side decodes every encoding.
            features: crate::message::FEATURE_LZ4 | crate::message::FEATURE_DEDUP,
            accept: vec![SessionKind::Migrate],
        }
    }
}

/// What the destination application must act on, from [`DestSession::poll_event`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DestEvent {
    /// A standby was asked for a `Replicate` or `Evacuate` session: the application must
    /// answer with [`DestSession::accept`] and the pages its replica cannot serve.
    HelloReceived {
        /// The kind asked for: `Replicate` or `Evacuate`.
        kind: SessionKind,
        /// The VM id the source announced.
        vm_id: String,
        /// The source's replication epoch; stored versions from another epoch are invalid.
        epoch: u64,
    },
    /// Evacuation: every page in the set must arrive from the source; all others are fresh
    /// in the local replica. Make the stale ones absent, then resume the guest.
    StaleSet(Bitmap),
    /// The VMM's vCPU and device state, to restore before the guest resumes.
    VmState(Vec<u8>),
    /// The handshake is complete; a migrating guest may resume.
    Established {
        /// The VM id the source announced.
        vm_id: String,
        /// The negotiated features: the encodings incoming pages may use.
        features: u64,
    },
    /// The source has handed out every page.
    PushDone {
        /// The count the source sent (see [`Message::PushDone`]).
        pages_sent: u64,
    },
    /// The source acknowledged completion; the session is over.
    Finished,
}

/// Data the application must put in place, already checked against the layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Page contents for guest memory (migration and evacuation).
    Pages(Pages),
    /// Page contents with their versions, for the replica (replication).
    Update {
        /// The contents, raw and zero pages only.
        pages: Pages,
        /// One version per page, in page order; never 0.
        versions: Vec<u64>,
    },
}

#[derive(Debug)]
enum State {
    AwaitHello,
    AwaitAccept,
    /// Evacuation: the stale set arrives in chunks.
    AwaitStale(PageSetAssembler),
    AwaitVmBlob,
    Running,
    Replicating,
    CompleteSent,
    Finished,
    Failed,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::AwaitHello => "awaiting the handshake",
            State::AwaitAccept => "deciding on the handshake",
            State::AwaitStale(_) => "awaiting the stale set",
            State::AwaitVmBlob => "awaiting the VM state",
            State::Running => "migrating",
            State::Replicating => "replicating",
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
    kind: SessionKind,
    vm_id: String,
    features: u64,
    received: Bitmap,
    expect_state: bool,
    pending_requests: Vec<u64>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<DestEvent>,
}

impl DestSession {
    /// A session waiting for the source's `Hello`, with an empty received bitmap over the
    /// configured layout.
    pub fn new(config: DestConfig) -> DestSession {
        DestSession {
            state: State::AwaitHello,
            kind: SessionKind::Migrate,
            vm_id: String::new(),
            features: 0,
            received: Bitmap::new(config.layout.total_pages()),
            expect_state: false,
            pending_requests: Vec::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            config,
        }
    }

    /// Pages in the configured layout.
    pub fn total_pages(&self) -> u64 {
        self.received.len()
    }

    /// The kind the source asked for (valid once the `Hello` arrived).
    pub fn kind(&self) -> SessionKind {
        self.kind
    }

    /// The features both sides agreed on (valid once the `HelloAck` went out).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Pages received from the source at least once.
    pub fn received(&self) -> &Bitmap {
        &self.received
    }

    /// Whether the handshake is done and pages are accepted: migrating or replicating, also
    /// after `Complete` went out until the source acknowledges it.
    pub fn is_running(&self) -> bool {
        matches!(
            self.state,
            State::Running | State::CompleteSent | State::Replicating
        )
    }

    /// Whether the source acknowledged `Complete`: the session ended normally.
    pub fn is_finished(&self) -> bool {
        matches!(self.state, State::Finished)
    }

    /// This side told the source it holds every page (`Complete` sent).
    pub fn complete_sent(&self) -> bool {
        matches!(self.state, State::CompleteSent | State::Finished)
    }

    /// Feeds one message received on `channel`. Data for the application comes back as
    /// `Ok(Some(delivery))`, already checked against the layout.
    pub fn handle(
        &mut self,
        channel: Channel,
        msg: Message,
    ) -> Result<Option<Delivery>, ProtoError> {
        let result = self.handle_inner(channel, msg);
        if let Err(e) = &result {
            if !matches!(e, ProtoError::Peer { .. }) && !matches!(self.state, State::Failed) {
                self.send(Channel::Control, e.to_message());
            }
            self.state = State::Failed;
        }
        result
    }

    /// Reports a codec error on incoming bytes: the session fails and tells the peer.
    pub fn handle_decode_error(&mut self, e: crate::codec::CodecError) -> ProtoError {
        let e = ProtoError::Codec(e);
        if !matches!(self.state, State::Failed) {
            self.send(Channel::Control, e.to_message());
            self.state = State::Failed;
        }
        e
    }

    fn check_range(&self, first: u64, count: u64) -> Result<(), ProtoError> {
        let total = self.total_pages();
        if first.checked_add(count).is_none_or(|end| end > total) {
            return Err(ProtoError::PageOutOfRange {
                first,
                count,
                total,
            });
        }
        Ok(())
    }

    fn handle_inner(
        &mut self,
        channel: Channel,
        msg: Message,
    ) -> Result<Option<Delivery>, ProtoError> {
        match (&mut self.state, channel, msg) {
            (_, _, Message::Error { code, message }) => Err(ProtoError::Peer { code, message }),
            (
                State::AwaitHello,
                Channel::Control,
                Message::Hello {
                    version,
                    kind,
                    vm_id,
                    layout,
                    features,
                    epoch,
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
                if !self.config.accept.contains(&kind) {
                    return Err(ProtoError::KindRefused(kind));
                }
                self.kind = kind;
                self.expect_state = features & crate::message::FEATURE_VM_STATE != 0;
                self.features = features & self.config.features & !crate::message::FEATURE_VM_STATE;
                self.vm_id = vm_id.clone();
                if kind == SessionKind::Migrate {
                    self.send_ack();
                    self.after_switchover();
                } else {
                    self.state = State::AwaitAccept;
                    self.events
                        .push_back(DestEvent::HelloReceived { kind, vm_id, epoch });
                }
                Ok(None)
            }
            (
                State::AwaitStale(asm),
                Channel::Control,
                Message::PageSet {
                    kind,
                    first_word,
                    words,
                    last,
                },
            ) => {
                if let Some(stale) = asm.add(kind, first_word, &words, last)? {
                    self.events.push_back(DestEvent::StaleSet(stale));
                    self.after_switchover();
                }
                Ok(None)
            }
            (State::AwaitVmBlob, Channel::Control, Message::VmState { blob }) => {
                self.events.push_back(DestEvent::VmState(blob));
                self.start_running();
                Ok(None)
            }
            (
                State::Running | State::CompleteSent,
                Channel::Urgent | Channel::Bulk,
                Message::Pages(pages),
            ) => {
                let count = pages.count() as u64;
                self.check_range(pages.first, count)?;
                for p in pages.first..pages.first + count {
                    self.received.set(p);
                }
                Ok(Some(Delivery::Pages(pages)))
            }
            (State::Replicating, Channel::Bulk, Message::Update { pages, versions }) => {
                self.check_range(pages.first, pages.count() as u64)?;
                Ok(Some(Delivery::Update { pages, versions }))
            }
            (
                State::Running | State::CompleteSent,
                Channel::Control,
                Message::PushDone { pages_sent },
            ) => {
                self.events.push_back(DestEvent::PushDone { pages_sent });
                Ok(None)
            }
            // A reply or pushed page that crossed our `Complete`: every page is here already.
            (State::Finished, Channel::Urgent | Channel::Bulk, Message::Pages(_)) => Ok(None),
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

    fn send_ack(&mut self) {
        self.send(
            Channel::Control,
            Message::HelloAck {
                version: PROTOCOL_VERSION,
                features: self.features,
            },
        );
    }

    /// The pages to expect are known; wait for the VM state if the source announced one.
    fn after_switchover(&mut self) {
        if self.expect_state {
            self.state = State::AwaitVmBlob;
        } else {
            self.start_running();
        }
    }

    fn start_running(&mut self) {
        self.state = State::Running;
        let pending = std::mem::take(&mut self.pending_requests);
        self.queue_requests(&pending);
        self.events.push_back(DestEvent::Established {
            vm_id: self.vm_id.clone(),
            features: self.features,
        });
    }

    /// Answers [`DestEvent::HelloReceived`]: accepts the session and tells the source which
    /// pages the local replica cannot serve (`invalid` must cover the layout's pages). In any
    /// other state, or with a bitmap of another length, it does nothing.
    pub fn accept(&mut self, invalid: &Bitmap) {
        if !matches!(self.state, State::AwaitAccept) || invalid.len() != self.total_pages() {
            return;
        }
        self.send_ack();
        for m in page_set_messages(SetKind::Invalid, invalid) {
            self.send(Channel::Control, m);
        }
        if self.kind == SessionKind::Replicate {
            self.state = State::Replicating;
            self.events.push_back(DestEvent::Established {
                vm_id: self.vm_id.clone(),
                features: self.features,
            });
        } else {
            self.state =
                State::AwaitStale(PageSetAssembler::new(SetKind::Stale, self.total_pages()));
        }
    }

    /// Replication: tells the source these (page, version) pairs are stored.
    pub fn ack(&mut self, entries: &[(u64, u64)]) {
        if !matches!(self.state, State::Replicating) {
            return;
        }
        for chunk in entries.chunks(MAX_ACKS) {
            self.send(
                Channel::Control,
                Message::Ack {
                    entries: chunk.to_vec(),
                },
            );
        }
    }

    /// Queues demand requests for `pages`. Before the handshake completes they are held back.
    pub fn request(&mut self, pages: &[u64]) {
        match self.state {
            State::AwaitHello | State::AwaitAccept | State::AwaitStale(_) | State::AwaitVmBlob => {
                self.pending_requests.extend_from_slice(pages)
            }
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
        if matches!(self.state, State::Running) {
            self.state = State::CompleteSent;
            let pages_received = self.total_pages();
            self.send(Channel::Control, Message::Complete { pages_received });
        }
    }

    /// The next message to send, in the order queued; `None` when there is nothing to send.
    /// Drain this after every call that may have queued something.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event for the application, in the order they happened.
    pub fn poll_event(&mut self) -> Option<DestEvent> {
        self.events.pop_front()
    }

    fn send(&mut self, channel: Channel, message: Message) {
        self.transmits.push_back(Transmit { channel, message });
    }
}
