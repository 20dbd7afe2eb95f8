use super::*;
use proptest::prelude::*;
use std::sync::Weak;

/// An in-memory disk (unit tests only).
struct MemDisk(Mutex<Vec<u8>>);

impl BlockDevice for MemDisk {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let d = self.0.lock().unwrap();
        check_range(offset, buf.len() as u64, d.len() as u64)?;
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, data: &[u8], offset: u64, _fua: bool) -> Result<(), DiskError> {
        let mut d = self.0.lock().unwrap();
        check_range(offset, data.len() as u64, d.len() as u64)?;
        d[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), DiskError> {
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.write_zeroes(offset, len, false)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> Result<(), DiskError> {
        let mut d = self.0.lock().unwrap();
        check_range(offset, len, d.len() as u64)?;
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

/// The source: answers every request at once from its image, and records the requests.
struct Source {
    image: Vec<u8>,
    disk: Mutex<Weak<PostcopyDisk<MemDisk>>>,
    requests: Mutex<Vec<u64>>,
    answer: bool,
}

impl BlockFetcher for Source {
    fn request(&self, units: &[u64]) {
        self.requests.lock().unwrap().extend_from_slice(units);
        if !self.answer {
            return;
        }
        let disk = self.disk.lock().unwrap().upgrade().unwrap();
        for &u in units {
            let at = (u * UNIT) as usize;
            disk.install(u, Some(&self.image[at..at + UNIT as usize]))
                .unwrap();
        }
    }
}

const STALE_BYTE: u8 = 0xEE;

/// A destination disk of `units` units whose `fresh` units hold the source's content and
/// the rest stale garbage.
fn setup(
    units: u64,
    fresh: impl Fn(u64) -> bool,
    answer: bool,
) -> (Arc<PostcopyDisk<MemDisk>>, Arc<Source>) {
    let image: Vec<u8> = (0..units * UNIT)
        .map(|i| (i / 7 % 251) as u8 ^ (i / UNIT) as u8)
        .collect();
    let mut local = vec![STALE_BYTE; image.len()];
    for u in (0..units).filter(|&u| fresh(u)) {
        let r = (u * UNIT) as usize..((u + 1) * UNIT) as usize;
        local[r.clone()].copy_from_slice(&image[r]);
    }
    let source = Arc::new(Source {
        image,
        disk: Mutex::new(Weak::new()),
        requests: Mutex::new(Vec::new()),
        answer,
    });
    let disk = Arc::new(PostcopyDisk::new(
        MemDisk(Mutex::new(local)),
        fresh,
        source.clone(),
    ));
    *source.disk.lock().unwrap() = Arc::downgrade(&disk);
    (disk, source)
}

fn unit_of(image: &[u8], u: u64) -> &[u8] {
    &image[(u * UNIT) as usize..((u + 1) * UNIT) as usize]
}

#[test]
fn fresh_units_are_local_and_stale_ones_are_fetched_before_they_are_served() {
    let (disk, source) = setup(8, |u| u % 2 == 0, true);
    let mut buf = vec![0u8; UNIT as usize];
    disk.read_at(&mut buf, 0).unwrap();
    assert!(source.requests.lock().unwrap().is_empty());
    assert_eq!(buf, unit_of(&source.image, 0));
    // Bytes 100.. of unit 0 and the start of the stale unit 1: one request, for unit 1.
    let mut buf = vec![0u8; UNIT as usize];
    disk.read_at(&mut buf, 100).unwrap();
    assert_eq!(&buf[..], &source.image[100..100 + UNIT as usize]);
    assert_eq!(*source.requests.lock().unwrap(), vec![1]);
    let s = disk.stats();
    assert_eq!((s.units_local, s.units_fetched, s.reads_waited), (4, 1, 1));
    assert_eq!(disk.missing(), 3);
}

#[test]
fn a_unit_the_guest_wrote_whole_is_never_fetched_nor_overwritten_by_a_late_arrival() {
    let (disk, source) = setup(4, |_| false, true);
    disk.write_at(&[0x11; UNIT as usize], UNIT, false).unwrap();
    assert!(source.requests.lock().unwrap().is_empty());
    // The push's copy of unit 1 arrives late: dropped.
    assert!(!disk.install(1, Some(unit_of(&source.image, 1))).unwrap());
    let mut buf = vec![0u8; UNIT as usize];
    disk.read_at(&mut buf, UNIT).unwrap();
    assert!(buf.iter().all(|&b| b == 0x11));
    let s = disk.stats();
    assert_eq!((s.units_owned, s.arrivals_discarded), (1, 1));
}

#[test]
fn a_partial_write_to_a_stale_unit_merges_into_the_fetched_unit() {
    let (disk, source) = setup(2, |_| false, true);
    disk.write_at(&[0x22; 10], 5, false).unwrap();
    assert_eq!(*source.requests.lock().unwrap(), vec![0]);
    let mut buf = vec![0u8; UNIT as usize];
    disk.read_at(&mut buf, 0).unwrap();
    let mut want = unit_of(&source.image, 0).to_vec();
    want[5..15].fill(0x22);
    assert_eq!(buf, want);
}

#[test]
fn a_failed_session_fails_reads_of_missing_units_but_serves_present_ones() {
    let (disk, _source) = setup(2, |u| u == 0, false);
    let waiter = {
        let disk = disk.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 16];
            disk.read_at(&mut buf, UNIT)
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(50));
    disk.fail("the source went away".into());
    let e = waiter.join().unwrap().unwrap_err();
    assert!(e.to_string().contains("the source went away"), "{e}");
    assert_eq!(e.errno(), libc::EIO);
    let mut buf = vec![0u8; 16];
    disk.read_at(&mut buf, 0).unwrap();
    assert!(disk.read_at(&mut buf, UNIT).is_err());
}

#[test]
fn readers_wait_for_arrivals_delivered_by_another_thread() {
    let (disk, source) = setup(64, |u| u % 4 == 0, false);
    let readers: Vec<_> = (0..4)
        .map(|t| {
            let disk = disk.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 3 * UNIT as usize];
                for u in (t..60).step_by(4) {
                    disk.read_at(&mut buf, u * UNIT).unwrap();
                }
            })
        })
        .collect();
    // Deliver everything in reverse order, duplicates included.
    for u in (0..64).rev().chain(0..64) {
        if !disk.is_present(u) {
            disk.install(u, Some(unit_of(&source.image, u))).unwrap();
        }
        let _ = disk.install(u, Some(unit_of(&source.image, u)));
    }
    for r in readers {
        r.join().unwrap();
    }
    assert!(disk.is_complete());
    assert_eq!(disk.file().0.lock().unwrap()[..], source.image[..]);
}

#[derive(Clone, Debug)]
enum Op {
    Read(u64, u64),
    Write(u64, u64, u8),
    Zero(u64, u64),
    Arrive(u64),
}

fn op(units: u64) -> impl Strategy<Value = Op> {
    let size = units * UNIT;
    let range = (0..size).prop_flat_map(move |o| (Just(o), 0..=(size - o).min(3 * UNIT)));
    prop_oneof![
        range.clone().prop_map(|(o, l)| Op::Read(o, l)),
        (range.clone(), any::<u8>()).prop_map(|((o, l), b)| Op::Write(o, l, b)),
        range.prop_map(|(o, l)| Op::Zero(o, l)),
        (0..units).prop_map(Op::Arrive),
    ]
}

proptest! {
    /// Any interleaving of guest reads, writes, zeroes and (possibly late) arrivals: a read
    /// returns the source's data overlaid with the guest's writes, never a stale byte, and
    /// at the end the disk equals exactly that.
    #[test]
    fn no_stale_byte_is_served_and_no_guest_write_is_lost(
        fresh in proptest::collection::vec(any::<bool>(), 8),
        ops in proptest::collection::vec(op(8), 1..40),
    ) {
        let fresh2 = fresh.clone();
        let (disk, source) = setup(8, move |u| fresh2[u as usize], true);
        let mut model = source.image.clone();
        for op in ops {
            match op {
                Op::Read(o, l) => {
                    let mut buf = vec![0u8; l as usize];
                    disk.read_at(&mut buf, o).unwrap();
                    prop_assert_eq!(&buf[..], &model[o as usize..(o + l) as usize]);
                }
                Op::Write(o, l, b) => {
                    disk.write_at(&vec![b; l as usize], o, false).unwrap();
                    model[o as usize..(o + l) as usize].fill(b);
                }
                Op::Zero(o, l) => {
                    disk.write_zeroes(o, l, false).unwrap();
                    model[o as usize..(o + l) as usize].fill(0);
                }
                Op::Arrive(u) => {
                    disk.install(u, Some(unit_of(&source.image, u))).unwrap();
                }
            }
        }
        for u in 0..8 {
            disk.install(u, Some(unit_of(&source.image, u))).unwrap();
        }
        prop_assert!(disk.is_complete());
        prop_assert_eq!(&disk.file().0.lock().unwrap()[..], &model[..]);
        // A fresh unit is never asked for.
        for u in source.requests.lock().unwrap().iter() {
            prop_assert!(!fresh[*u as usize]);
        }
    }
}
