//! [`GsoBounded`]: the endpoints' UDP socket, never handing the kernel more than one UDP
//! datagram's worth of bytes in one segmentation-offload send.
//!
//! quinn batches up to ten datagrams of the path MTU into one GSO `sendmsg`, and bounds the
//! batch by its segment count only. Where MTU discovery reached loopback's 64 KiB, a batch
//! of two or more is larger than the 65,507 bytes one `sendmsg` may carry: the kernel
//! answers `EMSGSIZE`, which quinn-udp takes for a failed MTU probe and drops without a
//! word. Every datagram of the batch is then lost, and so is every retransmission batched
//! the same way: a connection whose sender fell behind (a busy machine) stalls for good
//! while its loss probes (single, small datagrams) keep it looking alive. Splitting each
//! oversized batch into batches of whole segments that fit keeps every datagram.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// Most payload bytes one `sendmsg` may carry: a datagram's IPv4 length field (65,535)
/// less the IPv4 and UDP headers. A GSO batch is one datagram until the kernel splits it.
pub(crate) const MAX_GSO_BYTES: usize = 65_535 - 20 - 8;

/// A socket that passes every call to `inner` and splits GSO batches larger than
/// [`MAX_GSO_BYTES`] into several sends of whole segments.
pub(crate) struct GsoBounded {
    inner: Arc<dyn AsyncUdpSocket>,
}

impl GsoBounded {
    pub(crate) fn new(inner: Arc<dyn AsyncUdpSocket>) -> GsoBounded {
        GsoBounded { inner }
    }
}

impl fmt::Debug for GsoBounded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("GsoBounded").field(&self.inner).finish()
    }
}

/// The sends `t` becomes: itself when it fits, else runs of whole segments of at most
/// [`MAX_GSO_BYTES`] (a run of one segment is sent without GSO).
fn split<'a>(t: &Transmit<'a>) -> impl Iterator<Item = Transmit<'a>> + 'a {
    let segment = t
        .segment_size
        .filter(|&s| s > 0 && t.contents.len() > MAX_GSO_BYTES);
    let run = segment.map_or(usize::MAX, |s| (MAX_GSO_BYTES / s).max(1) * s);
    let (destination, ecn, src_ip, asked) = (t.destination, t.ecn, t.src_ip, t.segment_size);
    t.contents.chunks(run).map(move |contents| Transmit {
        destination,
        ecn,
        contents,
        segment_size: match segment {
            None => asked,
            Some(s) => (contents.len() > s).then_some(s),
        },
        src_ip,
    })
}

impl AsyncUdpSocket for GsoBounded {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    /// A send that would block part-way through a split batch reports `WouldBlock`, and
    /// quinn offers the whole batch again: the runs sent already go out twice, which the
    /// peer discards as duplicate packets. A lost run would cost a loss-detection delay.
    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        for t in split(transmit) {
            self.inner.try_send(&t)?;
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transmit(contents: &[u8], segment_size: Option<usize>) -> Transmit<'_> {
        Transmit {
            destination: "127.0.0.1:9".parse().unwrap(),
            ecn: None,
            contents,
            segment_size,
            src_ip: None,
        }
    }

    /// (bytes, segment size) of each send.
    fn sends(t: &Transmit) -> Vec<(usize, Option<usize>)> {
        split(t)
            .map(|s| (s.contents.len(), s.segment_size))
            .collect()
    }

    #[test]
    fn a_batch_that_fits_goes_out_as_it_is() {
        let buf = vec![0u8; 45 * 1452];
        assert_eq!(
            sends(&transmit(&buf, Some(1452))),
            [(45 * 1452, Some(1452))]
        );
        let one = vec![0u8; 65_495];
        assert_eq!(sends(&transmit(&one, None)), [(65_495, None)]);
        assert_eq!(
            sends(&transmit(&one, Some(65_495))),
            [(65_495, Some(65_495))]
        );
    }

    #[test]
    fn loopback_sized_segments_go_out_one_per_send() {
        // Ten segments of loopback's MTU, the last one short: what quinn built and the
        // kernel refused whole.
        let buf = vec![0u8; 9 * 65_495 + 100];
        let s = sends(&transmit(&buf, Some(65_495)));
        assert_eq!(s.len(), 10);
        assert!(s[..9].iter().all(|&x| x == (65_495, None)));
        assert_eq!(s[9], (100, None));
    }

    #[test]
    fn mid_sized_segments_go_out_in_runs_of_whole_segments_that_fit() {
        let seg = 9_000;
        let buf: Vec<u8> = (0..10 * seg + 1_000).map(|i| i as u8).collect();
        let t = transmit(&buf, Some(seg));
        let s = sends(&t);
        // Seven 9,000-byte segments fit in 65,507 bytes.
        assert_eq!(s, [(63_000, Some(seg)), (27_000 + 1_000, Some(seg))]);
        // In order, nothing lost or repeated.
        let joined: Vec<u8> = split(&t).flat_map(|x| x.contents.to_vec()).collect();
        assert_eq!(joined, buf);
        // A run of one whole segment goes without GSO.
        let buf = vec![0u8; 2 * 40_000];
        assert_eq!(
            sends(&transmit(&buf, Some(40_000))),
            [(40_000, None), (40_000, None)]
        );
    }

    /// Sends `t` as quinn does: when the socket is writable.
    async fn send(socket: Arc<dyn AsyncUdpSocket>, t: &Transmit<'_>) {
        let mut writable = socket.clone().create_io_poller();
        loop {
            std::future::poll_fn(|cx| writable.as_mut().poll_writable(cx))
                .await
                .unwrap();
            match socket.try_send(t) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                sent => return sent.unwrap(),
            }
        }
    }

    /// Through the kernel: a batch of ten 60,000-byte datagrams, which one `sendmsg`
    /// refuses, arrives whole, datagram by datagram.
    #[tokio::test]
    async fn an_oversized_batch_arrives_as_every_one_of_its_datagrams() {
        use quinn::Runtime;
        let rx = super::super::bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let tx = super::super::bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        let inner = quinn::TokioRuntime.wrap_udp_socket(tx).unwrap();
        if inner.max_transmit_segments() < 2 {
            eprintln!("no UDP GSO here: nothing to split");
            return;
        }
        let seg = 60_000;
        let buf: Vec<u8> = (0..10 * seg).map(|i| (i / seg) as u8).collect();
        let mut t = transmit(&buf, Some(seg));
        t.destination = rx.local_addr().unwrap();
        // Unsplit, the kernel refuses it and quinn-udp reports success: nothing arrives.
        // (Should quinn-udp ever split such batches itself, this wrapper can go.)
        send(inner.clone(), &t).await;
        rx.set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        let mut got = vec![0u8; 65_536];
        assert!(rx.recv(&mut got).is_err(), "an unsplit batch arrived");
        rx.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        send(Arc::new(GsoBounded::new(inner)), &t).await;
        for i in 0..10u8 {
            let n = rx.recv(&mut got).unwrap();
            assert_eq!(n, seg);
            assert!(
                got[..n].iter().all(|&b| b == i),
                "datagram {i} out of order"
            );
        }
    }
}
