//! Helpers for the benches that drive real `faultline` processes (started with
//! `faultline_tests`) through the WAN emulator: checking how a process ended, sizing the
//! QUIC windows for the emulated link, and a random image to migrate.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::bail;
use faultline_tests::Finished;
use transport::quic::{bdp_bytes, ENV_EXPECTED_BDP};

/// Fails unless `f` (the `what` process) exited successfully with its JSON report.
pub fn check(f: &Finished, what: &str) -> anyhow::Result<()> {
    if !f.status.success() || f.json.is_null() {
        bail!("the {what} failed ({}): {}", f.status, f.stderr);
    }
    Ok(())
}

/// Fails unless both reports carry the same digest of all guest memory.
pub fn check_digests(src: &Finished, dst: &Finished) -> anyhow::Result<()> {
    let (s, d) = (&src.json["digest"], &dst.json["digest"]);
    if !s.is_string() || s != d {
        bail!("digests differ: source {s} destination {d}");
    }
    Ok(())
}

/// Both processes (started after this) size their QUIC windows for a link of `rate_bps`
/// and `rtt`, as an operator would with `FAULTLINE_EXPECTED_BDP` (docs/wan.md).
pub fn set_expected_bdp(rate_bps: u64, rtt: Duration) {
    std::env::set_var(ENV_EXPECTED_BDP, bdp_bytes(rate_bps, rtt).to_string());
}

/// Writes `bytes` of pseudo-random data (xorshift64, fixed seed) to `path`: nothing
/// compresses, no page is a zero page, so every page costs its full size on the wire.
pub fn write_random_image(path: &Path, bytes: u64) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut s = 0x2545_f491_4f6c_dd1du64;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        for c in buf.chunks_exact_mut(8) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            c.copy_from_slice(&s.to_le_bytes());
        }
        let n = left.min(buf.len() as u64);
        f.write_all(&buf[..n as usize])?;
        left -= n;
    }
    f.flush()?;
    Ok(())
}
