//! How much a flood of junk handshakes delays a real migration's start.
//!
//! A destination (`vmm_shim::Listener`, userfaultfd-registered memory) listens on loopback;
//! the real source (`vmm_shim::send`) starts, and the time from its start to the moment the
//! destination resumes the guest (handshake, authentication, protocol handshake done) is
//! measured. Each round does it three ways, in the same run:
//! * `clean`: nothing else reaches the listener (the baseline);
//! * `junk_initials`: 1,000 datagrams shaped as QUIC v1 Initials (random ids and payload)
//!   from ten ports, sent just before the source starts;
//! * `unpinned_clients`: 1,000 real QUIC clients with a certificate the listener does not
//!   pin, their handshakes in flight when the source starts.
//!
//! The attackers send from [`ATTACKER_IP`], a loopback address of their own (Linux routes
//! all of 127/8 to `lo`), as another host would; the real source from 127.0.0.1.
//!
//! Prints one JSON line per case (`unit: "ms"`, count, p50, p90, p99, max, mean) and one
//! `ratio` line: each case's median over the clean median. The bar: at most 2.
//!
//! Environment: `FAULTLINE_BENCH_ROUNDS` (default 10), `FAULTLINE_BENCH_JUNK` (default 1000).

use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use faultline::SourceImage;
use faultline_benches::stats::Summary;
use faultline_benches::{emit, env_size};
use serde_json::{json, Value};
use transport::quic;
use transport::tls::{CertificateDer, Identity};
use transport::Layout;
use uffd_core::GuestMemory;
use vmm_shim::{DestOptions, Listener, SourceOptions};

const BENCH: &str = "handshake_flood";
/// The attackers' host: not the real source's address, whose handshakes the listener counts
/// apart (`AcceptLimits::max_handshakes_per_peer`).
const ATTACKER_IP: &str = "127.0.0.2";
const MEMORY: u64 = 16 << 20;

#[derive(Clone, Copy, Debug)]
enum Case {
    Clean,
    JunkInitials,
    UnpinnedClients,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::Clean => "clean",
            Case::JunkInitials => "junk_initials",
            Case::UnpinnedClients => "unpinned_clients",
        }
    }
}

/// `n` 1,200-byte datagrams shaped as QUIC v1 Initials, from ten source ports.
fn junk_initials(to: SocketAddr, n: usize, seed: u64) -> anyhow::Result<()> {
    let socks = (0..10)
        .map(|_| UdpSocket::bind((ATTACKER_IP, 0)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut x = seed | 1;
    let mut d = [0u8; 1200];
    for i in 0..n {
        for b in d.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = (x >> 56) as u8;
        }
        d[0] = 0xC3;
        d[1..5].copy_from_slice(&1u32.to_be_bytes());
        d[5] = 8;
        d[14] = 8;
        socks[i % socks.len()].send_to(&d, to)?;
    }
    Ok(())
}

/// Starts `n` QUIC clients with an unpinned certificate against `to` on `rt`; they run
/// until their handshakes fail.
fn unpinned_clients(
    rt: &tokio::runtime::Runtime,
    to: SocketAddr,
    n: usize,
    dest_cert: &CertificateDer<'static>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let stranger = Identity::generate("stranger")?;
    let _guard = rt.enter();
    // A few endpoints (sockets) carry all the clients, as an attacker's few hosts would.
    let endpoints = (0..8)
        .map(|_| {
            let bind = SocketAddr::new(ATTACKER_IP.parse().unwrap(), 0);
            quic::client_endpoint(bind, &stranger, dest_cert.clone())
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((0..n)
        .map(|i| {
            let ep = endpoints[i % endpoints.len()].clone();
            rt.spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(15), async {
                    if let Ok(conn) = quic::connect(&ep, to).await {
                        conn.closed().await;
                    }
                })
                .await;
            })
        })
        .collect())
}

/// One migration's time from the source's start to the guest resumed at the destination.
fn one_round(case: Case, junk: usize, round: u64) -> anyhow::Result<f64> {
    let (src_id, dst_id) = (Identity::generate("source")?, Identity::generate("dest")?);
    let listener = Listener::bind(DestOptions::new(
        "127.0.0.1:0".parse()?,
        dst_id.clone(),
        src_id.cert.clone(),
    ))?;
    let addr = listener.local_addr()?;
    let memory = GuestMemory::anonymous(MEMORY as usize)?;
    let layout = Layout::single(MEMORY);
    let resumed: Arc<Mutex<Option<Instant>>> = Arc::default();
    let at = resumed.clone();
    let regions = [memory.host_region()];
    let dest_layout = layout.clone();
    let dest = std::thread::spawn(move || {
        listener.receive(&regions, &dest_layout, move || {
            *at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        })
    });

    let attackers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let flood = match case {
        Case::Clean => Vec::new(),
        Case::JunkInitials => {
            junk_initials(addr, junk, round.wrapping_mul(0x9E37_79B9_7F4A_7C15))?;
            Vec::new()
        }
        Case::UnpinnedClients => {
            let tasks = unpinned_clients(&attackers, addr, junk, &dst_id.cert)?;
            // Let their Initials reach the listener first.
            std::thread::sleep(Duration::from_millis(20));
            tasks
        }
    };

    let image = Arc::new(SourceImage::synthetic(MEMORY, round)?);
    let opts = SourceOptions::new(addr, src_id, dst_id.cert, "vm0");
    let started = Instant::now();
    vmm_shim::send(image, &layout, &opts).context("the real source failed")?;
    dest.join()
        .map_err(|_| anyhow::anyhow!("destination thread panicked"))?
        .context("the destination failed")?;
    let resumed = resumed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .context("the guest never resumed")?;
    for t in flood {
        t.abort();
    }
    attackers.shutdown_timeout(Duration::from_secs(1));
    Ok(resumed.duration_since(started).as_secs_f64() * 1e3)
}

fn main() -> anyhow::Result<()> {
    let rounds = env_size("FAULTLINE_BENCH_ROUNDS", 10).max(1);
    let junk = env_size("FAULTLINE_BENCH_JUNK", 1000) as usize;
    let cases = [Case::Clean, Case::JunkInitials, Case::UnpinnedClients];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    // Interleaved, so the machine's load drifts over all cases alike.
    for round in 0..rounds {
        for (i, &case) in cases.iter().enumerate() {
            let ms = one_round(case, junk, round)
                .with_context(|| format!("{} round {round}", case.name()))?;
            eprintln!("[{BENCH}] round {round} {}: {ms:.2} ms", case.name());
            samples[i].push(ms);
        }
    }
    let summaries: Vec<Summary> = samples.into_iter().map(Summary::from_samples).collect();
    let mut ratios = serde_json::Map::new();
    for (case, s) in cases.iter().zip(&summaries) {
        let mut line = serde_json::Map::new();
        line.insert("bench".into(), json!(BENCH));
        line.insert("case".into(), json!(case.name()));
        line.insert("unit".into(), json!("ms"));
        line.insert(
            "junk".into(),
            json!(if matches!(case, Case::Clean) { 0 } else { junk }),
        );
        line.insert("memory_bytes".into(), json!(MEMORY));
        line.extend(s.to_json());
        emit(&Value::Object(line));
        ratios.insert(case.name().into(), json!(s.p50 / summaries[0].p50));
    }
    emit(&json!({
        "bench": BENCH,
        "case": "ratio",
        "what": "median start-to-resume time over the clean median, same run",
        "ratios": ratios,
    }));
    Ok(())
}
