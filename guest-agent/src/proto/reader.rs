//! [`FrameReader`]: frames out of a byte stream (a serial line, a socket) with a bounded
//! buffer.

use super::MAX_FRAME_LEN;
use super::{crc32, decode_payload, parse_header, DecodeError, Message, FRAME_SYNC, HEADER_LEN};

/// Accumulates bytes from a stream and yields the messages in it.
///
/// **Garbage policy: resynchronise.** A serial line has no message boundaries, and a host
/// may attach in the middle of a frame (QEMU drops what the guest sends while no client is
/// connected), so garbage is expected and never fatal. When the bytes at the read position
/// are not a valid frame start (wrong sync bytes, failed header check, reserved flags, an
/// over-long length) or the payload checksum fails, the reader drops bytes up to the next
/// possible sync byte and reports what it dropped as one error item
/// ([`DecodeError::Garbage`], or the header/checksum error), then goes on. A frame that is
/// well framed and checksummed but whose payload is invalid (unknown type, overlapping
/// ranges, ...) is consumed whole and reported as its decode error. The caller decides
/// whether errors are worth answering; the reader itself never stops.
///
/// **Bounded memory.** The buffer never holds more than [`MAX_FRAME_LEN`] bytes (one
/// largest frame); [`FrameReader::feed`] accepts only what fits, and draining with
/// [`FrameReader::next_frame`] always makes room, because a valid header never announces
/// more than fits and an invalid one is dropped.
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    /// Read position in `buf`; bytes before it are consumed.
    start: usize,
    capacity: usize,
    skipped: u64,
    frames: u64,
}

impl Default for FrameReader {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameReader {
    /// A reader whose buffer can hold one frame of [`MAX_FRAME_LEN`] bytes.
    pub fn new() -> FrameReader {
        FrameReader {
            buf: Vec::new(),
            start: 0,
            capacity: MAX_FRAME_LEN,
            skipped: 0,
            frames: 0,
        }
    }

    /// Copies as much of `data` as fits into the buffer and returns how many bytes that was
    /// (0 only if the buffer is full: call [`FrameReader::next_frame`] first).
    pub fn feed(&mut self, data: &[u8]) -> usize {
        if self.start > 0 {
            // Compact: what is left is usually a partial frame, so this copies little.
            self.buf.drain(..self.start);
            self.start = 0;
        }
        if self.buf.capacity() < self.capacity {
            // One allocation of exactly the bound, so growth never overshoots it.
            self.buf.reserve_exact(self.capacity - self.buf.len());
        }
        let n = data.len().min(self.capacity - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        n
    }

    /// The next message or error in the buffered bytes, or `None` if more bytes are needed.
    pub fn next_frame(&mut self) -> Option<Result<Message, DecodeError>> {
        let avail = &self.buf[self.start..];
        let first = *avail.first()?;
        let sync_ok = first == FRAME_SYNC[0] && avail.get(1).is_none_or(|&b| b == FRAME_SYNC[1]);
        if !sync_ok {
            let skipped = self.skip_to_next_sync();
            return Some(Err(DecodeError::Garbage { skipped }));
        }
        let header = avail.first_chunk::<HEADER_LEN>()?;
        let header = match parse_header(header) {
            Ok(h) => h,
            Err(e) => {
                self.skip_to_next_sync();
                return Some(Err(e));
            }
        };
        let total = HEADER_LEN + header.len;
        if avail.len() < total {
            return None;
        }
        let payload = &avail[HEADER_LEN..total];
        let actual = crc32(payload);
        if actual != header.crc {
            // Perhaps a sync byte pattern inside garbage that passed the header check by
            // chance: look for a frame from the next byte on rather than skipping `total`.
            self.skip_to_next_sync();
            return Some(Err(DecodeError::BadChecksum {
                expected: header.crc,
                actual,
            }));
        }
        let msg = decode_payload(header.msg_type, payload);
        self.start += total;
        self.frames += 1;
        Some(msg)
    }

    /// Feeds all of `data`, handing every message or error to `sink` as it completes.
    pub fn push(&mut self, mut data: &[u8], mut sink: impl FnMut(Result<Message, DecodeError>)) {
        loop {
            let n = self.feed(data);
            data = &data[n..];
            while let Some(item) = self.next_frame() {
                sink(item);
            }
            if data.is_empty() {
                return;
            }
        }
    }

    /// Drops bytes from the read position up to the next byte that could start a frame
    /// (never fewer than one) and returns how many.
    fn skip_to_next_sync(&mut self) -> usize {
        let avail = &self.buf[self.start..];
        let n = avail[1..]
            .iter()
            .position(|&b| b == FRAME_SYNC[0])
            .map_or(avail.len(), |p| p + 1);
        self.start += n;
        self.skipped += n as u64;
        n
    }

    /// Bytes buffered and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The most bytes the buffer holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes dropped as garbage so far.
    pub fn skipped_bytes(&self) -> u64 {
        self.skipped
    }

    /// Well-framed frames consumed so far (valid or not in content).
    pub fn frames(&self) -> u64 {
        self.frames
    }
}
