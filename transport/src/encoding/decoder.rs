//! The destination side: decode compressed pages and resolve references into plain raw and
//! zero pages that any [`crate::quic::PageSink`] installs.

use bytes::Bytes;
use thiserror::Error;

use super::page_hash;
use crate::message::{PageKind, PageRef, Pages, PAGE_SIZE};

/// A page that cannot be decoded: the peer sent garbage, and the session fails.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// An lz4 block that is corrupt or does not decompress to exactly one page.
    #[error("page {page}: lz4 block does not decompress to one page ({0})", .reason)]
    Lz4 {
        /// The page the block stands for.
        page: u64,
        /// The decompressor's error, or how many bytes came out.
        reason: String,
    },
    /// An lz4 page, though the source did not offer lz4.
    #[error("page {page}: compressed page while lz4 was not offered")]
    Lz4NotOffered {
        /// The page sent compressed.
        page: u64,
    },
    /// A reference, though deduplication was not negotiated.
    #[error("page {page}: reference while deduplication was not negotiated")]
    RefNotNegotiated {
        /// The page sent as a reference.
        page: u64,
    },
}

/// Decoded pages: runs of raw and zero pages to install, and pages whose reference could not
/// be verified (ask the source for them).
#[derive(Debug, Default)]
pub struct Decoded {
    /// Runs of raw and zero pages to install, in page order; the unresolved pages are left
    /// out, so one message may become several runs.
    pub runs: Vec<Pages>,
    /// Pages sent as references that could not be verified (the referenced page is absent,
    /// or its content no longer hashes to the reference's): request them from the source.
    pub unresolved: Vec<u64>,
    /// Pages that arrived lz4-compressed.
    pub lz4_pages: u64,
    /// Pages that arrived as references, resolved or not.
    pub ref_pages: u64,
}

/// Decodes one session's pages.
pub struct PageDecoder {
    lz4: bool,
    dedup: bool,
    buf: Vec<u8>,
}

/// A run being assembled.
#[derive(Default)]
struct Run {
    first: u64,
    kinds: Vec<u8>,
    payload: Vec<u8>,
}

impl Run {
    fn take(&mut self, out: &mut Vec<Pages>, next_first: u64) {
        if !self.kinds.is_empty() {
            out.push(Pages {
                first: self.first,
                kinds: Bytes::from(std::mem::take(&mut self.kinds)),
                payload: Bytes::from(std::mem::take(&mut self.payload)),
            });
        }
        self.first = next_first;
    }
}

impl PageDecoder {
    /// A decoder for the encodings in `features` (at a destination,
    /// [`crate::proto::DestSession::decodes`]: those agreed to, and lz4 where the source
    /// offered it); others are refused.
    pub fn new(features: u64) -> PageDecoder {
        PageDecoder {
            lz4: features & crate::message::FEATURE_LZ4 != 0,
            dedup: features & crate::message::FEATURE_DEDUP != 0,
            buf: vec![0; PAGE_SIZE],
        }
    }

    /// Decodes `pages`. `read(page, out)` copies a page the destination holds (present) into
    /// `out` and says whether it could; a reference resolves only if that content hashes to
    /// the reference's hash.
    pub fn decode(
        &mut self,
        pages: Pages,
        mut read: impl FnMut(u64, &mut [u8]) -> bool,
    ) -> Result<Decoded, DecodeError> {
        let plain = pages
            .kinds
            .iter()
            .all(|&k| k == PageKind::Raw as u8 || k == PageKind::Zero as u8);
        if plain {
            return Ok(Decoded {
                runs: vec![pages],
                ..Decoded::default()
            });
        }
        let mut out = Decoded::default();
        let mut run = Run {
            first: pages.first,
            ..Run::default()
        };
        for (n, page) in pages.iter() {
            match page {
                PageRef::Zero => {
                    run.kinds.push(PageKind::Zero as u8);
                }
                PageRef::Raw(d) => {
                    run.kinds.push(PageKind::Raw as u8);
                    run.payload.extend_from_slice(d);
                }
                PageRef::Lz4(block) => {
                    if !self.lz4 {
                        return Err(DecodeError::Lz4NotOffered { page: n });
                    }
                    match lz4_flex::block::decompress_into(block, &mut self.buf) {
                        Ok(PAGE_SIZE) => {}
                        Ok(len) => {
                            return Err(DecodeError::Lz4 {
                                page: n,
                                reason: format!("{len} bytes"),
                            })
                        }
                        Err(e) => {
                            return Err(DecodeError::Lz4 {
                                page: n,
                                reason: e.to_string(),
                            })
                        }
                    }
                    out.lz4_pages += 1;
                    run.kinds.push(PageKind::Raw as u8);
                    run.payload.extend_from_slice(&self.buf);
                }
                PageRef::Ref { page: held, hash } => {
                    if !self.dedup {
                        return Err(DecodeError::RefNotNegotiated { page: n });
                    }
                    out.ref_pages += 1;
                    if read(held, &mut self.buf) && page_hash(&self.buf) == hash {
                        run.kinds.push(PageKind::Raw as u8);
                        run.payload.extend_from_slice(&self.buf);
                    } else {
                        out.unresolved.push(n);
                        run.take(&mut out.runs, n + 1);
                    }
                }
            }
        }
        run.take(&mut out.runs, 0);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{EncodingPolicy, PageEncoder};
    use super::*;
    use crate::message::{FEATURE_DEDUP, FEATURE_LZ4};

    const ALL: u64 = FEATURE_LZ4 | FEATURE_DEDUP;

    /// Pages: text-like, zero, a copy of the first, random.
    fn image() -> Vec<u8> {
        let mut v = Vec::new();
        let text: Vec<u8> = b"faultline moves memory; "
            .iter()
            .cycle()
            .take(PAGE_SIZE)
            .copied()
            .collect();
        v.extend_from_slice(&text);
        v.extend_from_slice(&[0; PAGE_SIZE]);
        v.extend_from_slice(&text);
        let mut x = 0x1234_5678_9abc_def0u64;
        for _ in 0..PAGE_SIZE / 8 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.extend_from_slice(&x.to_le_bytes());
        }
        v
    }

    fn flatten(d: &Decoded) -> Vec<(u64, Vec<u8>)> {
        d.runs
            .iter()
            .flat_map(|p| {
                p.iter()
                    .map(|(n, r)| match r {
                        PageRef::Raw(b) => (n, b.to_vec()),
                        PageRef::Zero => (n, vec![0; PAGE_SIZE]),
                        other => panic!("undecoded {other:?}"),
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The early push's encoder never writes a reference, but indexes what it sends where
    /// the `Hello` offers references and the policy uses them; the push after the answer
    /// takes that index over and names those pages.
    #[test]
    fn the_push_after_the_answer_references_what_the_early_push_sent() {
        use super::super::Mode;
        let mem = image();
        let text = &mem[..PAGE_SIZE];
        let lz4_only = EncodingPolicy {
            lz4: Mode::On,
            dedup: Mode::Off,
        };
        // (policy, offered in the `Hello`, agreed to, whether the push references page 100)
        for (policy, offered, agreed, refs) in [
            (EncodingPolicy::ALL, ALL, ALL, true),
            (EncodingPolicy::AUTO, ALL, ALL, true),
            (EncodingPolicy::ALL, FEATURE_LZ4, ALL, false),
            (lz4_only, ALL, ALL, false),
            (EncodingPolicy::ALL, ALL, FEATURE_LZ4, false),
        ] {
            let case = format!("{policy:?} offered {offered:#x} agreed {agreed:#x}");
            let mut early = PageEncoder::before_answer(policy, offered);
            // A page and its copy: both compressed, as nothing is agreed yet.
            let sent = early.encode_push(100, &[text, text].concat());
            assert_eq!(sent.kinds.to_vec(), [PageKind::Lz4 as u8; 2], "{case}");
            assert_eq!(early.stats().ref_pages, 0, "{case}");
            let mut push = PageEncoder::new(policy, agreed);
            push.adopt_index(early.take_index());
            let later = push.encode_push(200, text);
            if refs {
                assert_eq!(later.kinds.to_vec(), [PageKind::Ref as u8], "{case}");
                assert_eq!(later.payload[..8], 100u64.to_le_bytes(), "{case}");
            } else {
                assert_eq!(later.kinds.to_vec(), [PageKind::Lz4 as u8], "{case}");
            }
        }
    }

    #[test]
    fn every_encoding_round_trips_and_references_are_verified() {
        let mem = image();
        let mut enc = PageEncoder::new(EncodingPolicy::ALL, ALL);
        // Two batches: a reference points at an earlier batch, never into its own (the
        // destination installs a message only after decoding all of it).
        let first = enc.encode_push(100, &mem[..2 * PAGE_SIZE]);
        assert_eq!(
            first.kinds.to_vec(),
            [PageKind::Lz4 as u8, PageKind::Zero as u8]
        );
        let pages = enc.encode_push(102, &mem[2 * PAGE_SIZE..]);
        assert_eq!(
            pages.kinds.to_vec(),
            [PageKind::Ref as u8, PageKind::Raw as u8]
        );
        let s = enc.stats();
        assert!(s.wire_bytes() < mem.len() as u64 / 2, "{s:?}");
        let mut dec = PageDecoder::new(ALL);
        let d = dec.decode(first, |_, _| false).unwrap();
        let mut got = flatten(&d);
        // Through the codec, as on the wire.
        let wire = crate::codec::encode_to_vec(&crate::message::Message::Pages(pages));
        let (msg, _) = crate::codec::decode(&wire).unwrap().unwrap();
        let crate::message::Message::Pages(pages) = msg else {
            panic!()
        };
        // The destination holds page 100 as sent: the reference to it resolves.
        let page100 = mem[..PAGE_SIZE].to_vec();
        let read = |p: u64, out: &mut [u8]| {
            p == 100 && {
                out.copy_from_slice(&page100);
                true
            }
        };
        let d = dec.decode(pages.clone(), read).unwrap();
        assert!(d.unresolved.is_empty());
        got.extend(flatten(&d));
        let want: Vec<(u64, Vec<u8>)> = mem
            .chunks(PAGE_SIZE)
            .enumerate()
            .map(|(i, c)| (100 + i as u64, c.to_vec()))
            .collect();
        assert_eq!(got, want);

        // The guest changed page 100 since: the reference fails verification, page 102 is
        // left out and asked for, and the others still decode.
        let changed = |p: u64, out: &mut [u8]| {
            p == 100 && {
                out.fill(7);
                true
            }
        };
        let d = dec.decode(pages.clone(), changed).unwrap();
        assert_eq!(d.unresolved, vec![102]);
        let got: Vec<u64> = flatten(&d).into_iter().map(|(n, _)| n).collect();
        assert_eq!(got, vec![103]);
        // Not present at all: the same.
        let d = dec.decode(pages, |_, _| false).unwrap();
        assert_eq!(d.unresolved, vec![102]);
    }

    #[test]
    fn encodings_not_negotiated_are_refused() {
        let mem = image();
        let pages = PageEncoder::new(EncodingPolicy::ALL, ALL).encode_push(0, &mem);
        let e = PageDecoder::new(0).decode(pages, |_, _| false).unwrap_err();
        assert_eq!(e, DecodeError::Lz4NotOffered { page: 0 });
        // The encoder itself never uses what the destination did not accept.
        let pages = PageEncoder::new(EncodingPolicy::ALL, 0).encode_push(0, &mem);
        assert!(pages
            .kinds
            .iter()
            .all(|&k| k == PageKind::Raw as u8 || k == PageKind::Zero as u8));
    }

    #[test]
    fn a_corrupt_lz4_block_is_an_error_not_a_panic() {
        let mem = image();
        let pages = PageEncoder::new(EncodingPolicy::ALL, ALL).encode_push(0, &mem);
        let mut payload = pages.payload.to_vec();
        for b in payload.iter_mut().skip(2).take(40) {
            *b = 0xff;
        }
        let bad = Pages {
            payload: Bytes::from(payload),
            ..pages
        };
        let r = PageDecoder::new(ALL).decode(bad, |_, _| false);
        assert!(matches!(r, Err(DecodeError::Lz4 { page: 0, .. })), "{r:?}");
    }

    #[test]
    fn urgent_replies_never_reference() {
        let mem = image();
        let mut enc = PageEncoder::new(EncodingPolicy::ALL, ALL);
        let pages = enc.encode_reply(0, &mem);
        assert!(!pages.kinds.contains(&(PageKind::Ref as u8)));
        assert!(!pages.kinds.contains(&(PageKind::Lz4 as u8)));
    }

    #[test]
    fn references_into_the_replica_once_its_index_is_known() {
        let mem = image();
        // Page 2 of the image is the one whose content page 0 also has (text + copy).
        let index: super::super::ReplicaIndex = Default::default();
        let mut enc = PageEncoder::new(EncodingPolicy::ALL, ALL).with_replica_index(index.clone());
        let page = &mem[2 * PAGE_SIZE..3 * PAGE_SIZE];
        // Not known yet: sent in full (this encoder is dropped, so it indexes nothing here).
        let mut early =
            PageEncoder::new(EncodingPolicy::ALL, ALL).with_replica_index(index.clone());
        assert!(early.replica_index_pending());
        assert_ne!(early.encode_push(500, page).kinds[0], PageKind::Ref as u8);
        // The replica holds that content at page 7.
        let mut held = std::collections::HashMap::new();
        held.insert(super::super::page_hash(page), 7u64);
        index.set(held).unwrap();
        assert!(!enc.replica_index_pending());
        let pages = enc.encode_push(900, page);
        assert_eq!(pages.kinds.to_vec(), [PageKind::Ref as u8]);
        assert_eq!(enc.stats().ref_replica_pages, 1);
        let mut dec = PageDecoder::new(ALL);
        let read = |p: u64, out: &mut [u8]| {
            p == 7 && {
                out.copy_from_slice(page);
                true
            }
        };
        let d = dec.decode(pages.clone(), read).unwrap();
        assert_eq!(flatten(&d), vec![(900, page.to_vec())]);
        // A replica page that is not what the index says: asked for again.
        let d = dec
            .decode(pages, |p, out| {
                p == 7 && {
                    out.fill(1);
                    true
                }
            })
            .unwrap();
        assert_eq!(d.unresolved, vec![900]);
        // Without dedup negotiated the index is not used.
        let mut off = PageEncoder::new(EncodingPolicy::ALL, 0).with_replica_index(index);
        assert_ne!(off.encode_push(900, page).kinds[0], PageKind::Ref as u8);
    }
}
