//! The bits of `/proc` the agent reads: process ids and names, memory maps, and
//! `/proc/PID/pagemap` (virtual page → frame, present and soft-dirty bits).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Page present in RAM (pagemap bit 63).
pub const PM_PRESENT: u64 = 1 << 63;
/// Written since soft-dirty bits were last cleared (pagemap bit 55).
pub const PM_SOFT_DIRTY: u64 = 1 << 55;
/// The frame number of a present page (bits 0-54; reads as 0 without CAP_SYS_ADMIN).
pub const PM_PFN_MASK: u64 = (1 << 55) - 1;

/// The page size of the running kernel.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as u64
    } else {
        4096
    }
}

/// Ids of all processes (the numeric entries of `/proc`).
pub fn pids() -> io::Result<Vec<i32>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc")? {
        let Ok(e) = e else { continue };
        if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
            out.push(pid);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// The command name of `pid` (`/proc/PID/comm`, at most 15 bytes), if it still exists.
pub fn comm(pid: i32) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(s.trim_end_matches('\n').to_string())
}

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// Private (copy-on-write) rather than shared.
    pub private: bool,
    /// The file or pseudo-name (`[heap]`, `[stack]`, ...), empty for anonymous memory.
    pub name: String,
}

impl Mapping {
    /// Kernel-provided pseudo-mappings whose pages are not ordinary memory of the process
    /// (`[vsyscall]`, `[vvar]`, `[vdso]`).
    pub fn is_special(&self) -> bool {
        matches!(
            self.name.as_str(),
            "[vsyscall]" | "[vvar]" | "[vdso]" | "[vvar_vclock]"
        )
    }

    /// Pages in the mapping.
    pub fn pages(&self, page_size: u64) -> u64 {
        (self.end - self.start) / page_size
    }
}

/// Parses the text of `/proc/PID/maps`; lines that do not parse are skipped.
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines().filter_map(parse_maps_line).collect()
}

fn parse_maps_line(line: &str) -> Option<Mapping> {
    // "start-end perms offset dev inode    name"
    let mut f = line.splitn(6, ' ');
    let (start, end) = f.next()?.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let perms = f.next()?.as_bytes();
    if perms.len() < 4 || end <= start {
        return None;
    }
    let name = f.nth(3).unwrap_or("").trim_start().to_string();
    Some(Mapping {
        start,
        end,
        read: perms[0] == b'r',
        write: perms[1] == b'w',
        private: perms[3] == b'p',
        name,
    })
}

/// The memory maps of `pid`.
pub fn maps(pid: i32) -> io::Result<Vec<Mapping>> {
    Ok(parse_maps(&std::fs::read_to_string(format!(
        "/proc/{pid}/maps"
    ))?))
}

/// An open `/proc/PID/pagemap`.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
    page_size: u64,
}

impl Pagemap {
    /// Opens the pagemap of `pid`.
    pub fn open(pid: i32) -> io::Result<Pagemap> {
        Ok(Pagemap {
            file: File::open(format!("/proc/{pid}/pagemap"))?,
            page_size: page_size(),
        })
    }

    /// Reads the entries of the pages from virtual address `addr` on into `out`; returns how
    /// many were read (fewer at the end of the address space).
    pub fn read(&self, addr: u64, out: &mut [u64]) -> io::Result<usize> {
        let mut bytes = vec![0u8; out.len() * 8];
        let offset = addr / self.page_size * 8;
        let mut got = 0;
        while got < bytes.len() {
            match self.file.read_at(&mut bytes[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        let n = got / 8;
        for (o, c) in out.iter_mut().zip(bytes[..n * 8].chunks_exact(8)) {
            *o = u64::from_le_bytes(c.try_into().unwrap_or_default());
        }
        Ok(n)
    }
}

/// Writes `what` to `/proc/PID/clear_refs` (`"4"` clears the soft-dirty bits of all the
/// process's pages).
pub fn clear_refs(pid: i32, what: &str) -> io::Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines() {
        let text = "\
00400000-00452000 r-xp 00000000 08:02 173521      /usr/bin/dbus-daemon
00e03000-00e24000 rw-p 00000000 00:00 0           [heap]
7f2c0000-7f2c4000 rw-s 00000000 00:05 12 /dev/zero (deleted)
7ffc1000-7ffc3000 r--p 00000000 00:00 0                  [vvar]
7ffd0000-7ffe0000 rw-p 00000000 00:00 0
garbage line
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0  [vsyscall]
";
        let m = parse_maps(text);
        assert_eq!(m.len(), 6);
        assert_eq!(m[0].start, 0x400000);
        assert_eq!(m[0].name, "/usr/bin/dbus-daemon");
        assert!(m[1].read && m[1].write && m[1].private);
        assert_eq!(m[1].name, "[heap]");
        assert!(!m[2].private);
        assert_eq!(m[2].name, "/dev/zero (deleted)");
        assert!(m[3].is_special() && m[5].is_special());
        assert_eq!(m[4].name, "");
        assert_eq!(m[4].pages(4096), 16);
    }

    #[test]
    fn own_pagemap_shows_a_touched_page() {
        let mut v = vec![1u8; 4096 * 4];
        v[4096] = 2;
        let pm = Pagemap::open(std::process::id() as i32).unwrap();
        let mut e = [0u64; 1];
        assert_eq!(pm.read(v.as_ptr() as u64 + 4096, &mut e).unwrap(), 1);
        assert!(e[0] & PM_PRESENT != 0);
        std::hint::black_box(&mut v);
    }
}
