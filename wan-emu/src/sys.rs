//! The system calls, kept apart from the relay logic.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{SystemTime, UNIX_EPOCH};

use super::relay::{Packet, MAX_DATAGRAM, RECV_BATCH, SEND_BATCH};

/// Most segments in one GSO send (the kernel allows 64 or more).
const MAX_SEGMENTS: usize = 64;
/// Most payload bytes in one GSO send: a UDP datagram's length field is 16 bits.
const MAX_GSO_BYTES: usize = 65_000;

/// Room for the control messages we ask for (a timestamp and a GRO segment size), in
/// `u64`s so that the buffer is aligned for `cmsghdr`.
const CTRL_WORDS: usize = 16;

fn set_int_opt(sock: &UdpSocket, level: libc::c_int, opt: libc::c_int, value: libc::c_int) -> bool {
    // SAFETY: setsockopt reads exactly size_of::<c_int>() bytes from a live c_int.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            opt,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    r == 0
}

/// Socket buffers the relay asks for: a relay that drops a burst in its own receive queue
/// would add loss nobody configured.
const UDP_BUFFER_BYTES: libc::c_int = 16 << 20;

/// Binds a UDP socket with large send and receive buffers: past `net.core.rmem_max` when
/// privileged (`SO_*BUFFORCE`), else up to the system's cap.
pub fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let sock = UdpSocket::bind(addr)?;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if !set_int_opt(&sock, libc::SOL_SOCKET, force, UDP_BUFFER_BYTES) {
            set_int_opt(&sock, libc::SOL_SOCKET, plain, UDP_BUFFER_BYTES);
        }
    }
    Ok(sock)
}

/// Asks for a kernel receive timestamp on every datagram (see `BatchClock`), and for
/// UDP GRO: a burst of equal-size datagrams (as quinn sends with GSO) is then handed
/// over as one buffer, which [`Datagram::segments`] splits again. Both are best effort:
/// without them, arrival times are read after the fact and every datagram costs a
/// trip through the kernel of its own.
pub fn enable_rx_offloads(sock: &UdpSocket) {
    set_int_opt(sock, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1);
    set_int_opt(sock, libc::SOL_UDP, libc::UDP_GRO, 1);
}

/// The wall clock (CLOCK_REALTIME, what SO_TIMESTAMPNS stamps with), in nanoseconds from
/// the epoch (negative before it).
pub fn realtime_ns() -> i128 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

/// Asks the kernel to wake this thread's sleeps at most `ns` late (the default slack is
/// 50 µs). Best effort: on failure sleeps are just less precise.
pub fn set_timer_slack_ns(ns: libc::c_ulong) {
    let unused: libc::c_ulong = 0;
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and only affects the
    // calling thread; the unused arguments are ignored by the kernel.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, ns, unused, unused, unused);
    }
}

/// One received buffer: a datagram, or with GRO several equal-size datagrams (the last
/// may be shorter) from the same sender.
pub struct Datagram<'a> {
    pub data: &'a [u8],
    /// The GRO segment size; 0 if the buffer is one datagram.
    pub segment: usize,
    pub from: Option<SocketAddr>,
    /// Kernel receive time on the wall clock, in nanoseconds.
    pub stamp_ns: Option<i128>,
}

impl<'a> Datagram<'a> {
    /// The datagrams in this buffer.
    pub fn segments(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        let size = match self.segment {
            0 => self.data.len(),
            n => n,
        };
        // chunks() yields nothing for an empty buffer, but an empty datagram is still a
        // datagram to relay.
        let empty = self.data.is_empty();
        std::iter::once(self.data)
            .filter(move |_| empty)
            .chain(self.data.chunks(size.max(1)))
    }
}

/// Buffers for receiving up to [`RECV_BATCH`] buffers with one `recvmmsg`.
///
/// The headers point into the other vectors; those are allocated once and never
/// resized, so the pointers stay valid when the struct moves.
pub struct RecvBatch {
    bufs: Vec<u8>,
    iovs: Vec<libc::iovec>,
    names: Vec<libc::sockaddr_storage>,
    ctrl: Vec<[u64; CTRL_WORDS]>,
    hdrs: Vec<libc::mmsghdr>,
}

// SAFETY: the raw pointers inside only point into the struct's own heap buffers.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    pub fn new() -> RecvBatch {
        let mut bufs = vec![0u8; RECV_BATCH * MAX_DATAGRAM];
        let iovs: Vec<libc::iovec> = bufs
            .chunks_mut(MAX_DATAGRAM)
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        RecvBatch {
            bufs,
            iovs,
            // SAFETY: sockaddr_storage and mmsghdr are plain C structs for which
            // all-zero bytes are a valid value (null pointers, zero lengths).
            names: vec![unsafe { zeroed::<libc::sockaddr_storage>() }; RECV_BATCH],
            ctrl: vec![[0; CTRL_WORDS]; RECV_BATCH],
            // SAFETY: as above.
            hdrs: (0..RECV_BATCH)
                .map(|_| unsafe { zeroed::<libc::mmsghdr>() })
                .collect(),
        }
    }

    /// Blocks (up to the socket's read timeout) for at least one datagram, then takes
    /// whatever else is already queued, up to [`RECV_BATCH`] buffers. Returns how many.
    pub fn recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        for i in 0..RECV_BATCH {
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = self.ctrl[i].as_mut_ptr().cast();
            h.msg_controllen = size_of::<[u64; CTRL_WORDS]>();
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: every header points at a live iovec covering MAX_DATAGRAM bytes of
        // `bufs`, at a sockaddr_storage and at a control buffer with their true sizes;
        // all are owned by `self`, which is borrowed mutably for the call.
        // MSG_WAITFORONE makes the call block for the first datagram only (bounded by
        // SO_RCVTIMEO); the timeout argument may be null.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                RECV_BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Buffer `i` of the last `recv`.
    pub fn get(&self, i: usize) -> Datagram<'_> {
        let h = &self.hdrs[i];
        // The kernel reports the full length of a truncated datagram; never trust it
        // beyond the buffer (cannot happen with 64 KiB buffers, but costs nothing).
        let len = (h.msg_len as usize).min(MAX_DATAGRAM);
        let mut d = Datagram {
            data: &self.bufs[i * MAX_DATAGRAM..i * MAX_DATAGRAM + len],
            segment: 0,
            from: from_sockaddr(&self.names[i], h.msg_hdr.msg_namelen),
            stamp_ns: None,
        };
        // SAFETY: the kernel filled msg_control / msg_controllen (bounded by the buffer
        // we gave it) with well-formed control messages; the CMSG_* helpers only walk
        // within msg_controllen, and each payload is read unaligned with the size its
        // (level, type) defines, after checking cmsg_len covers it.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
            while !c.is_null() {
                let data = libc::CMSG_DATA(c);
                let payload = (*c).cmsg_len as usize - (data as usize - c as usize);
                match ((*c).cmsg_level, (*c).cmsg_type) {
                    (libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS)
                        if payload >= size_of::<libc::timespec>() =>
                    {
                        let ts = std::ptr::read_unaligned(data.cast::<libc::timespec>());
                        d.stamp_ns =
                            Some(i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec));
                    }
                    (libc::SOL_UDP, libc::UDP_GRO) if payload >= size_of::<libc::c_int>() => {
                        let seg = std::ptr::read_unaligned(data.cast::<libc::c_int>());
                        d.segment = usize::try_from(seg).unwrap_or(0);
                    }
                    _ => {}
                }
                c = libc::CMSG_NXTHDR(&h.msg_hdr, c);
            }
        }
        d
    }
}

/// One message of a `sendmmsg`: `count` packets from `first`, sent as one GSO buffer
/// when `count > 1`.
#[derive(Clone, Copy)]
struct Msg {
    first: usize,
    count: usize,
}

/// Buffers for sending up to [`SEND_BATCH`] datagrams with one `sendmmsg`, runs of
/// equal-size datagrams to one destination going out as a single GSO buffer
/// (`UDP_SEGMENT`): the kernel, and the receiver if it uses GRO as quinn does, then
/// handle the run as one packet until it is split into datagrams again.
pub struct SendBatch {
    iovs: Vec<libc::iovec>,
    names: Vec<libc::sockaddr_storage>,
    ctrl: Vec<[u64; CTRL_WORDS]>,
    hdrs: Vec<libc::mmsghdr>,
    msgs: Vec<Msg>,
    /// Cleared for good the first time the kernel refuses a GSO send.
    gso: bool,
}

// SAFETY: the raw pointers inside are only set and used within `send`.
unsafe impl Send for SendBatch {}

impl SendBatch {
    pub fn new() -> SendBatch {
        SendBatch {
            iovs: (0..SEND_BATCH)
                .map(|_| libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                })
                .collect(),
            // SAFETY: all-zero bytes are a valid sockaddr_storage and mmsghdr.
            names: vec![unsafe { zeroed::<libc::sockaddr_storage>() }; SEND_BATCH],
            ctrl: vec![[0; CTRL_WORDS]; SEND_BATCH],
            // SAFETY: as above.
            hdrs: (0..SEND_BATCH)
                .map(|_| unsafe { zeroed::<libc::mmsghdr>() })
                .collect(),
            msgs: Vec::with_capacity(SEND_BATCH),
            gso: true,
        }
    }

    /// Sends `packets` (at most [`SEND_BATCH`]) out of `sock`, each to its own
    /// destination. Returns (packets sent, bytes sent, packets that failed).
    pub fn send(&mut self, sock: &UdpSocket, packets: &[Packet]) -> (u64, u64, u64) {
        let packets = &packets[..packets.len().min(SEND_BATCH)];
        let (mut sent, mut bytes, mut failed, mut pos) = (0u64, 0u64, 0u64, 0usize);
        while pos < packets.len() {
            self.build(&packets[pos..], pos);
            // SAFETY: the first msgs.len() headers point at iovecs over the live
            // `packets` buffers (borrowed for this whole function), at initialised
            // addresses and control messages of the stated lengths, all owned by `self`.
            let r = unsafe {
                libc::sendmmsg(
                    sock.as_raw_fd(),
                    self.hdrs.as_mut_ptr(),
                    self.msgs.len() as libc::c_uint,
                    0,
                )
            };
            if r > 0 {
                for m in &self.msgs[..r as usize] {
                    let run = &packets[m.first..m.first + m.count];
                    sent += run.len() as u64;
                    bytes += run.iter().map(|p| p.data.len() as u64).sum::<u64>();
                    pos = m.first + m.count;
                }
                continue;
            }
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            let m = self.msgs[0];
            if m.count > 1
                && matches!(
                    e.raw_os_error(),
                    Some(libc::EIO | libc::EINVAL | libc::EOPNOTSUPP)
                )
            {
                // This path cannot take GSO (e.g. a segment above its MTU): send
                // datagrams one by one from now on.
                tracing::debug!("WAN emulator: GSO send refused ({e}), sending datagrams singly");
                self.gso = false;
                continue;
            }
            // The first remaining message failed (e.g. ECONNREFUSED from an earlier
            // ICMP error, or a send timeout): skip it and go on with the rest.
            tracing::debug!(
                "WAN emulator: send to {} failed: {e}",
                packets[m.first].out.dest
            );
            failed += m.count as u64;
            pos = m.first + m.count;
        }
        for iov in &mut self.iovs {
            iov.iov_base = std::ptr::null_mut();
        }
        (sent, bytes, failed)
    }

    /// Fills the headers for `packets` (which start at index `offset` of the caller's
    /// slice), grouping GSO runs.
    fn build(&mut self, packets: &[Packet], offset: usize) {
        self.msgs.clear();
        let mut i = 0;
        while i < packets.len() {
            let size = packets[i].data.len();
            let dest = packets[i].out.dest;
            let mut count = 1;
            let mut total = size;
            if self.gso && size > 0 {
                // A run: same destination, same size, except that a shorter last
                // datagram may end it (how GSO cuts a buffer into segments).
                while let Some(p) = packets.get(i + count) {
                    let len = p.data.len();
                    if count == MAX_SEGMENTS
                        || p.out.dest != dest
                        || len == 0
                        || len > size
                        || total + len > MAX_GSO_BYTES
                    {
                        break;
                    }
                    count += 1;
                    total += len;
                    if len < size {
                        break;
                    }
                }
            }
            let m = self.msgs.len();
            for (k, p) in packets[i..i + count].iter().enumerate() {
                self.iovs[i + k] = libc::iovec {
                    // sendmmsg only reads through this pointer.
                    iov_base: p.data.as_ptr() as *mut libc::c_void,
                    iov_len: p.data.len(),
                };
            }
            let namelen = to_sockaddr(&dest, &mut self.names[m]);
            let h = &mut self.hdrs[m].msg_hdr;
            h.msg_name = (&mut self.names[m] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = namelen;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = count;
            h.msg_flags = 0;
            if count > 1 {
                let ctrl = &mut self.ctrl[m];
                h.msg_control = ctrl.as_mut_ptr().cast();
                // SAFETY: CMSG_SPACE only computes a size.
                h.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
                // SAFETY: the control buffer is aligned for cmsghdr and larger than
                // CMSG_SPACE(2), so the header and its u16 payload fit.
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(h);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = libc::UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
                    // size <= MAX_GSO_BYTES < 65536.
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), size as u16);
                }
            } else {
                h.msg_control = std::ptr::null_mut();
                h.msg_controllen = 0;
            }
            self.msgs.push(Msg {
                first: offset + i,
                count,
            });
            i += count;
        }
    }
}

/// Writes `addr` as a C socket address into `out`; returns its length.
fn to_sockaddr(addr: &SocketAddr, out: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is larger than and aligned for every socket
            // address type, sockaddr_in included.
            let sin =
                unsafe { &mut *(out as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            };
            sin.sin_zero = [0; 8];
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 =
                unsafe { &mut *(out as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            sin6.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// Reads a C socket address written by the kernel; `None` for other families.
fn from_sockaddr(s: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match s.ss_family as libc::c_int {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family and length say the kernel wrote a sockaddr_in, and
            // sockaddr_storage is aligned for it.
            let sin = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddrV4::new(ip, u16::from_be(sin.sin_port)).into())
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 =
                unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(
                SocketAddrV6::new(
                    ip,
                    u16::from_be(sin6.sin6_port),
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )
                .into(),
            )
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses_round_trip() {
        for a in [
            "127.0.0.1:4433",
            "10.1.2.3:1",
            "[::1]:9",
            "[fe80::1%3]:65535",
        ] {
            let a: SocketAddr = a.parse().unwrap();
            // SAFETY: all-zero bytes are a valid sockaddr_storage.
            let mut s = unsafe { zeroed::<libc::sockaddr_storage>() };
            let len = to_sockaddr(&a, &mut s);
            assert_eq!(from_sockaddr(&s, len), Some(a));
            assert_eq!(from_sockaddr(&s, 2), None);
        }
    }
}
