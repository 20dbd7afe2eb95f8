//! `faultline evacuate --plan FILE`: the orchestrator. Connects to every VM's source
//! (`faultline replicate --control`), plans with the stale bytes and dirty rates they
//! measure, starts their evacuations in the planned order and concurrency per link,
//! re-plans every second from their progress, and reports per VM the plan against what
//! happened (docs/fleet.md). A source that does not answer, or dies mid-evacuation, is
//! reported failed; the others go on.

mod hearing;
mod metrics;
mod plan_file;
mod report;
mod source_link;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Args, ValueEnum};
use fleet::control::{EvacState, Status};
use fleet::orchestrate::{Change, Orchestration, StallChange, StatusChange};
use fleet::plan::Policy;
use serde_json::json;
use tokio::sync::mpsc;

use super::roles::emit_event;
pub use hearing::live_plan;
use hearing::{hear, Hearing};
use source_link::{Command, RateNews, Report as LinkReport, Timeouts};

#[derive(Args, Debug)]
pub struct EvacuateArgs {
    /// The plan file (docs/fleet.md): the fleet, the deadline, each VM's `control`
    /// address, the orchestrator's `cert` and `key`, the sources' `peer_cert`.
    #[arg(long)]
    pub plan: PathBuf,
    /// Seconds a source's control endpoint has to answer at the start; a source that does
    /// not is reported and left out (if none answers, nothing starts).
    #[arg(long, default_value = "3", value_name = "SECS", value_parser = parse_secs)]
    pub connect_timeout: Duration,
    /// Seconds without an event from an evacuating source before it counts as failed; a
    /// rate limit it has not confirmed within them is asked again.
    #[arg(long, default_value = "5", value_name = "SECS", value_parser = parse_secs)]
    pub silence_timeout: Duration,
    /// Seconds (at least 3) an evacuating VM whose source still reports may go without
    /// moving (no switchover, no fewer bytes left, or, where those say nothing, less than
    /// 128 KiB sent) before it is reported stalled: it then gives its place on its link to
    /// the VMs behind it until it moves again (of VMs that stop together, while another
    /// waits to start on their link, enough are stalled to free one place, and the VM
    /// started in it tells: if it moves, the others are stalled too; if not, they are taken
    /// for a link outage and left in place). Past the deadline, once nothing under way has
    /// moved for this long, the evacuation ends, reporting what did not finish.
    #[arg(long, default_value = "10", value_name = "SECS", value_parser = parse_stall_secs)]
    pub stall_timeout: Duration,
    /// Write one JSON event line per state change to stderr, prefixed `@faultline `
    /// (the default when stderr is not a terminal; on a terminal, progress bars).
    #[arg(long)]
    pub progress: bool,
    /// Print the final report as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also write the run as a Gantt chart (SVG) to this file: each VM's measured
    /// start, switchover and finish (or failure), drawn over the plan it started with.
    #[arg(long, value_name = "OUT.svg")]
    pub gantt: Option<PathBuf>,
    /// Serve Prometheus metrics of the evacuation at http://ADDR/metrics (per VM: phase,
    /// predicted finish, bytes sent, saved; per link: the measured rate). Off by default;
    /// port 0: any, logged. See docs/operations.md#metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Which schedule to follow: the planner's, or a baseline to compare it with (every VM
    /// at once; one at a time per link, smallest stale bytes first).
    #[arg(long, value_enum, default_value_t = ScheduleArg::Planner)]
    pub schedule: ScheduleArg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ScheduleArg {
    Planner,
    AllAtOnce,
    SmallestFirst,
}

impl From<ScheduleArg> for Policy {
    fn from(s: ScheduleArg) -> Policy {
        match s {
            ScheduleArg::Planner => Policy::Planner,
            ScheduleArg::AllAtOnce => Policy::AllAtOnce,
            ScheduleArg::SmallestFirst => Policy::SmallestFirst,
        }
    }
}

pub fn run(a: EvacuateArgs) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&a.plan)
        .with_context(|| format!("reading the plan file {}", a.plan.display()))?;
    let read_at = Instant::now();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_secs_f64();
    let pf = fleet::file::parse(&text, now).with_context(|| a.plan.display().to_string())?;
    let setup = plan_file::resolve(&pf, &a.plan).with_context(|| a.plan.display().to_string())?;
    let events = Events::new(a.progress || !std::io::stderr().is_terminal());
    let timeouts = Timeouts {
        connect: a.connect_timeout,
        silence: a.silence_timeout,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let policy = Policy::from(a.schedule);
    let metrics = a
        .metrics_listen
        .map(metrics::EvacuateMetrics::start)
        .transpose()?;
    let (report, first_plan) = runtime.block_on(orchestrate(
        pf,
        setup,
        read_at,
        RunSettings {
            timeouts,
            stall_after: a.stall_timeout,
            policy,
        },
        &events,
        metrics.as_ref(),
    ))?;
    let ok = report.totals.failed == 0 && report.totals.not_finished == 0;
    if let Some(out) = &a.gantt {
        report::write_gantt(&a.plan, &report, &first_plan, out)?;
    }
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        v["file"] = json!(a.plan.display().to_string());
        if let Some(out) = &a.gantt {
            v["gantt"] = json!(out.display().to_string());
        }
        v["schedule"] = json!(policy);
        v["ok"] = json!(ok);
        if !ok {
            v["error"] = json!({ "message": report::failures(&report) });
        }
        println!("{v}");
    } else {
        print!("{}", report::render(&a.plan.display().to_string(), &report));
    }
    if !ok {
        eprintln!("faultline: error: {}", report::failures(&report));
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// Where state changes go: JSON event lines, or (on a terminal) progress bars.
struct Events {
    lines: bool,
}

impl Events {
    fn new(lines: bool) -> Events {
        Events { lines }
    }

    fn emit(&self, v: serde_json::Value) {
        if self.lines {
            emit_event(v);
        }
    }
}

/// How a run goes, from the command line.
struct RunSettings {
    timeouts: Timeouts,
    /// Without moving, before a VM is stalled (`Orchestration::set_stall_after`).
    stall_after: Duration,
    policy: Policy,
}

async fn orchestrate(
    pf: fleet::file::PlanFile,
    setup: plan_file::Setup,
    read_at: Instant,
    run: RunSettings,
    events: &Events,
    metrics: Option<&metrics::EvacuateMetrics>,
) -> anyhow::Result<(fleet::orchestrate::Report, fleet::plan::Plan)> {
    let RunSettings {
        timeouts,
        stall_after,
        policy,
    } = run;
    let hearing = hear(&pf.fleet, &setup, timeouts).await?;
    for (i, why) in &hearing.unreachable {
        let name = &hearing.fleet.vms[*i].name;
        events.emit(json!({"event": "unreachable", "vm": name, "error": why}));
        eprintln!("faultline: vm {name:?}: {why}");
    }
    hearing.check_any_answered()?;
    let Hearing {
        fleet,
        first,
        unreachable,
        starts,
        mut rx,
        endpoints,
        ..
    } = hearing;
    let n = fleet.vms.len();
    // Times from here; the deadline was taken when the file was read.
    let t0 = Instant::now();
    let mut opts = pf.options.clone();
    opts.deadline_s -= t0.duration_since(read_at).as_secs_f64();
    let mut o = Orchestration::with_policy(fleet, opts, &unreachable, policy)?;
    o.set_stall_after(stall_after.as_secs_f64());
    events.emit(json!({
        "event": "planned",
        "schedule": policy,
        "deadline_s": o.plan().deadline_s,
        "vms": o.plan().vms.iter().map(|v| json!({
            "vm": v.name, "order": v.order, "start_s": v.start_s,
            "finish_s": v.finish_s, "status": v.status,
        })).collect::<Vec<_>>(),
    }));
    for (i, s) in first.iter().enumerate() {
        if let Some(s) = s {
            events.emit(json!({
                "event": "connected", "vm": o.fleet().vms[i].name,
                "stale_bytes": s.stale_bytes, "dirty_rate_bps": s.dirty_rate_bps,
                "stale_growth_bps": s.stale_growth_bps,
                "memory_bytes": s.memory_bytes, "disk_bytes": s.disk_bytes,
                "wire_ratio": s.planning_wire_ratio(),
            }));
        }
    }
    // A source that started by itself before or while it was heard: its last status is
    // its first event (under way: followed; over: recorded).
    for (i, s) in first.iter().enumerate() {
        if let Some(s) = s.as_ref().filter(|s| s.evacuation != EvacState::Idle) {
            handle(
                &mut o,
                LinkReport::Status(i, s.clone()),
                0.0,
                events,
                &starts,
            );
        }
    }
    let bars = if events.lines {
        None
    } else {
        Some(report::Bars::new(&o))
    };

    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The rate limit each source was last told (see `Orchestration::rate_caps`).
    let mut caps_sent: Vec<Option<u64>> = vec![None; n];
    let mut replan_error: Option<String> = None;
    loop {
        // What the links reported meanwhile first: a VM whose link failed is marked so
        // with its own reason, not found gone when it is due.
        while let Ok(msg) = rx.try_recv() {
            handle(&mut o, msg, t0.elapsed().as_secs_f64(), events, &starts);
        }
        let now = t0.elapsed().as_secs_f64();
        report_stalls(&mut o, now, events);
        if o.is_finished() {
            break;
        }
        if o.is_stuck_past_deadline(now) {
            tracing::warn!("past the deadline, nothing under way has moved: ending");
            break;
        }
        for i in o.due(now) {
            o.started(i, now);
            let cap = o.rate_caps(now)[i];
            let start = Command::Start { rate_cap_bps: cap };
            let sent = starts[i]
                .as_ref()
                .is_some_and(|s| s.try_send(start).is_ok());
            if !sent {
                fail(&mut o, i, now, "its control link is gone".into(), events);
                continue;
            }
            caps_sent[i] = cap;
            let planned = o.first_plan().vms[i].start_s;
            events.emit(json!({
                "event": "started", "vm": o.fleet().vms[i].name, "t_s": now,
                "planned_start_s": planned, "rate_cap_bps": cap,
            }));
        }
        share_links(&o, &mut caps_sent, &starts, now, events);
        // Once per turn, after the starts and the last event's changes, before waiting.
        if let Some(m) = metrics {
            m.update(&o, t0.elapsed().as_secs_f64());
        }
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else {
                    // Every link ended: whatever did not finish has failed.
                    for i in 0..n {
                        if !o.phase(i).is_final() {
                            fail(&mut o, i, now, "its control link ended".into(), events);
                        }
                    }
                    break;
                };
                handle(&mut o, msg, t0.elapsed().as_secs_f64(), events, &starts);
            }
            _ = tick.tick() => {
                // A re-plan refused (a figure a source reported that the model cannot
                // take) leaves the last plan in force: the evacuation goes on. Logged
                // once per distinct error, not every second.
                match o.replan(t0.elapsed().as_secs_f64()) {
                    Ok(()) => replan_error = None,
                    Err(e) => {
                        let e = e.to_string();
                        if replan_error.as_ref() != Some(&e) {
                            tracing::warn!("re-planning: {e}; the last plan stands");
                            replan_error = Some(e);
                        }
                    }
                }
            }
            // A prestart the plan foresees between events, or a hand-off to a held VM:
            // on time, not at the next event or tick.
            _ = sleep_until_s(t0, {
                let now = t0.elapsed().as_secs_f64();
                [o.next_due_s(now), o.next_handoff_s(now)].into_iter().flatten().reduce(f64::min)
            }) => {}
        }
        if let Some(b) = &bars {
            b.update(&o);
        }
    }
    if let Some(m) = metrics {
        m.update(&o, t0.elapsed().as_secs_f64());
    }
    if let Some(b) = bars {
        b.finish(&o);
    }
    let r = o.report_ended(t0.elapsed().as_secs_f64());
    events.emit(json!({"event": "finished", "totals": r.totals}));
    // Links still open (VMs stalled or not finished when it ended) are closed, and their
    // closes let out, so that their sources hear of it now.
    for e in &endpoints {
        e.close(0u32.into(), b"the orchestrator ended");
    }
    hearing::let_closes_leave(endpoints).await;
    Ok((r, o.first_plan().clone()))
}

/// A number of seconds for a timeout: more than 0, at most a day.
pub(super) fn parse_secs(s: &str) -> Result<Duration, String> {
    s.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| *v > 0.0 && *v <= 86_400.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{s:?} is not a number of seconds between 0 and 86400"))
}

/// A stall timeout: [`parse_secs`], at least `fleet::orchestrate::MIN_STALL_AFTER_S`.
fn parse_stall_secs(s: &str) -> Result<Duration, String> {
    let d = parse_secs(s)?;
    if d.as_secs_f64() < fleet::orchestrate::MIN_STALL_AFTER_S {
        return Err(format!(
            "{s:?} is shorter than {} s: progress is reported every 250 ms and dated up to 1 s \
             back, so VMs that move would be found stalled",
            fleet::orchestrate::MIN_STALL_AFTER_S
        ));
    }
    Ok(d)
}

/// Sleeps until `at_s` seconds after `t0` (at once if that has passed); forever for `None`
/// or a time no clock reaches (the sources' figures it was computed from may be absurd).
async fn sleep_until_s(t0: Instant, at_s: Option<f64>) {
    let at = at_s
        .and_then(|s| Duration::try_from_secs_f64(s.max(0.0)).ok())
        .and_then(|d| t0.checked_add(d));
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Reports the VMs that stalled or moved again by `now` (`Orchestration::stalls`).
fn report_stalls(o: &mut Orchestration, now: f64, events: &Events) {
    for change in o.stalls(now) {
        match change {
            StallChange::Stalled {
                vm,
                since_s,
                remaining_bytes,
            } => {
                let name = &o.fleet().vms[vm].name;
                tracing::warn!(
                    vm = %name,
                    "no progress for {:.1} s with {remaining_bytes} bytes left: stalled, \
                     its link goes to the VMs behind it",
                    now - since_s
                );
                events.emit(json!({
                    "event": "stalled", "vm": name, "t_s": now, "since_s": since_s,
                    "remaining_bytes": remaining_bytes,
                }));
            }
            StallChange::Moving { vm, stalled_for_s } => {
                let name = &o.fleet().vms[vm].name;
                tracing::info!(vm = %name, "moving again after {stalled_for_s:.1} s stalled");
                events.emit(json!({
                    "event": "moving", "vm": name, "t_s": now, "stalled_for_s": stalled_for_s,
                }));
            }
        }
    }
}

/// Tells every source under way whose rate limit the plan's sharing changed its new one.
fn share_links(
    o: &Orchestration,
    caps_sent: &mut [Option<u64>],
    links: &[Option<mpsc::Sender<Command>>],
    now: f64,
    events: &Events,
) {
    for (i, cap) in o.rate_caps(now).into_iter().enumerate() {
        if !o.phase(i).is_under_way() || cap == caps_sent[i] {
            continue;
        }
        let Some(tx) = &links[i] else { continue };
        // A full queue is tried again next turn.
        if tx.try_send(Command::SetRate(cap)).is_ok() {
            caps_sent[i] = cap;
            events.emit(json!({
                "event": "rate", "vm": o.fleet().vms[i].name, "t_s": now,
                "rate_cap_bps": cap,
            }));
        }
    }
}

fn handle(
    o: &mut Orchestration,
    msg: LinkReport,
    now: f64,
    events: &Events,
    starts: &[Option<mpsc::Sender<Command>>],
) {
    match msg {
        LinkReport::Status(i, s) => match o.hear_status(i, &s, now) {
            StatusChange::Nothing => {}
            // Over already (started by someone else: SIGUSR1, its timer; or started by us
            // while this status was on its way): taken as its last event. Its link hangs
            // up, so a start sent meanwhile is never answered.
            StatusChange::Over { started, change } => {
                if started {
                    started_by_source(o, i, now, events);
                }
                tell(o, i, &s, now, change, events);
            }
            // Started by someone else and under way: follow it now.
            StatusChange::UnderWayElsewhere => {
                if let Some(tx) = &starts[i] {
                    if tx.try_send(Command::Start { rate_cap_bps: None }).is_ok() {
                        o.started(i, now);
                        started_by_source(o, i, now, events);
                    }
                }
            }
        },
        LinkReport::Event(i, s) => {
            let change = o.hear_event(i, &s, now);
            tell(o, i, &s, now, change, events);
        }
        LinkReport::Unreachable(i, why) | LinkReport::Failed(i, why) => {
            fail(o, i, now, why, events)
        }
        LinkReport::Rate(i, news) => {
            let vm = &o.fleet().vms[i].name;
            events.emit(match news {
                RateNews::Unconfirmed {
                    rate_cap_bps,
                    error,
                } => json!({
                    "event": "rate_unconfirmed", "vm": vm, "t_s": now,
                    "rate_cap_bps": rate_cap_bps, "error": error,
                }),
                RateNews::Set { rate_cap_bps, asks } => json!({
                    "event": "rate_set", "vm": vm, "t_s": now,
                    "rate_cap_bps": rate_cap_bps, "asks": asks,
                }),
            });
        }
    }
}

/// The event line of a VM its source started.
fn started_by_source(o: &Orchestration, i: usize, now: f64, events: &Events) {
    events.emit(json!({
        "event": "started", "vm": o.fleet().vms[i].name, "t_s": now, "by": "the source",
    }));
}

/// The event line of what source `i`'s report `s` changed.
fn tell(o: &Orchestration, i: usize, s: &Status, now: f64, change: Change, events: &Events) {
    let name = &o.fleet().vms[i].name;
    match change {
        Change::Nothing => {}
        Change::Switchover => events.emit(json!({
            "event": "switchover", "vm": name, "t_s": now, "stale_bytes": s.stale_bytes,
        })),
        Change::Done => events.emit(json!({
            "event": "done", "vm": name, "t_s": now,
            "bytes_sent": s.bytes_sent, "pages_stale": s.pages_stale,
            "wire_ratio": s.wire_ratio(),
        })),
        Change::Failed(why) => failed_line(o, i, now, &why, events),
    }
}

/// The event line of VM `i` failed.
fn failed_line(o: &Orchestration, i: usize, now: f64, why: &str, events: &Events) {
    let name = &o.fleet().vms[i].name;
    events.emit(json!({"event": "failed", "vm": name, "t_s": now, "error": why}));
}

fn fail(o: &mut Orchestration, i: usize, now: f64, why: String, events: &Events) {
    if o.phase(i).is_final() {
        return;
    }
    // Where a link's text (it may quote the source) reaches the operator: cleaned as the
    // report keeps it, so that the event and the report say the same.
    let why = fleet::control::clean_text(&why);
    failed_line(o, i, now, &why, events);
    o.failed(i, now, why);
}

/// Two idle VMs of `memory_bytes` on one 1 Gbit/s link (one flow fills it), planned by the
/// planner against a deadline `deadline_s` away.
#[cfg(test)]
fn two_vms_on_one_link(memory_bytes: u64, deadline_s: f64) -> Orchestration {
    let link = fleet::Link {
        name: "wan".into(),
        rate_bps: 1_000_000_000,
        rtt: Duration::from_millis(10),
        shared_rate_bps: None,
        per_flow_window_bytes: 1 << 30,
        replication_budget_bps: None,
    };
    let vms = (0..2)
        .map(|i| fleet::Vm::idle(format!("vm{i}"), 0, memory_bytes))
        .collect();
    let f = fleet::Fleet::new(vec![link], vms, fleet::Costs::default()).unwrap();
    let opts = fleet::plan::PlanOptions::new(deadline_s);
    Orchestration::with_policy(f, opts, &[], Policy::Planner).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet::orchestrate::Phase;

    /// Two VMs of 1 MiB on one link, planned one after the other.
    fn orchestration() -> Orchestration {
        super::two_vms_on_one_link(1 << 20, 600.0)
    }

    fn status(evacuation: EvacState) -> Status {
        let mut s = super::super::replica::idle_status_of("vm1", 1 << 20);
        s.evacuation = evacuation;
        s.bytes_sent = 5000;
        s.pages_stale = Some(3);
        s.error = (evacuation == EvacState::Failed).then(|| "its standby went away".into());
        s
    }

    #[test]
    fn a_status_that_says_over_is_taken_as_the_last_event() {
        let events = Events::new(false);
        let starts = vec![None, None];
        let hear = |o: &mut Orchestration, evacuation: EvacState, now: f64| {
            handle(
                o,
                LinkReport::Status(1, status(evacuation)),
                now,
                &events,
                &starts,
            );
            o.phase(1)
        };
        // Waiting, evacuated by its own source between two status requests: done.
        assert_eq!(
            hear(&mut orchestration(), EvacState::Done, 2.0),
            Phase::Done
        );
        // Failed on its own: failed, with its reason.
        let mut o = orchestration();
        assert_eq!(hear(&mut o, EvacState::Failed, 2.0), Phase::Failed);
        let r = o.report();
        assert_eq!(r.vms[1].error.as_deref(), Some("its standby went away"));
        // Started by us while that status was on its way: done too, not left starting.
        let mut o = orchestration();
        o.started(1, 1.0);
        assert_eq!(hear(&mut o, EvacState::Done, 2.0), Phase::Done);
        // Once final, a later status changes nothing.
        assert_eq!(hear(&mut o, EvacState::Failed, 3.0), Phase::Done);
        // A link's failure quoting the source (its close's reason) is cleaned where it
        // reaches the operator.
        let mut o = orchestration();
        o.started(1, 1.0);
        let why = "closed by peer: \x1b[2Jbye".to_string();
        handle(&mut o, LinkReport::Failed(1, why), 2.0, &events, &starts);
        assert_eq!(
            o.report().vms[1].error.as_deref(),
            Some("closed by peer: \\u{1b}[2Jbye")
        );
    }

    #[test]
    fn timeouts_are_positive_seconds() {
        assert_eq!(parse_secs("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_secs(" 0.5 "), Ok(Duration::from_millis(500)));
        for bad in ["0", "-1", "NaN", "inf", "1e9", "3s", ""] {
            let e = parse_secs(bad).unwrap_err();
            assert!(e.contains("between 0 and 86400"), "{bad}: {e}");
        }
        assert_eq!(parse_stall_secs("3"), Ok(Duration::from_secs(3)));
        let e = parse_stall_secs("2.5").unwrap_err();
        assert!(e.contains("shorter than 3 s"), "{e}");
        assert!(parse_stall_secs("0").is_err());
    }
}
