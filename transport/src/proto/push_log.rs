//! Which pushed pages have already left the source, to answer a demand request only when
//! the reply can beat the pushed copy.
//!
//! A guest that runs over the pages the push is delivering faults on pages whose pushed
//! copy is on the link. The reply to such a request queues behind that copy and arrives
//! after it: a page's worth of bytes for nothing. (A KVM guest evacuated at 100 Mbit/s ×
//! 20 ms had 4,272 of its 19,662 stale pages requested that way, and every reply was
//! wasted; docs/fleet.md.) A copy still in the send buffer is another matter: the reply
//! takes the urgent stream, which goes first, and saves the fault the wait for the buffer
//! to drain.
//!
//! The destination tells, in each `Request`, how much of the push it had read
//! (`pushed_read`); the source adds what it sent while that request and the data ahead of
//! it were on their way (about its delivery rate × the round trip, from the driver). A
//! page whose frame ends before that is on its way. Guessing wrong costs little either
//! way: a page answered needlessly costs its bytes; a page skipped while its copy still
//! waited costs the fault an echo (an eighth of a round trip later the destination asks
//! again on the echo stream, and the source answers every echo of a page it did not
//! serve) or, on a path too short to echo, the rest of a send buffer that drains in about
//! a round trip.

use std::collections::{BTreeMap, VecDeque};

use crate::bitmap::Bitmap;

/// The push of one connection: where each recent frame ends in the bulk stream.
#[derive(Debug)]
pub(crate) struct PushLog {
    /// Push bytes ([`crate::message::Pages::wire_len`]) written on this connection.
    written: u64,
    /// Pages pushed on this connection.
    pushed: Bitmap,
    /// Frames the destination had not read at the last request: (end, first, count), in
    /// the order written.
    recent: VecDeque<(u64, u64, u64)>,
    /// The frames of `recent` by first page: (count, end). One entry per frame, not per
    /// page: a zero run covers up to 65,536 pages in a dozen bytes.
    by_page: BTreeMap<u64, (u64, u64)>,
    /// The driver's estimate of what leaves the source between the destination reading a
    /// byte of the push and the source reading its request (rate × round trip).
    in_flight: u64,
    /// The most `pushed_read` seen: it only grows on one connection.
    read: u64,
}

/// Frames kept at most: as many one-page frames as the largest stream window (1 GiB) holds,
/// which the push cannot run further ahead of what the destination read. Past it the
/// oldest frames count as read; at worst a request for one of them is left to the push.
const MAX_RECENT: usize = 1 << 18;

impl PushLog {
    pub(crate) fn new(pages: u64) -> PushLog {
        PushLog {
            written: 0,
            pushed: Bitmap::new(pages),
            recent: VecDeque::new(),
            by_page: BTreeMap::new(),
            in_flight: 0,
            read: 0,
        }
    }

    /// A frame of `count` pages from `first`, `wire_len` bytes, was handed to the bulk
    /// stream.
    pub(crate) fn record(&mut self, first: u64, count: u64, wire_len: u64) {
        self.written += wire_len;
        let end = self.written;
        let count = count.min(self.pushed.len().saturating_sub(first));
        if count == 0 {
            return;
        }
        for p in first..first + count {
            self.pushed.set(p);
        }
        // The push hands out each page once per connection, so frames do not overlap; a
        // frame from the same first page replaces the older one.
        self.by_page.insert(first, (count, end));
        self.recent.push_back((end, first, count));
        while self.recent.len() > MAX_RECENT {
            self.forget_oldest();
        }
    }

    /// The driver's current estimate of the bytes in flight ahead of a request.
    pub(crate) fn set_in_flight(&mut self, bytes: u64) {
        self.in_flight = bytes;
    }

    /// Whether page `p`'s pushed copy had left when a request sent after `pushed_read`
    /// bytes of the push were read arrived: it will reach the destination before a reply.
    /// Never for `pushed_read` 0 (answer everything).
    pub(crate) fn on_its_way(&mut self, p: u64, pushed_read: u64) -> bool {
        if pushed_read == 0 || !self.pushed.get(p) {
            return false;
        }
        if pushed_read > self.read {
            self.read = pushed_read;
            while self
                .recent
                .front()
                .is_some_and(|&(end, ..)| end <= self.read)
            {
                self.forget_oldest();
            }
        }
        match self.by_page.range(..=p).next_back() {
            Some((&first, &(count, end))) if p < first + count => {
                end <= pushed_read.saturating_add(self.in_flight)
            }
            // Read already, or so long ago it must have been.
            _ => true,
        }
    }

    fn forget_oldest(&mut self) {
        if let Some((end, first, _)) = self.recent.pop_front() {
            if self.by_page.get(&first).is_some_and(|&(_, e)| e == end) {
                self.by_page.remove(&first);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_whose_frame_the_destination_could_have_is_on_its_way() {
        let mut log = PushLog::new(100);
        log.record(0, 16, 16 * 4097); // ends at 65,552
        log.record(40, 1, 4097); // ends at 69,649
        assert!(log.on_its_way(3, 65_552));
        assert!(
            !log.on_its_way(40, 65_552),
            "its frame is past what was read"
        );
        log.set_in_flight(4097);
        assert!(log.on_its_way(40, 65_552), "within the bytes in flight");
    }

    #[test]
    fn pages_not_pushed_or_asked_in_full_are_answered() {
        let mut log = PushLog::new(100);
        log.record(0, 16, 100);
        log.set_in_flight(u64::MAX);
        assert!(!log.on_its_way(50, 1_000), "never pushed");
        assert!(!log.on_its_way(3, 0), "0 asks for every page");
        assert!(log.on_its_way(3, 1));
    }

    #[test]
    fn read_frames_are_forgotten_but_still_count_as_on_their_way() {
        let mut log = PushLog::new(100);
        for i in 0..10 {
            log.record(i * 4, 4, 10);
        }
        assert!(log.on_its_way(1, 50));
        assert_eq!(log.recent.len(), 5);
        assert_eq!(log.by_page.len(), 5);
        // An older request arriving late does not bring anything back.
        assert!(log.on_its_way(0, 10));
        assert!(!log.on_its_way(39, 10));
        assert!(log.on_its_way(39, 100));
        assert!(log.recent.is_empty() && log.by_page.is_empty());
    }

    #[test]
    fn a_page_pushed_again_counts_from_its_latest_frame() {
        let mut log = PushLog::new(100);
        log.record(5, 1, 10);
        log.record(0, 1, 10);
        log.record(5, 1, 10); // ends at 30
        assert!(!log.on_its_way(5, 20));
        assert!(log.on_its_way(5, 30));
    }

    #[test]
    fn a_zero_run_is_one_entry_whatever_its_length() {
        let mut log = PushLog::new(1 << 20);
        log.record(0, 65_536, 12);
        log.record(65_536, 16, 16 * 4097);
        assert_eq!(log.by_page.len(), 2);
        assert!(log.on_its_way(65_535, 12));
        assert!(!log.on_its_way(65_536, 12));
        assert!(
            !log.on_its_way(65_552, 1 << 30),
            "past the last frame: never pushed"
        );
    }

    #[test]
    fn frames_past_the_layout_do_not_panic() {
        let mut log = PushLog::new(10);
        log.record(8, 5, 10);
        assert!(log.on_its_way(9, 10));
        assert!(!log.on_its_way(12, 10));
    }
}
