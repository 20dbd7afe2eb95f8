//! The server side of the NBD protocol as a sans-IO state machine: bytes from the client
//! go in ([`Session::handle_input`]), and out come bytes for the client
//! ([`Session::take_output`]) and [`Event`]s for the driver: requests to run on the disk,
//! the start of transmission, a clean disconnect, or a protocol violation that ends the
//! connection. No sockets, no threads, no clock: every path is tested in memory.
//!
//! What the session answers itself: the whole handshake (fixed newstyle, `NBD_OPT_GO`,
//! `NBD_OPT_INFO`, `NBD_OPT_LIST`, `NBD_OPT_ABORT`, `NBD_OPT_EXPORT_NAME`, and
//! `NBD_REP_ERR_UNSUP` for everything else), and in transmission every request it can
//! refuse without the disk (bad range, read-only export, oversized length, unknown command
//! or flag). What reaches the driver as a [`Request`] is valid for the export; a write's
//! payload is complete before its request is emitted, so a client that vanishes mid-write
//! changes nothing.

use std::collections::VecDeque;

use super::wire::*;

/// The largest option payload buffered (`NBD_OPT_GO` with a 4,096-byte name and
/// thousands of information requests fits); larger options are skipped unread and
/// refused, or end the connection for `NBD_OPT_EXPORT_NAME`, which cannot be refused.
pub const MAX_OPTION_DATA: u32 = 16 << 10;
/// The longest export name, in bytes (the protocol's limit for strings).
pub const MAX_NAME: u32 = 4096;
/// Recycled write buffers kept for reuse ([`Session::recycle`]), at most.
const SPARE_BUFFERS: usize = 16;
/// Bytes of recycled write buffers kept, at most.
const SPARE_BYTES: usize = 64 << 20;

/// The size constraints a server advertises with `NBD_INFO_BLOCK_SIZE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    min: u32,
    preferred: u32,
    max_payload: u32,
}

impl BlockSizes {
    /// The protocol's defaults, which every client may assume without asking: any
    /// alignment, 4 KiB preferred, 32 MiB the largest read or write.
    pub const DEFAULT: BlockSizes = BlockSizes {
        min: 1,
        preferred: 4096,
        max_payload: 32 << 20,
    };

    /// Sizes that obey the protocol: `min` a power of two up to 64 KiB, `preferred` a power
    /// of two at least `min` and 512, `max_payload` at least `preferred`.
    pub fn new(min: u32, preferred: u32, max_payload: u32) -> Option<BlockSizes> {
        let ok = min.is_power_of_two()
            && min <= 1 << 16
            && preferred.is_power_of_two()
            && preferred >= min.max(512)
            && max_payload >= preferred;
        ok.then_some(BlockSizes {
            min,
            preferred,
            max_payload,
        })
    }

    /// Smallest addressable length and alignment.
    pub fn min(self) -> u32 {
        self.min
    }

    /// The size at which aligned requests are efficient.
    pub fn preferred(self) -> u32 {
        self.preferred
    }

    /// The largest `NBD_CMD_READ` or `NBD_CMD_WRITE` accepted.
    pub fn max_payload(self) -> u32 {
        self.max_payload
    }
}

impl Default for BlockSizes {
    fn default() -> BlockSizes {
        BlockSizes::DEFAULT
    }
}

/// The one export a server offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Export {
    /// Its name; a client asking for the empty name (the default export) gets it too.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Whether writes, trims and write-zeroes are refused (`NBD_FLAG_READ_ONLY`).
    pub read_only: bool,
    /// The advertised size constraints.
    pub block_sizes: BlockSizes,
}

impl Export {
    /// An export with the default size constraints.
    pub fn new(name: impl Into<String>, size: u64, read_only: bool) -> Export {
        Export {
            name: name.into(),
            size,
            read_only,
            block_sizes: BlockSizes::DEFAULT,
        }
    }

    /// The transmission flags sent to the client. `NBD_FLAG_CAN_MULTI_CONN` is set because
    /// a [`crate::BlockDevice`]'s flush makes every completed write durable, whichever
    /// connection made it, and all connections share one device.
    pub fn transmission_flags(&self) -> u16 {
        let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN;
        if self.read_only {
            f |= FLAG_READ_ONLY;
        } else {
            f |= FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
        }
        f
    }

    fn answers_to(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }
}

/// Why a session ended the connection (a hard disconnect): the client broke the protocol
/// in a way that cannot be answered with an error reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The client set flags this server does not know or did not offer.
    #[error("the client sent unknown handshake flags {0:#x}")]
    UnknownClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    #[error("bad option magic {0:#018x} (expected IHAVEOPT)")]
    BadOptionMagic(u64),
    /// `NBD_OPT_EXPORT_NAME` named an export this server does not have (that option has no
    /// error reply: the protocol says to close).
    #[error("NBD_OPT_EXPORT_NAME asked for the unknown export {0:?}")]
    UnknownExport(String),
    /// `NBD_OPT_EXPORT_NAME` with a name longer than the protocol allows.
    #[error("NBD_OPT_EXPORT_NAME with a {0}-byte name (at most 4096)")]
    ExportNameTooLong(u32),
    /// A request did not start with the request magic.
    #[error("bad request magic {0:#010x} (expected 0x25609513)")]
    BadRequestMagic(u32),
    /// The input ended in the middle of a message.
    #[error("the connection ended inside {during}: {received} of {expected} bytes arrived")]
    Truncated {
        /// What was being received.
        during: String,
        /// Bytes of it that arrived.
        received: u64,
        /// Bytes it needed.
        expected: u64,
    },
}

/// What a request asks of the disk.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ`: reply with `len` bytes.
    Read {
        /// Bytes to read.
        len: u32,
    },
    /// `NBD_CMD_WRITE`, its whole payload received.
    Write {
        /// The payload (hand it back with [`Session::recycle`] when done).
        data: Vec<u8>,
    },
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim {
        /// Bytes to discard.
        len: u32,
    },
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes {
        /// Bytes to zero.
        len: u32,
        /// `NBD_CMD_FLAG_NO_HOLE`: the range must stay allocated.
        no_hole: bool,
    },
}

/// A request that is valid for the export (in range, allowed, flags understood): the
/// driver runs it and replies with [`simple_reply`] and the cookie.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// The client's cookie (the protocol's older name: handle), echoed in the reply.
    pub cookie: u64,
    /// First byte.
    pub offset: u64,
    /// What to do.
    pub command: Command,
    /// `NBD_CMD_FLAG_FUA`: the reply must wait until the data is durable.
    pub fua: bool,
}

/// What the driver must act on.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// Negotiation ended and transmission began (after `NBD_OPT_GO` or
    /// `NBD_OPT_EXPORT_NAME`).
    Transmission,
    /// Run this on the disk and reply.
    Request(Request),
    /// The client ended the session cleanly (`NBD_OPT_ABORT` or `NBD_CMD_DISC`): send what
    /// is queued, finish the requests in flight, close.
    Disconnect,
    /// The client broke the protocol: send what is queued and close at once.
    Close(ProtocolError),
}

enum Phase {
    ClientFlags,
    OptionHeader,
    OptionData {
        option: u32,
        len: usize,
    },
    /// Discards an option's data, then replies (or aborts).
    SkipOption {
        option: u32,
        remaining: u64,
        then: AfterSkip,
    },
    RequestHeader,
    Payload {
        cookie: u64,
        offset: u64,
        fua: bool,
        data: Vec<u8>,
        filled: usize,
    },
    /// Discards a refused write's payload, then sends the error reply.
    Discard {
        cookie: u64,
        remaining: u32,
        error: u32,
    },
    Done,
}

#[derive(Clone, Copy)]
enum AfterSkip {
    Reply(u32, &'static str),
    Abort,
}

/// One client connection, from the server's greeting to its end. See the module
/// documentation.
pub struct Session {
    export: Export,
    phase: Phase,
    /// A fixed-size header being assembled.
    head: [u8; REQUEST_HEADER_LEN],
    head_len: usize,
    /// An option's data being assembled.
    option_data: Vec<u8>,
    out: Vec<u8>,
    events: VecDeque<Event>,
    no_zeroes: bool,
    spare: Vec<Vec<u8>>,
}

impl Session {
    /// A session for a newly connected client; the greeting is already queued in the
    /// output.
    pub fn new(export: Export) -> Session {
        let mut out = Vec::with_capacity(18);
        out.extend_from_slice(&NBD_MAGIC.to_be_bytes());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        Session {
            export,
            phase: Phase::ClientFlags,
            head: [0; REQUEST_HEADER_LEN],
            head_len: 0,
            option_data: Vec::new(),
            out,
            events: VecDeque::new(),
            no_zeroes: false,
            spare: Vec::new(),
        }
    }

    /// The export served.
    pub fn export(&self) -> &Export {
        &self.export
    }

    /// Whether the session is in the transmission phase (or was, when it ended there).
    pub fn in_transmission(&self) -> bool {
        matches!(
            self.phase,
            Phase::RequestHeader | Phase::Payload { .. } | Phase::Discard { .. }
        )
    }

    /// Whether the session has ended (after [`Event::Disconnect`] or [`Event::Close`]):
    /// further input is ignored.
    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// Takes the bytes to send to the client, in order.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// Whether there are bytes to send.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Hands back a write payload's buffer for reuse by a later write.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        let kept: usize = self.spare.iter().map(Vec::capacity).sum();
        if self.spare.len() < SPARE_BUFFERS
            && buf.capacity() > 0
            && kept + buf.capacity() <= SPARE_BYTES
        {
            self.spare.push(buf);
        }
    }

    /// While a write's payload is being received: the part of its buffer still to fill,
    /// so a driver can read a large payload straight into it (then call
    /// [`Session::payload_received`]) instead of through [`Session::handle_input`].
    pub fn payload_buffer(&mut self) -> Option<&mut [u8]> {
        match &mut self.phase {
            Phase::Payload { data, filled, .. } => Some(&mut data[*filled..]),
            _ => None,
        }
    }

    /// Records that `n` bytes were written into [`Session::payload_buffer`].
    ///
    /// # Panics
    /// If `n` is larger than that buffer (a driver bug, not a client's).
    pub fn payload_received(&mut self, n: usize) {
        if let Phase::Payload { data, filled, .. } = &mut self.phase {
            assert!(
                *filled + n <= data.len(),
                "more payload than the buffer holds"
            );
            *filled += n;
            if *filled == data.len() {
                self.finish_payload();
            }
        } else {
            assert_eq!(n, 0, "payload_received outside a payload");
        }
    }

    /// The input ended (the client closed its side). `Err` if that cut a message short;
    /// either way the session is done, and a write whose payload was cut is never emitted.
    pub fn end_of_input(&mut self) -> Result<(), ProtocolError> {
        let cut = |during: String, received: usize, expected: usize| ProtocolError::Truncated {
            during,
            received: received as u64,
            expected: expected as u64,
        };
        let phase = std::mem::replace(&mut self.phase, Phase::Done);
        let r = match phase {
            Phase::Done => Ok(()),
            Phase::OptionHeader | Phase::RequestHeader if self.head_len == 0 => Ok(()),
            Phase::ClientFlags => Err(cut("the client flags".into(), self.head_len, 4)),
            Phase::OptionHeader => Err(cut("an option header".into(), self.head_len, 16)),
            Phase::RequestHeader => Err(cut(
                "a request header".into(),
                self.head_len,
                REQUEST_HEADER_LEN,
            )),
            Phase::OptionData { option, len } => Err(cut(
                format!("the data of option {option}"),
                self.option_data.len(),
                len,
            )),
            Phase::SkipOption {
                option, remaining, ..
            } => Err(ProtocolError::Truncated {
                during: format!("the data of option {option}"),
                received: 0,
                expected: remaining,
            }),
            Phase::Payload {
                cookie,
                offset,
                data,
                filled,
                ..
            } => Err(cut(
                format!(
                    "the payload of a {}-byte write at offset {offset} (cookie {cookie:#x}), \
                     which was not written",
                    data.len()
                ),
                filled,
                data.len(),
            )),
            Phase::Discard { remaining, .. } => Err(ProtocolError::Truncated {
                during: "the payload of a refused write".into(),
                received: 0,
                expected: u64::from(remaining),
            }),
        };
        self.head_len = 0;
        r
    }

    /// Consumes bytes from the client (all of them; what a message still lacks is kept
    /// for the next call). Events and output are queued.
    pub fn handle_input(&mut self, mut input: &[u8]) {
        while !input.is_empty() {
            match &mut self.phase {
                Phase::Done => return,
                Phase::ClientFlags => {
                    if self.fill_head(4, &mut input) {
                        self.client_flags();
                    }
                }
                Phase::OptionHeader => {
                    if self.fill_head(16, &mut input) {
                        self.option_header();
                    }
                }
                Phase::OptionData { option, len } => {
                    let (option, len) = (*option, *len);
                    let n = (len - self.option_data.len()).min(input.len());
                    self.option_data.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if self.option_data.len() == len {
                        self.phase = Phase::OptionHeader;
                        let data = std::mem::take(&mut self.option_data);
                        self.option(option, &data);
                        self.option_data = data;
                        self.option_data.clear();
                    }
                }
                Phase::SkipOption {
                    option,
                    remaining,
                    then,
                } => {
                    let n = (*remaining).min(input.len() as u64);
                    *remaining -= n;
                    input = &input[n as usize..];
                    if *remaining == 0 {
                        let (option, then) = (*option, *then);
                        self.phase = Phase::OptionHeader;
                        self.after_skip(option, then);
                    }
                }
                Phase::RequestHeader => {
                    if self.fill_head(REQUEST_HEADER_LEN, &mut input) {
                        self.request_header();
                    }
                }
                Phase::Payload { data, filled, .. } => {
                    let n = (data.len() - *filled).min(input.len());
                    data[*filled..*filled + n].copy_from_slice(&input[..n]);
                    *filled += n;
                    input = &input[n..];
                    if *filled == data.len() {
                        self.finish_payload();
                    }
                }
                Phase::Discard {
                    cookie,
                    remaining,
                    error,
                } => {
                    let n = (*remaining as usize).min(input.len());
                    *remaining -= n as u32;
                    input = &input[n..];
                    if *remaining == 0 {
                        let (cookie, error) = (*cookie, *error);
                        self.phase = Phase::RequestHeader;
                        self.out.extend_from_slice(&simple_reply(cookie, error));
                    }
                }
            }
        }
    }

    /// Appends input to the header being assembled; true once it holds `need` bytes (and
    /// then resets it for the next header).
    fn fill_head(&mut self, need: usize, input: &mut &[u8]) -> bool {
        let n = (need - self.head_len).min(input.len());
        self.head[self.head_len..self.head_len + n].copy_from_slice(&input[..n]);
        self.head_len += n;
        *input = &input[n..];
        if self.head_len == need {
            self.head_len = 0;
            true
        } else {
            false
        }
    }

    fn close(&mut self, e: ProtocolError) {
        self.phase = Phase::Done;
        self.events.push_back(Event::Close(e));
    }

    fn client_flags(&mut self) {
        let flags = u32::from_be_bytes(self.head[..4].try_into().unwrap());
        if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return self.close(ProtocolError::UnknownClientFlags(flags));
        }
        // A client without FLAG_C_FIXED_NEWSTYLE only ever sends NBD_OPT_EXPORT_NAME, which
        // is answered the same way in both dialects; the protocol lets a server honour
        // fixed newstyle regardless.
        self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
        self.phase = Phase::OptionHeader;
    }

    fn option_header(&mut self) {
        let h = &self.head;
        let magic = u64::from_be_bytes(h[0..8].try_into().unwrap());
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        if magic != IHAVEOPT {
            return self.close(ProtocolError::BadOptionMagic(magic));
        }
        let skip = |then| Phase::SkipOption {
            option,
            remaining: u64::from(len),
            then,
        };
        self.phase = match option {
            OPT_EXPORT_NAME if len > MAX_NAME => {
                return self.close(ProtocolError::ExportNameTooLong(len));
            }
            OPT_ABORT => skip(AfterSkip::Abort),
            OPT_LIST if len > 0 => skip(AfterSkip::Reply(
                REP_ERR_INVALID,
                "NBD_OPT_LIST takes no data",
            )),
            OPT_EXPORT_NAME | OPT_LIST | OPT_INFO | OPT_GO if len <= MAX_OPTION_DATA => {
                Phase::OptionData {
                    option,
                    len: len as usize,
                }
            }
            OPT_INFO | OPT_GO => skip(AfterSkip::Reply(
                REP_ERR_TOO_BIG,
                "the option's data is too large",
            )),
            OPT_STARTTLS => skip(AfterSkip::Reply(
                REP_ERR_UNSUP,
                "this server does not offer TLS",
            )),
            OPT_STRUCTURED_REPLY => skip(AfterSkip::Reply(
                REP_ERR_UNSUP,
                "this server sends simple replies only",
            )),
            _ => skip(AfterSkip::Reply(REP_ERR_UNSUP, "option not supported")),
        };
        if let Phase::OptionData { len: 0, .. } | Phase::SkipOption { remaining: 0, .. } =
            self.phase
        {
            // Nothing more to read for it: act now.
            match std::mem::replace(&mut self.phase, Phase::OptionHeader) {
                Phase::OptionData { option, .. } => self.option(option, &[]),
                Phase::SkipOption { option, then, .. } => self.after_skip(option, then),
                _ => unreachable!(),
            }
        }
    }

    fn after_skip(&mut self, option: u32, then: AfterSkip) {
        match then {
            AfterSkip::Reply(rep, msg) => self.option_reply(option, rep, msg.as_bytes()),
            AfterSkip::Abort => {
                self.option_reply(option, REP_ACK, &[]);
                self.phase = Phase::Done;
                self.events.push_back(Event::Disconnect);
            }
        }
    }

    fn option_reply(&mut self, option: u32, rep: u32, data: &[u8]) {
        self.option_reply_parts(option, rep, &[data]);
    }

    fn option_reply_parts(&mut self, option: u32, rep: u32, parts: &[&[u8]]) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        self.out
            .extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        self.out.extend_from_slice(&option.to_be_bytes());
        self.out.extend_from_slice(&rep.to_be_bytes());
        self.out.extend_from_slice(&(len as u32).to_be_bytes());
        for p in parts {
            self.out.extend_from_slice(p);
        }
    }

    /// A complete option with its data (the phase is already `OptionHeader`).
    fn option(&mut self, option: u32, data: &[u8]) {
        match option {
            OPT_EXPORT_NAME => {
                if !self.export.answers_to(data) {
                    let name = String::from_utf8_lossy(data).into_owned();
                    return self.close(ProtocolError::UnknownExport(name));
                }
                self.out.extend_from_slice(&self.export.size.to_be_bytes());
                self.out
                    .extend_from_slice(&self.export.transmission_flags().to_be_bytes());
                if !self.no_zeroes {
                    self.out.extend_from_slice(&[0u8; 124]);
                }
                self.start_transmission();
            }
            OPT_LIST => {
                let name = self.export.name.clone().into_bytes();
                let len = (name.len() as u32).to_be_bytes();
                self.option_reply_parts(option, REP_SERVER, &[&len, &name]);
                self.option_reply(option, REP_ACK, &[]);
            }
            OPT_INFO | OPT_GO => self.info_or_go(option, data),
            _ => unreachable!("only buffered options reach here"),
        }
    }

    fn info_or_go(&mut self, option: u32, data: &[u8]) {
        let Some((name, requests)) = parse_info_request(data) else {
            return self.option_reply(
                option,
                REP_ERR_INVALID,
                b"malformed NBD_OPT_INFO/NBD_OPT_GO data",
            );
        };
        if !self.export.answers_to(name) {
            let msg = format!(
                "no export named {:?} (this server exports {:?})",
                String::from_utf8_lossy(name),
                self.export.name
            );
            return self.option_reply(option, REP_ERR_UNKNOWN, msg.as_bytes());
        }
        let mut info = [0u8; 14];
        info[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
        info[2..10].copy_from_slice(&self.export.size.to_be_bytes());
        info[10..12].copy_from_slice(&self.export.transmission_flags().to_be_bytes());
        self.option_reply(option, REP_INFO, &info[..12]);
        let asked = |what: u16| requests.chunks_exact(2).any(|r| r == what.to_be_bytes());
        if asked(INFO_NAME) {
            let name = self.export.name.clone();
            self.option_reply_parts(
                option,
                REP_INFO,
                &[&INFO_NAME.to_be_bytes(), name.as_bytes()],
            );
        }
        if asked(INFO_BLOCK_SIZE) {
            let b = self.export.block_sizes;
            info[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
            info[2..6].copy_from_slice(&b.min.to_be_bytes());
            info[6..10].copy_from_slice(&b.preferred.to_be_bytes());
            info[10..14].copy_from_slice(&b.max_payload.to_be_bytes());
            self.option_reply(option, REP_INFO, &info);
        }
        self.option_reply(option, REP_ACK, &[]);
        if option == OPT_GO {
            self.start_transmission();
        }
    }

    fn start_transmission(&mut self) {
        self.phase = Phase::RequestHeader;
        self.events.push_back(Event::Transmission);
    }

    fn request_header(&mut self) {
        let h = &self.head;
        let magic = u32::from_be_bytes(h[0..4].try_into().unwrap());
        let flags = u16::from_be_bytes(h[4..6].try_into().unwrap());
        let kind = u16::from_be_bytes(h[6..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let offset = u64::from_be_bytes(h[16..24].try_into().unwrap());
        let len = u32::from_be_bytes(h[24..28].try_into().unwrap());
        if magic != REQUEST_MAGIC {
            return self.close(ProtocolError::BadRequestMagic(magic));
        }
        if kind == CMD_DISC {
            self.phase = Phase::Done;
            self.events.push_back(Event::Disconnect);
            return;
        }
        let fua = flags & CMD_FLAG_FUA != 0;
        let allowed = match kind {
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            _ => CMD_FLAG_FUA,
        };
        let command = match self.check(kind, flags & !allowed, offset, len) {
            Err(error) => {
                if kind == CMD_WRITE && len > 0 {
                    // The payload follows regardless: read past it without keeping it.
                    self.phase = Phase::Discard {
                        cookie,
                        remaining: len,
                        error,
                    };
                } else {
                    self.out.extend_from_slice(&simple_reply(cookie, error));
                }
                return;
            }
            Ok(()) => match kind {
                CMD_READ => Command::Read { len },
                CMD_WRITE => {
                    let data = self.buffer(len as usize);
                    if len > 0 {
                        self.phase = Phase::Payload {
                            cookie,
                            offset,
                            fua,
                            data,
                            filled: 0,
                        };
                        return;
                    }
                    Command::Write { data }
                }
                CMD_FLUSH => Command::Flush,
                CMD_TRIM => Command::Trim { len },
                CMD_WRITE_ZEROES => Command::WriteZeroes {
                    len,
                    no_hole: flags & CMD_FLAG_NO_HOLE != 0,
                },
                _ => unreachable!("check refuses unknown commands"),
            },
        };
        self.events.push_back(Event::Request(Request {
            cookie,
            offset,
            command,
            fua,
        }));
    }

    /// Whether a request can run, or the NBD error to reply with.
    fn check(&self, kind: u16, bad_flags: u16, offset: u64, len: u32) -> Result<(), u32> {
        let e = &self.export;
        let in_range = offset
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= e.size);
        let min = u64::from(e.block_sizes.min);
        let aligned = offset.is_multiple_of(min) && u64::from(len).is_multiple_of(min);
        let writes = matches!(kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        match kind {
            CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_WRITE_ZEROES => {}
            _ => return Err(EINVAL),
        }
        if bad_flags != 0 {
            return Err(EINVAL);
        }
        if writes && e.read_only {
            return Err(EPERM);
        }
        if kind == CMD_FLUSH {
            // Offset and length are reserved (zero); nothing depends on them.
            return Ok(());
        }
        if matches!(kind, CMD_READ | CMD_WRITE) && len > e.block_sizes.max_payload {
            return Err(EINVAL);
        }
        if !in_range {
            // The protocol asks for ENOSPC when a write reaches past the end.
            return Err(if matches!(kind, CMD_WRITE | CMD_WRITE_ZEROES) {
                ENOSPC
            } else {
                EINVAL
            });
        }
        if !aligned {
            return Err(EINVAL);
        }
        Ok(())
    }

    /// A `len`-byte buffer, recycled if one is at hand.
    fn buffer(&mut self, len: usize) -> Vec<u8> {
        let pick = self
            .spare
            .iter()
            .position(|b| b.capacity() >= len)
            .or_else(|| (!self.spare.is_empty()).then_some(0));
        let mut buf = match pick {
            Some(i) => self.spare.swap_remove(i),
            None => Vec::new(),
        };
        if buf.len() >= len {
            buf.truncate(len);
        } else {
            buf.resize(len, 0);
        }
        buf
    }

    fn finish_payload(&mut self) {
        if let Phase::Payload {
            cookie,
            offset,
            fua,
            data,
            ..
        } = std::mem::replace(&mut self.phase, Phase::RequestHeader)
        {
            self.events.push_back(Event::Request(Request {
                cookie,
                offset,
                command: Command::Write { data },
                fua,
            }));
        }
    }
}

/// The export name and the raw list of information requests of `NBD_OPT_INFO` /
/// `NBD_OPT_GO` data, if it is well formed.
fn parse_info_request(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let rest = &data[4..];
    if name_len > MAX_NAME as usize || rest.len() < name_len + 2 {
        return None;
    }
    let (name, rest) = rest.split_at(name_len);
    let n = u16::from_be_bytes(rest[0..2].try_into().ok()?) as usize;
    let requests = &rest[2..];
    (requests.len() == 2 * n).then_some((name, requests))
}
