//! In-memory tests of the two state machines talking to each other through the codec.

use proptest::prelude::*;

use super::*;
use crate::codec::{decode, encode_to_vec};
use crate::message::{Pages, RegionDesc, SessionKind, PAGE_SIZE, PROTOCOL_VERSION};

fn layout(pages: u64) -> Layout {
    Layout::single(pages * PAGE_SIZE as u64)
}

fn pair(pages: u64) -> (SourceSession, DestSession) {
    let src = SourceSession::new(SourceConfig {
        features: 0b11,
        ..SourceConfig::migrate("vm-1", layout(pages))
    });
    let dst = DestSession::new(DestConfig {
        expected_vm_id: Some("vm-1".into()),
        features: 0b01,
        ..DestConfig::migrate(layout(pages))
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
/// the destination is written into `mem`; demand requests are served at once.
/// The source's events are returned.
fn pump(src: &mut SourceSession, dst: &mut DestSession, mem: &mut [Vec<u8>]) -> Vec<SourceEvent> {
    let mut events = Vec::new();
    loop {
        let mut moved = false;
        while let Some(t) = src.poll_transmit() {
            moved = true;
            if let Some(pages) = dst.handle(t.channel, wire(t.message)).unwrap() {
                install(&pages, mem);
            }
        }
        while let Some(t) = dst.poll_transmit() {
            moved = true;
            for p in src.handle(t.channel, wire(t.message)).unwrap() {
                let msg = wire(pages_msg(p..p + 1));
                if let Some(pages) = dst.handle(Channel::Urgent, msg).unwrap() {
                    install(&pages, mem);
                }
            }
        }
        events.extend(std::iter::from_fn(|| src.poll_event()));
        if !moved {
            return events;
        }
    }
}

fn install(d: &Delivery, mem: &mut [Vec<u8>]) {
    let Delivery::Pages(pages) = d else {
        panic!("page data expected, got {d:?}")
    };
    for (i, p) in pages.iter() {
        mem[i as usize] = match p {
            crate::message::PageRef::Raw(d) => d.to_vec(),
            crate::message::PageRef::Zero => vec![0; PAGE_SIZE],
            other => panic!("these tests send plain pages, got {other:?}"),
        };
    }
}

/// The pages pushed before the destination's answer may be lz4 (version 6): a destination
/// decodes lz4 wherever the `Hello` offered it, even one configured to agree to nothing, and
/// nothing else beyond what it agreed to.
#[test]
fn lz4_is_decoded_wherever_the_hello_offered_it_whatever_was_agreed() {
    use crate::encoding::{EncodingPolicy, Mode};
    use crate::message::{FEATURE_DEDUP, FEATURE_LZ4};
    let refs_only = EncodingPolicy {
        lz4: Mode::Off,
        dedup: Mode::On,
    };
    // (the source's policy, the destination's features, what it agrees to, decodes)
    for (policy, configured, agreed, decodes) in [
        (
            EncodingPolicy::ALL,
            FEATURE_DEDUP,
            FEATURE_DEDUP,
            FEATURE_LZ4 | FEATURE_DEDUP,
        ),
        (EncodingPolicy::ALL, 0, 0, FEATURE_LZ4),
        (refs_only, FEATURE_DEDUP, FEATURE_DEDUP, FEATURE_DEDUP),
        (EncodingPolicy::OFF, FEATURE_DEDUP, 0, 0),
    ] {
        let n = 8;
        let mut src = SourceSession::new(SourceConfig {
            encoding: policy,
            ..SourceConfig::migrate("vm-1", layout(n))
        });
        let mut dst = DestSession::new(DestConfig {
            features: configured,
            ..DestConfig::migrate(layout(n))
        });
        let mut mem = vec![Vec::new(); n as usize];
        let events = pump(&mut src, &mut dst, &mut mem);
        assert!(dst.is_running(), "{policy:?}");
        assert_eq!(
            events,
            vec![SourceEvent::Established { features: agreed }],
            "{policy:?}"
        );
        assert_eq!(dst.features(), agreed, "{policy:?}");
        assert_eq!(src.features(), agreed, "{policy:?}");
        assert_eq!(dst.decodes(), decodes, "{policy:?}");
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
    let tally = src.push_tally();
    assert!(!tally.snapshot().done, "pages left to hand out");
    for r in first
        .into_iter()
        .chain(std::iter::from_fn(|| src.next_push(8)))
    {
        let msg = wire(pages_msg(r));
        let pages = dst.handle(Channel::Bulk, msg).unwrap().unwrap();
        install(&pages, &mut mem);
    }
    assert!(!tally.snapshot().done, "its frames not written yet");
    src.note_push_written(src.connection() + 1);
    assert!(!tally.snapshot().done, "another connection's push");
    src.note_push_written(src.connection());
    assert!(tally.snapshot().done, "the last frames written");
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

/// `Complete` and late urgent traffic cross on a long link: a request that reaches the
/// finished source, and a reply that reaches the finished destination, end nothing.
#[test]
fn urgent_traffic_crossing_the_completion_is_ignored() {
    let n = 8;
    let (mut src, mut dst) = pair(n);
    let mut mem = vec![Vec::new(); n as usize];
    pump(&mut src, &mut dst, &mut mem);
    while let Some(r) = src.next_push(8) {
        let d = dst
            .handle(Channel::Bulk, wire(pages_msg(r)))
            .unwrap()
            .unwrap();
        install(&d, &mut mem);
    }
    dst.complete();
    pump(&mut src, &mut dst, &mut mem);
    assert!(src.is_finished() && dst.is_finished());
    let late_request = wire(Message::request(vec![3]));
    let served = src.handle(Channel::Urgent, late_request).unwrap();
    assert!(served.is_empty(), "nothing is served");
    assert!(src.is_finished());
    assert!(
        src.poll_transmit().is_none() && src.poll_event().is_none(),
        "nothing is sent or reported"
    );
    let late_reply = wire(pages_msg(3..4));
    assert_eq!(dst.handle(Channel::Urgent, late_reply).unwrap(), None);
    assert!(dst.is_finished());
    assert!(dst.poll_transmit().is_none());
}

#[test]
fn push_off_moves_pages_on_demand_only() {
    let mut src = SourceSession::new(SourceConfig {
        push: false,
        ..SourceConfig::migrate("vm-1", layout(4))
    });
    let mut dst = DestSession::new(DestConfig::migrate(layout(4)));
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
            message: Message::request(vec![3])
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
        kind: SessionKind::Migrate,
        epoch: 0,
        version: PROTOCOL_VERSION + 1,
        vm_id: "vm-1".into(),
        layout: layout(16),
        features: 0,
        session_id: 1,
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
        kind: SessionKind::Migrate,
        epoch: 0,
        version: PROTOCOL_VERSION,
        vm_id: "vm-1".into(),
        layout: other,
        features: 0,
        session_id: 1,
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
        kind: SessionKind::Migrate,
        epoch: 0,
        version: PROTOCOL_VERSION,
        vm_id: "someone-else".into(),
        layout: layout(16),
        features: 0,
        session_id: 1,
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
        .handle(Channel::Urgent, Message::request(vec![16]))
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

fn standby(pages: u64) -> DestSession {
    DestSession::new(DestConfig {
        accept: vec![SessionKind::Replicate, SessionKind::Evacuate],
        ..DestConfig::migrate(layout(pages))
    })
}

fn bits(pages: u64, set: &[u64]) -> crate::bitmap::Bitmap {
    let mut b = crate::bitmap::Bitmap::new(pages);
    for &p in set {
        b.set(p);
    }
    b
}

/// Moves every queued message between the two sides until nothing moves.
/// Delivers every message both ways until nothing moves; returns the pages the source was
/// asked to serve.
fn exchange(src: &mut SourceSession, dst: &mut DestSession) -> Vec<u64> {
    let mut serve = Vec::new();
    loop {
        let mut moved = false;
        while let Some(t) = src.poll_transmit() {
            moved = true;
            dst.handle(t.channel, wire(t.message)).unwrap();
        }
        while let Some(t) = dst.poll_transmit() {
            moved = true;
            serve.extend(src.handle(t.channel, wire(t.message)).unwrap());
        }
        if !moved {
            return serve;
        }
    }
}

#[test]
fn replication_reports_invalid_pages_and_carries_versions_and_acks() {
    let n = 200;
    let mut src = SourceSession::new(SourceConfig {
        kind: SessionKind::Replicate,
        epoch: 7,
        ..SourceConfig::migrate("vm-1", layout(n))
    });
    let mut dst = standby(n);
    exchange(&mut src, &mut dst);
    assert_eq!(
        dst.poll_event(),
        Some(DestEvent::HelloReceived {
            kind: SessionKind::Replicate,
            vm_id: "vm-1".into(),
            epoch: 7
        })
    );
    dst.accept(&bits(n, &[2, 5, 199]));
    exchange(&mut src, &mut dst);
    assert!(src.is_running() && dst.is_running());
    assert_eq!(
        src.poll_event(),
        Some(SourceEvent::Invalid(bits(n, &[2, 5, 199])))
    );
    assert!(matches!(
        src.poll_event(),
        Some(SourceEvent::Established { .. })
    ));
    assert_eq!(src.next_push(8), None, "replication has no push schedule");

    let Message::Pages(pages) = pages_msg(4..6) else {
        unreachable!()
    };
    let update = Message::Update {
        pages: pages.clone(),
        versions: vec![3, 9],
    };
    let got = dst.handle(Channel::Bulk, wire(update)).unwrap();
    assert_eq!(
        got,
        Some(Delivery::Update {
            pages,
            versions: vec![3, 9]
        })
    );
    dst.ack(&[(4, 3), (5, 9)]);
    exchange(&mut src, &mut dst);
    assert_eq!(
        src.poll_event(),
        Some(SourceEvent::Acked(vec![(4, 3), (5, 9)]))
    );
    // Page data outside a migration is refused on a replication session.
    assert!(dst.handle(Channel::Bulk, pages_msg(0..1)).is_err());
}

#[test]
fn evacuation_stale_set_is_the_union_and_only_it_is_pushed() {
    let n = 130;
    let mut src = SourceSession::new(SourceConfig {
        kind: SessionKind::Evacuate,
        epoch: 7,
        stale: Some(bits(n, &[1, 3, 100])),
        ..SourceConfig::migrate("vm-1", layout(n))
    });
    let mut dst = standby(n);
    exchange(&mut src, &mut dst);
    assert!(matches!(
        dst.poll_event(),
        Some(DestEvent::HelloReceived { .. })
    ));
    // The standby lost page 6 (torn) and never had page 129.
    dst.accept(&bits(n, &[3, 6, 129]));
    exchange(&mut src, &mut dst);
    let expected = bits(n, &[1, 3, 6, 100, 129]);
    assert_eq!(dst.poll_event(), Some(DestEvent::StaleSet(expected)));
    assert!(matches!(
        dst.poll_event(),
        Some(DestEvent::Established { .. })
    ));
    assert_eq!(src.pages_stale(), 5);
    let mut pushed = Vec::new();
    while let Some(r) = src.next_push(64) {
        pushed.extend(r);
    }
    assert_eq!(pushed, vec![1, 3, 6, 100, 129]);
    assert!(matches!(
        src.poll_event(),
        Some(SourceEvent::Established { .. })
    ));
    // Demand requests and completion work as in a migration.
    dst.request(&[6]);
    let t = dst.poll_transmit().unwrap();
    assert_eq!(src.handle(t.channel, t.message).unwrap(), vec![6]);
    dst.complete();
    exchange(&mut src, &mut dst);
    assert!(src.is_finished() && dst.is_finished());
}

/// An evacuation of `n` pages whose source knows `stale`, with `vm_state` to hand over.
fn evacuating(n: u64, stale: &[u64], vm_state: Option<Vec<u8>>) -> SourceSession {
    SourceSession::new(SourceConfig {
        kind: SessionKind::Evacuate,
        stale: Some(bits(n, stale)),
        vm_state,
        ..SourceConfig::migrate("vm-1", layout(n))
    })
}

/// The control messages `src` queued, in order (data and requests left out).
fn control_queued(src: &mut SourceSession) -> Vec<Message> {
    let mut out = Vec::new();
    while let Some(t) = src.poll_transmit() {
        if t.channel == Channel::Control {
            out.push(t.message);
        }
    }
    out
}

#[test]
fn an_evacuation_with_vm_state_sends_its_stale_set_behind_the_hello() {
    let n = 130;
    let mut src = evacuating(n, &[1, 3, 100], Some(vec![9; 8]));
    let sent = control_queued(&mut src);
    assert!(matches!(sent[0], Message::Hello { .. }));
    assert!(
        matches!(
            &sent[1],
            Message::PageSet {
                kind: SetKind::Stale,
                last: true,
                ..
            }
        ),
        "the stale set follows the Hello at once: {sent:?}"
    );
    assert_eq!(sent.len(), 2, "the VM state waits for the standby's answer");
    assert_eq!(src.ownership(), Ownership::Source);
    // The standby gets all of it before its application accepted the handshake.
    let mut dst = standby(n);
    for m in sent {
        assert_eq!(dst.handle(Channel::Control, wire(m)).unwrap(), None);
    }
    assert!(matches!(
        dst.poll_event(),
        Some(DestEvent::HelloReceived { .. })
    ));
    assert!(dst.poll_event().is_none(), "nothing acted on before accept");
    // It adds its own invalid pages (6 torn, 129 never had) to the source's stale set.
    dst.accept(&bits(n, &[3, 6, 129]));
    let expected = bits(n, &[1, 3, 6, 100, 129]);
    assert_eq!(dst.poll_event(), Some(DestEvent::StaleSet(expected)));
    assert!(dst.awaits_vm_state());
    exchange(&mut src, &mut dst);
    assert_eq!(src.ownership(), Ownership::Destination);
    assert_eq!(dst.poll_event(), Some(DestEvent::VmState(vec![9; 8])));
    assert!(dst.guest_may_run());
    // The source pushes the union, and sent the stale set once.
    assert_eq!(src.pages_stale(), 5);
    let mut pushed = Vec::new();
    while let Some(r) = src.next_push(64) {
        pushed.extend(r);
    }
    assert_eq!(pushed, vec![1, 3, 6, 100, 129]);
    dst.complete();
    exchange(&mut src, &mut dst);
    assert!(src.is_finished() && dst.is_finished());
}

#[test]
fn a_standby_refusing_the_hello_leaves_the_vm_with_the_source() {
    let n = 64;
    let mut src = evacuating(n, &[1], Some(vec![1]));
    let mut dst = DestSession::new(DestConfig {
        expected_vm_id: Some("vm-2".into()),
        accept: vec![SessionKind::Evacuate],
        ..DestConfig::migrate(layout(n))
    });
    let mut refused = None;
    for m in control_queued(&mut src) {
        if let Err(e) = dst.handle(Channel::Control, wire(m)) {
            refused.get_or_insert(e);
        }
    }
    assert!(matches!(refused, Some(ProtoError::VmIdMismatch { .. })));
    assert!(!dst.guest_may_run());
    let t = dst.poll_transmit().expect("the refusal");
    assert!(src.handle(t.channel, wire(t.message)).is_err());
    assert_eq!(
        src.ownership(),
        Ownership::Source,
        "the VM may run here again"
    );
}

#[test]
fn a_standby_holds_no_more_than_a_stale_set_before_accepting() {
    let n = 64;
    let mut dst = standby(n);
    let mut src = evacuating(n, &[1], Some(vec![1]));
    for m in control_queued(&mut src) {
        dst.handle(Channel::Control, wire(m)).unwrap();
    }
    // A second stale set before the answer is one too many.
    let extra = Message::PageSet {
        kind: SetKind::Stale,
        first_word: 0,
        words: vec![0],
        last: true,
    };
    let e = dst.handle(Channel::Control, extra).unwrap_err();
    assert!(matches!(e, ProtoError::Unexpected { .. }), "{e}");
    // A VM state before the answer is refused too.
    let mut dst = standby(n);
    for m in control_queued(&mut SourceSession::new(SourceConfig {
        kind: SessionKind::Evacuate,
        vm_state: Some(vec![1]),
        ..SourceConfig::migrate("vm-1", layout(n))
    })) {
        dst.handle(Channel::Control, wire(m)).unwrap();
    }
    assert!(dst
        .handle(Channel::Control, Message::VmState { blob: vec![1] })
        .is_err());
}

#[test]
fn an_evacuation_without_vm_state_sends_its_stale_set_after_the_answer() {
    let n = 64;
    let mut src = evacuating(n, &[1], None);
    let sent = control_queued(&mut src);
    assert_eq!(sent.len(), 1, "only the Hello: {sent:?}");
}

#[test]
fn evacuation_pushes_the_known_stale_pages_before_the_answer_and_each_page_once() {
    let n = 130;
    let mut src = SourceSession::new(SourceConfig {
        kind: SessionKind::Evacuate,
        stale: Some(bits(n, &[1, 2, 3, 100])),
        ..SourceConfig::migrate("vm-1", layout(n))
    });
    // Before the standby answers, only pages that must cross whatever it says.
    assert!(src.may_push_early());
    assert_eq!(src.next_push(2), Some(1..3));
    let mut dst = standby(n);
    exchange(&mut src, &mut dst);
    assert!(matches!(
        dst.poll_event(),
        Some(DestEvent::HelloReceived { .. })
    ));
    assert!(src.may_push_early(), "still waiting for the invalid pages");
    assert_eq!(src.next_push(1), Some(3..4));
    // Standby: page 2 is torn (already pushed), 6 and 129 are invalid.
    dst.accept(&bits(n, &[2, 6, 129]));
    exchange(&mut src, &mut dst);
    assert!(src.is_running() && !src.may_push_early());
    assert_eq!(src.pages_stale(), 6);
    let mut rest = Vec::new();
    while let Some(r) = src.next_push(64) {
        rest.extend(r);
    }
    assert_eq!(rest, vec![6, 100, 129], "nothing pushed early goes again");
    assert_eq!(src.pages_pushed(), 6);
    assert!(matches!(
        src.poll_transmit().map(|t| t.message),
        Some(Message::PushDone { .. })
    ));
}

#[test]
fn a_migration_pushes_before_the_answer_and_continues_after_it() {
    let n = 40;
    let (mut src, mut dst) = pair(n);
    let early = src.next_push(8);
    assert_eq!(early, Some(0..8));
    // PushDone waits for the session: the early push never runs out of pages here, and
    // a finished early push must not announce the end before the handshake.
    let mut mem = vec![Vec::new(); n as usize];
    pump(&mut src, &mut dst, &mut mem);
    assert!(src.is_running());
    let mut all: Vec<u64> = early.into_iter().flatten().collect();
    while let Some(r) = src.next_push(16) {
        all.extend(r);
    }
    assert_eq!(all, (0..n).collect::<Vec<_>>());
}

#[test]
fn an_early_push_that_empties_its_schedule_announces_nothing_before_the_session_runs() {
    let n = 4;
    let mut src = SourceSession::new(SourceConfig {
        kind: SessionKind::Evacuate,
        stale: Some(bits(n, &[0])),
        ..SourceConfig::migrate("vm-1", layout(n))
    });
    while src.poll_transmit().is_some() {}
    assert_eq!(src.next_push(8), Some(0..1));
    assert_eq!(src.next_push(8), None);
    assert!(
        src.poll_transmit().is_none(),
        "no PushDone before the answer"
    );
}

#[test]
fn no_early_push_for_replication_or_with_the_push_off() {
    for config in [
        SourceConfig {
            kind: SessionKind::Replicate,
            ..SourceConfig::migrate("vm-1", layout(8))
        },
        SourceConfig {
            push: false,
            ..SourceConfig::migrate("vm-1", layout(8))
        },
    ] {
        let mut src = SourceSession::new(config);
        assert!(!src.may_push_early());
        assert_eq!(src.next_push(8), None);
    }
}

#[test]
fn a_plain_destination_refuses_replication() {
    let mut src = SourceSession::new(SourceConfig {
        kind: SessionKind::Replicate,
        ..SourceConfig::migrate("vm-1", layout(8))
    });
    let mut dst = DestSession::new(DestConfig::migrate(layout(8)));
    let hello = src.poll_transmit().unwrap();
    let err = dst.handle(hello.channel, hello.message).unwrap_err();
    assert_eq!(err, ProtoError::KindRefused(SessionKind::Replicate));
}

#[test]
fn malformed_page_sets_are_refused() {
    let n = 200; // 4 words
    let set = |first_word, words: Vec<u64>, last| Message::PageSet {
        kind: crate::message::SetKind::Invalid,
        first_word,
        words,
        last,
    };
    // After the HelloAck, a set that skips a word.
    let mut s2 = SourceSession::new(SourceConfig {
        kind: SessionKind::Evacuate,
        ..SourceConfig::migrate("vm-1", layout(n))
    });
    s2.poll_transmit();
    let ack = Message::HelloAck {
        version: PROTOCOL_VERSION,
        features: 0,
        conn_epoch: 0,
    };
    s2.handle(Channel::Control, ack.clone()).unwrap();
    let e = s2
        .handle(Channel::Control, set(1, vec![0], true))
        .unwrap_err();
    assert!(e.to_string().contains("out of order"), "{e}");
    // Too many words for the layout.
    let mut s3 = SourceSession::new(SourceConfig {
        kind: SessionKind::Evacuate,
        ..SourceConfig::migrate("vm-1", layout(n))
    });
    s3.poll_transmit();
    s3.handle(Channel::Control, ack.clone()).unwrap();
    let e = s3
        .handle(Channel::Control, set(0, vec![0; 5], true))
        .unwrap_err();
    assert!(e.to_string().contains("more words"), "{e}");
    // A set that stops short.
    let mut s4 = SourceSession::new(SourceConfig {
        kind: SessionKind::Evacuate,
        ..SourceConfig::migrate("vm-1", layout(n))
    });
    s4.poll_transmit();
    s4.handle(Channel::Control, ack).unwrap();
    let e = s4
        .handle(Channel::Control, set(0, vec![0; 2], true))
        .unwrap_err();
    assert!(e.to_string().contains("ended before"), "{e}");
}

#[test]
fn vm_state_arrives_before_the_guest_may_resume() {
    let mut src = SourceSession::new(SourceConfig {
        vm_state: Some(vec![7; 100]),
        ..SourceConfig::migrate("vm-1", layout(4))
    });
    let mut dst = DestSession::new(DestConfig::migrate(layout(4)));
    let hello = src.poll_transmit().unwrap();
    dst.handle(hello.channel, hello.message).unwrap();
    assert!(!dst.is_running(), "waits for the state");
    dst.request(&[1]);
    let served = exchange(&mut src, &mut dst);
    assert_eq!(dst.poll_event(), Some(DestEvent::VmState(vec![7; 100])));
    assert!(matches!(
        dst.poll_event(),
        Some(DestEvent::Established { .. })
    ));
    assert!(dst.is_running());
    // The request made while waiting went out once the session ran.
    assert!(matches!(
        src.poll_event(),
        Some(SourceEvent::Established { .. })
    ));
    assert_eq!(served, vec![1]);
}

#[test]
fn state_later_holds_the_session_after_the_handshake_until_the_hand_over() {
    let mut src = SourceSession::new(SourceConfig {
        state_later: true,
        ..SourceConfig::migrate("vm-1", layout(8))
    });
    let mut dst = DestSession::new(DestConfig::migrate(layout(8)));
    assert!(!src.may_push_early(), "memory is not frozen yet");
    assert!(src.awaits_hand_over());
    let served = exchange(&mut src, &mut dst);
    assert!(served.is_empty());
    // The handshake is done; the destination waits for the state, the source sends nothing.
    assert!(dst.awaits_vm_state() && !dst.is_running());
    assert!(src.is_running() && src.awaits_hand_over());
    assert_eq!(src.ownership(), Ownership::Source, "the VM is still here");
    assert_eq!(src.next_push(4), None);
    assert!(src.poll_transmit().is_none());
    // A request before the hand-over is refused: no guest can run at the destination yet.
    let refused = src.handle(Channel::Urgent, wire(Message::request(vec![1])));
    assert!(refused.is_err(), "{refused:?}");

    let mut src = SourceSession::new(SourceConfig {
        state_later: true,
        ..SourceConfig::migrate("vm-1", layout(8))
    });
    let mut dst = DestSession::new(DestConfig::migrate(layout(8)));
    exchange(&mut src, &mut dst);
    assert!(src.hand_over(vec![9; 10], vec![5..6, 6..7], None));
    assert!(!src.hand_over(vec![1], Vec::new(), None), "only once");
    assert_eq!(src.ownership(), Ownership::Destination);
    exchange(&mut src, &mut dst);
    assert_eq!(dst.poll_event(), Some(DestEvent::VmState(vec![9; 10])));
    assert!(dst.is_running());
    // The hot ranges handed over lead the push.
    let first = src.next_push(4);
    assert_eq!(first.as_ref().map(|r| r.start), Some(5));
    let mut mem = vec![Vec::new(); 8];
    for r in first
        .into_iter()
        .chain(std::iter::from_fn(|| src.next_push(4)))
    {
        let pages = dst
            .handle(Channel::Bulk, wire(pages_msg(r)))
            .unwrap()
            .unwrap();
        install(&pages, &mut mem);
    }
    assert!(dst.received().is_full());
}

#[test]
fn disks_are_pages_after_memory_and_move_like_them() {
    // 8 pages of memory, then disk "vda" (4 pages) and disk "vdb" (2 pages).
    let l = layout(8)
        .with_disk("vda", 4 * 4096)
        .with_disk("vdb", 2 * 4096);
    assert_eq!((l.memory_pages(), l.total_pages()), (8, 14));
    assert_eq!(
        (l.disk_pages(0), l.disk_pages(1), l.disk_pages(2)),
        (8..12, 12..14, 0..0)
    );
    let mut src = SourceSession::new(SourceConfig::migrate("vm-1", l.clone()));
    let mut dst = DestSession::new(DestConfig::migrate(l));
    let mut mem = vec![Vec::new(); 14];
    pump(&mut src, &mut dst, &mut mem);
    // A disk read at the destination is a request like a page fault.
    dst.request(&[13]);
    pump(&mut src, &mut dst, &mut mem);
    assert_eq!(mem[13], page_content(13));
    while let Some(r) = src.next_push(4) {
        let pages = dst
            .handle(Channel::Bulk, wire(pages_msg(r)))
            .unwrap()
            .unwrap();
        install(&pages, &mut mem);
    }
    assert!(dst.received().is_full());
    for i in 0..14 {
        assert_eq!(mem[i as usize], page_content(i), "page {i}");
    }
}

#[test]
fn a_disk_of_another_size_or_name_is_a_layout_mismatch_naming_the_disk() {
    for other in [
        layout(16).with_disk("vda", 8192),
        layout(16).with_disk("vdb", 4096),
        layout(16),
    ] {
        let mut dst = DestSession::new(DestConfig::migrate(layout(16).with_disk("vda", 4096)));
        let hello = Message::Hello {
            kind: SessionKind::Migrate,
            epoch: 0,
            version: PROTOCOL_VERSION,
            vm_id: "vm-1".into(),
            layout: other,
            features: 0,
            session_id: 1,
        };
        let err = dst.handle(Channel::Control, wire(hello)).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("\"vda\" 0x1000"), "{text}");
        let reply = dst.poll_transmit().unwrap();
        assert!(matches!(
            reply.message,
            Message::Error {
                code: ErrorCode::LayoutMismatch,
                ..
            }
        ));
    }
}

/// A session running with the push off, so that pages move only on demand.
fn running_on_demand(pages: u64) -> (SourceSession, DestSession, Vec<Vec<u8>>) {
    let mut src = SourceSession::new(SourceConfig {
        push: false,
        ..SourceConfig::migrate("vm-1", layout(pages))
    });
    let mut dst = DestSession::new(DestConfig::migrate(layout(pages)));
    let mut mem = vec![Vec::new(); pages as usize];
    pump(&mut src, &mut dst, &mut mem);
    assert!(src.is_running() && dst.is_running());
    (src, dst, mem)
}

fn requested(msgs: &[Message]) -> Vec<u64> {
    msgs.iter()
        .flat_map(|m| match m {
            Message::Request { pages, .. } => pages.clone(),
            other => panic!("requests expected, got {other:?}"),
        })
        .collect()
}

#[test]
fn echo_asks_again_only_for_pages_still_missing() {
    let (mut src, mut dst, mut mem) = running_on_demand(16);
    dst.request(&[2, 5, 9]);
    let first = dst.poll_transmit().unwrap();
    assert_eq!(first.channel, Channel::Urgent);
    // Page 5's reply arrives before the echo is due.
    for p in src.handle(first.channel, wire(first.message)).unwrap() {
        if p == 5 {
            let d = dst.handle(Channel::Urgent, wire(pages_msg(5..6))).unwrap();
            install(&d.unwrap(), &mut mem);
        }
    }
    let echo = dst.echo(&[2, 5, 9]);
    assert_eq!(requested(&echo), vec![2, 9]);
    assert_eq!(dst.stats().requests_echoed, 2);
    assert!(
        dst.poll_transmit().is_none(),
        "the driver sends echoes itself"
    );
    // Replies on the echo channel deliver like urgent ones; the later copy is dropped.
    let d = dst.handle(Channel::Echo, wire(pages_msg(2..3))).unwrap();
    install(&d.unwrap(), &mut mem);
    assert_eq!(
        dst.handle(Channel::Urgent, wire(pages_msg(2..3))).unwrap(),
        None
    );
    assert_eq!(mem[2], page_content(2));
    assert!(
        dst.echo(&[2, 5]).is_empty(),
        "nothing missing, nothing echoed"
    );
    // A lost connection takes no echo: the resume asks for every outstanding page.
    dst.connection_lost();
    assert!(dst.echo(&[9]).is_empty());
}

#[test]
fn source_answers_an_echo_once_unless_the_path_is_lossy() {
    let (mut src, _dst, _mem) = running_on_demand(16);
    let req = |pages: Vec<u64>| wire(Message::request(pages));
    // The first copy came first: its echo is answered only while the path loses packets.
    assert_eq!(src.handle(Channel::Urgent, req(vec![3])).unwrap(), vec![3]);
    assert!(src.handle(Channel::Echo, req(vec![3])).unwrap().is_empty());
    src.set_echo_all(true);
    assert_eq!(src.handle(Channel::Echo, req(vec![3])).unwrap(), vec![3]);
    src.set_echo_all(false);
    // The echo came first (the first copy lost or held up): answered, and so is the first
    // copy when it arrives, which may be a refetch the destination needs.
    assert_eq!(src.handle(Channel::Echo, req(vec![7, 3])).unwrap(), vec![7]);
    assert_eq!(src.handle(Channel::Urgent, req(vec![7])).unwrap(), vec![7]);
    let stats = src.stats();
    assert_eq!((stats.pages_served, stats.pages_echoed), (2, 2));
    // Echoes are checked like requests.
    let err = src.handle(Channel::Echo, req(vec![16])).unwrap_err();
    assert!(
        matches!(err, ProtoError::PageOutOfRange { first: 16, .. }),
        "{err}"
    );
}

#[test]
fn an_echo_after_the_end_is_ignored() {
    let (mut src, mut dst, mut mem) = running_on_demand(2);
    dst.request(&[0, 1]);
    pump(&mut src, &mut dst, &mut mem);
    dst.complete();
    pump(&mut src, &mut dst, &mut mem);
    assert!(src.is_finished() && dst.is_finished());
    let late = wire(Message::request(vec![1]));
    assert!(src.handle(Channel::Echo, late).unwrap().is_empty());
    assert_eq!(
        dst.handle(Channel::Echo, wire(pages_msg(1..2))).unwrap(),
        None
    );
    assert!(dst.echo(&[1]).is_empty());
}

/// A running migration whose push the test drives: the frames it hands to "the bulk
/// stream", noted as a driver does.
fn push_frame(src: &mut SourceSession, max: usize) -> Pages {
    let r = src.next_push(max).expect("a run to push");
    let Message::Pages(frame) = pages_msg(r) else {
        unreachable!()
    };
    let no = src.connection();
    src.note_pushed(no, std::slice::from_ref(&frame));
    frame
}

fn sent_request(dst: &mut DestSession) -> (Vec<u64>, u64) {
    match dst.poll_transmit().map(|t| wire(t.message)) {
        Some(Message::Request { pages, pushed_read }) => (pages, pushed_read),
        other => panic!("a request expected, got {other:?}"),
    }
}

#[test]
fn a_request_for_a_page_whose_pushed_copy_left_is_left_to_the_push() {
    let mut src = SourceSession::new(SourceConfig::migrate("vm-1", layout(64)));
    let mut dst = DestSession::new(DestConfig::migrate(layout(64)));
    let mut mem = vec![Vec::new(); 64];
    pump(&mut src, &mut dst, &mut mem);
    assert!(src.is_running() && dst.is_running());
    let f1 = push_frame(&mut src, 4);
    let f2 = push_frame(&mut src, 4);
    let _f3 = push_frame(&mut src, 4);
    assert_eq!((f1.first, f2.first), (0, 4));
    // The destination read the first frame on the bulk stream; a demand reply on the
    // urgent stream does not count as push read.
    dst.handle(Channel::Bulk, wire(Message::Pages(f1.clone())))
        .unwrap();
    dst.handle(Channel::Urgent, wire(pages_msg(30..31)))
        .unwrap();
    dst.request(&[5, 9, 20]);
    let (pages, pushed_read) = sent_request(&mut dst);
    assert_eq!(
        (pages.clone(), pushed_read),
        (vec![5, 9, 20], f1.wire_len())
    );
    // The source counts the second frame as in flight ahead of the request: page 5 comes
    // with the push; 9's frame had not left, 20 was never pushed.
    src.set_push_in_flight(f2.wire_len());
    let request = Message::Request { pages, pushed_read };
    assert_eq!(src.handle(Channel::Urgent, request).unwrap(), vec![9, 20]);
    assert_eq!(src.stats().pages_on_their_way, 1);
    assert_eq!(src.stats().pages_served, 2);
    // Late all the same: the echo is answered.
    let echo = dst.echo(&[5]);
    assert_eq!(
        src.handle(Channel::Echo, wire(echo[0].clone())).unwrap(),
        vec![5]
    );
    // A pushed copy that could not be used is fetched again in full.
    dst.refetch(&[2]);
    let (pages, pushed_read) = sent_request(&mut dst);
    assert_eq!((pages.as_slice(), pushed_read), ([2].as_slice(), 0));
    let request = Message::Request { pages, pushed_read };
    assert_eq!(src.handle(Channel::Urgent, request).unwrap(), vec![2]);

    // A new connection starts a new push: what the old one pushed (even noted late) is
    // answered on demand again.
    let old = src.connection();
    src.connection_lost();
    src.resume();
    src.note_pushed(old, std::slice::from_ref(&f2));
    src.set_push_in_flight(u64::MAX / 2);
    let request = Message::Request {
        pages: vec![1, 6],
        pushed_read: 1 << 30,
    };
    assert_eq!(src.handle(Channel::Urgent, request).unwrap(), vec![1, 6]);
    // The destination counts the new connection's push from zero.
    dst.connection_lost();
    dst.resume();
    assert_eq!(dst.pushed_read, 0);
}
