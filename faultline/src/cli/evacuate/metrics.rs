//! `faultline evacuate --metrics-listen ADDR`: the evacuation as Prometheus metrics, per VM
//! and per link, served by the same exporter as `replicate` and `standby`
//! (`faultline::metrics::Exporter`). The orchestration loop sets the gauges after every
//! event and every re-plan; a scrape only encodes them.

use std::net::SocketAddr;

use faultline::metrics::{Exporter, MetricsError};
use fleet::orchestrate::{Orchestration, Phase};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabels {
    vm: String,
    link: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LinkLabels {
    link: String,
}

/// The metrics of `faultline evacuate`.
pub(super) struct EvacuateMetrics {
    /// `faultline_evacuate_vm_phase` (gauge): 0 waiting, 1 starting (asked, not switched
    /// over), 2 transferring (switched over: exposed until done), 3 done, 4 failed,
    /// 5 skipped.
    phase: Family<VmLabels, Gauge>,
    /// `faultline_evacuate_vm_predicted_finish_seconds` (gauge): when the latest plan says
    /// it will be done, seconds from the evacuation's start (its measured finish once
    /// done; -1 if the plan has none).
    predicted_finish: Family<VmLabels, FloatGauge>,
    /// `faultline_evacuate_vm_stalled` (gauge): 1 while it is under way and stalled (its
    /// source reports, it does not move; `Orchestration::stalls`), else 0.
    stalled: Family<VmLabels, Gauge>,
    /// `faultline_evacuate_vm_sent_bytes` (gauge): UDP bytes its evacuation sent so far.
    sent: Family<VmLabels, Gauge>,
    /// `faultline_evacuate_vm_saved` (gauge): 1 if done by the deadline, or (not finished
    /// yet) if the latest plan says it will be; 0 otherwise.
    saved: Family<VmLabels, Gauge>,
    /// `faultline_evacuate_link_rate_bits_per_second` (gauge): the rate the link delivered
    /// while full, to several flows, else to one (`Orchestration::link_rate`), or the plan
    /// file's until measured: what the rate limits fill it to.
    link_rate: Family<LinkLabels, Gauge>,
    /// `faultline_evacuate_elapsed_seconds` and `faultline_evacuate_deadline_seconds`
    /// (gauges): since the evacuation started, and until the power goes from that start.
    elapsed: FloatGauge,
    deadline: FloatGauge,
    _exporter: Exporter,
}

impl EvacuateMetrics {
    /// Starts serving at `addr` (port 0: any) and logs where.
    pub(super) fn start(addr: SocketAddr) -> Result<EvacuateMetrics, MetricsError> {
        let mut r = Registry::with_prefix("faultline_evacuate");
        let phase = Family::<VmLabels, Gauge>::default();
        let predicted_finish = Family::<VmLabels, FloatGauge>::default();
        let sent = Family::<VmLabels, Gauge>::default();
        let stalled = Family::<VmLabels, Gauge>::default();
        let saved = Family::<VmLabels, Gauge>::default();
        let link_rate = Family::<LinkLabels, Gauge>::default();
        let elapsed = FloatGauge::default();
        let deadline = FloatGauge::default();
        r.register(
            "vm_phase",
            "0 waiting, 1 starting, 2 transferring, 3 done, 4 failed, 5 skipped",
            phase.clone(),
        );
        r.register(
            "vm_predicted_finish_seconds",
            "When the latest plan says the VM will be done, from the start",
            predicted_finish.clone(),
        );
        r.register(
            "vm_stalled",
            "1 while under way and not moving though its source reports, else 0",
            stalled.clone(),
        );
        r.register(
            "vm_sent_bytes",
            "UDP bytes the VM's evacuation sent so far",
            sent.clone(),
        );
        r.register(
            "vm_saved",
            "1 if done by the deadline or planned to be, else 0",
            saved.clone(),
        );
        r.register(
            "link_rate_bits_per_second",
            "The rate the link delivered while full (several flows, else one), or the plan file's",
            link_rate.clone(),
        );
        r.register(
            "elapsed_seconds",
            "Seconds since the evacuation started",
            elapsed.clone(),
        );
        r.register(
            "deadline_seconds",
            "Seconds from the evacuation's start until the power goes",
            deadline.clone(),
        );
        let exporter = Exporter::start(addr, r, None, || {})?;
        eprintln!(
            "metrics listening on http://{}/metrics",
            exporter.local_addr()
        );
        Ok(EvacuateMetrics {
            phase,
            predicted_finish,
            sent,
            stalled,
            saved,
            link_rate,
            elapsed,
            deadline,
            _exporter: exporter,
        })
    }

    /// Sets every gauge from the orchestration at `now_s`.
    pub(super) fn update(&self, o: &Orchestration, now_s: f64) {
        let r = o.report();
        let plan = o.plan();
        self.elapsed.set(now_s);
        self.deadline.set(r.deadline_s);
        for (i, v) in r.vms.iter().enumerate() {
            let l = VmLabels {
                vm: v.name.clone(),
                link: v.link.clone(),
            };
            let phase = match v.outcome {
                Phase::Waiting => 0,
                Phase::Starting => 1,
                Phase::Transferring => 2,
                Phase::Done => 3,
                Phase::Failed => 4,
                Phase::Skipped => 5,
            };
            self.phase.get_or_create(&l).set(phase);
            self.stalled
                .get_or_create(&l)
                .set(i64::from(v.stalled_since_s.is_some()));
            self.sent
                .get_or_create(&l)
                .set(i64::try_from(v.bytes_sent).unwrap_or(i64::MAX));
            let planned = plan.vms.get(i).and_then(|p| p.finish_s);
            let finish = match v.outcome {
                Phase::Done => v.measured.finish_s,
                Phase::Failed | Phase::Skipped => None,
                _ => planned,
            };
            self.predicted_finish
                .get_or_create(&l)
                .set(finish.unwrap_or(-1.0));
            let saved = match v.outcome {
                Phase::Done => v.saved_by_deadline,
                Phase::Failed | Phase::Skipped => false,
                _ => planned.is_some_and(|f| f <= r.deadline_s),
            };
            self.saved.get_or_create(&l).set(i64::from(saved));
        }
        for (li, link) in o.fleet().links.iter().enumerate() {
            let rate = o.link_capacity_bps(li);
            self.link_rate
                .get_or_create(&LinkLabels {
                    link: link.name.clone(),
                })
                .set(i64::try_from(rate).unwrap_or(i64::MAX));
        }
    }
}
