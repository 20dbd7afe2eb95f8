use std::time::{Duration, Instant};

use guest_agent::proto::{encode, range_messages, ErrorCode};

use super::*;

const PAGES: u64 = 1024;

fn board(limits: BoardLimits) -> HintBoard {
    HintBoard::new(&Layout::single(PAGES * 4096), limits).unwrap()
}

fn hello(poison: bool) -> Message {
    Message::Hello(Hello {
        version: 1,
        agent_version: "test".into(),
        page_size: 4096,
        poison_on_free: poison,
        mem_total_bytes: 3 << 20,
    })
}

fn r(first: u64, count: u64) -> PfnRange {
    PfnRange::new(first, count)
}

/// Hello + a report, hot and free lists split `per` ranges a message.
fn report(seq: u64, hot: &[PfnRange], free: &[PfnRange], per: usize) -> Vec<Message> {
    let mut m = vec![hello(false)];
    m.extend(range_messages(RangeKind::Hot, seq, hot, per));
    m.extend(range_messages(RangeKind::Free, seq, free, per));
    m
}

fn feed(b: &mut HintBoard, msgs: &[Message]) -> Vec<Result<bool, HintError>> {
    msgs.iter().map(|m| b.feed_message(m)).collect()
}

#[test]
fn a_valid_report_split_over_parts_becomes_hints() {
    let mut b = board(BoardLimits::default());
    let t0 = Instant::now() + Duration::from_secs(100);
    let msgs = report(
        7,
        &[r(0, 4), r(4, 2), r(100, 1)],
        &[r(10, 5), r(500, 24)],
        2,
    );
    let results: Vec<_> = msgs
        .iter()
        .enumerate()
        .map(|(i, m)| b.feed_message_at(m, t0 + Duration::from_millis(i as u64)))
        .collect();
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(results.last(), Some(&Ok(true)));
    let h = b.hints().unwrap();
    assert_eq!(h.seq, 7);
    assert_eq!(h.hot, vec![0..6, 100..101], "adjacent ranges merged");
    assert_eq!(h.hot_pages(), 7);
    assert_eq!(h.free_pages(), 29);
    assert!(h.free.get(10) && h.free.get(523) && !h.free.get(15));
    assert!(!h.poison_on_free);
    // The first hot part arrived at t0 + 1 ms (after the Hello).
    let want = t0 + Duration::from_millis(1) - b.limits().max_scan_age;
    assert_eq!(h.scanned_after, Some(want));
    assert_eq!(b.stats().reports, 1);
}

#[test]
fn reports_need_an_acceptable_hello_first() {
    let mut b = board(BoardLimits::default());
    let part = Message::HotRanges {
        seq: 1,
        last: true,
        ranges: vec![],
    };
    assert_eq!(
        b.feed_message(&part),
        Err(HintError::NoHello {
            kind: RangeKind::Hot,
            seq: 1
        })
    );
    let mut huge = hello(false);
    if let Message::Hello(h) = &mut huge {
        h.page_size = 2 << 20;
    }
    assert_eq!(
        b.feed_message(&huge),
        Err(HintError::PageSize { page_size: 2 << 20 })
    );
    let mut liar = hello(false);
    if let Message::Hello(h) = &mut liar {
        h.mem_total_bytes = 1 << 40;
    }
    assert!(matches!(
        b.feed_message(&liar),
        Err(HintError::MemTotal { .. })
    ));
    let part2 = Message::HotRanges {
        seq: 2,
        last: true,
        ranges: vec![],
    };
    assert!(matches!(
        b.feed_message(&part2),
        Err(HintError::NoHello { .. })
    ));
    assert!(b.hints().is_none());
}

#[test]
fn frames_outside_guest_memory_reject_the_report_and_keep_the_last_good_one() {
    let mut b = board(BoardLimits::default());
    feed(&mut b, &report(1, &[r(1, 1)], &[r(2, 2)], 8));
    let bad = report(2, &[r(1, 1)], &[r(1000, 25)], 8);
    let results = feed(&mut b, &bad);
    assert_eq!(
        results.last().unwrap(),
        &Err(HintError::OutsideGuest {
            kind: RangeKind::Free,
            seq: 2,
            first: 1000,
            count: 25,
            bad: 1024,
            guest_pages: 1024
        })
    );
    assert_eq!(b.hints().unwrap().seq, 1);
    // Beyond memory but below the protocol's 2^52 limit: decodes, refused here.
    let far = report(3, &[r(1 << 40, 1)], &[], 8);
    assert!(matches!(
        feed(&mut b, &far)[1],
        Err(HintError::OutsideGuest { bad, .. }) if bad == 1 << 40
    ));
    assert_eq!(b.hints().unwrap().seq, 1);
}

#[test]
fn parts_out_of_order_fail_once_and_the_rest_is_ignored() {
    let mut b = board(BoardLimits::default());
    b.feed_message(&hello(false)).unwrap();
    let part = |first, last| Message::HotRanges {
        seq: 5,
        last,
        ranges: vec![r(first, 2)],
    };
    assert_eq!(b.feed_message(&part(10, false)), Ok(false));
    assert!(matches!(
        b.feed_message(&part(11, false)),
        Err(HintError::Ranges {
            source: RangeError::Unsorted { .. },
            ..
        })
    ));
    assert_eq!(b.feed_message(&part(20, true)), Ok(false), "ignored");
    assert_eq!(
        b.feed_message(&Message::FreeRanges {
            seq: 5,
            last: true,
            ranges: vec![]
        }),
        Ok(false),
        "ignored"
    );
    assert_eq!(b.stats().ignored_parts, 2);
    assert!(b.hints().is_none());
    // The next report is taken normally.
    let results = feed(&mut b, &report(6, &[r(0, 1)], &[], 8));
    assert_eq!(results.last(), Some(&Ok(true)));
}

#[test]
fn free_lists_must_follow_their_hot_list_and_not_overlap_it() {
    let mut b = board(BoardLimits::default());
    b.feed_message(&hello(false)).unwrap();
    assert_eq!(
        b.feed_message(&Message::FreeRanges {
            seq: 1,
            last: true,
            ranges: vec![r(0, 1)]
        }),
        Err(HintError::FreeWithoutHot { seq: 1 })
    );
    let results = feed(&mut b, &report(2, &[r(10, 10)], &[r(0, 5), r(15, 1)], 1));
    assert_eq!(
        results.last().unwrap(),
        &Err(HintError::HotFreeOverlap { seq: 2, page: 15 })
    );
    assert!(b.hints().is_none());
}

#[test]
fn too_many_ranges_are_refused() {
    let mut b = board(BoardLimits {
        max_ranges: 3,
        ..BoardLimits::default()
    });
    let hot: Vec<_> = (0..4).map(|i| r(i * 2, 1)).collect();
    let results = feed(&mut b, &report(1, &hot, &[], 2));
    assert!(results.contains(&Err(HintError::TooManyRanges {
        kind: RangeKind::Hot,
        seq: 1,
        max: 3
    })));
    assert!(b.hints().is_none());
}

#[test]
fn a_flood_is_rate_limited_and_the_bucket_refills() {
    let mut b = board(BoardLimits {
        messages_per_sec: 100,
        burst: 10,
        ..BoardLimits::default()
    });
    let t = Instant::now();
    let limited = (0..50)
        .filter(|_| b.feed_message_at(&hello(false), t).is_err())
        .count();
    assert_eq!(limited, 40);
    assert_eq!(b.stats().rate_limited, 40);
    // 100 ms later there are 10 tokens again: a whole report fits.
    let later = t + Duration::from_millis(100);
    let msgs = report(1, &[r(0, 1)], &[], 8);
    let ok = msgs
        .iter()
        .map(|m| b.feed_message_at(m, later))
        .collect::<Vec<_>>();
    assert_eq!(ok.last(), Some(&Ok(true)), "{ok:?}");
}

#[test]
fn a_dropped_part_drops_its_report() {
    let mut b = board(BoardLimits {
        messages_per_sec: 1,
        burst: 3,
        ..BoardLimits::default()
    });
    let t = Instant::now();
    let msgs = report(1, &[r(0, 1), r(5, 1)], &[r(9, 1)], 1);
    let results: Vec<_> = msgs.iter().map(|m| b.feed_message_at(m, t)).collect();
    assert!(matches!(results[3], Err(HintError::RateLimited { .. })));
    assert!(b.hints().is_none());
}

#[test]
fn garbage_and_bad_frames_between_reports_are_typed_errors() {
    let mut b = board(BoardLimits::default());
    let mut bytes = vec![0x55u8; 300];
    for m in report(3, &[r(0, 2)], &[r(8, 8)], 8) {
        bytes.extend(encode(&m).unwrap());
    }
    // A frame with a bad checksum, and a host-to-agent message.
    let mut corrupt = encode(&hello(false)).unwrap();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 1;
    bytes.extend(&corrupt);
    bytes.extend(encode(&Message::ReportNow).unwrap());
    bytes.extend(encode(&Message::error(ErrorCode::SCAN_FAILED, "no kpageflags")).unwrap());
    let errors = b.feed_bytes(&bytes);
    assert_eq!(b.hints().unwrap().seq, 3);
    let errs = b.take_errors();
    assert_eq!(errors, errs.len());
    assert!(matches!(
        errs[0],
        HintError::Decode(DecodeError::Garbage { skipped: 300 })
    ));
    assert!(errs
        .iter()
        .any(|e| matches!(e, HintError::Decode(DecodeError::BadChecksum { .. }))));
    assert!(errs.contains(&HintError::WrongDirection {
        message: "ReportNow"
    }));
    assert!(errs.contains(&HintError::Agent {
        code: 4,
        message: "no kpageflags".into()
    }));
    assert_eq!(b.stats().garbage_bytes, 300);
}

#[test]
fn buffered_bytes_stay_under_the_cap_whatever_arrives() {
    let mut b = board(BoardLimits {
        max_ranges: 40_000,
        max_errors_kept: 8,
        ..BoardLimits::default()
    });
    let cap = b.max_buffered_bytes();
    // The largest legal report part: 32768 single-page ranges (outside the guest, so it
    // is refused), half-fed so the frame sits in the buffer.
    let big = Message::HotRanges {
        seq: 1,
        last: false,
        ranges: (0..32_768).map(|i| r(i * 2, 1)).collect(),
    };
    let frame = encode(&big).unwrap();
    b.feed_bytes(&encode(&hello(false)).unwrap());
    b.feed_bytes(&frame[..frame.len() - 1]);
    assert!(b.buffered_bytes() >= frame.len() - 1);
    assert!(b.buffered_bytes() <= cap);
    b.feed_bytes(&frame[frame.len() - 1..]);
    assert!(b.buffered_bytes() <= cap);
    // A valid report with many ranges, held as hints.
    let hot: Vec<_> = (0..500).map(|i| r(i * 2, 1)).collect();
    for m in report(2, &hot, &[], 64) {
        b.feed_bytes(&encode(&m).unwrap());
        assert!(b.buffered_bytes() <= cap);
    }
    assert_eq!(b.hints().unwrap().hot.len(), 500);
    // Errors are a ring.
    for _ in 0..100 {
        b.feed_bytes(&encode(&Message::ReportNow).unwrap());
    }
    assert_eq!(b.take_errors().len(), 8);
    assert!(b.max_memory_bytes() < 4 << 20);
}
