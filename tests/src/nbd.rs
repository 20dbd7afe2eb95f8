//! `faultline disk serve` as a real process, and QEMU's block tools (`qemu-img`,
//! `qemu-io`, `qemu-storage-daemon`) as its clients: shared by `tests/tests/disk_nbd.rs`
//! and the `disk_io` bench.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{faultline_bin, Finished};

/// The path of one of QEMU's block tools. Panics, saying what to install, if it is missing:
/// these tests are never skipped silently.
pub fn qemu_tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "{name} is not installed: install QEMU's block tools \
             (Debian: apt-get install qemu-utils, which has qemu-img, qemu-io and \
             qemu-storage-daemon)"
        )
    })
}

/// Runs `qemu-io -f raw` on `uri` with one `-c` per command; returns its output whatever
/// the exit status.
pub fn qemu_io(uri: &str, commands: &[&str]) -> Output {
    qemu_io_with(uri, &[], commands)
}

/// Like [`qemu_io`] with more options before the commands (`-r`: open read-only).
pub fn qemu_io_with(uri: &str, options: &[&str], commands: &[&str]) -> Output {
    let mut cmd = Command::new(qemu_tool("qemu-io"));
    cmd.args(["-f", "raw"]).args(options);
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd.arg(uri).output().expect("run qemu-io")
}

/// Like [`qemu_io`], but every command must succeed (the output is returned as text).
pub fn qemu_io_ok(uri: &str, commands: &[&str]) -> String {
    let out = qemu_io(uri, commands);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("Pattern verification"),
        "qemu-io {commands:?} on {uri} failed ({}):\n{text}",
        out.status
    );
    text
}

/// A running `faultline disk serve`; killed on drop unless stopped.
pub struct DiskServer {
    child: Option<Child>,
    /// The NBD URI it listens on (the first, if several).
    pub uri: String,
    /// Every URI it listens on.
    pub uris: Vec<String>,
    stderr: mpsc::Receiver<String>,
    relay: Option<std::thread::JoinHandle<()>>,
}

impl DiskServer {
    /// Starts `faultline disk serve --image IMAGE --json` with `args` (which must say where
    /// to listen) and waits until it says where it listens.
    pub fn start(image: &Path, args: &[&str]) -> DiskServer {
        let mut child = Command::new(faultline_bin())
            .args(["disk", "serve", "--json", "--image"])
            .arg(image)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn faultline disk serve");
        let err = child.stderr.take().expect("stderr");
        let (uri_tx, uri_rx) = mpsc::channel();
        let (line_tx, line_rx) = mpsc::channel();
        let relay = std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Some(uri) = line.strip_prefix("listening on ") {
                    let _ = uri_tx.send(uri.to_string());
                }
                let _ = line_tx.send(line);
            }
        });
        let listeners =
            usize::from(args.contains(&"--nbd-unix")) + usize::from(args.contains(&"--nbd-tcp"));
        let mut uris = Vec::new();
        for _ in 0..listeners.max(1) {
            match uri_rx.recv_timeout(Duration::from_secs(60)) {
                Ok(u) => uris.push(u),
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait().expect("wait");
                    let lines: Vec<String> = line_rx.try_iter().collect();
                    panic!(
                        "faultline disk serve did not say where it listens ({status}):\n{}",
                        lines.join("\n")
                    );
                }
            }
        }
        DiskServer {
            child: Some(child),
            uri: uris[0].clone(),
            uris,
            stderr: line_rx,
            relay: Some(relay),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Stops it with SIGTERM and returns what it printed; it must exit within 30 s.
    pub fn stop(mut self) -> Finished {
        // SAFETY: kill only reads its integer arguments; the pid is our child's, not yet
        // waited for, so it cannot have been reused.
        unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGTERM) };
        let mut child = self.child.take().expect("running");
        let mut out = child.stdout.take().expect("stdout");
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut out, &mut s);
            s
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("faultline disk serve did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stdout = reader.join().expect("stdout reader");
        if let Some(r) = self.relay.take() {
            let _ = r.join();
        }
        let stderr: Vec<String> = self.stderr.try_iter().collect();
        let json = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
        Finished {
            status,
            json,
            stderr: stderr.join("\n"),
        }
    }
}

impl Drop for DiskServer {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A running `qemu-storage-daemon` exporting a raw file over NBD on a Unix socket: the
/// baseline the NBD front end is measured against. Killed on drop.
pub struct QemuExport {
    child: Child,
    /// `nbd+unix:///EXPORT?socket=PATH`.
    pub uri: String,
}

impl QemuExport {
    /// Exports `image` (writable, through the page cache as `faultline disk serve` does)
    /// as `export` on the Unix socket `socket`, and waits until the socket accepts.
    pub fn start(image: &Path, socket: &Path, export: &str) -> QemuExport {
        let child = Command::new(qemu_tool("qemu-storage-daemon"))
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={},cache.direct=off,aio=threads",
                image.display()
            ))
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", socket.display()))
            .arg("--export")
            .arg(format!(
                "type=nbd,id=exp0,node-name=file0,name={export},writable=on"
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn qemu-storage-daemon");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not listen on {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuExport {
            child,
            uri: format!("nbd+unix:///{export}?socket={}", socket.display()),
        }
    }
}

impl Drop for QemuExport {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
