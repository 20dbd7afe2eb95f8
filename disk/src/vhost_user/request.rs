//! One virtio-blk request: taken apart from its descriptor chain (on the queue's thread,
//! without touching the disk) and then run against the disk (on a pool thread, where it
//! may block).
//!
//! Nothing the guest puts in a chain panics or changes the image unless the request is
//! well formed: a chain without a writable status byte at its end, in guest memory, cannot
//! be answered and is returned unanswered (used length 0); any other malformation is
//! answered `VIRTIO_BLK_S_IOERR`, and a request type the device does not know
//! `VIRTIO_BLK_S_UNSUPP`.
//! Every guest buffer is checked against guest memory, and every range against the disk,
//! before the first byte is written.

use std::ops::Deref;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use crate::device::{check_range, BlockDevice};

/// Bytes in a virtio-blk sector: `sector` fields count these whatever the block size.
pub const SECTOR_SIZE: u64 = 512;
/// The request header: type (le32), reserved (le32), sector (le64).
const HEADER_LEN: u64 = 16;
/// One discard / write-zeroes segment: sector (le64), num_sectors (le32), flags (le32).
const SEGMENT_LEN: u64 = 16;
/// The length of a GET_ID answer (VIRTIO_BLK_ID_BYTES).
pub const SERIAL_LEN: usize = 20;
/// Reads and writes move through a bounce buffer of at most this many bytes at a time.
const CHUNK: u64 = 1 << 20;

const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
pub(crate) const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// The limits the device announces in its configuration for discard and write-zeroes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Sectors one discard segment may cover.
    pub max_discard_sectors: u32,
    /// Segments one discard request may carry.
    pub max_discard_seg: u32,
    /// Sectors one write-zeroes segment may cover.
    pub max_write_zeroes_sectors: u32,
    /// Segments one write-zeroes request may carry.
    pub max_write_zeroes_seg: u32,
}

/// Guest buffers seen as one byte stream (a scatter-gather list).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Sg(Vec<(GuestAddress, u64)>);

impl Sg {
    fn push(&mut self, addr: GuestAddress, len: u64) {
        if len > 0 {
            self.0.push((addr, len));
        }
    }

    pub(crate) fn len(&self) -> u64 {
        self.0.iter().map(|&(_, l)| l).sum()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The buffers, in order.
    pub(crate) fn buffers(&self) -> &[(GuestAddress, u64)] {
        &self.0
    }

    /// Whether every buffer lies in guest memory.
    fn in_memory<M: GuestMemory + ?Sized>(&self, mem: &M, access: Permissions) -> bool {
        self.0.iter().all(|&(a, l)| {
            a.0.checked_add(l).is_some()
                && usize::try_from(l).is_ok_and(|l| mem.check_range(a, l, access))
        })
    }

    /// Splits off the first `n` bytes (`None` if there are fewer).
    fn take_front(&mut self, n: u64) -> Option<Sg> {
        if self.len() < n {
            return None;
        }
        let mut front = Sg::default();
        let mut left = n;
        let mut rest = Vec::new();
        for &(a, l) in &self.0 {
            if left == 0 {
                rest.push((a, l));
            } else if l <= left {
                front.push(a, l);
                left -= l;
            } else {
                front.push(a, left);
                rest.push((a.unchecked_add(left), l - left));
                left = 0;
            }
        }
        self.0 = rest;
        Some(front)
    }

    /// Reads the whole stream into `out` (which must be as long).
    fn read<M: GuestMemory + ?Sized>(&self, mem: &M, out: &mut [u8]) -> bool {
        let mut at = 0usize;
        for &(a, l) in &self.0 {
            let l = l as usize;
            if mem.read_slice(&mut out[at..at + l], a).is_err() {
                return false;
            }
            at += l;
        }
        true
    }

    /// The stream in windows of at most [`CHUNK`] bytes, in order: each window's offset
    /// in the stream and its pieces of guest memory. A read or a write makes one disk call
    /// per window, not one per buffer, so a guest request of scattered pages (the usual
    /// case) is one call: at a destination, one request for all its stale blocks.
    fn windows(&self) -> Vec<(u64, Vec<(GuestAddress, usize)>)> {
        let mut out: Vec<(u64, Vec<(GuestAddress, usize)>)> = Vec::new();
        let mut filled = CHUNK as usize; // bytes in the last window
        for (off, addr, n) in self.chunks() {
            match out.last_mut() {
                Some((_, pieces)) if filled + n <= CHUNK as usize => {
                    pieces.push((addr, n));
                    filled += n;
                }
                _ => {
                    out.push((off, vec![(addr, n)]));
                    filled = n;
                }
            }
        }
        out
    }

    /// Pieces of at most [`CHUNK`] bytes, in order, with their offset in the stream.
    fn chunks(&self) -> impl Iterator<Item = (u64, GuestAddress, usize)> + '_ {
        let mut at = 0u64;
        self.0.iter().flat_map(move |&(a, l)| {
            let base = at;
            at += l;
            (0..l.div_ceil(CHUNK)).map(move |i| {
                let off = i * CHUNK;
                (
                    base + off,
                    a.unchecked_add(off),
                    (l - off).min(CHUNK) as usize,
                )
            })
        })
    }
}

/// A descriptor chain taken apart.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// There is no writable status byte to answer in: the chain goes back to the guest
    /// with nothing written (used length 0).
    Unanswerable {
        /// The chain's head descriptor.
        head: u16,
        /// What is wrong, for the log.
        why: &'static str,
    },
    /// Malformed, answered at once with `VIRTIO_BLK_S_IOERR`.
    Malformed {
        /// The chain's head descriptor.
        head: u16,
        /// Where the status byte goes.
        status: GuestAddress,
        /// What is wrong, for the log.
        why: &'static str,
    },
    /// A request to run.
    Request(Request),
}

/// A well-framed request: header read, buffers in guest memory.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Request {
    /// The chain's head descriptor.
    pub head: u16,
    /// Where the status byte goes.
    pub status: GuestAddress,
    kind: u32,
    sector: u64,
    /// Device-readable bytes after the header.
    readable: Sg,
    /// Device-writable bytes before the status byte.
    writable: Sg,
}

/// Takes a chain apart. Reads only the descriptors and the 16-byte header.
pub(crate) fn parse<M>(chain: DescriptorChain<M>) -> Parsed
where
    M: Deref,
    M::Target: GuestMemory,
{
    let head = chain.head_index();
    let mut chain = chain;
    let descs: Vec<_> = chain.by_ref().collect();
    let mem = chain.memory();
    let Some(last) = descs.last() else {
        return Parsed::Unanswerable {
            head,
            why: "the chain has no descriptor (bad index or indirect table)",
        };
    };
    // The iterator stops early on a bad next index, a loop or a bad indirect table: the
    // last descriptor it gave then still says there is more, and the real status byte
    // is out of reach.
    if last.has_next() {
        return Parsed::Unanswerable {
            head,
            why: "the chain breaks off (bad next index, a loop, or a bad indirect table)",
        };
    }
    if !last.is_write_only() || last.len() == 0 {
        return Parsed::Unanswerable {
            head,
            why: "the chain does not end in a writable status byte",
        };
    }
    let Some(status) = last.addr().checked_add(u64::from(last.len()) - 1) else {
        return Parsed::Unanswerable {
            head,
            why: "the status byte's address overflows",
        };
    };
    // Checked like every buffer: a request must not run (and change the image) when its
    // answer cannot be written.
    if !mem.check_range(status, 1, Permissions::Write) {
        return Parsed::Unanswerable {
            head,
            why: "the status byte lies outside guest memory",
        };
    }
    let malformed = |why| Parsed::Malformed { head, status, why };

    let mut readable = Sg::default();
    let mut writable = Sg::default();
    let mut seen_writable = false;
    for (i, d) in descs.iter().enumerate() {
        // The last descriptor's last byte is the status.
        let len = u64::from(d.len()) - u64::from(i + 1 == descs.len());
        if d.is_write_only() {
            seen_writable = true;
            writable.push(d.addr(), len);
        } else if seen_writable {
            return malformed("a device-readable descriptor follows a device-writable one");
        } else {
            readable.push(d.addr(), len);
        }
    }
    if !readable.in_memory(mem, Permissions::Read) || !writable.in_memory(mem, Permissions::Write) {
        return malformed("a buffer lies outside guest memory");
    }
    let Some(header) = readable.take_front(HEADER_LEN) else {
        return malformed("the chain is too short for a request header");
    };
    let mut h = [0u8; HEADER_LEN as usize];
    if !header.read(mem, &mut h) {
        return malformed("the request header cannot be read");
    }
    Parsed::Request(Request {
        head,
        status,
        kind: u32::from_le_bytes(h[0..4].try_into().expect("4 bytes")),
        sector: u64::from_le_bytes(h[8..16].try_into().expect("8 bytes")),
        readable,
        writable,
    })
}

/// What a request came to: its status and the bytes written into its writable buffers
/// (the status byte included).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Done {
    pub status: u8,
    pub used: u32,
    /// Why it failed, for the log and the counters (`None` when it succeeded).
    pub why: Option<Failure>,
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The guest sent something it must not (wrong direction, bad length, past the end).
    Malformed(&'static str),
    /// The request type is not supported.
    Unsupported(u32),
    /// The disk failed (the error was logged where it happened).
    Disk,
}

impl Done {
    fn ok(used: u64) -> Done {
        Done {
            status: S_OK,
            used: u32::try_from(used.saturating_add(1)).unwrap_or(u32::MAX),
            why: None,
        }
    }

    fn malformed(why: &'static str) -> Done {
        Done {
            status: S_IOERR,
            used: 1,
            why: Some(Failure::Malformed(why)),
        }
    }

    fn disk() -> Done {
        Done {
            status: S_IOERR,
            used: 1,
            why: Some(Failure::Disk),
        }
    }
}

/// What a request needs to know about the device besides the disk.
pub(crate) struct Device<'a> {
    pub disk: &'a dyn BlockDevice,
    pub serial: &'a [u8; SERIAL_LEN],
    pub limits: Limits,
}

impl Request {
    /// The request type (`VIRTIO_BLK_T_*`).
    pub(crate) fn kind(&self) -> u32 {
        self.kind
    }

    /// The header's sector.
    pub(crate) fn sector(&self) -> u64 {
        self.sector
    }

    /// The device-readable buffers after the header.
    pub(crate) fn readable(&self) -> &[(GuestAddress, u64)] {
        self.readable.buffers()
    }

    /// The device-writable buffers before the status byte.
    pub(crate) fn writable(&self) -> &[(GuestAddress, u64)] {
        self.writable.buffers()
    }

    /// Runs the request against the disk and guest memory (the status byte is the
    /// caller's to write).
    pub(crate) fn run<M: GuestMemory>(&self, mem: &M, dev: &Device<'_>) -> Done {
        match self.kind {
            VIRTIO_BLK_T_IN => self.read(mem, dev),
            VIRTIO_BLK_T_OUT => self.write(mem, dev),
            VIRTIO_BLK_T_FLUSH => match dev.disk.flush() {
                Ok(()) => Done::ok(0),
                Err(e) => {
                    tracing::warn!(error = %e, "vhost-user-blk: flush failed");
                    Done::disk()
                }
            },
            VIRTIO_BLK_T_GET_ID => {
                let n = self.writable.len().min(SERIAL_LEN as u64) as usize;
                let mut id = self.writable.clone();
                let Some(id) = id.take_front(n as u64) else {
                    return Done::malformed("no room for the id");
                };
                for (off, addr, len) in id.chunks() {
                    let off = off as usize;
                    if mem.write_slice(&dev.serial[off..off + len], addr).is_err() {
                        return Done::malformed("the id buffer cannot be written");
                    }
                }
                Done::ok(n as u64)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => self.zero(mem, dev),
            other => Done {
                status: S_UNSUPP,
                used: 1,
                why: Some(Failure::Unsupported(other)),
            },
        }
    }

    /// The byte range `len` bytes at `self.sector` cover, if it lies on the disk.
    fn range(&self, len: u64, dev: &Device<'_>) -> Result<u64, Done> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(Done::malformed("the data is not a whole number of sectors"));
        }
        let offset = self
            .sector
            .checked_mul(SECTOR_SIZE)
            .ok_or(Done::malformed("the sector number overflows"))?;
        check_range(offset, len, dev.disk.size())
            .map_err(|_| Done::malformed("the request reaches past the end of the disk"))?;
        Ok(offset)
    }

    fn read<M: GuestMemory>(&self, mem: &M, dev: &Device<'_>) -> Done {
        if !self.readable.is_empty() {
            return Done::malformed("a read carries device-readable data");
        }
        let len = self.writable.len();
        let offset = match self.range(len, dev) {
            Ok(o) => o,
            Err(d) => return d,
        };
        let mut buf = vec![0u8; len.min(CHUNK) as usize];
        for (off, pieces) in self.writable.windows() {
            let n = pieces.iter().map(|&(_, n)| n).sum();
            if let Err(e) = dev.disk.read_at(&mut buf[..n], offset + off) {
                tracing::warn!(error = %e, offset = offset + off, "vhost-user-blk: read failed");
                return Done::disk();
            }
            let mut at = 0;
            for (addr, n) in pieces {
                if mem.write_slice(&buf[at..at + n], addr).is_err() {
                    return Done::malformed("a read buffer cannot be written");
                }
                at += n;
            }
        }
        Done::ok(len)
    }

    fn write<M: GuestMemory>(&self, mem: &M, dev: &Device<'_>) -> Done {
        if !self.writable.is_empty() {
            return Done::malformed("a write carries device-writable data");
        }
        if dev.disk.read_only() {
            return Done::malformed("a write to a read-only disk");
        }
        let len = self.readable.len();
        let offset = match self.range(len, dev) {
            Ok(o) => o,
            Err(d) => return d,
        };
        let mut buf = vec![0u8; len.min(CHUNK) as usize];
        for (off, pieces) in self.readable.windows() {
            let mut n = 0;
            for (addr, l) in pieces {
                if mem.read_slice(&mut buf[n..n + l], addr).is_err() {
                    // Checked at parse time and guest memory is held mapped, so this is a
                    // guest that changed its memory map under a request.
                    return Done::malformed("a write buffer cannot be read");
                }
                n += l;
            }
            if let Err(e) = dev.disk.write_at(&buf[..n], offset + off, false) {
                tracing::warn!(error = %e, offset = offset + off, "vhost-user-blk: write failed");
                return Done::disk();
            }
        }
        Done::ok(0)
    }

    /// DISCARD and WRITE_ZEROES: every segment is checked before any is applied.
    fn zero<M: GuestMemory>(&self, mem: &M, dev: &Device<'_>) -> Done {
        let discard = self.kind == VIRTIO_BLK_T_DISCARD;
        let (max_sectors, max_seg) = if discard {
            (dev.limits.max_discard_sectors, dev.limits.max_discard_seg)
        } else {
            (
                dev.limits.max_write_zeroes_sectors,
                dev.limits.max_write_zeroes_seg,
            )
        };
        if !self.writable.is_empty() {
            return Done::malformed("a discard or write-zeroes carries device-writable data");
        }
        let len = self.readable.len();
        if len == 0 || !len.is_multiple_of(SEGMENT_LEN) {
            return Done::malformed("the segments are not a whole number of 16-byte entries");
        }
        if len / SEGMENT_LEN > u64::from(max_seg) {
            return Done::malformed("more segments than the device allows");
        }
        if dev.disk.read_only() {
            return Done::malformed("a discard or write-zeroes to a read-only disk");
        }
        let mut raw = vec![0u8; len as usize];
        if !self.readable.read(mem, &mut raw) {
            return Done::malformed("the segments cannot be read");
        }
        let mut ranges = Vec::with_capacity(raw.len() / SEGMENT_LEN as usize);
        for seg in raw.chunks_exact(SEGMENT_LEN as usize) {
            let sector = u64::from_le_bytes(seg[0..8].try_into().expect("8 bytes"));
            let sectors = u32::from_le_bytes(seg[8..12].try_into().expect("4 bytes"));
            let flags = u32::from_le_bytes(seg[12..16].try_into().expect("4 bytes"));
            let allowed = if discard {
                0
            } else {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            };
            if flags & !allowed != 0 {
                return Done {
                    status: S_UNSUPP,
                    used: 1,
                    why: Some(Failure::Unsupported(self.kind)),
                };
            }
            if sectors > max_sectors {
                return Done::malformed("a segment covers more sectors than the device allows");
            }
            let Some(offset) = sector.checked_mul(SECTOR_SIZE) else {
                return Done::malformed("the sector number overflows");
            };
            let bytes = u64::from(sectors) * SECTOR_SIZE;
            if check_range(offset, bytes, dev.disk.size()).is_err() {
                return Done::malformed("a segment reaches past the end of the disk");
            }
            ranges.push((offset, bytes));
        }
        for (offset, bytes) in ranges {
            let r = if discard {
                dev.disk.trim(offset, bytes)
            } else {
                dev.disk.write_zeroes(offset, bytes, false)
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, offset, bytes, discard, "vhost-user-blk: zeroing failed");
                return Done::disk();
            }
        }
        Done::ok(0)
    }
}

/// The status byte, written; `false` if it could not be.
pub(crate) fn write_status<M: GuestMemory>(mem: &M, at: GuestAddress, status: u8) -> bool {
    mem.write_obj(status, at).is_ok()
}

/// Writes the status byte and returns the used length for the used ring: `used`, or 0
/// if the status byte could not be written.
pub(crate) fn answer<M: GuestMemory>(mem: &M, at: GuestAddress, status: u8, used: u32) -> u32 {
    if write_status(mem, at, status) {
        used
    } else {
        0
    }
}

#[cfg(test)]
mod tests;
