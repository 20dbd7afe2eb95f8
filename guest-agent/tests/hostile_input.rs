//! Hostile input to the protocol decoders and the frame reader: garbage, lies about sizes,
//! huge and overlapping ranges, floods. Every case must end in errors, bounded memory and
//! no panic.

use guest_agent::proto::{
    crc32, decode_frame, encode, DecodeError, FrameReader, Message, PfnRange, RangeError,
    ReportAssembler, ReportError, HEADER_LEN, MAX_FRAME_LEN, MAX_PAYLOAD_LEN,
    MAX_RANGES_PER_MESSAGE, PFN_LIMIT,
};

fn frame(msg_type: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![0xF1, 0x7A, msg_type, 0];
    f.extend_from_slice(&len.to_le_bytes());
    f.extend_from_slice(&(!len).to_le_bytes());
    f.extend_from_slice(&crc32(payload).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

fn ranges_payload(ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut p = 7u64.to_le_bytes().to_vec();
    p.push(1);
    p.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
    for (a, b) in ranges {
        p.extend_from_slice(&a.to_le_bytes());
        p.extend_from_slice(&b.to_le_bytes());
    }
    p
}

/// Feeds `stream` through a reader and returns (messages, errors), checking the buffer
/// bound after every piece.
fn run(stream: &[u8], piece: usize) -> (Vec<Message>, Vec<DecodeError>) {
    let mut r = FrameReader::new();
    let (mut ok, mut err) = (Vec::new(), Vec::new());
    for chunk in stream.chunks(piece.max(1)) {
        r.push(chunk, |item| match item {
            Ok(m) => ok.push(m),
            Err(e) => err.push(e),
        });
        assert!(r.buffered() <= MAX_FRAME_LEN);
    }
    (ok, err)
}

#[test]
fn pure_garbage_is_skipped_with_errors_and_no_message() {
    // A deterministic pseudo-random megabyte, rich in sync bytes.
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let garbage: Vec<u8> = (0..(1 << 20))
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if i % 7 == 0 {
                0xF1
            } else {
                x as u8
            }
        })
        .collect();
    let (ok, err) = run(&garbage, 4096);
    assert!(ok.is_empty(), "garbage decoded as {ok:?}");
    assert!(!err.is_empty());
}

#[test]
fn a_header_announcing_a_huge_payload_is_refused_not_awaited() {
    for len in [MAX_PAYLOAD_LEN as u32 + 1, u32::MAX] {
        let mut f = vec![0xF1, 0x7A, 2, 0];
        f.extend_from_slice(&len.to_le_bytes());
        f.extend_from_slice(&(!len).to_le_bytes());
        f.extend_from_slice(&[0; 4]);
        assert!(matches!(
            decode_frame(&f),
            Err(DecodeError::FrameTooLarge { .. })
        ));
        // The reader drops it at once and finds the valid frame right behind it.
        f.extend_from_slice(&encode(&Message::ReportNow).unwrap());
        let (ok, err) = run(&f, 7);
        assert_eq!(ok, vec![Message::ReportNow]);
        assert!(err
            .iter()
            .any(|e| matches!(e, DecodeError::FrameTooLarge { .. })));
    }
}

#[test]
fn huge_and_overlapping_ranges_are_refused() {
    type Check = fn(&RangeError) -> bool;
    let cases: Vec<(Vec<(u64, u64)>, Check)> = vec![
        (vec![(0, u64::MAX)], |e| {
            matches!(e, RangeError::OutOfBounds { .. })
        }),
        (vec![(u64::MAX - 1, 2)], |e| {
            matches!(e, RangeError::OutOfBounds { .. })
        }),
        (vec![(PFN_LIMIT, 1)], |e| {
            matches!(e, RangeError::OutOfBounds { .. })
        }),
        (vec![(0, PFN_LIMIT)], |_| false), // the whole space, once: allowed
        (vec![(0, 10), (5, 10)], |e| {
            matches!(e, RangeError::Unsorted { .. })
        }),
        (vec![(0, 10), (0, 10)], |e| {
            matches!(e, RangeError::Unsorted { .. })
        }),
        (vec![(100, 1), (50, 1)], |e| {
            matches!(e, RangeError::Unsorted { .. })
        }),
        (vec![(1, 1), (2, 0)], |e| {
            matches!(e, RangeError::Empty { index: 1 })
        }),
    ];
    for (ranges, want) in cases {
        for ty in [2u8, 3] {
            match decode_frame(&frame(ty, &ranges_payload(&ranges))) {
                Err(DecodeError::Ranges(e)) => assert!(want(&e), "{ranges:?}: {e}"),
                Ok(_) => assert!(ranges == [(0, PFN_LIMIT)], "{ranges:?} accepted"),
                Err(e) => panic!("{ranges:?}: unexpected {e}"),
            }
        }
    }
}

#[test]
fn too_many_ranges_are_refused_before_allocation() {
    // The count says a billion ranges; the payload is 13 bytes. Refused on the count alone.
    let mut p = ranges_payload(&[]);
    p[9..13].copy_from_slice(&1_000_000_000u32.to_le_bytes());
    assert!(matches!(
        decode_frame(&frame(2, &p)),
        Err(DecodeError::Ranges(RangeError::TooMany { .. }))
    ));
    // One more than allowed, really carried (fits in a frame): refused too.
    let n = MAX_RANGES_PER_MESSAGE + 1;
    let ranges: Vec<(u64, u64)> = (0..n as u64).map(|i| (2 * i, 1)).collect();
    let payload = ranges_payload(&ranges);
    assert!(payload.len() <= MAX_PAYLOAD_LEN);
    assert!(matches!(
        decode_frame(&frame(3, &payload)),
        Err(DecodeError::Ranges(RangeError::TooMany { .. }))
    ));
    // And the encoder will not produce it.
    let msg = Message::HotRanges {
        seq: 1,
        last: true,
        ranges: ranges.iter().map(|&(a, b)| PfnRange::new(a, b)).collect(),
    };
    assert!(encode(&msg).is_err());
}

#[test]
fn a_flood_of_messages_is_decoded_in_bounded_memory() {
    // 200k small frames (3.2 MB) mixed with invalid ones, fed in odd-sized pieces.
    let good = encode(&Message::ReportNow).unwrap();
    let bad = frame(2, &ranges_payload(&[(10, 5), (12, 1)]));
    let mut stream = Vec::new();
    for i in 0..200_000 {
        stream.extend_from_slice(if i % 10 == 0 { &bad } else { &good });
    }
    let (ok, err) = run(&stream, 65_537);
    assert_eq!(ok.len(), 180_000);
    assert_eq!(err.len(), 20_000);
    assert!(err.iter().all(|e| matches!(e, DecodeError::Ranges(_))));
}

#[test]
fn a_flood_of_maximal_frames_keeps_the_buffer_at_one_frame() {
    let ranges: Vec<PfnRange> = (0..MAX_RANGES_PER_MESSAGE as u64)
        .map(|i| PfnRange::new(2 * i, 1))
        .collect();
    let big = encode(&Message::FreeRanges {
        seq: 1,
        last: true,
        ranges,
    })
    .unwrap();
    assert!(big.len() > MAX_FRAME_LEN / 2);
    let mut r = FrameReader::new();
    let mut n = 0;
    for _ in 0..20 {
        r.push(&big, |item| {
            item.expect("valid");
            n += 1;
        });
        assert!(r.buffered() <= MAX_FRAME_LEN);
    }
    assert_eq!(n, 20);
}

#[test]
fn truncated_frames_wait_and_corrupted_ones_resync() {
    let good = encode(&Message::PostcopyStarted).unwrap();
    let hello_like = encode(&Message::error(
        guest_agent::proto::ErrorCode::INTERNAL,
        "x".repeat(100),
    ))
    .unwrap();
    // A frame cut short, then a corrupted copy, then good frames.
    let mut stream = hello_like[..HEADER_LEN + 10].to_vec();
    let mut corrupted = hello_like.clone();
    corrupted[HEADER_LEN + 50] ^= 0x40;
    stream.extend_from_slice(&corrupted);
    stream.extend_from_slice(&good);
    stream.extend_from_slice(&hello_like);
    let (ok, err) = run(&stream, 3);
    assert_eq!(ok.len(), 2, "{ok:?} {err:?}");
    assert_eq!(ok[0], Message::PostcopyStarted);
    assert!(!err.is_empty());
}

#[test]
fn an_assembler_bounds_what_a_guest_can_make_the_host_buffer() {
    let mut asm = ReportAssembler::new(1000);
    let part = |i: u64| Message::HotRanges {
        seq: 9,
        last: false,
        ranges: (0..100)
            .map(|j| PfnRange::new(i * 1000 + j * 2, 1))
            .collect(),
    };
    let mut refused = false;
    for i in 0..50 {
        match asm.push(&part(i)) {
            Ok(None) => {}
            Err(ReportError::TooManyRanges { max: 1000, .. }) => {
                refused = true;
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(refused);
}
