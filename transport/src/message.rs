//! The messages of the faultline migration protocol, independent of how they are framed.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Version spoken by this build. A peer with any other version is refused at the handshake.
/// Version 4: an evacuation's stale set follows the `Hello` at once, and the standby adds its
/// invalid pages to it (docs/protocol.md). Version 5: a `Request` says how much of the push
/// the destination had read ([`Message::Request`]'s `pushed_read`). Version 6: pages pushed
/// before the session runs may be lz4, which a destination decodes wherever the `Hello`
/// offered [`FEATURE_LZ4`].
pub const PROTOCOL_VERSION: u16 = 6;

/// Guest page size carried on the wire. Only 4 KiB pages are supported today.
pub const PAGE_SIZE: usize = 4096;

/// Most pages a single `Pages` message may carry (1 MiB of raw data).
pub const MAX_PAGES_PER_MESSAGE: usize = 256;

/// Most pages one zero run (a `Pages` of zero pages only, sent as a `ZeroRun` frame once
/// [`FEATURE_ZERO_RUNS`] was negotiated) may cover: 256 MiB.
pub const MAX_ZERO_RUN: usize = 65536;

/// The kinds of the longest zero run, shared by every zero run built or decoded here
/// ([`Pages::zeros`]), so none allocates.
static ZERO_KINDS: [u8; MAX_ZERO_RUN] = [PageKind::Zero as u8; MAX_ZERO_RUN];

/// Most page indices a single `Request` may name.
pub const MAX_REQUEST_PAGES: usize = 4096;

/// Most regions a memory layout may describe.
pub const MAX_REGIONS: usize = 64;

/// Most disks a layout may describe.
pub const MAX_DISKS: usize = 16;

/// Longest VM id and error text accepted, in bytes.
pub const MAX_TEXT: usize = 1024;

/// One guest-physical memory region as both sides see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionDesc {
    /// Guest-physical address of the region's first byte.
    pub guest_addr: u64,
    /// Length in bytes, a multiple of the page size.
    pub len: u64,
}

/// One virtual disk as both sides see it: its pages follow guest memory's in the
/// session's page numbering (see [`Layout`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskDesc {
    /// The disk's name (the VMM's drive id), at most [`MAX_TEXT`] bytes.
    pub name: String,
    /// Size in bytes, a multiple of the page size.
    pub len: u64,
}

/// What a session moves: the guest memory layout and the VM's disks. The destination must
/// have exactly the same one.
///
/// Every 4 KiB of it is a page of the session, numbered without gaps: guest memory's
/// regions first, in order, then each disk in order. A disk's blocks therefore travel,
/// replicate and are requested exactly like pages of memory (a disk read at an
/// evacuating destination is urgent traffic, like a page fault).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// Page size in bytes. Both sides must agree; only [`PAGE_SIZE`] is supported today.
    pub page_size: u32,
    /// The regions, at most [`MAX_REGIONS`] on the wire.
    pub regions: Vec<RegionDesc>,
    /// The disks, at most [`MAX_DISKS`] on the wire.
    #[serde(default)]
    pub disks: Vec<DiskDesc>,
}

impl Layout {
    /// A single region at guest address 0, no disk.
    pub fn single(len: u64) -> Layout {
        Layout {
            page_size: PAGE_SIZE as u32,
            regions: vec![RegionDesc { guest_addr: 0, len }],
            disks: Vec::new(),
        }
    }

    /// This layout with `disk` appended.
    pub fn with_disk(mut self, name: impl Into<String>, len: u64) -> Layout {
        self.disks.push(DiskDesc {
            name: name.into(),
            len,
        });
        self
    }

    fn ps(&self) -> u64 {
        u64::from(self.page_size.max(1))
    }

    /// Pages of the whole session: memory, then disks.
    pub fn total_pages(&self) -> u64 {
        self.memory_pages() + self.disks.iter().map(|d| d.len / self.ps()).sum::<u64>()
    }

    /// Pages of guest memory: numbers `0..memory_pages()`.
    pub fn memory_pages(&self) -> u64 {
        let ps = self.ps();
        self.regions.iter().map(|r| r.len / ps).sum()
    }

    /// Bytes of guest memory.
    pub fn memory_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    /// Bytes of all disks.
    pub fn disk_bytes(&self) -> u64 {
        self.disks.iter().map(|d| d.len).sum()
    }

    /// The session pages of disk `i`: a range after memory and the disks before it
    /// (empty for a disk that does not exist).
    pub fn disk_pages(&self, i: usize) -> std::ops::Range<u64> {
        let ps = self.ps();
        let Some(d) = self.disks.get(i) else {
            return 0..0;
        };
        let first = self.memory_pages() + self.disks[..i].iter().map(|d| d.len / ps).sum::<u64>();
        first..first + d.len / ps
    }
}

/// How one page travels inside a `Pages` message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PageKind {
    /// 4096 bytes follow in the payload.
    Raw = 0,
    /// An all-zero page; nothing follows.
    Zero = 1,
    /// An lz4 block: a little-endian `u16` length `n` (1 ≤ n < 4096), then `n` bytes that
    /// decompress to exactly one page. Only where the `Hello` offered [`FEATURE_LZ4`]:
    /// the destination decodes it then, whatever it answers (the pages pushed before its
    /// answer may be compressed; version 6).
    Lz4 = 2,
    /// A reference to content the destination already holds: the number of a page that
    /// holds it there (u64) and the content's xxh3-128 hash (u128), little-endian. The
    /// destination verifies the content it installs, and asks for the page when it
    /// cannot. Only after [`FEATURE_DEDUP`] was negotiated.
    Ref = 3,
}

impl PageKind {
    /// The kind a wire kind byte stands for; `None` for an unknown value, which the decoder
    /// rejects.
    pub fn from_u8(v: u8) -> Option<PageKind> {
        match v {
            0 => Some(PageKind::Raw),
            1 => Some(PageKind::Zero),
            2 => Some(PageKind::Lz4),
            3 => Some(PageKind::Ref),
            _ => None,
        }
    }

    /// Payload bytes this kind occupies, when fixed (`None` for [`PageKind::Lz4`], whose
    /// payload starts with its length).
    pub fn payload_len(self) -> Option<usize> {
        match self {
            PageKind::Raw => Some(PAGE_SIZE),
            PageKind::Zero => Some(0),
            PageKind::Lz4 => None,
            PageKind::Ref => Some(REF_LEN),
        }
    }
}

/// A run of consecutive pages. Kinds come first and payloads after them, so the raw data of
/// consecutive raw pages is contiguous and can be installed with one copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pages {
    /// Global page number of the first page; the run covers `first..first + count()`.
    pub first: u64,
    /// One `PageKind` byte per page, validated by the decoder.
    pub kinds: Bytes,
    /// Concatenated payloads in page order.
    pub payload: Bytes,
}

/// One page of a `Pages` message, borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageRef<'a> {
    /// The page's [`PAGE_SIZE`] bytes.
    Raw(&'a [u8]),
    /// An all-zero page; it has no payload.
    Zero,
    /// The compressed block (without its length prefix).
    Lz4(&'a [u8]),
    /// A page the destination holds with this content, and the content's xxh3-128 hash.
    Ref {
        /// The destination's page whose content to copy.
        page: u64,
        /// xxh3-128 of that content; the copy is installed only if what the destination
        /// reads at `page` hashes to this.
        hash: u128,
    },
}

impl Pages {
    /// Encodes `data` (whole pages starting at page `first`), sending all-zero pages as flags.
    pub fn from_memory(first: u64, data: &[u8]) -> Pages {
        debug_assert_eq!(data.len() % PAGE_SIZE, 0);
        let count = data.len() / PAGE_SIZE;
        let mut kinds = Vec::with_capacity(count);
        let mut payload = Vec::with_capacity(data.len());
        for page in data.chunks_exact(PAGE_SIZE) {
            if is_zero(page) {
                kinds.push(PageKind::Zero as u8);
            } else {
                kinds.push(PageKind::Raw as u8);
                payload.extend_from_slice(page);
            }
        }
        Pages {
            first,
            kinds: kinds.into(),
            payload: payload.into(),
        }
    }

    /// `count` zero pages from page `first`, without allocating; `None` for a count of 0
    /// or above [`MAX_ZERO_RUN`].
    pub fn zeros(first: u64, count: usize) -> Option<Pages> {
        if count == 0 {
            return None;
        }
        Some(Pages {
            first,
            kinds: Bytes::from_static(ZERO_KINDS.get(..count)?),
            payload: Bytes::new(),
        })
    }

    /// Whether every page of the run is a zero page (and it has pages): a run that
    /// [`Pages::zeros`] could have built.
    pub fn is_zero_run(&self) -> bool {
        !self.kinds.is_empty()
            && self.payload.is_empty()
            && self.kinds.iter().all(|&k| k == PageKind::Zero as u8)
    }

    /// Pages in the run (one kind byte each); 1 to [`MAX_PAGES_PER_MESSAGE`] in a decoded
    /// message, or to [`MAX_ZERO_RUN`] for a run of zero pages.
    pub fn count(&self) -> usize {
        self.kinds.len()
    }

    /// The run's bytes on the wire past its frame header: a kind byte per page and the
    /// payload, or a fixed 12 for a zero run longer than a `Pages` message (it crosses as a
    /// `ZeroRun` frame). Both sides count the push in these units ([`Message::Request`]).
    pub fn wire_len(&self) -> u64 {
        if self.payload.is_empty() && self.count() > MAX_PAGES_PER_MESSAGE {
            12
        } else {
            (self.kinds.len() + self.payload.len()) as u64
        }
    }

    /// Iterates `(page index, page)`. The decoder has already checked kinds and lengths;
    /// an inconsistent value built by hand ends the iteration early instead of panicking.
    pub fn iter(&self) -> PagesIter<'_> {
        PagesIter {
            pages: self,
            i: 0,
            offset: 0,
        }
    }

    /// The first `k` pages and the rest, sharing this message's buffers (no copy); `None`
    /// if `k` is past the end or the payload is shorter than the kinds say.
    pub fn split_at(&self, k: usize) -> Option<(Pages, Pages)> {
        if k > self.count() {
            return None;
        }
        let mut it = self.iter();
        for _ in 0..k {
            it.next()?;
        }
        let at = it.offset;
        let head = Pages {
            first: self.first,
            kinds: self.kinds.slice(..k),
            payload: self.payload.slice(..at),
        };
        let tail = Pages {
            first: self.first.checked_add(k as u64)?,
            kinds: self.kinds.slice(k..),
            payload: self.payload.slice(at..),
        };
        Some((head, tail))
    }

    /// Pages that are raw, i.e. how many payload pages follow.
    pub fn raw_count(&self) -> usize {
        self.kinds
            .iter()
            .filter(|&&k| k == PageKind::Raw as u8)
            .count()
    }
}

/// Iterator over the pages of a [`Pages`] message, from [`Pages::iter`].
pub struct PagesIter<'a> {
    pages: &'a Pages,
    i: usize,
    offset: usize,
}

impl<'a> Iterator for PagesIter<'a> {
    type Item = (u64, PageRef<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        let kind = PageKind::from_u8(*self.pages.kinds.get(self.i)?)?;
        let page = self.pages.first.checked_add(self.i as u64)?;
        self.i += 1;
        let payload = &self.pages.payload;
        match kind {
            PageKind::Zero => Some((page, PageRef::Zero)),
            PageKind::Raw => {
                let data = payload.get(self.offset..self.offset + PAGE_SIZE)?;
                self.offset += PAGE_SIZE;
                Some((page, PageRef::Raw(data)))
            }
            PageKind::Lz4 => {
                let len = payload.get(self.offset..self.offset + 2)?;
                let n = u16::from_le_bytes([len[0], len[1]]) as usize;
                let data = payload.get(self.offset + 2..self.offset + 2 + n)?;
                self.offset += 2 + n;
                Some((page, PageRef::Lz4(data)))
            }
            PageKind::Ref => {
                let r = payload.get(self.offset..self.offset + REF_LEN)?;
                self.offset += REF_LEN;
                let held = u64::from_le_bytes(r[..8].try_into().ok()?);
                let hash = u128::from_le_bytes(r[8..].try_into().ok()?);
                Some((page, PageRef::Ref { page: held, hash }))
            }
        }
    }
}

/// Whether a page is all zero bytes.
pub fn is_zero(page: &[u8]) -> bool {
    // Compare in u64 words; the compiler vectorises this well.
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns and align_to only yields aligned,
        // in-bounds middle slices.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// What a connection is for, announced in the `Hello`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u8)]
pub enum SessionKind {
    /// Plain postcopy: the destination has nothing and receives every page.
    Migrate = 0,
    /// Normal times: the source sends changed pages to the standby's replica.
    Replicate = 1,
    /// Postcopy into a standby replica: only stale pages cross.
    Evacuate = 2,
}

impl SessionKind {
    /// The kind a wire byte stands for; `None` for an unknown value.
    pub fn from_u8(v: u8) -> Option<SessionKind> {
        match v {
            0 => Some(SessionKind::Migrate),
            1 => Some(SessionKind::Replicate),
            2 => Some(SessionKind::Evacuate),
            _ => None,
        }
    }
}

/// Which page set a `PageSet` message carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u8)]
pub enum SetKind {
    /// Destination → source: pages the replica cannot serve (never stored, torn, other epoch).
    Invalid = 0,
    /// Source → destination: every page that must cross at evacuation.
    Stale = 1,
    /// Destination → source, after `Resume`: every page the destination holds (received,
    /// or fresh in its replica) and has no demand request outstanding for.
    Held = 2,
}

/// Most bitmap words in one `PageSet` message (a million pages).
pub const MAX_SET_WORDS: usize = 16384;

/// Largest VM state blob (vCPU and device state) carried at switchover.
pub const MAX_STATE: usize = 512 * 1024;

/// `Hello` feature bit: a `VmState` message follows the handshake and the destination must
/// not resume before it has it.
pub const FEATURE_VM_STATE: u64 = 1 << 63;

/// `Hello` feature bit, on a later connection of a session whose VM the source handed over
/// to a destination that had answered it: only that destination, which knows the session,
/// may take the connection. Any other (one that restarted and lost the session) refuses it
/// with [`ErrorCode::ResumeRefused`]: the guest's state since switchover is not there, and
/// starting over from the source's memory would run the VM from an older state.
pub const FEATURE_HANDED_OVER: u64 = 1 << 62;

/// Feature bit: `Pages` may carry [`PageKind::Lz4`] pages. Unlike the other encodings,
/// lz4 needs no answer: a destination decodes it wherever the `Hello` offered it, so the
/// pages pushed before the session runs may be compressed (version 6).
pub const FEATURE_LZ4: u64 = 1 << 0;

/// Feature bit: `Pages` may carry [`PageKind::Ref`] pages.
pub const FEATURE_DEDUP: u64 = 1 << 1;

/// Feature bit: runs of zero pages may be longer than [`MAX_PAGES_PER_MESSAGE`], up to
/// [`MAX_ZERO_RUN`] pages; such a run crosses as one `ZeroRun` frame (first page and
/// count). Decoders accept the frame whatever was negotiated; a source sends it only to
/// a destination that agreed.
pub const FEATURE_ZERO_RUNS: u64 = 1 << 2;

/// Payload bytes of a [`PageKind::Ref`]: a page number and an xxh3-128 hash.
pub const REF_LEN: usize = 24;

/// Most (page, version) pairs in one `Ack`.
pub const MAX_ACKS: usize = 8192;

/// The checksum a `Resume` carries for its held set: xxh3-64 of the bitmap's words as
/// little-endian bytes, in order.
pub fn held_checksum(words: &[u64]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for w in words {
        h.update(&w.to_le_bytes());
    }
    h.digest()
}

/// Why a peer gave up; carried in `Message::Error` so the other side can say what went wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u16)]
pub enum ErrorCode {
    /// 1: the peers speak different protocol versions.
    VersionMismatch = 1,
    /// 2: the source's memory layout (page size or any region) differs from the
    /// destination's.
    LayoutMismatch = 2,
    /// 3: a message named a page outside the layout.
    PageOutOfRange = 3,
    /// 4: a frame or a page set could not be decoded, or reading or writing a stream failed
    /// while the connection was up.
    Malformed = 4,
    /// 5: a message came in the wrong state or on the wrong stream; also a session kind the
    /// destination does not accept, or a `Complete` whose page count does not match.
    UnexpectedMessage = 5,
    /// 6: the source announced another VM id than the destination expects.
    VmIdMismatch = 6,
    /// 7: a local failure that is not about the peer's messages (reading or installing
    /// pages, a failed driver task, a timeout); also what any unknown code decodes to.
    Internal = 7,
    /// 8: the session was abandoned before it completed. Locally, a stream the peer ended
    /// while the session still needed it is reported with this code.
    Aborted = 8,
    /// 9: the listener is already in a session with another peer; try again later or
    /// elsewhere. Sent only as a connection's close code, after authentication.
    Busy = 9,
    /// 10: a resume failed: another session id, or a held set whose length or checksum
    /// does not match.
    ResumeRefused = 10,
}

impl ErrorCode {
    /// The code a wire value stands for. Unknown values become [`ErrorCode::Internal`], so an
    /// `Error` from a newer peer still decodes.
    pub fn from_u16(v: u16) -> ErrorCode {
        match v {
            1 => ErrorCode::VersionMismatch,
            2 => ErrorCode::LayoutMismatch,
            3 => ErrorCode::PageOutOfRange,
            4 => ErrorCode::Malformed,
            5 => ErrorCode::UnexpectedMessage,
            6 => ErrorCode::VmIdMismatch,
            8 => ErrorCode::Aborted,
            9 => ErrorCode::Busy,
            10 => ErrorCode::ResumeRefused,
            _ => ErrorCode::Internal,
        }
    }
}

/// Every message of the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Source → destination, first message on the control stream.
    Hello {
        /// The source's [`PROTOCOL_VERSION`]; the destination refuses any other.
        version: u16,
        /// What the session is for.
        kind: SessionKind,
        /// The VM's id, at most [`MAX_TEXT`] bytes. A destination configured with an
        /// expected id refuses any other.
        vm_id: String,
        /// The source's memory layout; the destination's must be identical.
        layout: Layout,
        /// Feature bits: the encodings the source offers ([`FEATURE_LZ4`],
        /// [`FEATURE_DEDUP`]), and [`FEATURE_VM_STATE`] announcing a `VmState` message.
        features: u64,
        /// Replication epoch: versions are only comparable within one epoch.
        epoch: u64,
        /// The session's id, random, chosen by the source once per session and sent again
        /// in the `Hello` that opens every later connection of the same session.
        session_id: u128,
    },
    /// Destination → source: the handshake is accepted; postcopy may start.
    HelloAck {
        /// The destination's [`PROTOCOL_VERSION`].
        version: u16,
        /// The negotiated features: those of the `Hello` the destination also supports,
        /// without [`FEATURE_VM_STATE`]. The source encodes pages with these only once the
        /// session runs (before, lz4 where the `Hello` offered it: [`FEATURE_LZ4`]).
        features: u64,
        /// The connection epoch the destination gave this connection (0 for the first;
        /// see [`Message::Resume`]).
        conn_epoch: u32,
    },
    /// Destination → source, answering the `Hello` on a new connection of a session that
    /// was running when its connection was lost: resume it. `PageSet` chunks of kind
    /// [`SetKind::Held`] follow on the control stream.
    Resume {
        /// The session's id, from the first `Hello`; the source refuses another.
        session_id: u128,
        /// The connection epoch of this connection, chosen by the destination: greater
        /// than every earlier one. Messages of older connections are ignored.
        conn_epoch: u32,
        /// The features negotiated at the handshake, as in `HelloAck`.
        features: u64,
        /// Pages covered by the held set: the layout's total, checked by the source.
        pages: u64,
        /// xxh3-64 of the held set's bitmap words, little-endian, checked by the source
        /// (see [`held_checksum`]).
        checksum: u64,
    },
    /// Source → destination: the `Resume` is accepted; the session runs again.
    ResumeAck {
        /// The connection epoch of the accepted `Resume`.
        conn_epoch: u32,
    },
    /// Destination → source on the urgent stream: pages a vCPU is blocked on.
    Request {
        /// Global page numbers, at most [`MAX_REQUEST_PAGES`]; the source answers with
        /// `Pages` on the urgent stream.
        pages: Vec<u64>,
        /// How much of this connection's push the destination had read when it asked, in
        /// [`Pages::wire_len`] units. The source need not answer a page whose pushed copy
        /// had left by then (docs/protocol.md, "Requests for pages already on the way").
        /// 0 asks for every page to be answered: a pushed copy that could not be used is
        /// fetched again that way.
        pushed_read: u64,
    },
    /// Source → destination: page data, on the urgent stream (replies) or a bulk stream (push).
    Pages(Pages),
    /// Source → standby: page contents at the versions the source assigned.
    Update {
        /// The contents, raw and zero kinds only (the replica stores pages as they are).
        pages: Pages,
        /// One version per page, in page order; never 0, which means "nothing stored".
        versions: Vec<u64>,
    },
    /// Standby → source: these (page, version) pairs are stored.
    Ack {
        /// (page, version) pairs made durable, at most [`MAX_ACKS`]; the source refuses a
        /// page outside the layout or a version of 0.
        entries: Vec<(u64, u64)>,
    },
    /// A chunk of a page bitmap; `last` marks the final chunk of the set.
    PageSet {
        /// Which set the chunk belongs to.
        kind: SetKind,
        /// Index of the chunk's first bitmap word. Chunks come in order, each starting where
        /// the one before ended.
        first_word: u64,
        /// Bitmap words, at most [`MAX_SET_WORDS`]; bit `i` of word `w` stands for page
        /// `64 × w + i`.
        words: Vec<u64>,
        /// The final chunk; the set must then cover every page of the layout.
        last: bool,
    },
    /// Source → destination at switchover: the VMM's vCPU and device state, opaque to
    /// faultline and versioned by the VMM.
    VmState {
        /// The state, at most [`MAX_STATE`] bytes.
        blob: Vec<u8>,
    },
    /// Source → destination: every page has been sent at least once.
    PushDone {
        /// Pages the push schedule handed out (pushed or served on demand; at evacuation,
        /// pages that need not cross count as handed out): the layout's total by then.
        pages_sent: u64,
    },
    /// Destination → source: every page is present; the source may release the VM.
    Complete {
        /// The destination's page count, which the source checks against its own.
        pages_received: u64,
    },
    /// Source → destination: acknowledges `Complete`; the session is over.
    CompleteAck,
    /// Either side: a fatal error with a reason.
    Error {
        /// What went wrong; the connection is then closed with the same code.
        code: ErrorCode,
        /// A reason for people, at most [`MAX_TEXT`] bytes (cut at a character boundary).
        message: String,
    },
}

impl Message {
    /// A `Request` for `pages` that the source must answer in full (`pushed_read` 0).
    pub fn request(pages: Vec<u64>) -> Message {
        Message::Request {
            pages,
            pushed_read: 0,
        }
    }

    /// Short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::HelloAck { .. } => "HelloAck",
            Message::Resume { .. } => "Resume",
            Message::ResumeAck { .. } => "ResumeAck",
            Message::Request { .. } => "Request",
            Message::Pages(_) => "Pages",
            Message::Update { .. } => "Update",
            Message::Ack { .. } => "Ack",
            Message::PageSet { .. } => "PageSet",
            Message::VmState { .. } => "VmState",
            Message::PushDone { .. } => "PushDone",
            Message::Complete { .. } => "Complete",
            Message::CompleteAck => "CompleteAck",
            Message::Error { .. } => "Error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_split_anywhere_without_losing_a_byte() {
        let mut mem = vec![0u8; 5 * PAGE_SIZE];
        for (i, page) in mem.chunks_exact_mut(PAGE_SIZE).enumerate() {
            if i != 2 {
                page.fill(i as u8 + 1);
            }
        }
        let pages = Pages::from_memory(10, &mem);
        for k in 0..=5 {
            let (a, b) = pages.split_at(k).unwrap();
            assert_eq!(
                (a.first, a.count(), b.first, b.count()),
                (10, k, 10 + k as u64, 5 - k)
            );
            let joined: Vec<_> = a.iter().chain(b.iter()).collect();
            assert_eq!(joined, pages.iter().collect::<Vec<_>>());
        }
        assert!(pages.split_at(6).is_none());
    }
}
