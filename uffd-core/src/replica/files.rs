//! The one implementation behind both tiers: `memory.img` + mmapped `index.bin` in a
//! directory, with the tier deciding only the sync behaviour (and, for the memory tier,
//! that the directory must be tmpfs).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use super::error::ReplicaError;
use super::format::{
    self, decode_header, encode_header, page_checksum, Header, HeaderProblem, CHECKSUM_WORD,
    ENTRY_LEN, HEADER_LEN, HEADER_USED, HEADER_WORDS,
};
use super::Tier;
use crate::PAGE_SIZE;

pub(crate) const MEMORY_FILE: &str = "memory.img";
pub(crate) const INDEX_FILE: &str = "index.bin";
const INDEX_TMP: &str = "index.bin.tmp";

/// Pages handed to a verification thread at a time (16 MiB).
const VERIFY_UNIT: u64 = 4096;
/// Pages read per pread during verification (256 KiB, stays in L2).
const VERIFY_RUN: u64 = 64;
/// Torn pages named in the log, at most.
const TORN_SAMPLE: usize = 16;

/// tmpfs' `f_type` (linux/magic.h TMPFS_MAGIC).
pub(crate) const TMPFS_MAGIC: i64 = 0x0102_1994;

/// What opening a replica ([`super::MemoryTier::open`], [`super::DiskTier::open`] or
/// their `create`) found and did; kept as [`super::MemoryTier::open_report`] /
/// [`super::DiskTier::open_report`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// The index did not exist (or `create` was called): an empty replica was made.
    pub created: bool,
    /// The index was ours but damaged (torn header, wrong length) and was reset to an
    /// empty replica; the reason, as also logged.
    pub reinitialized: Option<String>,
    /// Entries that claimed a version and were checked against `memory.img`.
    pub verified_pages: u64,
    /// Of those, pages whose content did not match (set to version 0).
    pub torn_pages: u64,
    /// Wall time of the verification.
    pub verify_time: Duration,
}

/// An owned shared mapping, unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    addr: usize,
    len: usize,
}

impl Mapping {
    /// Maps `len` bytes of `file` shared, read/write.
    pub(crate) fn shared(file: &File, len: usize, path: &Path) -> Result<Mapping, ReplicaError> {
        // SAFETY: a fresh mapping at a kernel-chosen address cannot overlap memory Rust
        // already uses; fd and length are plain values checked by the kernel.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(ReplicaError::io("mmap", path, io::Error::last_os_error()));
        }
        Ok(Mapping {
            addr: ptr as usize,
            len,
        })
    }

    pub(crate) fn addr(&self) -> usize {
        self.addr
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// `msync(MS_SYNC)` of the pages covering `[off, off + len)`.
    fn msync(&self, off: usize, len: usize) -> io::Result<()> {
        let start = off.min(self.len) & !(PAGE_SIZE - 1);
        let end = off.saturating_add(len).min(self.len);
        if end <= start {
            return Ok(());
        }
        // SAFETY: [start, end) lies inside this mapping (clamped above) and start is
        // page aligned; msync does not touch Rust-visible memory.
        let ret = unsafe {
            libc::msync(
                (self.addr + start) as *mut libc::c_void,
                end - start,
                libc::MS_SYNC,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: (addr, len) is exactly the mapping this value created and owns; the
        // only references into it are borrows of `self`, which end before drop.
        unsafe {
            libc::munmap(self.addr as *mut libc::c_void, self.len);
        }
    }
}

/// Punches `[off, off + len)` out of `file` (the range then reads as zeros and, on
/// shmem, is missing for userfaultfd).
pub(crate) fn punch_hole(file: &File, off: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(len)) = (i64::try_from(off), i64::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: fallocate takes an fd we own and two integers; it touches no user memory.
    let ret = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Filesystem type of `file` (statfs `f_type`).
pub(crate) fn fs_type(file: &File) -> io::Result<i64> {
    // SAFETY: statfs is plain old data; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a live, writable statfs for the duration of the call.
    let ret = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between libcs
    let fs = st.f_type as i64;
    Ok(fs)
}

/// The replica directory, `flock`ed exclusively; unlocked when dropped.
///
/// The lock belongs to the open file description, which a child process shares from its
/// fork until its exec closes the copy. Closing our fd alone would leave the directory
/// locked for that moment, and a reopen in this process (or the next standby) would see
/// [`ReplicaError::Locked`]; `LOCK_UN` releases it whoever else holds a copy.
#[derive(Debug)]
pub(crate) struct DirLock {
    file: File,
}

impl DirLock {
    /// Locks `dir`, or says it is [`ReplicaError::Locked`] by another holder.
    pub(crate) fn acquire(dir: &Path) -> Result<DirLock, ReplicaError> {
        let file = File::open(dir).map_err(|e| ReplicaError::io("open directory", dir, e))?;
        // SAFETY: flock takes an fd we own and a flag; it touches no user memory.
        let ret = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(ReplicaError::Locked { path: dir.into() });
            }
            return Err(ReplicaError::io("flock", dir, e));
        }
        Ok(DirLock { file })
    }

    /// The directory, open read-only (for `fstatfs` and `fsync`).
    pub(crate) fn file(&self) -> &File {
        &self.file
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        // SAFETY: flock takes an fd we own (still open: `file` closes after this) and a
        // flag. A failure leaves the lock to the close that follows, as before.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Bytes of guest memory for `pages`, if the host can map and address it.
fn memory_len(pages: u64) -> Result<usize, ReplicaError> {
    let bad = || ReplicaError::BadPageCount { pages };
    if pages == 0 {
        return Err(bad());
    }
    let len = pages.checked_mul(PAGE_SIZE as u64).ok_or_else(bad)?;
    if i64::try_from(len).is_err() || format::index_len(pages).is_none() {
        return Err(bad());
    }
    usize::try_from(len).map_err(|_| bad())
}

/// Reads up to `buf.len()` bytes at offset 0; returns how many were available.
fn read_prefix(file: &File, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// The replica: files, mapped index, and the lock that orders writers.
#[derive(Debug)]
pub(crate) struct ReplicaFiles {
    pub(crate) dir: PathBuf,
    pub(crate) tier: Tier,
    pub(crate) total_pages: u64,
    pub(crate) mem_len: usize,
    pub(crate) memory: File,
    pub(crate) index: Mapping,
    /// The directory, flock'ed exclusively while this store (or the guest mapping it
    /// became) lives.
    pub(crate) lock: DirLock,
    epoch: AtomicU64,
    torn: AtomicU64,
    report: OpenReport,
    /// Writers (store, set_epoch, switchover) exclusive; readers shared. Entries are
    /// atomics, so `version()` needs no lock.
    guard: RwLock<()>,
}

impl ReplicaFiles {
    /// Opens (or creates) the replica in `dir`; `wipe` forces a fresh, empty one.
    pub(crate) fn open(
        dir: &Path,
        total_pages: u64,
        tier: Tier,
        wipe: bool,
    ) -> Result<ReplicaFiles, ReplicaError> {
        let mem_len = memory_len(total_pages)?;
        let idx_len = format::index_len(total_pages)
            .ok_or(ReplicaError::BadPageCount { pages: total_pages })?;
        std::fs::create_dir_all(dir).map_err(|e| ReplicaError::io("create_dir_all", dir, e))?;
        let lock = DirLock::acquire(dir)?;
        if tier == Tier::Memory {
            let fs = fs_type(lock.file()).map_err(|e| ReplicaError::io("fstatfs", dir, e))?;
            if fs != TMPFS_MAGIC {
                return Err(ReplicaError::NotTmpfs {
                    path: dir.into(),
                    fs_type: fs,
                });
            }
        }
        let mem_path = dir.join(MEMORY_FILE);
        let idx_path = dir.join(INDEX_FILE);
        let mut report = OpenReport::default();
        let init = if wipe {
            report.created = true;
            true
        } else {
            match Self::inspect_index(&idx_path, total_pages, idx_len)? {
                Inspect::Missing => {
                    report.created = true;
                    true
                }
                Inspect::Damaged(reason) => {
                    tracing::warn!(
                        path = %idx_path.display(),
                        %reason,
                        "replica index damaged; re-initialising an empty replica \
                         (every page invalid, all of them will come from the source)"
                    );
                    report.reinitialized = Some(reason);
                    true
                }
                Inspect::Good => false,
            }
        };
        // Only now, with the index known to be ours (or about to be), touch memory.img.
        let memory = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&mem_path)
            .map_err(|e| ReplicaError::io("open", &mem_path, e))?;
        if init {
            Self::write_fresh_index(dir, lock.file(), &idx_path, total_pages, idx_len)?;
            // Every entry is invalid now; drop the old content to free its space.
            memory
                .set_len(0)
                .and_then(|()| memory.set_len(mem_len as u64))
                .map_err(|e| ReplicaError::io("ftruncate", &mem_path, e))?;
        } else {
            let len = memory
                .metadata()
                .map_err(|e| ReplicaError::io("stat", &mem_path, e))?
                .len();
            if len != mem_len as u64 {
                tracing::warn!(
                    path = %mem_path.display(),
                    len,
                    expected = mem_len,
                    "replica memory image has the wrong size; resizing (pages that changed \
                     fail verification)"
                );
                memory
                    .set_len(mem_len as u64)
                    .map_err(|e| ReplicaError::io("ftruncate", &mem_path, e))?;
            }
        }
        let index_file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&idx_path)
            .map_err(|e| ReplicaError::io("open", &idx_path, e))?;
        let index = Mapping::shared(&index_file, idx_len, &idx_path)?;
        let mut files = ReplicaFiles {
            dir: dir.into(),
            tier,
            total_pages,
            mem_len,
            memory,
            index,
            lock,
            epoch: AtomicU64::new(0),
            torn: AtomicU64::new(0),
            report: OpenReport::default(),
            guard: RwLock::new(()),
        };
        // Decode once more from the mapping itself: this is what we run on.
        let mut hdr = [0u8; HEADER_USED];
        for (chunk, w) in hdr.chunks_exact_mut(8).zip(files.header_words()) {
            chunk.copy_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
        }
        let header = decode_header(&hdr).map_err(|p| ReplicaError::NotAReplica {
            path: idx_path.clone(),
            reason: format!("header changed while opening: {p:?}"),
        })?;
        files.epoch.store(header.epoch, Ordering::Release);
        if !init {
            let started = Instant::now();
            let (verified, torn) = files.verify()?;
            report.verified_pages = verified;
            report.torn_pages = torn;
            report.verify_time = started.elapsed();
            files.torn.store(torn, Ordering::Release);
        }
        tracing::info!(
            dir = %dir.display(),
            tier = ?tier,
            pages = total_pages,
            epoch = header.epoch,
            created = report.created,
            verified = report.verified_pages,
            torn = report.torn_pages,
            verify_ms = report.verify_time.as_secs_f64() * 1e3,
            "replica opened"
        );
        files.report = report;
        Ok(files)
    }

    fn inspect_index(
        path: &Path,
        total_pages: u64,
        idx_len: usize,
    ) -> Result<Inspect, ReplicaError> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Inspect::Missing),
            Err(e) => return Err(ReplicaError::io("open", path, e)),
        };
        let len = file
            .metadata()
            .map_err(|e| ReplicaError::io("stat", path, e))?
            .len();
        let mut buf = [0u8; HEADER_USED];
        let got = read_prefix(&file, &mut buf).map_err(|e| ReplicaError::io("read", path, e))?;
        match decode_header(&buf[..got]) {
            Err(HeaderProblem::Foreign(reason)) => Err(ReplicaError::NotAReplica {
                path: path.into(),
                reason,
            }),
            Err(HeaderProblem::Unsupported {
                format_version,
                page_size,
            }) => Err(ReplicaError::UnsupportedFormat {
                path: path.into(),
                format_version,
                page_size,
                supported: format::FORMAT_VERSION,
            }),
            Err(HeaderProblem::Checksum) => Ok(Inspect::Damaged(
                "header checksum mismatch (torn header update or damage)".into(),
            )),
            Ok(h) if h.total_pages != total_pages => Err(ReplicaError::PageCountMismatch {
                path: path.into(),
                found: h.total_pages,
                expected: total_pages,
            }),
            Ok(_) if len != idx_len as u64 => Ok(Inspect::Damaged(format!(
                "index is {len} bytes, expected {idx_len} (truncated or extended)"
            ))),
            Ok(_) => Ok(Inspect::Good),
        }
    }

    /// Writes an empty index next to the real one and renames it over, so a crash
    /// leaves either the old index or a complete new one.
    fn write_fresh_index(
        dir: &Path,
        dir_file: &File,
        idx_path: &Path,
        total_pages: u64,
        idx_len: usize,
    ) -> Result<(), ReplicaError> {
        let tmp = dir.join(INDEX_TMP);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| ReplicaError::io("create", &tmp, e))?;
        f.set_len(idx_len as u64)
            .map_err(|e| ReplicaError::io("ftruncate", &tmp, e))?;
        let words = encode_header(Header {
            total_pages,
            epoch: 0,
        });
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        f.write_all_at(&bytes, 0)
            .map_err(|e| ReplicaError::io("write", &tmp, e))?;
        f.sync_all()
            .map_err(|e| ReplicaError::io("fsync", &tmp, e))?;
        std::fs::rename(&tmp, idx_path).map_err(|e| ReplicaError::io("rename", idx_path, e))?;
        dir_file
            .sync_all()
            .map_err(|e| ReplicaError::io("fsync", dir, e))?;
        Ok(())
    }

    fn words(&self, first: usize, n: usize) -> &[AtomicU64] {
        debug_assert!((first + n) * 8 <= self.index.len());
        // SAFETY: the index mapping is page aligned, so word `first` is 8-byte aligned;
        // callers only ask for words inside the mapping (header words, or the
        // 2 * total_pages entry words whose length `index_len` covers). The mapping
        // lives as long as `self`, AtomicU64 has u64's layout, and every access to
        // these words in this process goes through atomics; the directory flock keeps
        // other faultline processes from writing the file.
        unsafe { std::slice::from_raw_parts((self.index.addr() as *const AtomicU64).add(first), n) }
    }

    fn header_words(&self) -> &[AtomicU64] {
        self.words(0, HEADER_WORDS)
    }

    fn entries(&self) -> &[AtomicU64] {
        self.words(HEADER_LEN / 8, self.total_pages as usize * (ENTRY_LEN / 8))
    }

    fn entry(&self, page: u64) -> Option<(u64, u64)> {
        let e = self.entries();
        let i = usize::try_from(page).ok()?.checked_mul(2)?;
        let v = e.get(i)?.load(Ordering::Acquire);
        let c = e.get(i + 1)?.load(Ordering::Acquire);
        Some((u64::from_le(v), u64::from_le(c)))
    }

    fn set_entry(&self, page: u64, version: u64, checksum: u64) {
        let e = self.entries();
        let i = page as usize * 2;
        if let (Some(v), Some(c)) = (e.get(i), e.get(i + 1)) {
            v.store(version.to_le(), Ordering::Release);
            c.store(checksum.to_le(), Ordering::Release);
        }
    }

    fn clear_entry(&self, page: u64) {
        self.set_entry(page, 0, 0);
    }

    pub(crate) fn check_page(&self, page: u64) -> Result<(), ReplicaError> {
        if page < self.total_pages {
            Ok(())
        } else {
            Err(ReplicaError::PageOutOfRange {
                page,
                total: self.total_pages,
            })
        }
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub(crate) fn torn_pages(&self) -> u64 {
        self.torn.load(Ordering::Acquire)
    }

    pub(crate) fn report(&self) -> &OpenReport {
        &self.report
    }

    pub(crate) fn version(&self, page: u64) -> u64 {
        self.entry(page).map_or(0, |(v, _)| v)
    }

    pub(crate) fn mem_path(&self) -> PathBuf {
        self.dir.join(MEMORY_FILE)
    }

    fn idx_path(&self) -> PathBuf {
        self.dir.join(INDEX_FILE)
    }

    fn durable(&self) -> bool {
        self.tier == Tier::Disk
    }

    /// Checks every entry that claims a version against `memory.img`, in parallel;
    /// clears the ones that do not match. Returns (checked, torn).
    fn verify(&self) -> Result<(u64, u64), ReplicaError> {
        let epoch = self.epoch();
        let next = AtomicU64::new(0);
        let checked = AtomicU64::new(0);
        let torn = AtomicU64::new(0);
        let sample = Mutex::new(Vec::new());
        let work = || {
            let mut buf = vec![0u8; VERIFY_RUN as usize * PAGE_SIZE];
            loop {
                let start = next.fetch_add(VERIFY_UNIT, Ordering::Relaxed);
                if start >= self.total_pages {
                    break;
                }
                let end = (start + VERIFY_UNIT).min(self.total_pages);
                let mut p = start;
                while p < end {
                    if self.version(p) == 0 {
                        p += 1;
                        continue;
                    }
                    let mut q = p + 1;
                    while q < end && q - p < VERIFY_RUN && self.version(q) != 0 {
                        q += 1;
                    }
                    let n = (q - p) as usize;
                    let bytes = &mut buf[..n * PAGE_SIZE];
                    let read = self.memory.read_exact_at(bytes, p * PAGE_SIZE as u64);
                    if let Err(e) = &read {
                        tracing::warn!(first = p, pages = n, error = %e, "replica pages unreadable; treating them as torn");
                    }
                    for (k, page) in (p..q).enumerate() {
                        let ok = read.is_ok()
                            && self.entry(page).is_some_and(|(v, c)| {
                                page_checksum(
                                    page,
                                    v,
                                    epoch,
                                    &bytes[k * PAGE_SIZE..(k + 1) * PAGE_SIZE],
                                ) == c
                            });
                        if !ok {
                            self.clear_entry(page);
                            torn.fetch_add(1, Ordering::Relaxed);
                            let mut s = sample.lock().unwrap_or_else(|e| e.into_inner());
                            if s.len() < TORN_SAMPLE {
                                s.push(page);
                            }
                        }
                    }
                    checked.fetch_add(n as u64, Ordering::Relaxed);
                    p = q;
                }
            }
        };
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 16);
        let units = self.total_pages.div_ceil(VERIFY_UNIT) as usize;
        let helpers = threads.min(units).saturating_sub(1);
        let joined = std::thread::scope(|s| {
            let handles: Vec<_> = (0..helpers)
                .filter_map(|_| {
                    std::thread::Builder::new()
                        .name("replica-verify".into())
                        .spawn_scoped(s, work)
                        .ok()
                })
                .collect();
            // This thread works too, so verification finishes even if no helper
            // could be spawned.
            work();
            handles.into_iter().all(|h| h.join().is_ok())
        });
        if !joined {
            return Err(ReplicaError::io(
                "verify",
                self.mem_path(),
                io::Error::other("a verification thread panicked"),
            ));
        }
        let torn = torn.into_inner();
        if torn > 0 {
            let sample = sample.into_inner().unwrap_or_else(|e| e.into_inner());
            tracing::warn!(
                dir = %self.dir.display(),
                torn,
                sample = ?sample,
                "replica pages failed verification (torn by a crash mid-write or damaged); \
                 they are invalid now and will come from the source"
            );
        }
        Ok((checked.into_inner(), torn))
    }

    pub(crate) fn set_epoch(&self, epoch: u64) -> Result<(), ReplicaError> {
        let _w = self.guard.write().unwrap_or_else(|e| e.into_inner());
        if epoch == self.epoch() {
            return Ok(());
        }
        // Entries first, header second: a crash in between leaves the old epoch with
        // (some) invalid entries, never the new epoch with old entries.
        for w in self.entries() {
            w.store(0, Ordering::Relaxed);
        }
        fence(Ordering::SeqCst);
        if self.durable() {
            self.index
                .msync(HEADER_LEN, self.index.len() - HEADER_LEN)
                .map_err(|e| ReplicaError::io("msync", self.idx_path(), e))?;
        }
        let words = encode_header(Header {
            total_pages: self.total_pages,
            epoch,
        });
        // A torn header (epoch written, checksum not) fails its checksum on reopen and
        // is re-initialised, losing nothing: the entries are already invalid. Every word
        // is written, the checksum last: the checksum covers the reserved word too, which
        // an index written by someone else may hold non-zero.
        let h = self.header_words();
        for (i, w) in words.iter().enumerate() {
            if i != CHECKSUM_WORD {
                h[i].store(w.to_le(), Ordering::Release);
            }
        }
        h[CHECKSUM_WORD].store(words[CHECKSUM_WORD].to_le(), Ordering::Release);
        if self.durable() {
            self.index
                .msync(0, HEADER_LEN)
                .map_err(|e| ReplicaError::io("msync", self.idx_path(), e))?;
        }
        self.epoch.store(epoch, Ordering::Release);
        // Old content is meaningless now; free its space. Failure only costs space.
        if let Err(e) = punch_hole(&self.memory, 0, self.mem_len as u64) {
            tracing::warn!(path = %self.mem_path().display(), error = %e, "could not free old replica content");
        }
        tracing::info!(dir = %self.dir.display(), epoch, "replica epoch changed; all pages invalid");
        Ok(())
    }

    pub(crate) fn store(
        &self,
        first: u64,
        versions: &[u64],
        data: &[u8],
    ) -> Result<(), ReplicaError> {
        let expected = versions.len().saturating_mul(PAGE_SIZE);
        if data.len() != expected {
            return Err(ReplicaError::BadDataLength {
                len: data.len(),
                expected,
            });
        }
        if versions.is_empty() {
            return Ok(());
        }
        let n = versions.len() as u64;
        let last = first
            .checked_add(n - 1)
            .ok_or(ReplicaError::PageOutOfRange {
                page: u64::MAX,
                total: self.total_pages,
            })?;
        self.check_page(first)?;
        self.check_page(last)?;
        if let Some(i) = versions.iter().position(|&v| v == 0) {
            return Err(ReplicaError::ZeroVersion {
                page: first + i as u64,
            });
        }
        let _w = self.guard.write().unwrap_or_else(|e| e.into_inner());
        let epoch = self.epoch();
        if epoch == 0 {
            return Err(ReplicaError::NoEpoch);
        }
        let sums: Vec<u64> = versions
            .iter()
            .zip(data.chunks_exact(PAGE_SIZE))
            .enumerate()
            .map(|(i, (&v, d))| page_checksum(first + i as u64, v, epoch, d))
            .collect();
        // Data first, then the entries: a crash in between leaves old entries over new
        // (or partial) data, which fails verification on reopen.
        if let Err(e) = self.memory.write_all_at(data, first * PAGE_SIZE as u64) {
            // Some of the data may have landed: the old entries no longer describe it.
            for p in first..=last {
                self.clear_entry(p);
            }
            return Err(ReplicaError::io("pwrite", self.mem_path(), e));
        }
        fence(Ordering::SeqCst);
        for (i, (&v, &c)) in versions.iter().zip(&sums).enumerate() {
            self.set_entry(first + i as u64, v, c);
        }
        Ok(())
    }

    pub(crate) fn read(&self, page: u64, out: &mut [u8]) -> Result<Option<u64>, ReplicaError> {
        self.check_page(page)?;
        if out.len() != PAGE_SIZE {
            return Err(ReplicaError::BadBufferLength { len: out.len() });
        }
        let _r = self.guard.read().unwrap_or_else(|e| e.into_inner());
        let Some((version, sum)) = self.entry(page).filter(|&(v, _)| v != 0) else {
            return Ok(None);
        };
        self.memory
            .read_exact_at(out, page * PAGE_SIZE as u64)
            .map_err(|e| ReplicaError::io("pread", self.mem_path(), e))?;
        if page_checksum(page, version, self.epoch(), out) != sum {
            // Only an outside writer can cause this (our writers hold the lock).
            tracing::warn!(
                page,
                version,
                "replica page failed its checksum on read; invalidated"
            );
            self.clear_entry(page);
            self.torn.fetch_add(1, Ordering::AcqRel);
            out.fill(0);
            return Ok(None);
        }
        Ok(Some(version))
    }

    pub(crate) fn sync(&self) -> Result<(), ReplicaError> {
        if !self.durable() {
            return Ok(());
        }
        self.memory
            .sync_data()
            .map_err(|e| ReplicaError::io("fdatasync", self.mem_path(), e))?;
        self.index
            .msync(0, self.index.len())
            .map_err(|e| ReplicaError::io("msync", self.idx_path(), e))
    }

    /// For the switchover: invalidates every page not in `present` (they are about to
    /// become holes), so the index never claims content the file no longer has.
    pub(crate) fn invalidate_absent(&self, present: &[bool]) {
        let _w = self.guard.write().unwrap_or_else(|e| e.into_inner());
        for (p, &here) in present.iter().enumerate() {
            if !here {
                self.clear_entry(p as u64);
            }
        }
    }
}

enum Inspect {
    Missing,
    Damaged(String),
    Good,
}

impl ReplicaFiles {
    /// Gives up the index (unmapped and closed) and returns the memory file and the
    /// directory lock.
    pub(crate) fn into_memory_and_lock(self) -> (File, DirLock) {
        (self.memory, self.lock)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A copy of the lock's fd (what a child holds between its fork and its exec) does not
    /// keep the directory locked once the lock is dropped; a second lock is refused while
    /// the first lives.
    #[test]
    fn a_dropped_lock_is_released_while_a_copy_of_its_fd_lives() {
        let dir = tempfile::tempdir().unwrap();
        let lock = DirLock::acquire(dir.path()).unwrap();
        assert!(matches!(
            DirLock::acquire(dir.path()),
            Err(ReplicaError::Locked { .. })
        ));
        let copy = lock.file().try_clone().unwrap();
        drop(lock);
        let again = DirLock::acquire(dir.path()).unwrap();
        drop(copy);
        drop(again);
    }

    /// Found by the `replica` fuzz target: an index whose header has a non-zero reserved
    /// word (covered by its checksum, so it opens as good) lost every page at the next
    /// open after a new epoch, because `set_epoch` rewrote the checksum for a header with
    /// a zero reserved word while leaving the word as it was.
    #[test]
    fn new_epoch_rewrites_a_header_whose_reserved_word_is_set() {
        let dir = tempfile::tempdir().unwrap();
        let page = vec![0x5a; PAGE_SIZE];
        {
            let f = ReplicaFiles::open(dir.path(), 4, Tier::Disk, false).unwrap();
            f.set_epoch(1).unwrap();
            f.store(2, &[3], &page).unwrap();
            f.sync().unwrap();
        }
        // Set the reserved word and give the header a matching checksum.
        let idx = dir.path().join(INDEX_FILE);
        let mut bytes = std::fs::read(&idx).unwrap();
        let mut w = [0u64; HEADER_WORDS];
        for (word, chunk) in w.iter_mut().zip(bytes.chunks_exact(8)) {
            *word = u64::from_le_bytes(chunk.try_into().unwrap());
        }
        w[4] = 0xfeed;
        w[CHECKSUM_WORD] = format::header_checksum(&w);
        for (chunk, word) in bytes.chunks_exact_mut(8).zip(w) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        std::fs::write(&idx, &bytes).unwrap();
        {
            let f = ReplicaFiles::open(dir.path(), 4, Tier::Disk, false).unwrap();
            assert_eq!(f.report().reinitialized, None);
            assert_eq!(f.version(2), 3);
            f.set_epoch(2).unwrap();
            f.store(1, &[4], &page).unwrap();
            f.sync().unwrap();
        }
        let f = ReplicaFiles::open(dir.path(), 4, Tier::Disk, false).unwrap();
        assert_eq!(
            f.report().reinitialized,
            None,
            "the new epoch's header is torn"
        );
        assert_eq!(f.epoch(), 2);
        assert_eq!(f.version(1), 4);
        let mut out = vec![0u8; PAGE_SIZE];
        assert_eq!(f.read(1, &mut out).unwrap(), Some(4));
        assert_eq!(out, page);
    }
}
