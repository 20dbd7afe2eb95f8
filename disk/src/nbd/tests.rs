//! The NBD state machine in memory (every handshake path, option, command and refusal,
//! truncated and random input), and the driver over real sockets with a small client.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use proptest::prelude::*;

use super::proto::*;
use super::wire::*;
use super::{Server, ServerConfig};
use crate::device::{check_range, BlockDevice, DiskError};

const SIZE: u64 = 1 << 20;

fn export() -> Export {
    Export::new("vda", SIZE, false)
}

fn u16b(v: u16) -> [u8; 2] {
    v.to_be_bytes()
}
fn u32b(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}
fn u64b(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&u64b(IHAVEOPT));
    v.extend_from_slice(&u32b(opt));
    v.extend_from_slice(&u32b(data.len() as u32));
    v.extend_from_slice(data);
    v
}

fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&u32b(name.len() as u32));
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&u16b(infos.len() as u16));
    for i in infos {
        v.extend_from_slice(&u16b(*i));
    }
    v
}

fn request(flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&u32b(REQUEST_MAGIC));
    v.extend_from_slice(&u16b(flags));
    v.extend_from_slice(&u16b(kind));
    v.extend_from_slice(&u64b(cookie));
    v.extend_from_slice(&u64b(offset));
    v.extend_from_slice(&u32b(len));
    v
}

/// Option replies in `out`: (option, reply type, data).
fn replies(mut out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut r = Vec::new();
    while !out.is_empty() {
        assert!(out.len() >= 20, "short option reply: {out:?}");
        assert_eq!(
            u64::from_be_bytes(out[0..8].try_into().unwrap()),
            OPTION_REPLY_MAGIC
        );
        let opt = u32::from_be_bytes(out[8..12].try_into().unwrap());
        let rep = u32::from_be_bytes(out[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
        r.push((opt, rep, out[20..20 + len].to_vec()));
        out = &out[20 + len..];
    }
    r
}

/// Simple replies in `out` (none carrying data): (error, cookie).
fn simple_replies(mut out: &[u8]) -> Vec<(u32, u64)> {
    let mut r = Vec::new();
    while !out.is_empty() {
        assert_eq!(
            u32::from_be_bytes(out[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        r.push((
            u32::from_be_bytes(out[4..8].try_into().unwrap()),
            u64::from_be_bytes(out[8..16].try_into().unwrap()),
        ));
        out = &out[16..];
    }
    r
}

fn events(s: &mut Session) -> Vec<Event> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

/// A session past the greeting and the client flags.
fn negotiating(export: Export, client_flags: u32) -> Session {
    let mut s = Session::new(export);
    let greeting = s.take_output();
    assert_eq!(greeting.len(), 18);
    s.handle_input(&u32b(client_flags));
    assert!(events(&mut s).is_empty());
    s
}

/// A session in transmission (after NBD_OPT_GO), output and events drained.
fn transmitting(export: Export) -> Session {
    let mut s = negotiating(export, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    s.handle_input(&option(OPT_GO, &info_data("", &[])));
    assert_eq!(events(&mut s), vec![Event::Transmission]);
    s.take_output();
    assert!(s.in_transmission());
    s
}

#[test]
fn the_greeting_offers_fixed_newstyle_without_zeroes() {
    let mut s = Session::new(export());
    let out = s.take_output();
    assert_eq!(&out[0..8], b"NBDMAGIC");
    assert_eq!(&out[8..16], b"IHAVEOPT");
    assert_eq!(&out[16..18], &u16b(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    assert!(s.poll_event().is_none());
}

#[test]
fn unknown_client_flags_close_the_connection() {
    let mut s = Session::new(export());
    s.take_output();
    s.handle_input(&u32b(FLAG_C_FIXED_NEWSTYLE | 4));
    assert_eq!(
        events(&mut s),
        vec![Event::Close(ProtocolError::UnknownClientFlags(5))]
    );
    assert!(s.is_done());
    // Anything after is ignored.
    s.handle_input(&option(OPT_GO, &info_data("", &[])));
    assert!(events(&mut s).is_empty() && !s.has_output());
}

#[test]
fn go_describes_the_export_and_starts_transmission() {
    for name in ["", "vda"] {
        let mut s = negotiating(export(), FLAG_C_FIXED_NEWSTYLE);
        s.handle_input(&option(OPT_GO, &info_data(name, &[])));
        let r = replies(&s.take_output());
        assert_eq!(r.len(), 2, "{r:?}");
        let (opt, rep, data) = &r[0];
        assert_eq!((*opt, *rep), (OPT_GO, REP_INFO));
        assert_eq!(data.len(), 12);
        assert_eq!(&data[0..2], &u16b(INFO_EXPORT));
        assert_eq!(&data[2..10], &u64b(SIZE));
        let flags = u16::from_be_bytes(data[10..12].try_into().unwrap());
        let want = FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES
            | FLAG_CAN_MULTI_CONN;
        assert_eq!(flags, want);
        assert_eq!((r[1].0, r[1].1, r[1].2.len()), (OPT_GO, REP_ACK, 0));
        assert_eq!(events(&mut s), vec![Event::Transmission]);
        assert!(s.in_transmission());
    }
}

#[test]
fn info_answers_block_size_and_name_when_asked_and_stays_in_negotiation() {
    let mut s = negotiating(export(), FLAG_C_FIXED_NEWSTYLE);
    s.handle_input(&option(
        OPT_INFO,
        &info_data("", &[INFO_BLOCK_SIZE, INFO_NAME, 77]),
    ));
    let r = replies(&s.take_output());
    let types: Vec<u32> = r.iter().map(|x| x.1).collect();
    assert_eq!(types, vec![REP_INFO, REP_INFO, REP_INFO, REP_ACK]);
    let name = r
        .iter()
        .find(|x| x.2.starts_with(&u16b(INFO_NAME)))
        .unwrap();
    assert_eq!(&name.2[2..], b"vda");
    let bs = r
        .iter()
        .find(|x| x.2.starts_with(&u16b(INFO_BLOCK_SIZE)))
        .unwrap();
    assert_eq!(bs.2.len(), 14);
    assert_eq!(&bs.2[2..6], &u32b(1));
    assert_eq!(&bs.2[6..10], &u32b(4096));
    assert_eq!(&bs.2[10..14], &u32b(32 << 20));
    assert!(events(&mut s).is_empty());
    assert!(!s.in_transmission());
    // Then GO with the same question.
    s.handle_input(&option(OPT_GO, &info_data("vda", &[INFO_BLOCK_SIZE])));
    let r = replies(&s.take_output());
    assert_eq!(r.len(), 3);
    assert_eq!(events(&mut s), vec![Event::Transmission]);
}

#[test]
fn unknown_exports_are_refused_and_negotiation_goes_on() {
    let mut s = negotiating(export(), FLAG_C_FIXED_NEWSTYLE);
    s.handle_input(&option(OPT_GO, &info_data("vdb", &[])));
    let r = replies(&s.take_output());
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].1, REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&r[0].2).contains("vdb"));
    assert!(events(&mut s).is_empty());
    s.handle_input(&option(OPT_INFO, &info_data("nope", &[])));
    assert_eq!(replies(&s.take_output())[0].1, REP_ERR_UNKNOWN);
    s.handle_input(&option(OPT_GO, &info_data("vda", &[])));
    assert_eq!(events(&mut s), vec![Event::Transmission]);
}

#[test]
fn malformed_info_requests_are_invalid() {
    let cases: Vec<Vec<u8>> = vec![
        vec![],
        vec![0, 0, 0],
        // Name longer than the data.
        [&u32b(10)[..], b"abc", &u16b(0)].concat(),
        // Count of requests not matching.
        [&u32b(0)[..], &u16b(2), &u16b(INFO_NAME)].concat(),
        // Trailing garbage.
        [&info_data("", &[])[..], &[1]].concat(),
    ];
    for data in cases {
        let mut s = negotiating(export(), FLAG_C_FIXED_NEWSTYLE);
        s.handle_input(&option(OPT_GO, &data));
        let r = replies(&s.take_output());
        assert_eq!(r.len(), 1, "{data:?}");
        assert_eq!(r[0].1, REP_ERR_INVALID, "{data:?}");
        assert!(events(&mut s).is_empty());
    }
}

#[test]
fn list_names_the_one_export() {
    let mut s = negotiating(export(), FLAG_C_FIXED_NEWSTYLE);
    s.handle_input(&option(OPT_LIST, &[]));
    let r = replies(&s.take_output());
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].1, REP_SERVER);
    assert_eq!(r[0].2, [&u32b(3)[..], b"vda"].concat());
    assert_eq!(r[1].1, REP_ACK);
    s.handle_input(&option(OPT_LIST, b"junk"));
    let r = replies(&s.take_output());
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].1, REP_ERR_INVALID);
}

#[test]
fn abort_is_acknowledged_then_disconnects() {
    for data in [&[][..], b"ignored"] {
        let mut s = negotiating(export(), FLAG_C_FIXED_NEWSTYLE);
        s.handle_input(&option(OPT_ABORT, data));
        let r = replies(&s.take_output());
        assert_eq!(r, vec![(OPT_ABORT, REP_ACK, vec![])]);
        assert_eq!(events(&mut s), vec![Event::Disconnect]);
        assert!(s.is_done());
        assert_eq!(s.end_of_input(), Ok(()));
    }
}

#[test]
fn export_name_enters_transmission_with_or_without_zeroes() {
    for (flags, len) in [
        (FLAG_C_FIXED_NEWSTYLE, 10 + 124),
        (FLAG_C_NO_ZEROES, 10),
        (0, 134),
    ] {
        let mut s = negotiating(export(), flags);
        s.handle_input(&option(OPT_EXPORT_NAME, b"vda"));
        let out = s.take_output();
        assert_eq!(out.len(), len);
        assert_eq!(&out[0..8], &u64b(SIZE));
        assert_eq!(
            u16::from_be_bytes(out[8..10].try_into().unwrap()),
            export().transmission_flags()
        );
        assert!(out[10..].iter().all(|&b| b == 0));
        assert_eq!(events(&mut s), vec![Event::Transmission]);
    }
    let mut s = negotiating(export(), FLAG_C_FIXED_NEWSTYLE);
    s.handle_input(&option(OPT_EXPORT_NAME, b""));
    assert_eq!(events(&mut s), vec![Event::Transmission]);
}

#[test]
fn export_name_of_an_unknown_or_overlong_export_closes() {
    let mut s = negotiating(export(), FLAG_C_FIXED_NEWSTYLE);
    s.handle_input(&option(OPT_EXPORT_NAME, b"other"));
    assert_eq!(
        events(&mut s),
        vec![Event::Close(ProtocolError::UnknownExport("other".into()))]
    );
    assert!(!s.has_output());
    let mut s = negotiating(export(), FLAG_C_FIXED_NEWSTYLE);
    s.handle_input(&option(OPT_EXPORT_NAME, &[b'a'; 5000]));
    assert_eq!(
        events(&mut s),
        vec![Event::Close(ProtocolError::ExportNameTooLong(5000))]
    );
}

#[test]
fn every_other_option_is_unsupported_and_skipped() {
    let mut s = negotiating(export(), FLAG_C_FIXED_NEWSTYLE);
    for (opt, data) in [
        (OPT_STARTTLS, &[][..]),
        (OPT_STRUCTURED_REPLY, &[][..]),
        (4, &[][..]),
        (9, &b"\0\0\0\0\0\0\0\0"[..]),
        (10, &[1u8; 300][..]),
        (0xdead_beef, &[7u8; 3][..]),
    ] {
        s.handle_input(&option(opt, data));
        let r = replies(&s.take_output());
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].0, r[0].1), (opt, REP_ERR_UNSUP));
    }
    assert!(events(&mut s).is_empty());
    s.handle_input(&option(OPT_GO, &info_data("", &[])));
    assert_eq!(events(&mut s), vec![Event::Transmission]);
}

#[test]
fn oversized_option_data_is_skipped_unbuffered_and_refused() {
    let mut s = negotiating(export(), FLAG_C_FIXED_NEWSTYLE);
    let big = MAX_OPTION_DATA + 1;
    let mut head = option(OPT_GO, &[]);
    head[12..16].copy_from_slice(&u32b(big));
    s.handle_input(&head);
    for _ in 0..big / 1000 {
        s.handle_input(&[0u8; 1000]);
    }
    assert!(!s.has_output());
    s.handle_input(&vec![0u8; (big % 1000) as usize]);
    let r = replies(&s.take_output());
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].1, REP_ERR_TOO_BIG);
    s.handle_input(&option(OPT_GO, &info_data("", &[])));
    assert_eq!(events(&mut s), vec![Event::Transmission]);
}

#[test]
fn a_bad_option_magic_closes() {
    let mut s = negotiating(export(), FLAG_C_FIXED_NEWSTYLE);
    let mut o = option(OPT_GO, &info_data("", &[]));
    o[0] ^= 1;
    s.handle_input(&o);
    assert!(matches!(
        events(&mut s)[..],
        [Event::Close(ProtocolError::BadOptionMagic(_))]
    ));
}

#[test]
fn reads_and_writes_become_requests_also_one_byte_at_a_time() {
    let mut input = request(0, CMD_READ, 1, 4096, 512);
    input.extend(request(CMD_FLAG_FUA, CMD_WRITE, 2, 100, 5));
    input.extend_from_slice(b"hello");
    input.extend(request(0, CMD_READ, 3, 0, 0));
    let want = vec![
        Event::Request(Request {
            cookie: 1,
            offset: 4096,
            command: Command::Read { len: 512 },
            fua: false,
        }),
        Event::Request(Request {
            cookie: 2,
            offset: 100,
            command: Command::Write {
                data: b"hello".to_vec(),
            },
            fua: true,
        }),
        Event::Request(Request {
            cookie: 3,
            offset: 0,
            command: Command::Read { len: 0 },
            fua: false,
        }),
    ];
    let mut s = transmitting(export());
    s.handle_input(&input);
    assert_eq!(events(&mut s), want);
    let mut s = transmitting(export());
    let mut got = Vec::new();
    for b in &input {
        s.handle_input(std::slice::from_ref(b));
        got.extend(events(&mut s));
    }
    assert_eq!(got, want);
    assert!(!s.has_output());
}

#[test]
fn flush_trim_and_write_zeroes_with_their_flags() {
    let mut s = transmitting(export());
    let mut input = request(0, CMD_FLUSH, 1, 0, 0);
    input.extend(request(CMD_FLAG_FUA, CMD_TRIM, 2, 4096, 8192));
    input.extend(request(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 3, 0, 4096));
    input.extend(request(CMD_FLAG_FUA, CMD_WRITE_ZEROES, 4, 1, 2));
    // FUA on a read is accepted (clients are known to set it) and means nothing.
    input.extend(request(CMD_FLAG_FUA, CMD_READ, 5, 0, 1));
    s.handle_input(&input);
    let cmds: Vec<(u64, Command, bool)> = events(&mut s)
        .into_iter()
        .map(|e| match e {
            Event::Request(r) => (r.cookie, r.command, r.fua),
            e => panic!("{e:?}"),
        })
        .collect();
    assert_eq!(
        cmds,
        vec![
            (1, Command::Flush, false),
            (2, Command::Trim { len: 8192 }, true),
            (
                3,
                Command::WriteZeroes {
                    len: 4096,
                    no_hole: true
                },
                false
            ),
            (
                4,
                Command::WriteZeroes {
                    len: 2,
                    no_hole: false
                },
                true
            ),
            (5, Command::Read { len: 1 }, true),
        ]
    );
}

#[test]
fn out_of_range_requests_get_einval_and_writes_enospc_without_their_payload() {
    let mut s = transmitting(export());
    let mut input = request(0, CMD_READ, 1, SIZE - 10, 11);
    input.extend(request(0, CMD_WRITE, 2, SIZE - 2, 4));
    input.extend_from_slice(&[9, 9, 9, 9]);
    input.extend(request(0, CMD_TRIM, 3, SIZE, 1));
    input.extend(request(0, CMD_WRITE_ZEROES, 4, u64::MAX, 2));
    input.extend(request(0, CMD_READ, 5, u64::MAX - 1, 4));
    // The export's last byte is fine.
    input.extend(request(0, CMD_WRITE, 6, SIZE - 1, 1));
    input.push(7);
    s.handle_input(&input);
    assert_eq!(
        simple_replies(&s.take_output()),
        vec![
            (EINVAL, 1),
            (ENOSPC, 2),
            (EINVAL, 3),
            (ENOSPC, 4),
            (EINVAL, 5)
        ]
    );
    let ev = events(&mut s);
    assert_eq!(ev.len(), 1);
    assert!(
        matches!(&ev[0], Event::Request(Request { cookie: 6, offset, .. }) if *offset == SIZE - 1)
    );
}

#[test]
fn a_read_only_export_refuses_writes_with_eperm() {
    let ro = Export::new("ro", SIZE, true);
    let flags = ro.transmission_flags();
    assert_eq!(
        flags,
        FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN
    );
    let mut s = transmitting(ro);
    let mut input = request(0, CMD_WRITE, 1, 0, 3);
    input.extend_from_slice(b"abc");
    input.extend(request(0, CMD_TRIM, 2, 0, 4096));
    input.extend(request(0, CMD_WRITE_ZEROES, 3, 0, 4096));
    input.extend(request(0, CMD_READ, 4, 0, 4096));
    s.handle_input(&input);
    assert_eq!(
        simple_replies(&s.take_output()),
        vec![(EPERM, 1), (EPERM, 2), (EPERM, 3)]
    );
    assert_eq!(events(&mut s).len(), 1);
}

#[test]
fn oversized_reads_and_writes_get_einval_and_a_write_payload_is_never_buffered() {
    let max = BlockSizes::DEFAULT.max_payload();
    let mut s = transmitting(Export::new("", 1 << 40, false));
    s.handle_input(&request(0, CMD_READ, 1, 0, max + 1));
    assert_eq!(simple_replies(&s.take_output()), vec![(EINVAL, 1)]);
    s.handle_input(&request(0, CMD_WRITE, 2, 0, u32::MAX));
    // The payload streams through: nothing to read into, nothing kept.
    assert!(s.payload_buffer().is_none());
    let chunk = vec![0x5a; 1 << 20];
    let mut left = u64::from(u32::MAX);
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        s.handle_input(&chunk[..n]);
        left -= n as u64;
        assert!(events(&mut s).is_empty());
    }
    assert_eq!(simple_replies(&s.take_output()), vec![(EINVAL, 2)]);
    // TRIM and WRITE_ZEROES carry no payload: their length may exceed it.
    s.handle_input(&request(0, CMD_WRITE_ZEROES, 3, 0, max + 4096));
    assert_eq!(events(&mut s).len(), 1);
    // The largest write is accepted.
    s.handle_input(&request(0, CMD_WRITE, 4, 0, max));
    assert_eq!(s.payload_buffer().map(|b| b.len()), Some(max as usize));
}

#[test]
fn unknown_commands_and_flags_get_einval() {
    let mut s = transmitting(export());
    let mut input = request(0, 5, 1, 0, 4096); // NBD_CMD_CACHE: not offered
    input.extend(request(0, 7, 2, 0, 4096)); // NBD_CMD_BLOCK_STATUS: not negotiated
    input.extend(request(0, 0xffff, 3, 0, 0));
    input.extend(request(CMD_FLAG_NO_HOLE, CMD_READ, 4, 0, 1));
    input.extend(request(1 << 2, CMD_READ, 5, 0, 1)); // DF without structured replies
    input.extend(request(1 << 15, CMD_WRITE, 6, 0, 2));
    input.extend_from_slice(b"xy");
    input.extend(request(0, CMD_READ, 7, 0, 1));
    s.handle_input(&input);
    let r = simple_replies(&s.take_output());
    assert_eq!(r, (1..=6).map(|c| (EINVAL, c)).collect::<Vec<_>>());
    assert_eq!(events(&mut s).len(), 1);
}

#[test]
fn a_bad_request_magic_closes_without_a_reply() {
    let mut s = transmitting(export());
    let mut input = request(0, CMD_READ, 1, 0, 1);
    input.extend(request(0, CMD_READ, 2, 0, 1));
    input[28] = 0x12;
    s.handle_input(&input);
    let ev = events(&mut s);
    assert_eq!(ev.len(), 2);
    assert!(matches!(ev[0], Event::Request(_)));
    assert!(matches!(
        ev[1],
        Event::Close(ProtocolError::BadRequestMagic(0x1260_9513))
    ));
    assert!(!s.has_output());
    assert!(s.is_done());
}

#[test]
fn disc_disconnects_and_nothing_after_it_counts() {
    let mut s = transmitting(export());
    let mut input = request(0, CMD_DISC, 1, 0, 0);
    input.extend(request(0, CMD_READ, 2, 0, 1));
    s.handle_input(&input);
    assert_eq!(events(&mut s), vec![Event::Disconnect]);
    assert!(!s.has_output());
    assert_eq!(s.end_of_input(), Ok(()));
}

#[test]
fn input_cut_mid_message_is_reported_and_a_cut_write_never_emitted() {
    let mut s = transmitting(export());
    let mut input = request(0, CMD_WRITE, 9, 4096, 4096);
    input.extend_from_slice(&[1u8; 1000]);
    s.handle_input(&input);
    assert!(events(&mut s).is_empty());
    let e = s.end_of_input().unwrap_err();
    assert!(
        matches!(
            e,
            ProtocolError::Truncated {
                received: 1000,
                expected: 4096,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("not written"), "{e}");
    assert!(events(&mut s).is_empty());

    let mut s = transmitting(export());
    s.handle_input(&request(0, CMD_READ, 1, 0, 1)[..10]);
    assert!(matches!(
        s.end_of_input(),
        Err(ProtocolError::Truncated {
            received: 10,
            expected: 28,
            ..
        })
    ));
    let mut s = negotiating(export(), 1);
    s.handle_input(&option(OPT_GO, &info_data("", &[]))[..20]);
    assert!(s.end_of_input().is_err());
    let mut s = Session::new(export());
    s.handle_input(&[0, 0]);
    assert!(s.end_of_input().is_err());
    // Between messages, the end is clean.
    let mut s = transmitting(export());
    assert_eq!(s.end_of_input(), Ok(()));
}

#[test]
fn a_payload_can_be_read_straight_into_its_buffer_and_buffers_are_reused() {
    let mut s = transmitting(export());
    let mut input = request(0, CMD_WRITE, 1, 0, 8192);
    input.extend_from_slice(&[3u8; 100]);
    s.handle_input(&input);
    let target = s.payload_buffer().unwrap();
    assert_eq!(target.len(), 8092);
    target.fill(4);
    s.payload_received(8092);
    let Some(Event::Request(Request {
        command: Command::Write { data },
        ..
    })) = s.poll_event()
    else {
        panic!("no write")
    };
    assert!(data[..100].iter().all(|&b| b == 3) && data[100..].iter().all(|&b| b == 4));
    let ptr = data.as_ptr();
    s.recycle(data);
    s.handle_input(&request(0, CMD_WRITE, 2, 0, 4096));
    assert_eq!(s.payload_buffer().unwrap().as_ptr(), ptr);
}

#[test]
fn a_minimum_block_size_is_enforced() {
    let mut e = export();
    e.block_sizes = BlockSizes::new(512, 4096, 1 << 20).unwrap();
    let mut s = transmitting(e);
    let mut input = request(0, CMD_READ, 1, 512, 511);
    input.extend(request(0, CMD_READ, 2, 1, 512));
    input.extend(request(0, CMD_READ, 3, 0, (1 << 20) + 512));
    input.extend(request(0, CMD_READ, 4, 512, 1024));
    s.handle_input(&input);
    assert_eq!(
        simple_replies(&s.take_output()),
        vec![(EINVAL, 1), (EINVAL, 2), (EINVAL, 3)]
    );
    assert_eq!(events(&mut s).len(), 1);
    assert!(BlockSizes::new(3, 4096, 1 << 20).is_none());
    assert!(BlockSizes::new(1, 256, 1 << 20).is_none());
    assert!(BlockSizes::new(4096, 4096, 1024).is_none());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Random bytes in any phase never panic, and whatever comes out is well formed.
    #[test]
    fn random_input_never_panics(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..20),
        start in 0u8..3,
    ) {
        let mut s = match start {
            0 => Session::new(export()),
            1 => negotiating(export(), FLAG_C_FIXED_NEWSTYLE),
            _ => transmitting(export()),
        };
        for c in &chunks {
            s.handle_input(c);
            while let Some(e) = s.poll_event() {
                if let Event::Request(r) = e {
                    let len = match r.command {
                        Command::Read { len } | Command::Trim { len } => u64::from(len),
                        Command::WriteZeroes { len, .. } => u64::from(len),
                        Command::Write { ref data } => data.len() as u64,
                        Command::Flush => 0,
                    };
                    prop_assert!(check_range(r.offset, len, SIZE).is_ok() || matches!(r.command, Command::Flush));
                }
            }
            s.take_output();
        }
        let _ = s.end_of_input();
    }

    /// Well-formed headers with random fields: every request is either emitted valid or
    /// answered, exactly once, in a stream of random requests.
    #[test]
    fn random_requests_are_each_answered_or_emitted_once(
        reqs in proptest::collection::vec((any::<u16>(), 0u16..9, 0u64..SIZE + 10, 0u32..3000), 1..30),
    ) {
        let mut s = transmitting(export());
        let mut input = Vec::new();
        let mut expected = 0u64;
        for (i, &(flags, kind, offset, len)) in reqs.iter().enumerate() {
            if kind == CMD_DISC {
                continue;
            }
            input.extend(request(flags, kind, i as u64, offset, len));
            if kind == CMD_WRITE {
                input.extend(std::iter::repeat_n(0xee, len as usize));
            }
            expected += 1;
        }
        s.handle_input(&input);
        let answered = simple_replies(&s.take_output()).len() as u64;
        let emitted = events(&mut s).len() as u64;
        prop_assert_eq!(answered + emitted, expected);
    }
}

// ---- The driver, over real sockets ----

/// A disk in memory; reads of offsets in `gate` wait until the gate opens.
struct MemDisk {
    data: Mutex<Vec<u8>>,
    gate: (Mutex<bool>, Condvar),
    gated: u64,
    read_only: bool,
}

impl MemDisk {
    fn new(size: usize) -> Arc<MemDisk> {
        MemDisk::gated(size, u64::MAX)
    }

    fn gated(size: usize, gated: u64) -> Arc<MemDisk> {
        Arc::new(MemDisk {
            data: Mutex::new(vec![0; size]),
            gate: (Mutex::new(true), Condvar::new()),
            gated,
            read_only: false,
        })
    }

    fn set_gate(&self, open: bool) {
        *self.gate.0.lock().unwrap() = open;
        self.gate.1.notify_all();
    }

    fn snapshot(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }
}

impl BlockDevice for MemDisk {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_range(offset, buf.len() as u64, self.size())?;
        if offset == self.gated {
            let mut open = self.gate.0.lock().unwrap();
            while !*open {
                open = self.gate.1.wait(open).unwrap();
            }
        }
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, data: &[u8], offset: u64, _fua: bool) -> Result<(), DiskError> {
        check_range(offset, data.len() as u64, self.size())?;
        let mut d = self.data.lock().unwrap();
        d[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), DiskError> {
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.write_zeroes(offset, len, false)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> Result<(), DiskError> {
        check_range(offset, len, self.size())?;
        let mut d = self.data.lock().unwrap();
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

/// A minimal NBD client for the driver tests.
struct Client {
    s: UnixStream,
}

impl Client {
    fn connect(server: &Server) -> Client {
        let (a, b) = UnixStream::pair().unwrap();
        server.serve_connection(b).unwrap();
        Client::handshake(a)
    }

    fn handshake(mut s: UnixStream) -> Client {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        s.write_all(&u32b(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES))
            .unwrap();
        s.write_all(&option(OPT_GO, &info_data("", &[]))).unwrap();
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).unwrap();
            let rep = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            let mut d = vec![0u8; len];
            s.read_exact(&mut d).unwrap();
            if rep == REP_ACK {
                break;
            }
            assert_eq!(rep, REP_INFO);
        }
        Client { s }
    }

    fn send(&mut self, kind: u16, cookie: u64, offset: u64, len: u32, data: &[u8]) {
        let mut r = request(0, kind, cookie, offset, len);
        r.extend_from_slice(data);
        self.s.write_all(&r).unwrap();
    }

    /// One reply: (error, cookie), reading `data_len` bytes of data on success.
    fn reply(&mut self, data_len: usize) -> (u32, u64, Vec<u8>) {
        self.reply_with(|_| data_len)
    }

    /// One reply, whose data length on success depends on its cookie.
    fn reply_with(&mut self, data_len: impl Fn(u64) -> usize) -> (u32, u64, Vec<u8>) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        let (e, c) = simple_replies(&h)[0];
        let mut d = vec![0u8; if e == 0 { data_len(c) } else { 0 }];
        self.s.read_exact(&mut d).unwrap();
        (e, c, d)
    }
}

#[test]
fn the_driver_serves_reads_writes_and_errors() {
    let disk = MemDisk::new(1 << 20);
    let server = Server::new(disk.clone(), ServerConfig::default());
    let mut c = Client::connect(&server);
    c.send(CMD_WRITE, 1, 4095, 3, b"abc");
    assert_eq!(c.reply(0), (0, 1, vec![]));
    c.send(CMD_READ, 2, 4094, 5, &[]);
    assert_eq!(c.reply(5), (0, 2, b"\0abc\0".to_vec()));
    c.send(CMD_WRITE, 3, (1 << 20) - 1, 2, b"zz");
    assert_eq!(c.reply(0).0, ENOSPC);
    c.send(CMD_WRITE_ZEROES, 4, 4096, 1, &[]);
    assert_eq!(c.reply(0), (0, 4, vec![]));
    c.send(CMD_READ, 5, 4095, 3, &[]);
    assert_eq!(c.reply(3).2, b"a\0c");
    c.send(CMD_FLUSH, 6, 0, 0, &[]);
    assert_eq!(c.reply(0), (0, 6, vec![]));
    let stats = server.stats();
    assert_eq!((stats.reads, stats.writes, stats.write_zeroes), (2, 1, 1));
    assert_eq!(stats.bytes_written, 3);
    c.send(CMD_DISC, 7, 0, 0, &[]);
    let mut rest = Vec::new();
    c.s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn a_blocked_read_does_not_stall_the_connection() {
    let disk = MemDisk::gated(1 << 20, 8192);
    disk.write_at(b"late", 8192, false).unwrap();
    disk.write_at(b"soon", 0, false).unwrap();
    disk.set_gate(false);
    let server = Server::new(disk.clone(), ServerConfig::default());
    let mut c = Client::connect(&server);
    c.send(CMD_READ, 1, 8192, 4, &[]);
    c.send(CMD_READ, 2, 0, 4, &[]);
    c.send(CMD_WRITE, 3, 100, 1, b"w");
    let len = |cookie| if cookie == 3 { 0 } else { 4 };
    let mut first = [c.reply_with(len), c.reply_with(len)];
    first.sort_by_key(|r| r.1);
    // Both later requests were answered while the first waits.
    assert_eq!(first[0], (0, 2, b"soon".to_vec()));
    assert_eq!(first[1], (0, 3, vec![]));
    disk.set_gate(true);
    let r = c.reply(4);
    assert_eq!((r.1, r.2.as_slice()), (1, &b"late"[..]));
}

#[test]
fn many_blocked_requests_hold_the_reader_back_and_all_are_answered() {
    let disk = MemDisk::gated(1 << 20, 4096);
    disk.set_gate(false);
    let server = Server::new(disk.clone(), ServerConfig::default());
    let mut c = Client::connect(&server);
    let n = 400u64;
    let mut w = c.s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        for i in 0..n {
            w.write_all(&request(0, CMD_READ, i, 4096, 8)).unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    disk.set_gate(true);
    sender.join().unwrap();
    let mut cookies: Vec<u64> = (0..n).map(|_| c.reply(8).1).collect();
    cookies.sort_unstable();
    assert_eq!(cookies, (0..n).collect::<Vec<_>>());
}

#[test]
fn bad_clients_end_only_their_own_connection() {
    let disk = MemDisk::new(1 << 20);
    let before = disk.snapshot();
    let server = Server::new(disk.clone(), ServerConfig::default());
    let mut good = Client::connect(&server);

    // Bad magic after the handshake.
    let mut bad = Client::connect(&server);
    bad.s.write_all(&[0xffu8; 28]).unwrap();
    let mut rest = Vec::new();
    bad.s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());

    // Garbage instead of a handshake.
    let (mut raw, theirs) = UnixStream::pair().unwrap();
    server.serve_connection(theirs).unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut rest = Vec::new();
    raw.read_to_end(&mut rest).unwrap();
    assert_eq!(rest.len(), 18, "only the greeting");

    // Vanishing mid-write.
    let mut cut = Client::connect(&server);
    let mut r = request(0, CMD_WRITE, 1, 0, 65536);
    r.extend_from_slice(&[0xab; 30000]);
    cut.s.write_all(&r).unwrap();
    drop(cut);

    good.send(CMD_READ, 9, 0, 16, &[]);
    assert_eq!(good.reply(16), (0, 9, vec![0; 16]));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while server.active_connections() > 1 {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(disk.snapshot(), before);
    assert_eq!(server.stats().protocol_errors, 3);
}

#[test]
fn unix_and_tcp_listeners_serve_until_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let disk = MemDisk::new(1 << 20);
    let server = Server::new(
        disk.clone(),
        ServerConfig {
            export_name: "vda".into(),
            ..ServerConfig::default()
        },
    );
    server.serve_unix(&path).unwrap();
    let addr = server.serve_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut c = Client::handshake(UnixStream::connect(&path).unwrap());
    c.send(CMD_WRITE, 1, 0, 2, b"hi");
    assert_eq!(c.reply(0).0, 0);

    let mut t = std::net::TcpStream::connect(addr).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    t.read_exact(&mut greeting).unwrap();
    t.write_all(&u32b(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES))
        .unwrap();
    t.write_all(&option(OPT_EXPORT_NAME, b"vda")).unwrap();
    let mut info = [0u8; 10];
    t.read_exact(&mut info).unwrap();
    assert_eq!(&info[..8], &u64b(1 << 20));
    t.write_all(&request(0, CMD_READ, 2, 0, 2)).unwrap();
    let mut reply = [0u8; 18];
    t.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[16..], b"hi");

    // A second server cannot take the live socket.
    let other = Server::new(disk.clone(), ServerConfig::default());
    assert!(matches!(
        other.serve_unix(&path),
        Err(super::ServeError::InUse { .. })
    ));

    server.stop();
    assert!(!path.exists());
    let mut rest = Vec::new();
    c.s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert!(std::net::TcpStream::connect(addr).is_err());
    assert!(matches!(
        server.serve_tcp("127.0.0.1:0".parse().unwrap()),
        Err(super::ServeError::Stopped)
    ));
}

#[test]
fn clients_beyond_the_limit_are_refused() {
    let disk = MemDisk::new(1 << 20);
    let server = Server::new(
        disk,
        ServerConfig {
            max_connections: 1,
            ..ServerConfig::default()
        },
    );
    let _first = Client::connect(&server);
    let (mut a, b) = UnixStream::pair().unwrap();
    server.serve_connection(b).unwrap();
    let mut rest = Vec::new();
    a.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}
