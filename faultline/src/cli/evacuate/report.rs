//! What `faultline evacuate` shows: progress bars per VM on a terminal, and the final
//! report as text (per VM the plan against what happened, then totals).

use std::fmt::Write as _;

use fleet::orchestrate::{Orchestration, Phase, Report};
use fleet::units::{fmt_bytes, fmt_secs};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// One bar per VM: bytes sent of its stale bytes, and its phase.
pub struct Bars {
    _multi: MultiProgress,
    bars: Vec<ProgressBar>,
}

impl Bars {
    pub fn new(o: &Orchestration) -> Bars {
        let multi = MultiProgress::new();
        let style = ProgressStyle::with_template(
            "{prefix:>12} [{bar:30}] {bytes:>10}/{total_bytes:<10} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let bars = o
            .fleet()
            .vms
            .iter()
            .map(|v| {
                let b = multi.add(ProgressBar::new(v.stale_bytes.max(1)));
                b.set_style(style.clone());
                b.set_prefix(v.name.clone());
                b
            })
            .collect();
        Bars {
            _multi: multi,
            bars,
        }
    }

    pub fn update(&self, o: &Orchestration) {
        let r = o.report();
        for (b, v) in self.bars.iter().zip(&r.vms) {
            let len = b.length().unwrap_or(0);
            b.set_position(if v.outcome == Phase::Done {
                len
            } else {
                v.bytes_sent.min(len)
            });
            b.set_message(match v.stalled_since_s {
                Some(since) => format!("STALLED since {}", fmt_secs(since)),
                None => phase(v.outcome).into(),
            });
        }
    }

    pub fn finish(self, o: &Orchestration) {
        self.update(o);
        for b in &self.bars {
            b.abandon();
        }
    }
}

fn phase(p: Phase) -> &'static str {
    match p {
        Phase::Waiting => "waiting",
        Phase::Starting => "starting",
        Phase::Transferring => "transferring",
        Phase::Done => "done",
        Phase::Failed => "FAILED",
        Phase::Skipped => "skipped",
    }
}

/// The VMs that were not evacuated, and why, in one line.
pub fn failures(r: &Report) -> String {
    let bad: Vec<String> = r
        .vms
        .iter()
        .filter(|v| !matches!(v.outcome, Phase::Done | Phase::Skipped))
        .map(|v| {
            format!(
                "vm {:?}: {}",
                v.name,
                match (&v.error, v.stalled_since_s) {
                    (Some(e), _) => e.clone(),
                    (None, Some(since)) => format!(
                        "not finished: stalled since {} with its source reporting",
                        fmt_secs(since)
                    ),
                    (None, None) => "not finished".into(),
                }
            )
        })
        .collect();
    format!(
        "{} of {} VMs not evacuated: {}",
        bad.len(),
        r.totals.vms - r.totals.skipped,
        bad.join("; ")
    )
}

/// The text report.
pub fn render(file: &str, r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{file}: {} VMs, deadline at {} from the start",
        r.totals.vms,
        fmt_secs(r.deadline_s)
    );
    let _ = writeln!(s);
    let opt = |v: Option<f64>| v.map_or_else(|| "-".into(), fmt_secs);
    let mut rows = vec![vec![
        "vm".to_string(),
        "link".into(),
        "outcome".into(),
        "planned start".into(),
        "finish".into(),
        "started".into(),
        "switchover".into(),
        "finished".into(),
        "sent".into(),
        "deadline".into(),
    ]];
    for v in &r.vms {
        rows.push(vec![
            v.name.clone(),
            v.link.clone(),
            phase(v.outcome).into(),
            opt(v.planned.start_s),
            opt(v.planned.finish_s),
            opt(v.measured.start_s),
            opt(v.measured.switchover_s),
            opt(v.measured.finish_s),
            fmt_bytes(v.bytes_sent as f64),
            match (v.outcome, v.saved_by_deadline) {
                (_, true) => "saved".into(),
                (Phase::Skipped, _) => "skipped".into(),
                _ => "LOST".into(),
            },
        ]);
    }
    crate::cli::plan::table(&mut s, &rows);
    for v in r.vms.iter() {
        if let Some(since) = v.stalled_since_s {
            let _ = writeln!(s, "{} stalled since {}", v.name, fmt_secs(since));
        }
    }
    for v in r.vms.iter().filter(|v| v.error.is_some()) {
        let _ = writeln!(
            s,
            "{} failed: {}",
            v.name,
            v.error.as_deref().unwrap_or_default()
        );
    }
    let t = &r.totals;
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "evacuated {} of {} VMs ({} failed, {} skipped); {} by the deadline (the plan promised {})",
        t.done,
        t.vms - t.skipped,
        t.failed,
        t.skipped,
        t.saved_by_deadline,
        t.planned_saved
    );
    let _ = writeln!(
        s,
        "makespan {} (planned {}); {} sent",
        opt(t.makespan_s),
        fmt_secs(t.planned_makespan_s),
        fmt_bytes(t.bytes_sent as f64)
    );
    s
}

/// Writes the run as a Gantt chart to `out`: the measured bars of every VM over the plan
/// the orchestrator started with (docs/fleet.md, "The Gantt chart").
pub(super) fn write_gantt(
    file: &std::path::Path,
    r: &fleet::orchestrate::Report,
    first_plan: &fleet::plan::Plan,
    out: &std::path::Path,
) -> anyhow::Result<()> {
    use anyhow::Context;
    use fleet::chart::{render_svg, ChartOptions};
    let svg = run_timeline(file, r, first_plan)
        .and_then(|t| render_svg(&t, &ChartOptions::default()))
        .with_context(|| format!("drawing the Gantt chart for {}", out.display()))?;
    std::fs::write(out, svg)
        .with_context(|| format!("writing the Gantt chart to {}", out.display()))?;
    Ok(())
}

/// The run's chart: the measured bars of every VM up to when it ended (or its last
/// event), over the plan the orchestrator started with.
fn run_timeline(
    file: &std::path::Path,
    r: &fleet::orchestrate::Report,
    first_plan: &fleet::plan::Plan,
) -> Result<fleet::chart::Timeline, fleet::chart::ChartError> {
    use fleet::chart::{RunEnd, Timeline, VmRun};
    use fleet::orchestrate::Phase;
    let name = file.file_name().map_or_else(
        || file.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let title = format!("Evacuation run: {name} (solid: measured; outlined: the plan)");
    let weight = |vm: &str| {
        first_plan
            .vms
            .iter()
            .find(|p| p.name == vm)
            .map_or(1.0, |p| p.weight)
    };
    let runs: Vec<VmRun> = r
        .vms
        .iter()
        .map(|v| {
            let m = &v.measured;
            let end = match (v.outcome, m.finish_s) {
                (Phase::Done, Some(at_s)) => Some(RunEnd::Finished { at_s }),
                (Phase::Failed, at) => {
                    at.or(m.switchover_s)
                        .or(m.start_s)
                        .map(|at_s| RunEnd::Failed {
                            at_s,
                            reason: v.error.clone().unwrap_or_else(|| "failed".into()),
                        })
                }
                _ => None,
            };
            VmRun {
                vm: v.name.clone(),
                link: v.link.clone(),
                priority: weight(&v.name),
                started_s: m.start_s,
                switchover_s: m.switchover_s,
                end,
                stalls: v.stalls.iter().map(|s| (s.since_s, s.until_s)).collect(),
            }
        })
        .collect();
    let now_s = r
        .vms
        .iter()
        .flat_map(|v| {
            [
                v.measured.start_s,
                v.measured.switchover_s,
                v.measured.finish_s,
            ]
            .into_iter()
            .chain(v.stalls.iter().flat_map(|s| [Some(s.since_s), s.until_s]))
        })
        .flatten()
        .chain(r.ended_s)
        .fold(0.0_f64, f64::max);
    let mut timeline = Timeline::from_runs(title, Some(r.deadline_s), now_s, &runs)?;
    timeline.overlay_plan(&Timeline::from_plan(first_plan, String::new()));
    Ok(timeline)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet::chart::{BarKind, Basis};
    use fleet::orchestrate::Orchestration;
    use std::path::Path;

    /// A run that ended at 40 s with its first VM stalled since 0.5 s, the second waiting.
    fn stalled_run() -> Orchestration {
        let mut o = super::super::two_vms_on_one_link(100 << 20, 30.0);
        o.started(0, 0.0);
        o.progress(0, 0.5, Some(50 << 20), 0);
        assert_eq!(o.stalls(10.5).len(), 1);
        o
    }

    #[test]
    fn a_stall_still_open_is_drawn_to_when_the_run_ended() {
        let o = stalled_run();
        let stalled = |r: &Report| {
            let t = run_timeline(Path::new("fleet.toml"), r, o.first_plan()).unwrap();
            let bar = t.rows[0]
                .bars
                .iter()
                .find(|b| b.kind == BarKind::Stalled && b.basis == Basis::Measured)
                .map(|b| (b.start_s, b.end_s));
            (bar, t.now_s)
        };
        let r = o.report_ended(40.0);
        assert_eq!(r.ended_s, Some(40.0));
        assert_eq!(stalled(&r), (Some((0.5, 40.0)), Some(40.0)));
        // Without the end, up to the last event: the stall's start, so not drawn.
        assert_eq!(stalled(&o.report()), (None, Some(0.5)));
        assert_eq!(o.report_ended(f64::NAN).ended_s, None);
    }
}
