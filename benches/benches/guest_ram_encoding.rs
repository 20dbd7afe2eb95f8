//! Page encodings on the RAM of a real Linux guest, across an emulated WAN.
//!
//! Set-up: boots the Debian guest the tests use (`scripts/guest-image.sh`, QEMU TCG) with
//! 1 GiB of memory and an init (`rdinit=/ram-fill`, added to the initramfs) that gives it
//! something to hold: the initramfs carries a slice of the host's own files (shared
//! libraries from `/usr/lib/x86_64-linux-gnu`, documents and data from `/usr/share`, in path
//! order up to a budget each), the guest loads its kernel modules, copies those files onto a
//! tmpfs (a second copy, as a page cache holds), writes text of its own (the kernel's symbol
//! table and other `/proc` output, each copy shifted so no page repeats exactly), random
//! data (`/dev/urandom`, standing in for compressed or encrypted data) and keeps an
//! anonymous buffer alive (`faultline-touch`: one byte written per page). Then QEMU's
//! `pmemsave` (over a QMP socket) dumps all 1 GiB of guest-physical memory into a file in
//! the target directory (`<target>/guest-ram/`, reused while the recipe is unchanged;
//! `FAULTLINE_BENCH_RAM_IMAGE=PATH` uses a given dump instead). If the guest image cannot
//! be had (no QEMU and not root, offline) the bench prints one `skipped` line and exits 0.
//!
//! Each run: `faultline dest --size 1G` and `faultline source --image <dump> --encoding E`
//! with the [`wan_emu::WanEmulator`] between them, both processes told the link's BDP.
//! Links 200 Mbit/s × 20 ms and 1 Gbit/s × 20 ms; encodings off, lz4, dedup, all, auto;
//! `FAULTLINE_BENCH_ROUNDS` rounds (default 1) of all five, interleaved. Every run checks
//! that the destination's digest of all memory equals the source's.
//!
//! Per run: `total_ms` (the destination's session start → every page present), `wire_bytes`
//! (UDP payload bytes the emulator carried source → destination), `ideal_ms` = those bytes ×
//! 8 / rate + 1 RTT, `over_own_ideal` = total / ideal, CPU-seconds of each process (sampled
//! from `/proc`), what `auto` chose and its tuner's estimates. Per link a summary: the best
//! fixed encoding (median total), `auto_over_best` (issue 15's target ≤ 1.05) and the best's
//! `over_own_ideal` (target ≤ 1.15). Targets are reported, not enforced.
//!
//! Environment: `FAULTLINE_BENCH_ROUNDS` (1), `FAULTLINE_BENCH_LINKS` (only links whose name
//! contains one of these, comma-separated, e.g. `200Mbit`), `FAULTLINE_BENCH_ENCODINGS`
//! (a subset of the five), `FAULTLINE_BENCH_RAM_IMAGE` (a 1 GiB dump to use),
//! `FAULTLINE_BENCH_TIMELINE=1` (each row gets the link's rate every 50 ms).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use faultline_benches::e2e::{check_digests, finish_sampled, set_expected_bdp, with_link_timeline};
use faultline_benches::stats::median;
use faultline_benches::{emit, env_size, Link};
use faultline_tests::qemu::{guest_image, initrd_with, Guest, GuestImage, InitrdFile};
use faultline_tests::{Background, Certs, DestProcess};
use serde_json::{json, Value};
use wan_emu::{LinkConfig, WanEmulator};

const BENCH: &str = "guest_ram_encoding";
const MEM_MIB: u32 = 1024;
const MEM_BYTES: u64 = (MEM_MIB as u64) << 20;
const PAGE: usize = 4096;
const TIMEOUT: Duration = Duration::from_secs(600);
const ENCODINGS: [&str; 5] = ["off", "lz4", "dedup", "all", "auto"];
const TARGET_AUTO_OVER_BEST: f64 = 1.05;
const TARGET_BEST_OVER_IDEAL: f64 = 1.15;
/// Bytes of host files the initramfs carries, per source directory.
const HOST_LIBS_BYTES: u64 = 64 << 20;
const HOST_SHARE_BYTES: u64 = 64 << 20;
/// Changes whenever the recipe below changes, so a cached dump is rebuilt.
const RECIPE: &str = "ram-fill v1: libs 64M, share 64M, kallsyms x8, urandom 64M, touch 32M";

/// The guest's init: fill memory, say so, stay alive.
const RAM_FILL: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o size=90% tmpfs /tmp
echo "RAMFILL_INIT uptime=$(cut -d' ' -f1 /proc/uptime)"
/bin/faultline-modules >/dev/null 2>&1
# A second copy of the shipped files, as a page cache would hold them.
mkdir -p /tmp/copy
cp -a /data/. /tmp/copy/
# Text of the guest's own: the kernel's symbol table and other /proc output, each copy
# shifted by a different prefix so that no page of one equals a page of another.
i=0
while [ $i -lt 8 ]; do
  { printf '%*s\n' $((i * 37 + 1)) "copy $i"; cat /proc/kallsyms; cat /proc/meminfo /proc/vmstat /proc/slabinfo /proc/interrupts 2>/dev/null; } >/tmp/text.$i
  i=$((i + 1))
done
dmesg >/tmp/dmesg.txt
ls -lR /data /tmp/copy >/tmp/listing.txt 2>/dev/null
# Incompressible data (compressed or encrypted files).
dd if=/dev/urandom of=/tmp/random bs=1M count=64 2>/dev/null
# An anonymous heap of its own: one byte written per page.
/bin/faultline-touch 32 >/dev/null 2>&1 &
sleep 2
sync
echo "RAMFILL_MEM $(grep -E '^(MemFree|Cached|Shmem):' /proc/meminfo | tr -s ' ' | tr '\n' ' ')"
echo "RAMFILL_DONE uptime=$(cut -d' ' -f1 /proc/uptime)"
while true; do sleep 1; done
"#;

fn main() -> anyhow::Result<()> {
    let rounds = env_size("FAULTLINE_BENCH_ROUNDS", 1).max(1);
    let only_links = std::env::var("FAULTLINE_BENCH_LINKS").ok();
    let encodings: Vec<&str> = match std::env::var("FAULTLINE_BENCH_ENCODINGS") {
        Ok(v) => ENCODINGS
            .into_iter()
            .filter(|e| v.split(',').any(|w| w.trim() == *e))
            .collect(),
        Err(_) => ENCODINGS.to_vec(),
    };
    let image = match std::env::var_os("FAULTLINE_BENCH_RAM_IMAGE") {
        Some(p) => PathBuf::from(p),
        None => match build_ram_image()? {
            Ok(p) => p,
            Err(reason) => {
                emit(&json!({"bench": BENCH, "case": "skipped", "reason": reason}));
                return Ok(());
            }
        },
    };
    let len = std::fs::metadata(&image)
        .with_context(|| format!("{}", image.display()))?
        .len();
    if len != MEM_BYTES {
        bail!("{} is {len} bytes, not {MEM_BYTES}", image.display());
    }
    let mut info = image_stats(&image)?;
    info["bench"] = json!(BENCH);
    info["case"] = json!("image");
    info["path"] = json!(image.display().to_string());
    info["recipe"] = json!(RECIPE);
    emit(&info);

    let certs = Certs::new();
    let image_arg = image.display().to_string();
    for link in [
        Link {
            rate_bps: 200_000_000,
            rtt_ms: 20,
        },
        Link {
            rate_bps: 1_000_000_000,
            rtt_ms: 20,
        },
    ]
    .into_iter()
    .filter(|l| {
        only_links
            .as_deref()
            .is_none_or(|o| o.split(',').any(|w| l.name().contains(w.trim())))
    }) {
        set_expected_bdp(link.rate_bps, Duration::from_millis(link.rtt_ms));
        let mut rows = Vec::new();
        for round in 0..rounds {
            for &encoding in &encodings {
                let mut row = measure(&certs, &image_arg, link, encoding)?;
                row["round"] = json!(round);
                emit(&row);
                rows.push(row);
            }
        }
        emit(&summary(link, rounds, &encodings, &rows));
    }
    Ok(())
}

/// Medians per encoding and the comparison issue 15 asks for.
fn summary(link: Link, rounds: u64, encodings: &[&str], rows: &[Value]) -> Value {
    let med = |e: &str, key: &str| {
        let v: Vec<f64> = rows
            .iter()
            .filter(|r| r["encoding"] == e)
            .filter_map(|r| r[key].as_f64())
            .collect();
        if v.is_empty() {
            f64::NAN
        } else {
            median(&v)
        }
    };
    let per: BTreeMap<&str, Value> = encodings
        .iter()
        .map(|&e| {
            (
                e,
                json!({
                    "total_ms": med(e, "total_ms"),
                    "wire_mb": med(e, "wire_bytes") / 1e6,
                    "over_own_ideal": med(e, "over_own_ideal"),
                    "source_cpu_s": med(e, "source_cpu_s"),
                    "dest_cpu_s": med(e, "dest_cpu_s"),
                }),
            )
        })
        .collect();
    let best = encodings
        .iter()
        .filter(|&&e| e != "auto")
        .map(|&e| (e, med(e, "total_ms")))
        .min_by(|a, b| a.1.total_cmp(&b.1));
    let auto_ms = med("auto", "total_ms");
    let (best_name, best_ms) = best.unwrap_or(("none", f64::NAN));
    let best_over_ideal = med(best_name, "over_own_ideal");
    let auto_over_best = auto_ms / best_ms;
    json!({
        "bench": BENCH,
        "case": format!("{}_summary", link.name()),
        "link": link.name(),
        "rounds": rounds,
        "medians": per,
        "best_fixed": best_name,
        "best_fixed_ms": best_ms,
        "auto_ms": auto_ms,
        "auto_chose": rows.iter().filter(|r| r["encoding"] == "auto").map(|r| r["chosen"].clone()).collect::<Vec<_>>(),
        "auto_over_best": auto_over_best,
        "target_auto_over_best": TARGET_AUTO_OVER_BEST,
        "meets_auto_target": auto_over_best <= TARGET_AUTO_OVER_BEST,
        "best_over_own_ideal": best_over_ideal,
        "target_best_over_own_ideal": TARGET_BEST_OVER_IDEAL,
        "meets_ideal_target": best_over_ideal <= TARGET_BEST_OVER_IDEAL,
    })
}

/// One migration of `image` through `link` with `encoding`; a JSON row.
fn measure(certs: &Certs, image: &str, link: Link, encoding: &str) -> anyhow::Result<Value> {
    let size = MEM_BYTES.to_string();
    let dest = DestProcess::start(certs, &["--size", &size, "--workers", "1"]);
    let dest_addr: SocketAddr = dest.addr.parse().context("destination address")?;
    let wan = WanEmulator::start(
        "127.0.0.1:0".parse()?,
        dest_addr,
        LinkConfig::new(Duration::from_millis(link.rtt_ms), link.rate_bps),
    )?;
    let via = wan.local_addr().to_string();
    let started = Instant::now();
    let src = Background::source(
        certs,
        "source",
        &via,
        &["--image", image, "--encoding", encoding],
        &[],
    );
    let (finished, timeline) =
        with_link_timeline(Some(&wan), || finish_sampled(src, dest, TIMEOUT));
    let (src, dst, cpu) = finished?;
    let wall_ms = started.elapsed().as_secs_f64() * 1e3;
    check_digests(&src, &dst)?;
    let counters = wan.counters();
    let c2s = &counters.client_to_server;
    let (s, d) = (&src.json, &dst.json);
    let enc = &s["encoding"];
    let wire = c2s.bytes;
    let total_ms = d["total_ms"].as_f64().unwrap_or(f64::NAN);
    let ideal_ms = wire as f64 * 8.0 / link.rate_bps as f64 * 1e3 + link.rtt_ms as f64;
    let proc_cpu = |p: &str| {
        cpu.as_ref()
            .and_then(|c| c.process_cpu_secs.get(p).copied())
    };
    let gib_moved = MEM_BYTES as f64 / (1u64 << 30) as f64;
    Ok(json!({
        "bench": BENCH,
        "case": format!("{}_{encoding}", link.name()),
        "link": link.name(),
        "rate_bps": link.rate_bps,
        "rtt_ms": link.rtt_ms,
        "encoding": encoding,
        "total_ms": total_ms,
        "closed_ms": d["closed_ms"],
        "wall_ms": wall_ms,
        "wire_bytes": wire,
        "wire_packets": c2s.packets,
        "dropped_queue": c2s.dropped_queue,
        "dest_wire_bytes": d["wire_bytes"],
        "ideal_ms": ideal_ms,
        "over_own_ideal": total_ms / ideal_ms,
        "source_cpu_s": proc_cpu("source"),
        "dest_cpu_s": proc_cpu("dest"),
        "source_cpu_s_per_gib": proc_cpu("source").map(|c| c / gib_moved),
        "dest_cpu_s_per_gib": proc_cpu("dest").map(|c| c / gib_moved),
        "cpu_threads": cpu.as_ref().map(|c| c.threads.iter().take(6).map(|t| json!([t.process, t.thread, t.cpu_secs])).collect::<Vec<_>>()),
        "chosen": enc["chosen"],
        "compression_ratio": enc["compression_ratio"],
        "raw_bytes": enc["raw_bytes"],
        "lz4_bytes": enc["lz4_bytes"],
        "zero_bytes": enc["zero_bytes"],
        "ref_bytes": enc["ref_bytes"],
        "encoding_report": enc,
        "mix": s["mix"],
        "digest_match": true,
        "link_timeline_mbps": timeline.mbps,
        "link_timeline_rtt_ms": timeline.rtt_ms,
        "link_timeline_late_ms": timeline.late_ms,
    }))
}

/// Zero pages, repeated pages and how well the rest compresses (lz4, per page).
fn image_stats(path: &Path) -> anyhow::Result<Value> {
    let mut f = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(path)?);
    let mut page = vec![0u8; PAGE];
    let mut seen: HashMap<u128, ()> = HashMap::new();
    let (mut pages, mut zero, mut dup, mut unique_lz4, mut unique) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut compressed = Vec::new();
    while f.read_exact(&mut page).is_ok() {
        pages += 1;
        if page.iter().all(|&b| b == 0) {
            zero += 1;
            continue;
        }
        let h = xxhash_rust::xxh3::xxh3_128(&page);
        if seen.insert(h, ()).is_some() {
            dup += 1;
            continue;
        }
        unique += 1;
        compressed.clear();
        compressed.resize(lz4_flex::block::get_maximum_output_size(PAGE), 0);
        let n = lz4_flex::block::compress_into(&page, &mut compressed).unwrap_or(PAGE);
        unique_lz4 += n.min(PAGE) as u64;
    }
    Ok(json!({
        "bytes": pages * PAGE as u64,
        "pages": pages,
        "zero_pages": zero,
        "zero_share": zero as f64 / pages as f64,
        "repeated_pages": dup,
        "repeated_share": dup as f64 / pages as f64,
        "unique_pages": unique,
        "unique_lz4_ratio": unique_lz4 as f64 / (unique * PAGE as u64).max(1) as f64,
        // What lz4 + dedup per page could reach: unique non-zero pages, compressed.
        "floor_wire_mb": unique_lz4 as f64 / 1e6,
    }))
}

/// Where the dump is cached: `<target>/guest-ram/`.
fn cache_dir() -> PathBuf {
    // <target>/release/deps/<bench> -> <target>
    let exe = std::env::current_exe().unwrap_or_default();
    exe.ancestors()
        .nth(3)
        .map_or_else(std::env::temp_dir, Path::to_path_buf)
        .join("guest-ram")
}

/// The 1 GiB dump of a filled guest, built if not cached; `Ok(Err(reason))` to skip.
fn build_ram_image() -> anyhow::Result<Result<PathBuf, String>> {
    let dir = cache_dir();
    std::fs::create_dir_all(&dir)?;
    let out = dir.join("ram-1g.img");
    let stamp = dir.join("ram-1g.recipe");
    if std::fs::metadata(&out).is_ok_and(|m| m.len() == MEM_BYTES)
        && std::fs::read_to_string(&stamp).is_ok_and(|s| s == RECIPE)
    {
        eprintln!("[{BENCH}] reusing {}", out.display());
        return Ok(Ok(out));
    }
    let image = match guest_image() {
        Ok(i) => i,
        Err(reason) => return Ok(Err(reason)),
    };
    let t0 = Instant::now();
    let tmp = tempfile::tempdir()?;
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut host_bytes = 0;
    for (root, budget) in [
        ("/usr/lib/x86_64-linux-gnu", HOST_LIBS_BYTES),
        ("/usr/share", HOST_SHARE_BYTES),
    ] {
        host_bytes += collect_files(Path::new(root), budget, &mut files);
    }
    let mut entries = vec![InitrdFile {
        path: "ram-fill",
        mode: 0o755,
        data: RAM_FILL.as_bytes(),
    }];
    entries.extend(files.iter().map(|(p, d)| InitrdFile {
        path: p,
        mode: 0o644,
        data: d,
    }));
    let initrd = tmp.path().join("initrd.cpio");
    initrd_with(&image.initrd, &entries, &initrd);
    drop(entries);
    drop(files);
    let image = GuestImage { initrd, ..image };
    let qmp = tmp.path().join("qmp.sock");
    let mut guest = Guest::boot_with(
        &image,
        MEM_MIB,
        "rdinit=/ram-fill",
        &[
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp.display()),
        ],
    );
    let Some(done) = guest.wait_for(Duration::from_secs(600), |l| l.contains("RAMFILL_DONE"))
    else {
        bail!("the guest did not fill its memory:\n{}", guest.console());
    };
    let mem = guest
        .wait_for(Duration::ZERO, |l| l.contains("RAMFILL_MEM"))
        .unwrap_or_default();
    eprintln!(
        "[{BENCH}] guest filled in {:.1} s ({host_bytes} bytes of host files): {done}; {mem}",
        t0.elapsed().as_secs_f64()
    );
    let part = dir.join("ram-1g.img.part");
    let _ = std::fs::remove_file(&part);
    pmemsave(&qmp, &part)?;
    let written = std::fs::metadata(&part)?.len();
    if written != MEM_BYTES {
        bail!("pmemsave wrote {written} bytes, not {MEM_BYTES}");
    }
    drop(guest);
    std::fs::rename(&part, &out)?;
    std::fs::write(&stamp, RECIPE)?;
    eprintln!(
        "[{BENCH}] dumped guest RAM to {} in {:.1} s in all",
        out.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(Ok(out))
}

/// Regular files under `root` in path order, up to `budget` bytes (files of at most 8 MiB),
/// as `data/<path>`; the bytes taken.
fn collect_files(root: &Path, budget: u64, out: &mut Vec<(String, Vec<u8>)>) -> u64 {
    let mut stack = vec![root.to_path_buf()];
    let mut paths = Vec::new();
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                paths.push(e.path());
            }
        }
    }
    paths.sort();
    let mut taken = 0;
    for p in paths {
        let Some(name) = p.to_str().filter(|n| n.is_ascii() && !n.contains(' ')) else {
            continue;
        };
        let Ok(m) = std::fs::metadata(&p) else {
            continue;
        };
        if m.len() == 0 || m.len() > 8 << 20 || taken + m.len() > budget {
            continue;
        }
        let Ok(data) = std::fs::read(&p) else {
            continue;
        };
        taken += data.len() as u64;
        out.push((format!("data{name}"), data));
    }
    taken
}

/// QEMU's `pmemsave` of all guest memory into `file`, over the QMP socket `sock`.
fn pmemsave(sock: &Path, file: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let stream = loop {
        match UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => bail!("QMP {}: {e}", sock.display()),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    stream.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut w = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    // The greeting, then one command at a time; events may come between.
    r.read_line(&mut line)?;
    let mut call = |cmd: Value| -> anyhow::Result<Value> {
        writeln!(w, "{cmd}")?;
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                bail!("QMP closed");
            }
            let v: Value = serde_json::from_str(line.trim()).context("QMP reply")?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {cmd}: {e}");
            }
            return Ok(v);
        }
    };
    call(json!({"execute": "qmp_capabilities"}))?;
    call(json!({"execute": "stop"}))?;
    call(json!({"execute": "pmemsave", "arguments": {
        "val": 0, "size": MEM_BYTES, "filename": file.display().to_string()}}))?;
    Ok(())
}
