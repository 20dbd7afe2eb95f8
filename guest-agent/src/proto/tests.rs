//! Unit tests of the codec with hand-made frames; arbitrary input is in
//! `guest-agent/tests/proto_props.rs` and hostile streams in `tests/hostile_input.rs`.

use super::*;

fn hello() -> Message {
    Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        agent_version: "0.1.0".into(),
        page_size: 4096,
        poison_on_free: true,
        mem_total_bytes: 512 << 20,
    })
}

fn all_messages() -> Vec<Message> {
    vec![
        hello(),
        Message::HotRanges {
            seq: 7,
            last: true,
            ranges: vec![
                PfnRange::new(0, 1),
                PfnRange::new(1, 3),
                PfnRange::new(100, 50),
            ],
        },
        Message::FreeRanges {
            seq: u64::MAX,
            last: false,
            ranges: vec![],
        },
        Message::PostcopyStarted,
        Message::PostcopyFinished,
        Message::ReportNow,
        Message::Touched(TouchReport {
            processes: 2,
            pages: 16384,
            failed_pages: 1,
            elapsed_ms: 1234,
        }),
        Message::error(ErrorCode::SCAN_FAILED, "no /proc/kpageflags: é"),
    ]
}

#[test]
fn every_message_round_trips() {
    for m in all_messages() {
        let bytes = encode(&m).unwrap();
        let (back, used) = decode_frame(&bytes).unwrap();
        assert_eq!(back, m);
        assert_eq!(used, bytes.len());
    }
}

#[test]
fn header_layout_is_as_documented() {
    let bytes = encode(&Message::ReportNow).unwrap();
    assert_eq!(
        bytes,
        [0xF1, 0x7A, 6, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0]
    );
    let bytes = encode(&hello()).unwrap();
    assert_eq!(&bytes[HEADER_LEN..HEADER_LEN + 4], b"FLGA");
    assert_eq!(&bytes[HEADER_LEN + 4..HEADER_LEN + 6], &[1, 0]);
}

#[test]
fn incomplete_and_garbage_are_told_apart() {
    let bytes = encode(&hello()).unwrap();
    for cut in 0..bytes.len() {
        assert!(
            matches!(
                decode_frame(&bytes[..cut]),
                Err(DecodeError::Incomplete { .. })
            ),
            "cut at {cut}"
        );
    }
    assert!(matches!(decode_frame(b"x"), Err(DecodeError::BadSync(_))));
    assert!(matches!(
        decode_frame(&[0xF1, 0]),
        Err(DecodeError::BadSync(_))
    ));
}

fn reframe(msg_type: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![0xF1, 0x7A, msg_type, 0];
    f.extend_from_slice(&len.to_le_bytes());
    f.extend_from_slice(&(!len).to_le_bytes());
    f.extend_from_slice(&crc32(payload).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

fn ranges_payload(seq: u64, last: u8, ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut p = seq.to_le_bytes().to_vec();
    p.push(last);
    p.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
    for (a, b) in ranges {
        p.extend_from_slice(&a.to_le_bytes());
        p.extend_from_slice(&b.to_le_bytes());
    }
    p
}

#[test]
fn bad_ranges_are_refused() {
    let cases: &[(&[(u64, u64)], RangeError)] = &[
        (&[(5, 0)], RangeError::Empty { index: 0 }),
        (
            &[(10, 5), (12, 1)],
            RangeError::Unsorted {
                index: 1,
                first: 12,
                prev_end: 15,
            },
        ),
        (
            &[(10, 5), (3, 1)],
            RangeError::Unsorted {
                index: 1,
                first: 3,
                prev_end: 15,
            },
        ),
        (
            &[(u64::MAX, 2)],
            RangeError::OutOfBounds {
                index: 0,
                first: u64::MAX,
                count: 2,
            },
        ),
        (
            &[(PFN_LIMIT - 1, 2)],
            RangeError::OutOfBounds {
                index: 0,
                first: PFN_LIMIT - 1,
                count: 2,
            },
        ),
    ];
    for (ranges, want) in cases {
        let f = reframe(2, &ranges_payload(1, 1, ranges));
        assert_eq!(
            decode_frame(&f),
            Err(DecodeError::Ranges(want.clone())),
            "{ranges:?}"
        );
        let msg = Message::FreeRanges {
            seq: 1,
            last: true,
            ranges: ranges.iter().map(|&(a, b)| PfnRange::new(a, b)).collect(),
        };
        assert_eq!(encode(&msg), Err(EncodeError::Ranges(want.clone())));
    }
    // Adjacent is fine, and the very last frame below the limit too.
    let ok = reframe(
        2,
        &ranges_payload(1, 1, &[(0, 5), (5, 5), (PFN_LIMIT - 1, 1)]),
    );
    assert!(decode_frame(&ok).is_ok());
}

#[test]
fn lying_counts_and_lengths_are_refused_before_allocating() {
    // Claims 2^32-1 ranges in a short payload.
    let mut p = ranges_payload(1, 1, &[]);
    p[9..13].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode_frame(&reframe(2, &p)),
        Err(DecodeError::Ranges(RangeError::TooMany { .. }))
    ));
    // Claims 2 ranges, carries 1.
    let mut p = ranges_payload(1, 1, &[(1, 1)]);
    p[9..13].copy_from_slice(&2u32.to_le_bytes());
    assert!(matches!(
        decode_frame(&reframe(3, &p)),
        Err(DecodeError::BadLength { .. })
    ));
    // Trailing bytes after a complete message.
    assert!(matches!(
        decode_frame(&reframe(6, &[0])),
        Err(DecodeError::BadLength { .. })
    ));
    // A header announcing more than the limit.
    let mut f = reframe(6, &[]);
    let len = (MAX_PAYLOAD_LEN + 1) as u32;
    f[4..8].copy_from_slice(&len.to_le_bytes());
    f[8..12].copy_from_slice(&(!len).to_le_bytes());
    assert!(matches!(
        decode_frame(&f),
        Err(DecodeError::FrameTooLarge { .. })
    ));
}

#[test]
fn hello_checks_magic_version_bool_and_text() {
    let good = encode(&hello()).unwrap();
    let payload = &good[HEADER_LEN..];
    let mut p = payload.to_vec();
    p[0] = b'X';
    assert!(matches!(
        decode_frame(&reframe(1, &p)),
        Err(DecodeError::BadMagic(_))
    ));
    let mut p = payload.to_vec();
    p[4] = 2;
    assert_eq!(
        decode_frame(&reframe(1, &p)),
        Err(DecodeError::UnsupportedVersion {
            version: 2,
            supported: 1
        })
    );
    let mut p = payload.to_vec();
    p[10] = 7;
    assert!(matches!(
        decode_frame(&reframe(1, &p)),
        Err(DecodeError::BadBool { .. })
    ));
    let mut p = payload.to_vec();
    let n = p.len();
    p[n - 1] = 0xFF;
    assert_eq!(
        decode_frame(&reframe(1, &p)),
        Err(DecodeError::BadUtf8 {
            field: "agent_version"
        })
    );
    let long = Message::Hello(Hello {
        agent_version: "x".repeat(65),
        ..match hello() {
            Message::Hello(h) => h,
            _ => unreachable!(),
        }
    });
    assert!(matches!(
        encode(&long),
        Err(EncodeError::TextTooLong { .. })
    ));
}

#[test]
fn checksum_flags_and_unknown_types() {
    let mut f = encode(&hello()).unwrap();
    let n = f.len();
    f[n - 1] ^= 1;
    assert!(matches!(
        decode_frame(&f),
        Err(DecodeError::BadChecksum { .. })
    ));
    let mut f = encode(&Message::ReportNow).unwrap();
    f[3] = 1;
    assert_eq!(decode_frame(&f), Err(DecodeError::ReservedFlags(1)));
    assert_eq!(
        decode_frame(&reframe(99, &[])),
        Err(DecodeError::UnknownType(99))
    );
    assert_eq!(DecodeError::UnknownType(99).code(), ErrorCode::UNEXPECTED);
}

#[test]
fn error_text_is_cut_at_a_char_boundary() {
    let Message::Error { message, .. } = Message::error(ErrorCode::INTERNAL, "é".repeat(600))
    else {
        unreachable!()
    };
    assert!(message.len() <= MAX_ERROR_MESSAGE_LEN);
    assert!(encode(&Message::error(ErrorCode::INTERNAL, "é".repeat(600))).is_ok());
}

#[test]
fn reader_resyncs_after_garbage_and_partial_frames() {
    let a = encode(&hello()).unwrap();
    let b = encode(&Message::ReportNow).unwrap();
    let mut stream = b"garbage\xF1\xF1z".to_vec();
    stream.extend_from_slice(&a[5..]); // the tail of a frame the host attached in the middle of
    stream.extend_from_slice(&a);
    stream.extend_from_slice(&b);
    let mut r = FrameReader::new();
    let mut msgs = vec![];
    let mut errs = 0;
    // Byte by byte, the hardest case for a streaming parser.
    for byte in &stream {
        r.push(std::slice::from_ref(byte), |item| match item {
            Ok(m) => msgs.push(m),
            Err(_) => errs += 1,
        });
    }
    assert_eq!(msgs, vec![hello(), Message::ReportNow]);
    assert!(errs > 0);
    assert_eq!(r.buffered(), 0);
}

#[test]
fn reader_reports_bad_payloads_and_goes_on() {
    let mut stream = reframe(2, &ranges_payload(1, 1, &[(10, 5), (11, 1)]));
    stream.extend_from_slice(&encode(&Message::ReportNow).unwrap());
    let mut r = FrameReader::new();
    let mut items = vec![];
    r.push(&stream, |i| items.push(i));
    assert_eq!(items.len(), 2);
    assert!(matches!(items[0], Err(DecodeError::Ranges(_))));
    assert_eq!(items[1], Ok(Message::ReportNow));
}

#[test]
fn split_reports_join() {
    let ranges: Vec<PfnRange> = (0..10).map(|i| PfnRange::new(i * 10, 3)).collect();
    let msgs = range_messages(RangeKind::Hot, 5, &ranges, 4);
    assert_eq!(msgs.len(), 3);
    let mut asm = ReportAssembler::new(100);
    let mut done = vec![];
    for m in &msgs {
        let bytes = encode(m).unwrap();
        let (m, _) = decode_frame(&bytes).unwrap();
        if let Some(r) = asm.push(&m).unwrap() {
            done.push(r);
        }
    }
    assert_eq!(
        done,
        vec![Report {
            kind: RangeKind::Hot,
            seq: 5,
            ranges
        }]
    );
    let empty = range_messages(RangeKind::Free, 6, &[], 4);
    assert_eq!(
        empty,
        vec![Message::FreeRanges {
            seq: 6,
            last: true,
            ranges: vec![]
        }]
    );
}

#[test]
fn assembler_refuses_out_of_order_parts_and_oversized_reports() {
    let mut asm = ReportAssembler::new(3);
    let part = |seq, last, r: &[(u64, u64)]| Message::HotRanges {
        seq,
        last,
        ranges: r.iter().map(|&(a, b)| PfnRange::new(a, b)).collect(),
    };
    assert_eq!(asm.push(&part(1, false, &[(10, 5)])), Ok(None));
    assert!(matches!(
        asm.push(&part(1, true, &[(12, 1)])),
        Err(ReportError::Ranges { .. })
    ));
    // The rest of a failed report is ignored; the next one works.
    assert_eq!(asm.push(&part(1, true, &[(20, 1)])), Ok(None));
    assert!(asm.push(&part(2, true, &[(1, 1)])).unwrap().is_some());
    assert_eq!(asm.push(&part(3, false, &[(1, 1), (3, 1)])), Ok(None));
    assert!(matches!(
        asm.push(&part(3, true, &[(5, 1), (7, 1)])),
        Err(ReportError::TooManyRanges { .. })
    ));
    // A new seq abandons an unfinished report.
    assert_eq!(asm.push(&part(4, false, &[(100, 1)])), Ok(None));
    let r = asm.push(&part(5, true, &[(1, 1)])).unwrap().unwrap();
    assert_eq!(r.ranges, vec![PfnRange::new(1, 1)]);
}
