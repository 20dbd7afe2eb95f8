//! Mutual TLS with pinned peer certificates.
//!
//! Migration peers are configured in pairs, so instead of a CA each side is given the exact
//! certificate of the other and accepts nothing else. The handshake signatures are still
//! verified, so holding a copy of the pinned certificate without its key is not enough.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
pub use rustls::pki_types::CertificateDer;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use thiserror::Error;

/// ALPN id of this protocol; bumped together with [`crate::PROTOCOL_VERSION`] when the
/// framing changes incompatibly.
pub const ALPN: &[u8] = b"faultline/1";

/// ALPN id of the fleet control protocol (`faultline evacuate` ↔ a source's `--control`
/// endpoint): a client of one protocol that reaches an endpoint of the other is refused in
/// the TLS handshake (`no_application_protocol`), before any of its bytes is read.
pub const CONTROL_ALPN: &[u8] = b"faultline-control/1";

/// Why an identity or a TLS configuration could not be set up.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A certificate or key file could not be read. (The system's error is the source, so
    /// an error chain prints it once, after this.)
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// The system's error.
        source: std::io::Error,
    },
    /// A certificate or key file could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: String,
        /// The system's error.
        source: std::io::Error,
    },
    /// A file holds no PEM item of the kind needed, or a malformed one.
    #[error("{path} holds no PEM {what}")]
    Pem {
        /// The file.
        path: String,
        /// What was looked for: "certificate" or "private key".
        what: &'static str,
    },
    /// Generating a self-signed identity failed.
    #[error("certificate generation failed")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration, e.g. a key that does not match the certificate or
    /// a key type it does not support.
    #[error("TLS configuration rejected")]
    Rustls(#[from] rustls::Error),
    /// quinn refused the rustls configuration; the value is its reason.
    #[error("QUIC refused the TLS configuration: {0}")]
    Quic(String),
}

/// A certificate and its private key: what this side presents.
#[derive(Debug)]
pub struct Identity {
    /// The certificate this side presents; the peer pins exactly this one.
    pub cert: CertificateDer<'static>,
    /// Its private key. It also seeds the endpoint's stateless-reset and connection-id keys,
    /// so a daemon restarted with the same identity can reset its old connections.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            cert: self.cert.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// A fresh self-signed identity, for tests, the demo, and first-time set-up.
    pub fn generate(name: &str) -> Result<Identity, TlsError> {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_string()])?;
        Ok(Identity {
            cert: ck.cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der()).into(),
        })
    }

    /// Loads a PEM certificate (the first in the file) and a PEM private key.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Identity, TlsError> {
        Ok(Identity {
            cert: load_cert(cert_path)?,
            key: PrivateKeyDer::from_pem_file(key_path)
                .map_err(|e| pem_error(key_path, e, "private key"))?,
        })
    }

    /// Writes the certificate and key as PEM files (the key readable by the owner only).
    pub fn save(&self, cert_path: &Path, key_path: &Path) -> Result<(), TlsError> {
        write_file(cert_path, &to_pem("CERTIFICATE", &self.cert), 0o644)?;
        write_file(
            key_path,
            &to_pem("PRIVATE KEY", self.key.secret_der()),
            0o600,
        )
    }
}

/// Loads the first certificate of a PEM file: the peer certificate to pin.
pub fn load_cert(path: &Path) -> Result<CertificateDer<'static>, TlsError> {
    CertificateDer::from_pem_file(path).map_err(|e| pem_error(path, e, "certificate"))
}

/// Writes a certificate as PEM: what the other side pins.
pub fn save_cert(cert: &CertificateDer<'_>, path: &Path) -> Result<(), TlsError> {
    write_file(path, &to_pem("CERTIFICATE", cert), 0o644)
}

fn pem_error(path: &Path, e: rustls::pki_types::pem::Error, what: &'static str) -> TlsError {
    match e {
        rustls::pki_types::pem::Error::Io(source) => TlsError::Read {
            path: path.display().to_string(),
            source,
        },
        _ => TlsError::Pem {
            path: path.display().to_string(),
            what,
        },
    }
}

fn write_file(path: &Path, data: &str, mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| TlsError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(data.as_bytes()).map_err(err)
}

fn to_pem(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der.to_vec()))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts exactly one certificate, and checks the handshake signature against it.
#[derive(Debug)]
struct PinnedCert {
    pinned: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl PinnedCert {
    fn check(&self, presented: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        if presented.as_ref() == self.pinned.as_ref() {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for PinnedCert {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

/// rustls configuration for the side that accepts connections: presents `me`, requires the
/// client to present exactly `peer`.
pub fn server_tls(
    me: &Identity,
    peer: CertificateDer<'static>,
) -> Result<rustls::ServerConfig, TlsError> {
    server_tls_for(me, peer, ALPN)
}

/// [`server_tls`] for the protocol named `alpn` ([`ALPN`] or [`CONTROL_ALPN`]).
pub fn server_tls_for(
    me: &Identity,
    peer: CertificateDer<'static>,
    alpn: &[u8],
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(PinnedCert {
        pinned: peer,
        provider: provider.clone(),
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![me.cert.clone()], me.key.clone_key())?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

/// rustls configuration for the side that connects: presents `me`, accepts only `peer`.
pub fn client_tls(
    me: &Identity,
    peer: CertificateDer<'static>,
) -> Result<rustls::ClientConfig, TlsError> {
    client_tls_for(me, peer, ALPN)
}

/// [`client_tls`] for the protocol named `alpn` ([`ALPN`] or [`CONTROL_ALPN`]).
pub fn client_tls_for(
    me: &Identity,
    peer: CertificateDer<'static>,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(PinnedCert {
        pinned: peer,
        provider: provider.clone(),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![me.cert.clone()], me.key.clone_key())?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_roundtrip_through_files() {
        let dir = std::env::temp_dir().join(format!("faultline-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let id = Identity::generate("test").unwrap();
        let (c, k) = (dir.join("c.pem"), dir.join("k.pem"));
        id.save(&c, &k).unwrap();
        let back = Identity::load(&c, &k).unwrap();
        assert_eq!(back.cert, id.cert);
        assert_eq!(back.key.secret_der(), id.key.secret_der());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_and_bad_files_give_clear_errors() {
        let e = load_cert(Path::new("/nonexistent/peer.pem")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/peer.pem"), "{e}");
        let f = std::env::temp_dir().join(format!("faultline-bad-{}.pem", std::process::id()));
        std::fs::write(&f, "not pem").unwrap();
        let e = load_cert(&f).unwrap_err();
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
        std::fs::remove_file(&f).unwrap();
    }

    #[test]
    fn pinning_accepts_only_the_pinned_certificate() {
        let a = Identity::generate("a").unwrap();
        let b = Identity::generate("b").unwrap();
        let pin = PinnedCert {
            pinned: a.cert.clone(),
            provider: provider(),
        };
        assert!(pin.check(&a.cert).is_ok());
        assert!(pin.check(&b.cert).is_err());
    }
}
