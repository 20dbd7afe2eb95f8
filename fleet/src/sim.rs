//! An event-driven, flow-level simulator of a fleet's evacuation.
//!
//! Each VM's evacuation is a *setup* (the handshake and switchover, [`Costs::setup_s`]; the
//! link is not used) followed by a *flow* that carries its stale bytes as they were at the
//! switchover, plus the wire overhead. Events are a VM starting, a switchover (its flow
//! starts), a flow finishing, a VM done (without prestart its place frees then), and, with
//! [`LinkSchedule::prestart`], the moment a running flow has just one setup's time left,
//! when the next VM's setup starts so that its flow is ready as the slot frees. Between
//! events every rate is constant:
//!
//! * each flow is capped at window / RTT of its link and at its VM's own limit
//!   ([`Fleet::flow_cap_bps`]);
//! * [`Sharing::Fair`]: the link's rate is shared max-min fairly (water-filling: a flow
//!   whose cap is below the fair share gets its cap, the rest share what is left);
//! * [`Sharing::InOrder`]: flows take the link in the order they started, each as much as
//!   its cap allows (strict priority; what an orchestrator pacing its flows can do).
//!
//! A VM still waiting (not yet at its switchover) keeps writing: its stale bytes grow at
//! its dirty rate up to its working set ([`crate::model::Vm::stale_at`]); they are computed
//! when its flow starts, not stepped. A VM is evacuated, as its source reports it, one
//! tail after its last byte left ([`Costs::tail_s`]: the answer's round trip and the ends'
//! last work). Its flow leaves the link with its last byte, but without prestart the next
//! VM takes its place only once it is done (an event of its own).
//!
//! Every VM uses one link, so links do not interact and are simulated one after another.
//! The cost is O(events × flows on a link).

use std::collections::VecDeque;

use serde::Serialize;
use thiserror::Error;

use crate::model::{Costs, Fleet};

/// How a link's rate is shared among its flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Sharing {
    /// Max-min fair, each flow within its cap (independent congestion-controlled flows).
    Fair,
    /// In start order: the earliest flow takes what its cap allows, the next what is left,
    /// and so on.
    InOrder,
}

/// What to do on one link.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LinkSchedule {
    /// The VMs of this link (indices into [`Fleet::vms`]) in the order they start. VMs of
    /// the link that are not listed are not evacuated.
    pub order: Vec<usize>,
    /// How many VMs may be under way at once (in setup, moving bytes, or, without
    /// prestart, in their tail until done), at least 1.
    pub concurrency: usize,
    pub sharing: Sharing,
    /// Start the next VM's setup while a flow still runs, one setup's time before its last
    /// byte is predicted to leave, so the link does not idle through handshakes. The flow
    /// that hands its slot over no longer counts against `concurrency`.
    pub prestart: bool,
}

/// What to do on every link: `links[i]` is for `fleet.links[i]`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Schedule {
    pub links: Vec<LinkSchedule>,
}

/// Where a VM's evacuation is at the simulation's time 0 (for re-planning while an
/// evacuation runs; a fresh plan has every VM `Waiting`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Phase {
    /// Not started; stale bytes are [`crate::model::Vm::stale_bytes`] now and grow.
    Waiting,
    /// Started; the switchover comes in this many seconds.
    Setup { switchover_in_s: f64 },
    /// Moving bytes: this many payload bytes are left (as the encoding makes them: stale
    /// bytes × [`crate::model::Vm::wire_ratio`]); the switchover was at this time
    /// (zero or negative).
    Transfer {
        remaining_bytes: f64,
        switchover_s: f64,
    },
}

/// How to run a simulation.
#[derive(Clone, Debug, PartialEq)]
pub struct SimOptions {
    /// Each link delivers this fraction of its rate (1.0 nominal; 0.9 for a 10% margin).
    /// Per-flow caps (window / RTT) are not scaled.
    pub rate_factor: f64,
    /// Per VM, where it is at time 0; empty: all `Waiting`.
    pub initial: Vec<Phase>,
    /// Per VM, the earliest time its setup may start (seconds; empty: no limit). With an
    /// order sorted by these times and a concurrency of the whole link, the simulation
    /// replays a schedule as it ran: how the model is checked against a real run, whose
    /// start times came from a controller the model does not imitate.
    pub release_s: Vec<f64>,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            rate_factor: 1.0,
            initial: Vec::new(),
            release_s: Vec::new(),
        }
    }
}

impl SimOptions {
    /// Replays start times: `release_s[vm]` for every VM of the fleet.
    pub fn replay(release_s: Vec<f64>) -> SimOptions {
        SimOptions {
            release_s,
            ..SimOptions::default()
        }
    }
}

/// One VM's simulated evacuation. Times in seconds from the simulation's time 0; `NaN`
/// for a VM that is not in the schedule.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct VmOutcome {
    /// Its setup started.
    pub start_s: f64,
    /// Its switchover: the guest runs at the destination from here on, and its stale set
    /// is fixed.
    pub switchover_s: f64,
    /// Its evacuation is done, as its source reports it: one tail
    /// ([`Costs::tail_s`]) after its last stale byte left.
    pub finish_s: f64,
    /// Payload bytes that crossed after the switchover: its stale bytes then, as its
    /// encoding makes them ([`crate::model::Vm::wire_ratio`]).
    pub bytes: f64,
}

impl VmOutcome {
    const NOT_RUN: VmOutcome = VmOutcome {
        start_s: f64::NAN,
        switchover_s: f64::NAN,
        finish_s: f64::NAN,
        bytes: f64::NAN,
    };

    /// Whether the schedule ran it.
    pub fn ran(&self) -> bool {
        !self.finish_s.is_nan()
    }

    /// From the switchover to done: how long losing the source would lose it, a little
    /// more (the VM is safe once its last page is at the destination, half a round trip
    /// after it left; done counts the answer's way back and the ends' last work too).
    pub fn exposure_s(&self) -> f64 {
        self.finish_s - self.switchover_s
    }
}

/// A simulation's result.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Outcome {
    /// Per VM, in fleet order.
    pub vms: Vec<VmOutcome>,
    /// Per link, the last finish (0 for a link with nothing to do).
    pub link_makespan_s: Vec<f64>,
}

/// Tolerance of "at the same time", relative to the time.
const EPS: f64 = 1e-9;

fn same_or_before(a: f64, b: f64) -> bool {
    a <= b + EPS * b.abs().max(1.0)
}

impl Outcome {
    /// The last finish over all links.
    pub fn makespan_s(&self) -> f64 {
        self.link_makespan_s.iter().copied().fold(0.0, f64::max)
    }

    /// Whether `vm` finished by `deadline_s`.
    pub fn made(&self, vm: usize, deadline_s: f64) -> bool {
        let f = self.vms[vm].finish_s;
        f.is_finite() && same_or_before(f, deadline_s)
    }

    /// How many VMs finished by the deadline.
    pub fn saved(&self, deadline_s: f64) -> usize {
        (0..self.vms.len())
            .filter(|&i| self.made(i, deadline_s))
            .count()
    }

    /// The weight of the VMs that finished by the deadline.
    pub fn saved_weight(&self, fleet: &Fleet, deadline_s: f64) -> f64 {
        (0..self.vms.len())
            .filter(|&i| self.made(i, deadline_s))
            .map(|i| fleet.vms[i].weight)
            .sum()
    }

    /// Mean finish time of the VMs that ran (NaN if none did).
    pub fn mean_completion_s(&self) -> f64 {
        let (n, sum) = self
            .vms
            .iter()
            .filter(|v| v.ran())
            .fold((0usize, 0.0), |(n, s), v| (n + 1, s + v.finish_s));
        if n == 0 {
            f64::NAN
        } else {
            sum / n as f64
        }
    }
}

/// A schedule that does not fit its fleet.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ScheduleError {
    #[error("the schedule has {got} links, the fleet {want}")]
    LinkCount { got: usize, want: usize },
    #[error("vm #{vm} is scheduled on link #{scheduled} but uses link #{uses}")]
    WrongLink {
        vm: usize,
        scheduled: usize,
        uses: usize,
    },
    #[error("vm #{0} is scheduled twice, or does not exist")]
    Twice(usize),
    #[error("link #{0} has concurrency 0")]
    NoConcurrency(usize),
    #[error("initial phases given for {got} VMs, the fleet has {want}")]
    Phases { got: usize, want: usize },
    #[error("vm #{0} is under way at time 0 but not scheduled")]
    UnderWayNotScheduled(usize),
}

impl Schedule {
    /// Checks that every link has a schedule, every scheduled VM uses that link and appears
    /// once, and every concurrency is at least 1.
    pub fn check(&self, fleet: &Fleet) -> Result<(), ScheduleError> {
        if self.links.len() != fleet.links.len() {
            return Err(ScheduleError::LinkCount {
                got: self.links.len(),
                want: fleet.links.len(),
            });
        }
        let mut seen = vec![false; fleet.vms.len()];
        for (li, ls) in self.links.iter().enumerate() {
            if ls.concurrency == 0 {
                return Err(ScheduleError::NoConcurrency(li));
            }
            for &vm in &ls.order {
                if vm >= seen.len() || seen[vm] {
                    return Err(ScheduleError::Twice(vm));
                }
                seen[vm] = true;
                if fleet.vms[vm].link != li {
                    return Err(ScheduleError::WrongLink {
                        vm,
                        scheduled: li,
                        uses: fleet.vms[vm].link,
                    });
                }
            }
        }
        Ok(())
    }
}

/// Simulates `schedule` on `fleet`.
pub fn simulate(
    fleet: &Fleet,
    schedule: &Schedule,
    opts: &SimOptions,
) -> Result<Outcome, ScheduleError> {
    schedule.check(fleet)?;
    check_phases(fleet, schedule, opts)?;
    let mut out = Outcome {
        vms: vec![VmOutcome::NOT_RUN; fleet.vms.len()],
        link_makespan_s: vec![0.0; fleet.links.len()],
    };
    let mut sim = LinkSim::default();
    for (li, ls) in schedule.links.iter().enumerate() {
        out.link_makespan_s[li] = sim.run(fleet, li, ls, opts, &mut out.vms);
    }
    Ok(out)
}

fn check_phases(
    fleet: &Fleet,
    schedule: &Schedule,
    opts: &SimOptions,
) -> Result<(), ScheduleError> {
    if opts.initial.is_empty() {
        return Ok(());
    }
    if opts.initial.len() != fleet.vms.len() {
        return Err(ScheduleError::Phases {
            got: opts.initial.len(),
            want: fleet.vms.len(),
        });
    }
    let mut scheduled = vec![false; fleet.vms.len()];
    for ls in &schedule.links {
        for &vm in &ls.order {
            scheduled[vm] = true;
        }
    }
    match opts
        .initial
        .iter()
        .enumerate()
        .find(|(i, p)| !matches!(p, Phase::Waiting) && !scheduled[*i])
    {
        Some((i, _)) => Err(ScheduleError::UnderWayNotScheduled(i)),
        None => Ok(()),
    }
}

/// A flow moving a VM's stale bytes.
#[derive(Clone, Copy, Debug)]
struct Flow {
    vm: usize,
    /// Wire bytes left.
    remaining: f64,
    /// Bytes per second.
    cap: f64,
    rate: f64,
    /// Predicted end at the current rates.
    eta: f64,
    /// It gave its slot to the next VM's setup (prestart).
    handed: bool,
}

/// What a link delivers, bytes per second: to one flow alone, and to several together
/// ([`crate::model::Link::shared_rate_bps`]).
#[derive(Clone, Copy, Debug)]
struct Capacity {
    one: f64,
    shared: f64,
}

/// The simulation of one link; reusable, so its buffers are allocated once.
#[derive(Default)]
pub(crate) struct LinkSim {
    flows: Vec<Flow>,
    setups: VecDeque<(usize, f64)>,
    /// When the places of flows that ended (without prestart) free: at their VMs' finish,
    /// in order (every flow of a link has the same tail).
    tails: VecDeque<f64>,
    caps: Vec<(f64, usize)>,
}

impl LinkSim {
    /// Runs link `li` of `fleet` under `ls`, writing the outcome of its VMs into `out`;
    /// returns the link's last finish.
    pub(crate) fn run(
        &mut self,
        fleet: &Fleet,
        li: usize,
        ls: &LinkSchedule,
        opts: &SimOptions,
        out: &mut [VmOutcome],
    ) -> f64 {
        let link = &fleet.links[li];
        let costs: &Costs = &fleet.costs;
        // Bytes per second for one flow alone and for several together.
        let capacity = Capacity {
            one: link.rate_for(1) as f64 / 8.0 * opts.rate_factor,
            shared: link.rate_for(2) as f64 / 8.0 * opts.rate_factor,
        };
        let setup = costs.setup_s(link);
        let tail = costs.tail_s(link);
        let wire = 1.0 + costs.wire_overhead;
        let concurrency = ls.concurrency.max(1);
        let phase = |vm: usize| opts.initial.get(vm).copied().unwrap_or(Phase::Waiting);
        let release = |vm: usize| opts.release_s.get(vm).copied().unwrap_or(0.0);
        self.flows.clear();
        self.setups.clear();
        self.tails.clear();

        let mut t = 0.0_f64;
        let mut makespan = 0.0_f64;
        let mut used = 0usize;
        // VMs under way at time 0 first, in schedule order.
        let mut queue: Vec<usize> = Vec::with_capacity(ls.order.len());
        let mut setups0 = Vec::new();
        for &vm in &ls.order {
            match phase(vm) {
                Phase::Waiting => queue.push(vm),
                Phase::Setup { switchover_in_s } => {
                    out[vm].start_s = 0.0;
                    setups0.push((vm, switchover_in_s.max(0.0)));
                    used += 1;
                }
                Phase::Transfer {
                    remaining_bytes,
                    switchover_s,
                } => {
                    out[vm].start_s = switchover_s - setup;
                    out[vm].switchover_s = switchover_s;
                    out[vm].bytes = remaining_bytes.max(0.0);
                    self.flows.push(Flow {
                        vm,
                        remaining: remaining_bytes.max(0.0) * wire,
                        cap: fleet.flow_cap_bps(vm) / 8.0,
                        rate: 0.0,
                        eta: 0.0,
                        handed: false,
                    });
                    used += 1;
                }
            }
        }
        setups0.sort_by(|a, b| a.1.total_cmp(&b.1));
        self.setups.extend(setups0);
        let mut next = 0usize;
        let mut dirty = true;

        loop {
            while used < concurrency
                && next < queue.len()
                && same_or_before(release(queue[next]), t)
            {
                let vm = queue[next];
                next += 1;
                out[vm].start_s = t;
                self.setups.push_back((vm, t + setup));
                used += 1;
            }
            if dirty {
                self.share(capacity, ls.sharing);
                dirty = false;
            }
            for f in &mut self.flows {
                f.eta = if f.remaining <= 0.0 {
                    t
                } else if f.rate > 0.0 {
                    t + f.remaining / f.rate
                } else {
                    f64::INFINITY
                };
            }
            let mut t_next = f64::INFINITY;
            if let Some(&(_, at)) = self.setups.front() {
                t_next = t_next.min(at);
            }
            if let Some(&at) = self.tails.front() {
                t_next = t_next.min(at);
            }
            if used < concurrency && next < queue.len() {
                t_next = t_next.min(release(queue[next]));
            }
            for f in &self.flows {
                t_next = t_next.min(f.eta);
            }
            let want_handover = ls.prestart && next < queue.len() && used >= concurrency;
            if want_handover {
                for f in self.flows.iter().filter(|f| !f.handed) {
                    t_next = t_next.min((f.eta - setup).max(t));
                }
            }
            if !t_next.is_finite() {
                // Nothing left (or only flows that can never move, which a positive
                // capacity rules out).
                break;
            }
            let t_next = t_next.max(t);
            let dt = t_next - t;
            t = t_next;

            // Flows that end now.
            let mut i = 0;
            while i < self.flows.len() {
                let f = self.flows[i];
                if same_or_before(f.eta, t) {
                    let o = &mut out[f.vm];
                    o.finish_s = t + tail;
                    makespan = makespan.max(o.finish_s);
                    // Without prestart the next VM starts once this one is done, as its
                    // source reports it; with prestart its place is free already. With
                    // no VM left to start, when the place frees does not matter (and an
                    // event for it would cost a pass over every flow).
                    let waiting = next < queue.len();
                    match (f.handed, ls.prestart) {
                        (true, _) => {}
                        (false, false) if waiting => self.tails.push_back(o.finish_s),
                        (false, _) => used -= 1,
                    }
                    self.flows.remove(i);
                    dirty = true;
                } else {
                    self.flows[i].remaining = (f.remaining - f.rate * dt).max(0.0);
                    i += 1;
                }
            }
            // Places that free now.
            while self.tails.front().is_some_and(|&at| same_or_before(at, t)) {
                self.tails.pop_front();
                used -= 1;
            }
            // Switchovers now: the stale set is fixed and the flow starts.
            while let Some(&(vm, at)) = self.setups.front() {
                if !same_or_before(at, t) {
                    break;
                }
                self.setups.pop_front();
                // Waiting or in setup at time 0: its stale bytes grew until now; they
                // cross as its encoding makes them.
                let bytes = fleet.vms[vm].wire_at(t);
                let o = &mut out[vm];
                o.switchover_s = t;
                o.bytes = bytes;
                self.flows.push(Flow {
                    vm,
                    remaining: bytes * wire,
                    cap: fleet.flow_cap_bps(vm) / 8.0,
                    rate: 0.0,
                    eta: t,
                    handed: false,
                });
                dirty = true;
            }
            // Hand a slot over to the next VM's setup.
            if ls.prestart && next < queue.len() && used >= concurrency {
                let due = self
                    .flows
                    .iter_mut()
                    .filter(|f| !f.handed && f.rate > 0.0)
                    .map(|f| {
                        let eta = t + f.remaining / f.rate;
                        (eta, f)
                    })
                    .min_by(|a, b| a.0.total_cmp(&b.0));
                if let Some((eta, f)) = due {
                    if same_or_before(eta - setup, t) {
                        f.handed = true;
                        used -= 1;
                    }
                }
            }
        }
        makespan
    }

    /// Sets every flow's rate for a link delivering `capacity`: its rate for one flow
    /// when one flow carries everything, its shared rate when several carry some.
    fn share(&mut self, capacity: Capacity, sharing: Sharing) {
        match sharing {
            Sharing::InOrder => {
                // The first flow carries the link alone if its cap reaches the shared rate
                // (up to the rate for one flow); below that, the flows behind it take the
                // rest of the shared rate. Continuous in the first flow's cap, so a smaller
                // capacity (the margin) never speeds a flow up.
                let total = match self.flows.first() {
                    None => capacity.one,
                    Some(f) if self.flows.len() == 1 || f.cap >= capacity.one => capacity.one,
                    Some(f) if f.cap >= capacity.shared => f.cap,
                    Some(_) => capacity.shared,
                };
                let mut left = total;
                for f in &mut self.flows {
                    f.rate = f.cap.min(left);
                    left -= f.rate;
                }
            }
            Sharing::Fair => {
                let n = self.flows.len();
                if n == 0 {
                    return;
                }
                let capacity = if n == 1 {
                    capacity.one
                } else {
                    capacity.shared
                };
                let first = self.flows[0].cap;
                if self.flows.iter().all(|f| f.cap == first) {
                    let r = first.min(capacity / n as f64);
                    for f in &mut self.flows {
                        f.rate = r;
                    }
                    return;
                }
                // Water-filling: the smallest caps first.
                self.caps.clear();
                self.caps
                    .extend(self.flows.iter().enumerate().map(|(i, f)| (f.cap, i)));
                self.caps.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
                let mut left = capacity;
                let mut k = 0;
                while k < n {
                    let share = left / (n - k) as f64;
                    let (cap, i) = self.caps[k];
                    if cap <= share {
                        self.flows[i].rate = cap;
                        left -= cap;
                        k += 1;
                    } else {
                        for &(_, j) in &self.caps[k..] {
                            self.flows[j].rate = share;
                        }
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
