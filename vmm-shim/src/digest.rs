//! Digests of guest memory, compared between source and destination after every migration.

use thiserror::Error;
use xxhash_rust::xxh3::Xxh3;

/// Guest memory that could not be read for a digest.
#[derive(Debug, Error)]
#[error("cannot read guest memory at {gpa:#x}")]
pub struct GuestReadError {
    /// The guest-physical address of the read.
    pub gpa: u64,
    /// What `vm-memory` said.
    #[source]
    pub source: vm_memory::GuestMemoryError,
}

/// xxh3-128 of the bytes, as 32 hex digits.
pub fn digest(bytes: &[u8]) -> String {
    digest_all([bytes])
}

/// xxh3-128 of several byte ranges as if concatenated (guest memory in region order).
pub fn digest_all<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut d = Digester::default();
    for p in parts {
        d.update(p);
    }
    d.finish()
}

/// The same digest fed piece by piece, for memory read in chunks into one buffer.
#[derive(Default)]
pub struct Digester(Xxh3);

impl Digester {
    /// Adds the next bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The digest of everything added, as 32 hex digits.
    pub fn finish(&self) -> String {
        format!("{:032x}", self.0.digest128())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_of_parts_equals_digest_of_whole() {
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        assert_eq!(digest(&data), digest_all([&data[..3], &data[3..]]));
        assert_ne!(digest(&data), digest(&data[1..]));
        assert_eq!(digest(&data).len(), 32);
    }
}
