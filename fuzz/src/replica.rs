//! Target `replica`: the standby's replica files as it finds them at a restart
//! (`uffd_core::replica`: `index.bin` and `memory.img`, the format behind both the memory
//! replica and every disk's replica), opened with [`DiskTier::open`] or
//! [`MemoryTier::open`].
//!
//! The bytes become the two files: the index either raw, or built field by field (header
//! words, each right or fuzzed, the header checksum right or not, per-page entries whose
//! checksum matches the image or not, the file's length exact or not), and the image page
//! by page. Then the replica is opened, used (new epochs, stores) and opened again.
//!
//! Checks: nothing panics; opening fails only with the typed errors for a file that is
//! not a replica of this shape (never an I/O error or a panic), or gives a replica whose
//! every valid page reads back with its version; when the files are exactly right, every
//! entry whose checksum matches is kept and every other one is dropped; after stores and
//! epoch changes, every page reads back as a model of the replica says, also after a
//! reopen.

use std::collections::BTreeMap;
use std::path::Path;

use uffd_core::replica::{DiskTier, MemoryTier, ReplicaError, ReplicaStore};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::input::Input;

const PAGE: usize = 4096;
const MAGIC: [u8; 8] = *b"FLTREPL\0";
const VERSION_WORD: u64 = 1 | (4096 << 32);

/// The format's per-page checksum (see `uffd_core::replica`'s format docs).
fn page_checksum(page: u64, version: u64, epoch: u64, data: &[u8]) -> u64 {
    let mut key = [0u8; 24];
    key[..8].copy_from_slice(&page.to_le_bytes());
    key[8..16].copy_from_slice(&version.to_le_bytes());
    key[16..].copy_from_slice(&epoch.to_le_bytes());
    xxh3_64_with_seed(data, xxh3_64(&key))
}

fn header_bytes(words: &[u64; 6]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Page `p` of an image whose pages are filled with one byte each.
fn page_of(fill: u8) -> Vec<u8> {
    vec![fill; PAGE]
}

enum Store {
    Disk(DiskTier),
    Memory(MemoryTier),
}

impl Store {
    fn open(dir: &Path, pages: u64, memory: bool) -> Result<Store, ReplicaError> {
        if memory {
            MemoryTier::open(dir, pages).map(Store::Memory)
        } else {
            DiskTier::open(dir, pages).map(Store::Disk)
        }
    }

    fn get(&self) -> &dyn ReplicaStore {
        match self {
            Store::Disk(d) => d,
            Store::Memory(m) => m,
        }
    }

    fn torn_at_open(&self) -> u64 {
        match self {
            Store::Disk(d) => d.open_report().torn_pages,
            Store::Memory(m) => m.open_report().torn_pages,
        }
    }
}

/// What the replica must hold: page → (version, content).
type Model = BTreeMap<u64, (u64, Vec<u8>)>;

fn check_model(store: &dyn ReplicaStore, model: &Model) {
    let mut buf = vec![0u8; PAGE];
    for p in 0..store.total_pages() {
        let got = store.read(p, &mut buf).expect("read of a page in range");
        match model.get(&p) {
            Some((v, content)) => {
                assert_eq!(got, Some(*v), "page {p} lost its version");
                assert!(buf == *content, "page {p} reads other content");
            }
            None => {
                assert_eq!(got, None, "page {p} valid, but nothing was stored");
                assert_eq!(store.version(p), 0);
            }
        }
    }
}

/// The target.
pub fn replica(data: &[u8]) {
    let mut inp = Input::new(data);
    let mode = inp.u8();
    let pages = 1 + inp.below(12);
    let memory_tier = mode & 8 != 0;

    // memory.img: one fill byte per page, maybe fewer or more pages than the replica.
    let image_pages = if mode & 4 != 0 {
        inp.below(pages + 3)
    } else {
        pages
    };
    let fills: Vec<u8> = (0..image_pages).map(|_| inp.u8()).collect();
    let image: Vec<u8> = fills.iter().flat_map(|&f| page_of(f)).collect();

    // index.bin.
    let mut exact = true;
    let mut expected = vec![0u64; pages as usize];
    let index = if mode & 1 == 0 {
        exact = false;
        let n = usize::from(inp.u16() % 8192);
        inp.bytes(n).to_vec()
    } else {
        let mut fuzz_word = |inp: &mut Input, right: u64| {
            if inp.u8() < 230 {
                right
            } else {
                exact = false;
                inp.u64()
            }
        };
        let epoch = u64::from(inp.u8() % 4);
        let mut w = [
            fuzz_word(&mut inp, u64::from_le_bytes(MAGIC)),
            fuzz_word(&mut inp, VERSION_WORD),
            fuzz_word(&mut inp, pages),
            epoch,
            fuzz_word(&mut inp, 0),
            0,
        ];
        let sum = xxh3_64(&header_bytes(&w)[..40]);
        w[5] = fuzz_word(&mut inp, sum);
        let mut idx = header_bytes(&w);
        idx.resize(PAGE, 0);
        for (p, e) in expected.iter_mut().enumerate() {
            let v = u64::from(inp.u8() % 4);
            let right = fills
                .get(p)
                .map_or(0, |&f| page_checksum(p as u64, v, epoch, &page_of(f)));
            let sum = if inp.u8() < 200 { right } else { inp.u64() };
            if v != 0 && fills.get(p).is_some() && sum == right {
                *e = v;
            }
            idx.extend_from_slice(&v.to_le_bytes());
            idx.extend_from_slice(&sum.to_le_bytes());
        }
        let cut = inp.u8();
        if cut >= 240 {
            exact = false;
            idx.truncate(idx.len() - usize::from(cut - 239));
        } else if cut >= 230 {
            exact = false;
            idx.extend(std::iter::repeat_n(0, usize::from(cut - 229)));
        }
        idx
    };
    if image_pages != pages {
        exact = false;
    }

    let tmp = tempfile::Builder::new()
        .prefix("fuzz-replica")
        .tempdir_in(if Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        })
        .expect("temporary directory");
    let dir = tmp.path();
    if mode & 2 == 0 || !index.is_empty() {
        std::fs::write(dir.join("index.bin"), &index).expect("write index.bin");
    }
    if mode & 16 == 0 {
        std::fs::write(dir.join("memory.img"), &image).expect("write memory.img");
    } else {
        exact = false;
    }

    let store = match Store::open(dir, pages, memory_tier) {
        Ok(s) => s,
        Err(e) => {
            assert!(
                matches!(
                    e,
                    ReplicaError::NotAReplica { .. }
                        | ReplicaError::UnsupportedFormat { .. }
                        | ReplicaError::PageCountMismatch { .. }
                        | ReplicaError::NotTmpfs { .. }
                ),
                "opening fuzzed files failed with {e}"
            );
            assert!(!exact, "exactly right files refused: {e}");
            return;
        }
    };
    let s = store.get();
    assert_eq!(s.total_pages(), pages);
    let mut model = Model::new();
    let mut buf = vec![0u8; PAGE];
    for p in 0..pages {
        let v = s.version(p);
        if exact {
            assert_eq!(
                v, expected[p as usize],
                "page {p}: entry kept or dropped wrongly"
            );
        }
        if v != 0 {
            assert_eq!(s.read(p, &mut buf).expect("read"), Some(v), "page {p}");
            model.insert(p, (v, buf.clone()));
        }
    }
    // Use it: new epochs and stores, each checked against the model.
    for _ in 0..16 {
        if inp.is_empty() {
            break;
        }
        match inp.u8() % 3 {
            0 => {
                let epoch = u64::from(inp.u8() % 4);
                s.set_epoch(epoch).expect("set_epoch");
                assert_eq!(s.epoch(), epoch);
            }
            _ => {
                let first = inp.below(pages + 2);
                let n = inp.below(4);
                let versions: Vec<u64> = (0..n).map(|_| u64::from(inp.u8() % 8)).collect();
                let fill = inp.u8();
                let data = vec![fill; n as usize * PAGE];
                let r = s.store(first, &versions, &data);
                let ok_args = first + n <= pages && !versions.contains(&0) && s.epoch() != 0;
                match r {
                    Ok(()) => {
                        assert!(ok_args || n == 0, "store accepted bad arguments");
                        for (i, &v) in versions.iter().enumerate() {
                            model.insert(first + i as u64, (v, page_of(fill)));
                        }
                    }
                    Err(e) => assert!(!ok_args, "store failed: {e}"),
                }
            }
        }
        check_model_after_epoch(s, &mut model);
        check_model(s, &model);
    }
    drop(store);

    // Opened again, it holds exactly what it held.
    let again = Store::open(dir, pages, memory_tier).expect("reopening the replica");
    assert_eq!(again.torn_at_open(), 0, "pages torn without a crash");
    check_model(again.get(), &model);
}

/// A new epoch invalidated everything: the model follows the store's epoch.
fn check_model_after_epoch(s: &dyn ReplicaStore, model: &mut Model) {
    if model.keys().any(|&p| s.version(p) == 0) {
        // Only a new epoch drops pages; it drops them all.
        assert!(
            (0..s.total_pages()).all(|p| s.version(p) == 0),
            "some pages dropped, others kept"
        );
        model.clear();
    }
}

/// Seeds: exactly right files with valid, missing and torn entries, for both tiers, and
/// a replica used after opening.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for tier in [0u8, 8] {
        let pages = 4u8;
        let mut s = vec![1 | tier, pages - 1];
        s.extend_from_slice(&[1, 2, 3, 4]); // fills
        s.push(1); // epoch
        s.extend_from_slice(&[0, 0, 0, 0, 0]); // header words right
                                               // entries: version, checksum right (or a fuzzed one for the third)
        s.extend_from_slice(&[1, 0, 2, 0, 3, 255, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0]);
        s.push(0); // exact length
                   // store pages 1..3 at versions 5,6 filled 9; new epoch 2; store page 0.
        s.extend_from_slice(&[1, 1, 2, 5, 6, 9, 0, 2, 1, 0, 1, 7, 0x42]);
        out.push(s);
    }
    out.push(vec![
        0, 3, 0, 0, 0, 0, 0x30, 0, b'F', b'L', b'T', b'R', b'E', b'P', b'L', 0,
    ]);
    out
}
