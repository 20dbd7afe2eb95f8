//! A fixed-size bitmap of pages, used for the received set and the push schedule.

/// One bit per page. Not thread-safe: it lives inside a state machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    len: u64,
    ones: u64,
}

impl Bitmap {
    /// A bitmap of `len` bits, all clear.
    pub fn new(len: u64) -> Bitmap {
        Bitmap {
            words: vec![0; len.div_ceil(64) as usize],
            len,
            ones: 0,
        }
    }

    /// Bits in the bitmap: the pages it covers.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it has no bits at all (not whether none is set: see
    /// [`Bitmap::count_ones`]).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bits set.
    pub fn count_ones(&self) -> u64 {
        self.ones
    }

    /// Whether every bit is set (true for an empty bitmap).
    pub fn is_full(&self) -> bool {
        self.ones == self.len
    }

    /// Whether bit `i` is set; false past the end.
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

    /// Clears bit `i`; returns whether it was set before. Out-of-range indices are ignored.
    pub fn clear(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let bit = 1u64 << (i % 64);
        let was_set = *w & bit != 0;
        *w &= !bit;
        self.ones -= u64::from(was_set);
        was_set
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

    /// First set bit at or after `from`, if any.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.len {
            return None;
        }
        let mut wi = (from / 64) as usize;
        let mut word = self.words[wi] & !((1u64 << (from % 64)) - 1);
        loop {
            if word != 0 {
                let i = wi as u64 * 64 + u64::from(word.trailing_zeros());
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

    /// ORs `word` into word `index`; bits past `len` are ignored. Returns false if the word
    /// index is out of range.
    pub fn or_word(&mut self, index: u64, word: u64) -> bool {
        let Some(w) = usize::try_from(index)
            .ok()
            .and_then(|i| self.words.get_mut(i))
        else {
            return false;
        };
        let mut word = word;
        let tail = self.len % 64;
        if tail != 0 && index == self.len / 64 {
            word &= (1u64 << tail) - 1;
        }
        let added = (word & !*w).count_ones();
        *w |= word;
        self.ones += u64::from(added);
        true
    }

    /// ORs every bit of `other` (of the same length) into this bitmap.
    pub fn union_with(&mut self, other: &Bitmap) {
        for (i, &w) in other.words.iter().enumerate() {
            self.or_word(i as u64, w);
        }
    }

    /// The bitmap with every bit flipped.
    pub fn complement(&self) -> Bitmap {
        let mut c = Bitmap::new(self.len);
        for (i, &w) in self.words.iter().enumerate() {
            c.or_word(i as u64, !w);
        }
        c
    }

    /// Indices of set bits, ascending.
    pub fn iter_ones(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros();
                w &= w - 1;
                Some(i as u64 * 64 + u64::from(b))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_set_finds_the_first_set_bit_at_or_after() {
        let mut b = Bitmap::new(200);
        assert_eq!(b.next_set(0), None);
        b.set(3);
        b.set(64);
        b.set(199);
        assert_eq!(b.next_set(0), Some(3));
        assert_eq!(b.next_set(3), Some(3));
        assert_eq!(b.next_set(4), Some(64));
        assert_eq!(b.next_set(65), Some(199));
        assert_eq!(b.next_set(200), None);
        assert_eq!(b.next_set(u64::MAX), None);
    }

    #[test]
    fn set_counts_each_bit_once() {
        let mut b = Bitmap::new(130);
        assert!(b.set(0));
        assert!(!b.set(0));
        assert!(b.set(129));
        assert!(!b.set(130));
        assert_eq!(b.count_ones(), 2);
        assert!(b.get(129) && !b.get(128) && !b.get(1000));
        assert!(b.clear(129));
        assert!(!b.clear(129) && !b.clear(1000));
        assert_eq!(b.count_ones(), 1);
        assert!(!b.get(129) && b.get(0));
    }

    #[test]
    fn words_union_complement_and_iteration() {
        let mut a = Bitmap::new(70);
        assert!(a.or_word(1, u64::MAX));
        assert_eq!(a.count_ones(), 6, "bits past len are ignored");
        assert!(!a.or_word(2, 1));
        let mut b = Bitmap::new(70);
        b.set(3);
        b.set(65);
        a.union_with(&b);
        assert_eq!(a.count_ones(), 7);
        assert_eq!(
            a.iter_ones().collect::<Vec<_>>(),
            vec![3, 64, 65, 66, 67, 68, 69]
        );
        let c = a.complement();
        assert_eq!(c.count_ones(), 63);
        assert!(!c.get(3) && c.get(0) && !c.get(69));
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
