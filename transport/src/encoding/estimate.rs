//! What a push will make of pages, estimated before it runs: the orchestrator plans a VM
//! that waits for its turn in the bytes its evacuation will put on the wire, and only the
//! source can see what its pages compress to.

use super::{lz4_page, EncodingPolicy, Mode};
use crate::message::{is_zero, PAGE_SIZE, REF_LEN};

/// The encoded bytes of sampled pages, as the push would encode each: a zero page as its
/// kind byte, a page lz4 shrinks (when the policy may use lz4) as its block, any other page
/// raw; and, when the policy allows references and the caller says how many copies of a
/// page the push will send ([`WireSample::add_copies`]), every copy after the first as a
/// reference. References into the replica are not estimated (they depend on what the
/// destination holds), nor is `Auto` turning lz4 or references off on a fast link: the
/// estimate is of each used wherever it is allowed.
#[derive(Debug)]
pub struct WireSample {
    lz4: bool,
    dedup: bool,
    pages: u64,
    bytes: u64,
    scratch: Vec<u8>,
}

/// Past this many pages the counts halve, so that the estimate follows content that
/// changes (about the last few thousand pages sampled weigh).
const HALF_LIFE_PAGES: u64 = 4096;

impl WireSample {
    /// An empty sample for a push under `policy`.
    pub fn new(policy: EncodingPolicy) -> WireSample {
        WireSample {
            lz4: policy.lz4 != Mode::Off,
            dedup: policy.dedup != Mode::Off,
            pages: 0,
            bytes: 0,
            scratch: vec![0; lz4_flex::block::get_maximum_output_size(PAGE_SIZE)],
        }
    }

    /// Adds one page (`PAGE_SIZE` bytes; a shorter or longer slice is ignored).
    pub fn add(&mut self, page: &[u8]) {
        self.add_copies(page, 1.0);
    }

    /// Adds one page whose content the push will send `copies` times, this one included
    /// (the same content at other stale pages). With references allowed, one copy goes
    /// encoded and the others as references (kind byte and [`REF_LEN`]): the page counts
    /// their average. A zero page, or `copies` of 1 or less (or not a number), counts as
    /// [`WireSample::add`] does.
    pub fn add_copies(&mut self, page: &[u8], copies: f64) {
        if page.len() != PAGE_SIZE {
            return;
        }
        let zero = is_zero(page);
        let encoded = if zero {
            1
        } else if let Some(len) = self
            .lz4
            .then(|| lz4_page(page, &mut self.scratch))
            .flatten()
        {
            3 + len
        } else {
            1 + PAGE_SIZE
        };
        let bytes = if self.dedup && !zero && copies > 1.0 {
            let first = 1.0 / copies;
            (encoded as f64 * first + (1 + REF_LEN) as f64 * (1.0 - first)).round() as usize
        } else {
            encoded
        };
        if self.pages >= 2 * HALF_LIFE_PAGES {
            self.pages /= 2;
            self.bytes /= 2;
        }
        self.pages += 1;
        self.bytes += bytes as u64;
    }

    /// Pages sampled (decayed).
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Their encoded bytes, kind bytes included, frame headers not (as
    /// [`crate::proto::Pushed::wire_bytes`] counts).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..PAGE_SIZE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn pages_count_as_the_push_would_encode_them() {
        let text: Vec<u8> = b"fault line "
            .iter()
            .copied()
            .cycle()
            .take(PAGE_SIZE)
            .collect();
        let mut s = WireSample::new(EncodingPolicy::AUTO);
        s.add(&vec![0; PAGE_SIZE]);
        assert_eq!((s.pages(), s.bytes()), (1, 1));
        s.add(&noise(7));
        assert_eq!((s.pages(), s.bytes()), (2, 2 + PAGE_SIZE as u64));
        s.add(&text);
        let lz4 = s.bytes() - 2 - PAGE_SIZE as u64;
        assert!(lz4 > 3 && lz4 < 200, "{lz4}");

        let mut off = WireSample::new(EncodingPolicy::OFF);
        off.add(&text);
        off.add(&[1; 10]);
        assert_eq!((off.pages(), off.bytes()), (1, 1 + PAGE_SIZE as u64));
    }

    #[test]
    fn copies_after_the_first_count_as_references_where_the_policy_allows_them() {
        let page = noise(3);
        let raw = 1 + PAGE_SIZE as u64;
        let reference = 1 + REF_LEN as u64;
        let mut all = WireSample::new(EncodingPolicy::ALL);
        all.add_copies(&page, 4.0);
        // One raw copy and three references, averaged over the four.
        assert_eq!(
            all.bytes(),
            ((raw + 3 * reference) as f64 / 4.0).round() as u64
        );
        // One copy, less, NaN: as `add`.
        for copies in [1.0, 0.5, f64::NAN] {
            let mut s = WireSample::new(EncodingPolicy::ALL);
            s.add_copies(&page, copies);
            assert_eq!(s.bytes(), raw, "{copies}");
        }
        // A zero page is its kind byte however many there are.
        let mut z = WireSample::new(EncodingPolicy::ALL);
        z.add_copies(&vec![0; PAGE_SIZE], 100.0);
        assert_eq!(z.bytes(), 1);
        // Without references every copy goes encoded.
        let mut off = WireSample::new(EncodingPolicy {
            lz4: Mode::Off,
            dedup: Mode::Off,
        });
        off.add_copies(&page, 4.0);
        assert_eq!(off.bytes(), raw);
    }

    #[test]
    fn old_pages_weigh_less_than_new_ones() {
        let mut s = WireSample::new(EncodingPolicy::OFF);
        for _ in 0..3 * HALF_LIFE_PAGES {
            s.add(&vec![0; PAGE_SIZE]);
        }
        for _ in 0..6 * HALF_LIFE_PAGES {
            s.add(&[1; PAGE_SIZE]);
        }
        assert!(s.pages() <= 2 * HALF_LIFE_PAGES);
        let ratio = s.bytes() as f64 / (s.pages() * PAGE_SIZE as u64) as f64;
        assert!(ratio > 0.9, "{ratio}");
    }
}
