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
            "vm \"db-1\": disk_bytes must be >= 0 (got -5)",
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
    assert!(message.contains("not valid TOML"), "{message}");
    assert!(message.contains("line 2"), "{message}");
    // No file: a local error.
    let (rc, out, _) = plan(&dir.path().join("missing.toml"), &["--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["error"]["kind"], "local_io", "{v}");
    assert_eq!(rc, Some(6));
}
