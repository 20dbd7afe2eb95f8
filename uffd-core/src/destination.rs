//! One-call setup of a postcopy destination: register guest memory, start the fault
//! loop, and tear it all down at the end.

use std::sync::Arc;
use std::time::Duration;

use crate::error::{chain, Error, UffdError};
use crate::fault_loop::{FaultLoop, FaultLoopHandle};
use crate::install::Installer;
use crate::layout::{HostRegion, RegionMap};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::page_table::PageTable;
use crate::source::PageSource;
use crate::uffd::{Features, Ioctls, Userfaultfd};

/// Features a destination negotiates. REMOVE lets the guest (or a balloon) drop
/// memory without us fetching it; MISSING_SHMEM allows memfd-backed guests.
pub const DESTINATION_FEATURES: Features = Features::EVENT_REMOVE
    .union(Features::MISSING_SHMEM)
    .union(Features::THREAD_ID);

/// Registered guest memory with its fault loop running.
#[derive(Debug)]
pub struct Destination {
    uffd: Arc<Userfaultfd>,
    regions: Arc<RegionMap>,
    table: Arc<PageTable>,
    metrics: Arc<Metrics>,
    installer: Installer,
    fault_loop: Option<FaultLoopHandle>,
    registered: Vec<HostRegion>,
}

impl Destination {
    /// Registers `memories` (all pages absent) and starts serving faults from `source`.
    pub fn register(
        memories: &[HostRegion],
        source: Arc<dyn PageSource>,
    ) -> Result<Destination, Error> {
        let total = memories.iter().map(HostRegion::pages).sum();
        Self::register_with_table(memories, Arc::new(PageTable::new(total)), source)
    }

    /// Like [`Destination::register`], with a table where some pages may already be
    /// Present (already in memory here, e.g. a fresh replica); those are never requested.
    pub fn register_with_table(
        memories: &[HostRegion],
        table: Arc<PageTable>,
        source: Arc<dyn PageSource>,
    ) -> Result<Destination, Error> {
        let regions = Arc::new(RegionMap::new(memories.to_vec())?);
        if table.total() != regions.total_pages() {
            return Err(Error::TableSizeMismatch {
                table: table.total(),
                regions: regions.total_pages(),
            });
        }
        let uffd = Arc::new(Userfaultfd::open(DESTINATION_FEATURES)?);
        let mut registered = Vec::with_capacity(memories.len());
        let mut ioctls = Vec::with_capacity(memories.len());
        for r in regions.regions() {
            let res = uffd
                .register_missing(r.host_addr() as u64, r.len() as u64)
                .and_then(|m| {
                    registered.push(r.clone());
                    if m.contains(Ioctls::COPY | Ioctls::WAKE) {
                        Ok(m)
                    } else {
                        Err(UffdError::IoctlNotAllowed {
                            addr: r.host_addr() as u64,
                            len: r.len() as u64,
                            ioctl: "COPY",
                        })
                    }
                });
            match res {
                Ok(m) => ioctls.push(m),
                Err(e) => {
                    unregister_all(&uffd, &registered);
                    return Err(e.into());
                }
            }
        }
        let metrics = Arc::new(Metrics::new(regions.total_pages()));
        let installer = Installer::new(
            uffd.clone(),
            regions.clone(),
            table.clone(),
            metrics.clone(),
        )
        .with_register_ioctls(&ioctls)
        // Postcopy ends with everything unregistered (`finish`), so zero stretches of
        // shared memory may be unregistered early and left as the file's holes.
        .with_zero_holes();
        let fault_loop = match FaultLoop::spawn(
            uffd.clone(),
            regions.clone(),
            table.clone(),
            metrics.clone(),
            source,
            installer.clone(),
        ) {
            Ok(h) => h,
            Err(e) => {
                unregister_all(&uffd, &registered);
                return Err(e);
            }
        };
        Ok(Destination {
            uffd,
            regions,
            table,
            metrics,
            installer,
            fault_loop: Some(fault_loop),
            registered,
        })
    }

    /// Installer for page data answering the source's requests or pushed ahead of
    /// faults; clone it to install from other threads.
    pub fn installer(&self) -> &Installer {
        &self.installer
    }

    /// The per-page state table shared with the fault loop and the installer.
    pub fn table(&self) -> &Arc<PageTable> {
        &self.table
    }

    /// Live metrics; [`Destination::finish`] returns their final snapshot.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The registered regions and their global page numbering.
    pub fn regions(&self) -> &Arc<RegionMap> {
        &self.regions
    }

    /// The userfaultfd the regions are registered with.
    pub fn uffd(&self) -> &Arc<Userfaultfd> {
        &self.uffd
    }

    /// True once every page is Present or Discarded; false on timeout.
    pub fn wait_complete(&self, timeout: Duration) -> bool {
        self.table.wait_complete(timeout)
    }

    /// Stops the fault loop and unregisters all memory; returns the final metrics.
    /// Threads still blocked on missing pages are released by the unregister (they
    /// then see whatever the memory holds: zero on anonymous memory).
    pub fn finish(mut self) -> Result<MetricsSnapshot, Error> {
        let stopped = match self.fault_loop.take() {
            Some(h) => h.stop(),
            None => Ok(()),
        };
        let mut unregistered = Ok(());
        for r in std::mem::take(&mut self.registered) {
            if let Err(e) = self.uffd.unregister(r.host_addr() as u64, r.len() as u64) {
                unregistered = Err(Error::from(e));
            }
        }
        stopped?;
        unregistered?;
        Ok(self.metrics.snapshot())
    }
}

fn unregister_all(uffd: &Userfaultfd, regions: &[HostRegion]) {
    for r in regions {
        if let Err(e) = uffd.unregister(r.host_addr() as u64, r.len() as u64) {
            tracing::warn!(addr = r.host_addr(), error = %chain(&e), "unregister failed");
        }
    }
}

impl Drop for Destination {
    fn drop(&mut self) {
        drop(self.fault_loop.take());
        unregister_all(&self.uffd, &std::mem::take(&mut self.registered));
    }
}
