//! Target `proto`: the sans-IO session state machines (`transport::proto`), a
//! `SourceSession` and a `DestSession` wired to each other, driven by a program read from
//! the fuzz bytes.
//!
//! The first bytes choose both sides' configuration (session kind, layout with or without
//! a disk, push, early push, VM state, stale set, hot ranges, features, accepted kinds, the
//! expected VM id). Then every op byte does one thing: deliver the next queued message
//! from one side to the other (the honest wire), drop, duplicate or reorder queued
//! messages, inject a message built from the bytes or decoded from them with the codec
//! into either side, or act as an application would (push a run, serve demand requests,
//! accept a standby session, acknowledge, request pages, complete), or cut the connection
//! (one side or both notice; in-flight messages lost or delivered late, tagged with their
//! dead connection) and reconnect (both sides `resume()`).
//!
//! Checks: nothing panics; every message either side queues survives the codec
//! unchanged (so no state machine emits a frame the peer must refuse); a failed side is
//! no longer running; deliveries and page sets fit the layout; the push never hands out a
//! page twice on one connection or one outside the layout.

use std::collections::VecDeque;

use transport::bitmap::Bitmap;
use transport::codec::{decode, encode_to_vec};
use transport::encoding::EncodingPolicy;
use transport::message::{
    ErrorCode, Layout, Message, Pages, SessionKind, SetKind, PAGE_SIZE, PROTOCOL_VERSION,
};
use transport::proto::{
    Channel, Delivery, DestConfig, DestEvent, DestSession, ProtoError, SourceConfig, SourceEvent,
    SourceSession, Transmit,
};

use crate::input::Input;

/// Ops per input, at most (keeps every run short).
const MAX_OPS: usize = 1024;

struct Harness {
    src: SourceSession,
    dst: DestSession,
    total: u64,
    layout: Layout,
    /// Source → destination, in flight, each with the connection it was sent on.
    s2d: VecDeque<(usize, Transmit)>,
    /// Destination → source, in flight.
    d2s: VecDeque<(usize, Transmit)>,
    /// The connection now (0 for the first; one more after every reconnection).
    conn: usize,
    /// Each side's number for each connection (from `resume()`), by connection.
    src_numbers: Vec<u32>,
    dst_numbers: Vec<u32>,
    /// Pages the push handed out.
    pushed: Bitmap,
    /// Demand requests the source accepted, not yet answered.
    to_serve: Vec<u64>,
    /// Replication updates the destination delivered, not yet acknowledged.
    to_ack: Vec<(u64, u64)>,
}

fn bitmap(inp: &mut Input, len: u64) -> Bitmap {
    let mut b = Bitmap::new(len);
    for i in 0..len.div_ceil(64) {
        b.or_word(i, inp.u64());
    }
    b
}

fn channel(b: u8) -> Channel {
    match b % 4 {
        0 => Channel::Control,
        1 => Channel::Urgent,
        2 => Channel::Bulk,
        _ => Channel::Echo,
    }
}

fn kind(b: u8) -> SessionKind {
    match b % 3 {
        0 => SessionKind::Migrate,
        1 => SessionKind::Replicate,
        _ => SessionKind::Evacuate,
    }
}

/// Zero pages `first..first + count` (the content does not matter to the state machines).
fn zero_pages(first: u64, count: u64) -> Pages {
    Pages {
        first,
        kinds: vec![1u8; count as usize].into(),
        payload: Default::default(),
    }
}

/// A message built from the bytes, mostly near what the protocol expects.
fn message(inp: &mut Input, layout: &Layout, total: u64) -> Message {
    let page = |inp: &mut Input| {
        if inp.u8() < 240 {
            inp.below(total + 1)
        } else {
            inp.u64()
        }
    };
    match inp.u8() % 15 {
        0 => {
            let mut layout = layout.clone();
            if inp.u8() < 32 {
                layout.regions[0].len = inp.u64();
            }
            Message::Hello {
                version: if inp.u8() < 240 {
                    PROTOCOL_VERSION
                } else {
                    inp.u16()
                },
                kind: kind(inp.u8()),
                vm_id: if inp.bool() {
                    "vm".into()
                } else {
                    "other".into()
                },
                layout,
                features: inp.u64(),
                epoch: inp.u64(),
                session_id: session_id(inp),
            }
        }
        1 => Message::HelloAck {
            version: if inp.u8() < 240 {
                PROTOCOL_VERSION
            } else {
                inp.u16()
            },
            features: inp.u64(),
            conn_epoch: u32::from(inp.u8()),
        },
        2 => Message::Request {
            pages: (0..inp.below(9)).map(|_| page(inp)).collect(),
            pushed_read: u64::from(inp.u16()),
        },
        3 | 4 => {
            let first = page(inp);
            let count = 1 + inp.below(8);
            Message::Pages(zero_pages(first.min(u64::MAX - count), count))
        }
        5 => {
            let first = page(inp);
            let count = 1 + inp.below(8);
            Message::Update {
                pages: zero_pages(first.min(u64::MAX - count), count),
                versions: (0..count).map(|_| 1 + u64::from(inp.u8())).collect(),
            }
        }
        6 => Message::Ack {
            entries: (0..inp.below(9))
                .map(|_| (page(inp), u64::from(inp.u8())))
                .collect(),
        },
        7 | 8 => {
            let words = total.div_ceil(64);
            let first_word = inp.below(words + 2);
            let n = inp.below(words + 2);
            Message::PageSet {
                kind: match inp.u8() % 3 {
                    0 => SetKind::Stale,
                    1 => SetKind::Invalid,
                    _ => SetKind::Held,
                },
                first_word,
                words: (0..n).map(|_| inp.u64()).collect(),
                last: inp.bool(),
            }
        }
        9 => Message::VmState {
            blob: inp.bytes(16).to_vec(),
        },
        10 => Message::PushDone {
            pages_sent: if inp.bool() { total } else { inp.u64() },
        },
        11 => {
            if inp.bool() {
                Message::CompleteAck
            } else {
                Message::Complete {
                    pages_received: if inp.u8() < 200 { total } else { inp.u64() },
                }
            }
        }
        12 => Message::Resume {
            session_id: session_id(inp),
            conn_epoch: u32::from(inp.u8()),
            features: inp.u64(),
            pages: if inp.u8() < 200 { total } else { inp.u64() },
            checksum: inp.u64(),
        },
        13 => Message::ResumeAck {
            conn_epoch: u32::from(inp.u8()),
        },
        _ => Message::Error {
            code: ErrorCode::from_u16(inp.u16()),
            message: "fuzz".into(),
        },
    }
}

/// A session id: mostly one of two, so a message can name the session or another.
fn session_id(inp: &mut Input) -> u128 {
    match inp.u8() % 4 {
        0 => u128::from(inp.u64()) << 64 | u128::from(inp.u64()),
        1 => 1,
        _ => 0,
    }
}

impl Harness {
    fn new(inp: &mut Input) -> Harness {
        let cfg = inp.u8();
        let mem_pages = 1 + inp.below(160);
        let disk_pages = if cfg & 1 != 0 { inp.below(70) } else { 0 };
        let mut layout = Layout::single(mem_pages * PAGE_SIZE as u64);
        if disk_pages > 0 {
            layout = layout.with_disk("vda", disk_pages * PAGE_SIZE as u64);
        }
        let total = layout.total_pages();
        let session_kind = kind(cfg >> 1);
        let mut sc = SourceConfig::migrate("vm", layout.clone());
        sc.kind = session_kind;
        sc.epoch = u64::from(inp.u8());
        sc.push = cfg & 8 == 0;
        sc.early_push = cfg & 16 == 0;
        if cfg & 32 != 0 {
            sc.vm_state = Some(b"state".to_vec());
        }
        let more = inp.u8();
        sc.features = u64::from(more & 3);
        sc.encoding = if more & 4 != 0 {
            EncodingPolicy::ALL
        } else {
            EncodingPolicy::OFF
        };
        if more & 8 != 0 {
            sc.stale = Some(bitmap(inp, total));
        }
        if more & 16 != 0 {
            sc.hot = (0..inp.below(4))
                .map(|_| {
                    let a = inp.below(total + 8);
                    a..a + inp.below(40)
                })
                .collect();
        }
        if more & 32 != 0 {
            let len = if inp.bool() {
                total
            } else {
                inp.below(total + 64)
            };
            sc.zero_filled = Some(bitmap(inp, len));
        }
        let mut dc = DestConfig::migrate(layout.clone());
        let accept = inp.u8();
        dc.accept = [
            SessionKind::Migrate,
            SessionKind::Replicate,
            SessionKind::Evacuate,
        ]
        .into_iter()
        .enumerate()
        .filter(|&(i, k)| k == session_kind || accept & (1 << i) != 0)
        .map(|(_, k)| k)
        .collect();
        if accept & 0x40 != 0 {
            dc.accept.retain(|&k| k != session_kind);
        }
        if accept & 0x80 != 0 {
            dc.expected_vm_id = Some(if accept & 8 != 0 { "other" } else { "vm" }.into());
        }
        dc.features = u64::from(accept >> 4 & 3);
        let mut h = Harness {
            src: SourceSession::new(sc),
            dst: DestSession::new(dc),
            total,
            layout,
            s2d: VecDeque::new(),
            d2s: VecDeque::new(),
            conn: 0,
            src_numbers: vec![0],
            dst_numbers: vec![0],
            pushed: Bitmap::new(total),
            to_serve: Vec::new(),
            to_ack: Vec::new(),
        };
        h.drain();
        h
    }

    /// Moves what both sides queued onto the wire, checking each message against the
    /// codec, and checks their events.
    fn drain(&mut self) {
        while let Some(t) = self.src.poll_transmit() {
            check_wire(&t.message);
            self.s2d.push_back((self.conn, t));
        }
        while let Some(t) = self.dst.poll_transmit() {
            check_wire(&t.message);
            self.d2s.push_back((self.conn, t));
        }
        while let Some(e) = self.src.poll_event() {
            match e {
                SourceEvent::Invalid(b) => assert_eq!(b.len(), self.total),
                SourceEvent::Acked(entries) => {
                    assert!(entries.iter().all(|&(p, v)| p < self.total && v != 0))
                }
                SourceEvent::Finished => assert!(self.src.is_finished()),
                SourceEvent::Established { .. }
                | SourceEvent::Paused
                | SourceEvent::Resumed { .. } => {}
            }
        }
        while let Some(e) = self.dst.poll_event() {
            match e {
                DestEvent::StaleSet(b) => assert_eq!(b.len(), self.total),
                DestEvent::Finished => assert!(self.dst.is_finished()),
                _ => {}
            }
        }
    }

    fn deliver_to_dst(&mut self, conn: usize, channel: Channel, msg: Message) {
        let r = self.dst.handle_in(self.dst_numbers[conn], channel, msg);
        match r {
            Ok(Some(Delivery::Pages(p))) => {
                assert!(p.first + p.count() as u64 <= self.total);
            }
            Ok(Some(Delivery::PageRuns(runs))) => {
                for p in runs {
                    assert!(p.first + p.count() as u64 <= self.total);
                }
            }
            Ok(Some(Delivery::Update { pages, versions })) => {
                assert!(pages.first + pages.count() as u64 <= self.total);
                assert_eq!(versions.len(), pages.count());
                self.to_ack
                    .extend((pages.first..).zip(versions.iter().copied()));
            }
            Ok(None) => {}
            Err(e) => after_error(&e, self.dst.is_running()),
        }
    }

    fn deliver_to_src(&mut self, conn: usize, channel: Channel, msg: Message) {
        match self.src.handle_in(self.src_numbers[conn], channel, msg) {
            Ok(pages) => {
                assert!(pages.iter().all(|&p| p < self.total));
                self.to_serve.extend(pages);
            }
            Err(e) => after_error(&e, self.src.is_running()),
        }
    }

    fn step(&mut self, inp: &mut Input) {
        let op = inp.u8();
        match op % 16 {
            0..=3 => {
                if let Some((c, t)) = self.s2d.pop_front() {
                    self.deliver_to_dst(c, t.channel, t.message);
                }
            }
            4..=6 => {
                if let Some((c, t)) = self.d2s.pop_front() {
                    self.deliver_to_src(c, t.channel, t.message);
                }
            }
            7 => {
                let q = if op & 16 != 0 {
                    &mut self.s2d
                } else {
                    &mut self.d2s
                };
                q.pop_front();
            }
            8 => {
                let q = if op & 16 != 0 {
                    &mut self.s2d
                } else {
                    &mut self.d2s
                };
                if let Some(t) = q.front().cloned() {
                    q.push_front(t);
                }
            }
            9 => {
                let q = if op & 16 != 0 {
                    &mut self.s2d
                } else {
                    &mut self.d2s
                };
                if q.len() >= 2 {
                    q.swap(0, 1);
                }
            }
            10 | 11 => {
                let ch = channel(inp.u8());
                let msg = message(inp, &self.layout, self.total);
                if op & 16 != 0 {
                    self.deliver_to_dst(self.conn, ch, msg);
                } else {
                    self.deliver_to_src(self.conn, ch, msg);
                }
            }
            12 => {
                // Raw bytes through the codec, as a driver would feed them.
                let ch = channel(inp.u8());
                let n = inp.u8() as usize;
                let bytes = inp.bytes(n);
                match decode(bytes) {
                    Ok(Some((msg, _))) if op & 16 != 0 => self.deliver_to_dst(self.conn, ch, msg),
                    Ok(Some((msg, _))) => self.deliver_to_src(self.conn, ch, msg),
                    Ok(None) => {}
                    Err(e) if op & 16 != 0 => {
                        self.dst.handle_decode_error(e);
                        assert!(!self.dst.is_running());
                    }
                    Err(e) => {
                        self.src.handle_decode_error(e);
                        assert!(!self.src.is_running());
                    }
                }
            }
            13 => {
                // The source's push: the run goes out on the bulk channel.
                let max = 1 + inp.below(64) as usize;
                if let Some(r) = self.src.next_push(max) {
                    assert!(r.start < r.end && r.end <= self.total, "push run {r:?}");
                    assert!(r.end - r.start <= max as u64);
                    for p in r.clone() {
                        assert!(self.pushed.set(p), "page {p} pushed twice");
                    }
                    let mut first = r.start;
                    while first < r.end {
                        let n = (r.end - first).min(256);
                        self.s2d.push_back((
                            self.conn,
                            Transmit {
                                channel: Channel::Bulk,
                                message: Message::Pages(zero_pages(first, n)),
                            },
                        ));
                        first += n;
                    }
                }
            }
            14 => {
                // The source serves the demand requests it accepted.
                for p in std::mem::take(&mut self.to_serve) {
                    self.s2d.push_back((
                        self.conn,
                        Transmit {
                            channel: Channel::Urgent,
                            message: Message::Pages(zero_pages(p, 1)),
                        },
                    ));
                }
            }
            _ => match inp.u8() % 7 {
                0 => {
                    let len = if inp.u8() < 240 {
                        self.total
                    } else {
                        inp.below(self.total + 2)
                    };
                    let invalid = bitmap(inp, len);
                    self.dst.accept(&invalid);
                }
                1 => {
                    let n = inp.below(self.to_ack.len() as u64 + 1) as usize;
                    let entries: Vec<_> = self.to_ack.drain(..n).collect();
                    self.dst.ack(&entries);
                }
                2 => {
                    let pages: Vec<u64> = (0..inp.below(6))
                        .map(|_| inp.below(self.total + 1))
                        .collect();
                    self.dst.request(&pages);
                }
                3 => self.dst.complete(),
                5 => {
                    // The connection is lost: one side or both notice; what was in flight
                    // is lost, or (a late delivery) still arrives, tagged with the old
                    // connection.
                    let how = inp.u8();
                    if how & 1 != 0 {
                        self.src.connection_lost();
                    }
                    if how & 2 != 0 {
                        self.dst.connection_lost();
                    }
                    if how & 4 != 0 {
                        self.s2d.clear();
                        self.d2s.clear();
                    }
                }
                6 => {
                    // A new connection: both sides resume on it (a side that did not
                    // notice the loss learns it now). After a resume, a page may be
                    // pushed again.
                    self.conn += 1;
                    self.src_numbers.push(self.src.resume());
                    self.dst_numbers.push(self.dst.resume());
                    self.pushed = Bitmap::new(self.total);
                    self.to_serve.clear();
                }
                _ => {
                    // A burst of requests longer than one message may carry.
                    let pages: Vec<u64> = (0..5000).map(|i| i % self.total).collect();
                    self.dst.request(&pages);
                }
            },
        }
        self.drain();
    }
}

/// After an error the side has failed: it is not running, whatever comes next.
fn after_error(e: &ProtoError, running: bool) {
    assert!(!running, "a session still runs after {e}");
}

/// What a side sends must cross the codec unchanged.
fn check_wire(msg: &Message) {
    let buf = encode_to_vec(msg);
    match decode(&buf) {
        Ok(Some((back, used))) => {
            assert_eq!(used, buf.len());
            assert_eq!(
                &back,
                msg,
                "a queued {} does not survive the codec",
                msg.name()
            );
        }
        other => panic!("a queued {} does not decode: {other:?}", msg.name()),
    }
}

/// The target.
pub fn proto(data: &[u8]) {
    let mut inp = Input::new(data);
    let mut h = Harness::new(&mut inp);
    for _ in 0..MAX_OPS {
        if inp.is_empty() {
            break;
        }
        h.step(&mut inp);
    }
}

/// Seeds: honest sessions of each kind run to the end (deliver everything, push, serve,
/// accept, complete), with a few configurations.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for kind in 0u8..3 {
        for (cfg_extra, pages) in [(0u8, 10u8), (1, 100), (32, 70)] {
            let cfg = cfg_extra | kind << 1;
            // cfg, mem pages, [disk pages], epoch, more, accept
            let mut s = vec![cfg, pages - 1];
            if cfg & 1 != 0 {
                s.push(8);
            }
            s.extend_from_slice(&[5, 0, 0x07]);
            // Deliver the Hello, accept a standby session with nothing invalid.
            s.push(0);
            s.extend_from_slice(&[15, 0, 0]);
            s.extend(std::iter::repeat_n(0u8, 16));
            let round = |s: &mut Vec<u8>| {
                // dst -> src, src -> dst, push, serve, ack, request, complete.
                s.extend_from_slice(&[4, 4, 0, 0, 13, 40, 0, 0, 0]);
                s.extend_from_slice(&[15, 2, 2, 3, 9, 14, 4, 0, 0]);
                s.extend_from_slice(&[15, 1, 255, 4, 0, 0, 0]);
            };
            let end = [15, 3, 0, 4, 0, 4, 0, 0, 0, 0, 4];
            let mut cut = s.clone();
            for _ in 0..12 {
                round(&mut s);
            }
            s.extend_from_slice(&end);
            out.push(s);
            // The same with the connection cut mid-session (both sides notice, what was
            // in flight is lost) and a reconnection, then the rest of the session.
            for _ in 0..3 {
                round(&mut cut);
            }
            cut.extend_from_slice(&[15, 5, 7, 15, 6]);
            for _ in 0..12 {
                cut.extend_from_slice(&[4, 4, 0, 0, 4, 4, 0, 0]);
                round(&mut cut);
            }
            cut.extend_from_slice(&end);
            out.push(cut);
        }
    }
    out
}
