//! The device as `vhost-user-backend` drives it: configuration, features, and requests
//! through a real `VringRwLock` over guest memory, with a mock driver on the other side.

use super::*;
use crate::device::{check_range, DiskError};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Duration;
use virtio_bindings::virtio_blk::{virtio_blk_config, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as Desc, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

const DISK: u64 = 1 << 20;

/// A disk in memory whose reads at [`SLOW`] block until the test opens the gate.
struct GatedDisk {
    bytes: Mutex<Vec<u8>>,
    open: Mutex<bool>,
    opened: Condvar,
    read_only: bool,
}

const SLOW: u64 = 64 * 512;

impl GatedDisk {
    fn new(read_only: bool) -> Arc<GatedDisk> {
        Arc::new(GatedDisk {
            bytes: Mutex::new((0..DISK).map(|i| (i % 253) as u8).collect()),
            open: Mutex::new(false),
            opened: Condvar::new(),
            read_only,
        })
    }

    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

impl BlockDevice for GatedDisk {
    fn size(&self) -> u64 {
        DISK
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_range(offset, buf.len() as u64, DISK)?;
        if offset == SLOW {
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
        }
        let o = offset as usize;
        buf.copy_from_slice(&self.bytes.lock().unwrap()[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, data: &[u8], offset: u64, _fua: bool) -> Result<(), DiskError> {
        check_range(offset, data.len() as u64, DISK)?;
        let o = offset as usize;
        self.bytes.lock().unwrap()[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), DiskError> {
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.write_zeroes(offset, len, false)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> Result<(), DiskError> {
        check_range(offset, len, DISK)?;
        self.bytes.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

#[test]
fn config_space_is_virtio_blk_config() {
    use std::mem::{offset_of, size_of};
    assert_eq!(size_of::<virtio_blk_config>(), CONFIG_LEN);
    let disk = GatedDisk::new(false);
    let opts = BlkOptions {
        logical_block_size: 4096,
        num_queues: 2,
        ..BlkOptions::default()
    };
    let blk = VhostUserBlk::new(disk, opts.clone()).unwrap();
    let c = blk.config();
    let u32_at = |o: usize| u32::from_le_bytes(c[o..o + 4].try_into().unwrap());
    let capacity = offset_of!(virtio_blk_config, capacity);
    assert_eq!(
        u64::from_le_bytes(c[capacity..capacity + 8].try_into().unwrap()),
        DISK / 512
    );
    assert_eq!(u32_at(offset_of!(virtio_blk_config, seg_max)), SEG_MAX);
    assert_eq!(u32_at(offset_of!(virtio_blk_config, blk_size)), 4096);
    let nq = offset_of!(virtio_blk_config, num_queues);
    assert_eq!(u16::from_le_bytes([c[nq], c[nq + 1]]), 2);
    let l = opts.limits;
    assert_eq!(
        u32_at(offset_of!(virtio_blk_config, max_discard_sectors)),
        l.max_discard_sectors
    );
    assert_eq!(
        u32_at(offset_of!(virtio_blk_config, max_discard_seg)),
        l.max_discard_seg
    );
    assert_eq!(
        u32_at(offset_of!(virtio_blk_config, discard_sector_alignment)),
        8
    );
    assert_eq!(
        u32_at(offset_of!(virtio_blk_config, max_write_zeroes_sectors)),
        l.max_write_zeroes_sectors
    );
    assert_eq!(
        u32_at(offset_of!(virtio_blk_config, max_write_zeroes_seg)),
        l.max_write_zeroes_seg
    );
    assert_eq!(c[offset_of!(virtio_blk_config, write_zeroes_may_unmap)], 1);

    // Reads of any window are exactly as long as asked, zeroes past the structure.
    assert_eq!(blk.get_config(0, CONFIG_LEN as u32), c.to_vec());
    assert_eq!(blk.get_config(20, 4), 4096u32.to_le_bytes().to_vec());
    assert_eq!(blk.get_config(90, 10), [&c[90..96], &[0u8; 4][..]].concat());
    assert_eq!(blk.get_config(4000, 96), vec![0u8; 96]);
    assert_eq!(blk.get_config(u32::MAX, 8), vec![0u8; 8]);
}

#[test]
fn features_follow_the_disk() {
    let bit = |f: u32| 1u64 << f;
    let rw = VhostUserBlk::new(GatedDisk::new(false), BlkOptions::default()).unwrap();
    let f = rw.features();
    for want in [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ] {
        assert_ne!(f & bit(want), 0, "feature {want} missing");
    }
    assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
    assert_eq!(f & (bit(VIRTIO_BLK_F_RO) | bit(VIRTIO_BLK_F_MQ)), 0);
    assert!(rw
        .protocol_features()
        .contains(VhostUserProtocolFeatures::CONFIG));

    let ro = VhostUserBlk::new(GatedDisk::new(true), BlkOptions::default()).unwrap();
    let f = ro.features();
    assert_ne!(f & bit(VIRTIO_BLK_F_RO), 0);
    assert_eq!(
        f & (bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES)),
        0
    );
    let mq = BlkOptions {
        num_queues: 4,
        ..BlkOptions::default()
    };
    let mq = VhostUserBlk::new(GatedDisk::new(false), mq).unwrap();
    assert_ne!(mq.features() & bit(VIRTIO_BLK_F_MQ), 0);
    assert_eq!(mq.queues_per_thread(), vec![1, 2, 4, 8]);
}

#[test]
fn bad_options_are_refused() {
    let new = |o: BlkOptions| VhostUserBlk::new(GatedDisk::new(false), o).err().unwrap();
    let d = BlkOptions::default;
    let e = new(BlkOptions {
        serial: "x".repeat(21),
        ..d()
    });
    assert!(e.to_string().contains("21 bytes"), "{e}");
    assert!(matches!(
        new(BlkOptions {
            logical_block_size: 8192,
            ..d()
        }),
        BlkError::BlockSize(8192)
    ));
    assert!(matches!(
        new(BlkOptions {
            logical_block_size: 1000,
            ..d()
        }),
        BlkError::BlockSize(1000)
    ));
    assert!(matches!(
        new(BlkOptions {
            num_queues: 0,
            ..d()
        }),
        BlkError::Queues(0)
    ));
    assert!(matches!(
        new(BlkOptions {
            max_queue_size: 100,
            ..d()
        }),
        BlkError::QueueSize(100)
    ));
    assert!(matches!(
        new(BlkOptions { workers: 0, ..d() }),
        BlkError::Workers(0)
    ));
    let mut zero = d();
    zero.limits.max_discard_seg = 0;
    assert!(matches!(new(zero), BlkError::Limits));
}

/// Guest memory, a queue of 16 set up by a mock driver, and the device's vring over it.
struct Rig {
    atomic: GuestMemoryAtomic<Mem>,
    vring: Vring,
    blk: VhostUserBlk,
    next_desc: u16,
    /// Descriptor table, available ring, used ring.
    rings: (u64, u64, u64),
}

const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const QSIZE: u16 = 16;
const W: u16 = VRING_DESC_F_WRITE as u16;

impl Rig {
    fn new(disk: Arc<dyn BlockDevice>, event_idx: bool) -> Rig {
        let mem = Mem::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let atomic = GuestMemoryAtomic::new(mem);
        let guard = atomic.memory();
        let q = MockSplitQueue::new(&*guard, QSIZE);
        let vring = Vring::new(atomic.clone(), QSIZE).unwrap();
        vring.set_queue_size(QSIZE);
        vring
            .set_queue_info(q.desc_table_addr().0, q.avail_addr().0, q.used_addr().0)
            .unwrap();
        vring.set_queue_event_idx(event_idx);
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        let blk = VhostUserBlk::new(disk, BlkOptions::default()).unwrap();
        blk.update_memory(atomic.clone()).unwrap();
        blk.set_event_idx(event_idx);
        let rings = (q.desc_table_addr().0, q.avail_addr().0, q.used_addr().0);
        drop(guard);
        Rig {
            atomic,
            vring,
            blk,
            next_desc: 0,
            rings,
        }
    }

    /// Makes a chain of `(addr, len, flags)` available; returns its head.
    fn add(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let first = self.next_desc;
        let n = descs.len() as u16;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(a, l, f))| {
                let last = i + 1 == descs.len();
                let flags = if last {
                    f
                } else {
                    f | VRING_DESC_F_NEXT as u16
                };
                RawDescriptor::from(Desc::new(a, l, flags, first + i as u16 + 1))
            })
            .collect();
        // As a driver does (a new MockSplitQueue would reset the rings).
        let mem = self.atomic.memory();
        let (table, avail, _) = self.rings;
        for (i, r) in raw.iter().enumerate() {
            mem.write_obj(*r, GuestAddress(table + 16 * (u64::from(first) + i as u64)))
                .unwrap();
        }
        let idx: u16 = mem.read_obj(GuestAddress(avail + 2)).unwrap();
        mem.write_obj(first, GuestAddress(avail + 4 + 2 * u64::from(idx % QSIZE)))
            .unwrap();
        mem.write_obj(idx.wrapping_add(1), GuestAddress(avail + 2))
            .unwrap();
        self.next_desc += n;
        first
    }

    fn header(&self, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.atomic
            .memory()
            .write_slice(&h, GuestAddress(at))
            .unwrap();
    }

    /// The kick.
    fn kick(&self) {
        self.blk
            .handle_event(0, EventSet::IN, std::slice::from_ref(&self.vring), 0)
            .unwrap();
    }

    /// The used ring so far: (head, len).
    fn used(&self) -> Vec<(u32, u32)> {
        let mem = self.atomic.memory();
        let used = self.rings.2;
        let n: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
        (0..u64::from(n))
            .map(|i| {
                let at = used + 4 + 8 * i;
                (
                    mem.read_obj(GuestAddress(at)).unwrap(),
                    mem.read_obj(GuestAddress(at + 4)).unwrap(),
                )
            })
            .collect()
    }

    fn byte(&self, at: u64) -> u8 {
        self.atomic.memory().read_obj(GuestAddress(at)).unwrap()
    }

    /// Waits (a bounded time) until `n` chains are used.
    fn wait_used(&self, n: usize) -> Vec<(u32, u32)> {
        for _ in 0..500 {
            let u = self.used();
            if u.len() >= n {
                return u;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("only {:?} used, wanted {n}", self.used());
    }
}

#[test]
fn a_blocked_read_does_not_stall_the_queue_and_stopping_waits_for_it() {
    for event_idx in [false, true] {
        let disk = GatedDisk::new(false);
        let mut rig = Rig::new(disk.clone(), event_idx);
        // 1: a read of the slow block; 2: a write elsewhere; 3: a malformed chain
        // (header only, status not writable); 4: a read that is too long.
        rig.header(HDR, VIRTIO_BLK_T_IN, SLOW / 512);
        let slow = rig.add(&[(HDR, 16, 0), (DATA, 512, W), (STATUS, 1, W)]);
        rig.header(HDR + 16, VIRTIO_BLK_T_OUT, 2);
        rig.atomic
            .memory()
            .write_slice(&[0xab; 1024], GuestAddress(DATA + 4096))
            .unwrap();
        let write = rig.add(&[
            (HDR + 16, 16, 0),
            (DATA + 4096, 1024, 0),
            (STATUS + 1, 1, W),
        ]);
        let bad = rig.add(&[(HDR + 32, 16, 0)]);
        rig.header(HDR + 48, VIRTIO_BLK_T_IN, DISK / 512 - 1);
        let long = rig.add(&[
            (HDR + 48, 16, 0),
            (DATA + 8192, 1024, W),
            (STATUS + 3, 1, W),
        ]);
        rig.kick();

        let used = rig.wait_used(3);
        std::thread::sleep(Duration::from_millis(50));
        let used_now = rig.used();
        assert_eq!(
            used_now.len(),
            3,
            "the slow read completed early: {used_now:?}"
        );
        assert!(used.contains(&(u32::from(write), 1)), "{used:?}");
        assert!(used.contains(&(u32::from(bad), 0)), "{used:?}");
        assert!(used.contains(&(u32::from(long), 1)), "{used:?}");
        assert_eq!(rig.byte(STATUS + 1), 0);
        assert_eq!(rig.byte(STATUS + 3), 1);
        assert!(disk.bytes.lock().unwrap()[1024..2048]
            .iter()
            .all(|&b| b == 0xab));

        // Stopping the queue waits for the slow read.
        let stopped = Arc::new(AtomicBool::new(false));
        let stopper = {
            let (blk, stopped) = (rig.blk.clone(), stopped.clone());
            std::thread::spawn(move || {
                blk.stop_vring(0).unwrap();
                stopped.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(!stopped.load(Ordering::SeqCst), "stop_vring did not wait");
        disk.open();
        stopper.join().unwrap();
        let used = rig.used();
        assert_eq!(used.len(), 4);
        assert!(used.contains(&(u32::from(slow), 513)), "{used:?}");
        assert_eq!(rig.byte(STATUS), 0);
        let mut got = [0u8; 512];
        rig.atomic
            .memory()
            .read_slice(&mut got, GuestAddress(DATA))
            .unwrap();
        assert_eq!(got[..], disk.bytes.lock().unwrap()[SLOW as usize..][..512]);
        let s = rig.blk.stats();
        assert_eq!(
            (s.requests, s.unanswered, s.malformed, s.disk_errors),
            (4, 1, 1, 0)
        );
        assert_eq!((s.reads, s.writes, s.flushes), (2, 1, 0));
    }
}

#[test]
fn writes_to_a_read_only_disk_fail_and_reads_work() {
    let disk = GatedDisk::new(true);
    let before = disk.bytes.lock().unwrap().clone();
    let mut rig = Rig::new(disk.clone(), true);
    rig.header(HDR, VIRTIO_BLK_T_OUT, 0);
    rig.add(&[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, W)]);
    rig.header(HDR + 16, VIRTIO_BLK_T_IN, 0);
    rig.add(&[(HDR + 16, 16, 0), (DATA, 512, W), (STATUS + 1, 1, W)]);
    rig.kick();
    rig.wait_used(2);
    rig.blk.wait_idle();
    assert_eq!((rig.byte(STATUS), rig.byte(STATUS + 1)), (1, 0));
    assert!(*disk.bytes.lock().unwrap() == before);
}

#[test]
fn serve_stops_before_and_without_a_frontend() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("blk.sock");
    let blk = VhostUserBlk::new(GatedDisk::new(false), BlkOptions::default()).unwrap();
    let stop = StopHandle::new().unwrap();
    let t = {
        let (sock, stop) = (sock.clone(), stop.clone());
        std::thread::spawn(move || serve(&sock, blk, &stop))
    };
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(sock.exists(), "serve did not listen");
    stop.stop();
    assert_eq!(t.join().unwrap().unwrap(), Ended::Stopped);
    assert!(!sock.exists(), "the socket file was left behind");

    let e = serve(
        &dir.path().join("missing/blk.sock"),
        VhostUserBlk::new(GatedDisk::new(false), BlkOptions::default()).unwrap(),
        &StopHandle::new().unwrap(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("missing/blk.sock"), "{e}");
}

/// Serves `blk` on a socket in `dir` from a thread; the socket exists when this returns.
fn serving(
    dir: &Path,
    blk: VhostUserBlk,
) -> (
    PathBuf,
    StopHandle,
    std::thread::JoinHandle<Result<Ended, ServeError>>,
) {
    let sock = dir.join("blk.sock");
    let stop = StopHandle::new().unwrap();
    let t = {
        let (sock, stop) = (sock.clone(), stop.clone());
        std::thread::spawn(move || serve(&sock, blk, &stop))
    };
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(sock.exists(), "serve did not listen");
    (sock, stop, t)
}

#[test]
fn a_vhost_user_frontend_negotiates_and_reads_the_config_then_disconnects_or_is_stopped() {
    use vhost::vhost_user::message::VhostUserConfigFlags;
    use vhost::vhost_user::{Frontend, VhostUserFrontend};
    use vhost::VhostBackend;

    let dir = tempfile::tempdir().unwrap();
    for stop_it in [false, true] {
        let opts = BlkOptions {
            serial: "proto".into(),
            ..BlkOptions::default()
        };
        let blk = VhostUserBlk::new(GatedDisk::new(true), opts).unwrap();
        let (sock, stop, t) = serving(dir.path(), blk.clone());
        let mut fe = Frontend::connect(&sock, 1).unwrap();
        fe.set_owner().unwrap();
        let features = fe.get_features().unwrap();
        assert_eq!(features, blk.features());
        assert_ne!(features & (1 << VIRTIO_BLK_F_RO), 0);
        fe.set_features(features).unwrap();
        let pf = fe.get_protocol_features().unwrap();
        assert!(pf.contains(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ));
        fe.set_protocol_features(pf).unwrap();
        assert_eq!(fe.get_queue_num().unwrap(), 1);
        let (_, config) = fe
            .get_config(
                0,
                CONFIG_LEN as u32,
                VhostUserConfigFlags::WRITABLE,
                &[0; CONFIG_LEN],
            )
            .unwrap();
        assert_eq!(config, blk.config().to_vec());
        if stop_it {
            // Stopped while a frontend is connected: the connection is closed.
            stop.stop();
            assert_eq!(t.join().unwrap().unwrap(), Ended::Stopped);
            drop(fe);
        } else {
            drop(fe);
            assert_eq!(t.join().unwrap().unwrap(), Ended::Disconnected);
        }
        assert!(!sock.exists(), "the socket file was left behind");
    }
}
