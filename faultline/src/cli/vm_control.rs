//! `faultline vm source --replicate --control ADDR`: a KVM guest of the reference VMM
//! driven by the orchestrator (`faultline evacuate`) through the same control endpoint as
//! `faultline replicate --control` ([`ControlServer`], docs/fleet.md). The guest runs and
//! replicates until the orchestrator's `Evacuate` (or SIGUSR1); its status follows
//! replication meanwhile and the evacuation after.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use fleet::control::{EvacState, ReplState};
use refvmm::Vm;
use transport::quic::RateLimit;
use transport::tls::Identity;
use vmm_shim::replica::Replicator;

use super::control_server::ControlServer;
use super::replica::{idle_status_of, progress_to, DirtyRate};
use super::vm_replica::ReplicaArgs;

const PAGE: u64 = 4096;

/// The orchestrator's endpoint for one guest.
pub struct GuestControl {
    server: ControlServer,
    dirty: DirtyRate,
    /// Pages `--stale-pct` will make stale at the evacuation (what will cross).
    planted: Option<u64>,
}

impl GuestControl {
    /// Listens if `a.control` asks for it (before the guest boots, so that the orchestrator
    /// reaches it at once: its status then says all memory is stale). `limit` is the
    /// evacuation's rate limit, which the orchestrator sets.
    pub fn start(
        a: &ReplicaArgs,
        vm_id: &str,
        me: &Identity,
        memory_bytes: u64,
        limit: RateLimit,
    ) -> anyhow::Result<Option<GuestControl>> {
        let (Some(addr), Some(pin)) = (a.control, &a.control_peer_cert) else {
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
        let planted = a
            .stale_pct
            .map(|p| (p / 100.0 * (memory_bytes / PAGE) as f64) as u64);
        Ok(Some(GuestControl {
            server,
            dirty: DirtyRate::default(),
            planted,
        }))
    }

    /// Runs the guest until the evacuation is asked for (the orchestrator's `Evacuate`,
    /// SIGUSR1), publishing replication's stale bytes and dirty rate every 100 ms. Checks
    /// the vCPUs every 10 ms, and waits no longer than that once asked.
    pub fn run_until_asked(&mut self, vm: &Vm, replicator: &Replicator) -> anyhow::Result<()> {
        let mut last = Instant::now();
        while !super::evacuate_now().load(Ordering::Relaxed) && replicator.is_running() {
            vm.check_vcpus()?;
            std::thread::sleep(Duration::from_millis(10));
            if last.elapsed() < Duration::from_millis(100) {
                continue;
            }
            last = Instant::now();
            let stale = replicator.stale_pages();
            let acked = replicator.stats().pages_acked.load(Ordering::Relaxed);
            let (bps, growth_bps) = self.dirty.sample(stale, acked);
            // With --stale-pct, what will cross is the planted pages (replication catches
            // up first), which do not grow while the guest waits.
            let planted = self.planted;
            self.server.update(|s| {
                s.stale_bytes = planted.unwrap_or(stale) * PAGE;
                s.dirty_rate_bps = bps;
                s.stale_growth_bps = Some(if planted.is_some() { 0 } else { growth_bps });
            });
        }
        vm.check_vcpus()?;
        self.server.update(|s| s.evacuation = EvacState::Starting);
        Ok(())
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

    /// The evacuation ended: done with what it sent, or failed with why; the last events
    /// are delivered before the endpoint closes.
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
