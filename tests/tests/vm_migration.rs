//! A running KVM guest of the reference VMM migrated by postcopy between two real
//! `faultline vm` processes over QUIC on loopback, with userfaultfd on the destination.
//! Skipped (with a message) only where /dev/kvm does not exist.

use std::time::{Duration, Instant};

use faultline_tests::{kvm_present, run_vm_source, Certs, DestProcess, ShmDir};
use serde_json::Value;

fn u64s(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_u64().expect("a counter"))
        .collect()
}

/// How the guest reaches the destination.
#[derive(Clone, Copy, PartialEq)]
enum Via {
    /// Plain postcopy: every page crosses.
    Postcopy,
    /// Replicated to a standby VMM while it runs (KVM dirty log), then evacuated into the
    /// replica; with a stale share, exactly that much of memory is made stale first.
    Replica { stale_pct: Option<u32> },
}

/// Migrates a 64 MiB guest running `program` (over a 32 MiB working set) after it ran for a
/// while, and checks everything the issue asks of a migration. Returns the source's and
/// the destination's reports (`None` without KVM).
fn migrate_running_guest(program: &str, vcpus: usize, via: Via) -> Option<(Value, Value)> {
    migrate_running_guest_with(program, vcpus, via, &[], &[])
}

/// [`migrate_running_guest`] with more guest options for both ends (`both`) and more
/// options for the source.
fn migrate_running_guest_with(
    program: &str,
    vcpus: usize,
    via: Via,
    both: &[&str],
    source: &[&str],
) -> Option<(Value, Value)> {
    if !kvm_present() {
        return None;
    }
    let started = Instant::now();
    let certs = Certs::new();
    let v = vcpus.to_string();
    let replica_dir = ShmDir::new("vm");
    let dir = replica_dir.arg();
    let mut dest_extra = vec![];
    let mut src_extra = vec![];
    let pct;
    if let Via::Replica { stale_pct } = via {
        dest_extra.extend(["--replica-dir", &dir]);
        src_extra.push("--replicate");
        if let Some(p) = stale_pct {
            pct = p.to_string();
            src_extra.extend(["--stale-pct", &pct]);
        }
    }
    let guest = [
        "--size",
        "64M",
        "--vcpus",
        &v,
        "--program",
        program,
        "--working-set",
        "32M",
        "--report-every",
        "16384",
        "--run-secs",
        "1",
    ];
    let dest = DestProcess::vm(&certs, &[&guest[..], both, &dest_extra].concat());
    let src = run_vm_source(
        &certs,
        &dest.addr,
        &[&guest[..], both, &src_extra, source].concat(),
        Duration::from_secs(60),
    );
    let dst = dest.wait(Duration::from_secs(60));
    assert!(src.status.success(), "source failed: {}", src.stderr);
    assert!(dst.status.success(), "destination failed: {}", dst.stderr);
    let (s, d) = (&src.json, &dst.json);
    eprintln!("source: {s}\ndestination: {d}");

    // The guest was running and paused cleanly, right after a progress report.
    let at = u64s(&s["guest_progress_at_switchover"]);
    assert_eq!(at.len(), vcpus);
    assert!(at.iter().all(|&c| c > 0), "guest made no progress: {at:?}");
    assert!(
        s["paused_at_report"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b == true),
        "source vCPUs did not pause at a report: {s}"
    );

    // Progress continues on the destination from where it stopped, never restarted.
    assert_eq!(u64s(&d["guest_progress_at_switchover"]), at);
    let first: Vec<u64> = d["guest_progress_first"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().expect("each vCPU reported after the restore"))
        .collect();
    let fin = u64s(&d["guest_progress_final"]);
    for i in 0..vcpus {
        assert!(
            first[i] >= at[i],
            "vCPU {i} restarted: first report {} after switchover at {}",
            first[i],
            at[i]
        );
        assert!(
            fin[i] > at[i],
            "vCPU {i} made no progress after migration: {} -> {}",
            at[i],
            fin[i]
        );
    }
    assert_eq!(d["continued"], true);

    // The guest's own digest of its slice, computed right after resuming (reading the whole
    // slice through userfaultfd), equals the source host's hash of it at switchover and the
    // destination host's hash of the same bytes.
    let slices = s["slice_digests"].as_array().unwrap();
    assert_eq!(slices.len(), vcpus);
    assert_eq!(&d["guest_digests"], &s["slice_digests"], "guest digests");
    assert_eq!(&d["host_digests"], &s["slice_digests"], "host digests");

    // The vCPUs themselves waited for remote pages (their accesses fault through KVM), and
    // that time is attributed per vCPU; it cannot exceed the total over all threads.
    let per_vcpu: Vec<f64> = d["vcpu_blocked_ms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(per_vcpu.len(), vcpus);
    // (Into a replica only the stale half of memory or less crosses, and the push, at over
    // 1 GB/s on loopback, may win every race: faults are not certain; nor with the counter
    // program, whose memory is nearly all zero pages: the push beside the handshake carries
    // them as one-byte flags, read ahead at the destination and installed as the guest
    // resumes, before its vCPUs reach them.)
    let faults_expected = matches!(via, Via::Postcopy) && program != "counter";
    if faults_expected {
        assert!(per_vcpu.iter().any(|&b| b > 0.0), "{d}");
    }
    assert!(per_vcpu.iter().sum::<f64>() <= d["blocked_ms"].as_f64().unwrap() + 1e-6);

    // Host-side digest of all guest memory at switchover: destination equals source.
    assert!(s["memory_digest"].is_string());
    // The session's path: packets went, and the report says so.
    assert!(s["path"]["sent_packets"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(
        d["switchover_digest"], s["memory_digest"],
        "memory at switchover differs"
    );

    // It was postcopy: the guest resumed before memory arrived and faulted pages in, and
    // every page that had to cross was installed.
    if faults_expected {
        assert!(d["faults"].as_u64().unwrap() > 0, "no userfaultfd faults");
    }
    let pages = d["memory_bytes"].as_u64().unwrap() / 4096;
    // `pages_zero` counts the zero pages among those two, not pages of its own.
    let installed = ["pages_faulted", "pages_pushed"]
        .iter()
        .map(|k| d[*k].as_u64().unwrap())
        .sum::<u64>();
    match via {
        Via::Postcopy => assert!(installed >= pages, "{installed} of {pages} pages installed"),
        Via::Replica { stale_pct } => check_replica(s, d, pages, installed, vcpus, stale_pct),
    }
    let downtime = d["downtime_ms"].as_f64().unwrap();
    assert!(
        downtime > 0.0 && downtime < 5_000.0,
        "implausible downtime {downtime} ms"
    );
    assert!(d["resume_ms"].as_f64().unwrap() < d["session_ms"].as_f64().unwrap());
    // Timed from the source's stop, the migration includes the state's arrival (all pages
    // can be present before the first vCPU runs, so not necessarily the whole downtime).
    assert!(
        d["state_ms"].as_f64().unwrap() <= d["total_ms"].as_f64().unwrap(),
        "{d}"
    );
    eprintln!(
        "{vcpus} vCPU(s): downtime {downtime:.1} ms, resume {} ms, {} faults, test took {:?}",
        d["resume_ms"],
        d["faults"],
        started.elapsed()
    );
    Some((src.json, dst.json))
}

/// With a replica: only stale pages crossed, every other page came from the replica, and
/// the source and the standby agree on what was stale.
fn check_replica(
    s: &Value,
    d: &Value,
    pages: u64,
    installed: u64,
    vcpus: usize,
    stale_pct: Option<u32>,
) {
    let (sr, dr) = (&s["replica"], &d["replica"]);
    assert_eq!(sr["tracker"], "kvm-dirty-log", "{sr}");
    assert!(
        sr["pages_acked"].as_u64().unwrap() > 0,
        "nothing replicated: {sr}"
    );
    let stale = dr["pages_stale"].as_u64().unwrap();
    assert_eq!(
        sr["pages_stale"].as_u64(),
        Some(stale),
        "source and standby disagree"
    );
    let from_replica = dr["pages_from_replica"].as_u64().unwrap();
    assert!(from_replica > 0, "nothing served from the replica: {dr}");
    assert!(stale < pages, "every page was stale: {dr}");
    assert!(
        installed >= stale,
        "{installed} installed of {stale} stale pages"
    );
    assert!(
        installed <= stale + vcpus as u64,
        "non-stale pages crossed: {installed} > {stale}"
    );
    if let Some(p) = stale_pct {
        // Exactly the requested share, plus the vCPU data areas the VMM armed for the
        // digest check (its own writes, recorded beside the dirty log's).
        let want = (pages as f64 * f64::from(p) / 100.0).round() as u64;
        assert!(
            (want..=want + vcpus as u64).contains(&stale),
            "{stale} pages stale, asked for {want}"
        );
    }
}

#[test]
fn running_writer_with_one_vcpu_migrates_and_continues() {
    migrate_running_guest("random-rw", 1, Via::Postcopy);
}

#[test]
fn running_writer_with_four_vcpus_migrates_and_continues() {
    migrate_running_guest("random-rw", 4, Via::Postcopy);
}

/// A guest that never touched its working set before switchover: reading it at the
/// destination must not change guest memory (page-table accessed/dirty bits are preset).
#[test]
fn counter_guest_migrates_and_memory_is_unchanged_by_first_touch() {
    migrate_running_guest("counter", 2, Via::Postcopy);
}

/// Memory nearly all zero (the counter guest: its code, page tables and data areas are the
/// only data pages) in memfds on both sides: the source knows the zeros from its memfd's
/// holes and sends them as long runs; the destination leaves them as its memfd's holes,
/// allocating nothing, and installs the data pages. All memory at switchover still
/// arrives byte for byte (checked inside), and the guest reads its zeros after.
#[test]
fn mostly_zero_guest_leaves_its_zero_pages_as_holes_and_arrives_intact() {
    let Some((s, d)) = migrate_running_guest("counter", 1, Via::Postcopy) else {
        return;
    };
    assert_eq!(d["switchover_digest"], s["memory_digest"]);
    let pages = d["memory_bytes"].as_u64().unwrap() / 4096;
    let holes = d["pages_zero_holes"].as_u64().unwrap();
    let zero = d["pages_zero"].as_u64().unwrap();
    let installed = d["pages_pushed"].as_u64().unwrap() + d["pages_faulted"].as_u64().unwrap();
    assert!(
        holes > pages / 2,
        "{holes} of {pages} pages left as holes: {d}"
    );
    assert!(holes <= zero && zero < installed, "{d}");
    assert!(installed - zero > 0, "no data pages: {d}");
}

#[test]
fn running_writer_with_one_vcpu_is_replicated_then_evacuated() {
    migrate_running_guest("random-rw", 1, Via::Replica { stale_pct: None });
}

#[test]
fn running_writer_with_four_vcpus_is_evacuated_with_ten_percent_stale() {
    migrate_running_guest(
        "random-rw",
        4,
        Via::Replica {
            stale_pct: Some(10),
        },
    );
}

/// A guest throttled on both ends (`--cpu-throttle`) with its replicator at idle priority,
/// as the fleet bench runs its KVM guests: replicated, evacuated with 10% stale, and
/// continued like any other (every check of `migrate_running_guest`, the digests included).
#[test]
fn a_throttled_guest_with_an_idle_replicator_is_evacuated() {
    let Some((s, d)) = migrate_running_guest_with(
        "scattered",
        1,
        Via::Replica {
            stale_pct: Some(10),
        },
        &["--cpu-throttle", "75"],
        &["--replicator-idle-priority"],
    ) else {
        return;
    };
    assert!(s["replica"]["pages_acked"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(d["continued"], true);
}

#[test]
fn mismatched_guest_config_is_refused_cleanly() {
    if !kvm_present() {
        return;
    }
    let certs = Certs::new();
    // The destination expects 2 vCPUs; the source sends a 1-vCPU guest.
    let dest = DestProcess::vm(
        &certs,
        &["--size", "32M", "--vcpus", "2", "--run-secs", "0"],
    );
    let src = run_vm_source(
        &certs,
        &dest.addr,
        &["--size", "32M", "--vcpus", "1", "--run-secs", "0.2"],
        Duration::from_secs(60),
    );
    let dst = dest.wait(Duration::from_secs(60));
    assert!(!dst.status.success(), "destination accepted a 1-vCPU guest");
    assert!(dst.stderr.contains("vCPU"), "unclear error: {}", dst.stderr);
    let _ = src;
}
