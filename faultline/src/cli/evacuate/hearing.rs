//! Hearing the sources before a plan: connect to every VM's control endpoint, take each
//! one's status (or say why not) and the fleet as they measure it. `faultline evacuate`
//! goes on to start them; `faultline plan --live` ([`live_plan`]) plans and lets them be.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fleet::control::Status;
use fleet::orchestrate::Orchestration;
use fleet::plan::Policy;
use tokio::sync::mpsc;

use super::plan_file;
use super::source_link::{self, Command, Report as LinkReport, Timeouts};

/// The fleet as its sources describe it now, and the links to them.
pub(super) struct Hearing {
    /// The plan file's fleet with each answering source's figures ([`Status::apply_to`]).
    pub(super) fleet: fleet::model::Fleet,
    /// Each VM's first status (`None`: skipped, or it did not answer).
    pub(super) first: Vec<Option<Status>>,
    /// The VMs whose source did not answer, or answered as another VM, and why.
    pub(super) unreachable: Vec<(usize, String)>,
    /// Where to tell each answering source's task to start.
    pub(super) starts: Vec<Option<mpsc::Sender<Command>>>,
    /// What the sources' tasks report.
    pub(super) rx: mpsc::UnboundedReceiver<LinkReport>,
    /// The tasks, to wait for once `starts` is dropped.
    pub(super) tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The client endpoints, to let their connections' closes leave.
    pub(super) endpoints: Vec<quinn::Endpoint>,
}

/// Connects to every VM's source and waits until each has answered or been given up on
/// (within the connect timeout).
pub(super) async fn hear(
    file_fleet: &fleet::model::Fleet,
    setup: &plan_file::Setup,
    timeouts: Timeouts,
) -> anyhow::Result<Hearing> {
    let n = file_fleet.vms.len();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut starts: Vec<Option<mpsc::Sender<Command>>> = (0..n).map(|_| None).collect();
    let mut tasks = Vec::new();
    let mut endpoints = Vec::new();
    for (i, vm) in setup.vms.iter().enumerate() {
        let Some(vm) = vm else { continue };
        let endpoint = {
            let bind = unspecified_for(vm.addr);
            transport::quic::control_client_endpoint(bind, &setup.identity, vm.peer_cert.clone())
                .with_context(|| format!("vm {:?}: a client endpoint", file_fleet.vms[i].name))?
        };
        let (start_tx, start_rx) = mpsc::channel(COMMANDS_QUEUED);
        starts[i] = Some(start_tx);
        endpoints.push(endpoint.clone());
        tasks.push(tokio::spawn(source_link::run(
            i,
            vm.addr,
            endpoint,
            start_rx,
            tx.clone(),
            timeouts,
        )));
    }
    drop(tx);

    let mut fleet = file_fleet.clone();
    let mut unreachable: Vec<(usize, String)> = Vec::new();
    let mut first: Vec<Option<Status>> = vec![None; n];
    // Links not heard from yet (each answers within the connect timeout, or gives up).
    let mut pending: Vec<bool> = starts.iter().map(Option::is_some).collect();
    // A source that failed, or answered as another VM, even after a first status: left out
    // once, with its first reason.
    let give_up = |i: usize,
                   why: String,
                   starts: &mut [Option<mpsc::Sender<Command>>],
                   first: &mut [Option<Status>],
                   unreachable: &mut Vec<(usize, String)>| {
        starts[i] = None;
        first[i] = None;
        if !unreachable.iter().any(|(j, _)| *j == i) {
            // It may quote the source (the VM it says it is).
            unreachable.push((i, fleet::control::clean_text(&why)));
        }
    };
    while pending.iter().any(|&p| p) {
        let Some(msg) = rx.recv().await else { break };
        match &msg {
            LinkReport::Status(i, _)
            | LinkReport::Unreachable(i, _)
            | LinkReport::Failed(i, _)
            | LinkReport::Event(i, _) => pending[*i] = false,
            LinkReport::Rate(..) => {}
        }
        match msg {
            LinkReport::Status(i, s) => {
                let name = &fleet.vms[i].name;
                if &s.vm_id != name {
                    let why = format!(
                        "the source at {} is vm {:?}, not {name:?}",
                        setup.vms[i]
                            .as_ref()
                            .map(|v| v.addr.to_string())
                            .unwrap_or_default(),
                        s.vm_id
                    );
                    give_up(i, why, &mut starts, &mut first, &mut unreachable);
                } else if starts[i].is_some() {
                    first[i] = Some(s);
                }
            }
            LinkReport::Unreachable(i, why) | LinkReport::Failed(i, why) => {
                give_up(i, why, &mut starts, &mut first, &mut unreachable)
            }
            // Rate news comes only once an evacuation runs, which hearing does not start.
            LinkReport::Event(..) | LinkReport::Rate(..) => {}
        }
    }
    for (v, s) in fleet.vms.iter_mut().zip(&first) {
        if let Some(s) = s {
            s.apply_to(v);
        }
    }
    Ok(Hearing {
        fleet,
        first,
        unreachable,
        starts,
        rx,
        tasks,
        endpoints,
    })
}

impl Hearing {
    /// An error naming every source, if none answered: nothing to plan or start.
    pub(super) fn check_any_answered(&self) -> anyhow::Result<()> {
        if self.first.iter().any(Option::is_some) {
            return Ok(());
        }
        bail!(
            "no source answered, nothing was started: {}",
            self.unreachable
                .iter()
                .map(|(i, why)| format!("vm {:?}: {why}", self.fleet.vms[*i].name))
                .collect::<Vec<_>>()
                .join("; ")
        )
    }
}

/// What `faultline plan --live` prints: the plan `faultline evacuate` would make now.
pub struct LivePlan {
    /// The plan at time 0, as the orchestrator would start it.
    pub plan: fleet::plan::Plan,
    /// Sources asked (the VMs not skipped).
    pub asked: usize,
    /// Sources that answered as their VM.
    pub answered: usize,
    /// The VMs whose source did not answer (planned as failed), and why.
    pub unreachable: Vec<(String, String)>,
}

/// Asks every source of `pf` (read from `file` at `read_at`) for its figures and plans
/// with them as `faultline evacuate` would at its start, without starting anything: the
/// control connections close once every source has answered or been given up on.
pub fn live_plan(
    pf: &fleet::file::PlanFile,
    file: &std::path::Path,
    read_at: Instant,
    connect_timeout: Duration,
    policy: Policy,
) -> anyhow::Result<LivePlan> {
    let setup = plan_file::resolve(pf, file)?;
    let asked = setup.vms.iter().flatten().count();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let timeouts = Timeouts {
        connect: connect_timeout,
        silence: connect_timeout,
    };
    let mut hearing = runtime.block_on(hear(&pf.fleet, &setup, timeouts))?;
    // The deadline as `faultline evacuate` would take it: from here, not after the closes.
    let heard_at = Instant::now();
    // Without a start to wait for, each source's task closes its connection and ends
    // (before any error below, so that no source keeps a connection until it idles out).
    hearing.starts.clear();
    let tasks = std::mem::take(&mut hearing.tasks);
    let endpoints = std::mem::take(&mut hearing.endpoints);
    runtime.block_on(async {
        for t in tasks {
            let _ = t.await;
        }
        let_closes_leave(endpoints).await;
    });
    hearing.check_any_answered()?;
    let answered = hearing.first.iter().flatten().count();
    let Hearing {
        fleet, unreachable, ..
    } = hearing;
    let mut opts = pf.options.clone();
    opts.deadline_s -= heard_at.duration_since(read_at).as_secs_f64();
    let o = Orchestration::with_policy(fleet, opts, &unreachable, policy)?;
    let names = |i: usize| o.fleet().vms[i].name.clone();
    Ok(LivePlan {
        asked,
        answered,
        unreachable: unreachable
            .iter()
            .map(|(i, w)| (names(*i), w.clone()))
            .collect(),
        plan: o.first_plan().clone(),
    })
}

/// How long a live plan waits for its control connections' closes to leave.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Waits, all together and at most [`CLOSE_TIMEOUT`], for the closes of `endpoints`'
/// connections to leave, so that each source learns at once that the orchestrator is gone
/// (and lifts a hold it left) rather than when the connection idles out. An endpoint whose
/// handshake never finished has nothing to say and only idles out.
pub(super) async fn let_closes_leave(endpoints: Vec<quinn::Endpoint>) {
    let closes: Vec<_> = endpoints
        .into_iter()
        .map(|e| tokio::spawn(async move { e.wait_idle().await }))
        .collect();
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        for c in closes {
            let _ = c.await;
        }
    })
    .await;
}

/// How many commands may wait for a source's task (a start and a few rate changes).
const COMMANDS_QUEUED: usize = 8;

/// The wildcard address of `peer`'s family, port 0: where a client endpoint binds.
fn unspecified_for(peer: std::net::SocketAddr) -> std::net::SocketAddr {
    match peer {
        std::net::SocketAddr::V4(_) => std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
        std::net::SocketAddr::V6(_) => std::net::SocketAddr::from(([0u16; 8], 0)),
    }
}
