//! `faultline wan-emu`: the user-space WAN emulator (`wan-emu` crate) as a stand-alone UDP
//! relay, for migrations between real machines or processes over an emulated WAN:
//!
//! ```text
//! faultline source --connect <listen> ──► wan-emu (--listen) ──► faultline dest (--upstream)
//! ```
//!
//! It relays until stdin reaches end of file or it gets SIGINT/SIGTERM, and reads commands
//! on stdin meanwhile (`cut`, `restore`, `stats`). Counters are printed as JSON lines on
//! stdout. The parsers for rates, durations, queue sizes and loss live here too; `faultline
//! demo --wan-*` uses them.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use wan_emu::{LinkConfig, WanCounters, WanEmulator};

use super::parse_bytes;

#[derive(Args, Debug)]
pub struct WanArgs {
    /// Address to listen on; point the client (`faultline source --connect`) here.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Address to relay to: the server (the `faultline dest` listener).
    #[arg(long)]
    pub upstream: SocketAddr,
    #[command(flatten)]
    pub link: LinkArgs,
    /// Seed of the loss and jitter decisions (the same seed loses the same datagrams).
    #[arg(long, default_value_t = 0x5EED)]
    pub seed: u64,
    /// Print every line on stdout as JSON (start-up and command acknowledgements too);
    /// otherwise those go to stderr as text and stdout holds only the counter lines.
    #[arg(long)]
    pub json: bool,
    /// Do not read commands from stdin; relay until SIGINT or SIGTERM (for running in the
    /// background, where stdin may be at end of file at once).
    #[arg(long)]
    pub ignore_stdin: bool,
}

/// The impairments of the emulated link, the same both ways.
#[derive(Args, Debug, Clone, Default)]
pub struct LinkArgs {
    /// Round-trip time, e.g. 20ms, 0.1s (half of it is added each way).
    #[arg(long, value_parser = parse_duration, conflicts_with = "delay")]
    pub rtt: Option<Duration>,
    /// One-way delay instead of --rtt, e.g. 10ms.
    #[arg(long, value_parser = parse_duration)]
    pub delay: Option<Duration>,
    /// Jitter: each datagram's delay varies uniformly within ±this, e.g. 5ms (order is kept).
    #[arg(long, value_parser = parse_duration)]
    pub jitter: Option<Duration>,
    /// Bottleneck rate in bits per second, decimal suffixes: 100M = 100 Mbit/s, 1G =
    /// 1 Gbit/s, 2.5G, 500k [default: unlimited].
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<u64>,
    /// Bottleneck queue in bytes (binary suffixes: 64K, 2M); tail drop beyond it. Needs
    /// --rate [default: one bandwidth-delay product, at least 64 KiB].
    #[arg(long, value_parser = parse_bytes, requires = "rate")]
    pub queue: Option<u64>,
    /// Random loss per datagram: a probability (0.01) or a percentage (1%).
    #[arg(long, value_parser = parse_loss)]
    pub loss: Option<f64>,
    /// IP MTU of the link in bytes; larger datagrams are dropped, as on a real path. 0
    /// carries anything (loopback's 64 KiB) [default: 1500, Ethernet's].
    #[arg(long)]
    pub mtu: Option<u32>,
}

impl LinkArgs {
    /// The link these flags describe, checked.
    pub fn config(&self, seed: u64) -> anyhow::Result<LinkConfig> {
        let delay = match (self.rtt, self.delay) {
            (Some(rtt), _) => rtt / 2,
            (None, Some(d)) => d,
            (None, None) => Duration::ZERO,
        };
        let cfg = LinkConfig {
            delay,
            jitter: self.jitter.unwrap_or_default(),
            rate_bps: self.rate,
            queue_bytes: self.queue,
            loss: self.loss.unwrap_or(0.0),
            seed,
            ..LinkConfig::default()
        };
        let cfg = match self.mtu {
            Some(0) => cfg.with_mtu(None),
            Some(mtu) => cfg.with_mtu(Some(mtu)),
            None => cfg,
        };
        cfg.validate().context("invalid link")?;
        Ok(cfg)
    }
}

/// A link's parameters as reports print them.
#[derive(Clone, Debug, Serialize)]
pub struct LinkReport {
    pub rtt_ms: f64,
    pub delay_us: u64,
    pub jitter_us: u64,
    /// Bottleneck rate, bits per second; null is unlimited.
    pub rate_bps: Option<u64>,
    /// The queue in force (the default when none was given); null without a rate.
    pub queue_bytes: Option<u64>,
    pub loss: f64,
    /// IP MTU; null carries anything.
    pub mtu: Option<u32>,
    pub seed: u64,
}

impl From<&LinkConfig> for LinkReport {
    fn from(c: &LinkConfig) -> LinkReport {
        LinkReport {
            rtt_ms: 2.0 * c.delay.as_secs_f64() * 1e3,
            delay_us: c.delay.as_micros() as u64,
            jitter_us: c.jitter.as_micros() as u64,
            rate_bps: c.rate_bps,
            queue_bytes: c.effective_queue_bytes(),
            loss: c.loss,
            mtu: c.mtu,
            seed: c.seed,
        }
    }
}

impl std::fmt::Display for LinkReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ms RTT", self.rtt_ms)?;
        if self.jitter_us > 0 {
            write!(f, " ±{:.1} ms jitter", self.jitter_us as f64 / 1e3)?;
        }
        match (self.rate_bps, self.queue_bytes) {
            (Some(r), Some(q)) => write!(f, ", {} (queue {} KB)", fmt_rate(r), q / 1000)?,
            (Some(r), None) => write!(f, ", {}", fmt_rate(r))?,
            _ => write!(f, ", unlimited rate")?,
        }
        if self.loss > 0.0 {
            write!(f, ", {}% loss", self.loss * 100.0)?;
        }
        Ok(())
    }
}

/// `1 Gbit/s`, `200 Mbit/s`, `1.5 kbit/s`.
pub fn fmt_rate(bps: u64) -> String {
    let (v, unit) = match bps {
        b if b >= 1_000_000_000 => (b as f64 / 1e9, "Gbit/s"),
        b if b >= 1_000_000 => (b as f64 / 1e6, "Mbit/s"),
        b if b >= 1_000 => (b as f64 / 1e3, "kbit/s"),
        b => (b as f64, "bit/s"),
    };
    format!("{} {unit}", (v * 1000.0).round() / 1000.0)
}

/// One line of the counters: `{"event": "stats", "elapsed_ms": .., "cut": .., counters}`.
#[derive(Serialize)]
struct CounterLine<'a> {
    event: &'a str,
    elapsed_ms: u64,
    cut: bool,
    #[serde(flatten)]
    counters: WanCounters,
}

/// The first line with `--json`: where to point the client, and the link.
#[derive(Serialize)]
struct Listening<'a> {
    event: &'a str,
    listen: SocketAddr,
    upstream: SocketAddr,
    link: &'a LinkReport,
}

/// Set by the SIGINT/SIGTERM handler; the main loop polls it.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() -> anyhow::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: `on_signal` is an `extern "C"` function that only stores to an atomic,
        // which is async-signal-safe; the sigaction struct is zero-initialised (valid for
        // this plain C struct) and lives for the call.
        let r = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("installing a handler for signal {sig}"));
        }
    }
    Ok(())
}

/// Output of the running relay: JSON lines on stdout, text on stderr.
struct Out {
    json: bool,
    started: Instant,
}

impl Out {
    fn json_line(&self, v: &impl Serialize) -> anyhow::Result<()> {
        let line = serde_json::to_string(v)?;
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{line}")
            .and_then(|_| stdout.flush())
            .context("writing to stdout")
    }

    /// A notice: a JSON event with `--json`, a line on stderr otherwise.
    fn notice(&self, event: &str, text: &str) -> anyhow::Result<()> {
        if self.json {
            self.json_line(&serde_json::json!({
                "event": event,
                "elapsed_ms": self.elapsed_ms(),
                "message": text,
            }))
        } else {
            eprintln!("wan-emu: {text}");
            Ok(())
        }
    }

    fn counters(&self, event: &str, wan: &WanEmulator) -> anyhow::Result<()> {
        self.json_line(&CounterLine {
            event,
            elapsed_ms: self.elapsed_ms(),
            cut: wan.is_cut(),
            counters: wan.counters(),
        })
    }

    fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

const HELP: &str = "commands: cut, restore, stats, help (end of input or Ctrl-C stops)";

pub fn run(a: WanArgs) -> anyhow::Result<ExitCode> {
    let cfg = a.link.config(a.seed)?;
    install_signal_handlers()?;
    let wan = WanEmulator::start(a.listen, a.upstream, cfg.clone())
        .with_context(|| format!("starting the WAN emulator on {}", a.listen))?;
    let out = Out {
        json: a.json,
        started: Instant::now(),
    };
    let link = LinkReport::from(&cfg);
    if a.json {
        out.json_line(&Listening {
            event: "listening",
            listen: wan.local_addr(),
            upstream: a.upstream,
            link: &link,
        })?;
    } else {
        eprintln!(
            "wan-emu: relaying {} -> {} over {link}; {HELP}",
            wan.local_addr(),
            a.upstream
        );
    }

    // Commands come from a reader thread, so that the main thread can also watch for
    // signals. At end of input the sender is dropped, which ends the loop below.
    let (tx, rx) = mpsc::channel::<String>();
    if !a.ignore_stdin {
        std::thread::Builder::new()
            .name("wan-emu-stdin".into())
            .spawn(move || {
                for line in std::io::stdin().lock().lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })
            .context("starting the stdin reader")?;
    } else {
        // Keep the sender alive: without stdin only a signal ends the relay.
        std::mem::forget(tx);
    }

    loop {
        if STOP.load(Ordering::SeqCst) {
            break;
        }
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => command(line.trim(), &wan, &out)?,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    out.counters("final", &wan)?;
    wan.shutdown();
    Ok(ExitCode::SUCCESS)
}

fn command(cmd: &str, wan: &WanEmulator, out: &Out) -> anyhow::Result<()> {
    match cmd {
        "" => Ok(()),
        "cut" => {
            wan.cut();
            out.notice("cut", "link cut: every datagram is dropped until `restore`")
        }
        "restore" => {
            wan.restore();
            out.notice("restore", "link restored")
        }
        "stats" => out.counters("stats", wan),
        "help" => out.notice("help", HELP),
        other => {
            let msg = format!("unknown command {other:?}; {HELP}");
            if out.json {
                out.json_line(&serde_json::json!({"event": "error", "message": msg}))
            } else {
                eprintln!("wan-emu: {msg}");
                Ok(())
            }
        }
    }
}

/// A rate in bits per second with decimal suffixes: `100M`, `1G`, `2.5G`, `500k`,
/// `100Mbit`, `100mbps`, `1e9`.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let body = ["bit/s", "bps", "bit", "b/s"]
        .iter()
        .find_map(|u| lower.strip_suffix(u))
        .unwrap_or(&lower);
    let (num, mult) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 1e3),
        Some('m') => (&body[..body.len() - 1], 1e6),
        Some('g') => (&body[..body.len() - 1], 1e9),
        Some('t') => (&body[..body.len() - 1], 1e12),
        _ => (body, 1.0),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a rate in bit/s (examples: 100M, 1G, 2.5G)"))?;
    let bps = v * mult;
    if !(1.0..=1e15).contains(&bps) {
        return Err(format!(
            "{s:?} is out of range (at least 1 bit/s, at most 1000 Tbit/s)"
        ));
    }
    Ok(bps.round() as u64)
}

/// A duration: `20ms`, `1.5s`, `500us`; a bare number is milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim().to_ascii_lowercase();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix("us").or_else(|| t.strip_suffix("µs")) {
        (n, 1e-6)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else {
        (t.as_str(), 1e-3)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (examples: 20ms, 1.5s, 500us)"))?;
    Duration::try_from_secs_f64(v * scale)
        .ok()
        .filter(|d| *d <= Duration::from_secs(3600))
        .ok_or_else(|| format!("{s:?} must be between 0 and one hour"))
}

/// A loss probability: `0.01` or `1%`.
pub fn parse_loss(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let (num, scale) = match t.strip_suffix('%') {
        Some(n) => (n, 0.01),
        None => (t, 1.0),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a loss rate (examples: 0.01, 1%)"))?;
    let p = v * scale;
    if !(0.0..=1.0).contains(&p) {
        return Err(format!(
            "{s:?} is not a probability between 0 and 1 (0%-100%)"
        ));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_decimal_bits_per_second() {
        assert_eq!(parse_rate("100M"), Ok(100_000_000));
        assert_eq!(parse_rate("1G"), Ok(1_000_000_000));
        assert_eq!(parse_rate("2.5G"), Ok(2_500_000_000));
        assert_eq!(parse_rate("500k"), Ok(500_000));
        assert_eq!(parse_rate("100Mbit"), Ok(100_000_000));
        assert_eq!(parse_rate("100mbps"), Ok(100_000_000));
        assert_eq!(parse_rate("1Gbit/s"), Ok(1_000_000_000));
        assert_eq!(parse_rate("64000"), Ok(64_000));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("-1G").is_err());
        assert!(parse_rate("1Q").is_err());
    }

    #[test]
    fn durations_default_to_milliseconds() {
        assert_eq!(parse_duration("20ms"), Ok(Duration::from_millis(20)));
        assert_eq!(parse_duration("20"), Ok(Duration::from_millis(20)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("500us"), Ok(Duration::from_micros(500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("-5ms").is_err());
        assert!(parse_duration("2h").is_err());
        assert!(parse_duration("4000s").is_err());
    }

    #[test]
    fn loss_is_a_probability_or_a_percentage() {
        assert_eq!(parse_loss("0.01"), Ok(0.01));
        assert_eq!(parse_loss("1%"), Ok(0.01));
        assert_eq!(parse_loss("0"), Ok(0.0));
        assert!(parse_loss("1.5").is_err());
        assert!(parse_loss("150%").is_err());
        assert!(parse_loss("NaN").is_err());
    }

    #[test]
    fn queue_sizes_are_binary() {
        assert_eq!(parse_bytes("64K"), Ok(65536));
        assert_eq!(parse_bytes("1250000"), Ok(1_250_000));
        assert_eq!(parse_bytes("2MiB"), Ok(2 << 20));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("1X").is_err());
    }

    #[test]
    fn rtt_halves_into_the_one_way_delay() {
        let l = LinkArgs {
            rtt: Some(Duration::from_millis(20)),
            rate: Some(100_000_000),
            ..LinkArgs::default()
        };
        let c = l.config(7).unwrap();
        assert_eq!(c.delay, Duration::from_millis(10));
        assert_eq!(c.seed, 7);
        let r = LinkReport::from(&c);
        assert_eq!(r.rtt_ms, 20.0);
        assert_eq!(r.queue_bytes, Some(250_000), "default queue: one BDP");
        assert_eq!(
            r.to_string(),
            "20 ms RTT, 100 Mbit/s (queue 250 KB)",
            "text form"
        );
        let bad = LinkArgs {
            loss: Some(2.0),
            ..LinkArgs::default()
        };
        assert!(bad.config(1).is_err());
    }
}
