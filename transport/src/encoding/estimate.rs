//! What a push will make of pages, estimated before it runs: the orchestrator plans a VM
//! that waits for its turn in the bytes its evacuation will put on the wire, and only the
//! source can see what its pages compress to.

use super::{lz4_page, EncodingPolicy, Mode};
use crate::message::{is_zero, PAGE_SIZE};

/// The encoded bytes of sampled pages, as the push would encode each alone: a zero page as
/// its kind byte, a page lz4 shrinks (when the policy may use lz4) as its block, any other
/// page raw. References are not estimated (they depend on what the destination holds), nor
/// is `Auto` turning lz4 off on a fast link: the estimate is of lz4 used wherever it is
/// allowed and shrinks a page.
#[derive(Debug)]
pub struct WireSample {
    lz4: bool,
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
            pages: 0,
            bytes: 0,
            scratch: vec![0; lz4_flex::block::get_maximum_output_size(PAGE_SIZE)],
        }
    }

    /// Adds one page (`PAGE_SIZE` bytes; a shorter or longer slice is ignored).
    pub fn add(&mut self, page: &[u8]) {
        if page.len() != PAGE_SIZE {
            return;
        }
        let bytes = if is_zero(page) {
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
