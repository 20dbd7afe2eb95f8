//! Guest memory images the source serves from: a built-in synthetic image with a realistic
//! mix of content, or a raw memory image file (a VM's RAM dump, a snapshot's memory file).
//! Either way the memory is frozen for the whole session.

use std::borrow::Cow;
use std::fs::File;
use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use transport::quic::PageReader;
use transport::PAGE_SIZE;
use uffd_core::GuestMemory;

#[derive(Debug, Error)]
pub enum ImageError {
    // `source` is the error's source: anyhow's chain prints it after this sentence.
    #[error("cannot open memory image {path}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("memory image {path} is not a regular file (a {kind})")]
    NotAFile { path: String, kind: &'static str },
    #[error("memory image {path} is {len} bytes, which is not a non-zero multiple of 4096")]
    BadSize { path: String, len: u64 },
    #[error("synthetic image size {0} is not a non-zero multiple of 4096")]
    BadSyntheticSize(u64),
    #[error("memory image {path} shrank while it was served (now {len:?} bytes)")]
    Shrank { path: String, len: Option<u64> },
    #[error("cannot read memory image {path} at byte {offset}")]
    Read {
        path: String,
        offset: u64,
        source: std::io::Error,
    },
    #[error("cannot allocate the image")]
    Alloc(#[from] uffd_core::MemoryError),
}

/// Counts of each kind of page in a synthetic image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMix {
    pub zero: u64,
    pub text: u64,
    #[serde(default)]
    pub duplicate: u64,
    pub random: u64,
}

/// What a synthetic page holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageClass {
    /// All zero: never-touched or freed guest memory.
    Zero,
    /// Compressible, text-like bytes: page cache, logs, code.
    Text,
    /// Text-like content that other pages hold too (shared library code, the same file
    /// cached twice): one of [`DUP_TEMPLATES`] templates.
    Duplicate,
    /// Incompressible bytes: encrypted or already compressed data.
    Random,
}

/// Percentages of zero, unique text and duplicated text pages in the built-in image; the
/// rest is random.
pub const ZERO_PCT: u64 = 25;
pub const TEXT_PCT: u64 = 35;
pub const DUP_PCT: u64 = 10;
/// Distinct contents the duplicated pages share.
pub const DUP_TEMPLATES: u64 = 256;

fn mix64(mut x: u64) -> u64 {
    // splitmix64 finaliser: a fast, well-distributed hash of the page number.
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The class of page `page` in the synthetic image of `seed`.
pub fn page_class(seed: u64, page: u64) -> PageClass {
    let r = mix64(seed ^ mix64(page)) % 100;
    if r < ZERO_PCT {
        PageClass::Zero
    } else if r < ZERO_PCT + TEXT_PCT {
        PageClass::Text
    } else if r < ZERO_PCT + TEXT_PCT + DUP_PCT {
        PageClass::Duplicate
    } else {
        PageClass::Random
    }
}

const WORDS: &[&[u8]] = &[
    b"the ",
    b"kernel ",
    b"page ",
    b"memory ",
    b"virtual ",
    b"machine ",
    b"migration ",
    b"request ",
    b"INFO ",
    b"WARN ",
    b"error: ",
    b"0x7f3a ",
    b"return ",
    b"struct ",
    b"fn ",
    b"guest ",
    b"host ",
    b"fault ",
    b"queue ",
    b"\n",
    b"{\"id\": ",
    b"}, ",
    b"= ",
    b"if (",
];

/// Writes the content of synthetic page `page` of `seed` into `out` (exactly one page).
/// Tests call this to know what any page must hold without keeping a second copy.
pub fn synthetic_page(seed: u64, page: u64, out: &mut [u8]) {
    debug_assert_eq!(out.len(), PAGE_SIZE);
    let class = page_class(seed, page);
    // A duplicate holds the text of its template: the same bytes wherever it appears.
    let id = match class {
        PageClass::Duplicate => u64::MAX - mix64(seed ^ page) % DUP_TEMPLATES,
        _ => page,
    };
    let mut state = mix64(seed.rotate_left(17) ^ mix64(id ^ 0x5151));
    let mut next = move || {
        // xorshift64*: enough quality for filler, and fast.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    match class {
        PageClass::Zero => out.fill(0),
        PageClass::Random => {
            for chunk in out.chunks_exact_mut(8) {
                chunk.copy_from_slice(&next().to_le_bytes());
            }
        }
        PageClass::Text | PageClass::Duplicate => {
            let mut at = 0;
            while at < out.len() {
                let r = next();
                let w = WORDS[(r % WORDS.len() as u64) as usize];
                let n = w.len().min(out.len() - at);
                out[at..at + n].copy_from_slice(&w[..n]);
                at += n;
            }
            // A text page is unique (deduplication cannot cheat); a duplicate carries its
            // template's id.
            out[..8].copy_from_slice(&id.to_le_bytes());
        }
    }
}

enum Backing {
    Memory(GuestMemory),
    /// Read with `pread`, never mapped: a file that shrinks while it is served then gives
    /// a clear error instead of a SIGBUS.
    File {
        file: File,
        len: u64,
        path: String,
    },
}

/// Guest memory frozen at switchover, served to the destination.
pub struct SourceImage {
    backing: Backing,
    pub mix: Option<ImageMix>,
}

impl SourceImage {
    /// Builds the synthetic image of `len` bytes for `seed`, filling it on all cores.
    pub fn synthetic(len: u64, seed: u64) -> Result<SourceImage, ImageError> {
        if len == 0 || !len.is_multiple_of(PAGE_SIZE as u64) {
            return Err(ImageError::BadSyntheticSize(len));
        }
        let mem = GuestMemory::anonymous(len as usize)?;
        let pages = len / PAGE_SIZE as u64;
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
        let per = pages.div_ceil(threads);
        let base = mem.as_ptr() as usize;
        std::thread::scope(|s| {
            for t in 0..threads {
                let (start, end) = (t * per, ((t + 1) * per).min(pages));
                s.spawn(move || {
                    for p in start..end {
                        // SAFETY: the mapping is len bytes long and p < pages, so the page
                        // is in bounds; the threads fill disjoint page ranges and nobody else
                        // holds a reference to the memory until the scope ends.
                        let page = unsafe {
                            std::slice::from_raw_parts_mut(
                                (base + p as usize * PAGE_SIZE) as *mut u8,
                                PAGE_SIZE,
                            )
                        };
                        synthetic_page(seed, p, page);
                    }
                });
            }
        });
        let mut mix = ImageMix::default();
        for p in 0..pages {
            match page_class(seed, p) {
                PageClass::Zero => mix.zero += 1,
                PageClass::Text => mix.text += 1,
                PageClass::Duplicate => mix.duplicate += 1,
                PageClass::Random => mix.random += 1,
            }
        }
        Ok(SourceImage {
            backing: Backing::Memory(mem),
            mix: Some(mix),
        })
    }

    /// Opens a raw memory image file, read page by page as it is served. The file should not
    /// change during the session; if it shrinks, reads past its new end are errors that name
    /// the file (and end the session with that reason), never a crash.
    pub fn open(path: &Path) -> Result<SourceImage, ImageError> {
        let err = |source| ImageError::Open {
            path: path.display().to_string(),
            source,
        };
        let file = File::open(path).map_err(err)?;
        let meta = file.metadata().map_err(err)?;
        if !meta.is_file() {
            use std::os::unix::fs::FileTypeExt;
            let t = meta.file_type();
            let kind = if t.is_dir() {
                "directory"
            } else if t.is_block_device() {
                "block device"
            } else if t.is_char_device() {
                "character device"
            } else if t.is_fifo() {
                "FIFO"
            } else {
                "socket or other special file"
            };
            return Err(ImageError::NotAFile {
                path: path.display().to_string(),
                kind,
            });
        }
        let len = meta.len();
        if len == 0 || len % PAGE_SIZE as u64 != 0 {
            return Err(ImageError::BadSize {
                path: path.display().to_string(),
                len,
            });
        }
        Ok(SourceImage {
            backing: Backing::File {
                file,
                len,
                path: path.display().to_string(),
            },
            mix: None,
        })
    }

    /// The image's memory as a region a guest (or a workload standing in for one) can run
    /// in; `None` for a file image, which is read-only.
    pub fn host_region(&self) -> Option<uffd_core::HostRegion> {
        match &self.backing {
            Backing::Memory(m) => Some(m.host_region()),
            Backing::File { .. } => None,
        }
    }

    /// The memory of a synthetic image; `None` for a file image, which is read as served.
    pub fn memory_bytes(&self) -> Option<&[u8]> {
        match &self.backing {
            // SAFETY: the memory is owned by this image for its whole life and fully
            // initialised. Callers that run a guest in it (through `host_region`) only
            // read it this way while that guest is paused.
            Backing::Memory(m) => Some(unsafe { std::slice::from_raw_parts(m.as_ptr(), m.len()) }),
            Backing::File { .. } => None,
        }
    }

    /// xxh3-128 of the whole image, as `vmm_shim::digest` computes it.
    pub fn digest(&self) -> Result<String, ImageError> {
        if let Some(bytes) = self.memory_bytes() {
            return Ok(vmm_shim::digest::digest(bytes));
        }
        // A chunk at a time: a file image may be as large as the guest.
        const CHUNK: u64 = 256;
        let pages = self.len() / PAGE_SIZE as u64;
        let mut d = vmm_shim::digest::Digester::default();
        let mut first = 0;
        while first < pages {
            let n = (pages - first).min(CHUNK);
            d.update(&self.read(first, n as usize)?);
            first += n;
        }
        Ok(d.finish())
    }

    /// The image's size in bytes.
    pub fn len(&self) -> u64 {
        match &self.backing {
            Backing::Memory(m) => m.len() as u64,
            Backing::File { len, .. } => *len,
        }
    }

    /// Reads `count` pages of a file image from page `first`.
    fn read(&self, first: u64, count: usize) -> Result<Vec<u8>, ImageError> {
        use std::os::unix::fs::FileExt;
        let Backing::File { file, path, .. } = &self.backing else {
            unreachable!("only file images are read");
        };
        let mut buf = vec![0u8; count * PAGE_SIZE];
        let offset = first * PAGE_SIZE as u64;
        file.read_exact_at(&mut buf, offset).map_err(|source| {
            let now = file.metadata().map(|m| m.len()).ok();
            match source.kind() {
                std::io::ErrorKind::UnexpectedEof => ImageError::Shrank {
                    path: path.clone(),
                    len: now,
                },
                _ => ImageError::Read {
                    path: path.clone(),
                    offset,
                    source,
                },
            }
        })?;
        Ok(buf)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl PageReader for SourceImage {
    fn pages(&self, first: u64, count: usize) -> Result<Cow<'_, [u8]>, String> {
        if let Backing::File { len, .. } = &self.backing {
            let in_range = first
                .checked_add(count as u64)
                .is_some_and(|end| end * PAGE_SIZE as u64 <= *len);
            if !in_range {
                return Err(format!("pages {first}+{count} are outside the image"));
            }
            // The cause is part of the reason the destination is told.
            return self
                .read(first, count)
                .map(Cow::Owned)
                .map_err(|e| uffd_core::error::chain(&e));
        }
        let start = usize::try_from(first)
            .ok()
            .and_then(|f| f.checked_mul(PAGE_SIZE))
            .ok_or("page index overflows")?;
        let end = start
            .checked_add(count * PAGE_SIZE)
            .ok_or("page range overflows")?;
        self.memory_bytes()
            .and_then(|b| b.get(start..end))
            .map(Cow::Borrowed)
            .ok_or_else(|| format!("pages {first}+{count} are outside the image"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_image_is_deterministic_and_mixed() {
        let img = SourceImage::synthetic(1 << 22, 7).unwrap();
        let mix = img.mix.unwrap();
        assert_eq!(mix.zero + mix.text + mix.duplicate + mix.random, 1024);
        assert!(
            mix.zero > 150 && mix.text > 250 && mix.duplicate > 50 && mix.random > 200,
            "{mix:?}"
        );
        // Duplicates share one of a few template contents; text pages are all unique.
        let pages = 4096;
        let mut seen = std::collections::HashMap::new();
        let mut page = vec![0u8; PAGE_SIZE];
        for p in 0..pages {
            synthetic_page(7, p, &mut page);
            *seen.entry(page.clone()).or_insert(0u64) += 1;
        }
        let dups: Vec<u64> = (0..pages)
            .filter(|&p| page_class(7, p) == PageClass::Duplicate)
            .collect();
        let shared = dups
            .iter()
            .filter(|&&p| {
                synthetic_page(7, p, &mut page);
                seen[&page] > 1
            })
            .count();
        assert!(
            shared * 4 > dups.len() * 3,
            "{shared} of {} duplicates shared",
            dups.len()
        );
        for p in 0..pages {
            if page_class(7, p) == PageClass::Text {
                synthetic_page(7, p, &mut page);
                assert_eq!(seen[&page], 1, "text page {p} is not unique");
            }
        }
        let mut page = vec![0u8; PAGE_SIZE];
        for p in [0u64, 1, 500, 1023] {
            synthetic_page(7, p, &mut page);
            assert_eq!(img.pages(p, 1).unwrap(), &page[..]);
        }
        let other = SourceImage::synthetic(1 << 22, 8).unwrap();
        assert_ne!(img.memory_bytes(), other.memory_bytes());
    }

    #[test]
    fn out_of_range_reads_are_errors() {
        let img = SourceImage::synthetic(8192, 1).unwrap();
        assert!(img.pages(1, 1).is_ok());
        assert!(img.pages(2, 1).is_err());
        assert!(img.pages(u64::MAX, 1).is_err());
    }

    #[test]
    fn image_files_must_be_whole_pages() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("odd.img");
        std::fs::write(&f, [1u8; 100]).unwrap();
        let e = SourceImage::open(&f).err().unwrap();
        assert!(
            e.to_string().contains("not a non-zero multiple of 4096"),
            "{e}"
        );
        let e = SourceImage::open(&dir.path().join("missing.img"))
            .err()
            .unwrap();
        assert!(e.to_string().contains("missing.img"), "{e}");
        // Said once: the cause is the source, not part of the sentence.
        let cause = std::error::Error::source(&e).unwrap().to_string();
        assert!(!e.to_string().contains(&cause), "{e}: {cause}");
        assert_eq!(uffd_core::error::chain(&e).matches(&*cause).count(), 1);
    }

    #[test]
    fn an_allocation_failure_leaves_its_cause_to_the_chain() {
        let source = std::io::Error::from_raw_os_error(libc::ENOMEM);
        let cause = source.to_string();
        let e = ImageError::from(uffd_core::MemoryError::Sys { op: "mmap", source });
        assert_eq!(e.to_string(), "cannot allocate the image");
        assert_eq!(
            uffd_core::error::chain(&e),
            format!("cannot allocate the image: mmap failed: {cause}")
        );
    }

    #[test]
    fn a_file_image_is_read_and_digested_a_chunk_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("guest.img");
        // More pages than one digest chunk, each different.
        let bytes: Vec<u8> = (0..300 * PAGE_SIZE)
            .map(|i| (i / PAGE_SIZE + i % 251) as u8)
            .collect();
        std::fs::write(&f, &bytes).unwrap();
        let img = SourceImage::open(&f).unwrap();
        assert_eq!(img.len(), bytes.len() as u64);
        assert_eq!(img.digest().unwrap(), vmm_shim::digest::digest(&bytes));
        assert_eq!(&*img.pages(299, 1).unwrap(), &bytes[299 * PAGE_SIZE..]);
        assert!(img.pages(299, 2).is_err());
        // Shrunk under it: an error naming the file, not a crash.
        std::fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let e = img.pages(10, 1).unwrap_err();
        assert!(e.contains("guest.img") && e.contains("shrank"), "{e}");
        assert!(img.digest().is_err());
    }

    #[test]
    fn a_directory_is_not_an_image() {
        let dir = tempfile::tempdir().unwrap();
        let e = SourceImage::open(dir.path()).err().unwrap();
        assert!(
            matches!(
                e,
                ImageError::NotAFile {
                    kind: "directory",
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains("is not a regular file (a directory)"),
            "{e}"
        );
    }
}
