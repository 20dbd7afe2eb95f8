//! The plan file's keys for `faultline evacuate`: where each VM's source listens for the
//! orchestrator (`control = "host:port"` in its `[[vm]]`), the orchestrator's certificate
//! and key (`cert`, `key`), and the sources' certificates it pins (`peer_cert`, for all
//! VMs at the top or per VM). `faultline plan` ignores them. Paths are kept as written:
//! the caller resolves them against the plan file's directory.

use toml::{Table, Value};

use crate::model::{Entry, InputError, Problem};

/// A source's control address as written: a host (name or IP address) and a port. Pure:
/// names are resolved by the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlAddr {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for ControlAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// One VM's control endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmControl {
    pub addr: ControlAddr,
    /// The certificate its source presents; the plan's `peer_cert` if `None`.
    pub peer_cert: Option<String>,
}

/// Everything `faultline evacuate` needs beyond the fleet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ControlPlan {
    /// The orchestrator's certificate and key (PEM paths).
    pub cert: Option<String>,
    pub key: Option<String>,
    /// The sources' certificate, for VMs without their own `peer_cert`.
    pub peer_cert: Option<String>,
    /// Per VM, in fleet order.
    pub vms: Vec<Option<VmControl>>,
}

const ADDR_EXAMPLES: &str = "\"10.0.0.5:7100\", \"src-3.example:7100\", \"[fd00::5]:7100\"";

/// `cert`, `key`, `peer_cert` of the top-level table.
pub(super) fn parse_top(doc: &Table) -> Result<ControlPlan, InputError> {
    Ok(ControlPlan {
        cert: path(&Entry::Top, doc, "cert")?,
        key: path(&Entry::Top, doc, "key")?,
        peer_cert: path(&Entry::Top, doc, "peer_cert")?,
        vms: Vec::new(),
    })
}

/// `control` and `peer_cert` of a `[[vm]]`.
pub(super) fn parse_vm(e: &Entry, t: &Table) -> Result<Option<VmControl>, InputError> {
    let peer_cert = path(e, t, "peer_cert")?;
    let addr = match t.get("control") {
        None => {
            if peer_cert.is_some() {
                return Err(e.clone().problem(Problem::Other(
                    "peer_cert is given but control (its source's address) is not".into(),
                )));
            }
            return Ok(None);
        }
        Some(Value::String(s)) => parse_addr(s).ok_or_else(|| {
            e.clone().problem(Problem::Unparsable {
                key: "control",
                value: s.clone(),
                what: "an address host:port",
                examples: ADDR_EXAMPLES,
            })
        })?,
        Some(other) => {
            return Err(e.clone().problem(Problem::WrongType {
                key: "control".into(),
                expected: "an address host:port",
                got: super::describe(other),
            }))
        }
    };
    Ok(Some(VmControl { addr, peer_cert }))
}

fn path(e: &Entry, t: &Table, key: &'static str) -> Result<Option<String>, InputError> {
    match t.get(key) {
        None => Ok(None),
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.clone())),
        Some(other) => Err(e.clone().problem(Problem::WrongType {
            key: key.into(),
            expected: "a file path",
            got: super::describe(other),
        })),
    }
}

/// `host:port`, `[v6]:port`: a host of letters, digits, `.`, `-` (or an IPv6 address in
/// brackets) and a port 1-65535.
pub fn parse_addr(s: &str) -> Option<ControlAddr> {
    let s = s.trim();
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once("]:")?;
        h.parse::<std::net::Ipv6Addr>().ok()?;
        (h, p)
    } else {
        let (h, p) = s.rsplit_once(':')?;
        let ok = !h.is_empty()
            && h.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_');
        if !ok {
            return None;
        }
        (h, p)
    };
    let port: u16 = p_digits(port)?;
    (port != 0).then(|| ControlAddr {
        host: host.to_string(),
        port,
    })
}

fn p_digits(p: &str) -> Option<u16> {
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let a = parse_addr("10.0.0.5:7100").unwrap();
        assert_eq!((a.host.as_str(), a.port), ("10.0.0.5", 7100));
        assert_eq!(parse_addr("src-3.example:1").unwrap().host, "src-3.example");
        let v6 = parse_addr("[fd00::5]:7100").unwrap();
        assert_eq!(v6.host, "fd00::5");
        assert_eq!(v6.to_string(), "[fd00::5]:7100");
        for bad in [
            "",
            "host",
            "host:",
            ":7100",
            "host:0",
            "host:65536",
            "host:-1",
            "a b:1",
            "fd00::5:7100",
            "[zz]:1",
            "[fd00::5]",
            "host:7100x",
        ] {
            assert_eq!(parse_addr(bad), None, "{bad:?}");
        }
    }
}
