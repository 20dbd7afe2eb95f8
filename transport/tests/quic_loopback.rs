//! The QUIC driver on real loopback sockets, with an in-memory page sink standing in for
//! guest memory (the userfaultfd-backed sink is tested end to end in the `tests` crate).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use transport::encoding::{page_hash, EncodingPolicy, EncodingStats, ReplicaIndex};
use transport::message::PAGE_SIZE;
use transport::proto::{DestConfig, DestSession, SourceConfig, SourceSession};
use transport::quic::{self, DestHooks, DestReport, DriverError, SourceReport};
use transport::tls::Identity;
use transport::Layout;

mod common;
use common::{Image, MemSink, Slow};

fn image(pages: usize) -> Vec<u8> {
    let mut v = vec![0u8; pages * PAGE_SIZE];
    let mut x = 0x9E3779B97F4A7C15u64;
    for (i, page) in v.chunks_mut(PAGE_SIZE).enumerate() {
        if i % 4 == 0 {
            continue; // zero page
        }
        for b in page.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    v
}

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_over_loopback_delivers_every_byte() {
    let (src_report, dst_report, sink, img) =
        migrate(image(2048), EncodingPolicy::AUTO, vec![2000, 5, 1999]).await;
    let pages = 2048;
    assert_eq!(*sink.mem.lock().unwrap(), img.0);
    assert_eq!(dst_report.pages_received, pages as u64);
    assert!(src_report.pages_served >= 1, "{src_report:?}");
    // A request can cross the push of the same page, so replies may repeat pushed pages,
    // but the push itself hands out each page at most once.
    assert!(src_report.pages_pushed + src_report.pages_served >= pages as u64);
    assert!(src_report.pages_pushed <= pages as u64);
    assert!(sink.urgent.load(Ordering::Relaxed) >= 1);
}

/// Text-like pages (compressible) whose content repeats every 256 pages (deduplicable
/// across push batches), and zero pages.
fn compressible_image(pages: usize) -> Vec<u8> {
    let mut v = vec![0u8; pages * PAGE_SIZE];
    for (i, page) in v.chunks_mut(PAGE_SIZE).enumerate() {
        if i % 5 == 0 {
            continue;
        }
        let line = format!("page group {} of faultline's test image; ", i % 256);
        for (b, c) in page.iter_mut().zip(line.bytes().cycle()) {
            *b = c;
        }
    }
    v
}

/// The destination decoded what the source encoded, but for pages that arrived twice (a
/// demand reply crossing the push of the same page): the destination drops the second copy
/// before decoding it and counts it as resent.
fn decoded_as_encoded(dst: &DestReport, e: &EncodingStats) {
    let dropped = dst.outages.bytes_resent / PAGE_SIZE as u64;
    for (what, decoded, encoded) in [
        ("lz4", dst.decoded.pages_lz4, e.lz4_pages),
        ("ref", dst.decoded.pages_ref, e.ref_pages),
    ] {
        assert!(
            decoded <= encoded && encoded - decoded <= dropped,
            "{what}: {decoded} decoded of {encoded} encoded, {dropped} dropped as duplicates"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_and_deduplicated_pages_arrive_intact() {
    // Without the early push, which sends no references, every page is encoded as it may.
    let (src, dst, sink, img) = migrate_with(
        compressible_image(2048),
        EncodingPolicy::ALL,
        vec![7, 1500],
        false,
    )
    .await;
    assert_eq!(*sink.mem.lock().unwrap(), img.0);
    assert_eq!(src.pages_pushed_early, 0);
    let e = &src.encoding;
    assert!(e.lz4_pages > 0 && e.ref_pages > 0, "{e:?}");
    decoded_as_encoded(&dst, e);
    // Every reference pointed at a page pushed earlier on the same stream.
    assert_eq!(dst.decoded.refs_refetched, 0);
    assert!(e.compression_ratio < 0.2, "{e:?}");
    assert_eq!(e.chosen, "lz4+dedup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_push_and_the_push_after_the_answer_arrive_intact() {
    let (src, dst, sink, img) =
        migrate(compressible_image(2048), EncodingPolicy::ALL, vec![7, 1500]).await;
    assert_eq!(*sink.mem.lock().unwrap(), img.0);
    let e = &src.encoding;
    // However much went before the handshake's answer, the counts agree on both sides,
    // and references never name a page the destination lacks.
    decoded_as_encoded(&dst, e);
    assert_eq!(dst.decoded.refs_refetched, 0);
    assert_eq!(
        e.raw_pages + e.zero_pages + e.lz4_pages + e.ref_pages,
        src.pages_pushed + src.pages_served + src.pages_echoed,
        "{e:?}"
    );
}

/// The pages pushed before the destination's answer are lz4 where the policy allows it,
/// even to a destination that then agrees to no encoding (protocol version 6): it decodes
/// them, the push after its answer goes raw, and every page arrives intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_push_before_the_answer_is_compressed_whatever_the_destination_agrees_to() {
    let pages = 2048;
    let img = compressible_image(pages);
    let (src, dst) = migrate_held(img, Some(0)).await;
    // At least the batch read before the answer went early, and not everything did.
    assert!(
        (1..pages as u64).contains(&src.pages_pushed_early),
        "{src:?}"
    );
    let e = &src.encoding;
    // Only pages pushed before the answer were compressed, and some were; after it they
    // went raw.
    assert!(
        e.lz4_pages > 0 && e.lz4_pages <= src.pages_pushed_early,
        "{e:?}"
    );
    assert!(e.raw_pages > 0, "{e:?}");
    assert_eq!(e.ref_pages, 0, "{e:?}");
    decoded_as_encoded(&dst, e);
}

/// The push after the answer names the pages the early push sent: memory of eight
/// contents, all of them in the early push's first batch, crosses as those pages
/// compressed and references to them for the rest, every one resolved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_push_after_the_answer_references_the_pages_pushed_before_it() {
    let pages = 1024;
    let mut img = vec![0u8; pages * PAGE_SIZE];
    for (i, page) in img.chunks_mut(PAGE_SIZE).enumerate() {
        let line = format!("one of eight contents: {}; ", i % 8);
        for (b, c) in page.iter_mut().zip(line.bytes().cycle()) {
            *b = c;
        }
    }
    let (src, dst) = migrate_held(img, None).await;
    let early = src.pages_pushed_early;
    assert!((8..pages as u64).contains(&early), "{src:?}");
    let e = &src.encoding;
    assert_eq!(e.lz4_pages, early, "{e:?}");
    assert_eq!(e.ref_pages, pages as u64 - early, "{e:?}");
    assert_eq!(dst.decoded.refs_refetched, 0, "{:?}", dst.decoded);
    decoded_as_encoded(&dst, e);
}

/// Migrates `img` (policy `all`, no demand) from a [`Slow`] reader to a destination that
/// agrees to `features` (all if `None`) and answers only once the early push has read
/// memory; memory must arrive equal.
async fn migrate_held(img: Vec<u8>, features: Option<u64>) -> (SourceReport, DestReport) {
    let pages = img.len() / PAGE_SIZE;
    let first_read = Arc::new(tokio::sync::Notify::new());
    let img = Arc::new(Image(img));
    // Long enough that the push yields after every batch (so the destination's task runs,
    // woken on this worker) and that the answer comes long before the push could end.
    let reader = Arc::new(Slow {
        inner: img.clone(),
        on_read: first_read.clone(),
        per_read: Duration::from_millis(5),
    });
    let side = DestSide {
        features,
        answer_after_read: Some(first_read),
    };
    let (src, dst, sink) =
        migrate_reader(reader, pages, EncodingPolicy::ALL, vec![], true, None, side).await;
    assert_eq!(*sink.mem.lock().unwrap(), img.0);
    (src, dst)
}

/// A pushed reference the destination cannot resolve (the replica index says it holds
/// content it does not) is fetched again on demand. The source answers that request although
/// the destination had read the frame (`pushed_read` 0): left to the push, the page would
/// never come, and on loopback no echo asks again, so the migration would not end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn references_the_destination_cannot_resolve_are_fetched_again() {
    let pages = 512;
    let img = image(pages);
    // Every page's content "is at the standby" in the next page, which holds other content.
    let index: ReplicaIndex = Default::default();
    let wrong = img
        .chunks(PAGE_SIZE)
        .enumerate()
        .map(|(p, page)| (page_hash(page), ((p + 1) % pages) as u64))
        .collect();
    index.set(wrong).unwrap();
    let img = Arc::new(Image(img));
    let (src, dst, sink) = tokio::time::timeout(
        Duration::from_secs(20),
        migrate_reader(
            img.clone(),
            pages,
            EncodingPolicy::ALL,
            vec![7],
            false,
            Some(index),
            DestSide::default(),
        ),
    )
    .await
    .expect("the migration ends");
    assert_eq!(*sink.mem.lock().unwrap(), img.0);
    assert!(src.encoding.ref_replica_pages > 0, "{:?}", src.encoding);
    assert!(dst.decoded.refs_refetched > 0, "{:?}", dst.decoded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_encoding_off_only_zero_flags_are_used() {
    let (src, dst, sink, img) =
        migrate(compressible_image(512), EncodingPolicy::OFF, vec![3]).await;
    assert_eq!(*sink.mem.lock().unwrap(), img.0);
    let e = &src.encoding;
    assert_eq!((e.lz4_pages, e.ref_pages), (0, 0), "{e:?}");
    assert_eq!((dst.decoded.pages_lz4, dst.decoded.pages_ref), (0, 0));
    assert_eq!(e.chosen, "raw");
}

/// 4096 pages (16 MiB), all zero but a few scattered data pages.
fn mostly_zero_image() -> Vec<u8> {
    let mut v = vec![0u8; 4096 * PAGE_SIZE];
    for (k, p) in [0usize, 1, 2, 700, 2047, 2048, 4095]
        .into_iter()
        .enumerate()
    {
        v[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].fill(k as u8 + 1);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mostly_zero_memory_crosses_as_long_zero_runs_without_reading_them() {
    for early_push in [true, false] {
        let img = mostly_zero_image();
        let reader = Arc::new(common::SparseImage::new(img.clone()));
        let (src, dst, sink) = migrate_reader(
            reader.clone(),
            4096,
            EncodingPolicy::AUTO,
            vec![100, 4095],
            early_push,
            None,
            DestSide::default(),
        )
        .await;
        assert_eq!(*sink.mem.lock().unwrap(), img, "early push {early_push}");
        assert_eq!(dst.pages_received, 4096);
        // Runs longer than a `Pages` message: the zero-run frame was negotiated and used.
        let longest = sink.longest.load(Ordering::Relaxed);
        assert!(
            longest > transport::message::MAX_PAGES_PER_MESSAGE as u64,
            "longest run {longest}"
        );
        // Only the data pages and the demanded pages were read; the zeros were known.
        let read = reader.read.load(Ordering::Relaxed);
        assert!(read <= 7 + 2, "{read} pages read");
        assert!(
            src.encoding.zero_pages >= 4096 - 7 - 2,
            "{:?}",
            src.encoding
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_pages_found_by_reading_also_join_into_long_runs() {
    let img = mostly_zero_image();
    // Without the early push, which sends short runs only (nothing is agreed yet).
    let (_, _, sink, img) = migrate_with(img, EncodingPolicy::OFF, vec![9], false).await;
    assert_eq!(*sink.mem.lock().unwrap(), img.0);
    assert!(
        sink.longest.load(Ordering::Relaxed) > transport::message::MAX_PAGES_PER_MESSAGE as u64
    );
}

/// Memory that is all zero, though its extents say so only for the first pages: the rest
/// looks like data and is read, and turns out zero.
struct ZerosBehindData {
    pages: u64,
    known_zero: u64,
}

impl quic::PageReader for ZerosBehindData {
    fn pages(&self, first: u64, count: usize) -> Result<std::borrow::Cow<'_, [u8]>, String> {
        if first + count as u64 > self.pages {
            return Err(format!("pages {first}+{count} are outside the image"));
        }
        Ok(std::borrow::Cow::Owned(vec![0; count * PAGE_SIZE]))
    }

    fn extent(&self, first: u64, max: u64) -> quic::Extent {
        if first < self.known_zero {
            quic::Extent::Zero((self.known_zero - first).min(max))
        } else {
            quic::Extent::Data((self.pages - first).min(max))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_pages_found_zero_after_a_long_known_zero_run_do_not_overflow_it() {
    // Known zeros just short of the largest run, then zero "data": joined, the run would
    // pass the largest a message holds (it failed the push: "zero run of 65594 pages").
    let max = transport::message::MAX_ZERO_RUN as u64;
    let pages = max + 512;
    let reader = Arc::new(ZerosBehindData {
        pages,
        known_zero: max - 10,
    });
    let (src, dst, sink) = migrate_reader(
        reader,
        pages as usize,
        EncodingPolicy::OFF,
        vec![pages - 1],
        false,
        None,
        DestSide::default(),
    )
    .await;
    assert_eq!(dst.pages_received, pages);
    assert!(sink.mem.lock().unwrap().iter().all(|&b| b == 0));
    // The demanded page may cross twice (push and reply).
    assert!(src.encoding.zero_pages >= pages, "{:?}", src.encoding);
}

async fn migrate(
    img: Vec<u8>,
    encoding: EncodingPolicy,
    demand: Vec<u64>,
) -> (SourceReport, DestReport, Arc<MemSink>, Arc<Image>) {
    migrate_with(img, encoding, demand, true).await
}

async fn migrate_with(
    img: Vec<u8>,
    encoding: EncodingPolicy,
    demand: Vec<u64>,
    early_push: bool,
) -> (SourceReport, DestReport, Arc<MemSink>, Arc<Image>) {
    let pages = img.len() / PAGE_SIZE;
    let img = Arc::new(Image(img));
    let (s, d, sink) = migrate_reader(
        img.clone(),
        pages,
        encoding,
        demand,
        early_push,
        None,
        DestSide::default(),
    )
    .await;
    (s, d, sink, img)
}

/// The destination of a loopback migration.
#[derive(Clone, Default)]
struct DestSide {
    /// The encodings it agrees to, if not every one.
    features: Option<u64>,
    /// Answer only once this is notified (the source read memory: [`Slow`]).
    answer_after_read: Option<Arc<tokio::sync::Notify>>,
}

async fn migrate_reader<R: quic::PageReader>(
    img: Arc<R>,
    pages: usize,
    encoding: EncodingPolicy,
    demand: Vec<u64>,
    early_push: bool,
    replica_index: Option<ReplicaIndex>,
    side: DestSide,
) -> (SourceReport, DestReport, Arc<MemSink>) {
    let src_id = Identity::generate("source").unwrap();
    let dst_id = Identity::generate("dest").unwrap();
    let server = quic::server_endpoint(localhost(), &dst_id, src_id.cert.clone()).unwrap();
    let addr = server.local_addr().unwrap();
    let layout = Layout::single((pages * PAGE_SIZE) as u64);

    let sink = Arc::new(MemSink::new(pages));
    let (req_tx, req_rx) = tokio::sync::mpsc::unbounded_channel();
    let dest_layout = layout.clone();
    let dest_sink = sink.clone();
    let dest = tokio::spawn(async move {
        let conn = quic::accept(&server).await.unwrap().unwrap();
        if let Some(read) = &side.answer_after_read {
            read.notified().await;
        }
        let config = DestConfig::migrate(dest_layout);
        let session = DestSession::new(DestConfig {
            expected_vm_id: Some("vm".into()),
            features: side.features.unwrap_or(config.features),
            ..config
        });
        let hooks = DestHooks {
            on_established: Some(Box::new(move |_, state: Option<&[u8]>| {
                // The VM state arrives before the guest resumes.
                assert_eq!(state, Some(&b"vcpu state v1"[..]));
                // Demand a few pages from the far end as soon as we "resume".
                req_tx.send(demand).unwrap();
            })),
        };
        let r = quic::run_dest(conn, session, dest_sink, req_rx, hooks).await;
        server.wait_idle().await;
        r
    });

    let client = quic::client_endpoint(localhost(), &src_id, dst_id.cert.clone()).unwrap();
    let conn = quic::connect(&client, addr).await.unwrap();
    let session = SourceSession::new(SourceConfig {
        vm_state: Some(b"vcpu state v1".to_vec()),
        encoding,
        early_push,
        replica_index,
        ..SourceConfig::migrate("vm", layout)
    });
    let src_report = quic::run_source(conn, session, img).await.unwrap();
    let dst_report = dest.await.unwrap().unwrap();
    (src_report, dst_report, sink)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_peer_certificate_is_refused() {
    let src_id = Identity::generate("source").unwrap();
    let intruder = Identity::generate("intruder").unwrap();
    let dst_id = Identity::generate("dest").unwrap();
    let server = quic::server_endpoint(localhost(), &dst_id, src_id.cert.clone()).unwrap();
    let addr = server.local_addr().unwrap();
    let accept = tokio::spawn(async move { quic::accept(&server).await });

    let client = quic::client_endpoint(localhost(), &intruder, dst_id.cert.clone()).unwrap();
    // The client's handshake may appear to finish before the server rejects its
    // certificate; either way no session can run.
    let client_side = async {
        let conn = quic::connect(&client, addr).await?;
        let session = SourceSession::new(SourceConfig::migrate("vm", Layout::single(4096)));
        quic::run_source(conn, session, Arc::new(Image(vec![0; 4096]))).await
    };
    let err = client_side.await.unwrap_err();
    assert!(
        matches!(
            err,
            DriverError::Connection(_) | DriverError::PeerClosed { .. }
        ),
        "{err}"
    );
    let server_err = accept.await.unwrap().unwrap_err();
    assert!(
        server_err.to_string().contains("certificate"),
        "{server_err}"
    );
}

mod acceptor {
    use std::time::Duration;

    use transport::message::ErrorCode;
    use transport::quic::accept::{AcceptLimits, Acceptor};
    use transport::quic::{self, DriverError};
    use transport::tls::Identity;

    /// Connects as `me` and waits for the server's verdict on the connection (the client's
    /// side of a handshake can finish before the server has checked its certificate).
    async fn verdict(me: &Identity, server: &Identity, addr: std::net::SocketAddr) -> DriverError {
        let ep =
            quic::client_endpoint("127.0.0.1:0".parse().unwrap(), me, server.cert.clone()).unwrap();
        let e = match quic::connect(&ep, addr).await {
            Ok(conn) => quic::DriverError::Connection(conn.closed().await),
            Err(e) => e,
        };
        ep.close(0u32.into(), b"");
        e
    }

    #[tokio::test]
    async fn only_authenticated_peers_are_handed_over_and_a_busy_listener_says_so() {
        let (server, client) = (
            Identity::generate("dest").unwrap(),
            Identity::generate("source").unwrap(),
        );
        let stranger = Identity::generate("stranger").unwrap();
        let ep =
            quic::server_endpoint("127.0.0.1:0".parse().unwrap(), &server, client.cert.clone())
                .unwrap();
        let addr = ep.local_addr().unwrap();
        let mut acceptor = Acceptor::start(ep, AcceptLimits::default());

        // An unpinned client is refused and never handed over.
        let e = tokio::time::timeout(Duration::from_secs(10), verdict(&stranger, &server, addr))
            .await
            .expect("refused in time");
        assert!(!e.to_string().is_empty());
        let c = acceptor.counts();
        assert_eq!((c.failed, c.accepted), (1, 0), "{c:?}");
        assert!(
            c.retried >= 1,
            "its Initial was answered with a Retry first: {c:?}"
        );

        // The pinned client is.
        let ep2 =
            quic::client_endpoint("127.0.0.1:0".parse().unwrap(), &client, server.cert.clone())
                .unwrap();
        let conn = quic::connect(&ep2, addr)
            .await
            .expect("pinned client connects");
        let got = tokio::time::timeout(Duration::from_secs(10), acceptor.next())
            .await
            .expect("handed over in time")
            .expect("endpoint open");
        assert_eq!(
            got.remote_address().port(),
            ep2.local_addr().unwrap().port()
        );
        drop(conn);

        // While busy, the next authenticated peer is closed at once with Busy and the reason.
        acceptor.set_busy(Some("in a session".into()));
        match tokio::time::timeout(Duration::from_secs(10), verdict(&client, &server, addr))
            .await
            .expect("told in time")
        {
            DriverError::Connection(quinn::ConnectionError::ApplicationClosed(c)) => {
                assert_eq!(c.error_code.into_inner(), ErrorCode::Busy as u64);
                assert_eq!(&c.reason[..], b"in a session");
            }
            other => panic!("expected a Busy close, got {other}"),
        }
        let c = acceptor.counts();
        assert_eq!((c.busy, c.accepted, c.failed), (1, 1, 1), "{c:?}");
    }

    /// A peer that connected once comes back with the token the listener gave it, from
    /// another endpoint of the same process (the replicator's connection, then the
    /// evacuation's): no Retry, one round trip less.
    #[tokio::test]
    async fn a_peer_that_connected_before_is_not_sent_a_retry() {
        let (server, client) = (
            Identity::generate("dest").unwrap(),
            Identity::generate("source").unwrap(),
        );
        let ep =
            quic::server_endpoint("127.0.0.1:0".parse().unwrap(), &server, client.cert.clone())
                .unwrap();
        let addr = ep.local_addr().unwrap();
        let mut acceptor = Acceptor::start(ep, AcceptLimits::default());
        let connect = || async {
            let ep =
                quic::client_endpoint("127.0.0.1:0".parse().unwrap(), &client, server.cert.clone())
                    .unwrap();
            let conn = quic::connect(&ep, addr)
                .await
                .expect("pinned client connects");
            (ep, conn)
        };
        let (_ep1, _first) = connect().await;
        tokio::time::timeout(Duration::from_secs(10), acceptor.next())
            .await
            .expect("handed over in time")
            .expect("endpoint open");
        let retried = acceptor.counts().retried;
        assert!(retried >= 1, "the first connection had no token");
        // The tokens come in the server's first packets after the handshake.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (_ep2, _second) = connect().await;
        tokio::time::timeout(Duration::from_secs(10), acceptor.next())
            .await
            .expect("handed over in time")
            .expect("endpoint open");
        let c = acceptor.counts();
        assert_eq!(c.retried, retried, "the second came with a token: {c:?}");
        assert_eq!(c.accepted, 2, "{c:?}");
    }
}
