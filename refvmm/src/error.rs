//! Errors of the reference VMM.

use thiserror::Error;

/// Errors from building, running, pausing and restoring a [`super::Vm`].
#[derive(Debug, Error)]
pub enum VmError {
    /// `/dev/kvm` is missing or cannot be opened; the message says what to change.
    #[error("KVM is not usable: {0}")]
    KvmUnavailable(String),
    /// A KVM ioctl failed.
    #[error("KVM {op} failed")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The configuration cannot be run (sizes, vCPU count, working set).
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// Guest memory could not be created, mapped or accessed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// A guest program could not be assembled.
    #[error("cannot assemble the guest program: {0}")]
    Assemble(String),
    /// A vCPU state blob was refused.
    #[error(transparent)]
    State(#[from] StateError),
    /// The operation is not allowed in the VM's current run state.
    #[error("cannot {op} a VM that is {state}")]
    WrongState {
        op: &'static str,
        state: &'static str,
    },
    /// A vCPU thread stopped on its own (guest fault, KVM error, halt).
    #[error("vCPU {vcpu} stopped: {reason}")]
    VcpuExited { vcpu: usize, reason: String },
    /// The vCPUs did not answer a pause or stop request in time.
    #[error("vCPUs did not {what} within {ms} ms")]
    Timeout { what: &'static str, ms: u64 },
    /// A vCPU thread could not be spawned.
    #[error("cannot spawn a vCPU thread: {0}")]
    Thread(std::io::Error),
}

/// Why a vCPU state blob (see [`super::VmSnapshot`]) was refused. Decoding never panics.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StateError {
    #[error("vCPU state blob is truncated: {len} bytes, the header alone needs {needed}")]
    TruncatedHeader { len: usize, needed: usize },
    #[error("not a faultline vCPU state blob (bad magic)")]
    BadMagic,
    #[error("vCPU state blob has version {found}; this build reads version {expected}")]
    Version { found: u32, expected: u32 },
    #[error(
        "vCPU state blob is truncated: header announces {expected} payload bytes, {found} present"
    )]
    TruncatedPayload { expected: u64, found: u64 },
    #[error("vCPU state blob checksum mismatch (corrupted in transit?)")]
    Checksum,
    #[error("vCPU state blob payload is malformed: {0}")]
    Malformed(String),
    #[error("vCPU state blob does not fit this VM: {0}")]
    Mismatch(String),
}

pub(crate) fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_leaves_the_source_to_the_chain() {
        let source = kvm_ioctls::Error::new(libc::EINVAL);
        let cause = source.to_string();
        let e = kvm_err("KVM_SET_USER_MEMORY_REGION")(source);
        assert_eq!(e.to_string(), "KVM KVM_SET_USER_MEMORY_REGION failed");
        let all = uffd_core::error::chain(&e);
        assert_eq!(all, format!("{e}: {cause}"));
        assert_eq!(all.matches(&*cause).count(), 1, "{all}");
    }
}
