//! How much of a connection's UDP output was the streams' data: what an orchestrator
//! needs to tell how far a push got, since quinn counts the bytes it sent but not the
//! stream bytes among them, and the push writes up to a stream window (several round
//! trips) ahead of what has left.

use quinn::ConnectionStats;

/// UDP bytes per packet that are not stream data, once lost packets are taken out: QUIC's
/// short header (flags, an 8-byte connection id, a packet number), the 16-byte AEAD tag,
/// the STREAM frame's header, and, spread over the packets, the acknowledgements the
/// source sends. The stream data counts the `Pages` frames' own headers: what a push's
/// pages cost is counted in frame bytes ([`crate::proto::Pushed::pages_sent`]).
///
/// Measured (`vm source --replicate --stale-pct 20 --encoding off` through `wan-emu --rtt
/// 20ms --rate 100M`, MTU 1450): 40.2–41.2 bytes a packet over three runs, with and
/// without 0.5% loss, against the encoding's wire bytes, which leave the frames' headers
/// out: 15 bytes a one-page frame of 4,112, 5.2 of a packet's 1,409 stream bytes. Against
/// frame bytes that is 35.0–36.0 (a push counted with 41 ended 0.37% of its pages short,
/// the 5.2 bytes' share); docs/fleet.md.
pub const PACKET_OVERHEAD: u64 = 36;

/// An estimate of the stream bytes a connection has sent once each: its UDP bytes without
/// those of lost packets (their data went again in later ones) and [`PACKET_OVERHEAD`]
/// for every packet that arrived.
///
/// Within about 0.1% of the push's frame bytes over a whole push; the error is a byte
/// or two a packet, not a share of the bytes left, so it stays small at a push's end,
/// where it matters.
pub fn stream_bytes_sent(stats: &ConnectionStats) -> u64 {
    let delivered_packets = stats
        .path
        .sent_packets
        .saturating_sub(stats.path.lost_packets);
    stats
        .udp_tx
        .bytes
        .saturating_sub(stats.path.lost_bytes)
        .saturating_sub(delivered_packets.saturating_mul(PACKET_OVERHEAD))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(bytes: u64, packets: u64, lost_packets: u64, lost_bytes: u64) -> ConnectionStats {
        let mut s = ConnectionStats::default();
        s.udp_tx.bytes = bytes;
        s.path.sent_packets = packets;
        s.path.lost_packets = lost_packets;
        s.path.lost_bytes = lost_bytes;
        s
    }

    #[test]
    fn lost_packets_and_headers_are_not_stream_bytes() {
        // 1,000 full packets of 1,450 bytes, 10 of them lost.
        let s = stats(1_450_000, 1_000, 10, 14_500);
        assert_eq!(
            stream_bytes_sent(&s),
            1_450_000 - 14_500 - 990 * PACKET_OVERHEAD
        );
    }

    #[test]
    fn a_connection_that_sent_nothing_sent_no_stream_bytes() {
        assert_eq!(stream_bytes_sent(&ConnectionStats::default()), 0);
        // Counters that disagree (taken between two updates) do not wrap around.
        assert_eq!(stream_bytes_sent(&stats(100, 10, 0, 0)), 0);
        assert_eq!(stream_bytes_sent(&stats(100, 1, 2, 500)), 0);
    }
}
