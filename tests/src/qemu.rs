//! A real Linux guest under QEMU (TCG, software emulation) running the faultline guest
//! agent: the image comes from `scripts/guest-image.sh`, the agent's serial port is a Unix
//! socket here, and the guest console is read line by line.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_agent::proto::{encode, DecodeError, FrameReader, Message};

/// The kernel, initramfs and QEMU binary that `scripts/guest-image.sh` prepared.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub qemu: PathBuf,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The cargo target directory this test binary was built into
/// (`<target>/<profile>/deps/<test>`), so the image is cached beside the build.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .expect("test binary lives in <target>/<profile>/deps")
        .to_path_buf()
}

/// Builds or reuses the guest image (installing QEMU, busybox-static and cpio, and
/// downloading the kernel, when missing and root). `Err` with the script's explanation if
/// they cannot be had, so the caller can skip; any other failure panics.
pub fn guest_image() -> Result<GuestImage, String> {
    let script = workspace_root().join("scripts/guest-image.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&script).current_dir(workspace_root());
    if std::env::var_os("CARGO_TARGET_DIR").is_none() {
        cmd.env("CARGO_TARGET_DIR", target_dir());
    }
    let out = cmd.output().expect("running scripts/guest-image.sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => {}
        Some(3) => return Err(stderr.trim().to_string()),
        _ => panic!("scripts/guest-image.sh failed ({}):\n{stderr}", out.status),
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let get = |key: &str| -> PathBuf {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("guest-image.sh printed no {key}:\n{stdout}"))
            .into()
    };
    Ok(GuestImage {
        kernel: get("KERNEL"),
        initrd: get("INITRD"),
        qemu: get("QEMU"),
    })
}

/// A booted guest; QEMU is killed on drop.
pub struct Guest {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
    /// The Unix socket QEMU serves the agent's serial port (`/dev/ttyS1`) on.
    pub agent_socket: PathBuf,
    /// When QEMU was started.
    pub started: Instant,
}

impl Guest {
    /// Boots `image` with `mem_mib` MiB of memory, one vCPU and `append` added to the kernel
    /// command line (`agent.KEY=VALUE` configures the agent, `touch_mb=N` the workload).
    pub fn boot(image: &GuestImage, mem_mib: u32, append: &str) -> Guest {
        Guest::boot_with(image, mem_mib, append, &[])
    }

    /// [`Guest::boot`] with more QEMU arguments (devices, memory backends).
    pub fn boot_with(image: &GuestImage, mem_mib: u32, append: &str, extra: &[String]) -> Guest {
        let dir = tempfile::tempdir().expect("temp dir");
        let agent_socket = dir.path().join("agent.sock");
        let started = Instant::now();
        let mut child = Command::new(&image.qemu)
            .args(["-accel", "tcg", "-smp", "1", "-m", &format!("{mem_mib}M")])
            .args(extra)
            // No display, VGA, network or monitor: nothing that needs ROMs or a terminal.
            .args([
                "-display", "none", "-vga", "none", "-nic", "none", "-monitor", "none",
            ])
            .arg("-no-reboot")
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initrd)
            .args(["-append", &format!("console=ttyS0 quiet panic=-1 {append}")])
            // ttyS0: the console, on our stdout. ttyS1: the agent, on a Unix socket that
            // QEMU listens on without waiting for us (what the guest sends before we
            // connect is dropped, as on a real serial line).
            .args([
                "-chardev",
                "stdio,id=con,signal=off",
                "-serial",
                "chardev:con",
            ])
            .args([
                "-chardev",
                &format!(
                    "socket,id=agent,path={},server=on,wait=off",
                    agent_socket.display()
                ),
                "-serial",
                "chardev:agent",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn qemu-system-x86_64");
        let lines = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(stream);
                let mut buf = Vec::new();
                while matches!(r.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                    let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                    lines.lock().unwrap().push(line);
                    buf.clear();
                }
            });
        }
        Guest {
            child,
            lines,
            _dir: dir,
            agent_socket,
            started,
        }
    }

    /// The last console line (so far, or arriving within `timeout`) that `pred` accepts.
    pub fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.lines.lock().unwrap().iter().rev().find(|l| pred(l)) {
                return Some(l.clone());
            }
            if Instant::now() > deadline {
                return None;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the reader threads drain what QEMU printed last.
                std::thread::sleep(Duration::from_millis(100));
                panic!("QEMU exited ({status}):\n{}", self.console());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything the console and QEMU printed so far.
    pub fn console(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits up to `timeout` for QEMU to exit (the guest powered off); `None` if it runs on.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A file to add to an initramfs: its path inside (no leading `/`), mode and contents.
pub struct InitrdFile<'a> {
    pub path: &'a str,
    pub mode: u32,
    pub data: &'a [u8],
}

/// Writes `base` followed by a second `newc` cpio archive holding `files` (and the
/// directories above them) to `out`: the kernel unpacks both, the second over the first,
/// so a test adds its own init script and data to the image `guest-image.sh` built.
pub fn initrd_with(base: &Path, files: &[InitrdFile<'_>], out: &Path) {
    let mut a = std::fs::read(base).expect("reading the base initramfs");
    // The kernel expects each archive to start 4-byte aligned.
    a.resize(a.len().div_ceil(4) * 4, 0);
    let mut ino = 1_000_000u32;
    let mut entry = |a: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]| {
        ino += 1;
        let fields = [
            ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        a.extend_from_slice(b"070701");
        for f in fields {
            a.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        a.extend_from_slice(name.as_bytes());
        a.push(0);
        a.resize(a.len().div_ceil(4) * 4, 0);
        a.extend_from_slice(data);
        a.resize(a.len().div_ceil(4) * 4, 0);
    };
    let mut dirs = std::collections::BTreeSet::new();
    for f in files {
        let mut p = Path::new(f.path).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(d.to_str().expect("utf-8 path").to_string());
            p = d.parent();
        }
    }
    for d in &dirs {
        entry(&mut a, d, 0o040755, &[]);
    }
    for f in files {
        entry(&mut a, f.path, 0o100000 | f.mode, f.data);
    }
    entry(&mut a, "TRAILER!!!", 0, &[]);
    std::fs::write(out, a).expect("writing the initramfs");
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The host end of the agent protocol over the guest's serial socket.
pub struct AgentConn {
    stream: UnixStream,
    reader: FrameReader,
    queue: VecDeque<Result<Message, DecodeError>>,
}

impl AgentConn {
    /// Connects to QEMU's socket for the agent's serial port.
    pub fn connect(path: &Path, timeout: Duration) -> AgentConn {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => panic!("connect {}: {e}", path.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        AgentConn {
            stream,
            reader: FrameReader::new(),
            queue: VecDeque::new(),
        }
    }

    /// Sends a message.
    pub fn send(&mut self, msg: &Message) {
        self.send_raw(&encode(msg).expect("encode"));
    }

    /// Sends bytes as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .expect("write to the agent socket");
    }

    /// The next message or decode error, or `None` after `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Option<Result<Message, DecodeError>> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 16 * 1024];
        loop {
            if let Some(item) = self.queue.pop_front() {
                return Some(item);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .expect("set_read_timeout");
            match self.stream.read(&mut buf) {
                Ok(0) => panic!("QEMU closed the agent socket"),
                Ok(n) => {
                    let q = &mut self.queue;
                    self.reader.push(&buf[..n], |item| q.push_back(item));
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => panic!("reading the agent socket: {e}"),
            }
        }
    }

    /// Receives until `f` returns `Some` for a message (decode errors are skipped: the
    /// line may carry the tail of a frame sent before we connected), or `None` after
    /// `timeout`.
    pub fn recv_until<T>(
        &mut self,
        timeout: Duration,
        mut f: impl FnMut(&Message) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            if let Some(Ok(m)) = self.recv(left) {
                if let Some(t) = f(&m) {
                    return Some(t);
                }
            }
        }
    }
}
