//! The host side of the guest agent's hints (`guest_agent::proto`): take what the agent in
//! the guest says about hot and free memory, treat every byte of it as hostile, and use
//! what survives to migrate better.
//!
//! * [`AgentLink`] is the live channel: it connects to the socket the VMM exposes the
//!   agent's port on, feeds a board from its own thread and sends the host's messages
//!   (`ReportNow`, `PostcopyStarted`, `PostcopyFinished`).
//! * [`HintBoard`] reads the agent channel (bytes from a serial line or Unix socket, or
//!   decoded messages), validates every report against the guest's memory layout and keeps
//!   the latest complete one as [`Hints`]. Its memory is bounded whatever the agent sends
//!   (see [`BoardLimits`]), and every rejection is a typed [`HintError`].
//! * **Hot first**: [`HintPlan`] hands the hot ranges to the source session, which pushes
//!   them before everything else (`SourceConfig::hot`); see
//!   [`crate::source::send_with_hints`].
//! * **Free-page skipping**: pages the agent reported free, and that the source's dirty
//!   tracking shows unwritten since before the agent's scan, cross as zero pages (one kind
//!   byte, no payload) when the agent says the guest kernel does not poison freed pages. See
//!   [`skippable_free`] for the exact rules and [`SkipFreeReader`] for how it is done.
//!
//! # Guest frames and host pages
//!
//! The agent numbers guest-physical page frames (pfn = guest-physical address / 4096); the
//! migration numbers pages globally over the layout's regions in layout order.
//! [`GuestMap`] converts: a frame inside region `r` is page `r.first_page + (pfn -
//! r.guest_addr / 4096)`. For the reference VMM (the `refvmm` crate), whose memory is one
//! region at guest-physical 0, **pfn == page index**. Frames in no region (holes, MMIO, beyond the
//! end) are refused: a report that names one is rejected whole.

mod board;
mod free;
mod link;

mod map;

pub use board::{BoardLimits, BoardStats, HintBoard, HintError};
pub use free::{
    skippable_free, zeroed_digest, zeroed_digest_except, DirtyBaseline, FreeSkip, SkipFreeReader,
    SkipRefused, WrittenSince,
};
pub use link::{AgentLink, AgentLinkError};
pub use map::{GuestMap, MapError};

/// The agent's wire protocol (`guest_agent::proto`), for hosts that link only vmm-shim.
pub use guest_agent::proto as agent_proto;

use std::ops::Range;
use std::time::Instant;

use transport::bitmap::Bitmap;

/// One complete, validated agent report, in host page numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hints {
    /// The agent's report number.
    pub seq: u64,
    /// Hot pages, sorted, non-overlapping, adjacent ranges merged.
    pub hot: Vec<Range<u64>>,
    /// Pages free in the guest's buddy allocator at the agent's scan (one bit per page).
    pub free: Bitmap,
    /// The guest kernel overwrites pages it frees (`init_on_free` / `page_poison`), from the
    /// `Hello` before the report (true if either of two `Hello`s around it said so).
    pub poison_on_free: bool,
    /// The agent's scan for this report started no earlier than this: the arrival of the
    /// report's first part, less [`BoardLimits::max_scan_age`]. `None` if that is before
    /// this process's clock can say.
    pub scanned_after: Option<Instant>,
}

impl Hints {
    /// Hints that say nothing (no hot range, no free page) for `pages` pages.
    pub fn empty(pages: u64) -> Hints {
        Hints {
            seq: 0,
            hot: Vec::new(),
            free: Bitmap::new(pages),
            poison_on_free: true,
            scanned_after: None,
        }
    }

    /// Pages in the hot ranges.
    pub fn hot_pages(&self) -> u64 {
        self.hot.iter().map(|r| r.end - r.start).sum()
    }

    /// Pages reported free.
    pub fn free_pages(&self) -> u64 {
        self.free.count_ones()
    }
}

/// What the source does with hints: push `hot` first and, if set, send the pages of
/// `skip_free` as zero pages without reading them.
#[derive(Clone, Debug, Default)]
pub struct HintPlan {
    /// Host page ranges to push before every other page, in this order (normally
    /// [`Hints::hot`]: sorted, non-overlapping). Empty: a plain push.
    pub hot: Vec<Range<u64>>,
    /// Free pages to zero-fill (from [`skippable_free`]); `None` sends every page's content.
    pub skip_free: Option<Bitmap>,
}

impl HintPlan {
    /// Hot-first push only; every page's content crosses.
    pub fn hot_first(hints: &Hints) -> HintPlan {
        HintPlan {
            hot: hints.hot.clone(),
            skip_free: None,
        }
    }

    /// Hot-first push and free-page skipping of `skip.pages`.
    pub fn with_free_skip(hints: &Hints, skip: FreeSkip) -> HintPlan {
        HintPlan {
            hot: hints.hot.clone(),
            skip_free: Some(skip.pages),
        }
    }
}

/// What [`crate::source::send_with_hints`] reports beside the session's own report.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct HintedReport {
    /// The source session's report, as without hints (flattened into this one when
    /// serialized).
    #[serde(flatten)]
    pub session: transport::quic::SourceReport,
    /// Pages in the hot ranges.
    pub pages_hot: u64,
    /// Hot pages the push sent before any other page (hot pages the destination asked
    /// for first were served on demand instead).
    pub pages_pushed_hot: u64,
    /// Free pages sent as zero pages without their content.
    pub pages_skipped_free: u64,
}
