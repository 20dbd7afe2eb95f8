//! What `faultline evacuate` needs from the plan file beyond the fleet: the orchestrator's
//! identity, each VM's control address (resolved) and the certificate its source presents.
//! Relative paths are taken from the plan file's directory.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use anyhow::Context;
use fleet::file::PlanFile;
use fleet::{Entry, Problem};
use transport::tls::{load_cert, CertificateDer, Identity};

/// A VM's control endpoint, ready to connect to.
pub struct VmEndpoint {
    pub addr: SocketAddr,
    pub peer_cert: CertificateDer<'static>,
}

/// The orchestrator's identity and, per VM (`None`: skipped), where its source listens.
pub struct Setup {
    pub identity: Identity,
    pub vms: Vec<Option<VmEndpoint>>,
}

/// Checks and loads the control part of `pf` (read from `file`). A missing key names the
/// entry; a VM that is skipped needs none.
pub fn resolve(pf: &PlanFile, file: &Path) -> anyhow::Result<Setup> {
    let dir = file.parent().unwrap_or(Path::new("."));
    let at = |p: &str| -> PathBuf { dir.join(p) };
    let c = &pf.control;
    let need = |key: &'static str, v: &Option<String>| -> anyhow::Result<PathBuf> {
        let p = v.as_deref().ok_or_else(|| {
            Entry::Top.problem(Problem::Other(format!(
                "{key} is missing: faultline evacuate (and plan --live) needs the \
                 orchestrator's certificate and key (cert = \"orchestrator.crt.pem\", key = \
                 \"orchestrator.key.pem\")"
            )))
        })?;
        Ok(at(p))
    };
    let (cert, key) = (need("cert", &c.cert)?, need("key", &c.key)?);
    let identity =
        Identity::load(&cert, &key).context("loading the orchestrator's certificate and key")?;
    let mut vms = Vec::with_capacity(pf.fleet.vms.len());
    for (i, (vm, ctl)) in pf.fleet.vms.iter().zip(&c.vms).enumerate() {
        if pf.options.skip.contains(&i) {
            vms.push(None);
            continue;
        }
        let entry = Entry::Vm(vm.name.clone());
        let ctl = ctl.as_ref().ok_or_else(|| {
            entry.clone().problem(Problem::Other(
                "control is missing: where its source (faultline replicate --control) \
                 listens, e.g. control = \"10.0.0.5:7100\""
                    .into(),
            ))
        })?;
        let pin = ctl
            .peer_cert
            .as_ref()
            .or(c.peer_cert.as_ref())
            .ok_or_else(|| {
                entry.clone().problem(Problem::Other(
                    "peer_cert is missing: the certificate its source presents (per VM, or \
                 peer_cert at the top for all)"
                        .into(),
                ))
            })?;
        let peer_cert = load_cert(&at(pin))
            .with_context(|| format!("vm {:?}: loading its source's certificate", vm.name))?;
        let addr = (ctl.addr.host.as_str(), ctl.addr.port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| {
                entry.clone().problem(Problem::Other(format!(
                    "control = \"{}\": the host does not resolve",
                    ctl.addr
                )))
            })?;
        vms.push(Some(VmEndpoint { addr, peer_cert }));
    }
    Ok(Setup { identity, vms })
}
