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
use transport::quic::RateLimit;
use transport::tls::Identity;
use vmm_shim::replica::Replicator;

use super::control_server::ControlServer;
use super::replica::{idle_status_of, progress_to, DirtyRate};

const PAGE: u64 = 4096;

/// The orchestrator's endpoint for one source.
pub struct SourceControl {
    server: ControlServer,
    dirty: DirtyRate,
    /// Pages the evacuation will plant (`--stale-pct`): what will cross, and it does not
    /// grow while the guest waits. `None`: the replicator's stale count.
    planted: Option<u64>,
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
        }))
    }

    /// Publishes replication's state now: the stale bytes (the planted ones, if any) and
    /// the dirty rate. Callers do so every 100 ms while the guest runs.
    pub fn publish_replication(&mut self, replicator: &Replicator) {
        let stale = replicator.stale_pages();
        let acked = replicator.stats().pages_acked.load(Ordering::Relaxed);
        let (bps, growth_bps) = self.dirty.sample(stale, acked);
        let planted = self.planted;
        self.server.update(|s| {
            s.stale_bytes = planted.unwrap_or(stale) * PAGE;
            s.dirty_rate_bps = bps;
            s.stale_growth_bps = Some(if planted.is_some() { 0 } else { growth_bps });
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

    /// The evacuation starts (replication still running).
    pub fn starting(&self) {
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
                s.evacuation = EvacState::Failed;
                s.error = Some(e);
            }),
        }
        self.server.finish();
    }
}
