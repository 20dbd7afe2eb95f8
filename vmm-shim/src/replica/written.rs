//! What the pages a guest writes would cost an evacuation's push, sampled from the pages
//! replication sends again: at evacuation the stale pages are pages the guest wrote since
//! the standby's last acknowledgement, so these, not memory at large (mostly never written,
//! often zero), say what the push will make of them. An orchestrator plans a waiting VM in
//! those bytes (docs/fleet.md, "Encoded VMs").

use std::sync::Mutex;

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

    /// Replication sends `page` again, a version the guest wrote after the standby
    /// acknowledged an earlier one ([`crate::replica::Ledger::was_acked`]). Not the first
    /// copy of memory (the tracker's first harvest reports every page, so a page's
    /// version cannot tell the two apart), nor pages the standby lost or never stored.
    pub(super) fn offer(&mut self, page: &[u8]) {
        self.seen += 1;
        if self.seen.is_multiple_of(EVERY) {
            self.lz4.add(page);
            self.raw.add(page);
        }
    }

    /// Makes the sample so far readable through `out`.
    pub(super) fn publish(&self, out: &WrittenPages) {
        let mut g = out.0.lock().unwrap_or_else(|p| p.into_inner());
        *g = (self.lz4.pages(), self.lz4.bytes(), self.raw.bytes());
    }
}

/// The sample of rewritten pages, readable while the replicator runs
/// ([`crate::replica::ReplicatorStats::written`]): (pages, lz4 bytes, raw bytes), taken
/// together (the counts halve as the sample ages: a reader must not pair one count before
/// a halving with another after it).
#[derive(Debug, Default)]
pub struct WrittenPages(Mutex<(u64, u64, u64)>);

impl WrittenPages {
    /// (pages sampled, what a push would make of them): with lz4 where it shrinks a page
    /// (`lz4`), or raw; zero pages as their kind byte. `None` before any page was sampled.
    pub fn estimate(&self, lz4: bool) -> Option<(u64, u64)> {
        let (pages, lz4_bytes, raw_bytes) = *self.0.lock().unwrap_or_else(|p| p.into_inner());
        (pages > 0).then_some((pages, if lz4 { lz4_bytes } else { raw_bytes }))
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
        for _ in 0..15 {
            s.offer(&text);
        }
        s.publish(&out);
        assert_eq!(out.estimate(true), None);
        for _ in 0..17 {
            s.offer(&text);
        }
        s.publish(&out);
        let (pages, lz4) = out.estimate(true).unwrap();
        assert_eq!(pages, 2);
        assert!(lz4 < 200, "{lz4}");
        assert_eq!(out.estimate(false), Some((2, 2 * (1 + PAGE_SIZE as u64))));
    }
}
