//! Plan files: a good one, the defaults, and every kind of bad entry, each error naming it.

use super::*;

/// 2026-12-01T12:00:00Z.
const NOW: f64 = 1_796_126_400.0;

const GOOD: &str = r#"
deadline = "15m"
margin = "5%"
first = ["db-1"]
skip = ["scratch"]

[costs]
handshake_rtts = 2
switchover_ms = "80ms"
finish_ms = 25

[[link]]
name = "wan-a"
rate_bps = "1G"
shared_rate_bps = "940M"
rtt_ms = 20
window_bytes = "3M"
replication_budget_bps = "200M"

[[link]]
name = "wan-b"
rate_bps = 100_000_000
rtt_ms = 50.5

[[vm]]
name = "db-1"
link = "wan-a"
memory_bytes = "64G"
disk_bytes = "500G"
stale_bytes = "3G"
dirty_rate_bps = "200M"
working_set_bytes = "16G"
replication_budget_bps = "50M"
priority = 3
wire_ratio = 0.45

[[vm]]
name = "web-1"
link = "wan-b"
memory_bytes = "8G"

[[vm]]
name = "scratch"
link = "wan-b"
memory_bytes = 4096
"#;

fn err(text: &str) -> String {
    parse(text, NOW).unwrap_err().to_string()
}

/// GOOD with `from` replaced by `to` (which must occur).
fn good_but(from: &str, to: &str) -> String {
    assert!(GOOD.contains(from), "{from}");
    GOOD.replacen(from, to, 1)
}

#[test]
fn a_good_plan_file() {
    let p = parse(GOOD, NOW).unwrap();
    assert_eq!(p.deadline, Deadline::In(900.0));
    assert_eq!(p.options.deadline_s, 900.0);
    assert_eq!(p.options.margin, 0.05);
    assert_eq!(p.options.first, vec![0]);
    assert_eq!(p.options.skip, vec![2]);
    let f = &p.fleet;
    assert_eq!(f.costs.handshake_rtts, 2.0);
    assert_eq!(f.costs.switchover, Duration::from_millis(80));
    assert_eq!(f.costs.finish, Duration::from_millis(25));
    assert_eq!(f.costs.wire_overhead, Costs::default().wire_overhead);
    let a = &f.links[0];
    assert_eq!(a.shared_rate_bps, Some(940_000_000));
    assert_eq!(f.links[1].shared_rate_bps, None);
    assert_eq!(
        (a.rate_bps, a.rtt, a.per_flow_window_bytes),
        (1_000_000_000, Duration::from_millis(20), 3 << 20)
    );
    assert_eq!(a.replication_budget_bps, Some(200_000_000));
    let b = &f.links[1];
    assert_eq!(b.rtt, Duration::from_micros(50_500));
    assert_eq!(b.per_flow_window_bytes, DEFAULT_WINDOW_BYTES);
    let db = &f.vms[0];
    assert_eq!(db.link, 0);
    assert_eq!(db.memory_bytes, 64 << 30);
    assert_eq!(db.disk_bytes, 500 << 30);
    assert_eq!(db.stale_bytes, 3 << 30);
    assert_eq!(db.dirty_rate_bps, 200_000_000);
    assert_eq!(db.working_set_bytes, 16 << 30);
    assert_eq!(db.replication_budget_bps, 50_000_000);
    assert_eq!(db.weight, 3.0);
    assert_eq!(db.wire_ratio, 0.45);
    // Defaults: no replica (everything stale), no writes, working set = memory.
    let web = &f.vms[1];
    assert_eq!(web.link, 1);
    assert_eq!(web.stale_bytes, 8 << 30);
    assert_eq!(web.dirty_rate_bps, 0);
    assert_eq!(web.working_set_bytes, 8 << 30);
    assert_eq!(web.weight, 1.0);
    assert_eq!(web.max_rate_bps, None);
    assert_eq!(web.wire_ratio, 1.0);
}

#[test]
fn deadlines_absolute_and_relative() {
    let at = |d: &str| parse(&good_but("deadline = \"15m\"", d), NOW);
    match at("deadline = 2026-12-01T12:30:00Z").unwrap().deadline {
        Deadline::At { unix_s, rfc3339 } => {
            assert_eq!(unix_s, NOW + 1800.0);
            assert_eq!(rfc3339, "2026-12-01T12:30:00Z");
        }
        other => panic!("{other:?}"),
    }
    // The same instant with an offset, and as a string.
    let p = at("deadline = \"2026-12-01T14:30:00+02:00\"").unwrap();
    assert_eq!(p.options.deadline_s, 1800.0);
    assert_eq!(at("deadline = 600").unwrap().options.deadline_s, 600.0);
    assert_eq!(at("deadline = \"1h\"").unwrap().options.deadline_s, 3600.0);
    assert_eq!(
        at("deadline = 2026-12-01T11:00:00Z")
            .unwrap_err()
            .to_string(),
        "plan: deadline 2026-12-01T11:00:00Z is in the past (now is 2026-12-01T12:00:00Z)"
    );
    assert_eq!(
        at("deadline = 0").unwrap_err().to_string(),
        "plan: deadline 0 must be in the future"
    );
    assert_eq!(
        at("deadline = \"-5m\"").unwrap_err().to_string(),
        "plan: deadline \"-5m\" must be in the future"
    );
    assert!(at("deadline = 2026-12-01T13:00:00")
        .unwrap_err()
        .to_string()
        .contains("needs a date, a time and a UTC offset"));
    assert!(at("deadline = \"soon\"")
        .unwrap_err()
        .to_string()
        .starts_with("plan: deadline = \"soon\" is not a time from now or an RFC 3339 time"));
    assert_eq!(
        err(&good_but("deadline = \"15m\"", "")),
        "plan: deadline is missing"
    );
    // Further off than a year: a slip, refused rather than printed as hundreds of digits.
    assert_eq!(
        at("deadline = 1e300").unwrap_err().to_string(),
        "plan: deadline must be between now and a year from now (got 1e300)"
    );
    assert_eq!(
        at("deadline = 2031-12-01T12:00:00Z")
            .unwrap_err()
            .to_string(),
        "plan: deadline must be between now and a year from now (got 2031-12-01T12:00:00Z)"
    );
    // A year: 366 days, 8784 hours.
    assert!(at("deadline = \"8784h\"").is_ok());
    assert!(at("deadline = \"8785h\"")
        .unwrap_err()
        .to_string()
        .contains("between now and a year from now"));
}

#[test]
fn every_bad_entry_is_named() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "disk_bytes = \"500G\"",
            "disk_bytes = -5",
            "vm \"db-1\": disk_bytes cannot be negative (got -5)",
        ),
        (
            "memory_bytes = \"8G\"",
            "memory_bytes = \"-8G\"",
            "vm \"web-1\": memory_bytes cannot be negative (got \"-8G\")",
        ),
        (
            "memory_bytes = \"8G\"",
            "memory_bytes = \"8Q\"",
            "vm \"web-1\": memory_bytes = \"8Q\" is not a size in bytes",
        ),
        (
            "memory_bytes = \"8G\"",
            "memory_bytes = true",
            "vm \"web-1\": memory_bytes must be a size in bytes (got true)",
        ),
        (
            "memory_bytes = \"8G\"",
            "",
            "vm \"web-1\": memory_bytes is missing",
        ),
        (
            "link = \"wan-b\"\nmemory_bytes = \"8G\"",
            "link = \"wan-c\"\nmemory_bytes = \"8G\"",
            "vm \"web-1\": link \"wan-c\" is not defined",
        ),
        (
            "link = \"wan-b\"\nmemory_bytes = \"8G\"",
            "memory_bytes = \"8G\"",
            "vm \"web-1\": link is missing: there are several links, say which (wan-a, wan-b)",
        ),
        (
            "name = \"web-1\"",
            "name = \"db-1\"",
            "vm \"db-1\": the name is used twice",
        ),
        (
            "name = \"wan-b\"\nrate_bps",
            "name = \"wan-a\"\nrate_bps",
            "link \"wan-a\": the name is used twice",
        ),
        (
            "name = \"web-1\"",
            "name = \"\"",
            "vm #2 ([[vm]] entry 2): name must not be empty",
        ),
        (
            "name = \"web-1\"",
            "nome = \"web-1\"",
            "vm #2 ([[vm]] entry 2): name is missing",
        ),
        (
            "stale_bytes = \"3G\"",
            "stale_bytes = \"3G\"\nstael = 1",
            "vm \"db-1\": unknown key \"stael\"",
        ),
        (
            "stale_bytes = \"3G\"",
            "stale_bytes = \"600G\"",
            "vm \"db-1\": stale_bytes (644245094400 bytes) exceeds memory_bytes + disk_bytes \
             (605590388736 bytes)",
        ),
        (
            "working_set_bytes = \"16G\"",
            "working_set_bytes = \"1T\"",
            "vm \"db-1\": working_set_bytes (1099511627776 bytes) exceeds",
        ),
        (
            "priority = 3",
            "priority = 0",
            "vm \"db-1\": priority must be > 0",
        ),
        (
            "priority = 3",
            "priority = 1e6",
            "vm \"db-1\": priority must be between 0.001 and 1000 (got 1000000)",
        ),
        (
            "memory_bytes = \"64G\"",
            "memory_bytes = \"99999P\"",
            "vm \"db-1\": memory_bytes must be between 0 and 1 EiB (2^60 bytes) (got \"99999P\")",
        ),
        (
            "shared_rate_bps = \"940M\"",
            "shared_rate_bps = 0",
            "link \"wan-a\": shared_rate_bps must be > 0",
        ),
        (
            "shared_rate_bps = \"940M\"",
            "shared_rate_bps = \"2G\"",
            "link \"wan-a\": shared_rate_bps (2000000000) exceeds rate_bps (1000000000)",
        ),
        (
            "rate_bps = \"1G\"",
            "rate_bps = \"100MB/s\"",
            "link \"wan-a\": rate_bps = \"100MB/s\" is in bytes a second",
        ),
        (
            "priority = 3",
            "priority = -1",
            "vm \"db-1\": priority cannot be negative (got -1)",
        ),
        (
            "wire_ratio = 0.45",
            "wire_ratio = 2",
            "vm \"db-1\": wire_ratio must be between 1/4096 and 1.1 (got 2)",
        ),
        (
            "wire_ratio = 0.45",
            "wire_ratio = \"half\"",
            "vm \"db-1\": wire_ratio = \"half\" is not a number",
        ),
        (
            "rate_bps = \"1G\"",
            "rate_bps = \"fast\"",
            "link \"wan-a\": rate_bps = \"fast\" is not a rate in bit/s",
        ),
        (
            "rate_bps = \"1G\"",
            "rate_bps = 0",
            "link \"wan-a\": rate_bps must be > 0",
        ),
        (
            "rtt_ms = 20",
            "rtt_ms = 0",
            "link \"wan-a\": rtt_ms must be > 0",
        ),
        ("rtt_ms = 20", "", "link \"wan-a\": rtt_ms is missing"),
        (
            "rtt_ms = 20",
            "rtt_ms = 1e300",
            "link \"wan-a\": rtt_ms must be between 0 and 1.8e22 ms (got 1e300 ms)",
        ),
        (
            "finish_ms = 25",
            "finish_ms = 1e300",
            "[costs]: finish_ms must be between 0 and 1.8e22 ms (got 1e300 ms)",
        ),
        (
            "window_bytes = \"3M\"",
            "window_bytes = 0",
            "link \"wan-a\": window_bytes must be > 0",
        ),
        (
            "first = [\"db-1\"]",
            "first = [\"db-9\"]",
            "plan: first names vm \"db-9\", which is not defined",
        ),
        (
            "skip = [\"scratch\"]",
            "skip = [\"scratch\", \"scratch\"]",
            "plan: skip names vm \"scratch\" twice",
        ),
        (
            "skip = [\"scratch\"]",
            "skip = [\"db-1\"]",
            "plan: vm \"db-1\" is both in first and in skip",
        ),
        (
            "margin = \"5%\"",
            "margin = 1.5",
            "plan: margin must be between 0 and 0.99",
        ),
        (
            "margin = \"5%\"",
            "margni = 0.1",
            "plan: unknown key \"margni\"",
        ),
        (
            "handshake_rtts = 2",
            "handshake_rtts = -2",
            "[costs]: handshake_rtts cannot be negative (got -2)",
        ),
        (
            "handshake_rtts = 2",
            "handshake_rtts = 1e308",
            "[costs]: handshake_rtts must be between 0 and 100 (got 1",
        ),
        (
            "handshake_rtts = 2",
            "handshake = 2",
            "[costs]: unknown key \"handshake\"",
        ),
    ];
    for (from, to, want) in cases {
        let got = err(&good_but(from, to));
        assert!(
            got.starts_with(want),
            "{from} -> {to}:\n got {got}\nwant {want}"
        );
    }
}

#[test]
fn a_file_without_links_or_vms_or_not_toml() {
    assert_eq!(
        err("deadline = 60\n[[vm]]\nname = \"a\"\nmemory_bytes = 1\n"),
        "plan: has no links ([[link]] entries)"
    );
    assert_eq!(
        err("deadline = 60\n[[link]]\nname = \"l\"\nrate_bps = 1\nrtt_ms = 1\n"),
        "plan: has no VMs ([[vm]] entries)"
    );
    let e = parse("deadline = \n", NOW).unwrap_err();
    assert!(matches!(e, PlanFileError::Syntax(_)));
    let said = e.to_string();
    assert!(said.starts_with("TOML parse error at line 1"), "{said}");
    assert!(!said.ends_with('\n'), "{said:?}");
    assert_eq!(
        err("deadline = 60\nlink = 3\n"),
        "plan: link must be an array of tables ([[...]] entries) (got 3)"
    );
}

#[test]
fn a_single_link_needs_no_naming() {
    let p = parse(
        "deadline = 60\n[[link]]\nname = \"l\"\nrate_bps = \"1G\"\nrtt_ms = 10\n\
         [[vm]]\nname = \"a\"\nmemory_bytes = \"1G\"\nstale_bytes = 0\n",
        NOW,
    )
    .unwrap();
    assert_eq!(p.fleet.vms[0].link, 0);
    assert_eq!(p.fleet.vms[0].stale_bytes, 0);
    assert_eq!(p.options.margin, DEFAULT_MARGIN);
}

#[test]
fn the_example_in_the_docs_parses() {
    let text = include_str!("../../../docs/examples/fleet.toml");
    let p = parse(text, NOW).unwrap();
    assert!(p.fleet.vms.len() >= 5);
    let plan = crate::plan::plan(&p.fleet, &p.options);
    assert!(plan.totals.saved > 0);
}

#[test]
fn control_endpoints_and_certificates() {
    // Without them (as `faultline plan` needs): none.
    let p = parse(GOOD, NOW).unwrap();
    assert_eq!(p.control.vms, vec![None, None, None]);
    assert_eq!(p.control.cert, None);

    let text = good_but(
        "deadline = \"15m\"",
        "deadline = \"15m\"\ncert = \"orch.crt\"\nkey = \"orch.key\"\npeer_cert = \"src.crt\"",
    )
    .replacen(
        "priority = 3",
        "priority = 3\ncontrol = \"10.0.0.5:7100\"\npeer_cert = \"db-1.crt\"",
        1,
    )
    .replacen(
        "memory_bytes = \"8G\"",
        "memory_bytes = \"8G\"\ncontrol = \"web-1.example:7100\"",
        1,
    );
    let p = parse(&text, NOW).unwrap();
    assert_eq!(p.control.cert.as_deref(), Some("orch.crt"));
    assert_eq!(p.control.key.as_deref(), Some("orch.key"));
    assert_eq!(p.control.peer_cert.as_deref(), Some("src.crt"));
    let db = p.control.vms[0].as_ref().unwrap();
    assert_eq!(db.addr.to_string(), "10.0.0.5:7100");
    assert_eq!(db.peer_cert.as_deref(), Some("db-1.crt"));
    let web = p.control.vms[1].as_ref().unwrap();
    assert_eq!(
        (web.addr.host.as_str(), web.addr.port),
        ("web-1.example", 7100)
    );
    assert_eq!(web.peer_cert, None);
    assert_eq!(p.control.vms[2], None);

    // Bad ones name the VM and the key.
    let bad = good_but(
        "memory_bytes = \"8G\"",
        "memory_bytes = \"8G\"\ncontrol = \"web-1\"",
    );
    assert_eq!(
        err(&bad),
        "vm \"web-1\": control = \"web-1\" is not an address host:port (examples: \
         \"10.0.0.5:7100\", \"src-3.example:7100\", \"[fd00::5]:7100\")"
    );
    let bad = good_but(
        "memory_bytes = \"8G\"",
        "memory_bytes = \"8G\"\ncontrol = 7100",
    );
    assert_eq!(
        err(&bad),
        "vm \"web-1\": control must be an address host:port (got 7100)"
    );
    let bad = good_but(
        "memory_bytes = \"8G\"",
        "memory_bytes = \"8G\"\npeer_cert = \"x.crt\"",
    );
    assert!(err(&bad).starts_with("vm \"web-1\": peer_cert is given but control"));
    let bad = good_but("deadline = \"15m\"", "deadline = \"15m\"\ncert = 5");
    assert_eq!(err(&bad), "plan: cert must be a file path (got 5)");
}

#[test]
fn rates_in_bytes_fractions_of_a_byte_and_exabytes_are_refused_with_why() {
    let bad = |from: &str, to: &str| err(&good_but(from, to));
    assert_eq!(
        bad("dirty_rate_bps = \"200M\"", "dirty_rate_bps = \"100MB/s\""),
        "vm \"db-1\": dirty_rate_bps = \"100MB/s\" is in bytes a second: rates are bits a \
         second (write \"800 Mbit/s\")"
    );
    assert!(bad("rate_bps = \"1G\"", "rate_bps = \"1GBPs\"").ends_with("(write \"8 Gbit/s\")"));
    // Bits a second, however written, are rates.
    assert!(parse(&good_but("rate_bps = \"1G\"", "rate_bps = \"1Gbps\""), NOW).is_ok());
    assert_eq!(
        bad("memory_bytes = 4096", "memory_bytes = 1.5"),
        "vm \"scratch\": memory_bytes = 1.5 is not a whole number of bytes (\"1.5G\" is fine)"
    );
    assert_eq!(
        bad("memory_bytes = 4096", "memory_bytes = 1e-300"),
        "vm \"scratch\": memory_bytes = 1e-300 is not a whole number of bytes (\"1.5G\" is fine)"
    );
    assert!(bad("memory_bytes = 4096", "memory_bytes = \"1.5\"").contains("is not a size in bytes"));
    assert!(parse(
        &good_but("memory_bytes = 4096", "memory_bytes = 4096.0"),
        NOW
    )
    .is_ok());
    assert!(bad("memory_bytes = 4096", "memory_bytes = \"2E\"").contains("between 0 and 1 EiB"));
}
