//! What an orchestrator decides, pure: which VMs to start now (the plan's order and
//! concurrency per link), what it measured (for [`crate::plan::replan_keeping`] every second), and
//! the final report with each VM's planned and measured timeline. `faultline evacuate`
//! does the I/O around it; the caller says what time it is (seconds from the evacuation's
//! start), so every decision is testable without a clock or a network.

use serde::Serialize;

use crate::model::{Fleet, InputError};
use crate::plan::{
    self, LinkMeasure, Measured, Plan, PlanOptions, Policy, RunningKey, Status, VmMeasure, VmState,
};
use crate::sim::Sharing;

/// Where one VM's evacuation is, as the orchestrator saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Not started.
    Waiting,
    /// Asked to evacuate; not switched over yet.
    Starting,
    /// Switched over; its stale pages cross.
    Transferring,
    Done,
    /// Failed, or unreachable before it could start.
    Failed,
    /// The plan file skips it.
    Skipped,
}

impl Phase {
    /// Started and not finished: it holds one of its link's slots.
    pub fn is_under_way(self) -> bool {
        matches!(self, Phase::Starting | Phase::Transferring)
    }

    /// Nothing more will happen to it.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Done | Phase::Failed | Phase::Skipped)
    }
}

/// One VM as measured. Times in seconds from the evacuation's start.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Timeline {
    /// When the orchestrator asked it to evacuate.
    pub start_s: Option<f64>,
    /// When its source reported the session to the standby up (stale set sent).
    pub switchover_s: Option<f64>,
    /// When its source reported every stale page at the standby, or the failure.
    pub finish_s: Option<f64>,
    /// When, by its last report, its last byte left: the moment it was expected to end as
    /// it reported `done` (`None` if it never reported its progress).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_byte_s: Option<f64>,
}

#[derive(Clone, Debug)]
struct Track {
    phase: Phase,
    stale_bytes: u64,
    /// Stale bytes left to send, as pages (of [`crate::control::PAGE_BYTES`]): what its
    /// source counts, and what `sending_bps` is measured on.
    remaining_bytes: u64,
    /// What its evacuation's encoding makes of a page, bytes on the wire per page byte
    /// (the plan file's until its source says): the bytes left cross the link as
    /// `remaining_bytes` × this.
    wire_ratio: f64,
    /// `wire_ratio` when it was started.
    started_ratio: Option<f64>,
    /// When its source last reported `remaining_bytes`.
    heard_s: Option<f64>,
    /// The report `sending_bps` was last measured from: its time and `remaining_bytes`.
    rate_from: Option<(f64, u64)>,
    /// The rate its bytes left fell at, bits per second, between its source's reports
    /// (smoothed); `None` before two reports. Measured on the bytes left rather than on
    /// the UDP bytes sent, so that the two are in the same units (the latter carry
    /// headers and retransmissions, about 3% more), and as pages, not wire bytes, so that
    /// the encoding's ratio settling over the first reports is not taken for a rate.
    sending_bps: Option<f64>,
    bytes_sent: u64,
    pages_stale: Option<u64>,
    timeline: Timeline,
    error: Option<String>,
    /// What the stall watch knows of it ([`Orchestration::stalls`]).
    watch: Watch,
    /// Its source started it (SIGUSR1, its timer) before the orchestrator heard: its start
    /// is when it was heard of, so its setup was not measured.
    started_elsewhere: bool,
}

impl Track {
    /// Under way and not stalled: it holds one of its link's places.
    fn holds_place(&self) -> bool {
        self.phase.is_under_way() && self.watch.stalled.is_none()
    }

    fn is_stalled(&self) -> bool {
        self.watch.stalled.is_some()
    }

    /// When it last moved ([`Orchestration::stalls`]): its start if not since; `now_s`
    /// if it has not started.
    fn moved_s(&self, now_s: f64) -> f64 {
        self.watch
            .moved_s()
            .or(self.timeline.start_s)
            .unwrap_or(now_s)
    }

    /// When it started, or when it took its place back after a stall: the VMs under way
    /// on a link take it in this order (see [`RunningKey`]).
    fn queued_s(&self) -> Option<f64> {
        self.watch.requeued_s.or(self.timeline.start_s)
    }

    /// The bytes it has left as the link carries them.
    fn remaining_wire_bytes(&self) -> u64 {
        (self.remaining_bytes as f64 * self.wire_ratio).round() as u64
    }
}

/// A link's samples of the bytes sent, all taken while one flow carried it, or all while
/// several did (a link delivers less to several: `Link::shared_rate_bps`).
#[derive(Clone, Debug, Default)]
struct LinkSamples {
    shared: bool,
    at: std::collections::VecDeque<(f64, u64)>,
    /// Per class (one flow, several: indexed by `shared`), the rate of its last window
    /// that ran [`LINK_RATE_WINDOW_S`] or more before it restarted: a re-plan after the
    /// class changed (the last VM left alone on the link, or VMs joining it) keeps what
    /// was measured of the other class rather than going back to the plan file's figure.
    kept: [Option<KeptRate>; 2],
}

/// A rate measured over a window of a link that has since restarted.
#[derive(Clone, Copy, Debug, PartialEq)]
struct KeptRate {
    bps: u64,
    /// The window's last sample: a transfer found stalled since before it may have
    /// trickled through the window, whose rate is then not the link's (see
    /// [`LinkSamples::forget_since`]).
    until_s: f64,
}

impl LinkSamples {
    /// The rate over the samples, bits per second, once they span the window.
    fn window_rate(&self) -> Option<u64> {
        let (&(t0, b0), &(t1, b1)) = (self.at.front()?, self.at.back()?);
        if t1 - t0 < LINK_RATE_WINDOW_S || b1 <= b0 {
            return None;
        }
        // A rate that rounds to nothing says nothing (and a re-plan refuses a rate of 0).
        Some(((b1 - b0) as f64 * 8.0 / (t1 - t0)) as u64).filter(|&r| r > 0)
    }

    /// Starts the window again, keeping its rate for its class if it ran long enough.
    fn restart(&mut self) {
        if let (Some(bps), Some(&(until_s, _))) = (self.window_rate(), self.at.back()) {
            self.kept[usize::from(self.shared)] = Some(KeptRate { bps, until_s });
        }
        self.at.clear();
    }

    /// The rate of class `shared`: the window's if it is of that class and long enough,
    /// else the last one kept.
    fn rate(&self, shared: bool) -> Option<u64> {
        let now = (self.shared == shared)
            .then(|| self.window_rate())
            .flatten();
        now.or(self.kept[usize::from(shared)].map(|k| k.bps))
    }

    /// Drops what was measured since `since_s`, when a transfer that has not moved since
    /// then is found stalled or fails: the window under way, and the rates kept of windows
    /// that ended after.
    fn forget_since(&mut self, since_s: f64) {
        self.at.clear();
        for k in &mut self.kept {
            if k.is_some_and(|k| k.until_s > since_s) {
                *k = None;
            }
        }
    }
}

/// The median (the upper one of an even count) of the finite `seconds`, as a duration;
/// `None` if there are none (or it is beyond what a [`Duration`] holds).
///
/// [`Duration`]: std::time::Duration
fn median_duration(seconds: impl Iterator<Item = f64>) -> Option<std::time::Duration> {
    let mut xs: Vec<f64> = seconds.filter(|x| x.is_finite()).collect();
    xs.sort_by(f64::total_cmp);
    let median = *xs.get(xs.len() / 2)?;
    std::time::Duration::try_from_secs_f64(median).ok()
}

/// The evacuation of a fleet as it runs.
#[derive(Clone, Debug)]
pub struct Orchestration {
    fleet: Fleet,
    opts: PlanOptions,
    tracks: Vec<Track>,
    first: Plan,
    current: Plan,
    /// Per link, (time, bytes its evacuations had sent) at each replan while the flows
    /// under way could fill it (see [`Orchestration::link_rate`]).
    link_samples: Vec<LinkSamples>,
    policy: Policy,
    /// Seconds without moving after which a VM under way is stalled.
    stall_after_s: f64,
    /// Per link, when a VM last made progress on it: a switchover, bytes left falling, a
    /// VM done (not a start: that says nothing of the link).
    link_progressed_s: Vec<Option<f64>>,
}

/// A link's rate is measured over at least this many seconds of it being full.
pub const LINK_RATE_WINDOW_S: f64 = 3.0;

/// The share of its link a VM waiting for its turn in an in-order link may use
/// ([`Orchestration::rate_caps`]): at 100 Mbit/s, 5 Mbit/s, which carries a 1 GiB VM's
/// stale set (32 KiB as a bitmap) in about 50 ms.
pub const HOLD_SHARE: f64 = 0.05;

/// The least a held VM may use, bits per second.
pub const MIN_HOLD_BPS: u64 = 1_000_000;

/// What a VM held on a link of `capacity` bits per second may use, with a stall timeout
/// of `stall_after_s`: [`HOLD_SHARE`] of it, at least [`MIN_HOLD_BPS`], but at most a
/// quarter of it (on a link of 4 Mbit/s or less the minimum would be most of it, or more,
/// and the held VM would compete with the transfer it waits behind); yet never so little
/// that it could not send [`MOVE_BYTES`] twice within the stall timeout, which a held
/// setup must to be seen moving ([`Orchestration::stalls`]); at least 1 (a source reads
/// 0 as no limit).
fn hold_bps(capacity: u64, stall_after_s: f64) -> u64 {
    let c = capacity as f64;
    let moving = 2.0 * MOVE_BYTES as f64 * 8.0 / stall_after_s;
    ((c * HOLD_SHARE)
        .max(MIN_HOLD_BPS as f64)
        .min(c / 4.0)
        .max(moving) as u64)
        .max(1)
}

/// How much earlier than one setup before a transfer's predicted end the next VM of a
/// prestarting link starts, seconds. The prediction comes from the sources' events (every
/// 250 ms, each dated by when its figures were measured) and their estimate of the bytes
/// left, and the setups vary; a setup that began late leaves the link idle (0.15-0.5 s per
/// VM in the bench at 100 Mbit/s), one that began early is held
/// ([`Orchestration::rate_caps`]) until the transfer ahead ends.
pub const PRESTART_LEAD_S: f64 = 0.5;

/// How many round trips before a transfer is expected to have sent its last bytes the VM
/// held behind it may take the link ([`Orchestration::rate_caps`]). Waiting for the
/// transfer's `done` left the link idle for about two round trips at every hand-off (the
/// last bytes acknowledged, the source's report, the held flow's first bytes crossing):
/// 0.1 s per VM at 1 Gbit/s × 50 ms, 5% of a 4-VM evacuation. With the end dated by when the
/// source measured its progress, 0, 1, 3 and 5 round trips all gave 1.049-1.059 × the
/// ideal at 8 VMs over 100 Mbit/s × 20 ms (docs/fleet.md). At 1 Gbit/s × 50 ms one round
/// trip of two full flows overflowed the queue (2,400-3,500 datagrams dropped per 8-VM
/// run): the flow ahead lost its last packets and waited for probe timeouts, the flow
/// behind left its stated start on the losses and ramped up from its held rate, and the
/// link carried 100-300 Mbit/s for 0.2 s at such a hand-off. Released at the expected
/// end instead (the sources sit before the bottleneck, so the new flow's first bytes
/// reach it at once), four runs gave 1.066-1.098 × the ideal (mean 1.080) against
/// 1.074-1.122 (mean 1.103) with one round trip, and no drops in three of them.
pub const HANDOFF_LEAD_RTTS: f64 = 0.0;

/// A source's count of bytes sent is believed up to this many times its VM's size, plus
/// [`SENT_SLACK_BYTES`]: an evacuation sends its stale set once, what the path lost again,
/// its demand faults' pages (at most the VM once more) and, after a resume, what was in
/// flight. A larger figure is a fault, not a fact: summed into its link's bytes it would
/// be measured as the link's rate and kept ([`Orchestration::link_rate`]), so it is not
/// taken (the source's last believable figure stands).
pub const SENT_PER_VM_BYTE: u64 = 4;

/// A link is never measured at more than this many times its plan file's rate: a
/// source's count of bytes sent that jumps (within [`SENT_PER_VM_BYTE`] of a VM whose size
/// its own status raised) would otherwise be a rate the re-plans and the holds take as
/// the link's, starting every waiting VM at once. A plan file that understates its link
/// tenfold is planned at ten times what it says.
pub const MEASURED_RATE_CEILING: u64 = 10;

/// What a source may send beyond [`SENT_PER_VM_BYTE`] times its VM: handshakes, probes
/// and keep-alives through long outages.
pub const SENT_SLACK_BYTES: u64 = 64 << 20;

/// Reports closer together than this do not update a transfer's sending rate (a state
/// change's report can follow the last periodic one within milliseconds).
const MIN_RATE_SPAN_S: f64 = 0.1;

impl Orchestration {
    /// Plans at time 0. `fleet` holds the stale bytes and dirty rates measured now;
    /// `failed` are VMs already lost (their source did not answer), with why.
    pub fn new(
        fleet: Fleet,
        opts: PlanOptions,
        failed: &[(usize, String)],
    ) -> Result<Orchestration, InputError> {
        Self::with_policy(fleet, opts, failed, Policy::Planner)
    }

    /// [`Orchestration::new`], following `policy`: the planner's schedule, or one of the
    /// baselines (every plan and re-plan is then that baseline's, see
    /// [`plan::plan_with`]).
    pub fn with_policy(
        fleet: Fleet,
        opts: PlanOptions,
        failed: &[(usize, String)],
        policy: Policy,
    ) -> Result<Orchestration, InputError> {
        let tracks = fleet
            .vms
            .iter()
            .enumerate()
            .map(|(i, v)| {
                // Cleaned as `failed` cleans a reason: it may quote the source.
                let error = failed
                    .iter()
                    .find(|(j, _)| *j == i)
                    .map(|(_, e)| crate::control::clean_text(e));
                let phase = if opts.skip.contains(&i) {
                    Phase::Skipped
                } else if error.is_some() {
                    Phase::Failed
                } else {
                    Phase::Waiting
                };
                Track {
                    phase,
                    stale_bytes: v.stale_bytes,
                    remaining_bytes: v.stale_bytes,
                    wire_ratio: v.wire_ratio,
                    started_ratio: None,
                    heard_s: None,
                    rate_from: None,
                    sending_bps: None,
                    bytes_sent: 0,
                    pages_stale: None,
                    timeline: Timeline::default(),
                    error,
                    watch: Watch::default(),
                    started_elsewhere: false,
                }
            })
            .collect();
        let p = plan::plan_with(&fleet, &opts, policy);
        let fleet_links = fleet.links.len();
        let mut o = Orchestration {
            first: p.clone(),
            current: p,
            link_samples: vec![Default::default(); fleet.links.len()],
            fleet,
            opts,
            tracks,
            policy,
            stall_after_s: STALL_AFTER_S,
            link_progressed_s: vec![None; fleet_links],
        };
        o.replan(0.0)?;
        o.first = o.current.clone();
        Ok(o)
    }

    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    /// The plan made at time 0.
    pub fn first_plan(&self) -> &Plan {
        &self.first
    }

    /// The latest plan.
    pub fn plan(&self) -> &Plan {
        &self.current
    }

    /// Which schedule it follows.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    pub fn phase(&self, vm: usize) -> Phase {
        self.tracks[vm].phase
    }

    /// Plans again from what was measured by `now_s` (and takes a sample of every link's
    /// bytes for [`Orchestration::link_rate`]).
    pub fn replan(&mut self, now_s: f64) -> Result<(), InputError> {
        self.sample_links(now_s);
        self.learn_setup();
        self.learn_finish();
        let measured = self.measured(now_s);
        // The planner keeps the waiting VMs' order through near ties (what the operator
        // was told holds); a baseline orders them its own way every time.
        self.current = match self.policy {
            Policy::Planner => plan::replan_keeping(
                &self.fleet,
                &self.opts,
                &measured,
                self.policy,
                &self.current.schedule,
            )?,
            _ => plan::replan_with(&self.fleet, &self.opts, &measured, self.policy)?,
        };
        Ok(())
    }

    /// Takes the switchover cost from the setups measured so far: the median over VMs of
    /// start → switchover less the handshake's round trips on its link. The plan file's
    /// figure (50 ms by default) leaves out what a real source does before it connects
    /// (the last harvest, pausing the guest) and how late the orchestrator hears of the
    /// switchover; planning the remaining VMs with the measured figure puts their
    /// prestarts (and predictions) where the real setups end.
    fn learn_setup(&mut self) {
        let extra = self
            .tracks
            .iter()
            .zip(&self.fleet.vms)
            // A setup that stalled measured the stall, not a setup; one started elsewhere
            // was under way before its start here.
            .filter(|(t, _)| !t.watch.stalled_in_setup && !t.started_elsewhere)
            .filter_map(|(t, v)| {
                let (start, switchover) = (t.timeline.start_s?, t.timeline.switchover_s?);
                // A switchover first heard of with the finish was not measured.
                if t.timeline.finish_s == Some(switchover) {
                    return None;
                }
                let rtts = self.fleet.costs.handshake_rtts * self.fleet.links[v.link].rtt_s();
                Some((switchover - start - rtts).max(0.0))
            });
        if let Some(d) = median_duration(extra) {
            self.fleet.costs.switchover = d;
        }
    }

    /// Takes the finish cost from the transfers done so far: the median over VMs of their
    /// expected last byte → `done`, less their link's round trip (the tail,
    /// [`crate::model::Costs::tail_s`], is one round trip and this). The plan file's figure
    /// (40 ms by default) is the bench machine's; a site's ends may take longer or less.
    /// Only VMs whose source reported its progress count.
    fn learn_finish(&mut self) {
        let extra = self
            .tracks
            .iter()
            .zip(&self.fleet.vms)
            .filter(|(t, _)| t.phase == Phase::Done)
            .filter_map(|(t, v)| {
                let tail = t.timeline.finish_s? - t.timeline.last_byte_s?;
                Some((tail - self.fleet.links[v.link].rtt_s()).max(0.0))
            });
        if let Some(d) = median_duration(extra) {
            self.fleet.costs.finish = d;
        }
    }

    /// Records, per link, the bytes its evacuations sent so far, while the transfers under
    /// way could fill it (the sum of their flow caps reaches its rate). A link that could
    /// not be full says nothing about its rate, so such a moment starts the window again;
    /// so does a change between one flow carrying it and several (the VMs held behind a
    /// transfer do not count), whose rates differ. A window that ran its length is kept
    /// as its class's rate until a newer one of that class does.
    fn sample_links(&mut self, now_s: f64) {
        // A time that is not one would stay in the window (and stop its trimming).
        if !now_s.is_finite() {
            return;
        }
        // One pass over the VMs: per link, the flow caps under way, the flows not held
        // and the bytes sent.
        let held = self.rate_caps(now_s);
        let n = self.link_samples.len();
        let (mut caps, mut carrying, mut sent) = (vec![0.0f64; n], vec![0usize; n], vec![0u64; n]);
        for (i, (t, v)) in self.tracks.iter().zip(&self.fleet.vms).enumerate() {
            if t.phase == Phase::Transferring && !t.is_stalled() {
                caps[v.link] += self.fleet.flow_cap_bps(i);
                // Held behind a transfer, or ending and handing its place on: not carrying
                // the link (a hand-off would otherwise count two flows for a moment and
                // restart the window at every VM).
                if held[i].is_none() && !self.hands_off(i, now_s) {
                    carrying[v.link] += 1;
                }
            }
            // A source's figure is its own: summed without overflow, whatever it says.
            sent[v.link] = sent[v.link].saturating_add(t.bytes_sent);
        }
        for (li, s) in self.link_samples.iter_mut().enumerate() {
            // A moment with nothing carrying (between a hand-off and the next report)
            // keeps the class it had.
            let shared = if carrying[li] == 0 {
                s.shared
            } else {
                carrying[li] > 1
            };
            let full = caps[li] >= self.fleet.links[li].rate_bps as f64;
            if !full || shared != s.shared {
                s.restart();
                s.shared = shared;
                if !full {
                    continue;
                }
            }
            s.at.push_back((now_s, sent[li]));
            // Keep one sample at least the window old.
            while s.at.len() > 2 && s.at[1].0 <= now_s - LINK_RATE_WINDOW_S {
                s.at.pop_front();
            }
        }
    }

    /// The rate link `li` delivered, bits per second, while its transfers could fill it:
    /// over the last [`LINK_RATE_WINDOW_S`] or more during which several flows carried it,
    /// else one flow; each class's window while it runs that long, then the last one kept
    /// (until a stall or a failure drops it, see [`Orchestration::stalls`]). `None` until
    /// the link was full that long.
    ///
    /// Several flows' rate comes first: it is what the rate limits fill the link to
    /// ([`Orchestration::rate_caps`]), and the lower figure for one flow too. Taking
    /// whichever class carries the link now would let the holds made with one class's rate
    /// choose the class, and with it the rate, of the next turn: with several flows'
    /// rate below one flow's cap, all but one flow held; then one flow's higher rate (or
    /// the plan file's) letting a second through; then held again, every second.
    pub fn link_rate(&self, li: usize) -> Option<u64> {
        self.sampled_rate(li, true)
            .or_else(|| self.sampled_rate(li, false))
    }

    /// Link `li`'s rate for class `shared` as measured ([`LinkSamples::rate`]), at most
    /// [`MEASURED_RATE_CEILING`] times the plan file's.
    fn sampled_rate(&self, li: usize, shared: bool) -> Option<u64> {
        let ceiling = self
            .fleet
            .links
            .get(li)?
            .rate_bps
            .saturating_mul(MEASURED_RATE_CEILING);
        self.link_samples
            .get(li)?
            .rate(shared)
            .map(|r| r.min(ceiling))
    }

    /// The rate the rate limits fill link `li` to: [`Orchestration::link_rate`], else the
    /// plan file's.
    pub fn link_capacity_bps(&self, li: usize) -> u64 {
        self.link_rate(li)
            .unwrap_or_else(|| self.fleet.links[li].rate_bps)
    }

    /// What was measured, for [`plan::replan_keeping`]: every VM's state and, per link, the
    /// rates it delivered while full long enough, to one flow (`rate_bps`) and to several
    /// (`shared_rate_bps`), each its class's window or the last one kept (see
    /// [`Orchestration::link_rate`]). One flow not measured yet is planned at several
    /// flows' rate, as the rate limits take it; several not measured keep the plan file's
    /// (at most one flow's).
    pub fn measured(&self, now_s: f64) -> Measured {
        let vms = self
            .tracks
            .iter()
            .zip(&self.fleet.vms)
            .filter_map(|(t, v)| {
                let state = match t.phase {
                    // Planned as lost until it moves again.
                    _ if t.phase.is_under_way() && t.is_stalled() => VmState::Failed,
                    Phase::Waiting => VmState::Waiting {
                        stale_bytes: t.stale_bytes,
                    },
                    Phase::Starting => VmState::Setup {
                        started_s: t.timeline.start_s.unwrap_or(now_s),
                        stale_bytes: t.remaining_bytes,
                    },
                    Phase::Transferring => VmState::Transferring {
                        remaining_bytes: t.remaining_bytes,
                        switchover_s: t.timeline.switchover_s.unwrap_or(now_s),
                        // Its place among those under way (see `rate_caps`).
                        started_s: t.queued_s().unwrap_or(now_s),
                    },
                    Phase::Done => VmState::Done {
                        finished_s: t.timeline.finish_s.unwrap_or(now_s),
                    },
                    Phase::Failed => VmState::Failed,
                    Phase::Skipped => return None,
                };
                Some(VmMeasure {
                    vm: v.name.clone(),
                    state,
                    wire_ratio: Some(t.wire_ratio),
                })
            })
            .collect();
        let links = self
            .fleet
            .links
            .iter()
            .enumerate()
            .filter_map(|(li, link)| {
                // Measured while one flow carried it: its rate; several, its shared rate.
                let shared_rate_bps = self.sampled_rate(li, true);
                let rate_bps = self.sampled_rate(li, false).or(shared_rate_bps);
                (rate_bps.is_some() || shared_rate_bps.is_some()).then(|| LinkMeasure {
                    link: link.name.clone(),
                    rate_bps,
                    shared_rate_bps,
                    rtt: None,
                })
            })
            .collect();
        Measured { now_s, links, vms }
    }

    /// When VM `i`, transferring, frees its place for the next VM's setup on a link that
    /// prestarts: one setup (and [`PRESTART_LEAD_S`]) before the latest plan has its last
    /// byte leave, one tail before its predicted finish.
    fn prestart_at(&self, i: usize) -> Option<f64> {
        let link = &self.fleet.links[self.fleet.vms[i].link];
        let costs = &self.fleet.costs;
        let last_byte = self.current.vms[i].finish_s? - costs.tail_s(link);
        Some(last_byte - costs.setup_s(link) - PRESTART_LEAD_S)
    }

    /// Whether VM `i` counts against its link's concurrency at `now_s` in
    /// [`Orchestration::due`]: it holds a place, and is not a transfer that frees its place
    /// already for the next VM's setup on a link that prestarts.
    fn takes_place(&self, i: usize, now_s: f64) -> bool {
        let t = &self.tracks[i];
        if !t.holds_place() {
            return false;
        }
        let prestarts = self
            .current
            .schedule
            .links
            .get(self.fleet.vms[i].link)
            .is_some_and(|ls| ls.prestart);
        let ending =
            t.phase == Phase::Transferring && self.prestart_at(i).is_some_and(|at| at <= now_s);
        !(prestarts && ending)
    }

    /// The VMs to start at `now_s`: on each link, in the latest plan's order, as many
    /// waiting VMs as leave at most its concurrency under way. With prestart a VM whose
    /// transfer is predicted to send its last byte within one setup's time (and
    /// [`PRESTART_LEAD_S`]) frees its slot already ([`Orchestration::prestart_at`]).
    pub fn due(&self, now_s: f64) -> Vec<usize> {
        let mut out = Vec::new();
        for (li, ls) in self.current.schedule.links.iter().enumerate() {
            let busy = (0..self.tracks.len())
                .filter(|&i| self.fleet.vms[i].link == li && self.takes_place(i, now_s))
                .count();
            let free = ls.concurrency.max(1).saturating_sub(busy);
            out.extend(
                ls.order
                    .iter()
                    .copied()
                    .filter(|&i| self.tracks[i].phase == Phase::Waiting)
                    .take(free),
            );
        }
        out
    }

    /// When [`Orchestration::due`] will next have a VM to start without anything new being
    /// heard: the earliest [`Orchestration::prestart_at`] after `now_s` of a transfer on a
    /// link that prestarts and has a VM waiting. `None` if nothing is foreseen (a start
    /// then waits for an event or a re-plan).
    pub fn next_due_s(&self, now_s: f64) -> Option<f64> {
        // One pass over the plan: which links have a VM to start, then one over the VMs.
        let links = &self.current.schedule.links;
        let waiting: Vec<bool> = links
            .iter()
            .map(|ls| {
                ls.order
                    .iter()
                    .any(|&i| self.tracks[i].phase == Phase::Waiting)
            })
            .collect();
        let mut next: Option<f64> = None;
        for (i, t) in self.tracks.iter().enumerate() {
            let li = self.fleet.vms[i].link;
            if t.phase != Phase::Transferring
                || t.is_stalled()
                || !waiting.get(li).copied().unwrap_or(false)
                || !links[li].prestart
            {
                continue;
            }
            match self.prestart_at(i) {
                Some(at) if at > now_s => next = Some(next.map_or(at, |n: f64| n.min(at))),
                _ => {}
            }
        }
        next
    }

    /// The rate limit each VM's evacuation should have now, bits per second (`None`: none).
    ///
    /// On each link, the transfers under way and then the VMs still in setup, each in the
    /// order they were started (the plan's; of VMs started together, the one with fewer
    /// bytes left first), take the link until their flow
    /// caps (window / RTT, the VM's own limit) fill its rate (the rate measured, else the
    /// plan file's); those are not limited (their windows limit them, and the last takes
    /// whatever the link really delivers). Behind them, held ([`hold_bps`]: [`HOLD_SHARE`]
    /// of the link, at least [`MIN_HOLD_BPS`] where that is at most a quarter of it, and
    /// enough to be seen moving within the stall timeout), enough for a setup and to keep
    /// the connection's clock running, until a place ahead of them frees:
    ///
    /// * on a link the latest plan shares [in order](Sharing::InOrder), every VM under way
    ///   that way (the strict priority the plan simulated);
    /// * on a link that [prestarts](crate::sim::LinkSchedule::prestart), the VMs still in
    ///   setup: the model gives a setup none of the link, and a VM started early (see
    ///   [`PRESTART_LEAD_S`]) must not take it from the transfer it is to follow.
    ///
    /// Transfers on a link shared fairly, and the baselines (no prestart, fair), are never
    /// limited; VMs not under way get `None`.
    ///
    /// A transfer expected to send its last bytes within [`HANDOFF_LEAD_RTTS`] of `now_s`
    /// ([`Orchestration::expected_end_s`]) no longer takes its place.
    pub fn rate_caps(&self, now_s: f64) -> Vec<Option<u64>> {
        let mut caps = vec![None; self.tracks.len()];
        let links = &self.current.schedule.links;
        // Per link, the rate a VM it holds gets, if it holds VMs: one pass over the links,
        // then one over the VMs (the orchestrator asks after every event): those under way,
        // per link, in `plan::RunningKey`'s order, which the re-plans simulate too.
        let holds: Vec<Option<u64>> = (0..self.fleet.links.len())
            .map(|li| {
                let ls = links.get(li)?;
                if ls.sharing != Sharing::InOrder && !ls.prestart {
                    return None;
                }
                Some(hold_bps(self.link_capacity_bps(li), self.stall_after_s))
            })
            .collect();
        let mut under_way: Vec<Vec<(RunningKey, usize)>> = vec![Vec::new(); self.fleet.links.len()];
        for (i, t) in self.tracks.iter().enumerate() {
            let li = self.fleet.vms[i].link;
            if t.phase.is_under_way() && t.is_stalled() {
                caps[i] = holds[li];
            } else if t.holds_place() {
                let k = RunningKey {
                    transferring: t.phase == Phase::Transferring,
                    started_s: t.queued_s().unwrap_or(now_s),
                    remaining_bytes: t.remaining_wire_bytes(),
                };
                under_way[li].push((k, i));
            }
        }
        for (li, ls) in links.iter().enumerate() {
            let in_order = ls.sharing == Sharing::InOrder;
            let Some(hold) = holds.get(li).copied().flatten() else {
                continue;
            };
            let capacity = self.link_capacity_bps(li) as f64;
            let flows = &mut under_way[li];
            flows.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
            let mut taken = 0.0;
            for &(key, i) in flows.iter() {
                let in_setup = !key.transferring;
                if taken >= capacity && (in_order || in_setup) {
                    caps[i] = Some(hold);
                }
                // Fairly shared, the transfers together take the link; the VMs in setup
                // only wait behind them.
                if (in_order || !in_setup) && !self.hands_off(i, now_s) {
                    taken += self.fleet.flow_cap_bps(i);
                }
            }
        }
        caps
    }

    /// When transfer `vm` is expected to have sent its last bytes: from its source's last
    /// report of the bytes left, at the rate they fell at between its last reports (it
    /// shares the link with whatever else runs), else at its flow's cap within the
    /// link's rate. `None` unless it is transferring and has reported.
    pub fn expected_end_s(&self, vm: usize) -> Option<f64> {
        let t = &self.tracks[vm];
        if t.phase != Phase::Transferring || t.is_stalled() {
            return None;
        }
        let heard_s = t.heard_s?;
        let li = self.fleet.vms[vm].link;
        let capacity = self.link_capacity_bps(li) as f64;
        // The measured rate is of pages; the flow's cap, of wire bytes.
        let secs = match t.sending_bps {
            Some(bps) => t.remaining_bytes as f64 * 8.0 / bps.max(1.0),
            None => {
                let cap = self.fleet.flow_cap_bps(vm).min(capacity).max(1.0);
                t.remaining_wire_bytes() as f64 * 8.0 / cap
            }
        };
        Some(heard_s + secs)
    }

    /// Whether transfer `vm` hands its place on the link to the VM behind it at `now_s`.
    fn hands_off(&self, vm: usize, now_s: f64) -> bool {
        let lead = HANDOFF_LEAD_RTTS * self.fleet.links[self.fleet.vms[vm].link].rtt_s();
        self.expected_end_s(vm).is_some_and(|e| e - now_s <= lead)
    }

    /// The next moment after `now_s` when a transfer hands its place on to a VM under way
    /// behind it on a link that holds VMs (see [`Orchestration::rate_caps`]), for the
    /// orchestrator to change the limits then rather than at the next event. `None` if
    /// none is foreseen.
    pub fn next_handoff_s(&self, now_s: f64) -> Option<f64> {
        let links = &self.current.schedule.links;
        let mut under_way = vec![0usize; self.fleet.links.len()];
        for (i, t) in self.tracks.iter().enumerate() {
            if t.holds_place() {
                under_way[self.fleet.vms[i].link] += 1;
            }
        }
        let mut next: Option<f64> = None;
        for i in 0..self.tracks.len() {
            let li = self.fleet.vms[i].link;
            let holds = links
                .get(li)
                .is_some_and(|ls| ls.sharing == Sharing::InOrder || ls.prestart);
            if !holds || under_way[li] < 2 {
                continue;
            }
            let lead = HANDOFF_LEAD_RTTS * self.fleet.links[li].rtt_s();
            let at = self.expected_end_s(i).map(|e| e - lead);
            if let Some(at) = at.filter(|&at| at > now_s) {
                next = Some(next.map_or(at, |n: f64| n.min(at)));
            }
        }
        next
    }

    /// A waiting VM's stale bytes now.
    pub fn waiting(&mut self, vm: usize, stale_bytes: u64) {
        let t = &mut self.tracks[vm];
        if t.phase == Phase::Waiting {
            t.stale_bytes = stale_bytes.min(self.fleet.vms[vm].total_bytes());
        }
    }

    /// It was asked to evacuate at `now_s`.
    pub fn started(&mut self, vm: usize, now_s: f64) {
        let t = &mut self.tracks[vm];
        if t.phase == Phase::Waiting && now_s.is_finite() {
            t.phase = Phase::Starting;
            t.timeline.start_s = Some(now_s);
            t.watch.moved(now_s);
            t.remaining_bytes = t.stale_bytes;
            t.started_ratio = Some(t.wire_ratio);
        }
    }

    /// Its source says what its evacuation's encoding makes of a page
    /// ([`crate::control::Status::planning_wire_ratio`]: estimated while it waits, measured
    /// once its push runs): the bytes it has left cross the link as that many bytes a page
    /// byte, and re-plans take it so. Before, the plan file's
    /// ([`crate::model::Vm::wire_ratio`]). A ratio outside
    /// [`crate::model::WIRE_RATIO_RANGE`] is ignored.
    pub fn set_wire_ratio(&mut self, vm: usize, ratio: f64) {
        if crate::model::WIRE_RATIO_RANGE.contains(&ratio) {
            self.tracks[vm].wire_ratio = ratio;
        }
    }

    /// `reported`, VM `vm`'s source's count of bytes sent, if believable (see
    /// [`SENT_PER_VM_BYTE`]); else its last believable one.
    fn believed_sent(&self, vm: usize, reported: u64) -> u64 {
        let ceiling = self.fleet.vms[vm]
            .total_bytes()
            .saturating_mul(SENT_PER_VM_BYTE)
            .saturating_add(SENT_SLACK_BYTES);
        if reported <= ceiling {
            reported
        } else {
            self.tracks[vm].bytes_sent
        }
    }

    /// Its source reports the switchover (first time: returns true) and its progress, as
    /// measured at `now_s` (see [`crate::control::Status::progress_age_s`]):
    /// `remaining_bytes` are its pages left, in bytes ([`crate::control::PAGE_BYTES`] a
    /// page), whatever the encoding makes of them ([`Orchestration::set_wire_ratio`]).
    pub fn progress(
        &mut self,
        vm: usize,
        now_s: f64,
        remaining_bytes: Option<u64>,
        bytes_sent: u64,
    ) -> bool {
        // A source never has more left than its VM holds; more is a fault, not a fact.
        let remaining_bytes = remaining_bytes.map(|r| r.min(self.fleet.vms[vm].total_bytes()));
        let bytes_sent = self.believed_sent(vm, bytes_sent);
        let li = self.fleet.vms[vm].link;
        let window = self.sent_window_s();
        let t = &mut self.tracks[vm];
        if !t.phase.is_under_way() || !now_s.is_finite() {
            return false;
        }
        // A source's figures are never measured before its start nor before its last
        // report; a date that says so (a bad age) is taken as the latest it can be.
        let not_before = t.heard_s.or(t.timeline.start_s).unwrap_or(now_s);
        let now_s = now_s.max(not_before);
        let mut progressed = false;
        if let Some(r) = remaining_bytes {
            if r < t.remaining_bytes || t.heard_s.is_none() {
                t.watch.moved(now_s);
                progressed = r < t.remaining_bytes;
            }
            match t.rate_from {
                Some((at, left)) if now_s - at >= MIN_RATE_SPAN_S => {
                    let bps = left.saturating_sub(r) as f64 * 8.0 / (now_s - at);
                    t.sending_bps = Some(t.sending_bps.map_or(bps, |old| (old + bps) / 2.0));
                    t.rate_from = Some((now_s, r));
                }
                Some(_) => {}
                None => t.rate_from = Some((now_s, r)),
            }
            t.heard_s = Some(now_s);
            t.remaining_bytes = r;
        }
        // A source that does not count its pages left, or has less than a move's worth left
        // (its last bytes, the demand faults of its tail, what it sends again after a
        // resume), moves as long as it sends more than its keep-alives and probes.
        if t.heard_s.is_none() || t.remaining_bytes < MOVE_BYTES {
            progressed |= t.watch.sent(now_s, bytes_sent, window);
        }
        t.bytes_sent = bytes_sent;
        let switched_over = t.phase == Phase::Starting;
        if switched_over {
            t.phase = Phase::Transferring;
            t.timeline.switchover_s = Some(now_s);
            t.watch.moved(now_s);
            progressed = true;
        }
        if progressed {
            self.progressed_on(li, now_s);
        }
        switched_over
    }

    /// Its source reports its setup under way, `bytes_sent` so far, as measured at `now_s`
    /// (a setup held behind a transfer sends its stale set at the held rate, and moves as
    /// long as it does; see [`Orchestration::stalls`]).
    pub fn setting_up(&mut self, vm: usize, now_s: f64, bytes_sent: u64) {
        let bytes_sent = self.believed_sent(vm, bytes_sent);
        let window = self.sent_window_s();
        let t = &mut self.tracks[vm];
        if t.phase == Phase::Starting && now_s.is_finite() {
            let now_s = now_s.max(t.timeline.start_s.unwrap_or(now_s));
            let moved = t.watch.sent(now_s, bytes_sent, window);
            t.bytes_sent = bytes_sent;
            // Sent on and on, so acknowledged: the link carries.
            if moved {
                self.progressed_on(self.fleet.vms[vm].link, now_s);
            }
        }
    }

    /// A VM on link `li` made progress at `now_s`: the link carries.
    fn progressed_on(&mut self, li: usize, now_s: f64) {
        if let Some(p) = self.link_progressed_s.get_mut(li) {
            *p = Some(p.map_or(now_s, |p: f64| p.max(now_s)));
        }
    }

    /// Every stale page of it is at the standby.
    pub fn done(&mut self, vm: usize, now_s: f64, bytes_sent: u64, pages_stale: Option<u64>) {
        let bytes_sent = self.believed_sent(vm, bytes_sent);
        let last_byte = self.expected_end_s(vm).map(|e| e.min(now_s));
        if self.tracks[vm].phase.is_final() {
            return;
        }
        if now_s.is_finite() {
            self.progressed_on(self.fleet.vms[vm].link, now_s);
        }
        let t = &mut self.tracks[vm];
        if t.timeline.switchover_s.is_none() {
            t.timeline.switchover_s = Some(now_s);
        }
        t.phase = Phase::Done;
        t.watch.end_stall(now_s);
        t.timeline.finish_s = Some(now_s);
        t.timeline.last_byte_s = last_byte;
        t.bytes_sent = bytes_sent;
        t.remaining_bytes = 0;
        t.pages_stale = pages_stale;
    }

    /// It failed (a source that died, refused, or went silent).
    pub fn failed(&mut self, vm: usize, now_s: f64, error: String) {
        // Its text may come from the source or its connection's close: it reaches the
        // operator's terminal clipped, with its control characters shown.
        let error = crate::control::clean_text(&error);
        let t = &self.tracks[vm];
        if t.phase.is_final() {
            return;
        }
        // A transfer that fails may have sat first, counted as able to fill its link (a
        // source falling silent is failed after its silence timeout, which can come before
        // a stall is found): as for a stall, what was measured since it last moved is not
        // the link's.
        if t.phase == Phase::Transferring && !t.is_stalled() {
            let moved = t.moved_s(now_s);
            if let Some(s) = self.link_samples.get_mut(self.fleet.vms[vm].link) {
                s.forget_since(moved);
            }
        }
        let t = &mut self.tracks[vm];
        if t.phase.is_under_way() {
            t.timeline.finish_s = Some(now_s);
        }
        t.phase = Phase::Failed;
        t.watch.end_stall(now_s);
        t.error = Some(error);
    }

    /// Every VM is done, failed or skipped.
    pub fn is_finished(&self) -> bool {
        self.tracks.iter().all(|t| t.phase.is_final())
    }

    /// The outcome: per VM planned (at time 0) against measured, and totals.
    pub fn report(&self) -> Report {
        let deadline_s = self.opts.deadline_s;
        let vms: Vec<VmReport> = self
            .tracks
            .iter()
            .zip(&self.fleet.vms)
            .zip(&self.first.vms)
            .map(|((t, v), p)| VmReport {
                name: v.name.clone(),
                link: self.fleet.links[v.link].name.clone(),
                outcome: t.phase,
                error: t.error.clone(),
                planned: Planned {
                    order: p.order,
                    start_s: p.start_s,
                    switchover_s: p.switchover_s,
                    finish_s: p.finish_s,
                    status: p.status,
                },
                measured: t.timeline.clone(),
                saved_by_deadline: t.phase == Phase::Done
                    && t.timeline.finish_s.is_some_and(|f| f <= deadline_s),
                bytes_sent: t.bytes_sent,
                pages_stale: t.pages_stale,
                stalled_since_s: t.watch.stalled.as_ref().map(|s| s.since_s),
                stalls: t.watch.history.clone(),
                wire_ratio_at_start: t.started_ratio.unwrap_or(t.wire_ratio),
                wire_ratio: t.wire_ratio,
            })
            .collect();
        let count = |ph: Phase| vms.iter().filter(|v| v.outcome == ph).count();
        let totals = ReportTotals {
            vms: vms.len(),
            done: count(Phase::Done),
            failed: count(Phase::Failed),
            skipped: count(Phase::Skipped),
            not_finished: vms.iter().filter(|v| !v.outcome.is_final()).count(),
            stalled: vms.iter().filter(|v| v.stalled_since_s.is_some()).count(),
            saved_by_deadline: vms.iter().filter(|v| v.saved_by_deadline).count(),
            planned_saved: self.first.totals.saved,
            makespan_s: vms
                .iter()
                .filter(|v| v.outcome == Phase::Done)
                .filter_map(|v| v.measured.finish_s)
                .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x)))),
            planned_makespan_s: self.first.totals.makespan_s,
            bytes_sent: vms.iter().fold(0u64, |a, v| a.saturating_add(v.bytes_sent)),
        };
        Report {
            deadline_s,
            ended_s: None,
            vms,
            totals,
        }
    }

    /// [`Orchestration::report`] of an evacuation that ended at `ended_s`: what was still
    /// open then (a stall, a transfer) lasted until it. A time that is not finite is left
    /// out.
    pub fn report_ended(&self, ended_s: f64) -> Report {
        Report {
            ended_s: Some(ended_s).filter(|t| t.is_finite()),
            ..self.report()
        }
    }
}

/// What the plan at time 0 said of a VM.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Planned {
    pub order: Option<usize>,
    pub start_s: Option<f64>,
    pub switchover_s: Option<f64>,
    pub finish_s: Option<f64>,
    pub status: Status,
}

/// One VM in the report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VmReport {
    pub name: String,
    pub link: String,
    /// `done`, `failed`, `skipped` (or `waiting`/`starting`/`transferring` if the
    /// orchestrator was stopped).
    pub outcome: Phase,
    pub error: Option<String>,
    pub planned: Planned,
    /// Start, switchover and finish as measured: a Gantt chart's bars.
    pub measured: Timeline,
    /// Done by the deadline.
    pub saved_by_deadline: bool,
    /// UDP bytes its evacuation sent.
    pub bytes_sent: u64,
    /// Pages that crossed (its source's count, when done).
    pub pages_stale: Option<u64>,
    /// Since when it has been stalled ([`Orchestration::stalls`]), if it still was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stalled_since_s: Option<f64>,
    /// Its stalls, resolved or not ([`Orchestration::stalls`]); a Gantt chart draws them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stalls: Vec<StallSpan>,
    /// The wire ratio it was started with: its source's estimate then (or the plan
    /// file's, [`crate::model::Vm::wire_ratio`]), what its plan knew.
    pub wire_ratio_at_start: f64,
    /// What its encoding made of a page, as last reported (measured once its push ran).
    pub wire_ratio: f64,
}

/// The fleet in the report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReportTotals {
    pub vms: usize,
    pub done: usize,
    pub failed: usize,
    pub skipped: usize,
    pub not_finished: usize,
    /// Of those not finished, the ones stalled when it ended.
    pub stalled: usize,
    pub saved_by_deadline: usize,
    /// What the plan at time 0 promised (with its margin).
    pub planned_saved: usize,
    /// The last finish of a VM that was done.
    pub makespan_s: Option<f64>,
    pub planned_makespan_s: f64,
    pub bytes_sent: u64,
}

/// The report of an evacuation. Times in seconds from its start.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub deadline_s: f64,
    /// When the orchestrator ended, if the report was made then
    /// ([`Orchestration::report_ended`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_s: Option<f64>,
    /// In fleet (plan file) order.
    pub vms: Vec<VmReport>,
    pub totals: ReportTotals,
}

mod hear;
mod stall;
pub use hear::{Change, StatusChange};
use stall::Watch;
pub use stall::{StallChange, StallSpan, MIN_STALL_AFTER_S, MOVE_BYTES, STALL_AFTER_S};

#[cfg(test)]
mod tests;
