//! In-memory tests of the two state machines talking to each other through the codec.

use proptest::prelude::*;

use super::*;
use crate::codec::{decode, encode_to_vec};
use crate::message::{Pages, RegionDesc, PAGE_SIZE, PROTOCOL_VERSION};

fn layout(pages: u64) -> Layout {
    Layout::single(pages * PAGE_SIZE as u64)
}

fn pair(pages: u64) -> (SourceSession, DestSession) {
    let src = SourceSession::new(SourceConfig {
        vm_id: "vm-1".into(),
        layout: layout(pages),
        features: 0b11,
        push: true,
    });
    let dst = DestSession::new(DestConfig {
        layout: layout(pages),
        expected_vm_id: Some("vm-1".into()),
        features: 0b01,
    });
    (src, dst)
}

/// Moves a message through the real codec, as the wire would.
fn wire(msg: Message) -> Message {
    let buf = encode_to_vec(&msg);
    let (back, used) = decode(&buf).unwrap().unwrap();
    assert_eq!(used, buf.len());
    back
}

/// Source memory for the tests: page i holds i in every byte, but every 3rd page is zero.
fn page_content(i: u64) -> Vec<u8> {
    if i.is_multiple_of(3) {
        vec![0; PAGE_SIZE]
    } else {
        vec![(i % 251) as u8 + 1; PAGE_SIZE]
    }
}

fn pages_msg(range: std::ops::Range<u64>) -> Message {
    let mut data = Vec::new();
    for p in range.clone() {
        data.extend(page_content(p));
    }
    Message::Pages(Pages::from_memory(range.start, &data))
}

/// Delivers everything queued on both sides until nothing moves. Page data that reaches
/// the destination is written into `mem`.
/// Source events other than `Serve` are returned.
fn pump(src: &mut SourceSession, dst: &mut DestSession, mem: &mut [Vec<u8>]) -> Vec<SourceEvent> {
    let mut others = Vec::new();
    loop {
        let mut moved = false;
        while let Some(t) = src.poll_transmit() {
            moved = true;
            if let Some(pages) = dst.handle(t.channel, wire(t.message)).unwrap() {
                install(&pages, mem);
            }
        }
        while let Some(ev) = src.poll_event() {
            let SourceEvent::Serve(pages) = ev else {
                others.push(ev);
                continue;
            };
            for p in pages {
                let msg = wire(pages_msg(p..p + 1));
                if let Some(pages) = dst.handle(Channel::Urgent, msg).unwrap() {
                    install(&pages, mem);
                }
                moved = true;
            }
        }
        while let Some(t) = dst.poll_transmit() {
            moved = true;
            src.handle(t.channel, wire(t.message)).unwrap();
        }
        if !moved {
            return others;
        }
    }
}

fn install(pages: &Pages, mem: &mut [Vec<u8>]) {
    for (i, p) in pages.iter() {
        mem[i as usize] = match p {
            crate::message::PageRef::Raw(d) => d.to_vec(),
            crate::message::PageRef::Zero => vec![0; PAGE_SIZE],
        };
    }
}

#[test]
fn full_session_moves_every_page_and_ends_cleanly() {
    let n = 40;
    let (mut src, mut dst) = pair(n);
    let mut mem = vec![Vec::new(); n as usize];
    let events = pump(&mut src, &mut dst, &mut mem);
    assert!(src.is_running() && dst.is_running());
    assert_eq!(
        dst.poll_event(),
        Some(DestEvent::Established {
            vm_id: "vm-1".into(),
            features: 0b01
        })
    );
    assert_eq!(events, vec![SourceEvent::Established { features: 0b01 }]);

    // Two demand faults, then the push, which restarts after the faulted page.
    dst.request(&[7, 30]);
    pump(&mut src, &mut dst, &mut mem);
    let first = src.next_push(4);
    assert_eq!(first, Some(31..35));
    for r in first
        .into_iter()
        .chain(std::iter::from_fn(|| src.next_push(8)))
    {
        let msg = wire(pages_msg(r));
        let pages = dst.handle(Channel::Bulk, msg).unwrap().unwrap();
        install(&pages, &mut mem);
    }
    pump(&mut src, &mut dst, &mut mem);
    assert_eq!(
        dst.poll_event(),
        Some(DestEvent::PushDone { pages_sent: n })
    );
    assert!(dst.received().is_full());
    for i in 0..n {
        assert_eq!(mem[i as usize], page_content(i), "page {i}");
    }

    dst.complete();
    let events = pump(&mut src, &mut dst, &mut mem);
    assert_eq!(events, vec![SourceEvent::Finished]);
    assert!(src.is_finished());
    assert!(dst.is_finished());
    assert_eq!(dst.poll_event(), Some(DestEvent::Finished));
}

#[test]
fn push_off_moves_pages_on_demand_only() {
    let mut src = SourceSession::new(SourceConfig {
        vm_id: "vm-1".into(),
        layout: layout(4),
        features: 0,
        push: false,
    });
    let mut dst = DestSession::new(DestConfig {
        layout: layout(4),
        expected_vm_id: None,
        features: 0,
    });
    let mut mem = vec![Vec::new(); 4];
    pump(&mut src, &mut dst, &mut mem);
    assert_eq!(src.next_push(8), None);
    assert_eq!(src.poll_transmit(), None, "no PushDone without a push");
    dst.request(&[0, 1, 2, 3]);
    pump(&mut src, &mut dst, &mut mem);
    assert!(dst.received().is_full());
    assert_eq!(src.pages_served(), 4);
    assert_eq!(src.pages_pushed(), 0);
}

#[test]
fn requests_before_the_handshake_are_held_back() {
    let (mut src, mut dst) = pair(8);
    dst.request(&[3]);
    assert_eq!(dst.poll_transmit(), None);
    let hello = src.poll_transmit().unwrap();
    dst.handle(hello.channel, hello.message).unwrap();
    let t: Vec<_> = std::iter::from_fn(|| dst.poll_transmit()).collect();
    assert_eq!(t[0].message.name(), "HelloAck");
    assert_eq!(
        t[1],
        Transmit {
            channel: Channel::Urgent,
            message: Message::Request { pages: vec![3] }
        }
    );
}

fn refused_hello(hello: Message) -> (ProtoError, Transmit) {
    let (_, mut dst) = pair(16);
    let err = dst.handle(Channel::Control, hello).unwrap_err();
    let reply = dst.poll_transmit().unwrap();
    assert!(!dst.is_running());
    (err, reply)
}

#[test]
fn wrong_version_is_refused_with_a_clear_error() {
    let (err, reply) = refused_hello(Message::Hello {
        version: PROTOCOL_VERSION + 1,
        vm_id: "vm-1".into(),
        layout: layout(16),
        features: 0,
    });
    assert_eq!(
        err,
        ProtoError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: PROTOCOL_VERSION + 1
        }
    );
    assert!(err.to_string().contains("version mismatch"));
    assert!(matches!(
        reply.message,
        Message::Error {
            code: ErrorCode::VersionMismatch,
            ..
        }
    ));
}

#[test]
fn layout_mismatch_is_refused_with_both_layouts_named() {
    let mut other = layout(16);
    other.regions.push(RegionDesc {
        guest_addr: 1 << 32,
        len: 4096,
    });
    let (err, reply) = refused_hello(Message::Hello {
        version: PROTOCOL_VERSION,
        vm_id: "vm-1".into(),
        layout: other,
        features: 0,
    });
    let text = err.to_string();
    assert!(
        text.contains("0x0+0x10000") && text.contains("0x100000000+0x1000"),
        "{text}"
    );
    assert!(matches!(
        reply.message,
        Message::Error {
            code: ErrorCode::LayoutMismatch,
            ..
        }
    ));
}

#[test]
fn wrong_vm_id_is_refused() {
    let (err, _) = refused_hello(Message::Hello {
        version: PROTOCOL_VERSION,
        vm_id: "someone-else".into(),
        layout: layout(16),
        features: 0,
    });
    assert!(matches!(err, ProtoError::VmIdMismatch { .. }));
}

#[test]
fn out_of_range_pages_are_refused_before_installing() {
    let (mut src, mut dst) = pair(16);
    let mut mem = vec![Vec::new(); 16];
    pump(&mut src, &mut dst, &mut mem);
    let err = dst.handle(Channel::Bulk, pages_msg(15..17)).unwrap_err();
    assert_eq!(
        err,
        ProtoError::PageOutOfRange {
            first: 15,
            count: 2,
            total: 16
        }
    );
    assert_eq!(dst.received().count_ones(), 0, "nothing was accepted");
    // The session is dead: later valid data is refused too.
    assert!(dst.handle(Channel::Bulk, pages_msg(0..1)).is_err());
}

#[test]
fn out_of_range_requests_are_refused_by_the_source() {
    let (mut src, mut dst) = pair(16);
    let mut mem = vec![Vec::new(); 16];
    pump(&mut src, &mut dst, &mut mem);
    let err = src
        .handle(Channel::Urgent, Message::Request { pages: vec![16] })
        .unwrap_err();
    assert!(matches!(err, ProtoError::PageOutOfRange { .. }));
    assert!(matches!(
        src.poll_transmit().unwrap().message,
        Message::Error {
            code: ErrorCode::PageOutOfRange,
            ..
        }
    ));
}

#[test]
fn pages_before_the_handshake_are_unexpected() {
    let (_, mut dst) = pair(16);
    let err = dst.handle(Channel::Bulk, pages_msg(0..1)).unwrap_err();
    assert!(matches!(err, ProtoError::Unexpected { .. }), "{err}");
}

#[test]
fn peer_errors_surface_without_echo() {
    let (mut src, _) = pair(4);
    src.poll_transmit();
    let err = src
        .handle(
            Channel::Control,
            Message::Error {
                code: ErrorCode::LayoutMismatch,
                message: "x".into(),
            },
        )
        .unwrap_err();
    assert!(matches!(err, ProtoError::Peer { .. }));
    assert_eq!(
        src.poll_transmit(),
        None,
        "an error is not answered with an error"
    );
}

#[test]
fn wrong_completion_count_is_refused() {
    let (mut src, mut dst) = pair(4);
    let mut mem = vec![Vec::new(); 4];
    pump(&mut src, &mut dst, &mut mem);
    let err = src
        .handle(Channel::Control, Message::Complete { pages_received: 3 })
        .unwrap_err();
    assert!(matches!(err, ProtoError::CountMismatch { .. }));
}

proptest! {
    /// Whatever the order of demand requests and push steps, every page reaches the
    /// destination with the right content and the push hands each page out once.
    #[test]
    fn random_interleavings_deliver_every_page(
        n in 1u64..200,
        steps in proptest::collection::vec((any::<bool>(), any::<u64>(), 1usize..16), 0..300),
    ) {
        let (mut src, mut dst) = pair(n);
        let mut mem = vec![Vec::new(); n as usize];
        pump(&mut src, &mut dst, &mut mem);
        let mut pushed = vec![0u32; n as usize];
        for (fault, page, run) in steps {
            if fault {
                dst.request(&[page % n]);
                pump(&mut src, &mut dst, &mut mem);
            } else if let Some(r) = src.next_push(run) {
                for p in r.clone() { pushed[p as usize] += 1; }
                let pages = dst.handle(Channel::Bulk, wire(pages_msg(r))).unwrap().unwrap();
                install(&pages, &mut mem);
            }
        }
        while let Some(r) = src.next_push(64) {
            for p in r.clone() { pushed[p as usize] += 1; }
            let pages = dst.handle(Channel::Bulk, wire(pages_msg(r))).unwrap().unwrap();
            install(&pages, &mut mem);
        }
        prop_assert!(pushed.iter().all(|&c| c <= 1));
        for i in 0..n {
            prop_assert_eq!(&mem[i as usize], &page_content(i));
        }
        dst.complete();
        pump(&mut src, &mut dst, &mut mem);
        prop_assert!(src.is_finished() && dst.is_finished());
    }

    /// Random messages on random channels never panic either state machine.
    #[test]
    fn random_messages_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        chan in 0u8..3,
    ) {
        let (mut src, mut dst) = pair(8);
        let channel = [Channel::Control, Channel::Urgent, Channel::Bulk][chan as usize];
        if let Ok(Some((msg, _))) = decode(&bytes) {
            let _ = dst.handle(channel, msg.clone());
            let _ = src.handle(channel, msg);
        }
    }
}
