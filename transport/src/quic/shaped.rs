//! [`Shaped`]: a congestion controller that wraps another and bends its window by a
//! [`Shape`] ([`super::StatedStart`]'s floor and ceiling, [`super::RateLimited`]'s rate).
//! The wrapped controller sees every event as if it ran alone; the shape only sees the
//! events it needs and decides what the window is.

use std::any::Any;
use std::time::Instant;

use quinn::congestion::{Controller, ControllerMetrics};
use quinn_proto::RttEstimator;

/// How a [`Shaped`] controller's window differs from the wrapped one's.
pub trait Shape: Clone + Send + Sync + 'static {
    /// The window, given the wrapped controller's.
    fn window(&self, inner: u64) -> u64;
    /// The window to start with, given the wrapped controller's.
    fn initial_window(&self, inner: u64) -> u64 {
        self.window(inner)
    }
    /// `bytes` were acknowledged at `now`; `rtt` is the connection's estimate after it.
    fn on_ack(&mut self, _now: Instant, _bytes: u64, _rtt: &RttEstimator) {}
    /// `lost_bytes` were declared lost at `now` (`persistent`: RFC 9002's persistent
    /// congestion, nothing acknowledged for several probe timeouts).
    fn on_congestion_event(&mut self, _now: Instant, _persistent: bool, _lost_bytes: u64) {}
    /// The path's datagram size changed.
    fn on_mtu_update(&mut self, _mtu: u16) {}
}

/// A controller whose window is `inner`'s bent by `shape`.
pub struct Shaped<S> {
    pub(super) inner: Box<dyn Controller>,
    pub(super) shape: S,
}

impl<S: Shape> Shaped<S> {
    /// Wraps `inner`.
    pub fn wrap(inner: Box<dyn Controller>, shape: S) -> Shaped<S> {
        Shaped { inner, shape }
    }
}

impl<S: Shape> Controller for Shaped<S> {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.shape.on_ack(now, bytes, rtt);
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.inner
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.shape
            .on_congestion_event(now, is_persistent_congestion, lost_bytes);
        self.inner
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.shape.on_mtu_update(new_mtu);
        self.inner.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.shape.window(self.inner.window())
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = self.inner.metrics();
        m.congestion_window = self.window();
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(Shaped {
            inner: self.inner.clone_box(),
            shape: self.shape.clone(),
        })
    }

    fn initial_window(&self) -> u64 {
        self.shape.initial_window(self.inner.initial_window())
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// A controller with a window the test sets, for the shapes' unit tests.
#[cfg(test)]
pub(super) mod fixed {
    use std::any::Any;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    use quinn::congestion::Controller;

    #[derive(Clone)]
    pub struct Fixed(pub Arc<AtomicU64>);

    impl Fixed {
        /// A controller of window `w`, and the handle that changes it.
        pub fn boxed(w: u64) -> (Box<dyn Controller>, Arc<AtomicU64>) {
            let h = Arc::new(AtomicU64::new(w));
            (Box::new(Fixed(h.clone())), h)
        }
    }

    impl Controller for Fixed {
        fn on_congestion_event(&mut self, _: Instant, _: Instant, _: bool, _: u64) {}
        fn on_mtu_update(&mut self, _: u16) {}
        fn window(&self) -> u64 {
            self.0.load(Ordering::Relaxed)
        }
        fn clone_box(&self) -> Box<dyn Controller> {
            Box::new(self.clone())
        }
        fn initial_window(&self) -> u64 {
            14_720
        }
        fn into_any(self: Box<Self>) -> Box<dyn Any> {
            self
        }
    }
}
