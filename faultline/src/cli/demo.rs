//! `faultline demo`: a source and a destination process on loopback, a built-in image, a
//! workload on the destination during postcopy, digests compared, a report printed.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::builder::ArgPredicate;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::Value;
use transport::tls::Identity;

use super::roles::SourceOutput;
use super::wan::{LinkArgs, LinkReport};
use super::{parse_size, EVENT_PREFIX};
use faultline::image::ImageMix;
use transport::quic::{bdp_bytes, ENV_EXPECTED_BDP};
use wan_emu::{LinkConfig, WanCounters, WanEmulator};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Guest memory size [default: 1G; 256M with --vm].
    #[arg(long, value_parser = parse_size, default_value = "1G",
          default_value_if("vm", ArgPredicate::IsPresent, Some("256M")), hide_default_value = true)]
    pub size: u64,
    /// memfd-backed (MAP_SHARED) destination memory instead of private anonymous memory.
    #[arg(long)]
    pub memfd: bool,
    /// Threads reading and writing destination memory during postcopy.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Seed of the built-in image.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print one JSON object instead of the text report.
    #[arg(long)]
    pub json: bool,
    /// The whole standby story: replicate a guest that keeps writing to a standby for a few
    /// seconds, then evacuate into the replica so only stale pages cross.
    #[arg(long)]
    pub replica: bool,
    /// With --replica: make this percentage of pages stale at evacuation (exactly, without
    /// --vm; with --vm, plus what the guest writes in the moment before the switchover pause).
    #[arg(long, requires = "replica")]
    pub stale_pct: Option<f64>,
    /// With --replica: seconds of replication before the evacuation.
    #[arg(long, default_value_t = 3.0)]
    pub replicate_secs: f64,
    /// With --replica (without --vm): the guest's disk, replicated and evacuated with its
    /// memory while a stand-in guest writes it (0: no disk). At evacuation the share of
    /// blocks given by --disk-stale-pct is stale.
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    pub disk_size: u64,
    /// With --replica and a disk: the percentage of its blocks written after replication
    /// caught up (exactly these cross).
    #[arg(long, default_value_t = 5.0)]
    pub disk_stale_pct: f64,
    /// Migrate a running KVM guest of the reference VMM instead of a memory image (with
    /// --replica: replicate it to a standby VMM first, then evacuate into the replica).
    #[arg(long)]
    pub vm: bool,
    /// With --vm: vCPUs of the guest (1 to 4).
    #[arg(long, default_value_t = 2, requires = "vm")]
    pub vcpus: usize,
    /// With --vm: the guest's workload.
    #[arg(long, value_enum, default_value_t = super::vm::VmProgram::RandomRw, requires = "vm")]
    pub program: super::vm::VmProgram,
    /// With --vm: seconds the guest runs before the migration and after it.
    #[arg(long, default_value_t = 2.0, requires = "vm")]
    pub run_secs: f64,
    /// Migrate through an emulated WAN link (an in-process `wan-emu` relay between the two
    /// processes) with this round-trip time, e.g. 20ms or 0.1s. With --replica, the
    /// evacuation crosses it; replication in normal times goes the direct way.
    #[arg(long, value_parser = super::wan::parse_duration, conflicts_with = "vm")]
    pub wan_rtt: Option<Duration>,
    /// Emulated WAN: bottleneck rate in bits per second (decimal: 100M, 1G).
    #[arg(long, value_parser = super::wan::parse_rate, conflicts_with = "vm")]
    pub wan_rate: Option<u64>,
    /// Emulated WAN: random loss per datagram, 0.01 or 1% (seeded by --seed).
    #[arg(long, value_parser = super::wan::parse_loss, conflicts_with = "vm")]
    pub wan_loss: Option<f64>,
    /// Emulated WAN: jitter, ± this around the one-way delay, e.g. 5ms.
    #[arg(long, value_parser = super::wan::parse_duration, conflicts_with = "vm")]
    pub wan_jitter: Option<Duration>,
    /// Emulated WAN: bottleneck queue in bytes (64K, 2M) [default: one bandwidth-delay
    /// product].
    #[arg(long, value_parser = super::parse_bytes, requires = "wan_rate")]
    pub wan_queue: Option<u64>,
    /// IP MTU of the emulated link; 0 carries anything [default: 1500].
    #[arg(long, conflicts_with = "vm")]
    pub wan_mtu: Option<u32>,
}

impl DemoArgs {
    /// The emulated link the `--wan-*` flags ask for, if any.
    fn wan_link(&self) -> anyhow::Result<Option<LinkConfig>> {
        if self.wan_rtt.is_none()
            && self.wan_rate.is_none()
            && self.wan_loss.is_none()
            && self.wan_jitter.is_none()
            && self.wan_mtu.is_none()
        {
            return Ok(None);
        }
        let link = LinkArgs {
            rtt: self.wan_rtt,
            delay: None,
            jitter: self.wan_jitter,
            rate: self.wan_rate,
            queue: self.wan_queue,
            loss: self.wan_loss,
            mtu: self.wan_mtu,
        };
        link.config(self.seed ^ 0x3A11_F00D).map(Some)
    }
}

#[derive(Debug, Serialize)]
struct Latency {
    p50: u64,
    p99: u64,
    max: u64,
}

/// The demo's report; `--json` prints exactly this.
#[derive(Debug, Serialize)]
struct DemoReport {
    digest_match: bool,
    source_digest: String,
    dest_digest: String,
    memory_bytes: u64,
    memory: String,
    pages: u64,
    total_ms: f64,
    resume_ms: f64,
    wall_ms: f64,
    faults: u64,
    fault_latency_us: Latency,
    blocked_ms: f64,
    wire_bytes: u64,
    pages_pushed: u64,
    pages_faulted: u64,
    pages_zero: u64,
    image_mix: Option<ImageMix>,
    workload_threads: u64,
    workload_ops: u64,
    /// The emulated WAN link and what it carried (with `--wan-*`).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    wan: Option<DemoLink>,
}

/// The emulated WAN link of a demo and what it carried (with `--wan-*`).
#[derive(Debug, Serialize)]
pub(super) struct DemoLink {
    pub(super) link: LinkReport,
    /// What the emulator carried and dropped, per direction.
    wan_counters: WanCounters,
    /// Source → destination bits the link delivered over the migration's `total_ms`, as a
    /// fraction of the link rate (with `--wan-rate`).
    #[serde(skip_serializing_if = "Option::is_none")]
    link_utilization: Option<f64>,
    /// The expected bandwidth-delay product both processes sized their QUIC windows for
    /// (with `--wan-rtt` and `--wan-rate`, unless FAULTLINE_EXPECTED_BDP was set).
    #[serde(skip_serializing_if = "Option::is_none")]
    expected_bdp_bytes: Option<u64>,
}

impl DemoLink {
    /// The text report's line for the link: `label` padded to the report's column.
    pub(super) fn print(&self, label: &str) {
        let (up, down) = (
            &self.wan_counters.client_to_server,
            &self.wan_counters.server_to_client,
        );
        let util = self
            .link_utilization
            .map(|u| format!(", {:.0}% of the link rate", u * 100.0))
            .unwrap_or_default();
        println!(
            "  {label}source->destination {:.1} MiB in {} datagrams{util}; dropped {} (loss {}, queue {}, cut {}, over the MTU {}, send errors {}); back {} datagrams, dropped {}",
            up.bytes as f64 / (1 << 20) as f64,
            up.packets,
            up.dropped(),
            up.dropped_loss,
            up.dropped_queue,
            up.dropped_cut,
            up.dropped_too_big,
            up.send_errors,
            down.packets,
            down.dropped()
        );
    }
}

/// The emulated WAN a demo migrates through (`--wan-*`): a relay in front of the
/// destination's listener, and the window size both processes are told.
pub(super) struct DemoWan {
    cfg: LinkConfig,
    /// FAULTLINE_EXPECTED_BDP for both processes; `None` where the link has no rate or
    /// the variable is already set.
    pub(super) expected_bdp: Option<u64>,
    relay: Option<WanEmulator>,
}

impl DemoWan {
    /// The link the `--wan-*` flags of `a` ask for, if any; not yet relaying.
    pub(super) fn from_args(a: &DemoArgs) -> anyhow::Result<Option<DemoWan>> {
        Ok(a.wan_link()?.map(|cfg| DemoWan {
            expected_bdp: expected_bdp(&cfg),
            cfg,
            relay: None,
        }))
    }

    /// Sets FAULTLINE_EXPECTED_BDP on `cmd`, one of the two processes.
    pub(super) fn tune(&self, cmd: &mut Command) {
        if let Some(bdp) = self.expected_bdp {
            cmd.env(ENV_EXPECTED_BDP, bdp.to_string());
        }
    }

    /// Starts relaying to `listener` (the address a child announced); returns the address
    /// to connect to instead.
    pub(super) fn relay_to(&mut self, listener: &str) -> anyhow::Result<String> {
        let upstream = listener
            .parse()
            .with_context(|| format!("a listener announced a bad address {listener}"))?;
        let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let relay = WanEmulator::start(loopback, upstream, self.cfg.clone())
            .context("starting the WAN emulator")?;
        let addr = relay.local_addr().to_string();
        self.relay = Some(relay);
        Ok(addr)
    }

    /// Stops relaying; what the link carried over a migration of `total_ms`.
    pub(super) fn finish(self, total_ms: f64) -> DemoLink {
        let counters = self.relay.map(|r| {
            let c = r.counters();
            r.shutdown();
            c
        });
        let wan_counters = counters.unwrap_or_default();
        let secs = (total_ms / 1e3).max(1e-9);
        DemoLink {
            link: LinkReport::from(&self.cfg),
            link_utilization: self.cfg.rate_bps.map(|rate| {
                wan_counters.client_to_server.bytes as f64 * 8.0 / (rate as f64 * secs)
            }),
            wan_counters,
            expected_bdp_bytes: self.expected_bdp,
        }
    }
}

/// The BDP to size QUIC's windows for on `link`: rate × the longest round trip (jitter
/// included), when the link has a rate and FAULTLINE_EXPECTED_BDP does not already say.
fn expected_bdp(link: &LinkConfig) -> Option<u64> {
    if std::env::var_os(ENV_EXPECTED_BDP).is_some() {
        return None;
    }
    let rtt = 2 * (link.delay + link.jitter_bound());
    Some(bdp_bytes(link.rate_bps?, rtt))
}

/// Kills a child process that is still running when the demo bails out.
pub(super) struct Reaper(pub(super) Option<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Reaper {
    pub(super) fn finish(&mut self, what: &str) -> anyhow::Result<String> {
        let mut child = self.0.take().context("child already collected")?;
        let mut out = String::new();
        if let Some(mut s) = child.stdout.take() {
            s.read_to_string(&mut out)
                .with_context(|| format!("reading the {what}'s output"))?;
        }
        let status = child.wait()?;
        if !status.success() {
            bail!("the {what} process failed ({status}); its error is above");
        }
        Ok(out)
    }
}

pub(super) enum DestEvent {
    Listening(String),
    Progress(u64, u64),
}

pub fn run(a: DemoArgs) -> anyhow::Result<ExitCode> {
    let wall = Instant::now();
    let exe = std::env::current_exe().context("locating the faultline binary")?;
    let dir = tempfile::tempdir().context("creating a directory for the demo certificates")?;
    let paths = |n: &str| {
        (
            dir.path().join(format!("{n}.crt.pem")),
            dir.path().join(format!("{n}.key.pem")),
        )
    };
    let (src_crt, src_key) = paths("source");
    let (dst_crt, dst_key) = paths("dest");
    Identity::generate("source")?.save(&src_crt, &src_key)?;
    Identity::generate("dest")?.save(&dst_crt, &dst_key)?;
    let s = |p: &std::path::Path| p.display().to_string();
    let size = a.size.to_string();
    if a.vm || a.replica {
        let certs = super::demo_replica::DemoCerts {
            src_crt: s(&src_crt),
            src_key: s(&src_key),
            dst_crt: s(&dst_crt),
            dst_key: s(&dst_key),
        };
        if a.vm {
            return super::vm::run_demo(&a, &exe, &certs, wall);
        }
        return super::demo_replica::run(&a, &exe, &certs, wall);
    }

    let mut dest_cmd = Command::new(&exe);
    dest_cmd.args([
        "dest",
        "--listen",
        "127.0.0.1:0",
        "--size",
        &size,
        "--json",
        "--progress",
    ]);
    dest_cmd.args([
        "--workers",
        &a.workers.to_string(),
        "--accept-timeout",
        "60",
    ]);
    dest_cmd.args([
        "--cert",
        &s(&dst_crt),
        "--key",
        &s(&dst_key),
        "--peer-cert",
        &s(&src_crt),
    ]);
    if a.memfd {
        dest_cmd.arg("--memfd");
    }
    let mut wan = DemoWan::from_args(&a)?;
    if let Some(w) = &wan {
        w.tune(&mut dest_cmd);
    }
    let (mut dest, dest_addr, rx, relay) = spawn_listening(&mut dest_cmd, "destination")?;
    // With an emulated WAN the source connects to the relay, which forwards to the
    // destination's listener.
    let addr = match &mut wan {
        Some(w) => w.relay_to(&dest_addr)?,
        None => dest_addr,
    };

    let mut source_cmd = Command::new(&exe);
    if let Some(w) = &wan {
        w.tune(&mut source_cmd);
    }
    let mut source = Reaper(Some(
        source_cmd
            .args(["source", "--connect", &addr, "--synthetic", &size, "--json"])
            .args(["--seed", &a.seed.to_string()])
            .args([
                "--cert",
                &s(&src_crt),
                "--key",
                &s(&src_key),
                "--peer-cert",
                &s(&dst_crt),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the source process")?,
    ));

    let bar = ProgressBar::new(a.size / 4096);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} postcopy [{bar:40}] {pos}/{len} pages present ({elapsed})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    for ev in rx.iter() {
        if let DestEvent::Progress(present, total) = ev {
            bar.set_length(total);
            bar.set_position(present);
        }
    }
    bar.finish_and_clear();
    let _ = relay.join();

    let src_out = source.finish("source")?;
    let dst_out = dest.finish("destination")?;
    let src: SourceOutput =
        serde_json::from_str(src_out.trim()).context("parsing the source's report")?;
    let dst: Value =
        serde_json::from_str(dst_out.trim()).context("parsing the destination's report")?;
    let mut report = build_report(&src, &dst, wall)?;
    report.wan = wan.map(|w| w.finish(report.total_ms));
    if a.json {
        super::outcome::print_report(&report)?;
    } else {
        print_text(&report, a.seed);
    }
    Ok(if report.digest_match {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Starts a `faultline` child that announces its address with a `listening` event on
/// stderr. Returns the child, that address, the channel of its later events, and the thread
/// relaying its stderr.
pub(super) fn spawn_listening(
    cmd: &mut Command,
    what: &str,
) -> anyhow::Result<(
    Reaper,
    String,
    mpsc::Receiver<DestEvent>,
    std::thread::JoinHandle<()>,
)> {
    let mut child = Reaper(Some(
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting the {what} process"))?,
    ));
    let stderr = child
        .0
        .as_mut()
        .and_then(|c| c.stderr.take())
        .context("no stderr")?;
    let (tx, rx) = mpsc::channel();
    let relay = std::thread::spawn(move || relay_events(stderr, tx));
    loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(DestEvent::Listening(addr)) => return Ok((child, addr, rx, relay)),
            Ok(_) => {}
            Err(_) => bail!("the {what} did not start listening; its error is above"),
        }
    }
}

/// Forwards the destination's stderr, turning event lines into [`DestEvent`]s.
pub(super) fn relay_events(stderr: impl Read, tx: mpsc::Sender<DestEvent>) {
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        let Some(json) = line.strip_prefix(EVENT_PREFIX) else {
            eprintln!("{line}");
            continue;
        };
        let Ok(v) = serde_json::from_str::<Value>(json) else {
            continue;
        };
        let ev = match v["event"].as_str() {
            Some("listening") => v["addr"].as_str().map(|a| DestEvent::Listening(a.into())),
            Some("progress") => Some(DestEvent::Progress(
                v["present"].as_u64().unwrap_or(0),
                v["total"].as_u64().unwrap_or(0),
            )),
            _ => None,
        };
        if let Some(ev) = ev {
            let _ = tx.send(ev);
        }
    }
}

fn build_report(src: &SourceOutput, dst: &Value, wall: Instant) -> anyhow::Result<DemoReport> {
    let u = |v: &Value| v.as_u64().unwrap_or(0);
    let m = &dst["metrics"];
    let lat = &m["fault_latency_us"];
    let dest_digest = dst["digest"]
        .as_str()
        .context("destination report has no digest")?
        .to_string();
    Ok(DemoReport {
        digest_match: dest_digest == src.digest,
        source_digest: src.digest.clone(),
        dest_digest,
        memory_bytes: src.memory_bytes,
        memory: dst["memory"].as_str().unwrap_or("?").to_string(),
        pages: u(&dst["pages"]),
        total_ms: dst["total_ms"].as_f64().unwrap_or(0.0),
        resume_ms: dst["resume_ms"].as_f64().unwrap_or(0.0),
        wall_ms: wall.elapsed().as_secs_f64() * 1e3,
        faults: u(&m["faults"]),
        fault_latency_us: Latency {
            p50: u(&lat["p50"]),
            p99: u(&lat["p99"]),
            max: u(&lat["max"]),
        },
        blocked_ms: u(&m["blocked_ns"]) as f64 / 1e6,
        wire_bytes: u(&dst["wire_bytes"]),
        pages_pushed: u(&m["pages_pushed"]),
        pages_faulted: u(&m["pages_faulted"]),
        pages_zero: u(&m["pages_zero"]),
        image_mix: src.mix,
        workload_threads: u(&dst["workload"]["threads"]),
        workload_ops: u(&dst["workload"]["ops"]),
        wan: None,
    })
}

fn print_text(r: &DemoReport, seed: u64) {
    let pct = |n: u64| 100.0 * n as f64 / r.pages.max(1) as f64;
    let path = match &r.wan {
        Some(w) => format!("through an emulated WAN ({})", w.link),
        None => "on loopback".to_string(),
    };
    println!(
        "faultline demo: {} MiB migrated by postcopy over QUIC {path}",
        r.memory_bytes >> 20
    );
    if let Some(m) = r.image_mix {
        println!(
            "  image      {:.0}% zero, {:.0}% text-like, {:.0}% random pages (seed {seed}); {} memory at the destination",
            pct(m.zero),
            pct(m.text),
            pct(m.random),
            r.memory
        );
    }
    println!(
        "  resume     {:.2} ms after the source connected",
        r.resume_ms
    );
    println!(
        "  total      {:.0} ms until every page was present ({:.0} ms wall clock with set-up)",
        r.total_ms, r.wall_ms
    );
    println!(
        "  faults     {} (latency p50 {} us, p99 {} us, max {} us); threads blocked {:.1} ms in all",
        r.faults, r.fault_latency_us.p50, r.fault_latency_us.p99, r.fault_latency_us.max, r.blocked_ms
    );
    println!(
        "  pages      {}: {} pushed, {} on demand, {} zero",
        r.pages, r.pages_pushed, r.pages_faulted, r.pages_zero
    );
    println!(
        "  wire       {:.1} MiB of UDP both ways ({:.2}x the memory size)",
        r.wire_bytes as f64 / (1 << 20) as f64,
        r.wire_bytes as f64 / r.memory_bytes.max(1) as f64
    );
    if let Some(w) = &r.wan {
        w.print("link       ");
    }
    println!(
        "  workload   {} threads did {} reads/writes during postcopy",
        r.workload_threads, r.workload_ops
    );
    println!(
        "  digest     source {} {} destination {}: {}",
        r.source_digest,
        if r.digest_match { "=" } else { "!=" },
        r.dest_digest,
        if r.digest_match { "MATCH" } else { "MISMATCH" }
    );
}
