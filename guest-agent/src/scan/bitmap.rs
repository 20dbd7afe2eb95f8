//! A bitmap over page frames: one bit per frame of guest memory (16 KiB for 512 MiB,
//! 32 MiB for 1 TiB), so the set of frames written in an interval has a fixed size however
//! many processes wrote them.

/// One bit per frame below a fixed end.
#[derive(Debug, Clone)]
pub struct PfnBitmap {
    words: Vec<u64>,
    end: u64,
}

impl PfnBitmap {
    /// A cleared bitmap for frames `0..end`.
    pub fn new(end: u64) -> PfnBitmap {
        PfnBitmap {
            words: vec![0; end.div_ceil(64) as usize],
            end,
        }
    }

    /// Sets frame `pfn`; frames at or past the end are ignored.
    pub fn set(&mut self, pfn: u64) {
        if pfn < self.end {
            self.words[(pfn / 64) as usize] |= 1 << (pfn % 64);
        }
    }

    /// Whether frame `pfn` is set.
    pub fn get(&self, pfn: u64) -> bool {
        pfn < self.end && self.words[(pfn / 64) as usize] & (1 << (pfn % 64)) != 0
    }

    /// Clears every bit.
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// Frames set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::PfnBitmap;

    #[test]
    fn set_get_clear() {
        let mut b = PfnBitmap::new(130);
        for p in [0, 63, 64, 129, 130, 10_000] {
            b.set(p);
        }
        assert!(b.get(0) && b.get(63) && b.get(64) && b.get(129));
        assert!(!b.get(1) && !b.get(130) && !b.get(10_000));
        assert_eq!(b.count(), 4);
        b.clear();
        assert_eq!(b.count(), 0);
    }
}
