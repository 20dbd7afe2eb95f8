//! What a session's connections saw of their path, for the source's report: whether a
//! transfer lost packets and had its congestion window cut (the queue of a shared
//! bottleneck overflowing). The round trip and window are only those at the end, so a
//! transfer slowed for a while by its ends or by a path's delay does not show here.

use quinn::ConnectionStats;
use serde::{Deserialize, Serialize};

/// Packets, losses and the congestion controller's state over every connection of a
/// session (a session reconnects after an outage: the counts add up, the round trip and
/// the window are the last connection's at its end).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PathReport {
    /// Packets sent, retransmissions and probes included.
    pub sent_packets: u64,
    /// Packets declared lost (their data went again in later ones).
    pub lost_packets: u64,
    /// Their bytes.
    pub lost_bytes: u64,
    /// Times the congestion controller cut its window for a loss or an ECN mark.
    pub congestion_events: u64,
    /// The smoothed round trip when the last connection ended, milliseconds.
    pub rtt_ms: f64,
    /// The congestion window when the last connection ended, bytes.
    pub cwnd_bytes: u64,
}

impl PathReport {
    /// Adds one connection's counts; its round trip and window replace the last ones.
    pub fn add(&mut self, stats: &ConnectionStats) {
        let p = &stats.path;
        self.sent_packets += p.sent_packets;
        self.lost_packets += p.lost_packets;
        self.lost_bytes += p.lost_bytes;
        self.congestion_events += p.congestion_events;
        self.rtt_ms = p.rtt.as_secs_f64() * 1e3;
        self.cwnd_bytes = p.cwnd;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn stats(sent: u64, lost: u64, events: u64, rtt_ms: u64, cwnd: u64) -> ConnectionStats {
        let mut s = ConnectionStats::default();
        s.path.sent_packets = sent;
        s.path.lost_packets = lost;
        s.path.lost_bytes = lost * 1_400;
        s.path.congestion_events = events;
        s.path.rtt = Duration::from_millis(rtt_ms);
        s.path.cwnd = cwnd;
        s
    }

    #[test]
    fn connections_add_up_and_the_last_sets_the_state() {
        let mut r = PathReport::default();
        r.add(&stats(1_000, 10, 2, 50, 6_000_000));
        r.add(&stats(500, 5, 1, 20, 1_000_000));
        assert_eq!(r.sent_packets, 1_500);
        assert_eq!(r.lost_packets, 15);
        assert_eq!(r.lost_bytes, 21_000);
        assert_eq!(r.congestion_events, 3);
        assert_eq!(r.rtt_ms, 20.0);
        assert_eq!(r.cwnd_bytes, 1_000_000);
    }

    #[test]
    fn a_report_reads_back() {
        let mut r = PathReport::default();
        r.add(&stats(10, 1, 1, 50, 7_812_500));
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<PathReport>(&json).unwrap(), r);
    }
}
