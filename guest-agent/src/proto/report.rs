//! Reports split over several messages: [`range_messages`] splits, [`ReportAssembler`]
//! joins and checks.

use thiserror::Error;

use super::{
    encode_into, validate_ranges, EncodeError, Hello, Message, PfnRange, RangeError,
    MAX_RANGES_PER_MESSAGE,
};

/// Which of the two range lists of a report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RangeKind {
    /// [`Message::HotRanges`].
    Hot,
    /// [`Message::FreeRanges`].
    Free,
}

/// The messages that carry `ranges` (sorted, non-overlapping, non-empty) as report `seq`,
/// at most `per_message` ranges each (clamped to 1..=[`MAX_RANGES_PER_MESSAGE`]). An empty
/// list is still one message, so the host learns the report is complete.
pub fn range_messages(
    kind: RangeKind,
    seq: u64,
    ranges: &[PfnRange],
    per_message: usize,
) -> Vec<Message> {
    let per = per_message.clamp(1, MAX_RANGES_PER_MESSAGE);
    let parts = ranges.len().div_ceil(per).max(1);
    (0..parts)
        .map(|i| {
            let chunk =
                ranges[(i * per).min(ranges.len())..((i + 1) * per).min(ranges.len())].to_vec();
            let last = i + 1 == parts;
            match kind {
                RangeKind::Hot => Message::HotRanges {
                    seq,
                    last,
                    ranges: chunk,
                },
                RangeKind::Free => Message::FreeRanges {
                    seq,
                    last,
                    ranges: chunk,
                },
            }
        })
        .collect()
}

/// A whole report as the frames an agent writes: `hello`, then report `seq`'s hot and free
/// ranges, at most `per_message` ranges per message. Ranges that break the protocol's rules
/// (unsorted, overlapping, empty) are refused, and nothing is returned for them.
pub fn report_frames(
    hello: &Hello,
    seq: u64,
    hot: &[PfnRange],
    free: &[PfnRange],
    per_message: usize,
) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    encode_into(&Message::Hello(hello.clone()), &mut out)?;
    for (kind, ranges) in [(RangeKind::Hot, hot), (RangeKind::Free, free)] {
        for m in range_messages(kind, seq, ranges, per_message) {
            encode_into(&m, &mut out)?;
        }
    }
    Ok(out)
}

/// A complete range list of one report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// Hot or free.
    pub kind: RangeKind,
    /// The report number.
    pub seq: u64,
    /// All its ranges, sorted and non-overlapping across parts.
    pub ranges: Vec<PfnRange>,
}

/// Why the parts of a report do not join.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ReportError {
    /// A part's ranges overlap or precede those of the parts before it.
    #[error("part of {kind:?} report {seq} is out of order")]
    Ranges {
        /// Hot or free.
        kind: RangeKind,
        /// The report number.
        seq: u64,
        /// What is wrong.
        source: RangeError,
    },
    /// The report has more ranges than the assembler accepts.
    #[error("{kind:?} report {seq} has more than {max} ranges")]
    TooManyRanges {
        /// Hot or free.
        kind: RangeKind,
        /// The report number.
        seq: u64,
        /// The limit.
        max: usize,
    },
}

#[derive(Debug, Default)]
struct Partial {
    seq: Option<u64>,
    ranges: Vec<PfnRange>,
}

/// Joins the parts of hot and free reports (host side), checking that parts continue in
/// order and that a report stays under a bound on ranges, so a hostile guest cannot make
/// the host buffer without limit. A part with a new `seq` abandons an unfinished report of
/// the same kind (a restarted agent begins again); a part of a report that failed is
/// ignored until the next `seq`.
#[derive(Debug)]
pub struct ReportAssembler {
    max_ranges: usize,
    hot: Partial,
    free: Partial,
    failed: [Option<u64>; 2],
}

impl ReportAssembler {
    /// An assembler that refuses reports of more than `max_ranges` ranges.
    pub fn new(max_ranges: usize) -> ReportAssembler {
        ReportAssembler {
            max_ranges,
            hot: Partial::default(),
            free: Partial::default(),
            failed: [None; 2],
        }
    }

    /// Takes one message: returns the report it completes, if any. Messages other than
    /// `HotRanges` / `FreeRanges` are ignored (`Ok(None)`).
    pub fn push(&mut self, msg: &Message) -> Result<Option<Report>, ReportError> {
        let (kind, seq, last, ranges) = match msg {
            Message::HotRanges { seq, last, ranges } => (RangeKind::Hot, *seq, *last, ranges),
            Message::FreeRanges { seq, last, ranges } => (RangeKind::Free, *seq, *last, ranges),
            _ => return Ok(None),
        };
        let slot = kind as usize;
        if self.failed[slot] == Some(seq) {
            return Ok(None);
        }
        self.failed[slot] = None;
        let max = self.max_ranges;
        let partial = match kind {
            RangeKind::Hot => &mut self.hot,
            RangeKind::Free => &mut self.free,
        };
        if partial.seq != Some(seq) {
            partial.seq = Some(seq);
            partial.ranges.clear();
        }
        let prev_end = partial.ranges.last().map_or(0, PfnRange::end);
        let result = if let Err(source) = validate_ranges(ranges, prev_end) {
            Err(ReportError::Ranges { kind, seq, source })
        } else if partial.ranges.len() + ranges.len() > max {
            Err(ReportError::TooManyRanges { kind, seq, max })
        } else {
            Ok(())
        };
        if let Err(e) = result {
            *partial = Partial::default();
            self.failed[slot] = Some(seq);
            return Err(e);
        }
        partial.ranges.extend_from_slice(ranges);
        if !last {
            return Ok(None);
        }
        let ranges = std::mem::take(&mut partial.ranges);
        partial.seq = None;
        Ok(Some(Report { kind, seq, ranges }))
    }
}
