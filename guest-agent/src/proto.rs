//! The guest agent's wire protocol, version 1: a length-prefixed, checksummed binary framing
//! (little endian throughout) carried over a serial line, a virtio console or a Unix socket.
//!
//! The format is specified in `docs/guest-agent.md`. In short, every frame is
//!
//! ```text
//! sync:[0xF1,0x7A] type:u8 flags:u8(=0) len:u32 len_check:u32(=!len) crc:u32 payload[len]
//! ```
//!
//! where `crc` is the CRC-32 of the payload. A serial line has no message boundaries and a
//! host may attach in the middle of a frame, so the sync bytes, the length check and the
//! checksum let [`FrameReader`] find the next frame after garbage.
//!
//! Everything that decodes treats its input as untrusted: lengths are checked against hard
//! limits before anything is allocated, range lists must be sorted, non-empty,
//! non-overlapping and inside [`PFN_LIMIT`], text must be UTF-8 of bounded length, and no
//! input makes a decoder panic (a proptest feeds it arbitrary bytes).
//!
//! This module depends on nothing but `std` and `thiserror`: the host VMM links it for the
//! types, and the guest daemon links it into a static binary.

mod crc32;
mod reader;
mod report;

pub use crc32::crc32;
pub use reader::FrameReader;
pub use report::{range_messages, report_frames, RangeKind, Report, ReportAssembler, ReportError};

use thiserror::Error;

/// Identifies the protocol at the start of every [`Hello`] payload.
pub const MAGIC: [u8; 4] = *b"FLGA";
/// The protocol version this code speaks. A peer that sends another version in its
/// [`Hello`] is refused with [`DecodeError::UnsupportedVersion`].
pub const PROTOCOL_VERSION: u16 = 1;
/// The two bytes every frame starts with.
pub const FRAME_SYNC: [u8; 2] = [0xF1, 0x7A];
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 16;
/// Largest frame, header included (1 MiB). Bounds every buffer a reader keeps.
pub const MAX_FRAME_LEN: usize = 1 << 20;
/// Largest payload.
pub const MAX_PAYLOAD_LEN: usize = MAX_FRAME_LEN - HEADER_LEN;
/// Most ranges one `HotRanges` / `FreeRanges` message may carry; longer lists are split over
/// several messages of the same `seq` (see [`range_messages`]).
pub const MAX_RANGES_PER_MESSAGE: usize = 32_768;
/// Exclusive upper bound of page frame numbers: 2^52 frames of 4 KiB span the whole 64-bit
/// physical address space, so anything at or past it is nonsense from a buggy or hostile
/// peer.
pub const PFN_LIMIT: u64 = 1 << 52;
/// Most bytes of [`Hello::agent_version`].
pub const MAX_AGENT_VERSION_LEN: usize = 64;
/// Most bytes of an [`Message::Error`] message.
pub const MAX_ERROR_MESSAGE_LEN: usize = 1024;

/// A run of `count` page frames starting at frame number `first` (guest-physical address
/// `first * page_size`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PfnRange {
    /// First page frame number.
    pub first: u64,
    /// Number of frames (at least 1 on the wire).
    pub count: u64,
}

impl PfnRange {
    /// The range `first..first + count`.
    pub const fn new(first: u64, count: u64) -> PfnRange {
        PfnRange { first, count }
    }

    /// One past the last frame. Saturates instead of overflowing (a validated range never
    /// needs to).
    pub const fn end(&self) -> u64 {
        self.first.saturating_add(self.count)
    }

    /// Whether frame `pfn` lies in the range.
    pub const fn contains(&self, pfn: u64) -> bool {
        pfn >= self.first && pfn < self.end()
    }
}

/// Why a list of ranges is not acceptable.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RangeError {
    /// A range of zero frames.
    #[error("range {index} is empty")]
    Empty {
        /// Position of the range in its list.
        index: usize,
    },
    /// `first + count` overflows or passes [`PFN_LIMIT`].
    #[error("range {index} ({first}+{count}) runs past the frame limit 2^52")]
    OutOfBounds {
        /// Position of the range in its list.
        index: usize,
        /// Its first frame.
        first: u64,
        /// Its frame count.
        count: u64,
    },
    /// A range starts before the end of the one before it.
    #[error("range {index} starts at frame {first}, before the end {prev_end} of the range before it (ranges must be sorted and must not overlap)")]
    Unsorted {
        /// Position of the range in its list.
        index: usize,
        /// Its first frame.
        first: u64,
        /// End of the previous range.
        prev_end: u64,
    },
    /// More ranges than one message may carry.
    #[error("{count} ranges in one message, at most {max}")]
    TooMany {
        /// Ranges found.
        count: usize,
        /// The limit.
        max: usize,
    },
}

/// Checks that `ranges` are non-empty, sorted, non-overlapping (adjacent is allowed) and
/// below [`PFN_LIMIT`]. `prev_end` is the end of a range known to come before them (0 if
/// none), so a list split over several messages can be checked part by part.
pub fn validate_ranges(ranges: &[PfnRange], prev_end: u64) -> Result<(), RangeError> {
    let mut prev_end = prev_end;
    for (index, r) in ranges.iter().enumerate() {
        if r.count == 0 {
            return Err(RangeError::Empty { index });
        }
        match r.first.checked_add(r.count) {
            Some(end) if end <= PFN_LIMIT => {
                if r.first < prev_end {
                    return Err(RangeError::Unsorted {
                        index,
                        first: r.first,
                        prev_end,
                    });
                }
                prev_end = end;
            }
            _ => {
                return Err(RangeError::OutOfBounds {
                    index,
                    first: r.first,
                    count: r.count,
                })
            }
        }
    }
    Ok(())
}

/// The message type byte of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageType {
    /// Agent → host: who the agent is.
    Hello = 1,
    /// Agent → host: recently accessed frames.
    HotRanges = 2,
    /// Agent → host: frames free in the guest's buddy allocator.
    FreeRanges = 3,
    /// Host → agent: postcopy has begun; pre-touch.
    PostcopyStarted = 4,
    /// Host → agent: postcopy is over.
    PostcopyFinished = 5,
    /// Host → agent: send a report now.
    ReportNow = 6,
    /// Either way: something went wrong.
    Error = 7,
    /// Agent → host: pre-touching after `PostcopyStarted` is done.
    Touched = 8,
}

impl MessageType {
    /// The type for a type byte, if it is one.
    pub const fn from_u8(b: u8) -> Option<MessageType> {
        Some(match b {
            1 => MessageType::Hello,
            2 => MessageType::HotRanges,
            3 => MessageType::FreeRanges,
            4 => MessageType::PostcopyStarted,
            5 => MessageType::PostcopyFinished,
            6 => MessageType::ReportNow,
            7 => MessageType::Error,
            8 => MessageType::Touched,
            _ => return None,
        })
    }
}

/// What the agent says about itself. It is sent at start and before every report, so a host
/// that attaches to the serial line late learns it with the next report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version ([`PROTOCOL_VERSION`]).
    pub version: u16,
    /// The agent's software version (at most [`MAX_AGENT_VERSION_LEN`] bytes of UTF-8).
    pub agent_version: String,
    /// The guest's page size in bytes; frame numbers count pages of this size.
    pub page_size: u32,
    /// Whether the guest kernel overwrites pages when it frees them (`init_on_free=1` or
    /// `page_poison=1`), so free pages hold no stale data. See `docs/guest-agent.md` for
    /// exactly what is checked.
    pub poison_on_free: bool,
    /// `MemTotal` of the guest, in bytes.
    pub mem_total_bytes: u64,
}

/// What pre-touching did, sent once it is over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TouchReport {
    /// Processes whose memory was touched.
    pub processes: u32,
    /// Pages read successfully.
    pub pages: u64,
    /// Pages that could not be read (unmapped meanwhile, process gone).
    pub failed_pages: u64,
    /// Wall-clock time from `PostcopyStarted` to the end of touching, in milliseconds.
    pub elapsed_ms: u64,
}

/// Well-known [`Message::Error`] codes. Other values may appear (from newer peers) and mean
/// "some error".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    /// A frame could not be decoded.
    pub const MALFORMED: ErrorCode = ErrorCode(1);
    /// The peer speaks another protocol version.
    pub const UNSUPPORTED_VERSION: ErrorCode = ErrorCode(2);
    /// A message this side does not accept (wrong direction, unknown type).
    pub const UNEXPECTED: ErrorCode = ErrorCode(3);
    /// Scanning guest memory failed.
    pub const SCAN_FAILED: ErrorCode = ErrorCode(4);
    /// Pre-touching failed.
    pub const TOUCH_FAILED: ErrorCode = ErrorCode(5);
    /// Any other failure.
    pub const INTERNAL: ErrorCode = ErrorCode(6);
}

/// One protocol message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Agent → host, see [`Hello`].
    Hello(Hello),
    /// Agent → host: frames accessed in the last scan interval. A report may span several
    /// messages with the same `seq`; `last` marks the final one, and the ranges of later
    /// parts start after those of earlier parts.
    HotRanges {
        /// Report number, shared by the hot and free parts of one report.
        seq: u64,
        /// Whether this is the report's final part.
        last: bool,
        /// Sorted, non-overlapping, non-empty ranges.
        ranges: Vec<PfnRange>,
    },
    /// Agent → host: frames free in the guest's buddy allocator (same rules as
    /// [`Message::HotRanges`]). Advisory: a page can be allocated right after the scan.
    FreeRanges {
        /// Report number.
        seq: u64,
        /// Whether this is the report's final part.
        last: bool,
        /// Sorted, non-overlapping, non-empty ranges.
        ranges: Vec<PfnRange>,
    },
    /// Host → agent: postcopy has begun (the agent pre-touches and answers
    /// [`Message::Touched`]).
    PostcopyStarted,
    /// Host → agent: postcopy is over.
    PostcopyFinished,
    /// Host → agent: send a report now.
    ReportNow,
    /// Agent → host: pre-touching is done.
    Touched(TouchReport),
    /// Either way: an error the peer should know about.
    Error {
        /// What kind of error ([`ErrorCode`] constants).
        code: ErrorCode,
        /// Human-readable detail (at most [`MAX_ERROR_MESSAGE_LEN`] bytes of UTF-8).
        message: String,
    },
}

impl Message {
    /// The type byte this message is sent with.
    pub fn message_type(&self) -> MessageType {
        match self {
            Message::Hello(_) => MessageType::Hello,
            Message::HotRanges { .. } => MessageType::HotRanges,
            Message::FreeRanges { .. } => MessageType::FreeRanges,
            Message::PostcopyStarted => MessageType::PostcopyStarted,
            Message::PostcopyFinished => MessageType::PostcopyFinished,
            Message::ReportNow => MessageType::ReportNow,
            Message::Touched(_) => MessageType::Touched,
            Message::Error { .. } => MessageType::Error,
        }
    }

    /// An error message, its text cut (at a character boundary) to the allowed length.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Message {
        let mut message = message.into();
        if message.len() > MAX_ERROR_MESSAGE_LEN {
            let mut cut = MAX_ERROR_MESSAGE_LEN;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Message::Error { code, message }
    }
}

/// Why a message cannot be encoded.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum EncodeError {
    /// The range list breaks the rules.
    #[error("invalid ranges")]
    Ranges(#[from] RangeError),
    /// A text field is too long.
    #[error("{field} is {len} bytes, at most {max}")]
    TextTooLong {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Why bytes are not a valid frame or message.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The buffer ends before the frame does ([`decode_frame`] only).
    #[error("incomplete frame: {needed} more bytes needed")]
    Incomplete {
        /// Bytes missing (at least).
        needed: usize,
    },
    /// Bytes that are not the start of a frame were dropped ([`FrameReader`] only).
    #[error("skipped {skipped} bytes of garbage looking for a frame")]
    Garbage {
        /// How many.
        skipped: usize,
    },
    /// The frame does not begin with [`FRAME_SYNC`].
    #[error("bad frame sync {0:02x?}")]
    BadSync([u8; 2]),
    /// `len_check` is not the complement of `len`.
    #[error("frame header check failed (length {len:#x}, check {check:#x})")]
    BadHeaderCheck {
        /// The length field.
        len: u32,
        /// The check field.
        check: u32,
    },
    /// Reserved flag bits are set.
    #[error("reserved frame flags {0:#04x} set")]
    ReservedFlags(u8),
    /// The payload is longer than [`MAX_PAYLOAD_LEN`].
    #[error("frame payload of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        /// Claimed payload length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The payload's CRC-32 does not match the header.
    #[error("payload checksum {actual:#010x} does not match the header's {expected:#010x}")]
    BadChecksum {
        /// From the header.
        expected: u32,
        /// Of the payload received.
        actual: u32,
    },
    /// A type byte no message has.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// The payload is shorter or longer than its message needs.
    #[error("{len}-byte payload is malformed for message type {msg_type}")]
    BadLength {
        /// The message type byte.
        msg_type: u8,
        /// The payload length.
        len: usize,
    },
    /// A Hello without [`MAGIC`].
    #[error("bad magic {0:02x?} in Hello")]
    BadMagic([u8; 4]),
    /// A Hello of another protocol version.
    #[error("protocol version {version} not supported (this side speaks {supported})")]
    UnsupportedVersion {
        /// The peer's version.
        version: u16,
        /// Ours.
        supported: u16,
    },
    /// A boolean byte other than 0 or 1.
    #[error("{field} must be 0 or 1, got {value}")]
    BadBool {
        /// Which field.
        field: &'static str,
        /// The byte.
        value: u8,
    },
    /// The range list breaks the rules.
    #[error("invalid ranges")]
    Ranges(#[from] RangeError),
    /// A text field is too long.
    #[error("{field} is {len} bytes, at most {max}")]
    TextTooLong {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A text field is not UTF-8.
    #[error("{field} is not valid UTF-8")]
    BadUtf8 {
        /// Which field.
        field: &'static str,
    },
}

impl DecodeError {
    /// The [`ErrorCode`] to answer this error with.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::UnsupportedVersion { .. } => ErrorCode::UNSUPPORTED_VERSION,
            DecodeError::UnknownType(_) => ErrorCode::UNEXPECTED,
            _ => ErrorCode::MALFORMED,
        }
    }
}

/// Encodes `msg` as one frame.
pub fn encode(msg: &Message) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    encode_into(msg, &mut out)?;
    Ok(out)
}

/// Appends the frame of `msg` to `out` (on error `out` is left as it was).
pub fn encode_into(msg: &Message, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    if let Err(e) = encode_payload(msg, out) {
        out.truncate(start);
        return Err(e);
    }
    let len = out.len() - start - HEADER_LEN;
    // Guaranteed by the limits on ranges and text; checked so a future field cannot
    // silently produce a frame the peer must refuse.
    debug_assert!(len <= MAX_PAYLOAD_LEN);
    let len32 = len as u32;
    let crc = crc32(&out[start + HEADER_LEN..]);
    let h = &mut out[start..start + HEADER_LEN];
    h[0..2].copy_from_slice(&FRAME_SYNC);
    h[2] = msg.message_type() as u8;
    h[3] = 0;
    h[4..8].copy_from_slice(&len32.to_le_bytes());
    h[8..12].copy_from_slice(&(!len32).to_le_bytes());
    h[12..16].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

fn check_text(field: &'static str, s: &str, max: usize) -> Result<(), EncodeError> {
    if s.len() > max {
        return Err(EncodeError::TextTooLong {
            field,
            len: s.len(),
            max,
        });
    }
    Ok(())
}

fn encode_ranges(
    seq: u64,
    last: bool,
    ranges: &[PfnRange],
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    if ranges.len() > MAX_RANGES_PER_MESSAGE {
        return Err(RangeError::TooMany {
            count: ranges.len(),
            max: MAX_RANGES_PER_MESSAGE,
        }
        .into());
    }
    validate_ranges(ranges, 0)?;
    out.reserve(13 + 16 * ranges.len());
    out.extend_from_slice(&seq.to_le_bytes());
    out.push(last as u8);
    out.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
    for r in ranges {
        out.extend_from_slice(&r.first.to_le_bytes());
        out.extend_from_slice(&r.count.to_le_bytes());
    }
    Ok(())
}

fn encode_payload(msg: &Message, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    match msg {
        Message::Hello(h) => {
            check_text("agent_version", &h.agent_version, MAX_AGENT_VERSION_LEN)?;
            out.extend_from_slice(&MAGIC);
            out.extend_from_slice(&h.version.to_le_bytes());
            out.extend_from_slice(&h.page_size.to_le_bytes());
            out.push(h.poison_on_free as u8);
            out.extend_from_slice(&h.mem_total_bytes.to_le_bytes());
            out.push(h.agent_version.len() as u8);
            out.extend_from_slice(h.agent_version.as_bytes());
        }
        Message::HotRanges { seq, last, ranges } | Message::FreeRanges { seq, last, ranges } => {
            encode_ranges(*seq, *last, ranges, out)?
        }
        Message::PostcopyStarted | Message::PostcopyFinished | Message::ReportNow => {}
        Message::Touched(t) => {
            out.extend_from_slice(&t.processes.to_le_bytes());
            out.extend_from_slice(&t.pages.to_le_bytes());
            out.extend_from_slice(&t.failed_pages.to_le_bytes());
            out.extend_from_slice(&t.elapsed_ms.to_le_bytes());
        }
        Message::Error { code, message } => {
            check_text("error message", message, MAX_ERROR_MESSAGE_LEN)?;
            out.extend_from_slice(&code.0.to_le_bytes());
            out.extend_from_slice(&(message.len() as u16).to_le_bytes());
            out.extend_from_slice(message.as_bytes());
        }
    }
    Ok(())
}

/// A parsed frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FrameHeader {
    pub msg_type: u8,
    pub len: usize,
    pub crc: u32,
}

/// Parses and checks the [`HEADER_LEN`] bytes of a frame header.
pub(crate) fn parse_header(h: &[u8; HEADER_LEN]) -> Result<FrameHeader, DecodeError> {
    if h[0..2] != FRAME_SYNC {
        return Err(DecodeError::BadSync([h[0], h[1]]));
    }
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    let check = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if check != !len {
        return Err(DecodeError::BadHeaderCheck { len, check });
    }
    if h[3] != 0 {
        return Err(DecodeError::ReservedFlags(h[3]));
    }
    let len = len as usize;
    if len > MAX_PAYLOAD_LEN {
        return Err(DecodeError::FrameTooLarge {
            len,
            max: MAX_PAYLOAD_LEN,
        });
    }
    Ok(FrameHeader {
        msg_type: h[2],
        len,
        crc: u32::from_le_bytes([h[12], h[13], h[14], h[15]]),
    })
}

/// Decodes the frame at the start of `buf`, returning the message and the bytes it took.
/// Fails with [`DecodeError::Incomplete`] if `buf` holds only part of a frame; garbage
/// before a frame is an error here (use [`FrameReader`] on a byte stream).
pub fn decode_frame(buf: &[u8]) -> Result<(Message, usize), DecodeError> {
    let Some(h) = buf.first_chunk::<HEADER_LEN>() else {
        // Check what there is, so garbage is reported as such rather than as "incomplete".
        if !buf.iter().zip(FRAME_SYNC.iter()).all(|(a, b)| a == b) {
            let at = |i: usize| buf.get(i).copied().unwrap_or(0);
            return Err(DecodeError::BadSync([at(0), at(1)]));
        }
        return Err(DecodeError::Incomplete {
            needed: HEADER_LEN - buf.len(),
        });
    };
    let header = parse_header(h)?;
    let total = HEADER_LEN + header.len;
    if buf.len() < total {
        return Err(DecodeError::Incomplete {
            needed: total - buf.len(),
        });
    }
    let payload = &buf[HEADER_LEN..total];
    let actual = crc32(payload);
    if actual != header.crc {
        return Err(DecodeError::BadChecksum {
            expected: header.crc,
            actual,
        });
    }
    Ok((decode_payload(header.msg_type, payload)?, total))
}

/// Reads little-endian fields off a payload; running out is a [`DecodeError::BadLength`].
struct Cursor<'a> {
    buf: &'a [u8],
    msg_type: u8,
    len: usize,
}

impl<'a> Cursor<'a> {
    fn new(msg_type: u8, buf: &'a [u8]) -> Cursor<'a> {
        Cursor {
            buf,
            msg_type,
            len: buf.len(),
        }
    }

    fn bad_length(&self) -> DecodeError {
        DecodeError::BadLength {
            msg_type: self.msg_type,
            len: self.len,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(self.bad_length());
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(DecodeError::BadBool { field, value }),
        }
    }

    fn text(&mut self, field: &'static str, len: usize, max: usize) -> Result<String, DecodeError> {
        if len > max {
            return Err(DecodeError::TextTooLong { field, len, max });
        }
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::BadUtf8 { field })
    }

    fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.bad_length())
        }
    }
}

fn decode_ranges(c: &mut Cursor<'_>) -> Result<(u64, bool, Vec<PfnRange>), DecodeError> {
    let seq = c.u64()?;
    let last = c.bool("last")?;
    let count = c.u32()? as usize;
    if count > MAX_RANGES_PER_MESSAGE {
        return Err(RangeError::TooMany {
            count,
            max: MAX_RANGES_PER_MESSAGE,
        }
        .into());
    }
    // Check the length before allocating: a lying count must not reserve memory.
    if c.buf.len() != count * 16 {
        return Err(c.bad_length());
    }
    let mut ranges = Vec::with_capacity(count);
    for _ in 0..count {
        ranges.push(PfnRange::new(c.u64()?, c.u64()?));
    }
    validate_ranges(&ranges, 0)?;
    Ok((seq, last, ranges))
}

/// Decodes the payload of a frame of type `msg_type` (already unframed and checksummed).
pub fn decode_payload(msg_type: u8, payload: &[u8]) -> Result<Message, DecodeError> {
    let ty = MessageType::from_u8(msg_type).ok_or(DecodeError::UnknownType(msg_type))?;
    let mut c = Cursor::new(msg_type, payload);
    let msg = match ty {
        MessageType::Hello => {
            let magic = c.array::<4>()?;
            if magic != MAGIC {
                return Err(DecodeError::BadMagic(magic));
            }
            // The version comes right after the magic in every version, so a peer can
            // always tell which version it is talking to even if the rest changed.
            let version = c.u16()?;
            if version != PROTOCOL_VERSION {
                return Err(DecodeError::UnsupportedVersion {
                    version,
                    supported: PROTOCOL_VERSION,
                });
            }
            let page_size = c.u32()?;
            let poison_on_free = c.bool("poison_on_free")?;
            let mem_total_bytes = c.u64()?;
            let n = c.u8()? as usize;
            let agent_version = c.text("agent_version", n, MAX_AGENT_VERSION_LEN)?;
            Message::Hello(Hello {
                version,
                agent_version,
                page_size,
                poison_on_free,
                mem_total_bytes,
            })
        }
        MessageType::HotRanges => {
            let (seq, last, ranges) = decode_ranges(&mut c)?;
            Message::HotRanges { seq, last, ranges }
        }
        MessageType::FreeRanges => {
            let (seq, last, ranges) = decode_ranges(&mut c)?;
            Message::FreeRanges { seq, last, ranges }
        }
        MessageType::PostcopyStarted => Message::PostcopyStarted,
        MessageType::PostcopyFinished => Message::PostcopyFinished,
        MessageType::ReportNow => Message::ReportNow,
        MessageType::Touched => Message::Touched(TouchReport {
            processes: c.u32()?,
            pages: c.u64()?,
            failed_pages: c.u64()?,
            elapsed_ms: c.u64()?,
        }),
        MessageType::Error => {
            let code = ErrorCode(c.u16()?);
            let n = c.u16()? as usize;
            let message = c.text("error message", n, MAX_ERROR_MESSAGE_LEN)?;
            Message::Error { code, message }
        }
    };
    c.finish()?;
    Ok(msg)
}

#[cfg(test)]
mod tests;
