//! Replication to a standby in normal times, and evacuation into the standby's replica.

pub mod evacuate;
pub mod ledger;
pub mod pace;
pub mod replicator;
pub mod standby;
mod written;

pub use evacuate::{evacuate, evacuate_over, evacuate_with_disks, EvacuationReport, PausedMemory};
pub use ledger::Ledger;
pub use replicator::{
    LinkBytes, ReplicationSummary, Replicator, ReplicatorOptions, ReplicatorState, ReplicatorStats,
};
pub use standby::{EvacuationStats, Replica, StandbySink};
pub use written::WrittenPages;
