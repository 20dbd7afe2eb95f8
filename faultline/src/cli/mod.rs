//! Command-line interface: argument parsing and the role commands.

mod control_io;
mod control_server;
mod demo;
mod demo_replica;
mod disk;
mod evacuate;
pub mod outcome;
pub(crate) mod plan;
mod replica;
mod roles;
mod size;
mod source_control;
mod vm;
mod vm_agent;
mod vm_disks;
mod vm_replica;
mod wan;
mod wire_estimate;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use faultline::workload::Pattern;

pub use size::{parse_bytes, parse_size};

/// The process's stopper: SIGTERM and SIGINT end the running role's session through it, with
/// a reason the peer reports at once (see `main`).
pub fn stopper() -> vmm_shim::Stopper {
    static STOPPER: std::sync::OnceLock<vmm_shim::Stopper> = std::sync::OnceLock::new();
    STOPPER.get_or_init(vmm_shim::Stopper::new).clone()
}

/// Set by SIGUSR1 in `faultline replicate` (and `vm source --replicate --control`): the
/// warning came, evacuate now (see `main`).
pub fn evacuate_now() -> &'static std::sync::atomic::AtomicBool {
    static NOW: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    &NOW
}

impl Command {
    /// Whether SIGUSR1 starts this command's evacuation at once ([`evacuate_now`]).
    pub fn evacuates_on_sigusr1(&self) -> bool {
        match self {
            Command::Replicate(_) => true,
            Command::Vm(v) => v.evacuates_on_sigusr1(),
            _ => false,
        }
    }

    /// What a signal stops, for the reason the peer is told; `None` for commands without a
    /// peer session of their own (demo, keygen, wan-emu keep the default signal handling).
    pub fn role(&self) -> Option<&'static str> {
        match self {
            Command::Source(_) => Some("source"),
            Command::Dest(_) => Some("destination"),
            Command::Replicate(_) => Some("source (replicate)"),
            Command::Standby(_) => Some("standby"),
            Command::Vm(_) => Some("VMM"),
            Command::Disk(_) => Some("disk server"),
            Command::Demo(_)
            | Command::Keygen(_)
            | Command::WanEmu(_)
            | Command::Plan(_)
            | Command::Evacuate(_) => None,
        }
    }
}

/// Prefix of the machine-readable event lines `dest --progress` writes to stderr.
pub const EVENT_PREFIX: &str = "@faultline ";

#[derive(Parser, Debug)]
#[command(
    name = "faultline",
    version,
    about = "Postcopy live migration over QUIC"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Expected bandwidth-delay product of the path, bytes (`3125000`, `512K`, `12M`): sizes
    /// the QUIC windows for a long fat link (docs/wan.md); give both ends the same value.
    /// Overrides FAULTLINE_EXPECTED_BDP, and reaches the processes `demo` starts.
    #[arg(long, global = true, value_parser = parse_bytes)]
    pub expected_bdp: Option<u64>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Migrate a built-in image between two local processes and print a report.
    Demo(demo::DemoArgs),
    /// Serve a frozen memory image to a destination (the machine being evacuated).
    Source(SourceArgs),
    /// Receive a migration into userfaultfd-registered memory (the standby machine).
    Dest(DestArgs),
    /// Normal times on the source: replicate guest memory to a standby, then evacuate into it.
    Replicate(replica::ReplicateArgs),
    /// The standby: keep a replica of guest memory; at evacuation, become the destination.
    Standby(replica::StandbyArgs),
    /// Generate a certificate and key for one side; give the certificate to the other side.
    Keygen(KeygenArgs),
    /// The reference KVM VMM: migrate a running guest (`vm source`, `vm dest`).
    Vm(vm::VmArgs),
    /// Emulate a WAN link (delay, jitter, rate, loss, cuts) as a UDP relay between a source
    /// and a destination; commands on stdin, counters as JSON lines.
    WanEmu(wan::WanArgs),
    /// Virtual disks: `disk serve` exports a raw image over NBD or vhost-user-blk with
    /// write tracking.
    Disk(disk::DiskArgs),
    /// Predict evacuating a fleet of VMs against a power deadline, from a plan file
    /// (docs/fleet.md): order, concurrency, finish times, who misses; nothing is moved.
    Plan(plan::PlanArgs),
    /// Evacuate a fleet: drive every VM's `faultline replicate --control` by the plan
    /// file's plan, re-planning every second from what they measure (docs/fleet.md).
    Evacuate(evacuate::EvacuateArgs),
}

/// This side's identity and the peer certificate it pins.
#[derive(Args, Debug, Clone)]
pub struct TlsArgs {
    /// This side's certificate (PEM).
    #[arg(long)]
    pub cert: PathBuf,
    /// This side's private key (PEM).
    #[arg(long)]
    pub key: PathBuf,
    /// The peer's certificate (PEM); no other certificate is accepted.
    #[arg(long)]
    pub peer_cert: PathBuf,
}

#[derive(Args, Debug)]
pub struct SourceArgs {
    /// Address of the destination.
    #[arg(long)]
    pub connect: SocketAddr,
    /// Raw memory image file to migrate (a RAM dump or a snapshot's memory file).
    #[arg(long, conflicts_with = "synthetic")]
    pub image: Option<PathBuf>,
    /// Size of the built-in synthetic image to migrate instead, e.g. 1G or 256M.
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    pub synthetic: u64,
    /// Seed of the synthetic image.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// VM id announced to the destination.
    #[arg(long, default_value = "vm0")]
    pub vm_id: String,
    /// Do not push pages in the background: move them on demand only.
    #[arg(long)]
    pub no_push: bool,
    /// How pushed pages are encoded beyond zero-page flags: `auto` measures link and CPU
    /// costs while migrating and turns lz4 and deduplication on where they pay.
    #[arg(long, value_enum, default_value_t = EncodingArg::Auto)]
    pub encoding: EncodingArg,
    /// Send demand replies on the bulk stream behind the push instead of on their own
    /// stream ahead of it: only to measure what the separate stream is worth.
    #[arg(long)]
    pub replies_on_bulk: bool,
    /// Wait for the destination's answer before pushing, instead of pushing beside the
    /// handshake (lz4 or raw, no references): to measure what the early push saves.
    #[arg(long)]
    pub no_early_push: bool,
    /// Seconds to keep retrying while the destination is not up yet.
    #[arg(long, default_value_t = 30)]
    pub connect_timeout: u64,
    /// Give up once the connection has been lost for this many seconds (the session
    /// pauses and reconnects meanwhile; docs/recovery.md). Without it, no limit.
    #[arg(long, value_name = "SECS")]
    pub recover_timeout: Option<u64>,
    #[command(flatten)]
    pub disk: vm_disks::PlainDiskArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `--encoding`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EncodingArg {
    /// Zero pages as flags, everything else raw.
    Off,
    Lz4,
    Dedup,
    /// lz4 and deduplication, always.
    All,
    Auto,
}

impl EncodingArg {
    pub fn policy(self) -> transport::encoding::EncodingPolicy {
        use transport::encoding::{EncodingPolicy, Mode};
        match self {
            EncodingArg::Off => EncodingPolicy::OFF,
            EncodingArg::Lz4 => EncodingPolicy {
                lz4: Mode::On,
                dedup: Mode::Off,
            },
            EncodingArg::Dedup => EncodingPolicy {
                lz4: Mode::Off,
                dedup: Mode::On,
            },
            EncodingArg::All => EncodingPolicy::ALL,
            EncodingArg::Auto => EncodingPolicy::AUTO,
        }
    }
}

#[derive(Args, Debug)]
pub struct DestArgs {
    /// Address to listen on (port 0 picks a free one; `--progress` reports it).
    #[arg(long, default_value = "0.0.0.0:4433")]
    pub listen: SocketAddr,
    /// Guest memory size; must equal the source's.
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    pub size: u64,
    /// Back guest memory with a memfd (MAP_SHARED) instead of private anonymous memory.
    #[arg(long)]
    pub memfd: bool,
    /// VM id the source must announce (any if unset).
    #[arg(long)]
    pub vm_id: Option<String>,
    /// Threads that read and write guest memory during postcopy, standing in for vCPUs.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// How the worker threads walk guest memory.
    #[arg(long, value_enum, default_value_t = Pattern::Random)]
    pub pattern: Pattern,
    /// Seconds to wait for the source.
    #[arg(long, default_value_t = 120)]
    pub accept_timeout: u64,
    /// Give up once the connection has been lost for this many seconds (the session
    /// pauses and reconnects meanwhile; docs/recovery.md). Without it, no limit.
    #[arg(long, value_name = "SECS")]
    pub recover_timeout: Option<u64>,
    #[command(flatten)]
    pub disk: vm_disks::ReceiveDiskArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Write machine-readable progress events to stderr (used by `faultline demo`).
    #[arg(long)]
    pub progress: bool,
}

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Directory to write NAME.crt.pem and NAME.key.pem into.
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// Name of this side, e.g. source or dest.
    #[arg(long)]
    pub name: String,
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Some(bdp) = cli.expected_bdp {
        // Before any thread exists (main has only set up logging): the QUIC stacks read
        // their tuning from here, and child processes inherit it.
        std::env::set_var(transport::quic::ENV_EXPECTED_BDP, bdp.to_string());
    }
    match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Source(a) => roles::source(a),
        Command::Dest(a) => roles::dest(a),
        Command::Keygen(a) => roles::keygen(a),
        Command::Replicate(a) => replica::replicate(a),
        Command::Standby(a) => replica::standby(a),
        Command::Vm(a) => vm::run(a),
        Command::WanEmu(a) => wan::run(a),
        Command::Disk(a) => disk::run(a),
        Command::Plan(a) => plan::run(a),
        Command::Evacuate(a) => evacuate::run(a),
    }
}
