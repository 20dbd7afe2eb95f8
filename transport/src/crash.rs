//! Crash points: named places where a fault-injection test makes the process die as a host
//! that loses power would (docs/recovery.md, "Crash points"). They are the `fail` crate's
//! fail points, configured from `FAIL_POINTS` (`name=action;name=action`, `fail`'s syntax):
//! the action `return` kills the process with SIGKILL there; `sleep(ms)`, `pause`, `panic`,
//! `print` and counts such as `1*return` work as `fail` documents. Unset, a point costs a
//! lookup in an empty registry.

use thiserror::Error;

/// The environment variable the crash points are configured from.
pub const ENV_CRASH_POINTS: &str = "FAIL_POINTS";

/// `FAIL_POINTS` names a point without an action, or an action `fail` does not know.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{ENV_CRASH_POINTS}: bad entry {entry:?}: {reason}")]
pub struct CrashPointError {
    /// The entry as written.
    pub entry: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Configures the crash points from `spec` (`name=action;...`); an empty spec does nothing.
pub fn configure(spec: &str) -> Result<(), CrashPointError> {
    for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let bad = |reason: String| CrashPointError {
            entry: entry.to_string(),
            reason,
        };
        let (name, actions) = entry
            .split_once('=')
            .ok_or_else(|| bad("expected name=action".into()))?;
        fail::cfg(name.trim(), actions.trim()).map_err(bad)?;
    }
    Ok(())
}

/// Configures the crash points from [`ENV_CRASH_POINTS`], if set.
pub fn configure_from_env() -> Result<(), CrashPointError> {
    match std::env::var(ENV_CRASH_POINTS) {
        Ok(spec) => configure(&spec),
        Err(_) => Ok(()),
    }
}

/// A crash point: with the action `return` configured for `name`, the process says which
/// point it reached on stderr and dies by SIGKILL (no destructor, no close frame, no flush:
/// what the peer sees of a host that lost power).
pub fn crash_point(name: &str) {
    fail::eval(name, |_| {
        eprintln!("faultline: crash point {name}: SIGKILL");
        // SAFETY: raise only sends a signal to this process; SIGKILL cannot be caught.
        unsafe {
            libc::raise(libc::SIGKILL);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_names_points_and_actions() {
        configure("crash-test-a=off; crash-test-b = 2*off").unwrap();
        crash_point("crash-test-a");
        crash_point("crash-test-unset");
        let e = configure("crash-test-c").unwrap_err();
        assert_eq!(e.reason, "expected name=action");
        let e = configure("crash-test-d=explode").unwrap_err();
        assert_eq!(e.entry, "crash-test-d=explode");
        assert!(!e.to_string().is_empty());
        configure("").unwrap();
    }
}
