//! [`DriverTurn`]: a source task that writes in a loop gives the connection's driver its
//! turns. The push ([`super::push`]) and the replication sender ([`super::replication`])
//! both write batch after batch; whenever their writes find room in the send buffer they
//! would otherwise keep the driver waiting.

use std::time::{Duration, Instant};

/// Hands the worker thread to the connection's driver now and then while a task writes.
///
/// Writing to a stream wakes the task that drives the connection (encrypts and sends), and
/// tokio puts a task woken from a worker into that worker's LIFO slot, which the other
/// workers do not steal: it runs only once the push yields. A push whose writes do not block
/// (room in the send buffer) encodes batch after batch meanwhile, up to tokio's cooperative
/// budget, and the link idles through it whenever the window is full of unacknowledged
/// data. Measured over the RAM of a real guest, `all`, 1 Gbit/s × 20 ms (2 cores shared with
/// the destination and the emulator): 1.93–1.95 s without yielding, 1.62–1.66 s yielding
/// after every batch (1.01–1.03 × the wire bytes' ideal); docs/encoding.md. Yielding after
/// every batch costs a raw push on loopback ~5% (a batch there takes microseconds to
/// build), so the push yields once [`DriverTurn::EVERY`] passed since it last did.
pub(super) struct DriverTurn {
    last: Instant,
}

impl DriverTurn {
    /// At most this long between turns: a fifth of a millisecond is 25 KB at 1 Gbit/s,
    /// against a window of megabytes.
    pub(super) const EVERY: Duration = Duration::from_micros(200);

    pub(super) fn new() -> DriverTurn {
        DriverTurn {
            last: Instant::now(),
        }
    }

    /// Yields if the driver has waited [`Self::EVERY`].
    pub(super) async fn give(&mut self) {
        if self.last.elapsed() >= Self::EVERY {
            tokio::task::yield_now().await;
            self.last = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::DriverTurn;

    /// Busy for `d` without yielding, as encoding a batch is.
    fn spin(d: Duration) {
        let t = Instant::now();
        while t.elapsed() < d {
            std::hint::spin_loop();
        }
    }

    /// A task that counts how often it ran, yielding after each run.
    fn counting_task() -> (Arc<AtomicU32>, tokio::task::JoinHandle<()>) {
        let runs = Arc::new(AtomicU32::new(0));
        let task = tokio::spawn({
            let runs = runs.clone();
            async move {
                loop {
                    runs.fetch_add(1, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
            }
        });
        (runs, task)
    }

    /// On one thread, a task woken while the push works runs at its next turn, not only
    /// once the push blocks.
    #[tokio::test(flavor = "current_thread")]
    async fn a_woken_task_runs_between_batches() {
        let (runs, other) = counting_task();
        let mut turn = DriverTurn::new();
        for _ in 0..20 {
            spin(DriverTurn::EVERY / 2);
            turn.give().await;
        }
        let seen = runs.load(Ordering::Relaxed);
        other.abort();
        // 20 batches of half a turn each: about ten turns.
        assert!((5..=20).contains(&seen), "the other task ran {seen} times");
    }

    /// Batches shorter than a turn do not yield after each one.
    #[tokio::test(flavor = "current_thread")]
    async fn short_batches_share_a_turn() {
        let mut turn = DriverTurn::new();
        let (runs, other) = counting_task();
        for _ in 0..100 {
            turn.give().await;
        }
        let seen = runs.load(Ordering::Relaxed);
        other.abort();
        assert!(
            seen < 10,
            "the other task ran {seen} times in 100 short batches"
        );
    }
}
