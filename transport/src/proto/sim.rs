//! A deterministic simulation of whole sessions over a network that breaks.
//!
//! Two endpoints (the source and destination state machines with the little a driver adds:
//! a push loop, demand replies, a guest that faults, page installation) exchange their
//! messages through the real codec over a simulated network with virtual time and a seeded
//! random generator. Each connection carries the three channels as ordered streams with
//! random delays. The network cuts connections (everything in flight is lost, each side
//! notices after its own delay), keeps the link down for a random time (microseconds to
//! minutes of virtual time), then reconnects; both sides resume. Some messages in flight at
//! a cut are delivered anyway after the reconnect, as a reader task of the dead connection
//! that lost the race would: they must be ignored.
//!
//! A few cuts also crash the destination process (migrations with VM state and evacuations
//! only, see [`Sim::crash_dest`]): its session, memory, guest and vCPUs are gone, and a
//! fresh process with the same configuration takes the next connection (at evacuation
//! from the standby's replica on disk). Half of the crashes leave the link up: what the
//! dead process had sent still reaches the source, which notices the loss only after it.
//!
//! Checked for every seed: the destination ends with every page byte for byte equal to the
//! source's memory; every page is installed once; every demand fault is served; pages the
//! destination said it holds are never sent again on that connection; both sessions
//! complete; and at no point may the VM run on both hosts (the source still owning it while
//! the destination may run the guest). After a crash those checks apply to the restarted
//! destination if the source still owned the VM when it reconnected to it. If it had handed
//! the VM over, the VM is lost and must be reported, never started over from the source's
//! memory: the restarted destination refuses the session (`NotHeld`), never lets the guest
//! run and takes no page; the source fails on the refusal (`ResumeRefused`) and keeps
//! `Ownership::Destination`. A source that finished on a late `Complete` of the crashed
//! destination does not come back.
//!
//! `FAULTLINE_SIM_SEEDS=N` runs N seeds (10,000 by default); `FAULTLINE_SIM_SEED=N` runs
//! only seed N and prints its trace.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::ops::Range;

use super::*;
use crate::bitmap::Bitmap;
use crate::codec::{decode, encode_to_vec};
use crate::message::{PageRef, Pages, SessionKind, PAGE_SIZE};

/// splitmix64: small, fast and good enough to drive a simulation.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn range(&mut self, r: Range<u64>) -> u64 {
        r.start + self.below(r.end - r.start)
    }
    /// True with probability `per_mille`/1000.
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    ToDest,
    ToSource,
}

#[derive(Debug)]
struct Packet {
    conn: usize,
    dir: Dir,
    channel: Channel,
    bytes: Vec<u8>,
    /// In flight at its connection's cut, delivered late all the same.
    zombie: bool,
}

#[derive(Debug)]
enum Ev {
    Deliver(Packet),
    Cut,
    Detect {
        conn: usize,
        dir: Dir,
    },
    Reconnect,
    PushTick,
    /// vCPU `i` of the destination process `gen` (see [`Sim::dst_gen`]) runs until it
    /// touches a page that is not here.
    Fault(usize, u32),
}

struct Conn {
    alive: bool,
    /// Each side's number for the connection, fed to `handle_in`.
    src_no: u32,
    dst_no: u32,
    /// Last delivery time per direction and channel: streams are ordered.
    last: [[u64; 4]; 2],
    /// After the cut: a stream lost a message, so nothing after it can be read either.
    broken: [[bool; 4]; 2],
    /// The destination process at its end ([`Sim::dst_gen`]): messages for an earlier one
    /// died with it.
    dst_gen: u32,
    /// The destination crashed at the cut and what it had sent still arrives.
    sent_arrives: bool,
}

fn chan_index(c: Channel) -> usize {
    match c {
        Channel::Control => 0,
        Channel::Urgent => 1,
        Channel::Bulk => 2,
        Channel::Echo => 3,
    }
}

/// What a seed did, summed over the run.
#[derive(Default, Debug, Clone, Copy)]
struct Tally {
    cuts: u64,
    pauses: u64,
    resumes: u64,
    restarts: u64,
    pages_resent: u64,
    duplicates: u64,
    ignored: u64,
    zombies: u64,
    faults: u64,
    /// Destination processes that crashed (a fresh one took the next connection). Each
    /// ends in one of the three counts that follow.
    crashes: u64,
    /// Crashes after which the source still owned the VM when it reconnected: the
    /// restarted destination took the session over (and must complete it).
    crashes_taken_over: u64,
    /// Crashes after which the source finished on a late `Complete` of the crashed
    /// destination, before it noticed the crash: it does not come back.
    finished_before_noticed: u64,
    /// Crashes after the source handed the VM over: the VM is lost, reported as such.
    vms_lost: u64,
    /// Of those, crashes of a destination that had not let the guest run yet (its
    /// `VmState` or stale set had not arrived): the source cannot tell, and counts what it
    /// queued as sent.
    vms_lost_unrun: u64,
    /// Of those, crashes before the source queued the hand-over, which it queued afterwards
    /// on a late answer of the crashed destination.
    handed_over_after_crash: u64,
    /// Requested pages the source left to the push ([`SourceStats::pages_on_their_way`]).
    on_their_way: u64,
    virtual_us: u64,
}

impl std::ops::AddAssign for Tally {
    fn add_assign(&mut self, o: Tally) {
        self.cuts += o.cuts;
        self.pauses += o.pauses;
        self.resumes += o.resumes;
        self.restarts += o.restarts;
        self.pages_resent += o.pages_resent;
        self.duplicates += o.duplicates;
        self.ignored += o.ignored;
        self.zombies += o.zombies;
        self.faults += o.faults;
        self.crashes += o.crashes;
        self.crashes_taken_over += o.crashes_taken_over;
        self.finished_before_noticed += o.finished_before_noticed;
        self.vms_lost += o.vms_lost;
        self.vms_lost_unrun += o.vms_lost_unrun;
        self.on_their_way += o.on_their_way;
        self.handed_over_after_crash += o.handed_over_after_crash;
        self.virtual_us = self.virtual_us.max(o.virtual_us);
    }
}

struct Sim {
    rng: Rng,
    trace: bool,
    now: u64,
    seq: u64,
    queue: BinaryHeap<(Reverse<u64>, Reverse<u64>)>,
    events: HashMap<u64, Ev>,
    conns: Vec<Conn>,
    /// The connection the network currently carries, if any.
    current: Option<usize>,
    latency: u64,
    jitter: u64,
    cuts_left: u32,
    cut_window: u64,
    pages: u64,
    src: SourceSession,
    dst: DestSession,
    src_conn: usize,
    dst_conn: usize,
    /// The source's memory (constant: the VM is paused at the source).
    src_mem: Vec<u8>,
    /// The destination's memory and which of its pages are present.
    dst_mem: Vec<u8>,
    present: Bitmap,
    installs: Vec<u8>,
    /// Evacuation: what the standby reports invalid when asked.
    invalid: Bitmap,
    /// Pages that arrived before the destination ran: the driver holds them until it does.
    held_early: VecDeque<(u32, Channel, Message)>,
    /// The held set each `Resume` announced, by the destination's connection number.
    held_sent: HashMap<u32, Bitmap>,
    /// Per vCPU: the page it waits for.
    vcpus: Vec<Option<u64>>,
    guest_running: bool,
    tick_pending: bool,
    push_run: u64,
    tally: Tally,
    /// Destination crashes: drawn from a generator of their own, so that a seed without a
    /// crash runs exactly as it did before crashes were simulated.
    crash_rng: Rng,
    /// Whether this session may see destination crashes (see [`Sim::crash_dest`]).
    crashable: bool,
    /// What a restarted destination process is set up with.
    dst_config: DestConfig,
    /// At evacuation: the pages the standby's replica on disk holds fresh (the source's
    /// content; the others hold something else) as the seed began. A restarted standby
    /// starts from that replica again.
    replica: Option<Bitmap>,
    /// The destination process: 0, then one more for each restart.
    dst_gen: u32,
    /// Whether the current destination process had a connection yet (its first one is
    /// number 0, without `resume()`).
    dst_connected: bool,
    /// The last crash, if any.
    crash: Option<Crash>,
    /// The source reconnected to a restarted destination after handing the VM over: the
    /// VM is lost, and the session must end reporting it.
    lost: bool,
    /// A restarted destination refused the source's `Hello` (`NotHeld`).
    refused: bool,
    /// The source failed on that refusal (`ResumeRefused`).
    src_refused: bool,
    /// The source finished on a late `Complete` of a crashed destination and did not
    /// reconnect (its driver ended).
    ended_at_source: bool,
}

/// What the source and the destination were at a crash.
#[derive(Clone, Copy, Debug)]
struct Crash {
    /// The source's ownership at the crash.
    owner: Ownership,
    /// The crashed destination had sent `Complete` (it held every page).
    complete_sent: bool,
    /// The crashed destination could let the guest run.
    ran: bool,
}

/// Per mille of cuts that also crash the destination, where a crash may be simulated.
const CRASH_PER_MILLE: u64 = 30;

type Res<T> = Result<T, String>;

macro_rules! ensure {
    ($c:expr, $($fmt:tt)*) => {
        if !$c {
            return Err(format!($($fmt)*));
        }
    };
}

fn page_content(seed: u64, p: u64, out: &mut [u8]) {
    let h = seed
        .wrapping_mul(31)
        .wrapping_add(p)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    if h.is_multiple_of(10) {
        out.fill(0);
    } else {
        out.fill((h >> 8) as u8 | 1);
        out[..8].copy_from_slice(&p.to_le_bytes());
        out[PAGE_SIZE - 8..].copy_from_slice(&seed.to_le_bytes());
    }
}

/// The standby's replica at evacuation: the source's content for every page it holds fresh;
/// stale and invalid pages hold something else.
fn fill_replica(src_mem: &[u8], fresh: &Bitmap, out: &mut [u8]) {
    for (p, (page, src)) in out
        .chunks_exact_mut(PAGE_SIZE)
        .zip(src_mem.chunks_exact(PAGE_SIZE))
        .enumerate()
    {
        if fresh.get(p as u64) {
            page.copy_from_slice(src);
        } else {
            page.fill(0xEE);
        }
    }
}

fn bits(n: u64, rng: &mut Rng, per_mille: u64) -> Bitmap {
    let mut b = Bitmap::new(n);
    for p in 0..n {
        if rng.chance(per_mille) {
            b.set(p);
        }
    }
    b
}

impl Sim {
    fn new(seed: u64, trace: bool) -> Sim {
        let mut rng = Rng(seed ^ 0x5eed_f00d);
        let pages = if rng.chance(100) {
            rng.range(64..300)
        } else {
            rng.range(1..48)
        };
        let layout = crate::message::Layout::single(pages * PAGE_SIZE as u64);
        let kind = if rng.chance(300) {
            SessionKind::Evacuate
        } else {
            SessionKind::Migrate
        };
        let mut src_mem = vec![0u8; (pages as usize) * PAGE_SIZE];
        for (p, chunk) in src_mem.chunks_exact_mut(PAGE_SIZE).enumerate() {
            page_content(seed, p as u64, chunk);
        }
        let mut present = Bitmap::new(pages);
        let mut dst_mem = vec![0u8; src_mem.len()];
        let (stale, invalid) = if kind == SessionKind::Evacuate {
            let density = rng_per_mille(&mut rng);
            let stale = bits(pages, &mut rng, density);
            let invalid = bits(pages, &mut rng, 100);
            for p in 0..pages {
                if !(stale.get(p) || invalid.get(p)) {
                    present.set(p);
                }
            }
            fill_replica(&src_mem, &present, &mut dst_mem);
            (Some(stale), invalid)
        } else {
            (None, Bitmap::new(pages))
        };
        let hot = if rng.chance(300) {
            let a = rng.below(pages);
            std::iter::once(a..a + rng.range(1..20)).collect()
        } else {
            Vec::new()
        };
        let push = !rng.chance(150);
        let vm_state = rng.chance(500).then(|| vec![7; 16]);
        let with_state = vm_state.is_some();
        let src = SourceSession::new(SourceConfig {
            push,
            kind,
            stale,
            vm_state,
            early_push: rng.chance(500),
            hot,
            session_id: u128::from(rng.next()) << 64 | u128::from(rng.next()),
            ..SourceConfig::migrate("vm-sim", layout.clone())
        });
        // Destination crashes only where the protocol guarantees the VM is never started
        // over from older memory: a migration with VM state and an evacuation. A migration
        // without VM state hands the VM over with the first `Hello` (the destination runs
        // the guest from it on), before the source can know that a destination answered:
        // the source cannot mark its reconnecting `Hello`, and a restarted destination
        // would start the session over. Those are left out.
        let crashable = kind == SessionKind::Evacuate || with_state;
        let dst_config = DestConfig {
            accept: vec![SessionKind::Migrate, SessionKind::Evacuate],
            expected_vm_id: Some("vm-sim".into()),
            ..DestConfig::migrate(layout)
        };
        let dst = DestSession::new(dst_config.clone());
        let replica = (kind == SessionKind::Evacuate).then(|| present.clone());
        let latency = rng.range(20..3000);
        let jitter = rng.range(1..latency + 1);
        let cuts_left = if rng.chance(100) {
            0
        } else {
            rng.range(1..9) as u32
        };
        // Cuts land while the session runs: it lasts some round trips and push ticks.
        let cut_window = rng.range(latency..8 * latency + pages * 60 + 200);
        let vcpus = vec![None; rng.range(1..5) as usize];
        let push_run = rng.range(1..17);
        let mut sim = Sim {
            rng,
            trace,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            conns: vec![Conn {
                alive: true,
                src_no: 0,
                dst_no: 0,
                last: [[0; 4]; 2],
                broken: [[false; 4]; 2],
                dst_gen: 0,
                sent_arrives: false,
            }],
            current: Some(0),
            latency,
            jitter,
            cuts_left,
            cut_window,
            pages,
            src,
            dst,
            src_conn: 0,
            dst_conn: 0,
            src_mem,
            dst_mem,
            present,
            installs: vec![0; pages as usize],
            invalid,
            held_early: VecDeque::new(),
            held_sent: HashMap::new(),
            vcpus,
            guest_running: false,
            tick_pending: false,
            push_run,
            tally: Tally::default(),
            crash_rng: Rng(seed ^ 0xc4a5_11ed),
            crashable,
            dst_config,
            replica,
            dst_gen: 0,
            dst_connected: true,
            crash: None,
            lost: false,
            refused: false,
            src_refused: false,
            ended_at_source: false,
        };
        sim.log(format_args!(
            "pages {pages} kind {kind:?} push {push} latency {latency}us jitter {jitter}us cuts {cuts_left} within {cut_window}us vcpus {}",
            sim.vcpus.len()
        ));
        if sim.cuts_left > 0 {
            let t = sim.rng.below(sim.cut_window);
            sim.at(t, Ev::Cut);
        }
        // What the source takes to be in flight ahead of a request: nothing, some frames,
        // or the whole push (every pushed page is then left to the push).
        let frame = PAGE_SIZE as u64 + 1;
        let in_flight = [0, frame * sim.rng.range(1..8), u64::MAX / 2][sim.rng.below(3) as usize];
        sim.src.set_push_in_flight(in_flight);
        sim
    }

    fn log(&self, args: std::fmt::Arguments) {
        if self.trace {
            eprintln!("{:>12}us  {args}", self.now);
        }
    }

    fn at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push((Reverse(t), Reverse(self.seq)));
        self.events.insert(self.seq, ev);
    }

    /// Sends `msg` from one side on its current connection; lost if that one is dead.
    fn transmit(&mut self, dir: Dir, channel: Channel, msg: &Message) {
        let conn = match dir {
            Dir::ToDest => self.src_conn,
            Dir::ToSource => self.dst_conn,
        };
        if !self.conns[conn].alive {
            self.log(format_args!(
                "lost {dir:?} {}: connection {conn} is dead",
                msg.name()
            ));
            return;
        }
        let delay = self.latency + self.rng.below(self.jitter);
        let slot = &mut self.conns[conn].last[dir as usize][chan_index(channel)];
        let t = (self.now + delay).max(*slot);
        *slot = t;
        let bytes = encode_to_vec(msg);
        self.at(
            t,
            Ev::Deliver(Packet {
                conn,
                dir,
                channel,
                bytes,
                zombie: false,
            }),
        );
    }

    fn run(&mut self) -> Res<Tally> {
        self.pump()?;
        let mut steps = 0u64;
        while let Some((Reverse(t), Reverse(seq))) = self.queue.pop() {
            if self.src.is_finished() && self.dst.is_finished() {
                break;
            }
            // A lost VM: the session ended with the source's failure.
            if self.lost && self.src.session_state() == SessionState::Failed {
                break;
            }
            steps += 1;
            ensure!(steps < 2_000_000, "no end after {steps} steps");
            self.now = t;
            let ev = self.events.remove(&seq).ok_or("lost event")?;
            self.step(ev)?;
            self.pump()?;
        }
        self.finish()
    }

    fn step(&mut self, ev: Ev) -> Res<()> {
        match ev {
            Ev::Deliver(p) => self.deliver(p)?,
            Ev::Cut => self.cut()?,
            Ev::Detect { conn, dir } => match dir {
                // (A destination that crashed notices nothing: its successor never had
                // that connection.)
                Dir::ToDest
                    if self.dst_conn == conn && self.conns[conn].dst_gen == self.dst_gen =>
                {
                    self.log(format_args!(
                        "destination notices connection {conn} is lost"
                    ));
                    self.dst.connection_lost();
                }
                Dir::ToSource if self.src_conn == conn => {
                    self.log(format_args!("source notices connection {conn} is lost"));
                    self.src.connection_lost();
                }
                _ => {}
            },
            Ev::Reconnect => self.reconnect(),
            Ev::PushTick => {
                self.tick_pending = false;
                if let Some(r) = self.src.next_push(self.push_run as usize) {
                    self.log(format_args!("push {r:?}"));
                    self.send_pages(Channel::Bulk, r)?;
                }
            }
            Ev::Fault(i, gen) if gen == self.dst_gen => self.fault(i),
            // A vCPU of a destination process that crashed.
            Ev::Fault(..) => {}
        }
        Ok(())
    }

    fn cut(&mut self) -> Res<()> {
        if self.src.is_finished() && self.dst.is_finished() {
            return Ok(());
        }
        self.cuts_left -= 1;
        if let Some(c) = self.current.take() {
            self.tally.cuts += 1;
            self.conns[c].alive = false;
            // Sometimes the destination process dies with the connection; never once
            // either side finished, nor after a crash that lost the VM.
            let crash = self.crashable
                && !self.lost
                && !self.src.is_finished()
                && self.src.session_state() != SessionState::Failed
                && !self.dst.is_finished()
                && self.crash_rng.chance(CRASH_PER_MILLE);
            // Half of the crashes leave the link up: what the process sent before it died
            // still reaches the source, which notices the loss only after that.
            let sent_arrives = crash && self.crash_rng.chance(500);
            if crash {
                self.crash_dest(sent_arrives)?;
                self.conns[c].sent_arrives = sent_arrives;
            }
            let long = self.rng.chance(50);
            let outage = if long {
                self.rng.range(1_000_000..120_000_000)
            } else if self.rng.chance(300) {
                self.rng.range(2_000..100_000)
            } else {
                self.rng.below(2_000)
            };
            self.log(format_args!("CUT connection {c}; outage {outage}us"));
            let mut noticed = 0;
            for dir in [Dir::ToDest, Dir::ToSource] {
                let mut t = self.now + self.rng.below(1_500);
                if sent_arrives && dir == Dir::ToSource {
                    t = t.max(
                        self.conns[c].last[dir as usize]
                            .into_iter()
                            .max()
                            .unwrap_or(0)
                            + 1,
                    );
                    noticed = t;
                }
                self.at(t, Ev::Detect { conn: c, dir });
            }
            self.at((self.now + outage).max(noticed), Ev::Reconnect);
        }
        if self.cuts_left > 0 {
            let t = self.now + self.rng.below(self.cut_window);
            self.at(t, Ev::Cut);
        }
        Ok(())
    }

    /// The destination process dies: its session, memory, guest and vCPUs are gone, and
    /// what was in flight to it too. A fresh process with the same configuration takes the
    /// next connection; at evacuation it starts from the standby's replica on disk, as
    /// the seed began.
    fn crash_dest(&mut self, sent_arrives: bool) -> Res<()> {
        let owner = self.src.ownership();
        ensure!(
            !(self.dst.guest_may_run() && owner == Ownership::Source),
            "the crashed destination could run the guest while the source still owned the VM"
        );
        self.tally.crashes += 1;
        self.crash = Some(Crash {
            owner,
            complete_sent: self.dst.complete_sent(),
            ran: self.dst.guest_may_run(),
        });
        self.log(format_args!(
            "CRASH of destination process {}: the source's ownership is {owner:?}, the guest {}; \
             what it sent {}",
            self.dst_gen,
            if self.dst.guest_may_run() {
                "could run there"
            } else {
                "never ran there"
            },
            if sent_arrives {
                "still arrives"
            } else {
                "is cut off"
            }
        ));
        self.dst_gen += 1;
        self.dst = DestSession::new(self.dst_config.clone());
        self.dst_connected = false;
        match &self.replica {
            Some(fresh) => {
                fill_replica(&self.src_mem, fresh, &mut self.dst_mem);
                self.present = fresh.clone();
            }
            None => {
                self.dst_mem.fill(0);
                self.present = Bitmap::new(self.pages);
            }
        }
        self.installs.fill(0);
        self.vcpus.fill(None);
        self.guest_running = false;
        self.held_early.clear();
        // Keyed by the crashed process's connection numbers, which the next one reuses.
        self.held_sent.clear();
        Ok(())
    }

    fn reconnect(&mut self) {
        let c = self.conns.len();
        if !self.dst_connected {
            // The first connection to a restarted destination.
            if self.src.is_finished() {
                // A `Complete` of the crashed destination arrived late: the source's
                // driver ended, it does not come back.
                self.log(format_args!(
                    "the source finished before it noticed the crash: no reconnect"
                ));
                self.ended_at_source = true;
                self.tally.finished_before_noticed += 1;
                return;
            }
            if self.src.ownership() == Ownership::Source {
                self.tally.crashes_taken_over += 1;
            } else if !self.lost {
                // The VM was handed over to a destination that is gone.
                self.lost = true;
                self.tally.vms_lost += 1;
                if self.crash.is_some_and(|c| !c.ran) {
                    self.tally.vms_lost_unrun += 1;
                }
                if self.crash.is_some_and(|c| c.owner == Ownership::Source) {
                    self.tally.handed_over_after_crash += 1;
                }
            }
        } else if self.lost && self.dst.session_state() == SessionState::Failed {
            // The destination that refused the session ended (its refusal was lost with
            // the connection); a supervisor starts it again and it refuses again.
            self.log(format_args!(
                "the refusing destination process {} ended; a fresh one listens",
                self.dst_gen
            ));
            self.dst_gen += 1;
            self.dst = DestSession::new(self.dst_config.clone());
            self.dst_connected = false;
        }
        let src_no = self.src.resume();
        // A restarted destination numbers its first connection 0, without `resume()`.
        let dst_no = if std::mem::replace(&mut self.dst_connected, true) {
            self.dst.resume()
        } else {
            self.dst.conn_epoch()
        };
        self.log(format_args!(
            "RECONNECT as connection {c}: source's number {src_no}, destination's {dst_no}"
        ));
        self.conns.push(Conn {
            alive: true,
            src_no,
            dst_no,
            last: [[self.now; 4]; 2],
            broken: [[false; 4]; 2],
            dst_gen: self.dst_gen,
            sent_arrives: false,
        });
        self.current = Some(c);
        self.src_conn = c;
        self.dst_conn = c;
    }

    fn deliver(&mut self, mut p: Packet) -> Res<()> {
        let arrives = p.dir == Dir::ToSource && self.conns[p.conn].sent_arrives;
        if !self.conns[p.conn].alive && !p.zombie && !arrives {
            // In flight at the cut: lost, or (sometimes) read late by a reader task of the
            // dead connection. A stream is read in order: once one of its messages is
            // lost, so is everything after it, and late ones keep their order.
            let (d, c) = (p.dir as usize, chan_index(p.channel));
            let late = !self.conns[p.conn].broken[d][c] && self.rng.chance(150);
            if late {
                p.zombie = true;
                let t = (self.now + self.rng.below(200_000)).max(self.conns[p.conn].last[d][c]);
                self.conns[p.conn].last[d][c] = t;
                self.at(t, Ev::Deliver(p));
            } else {
                self.conns[p.conn].broken[d][c] = true;
            }
            return Ok(());
        }
        if p.dir == Dir::ToDest && self.conns[p.conn].dst_gen != self.dst_gen {
            self.log(format_args!(
                "lost: a message of connection {} for a destination process that crashed",
                p.conn
            ));
            return Ok(());
        }
        if p.dir == Dir::ToDest && self.refused && self.dst.session_state() == SessionState::Failed
        {
            self.log(format_args!(
                "lost: a message of connection {} for the refusing destination, which ended",
                p.conn
            ));
            return Ok(());
        }
        let conn = &self.conns[p.conn];
        let (msg, used) = decode(&p.bytes)
            .map_err(|e| format!("decode: {e}"))?
            .ok_or("short frame")?;
        ensure!(used == p.bytes.len(), "frame length");
        if p.zombie {
            self.tally.zombies += 1;
            self.log(format_args!(
                "ZOMBIE {:?} {} of dead connection {}",
                p.dir,
                msg.name(),
                p.conn
            ));
        }
        match p.dir {
            Dir::ToDest => {
                let no = conn.dst_no;
                let is_pages = matches!(msg, Message::Pages(_));
                if is_pages && (!self.dst.is_running() || !self.held_early.is_empty()) {
                    self.held_early.push_back((no, p.channel, msg));
                    return Ok(());
                }
                self.feed_dest(no, p.channel, msg)
            }
            Dir::ToSource => {
                let no = conn.src_no;
                self.feed_source(no, p.channel, msg)
            }
        }
    }

    fn feed_dest(&mut self, no: u32, channel: Channel, msg: Message) -> Res<()> {
        let name = msg.name();
        let hello = matches!(msg, Message::Hello { .. });
        let out = match self.dst.handle_in(no, channel, msg) {
            Ok(out) => out,
            // A restarted destination refuses the session whose VM it lost: expected, and
            // only then.
            Err(ProtoError::NotHeld { session_id })
                if self.lost && session_id == self.src.session_id() =>
            {
                self.log(format_args!(
                    "dest <- {name}: refused, it does not hold the session (the VM is lost)"
                ));
                ensure!(
                    !self.dst.guest_may_run(),
                    "the refusing destination may run the guest"
                );
                self.refused = true;
                return Ok(());
            }
            Err(e) => return Err(format!("destination refused {name} on {channel:?}: {e}")),
        };
        self.log(format_args!(
            "dest <- {name} on {channel:?} (connection number {no})"
        ));
        if hello {
            // What a `Resume` just announced, to check the source never sends it again.
            if let Some(t) = self.dst_peek_resume() {
                self.held_sent.insert(t, self.dst.held());
            }
        }
        if let Some(d) = out {
            let runs = match d {
                Delivery::Pages(p) => vec![p],
                Delivery::PageRuns(r) => r,
                Delivery::Update { .. } => return Err("an Update in a migration".into()),
            };
            for run in runs {
                self.install(&run)?;
            }
        }
        Ok(())
    }

    /// The connection number of a `Resume` the destination just queued, if it did.
    fn dst_peek_resume(&mut self) -> Option<u32> {
        let mut found = None;
        let mut kept = Vec::new();
        while let Some(t) = self.dst.poll_transmit() {
            if let Message::Resume { conn_epoch, .. } = t.message {
                found = Some(conn_epoch);
            }
            kept.push(t);
        }
        for t in kept {
            self.transmit(Dir::ToSource, t.channel, &t.message);
        }
        found
    }

    fn install(&mut self, run: &Pages) -> Res<()> {
        ensure!(
            !self.lost,
            "pages delivered on a destination that does not hold the session"
        );
        for (p, page) in run.iter() {
            ensure!(p < self.pages, "page {p} out of range");
            ensure!(!self.present.get(p), "page {p} installed twice");
            self.installs[p as usize] += 1;
            let dst = &mut self.dst_mem[p as usize * PAGE_SIZE..(p as usize + 1) * PAGE_SIZE];
            match page {
                PageRef::Raw(d) => dst.copy_from_slice(d),
                PageRef::Zero => dst.fill(0),
                other => return Err(format!("unexpected page kind {other:?}")),
            }
            self.present.set(p);
        }
        Ok(())
    }

    fn feed_source(&mut self, no: u32, channel: Channel, msg: Message) -> Res<()> {
        let name = msg.name();
        let serve = match self.src.handle_in(no, channel, msg) {
            Ok(serve) => serve,
            Err(ProtoError::Peer {
                code: ErrorCode::ResumeRefused,
                message,
            }) if self.lost && self.refused => {
                self.log(format_args!(
                    "src  <- {name}: the restarted destination refused the session: {message}"
                ));
                self.src_refused = true;
                return Ok(());
            }
            Err(e) => return Err(format!("source refused {name} on {channel:?}: {e}")),
        };
        self.log(format_args!(
            "src  <- {name} on {channel:?} (connection number {no})"
        ));
        for p in serve {
            self.send_pages(Channel::Urgent, p..p + 1)?;
        }
        Ok(())
    }

    /// Sends source pages `r` on the source's connection, checking none of them is one the
    /// destination announced it holds on that connection.
    fn send_pages(&mut self, channel: Channel, r: Range<u64>) -> Res<()> {
        let conn = &self.conns[self.src_conn];
        if let Some(held) = self.held_sent.get(&conn.dst_no) {
            if let Some(p) = r.clone().find(|&p| held.get(p)) {
                return Err(format!(
                    "page {p} sent again on connection {} although the destination holds it",
                    self.src_conn
                ));
            }
        }
        let data = &self.src_mem[r.start as usize * PAGE_SIZE..r.end as usize * PAGE_SIZE];
        let pages = Pages::from_memory(r.start, data);
        if channel == Channel::Bulk {
            let no = self.src.connection();
            self.src.note_pushed(no, std::slice::from_ref(&pages));
        }
        self.transmit(Dir::ToDest, channel, &Message::Pages(pages));
        Ok(())
    }

    fn fault(&mut self, i: usize) {
        if self.vcpus[i].is_some() {
            return;
        }
        let Some(p) = self
            .present
            .next_clear(self.rng.below(self.pages))
            .or_else(|| self.present.next_clear(0))
        else {
            return;
        };
        self.tally.faults += 1;
        self.vcpus[i] = Some(p);
        self.log(format_args!("vCPU {i} faults on page {p}"));
        self.dst.request(&[p]);
    }

    /// What drivers do between events: send what the sessions queued, act on their events,
    /// let blocked vCPUs go on, keep the push running, complete.
    fn pump(&mut self) -> Res<()> {
        loop {
            let mut moved = false;
            while let Some(t) = self.src.poll_transmit() {
                moved = true;
                self.transmit(Dir::ToDest, t.channel, &t.message);
            }
            while let Some(t) = self.dst.poll_transmit() {
                moved = true;
                self.transmit(Dir::ToSource, t.channel, &t.message);
            }
            while let Some(ev) = self.src.poll_event() {
                moved = true;
                self.log(format_args!("source event {ev:?}"));
                match ev {
                    SourceEvent::Resumed {
                        handshake_restarted,
                        ..
                    } => {
                        self.tally.resumes += 1;
                        self.tally.restarts += u64::from(handshake_restarted);
                    }
                    SourceEvent::Paused => self.tally.pauses += 1,
                    _ => {}
                }
            }
            while let Some(ev) = self.dst.poll_event() {
                moved = true;
                self.log(format_args!("destination event {ev:?}"));
                match ev {
                    DestEvent::HelloReceived { .. } => self.dst.accept(&self.invalid.clone()),
                    DestEvent::StaleSet(stale) => {
                        for p in stale.iter_ones() {
                            ensure!(!self.guest_running, "a stale set after the guest resumed");
                            if self.present.get(p) {
                                // The replica's page is stale: make it absent.
                                self.present.clear(p);
                            }
                        }
                    }
                    DestEvent::Established { .. } if !self.guest_running => {
                        self.guest_running = true;
                        for i in 0..self.vcpus.len() {
                            let t = self.now + self.rng.below(2_000);
                            self.at(t, Ev::Fault(i, self.dst_gen));
                        }
                    }
                    _ => {}
                }
            }
            // Pages held back until the session ran.
            if self.dst.is_running() {
                while let Some((no, ch, msg)) = self.held_early.pop_front() {
                    moved = true;
                    self.feed_dest(no, ch, msg)?;
                }
            }
            // vCPUs whose page arrived go on, and fault again later.
            for i in 0..self.vcpus.len() {
                if let Some(p) = self.vcpus[i] {
                    if self.present.get(p) {
                        self.vcpus[i] = None;
                        let t = self.now + self.rng.range(1..3_000);
                        self.at(t, Ev::Fault(i, self.dst_gen));
                    }
                }
            }
            if self.present.is_full() && self.dst.is_running() && !self.dst.complete_sent() {
                moved = true;
                self.log(format_args!("every page is here: Complete"));
                self.dst.complete();
            }
            if !self.tick_pending
                && (self.src.may_push_early() || self.src.session_state() == SessionState::Running)
            {
                self.tick_pending = true;
                let t = self.now + self.rng.range(1..400);
                self.at(t, Ev::PushTick);
            }
            // Never two owners.
            ensure!(
                !(self.dst.guest_may_run() && self.src.ownership() == Ownership::Source),
                "two owners: the destination may run the guest while the source still owns the VM"
            );
            ensure!(
                !self.guest_running || self.dst.guest_may_run(),
                "the guest ran at the destination, which then forgot it"
            );
            ensure!(
                !(self.lost && (self.dst.guest_may_run() || self.guest_running)),
                "a restarted destination may run a VM that was lost"
            );
            if !moved {
                return Ok(());
            }
        }
    }

    /// A crash lost the VM: the session must have ended reporting it, and nothing may
    /// have started it over from the source's older memory.
    fn check_lost(&self) -> Res<()> {
        ensure!(
            self.refused,
            "the restarted destination never refused the session"
        );
        ensure!(
            self.src.session_state() == SessionState::Failed && self.src_refused,
            "the source did not end failing on the refusal: {:?}",
            self.src.session_state()
        );
        ensure!(
            self.src.ownership() == Ownership::Destination,
            "the source's ownership after a lost VM: {:?}",
            self.src.ownership()
        );
        ensure!(
            !self.dst.guest_may_run() && !self.guest_running,
            "the restarted destination may run the guest"
        );
        ensure!(
            self.dst.received().count_ones() == 0 && self.installs.iter().all(|&n| n == 0),
            "pages arrived at the restarted destination"
        );
        Ok(())
    }

    fn finish(&mut self) -> Res<Tally> {
        if self.lost {
            self.check_lost()?;
            return self.counters();
        }
        if self.ended_at_source {
            ensure!(
                self.src.is_finished() && self.src.ownership() == Ownership::Released,
                "the source ended without finishing"
            );
            ensure!(
                self.crash.is_some_and(|c| c.complete_sent),
                "the source finished although the crashed destination never sent Complete"
            );
            return self.counters();
        }
        ensure!(
            self.src.is_finished(),
            "the source did not finish: {:?}",
            self.src.session_state()
        );
        ensure!(
            self.dst.is_finished(),
            "the destination did not finish: {:?}",
            self.dst.session_state()
        );
        ensure!(self.present.is_full(), "pages missing at the destination");
        for p in 0..self.pages as usize {
            let r = p * PAGE_SIZE..(p + 1) * PAGE_SIZE;
            ensure!(
                self.src_mem[r.clone()] == self.dst_mem[r],
                "page {p} differs at the destination"
            );
        }
        ensure!(
            self.vcpus.iter().all(Option::is_none),
            "a vCPU still waits for its page: {:?}",
            self.vcpus
        );
        ensure!(
            self.src.ownership() == Ownership::Released,
            "the source did not release the VM"
        );
        self.counters()
    }

    /// Checks the sessions' counters against what the simulation saw, and sums them up.
    fn counters(&mut self) -> Res<Tally> {
        let s = self.src.stats();
        let d = self.dst.stats();
        ensure!(
            s.pauses == self.tally.pauses,
            "source counted {} pauses, reported {}",
            s.pauses,
            self.tally.pauses
        );
        if self.tally.cuts == 0 {
            ensure!(
                s.pages_resent == 0 && d.pauses == 0 && d.messages_ignored == 0,
                "resends or pauses without a cut: {s:?} {d:?}"
            );
        }
        ensure!(
            s.bytes_resent == s.pages_resent * PAGE_SIZE as u64,
            "bytes_resent"
        );
        let t = &self.tally;
        ensure!(
            t.crashes == t.crashes_taken_over + t.vms_lost + t.finished_before_noticed,
            "a crash without an outcome: {t:?}"
        );
        self.tally.pages_resent = s.pages_resent;
        self.tally.on_their_way = s.pages_on_their_way;
        self.tally.duplicates = d.pages_duplicate;
        self.tally.ignored = s.messages_ignored + d.messages_ignored;
        self.tally.virtual_us = self.now;
        Ok(self.tally)
    }
}

/// A stale-set density for an evacuation: sometimes nearly nothing, sometimes nearly all.
fn rng_per_mille(rng: &mut Rng) -> u64 {
    [20, 200, 600, 1000][rng.below(4) as usize]
}

fn run_seed(seed: u64, trace: bool) -> Result<Tally, String> {
    let outcome =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Sim::new(seed, trace).run()));
    match outcome {
        Ok(r) => r,
        Err(panic) => Err(format!(
            "panicked: {}",
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        )),
    }
}

#[test]
fn sessions_survive_any_outage_in_simulation() {
    if let Some(seed) = std::env::var("FAULTLINE_SIM_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        match run_seed(seed, true) {
            Ok(t) => eprintln!("seed {seed}: ok {t:?}"),
            Err(e) => panic!("seed {seed} failed: {e}"),
        }
        return;
    }
    let seeds: u64 = std::env::var("FAULTLINE_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let started = std::time::Instant::now();
    let mut total = Tally::default();
    let mut failures = Vec::new();
    for seed in 0..seeds {
        match run_seed(seed, false) {
            Ok(t) => total += t,
            Err(e) => failures.push((seed, e)),
        }
    }
    eprintln!(
        "simulated {seeds} seeds in {:.1?}: {total:?}",
        started.elapsed()
    );
    if let Some((seed, e)) = failures.first() {
        panic!(
            "{} of {seeds} seeds failed; first: seed {seed}: {e}\n\
             rerun it with its trace: FAULTLINE_SIM_SEED={seed} cargo test -p transport \
             sessions_survive_any_outage_in_simulation -- --nocapture",
            failures.len()
        );
    }
    // The simulation must actually exercise what it claims to.
    assert!(
        seeds < 1000 || total.cuts > seeds,
        "too few cuts: {total:?}"
    );
    assert!(seeds < 1000 || total.resumes > 0 && total.restarts > 0 && total.zombies > 0);
    // Requests left to the push, whose faults the push must then serve.
    assert!(seeds < 1000 || total.on_their_way > 0, "{total:?}");
    // Crashes both before the hand-over (the session completes on the restarted
    // destination) and after it (the VM is lost, and reported).
    assert!(
        seeds < 1000 || total.vms_lost > 0 && total.crashes > total.vms_lost,
        "too few crashes: {total:?}"
    );
}
