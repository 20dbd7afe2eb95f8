//! Ending a role's session from outside — a signal handler, a VMM shutting down — so that
//! the peer learns why at once instead of after QUIC's idle timeout.

use std::sync::{Arc, Mutex};

use transport::message::ErrorCode;
use transport::quic;

/// Stops the sessions of the roles it was handed to ([`crate::SourceOptions::stopper`],
/// [`crate::Listener::stop_on`]): their QUIC endpoints close with [`ErrorCode::Aborted`] and
/// the reason, which the peer reports as such; the role then returns an error. Clones share
/// one state; a stop is final (an endpoint registered afterwards closes at once).
#[derive(Clone, Default)]
pub struct Stopper(Arc<Mutex<State>>);

#[derive(Default)]
struct State {
    reason: Option<String>,
    endpoints: Vec<quic::Endpoint>,
}

impl Stopper {
    /// A stopper nothing has stopped yet.
    pub fn new() -> Stopper {
        Stopper::default()
    }

    /// Closes every registered endpoint, telling the peers `reason`. Later calls keep the
    /// first reason.
    pub fn stop(&self, reason: impl Into<String>) {
        let mut s = self.lock();
        let reason = s.reason.get_or_insert_with(|| reason.into()).clone();
        for ep in s.endpoints.drain(..) {
            close(&ep, &reason);
        }
    }

    /// Why it was stopped, if it was.
    pub fn reason(&self) -> Option<String> {
        self.lock().reason.clone()
    }

    /// Closes `ep` when this stops (at once if it already has).
    pub(crate) fn watch(&self, ep: &quic::Endpoint) {
        let mut s = self.lock();
        match &s.reason {
            Some(reason) => close(ep, reason),
            None => s.endpoints.push(ep.clone()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Plain data: consistent between statements even after a panic elsewhere.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn close(ep: &quic::Endpoint, reason: &str) {
    let reason = &reason.as_bytes()[..reason.len().min(512)];
    ep.close((ErrorCode::Aborted as u32).into(), reason);
}
