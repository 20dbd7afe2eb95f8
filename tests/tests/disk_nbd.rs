//! `faultline disk serve` with QEMU's own block tools as clients: `qemu-io` writes
//! patterns (unaligned, at the end of the disk), discards and zeroes, and reads them back;
//! `qemu-img compare` checks the export against an image built locally; `qemu-img map`
//! walks it; the JSON at exit names exactly the blocks written. Bad clients on a raw
//! socket (bad magic, garbage, vanishing mid-write, writes past the end or too large)
//! change nothing, and a real client works after them. Whole-image digests compare
//! wherever data must be unchanged.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use faultline_tests::nbd::{qemu_io, qemu_io_ok, qemu_io_with, qemu_tool, DiskServer};
use serde_json::Value;
use vmm_shim::digest::digest;

const SIZE: u64 = 16 << 20;
const BLOCK: u64 = 4096;

/// A 16 MiB image whose first 2 MiB hold a pattern (so zeroes read back mean something),
/// in a directory removed on drop.
fn image() -> (tempfile::TempDir, PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let mut data = vec![0u8; SIZE as usize];
    for (i, b) in data[..2 << 20].iter_mut().enumerate() {
        *b = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes()[7];
    }
    std::fs::write(&path, &data).unwrap();
    (dir, path, data)
}

fn file_digest(path: &Path) -> String {
    digest(&std::fs::read(path).unwrap())
}

fn socket_in(dir: &tempfile::TempDir) -> String {
    dir.path().join("nbd.sock").display().to_string()
}

/// The blocks `len` bytes at `off` touch.
fn blocks(off: u64, len: u64) -> std::ops::Range<u64> {
    off / BLOCK..(off + len - 1) / BLOCK + 1
}

/// The `written_ranges` of a stopped server's JSON, expanded.
fn written(json: &Value) -> Vec<u64> {
    json["written_ranges"]
        .as_array()
        .unwrap_or_else(|| panic!("no written_ranges in {json}"))
        .iter()
        .flat_map(|r| r[0].as_u64().unwrap()..=r[1].as_u64().unwrap())
        .collect()
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new(qemu_tool("qemu-img"))
        .args(args)
        .output()
        .expect("run qemu-img")
}

#[test]
fn qemu_io_patterns_discards_and_zeroes_read_back_and_the_export_matches() {
    let (dir, path, mut want) = image();
    let sock = socket_in(&dir);
    let server = DiskServer::start(&path, &["--nbd-unix", &sock]);
    assert_eq!(server.uri, format!("nbd+unix:///?socket={sock}"));
    let uri = server.uri.clone();

    // (offset, length, byte): unaligned, spanning blocks, and at the very end.
    let writes: &[(u64, u64, u8)] = &[
        (1, 3, 0xab),
        (5000, 10_000, 0xcd),
        (SIZE - BLOCK + 1, BLOCK - 2, 0xef),
        (SIZE - 1, 1, 0x11),
        (3 << 20, 1 << 20, 0x5a),
        (1 << 20, 64 << 10, 0x77),
        (2 << 20, 8 << 10, 0x77),
    ];
    let mut touched = std::collections::BTreeSet::new();
    let mut cmds = Vec::new();
    for &(off, len, byte) in writes {
        cmds.push(format!("write -P {byte:#x} {off} {len}"));
        want[off as usize..(off + len) as usize].fill(byte);
        touched.extend(blocks(off, len));
    }
    // A discard and two kinds of write-zeroes (with NBD_CMD_FLAG_NO_HOLE, and without
    // it: -u allows unmapping) over what was just written.
    for (cmd, off, len) in [
        ("discard", 1 << 20, 64 << 10),
        ("write -z", 2 << 20, 4 << 10),
        ("write -z -u", (2 << 20) + 4096, 4 << 10),
    ] {
        cmds.push(format!("{cmd} {off} {len}"));
        want[off as usize..(off + len) as usize].fill(0);
        touched.extend(blocks(off, len));
    }
    let cmd_refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io_ok(&uri, &cmd_refs);

    // Read-verified in a second session.
    let mut reads = Vec::new();
    for &(off, len, byte) in &writes[..5] {
        reads.push(format!("read -P {byte:#x} {off} {len}"));
    }
    reads.push(format!("read -P 0 {} {}", 1 << 20, 64 << 10));
    reads.push(format!("read -P 0 {} {}", 2 << 20, 8 << 10));
    let read_refs: Vec<&str> = reads.iter().map(String::as_str).collect();
    let out = qemu_io_ok(&uri, &read_refs);
    assert_eq!(out.matches("read ").count(), reads.len(), "{out}");

    // The whole export against the image built here.
    let expected = dir.path().join("expected.img");
    std::fs::write(&expected, &want).unwrap();
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        &uri,
        &expected.display().to_string(),
    ]);
    assert!(
        cmp.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&cmp.stdout),
        String::from_utf8_lossy(&cmp.stderr)
    );
    assert!(String::from_utf8_lossy(&cmp.stdout).contains("Images are identical"));

    // qemu-img map walks the whole export.
    let map = qemu_img(&["map", "-f", "raw", "--output=json", &uri]);
    assert!(
        map.status.success(),
        "{}",
        String::from_utf8_lossy(&map.stderr)
    );
    let extents: Value = serde_json::from_slice(&map.stdout).expect("map JSON");
    let mapped: u64 = extents
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(mapped, SIZE);

    // A write past the end fails and changes nothing.
    let before = digest(&want);
    let past = qemu_io(&uri, &[&format!("write -P 0x99 {} 8", SIZE - 4)]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&past.stdout),
        String::from_utf8_lossy(&past.stderr)
    );
    assert!(!past.status.success(), "{text}");
    assert!(text.contains("write failed"), "{text}");
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        &uri,
        &expected.display().to_string(),
    ]);
    assert!(cmp.status.success());

    let done = server.stop();
    assert!(done.status.success(), "{}", done.stderr);
    assert_eq!(done.json["ok"], true, "{}", done.json);
    assert_eq!(done.json["tracking"], true);
    assert_eq!(file_digest(&path), before);
    assert_eq!(written(&done.json), touched.into_iter().collect::<Vec<_>>());
    assert_eq!(
        done.json["blocks_written"].as_u64().unwrap(),
        written(&done.json).len() as u64
    );
    assert!(done.json["nbd"]["writes"].as_u64().unwrap() >= writes.len() as u64);
}

#[test]
fn over_tcp_with_a_named_export() {
    let (dir, path, mut want) = image();
    let server = DiskServer::start(
        &path,
        &[
            "--nbd-tcp",
            "127.0.0.1:0",
            "--export",
            "vda",
            "--block-size",
            "64K",
        ],
    );
    let uri = server.uri.clone();
    assert!(
        uri.starts_with("nbd://127.0.0.1:") && uri.ends_with("/vda"),
        "{uri}"
    );
    qemu_io_ok(
        &uri,
        &["write -P 0x42 100000 70000", "read -P 0x42 100000 70000"],
    );
    want[100_000..170_000].fill(0x42);
    let expected = dir.path().join("expected.img");
    std::fs::write(&expected, &want).unwrap();
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        &uri,
        &expected.display().to_string(),
    ]);
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    // An unknown export name is refused.
    let port_uri = uri.trim_end_matches("/vda");
    let wrong = qemu_io(&format!("{port_uri}/other"), &["read 0 512"]);
    assert!(!wrong.status.success());
    let done = server.stop();
    assert!(done.status.success(), "{}", done.stderr);
    // 64 KiB blocks: 100000..170000 touches blocks 1 and 2.
    assert_eq!(written(&done.json), vec![1, 2]);
    assert_eq!(done.json["block_size"], 65536);
    assert_eq!(file_digest(&path), digest(&want));
}

#[test]
fn a_read_only_export_refuses_writes_and_changes_nothing() {
    let (dir, path, want) = image();
    let sock = socket_in(&dir);
    let server = DiskServer::start(&path, &["--nbd-unix", &sock, "--read-only"]);
    // QEMU sees NBD_FLAG_READ_ONLY: it will not open the export for writing...
    let out = qemu_io(&server.uri, &["write -P 1 0 4096"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
    // ... but reads it.
    let ro = qemu_io_with(&server.uri, &["-r"], &["read -v 0 16"]);
    assert!(
        ro.status.success(),
        "{}",
        String::from_utf8_lossy(&ro.stderr)
    );
    // A client that writes anyway gets EPERM.
    let mut c = raw_client(&sock);
    let mut r = request(1, 1, 0, 4);
    r.extend_from_slice(b"nope");
    c.write_all(&r).unwrap();
    assert_eq!(reply(&mut c), (1, 1));
    drop(c);
    let done = server.stop();
    assert!(done.status.success());
    assert_eq!(done.json["read_only"], true);
    assert_eq!(done.json["blocks_written"], 0);
    assert_eq!(file_digest(&path), digest(&want));
}

/// A raw client that has done the handshake (NBD_OPT_GO for the default export).
fn raw_client(sock: &str) -> UnixStream {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut go = Vec::new();
    go.extend_from_slice(b"IHAVEOPT");
    go.extend_from_slice(&7u32.to_be_bytes());
    go.extend_from_slice(&6u32.to_be_bytes());
    go.extend_from_slice(&[0; 6]);
    s.write_all(&go).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let rep = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut d = vec![0u8; len];
        s.read_exact(&mut d).unwrap();
        if rep == 1 {
            return s;
        }
        assert_eq!(rep, 3, "an NBD_REP_INFO or the ACK");
    }
}

fn request(kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&kind.to_be_bytes());
    r.extend_from_slice(&cookie.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r
}

/// A simple reply's (error, cookie).
fn reply(s: &mut UnixStream) -> (u32, u64) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[..4], &0x6744_6698u32.to_be_bytes());
    (
        u32::from_be_bytes(h[4..8].try_into().unwrap()),
        u64::from_be_bytes(h[8..16].try_into().unwrap()),
    )
}

/// Reads until the server closes; panics if it does not within the read timeout.
fn closed(s: &mut UnixStream) -> Vec<u8> {
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .expect("the server closes the connection");
    rest
}

#[test]
fn bad_clients_change_nothing_and_a_real_client_works_after_them() {
    let (dir, path, mut want) = image();
    let before = digest(&want);
    let sock = socket_in(&dir);
    let server = DiskServer::start(&path, &["--nbd-unix", &sock]);

    // Garbage instead of a handshake: the greeting, then the connection closes.
    let mut g = UnixStream::connect(&sock).unwrap();
    g.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    g.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(closed(&mut g).len(), 18);

    // Bad request magic after a good handshake: closed, no reply.
    let mut b = raw_client(&sock);
    let mut r = request(1, 1, 0, 4096);
    r[0] = 0xde;
    r.extend_from_slice(&[0xee; 4096]);
    let _ = b.write_all(&r);
    assert!(closed(&mut b).is_empty());

    // Past the end: ENOSPC, the payload read and dropped, the connection still serving;
    // too large: EINVAL, likewise.
    let mut p = raw_client(&sock);
    let mut r = request(1, 2, SIZE - 100, 4096);
    r.extend_from_slice(&[0xee; 4096]);
    p.write_all(&r).unwrap();
    assert_eq!(reply(&mut p), (28, 2));
    let mut r = request(1, 3, 0, 64 << 20);
    r.extend(std::iter::repeat_n(0xee, 64 << 20));
    p.write_all(&r).unwrap();
    assert_eq!(reply(&mut p), (22, 3));
    p.write_all(&request(0, 4, SIZE - 4096, 8192)).unwrap();
    assert_eq!(reply(&mut p), (22, 4));
    p.write_all(&request(0, 5, 0, 16)).unwrap();
    assert_eq!(reply(&mut p), (0, 5));
    let mut data = [0u8; 16];
    p.read_exact(&mut data).unwrap();
    assert_eq!(&data[..], &want[..16]);
    drop(p);

    // Vanishing in the middle of a write's payload.
    let mut v = raw_client(&sock);
    let mut r = request(1, 6, 8192, 65536);
    r.extend_from_slice(&[0xee; 30_000]);
    v.write_all(&r).unwrap();
    drop(v);
    // And in the middle of a header.
    let mut h = raw_client(&sock);
    h.write_all(&request(1, 7, 0, 4096)[..11]).unwrap();
    drop(h);

    // A real client still works.
    qemu_io_ok(
        &server.uri,
        &["write -P 0x3c 12288 4096", "read -P 0x3c 12288 4096"],
    );
    want[12288..16384].fill(0x3c);

    let done = server.stop();
    assert!(done.status.success(), "{}", done.stderr);
    assert_eq!(written(&done.json), vec![3], "{}", done.json);
    assert!(
        done.json["nbd"]["protocol_errors"].as_u64().unwrap() >= 4,
        "{}",
        done.json
    );
    let after = file_digest(&path);
    assert_ne!(after, before);
    assert_eq!(after, digest(&want));
}

#[test]
fn command_line_mistakes_are_reported_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let sock = socket_in(&dir);
    let missing = dir.path().join("missing.img");
    let out = Command::new(faultline_tests::faultline_bin())
        .args(["disk", "serve", "--json", "--nbd-unix", &sock, "--image"])
        .arg(&missing)
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["error"]["kind"], "local_io", "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("missing.img"));
    assert_eq!(out.status.code(), Some(6));

    let (_d, path, _) = image();
    for bad in [vec!["--block-size", "3000", "--nbd-unix", &sock], vec![]] {
        let out = Command::new(faultline_tests::faultline_bin())
            .args(["disk", "serve", "--json", "--image"])
            .arg(&path)
            .args(&bad)
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["error"]["kind"], "usage", "{bad:?}: {v}");
        assert_eq!(out.status.code(), Some(2));
    }
}
