//! Target `vhost_blk`: the vhost-user-blk request parser and executor
//! (`disk::vhost_user`'s crate-private `request` module, reached through
//! `disk::vhost_user::fuzzing`), over descriptor chains that a fuzzed guest puts in a
//! virtqueue in real guest memory.
//!
//! Guest memory is three small `GuestMemoryMmap` regions, two of them adjacent and one
//! beyond a hole; the split virtqueue (`virtio_queue::mock::MockSplitQueue`, 1 to 64
//! entries) lies at its start. The first bytes choose the disk (an in-memory image of
//! 0 bytes, 32 KiB, 4 KiB and an odd tail, or 2 MiB, so that one request spans several
//! 1 MiB bounce windows; read-only or not), the queue size and the discard and
//! write-zeroes limits. Then each op byte writes a descriptor into the table, a whole
//! linked chain, an avail ring entry, a request header, discard / write-zeroes segments,
//! raw bytes or an indirect descriptor table into guest memory, writes a request-shaped
//! chain (header, one data buffer repeated, status byte), makes the disk fail or work,
//! or lets the device take every available chain off the queue. Each chain is
//! handled as the device handles it (`fuzzing::handle`: parse, run, status byte, used
//! length) and returned on the used ring.
//!
//! Checks, per chain, against copies of guest memory and the image taken before it:
//! nothing panics; the disk sees only ranges inside the image, and no write of any kind
//! on a read-only image; a chain returned unanswered changes nothing and has used length
//! 0; every other chain gets its status byte, with used length at least 1; a malformed
//! chain or a request not answered `VIRTIO_BLK_S_OK` leaves the image unchanged, and
//! guest memory changed only in its device-writable buffers and status byte; a request
//! answered `VIRTIO_BLK_S_OK` did exactly what its type says (a model applies it to the
//! copies: data read into the writable buffers, written from the readable ones, segments
//! zeroed, the serial written) with the right used length; an unknown type is answered
//! `VIRTIO_BLK_S_UNSUPP`; a failed disk call is answered `VIRTIO_BLK_S_IOERR`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use disk::vhost_user::fuzzing::{handle, Outcome, Request, Verdict};
use disk::vhost_user::{Limits, SECTOR_SIZE, SERIAL_LEN};
use disk::{check_range, BlockDevice, DiskError};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::input::Input;

type Mem = GuestMemoryMmap<()>;

/// Guest memory: two adjacent regions (a buffer may cross from one to the other), then
/// a hole, then a third region.
const REGIONS: [(u64, usize); 3] = [(0, 0x8000), (0x8000, 0x8000), (0x2_0000, 0x4000)];
/// Where the buffers usually go: past the virtqueue (at most 64 entries: under 4 KiB).
const DATA: u64 = 0x1000;
/// The end of the first two regions.
const LOW_END: u64 = 0x1_0000;
/// The region edges, for buffers that straddle one.
const EDGES: [u64; 4] = [0x8000, LOW_END, 0x2_0000, 0x2_4000];
/// What GET_ID answers.
const SERIAL: &[u8; SERIAL_LEN] = b"fuzz-serial-0123\0\0\0\0";
/// At most this many chains per input (a guest can make the device re-arm its own queue).
const MAX_CHAINS: usize = 256;

const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
const KINDS: [u32; 6] = [
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_WRITE_ZEROES,
];

/// The largest image (2 MiB), and more than guest memory (144 KiB).
const PATTERN_LEN: usize = 2 << 20;

/// What an image and guest memory hold at first (computed once: executions are many).
fn pattern() -> &'static [u8] {
    static P: OnceLock<Vec<u8>> = OnceLock::new();
    P.get_or_init(|| (0..PATTERN_LEN).map(|i| (i * 7 % 251) as u8).collect())
}

/// An image in memory that fails any call outside it (the finding this target is for)
/// and can be told to fail every call.
struct Image {
    bytes: Mutex<Vec<u8>>,
    read_only: bool,
    fail: AtomicBool,
    /// Calls that returned an error.
    errors: AtomicU64,
}

impl Image {
    fn new(size: usize, read_only: bool) -> Image {
        Image {
            bytes: Mutex::new(pattern()[..size].to_vec()),
            read_only,
            fail: AtomicBool::new(false),
            errors: AtomicU64::new(0),
        }
    }

    /// The image's bytes, locked.
    fn bytes(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.bytes.lock().expect("image lock")
    }

    /// Asserts that the device asks for a range inside the image (and for no change to a
    /// read-only one), then fails if told to.
    fn call(&self, what: &str, offset: u64, len: u64, writes: bool) -> Result<(), DiskError> {
        let size = self.size();
        assert!(
            check_range(offset, len, size).is_ok(),
            "{what} of {len} bytes at {offset} is outside the {size}-byte image"
        );
        assert!(!(writes && self.read_only), "{what} on a read-only image");
        if self.fail.load(Ordering::Relaxed) {
            self.errors.fetch_add(1, Ordering::Relaxed);
            return Err(DiskError::Io {
                op: "fuzzed failure",
                source: std::io::Error::from_raw_os_error(5), // EIO
            });
        }
        Ok(())
    }
}

impl BlockDevice for Image {
    fn size(&self) -> u64 {
        self.bytes.lock().expect("image lock").len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        self.call("read", offset, buf.len() as u64, false)?;
        let o = offset as usize;
        buf.copy_from_slice(&self.bytes.lock().expect("image lock")[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, data: &[u8], offset: u64, _fua: bool) -> Result<(), DiskError> {
        self.call("write", offset, data.len() as u64, true)?;
        let o = offset as usize;
        self.bytes.lock().expect("image lock")[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), DiskError> {
        self.call("flush", 0, 0, false)
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.call("trim", offset, len, true)?;
        self.bytes.lock().expect("image lock")[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> Result<(), DiskError> {
        self.call("write-zeroes", offset, len, true)?;
        self.bytes.lock().expect("image lock")[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

/// A copy of guest memory, region by region, that a model can change and compare.
#[derive(Clone, PartialEq, Eq)]
struct Shadow(Vec<Vec<u8>>);

impl Shadow {
    fn of(mem: &Mem) -> Shadow {
        Shadow(
            REGIONS
                .iter()
                .map(|&(base, len)| {
                    let mut v = vec![0u8; len];
                    mem.read_slice(&mut v, GuestAddress(base))
                        .expect("a region reads");
                    v
                })
                .collect(),
        )
    }

    /// The region and offset of guest address `a`.
    fn locate(a: u64) -> Option<(usize, usize)> {
        REGIONS.iter().enumerate().find_map(|(i, &(base, len))| {
            (a >= base && a - base < len as u64).then(|| (i, (a - base) as usize))
        })
    }

    /// `len` bytes at `addr` as pieces of regions (region, offset, length); `None` if a
    /// byte lies outside guest memory.
    fn pieces(addr: GuestAddress, len: u64) -> Option<Vec<(usize, usize, usize)>> {
        let mut out = Vec::new();
        let (mut a, mut left) = (addr.0, len);
        while left > 0 {
            let (r, o) = Shadow::locate(a)?;
            let n = left.min((REGIONS[r].1 - o) as u64);
            out.push((r, o, n as usize));
            a = a.checked_add(n)?;
            left -= n;
        }
        Some(out)
    }

    fn contains(addr: GuestAddress, len: u64) -> bool {
        Shadow::pieces(addr, len).is_some()
    }

    fn byte(&self, a: u64) -> u8 {
        let (r, o) = Shadow::locate(a).expect("an address in guest memory");
        self.0[r][o]
    }

    fn set(&mut self, a: u64, v: u8) {
        let (r, o) = Shadow::locate(a).expect("an address in guest memory");
        self.0[r][o] = v;
    }

    /// The bytes of `bufs`, one after the other.
    fn gather(&self, bufs: &[(GuestAddress, u64)]) -> Vec<u8> {
        let mut out = Vec::new();
        for &(a, l) in bufs {
            for (r, o, n) in Shadow::pieces(a, l).expect("a buffer in guest memory") {
                out.extend_from_slice(&self.0[r][o..o + n]);
            }
        }
        out
    }

    /// Writes `data` over `bufs`, one after the other, as far as it goes.
    fn scatter(&mut self, bufs: &[(GuestAddress, u64)], mut data: &[u8]) {
        for &(a, l) in bufs {
            for (r, o, n) in Shadow::pieces(a, l).expect("a buffer in guest memory") {
                let n = n.min(data.len());
                self.0[r][o..o + n].copy_from_slice(&data[..n]);
                data = &data[n..];
            }
        }
    }

    /// Guest addresses where `self` and `other` differ.
    fn diff(&self, other: &Shadow) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, (a, b)) in self.0.iter().zip(&other.0).enumerate() {
            for (o, (x, y)) in a.iter().zip(b).enumerate() {
                if x != y {
                    out.push(REGIONS[i].0 + o as u64);
                }
            }
        }
        out
    }
}

/// The device's state for one input.
struct Rig<'a> {
    mem: &'a Mem,
    vq: MockSplitQueue<'a, Mem>,
    queue: Queue,
    qsize: u16,
    /// Avail entries offered so far (the avail ring's index) and since the last run.
    offered: u16,
    pending: u16,
    image: Image,
    limits: Limits,
    chains: usize,
    /// The image before the chain being checked, and what it should be after it.
    img_before: Vec<u8>,
    img_want: Vec<u8>,
}

impl Rig<'_> {
    fn offer(&mut self, head: u16) {
        if self.pending >= self.qsize {
            return;
        }
        let slot = usize::from(self.offered % self.qsize);
        self.vq
            .avail()
            .ring()
            .ref_at(slot)
            .expect("a slot in the ring")
            .store(head.to_le());
        self.offered = self.offered.wrapping_add(1);
        self.pending += 1;
        self.vq.avail().idx().store(self.offered.to_le());
    }

    /// Takes every available chain off the queue, as the device does after a kick.
    fn run(&mut self) {
        self.pending = 0;
        while self.chains < MAX_CHAINS {
            let Some(chain) = self.queue.pop_descriptor_chain(self.mem) else {
                break;
            };
            self.chains += 1;
            let mem_before = Shadow::of(self.mem);
            // (Buffers reused: the image may be 2 MiB, and executions are many.)
            let mut img_before = std::mem::take(&mut self.img_before);
            img_before.clone_from(&self.image.bytes());
            let errors = self.image.errors.load(Ordering::Relaxed);
            let out = handle(self.mem, chain, &self.image, SERIAL, self.limits);
            let failed_calls = self.image.errors.load(Ordering::Relaxed) - errors;
            let mut img_want = std::mem::take(&mut self.img_want);
            self.check(&out, &mem_before, &img_before, &mut img_want, failed_calls);
            self.img_before = img_before;
            self.img_want = img_want;
            // Returned as the device returns it (an out-of-range head is refused).
            let _ = self.queue.add_used(self.mem, out.head, out.used);
        }
    }

    fn check(
        &self,
        out: &Outcome,
        mem_before: &Shadow,
        img_before: &[u8],
        img_want: &mut Vec<u8>,
        failed_calls: u64,
    ) {
        let mem_after = Shadow::of(self.mem);
        let img_after = self.image.bytes();
        let image_unchanged = || assert!(*img_after == img_before, "the image changed: {out:?}");
        match &out.verdict {
            Verdict::Unanswerable { .. } => {
                assert_eq!(out.used, 0, "{out:?}");
                image_unchanged();
                assert!(mem_after == *mem_before, "guest memory changed: {out:?}");
                assert_eq!(failed_calls, 0);
            }
            Verdict::Malformed { status, .. } => {
                image_unchanged();
                assert_eq!(failed_calls, 0);
                assert_eq!(out.used, 1, "no status byte for an accepted chain: {out:?}");
                let mut want = mem_before.clone();
                want.set(status.0, S_IOERR);
                assert!(mem_after == want, "guest memory: {out:?}");
            }
            Verdict::Ran {
                request,
                status,
                failure,
            } => {
                assert!(
                    [S_OK, S_IOERR, S_UNSUPP].contains(status),
                    "status {status}: {out:?}"
                );
                assert_eq!(failure.is_none(), *status == S_OK, "{out:?}");
                for &(a, l) in request.readable.iter().chain(&request.writable) {
                    assert!(
                        Shadow::contains(a, l),
                        "a buffer outside guest memory: {out:?}"
                    );
                }
                assert!(
                    out.used >= 1,
                    "no status byte for an accepted chain: {out:?}"
                );
                assert_eq!(mem_after.byte(request.status.0), *status, "{out:?}");
                if failed_calls > 0 {
                    assert_eq!(*status, S_IOERR, "a failed disk call: {out:?}");
                }
                if !KINDS.contains(&request.kind) {
                    assert_eq!(*status, S_UNSUPP, "{out:?}");
                }
                if *status == S_OK {
                    let (want_mem, writes, used) =
                        self.model(request, mem_before, img_before, img_want);
                    let want_img = if writes { &img_want[..] } else { img_before };
                    assert!(*img_after == want_img, "the image: {out:?}");
                    assert!(mem_after == want_mem, "guest memory: {out:?}");
                    assert_eq!(out.used, used, "{out:?}");
                } else {
                    image_unchanged();
                    assert_eq!(out.used, 1, "{out:?}");
                    // Only the device-writable buffers and the status byte may change (a
                    // read may fail half-way): put their old contents back and compare.
                    let mut masked = mem_after.clone();
                    for &(a, l) in &request.writable {
                        masked.scatter(&[(a, l)], &mem_before.gather(&[(a, l)]));
                    }
                    masked.set(request.status.0, mem_before.byte(request.status.0));
                    if masked != *mem_before {
                        let at = masked.diff(mem_before);
                        panic!("guest memory changed at {at:x?}: {out:?}");
                    }
                }
            }
        }
    }

    /// What a request answered `VIRTIO_BLK_S_OK` must have done, from guest memory `mem`
    /// and image `img` before it: guest memory afterwards, whether it changed the image
    /// (then into `want`), and the used length.
    fn model(
        &self,
        r: &Request,
        mem: &Shadow,
        img: &[u8],
        want: &mut Vec<u8>,
    ) -> (Shadow, bool, u32) {
        let mut mem = mem.clone();
        let size = img.len() as u64;
        let writes = matches!(
            r.kind,
            VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES
        );
        if writes {
            want.clear();
            want.extend_from_slice(img);
        }
        let total = |bufs: &[(GuestAddress, u64)]| bufs.iter().map(|&(_, l)| l).sum::<u64>();
        let (rlen, wlen) = (total(&r.readable), total(&r.writable));
        // The range a read or write covers, which must have been checked.
        let range = |len: u64| {
            assert!(len.is_multiple_of(SECTOR_SIZE), "not whole sectors: {r:?}");
            let off = r.sector.checked_mul(SECTOR_SIZE).expect("sector overflow");
            assert!(check_range(off, len, size).is_ok(), "past the end: {r:?}");
            off as usize..(off + len) as usize
        };
        let mut used = 1;
        match r.kind {
            VIRTIO_BLK_T_IN => {
                assert!(r.readable.is_empty(), "a read with readable data: {r:?}");
                let span = range(wlen);
                mem.scatter(&r.writable, &img[span]);
                used = u32::try_from(wlen + 1).unwrap_or(u32::MAX);
            }
            VIRTIO_BLK_T_OUT => {
                assert!(r.writable.is_empty(), "a write with writable data: {r:?}");
                assert!(!self.image.read_only);
                let span = range(rlen);
                want[span].copy_from_slice(&mem.gather(&r.readable));
            }
            VIRTIO_BLK_T_FLUSH => {}
            VIRTIO_BLK_T_GET_ID => {
                let n = wlen.min(SERIAL_LEN as u64) as usize;
                mem.scatter(&r.writable, &SERIAL[..n]);
                used = n as u32 + 1;
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let discard = r.kind == VIRTIO_BLK_T_DISCARD;
                assert!(r.writable.is_empty(), "writable data: {r:?}");
                assert!(!self.image.read_only);
                let (max_sectors, max_seg) = if discard {
                    (self.limits.max_discard_sectors, self.limits.max_discard_seg)
                } else {
                    (
                        self.limits.max_write_zeroes_sectors,
                        self.limits.max_write_zeroes_seg,
                    )
                };
                assert!(rlen > 0 && rlen.is_multiple_of(16), "segments: {r:?}");
                assert!(rlen / 16 <= u64::from(max_seg), "too many segments: {r:?}");
                for seg in mem.gather(&r.readable).chunks_exact(16) {
                    let sector = u64::from_le_bytes(seg[0..8].try_into().expect("8 bytes"));
                    let sectors = u32::from_le_bytes(seg[8..12].try_into().expect("4 bytes"));
                    let flags = u32::from_le_bytes(seg[12..16].try_into().expect("4 bytes"));
                    let allowed = if discard {
                        0
                    } else {
                        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                    };
                    assert_eq!(flags & !allowed, 0, "unknown flags accepted: {r:?}");
                    assert!(sectors <= max_sectors, "segment too long: {r:?}");
                    let off = sector.checked_mul(SECTOR_SIZE).expect("sector overflow");
                    let len = u64::from(sectors) * SECTOR_SIZE;
                    assert!(check_range(off, len, size).is_ok(), "past the end: {r:?}");
                    want[off as usize..(off + len) as usize].fill(0);
                }
            }
            other => panic!("type {other} answered OK: {r:?}"),
        }
        mem.set(r.status.0, S_OK);
        (mem, writes, used)
    }
}

/// A guest address: mostly in the data area, sometimes anywhere in the low regions (the
/// virtqueue included), in the third region, across a region edge, or anywhere at all.
fn addr(inp: &mut Input) -> u64 {
    let sel = inp.u8();
    match sel % 8 {
        0..=3 => DATA + u64::from(inp.u16()) % (LOW_END - DATA),
        4 => REGIONS[2].0 + u64::from(inp.u16()) % REGIONS[2].1 as u64,
        5 => EDGES[usize::from(sel >> 3) % EDGES.len()] - 8 + u64::from(inp.u8() % 16),
        6 => u64::from(inp.u16()),
        _ if sel & 0x80 != 0 => u64::MAX - u64::from(inp.u8()),
        _ => inp.u64(),
    }
}

/// A buffer length.
fn len(inp: &mut Input) -> u32 {
    let sel = inp.u8();
    match sel % 8 {
        0 => 1,
        1 => 16,
        2 => 512 << ((sel >> 3) % 4),
        3 => u32::from(inp.u8()),
        4 | 5 => u32::from(inp.u16()),
        6 => 0x1_0000 - u32::from(inp.u8()),
        _ => inp.u32(),
    }
}

fn kind(inp: &mut Input) -> u32 {
    let sel = inp.u8();
    match usize::from(sel % 8) {
        k if k < KINDS.len() => KINDS[k],
        6 => u32::from(inp.u8()),
        _ => inp.u32(),
    }
}

fn sector(inp: &mut Input, disk_sectors: u64) -> u64 {
    let sel = inp.u8();
    match sel % 8 {
        0..=2 => u64::from(inp.u8()),
        3 => u64::from(inp.u16()),
        4 => disk_sectors.wrapping_sub(u64::from(inp.u8() % 8)),
        5 => u64::MAX / SECTOR_SIZE + u64::from(inp.u8() % 4),
        6 => u64::MAX - u64::from(inp.u8()),
        _ => inp.u64(),
    }
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

/// One descriptor's flags from a byte: NEXT, WRITE and INDIRECT as its low bits (their
/// virtio values), rarely an unknown bit too.
fn flags(b: u8) -> u16 {
    u16::from(b) & (NEXT | WRITE | INDIRECT) | if b & 0x80 != 0 { 0x8000 } else { 0 }
}

/// The target.
pub fn vhost_blk(data: &[u8]) {
    let mut inp = Input::new(data);
    let cfg = inp.u8();
    let size = match cfg & 3 {
        0 => 32 << 10,
        1 => 4096 + usize::from(inp.u8()),
        2 => 0,
        _ => PATTERN_LEN,
    };
    let read_only = cfg & 4 != 0;
    let qsize = 1u16 << ((cfg >> 4) % 7);
    let lim = [inp.u8(), inp.u8(), inp.u8()];
    let sectors = |b: u8| {
        if b == 0xff {
            u32::MAX
        } else {
            1 + u32::from(b)
        }
    };
    let limits = Limits {
        max_discard_sectors: sectors(lim[0]),
        max_discard_seg: 1 + u32::from(lim[2] & 3),
        max_write_zeroes_sectors: sectors(lim[1]),
        max_write_zeroes_seg: 1 + u32::from((lim[2] >> 2) & 3),
    };

    let mem = Mem::from_ranges(&REGIONS.map(|(a, l)| (GuestAddress(a), l))).expect("memory");
    for &(base, l) in &REGIONS {
        mem.write_slice(&pattern()[base as usize..][..l], GuestAddress(base))
            .expect("fill");
    }
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), qsize);
    for i in 0..qsize {
        vq.desc_table()
            .store(i, desc(0, 0, 0, 0))
            .expect("descriptor slot");
    }
    vq.avail().idx().store(0);
    vq.used().idx().store(0);
    let queue: Queue = vq.create_queue().expect("a valid queue");
    let image = Image::new(size, read_only);
    image.fail.store(cfg & 8 != 0, Ordering::Relaxed);
    let disk_sectors = size as u64 / SECTOR_SIZE;
    let mut rig = Rig {
        mem: &mem,
        vq,
        queue,
        qsize,
        offered: 0,
        pending: 0,
        image,
        limits,
        chains: 0,
        img_before: Vec::new(),
        img_want: Vec::new(),
    };

    while !inp.is_empty() {
        match inp.u8() % 10 {
            0 => {
                // One descriptor in the table.
                let i = u16::from(inp.u8()) % qsize;
                let (a, l, f) = (addr(&mut inp), len(&mut inp), flags(inp.u8()));
                let n = inp.u8();
                let next = if n & 0x80 != 0 {
                    u16::from(n)
                } else {
                    u16::from(n) % qsize
                };
                let _ = rig.vq.desc_table().store(i, desc(a, l, f, next));
            }
            1 => {
                // A linked chain from table entry `first` on, offered to the device.
                let first = u16::from(inp.u8()) % qsize;
                let n = 1 + u16::from(inp.u8()) % qsize;
                for k in 0..n {
                    let i = (first + k) % qsize;
                    let (a, l) = (addr(&mut inp), len(&mut inp));
                    let f = flags(inp.u8()) & (WRITE | INDIRECT);
                    let (f, next) = if k + 1 < n {
                        (f | NEXT, (i + 1) % qsize)
                    } else {
                        (f, 0)
                    };
                    let _ = rig.vq.desc_table().store(i, desc(a, l, f, next));
                }
                rig.offer(first);
            }
            2 => {
                let h = inp.u8();
                rig.offer(if h & 0x80 != 0 {
                    u16::from(h)
                } else {
                    u16::from(h) % qsize
                });
            }
            3 => {
                // A request header.
                let a = addr(&mut inp);
                let mut h = [0u8; 16];
                h[0..4].copy_from_slice(&kind(&mut inp).to_le_bytes());
                if inp.u8() & 0x80 != 0 {
                    h[4..8].copy_from_slice(&inp.u32().to_le_bytes());
                }
                h[8..16].copy_from_slice(&sector(&mut inp, disk_sectors).to_le_bytes());
                let _ = mem.write_slice(&h, GuestAddress(a));
            }
            4 => {
                // Discard / write-zeroes segments.
                let a = addr(&mut inp);
                let n = 1 + usize::from(inp.u8() % 4);
                let mut segs = Vec::with_capacity(16 * n);
                for _ in 0..n {
                    segs.extend_from_slice(&sector(&mut inp, disk_sectors).to_le_bytes());
                    let s = inp.u8();
                    let count = match s % 4 {
                        0 | 1 => u32::from(inp.u8()),
                        2 => u32::from(inp.u16()),
                        _ => inp.u32(),
                    };
                    segs.extend_from_slice(&count.to_le_bytes());
                    let flags = match (s >> 2) % 4 {
                        0 | 1 => 0,
                        2 => VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
                        _ => inp.u32(),
                    };
                    segs.extend_from_slice(&flags.to_le_bytes());
                }
                let _ = mem.write_slice(&segs, GuestAddress(a));
            }
            5 => {
                // Raw bytes.
                let a = addr(&mut inp);
                let n = usize::from(inp.u8() % 64);
                let _ = mem.write_slice(inp.bytes(n), GuestAddress(a));
            }
            6 => {
                // An indirect descriptor table, linked in order unless told otherwise.
                let a = addr(&mut inp);
                let n = 1 + u16::from(inp.u8() % 32);
                for k in 0..n {
                    let (d, l) = (addr(&mut inp), len(&mut inp));
                    let fb = inp.u8();
                    let mut f = flags(fb) & !NEXT;
                    let mut next = k + 1;
                    if k + 1 < n {
                        f |= NEXT;
                    }
                    if fb & 0x40 != 0 {
                        f ^= NEXT;
                        next = u16::from(inp.u8());
                    }
                    let at = a.wrapping_add(16 * u64::from(k));
                    let _ = mem.write_obj(desc(d, l, f, next), GuestAddress(at));
                }
            }
            7 => {
                let f = !rig.image.fail.load(Ordering::Relaxed);
                rig.image.fail.store(f, Ordering::Relaxed);
            }
            8 => {
                // A request-shaped chain, offered: a header, `k` descriptors for one data
                // buffer (the same one: more than the 1 MiB bounce window fits), a status
                // byte.
                let first = u16::from(inp.u8()) % qsize;
                let h = addr(&mut inp);
                let (d, l) = (addr(&mut inp), len(&mut inp));
                let f = flags(inp.u8()) & WRITE;
                let k = u16::from(inp.u8()) % qsize;
                let st = addr(&mut inp);
                let chain = std::iter::once((h, 16, 0))
                    .chain((0..k).map(|_| (d, l, f)))
                    .chain(std::iter::once((st, 1, WRITE)));
                let n = k + 2;
                for (j, (a, l, f)) in chain.enumerate() {
                    let j = j as u16;
                    let i = (first + j) % qsize;
                    let (f, next) = if j + 1 < n {
                        (f | NEXT, (i + 1) % qsize)
                    } else {
                        (f, 0)
                    };
                    let _ = rig.vq.desc_table().store(i, desc(a, l, f, next));
                }
                rig.offer(first);
            }
            _ => rig.run(),
        }
    }
    rig.run();
}

/// Builds seed inputs op by op.
struct Seed(Vec<u8>);

impl Seed {
    /// A 32 KiB writable image, a queue of 16, discard and write-zeroes limits of 64
    /// sectors and 2 segments.
    fn new() -> Seed {
        Seed(vec![4 << 4, 63, 63, 0b0101])
    }

    /// Addresses in the data area (mode 0).
    fn addr(&mut self, a: u64) {
        let off = u16::try_from(a - DATA).expect("a data-area address");
        self.0.push(0);
        self.0.extend_from_slice(&off.to_le_bytes());
    }

    /// A length as a raw u32 (mode 7).
    fn len(&mut self, l: u32) {
        self.0.push(7);
        self.0.extend_from_slice(&l.to_le_bytes());
    }

    fn header(&mut self, at: u64, kind_index: u8, sector: u8) {
        self.0.push(3);
        self.addr(at);
        self.0.extend_from_slice(&[kind_index, 0, 0, sector]);
    }

    /// A chain at table entry `first`: (address, length, device-writable).
    fn chain(&mut self, first: u8, descs: &[(u64, u32, bool)]) {
        self.0.extend_from_slice(&[1, first, descs.len() as u8 - 1]);
        for &(a, l, w) in descs {
            self.addr(a);
            self.len(l);
            self.0.push(if w { WRITE as u8 } else { 0 });
        }
    }

    /// A request-shaped chain at table entry `first`: a header, `k` descriptors for one
    /// data buffer, a status byte.
    fn request(&mut self, first: u8, hdr: u64, data: (u64, u32, bool), k: u8, status: u64) {
        self.0.extend_from_slice(&[8, first]);
        self.addr(hdr);
        self.addr(data.0);
        self.len(data.1);
        self.0.push(if data.2 { WRITE as u8 } else { 0 });
        self.0.push(k);
        self.addr(status);
    }

    fn run(&mut self) {
        self.0.push(9);
    }
}

/// Seeds: well-formed chains of every supported type (write, read back, flush, GET_ID,
/// discard, write-zeroes), one through an indirect table, a few malformed ones, and a
/// write and read of more than 1 MiB.
pub fn seeds() -> Vec<Vec<u8>> {
    let (hdr, buf, st) = (0x2000, 0x3000, 0x5000);
    let mut out = Vec::new();

    // Write 4 KiB at sector 8 in two pieces, read it back, flush, GET_ID.
    let mut s = Seed::new();
    s.header(hdr, 1, 8);
    s.chain(
        0,
        &[
            (hdr, 16, false),
            (buf, 2048, false),
            (buf + 2048, 2048, false),
            (st, 1, true),
        ],
    );
    s.run();
    s.header(hdr + 16, 0, 8);
    s.chain(
        4,
        &[(hdr + 16, 16, false), (buf, 4096, true), (st, 1, true)],
    );
    s.header(hdr + 32, 2, 0);
    s.chain(8, &[(hdr + 32, 16, false), (st + 1, 1, true)]);
    s.header(hdr + 48, 3, 0);
    s.chain(
        10,
        &[
            (hdr + 48, 16, false),
            (buf + 0x1000, 20, true),
            (st + 2, 1, true),
        ],
    );
    s.run();
    out.push(s.0);

    // Discard and write-zeroes, two segments each (one with UNMAP).
    let mut s = Seed::new();
    for (i, kind) in [(0u8, 4u8), (1, 5)] {
        let h = hdr + 16 * u64::from(i);
        let segs = buf + 0x100 * u64::from(i);
        s.header(h, kind, 0);
        s.0.push(4);
        s.addr(segs);
        // Two segments: 8 sectors at 0; 16 at 20 (with UNMAP for write-zeroes).
        let unmap = if kind == 5 { 8 } else { 0 };
        s.0.extend_from_slice(&[1, 0, 0, 0, 8, 0, 20, unmap, 16]);
        s.chain(
            3 * i,
            &[
                (h, 16, false),
                (segs, 32, false),
                (st + u64::from(i), 1, true),
            ],
        );
    }
    s.run();
    out.push(s.0);

    // A read through an indirect table of three descriptors.
    let mut s = Seed::new();
    let table = 0x4000;
    s.header(hdr, 0, 2);
    s.0.push(6);
    s.addr(table);
    s.0.push(2);
    for (a, l, f) in [
        (hdr, 16, 0u8),
        (buf, 1024, WRITE as u8),
        (st, 1, WRITE as u8),
    ] {
        s.addr(a);
        s.len(l);
        s.0.push(f);
    }
    s.0.push(0);
    s.0.push(0);
    s.addr(table);
    s.len(48);
    s.0.extend_from_slice(&[INDIRECT as u8, 0]);
    s.0.extend_from_slice(&[2, 0]);
    s.run();
    out.push(s.0);

    // Malformed: a write past the end, a read with device-readable data, a header too
    // short, no status byte; then a disk that fails a read.
    let mut s = Seed::new();
    s.header(hdr, 1, 64);
    s.chain(0, &[(hdr, 16, false), (buf, 512, false), (st, 1, true)]);
    s.header(hdr + 16, 0, 0);
    s.chain(
        3,
        &[(hdr + 16, 16, false), (buf, 512, false), (st, 1, true)],
    );
    s.chain(6, &[(hdr, 8, false), (st, 1, true)]);
    s.chain(8, &[(hdr, 16, false), (buf, 512, false)]);
    s.run();
    s.0.push(7);
    s.chain(
        10,
        &[(hdr + 16, 16, false), (buf, 512, true), (st, 1, true)],
    );
    s.run();
    out.push(s.0);

    // A 2 MiB image and a queue of 32: a 1.2 MiB write and read back, each one buffer of
    // 60 KiB given 20 times (so both cross a 1 MiB bounce window).
    let mut s = Seed(vec![3 | 5 << 4, 63, 63, 0b0101]);
    s.header(hdr, 1, 0);
    s.request(0, hdr, (DATA, 0xf000, false), 20, st);
    s.run();
    s.header(hdr, 0, 0);
    s.request(0, hdr, (DATA, 0xf000, true), 20, st);
    s.run();
    out.push(s.0);
    out
}
