//! The destination side of a session: plain migration, a standby receiving replication, or
//! a standby becoming the destination at evacuation.

use std::collections::VecDeque;

use super::{
    describe_layout, page_set_messages, Channel, PageSetAssembler, ProtoError, SessionState,
    Transmit,
};
use crate::bitmap::Bitmap;
use crate::message::{
    held_checksum, Layout, Message, Pages, SessionKind, SetKind, MAX_ACKS, MAX_REQUEST_PAGES,
    PROTOCOL_VERSION,
};

/// How a destination session is set up: the memory it prepared and what it accepts.
#[derive(Clone, Debug)]
pub struct DestConfig {
    /// The layout of the memory this side prepared; the source must send exactly this one.
    pub layout: Layout,
    /// If set, the VM id the source must announce.
    pub expected_vm_id: Option<String>,
    /// Encodings this side agrees to ([`FEATURE_LZ4`](crate::message::FEATURE_LZ4),
    /// [`FEATURE_DEDUP`](crate::message::FEATURE_DEDUP)); the `HelloAck` answers with those
    /// the `Hello` also offered. It decodes lz4 wherever the `Hello` offered it even
    /// without ([`DestSession::decodes`]).
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
            features: crate::message::FEATURE_LZ4
                | crate::message::FEATURE_DEDUP
                | crate::message::FEATURE_ZERO_RUNS,
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
        /// The negotiated features (incoming pages may also be lz4 where the `Hello`
        /// offered it: [`DestSession::decodes`]).
        features: u64,
    },
    /// The source has handed out every page.
    PushDone {
        /// The count the source sent (see [`Message::PushDone`]).
        pages_sent: u64,
    },
    /// The source acknowledged completion; the session is over.
    Finished,
    /// The connection was lost ([`DestSession::connection_lost`]): nothing moves until
    /// [`DestSession::resume`] on a new connection. Not an error. `resumable` is false when
    /// the guest had not resumed here: the next connection starts the handshake over.
    Paused {
        /// Whether the session resumes where it was (the guest runs here).
        resumable: bool,
    },
    /// The source acknowledged the `Resume`: the session runs again.
    Resumed {
        /// The connection's epoch.
        conn_epoch: u32,
    },
}

/// What a [`DestSession`] counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DestStats {
    /// Times the connection was lost after the handshake had begun.
    pub pauses: u64,
    /// Pages that arrived when already present and were dropped (not delivered).
    pub pages_duplicate: u64,
    /// Demand requests sent again on a resumed connection.
    pub requests_reissued: u64,
    /// Pages whose demand request was echoed ([`DestSession::echo`]).
    pub requests_echoed: u64,
    /// Messages ignored because they came on a lost or older connection.
    pub messages_ignored: u64,
}

/// The connection, as the destination sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Link {
    Connected,
    /// Lost; waiting for [`DestSession::resume`].
    Paused,
    /// A new connection is up; waiting for the source's `Hello`.
    AwaitHello,
    /// The `Resume` went out; waiting for the `ResumeAck` (pages are taken meanwhile).
    AwaitResumeAck,
}

/// Data the application must put in place, already checked against the layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Page contents for guest memory (migration and evacuation): every page of the run
    /// is new here.
    Pages(Pages),
    /// A run that was partly here already: only its new pages, as consecutive runs in
    /// order. The pages already present were dropped.
    PageRuns(Vec<Pages>),
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
    /// The encodings incoming pages may use: the negotiated ones, and lz4 wherever the
    /// `Hello` offered it (see [`DestSession::decodes`]).
    decodes: u64,
    received: Bitmap,
    expect_state: bool,
    pending_requests: Vec<u64>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<DestEvent>,
    link: Link,
    conn_epoch: u32,
    session_id: u128,
    /// Whether a `Hello` arrived: `session_id` is the source's.
    hello_seen: bool,
    /// Evacuation: the pages that must come from the source (the others are fresh here).
    stale: Option<Bitmap>,
    /// Evacuation: the pages the local replica cannot serve (from [`DestSession::accept`]);
    /// they join the stale set whatever the source's says.
    invalid: Option<Bitmap>,
    /// Evacuation: the stale set a source sends right behind its `Hello` (without waiting
    /// for the invalid set), held until [`DestSession::accept`].
    deferred: Vec<Message>,
    /// Pages requested on demand and not received since.
    outstanding: Bitmap,
    /// Push read on this connection's bulk stream, in [`Pages::wire_len`] units: sent with
    /// each request, so the source can leave a page whose pushed copy is on its way.
    pub(super) pushed_read: u64,
    push_done_seen: bool,
    stats: DestStats,
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
            decodes: 0,
            received: Bitmap::new(config.layout.total_pages()),
            expect_state: false,
            pending_requests: Vec::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            link: Link::Connected,
            conn_epoch: 0,
            session_id: 0,
            hello_seen: false,
            stale: None,
            invalid: None,
            deferred: Vec::new(),
            outstanding: Bitmap::new(config.layout.total_pages()),
            pushed_read: 0,
            push_done_seen: false,
            stats: DestStats::default(),
            config,
        }
    }

    /// What the session counted.
    pub fn stats(&self) -> DestStats {
        self.stats
    }

    /// The epoch of the connection the session runs on (0 until a resume).
    pub fn conn_epoch(&self) -> u32 {
        self.conn_epoch
    }

    /// The session's id, from the source's `Hello` (0 before it).
    pub fn session_id(&self) -> u128 {
        self.session_id
    }

    /// Pages requested on demand and not received since.
    pub fn outstanding(&self) -> &Bitmap {
        &self.outstanding
    }

    /// Whether the guest may run here: the handshake reached the point where it resumes
    /// (migration and evacuation), and stays so whatever happens to the connection.
    pub fn guest_may_run(&self) -> bool {
        self.kind != SessionKind::Replicate
            && matches!(
                self.state,
                State::Running | State::CompleteSent | State::Finished
            )
    }

    /// Whether the handshake is answered and the session waits for the source's VM state
    /// (which a source that connects before pausing its VM sends only then).
    pub fn awaits_vm_state(&self) -> bool {
        matches!(self.state, State::AwaitVmBlob)
    }

    /// Where the session is.
    pub fn session_state(&self) -> SessionState {
        match (&self.state, self.link) {
            (State::Failed, _) => SessionState::Failed,
            (State::Finished, _) => SessionState::Completed,
            (_, Link::Paused) => SessionState::Paused,
            (_, Link::AwaitHello | Link::AwaitResumeAck) => SessionState::Resuming,
            (State::Running | State::Replicating | State::CompleteSent, Link::Connected) => {
                SessionState::Running
            }
            (_, Link::Connected) => SessionState::Handshake,
        }
    }

    /// The pages this side holds and needs no demand reply for: received (or, at
    /// evacuation, fresh in the replica) and not requested since.
    pub fn held(&self) -> Bitmap {
        let mut held = self.received.clone();
        if let Some(stale) = &self.stale {
            held.union_with(&stale.complement());
        }
        for p in self.outstanding.iter_ones() {
            held.clear(p);
        }
        held
    }

    /// The connection is gone: the session pauses (it is not an error). Queued messages are
    /// dropped and incoming ones ignored until [`DestSession::resume`]; demand requests are
    /// kept and sent on the resumed connection. A handshake that had not resumed the guest
    /// here is forgotten: the next connection starts it over. Calling it again, or on a
    /// failed or finished session, does nothing.
    pub fn connection_lost(&mut self) {
        if matches!(self.state, State::Failed | State::Finished)
            || matches!(self.link, Link::Paused)
        {
            return;
        }
        self.link = Link::Paused;
        self.transmits.clear();
        let resumable = matches!(self.state, State::Running | State::CompleteSent);
        if !resumable {
            if matches!(self.state, State::AwaitHello) {
                return;
            }
            self.state = State::AwaitHello;
            self.expect_state = false;
            self.features = 0;
            self.decodes = 0;
            self.stale = None;
            self.invalid = None;
            self.deferred.clear();
        }
        self.stats.pauses += 1;
        self.events.push_back(DestEvent::Paused { resumable });
    }

    /// A new connection is up: returns its epoch, which the driver feeds that connection's
    /// messages with ([`DestSession::handle_in`]). The loss of the previous connection is
    /// reported first if it was not. The session answers the source's `Hello` with a
    /// `Resume` (and the pages it holds) if the guest runs here, else with a new handshake.
    pub fn resume(&mut self) -> u32 {
        if matches!(self.state, State::Failed) {
            return self.conn_epoch;
        }
        if !matches!(self.link, Link::Paused) {
            self.connection_lost();
        }
        self.conn_epoch = self.conn_epoch.saturating_add(1);
        self.link = Link::AwaitHello;
        self.pushed_read = 0;
        self.conn_epoch
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

    /// The encodings incoming pages may use (valid once the `HelloAck` went out): the
    /// negotiated ones, and lz4 whenever the `Hello` offered it, even to a destination
    /// configured without it. The source compresses the pages it pushes before the answer
    /// (protocol version 6), when it cannot know what the destination will agree to; lz4
    /// costs a destination nothing to decode, so every one does.
    pub fn decodes(&self) -> u64 {
        self.decodes
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
    /// `Ok(Some(delivery))`, already checked against the layout; pages already present are
    /// dropped (counted in [`DestStats::pages_duplicate`]).
    ///
    /// The message counts as one of the current connection; see [`DestSession::handle_in`]
    /// once connections can be lost.
    pub fn handle(
        &mut self,
        channel: Channel,
        msg: Message,
    ) -> Result<Option<Delivery>, ProtoError> {
        self.handle_in(self.conn_epoch, channel, msg)
    }

    /// [`DestSession::handle`] for a message that came on the connection of epoch
    /// `conn_epoch` (from [`DestSession::resume`]). Messages of a lost or older connection
    /// are ignored (counted in [`DestStats::messages_ignored`]).
    pub fn handle_in(
        &mut self,
        conn_epoch: u32,
        channel: Channel,
        msg: Message,
    ) -> Result<Option<Delivery>, ProtoError> {
        if !matches!(self.state, State::Failed)
            && (self.link == Link::Paused || conn_epoch != self.conn_epoch)
        {
            self.stats.messages_ignored += 1;
            return Ok(None);
        }
        let result = match (self.link, &self.state, &msg) {
            (Link::AwaitHello, State::Running | State::CompleteSent, Message::Hello { .. }) => {
                self.answer_resume(msg)
            }
            (Link::AwaitHello, State::AwaitHello, Message::Hello { .. }) => {
                self.link = Link::Connected;
                self.handle_inner(channel, msg)
            }
            (Link::AwaitHello, _, Message::Error { .. }) => self.handle_inner(channel, msg),
            (Link::AwaitHello, state, msg) => Err(ProtoError::Unexpected {
                message: msg.name(),
                channel,
                state: if matches!(state, State::AwaitHello) {
                    state.name()
                } else {
                    "awaiting the Hello of a resumed connection"
                },
            }),
            (Link::AwaitResumeAck, _, Message::ResumeAck { conn_epoch })
                if channel == Channel::Control =>
            {
                if *conn_epoch != self.conn_epoch {
                    Err(ProtoError::Unexpected {
                        message: "ResumeAck",
                        channel,
                        state: "awaiting the ResumeAck",
                    })
                } else {
                    self.link = Link::Connected;
                    self.events.push_back(DestEvent::Resumed {
                        conn_epoch: self.conn_epoch,
                    });
                    Ok(None)
                }
            }
            _ => self.handle_inner(channel, msg),
        };
        if let Err(e) = &result {
            self.fail(e);
        }
        result
    }

    /// Reports a codec error on incoming bytes: the session fails and tells the peer.
    pub fn handle_decode_error(&mut self, e: crate::codec::CodecError) -> ProtoError {
        let e = ProtoError::Codec(e);
        self.fail(&e);
        e
    }

    /// The source's `Hello` on a new connection while the guest runs here: resume with the
    /// held set, then `Complete` again if it went out, then every outstanding request.
    fn answer_resume(&mut self, hello: Message) -> Result<Option<Delivery>, ProtoError> {
        let Message::Hello {
            version,
            session_id,
            ..
        } = hello
        else {
            return Ok(None);
        };
        if version != PROTOCOL_VERSION {
            return Err(ProtoError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: version,
            });
        }
        if session_id != self.session_id {
            return Err(ProtoError::SessionMismatch {
                expected: self.session_id,
                got: session_id,
            });
        }
        self.link = Link::AwaitResumeAck;
        let held = self.held();
        self.send(
            Channel::Control,
            Message::Resume {
                session_id,
                conn_epoch: self.conn_epoch,
                features: self.features,
                pages: held.len(),
                checksum: held_checksum(held.words()),
            },
        );
        for m in page_set_messages(SetKind::Held, &held) {
            self.send(Channel::Control, m);
        }
        if matches!(self.state, State::CompleteSent) {
            let pages_received = self.total_pages();
            self.send(Channel::Control, Message::Complete { pages_received });
        }
        let outstanding: Vec<u64> = self.outstanding.iter_ones().collect();
        self.stats.requests_reissued += outstanding.len() as u64;
        // Some may be refetches (see `refetch`): all answered.
        self.queue_requests(&outstanding, 0);
        Ok(None)
    }

    /// Whether page `p` is to be delivered when it arrives: not here yet, or requested again
    /// since it came. At evacuation a page outside the stale set is fresh here already, and
    /// the guest may have written it since: it is never delivered.
    fn wanted(&self, p: u64) -> bool {
        self.outstanding.get(p)
            || (!self.received.get(p) && self.stale.as_ref().is_none_or(|s| s.get(p)))
    }

    /// Marks `pages` received and returns what to deliver (see [`DestSession::wanted`]). On
    /// the fault and push paths: a run that is wholly wanted, the usual case, costs two bit
    /// tests and two bit writes per page and no allocation.
    fn receive(&mut self, pages: Pages) -> Option<Delivery> {
        let count = pages.count() as u64;
        let first = pages.first;
        let new = (first..first + count).filter(|&p| self.wanted(p)).count() as u64;
        let delivery = if new == count {
            Some(Delivery::Pages(pages))
        } else if new == 0 {
            None
        } else {
            // Split into the runs of wanted pages (sharing the message's buffers).
            let mut runs = Vec::new();
            let mut rest = pages;
            let mut p = first;
            while p < first + count {
                let (start, keep) = (p, self.wanted(p));
                while p < first + count && self.wanted(p) == keep {
                    p += 1;
                }
                let (head, tail) = rest.split_at((p - start) as usize)?;
                if keep {
                    runs.push(head);
                }
                rest = tail;
            }
            Some(Delivery::PageRuns(runs))
        };
        for p in first..first + count {
            self.received.set(p);
            self.outstanding.clear(p);
        }
        self.stats.pages_duplicate += count - new;
        delivery
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
                    session_id,
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
                if features & crate::message::FEATURE_HANDED_OVER != 0
                    && !(self.hello_seen && session_id == self.session_id)
                {
                    return Err(ProtoError::NotHeld { session_id });
                }
                self.kind = kind;
                self.expect_state = features & crate::message::FEATURE_VM_STATE != 0;
                self.features = features
                    & self.config.features
                    & !(crate::message::FEATURE_VM_STATE | crate::message::FEATURE_HANDED_OVER);
                self.decodes = self.features | (features & crate::message::FEATURE_LZ4);
                self.vm_id = vm_id.clone();
                self.session_id = session_id;
                self.hello_seen = true;
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
                if let Some(mut stale) = asm.add(kind, first_word, &words, last)? {
                    // A source that sent its set before it heard ours did not include ours.
                    if let Some(invalid) = &self.invalid {
                        stale.union_with(invalid);
                    }
                    self.stale = Some(stale.clone());
                    self.events.push_back(DestEvent::StaleSet(stale));
                    self.after_switchover();
                }
                Ok(None)
            }
            // An evacuating source sends its stale set right behind its `Hello`; the
            // application may not have accepted yet (it checks the replica first).
            (State::AwaitAccept, Channel::Control, msg @ Message::PageSet { .. })
                if self.kind == SessionKind::Evacuate =>
            {
                if self.deferred.len() >= self.max_deferred() {
                    return Err(ProtoError::Unexpected {
                        message: msg.name(),
                        channel,
                        state: "deciding on the handshake, with the whole stale set held",
                    });
                }
                self.deferred.push(msg);
                Ok(None)
            }
            (State::AwaitVmBlob, Channel::Control, Message::VmState { blob }) => {
                self.events.push_back(DestEvent::VmState(blob));
                self.start_running();
                Ok(None)
            }
            (
                State::Running | State::CompleteSent,
                Channel::Urgent | Channel::Echo | Channel::Bulk,
                Message::Pages(pages),
            ) => {
                self.check_range(pages.first, pages.count() as u64)?;
                if channel == Channel::Bulk {
                    self.pushed_read += pages.wire_len();
                }
                Ok(self.receive(pages))
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
                // Sent again after a resume when the push had already ended.
                if !std::mem::replace(&mut self.push_done_seen, true) {
                    self.events.push_back(DestEvent::PushDone { pages_sent });
                }
                Ok(None)
            }
            // A reply or pushed page that crossed our `Complete`: every page is here already.
            (
                State::Finished,
                Channel::Urgent | Channel::Echo | Channel::Bulk,
                Message::Pages(_),
            ) => Ok(None),
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
                conn_epoch: self.conn_epoch,
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
        for &p in &pending {
            self.outstanding.set(p);
        }
        self.queue_requests(&pending, 0);
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
            self.invalid = Some(invalid.clone());
            self.state =
                State::AwaitStale(PageSetAssembler::new(SetKind::Stale, self.total_pages()));
            // What the source sent behind its `Hello` while the application decided.
            for msg in std::mem::take(&mut self.deferred) {
                if let Err(e) = self.handle_inner(Channel::Control, msg) {
                    self.fail(&e);
                    return;
                }
            }
        }
    }

    /// The most messages held before [`DestSession::accept`]: the stale set's chunks.
    fn max_deferred(&self) -> usize {
        let words = self.total_pages().div_ceil(64) as usize;
        words.div_ceil(crate::message::MAX_SET_WORDS).max(1)
    }

    /// The session fails on `e`: the peer is told why (unless the error is its own).
    fn fail(&mut self, e: &ProtoError) {
        if !matches!(e, ProtoError::Peer { .. }) && !matches!(self.state, State::Failed) {
            self.send(Channel::Control, e.to_message());
        }
        self.state = State::Failed;
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

    /// Queues demand requests for `pages`. Before the handshake completes they are held back;
    /// while the connection is lost they are kept, and sent when it resumes. A page stays
    /// outstanding until it arrives, and every outstanding page is requested again on a
    /// resumed connection.
    pub fn request(&mut self, pages: &[u64]) {
        self.request_read(pages, self.pushed_read);
    }

    /// [`DestSession::request`] for pages whose pushed copy arrived and could not be used
    /// (a reference to content not here): the source answers them even though it pushed
    /// them.
    pub fn refetch(&mut self, pages: &[u64]) {
        self.request_read(pages, 0);
    }

    fn request_read(&mut self, pages: &[u64], pushed_read: u64) {
        match self.state {
            State::AwaitHello | State::AwaitAccept | State::AwaitStale(_) | State::AwaitVmBlob => {
                self.pending_requests.extend_from_slice(pages)
            }
            State::Running => {
                for &p in pages {
                    self.outstanding.set(p);
                }
                if matches!(self.link, Link::Connected | Link::AwaitResumeAck) {
                    self.queue_requests(pages, pushed_read)
                }
            }
            _ => {}
        }
    }

    /// The echo of demand requests sent a little earlier ([`Channel::Echo`]): the requests
    /// for those of `pages` still outstanding, for the driver to send on the echo stream
    /// (which it opens when first needed). Nothing while the connection is not up: a
    /// resumed connection requests every outstanding page again.
    pub fn echo(&mut self, pages: &[u64]) -> Vec<Message> {
        if !matches!(self.state, State::Running) || self.link != Link::Connected {
            return Vec::new();
        }
        let missing: Vec<u64> = pages
            .iter()
            .copied()
            .filter(|&p| self.outstanding.get(p))
            .collect();
        self.stats.requests_echoed += missing.len() as u64;
        missing
            .chunks(MAX_REQUEST_PAGES)
            .map(|c| Message::request(c.to_vec()))
            .collect()
    }

    /// Requests for `pages`; `pushed_read` 0 when every page must be answered (see
    /// [`Message::Request`]).
    fn queue_requests(&mut self, pages: &[u64], pushed_read: u64) {
        for chunk in pages.chunks(MAX_REQUEST_PAGES) {
            self.send(
                Channel::Urgent,
                Message::Request {
                    pages: chunk.to_vec(),
                    pushed_read,
                },
            );
        }
    }

    /// Every page is present locally: tell the source, which then releases the VM.
    pub fn complete(&mut self) {
        if matches!(self.state, State::Running) {
            self.state = State::CompleteSent;
            // Paused or resuming: the resume sends it.
            if matches!(self.link, Link::Connected | Link::AwaitResumeAck) {
                let pages_received = self.total_pages();
                self.send(Channel::Control, Message::Complete { pages_received });
            }
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
        // A lost connection takes nothing more; what matters is sent again on resuming.
        if self.link != Link::Paused {
            self.transmits.push_back(Transmit { channel, message });
        }
    }
}
