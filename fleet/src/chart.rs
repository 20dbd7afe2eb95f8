//! Gantt charts of a fleet's evacuation, as SVG: one row per VM, grouped by link, with a
//! time axis, the deadline as a vertical line and a legend, for an operator to look at
//! rather than read.
//!
//! The input is a neutral [`Timeline`]: rows of [`Bar`]s, each a span of time of one
//! [`BarKind`] (waiting in its link's queue, setup at the source, moving stale pages with
//! the VM at the destination, the extra time the bandwidth margin allows) that is either
//! [`Basis::Planned`] or [`Basis::Measured`], so a run can be drawn over its plan. It is
//! built from a plan ([`Timeline::from_plan`]), a simulation ([`Timeline::from_outcome`])
//! or what an orchestrator measured ([`Timeline::from_runs`], then
//! [`Timeline::overlay_plan`]), and drawn by [`render_svg`].
//!
//! Pure, like the rest of the crate: no clock, no files; the caller writes the string.
//! Beyond [`ChartOptions::max_rows`] VMs (300 by default) the chart shares the rows
//! fairly among the links, draws in each every VM that misses, failed or is at risk
//! first, fills up with the others in order, and says in a note and in each link's header
//! how many it left out.

mod draw;
mod layout;
#[cfg(test)]
mod tests;

use thiserror::Error;

use crate::model::Fleet;
use crate::plan::{Plan, Status};
use crate::sim::Outcome;
use crate::units::fmt_secs;

/// Rows drawn at most by default; beyond this the chart leaves VMs out and says so.
pub const DEFAULT_MAX_ROWS: usize = 300;
/// The chart's width by default, in pixels.
pub const DEFAULT_WIDTH_PX: u32 = 1200;
/// The narrowest chart [`render_svg`] draws, in pixels.
pub const MIN_WIDTH_PX: u32 = 600;

/// What a span of a VM's evacuation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BarKind {
    /// Waiting for its turn on the link: not started, the VM runs at the source (and its
    /// stale bytes grow).
    Waiting,
    /// Setup: handshake and switchover; the VM still runs at the source.
    Setup,
    /// Its stale pages crossing: the VM runs at the destination and is exposed (losing the
    /// source now would lose it).
    Flow,
    /// How much longer the flow takes if the links deliver only `1 - margin` of their rate
    /// (plans only).
    Margin,
    /// Stalled: its source alive, the VM not moving (runs only; drawn over its setup or
    /// flow).
    Stalled,
}

impl BarKind {
    /// A short name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            BarKind::Waiting => "waiting",
            BarKind::Setup => "setup",
            BarKind::Flow => "flow",
            BarKind::Margin => "margin",
            BarKind::Stalled => "stalled",
        }
    }
}

/// Whether a bar is what was predicted or what happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Basis {
    /// A plan's or a simulation's prediction.
    Planned,
    /// What an orchestrator measured.
    Measured,
}

/// One span of a VM's evacuation. Times in seconds from the evacuation's start.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bar {
    /// When the span starts.
    pub start_s: f64,
    /// When it ends (at least `start_s`).
    pub end_s: f64,
    /// What the VM is doing meanwhile.
    pub kind: BarKind,
    /// Predicted or measured.
    pub basis: Basis,
}

/// What a VM's row says about the deadline; it sets the colour of its label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Evacuated by the deadline (planned: even with the bandwidth margin).
    Saved,
    /// Planned to make the deadline only at the links' full rate.
    AtRisk,
    /// Not evacuated by the deadline (planned, or it was not done when the deadline
    /// passed, or it finished late).
    Misses,
    /// Its evacuation failed.
    Failed,
    /// Not evacuated on purpose.
    Skipped,
    /// Under way or waiting, and the deadline has not passed yet: no verdict.
    Pending,
}

impl Verdict {
    /// Whether a chart that must leave VMs out keeps this one first.
    pub fn is_notable(self) -> bool {
        matches!(self, Verdict::Misses | Verdict::Failed | Verdict::AtRisk)
    }
}

/// One VM: a row of the chart.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// The VM's name (the row's label).
    pub vm: String,
    /// Its link's name: rows are grouped by link.
    pub link: String,
    /// Its weight; shown next to its name when it is not 1.
    pub priority: f64,
    /// What it says about the deadline.
    pub verdict: Verdict,
    /// Its spans, in any order.
    pub bars: Vec<Bar>,
    /// A short text drawn at the end of the row (when it finishes, why it misses).
    pub note: Option<String>,
}

/// What a chart shows: rows of bars over time, and the deadline.
#[derive(Clone, Debug, PartialEq)]
pub struct Timeline {
    /// The chart's title.
    pub title: String,
    /// When the power goes, seconds from the evacuation's start; drawn as a red line.
    pub deadline_s: Option<f64>,
    /// For a chart of a run under way or a re-plan: the time it was drawn at; drawn as a
    /// grey line.
    pub now_s: Option<f64>,
    /// One per VM. Rows are grouped by link, links in the order they first appear, rows in
    /// their order within a link.
    pub rows: Vec<Row>,
}

/// What one VM's evacuation did, as an orchestrator saw it; times in seconds from the
/// evacuation's start. `None` for what has not happened (yet).
#[derive(Clone, Debug, PartialEq)]
pub struct VmRun {
    /// The VM's name.
    pub vm: String,
    /// Its link's name.
    pub link: String,
    /// Its weight.
    pub priority: f64,
    /// Its setup started.
    pub started_s: Option<f64>,
    /// Its switchover: from here on it runs at the destination.
    pub switchover_s: Option<f64>,
    /// How it ended, if it did.
    pub end: Option<RunEnd>,
    /// Its stalls: since when, and until when (`None`: still stalled).
    pub stalls: Vec<(f64, Option<f64>)>,
}

/// How a VM's evacuation ended.
#[derive(Clone, Debug, PartialEq)]
pub enum RunEnd {
    /// Its last stale byte arrived.
    Finished {
        /// When.
        at_s: f64,
    },
    /// It failed.
    Failed {
        /// When.
        at_s: f64,
        /// Why, in a few words (drawn at the end of its row).
        reason: String,
    },
}

/// How to draw a chart.
#[derive(Clone, Debug, PartialEq)]
pub struct ChartOptions {
    /// The chart's width in pixels, at least [`MIN_WIDTH_PX`]; its height follows from the
    /// number of rows.
    pub width_px: u32,
    /// Rows drawn at most (at least 1); VMs beyond are left out, and the chart says so.
    pub max_rows: usize,
    /// The time axis ends here (seconds). `None`: at the last bar, but at most 1.5 ×
    /// the deadline, so that a VM finishing a day late does not squash the rest (bars
    /// that go on are cut at the edge with an arrow; the note at the end of the row says
    /// when they end).
    pub horizon_s: Option<f64>,
}

impl Default for ChartOptions {
    fn default() -> Self {
        ChartOptions {
            width_px: DEFAULT_WIDTH_PX,
            max_rows: DEFAULT_MAX_ROWS,
            horizon_s: None,
        }
    }
}

/// Why a chart cannot be made.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ChartError {
    /// A bar whose times are not finite, or that ends before it starts.
    #[error("vm {vm:?}: its {kind} bar from {start_s} s to {end_s} s is not a span of time (both finite, the end not before the start)")]
    BadBar {
        /// The row's VM.
        vm: String,
        /// The bar's kind ([`BarKind::name`]).
        kind: &'static str,
        /// Its start.
        start_s: f64,
        /// Its end.
        end_s: f64,
    },
    /// A time that must be finite (and, for the horizon, positive) is not.
    #[error("chart: {what} must be a finite time{} (got {value})", if *.positive { " > 0" } else { "" })]
    BadTime {
        /// Which time.
        what: &'static str,
        /// What it was.
        value: f64,
        /// Whether it must also be > 0.
        positive: bool,
    },
    /// The requested width is below [`MIN_WIDTH_PX`].
    #[error("chart: the width must be at least {min} px (got {got})")]
    TooNarrow {
        /// [`MIN_WIDTH_PX`].
        min: u32,
        /// What was asked for.
        got: u32,
    },
    /// `max_rows` is 0.
    #[error("chart: max_rows must be at least 1")]
    NoRows,
    /// A VM's measured events contradict each other.
    #[error("vm {vm:?}: {problem}")]
    BadRun {
        /// The VM.
        vm: String,
        /// What is wrong, in words.
        problem: String,
    },
    /// plotters failed to draw (it should not, drawing into a string).
    #[error("drawing the chart: {0}")]
    Draw(String),
}

impl Timeline {
    /// The chart of a plan: per VM, waiting from the plan's time to its start, its setup,
    /// its flow up to its finish at the links' full rate, and the margin up to its finish
    /// with the margin; the deadline. Rows follow the plan's links, each in start order;
    /// skipped VMs come last in their link, without bars.
    pub fn from_plan(plan: &Plan, title: impl Into<String>) -> Timeline {
        let link_rank = |name: &str| {
            plan.links
                .iter()
                .position(|l| l.name == name)
                .unwrap_or(usize::MAX)
        };
        let mut order: Vec<usize> = (0..plan.vms.len()).collect();
        order.sort_by_key(|&i| {
            let v = &plan.vms[i];
            (link_rank(&v.link), v.order.unwrap_or(usize::MAX), i)
        });
        let deadline = plan.deadline_s;
        let rows = order
            .into_iter()
            .map(|i| {
                let v = &plan.vms[i];
                let mut bars = Vec::new();
                let mut push = |a: Option<f64>, b: Option<f64>, kind| {
                    if let (Some(a), Some(b)) = (a, b) {
                        if a.is_finite() && b.is_finite() && b > a {
                            bars.push(Bar {
                                start_s: a,
                                end_s: b,
                                kind,
                                basis: Basis::Planned,
                            });
                        }
                    }
                };
                push(Some(plan.now_s), v.start_s, BarKind::Waiting);
                push(v.start_s, v.switchover_s, BarKind::Setup);
                push(v.switchover_s, v.finish_s, BarKind::Flow);
                push(v.finish_s, v.finish_margin_s, BarKind::Margin);
                let (verdict, note) = match v.status {
                    Status::Saved => (Verdict::Saved, v.finish_margin_s.map(fmt_secs)),
                    Status::AtRisk => (
                        Verdict::AtRisk,
                        match (v.finish_s, v.finish_margin_s) {
                            (Some(f), Some(m)) => {
                                Some(format!("{}, {} with the margin", fmt_secs(f), fmt_secs(m)))
                            }
                            _ => None,
                        },
                    ),
                    Status::Misses => {
                        let tag = v.reason.as_deref().and_then(short_reason);
                        let when = v.finish_margin_s.or(v.finish_s).map(fmt_secs);
                        let note = match (tag, when) {
                            (Some(t), Some(w)) => Some(format!("{t}: {w}")),
                            (t, w) => t.map(str::to_string).or(w),
                        };
                        (Verdict::Misses, note)
                    }
                    Status::Skipped => (Verdict::Skipped, None),
                    Status::Done => {
                        let late = v.finish_s.is_some_and(|f| f > deadline);
                        (
                            if late {
                                Verdict::Misses
                            } else {
                                Verdict::Saved
                            },
                            v.finish_s.map(|f| format!("done at {}", fmt_secs(f))),
                        )
                    }
                    Status::Failed => (Verdict::Failed, None),
                };
                Row {
                    vm: v.name.clone(),
                    link: v.link.clone(),
                    priority: v.weight,
                    verdict,
                    bars,
                    note,
                }
            })
            .collect();
        Timeline {
            title: title.into(),
            deadline_s: Some(deadline),
            now_s: (plan.now_s > 0.0).then_some(plan.now_s),
            rows,
        }
    }

    /// The chart of a simulation (a baseline schedule, say): per VM that ran, waiting from
    /// 0, setup and flow, as predictions; a VM finished by `deadline_s` is saved, one after
    /// it misses, one that did not run is skipped. Rows follow the fleet's links, each in
    /// start order.
    pub fn from_outcome(
        fleet: &Fleet,
        outcome: &Outcome,
        title: impl Into<String>,
        deadline_s: Option<f64>,
    ) -> Timeline {
        let n = fleet.vms.len().min(outcome.vms.len());
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| {
            let (va, vb) = (&fleet.vms[a], &fleet.vms[b]);
            let (oa, ob) = (&outcome.vms[a], &outcome.vms[b]);
            va.link
                .cmp(&vb.link)
                .then(oa.ran().cmp(&ob.ran()).reverse())
                .then(oa.start_s.total_cmp(&ob.start_s))
                .then(a.cmp(&b))
        });
        let rows = order
            .into_iter()
            .map(|i| {
                let v = &fleet.vms[i];
                let o = &outcome.vms[i];
                let link = fleet
                    .links
                    .get(v.link)
                    .map_or_else(String::new, |l| l.name.clone());
                let mut bars = Vec::new();
                let spans = [
                    (0.0, o.start_s, BarKind::Waiting),
                    (o.start_s, o.switchover_s, BarKind::Setup),
                    (o.switchover_s, o.finish_s, BarKind::Flow),
                ];
                for (a, b, kind) in spans {
                    if o.ran() && a.is_finite() && b.is_finite() && b > a {
                        bars.push(Bar {
                            start_s: a,
                            end_s: b,
                            kind,
                            basis: Basis::Planned,
                        });
                    }
                }
                let verdict = if !o.ran() {
                    Verdict::Skipped
                } else if deadline_s.is_some_and(|d| o.finish_s > d) {
                    Verdict::Misses
                } else {
                    Verdict::Saved
                };
                Row {
                    vm: v.name.clone(),
                    link,
                    priority: v.weight,
                    verdict,
                    bars,
                    note: o.ran().then(|| fmt_secs(o.finish_s)),
                }
            })
            .collect();
        Timeline {
            title: title.into(),
            deadline_s,
            now_s: None,
            rows,
        }
    }

    /// The chart of a run, from what an orchestrator measured by `now_s`: per VM, waiting
    /// from 0 to its start (or to now), setup to its switchover, and its flow to its end
    /// (or to now), all measured. A VM that finished by the deadline is saved, one that
    /// finished after it or was not done when it passed misses, one that failed failed;
    /// the others are pending. Rows keep their links' order of first appearance, each in
    /// start order (VMs not started last).
    ///
    /// Errors name the VM: a time that is not finite or lies after `now_s`, a switchover
    /// without a start, an end before the switchover, a finish without a switchover.
    pub fn from_runs(
        title: impl Into<String>,
        deadline_s: Option<f64>,
        now_s: f64,
        runs: &[VmRun],
    ) -> Result<Timeline, ChartError> {
        if !now_s.is_finite() {
            return Err(ChartError::BadTime {
                what: "now_s",
                value: now_s,
                positive: false,
            });
        }
        if let Some(d) = deadline_s.filter(|d| !d.is_finite()) {
            return Err(ChartError::BadTime {
                what: "deadline_s",
                value: d,
                positive: false,
            });
        }
        let mut rows = Vec::with_capacity(runs.len());
        let mut starts = Vec::with_capacity(runs.len());
        for r in runs {
            rows.push(run_row(r, deadline_s, now_s)?);
            starts.push(r.started_s.unwrap_or(f64::INFINITY));
        }
        // Stable: by link (first appearance), then start.
        let mut links: Vec<&str> = Vec::new();
        for r in runs {
            if !links.contains(&r.link.as_str()) {
                links.push(&r.link);
            }
        }
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by(|&a, &b| {
            let la = links.iter().position(|l| *l == runs[a].link);
            let lb = links.iter().position(|l| *l == runs[b].link);
            la.cmp(&lb).then(starts[a].total_cmp(&starts[b]))
        });
        let mut slots: Vec<Option<Row>> = rows.into_iter().map(Some).collect();
        let rows = order.into_iter().filter_map(|i| slots[i].take()).collect();
        Ok(Timeline {
            title: title.into(),
            deadline_s,
            now_s: Some(now_s),
            rows,
        })
    }

    /// Draws `plan`'s bars with this run's as predictions (outlined, above the measured
    /// bars), matching rows by VM name. Rows end up in the plan's order; VMs the run does
    /// not mention keep the plan's row; VMs only the run has come last. A row without a
    /// note of its own gets the plan's verdict and note, as "plan: MISSES no room: 81.5 s".
    /// The deadline is the run's, or the
    /// plan's if the run has none.
    pub fn overlay_plan(&mut self, plan: &Timeline) {
        let mut measured: Vec<Option<Row>> = std::mem::take(&mut self.rows)
            .into_iter()
            .map(Some)
            .collect();
        let mut rows = Vec::with_capacity(measured.len().max(plan.rows.len()));
        for p in &plan.rows {
            let planned = p.bars.iter().map(|b| Bar {
                basis: Basis::Planned,
                ..*b
            });
            let found = measured
                .iter_mut()
                .find(|m| m.as_ref().is_some_and(|m| m.vm == p.vm))
                .and_then(Option::take);
            match found {
                Some(mut m) => {
                    m.bars.extend(planned);
                    if m.note.is_none() {
                        let planned = layout::note_text(p);
                        m.note = (!planned.is_empty()).then(|| format!("plan: {planned}"));
                    }
                    rows.push(m);
                }
                None => {
                    let mut r = p.clone();
                    r.bars = planned.collect();
                    rows.push(r);
                }
            }
        }
        rows.extend(measured.into_iter().flatten());
        self.rows = rows;
        if self.deadline_s.is_none() {
            self.deadline_s = plan.deadline_s;
        }
    }
}

/// The tag before the first colon of a planner's reason ("too big", "no room"), if short.
fn short_reason(reason: &str) -> Option<&str> {
    let (tag, _) = reason.split_once(':')?;
    let tag = tag.trim();
    (!tag.is_empty() && tag.chars().count() <= 24).then_some(tag)
}

/// One measured VM's row.
fn run_row(r: &VmRun, deadline_s: Option<f64>, now_s: f64) -> Result<Row, ChartError> {
    let bad = |problem: String| ChartError::BadRun {
        vm: r.vm.clone(),
        problem,
    };
    let (end_at, end_name) = match &r.end {
        Some(RunEnd::Finished { at_s }) => (Some(*at_s), "finish"),
        Some(RunEnd::Failed { at_s, .. }) => (Some(*at_s), "failure"),
        None => (None, ""),
    };
    for (name, t) in [
        ("start", r.started_s),
        ("switchover", r.switchover_s),
        (end_name, end_at),
    ] {
        if let Some(t) = t {
            if !t.is_finite() {
                return Err(bad(format!("its {name} time is not finite ({t})")));
            }
            if t > now_s {
                return Err(bad(format!("its {name} at {t} s is after now ({now_s} s)")));
            }
        }
    }
    if r.switchover_s.is_some() && r.started_s.is_none() {
        return Err(bad("a switchover without a start".into()));
    }
    if let (Some(a), Some(b)) = (r.started_s, r.switchover_s) {
        if b < a {
            return Err(bad(format!(
                "its switchover at {b} s is before its start at {a} s"
            )));
        }
    }
    let last_event = r.switchover_s.or(r.started_s);
    if let (Some(e), Some(l)) = (end_at, last_event) {
        if e < l {
            return Err(bad(format!(
                "its {end_name} at {e} s is before its last event at {l} s"
            )));
        }
    }
    if matches!(r.end, Some(RunEnd::Finished { .. })) && r.switchover_s.is_none() {
        return Err(bad("a finish without a switchover".into()));
    }
    for &(since, until) in &r.stalls {
        for t in std::iter::once(since).chain(until) {
            if !t.is_finite() || t > now_s {
                return Err(bad(format!("a stall at {t} s is not a time up to now")));
            }
        }
        if until.is_some_and(|u| u < since) {
            return Err(bad(format!("a stall from {since} s ends before it began")));
        }
        if r.started_s.is_none() {
            return Err(bad("a stall without a start".into()));
        }
    }

    let mut bars = Vec::new();
    let mut push = |a: f64, b: f64, kind| {
        if b > a {
            bars.push(Bar {
                start_s: a,
                end_s: b,
                kind,
                basis: Basis::Measured,
            });
        }
    };
    let stop = end_at.unwrap_or(now_s);
    match r.started_s {
        None => {
            // Not started: waiting until it failed or until now.
            push(0.0, stop, BarKind::Waiting);
        }
        Some(s) => {
            push(0.0, s, BarKind::Waiting);
            match r.switchover_s {
                None => push(s, stop, BarKind::Setup),
                Some(sw) => {
                    push(s, sw, BarKind::Setup);
                    push(sw, stop, BarKind::Flow);
                }
            }
            // Over the setup or the flow, within them.
            for &(since, until) in &r.stalls {
                push(
                    since.max(s),
                    until.unwrap_or(stop).min(stop),
                    BarKind::Stalled,
                );
            }
        }
    }
    let passed = deadline_s.is_some_and(|d| now_s > d);
    let (verdict, note) = match &r.end {
        Some(RunEnd::Finished { at_s }) => {
            let late = deadline_s.is_some_and(|d| *at_s > d);
            (
                if late {
                    Verdict::Misses
                } else {
                    Verdict::Saved
                },
                Some(fmt_secs(*at_s)),
            )
        }
        Some(RunEnd::Failed { reason, .. }) => (
            Verdict::Failed,
            (!reason.is_empty()).then(|| reason.clone()),
        ),
        None if passed => (Verdict::Misses, Some("not done at the deadline".into())),
        None => (Verdict::Pending, None),
    };
    Ok(Row {
        vm: r.vm.clone(),
        link: r.link.clone(),
        priority: r.priority,
        verdict,
        bars,
        note,
    })
}

/// Draws `timeline` as an SVG document (a string to write to a `.svg` file).
///
/// Errors: a bar, the deadline, `now_s` or the horizon that is not a finite time (the
/// error names the VM), a width below [`MIN_WIDTH_PX`], `max_rows` of 0.
pub fn render_svg(timeline: &Timeline, options: &ChartOptions) -> Result<String, ChartError> {
    validate(timeline, options)?;
    let layout = layout::Layout::new(timeline, options);
    draw::svg(timeline, &layout)
}

fn validate(t: &Timeline, o: &ChartOptions) -> Result<(), ChartError> {
    if o.width_px < MIN_WIDTH_PX {
        return Err(ChartError::TooNarrow {
            min: MIN_WIDTH_PX,
            got: o.width_px,
        });
    }
    if o.max_rows == 0 {
        return Err(ChartError::NoRows);
    }
    let times = [
        ("deadline_s", t.deadline_s, false),
        ("now_s", t.now_s, false),
        ("horizon_s", o.horizon_s, true),
    ];
    for (what, v, positive) in times {
        if let Some(v) = v {
            if !v.is_finite() || (positive && v <= 0.0) {
                return Err(ChartError::BadTime {
                    what,
                    value: v,
                    positive,
                });
            }
        }
    }
    for r in &t.rows {
        for b in &r.bars {
            if !(b.start_s.is_finite() && b.end_s.is_finite() && b.end_s >= b.start_s) {
                return Err(ChartError::BadBar {
                    vm: r.vm.clone(),
                    kind: b.kind.name(),
                    start_s: b.start_s,
                    end_s: b.end_s,
                });
            }
        }
    }
    Ok(())
}
