//! Running a second process from the same bench binary.
//!
//! A bench that needs two processes (say a QUIC server and its client) re-executes itself:
//! [`spawn_child`] starts `std::env::current_exe()` with `FAULTLINE_BENCH_CHILD=<role>` in its
//! environment, and the bench's `main` starts with
//!
//! ```no_run
//! # fn serve(_: &str, _: &[String]) -> anyhow::Result<()> { Ok(()) }
//! fn main() -> anyhow::Result<()> {
//!     if let Some(role) = faultline_benches::child::child_role() {
//!         return serve(&role, &faultline_benches::child::child_args());
//!     }
//!     // ... the parent: measure, emit JSON lines ...
//!     Ok(())
//! }
//! ```
//!
//! The child's stdout is a pipe back to the parent, read line by line: the child announces
//! itself with one JSON line (for example its bound UDP address, written with
//! [`crate::emit`]) that the parent reads with [`ChildProcess::recv_json`]. The child's stderr
//! is inherited, so its logs land next to the parent's.
//!
//! A child never outlives the bench: [`ChildProcess`] kills it on drop (including when the
//! parent unwinds from a panic), and the child is started with `PR_SET_PDEATHSIG = SIGKILL`
//! so the kernel kills it if the parent dies without unwinding (SIGKILL, abort).

use std::io::{self, BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Environment variable carrying the role of a child process.
pub const ENV_ROLE: &str = "FAULTLINE_BENCH_CHILD";

/// The role this process was started with by [`spawn_child`], or `None` in the parent
/// (the process cargo started). Check it first thing in `main`.
pub fn child_role() -> Option<String> {
    std::env::var(ENV_ROLE).ok().filter(|r| !r.is_empty())
}

/// The arguments a child was given by [`spawn_child`] (without the program name).
pub fn child_args() -> Vec<String> {
    std::env::args().skip(1).collect()
}

/// Starts this same executable as a child process with `role` and `args`.
///
/// stdout is piped (read it with [`ChildProcess::recv_line`] / [`ChildProcess::recv_json`]),
/// stderr is inherited, stdin is null.
///
/// The kernel kills the child when the *thread* that spawned it exits (that is how
/// `PR_SET_PDEATHSIG` works), so call this from a thread that lives as long as the child should,
/// such as `main` or the thread blocked in `Runtime::block_on`, not from `spawn_blocking`.
pub fn spawn_child(role: &str, args: &[String]) -> io::Result<ChildProcess> {
    let exe = std::env::current_exe()?;
    let parent = std::process::id();
    let mut cmd = Command::new(&exe);
    cmd.args(args)
        .env(ENV_ROLE, role)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
    // functions (prctl, getppid, _exit); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let stdout = child.stdout.take().expect("stdout was piped");
    let (tx, rx) = mpsc::channel();
    let role_name = role.to_string();
    std::thread::Builder::new()
        .name(format!("child-{role}-stdout"))
        .spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        eprintln!("[bench] reading stdout of child {role_name}: {e}");
                        break;
                    }
                }
            }
        })?;
    Ok(ChildProcess {
        role: role.to_string(),
        child,
        lines: rx,
    })
}

/// A running child process started by [`spawn_child`]; killed (SIGKILL) and reaped on drop
/// unless it already exited.
#[derive(Debug)]
pub struct ChildProcess {
    role: String,
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl ChildProcess {
    /// The role the child was started with.
    pub fn role(&self) -> &str {
        &self.role
    }

    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The next line the child wrote to stdout, waiting at most `timeout`. Fails with
    /// `TimedOut`, or `UnexpectedEof` if the child closed stdout (usually: it exited; its exit
    /// status is in the message).
    pub fn recv_line(&mut self, timeout: Duration) -> io::Result<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(l) => Ok(l),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("child {} wrote nothing within {timeout:?}", self.role),
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // Give it a moment to be reapable so the message can say how it ended.
                let status = self.wait_timeout(Duration::from_millis(500)).ok();
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "child {} closed its stdout (exit status: {})",
                        self.role,
                        status.map_or_else(|| "still running".into(), |s| s.to_string())
                    ),
                ))
            }
        }
    }

    /// The next stdout line parsed as JSON (see [`Self::recv_line`]).
    pub fn recv_json(&mut self, timeout: Duration) -> io::Result<serde_json::Value> {
        let line = self.recv_line(timeout)?;
        serde_json::from_str(&line).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("child {} wrote {line:?}, not JSON: {e}", self.role),
            )
        })
    }

    /// Waits for the child to exit by itself, at most `timeout` (then `TimedOut`; the child is
    /// still killed on drop).
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("child {} still running after {timeout:?}", self.role),
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for a clean exit (status 0) within `timeout`, else an error naming the child.
    pub fn wait_success(&mut self, timeout: Duration) -> io::Result<()> {
        let status = self.wait_timeout(timeout)?;
        if status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "child {} failed: {status}",
                self.role
            )))
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
