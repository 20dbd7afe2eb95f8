//! What the driver tests share: a source image and a destination sink in plain memory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use transport::message::{PageRef, Pages, PAGE_SIZE};
use transport::proto::Channel;
use transport::quic::{Extent, PageReader, PageSink, SinkError};

/// The source's memory.
pub struct Image(pub Vec<u8>);

/// A reader whose every read takes `per_read` (memory read slowly: a push then yields after
/// every batch, and takes long enough to be cut or answered midway), and which notifies
/// `on_read` at every read. (Not every test binary uses it.)
#[allow(dead_code)]
pub struct Slow<R> {
    pub inner: std::sync::Arc<R>,
    pub on_read: std::sync::Arc<tokio::sync::Notify>,
    pub per_read: std::time::Duration,
}

impl<R: PageReader> PageReader for Slow<R> {
    fn pages(&self, first: u64, count: usize) -> Result<std::borrow::Cow<'_, [u8]>, String> {
        self.on_read.notify_one();
        std::thread::sleep(self.per_read);
        self.inner.pages(first, count)
    }

    fn extent(&self, first: u64, max: u64) -> Extent {
        self.inner.extent(first, max)
    }
}

impl PageReader for Image {
    fn pages(&self, first: u64, count: usize) -> Result<std::borrow::Cow<'_, [u8]>, String> {
        let start = first as usize * PAGE_SIZE;
        self.0
            .get(start..start + count * PAGE_SIZE)
            .map(std::borrow::Cow::Borrowed)
            .ok_or_else(|| "out of range".to_string())
    }
}

/// A source image whose zero pages are known without reading them, like the holes of a
/// memfd, and which counts the pages read. (Not every test binary uses it.)
#[allow(dead_code)]
pub struct SparseImage {
    pub image: Image,
    /// Pages handed out by `pages`.
    pub read: AtomicU64,
}

#[allow(dead_code)]
impl SparseImage {
    pub fn new(bytes: Vec<u8>) -> SparseImage {
        SparseImage {
            image: Image(bytes),
            read: AtomicU64::new(0),
        }
    }

    fn zero(&self, page: u64) -> Option<bool> {
        let at = page as usize * PAGE_SIZE;
        let p = self.image.0.get(at..at + PAGE_SIZE)?;
        Some(p.iter().all(|&b| b == 0))
    }
}

impl PageReader for SparseImage {
    fn pages(&self, first: u64, count: usize) -> Result<std::borrow::Cow<'_, [u8]>, String> {
        self.read.fetch_add(count as u64, Ordering::Relaxed);
        self.image.pages(first, count)
    }

    fn extent(&self, first: u64, max: u64) -> Extent {
        let Some(zero) = self.zero(first) else {
            return Extent::Unknown;
        };
        let mut n = 1;
        while n < max && self.zero(first + n) == Some(zero) {
            n += 1;
        }
        if zero {
            Extent::Zero(n)
        } else {
            Extent::Data(n)
        }
    }
}

/// The destination's memory (filled with 0xAA, so a page never installed shows), with
/// counters of what was installed.
pub struct MemSink {
    pub mem: Mutex<Vec<u8>>,
    pub present: Mutex<Vec<bool>>,
    /// Distinct pages installed.
    pub count: AtomicU64,
    /// Pages installed from the urgent channel (demand replies).
    pub urgent: AtomicU64,
    /// Every install of a page, repeats included.
    pub installs: AtomicU64,
    /// The most pages one install call got.
    pub longest: AtomicU64,
}

impl MemSink {
    pub fn new(pages: usize) -> MemSink {
        MemSink {
            mem: Mutex::new(vec![0xAA; pages * PAGE_SIZE]),
            present: Mutex::new(vec![false; pages]),
            count: AtomicU64::new(0),
            urgent: AtomicU64::new(0),
            installs: AtomicU64::new(0),
            longest: AtomicU64::new(0),
        }
    }
}

impl PageSink for MemSink {
    fn install(&self, pages: &Pages, channel: Channel) -> Result<(), SinkError> {
        let mut mem = self.mem.lock().unwrap();
        let mut present = self.present.lock().unwrap();
        self.longest
            .fetch_max(pages.count() as u64, Ordering::Relaxed);
        for (i, p) in pages.iter() {
            let at = i as usize * PAGE_SIZE;
            match p {
                PageRef::Raw(d) => mem[at..at + PAGE_SIZE].copy_from_slice(d),
                PageRef::Zero => mem[at..at + PAGE_SIZE].fill(0),
                PageRef::Lz4(_) | PageRef::Ref { .. } => {
                    return Err(SinkError("the driver hands sinks decoded pages".into()))
                }
            }
            self.installs.fetch_add(1, Ordering::Relaxed);
            if !std::mem::replace(&mut present[i as usize], true) {
                self.count.fetch_add(1, Ordering::Relaxed);
            }
            if channel == Channel::Urgent {
                self.urgent.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn is_complete(&self) -> bool {
        self.count.load(Ordering::Relaxed) as usize == self.present.lock().unwrap().len()
    }

    fn read_page(&self, page: u64, out: &mut [u8]) -> bool {
        // Same lock order as `install`.
        let mem = self.mem.lock().unwrap();
        let present = self.present.lock().unwrap();
        if !present.get(page as usize).copied().unwrap_or(false) {
            return false;
        }
        let at = page as usize * PAGE_SIZE;
        out.copy_from_slice(&mem[at..at + PAGE_SIZE]);
        true
    }
}
