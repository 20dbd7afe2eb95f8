//! Plain HTTP/1.1 for the tests that scrape Prometheus metrics (`--metrics-listen`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Sends `request` to `addr` and returns the whole answer ("" if the server closed).
pub fn http(addr: &str, request: &[u8]) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(request)?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// `GET /metrics` from `addr`: the body of a 200 answer, retried until the server is up.
pub fn scrape(addr: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        match http(addr, req.as_bytes()) {
            Ok(a) if a.starts_with("HTTP/1.1 200") => {
                let (_, body) = a.split_once("\r\n\r\n").expect("headers end");
                return body.to_string();
            }
            other => assert!(Instant::now() < deadline, "no metrics at {addr}: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
