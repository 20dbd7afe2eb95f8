//! [`HintBoard`]: the agent channel's bytes in, validated [`Hints`] out.

use std::collections::VecDeque;
use std::io::Read;
use std::ops::Range;
use std::time::{Duration, Instant};

use guest_agent::proto::{
    validate_ranges, DecodeError, FrameReader, Hello, Message, PfnRange, RangeError, RangeKind,
    TouchReport, MAX_ERROR_MESSAGE_LEN, MAX_FRAME_LEN,
};
use serde::Serialize;
use thiserror::Error;
use transport::bitmap::Bitmap;
use transport::{Layout, PAGE_SIZE};

use super::map::{GuestMap, MapError};
use super::Hints;

/// Why agent input was refused. Every variant names what was wrong; none of them changes
/// the last accepted [`Hints`].
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum HintError {
    /// Bytes that are not a frame, a failed checksum, or a frame whose content does not
    /// decode (bad ranges, counts past 2^52, unknown type, ...): see
    /// `guest_agent::proto::FrameReader`.
    #[error("undecodable agent input")]
    Decode(#[from] DecodeError),
    /// More messages than [`BoardLimits::messages_per_sec`] allows; the message was
    /// dropped, and the report it belonged to with it.
    #[error("agent message dropped: over {per_sec} messages a second (burst {burst})")]
    RateLimited {
        /// [`BoardLimits::messages_per_sec`] in force.
        per_sec: u32,
        /// [`BoardLimits::burst`] in force.
        burst: u32,
    },
    /// A report before any acceptable `Hello` (the page size is unknown).
    #[error("{kind:?} report {seq} arrived before an acceptable Hello")]
    NoHello {
        /// Which list the refused part belongs to.
        kind: RangeKind,
        /// The refused part's report number.
        seq: u64,
    },
    /// The agent's pages are not the host's.
    #[error("the agent counts {page_size}-byte pages; the host tracks {PAGE_SIZE}-byte pages")]
    PageSize {
        /// The page size the agent's `Hello` gave, in bytes.
        page_size: u32,
    },
    /// The agent claims more RAM than the guest has: it is not this guest's agent, or lies.
    #[error("the agent reports {mem_total} bytes of guest RAM, more than the {guest_bytes} bytes of guest memory")]
    MemTotal {
        /// The agent's `Hello.mem_total_bytes`: the guest kernel's `MemTotal`, in bytes.
        mem_total: u64,
        /// Bytes of guest memory in the layout the board was made for.
        guest_bytes: u64,
    },
    /// A part of a report is unsorted or overlaps the parts before it.
    #[error("{kind:?} report {seq} has invalid ranges")]
    Ranges {
        /// Which list the part belongs to.
        kind: RangeKind,
        /// The report number.
        seq: u64,
        /// What is wrong with the ranges (an empty range, one past the frame limit, or
        /// one starting before the end of the range before it).
        source: RangeError,
    },
    /// Frames that are not guest memory (past the end, or in a hole between regions).
    #[error("{kind:?} report {seq}: frames {first}+{count} are not guest memory (frame {bad} is outside the {guest_pages} guest pages)")]
    OutsideGuest {
        /// Which list the range is in.
        kind: RangeKind,
        /// The report number.
        seq: u64,
        /// The range's first guest frame number, as the agent sent it.
        first: u64,
        /// The range's length in frames, as the agent sent it.
        count: u64,
        /// The first frame of the range that is in no region of the layout.
        bad: u64,
        /// Pages in the layout (all regions).
        guest_pages: u64,
    },
    /// A report list longer than [`BoardLimits::max_ranges`].
    #[error("{kind:?} report {seq} has more than {max} ranges")]
    TooManyRanges {
        /// Which list is too long.
        kind: RangeKind,
        /// The report number.
        seq: u64,
        /// [`BoardLimits::max_ranges`] in force.
        max: usize,
    },
    /// A free list that does not follow the complete hot list of the same report.
    #[error("free list of report {seq} does not follow a complete hot list of that report")]
    FreeWithoutHot {
        /// The free part's report number.
        seq: u64,
    },
    /// A page reported both hot and free: one of the two is wrong, so neither is used.
    #[error("report {seq}: page {page} is both hot and free")]
    HotFreeOverlap {
        /// The report number.
        seq: u64,
        /// The first such page, as a host page number.
        page: u64,
    },
    /// A host-to-agent message coming from the agent.
    #[error("the agent sent {message}, which only the host sends")]
    WrongDirection {
        /// The message's name (`ReportNow`, `PostcopyStarted` or `PostcopyFinished`).
        message: &'static str,
    },
    /// The agent reported an error of its own (kept for the operator; not a board fault).
    #[error("the agent reported error {code}: {message}")]
    Agent {
        /// The agent's error code (`guest_agent::proto::ErrorCode`; unknown values may
        /// come from newer agents).
        code: u16,
        /// The agent's text, at most `MAX_ERROR_MESSAGE_LEN` bytes (checked by the
        /// decoder).
        message: String,
    },
}

/// The bounds that keep a hostile agent from costing the host memory or CPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoardLimits {
    /// Most ranges one report list (hot or free) may have; a longer one is refused
    /// ([`HintError::TooManyRanges`]). Hot ranges are kept as ranges (16 bytes each) for
    /// the report being assembled and the last accepted one; free ranges go straight into
    /// a bitmap of the guest's pages and cost nothing per range.
    pub max_ranges: usize,
    /// Decoded messages processed per second (token bucket, refilled continuously); the
    /// rest are dropped with [`HintError::RateLimited`]. Every message costs at most its
    /// ranges plus the pages they name, so this bounds the CPU a flood can take. Garbage
    /// and undecodable frames are not counted: they cost only their bytes, which the
    /// channel's bandwidth and the caller's reads bound.
    pub messages_per_sec: u32,
    /// Bucket size: messages accepted at once after a quiet period.
    pub burst: u32,
    /// How old the agent's scan can be when the first part of its report arrives: the
    /// agent answers from its last finished interval, so its `interval_ms` plus one pass
    /// (the agent's scanner has a CPU budget, so a pass of a large guest takes seconds).
    /// Protocol v1 carries no scan time; this bound is what makes free-page skipping
    /// sound ([`super::skippable_free`]).
    pub max_scan_age: Duration,
    /// Most recent errors kept for [`HintBoard::take_errors`] (older ones are counted).
    pub max_errors_kept: usize,
}

impl Default for BoardLimits {
    fn default() -> Self {
        BoardLimits {
            // A 25 GiB guest's fragmented free list measured about 10^4 ranges; 2^16
            // leaves room and costs at most 1 MiB of hot ranges per copy.
            max_ranges: 1 << 16,
            // A report is a Hello plus a few parts of 4096 ranges; even every 100 ms that
            // is far below this.
            messages_per_sec: 1000,
            burst: 2000,
            max_scan_age: Duration::from_secs(30),
            max_errors_kept: 64,
        }
    }
}

/// Counters since the board was made.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BoardStats {
    /// Bytes fed from the channel ([`HintBoard::feed_bytes`]); decoded messages fed
    /// directly are not counted.
    pub bytes: u64,
    /// Decoded messages taken, rate-limited ones included.
    pub messages: u64,
    /// Reports accepted whole (each replaced [`HintBoard::hints`]).
    pub reports: u64,
    /// Errors from fed bytes, recorded for [`HintBoard::take_errors`], including those
    /// no longer kept; errors returned by [`HintBoard::feed_message`] are not counted.
    pub errors: u64,
    /// Messages dropped by the rate limit ([`HintError::RateLimited`]).
    pub rate_limited: u64,
    /// Bytes the frame reader skipped because they were not part of any frame.
    pub garbage_bytes: u64,
    /// Parts of a report that had already failed, ignored without another error.
    pub ignored_parts: u64,
}

/// The report being assembled: hot parts, then free parts, one `seq`.
#[derive(Debug)]
struct Building {
    seq: u64,
    started: Instant,
    poison_on_free: bool,
    /// The hot list is complete; free parts come next.
    hot_done: bool,
    hot: Vec<Range<u64>>,
    /// End frame of the last range of each list, for order checks across parts.
    prev_end: [u64; 2],
    ranges: [usize; 2],
    free: Bitmap,
}

/// Reads the agent's channel and keeps the latest valid report (see the
/// [module docs](super)).
///
/// Feed it bytes ([`HintBoard::feed_bytes`], [`HintBoard::read_from`]) or decoded messages
/// ([`HintBoard::feed_message`]). A report is accepted only whole: every part in order,
/// every frame guest memory, no page both hot and free, within the limits. A bad part
/// rejects its report (later parts of it are ignored quietly), and the previous accepted
/// report stays current.
///
/// Memory: the frame reader holds at most one frame (1 MiB); hot ranges are held for two
/// reports at most (being built, last accepted), each at most [`BoardLimits::max_ranges`];
/// free pages are two bitmaps of the guest's size (32 KiB per GiB each); errors are a ring
/// of [`BoardLimits::max_errors_kept`]. [`HintBoard::buffered_bytes`] never exceeds
/// [`HintBoard::max_buffered_bytes`].
#[derive(Debug)]
pub struct HintBoard {
    map: GuestMap,
    guest_bytes: u64,
    limits: BoardLimits,
    reader: FrameReader,
    hello: Option<Hello>,
    building: Option<Building>,
    /// A report that failed: its later parts are ignored.
    failed_seq: Option<u64>,
    latest: Option<Hints>,
    touched: Option<TouchReport>,
    tokens: f64,
    refilled: Option<Instant>,
    errors: VecDeque<HintError>,
    stats: BoardStats,
}

const RANGE_BYTES: usize = std::mem::size_of::<Range<u64>>();

fn slot(kind: RangeKind) -> usize {
    match kind {
        RangeKind::Hot => 0,
        RangeKind::Free => 1,
    }
}

impl HintBoard {
    /// A board for a guest with memory `layout`.
    pub fn new(layout: &Layout, limits: BoardLimits) -> Result<HintBoard, MapError> {
        Ok(HintBoard {
            map: GuestMap::new(layout)?,
            guest_bytes: layout.memory_bytes(),
            tokens: f64::from(limits.burst),
            limits,
            reader: FrameReader::new(),
            hello: None,
            building: None,
            failed_seq: None,
            latest: None,
            touched: None,
            refilled: None,
            errors: VecDeque::new(),
            stats: BoardStats::default(),
        })
    }

    /// The latest accepted report.
    pub fn hints(&self) -> Option<&Hints> {
        self.latest.as_ref()
    }

    /// Takes the latest accepted report.
    pub fn take_hints(&mut self) -> Option<Hints> {
        self.latest.take()
    }

    /// The last acceptable `Hello`.
    pub fn hello(&self) -> Option<&Hello> {
        self.hello.as_ref()
    }

    /// The agent's answer to `PostcopyStarted`, if one came.
    pub fn touched(&self) -> Option<TouchReport> {
        self.touched
    }

    /// Counters since the board was made.
    pub fn stats(&self) -> &BoardStats {
        &self.stats
    }

    /// The limits the board was made with.
    pub fn limits(&self) -> &BoardLimits {
        &self.limits
    }

    /// The most recent errors (at most [`BoardLimits::max_errors_kept`]), oldest first.
    pub fn take_errors(&mut self) -> Vec<HintError> {
        self.errors.drain(..).collect()
    }

    /// Bytes held that the agent's input decides: undecoded bytes in the frame reader and
    /// hot ranges (allocated capacity) of the report being built and the accepted one.
    pub fn buffered_bytes(&self) -> usize {
        let building = self.building.as_ref().map_or(0, |b| b.hot.capacity());
        let latest = self.latest.as_ref().map_or(0, |h| h.hot.capacity());
        self.reader.buffered() + (building + latest) * RANGE_BYTES
    }

    /// The bound on [`HintBoard::buffered_bytes`].
    pub fn max_buffered_bytes(&self) -> usize {
        MAX_FRAME_LEN + 2 * self.limits.max_ranges * RANGE_BYTES
    }

    /// Everything the board holds, fixed parts included: the frame buffer's allocation,
    /// the two free bitmaps and the error ring at its largest.
    pub fn max_memory_bytes(&self) -> usize {
        let bitmap = self.map.pages().div_ceil(64) as usize * 8;
        self.max_buffered_bytes()
            + self.reader.capacity()
            + 2 * bitmap
            + self.limits.max_errors_kept
                * (std::mem::size_of::<HintError>() + MAX_ERROR_MESSAGE_LEN)
    }

    /// Reads once from `r` (a Unix socket, a serial line) and feeds what came; returns the
    /// bytes read (0 at end of stream).
    pub fn read_from(&mut self, r: &mut impl Read) -> std::io::Result<usize> {
        let mut buf = [0u8; 16 << 10];
        let n = loop {
            match r.read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        self.feed_bytes(&buf[..n]);
        Ok(n)
    }

    /// Feeds bytes from the channel; returns how many errors they caused (see
    /// [`HintBoard::take_errors`]).
    pub fn feed_bytes(&mut self, data: &[u8]) -> usize {
        self.feed_bytes_at(data, Instant::now())
    }

    /// [`HintBoard::feed_bytes`] at a given time (for the rate limit and report age).
    pub fn feed_bytes_at(&mut self, mut data: &[u8], now: Instant) -> usize {
        self.stats.bytes += data.len() as u64;
        let before = self.stats.errors;
        loop {
            let n = self.reader.feed(data);
            data = &data[n..];
            while let Some(item) = self.reader.next_frame() {
                let result = match item {
                    Ok(msg) => self.feed_message_at(&msg, now),
                    Err(e) => {
                        if let DecodeError::Garbage { skipped } = e {
                            self.stats.garbage_bytes += skipped as u64;
                        }
                        Err(HintError::Decode(e))
                    }
                };
                if let Err(e) = result {
                    self.record(e);
                }
            }
            if data.is_empty() {
                break;
            }
        }
        (self.stats.errors - before) as usize
    }

    fn record(&mut self, e: HintError) {
        self.stats.errors += 1;
        if self.limits.max_errors_kept == 0 {
            return;
        }
        if self.errors.len() == self.limits.max_errors_kept {
            self.errors.pop_front();
        }
        self.errors.push_back(e);
    }

    /// Takes one decoded message; `Ok(true)` when it completed a report (now
    /// [`HintBoard::hints`]). Errors are returned, not recorded.
    pub fn feed_message(&mut self, msg: &Message) -> Result<bool, HintError> {
        self.feed_message_at(msg, Instant::now())
    }

    /// [`HintBoard::feed_message`] at a given time.
    pub fn feed_message_at(&mut self, msg: &Message, now: Instant) -> Result<bool, HintError> {
        self.stats.messages += 1;
        if !self.take_token(now) {
            self.stats.rate_limited += 1;
            // A report missing a part is no report: drop what was built of it.
            if let Some(b) = self.building.take() {
                self.failed_seq = Some(b.seq);
            }
            return Err(HintError::RateLimited {
                per_sec: self.limits.messages_per_sec,
                burst: self.limits.burst,
            });
        }
        match msg {
            Message::Hello(h) => self.on_hello(h).map(|()| false),
            Message::HotRanges { seq, last, ranges } => {
                self.on_ranges(RangeKind::Hot, *seq, *last, ranges, now)
            }
            Message::FreeRanges { seq, last, ranges } => {
                self.on_ranges(RangeKind::Free, *seq, *last, ranges, now)
            }
            Message::Touched(t) => {
                self.touched = Some(*t);
                Ok(false)
            }
            Message::Error { code, message } => Err(HintError::Agent {
                code: code.0,
                message: message.clone(),
            }),
            Message::PostcopyStarted => Err(HintError::WrongDirection {
                message: "PostcopyStarted",
            }),
            Message::PostcopyFinished => Err(HintError::WrongDirection {
                message: "PostcopyFinished",
            }),
            Message::ReportNow => Err(HintError::WrongDirection {
                message: "ReportNow",
            }),
        }
    }

    fn take_token(&mut self, now: Instant) -> bool {
        let rate = f64::from(self.limits.messages_per_sec);
        let cap = f64::from(self.limits.burst.max(1));
        if let Some(last) = self.refilled {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + dt * rate).min(cap);
        }
        self.refilled = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn on_hello(&mut self, h: &Hello) -> Result<(), HintError> {
        // The decoder checked magic, version, booleans and text already.
        let refused = if h.page_size as usize != PAGE_SIZE {
            Some(HintError::PageSize {
                page_size: h.page_size,
            })
        } else if h.mem_total_bytes > self.guest_bytes {
            Some(HintError::MemTotal {
                mem_total: h.mem_total_bytes,
                guest_bytes: self.guest_bytes,
            })
        } else {
            None
        };
        match refused {
            Some(e) => {
                // Reports that follow cannot be trusted either.
                self.hello = None;
                if let Some(b) = self.building.take() {
                    self.failed_seq = Some(b.seq);
                }
                Err(e)
            }
            None => {
                if let Some(b) = self.building.as_mut() {
                    // Conservative if the flag changes mid-report.
                    b.poison_on_free |= h.poison_on_free;
                }
                self.hello = Some(h.clone());
                Ok(())
            }
        }
    }

    fn on_ranges(
        &mut self,
        kind: RangeKind,
        seq: u64,
        last: bool,
        ranges: &[PfnRange],
        now: Instant,
    ) -> Result<bool, HintError> {
        if self.failed_seq == Some(seq) {
            self.stats.ignored_parts += 1;
            return Ok(false);
        }
        self.failed_seq = None;
        let result = self.add_part(kind, seq, last, ranges, now);
        if result.is_err() {
            self.building = None;
            self.failed_seq = Some(seq);
        }
        result
    }

    fn add_part(
        &mut self,
        kind: RangeKind,
        seq: u64,
        last: bool,
        ranges: &[PfnRange],
        now: Instant,
    ) -> Result<bool, HintError> {
        let Some(hello) = &self.hello else {
            return Err(HintError::NoHello { kind, seq });
        };
        let poison_on_free = hello.poison_on_free;
        let same = self
            .building
            .as_ref()
            .is_some_and(|b| b.seq == seq && b.hot_done == (kind == RangeKind::Free));
        if !same {
            if kind == RangeKind::Free {
                return Err(HintError::FreeWithoutHot { seq });
            }
            // A new report (a restarted agent starts over): what was built is dropped.
            self.building = Some(Building {
                seq,
                started: now,
                poison_on_free,
                hot_done: false,
                hot: Vec::new(),
                prev_end: [0; 2],
                ranges: [0; 2],
                free: Bitmap::new(self.map.pages()),
            });
        }
        let max = self.limits.max_ranges;
        let map = &self.map;
        let b = self.building.as_mut().expect("set above");
        let k = slot(kind);
        validate_ranges(ranges, b.prev_end[k]).map_err(|source| HintError::Ranges {
            kind,
            seq,
            source,
        })?;
        if b.ranges[k] + ranges.len() > max {
            return Err(HintError::TooManyRanges { kind, seq, max });
        }
        // Map every range before using any, so a bad part changes nothing.
        let mut mapped = Vec::with_capacity(ranges.len());
        for r in ranges {
            let pages = map
                .pages_of(r.first, r.count)
                .map_err(|bad| HintError::OutsideGuest {
                    kind,
                    seq,
                    first: r.first,
                    count: r.count,
                    bad,
                    guest_pages: map.pages(),
                })?;
            mapped.extend(pages);
        }
        match kind {
            RangeKind::Hot => {
                b.hot.reserve_exact(mapped.len());
                for r in mapped {
                    match b.hot.last_mut() {
                        Some(l) if l.end == r.start => l.end = r.end,
                        _ => b.hot.push(r),
                    }
                }
            }
            RangeKind::Free => {
                for r in &mapped {
                    if let Some(page) = first_overlap(&b.hot, r) {
                        return Err(HintError::HotFreeOverlap { seq, page });
                    }
                }
                for r in mapped {
                    for p in r {
                        b.free.set(p);
                    }
                }
            }
        }
        b.prev_end[k] = ranges.last().map_or(b.prev_end[k], PfnRange::end);
        b.ranges[k] += ranges.len();
        if !last {
            return Ok(false);
        }
        if kind == RangeKind::Hot {
            b.hot_done = true;
            return Ok(false);
        }
        let mut b = self.building.take().expect("set above");
        b.hot.shrink_to_fit();
        self.latest = Some(Hints {
            seq,
            hot: b.hot,
            free: b.free,
            poison_on_free: b.poison_on_free || poison_on_free,
            scanned_after: b.started.checked_sub(self.limits.max_scan_age),
        });
        self.stats.reports += 1;
        Ok(true)
    }
}

/// The first page of `r` inside one of `hot` (sorted, non-overlapping).
fn first_overlap(hot: &[Range<u64>], r: &Range<u64>) -> Option<u64> {
    // The first hot range ending after r.start.
    let i = hot.partition_point(|h| h.end <= r.start);
    let h = hot.get(i)?;
    (h.start < r.end).then(|| h.start.max(r.start))
}

#[cfg(test)]
mod tests;
