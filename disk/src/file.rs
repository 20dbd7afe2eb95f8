//! A raw disk image file, read and written with `pread`/`pwrite` (never mapped, so a file
//! that shrinks under us is an error, not a SIGBUS).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::device::{check_range, BlockDevice, DiskError};

/// Why an image could not be opened. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The file could not be opened or examined.
    #[error("cannot open the disk image {path}")]
    Open {
        /// The image.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// Not a regular file (a directory, a device, a socket).
    #[error("the disk image {path} is not a regular file")]
    NotAFile {
        /// The image.
        path: PathBuf,
    },
    /// Empty, or not a whole number of 4 KiB blocks.
    #[error("the disk image {path} is {size} bytes: not a non-zero multiple of 4096")]
    BadSize {
        /// The image.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
}

/// A raw image file served as a disk.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    size: u64,
    read_only: bool,
    path: PathBuf,
}

impl RawFile {
    /// Opens `path` for reading, and writing unless `read_only`. The file's size is the
    /// disk's size, fixed from now on.
    pub fn open(path: &Path, read_only: bool) -> Result<RawFile, OpenError> {
        let open_err = |source| OpenError::Open {
            path: path.to_owned(),
            source,
        };
        // Checked before opening: opening a directory for writing fails with a less
        // helpful "Is a directory".
        if !std::fs::metadata(path).map_err(open_err)?.is_file() {
            return Err(OpenError::NotAFile {
                path: path.to_owned(),
            });
        }
        let file = File::options()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let size = meta.len();
        if size == 0 || !size.is_multiple_of(4096) {
            return Err(OpenError::BadSize {
                path: path.to_owned(),
                size,
            });
        }
        Ok(RawFile {
            file,
            size,
            read_only,
            path: path.to_owned(),
        })
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `fallocate(mode)` over the range; `Ok(false)` if the filesystem does not support
    /// the mode (the caller then writes zeroes).
    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> Result<bool, DiskError> {
        // SAFETY: fallocate only reads its integer arguments; the fd is ours and open.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => Ok(false),
            _ => Err(DiskError::io("fallocate", e)),
        }
    }

    fn write_zero_bytes(&self, mut offset: u64, len: u64) -> Result<(), DiskError> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(zeros.len() as u64) as usize;
            self.file
                .write_all_at(&zeros[..n], offset)
                .map_err(|e| DiskError::io("pwrite", e))?;
            offset += n as u64;
        }
        Ok(())
    }

    fn writable(&self) -> Result<(), DiskError> {
        if self.read_only {
            Err(DiskError::ReadOnly)
        } else {
            Ok(())
        }
    }
}

impl BlockDevice for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| DiskError::io("pread", e))
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), DiskError> {
        self.writable()?;
        check_range(offset, data.len() as u64, self.size)?;
        self.file
            .write_all_at(data, offset)
            .map_err(|e| DiskError::io("pwrite", e))?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), DiskError> {
        self.file
            .sync_data()
            .map_err(|e| DiskError::io("fdatasync", e))
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.writable()?;
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if !self.fallocate(mode, offset, len)? {
            self.write_zero_bytes(offset, len)?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), DiskError> {
        self.writable()?;
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        if !self.fallocate(mode, offset, len)? {
            self.write_zero_bytes(offset, len)?;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(size: u64) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        (dir, path)
    }

    #[test]
    fn reads_writes_trims_and_zeroes_at_any_offset() {
        let (_d, path) = image(64 << 10);
        let disk = RawFile::open(&path, false).unwrap();
        disk.write_at(&[7u8; 5000], 100, false).unwrap();
        let mut buf = vec![0u8; 5200];
        disk.read_at(&mut buf, 0).unwrap();
        assert!(buf[..100].iter().all(|&b| b == 0));
        assert!(buf[100..5100].iter().all(|&b| b == 7));
        disk.write_zeroes(200, 100, true).unwrap();
        disk.trim(4096, 4096).unwrap();
        disk.read_at(&mut buf, 0).unwrap();
        assert!(buf[200..300].iter().all(|&b| b == 0));
        assert!(buf[300..4096].iter().all(|&b| b == 7));
        assert!(buf[4096..5200].iter().all(|&b| b == 0));
        disk.flush().unwrap();
    }

    #[test]
    fn out_of_range_and_read_only_change_nothing() {
        let (_d, path) = image(8192);
        let disk = RawFile::open(&path, false).unwrap();
        disk.write_at(&[1u8; 8192], 0, false).unwrap();
        assert!(matches!(
            disk.write_at(&[9u8; 2], 8191, false),
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(disk.trim(u64::MAX - 1, 4).is_err());
        let ro = RawFile::open(&path, true).unwrap();
        assert!(matches!(
            ro.write_at(&[9u8; 1], 0, false),
            Err(DiskError::ReadOnly)
        ));
        let mut buf = vec![0u8; 8192];
        disk.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 1));
    }

    #[test]
    fn bad_images_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = RawFile::open(dir.path(), false).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let (_d, path) = image(1000);
        let e = RawFile::open(&path, false).unwrap_err();
        assert!(e.to_string().contains("disk.img") && e.to_string().contains("1000"));
        let e = RawFile::open(&dir.path().join("missing.img"), false).unwrap_err();
        assert!(e.to_string().contains("missing.img"), "{e}");
    }
}
