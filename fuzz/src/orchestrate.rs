//! Target `orchestrate`: the orchestrator's state machine (`fleet::orchestrate`), fed what
//! `faultline evacuate` feeds it from the network. A plan file's fleet takes each source's
//! first status (`Status::apply_to`), then the orchestrator hears statuses and events
//! (setting up, transferring, done, failed) dated back by the ages the sources state, and
//! takes its turns (stalls, starts, rate limits, re-plans) as time goes on.
//!
//! Checks: no input panics; a VM done, failed or skipped stays so; only waiting VMs are
//! due to start, and one started is under way; every rate limit is above 0; the report
//! serializes, with every VM of the fleet once.

use fleet::control::{EvacState, ReplState, Status, PAGE_BYTES};
use fleet::orchestrate::{Orchestration, Phase};
use fleet::plan::Policy;

use crate::input::Input;

/// The time plan files' deadlines are taken against (as in target `plan_file`).
const NOW_UNIX_S: f64 = 1_796_601_600.0;

/// The fleets the input chooses from: plan files of one to twelve VMs.
fn fleets() -> [&'static str; 3] {
    [
        include_str!("../../docs/examples/fleet.toml"),
        r#"deadline = "30s"
[[link]]
name = "wan"
rate_bps = "100M"
rtt_ms = 20
[[vm]]
name = "a"
link = "wan"
memory_bytes = "256M"
stale_bytes = "20M"
[[vm]]
name = "b"
link = "wan"
memory_bytes = "1G"
stale_bytes = "400M"
[[vm]]
name = "c"
link = "wan"
memory_bytes = "512M"
stale_bytes = "50M"
max_rate_bps = "20M"
[[vm]]
name = "d"
link = "wan"
memory_bytes = "256M"
stale_bytes = "90M"
wire_ratio = 0.5
"#,
        r#"deadline = "2m"
first = ["b"]
skip = ["c"]
[[link]]
name = "l1"
rate_bps = "1G"
shared_rate_bps = "900M"
rtt_ms = 50
window_bytes = "7.8M"
[[link]]
name = "l2"
rate_bps = "40M"
rtt_ms = 5
[[vm]]
name = "a"
link = "l1"
memory_bytes = "512M"
stale_bytes = "64M"
dirty_rate_bps = "20M"
working_set_bytes = "256M"
[[vm]]
name = "b"
link = "l2"
memory_bytes = "256M"
stale_bytes = "200M"
[[vm]]
name = "c"
link = "l1"
memory_bytes = "1G"
stale_bytes = "1G"
"#,
    ]
}

/// A number as a source might send it: small, middling or any.
fn figure(inp: &mut Input<'_>) -> u64 {
    match inp.below(4) {
        0 => u64::from(inp.u16()),
        1 => u64::from(inp.u32()) << 8,
        2 => inp.u64(),
        _ => 0,
    }
}

fn maybe(inp: &mut Input<'_>) -> Option<u64> {
    inp.bool().then(|| figure(inp))
}

/// A status from the input, as a source's control endpoint could send it.
fn status(inp: &mut Input<'_>, name: &str) -> Status {
    Status {
        vm_id: name.into(),
        memory_bytes: figure(inp),
        stale_bytes: figure(inp),
        dirty_rate_bps: figure(inp),
        stale_growth_bps: maybe(inp),
        replication: ReplState::Running,
        evacuation: match inp.below(5) {
            0 => EvacState::Idle,
            1 => EvacState::Starting,
            2 => EvacState::Transferring,
            3 => EvacState::Done,
            _ => EvacState::Failed,
        },
        bytes_sent: figure(inp),
        pages_remaining: maybe(inp),
        progress_age_ms: maybe(inp),
        progress_measured: None,
        pages_stale: maybe(inp),
        error: None,
        pages_pushed: maybe(inp),
        wire_bytes_pushed: maybe(inp),
        pages_sampled: maybe(inp),
        wire_bytes_sampled: maybe(inp),
        disk_bytes: maybe(inp),
        own_rate_cap_bps: maybe(inp),
    }
}

/// The target.
pub fn orchestrate(data: &[u8]) {
    let mut inp = Input::new(data);
    let texts = fleets();
    let text = texts[inp.below(texts.len() as u64) as usize];
    let Ok(pf) = fleet::file::parse(text, NOW_UNIX_S) else {
        panic!("a built-in plan file is refused");
    };
    let mut fleet = pf.fleet;
    let n = fleet.vms.len();
    // Each source's first status, or none (it did not answer).
    let mut unreachable = Vec::new();
    for (i, v) in fleet.vms.iter_mut().enumerate() {
        if inp.below(8) == 0 {
            unreachable.push((i, "did not answer".to_string()));
        } else {
            status(&mut inp, &v.name.clone()).apply_to(v);
        }
    }
    let policy = match inp.below(3) {
        0 => Policy::Planner,
        1 => Policy::AllAtOnce,
        _ => Policy::SmallestFirst,
    };
    let Ok(mut o) = Orchestration::with_policy(fleet, pf.options, &unreachable, policy) else {
        return;
    };
    let mut now = 0.0f64;
    let mut ops = 0;
    while !inp.is_empty() && ops < 400 {
        ops += 1;
        let before: Vec<Phase> = (0..n).map(|i| o.phase(i)).collect();
        let vm = inp.below(n as u64) as usize;
        match inp.below(8) {
            // Time goes on: mostly a fraction of a second, now and then minutes.
            0 | 1 => {
                now += match inp.below(8) {
                    0 => f64::from(inp.u16()),
                    _ => f64::from(inp.u16()) / 1000.0,
                }
            }
            // A turn of the orchestrator's loop.
            2 => {
                let _ = o.stalls(now);
                for i in o.due(now) {
                    assert_eq!(o.phase(i), Phase::Waiting, "vm {i} due but not waiting");
                    o.started(i, now);
                    assert!(
                        o.phase(i).is_under_way(),
                        "vm {i} started but not under way"
                    );
                }
                for cap in o.rate_caps(now).into_iter().flatten() {
                    assert!(cap > 0, "a rate limit of 0");
                }
                let _ = o.next_due_s(now);
                let _ = o.next_handoff_s(now);
                let _ = o.replan(now);
            }
            // What a source says, as `faultline evacuate` takes it.
            _ => {
                let s = status(&mut inp, &o.fleet().vms[vm].name.clone());
                if let Some(r) = s.planning_wire_ratio() {
                    o.set_wire_ratio(vm, r);
                }
                let measured = now - s.progress_age_s();
                match s.evacuation {
                    EvacState::Idle => o.waiting(vm, s.stale_bytes),
                    EvacState::Starting => o.setting_up(vm, measured, s.bytes_sent),
                    EvacState::Transferring => {
                        let left = s.pages_remaining.map(|p| p.saturating_mul(PAGE_BYTES));
                        o.progress(vm, measured, left, s.bytes_sent);
                    }
                    EvacState::Done => o.done(vm, now, s.bytes_sent, s.pages_stale),
                    EvacState::Failed => o.failed(vm, now, "failed".into()),
                }
            }
        }
        for (i, was) in before.into_iter().enumerate() {
            if was.is_final() {
                assert_eq!(o.phase(i), was, "vm {i} left {was:?}");
            }
        }
    }
    let report = o.report_ended(now);
    match serde_json::to_value(&report) {
        Ok(v) => {
            let vms = v["vms"].as_array().map_or(0, Vec::len);
            assert_eq!(vms, n, "the report holds {vms} of {n} VMs");
        }
        Err(e) => panic!("the report does not serialize: {e}"),
    }
}

/// Inputs that run each fleet through starts, transfers and ends.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for fleet in 0u8..3 {
        let mut s = vec![fleet];
        // First statuses: small figures.
        for _ in 0..12 {
            s.extend_from_slice(&[1, 0, 0, 0, 0]);
        }
        s.push(0);
        // Turns, time, and statuses of every kind for every VM.
        for step in 0u8..60 {
            s.extend_from_slice(&[step % 12, 2, step % 12, 1, 0x40, 0x02]);
            s.extend_from_slice(&[step % 12, 3, 0, 0x10, 0x27, step % 5, 0, 0x20]);
        }
        seeds.push(s);
    }
    seeds
}
