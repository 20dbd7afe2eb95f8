//! Model-based test of replication: random interleavings of guest writes, harvests, sends,
//! deliveries, acknowledgements, standby crashes and reconnects, then a switchover. The
//! property: every page outside the stale set holds, at the standby, exactly the source's
//! content.

use std::collections::VecDeque;

use proptest::prelude::*;

use super::Ledger;
use transport::bitmap::Bitmap;

const PAGES: u64 = 24;

#[derive(Clone, Debug)]
enum Op {
    /// The guest writes a page (the tracker marks it dirty).
    Write(u64),
    /// The replicator harvests the tracker.
    Harvest,
    /// The replicator sends up to n stale pages (contents read now).
    Send(usize),
    /// The standby stores the oldest in-flight update.
    Deliver,
    /// The standby acknowledges everything it stored but has not acknowledged.
    Ack,
    /// The standby crashes: in-flight updates are lost; a store in progress may tear a page.
    Crash { tear: bool },
    /// The replicator reconnects: the standby reports the pages it cannot serve.
    Reconnect,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..PAGES).prop_map(Op::Write),
        2 => Just(Op::Harvest),
        3 => (1usize..8).prop_map(Op::Send),
        4 => Just(Op::Deliver),
        2 => Just(Op::Ack),
        1 => any::<bool>().prop_map(|tear| Op::Crash { tear }),
        1 => Just(Op::Reconnect),
    ]
}

/// Content of a page at the source: a counter bumped by every write.
#[derive(Default)]
struct Model {
    content: Vec<u64>,
    dirty: Vec<bool>,
    /// Standby: (version, content, torn) per page; version 0 = nothing.
    standby: Vec<(u64, u64, bool)>,
    unacked: Vec<(u64, u64)>,
    in_flight: VecDeque<(u64, u64, u64)>,
    connected: bool,
}

impl Model {
    fn new() -> Model {
        Model {
            content: vec![0; PAGES as usize],
            // The first harvest reports everything: the standby starts empty.
            dirty: vec![false; PAGES as usize],
            standby: vec![(0, 0, false); PAGES as usize],
            connected: true,
            ..Model::default()
        }
    }

    fn harvest(&mut self, ledger: &mut Ledger) {
        let pages: Vec<u64> = (0..PAGES).filter(|&p| self.dirty[p as usize]).collect();
        for &p in &pages {
            self.dirty[p as usize] = false;
        }
        ledger.mark_dirty(&pages);
    }

    /// What the standby can serve: valid, untorn entries.
    fn invalid(&self) -> Bitmap {
        let mut b = Bitmap::new(PAGES);
        for (p, &(v, _, torn)) in self.standby.iter().enumerate() {
            if v == 0 || torn {
                b.set(p as u64);
            }
        }
        b
    }
}

/// [`Ledger::next_batch`] as it was before `wanted`: a scan of every page from the cursor.
/// The ledger's own must take the same pages, in the same runs, and leave the same cursor.
fn next_batch_by_scan(l: &mut Ledger, max_pages: usize, runs: &mut Vec<(u64, Vec<u64>)>) {
    runs.clear();
    let n = l.version.len();
    if n == 0 {
        return;
    }
    let mut budget = max_pages;
    let mut scanned = 0;
    let mut p = l.cursor % n;
    while budget > 0 && scanned < n {
        if l.sent[p] != l.version[p] && l.acked[p] != l.version[p] {
            l.sent[p] = l.version[p];
            if l.lost_in_flight.clear(p as u64) {
                l.pages_resent += 1;
            }
            match runs.last_mut() {
                Some((first, versions)) if *first + versions.len() as u64 == p as u64 => {
                    versions.push(l.version[p])
                }
                _ => runs.push((p as u64, vec![l.version[p]])),
            }
            budget -= 1;
        }
        scanned += 1;
        p = (p + 1) % n;
    }
    l.cursor = p;
}

/// The counts the ledger keeps as pages change equal a count of every page.
fn assert_counts(l: &Ledger) -> Result<(), TestCaseError> {
    let stale = (0..l.version.len())
        .filter(|&p| l.acked[p] != l.version[p])
        .count() as u64;
    let wanted: Vec<u64> = (0..l.version.len())
        .filter(|&p| l.acked[p] != l.version[p] && l.sent[p] != l.version[p])
        .map(|p| p as u64)
        .collect();
    prop_assert_eq!(l.stale_count(), stale);
    prop_assert_eq!(l.stale_set().count_ones(), stale);
    prop_assert_eq!(l.unsent_count(), wanted.len() as u64);
    prop_assert_eq!(l.wanted.iter_ones().collect::<Vec<_>>(), wanted);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn counts_and_batches_match_a_scan_of_every_page(
        // One page, one bitmap word, and three words with a partial last one.
        pages in prop_oneof![Just(1u64), Just(PAGES), Just(130u64)],
        ops in proptest::collection::vec(op(), 0..160),
        // Sends of nothing and of everything (a hurried round) beside the op's few.
        sizes in proptest::collection::vec(prop_oneof![3 => Just(None), 1 => Just(Some(0usize)), 1 => Just(Some(usize::MAX))], 160),
        spread in 0u64..130,
    ) {
        let mut ledger = Ledger::new(pages);
        let (mut runs, mut expected) = (Vec::new(), Vec::new());
        let mut version = 0;
        for (op, size) in ops.into_iter().zip(sizes) {
            match op {
                // Writes land across the whole ledger, not only its first word.
                Op::Write(p) => ledger.mark_dirty(&[(p * 5 + spread) % pages]),
                Op::Harvest => ledger.mark_dirty(&[]),
                Op::Send(n) => {
                    let n = size.unwrap_or(n);
                    let mut by_scan = ledger.clone();
                    next_batch_by_scan(&mut by_scan, n, &mut expected);
                    ledger.next_batch(n, &mut runs);
                    prop_assert_eq!(&runs, &expected);
                    prop_assert_eq!(ledger.cursor, by_scan.cursor);
                    prop_assert_eq!(&ledger.sent, &by_scan.sent);
                    prop_assert_eq!(ledger.pages_resent(), by_scan.pages_resent());
                }
                // Acknowledge a page at some version up to its current one.
                Op::Deliver | Op::Ack => {
                    version += 1;
                    let p = (version * 11 + spread) % pages;
                    ledger.ack(p, ledger.version(p).min(1 + version % 3));
                }
                Op::Crash { .. } => ledger.forget_in_flight(),
                Op::Reconnect => {
                    let mut invalid = Bitmap::new(pages);
                    invalid.set(version % pages);
                    invalid.set((version * 7 + 3) % pages);
                    ledger.invalidate(&invalid);
                }
            }
            assert_counts(&ledger)?;
        }
    }

    #[test]
    fn stale_set_never_misses_a_page_that_differs(ops in proptest::collection::vec(op(), 0..120)) {
        let mut m = Model::new();
        let mut ledger = Ledger::new(PAGES);
        let mut runs = Vec::new();
        for op in ops {
            match op {
                Op::Write(p) => {
                    m.content[p as usize] += 1;
                    m.dirty[p as usize] = true;
                }
                Op::Harvest => m.harvest(&mut ledger),
                Op::Send(n) if m.connected => {
                    ledger.next_batch(n, &mut runs);
                    for (first, versions) in &runs {
                        for (i, &v) in versions.iter().enumerate() {
                            let p = first + i as u64;
                            m.in_flight.push_back((p, v, m.content[p as usize]));
                        }
                    }
                }
                Op::Send(_) => {}
                Op::Deliver => {
                    if let Some((p, v, c)) = m.in_flight.pop_front() {
                        m.standby[p as usize] = (v, c, false);
                        m.unacked.push((p, v));
                    }
                }
                Op::Ack if m.connected => {
                    for (p, v) in m.unacked.drain(..) {
                        ledger.ack(p, v);
                    }
                }
                Op::Ack => {}
                Op::Crash { tear } => {
                    // Whatever was being written when the standby died is detectably torn.
                    if tear {
                        if let Some((p, _, _)) = m.in_flight.front() {
                            m.standby[*p as usize].2 = true;
                        }
                    }
                    m.in_flight.clear();
                    m.unacked.clear();
                    m.connected = false;
                    ledger.forget_in_flight();
                }
                Op::Reconnect => {
                    if !m.connected {
                        ledger.invalidate(&m.invalid());
                        m.connected = true;
                    }
                }
            }
        }
        // Switchover: the guest is paused, a final harvest, then the stale set; the standby
        // adds what it cannot serve.
        m.harvest(&mut ledger);
        let mut stale = ledger.stale_set();
        stale.union_with(&m.invalid());
        for p in 0..PAGES {
            if !stale.get(p) {
                let (v, c, torn) = m.standby[p as usize];
                prop_assert!(!torn && v != 0, "page {} fresh but standby has nothing usable", p);
                prop_assert_eq!(c, m.content[p as usize], "page {} fresh but differs", p);
            }
        }
    }
}

#[test]
fn batches_skip_fresh_and_in_flight_pages_and_form_runs() {
    let mut l = Ledger::new(10);
    let mut runs = Vec::new();
    l.next_batch(4, &mut runs);
    assert_eq!(runs, vec![(0, vec![1, 1, 1, 1])]);
    assert!(!l.was_acked(0), "in flight, not acknowledged");
    l.next_batch(100, &mut runs);
    assert_eq!(
        runs,
        vec![(4, vec![1; 6])],
        "in-flight pages are not resent"
    );
    for p in 0..10 {
        l.ack(p, 1);
    }
    assert_eq!(l.stale_count(), 0);
    l.mark_dirty(&[3, 4, 9]);
    assert_eq!(l.stale_count(), 3);
    assert_eq!(l.unsent_count(), 3);
    l.next_batch(100, &mut runs);
    // The scan goes on from where the last batch stopped.
    assert_eq!(runs, vec![(4, vec![2]), (9, vec![2]), (3, vec![2])]);
    assert_eq!(l.unsent_count(), 0, "all three are in flight");
    // Dirtied again while in flight: the ack of version 2 leaves it stale.
    l.mark_dirty(&[3]);
    l.ack(3, 2);
    assert!(!l.is_fresh(3));
    l.ack(4, 2);
    assert!(l.is_fresh(4));
}

#[test]
fn invalid_pages_and_lost_connections_are_resent() {
    let mut l = Ledger::new(4);
    let mut runs = Vec::new();
    l.next_batch(4, &mut runs);
    for p in 0..4 {
        l.ack(p, 1);
    }
    let mut torn = Bitmap::new(4);
    torn.set(2);
    l.invalidate(&torn);
    assert_eq!(l.stale_set().iter_ones().collect::<Vec<_>>(), vec![2]);
    l.next_batch(4, &mut runs);
    assert_eq!(runs, vec![(2, vec![1])]);
    l.forget_in_flight();
    l.next_batch(4, &mut runs);
    assert_eq!(runs, vec![(2, vec![1])], "lost in flight, sent again");
    // Sending page 2 again is sending its first copy again (the standby lost it), not
    // what the guest wrote since; the others' next sends would be rewrites.
    assert!(!l.was_acked(2));
    assert!(l.was_acked(1));
    assert!(!l.was_acked(4), "outside the ledger");
}

#[test]
fn only_versions_lost_in_flight_count_as_resent() {
    let mut l = Ledger::new(4);
    let mut runs = Vec::new();
    l.next_batch(4, &mut runs);
    l.ack(0, 1);
    // 1, 2 and 3 were in flight at the cut; 3 is written meanwhile (a new version).
    l.forget_in_flight();
    l.mark_dirty(&[3]);
    l.next_batch(4, &mut runs);
    assert_eq!(runs, vec![(1, vec![1, 1, 2])]);
    assert_eq!(l.pages_resent(), 2, "pages 1 and 2, not 3's new version");
    // A second loss before anything was acknowledged: sent again, counted again.
    l.forget_in_flight();
    l.next_batch(1, &mut runs);
    assert_eq!(l.pages_resent(), 3);
}
