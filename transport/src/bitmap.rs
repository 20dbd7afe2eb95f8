//! A fixed-size bitmap of pages, used for the received set and the push schedule.

/// One bit per page. Not thread-safe: it lives inside a state machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    len: u64,
    ones: u64,
}

impl Bitmap {
    pub fn new(len: u64) -> Bitmap {
        Bitmap {
            words: vec![0; len.div_ceil(64) as usize],
            len,
            ones: 0,
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bits set.
    pub fn count_ones(&self) -> u64 {
        self.ones
    }

    pub fn is_full(&self) -> bool {
        self.ones == self.len
    }

    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Sets bit `i`; returns whether it was clear before. Out-of-range indices are ignored.
    pub fn set(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let bit = 1u64 << (i % 64);
        let was_clear = *w & bit == 0;
        *w |= bit;
        self.ones += u64::from(was_clear);
        was_clear
    }

    /// First clear bit at or after `from`, if any.
    pub fn next_clear(&self, from: u64) -> Option<u64> {
        if from >= self.len {
            return None;
        }
        let mut wi = (from / 64) as usize;
        let mut word = self.words[wi] | ((1u64 << (from % 64)) - 1);
        loop {
            if word != u64::MAX {
                let i = wi as u64 * 64 + u64::from((!word).trailing_zeros());
                return (i < self.len).then_some(i);
            }
            wi += 1;
            word = *self.words.get(wi)?;
        }
    }

    /// Raw words, for persisting or sending the bitmap.
    pub fn words(&self) -> &[u64] {
        &self.words
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_counts_each_bit_once() {
        let mut b = Bitmap::new(130);
        assert!(b.set(0));
        assert!(!b.set(0));
        assert!(b.set(129));
        assert!(!b.set(130));
        assert_eq!(b.count_ones(), 2);
        assert!(b.get(129) && !b.get(128) && !b.get(1000));
    }

    #[test]
    fn next_clear_skips_full_words_and_stops_at_len() {
        let mut b = Bitmap::new(130);
        for i in 0..129 {
            b.set(i);
        }
        assert_eq!(b.next_clear(0), Some(129));
        b.set(129);
        assert_eq!(b.next_clear(0), None);
        assert!(b.is_full());
        let c = Bitmap::new(10);
        assert_eq!(c.next_clear(3), Some(3));
        assert_eq!(c.next_clear(10), None);
    }
}
