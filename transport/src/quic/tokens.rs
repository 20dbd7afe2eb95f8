//! Address-validation tokens (RFC 9000 § 8.1.3): a listener gives each authenticated peer
//! tokens in NEW_TOKEN frames, and the peer's next connection presents one instead of
//! being sent a Retry, which saves a round trip of its handshake.
//!
//! That round trip is in every evacuation's setup: a source replicating to its standby
//! holds tokens from the replication connection when it connects to evacuate (1 Gbit/s ×
//! 50 ms fleets: the setup before the first byte is about five round trips). A listener
//! still sends a Retry to any peer without a valid token (see [`super::accept`]), so an
//! unauthenticated flood costs it no more than before: tokens are only issued on
//! connections whose handshake, mutual TLS included, completed.
//!
//! The client side keeps tokens per process and per pinned server certificate
//! ([`client_tokens`]): every client endpoint pins exactly one peer, so its tokens are
//! that peer's, whichever endpoint of the process received them. (Listeners that share one
//! certificate share the key; a token one of them issued is not readable at another and
//! counts as none there: a Retry, as without tokens.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use quinn::{TokenLog, TokenMemoryCache, TokenReuseError, TokenStore, ValidationTokenConfig};
use rustls::pki_types::CertificateDer;

/// Tokens a listener issues on each connection (one per later connection; a session's
/// reconnections after an outage use the rest).
pub const TOKENS_SENT: u32 = 2;

/// How long an issued token is accepted. A source keeps its replication connection for days
/// and evacuates on a warning, so its tokens must outlive that; reconnections bring fresh ones.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(14 * 24 * 3600);

/// Used tokens a listener remembers at most; past that, a token is refused (the peer gets
/// a Retry: a round trip, never a failure).
pub const MAX_REMEMBERED: usize = 4096;

/// The listener's side: the tokens it issues and the log that accepts each only once.
pub fn validation_config() -> ValidationTokenConfig {
    let mut c = ValidationTokenConfig::default();
    c.lifetime(TOKEN_LIFETIME)
        .log(Arc::new(UsedTokens::default()))
        .sent(TOKENS_SENT);
    c
}

/// The client side for endpoints that pin `peer`: one store for the whole process, so a
/// connection finds the tokens an earlier one (another endpoint: the replicator's)
/// received from the same peer.
pub fn client_tokens(peer: &CertificateDer<'_>) -> Arc<dyn TokenStore> {
    static STORE: OnceLock<Arc<TokenMemoryCache>> = OnceLock::new();
    let digest = ring::digest::digest(&ring::digest::SHA256, peer.as_ref());
    let peer = digest
        .as_ref()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect();
    Arc::new(PeerTokens {
        peer,
        shared: STORE.get_or_init(Arc::default).clone(),
    })
}

/// The process's tokens from one pinned peer: the shared store, under the peer's
/// certificate digest and the server name.
struct PeerTokens {
    peer: String,
    shared: Arc<TokenMemoryCache>,
}

impl PeerTokens {
    fn key(&self, server_name: &str) -> String {
        format!("{}/{server_name}", self.peer)
    }
}

impl TokenStore for PeerTokens {
    fn insert(&self, server_name: &str, token: Bytes) {
        self.shared.insert(&self.key(server_name), token);
    }

    fn take(&self, server_name: &str) -> Option<Bytes> {
        self.shared.take(&self.key(server_name))
    }
}

/// Accepts each token once (RFC 9000 § 8.1.4: a replayed token must not validate an
/// address), remembering the used ones until they expire, at most [`MAX_REMEMBERED`].
#[derive(Debug, Default)]
pub struct UsedTokens {
    /// A used token's nonce, and when the token expires.
    used: Mutex<HashMap<u128, SystemTime>>,
}

impl TokenLog for UsedTokens {
    fn check_and_insert(
        &self,
        nonce: u128,
        issued: SystemTime,
        lifetime: Duration,
    ) -> Result<(), TokenReuseError> {
        let now = SystemTime::now();
        let expires = issued + lifetime;
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        if used.len() >= MAX_REMEMBERED {
            used.retain(|_, &mut e| e > now);
        }
        if used.len() >= MAX_REMEMBERED || used.contains_key(&nonce) {
            return Err(TokenReuseError);
        }
        used.insert(nonce, expires);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_kept_per_pinned_peer() {
        let (a, b) = (
            CertificateDer::from(vec![1u8; 8]),
            CertificateDer::from(vec![2u8; 8]),
        );
        client_tokens(&a).insert("faultline", Bytes::from_static(b"from a"));
        assert_eq!(client_tokens(&b).take("faultline"), None);
        assert_eq!(
            client_tokens(&a).take("faultline").as_deref(),
            Some(&b"from a"[..]),
            "another endpoint pinning a finds it"
        );
        assert_eq!(client_tokens(&a).take("faultline"), None, "once");
    }

    #[test]
    fn a_token_is_accepted_once() {
        let log = UsedTokens::default();
        let now = SystemTime::now();
        assert!(log.check_and_insert(7, now, TOKEN_LIFETIME).is_ok());
        assert!(log.check_and_insert(7, now, TOKEN_LIFETIME).is_err());
        assert!(log.check_and_insert(8, now, TOKEN_LIFETIME).is_ok());
    }

    #[test]
    fn a_full_log_forgets_expired_tokens_and_refuses_rather_than_grows() {
        let log = UsedTokens::default();
        let long_ago = SystemTime::now() - 2 * TOKEN_LIFETIME;
        for n in 0..MAX_REMEMBERED as u128 - 1 {
            assert!(log.check_and_insert(n, long_ago, TOKEN_LIFETIME).is_ok());
        }
        let now = SystemTime::now();
        assert!(log.check_and_insert(u128::MAX, now, TOKEN_LIFETIME).is_ok());
        // Full: the expired ones go, the live one stays.
        assert!(log
            .check_and_insert(u128::MAX - 1, now, TOKEN_LIFETIME)
            .is_ok());
        assert!(log
            .check_and_insert(u128::MAX, now, TOKEN_LIFETIME)
            .is_err());
        assert_eq!(log.used.lock().unwrap().len(), 2);
        // Full of live tokens: refused, never more than the bound.
        for n in 0..MAX_REMEMBERED as u128 {
            let _ = log.check_and_insert(n, now, TOKEN_LIFETIME);
        }
        assert_eq!(log.used.lock().unwrap().len(), MAX_REMEMBERED);
        assert!(log.check_and_insert(1 << 100, now, TOKEN_LIFETIME).is_err());
    }
}
