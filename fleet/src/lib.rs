//! Evacuating many VMs at once: a migration-time model, a flow-level simulator and a
//! planner. Pure: no I/O, no clock (the caller says what time it is), so every part is
//! testable exhaustively. See docs/fleet.md.
//!
//! * [`model`]: links, VMs and the fixed cost of one evacuation, checked;
//! * [`sim`]: an event-driven simulator, max-min sharing of each link with a per-flow
//!   window / RTT cap, stale bytes growing while a VM waits;
//! * [`plan`]: the planner (order, concurrency, sharing, who cannot make the deadline, the
//!   replication budget in normal times), the baseline schedules and `replan`;
//! * [`file`](mod@file): the plan file (TOML), with errors that name the entry;
//! * [`units`]: sizes, rates and durations as operators write them;
//! * [`control`]: the protocol between `faultline evacuate` and each VM's source (typed
//!   messages, length-prefixed frames, decoders that never panic);
//! * [`orchestrate`]: what the orchestrator decides (which VMs start now, what it measured
//!   for `replan`, the report with each VM's timeline), pure.
//! * [`chart`]: Gantt charts of a plan or a run, as SVG.

pub mod chart;
pub mod control;
pub mod file;
pub mod model;
pub mod orchestrate;
pub mod plan;
pub mod sim;
pub mod units;

pub use model::{Costs, Entry, Fleet, InputError, Link, Problem, Vm};
