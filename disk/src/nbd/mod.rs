//! The NBD front end: serves a [`BlockDevice`](crate::BlockDevice) to NBD clients (QEMU's
//! block layer, `qemu-img`, `qemu-io`, `nbdkit`'s tools, the Linux kernel's client) over a
//! Unix socket or TCP.
//!
//! Written against the protocol document (`doc/proto.md` of the NetworkBlockDevice/nbd
//! repository) in the sans-IO style: [`proto::Session`] is the whole protocol as a state
//! machine (bytes in, events and bytes out, no I/O), tested in memory down to every
//! refusal; [`Server`] is the thin blocking driver that reads sockets, feeds sessions and
//! runs requests on worker threads.
//!
//! What is spoken: the fixed newstyle handshake (`NBD_FLAG_FIXED_NEWSTYLE`,
//! `NBD_FLAG_NO_ZEROES`), the options `NBD_OPT_GO`, `NBD_OPT_INFO` (with `NBD_INFO_EXPORT`,
//! and `NBD_INFO_BLOCK_SIZE` and `NBD_INFO_NAME` when asked), `NBD_OPT_LIST`,
//! `NBD_OPT_ABORT` and `NBD_OPT_EXPORT_NAME`; `NBD_REP_ERR_UNSUP` for every other option
//! (TLS and structured replies included). In transmission, simple replies to
//! `NBD_CMD_READ`, `NBD_CMD_WRITE` (with `NBD_CMD_FLAG_FUA`), `NBD_CMD_FLUSH`,
//! `NBD_CMD_TRIM`, `NBD_CMD_WRITE_ZEROES` (with `NBD_CMD_FLAG_NO_HOLE`) and
//! `NBD_CMD_DISC`. One export per server.
//!
//! ```no_run
//! use std::sync::Arc;
//! use disk::nbd::{Server, ServerConfig};
//! use disk::RawFile;
//!
//! let image = RawFile::open("disk.img".as_ref(), false)?;
//! let server = Server::new(Arc::new(image), ServerConfig::default());
//! server.serve_unix("/run/disk.sock")?; // nbd+unix:///?socket=/run/disk.sock
//! // ... until the VM is done with it:
//! server.stop();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod proto;
mod server;
pub mod wire;

pub use proto::{BlockSizes, Export};
pub use server::{ServeError, Server, ServerConfig, Stats};

#[cfg(test)]
mod tests;
