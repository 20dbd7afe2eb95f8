//! What the pages a guest writes would cost an evacuation's push, sampled from the pages
//! replication sends again: at evacuation the stale pages are pages the guest wrote since
//! the standby's last acknowledgement, so these, not memory at large (mostly never written,
//! often zero), say what the push will make of them. An orchestrator plans a waiting VM in
//! those bytes (docs/fleet.md, "Encoded VMs").

use std::sync::atomic::{AtomicU64, Ordering};

use transport::encoding::{EncodingPolicy, WireSample};

/// One page in this many rewritten pages is sampled (lz4 of a page takes a few µs: at a
/// 1 Gbit/s catch-up, about 0.5% of a core).
const EVERY: u64 = 16;

/// The sample, as the replicator thread keeps it.
pub(super) struct WrittenSample {
    lz4: WireSample,
    raw: WireSample,
    seen: u64,
}

impl WrittenSample {
    pub(super) fn new() -> WrittenSample {
        WrittenSample {
            lz4: WireSample::new(EncodingPolicy::ALL),
            raw: WireSample::new(EncodingPolicy::OFF),
            seen: 0,
        }
    }

    /// Replication sends `page` again (at a version past the first copy).
    pub(super) fn offer(&mut self, page: &[u8]) {
        self.seen += 1;
        if self.seen.is_multiple_of(EVERY) {
            self.lz4.add(page);
            self.raw.add(page);
        }
    }

    /// Makes the sample so far readable through `out`.
    pub(super) fn publish(&self, out: &WrittenPages) {
        out.lz4_bytes.store(self.lz4.bytes(), Ordering::Relaxed);
        out.raw_bytes.store(self.raw.bytes(), Ordering::Relaxed);
        // After the bytes: a reader that sees these pages sees their bytes (or later ones).
        out.pages.store(self.lz4.pages(), Ordering::Release);
    }
}

/// The sample of rewritten pages, readable while the replicator runs
/// ([`crate::replica::ReplicatorStats::written`]).
#[derive(Debug, Default)]
pub struct WrittenPages {
    pages: AtomicU64,
    lz4_bytes: AtomicU64,
    raw_bytes: AtomicU64,
}

impl WrittenPages {
    /// (pages sampled, what a push would make of them): with lz4 where it shrinks a page
    /// (`lz4`), or raw; zero pages as their kind byte. `None` before any page was sampled.
    pub fn estimate(&self, lz4: bool) -> Option<(u64, u64)> {
        let pages = self.pages.load(Ordering::Acquire);
        let bytes = if lz4 {
            self.lz4_bytes.load(Ordering::Relaxed)
        } else {
            self.raw_bytes.load(Ordering::Relaxed)
        };
        (pages > 0).then_some((pages, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use transport::PAGE_SIZE;

    #[test]
    fn one_rewritten_page_in_sixteen_is_counted_both_ways() {
        let text: Vec<u8> = b"written "
            .iter()
            .copied()
            .cycle()
            .take(PAGE_SIZE)
            .collect();
        let (mut s, out) = (WrittenSample::new(), WrittenPages::default());
        s.publish(&out);
        assert_eq!(out.estimate(true), None);
        for _ in 0..32 {
            s.offer(&text);
        }
        s.publish(&out);
        let (pages, lz4) = out.estimate(true).unwrap();
        assert_eq!(pages, 2);
        assert!(lz4 < 200, "{lz4}");
        assert_eq!(out.estimate(false), Some((2, 2 * (1 + PAGE_SIZE as u64))));
    }
}
