//! Throw-away TLS identities for two bench processes.
//!
//! faultline pins the peer's exact certificate (no CA), so both processes need both
//! certificates. [`CertDir::generate`] writes a fresh server and client identity as PEM into a
//! temporary directory that is deleted when the `CertDir` is dropped; a child process is given
//! the directory path and loads its side with [`load_server`] or [`load_client`].

use std::path::{Path, PathBuf};

use anyhow::Context;
use quinn::rustls::pki_types::CertificateDer;
use transport::tls::{load_cert, Identity};

const SERVER_CERT: &str = "server.crt";
const SERVER_KEY: &str = "server.key";
const CLIENT_CERT: &str = "client.crt";
const CLIENT_KEY: &str = "client.key";

/// A temporary directory holding `server.crt`, `server.key`, `client.crt`, `client.key`
/// (removed on drop), plus the identities in memory for the process that made it.
#[derive(Debug)]
pub struct CertDir {
    dir: tempfile::TempDir,
    /// The identity of the listening side.
    pub server: Identity,
    /// The identity of the connecting side.
    pub client: Identity,
}

impl CertDir {
    /// Generates two self-signed identities and saves them as PEM in a new temporary directory.
    pub fn generate() -> anyhow::Result<CertDir> {
        let dir = tempfile::Builder::new()
            .prefix("faultline-bench-certs-")
            .tempdir()
            .context("creating the certificate directory")?;
        let server = Identity::generate("faultline-bench-server")?;
        let client = Identity::generate("faultline-bench-client")?;
        server.save(&dir.path().join(SERVER_CERT), &dir.path().join(SERVER_KEY))?;
        client.save(&dir.path().join(CLIENT_CERT), &dir.path().join(CLIENT_KEY))?;
        Ok(CertDir {
            dir,
            server,
            client,
        })
    }

    /// The directory to hand to a child process.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The directory as a string argument for [`crate::child::spawn_child`].
    pub fn arg(&self) -> String {
        self.dir.path().display().to_string()
    }

    /// Path of the server certificate PEM (what the client pins).
    pub fn server_cert_path(&self) -> PathBuf {
        self.dir.path().join(SERVER_CERT)
    }

    /// Path of the server private key PEM.
    pub fn server_key_path(&self) -> PathBuf {
        self.dir.path().join(SERVER_KEY)
    }

    /// Path of the client certificate PEM (what the server pins).
    pub fn client_cert_path(&self) -> PathBuf {
        self.dir.path().join(CLIENT_CERT)
    }

    /// Path of the client private key PEM.
    pub fn client_key_path(&self) -> PathBuf {
        self.dir.path().join(CLIENT_KEY)
    }
}

/// Loads the listening side from a [`CertDir`] directory: its own identity and the client
/// certificate to pin.
pub fn load_server(dir: &Path) -> anyhow::Result<(Identity, CertificateDer<'static>)> {
    let me = Identity::load(&dir.join(SERVER_CERT), &dir.join(SERVER_KEY))?;
    Ok((me, load_cert(&dir.join(CLIENT_CERT))?))
}

/// Loads the connecting side from a [`CertDir`] directory: its own identity and the server
/// certificate to pin.
pub fn load_client(dir: &Path) -> anyhow::Result<(Identity, CertificateDer<'static>)> {
    let me = Identity::load(&dir.join(CLIENT_CERT), &dir.join(CLIENT_KEY))?;
    Ok((me, load_cert(&dir.join(SERVER_CERT))?))
}
