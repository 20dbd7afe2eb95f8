//! Whether the path loses packets now, from the connection's own counts: the source's
//! echo policy ([`crate::proto::SourceSession::set_echo_all`]) follows it.

/// Packets sent per verdict: enough for a loss rate of a tenth of a percent to show (two
/// losses expected), few enough (about 3 MB at Ethernet size) to follow a path that starts
/// losing mid-run.
const WINDOW_PACKETS: u64 = 2000;

/// From this share of packets lost on (one in a window), replies go out twice. At 1% loss
/// a 4 KiB reply (three or four datagrams) and its request lose one about 4% of the time,
/// beyond a p99; at 0.1% about 0.4%, which with the ~300 faults of a 1 GiB evacuation is
/// the p99 in about one run in seven (measured: 2.5 RTT once in seven runs at 1 Gbit/s ×
/// 20 ms, docs/wan.md). The copies cost 4 KiB a fault, a few hundredths of a percent of a
/// pushing link, so any loss at all counts; a clean path (MTU probes are not counted)
/// never pays them.
const LOSSY_SHARE: f64 = 0.0005;

/// The loss rate of the packets sent, judged one window at a time.
#[derive(Debug, Default)]
pub(crate) struct LossGauge {
    /// The counts at the start of the current window.
    sent: u64,
    lost: u64,
    lossy: bool,
}

impl LossGauge {
    /// Takes the connection's running totals (quinn's `PathStats::sent_packets` and
    /// `lost_packets`, MTU probes not counted as lost); returns whether the path counts as
    /// lossy: the verdict of the last full window (not lossy before the first).
    pub(crate) fn observe(&mut self, sent: u64, lost: u64) -> bool {
        let (ds, dl) = (
            sent.saturating_sub(self.sent),
            lost.saturating_sub(self.lost),
        );
        if ds >= WINDOW_PACKETS {
            self.lossy = dl as f64 >= LOSSY_SHARE * ds as f64;
            self.sent = sent;
            self.lost = lost;
        }
        self.lossy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judges_each_window_of_sent_packets() {
        let mut g = LossGauge::default();
        // Too few packets for a verdict: not lossy, however many were lost.
        assert!(!g.observe(500, 100));
        // 1% of the first 2000.
        assert!(g.observe(2000, 20));
        // The verdict holds until the next window is full.
        assert!(g.observe(3000, 20));
        // Nothing lost in the next 2000: clean again.
        assert!(!g.observe(4000, 20));
        // One loss in 2000 (0.05%) counts as lossy.
        assert!(g.observe(6000, 21));
    }

    #[test]
    fn counts_that_go_backwards_are_no_loss() {
        // A new connection's stats start at zero again.
        let mut g = LossGauge::default();
        assert!(g.observe(5000, 50));
        assert!(g.observe(10, 0));
        assert!(!g.observe(7000, 50));
    }
}
