//! One real faultline migration between two processes on loopback, for benches.
//!
//! The bench process is the **destination**: [`vmm_shim::Listener`] on `127.0.0.1:0`, guest
//! memory from [`uffd_core::GuestMemory::anonymous`], registered with userfaultfd before the
//! source connects. The **source** is a [`child`](crate::child) re-execution of the bench
//! binary in role [`ROLE_SOURCE`]: it builds its memory image *before* connecting (so building
//! it is never timed) and then runs [`vmm_shim::send`]. Both ends use vmm-shim's own runtimes
//! (2 tokio workers each, threads named `faultline-net`), exactly as the `faultline` tool does.
//!
//! A bench using this must hand child roles to [`run_child`] (see [`is_child_role`]).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use faultline::SourceImage;
use serde::Serialize;
use serde_json::json;
use transport::quic::PageReader;
use transport::{Layout, PAGE_SIZE};
use uffd_core::{GuestMemory, HostRegion};
use vmm_shim::{DestOptions, DestReport, Listener, SourceOptions};

use crate::certs::{self, CertDir};
use crate::child::spawn_child;
use crate::cpu::{CpuReport, ThreadCpu};
use crate::emit;

/// Child role: the migration source. Arguments: certificate directory, destination address,
/// memory bytes, image kind (`mix` or `random`), seed, push (`push` or `no-push`).
pub const ROLE_SOURCE: &str = "faultline-source";

/// How long the destination waits for the source (which first builds its image) to connect.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the child may take to report and exit once the destination has every page.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Sampling interval of the per-thread CPU sampler.
const CPU_SAMPLE_EVERY: Duration = Duration::from_millis(20);

/// What the source serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageKind {
    /// [`faultline::SourceImage::synthetic`]: about 25% zero pages (sent as a flag, installed
    /// with UFFDIO_ZEROPAGE), 45% text-like and 30% random pages (sent raw: faultline does not
    /// compress yet).
    Mix,
    /// Every page incompressible random bytes: the same work per byte as a raw stream.
    Random,
}

impl ImageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageKind::Mix => "mix",
            ImageKind::Random => "random",
        }
    }

    pub fn parse(s: &str) -> anyhow::Result<ImageKind> {
        match s {
            "mix" => Ok(ImageKind::Mix),
            "random" => Ok(ImageKind::Random),
            other => bail!("unknown image kind {other:?} (mix or random)"),
        }
    }

    /// The content page `page` of this image with `seed` must have (for checking).
    pub fn page(self, seed: u64, page: u64, out: &mut [u8]) {
        match self {
            ImageKind::Mix => faultline::image::synthetic_page(seed, page, out),
            ImageKind::Random => random_page(seed, page, out),
        }
    }
}

/// One migration to run.
#[derive(Debug, Clone, Copy)]
pub struct MigrationSpec {
    /// Guest memory size (a multiple of 4096).
    pub bytes: u64,
    pub image: ImageKind,
    pub seed: u64,
    /// Whether the source pushes pages in the background (off: demand faults only).
    pub push: bool,
}

/// What the source child reported after its session (from `vmm_shim::send`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct SourceSide {
    pub pages_served: u64,
    pub pages_pushed: u64,
    pub push_ms: u64,
    pub total_ms: u64,
    /// Milliseconds the child spent building its image (before connecting; not timed).
    pub build_ms: f64,
    /// CPU seconds (user + system) the child used from just before connecting to the end.
    pub session_cpu_secs: f64,
}

/// The outcome of [`migrate`].
pub struct Migration {
    pub dest: DestReport,
    pub source: SourceSide,
    /// Per-thread CPU of both processes from the moment the guest resumed to the end of
    /// `receive` (`process` is `dest` or `source`).
    pub cpu: Option<CpuReport>,
    /// CPU seconds (user + system) of the whole destination process during `receive`
    /// (including the wait for the source to build its image, when nothing runs).
    pub dest_cpu_secs: f64,
    /// Pages whose content was compared with the source image after the migration.
    pub pages_checked: u64,
    /// The guest memory, still mapped: join any thread `on_resume` started before dropping
    /// this (a thread woken by the last page install may not have returned from its read yet).
    pub memory: GuestMemory,
}

/// Runs one migration: destination here, source in a child process. `on_resume` runs when the
/// handshake is accepted (the guest "resumes"), with the guest memory region; nothing touches
/// the memory before. Returns once every page is present, after checking a sample of pages
/// against the image and the child's clean exit. On an error the memory is deliberately
/// leaked (left mapped), since threads started by `on_resume` may still read it.
///
/// Call from a thread that lives as long as the migration (the child is tied to it).
pub fn migrate(
    spec: MigrationSpec,
    on_resume: impl FnOnce(HostRegion) + Send + 'static,
) -> anyhow::Result<Migration> {
    ensure!(
        spec.bytes > 0 && spec.bytes.is_multiple_of(PAGE_SIZE as u64),
        "memory size {} is not a non-zero multiple of {PAGE_SIZE}",
        spec.bytes
    );
    let certs = CertDir::generate()?;
    let listener = Listener::bind(DestOptions {
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        identity: certs.server.clone(),
        peer_cert: certs.client.cert.clone(),
        expected_vm_id: None,
        accept_timeout: ACCEPT_TIMEOUT,
        progress: None,
        recover_timeout: None,
        hand_over_timeout: vmm_shim::dest::HAND_OVER_TIMEOUT,
    })?;
    let addr = listener.local_addr()?;
    let len = usize::try_from(spec.bytes).context("memory size does not fit this machine")?;
    let memory = GuestMemory::anonymous(len)?;
    let region = memory.host_region();
    let layout = Layout::single(spec.bytes);

    let mut child = spawn_child(
        ROLE_SOURCE,
        &[
            certs.arg(),
            addr.to_string(),
            spec.bytes.to_string(),
            spec.image.as_str().to_string(),
            spec.seed.to_string(),
            if spec.push { "push" } else { "no-push" }.to_string(),
        ],
    )?;
    let pids = vec![
        ("dest".to_string(), std::process::id()),
        ("source".to_string(), child.id()),
    ];
    let sampler: Arc<Mutex<Option<ThreadCpu>>> = Arc::default();
    let started = sampler.clone();
    let cpu0 = cpu_secs();
    let resumed = region.clone();
    let report = listener.receive(&[region], &layout, move || {
        on_resume(resumed);
        let s = ThreadCpu::start(pids, CPU_SAMPLE_EVERY);
        *started.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
    });
    let dest_cpu_secs = cpu_secs() - cpu0;
    let cpu = sampler
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .and_then(ThreadCpu::stop);
    let finish = || -> anyhow::Result<(DestReport, SourceSide, u64)> {
        let report = report.context("faultline destination")?;
        let pages_checked = check_pages(&memory, spec)?;
        let line = child
            .recv_json(EXIT_TIMEOUT)
            .context("the source's report")?;
        let source: SourceSide = serde_json::from_value(line["report"].clone())
            .with_context(|| format!("source report {line}"))?;
        child.wait_success(EXIT_TIMEOUT)?;
        Ok((report, source, pages_checked))
    };
    match finish() {
        Ok((dest, source, pages_checked)) => Ok(Migration {
            dest,
            source,
            cpu,
            dest_cpu_secs,
            pages_checked,
            memory,
        }),
        Err(e) => {
            // A thread started by `on_resume` may still be inside a read of this memory (on
            // an error it is released by the unregister and sees zeros); unmapping the memory
            // under it would turn a reported error into a crash, so leave it mapped.
            std::mem::forget(memory);
            Err(e)
        }
    }
}

/// Compares up to 1024 pages spread over the memory (first and last included) with what the
/// image holds: a bench of a migration that delivers wrong bytes must fail, not report.
fn check_pages(memory: &GuestMemory, spec: MigrationSpec) -> anyhow::Result<u64> {
    let pages = spec.bytes / PAGE_SIZE as u64;
    let step = (pages / 1024).max(1);
    let mut want = vec![0u8; PAGE_SIZE];
    let mut checked = 0;
    let mut p = 0;
    while p < pages {
        let page = if p + step >= pages { pages - 1 } else { p };
        spec.image.page(spec.seed, page, &mut want);
        // SAFETY: the page is inside the mapping `memory` owns; receive returned, so every
        // page is installed, userfaultfd is unregistered and nothing else writes the memory.
        let got = unsafe {
            std::slice::from_raw_parts(memory.as_ptr().add(page as usize * PAGE_SIZE), PAGE_SIZE)
        };
        ensure!(
            got == want.as_slice(),
            "page {page} differs from the source image"
        );
        checked += 1;
        p += step;
    }
    Ok(checked)
}

/// Whether `role` is this module's child role.
pub fn is_child_role(role: &str) -> bool {
    role == ROLE_SOURCE
}

/// Runs the source side in this (child) process; see [`ROLE_SOURCE`] for the arguments.
pub fn run_child(role: &str, args: &[String]) -> anyhow::Result<()> {
    ensure!(role == ROLE_SOURCE, "unknown bench child role {role:?}");
    let arg = |i: usize| -> anyhow::Result<&str> {
        args.get(i)
            .map(String::as_str)
            .with_context(|| format!("child {role}: missing argument {i} (got {args:?})"))
    };
    let dir = Path::new(arg(0)?);
    let connect: SocketAddr = arg(1)?.parse()?;
    let bytes: u64 = arg(2)?.parse()?;
    let image = ImageKind::parse(arg(3)?)?;
    let seed: u64 = arg(4)?.parse()?;
    let push = match arg(5)? {
        "push" => true,
        "no-push" => false,
        other => bail!("push argument {other:?} is neither push nor no-push"),
    };
    let t = Instant::now();
    let reader: Arc<dyn PageReader> = match image {
        ImageKind::Mix => Arc::new(SourceImage::synthetic(bytes, seed)?),
        ImageKind::Random => Arc::new(RandomImage::new(bytes, seed)?),
    };
    let build_ms = t.elapsed().as_secs_f64() * 1e3;
    let (me, peer) = certs::load_client(dir)?;
    let cpu0 = cpu_secs();
    let r = vmm_shim::send(
        reader,
        &Layout::single(bytes),
        &SourceOptions {
            connect,
            identity: me,
            peer_cert: peer,
            vm_id: "bench-vm".into(),
            connect_timeout: Duration::from_secs(30),
            push,
            // These benches compare against raw quinn streams: zero flags only.
            encoding: transport::encoding::EncodingPolicy::OFF,
            early_push: true,
            stopper: vmm_shim::Stopper::new(),
            progress: None,
            recover_timeout: None,
            rate_limit: None,
        },
    )
    .with_context(|| format!("child {role}: faultline source"))?;
    let side = SourceSide {
        pages_served: r.pages_served,
        pages_pushed: r.pages_pushed,
        push_ms: r.push_ms,
        total_ms: r.total_ms,
        build_ms,
        session_cpu_secs: cpu_secs() - cpu0,
    };
    emit(&json!({ "role": ROLE_SOURCE, "report": side }));
    Ok(())
}

/// An image of incompressible pages: page `p` of seed `s` is [`random_page`]`(s, p)`.
pub struct RandomImage {
    bytes: Vec<u8>,
}

impl RandomImage {
    /// Builds `len` bytes (a non-zero multiple of 4096) on all cores.
    pub fn new(len: u64, seed: u64) -> anyhow::Result<RandomImage> {
        ensure!(
            len > 0 && len.is_multiple_of(PAGE_SIZE as u64),
            "image size {len} is not a non-zero multiple of {PAGE_SIZE}"
        );
        let mut bytes = vec![0u8; usize::try_from(len)?];
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let pages = bytes.len() / PAGE_SIZE;
        let per = pages.div_ceil(threads) * PAGE_SIZE;
        std::thread::scope(|s| {
            for (i, part) in bytes.chunks_mut(per).enumerate() {
                s.spawn(move || {
                    let first = (i * per / PAGE_SIZE) as u64;
                    for (j, page) in part.chunks_exact_mut(PAGE_SIZE).enumerate() {
                        random_page(seed, first + j as u64, page);
                    }
                });
            }
        });
        Ok(RandomImage { bytes })
    }
}

impl PageReader for RandomImage {
    fn pages(&self, first: u64, count: usize) -> Result<std::borrow::Cow<'_, [u8]>, String> {
        let start = usize::try_from(first)
            .ok()
            .and_then(|f| f.checked_mul(PAGE_SIZE))
            .ok_or("page index overflows")?;
        let end = count
            .checked_mul(PAGE_SIZE)
            .and_then(|n| n.checked_add(start))
            .ok_or("page range overflows")?;
        self.bytes
            .get(start..end)
            .map(std::borrow::Cow::Borrowed)
            .ok_or_else(|| format!("pages {first}+{count} are outside the image"))
    }
}

/// Fills one page with pseudo-random bytes determined by `(seed, page)`; never all zero.
pub fn random_page(seed: u64, page: u64, out: &mut [u8]) {
    let mut state = splitmix(seed ^ splitmix(page.wrapping_add(0xA5A5)));
    for chunk in out.chunks_mut(8) {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let z = splitmix(state);
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
    if let Some(b) = out.first_mut() {
        *b |= 1;
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// User + system CPU seconds of this process.
pub fn cpu_secs() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return f64::NAN;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_images_are_deterministic_and_never_zero() {
        let img = RandomImage::new(64 * PAGE_SIZE as u64, 3).unwrap();
        let mut want = vec![0u8; PAGE_SIZE];
        for p in 0..64 {
            random_page(3, p, &mut want);
            assert_eq!(img.pages(p, 1).unwrap(), &want[..]);
            assert!(want.iter().any(|&b| b != 0));
        }
        assert!(img.pages(64, 1).is_err());
        random_page(4, 0, &mut want);
        assert_ne!(img.pages(0, 1).unwrap(), &want[..]);
    }
}
