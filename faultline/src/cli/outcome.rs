//! Every run's outcome as data: with `--json` a command prints exactly one JSON object on
//! stdout, `"ok": true` with its report, or `"ok": false` with the error's stable kind, its
//! message and what was done before it failed; the exit code says the kind too
//! (docs/operations.md lists them).

use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::{json, Map, Value};
use transport::quic::DriverError;
use vmm_shim::{Progress, ProgressFn, RoleError};

/// What kind of failure ended a run: stable names for scripts, one exit code each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The command line was wrong (clap's own errors also exit with 2).
    Usage,
    /// The peer's certificate is not the pinned one, or it refused ours.
    Authentication,
    /// The peer ended the session with a reason: busy, a layout or version mismatch, ...
    PeerRefused,
    /// Nobody answered, the path broke, or a timeout ran out.
    Network,
    /// A local file, memory or kernel interface failed (images, keys, userfaultfd, KVM).
    LocalIo,
    /// The peer broke the protocol (malformed or unexpected messages).
    Protocol,
    /// SIGTERM or SIGINT stopped the run (the peer was told why).
    Stopped,
    /// The session failed after switchover, before every page had crossed: the guest's
    /// memory is split between the hosts and the VM is lost (docs/recovery.md).
    VmLost,
    /// Anything else.
    Internal,
}

impl Kind {
    /// The stable name in the failure JSON.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Usage => "usage",
            Kind::Authentication => "authentication",
            Kind::PeerRefused => "peer_refused",
            Kind::Network => "network",
            Kind::LocalIo => "local_io",
            Kind::Protocol => "protocol",
            Kind::Stopped => "stopped",
            Kind::VmLost => "vm_lost",
            Kind::Internal => "internal",
        }
    }

    /// The process exit code.
    pub fn exit_code(self) -> u8 {
        match self {
            Kind::Internal => 1,
            Kind::Usage => 2,
            Kind::Authentication => 3,
            Kind::PeerRefused => 4,
            Kind::Network => 5,
            Kind::LocalIo => 6,
            Kind::Protocol => 7,
            Kind::Stopped => 8,
            Kind::VmLost => 9,
        }
    }
}

/// The kind of the first cause in `e`'s chain that says what happened.
pub fn classify(e: &anyhow::Error) -> Kind {
    // Whatever ended the session, a lost VM is what the operator must hear first.
    if vm_lost(e).is_some() {
        return Kind::VmLost;
    }
    // A lost connection explains whatever failed on it (a stream write, a read): when the
    // TLS handshake was refused, the refusal can surface as either, depending on timing.
    let lost = e
        .chain()
        .find_map(|c| c.downcast_ref::<quinn::ConnectionError>())
        .map(connection_kind);
    lost.or_else(|| e.chain().find_map(kind_of))
        .unwrap_or(Kind::Internal)
}

fn kind_of(cause: &(dyn std::error::Error + 'static)) -> Option<Kind> {
    if let Some(r) = cause.downcast_ref::<RoleError>() {
        return match r {
            RoleError::AcceptTimeout(_) | RoleError::ConnectTimeout { .. } => Some(Kind::Network),
            RoleError::LayoutDoesNotFitMemory => Some(Kind::Usage),
            RoleError::Uffd(_)
            | RoleError::Memory(_)
            | RoleError::Dirty(_)
            | RoleError::Replica(_)
            | RoleError::Io(_)
            | RoleError::Runtime(_) => Some(Kind::LocalIo),
            // Transparent: the chain skips the driver's error, so look at it here.
            RoleError::Transport(d) => driver_kind(d),
            _ => None,
        };
    }
    cause
        .downcast_ref::<DriverError>()
        .map_or_else(|| other_kind(cause), driver_kind)
}

fn driver_kind(d: &DriverError) -> Option<Kind> {
    match d {
        DriverError::Tls(_) | DriverError::Bind { .. } => Some(Kind::LocalIo),
        DriverError::Connection(c) => Some(connection_kind(c)),
        DriverError::PeerClosed { .. } => Some(Kind::PeerRefused),
        DriverError::Protocol(_) | DriverError::Stream { .. } | DriverError::UnknownStream(_) => {
            Some(Kind::Protocol)
        }
        DriverError::Connect { .. }
        | DriverError::Timeout(_)
        | DriverError::RecoverTimeout { .. }
        | DriverError::Silent { .. } => Some(Kind::Network),
        DriverError::Stopped => Some(Kind::Stopped),
        DriverError::Reader(_) | DriverError::Sink(_) => Some(Kind::LocalIo),
        _ => None,
    }
}

fn other_kind(cause: &(dyn std::error::Error + 'static)) -> Option<Kind> {
    // A bad plan file is the user's input, like a bad flag.
    if cause.is::<fleet::file::PlanFileError>() || cause.is::<fleet::InputError>() {
        return Some(Kind::Usage);
    }
    if cause.is::<transport::tls::TlsError>()
        || cause.is::<faultline::image::ImageError>()
        || cause.is::<std::io::Error>()
        || cause.is::<uffd_core::Error>()
        || cause.is::<refvmm::VmError>()
        || cause.is::<disk::OpenError>()
        || cause.is::<disk::nbd::ServeError>()
    {
        return Some(Kind::LocalIo);
    }
    if let Some(c) = cause.downcast_ref::<quinn::ConnectionError>() {
        return Some(connection_kind(c));
    }
    if cause.is::<disk::OpenError>() {
        return Some(Kind::LocalIo);
    }
    if let Some(e) = cause.downcast_ref::<disk::vhost_user::BlkError>() {
        return Some(match e {
            disk::vhost_user::BlkError::Spawn(_) => Kind::Internal,
            _ => Kind::Usage,
        });
    }
    if let Some(e) = cause.downcast_ref::<disk::vhost_user::ServeError>() {
        use disk::vhost_user::ServeError as S;
        return Some(match e {
            S::Connection(_) => Kind::Protocol,
            _ => Kind::LocalIo,
        });
    }
    None
}

/// TLS alerts travel as QUIC CRYPTO_ERROR codes (0x100..=0x1ff): a certificate refused.
fn connection_kind(c: &quinn::ConnectionError) -> Kind {
    use quinn::ConnectionError as E;
    let crypto = |code: u64| (0x100..=0x1ff).contains(&code);
    match c {
        E::TransportError(t) if crypto(u64::from(t.code)) => Kind::Authentication,
        E::ConnectionClosed(c) if crypto(u64::from(c.error_code)) => Kind::Authentication,
        E::ApplicationClosed(_) => Kind::PeerRefused,
        E::VersionMismatch | E::TransportError(_) | E::ConnectionClosed(_) => Kind::Protocol,
        E::Reset | E::TimedOut | E::LocallyClosed | E::CidsExhausted => Kind::Network,
    }
}

/// The driver's report of a lost VM in `e`'s chain: (vulnerability_ms, pages_missing).
fn vm_lost(e: &anyhow::Error) -> Option<(u64, Option<u64>)> {
    e.chain().find_map(|c| {
        let d =
            c.downcast_ref::<DriverError>()
                .or_else(|| match c.downcast_ref::<RoleError>() {
                    Some(RoleError::Transport(d)) => Some(d),
                    _ => None,
                })?;
        match d {
            DriverError::VmLost {
                vulnerability_ms,
                pages_missing,
                ..
            } => Some((*vulnerability_ms, *pages_missing)),
            _ => None,
        }
    })
}

/// What the running role last reported it had done (see [`vmm_shim::Progress`]).
static LAST_PROGRESS: Mutex<Option<Progress>> = Mutex::new(None);

/// Records a role's progress, for a failure report.
pub fn record_progress(p: Progress) {
    *LAST_PROGRESS.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
}

/// A progress callback that only records (see [`record_progress`]).
pub fn recorder() -> ProgressFn {
    Arc::new(record_progress)
}

/// The one JSON object of a failed run.
pub fn failure_json(e: &anyhow::Error, kind: Kind) -> Value {
    let done = match *LAST_PROGRESS.lock().unwrap_or_else(|e| e.into_inner()) {
        Some(p) => json!(p),
        None => Value::Object(Map::new()),
    };
    let mut v = json!({
        "ok": false,
        "error": {
            "kind": kind.name(),
            "exit_code": kind.exit_code(),
            "message": format!("{e:#}"),
        },
        "done": done,
    });
    if let Some((ms, missing)) = vm_lost(e) {
        v["vm_lost"] = json!({ "vulnerability_ms": ms, "pages_missing": missing });
    }
    v
}

/// Prints a successful run's report as its one JSON object, with `"ok": true`.
pub fn print_report(report: &impl Serialize) -> anyhow::Result<()> {
    let mut v = serde_json::to_value(report)?;
    if let Value::Object(m) = &mut v {
        m.insert("ok".into(), Value::Bool(true));
    }
    println!("{v}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_come_from_the_cause_that_says_what_happened() {
        let timeout = anyhow::Error::new(RoleError::ConnectTimeout {
            addr: "127.0.0.1:1".parse().unwrap(),
            timeout: std::time::Duration::from_secs(2),
        })
        .context("migrating");
        assert_eq!(classify(&timeout), Kind::Network);
        let busy = anyhow::Error::new(RoleError::Transport(DriverError::PeerClosed {
            code: transport::message::ErrorCode::Busy,
            reason: "in a session".into(),
        }));
        assert_eq!(classify(&busy), Kind::PeerRefused);
        // A connection lost under a failed stream write says what happened (here the
        // path timed out; a refused TLS handshake surfaces the same way).
        let write = transport::quic::FrameError::Write(quinn::WriteError::ConnectionLost(
            quinn::ConnectionError::TimedOut,
        ));
        let stream = anyhow::Error::new(RoleError::Transport(DriverError::Stream {
            channel: transport::proto::Channel::Control,
            source: write,
        }));
        assert_eq!(classify(&stream), Kind::Network);
        let file = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::NotFound))
            .context("loading the key");
        assert_eq!(classify(&file), Kind::LocalIo);
        assert_eq!(classify(&anyhow::anyhow!("something else")), Kind::Internal);
    }

    #[test]
    fn a_lost_vm_is_reported_first_with_its_exposure() {
        let lost = anyhow::Error::new(RoleError::Transport(DriverError::VmLost {
            vulnerability_ms: 1234,
            pages_missing: Some(56),
            cause: Box::new(DriverError::Silent {
                ms: 5000,
                last_heard: std::time::Instant::now(),
            }),
        }))
        .context("receiving");
        assert_eq!(classify(&lost), Kind::VmLost);
        let v = failure_json(&lost, Kind::VmLost);
        assert_eq!(v["error"]["kind"], "vm_lost");
        assert_eq!(v["error"]["exit_code"], 9);
        assert_eq!(v["vm_lost"]["vulnerability_ms"], 1234);
        assert_eq!(v["vm_lost"]["pages_missing"], 56);
        let msg = v["error"]["message"].as_str().unwrap();
        assert_eq!(msg.matches("nothing arrived").count(), 1, "{msg}");
    }

    #[test]
    fn a_failure_is_one_object_with_a_stable_kind() {
        let e = anyhow::anyhow!("boom").context("running");
        let v = failure_json(&e, Kind::Network);
        assert_eq!(v["ok"], false);
        assert_eq!(v["error"]["kind"], "network");
        assert_eq!(v["error"]["exit_code"], 5);
        assert_eq!(v["error"]["message"], "running: boom");
        assert!(v["done"].is_object());
        record_progress(Progress {
            pages_present: Some(3),
            pages: 8,
            bytes_received: 12_000,
            bytes_sent: 900,
            stream_bytes_sent: 800,
            ..Progress::default()
        });
        let v = failure_json(&e, Kind::Network);
        assert_eq!(v["done"]["pages_present"], 3);
        assert_eq!(v["done"]["bytes_received"], 12_000);
    }
}
