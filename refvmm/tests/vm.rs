//! The reference VMM on real KVM: guests run, pause, save, restore into a new VM and continue.
//! Skipped (with a message) only where /dev/kvm does not exist.

use std::path::Path;
use std::time::{Duration, Instant};

use refvmm::{
    layout, memory, GuestDigest, KvmDirtyLog, Program, StateError, Vm, VmConfig, VmError,
    VmOptions, VmSnapshot,
};
use uffd_core::DirtyTracker;
use vm_memory::GuestAddress;

const MEM: u64 = 64 << 20;

fn kvm_present() -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    eprintln!("SKIPPED: /dev/kvm is absent (load kvm_intel/kvm_amd to run the KVM tests)");
    false
}

fn config(vcpus: usize, program: Program) -> VmConfig {
    VmConfig {
        mem_size: MEM,
        vcpus,
        program,
        report_every: 1 << 14,
    }
}

fn random_rw() -> Program {
    Program::RandomRw {
        working_set: 32 << 20,
    }
}

/// Wait until every vCPU has reported progress beyond `above`.
fn wait_progress(vm: &Vm, above: &[u64]) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        vm.check_vcpus().expect("vCPUs healthy");
        let p = vm.progress();
        if p.iter().zip(above).all(|(p, a)| p > a) {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "no progress: {p:?} (above {above:?})"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_first_reports(vm: &Vm) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        vm.check_vcpus().expect("vCPUs healthy");
        let f = vm.first_progress();
        if f.iter().all(Option::is_some) {
            return f.into_iter().flatten().collect();
        }
        assert!(Instant::now() < deadline, "no first report: {f:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Request a digest from every vCPU and wait for them; each must match the host's hash.
fn checked_digests(vm: &Vm) -> Vec<GuestDigest> {
    let before = vm.digests().1;
    vm.request_digests().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        vm.check_vcpus().expect("vCPUs healthy");
        let (d, n) = vm.digests();
        if n.iter().zip(&before).all(|(n, b)| n > b) {
            let d: Vec<GuestDigest> = d.into_iter().flatten().collect();
            for (i, d) in d.iter().enumerate() {
                assert!(
                    d.matches(),
                    "vCPU {i}: guest digest {d:x?} differs from host"
                );
            }
            return d;
        }
        assert!(Instant::now() < deadline, "no digest reports: {n:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Guest ops per second, all vCPUs together, over `window` of running (read from the
/// counters in guest memory, which are exact, rather than the reports).
fn ops_per_sec(vm: &Vm, window: Duration) -> f64 {
    let t0 = Instant::now();
    let a: u64 = vm.guest_counters().unwrap().iter().sum();
    std::thread::sleep(window);
    let b: u64 = vm.guest_counters().unwrap().iter().sum();
    (b - a) as f64 / t0.elapsed().as_secs_f64()
}

#[test]
fn counter_guest_runs_on_1_and_4_vcpus() {
    if !kvm_present() {
        return;
    }
    for vcpus in [1, 4] {
        let mut vm = Vm::new(config(vcpus, Program::Counter)).unwrap();
        vm.start().unwrap();
        let first = wait_progress(&vm, &vec![0; vcpus]);
        let later = wait_progress(&vm, &first);
        let rate = ops_per_sec(&vm, Duration::from_millis(200));
        eprintln!("counter, {vcpus} vCPU(s): {rate:.0} ops/s; progress {first:?} -> {later:?}");
        vm.stop().unwrap();
        // The guest's own counters in memory are at least what it last reported.
        let mem = vm.guest_counters().unwrap();
        for (m, p) in mem.iter().zip(vm.progress()) {
            assert!(*m >= p, "memory counter {m} < reported {p}");
        }
    }
}

#[test]
fn pause_snapshot_restore_into_a_new_vm_continues_where_it_stopped() {
    if !kvm_present() {
        return;
    }
    for vcpus in [1, 4] {
        let cfg = config(vcpus, random_rw());
        let mut src = Vm::new(cfg.clone()).unwrap();
        src.start().unwrap();
        wait_progress(&src, &vec![0; vcpus]);
        let t_pause = Instant::now();
        let snap = src.pause().unwrap();
        let pause_ms = t_pause.elapsed().as_secs_f64() * 1e3;
        let at_pause = snap.counters().to_vec();
        let src_digest = src.memory_digest().unwrap();
        src.stop().unwrap();

        // The destination: new memory holding a byte copy, and the blob.
        let blob = snap.as_bytes().to_vec();
        let mem = memory::create_guest_memory(cfg.mem_size as usize).unwrap();
        memory::copy_memory(src.guest_memory(), &mem).unwrap();
        assert_eq!(memory::digest(&mem).unwrap(), src_digest);
        drop(src);
        let mut dst = Vm::restore(cfg, mem, VmSnapshot::from_bytes(blob).unwrap()).unwrap();
        assert_eq!(
            dst.progress(),
            at_pause,
            "progress starts at the pause values"
        );
        let t_start = Instant::now();
        dst.start().unwrap();
        let first = wait_first_reports(&dst);
        let first_report_ms = t_start.elapsed().as_secs_f64() * 1e3;
        for i in 0..vcpus {
            assert!(
                first[i] >= at_pause[i],
                "vCPU {i} restarted: first report {} < {} at pause",
                first[i],
                at_pause[i]
            );
            assert!(first[i] - at_pause[i] <= dst.config().report_every);
        }
        let last = wait_progress(&dst, &at_pause);
        checked_digests(&dst);
        let rate = ops_per_sec(&dst, Duration::from_millis(200));
        eprintln!(
            "random-rw, {vcpus} vCPU(s): pause {pause_ms:.2} ms, first report after restore \
             {first_report_ms:.2} ms, at pause {at_pause:?}, first {first:?}, later {last:?}, \
             {rate:.0} ops/s after restore"
        );
        dst.stop().unwrap();
    }
}

/// CPU time a thread of this process has used (`/proc/self/task/TID/schedstat`, guest mode
/// included).
fn thread_cpu(tid: u32) -> Duration {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).unwrap();
    let ns: u64 = s.split_whitespace().next().unwrap().parse().unwrap();
    Duration::from_nanos(ns)
}

/// Waits until no report came for `quiet` (a nap is under way); returns the count then.
fn wait_for_a_nap(vm: &Vm, quiet: Duration) -> Vec<u64> {
    let mut last = (vm.reports(), Instant::now());
    let deadline = Instant::now() + Duration::from_secs(20);
    while last.1.elapsed() < quiet {
        assert!(Instant::now() < deadline, "the guest never napped");
        std::thread::sleep(Duration::from_millis(1));
        let r = vm.reports();
        if r != last.0 {
            last = (r, Instant::now());
        }
    }
    last.0
}

/// How long until the first vCPU has made `count` reports in all.
fn time_to_reports(vm: &Vm, count: u64) -> Duration {
    let t = Instant::now();
    while vm.reports()[0] < count {
        assert!(t.elapsed() < Duration::from_secs(20), "no report in 20 s");
        std::thread::sleep(Duration::from_micros(200));
    }
    t.elapsed()
}

/// A throttled vCPU uses at most its share of a core, pauses at once (a nap ends on the
/// request), owes no nap for the time it was paused, and a lifted throttle ends a nap; a
/// throttle above 99% is refused.
#[test]
fn a_throttled_guest_uses_its_share_and_still_pauses() {
    if !kvm_present() {
        return;
    }
    let mut vm = Vm::new(config(1, random_rw())).unwrap();
    assert!(matches!(vm.set_cpu_throttle(100), Err(VmError::Config(_))));
    vm.start().unwrap();
    wait_progress(&vm, &[0]);
    let tid = vm.vcpu_thread_ids()[0];
    vm.set_cpu_throttle(90).unwrap();
    assert_eq!(vm.cpu_throttle(), 90);
    std::thread::sleep(Duration::from_millis(50));
    let (cpu, t) = (thread_cpu(tid), Instant::now());
    std::thread::sleep(Duration::from_millis(400));
    let share = (thread_cpu(tid) - cpu).as_secs_f64() / t.elapsed().as_secs_f64();
    eprintln!("throttled 90%: {share:.3} of a core");
    // At most 10% of a core, whatever else runs; one nap's slack on top.
    assert!(
        share < 0.2,
        "throttled to 90%, it used {share:.3} of a core"
    );

    // At 99% a nap after one 2 ms slice lasts 198 ms. Once no report came for 20 ms a nap
    // is under way with more than 150 ms left: a pause must not wait for it.
    vm.set_cpu_throttle(99).unwrap();
    wait_for_a_nap(&vm, Duration::from_millis(20));
    let t = Instant::now();
    vm.pause().unwrap();
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(150),
        "the pause waited {took:?}"
    );

    // Paused for longer than any slice: the vCPU owes no nap for it, so after the resume it
    // runs a 2 ms slice (several reports) before its first nap. Counted in wall time, the
    // first report would owe 20 ms × 99: a nap of 1.98 s.
    std::thread::sleep(Duration::from_millis(300));
    let at_resume = vm.reports()[0];
    vm.resume().unwrap();
    let took = time_to_reports(&vm, at_resume + 3);
    assert!(
        took < Duration::from_secs(1),
        "three reports took {took:?} after the resume"
    );

    // Lifting the throttle ends a nap under way.
    let napping = wait_for_a_nap(&vm, Duration::from_millis(20));
    vm.set_cpu_throttle(0).unwrap();
    let back = time_to_reports(&vm, napping[0] + 1);
    assert!(
        back < Duration::from_millis(150),
        "first report {back:?} after the lift"
    );
    vm.stop().unwrap();
}

#[test]
fn pause_and_resume_in_the_same_process() {
    if !kvm_present() {
        return;
    }
    let mut vm = Vm::new(config(2, Program::Counter)).unwrap();
    vm.start().unwrap();
    wait_progress(&vm, &[0, 0]);
    for _ in 0..5 {
        let snap = vm.pause().unwrap();
        let at_pause = snap.counters().to_vec();
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(
            vm.guest_counters().unwrap(),
            at_pause,
            "counter moved while paused"
        );
        vm.resume().unwrap();
        wait_progress(&vm, &at_pause);
    }
    vm.stop().unwrap();
}

#[test]
fn random_write_guest_changes_memory_and_nothing_writes_while_paused() {
    if !kvm_present() {
        return;
    }
    for program in [
        random_rw(),
        Program::SeqScan {
            working_set: 32 << 20,
        },
        Program::HotCold {
            working_set: 32 << 20,
        },
        Program::Scattered {
            working_set: 32 << 20,
        },
    ] {
        let mut vm = Vm::new(config(2, program)).unwrap();
        let d0 = vm.memory_digest().unwrap();
        vm.start().unwrap();
        assert!(matches!(
            vm.memory_digest(),
            Err(VmError::WrongState { .. })
        ));
        wait_progress(&vm, &[0, 0]);
        let rate = ops_per_sec(&vm, Duration::from_millis(200));
        let g1 = checked_digests(&vm);
        let g2 = checked_digests(&vm);
        assert_ne!(g1, g2, "{program:?}: slices unchanged between digests");
        vm.pause().unwrap();
        let d1 = vm.memory_digest().unwrap();
        assert_ne!(d0, d1, "{program:?} did not change memory");
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            vm.memory_digest().unwrap(),
            d1,
            "memory changed while paused"
        );
        vm.resume().unwrap();
        let p = vm.progress();
        wait_progress(&vm, &p);
        vm.pause().unwrap();
        assert_ne!(vm.memory_digest().unwrap(), d1, "no writes after resume");
        eprintln!("{program:?}, 2 vCPUs: {rate:.0} ops/s");
        vm.stop().unwrap();
    }
}

/// The scattered guest writes only where `Program::hot_ranges` says: its chunks change,
/// the rest of its slice stays zero.
#[test]
fn scattered_guest_writes_only_the_chunks_hot_ranges_names() {
    use vm_memory::Bytes;
    if !kvm_present() {
        return;
    }
    let program = Program::Scattered {
        working_set: 32 << 20,
    };
    let mut vm = Vm::new(config(2, program)).unwrap();
    vm.start().unwrap();
    let p = wait_progress(&vm, &[0, 0]);
    wait_progress(&vm, &p.iter().map(|p| p + (1 << 16)).collect::<Vec<_>>());
    vm.pause().unwrap();
    for i in 0..2 {
        let (base, len) = program.slice(i, 2);
        let mut slice = vec![0u8; len as usize];
        vm.guest_memory()
            .read_slice(&mut slice, GuestAddress(base))
            .unwrap();
        let changed = |r: std::ops::Range<u64>| {
            slice[(r.start - base) as usize..(r.end - base) as usize]
                .chunks_exact(8)
                .filter(|w| w.iter().any(|b| *b != 0))
                .count() as u64
        };
        let chunks = program.hot_ranges(i, 2);
        assert_eq!(chunks.len() as u64, len / 8 / (64 << 10));
        let in_chunks: u64 = chunks.iter().cloned().map(changed).sum();
        let all = changed(base..base + len);
        let touched = chunks.iter().filter(|r| changed((*r).clone()) > 0).count();
        eprintln!(
            "vCPU {i}: {in_chunks} words changed in {touched} of {} chunks",
            chunks.len()
        );
        assert_eq!(all, in_chunks, "vCPU {i} wrote outside its chunks");
        assert_eq!(touched, chunks.len(), "vCPU {i} left chunks untouched");
    }
    vm.stop().unwrap();
}

#[test]
fn bad_state_blobs_are_typed_errors() {
    if !kvm_present() {
        return;
    }
    let cfg = config(1, Program::Counter);
    let mut vm = Vm::new(cfg.clone()).unwrap();
    vm.start().unwrap();
    wait_progress(&vm, &[0]);
    let blob = vm.pause().unwrap().as_bytes().to_vec();
    vm.stop().unwrap();

    let mut other_version = blob.clone();
    other_version[8..12].copy_from_slice(&2u32.to_le_bytes());
    assert_eq!(
        VmSnapshot::from_bytes(other_version).unwrap_err(),
        StateError::Version {
            found: 2,
            expected: 1
        }
    );
    assert!(matches!(
        VmSnapshot::from_bytes(blob[..blob.len() - 10].to_vec()),
        Err(StateError::TruncatedPayload { .. })
    ));
    assert!(matches!(
        VmSnapshot::from_bytes(blob[..10].to_vec()),
        Err(StateError::TruncatedHeader { .. })
    ));
    assert!(matches!(
        VmSnapshot::from_bytes(Vec::new()),
        Err(StateError::TruncatedHeader { .. })
    ));
    assert_eq!(
        VmSnapshot::from_bytes(vec![0x5a; 100]).unwrap_err(),
        StateError::BadMagic
    );
    let mut flipped = blob.clone();
    let last = flipped.len() - 3;
    flipped[last] ^= 1;
    assert_eq!(
        VmSnapshot::from_bytes(flipped).unwrap_err(),
        StateError::Checksum
    );
    // A good blob that does not fit the VM it is restored into.
    let snap = VmSnapshot::from_bytes(blob).unwrap();
    let mem = memory::create_guest_memory(MEM as usize).unwrap();
    assert!(matches!(
        Vm::restore(config(2, Program::Counter), mem, snap),
        Err(VmError::State(StateError::Mismatch(_)))
    ));
}

#[test]
fn a_vm_prepared_before_its_state_continues_where_the_source_stopped() {
    if !kvm_present() {
        return;
    }
    let cfg = config(2, random_rw());
    let mut src = Vm::new(cfg.clone()).unwrap();
    src.start().unwrap();
    wait_progress(&src, &[0, 0]);
    let snap = src.pause().unwrap();
    let at_pause = snap.counters().to_vec();
    let src_digest = src.memory_digest().unwrap();
    src.stop().unwrap();

    // The destination builds its VM before the state exists; it cannot start yet.
    let mem = memory::create_guest_memory(cfg.mem_size as usize).unwrap();
    let mut dst = Vm::prepare_restore(cfg.clone(), mem.clone()).unwrap();
    assert!(matches!(dst.start(), Err(VmError::WrongState { .. })));
    memory::copy_memory(src.guest_memory(), &mem).unwrap();
    assert_eq!(memory::digest(&mem).unwrap(), src_digest);
    drop(src);
    // A snapshot of another shape is refused and changes nothing.
    let other = {
        let mut one = Vm::new(config(1, Program::Counter)).unwrap();
        one.start().unwrap();
        let s = one.pause().unwrap();
        one.stop().unwrap();
        s
    };
    assert!(matches!(
        dst.load_state(other),
        Err(VmError::State(StateError::Mismatch(_)))
    ));
    dst.load_state(snap).unwrap();
    assert_eq!(dst.progress(), at_pause);
    dst.start().unwrap();
    let first = wait_first_reports(&dst);
    for i in 0..2 {
        assert!(first[i] >= at_pause[i], "vCPU {i} restarted");
        assert!(first[i] - at_pause[i] <= dst.config().report_every);
    }
    wait_progress(&dst, &at_pause);
    checked_digests(&dst);
    dst.stop().unwrap();
}

#[test]
fn misuse_and_bad_configs_are_errors() {
    if !kvm_present() {
        return;
    }
    let mut vm = Vm::new(config(1, Program::Counter)).unwrap();
    assert!(matches!(vm.pause(), Err(VmError::WrongState { .. })));
    assert!(matches!(vm.resume(), Err(VmError::WrongState { .. })));
    vm.stop().unwrap();
    assert!(matches!(vm.start(), Err(VmError::WrongState { .. })));
    for bad in [
        config(0, Program::Counter),
        config(5, Program::Counter),
        VmConfig {
            mem_size: MEM + 4096,
            ..config(1, Program::Counter)
        },
        VmConfig {
            report_every: 1000,
            ..config(1, Program::Counter)
        },
        config(1, Program::RandomRw { working_set: MEM }),
    ] {
        assert!(matches!(Vm::new(bad), Err(VmError::Config(_))));
    }
}

#[test]
fn default_one_gib_guest_with_a_256_mib_working_set() {
    if !kvm_present() {
        return;
    }
    let cfg = VmConfig {
        vcpus: 2,
        program: Program::RandomRw {
            working_set: 256 << 20,
        },
        ..VmConfig::default()
    };
    assert_eq!(cfg.mem_size, 1 << 30);
    let mut vm = Vm::new(cfg).unwrap();
    vm.start().unwrap();
    wait_progress(&vm, &[0, 0]);
    let rate = ops_per_sec(&vm, Duration::from_millis(300));
    checked_digests(&vm);
    let t = Instant::now();
    let snap = vm.pause().unwrap();
    let pause_ms = t.elapsed().as_secs_f64() * 1e3;
    eprintln!(
        "1 GiB, random-rw over 256 MiB, 2 vCPUs: {rate:.0} ops/s, pause {pause_ms:.2} ms, \
         state blob {} bytes",
        snap.as_bytes().len()
    );
    vm.stop().unwrap();
}

fn dirty_logged(vcpus: usize) -> Vm {
    Vm::new_with_options(config(vcpus, random_rw()), VmOptions { dirty_log: true }).unwrap()
}

fn harvest(t: &mut KvmDirtyLog) -> Vec<u64> {
    let mut out = vec![u64::MAX]; // replaced, not appended to
    t.harvest(&mut out).unwrap();
    assert!(out.windows(2).all(|w| w[0] < w[1]), "not ascending");
    out
}

/// Pages a random-rw guest may write: its working-set slices, its data areas and stacks,
/// and the system tables below the code (CPU-set accessed bits). Never the code, nor the
/// memory past the working set.
fn guest_may_write(page: u64, vcpus: usize) -> bool {
    let addr = page * 4096;
    let in_slice = (0..vcpus).any(|i| {
        let (base, len) = random_rw().slice(i, vcpus);
        (base..base + len).contains(&addr)
    });
    in_slice
        || addr < layout::CODE_ADDR
        || (layout::DATA_BASE..layout::WORKSET_BASE).contains(&addr)
}

#[test]
fn kvm_dirty_log_reports_only_guest_writes_in_the_working_set() {
    if !kvm_present() {
        return;
    }
    for vcpus in [1, 2] {
        let mut vm = dirty_logged(vcpus);
        let mut t = vm.dirty_tracker().unwrap();
        assert_eq!(t.kind(), "kvm-dirty-log");
        let total = MEM / 4096;
        assert_eq!(t.pages(), total);
        assert_eq!(
            harvest(&mut t),
            (0..total).collect::<Vec<_>>(),
            "first = all"
        );

        vm.start().unwrap();
        wait_progress(&vm, &vec![0; vcpus]);
        let (ws_base, _) = random_rw().slice(0, vcpus);
        let ws_end = ws_base + random_rw().working_set();
        let mut seen = 0usize;
        for round in 0..5 {
            std::thread::sleep(Duration::from_millis(50));
            // A host write far outside the working set: KVM's log does not see it.
            let host_page = (MEM - 4096) / 4096;
            vm_memory::Bytes::write_obj(
                vm.guest_memory(),
                round + 1,
                GuestAddress(host_page * 4096),
            )
            .unwrap();
            let d = harvest(&mut t);
            assert!(
                !d.is_empty(),
                "round {round}: a writing guest dirtied nothing"
            );
            for &p in &d {
                assert!(p < total);
                // KVM marks a page dirty when it first maps it for the guest, even for a
                // read or fetch: round 0 may also report the code the guest only executes.
                let code = (layout::CODE_ADDR..layout::DATA_BASE).contains(&(p * 4096));
                assert!(
                    guest_may_write(p, vcpus) || (round == 0 && code),
                    "round {round}: page {p} ({:#x}) reported, outside what the guest writes",
                    p * 4096
                );
            }
            assert!(!d.contains(&host_page), "host write was logged");
            let in_ws = d
                .iter()
                .filter(|&&p| (ws_base..ws_end).contains(&(p * 4096)))
                .count();
            assert!(in_ws > 0, "round {round}: no working-set page among {d:?}");
            seen += d.len();
        }

        vm.pause().unwrap();
        let _ = harvest(&mut t); // writes up to the pause
        let after = harvest(&mut t);
        assert!(after.is_empty(), "paused guest dirtied {after:?}");
        eprintln!(
            "kvm-dirty-log, {vcpus} vCPU(s): {seen} pages reported over 5 harvests of a {} MiB working set",
            random_rw().working_set() >> 20
        );
        vm.stop().unwrap();
    }
}

#[test]
fn kvm_dirty_log_needs_the_option_and_is_send() {
    fn send<T: Send>(_: &T) {}
    if !kvm_present() {
        return;
    }
    let vm = Vm::new(config(1, random_rw())).unwrap();
    assert_eq!(vm.options(), VmOptions::default());
    assert!(matches!(vm.dirty_tracker(), Err(VmError::Config(_))));
    let vm = dirty_logged(1);
    let t = vm.dirty_tracker().unwrap();
    send(&t);
    // Harvesting from another thread, through the trait object.
    let mut boxed: Box<dyn DirtyTracker> = Box::new(t);
    let n = std::thread::spawn(move || {
        let mut out = Vec::new();
        boxed.harvest(&mut out).unwrap();
        out.len() as u64
    })
    .join()
    .unwrap();
    assert_eq!(n, MEM / 4096);
}

#[test]
fn async_page_faults_are_advertised_exactly_where_the_host_supports_them() {
    if !kvm_present() {
        return;
    }
    // What the host's KVM offers, read independently of the VMM.
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    let host_has = supported
        .as_slice()
        .iter()
        .any(|e| e.function == 0x4000_0001 && e.eax & (1 << 4) != 0);
    let vm = Vm::new(config(1, Program::Counter)).unwrap();
    assert_eq!(vm.async_pf_exposed(), host_has);
    eprintln!("KVM_FEATURE_ASYNC_PF advertised to the guest: {host_has}");
}
