//! The QUIC driver: a thin async shell around the [`crate::proto`] state machines.
//!
//! The source connects; the destination listens. The source opens three streams, each
//! starting with a one-byte tag: control (bidirectional), urgent (bidirectional: requests
//! flow destination → source, replies source → destination) and bulk (unidirectional push).
//! Urgent replies are sent at a higher stream priority than the push, so quinn packs them
//! ahead of queued bulk data and a fault never waits behind pushed pages.

pub mod accept;
mod dest;
mod frame;
mod gso;
mod link;
mod loss;
mod path;
mod rate_limit;
mod read_ahead;
mod recovery;
mod sent;
mod shaped;
mod source;
mod stated_start;
pub mod tokens;

pub use dest::{
    run_dest, run_dest_recovering, DecodeStats, DestHooks, DestRecovery, DestReport, PageSink,
    SinkError, BUSY_REASON,
};
pub use frame::{read_frame, write_message, write_pages, FrameError};
pub use recovery::{
    silence_limit, OnConnection, OnHandover, Outages, SourceRecovery, StopCheck, ATTEMPT_INTERVAL,
    ATTEMPT_TIMEOUT, KEEP_ALIVE, SILENCE_LOST,
};
pub use source::{
    run_replication, run_replication_recovering, run_source, run_source_prepared,
    run_source_recovering, Extent, HandOver, PageReader, ReplicationEvent, ReplicationReport,
    SourceReport, Update,
};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use path::PathReport;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
pub use quinn::{Connection, Endpoint};
use quinn::{TransportConfig, VarInt};
pub use rate_limit::{RateCeiling, RateLimit, RateLimited, RateLimitedConfig, MIN_WINDOW_PACKETS};
use rustls::pki_types::CertificateDer;
pub use sent::{stream_bytes_sent, PACKET_OVERHEAD};
use serde::Serialize;
pub use shaped::{Shape, Shaped};
pub use stated_start::{StartBounds, StatedStart, StatedStartConfig};
use thiserror::Error;

use crate::message::ErrorCode;
use crate::proto::{Channel, ProtoError};
use crate::tls::{client_tls_for, server_tls_for, Identity, TlsError, ALPN, CONTROL_ALPN};

/// First byte of the control stream (bidirectional: handshake, page sets, completion,
/// errors). Each stream's first byte tells the destination what the stream carries.
pub const TAG_CONTROL: u8 = 0xC0;
/// First byte of the urgent stream (bidirectional: demand requests from the destination,
/// replies from the source).
pub const TAG_URGENT: u8 = 0xC1;
/// First byte of the bulk stream (unidirectional, source → destination: the background push,
/// or replication updates).
pub const TAG_BULK: u8 = 0xC2;
/// First byte of the echo stream (bidirectional, opened by the destination on a long path:
/// demand requests sent again, and their replies; see [`crate::proto::Channel::Echo`]).
pub const TAG_ECHO: u8 = 0xC3;

/// Send priority of the urgent stream, the highest. quinn sends data of higher-priority
/// streams first, so a demand reply goes out ahead of queued push data.
pub const PRIO_URGENT: i32 = 100;
/// Send priority of the control stream: below demand replies, above the push.
pub const PRIO_CONTROL: i32 = 50;
/// Send priority of the bulk stream: the push takes what the other streams leave.
pub const PRIO_BULK: i32 = 0;

/// Application close code of a session that ended normally.
pub const CLOSE_OK: u32 = 0;

/// Close reason (with [`CLOSE_OK`]) of a replication the replicator ended: the standby's
/// session ends with it. A close with [`CLOSE_OK`] and any other reason (`reconnecting`)
/// is a dropped connection, after which the same session resumes.
pub(crate) const REPLICATION_STOPPED: &[u8] = b"replication stopped";
/// Close reason (with [`CLOSE_OK`]) of a connection a source dropped to reconnect.
pub(crate) const RECONNECTING: &[u8] = b"reconnecting";

/// Where the peer or the network ended a session.
#[derive(Debug, Error)]
pub enum DriverError {
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The UDP socket could not be bound, or no endpoint created on it.
    #[error("cannot bind {addr}")]
    Bind {
        /// The local address asked for.
        addr: SocketAddr,
        /// The system's error.
        source: std::io::Error,
    },
    /// quinn refused to start the connection, before sending anything.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The peer's address.
        addr: SocketAddr,
        /// quinn's reason.
        reason: String,
    },
    /// The connection failed or was lost: a failed handshake (a certificate other than the
    /// pinned one), the idle timeout, a reset.
    #[error("QUIC connection failed: {}", explain_connection(.0))]
    Connection(#[from] quinn::ConnectionError),
    /// The peer closed the connection with an application error, or ended a stream the
    /// session still needed (then the code is [`ErrorCode::Aborted`]).
    #[error("the peer closed the session with {code:?}: {reason}")]
    PeerClosed {
        /// The peer's close code; a value that is no [`ErrorCode`] reads as `Internal`.
        code: ErrorCode,
        /// The peer's close reason: the text of its `Error`, or what ended.
        reason: String,
    },
    /// The session's state machine failed: a protocol violation, or an `Error` from the peer.
    #[error("protocol error")]
    Protocol(#[from] ProtoError),
    /// Reading or writing a stream failed while the connection was still up.
    #[error("stream error on the {channel:?} channel")]
    Stream {
        /// The channel of the stream.
        channel: Channel,
        /// What failed.
        source: FrameError,
    },
    /// The source opened a stream whose tag (the value) is not the one expected there; 0 when
    /// it opened the control or urgent stream twice.
    #[error("the peer opened an unknown stream (tag {0:#04x})")]
    UnknownStream(u8),
    /// A step of the session did not finish in time (or, in replication, the task reading
    /// acknowledgements stopped); the text says which.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// A task of the driver panicked or was cancelled; the value is its join error.
    #[error("a driver task failed: {0}")]
    Task(String),
    /// The [`PageReader`] could not read pages; the value is its error.
    #[error("page source failed: {0}")]
    Reader(String),
    /// The connection was lost and no new one resumed the session before the recover
    /// timeout ran out.
    #[error(
        "the connection was lost and not restored within the recover timeout of {} s \
         (the link has been down for {outage_ms} ms)",
        limit.as_secs_f64()
    )]
    RecoverTimeout {
        /// The recover timeout.
        limit: Duration,
        /// How long the connection had been down when this side gave up.
        outage_ms: u64,
    },
    /// Nothing arrived from the peer for this long (ms) while the session could resume: the
    /// connection counts as lost (see [`SILENCE_LOST`]).
    #[error("nothing arrived from the peer for {ms} ms; the link is down or the peer is gone")]
    Silent {
        /// How long the peer had been silent.
        ms: u64,
        /// When this side last saw a datagram of the peer's (to the watchdog's poll): the
        /// pause is dated from here, not from when the loss was handled.
        last_heard: std::time::Instant,
    },
    /// The session failed after the VM was handed over (the destination may run the guest)
    /// and before every page had reached the destination: the guest's memory is split
    /// between the two hosts, and neither can run it alone (docs/recovery.md, semantics).
    /// `cause` says what ended the session.
    #[error(
        "the VM is lost: the session ended {vulnerability_ms} ms after switchover{}",
        match .pages_missing {
            Some(n) => format!(", with {n} pages still only at the source"),
            None => ", before the destination confirmed it held every page".to_string(),
        }
    )]
    VmLost {
        /// Switchover → the failure: how long the VM was exposed.
        vulnerability_ms: u64,
        /// Pages the destination did not hold (known at the destination only).
        pages_missing: Option<u64>,
        /// What ended the session.
        #[source]
        cause: Box<DriverError>,
    },
    /// A prepared source session's application dropped its hand-over without sending it
    /// (see [`run_source_prepared`]): the VM stays at the source.
    #[error("the source gave up the migration before handing the VM over")]
    Abandoned,
    /// The source connected and completed the handshake, but did not hand the VM over
    /// within the destination's bound (the value held).
    #[error("the source did not hand the VM over within {0:?} of its handshake")]
    HandOverTimeout(Duration),
    /// The application stopped the session while it waited for a new connection.
    #[error("stopped while waiting to reconnect")]
    Stopped,
    /// The [`PageSink`] could not install or store pages.
    #[error("installing pages failed")]
    Sink(#[from] SinkError),
}

/// The connection error with what it most likely means for an operator.
fn explain_connection(e: &quinn::ConnectionError) -> String {
    use quinn::ConnectionError as E;
    // TLS alerts travel as QUIC CRYPTO_ERROR codes, 0x100..=0x1ff.
    let tls = |code: quinn::TransportErrorCode| (0x100..=0x1ff).contains(&u64::from(code));
    let alpn = |code: quinn::TransportErrorCode| u64::from(code) == 0x100 + NO_APPLICATION_PROTOCOL;
    // The error itself is this error's source: an error chain prints it next, once.
    match e {
        E::TransportError(t) if alpn(t.code) => ALPN_HINT.into(),
        E::ConnectionClosed(c) if alpn(c.error_code) => ALPN_HINT.into(),
        // Also what a link cut longer than the idle timeout ends in (docs/wan.md).
        E::TimedOut => format!(
            "nothing arrived from the peer for the idle timeout ({} s); the network path is \
             down or the peer is gone",
            IDLE_TIMEOUT.as_secs()
        ),
        E::TransportError(t) if tls(t.code) => TLS_HINT.into(),
        E::ConnectionClosed(c) if tls(c.error_code) => TLS_HINT.into(),
        _ => "the connection was lost".into(),
    }
}

/// TLS alert `no_application_protocol` (RFC 7301).
const NO_APPLICATION_PROTOCOL: u64 = 120;

const ALPN_HINT: &str = "the peer speaks another protocol: a migration endpoint where a fleet \
                         control endpoint was expected, or the other way round (check the \
                         address and port)";

const TLS_HINT: &str = "the TLS handshake failed (usually: the peer presented a certificate \
                        other than the pinned one, or does not pin ours)";

/// A connection that hears nothing from its peer for this long is closed. Keep-alives keep an
/// idle but healthy session open.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The round-trip time a connection assumes before its first sample: it sets the first
/// probe timeout of the handshake, about three times this. RFC 9002's 333 ms (quinn's
/// default) made a handshake whose first packets met a full bottleneck queue wait a whole
/// second: an evacuation's connection made while other VMs' transfers filled the link
/// (a fleet at 1 Gbit/s x 50 ms, docs/fleet.md) switched over 1.1 s late. faultline's
/// paths join two sites an operator knows, well under this on a continent; on a longer
/// one a handshake packet is sent twice, a few hundred bytes.
pub const INITIAL_RTT: Duration = Duration::from_millis(100);

/// Transport parameters from [`TransportTuning::from_env_or_default`]: the built-in default
/// unless `FAULTLINE_EXPECTED_BDP` / `FAULTLINE_CONGESTION` say otherwise.
pub fn transport_config() -> TransportConfig {
    TransportTuning::from_env_or_default().config()
}

/// The congestion controller of a connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    /// quinn's BBR (BBRv1-like). The default: it keeps the link full under random loss.
    #[default]
    Bbr,
    /// CUBIC: gentler than BBR when the window is far above the path's BDP, but it collapses
    /// under random loss (measured in docs/wan.md).
    Cubic,
    /// NewReno, the classic loss-based controller; for comparison.
    NewReno,
}

impl std::str::FromStr for Congestion {
    type Err = TuningError;
    fn from_str(s: &str) -> Result<Self, TuningError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "bbr" => Ok(Congestion::Bbr),
            "cubic" => Ok(Congestion::Cubic),
            "newreno" | "new-reno" | "reno" => Ok(Congestion::NewReno),
            _ => Err(TuningError::Congestion(s.to_string())),
        }
    }
}

/// A malformed `FAULTLINE_*` tuning variable.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TuningError {
    /// A byte-count variable holds something [`crate::units::parse_bytes`] refuses.
    #[error("{var}={value:?} is not a positive byte count (examples: 3125000, 12M, 512K)")]
    Bytes {
        /// The variable's name.
        var: &'static str,
        /// Its value.
        value: String,
    },
    /// [`ENV_CONGESTION`] names no known controller; the value is what it held.
    #[error("{ENV_CONGESTION}={0:?} is not one of bbr, cubic, newreno")]
    Congestion(String),
    /// [`ENV_MAX_UDP_PAYLOAD`] is not a byte count in [1200, 65527]; the value is what it held.
    #[error("{ENV_MAX_UDP_PAYLOAD}={0:?} is not a UDP payload size from 1200 to 65527 bytes")]
    UdpPayload(String),
}

/// How the QUIC transport is sized for the path it runs over.
///
/// At most 1.25 × the path's bandwidth-delay product is in flight
/// ([`TransportTuning::in_flight_cap`]): that fills the link while a demand reply, which
/// queues at the bottleneck behind whatever pushed data is in flight, waits at most about
/// a quarter of a round trip there. More only adds queueing delay (and with BBR, which does
/// not back off on loss, tail drops at a shallow bottleneck); less leaves the link idle.
/// With a stated BDP the cap is a ceiling on the congestion window and the destination's
/// stream window is larger, so random loss does not stall the push
/// ([`TransportTuning::stream_window`]); without one, the destination's stream window is
/// the cap. Measured through the WAN emulator in docs/wan.md.
///
/// Both ends should use the same tuning.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TransportTuning {
    /// Expected bandwidth-delay product of the path, bytes (rate × round-trip time).
    pub expected_bdp_bytes: u64,
    /// Congestion controller.
    pub congestion: Congestion,
    /// Congestion window to start with, bytes; `None`: quinn's (about 14.7 kB). Slow start
    /// from ten packets takes ~10 round trips to reach a 1 Gbit/s × 100 ms window, a
    /// second of a one-second evacuation; a path whose BDP the operator stated starts at
    /// it instead (paced over the first measured round trip, so no burst), and from the
    /// first round-trip sample the window is held at the in-flight cap until losses show
    /// the statement too large: persistent congestion, or more than about 3% of a round
    /// trip's bytes lost; random loss does not end it ([`StatedStart`]).
    pub initial_window: Option<u64>,
    /// Largest UDP payload, bytes: the upper bound of MTU discovery and what the endpoint
    /// accepts from its peer. Each datagram costs quinn, the kernel and the crypto a fixed
    /// amount besides its bytes, so a path that carries large datagrams (loopback's 64 KiB
    /// MTU, 9000-byte jumbo frames) should get them. The default, [`MAX_UDP_PAYLOAD`], lets
    /// discovery find whatever the path carries: on a 1500-byte Ethernet path it settles
    /// at about 1452 after a few lost probes, which quinn does not count as congestion, and
    /// packets meanwhile are the safe 1200 bytes. Clamped to [1200, 65527].
    pub max_udp_payload: u16,
    /// A ceiling on the sending rate that may change while the connection runs
    /// ([`RateLimit`]; an orchestrator's share of the link for this evacuation). `None`:
    /// only the congestion controller decides.
    #[serde(skip)]
    pub rate_limit: Option<RateLimit>,
}

/// Environment variable overriding [`TransportTuning::expected_bdp_bytes`].
pub const ENV_EXPECTED_BDP: &str = "FAULTLINE_EXPECTED_BDP";
/// Environment variable overriding [`TransportTuning::congestion`].
pub const ENV_CONGESTION: &str = "FAULTLINE_CONGESTION";
/// Environment variable overriding [`TransportTuning::max_udp_payload`] (bytes, for example
/// 1452 where probing above a tunnel's MTU is unwelcome).
pub const ENV_MAX_UDP_PAYLOAD: &str = "FAULTLINE_MAX_UDP_PAYLOAD";

/// Largest UDP payload there is (IPv6's, without jumbograms): the default upper bound.
pub const MAX_UDP_PAYLOAD: u16 = 65_527;
/// Smallest UDP payload QUIC allows.
pub const MIN_UDP_PAYLOAD: u16 = 1200;

/// Expected BDP of the default tuning: 1 Gbit/s at 25 ms round trip. Its window (3.9 MB)
/// is about the 4 MiB measured on loopback (docs/benchmarks.md): with CUBIC and a 32 MiB
/// window the demand-fault p50 under a full push was about 10 ms, with BBR and 4 MiB about
/// 0.3 ms, and the push was no slower.
pub const DEFAULT_EXPECTED_BDP: u64 = 3_125_000;

/// Per-stream flow-control window of the default tuning.
pub const STREAM_WINDOW: u32 = (DEFAULT_EXPECTED_BDP + DEFAULT_EXPECTED_BDP / 4) as u32;

/// Per-stream window in BDPs when the BDP is stated (see [`TransportTuning::stream_window`]).
pub const STATED_STREAM_WINDOW_BDPS: u64 = 6;

/// Smallest per-stream window. It also bounds the demand replies in flight at once (a
/// 4 KiB page each) and slows the handshake's page bitmaps, so it is not tiny; on links
/// with a smaller BDP the excess queues at the bottleneck.
pub const MIN_STREAM_WINDOW: u64 = 128 << 10;
/// Largest per-stream window; it bounds the destination's buffer memory.
pub const MAX_STREAM_WINDOW: u64 = 1 << 30;
/// Smallest initial congestion window: quinn's default (RFC 9002's 14720 bytes).
pub const MIN_INITIAL_WINDOW: u64 = 14_720;
/// Smallest send window: room for the peer's bulk window even if its tuning differs.
pub const MIN_SEND_WINDOW: u64 = 16 << 20;

impl Default for TransportTuning {
    fn default() -> Self {
        TransportTuning {
            expected_bdp_bytes: DEFAULT_EXPECTED_BDP,
            congestion: Congestion::default(),
            initial_window: None,
            max_udp_payload: MAX_UDP_PAYLOAD,
            rate_limit: None,
        }
    }
}

impl TransportTuning {
    /// The tuning for a path of `rate_bps` bits per second and round-trip time `rtt`.
    pub fn for_link(rate_bps: u64, rtt: Duration) -> TransportTuning {
        let bdp = bdp_bytes(rate_bps, rtt);
        TransportTuning {
            expected_bdp_bytes: bdp,
            initial_window: Some(bdp),
            ..TransportTuning::default()
        }
    }

    /// The default, with `FAULTLINE_EXPECTED_BDP` (bytes, K/M/G binary suffixes) and
    /// `FAULTLINE_CONGESTION` (`bbr`, `cubic`, `newreno`) applied where set.
    pub fn from_env() -> Result<TransportTuning, TuningError> {
        let mut t = TransportTuning::default();
        if let Ok(v) = std::env::var(ENV_EXPECTED_BDP) {
            t.expected_bdp_bytes =
                crate::units::parse_bytes(&v).map_err(|_| TuningError::Bytes {
                    var: ENV_EXPECTED_BDP,
                    value: v,
                })?;
            t.initial_window = Some(t.expected_bdp_bytes);
        }
        if let Ok(v) = std::env::var(ENV_CONGESTION) {
            t.congestion = v.parse()?;
        }
        if let Ok(v) = std::env::var(ENV_MAX_UDP_PAYLOAD) {
            t.max_udp_payload = v
                .trim()
                .parse()
                .ok()
                .filter(|p| (MIN_UDP_PAYLOAD..=MAX_UDP_PAYLOAD).contains(p))
                .ok_or(TuningError::UdpPayload(v))?;
        }
        Ok(t)
    }

    /// [`TransportTuning::from_env`], falling back to the default with a warning when a
    /// variable is malformed: a typo in a tuning knob should not stop an evacuation.
    pub fn from_env_or_default() -> TransportTuning {
        TransportTuning::from_env().unwrap_or_else(|e| {
            tracing::warn!("ignoring the QUIC tuning from the environment: {e}");
            TransportTuning::default()
        })
    }

    /// [`TransportTuning::max_udp_payload`] within what QUIC and UDP allow.
    pub fn udp_payload_bound(&self) -> u16 {
        self.max_udp_payload.clamp(MIN_UDP_PAYLOAD, MAX_UDP_PAYLOAD)
    }

    /// Whether the path's BDP was stated (by [`TransportTuning::for_link`] or
    /// [`ENV_EXPECTED_BDP`]) rather than the built-in default.
    pub fn stated(&self) -> bool {
        self.initial_window.is_some()
    }

    /// The most data in flight: 1.25 × the expected BDP, within
    /// [[`MIN_STREAM_WINDOW`], [`MAX_STREAM_WINDOW`]]. Enough to fill the link, and a demand
    /// reply queues behind at most a quarter of a round trip of pushed data.
    pub fn in_flight_cap(&self) -> u64 {
        let w = self
            .expected_bdp_bytes
            .saturating_add(self.expected_bdp_bytes / 4);
        w.clamp(MIN_STREAM_WINDOW, MAX_STREAM_WINDOW)
    }

    /// Per-stream receive window.
    ///
    /// With a stated BDP the congestion window is capped at [`Self::in_flight_cap`] (see
    /// [`StatedStart`]) and this window is [`STATED_STREAM_WINDOW_BDPS`] × the BDP: a lost
    /// packet's retransmission arrives a round trip or more after the data behind it, and
    /// the receiver cannot hand on (nor give flow-control credit for) anything past the
    /// hole until then. A window of 1.25 BDP stalls the push at every loss, and the window
    /// that opens when the hole fills goes out in a burst that overflows a shallow
    /// bottleneck queue: at 1% random loss over 200 Mbit/s × 50 ms that used 0.53-0.75 of
    /// the link. Three BDPs carry on through one repair (about two round trips of credit
    /// at 1.25 BDP each) but not through a retransmission that is lost again, which at 1%
    /// loss over 1 Gbit/s × 20 ms (17 losses a round trip) is one every six round trips:
    /// the push dipped to ~70% of the link every 100-150 ms there (0.88 of the link). Four
    /// to six carry on through that too (0.96). Six, because with four a fleet evacuation
    /// at 1 Gbit/s × 50 ms started the second VM's switchover half a second late, in every
    /// run; later one such switchover was a second late at six too, a handshake packet
    /// lost in the full queue and resent after RFC 9002's initial probe timeout, now
    /// shorter ([`INITIAL_RTT`]; docs/fleet.md). Whether four would do now is not
    /// measured. A larger window once cost compressed
    /// pushes (`all` over real guest RAM at 1 Gbit/s × 20 ms: 1.15 × its own ideal with
    /// three BDPs, 1.20-1.23 with four to six), first put down to a backlog at the
    /// destination; the cause was the source's push keeping the connection's driver off
    /// its worker while writes did not block, which a larger window made longer. The push
    /// now gives the driver turns (`source::driver_turn::DriverTurn`): 1.01 with six
    /// (docs/encoding.md).
    ///
    /// Without a stated BDP nothing else caps the push, so this window is the in-flight cap.
    pub fn stream_window(&self) -> u64 {
        if !self.stated() {
            return self.in_flight_cap();
        }
        self.expected_bdp_bytes
            .saturating_mul(STATED_STREAM_WINDOW_BDPS)
            .clamp(MIN_STREAM_WINDOW, MAX_STREAM_WINDOW)
    }

    /// Connection receive window: a full bulk window plus as much again for the urgent and
    /// control streams, so connection-level flow control never holds back a demand reply.
    pub fn connection_window(&self) -> u64 {
        2 * self.stream_window()
    }

    /// Send window (written but not yet acknowledged, all streams together). The push can
    /// buffer at most the peer's bulk stream window; the send window is well above that
    /// (4 windows, at least [`MIN_SEND_WINDOW`]) so an urgent reply always finds room and
    /// never waits for acknowledgements of pushed data, even if the peer's window is larger.
    pub fn send_window(&self) -> u64 {
        (4 * self.stream_window()).max(MIN_SEND_WINDOW)
    }

    /// The quinn transport configuration.
    pub fn config(&self) -> TransportConfig {
        let mut t = TransportConfig::default();
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(self.udp_payload_bound());
        t.mtu_discovery_config(Some(mtu));
        t.stream_receive_window(varint(self.stream_window()));
        t.receive_window(varint(self.connection_window()));
        t.send_window(self.send_window());
        let iw = self
            .initial_window
            .map(|w| w.clamp(MIN_INITIAL_WINDOW, MAX_STREAM_WINDOW));
        let cc: Arc<dyn quinn::congestion::ControllerFactory + Send + Sync> = match self.congestion
        {
            Congestion::Bbr => {
                let mut c = quinn::congestion::BbrConfig::default();
                if let Some(w) = iw {
                    c.initial_window(w);
                }
                Arc::new(c)
            }
            Congestion::Cubic => {
                let mut c = quinn::congestion::CubicConfig::default();
                if let Some(w) = iw {
                    c.initial_window(w);
                }
                Arc::new(c)
            }
            Congestion::NewReno => {
                let mut c = quinn::congestion::NewRenoConfig::default();
                if let Some(w) = iw {
                    c.initial_window(w);
                }
                Arc::new(c)
            }
        };
        // A stated BDP also holds the window there at the start (see `StatedStart`).
        let cc: Arc<dyn quinn::congestion::ControllerFactory + Send + Sync> = match iw {
            Some(w) => Arc::new(StatedStartConfig::new(cc, w).with_ceiling(self.in_flight_cap())),
            None => cc,
        };
        // Outermost, so that no floor lifts the window above the limit.
        let cc: Arc<dyn quinn::congestion::ControllerFactory + Send + Sync> = match &self.rate_limit
        {
            Some(l) => Arc::new(RateLimitedConfig::new(cc, l.clone())),
            None => cc,
        };
        t.congestion_controller_factory(cc);
        t.initial_rtt(INITIAL_RTT);
        t.max_concurrent_bidi_streams(VarInt::from_u32(8));
        t.max_concurrent_uni_streams(VarInt::from_u32(8));
        // Frequent keep-alives, so that silence means a cut (see `recovery::SILENCE_LOST`:
        // a session that can resume pauses then and reconnects); the idle timeout ends a
        // connection whose session cannot.
        t.keep_alive_interval(Some(recovery::KEEP_ALIVE));
        t.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(IDLE_TIMEOUT).unwrap_or(VarInt::from_u32(30_000).into()),
        ));
        t
    }
}

/// Bandwidth-delay product in bytes of `rate_bps` bits per second over `rtt`.
pub fn bdp_bytes(rate_bps: u64, rtt: Duration) -> u64 {
    let b = u128::from(rate_bps) * rtt.as_nanos() / 8 / 1_000_000_000;
    u64::try_from(b).unwrap_or(u64::MAX)
}

fn varint(v: u64) -> VarInt {
    VarInt::from_u64(v).unwrap_or(VarInt::MAX)
}

/// UDP socket buffer size asked for. At the default (about 200 KiB) a burst of bulk data
/// overflows the receive queue on a fast path, and every drop costs quinn a loss recovery.
pub const UDP_BUFFER_BYTES: usize = 16 << 20;

/// Binds a UDP socket with large send and receive buffers. Where the system limit
/// (`net.core.rmem_max`) is lower and we are not privileged to exceed it, the kernel's cap
/// applies; that is a slowdown, not an error.
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use std::os::fd::AsRawFd;
    let sock = std::net::UdpSocket::bind(addr)?;
    let size = UDP_BUFFER_BYTES as libc::c_int;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        for opt in [force, plain] {
            // SAFETY: setsockopt reads exactly size_of::<c_int>() bytes from a live c_int
            // on a socket this function owns.
            let r = unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if r == 0 {
                break;
            }
        }
    }
    Ok(sock)
}

/// Endpoint configuration whose stateless-reset key and connection-id key are derived from
/// this side's private key.
///
/// A restarted daemon (same identity, same port) then recognises the connection ids of its
/// previous incarnation and answers their packets with a valid stateless reset, so peers
/// drop the dead connection within a round trip instead of waiting out the idle timeout:
/// a standby that restarts is reconnected to at once.
///
/// It accepts datagrams up to `max_udp_payload` bytes (advertised to the peer).
fn endpoint_config(me: &Identity, max_udp_payload: u16) -> quinn::EndpointConfig {
    let derive = |label: &[u8]| {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(label);
        ctx.update(me.key.secret_der());
        ctx.finish()
    };
    let reset = derive(b"faultline stateless reset key v1");
    let cid = derive(b"faultline connection id key v1");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&cid.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut config = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        reset.as_ref(),
    )));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    // Out of range cannot happen ([`TransportTuning::udp_payload_bound`] clamps); quinn's
    // default (1472) stays then.
    let _ = config.max_udp_payload_size(max_udp_payload);
    config
}

fn endpoint(
    addr: SocketAddr,
    me: &Identity,
    server: Option<quinn::ServerConfig>,
    max_udp_payload: u16,
) -> Result<Endpoint, DriverError> {
    let bind = |source| DriverError::Bind { addr, source };
    let socket = bind_udp(addr).map_err(bind)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| bind(std::io::Error::other("no async runtime is running")))?;
    let config = endpoint_config(me, max_udp_payload);
    // Batches bounded in bytes as well as in datagrams: see [`gso`].
    let socket = runtime.wrap_udp_socket(socket).map_err(bind)?;
    let socket = Arc::new(gso::GsoBounded::new(socket));
    Endpoint::new_with_abstract_socket(config, server, socket, runtime).map_err(bind)
}

/// A listening endpoint that presents `me` and accepts only clients presenting `peer`,
/// tuned by [`TransportTuning::from_env_or_default`].
pub fn server_endpoint(
    addr: SocketAddr,
    me: &Identity,
    peer: CertificateDer<'static>,
) -> Result<Endpoint, DriverError> {
    server_endpoint_tuned(addr, me, peer, &TransportTuning::from_env_or_default())
}

/// [`server_endpoint`] with an explicit tuning.
pub fn server_endpoint_tuned(
    addr: SocketAddr,
    me: &Identity,
    peer: CertificateDer<'static>,
    tuning: &TransportTuning,
) -> Result<Endpoint, DriverError> {
    server_endpoint_alpn(
        addr,
        me,
        peer,
        tuning.config(),
        tuning.udp_payload_bound(),
        ALPN,
    )
}

/// A listening endpoint for the fleet control protocol ([`CONTROL_ALPN`]): like
/// [`server_endpoint`], but migration clients are refused in the handshake, and its
/// connections are sized for small messages ([`CONTROL_STREAM_WINDOW`]).
pub fn control_server_endpoint(
    addr: SocketAddr,
    me: &Identity,
    peer: CertificateDer<'static>,
) -> Result<Endpoint, DriverError> {
    let tuning = TransportTuning::default();
    let transport = control_config(&tuning, CONTROL_PEER_STREAMS);
    server_endpoint_alpn(
        addr,
        me,
        peer,
        transport,
        tuning.udp_payload_bound(),
        CONTROL_ALPN,
    )
}

/// Per-stream receive window of a control connection: four times the control protocol's
/// largest frame body (64 KiB, `fleet::control::MAX_FRAME`). Its messages are small and
/// answered one by one; the bulk window (megabytes) would only let a peer park that much
/// in the endpoint's memory per stream.
pub const CONTROL_STREAM_WINDOW: u32 = 256 << 10;

/// Streams an orchestrator may have open at once on one control connection (its events,
/// a status request, limits asked again while an older one is unanswered).
pub const CONTROL_PEER_STREAMS: u32 = 8;

/// The transport of a control connection: `tuning`'s keep-alives, timeouts and congestion
/// control, with windows for small messages ([`CONTROL_STREAM_WINDOW`]), no
/// unidirectional streams, and at most `peer_bidi` bidirectional ones opened by the peer
/// (the orchestrator opens every stream; a source opens none).
fn control_config(tuning: &TransportTuning, peer_bidi: u32) -> TransportConfig {
    let mut t = tuning.config();
    t.stream_receive_window(VarInt::from_u32(CONTROL_STREAM_WINDOW));
    t.receive_window(VarInt::from_u32(2 * CONTROL_STREAM_WINDOW));
    t.send_window(4 * u64::from(CONTROL_STREAM_WINDOW));
    t.max_concurrent_bidi_streams(VarInt::from_u32(peer_bidi));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t
}

fn server_endpoint_alpn(
    addr: SocketAddr,
    me: &Identity,
    peer: CertificateDer<'static>,
    transport: TransportConfig,
    udp_payload_bound: u16,
    alpn: &[u8],
) -> Result<Endpoint, DriverError> {
    let tls = server_tls_for(me, peer, alpn)?;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport));
    // A peer that connected before comes back without a Retry's round trip.
    cfg.validation_token_config(tokens::validation_config());
    endpoint(addr, me, Some(cfg), udp_payload_bound)
}

/// A client endpoint that presents `me` and accepts only a server presenting `peer`,
/// tuned by [`TransportTuning::from_env_or_default`].
pub fn client_endpoint(
    bind: SocketAddr,
    me: &Identity,
    peer: CertificateDer<'static>,
) -> Result<Endpoint, DriverError> {
    client_endpoint_tuned(bind, me, peer, &TransportTuning::from_env_or_default())
}

/// [`client_endpoint`] with an explicit tuning.
pub fn client_endpoint_tuned(
    bind: SocketAddr,
    me: &Identity,
    peer: CertificateDer<'static>,
    tuning: &TransportTuning,
) -> Result<Endpoint, DriverError> {
    client_endpoint_alpn(
        bind,
        me,
        peer,
        tuning.config(),
        tuning.udp_payload_bound(),
        ALPN,
    )
}

/// A client endpoint for the fleet control protocol ([`CONTROL_ALPN`]): it reaches only
/// control endpoints ([`control_server_endpoint`]).
pub fn control_client_endpoint(
    bind: SocketAddr,
    me: &Identity,
    peer: CertificateDer<'static>,
) -> Result<Endpoint, DriverError> {
    let tuning = TransportTuning::default();
    // A source answers on the orchestrator's streams and opens none.
    let transport = control_config(&tuning, 0);
    client_endpoint_alpn(
        bind,
        me,
        peer,
        transport,
        tuning.udp_payload_bound(),
        CONTROL_ALPN,
    )
}

fn client_endpoint_alpn(
    bind: SocketAddr,
    me: &Identity,
    peer: CertificateDer<'static>,
    transport: TransportConfig,
    udp_payload_bound: u16,
    alpn: &[u8],
) -> Result<Endpoint, DriverError> {
    let tokens = tokens::client_tokens(&peer);
    let tls = client_tls_for(me, peer, alpn)?;
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport));
    cfg.token_store(tokens);
    let mut ep = endpoint(bind, me, None, udp_payload_bound)?;
    ep.set_default_client_config(cfg);
    Ok(ep)
}

/// Connects to `addr`; the TLS handshake (and certificate pinning) completes here.
pub async fn connect(ep: &Endpoint, addr: SocketAddr) -> Result<quinn::Connection, DriverError> {
    let connecting = ep
        .connect(addr, "faultline")
        .map_err(|e| DriverError::Connect {
            addr,
            reason: e.to_string(),
        })?;
    Ok(connecting.await?)
}

/// Accepts one connection; `None` if the endpoint was closed.
pub async fn accept(ep: &Endpoint) -> Result<Option<quinn::Connection>, DriverError> {
    match ep.accept().await {
        Some(incoming) => Ok(Some(incoming.await?)),
        None => Ok(None),
    }
}

/// Closes `conn` telling the peer why.
pub(crate) fn close_with(conn: &quinn::Connection, err: &DriverError) {
    let code = match err {
        DriverError::Protocol(p) => p.code(),
        DriverError::Stream { .. } => ErrorCode::Malformed,
        _ => ErrorCode::Internal,
    };
    let reason = crate::chain(err);
    let reason = &reason.as_bytes()[..reason.len().min(512)];
    conn.close(VarInt::from_u32(code as u32), reason);
}

/// Maps a connection loss to the most useful error: the peer's own reason when it gave one.
/// A close with [`CLOSE_OK`] is no reason: the peer dropped the connection (to reconnect, or
/// after the session ended), and it stays a connection error.
pub(crate) fn connection_lost(e: quinn::ConnectionError) -> DriverError {
    match e {
        quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code.into_inner() != u64::from(CLOSE_OK) =>
        {
            DriverError::PeerClosed {
                code: ErrorCode::from_u16(u16::try_from(c.error_code.into_inner()).unwrap_or(0)),
                reason: String::from_utf8_lossy(&c.reason).into_owned(),
            }
        }
        other => DriverError::Connection(other),
    }
}

/// A stream failing because the connection went away is reported as the connection's reason.
pub(crate) fn stream_error(
    conn: &quinn::Connection,
    channel: Channel,
    e: FrameError,
) -> DriverError {
    match conn.close_reason() {
        Some(reason) => connection_lost(reason),
        None => DriverError::Stream { channel, source: e },
    }
}

/// The peer ended a stream the session still needed: the connection's reason if it is gone,
/// else `what` as an abort.
pub(crate) fn closed_or(conn: &quinn::Connection, what: &'static str) -> DriverError {
    match conn.close_reason() {
        Some(reason) => connection_lost(reason),
        None => DriverError::PeerClosed {
            code: ErrorCode::Aborted,
            reason: what.to_string(),
        },
    }
}

/// Reads the tag byte that starts every stream (`TAG_*`).
pub(crate) async fn read_tag(recv: &mut quinn::RecvStream) -> Result<u8, DriverError> {
    let mut tag = [0u8];
    recv.read_exact(&mut tag)
        .await
        .map_err(|e| DriverError::Stream {
            channel: Channel::Control,
            source: match e {
                quinn::ReadExactError::FinishedEarly(_) => FrameError::Truncated,
                quinn::ReadExactError::ReadError(e) => FrameError::Read(e),
            },
        })?;
    Ok(tag[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_follow_the_expected_bdp() {
        let t = TransportTuning::for_link(1_000_000_000, Duration::from_millis(100));
        assert_eq!(t.expected_bdp_bytes, 12_500_000);
        assert!(t.stated());
        assert_eq!(t.in_flight_cap(), 15_625_000);
        // Stated: six BDPs of stream window, so a retransmission does not stall the push.
        assert_eq!(t.stream_window(), 75_000_000);
        assert_eq!(t.connection_window(), 150_000_000);
        assert_eq!(t.send_window(), 300_000_000);
        assert_eq!(t.congestion, Congestion::Bbr);

        let d = TransportTuning::default();
        assert!(!d.stated());
        assert_eq!(d.stream_window(), u64::from(STREAM_WINDOW));
        assert_eq!(d.stream_window(), d.in_flight_cap());
        assert_eq!(d.send_window(), MIN_SEND_WINDOW);

        let slow = TransportTuning::for_link(1_000_000, Duration::from_millis(10));
        assert_eq!(slow.stream_window(), MIN_STREAM_WINDOW, "floor");
        assert_eq!(slow.in_flight_cap(), MIN_STREAM_WINDOW, "floor");
        let huge = TransportTuning::for_link(u64::MAX, Duration::from_secs(3600));
        assert_eq!(
            huge.stream_window(),
            MAX_STREAM_WINDOW,
            "ceiling, no overflow"
        );
        let _ = huge.config();
    }

    /// The client's first handshake packet, lost (no one answers here), is sent again
    /// after about three times [`INITIAL_RTT`], not after RFC 9002's second.
    #[tokio::test(flavor = "current_thread")]
    async fn a_lost_first_handshake_packet_is_resent_within_a_third_of_a_second() {
        let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = silent.local_addr().unwrap();
        let me = Identity::generate("source").unwrap();
        let peer = Identity::generate("dest").unwrap().cert;
        let ep =
            client_endpoint_tuned(localhost_any(), &me, peer, &TransportTuning::default()).unwrap();
        let _connecting = ep.connect(to, "faultline").unwrap();
        let mut buf = vec![0u8; 65_536];
        silent.recv_from(&mut buf).await.unwrap();
        let first = std::time::Instant::now();
        let resent = tokio::time::timeout(Duration::from_secs(3), silent.recv_from(&mut buf)).await;
        let gap = first.elapsed();
        assert!(resent.is_ok(), "the first Initial was never resent");
        // 100 ms + 4 x 50 ms of assumed variation; quinn's default waits about 1 s.
        assert!(gap < Duration::from_millis(600), "resent after {gap:?}");
    }

    fn localhost_any() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    #[test]
    fn udp_payload_bound_is_clamped() {
        let mut t = TransportTuning::default();
        assert_eq!(t.udp_payload_bound(), MAX_UDP_PAYLOAD);
        t.max_udp_payload = 9000;
        assert_eq!(t.udp_payload_bound(), 9000);
        t.max_udp_payload = 100;
        assert_eq!(t.udp_payload_bound(), MIN_UDP_PAYLOAD);
        let _ = t.config();
    }

    #[test]
    fn tuning_values_parse() {
        assert_eq!("CUBIC".parse(), Ok(Congestion::Cubic));
        assert_eq!("bbr".parse(), Ok(Congestion::Bbr));
        assert!("vegas".parse::<Congestion>().is_err());
    }
}
