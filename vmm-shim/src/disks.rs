//! A VM's disks in a migration: a disk's 4 KiB blocks are pages of the session after guest
//! memory (see [`transport::message::Layout`]). The source reads them from its
//! [`BlockDevice`]; the destination serves each disk at once as a
//! [`disk::PostcopyDisk`], which fetches a stale block through the session (urgent, like a
//! page fault) when the guest reads it, while the push fills in the rest.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use disk::{
    BlockDevice, BlockFetcher, DiskError, PostcopyDisk, PostcopyStats, RawFile, Tracked,
    WriteTracker, UNIT,
};
use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;
use transport::message::{Layout, PageRef, Pages};
use transport::quic::{Extent, PageReader, PageSink, SinkError};
use transport::PAGE_SIZE;
use uffd_core::DirtyTracker;

/// A disk the source sends: its name (the VMM's drive id) and the device to read.
#[derive(Clone)]
pub struct SourceDisk {
    /// The name both sides use for the disk.
    pub name: String,
    /// The disk, read with [`BlockDevice::read_at`] (a paused VM's disk: nothing writes it
    /// while the session reads it).
    pub device: Arc<dyn BlockDevice>,
}

/// Why disks cannot join a session.
#[derive(Debug, thiserror::Error)]
pub enum DiskSetupError {
    /// A disk's size is not a whole number of 4 KiB blocks.
    #[error("disk {name:?} is {size} bytes: not a non-zero multiple of 4096")]
    Size {
        /// The disk.
        name: String,
        /// Its size.
        size: u64,
    },
    /// The disks given do not match the layout's disks (names, sizes or count).
    #[error("the disks given ({given}) do not match the layout's disks ({layout})")]
    Mismatch {
        /// The disks given, as `name:size`.
        given: String,
        /// The layout's disks, as `name:size`.
        layout: String,
    },
}

fn check_size(name: &str, size: u64) -> Result<(), DiskSetupError> {
    if size == 0 || !size.is_multiple_of(PAGE_SIZE as u64) {
        return Err(DiskSetupError::Size {
            name: name.into(),
            size,
        });
    }
    Ok(())
}

/// Guest memory followed by disks: the source's page reader for a session with disks.
struct VmPages {
    memory: Arc<dyn PageReader>,
    memory_pages: u64,
    disks: Vec<(Range<u64>, Arc<dyn BlockDevice>)>,
}

impl VmPages {
    fn read_disk(&self, page: u64, out: &mut [u8]) -> Result<(), String> {
        let (range, dev) = self
            .disks
            .iter()
            .find(|(r, _)| r.contains(&page))
            .ok_or_else(|| format!("page {page} is in no disk"))?;
        // Read as much of this disk as `out` covers.
        let n = (out.len() / PAGE_SIZE).min((range.end - page) as usize);
        dev.read_at(&mut out[..n * PAGE_SIZE], (page - range.start) * UNIT)
            .map_err(|e| uffd_core::error::chain(&e))?;
        if n * PAGE_SIZE < out.len() {
            self.read_disk(page + n as u64, &mut out[n * PAGE_SIZE..])?;
        }
        Ok(())
    }
}

impl PageReader for VmPages {
    fn pages(&self, first: u64, count: usize) -> Result<Cow<'_, [u8]>, String> {
        let end = first + count as u64;
        if end <= self.memory_pages {
            return self.memory.pages(first, count);
        }
        let mut out = vec![0u8; count * PAGE_SIZE];
        let in_memory = self.memory_pages.saturating_sub(first).min(count as u64) as usize;
        if in_memory > 0 {
            let m = self.memory.pages(first, in_memory)?;
            out[..in_memory * PAGE_SIZE].copy_from_slice(&m);
        }
        let disk_first = first + in_memory as u64;
        self.read_disk(disk_first, &mut out[in_memory * PAGE_SIZE..])?;
        Ok(Cow::Owned(out))
    }

    fn extent(&self, first: u64, max: u64) -> Extent {
        if first >= self.memory_pages {
            return Extent::Unknown;
        }
        self.memory
            .extent(first, max.min(self.memory_pages - first))
    }
}

/// Adds `disks` to a session: the page reader that serves memory and then the disks, and
/// `layout` with the disks appended.
pub fn with_disks(
    memory: Arc<dyn PageReader>,
    layout: &Layout,
    disks: &[SourceDisk],
) -> Result<(Arc<dyn PageReader>, Layout), DiskSetupError> {
    let layout = layout_with(layout, disks)?;
    let reader = VmPages {
        memory,
        memory_pages: layout.memory_pages(),
        disks: disks
            .iter()
            .enumerate()
            .map(|(i, d)| (layout.disk_pages(i), d.device.clone()))
            .collect(),
    };
    Ok((Arc::new(reader), layout))
}

/// `layout`'s memory with `disks` appended (any disks it named are replaced).
pub fn layout_with(layout: &Layout, disks: &[SourceDisk]) -> Result<Layout, DiskSetupError> {
    let mut layout = layout.clone();
    layout.disks.clear();
    for d in disks {
        check_size(&d.name, d.device.size())?;
        layout = layout.with_disk(d.name.clone(), d.device.size());
    }
    Ok(layout)
}

/// Where a destination disk's requests go: the session's request channel, once there is
/// one (requests made before are held and sent when the session starts).
#[derive(Default)]
struct FetchLink {
    inner: Mutex<LinkState>,
}

#[derive(Default)]
struct LinkState {
    first_page: u64,
    tx: Option<UnboundedSender<Vec<u64>>>,
    held: Vec<u64>,
}

impl BlockFetcher for FetchLink {
    fn request(&self, units: &[u64]) {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match &s.tx {
            Some(tx) => {
                let pages = units.iter().map(|u| s.first_page + u).collect();
                // A closed channel: the session is over and the disk was failed.
                let _ = tx.send(pages);
            }
            None => s.held.extend_from_slice(units),
        }
    }
}

impl FetchLink {
    fn connect(&self, first_page: u64, tx: UnboundedSender<Vec<u64>>) {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        s.first_page = first_page;
        if !s.held.is_empty() {
            let pages = s.held.drain(..).map(|u| first_page + u).collect();
            let _ = tx.send(pages);
        }
        s.tx = Some(tx);
    }
}

/// A disk a destination receives: serve [`DestDisk::device`] to the guest (NBD,
/// vhost-user-blk) from the moment the VM resumes.
pub struct DestDisk {
    name: String,
    device: Arc<PostcopyDisk<RawFile>>,
    link: Arc<FetchLink>,
}

impl DestDisk {
    /// Disk `name`, to be received into `file` (sized like the source's disk). Blocks for
    /// which `present(block)` holds are served locally from the start (a replica's fresh
    /// blocks); every other block is fetched before it is served.
    pub fn new(name: impl Into<String>, file: RawFile, present: impl Fn(u64) -> bool) -> DestDisk {
        let link = Arc::new(FetchLink::default());
        DestDisk {
            name: name.into(),
            device: Arc::new(PostcopyDisk::new(file, present, link.clone())),
            link,
        }
    }

    /// The disk's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The disk to serve to the guest.
    pub fn device(&self) -> &Arc<PostcopyDisk<RawFile>> {
        &self.device
    }
}

/// What a destination measured for one disk.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DiskReport {
    /// The disk's name.
    pub name: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// Blocks that had to cross (stale, or the whole disk without a replica).
    pub blocks_stale: u64,
    /// Blocks served from the local replica.
    pub blocks_from_replica: u64,
    /// Bytes of this disk's blocks received (raw payload; zero blocks cost none).
    pub disk_wire_bytes: u64,
    /// Session start → every block present, in milliseconds.
    pub disk_total_ms: f64,
    /// Guest requests that waited for stale blocks, and the waits' percentiles: the
    /// [`PostcopyStats`] of the disk.
    #[serde(flatten)]
    pub postcopy: PostcopyStats,
}

/// The destination's disks in a session: installs their pages, tracks their completion.
pub(crate) struct DiskSet {
    disks: Vec<(Range<u64>, Arc<PostcopyDisk<RawFile>>)>,
    names: Vec<String>,
    started: Mutex<Instant>,
    wire: Vec<std::sync::atomic::AtomicU64>,
    done_at: Vec<Mutex<Option<Instant>>>,
}

impl DiskSet {
    /// Checks `disks` against `layout` and connects their requests to `tx`.
    pub(crate) fn connect(
        disks: &[DestDisk],
        layout: &Layout,
        tx: &UnboundedSender<Vec<u64>>,
    ) -> Result<DiskSet, DiskSetupError> {
        let describe = |it: &mut dyn Iterator<Item = (String, u64)>| {
            it.map(|(n, s)| format!("{n}:{s}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let matches = disks.len() == layout.disks.len()
            && disks
                .iter()
                .zip(&layout.disks)
                .all(|(d, l)| d.name == l.name && d.device.size() == l.len);
        if !matches {
            return Err(DiskSetupError::Mismatch {
                given: describe(&mut disks.iter().map(|d| (d.name.clone(), d.device.size()))),
                layout: describe(&mut layout.disks.iter().map(|d| (d.name.clone(), d.len))),
            });
        }
        let mut set = DiskSet {
            disks: Vec::new(),
            names: Vec::new(),
            started: Mutex::new(Instant::now()),
            wire: Vec::new(),
            done_at: Vec::new(),
        };
        for (i, d) in disks.iter().enumerate() {
            let range = layout.disk_pages(i);
            d.link.connect(range.start, tx.clone());
            set.disks.push((range, d.device.clone()));
            set.names.push(d.name.clone());
            set.wire.push(Default::default());
            set.done_at
                .push(Mutex::new(d.device.is_complete().then(Instant::now)));
        }
        Ok(set)
    }

    /// The session starts now (`disk_total_ms` counts from here).
    pub(crate) fn start_clock(&self) {
        *self.started.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    /// Pages of memory come before `first_disk_page()`.
    pub(crate) fn first_page(&self) -> Option<u64> {
        self.disks.first().map(|(r, _)| r.start)
    }

    /// Installs disk pages (all of `pages` lies in disks).
    pub(crate) fn install(&self, pages: &Pages) -> Result<(), SinkError> {
        for (page, p) in pages.iter() {
            let Some(i) = self.disks.iter().position(|(r, _)| r.contains(&page)) else {
                return Err(SinkError(format!("page {page} is in no disk")));
            };
            let (range, disk) = &self.disks[i];
            let unit = page - range.start;
            let stored = match p {
                PageRef::Raw(d) => disk.install(unit, Some(d)),
                PageRef::Zero => disk.install(unit, None),
                other => {
                    return Err(SinkError(format!(
                        "disk page {page} arrived undecoded ({other:?})"
                    )))
                }
            }
            .map_err(|e: DiskError| SinkError(uffd_core::error::chain(&e)))?;
            if stored {
                if let PageRef::Raw(d) = p {
                    self.wire[i].fetch_add(d.len() as u64, std::sync::atomic::Ordering::Relaxed);
                }
            }
            if disk.is_complete() {
                let mut t = self.done_at[i].lock().unwrap_or_else(|p| p.into_inner());
                t.get_or_insert_with(Instant::now);
            }
        }
        Ok(())
    }

    /// Reads a present disk page (a content reference may name one).
    pub(crate) fn read_page(&self, page: u64, out: &mut [u8]) -> bool {
        let Some((range, disk)) = self.disks.iter().find(|(r, _)| r.contains(&page)) else {
            return false;
        };
        let unit = page - range.start;
        disk.is_present(unit) && disk.read_at(out, unit * UNIT).is_ok()
    }

    pub(crate) fn is_complete(&self) -> bool {
        self.disks.iter().all(|(_, d)| d.is_complete())
    }

    /// The session ended: requests for blocks still missing fail with `reason`.
    pub(crate) fn fail(&self, reason: &str) {
        for (_, d) in &self.disks {
            if !d.is_complete() {
                d.fail(reason.to_string());
            }
        }
    }

    pub(crate) fn reports(&self) -> Vec<DiskReport> {
        let started = *self.started.lock().unwrap_or_else(|p| p.into_inner());
        self.disks
            .iter()
            .enumerate()
            .map(|(i, (range, d))| {
                let postcopy = d.stats();
                let done = *self.done_at[i].lock().unwrap_or_else(|p| p.into_inner());
                DiskReport {
                    name: self.names[i].clone(),
                    bytes: d.size(),
                    blocks_stale: range.end - range.start - postcopy.units_local,
                    blocks_from_replica: postcopy.units_local,
                    disk_wire_bytes: self.wire[i].load(std::sync::atomic::Ordering::Relaxed),
                    disk_total_ms: done
                        .map(|t| t.saturating_duration_since(started).as_secs_f64() * 1e3)
                        .unwrap_or(0.0),
                    postcopy,
                }
            })
            .collect()
    }
}

/// Memory through `memory`, disks through `disks`: the destination's sink for a session
/// with disks.
pub(crate) struct VmSink<M> {
    pub(crate) memory: M,
    pub(crate) disks: Arc<DiskSet>,
}

impl<M: PageSink> PageSink for VmSink<M> {
    fn install(&self, pages: &Pages, channel: transport::proto::Channel) -> Result<(), SinkError> {
        let Some(first_disk) = self.disks.first_page() else {
            return self.memory.install(pages, channel);
        };
        let end = pages.first + pages.count() as u64;
        if end <= first_disk {
            return self.memory.install(pages, channel);
        }
        if pages.first >= first_disk {
            return self.disks.install(pages);
        }
        let k = (first_disk - pages.first) as usize;
        let (mem, disk) = pages
            .split_at(k)
            .ok_or_else(|| SinkError("page payload shorter than its kinds".into()))?;
        self.memory.install(&mem, channel)?;
        self.disks.install(&disk)
    }

    fn is_complete(&self) -> bool {
        self.memory.is_complete() && self.disks.is_complete()
    }

    fn read_page(&self, page: u64, out: &mut [u8]) -> bool {
        match self.disks.first_page() {
            Some(f) if page >= f => self.disks.read_page(page, out),
            _ => self.memory.read_page(page, out),
        }
    }
}

/// A disk replicated in normal times: the device its front end serves (with writes
/// tracked) and the tracker replication harvests.
#[derive(Clone)]
pub struct ReplicatedDisk {
    /// The name both sides use for the disk.
    pub name: String,
    /// The disk, read by replication while the guest keeps writing it.
    pub device: Arc<dyn BlockDevice>,
    /// The tracker the front end marks after every write.
    pub tracker: Arc<WriteTracker>,
}

impl ReplicatedDisk {
    /// Disk `name` served through `disk` (whose writes it tracks).
    pub fn tracked<D: BlockDevice + 'static>(
        name: impl Into<String>,
        disk: Arc<Tracked<D>>,
    ) -> Self {
        ReplicatedDisk {
            name: name.into(),
            tracker: disk.tracker().clone(),
            device: disk,
        }
    }

    /// The same disk as the source of a session.
    pub fn source(&self) -> SourceDisk {
        SourceDisk {
            name: self.name.clone(),
            device: self.device.clone(),
        }
    }
}

/// Guest memory's dirty tracker and the disks' write trackers, harvested together in the
/// session's page numbers (memory first, then each disk's 4 KiB units).
pub(crate) struct VmTracker {
    memory: Box<dyn DirtyTracker>,
    memory_pages: u64,
    disks: Vec<(u64, Arc<WriteTracker>)>,
}

impl VmTracker {
    pub(crate) fn new(
        memory: Box<dyn DirtyTracker>,
        layout: &Layout,
        disks: &[ReplicatedDisk],
    ) -> VmTracker {
        VmTracker {
            memory,
            memory_pages: layout.memory_pages(),
            disks: disks
                .iter()
                .enumerate()
                .map(|(i, d)| (layout.disk_pages(i).start, d.tracker.clone()))
                .collect(),
        }
    }
}

impl DirtyTracker for VmTracker {
    fn harvest(&mut self, out: &mut Vec<u64>) -> Result<(), uffd_core::DirtyError> {
        self.memory.harvest(out)?;
        for (first, t) in &self.disks {
            let per = t.block_size().bytes() / UNIT;
            let units = t.blocks() * per;
            for b in t.harvest() {
                out.extend(
                    (b * per..(b + 1) * per)
                        .filter(|&u| u < units)
                        .map(|u| first + u),
                );
            }
        }
        Ok(())
    }

    fn kind(&self) -> &'static str {
        self.memory.kind()
    }

    fn replicated(&mut self, page: u64, content: &[u8]) -> Result<(), uffd_core::DirtyError> {
        if page < self.memory_pages {
            self.memory.replicated(page, content)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
#[path = "disks_tests.rs"]
mod tests;
