//! What a source's push has handed to its stream: pages, their encoded bytes and their
//! frames' bytes, shared with the application while the session runs, so that it can tell
//! how many pages have left from the stream bytes that did
//! ([`crate::quic::stream_bytes_sent`]), and what the encoding makes of a page.
//!
//! With `--encoding off` a page is about a page of stream bytes, but compressed pages,
//! references into the replica and zero runs cost less: counting pages as stream bytes
//! over the page size then leaves most of a compressible push "remaining" until its end.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::codec::pages_frame_len;
use crate::message::Pages;

/// Counters of the push, written by the session and read by anyone holding the `Arc`
/// ([`crate::proto::SourceSession::push_tally`]).
#[derive(Debug, Default)]
pub struct PushTally {
    pages: AtomicU64,
    wire_bytes: AtomicU64,
    stream_bytes: AtomicU64,
    done: AtomicBool,
}

impl PushTally {
    /// `frames` were handed to the stream.
    pub(crate) fn add(&self, frames: &[Pages]) {
        let (mut pages, mut wire, mut stream) = (0, 0, 0);
        for f in frames {
            pages += f.count() as u64;
            wire += f.wire_len();
            stream += pages_frame_len(f);
        }
        // The bytes before the pages, both released, and [`PushTally::snapshot`] reads the
        // pages first: a reader that sees a batch's pages sees its bytes too (perhaps a
        // later batch's bytes as well), so a page never looks cheaper than it was.
        self.wire_bytes.fetch_add(wire, Ordering::Release);
        self.stream_bytes.fetch_add(stream, Ordering::Release);
        self.pages.fetch_add(pages, Ordering::Release);
    }

    /// The push's last frames are written (`true`, after their [`PushTally::add`]), or a
    /// resume gave it pages to push again.
    pub(crate) fn set_done(&self, done: bool) {
        self.done.store(done, Ordering::Release);
    }

    /// The counters now.
    pub fn snapshot(&self) -> Pushed {
        let done = self.done.load(Ordering::Acquire);
        let pages = self.pages.load(Ordering::Acquire);
        Pushed {
            done,
            pages,
            wire_bytes: self.wire_bytes.load(Ordering::Acquire),
            stream_bytes: self.stream_bytes.load(Ordering::Acquire),
        }
    }
}

/// The push so far, over every connection of the session (a resumed session pushes the
/// pages that had not arrived again, and counts them again).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pushed {
    /// Pages in the frames handed to the stream.
    pub pages: u64,
    /// Their bytes past the frame headers ([`Pages::wire_len`]): what the encoding made of
    /// them.
    pub wire_bytes: u64,
    /// Their frames' bytes on the stream, headers included.
    pub stream_bytes: u64,
    /// The push has written its last page's frames (until a resume gives it pages again):
    /// what it has left to send is in its stream, and its last bytes leave within a stream
    /// window's time. Read first: the counts beside it then include those frames.
    pub done: bool,
}

impl Pushed {
    /// Pages that have left once `stream_bytes_sent` stream bytes have, at the push's
    /// average frame bytes per page so far. Demand replies, on other streams, count at the
    /// same rate: they are pages too. `None` before the push handed out a page: no average
    /// yet.
    ///
    /// Frame bytes, headers included, as [`crate::quic::PACKET_OVERHEAD`] leaves them in
    /// the stream bytes: with small frames (references, lone zero pages: 16 to 40 bytes,
    /// 15 of them header) dividing by the encoded bytes alone would count up to many times
    /// too many.
    pub fn pages_sent(&self, stream_bytes_sent: u64) -> Option<u64> {
        if self.pages == 0 || self.stream_bytes == 0 {
            return None;
        }
        let pages = stream_bytes_sent as u128 * self.pages as u128 / self.stream_bytes as u128;
        Some(u64::try_from(pages).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::encode_to_vec;
    use crate::message::{Message, PAGE_SIZE};

    fn frames() -> Vec<Pages> {
        let mut mem = vec![7u8; 4 * PAGE_SIZE];
        mem[PAGE_SIZE..2 * PAGE_SIZE].fill(0);
        vec![
            Pages::from_memory(0, &mem),
            Pages::zeros(100, 50).unwrap(),
            Pages::from_memory(9, &mem[..PAGE_SIZE]),
        ]
    }

    #[test]
    fn the_tally_counts_pages_encoded_bytes_and_frame_bytes() {
        let t = PushTally::default();
        assert_eq!(t.snapshot(), Pushed::default());
        t.add(&frames());
        t.add(&frames()[2..]);
        let s = t.snapshot();
        assert_eq!(s.pages, 4 + 50 + 2);
        // Kinds and raw pages: 4 kinds, 3 pages; 50 kinds; twice 1 kind and a page.
        assert_eq!(s.wire_bytes, (4 + 3 * 4096) + 50 + 2 * (1 + 4096));
        let frames_len: u64 = frames()
            .iter()
            .chain(&frames()[2..])
            .map(|f| encode_to_vec(&Message::Pages(f.clone())).len() as u64)
            .sum();
        assert_eq!(s.stream_bytes, frames_len);
    }

    #[test]
    fn pages_sent_follow_the_stream_bytes_at_the_average_frame_cost() {
        assert_eq!(Pushed::default().pages_sent(1 << 20), None);
        // References into the replica: 25 encoded bytes, 40 on the stream.
        let p = Pushed {
            pages: 1_000,
            wire_bytes: 25_000,
            stream_bytes: 40_000,
            done: false,
        };
        assert_eq!(p.pages_sent(0), Some(0));
        assert_eq!(p.pages_sent(20_000), Some(500));
        assert_eq!(p.pages_sent(40_000), Some(1_000));
        // Huge counts do not overflow.
        let big = Pushed {
            pages: u64::MAX,
            wire_bytes: u64::MAX,
            stream_bytes: 1,
            done: true,
        };
        assert_eq!(big.pages_sent(u64::MAX), Some(u64::MAX));
    }
}
