//! Helpers for faultline's end-to-end tests: the real `faultline` binary, run as separate
//! source and destination processes on loopback, with certificates made per test.

pub mod http;
pub mod loopback;
pub mod nbd;
pub mod qemu;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;
use transport::tls::Identity;

/// Whether KVM is there; says so on stderr when it is not (the KVM tests then skip).
pub fn kvm_present() -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    eprintln!("SKIPPED: /dev/kvm is absent (load kvm_intel/kvm_amd to run the KVM tests)");
    false
}

/// The `faultline` binary of this build profile, built on first use.
pub fn faultline_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| cargo_build("faultline", "--bin", "faultline"))
}

/// The embedding example (`vmm-shim/examples/embed.rs`) of this build profile, built on
/// first use.
pub fn embed_example() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| cargo_build("vmm-shim", "--example", "embed"))
}

/// Builds one target (`--bin NAME` or `--example NAME` of `package`) in this test's build
/// profile and returns its path.
fn cargo_build(package: &str, kind: &str, name: &str) -> PathBuf {
    {
        // target/<profile>/deps/<test binary> -> target/<profile>/<name>
        let exe = std::env::current_exe().expect("test binary path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary lives in target/<profile>/deps");
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", package, kind, name]);
        // Cargo gives this test process the package's variables (CARGO_PKG_NAME=
        // faultline-tests, CARGO_MANIFEST_DIR, ...). Build scripts that rerun when those
        // change (ring's does) would see them differ from a build started in a shell, and
        // every dependent crate would be rebuilt here and again by the next `cargo test`.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("CARGO_PKG_")
                || k.starts_with("CARGO_MANIFEST_")
                || matches!(
                    k.as_ref(),
                    "CARGO_CRATE_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "CARGO_TARGET_TMPDIR"
                        | "OUT_DIR"
                )
            {
                cmd.env_remove(k.as_ref());
            }
        }
        if release {
            cmd.arg("--release");
        }
        let status = cmd
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("running cargo build");
        assert!(status.success(), "building {name} failed");
        let bin = match kind {
            "--example" => profile_dir.join("examples").join(name),
            _ => profile_dir.join(name),
        };
        assert!(bin.exists(), "{} missing after build", bin.display());
        bin
    }
}

/// Runs `faultline demo <args> --json` (without a stated BDP in its environment) to the
/// end; it must succeed and print exactly one JSON object, which is returned.
pub fn demo_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(faultline_bin())
        .env_remove(transport::quic::ENV_EXPECTED_BDP)
        .arg("demo")
        .args(args)
        .arg("--json")
        .output()
        .expect("run faultline demo");
    assert!(
        out.status.success(),
        "faultline demo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("UTF-8 report");
    assert_eq!(
        stdout.trim().lines().count(),
        1,
        "exactly one JSON object: {stdout}"
    );
    serde_json::from_str(stdout.trim()).expect("a JSON report")
}

/// A certificate and key on disk for each side, in a directory removed on drop.
pub struct Certs {
    pub dir: tempfile::TempDir,
}

impl Certs {
    /// Makes `source`, `dest` and an unrelated `intruder` identity.
    pub fn new() -> Certs {
        let dir = tempfile::tempdir().expect("temp dir");
        for name in ["source", "dest", "intruder"] {
            Identity::generate(name)
                .expect("generate identity")
                .save(
                    &dir.path().join(format!("{name}.crt")),
                    &dir.path().join(format!("{name}.key")),
                )
                .expect("save identity");
        }
        Certs { dir }
    }

    pub fn cert(&self, name: &str) -> String {
        self.dir
            .path()
            .join(format!("{name}.crt"))
            .display()
            .to_string()
    }

    pub fn key(&self, name: &str) -> String {
        self.dir
            .path()
            .join(format!("{name}.key"))
            .display()
            .to_string()
    }

    pub fn identity(&self, name: &str) -> Identity {
        Identity::load(Path::new(&self.cert(name)), Path::new(&self.key(name))).expect("load")
    }

    /// `--cert/--key/--peer-cert` for side `me` pinning `peer`.
    pub fn args(&self, me: &str, peer: &str) -> Vec<String> {
        vec![
            "--cert".into(),
            self.cert(me),
            "--key".into(),
            self.key(me),
            "--peer-cert".into(),
            self.cert(peer),
        ]
    }
}

impl Default for Certs {
    fn default() -> Self {
        Self::new()
    }
}

/// What a finished `faultline` process left behind.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    /// The JSON object printed on stdout (Null if none).
    pub json: Value,
    pub stderr: String,
}

/// A running `faultline dest` process.
pub struct DestProcess {
    child: Option<Child>,
    pub addr: String,
    stderr: mpsc::Receiver<String>,
    relay: Option<std::thread::JoinHandle<()>>,
}

impl DestProcess {
    /// The process id (to signal it).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("not yet waited").id()
    }

    /// Starts `faultline dest` on a free loopback port with `extra` arguments and waits
    /// until it listens.
    pub fn start(certs: &Certs, extra: &[&str]) -> DestProcess {
        Self::start_pinning(certs, "source", extra)
    }

    /// Like [`DestProcess::start`], pinning the certificate of `peer`.
    pub fn start_pinning(certs: &Certs, peer: &str, extra: &[&str]) -> DestProcess {
        Self::spawn(certs, &["dest"], "127.0.0.1:0", peer, extra)
    }

    /// Starts `faultline vm dest` (the reference KVM VMM's destination) on a free loopback
    /// port with `extra` arguments and waits until it listens.
    pub fn vm(certs: &Certs, extra: &[&str]) -> DestProcess {
        Self::spawn(certs, &["vm", "dest"], "127.0.0.1:0", "source", extra)
    }

    /// Starts `faultline standby` on `listen` (port 0 for any) with `extra` arguments.
    pub fn standby(certs: &Certs, listen: &str, extra: &[&str]) -> DestProcess {
        Self::spawn(certs, &["standby"], listen, "source", extra)
    }

    fn spawn(certs: &Certs, cmd: &[&str], listen: &str, peer: &str, extra: &[&str]) -> DestProcess {
        Self::spawn_env(certs, cmd, listen, peer, extra, &[])
    }

    /// `faultline <cmd>` (`dest`, `vm dest`, `standby`) listening on `listen`, pinning the
    /// source's certificate, with `env` added to its environment (crash points:
    /// `FAIL_POINTS`).
    pub fn start_env(
        certs: &Certs,
        cmd: &[&str],
        listen: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> DestProcess {
        Self::spawn_env(certs, cmd, listen, "source", extra, env)
    }

    fn spawn_env(
        certs: &Certs,
        cmd: &[&str],
        listen: &str,
        peer: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> DestProcess {
        let mut child = Command::new(faultline_bin())
            .envs(env.iter().copied())
            .args(cmd)
            .args(["--listen", listen, "--json", "--progress"])
            .args(["--accept-timeout", "60"])
            .args(certs.args("dest", peer))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn faultline");
        let err = child.stderr.take().expect("stderr");
        let (addr_tx, addr_rx) = mpsc::channel();
        let (line_tx, line_rx) = mpsc::channel();
        let relay = std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Some(ev) = line.strip_prefix("@faultline ") {
                    if let Ok(v) = serde_json::from_str::<Value>(ev) {
                        if v["event"] == "listening" {
                            let _ = addr_tx.send(v["addr"].as_str().unwrap_or("").to_string());
                        }
                    }
                    continue;
                }
                let _ = line_tx.send(line);
            }
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("destination did not report its address");
        DestProcess {
            child: Some(child),
            addr,
            stderr: line_rx,
            relay: Some(relay),
        }
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit (at most `timeout`, then kills it and panics).
    pub fn wait(mut self, timeout: Duration) -> Finished {
        let child = self.child.take().expect("not yet waited");
        let waited = wait_with_timeout(child, timeout);
        // The relay thread ends at the end of the child's stderr: join it so no line is lost
        // (within bounds for a child killed as hung).
        if let Some(r) = self.relay.take() {
            if waited.is_ok() {
                let _ = r.join();
            } else {
                let _ = joined_within(r);
            }
        }
        let stderr: Vec<String> = self.stderr.try_iter().collect();
        match waited {
            Ok((status, stdout)) => finished(status, stdout, stderr.join("\n")),
            Err(threads) => hung("faultline dest", timeout, &threads, &stderr.join("\n")),
        }
    }
}

impl Drop for DestProcess {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits for `child` to exit and reads its stdout. After `timeout` it kills the child and
/// returns what its threads were doing (see [`thread_stacks`]) instead.
fn wait_with_timeout(mut child: Child, timeout: Duration) -> Result<(ExitStatus, String), String> {
    let mut out = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let threads = thread_stacks(child.id());
            let _ = child.kill();
            let _ = child.wait();
            // Not joined: a grandchild may hold the pipe open; its stdout is not wanted.
            drop(reader);
            return Err(threads);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok((status, reader.join().unwrap_or_default()))
}

/// Each thread of process `pid`: its name, its CPU time so far and its kernel stack (the
/// stack only where this process may read it, as root). What a hung child was blocked in.
fn thread_stacks(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("(no /proc/{pid}/task)");
    };
    let mut out = String::new();
    for t in tasks.flatten() {
        let dir = t.path();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        // utime and stime, fields 14 and 15, counted after the parenthesised name.
        let stat = read("stat");
        let ticks = stat
            .rsplit_once(')')
            .map(|(_, rest)| {
                rest.split_whitespace()
                    .skip(11)
                    .take(2)
                    .collect::<Vec<_>>()
                    .join("+")
            })
            .unwrap_or_default();
        out.push_str(&format!(
            "-- {} {} cpu ticks {ticks}\n{}",
            read("comm").trim(),
            t.file_name().to_string_lossy(),
            read("stack")
        ));
    }
    out
}

/// What `reader` returned, or nothing if it has not ended within 2 s (the stderr of a
/// child killed as hung, whose pipe a grandchild may still hold).
fn joined_within<T>(reader: std::thread::JoinHandle<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while !reader.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    reader.is_finished().then(|| reader.join().ok()).flatten()
}

/// Panics for a child that did not exit within `timeout`, with its threads and stderr.
fn hung(what: &str, timeout: Duration, threads: &str, stderr: &str) -> ! {
    let lines: Vec<&str> = stderr.lines().collect();
    let tail = lines[lines.len().saturating_sub(80)..].join("\n");
    panic!(
        "{what} did not finish within {timeout:?}; killed.\n--- its threads then:\n{threads}\n\
         --- the end of its stderr:\n{tail}"
    );
}

fn finished(status: ExitStatus, stdout: String, stderr: String) -> Finished {
    let json = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    Finished {
        status,
        json,
        stderr,
    }
}

/// Runs `faultline source` against `addr` to completion.
pub fn run_source(
    certs: &Certs,
    me: &str,
    addr: &str,
    extra: &[&str],
    timeout: Duration,
) -> Finished {
    Background::source(certs, me, addr, extra, &[]).wait(timeout)
}

/// Runs `faultline vm source` (the reference KVM VMM's source) against `addr` to completion.
pub fn run_vm_source(certs: &Certs, addr: &str, extra: &[&str], timeout: Duration) -> Finished {
    Background::vm_source(certs, addr, extra).wait(timeout)
}

/// A `faultline` process started in the background, collected later.
pub struct Background(Reaped);

impl Background {
    /// Starts `faultline source` (identity `me`) against `addr` with `extra` arguments and
    /// `env` added to its environment.
    pub fn source(
        certs: &Certs,
        me: &str,
        addr: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Background {
        let child = Command::new(faultline_bin())
            .envs(env.iter().copied())
            .args(["source", "--connect", addr, "--json"])
            .args(["--connect-timeout", "10"])
            .args(certs.args(me, "dest"))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn faultline source");
        Background(Reaped::new(child))
    }

    /// Starts `faultline replicate` against `addr` with `extra` arguments, its replicator at
    /// normal priority: the test machine runs many tests at once, and at SCHED_IDLE (its
    /// default) the replicator could starve and the replica not fill in time.
    pub fn replicate(certs: &Certs, addr: &str, extra: &[&str]) -> Background {
        Background::replicate_at(certs, addr, extra, true)
    }

    /// [`Background::replicate`], its replicator at normal priority or, as `replicate` runs
    /// by default, at SCHED_IDLE.
    pub fn replicate_at(
        certs: &Certs,
        addr: &str,
        extra: &[&str],
        normal_priority: bool,
    ) -> Background {
        let child = Command::new(faultline_bin())
            .args(["replicate", "--connect", addr, "--json"])
            .args(normal_priority.then_some("--replicator-normal-priority"))
            .args(certs.args("source", "dest"))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn faultline replicate");
        Background(Reaped::new(child))
    }

    /// Starts `faultline vm source` (a KVM guest of the reference VMM) against `addr` with
    /// `extra` arguments.
    pub fn vm_source(certs: &Certs, addr: &str, extra: &[&str]) -> Background {
        let child = Command::new(faultline_bin())
            .args(["vm", "source", "--connect", addr, "--json"])
            .args(["--connect-timeout", "10"])
            .args(certs.args("source", "dest"))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn faultline vm source");
        Background(Reaped::new(child))
    }

    /// Starts `faultline` with exactly `args` (no defaults added).
    pub fn spawn(args: &[&str]) -> Background {
        Self::spawn_env(args, &[])
    }

    /// [`Background::spawn`] with `env` added to its environment.
    pub fn spawn_env(args: &[&str], env: &[(&str, &str)]) -> Background {
        let child = Command::new(faultline_bin())
            .envs(env.iter().copied())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn faultline");
        Background(Reaped::new(child))
    }

    pub fn wait(self, timeout: Duration) -> Finished {
        collect(self.0.into_inner(), timeout, "faultline (background)")
    }

    /// Its process id (to signal it).
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Kills it (SIGKILL) and reaps it (as dropping it does, when a test panics).
    pub fn kill(self) {
        drop(self);
    }
}

/// A child process that is killed and reaped when dropped, so that a test that panics
/// does not leave it running (a source riding out a lost connection, or whose writer keeps
/// going, would load the tests after it). [`Reaped::into_inner`] hands it over to be
/// waited for.
pub struct Reaped(Option<Child>);

impl Reaped {
    pub fn new(child: Child) -> Reaped {
        Reaped(Some(child))
    }

    /// The child, no longer killed on drop.
    pub fn into_inner(mut self) -> Child {
        self.0.take().expect("taken only here, which consumes it")
    }
}

impl std::ops::Deref for Reaped {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.0
            .as_ref()
            .expect("taken only by into_inner, which consumes it")
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Child {
        self.0
            .as_mut()
            .expect("taken only by into_inner, which consumes it")
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits until the standby's replica in `dir` holds `frac` of a guest of `pages` pages
/// (its sparse image's allocated blocks); panics if it has not started growing within
/// [`REPLICA_FIRST_WITHIN`], stops growing for [`REPLICA_STILL_FOR`], or is not there
/// within [`REPLICA_AT_MOST`]. Not a fixed 60 s: a fleet of 16 replicas of up to 1 GiB
/// filling at once on two cores (the fleet bench) takes longer than one test's replica,
/// and 60 s sometimes stopped the bench's first run after a rebuild with the first
/// replica still filling.
pub fn wait_replicated(dir: &ShmDir, pages: u64, frac: f64) {
    use std::os::unix::fs::MetadataExt;
    let img = dir.0.join("memory.img");
    let want = (pages as f64 * 4096.0 * frac) as u64;
    let allocated = || std::fs::metadata(&img).map_or(0, |m| m.blocks() * 512);
    let start = std::time::Instant::now();
    let (mut last, mut grew) = (allocated(), None::<std::time::Instant>);
    loop {
        let now = allocated();
        if now >= want {
            return;
        }
        if now > last {
            (last, grew) = (now, Some(std::time::Instant::now()));
        }
        let stuck = match grew {
            None => start.elapsed() > REPLICA_FIRST_WITHIN,
            Some(g) => g.elapsed() > REPLICA_STILL_FOR,
        };
        if stuck || start.elapsed() > REPLICA_AT_MOST {
            panic!(
                "the replica in {} reached {last} of the {want} bytes wanted ({frac} of the \
                 guest) in {:.0?}, and {}",
                dir.arg(),
                start.elapsed(),
                if stuck {
                    "stopped growing"
                } else {
                    "is still filling"
                },
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How long [`wait_replicated`] waits for a replica to start growing.
pub const REPLICA_FIRST_WITHIN: Duration = Duration::from_secs(60);

/// How long [`wait_replicated`] waits for a replica that has stopped growing.
pub const REPLICA_STILL_FOR: Duration = Duration::from_secs(30);

/// The longest [`wait_replicated`] waits in all.
pub const REPLICA_AT_MOST: Duration = Duration::from_secs(600);

/// An in-process destination listener on loopback for `vm_id` (the certificates' `dest`
/// identity pinning `source`), stopped by the returned stopper; and its address.
pub fn loopback_listener(
    certs: &Certs,
    vm_id: &str,
) -> (vmm_shim::Listener, vmm_shim::Stopper, std::net::SocketAddr) {
    let mut listener = vmm_shim::Listener::bind(vmm_shim::DestOptions {
        expected_vm_id: Some(vm_id.into()),
        ..vmm_shim::DestOptions::new(
            "127.0.0.1:0".parse().expect("an address"),
            certs.identity("dest"),
            certs.identity("source").cert,
        )
    })
    .expect("binding a listener on loopback");
    let stopper = vmm_shim::Stopper::new();
    listener.stop_on(&stopper);
    let addr = listener.local_addr().expect("the listener's address");
    (listener, stopper, addr)
}

/// Options for an in-process replicator to `connect` as `vm_id` with `epoch`: the
/// certificates' `source` identity pinning `dest`, a budget that never binds, a round
/// every 10 ms, at normal priority (a test waits for it).
pub fn replicator_options(
    certs: &Certs,
    connect: std::net::SocketAddr,
    vm_id: &str,
    epoch: u64,
) -> vmm_shim::replica::ReplicatorOptions {
    vmm_shim::replica::ReplicatorOptions {
        connect,
        identity: certs.identity("source"),
        peer_cert: certs.identity("dest").cert,
        vm_id: vm_id.into(),
        epoch,
        budget_bytes_per_sec: 1 << 30,
        interval: Duration::from_millis(10),
        connect_timeout: Duration::from_secs(30),
        recover_timeout: None,
        idle_priority: false,
    }
}

/// Waits until a whole round of `r` that began after harvest `since` found nothing left
/// to send, and returns the harvest count then; panics (naming `what`) after 60 s or if
/// the replicator stops. A round counts its harvest before it sends and stores the stale
/// count at its end: the count is read after the harvests, and one round more is waited
/// for, so a write between two rounds is never missed.
pub fn wait_caught_up(r: &vmm_shim::replica::Replicator, since: u64, what: &str) -> u64 {
    use std::sync::atomic::Ordering;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let harvests = || r.stats().harvests.load(Ordering::Relaxed);
    while harvests() < since + 3 || r.stale_pages() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: replication did not catch up ({} pages stale)",
            r.stale_pages()
        );
        assert!(r.is_running(), "{what}: the replicator stopped");
        std::thread::sleep(Duration::from_millis(10));
    }
    harvests()
}

/// A free UDP port on loopback (bound and released; fine for tests on one machine).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A free TCP port on loopback (bound and released; fine for tests on one machine).
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A replica directory on tmpfs, removed on drop.
pub struct ShmDir(pub PathBuf);

impl ShmDir {
    /// How the name of every [`ShmDir`] under `/dev/shm` starts (a bench looks for those a
    /// killed run left).
    pub const PREFIX: &'static str = "faultline-test-";

    pub fn new(tag: &str) -> ShmDir {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = PathBuf::from(format!(
            "/dev/shm/{}{tag}-{}-{}",
            Self::PREFIX,
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        ShmDir(dir)
    }

    pub fn arg(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for ShmDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn collect(mut child: Child, timeout: Duration, what: &str) -> Finished {
    let mut err = child.stderr.take().expect("stderr");
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    match wait_with_timeout(child, timeout) {
        Ok((status, stdout)) => finished(status, stdout, err_reader.join().unwrap_or_default()),
        Err(threads) => hung(
            what,
            timeout,
            &threads,
            &joined_within(err_reader).unwrap_or_default(),
        ),
    }
}

/// Asserts an evacuation (`replicate` into `standby`) succeeded on both sides with equal
/// digests of all memory at the switchover; returns (source report, standby report).
pub fn assert_evacuated(src: &Finished, dst: &Finished) -> (Value, Value) {
    assert!(src.status.success(), "replicate failed: {}", src.stderr);
    assert!(dst.status.success(), "standby failed: {}", dst.stderr);
    let (s, d) = (&src.json, &dst.json);
    assert!(s["digest"].is_string(), "{s}");
    assert_eq!(
        s["digest"], d["digest"],
        "destination memory differs from the source's at switchover"
    );
    (s.clone(), d.clone())
}

/// Writes a raw disk image of `blocks` 4 KiB blocks, block `b` filled with one byte that
/// varies with `b` and is never zero (so no block is a zero block).
pub fn block_image(path: &Path, blocks: u64) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create the image"));
    for b in 0..blocks {
        f.write_all(&[(b % 251) as u8 + 1; 4096])
            .expect("write the image");
    }
    f.flush().expect("write the image");
}

/// Migrates a 16 MiB synthetic image from a real `faultline source` (identity `source`)
/// into `dest`, started with `--size 16M`, and asserts it arrived byte for byte: a
/// listener that refused something before still takes a real source. The destination's
/// run, for what it said on the way.
pub fn assert_takes_a_real_source(certs: &Certs, dest: DestProcess) -> Finished {
    let timeout = Duration::from_secs(60);
    let src = run_source(
        certs,
        "source",
        &dest.addr,
        &["--synthetic", "16M"],
        timeout,
    );
    let dst = dest.wait(timeout);
    assert_migrated(&src, &dst);
    dst
}

/// Asserts a migration succeeded on both sides with equal digests of all memory, and
/// returns the destination's report.
pub fn assert_migrated(src: &Finished, dst: &Finished) -> Value {
    assert!(src.status.success(), "source failed: {}", src.stderr);
    assert!(dst.status.success(), "destination failed: {}", dst.stderr);
    let (s, d) = (&src.json["digest"], &dst.json["digest"]);
    assert!(s.is_string(), "source printed no digest: {:?}", src.json);
    assert_eq!(
        s, d,
        "digest of all guest memory differs between source and destination"
    );
    assert_eq!(src.json["memory_bytes"], dst.json["memory_bytes"]);
    dst.json.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test that panics while it holds a child kills it: the process is gone (reaped, so
    /// not even a zombie) once the panic unwound.
    #[test]
    fn a_reaped_child_is_killed_when_a_test_panics() {
        let child = Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        let held = Reaped::new(child);
        let panicked = std::panic::catch_unwind(move || {
            let _held = held;
            panic!("the test failed");
        });
        assert!(panicked.is_err());
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "sleep {pid} outlived the test"
        );
        // Handed over, it is not killed.
        let child = Reaped::new(Command::new("true").spawn().unwrap()).into_inner();
        assert!(child.wait_with_output().unwrap().status.success());
    }

    /// A child that does not exit in time is killed, and the panic says what its threads
    /// were doing and what it wrote to stderr: what found the fleet bench's hung standby.
    #[test]
    fn a_hung_child_is_killed_with_its_threads_and_stderr_in_the_panic() {
        let child = Command::new("sh")
            .args(["-c", "echo about to hang >&2; exec sleep 30"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let pid = child.id();
        let started = std::time::Instant::now();
        let panicked = std::panic::catch_unwind(|| {
            collect(child, Duration::from_millis(300), "a sleeper");
        })
        .expect_err("a hung child must panic");
        assert!(started.elapsed() < Duration::from_secs(10));
        let msg = panicked
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        assert!(
            msg.contains("a sleeper did not finish within 300ms; killed"),
            "{msg}"
        );
        assert!(msg.contains(&format!("-- sleep {pid} cpu ticks")), "{msg}");
        assert!(msg.contains("about to hang"), "{msg}");
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}/task")).exists(),
            "the child was not reaped"
        );
    }
}
