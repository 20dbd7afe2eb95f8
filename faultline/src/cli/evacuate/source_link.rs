//! The orchestrator's side of one source's control endpoint: connect (pinned mutual TLS),
//! ask its status every second while it waits, and when told, ask it to evacuate and pass
//! its events on until it is done or failed. Everything it learns goes to the main loop
//! as a [`Report`]; a source that does not answer in time, refuses, or falls silent
//! mid-evacuation is reported, never waited for forever.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use fleet::control::{Reply, Request, Status};
use tokio::sync::mpsc;

use crate::cli::control_io::{read_msg, write_msg};

/// What a source's task tells the main loop.
#[derive(Debug)]
pub enum Report {
    /// Its status while it waits.
    Status(usize, Status),
    /// It could not be reached or refused us before anything started.
    Unreachable(usize, String),
    /// An event of its evacuation.
    Event(usize, Status),
    /// The control connection failed or fell silent after the start.
    Failed(usize, String),
}

/// What the main loop tells a source's task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Evacuate now, limited to this rate (bits per second; `None`: the source's own
    /// limit, usually none).
    Start { rate_cap_bps: Option<u64> },
    /// Change the evacuation's rate limit (`None` lifts it).
    SetRate(Option<u64>),
}

/// How long to wait for what.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Connecting and the first status.
    pub connect: Duration,
    /// Between two events of a running evacuation (the source sends one every 250 ms).
    pub silence: Duration,
    /// Without moving while it reports, before a VM is stalled (the orchestrator's, see
    /// `fleet::orchestrate::Orchestration::stalls`; the link only passes the events on).
    pub stall: Duration,
}

/// Runs one source's link until its evacuation ends, it fails, or `start` is dropped.
pub async fn run(
    vm: usize,
    addr: SocketAddr,
    endpoint: quinn::Endpoint,
    mut commands: mpsc::Receiver<Command>,
    out: mpsc::UnboundedSender<Report>,
    t: Timeouts,
) {
    let conn = match tokio::time::timeout(t.connect, first_status(&endpoint, addr)).await {
        Ok(Ok((conn, status))) => {
            // Over already (SIGUSR1, its timer): nothing to start; hang up so it can end.
            let over = status.evacuation.is_final();
            let _ = out.send(Report::Status(vm, status));
            if over {
                conn.close(0u32.into(), b"over");
                return;
            }
            conn
        }
        Ok(Err(e)) => {
            let _ = out.send(Report::Unreachable(
                vm,
                format!("the control endpoint at {addr} refused us: {e:#}"),
            ));
            return;
        }
        Err(_) => {
            let _ = out.send(Report::Unreachable(
                vm,
                format!(
                    "the control endpoint at {addr} did not answer within {} s",
                    t.connect.as_secs_f64()
                ),
            ));
            return;
        }
    };
    // Waiting: a status every second, until told to start.
    let cap = loop {
        tokio::select! {
            cmd = commands.recv() => match cmd {
                Some(Command::Start { rate_cap_bps }) => break rate_cap_bps,
                Some(Command::SetRate(cap)) => set_rate(&conn, vm, cap, t.silence).await,
                // Not to be started (`faultline plan --live`, or the orchestrator ends):
                // the source goes on waiting for another.
                None => {
                    conn.close(0u32.into(), b"not starting");
                    return;
                }
            },
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                match tokio::time::timeout(t.silence, status(&conn)).await {
                    Ok(Ok(s)) => {
                        // Evacuated or failed on its own (SIGUSR1, its timer): nothing to
                        // start; hanging up lets the source end.
                        let over = s.evacuation.is_final();
                        let _ = out.send(Report::Status(vm, s));
                        if over {
                            conn.close(0u32.into(), b"over");
                            return;
                        }
                    }
                    Ok(Err(e)) => {
                        let _ = out.send(Report::Failed(vm, format!("{e:#}")));
                        return;
                    }
                    Err(_) => {
                        let _ = out.send(Report::Failed(vm, silent(t.silence)));
                        return;
                    }
                }
            }
        }
    };
    match evacuate(vm, &conn, cap, commands, &out, t).await {
        Ok(()) => conn.close(0u32.into(), b"done"),
        Err(e) => {
            let _ = out.send(Report::Failed(vm, format!("{e:#}")));
            conn.close(fleet::control::CLOSE_GAVE_UP.into(), b"gave up");
        }
    }
}

fn silent(d: Duration) -> String {
    format!(
        "no answer from the source for {} s: it died or the path is down",
        d.as_secs_f64()
    )
}

/// The connection's own reason when it is gone (a refused certificate says so), else `e`.
fn explain(conn: &quinn::Connection, e: anyhow::Error) -> anyhow::Error {
    match conn.close_reason() {
        Some(reason) => anyhow::Error::new(transport::quic::DriverError::Connection(reason)),
        None => e,
    }
}

async fn first_status(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
) -> anyhow::Result<(quinn::Connection, Status)> {
    let conn = transport::quic::connect(endpoint, addr).await?;
    let s = status(&conn).await?;
    Ok((conn, s))
}

async fn status(conn: &quinn::Connection) -> anyhow::Result<Status> {
    let ask = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        write_msg(&mut send, &Request::Status).await?;
        let _ = send.finish();
        match read_msg::<Reply>(&mut recv).await? {
            Some(Reply::Status(s)) => Ok(s),
            Some(other) => bail!("the source answered a status request with {other:?}"),
            None => bail!("the source ended the stream without a status"),
        }
    };
    ask.await.map_err(|e| explain(conn, e))
}

/// Asks the source to limit its evacuation's rate (on a stream of its own, beside the
/// evacuation's events). A source that does not take it is logged: the evacuation goes on
/// at the limit it had (unpaced, or held), which costs the plan's order, not the VM.
async fn set_rate(conn: &quinn::Connection, vm: usize, cap: Option<u64>, within: Duration) {
    let ask = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        write_msg(&mut send, &Request::SetRate { rate_cap_bps: cap }).await?;
        let _ = send.finish();
        match read_msg::<Reply>(&mut recv).await? {
            Some(Reply::RateSet { rate_cap_bps }) if rate_cap_bps == cap => Ok(()),
            Some(other) => bail!("the source answered a rate limit with {other:?}"),
            None => bail!("the source ended the stream without an answer"),
        }
    };
    // Bounded: a source that never answers must not stall its link's status requests.
    let r = match tokio::time::timeout(within, ask).await {
        Ok(r) => r,
        Err(_) => Err(anyhow!(silent(within))),
    };
    if let Err(e) = r {
        tracing::warn!(vm, ?cap, "setting the rate limit: {e:#}");
    }
}

async fn evacuate(
    vm: usize,
    conn: &quinn::Connection,
    rate_cap_bps: Option<u64>,
    mut commands: mpsc::Receiver<Command>,
    out: &mpsc::UnboundedSender<Report>,
    t: Timeouts,
) -> anyhow::Result<()> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| explain(conn, e.into()))?;
    write_msg(&mut send, &Request::Evacuate { rate_cap_bps })
        .await
        .map_err(|e| explain(conn, e))?;
    let _ = send.finish();
    // Rate limits go out one after the other (a later one must not overtake an earlier
    // one), beside the events, not in their way.
    let (rates, mut rates_rx) = mpsc::unbounded_channel::<Option<u64>>();
    let setter = {
        let conn = conn.clone();
        tokio::spawn(async move {
            while let Some(cap) = rates_rx.recv().await {
                set_rate(&conn, vm, cap, t.silence).await;
            }
        })
    };
    let r = events(vm, conn, &mut recv, &mut commands, &rates, out, t).await;
    setter.abort();
    r
}

/// The evacuation's events until the last, passing rate limits on to `rates`.
async fn events(
    vm: usize,
    conn: &quinn::Connection,
    recv: &mut quinn::RecvStream,
    commands: &mut mpsc::Receiver<Command>,
    rates: &mpsc::UnboundedSender<Option<u64>>,
    out: &mpsc::UnboundedSender<Report>,
    t: Timeouts,
) -> anyhow::Result<()> {
    let mut commands_open = true;
    loop {
        let read = tokio::time::timeout(t.silence, read_msg::<Reply>(recv));
        tokio::pin!(read);
        let next = loop {
            tokio::select! {
                r = &mut read => break r,
                cmd = commands.recv(), if commands_open => match cmd {
                    Some(Command::SetRate(cap)) => {
                        let _ = rates.send(cap);
                    }
                    Some(Command::Start { .. }) => {}
                    None => commands_open = false,
                },
            }
        };
        let next = next
            .map_err(|_| anyhow!(silent(t.silence)))?
            .map_err(|e| explain(conn, e))
            .context("the control stream failed")?;
        match next {
            Some(Reply::Accepted { .. }) => {}
            Some(Reply::Refused { reason }) => bail!("the source refused to evacuate: {reason}"),
            Some(Reply::Event(s)) => {
                let last = s.evacuation.is_final();
                let _ = out.send(Report::Event(vm, s));
                if last {
                    return Ok(());
                }
            }
            Some(Reply::Status(_) | Reply::RateSet { .. }) => {
                bail!("the source sent {next:?} where an event belongs")
            }
            None => bail!("the source ended the control stream before its evacuation ended"),
        }
    }
}
