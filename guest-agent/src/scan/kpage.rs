//! Raw access to `/proc/kpageflags` (8 bytes of flags per frame) and
//! `/sys/kernel/mm/page_idle/bitmap` (1 bit per frame, in 8-byte words), read and written
//! in large chunks with `pread`/`pwrite`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Where the kernel exports the flags of every frame (root only).
pub const KPAGEFLAGS: &str = "/proc/kpageflags";
/// Where the kernel exports idle page tracking (needs `CONFIG_IDLE_PAGE_TRACKING`).
pub const PAGE_IDLE_BITMAP: &str = "/sys/kernel/mm/page_idle/bitmap";

/// Reads `buf.len()` bytes at `offset`, fewer only at the end of the file.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn decode_words(bytes: &[u8], out: &mut [u64]) -> usize {
    let n = (bytes.len() / 8).min(out.len());
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)).take(n) {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        *o = u64::from_le_bytes(w);
    }
    n
}

/// An open `/proc/kpageflags`.
#[derive(Debug)]
pub struct Kpageflags {
    file: File,
    end: u64,
    bytes: Vec<u8>,
}

impl Kpageflags {
    /// Opens `path` and finds how many frames it covers (the kernel's `max_pfn`: reads past
    /// it return nothing, frames below it without memory read as `KPF_NOPAGE`).
    pub fn open(path: &Path) -> io::Result<Kpageflags> {
        let file = File::open(path)?;
        let present = |pfn: u64| -> io::Result<bool> {
            let mut b = [0u8; 8];
            Ok(read_full_at(&file, &mut b, pfn * 8)? == 8)
        };
        let end = if !present(0)? {
            0
        } else {
            // Exponential then binary search for the first frame that reads nothing.
            let mut lo = 0u64; // present
            let mut hi = 1u64;
            while hi < (1 << 44) && present(hi)? {
                lo = hi;
                hi *= 2;
            }
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if present(mid)? {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            hi
        };
        Ok(Kpageflags {
            file,
            end,
            bytes: Vec::new(),
        })
    }

    /// One past the last frame.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Reads the flags of frames `first..` into `out`; returns how many were read.
    pub fn read(&mut self, first: u64, out: &mut [u64]) -> io::Result<usize> {
        self.bytes.resize(out.len() * 8, 0);
        let got = read_full_at(&self.file, &mut self.bytes, first * 8)?;
        Ok(decode_words(&self.bytes[..got], out))
    }
}

/// An open idle page bitmap.
#[derive(Debug)]
pub struct IdleBitmap {
    file: File,
    bytes: Vec<u8>,
}

impl IdleBitmap {
    /// Opens `path` for reading and writing.
    pub fn open(path: &Path) -> io::Result<IdleBitmap> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(IdleBitmap {
            file,
            bytes: Vec::new(),
        })
    }

    /// Reads the idle bits of frames `first..` (`first` a multiple of 64) into `words`
    /// (bit i of word j is frame `first + 64 j + i`); returns words read. The kernel checks
    /// the accessed bits of the page tables mapping each still-idle LRU page as it reads.
    pub fn read(&mut self, first: u64, words: &mut [u64]) -> io::Result<usize> {
        debug_assert_eq!(first % 64, 0);
        self.bytes.resize(words.len() * 8, 0);
        let got = read_full_at(&self.file, &mut self.bytes, first / 8)?;
        Ok(decode_words(&self.bytes[..got], words))
    }

    /// Marks frames `first..first + 64 * words` idle (the kernel ignores frames that are
    /// not LRU pages, and clears their page-table accessed bits).
    pub fn set_idle(&mut self, first: u64, words: usize) -> io::Result<()> {
        debug_assert_eq!(first % 64, 0);
        self.bytes.clear();
        self.bytes.resize(words * 8, 0xFF);
        let mut done = 0;
        while done < self.bytes.len() {
            match self
                .file
                .write_at(&self.bytes[done..], first / 8 + done as u64)
            {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Past max_pfn.
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
