//! `faultline plan FILE`: what evacuating a fleet would do, without moving anything.
//!
//! Reads a plan file (docs/fleet.md), plans with the `fleet` crate and prints, per VM, its
//! order, start, finish and bytes to cross and whether it makes the deadline; per link the
//! concurrency and sharing chosen; totals against the ideal and against the two baseline
//! schedules; and the replication budget split for normal times. With `--json`, one JSON
//! object (`"ok": true`). With `--gantt OUT.svg`, also writes the plan as a Gantt chart.
//! A bad plan file is a usage error that names the entry. With `--live`, the VMs' figures
//! come from their sources' control endpoints first, as `faultline evacuate` takes them at
//! its start: the plan it would make now.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Args;
use fleet::chart::{render_svg, ChartOptions, Timeline};
use fleet::file::{Deadline, PlanFile};
use fleet::plan::{Plan, Policy, Status, Totals};
use fleet::sim::Sharing;
use fleet::units::{fmt_bytes, fmt_rate, fmt_secs};
use serde::Serialize;

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// The plan file (TOML): links, VMs, deadline, margin; see docs/fleet.md.
    pub file: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also write the plan as a Gantt chart (SVG) to this file: a row per VM, grouped by
    /// link, the deadline as a red line; see docs/fleet.md.
    #[arg(long, value_name = "OUT.svg")]
    pub gantt: Option<PathBuf>,
    /// Plan with what the VMs' sources measure now, as `faultline evacuate` would at its
    /// start (stale bytes, their growth, sizes, the wire ratio their encoding will give):
    /// needs the file's `control` addresses and certificates. Nothing is started; a
    /// source that does not answer is listed and planned as failed.
    #[arg(long)]
    pub live: bool,
    /// With `--live`: seconds each source has to answer.
    #[arg(long, default_value = "3", value_name = "SECS", value_parser = super::evacuate::parse_secs, requires = "live")]
    pub connect_timeout: Duration,
}

#[derive(Serialize)]
struct Report<'a> {
    file: String,
    /// The deadline as an absolute time, when the file gave one.
    deadline_at: Option<&'a str>,
    /// Where the Gantt chart was written, with `--gantt`.
    #[serde(skip_serializing_if = "Option::is_none")]
    gantt: Option<String>,
    /// With `--live`: planned from the sources' figures.
    live: bool,
    /// With `--live`: the VMs whose source did not answer, and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    unreachable: Vec<Unreachable>,
    #[serde(flatten)]
    plan: &'a Plan,
}

#[derive(Serialize)]
struct Unreachable {
    vm: String,
    error: String,
}

pub fn run(a: PlanArgs) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading the plan file {}", a.file.display()))?;
    let read_at = Instant::now();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_secs_f64();
    let pf = fleet::file::parse(&text, now).with_context(|| a.file.display().to_string())?;
    let (plan, answered, unreachable) = if a.live {
        let live =
            super::evacuate::live_plan(&pf, &a.file, read_at, a.connect_timeout, Policy::Planner)
                .with_context(|| format!("asking the sources of {}", a.file.display()))?;
        let unreachable = live
            .unreachable
            .into_iter()
            .map(|(vm, error)| Unreachable { vm, error })
            .collect();
        (live.plan, (live.answered, live.asked), unreachable)
    } else {
        (
            fleet::plan::plan(&pf.fleet, &pf.options),
            (0, 0),
            Vec::new(),
        )
    };
    for u in &unreachable {
        eprintln!("faultline: vm {:?}: {}", u.vm, u.error);
    }
    if let Some(out) = &a.gantt {
        write_gantt(&a.file, &pf, &plan, out)?;
    }
    if a.json {
        let at = match &pf.deadline {
            Deadline::At { rfc3339, .. } => Some(rfc3339.as_str()),
            Deadline::In(_) => None,
        };
        super::outcome::print_report(&Report {
            file: a.file.display().to_string(),
            deadline_at: at,
            gantt: a.gantt.as_ref().map(|p| p.display().to_string()),
            live: a.live,
            unreachable,
            plan: &plan,
        })?;
    } else {
        if a.live {
            println!(
                "Planned with the figures of {} of {} now.",
                answered.0,
                count(answered.1, "source", "sources")
            );
        }
        print!("{}", render(&a.file.display().to_string(), &pf, &plan));
        if let Some(out) = &a.gantt {
            println!("\nGantt chart: {}", out.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes the plan's Gantt chart to `out`.
fn write_gantt(file: &Path, pf: &PlanFile, plan: &Plan, out: &Path) -> anyhow::Result<()> {
    let name = file.file_name().map_or_else(
        || file.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let title = match &pf.deadline {
        Deadline::At { rfc3339, .. } => format!("Evacuation plan: {name}, power lost at {rfc3339}"),
        Deadline::In(_) => format!("Evacuation plan: {name}"),
    };
    let timeline = Timeline::from_plan(plan, title);
    let svg = render_svg(&timeline, &ChartOptions::default())
        .with_context(|| format!("drawing the Gantt chart for {}", out.display()))?;
    std::fs::write(out, svg)
        .with_context(|| format!("writing the Gantt chart to {}", out.display()))?;
    Ok(())
}

/// `1 link`, `2 links`.
fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The text report.
fn render(file: &str, pf: &PlanFile, p: &Plan) -> String {
    let mut s = String::new();
    let skipped = p.vms.iter().filter(|v| v.status == Status::Skipped).count();
    let when = match &pf.deadline {
        Deadline::At { rfc3339, .. } => format!(" ({rfc3339})"),
        Deadline::In(_) => String::new(),
    };
    let _ = writeln!(
        s,
        "{file}: {} on {}{}; deadline in {}{when}; margin {:.0}% of every link's rate",
        count(p.vms.len(), "VM", "VMs"),
        count(p.links.len(), "link", "links"),
        if skipped > 0 {
            format!(" ({skipped} skipped)")
        } else {
            String::new()
        },
        fmt_secs(p.deadline_s),
        p.margin * 100.0,
    );
    let _ = writeln!(s);

    let mut rows = vec![vec![
        "link".to_string(),
        "rate".into(),
        "rtt".into(),
        "flow cap".into(),
        "flows".into(),
        "sharing".into(),
        "order".into(),
        "VMs".into(),
        "stale now".into(),
        "ideal".into(),
        "makespan".into(),
        "w/ margin".into(),
    ]];
    for l in &p.links {
        rows.push(vec![
            l.name.clone(),
            match l.shared_rate_bps {
                // One flow alone, and several together.
                Some(shared) => format!(
                    "{} ({} shared)",
                    fmt_rate(l.rate_bps as f64),
                    fmt_rate(shared as f64)
                ),
                None => fmt_rate(l.rate_bps as f64),
            },
            format!("{:.0} ms", l.rtt_ms),
            fmt_rate(l.flow_cap_bps),
            l.concurrency.to_string(),
            match l.sharing {
                Sharing::Fair => "fair".into(),
                Sharing::InOrder => "in order".into(),
            },
            l.policy.replace('_', " "),
            l.vms.to_string(),
            fmt_bytes(l.stale_bytes_now as f64),
            fmt_secs(l.ideal_s),
            fmt_secs(l.makespan_s),
            fmt_secs(l.makespan_margin_s),
        ]);
    }
    table(&mut s, &rows);
    let _ = writeln!(s);

    let mut order: Vec<usize> = (0..p.vms.len()).collect();
    order.sort_by_key(|&i| (p.vms[i].order.unwrap_or(usize::MAX), i));
    let mut rows = vec![vec![
        "#".to_string(),
        "vm".into(),
        "link".into(),
        "prio".into(),
        "start".into(),
        "switchover".into(),
        "finish".into(),
        "w/ margin".into(),
        "to cross".into(),
        "exposed".into(),
        "deadline".into(),
    ]];
    let opt = |v: Option<f64>| v.map_or_else(|| "-".into(), fmt_secs);
    for &i in &order {
        let v = &p.vms[i];
        let verdict = match v.status {
            Status::Saved => "saved".to_string(),
            Status::AtRisk => "at risk".into(),
            Status::Misses => "MISSES".into(),
            Status::Skipped => "skipped".into(),
            Status::Done => "done".into(),
            Status::Failed => "failed".into(),
        };
        rows.push(vec![
            v.order.map_or_else(|| "-".into(), |o| o.to_string()),
            v.name.clone(),
            v.link.clone(),
            format!("{}", v.weight),
            opt(v.start_s),
            opt(v.switchover_s),
            opt(v.finish_s),
            opt(v.finish_margin_s),
            v.bytes_to_cross
                .map_or_else(|| "-".into(), |b| fmt_bytes(b as f64)),
            opt(v.exposure_s),
            verdict,
        ]);
    }
    table(&mut s, &rows);
    let why: Vec<_> = order
        .iter()
        .map(|&i| &p.vms[i])
        .filter(|v| matches!(v.status, Status::Misses | Status::AtRisk))
        .collect();
    if !why.is_empty() {
        let _ = writeln!(s);
        for v in why {
            let _ = writeln!(
                s,
                "{} {}: {}",
                if v.status == Status::Misses {
                    "misses"
                } else {
                    "at risk"
                },
                v.name,
                v.reason.as_deref().unwrap_or("")
            );
        }
    }

    let t = &p.totals;
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "saved by the deadline: {} of {} (weight {} of {}) with the margin; {} at the links' full rate",
        t.saved,
        count(t.vms, "VM", "VMs"),
        t.saved_weight,
        t.weight,
        t.saved_at_full_rate
    );
    let _ = writeln!(
        s,
        "mean completion {}, makespan {} ({} with the margin); ideal {} (bytes to cross now / link rate); {} to cross",
        fmt_secs(t.mean_completion_s),
        fmt_secs(t.makespan_s),
        fmt_secs(t.makespan_margin_s),
        fmt_secs(t.ideal_makespan_s),
        fmt_bytes(t.bytes_to_cross as f64),
    );
    let _ = writeln!(
        s,
        "exposure (switchover to done): mean {}, max {}",
        fmt_secs(t.mean_exposure_s),
        fmt_secs(t.max_exposure_s)
    );
    let base = |name: &str, b: &Totals| {
        format!(
            "{name}: saves {} (weight {}), mean completion {}, makespan {}, mean exposure {}",
            b.saved,
            b.saved_weight,
            fmt_secs(b.mean_completion_s),
            fmt_secs(b.makespan_s),
            fmt_secs(b.mean_exposure_s)
        )
    };
    let _ = writeln!(s, "{}", base("all at once", &p.baselines.all_at_once));
    let _ = writeln!(
        s,
        "{}",
        base(
            "one at a time, smallest first",
            &p.baselines.one_at_a_time_smallest_first
        )
    );

    let r = &p.replication;
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "replication in normal times: steady-state stale bytes {} with today's budgets, {} with this split:",
        fmt_bytes(r.steady_stale_current_bytes),
        fmt_bytes(r.steady_stale_recommended_bytes)
    );
    let mut rows = vec![vec![
        "vm".to_string(),
        "budget now".into(),
        "recommended".into(),
        "steady stale now".into(),
        "then".into(),
    ]];
    for v in &r.vms {
        rows.push(vec![
            v.name.clone(),
            fmt_rate(v.current_bps as f64),
            fmt_rate(v.recommended_bps as f64),
            fmt_bytes(v.steady_stale_current_bytes),
            fmt_bytes(v.steady_stale_recommended_bytes),
        ]);
    }
    table(&mut s, &rows);
    for l in r.links.iter().filter(|l| l.spare_bps > 0) {
        let _ = writeln!(
            s,
            "link {}: {} of its {} budget is not needed",
            l.name,
            fmt_rate(l.spare_bps as f64),
            fmt_rate(l.budget_bps as f64)
        );
    }
    s
}

/// Rows as left-aligned columns, two spaces apart.
pub(super) fn table(s: &mut String, rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let width: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|x| x.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = width[c]);
            }
        }
        let _ = writeln!(s, "{}", line.trim_end());
    }
}
