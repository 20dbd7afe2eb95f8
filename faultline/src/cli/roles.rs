//! `faultline source`, `faultline dest` and `faultline keygen`.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use faultline::image::{ImageMix, SourceImage};
use faultline::workload::{Workload, WorkloadReport};
use serde::{Deserialize, Serialize};
use transport::quic::SourceReport;
use transport::tls::{load_cert, Identity};
use transport::Layout;
use uffd_core::GuestMemory;
use vmm_shim::digest::digest;
use vmm_shim::{DestOptions, DestReport, Listener, SourceOptions};

use super::vm_disks::{
    create_dest_disks, digest_disk, export_received, finish_exports, DiskDigest, DiskExports,
    DiskReaders,
};
use super::{DestArgs, KeygenArgs, SourceArgs, TlsArgs, EVENT_PREFIX};

/// What `faultline source --json` prints.
#[derive(Debug, Serialize, Deserialize)]
pub struct SourceOutput {
    pub vm_id: String,
    pub image: String,
    pub memory_bytes: u64,
    /// Digest of the image as frozen at switchover.
    pub digest: String,
    pub mix: Option<ImageMix>,
    pub pages_served: u64,
    /// Pages sent a second time for requests the destination echoed on a lossy path.
    #[serde(default)]
    pub pages_echoed: u64,
    /// Requested pages left to the push, whose copy had already left.
    #[serde(default)]
    pub pages_on_their_way: u64,
    pub pages_pushed: u64,
    pub push_ms: u64,
    pub total_ms: u64,
    /// Wire bytes by kind (raw, lz4, zero, reference), the compression ratio and the
    /// encoding the tuner chose.
    pub encoding: transport::encoding::EncodingStats,
    /// What link outages did (docs/recovery.md).
    #[serde(flatten)]
    pub outages: transport::quic::Outages,
    /// Packets, losses and the congestion window (absent from older reports).
    #[serde(default)]
    pub path: transport::quic::PathReport,
    /// Each disk sent (name, size, digest).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disk_digests: Vec<DiskDigest>,
}

/// What `faultline dest --json` prints.
#[derive(Debug, Serialize)]
pub struct DestOutput {
    pub memory: &'static str,
    /// Digest of guest memory after postcopy completed.
    pub digest: String,
    #[serde(flatten)]
    pub report: DestReport,
    pub workload: WorkloadReport,
    /// Each disk received (name, size, digest).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub disk_digests: Vec<DiskDigest>,
    /// The stand-in guest's disk reads during postcopy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_reads: Option<super::replica::DiskReads>,
}

pub fn identity(
    tls: &TlsArgs,
) -> anyhow::Result<(Identity, transport::tls::CertificateDer<'static>)> {
    let me =
        Identity::load(&tls.cert, &tls.key).context("loading this side's certificate and key")?;
    let peer = load_cert(&tls.peer_cert).context("loading the peer certificate to pin")?;
    Ok((me, peer))
}

/// How a destination endpoint listens: what `dest` and `vm dest` were told.
pub struct ListenSettings<'a> {
    pub tls: &'a TlsArgs,
    pub listen: std::net::SocketAddr,
    pub vm_id: Option<String>,
    pub accept_timeout: Duration,
    pub recover_timeout: Option<Duration>,
    /// See [`DestOptions::hand_over_timeout`].
    pub hand_over_timeout: Duration,
    pub progress: bool,
    pub json: bool,
}

/// Binds a destination endpoint and announces it: a `listening` event for a parent process
/// with `progress`, a line on stderr for a person otherwise (nothing with `json` alone).
pub fn bind_listener(settings: ListenSettings<'_>) -> anyhow::Result<Listener> {
    let ListenSettings {
        tls,
        listen,
        vm_id,
        accept_timeout,
        recover_timeout,
        hand_over_timeout,
        progress,
        json,
    } = settings;
    let (me, peer) = identity(tls)?;
    // Always recorded, for a failure report; printed for a parent process with `progress`.
    let on_progress: vmm_shim::ProgressFn = Arc::new(move |p: vmm_shim::Progress| {
        super::outcome::record_progress(p);
        if progress {
            emit_event(serde_json::json!({
                "event": "progress",
                "present": p.pages_present,
                "total": p.pages,
                "bytes_received": p.bytes_received,
            }))
        }
    });
    let mut listener = Listener::bind(DestOptions {
        listen,
        identity: me,
        peer_cert: peer,
        expected_vm_id: vm_id,
        accept_timeout,
        progress: Some(on_progress),
        recover_timeout,
        hand_over_timeout,
    })?;
    listener.stop_on(&super::stopper());
    let addr = listener.local_addr()?;
    if progress {
        emit_event(serde_json::json!({"event": "listening", "addr": addr.to_string()}));
    } else if !json {
        eprintln!("listening on {addr}");
    }
    Ok(listener)
}

/// Prints one event line for a parent process (`faultline demo`).
pub fn emit_event(v: serde_json::Value) {
    eprintln!("{EVENT_PREFIX}{v}");
}

pub fn source(a: SourceArgs) -> anyhow::Result<ExitCode> {
    let (me, peer) = identity(&a.tls)?;
    let (image, name): (SourceImage, String) = match &a.image {
        Some(path) => (SourceImage::open(path)?, path.display().to_string()),
        None => (
            SourceImage::synthetic(a.synthetic, a.seed)?,
            format!("synthetic seed {}", a.seed),
        ),
    };
    let digest = image.digest()?;
    let mix = image.mix;
    let image_len = image.len();
    let (disks, disk_digests) = a.disk.open()?;
    let (image, layout) =
        vmm_shim::disks::with_disks(Arc::new(image), &Layout::single(image_len), &disks)?;
    let opts = SourceOptions {
        connect: a.connect,
        identity: me,
        peer_cert: peer,
        vm_id: a.vm_id.clone(),
        connect_timeout: Duration::from_secs(a.connect_timeout),
        push: !a.no_push,
        encoding: a.encoding.policy(),
        early_push: !a.no_early_push,
        stopper: super::stopper(),
        progress: Some(super::outcome::recorder()),
        recover_timeout: a.recover_timeout.map(Duration::from_secs),
        rate_limit: None,
    };
    let config = transport::proto::SourceConfig {
        push: opts.push,
        encoding: opts.encoding,
        early_push: opts.early_push,
        replies_on_bulk: a.replies_on_bulk,
        ..transport::proto::SourceConfig::migrate(opts.vm_id.clone(), layout.clone())
    };
    let report: SourceReport = vmm_shim::source::run_session(image, config, &opts)?;
    let out = SourceOutput {
        vm_id: a.vm_id,
        image: name,
        memory_bytes: layout.memory_bytes(),
        digest,
        mix,
        pages_served: report.pages_served,
        pages_echoed: report.pages_echoed,
        pages_on_their_way: report.pages_on_their_way,
        pages_pushed: report.pages_pushed,
        push_ms: report.push_ms,
        total_ms: report.total_ms,
        encoding: report.encoding.clone(),
        outages: report.outages,
        path: report.path,
        disk_digests,
    };
    if a.json {
        super::outcome::print_report(&out)?;
    } else {
        println!(
            "migrated {} ({} MiB) to {} in {} ms: {} pages pushed, {} served on demand\nsource digest {}",
            out.image,
            out.memory_bytes >> 20,
            a.connect,
            out.total_ms,
            out.pages_pushed,
            out.pages_served,
            out.digest
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn dest(a: DestArgs) -> anyhow::Result<ExitCode> {
    let listener = bind_listener(ListenSettings {
        tls: &a.tls,
        listen: a.listen,
        vm_id: a.vm_id.clone(),
        accept_timeout: Duration::from_secs(a.accept_timeout),
        recover_timeout: a.recover_timeout.map(Duration::from_secs),
        hand_over_timeout: vmm_shim::dest::HAND_OVER_TIMEOUT,
        progress: a.progress,
        json: a.json,
    })?;

    let size = usize::try_from(a.size).context("memory size does not fit this machine")?;
    let memory = if a.memfd {
        GuestMemory::memfd("faultline-guest", size)?
    } else {
        GuestMemory::anonymous(size)?
    };
    let regions = [memory.host_region()];
    a.disk.check()?;
    let disks = create_dest_disks(&a.disk)?;
    let layout = a
        .disk
        .disks
        .iter()
        .fold(Layout::single(a.size), |l, (n, size)| {
            l.with_disk(n.clone(), *size)
        });
    let devices: Vec<_> = disks.iter().map(|d| d.device().clone()).collect();
    type Running = (Workload, DiskReaders, anyhow::Result<DiskExports>);
    let workload: Arc<Mutex<Option<Running>>> = Arc::default();
    let started = workload.clone();
    let (workers, seed, pattern) = (a.workers, a.size ^ 0x5eed, a.pattern);
    let worker_regions = regions.clone();
    let readers = a.disk.disk_readers;
    let named: Vec<_> = disks
        .iter()
        .map(|d| (d.name().to_string(), d.device().clone()))
        .collect();
    let plan = a.disk.exports();
    let result = listener.receive_vm_with_disks(&regions, &disks, &layout, move |_| {
        let exports = export_received(named, &plan);
        let w = Workload::start(&worker_regions, workers, seed, pattern);
        let r = DiskReaders::start(devices, readers);
        *started.lock().unwrap_or_else(|p| p.into_inner()) = Some((w, r, exports));
    });
    let running = workload.lock().unwrap_or_else(|p| p.into_inner()).take();
    let (workload, disk_reads, exports) = match running {
        Some((w, r, e)) => (w.stop(), Some(r.stop()), Some(e)),
        None => (WorkloadReport::default(), None, None),
    };
    let report = result?;
    let exports = exports.transpose()?;
    finish_exports(exports, &a.disk, a.json, "migration");
    let disk_digests = disks
        .iter()
        .map(|d| digest_disk(d.name(), &**d.device()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let disk_reads = (!disks.is_empty())
        .then_some(disk_reads)
        .flatten()
        .map(|(reads, errors)| super::replica::DiskReads { reads, errors });
    // SAFETY: the memory is mapped for `memory`'s lifetime, the workload threads were joined
    // above, and userfaultfd is unregistered, so nothing writes it while we read it.
    let bytes = unsafe { std::slice::from_raw_parts(memory.as_ptr(), memory.len()) };
    let out = DestOutput {
        memory: if a.memfd { "memfd" } else { "anonymous" },
        digest: digest(bytes),
        report,
        workload,
        disk_digests,
        disk_reads,
    };
    if a.json {
        super::outcome::print_report(&out)?;
    } else {
        let m = &out.report.metrics;
        println!(
            "received {} MiB in {:.0} ms (resumed after {:.1} ms): {} faults, {} pages by fault, {} by push, {} zero\nfault latency p50 {} us, p99 {} us\ndestination digest {}",
            out.report.memory_bytes >> 20,
            out.report.session.total_ms,
            out.report.resume_ms,
            m.faults,
            m.pages_faulted,
            m.pages_pushed,
            m.pages_zero,
            m.fault_latency_us.p50,
            m.fault_latency_us.p99,
            out.digest
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn keygen(a: KeygenArgs) -> anyhow::Result<ExitCode> {
    let id = Identity::generate(&a.name)?;
    std::fs::create_dir_all(&a.dir).with_context(|| format!("creating {}", a.dir.display()))?;
    let cert = a.dir.join(format!("{}.crt.pem", a.name));
    let key = a.dir.join(format!("{}.key.pem", a.name));
    id.save(&cert, &key)?;
    println!(
        "wrote {} and {} (give the certificate to the peer; keep the key here)",
        cert.display(),
        key.display()
    );
    Ok(ExitCode::SUCCESS)
}
