//! Target `guest_agent`: what the host parses from a guest, `guest_agent::proto` — the
//! frame decoder, the stream reader that resynchronises after garbage
//! ([`FrameReader`]), the payload decoders, and the [`ReportAssembler`] that joins
//! multi-part reports.
//!
//! The first byte picks how the rest is used: as a raw byte stream, or cut into payloads
//! that are framed with a correct checksum (so the payload decoders are reached past the
//! CRC). The stream is fed to one reader whole and to another in pieces of fuzzed sizes.
//!
//! Checks: nothing panics; both readers yield the same messages (chunking never loses or
//! changes a frame) and never buffer more than their bound; every decoded message
//! re-encodes and decodes to itself; every report the assembler completes obeys the range
//! rules and its bound.

use guest_agent::proto::{
    crc32, decode_frame, decode_payload, encode, validate_ranges, FrameReader, Message,
    ReportAssembler, FRAME_SYNC, HEADER_LEN,
};

use crate::input::{chunks, Input};

/// Ranges a report may have in the assembler under test.
const MAX_REPORT_RANGES: usize = 64;

/// The target.
pub fn guest_agent(data: &[u8]) {
    let mut inp = Input::new(data);
    let mode = inp.u8();
    let stream = if mode & 1 == 0 {
        inp.rest().to_vec()
    } else {
        frame_payloads(&mut inp)
    };

    let whole = read_all(&[&stream]);
    let pieces = chunks(&stream, u64::from(mode), 1 + usize::from(mode >> 1) * 4);
    let split = read_all(&pieces);
    assert_eq!(whole, split, "chunking changed the messages read");

    let mut asm = ReportAssembler::new(MAX_REPORT_RANGES);
    for msg in &whole {
        check_roundtrip(msg);
        if let Ok(Some(report)) = asm.push(msg) {
            assert!(report.ranges.len() <= MAX_REPORT_RANGES);
            assert!(validate_ranges(&report.ranges, 0).is_ok(), "{report:?}");
        }
    }

    if let Ok((msg, used)) = decode_frame(&stream) {
        assert!(used >= HEADER_LEN && used <= stream.len());
        check_roundtrip(&msg);
    }
    if let Some((&ty, payload)) = data.split_first() {
        if let Ok(msg) = decode_payload(ty, payload) {
            check_roundtrip(&msg);
        }
    }
}

/// Cuts the input into `type, len, payload` records and frames each payload with a valid
/// header and checksum; a record's first byte can also insert garbage or corrupt the frame.
fn frame_payloads(inp: &mut Input) -> Vec<u8> {
    let mut out = Vec::new();
    while !inp.is_empty() {
        let ty = inp.u8();
        let how = inp.u8();
        let len = usize::from(inp.u16() % 2048);
        let payload = inp.bytes(len);
        let start = out.len();
        out.extend_from_slice(&FRAME_SYNC);
        out.push(ty);
        out.push(0);
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&(!(payload.len() as u32)).to_le_bytes());
        out.extend_from_slice(&crc32(payload).to_le_bytes());
        out.extend_from_slice(payload);
        match how % 8 {
            0 => out.extend_from_slice(&FRAME_SYNC[..1]),
            1 => {
                let n = out.len() - start;
                let at = start + usize::from(how >> 3) % n;
                out[at] ^= 1 << (how & 7);
            }
            2 => out.extend_from_slice(&[0x00, 0xF1, 0xF1, 0x7A]),
            _ => {}
        }
    }
    out
}

/// Every message a fresh reader yields from `pieces` fed in order; errors are skipped.
fn read_all(pieces: &[&[u8]]) -> Vec<Message> {
    let mut r = FrameReader::new();
    let mut msgs = Vec::new();
    for p in pieces {
        r.push(p, |item| {
            if let Ok(m) = item {
                msgs.push(m);
            }
        });
        assert!(r.buffered() <= r.capacity());
    }
    msgs
}

fn check_roundtrip(msg: &Message) {
    let bytes = encode(msg).unwrap_or_else(|e| panic!("decoded {msg:?} does not encode: {e}"));
    let (back, used) = decode_frame(&bytes).expect("re-encoded frame decodes");
    assert_eq!(used, bytes.len());
    assert_eq!(&back, msg);
}

/// Seeds: a whole report as an agent writes it (raw mode), the same after garbage, and
/// framed payloads of a few types.
pub fn seeds() -> Vec<Vec<u8>> {
    use guest_agent::proto::{report_frames, Hello, PfnRange, TouchReport, PROTOCOL_VERSION};
    let hello = Hello {
        version: PROTOCOL_VERSION,
        agent_version: "0.1.0".into(),
        page_size: 4096,
        poison_on_free: true,
        mem_total_bytes: 1 << 30,
    };
    let hot = [
        PfnRange::new(16, 4),
        PfnRange::new(100, 1),
        PfnRange::new(101, 9),
    ];
    let free = [PfnRange::new(0, 16), PfnRange::new(4096, 1024)];
    let report = report_frames(&hello, 7, &hot, &free, 2).expect("valid report");
    let mut seeds = vec![[&[0u8][..], &report].concat()];
    seeds.push([&[0u8, 0xF1, 0x00, 0x13][..], &report, &report[..20]].concat());
    let mut framed = vec![1u8];
    for msg in [
        Message::PostcopyStarted,
        Message::Touched(TouchReport {
            processes: 3,
            pages: 100,
            failed_pages: 1,
            elapsed_ms: 12,
        }),
        Message::error(guest_agent::proto::ErrorCode::SCAN_FAILED, "no pagemap"),
    ] {
        let f = encode(&msg).expect("encodes");
        let payload = &f[HEADER_LEN..];
        framed.push(f[2]);
        framed.push(3);
        framed.extend_from_slice(&(payload.len() as u16).to_le_bytes());
        framed.extend_from_slice(payload);
    }
    seeds.push(framed);
    seeds
}
