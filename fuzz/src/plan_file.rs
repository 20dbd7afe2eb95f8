//! Target `plan_file`: the plan file (`fleet::file`), what `faultline plan` and `faultline
//! evacuate` read from an operator, and everything `faultline plan` does with a file it
//! accepted: the planner (with its baselines), the JSON report and the Gantt chart.
//!
//! Checks: no input panics; an accepted file gives a plan with every VM of the fleet once,
//! in fleet order, whose times are finite and in order (start, switchover, finish) and
//! whose schedule the simulator accepts; its report serializes; its chart renders.

use fleet::chart::{render_svg, ChartOptions, Timeline};
use fleet::file::parse;

/// The time the deadline is taken against: 2026-12-07T00:00:00Z, fixed so that a found
/// input replays the same way.
pub(crate) const NOW_UNIX_S: f64 = 1_796_601_600.0;

/// The target: `data` as the text of a plan file.
pub fn plan_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(pf) = parse(text, NOW_UNIX_S) else {
        return;
    };
    let plan = fleet::plan::plan(&pf.fleet, &pf.options);
    assert_eq!(
        plan.vms.len(),
        pf.fleet.vms.len(),
        "a VM missing from the plan"
    );
    for (v, p) in pf.fleet.vms.iter().zip(&plan.vms) {
        assert_eq!(v.name, p.name, "the plan's VMs out of fleet order");
        let times = [p.start_s, p.switchover_s, p.finish_s];
        for t in times.into_iter().flatten() {
            assert!(t.is_finite() && t >= 0.0, "vm {:?}: a time of {t}", p.name);
        }
        if let [Some(a), Some(b), Some(c)] = times {
            assert!(
                a <= b && b <= c,
                "vm {:?}: {a} / {b} / {c} out of order",
                p.name
            );
        }
    }
    if let Err(e) = plan.schedule.check(&pf.fleet) {
        panic!("the planner's schedule is refused by the simulator: {e}");
    }
    if let Err(e) = serde_json::to_string(&plan) {
        panic!("the plan's report does not serialize: {e}");
    }
    let timeline = Timeline::from_plan(&plan, "fuzz");
    if let Err(e) = render_svg(&timeline, &ChartOptions::default()) {
        panic!("the plan's chart does not render: {e}");
    }
}

/// The example plan file of docs/examples, and small files that reach each part of the
/// format: an absolute deadline, shared rates and flow caps, encodings, control entries,
/// VMs pinned first and skipped, a deadline already binding. Target `orchestrate` runs
/// fleets of them too.
pub(crate) const PLAN_FILES: [&str; 4] = [
    include_str!("../../docs/examples/fleet.toml"),
    FOUR_ON_ONE_LINK,
    RICH,
    CONTROL,
];

const FOUR_ON_ONE_LINK: &str = r#"deadline = "30s"
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
"#;

const RICH: &str = r#"deadline = 2026-12-07T00:05:00Z
margin = 0.2
first = ["b"]
skip = ["c"]
[costs]
handshake_rtts = 2
switchover_ms = 10
wire_overhead = 0.05
finish_ms = 20
[[link]]
name = "l1"
rate_bps = "1G"
shared_rate_bps = "900M"
rtt_ms = 50
window_bytes = "7.8M"
replication_budget_bps = "100M"
[[link]]
name = "l2"
rate_bps = 40000000
rtt_ms = 5
[[vm]]
name = "a"
link = "l1"
memory_bytes = "512M"
disk_bytes = "8G"
stale_bytes = "64M"
dirty_rate_bps = "20M"
working_set_bytes = "256M"
replication_budget_bps = "10M"
priority = 3
max_rate_bps = "300M"
wire_ratio = 0.4
[[vm]]
name = "b"
link = "l2"
memory_bytes = "256M"
stale_bytes = "200M"
priority = 1
[[vm]]
name = "c"
link = "l1"
memory_bytes = "1G"
stale_bytes = "1G"
"#;

const CONTROL: &str = r#"deadline = "30s"
cert = "orch.pem"
key = "orch.key"
peer_cert = "src.pem"
[[link]]
name = "wan"
rate_bps = "10M"
rtt_ms = 100
[[vm]]
name = "web"
link = "wan"
memory_bytes = "4G"
stale_bytes = "2G"
control = "127.0.0.1:7000"
[[vm]]
name = "db"
link = "wan"
memory_bytes = "8G"
stale_bytes = "1M"
control = "[::1]:7001"
peer_cert = "db.pem"
"#;

/// [`PLAN_FILES`].
pub fn seeds() -> Vec<Vec<u8>> {
    PLAN_FILES.iter().map(|s| s.as_bytes().to_vec()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seed_is_a_plan_file_the_planner_takes() {
        for (i, s) in seeds().iter().enumerate() {
            let text = std::str::from_utf8(s).unwrap();
            if let Err(e) = parse(text, NOW_UNIX_S) {
                panic!("seed {i} is refused: {e}");
            }
            plan_file(s);
        }
    }
}
