//! What a source's push has handed to its stream: pages and their encoded bytes, shared
//! with the application while the session runs, so that it can tell how many pages have
//! left from the bytes that did ([`crate::quic::stream_bytes_sent`]), and what the
//! encoding makes of a page.
//!
//! With `--encoding off` a page is about a page of bytes on the stream, but compressed
//! pages, references into the replica and zero runs cost less: counting pages as bytes
//! sent over the page size then leaves most of a compressible push "remaining" until its
//! end.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::message::Pages;

/// Counters of the push, written by the session and read by anyone holding the `Arc`
/// ([`crate::proto::SourceSession::push_tally`]).
#[derive(Debug, Default)]
pub struct PushTally {
    pages: AtomicU64,
    wire_bytes: AtomicU64,
}

impl PushTally {
    /// `frames` were handed to the stream.
    pub(crate) fn add(&self, frames: &[Pages]) {
        let pages = frames.iter().map(|f| f.count() as u64).sum();
        let wire = frames.iter().map(Pages::wire_len).sum();
        // Two relaxed adds: a reader may see a batch's pages without its bytes, or its
        // bytes without its pages, a transient error of one batch (16 pages of data, or a
        // zero run) in an average over the whole push.
        self.pages.fetch_add(pages, Ordering::Relaxed);
        self.wire_bytes.fetch_add(wire, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> Pushed {
        Pushed {
            pages: self.pages.load(Ordering::Relaxed),
            wire_bytes: self.wire_bytes.load(Ordering::Relaxed),
        }
    }
}

/// The push so far, over every connection of the session (a resumed session pushes the
/// pages that had not arrived again, and counts them again).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pushed {
    /// Pages in the frames handed to the stream.
    pub pages: u64,
    /// Their bytes past the frame headers ([`Pages::wire_len`]).
    pub wire_bytes: u64,
}

impl Pushed {
    /// Pages that have left once `bytes_sent` of the push's encoded bytes have
    /// ([`crate::quic::stream_bytes_sent`] estimates those, headers taken out), at the
    /// push's encoded bytes per page so far. Demand replies, on other streams, count at
    /// the same rate: they are pages too. `None` before the push handed out a page: no
    /// average yet.
    pub fn pages_sent(&self, bytes_sent: u64) -> Option<u64> {
        if self.pages == 0 || self.wire_bytes == 0 {
            return None;
        }
        let pages = bytes_sent as u128 * self.pages as u128 / self.wire_bytes as u128;
        Some(u64::try_from(pages).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::PAGE_SIZE;

    #[test]
    fn the_tally_counts_pages_and_their_encoded_bytes() {
        let mut mem = vec![7u8; 4 * PAGE_SIZE];
        mem[PAGE_SIZE..2 * PAGE_SIZE].fill(0);
        let frames = [
            Pages::from_memory(0, &mem),
            Pages::zeros(100, 50).unwrap(),
            Pages::from_memory(9, &mem[..PAGE_SIZE]),
        ];
        let t = PushTally::default();
        assert_eq!(t.snapshot(), Pushed::default());
        t.add(&frames);
        t.add(&frames[2..]);
        let s = t.snapshot();
        assert_eq!(s.pages, 4 + 50 + 2);
        // Kinds and raw pages: 4 kinds, 3 pages; 50 kinds; twice 1 kind and a page.
        assert_eq!(s.wire_bytes, (4 + 3 * 4096) + 50 + 2 * (1 + 4096));
    }

    #[test]
    fn pages_sent_follow_the_bytes_sent_at_the_average_cost_of_a_page() {
        assert_eq!(Pushed::default().pages_sent(1 << 20), None);
        // Pages compressed to a quarter: 1,000 pages in 1,024,000 bytes.
        let p = Pushed {
            pages: 1_000,
            wire_bytes: 1_024_000,
        };
        assert_eq!(p.pages_sent(0), Some(0));
        assert_eq!(p.pages_sent(512_000), Some(500));
        assert_eq!(p.pages_sent(1_024_000), Some(1_000));
        // Huge counts do not overflow.
        let big = Pushed {
            pages: u64::MAX,
            wire_bytes: 1,
        };
        assert_eq!(big.pages_sent(u64::MAX), Some(u64::MAX));
    }
}
