//! The thread that reads userfaultfd messages and turns them into page requests.
//!
//! It is a plain OS thread blocked in poll(2): faults stall vCPUs, so the loop must not
//! share a runtime with anything that could delay it. It only ever does quick work
//! itself (bookkeeping, wakes, zero-fills of discarded pages); fetching is the
//! [`PageSource`]'s job.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::error::{chain, Error, UffdError};
use crate::install::Installer;
use crate::layout::RegionMap;
use crate::metrics::Metrics;
use crate::page_table::{PageState, PageTable};
use crate::source::PageSource;
use crate::sys::UffdMsg;
use crate::uffd::{Event, Userfaultfd};
use crate::PAGE_SIZE;

/// Messages read per read(2).
const BATCH: usize = 64;

/// Namespace for [`FaultLoop::spawn`].
#[derive(Debug)]
pub struct FaultLoop;

/// Running fault loop; stops it (and joins) on [`FaultLoopHandle::stop`] or drop.
#[derive(Debug)]
pub struct FaultLoopHandle {
    stop: Arc<OwnedFd>,
    thread: Option<JoinHandle<Result<(), Error>>>,
}

struct Worker {
    uffd: Arc<Userfaultfd>,
    regions: Arc<RegionMap>,
    table: Arc<PageTable>,
    metrics: Arc<Metrics>,
    source: Arc<dyn PageSource>,
    installer: Installer,
    stop: Arc<OwnedFd>,
}

fn sys_err(op: &'static str) -> Error {
    Error::Sys {
        op,
        source: io::Error::last_os_error(),
    }
}

impl FaultLoop {
    /// Starts the fault loop thread (`uffd-fault-loop`) on `uffd`, whose ranges must be
    /// registered for missing faults and described by `regions`.
    ///
    /// For each fault the loop asks `source` for the page once (the first fault moves
    /// it Absent → Requested in `table`); later faults on it just wait for the install.
    /// It also handles REMOVE events (pages become Discarded) and zero-fills discarded
    /// pages that are touched again, through `installer`. `table`, `metrics` and
    /// `installer` must be the ones the page data is installed with.
    ///
    /// Fails only if the stop eventfd or the thread cannot be created; errors while
    /// running end the loop and are returned by [`FaultLoopHandle::stop`].
    pub fn spawn(
        uffd: Arc<Userfaultfd>,
        regions: Arc<RegionMap>,
        table: Arc<PageTable>,
        metrics: Arc<Metrics>,
        source: Arc<dyn PageSource>,
        installer: Installer,
    ) -> Result<FaultLoopHandle, Error> {
        // SAFETY: eventfd takes two integers and returns a new fd or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(sys_err("eventfd"));
        }
        // SAFETY: eventfd just returned this fd; the OwnedFd becomes its only owner.
        let stop = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
        let worker = Worker {
            uffd,
            regions,
            table,
            metrics,
            source,
            installer,
            stop: stop.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("uffd-fault-loop".into())
            .spawn(move || worker.run())
            .map_err(|source| Error::Sys {
                op: "spawn fault loop thread",
                source,
            })?;
        Ok(FaultLoopHandle {
            stop,
            thread: Some(thread),
        })
    }
}

impl FaultLoopHandle {
    /// Stops the loop and returns how it ended (an fd error ends it early).
    pub fn stop(mut self) -> Result<(), Error> {
        self.shutdown()
    }

    /// False once the loop thread has exited (stopped or failed).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    fn shutdown(&mut self) -> Result<(), Error> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
        let ret = unsafe {
            libc::write(
                self.stop.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        if ret < 0 {
            // Counter overflow is impossible with one write per handle; any other
            // failure would leave the thread running, so report it without joining.
            return Err(sys_err("write(eventfd)"));
        }
        thread.join().map_err(|_| Error::LoopPanicked)?
    }
}

impl Drop for FaultLoopHandle {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(error = %chain(&e), "fault loop ended with an error");
        }
    }
}

impl Worker {
    fn run(self) -> Result<(), Error> {
        let mut buf = [UffdMsg::default(); BATCH];
        let mut want = Vec::with_capacity(BATCH);
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a live array of 2 pollfd structs for the whole call.
            let ret = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if ret < 0 {
                if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(sys_err("poll"));
            }
            if fds[1].revents != 0 {
                return Ok(());
            }
            let rev = fds[0].revents;
            if rev & libc::POLLIN == 0 {
                if rev & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                    tracing::error!(revents = rev, "userfaultfd poll error; fault loop exits");
                    return Err(Error::Uffd(UffdError::Sys {
                        op: "poll(userfaultfd)",
                        source: io::Error::other(format!("revents {rev:#x}")),
                    }));
                }
                continue;
            }
            loop {
                let n = self.uffd.read_messages(&mut buf).inspect_err(|e| {
                    tracing::error!(error = %chain(e), "userfaultfd read failed; fault loop exits");
                })?;
                if n == 0 {
                    break;
                }
                self.handle_batch(&buf[..n], &mut want);
                if n < BATCH {
                    break;
                }
            }
        }
    }

    fn handle_batch(&self, msgs: &[UffdMsg], want: &mut Vec<u64>) {
        want.clear();
        for msg in msgs {
            match Event::decode(msg) {
                Event::PageFault {
                    addr, thread_id, ..
                } => self.on_fault(addr, thread_id, want),
                Event::Remove { start, end } => self.on_remove(start, end),
                Event::Other(kind) => {
                    tracing::warn!(event = kind, "ignoring unexpected userfaultfd event")
                }
            }
        }
        if !want.is_empty() {
            self.source.request(want);
        }
    }

    fn on_fault(&self, addr: u64, thread_id: u32, want: &mut Vec<u64>) {
        let Some(page) = self.regions.page_of(addr as usize) else {
            self.metrics.stray_fault();
            tracing::warn!(
                addr = format_args!("{addr:#x}"),
                "fault outside every region"
            );
            return;
        };
        // Recorded before the state check; see Installer::resolve for the other half.
        self.metrics.fault_read(page, thread_id);
        if self.table.try_request(page) {
            want.push(page);
            return;
        }
        match self.table.state(page) {
            // In flight: the install's COPY wakes every thread waiting on the page.
            PageState::Absent | PageState::Requested => {}
            // Installed between the fault and our read of it: the thread may still be
            // queued, so wake it to retry.
            PageState::Present => {
                let a = (addr & !(PAGE_SIZE as u64 - 1), PAGE_SIZE as u64);
                if let Err(e) = self.uffd.wake(a.0, a.1) {
                    tracing::warn!(page, error = %chain(&e), "wake failed");
                }
                self.metrics.page_ready(page);
            }
            // Dropped by the memory owner: it must read as zero, and nobody will send it.
            PageState::Discarded => {
                if let Err(e) = self.installer.refill_discarded(page) {
                    tracing::warn!(page, error = %chain(&e), "zero-fill of discarded page failed");
                }
            }
        }
    }

    /// MADV_DONTNEED/MADV_REMOVE dropped `[start, end)`.
    ///
    /// On private anonymous memory the pages are gone and read as zero from now on.
    /// On shmem, MADV_DONTNEED only unmaps (the file keeps the data) and the event does
    /// not say which call it was, so only pages we already installed are marked
    /// (harmless if the data stayed); pages still missing keep being fetched.
    fn on_remove(&self, start: u64, end: u64) {
        let start = start as usize & !(PAGE_SIZE - 1);
        let end = end as usize;
        for (first, count, idx) in self.regions.pages_in_host_range(start, end) {
            let shmem = self
                .regions
                .regions()
                .get(idx)
                .is_some_and(|r| r.is_shmem());
            let mut newly = 0;
            for page in first..first + count {
                if shmem && self.table.state(page) != PageState::Present {
                    continue;
                }
                if self.table.discard(page) != PageState::Discarded {
                    newly += 1;
                }
            }
            self.metrics.discarded(newly);
            // Threads blocked on these pages retry and fault again, now finding them
            // Discarded (zero-filled) or still in flight.
            if let Some(addr) = self.regions.host_addr_of(first) {
                let len = count * PAGE_SIZE as u64;
                if let Err(e) = self.uffd.wake(addr as u64, len) {
                    tracing::warn!(first, count, error = %chain(&e), "wake after remove failed");
                }
            }
        }
    }
}
