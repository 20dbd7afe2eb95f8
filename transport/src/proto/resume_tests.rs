//! The resume handshake, message by message.

use super::*;
use crate::bitmap::Bitmap;
use crate::codec::{decode, encode_to_vec};
use crate::message::{held_checksum, Pages, PAGE_SIZE};

const N: u64 = 100;

fn wire(msg: Message) -> Message {
    let buf = encode_to_vec(&msg);
    decode(&buf).unwrap().unwrap().0
}

fn pages(r: std::ops::Range<u64>) -> Message {
    let data: Vec<u8> = r
        .clone()
        .flat_map(|p| vec![p as u8 + 1; PAGE_SIZE])
        .collect();
    Message::Pages(Pages::from_memory(r.start, &data))
}

/// Delivers everything queued both ways on the current connections until nothing moves.
fn exchange(src: &mut SourceSession, dst: &mut DestSession) -> Vec<u64> {
    let mut served = Vec::new();
    loop {
        let mut moved = false;
        while let Some(t) = src.poll_transmit() {
            moved = true;
            dst.handle(t.channel, wire(t.message)).unwrap();
        }
        while let Some(t) = dst.poll_transmit() {
            moved = true;
            served.extend(src.handle(t.channel, wire(t.message)).unwrap());
        }
        if !moved {
            return served;
        }
    }
}

/// A running migration (no VM state) where pages 0..10 arrived and page 50 is requested.
fn running() -> (SourceSession, DestSession) {
    let layout = crate::message::Layout::single(N * PAGE_SIZE as u64);
    let mut src = SourceSession::new(SourceConfig {
        session_id: 42,
        early_push: false,
        ..SourceConfig::migrate("vm", layout.clone())
    });
    let mut dst = DestSession::new(DestConfig::migrate(layout));
    exchange(&mut src, &mut dst);
    assert!(src.is_running() && dst.is_running());
    assert_eq!(src.next_push(10), Some(0..10));
    assert!(dst.handle(Channel::Bulk, pages(0..10)).unwrap().is_some());
    dst.request(&[50]);
    // The request is lost with the connection: never delivered.
    assert!(matches!(
        dst.poll_transmit().map(|t| t.message),
        Some(Message::Request { .. })
    ));
    while src.poll_event().is_some() {}
    while dst.poll_event().is_some() {}
    (src, dst)
}

/// Both sides lose the connection and come back on a new one; returns the source's and
/// the destination's numbers for it.
fn reconnect(src: &mut SourceSession, dst: &mut DestSession) -> (u32, u32) {
    src.connection_lost();
    dst.connection_lost();
    assert_eq!(src.poll_event(), Some(SourceEvent::Paused));
    assert_eq!(
        dst.poll_event(),
        Some(DestEvent::Paused { resumable: true })
    );
    assert_eq!(src.session_state(), SessionState::Paused);
    assert_eq!(dst.session_state(), SessionState::Paused);
    (src.resume(), dst.resume())
}

/// The destination's answer to the source's `Hello` on the new connection.
fn answer(src: &mut SourceSession, dst: &mut DestSession, d: u32) -> Vec<Transmit> {
    let hello = src.poll_transmit().unwrap();
    assert_eq!(hello.message.name(), "Hello");
    dst.handle_in(d, hello.channel, wire(hello.message))
        .unwrap();
    std::iter::from_fn(|| dst.poll_transmit()).collect()
}

#[test]
fn a_resume_sends_only_what_the_destination_lacks_and_reissues_requests() {
    let (mut src, mut dst) = running();
    // In flight at the cut: 10..20 (never arrives).
    assert_eq!(src.next_push(10), Some(10..20));
    let (s, d) = reconnect(&mut src, &mut dst);
    assert_eq!((s, d), (1, 1));
    // A fault while the connection is down waits for the resume.
    dst.request(&[70]);
    assert!(dst.poll_transmit().is_none());
    let answer = answer(&mut src, &mut dst, d);
    let names: Vec<_> = answer.iter().map(|t| t.message.name()).collect();
    assert_eq!(names, ["Resume", "PageSet", "Request"]);
    assert_eq!(
        answer[2].message,
        Message::request(vec![50, 70]),
        "every outstanding request, again"
    );
    assert_eq!(dst.stats().requests_reissued, 2);
    let mut served = Vec::new();
    for t in answer {
        served.extend(src.handle_in(s, t.channel, wire(t.message)).unwrap());
    }
    assert_eq!(served, vec![50, 70]);
    assert!(matches!(
        src.poll_event(),
        Some(SourceEvent::Resumed {
            conn_epoch: 1,
            handshake_restarted: false,
            pages_to_push: 90,
        })
    ));
    // What the destination agreed to at the handshake holds on the new connection: its
    // push encodes as the first one's did.
    assert_ne!(src.features(), 0);
    assert_eq!(src.features(), dst.features());
    let ack = src.poll_transmit().unwrap();
    assert_eq!(ack.message, Message::ResumeAck { conn_epoch: 1 });
    dst.handle_in(d, ack.channel, wire(ack.message)).unwrap();
    assert_eq!(dst.poll_event(), Some(DestEvent::Resumed { conn_epoch: 1 }));
    assert_eq!(dst.session_state(), SessionState::Running);
    // The push: everything but what the destination holds (0..10) and the served pages;
    // the pages in flight at the cut go again.
    let mut pushed = Vec::new();
    while let Some(r) = src.next_push(64) {
        pushed.extend(r);
    }
    // (In the push's order: on from the last demand fault, then from the start.)
    assert_eq!(pushed[0], 71);
    pushed.sort_unstable();
    let expected: Vec<u64> = (10..N).filter(|p| ![50, 70].contains(p)).collect();
    assert_eq!(pushed, expected);
    let stats = src.stats();
    assert_eq!((stats.pauses, stats.pages_resent), (1, 10), "{stats:?}");
    assert_eq!(stats.bytes_resent, 10 * PAGE_SIZE as u64);
}

/// The shared tally says when the push has handed out its last page (an orchestrator
/// watches the moment its bytes leave); a resume that gives it pages again says it is not.
#[test]
fn a_resume_takes_back_a_done_push() {
    let (mut src, mut dst) = running();
    let tally = src.push_tally();
    while src.next_push(64).is_some() {}
    src.note_push_written(0);
    assert!(tally.snapshot().done);
    let (s, d) = reconnect(&mut src, &mut dst);
    for t in answer(&mut src, &mut dst, d) {
        src.handle_in(s, t.channel, wire(t.message)).unwrap();
    }
    assert!(!tally.snapshot().done, "pages to push again");
    // The old connection's push ending late says nothing of the new one's.
    src.note_push_written(0);
    assert!(!tally.snapshot().done);
    assert!(src.next_push(64).is_some());
    while src.next_push(64).is_some() {}
    src.note_push_written(s);
    assert!(tally.snapshot().done);
}

#[test]
fn messages_of_an_older_connection_are_ignored() {
    let (mut src, mut dst) = running();
    let (s, d) = reconnect(&mut src, &mut dst);
    // Late frames of connection 0, handed over after the resume began.
    assert_eq!(
        dst.handle_in(0, Channel::Bulk, pages(20..30)).unwrap(),
        None
    );
    assert_eq!(dst.received().count_ones(), 10, "nothing taken");
    let served = src
        .handle_in(0, Channel::Urgent, Message::request(vec![3]))
        .unwrap();
    assert!(served.is_empty());
    // While paused, even the current connection's messages are ignored.
    let mut src2 = running().0;
    src2.connection_lost();
    assert!(src2
        .handle(Channel::Urgent, Message::request(vec![3]))
        .unwrap()
        .is_empty());
    assert_eq!(src2.stats().messages_ignored, 1);
    // The new connection still resumes.
    for t in answer(&mut src, &mut dst, d) {
        src.handle_in(s, t.channel, wire(t.message)).unwrap();
    }
    let ack = src.poll_transmit().unwrap();
    dst.handle_in(d, ack.channel, ack.message).unwrap();
    // An old-connection ResumeAck or Request after that changes nothing either.
    assert_eq!(
        dst.handle_in(0, Channel::Control, Message::ResumeAck { conn_epoch: 0 })
            .unwrap(),
        None
    );
    assert_eq!(dst.stats().messages_ignored, 2);
    assert_eq!(src.stats().messages_ignored, 1);
    assert_eq!(dst.session_state(), SessionState::Running);
}

#[test]
fn a_page_that_arrives_twice_is_delivered_once() {
    let (_, mut dst) = running();
    // 0..10 are here: a run 8..12 delivers only 10..12.
    let Some(Delivery::PageRuns(runs)) = dst.handle(Channel::Bulk, pages(8..12)).unwrap() else {
        panic!("a partial run expected")
    };
    let got: Vec<u64> = runs.iter().flat_map(|r| r.iter().map(|(p, _)| p)).collect();
    assert_eq!(got, vec![10, 11]);
    // A run wholly here delivers nothing; a gap in the middle splits the run.
    assert_eq!(dst.handle(Channel::Urgent, pages(0..3)).unwrap(), None);
    assert!(dst.handle(Channel::Bulk, pages(14..15)).unwrap().is_some());
    let Some(Delivery::PageRuns(runs)) = dst.handle(Channel::Bulk, pages(12..17)).unwrap() else {
        panic!("a split run expected")
    };
    let runs: Vec<(u64, usize)> = runs.iter().map(|r| (r.first, r.count())).collect();
    assert_eq!(runs, vec![(12, 2), (15, 2)]);
    assert_eq!(dst.stats().pages_duplicate, 2 + 3 + 1);
    // A page requested again (e.g. a reference that did not resolve) is taken again.
    dst.request(&[5]);
    assert!(matches!(
        dst.handle(Channel::Urgent, pages(5..6)).unwrap(),
        Some(Delivery::Pages(_))
    ));
}

#[test]
fn a_held_set_of_another_length_or_checksum_is_refused_clearly() {
    for tamper in ["length", "checksum"] {
        let (mut src, mut dst) = running();
        let (s, d) = reconnect(&mut src, &mut dst);
        let mut answer = answer(&mut src, &mut dst, d);
        let (resume, set) = answer.split_at_mut(1);
        match (tamper, &mut resume[0].message, &mut set[0].message) {
            ("length", Message::Resume { pages, .. }, _) => *pages += 1,
            (_, _, Message::PageSet { words, .. }) => words[0] ^= 1 << 20,
            _ => unreachable!(),
        }
        let err = answer
            .into_iter()
            .map(|t| src.handle_in(s, t.channel, wire(t.message)))
            .find_map(Result::err)
            .expect("refused");
        let text = err.to_string();
        match tamper {
            "length" => {
                assert_eq!(
                    err,
                    ProtoError::HeldLength {
                        expected: N,
                        got: N + 1
                    }
                );
                assert!(
                    text.contains("covers 101 pages, the layout has 100"),
                    "{text}"
                );
            }
            _ => {
                assert!(matches!(err, ProtoError::HeldChecksum { .. }), "{err:?}");
                assert!(text.contains("checksum mismatch"), "{text}");
            }
        }
        assert_eq!(src.session_state(), SessionState::Failed);
        let sent = src.poll_transmit().unwrap().message;
        assert!(
            matches!(
                sent,
                Message::Error {
                    code: crate::message::ErrorCode::ResumeRefused,
                    ..
                }
            ),
            "{sent:?}"
        );
        assert_eq!(
            dst.handle_in(d, Channel::Control, sent).unwrap_err().code(),
            crate::message::ErrorCode::ResumeRefused
        );
    }
}

#[test]
fn another_session_id_is_refused_on_both_sides() {
    // The destination meets a source that restarted (a new session id).
    let (mut src, mut dst) = running();
    let (_, d) = reconnect(&mut src, &mut dst);
    let mut other = SourceSession::new(SourceConfig {
        session_id: 7,
        ..SourceConfig::migrate("vm", crate::message::Layout::single(N * PAGE_SIZE as u64))
    });
    let hello = other.poll_transmit().unwrap();
    let err = dst.handle_in(d, hello.channel, hello.message).unwrap_err();
    assert_eq!(
        err,
        ProtoError::SessionMismatch {
            expected: 42,
            got: 7
        }
    );
    assert!(err.to_string().contains("session id mismatch"), "{err}");
    // The source meets a destination resuming another session.
    let (mut src, mut dst) = running();
    let (s, d) = reconnect(&mut src, &mut dst);
    let mut answer = answer(&mut src, &mut dst, d);
    if let Message::Resume { session_id, .. } = &mut answer[0].message {
        *session_id = 43;
    }
    let t = answer.remove(0);
    let err = src.handle_in(s, t.channel, t.message).unwrap_err();
    assert!(matches!(err, ProtoError::SessionMismatch { got: 43, .. }));
}

#[test]
fn a_destination_that_never_resumed_the_guest_starts_the_handshake_over() {
    let layout = crate::message::Layout::single(N * PAGE_SIZE as u64);
    let mut src = SourceSession::new(SourceConfig {
        vm_state: Some(vec![1, 2, 3]),
        ..SourceConfig::migrate("vm", layout.clone())
    });
    let mut dst = DestSession::new(DestConfig::migrate(layout));
    // The Hello arrives; the connection dies before the VM state does.
    let hello = src.poll_transmit().unwrap();
    dst.handle(hello.channel, hello.message).unwrap();
    let ack = dst.poll_transmit().unwrap();
    src.handle(ack.channel, ack.message).unwrap();
    assert_eq!(
        src.ownership(),
        Ownership::Destination,
        "the VM state is queued"
    );
    assert!(!dst.guest_may_run());
    src.connection_lost();
    dst.connection_lost();
    assert_eq!(
        dst.poll_event(),
        Some(DestEvent::Paused { resumable: false })
    );
    let (s, d) = (src.resume(), dst.resume());
    let hello = src.poll_transmit().unwrap();
    // Handed over (the VM state was queued), to a destination that knows the session.
    assert!(handed_over(&hello));
    dst.handle_in(d, hello.channel, hello.message).unwrap();
    let ack = dst.poll_transmit().unwrap();
    assert!(matches!(
        ack.message,
        Message::HelloAck { conn_epoch: 1, .. }
    ));
    src.handle_in(s, ack.channel, ack.message).unwrap();
    let state = src.poll_transmit().unwrap();
    assert_eq!(
        state.message,
        Message::VmState {
            blob: vec![1, 2, 3]
        }
    );
    dst.handle_in(d, state.channel, state.message).unwrap();
    assert!(dst.guest_may_run());
    let events: Vec<_> = std::iter::from_fn(|| src.poll_event()).collect();
    assert!(matches!(events[0], SourceEvent::Established { .. }));
    assert_eq!(events[1], SourceEvent::Paused);
    assert!(matches!(
        events[2],
        SourceEvent::Resumed {
            handshake_restarted: true,
            pages_to_push: N,
            ..
        }
    ));
    assert!(matches!(events[3], SourceEvent::Established { .. }));
}

fn handed_over(hello: &Transmit) -> bool {
    matches!(&hello.message, Message::Hello { features, .. }
        if features & crate::message::FEATURE_HANDED_OVER != 0)
}

#[test]
fn a_destination_that_lost_the_session_refuses_the_vm_it_ran() {
    // The destination ran the guest (no VM state: from the Hello on), then restarted.
    let (mut src, _dead) = running();
    src.connection_lost();
    let s = src.resume();
    let hello = src.poll_transmit().unwrap();
    assert!(handed_over(&hello));
    let layout = crate::message::Layout::single(N * PAGE_SIZE as u64);
    let mut restarted = DestSession::new(DestConfig::migrate(layout));
    let err = restarted
        .handle(hello.channel, wire(hello.message))
        .unwrap_err();
    assert_eq!(err, ProtoError::NotHeld { session_id: 42 });
    assert!(!restarted.guest_may_run(), "nothing runs here");
    let refusal = restarted.poll_transmit().unwrap();
    let err = src
        .handle_in(s, refusal.channel, wire(refusal.message))
        .unwrap_err();
    assert!(matches!(
        err,
        ProtoError::Peer {
            code: crate::message::ErrorCode::ResumeRefused,
            ..
        }
    ));
    assert_eq!(src.session_state(), SessionState::Failed);
    assert_eq!(
        src.ownership(),
        Ownership::Destination,
        "the VM never comes back to the source"
    );
}

#[test]
fn a_hello_the_destination_never_answered_is_not_marked_handed_over() {
    // Without VM state the VM is handed over with the first Hello; if that Hello was lost,
    // whoever answers the next one starts the session afresh.
    let layout = crate::message::Layout::single(N * PAGE_SIZE as u64);
    let mut src = SourceSession::new(SourceConfig::migrate("vm", layout.clone()));
    let first = src.poll_transmit().unwrap();
    assert!(!handed_over(&first));
    src.connection_lost();
    let s = src.resume();
    let hello = src.poll_transmit().unwrap();
    assert!(!handed_over(&hello));
    let mut dst = DestSession::new(DestConfig::migrate(layout));
    dst.handle(hello.channel, wire(hello.message)).unwrap();
    assert!(dst.guest_may_run());
    let ack = dst.poll_transmit().unwrap();
    src.handle_in(s, ack.channel, wire(ack.message)).unwrap();
    assert!(src.is_running());
}

#[test]
fn a_lost_complete_ack_is_sent_again_after_a_resume() {
    let (mut src, mut dst) = running();
    while let Some(r) = src.next_push(64) {
        dst.handle(Channel::Bulk, pages(r)).unwrap();
    }
    exchange(&mut src, &mut dst);
    dst.complete();
    let complete = dst.poll_transmit().unwrap();
    src.handle(complete.channel, complete.message).unwrap();
    assert!(src.is_finished());
    assert_eq!(src.ownership(), Ownership::Released);
    // The CompleteAck is lost with the connection. A finished source does not pause.
    src.connection_lost();
    dst.connection_lost();
    assert_eq!(src.poll_event(), Some(SourceEvent::Finished));
    assert_eq!(src.poll_event(), None);
    assert_eq!(src.stats().pauses, 0);
    assert_eq!(dst.session_state(), SessionState::Paused);
    let (s, d) = (src.resume(), dst.resume());
    let answer = answer(&mut src, &mut dst, d);
    let names: Vec<_> = answer.iter().map(|t| t.message.name()).collect();
    assert_eq!(names, ["Resume", "PageSet", "Complete"]);
    for t in answer {
        src.handle_in(s, t.channel, t.message).unwrap();
    }
    for t in std::iter::from_fn(|| src.poll_transmit()).collect::<Vec<_>>() {
        dst.handle_in(d, t.channel, t.message).unwrap();
    }
    assert!(dst.is_finished());
}

#[test]
fn the_checksum_covers_every_word_in_order() {
    let mut a = Bitmap::new(200);
    a.set(3);
    let mut b = Bitmap::new(200);
    b.set(67);
    assert_ne!(held_checksum(a.words()), held_checksum(b.words()));
    assert_ne!(held_checksum(&[1, 0]), held_checksum(&[0, 1]));
    assert_eq!(held_checksum(a.words()), held_checksum(a.clone().words()));
}

/// A migration's source (session 42) with VM state to hand over.
fn source_with_vm_state() -> SourceSession {
    SourceSession::new(SourceConfig {
        session_id: 42,
        vm_state: Some(vec![1, 2, 3]),
        ..SourceConfig::migrate("vm", crate::message::Layout::single(N * PAGE_SIZE as u64))
    })
}

/// A migration with VM state whose destination crashes after it answered the `Hello`,
/// before the VM state arrived; a fresh destination takes the next connection. Returns the
/// source's number for it, its `Hello`, and the restarted destination.
fn crashed_before_the_vm_state(
    src: &mut SourceSession,
    answer_arrives: bool,
) -> (u32, Transmit, DestSession) {
    let layout = crate::message::Layout::single(N * PAGE_SIZE as u64);
    let mut dead = DestSession::new(DestConfig::migrate(layout.clone()));
    let hello = src.poll_transmit().unwrap();
    dead.handle(hello.channel, wire(hello.message)).unwrap();
    let ack = dead.poll_transmit().unwrap();
    assert!(!dead.guest_may_run(), "no VM state yet: nothing runs there");
    // The destination process dies here. What it sent may still reach the source.
    if answer_arrives {
        src.handle(ack.channel, wire(ack.message)).unwrap();
    }
    src.connection_lost();
    let s = src.resume();
    let hello = src.poll_transmit().unwrap();
    (s, hello, DestSession::new(DestConfig::migrate(layout)))
}

#[test]
fn a_restarted_destination_takes_a_session_the_source_still_owns() {
    let mut src = source_with_vm_state();
    let (s, hello, mut fresh) = crashed_before_the_vm_state(&mut src, false);
    assert_eq!(src.ownership(), Ownership::Source);
    assert!(!handed_over(&hello));
    fresh.handle(hello.channel, wire(hello.message)).unwrap();
    let ack = fresh.poll_transmit().unwrap();
    assert!(
        matches!(ack.message, Message::HelloAck { conn_epoch: 0, .. }),
        "a restarted destination numbers its first connection 0: {:?}",
        ack.message
    );
    src.handle_in(s, ack.channel, wire(ack.message)).unwrap();
    assert_eq!(src.ownership(), Ownership::Destination);
    let state = src.poll_transmit().unwrap();
    fresh.handle(state.channel, wire(state.message)).unwrap();
    assert!(fresh.guest_may_run());
    assert!(matches!(
        std::iter::from_fn(|| src.poll_event()).last(),
        Some(SourceEvent::Established { .. })
    ));
}

#[test]
fn a_hand_over_queued_after_the_destination_died_loses_the_vm() {
    // The destination answered and died before the VM state arrived; its answer reached
    // the source, which queued the VM state. The source cannot know it never arrived
    // (queued counts as sent), so the VM counts as handed over, and the restarted
    // destination must not start it over from the source's memory.
    let mut src = source_with_vm_state();
    let (s, hello, mut fresh) = crashed_before_the_vm_state(&mut src, true);
    assert_eq!(src.ownership(), Ownership::Destination);
    assert!(handed_over(&hello));
    let err = fresh
        .handle(hello.channel, wire(hello.message))
        .unwrap_err();
    assert_eq!(err, ProtoError::NotHeld { session_id: 42 });
    assert!(!fresh.guest_may_run());
    let refusal = fresh.poll_transmit().unwrap();
    let err = src
        .handle_in(s, refusal.channel, wire(refusal.message))
        .unwrap_err();
    assert_eq!(err.code(), crate::message::ErrorCode::ResumeRefused);
    assert_eq!(src.session_state(), SessionState::Failed);
    assert_eq!(src.ownership(), Ownership::Destination);
}

use crate::message::SessionKind;

/// The standby's side of a replication handshake on connection `d`: the `Hello` in, the
/// invalid pages out, all of it delivered to the source on its connection `s`.
fn replication_handshake(
    src: &mut SourceSession,
    dst: &mut DestSession,
    (s, d): (u32, u32),
    invalid: &Bitmap,
) {
    let hello = src.poll_transmit().unwrap();
    assert_eq!(hello.message.name(), "Hello");
    dst.handle_in(d, hello.channel, wire(hello.message))
        .unwrap();
    assert!(matches!(
        dst.poll_event(),
        Some(DestEvent::HelloReceived {
            kind: SessionKind::Replicate,
            epoch: 7,
            ..
        })
    ));
    dst.accept(invalid);
    while let Some(t) = dst.poll_transmit() {
        src.handle_in(s, t.channel, wire(t.message)).unwrap();
    }
    assert!(src.is_running() && dst.is_running());
}

#[test]
fn a_replication_resumes_with_a_fresh_handshake_also_into_a_restarted_standby() {
    let layout = crate::message::Layout::single(N * PAGE_SIZE as u64);
    let standby = || {
        DestSession::new(DestConfig {
            accept: vec![SessionKind::Replicate, SessionKind::Evacuate],
            ..DestConfig::migrate(layout.clone())
        })
    };
    let mut src = SourceSession::new(SourceConfig {
        kind: SessionKind::Replicate,
        epoch: 7,
        session_id: 42,
        ..SourceConfig::migrate("vm", layout.clone())
    });
    let mut dst = standby();
    let all = Bitmap::new(N).complement();
    replication_handshake(&mut src, &mut dst, (0, 0), &all);
    let events: Vec<_> = std::iter::from_fn(|| src.poll_event()).collect();
    assert_eq!(events[0], SourceEvent::Invalid(all.clone()));
    assert!(matches!(
        dst.poll_event(),
        Some(DestEvent::Established { .. })
    ));

    // The same standby: the same session's Hello on a new connection is a fresh handshake,
    // with the replica's invalid pages as they are now.
    src.connection_lost();
    dst.connection_lost();
    assert_eq!(
        dst.poll_event(),
        Some(DestEvent::Paused { resumable: false })
    );
    let (s, d) = (src.resume(), dst.resume());
    let mut invalid = Bitmap::new(N);
    invalid.set(3);
    replication_handshake(&mut src, &mut dst, (s, d), &invalid);
    assert_eq!(dst.session_id(), 42);
    let events: Vec<_> = std::iter::from_fn(|| src.poll_event()).collect();
    assert_eq!(events[0], SourceEvent::Paused);
    assert!(matches!(
        events[1],
        SourceEvent::Resumed {
            handshake_restarted: true,
            conn_epoch: 1,
            ..
        }
    ));
    assert_eq!(events[2], SourceEvent::Invalid(invalid.clone()));
    assert!(matches!(events[3], SourceEvent::Established { .. }));

    // A standby that restarted: a new session, whose first connection has epoch 0 again,
    // takes the same session's next Hello (replication never handed the VM over).
    src.connection_lost();
    let s = src.resume();
    let mut restarted = standby();
    replication_handshake(&mut src, &mut restarted, (s, 0), &invalid);
    assert_eq!(restarted.session_id(), 42);
    assert_eq!(src.conn_epoch(), 0);
    assert_eq!(src.stats().pauses, 2);
}
