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
    /// Between two events of a running evacuation (the source sends one every 250 ms), and
    /// for the answer to a rate limit before it is asked again.
    pub silence: Duration,
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
                // The start carries the limit in force when it is sent, and the source
                // has no evacuation to pace before it.
                Some(Command::SetRate(_)) => {}
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

/// How long after a rate limit the source did not confirm it is asked again; doubled
/// after each failure, up to [`RATE_RETRY_MAX`].
const RATE_RETRY_FIRST: Duration = Duration::from_millis(250);
const RATE_RETRY_MAX: Duration = Duration::from_secs(2);

/// Sends the rate limits that arrive on `caps`, one after the other, each until the source
/// confirms it (`ask`, given the request's place and the limit) or a newer one arrives:
/// only the newest matters. Without the retry, a limit lost on a path that stalled (when
/// the orchestrator changes them most: a stall takes a VM out of the link's sharing) kept
/// the source at the one before for the rest of its evacuation, a lift lost kept a VM held
/// at a twentieth of the link. Every request gets a new place, so a first copy that
/// arrives late cannot undo a newer one (see `Request::SetRate`). Returns when `caps`
/// closes.
async fn keep_rates<F, Fut>(vm: usize, caps: &mut mpsc::UnboundedReceiver<Option<u64>>, mut ask: F)
where
    F: FnMut(u64, Option<u64>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut seq = 0u64;
    let mut next = None;
    let mut wait = RATE_RETRY_FIRST;
    loop {
        let mut cap = match next.take() {
            Some(cap) => cap,
            None => match caps.recv().await {
                Some(cap) => cap,
                None => return,
            },
        };
        while let Ok(newer) = caps.try_recv() {
            cap = newer;
        }
        seq += 1;
        match ask(seq, cap).await {
            Ok(()) => {
                if wait > RATE_RETRY_FIRST {
                    tracing::info!(vm, ?cap, "the rate limit is set");
                }
                wait = RATE_RETRY_FIRST;
            }
            Err(e) => {
                tracing::warn!(vm, ?cap, "setting the rate limit, again in {wait:?}: {e:#}");
                tokio::select! {
                    newer = caps.recv() => match newer {
                        Some(newer) => next = Some(newer),
                        None => return,
                    },
                    _ = tokio::time::sleep(wait) => next = Some(cap),
                }
                wait = (wait * 2).min(RATE_RETRY_MAX);
            }
        }
    }
}

/// Asks the source to limit its evacuation's rate, on a stream of its own beside the
/// evacuation's events; `Ok` once it says that limit is in force. Bounded by `within`: a
/// source that does not answer must not hold up the limits after it.
async fn set_rate(
    conn: &quinn::Connection,
    seq: u64,
    cap: Option<u64>,
    within: Duration,
) -> anyhow::Result<()> {
    let ask = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        let req = Request::SetRate {
            rate_cap_bps: cap,
            seq: Some(seq),
        };
        write_msg(&mut send, &req).await?;
        let _ = send.finish();
        match read_msg::<Reply>(&mut recv).await? {
            Some(Reply::RateSet { rate_cap_bps }) if rate_cap_bps == cap => Ok(()),
            Some(other) => bail!("the source answered a rate limit with {other:?}"),
            None => bail!("the source ended the stream without an answer"),
        }
    };
    match tokio::time::timeout(within, ask).await {
        Ok(r) => r,
        Err(_) => Err(anyhow!(silent(within))),
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
    // Rate limits go out one after the other, beside the events, not in their way.
    let (rates, mut rates_rx) = mpsc::unbounded_channel::<Option<u64>>();
    let setter = {
        let conn = conn.clone();
        tokio::spawn(async move {
            keep_rates(vm, &mut rates_rx, |seq, cap| {
                set_rate(&conn, seq, cap, t.silence)
            })
            .await
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

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    /// What `keep_rates` asked, in order: (place, limit); `fails` says which answers fail.
    struct Source {
        asked: RefCell<Vec<(u64, Option<u64>)>>,
        fails: fn(u64, Option<u64>) -> bool,
    }

    impl Source {
        fn new(fails: fn(u64, Option<u64>) -> bool) -> Source {
            Source {
                asked: RefCell::new(Vec::new()),
                fails,
            }
        }

        async fn ask(&self, seq: u64, cap: Option<u64>) -> anyhow::Result<()> {
            self.asked.borrow_mut().push((seq, cap));
            // An unanswered ask takes a while to be given up on.
            tokio::time::sleep(Duration::from_millis(100)).await;
            if (self.fails)(seq, cap) {
                bail!("no answer");
            }
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_limit_the_source_did_not_confirm_is_asked_again_until_it_is() {
        let source = Source::new(|seq, _| seq <= 3);
        let (tx, mut rx) = mpsc::unbounded_channel();
        tx.send(None).unwrap();
        let keeper = keep_rates(0, &mut rx, |seq, cap| source.ask(seq, cap));
        let t0 = tokio::time::Instant::now();
        tokio::select! {
            _ = keeper => panic!("the channel is open"),
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
        // Each again with a place of its own, after 250, 500 and 1000 ms; then no more.
        assert_eq!(
            *source.asked.borrow(),
            [(1, None), (2, None), (3, None), (4, None)]
        );
        assert!(t0.elapsed() >= Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_newer_rate_limit_takes_the_place_of_one_still_unconfirmed() {
        // The source never confirms the hold; the lift goes through.
        let source = Source::new(|_, cap| cap.is_some());
        let (tx, mut rx) = mpsc::unbounded_channel();
        tx.send(Some(2_000_000)).unwrap();
        let keeper = keep_rates(0, &mut rx, |seq, cap| source.ask(seq, cap));
        let lift_later = async {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            tx.send(Some(5_000_000)).unwrap();
            tx.send(None).unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(tx);
        };
        tokio::join!(keeper, lift_later);
        // The hold at 0, 350 and 850 ms; the lift arrives during the third wait and goes
        // at once, the limit between skipped; nothing after it.
        assert_eq!(
            *source.asked.borrow(),
            [
                (1, Some(2_000_000)),
                (2, Some(2_000_000)),
                (3, Some(2_000_000)),
                (4, None)
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn confirmed_rate_limits_go_out_once_each_in_order() {
        let source = Source::new(|_, _| false);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let keeper = keep_rates(0, &mut rx, |seq, cap| source.ask(seq, cap));
        let send = async {
            for cap in [Some(1), None, Some(3)] {
                tx.send(cap).unwrap();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            drop(tx);
        };
        tokio::join!(keeper, send);
        assert_eq!(
            *source.asked.borrow(),
            [(1, Some(1)), (2, None), (3, Some(3))]
        );
    }
}
