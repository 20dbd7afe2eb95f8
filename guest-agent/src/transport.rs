//! The byte channel to the host: a serial port or virtio console (a tty, put in raw mode),
//! or a Unix socket (for host-side tests and for running the agent outside a VM).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use thiserror::Error;

/// Where the host is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Device {
    /// A tty: `/dev/ttyS1`, `/dev/hvc0`, `/dev/vport0p1`, ...
    Serial(PathBuf),
    /// `unix:/path`: connect to a listening Unix stream socket.
    Unix(PathBuf),
}

impl FromStr for Device {
    type Err = TransportError;

    fn from_str(s: &str) -> Result<Device, TransportError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(TransportError::Empty);
        }
        Ok(match s.strip_prefix("unix:") {
            Some(p) => Device::Unix(p.into()),
            None => Device::Serial(s.into()),
        })
    }
}

/// Why the channel could not be opened.
#[derive(Debug, Error)]
pub enum TransportError {
    /// No device given.
    #[error("no device given")]
    Empty,
    /// Opening or configuring the device failed.
    #[error("cannot open {path}")]
    Open {
        /// The device.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// The two directions of an open channel.
pub struct Channel {
    /// Bytes from the host.
    pub reader: Box<dyn Read + Send>,
    /// Bytes to the host.
    pub writer: Box<dyn Write + Send>,
}

/// Opens `dev`; a Unix socket is retried until `wait` has passed (the host may not be
/// listening yet).
pub fn open(dev: &Device, wait: Duration) -> Result<Channel, TransportError> {
    match dev {
        Device::Serial(path) => {
            let err = |source| TransportError::Open {
                path: path.clone(),
                source,
            };
            let file = open_tty(path).map_err(err)?;
            let reader = file.try_clone().map_err(err)?;
            Ok(Channel {
                reader: Box::new(reader),
                writer: Box::new(file),
            })
        }
        Device::Unix(path) => {
            let deadline = Instant::now() + wait;
            let stream = loop {
                match UnixStream::connect(path) {
                    Ok(s) => break s,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(200))
                    }
                    Err(source) => {
                        return Err(TransportError::Open {
                            path: path.clone(),
                            source,
                        })
                    }
                }
            };
            let err = |source| TransportError::Open {
                path: path.clone(),
                source,
            };
            let reader = stream.try_clone().map_err(err)?;
            Ok(Channel {
                reader: Box::new(reader),
                writer: Box::new(stream),
            })
        }
    }
}

/// Opens a tty without making it our controlling terminal and puts it in raw mode: no
/// echo, no line editing, no CR/LF translation, no signals from control characters — the
/// protocol is binary.
fn open_tty(path: &PathBuf) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path)?;
    let fd = file.as_raw_fd();
    // SAFETY: termios is plain data; zeroed is a valid value that tcgetattr overwrites.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is open for the duration of the call; t is a valid termios we own.
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: cfmakeraw only modifies the termios we pass.
    unsafe { libc::cfmakeraw(&mut t) };
    // 115200 baud (irrelevant for an emulated port). Set in c_cflag directly: the libc
    // crate binds cfset*speed to versioned symbols that a static glibc link cannot resolve.
    t.c_cflag = (t.c_cflag & !libc::CBAUD) | libc::B115200;
    // Block until at least one byte arrives, no inter-byte timer.
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
    t.c_cflag |= libc::CLOCAL | libc::CREAD;
    // SAFETY: fd is open; t is a valid termios.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Bytes that arrived before raw mode may have been mangled by the line discipline.
    // SAFETY: fd is open.
    unsafe { libc::tcflush(fd, libc::TCIFLUSH) };
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs() {
        assert_eq!(
            "/dev/ttyS1".parse::<Device>().unwrap(),
            Device::Serial("/dev/ttyS1".into())
        );
        assert_eq!(
            "unix:/tmp/a.sock".parse::<Device>().unwrap(),
            Device::Unix("/tmp/a.sock".into())
        );
        assert!("  ".parse::<Device>().is_err());
    }

    #[test]
    fn unix_socket_round_trip() {
        let dir = std::env::temp_dir().join(format!("ga-transport-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("s");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mut ch = open(&Device::Unix(path.clone()), Duration::from_secs(1)).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        ch.writer.write_all(b"hi").unwrap();
        let mut b = [0u8; 2];
        peer.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hi");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_pty_goes_raw() {
        // A pseudo-terminal stands in for the serial port.
        // SAFETY: posix_openpt returns a new fd or -1.
        let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY) };
        assert!(master >= 0);
        // SAFETY: master is a valid pty master fd.
        unsafe {
            assert_eq!(libc::grantpt(master), 0);
            assert_eq!(libc::unlockpt(master), 0);
        }
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: name is a writable buffer of the given length.
        let r = unsafe { libc::ptsname_r(master, name.as_mut_ptr(), name.len()) };
        assert_eq!(r, 0);
        // SAFETY: ptsname_r wrote a NUL-terminated string.
        let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
            .to_str()
            .unwrap()
            .to_string();
        let mut ch = open(&Device::Serial(path.into()), Duration::ZERO).unwrap();
        // A byte that a cooked tty would translate (CR → LF) passes unchanged.
        let bytes = [0xF1u8, b'\r', 0x03, 0x7A];
        // SAFETY: writing our own buffer to our own fd.
        let n = unsafe { libc::write(master, bytes.as_ptr().cast(), bytes.len()) };
        assert_eq!(n, 4);
        let mut got = [0u8; 4];
        ch.reader.read_exact(&mut got).unwrap();
        assert_eq!(got, bytes);
        // SAFETY: closing the fd we opened.
        unsafe { libc::close(master) };
    }
}
