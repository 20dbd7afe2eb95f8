//! Shared test helpers: a page source double and bounded waits.

#![allow(dead_code)]

use std::collections::HashSet;
use std::hash::{DefaultHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use uffd_core::{Destination, HostRegion, Installer, Origin, PageData, PageSource, PAGE_SIZE};

/// Deterministic content of page `page`; every fifth page is zero.
pub fn content(page: u64) -> Option<Vec<u8>> {
    if page % 5 == 3 {
        return None;
    }
    let mut v: Vec<u8> = (0..PAGE_SIZE)
        .map(|j| (page.wrapping_mul(131) as usize + j * 7 + (page >> 8) as usize) as u8)
        .collect();
    v[..8].copy_from_slice(&page.to_le_bytes());
    v[PAGE_SIZE - 8..].copy_from_slice(&(!page).to_le_bytes());
    Some(v)
}

pub fn expected_page(page: u64) -> Vec<u8> {
    content(page).unwrap_or_else(|| vec![0; PAGE_SIZE])
}

pub fn install_content(
    installer: &Installer,
    page: u64,
    origin: Origin,
) -> Result<uffd_core::Installed, uffd_core::InstallError> {
    match content(page) {
        Some(bytes) => installer.install(page, PageData::Raw(&bytes), origin),
        None => installer.install(page, PageData::Zero, origin),
    }
}

/// Reads one page through a raw pointer; the first volatile read faults it in, after
/// which the page is stable (nobody writes guest memory in these tests).
pub fn read_page(addr: usize) -> Vec<u8> {
    // SAFETY: `addr` is the start of a mapped 4 KiB guest page that outlives the call;
    // the volatile read blocks until the page is installed.
    unsafe {
        std::ptr::read_volatile(addr as *const u8);
        std::slice::from_raw_parts(addr as *const u8, PAGE_SIZE).to_vec()
    }
}

/// Digest of all guest memory in global page order.
pub fn memory_digest(regions: &[HostRegion]) -> u64 {
    let mut h = DefaultHasher::new();
    for r in regions {
        for off in (0..r.len()).step_by(PAGE_SIZE) {
            h.write(&read_page(r.host_addr() + off));
        }
    }
    h.finish()
}

pub fn expected_digest(total_pages: u64) -> u64 {
    let mut h = DefaultHasher::new();
    for p in 0..total_pages {
        h.write(&expected_page(p));
    }
    h.finish()
}

/// Runs `f(i)` on `n` threads; panics if they do not all finish within `timeout`.
/// Threads stuck in a fault are released later when the test's Destination drops.
pub fn run_threads<F>(n: usize, timeout: Duration, f: F)
where
    F: Fn(usize) + Send + Sync + 'static,
{
    let f = Arc::new(f);
    let (tx, rx) = mpsc::channel();
    for i in 0..n {
        let (f, tx) = (f.clone(), tx.clone());
        std::thread::spawn(move || {
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(i))).is_ok();
            let _ = tx.send((i, ok));
        });
    }
    let deadline = Instant::now() + timeout;
    for _ in 0..n {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((i, ok)) => assert!(ok, "thread {i} panicked"),
            Err(_) => panic!("threads did not finish within {timeout:?}"),
        }
    }
}

/// Runs `f` on a thread; panics if it does not finish within `timeout`.
pub fn within<F: FnOnce() + Send + 'static>(timeout: Duration, f: F) {
    let cell = Mutex::new(Some(f));
    run_threads(1, timeout, move |_| {
        if let Some(f) = cell.lock().unwrap().take() {
            f()
        }
    });
}

/// Polls `cond` until true or `timeout`.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    cond()
}

/// Page source double: counts requests per page and hands them to a server thread.
pub struct DoubleSource {
    counts: Vec<AtomicU32>,
    tx: Mutex<mpsc::Sender<Vec<u64>>>,
    rx: Mutex<Option<mpsc::Receiver<Vec<u64>>>>,
    /// Pages the server never answers.
    pub withhold: Mutex<HashSet<u64>>,
}

impl DoubleSource {
    pub fn new(total: u64) -> Arc<DoubleSource> {
        let (tx, rx) = mpsc::channel();
        Arc::new(DoubleSource {
            counts: (0..total).map(|_| AtomicU32::new(0)).collect(),
            tx: Mutex::new(tx),
            rx: Mutex::new(Some(rx)),
            withhold: Mutex::new(HashSet::new()),
        })
    }

    pub fn count(&self, page: u64) -> u32 {
        self.counts[page as usize].load(Ordering::SeqCst)
    }

    pub fn counts(&self) -> Vec<u32> {
        self.counts
            .iter()
            .map(|c| c.load(Ordering::SeqCst))
            .collect()
    }
}

impl PageSource for DoubleSource {
    fn request(&self, pages: &[u64]) {
        for &p in pages {
            self.counts[p as usize].fetch_add(1, Ordering::SeqCst);
        }
        let _ = self.tx.lock().unwrap().send(pages.to_vec());
    }
}

/// Installs requested pages with their deterministic content until stopped.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<String>>>,
}

impl Server {
    pub fn start(source: &Arc<DoubleSource>, installer: Installer) -> Server {
        let rx = source
            .rx
            .lock()
            .unwrap()
            .take()
            .expect("one server per source");
        let stop = Arc::new(AtomicBool::new(false));
        let (src, stop2) = (source.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut errors = Vec::new();
            while !stop2.load(Ordering::SeqCst) {
                let Ok(pages) = rx.recv_timeout(Duration::from_millis(5)) else {
                    continue;
                };
                for p in pages {
                    if src.withhold.lock().unwrap().contains(&p) {
                        continue;
                    }
                    if let Err(e) = install_content(&installer, p, Origin::Demand) {
                        errors.push(format!("page {p}: {}", uffd_core::error::chain(&e)));
                    }
                }
            }
            errors
        });
        Server {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the server; panics if any install failed.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let errors = self.thread.take().unwrap().join().unwrap();
        assert!(errors.is_empty(), "install errors: {errors:?}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A destination over `regions` served by a [`DoubleSource`].
pub fn serve(regions: &[HostRegion]) -> (Destination, Arc<DoubleSource>, Server) {
    let total = regions.iter().map(|r| r.pages()).sum();
    let source = DoubleSource::new(total);
    let dest = Destination::register(regions, source.clone()).expect("register");
    let server = Server::start(&source, dest.installer().clone());
    (dest, source, server)
}

/// Per page of `[addr, addr + pages × 4 KiB)`: whether it is resident (`mincore`).
pub fn resident(addr: usize, pages: usize) -> Vec<bool> {
    let mut vec = vec![0u8; pages];
    // SAFETY: [addr, addr + pages*4096) is one live mapping and `vec` has one byte per page.
    let r = unsafe {
        libc::mincore(
            addr as *mut libc::c_void,
            pages * PAGE_SIZE,
            vec.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0);
    vec.iter().map(|b| b & 1 == 1).collect()
}
