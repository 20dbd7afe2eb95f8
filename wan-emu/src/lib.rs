//! faultline's WAN emulator: a user-space UDP relay that adds delay, jitter, a bandwidth limit with a
//! bounded queue, random loss and link cuts between two UDP endpoints (a quinn client and
//! server) on one host. The kernel here has no `netem`, so this is how tests and benches
//! migrate over a "WAN".
//!
//! ```text
//!   client ──► listen socket ─[client→server Link]─► per-client upstream socket ──► server
//!   client ◄── listen socket ◄─[server→client Link]─ per-client upstream socket ◄── server
//! ```
//!
//! * [`link`] is the pure model of one direction ([`Link`]): given a packet's size and
//!   arrival time it decides a drop or a delivery time. No I/O, no clock: unit-tested with a
//!   virtual clock.
//! * [`relay`] runs it on real sockets with dedicated OS threads ([`WanEmulator`]).
//!
//! See `docs/wan-emulator.md` for what is modelled, the parameters, and measured accuracy.
//!
//! This crate knows nothing about faultline's protocol or QUIC: it relays UDP datagrams.
//! Tests, benches and the `faultline` CLI use it; the libraries a VMM links
//! (`vmm-shim`, `uffd-core`, `transport`) must not depend on it.
//!
//! ```no_run
//! # fn main() -> Result<(), wan_emu::WanError> {
//! use std::time::Duration;
//! use wan_emu::{LinkConfig, WanEmulator};
//!
//! let server = "127.0.0.1:4433".parse().unwrap();
//! // 40 ms RTT, 100 Mbit/s, 1% loss each way; clients connect to `wan.local_addr()`.
//! let link = LinkConfig::new(Duration::from_millis(40), 100_000_000).with_loss(0.01, 7);
//! let wan = WanEmulator::start("127.0.0.1:0".parse().unwrap(), server, link)?;
//! println!("connect to {}", wan.local_addr());
//! wan.cut(); // the network breaks...
//! wan.restore(); // ...and comes back
//! println!("{:?}", wan.counters());
//! # Ok(())
//! # }
//! ```

pub mod link;
pub mod relay;
mod rng;
mod sys;

use serde::{Deserialize, Serialize};

pub use link::{ConfigError, DropReason, JitterDist, Link, LinkConfig, Nanos, Verdict};
pub use relay::{DirectionCounters, WanCounters, WanEmulator, WanError};

/// One direction of the relayed path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// From the client (whoever sends to the listen address) to the upstream server.
    ClientToServer,
    /// From the upstream server back to the client.
    ServerToClient,
}

impl Direction {
    /// Both directions, client → server first.
    pub const BOTH: [Direction; 2] = [Direction::ClientToServer, Direction::ServerToClient];

    pub(crate) fn index(self) -> usize {
        match self {
            Direction::ClientToServer => 0,
            Direction::ServerToClient => 1,
        }
    }
}

/// The impairments of both directions.
///
/// A [`LinkConfig`] converts into a symmetric `WanConfig` (see [`WanConfig::symmetric`]),
/// so most callers just pass a `LinkConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WanConfig {
    /// Client → server.
    pub client_to_server: LinkConfig,
    /// Server → client.
    pub server_to_client: LinkConfig,
}

impl WanConfig {
    /// The same impairments both ways. The server → client seed is derived from the given
    /// one, so the two directions do not lose the same packet numbers in lockstep (which a
    /// request/response protocol would otherwise see as strangely correlated loss).
    pub fn symmetric(link: LinkConfig) -> WanConfig {
        let mut back = link.clone();
        let mut s = link.seed ^ 0xD1B5_4A32_D192_ED03;
        back.seed = rng::splitmix64(&mut s);
        WanConfig {
            client_to_server: link,
            server_to_client: back,
        }
    }

    /// The configuration of one direction.
    pub fn get(&self, dir: Direction) -> &LinkConfig {
        match dir {
            Direction::ClientToServer => &self.client_to_server,
            Direction::ServerToClient => &self.server_to_client,
        }
    }

    /// Checks both directions.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.client_to_server.validate()?;
        self.server_to_client.validate()
    }
}

impl From<LinkConfig> for WanConfig {
    fn from(link: LinkConfig) -> WanConfig {
        WanConfig::symmetric(link)
    }
}

impl Default for WanConfig {
    fn default() -> Self {
        WanConfig::symmetric(LinkConfig::default())
    }
}
