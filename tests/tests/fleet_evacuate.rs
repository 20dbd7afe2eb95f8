//! `faultline evacuate`: the orchestrator driving real `faultline replicate --control`
//! sources, each replicating into its own `faultline standby`, on loopback. Every VM that
//! the orchestrator reports done has the same digest of all memory on both sides.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use faultline_tests::http::scrape;
use faultline_tests::{
    assert_evacuated, assert_takes_a_real_source, faultline_bin, free_udp_port, kvm_present,
    Background, Certs, DestProcess, Reaped, ShmDir,
};
use serde_json::Value;
use transport::tls::Identity;
use wan_emu::{LinkConfig, WanEmulator};

const TIMEOUT: Duration = Duration::from_secs(60);

/// One VM: its standby and its source, the source's control endpoint on `port`.
struct Pair {
    name: String,
    port: u16,
    standby: DestProcess,
    source: Background,
    dir: ShmDir,
}

impl Pair {
    /// `faultline standby` and `faultline replicate --control` of a `size` guest, the
    /// control endpoint pinning the orchestrator's certificate.
    fn start(certs: &Certs, name: &str, size: &str, extra: &[&str]) -> Pair {
        Self::start_over(certs, name, size, extra, None).0
    }

    /// [`Pair::start`], the evacuation (not the replication) through an emulated `link`.
    fn start_over(
        certs: &Certs,
        name: &str,
        size: &str,
        extra: &[&str],
        link: Option<LinkConfig>,
    ) -> (Pair, Option<WanEmulator>) {
        let dir = ShmDir::new(name);
        let standby = DestProcess::standby(
            certs,
            "127.0.0.1:0",
            &["--size", size, "--replica-dir", &dir.arg(), "--vm-id", name],
        );
        let wan = link.map(|l| {
            let upstream = standby.addr.parse().unwrap();
            WanEmulator::start("127.0.0.1:0".parse().unwrap(), upstream, l).unwrap()
        });
        let relay = wan.as_ref().map(|w| w.local_addr().to_string());
        let via: Vec<&str> = match &relay {
            Some(r) => vec!["--evacuate-connect", r],
            None => vec![],
        };
        let port = free_udp_port();
        let control = format!("127.0.0.1:{port}");
        let orchestrator = certs.cert("orchestrator");
        let args = [
            &[
                "--synthetic",
                size,
                "--vm-id",
                name,
                "--write-rate",
                "2000",
                "--control",
                &control,
                "--control-peer-cert",
                &orchestrator,
            ][..],
            extra,
            &via,
        ]
        .concat();
        let source = Background::replicate(certs, &standby.addr, &args);
        let pair = Pair {
            name: name.into(),
            port,
            standby,
            source,
            dir,
        };
        (pair, wan)
    }

    /// Both processes to their end; their reports with memory checked equal.
    fn assert_evacuated(self) -> (Value, Value) {
        let src = self.source.wait(TIMEOUT);
        let dst = self.standby.wait(TIMEOUT);
        assert_evacuated(&src, &dst)
    }
}

/// Certificates for the sources, standbys, the orchestrator and an intruder.
fn certs() -> Certs {
    let certs = Certs::new();
    Identity::generate("orchestrator")
        .unwrap()
        .save(
            &certs.dir.path().join("orchestrator.crt"),
            &certs.dir.path().join("orchestrator.key"),
        )
        .unwrap();
    certs
}

/// A plan file on one loopback link stated at `rate`; `me` is the orchestrator's
/// identity, `vms` are (name, memory, control port).
fn plan_file(certs: &Certs, me: &str, rate: &str, vms: &[(&str, &str, u16)]) -> PathBuf {
    plan_file_with(certs, me, rate, vms, "")
}

/// [`plan_file`], with `vm_lines` added to every VM's entry.
fn plan_file_with(
    certs: &Certs,
    me: &str,
    rate: &str,
    vms: &[(&str, &str, u16)],
    vm_lines: &str,
) -> PathBuf {
    let mut s = format!(
        "deadline = \"10m\"\ncert = {:?}\nkey = {:?}\npeer_cert = {:?}\n\n\
         [[link]]\nname = \"lo\"\nrate_bps = {rate:?}\nrtt_ms = 1\n",
        certs.cert(me),
        certs.key(me),
        certs.cert("source"),
    );
    for (name, mem, port) in vms {
        s += &format!(
            "\n[[vm]]\nname = {name:?}\nmemory_bytes = {mem:?}\ncontrol = \"127.0.0.1:{port}\"\n{vm_lines}"
        );
    }
    let path = certs.dir.path().join("fleet.toml");
    std::fs::write(&path, s).unwrap();
    path
}

/// A running `faultline evacuate --json --progress`, its event lines read as they come.
struct Orchestrator {
    /// Killed if a test panics before it ended.
    child: Reaped,
    events: mpsc::Receiver<Value>,
    stderr: mpsc::Receiver<String>,
}

impl Orchestrator {
    fn start(plan: &PathBuf, extra: &[&str]) -> Orchestrator {
        let child = Command::new(faultline_bin())
            .args(["evacuate", "--json", "--progress", "--plan"])
            .arg(plan)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn faultline evacuate");
        let mut child = Reaped::new(child);
        let err = child.stderr.take().unwrap();
        let (ev_tx, events) = mpsc::channel();
        let (line_tx, stderr) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Some(v) = parse_event(&line) {
                    let _ = ev_tx.send(v);
                }
                let _ = line_tx.send(line);
            }
        });
        Orchestrator {
            child,
            events,
            stderr,
        }
    }

    /// Waits for an event `kind` about `vm`.
    fn wait_event(&self, kind: &str, vm: &str) -> Value {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .events
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {kind} event for {vm}"));
            if v["event"] == kind && v["vm"] == vm {
                return v;
            }
        }
    }

    /// Takes events into `seen` until `done(seen)` holds.
    fn wait_until(&self, seen: &mut Vec<Value>, what: &str, done: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        while !done(seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .events
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("waiting for {what}; events: {seen:?}"));
            seen.push(v);
        }
    }

    /// Its exit code, its JSON report, its stderr (events included).
    /// The address `--metrics-listen` bound, from its log line (the stderr lines before it
    /// are not kept for [`Orchestrator::wait`]).
    fn metrics_addr(&self) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .stderr
                .recv_timeout(left)
                .expect("no `metrics listening on` line");
            if let Some(rest) = line.strip_prefix("metrics listening on http://") {
                return rest.trim_end_matches("/metrics").to_string();
            }
        }
    }

    fn wait(mut self) -> (Option<i32>, Value, String) {
        let mut out = self.child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("faultline evacuate did not finish within {TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stdout = reader.join().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let stderr: Vec<String> = self.stderr.try_iter().collect();
        let json = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
        (status.code(), json, stderr.join("\n"))
    }
}

/// An event line of the orchestrator's stderr (`@faultline {...}`).
fn parse_event(line: &str) -> Option<Value> {
    serde_json::from_str(line.strip_prefix("@faultline ")?).ok()
}

/// The orchestrator's `kind` event about `vm` in its stderr.
fn event(stderr: &str, kind: &str, vm: &str) -> Value {
    stderr
        .lines()
        .filter_map(parse_event)
        .find(|e| e["event"] == kind && e["vm"] == vm)
        .unwrap_or_else(|| panic!("no {kind} event for {vm}: {stderr}"))
}

fn vm<'a>(r: &'a Value, name: &str) -> &'a Value {
    r["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no vm {name} in {r}"))
}

fn secs(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a time: {v}"))
}

/// A KVM guest of the reference VMM (`vm source --replicate --control` into `vm dest
/// --replica-dir`) and an image source, evacuated by one orchestrator: the guest runs until
/// it is asked, and both arrive with equal memory. Skipped (with a message) without
/// /dev/kvm.
#[test]
fn a_reference_vmm_guest_and_an_image_source_are_evacuated_together() {
    if !kvm_present() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let certs = certs();
    let image = Pair::start(&certs, "img", "32M", &["--stale-pct", "5"]);
    let dir = ShmDir::new("kvm");
    let guest = [
        "--size",
        "64M",
        "--vcpus",
        "1",
        "--program",
        "random-rw",
        "--working-set",
        "16M",
        "--report-every",
        "16384",
    ];
    let dest = DestProcess::vm(
        &certs,
        &[
            &guest[..],
            &["--replica-dir", &dir.arg(), "--run-secs", "1"],
        ]
        .concat(),
    );
    let port = free_udp_port();
    let control = format!("127.0.0.1:{port}");
    let orchestrator = certs.cert("orchestrator");
    let extra = [
        "--vm-id",
        "kvm",
        "--replicate",
        "--stale-pct",
        "5",
        "--control",
        &control,
        "--control-peer-cert",
        &orchestrator,
    ];
    let source = Background::vm_source(&certs, &dest.addr, &[&guest[..], &extra].concat());
    // Replicating: give the replica time to fill (64 MiB on loopback) before the warning.
    std::thread::sleep(Duration::from_secs(3));
    let plan = plan_file(
        &certs,
        "orchestrator",
        "100M",
        &[("img", "32M", image.port), ("kvm", "64M", port)],
    );
    let (rc, r, err) = Orchestrator::start(&plan, &[]).wait();
    assert_eq!(rc, Some(0), "{err}\n{r}");
    assert_eq!(r["totals"]["done"], 2, "{r}");
    let v = vm(&r, "kvm");
    assert_eq!(v["outcome"], "done", "{v}");
    assert!(v["pages_stale"].as_u64().unwrap() > 0, "{v}");
    // Its source estimated what the push would make of a page from the pages it will
    // plant (`--stale-pct`: pages of the guest's working set, sampled afresh every second
    // as the guest fills it), and the plan started it with such an estimate.
    let connected = event(&err, "connected", "kvm");
    assert!(connected["wire_ratio"].is_f64(), "{connected}");
    // The plan file's default is 1 exactly; no estimate is (a raw page costs its kind
    // byte too), so this fails if the plan never got one.
    let at_start = v["wire_ratio_at_start"].as_f64().unwrap_or(1.0);
    assert!((at_start - 1.0).abs() > 1e-6, "{v}");
    let src = source.wait(TIMEOUT);
    let dst = dest.wait(TIMEOUT);
    assert!(src.status.success(), "vm source failed: {}", src.stderr);
    assert!(dst.status.success(), "vm dest failed: {}", dst.stderr);
    let (s, d) = (&src.json, &dst.json);
    assert!(s["memory_digest"].is_string(), "{s}");
    assert_eq!(
        d["switchover_digest"], s["memory_digest"],
        "the standby's guest memory differs from the source's at switchover"
    );
    assert!(s["replica"]["pages_stale"].as_u64().unwrap() > 0, "{s}");
    image.assert_evacuated();
}

/// A source with a disk says how large it is (its stale bytes count the disk's blocks):
/// the plan file need not, and memory and disk arrive equal.
#[test]
fn a_source_with_a_disk_reports_its_size_and_both_arrive_equal() {
    let certs = certs();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vda.img");
    faultline_tests::block_image(&image, 4096);
    let shm = ShmDir::new("vm-disk");
    let disk_dir = dir.path().join("standby-disks");
    let standby = DestProcess::standby(
        &certs,
        "127.0.0.1:0",
        &[
            "--size",
            "32M",
            "--replica-dir",
            &shm.arg(),
            "--vm-id",
            "vm-disk",
            "--disk",
            "vda=16M",
            "--disk-dir",
            &disk_dir.display().to_string(),
        ],
    );
    let port = free_udp_port();
    let control = format!("127.0.0.1:{port}");
    let orchestrator = certs.cert("orchestrator");
    let source = Background::replicate(
        &certs,
        &standby.addr,
        &[
            "--synthetic",
            "32M",
            "--vm-id",
            "vm-disk",
            "--stale-pct",
            "5",
            "--disk",
            &format!("vda={}", image.display()),
            "--disk-stale-pct",
            "5",
            "--control",
            &control,
            "--control-peer-cert",
            &orchestrator,
        ],
    );
    faultline_tests::wait_replicated(&shm, 8192, 0.5);
    // The file says nothing of the disk.
    let plan = plan_file(&certs, "orchestrator", "1G", &[("vm-disk", "32M", port)]);
    let (rc, r, err) = Orchestrator::start(&plan, &[]).wait();
    assert_eq!(rc, Some(0), "{err}\n{r}");
    let connected = event(&err, "connected", "vm-disk");
    assert_eq!(connected["disk_bytes"], 16 << 20, "{connected}");
    assert_eq!(vm(&r, "vm-disk")["outcome"], "done", "{r}");
    let (s, d) = assert_evacuated(&source.wait(TIMEOUT), &standby.wait(TIMEOUT));
    assert_eq!(
        s["disk_digests"], d["disk_digests"],
        "disk differs: {s} {d}"
    );
}

#[test]
fn three_vms_are_evacuated_in_the_planned_order_with_equal_memory() {
    let t = Instant::now();
    let certs = certs();
    // Exactly 5% of each guest's pages stale at its evacuation (410 of 8192); two raw on
    // the wire, so the bytes sent bound them from below, and one compressed (the
    // stand-in's pages are a quarter near-zero and half text), whose source counts what
    // lz4 made of a page, the early push included (on loopback it may send them all; it
    // compresses as the push after it does).
    let encoded = ["--stale-pct", "5", "--encoding", "lz4"];
    let pairs: Vec<Pair> = [
        Pair::start(
            &certs,
            "vm-a",
            "32M",
            &["--stale-pct", "5", "--encoding", "off"],
        ),
        Pair::start(
            &certs,
            "vm-b",
            "32M",
            &["--stale-pct", "5", "--encoding", "off"],
        ),
        Pair::start(&certs, "vm-c", "32M", &encoded),
    ]
    .into();
    let vms: Vec<_> = pairs
        .iter()
        .map(|p| (p.name.as_str(), "32M", p.port))
        .collect();
    let plan = plan_file(&certs, "orchestrator", "100M", &vms);
    // Set up and sampling their memory, so that the sources' first statuses carry their
    // estimates of what the encoding will make of a page.
    for p in &pairs {
        faultline_tests::wait_replicated(&p.dir, 8192, 0.5);
    }
    let chart = plan.with_extension("run.svg");
    let (rc, r, err) = Orchestrator::start(&plan, &["--gantt", chart.to_str().unwrap()]).wait();
    assert_eq!(rc, Some(0), "{err}\n{r}");
    // The run's Gantt chart: a row per VM, measured bars over the plan's outlines.
    assert_eq!(r["gantt"], chart.display().to_string(), "{r}");
    let svg = std::fs::read_to_string(&chart).expect("the Gantt chart was written");
    assert!(
        svg.starts_with("<svg") || svg.starts_with("<?xml"),
        "{svg:.200}"
    );
    for p in &pairs {
        assert!(
            svg.contains(&format!("\n{}\n", p.name)),
            "no row for {}",
            p.name
        );
    }
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["totals"]["done"], 3, "{r}");
    assert_eq!(r["totals"]["saved_by_deadline"], 3, "{r}");
    for p in &pairs {
        let v = vm(&r, &p.name);
        assert_eq!(v["outcome"], "done", "{v}");
        let m = &v["measured"];
        // A timeline a chart can draw: start <= switchover <= finish.
        let (s, w, f) = (
            secs(&m["start_s"]),
            secs(&m["switchover_s"]),
            secs(&m["finish_s"]),
        );
        assert!(s <= w && w <= f, "{m}");
        assert!(v["planned"]["start_s"].is_number(), "{v}");
        assert!(v["pages_stale"].as_u64().unwrap() >= 410, "{v}");
        let done = event(&err, "done", &p.name);
        let ratio = done["wire_ratio"].as_f64().unwrap_or(f64::NAN);
        assert_eq!(v["wire_ratio"], done["wire_ratio"], "{v}");
        // What its source estimated from its memory before the start, which the plan used.
        let estimate = v["wire_ratio_at_start"].as_f64().unwrap_or(f64::NAN);
        if p.name == "vm-c" {
            assert!((0.01..0.9).contains(&ratio), "{done}");
            assert!((estimate - ratio).abs() < 0.1, "{v}");
        } else {
            assert!(v["bytes_sent"].as_u64().unwrap() > 410 * 4096, "{v}");
            // A kind byte a page: 4,097 / 4,096 (not the plan file's default of 1).
            assert!((1.0..1.001).contains(&ratio), "{done}");
            assert!((1.0002..1.0003).contains(&estimate), "{v}");
        }
    }
    // Started in the planned order.
    let mut by_plan: Vec<&Value> = r["vms"].as_array().unwrap().iter().collect();
    by_plan.sort_by_key(|v| v["planned"]["order"].as_u64());
    let starts: Vec<f64> = by_plan
        .iter()
        .map(|v| secs(&v["measured"]["start_s"]))
        .collect();
    assert!(starts.windows(2).all(|w| w[0] <= w[1]), "{starts:?}");
    // One event line per state change.
    for kind in [
        "planned",
        "connected",
        "started",
        "switchover",
        "done",
        "finished",
    ] {
        assert!(
            err.contains(&format!("\"event\":\"{kind}\"")),
            "no {kind} event: {err}"
        );
    }
    for p in pairs {
        p.assert_evacuated();
    }
    eprintln!("three VMs evacuated in {:?}: {r}", t.elapsed());
}

#[test]
fn a_source_killed_mid_evacuation_fails_alone() {
    let t = Instant::now();
    let certs = certs();
    let a = Pair::start(&certs, "vm-a", "32M", &[]);
    // vm-b evacuates 8 MiB of stale pages through 20 Mbit/s: about 3 s, killed 1 MiB in.
    let (b, wan) = Pair::start_over(
        &certs,
        "vm-b",
        "32M",
        &["--stale-pct", "25", "--encoding", "off"],
        Some(LinkConfig::new(Duration::from_millis(2), 20_000_000)),
    );
    let wan = wan.unwrap();
    let c = Pair::start(&certs, "vm-c", "32M", &[]);
    let plan = plan_file(
        &certs,
        "orchestrator",
        "1G",
        &[
            ("vm-a", "32M", a.port),
            ("vm-b", "32M", b.port),
            ("vm-c", "32M", c.port),
        ],
    );
    let chart = plan.with_extension("run.svg");
    let o = Orchestrator::start(
        &plan,
        &[
            "--silence-timeout",
            "2",
            "--gantt",
            chart.to_str().unwrap(),
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let metrics = o.metrics_addr();
    o.wait_event("started", "vm-b");
    // The evacuation as metrics: vm-b started (1) or switched over (2), the link's rate.
    // (The event can come out a moment before the metrics follow it.)
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = scrape(&metrics);
        let phase = text
            .lines()
            .find(|l| l.starts_with("faultline_evacuate_vm_phase{vm=\"vm-b\""))
            .unwrap_or_else(|| panic!("no phase of vm-b in\n{text}"))
            .to_string();
        if phase.ends_with(" 1") || phase.ends_with(" 2") {
            break text;
        }
        assert!(
            phase.ends_with(" 0") && Instant::now() < deadline,
            "vm-b started, yet its phase is {phase}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        text.contains("faultline_evacuate_link_rate_bits_per_second{link=\"lo\"} "),
        "{text}"
    );
    let deadline = Instant::now() + TIMEOUT;
    while wan.counters().client_to_server.bytes < 1 << 20 {
        assert!(
            Instant::now() < deadline,
            "vm-b's evacuation never got going"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    b.source.kill();
    let crossed = wan.counters().client_to_server.bytes;
    assert!(crossed < 6 << 20, "vm-b was nearly done: {crossed} B");
    let failed = o.wait_event("failed", "vm-b");
    let (rc, r, err) = o.wait();
    assert_eq!(rc, Some(1), "{err}\n{r}");
    assert_eq!(r["ok"], false, "{r}");
    let vb = vm(&r, "vm-b");
    assert_eq!(vb["outcome"], "failed", "{vb}");
    assert_eq!(vb["error"], failed["error"]);
    // Killed after its switchover, with its stale pages on the way.
    assert!(vb["measured"]["switchover_s"].is_number(), "{vb}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("vm \"vm-b\""),
        "{r}"
    );
    assert_eq!(r["totals"]["done"], 2, "{r}");
    assert_eq!(r["totals"]["failed"], 1, "{r}");
    // A failed evacuation is drawn too (its row ends in a cross, its reason beside it).
    let svg = std::fs::read_to_string(&chart).expect("the Gantt chart was written");
    for name in ["vm-a", "vm-b", "vm-c"] {
        assert!(svg.contains(&format!("\n{name}\n")), "no row for {name}");
    }
    b.standby.kill();
    a.assert_evacuated();
    c.assert_evacuated();
    eprintln!("killed source case in {:?}: {}", t.elapsed(), vb["error"]);
}

/// Whether `seen` has a `kind` event about `vm`.
fn has(seen: &[Value], kind: &str, vm: &str) -> bool {
    seen.iter().any(|e| e["event"] == kind && e["vm"] == vm)
}

/// The orchestrator's end: exit code 0, every VM done and none stalled; then every pair's
/// memory checked equal. Its report.
fn all_arrive(o: Orchestrator, pairs: Vec<Pair>) -> Value {
    let (rc, r, err) = o.wait();
    assert_eq!(rc, Some(0), "{err}\n{r}");
    assert_eq!(r["totals"]["done"], pairs.len(), "{r}");
    assert_eq!(r["totals"]["stalled"], 0, "{r}");
    for p in pairs {
        p.assert_evacuated();
    }
    r
}

/// Sends `sig` to process `pid`.
fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a child process we spawned and have not waited for.
    let r = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(r, 0, "kill {pid}: {}", std::io::Error::last_os_error());
}

/// Three 32 MiB VMs, each evacuating 6.4 MiB of stale pages through an emulator of its own
/// at 20 Mbit/s (about 2.7 s each), and a plan file stating one 20 Mbit/s link: one flow
/// fills it, so one VM transfers at a time and the next is held behind it.
fn three_through_20_mbit(certs: &Certs) -> (Vec<Pair>, Vec<WanEmulator>, PathBuf) {
    three_through_20_mbit_on(certs, "20", "20M", "")
}

/// [`three_through_20_mbit`] with `stale_pct` of each VM stale, the plan stating its link
/// at `link_rate` and adding `vm_lines` to every VM's entry.
fn three_through_20_mbit_on(
    certs: &Certs,
    stale_pct: &str,
    link_rate: &str,
    vm_lines: &str,
) -> (Vec<Pair>, Vec<WanEmulator>, PathBuf) {
    let (pairs, wans): (Vec<Pair>, Vec<WanEmulator>) = ["vm-a", "vm-b", "vm-c"]
        .into_iter()
        .map(|name| {
            let (p, wan) = Pair::start_over(
                certs,
                name,
                "32M",
                &["--stale-pct", stale_pct, "--encoding", "off"],
                Some(LinkConfig::new(Duration::from_millis(2), 20_000_000)),
            );
            (p, wan.unwrap())
        })
        .unzip();
    let vms: Vec<(&str, &str, u16)> = pairs
        .iter()
        .map(|p| (p.name.as_str(), "32M", p.port))
        .collect();
    let plan = plan_file_with(certs, "orchestrator", link_rate, &vms, vm_lines);
    (pairs, wans, plan)
}

/// Waits (events into `seen`) for the first VM to switch over and for `bytes` of it to
/// cross its emulator; its index in `pairs`.
fn first_transfer(
    o: &Orchestrator,
    seen: &mut Vec<Value>,
    pairs: &[Pair],
    wans: &[WanEmulator],
    bytes: u64,
) -> usize {
    o.wait_until(seen, "a switchover", |s| {
        s.iter().any(|e| e["event"] == "switchover")
    });
    let first = seen.iter().find(|e| e["event"] == "switchover").unwrap()["vm"]
        .as_str()
        .unwrap()
        .to_string();
    let k = pairs.iter().position(|p| p.name == first).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while wans[k].counters().client_to_server.bytes < bytes {
        assert!(
            Instant::now() < deadline,
            "{first}'s evacuation never got going"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    k
}

/// A source that stays alive while its standby is stopped (SIGSTOP) mid-evacuation: its
/// events go on, its bytes left do not fall (its session waits for the standby, as it would
/// through an outage). The orchestrator reports it stalled and lets the VMs behind it start
/// (they would otherwise wait for good: with the stall timeout at 1000 s, nothing else had
/// started after 150 s), and it finishes when the standby continues: all three arrive with
/// equal memory.
#[test]
fn a_stalled_vm_gives_its_link_to_the_others_and_finishes_when_it_moves_again() {
    let t = Instant::now();
    let certs = certs();
    let (pairs, wans, plan) = three_through_20_mbit(&certs);
    let chart = plan.with_extension("run.svg");
    let o = Orchestrator::start(
        &plan,
        &["--stall-timeout", "3", "--gantt", chart.to_str().unwrap()],
    );
    // One flow fills the link: one VM transfers, the next is held behind it.
    let mut seen = Vec::new();
    let k = first_transfer(&o, &mut seen, &pairs, &wans, 1 << 20);
    let first = pairs[k].name.clone();
    signal(pairs[k].standby.pid(), libc::SIGSTOP);
    let stopped = Instant::now();
    let others: Vec<String> = pairs
        .iter()
        .filter(|p| p.name != first)
        .map(|p| p.name.clone())
        .collect();
    o.wait_until(&mut seen, "the others done", |s| {
        others.iter().all(|n| has(s, "done", n))
    });
    let stalled_for = stopped.elapsed();
    let stall = seen
        .iter()
        .find(|e| e["event"] == "stalled" && e["vm"] == first.as_str())
        .unwrap_or_else(|| panic!("{first} was not reported stalled: {seen:?}"));
    assert!(stall["remaining_bytes"].as_u64().unwrap() > 0, "{stall}");
    // Found within a few turns of the orchestrator's loop after the timeout (3 s).
    let found_after = secs(&stall["t_s"]) - secs(&stall["since_s"]);
    assert!((3.0..6.0).contains(&found_after), "{stall}");
    assert!(!has(&seen, "done", &first), "{first} is stopped: {seen:?}");
    signal(pairs[k].standby.pid(), libc::SIGCONT);
    o.wait_until(&mut seen, "it moving again and done", |s| {
        has(s, "moving", &first) && has(s, "done", &first)
    });
    let r = all_arrive(o, pairs);
    assert!(
        secs(&r["ended_s"]) >= secs(&r["totals"]["makespan_s"]),
        "{r}"
    );
    // The report keeps the stall, and the chart draws it.
    let stalls = vm(&r, &first)["stalls"].as_array().unwrap().clone();
    assert_eq!(stalls.len(), 1, "{r}");
    assert!(
        secs(&stalls[0]["until_s"]) > secs(&stalls[0]["since_s"]),
        "{stalls:?}"
    );
    let svg = std::fs::read_to_string(&chart).expect("the Gantt chart was written");
    assert!(svg.contains("stalled: not moving"), "no stall in the chart");
    eprintln!(
        "stalled case in {:?}; the others done {stalled_for:?} after the stop",
        t.elapsed()
    );
}

/// Two VMs transferring side by side (a 40 Mbit/s link, each VM limited to 20; 12.8 MiB
/// stale each, about 5.4 s, so that the third VM's prestart is not due before the stall),
/// both standbys stopped (SIGSTOP) together, as a standby host's crash would: that cannot
/// be told from an outage, so one is stalled and the third VM starts in its place. Its
/// standby is alive: it moves, the link carries, so the other stopped VM is stalled too,
/// and the third finishes while both stay stopped (before, neither was stalled and the
/// third never started). When the standbys continue both finish: all three arrive with
/// equal memory.
#[test]
fn standbys_stopped_together_are_told_from_an_outage_by_the_vm_started_in_their_place() {
    let t = Instant::now();
    let certs = certs();
    let (pairs, wans, plan) =
        three_through_20_mbit_on(&certs, "40", "40M", "max_rate_bps = \"20M\"\n");
    let o = Orchestrator::start(&plan, &["--stall-timeout", "3"]);
    let mut seen = Vec::new();
    o.wait_until(&mut seen, "two switchovers", |s| {
        s.iter().filter(|e| e["event"] == "switchover").count() >= 2
    });
    let stopped: Vec<usize> = pairs
        .iter()
        .enumerate()
        .filter(|(_, p)| has(&seen, "switchover", &p.name))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(stopped.len(), 2, "two run at once: {seen:?}");
    for &k in &stopped {
        let deadline = Instant::now() + TIMEOUT;
        while wans[k].counters().client_to_server.bytes < 512 << 10 {
            assert!(
                Instant::now() < deadline,
                "{} never got going",
                pairs[k].name
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    for &k in &stopped {
        signal(pairs[k].standby.pid(), libc::SIGSTOP);
    }
    let third = (0..3).find(|k| !stopped.contains(k)).unwrap();
    let third_name = pairs[third].name.clone();
    o.wait_until(&mut seen, "the third done", |s| has(s, "done", &third_name));
    for &k in &stopped {
        let name = &pairs[k].name;
        assert!(
            has(&seen, "stalled", name),
            "{name} was not stalled: {seen:?}"
        );
        assert!(!has(&seen, "done", name), "{name} is stopped: {seen:?}");
    }
    for &k in &stopped {
        signal(pairs[k].standby.pid(), libc::SIGCONT);
    }
    let names: Vec<String> = stopped.iter().map(|&k| pairs[k].name.clone()).collect();
    o.wait_until(&mut seen, "both moving again and done", |s| {
        names
            .iter()
            .all(|n| has(s, "moving", n) && has(s, "done", n))
    });
    // The third started in the place of the first VM stalled, not before.
    let at = |kind: &str, vm: Option<&str>| {
        seen.iter()
            .position(|e| e["event"] == kind && vm.is_none_or(|v| e["vm"] == v))
            .unwrap_or_else(|| panic!("no {kind} event: {seen:?}"))
    };
    let brief: Vec<String> = seen
        .iter()
        .map(|e| format!("{} {} {}", e["t_s"], e["event"], e["vm"]))
        .collect();
    assert!(
        at("stalled", None) < at("started", Some(&third_name)),
        "{brief:#?}"
    );
    all_arrive(o, pairs);
    eprintln!("standbys stopped together: {:?}", t.elapsed());
}

/// A link outage, as every VM's emulator cut at once mid-evacuation for 8 s (beyond the
/// stall timeout of 3 s): the VM under way, alone on its link, is stalled (it cannot be
/// told from a stuck standby) and one more VM starts, into the outage; it stops too, so no
/// third starts. When the link is back both move again and all three arrive with equal
/// memory.
#[test]
fn an_outage_starts_at_most_one_vm_into_it_and_every_vm_arrives() {
    let t = Instant::now();
    let certs = certs();
    let (pairs, wans, plan) = three_through_20_mbit(&certs);
    let o = Orchestrator::start(&plan, &["--stall-timeout", "3"]);
    let mut seen = Vec::new();
    let k = first_transfer(&o, &mut seen, &pairs, &wans, 512 << 10);
    let first = pairs[k].name.clone();
    for w in &wans {
        w.cut();
    }
    let started_before = seen.iter().filter(|e| e["event"] == "started").count();
    std::thread::sleep(Duration::from_secs(8));
    // What happened during the cut, as far as it was told.
    while let Ok(e) = o.events.try_recv() {
        seen.push(e);
    }
    let during: Vec<Value> = seen.clone();
    for w in &wans {
        w.restore();
    }
    let stalled: Vec<&Value> = during.iter().filter(|e| e["event"] == "stalled").collect();
    assert!(stalled.len() <= 1, "{stalled:?}");
    if let Some(s) = stalled.first() {
        assert_eq!(s["vm"], first.as_str(), "{s}");
    }
    let started_during = during.iter().filter(|e| e["event"] == "started").count() - started_before;
    assert!(started_during <= 1, "{during:?}");
    assert!(
        !during.iter().any(|e| e["event"] == "done"),
        "nothing can finish through a cut link: {during:?}"
    );
    all_arrive(o, pairs);
    eprintln!(
        "outage case in {:?}: {} stalled, {started_during} started during the cut",
        t.elapsed(),
        stalled.len()
    );
}

#[test]
fn a_control_address_that_does_not_answer_is_named() {
    let certs = certs();
    let dead = free_udp_port();
    let plan = plan_file(&certs, "orchestrator", "1G", &[("vm-x", "32M", dead)]);
    faultline_bin(); // built before the clock starts
    let t = Instant::now();
    let (rc, r, err) = Orchestrator::start(&plan, &["--connect-timeout", "1"]).wait();
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_ne!(rc, Some(0), "{err}");
    assert_eq!(r["ok"], false, "{r}");
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!(
            "vm \"vm-x\": the control endpoint at 127.0.0.1:{dead} did not answer within 1 s"
        )),
        "{msg}"
    );
    // `plan --live` says the same.
    let p = plan.display().to_string();
    let live = Background::spawn(&["plan", "--live", "--json", "--connect-timeout", "1", &p])
        .wait(TIMEOUT);
    assert!(!live.status.success(), "{}", live.json);
    let msg = live.json["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("no source answered"), "{}", live.json);
    assert!(msg.contains("vm \"vm-x\": the control endpoint"), "{msg}");
}

#[test]
fn an_unreachable_vm_is_left_out_and_the_others_are_evacuated() {
    let certs = certs();
    let a = Pair::start(&certs, "vm-a", "32M", &[]);
    let dead = free_udp_port();
    let plan = plan_file(
        &certs,
        "orchestrator",
        "1G",
        &[("vm-a", "32M", a.port), ("vm-x", "32M", dead)],
    );
    // Up (its control endpoint is bound before replication starts), so that only vm-x
    // misses the short connect timeout.
    faultline_tests::wait_replicated(&a.dir, 8192, 0.5);
    let o = Orchestrator::start(&plan, &["--connect-timeout", "1"]);
    let ev = o.wait_event("unreachable", "vm-x");
    let (rc, r, err) = o.wait();
    assert_eq!(rc, Some(1), "{err}\n{r}");
    let why = format!("the control endpoint at 127.0.0.1:{dead} did not answer within 1 s");
    assert_eq!(ev["error"], why.as_str());
    assert!(err.contains(&format!("vm \"vm-x\": {why}")), "{err}");
    let x = vm(&r, "vm-x");
    assert_eq!(x["outcome"], "failed", "{x}");
    assert_eq!(x["measured"]["start_s"], Value::Null, "{x}");
    assert_eq!(vm(&r, "vm-a")["outcome"], "done", "{r}");
    a.assert_evacuated();
}

/// `faultline plan --live` plans with what the sources measure (their planted stale pages,
/// the wire ratio their encoding will give), names a source that does not answer, and
/// starts nothing: an evacuation after it finds both sources waiting, and both arrive equal.
#[test]
fn a_live_plan_takes_the_sources_figures_and_starts_nothing() {
    let certs = certs();
    let a = Pair::start(
        &certs,
        "vm-a",
        "32M",
        &["--stale-pct", "20", "--encoding", "auto"],
    );
    let b = Pair::start(
        &certs,
        "vm-b",
        "32M",
        &["--stale-pct", "5", "--encoding", "off"],
    );
    let dead = free_udp_port();
    let vms = [
        ("vm-a", "32M", a.port),
        ("vm-b", "32M", b.port),
        ("vm-x", "32M", dead),
    ];
    let plan = plan_file(&certs, "orchestrator", "1G", &vms);
    faultline_tests::wait_replicated(&a.dir, 8192, 0.5);
    faultline_tests::wait_replicated(&b.dir, 8192, 0.5);
    let planted = |pct: f64| (pct / 100.0 * 8192.0).floor() * 4096.0;
    let to_cross = |r: &Value, name: &str| {
        vm(r, name)["bytes_to_cross"]
            .as_f64()
            .unwrap_or_else(|| panic!("{r}"))
    };

    // The file alone: every byte of memory stale, raw.
    let file_only =
        Background::spawn(&["plan", "--json", &plan.display().to_string()]).wait(TIMEOUT);
    assert!(file_only.status.success(), "{}", file_only.stderr);
    assert_eq!(to_cross(&file_only.json, "vm-b"), 32.0 * 1024.0 * 1024.0);

    let live = Background::spawn(&[
        "plan",
        "--live",
        "--json",
        "--connect-timeout",
        "1",
        &plan.display().to_string(),
    ])
    .wait(TIMEOUT);
    assert!(live.status.success(), "{}", live.stderr);
    let r = &live.json;
    assert_eq!(r["live"], true, "{r}");
    let why = format!("the control endpoint at 127.0.0.1:{dead} did not answer within 1 s");
    assert_eq!(r["unreachable"][0]["vm"], "vm-x", "{r}");
    assert_eq!(r["unreachable"][0]["error"], why.as_str(), "{r}");
    assert!(
        live.stderr.contains(&format!("vm \"vm-x\": {why}")),
        "{}",
        live.stderr
    );
    assert_eq!(vm(r, "vm-x")["status"], "failed", "{r}");
    // vm-b, raw: its planted pages (a planting source reports no growth), 4,097/4,096 each.
    let b_ratio = to_cross(r, "vm-b") / planted(5.0);
    assert!((1.0..1.2).contains(&b_ratio), "vm-b: {b_ratio} {r}");
    // vm-a, lz4: its source's estimate of what the synthetic image's pages compress to.
    let a_ratio = to_cross(r, "vm-a") / planted(20.0);
    assert!(a_ratio > 0.05 && a_ratio < 0.9, "vm-a: {a_ratio} {r}");

    // Nothing started: both sources wait, and an evacuation moves them.
    let (rc, report, err) = Orchestrator::start(&plan, &["--connect-timeout", "1"]).wait();
    assert_eq!(rc, Some(1), "{err}\n{report}");
    for name in ["vm-a", "vm-b"] {
        assert_eq!(vm(&report, name)["outcome"], "done", "{report}");
    }
    a.assert_evacuated();
    b.assert_evacuated();
}

/// An orchestrator pointed at a migration listener (certificates that match both ways, so
/// only the protocol differs) is refused in the TLS handshake by the ALPN, told what that
/// means, and the listener goes on to accept a real source.
#[test]
fn an_orchestrator_pointed_at_a_migration_listener_is_refused_by_protocol() {
    let certs = certs();
    let dest = DestProcess::start(&certs, &["--size", "16M"]);
    let port: u16 = dest.addr.rsplit(':').next().unwrap().parse().unwrap();
    let plan = format!(
        "deadline = \"10m\"\ncert = {:?}\nkey = {:?}\npeer_cert = {:?}\n\n\
         [[link]]\nname = \"lo\"\nrate_bps = \"1G\"\nrtt_ms = 1\n\n\
         [[vm]]\nname = \"vm-a\"\nmemory_bytes = \"16M\"\ncontrol = \"127.0.0.1:{port}\"\n",
        certs.cert("source"),
        certs.key("source"),
        certs.cert("dest"),
    );
    let path = certs.dir.path().join("wrong-port.toml");
    std::fs::write(&path, plan).unwrap();
    let (rc, r, err) = Orchestrator::start(&path, &[]).wait();
    assert_ne!(rc, Some(0), "{err}");
    let msg = r["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("vm \"vm-a\""), "{msg}");
    assert!(msg.contains("the peer speaks another protocol"), "{msg}");
    // The listener is unharmed: a source migrates to it.
    assert_takes_a_real_source(&certs, dest);
}

#[test]
fn an_orchestrator_with_the_wrong_certificate_is_refused() {
    let certs = certs();
    let p = Pair::start(&certs, "vm-a", "32M", &[]);
    // The source pins the orchestrator's certificate; the intruder presents its own.
    let plan = plan_file(&certs, "intruder", "1G", &[("vm-a", "32M", p.port)]);
    let (rc, r, err) = Orchestrator::start(&plan, &[]).wait();
    assert_ne!(rc, Some(0), "{err}");
    let msg = r["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("vm \"vm-a\""), "{msg}");
    assert!(msg.contains("TLS handshake failed"), "{msg}");
    // Nothing was started: the source still replicates.
    std::thread::sleep(Duration::from_millis(500));
    let Pair {
        source, standby, ..
    } = p;
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", source.pid())).unwrap();
    let state = stat.rsplit(')').next().unwrap().split_whitespace().next();
    assert!(
        matches!(state, Some("R" | "S" | "D")),
        "the source ended: {stat}"
    );
    source.kill();
    standby.kill();
}

/// The orchestrator's side of one control stream, spoken by the test itself: `req`, then
/// every reply until the source ends the stream (or, with `until_accepted`, the first
/// `Accepted`). An error if the source cannot be reached.
fn control_request(
    certs: &Certs,
    port: u16,
    req: &fleet::control::Request,
    until_accepted: bool,
) -> Result<Vec<fleet::control::Reply>, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let me = Identity::load(
        &certs.dir.path().join("orchestrator.crt"),
        &certs.dir.path().join("orchestrator.key"),
    )
    .unwrap();
    let source = transport::tls::load_cert(std::path::Path::new(&certs.cert("source"))).unwrap();
    rt.block_on(async {
        let ep = {
            let bind = "127.0.0.1:0".parse().unwrap();
            transport::quic::control_client_endpoint(bind, &me, source).unwrap()
        };
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let conn = transport::quic::connect(&ep, addr)
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let frame = fleet::control::encode(req).unwrap();
        send.write_all(&frame).await.map_err(|e| e.to_string())?;
        let _ = send.finish();
        let (mut buf, mut replies, mut chunk) = (Vec::new(), Vec::new(), [0u8; 4096]);
        'read: loop {
            while let Ok((r, n)) = fleet::control::decode::<fleet::control::Reply>(&buf) {
                buf.drain(..n);
                let accepted = matches!(r, fleet::control::Reply::Accepted { .. });
                replies.push(r);
                if until_accepted && accepted {
                    break 'read;
                }
            }
            match tokio::time::timeout(TIMEOUT, recv.read(&mut chunk)).await {
                Ok(Ok(Some(n))) => buf.extend_from_slice(&chunk[..n]),
                _ => break,
            }
        }
        conn.close(0u32.into(), b"test");
        // Let the close leave, as the orchestrator does.
        let _ = tokio::time::timeout(Duration::from_secs(1), ep.wait_idle()).await;
        Ok(replies)
    })
}

/// Bytes the emulated link carried towards the standby over `d`, as bits per second.
fn rate_over(wan: &WanEmulator, d: Duration) -> f64 {
    let b0 = wan.counters().client_to_server.bytes;
    std::thread::sleep(d);
    let b1 = wan.counters().client_to_server.bytes;
    (b1 - b0) as f64 * 8.0 / d.as_secs_f64()
}

/// The source's own limit (`--evacuate-max-rate`) is a ceiling: an orchestrator's hold
/// below it ends with the orchestrator's connection, and neither the protocol's lift
/// (`SetRate` with `null`) nor a higher limit, sent raw, takes the evacuation above it.
/// (`faultline evacuate` itself never sends either: `source_link`'s tests.)
#[test]
fn an_evacuation_keeps_to_its_own_rate_limit_whatever_the_orchestrator_asks() {
    use fleet::control::{Reply, Request};
    let certs = certs();
    // About 12.8 MiB of stale pages through 200 Mbit/s × 20 ms, limited to 10 Mbit/s by the
    // source's own flag: some 11 s limited (the two windows and the requests take about 4),
    // under a second without.
    let (pair, wan) = Pair::start_over(
        &certs,
        "vm-capped",
        "64M",
        &[
            "--stale-pct",
            "20",
            "--encoding",
            "off",
            "--evacuate-max-rate",
            "10M",
        ],
        Some(LinkConfig::new(Duration::from_millis(20), 200_000_000)),
    );
    let wan = wan.unwrap();
    let cap = 10_000_000.0;
    let within_cap = |rate: f64, when: &str| {
        assert!(
            rate < cap * 1.25,
            "{:.1} Mbit/s crossed {when} under a limit of 10 Mbit/s",
            rate / 1e6
        );
        assert!(
            rate > cap * 0.4,
            "{:.1} Mbit/s {when}: the limited flow stalled, or a gone orchestrator's hold stayed",
            rate / 1e6
        );
    };
    // Wait for the control endpoint, then start the evacuation held to 2 Mbit/s by an
    // orchestrator that hangs up at once: a hold lower than the source's own limit does not
    // outlive the orchestrator's connection, and the source's own holds.
    let deadline = Instant::now() + TIMEOUT;
    let evacuate = Request::Evacuate {
        rate_cap_bps: Some(2_000_000),
    };
    let accepted = loop {
        match control_request(&certs, pair.port, &evacuate, true) {
            Ok(r) => break r,
            Err(e) if Instant::now() > deadline => panic!("no control endpoint: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    assert_eq!(
        accepted.last(),
        Some(&Reply::Accepted {
            rate_cap_honoured: true
        })
    );
    while wan.counters().client_to_server.bytes < 1 << 20 {
        assert!(Instant::now() < deadline, "the evacuation never got going");
        std::thread::sleep(Duration::from_millis(5));
    }
    let limited = rate_over(&wan, Duration::from_millis(1500));
    within_cap(limited, "after the hold's connection ended");
    // The protocol's lift, and a limit twenty times the own: each answered with the own
    // limit, which stays in force.
    for (rate_cap_bps, seq) in [(None, 1), (Some(200_000_000), 2)] {
        let ask = Request::SetRate {
            rate_cap_bps,
            seq: Some(seq),
        };
        let r = control_request(&certs, pair.port, &ask, false).unwrap();
        assert_eq!(
            r,
            vec![Reply::RateSet {
                rate_cap_bps: Some(10_000_000),
                seq: Some(seq)
            }],
            "asked for {rate_cap_bps:?}"
        );
    }
    let asked_higher = rate_over(&wan, Duration::from_millis(1500));
    within_cap(asked_higher, "after a lift and a raise");
    pair.assert_evacuated();
    eprintln!(
        "{:.1} Mbit/s after the hold, {:.1} Mbit/s after the lift and the raise",
        limited / 1e6,
        asked_higher / 1e6
    );
}

/// A source whose evacuation is started by SIGUSR1 (the disaster warning, sent to it
/// directly) while the orchestrator holds it waiting: the orchestrator learns of it from
/// its status (under way, or over between two status requests) and reports it done, not
/// failed for a source that ended; the source stays until the orchestrator has heard how
/// it ended.
#[test]
fn a_vm_that_evacuates_on_its_own_is_reported_done() {
    let t = Instant::now();
    let certs = certs();
    // vm-b first (fewer stale bytes, one at a time): 8 MiB through 10 Mbit/s, some 7 s.
    let (b, _wan) = Pair::start_over(
        &certs,
        "vm-b",
        "32M",
        &["--stale-pct", "25", "--encoding", "off"],
        Some(LinkConfig::new(Duration::from_millis(2), 10_000_000)),
    );
    // vm-a, 40% stale, planned second.
    let a = Pair::start(
        &certs,
        "vm-a",
        "32M",
        &["--stale-pct", "40", "--encoding", "off"],
    );
    // Replicated, so that both statuses give the planted stale bytes the order rests on.
    faultline_tests::wait_replicated(&b.dir, 8192, 0.5);
    faultline_tests::wait_replicated(&a.dir, 8192, 0.5);
    let plan = plan_file(
        &certs,
        "orchestrator",
        "1G",
        &[("vm-a", "32M", a.port), ("vm-b", "32M", b.port)],
    );
    let o = Orchestrator::start(&plan, &["--schedule", "smallest-first"]);
    o.wait_event("started", "vm-b");
    // SAFETY: kill(2) on a child process we spawned and have not waited for.
    let r = unsafe { libc::kill(a.source.pid() as libc::pid_t, libc::SIGUSR1) };
    assert_eq!(r, 0, "signalling vm-a's source");
    let started = o.wait_event("started", "vm-a");
    let (rc, r, err) = o.wait();
    assert_eq!(rc, Some(0), "{err}\n{r}");
    assert_eq!(started["by"], "the source", "{started}\n{err}");
    let va = vm(&r, "vm-a");
    assert_eq!(va["outcome"], "done", "{va}");
    assert_eq!(r["totals"]["done"], 2, "{r}");
    a.assert_evacuated();
    b.assert_evacuated();
    eprintln!("self-started VM reported done in {:?}", t.elapsed());
}
