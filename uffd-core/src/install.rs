//! Installing page contents into registered guest memory.
//!
//! The page table is consulted before every ioctl so a page already resolved is never
//! filled twice, and updated after, so each page is counted exactly once however many
//! installers (demand, push, local cache) race on it: the kernel's EEXIST settles
//! the race for memory, the table's CAS settles it for counting.

use std::sync::Arc;
use std::time::Duration;

use crate::error::InstallError;
use crate::layout::RegionMap;
use crate::metrics::{InstallKind, Metrics};
use crate::page_table::{PageState, PageTable};
use crate::uffd::{CopyOutcome, CopyResult, Ioctls, Userfaultfd};
use crate::PAGE_SIZE;

/// Copy source for shmem, where UFFDIO_ZEROPAGE is not allowed.
static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

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
    /// UFFDIO_COPY calls made.
    pub ioctls: u64,
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
        }
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
        let Some(addr) = self.regions.host_addr_of(page) else {
            return false;
        };
        let src = addr as *const u64;
        for (i, chunk) in out.chunks_exact_mut(8).enumerate() {
            // SAFETY: the page lies in a registered region that stays mapped while this
            // installer lives, and it is present, so the read does not fault. A vCPU may
            // write it concurrently: volatile word reads make that a torn value, not a
            // data race the compiler may assume away; the caller checks the content's hash.
            let w = unsafe { std::ptr::read_volatile(src.add(i)) };
            chunk.copy_from_slice(&w.to_ne_bytes());
        }
        true
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
            PageData::Zero => self.uffd.copy(dst, &ZERO_PAGE, true),
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
            let r = self.fill_once(page, dst, data, zeropage_ok)?;
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
            let (dst, _) = self.locate(page)?;
            let src =
                &data[(i * PAGE_SIZE as u64) as usize..((i + len) * PAGE_SIZE as u64) as usize];
            let r = self
                .uffd
                .copy(dst, src, true)
                .map_err(|source| InstallError::Uffd { page, source })?;
            out.ioctls += 1;
            let done = (r.copied / PAGE_SIZE) as u64;
            for k in 0..done {
                out.add(self.resolve(page + k, origin, false, false));
            }
            i += done;
            match r.outcome {
                CopyOutcome::Copied => again = 0,
                CopyOutcome::Exists => {
                    let _ = self.uffd.wake(dst, PAGE_SIZE as u64);
                    out.add(self.resolve(page, origin, false, true));
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
