//! Errors of the replica store.

use std::io;
use std::path::PathBuf;

/// Errors of [`crate::replica::ReplicaStore`] implementations. Bad input (out-of-range
/// pages, wrong buffer sizes, a damaged or foreign index) always comes back as one of
/// these; nothing in the store panics on it.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// A page argument is outside the store.
    #[error("page {page} is out of range (replica has {total} pages)")]
    PageOutOfRange {
        /// The offending page (`u64::MAX` when `first + count` overflows).
        page: u64,
        /// Pages in the replica; valid indices are `0..total`.
        total: u64,
    },
    /// `store` data is not exactly `versions.len() * 4096` bytes.
    #[error("page data is {len} bytes; expected {expected} (4096 per version given)")]
    BadDataLength {
        /// Bytes of data given.
        len: usize,
        /// Bytes needed: 4096 per version.
        expected: usize,
    },
    /// A `read` buffer that is not exactly one page.
    #[error("read buffer is {len} bytes; expected exactly 4096")]
    BadBufferLength {
        /// Length of the buffer given, in bytes.
        len: usize,
    },
    /// Versions start at 1; 0 means "nothing valid".
    #[error("page {page}: version 0 is reserved for 'nothing valid'")]
    ZeroVersion {
        /// The first page given version 0; nothing of the call was stored.
        page: u64,
    },
    /// `store` before any `set_epoch`: content must belong to a source run.
    #[error("no replication epoch set; call set_epoch before storing pages")]
    NoEpoch,
    /// Page count 0, or too large for this host's address space / file offsets.
    #[error("invalid replica size of {pages} pages")]
    BadPageCount {
        /// The page count asked for.
        pages: u64,
    },
    /// `index.bin` is not a faultline replica index (wrong magic or too short to
    /// hold a header). Nothing was changed; [`crate::replica::MemoryTier::create`] /
    /// [`crate::replica::DiskTier::create`] wipe the directory on purpose.
    #[error("{path} is not a faultline replica index: {reason}")]
    NotAReplica {
        /// Path of the index file.
        path: PathBuf,
        /// What gave it away (too short, or wrong magic).
        reason: String,
    },
    /// The index was written by an incompatible format version or page size.
    #[error("{path}: unsupported replica format (format version {format_version}, page size {page_size}); this build reads format version {supported} with 4096-byte pages")]
    UnsupportedFormat {
        /// Path of the index file.
        path: PathBuf,
        /// Format version found in the header.
        format_version: u32,
        /// Page size found in the header, in bytes.
        page_size: u32,
        /// The one format version this build reads.
        supported: u32,
    },
    /// The index describes a guest of another size (wrong directory or resized VM).
    #[error("{path} holds {found} pages but {expected} were requested")]
    PageCountMismatch {
        /// Path of the index file.
        path: PathBuf,
        /// Page count recorded in the index.
        found: u64,
        /// Page count the caller asked for.
        expected: u64,
    },
    /// Another process (or another store in this one) has the directory open.
    #[error("replica directory {path} is locked by another user")]
    Locked {
        /// The replica directory.
        path: PathBuf,
    },
    /// The memory tier needs shmem (tmpfs) so its file can become guest memory.
    #[error("{path} is not on tmpfs (filesystem magic {fs_type:#x}); the memory tier needs tmpfs, e.g. /dev/shm")]
    NotTmpfs {
        /// The replica directory.
        path: PathBuf,
        /// `f_type` from statfs(2) of the directory (tmpfs is `0x01021994`).
        fs_type: i64,
    },
    /// A VM id that cannot be used as one directory name.
    #[error("invalid VM id {0:?}: must be non-empty, without '/' or NUL, and not '.' or '..'")]
    BadVmId(String),
    /// A system call on one of the replica's files failed.
    #[error("{op} on {path} failed")]
    Io {
        /// The system call, e.g. `"pwrite"` or `"msync"`.
        op: &'static str,
        /// The file or directory it was made on.
        path: PathBuf,
        /// The OS error it returned.
        #[source]
        source: io::Error,
    },
}

impl ReplicaError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        ReplicaError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
