//! The daemon: one thread reads frames from the host, one scans memory interval by
//! interval, one pre-touches on demand, and the main thread dispatches between them.
//!
//! Behaviour on the wire:
//! * a `Hello` at start and before every report (a host that attaches to the serial line
//!   late learns the agent's parameters with the next report);
//! * a report — `HotRanges` parts then `FreeRanges` parts, one `seq` — every
//!   `report_every`, and on `ReportNow` (at once from the last finished interval, or after
//!   the first interval if none has finished yet);
//! * on `PostcopyStarted`: scanning pauses (its reads would only compete for absent pages),
//!   the configured processes are pre-touched, and a `Touched` answers; `PostcopyFinished`
//!   resumes scanning;
//! * frames that are well formed but invalid, and messages the agent does not take, are
//!   answered with `Error` (at most [`ERRORS_PER_SECOND`] a second, so a flood cannot make
//!   the agent flood back); garbage between frames is skipped silently (see
//!   [`FrameReader`]).

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::config::Config;
use crate::proto::{
    encode_into, range_messages, DecodeError, ErrorCode, FrameReader, Hello, Message, RangeKind,
};
use crate::scan::{ScanConfig, ScanResult, Scanner};
use crate::throttle::process_cpu_time;
use crate::transport::{self, TransportError};

/// Most `Error` replies per second.
pub const ERRORS_PER_SECOND: u32 = 10;

/// Why the daemon stopped.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// The channel could not be opened.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Writing to the host failed.
    #[error("writing to the host failed: {0}")]
    Write(std::io::Error),
}

enum Event {
    Frame(Result<Message, DecodeError>),
    Closed(Option<std::io::Error>),
    Scanned(Arc<ScanResult>),
    ScanFailed(String),
    Touched(crate::proto::TouchReport),
}

/// An error and all its sources, `: `-separated, as `anyhow`'s `{:#}` prints them: an error's
/// own `Display` leaves its source to the chain, so this is the text to log, to send to the
/// host, or to print on exit. (The host crates use `uffd_core::error::chain`; this crate
/// depends on none of them.)
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// Logs a line on stderr (the console in the test guest).
macro_rules! log {
    ($($t:tt)*) => { eprintln!("guest-agent: {}", format_args!($($t)*)) };
}

type Writer = Arc<Mutex<Box<dyn Write + Send>>>;

fn send(writer: &Writer, msgs: &[Message]) -> std::io::Result<()> {
    let mut buf = Vec::new();
    for m in msgs {
        encode_into(m, &mut buf).map_err(|e| std::io::Error::other(chain(&e)))?;
    }
    // One lock for all parts, so a report is never interleaved with another message.
    let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
    w.write_all(&buf)?;
    w.flush()
}

fn reader_thread(mut reader: Box<dyn Read + Send>, tx: mpsc::Sender<Event>) {
    let mut frames = FrameReader::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => {
                let _ = tx.send(Event::Closed(None));
                return;
            }
            Ok(n) => frames.push(&buf[..n], |item| {
                let _ = tx.send(Event::Frame(item));
            }),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                let _ = tx.send(Event::Closed(Some(e)));
                return;
            }
        }
    }
}

fn scanner_thread(
    cfg: ScanConfig,
    interval: Duration,
    paused: Arc<AtomicBool>,
    tx: mpsc::Sender<Event>,
) {
    let mut scanner = match Scanner::open(cfg) {
        Ok(s) => s,
        Err(e) => {
            let _ = tx.send(Event::ScanFailed(chain(&e)));
            return;
        }
    };
    log!(
        "scanning {} frames, hot method {}",
        scanner.frames(),
        scanner.method().name()
    );
    let mut armed = false;
    loop {
        if paused.load(Ordering::Relaxed) {
            armed = false;
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let start = Instant::now();
        if !armed {
            if let Err(e) = scanner.start_window() {
                let _ = tx.send(Event::ScanFailed(chain(&e)));
                return;
            }
            armed = true;
        }
        // The interval runs from the (re-)arming: wait out what is left of it.
        std::thread::sleep(interval.saturating_sub(start.elapsed()));
        if paused.load(Ordering::Relaxed) {
            continue;
        }
        match scanner.finish_window() {
            Ok(r) => {
                if tx.send(Event::Scanned(Arc::new(r))).is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.send(Event::ScanFailed(chain(&e)));
                return;
            }
        }
    }
}

struct State {
    cfg: Config,
    hello: Hello,
    writer: Writer,
    tx: mpsc::Sender<Event>,
    latest: Option<Arc<ScanResult>>,
    /// Why the scanner stopped, if it did (reports are then answered with an error).
    scan_failed: Option<String>,
    report_pending: bool,
    last_report: Instant,
    seq: u64,
    paused: Arc<AtomicBool>,
    touching: bool,
    touch_started: Instant,
    errors_this_second: (Instant, u32),
    started: Instant,
}

impl State {
    fn report(&mut self, r: &ScanResult) -> std::io::Result<()> {
        self.seq += 1;
        let per = self.cfg.ranges_per_message;
        let mut msgs = vec![Message::Hello(self.hello.clone())];
        msgs.extend(range_messages(RangeKind::Hot, self.seq, &r.hot, per));
        msgs.extend(range_messages(RangeKind::Free, self.seq, &r.free, per));
        send(&self.writer, &msgs)?;
        self.last_report = Instant::now();
        let s = &r.stats;
        let up = self.started.elapsed().as_secs_f64().max(1e-3);
        log!(
            "report seq={} method={} free_mode={} frames={} hot_pages={} hot_ranges={} free_pages={} \
             free_ranges={} buddyinfo_free_pages={} written_pages={} processes={} pass_cpu_ms={} pass_wall_ms={} \
             agent_cpu_pct={:.2}",
            self.seq,
            r.method.name(),
            r.free_mode.name(),
            s.frames,
            s.hot_pages,
            r.hot.len(),
            s.free_pages,
            r.free.len(),
            s.buddyinfo_free_pages.map_or("?".to_string(), |v| v.to_string()),
            s.written_pages,
            s.processes,
            s.cpu.as_millis(),
            s.wall.as_millis(),
            100.0 * process_cpu_time().as_secs_f64() / up,
        );
        Ok(())
    }

    fn error(&mut self, code: ErrorCode, text: String) -> std::io::Result<()> {
        let now = Instant::now();
        if now.duration_since(self.errors_this_second.0) >= Duration::from_secs(1) {
            self.errors_this_second = (now, 0);
        }
        if self.errors_this_second.1 >= ERRORS_PER_SECOND {
            return Ok(());
        }
        self.errors_this_second.1 += 1;
        send(&self.writer, &[Message::error(code, text)])
    }

    fn on_message(&mut self, msg: Message) -> std::io::Result<()> {
        match msg {
            Message::ReportNow => match (self.latest.clone(), &self.scan_failed) {
                (Some(r), _) => self.report(&r)?,
                (None, Some(e)) => {
                    let e = format!("no report: {e}");
                    self.error(ErrorCode::SCAN_FAILED, e)?;
                }
                (None, None) => self.report_pending = true,
            },
            Message::PostcopyStarted => {
                self.paused.store(true, Ordering::Relaxed);
                if self.touching {
                    return Ok(()); // already at it; one Touched answers both
                }
                self.touching = true;
                self.touch_started = Instant::now();
                log!("postcopy started: pre-touching");
                let hot = self.latest.clone();
                let (targets, threads, mode) = (
                    self.cfg.touch.clone(),
                    self.cfg.touch_threads,
                    self.cfg.touch_mode,
                );
                let tx = self.tx.clone();
                std::thread::spawn(move || {
                    let report = crate::touch::touch(
                        &targets,
                        threads,
                        mode,
                        hot.as_deref().map(|r| r.hot.as_slice()),
                    );
                    let _ = tx.send(Event::Touched(report));
                });
            }
            Message::PostcopyFinished => {
                log!("postcopy finished: scanning resumes");
                // What was hot before the migration says little now: the next report comes
                // from a fresh interval.
                self.latest = None;
                self.paused.store(false, Ordering::Relaxed);
            }
            Message::Error { code, message } => log!("host error {}: {message}", code.0),
            other => {
                let what = format!(
                    "{:?} is not a message the agent accepts",
                    other.message_type()
                );
                self.error(ErrorCode::UNEXPECTED, what)?;
            }
        }
        Ok(())
    }

    fn on_event(&mut self, ev: Event) -> Result<bool, DaemonError> {
        match ev {
            Event::Frame(Ok(msg)) => self.on_message(msg).map_err(DaemonError::Write)?,
            Event::Frame(Err(DecodeError::Garbage { .. } | DecodeError::BadSync(_))) => {}
            Event::Frame(Err(
                e @ (DecodeError::BadHeaderCheck { .. } | DecodeError::BadChecksum { .. }),
            )) => {
                // Most likely line noise or a host attaching mid-frame: not worth an answer.
                log!("skipped a damaged frame: {}", chain(&e));
            }
            Event::Frame(Err(e)) => {
                let text = chain(&e);
                log!("bad frame from host: {text}");
                self.error(e.code(), text).map_err(DaemonError::Write)?;
            }
            Event::Closed(e) => {
                log!(
                    "host channel closed{}",
                    e.map_or(String::new(), |e| format!(": {e}"))
                );
                return Ok(false);
            }
            Event::Scanned(r) => {
                let periodic = self
                    .cfg
                    .report_every
                    .is_some_and(|p| self.last_report.elapsed() >= p);
                if self.report_pending || periodic {
                    self.report_pending = false;
                    self.report(&r).map_err(DaemonError::Write)?;
                }
                self.latest = Some(r);
            }
            Event::ScanFailed(e) => {
                log!("scanning failed: {e}");
                self.error(ErrorCode::SCAN_FAILED, e)
                    .map_err(DaemonError::Write)?;
            }
            Event::Touched(mut t) => {
                self.touching = false;
                t.elapsed_ms = self.touch_started.elapsed().as_millis() as u64;
                log!(
                    "pre-touched processes={} pages={} failed_pages={} elapsed_ms={}",
                    t.processes,
                    t.pages,
                    t.failed_pages,
                    t.elapsed_ms
                );
                send(&self.writer, &[Message::Touched(t)]).map_err(DaemonError::Write)?;
            }
        }
        Ok(true)
    }
}

/// Runs the agent until the host channel closes.
pub fn run(cfg: Config) -> Result<(), DaemonError> {
    let channel = transport::open(&cfg.device, cfg.connect_timeout)?;
    let (hello, poison) = crate::sysinfo::hello();
    log!(
        "protocol {} page_size={} mem_total_bytes={} poison_on_free={} ({}) device={:?}",
        hello.version,
        hello.page_size,
        hello.mem_total_bytes,
        hello.poison_on_free,
        poison.reason,
        cfg.device
    );
    let writer: Writer = Arc::new(Mutex::new(channel.writer));
    send(&writer, &[Message::Hello(hello.clone())]).map_err(DaemonError::Write)?;
    let (tx, rx) = mpsc::channel();
    {
        let tx = tx.clone();
        let reader = channel.reader;
        std::thread::spawn(move || reader_thread(reader, tx));
    }
    let paused = Arc::new(AtomicBool::new(false));
    {
        let scan_cfg = ScanConfig {
            batch_pages: cfg.batch_pages,
            max_cpu_pct: cfg.max_cpu_pct,
            method: cfg.hot_method,
            ..ScanConfig::default()
        };
        let (tx, paused, interval) = (tx.clone(), paused.clone(), cfg.interval);
        std::thread::spawn(move || scanner_thread(scan_cfg, interval, paused, tx));
    }
    let now = Instant::now();
    let mut state = State {
        cfg,
        hello,
        writer,
        tx,
        latest: None,
        scan_failed: None,
        report_pending: false,
        last_report: now,
        seq: 0,
        paused,
        touching: false,
        touch_started: now,
        errors_this_second: (now, 0),
        started: now,
    };
    loop {
        match rx.recv_timeout(Duration::from_secs(3600)) {
            Ok(ev) => {
                if !state.on_event(ev)? {
                    return Ok(());
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::RangeError;

    /// `e`'s own message does not hold `cause`; its chain holds it exactly once.
    fn cause_once(e: &(dyn std::error::Error + 'static), cause: &str) {
        let (own, all) = (e.to_string(), chain(e));
        assert!(!own.contains(cause), "{own:?} repeats its source {cause:?}");
        assert_eq!(all.matches(cause).count(), 1, "{all:?}");
    }

    #[test]
    fn display_leaves_the_source_to_the_chain() {
        let io = || std::io::Error::from_raw_os_error(libc::EACCES);
        let cause = io().to_string();
        let e = DaemonError::Transport(TransportError::Open {
            path: "/dev/hvc1".into(),
            source: io(),
        });
        assert_eq!(chain(&e), format!("cannot open /dev/hvc1: {cause}"));
        cause_once(&e, &cause);
        cause_once(
            &crate::config::ConfigError::Read {
                path: "/etc/agent.conf".into(),
                source: io(),
            },
            &cause,
        );
        cause_once(
            &crate::scan::ScanError::Read {
                what: "kpageflags",
                source: io(),
            },
            &cause,
        );

        let ranges = RangeError::Empty { index: 3 };
        let cause = ranges.to_string();
        cause_once(&DecodeError::Ranges(ranges.clone()), &cause);
        cause_once(&crate::proto::EncodeError::Ranges(ranges.clone()), &cause);
        cause_once(
            &crate::proto::ReportError::Ranges {
                kind: RangeKind::Hot,
                seq: 1,
                source: ranges,
            },
            &cause,
        );
    }
}
