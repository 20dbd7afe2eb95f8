//! Finding hot and free guest-physical frames.
//!
//! One scan covers an *interval*: [`Scanner::start_window`] arms access tracking, and
//! [`Scanner::finish_window`], an interval later, reads it back together with every frame's
//! flags and re-arms for the next interval in the same pass. A frame is
//!
//! * **hot** if it was accessed during the interval — per idle page tracking
//!   (`/sys/kernel/mm/page_idle/bitmap`, reads and writes) when the kernel has it, else per
//!   soft-dirty bits (writes only, see [`softdirty`]) — or it is on the active LRU list, slab
//!   or a page table (`/proc/kpageflags`), and it is not free now;
//! * **free** if it lies in a free block of the buddy allocator (see [`free`]).
//!
//! All reading is batched (`batch_pages` frames per `pread`) and throttled to a CPU budget
//! (see [`crate::throttle`]).

pub mod bitmap;
pub mod classify;
pub mod flags;
pub mod free;
pub mod kpage;
pub mod ranges;
pub mod softdirty;

use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::proto::PfnRange;
use crate::throttle::Throttle;
use bitmap::PfnBitmap;
use classify::{Access, Classifier};
pub use free::FreeMode;
use kpage::{IdleBitmap, Kpageflags};
use softdirty::SoftDirty;

/// How access during the interval is detected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HotMethod {
    /// Idle page tracking: reads and writes of LRU pages.
    Idle,
    /// Soft-dirty bits: writes through any process's page tables.
    SoftDirty,
    /// Neither: only the active/slab/page-table flags.
    FlagsOnly,
}

impl HotMethod {
    /// The name used in the configuration and in logs.
    pub fn name(self) -> &'static str {
        match self {
            HotMethod::Idle => "idle",
            HotMethod::SoftDirty => "soft-dirty",
            HotMethod::FlagsOnly => "flags",
        }
    }
}

/// Which [`HotMethod`] to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MethodChoice {
    /// Idle tracking if available, else soft-dirty if it works, else flags only.
    #[default]
    Auto,
    /// This one, or fail.
    Only(HotMethod),
}

/// Scanner settings.
#[derive(Clone, Debug)]
pub struct ScanConfig {
    /// Frames per read (rounded up to a multiple of 64).
    pub batch_pages: usize,
    /// CPU budget of the scanning thread, percent of one CPU.
    pub max_cpu_pct: u32,
    /// Access detection.
    pub method: MethodChoice,
    /// `/proc/kpageflags` (a file of the same format in tests).
    pub kpageflags: PathBuf,
    /// The idle bitmap.
    pub idle_bitmap: PathBuf,
}

impl Default for ScanConfig {
    fn default() -> Self {
        ScanConfig {
            batch_pages: 32 * 1024,
            max_cpu_pct: 5,
            method: MethodChoice::Auto,
            kpageflags: kpage::KPAGEFLAGS.into(),
            idle_bitmap: kpage::PAGE_IDLE_BITMAP.into(),
        }
    }
}

/// Why scanning cannot work or failed.
#[derive(Debug, Error)]
pub enum ScanError {
    /// `/proc/kpageflags` cannot be opened (not root, or no `CONFIG_PROC_PAGE_MONITOR`).
    #[error("cannot open {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Reading frame data failed mid-scan.
    #[error("reading {what} failed")]
    Read {
        /// Which file.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// `/proc/kpageflags` covers no frame.
    #[error("/proc/kpageflags is empty")]
    NoFrames,
    /// The configured method is not available.
    #[error("hot-page method {0} is not available on this kernel")]
    MethodUnavailable(&'static str),
}

/// Numbers about one scan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanStats {
    /// Frames scanned (`max_pfn`).
    pub frames: u64,
    /// Hot frames.
    pub hot_pages: u64,
    /// Free frames.
    pub free_pages: u64,
    /// Free pages per `/proc/buddyinfo`, read right after the pass.
    pub buddyinfo_free_pages: Option<u64>,
    /// Frames seen written (soft-dirty method).
    pub written_pages: u64,
    /// Processes whose pagemap was read (soft-dirty method).
    pub processes: u32,
    /// CPU time of the pass (the scanning thread, kernel time included).
    pub cpu: Duration,
    /// Wall time of the pass, throttling sleeps included.
    pub wall: Duration,
}

/// Hot and free frames of one interval.
#[derive(Clone, Debug)]
pub struct ScanResult {
    /// Hot frames (sorted, coalesced).
    pub hot: Vec<PfnRange>,
    /// Free frames (sorted, coalesced, disjoint from `hot`).
    pub free: Vec<PfnRange>,
    /// How access was detected.
    pub method: HotMethod,
    /// How free frames were found.
    pub free_mode: FreeMode,
    /// Numbers.
    pub stats: ScanStats,
}

/// Scans guest memory interval by interval.
#[derive(Debug)]
pub struct Scanner {
    cfg: ScanConfig,
    kpf: Kpageflags,
    idle: Option<IdleBitmap>,
    soft: Option<SoftDirty>,
    written: PfnBitmap,
    max_order: u32,
    free_mode: FreeMode,
    method: HotMethod,
    flags: Vec<u64>,
    idle_words: Vec<u64>,
}

fn read_buddyinfo() -> Option<(u64, u32)> {
    free::parse_buddyinfo(&std::fs::read_to_string("/proc/buddyinfo").ok()?)
}

impl Scanner {
    /// Opens the kernel interfaces and picks the access-detection method.
    pub fn open(cfg: ScanConfig) -> Result<Scanner, ScanError> {
        let kpf = Kpageflags::open(&cfg.kpageflags).map_err(|source| ScanError::Open {
            path: cfg.kpageflags.clone(),
            source,
        })?;
        if kpf.end() == 0 {
            return Err(ScanError::NoFrames);
        }
        let want =
            |m| matches!(cfg.method, MethodChoice::Auto) || cfg.method == MethodChoice::Only(m);
        let mut idle = None;
        let mut soft = None;
        if want(HotMethod::Idle) {
            idle = IdleBitmap::open(&cfg.idle_bitmap).ok();
        }
        if idle.is_none() && want(HotMethod::SoftDirty) {
            soft = SoftDirty::probe();
        }
        let method = match (&idle, &soft) {
            (Some(_), _) => HotMethod::Idle,
            (None, Some(_)) => HotMethod::SoftDirty,
            (None, None) => HotMethod::FlagsOnly,
        };
        if let MethodChoice::Only(m) = cfg.method {
            if m != method {
                return Err(ScanError::MethodUnavailable(m.name()));
            }
        }
        let batch = cfg.batch_pages.clamp(64, 1 << 20).next_multiple_of(64);
        let written = PfnBitmap::new(if soft.is_some() { kpf.end() } else { 0 });
        Ok(Scanner {
            max_order: read_buddyinfo().map_or(free::DEFAULT_MAX_ORDER, |(_, o)| o),
            free_mode: FreeMode::for_release(
                &std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default(),
            ),
            written,
            kpf,
            idle,
            soft,
            method,
            flags: vec![0; batch],
            idle_words: vec![0; batch / 64],
            cfg,
        })
    }

    /// The access-detection method in use.
    pub fn method(&self) -> HotMethod {
        self.method
    }

    /// Frames covered.
    pub fn frames(&self) -> u64 {
        self.kpf.end()
    }

    /// Starts an interval: marks every frame idle / clears every soft-dirty bit.
    pub fn start_window(&mut self) -> Result<(), ScanError> {
        let mut throttle = Throttle::new(self.cfg.max_cpu_pct);
        if let Some(idle) = &mut self.idle {
            let batch = self.flags.len() as u64;
            let mut pfn = 0;
            while pfn < self.kpf.end() {
                idle.set_idle(pfn, (batch / 64) as usize)
                    .map_err(|source| ScanError::Read {
                        what: "page_idle/bitmap",
                        source,
                    })?;
                pfn += batch;
                throttle.pause();
            }
        }
        if let Some(soft) = &self.soft {
            soft.arm_all(&mut throttle);
        }
        Ok(())
    }

    /// Ends the interval started by the last [`Scanner::start_window`] (or the last call of
    /// this), returns what it found, and starts the next interval.
    pub fn finish_window(&mut self) -> Result<ScanResult, ScanError> {
        let started = Instant::now();
        let mut throttle = Throttle::new(self.cfg.max_cpu_pct);
        let mut stats = ScanStats::default();
        if let Some(soft) = &mut self.soft {
            self.written.clear();
            let s = soft.collect(&mut self.written, &mut throttle);
            stats.processes = s.processes;
            stats.written_pages = self.written.count();
        }
        let end = self.kpf.end();
        let mut classifier = Classifier::new(self.free_mode, self.max_order);
        let batch = self.flags.len() as u64;
        let mut pfn = 0u64;
        while pfn < end {
            let want = batch.min(end - pfn) as usize;
            let n = self
                .kpf
                .read(pfn, &mut self.flags[..want])
                .map_err(|source| ScanError::Read {
                    what: "/proc/kpageflags",
                    source,
                })?;
            if n == 0 {
                break;
            }
            let words = n.div_ceil(64);
            let idle_words = match &mut self.idle {
                Some(idle) => {
                    let got = idle
                        .read(pfn, &mut self.idle_words[..words])
                        .map_err(|source| ScanError::Read {
                            what: "page_idle/bitmap",
                            source,
                        })?;
                    // Frames the kernel returned no word for count as idle (not accessed).
                    self.idle_words[got..words].fill(u64::MAX);
                    Some(&self.idle_words[..words])
                }
                None => None,
            };
            for (i, &f) in self.flags[..n].iter().enumerate() {
                let p = pfn + i as u64;
                let access = Access {
                    idle: idle_words.map(|w| w[i / 64] & (1 << (i % 64)) != 0),
                    written: self.written.get(p),
                };
                classifier.push(p, f, access);
            }
            if let Some(idle) = &mut self.idle {
                // Re-arm this chunk right after reading it: each frame's next interval
                // starts now.
                idle.set_idle(pfn, words)
                    .map_err(|source| ScanError::Read {
                        what: "page_idle/bitmap",
                        source,
                    })?;
            }
            pfn += n as u64;
            throttle.pause();
        }
        let c = classifier.finish(pfn);
        stats.buddyinfo_free_pages = read_buddyinfo().map(|(t, _)| t);
        stats.frames = pfn;
        stats.hot_pages = ranges::pages(&c.hot);
        stats.free_pages = ranges::pages(&c.free);
        stats.cpu = throttle.used();
        stats.wall = started.elapsed();
        Ok(ScanResult {
            hot: c.hot,
            free: c.free,
            method: self.method,
            free_mode: self.free_mode,
            stats,
        })
    }
}
