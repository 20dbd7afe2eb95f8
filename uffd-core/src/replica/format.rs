//! The on-disk format shared by both tiers.
//!
//! `index.bin` = a 4096-byte header block followed by one 16-byte entry per page.
//! All integers are little-endian u64 words (so the whole file can be viewed as
//! `AtomicU64`s through the mmap):
//!
//! | word | bytes  | field                                                        |
//! |------|--------|--------------------------------------------------------------|
//! | 0    | 0..8   | magic `b"FLTREPL\0"`                                         |
//! | 1    | 8..16  | format version (low u32, = 1) and page size (high u32, 4096) |
//! | 2    | 16..24 | page count                                                   |
//! | 3    | 24..32 | replication epoch (0 = none yet)                             |
//! | 4    | 32..40 | reserved, 0                                                  |
//! | 5    | 40..48 | xxh3-64 of bytes 0..40                                       |
//!
//! The rest of the header block is zero. Entry `p` lives at `4096 + 16 * p`:
//! `{ version: u64, checksum: u64 }`, version 0 meaning "nothing valid". The checksum
//! is `xxh3_64_with_seed(page content, seed)` with `seed = xxh3_64(p ‖ version ‖ epoch)`
//! (three LE u64s), so an entry only validates the content it was written for, at that
//! page, version and epoch.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::PAGE_SIZE;

pub(crate) const MAGIC: [u8; 8] = *b"FLTREPL\0";
pub(crate) const FORMAT_VERSION: u32 = 1;
/// Size of the header block; entries start here (page aligned for the mmap).
pub(crate) const HEADER_LEN: usize = 4096;
/// Header words in use (the last one is the checksum).
pub(crate) const HEADER_WORDS: usize = 6;
pub(crate) const HEADER_USED: usize = HEADER_WORDS * 8;
pub(crate) const ENTRY_LEN: usize = 16;
pub(crate) const EPOCH_WORD: usize = 3;
pub(crate) const CHECKSUM_WORD: usize = 5;

/// Decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub total_pages: u64,
    pub epoch: u64,
}

/// Why a header did not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HeaderProblem {
    /// Not ours: fewer bytes than a header, or wrong magic.
    Foreign(String),
    /// Ours, but another format version or page size.
    Unsupported { format_version: u32, page_size: u32 },
    /// Ours, but the header checksum fails (torn update or damage).
    Checksum,
}

/// Header words for `h`, checksum included.
pub(crate) fn encode_header(h: Header) -> [u64; HEADER_WORDS] {
    let mut w = [
        u64::from_le_bytes(MAGIC),
        u64::from(FORMAT_VERSION) | ((PAGE_SIZE as u64) << 32),
        h.total_pages,
        h.epoch,
        0,
        0,
    ];
    w[CHECKSUM_WORD] = header_checksum(&w);
    w
}

/// Checksum over words 0..5 in their on-disk (LE) byte order.
pub(crate) fn header_checksum(words: &[u64; HEADER_WORDS]) -> u64 {
    let mut bytes = [0u8; CHECKSUM_WORD * 8];
    for (chunk, w) in bytes.chunks_exact_mut(8).zip(words.iter()) {
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    xxh3_64(&bytes)
}

/// Decodes the first [`HEADER_USED`] bytes of an index file.
pub(crate) fn decode_header(bytes: &[u8]) -> Result<Header, HeaderProblem> {
    let Some(used) = bytes.get(..HEADER_USED) else {
        return Err(HeaderProblem::Foreign(format!(
            "{} bytes, shorter than the {HEADER_USED}-byte header",
            bytes.len()
        )));
    };
    let mut w = [0u64; HEADER_WORDS];
    for (word, chunk) in w.iter_mut().zip(used.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        *word = u64::from_le_bytes(b);
    }
    if w[0].to_le_bytes() != MAGIC {
        return Err(HeaderProblem::Foreign(format!(
            "magic {:02x?}, expected {MAGIC:02x?}",
            w[0].to_le_bytes()
        )));
    }
    let format_version = w[1] as u32;
    let page_size = (w[1] >> 32) as u32;
    if format_version != FORMAT_VERSION || page_size as usize != PAGE_SIZE {
        return Err(HeaderProblem::Unsupported {
            format_version,
            page_size,
        });
    }
    if header_checksum(&w) != w[CHECKSUM_WORD] {
        return Err(HeaderProblem::Checksum);
    }
    Ok(Header {
        total_pages: w[2],
        epoch: w[EPOCH_WORD],
    })
}

/// Checksum of one page's content as stored at (`page`, `version`, `epoch`).
pub(crate) fn page_checksum(page: u64, version: u64, epoch: u64, data: &[u8]) -> u64 {
    let mut key = [0u8; 24];
    key[..8].copy_from_slice(&page.to_le_bytes());
    key[8..16].copy_from_slice(&version.to_le_bytes());
    key[16..].copy_from_slice(&epoch.to_le_bytes());
    xxh3_64_with_seed(data, xxh3_64(&key))
}

/// Length of `index.bin` for `pages` pages, if it fits in memory.
pub(crate) fn index_len(pages: u64) -> Option<usize> {
    usize::try_from(pages)
        .ok()?
        .checked_mul(ENTRY_LEN)?
        .checked_add(HEADER_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(words: &[u64]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    #[test]
    fn header_roundtrip_and_problems() {
        let h = Header {
            total_pages: 123,
            epoch: 0xdead_beef,
        };
        let w = encode_header(h);
        assert_eq!(decode_header(&bytes(&w)), Ok(h));
        assert!(matches!(
            decode_header(&bytes(&w)[..40]),
            Err(HeaderProblem::Foreign(_))
        ));
        assert!(matches!(decode_header(&[]), Err(HeaderProblem::Foreign(_))));
        let mut bad = w;
        bad[0] ^= 1;
        assert!(matches!(
            decode_header(&bytes(&bad)),
            Err(HeaderProblem::Foreign(_))
        ));
        let mut torn = w;
        torn[EPOCH_WORD] = 7;
        assert_eq!(decode_header(&bytes(&torn)), Err(HeaderProblem::Checksum));
        let mut future = w;
        future[1] = 2 | (4096 << 32);
        assert_eq!(
            decode_header(&bytes(&future)),
            Err(HeaderProblem::Unsupported {
                format_version: 2,
                page_size: 4096
            })
        );
        // Garbage of every length never panics.
        for len in 0..64 {
            let _ = decode_header(&vec![0xa5; len]);
        }
    }

    #[test]
    fn checksum_binds_page_version_epoch() {
        let data = [7u8; PAGE_SIZE];
        let c = page_checksum(1, 2, 3, &data);
        assert_ne!(c, page_checksum(2, 2, 3, &data));
        assert_ne!(c, page_checksum(1, 3, 3, &data));
        assert_ne!(c, page_checksum(1, 2, 4, &data));
        assert_ne!(c, page_checksum(1, 2, 3, &[0u8; PAGE_SIZE]));
        assert_eq!(c, page_checksum(1, 2, 3, &data));
    }

    #[test]
    fn index_len_overflow() {
        assert_eq!(index_len(1), Some(HEADER_LEN + 16));
        assert_eq!(index_len(u64::MAX), None);
    }
}
