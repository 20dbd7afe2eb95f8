//! The charts: their geometry exactly, the conversions from plans, simulations and runs,
//! and the SVG itself, parsed as XML.

use proptest::prelude::*;

use super::draw::bar_band;
use super::layout::{
    axis, fit, quotas, row_height, select, tick_label, tick_step, time_range, Layout, TimeScale,
    MAX_ROW_PX, MIN_ROW_PX,
};
use super::*;
use crate::plan::{one_at_a_time_smallest_first, plan};
use crate::sim::{simulate, SimOptions};

const EXAMPLE: &str = include_str!("../../../docs/examples/fleet.toml");
const FLOW_FILL: &str = "#0072B2";
const SETUP_FILL: &str = "#E69F00";
const MISS_FILL: &str = "#C01B1B";
const MISS_BG: &str = "#FDE4E1";
const DEADLINE_STROKE: &str = "#D62728";
const TEXT_FILL: &str = "#222222";

fn example_plan() -> Plan {
    let pf = crate::file::parse(EXAMPLE, 1.8e9).unwrap();
    plan(&pf.fleet, &pf.options)
}

fn bar(start_s: f64, end_s: f64, kind: BarKind) -> Bar {
    Bar {
        start_s,
        end_s,
        kind,
        basis: Basis::Planned,
    }
}

fn row(vm: &str, link: &str, verdict: Verdict, bars: Vec<Bar>) -> Row {
    Row {
        vm: vm.into(),
        link: link.into(),
        priority: 1.0,
        verdict,
        bars,
        note: None,
    }
}

fn timeline(rows: Vec<Row>, deadline_s: Option<f64>) -> Timeline {
    Timeline {
        title: "test".into(),
        deadline_s,
        now_s: None,
        rows,
    }
}

/// `n` VMs on `links` links, each a setup then a flow, starting one second apart, the
/// ones from `late` on past a deadline of `n` seconds.
fn many(n: usize, links: usize, late: usize) -> Timeline {
    let rows = (0..n)
        .map(|i| {
            let s = i as f64;
            let verdict = if i >= late {
                Verdict::Misses
            } else {
                Verdict::Saved
            };
            row(
                &format!("vm-{i:04}"),
                &format!("link-{}", i % links),
                verdict,
                vec![
                    bar(s, s + 0.5, BarKind::Setup),
                    bar(s + 0.5, s + 10.0, BarKind::Flow),
                ],
            )
        })
        .collect();
    timeline(rows, Some(n as f64))
}

fn render(t: &Timeline) -> String {
    render_svg(t, &ChartOptions::default()).unwrap()
}

/// A drawn element, as parsed back from the SVG.
#[derive(Clone, Debug)]
struct El {
    tag: String,
    attrs: Vec<(String, String)>,
    text: String,
}

impl El {
    fn get(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn num(&self, name: &str) -> f64 {
        self.get(name)
            .unwrap_or_else(|| panic!("no {name} in {self:?}"))
            .parse()
            .unwrap()
    }
}

/// Parses `svg` as XML (panicking if it is not) and lists its elements.
fn elements(svg: &str) -> Vec<El> {
    let doc = roxmltree::Document::parse(svg).unwrap_or_else(|e| panic!("not XML: {e}"));
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg");
    root.descendants()
        .filter(|n| n.is_element())
        .map(|n| El {
            tag: n.tag_name().name().to_string(),
            attrs: n
                .attributes()
                .map(|a| (a.name().to_string(), a.value().to_string()))
                .collect(),
            text: n.text().unwrap_or("").trim().to_string(),
        })
        .collect()
}

fn texts(els: &[El]) -> Vec<&El> {
    els.iter().filter(|e| e.tag == "text").collect()
}

/// The label of `vm`'s row: the one text that starts with its name, at the labels' x.
fn label<'a>(els: &'a [El], vm: &str) -> &'a El {
    let found: Vec<&El> = texts(els)
        .into_iter()
        .filter(|t| t.num("x") == 18.0)
        .filter(|t| t.text == vm || t.text.starts_with(&format!("{vm} ·")))
        .collect();
    assert_eq!(found.len(), 1, "labels of {vm}: {found:?}");
    found[0]
}

// ---- geometry ----

#[test]
fn the_time_scale_maps_its_ends_exactly_and_is_monotone() {
    let s = TimeScale {
        t0: 0.0,
        t1: 100.0,
        x0: 100,
        x1: 1100,
    };
    assert_eq!(s.x(0.0), 100);
    assert_eq!(s.x(100.0), 1100);
    assert_eq!(s.x(50.0), 600);
    assert_eq!(s.x(25.0), 350);
    // 10 px per second: rounded to the nearest pixel.
    assert_eq!(s.x(0.04), 100);
    assert_eq!(s.x(0.06), 101);
    // Outside the range: at its ends.
    assert_eq!(s.x(-5.0), 100);
    assert_eq!(s.x(1e300), 1100);
    let mut last = i32::MIN;
    for i in 0..=10_000 {
        let x = s.x(-10.0 + i as f64 * 0.0123);
        assert!(x >= last, "not monotone at step {i}");
        last = x;
    }
    // A negative start.
    let s = TimeScale {
        t0: -10.0,
        t1: 30.0,
        x0: 0,
        x1: 400,
    };
    assert_eq!(s.x(0.0), 100);
    assert_eq!(s.x(-10.0), 0);
}

#[test]
fn ticks_fall_on_nice_steps_in_seconds_minutes_and_hours() {
    assert_eq!(tick_step(900.0, 10), 120.0);
    assert_eq!(tick_step(60.0, 10), 10.0);
    assert_eq!(tick_step(1.0, 10), 0.1);
    assert_eq!(tick_step(7200.0, 10), 900.0);
    assert_eq!(tick_step(100_000.0, 10), 10_800.0);
    assert_eq!(tick_step(0.000_01, 10), 0.001);
    assert_eq!(tick_step(30.0 * 86400.0, 10), 5.0 * 86400.0);

    let a = axis(0.0, 900.0);
    assert_eq!(a.step, 120.0);
    assert_eq!(a.ticks.first(), Some(&0.0));
    assert_eq!(a.ticks.last(), Some(&960.0));
    assert_eq!(a.ticks.len(), 9);
    let a = axis(-5.0, 30.0);
    assert_eq!(a.step, 5.0);
    assert_eq!(a.ticks, vec![-5.0, 0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0]);
    for (lo, hi) in [
        (0.0, 1.0),
        (0.0, 0.37),
        (3.0, 93977.0),
        (-1e6, 1e6),
        (0.0, 1e15),
    ] {
        let a = axis(lo, hi);
        assert!(
            a.ticks[0] <= lo && *a.ticks.last().unwrap() >= hi,
            "{lo}..{hi}: {a:?}"
        );
        assert!(a.ticks.len() <= 13, "{lo}..{hi}: {a:?}");
        assert!(a.ticks.windows(2).all(|w| w[1] > w[0]));
    }

    assert_eq!(tick_label(120.0, 120.0), "2 min");
    assert_eq!(tick_label(0.5, 0.5), "0.5 s");
    assert_eq!(tick_label(0.05, 0.05), "0.05 s");
    assert_eq!(tick_label(30.0, 10.0), "30 s");
    assert_eq!(tick_label(-0.0, 1.0), "0 s");
    assert_eq!(tick_label(0.001, 0.001), "0.001 s");
    assert_eq!(tick_label(7200.0, 3600.0), "2 h");
    assert_eq!(tick_label(2.0 * 86400.0, 2.0 * 86400.0), "2 d");
}

#[test]
fn the_time_range_stops_at_one_and_a_half_deadlines_unless_told() {
    let late = timeline(
        vec![row(
            "a",
            "l",
            Verdict::Misses,
            vec![bar(0.0, 94_000.0, BarKind::Flow)],
        )],
        Some(600.0),
    );
    assert_eq!(time_range(&late, None), (0.0, 900.0));
    assert_eq!(time_range(&late, Some(100_000.0)), (0.0, 100_000.0));
    let mut early = late.clone();
    early.rows[0].bars[0].end_s = 500.0;
    assert_eq!(time_range(&early, None), (0.0, 600.0));
    early.rows[0].bars[0].end_s = 700.0;
    assert_eq!(time_range(&early, None), (0.0, 700.0));
    early.deadline_s = None;
    assert_eq!(time_range(&early, None), (0.0, 700.0));
    // Now is always shown; so is a start before 0.
    early.now_s = Some(1000.0);
    early.rows[0].bars[0].start_s = -3.0;
    assert_eq!(time_range(&early, None), (-3.0, 1000.0));
    // Nothing at all: one second.
    assert_eq!(time_range(&timeline(vec![], None), None), (0.0, 1.0));
}

#[test]
fn rows_get_thinner_with_more_vms_within_bounds() {
    assert_eq!(row_height(0), MAX_ROW_PX);
    assert_eq!(row_height(4), 24);
    assert_eq!(row_height(30), 24);
    assert_eq!(row_height(60), 12);
    assert_eq!(row_height(200), MIN_ROW_PX);
    assert_eq!(row_height(usize::MAX), MIN_ROW_PX);
    let mut last = MAX_ROW_PX;
    for n in 1..400 {
        assert!(row_height(n) <= last);
        last = row_height(n);
    }
}

#[test]
fn bars_stay_inside_their_row_and_planned_ones_sit_above_measured_ones() {
    for h in MIN_ROW_PX..=MAX_ROW_PX {
        for kind in [
            BarKind::Waiting,
            BarKind::Setup,
            BarKind::Flow,
            BarKind::Margin,
            BarKind::Stalled,
        ] {
            for basis in [Basis::Planned, Basis::Measured] {
                for mixed in [false, true] {
                    let (a, b) = bar_band(kind, basis, mixed, 100, h);
                    assert!(100 <= a && a < b && b <= 100 + h, "{h} {kind:?} {basis:?}");
                }
            }
            let (_, planned_bottom) = bar_band(kind, Basis::Planned, true, 100, h);
            let (measured_top, _) = bar_band(kind, Basis::Measured, true, 100, h);
            assert!(planned_bottom <= measured_top, "{h} {kind:?}");
        }
    }
}

#[test]
fn quotas_share_rows_fairly_among_links() {
    assert_eq!(quotas(&[5, 100, 100], 60), vec![5, 28, 27]);
    assert_eq!(quotas(&[5, 100, 100], 1000), vec![5, 100, 100]);
    assert_eq!(quotas(&[3, 3], 0), vec![0, 0]);
    assert_eq!(quotas(&[], 10), Vec::<usize>::new());
    assert_eq!(quotas(&[10, 10, 10], 2), vec![1, 1, 0]);
    // Exhaustively on small cases: all of the budget used, no link over its size, and
    // a link cut short gets at least as many as any other, less one.
    for a in 0..6 {
        for b in 0..6 {
            for c in 0..6 {
                let sizes = [a, b, c];
                for budget in 0..20 {
                    let q = quotas(&sizes, budget);
                    assert_eq!(q.iter().sum::<usize>(), budget.min(a + b + c));
                    for g in 0..3 {
                        assert!(q[g] <= sizes[g]);
                        if q[g] < sizes[g] {
                            assert!(
                                q.iter().all(|&o| o <= q[g] + 1),
                                "{sizes:?} {budget}: {q:?}"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn a_chart_that_must_leave_vms_out_keeps_the_ones_that_miss_in_each_link() {
    // Two links of 10; in each the last 3 miss. 8 rows: 4 per link, the 3 misses first.
    let t = many(20, 2, 14);
    let s = select(&t.rows, 8);
    assert_eq!(s.shown, 8);
    assert_eq!(s.hidden, 12);
    assert_eq!(s.hidden_notable, 0);
    assert_eq!(s.groups.len(), 2);
    assert_eq!(s.groups[0].link, "link-0");
    assert_eq!(s.groups[0].total, 10);
    // In drawing order: the first saved VM, then the three that miss.
    assert_eq!(s.groups[0].rows, vec![0, 14, 16, 18]);
    assert_eq!(s.groups[1].rows, vec![1, 15, 17, 19]);
    // Too many misses for the room: they say so.
    let s = select(&t.rows, 4);
    assert_eq!(s.hidden_notable, 2);
    assert_eq!(s.groups[0].hidden_notable, 1);
    // Room for all: everything in order.
    let s = select(&t.rows, 300);
    assert_eq!(s.hidden, 0);
    assert_eq!(s.groups[0].rows, (0..20).step_by(2).collect::<Vec<_>>());
}

#[test]
fn long_text_is_cut_with_an_ellipsis() {
    // 10 px font: 6 px a character.
    assert_eq!(fit("abcdef", 10, 36), "abcdef");
    assert_eq!(fit("abcdefg", 10, 36), "abcde…");
    assert_eq!(fit("abc", 10, 0), "…");
}

// ---- conversions ----

#[test]
fn a_plan_becomes_a_row_per_vm_grouped_by_link_in_start_order() {
    let p = example_plan();
    let t = Timeline::from_plan(&p, "example");
    assert_eq!(t.rows.len(), 12);
    assert_eq!(t.deadline_s, Some(600.0));
    assert_eq!(t.now_s, None);
    let names: Vec<&str> = t.rows.iter().map(|r| r.vm.as_str()).collect();
    assert_eq!(
        names,
        [
            "dns-1",
            "web-2",
            "web-1",
            "db-2",
            "db-1",
            "cache-1", // to-b
            "wiki",
            "mail",
            "build-2",
            "build-1",
            "archive",
            "ci-runner", // to-c
        ]
    );
    let by = |n: &str| t.rows.iter().find(|r| r.vm == n).unwrap();
    let archive = by("archive");
    assert_eq!(archive.verdict, Verdict::Misses);
    assert!(
        archive.note.as_deref().unwrap().starts_with("too big: "),
        "{archive:?}"
    );
    let ci = by("ci-runner");
    assert_eq!(ci.verdict, Verdict::Skipped);
    assert!(ci.bars.is_empty());
    assert_eq!(by("dns-1").priority, 5.0);
    // Each VM that runs: setup, flow and margin back to back, as the plan says.
    for (r, v) in t
        .rows
        .iter()
        .filter_map(|r| Some((r, p.vms.iter().find(|v| v.name == r.vm)?)))
        .filter(|(r, _)| r.verdict != Verdict::Skipped)
    {
        let kinds: Vec<BarKind> = r.bars.iter().map(|b| b.kind).collect();
        assert!(
            kinds.ends_with(&[BarKind::Setup, BarKind::Flow, BarKind::Margin])
                || kinds.ends_with(&[BarKind::Setup, BarKind::Flow]),
            "{r:?}"
        );
        assert!(
            r.bars.windows(2).all(|w| w[0].end_s == w[1].start_s),
            "{r:?}"
        );
        assert!(r.bars.iter().all(|b| b.basis == Basis::Planned));
        let setup = r.bars.iter().find(|b| b.kind == BarKind::Setup).unwrap();
        assert_eq!(setup.start_s, v.start_s.unwrap());
        assert_eq!(setup.end_s, v.switchover_s.unwrap());
        let flow = r.bars.iter().find(|b| b.kind == BarKind::Flow).unwrap();
        assert_eq!(flow.end_s, v.finish_s.unwrap());
        if v.start_s.unwrap() > 0.0 {
            assert_eq!(r.bars[0].kind, BarKind::Waiting);
            assert_eq!(r.bars[0].start_s, 0.0);
        }
    }
}

#[test]
fn a_simulation_becomes_a_chart_too() {
    let pf = crate::file::parse(EXAMPLE, 1.8e9).unwrap();
    let f = &pf.fleet;
    let out = simulate(f, &one_at_a_time_smallest_first(f), &SimOptions::default()).unwrap();
    let t = Timeline::from_outcome(f, &out, "one at a time", Some(600.0));
    assert_eq!(t.rows.len(), f.vms.len());
    let archive = t.rows.iter().find(|r| r.vm == "archive").unwrap();
    assert_eq!(archive.verdict, Verdict::Misses);
    let dns = t.rows.iter().find(|r| r.vm == "dns-1").unwrap();
    assert_eq!(dns.verdict, Verdict::Saved);
    assert_eq!(dns.link, "to-b");
    // One at a time on each link: a VM's setup starts when the one before it is done.
    let to_b: Vec<&Row> = t.rows.iter().filter(|r| r.link == "to-b").collect();
    for w in to_b.windows(2) {
        let end = w[0].bars.last().unwrap().end_s;
        let start = w[1]
            .bars
            .iter()
            .find(|b| b.kind == BarKind::Setup)
            .unwrap()
            .start_s;
        assert!((start - end).abs() < 1e-9, "{:?} then {:?}", w[0], w[1]);
    }
    render(&t);
}

fn run(vm: &str, started: Option<f64>, switchover: Option<f64>, end: Option<RunEnd>) -> VmRun {
    VmRun {
        vm: vm.into(),
        link: "l".into(),
        priority: 1.0,
        started_s: started,
        switchover_s: switchover,
        end,
        stalls: Vec::new(),
    }
}

#[test]
fn a_run_becomes_measured_bars_and_verdicts() {
    let runs = [
        run("waits", None, None, None),
        run(
            "done",
            Some(1.0),
            Some(2.0),
            Some(RunEnd::Finished { at_s: 10.0 }),
        ),
        run("moving", Some(2.0), Some(3.0), None),
        run(
            "broke",
            Some(0.0),
            None,
            Some(RunEnd::Failed {
                at_s: 4.0,
                reason: "connection lost".into(),
            }),
        ),
    ];
    let t = Timeline::from_runs("run", Some(30.0), 20.0, &runs).unwrap();
    assert_eq!(t.now_s, Some(20.0));
    // By start; not started last.
    let names: Vec<&str> = t.rows.iter().map(|r| r.vm.as_str()).collect();
    assert_eq!(names, ["broke", "done", "moving", "waits"]);
    let by = |n: &str| t.rows.iter().find(|r| r.vm == n).unwrap();
    let spans = |n: &str| -> Vec<(f64, f64, BarKind)> {
        by(n)
            .bars
            .iter()
            .inspect(|b| assert_eq!(b.basis, Basis::Measured))
            .map(|b| (b.start_s, b.end_s, b.kind))
            .collect()
    };
    assert_eq!(spans("waits"), [(0.0, 20.0, BarKind::Waiting)]);
    assert_eq!(
        spans("done"),
        [
            (0.0, 1.0, BarKind::Waiting),
            (1.0, 2.0, BarKind::Setup),
            (2.0, 10.0, BarKind::Flow)
        ]
    );
    assert_eq!(spans("moving")[2], (3.0, 20.0, BarKind::Flow));
    assert_eq!(spans("broke"), [(0.0, 4.0, BarKind::Setup)]);
    assert_eq!(by("waits").verdict, Verdict::Pending);
    assert_eq!(by("moving").verdict, Verdict::Pending);
    assert_eq!(by("done").verdict, Verdict::Saved);
    assert_eq!(by("broke").verdict, Verdict::Failed);
    assert_eq!(by("broke").note.as_deref(), Some("connection lost"));

    // After the deadline: late and unfinished VMs miss.
    let t = Timeline::from_runs("run", Some(5.0), 20.0, &runs).unwrap();
    let by = |n: &str| t.rows.iter().find(|r| r.vm == n).unwrap();
    assert_eq!(by("done").verdict, Verdict::Misses);
    assert_eq!(by("moving").verdict, Verdict::Misses);
    assert_eq!(by("waits").verdict, Verdict::Misses);
    assert_eq!(by("broke").verdict, Verdict::Failed);
}

#[test]
fn stalls_are_drawn_over_the_setup_or_flow_they_interrupt() {
    let mut resumed = run(
        "resumed",
        Some(1.0),
        Some(2.0),
        Some(RunEnd::Finished { at_s: 12.0 }),
    );
    resumed.stalls = vec![(4.0, Some(9.0))];
    let mut stuck = run("stuck", Some(0.5), None, None);
    stuck.stalls = vec![(0.2, None)];
    let t = Timeline::from_runs("run", Some(30.0), 20.0, &[resumed, stuck]).unwrap();
    let stalled = |n: &str| -> Vec<(f64, f64)> {
        let row = t.rows.iter().find(|r| r.vm == n).unwrap();
        row.bars
            .iter()
            .filter(|b| b.kind == BarKind::Stalled)
            .map(|b| (b.start_s, b.end_s))
            .collect()
    };
    assert_eq!(stalled("resumed"), [(4.0, 9.0)]);
    // Still stalled: until now; not before its start.
    assert_eq!(stalled("stuck"), [(0.5, 20.0)]);
    let svg = render(&t);
    assert!(svg.contains("stalled: not moving"), "the legend names it");
    for (stalls, says) in [
        (
            vec![(f64::NAN, None)],
            "a stall at NaN s is not a time up to now",
        ),
        (
            vec![(3.0, Some(25.0))],
            "a stall at 25 s is not a time up to now",
        ),
        (
            vec![(5.0, Some(4.0))],
            "a stall from 5 s ends before it began",
        ),
    ] {
        let mut r = run("bad", Some(1.0), Some(2.0), None);
        r.stalls = stalls;
        let e = Timeline::from_runs("run", None, 20.0, std::slice::from_ref(&r)).unwrap_err();
        assert_eq!(e.to_string(), format!("vm \"bad\": {says}"));
    }
    let mut r = run("never", None, None, None);
    r.stalls = vec![(1.0, None)];
    let e = Timeline::from_runs("run", None, 20.0, &[r]).unwrap_err();
    assert_eq!(e.to_string(), "vm \"never\": a stall without a start");
}

#[test]
fn contradicting_events_are_errors_naming_the_vm() {
    let fin = |at_s| Some(RunEnd::Finished { at_s });
    let cases = [
        (
            run("a", None, Some(1.0), None),
            "a switchover without a start",
        ),
        (
            run("b", Some(2.0), Some(1.0), None),
            "its switchover at 1 s is before its start at 2 s",
        ),
        (
            run("c", Some(1.0), None, fin(3.0)),
            "a finish without a switchover",
        ),
        (
            run("d", Some(1.0), Some(2.0), fin(1.5)),
            "its finish at 1.5 s is before its last event at 2 s",
        ),
        (
            run("e", Some(1.0), Some(50.0), None),
            "its switchover at 50 s is after now (20 s)",
        ),
        (
            run("f", Some(f64::NAN), None, None),
            "its start time is not finite (NaN)",
        ),
    ];
    for (r, says) in cases {
        let e = Timeline::from_runs("run", None, 20.0, std::slice::from_ref(&r)).unwrap_err();
        assert_eq!(e.to_string(), format!("vm {:?}: {says}", r.vm));
    }
    let e = Timeline::from_runs("run", None, f64::INFINITY, &[]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "chart: now_s must be a finite time (got inf)"
    );
    let e = Timeline::from_runs("run", Some(f64::NAN), 1.0, &[]).unwrap_err();
    assert!(
        matches!(
            e,
            ChartError::BadTime {
                what: "deadline_s",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn a_run_is_drawn_over_its_plan() {
    let p = example_plan();
    let planned = Timeline::from_plan(&p, "plan");
    let runs = [
        run(
            "db-1",
            Some(2.0),
            Some(2.2),
            Some(RunEnd::Finished { at_s: 70.0 }),
        ),
        run("stranger", Some(1.0), None, None),
    ];
    let mut t = Timeline::from_runs("run", None, 100.0, &runs).unwrap();
    t.overlay_plan(&planned);
    assert_eq!(t.deadline_s, Some(600.0));
    // The plan's order, then VMs only the run knows.
    assert_eq!(t.rows.len(), 13);
    assert_eq!(t.rows[4].vm, "db-1");
    assert_eq!(t.rows[12].vm, "stranger");
    let db1 = &t.rows[4];
    assert_eq!(db1.verdict, Verdict::Saved);
    assert_eq!(db1.note.as_deref(), Some("70.0 s"));
    let measured = db1
        .bars
        .iter()
        .filter(|b| b.basis == Basis::Measured)
        .count();
    let planned_bars = db1
        .bars
        .iter()
        .filter(|b| b.basis == Basis::Planned)
        .count();
    assert_eq!((measured, planned_bars), (3, 4));
    // A VM the run does not mention keeps its planned row; a run row without a note
    // gets the plan's verdict.
    assert_eq!(t.rows[10].vm, "archive");
    assert_eq!(t.rows[10].verdict, Verdict::Misses);
    let mut t = Timeline::from_runs(
        "run",
        None,
        100.0,
        &[run("archive", Some(45.0), Some(46.0), None)],
    )
    .unwrap();
    t.overlay_plan(&planned);
    let archive = t.rows.iter().find(|r| r.vm == "archive").unwrap();
    assert_eq!(archive.verdict, Verdict::Pending);
    assert!(
        archive
            .note
            .as_deref()
            .unwrap()
            .starts_with("plan: MISSES too big: "),
        "{archive:?}"
    );

    // Drawn: planned bars outlined above, measured ones filled, and the legend says so.
    let svg = render(&t);
    let els = elements(&svg);
    let flows: Vec<&El> = els
        .iter()
        .filter(|e| e.tag == "rect")
        .filter(|e| e.get("fill") == Some(FLOW_FILL) || e.get("stroke") == Some(FLOW_FILL))
        .filter(|e| e.num("height") < 20.0)
        .collect();
    assert!(
        flows.iter().any(|e| e.get("fill") == Some("none")),
        "no outlined bar"
    );
    assert!(
        flows.iter().any(|e| e.get("fill") == Some(FLOW_FILL)),
        "no solid bar"
    );
    assert!(texts(&els)
        .iter()
        .any(|e| e.text == "planned (outlined, above the run)"));
    assert!(texts(&els).iter().any(|e| e.text == "now 100.0 s"));
}

// ---- the SVG ----

#[test]
fn the_example_plan_draws_a_labelled_row_per_vm_the_deadline_and_a_legend() {
    let p = example_plan();
    let t = Timeline::from_plan(&p, "Evacuation plan: fleet.toml");
    let layout = Layout::new(&t, &ChartOptions::default());
    let svg = render(&t);
    let els = elements(&svg);
    let all_text: Vec<&str> = texts(&els).iter().map(|e| e.text.as_str()).collect();
    for v in &p.vms {
        label(&els, &v.name);
    }
    assert!(all_text.contains(&"dns-1 · prio 5"), "{all_text:?}");
    assert!(all_text.contains(&"Evacuation plan: fleet.toml"));
    assert!(
        all_text.contains(
            &"12 VMs on 2 links: 10 saved, 1 misses the deadline, 1 skipped; deadline at 10.0 min"
        ),
        "{all_text:?}"
    );
    assert!(all_text.contains(&"to-b · 6 VMs"));
    assert!(all_text.contains(&"to-c · 6 VMs"));
    // The legend.
    for entry in [
        "waiting for its turn (at the source)",
        "setup: handshake, switchover (at the source)",
        "stale pages crossing (at the destination, exposed)",
        "extra time if the links deliver the margin less",
        "deadline",
        "misses the deadline (red row)",
    ] {
        assert!(
            all_text.contains(&entry),
            "no legend entry {entry:?}: {all_text:?}"
        );
    }
    // The deadline: a red vertical line at 600 s from above the rows to their bottom,
    // and its label.
    let x = layout.scale.x(600.0);
    let line = format!("{x},{} {x},{} ", layout.marker_y - 7, layout.rows_bottom);
    assert!(
        els.iter().any(|e| e.tag == "polyline"
            && e.get("stroke") == Some(DEADLINE_STROKE)
            && e.get("points") == Some(line.as_str())),
        "no deadline line at x = {x}"
    );
    assert!(all_text.contains(&"deadline 10.0 min"));
    // Ticks in minutes.
    assert!(
        all_text.contains(&"2 min") && all_text.contains(&"10 min"),
        "{all_text:?}"
    );
}

#[test]
fn a_vm_that_misses_is_marked_red() {
    let p = example_plan();
    let t = Timeline::from_plan(&p, "plan");
    let els = elements(&render(&t));
    let archive = label(&els, "archive");
    assert_eq!(archive.get("fill"), Some(MISS_FILL));
    assert_eq!(archive.get("font-weight"), Some("bold"));
    for saved in ["dns-1", "db-1", "cache-1", "build-1"] {
        let l = label(&els, saved);
        assert_eq!(l.get("fill"), Some(TEXT_FILL), "{saved}");
        assert_eq!(l.get("font-weight"), None, "{saved}");
    }
    // Its row has a red background and its note says why.
    let y = archive.num("y");
    assert!(
        els.iter().any(|e| e.tag == "rect"
            && e.get("fill") == Some(MISS_BG)
            && e.num("y") <= y
            && y <= e.num("y") + e.num("height")),
        "no red row behind archive"
    );
    let note = texts(&els)
        .into_iter()
        .find(|e| e.text.starts_with("MISSES too big: "))
        .unwrap();
    assert_eq!(note.get("fill"), Some(MISS_FILL));
    assert_eq!(note.num("y"), y);
    // Its flow goes on past the axis: an arrow at the plot's edge.
    let layout = Layout::new(&t, &ChartOptions::default());
    let edge = format!("{},", layout.scale.x1 + 7);
    assert!(
        els.iter()
            .any(|e| e.tag == "polygon" && e.get("points").unwrap().contains(&edge)),
        "no arrow"
    );
}

#[test]
fn bars_are_placed_by_the_time_scale_and_move_right_with_time() {
    let t = many(40, 1, 40);
    let layout = Layout::new(&t, &ChartOptions::default());
    let els = elements(&render(&t));
    for (fill, kind) in [(FLOW_FILL, BarKind::Flow), (SETUP_FILL, BarKind::Setup)] {
        let mut bars: Vec<&El> = els
            .iter()
            .filter(|e| e.tag == "rect" && e.get("fill") == Some(fill))
            .filter(|e| e.num("y") >= f64::from(layout.rows_top))
            .collect();
        assert_eq!(bars.len(), 40, "{kind:?}");
        bars.sort_by(|a, b| a.num("y").total_cmp(&b.num("y")));
        // Row i's bar starts at its time's pixel; later rows start later.
        for (i, (b, r)) in bars.iter().zip(&t.rows).enumerate() {
            let span = r.bars.iter().find(|b| b.kind == kind).unwrap();
            let x0 = layout.scale.x(span.start_s);
            let x1 = layout.scale.x(span.end_s).max(x0 + 1);
            assert_eq!(b.num("x"), f64::from(x0), "row {i} {kind:?}");
            assert_eq!(b.num("width"), f64::from(x1 - x0), "row {i} {kind:?}");
        }
        assert!(bars.windows(2).all(|w| w[0].num("x") <= w[1].num("x")));
        assert!(bars.first().unwrap().num("x") < bars.last().unwrap().num("x"));
    }
}

#[test]
fn two_hundred_vms_fit_in_thin_rows_and_three_hundred_and_one_are_cut() {
    let t = many(200, 4, 190);
    let svg = render(&t);
    let els = elements(&svg);
    for r in &t.rows {
        label(&els, &r.vm);
    }
    let layout = Layout::new(&t, &ChartOptions::default());
    assert_eq!(layout.row_h, MIN_ROW_PX);
    assert!(layout.axis_bottom_y.is_some());
    assert!(!svg.contains("not drawn"));

    let t = many(301, 4, 301);
    // The last one misses: it is drawn, a saved one is left out.
    let mut t = t;
    t.rows[300].verdict = Verdict::Misses;
    let els = elements(&render(&t));
    label(&els, "vm-0300");
    let labels = texts(&els)
        .into_iter()
        .filter(|e| e.num("x") == 18.0 && e.text.starts_with("vm-"))
        .count();
    assert_eq!(labels, 300);
    let all_text: Vec<&str> = texts(&els).iter().map(|e| e.text.as_str()).collect();
    assert!(
        all_text
            .iter()
            .any(|s| s.starts_with("showing 300 of 301 VMs: 1 left out (every VM that misses")),
        "{all_text:?}"
    );
    assert!(
        all_text.iter().any(|s| s.contains("(1 not drawn)")),
        "{all_text:?}"
    );
}

#[test]
fn awkward_names_and_empty_charts_still_make_valid_svg() {
    let t = timeline(
        vec![row(
            "<db & \"co\">'\u{7}",
            "l\u{0}nk",
            Verdict::Failed,
            vec![Bar {
                basis: Basis::Measured,
                ..bar(0.0, 1.0, BarKind::Setup)
            }],
        )],
        None,
    );
    let els = elements(&render(&t));
    assert!(texts(&els)
        .iter()
        .any(|e| e.text == "<db & \"co\">'\u{FFFD}"));
    let els = elements(&render(&timeline(vec![], None)));
    assert!(texts(&els).iter().any(|e| e.text == "no VMs to show"));
    assert!(texts(&els).iter().any(|e| e.text == "0 VMs on 0 links"));
}

#[test]
fn bad_input_is_a_typed_error() {
    let ok = many(3, 1, 3);
    let mut t = ok.clone();
    t.rows[1].bars[0].end_s = f64::NAN;
    assert_eq!(
        render_svg(&t, &ChartOptions::default()).unwrap_err().to_string(),
        "vm \"vm-0001\": its setup bar from 1 s to NaN s is not a span of time (both finite, the end not before the start)"
    );
    let mut t = ok.clone();
    t.rows[2].bars[1].end_s = 0.0;
    assert!(matches!(
        render_svg(&t, &ChartOptions::default()),
        Err(ChartError::BadBar { kind: "flow", .. })
    ));
    let mut t = ok.clone();
    t.deadline_s = Some(f64::INFINITY);
    assert!(matches!(
        render_svg(&t, &ChartOptions::default()),
        Err(ChartError::BadTime {
            what: "deadline_s",
            ..
        })
    ));
    let narrow = ChartOptions {
        width_px: 100,
        ..ChartOptions::default()
    };
    assert_eq!(
        render_svg(&ok, &narrow).unwrap_err().to_string(),
        "chart: the width must be at least 600 px (got 100)"
    );
    let none = ChartOptions {
        max_rows: 0,
        ..ChartOptions::default()
    };
    assert_eq!(render_svg(&ok, &none).unwrap_err(), ChartError::NoRows);
    let back = ChartOptions {
        horizon_s: Some(-1.0),
        ..ChartOptions::default()
    };
    assert_eq!(
        render_svg(&ok, &back).unwrap_err().to_string(),
        "chart: horizon_s must be a finite time > 0 (got -1)"
    );
}

fn any_time() -> impl Strategy<Value = f64> {
    prop_oneof![
        8 => -10.0f64..1e5,
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(1e300),
        1 => Just(-1e300),
    ]
}

fn any_row() -> impl Strategy<Value = Row> {
    let kinds = prop_oneof![
        Just(BarKind::Waiting),
        Just(BarKind::Setup),
        Just(BarKind::Flow),
        Just(BarKind::Margin)
    ];
    let bases = prop_oneof![Just(Basis::Planned), Just(Basis::Measured)];
    let verdicts = prop_oneof![
        Just(Verdict::Saved),
        Just(Verdict::AtRisk),
        Just(Verdict::Misses),
        Just(Verdict::Failed),
        Just(Verdict::Skipped),
        Just(Verdict::Pending)
    ];
    (
        "\\PC{0,40}",
        "[a-c]",
        verdicts,
        proptest::collection::vec((any_time(), any_time(), kinds, bases), 0..5),
        proptest::option::of("\\PC{0,60}"),
    )
        .prop_map(|(vm, link, verdict, bars, note)| Row {
            vm,
            link,
            priority: 1.0,
            verdict,
            bars: bars
                .into_iter()
                .map(|(a, b, kind, basis)| Bar {
                    start_s: a,
                    end_s: b,
                    kind,
                    basis,
                })
                .collect(),
            note,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever it is given, render_svg answers with valid SVG or a typed error.
    #[test]
    fn any_timeline_gives_valid_svg_or_an_error(
        rows in proptest::collection::vec(any_row(), 0..40),
        deadline in proptest::option::of(any_time()),
        now in proptest::option::of(any_time()),
        max_rows in 1usize..30,
        width in 600u32..2000,
    ) {
        let t = Timeline { title: "fuzz".into(), deadline_s: deadline, now_s: now, rows };
        let o = ChartOptions { width_px: width, max_rows, horizon_s: None };
        if let Ok(svg) = render_svg(&t, &o) {
            prop_assert!(roxmltree::Document::parse(&svg).is_ok());
        }
    }
}
