//! What an exposed listener and an unlucky operator meet (issue: hardening), with real
//! `faultline` processes: timeouts that mean what they say, junk and unauthenticated
//! peers that cannot end or stall a listener.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use faultline_tests::{faultline_bin, Certs};

/// A loopback UDP port nobody listens on (bound, then released).
fn closed_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().port()
}

#[test]
fn connect_timeout_bounds_the_connect_when_nobody_listens() {
    let certs = Certs::new();
    let addr = format!("127.0.0.1:{}", closed_port());
    for secs in ["2", "0"] {
        let started = Instant::now();
        let out = Command::new(faultline_bin())
            .args([
                "source",
                "--connect",
                &addr,
                "--synthetic",
                "4M",
                "--connect-timeout",
                secs,
            ])
            .args(certs.args("source", "dest"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .expect("run faultline source");
        let took = started.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains("no destination answered") && stderr.contains(&addr),
            "{stderr}"
        );
        // Before, every attempt waited for QUIC's 30 s idle timeout (0 never ended).
        assert!(
            took < Duration::from_secs(15),
            "took {took:?} with --connect-timeout {secs}"
        );
    }
}
