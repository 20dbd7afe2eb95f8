//! Binary framing of [`Message`]s.
//!
//! A frame is `len: u32 LE | type: u8 | body`, where `len` counts the type byte and the body.
//! All integers are little endian. Decoders check every length against the bytes present and
//! against protocol limits before allocating, and return [`CodecError`] instead of panicking.

use bytes::{Buf, Bytes};
use thiserror::Error;

use crate::message::{
    DiskDesc, ErrorCode, Layout, Message, PageKind, Pages, RegionDesc, SessionKind, SetKind,
    MAX_ACKS, MAX_DISKS, MAX_PAGES_PER_MESSAGE, MAX_REGIONS, MAX_REQUEST_PAGES, MAX_SET_WORDS,
    MAX_STATE, MAX_TEXT, MAX_ZERO_RUN, PAGE_SIZE,
};

/// Bytes of the frame header (`len` and `type`).
pub const HEADER_LEN: usize = 5;

/// Largest `len` accepted: a full `Pages` message plus its kinds and header fields.
pub const MAX_FRAME_LEN: usize = 1 + 8 + 2 + MAX_PAGES_PER_MESSAGE * (1 + 8 + PAGE_SIZE);

const T_HELLO: u8 = 1;
const T_HELLO_ACK: u8 = 2;
const T_REQUEST: u8 = 3;
const T_PAGES: u8 = 4;
const T_PUSH_DONE: u8 = 5;
const T_COMPLETE: u8 = 6;
const T_COMPLETE_ACK: u8 = 7;
const T_ERROR: u8 = 8;
const T_UPDATE: u8 = 9;
const T_ACK: u8 = 10;
const T_PAGE_SET: u8 = 11;
const T_VM_STATE: u8 = 12;
const T_RESUME: u8 = 13;
const T_RESUME_ACK: u8 = 14;
/// A `Pages` message of zero pages only, as `first: u64 | count: u32`, for zero runs
/// longer than [`MAX_PAGES_PER_MESSAGE`] and at most [`MAX_ZERO_RUN`] pages (which only a
/// source that negotiated [`crate::message::FEATURE_ZERO_RUNS`] builds). Shorter runs keep
/// the `Pages` form that every peer reads, and only that one is accepted for them, so each
/// message has one encoding.
const T_ZERO_RUN: u8 = 15;

/// Why bytes are not a valid frame. A session that receives one fails and tells the peer
/// with [`ErrorCode::Malformed`].
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CodecError {
    /// The header's `len` (the value) is above [`MAX_FRAME_LEN`].
    #[error("frame length {0} exceeds the limit of {MAX_FRAME_LEN} bytes")]
    FrameTooLong(usize),
    /// The header's `len` is 0; a frame holds at least its type byte.
    #[error("empty frame")]
    EmptyFrame,
    /// The type byte (the value) names no message.
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    /// The body of the named message ends before its last field.
    #[error("{0} message truncated")]
    Truncated(&'static str),
    /// The body of the named message goes on after its last field, by this many bytes.
    #[error("{0} message has {1} trailing bytes")]
    Trailing(&'static str, usize),
    /// A count or length outside its protocol limit (also a `Pages` count of 0 and an lz4
    /// block length of 0).
    #[error("{what}: {value} exceeds the limit of {limit}")]
    Limit {
        /// What was counted.
        what: &'static str,
        /// The value received.
        value: usize,
        /// The largest value accepted.
        limit: usize,
    },
    /// A page kind byte that is unknown, or not allowed where it is (lz4 and references in
    /// an `Update`).
    #[error("invalid page kind {0}")]
    BadPageKind(u8),
    /// A text field (VM id, error text) is not valid UTF-8.
    #[error("text field is not UTF-8")]
    BadText,
    /// `first + count` of a page run overflows `u64`.
    #[error("page index overflows")]
    PageOverflow,
    /// The `Hello`'s session kind byte (the value) is unknown.
    #[error("unknown session kind {0}")]
    BadSessionKind(u8),
    /// A `PageSet`'s set kind byte (the value) is unknown.
    #[error("unknown page set kind {0}")]
    BadSetKind(u8),
    /// An `Update` gave a page version 0, which is reserved for "nothing stored".
    #[error("version 0 is reserved for 'nothing stored'")]
    ZeroVersion,
    /// A `ZeroRun` frame of this many pages, which a `Pages` message carries: each message
    /// has one encoding, so the decoder refuses the other.
    #[error("a zero run of {0} pages must be sent as a Pages message")]
    ShortZeroRun(usize),
}

/// Appends the frame of `msg` to `out`.
pub fn encode(msg: &Message, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    match msg {
        Message::Hello {
            version,
            kind,
            vm_id,
            layout,
            features,
            epoch,
            session_id,
        } => {
            out.push(T_HELLO);
            out.extend_from_slice(&version.to_le_bytes());
            out.push(*kind as u8);
            out.extend_from_slice(&features.to_le_bytes());
            out.extend_from_slice(&epoch.to_le_bytes());
            out.extend_from_slice(&session_id.to_le_bytes());
            put_text(out, vm_id);
            out.extend_from_slice(&layout.page_size.to_le_bytes());
            out.extend_from_slice(&(layout.regions.len() as u16).to_le_bytes());
            for r in &layout.regions {
                out.extend_from_slice(&r.guest_addr.to_le_bytes());
                out.extend_from_slice(&r.len.to_le_bytes());
            }
            out.extend_from_slice(&(layout.disks.len() as u16).to_le_bytes());
            for d in &layout.disks {
                put_text(out, &d.name);
                out.extend_from_slice(&d.len.to_le_bytes());
            }
        }
        Message::HelloAck {
            version,
            features,
            conn_epoch,
        } => {
            out.push(T_HELLO_ACK);
            out.extend_from_slice(&version.to_le_bytes());
            out.extend_from_slice(&features.to_le_bytes());
            out.extend_from_slice(&conn_epoch.to_le_bytes());
        }
        Message::Resume {
            session_id,
            conn_epoch,
            features,
            pages,
            checksum,
        } => {
            out.push(T_RESUME);
            out.extend_from_slice(&session_id.to_le_bytes());
            out.extend_from_slice(&conn_epoch.to_le_bytes());
            out.extend_from_slice(&features.to_le_bytes());
            out.extend_from_slice(&pages.to_le_bytes());
            out.extend_from_slice(&checksum.to_le_bytes());
        }
        Message::ResumeAck { conn_epoch } => {
            out.push(T_RESUME_ACK);
            out.extend_from_slice(&conn_epoch.to_le_bytes());
        }
        Message::Request { pages, pushed_read } => {
            out.push(T_REQUEST);
            out.extend_from_slice(&pushed_read.to_le_bytes());
            out.extend_from_slice(&(pages.len() as u32).to_le_bytes());
            for p in pages {
                out.extend_from_slice(&p.to_le_bytes());
            }
        }
        Message::Pages(p) if p.count() > MAX_PAGES_PER_MESSAGE && p.is_zero_run() => {
            out.push(T_ZERO_RUN);
            out.extend_from_slice(&p.first.to_le_bytes());
            out.extend_from_slice(&(p.count() as u32).to_le_bytes());
        }
        Message::Pages(p) => {
            out.push(T_PAGES);
            encode_pages_body(p, out);
        }
        Message::Update { pages, versions } => {
            out.push(T_UPDATE);
            out.extend_from_slice(&pages.first.to_le_bytes());
            out.extend_from_slice(&(pages.kinds.len() as u16).to_le_bytes());
            for v in versions {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&pages.kinds);
            out.extend_from_slice(&pages.payload);
        }
        Message::Ack { entries } => {
            out.push(T_ACK);
            out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
            for (p, v) in entries {
                out.extend_from_slice(&p.to_le_bytes());
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        Message::PageSet {
            kind,
            first_word,
            words,
            last,
        } => {
            out.push(T_PAGE_SET);
            out.push(*kind as u8);
            out.push(u8::from(*last));
            out.extend_from_slice(&first_word.to_le_bytes());
            out.extend_from_slice(&(words.len() as u32).to_le_bytes());
            for w in words {
                out.extend_from_slice(&w.to_le_bytes());
            }
        }
        Message::VmState { blob } => {
            out.push(T_VM_STATE);
            out.extend_from_slice(&(blob.len() as u32).to_le_bytes());
            out.extend_from_slice(blob);
        }
        Message::PushDone { pages_sent } => {
            out.push(T_PUSH_DONE);
            out.extend_from_slice(&pages_sent.to_le_bytes());
        }
        Message::Complete { pages_received } => {
            out.push(T_COMPLETE);
            out.extend_from_slice(&pages_received.to_le_bytes());
        }
        Message::CompleteAck => out.push(T_COMPLETE_ACK),
        Message::Error { code, message } => {
            out.push(T_ERROR);
            out.extend_from_slice(&(*code as u16).to_le_bytes());
            put_text(out, message);
        }
    }
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

fn encode_pages_body(p: &Pages, out: &mut Vec<u8>) {
    out.extend_from_slice(&p.first.to_le_bytes());
    out.extend_from_slice(&(p.kinds.len() as u16).to_le_bytes());
    out.extend_from_slice(&p.kinds);
    out.extend_from_slice(&p.payload);
}

/// The length of the frame [`encode`] makes of `Message::Pages(pages)`, without encoding
/// it: [`Pages::wire_len`] and the frame's header.
pub fn pages_frame_len(pages: &Pages) -> u64 {
    if pages.count() > MAX_PAGES_PER_MESSAGE && pages.is_zero_run() {
        // Length, type, first page, count (u32).
        pages.wire_len() + 5
    } else {
        // Length, type, first page, count (u16).
        pages.wire_len() + 15
    }
}

/// Encodes `msg` into a fresh buffer.
pub fn encode_to_vec(msg: &Message) -> Vec<u8> {
    let mut v = Vec::new();
    encode(msg, &mut v);
    v
}

fn put_text(out: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(MAX_TEXT)];
    // Never cut inside a UTF-8 sequence.
    let mut end = b.len();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_le_bytes());
    out.extend_from_slice(&b[..end]);
}

/// Parses a frame header into the message type and the length of the body that follows it.
/// A `len` of 0 or above [`MAX_FRAME_LEN`] is an error, found before the body is read.
pub fn decode_header(header: [u8; HEADER_LEN]) -> Result<(u8, usize), CodecError> {
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len == 0 {
        return Err(CodecError::EmptyFrame);
    }
    if len > MAX_FRAME_LEN {
        return Err(CodecError::FrameTooLong(len));
    }
    Ok((header[4], len - 1))
}

/// Decodes one frame from the front of `buf`. Returns `Ok(None)` when more bytes are needed,
/// and otherwise the message and how many bytes it used.
pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, CodecError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let mut header = [0u8; HEADER_LEN];
    header.copy_from_slice(&buf[..HEADER_LEN]);
    let (ty, body_len) = decode_header(header)?;
    let Some(body) = buf.get(HEADER_LEN..HEADER_LEN + body_len) else {
        return Ok(None);
    };
    let msg = decode_body(ty, Bytes::copy_from_slice(body))?;
    Ok(Some((msg, HEADER_LEN + body_len)))
}

/// Decodes the body of a frame of type `ty`. `Pages` payloads are sliced from `body`
/// without copying.
pub fn decode_body(ty: u8, mut body: Bytes) -> Result<Message, CodecError> {
    let msg = match ty {
        T_HELLO => {
            const W: &str = "Hello";
            let version = get_u16(&mut body, W)?;
            let k = get_u8(&mut body, W)?;
            let kind = SessionKind::from_u8(k).ok_or(CodecError::BadSessionKind(k))?;
            let features = get_u64(&mut body, W)?;
            let epoch = get_u64(&mut body, W)?;
            let session_id = get_u128(&mut body, W)?;
            let vm_id = get_text(&mut body, W)?;
            let page_size = get_u32(&mut body, W)?;
            let n = get_u16(&mut body, W)? as usize;
            if n > MAX_REGIONS {
                return Err(CodecError::Limit {
                    what: "regions",
                    value: n,
                    limit: MAX_REGIONS,
                });
            }
            let mut regions = Vec::with_capacity(n);
            for _ in 0..n {
                regions.push(RegionDesc {
                    guest_addr: get_u64(&mut body, W)?,
                    len: get_u64(&mut body, W)?,
                });
            }
            let n = get_u16(&mut body, W)? as usize;
            if n > MAX_DISKS {
                return Err(CodecError::Limit {
                    what: "disks",
                    value: n,
                    limit: MAX_DISKS,
                });
            }
            let mut disks = Vec::with_capacity(n);
            for _ in 0..n {
                disks.push(DiskDesc {
                    name: get_text(&mut body, W)?,
                    len: get_u64(&mut body, W)?,
                });
            }
            finish(&body, W)?;
            Message::Hello {
                version,
                kind,
                vm_id,
                layout: Layout {
                    page_size,
                    regions,
                    disks,
                },
                features,
                epoch,
                session_id,
            }
        }
        T_HELLO_ACK => {
            const W: &str = "HelloAck";
            let version = get_u16(&mut body, W)?;
            let features = get_u64(&mut body, W)?;
            let conn_epoch = get_u32(&mut body, W)?;
            finish(&body, W)?;
            Message::HelloAck {
                version,
                features,
                conn_epoch,
            }
        }
        T_RESUME => {
            const W: &str = "Resume";
            let session_id = get_u128(&mut body, W)?;
            let conn_epoch = get_u32(&mut body, W)?;
            let features = get_u64(&mut body, W)?;
            let pages = get_u64(&mut body, W)?;
            let checksum = get_u64(&mut body, W)?;
            finish(&body, W)?;
            Message::Resume {
                session_id,
                conn_epoch,
                features,
                pages,
                checksum,
            }
        }
        T_RESUME_ACK => {
            const W: &str = "ResumeAck";
            let conn_epoch = get_u32(&mut body, W)?;
            finish(&body, W)?;
            Message::ResumeAck { conn_epoch }
        }
        T_REQUEST => {
            const W: &str = "Request";
            let pushed_read = get_u64(&mut body, W)?;
            let n = get_u32(&mut body, W)? as usize;
            if n > MAX_REQUEST_PAGES {
                return Err(CodecError::Limit {
                    what: "requested pages",
                    value: n,
                    limit: MAX_REQUEST_PAGES,
                });
            }
            if body.remaining() < n * 8 {
                return Err(CodecError::Truncated(W));
            }
            let pages = (0..n).map(|_| body.get_u64_le()).collect();
            finish(&body, W)?;
            Message::Request { pages, pushed_read }
        }
        T_PAGES => Message::Pages(decode_pages(body, false)?.0),
        T_ZERO_RUN => {
            const W: &str = "ZeroRun";
            let first = get_u64(&mut body, W)?;
            let count = get_u32(&mut body, W)? as usize;
            finish(&body, W)?;
            if count == 0 || count > MAX_ZERO_RUN {
                return Err(CodecError::Limit {
                    what: "pages in one zero run",
                    value: count,
                    limit: MAX_ZERO_RUN,
                });
            }
            if count <= MAX_PAGES_PER_MESSAGE {
                return Err(CodecError::ShortZeroRun(count));
            }
            if first.checked_add(count as u64).is_none() {
                return Err(CodecError::PageOverflow);
            }
            Message::Pages(Pages::zeros(first, count).ok_or(CodecError::Limit {
                what: "pages in one zero run",
                value: count,
                limit: MAX_ZERO_RUN,
            })?)
        }
        T_UPDATE => {
            let (pages, versions) = decode_pages(body, true)?;
            Message::Update { pages, versions }
        }
        T_ACK => {
            const W: &str = "Ack";
            let n = get_u32(&mut body, W)? as usize;
            if n > MAX_ACKS {
                return Err(CodecError::Limit {
                    what: "acknowledged pages",
                    value: n,
                    limit: MAX_ACKS,
                });
            }
            if body.remaining() < n * 16 {
                return Err(CodecError::Truncated(W));
            }
            let entries = (0..n)
                .map(|_| (body.get_u64_le(), body.get_u64_le()))
                .collect();
            finish(&body, W)?;
            Message::Ack { entries }
        }
        T_PAGE_SET => {
            const W: &str = "PageSet";
            let k = get_u8(&mut body, W)?;
            let kind = match k {
                0 => SetKind::Invalid,
                1 => SetKind::Stale,
                2 => SetKind::Held,
                other => return Err(CodecError::BadSetKind(other)),
            };
            let last = get_u8(&mut body, W)? != 0;
            let first_word = get_u64(&mut body, W)?;
            let n = get_u32(&mut body, W)? as usize;
            if n > MAX_SET_WORDS {
                return Err(CodecError::Limit {
                    what: "bitmap words",
                    value: n,
                    limit: MAX_SET_WORDS,
                });
            }
            if body.remaining() < n * 8 {
                return Err(CodecError::Truncated(W));
            }
            let words = (0..n).map(|_| body.get_u64_le()).collect();
            finish(&body, W)?;
            Message::PageSet {
                kind,
                first_word,
                words,
                last,
            }
        }
        T_VM_STATE => {
            const W: &str = "VmState";
            let n = get_u32(&mut body, W)? as usize;
            if n > MAX_STATE {
                return Err(CodecError::Limit {
                    what: "VM state bytes",
                    value: n,
                    limit: MAX_STATE,
                });
            }
            if body.remaining() < n {
                return Err(CodecError::Truncated(W));
            }
            let blob = body.split_to(n).to_vec();
            finish(&body, W)?;
            Message::VmState { blob }
        }
        T_PUSH_DONE => {
            const W: &str = "PushDone";
            let pages_sent = get_u64(&mut body, W)?;
            finish(&body, W)?;
            Message::PushDone { pages_sent }
        }
        T_COMPLETE => {
            const W: &str = "Complete";
            let pages_received = get_u64(&mut body, W)?;
            finish(&body, W)?;
            Message::Complete { pages_received }
        }
        T_COMPLETE_ACK => {
            finish(&body, "CompleteAck")?;
            Message::CompleteAck
        }
        T_ERROR => {
            const W: &str = "Error";
            let code = ErrorCode::from_u16(get_u16(&mut body, W)?);
            let message = get_text(&mut body, W)?;
            finish(&body, W)?;
            Message::Error { code, message }
        }
        other => return Err(CodecError::UnknownType(other)),
    };
    Ok(msg)
}

/// Decodes the body of `Pages`, or of `Update` (which has a version per page before the kinds).
fn decode_pages(mut body: Bytes, versioned: bool) -> Result<(Pages, Vec<u64>), CodecError> {
    let w: &'static str = if versioned { "Update" } else { "Pages" };
    let first = get_u64(&mut body, w)?;
    let count = get_u16(&mut body, w)? as usize;
    if count == 0 || count > MAX_PAGES_PER_MESSAGE {
        return Err(CodecError::Limit {
            what: "pages in one message",
            value: count,
            limit: MAX_PAGES_PER_MESSAGE,
        });
    }
    if first.checked_add(count as u64).is_none() {
        return Err(CodecError::PageOverflow);
    }
    let mut versions = Vec::new();
    if versioned {
        if body.remaining() < count * 8 {
            return Err(CodecError::Truncated(w));
        }
        versions = (0..count).map(|_| body.get_u64_le()).collect();
        if versions.contains(&0) {
            return Err(CodecError::ZeroVersion);
        }
    }
    if body.remaining() < count {
        return Err(CodecError::Truncated(w));
    }
    let kinds = body.split_to(count);
    let mut expected = 0usize;
    for &k in kinds.iter() {
        let kind = PageKind::from_u8(k).ok_or(CodecError::BadPageKind(k))?;
        expected += match kind.payload_len() {
            // Replication stores pages as they are: no encoded kinds in an `Update`.
            Some(_) if versioned && kind == PageKind::Ref => {
                return Err(CodecError::BadPageKind(k))
            }
            Some(n) => n,
            None if versioned => return Err(CodecError::BadPageKind(k)),
            None => {
                // An lz4 block: its length prefix sits at `expected` in the payload.
                let len = body
                    .get(expected..expected + 2)
                    .ok_or(CodecError::Truncated(w))?;
                let n = u16::from_le_bytes([len[0], len[1]]) as usize;
                if n == 0 || n >= PAGE_SIZE {
                    return Err(CodecError::Limit {
                        what: "lz4 block length",
                        value: n,
                        limit: PAGE_SIZE - 1,
                    });
                }
                2 + n
            }
        };
    }
    match body.len().cmp(&expected) {
        std::cmp::Ordering::Less => Err(CodecError::Truncated(w)),
        std::cmp::Ordering::Greater => Err(CodecError::Trailing(w, body.len() - expected)),
        std::cmp::Ordering::Equal => Ok((
            Pages {
                first,
                kinds,
                payload: body,
            },
            versions,
        )),
    }
}

fn finish(body: &Bytes, what: &'static str) -> Result<(), CodecError> {
    if body.has_remaining() {
        Err(CodecError::Trailing(what, body.remaining()))
    } else {
        Ok(())
    }
}

fn get_u8(b: &mut Bytes, w: &'static str) -> Result<u8, CodecError> {
    if b.remaining() < 1 {
        return Err(CodecError::Truncated(w));
    }
    Ok(b.get_u8())
}

fn get_u16(b: &mut Bytes, w: &'static str) -> Result<u16, CodecError> {
    if b.remaining() < 2 {
        return Err(CodecError::Truncated(w));
    }
    Ok(b.get_u16_le())
}

fn get_u32(b: &mut Bytes, w: &'static str) -> Result<u32, CodecError> {
    if b.remaining() < 4 {
        return Err(CodecError::Truncated(w));
    }
    Ok(b.get_u32_le())
}

fn get_u64(b: &mut Bytes, w: &'static str) -> Result<u64, CodecError> {
    if b.remaining() < 8 {
        return Err(CodecError::Truncated(w));
    }
    Ok(b.get_u64_le())
}

fn get_u128(b: &mut Bytes, w: &'static str) -> Result<u128, CodecError> {
    if b.remaining() < 16 {
        return Err(CodecError::Truncated(w));
    }
    Ok(b.get_u128_le())
}

fn get_text(b: &mut Bytes, w: &'static str) -> Result<String, CodecError> {
    let n = get_u16(b, w)? as usize;
    if n > MAX_TEXT {
        return Err(CodecError::Limit {
            what: "text length",
            value: n,
            limit: MAX_TEXT,
        });
    }
    if b.remaining() < n {
        return Err(CodecError::Truncated(w));
    }
    let raw = b.split_to(n);
    String::from_utf8(raw.to_vec()).map_err(|_| CodecError::BadText)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::PageRef;
    use proptest::prelude::*;

    fn roundtrip(msg: Message) {
        let buf = encode_to_vec(&msg);
        let (back, used) = decode(&buf).unwrap().unwrap();
        assert_eq!(used, buf.len());
        assert_eq!(back, msg);
    }

    fn sample_pages() -> Pages {
        let mut mem = vec![0u8; 3 * PAGE_SIZE];
        mem[5] = 1;
        mem[2 * PAGE_SIZE + 7] = 9;
        Pages::from_memory(10, &mem)
    }

    #[test]
    fn every_message_roundtrips() {
        roundtrip(Message::Hello {
            version: 1,
            kind: SessionKind::Evacuate,
            epoch: 0xfeed,
            vm_id: "vm-ü".into(),
            layout: Layout {
                page_size: 4096,
                regions: vec![
                    RegionDesc {
                        guest_addr: 0,
                        len: 1 << 20,
                    },
                    RegionDesc {
                        guest_addr: 1 << 32,
                        len: 8192,
                    },
                ],
                disks: vec![
                    DiskDesc {
                        name: "vda".into(),
                        len: 1 << 30,
                    },
                    DiskDesc {
                        name: String::new(),
                        len: 4096,
                    },
                ],
            },
            features: 7,
            session_id: u128::MAX - 5,
        });
        roundtrip(Message::HelloAck {
            version: 1,
            features: 0,
            conn_epoch: 3,
        });
        roundtrip(Message::Resume {
            session_id: 1 << 100,
            conn_epoch: u32::MAX,
            features: 3,
            pages: 1 << 40,
            checksum: 0xdead_beef,
        });
        roundtrip(Message::ResumeAck { conn_epoch: 7 });
        roundtrip(Message::PageSet {
            kind: SetKind::Held,
            first_word: 0,
            words: vec![1],
            last: false,
        });
        roundtrip(Message::Request {
            pages: vec![1, 2, u64::MAX],
            pushed_read: 1 << 40,
        });
        roundtrip(Message::Pages(sample_pages()));
        roundtrip(Message::Update {
            pages: sample_pages(),
            versions: vec![1, 2, u64::MAX],
        });
        roundtrip(Message::Ack {
            entries: vec![(1, 2), (u64::MAX, 9)],
        });
        roundtrip(Message::PageSet {
            kind: SetKind::Stale,
            first_word: 3,
            words: vec![0, u64::MAX, 5],
            last: true,
        });
        roundtrip(Message::VmState {
            blob: vec![1, 2, 3],
        });
        roundtrip(Message::PushDone { pages_sent: 5 });
        roundtrip(Message::Complete { pages_received: 5 });
        roundtrip(Message::CompleteAck);
        roundtrip(Message::Error {
            code: ErrorCode::LayoutMismatch,
            message: "nope".into(),
        });
    }

    #[test]
    fn pages_encode_zero_pages_as_flags() {
        let p = sample_pages();
        assert_eq!(p.count(), 3);
        assert_eq!(p.raw_count(), 2);
        assert_eq!(p.payload.len(), 2 * PAGE_SIZE);
        let kinds: Vec<_> = p
            .iter()
            .map(|(i, r)| (i, matches!(r, PageRef::Zero)))
            .collect();
        assert_eq!(kinds, vec![(10, false), (11, true), (12, false)]);
        let (_, PageRef::Raw(last)) = p.iter().nth(2).unwrap() else {
            panic!("raw expected")
        };
        assert_eq!(last[7], 9);
    }

    #[test]
    fn long_zero_runs_cross_as_one_small_frame() {
        let run = Pages::zeros(1 << 40, MAX_ZERO_RUN).unwrap();
        let buf = encode_to_vec(&Message::Pages(run.clone()));
        assert_eq!(buf.len(), HEADER_LEN + 12);
        assert_eq!(buf[4], T_ZERO_RUN);
        roundtrip(Message::Pages(run));
        roundtrip(Message::Pages(
            Pages::zeros(7, MAX_PAGES_PER_MESSAGE + 1).unwrap(),
        ));
        // Up to a message's worth they keep the `Pages` form every peer reads.
        let short = Pages::zeros(7, MAX_PAGES_PER_MESSAGE).unwrap();
        let buf = encode_to_vec(&Message::Pages(short.clone()));
        assert_eq!(buf[4], T_PAGES);
        roundtrip(Message::Pages(short));
        let (Message::Pages(p), _) = decode(&buf).unwrap().unwrap() else {
            panic!("pages expected")
        };
        assert!(p.is_zero_run());
        assert!(p.iter().all(|(_, r)| r == PageRef::Zero));
        assert!(!sample_pages().is_zero_run());
        assert!(Pages::zeros(0, 0).is_none());
        assert!(Pages::zeros(0, MAX_ZERO_RUN + 1).is_none());
    }

    #[test]
    fn a_pages_frames_length_is_known_without_encoding_it() {
        let mut mem = vec![9u8; 3 * PAGE_SIZE];
        mem[PAGE_SIZE..2 * PAGE_SIZE].fill(0);
        for p in [
            Pages::from_memory(3, &mem),
            Pages::from_memory(1 << 33, &mem[..PAGE_SIZE]),
            Pages::zeros(7, 1).unwrap(),
            Pages::zeros(7, MAX_PAGES_PER_MESSAGE).unwrap(),
            Pages::zeros(7, MAX_PAGES_PER_MESSAGE + 1).unwrap(),
            Pages::zeros(7, MAX_ZERO_RUN).unwrap(),
            sample_pages(),
        ] {
            let len = encode_to_vec(&Message::Pages(p.clone())).len() as u64;
            assert_eq!(
                pages_frame_len(&p),
                len,
                "{} pages from {}",
                p.count(),
                p.first
            );
        }
    }

    #[test]
    fn malformed_zero_runs_are_refused() {
        let frame = |body: &[u8]| {
            let mut b = ((body.len() + 1) as u32).to_le_bytes().to_vec();
            b.push(T_ZERO_RUN);
            b.extend_from_slice(body);
            b
        };
        let body = |first: u64, count: u32| {
            let mut b = first.to_le_bytes().to_vec();
            b.extend_from_slice(&count.to_le_bytes());
            b
        };
        assert!(matches!(
            decode(&frame(&body(0, 0))),
            Err(CodecError::Limit { value: 0, .. })
        ));
        assert!(matches!(
            decode(&frame(&body(0, MAX_ZERO_RUN as u32 + 1))),
            Err(CodecError::Limit { .. })
        ));
        assert!(matches!(
            decode(&frame(&body(0, u32::MAX))),
            Err(CodecError::Limit { .. })
        ));
        assert_eq!(
            decode(&frame(&body(u64::MAX - 300, 400))),
            Err(CodecError::PageOverflow)
        );
        assert_eq!(
            decode(&frame(&body(0, 300)[..11])),
            Err(CodecError::Truncated("ZeroRun"))
        );
        let mut long = body(0, 300);
        long.push(0);
        assert_eq!(
            decode(&frame(&long)),
            Err(CodecError::Trailing("ZeroRun", 1))
        );
        // A run a `Pages` message carries has that encoding only.
        assert_eq!(
            decode(&frame(&body(5, 3))),
            Err(CodecError::ShortZeroRun(3))
        );
        let n = MAX_PAGES_PER_MESSAGE as u32;
        assert_eq!(
            decode(&frame(&body(5, n))),
            Err(CodecError::ShortZeroRun(n as usize))
        );
        assert_eq!(
            decode(&frame(&body(5, n + 1))),
            Ok(Some((
                Message::Pages(Pages::zeros(5, n as usize + 1).unwrap()),
                HEADER_LEN + 12
            )))
        );
    }

    #[test]
    fn partial_input_asks_for_more() {
        let buf = encode_to_vec(&Message::Pages(sample_pages()));
        for cut in 0..buf.len() {
            assert_eq!(decode(&buf[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn truncated_body_is_an_error() {
        let mut buf = encode_to_vec(&Message::PushDone { pages_sent: 1 });
        // Claim a shorter body than the message needs.
        buf[0] = 4;
        buf.truncate(HEADER_LEN + 3);
        assert_eq!(decode(&buf), Err(CodecError::Truncated("PushDone")));
    }

    #[test]
    fn oversized_frames_and_counts_are_refused_before_allocating() {
        let mut buf = vec![0xff, 0xff, 0xff, 0x7f, T_PAGES];
        buf.extend_from_slice(&[0; 16]);
        assert!(matches!(decode(&buf), Err(CodecError::FrameTooLong(_))));

        let mut req = vec![];
        req.extend_from_slice(&17u32.to_le_bytes());
        req.push(T_REQUEST);
        req.extend_from_slice(&[0; 8]); // pushed_read
        req.extend_from_slice(&u32::MAX.to_le_bytes());
        req.extend_from_slice(&[0; 4]);
        assert!(matches!(decode(&req), Err(CodecError::Limit { .. })));
    }

    #[test]
    fn bad_page_kind_and_lengths_are_refused() {
        let mut p = encode_to_vec(&Message::Pages(sample_pages()));
        p[HEADER_LEN + 10] = 7; // first kind byte
        assert_eq!(decode(&p), Err(CodecError::BadPageKind(7)));

        let body = {
            let mut b = vec![];
            b.extend_from_slice(&u64::MAX.to_le_bytes());
            b.extend_from_slice(&2u16.to_le_bytes());
            b.extend_from_slice(&[1, 1]);
            b
        };
        assert_eq!(
            decode_body(T_PAGES, Bytes::from(body)),
            Err(CodecError::PageOverflow)
        );
    }

    #[test]
    fn unknown_type_is_refused() {
        assert_eq!(
            decode(&[1, 0, 0, 0, 0xee]),
            Err(CodecError::UnknownType(0xee))
        );
        assert_eq!(decode(&[0, 0, 0, 0, 1]), Err(CodecError::EmptyFrame));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// Decoders never panic, whatever the bytes.
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode(&bytes);
        }

        /// Random bodies behind every valid type byte never panic either.
        #[test]
        fn decode_body_never_panics(ty in 0u8..17, bytes in proptest::collection::vec(any::<u8>(), 0..9000)) {
            let _ = decode_body(ty, Bytes::from(bytes));
        }

        /// A valid frame with random corruption either decodes to something or errors.
        #[test]
        fn corrupted_frames_never_panic(idx in 0usize..64, val in any::<u8>()) {
            let mut buf = encode_to_vec(&Message::Pages(sample_pages()));
            let i = idx % buf.len();
            buf[i] = val;
            let _ = decode(&buf);
        }

        #[test]
        fn requests_roundtrip(
            pages in proptest::collection::vec(any::<u64>(), 0..200),
            pushed_read in any::<u64>(),
        ) {
            let msg = Message::Request { pages, pushed_read };
            let buf = encode_to_vec(&msg);
            let (back, _) = decode(&buf).unwrap().unwrap();
            prop_assert_eq!(back, msg);
        }
    }
}
