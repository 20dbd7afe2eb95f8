//! The WAN emulator on real UDP sockets on 127.0.0.1.
//!
//! Tolerances are generous for a loaded 2-core machine (the suite runs beside other builds)
//! but tight enough to catch a wrong model: a delay is never shorter than configured, and is
//! at most a few milliseconds longer (see docs/wan-emulator.md for what was measured).

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use wan_emu::{
    Direction, DirectionCounters, DropReason, JitterDist, Link, LinkConfig, Verdict, WanConfig,
    WanEmulator, WanError,
};

const MS: Duration = Duration::from_millis(1);

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A socket with large buffers (so the test itself loses nothing) and a short read timeout.
fn socket() -> UdpSocket {
    let s = transport::quic::bind_udp(localhost()).unwrap();
    s.set_read_timeout(Some(20 * MS)).unwrap();
    s
}

/// Nanoseconds on the wall clock (CLOCK_REALTIME), which the kernel's receive timestamps
/// use too, so one-way delays are measured from the send call to the datagram reaching
/// the receiving socket, not to when the receiving thread got around to reading it.
fn now_ns() -> u64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    d.as_nanos() as u64
}

/// Receives one datagram into `buf`; returns its length and its kernel receive timestamp
/// (SO_TIMESTAMPNS must be on; falls back to the time of reading).
fn recv_stamped(sock: &UdpSocket, buf: &mut [u8]) -> std::io::Result<(usize, u64)> {
    use std::os::fd::AsRawFd;
    let mut ctrl = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is a plain C struct; all-zero is valid. It points at `iov` and `ctrl`,
    // which outlive the call, with their true sizes.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctrl.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&ctrl);
    // SAFETY: as above; recvmsg writes at most the lengths given.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut stamp = now_ns();
    // SAFETY: the kernel wrote well-formed control messages within msg_controllen; the
    // timestamp payload is read unaligned.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::timespec>());
                stamp = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, stamp))
}

/// A test datagram: sequence number, send time, padding up to `len` bytes.
fn datagram(seq: u64, len: usize) -> Vec<u8> {
    let mut d = vec![0x5A; len.max(16)];
    d[..8].copy_from_slice(&seq.to_le_bytes());
    d[8..16].copy_from_slice(&now_ns().to_le_bytes());
    d
}

fn parse(d: &[u8]) -> Option<(u64, u64)> {
    let seq = u64::from_le_bytes(d.get(..8)?.try_into().ok()?);
    let sent = u64::from_le_bytes(d.get(8..16)?.try_into().ok()?);
    Some((seq, sent))
}

/// Polls `cond` every millisecond until it holds or `limit` passes.
fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(MS);
    }
    cond()
}

/// One arrival at a [`Sink`].
#[derive(Clone, Copy, Debug)]
struct Arrival {
    seq: u64,
    len: usize,
    /// Receive time on the `now_ns` clock.
    at: u64,
    /// Receive time minus send time.
    one_way: Duration,
}

/// The "server" of one-way tests: records every datagram it receives.
struct Sink {
    addr: SocketAddr,
    count: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Arrival>>,
}

impl Sink {
    fn start() -> Sink {
        let sock = socket();
        let on: libc::c_int = 1;
        // SAFETY: setsockopt reads one c_int from a live local.
        let r = unsafe {
            use std::os::fd::AsRawFd;
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_TIMESTAMPNS,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0);
        let addr = sock.local_addr().unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (count.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 65536];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, at)) = recv_stamped(&sock, &mut buf) else {
                    continue;
                };
                let (seq, sent) = parse(&buf[..n]).unwrap();
                got.push(Arrival {
                    seq,
                    len: n,
                    at,
                    one_way: Duration::from_nanos(at.saturating_sub(sent)),
                });
                c.fetch_add(1, Ordering::Relaxed);
            }
            got
        });
        Sink {
            addr,
            count,
            stop,
            thread,
        }
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    fn finish(self) -> Vec<Arrival> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// A UDP echo server that counts what it echoes and remembers its last peer.
struct Echo {
    addr: SocketAddr,
    sock: UdpSocket,
    count: Arc<AtomicUsize>,
    peer: Arc<Mutex<Option<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    fn start() -> Echo {
        let sock = socket();
        let addr = sock.local_addr().unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let peer = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, c, p, st) = (
            sock.try_clone().unwrap(),
            count.clone(),
            peer.clone(),
            stop.clone(),
        );
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !st.load(Ordering::Relaxed) {
                let Ok((n, from)) = s2.recv_from(&mut buf) else {
                    continue;
                };
                c.fetch_add(1, Ordering::Relaxed);
                *p.lock().unwrap() = Some(from);
                let _ = s2.send_to(&buf[..n], from);
            }
        });
        Echo {
            addr,
            sock,
            count,
            peer,
            stop,
            thread: Some(thread),
        }
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One ping through `wan` from `client`: the round-trip time, or `None` if no reply came
/// within `limit`.
fn ping(client: &UdpSocket, wan: &WanEmulator, seq: u64, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    client
        .send_to(&datagram(seq, 64), wan.local_addr())
        .unwrap();
    let mut buf = [0u8; 256];
    while start.elapsed() < limit {
        if let Ok(n) = client.recv(&mut buf) {
            if parse(&buf[..n]).map(|p| p.0) == Some(seq) {
                return Some(start.elapsed());
            }
        }
    }
    None
}

/// How many of `v` exceed `bound`: upper bounds on latency allow a few samples over, as a
/// loaded machine can stall the test's own threads; lower bounds allow none.
fn over(v: &[Duration], bound: Duration) -> usize {
    v.iter().filter(|d| **d > bound).count()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
fn delay_sets_the_round_trip_time_and_can_change_live() {
    let echo = Echo::start();
    let wan = WanEmulator::start(localhost(), echo.addr, LinkConfig::delayed(20 * MS)).unwrap();
    let client = socket();
    let rtts: Vec<Duration> = (0..25)
        .map(|i| ping(&client, &wan, i, 2000 * MS).expect("reply"))
        .collect();
    // Never below 2 × delay; at most 25 ms over on a loaded machine, and typically < 1 ms
    // (one sample may be later: a scheduling stall of the test itself).
    assert!(rtts.iter().all(|r| *r >= 40 * MS), "{rtts:?}");
    assert!(over(&rtts, 65 * MS) <= 1, "{rtts:?}");
    assert!(median(rtts.clone()) <= 45 * MS, "{rtts:?}");

    wan.set_config(LinkConfig::delayed(5 * MS)).unwrap();
    assert_eq!(wan.config().server_to_client.delay, 5 * MS);
    let rtts: Vec<Duration> = (100..110)
        .map(|i| ping(&client, &wan, i, 2000 * MS).expect("reply"))
        .collect();
    assert!(rtts.iter().all(|r| *r >= 10 * MS), "{rtts:?}");
    assert!(over(&rtts, 35 * MS) <= 1, "{rtts:?}");
    // The relay counts a datagram once its send returns, which can be just after the
    // client has read it.
    assert!(wait_until(1000 * MS, || wan
        .counters()
        .server_to_client
        .packets
        == 35));
    let c = wan.counters();
    assert_eq!(c.client_to_server.packets, 35);
    assert_eq!(c.client_to_server.bytes, 35 * 64);
    assert_eq!(c.clients, 1);
    assert_eq!(
        c.client_to_server.dropped() + c.server_to_client.dropped(),
        0
    );
}

#[test]
fn one_way_delay_is_never_shorter_than_configured() {
    let sink = Sink::start();
    let wan = WanEmulator::start(localhost(), sink.addr, LinkConfig::delayed(5 * MS)).unwrap();
    let client = socket();
    let n = 500;
    for i in 0..n {
        client.send_to(&datagram(i, 200), wan.local_addr()).unwrap();
        std::thread::sleep(Duration::from_micros(200));
    }
    assert!(wait_until(2000 * MS, || sink.count() == n as usize));
    let mut d: Vec<Duration> = sink.finish().iter().map(|a| a.one_way).collect();
    // No rate and no jitter: the model gives every datagram exactly the delay.
    assert!(wait_until(1000 * MS, || wan
        .counters()
        .client_to_server
        .timed_packets
        == n));
    let c = wan.counters().client_to_server;
    assert_eq!(c.modelled_delay_ns, n * 5_000_000, "{c:?}");
    assert_delay_accounted(&d, &c);
    d.sort();
    // Measured from before the client's send call to the kernel's receive timestamp at the
    // far socket, so the relay's own latency and any scheduling delay only add. The 5 µs
    // allowance is for the wall clock (which the timestamps use) being slewed against the
    // relay's monotonic clock by up to 0.1% over the 5 ms; measured minimum: +2 µs.
    assert!(d[0] >= 5 * MS - Duration::from_micros(5), "{:?}", d[0]);
    // Typically 20-50 µs late; allow 1 ms for the median on a busy machine.
    assert!(d[d.len() / 2] <= 6 * MS, "{:?}", d[d.len() / 2]);
}

#[test]
fn jitter_stays_within_its_bounds_and_keeps_order() {
    let sink = Sink::start();
    let link = LinkConfig::delayed(10 * MS).with_jitter(4 * MS);
    let wan = WanEmulator::start(localhost(), sink.addr, link).unwrap();
    let client = socket();
    let n = 300;
    for i in 0..n {
        client.send_to(&datagram(i, 200), wan.local_addr()).unwrap();
        std::thread::sleep(2 * MS);
    }
    assert!(wait_until(2000 * MS, || sink.count() == n as usize));
    let got = sink.finish();
    let delays: Vec<Duration> = got.iter().map(|a| a.one_way).collect();
    let (lo, hi) = (*delays.iter().min().unwrap(), *delays.iter().max().unwrap());
    // Within [delay - jitter, delay + jitter + 10 ms scheduling slack] (1% may exceed the
    // slack on a loaded machine), never earlier...
    assert!(lo >= 6 * MS, "{lo:?}..{hi:?}");
    assert!(over(&delays, 24 * MS) <= n as usize / 100, "{lo:?}..{hi:?}");
    // ...and actually spread over most of that range.
    assert!(lo < 7500 * Duration::from_micros(1), "{lo:?}");
    assert!(hi > 12500 * Duration::from_micros(1), "{hi:?}");
    // Order is kept (the default: no reordering).
    assert!(got.windows(2).all(|w| w[0].seq < w[1].seq));
}

#[test]
fn normal_reordering_jitter_reorders_within_bounds() {
    let sink = Sink::start();
    let link = LinkConfig {
        jitter_dist: JitterDist::Normal,
        reorder: true,
        ..LinkConfig::delayed(10 * MS).with_jitter(MS)
    };
    let wan = WanEmulator::start(localhost(), sink.addr, link).unwrap();
    let client = socket();
    let n = 200;
    for i in 0..n {
        client.send_to(&datagram(i, 200), wan.local_addr()).unwrap();
        std::thread::sleep(Duration::from_micros(500));
    }
    assert!(wait_until(2000 * MS, || sink.count() == n as usize));
    let got = sink.finish();
    // Truncated at ±3 ms; + 10 ms scheduling slack above (1% may exceed it).
    let delays: Vec<Duration> = got.iter().map(|a| a.one_way).collect();
    assert!(delays.iter().all(|d| *d >= 7 * MS), "{delays:?}");
    assert!(over(&delays, 23 * MS) <= n as usize / 100, "{delays:?}");
    let swapped = got.windows(2).filter(|w| w[0].seq > w[1].seq).count();
    assert!(swapped > 10, "{swapped}");
}

#[test]
fn rate_limit_paces_a_blast_at_the_configured_rate() {
    let sink = Sink::start();
    let rate = 40_000_000;
    // A queue big enough for the whole blast, so nothing is dropped and the receiver sees
    // exactly the rate.
    let link = LinkConfig::delayed(5 * MS)
        .with_rate(rate)
        .with_queue_bytes(8 << 20);
    let wan = WanEmulator::start(localhost(), sink.addr, link).unwrap();
    let client = socket();
    let n = 3334; // 4 MB in 1200-byte datagrams: 0.8 s at 40 Mbit/s.
    let start = Instant::now();
    for i in 0..n {
        client
            .send_to(&datagram(i, 1200), wan.local_addr())
            .unwrap();
    }
    let blast = start.elapsed();
    assert!(wait_until(5000 * MS, || sink.count() == n as usize));
    let got = sink.finish();
    let span = Duration::from_nanos(got[n as usize - 1].at - got[0].at);
    let ideal = Duration::from_nanos((n - 1) * 1200 * 8 * 1_000_000_000 / rate);
    assert!(
        span > ideal.mul_f64(0.85) && span < ideal.mul_f64(1.15),
        "{n} datagrams sent in {blast:?} arrived over {span:?}, ideal {ideal:?}"
    );
    // Never faster than the rate. Overall: the span can only shrink by the first
    // datagram's lateness; allow 3% (24 ms). Over any 1000 consecutive arrivals (240 ms):
    // at most 10% above it, which allows the relay's sender to be descheduled for up to
    // 24 ms on a heavily loaded machine (a late first arrival compresses the window;
    // typically the worst window is within 2%).
    let overall = ((n - 1) * 1200 * 8) as f64 / span.as_secs_f64();
    assert!(overall <= rate as f64 * 1.03, "{overall} bit/s");
    let mut worst = 0f64;
    for w in got.windows(1000) {
        let dt = (w[999].at - w[0].at) as f64 / 1e9;
        let bits: usize = w[1..].iter().map(|a| a.len * 8).sum();
        worst = worst.max(bits as f64 / dt);
    }
    eprintln!("worst 240 ms window: {worst} bit/s, overall {overall} bit/s");
    assert!(worst <= rate as f64 * 1.10, "{worst} bit/s");
    let c = wan.counters().client_to_server;
    assert_eq!((c.packets, c.bytes, c.dropped()), (n, n * 1200, 0));
    assert_eq!(c.held_bytes, 0);
}

#[test]
fn a_full_queue_drops_and_bounds_the_queueing_delay() {
    let sink = Sink::start();
    // 8 Mbit/s is one byte per microsecond: a 50 000-byte queue holds 50 ms.
    let link = LinkConfig::delayed(5 * MS)
        .with_rate(8_000_000)
        .with_queue_bytes(50_000);
    let wan = WanEmulator::start(localhost(), sink.addr, link).unwrap();
    let client = socket();
    let n = 500u64;
    for i in 0..n {
        client
            .send_to(&datagram(i, 1000), wan.local_addr())
            .unwrap();
    }
    assert!(wait_until(3000 * MS, || {
        let c = wan.counters().client_to_server;
        c.packets + c.dropped_queue == n && sink.count() as u64 == c.packets
    }));
    let got = sink.finish();
    let c = wan.counters().client_to_server;
    // About 50 datagrams fit, plus what drains while the blast arrives.
    assert!(c.dropped_queue >= 300, "{c:?}");
    assert_eq!(c.dropped_loss + c.dropped_cut + c.send_errors, 0);
    assert_eq!(got.len() as u64, c.packets);
    // Queueing + serialisation ≤ 50 ms, + 5 ms delay, + 10 ms scheduling slack (1% may
    // exceed it).
    let delays: Vec<Duration> = got.iter().map(|a| a.one_way).collect();
    assert!(delays.iter().all(|d| *d >= 5 * MS), "{delays:?}");
    assert!(over(&delays, 65 * MS) <= got.len() / 100, "{delays:?}");
    // The first survivor barely queued; the last ones waited for a full queue.
    assert!(got.iter().any(|a| a.one_way >= 45 * MS), "{got:?}");
    // The counters see the same queue: the survivors' modelled delay averages well above
    // the 5 ms of propagation (most waited behind a full queue; 30.5 ms for a blast that
    // arrived at once), and never above the queue's 50 ms plus those 5.
    assert_eq!(c.timed_packets, c.packets);
    let mean_ms = c.modelled_delay_ns as f64 / c.timed_packets as f64 / 1e6;
    assert!((25.0..=55.0).contains(&mean_ms), "{mean_ms} ms, {c:?}");
    assert_delay_accounted(&delays, &c);
}

/// The relay's account of a direction's delay (what the model gave, plus how late the relay
/// sent) cannot exceed the delay the receiver measured: that runs from before the client's
/// send to the far socket's receive timestamp, so it also holds the kernels' share. 5 µs
/// per datagram are allowed for the wall clock's slew against the relay's clock.
fn assert_delay_accounted(measured: &[Duration], c: &DirectionCounters) {
    assert_eq!(c.timed_packets, measured.len() as u64, "{c:?}");
    let measured_ns: u128 = measured.iter().map(|d| d.as_nanos()).sum();
    let accounted = u128::from(c.modelled_delay_ns) + u128::from(c.send_lateness_ns);
    let slack = 5_000 * measured.len() as u128;
    assert!(
        accounted <= measured_ns + slack,
        "relay accounts {accounted} ns, receiver measured {measured_ns} ns: {c:?}"
    );
}

/// The sequence numbers that arrive when `n` datagrams cross a relay that loses 10%.
fn lossy_run(seed: u64, n: u64) -> (Vec<u64>, LinkConfig) {
    let sink = Sink::start();
    let lossy = LinkConfig::default().with_loss(0.1, seed);
    let cfg = WanConfig {
        client_to_server: lossy.clone(),
        server_to_client: LinkConfig::default(),
    };
    let wan = WanEmulator::start(localhost(), sink.addr, cfg).unwrap();
    let client = socket();
    for i in 0..n {
        client.send_to(&datagram(i, 64), wan.local_addr()).unwrap();
        if i % 200 == 199 {
            // Paced, so no socket buffer can overflow even on a busy machine.
            std::thread::sleep(MS);
        }
    }
    assert!(wait_until(5000 * MS, || {
        let c = wan.counters().client_to_server;
        c.packets + c.dropped_loss == n && sink.count() as u64 == c.packets
    }));
    let c = wan.counters().client_to_server;
    assert_eq!(c.dropped() - c.dropped_loss, 0, "{c:?}");
    let mut seqs: Vec<u64> = sink.finish().iter().map(|a| a.seq).collect();
    seqs.sort();
    (seqs, lossy)
}

#[test]
fn loss_rate_and_pattern_follow_the_seed() {
    let n = 20_000;
    let (a, cfg) = lossy_run(1234, n);
    let lost = n - a.len() as u64;
    // Binomial(20000, 0.1): mean 2000, standard deviation 42; allow ±10% (about 5 sd).
    assert!((1800..=2200).contains(&lost), "{lost}");
    // Exactly the datagrams the model loses with this seed are lost.
    let mut model = Link::new(cfg).unwrap();
    let expected: Vec<u64> = (0..n)
        .filter(|&i| model.offer(i, 64) != Verdict::Drop(DropReason::Loss))
        .collect();
    assert_eq!(a, expected);
    // A second relay with the same seed loses the same ones; another seed does not.
    let (b, _) = lossy_run(1234, 5000);
    assert_eq!(
        b,
        a.iter().copied().filter(|&s| s < 5000).collect::<Vec<_>>()
    );
    let (c, _) = lossy_run(4321, 5000);
    assert_ne!(c, b);
}

#[test]
fn cut_blocks_both_directions_until_restored() {
    let echo = Echo::start();
    let wan = WanEmulator::start(localhost(), echo.addr, LinkConfig::delayed(5 * MS)).unwrap();
    let client = socket();
    assert!(ping(&client, &wan, 0, 2000 * MS).is_some());
    let relay_side = echo
        .peer
        .lock()
        .unwrap()
        .expect("the echo server saw the relay");

    // Datagrams already inside the link when it is cut are lost too.
    for i in 1..=5 {
        client.send_to(&datagram(i, 64), wan.local_addr()).unwrap();
    }
    wan.cut();
    assert!(wan.is_cut());
    for i in 6..=20 {
        client.send_to(&datagram(i, 64), wan.local_addr()).unwrap();
    }
    // The server tries to talk to the client too.
    for i in 0..10 {
        echo.sock
            .send_to(&datagram(1000 + i, 64), relay_side)
            .unwrap();
    }
    // Every datagram accounted for (relayed or cut), in both directions.
    assert!(wait_until(2000 * MS, || {
        let c = wan.counters();
        let echoed = echo.count() as u64 - 1;
        c.client_to_server.packets + c.client_to_server.dropped_cut == 21
            && c.client_to_server.packets == 1 + echoed
            && c.server_to_client.packets + c.server_to_client.dropped_cut == 11 + echoed
    }));
    let mut buf = [0u8; 256];
    assert!(client.recv(&mut buf).is_err(), "something crossed the cut");
    let c = wan.counters();
    // The first 5 may have reached the echo server before the cut (their echo was then
    // cut on the way back); nothing sent during the cut did.
    let echoed = echo.count() - 1;
    assert!(echoed <= 5, "{echoed}");
    assert_eq!(c.client_to_server.packets, 1 + echoed as u64);
    assert_eq!(c.client_to_server.dropped_cut, 20 - echoed as u64, "{c:?}");
    assert_eq!(c.server_to_client.packets, 1);
    assert_eq!(c.server_to_client.dropped_cut, 10 + echoed as u64, "{c:?}");

    wan.restore();
    assert!(!wan.is_cut());
    let rtt = ping(&client, &wan, 99, 2000 * MS).expect("traffic resumes after restore");
    assert!(rtt >= 10 * MS, "{rtt:?}");
}

#[test]
fn a_cut_counts_the_bytes_it_took_out_of_the_link() {
    // A long delay, so the datagrams sent before the cut are surely still inside the link.
    let sink = Sink::start();
    let wan = WanEmulator::start(localhost(), sink.addr, LinkConfig::delayed(300 * MS)).unwrap();
    let client = socket();
    for i in 0..5 {
        client
            .send_to(&datagram(i, 1000), wan.local_addr())
            .unwrap();
    }
    assert!(wait_until(2000 * MS, || wan
        .counters()
        .client_to_server
        .held_bytes
        == 5000));
    wan.cut();
    // Arriving while cut: dropped at once, not in flight at the cut.
    for i in 5..12 {
        client.send_to(&datagram(i, 64), wan.local_addr()).unwrap();
    }
    assert!(wait_until(2000 * MS, || {
        let c = wan.counters().client_to_server;
        c.dropped_cut == 12 && c.held_bytes == 0
    }));
    let c = wan.counters().client_to_server;
    assert_eq!(c.cut_in_flight_bytes, 5000, "{c:?}");
    assert_eq!(c.packets, 0, "{c:?}");

    // In the link at a cut that ends before they fall due: delivered, not counted.
    wan.restore();
    client
        .send_to(&datagram(100, 700), wan.local_addr())
        .unwrap();
    assert!(wait_until(2000 * MS, || wan
        .counters()
        .client_to_server
        .held_bytes
        == 700));
    wan.cut();
    std::thread::sleep(10 * MS);
    wan.restore();
    assert!(wait_until(2000 * MS, || sink.count() == 1));
    let c = wan.counters().client_to_server;
    assert_eq!((c.packets, c.bytes), (1, 700), "{c:?}");
    assert_eq!(c.cut_in_flight_bytes, 5000, "{c:?}");
    assert_eq!(wan.counters().server_to_client.cut_in_flight_bytes, 0);
    let got = sink.finish();
    assert_eq!(got.iter().map(|a| a.seq).collect::<Vec<_>>(), vec![100]);
}

#[test]
fn each_client_port_gets_its_own_flow() {
    let echo = Echo::start();
    let wan = WanEmulator::start(localhost(), echo.addr, LinkConfig::delayed(MS)).unwrap();
    let a = socket();
    let b = socket();
    assert!(ping(&a, &wan, 1, 2000 * MS).is_some());
    assert!(ping(&b, &wan, 2, 2000 * MS).is_some());
    // Interleaved: each reply goes back to the client that asked.
    assert!(ping(&a, &wan, 3, 2000 * MS).is_some());
    // A "reconnect" from a fresh port (bound before `a` closes, so it cannot reuse it).
    let c = socket();
    drop(a);
    assert!(ping(&c, &wan, 4, 2000 * MS).is_some());
    assert!(ping(&b, &wan, 5, 2000 * MS).is_some());
    assert_eq!(wan.counters().clients, 3);
}

#[test]
fn bad_configurations_and_addresses_are_refused() {
    let upstream: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let bad = LinkConfig::default().with_loss(1.5, 0);
    assert!(matches!(
        WanEmulator::start(localhost(), upstream, bad.clone()),
        Err(WanError::Config(_))
    ));
    assert!(matches!(
        WanEmulator::start(
            localhost(),
            "0.0.0.0:9".parse().unwrap(),
            LinkConfig::default()
        ),
        Err(WanError::BadUpstream(_))
    ));
    let wan = WanEmulator::start(localhost(), upstream, LinkConfig::default()).unwrap();
    assert!(matches!(
        WanEmulator::start(wan.local_addr(), upstream, LinkConfig::default()),
        Err(WanError::Bind { .. })
    ));
    // A rejected change leaves the running configuration alone.
    assert!(wan.set_link_config(Direction::ServerToClient, bad).is_err());
    assert_eq!(wan.config(), WanConfig::default());
    wan.shutdown();
}

#[test]
fn sending_to_a_closed_upstream_port_is_counted_not_fatal() {
    // Bind and drop a socket to get a port that (almost certainly) nobody listens on.
    let closed = socket().local_addr().unwrap();
    let wan = WanEmulator::start(localhost(), closed, LinkConfig::default()).unwrap();
    let client = socket();
    for i in 0..20 {
        client.send_to(&datagram(i, 64), wan.local_addr()).unwrap();
        std::thread::sleep(MS);
    }
    assert!(wait_until(2000 * MS, || {
        let c = wan.counters().client_to_server;
        c.packets + c.send_errors == 20
    }));
    // The relay still works for a real server afterwards.
    let echo = Echo::start();
    let wan2 = WanEmulator::start(localhost(), echo.addr, LinkConfig::default()).unwrap();
    assert!(ping(&client, &wan2, 1, 2000 * MS).is_some());
    drop(wan);
}

/// Measures how late the relay delivers sparse traffic: `cargo test -p wan-emu --test
/// wan_emulator -- --ignored --nocapture measure_delay`.
#[test]
#[ignore = "measurement"]
fn measure_delay_accuracy() {
    for (name, link, gap) in [
        ("no delay, 1000 pkt/s", LinkConfig::default(), MS),
        ("10 ms delay, 1000 pkt/s", LinkConfig::delayed(10 * MS), MS),
        (
            "10 ms delay, 10000 pkt/s",
            LinkConfig::delayed(10 * MS),
            Duration::from_micros(100),
        ),
    ] {
        let sink = Sink::start();
        let link_delay = link.delay;
        let wan = WanEmulator::start(localhost(), sink.addr, link).unwrap();
        let client = socket();
        let n = 3000usize;
        let cpu0 = relay_cpu_seconds();
        let start = Instant::now();
        for i in 0..n {
            client
                .send_to(&datagram(i as u64, 200), wan.local_addr())
                .unwrap();
            let next = start + gap * (i as u32 + 1);
            while Instant::now() < next {
                std::thread::sleep(next - Instant::now());
            }
        }
        assert!(wait_until(2000 * MS, || sink.count() == n));
        let secs = start.elapsed().as_secs_f64();
        let cpu = relay_cpu_seconds() - cpu0;
        let mut late: Vec<i64> = sink
            .finish()
            .iter()
            .map(|a| a.one_way.as_micros() as i64 - link_delay.as_micros() as i64)
            .collect();
        late.sort();
        let q = |p: f64| late[((late.len() - 1) as f64 * p) as usize];
        println!(
            "{name}: one-way minus delay min {} us, p50 {} us, p90 {} us, p99 {} us, max {} us; \
             relay CPU {:.0}% of one core",
            q(0.0),
            q(0.5),
            q(0.9),
            q(0.99),
            q(1.0),
            100.0 * cpu / secs
        );
    }
}

/// Measures the relay's CPU cost per datagram with a controlled load: a client sending
/// paced GSO bursts of 10 × 1200-byte datagrams (as quinn does) into a 1 Gbit/s link.
/// `cargo test -p wan-emu --test wan_emulator -- --ignored --nocapture measure_relay_cpu`
/// (`WAN_BLAST_GBPS`, default 0.9, sets the offered rate).
#[test]
#[ignore = "measurement"]
fn measure_relay_cpu_paced_udp() {
    use std::os::fd::AsRawFd;
    let gbps: f64 = std::env::var("WAN_BLAST_GBPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.9);
    let sink = Sink::start();
    let link = LinkConfig::default().with_rate(1_000_000_000);
    let wan = WanEmulator::start(localhost(), sink.addr, link).unwrap();
    let client = socket();
    let segment: libc::c_int = 1200;
    // SAFETY: setsockopt reads one c_int from a live local.
    let r = unsafe {
        libc::setsockopt(
            client.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            (&segment as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "UDP_SEGMENT");
    let mut burst = datagram(0, 12_000);
    let gap = Duration::from_secs_f64(12_000.0 * 8.0 / (gbps * 1e9));
    let cpu0 = relay_cpu_seconds();
    let start = Instant::now();
    let mut bursts = 0u32;
    while start.elapsed() < Duration::from_secs(3) {
        // Every segment starts with its own sequence number and send time.
        for (k, seg) in burst.chunks_mut(1200).enumerate() {
            seg.copy_from_slice(&datagram(u64::from(bursts) * 10 + k as u64, 1200));
        }
        client.send_to(&burst, wan.local_addr()).unwrap();
        bursts += 1;
        let next = start + gap * bursts;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let offered = u64::from(bursts) * 10;
    assert!(wait_until(2000 * MS, || {
        let c = wan.counters().client_to_server;
        c.packets + c.dropped() == offered && c.held_bytes == 0
    }));
    let cpu = relay_cpu_seconds() - cpu0;
    let got = sink.finish();
    let c = wan.counters().client_to_server;
    let span = (got[got.len() - 1].at - got[0].at) as f64 / 1e9;
    println!(
        "offered {gbps} Gbit/s in GSO bursts: {offered} datagrams, carried {} at {:.3} Gbit/s, \
         queue drops {}; relay CPU {:.0}% of one core, {:.2} us per datagram",
        c.packets,
        c.bytes as f64 * 8.0 / span / 1e9,
        c.dropped_queue,
        100.0 * cpu / secs,
        cpu * 1e6 / offered as f64,
    );
}

/// CPU time (user + system) of this process's `wan-*` threads, in seconds. Other tests
/// running at the same time add theirs: measure alone.
fn relay_cpu_seconds() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut ticks = 0u64;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("wan-") {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the ")" that ends the command name: utime is the 12th, stime the
        // 13th (fields 14 and 15 of the whole line).
        if let Some(rest) = stat.rsplit_once(')').map(|x| x.1) {
            let f: Vec<&str> = rest.split_whitespace().collect();
            ticks += f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
        }
    }
    ticks as f64 / hz
}

mod quinn_through_the_relay {
    use super::*;
    use transport::quic;
    use transport::tls::Identity;

    /// What one transfer through the relay did.
    pub struct Transfer {
        pub got: Vec<u8>,
        pub counters: wan_emu::WanCounters,
        pub elapsed: Duration,
        /// CPU seconds of the relay's threads during the transfer.
        pub relay_cpu: f64,
        /// CPU seconds of the whole process (quinn client and server, relay) likewise.
        pub process_cpu: f64,
    }

    /// Which endpoints to use.
    #[derive(Clone, Copy, Debug)]
    pub enum Endpoints {
        /// `transport::quic::{server,client}_endpoint`: the crate's configuration (BBR).
        Crate,
        /// The same TLS and transport configuration, but with CUBIC congestion control.
        Cubic,
    }

    fn cubic_endpoints(
        client_id: &Identity,
        server_id: &Identity,
    ) -> (quinn::Endpoint, quinn::Endpoint) {
        use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
        use transport::tls::{client_tls, server_tls};
        let transport = || {
            let mut t = quic::transport_config();
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()));
            Arc::new(t)
        };
        let tls = server_tls(server_id, client_id.cert.clone()).unwrap();
        let mut server_cfg =
            quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls).unwrap()));
        server_cfg.transport_config(transport());
        let tls = client_tls(client_id, server_id.cert.clone()).unwrap();
        let mut client_cfg =
            quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
        client_cfg.transport_config(transport());
        let endpoint = |server: Option<quinn::ServerConfig>| {
            let sock = quic::bind_udp(localhost()).unwrap();
            let runtime = quinn::default_runtime().unwrap();
            quinn::Endpoint::new(Default::default(), server, sock, runtime).unwrap()
        };
        let server = endpoint(Some(server_cfg));
        let mut client = endpoint(None);
        client.set_default_client_config(client_cfg);
        (server, client)
    }

    /// Sends `data` on one unidirectional stream from a client to a server through a relay
    /// with `cfg`.
    pub async fn transfer(cfg: impl Into<WanConfig>, data: Arc<Vec<u8>>) -> Transfer {
        transfer_with(Endpoints::Crate, cfg, data).await
    }

    /// [`transfer`] with a choice of endpoints.
    pub async fn transfer_with(
        endpoints: Endpoints,
        cfg: impl Into<WanConfig>,
        data: Arc<Vec<u8>>,
    ) -> Transfer {
        let client_id = Identity::generate("client").unwrap();
        let server_id = Identity::generate("server").unwrap();
        let (server, client) = match endpoints {
            Endpoints::Crate => (
                quic::server_endpoint(localhost(), &server_id, client_id.cert.clone()).unwrap(),
                quic::client_endpoint(localhost(), &client_id, server_id.cert.clone()).unwrap(),
            ),
            Endpoints::Cubic => cubic_endpoints(&client_id, &server_id),
        };
        let wan = WanEmulator::start(localhost(), server.local_addr().unwrap(), cfg).unwrap();
        let limit = data.len() + 1;
        let receiver = tokio::spawn(async move {
            let conn = quic::accept(&server).await.unwrap().unwrap();
            let mut stream = conn.accept_uni().await.unwrap();
            let got = stream.read_to_end(limit).await.unwrap();
            conn.close(0u32.into(), b"done");
            got
        });
        let conn = quic::connect(&client, wan.local_addr()).await.unwrap();
        let (relay0, process0) = (relay_cpu_seconds(), process_cpu_seconds());
        let start = Instant::now();
        let mut stream = conn.open_uni().await.unwrap();
        stream.write_all(&data).await.unwrap();
        stream.finish().unwrap();
        let got = receiver.await.unwrap();
        Transfer {
            got,
            counters: wan.counters(),
            elapsed: start.elapsed(),
            relay_cpu: relay_cpu_seconds() - relay0,
            process_cpu: process_cpu_seconds() - process0,
        }
    }

    pub fn pattern(len: usize) -> Vec<u8> {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn quinn_moves_megabytes_intact_over_delay_and_loss() {
        let data = Arc::new(pattern(4 << 20));
        let link = LinkConfig::delayed(10 * MS).with_loss(0.01, 77);
        let run = transfer(link, data.clone());
        let t = tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .expect("transfer finished in time");
        let (got, c, elapsed) = (t.got, t.counters, t.elapsed);
        assert!(
            got == *data,
            "corrupted: {} of {} bytes",
            got.len(),
            data.len()
        );
        // Losses happened and were recovered from.
        assert!(c.client_to_server.dropped_loss > 0, "{c:?}");
        assert!(c.client_to_server.bytes > data.len() as u64, "{c:?}");
        eprintln!("4 MiB over 20 ms RTT + 1% loss in {elapsed:?}: {c:?}");
    }

    /// CPU time (user + system) of the whole process, in seconds.
    fn process_cpu_seconds() -> f64 {
        // SAFETY: getrusage writes one rusage into the zero-initialised value we pass.
        let ru = unsafe {
            let mut ru: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_SELF, &mut ru);
            ru
        };
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        secs(ru.ru_utime) + secs(ru.ru_stime)
    }

    /// Measures what the relay can carry: `cargo test -p wan-emu --test wan_emulator --
    /// --ignored --nocapture measure_relay` (`WAN_MEASURE_MIB`, default 256, sets the
    /// transfer size). Prints one line per configuration.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "measurement, takes about half a minute"]
    async fn measure_relay_throughput() {
        let mib: usize = std::env::var("WAN_MEASURE_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256);
        let data = Arc::new(pattern(mib << 20));
        let unlimited = LinkConfig::default();
        let gbit = LinkConfig::default().with_rate(1_000_000_000);
        let gbit_10ms = LinkConfig::new(10 * MS, 1_000_000_000);
        for (name, endpoints, link) in [
            ("unlimited, BBR", Endpoints::Crate, unlimited.clone()),
            ("1 Gbit/s, BBR", Endpoints::Crate, gbit.clone()),
            (
                "1 Gbit/s + 10 ms RTT, BBR",
                Endpoints::Crate,
                gbit_10ms.clone(),
            ),
            ("unlimited, CUBIC", Endpoints::Cubic, unlimited),
            ("1 Gbit/s, CUBIC", Endpoints::Cubic, gbit),
            ("1 Gbit/s + 10 ms RTT, CUBIC", Endpoints::Cubic, gbit_10ms),
        ] {
            let t = transfer_with(endpoints, link, data.clone()).await;
            assert!(t.got == *data);
            let secs = t.elapsed.as_secs_f64();
            let c = t.counters;
            let c2s = c.client_to_server;
            println!(
                "{name}: {mib} MiB in {secs:.2} s = {:.3} Gbit/s goodput; relay CPU {:.2} s \
                 ({:.0}% of one core, {:.1} us/datagram), process CPU {:.2} s; c2s carried {} \
                 datagrams, queue drops {} ({:.1}% of offered); s2c carried {}",
                t.got.len() as f64 * 8.0 / secs / 1e9,
                t.relay_cpu,
                100.0 * t.relay_cpu / secs,
                t.relay_cpu * 1e6
                    / (c2s.packets + c2s.dropped() + c.server_to_client.packets) as f64,
                t.process_cpu,
                c2s.packets,
                c2s.dropped_queue,
                100.0 * c2s.dropped_queue as f64 / (c2s.dropped_queue + c2s.packets) as f64,
                c.server_to_client.packets,
            );
        }
    }
}

#[test]
fn routes_to_two_servers_share_one_rate() {
    let (a, b) = (Sink::start(), Sink::start());
    let rate = 40_000_000;
    let link = LinkConfig::delayed(5 * MS)
        .with_rate(rate)
        .with_queue_bytes(8 << 20);
    let mut wan = WanEmulator::start(localhost(), a.addr, link).unwrap();
    let to_b = wan.add_route(localhost(), b.addr).unwrap();
    assert_ne!(to_b, wan.local_addr());
    let client = socket();
    let n = 1667u64; // 2 MB to each: 0.8 s for both at 40 Mbit/s, 0.4 s if not shared.
    for i in 0..n {
        client
            .send_to(&datagram(i, 1200), wan.local_addr())
            .unwrap();
        client.send_to(&datagram(i, 1200), to_b).unwrap();
    }
    assert!(wait_until(5000 * MS, || a.count() == n as usize
        && b.count() == n as usize));
    let (ga, gb) = (a.finish(), b.finish());
    let first = ga[0].at.min(gb[0].at);
    let last = ga[n as usize - 1].at.max(gb[n as usize - 1].at);
    let span = Duration::from_nanos(last - first);
    let ideal = Duration::from_nanos((2 * n - 1) * 1200 * 8 * 1_000_000_000 / rate);
    assert!(
        span > ideal.mul_f64(0.85) && span < ideal.mul_f64(1.15),
        "both arrived over {span:?}, the shared rate needs {ideal:?}"
    );
    let c = wan.counters();
    assert_eq!(c.client_to_server.packets, 2 * n);
    assert_eq!(c.clients, 2);
}
