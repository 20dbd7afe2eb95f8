//! The source side of a session: plain migration, replication to a standby, or evacuation
//! into a standby replica.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;

use super::push_log::PushLog;
use super::{
    page_set_messages, Channel, Ownership, PageSetAssembler, ProtoError, PushSchedule,
    SessionState, Transmit,
};
use crate::bitmap::Bitmap;
use crate::message::{held_checksum, Layout, Message, SessionKind, SetKind, PROTOCOL_VERSION};

/// How a source session is set up; [`SourceConfig::migrate`] gives the defaults.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// The VM's id, announced in the `Hello` (at most
    /// [`MAX_TEXT`](crate::message::MAX_TEXT) bytes of it are sent).
    pub vm_id: String,
    /// The guest memory layout, announced in the `Hello`; the destination must have the
    /// same one.
    pub layout: Layout,
    /// Feature bits to offer in the `Hello` besides those that `encoding` and `vm_state`
    /// imply.
    pub features: u64,
    /// Push pages in the background. Off, pages move only on demand (for measuring
    /// demand-fault latency alone).
    pub push: bool,
    /// What the session is for, announced in the `Hello`.
    pub kind: SessionKind,
    /// Replication epoch (random per source run); versions compare only within one.
    pub epoch: u64,
    /// Evacuation: the pages whose current version the standby has not acknowledged.
    pub stale: Option<Bitmap>,
    /// The VMM's vCPU and device state, sent at switchover (announced in the `Hello`).
    pub vm_state: Option<Vec<u8>>,
    /// How pushed pages are encoded (announced as features; the destination may refuse).
    pub encoding: crate::encoding::EncodingPolicy,
    /// Send demand replies on the bulk stream, queued behind the push, instead of on their
    /// own higher-priority stream. Only to measure what the separate stream is worth.
    pub replies_on_bulk: bool,
    /// Pages to push before all others, in this order (the guest agent's hot ranges);
    /// global page numbers, clipped to the layout. Empty: the plain order.
    pub hot: Vec<Range<u64>>,
    /// Pages the application's [`crate::quic::PageReader`] serves as zeros without reading
    /// guest memory (free pages it skips). The push keeps them in runs of their own, so
    /// every run the reader is asked for is all zero-filled or all real memory.
    pub zero_filled: Option<Bitmap>,
    /// At evacuation: the content the standby's replica holds, for references into it
    /// (filled by the application while the session runs; see
    /// [`crate::encoding::ReplicaIndex`]). Used only when deduplication is negotiated.
    pub replica_index: Option<crate::encoding::ReplicaIndex>,
    /// Push beside the handshake, before the destination answers (see
    /// [`SourceSession::may_push_early`]). On by default: it saves a round trip of link
    /// time, at the cost of sending that round trip's pages without references (lz4 where
    /// the policy allows it, else raw).
    pub early_push: bool,
    /// The session's id, sent in every `Hello`; a resume must name it. Random by default
    /// (from the system's random source).
    pub session_id: u128,
    /// The VM state (and the hot ranges and zero-filled set) come later, through
    /// [`SourceSession::hand_over`]: the handshake runs while the VM still runs at the
    /// source, and after the destination's answer the session sends nothing, pushes
    /// nothing and serves nothing until the hand-over. The `Hello` announces VM state as if
    /// `vm_state` were set; `early_push` is ignored (memory is not frozen yet). For a VMM
    /// that connects before it pauses, so the handshake is not part of the downtime.
    pub state_later: bool,
}

/// A random session id from the system's random source.
pub fn random_session_id() -> u128 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    // Without a working random source, fall back on the clock and the process id: the id
    // only has to differ from other sessions' ids that this destination could meet.
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        return t ^ (u128::from(std::process::id()) << 96);
    }
    u128::from_le_bytes(b)
}

impl SourceConfig {
    /// A plain postcopy migration of `layout` with the background push on.
    pub fn migrate(vm_id: impl Into<String>, layout: Layout) -> SourceConfig {
        SourceConfig {
            vm_id: vm_id.into(),
            layout,
            features: 0,
            push: true,
            kind: SessionKind::Migrate,
            epoch: 0,
            stale: None,
            vm_state: None,
            encoding: crate::encoding::EncodingPolicy::AUTO,
            replies_on_bulk: false,
            hot: Vec::new(),
            zero_filled: None,
            replica_index: None,
            early_push: true,
            session_id: random_session_id(),
            state_later: false,
        }
    }
}

/// What the source application must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceEvent {
    /// The destination accepted the handshake; the push (or replication) may start.
    Established {
        /// The negotiated features from the `HelloAck`: the encodings pages may use.
        features: u64,
    },
    /// Replication: pages the standby cannot serve; they count as never acknowledged.
    Invalid(Bitmap),
    /// Replication: the standby stored these (page, version) pairs.
    Acked(Vec<(u64, u64)>),
    /// The destination has every page; the session is over.
    Finished,
    /// The connection was lost ([`SourceSession::connection_lost`]): nothing moves until
    /// [`SourceSession::resume`] on a new connection. Not an error.
    Paused,
    /// The session runs again on the connection of epoch `conn_epoch`.
    Resumed {
        /// The new connection's epoch.
        conn_epoch: u32,
        /// The destination had not resumed the guest: the handshake started over and
        /// every page that must cross is pushed again (an `Established` follows).
        handshake_restarted: bool,
        /// Pages the push still has to send (not held by the destination).
        pages_to_push: u64,
    },
}

#[derive(Debug)]
enum State {
    HelloSent,
    /// A standby answered; its invalid pages arrive in chunks.
    AwaitInvalid(PageSetAssembler),
    Running,
    Finished,
    Failed,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::HelloSent => "awaiting the handshake reply",
            State::AwaitInvalid(_) => "awaiting the standby's invalid pages",
            State::Running => "running",
            State::Finished => "finished",
            State::Failed => "failed",
        }
    }
}

/// The connection, as the source sees it.
#[derive(Debug)]
enum Link {
    Connected,
    /// Lost; waiting for [`SourceSession::resume`].
    Paused,
    /// The `Hello` went out on a new connection; waiting for `HelloAck` or `Resume`.
    Resuming,
    /// A `Resume` arrived; its held set comes in chunks.
    AwaitHeld {
        asm: PageSetAssembler,
        checksum: u64,
        features: u64,
    },
}

/// What a [`SourceSession`] counted (see its accessors of the same names).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceStats {
    /// Pages requested on demand.
    pub pages_served: u64,
    /// Pages sent again because the destination echoed its request
    /// ([`Channel::Echo`]); not in [`SourceStats::pages_served`].
    pub pages_echoed: u64,
    /// Requested pages not answered because their pushed copy had already left and would
    /// arrive first (`push_log`); not in [`SourceStats::pages_served`].
    pub pages_on_their_way: u64,
    /// Pages handed to the background push.
    pub pages_pushed: u64,
    /// Of those, handed out before the destination answered the handshake.
    pub pages_pushed_early: u64,
    /// Of those, from the hot ranges ([`SourceConfig::hot`]), before any other page.
    pub pages_pushed_hot: u64,
    /// Pages that must cross: all of them for a migration, the stale set at evacuation.
    pub pages_stale: u64,
    /// Times the connection was lost while the session was not finished.
    pub pauses: u64,
    /// Pages pushed or served again on a later connection after they had been sent on an
    /// earlier one (a page counts once per pause it is sent again after).
    pub pages_resent: u64,
    /// [`SourceStats::pages_resent`] in bytes of raw page data (before any encoding).
    pub bytes_resent: u64,
    /// Messages ignored because they came on a lost or older connection.
    pub messages_ignored: u64,
}

/// Source session: sends the handshake, serves demand requests, schedules the push.
#[derive(Debug)]
pub struct SourceSession {
    config: SourceConfig,
    state: State,
    push: PushSchedule,
    push_done_sent: bool,
    /// Pages the push handed out before the session ran (see [`SourceSession::next_push`]).
    pushed_early: Bitmap,
    pages_served: u64,
    /// Pages served on demand (on the urgent channel) at least once.
    served_on_demand: Bitmap,
    /// Serve every echoed request, not only those whose first copy was not served: the
    /// path loses packets ([`SourceSession::set_echo_all`]).
    echo_all: bool,
    pages_echoed: u64,
    /// Where this connection's pushed frames end, for requests that the push answers.
    push_log: PushLog,
    /// Every frame the push handed to the stream, on every connection, shared with the
    /// application ([`SourceSession::push_tally`]).
    push_tally: Arc<super::PushTally>,
    pages_on_their_way: u64,
    pages_pushed: u64,
    pages_pushed_hot: u64,
    pages_stale: u64,
    transmits: VecDeque<Transmit>,
    events: VecDeque<SourceEvent>,
    link: Link,
    /// The destination's epoch of the connection (from its `HelloAck` or `Resume`).
    conn_epoch: u32,
    /// This side's number for the current connection, from [`SourceSession::resume`].
    connection: u32,
    owner: Ownership,
    /// Whether the destination answered a `Hello` of this session (a `HelloAck` or a
    /// `Resume`): from then on it knows the session's id.
    answered: bool,
    /// Features offered in the first `Hello`, offered again when the handshake restarts.
    offered: u64,
    /// Features the destination agreed to (0 until it answered the `Hello`); a resumed
    /// connection keeps them.
    agreed: u64,
    /// Evacuation: the stale set went out right behind this handshake's `Hello`, before
    /// the standby's invalid set (which the standby adds itself; see
    /// [`SourceSession::send_stale_early`]).
    stale_sent: bool,
    /// What the handshake needs again if it starts over on a new connection.
    initial_stale: Option<Bitmap>,
    initial_vm_state: Option<Vec<u8>>,
    /// The application has handed over what [`SourceConfig::state_later`] defers (always
    /// true without it).
    handed: bool,
    /// Pages sent on any connection so far.
    ever_sent: Bitmap,
    /// Pages sent before the last pause and not sent since: sending one counts as a resend.
    resend_candidates: Bitmap,
    /// Pages served on demand while the held set was arriving, for the new schedule.
    served_while_resuming: Vec<u64>,
    pauses: u64,
    pages_resent: u64,
    messages_ignored: u64,
}

/// Applies the configured hot ranges and zero-filled set to a schedule.
fn schedule(base: PushSchedule, config: &SourceConfig) -> PushSchedule {
    let s = base.with_priority(&config.hot);
    match &config.zero_filled {
        Some(z) => s.with_uniform_runs(z.clone()),
        None => s,
    }
}

fn features_of(config: &SourceConfig) -> u64 {
    let state = if config.vm_state.is_some() || config.state_later {
        crate::message::FEATURE_VM_STATE
    } else {
        0
    };
    // Long zero runs cost the destination nothing to read: always offered.
    state | config.encoding.features() | crate::message::FEATURE_ZERO_RUNS
}

/// The schedule a handshake starts with: at evacuation the pages the source knows are
/// stale (the standby's invalid pages join later), else all.
fn first_schedule(config: &SourceConfig) -> PushSchedule {
    let pages = config.layout.total_pages();
    let first = match (config.kind, &config.stale) {
        (SessionKind::Evacuate, Some(stale)) if stale.len() == pages => PushSchedule::only(stale),
        _ => PushSchedule::new(pages),
    };
    schedule(first, config)
}

impl SourceSession {
    /// A new session; the `Hello` is queued at once.
    pub fn new(config: SourceConfig) -> SourceSession {
        let pages = config.layout.total_pages();
        // A migration without VM state lets the destination resume the guest as soon as it
        // has the `Hello`: the VM is handed over from here on.
        let owner = if config.kind == SessionKind::Migrate
            && config.vm_state.is_none()
            && !config.state_later
        {
            Ownership::Destination
        } else {
            Ownership::Source
        };
        let mut s = SourceSession {
            state: State::HelloSent,
            push: first_schedule(&config),
            push_done_sent: false,
            pushed_early: Bitmap::new(pages),
            pages_served: 0,
            served_on_demand: Bitmap::new(pages),
            echo_all: false,
            pages_echoed: 0,
            push_log: PushLog::new(pages),
            push_tally: Arc::default(),
            pages_on_their_way: 0,
            pages_pushed: 0,
            pages_pushed_hot: 0,
            pages_stale: pages,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            link: Link::Connected,
            conn_epoch: 0,
            connection: 0,
            owner,
            answered: false,
            offered: config.features | features_of(&config),
            agreed: 0,
            stale_sent: false,
            initial_stale: config.stale.clone(),
            initial_vm_state: config.vm_state.clone(),
            handed: !(config.state_later && config.kind != SessionKind::Replicate),
            ever_sent: Bitmap::new(pages),
            resend_candidates: Bitmap::new(pages),
            served_while_resuming: Vec::new(),
            pauses: 0,
            pages_resent: 0,
            messages_ignored: 0,
            config,
        };
        s.send_hello();
        s.send_stale_early();
        s
    }

    /// An evacuation sends its stale set right behind the `Hello`, without waiting a round
    /// trip for the standby's invalid set: the standby adds that set to the stale one
    /// itself, and prepares its replica (punching the stale pages out of it, a few
    /// microseconds a page) while the `HelloAck` and the invalid set travel. The VM state
    /// still waits for them: until the standby answered, a refusal leaves the VM here.
    /// Only with a VM state to send (without one the stale set is what lets the standby
    /// resume the guest, so it must wait for the answer too), and only on the first
    /// connection: a handshake that starts over on a later one sends the stale set after
    /// the invalid set, as before.
    fn send_stale_early(&mut self) {
        if self.config.kind != SessionKind::Evacuate || self.config.vm_state.is_none() {
            return;
        }
        let pages = self.total_pages();
        let stale = match &self.config.stale {
            Some(s) if s.len() == pages => s.clone(),
            _ => Bitmap::new(pages).complement(),
        };
        for m in page_set_messages(SetKind::Stale, &stale) {
            self.send(Channel::Control, m);
        }
        self.stale_sent = true;
    }

    fn send_hello(&mut self) {
        // A destination that ran the guest and lost the session must not start it over.
        let handed_over = if self.answered
            && self.owner != Ownership::Source
            && self.config.kind != SessionKind::Replicate
        {
            crate::message::FEATURE_HANDED_OVER
        } else {
            0
        };
        self.send(
            Channel::Control,
            Message::Hello {
                version: PROTOCOL_VERSION,
                kind: self.config.kind,
                vm_id: self.config.vm_id.clone(),
                layout: self.config.layout.clone(),
                features: self.offered | handed_over,
                epoch: self.config.epoch,
                session_id: self.config.session_id,
            },
        );
    }

    /// Sends the VM state, once the destination knows which pages it will receive. From
    /// here on the destination may resume the guest (migration and evacuation).
    fn send_vm_state(&mut self) {
        if !self.handed {
            // Held until `hand_over`: the VM still runs here.
            return;
        }
        if let Some(blob) = self.config.vm_state.take() {
            self.send(Channel::Control, Message::VmState { blob });
        }
        if self.config.kind != SessionKind::Replicate && self.owner == Ownership::Source {
            self.owner = Ownership::Destination;
        }
    }

    /// Whether the session waits for [`SourceSession::hand_over`] (see
    /// [`SourceConfig::state_later`]).
    pub fn awaits_hand_over(&self) -> bool {
        !self.handed
    }

    /// Hands over what [`SourceConfig::state_later`] deferred, once the VM is paused and its
    /// memory frozen: the VM state blob, the hot ranges to push first and the zero-filled
    /// pages (as [`SourceConfig::hot`] and [`SourceConfig::zero_filled`]). If the handshake
    /// is done the `VmState` is queued at once (the destination may resume the guest from
    /// it) and the push may start; otherwise it goes out when the destination answers.
    /// Returns false, changing nothing, if the session was not waiting for it.
    pub fn hand_over(
        &mut self,
        vm_state: Vec<u8>,
        hot: Vec<Range<u64>>,
        zero_filled: Option<Bitmap>,
    ) -> bool {
        if self.handed || matches!(self.state, State::Failed | State::Finished) {
            return false;
        }
        self.config.vm_state = Some(vm_state.clone());
        self.initial_vm_state = Some(vm_state);
        self.config.hot = hot;
        self.config.zero_filled = zero_filled;
        // Nothing was pushed or served before the hand-over: the schedule starts afresh.
        self.push = first_schedule(&self.config);
        self.handed = true;
        if matches!(self.state, State::Running) && matches!(self.link, Link::Connected) {
            self.send_vm_state();
        }
        true
    }

    /// The session's id, as sent in the `Hello`.
    pub fn session_id(&self) -> u128 {
        self.config.session_id
    }

    /// The epoch of the connection the session runs on, as the destination numbered it in
    /// its `HelloAck` or `Resume` (0 until a resume).
    pub fn conn_epoch(&self) -> u32 {
        self.conn_epoch
    }

    /// This side's number for the current connection: 0, then what
    /// [`SourceSession::resume`] returned last.
    pub fn connection(&self) -> u32 {
        self.connection
    }

    /// Where the VM may run (see [`Ownership`]): the driver may resume the VM at the source
    /// after a failure only while this is [`Ownership::Source`].
    pub fn ownership(&self) -> Ownership {
        self.owner
    }

    /// Where the session is.
    pub fn session_state(&self) -> SessionState {
        match (&self.state, &self.link) {
            (State::Failed, _) => SessionState::Failed,
            (State::Finished, _) => SessionState::Completed,
            (_, Link::Paused) => SessionState::Paused,
            (_, Link::Resuming | Link::AwaitHeld { .. }) => SessionState::Resuming,
            (State::HelloSent | State::AwaitInvalid(_), Link::Connected) => SessionState::Handshake,
            (State::Running, Link::Connected) => SessionState::Running,
        }
    }

    /// The connection is gone: the session pauses (it is not an error). Queued messages
    /// are dropped, and until [`SourceSession::resume`] nothing is queued and every incoming
    /// message is ignored. Calling it again, or on a failed session, does nothing.
    pub fn connection_lost(&mut self) {
        if matches!(self.state, State::Failed) || matches!(self.link, Link::Paused) {
            return;
        }
        self.link = Link::Paused;
        self.transmits.clear();
        self.served_while_resuming.clear();
        if matches!(self.state, State::Finished) {
            return;
        }
        self.pauses += 1;
        self.resend_candidates = self.ever_sent.clone();
        self.events.push_back(SourceEvent::Paused);
    }

    /// A new connection is up: queues the `Hello` that opens it (the loss of the previous
    /// one is reported first if it was not) and returns this side's number for the
    /// connection, which the driver feeds its messages with ([`SourceSession::handle_in`]).
    /// A failed session stays failed: nothing is queued and its number does not change.
    pub fn resume(&mut self) -> u32 {
        if matches!(self.state, State::Failed) {
            return self.connection;
        }
        if !matches!(self.link, Link::Paused) {
            self.connection_lost();
        }
        self.connection = self.connection.wrapping_add(1);
        self.link = Link::Resuming;
        // The new connection's push starts a new bulk stream.
        self.push_log = PushLog::new(self.total_pages());
        self.send_hello();
        self.connection
    }

    /// Pages in the layout.
    pub fn total_pages(&self) -> u64 {
        self.push.pages()
    }

    /// The kind of session, as configured.
    pub fn kind(&self) -> SessionKind {
        self.config.kind
    }

    /// The encoding policy asked for; the driver limits it to the negotiated features.
    pub fn encoding(&self) -> crate::encoding::EncodingPolicy {
        self.config.encoding
    }

    /// The features the `Hello` offers.
    pub fn offered(&self) -> u64 {
        self.offered
    }

    /// The features the destination agreed to: 0 until it answered the `Hello` (its
    /// `HelloAck`, or a `Resume` in its place), then kept by a resumed connection.
    pub fn features(&self) -> u64 {
        self.agreed
    }

    /// Whether demand replies share the bulk stream (comparison mode).
    pub fn replies_on_bulk(&self) -> bool {
        self.config.replies_on_bulk
    }

    /// The replica's content index, if the application provides one.
    pub fn replica_index(&self) -> Option<crate::encoding::ReplicaIndex> {
        self.config.replica_index.clone()
    }

    /// Whether the handshake is done and the session runs, until the destination's
    /// `Complete`.
    pub fn is_running(&self) -> bool {
        matches!(self.state, State::Running)
    }

    /// Whether the push may run before the handshake is answered: a migration or an
    /// evacuation with the push on, waiting for the destination. Nothing is negotiated yet,
    /// so those pages go out raw or lz4 (which a destination decodes whenever the `Hello`
    /// offered it), never as references; the destination holds them until the session
    /// runs. It saves the round trip of the handshake on a long link.
    pub fn may_push_early(&self) -> bool {
        matches!(self.state, State::HelloSent | State::AwaitInvalid(_))
            && matches!(self.link, Link::Connected)
            && self.config.early_push
            && self.handed
            && self.config.push
            && self.config.kind != SessionKind::Replicate
    }

    /// Whether the destination reported every page present and the `CompleteAck` is
    /// queued: the session ended normally.
    pub fn is_finished(&self) -> bool {
        matches!(self.state, State::Finished)
    }

    /// Pages the push handed out before the destination answered the handshake.
    pub fn pages_pushed_early(&self) -> u64 {
        self.pushed_early.count_ones()
    }

    /// Pages sent as replies to demand requests.
    pub fn pages_served(&self) -> u64 {
        self.pages_served
    }

    /// Whether an echoed request ([`Channel::Echo`]) is served even when its first copy
    /// was: set while the path loses packets, so that a fault waits for a retransmission
    /// only if both replies lost one. Without it an echo is served only when the urgent
    /// request has not arrived (lost, or held up behind a lost packet of its stream), so a
    /// clean path carries each reply once.
    pub fn set_echo_all(&mut self, all: bool) {
        self.echo_all = all;
    }

    /// Pages handed to the background push.
    pub fn pages_pushed(&self) -> u64 {
        self.pages_pushed
    }

    /// Pages pushed from the hot ranges ([`SourceConfig::hot`]), i.e. before any other
    /// page; hot pages the destination asked for first count as served, not here.
    pub fn pages_pushed_hot(&self) -> u64 {
        self.pages_pushed_hot
    }

    /// Pages that must cross: all of them for a migration, the stale set at evacuation.
    pub fn pages_stale(&self) -> u64 {
        self.pages_stale
    }

    /// Everything the session counted, for the driver's report.
    pub fn stats(&self) -> SourceStats {
        SourceStats {
            pages_served: self.pages_served,
            pages_echoed: self.pages_echoed,
            pages_on_their_way: self.pages_on_their_way,
            pages_pushed: self.pages_pushed,
            pages_pushed_early: self.pages_pushed_early(),
            pages_pushed_hot: self.pages_pushed_hot,
            pages_stale: self.pages_stale,
            pauses: self.pauses,
            pages_resent: self.pages_resent,
            bytes_resent: self.pages_resent * u64::from(self.config.layout.page_size),
            messages_ignored: self.messages_ignored,
        }
    }

    /// Feeds one message received on `channel`. A demand request returns the pages the
    /// destination is blocked on: read and send them on the urgent channel now. (They are
    /// data for the urgent path, like [`crate::proto::Delivery`] on the destination, not an
    /// event: the task serving the urgent stream gets them without waiting on the control
    /// loop.) Every other message returns nothing to serve.
    ///
    /// The message counts as one of the current connection; see
    /// [`SourceSession::handle_in`] once connections can be lost.
    pub fn handle(&mut self, channel: Channel, msg: Message) -> Result<Vec<u64>, ProtoError> {
        self.handle_in(self.connection, channel, msg)
    }

    /// [`SourceSession::handle`] for a message that came on connection `connection` (this
    /// side's number for it, from [`SourceSession::resume`]; 0 for the first). Messages of
    /// a lost or older connection are ignored (counted in
    /// [`SourceStats::messages_ignored`]).
    pub fn handle_in(
        &mut self,
        connection: u32,
        channel: Channel,
        msg: Message,
    ) -> Result<Vec<u64>, ProtoError> {
        if !matches!(self.state, State::Failed)
            && (matches!(self.link, Link::Paused) || connection != self.connection)
        {
            self.messages_ignored += 1;
            return Ok(Vec::new());
        }
        let result = match self.link {
            Link::Connected => self.handle_inner(channel, msg),
            _ => self.handle_resuming(channel, msg),
        };
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

    /// A message while the link is being resumed: the answer to the `Hello`, then the held
    /// set (demand requests are served meanwhile).
    fn handle_resuming(&mut self, channel: Channel, msg: Message) -> Result<Vec<u64>, ProtoError> {
        let resumable = self.resumable();
        match (&mut self.link, channel, msg) {
            (_, _, Message::Error { code, message }) => Err(ProtoError::Peer { code, message }),
            (Link::Resuming, Channel::Control, msg @ Message::HelloAck { .. }) => {
                // The destination never resumed the guest: start over, as on the first
                // connection. Whatever it received is gone with its handshake.
                if matches!(self.state, State::Finished) {
                    return Err(self.unexpected(Channel::Control, &msg, "finished"));
                }
                // Its number as is: a destination that restarted counts from 0 again (this
                // side numbers its connections itself, so no old message can pass for it).
                if let Message::HelloAck { conn_epoch, .. } = &msg {
                    self.conn_epoch = *conn_epoch;
                }
                self.link = Link::Connected;
                self.state = State::HelloSent;
                self.stale_sent = false;
                // The stale set first: the schedule is built from it.
                self.config.stale = self.initial_stale.clone();
                self.config.vm_state = self.initial_vm_state.clone();
                self.push = first_schedule(&self.config);
                for p in self.served_while_resuming.drain(..) {
                    self.push.on_demand(p);
                }
                self.pushed_early = Bitmap::new(self.total_pages());
                self.set_push_done(false);
                self.events.push_back(SourceEvent::Resumed {
                    conn_epoch: self.conn_epoch,
                    handshake_restarted: true,
                    pages_to_push: self.push.remaining(),
                });
                self.handle_inner(Channel::Control, msg)
            }
            (
                Link::Resuming,
                Channel::Control,
                Message::Resume {
                    session_id,
                    conn_epoch,
                    features,
                    pages,
                    checksum,
                },
            ) => {
                if session_id != self.config.session_id {
                    return Err(ProtoError::SessionMismatch {
                        expected: self.config.session_id,
                        got: session_id,
                    });
                }
                self.answered = true;
                if !resumable {
                    let state = self.state.name();
                    return Err(ProtoError::Unexpected {
                        message: "Resume",
                        channel: Channel::Control,
                        state,
                    });
                }
                let total = self.total_pages();
                if pages != total {
                    return Err(ProtoError::HeldLength {
                        expected: total,
                        got: pages,
                    });
                }
                self.conn_epoch = self.newer_epoch(&Message::ResumeAck { conn_epoch })?;
                self.link = Link::AwaitHeld {
                    asm: PageSetAssembler::new(SetKind::Held, total),
                    checksum,
                    features,
                };
                Ok(Vec::new())
            }
            (
                Link::AwaitHeld {
                    asm,
                    checksum,
                    features,
                },
                Channel::Control,
                Message::PageSet {
                    kind,
                    first_word,
                    words,
                    last,
                },
            ) => {
                let (announced, features) = (*checksum, *features);
                let Some(held) = asm.add(kind, first_word, &words, last)? else {
                    return Ok(Vec::new());
                };
                let got = held_checksum(held.words());
                if got != announced {
                    return Err(ProtoError::HeldChecksum { announced, got });
                }
                self.resumed(&held, features);
                Ok(Vec::new())
            }
            // The destination re-issues its requests right after its `Resume`, on another
            // stream: they may come first. Serve them now; the new schedule skips them.
            (
                Link::Resuming | Link::AwaitHeld { .. },
                Channel::Urgent,
                Message::Request { pages, pushed_read },
            ) if resumable => {
                if matches!(self.state, State::Finished) {
                    return Ok(Vec::new());
                }
                let served = self.serve(pages, pushed_read)?;
                self.served_while_resuming.extend_from_slice(&served);
                Ok(served)
            }
            // Its first copy is served above when it comes.
            (Link::Resuming | Link::AwaitHeld { .. }, Channel::Echo, Message::Request { .. })
                if resumable =>
            {
                Ok(Vec::new())
            }
            (link, channel, msg) => {
                let state = match link {
                    Link::AwaitHeld { .. } => "awaiting the held set",
                    _ => "awaiting the answer to a resumed Hello",
                };
                Err(self.unexpected(channel, &msg, state))
            }
        }
    }

    /// Whether the destination may have resumed the guest, so that it may resume the
    /// session: only after this side handed the VM over.
    fn resumable(&self) -> bool {
        let handed = match self.state {
            State::Running | State::Finished => true,
            State::HelloSent => self.owner != Ownership::Source,
            State::AwaitInvalid(_) | State::Failed => false,
        };
        handed && self.config.kind != SessionKind::Replicate
    }

    /// The epoch the destination gave a new connection: newer than every earlier one.
    fn newer_epoch(&self, msg: &Message) -> Result<u32, ProtoError> {
        match msg {
            Message::HelloAck { conn_epoch, .. } | Message::ResumeAck { conn_epoch }
                if *conn_epoch > self.conn_epoch =>
            {
                Ok(*conn_epoch)
            }
            _ => Err(self.unexpected(
                Channel::Control,
                msg,
                "resuming: the connection epoch must grow",
            )),
        }
    }

    fn unexpected(&self, channel: Channel, msg: &Message, state: &'static str) -> ProtoError {
        ProtoError::Unexpected {
            message: msg.name(),
            channel,
            state,
        }
    }

    /// The destination agreed to `features`: the session is established.
    fn established(&mut self, features: u64) {
        self.agreed = features;
        self.events.push_back(SourceEvent::Established { features });
    }

    /// The held set arrived: push exactly what the destination does not hold.
    fn resumed(&mut self, held: &Bitmap, features: u64) {
        self.link = Link::Connected;
        let handshake = matches!(self.state, State::HelloSent);
        if !matches!(self.state, State::Finished) {
            self.state = State::Running;
            let mut next = schedule(PushSchedule::only(&held.complement()), &self.config);
            for p in self.served_while_resuming.drain(..) {
                next.on_demand(p);
            }
            self.push = next;
            self.set_push_done(false);
        }
        self.served_while_resuming.clear();
        let conn_epoch = self.conn_epoch;
        self.send(Channel::Control, Message::ResumeAck { conn_epoch });
        self.events.push_back(SourceEvent::Resumed {
            conn_epoch,
            handshake_restarted: false,
            pages_to_push: if self.config.push {
                self.push.remaining()
            } else {
                0
            },
        });
        if handshake {
            // The `HelloAck` was lost with the first connection; the `Resume` says the same.
            self.established(features);
        }
    }

    /// Checks and counts a demand request; returns the pages to send: those whose pushed
    /// copy had not left when the request was sent (see [`PushLog::on_its_way`]).
    fn serve(&mut self, mut pages: Vec<u64>, pushed_read: u64) -> Result<Vec<u64>, ProtoError> {
        self.check_request(&pages)?;
        // Replies on the bulk stream would count in the destination's `pushed_read`.
        if !self.config.replies_on_bulk {
            let before = pages.len();
            pages.retain(|&p| !self.push_log.on_its_way(p, pushed_read));
            self.pages_on_their_way += (before - pages.len()) as u64;
        }
        for &p in &pages {
            self.push.on_demand(p);
            self.note_sent(p);
            self.served_on_demand.set(p);
        }
        self.pages_served += pages.len() as u64;
        Ok(pages)
    }

    /// An echoed request (see [`SourceSession::set_echo_all`]): checked like a first one;
    /// returns the pages to send on the echo channel.
    fn serve_echo(&mut self, mut pages: Vec<u64>) -> Result<Vec<u64>, ProtoError> {
        self.check_request(&pages)?;
        if !self.echo_all {
            pages.retain(|&p| !self.served_on_demand.get(p));
        }
        for &p in &pages {
            // A second reply leaves the push where the first one put it.
            if !self.served_on_demand.get(p) {
                self.push.on_demand(p);
                self.note_sent(p);
            }
        }
        self.pages_echoed += pages.len() as u64;
        Ok(pages)
    }

    /// A demand request is for a VM the destination holds, and names pages that exist.
    fn check_request(&self, pages: &[u64]) -> Result<(), ProtoError> {
        if !self.handed {
            // The destination has no VM state yet, so no guest that could fault.
            return Err(ProtoError::Unexpected {
                message: "Request",
                channel: Channel::Urgent,
                state: "awaiting the hand-over of the VM",
            });
        }
        let total = self.total_pages();
        match pages.iter().find(|&&p| p >= total) {
            Some(&bad) => Err(ProtoError::PageOutOfRange {
                first: bad,
                count: 1,
                total,
            }),
            None => Ok(()),
        }
    }

    /// A request on `channel`: the first copy (urgent) or an echo (answered whatever the
    /// push did: it comes only when the page is late).
    fn serve_on(
        &mut self,
        channel: Channel,
        pages: Vec<u64>,
        pushed_read: u64,
    ) -> Result<Vec<u64>, ProtoError> {
        match channel {
            Channel::Echo => self.serve_echo(pages),
            _ => self.serve(pages, pushed_read),
        }
    }

    /// The driver handed these frames to connection `connection`'s bulk stream (after
    /// [`SourceSession::next_push`] gave out their pages), in the order written. Frames of
    /// an older connection are not counted: that stream is gone.
    pub fn note_pushed(&mut self, connection: u32, frames: &[crate::message::Pages]) {
        if connection != self.connection {
            return;
        }
        for f in frames {
            self.push_log
                .record(f.first, f.count() as u64, f.wire_len());
        }
        self.push_tally.add(frames);
    }

    /// The push's counters, shared: an application reads them while the session runs to
    /// tell how many pages have left ([`super::Pushed::pages_sent`]).
    pub fn push_tally(&self) -> Arc<super::PushTally> {
        self.push_tally.clone()
    }

    /// The push handed out its last page (`PushDone` queued), or a resume gave it pages
    /// again (which the shared tally hears at once; that it is done, it hears from
    /// [`SourceSession::note_push_written`]).
    fn set_push_done(&mut self, done: bool) {
        self.push_done_sent = done;
        if !done {
            self.push_tally.set_done(false);
        }
    }

    /// The driver wrote the push's last frames on connection `connection`'s bulk stream
    /// (after [`SourceSession::next_push`] had none left): the shared tally says the push
    /// is done, its last bytes now in the stream. Nothing for an older connection's push,
    /// nor before the push has handed out its last page.
    pub fn note_push_written(&mut self, connection: u32) {
        if connection == self.connection && self.push_done_sent {
            self.push_tally.set_done(true);
        }
    }

    /// The driver's estimate of the push bytes that leave between the destination reading
    /// one and the source reading a request sent then: its delivery rate × the round trip.
    pub fn set_push_in_flight(&mut self, bytes: u64) {
        self.push_log.set_in_flight(bytes);
    }

    /// Page `p` goes out; a page sent before the last pause counts as resent.
    fn note_sent(&mut self, p: u64) {
        if self.resend_candidates.clear(p) {
            self.pages_resent += 1;
        }
        self.ever_sent.set(p);
    }

    fn handle_inner(&mut self, channel: Channel, msg: Message) -> Result<Vec<u64>, ProtoError> {
        let kind = self.config.kind;
        match (&mut self.state, channel, msg) {
            (_, _, Message::Error { code, message }) => Err(ProtoError::Peer { code, message }),
            (
                State::HelloSent,
                Channel::Control,
                Message::HelloAck {
                    version, features, ..
                },
            ) => {
                if version != PROTOCOL_VERSION {
                    return Err(ProtoError::VersionMismatch {
                        ours: PROTOCOL_VERSION,
                        theirs: version,
                    });
                }
                self.answered = true;
                if kind == SessionKind::Migrate {
                    self.state = State::Running;
                    self.send_vm_state();
                    self.established(features);
                } else {
                    self.state = State::AwaitInvalid(PageSetAssembler::new(
                        SetKind::Invalid,
                        self.total_pages(),
                    ));
                    // Established once the invalid set is in.
                    self.agreed = features;
                }
                Ok(Vec::new())
            }
            (
                State::AwaitInvalid(asm),
                Channel::Control,
                Message::PageSet {
                    kind: set,
                    first_word,
                    words,
                    last,
                },
            ) => {
                let Some(invalid) = asm.add(set, first_word, &words, last)? else {
                    return Ok(Vec::new());
                };
                self.state = State::Running;
                if kind == SessionKind::Evacuate {
                    let mut stale = self
                        .config
                        .stale
                        .take()
                        .unwrap_or_else(|| Bitmap::new(self.total_pages()).complement());
                    stale.union_with(&invalid);
                    self.pages_stale = stale.count_ones();
                    if !self.stale_sent {
                        for m in page_set_messages(SetKind::Stale, &stale) {
                            self.send(Channel::Control, m);
                        }
                    }
                    // Pages pushed before this answer are not pushed again.
                    let mut next = schedule(PushSchedule::only(&stale), &self.config);
                    next.mark_sent(&self.pushed_early);
                    self.push = next;
                    self.send_vm_state();
                } else {
                    self.events.push_back(SourceEvent::Invalid(invalid));
                }
                self.established(self.agreed);
                Ok(Vec::new())
            }
            (
                State::Running,
                Channel::Urgent | Channel::Echo,
                Message::Request { pages, pushed_read },
            ) if kind != SessionKind::Replicate => self.serve_on(channel, pages, pushed_read),
            // A migration without VM state: the destination runs the guest from our `Hello`
            // on, and its first demand requests (on their own stream) may overtake its
            // `HelloAck`.
            (
                State::HelloSent,
                Channel::Urgent | Channel::Echo,
                Message::Request { pages, pushed_read },
            ) if kind == SessionKind::Migrate && self.owner == Ownership::Destination => {
                self.serve_on(channel, pages, pushed_read)
            }
            (State::Running, Channel::Control, Message::Ack { entries })
                if kind == SessionKind::Replicate =>
            {
                let total = self.total_pages();
                if let Some(&(bad, _)) = entries.iter().find(|&&(p, v)| p >= total || v == 0) {
                    return Err(ProtoError::PageOutOfRange {
                        first: bad,
                        count: 1,
                        total,
                    });
                }
                self.events.push_back(SourceEvent::Acked(entries));
                Ok(Vec::new())
            }
            (State::Running, Channel::Control, Message::Complete { pages_received })
                if kind != SessionKind::Replicate =>
            {
                let total = self.total_pages();
                if pages_received != total {
                    return Err(ProtoError::CountMismatch {
                        expected: total,
                        got: pages_received,
                    });
                }
                self.state = State::Finished;
                self.owner = Ownership::Released;
                self.send(Channel::Control, Message::CompleteAck);
                self.events.push_back(SourceEvent::Finished);
                Ok(Vec::new())
            }
            // The destination resumed after its `Complete` and sends it again: the
            // `CompleteAck` was lost with the connection. Acknowledge it again.
            (State::Finished, Channel::Control, Message::Complete { pages_received })
                if kind != SessionKind::Replicate =>
            {
                let total = self.total_pages();
                if pages_received != total {
                    return Err(ProtoError::CountMismatch {
                        expected: total,
                        got: pages_received,
                    });
                }
                self.send(Channel::Control, Message::CompleteAck);
                Ok(Vec::new())
            }
            // A demand request that crossed the destination's `Complete`: it has every page
            // now, so there is nothing to serve. On a long link this race is common.
            (State::Finished, Channel::Urgent | Channel::Echo, Message::Request { .. }) => {
                Ok(Vec::new())
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
    ///
    /// The push may start before the destination's answer (see [`SourceSession::may_push_early`]):
    /// then it sends only pages that must cross whatever the answer says, and the
    /// answer's extra pages join the schedule when it arrives.
    pub fn next_push(&mut self, max: usize) -> Option<Range<u64>> {
        self.next_push_sized(|_| max)
    }

    /// [`SourceSession::next_push`] with the longest run decided from its first page:
    /// `max(start)` (see [`PushSchedule::next_run_sized`]). A `max` of 0 declines the run:
    /// `None`, and the schedule is as it was (no `PushDone` either).
    pub fn next_push_sized(&mut self, max: impl FnOnce(u64) -> usize) -> Option<Range<u64>> {
        let early = self.may_push_early();
        if !self.handed
            || !(early || matches!(self.state, State::Running))
            || !matches!(self.link, Link::Connected)
            || !self.config.push
            || self.config.kind == SessionKind::Replicate
        {
            return None;
        }
        let mut declined = false;
        let run = self.push.next_run_sized(|start| {
            let m = max(start);
            declined = m == 0;
            m
        });
        match run {
            Some((r, hot)) => {
                for p in r.clone() {
                    if early {
                        self.pushed_early.set(p);
                    }
                    self.note_sent(p);
                }
                self.pages_pushed += r.end - r.start;
                if hot {
                    self.pages_pushed_hot += r.end - r.start;
                }
                Some(r)
            }
            None if early || declined => None,
            None => {
                if !self.push_done_sent {
                    self.set_push_done(true);
                    let pages_sent = self.push.sent();
                    self.send(Channel::Control, Message::PushDone { pages_sent });
                }
                None
            }
        }
    }

    /// The next message to send, in the order queued; `None` when there is nothing to send.
    /// Drain this after every call that may have queued something.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event for the application, in the order they happened.
    pub fn poll_event(&mut self) -> Option<SourceEvent> {
        self.events.pop_front()
    }

    fn send(&mut self, channel: Channel, message: Message) {
        // A lost connection takes nothing more; what matters is sent again on resuming.
        if !matches!(self.link, Link::Paused) {
            self.transmits.push_back(Transmit { channel, message });
        }
    }
}

#[cfg(test)]
mod hot_tests {
    use super::*;
    use crate::message::PAGE_SIZE;

    fn running(config: SourceConfig) -> SourceSession {
        let mut s = SourceSession::new(config);
        s.handle(
            Channel::Control,
            Message::HelloAck {
                version: PROTOCOL_VERSION,
                features: 0,
                conn_epoch: 0,
            },
        )
        .unwrap();
        assert!(s.is_running());
        s
    }

    fn migrate(pages: u64) -> SourceConfig {
        SourceConfig::migrate("vm", Layout::single(pages * PAGE_SIZE as u64))
    }

    #[test]
    fn hot_ranges_are_pushed_first_and_counted() {
        let mut s = running(SourceConfig {
            hot: vec![100..110, 5..7],
            ..migrate(128)
        });
        s.handle(Channel::Urgent, Message::request(vec![103]))
            .unwrap();
        assert_eq!(s.next_push(64), Some(100..103));
        assert_eq!(s.next_push(64), Some(104..110));
        assert_eq!(s.next_push(64), Some(5..7));
        assert_eq!(
            s.pages_pushed_hot(),
            11,
            "the demand-served page is not a push"
        );
        // Then the normal order: right after the last demand fault.
        assert_eq!(s.next_push(64), Some(110..128));
        assert_eq!(s.next_push(64), Some(0..5));
        assert_eq!(s.next_push(64), Some(7..71));
        while s.next_push(64).is_some() {}
        assert_eq!(s.pages_pushed() + s.pages_served(), 128);
        assert_eq!(s.stats().pages_pushed_hot, 11);
    }

    #[test]
    fn plain_config_pushes_nothing_as_hot() {
        let mut s = running(migrate(10));
        assert_eq!(s.next_push(64), Some(0..10));
        assert_eq!(s.pages_pushed_hot(), 0);
    }

    #[test]
    fn zero_filled_pages_get_runs_of_their_own() {
        let mut zero = Bitmap::new(40);
        for p in 10..20 {
            zero.set(p);
        }
        let mut s = running(SourceConfig {
            hot: std::iter::once(15..25).collect(),
            zero_filled: Some(zero),
            ..migrate(40)
        });
        let runs: Vec<_> = std::iter::from_fn(|| s.next_push(64)).collect();
        assert_eq!(runs, vec![15..20, 20..25, 0..10, 10..15, 25..40]);
        assert_eq!(s.pages_pushed_hot(), 10);
    }
}
