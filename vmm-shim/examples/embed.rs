//! How a Rust VMM embeds faultline: postcopy migration of guest memory held in a
//! `vm-memory` `GuestMemoryMmap`, both roles in one process over QUIC on loopback.
//!
//! The destination registers its (empty) guest memory with userfaultfd and "resumes" the
//! guest as soon as the handshake is done: a stand-in vCPU thread reads guest memory at
//! once, and each page it touches that has not arrived yet faults and is fetched on
//! demand while the source pushes the rest. At the end both sides' memory is compared.
//!
//! ```text
//! cargo run --release -p vmm-shim --example embed -- [MiB]     (default 64)
//! ```
//!
//! It needs userfaultfd (root, or `sudo chmod 0666 /dev/userfaultfd`). It prints one JSON
//! object and exits non-zero if the memories differ.

use std::error::Error;
use std::sync::Arc;
use std::time::Instant;

use transport::tls::Identity;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_shim::replica::PausedMemory;
use vmm_shim::{guest, DestOptions, Listener, SourceOptions};

/// Two regions, as a VMM with RAM below and above a PCI hole would have them.
fn guest_ranges(mib: u64) -> Vec<(GuestAddress, usize)> {
    let low = (mib / 2).max(1) << 20;
    let high = (mib << 20).saturating_sub(low).max(1 << 20);
    vec![
        (GuestAddress(0), low as usize),
        (GuestAddress(4 << 30), high as usize),
    ]
}

/// xxh3-128 of all guest memory in guest-physical order, read through vm-memory.
fn digest(mem: &GuestMemoryMmap) -> Result<String, Box<dyn Error>> {
    let mut parts = Vec::new();
    for r in mem.iter() {
        let mut buf = vec![0u8; r.len() as usize];
        mem.read_slice(&mut buf, r.start_addr())?;
        parts.push(buf);
    }
    Ok(vmm_shim::digest::digest_all(
        parts.iter().map(Vec::as_slice),
    ))
}

fn main() -> Result<(), Box<dyn Error>> {
    let mib: u64 = match std::env::args().nth(1) {
        Some(a) => a
            .parse()
            .map_err(|_| format!("size in MiB expected, got {a:?}"))?,
        None => 64,
    };
    let ranges = guest_ranges(mib);

    // The source VMM's guest: memory with content, its vCPUs paused for switchover, and
    // the vCPU/device state it serialises (opaque to faultline).
    let src: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&ranges)?;
    for (i, r) in src.iter().enumerate() {
        for off in (0..r.len()).step_by(4096 * 3) {
            let value = ((i as u64) << 56) | (r.start_addr().0 + off);
            src.write_obj(value, r.start_addr().unchecked_add(off))?;
        }
    }
    let vcpu_state = b"vcpu registers and device state".to_vec();

    // The destination VMM's guest: the same layout, empty.
    let dst: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&ranges)?;

    // Each side pins the other's certificate (mutual TLS).
    let (src_id, dst_id) = (Identity::generate("source")?, Identity::generate("dest")?);
    let listener = Listener::bind(DestOptions {
        expected_vm_id: Some("vm0".into()),
        ..DestOptions::new("127.0.0.1:0".parse()?, dst_id.clone(), src_id.cert.clone())
    })?;
    let addr = listener.local_addr()?;

    // Destination: register, then resume the guest the moment the state blob arrives.
    let dst_regions = guest::regions(&dst)?;
    let dst_layout = guest::layout(&dst);
    let vcpu_mem = dst.clone();
    let destination = std::thread::spawn(move || {
        let (tx, rx) = std::sync::mpsc::channel();
        let report = listener.receive_vm(&dst_regions, &dst_layout, move |state| {
            // Runs on the network driver: hand over and return, touch no memory here.
            let vcpu = std::thread::spawn(move || -> Result<(Vec<u8>, u64), String> {
                let t = Instant::now();
                // The "guest" runs: every read of a missing page waits for it.
                let mut sum = 0u64;
                for r in vcpu_mem.iter() {
                    for off in (0..r.len()).step_by(4096 * 64) {
                        let a = r.start_addr().unchecked_add(off);
                        sum = sum
                            .wrapping_add(vcpu_mem.read_obj::<u64>(a).map_err(|e| e.to_string())?);
                    }
                }
                let _ = sum;
                Ok((state.unwrap_or_default(), t.elapsed().as_micros() as u64))
            });
            let _ = tx.send(vcpu);
        });
        let vcpu = rx.recv().ok().map(|h| h.join());
        (report, vcpu)
    });

    // Source: serve the paused guest's memory, with the state blob.
    let opts = SourceOptions::new(addr, src_id, dst_id.cert, "vm0");
    // SAFETY: nothing writes the source's guest memory from here on: its vCPUs are
    // "paused" (this example has none running) for the whole migration.
    let paused = unsafe { PausedMemory::new(&guest::regions(&src)?) }?;
    let sent = vmm_shim::send_with_state(
        Arc::new(paused),
        &guest::layout(&src),
        &opts,
        vcpu_state.clone(),
    )?;

    let (received, vcpu) = destination
        .join()
        .map_err(|_| "the destination thread panicked")?;
    let received = received?;
    let (state, vcpu_us) = match vcpu {
        Some(Ok(r)) => r?,
        _ => return Err("the destination never resumed its guest".into()),
    };

    let (want, got) = (digest(&src)?, digest(&dst)?);
    let ok = want == got && state == vcpu_state;
    let summary = serde_json::json!({
        "digest_match": want == got,
        "state_match": state == vcpu_state,
        "source_digest": want,
        "dest_digest": got,
        "pages": received.pages,
        "pages_pushed": sent.pages_pushed,
        "pages_served": sent.pages_served,
        "faults": received.metrics.faults,
        "installed_by_push": received.metrics.pages_pushed,
        "installed_on_demand": received.metrics.pages_faulted,
        "total_ms": received.session.total_ms,
        "vcpu_first_pass_us": vcpu_us,
    });
    println!("{summary}");
    if !ok {
        return Err("destination memory or state differs from the source's".into());
    }
    Ok(())
}
