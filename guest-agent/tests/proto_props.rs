//! Property tests of the protocol: arbitrary bytes never make a decoder panic or a reader
//! grow past its bound, and every valid message survives encode → decode, whole or fed in
//! arbitrary pieces.

use guest_agent::proto::{
    decode_frame, decode_payload, encode, ErrorCode, FrameReader, Hello, Message, PfnRange,
    TouchReport, MAX_FRAME_LEN, PFN_LIMIT,
};
use proptest::prelude::*;

/// Sorted, non-overlapping, non-empty ranges below the frame limit.
fn ranges() -> impl Strategy<Value = Vec<PfnRange>> {
    prop::collection::vec((0u64..1 << 20, 1u64..1 << 12), 0..64).prop_map(|gaps| {
        let mut next = 0u64;
        gaps.into_iter()
            .filter_map(|(gap, count)| {
                let first = next.checked_add(gap)?;
                let end = first.checked_add(count)?;
                (end <= PFN_LIMIT).then(|| {
                    next = end;
                    PfnRange::new(first, count)
                })
            })
            .collect()
    })
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (
            "[a-z0-9.+-]{0,64}",
            any::<u32>(),
            any::<bool>(),
            any::<u64>()
        )
            .prop_map(|(v, page_size, poison, mem)| Message::Hello(Hello {
                version: 1,
                agent_version: v,
                page_size,
                poison_on_free: poison,
                mem_total_bytes: mem,
            })),
        (any::<u64>(), any::<bool>(), ranges())
            .prop_map(|(seq, last, ranges)| Message::HotRanges { seq, last, ranges }),
        (any::<u64>(), any::<bool>(), ranges())
            .prop_map(|(seq, last, ranges)| Message::FreeRanges { seq, last, ranges }),
        Just(Message::PostcopyStarted),
        Just(Message::PostcopyFinished),
        Just(Message::ReportNow),
        (any::<u32>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(p, a, b, c)| {
            Message::Touched(TouchReport {
                processes: p,
                pages: a,
                failed_pages: b,
                elapsed_ms: c,
            })
        }),
        (any::<u16>(), ".{0,300}").prop_map(|(c, m)| Message::error(ErrorCode(c), m)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let _ = decode_frame(&bytes);
        for t in 0..=9u8 {
            let _ = decode_payload(t, &bytes);
        }
        let mut r = FrameReader::new();
        r.push(&bytes, |_| {});
        prop_assert!(r.buffered() <= MAX_FRAME_LEN);
    }

    #[test]
    fn arbitrary_bytes_after_a_valid_header_never_panic(
        msg_type in 0u8..12,
        payload in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        // Valid framing and checksum around random content: the payload decoders are
        // exercised rather than the header checks.
        let len = payload.len() as u32;
        let mut f = vec![0xF1, 0x7A, msg_type, 0];
        f.extend_from_slice(&len.to_le_bytes());
        f.extend_from_slice(&(!len).to_le_bytes());
        f.extend_from_slice(&guest_agent::proto::crc32(&payload).to_le_bytes());
        f.extend_from_slice(&payload);
        let _ = decode_frame(&f);
    }

    #[test]
    fn messages_round_trip(m in message()) {
        let bytes = encode(&m).unwrap();
        let (back, used) = decode_frame(&bytes).unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(back, m);
    }

    #[test]
    fn reader_finds_every_message_in_any_chunking(
        msgs in prop::collection::vec(message(), 1..8),
        noise in prop::collection::vec(any::<u8>(), 0..64),
        cuts in prop::collection::vec(1usize..300, 1..50),
    ) {
        // Noise (without sync bytes, which could swallow the first frame's start) first,
        // then the frames, delivered in arbitrary pieces.
        let mut stream: Vec<u8> = noise.into_iter().filter(|&b| b != 0xF1).collect();
        for m in &msgs {
            stream.extend_from_slice(&encode(m).unwrap());
        }
        let mut r = FrameReader::new();
        let mut got = Vec::new();
        let mut rest = &stream[..];
        let mut i = 0;
        while !rest.is_empty() {
            let n = cuts[i % cuts.len()].min(rest.len());
            r.push(&rest[..n], |item| {
                if let Ok(m) = item {
                    got.push(m);
                }
            });
            rest = &rest[n..];
            i += 1;
        }
        prop_assert_eq!(got, msgs);
        prop_assert_eq!(r.buffered(), 0);
    }
}
