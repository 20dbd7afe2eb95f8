//! Model-based test of a disk's whole life with the real parts that decide staleness and
//! ownership: `disk::Tracked` (writes marked after they land), the replication `Ledger`,
//! and at the destination `disk::PostcopyDisk`. The standby's store and the wire are a
//! model (in-flight updates, acknowledgements, crashes that lose them or tear a block).
//!
//! Random interleavings of source writes (whole and partial), harvests, sends,
//! deliveries, acks, standby crashes and reconnects, then the switchover, then guest reads
//! and writes at the destination and (late) arrivals of stale blocks. The properties: no
//! read at the destination ever returns a byte other than the source's at switchover
//! overlaid with the destination's own writes, and at the end the destination disk is
//! exactly that.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};

use disk::{check_range, BlockDevice, BlockFetcher, BlockSize, DiskError, PostcopyDisk, Tracked};
use proptest::prelude::*;
use transport::bitmap::Bitmap;

use crate::replica::Ledger;

const BLOCKS: u64 = 12;
const B: usize = 4096;

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

#[derive(Clone, Debug)]
enum Normal {
    /// The guest writes `len` bytes of `byte` at `offset` (through the tracked front end).
    Write(u64, u64, u8),
    Harvest,
    Send(usize),
    Deliver,
    Ack,
    Crash {
        tear: bool,
    },
    Reconnect,
}

#[derive(Clone, Debug)]
enum After {
    Read(u64, u64),
    Write(u64, u64, u8),
    /// The push's copy of a block arrives (maybe late: the block may be present).
    Arrive(u64),
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    let size = BLOCKS * B as u64;
    (0..size).prop_flat_map(move |o| (Just(o), 1..=(size - o).min(2 * B as u64 + 7)))
}

fn normal() -> impl Strategy<Value = Normal> {
    prop_oneof![
        4 => (range(), any::<u8>()).prop_map(|((o, l), b)| Normal::Write(o, l, b)),
        2 => Just(Normal::Harvest),
        3 => (1usize..6).prop_map(Normal::Send),
        4 => Just(Normal::Deliver),
        2 => Just(Normal::Ack),
        1 => any::<bool>().prop_map(|tear| Normal::Crash { tear }),
        1 => Just(Normal::Reconnect),
    ]
}

fn after() -> impl Strategy<Value = After> {
    prop_oneof![
        range().prop_map(|(o, l)| After::Read(o, l)),
        (range(), any::<u8>()).prop_map(|((o, l), b)| After::Write(o, l, b)),
        (0..BLOCKS).prop_map(After::Arrive),
    ]
}

/// Answers the destination's requests at once with the source's block at switchover.
struct Source {
    at_switchover: Vec<u8>,
    disk: Mutex<Weak<PostcopyDisk<MemDisk>>>,
}

impl BlockFetcher for Source {
    fn request(&self, units: &[u64]) {
        let disk = self.disk.lock().unwrap().upgrade().unwrap();
        for &u in units {
            let r = u as usize * B..(u as usize + 1) * B;
            disk.install(u, Some(&self.at_switchover[r])).unwrap();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(600))]

    #[test]
    fn no_stale_block_is_served_and_no_destination_write_is_lost(
        normal_ops in proptest::collection::vec(normal(), 0..80),
        after_ops in proptest::collection::vec(after(), 0..30),
    ) {
        let size = BLOCKS as usize * B;
        let source = Tracked::new(MemDisk(Mutex::new(vec![0; size])), BlockSize::DEFAULT);
        let mut ledger = Ledger::new(BLOCKS);
        let mut runs = Vec::new();
        // Standby: (version, content, torn) per block; version 0 = nothing.
        let mut standby: Vec<(u64, Vec<u8>, bool)> = vec![(0, vec![0; B], false); BLOCKS as usize];
        let mut in_flight: VecDeque<(u64, u64, Vec<u8>)> = VecDeque::new();
        let mut unacked: Vec<(u64, u64)> = Vec::new();
        let mut connected = true;
        let invalid = |standby: &Vec<(u64, Vec<u8>, bool)>| {
            let mut b = Bitmap::new(BLOCKS);
            for (i, (v, _, torn)) in standby.iter().enumerate() {
                if *v == 0 || *torn {
                    b.set(i as u64);
                }
            }
            b
        };
        let harvest = |ledger: &mut Ledger| ledger.mark_dirty(&source.tracker().harvest());

        for op in normal_ops {
            match op {
                Normal::Write(o, l, b) => source.write_at(&vec![b; l as usize], o, false).unwrap(),
                Normal::Harvest => harvest(&mut ledger),
                Normal::Send(n) if connected => {
                    ledger.next_batch(n, &mut runs);
                    for (first, versions) in &runs {
                        for (i, &v) in versions.iter().enumerate() {
                            let p = first + i as u64;
                            let mut c = vec![0; B];
                            source.read_at(&mut c, p * B as u64).unwrap();
                            in_flight.push_back((p, v, c));
                        }
                    }
                }
                Normal::Send(_) => {}
                Normal::Deliver => {
                    if let Some((p, v, c)) = in_flight.pop_front() {
                        standby[p as usize] = (v, c, false);
                        unacked.push((p, v));
                    }
                }
                Normal::Ack if connected => {
                    for (p, v) in unacked.drain(..) {
                        ledger.ack(p, v);
                    }
                }
                Normal::Ack => {}
                Normal::Crash { tear } => {
                    if tear {
                        if let Some((p, _, _)) = in_flight.front() {
                            standby[*p as usize].2 = true;
                        }
                    }
                    in_flight.clear();
                    unacked.clear();
                    connected = false;
                    ledger.forget_in_flight();
                }
                Normal::Reconnect => {
                    if !connected {
                        ledger.invalidate(&invalid(&standby));
                        connected = true;
                    }
                }
            }
        }

        // Switchover: the guest is paused; a final harvest; the standby adds what it cannot
        // serve. Its file holds what it stored, and garbage where it holds nothing valid.
        harvest(&mut ledger);
        let mut stale = ledger.stale_set();
        stale.union_with(&invalid(&standby));
        let mut at_switchover = vec![0; size];
        source.read_at(&mut at_switchover, 0).unwrap();
        let mut local = vec![0xEE; size];
        for (i, (v, c, torn)) in standby.iter().enumerate() {
            if *v != 0 && !*torn {
                local[i * B..(i + 1) * B].copy_from_slice(c);
            }
        }
        let fetcher = Arc::new(Source { at_switchover: at_switchover.clone(), disk: Mutex::new(Weak::new()) });
        let stale2 = stale.clone();
        let dest = Arc::new(PostcopyDisk::new(
            MemDisk(Mutex::new(local)),
            move |u| !stale2.get(u),
            fetcher.clone(),
        ));
        *fetcher.disk.lock().unwrap() = Arc::downgrade(&dest);

        let mut model = at_switchover.clone();
        for op in after_ops {
            match op {
                After::Read(o, l) => {
                    let mut buf = vec![0; l as usize];
                    dest.read_at(&mut buf, o).unwrap();
                    prop_assert!(buf[..] == model[o as usize..(o + l) as usize], "read at {} served a stale byte", o);
                }
                After::Write(o, l, b) => {
                    dest.write_at(&vec![b; l as usize], o, false).unwrap();
                    model[o as usize..(o + l) as usize].fill(b);
                }
                After::Arrive(u) => {
                    let r = u as usize * B..(u as usize + 1) * B;
                    dest.install(u, Some(&at_switchover[r])).unwrap();
                }
            }
        }
        // The push delivers whatever is still missing; late copies are dropped.
        for u in 0..BLOCKS {
            let r = u as usize * B..(u as usize + 1) * B;
            dest.install(u, Some(&at_switchover[r])).unwrap();
        }
        prop_assert!(dest.is_complete());
        let mut end = vec![0; size];
        dest.read_at(&mut end, 0).unwrap();
        prop_assert!(end == model, "the destination disk differs from switchover + its writes");
    }
}
