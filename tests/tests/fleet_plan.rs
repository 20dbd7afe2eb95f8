//! `faultline plan FILE`: the real binary on the example plan file (docs/examples/fleet.toml)
//! and on broken ones. It moves nothing, so these are quick.

use std::path::{Path, PathBuf};
use std::process::Command;

use faultline_tests::faultline_bin;
use serde_json::Value;

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/fleet.toml")
}

/// Runs `faultline plan FILE [extra...]`: (exit code, stdout, stderr).
fn plan(file: &Path, extra: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(faultline_bin())
        .arg("plan")
        .arg(file)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn vm<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == name)
        .unwrap_or_else(|| panic!("no vm {name} in {v}"))
}

#[test]
fn the_example_plan_as_json() {
    let (rc, out, err) = plan(&example(), &["--json"]);
    assert_eq!(rc, Some(0), "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["deadline_s"], 600.0);
    assert_eq!(v["margin"], 0.1);
    let t = &v["totals"];
    assert_eq!(t["vms"], 11, "{t}");
    // Everything but the 4 TiB archive without a replica makes it.
    assert_eq!(t["saved"], 10, "{t}");
    let archive = vm(&v, "archive");
    assert_eq!(archive["status"], "misses");
    let why = archive["reason"].as_str().unwrap();
    assert!(why.starts_with("too big: alone on link \"to-c\""), "{why}");
    assert_eq!(vm(&v, "ci-runner")["status"], "skipped");
    assert_eq!(vm(&v, "ci-runner")["order"], Value::Null);
    // Pinned first.
    assert_eq!(vm(&v, "dns-1")["order"], 1);
    // The planner never saves less than either baseline, and beats all at once on
    // exposure.
    let b = &v["baselines"];
    for name in ["all_at_once", "one_at_a_time_smallest_first"] {
        assert!(
            t["saved_weight"].as_f64() >= b[name]["saved_weight"].as_f64(),
            "{name}: {b}"
        );
    }
    assert!(t["mean_exposure_s"].as_f64() < b["all_at_once"]["mean_exposure_s"].as_f64());
    // One flow cannot fill the 1 Gbit/s × 80 ms link with the default window.
    let to_c = v["links"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "to-c")
        .unwrap();
    assert_eq!(to_c["concurrency"], 3, "{to_c}");
    assert!(
        v["replication"]["steady_stale_recommended_bytes"].as_f64()
            <= v["replication"]["steady_stale_current_bytes"].as_f64()
    );
}

#[test]
fn the_example_plan_as_text() {
    let (rc, out, err) = plan(&example(), &[]);
    assert_eq!(rc, Some(0), "{err}");
    assert!(
        out.contains("12 VMs on 2 links (1 skipped); deadline in 600.0 s"),
        "{out}"
    );
    assert!(out.contains("misses archive: too big"), "{out}");
    assert!(out.contains("saved by the deadline: 10 of 11 VMs"), "{out}");
    assert!(out.contains("all at once: saves"), "{out}");
    assert!(
        out.contains("one at a time, smallest first: saves"),
        "{out}"
    );
    // A row per VM, in order.
    let dns = out.lines().find(|l| l.contains("dns-1")).unwrap();
    assert!(dns.starts_with("1 "), "{dns}");
    assert!(dns.trim_end().ends_with("saved"), "{dns}");
}

#[test]
fn a_bad_plan_file_is_a_usage_error_naming_the_entry() {
    let text = std::fs::read_to_string(example()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "disk_bytes = \"2T\"",
            "disk_bytes = -5",
            "vm \"db-1\": disk_bytes cannot be negative (got -5)",
        ),
        (
            "link = \"to-c\"\nmemory_bytes = \"4G\"",
            "link = \"to-d\"\nmemory_bytes = \"4G\"",
            "vm \"wiki\": link \"to-d\" is not defined",
        ),
        (
            "name = \"web-2\"",
            "name = \"web-1\"",
            "vm \"web-1\": the name is used twice",
        ),
        (
            "first = [\"dns-1\"]",
            "first = [\"dns-9\"]",
            "plan: first names vm \"dns-9\", which is not defined",
        ),
        (
            "deadline = \"10m\"",
            "deadline = 2020-01-01T00:00:00Z",
            "plan: deadline 2020-01-01T00:00:00Z is in the past",
        ),
        (
            "stale_bytes = \"20M\"",
            "stale_bytes = \"20G\"",
            "vm \"dns-1\": stale_bytes (21474836480 bytes) exceeds",
        ),
        (
            "rtt_ms = 80",
            "rtt_ms = \"slow\"",
            "link \"to-c\": rtt_ms = \"slow\"",
        ),
    ];
    for (i, (from, to, says)) in cases.iter().enumerate() {
        assert!(text.contains(from), "{from}");
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
        let (rc, out, err) = plan(&path, &["--json"]);
        let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert_eq!(v["ok"], false, "{v}");
        assert_eq!(v["error"]["kind"], "usage", "{v}");
        assert_eq!(rc, Some(2), "{v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{to}: {message}");
        assert!(err.contains(says), "{err}");
    }
    // Not TOML at all: the parser's message says where.
    let path = dir.path().join("garbage.toml");
    std::fs::write(&path, "deadline = \n[[vm]\n").unwrap();
    let (rc, out, _) = plan(&path, &["--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rc, Some(2), "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!("{}: TOML parse error at line", path.display())),
        "{message}"
    );
    assert!(message.contains("line 2"), "{message}");
    assert!(!message.ends_with('\n'), "{message:?}");
    // No file: a local error.
    let (rc, out, _) = plan(&dir.path().join("missing.toml"), &["--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["error"]["kind"], "local_io", "{v}");
    assert_eq!(rc, Some(6));
}

/// `--live` needs the file's control part (it connects to the sources): without it, a
/// usage error naming the key, before any connection.
#[test]
fn a_live_plan_without_the_orchestrators_certificate_names_the_key() {
    let (rc, out, err) = plan(&example(), &["--live", "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["error"]["kind"], "usage", "{v}");
    assert_eq!(rc, Some(2), "{v}");
    let says = "plan: cert is missing: faultline evacuate (and plan --live) needs";
    assert!(
        v["error"]["message"].as_str().unwrap().contains(says),
        "{v}"
    );
    assert!(err.contains(says), "{err}");
    // A timeout that is not a positive number of seconds: a usage error too.
    let (rc, _, err) = plan(&example(), &["--live", "--connect-timeout=-1"]);
    assert_eq!(rc, Some(2), "{err}");
    assert!(err.contains("is not a number of seconds"), "{err}");
}

/// The text of every `<text>` element of an SVG document, which must parse as XML.
fn svg_texts(svg: &str) -> Vec<(String, Option<String>)> {
    let doc = roxmltree::Document::parse(svg).unwrap_or_else(|e| panic!("not XML: {e}"));
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    doc.descendants()
        .filter(|n| n.has_tag_name("text"))
        .map(|n| {
            (
                n.text().unwrap_or("").trim().to_string(),
                n.attribute("fill").map(str::to_string),
            )
        })
        .collect()
}

#[test]
fn the_example_plan_as_a_gantt_chart() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("plan.svg");
    let (rc, stdout, err) = plan(&example(), &["--gantt", out.to_str().unwrap()]);
    assert_eq!(rc, Some(0), "{err}");
    // The table still prints, and says where the chart went.
    assert!(
        stdout.contains("saved by the deadline: 10 of 11 VMs"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("Gantt chart: {}", out.display())),
        "{stdout}"
    );
    let svg = std::fs::read_to_string(&out).unwrap();
    let texts = svg_texts(&svg);
    let has = |s: &str| texts.iter().any(|(t, _)| t == s);
    assert!(has("Evacuation plan: fleet.toml"), "{texts:?}");
    // One labelled row per VM (a priority other than 1 follows the name).
    for name in [
        "dns-1",
        "db-1",
        "db-2",
        "web-1",
        "web-2",
        "cache-1",
        "mail",
        "wiki",
        "build-1",
        "build-2",
        "archive",
        "ci-runner",
    ] {
        let rows = texts
            .iter()
            .filter(|(t, _)| t == name || t.starts_with(&format!("{name} · prio")))
            .count();
        assert_eq!(rows, 1, "{name}: {texts:?}");
    }
    // The deadline, the legend, the link headers.
    assert!(has("deadline 10.0 min"), "{texts:?}");
    assert!(
        has("stale pages crossing (at the destination, exposed)"),
        "{texts:?}"
    );
    assert!(has("misses the deadline (red row)"), "{texts:?}");
    assert!(has("to-b · 6 VMs") && has("to-c · 6 VMs"), "{texts:?}");
    // The archive misses: its label is red, a saved VM's is not.
    let fill = |name: &str| texts.iter().find(|(t, _)| t == name).unwrap().1.clone();
    assert_eq!(fill("archive").as_deref(), Some("#C01B1B"));
    assert_eq!(fill("wiki").as_deref(), Some("#222222"));

    // With --json too: the report names the file.
    let out2 = dir.path().join("again.svg");
    let (rc, stdout, err) = plan(&example(), &["--json", "--gantt", out2.to_str().unwrap()]);
    assert_eq!(rc, Some(0), "{err}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["gantt"], out2.display().to_string());
    assert!(out2.exists());
}

#[test]
fn an_unwritable_gantt_path_is_a_local_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("no-such-dir").join("plan.svg");
    let (rc, stdout, err) = plan(&example(), &["--json", "--gantt", out.to_str().unwrap()]);
    let v: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["error"]["kind"], "local_io", "{v}");
    assert_eq!(rc, Some(6), "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    let says = format!("writing the Gantt chart to {}", out.display());
    assert!(message.contains(&says), "{message}");
    assert!(err.contains(&says), "{err}");
    assert!(!out.exists());
}
