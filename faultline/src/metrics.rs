//! Prometheus metrics of `faultline replicate` and `faultline standby` in normal times
//! (`--metrics-listen ADDR`): the definitions, how they are updated from what the
//! replicator and the standby track, and the HTTP endpoint that serves them.
//!
//! Every metric is named `faultline_…` and carries the label `vm` (the VM id). The registry
//! and the Prometheus text exposition format (0.0.4) come from `prometheus-client`; the
//! HTTP/1.1 server is `tiny_http`, on its own threads: a scrape reads atomics and encodes a
//! few kilobytes, and never takes a lock the replication holds for long. A client that
//! sends garbage gets `400 Bad Request` from the server (or nothing) and changes nothing.
//! `GET /metrics` is served; any other path is `404`.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Bytes in a guest page.
const PAGE: u64 = 4096;

/// How often the exporter of `replicate` samples the live figures, for its rates.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(250);

/// The window over which rates are measured.
const RATE_WINDOW: Duration = Duration::from_secs(2);

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The address could not be bound (in use, not local, no permission).
    #[error("--metrics-listen {addr}: cannot listen for metrics scrapes there")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The HTTP server or its thread could not be started.
    #[error("--metrics-listen {addr}: cannot start the metrics server: {reason}")]
    Start { addr: SocketAddr, reason: String },
}

/// A gauge of a float value.
type FloatGauge = Gauge<f64, AtomicU64>;

/// Evacuation state, as [`ReplicateMetrics::evacuation_state`] exposes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvacuationState {
    /// Normal times: replicating to the standby.
    Replicating = 0,
    /// The guest is paused and its stale pages are crossing.
    Evacuating = 1,
    /// The evacuation ended: the guest runs at the standby.
    Done = 2,
    /// The evacuation failed.
    Failed = 3,
}

/// What the replicator tracks, sampled (from `vmm_shim::replica::ReplicatorStats`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ReplicateSample {
    /// Pages whose current version the standby has not acknowledged.
    pub stale_pages: u64,
    /// Pages handed to the connection for sending.
    pub pages_sent: u64,
    /// Pages the standby acknowledged as stored.
    pub pages_acked: u64,
    /// UDP bytes sent to the standby over all connections.
    pub link_bytes_sent: u64,
    /// Times the connection was lost and the session paused.
    pub pauses: u64,
    /// Whether the session runs on a live connection.
    pub connected: bool,
}

/// The metrics of `faultline replicate`.
#[derive(Clone)]
pub struct ReplicateMetrics {
    /// `faultline_replicate_stale_bytes` (gauge): pages written and not yet acknowledged by
    /// the standby at their current version, × 4096: what an evacuation now would send.
    pub stale_bytes: Gauge,
    /// `faultline_replicate_replicated_bytes_total` (counter): page bytes the standby
    /// acknowledged as stored (4096 per page and version).
    pub replicated_bytes: Counter,
    /// `faultline_replicate_sent_bytes_total` (counter): page bytes handed to the link
    /// (4096 per page; a page sent again after a lost connection counts again).
    pub sent_bytes: Counter,
    /// `faultline_replicate_rate_bytes_per_second` (gauge): replicated (acknowledged) page
    /// bytes per second over the last 2 s. `rate(faultline_replicate_replicated_bytes_total[1m])`
    /// gives the same over a longer window.
    pub rate: FloatGauge,
    /// `faultline_replicate_link_rate_bytes_per_second` (gauge): the highest UDP send rate
    /// to the standby measured over 2 s so far (the start of replication fills the budget or
    /// the link); the replication budget until one was measured.
    pub link_rate: FloatGauge,
    /// `faultline_replicate_predicted_evacuation_seconds` (gauge): stale bytes × wire
    /// overhead / link rate, where the wire overhead is link bytes sent / page bytes sent
    /// (at least 1). The time an evacuation now would take to send its stale pages, not
    /// counting the handshake (one round trip or two).
    pub predicted_evacuation: FloatGauge,
    /// `faultline_replicate_link_sent_bytes_total` (counter): UDP bytes sent to the standby
    /// by the replication (QUIC headers, acknowledgements and retransmissions included).
    pub link_sent_bytes: Counter,
    /// `faultline_replicate_pauses_total` (counter): times the connection was lost and the
    /// replication session paused.
    pub pauses: Counter,
    /// `faultline_replicate_connected` (gauge): 1 while the session runs on a live
    /// connection to the standby, 0 while it is paused, connecting, or replication ended.
    pub connected: Gauge,
    /// `faultline_replicate_evacuation_state` (gauge): 0 replicating, 1 evacuating, 2 done,
    /// 3 failed.
    pub evacuation_state: Gauge,
    /// `faultline_replicate_evacuation_sent_bytes_total` (counter): UDP bytes the
    /// evacuation sent so far (0 before it starts).
    pub evacuation_sent_bytes: Counter,
    rates: Arc<Mutex<Rates>>,
    budget_bytes_per_sec: f64,
}

/// Samples of (time, acknowledged page bytes, link bytes sent) over the rate window, and
/// the peak link rate so far.
#[derive(Default)]
struct Rates {
    samples: VecDeque<(Instant, u64, u64)>,
    peak_link: f64,
}

/// A registry whose metrics are named `faultline_…` and labelled `vm="<id>"`.
fn registry(vm_id: &str) -> Registry {
    Registry::with_prefix_and_labels(
        "faultline",
        [(Cow::Borrowed("vm"), Cow::Owned(vm_id.to_string()))].into_iter(),
    )
}

/// Raises `c` to `v` (a counter read from an absolute total; it never goes down).
fn raise(c: &Counter, v: u64) {
    let now = c.get();
    if v > now {
        c.inc_by(v - now);
    }
}

impl ReplicateMetrics {
    /// The metrics, registered in a new registry for `vm_id`. `budget_bytes_per_sec` is the
    /// link rate the prediction uses until one is measured.
    pub fn new(vm_id: &str, budget_bytes_per_sec: u64) -> (ReplicateMetrics, Registry) {
        let m = ReplicateMetrics {
            stale_bytes: Gauge::default(),
            replicated_bytes: Counter::default(),
            sent_bytes: Counter::default(),
            rate: FloatGauge::default(),
            link_rate: FloatGauge::default(),
            predicted_evacuation: FloatGauge::default(),
            link_sent_bytes: Counter::default(),
            pauses: Counter::default(),
            connected: Gauge::default(),
            evacuation_state: Gauge::default(),
            evacuation_sent_bytes: Counter::default(),
            rates: Arc::default(),
            budget_bytes_per_sec: budget_bytes_per_sec as f64,
        };
        let mut r = registry(vm_id);
        let s = "replicate_";
        r.register(
            format!("{s}stale_bytes"),
            "Guest bytes written and not yet acknowledged by the standby (stale pages x 4096)",
            m.stale_bytes.clone(),
        );
        r.register(
            format!("{s}replicated_bytes"),
            "Page bytes the standby acknowledged as stored",
            m.replicated_bytes.clone(),
        );
        r.register(
            format!("{s}sent_bytes"),
            "Page bytes sent for replication, resends included",
            m.sent_bytes.clone(),
        );
        r.register(
            format!("{s}rate_bytes_per_second"),
            "Replicated (acknowledged) page bytes per second over the last 2 s",
            m.rate.clone(),
        );
        r.register(
            format!("{s}link_rate_bytes_per_second"),
            "Highest UDP send rate to the standby measured over 2 s (the budget until measured)",
            m.link_rate.clone(),
        );
        r.register(
            format!("{s}predicted_evacuation_seconds"),
            "Stale bytes x wire overhead / link rate: time to send the stale pages if evacuating now",
            m.predicted_evacuation.clone(),
        );
        r.register(
            format!("{s}link_sent_bytes"),
            "UDP bytes sent to the standby by replication",
            m.link_sent_bytes.clone(),
        );
        r.register(
            format!("{s}pauses"),
            "Times the connection to the standby was lost and replication paused",
            m.pauses.clone(),
        );
        r.register(
            format!("{s}connected"),
            "1 while replication runs on a live connection to the standby",
            m.connected.clone(),
        );
        r.register(
            format!("{s}evacuation_state"),
            "0 replicating, 1 evacuating, 2 done, 3 failed",
            m.evacuation_state.clone(),
        );
        r.register(
            format!("{s}evacuation_sent_bytes"),
            "UDP bytes the evacuation sent",
            m.evacuation_sent_bytes.clone(),
        );
        (m, r)
    }

    /// Updates every metric but the evacuation's from a sample taken at `now`.
    pub fn update(&self, s: &ReplicateSample, now: Instant) {
        let stale = s.stale_pages * PAGE;
        self.stale_bytes.set(stale as i64);
        raise(&self.replicated_bytes, s.pages_acked * PAGE);
        raise(&self.sent_bytes, s.pages_sent * PAGE);
        raise(&self.link_sent_bytes, s.link_bytes_sent);
        raise(&self.pauses, s.pauses);
        self.connected.set(i64::from(s.connected));

        let mut r = self.rates.lock().unwrap_or_else(|p| p.into_inner());
        r.samples
            .push_back((now, s.pages_acked * PAGE, s.link_bytes_sent));
        while r
            .samples
            .get(1)
            .is_some_and(|&(t, ..)| now.duration_since(t) >= RATE_WINDOW)
        {
            r.samples.pop_front();
        }
        if let Some(&(t0, acked0, link0)) = r.samples.front() {
            let secs = now.duration_since(t0).as_secs_f64();
            if secs >= RATE_WINDOW.as_secs_f64() * 0.5 {
                let acked = (s.pages_acked * PAGE).saturating_sub(acked0) as f64 / secs;
                let link = s.link_bytes_sent.saturating_sub(link0) as f64 / secs;
                self.rate.set(acked);
                r.peak_link = r.peak_link.max(link);
            }
        }
        let link_rate = if r.peak_link > 0.0 {
            r.peak_link
        } else {
            self.budget_bytes_per_sec
        };
        self.link_rate.set(link_rate);
        let payload = s.pages_sent * PAGE;
        let overhead = if payload > 0 && s.link_bytes_sent > 0 {
            (s.link_bytes_sent as f64 / payload as f64).max(1.0)
        } else {
            1.0
        };
        let predicted = if stale == 0 {
            0.0
        } else if link_rate > 0.0 {
            stale as f64 * overhead / link_rate
        } else {
            f64::INFINITY
        };
        self.predicted_evacuation.set(predicted);
    }

    /// The evacuation moved to `state`.
    pub fn set_evacuation(&self, state: EvacuationState) {
        self.evacuation_state.set(state as i64);
    }

    /// The evacuation has sent `bytes` UDP bytes so far.
    pub fn evacuation_sent(&self, bytes: u64) {
        raise(&self.evacuation_sent_bytes, bytes);
    }
}

/// What the standby tracks, sampled (from `vmm_shim::replica::StandbySink`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StandbySample {
    /// Pages of guest memory the replica is for.
    pub pages: u64,
    /// Pages the replica holds at a valid version.
    pub valid_pages: u64,
    /// Page bytes of replication received and stored.
    pub bytes_received: u64,
    /// Times a session's connection was lost and it paused.
    pub pauses: u64,
    /// Whether a session runs on a live connection.
    pub connected: bool,
}

/// The metrics of `faultline standby`.
#[derive(Clone)]
pub struct StandbyMetrics {
    /// `faultline_standby_replica_pages` (gauge): pages of guest memory the replica holds at
    /// a valid version (of the current replication epoch, not torn). 0 once the replica has
    /// become guest memory at evacuation.
    pub replica_pages: Gauge,
    /// `faultline_standby_replica_bytes` (gauge): those pages × 4096.
    pub replica_bytes: Gauge,
    /// `faultline_standby_invalid_pages` (gauge): pages the replica cannot serve (never
    /// stored, torn, or of another epoch): guest pages − replica pages. They would cross at
    /// an evacuation now, with the pages the source knows are stale.
    pub invalid_pages: Gauge,
    /// `faultline_standby_received_bytes_total` (counter): page bytes of replication
    /// received and stored (4096 per page; resends count again).
    pub received_bytes: Counter,
    /// `faultline_standby_connected` (gauge): 1 while a session (replication or
    /// evacuation) runs on a live connection.
    pub connected: Gauge,
    /// `faultline_standby_pauses_total` (counter): times a session's connection was lost
    /// and the session paused.
    pub pauses: Counter,
}

impl StandbyMetrics {
    /// The metrics, registered in a new registry for `vm_id`.
    pub fn new(vm_id: &str) -> (StandbyMetrics, Registry) {
        let m = StandbyMetrics {
            replica_pages: Gauge::default(),
            replica_bytes: Gauge::default(),
            invalid_pages: Gauge::default(),
            received_bytes: Counter::default(),
            connected: Gauge::default(),
            pauses: Counter::default(),
        };
        let mut r = registry(vm_id);
        r.register(
            "standby_replica_pages",
            "Guest pages the replica holds at a valid version",
            m.replica_pages.clone(),
        );
        r.register(
            "standby_replica_bytes",
            "Guest bytes the replica holds at a valid version",
            m.replica_bytes.clone(),
        );
        r.register(
            "standby_invalid_pages",
            "Guest pages the replica cannot serve (never stored, torn, other epoch)",
            m.invalid_pages.clone(),
        );
        r.register(
            "standby_received_bytes",
            "Page bytes of replication received and stored",
            m.received_bytes.clone(),
        );
        r.register(
            "standby_connected",
            "1 while a session runs on a live connection",
            m.connected.clone(),
        );
        r.register(
            "standby_pauses",
            "Times a session's connection was lost and it paused",
            m.pauses.clone(),
        );
        (m, r)
    }

    /// Updates every metric from a sample.
    pub fn update(&self, s: &StandbySample) {
        self.replica_pages.set(s.valid_pages as i64);
        self.replica_bytes.set((s.valid_pages * PAGE) as i64);
        self.invalid_pages
            .set(s.pages.saturating_sub(s.valid_pages) as i64);
        raise(&self.received_bytes, s.bytes_received);
        raise(&self.pauses, s.pauses);
        self.connected.set(i64::from(s.connected));
    }
}

/// The registry in the Prometheus text exposition format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_text::encode(&mut out, registry);
    out
}

/// The HTTP endpoint serving a registry, and the thread that keeps it up to date. Dropping
/// it stops both.
pub struct Exporter {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
}

impl Exporter {
    /// Listens on `addr` (port 0: any) and serves `registry` at `GET /metrics`, calling
    /// `refresh` before each scrape and every `sample_every` (if given), on the exporter's
    /// own thread. `refresh` must be quick and must not block on the replication.
    pub fn start(
        addr: SocketAddr,
        registry: Registry,
        sample_every: Option<Duration>,
        refresh: impl Fn() + Send + 'static,
    ) -> Result<Exporter, MetricsError> {
        let listener =
            TcpListener::bind(addr).map_err(|source| MetricsError::Bind { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| MetricsError::Bind { addr, source })?;
        let server =
            tiny_http::Server::from_listener(listener, None).map_err(|e| MetricsError::Start {
                addr,
                reason: e.to_string(),
            })?;
        let server = Arc::new(server);
        let stop = Arc::new(AtomicBool::new(false));
        let (server2, stop2) = (server.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || serve(&server2, &registry, sample_every, &refresh, &stop2))
            .map_err(|e| MetricsError::Start {
                addr,
                reason: e.to_string(),
            })?;
        Ok(Exporter {
            addr: bound,
            stop,
            server,
            thread: Some(thread),
        })
    }

    /// The bound address (the port the system chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The exporter thread: refreshes the metrics on a timer and answers requests.
fn serve(
    server: &tiny_http::Server,
    registry: &Registry,
    sample_every: Option<Duration>,
    refresh: &dyn Fn(),
    stop: &AtomicBool,
) {
    // Without sampling, wake up now and then only to notice a stop.
    let period = sample_every.unwrap_or(Duration::from_millis(200));
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= next {
            if sample_every.is_some() {
                refresh();
            }
            next = now + period;
        }
        let request = match server.recv_timeout(next.saturating_duration_since(Instant::now())) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => {
                tracing::debug!(error = %e, "metrics: a request failed");
                continue;
            }
        };
        let path = request.url().split('?').next().unwrap_or("");
        let response = if *request.method() == tiny_http::Method::Get && path == "/metrics" {
            refresh();
            let header = tiny_http::Header::from_bytes(
                &b"Content-Type"[..],
                prometheus_text::CONTENT_TYPE.as_bytes(),
            );
            let mut r = tiny_http::Response::from_string(encode(registry));
            if let Ok(h) = header {
                r.add_header(h);
            }
            r
        } else {
            tiny_http::Response::from_string("not found: metrics are at GET /metrics\n")
                .with_status_code(404)
        };
        // A client that went away is its own problem.
        let _ = request.respond(response);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, name: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{")))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    }

    fn value(text: &str, name: &str) -> f64 {
        let l = line(text, name);
        assert!(l.contains("vm=\"vm7\""), "{l}");
        l.rsplit(' ').next().unwrap().parse().unwrap()
    }

    #[test]
    fn replicate_metrics_encode_what_was_sampled() {
        let (m, r) = ReplicateMetrics::new("vm7", 1_000_000);
        let t0 = Instant::now();
        let mut s = ReplicateSample {
            stale_pages: 10,
            pages_sent: 100,
            pages_acked: 90,
            link_bytes_sent: 100 * 4096 * 11 / 10,
            pauses: 1,
            connected: true,
        };
        m.update(&s, t0);
        let text = encode(&r);
        assert_eq!(value(&text, "faultline_replicate_stale_bytes"), 40960.0);
        assert_eq!(
            value(&text, "faultline_replicate_replicated_bytes_total"),
            90.0 * 4096.0
        );
        assert_eq!(
            value(&text, "faultline_replicate_link_sent_bytes_total"),
            450560.0
        );
        assert_eq!(value(&text, "faultline_replicate_pauses_total"), 1.0);
        assert_eq!(value(&text, "faultline_replicate_connected"), 1.0);
        assert_eq!(value(&text, "faultline_replicate_evacuation_state"), 0.0);
        // No rate measured yet: the budget, with the measured 10% overhead.
        assert_eq!(
            value(&text, "faultline_replicate_link_rate_bytes_per_second"),
            1e6
        );
        let p = value(&text, "faultline_replicate_predicted_evacuation_seconds");
        assert!((p - 40960.0 * 1.1 / 1e6).abs() < 1e-9, "{p}");
        assert!(text.contains("# TYPE faultline_replicate_replicated_bytes_total counter"));
        assert!(text.contains("# TYPE faultline_replicate_stale_bytes gauge"));

        // Two seconds on: 2 MB acknowledged and 4 MB sent on the link.
        s.pages_acked += 500;
        s.pages_sent += 500;
        s.link_bytes_sent += 4_000_000;
        s.connected = false;
        s.pauses = 2;
        m.update(&s, t0 + Duration::from_secs(2));
        m.set_evacuation(EvacuationState::Evacuating);
        m.evacuation_sent(12345);
        let text = encode(&r);
        let rate = value(&text, "faultline_replicate_rate_bytes_per_second");
        assert!((rate - 500.0 * 4096.0 / 2.0).abs() < 1e-6, "{rate}");
        assert_eq!(
            value(&text, "faultline_replicate_link_rate_bytes_per_second"),
            2e6
        );
        let overhead = s.link_bytes_sent as f64 / (600.0 * 4096.0);
        let p = value(&text, "faultline_replicate_predicted_evacuation_seconds");
        assert!((p - 40960.0 * overhead / 2e6).abs() < 1e-9, "{p}");
        assert_eq!(value(&text, "faultline_replicate_connected"), 0.0);
        assert_eq!(value(&text, "faultline_replicate_pauses_total"), 2.0);
        assert_eq!(value(&text, "faultline_replicate_evacuation_state"), 1.0);
        assert_eq!(
            value(&text, "faultline_replicate_evacuation_sent_bytes_total"),
            12345.0
        );
        // Counters never go down, whatever a sample says.
        s.pages_acked = 0;
        m.update(&s, t0 + Duration::from_secs(3));
        let text = encode(&r);
        assert_eq!(
            value(&text, "faultline_replicate_replicated_bytes_total"),
            590.0 * 4096.0
        );
    }

    #[test]
    fn nothing_stale_predicts_no_time() {
        let (m, r) = ReplicateMetrics::new("vm7", 0);
        m.update(&ReplicateSample::default(), Instant::now());
        let text = encode(&r);
        assert_eq!(
            value(&text, "faultline_replicate_predicted_evacuation_seconds"),
            0.0
        );
        assert_eq!(value(&text, "faultline_replicate_stale_bytes"), 0.0);
    }

    #[test]
    fn standby_metrics_encode_what_was_sampled() {
        let (m, r) = StandbyMetrics::new("vm7");
        m.update(&StandbySample {
            pages: 1000,
            valid_pages: 600,
            bytes_received: 700 * 4096,
            pauses: 3,
            connected: true,
        });
        let text = encode(&r);
        assert_eq!(value(&text, "faultline_standby_replica_pages"), 600.0);
        assert_eq!(
            value(&text, "faultline_standby_replica_bytes"),
            600.0 * 4096.0
        );
        assert_eq!(value(&text, "faultline_standby_invalid_pages"), 400.0);
        assert_eq!(
            value(&text, "faultline_standby_received_bytes_total"),
            700.0 * 4096.0
        );
        assert_eq!(value(&text, "faultline_standby_pauses_total"), 3.0);
        assert_eq!(value(&text, "faultline_standby_connected"), 1.0);
    }

    fn get(addr: SocketAddr, request: &[u8]) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(request).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    #[test]
    fn the_exporter_serves_metrics_and_nothing_else() {
        let (m, r) = StandbyMetrics::new("vm7");
        let refreshed = Arc::new(AtomicU64::new(0));
        let n = refreshed.clone();
        let e = Exporter::start("127.0.0.1:0".parse().unwrap(), r, None, move || {
            let k = n.fetch_add(1, Ordering::Relaxed) + 1;
            m.update(&StandbySample {
                pages: 10,
                valid_pages: k.min(10),
                ..Default::default()
            });
        })
        .unwrap();
        let addr = e.local_addr();
        // Garbage, and a client that connects and says nothing, change nothing.
        let garbage = get(addr, b"\x16\x03\x01\x00\xff\xfe garbage\r\n\r\n");
        assert!(!garbage.contains("faultline_"), "{garbage}");
        let _silent = std::net::TcpStream::connect(addr).unwrap();
        let ok = get(
            addr,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("text/plain; version=0.0.4"), "{ok}");
        assert!(
            ok.contains("faultline_standby_invalid_pages{vm=\"vm7\"}"),
            "{ok}"
        );
        let missing = get(
            addr,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let post = get(
            addr,
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
        assert!(post.starts_with("HTTP/1.1 404"), "{post}");
        assert!(refreshed.load(Ordering::Relaxed) >= 1);
        drop(e);
    }

    #[test]
    fn an_address_in_use_names_the_flag() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = Exporter::start(addr, Registry::default(), None, || {})
            .err()
            .expect("the port is taken");
        let msg = err.to_string();
        assert!(
            msg.contains("--metrics-listen") && msg.contains(&addr.to_string()),
            "{msg}"
        );
        assert!(
            std::error::Error::source(&err)
                .unwrap()
                .to_string()
                .contains("in use"),
            "{err:?}"
        );
    }
}
