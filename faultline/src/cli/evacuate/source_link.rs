//! The orchestrator's side of one source's control endpoint: connect (pinned mutual TLS),
//! ask its status every second while it waits, and when told, ask it to evacuate and pass
//! its events on until it is done or failed. Everything it learns goes to the main loop
//! as a [`Report`]; a source that does not answer in time, refuses, or falls silent
//! mid-evacuation is reported, never waited for forever.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use fleet::control::{clean_text, within_own, Reply, Request, Status, RESET_EVENTS_UNREAD};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::cli::control_io::{read_msg, write_msg};

/// What a source's task tells the main loop.
#[derive(Debug)]
pub enum Report {
    /// Its status while it waits.
    Status(usize, Status),
    /// It could not be reached or refused us before anything started. This text, and
    /// `Failed`'s, may quote the source (its refusal, its connection's close): it is
    /// cleaned where it reaches the operator (the hearing, `fail`), not here.
    Unreachable(usize, String),
    /// An event of its evacuation.
    Event(usize, Status),
    /// The control connection failed or fell silent after the start.
    Failed(usize, String),
    /// What became of a rate limit the source did not confirm at once.
    Rate(usize, RateNews),
}

/// What became of a rate limit that took more than one ask.
#[derive(Clone, Debug, PartialEq)]
pub enum RateNews {
    /// Its first ask went unconfirmed; it is asked again (unless the source is of a release
    /// that must not be: see [`keep_rates`]).
    Unconfirmed {
        rate_cap_bps: Option<u64>,
        error: String,
    },
    /// Set after it went unconfirmed, at the `asks`th ask.
    Set {
        rate_cap_bps: Option<u64>,
        asks: u32,
    },
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
    let (conn, own) = match tokio::time::timeout(t.connect, first_status(&endpoint, addr)).await {
        Ok(Ok((conn, status))) => {
            // Over already (SIGUSR1, its timer): nothing to start; hang up so it can end.
            let over = status.evacuation.is_final();
            let own = status.own_rate_cap();
            let _ = out.send(Report::Status(vm, status));
            if over {
                conn.close(0u32.into(), b"over");
                return;
            }
            (conn, own)
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
    match evacuate(vm, &conn, within_own(cap, own), own, commands, &out, t).await {
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
        // Closed by the source on purpose: its reason says why (too many connections), or
        // code 0: its process is ending.
        Some(quinn::ConnectionError::ApplicationClosed(c)) if c.error_code == 0u32.into() => {
            anyhow!("the source shut its control endpoint down: {c}")
        }
        Some(quinn::ConnectionError::ApplicationClosed(c)) => {
            anyhow!("the source closed the connection: {c}")
        }
        Some(reason) => anyhow::Error::new(transport::quic::DriverError::Connection(reason)),
        None => reset_by_source(&e).unwrap_or(e),
    }
}

/// A stream the source reset, in words, where its code says why.
fn reset_by_source(e: &anyhow::Error) -> Option<anyhow::Error> {
    match e.downcast_ref::<quinn::ReadExactError>()? {
        quinn::ReadExactError::ReadError(quinn::ReadError::Reset(code))
            if *code == RESET_EVENTS_UNREAD.into() =>
        {
            Some(anyhow!(
                "the source stopped sending its events: we had read none of them for too long \
                 (stream reset, code {code})"
            ))
        }
        _ => None,
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
/// after each failure, up to [`RATE_RETRY_MAX`], and back to this for a new limit.
const RATE_RETRY_FIRST: Duration = Duration::from_millis(250);
const RATE_RETRY_MAX: Duration = Duration::from_secs(2);

/// Whether a source checks the places of the rate limits it is sent (`Request::SetRate`'s
/// `seq`), as its answers showed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Places {
    /// No answer yet.
    Unknown,
    /// It echoes them: it applies none older than one it applied.
    Checked,
    /// A release before places: it applies every copy as it arrives.
    Ignored,
}

/// Sends the rate limits that arrive on `caps`, the newest only, each until the source
/// confirms it (`ask`, given the request's place and the limit: `Ok(true)` if the answer
/// echoed the place) or a newer one arrives. Without the retry, a limit lost on a path
/// that stalled (when the orchestrator changes them most: a stall takes a VM out of the
/// link's sharing) kept the source at the one before for the rest of its evacuation; a lift
/// lost kept a VM held at a twentieth of the link. Every request gets a new place, so a
/// first copy that arrives late cannot undo a newer one at a source that checks places; a
/// newer limit overtakes one still being asked only there, since a request given up on
/// still reaches the source. A source whose answer showed it ignores places is not asked
/// again. What became of a limit not confirmed at once goes to `tell`. Returns when `caps`
/// closes.
async fn keep_rates<F, Fut>(
    vm: usize,
    caps: &mut mpsc::UnboundedReceiver<Option<u64>>,
    mut ask: F,
    mut tell: impl FnMut(RateNews),
) where
    F: FnMut(u64, Option<u64>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let mut seq = 0u64;
    let mut places = Places::Unknown;
    let Some(mut cap) = caps.recv().await else {
        return;
    };
    loop {
        cap = newest(caps, cap);
        let (mut wait, mut asks) = (RATE_RETRY_FIRST, 0u32);
        // This limit's asks, until it is set (then the next limit), given up on, or a newer
        // one arrives; `None`: `caps` closed.
        let next = loop {
            asks = asks.saturating_add(1);
            seq += 1;
            let answer = if places == Places::Checked {
                match or_newer(caps, ask(seq, cap)).await {
                    Raced::Done(answer) => answer,
                    Raced::Newer(next) => break next,
                }
            } else {
                ask(seq, cap).await
            };
            match answer {
                Ok(echoed) => {
                    places = if echoed {
                        Places::Checked
                    } else {
                        Places::Ignored
                    };
                    if asks > 1 {
                        tracing::info!(vm, ?cap, asks, "the rate limit is set");
                        tell(RateNews::Set {
                            rate_cap_bps: cap,
                            asks,
                        });
                    }
                    break caps.recv().await;
                }
                Err(e) => {
                    let again = places != Places::Ignored;
                    // Logged and told here, not failed: the one place this text leaves
                    // without `fail`'s or the hearing's cleaning.
                    let error = clean_text(&format!("{e:#}"));
                    if asks == 1 {
                        tracing::warn!(vm, ?cap, again, "setting the rate limit: {error}");
                        tell(RateNews::Unconfirmed {
                            rate_cap_bps: cap,
                            error,
                        });
                    } else {
                        tracing::debug!(vm, ?cap, asks, "setting the rate limit: {error}");
                    }
                    if !again {
                        break caps.recv().await;
                    }
                    if let Raced::Newer(next) = or_newer(caps, tokio::time::sleep(wait)).await {
                        break next;
                    }
                    wait = (wait * 2).min(RATE_RETRY_MAX);
                }
            }
        };
        match next {
            Some(next) => cap = next,
            None => return,
        }
    }
}

/// The newest of `cap` and the limits queued behind it.
fn newest(caps: &mut mpsc::UnboundedReceiver<Option<u64>>, mut cap: Option<u64>) -> Option<u64> {
    while let Ok(newer) = caps.try_recv() {
        cap = newer;
    }
    cap
}

/// What came first: `T`, or a newer limit (`None`: the channel closed).
enum Raced<T> {
    Done(T),
    Newer(Option<Option<u64>>),
}

async fn or_newer<T>(
    caps: &mut mpsc::UnboundedReceiver<Option<u64>>,
    fut: impl std::future::Future<Output = T>,
) -> Raced<T> {
    tokio::select! {
        done = fut => Raced::Done(done),
        newer = caps.recv() => Raced::Newer(newer),
    }
}

/// Asks the source to limit its evacuation's rate, on a stream of its own beside the
/// evacuation's events; `Ok` once it says that limit is in force, `Ok(true)` if its answer
/// echoed the place (it checks them). Bounded by `within`: a source that does not answer
/// must not hold up the limits after it.
async fn set_rate(
    conn: &quinn::Connection,
    seq: u64,
    cap: Option<u64>,
    within: Duration,
) -> anyhow::Result<bool> {
    let ask = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        let req = Request::SetRate {
            rate_cap_bps: cap,
            seq: Some(seq),
        };
        write_msg(&mut send, &req).await?;
        let _ = send.finish();
        match read_msg::<Reply>(&mut recv).await? {
            Some(Reply::RateSet {
                rate_cap_bps,
                seq: echoed,
            }) if rate_cap_bps == cap => Ok(echoed == Some(seq)),
            Some(other) => bail!("the source answered a rate limit with {other:?}"),
            None => bail!("the source ended the stream without an answer"),
        }
    };
    match tokio::time::timeout(within, ask).await {
        Ok(r) => r.map_err(|e| explain(conn, e)),
        Err(_) => Err(anyhow!(silent(within))),
    }
}

async fn evacuate(
    vm: usize,
    conn: &quinn::Connection,
    rate_cap_bps: Option<u64>,
    own: Option<u64>,
    mut commands: mpsc::Receiver<Command>,
    out: &mpsc::UnboundedSender<Report>,
    t: Timeouts,
) -> anyhow::Result<()> {
    // Within the silence timeout: a source that withholds stream credit while its
    // keep-alives hold the connection up would otherwise keep the VM starting for good.
    let ask = async {
        let (mut send, recv) = conn.open_bi().await?;
        write_msg(&mut send, &Request::Evacuate { rate_cap_bps }).await?;
        let _ = send.finish();
        anyhow::Ok(recv)
    };
    let mut recv = match tokio::time::timeout(t.silence, ask).await {
        Ok(r) => r.map_err(|e| explain(conn, e))?,
        Err(_) => bail!(silent(t.silence)),
    };
    // Rate limits go out one after the other, beside the events, not in their way.
    let (rates, mut rates_rx) = mpsc::unbounded_channel::<Option<u64>>();
    let setter = {
        let (conn, out) = (conn.clone(), out.clone());
        tokio::spawn(async move {
            keep_rates(
                vm,
                &mut rates_rx,
                |seq, cap| set_rate(&conn, seq, within_own(cap, own), t.silence),
                |news| {
                    let _ = out.send(Report::Rate(vm, news));
                },
            )
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
    let mut gate = EventGate::default();
    loop {
        let read = tokio::time::timeout(t.silence, read_msg::<Reply>(recv));
        tokio::pin!(read);
        let next = loop {
            let flush_at = gate.flush_at();
            tokio::select! {
                r = &mut read => break r,
                _ = tokio::time::sleep_until(flush_at.unwrap_or_else(Instant::now)),
                    if flush_at.is_some() =>
                {
                    if let Some(s) = gate.flush(Instant::now()) {
                        let _ = out.send(Report::Event(vm, s));
                    }
                }
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
            Some(Reply::Refused { reason }) => {
                bail!("the source refused to evacuate: {reason}")
            }
            Some(Reply::Event(s)) if s.evacuation.is_final() => {
                // What was held back is superseded by it.
                let _ = out.send(Report::Event(vm, s));
                return Ok(());
            }
            Some(Reply::Event(s)) => {
                if let Some(s) = gate.offer(Instant::now(), s) {
                    let _ = out.send(Report::Event(vm, s));
                }
            }
            Some(Reply::Status(_) | Reply::RateSet { .. }) => {
                bail!("the source sent {next:?} where an event belongs")
            }
            None => bail!("the source ended the control stream before its evacuation ended"),
        }
    }
}

/// The least time between two of one source's events passed on, unless the later one
/// changes what the orchestrator acts on at once.
const MIN_EVENT_GAP: Duration = Duration::from_millis(20);

/// One source's events as its link passes them to the orchestrator's loop, whose queue
/// every VM shares: one that takes its evacuation further than any before (Starting,
/// Transferring), or is the first to say its last pages have left, at once; others at
/// most one per [`MIN_EVENT_GAP`], the latest (those between are superseded), so that a
/// source sending events back to back (a fault: it sends one every 250 ms and at its
/// changes), or flipping its state back and forth, cannot fill the queue or keep the loop
/// from the other VMs.
#[derive(Default)]
struct EventGate {
    /// When the last event went on.
    last_at: Option<Instant>,
    /// The furthest state passed on ([`stage`]).
    furthest: u8,
    /// An event with no pages left was passed on.
    told_nothing_left: bool,
    /// The latest held back, and when it came.
    pending: Option<(Instant, Status)>,
}

/// How far along an evacuation in `state` is.
fn stage(state: fleet::control::EvacState) -> u8 {
    use fleet::control::EvacState::*;
    match state {
        Idle => 0,
        Starting => 1,
        Transferring => 2,
        Done | Failed => 3,
    }
}

impl EventGate {
    /// Event `s` came at `now`: what to pass on now.
    fn offer(&mut self, now: Instant, s: Status) -> Option<Status> {
        let urgent = stage(s.evacuation) > self.furthest
            || (s.pages_remaining == Some(0) && !self.told_nothing_left);
        let due = self
            .last_at
            .is_none_or(|at| now.saturating_duration_since(at) >= MIN_EVENT_GAP);
        if urgent || due {
            self.pending = None;
            Some(self.pass(now, s))
        } else {
            self.pending = Some((now, s));
            None
        }
    }

    /// When the event held back is due.
    fn flush_at(&self) -> Option<Instant> {
        let at = self.last_at?;
        self.pending.as_ref().map(|_| at + MIN_EVENT_GAP)
    }

    /// The event held back, to pass on at `now` (its time come): its progress as old as
    /// it now is.
    fn flush(&mut self, now: Instant) -> Option<Status> {
        let (came, mut s) = self.pending.take()?;
        let held = now.saturating_duration_since(came).as_millis();
        let held = u64::try_from(held).unwrap_or(u64::MAX);
        s.progress_age_ms = s.progress_age_ms.map(|a| a.saturating_add(held));
        Some(self.pass(now, s))
    }

    fn pass(&mut self, now: Instant, s: Status) -> Status {
        self.last_at = Some(now);
        self.furthest = self.furthest.max(stage(s.evacuation));
        self.told_nothing_left |= s.pages_remaining == Some(0);
        s
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    /// How a stand-in source answers a rate limit: after how long, and whether it sets
    /// it (`Some(places)`: it checks places) or not (`None`).
    type Answer = fn(u64, Option<u64>) -> (u64, Option<bool>);

    /// What `keep_rates` asked, in order: (ms since the start, place, limit); and what it
    /// told.
    struct Source {
        t0: tokio::time::Instant,
        asked: RefCell<Vec<(u64, u64, Option<u64>)>>,
        news: RefCell<Vec<RateNews>>,
        answer: Answer,
    }

    impl Source {
        fn new(answer: Answer) -> Source {
            Source {
                t0: tokio::time::Instant::now(),
                asked: RefCell::new(Vec::new()),
                news: RefCell::new(Vec::new()),
                answer,
            }
        }

        async fn ask(&self, seq: u64, cap: Option<u64>) -> anyhow::Result<bool> {
            let ms = self.t0.elapsed().as_millis() as u64;
            self.asked.borrow_mut().push((ms, seq, cap));
            let (after_ms, set) = (self.answer)(seq, cap);
            tokio::time::sleep(Duration::from_millis(after_ms)).await;
            set.ok_or_else(|| anyhow!("no answer"))
        }

        /// Runs `keep_rates` on the limits `sent` (ms since the start, limit) until
        /// `end_ms`.
        async fn run(&self, sent: &[(u64, Option<u64>)], end_ms: u64) {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let keeper = keep_rates(
                0,
                &mut rx,
                |seq, cap| self.ask(seq, cap),
                |news| self.news.borrow_mut().push(news),
            );
            let send = async {
                for &(at, cap) in sent {
                    tokio::time::sleep_until(self.t0 + Duration::from_millis(at)).await;
                    tx.send(cap).unwrap();
                }
                tokio::time::sleep_until(self.t0 + Duration::from_millis(end_ms)).await;
                drop(tx);
            };
            tokio::join!(keeper, send);
        }

        fn asked(&self) -> Vec<(u64, u64, Option<u64>)> {
            self.asked.borrow().clone()
        }

        fn news(&self) -> Vec<RateNews> {
            self.news.borrow().clone()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_limit_the_source_did_not_confirm_is_asked_again_until_it_is() {
        // Each ask takes 100 ms to be given up on; the seventh is answered.
        let source = Source::new(|seq, _| (100, (seq >= 7).then_some(true)));
        source.run(&[(0, None)], 30_000).await;
        // Again after 250 ms, doubling to 2 s, each with a place of its own; then no more.
        let at = |ms, seq| (ms, seq, None);
        assert_eq!(
            source.asked(),
            [
                at(0, 1),
                at(350, 2),
                at(950, 3),
                at(2050, 4),
                at(4150, 5),
                at(6250, 6),
                at(8350, 7)
            ]
        );
        // Told once when it went unconfirmed, once when it was set.
        let error = "no answer".to_string();
        assert_eq!(
            source.news(),
            [
                RateNews::Unconfirmed {
                    rate_cap_bps: None,
                    error
                },
                RateNews::Set {
                    rate_cap_bps: None,
                    asks: 7
                }
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_newer_rate_limit_takes_the_place_of_one_still_asked_once_the_source_checks_places() {
        // The source sets 7 and a lift at once (its answers echo the place), and gives no
        // answer to a hold for 5 s.
        let source = Source::new(|_, cap| match cap {
            Some(2 | 5) => (5000, None),
            _ => (0, Some(true)),
        });
        // A hold, then, while it is asked, a second hold and a lift together: the lift
        // goes at once, alone, the hold between never.
        source
            .run(
                &[(0, Some(7)), (100, Some(2)), (1000, Some(5)), (1000, None)],
                30_000,
            )
            .await;
        assert_eq!(
            source.asked(),
            [(0, 1, Some(7)), (100, 2, Some(2)), (1000, 3, None)]
        );
        // Overtaken, not unconfirmed: nothing to tell.
        assert_eq!(source.news(), []);
    }

    #[tokio::test(start_paused = true)]
    async fn until_a_source_shows_it_checks_places_a_limit_being_asked_is_waited_for() {
        // Given up on, a request still reaches the source, which might apply it after the
        // newer one if it does not check places.
        let source = Source::new(|_, cap| match cap {
            Some(_) => (5000, None),
            None => (0, Some(true)),
        });
        source.run(&[(0, Some(2)), (1000, None)], 30_000).await;
        assert_eq!(source.asked(), [(0, 1, Some(2)), (5000, 2, None)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_newer_rate_limit_replaces_one_waiting_to_be_asked_again() {
        // No answer but to 9, each given up on after 100 ms: the second limit arrives
        // while the first is asked (it waits for that ask), the third during a wait (it
        // goes at once); the second is asked again after 250 ms, not the first's 1 s.
        let source = Source::new(|_, cap| (100, (cap == Some(9)).then_some(true)));
        source
            .run(&[(0, Some(1)), (1000, Some(2)), (1600, Some(9))], 30_000)
            .await;
        assert_eq!(
            source.asked(),
            [
                (0, 1, Some(1)),
                (350, 2, Some(1)),
                (950, 3, Some(1)),
                (1050, 4, Some(2)),
                (1400, 5, Some(2)),
                (1600, 6, Some(9))
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn confirmed_rate_limits_go_out_once_each_in_order() {
        let source = Source::new(|_, _| (10, Some(true)));
        source
            .run(&[(0, Some(1)), (1000, None), (2000, Some(3))], 5000)
            .await;
        assert_eq!(
            source.asked(),
            [(0, 1, Some(1)), (1000, 2, None), (2000, 3, Some(3))]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_that_does_not_check_places_is_not_asked_again() {
        // It answered the first without a place, and gives no answer to the second.
        let source = Source::new(|seq, _| (100, (seq == 1).then_some(false)));
        source.run(&[(0, Some(1)), (1000, Some(2))], 30_000).await;
        assert_eq!(source.asked(), [(0, 1, Some(1)), (1000, 2, Some(2))]);
        assert_eq!(
            source.news(),
            [RateNews::Unconfirmed {
                rate_cap_bps: Some(2),
                error: "no answer".into()
            }]
        );
    }

    /// An events stream the source reset because we stopped reading is reported as that;
    /// another reset keeps quinn's words.
    #[test]
    fn an_events_stream_reset_for_going_unread_is_reported_as_that() {
        let reset = |code: u32| {
            let e = quinn::ReadExactError::ReadError(quinn::ReadError::Reset(code.into()));
            Err::<(), _>(e)
                .context("reading a control frame")
                .unwrap_err()
        };
        assert_eq!(
            reset_by_source(&reset(RESET_EVENTS_UNREAD))
                .unwrap()
                .to_string(),
            "the source stopped sending its events: we had read none of them for too long \
             (stream reset, code 1)"
        );
        assert!(reset_by_source(&reset(0)).is_none());
    }

    /// A source that already has as many control connections as it keeps: the link says
    /// so, in the source's words, once.
    #[test]
    fn a_source_with_too_many_connections_is_reported_in_its_words() {
        use fleet::control::MAX_CONTROL_CONNECTIONS;
        let source = crate::cli::control_server::TestEndpoint::start(None);
        let addr = source.server.local_addr();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let report = rt.block_on(async {
            let ep = source.orchestrator();
            let mut open = Vec::new();
            for _ in 0..MAX_CONTROL_CONNECTIONS {
                let conn = transport::quic::connect(&ep, addr).await.unwrap();
                // Answered: counted by the source.
                status(&conn).await.unwrap();
                open.push(conn);
            }
            let (_commands, commands_rx) = mpsc::channel(8);
            let (out, mut reports) = mpsc::unbounded_channel();
            let t = Timeouts {
                connect: Duration::from_secs(20),
                silence: Duration::from_secs(5),
            };
            let link = tokio::time::timeout(
                Duration::from_secs(30),
                run(0, addr, ep.clone(), commands_rx, out, t),
            );
            link.await.expect("the link went on");
            for conn in &open {
                conn.close(0u32.into(), b"done");
            }
            ep.wait_idle().await;
            reports.recv().await
        });
        source.server.finish();
        match report {
            Some(Report::Unreachable(0, why)) => assert_eq!(
                why,
                format!(
                    "the control endpoint at {addr} refused us: the source closed the \
                     connection: too many control connections open to this source (code 3)"
                )
            ),
            other => panic!("{other:?}"),
        }
    }

    /// The orchestrator's link to a real control endpoint whose source has a limit of its
    /// own of 10 Mbit/s: the limits the source takes as the orchestrator sends its own.
    #[test]
    fn the_link_keeps_the_orchestrators_limits_within_the_sources_own() {
        let source = crate::cli::control_server::TestEndpoint::start(Some(10_000_000));
        let limit = source.limit.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let ep = source.orchestrator();
            let (commands, commands_rx) = mpsc::channel(8);
            let (out, mut reports) = mpsc::unbounded_channel();
            let t = Timeouts {
                connect: Duration::from_secs(5),
                silence: Duration::from_secs(5),
            };
            let link = tokio::spawn(run(
                0,
                source.server.local_addr(),
                ep.clone(),
                commands_rx,
                out,
                t,
            ));
            match reports.recv().await {
                Some(Report::Status(0, s)) => assert_eq!(s.own_rate_cap_bps, Some(10_000_000)),
                other => panic!("{other:?}"),
            }
            let becomes = |want: Option<u64>| {
                let limit = limit.clone();
                async move {
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                    while limit.get() != want {
                        assert!(
                            tokio::time::Instant::now() < deadline,
                            "the limit is {:?}, not {want:?}",
                            limit.get()
                        );
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            };
            let steps = [
                (
                    Command::Start {
                        rate_cap_bps: Some(2_000_000),
                    },
                    Some(2_000_000),
                ),
                // Above its own: its own.
                (Command::SetRate(Some(50_000_000)), Some(10_000_000)),
                (Command::SetRate(Some(3_000_000)), Some(3_000_000)),
                // Lifted: back to its own, not to none.
                (Command::SetRate(None), Some(10_000_000)),
            ];
            for (command, want) in steps {
                commands.send(command).await.unwrap();
                becomes(want).await;
            }
            link.abort();
            ep.close(0u32.into(), b"test");
            ep.wait_idle().await;
        });
        source.server.finish();
    }

    #[test]
    fn a_source_sending_events_back_to_back_is_passed_on_at_most_every_gap() {
        use fleet::control::EvacState;
        let at = |state: EvacState, left: u64| Status {
            evacuation: state,
            pages_remaining: Some(left),
            ..crate::cli::replica::idle_status_of("vm", 1 << 20)
        };
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        let mut gate = EventGate::default();
        let first = gate.offer(ms(0), at(EvacState::Starting, 9));
        assert!(first.is_some(), "the first");
        // A change of state goes on at once.
        assert!(gate.offer(ms(1), at(EvacState::Transferring, 9)).is_some());
        // A flood: held back, the latest kept, due a gap after the last passed on.
        for i in 2..10 {
            let mut s = at(EvacState::Transferring, 100 - i);
            s.progress_age_ms = Some(5);
            assert!(gate.offer(ms(i), s).is_none());
        }
        assert_eq!(gate.flush_at(), Some(ms(1) + MIN_EVENT_GAP));
        let held = gate.flush(ms(21)).unwrap();
        assert_eq!(held.pages_remaining, Some(91));
        assert_eq!(
            held.progress_age_ms,
            Some(5 + 12),
            "dated by the time held too"
        );
        assert_eq!((gate.flush_at(), gate.flush(ms(22))), (None, None));
        // Flipping back and forth is not news: held like the rest.
        assert!(
            gate.offer(ms(41), at(EvacState::Starting, 9)).is_some(),
            "due"
        );
        assert!(gate.offer(ms(42), at(EvacState::Transferring, 9)).is_none());
        assert!(gate.offer(ms(43), at(EvacState::Starting, 9)).is_none());
        // The first with nothing left goes on at once; its repeats do not.
        assert!(gate.offer(ms(44), at(EvacState::Transferring, 0)).is_some());
        assert!(gate.offer(ms(45), at(EvacState::Transferring, 0)).is_none());
        // A periodic event, a gap after the last, goes on and drops the one held.
        assert!(gate
            .offer(ms(300), at(EvacState::Transferring, 0))
            .is_some());
        assert_eq!(gate.flush_at(), None);
    }
}
