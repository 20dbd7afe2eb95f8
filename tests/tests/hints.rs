//! The host side of the guest agent's hints, end to end: agent protocol bytes over a Unix
//! socket into a `HintBoard`, then real postcopy migrations over QUIC on loopback into
//! userfaultfd-registered memory — a running KVM guest of the reference VMM, and the
//! non-KVM memory path with uffd-core's dirty tracker. Every migration compares digests of
//! all memory (with the pages skipped as free zeroed on the source side) or, while the
//! guest keeps running, of every page it cannot write.
//!
//! The KVM tests are skipped (with a message) only where /dev/kvm does not exist.

use std::sync::Arc;
use std::time::{Duration, Instant};

use faultline_tests::kvm_present;
use faultline_tests::loopback::{
    agent_report, feed_agent, migrate, reference_hot, AgentChunk, Check, GuestSpec, Mode, Outcome,
    SourceGuest,
};
use guest_agent::proto::{crc32, encode, Message, PfnRange, FRAME_SYNC, HEADER_LEN};
use refvmm::{Program, VmConfig};
use transport::bitmap::Bitmap;
use transport::encoding::EncodingPolicy;
use transport::tls::Identity;
use transport::{Layout, PAGE_SIZE};
use uffd_core::{open_tracker, GuestMemory, TrackerChoice};
use vmm_shim::hints::{
    skippable_free, BoardLimits, DirtyBaseline, HintBoard, HintError, HintPlan, Hints,
};
use vmm_shim::replica::PausedMemory;
use vmm_shim::{DestOptions, Listener, SourceOptions};

const MIB: u64 = 1 << 20;
const PAGE: u64 = PAGE_SIZE as u64;

/// A 128 MiB hot-cold guest with a 32 MiB working set; everything above the working set
/// holds pseudo-random bytes, and the top quarter of memory is what the agent calls free.
fn spec(vcpus: usize) -> GuestSpec {
    let mem = 128 * MIB;
    let ws = 32 * MIB;
    GuestSpec {
        config: VmConfig {
            mem_size: mem,
            vcpus,
            program: Program::HotCold { working_set: ws },
            report_every: 1 << 14,
        },
        run: Duration::from_millis(800),
        filled: (8 * MIB + ws) / PAGE..mem / PAGE,
        seed: 7,
    }
}

fn free_top_quarter(spec: &GuestSpec) -> Vec<PfnRange> {
    let pages = spec.config.mem_size / PAGE;
    vec![PfnRange::new(pages - pages / 4, pages / 4)]
}

/// Limits for an agent played by the test: its "scan" happens when it builds the report,
/// which is after dirty tracking started, so no scan age needs to be allowed for.
fn fresh_limits() -> BoardLimits {
    BoardLimits {
        max_scan_age: Duration::ZERO,
        ..BoardLimits::default()
    }
}

fn hints_from(src: &SourceGuest, limits: BoardLimits, chunks: Vec<AgentChunk>) -> HintBoard {
    let mut board = HintBoard::new(&src.layout(), limits).expect("layout");
    let fed = feed_agent(&mut board, chunks).expect("agent channel");
    assert!(
        fed.max_buffered <= board.max_buffered_bytes(),
        "buffered {} > cap {}",
        fed.max_buffered,
        board.max_buffered_bytes()
    );
    board
}

fn assert_verified(o: &Outcome) {
    assert!(
        o.digest_match,
        "digests differ: expected {} got {} ({:?})",
        o.expected_digest, o.dest_digest, o
    );
}

#[test]
fn hot_first_and_free_skipping_migrate_a_running_kvm_guest() {
    if !kvm_present() {
        return;
    }
    let t = Instant::now();
    let spec = spec(2);
    let mut src = SourceGuest::boot(spec.clone()).expect("boot");
    let hot = reference_hot(&spec.config);
    let free = free_top_quarter(&spec);
    let bytes = agent_report(1, spec.config.mem_size, false, &hot, &free);
    let mut board = hints_from(
        &src,
        fresh_limits(),
        vec![AgentChunk {
            after: Duration::ZERO,
            bytes,
        }],
    );
    let hints: Hints = board.take_hints().expect("the report was accepted");
    assert!(board.take_errors().is_empty());
    let free_pages = spec.config.mem_size / PAGE / 4;
    assert_eq!(hints.free_pages(), free_pages);
    assert_eq!(
        hints.hot_pages(),
        hot.iter().map(|r| r.count).sum::<u64>(),
        "pfn == page index for the reference VMM"
    );
    src.run_and_pause().expect("run");

    let enc = EncodingPolicy::OFF;
    let running = Check::Running {
        after: Duration::from_millis(100),
    };
    let plain = migrate(&mut src, Some(&hints), Mode::Plain, running, enc).unwrap();
    let hot_first = migrate(&mut src, Some(&hints), Mode::HotFirst, running, enc).unwrap();
    let skipping = migrate(&mut src, Some(&hints), Mode::HotFirstSkipFree, running, enc).unwrap();
    let held = migrate(
        &mut src,
        Some(&hints),
        Mode::HotFirstSkipFree,
        Check::Held,
        enc,
    )
    .unwrap();
    for o in [&plain, &hot_first, &skipping, &held] {
        assert_verified(o);
        eprintln!(
            "{:?}/{:?}: wire {} MiB, faults {}, blocked {:.1} ms, hot pushed {}, skipped {}",
            o.mode,
            o.check,
            o.wire_bytes >> 20,
            o.faults,
            o.blocked_ms,
            o.source.pages_pushed_hot,
            o.source.pages_skipped_free
        );
    }
    assert_eq!(held.pages_compared, spec.config.mem_size / PAGE);
    assert_eq!(held.guest_digests_match, Some(true));
    assert_eq!(plain.source.pages_pushed_hot, 0);
    assert_eq!(plain.source.pages_skipped_free, 0);
    for o in [&hot_first, &skipping] {
        // Hot pages the guest faulted on before the push reached them are served instead.
        assert!(o.source.pages_pushed_hot + o.source.session.pages_served >= o.source.pages_hot);
        assert!(o.source.pages_pushed_hot > 0);
    }
    // The guest never touched the free quarter and the agent said no poisoning: all of it
    // is skipped, and that much less crosses.
    assert_eq!(skipping.skip_refused, None);
    assert_eq!(skipping.source.pages_skipped_free, free_pages);
    assert_eq!(held.source.pages_skipped_free, free_pages);
    // Page bytes (payloads and kinds, from the source's encoder): each skipped page costs
    // its kind byte instead of 4097 bytes. A page can be sent twice when a demand request
    // crosses the push, hence the small tolerance.
    let page_bytes = |o: &Outcome| o.source.session.encoding.wire_bytes() as f64;
    let saved = page_bytes(&hot_first) - page_bytes(&skipping);
    let free_bytes = (free_pages * PAGE) as f64;
    // Each demand reply may repeat a page the push also sent; how many differs run to run
    // with the running guest, so the tolerance covers every reply of both runs.
    let replies = (hot_first.source.session.pages_served + skipping.source.session.pages_served)
        as f64
        * (PAGE + 1) as f64;
    assert!(
        (saved - free_bytes).abs() < 0.02 * free_bytes + replies,
        "saved {saved} page bytes for {free_bytes} free bytes ({replies} bytes of replies)"
    );
    // On the wire too (UDP both ways; QUIC adds its own overheads and retransmissions).
    let saved_wire = hot_first.wire_bytes as f64 - skipping.wire_bytes as f64;
    assert!(
        saved_wire > 0.8 * free_bytes && saved_wire < 1.2 * free_bytes,
        "saved {saved_wire} wire bytes for {free_bytes} free bytes"
    );
    eprintln!("test took {:?}", t.elapsed());
}

#[test]
fn poisoned_or_stale_free_hints_are_never_skipped() {
    if !kvm_present() {
        return;
    }
    let spec = spec(1);
    let hot = reference_hot(&spec.config);
    let free = free_top_quarter(&spec);
    // poison_on_free: the guest may check the pattern of a free page; keep it.
    let mut src = SourceGuest::boot(spec.clone()).expect("boot");
    let bytes = agent_report(1, spec.config.mem_size, true, &hot, &free);
    let mut board = hints_from(
        &src,
        fresh_limits(),
        vec![AgentChunk {
            after: Duration::ZERO,
            bytes,
        }],
    );
    let poisoned = board.take_hints().expect("accepted");
    assert!(poisoned.poison_on_free);
    // The agent's default scan age: the report may predate the dirty log's baseline.
    let bytes = agent_report(2, spec.config.mem_size, false, &hot, &free);
    let mut board = hints_from(
        &src,
        BoardLimits::default(),
        vec![AgentChunk {
            after: Duration::ZERO,
            bytes,
        }],
    );
    let stale = board.take_hints().expect("accepted");
    src.run_and_pause().expect("run");
    for (hints, why) in [(&poisoned, "poison"), (&stale, "predate")] {
        let o = migrate(
            &mut src,
            Some(hints),
            Mode::HotFirstSkipFree,
            Check::Running {
                after: Duration::ZERO,
            },
            EncodingPolicy::OFF,
        )
        .unwrap();
        assert_verified(&o);
        assert_eq!(o.source.pages_skipped_free, 0);
        assert!(o.skip_refused.as_deref().unwrap().contains(why), "{o:?}");
    }
    let o = migrate(
        &mut src,
        Some(&poisoned),
        Mode::HotFirstSkipFree,
        Check::Held,
        EncodingPolicy::OFF,
    )
    .unwrap();
    assert_verified(&o);
}

/// A frame with any type and payload, checksummed, as a hostile agent would forge it.
fn forged(msg_type: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = Vec::with_capacity(HEADER_LEN + payload.len());
    f.extend_from_slice(&FRAME_SYNC);
    f.push(msg_type);
    f.push(0);
    f.extend_from_slice(&len.to_le_bytes());
    f.extend_from_slice(&(!len).to_le_bytes());
    f.extend_from_slice(&crc32(payload).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

/// A `HotRanges` (2) or `FreeRanges` (3) payload with arbitrary ranges.
fn ranges_payload(seq: u64, last: bool, ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&seq.to_le_bytes());
    p.push(u8::from(last));
    p.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
    for &(first, count) in ranges {
        p.extend_from_slice(&first.to_le_bytes());
        p.extend_from_slice(&count.to_le_bytes());
    }
    p
}

#[test]
fn a_hostile_agent_gets_typed_errors_bounded_memory_and_corrupts_nothing() {
    if !kvm_present() {
        return;
    }
    let t = Instant::now();
    let spec = spec(1);
    let mem = spec.config.mem_size;
    let pages = mem / PAGE;
    let mut src = SourceGuest::boot(spec.clone()).expect("boot");
    let hot = reference_hot(&spec.config);
    let free = free_top_quarter(&spec);

    let mut hostile = Vec::new();
    // Garbage, and a frame header that lies about its length.
    hostile.extend((0..5000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    hostile.extend_from_slice(&[0xF1, 0x7A, 2, 0, 0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0]);
    // A Hello, so the ranges below are judged on their content.
    hostile.extend(agent_report(10, mem, false, &[], &[]));
    // Huge ranges: count near u64::MAX (overflows), and a pfn far beyond memory.
    hostile.extend(forged(2, &ranges_payload(11, true, &[(5, u64::MAX - 2)])));
    hostile.extend(forged(2, &ranges_payload(12, true, &[(1 << 40, 1)])));
    hostile.extend(forged(2, &ranges_payload(13, true, &[(pages - 1, 2)])));
    // Overlapping ranges inside one message, and across the parts of one report.
    hostile.extend(forged(2, &ranges_payload(14, true, &[(10, 10), (15, 10)])));
    hostile.extend(forged(2, &ranges_payload(15, false, &[(10, 10)])));
    hostile.extend(forged(2, &ranges_payload(15, true, &[(12, 1)])));
    // A page both hot and free.
    hostile.extend(forged(2, &ranges_payload(16, true, &[(100, 10)])));
    hostile.extend(forged(3, &ranges_payload(16, true, &[(105, 1)])));
    // A flood of 100k well-formed messages.
    let flood_msgs = [
        encode(&Message::ReportNow).unwrap(),
        forged(2, &ranges_payload(17, false, &[(0, 1)])),
        agent_report(18, mem, false, &[], &[]),
    ];
    let mut flood = Vec::new();
    let mut n = 0;
    while n < 100_000 {
        for m in &flood_msgs {
            flood.extend_from_slice(m);
        }
        // agent_report is three messages: Hello, HotRanges, FreeRanges.
        n += 5;
    }
    // After the flood, once the rate limit has refilled, a valid report.
    let good = agent_report(20, mem, false, &hot, &free);
    let limits = BoardLimits {
        max_scan_age: Duration::ZERO,
        messages_per_sec: 1000,
        burst: 2000,
        max_errors_kept: 64,
        ..BoardLimits::default()
    };
    let mut board = HintBoard::new(&src.layout(), limits).unwrap();
    let fed = feed_agent(
        &mut board,
        vec![
            AgentChunk {
                after: Duration::ZERO,
                bytes: hostile,
            },
            AgentChunk {
                after: Duration::ZERO,
                bytes: flood,
            },
            AgentChunk {
                after: Duration::from_millis(2500),
                bytes: good,
            },
        ],
    )
    .unwrap();
    let stats = board.stats().clone();
    eprintln!("{fed:?} {stats:?}");
    assert!(fed.max_buffered <= board.max_buffered_bytes());
    assert!(board.max_memory_bytes() < 8 << 20);
    assert!(stats.messages >= 100_000, "{stats:?}");
    assert!(stats.rate_limited >= 90_000, "{stats:?}");
    assert!(stats.garbage_bytes >= 4000, "{stats:?}");
    let errors = board.take_errors();
    assert_eq!(errors.len(), 64, "only the latest errors are kept");

    // The typed errors of the hostile part, fed again without the flood to see them all.
    let mut probe = HintBoard::new(&src.layout(), fresh_limits()).unwrap();
    let mut kinds = Vec::new();
    let mut bytes = vec![0x42u8; 100];
    bytes.extend(agent_report(10, mem, false, &[], &[]));
    bytes.extend(forged(2, &ranges_payload(11, true, &[(5, u64::MAX - 2)])));
    bytes.extend(forged(2, &ranges_payload(12, true, &[(1 << 40, 1)])));
    bytes.extend(forged(2, &ranges_payload(14, true, &[(10, 10), (15, 10)])));
    bytes.extend(forged(2, &ranges_payload(15, false, &[(10, 10)])));
    bytes.extend(forged(2, &ranges_payload(15, true, &[(12, 1)])));
    bytes.extend(forged(2, &ranges_payload(16, true, &[(100, 10)])));
    bytes.extend(forged(3, &ranges_payload(16, true, &[(105, 1)])));
    probe.feed_bytes(&bytes);
    for e in probe.take_errors() {
        kinds.push(match e {
            HintError::Decode(guest_agent::proto::DecodeError::Garbage { .. }) => "garbage",
            HintError::Decode(guest_agent::proto::DecodeError::Ranges(_)) => "bad ranges",
            HintError::OutsideGuest { bad, .. } if bad == 1 << 40 => "outside guest",
            HintError::Ranges { .. } => "parts overlap",
            HintError::HotFreeOverlap { .. } => "hot and free",
            _ => "other",
        });
    }
    assert_eq!(
        kinds,
        [
            "garbage",
            "bad ranges",
            "outside guest",
            "bad ranges",
            "parts overlap",
            "hot and free"
        ]
    );

    // What survived is the last valid report, and it migrates without corruption.
    let hints = board
        .take_hints()
        .expect("the valid report survived the flood");
    assert_eq!(hints.seq, 20);
    assert_eq!(hints.free_pages(), pages / 4);
    src.run_and_pause().expect("run");
    let o = migrate(
        &mut src,
        Some(&hints),
        Mode::HotFirstSkipFree,
        Check::Held,
        EncodingPolicy::AUTO,
    )
    .unwrap();
    assert_verified(&o);
    assert_eq!(o.source.pages_skipped_free, pages / 4);
    eprintln!("test took {:?}", t.elapsed());
}

/// Fills `mem` with page-numbered, non-zero content.
fn fill(mem: &GuestMemory) {
    // SAFETY: `mem` is a live private mapping of `len` bytes that only this thread
    // touches until the migration reads it.
    let bytes = unsafe { std::slice::from_raw_parts_mut(mem.as_ptr(), mem.len()) };
    for (i, page) in bytes.chunks_exact_mut(PAGE_SIZE).enumerate() {
        for (j, w) in page.chunks_exact_mut(8).enumerate() {
            let v = (i as u64) << 32 | j as u64 | 1;
            w.copy_from_slice(&v.to_le_bytes());
        }
    }
}

#[test]
fn free_pages_written_after_the_hint_cross_with_their_content() {
    // The non-KVM path: uffd-core memory and its own dirty tracker (uffd-wp-async, or
    // content hashing where the kernel lacks it), the memory frozen at switchover.
    let len = 32 * MIB;
    let pages = len / PAGE;
    let layout = Layout::single(len);
    let src = GuestMemory::anonymous(len as usize).unwrap();
    fill(&src);
    let region = src.host_region();
    let mut tracker = open_tracker(std::slice::from_ref(&region), TrackerChoice::Auto).unwrap();
    let baseline = DirtyBaseline::arm(tracker.as_mut()).unwrap();

    let mut board = HintBoard::new(&layout, fresh_limits()).unwrap();
    board.feed_bytes(&agent_report(
        1,
        len,
        false,
        &[PfnRange::new(6000, 500)],
        &[PfnRange::new(1000, 3000)],
    ));
    let hints = board.take_hints().expect("accepted");
    // The guest allocates and writes some free pages after the agent's scan.
    let written = [1000u64, 1001, 2500, 3999];
    for &p in &written {
        // SAFETY: inside the mapping; nothing else touches it now.
        unsafe { *src.as_ptr().add((p * PAGE) as usize + 8) = 0xAB };
    }
    let written_since = baseline.finish(tracker.as_mut(), &[], pages).unwrap();
    let skip = skippable_free(&hints, &written_since).unwrap();
    assert_eq!(skip.reported_free, 3000);
    assert_eq!(skip.written_since, written.len() as u64);
    assert_eq!(skip.skipped(), 3000 - written.len() as u64);
    let plan = HintPlan::with_free_skip(&hints, skip.clone());
    drop(tracker);

    let dst = GuestMemory::anonymous(len as usize).unwrap();
    let (src_id, dst_id) = (
        Identity::generate("source").unwrap(),
        Identity::generate("dest").unwrap(),
    );
    let listener = Listener::bind(DestOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        identity: dst_id.clone(),
        peer_cert: src_id.cert.clone(),
        expected_vm_id: None,
        accept_timeout: Duration::from_secs(30),
        progress: None,
        recover_timeout: None,
        hand_over_timeout: vmm_shim::dest::HAND_OVER_TIMEOUT,
    })
    .unwrap();
    let addr = listener.local_addr().unwrap();
    let dst_region = dst.host_region();
    let dest_layout = layout.clone();
    let dest = std::thread::spawn(move || listener.receive(&[dst_region], &dest_layout, || {}));
    let report = vmm_shim::send_with_hints(
        // SAFETY: nothing writes the source memory during the migration.
        Arc::new(unsafe { PausedMemory::new(&[region]) }.unwrap()),
        &layout,
        &SourceOptions {
            connect: addr,
            identity: src_id,
            peer_cert: dst_id.cert,
            vm_id: "image".into(),
            connect_timeout: Duration::from_secs(30),
            push: true,
            encoding: EncodingPolicy::AUTO,
            early_push: true,
            stopper: vmm_shim::Stopper::new(),
            progress: None,
            recover_timeout: None,
            rate_limit: None,
        },
        None,
        &plan,
    )
    .unwrap();
    let dest_report = dest.join().unwrap().unwrap();
    assert_eq!(report.pages_skipped_free, 3000 - written.len() as u64);
    assert_eq!(report.pages_hot, 500);
    assert_eq!(dest_report.pages, pages);

    // SAFETY: both mappings are live and no longer written by anyone.
    let (a, b) = unsafe {
        (
            std::slice::from_raw_parts(src.as_ptr(), len as usize),
            std::slice::from_raw_parts(dst.as_ptr(), len as usize),
        )
    };
    let mut expected = a.to_vec();
    for p in skip.pages.iter_ones() {
        expected[(p * PAGE) as usize..((p + 1) * PAGE) as usize].fill(0);
    }
    assert_eq!(
        vmm_shim::digest::digest(&expected),
        vmm_shim::digest::digest(b),
        "destination != source with free pages zeroed"
    );
    for &p in &written {
        assert_eq!(
            b[(p * PAGE) as usize + 8],
            0xAB,
            "written free page {p} kept its content"
        );
    }
    let zeroed = Bitmap::new(pages);
    assert_ne!(skip.pages, zeroed);
}
