//! Installing page contents into registered guest memory.
//!
//! The page table is consulted before every ioctl so a page already resolved is never
//! filled twice, and updated after, so each page is counted exactly once however many
//! installers (demand, push, local cache) race on it: the kernel's EEXIST settles
//! the race for memory, the table's CAS settles it for counting.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::InstallError;
use crate::layout::RegionMap;
use crate::metrics::{InstallKind, Metrics};
use crate::page_table::{PageState, PageTable};
use crate::uffd::{CopyOutcome, CopyResult, Ioctls, Userfaultfd};
use crate::PAGE_SIZE;

/// Pages of [`ZERO_PAGES`]: the longest zero fill one UFFDIO_COPY makes.
const ZERO_CHUNK: usize = 64;

/// Copy source of zero pages where UFFDIO_ZEROPAGE is not allowed (the registration did
/// not report it).
static ZERO_PAGES: [u8; ZERO_CHUNK * PAGE_SIZE] = [0; ZERO_CHUNK * PAGE_SIZE];

/// Shortest stretch of zero pages of shared memory that [`Installer::install_zero_run`]
/// leaves as a hole in its file (1 MiB): below it, one fill ioctl is cheap, and every
/// stretch left as a hole may split the mapping's VMA in up to three.
pub const HOLE_MIN_PAGES: u64 = 256;

/// Most stretches left as holes that do not extend the previous one: each may add two
/// VMAs to the process (the kernel's default limit is 65530), so past this the
/// installer fills zero pages instead.
const MAX_HOLE_STRETCHES: u64 = 4096;

/// EAGAIN means a non-cooperative event (REMOVE) is pending until the fault loop reads
/// it; that takes microseconds, so about a second of retrying means something is stuck.
const MAX_AGAIN: u32 = 10_000;

/// Content of one page.
#[derive(Debug, Clone, Copy)]
pub enum PageData<'a> {
    /// Exactly [`PAGE_SIZE`] bytes.
    Raw(&'a [u8]),
    /// An all-zero page: UFFDIO_ZEROPAGE where the region allows it, otherwise a copy
    /// of a static zero page (shmem).
    Zero,
}

/// Why the page is being installed; drives the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Answer to a request the fault loop made.
    Demand,
    /// Sent ahead of any fault (background push, local cache).
    Push,
}

/// What [`Installer::install`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    /// This call filled the page.
    Installed,
    /// Someone else filled it first (EEXIST); this call recorded it.
    Raced,
    /// The table already had it; no ioctl was made.
    AlreadyPresent,
    /// The page was discarded by the memory owner; the data is not needed.
    Dropped,
}

/// Tally of an [`Installer::install_run`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunInstalled {
    /// Pages this call filled and counted ([`Installed::Installed`]).
    pub installed: u64,
    /// Pages found filled by someone else (EEXIST) and counted here
    /// ([`Installed::Raced`]).
    pub raced: u64,
    /// Pages the table already had as Present; skipped without an ioctl.
    pub already_present: u64,
    /// Pages Discarded by the memory owner; their data was not needed.
    pub dropped: u64,
    /// Fill ioctls made (UFFDIO_COPY, or UFFDIO_ZEROPAGE for a zero run).
    pub ioctls: u64,
    /// Of the pages installed, those left as holes of their shared-memory file (see
    /// [`Installer::install_zero_run`]): no page was allocated or mapped for them.
    pub holes: u64,
}

impl RunInstalled {
    fn add(&mut self, what: Installed) {
        match what {
            Installed::Installed => self.installed += 1,
            Installed::Raced => self.raced += 1,
            Installed::AlreadyPresent => self.already_present += 1,
            Installed::Dropped => self.dropped += 1,
        }
    }
}

/// Installs pages; cheap to clone and usable from any thread.
#[derive(Debug, Clone)]
pub struct Installer {
    uffd: Arc<Userfaultfd>,
    regions: Arc<RegionMap>,
    table: Arc<PageTable>,
    metrics: Arc<Metrics>,
    /// Per region: UFFDIO_ZEROPAGE allowed.
    zeropage: Arc<[bool]>,
    /// Set by [`Installer::with_zero_holes`]: zero stretches of shared memory whose file is
    /// still a hole are left that way.
    holes: Option<Arc<HoleState>>,
}

/// Bookkeeping of the stretches left as holes, shared by the installer's clones.
#[derive(Debug, Default)]
struct HoleState {
    /// Stretches that did not extend the previous one.
    stretches: AtomicU64,
    /// Host address just past the last stretch (one that starts there merges with it).
    last_end: AtomicU64,
}

/// Which bytes a run is filled with.
#[derive(Debug, Clone, Copy)]
enum Fill<'a> {
    /// These bytes, a whole number of pages, one page per page of the run.
    Data(&'a [u8]),
    /// Zeros.
    Zero,
}

/// Whether every page of `[addr, addr + len)` is absent from memory: for a shared
/// mapping, absent from its file's page cache (a hole); for private memory, not mapped.
///
/// A shmem page swapped out is absent from the page cache too, and would pass for a hole
/// with its data still in the file. It cannot happen here: the installer only fills pages
/// still missing, which a destination's file never held (a fresh memfd) or held and had
/// punched out (a standby's stale and invalid pages, `replica::tiers`' `into_guest_memory`).
fn is_hole(addr: u64, len: u64) -> bool {
    let mut vec = vec![0u8; (len / PAGE_SIZE as u64) as usize];
    // SAFETY: mincore only reads the page tables and page cache of the range and writes
    // one byte per page into `vec`, which has exactly that many; it does not fault pages
    // in, so it touches no guest memory. A range that is not mapped fails with ENOMEM.
    let ret = unsafe { libc::mincore(addr as *mut libc::c_void, len as usize, vec.as_mut_ptr()) };
    ret == 0 && vec.iter().all(|b| b & 1 == 0)
}

/// The kernel's answer to a fill of a range no longer registered: someone left it as a
/// hole (and unregistered it) meanwhile.
fn is_unregistered(e: &crate::error::UffdError) -> bool {
    matches!(e, crate::error::UffdError::Sys { source, .. } if source.raw_os_error() == Some(libc::ENOENT))
}

fn backoff(attempt: u32) {
    if attempt < 100 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(100));
    }
}

impl Installer {
    /// Assumes UFFDIO_ZEROPAGE is allowed on non-shmem regions only; use
    /// [`Installer::with_register_ioctls`] to follow what registration reported.
    pub fn new(
        uffd: Arc<Userfaultfd>,
        regions: Arc<RegionMap>,
        table: Arc<PageTable>,
        metrics: Arc<Metrics>,
    ) -> Installer {
        let zeropage = regions.regions().iter().map(|r| !r.is_shmem()).collect();
        Installer {
            uffd,
            regions,
            table,
            metrics,
            zeropage,
            holes: None,
        }
    }

    /// Lets [`Installer::install_zero_run`] leave stretches of at least
    /// [`HOLE_MIN_PAGES`] zero pages of shared memory (memfd, tmpfs) as they are when
    /// the file is still a hole there: it unregisters the stretch from the userfaultfd
    /// and marks its pages Present, so the kernel serves their first touch like any
    /// other hole of the file, with a zero page it allocates then, and nothing is
    /// allocated or copied now.
    ///
    /// Only for an owner that never needs those pages registered again (a
    /// [`crate::Destination`], which unregisters everything when postcopy ends): once
    /// left, a page raises no fault and no REMOVE event on this userfaultfd.
    pub fn with_zero_holes(mut self) -> Installer {
        self.holes = Some(Arc::default());
        self
    }

    /// Uses the ioctl masks returned by registering each region (same order).
    pub fn with_register_ioctls(mut self, ioctls: &[Ioctls]) -> Installer {
        self.zeropage = self
            .regions
            .regions()
            .iter()
            .enumerate()
            .map(|(i, r)| match ioctls.get(i) {
                Some(m) => m.contains(Ioctls::ZEROPAGE),
                None => !r.is_shmem(),
            })
            .collect();
        self
    }

    /// Copies page `page` into `out` if it is present (installed), and says whether it
    /// did. The destination reads pages it holds to resolve content references; the guest
    /// may be writing the page meanwhile, so the bytes can be torn, and callers verify them.
    pub fn read_present(&self, page: u64, out: &mut [u8]) -> bool {
        if out.len() != PAGE_SIZE || self.table.state(page) != crate::PageState::Present {
            return false;
        }
        // Present, so the read does not fault; a vCPU may write it meanwhile, and the
        // caller checks the content's hash.
        self.regions.read_shared(page, out)
    }

    /// The page table this installer consults and updates.
    pub fn table(&self) -> &Arc<PageTable> {
        &self.table
    }

    /// The regions pages are installed into; page indices are global over them.
    pub fn regions(&self) -> &Arc<RegionMap> {
        &self.regions
    }

    /// The metrics installs are counted in.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The userfaultfd the fill ioctls go through.
    pub fn uffd(&self) -> &Arc<Userfaultfd> {
        &self.uffd
    }

    fn check_pages(&self, first: u64, n: u64) -> Result<(), InstallError> {
        let total = self.table.total();
        match first.checked_add(n) {
            Some(end) if end <= total => Ok(()),
            _ => Err(InstallError::PageOutOfRange {
                page: first.saturating_add(n.saturating_sub(1)),
                total,
            }),
        }
    }

    /// Page address and whether ZEROPAGE may be used there; page is in range.
    fn locate(&self, page: u64) -> Result<(u64, bool), InstallError> {
        let out_of_range = || InstallError::PageOutOfRange {
            page,
            total: self.table.total(),
        };
        let idx = self
            .regions
            .region_index_of(page)
            .ok_or_else(out_of_range)?;
        let addr = self.regions.host_addr_of(page).ok_or_else(out_of_range)?;
        Ok((
            addr as u64,
            self.zeropage.get(idx).copied().unwrap_or(false),
        ))
    }

    fn fill_once(
        &self,
        page: u64,
        dst: u64,
        data: PageData<'_>,
        zeropage_ok: bool,
    ) -> Result<CopyResult, InstallError> {
        let res = match data {
            PageData::Raw(bytes) => self.uffd.copy(dst, bytes, true),
            PageData::Zero if zeropage_ok => self.uffd.zeropage(dst, PAGE_SIZE as u64, true),
            PageData::Zero => self.uffd.copy(dst, &ZERO_PAGES[..PAGE_SIZE], true),
        };
        res.map_err(|source| InstallError::Uffd { page, source })
    }

    /// Marks `page` present after a fill (or EEXIST) and accounts for it once.
    fn resolve(&self, page: u64, origin: Origin, zero: bool, raced: bool) -> Installed {
        let prev = self.table.set_present(page);
        // After set_present, so a fault read concurrently is accounted by us or by the
        // fault loop (which checks the state after recording the fault).
        self.metrics.page_ready(page);
        match prev {
            PageState::Absent | PageState::Requested => {
                let kind = match origin {
                    Origin::Demand => InstallKind::Demand,
                    Origin::Push => InstallKind::Push,
                };
                self.metrics.installed(kind, zero, 1);
                if raced {
                    Installed::Raced
                } else {
                    Installed::Installed
                }
            }
            PageState::Present => Installed::AlreadyPresent,
            PageState::Discarded => Installed::Dropped,
        }
    }

    /// Installs one page. Bad input (page out of range, data not 4096 bytes) is
    /// refused before any memory changes.
    pub fn install(
        &self,
        page: u64,
        data: PageData<'_>,
        origin: Origin,
    ) -> Result<Installed, InstallError> {
        self.check_pages(page, 1)?;
        if let PageData::Raw(bytes) = data {
            if bytes.len() != PAGE_SIZE {
                return Err(InstallError::BadLength { len: bytes.len() });
            }
        }
        match self.table.state(page) {
            PageState::Present => return Ok(Installed::AlreadyPresent),
            PageState::Discarded => return Ok(Installed::Dropped),
            PageState::Absent | PageState::Requested => {}
        }
        let (dst, zeropage_ok) = self.locate(page)?;
        let zero = matches!(data, PageData::Zero);
        for attempt in 0..MAX_AGAIN {
            let r = match self.fill_once(page, dst, data, zeropage_ok) {
                Ok(r) => r,
                Err(InstallError::Uffd { source, .. }) if self.left_as_hole(page, &source) => {
                    return Ok(Installed::AlreadyPresent)
                }
                Err(e) => return Err(e),
            };
            match r.outcome {
                CopyOutcome::Copied => return Ok(self.resolve(page, origin, zero, false)),
                CopyOutcome::Again if r.copied >= PAGE_SIZE => {
                    return Ok(self.resolve(page, origin, zero, false))
                }
                CopyOutcome::Exists => {
                    // The winner woke the waiters already; this one is cheap insurance.
                    let _ = self.uffd.wake(dst, PAGE_SIZE as u64);
                    return Ok(self.resolve(page, origin, zero, true));
                }
                CopyOutcome::Again => backoff(attempt),
            }
        }
        Err(InstallError::Busy { page })
    }

    /// Installs `data.len() / 4096` consecutive pages from `first_page` with as few
    /// UFFDIO_COPY calls as possible: one per stretch of unresolved pages within one
    /// region. Bad input is refused before any memory changes.
    pub fn install_run(
        &self,
        first_page: u64,
        data: &[u8],
        origin: Origin,
    ) -> Result<RunInstalled, InstallError> {
        if data.is_empty() || !data.len().is_multiple_of(PAGE_SIZE) {
            return Err(InstallError::BadLength { len: data.len() });
        }
        let n = (data.len() / PAGE_SIZE) as u64;
        self.check_pages(first_page, n)?;
        self.fill_run(first_page, n, Fill::Data(data), origin)
    }

    /// Installs `count` consecutive all-zero pages from `first_page` with one fill ioctl
    /// per stretch of unresolved pages within one region (UFFDIO_ZEROPAGE where the
    /// registration allows it, otherwise UFFDIO_COPY from a static zero buffer).
    ///
    /// With [`Installer::with_zero_holes`], a stretch of at least [`HOLE_MIN_PAGES`] pages
    /// of shared memory whose file is still a hole there is not filled at all: its pages
    /// are marked Present, then the stretch is unregistered, and the kernel gives each
    /// page its zeros when it is first touched, as for any hole of the file. (A stretch
    /// whose file holds data is filled as usual, which leaves that data in place: fills
    /// never overwrite a page.) [`RunInstalled::holes`] counts those pages. A count of 0
    /// or a run past the end of memory is refused before any memory changes.
    pub fn install_zero_run(
        &self,
        first_page: u64,
        count: u64,
        origin: Origin,
    ) -> Result<RunInstalled, InstallError> {
        if count == 0 {
            return Err(InstallError::BadLength { len: 0 });
        }
        self.check_pages(first_page, count)?;
        self.fill_run(first_page, count, Fill::Zero, origin)
    }

    /// True if `e` says the range of `page` is no longer registered because it was left as
    /// a hole (and so `page` is resolved already).
    fn left_as_hole(&self, page: u64, e: &crate::error::UffdError) -> bool {
        self.holes.is_some() && is_unregistered(e) && self.table.state(page).is_resolved()
    }

    /// The body of [`Installer::install_run`] and [`Installer::install_zero_run`]; the
    /// pages are in range.
    fn fill_run(
        &self,
        first_page: u64,
        n: u64,
        fill: Fill<'_>,
        origin: Origin,
    ) -> Result<RunInstalled, InstallError> {
        let zero = matches!(fill, Fill::Zero);
        let mut out = RunInstalled::default();
        let mut i = 0u64;
        let mut again = 0u32;
        while i < n {
            let page = first_page + i;
            match self.table.state(page) {
                PageState::Present => {
                    out.already_present += 1;
                    i += 1;
                    continue;
                }
                PageState::Discarded => {
                    out.dropped += 1;
                    i += 1;
                    continue;
                }
                PageState::Absent | PageState::Requested => {}
            }
            let max = self.regions.run_within_region(page, n - i);
            let mut len = 1;
            while len < max && !self.table.state(page + len).is_resolved() {
                len += 1;
            }
            let (dst, zeropage_ok) = self.locate(page)?;
            if zero && self.leave_hole(page, dst, len, origin, zeropage_ok, &mut out)? {
                i += len;
                again = 0;
                continue;
            }
            let res = match fill {
                Fill::Data(data) => {
                    let at = (i * PAGE_SIZE as u64) as usize;
                    self.uffd
                        .copy(dst, &data[at..at + (len as usize) * PAGE_SIZE], true)
                }
                Fill::Zero if zeropage_ok => self.uffd.zeropage(dst, len * PAGE_SIZE as u64, true),
                Fill::Zero => {
                    let chunk = (len as usize).min(ZERO_CHUNK) * PAGE_SIZE;
                    self.uffd.copy(dst, &ZERO_PAGES[..chunk], true)
                }
            };
            let r = match res {
                Ok(r) => r,
                // Left as a hole by another installer since the state check above: it
                // counted the page.
                Err(e) if self.left_as_hole(page, &e) => {
                    out.already_present += 1;
                    i += 1;
                    continue;
                }
                Err(source) => return Err(InstallError::Uffd { page, source }),
            };
            out.ioctls += 1;
            let done = (r.copied / PAGE_SIZE) as u64;
            for k in 0..done {
                out.add(self.resolve(page + k, origin, zero, false));
            }
            i += done;
            match r.outcome {
                CopyOutcome::Copied => again = 0,
                CopyOutcome::Exists => {
                    let _ = self.uffd.wake(dst, PAGE_SIZE as u64);
                    out.add(self.resolve(page, origin, zero, true));
                    i += 1;
                    again = 0;
                }
                // Stopped early at a page that exists (next call says EEXIST) or
                // while the mm changes; either way continue from where it stopped.
                CopyOutcome::Again if done > 0 => again = 0,
                CopyOutcome::Again => {
                    again += 1;
                    if again >= MAX_AGAIN {
                        return Err(InstallError::Busy { page });
                    }
                    backoff(again);
                }
            }
        }
        Ok(out)
    }

    /// Leaves the `len` unresolved zero pages from `page` (at `dst`, in one region) as the
    /// holes of the file they are, if [`Installer::with_zero_holes`] allows it there; says
    /// whether it did (then they are resolved and counted in `out`).
    fn leave_hole(
        &self,
        page: u64,
        dst: u64,
        len: u64,
        origin: Origin,
        zeropage_ok: bool,
        out: &mut RunInstalled,
    ) -> Result<bool, InstallError> {
        let Some(holes) = &self.holes else {
            return Ok(false);
        };
        let shmem = self.regions.region_of(page).is_some_and(|r| r.is_shmem());
        let bytes = len * PAGE_SIZE as u64;
        if !shmem || len < HOLE_MIN_PAGES {
            return Ok(false);
        }
        let extends = holes.last_end.load(Ordering::Relaxed) == dst;
        if !extends && holes.stretches.load(Ordering::Relaxed) >= MAX_HOLE_STRETCHES {
            return Ok(false);
        }
        if !is_hole(dst, bytes) {
            return Ok(false);
        }
        // Marked before the unregister: an installer that still saw a page unresolved
        // and fills it after the unregister gets ENOENT and finds it resolved
        // ([`Installer::left_as_hole`]). A fault read in between finds the page Present
        // and is woken to retry, until the unregister lets the kernel serve it.
        let before = out.installed + out.raced;
        for k in 0..len {
            out.add(self.resolve(page + k, origin, true, false));
        }
        match self.uffd.unregister(dst, bytes) {
            Ok(()) => {
                // The unregister woke every thread blocked on these pages; they retry and
                // read the hole.
                out.holes += out.installed + out.raced - before;
                if !extends {
                    holes.stretches.fetch_add(1, Ordering::Relaxed);
                }
                holes.last_end.store(dst + bytes, Ordering::Relaxed);
                self.metrics.zero_holes(out.installed + out.raced - before);
                Ok(true)
            }
            Err(e) => {
                // Out of VMAs, say: fill the pages after all; they are marked already.
                tracing::debug!(page, len, error = %crate::error::chain(&e), "leaving zero pages as a hole failed; filling them");
                self.zero_fill_marked(page, dst, len, zeropage_ok)?;
                out.ioctls += 1;
                Ok(true)
            }
        }
    }

    /// Fills `len` pages from `page` (at `dst`) with zeros whatever the table says, up to
    /// pages that exist already.
    fn zero_fill_marked(
        &self,
        page: u64,
        dst: u64,
        len: u64,
        zeropage_ok: bool,
    ) -> Result<(), InstallError> {
        let mut k = 0u64;
        let mut again = 0u32;
        while k < len {
            let at = dst + k * PAGE_SIZE as u64;
            let res = if zeropage_ok {
                self.uffd.zeropage(at, (len - k) * PAGE_SIZE as u64, true)
            } else {
                let chunk = ((len - k) as usize).min(ZERO_CHUNK) * PAGE_SIZE;
                self.uffd.copy(at, &ZERO_PAGES[..chunk], true)
            };
            let r = match res {
                Ok(r) => r,
                Err(e) if is_unregistered(&e) => return Ok(()),
                Err(source) => {
                    return Err(InstallError::Uffd {
                        page: page + k,
                        source,
                    })
                }
            };
            k += (r.copied / PAGE_SIZE) as u64;
            match r.outcome {
                CopyOutcome::Copied => again = 0,
                CopyOutcome::Exists => {
                    let _ = self.uffd.wake(at, PAGE_SIZE as u64);
                    k += 1;
                }
                CopyOutcome::Again if r.copied > 0 => again = 0,
                CopyOutcome::Again => {
                    again += 1;
                    if again >= MAX_AGAIN {
                        return Err(InstallError::Busy { page: page + k });
                    }
                    backoff(again);
                }
            }
        }
        Ok(())
    }

    /// Fills a discarded page with zeros for a thread faulting on it, leaving it
    /// Discarded. Never retries: EAGAIN means the fault loop (our caller) has events
    /// to read first, so the thread is woken to fault again later instead.
    pub(crate) fn refill_discarded(&self, page: u64) -> Result<(), InstallError> {
        let (dst, zeropage_ok) = self.locate(page)?;
        let r = self.fill_once(page, dst, PageData::Zero, zeropage_ok)?;
        if r.outcome != CopyOutcome::Copied {
            self.uffd
                .wake(dst, PAGE_SIZE as u64)
                .map_err(|source| InstallError::Uffd { page, source })?;
        }
        if r.outcome != CopyOutcome::Again {
            self.metrics.page_ready(page);
        }
        Ok(())
    }
}
