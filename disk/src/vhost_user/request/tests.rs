//! Requests taken apart and run, well formed and not, over chains a mock driver builds in
//! real guest memory (`virtio_queue::mock::MockSplitQueue` over a `GuestMemoryMmap`).

use super::*;
use crate::device::DiskError;
use proptest::prelude::*;
use std::sync::Mutex;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as Desc, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestMemoryMmap;

type Mem = GuestMemoryMmap<()>;

const MEM_SIZE: u64 = 16 << 20;
const DISK_SIZE: u64 = 1 << 20;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const W: u16 = VRING_DESC_F_WRITE as u16;

/// A disk in memory whose contents a test can compare.
struct MemDisk {
    bytes: Mutex<Vec<u8>>,
    read_only: bool,
    fail: bool,
    /// Each read_at and write_at: (offset, length, is a write).
    calls: Mutex<Vec<(u64, usize, bool)>>,
}

impl MemDisk {
    fn new() -> MemDisk {
        MemDisk {
            bytes: Mutex::new((0..DISK_SIZE).map(|i| (i * 7 % 251) as u8).collect()),
            read_only: false,
            fail: false,
            calls: Mutex::new(Vec::new()),
        }
    }

    fn image(&self) -> Vec<u8> {
        self.bytes.lock().unwrap().clone()
    }

    fn err(&self) -> Result<(), DiskError> {
        if self.fail {
            Err(DiskError::io("pread", std::io::Error::from_raw_os_error(5)))
        } else {
            Ok(())
        }
    }
}

impl BlockDevice for MemDisk {
    fn size(&self) -> u64 {
        DISK_SIZE
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        self.err()?;
        check_range(offset, buf.len() as u64, DISK_SIZE)?;
        self.calls.lock().unwrap().push((offset, buf.len(), false));
        let o = offset as usize;
        buf.copy_from_slice(&self.bytes.lock().unwrap()[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, data: &[u8], offset: u64, _fua: bool) -> Result<(), DiskError> {
        self.err()?;
        check_range(offset, data.len() as u64, DISK_SIZE)?;
        self.calls.lock().unwrap().push((offset, data.len(), true));
        let o = offset as usize;
        self.bytes.lock().unwrap()[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), DiskError> {
        self.err()
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.write_zeroes(offset, len, false)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> Result<(), DiskError> {
        self.err()?;
        check_range(offset, len, DISK_SIZE)?;
        self.bytes.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

const LIMITS: Limits = Limits {
    max_discard_sectors: 64,
    max_discard_seg: 2,
    max_write_zeroes_sectors: 64,
    max_write_zeroes_seg: 2,
};

fn mem() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(Desc::new(addr, len, flags, 0))
}

fn header(mem: &Mem, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
}

/// Parses the chain `descs` (linked in order) and runs it if it is a request; returns
/// what was parsed and, for a request, its outcome. The status byte is written as the
/// device does.
fn go(mem: &Mem, disk: &MemDisk, descs: &[RawDescriptor]) -> (Parsed, Option<Done>) {
    let q = MockSplitQueue::new(mem, 16);
    let chain = q.build_desc_chain(descs).unwrap();
    finish(mem, disk, parse(chain))
}

fn finish(mem: &Mem, disk: &MemDisk, parsed: Parsed) -> (Parsed, Option<Done>) {
    let serial = *b"serial-0123456789abc";
    let dev = Device {
        disk,
        serial: &serial,
        limits: LIMITS,
    };
    match &parsed {
        Parsed::Request(r) => {
            let done = r.run(mem, &dev);
            assert!(write_status(mem, r.status, done.status));
            (parsed, Some(done))
        }
        Parsed::Malformed { status, .. } => {
            assert!(write_status(mem, *status, S_IOERR));
            (parsed, None)
        }
        Parsed::Unanswerable { .. } => (parsed, None),
    }
}

fn status(mem: &Mem) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

fn expect_ioerr(mem: &Mem, disk: &MemDisk, descs: &[RawDescriptor]) -> String {
    let before = disk.image();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let (p, done) = go(mem, disk, descs);
    let why = match (&p, done) {
        (Parsed::Malformed { why, .. }, None) => why.to_string(),
        (Parsed::Request(_), Some(d)) => {
            assert_eq!(d.status, S_IOERR, "{p:?}");
            format!("{:?}", d.why)
        }
        other => panic!("expected an IOERR answer, got {other:?}"),
    };
    assert_eq!(status(mem), S_IOERR);
    assert!(disk.image() == before, "the image changed ({why})");
    why
}

#[test]
fn reads_writes_flushes_and_ids() {
    let mem = mem();
    let disk = MemDisk::new();
    // Write 8 KiB at sector 8, split over two data descriptors.
    header(&mem, VIRTIO_BLK_T_OUT, 8);
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 13) as u8).collect();
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    let (_, done) = go(
        &mem,
        &disk,
        &[
            d(HDR, 16, 0),
            d(DATA, 4096, 0),
            d(DATA + 4096, 4096, 0),
            d(STATUS, 1, W),
        ],
    );
    assert_eq!(done.unwrap().status, S_OK);
    assert_eq!(status(&mem), S_OK);
    assert_eq!(&disk.image()[4096..4096 + 8192], &data[..]);

    // Read it back into another buffer, with the header and status sharing descriptors
    // with the data (any layout is allowed).
    header(&mem, VIRTIO_BLK_T_IN, 8);
    let (_, done) = go(
        &mem,
        &disk,
        &[d(HDR, 16, 0), d(DATA + 0x10000, 8192, W), d(STATUS, 1, W)],
    );
    let done = done.unwrap();
    assert_eq!((done.status, done.used), (S_OK, 8193));
    let mut back = vec![0u8; 8192];
    mem.read_slice(&mut back, GuestAddress(DATA + 0x10000))
        .unwrap();
    assert_eq!(back, data);

    header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    let (_, done) = go(&mem, &disk, &[d(HDR, 16, 0), d(STATUS, 1, W)]);
    assert_eq!(done.unwrap().status, S_OK);

    header(&mem, VIRTIO_BLK_T_GET_ID, 0);
    let (_, done) = go(
        &mem,
        &disk,
        &[d(HDR, 16, 0), d(DATA, 20, W), d(STATUS, 1, W)],
    );
    assert_eq!(done.unwrap().used, 21);
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"serial-0123456789abc");
}

#[test]
fn scattered_buffers_make_one_disk_call_per_window() {
    // A guest request is usually one page per descriptor, wherever the pages are: the
    // disk sees it as one call (at a destination, one request for its stale blocks).
    let mem = mem();
    let disk = MemDisk::new();
    let pages: Vec<u64> = vec![DATA + 0x5000, DATA, DATA + 0x9000, DATA + 0x2000];
    let data: Vec<u8> = (0..4 * 4096u32).map(|i| (i % 241) as u8).collect();
    for (k, &p) in pages.iter().enumerate() {
        mem.write_slice(&data[k * 4096..(k + 1) * 4096], GuestAddress(p))
            .unwrap();
    }
    let chain = |flags: u16| {
        let mut c = vec![d(HDR, 16, 0)];
        c.extend(pages.iter().map(|&p| d(p, 4096, flags)));
        c.push(d(STATUS, 1, W));
        c
    };
    header(&mem, VIRTIO_BLK_T_OUT, 16);
    assert_eq!(go(&mem, &disk, &chain(0)).1.unwrap().status, S_OK);
    assert_eq!(&disk.image()[8192..8192 + data.len()], &data[..]);
    for &p in &pages {
        mem.write_slice(&[0u8; 4096], GuestAddress(p)).unwrap();
    }
    header(&mem, VIRTIO_BLK_T_IN, 16);
    assert_eq!(go(&mem, &disk, &chain(W)).1.unwrap().status, S_OK);
    for (k, &p) in pages.iter().enumerate() {
        let mut back = vec![0u8; 4096];
        mem.read_slice(&mut back, GuestAddress(p)).unwrap();
        assert_eq!(back, &data[k * 4096..(k + 1) * 4096], "page {k}");
    }
    assert_eq!(
        *disk.calls.lock().unwrap(),
        vec![(8192, 16384, true), (8192, 16384, false)]
    );

    // Past a window's worth, the calls are split at most every CHUNK bytes.
    let sg = Sg(vec![
        (GuestAddress(0), 600 << 10),
        (GuestAddress(1 << 30), 600 << 10),
        (GuestAddress(2 << 30), 3 << 20),
    ]);
    let w: Vec<(u64, usize)> = sg
        .windows()
        .iter()
        .map(|(off, p)| (*off, p.iter().map(|&(_, n)| n).sum()))
        .collect();
    let mib = 1 << 20;
    assert_eq!(
        w,
        vec![
            (0, 600 << 10),
            (600 << 10, 600 << 10),
            (1200 << 10, mib),
            ((1200 << 10) + mib as u64, mib),
            ((1200 << 10) + 2 * mib as u64, mib),
        ]
    );
}

fn segment(mem: &Mem, at: u64, sector: u64, sectors: u32, flags: u32) {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&sectors.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&s, GuestAddress(at)).unwrap();
}

#[test]
fn discard_and_write_zeroes_respect_their_limits() {
    let mem = mem();
    let disk = MemDisk::new();
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        let disk = MemDisk::new();
        segment(&mem, DATA, 0, 8, 0);
        segment(&mem, DATA + 16, 100, 16, 0);
        header(&mem, kind, 0);
        let descs = [d(HDR, 16, 0), d(DATA, 32, 0), d(STATUS, 1, W)];
        let (_, done) = go(&mem, &disk, &descs);
        assert_eq!(done.unwrap().status, S_OK);
        let img = disk.image();
        assert!(img[..4096].iter().all(|&b| b == 0));
        assert!(img[100 * 512..116 * 512].iter().all(|&b| b == 0));
        let orig = MemDisk::new().image();
        assert!(img[4096..100 * 512] == orig[4096..100 * 512]);
        assert!(img[116 * 512..] == orig[116 * 512..]);

        // A segment past the end, after a good one: nothing is applied.
        let disk = MemDisk::new();
        segment(&mem, DATA + 16, DISK_SIZE / 512 - 4, 8, 0);
        expect_ioerr(&mem, &disk, &descs);
        // More sectors than allowed in one segment.
        segment(&mem, DATA + 16, 0, 65, 0);
        expect_ioerr(&mem, &disk, &descs);
        // Too many segments.
        segment(&mem, DATA + 16, 0, 1, 0);
        segment(&mem, DATA + 32, 0, 1, 0);
        expect_ioerr(
            &mem,
            &disk,
            &[d(HDR, 16, 0), d(DATA, 48, 0), d(STATUS, 1, W)],
        );
        // Not a whole number of segments.
        expect_ioerr(
            &mem,
            &disk,
            &[d(HDR, 16, 0), d(DATA, 20, 0), d(STATUS, 1, W)],
        );
        // Sector overflow.
        segment(&mem, DATA + 16, u64::MAX / 256, 1, 0);
        expect_ioerr(&mem, &disk, &descs);
    }
    // Unknown flags: unsupported, nothing applied (unmap is fine for write-zeroes only).
    segment(&mem, DATA, 0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    segment(&mem, DATA + 16, 0, 8, 0);
    let before = disk.image();
    header(&mem, VIRTIO_BLK_T_DISCARD, 0);
    let descs = [d(HDR, 16, 0), d(DATA, 32, 0), d(STATUS, 1, W)];
    assert_eq!(go(&mem, &disk, &descs).1.unwrap().status, S_UNSUPP);
    assert!(disk.image() == before);
    header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    assert_eq!(go(&mem, &disk, &descs).1.unwrap().status, S_OK);
    segment(&mem, DATA, 0, 8, 4);
    assert_eq!(go(&mem, &disk, &descs).1.unwrap().status, S_UNSUPP);
}

#[test]
fn unknown_types_are_unsupported() {
    let mem = mem();
    let disk = MemDisk::new();
    for kind in [2, 14, 15, 16, 0x8000_0000, u32::MAX] {
        header(&mem, kind, 0);
        let (_, done) = go(&mem, &disk, &[d(HDR, 16, 0), d(STATUS, 1, W)]);
        assert_eq!(done.unwrap().status, S_UNSUPP);
        assert_eq!(status(&mem), S_UNSUPP);
    }
}

#[test]
fn malformed_chains_are_answered_ioerr_and_change_nothing() {
    let mem = mem();
    let disk = MemDisk::new();
    // Too short for a header.
    expect_ioerr(&mem, &disk, &[d(HDR, 8, 0), d(STATUS, 1, W)]);
    expect_ioerr(&mem, &disk, &[d(STATUS, 1, W)]);
    // The header is device-writable (so there is no header).
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    expect_ioerr(&mem, &disk, &[d(HDR, 16, W), d(STATUS, 1, W)]);
    // A write whose data is device-writable, a read whose data is device-readable.
    expect_ioerr(
        &mem,
        &disk,
        &[d(HDR, 16, 0), d(DATA, 512, W), d(STATUS, 1, W)],
    );
    header(&mem, VIRTIO_BLK_T_IN, 0);
    expect_ioerr(
        &mem,
        &disk,
        &[d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, W)],
    );
    // A readable descriptor after a writable one.
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    expect_ioerr(
        &mem,
        &disk,
        &[
            d(HDR, 16, 0),
            d(DATA, 512, W),
            d(DATA + 512, 512, 0),
            d(STATUS, 1, W),
        ],
    );
    for kind in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
        let dir = if kind == VIRTIO_BLK_T_IN { W } else { 0 };
        // Past the end, straddling the end, overflowing sectors, not whole sectors.
        for (sector, len) in [
            (DISK_SIZE / 512, 512),
            (DISK_SIZE / 512 - 1, 1024),
            (u64::MAX / 512 + 1, 512),
            (u64::MAX, 512),
            (0, 100),
        ] {
            header(&mem, kind, sector);
            let why = expect_ioerr(
                &mem,
                &disk,
                &[d(HDR, 16, 0), d(DATA, len, dir), d(STATUS, 1, W)],
            );
            assert!(why.contains("Malformed"), "{why}");
        }
        // A data buffer outside guest memory, or wrapping around the address space.
        header(&mem, kind, 0);
        expect_ioerr(
            &mem,
            &disk,
            &[d(HDR, 16, 0), d(MEM_SIZE - 512, 1024, dir), d(STATUS, 1, W)],
        );
        expect_ioerr(
            &mem,
            &disk,
            &[d(HDR, 16, 0), d(u64::MAX - 100, 512, dir), d(STATUS, 1, W)],
        );
    }
    // A write to a read-only disk.
    let ro = MemDisk {
        read_only: true,
        ..MemDisk::new()
    };
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    expect_ioerr(
        &mem,
        &ro,
        &[d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, W)],
    );
    // The disk fails.
    let bad = MemDisk {
        fail: true,
        ..MemDisk::new()
    };
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let why = expect_ioerr(
        &mem,
        &bad,
        &[d(HDR, 16, 0), d(DATA, 512, W), d(STATUS, 1, W)],
    );
    assert!(why.contains("Disk"), "{why}");
}

fn expect_unanswerable(mem: &Mem, parsed: Parsed) {
    assert!(
        matches!(parsed, Parsed::Unanswerable { .. }),
        "expected an unanswerable chain: {parsed:?}"
    );
    let _ = mem;
}

#[test]
fn chains_without_a_writable_status_byte_are_not_answered() {
    let mem = mem();
    let disk = MemDisk::new();
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    let before = disk.image();
    let q = MockSplitQueue::new(&mem, 16);
    // The status descriptor is device-readable, or empty.
    for descs in [
        vec![d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, 0)],
        vec![d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 0, W)],
        vec![d(HDR, 16, 0)],
    ] {
        expect_unanswerable(&mem, parse(q.build_desc_chain(&descs).unwrap()));
    }
    // The status byte's address overflows.
    expect_unanswerable(
        &mem,
        parse(
            q.build_desc_chain(&[d(HDR, 16, 0), d(u64::MAX, 2, W)])
                .unwrap(),
        ),
    );
    // A next index past the queue: the chain breaks off.
    let n = VRING_DESC_F_NEXT as u16;
    let broken = [
        RawDescriptor::from(Desc::new(HDR, 16, n, 1)),
        RawDescriptor::from(Desc::new(DATA, 512, n, 200)),
    ];
    expect_unanswerable(&mem, parse(q.build_multiple_desc_chains(&broken).unwrap()));
    // A loop: 0 -> 1 -> 0 ...
    let looped = [
        RawDescriptor::from(Desc::new(HDR, 16, n, 1)),
        RawDescriptor::from(Desc::new(STATUS, 1, n | W, 0)),
    ];
    expect_unanswerable(&mem, parse(q.build_multiple_desc_chains(&looped).unwrap()));
    // An indirect table whose length is not a whole number of descriptors.
    let indirect = [RawDescriptor::from(Desc::new(
        DATA,
        17,
        VRING_DESC_F_INDIRECT as u16,
        0,
    ))];
    expect_unanswerable(
        &mem,
        parse(q.build_multiple_desc_chains(&indirect).unwrap()),
    );
    assert!(disk.image() == before);
}

#[test]
fn indirect_chains_are_followed() {
    let mem = mem();
    let disk = MemDisk::new();
    // The table at DATA + 0x8000: header, data, status.
    let table = [
        Desc::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1),
        Desc::new(DATA, 1024, W | VRING_DESC_F_NEXT as u16, 2),
        Desc::new(STATUS, 1, W, 0),
    ];
    for (i, t) in table.iter().enumerate() {
        mem.write_obj(*t, GuestAddress(DATA + 0x8000 + 16 * i as u64))
            .unwrap();
    }
    header(&mem, VIRTIO_BLK_T_IN, 2);
    let q = MockSplitQueue::new(&mem, 16);
    let head = [RawDescriptor::from(Desc::new(
        DATA + 0x8000,
        48,
        VRING_DESC_F_INDIRECT as u16,
        0,
    ))];
    let parsed = parse(q.build_multiple_desc_chains(&head).unwrap());
    let (_, done) = finish(&mem, &disk, parsed);
    assert_eq!(done.unwrap().status, S_OK);
    let mut got = vec![0u8; 1024];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, disk.image()[1024..2048]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]
    /// Whatever the chain, nothing panics, and the image changes only through a request
    /// that was answered VIRTIO_BLK_S_OK and that writes.
    #[test]
    fn any_chain_is_answered_or_returned_and_only_good_writes_change_the_image(
        kind in prop_oneof![Just(0u32), Just(1), Just(4), Just(8), Just(11), Just(13), any::<u32>()],
        sector in prop_oneof![0u64..2100, any::<u64>()],
        descs in proptest::collection::vec(
            (prop_oneof![Just(HDR), Just(DATA), Just(STATUS), Just(MEM_SIZE - 8), any::<u64>()],
             prop_oneof![Just(1u32), Just(16), Just(512), Just(4096), 0u32..70_000, any::<u32>()],
             any::<bool>()),
            0..6),
        segs in proptest::collection::vec((0u64..2100, 0u32..80, 0u32..3), 0..3),
    ) {
        let mem = mem();
        let disk = MemDisk::new();
        header(&mem, kind, sector);
        for (i, &(s, n, f)) in segs.iter().enumerate() {
            segment(&mem, DATA + 16 * i as u64, s, n, f);
        }
        let raw: Vec<_> = descs.iter().map(|&(a, l, w)| d(a, l, if w { W } else { 0 })).collect();
        let before = disk.image();
        let q = MockSplitQueue::new(&mem, 16);
        let parsed = if raw.is_empty() {
            parse(q.build_multiple_desc_chains(&[d(HDR, 16, VRING_DESC_F_NEXT as u16)]).unwrap())
        } else {
            parse(q.build_desc_chain(&raw).unwrap())
        };
        let writes = matches!(kind, VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES);
        match finish(&mem, &disk, parsed) {
            (Parsed::Request(_), Some(done)) if done.status == S_OK && writes => {}
            _ => prop_assert!(disk.image() == before, "the image changed"),
        }
    }
}

#[test]
fn a_status_byte_outside_guest_memory_makes_the_chain_unanswerable() {
    // Found by the `vhost_blk` fuzz target: every buffer was checked against guest memory
    // but the status byte was not, so a write whose status byte lay outside guest memory
    // ran (the image changed) and went back with used length 0, as if unanswered.
    let mem = mem();
    let disk = MemDisk::new();
    let before = disk.image();
    let q = MockSplitQueue::new(&mem, 16);
    for kind in [VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_IN] {
        header(&mem, kind, 0);
        segment(&mem, DATA, 0, 8, 0);
        let dir = if kind == VIRTIO_BLK_T_IN { W } else { 0 };
        let len = if kind == VIRTIO_BLK_T_DISCARD {
            16
        } else {
            512
        };
        // The status descriptor past the end of memory, or straddling it: its data part
        // in memory, its last byte (the status) not.
        for last in [
            d(MEM_SIZE, 1, W),
            d(MEM_SIZE + 4096, 1, W),
            d(MEM_SIZE - 4, 5, W),
        ] {
            let chain = q
                .build_desc_chain(&[d(HDR, 16, 0), d(DATA, len, dir), last])
                .unwrap();
            let (parsed, done) = finish(&mem, &disk, parse(chain));
            assert!(
                disk.image() == before,
                "the image changed: {parsed:?}, {done:?}"
            );
            expect_unanswerable(&mem, parsed);
        }
    }
    // A malformed chain too: there is nowhere to answer it.
    let chain = q
        .build_desc_chain(&[d(HDR, 8, 0), d(MEM_SIZE, 1, W)])
        .unwrap();
    expect_unanswerable(&mem, parse(chain));
    assert!(disk.image() == before, "the image changed");
}
