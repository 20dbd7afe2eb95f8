//! The planner: which VMs go first, how many run at once on each link, how each link is
//! shared, which VMs cannot make the deadline and why; the replication budget in normal
//! times; the baseline schedules; and [`replan`], which an orchestrator calls every second
//! with what it measured.
//!
//! Objectives, in this order: the weighted number of VMs evacuated by the deadline when
//! every link delivers only `1 - margin` of its rate; then the mean completion time; then
//! the makespan; then the total exposure. Completion times count up to the deadline only
//! (the power is gone then: a VM that misses counts as finishing at the deadline, however
//! late it would have finished).
//!
//! How: links do not interact (every VM uses one), so each link is planned on its own.
//! Per link the planner builds candidate schedules and simulates each against the margin:
//!
//! * orders (sizes are the bytes that cross: stale bytes as each VM's encoding makes them,
//!   [`crate::model::Vm::wire_ratio`]): smallest *effective* size per weight first (stale
//!   bytes as they will have grown by the VM's estimated start), smallest now first, fastest
//!   growing relative to size first (what minimises the bytes of jobs that grow while they
//!   wait, Browne and Yechiali), highest priority first;
//! * after each simulation the VMs that miss the deadline move to the end (they would only
//!   take bandwidth from VMs that can make it) and it is simulated again;
//! * concurrency: just enough flows that their caps (window / RTT) sum to the link's rate,
//!   and twice that (more at once freezes more stale sets early, which pays when VMs dirty
//!   fast); the next VM's handshake overlaps the end of a running flow (prestart);
//! * sharing: in start order (the first flows at their cap) and max-min fair;
//! * and the two baselines, all at once and one at a time smallest first, so the plan never
//!   saves less than either.
//!
//! The best by the objectives wins; a re-plan with [`replan_keeping`] keeps the last plan's
//! order of the waiting VMs unless the winner is clearly better ([`KEPT_ORDER`] then names
//! the link's policy). All of this is a heuristic: with a common deadline
//! the weighted problem is a knapsack, and growth while waiting and the per-flow caps
//! make it harder still.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;

use crate::model::{Entry, Fleet, InputError, Problem};
use crate::sim::{
    simulate, LinkSchedule, LinkSim, Outcome, Phase, Schedule, Sharing, SimOptions, VmOutcome,
};
use crate::units::{fmt_bytes, fmt_rate, fmt_secs};

/// Default bandwidth margin: plan as if links deliver 90% of their rate.
pub const DEFAULT_MARGIN: f64 = 0.10;

/// What the plan must meet.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanOptions {
    /// Seconds from the plan's time 0 (the evacuation's start) to the loss of power.
    pub deadline_s: f64,
    /// Fraction of every link's rate not to count on, in [0, 0.99] (more is taken as 0.99).
    pub margin: f64,
    /// VMs (indices) to start first on their links, in this order, whatever the planner
    /// thinks.
    pub first: Vec<usize>,
    /// VMs (indices) not to evacuate.
    pub skip: Vec<usize>,
}

impl PlanOptions {
    /// A deadline and the default margin, nothing pinned or skipped.
    pub fn new(deadline_s: f64) -> PlanOptions {
        PlanOptions {
            deadline_s,
            margin: DEFAULT_MARGIN,
            first: Vec::new(),
            skip: Vec::new(),
        }
    }
}

/// What the plan predicts for a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Evacuated by the deadline even if the links deliver only `1 - margin` of their rate.
    Saved,
    /// Evacuated by the deadline only if the links deliver their full rate.
    AtRisk,
    /// Not evacuated by the deadline ([`VmPlan::reason`] says why).
    Misses,
    /// Not evacuated: the plan file says so.
    Skipped,
    /// Already evacuated (re-planning).
    Done,
    /// Its evacuation failed (re-planning); nothing more to do for it.
    Failed,
}

/// The plan for one VM. Times in seconds from the evacuation's start.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VmPlan {
    pub name: String,
    pub link: String,
    /// 1-based rank of its start over the whole fleet.
    pub order: Option<usize>,
    pub start_s: Option<f64>,
    pub switchover_s: Option<f64>,
    /// Its evacuation done, as its source reports it: its last stale byte at the
    /// destination and the answer back ([`crate::model::Costs::tail_s`]), at the links'
    /// full rate.
    pub finish_s: Option<f64>,
    /// The same with the margin taken off every link's rate.
    pub finish_margin_s: Option<f64>,
    /// Its stale bytes at the switchover as its encoding makes them: what crosses (payload).
    pub bytes_to_cross: Option<u64>,
    /// From its switchover to its evacuation done (full rate).
    pub exposure_s: Option<f64>,
    pub weight: f64,
    pub status: Status,
    /// Why it misses (or is at risk), in words.
    pub reason: Option<String>,
}

/// The plan for one link.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LinkPlan {
    pub name: String,
    pub rate_bps: u64,
    /// What it delivers to several flows together, if that differs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_rate_bps: Option<u64>,
    pub rtt_ms: f64,
    /// What one flow can move: window / RTT (at most the link's rate).
    pub flow_cap_bps: f64,
    /// VMs under way at once.
    pub concurrency: usize,
    pub sharing: Sharing,
    pub prestart: bool,
    /// Which candidate won (see the module's documentation).
    pub policy: &'static str,
    /// VMs planned on it.
    pub vms: usize,
    /// Their stale bytes now.
    pub stale_bytes_now: u64,
    /// Those bytes as their encodings make them ([`crate::model::Vm::wire_ratio`]) at the
    /// link's full rate, nothing else: the floor of its makespan.
    pub ideal_s: f64,
    pub makespan_s: f64,
    pub makespan_margin_s: f64,
}

/// What a schedule achieves over the fleet.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Totals {
    /// VMs it evacuates (not skipped, not done or failed before).
    pub vms: usize,
    pub weight: f64,
    /// Evacuated by the deadline with the margin: the plan's promise.
    pub saved: usize,
    pub saved_weight: f64,
    /// Evacuated by the deadline at the links' full rate.
    pub saved_at_full_rate: usize,
    pub saved_weight_at_full_rate: f64,
    /// Mean time from the evacuation's start to a VM being done (full rate).
    pub mean_completion_s: f64,
    /// The last VM done (full rate).
    pub makespan_s: f64,
    /// The same with the margin.
    pub makespan_margin_s: f64,
    /// The slowest link's stale bytes now, as their encodings make them, at its full rate:
    /// no schedule does better.
    pub ideal_makespan_s: f64,
    /// Payload bytes that cross (stale bytes at each switchover, encoded).
    pub bytes_to_cross: u64,
    pub mean_exposure_s: f64,
    pub max_exposure_s: f64,
}

/// The baselines, for comparison.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Baselines {
    pub all_at_once: Totals,
    pub one_at_a_time_smallest_first: Totals,
}

/// A plan: the schedule to run and what it predicts.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    /// When it was made, seconds from the evacuation's start (0 for the first plan).
    pub now_s: f64,
    pub deadline_s: f64,
    pub margin: f64,
    /// What to run from `now_s` on (VM indices; the orchestrator's input).
    #[serde(skip)]
    pub schedule: Schedule,
    pub links: Vec<LinkPlan>,
    /// In fleet order.
    pub vms: Vec<VmPlan>,
    pub totals: Totals,
    pub baselines: Baselines,
    pub replication: ReplicationSplit,
}

/// Every VM at once, sharing each link fairly: every VM's stale set is fixed at once, and
/// every VM stays exposed until the link has moved nearly everything.
pub fn all_at_once(fleet: &Fleet) -> Schedule {
    let mut links = empty_schedule(fleet);
    for (i, v) in fleet.vms.iter().enumerate() {
        links[v.link].order.push(i);
    }
    for ls in &mut links {
        ls.concurrency = ls.order.len().max(1);
    }
    Schedule { links }
}

/// One VM at a time per link, smallest first (stale bytes as their encodings make them), each starting when the previous
/// one finished: the most VMs by a deadline on one bottleneck when one flow fills it, but
/// on a long fat link one flow cannot (window / RTT).
pub fn one_at_a_time_smallest_first(fleet: &Fleet) -> Schedule {
    let mut links = empty_schedule(fleet);
    for (i, v) in fleet.vms.iter().enumerate() {
        links[v.link].order.push(i);
    }
    for ls in &mut links {
        let wire = |i: usize| fleet.vms[i].wire_bytes();
        ls.order
            .sort_by(|&a, &b| wire(a).total_cmp(&wire(b)).then(a.cmp(&b)));
    }
    Schedule { links }
}

fn empty_schedule(fleet: &Fleet) -> Vec<LinkSchedule> {
    fleet
        .links
        .iter()
        .map(|_| LinkSchedule {
            order: Vec::new(),
            concurrency: 1,
            sharing: Sharing::Fair,
            prestart: false,
        })
        .collect()
}

/// Which schedule a plan follows: the planner's choice, or one of the two baselines (for
/// comparing them with real runs: `faultline evacuate --schedule`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// The best of the planner's candidates (the baselines among them).
    #[default]
    Planner,
    /// [`all_at_once`]: every VM at once, fair sharing.
    AllAtOnce,
    /// [`one_at_a_time_smallest_first`]: one VM per link at a time, smallest first
    /// (re-planning sorts the waiting VMs by their bytes to cross then).
    SmallestFirst,
}

impl Policy {
    /// The candidate's name this policy keeps; `None`: any.
    fn only(self) -> Option<&'static str> {
        match self {
            Policy::Planner => None,
            Policy::AllAtOnce => Some("all_at_once"),
            Policy::SmallestFirst => Some("one_at_a_time_smallest_first"),
        }
    }
}

/// Plans the evacuation of `fleet` from its start (every VM waiting).
pub fn plan(fleet: &Fleet, opts: &PlanOptions) -> Plan {
    plan_with(fleet, opts, Policy::Planner)
}

/// [`plan`], following `policy`: with a baseline the plan is that baseline's schedule
/// (its predicted timeline, totals and verdicts), not the planner's choice.
pub fn plan_with(fleet: &Fleet, opts: &PlanOptions, policy: Policy) -> Plan {
    let state = State {
        initial: Vec::new(),
        started_s: Vec::new(),
        settled: vec![None; fleet.vms.len()],
        policy,
        previous: None,
    };
    plan_from(fleet, opts, &state, 0.0)
}

/// What an orchestrator measured, `now_s` seconds after the evacuation started.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Measured {
    pub now_s: f64,
    /// Links whose rate or round-trip time was measured; the others keep the plan's.
    pub links: Vec<LinkMeasure>,
    /// VMs whose state is known; the others are taken to be waiting, their stale bytes
    /// grown as the model says.
    pub vms: Vec<VmMeasure>,
}

/// A link as measured.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkMeasure {
    pub link: String,
    /// The rate the link delivers to one flow alone, bits per second.
    pub rate_bps: Option<u64>,
    /// The rate it delivers to several flows together
    /// ([`crate::model::Link::shared_rate_bps`]).
    pub shared_rate_bps: Option<u64>,
    pub rtt: Option<Duration>,
}

/// A VM as measured.
#[derive(Clone, Debug, PartialEq)]
pub struct VmMeasure {
    pub vm: String,
    pub state: VmState,
    /// What its encoding makes of a stale byte, as its source measured it once the push
    /// ran or estimated it before ([`crate::model::Vm::wire_ratio`]); `None`: the fleet's.
    pub wire_ratio: Option<f64>,
}

/// Where a VM's evacuation is.
#[derive(Clone, Debug, PartialEq)]
pub enum VmState {
    /// Not started; its stale bytes now (from its dirty tracking).
    Waiting { stale_bytes: u64 },
    /// Its setup started at `started_s`, its stale set then `stale_bytes`: what will cross
    /// if the guest is paused already (`--stale-pct` pauses it first); otherwise the guest
    /// runs until the switchover and the model grows it at its dirty rate until then.
    Setup { started_s: f64, stale_bytes: u64 },
    /// Started at `started_s` (its place among the transfers on its link: a transfer that
    /// stalled and moved again gives when it did, `orchestrate::Orchestration::stalls`),
    /// moving its stale bytes since its switchover at
    /// `switchover_s`; this many are left (stale bytes, as pages: the wire ratio makes them
    /// the bytes that cross).
    Transferring {
        remaining_bytes: u64,
        switchover_s: f64,
        started_s: f64,
    },
    /// Its source reported it done at `finished_s`.
    Done { finished_s: f64 },
    /// Its evacuation failed.
    Failed,
}

/// Plans the rest of a running evacuation from what was measured: VMs under way continue,
/// the waiting ones are ordered again with the stale bytes and link rates measured now.
/// Pure: the orchestrator calls it every second. Times in the plan are from the
/// evacuation's start, like `measured.now_s`.
pub fn replan(fleet: &Fleet, opts: &PlanOptions, measured: &Measured) -> Result<Plan, InputError> {
    replan_with(fleet, opts, measured, Policy::Planner)
}

/// [`replan`], following `policy` (see [`plan_with`]): the VMs under way continue, the
/// waiting ones are ordered as the baseline orders them.
pub fn replan_with(
    fleet: &Fleet,
    opts: &PlanOptions,
    measured: &Measured,
    policy: Policy,
) -> Result<Plan, InputError> {
    replan_inner(fleet, opts, measured, policy, None)
}

/// [`replan_with`], keeping on each link the order `previous` (the last plan's schedule)
/// gave the waiting VMs unless another is clearly better ([`KEEP_ORDER_TOL`]): the order
/// is what an operator was told the VMs would finish by, and near ties would otherwise swap
/// on every change of a figure (the orchestrator re-plans every second).
pub fn replan_keeping(
    fleet: &Fleet,
    opts: &PlanOptions,
    measured: &Measured,
    policy: Policy,
    previous: &Schedule,
) -> Result<Plan, InputError> {
    replan_inner(fleet, opts, measured, policy, Some(previous))
}

/// A new order of the waiting VMs replaces the last plan's only if it saves more weight,
/// or cuts the total completion time or the makespan by more than this share.
pub const KEEP_ORDER_TOL: f64 = 0.01;

fn replan_inner(
    fleet: &Fleet,
    opts: &PlanOptions,
    measured: &Measured,
    policy: Policy,
    previous: Option<&Schedule>,
) -> Result<Plan, InputError> {
    let now = measured.now_s;
    if !(now.is_finite() && now >= 0.0) {
        return Err(Entry::Top.problem(Problem::Other(format!(
            "measured now_s must be a time >= 0 (got {now})"
        ))));
    }
    let mut f = fleet.clone();
    for l in &measured.links {
        let i = fleet
            .link_index(&l.link)
            .ok_or_else(|| Entry::Top.problem(Problem::UnknownLink(l.link.clone())))?;
        if let Some(r) = l.rate_bps {
            if r == 0 {
                return Err(
                    Entry::Link(l.link.clone()).problem(Problem::NotPositive("measured rate_bps"))
                );
            }
            f.links[i].rate_bps = r;
            // Several flows never get more than one alone (`Link::shared_rate_bps`).
            if let Some(sr) = f.links[i].shared_rate_bps.as_mut() {
                *sr = (*sr).min(r);
            }
        }
        if let Some(r) = l.shared_rate_bps {
            if r == 0 {
                return Err(Entry::Link(l.link.clone())
                    .problem(Problem::NotPositive("measured shared_rate_bps")));
            }
            f.links[i].shared_rate_bps = Some(r);
            // The link carries at least that much, whatever the file said of one flow.
            f.links[i].rate_bps = f.links[i].rate_bps.max(r);
        }
        if let Some(rtt) = l.rtt.filter(|d| !d.is_zero()) {
            f.links[i].rtt = rtt;
        }
    }
    // Waiting VMs not measured: their stale bytes as the model grows them.
    for (v, orig) in f.vms.iter_mut().zip(&fleet.vms) {
        v.stale_bytes = (orig.stale_at(now).round() as u64).min(orig.total_bytes());
    }
    let mut state = State {
        initial: vec![Phase::Waiting; fleet.vms.len()],
        started_s: vec![f64::INFINITY; fleet.vms.len()],
        settled: vec![None; fleet.vms.len()],
        policy,
        previous: previous.cloned(),
    };
    // By name once, not a scan per measured VM: the orchestrator measures every VM every
    // second, and a fleet may have 10,000.
    let by_name: HashMap<&str, usize> = fleet
        .vms
        .iter()
        .enumerate()
        .map(|(i, v)| (v.name.as_str(), i))
        .collect();
    let mut skipped = vec![false; fleet.vms.len()];
    for &i in &opts.skip {
        if let Some(s) = skipped.get_mut(i) {
            *s = true;
        }
    }
    let mut seen = vec![false; fleet.vms.len()];
    for m in &measured.vms {
        let i = *by_name.get(m.vm.as_str()).ok_or_else(|| {
            Entry::Top.problem(Problem::UnknownVm {
                key: "measured",
                vm: m.vm.clone(),
            })
        })?;
        if std::mem::replace(&mut seen[i], true) {
            return Err(Entry::Vm(m.vm.clone())
                .problem(Problem::Other("measured twice in one re-plan".into())));
        }
        let under_way = matches!(
            m.state,
            VmState::Setup { .. } | VmState::Transferring { .. }
        );
        if under_way && skipped[i] {
            return Err(Entry::Vm(m.vm.clone()).problem(Problem::Other(
                "measured under way, yet the plan skips it".into(),
            )));
        }
        let setup = f.costs.setup_s(&f.links[f.vms[i].link]);
        if let Some(r) = m.wire_ratio {
            if !crate::model::WIRE_RATIO_RANGE.contains(&r) {
                return Err(Entry::Vm(m.vm.clone()).problem(Problem::OutOfRange {
                    key: "measured wire_ratio",
                    value: r.to_string(),
                    range: "1/4096 and 1.1",
                }));
            }
            f.vms[i].wire_ratio = r;
        }
        match m.state {
            VmState::Waiting { stale_bytes } => {
                f.vms[i].stale_bytes = stale_bytes.min(f.vms[i].total_bytes());
            }
            VmState::Setup {
                started_s,
                stale_bytes,
            } => {
                f.vms[i].stale_bytes = stale_bytes.min(f.vms[i].total_bytes());
                state.started_s[i] = started_s;
                state.initial[i] = Phase::Setup {
                    switchover_in_s: (started_s + setup - now).max(0.0),
                };
            }
            VmState::Transferring {
                remaining_bytes,
                switchover_s,
                started_s,
            } => {
                state.started_s[i] = started_s;
                state.initial[i] = Phase::Transfer {
                    remaining_bytes: remaining_bytes.min(f.vms[i].total_bytes()) as f64
                        * f.vms[i].wire_ratio,
                    switchover_s: switchover_s - now,
                };
            }
            VmState::Done { finished_s } => state.settled[i] = Some((Status::Done, finished_s)),
            VmState::Failed => state.settled[i] = Some((Status::Failed, f64::NAN)),
        }
    }
    let rel = PlanOptions {
        deadline_s: opts.deadline_s - now,
        ..opts.clone()
    };
    let mut p = plan_from(&f, &rel, &state, now);
    p.deadline_s = opts.deadline_s;
    // The budget split is about normal times: the plan file's numbers, not the measured.
    p.replication = split_replication_budget(fleet);
    Ok(p)
}

/// The policy a link's plan reports when a re-plan kept the last plan's order of its
/// waiting VMs ([`replan_keeping`]).
pub const KEPT_ORDER: &str = "kept_order";

/// `s` with its waiting VMs (after the first `fixed`, those under way and pinned) in the
/// order `previous` gave them, any it did not have after them in `s`'s order; sharing and
/// concurrency as `s` has them. `n`: VMs in the fleet.
fn in_previous_order(s: &LinkSchedule, fixed: usize, previous: &[usize], n: usize) -> LinkSchedule {
    let fixed = fixed.min(s.order.len());
    let mut waiting = vec![false; n];
    for &i in &s.order[fixed..] {
        waiting[i] = true;
    }
    let mut order = s.order[..fixed].to_vec();
    for &i in previous {
        if waiting.get(i).copied().unwrap_or(false) {
            order.push(i);
            // Once only, whatever `previous` holds.
            waiting[i] = false;
        }
    }
    order.extend(s.order[fixed..].iter().filter(|&&i| waiting[i]));
    LinkSchedule { order, ..s.clone() }
}

/// Where the evacuation is when planning.
struct State {
    /// Per VM (empty: all waiting).
    initial: Vec<Phase>,
    /// Per VM under way, when it was started (empty, or infinite: not known).
    started_s: Vec<f64>,
    /// VMs already done or failed, with when they finished.
    settled: Vec<Option<(Status, f64)>>,
    /// Which schedules may be chosen.
    policy: Policy,
    /// The last plan's schedule, whose order of the waiting VMs is kept unless another is
    /// clearly better ([`replan_keeping`]).
    previous: Option<Schedule>,
}

/// One candidate schedule for a link, and how it did against the margin.
#[derive(Clone)]
struct Candidate {
    policy: &'static str,
    schedule: LinkSchedule,
    /// Whether its order may be improved by moving misses to the end.
    reorder: bool,
}

/// Lexicographic: more weight saved, then less total completion, then a shorter makespan,
/// then less total exposure (a VM switched over early but given no bandwidth yet is
/// exposed for nothing).
#[derive(Clone, Copy, Debug)]
struct Score {
    saved_weight: f64,
    sum_completion: f64,
    makespan: f64,
    sum_exposure: f64,
}

impl Score {
    /// Better by more than a near tie: more weight saved, or (as much saved) a total
    /// completion time or a makespan shorter by more than [`KEEP_ORDER_TOL`].
    fn clearly_better_than(&self, other: &Score) -> bool {
        let (a, b) = (self.saved_weight, other.saved_weight);
        if (a - b).abs() > SAVED_WEIGHT_TOL {
            return a > b;
        }
        self.sum_completion < other.sum_completion * (1.0 - KEEP_ORDER_TOL)
            || self.makespan < other.makespan * (1.0 - KEEP_ORDER_TOL)
    }

    fn better_than(&self, other: &Score) -> bool {
        let keys = [
            (-self.saved_weight, -other.saved_weight),
            (self.sum_completion, other.sum_completion),
            (self.makespan, other.makespan),
            (self.sum_exposure, other.sum_exposure),
        ];
        for (k, (a, b)) in keys.into_iter().enumerate() {
            // Saved weight: one VM more or fewer is never a tie, however many are saved.
            let tol = if k == 0 {
                SAVED_WEIGHT_TOL
            } else {
                1e-6 * a.abs().max(b.abs()).max(1.0)
            };
            if (a - b).abs() > tol {
                return a < b;
            }
        }
        false
    }
}

/// Sums of saved weight closer than this are a tie: a tenth of the smallest priority
/// ([`crate::model::PRIORITY_RANGE`]), far above a sum's rounding (10,000 VMs of
/// priority 1000 sum to 10^7, whose rounding is about 10^-9).
const SAVED_WEIGHT_TOL: f64 = 1e-4;

struct LinkPlanner<'a> {
    fleet: &'a Fleet,
    li: usize,
    margin_opts: SimOptions,
    deadline: f64,
    sim: LinkSim,
    out: Vec<VmOutcome>,
}

impl LinkPlanner<'_> {
    /// Simulates `ls` against the margin. Completion times count up to the deadline only:
    /// the power is gone then, and when a VM that misses would have finished does not
    /// matter (a miss counts as finishing at the deadline, later than any VM that makes it).
    fn score(&mut self, ls: &LinkSchedule) -> Score {
        self.sim
            .run(self.fleet, self.li, ls, &self.margin_opts, &mut self.out);
        let mut s = Score {
            saved_weight: 0.0,
            sum_completion: 0.0,
            makespan: 0.0,
            sum_exposure: 0.0,
        };
        for &vm in &ls.order {
            let f = self.out[vm].finish_s;
            let capped = f.min(self.deadline);
            s.sum_completion += capped;
            s.makespan = s.makespan.max(capped);
            s.sum_exposure += self.out[vm].exposure_s();
            if f <= self.deadline + 1e-9 * self.deadline.abs().max(1.0) {
                s.saved_weight += self.fleet.vms[vm].weight;
            }
        }
        s
    }

    /// VMs of `order[from..]` that missed the deadline in the last simulation moved to the
    /// end, keeping their order; `None` if none missed, or only at the end already.
    fn misses_last(&self, order: &[usize], from: usize) -> Option<Vec<usize>> {
        let deadline = self.deadline + 1e-9 * self.deadline.abs().max(1.0);
        // NaN (never finished) is late too.
        let late = |vm: usize| {
            !matches!(
                self.out[vm].finish_s.partial_cmp(&deadline),
                Some(Ordering::Less | Ordering::Equal)
            )
        };
        let (mut made, mut missed): (Vec<usize>, Vec<usize>) =
            order[from..].iter().partition(|&&vm| !late(vm));
        let first_late = order[from..].iter().position(|&vm| late(vm))?;
        if first_late >= made.len() {
            return None; // all misses are at the end already
        }
        let mut new = order[..from].to_vec();
        new.append(&mut made);
        new.append(&mut missed);
        Some(new)
    }
}

fn plan_from(fleet: &Fleet, opts: &PlanOptions, state: &State, now: f64) -> Plan {
    let n = fleet.vms.len();
    let margin = if opts.margin.is_finite() {
        opts.margin.clamp(0.0, 0.99)
    } else {
        DEFAULT_MARGIN
    };
    let phase = |vm: usize| state.initial.get(vm).copied().unwrap_or(Phase::Waiting);
    let mut skipped = vec![false; n];
    for &i in &opts.skip {
        if let Some(s) = skipped.get_mut(i) {
            *s = true;
        }
    }
    let active = |vm: usize| !skipped[vm] && state.settled[vm].is_none();
    let margin_opts = SimOptions {
        rate_factor: 1.0 - margin,
        initial: state.initial.clone(),
        release_s: Vec::new(),
    };
    let nominal_opts = SimOptions {
        rate_factor: 1.0,
        initial: state.initial.clone(),
        release_s: Vec::new(),
    };

    let mut chosen = Vec::with_capacity(fleet.links.len());
    let mut policies = Vec::with_capacity(fleet.links.len());
    let mut lp = LinkPlanner {
        fleet,
        li: 0,
        margin_opts,
        deadline: opts.deadline_s,
        sim: LinkSim::default(),
        out: vec![
            VmOutcome {
                start_s: f64::NAN,
                switchover_s: f64::NAN,
                finish_s: f64::NAN,
                bytes: f64::NAN,
            };
            n
        ],
    };
    for li in 0..fleet.links.len() {
        lp.li = li;
        let on_link: Vec<usize> = (0..n)
            .filter(|&i| fleet.vms[i].link == li && active(i))
            .collect();
        // Under way first, in the order the orchestrator holds them to.
        let mut running: Vec<usize> = on_link
            .iter()
            .copied()
            .filter(|&i| !matches!(phase(i), Phase::Waiting))
            .collect();
        running.sort_by_key(|&i| running_key(fleet, state, i));
        // Marks, not `contains`: with every VM under way (all at once) that was quadratic.
        let mut placed = vec![false; n];
        for &i in &running {
            placed[i] = true;
        }
        // Each once, at its first place (`PlanOptions::first` is public: a caller may
        // repeat one, which the plan file refuses).
        let pinned: Vec<usize> = opts
            .first
            .iter()
            .copied()
            .filter(|&i| {
                i < n
                    && fleet.vms[i].link == li
                    && active(i)
                    && matches!(phase(i), Phase::Waiting)
                    && !std::mem::replace(&mut placed[i], true)
            })
            .collect();
        let rest: Vec<usize> = on_link.iter().copied().filter(|&i| !placed[i]).collect();
        let prefix: Vec<usize> = running.iter().chain(&pinned).copied().collect();
        let fixed = prefix.len();

        let mut candidates = candidates(fleet, li, &prefix, &rest, margin);
        if let Some(only) = state.policy.only() {
            candidates.retain(|c| c.policy == only);
        }
        let mut best: Option<(Score, Candidate)> = None;
        for mut c in candidates {
            let mut score = lp.score(&c.schedule);
            if c.reorder {
                for _ in 0..4 {
                    let Some(order) = lp.misses_last(&c.schedule.order, fixed) else {
                        break;
                    };
                    let mut try_ls = c.schedule.clone();
                    try_ls.order = order;
                    let s = lp.score(&try_ls);
                    if s.better_than(&score) {
                        score = s;
                        c.schedule = try_ls;
                    } else {
                        break;
                    }
                }
            }
            if best.as_ref().is_none_or(|(b, _)| score.better_than(b)) {
                best = Some((score, c));
            }
        }
        let (score, mut c) = best.expect("at least the baselines");
        // A baseline orders its VMs its own way at every re-plan.
        let previous = state
            .previous
            .as_ref()
            .filter(|_| state.policy.only().is_none());
        if let Some(prev) = previous.and_then(|p| p.links.get(li)) {
            let kept = in_previous_order(&c.schedule, fixed, &prev.order, n);
            if kept.order != c.schedule.order && !score.clearly_better_than(&lp.score(&kept)) {
                c.schedule = kept;
                c.policy = KEPT_ORDER;
            }
        }
        policies.push(c.policy);
        chosen.push(c.schedule);
    }
    let schedule = Schedule { links: chosen };
    let nominal = simulate(fleet, &schedule, &nominal_opts).expect("the planner's own schedule");
    let with_margin =
        simulate(fleet, &schedule, &lp.margin_opts).expect("the planner's own schedule");

    let baseline = |s: Schedule| -> Totals {
        let s = restrict(s, &active, &|i| running_key(fleet, state, i));
        let a = simulate(fleet, &s, &nominal_opts).expect("a baseline schedule");
        let b = simulate(fleet, &s, &lp.margin_opts).expect("a baseline schedule");
        totals(fleet, &s, &a, &b, opts.deadline_s, now)
    };
    let baselines = Baselines {
        all_at_once: baseline(all_at_once(fleet)),
        one_at_a_time_smallest_first: baseline(one_at_a_time_smallest_first(fleet)),
    };
    let totals = totals(
        fleet,
        &schedule,
        &nominal,
        &with_margin,
        opts.deadline_s,
        now,
    );
    let vms = vm_plans(
        fleet,
        &schedule,
        &nominal,
        &with_margin,
        opts,
        margin,
        state,
        &skipped,
        now,
    );
    let links = fleet
        .links
        .iter()
        .enumerate()
        .map(|(li, l)| {
            let ls = &schedule.links[li];
            let stale = ls
                .order
                .iter()
                .fold(0u64, |a, &i| a.saturating_add(fleet.vms[i].stale_bytes));
            let wire: f64 = ls.order.iter().map(|&i| fleet.vms[i].wire_bytes()).sum();
            LinkPlan {
                name: l.name.clone(),
                rate_bps: l.rate_bps,
                shared_rate_bps: l.shared_rate_bps,
                rtt_ms: l.rtt_s() * 1e3,
                flow_cap_bps: l.flow_cap_bps().min(l.rate_bps as f64),
                concurrency: ls.concurrency,
                sharing: ls.sharing,
                prestart: ls.prestart,
                policy: policies[li],
                vms: ls.order.len(),
                stale_bytes_now: stale,
                ideal_s: wire * 8.0 / l.rate_bps as f64,
                makespan_s: shift(nominal.link_makespan_s[li], now),
                makespan_margin_s: shift(with_margin.link_makespan_s[li], now),
            }
        })
        .collect();
    Plan {
        now_s: now,
        deadline_s: opts.deadline_s + now,
        margin,
        schedule,
        links,
        vms,
        totals,
        baselines,
        replication: split_replication_budget(fleet),
    }
}

fn shift(t: f64, now: f64) -> f64 {
    t + now
}

/// The order in which the VMs under way on a link take it when it is shared in order (or
/// when VMs in setup are held behind the transfers): the transfers, then the VMs in setup,
/// each in the order they were started, of those started together the one with fewer bytes
/// left first. The orchestrator holds its VMs in this order
/// ([`crate::orchestrate::Orchestration::rate_caps`]) and a re-plan simulates it.
///
/// The order of starts is the plan's; the order of switchovers is not: setups take
/// different times, and at 1 Gbit/s, where a transfer may be shorter than a setup, several
/// VMs are in setup at once and switch over in any order. Taking the switchovers' order
/// (as this did until 2026-12-06) let a VM overtake the smaller one planned before it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RunningKey {
    /// Past its switchover (ahead of every VM still in setup).
    pub transferring: bool,
    /// When it was started (infinite: not known, after those known).
    pub started_s: f64,
    /// Its bytes left as they cross (in setup: its stale bytes, encoded).
    pub remaining_bytes: u64,
}

impl Eq for RunningKey {}

impl Ord for RunningKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other
            .transferring
            .cmp(&self.transferring)
            .then(self.started_s.total_cmp(&other.started_s))
            .then(self.remaining_bytes.cmp(&other.remaining_bytes))
    }
}

impl PartialOrd for RunningKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// VM `i`'s [`RunningKey`] as `state` has it; waiting VMs after every VM under way.
fn running_key(fleet: &Fleet, state: &State, i: usize) -> (bool, RunningKey) {
    let started_s = state.started_s.get(i).copied().unwrap_or(f64::INFINITY);
    let (waiting, transferring, remaining_bytes) = match state.initial.get(i) {
        Some(Phase::Transfer {
            remaining_bytes, ..
        }) => (false, true, remaining_bytes.round() as u64),
        Some(Phase::Setup { .. }) => (false, false, fleet.vms[i].wire_bytes().round() as u64),
        _ => (true, false, 0),
    };
    let key = RunningKey {
        transferring,
        started_s: if waiting { f64::INFINITY } else { started_s },
        remaining_bytes,
    };
    (waiting, key)
}

/// `s` without the VMs that are not active, with the VMs under way first.
fn restrict<K: Ord>(
    mut s: Schedule,
    active: &dyn Fn(usize) -> bool,
    key: &dyn Fn(usize) -> K,
) -> Schedule {
    for ls in &mut s.links {
        ls.order.retain(|&i| active(i));
        // Stable: under way first, in their order; the waiting ones keep theirs.
        ls.order.sort_by_key(|&i| key(i));
        if ls.concurrency > 1 {
            ls.concurrency = ls.order.len().max(1);
        }
    }
    s
}

/// Candidate schedules for link `li`: `prefix` (under way, pinned) first, then `rest` in
/// each heuristic order, with each sharing and concurrency; then the baselines.
fn candidates(
    fleet: &Fleet,
    li: usize,
    prefix: &[usize],
    rest: &[usize],
    margin: f64,
) -> Vec<Candidate> {
    let link = &fleet.links[li];
    let capacity = link.rate_bps as f64;
    let n = prefix.len() + rest.len();
    // Just enough flows that their caps fill the link (the median VM's cap).
    let mut caps: Vec<f64> = rest
        .iter()
        .chain(prefix)
        .map(|&i| fleet.flow_cap_bps(i))
        .collect();
    caps.sort_by(f64::total_cmp);
    let cap = caps
        .get(caps.len() / 2)
        .copied()
        .unwrap_or_else(|| link.flow_cap_bps().min(capacity));
    let k0 = ((capacity / cap).ceil() as usize).clamp(1, n.max(1));
    let mut ks = vec![k0];
    if 2 * k0 <= n {
        ks.push(2 * k0);
    }
    let rate = capacity / 8.0 * (1.0 - margin);
    let orders: [(&'static str, Vec<usize>); 4] = [
        (
            "smallest_effective_first",
            effective_first(fleet, rest, rate),
        ),
        (
            "smallest_first",
            by_key(rest, |i| fleet.vms[i].wire_bytes() / fleet.vms[i].weight),
        ),
        (
            "fastest_growing_first",
            by_key(rest, |i| {
                let v = &fleet.vms[i];
                if v.stale_bytes >= v.working_set_bytes || v.dirty_rate_bps == 0 {
                    f64::INFINITY
                } else {
                    v.stale_bytes as f64 / v.dirty_bytes_per_s()
                }
            }),
        ),
        ("priority_first", {
            let eff = effective_first(fleet, rest, rate);
            let mut o = eff.clone();
            o.sort_by(|&a, &b| fleet.vms[b].weight.total_cmp(&fleet.vms[a].weight));
            o
        }),
    ];
    let mut out = Vec::new();
    for (policy, order) in &orders {
        let full: Vec<usize> = prefix.iter().chain(order).copied().collect();
        for &k in &ks {
            for sharing in [Sharing::InOrder, Sharing::Fair] {
                out.push(Candidate {
                    policy,
                    schedule: LinkSchedule {
                        order: full.clone(),
                        concurrency: k,
                        sharing,
                        prestart: true,
                    },
                    reorder: true,
                });
            }
        }
    }
    let smallest: Vec<usize> = prefix
        .iter()
        .copied()
        .chain(by_key(rest, |i| fleet.vms[i].wire_bytes()))
        .collect();
    out.push(Candidate {
        policy: "one_at_a_time_smallest_first",
        schedule: LinkSchedule {
            order: smallest.clone(),
            concurrency: 1,
            sharing: Sharing::Fair,
            prestart: false,
        },
        reorder: false,
    });
    out.push(Candidate {
        policy: "all_at_once",
        schedule: LinkSchedule {
            order: smallest,
            concurrency: n.max(1),
            sharing: Sharing::Fair,
            prestart: false,
        },
        reorder: false,
    });
    out
}

fn by_key(vms: &[usize], key: impl Fn(usize) -> f64) -> Vec<usize> {
    let mut keyed: Vec<(f64, usize)> = vms.iter().map(|&i| (key(i), i)).collect();
    keyed.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    keyed.into_iter().map(|(_, i)| i).collect()
}

/// Smallest effective size per weight first: the bytes each VM will have to move when its
/// turn comes (estimated from the bytes ahead of it at `rate` bytes per second), refined
/// twice.
fn effective_first(fleet: &Fleet, vms: &[usize], rate: f64) -> Vec<usize> {
    let mut order = by_key(vms, |i| fleet.vms[i].wire_bytes() / fleet.vms[i].weight);
    let mut start = vec![0.0; fleet.vms.len()];
    for _ in 0..2 {
        let mut ahead = 0.0;
        for &i in &order {
            start[i] = ahead / rate;
            ahead += fleet.vms[i].wire_at(start[i]);
        }
        order = by_key(vms, |i| {
            fleet.vms[i].wire_at(start[i]) / fleet.vms[i].weight
        });
    }
    order
}

fn totals(
    fleet: &Fleet,
    schedule: &Schedule,
    nominal: &Outcome,
    with_margin: &Outcome,
    deadline: f64,
    now: f64,
) -> Totals {
    let mut t = Totals {
        vms: 0,
        weight: 0.0,
        saved: 0,
        saved_weight: 0.0,
        saved_at_full_rate: 0,
        saved_weight_at_full_rate: 0.0,
        mean_completion_s: f64::NAN,
        makespan_s: shift(nominal.makespan_s(), now),
        makespan_margin_s: shift(with_margin.makespan_s(), now),
        ideal_makespan_s: 0.0,
        bytes_to_cross: 0,
        mean_exposure_s: f64::NAN,
        max_exposure_s: 0.0,
    };
    let (mut sum_finish, mut sum_exposure) = (0.0, 0.0);
    for (li, ls) in schedule.links.iter().enumerate() {
        let mut bytes = 0.0;
        for &i in &ls.order {
            let w = fleet.vms[i].weight;
            t.vms += 1;
            t.weight += w;
            if with_margin.made(i, deadline) {
                t.saved += 1;
                t.saved_weight += w;
            }
            if nominal.made(i, deadline) {
                t.saved_at_full_rate += 1;
                t.saved_weight_at_full_rate += w;
            }
            let o = &nominal.vms[i];
            sum_finish += o.finish_s;
            sum_exposure += o.exposure_s();
            t.max_exposure_s = t.max_exposure_s.max(o.exposure_s());
            t.bytes_to_cross = t.bytes_to_cross.saturating_add(o.bytes.round() as u64);
            bytes += fleet.vms[i].wire_bytes();
        }
        let ideal = bytes * 8.0 / fleet.links[li].rate_bps as f64;
        t.ideal_makespan_s = t.ideal_makespan_s.max(ideal);
    }
    if t.vms > 0 {
        t.mean_completion_s = shift(sum_finish / t.vms as f64, now);
        t.mean_exposure_s = sum_exposure / t.vms as f64;
    }
    t
}

#[allow(clippy::too_many_arguments)]
fn vm_plans(
    fleet: &Fleet,
    schedule: &Schedule,
    nominal: &Outcome,
    with_margin: &Outcome,
    opts: &PlanOptions,
    margin: f64,
    state: &State,
    skipped: &[bool],
    now: f64,
) -> Vec<VmPlan> {
    let n = fleet.vms.len();
    // Each VM's place in its link's order, found once (a scan per comparison of the sort
    // below was quadratic in the VMs of a link).
    let mut place = vec![0usize; n];
    for ls in &schedule.links {
        for (k, &i) in ls.order.iter().enumerate() {
            if let Some(p) = place.get_mut(i) {
                *p = k;
            }
        }
    }
    let position = |vm: usize| place[vm];
    // The VMs under way first, in their links' orders (a transfer's start in the
    // simulation is its switchover less a setup, not when it was started); then by
    // planned start, then by place in its link's order.
    let pinned = |vm: usize| match state.initial.get(vm) {
        Some(Phase::Waiting) | None => (1, 0),
        Some(_) => (0, position(vm)),
    };
    let mut ran: Vec<usize> = (0..n).filter(|&i| nominal.vms[i].ran()).collect();
    ran.sort_by(|&a, &b| {
        pinned(a)
            .cmp(&pinned(b))
            .then(nominal.vms[a].start_s.total_cmp(&nominal.vms[b].start_s))
            .then(position(a).cmp(&position(b)))
            .then(a.cmp(&b))
    });
    let mut rank = vec![None; n];
    for (r, &i) in ran.iter().enumerate() {
        rank[i] = Some(r + 1);
    }
    (0..n)
        .map(|i| {
            let v = &fleet.vms[i];
            let link = &fleet.links[v.link];
            let base = VmPlan {
                name: v.name.clone(),
                link: link.name.clone(),
                order: rank[i],
                start_s: None,
                switchover_s: None,
                finish_s: None,
                finish_margin_s: None,
                bytes_to_cross: None,
                exposure_s: None,
                weight: v.weight,
                status: Status::Skipped,
                reason: None,
            };
            if let Some((status, at)) = state.settled[i] {
                return VmPlan {
                    status,
                    finish_s: at.is_finite().then_some(at),
                    ..base
                };
            }
            if skipped[i] {
                return VmPlan {
                    reason: Some("skipped by the plan".into()),
                    ..base
                };
            }
            let o = nominal.vms[i];
            let m = with_margin.vms[i];
            let (status, reason) = if with_margin.made(i, opts.deadline_s) {
                (Status::Saved, None)
            } else if nominal.made(i, opts.deadline_s) {
                (
                    Status::AtRisk,
                    Some(format!(
                        "makes the deadline only at the full rate of link {:?}: with {:.0}% \
                         less it finishes at {}",
                        link.name,
                        margin * 100.0,
                        fmt_secs(shift(m.finish_s, now))
                    )),
                )
            } else {
                (
                    Status::Misses,
                    Some(miss_reason(
                        fleet,
                        i,
                        opts.deadline_s,
                        margin,
                        position(i),
                        &m,
                        now,
                    )),
                )
            };
            VmPlan {
                start_s: Some(shift(o.start_s, now)),
                switchover_s: Some(shift(o.switchover_s, now)),
                finish_s: Some(shift(o.finish_s, now)),
                finish_margin_s: Some(shift(m.finish_s, now)),
                bytes_to_cross: Some(o.bytes.round() as u64),
                exposure_s: Some(o.exposure_s()),
                status,
                reason,
                ..base
            }
        })
        .collect()
}

/// Why `vm` misses: too big to make it even alone, or no room because of the VMs ahead.
fn miss_reason(
    fleet: &Fleet,
    vm: usize,
    deadline: f64,
    margin: f64,
    ahead: usize,
    m: &VmOutcome,
    now: f64,
) -> String {
    let v = &fleet.vms[vm];
    let link = &fleet.links[v.link];
    let setup = fleet.costs.setup_s(link);
    let rate = fleet
        .flow_cap_bps(vm)
        .min(link.rate_bps as f64 * (1.0 - margin));
    let bytes = v.wire_at(setup);
    let alone =
        setup + bytes * (1.0 + fleet.costs.wire_overhead) * 8.0 / rate + fleet.costs.tail_s(link);
    if alone > deadline {
        format!(
            "too big: alone on link {:?} it needs {} ({} at {}), the deadline is in {}",
            link.name,
            fmt_secs(alone),
            fmt_bytes(bytes),
            fmt_rate(rate),
            fmt_secs(deadline)
        )
    } else {
        format!(
            "no room: alone it would need {}, but the {} VMs ahead of it on link {:?} \
             keep the link busy; with the margin it finishes at {}",
            fmt_secs(alone),
            ahead,
            link.name,
            fmt_secs(shift(m.finish_s, now))
        )
    }
}

/// How the replication budget is split in normal times, and what it is worth.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReplicationSplit {
    pub vms: Vec<VmBudget>,
    /// Per link: the budget split (its `replication_budget_bps`, or its VMs' budgets
    /// summed) and what no VM needed.
    pub links: Vec<LinkBudget>,
    /// Steady-state stale bytes of the fleet with the current budgets.
    pub steady_stale_current_bytes: f64,
    /// The same with the recommended split: the lowest any split of the budgets reaches.
    pub steady_stale_recommended_bytes: f64,
}

/// One VM's replication budget.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VmBudget {
    pub name: String,
    pub current_bps: u64,
    pub recommended_bps: u64,
    pub steady_stale_current_bytes: f64,
    pub steady_stale_recommended_bytes: f64,
}

/// One link's replication budget.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LinkBudget {
    pub name: String,
    pub budget_bps: u64,
    pub spare_bps: u64,
}

/// A VM's stale bytes in steady state under replication budget `budget_bps`: writes land at
/// random in its working set, `d (1 - s/w)` bytes per second go stale and `b` are
/// replicated, so `s = w (1 - b/d)` while `b < d`, and (nearly) nothing once `b >= d`.
/// (The replicator's 20 ms harvest and a round trip of acknowledgement leave a little
/// more, not counted.)
pub fn steady_stale_bytes(working_set_bytes: u64, dirty_rate_bps: u64, budget_bps: u64) -> f64 {
    if dirty_rate_bps == 0 {
        return 0.0;
    }
    working_set_bytes as f64 * (1.0 - budget_bps as f64 / dirty_rate_bps as f64).max(0.0)
}

/// Splits each link's replication budget over its VMs so that the fleet's steady-state
/// stale bytes are lowest: a VM's stale bytes fall by `w/d` per bit/s of budget until it
/// gets its dirty rate, so the budget goes first to the largest `w/d` (working set per
/// dirty rate), each VM up to its dirty rate. This is optimal (a fractional knapsack).
pub fn split_replication_budget(fleet: &Fleet) -> ReplicationSplit {
    let n = fleet.vms.len();
    let mut recommended = vec![0u64; n];
    let mut links = Vec::with_capacity(fleet.links.len());
    for (li, l) in fleet.links.iter().enumerate() {
        let on: Vec<usize> = (0..n).filter(|&i| fleet.vms[i].link == li).collect();
        let budget = l.replication_budget_bps.unwrap_or_else(|| {
            on.iter()
                .map(|&i| fleet.vms[i].replication_budget_bps)
                .fold(0u64, u64::saturating_add)
        });
        let mut order: Vec<usize> = on
            .iter()
            .copied()
            .filter(|&i| fleet.vms[i].dirty_rate_bps > 0)
            .collect();
        let value =
            |i: usize| fleet.vms[i].working_set_bytes as f64 / fleet.vms[i].dirty_rate_bps as f64;
        order.sort_by(|&a, &b| value(b).total_cmp(&value(a)).then(a.cmp(&b)));
        let mut left = budget;
        for i in order {
            let give = fleet.vms[i].dirty_rate_bps.min(left);
            recommended[i] = give;
            left -= give;
        }
        links.push(LinkBudget {
            name: l.name.clone(),
            budget_bps: budget,
            spare_bps: left,
        });
    }
    let vms: Vec<VmBudget> = fleet
        .vms
        .iter()
        .zip(&recommended)
        .map(|(v, &r)| VmBudget {
            name: v.name.clone(),
            current_bps: v.replication_budget_bps,
            recommended_bps: r,
            steady_stale_current_bytes: steady_stale_bytes(
                v.working_set_bytes,
                v.dirty_rate_bps,
                v.replication_budget_bps,
            ),
            steady_stale_recommended_bytes: steady_stale_bytes(
                v.working_set_bytes,
                v.dirty_rate_bps,
                r,
            ),
        })
        .collect();
    ReplicationSplit {
        steady_stale_current_bytes: vms.iter().map(|v| v.steady_stale_current_bytes).sum(),
        steady_stale_recommended_bytes: vms.iter().map(|v| v.steady_stale_recommended_bytes).sum(),
        vms,
        links,
    }
}

#[cfg(test)]
mod tests;
