//! The vhost-user-blk front end: serves a [`BlockDevice`] to a VMM (QEMU, Cloud
//! Hypervisor, Firecracker) as a virtio-blk device over a vhost-user Unix socket, built on
//! rust-vmm's `vhost-user-backend`.
//!
//! - [`VhostUserBlk`] is the device: its features, its `virtio_blk_config`, and the
//!   requests (IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES; anything else is answered
//!   `VIRTIO_BLK_S_UNSUPP`).
//! - [`serve`] (or [`BlkListener`]) listens on a socket, serves one frontend until it
//!   disconnects or a [`StopHandle`] stops it.
//!
//! **Threads.** Each queue has a thread of `vhost-user-backend`'s that takes requests
//! off the ring and checks their framing; the requests then run on a small pool of
//! threads shared by the queues ([`BlkOptions::workers`]). A request whose read blocks
//! (a stale block fetched over the WAN during an evacuation) holds one pool thread, not
//! the queue: the others keep serving, until every pool thread waits. Requests complete in
//! any order, as virtio-blk allows; a FLUSH covers the writes that completed before it.
//! When the frontend stops a queue (`GET_VRING_BASE`) the device waits for the queue's
//! requests in flight to complete first, as the vhost-user protocol requires.
//!
//! **Malformed chains** never panic and never change the image (see the `request`
//! module): a chain that does not end in a writable status byte in guest memory goes back
//! to the guest unanswered (used length 0); anything else malformed is answered
//! `VIRTIO_BLK_S_IOERR`; [`VhostUserBlk::stats`] counts both. The device keeps serving
//! either way.
//!
//! **Not supported**: dirty-page logging for the frontend's own live migration
//! (`VHOST_F_LOG_ALL`), inflight-fd reconnection, zoned and secure-erase requests.

#[doc(hidden)]
pub mod fuzzing;
mod request;

use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, RwLock};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::device::BlockDevice;
use request::{Device, Failure, Parsed, Request};
pub use request::{Limits, SECTOR_SIZE, SERIAL_LEN};

/// Guest memory as the backend maps it (no dirty-page bitmap: see the module docs).
type Mem = vm_memory::GuestMemoryMmap<()>;
/// One queue as `vhost-user-backend` keeps it.
type Vring = VringRwLock<GuestMemoryAtomic<Mem>>;

/// Bytes of `struct virtio_blk_config` (virtio 1.2, zoned fields included).
pub const CONFIG_LEN: usize = 96;

/// Segments per request the device announces (`seg_max`): QEMU's default queue of 128
/// less the header and status descriptors, which also fits any queue through indirect
/// descriptors.
pub const SEG_MAX: u32 = 126;

/// How a [`VhostUserBlk`] presents itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkOptions {
    /// What GET_ID answers: at most [`SERIAL_LEN`] bytes, zero-padded.
    pub serial: String,
    /// The logical block size the guest sees (`blk_size`, VIRTIO_BLK_F_BLK_SIZE): a power
    /// of two from 512 to 4096 that divides the disk's size.
    pub logical_block_size: u32,
    /// Request queues, 1 to 64 (VIRTIO_BLK_F_MQ is offered when more than one).
    pub num_queues: u16,
    /// The largest queue the frontend may set up: a power of two up to 32768.
    pub max_queue_size: u16,
    /// Threads that run requests, shared by all queues (1 to 256).
    pub workers: usize,
    /// Discard and write-zeroes limits announced in the configuration.
    pub limits: Limits,
}

impl Default for BlkOptions {
    fn default() -> BlkOptions {
        BlkOptions {
            serial: "faultline".into(),
            logical_block_size: 512,
            num_queues: 1,
            max_queue_size: 1024,
            workers: 4,
            limits: Limits {
                // 1 GiB per segment, 16 segments per request.
                max_discard_sectors: 1 << 21,
                max_discard_seg: 16,
                max_write_zeroes_sectors: 1 << 21,
                max_write_zeroes_seg: 16,
            },
        }
    }
}

/// Why a [`VhostUserBlk`] could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// The serial number is longer than GET_ID can carry.
    #[error("the serial number is {len} bytes; at most {SERIAL_LEN} fit")]
    SerialTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The logical block size is not a power of two from 512 to 4096.
    #[error("logical block size {0}: not a power of two from 512 to 4096")]
    BlockSize(u32),
    /// The disk's size is not a whole number of logical blocks.
    #[error("the {size}-byte disk is not a whole number of {block}-byte blocks")]
    DiskSize {
        /// The disk's size.
        size: u64,
        /// The logical block size.
        block: u32,
    },
    /// The number of queues is out of range.
    #[error("{0} queues: from 1 to 64 are supported")]
    Queues(u16),
    /// The queue size is not a power of two up to 32768.
    #[error("queue size {0}: not a power of two up to 32768")]
    QueueSize(u16),
    /// The number of worker threads is out of range.
    #[error("{0} worker threads: from 1 to 256 are supported")]
    Workers(usize),
    /// A discard or write-zeroes limit is zero.
    #[error("discard and write-zeroes limits must not be zero")]
    Limits,
    /// A worker thread could not be started.
    #[error("cannot start a worker thread")]
    Spawn(#[source] io::Error),
}

/// What the device has seen, counted since it was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct BlkStats {
    /// Descriptor chains taken off the queues.
    pub requests: u64,
    /// Chains that could not be answered (no writable status byte in guest memory at
    /// their end).
    pub unanswered: u64,
    /// Malformed requests answered `VIRTIO_BLK_S_IOERR`.
    pub malformed: u64,
    /// Requests of a type the device does not support (`VIRTIO_BLK_S_UNSUPP`).
    pub unsupported: u64,
    /// Requests the disk failed (`VIRTIO_BLK_S_IOERR`).
    pub disk_errors: u64,
    /// Well-framed requests by type, whatever their outcome: IN.
    pub reads: u64,
    /// OUT.
    pub writes: u64,
    /// FLUSH.
    pub flushes: u64,
    /// DISCARD.
    pub discards: u64,
    /// WRITE_ZEROES.
    pub write_zeroes: u64,
    /// GET_ID.
    pub get_ids: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    unanswered: AtomicU64,
    malformed: AtomicU64,
    unsupported: AtomicU64,
    disk_errors: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    write_zeroes: AtomicU64,
    get_ids: AtomicU64,
}

/// A job for the pool.
type Job = Box<dyn FnOnce() + Send>;

/// One queue's requests in flight, so that stopping the queue can wait for them.
#[derive(Default)]
struct Gate {
    /// Held by the queue's thread while it takes requests off the ring.
    pass: Mutex<()>,
    inflight: Mutex<usize>,
    idle: Condvar,
}

impl Gate {
    fn begin(&self) {
        *lock(&self.inflight) += 1;
    }

    fn end(&self) {
        let mut n = lock(&self.inflight);
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.idle.notify_all();
        }
    }

    /// Waits until the queue's thread is between passes and nothing is in flight.
    fn wait_idle(&self) {
        let _pass = lock(&self.pass);
        let mut n = lock(&self.inflight);
        while *n > 0 {
            n = self.idle.wait(n).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Ends a request's flight when dropped, also if running it panicked.
struct Flight<'a>(&'a Gate);

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        self.0.end();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Counters and unit values: consistent between statements even after a panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Inner {
    disk: Arc<dyn BlockDevice>,
    serial: [u8; SERIAL_LEN],
    opts: BlkOptions,
    config: [u8; CONFIG_LEN],
    features: u64,
    event_idx: AtomicBool,
    mem: RwLock<Option<GuestMemoryAtomic<Mem>>>,
    gates: Vec<Gate>,
    jobs: Mutex<mpsc::Sender<Job>>,
    counters: Counters,
}

/// A vhost-user-blk device serving a [`BlockDevice`]; cheap to clone (clones share the
/// device). Hand it to [`serve`], or to a `vhost_user_backend::VhostUserDaemon` of your own.
#[derive(Clone)]
pub struct VhostUserBlk(Arc<Inner>);

impl VhostUserBlk {
    /// A device for `disk`, its worker threads started.
    pub fn new(disk: Arc<dyn BlockDevice>, opts: BlkOptions) -> Result<VhostUserBlk, BlkError> {
        let serial = opts.serial.as_bytes();
        if serial.len() > SERIAL_LEN {
            return Err(BlkError::SerialTooLong { len: serial.len() });
        }
        let mut id = [0u8; SERIAL_LEN];
        id[..serial.len()].copy_from_slice(serial);
        let block = opts.logical_block_size;
        if !block.is_power_of_two() || !(512..=4096).contains(&block) {
            return Err(BlkError::BlockSize(block));
        }
        if !disk.size().is_multiple_of(u64::from(block)) {
            return Err(BlkError::DiskSize {
                size: disk.size(),
                block,
            });
        }
        if !(1..=64).contains(&opts.num_queues) {
            return Err(BlkError::Queues(opts.num_queues));
        }
        if !opts.max_queue_size.is_power_of_two() {
            return Err(BlkError::QueueSize(opts.max_queue_size));
        }
        if !(1..=256).contains(&opts.workers) {
            return Err(BlkError::Workers(opts.workers));
        }
        let l = opts.limits;
        if [
            l.max_discard_sectors,
            l.max_discard_seg,
            l.max_write_zeroes_sectors,
            l.max_write_zeroes_seg,
        ]
        .contains(&0)
        {
            return Err(BlkError::Limits);
        }

        let read_only = disk.read_only();
        let mut features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        if opts.num_queues > 1 {
            features |= 1 << VIRTIO_BLK_F_MQ;
        }
        let config = config_space(disk.size(), &opts);

        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..opts.workers {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("vhost-blk-io{i}"))
                .spawn(move || worker(&rx))
                .map_err(BlkError::Spawn)?;
        }
        Ok(VhostUserBlk(Arc::new(Inner {
            disk,
            serial: id,
            gates: (0..opts.num_queues).map(|_| Gate::default()).collect(),
            opts,
            config,
            features,
            event_idx: AtomicBool::new(false),
            mem: RwLock::new(None),
            jobs: Mutex::new(tx),
            counters: Counters::default(),
        })))
    }

    /// The device's `virtio_blk_config`, as the frontend reads it.
    pub fn config(&self) -> [u8; CONFIG_LEN] {
        self.0.config
    }

    /// What the device has seen so far.
    pub fn stats(&self) -> BlkStats {
        let c = &self.0.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BlkStats {
            requests: get(&c.requests),
            unanswered: get(&c.unanswered),
            malformed: get(&c.malformed),
            unsupported: get(&c.unsupported),
            disk_errors: get(&c.disk_errors),
            reads: get(&c.reads),
            writes: get(&c.writes),
            flushes: get(&c.flushes),
            discards: get(&c.discards),
            write_zeroes: get(&c.write_zeroes),
            get_ids: get(&c.get_ids),
        }
    }

    /// Waits until no request taken off any queue is still running.
    pub fn wait_idle(&self) {
        for g in &self.0.gates {
            g.wait_idle();
        }
    }
}

/// A pool thread: runs jobs until the device is gone. A panicking job (a disk
/// implementation's bug) leaves its request unanswered but keeps the thread.
fn worker(rx: &Mutex<mpsc::Receiver<Job>>) {
    loop {
        let job = match lock(rx).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
            tracing::error!("vhost-user-blk: a request panicked; it stays unanswered");
        }
    }
}

/// The `virtio_blk_config` for a disk of `size` bytes (little-endian, as virtio 1.x has it).
fn config_space(size: u64, opts: &BlkOptions) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
    put(0, &(size / SECTOR_SIZE).to_le_bytes()); // capacity
    put(12, &SEG_MAX.to_le_bytes()); // seg_max
    put(20, &opts.logical_block_size.to_le_bytes()); // blk_size
    put(34, &opts.num_queues.to_le_bytes()); // num_queues
    let l = opts.limits;
    let align = opts.logical_block_size / SECTOR_SIZE as u32;
    put(36, &l.max_discard_sectors.to_le_bytes());
    put(40, &l.max_discard_seg.to_le_bytes());
    put(44, &align.to_le_bytes()); // discard_sector_alignment
    put(48, &l.max_write_zeroes_sectors.to_le_bytes());
    put(52, &l.max_write_zeroes_seg.to_le_bytes());
    put(56, &[1]); // write_zeroes_may_unmap
    c
}

impl Inner {
    fn device(&self) -> Device<'_> {
        Device {
            disk: &*self.disk,
            serial: &self.serial,
            limits: self.opts.limits,
        }
    }

    /// Takes every available chain off queue `q`'s ring and starts it.
    fn process(self: &Arc<Inner>, q: usize, vring: &Vring) {
        let Some(gate) = self.gates.get(q) else {
            return;
        };
        let _pass = lock(&gate.pass);
        let Some(atomic) = self.mem.read().unwrap_or_else(|p| p.into_inner()).clone() else {
            return;
        };
        let mem: Arc<Mem> = atomic.memory().into_inner();
        let event_idx = self.event_idx.load(Ordering::Acquire);
        loop {
            if event_idx {
                let _ = vring.disable_notification();
            }
            loop {
                // (A statement of its own: the vring's lock must be released before the
                // chain is started, which may complete it at once.)
                let chain = vring
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(mem.clone());
                let Some(chain) = chain else { break };
                self.start(q, vring, &mem, chain);
            }
            // With EVENT_IDX the guest is told where to kick next only now: look once
            // more for chains it added meanwhile.
            if !event_idx || !matches!(vring.enable_notification(), Ok(true)) {
                break;
            }
        }
    }

    fn start(
        self: &Arc<Inner>,
        q: usize,
        vring: &Vring,
        mem: &Arc<Mem>,
        chain: virtio_queue::DescriptorChain<Arc<Mem>>,
    ) {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        match request::parse(chain) {
            Parsed::Unanswerable { head, why } => {
                self.counters.unanswered.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(head, why, "vhost-user-blk: chain returned unanswered");
                complete(vring, head, 0);
            }
            Parsed::Malformed { head, status, why } => {
                self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(head, why, "vhost-user-blk: malformed request");
                let used = request::answer(&**mem, status, request::S_IOERR, 1);
                complete(vring, head, used);
            }
            Parsed::Request(req) => {
                self.gates[q].begin();
                let (inner, vring, mem) = (self.clone(), vring.clone(), mem.clone());
                let job: Job = Box::new(move || inner.run(q, &vring, &mem, req));
                if let Err(mpsc::SendError(job)) = lock(&self.jobs).send(job) {
                    job(); // The pool is gone (cannot happen while `self` lives).
                }
            }
        }
    }

    /// Runs a request on a pool thread and completes it.
    fn run(&self, q: usize, vring: &Vring, mem: &Mem, req: Request) {
        let _flight = Flight(&self.gates[q]);
        use virtio_bindings::virtio_blk as b;
        let c = &self.counters;
        let by_kind = match req.kind() {
            b::VIRTIO_BLK_T_IN => Some(&c.reads),
            b::VIRTIO_BLK_T_OUT => Some(&c.writes),
            b::VIRTIO_BLK_T_FLUSH => Some(&c.flushes),
            b::VIRTIO_BLK_T_DISCARD => Some(&c.discards),
            b::VIRTIO_BLK_T_WRITE_ZEROES => Some(&c.write_zeroes),
            b::VIRTIO_BLK_T_GET_ID => Some(&c.get_ids),
            _ => None,
        };
        if let Some(n) = by_kind {
            n.fetch_add(1, Ordering::Relaxed);
        }
        let done = req.run(mem, &self.device());
        let counter = match done.why {
            None => None,
            Some(Failure::Malformed(why)) => {
                tracing::debug!(head = req.head, why, "vhost-user-blk: malformed request");
                Some(&self.counters.malformed)
            }
            Some(Failure::Unsupported(kind)) => {
                tracing::debug!(kind, "vhost-user-blk: unsupported request type");
                Some(&self.counters.unsupported)
            }
            Some(Failure::Disk) => Some(&self.counters.disk_errors),
        };
        if let Some(c) = counter {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let used = request::answer(mem, req.status, done.status, done.used);
        complete(vring, req.head, used);
    }
}

/// Puts a chain on the used ring and tells the guest if it wants to know.
fn complete(vring: &Vring, head: u16, used: u32) {
    if let Err(e) = vring.add_used(head, used) {
        tracing::warn!(head, error = %e, "vhost-user-blk: cannot return a chain to the guest");
        return;
    }
    // Without EVENT_IDX this is always true.
    if vring.needs_notification().unwrap_or(true) {
        if let Err(e) = vring.signal_used_queue() {
            tracing::warn!(error = %e, "vhost-user-blk: cannot notify the guest");
        }
    }
}

impl VhostUserBackend for VhostUserBlk {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.0.opts.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.0.opts.max_queue_size)
    }

    fn features(&self) -> u64 {
        self.0.features
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // CONFIG: QEMU's vhost-user-blk refuses a backend without it. MQ: the frontend
        // asks how many queues there are (one is fine too).
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn reset_device(&self) {
        self.wait_idle();
    }

    fn set_event_idx(&self, enabled: bool) {
        self.0.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // The reply must be exactly `size` bytes; past the structure reads as zeroes.
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(CONFIG_LEN);
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(CONFIG_LEN);
        out[..end - start].copy_from_slice(&self.0.config[start..end]);
        out
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // Nothing is writable (no VIRTIO_BLK_F_CONFIG_WCE): writes are ignored.
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<Mem>) -> io::Result<()> {
        *self.0.mem.write().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One thread per queue, so a thread's index is its queue's.
        (0..self.0.opts.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(e) => {
                tracing::error!(error = %e, "vhost-user-blk: cannot create an exit event");
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        if let Some(g) = self.0.gates.get(queue_index as usize) {
            g.wait_idle();
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // An error here would end the queue's thread for good: log and go on instead.
        if evset != EventSet::IN {
            tracing::warn!(?evset, "vhost-user-blk: unexpected event");
            return Ok(());
        }
        match vrings.get(usize::from(device_event)) {
            Some(vring) => self.0.process(thread_id, vring),
            None => tracing::warn!(device_event, "vhost-user-blk: event for no queue"),
        }
        Ok(())
    }
}

/// How [`serve`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ended {
    /// The frontend disconnected.
    Disconnected,
    /// A [`StopHandle`] stopped it.
    Stopped,
}

/// Why [`serve`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The socket could not be created.
    #[error("cannot listen on the vhost-user socket {path}")]
    Listen {
        /// The socket's path.
        path: PathBuf,
        /// What failed.
        #[source]
        source: vhost::vhost_user::Error,
    },
    /// Waiting for a frontend failed.
    #[error("cannot wait for a frontend on {path}")]
    Accept {
        /// The socket's path.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// `vhost-user-backend` could not set up or run the connection.
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    /// The frontend broke the vhost-user protocol, or the connection failed.
    #[error("the vhost-user connection failed")]
    Connection(#[source] vhost::vhost_user::Error),
}

impl ServeError {
    fn daemon(e: vhost_user_backend::Error) -> ServeError {
        use vhost_user_backend::Error as E;
        match e {
            E::HandleRequest(e) | E::CreateBackendListener(e) | E::CreateBackendReqHandler(e) => {
                ServeError::Connection(e)
            }
            other => ServeError::Daemon(other.to_string()),
        }
    }
}

/// Stops a running [`serve`] from another thread (a signal handler's, say).
#[derive(Clone)]
pub struct StopHandle(Arc<StopInner>);

struct StopInner {
    consumer: EventConsumer,
    notifier: EventNotifier,
    state: Mutex<StopState>,
}

#[derive(Default)]
struct StopState {
    stopped: bool,
    connection: Option<ShutdownHandle>,
}

impl StopHandle {
    /// A handle nothing has stopped yet.
    pub fn new() -> io::Result<StopHandle> {
        let (consumer, notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK)?;
        Ok(StopHandle(Arc::new(StopInner {
            consumer,
            notifier,
            state: Mutex::new(StopState::default()),
        })))
    }

    /// Ends the [`serve`] this handle was given: it stops waiting for a frontend, or
    /// closes the connection it serves. Later calls do nothing.
    pub fn stop(&self) {
        let mut s = lock(&self.0.state);
        if s.stopped {
            return;
        }
        s.stopped = true;
        let _ = self.0.notifier.notify();
        if let Some(c) = &s.connection {
            c.shutdown();
        }
    }

    /// Whether [`StopHandle::stop`] was called.
    pub fn stopped(&self) -> bool {
        lock(&self.0.state).stopped
    }

    /// Records the connection to close; closes it at once if already stopped.
    fn watch(&self, c: Option<ShutdownHandle>) {
        let mut s = lock(&self.0.state);
        if s.stopped {
            if let Some(c) = &c {
                c.shutdown();
            }
        }
        s.connection = c;
    }
}

/// A vhost-user socket listening for one frontend (see [`BlkListener::serve`]). The socket
/// file is removed when it is dropped.
pub struct BlkListener {
    listener: Listener,
    path: PathBuf,
}

impl BlkListener {
    /// Listens on `socket`, replacing a stale socket file there.
    pub fn bind(socket: &Path) -> Result<BlkListener, ServeError> {
        let listener = Listener::new(socket, true).map_err(|source| ServeError::Listen {
            path: socket.to_owned(),
            source,
        })?;
        Ok(BlkListener {
            listener,
            path: socket.to_owned(),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves `blk` to the first frontend that connects until it disconnects or `stop` is
    /// stopped, then waits for the requests still running. Consumes the listener: the
    /// socket file is removed on return.
    pub fn serve(self, blk: VhostUserBlk, stop: &StopHandle) -> Result<Ended, ServeError> {
        let BlkListener { mut listener, path } = self;
        let mut daemon = VhostUserDaemon::new(
            "vhost-blk".into(),
            blk.clone(),
            GuestMemoryAtomic::new(Mem::new()),
        )
        .map_err(ServeError::daemon)?;
        let accept_err = |source| ServeError::Accept { path, source };
        if !wait_readable(listener.as_raw_fd(), stop).map_err(accept_err)? {
            return Ok(Ended::Stopped);
        }
        daemon.start(&mut listener).map_err(ServeError::daemon)?;
        stop.watch(daemon.shutdown_handle());
        let result = daemon.wait();
        stop.watch(None);
        // Dropping the daemon stops the queue threads; then let the pool finish.
        drop(daemon);
        blk.wait_idle();
        match result {
            Ok(()) => {}
            Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => {}
            Err(e) if !stop.stopped() => return Err(ServeError::daemon(e)),
            Err(_) => {}
        }
        Ok(if stop.stopped() {
            Ended::Stopped
        } else {
            Ended::Disconnected
        })
    }
}

/// [`BlkListener::bind`] then [`BlkListener::serve`].
pub fn serve(socket: &Path, blk: VhostUserBlk, stop: &StopHandle) -> Result<Ended, ServeError> {
    BlkListener::bind(socket)?.serve(blk, stop)
}

/// Waits until `fd` is readable (`true`) or `stop` is stopped (`false`).
fn wait_readable(fd: std::os::unix::io::RawFd, stop: &StopHandle) -> io::Result<bool> {
    loop {
        if stop.stopped() {
            return Ok(false);
        }
        let mut fds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.0.consumer.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call, and
        // both descriptors stay open (the listener and the handle are borrowed).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 || stop.stopped() {
            return Ok(false);
        }
        if fds[0].revents != 0 {
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod tests;
