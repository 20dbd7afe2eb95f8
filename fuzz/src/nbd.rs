//! Target `nbd`: the NBD server's sans-IO session (`disk::nbd::proto::Session`), the
//! handshake and the transmission-phase request parser, from the first byte a client
//! sends to the end of its input.
//!
//! The first bytes choose the export (size, read-only, block size constraints, name);
//! the rest is the client's byte stream. It is fed to one session at once and to another
//! in pieces of fuzzed sizes, where write payloads are sometimes written straight into
//! [`Session::payload_buffer`] as the blocking driver does, and write buffers are handed
//! back for reuse.
//!
//! Checks: nothing panics; both sessions produce the same events and the same bytes
//! (how the input is cut never matters); every request that reaches the driver is in the
//! export's range, aligned to its minimum block size, within its largest payload, and not
//! a write on a read-only export, and a write carries exactly its payload; nothing
//! follows the end of the session.

use disk::nbd::proto::{BlockSizes, Command, Event, Session};
use disk::nbd::Export;

use crate::input::{chunks, Input};

/// What one session did, for comparing two runs.
#[derive(Debug, PartialEq, Eq)]
struct Run {
    events: Vec<String>,
    output: Vec<u8>,
    end: String,
}

fn export(inp: &mut Input) -> Export {
    let cfg = inp.u8();
    let size = match cfg & 3 {
        0 => u64::from(inp.u32()),
        1 => u64::from(inp.u16()) * 512,
        2 => u64::MAX - u64::from(inp.u16()),
        _ => inp.u64(),
    };
    let name = match (cfg >> 2) & 3 {
        0 => "",
        1 => "vda",
        _ => "a-longer-export-name",
    };
    let mut e = Export::new(name, size, cfg & 16 != 0);
    // Payload limits stay small so that a run allocates little.
    let min = 1u32 << (inp.u8() % 17);
    let preferred = min.max(512) << (inp.u8() % 4);
    let max_payload = preferred + u32::from(inp.u16()) * 4;
    if let Some(b) = BlockSizes::new(min, preferred, max_payload.min(1 << 18)) {
        e.block_sizes = b;
    }
    e
}

fn run(export: &Export, pieces: &[&[u8]], direct: bool) -> Run {
    let mut s = Session::new(export.clone());
    let mut r = Run {
        events: Vec::new(),
        output: Vec::new(),
        end: String::new(),
    };
    let mut done = false;
    for (i, piece) in pieces.iter().enumerate() {
        let mut piece: &[u8] = piece;
        if direct && i % 2 == 1 {
            // As the driver does for large writes: read straight into the buffer.
            if let Some(buf) = s.payload_buffer() {
                let n = buf.len().min(piece.len());
                buf[..n].copy_from_slice(&piece[..n]);
                s.payload_received(n);
                piece = &piece[n..];
            }
        }
        s.handle_input(piece);
        r.output.extend(s.take_output());
        assert!(!s.has_output());
        while let Some(e) = s.poll_event() {
            assert!(!done, "event after the session ended: {e:?}");
            if matches!(e, Event::Disconnect | Event::Close(_)) {
                done = true;
                assert!(s.is_done());
            }
            check_event(export, &e);
            r.events.push(format!("{e:?}"));
            if let Event::Request(req) = e {
                if let Command::Write { data } = req.command {
                    s.recycle(data);
                }
            }
        }
    }
    r.end = format!("{:?}", s.end_of_input());
    assert!(s.is_done());
    assert!(s.poll_event().is_none());
    r.output.extend(s.take_output());
    r
}

fn check_event(export: &Export, e: &Event) {
    let Event::Request(req) = e else {
        return;
    };
    let b = export.block_sizes;
    let len = match &req.command {
        Command::Flush => return,
        Command::Read { len } => {
            assert!(*len <= b.max_payload());
            u64::from(*len)
        }
        Command::Write { data } => {
            assert!(data.len() <= b.max_payload() as usize);
            data.len() as u64
        }
        Command::Trim { len } | Command::WriteZeroes { len, .. } => u64::from(*len),
    };
    let writes = !matches!(req.command, Command::Read { .. });
    assert!(!(writes && export.read_only), "write on a read-only export");
    let end = req.offset.checked_add(len).expect("range overflows");
    assert!(end <= export.size, "request past the end: {req:?}");
    let min = u64::from(b.min());
    assert!(
        req.offset % min == 0 && len % min == 0,
        "unaligned: {req:?}"
    );
}

/// The target.
pub fn nbd(data: &[u8]) {
    let mut inp = Input::new(data);
    let export = export(&mut inp);
    let split = inp.u8();
    let stream = inp.rest();
    let whole = run(&export, &[stream], false);
    let pieces = chunks(stream, u64::from(split), 1 + usize::from(split) * 2);
    let cut = run(&export, &pieces, split & 1 != 0);
    assert_eq!(whole, cut, "cutting the input changed what the session did");
}

/// Seeds: a client that negotiates with `NBD_OPT_INFO`, `NBD_OPT_LIST` and `NBD_OPT_GO`
/// (or the old `NBD_OPT_EXPORT_NAME`), then reads, writes, flushes, trims, zeroes and
/// disconnects.
pub fn seeds() -> Vec<Vec<u8>> {
    use disk::nbd::wire::*;
    let opt = |out: &mut Vec<u8>, option: u32, data: &[u8]| {
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
    };
    let req = |out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, offset: u64, len: u32| {
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
    };
    let mut seeds = Vec::new();
    for (cfg, go) in [(0x04u8, true), (0x00, false), (0x14, true)] {
        // Export: cfg, size (u16 * 512 => 1 MiB), min, preferred, max_payload; split.
        let mut s = vec![cfg | 1, 0x00, 0x08, 9, 0, 0x00, 0x04, 7];
        s.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        let mut info = 3u32.to_be_bytes().to_vec();
        info.extend_from_slice(b"vda");
        info.extend_from_slice(&2u16.to_be_bytes());
        info.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        info.extend_from_slice(&INFO_NAME.to_be_bytes());
        opt(&mut s, OPT_LIST, &[]);
        opt(&mut s, OPT_INFO, &info);
        opt(&mut s, OPT_STRUCTURED_REPLY, &[]);
        if go {
            opt(&mut s, OPT_GO, &info);
        } else {
            opt(&mut s, OPT_EXPORT_NAME, b"");
        }
        req(&mut s, 0, CMD_READ, 1, 0, 4096);
        req(&mut s, CMD_FLAG_FUA, CMD_WRITE, 2, 8192, 1024);
        s.extend(std::iter::repeat_n(0xab, 1024));
        req(&mut s, 0, CMD_FLUSH, 3, 0, 0);
        req(&mut s, 0, CMD_TRIM, 4, 4096, 4096);
        req(&mut s, CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 5, 0, 512);
        req(&mut s, 0, CMD_READ, 6, 1 << 40, 512);
        req(&mut s, 0, CMD_DISC, 7, 0, 0);
        seeds.push(s);
    }
    seeds
}
