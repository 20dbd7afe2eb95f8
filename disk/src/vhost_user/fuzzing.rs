//! Not part of the crate's API: what the fuzz target `vhost_blk` (crate `faultline-fuzz`)
//! needs to drive the request parser and executor without a vhost-user connection. The
//! `request` module stays private; this is a view of it.
//!
//! [`handle`] does with one descriptor chain what the device does on its queue thread and
//! pool thread: take it apart, run it if it is a request, write the status byte, and
//! work out the used length for the used ring.

use virtio_queue::DescriptorChain;
use vm_memory::{GuestAddress, GuestMemory};

use super::request::{self, Device, Failure, Limits, Parsed, SERIAL_LEN};
use crate::device::BlockDevice;

/// What the device made of one chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The chain's head descriptor.
    pub head: u16,
    /// How the chain was taken apart and answered.
    pub verdict: Verdict,
    /// The length the device puts on the used ring for the chain.
    pub used: u32,
}

/// How a chain was taken apart and answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Returned unanswered: nothing written, not run.
    Unanswerable {
        /// Why.
        why: &'static str,
    },
    /// Answered `VIRTIO_BLK_S_IOERR` without running.
    Malformed {
        /// Where the status byte goes.
        status: GuestAddress,
        /// Why.
        why: &'static str,
    },
    /// Run.
    Ran {
        /// The request as parsed.
        request: Request,
        /// The status it was answered with (`VIRTIO_BLK_S_*`).
        status: u8,
        /// Why it failed (`None` when the status is `VIRTIO_BLK_S_OK`).
        failure: Option<String>,
    },
}

/// A request as the parser took it apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Where the status byte goes.
    pub status: GuestAddress,
    /// The request type (`VIRTIO_BLK_T_*`).
    pub kind: u32,
    /// The header's sector.
    pub sector: u64,
    /// The device-readable buffers after the header, in order.
    pub readable: Vec<(GuestAddress, u64)>,
    /// The device-writable buffers before the status byte, in order.
    pub writable: Vec<(GuestAddress, u64)>,
}

/// Handles one chain over guest memory `mem` as the device does, against `disk`.
pub fn handle<G: GuestMemory>(
    mem: &G,
    chain: DescriptorChain<&G>,
    disk: &dyn BlockDevice,
    serial: &[u8; SERIAL_LEN],
    limits: Limits,
) -> Outcome {
    let dev = Device {
        disk,
        serial,
        limits,
    };
    match request::parse(chain) {
        Parsed::Unanswerable { head, why } => Outcome {
            head,
            verdict: Verdict::Unanswerable { why },
            used: 0,
        },
        Parsed::Malformed { head, status, why } => Outcome {
            head,
            verdict: Verdict::Malformed { status, why },
            used: request::answer(mem, status, request::S_IOERR, 1),
        },
        Parsed::Request(req) => {
            let done = req.run(mem, &dev);
            let used = request::answer(mem, req.status, done.status, done.used);
            let failure = done.why.map(|f| match f {
                Failure::Malformed(why) => format!("malformed: {why}"),
                Failure::Unsupported(kind) => format!("unsupported type {kind}"),
                Failure::Disk => "the disk failed".to_string(),
            });
            Outcome {
                head: req.head,
                verdict: Verdict::Ran {
                    request: Request {
                        status: req.status,
                        kind: req.kind(),
                        sector: req.sector(),
                        readable: req.readable().to_vec(),
                        writable: req.writable().to_vec(),
                    },
                    status: done.status,
                    failure,
                },
                used,
            }
        }
    }
}
