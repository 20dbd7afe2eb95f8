//! Bad input from the network gets a clear error and changes no guest memory.
//!
//! The destination here is the real one (userfaultfd-registered memory behind a real QUIC
//! endpoint); the peer is a hostile source that speaks raw frames. After the destination
//! gives up, every byte of its memory is checked to be untouched (still zero).
//! Certificate and layout problems are also shown between two real `faultline` processes.

use std::net::SocketAddr;
use std::time::Duration;

use faultline_tests::{run_source, Certs, DestProcess};
use transport::codec::encode_to_vec;
use transport::message::{Layout, Message, Pages, SessionKind, PAGE_SIZE, PROTOCOL_VERSION};
use transport::quic::{self, TAG_BULK, TAG_CONTROL, TAG_URGENT};
use uffd_core::GuestMemory;
use vmm_shim::{DestOptions, Listener, RoleError};

const MEMORY: usize = 4 << 20;
const PAGES: u64 = (MEMORY / PAGE_SIZE) as u64;

/// What the hostile source does once its three streams are open.
enum Attack {
    /// Bytes written on the control stream instead of a Hello.
    ControlBytes(Vec<u8>),
    /// A valid handshake, then bytes on the bulk stream, which is then finished.
    AfterHandshake(Vec<u8>),
}

struct Outcome {
    dest: Result<vmm_shim::DestReport, RoleError>,
    /// Every byte of destination memory was still zero after the attempt.
    memory_untouched: bool,
    /// What the destination sent back on the control stream, if anything.
    reply: Option<Message>,
}

fn hello(version: u16, layout: Layout) -> Vec<u8> {
    encode_to_vec(&Message::Hello {
        version,
        kind: SessionKind::Migrate,
        epoch: 0,
        vm_id: "vm0".into(),
        layout,
        features: 0,
        session_id: 1,
    })
}

fn nonzero_pages(first: u64, n: usize) -> Vec<u8> {
    let data = vec![0xEEu8; n * PAGE_SIZE];
    encode_to_vec(&Message::Pages(Pages::from_memory(first, &data)))
}

fn attack(control_first: Vec<u8>, attack: Attack) -> Outcome {
    let certs = Certs::new();
    let listener = Listener::bind(DestOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        identity: certs.identity("dest"),
        peer_cert: certs.identity("source").cert,
        expected_vm_id: None,
        accept_timeout: Duration::from_secs(30),
        progress: None,
        recover_timeout: None,
        hand_over_timeout: vmm_shim::dest::HAND_OVER_TIMEOUT,
    })
    .unwrap();
    let addr = listener.local_addr().unwrap();
    let memory = GuestMemory::anonymous(MEMORY).unwrap();
    let region = memory.host_region();
    let dest = std::thread::spawn(move || {
        listener.receive(&[region], &Layout::single(MEMORY as u64), || {})
    });

    let me = certs.identity("source");
    let peer = certs.identity("dest").cert;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reply = rt.block_on(rogue(addr, me, peer, control_first, attack));
    let dest = dest.join().unwrap();
    // receive() has unregistered userfaultfd, so reading cannot fault into a handler.
    // SAFETY: the mapping is alive and no other thread uses it any more.
    let bytes = unsafe { std::slice::from_raw_parts(memory.as_ptr(), memory.len()) };
    Outcome {
        dest,
        memory_untouched: bytes.iter().all(|&b| b == 0),
        reply,
    }
}

async fn rogue(
    addr: SocketAddr,
    me: transport::tls::Identity,
    peer: transport::tls::CertificateDer<'static>,
    control_first: Vec<u8>,
    attack: Attack,
) -> Option<Message> {
    let ep = quic::client_endpoint("127.0.0.1:0".parse().unwrap(), &me, peer).unwrap();
    let conn = quic::connect(&ep, addr).await.unwrap();
    let (mut ctl, mut ctl_recv) = conn.open_bi().await.unwrap();
    let (mut urg, _urg_recv) = conn.open_bi().await.unwrap();
    let mut bulk = conn.open_uni().await.unwrap();
    ctl.write_all(&[TAG_CONTROL]).await.unwrap();
    urg.write_all(&[TAG_URGENT]).await.unwrap();
    bulk.write_all(&[TAG_BULK]).await.unwrap();
    let mut reply = None;
    match attack {
        Attack::ControlBytes(bytes) => {
            let _ = ctl.write_all(&bytes).await;
            let _ = ctl.finish();
            if let Ok(Some(m)) = quic::read_frame(&mut ctl_recv).await {
                reply = Some(m);
            }
        }
        Attack::AfterHandshake(bytes) => {
            ctl.write_all(&control_first).await.unwrap();
            let ack = quic::read_frame(&mut ctl_recv).await.unwrap();
            assert!(matches!(ack, Some(Message::HelloAck { .. })), "{ack:?}");
            let _ = bulk.write_all(&bytes).await;
            let _ = bulk.finish();
            if let Ok(Some(m)) = quic::read_frame(&mut ctl_recv).await {
                reply = Some(m);
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
    reply
}

fn error_text(o: &Outcome) -> String {
    match &o.dest {
        Ok(r) => panic!("the destination accepted bad input: {r:?}"),
        // The whole chain, as the CLI prints it.
        Err(e) => uffd_core::error::chain(e),
    }
}

#[test]
fn wrong_protocol_version_is_refused() {
    let o = attack(
        vec![],
        Attack::ControlBytes(hello(PROTOCOL_VERSION + 41, Layout::single(MEMORY as u64))),
    );
    let e = error_text(&o);
    let want = format!(
        "version mismatch: we speak {PROTOCOL_VERSION}, the peer speaks {}",
        PROTOCOL_VERSION + 41
    );
    assert!(e.contains(&want), "{e}");
    assert!(o.memory_untouched);
    assert!(
        matches!(&o.reply, Some(Message::Error { message, .. }) if message.contains("version mismatch")),
        "the peer is told why: {:?}",
        o.reply
    );
}

#[test]
fn memory_layout_mismatch_is_refused() {
    let o = attack(
        vec![],
        Attack::ControlBytes(hello(PROTOCOL_VERSION, Layout::single(2 * MEMORY as u64))),
    );
    let e = error_text(&o);
    assert!(e.contains("memory layout mismatch"), "{e}");
    assert!(
        e.contains("0x0+0x400000") && e.contains("0x0+0x800000"),
        "{e}"
    );
    assert!(o.memory_untouched);
}

#[test]
fn garbage_frame_is_refused() {
    let garbage: Vec<u8> = (0..64u32)
        .map(|i| (i.wrapping_mul(97) ^ 0x3c) as u8)
        .collect();
    let o = attack(vec![], Attack::ControlBytes(garbage));
    let e = error_text(&o);
    assert!(e.contains("malformed frame"), "{e}");
    assert!(o.memory_untouched);
}

#[test]
fn truncated_frame_is_refused() {
    let frame = nonzero_pages(0, 4);
    let o = attack(
        hello(PROTOCOL_VERSION, Layout::single(MEMORY as u64)),
        Attack::AfterHandshake(frame[..frame.len() / 2].to_vec()),
    );
    let e = error_text(&o);
    assert!(e.contains("stream ended in the middle of a frame"), "{e}");
    assert!(o.memory_untouched, "half a frame must install nothing");
}

#[test]
fn page_index_out_of_range_is_refused() {
    // Two pages: the last valid one and one past the end. The whole message is refused,
    // so not even the valid page is written.
    let o = attack(
        hello(PROTOCOL_VERSION, Layout::single(MEMORY as u64)),
        Attack::AfterHandshake(nonzero_pages(PAGES - 1, 2)),
    );
    let e = error_text(&o);
    assert!(
        e.contains(&format!(
            "page range {}+2 is outside the {PAGES} pages",
            PAGES - 1
        )),
        "{e}"
    );
    assert!(o.memory_untouched);
}

#[test]
fn unknown_peer_certificate_is_refused_between_processes() {
    let certs = Certs::new();
    let dest = DestProcess::start(&certs, &["--size", "16M", "--workers", "0"]);
    // The source presents a certificate the destination did not pin.
    let src = run_source(
        &certs,
        "intruder",
        &dest.addr,
        &["--synthetic", "16M"],
        Duration::from_secs(60),
    );
    assert!(!src.status.success());
    assert_eq!(src.json["error"]["kind"], "authentication", "{}", src.json);
    // The destination refused the intruder, said why, and still takes the real source.
    let dst = faultline_tests::assert_takes_a_real_source(&certs, dest);
    assert!(
        dst.stderr.contains("refused a connection") && dst.stderr.contains("certificate"),
        "destination says why: {}",
        dst.stderr
    );
}

#[test]
fn layout_mismatch_between_processes_names_both_layouts() {
    let certs = Certs::new();
    let dest = DestProcess::start(&certs, &["--size", "16M", "--workers", "0"]);
    let src = run_source(
        &certs,
        "source",
        &dest.addr,
        &["--synthetic", "8M"],
        Duration::from_secs(60),
    );
    let dst = dest.wait(Duration::from_secs(60));
    assert!(!src.status.success() && !dst.status.success());
    assert!(
        dst.stderr.contains("memory layout mismatch"),
        "{}",
        dst.stderr
    );
    assert!(
        src.stderr.contains("LayoutMismatch"),
        "the source learns why: {}",
        src.stderr
    );
}

#[test]
fn missing_certificate_file_is_a_clear_error() {
    let out = std::process::Command::new(faultline_tests::faultline_bin())
        .args([
            "dest",
            "--cert",
            "/nonexistent/d.crt",
            "--key",
            "/nonexistent/d.key",
        ])
        .args(["--peer-cert", "/nonexistent/s.crt", "--json"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/d.crt"), "{err}");
    // With --json the failure is the one object on stdout.
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["error"]["kind"], "local_io", "{v}");
    assert_eq!(out.status.code(), Some(6), "{v}");
}
