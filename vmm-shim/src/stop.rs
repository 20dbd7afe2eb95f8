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
    /// The endpoints of the roles running now, by a number their [`Watch`] removes them by.
    endpoints: Vec<(u64, quic::Endpoint)>,
    next: u64,
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
        for (_, ep) in s.endpoints.drain(..) {
            close(&ep, &reason);
        }
    }

    /// Why it was stopped, if it was.
    pub fn reason(&self) -> Option<String> {
        self.lock().reason.clone()
    }

    /// Closes `ep` when this stops (at once if it already has), for as long as the returned
    /// watch lives: a stopper reused for many sessions holds only the running ones.
    pub(crate) fn watch(&self, ep: &quic::Endpoint) -> Watch {
        let mut s = self.lock();
        let id = s.next;
        s.next += 1;
        match &s.reason {
            Some(reason) => close(ep, reason),
            None => s.endpoints.push((id, ep.clone())),
        }
        Watch {
            stopper: self.clone(),
            id,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Plain data: consistent between statements even after a panic elsewhere.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Keeps an endpoint in its [`Stopper`] until dropped.
pub(crate) struct Watch {
    stopper: Stopper,
    id: u64,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stopper
            .lock()
            .endpoints
            .retain(|(id, _)| *id != self.id);
    }
}

fn close(ep: &quic::Endpoint, reason: &str) {
    let reason = &reason.as_bytes()[..reason.len().min(512)];
    ep.close((ErrorCode::Aborted as u32).into(), reason);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_watch_keeps_its_endpoint_only_while_it_lives_and_a_stop_is_final() {
        let id = transport::tls::Identity::generate("x").unwrap();
        let ep = || quic::client_endpoint("127.0.0.1:0".parse().unwrap(), &id, id.cert.clone());
        let stopper = Stopper::new();
        let (a, b) = (ep().unwrap(), ep().unwrap());
        let wa = stopper.watch(&a);
        drop(stopper.watch(&b));
        assert_eq!(
            stopper.lock().endpoints.len(),
            1,
            "a dropped watch is forgotten"
        );
        stopper.stop("stopped by a test");
        assert_eq!(stopper.reason().as_deref(), Some("stopped by a test"));
        assert!(stopper.lock().endpoints.is_empty());
        drop(wa);
        // Registered after the stop: closed at once, never held.
        let _late = stopper.watch(&ep().unwrap());
        assert!(stopper.lock().endpoints.is_empty());
        stopper.stop("a second reason is ignored");
        assert_eq!(stopper.reason().as_deref(), Some("stopped by a test"));
    }
}
