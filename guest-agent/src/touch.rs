//! Pre-touching: when postcopy starts, read one byte of every hot page of the configured
//! processes from several threads at once, so the faults on pages still at the source
//! overlap instead of being taken one by one by the application later.
//!
//! Which pages: the private writable mappings of each process (heap, stack, anonymous
//! memory, `.data`/`.bss`), pages present in RAM per `/proc/PID/pagemap`, and — in
//! [`TouchMode::Hot`] with a hot set from the last scan — only those whose frame is hot.
//! Pages are read with `process_vm_readv`, 1 byte per page and up to 1024 pages per call,
//! so the kernel faults them in for the target process without copying more than a byte.

use std::io;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use thiserror::Error;

use crate::procfs::{self, Mapping, Pagemap, PM_PFN_MASK, PM_PRESENT};
use crate::proto::{PfnRange, TouchReport};
use crate::scan::ranges;

/// Pages per `process_vm_readv` call (the kernel's `IOV_MAX`).
const PAGES_PER_CALL: usize = 1024;

/// A process to pre-touch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// By process id.
    Pid(i32),
    /// Every process whose `/proc/PID/comm` is this name.
    Name(String),
}

/// A `touch = ...` value that does not parse.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("touch target must be pid:N or name:COMM (COMM at most 15 bytes), got {0:?}")]
pub struct BadTarget(pub String);

impl FromStr for Target {
    type Err = BadTarget;

    fn from_str(s: &str) -> Result<Target, BadTarget> {
        let bad = || BadTarget(s.to_string());
        if let Some(p) = s.strip_prefix("pid:") {
            return p.trim().parse().map(Target::Pid).map_err(|_| bad());
        }
        let name = s.strip_prefix("name:").unwrap_or(s).trim();
        // comm is at most 15 bytes (TASK_COMM_LEN - 1): a longer name could never match.
        if name.is_empty() || name.len() > 15 {
            return Err(bad());
        }
        Ok(Target::Name(name.to_string()))
    }
}

/// Which pages of a target to touch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TouchMode {
    /// Present pages whose frame is in the last hot set (all present pages if there is no
    /// hot set yet).
    #[default]
    Hot,
    /// All present pages.
    All,
}

/// The ids of the processes `targets` name, without our own.
pub fn resolve(targets: &[Target]) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut out: Vec<i32> = Vec::new();
    let by_name = targets.iter().any(|t| matches!(t, Target::Name(_)));
    let all = if by_name {
        procfs::pids().unwrap_or_default()
    } else {
        Vec::new()
    };
    for t in targets {
        match t {
            Target::Pid(p) => out.push(*p),
            Target::Name(n) => out.extend(
                all.iter()
                    .copied()
                    .filter(|&p| procfs::comm(p).as_deref() == Some(n)),
            ),
        }
    }
    out.retain(|&p| p != me);
    out.sort_unstable();
    out.dedup();
    out
}

fn touchable(m: &Mapping) -> bool {
    m.read && m.write && m.private && !m.is_special()
}

/// Virtual addresses of the pages of `pid` to touch.
pub fn plan(pid: i32, mode: TouchMode, hot: Option<&[PfnRange]>) -> io::Result<Vec<u64>> {
    let page = procfs::page_size();
    let pm = Pagemap::open(pid)?;
    let hot = if mode == TouchMode::Hot { hot } else { None };
    let mut out = Vec::new();
    let mut entries = vec![0u64; 4096];
    for m in procfs::maps(pid)?.iter().filter(|m| touchable(m)) {
        let mut addr = m.start;
        while addr < m.end {
            let want = (((m.end - addr) / page) as usize).min(entries.len());
            let n = pm.read(addr, &mut entries[..want])?;
            if n == 0 {
                break;
            }
            for (i, &e) in entries[..n].iter().enumerate() {
                let keep =
                    e & PM_PRESENT != 0 && hot.is_none_or(|h| ranges::contains(h, e & PM_PFN_MASK));
                if keep {
                    out.push(addr + i as u64 * page);
                }
            }
            addr += n as u64 * page;
        }
    }
    Ok(out)
}

/// Reads one byte at each of `addrs` in `pid`; returns (pages read, pages failed).
fn read_pages(pid: i32, addrs: &[u64], scratch: &mut [u8]) -> (u64, u64) {
    let remote: Vec<libc::iovec> = addrs
        .iter()
        .map(|&a| libc::iovec {
            iov_base: a as *mut libc::c_void,
            iov_len: 1,
        })
        .collect();
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut i = 0;
    while i < remote.len() {
        let n = (remote.len() - i).min(PAGES_PER_CALL).min(scratch.len());
        let local = libc::iovec {
            iov_base: scratch.as_mut_ptr().cast(),
            iov_len: n,
        };
        // SAFETY: `local` points at `n` writable bytes of `scratch`, which outlives the
        // call; the remote iovecs are only addresses in the other process, which the kernel
        // checks (a bad one makes the call stop short, it cannot touch our memory).
        let got = unsafe {
            libc::process_vm_readv(pid, &local, 1, remote[i..].as_ptr(), n as libc::c_ulong, 0)
        };
        if got < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ESRCH) {
                // The process is gone: nothing more to read.
                failed += (remote.len() - i) as u64;
                break;
            }
            // The first page failed (unmapped since the plan): skip it.
            failed += 1;
            i += 1;
            continue;
        }
        let got = got as usize;
        ok += got as u64;
        i += got;
        if got < n {
            // Stopped at a page that failed; skip it.
            failed += 1;
            i += 1;
        }
    }
    (ok, failed)
}

/// Pre-touches the hot pages of `targets` from `threads` threads and says what it did
/// (`elapsed_ms` covers planning and touching).
pub fn touch(
    targets: &[Target],
    threads: usize,
    mode: TouchMode,
    hot: Option<&[PfnRange]>,
) -> TouchReport {
    let started = Instant::now();
    let pids = resolve(targets);
    let mut work: Vec<(i32, Vec<u64>)> = Vec::new();
    let mut processes = 0u32;
    for &pid in &pids {
        if let Ok(addrs) = plan(pid, mode, hot) {
            processes += 1;
            // Batches small enough that the threads share the work evenly.
            for c in addrs.chunks(PAGES_PER_CALL) {
                work.push((pid, c.to_vec()));
            }
        }
    }
    let next = AtomicUsize::new(0);
    let ok = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, 64) {
            s.spawn(|| {
                let mut scratch = vec![0u8; PAGES_PER_CALL];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((pid, addrs)) = work.get(i) else {
                        break;
                    };
                    let (o, f) = read_pages(*pid, addrs, &mut scratch);
                    ok.fetch_add(o, Ordering::Relaxed);
                    failed.fetch_add(f, Ordering::Relaxed);
                }
            });
        }
    });
    TouchReport {
        processes,
        pages: ok.into_inner(),
        failed_pages: failed.into_inner(),
        elapsed_ms: started.elapsed().as_millis() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!("pid:42".parse(), Ok(Target::Pid(42)));
        assert_eq!(
            "name:faultline-touch".parse(),
            Ok(Target::Name("faultline-touch".into()))
        );
        assert_eq!("postgres".parse(), Ok(Target::Name("postgres".into())));
        assert!("pid:x".parse::<Target>().is_err());
        assert!("name:".parse::<Target>().is_err());
        assert!("name:a-name-longer-than-15".parse::<Target>().is_err());
    }

    #[test]
    fn touches_a_child_process() {
        // A child that maps memory and sleeps; we touch it from here.
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        std::thread::sleep(std::time::Duration::from_millis(50));
        let r = touch(&[Target::Pid(pid)], 2, TouchMode::All, None);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(r.processes, 1);
        assert!(r.pages > 0, "{r:?}");
        // A hot set that holds nothing: nothing to touch.
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let r = touch(
            &[Target::Pid(child.id() as i32)],
            2,
            TouchMode::Hot,
            Some(&[]),
        );
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(r.pages, 0);
    }

    #[test]
    fn own_process_is_never_a_target() {
        let me = std::process::id() as i32;
        assert_eq!(resolve(&[Target::Pid(me)]), Vec::<i32>::new());
    }
}
