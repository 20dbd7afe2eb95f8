//! What a front end serves.

/// Why a disk operation failed. Front ends turn it into their protocol's error
/// ([`DiskError::errno`]) and keep serving.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The request reaches past the end of the disk (or its length overflows).
    #[error("{len} bytes at offset {offset} reach past the end of the {size}-byte disk")]
    OutOfRange {
        /// First byte asked for.
        offset: u64,
        /// Bytes asked for.
        len: u64,
        /// The disk's size in bytes.
        size: u64,
    },
    /// The disk is exported read-only.
    #[error("the disk is read-only")]
    ReadOnly,
    /// The image file failed.
    #[error("{op} on the disk image failed")]
    Io {
        /// What was being done (`pread`, `pwrite`, `fdatasync`, ...).
        op: &'static str,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// A block that must come from elsewhere (the source, during an evacuation) cannot.
    #[error("block {block} is not here and cannot be fetched: {reason}")]
    Unavailable {
        /// The block's index.
        block: u64,
        /// Why not (the session ended, the source refused, ...).
        reason: String,
    },
}

impl DiskError {
    /// The POSIX errno a front end reports for this error (NBD and virtio-blk both speak
    /// a small subset of them).
    pub fn errno(&self) -> i32 {
        match self {
            DiskError::OutOfRange { .. } => libc::EINVAL,
            DiskError::ReadOnly => libc::EPERM,
            DiskError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            DiskError::Unavailable { .. } => libc::EIO,
        }
    }

    pub(crate) fn io(op: &'static str, source: std::io::Error) -> DiskError {
        DiskError::Io { op, source }
    }
}

/// A byte-addressed disk of fixed size, as a front end sees it. Every method may be
/// called from many threads at once; a method may block (a block fetched from the source
/// during an evacuation), so front ends run requests on threads that may wait.
///
/// Offsets and lengths are in bytes and need no alignment: an implementation that works
/// in blocks reads, modifies and writes the blocks a request touches.
pub trait BlockDevice: Send + Sync {
    /// The disk's size in bytes.
    fn size(&self) -> u64;

    /// Whether writes, trims and write-zeroes are refused with [`DiskError::ReadOnly`].
    fn read_only(&self) -> bool {
        false
    }

    /// Fills `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError>;

    /// Writes `data` at `offset`. With `fua` (force unit access) the data is durable on
    /// the local medium when this returns, as after [`BlockDevice::flush`].
    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), DiskError>;

    /// Makes every completed write durable on the local medium. At a source this says
    /// nothing about the standby: replication is asynchronous (see docs/disks.md).
    fn flush(&self) -> Result<(), DiskError>;

    /// The guest no longer needs `len` bytes at `offset`; later reads return zeroes
    /// (this implementation's choice, which NBD and virtio allow).
    fn trim(&self, offset: u64, len: u64) -> Result<(), DiskError>;

    /// Writes `len` zero bytes at `offset`, freeing the space where that is cheaper.
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), DiskError>;
}

/// Checks that `len` bytes at `offset` lie inside a disk of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), DiskError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DiskError::OutOfRange { offset, len, size }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_past_the_end_or_overflowing_are_refused() {
        assert!(check_range(0, 4096, 4096).is_ok());
        assert!(check_range(4096, 0, 4096).is_ok());
        assert!(check_range(1, 4096, 4096).is_err());
        let e = check_range(u64::MAX, 2, 4096).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
        assert!(e.to_string().contains("past the end"), "{e}");
    }
}
