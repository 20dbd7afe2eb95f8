//! Target `codec`: the migration protocol's frame decoder (`transport::codec`), and the
//! page decoder (`transport::encoding::PageDecoder`) behind it.
//!
//! Checks: no input panics; every frame that decodes re-encodes to bytes that decode to
//! the same message, and re-encoding that gives the same bytes (the encoding is
//! canonical); a decoded `Pages`/`Update` iterates over exactly its count of pages and
//! splits anywhere; the page decoder turns a decoded `Pages` into raw and zero runs and
//! unresolved references that together cover exactly its pages.

use bytes::Bytes;
use transport::codec::{decode, decode_body, encode_to_vec, HEADER_LEN};
use transport::encoding::PageDecoder;
use transport::message::{
    Message, PageKind, PageRef, Pages, FEATURE_DEDUP, FEATURE_LZ4, PAGE_SIZE,
};

use crate::input::Input;

/// The target: `data` is a stream of frames; its first byte and the rest are also tried as
/// a frame type and a body without the header's length checks.
pub fn codec(data: &[u8]) {
    let mut buf = data;
    while let Ok(Some((msg, used))) = decode(buf) {
        assert!(
            (HEADER_LEN..=buf.len()).contains(&used),
            "decode used {used} of {} bytes",
            buf.len()
        );
        check_message(&msg, &buf[..used]);
        buf = &buf[used..];
    }
    let mut inp = Input::new(data);
    let ty = inp.u8();
    let body = inp.rest();
    if let Ok(msg) = decode_body(ty, Bytes::copy_from_slice(body)) {
        let mut frame = ((body.len() + 1) as u32).to_le_bytes().to_vec();
        frame.push(ty);
        frame.extend_from_slice(body);
        check_message(&msg, &frame);
    }
}

/// Re-encodes `msg` (decoded from `frame`) and checks it against the decoder again.
fn check_message(msg: &Message, frame: &[u8]) {
    let enc = encode_to_vec(msg);
    let (back, used) = match decode(&enc) {
        Ok(Some(d)) => d,
        other => panic!("{} re-encoded does not decode: {other:?}", msg.name()),
    };
    assert_eq!(used, enc.len(), "re-encoded {} decodes short", msg.name());
    assert_eq!(&back, msg, "decode(encode(m)) != m");
    assert_eq!(encode_to_vec(&back), enc, "encoding is not canonical");
    // Every field survives, so only bytes the message does not keep may differ: the
    // `last` flag of a `PageSet` (any non-zero byte is true) and an unknown error code.
    if !matches!(msg, Message::PageSet { .. } | Message::Error { .. }) {
        assert_eq!(enc, frame, "{} re-encodes to other bytes", msg.name());
    }
    match msg {
        Message::Pages(p) => {
            check_pages(p);
            check_page_decoder(p);
        }
        Message::Update { pages, versions } => {
            check_pages(pages);
            assert_eq!(versions.len(), pages.count());
            assert!(versions.iter().all(|&v| v != 0));
            assert!(pages
                .kinds
                .iter()
                .all(|&k| k == PageKind::Raw as u8 || k == PageKind::Zero as u8));
        }
        _ => {}
    }
}

fn check_pages(p: &Pages) {
    let all: Vec<_> = p.iter().collect();
    assert_eq!(all.len(), p.count(), "iter stops early on a decoded Pages");
    for (i, (n, _)) in all.iter().enumerate() {
        assert_eq!(*n, p.first + i as u64);
    }
    let payload: usize = all
        .iter()
        .map(|(_, r)| match r {
            PageRef::Raw(d) => d.len(),
            PageRef::Zero => 0,
            PageRef::Lz4(b) => 2 + b.len(),
            PageRef::Ref { .. } => transport::message::REF_LEN,
        })
        .sum();
    assert_eq!(payload, p.payload.len(), "pages do not cover the payload");
    for k in [0, 1, p.count() / 2, p.count()] {
        let (a, b) = p.split_at(k).expect("split inside a decoded Pages");
        assert_eq!(a.count() + b.count(), p.count());
        let joined: Vec<_> = a.iter().chain(b.iter()).collect();
        assert_eq!(joined, all, "split at {k} loses pages");
    }
}

/// Resolves references against a destination whose page `n` holds `n % 251` in every
/// byte (pages past 1000 are absent).
fn check_page_decoder(p: &Pages) {
    let mut dec = PageDecoder::new(FEATURE_LZ4 | FEATURE_DEDUP);
    let read = |n: u64, out: &mut [u8]| {
        if n >= 1000 {
            return false;
        }
        out.fill((n % 251) as u8);
        true
    };
    let Ok(d) = dec.decode(p.clone(), read) else {
        return;
    };
    let mut covered: Vec<u64> = d.unresolved.clone();
    for run in &d.runs {
        for (n, r) in run.iter() {
            match r {
                PageRef::Raw(data) => assert_eq!(data.len(), PAGE_SIZE),
                PageRef::Zero => {}
                other => panic!("decoded run holds an encoded page: {other:?}"),
            }
            covered.push(n);
        }
        assert_eq!(run.iter().count(), run.count());
    }
    covered.sort_unstable();
    let expected: Vec<u64> = (p.first..p.first + p.count() as u64).collect();
    assert_eq!(
        covered, expected,
        "decoded runs and unresolved pages miss or repeat pages"
    );
}

/// Seeds: one frame of every message type, and the small ones back to back.
pub fn seeds() -> Vec<Vec<u8>> {
    let msgs = crate::samples::messages();
    let mut out: Vec<Vec<u8>> = msgs.iter().map(encode_to_vec).collect();
    out.push(
        msgs.iter()
            .map(encode_to_vec)
            .filter(|f| f.len() < 1024)
            .flatten()
            .collect(),
    );
    // A zero run longer than a `Pages` message: its own frame type.
    if let Some(run) = transport::message::Pages::zeros(3, 1000) {
        out.push(encode_to_vec(&transport::message::Message::Pages(run)));
    }
    out
}
