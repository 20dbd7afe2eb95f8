//! Replication to a standby in normal times, and evacuation into the standby's replica.

pub mod ledger;

pub use ledger::Ledger;
