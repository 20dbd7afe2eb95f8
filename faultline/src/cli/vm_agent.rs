//! `vm source --agent-socket` and `vm dest --agent-socket`: the guest agent's channel in the
//! reference VMM's command line. A VMM exposes the agent's port as a Unix socket on the
//! host; these flags connect to it with [`AgentLink`]. The source asks for a report at
//! switchover and pushes the hot ranges first, and sends free pages that the dirty log
//! shows unwritten as zero pages when the agent says the guest does not poison freed
//! pages; the destination tells the agent that postcopy started (it pre-touches) and
//! finished.
//!
//! Bare-metal reference guests run no agent: whatever answers on the socket plays it
//! (tests/tests/vm_agent.rs does). A Linux guest under another VMM runs the real one
//! (tests/tests/guest_agent_qemu.rs).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use refvmm::{KvmDirtyLog, Vm};
use serde::{Deserialize, Serialize};
use transport::Layout;
use uffd_core::error::chain;
use vmm_shim::hints::{
    skippable_free, AgentLink, BoardLimits, DirtyBaseline, HintPlan, HintedReport,
};

/// The agent's channel.
#[derive(Args, Debug, Clone)]
pub struct AgentArgs {
    /// Unix socket on which the VMM exposes the guest agent's port (serial, virtio-console
    /// or a vsock proxy). Source: hot ranges first, free pages skipped. Destination:
    /// `PostcopyStarted` / `PostcopyFinished` to the agent. Needs KVM's dirty log on the
    /// source (the guest runs slower while it is on).
    #[arg(long)]
    pub agent_socket: Option<PathBuf>,
    /// Seconds to wait for the socket and for the agent's report.
    #[arg(long, default_value_t = 5.0)]
    pub agent_timeout: f64,
    /// Longest an agent's scan may take before its report arrives, in seconds. Free pages
    /// are skipped only if the scan certainly began after dirty tracking did, so a report
    /// arriving sooner than this after the boot skips none.
    #[arg(long, default_value_t = 30.0)]
    pub agent_scan_age: f64,
}

impl AgentArgs {
    fn timeout(&self) -> anyhow::Result<Duration> {
        Duration::try_from_secs_f64(self.agent_timeout).context("--agent-timeout")
    }
}

/// What the source did with the agent's hints (`vm source --json`, `hints`).
#[derive(Debug, Default, Serialize, Deserialize, Clone)]
pub struct SourceHintsReport {
    /// The report used (`None`: no report in time; the migration went on without hints).
    pub seq: Option<u64>,
    pub pages_hot: u64,
    pub pages_pushed_hot: u64,
    pub pages_reported_free: u64,
    pub pages_skipped_free: u64,
    /// Why free pages were not skipped (poisoned on free, report too old, ...).
    pub skip_refused: Option<String>,
    /// What the board refused from the agent, oldest first.
    pub agent_errors: Vec<String>,
}

impl SourceHintsReport {
    pub fn with_sent(mut self, sent: &HintedReport) -> SourceHintsReport {
        self.pages_pushed_hot = sent.pages_pushed_hot;
        self.pages_skipped_free = sent.pages_skipped_free;
        self
    }
}

/// What the agent said before the pause.
pub struct Asked {
    /// Kept open until the plan is made (its refused input goes into the report).
    link: Option<AgentLink>,
    hints: Option<vmm_shim::hints::Hints>,
    /// Why there are no hints.
    failure: Option<String>,
}

/// Dirty tracking since boot, for the free-page rule.
pub struct SourceAgent {
    args: AgentArgs,
    tracker: KvmDirtyLog,
    baseline: DirtyBaseline,
}

impl SourceAgent {
    /// Arms dirty tracking on `vm` (built with `dirty_log`) before it runs.
    pub fn arm(vm: &Vm, args: &AgentArgs) -> anyhow::Result<SourceAgent> {
        let mut tracker = vm
            .dirty_tracker()
            .context("KVM dirty log for --agent-socket")?;
        let baseline = DirtyBaseline::arm(&mut tracker).context("arming the dirty log")?;
        Ok(SourceAgent {
            args: args.clone(),
            tracker,
            baseline,
        })
    }

    /// Asks the agent for a fresh report while the guest still runs. An agent that cannot
    /// be reached or does not answer costs the hints, not the evacuation: the answer says
    /// why. Only malformed flags are errors.
    pub fn ask(&self, layout: &Layout) -> anyhow::Result<Asked> {
        let path = self
            .args
            .agent_socket
            .as_deref()
            .context("no --agent-socket")?;
        let limits = BoardLimits {
            max_scan_age: Duration::try_from_secs_f64(self.args.agent_scan_age)
                .context("--agent-scan-age")?,
            ..BoardLimits::default()
        };
        let timeout = self.args.timeout()?;
        let link = match AgentLink::connect(path, layout, limits, timeout) {
            Ok(link) => link,
            Err(e) => {
                let e = chain(&e);
                tracing::warn!("migrating without the guest agent's hints: {e}");
                return Ok(Asked {
                    link: None,
                    hints: None,
                    failure: Some(e),
                });
            }
        };
        let (hints, failure) = match link.fresh_hints(timeout) {
            Ok(Some(h)) => (Some(h), None),
            Ok(None) => (None, Some("no report from the agent in time".to_string())),
            Err(e) => (None, Some(chain(&e))),
        };
        Ok(Asked {
            link: Some(link),
            hints,
            failure,
        })
    }

    /// The plan for the paused guest: hot first, and free pages skipped when the rules
    /// allow. Call after the VMM's last write to guest memory (the switchover digest).
    pub fn plan(
        mut self,
        vm: &Vm,
        asked: &Asked,
        pages: u64,
    ) -> anyhow::Result<(HintPlan, SourceHintsReport)> {
        let mut report = SourceHintsReport {
            agent_errors: asked.link.as_ref().map_or_else(Vec::new, |l| {
                l.take_errors().iter().map(|e| chain(e)).collect()
            }),
            ..SourceHintsReport::default()
        };
        let Some(h) = &asked.hints else {
            report.skip_refused = asked.failure.clone();
            return Ok((HintPlan::default(), report));
        };
        report.seq = Some(h.seq);
        report.pages_hot = h.hot_pages();
        report.pages_reported_free = h.free_pages();
        let written = self
            .baseline
            .finish(&mut self.tracker, &vm.vmm_written_pages(), pages)
            .context("final dirty-log harvest")?;
        let plan = match skippable_free(h, &written) {
            Ok(skip) => HintPlan::with_free_skip(h, skip),
            Err(why) => {
                report.skip_refused = Some(why.to_string());
                HintPlan::hot_first(h)
            }
        };
        Ok((plan, report))
    }
}

/// What the destination told the agent (`vm dest --json`, `agent`).
#[derive(Debug, Default, Serialize, Deserialize, Clone)]
pub struct DestAgentReport {
    /// Guest resumed → `PostcopyStarted` written.
    pub started_sent_ms: Option<f64>,
    pub finished_sent: bool,
    /// The agent's `Touched` answer: processes, pages read, pages that failed, its time.
    pub touched_processes: Option<u32>,
    pub touched_pages: Option<u64>,
    pub touched_failed_pages: Option<u64>,
    pub touched_ms: Option<u64>,
    pub error: Option<String>,
}

/// The thread that connects to the agent and says `PostcopyStarted`: the link and how
/// long after the resume that was written.
type Notifier = std::thread::JoinHandle<Result<(AgentLink, f64), String>>;

/// The destination's side: connects when the guest resumes, off the network driver.
#[derive(Clone)]
pub struct DestAgent {
    args: AgentArgs,
    layout: Layout,
    link: Arc<Mutex<Option<Notifier>>>,
}

impl DestAgent {
    pub fn new(args: &AgentArgs, layout: &Layout) -> DestAgent {
        DestAgent {
            args: args.clone(),
            layout: layout.clone(),
            link: Arc::default(),
        }
    }

    /// The guest resumed: connect and send `PostcopyStarted` on a thread of its own (this
    /// runs on the network driver, which must not wait for the agent).
    pub fn resumed(&self) {
        let (args, layout) = (self.args.clone(), self.layout.clone());
        let at = Instant::now();
        let handle = std::thread::spawn(move || {
            let path = args.agent_socket.as_deref().ok_or("no --agent-socket")?;
            let timeout = args.timeout().map_err(|e| format!("{e:#}"))?;
            let link = AgentLink::connect(path, &layout, BoardLimits::default(), timeout)
                .map_err(|e| chain(&e))?;
            link.postcopy_started().map_err(|e| chain(&e))?;
            Ok((link, at.elapsed().as_secs_f64() * 1e3))
        });
        *self.link.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
    }

    /// Every page is present: `PostcopyFinished`, and the agent's `Touched` if it came.
    pub fn finish(&self) -> DestAgentReport {
        let handle = self.link.lock().unwrap_or_else(|p| p.into_inner()).take();
        let mut r = DestAgentReport::default();
        let joined = match handle {
            Some(h) => h
                .join()
                .unwrap_or_else(|_| Err("agent thread panicked".into())),
            None => Err("the guest never resumed".into()),
        };
        match joined {
            Ok((link, ms)) => {
                r.started_sent_ms = Some(ms);
                let wait = self.args.timeout().unwrap_or(Duration::from_secs(5));
                if let Some(t) = link.wait_touched(wait) {
                    r.touched_processes = Some(t.processes);
                    r.touched_pages = Some(t.pages);
                    r.touched_failed_pages = Some(t.failed_pages);
                    r.touched_ms = Some(t.elapsed_ms);
                }
                match link.postcopy_finished() {
                    Ok(()) => r.finished_sent = true,
                    Err(e) => r.error = Some(chain(&e)),
                }
            }
            Err(e) => r.error = Some(e),
        }
        r
    }
}
