//! The orchestrator's endpoint on a source: `faultline replicate --control ADDR` (an image
//! source) and `faultline vm source --replicate --control ADDR` (a KVM guest of the
//! reference VMM) are driven by `faultline evacuate` through one [`ControlServer`]
//! (docs/fleet.md). While the guest runs, its status follows replication (stale bytes,
//! dirty rate); then the evacuation's progress, and how it ended.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use fleet::control::{EvacState, ReplState};
use transport::encoding::{EncodingPolicy, Mode};
use transport::quic::RateLimit;
use transport::tls::Identity;
use vmm_shim::replica::Replicator;

use super::control_server::ControlServer;
use super::replica::{idle_status_of, progress_to, DirtyRate};
use super::wire_estimate::MemorySample;

const PAGE: u64 = 4096;

/// The orchestrator's endpoint for one source.
pub struct SourceControl {
    server: ControlServer,
    dirty: DirtyRate,
    /// Pages the evacuation will plant (`--stale-pct`): what will cross, and it does not
    /// grow while the guest waits. `None`: the replicator's stale count.
    planted: Option<u64>,
    /// The evacuation's encoding, once the status estimates what it will make of a page
    /// ([`SourceControl::estimate_encoding`]).
    encoding: Option<EncodingPolicy>,
    /// Guest memory sampled for that, where the stale pages will be planted.
    sample: Option<MemorySample>,
}

impl SourceControl {
    /// Listens on `addr` if given, pinning the orchestrator's certificate at `pin` (before
    /// the guest is set up, so that the orchestrator reaches the source at once: its status
    /// then says all memory is stale). `limit` is the evacuation's rate limit, which the
    /// orchestrator sets.
    pub fn start(
        listen: Option<(SocketAddr, &Path)>,
        vm_id: &str,
        me: &Identity,
        memory_bytes: u64,
        planted: Option<u64>,
        limit: RateLimit,
    ) -> anyhow::Result<Option<SourceControl>> {
        let Some((addr, pin)) = listen else {
            return Ok(None);
        };
        let orchestrator = transport::tls::load_cert(pin)
            .context("loading the orchestrator's certificate to pin")?;
        let server = ControlServer::start(
            addr,
            me,
            orchestrator,
            idle_status_of(vm_id, memory_bytes),
            limit,
            || super::evacuate_now().store(true, Ordering::Relaxed),
        )?;
        super::roles::emit_event(serde_json::json!({
            "event": "control_listening",
            "addr": server.local_addr().to_string(),
        }));
        Ok(Some(SourceControl {
            server,
            dirty: DirtyRate::default(),
            planted,
            encoding: None,
            sample: None,
        }))
    }

    /// From now on the status also estimates what the evacuation's encoding (`policy`)
    /// will make of a stale page: from the pages the guest wrote, as replication sends
    /// them again ([`vmm_shim::replica::WrittenPages`]), or, where the source will plant
    /// its stale pages (`--stale-pct`), from `planted`, a sample of those pages taken at
    /// once and at each [`SourceControl::publish_replication`].
    pub fn estimate_encoding(&mut self, policy: EncodingPolicy, planted: Option<MemorySample>) {
        self.encoding = Some(policy);
        let Some(mut sample) = planted else {
            return;
        };
        // The first estimate at once: an orchestrator may plan from the next status.
        if let Some((pages, bytes)) = sample.take() {
            self.server.update(|s| {
                s.pages_sampled = Some(pages);
                s.wire_bytes_sampled = Some(bytes);
            });
        }
        self.sample = Some(sample);
    }

    /// The guest's disks hold `bytes` (0: none): the status says so, since its stale bytes
    /// count their blocks too.
    pub fn disks(&self, bytes: u64) {
        if bytes > 0 {
            self.server.update(|s| s.disk_bytes = Some(bytes));
        }
    }

    /// Publishes replication's state now: the stale bytes (the planted ones, if any), the
    /// dirty rate, and the estimated wire ratio. Callers do so every 100 ms while the
    /// guest runs.
    pub fn publish_replication(&mut self, replicator: &Replicator) {
        let stale = replicator.stale_pages();
        let acked = replicator.stats().pages_acked.load(Ordering::Relaxed);
        let (bps, growth_bps) = self.dirty.sample(stale, acked);
        let planted = self.planted;
        let sampled = match (&mut self.sample, self.encoding) {
            (Some(planted), _) => planted.take(),
            (None, Some(policy)) => replicator.stats().written.estimate(policy.lz4 != Mode::Off),
            (None, None) => None,
        };
        self.server.update(|s| {
            s.stale_bytes = planted.unwrap_or(stale) * PAGE;
            s.dirty_rate_bps = bps;
            s.stale_growth_bps = Some(if planted.is_some() { 0 } else { growth_bps });
            if let Some((pages, bytes)) = sampled {
                s.pages_sampled = Some(pages);
                s.wire_bytes_sampled = Some(bytes);
            }
        });
    }

    /// Waits until the evacuation is asked for (the orchestrator's `Evacuate`, SIGUSR1)
    /// or replication ends, publishing its state every 100 ms; `check` runs every 10 ms
    /// (a VMM's vCPUs), so an evacuation asked for starts within that.
    pub fn run_until_asked(
        &mut self,
        replicator: &Replicator,
        mut check: impl FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let mut last = Instant::now();
        while !super::evacuate_now().load(Ordering::Relaxed) && replicator.is_running() {
            check()?;
            std::thread::sleep(Duration::from_millis(10));
            if last.elapsed() >= Duration::from_millis(100) {
                last = Instant::now();
                self.publish_replication(replicator);
            }
        }
        check()
    }

    /// The evacuation starts (replication still running): what will cross is fixed, so
    /// the planted pages' census stops.
    pub fn starting(&mut self) {
        if let Some(sample) = &mut self.sample {
            sample.stop_census();
        }
        self.server.update(|s| s.evacuation = EvacState::Starting);
    }

    /// Replication stopped with `stale_pages` known stale: published, and the progress
    /// callback that publishes the evacuation's.
    pub fn replication_stopped(&self, stale_pages: u64) -> vmm_shim::ProgressFn {
        self.server.update(|s| {
            s.replication = ReplState::Stopped;
            s.stale_bytes = stale_pages * PAGE;
            s.pages_remaining = Some(stale_pages);
        });
        progress_to(self.server.publisher(), stale_pages)
    }

    /// The source ends with `result` while `control` was not finished (an error before or
    /// around the evacuation): the orchestrator is told why at once, rather than finding
    /// the source silent.
    pub fn fail_unfinished<T>(control: Option<SourceControl>, result: &anyhow::Result<T>) {
        if let (Some(c), Err(e)) = (control, result) {
            c.finish(Err(format!("{e:#}")));
        }
    }

    /// The evacuation ended: done with (UDP bytes sent, pages that were stale), or failed
    /// with why; the last events are delivered before the endpoint closes.
    pub fn finish(self, outcome: Result<(u64, u64), String>) {
        match outcome {
            Ok((bytes_sent, pages_stale)) => self.server.update(|s| {
                s.evacuation = EvacState::Done;
                s.bytes_sent = bytes_sent;
                s.pages_stale = Some(pages_stale);
                s.pages_remaining = Some(0);
            }),
            Err(e) => self.server.update(|s| {
                // Done already means every page reached the standby (`progress_to`); what
                // failed after (the closing handshake, the source's own reporting) does not
                // undo that, and the orchestrator may have taken it as final already.
                if s.evacuation == EvacState::Done {
                    tracing::warn!("after the evacuation was done: {e}");
                    return;
                }
                s.evacuation = EvacState::Failed;
                // Clipped: a status too long for a frame could not be sent at all.
                s.error = Some(fleet::control::clean_text(&e));
            }),
        }
        self.server.finish();
    }
}
