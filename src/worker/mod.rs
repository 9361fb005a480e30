//! The queue worker: one thread, one virtqueue, one io_uring.
//!
//! Owns: the split ring of its queue (through virtio-queue's `Queue`), its IOVA mappings, its
//! io_uring and every request in flight on it. The thread waits on exactly one thing, its ring:
//! the kick eventfd and the stop eventfd are read through io_uring, so a single
//! `io_uring_enter` both submits a batch and parks.
//!
//! Per wake-up: reap completions (finish requests: status byte, used entry), drain the avail
//! ring in a batch (walk, parse, translate, queue SQEs), submit them with the next
//! `io_uring_enter`, and inject at most one interrupt, as EVENT_IDX allows.
//!
//! The edges are behind [`QueueEdge`]: where IOVA regions come from on a miss, and how an
//! interrupt reaches the driver. VDUSE and the in-process driver simulator implement it; the
//! rest of this module is the same code in both.
//!
//! Files: `uring.rs` owns the io_uring and every worker buffer an SQE points into (the
//! `user_data` keyspace and its compile-time checks live there too); `exec.rs` turns a parsed
//! request into SQEs and completions into an outcome (`ExecError`, exhaustively mapped to a
//! status byte); `error.rs` has the error types; `thread.rs` the thread; `chain.rs` the walk.
//! Every exit of a worker, errors and unwinding included, goes through `Worker`'s `Drop`,
//! which cancels and drains the ring before any memory an SQE references is released.
//!
//! A null backing ([`crate::backend::BackingKind::Null`]) changes one thing: every SQE a
//! request would queue is replaced by an `IORING_OP_NOP` with the same `user_data`, and a
//! read or write whose NOP completes with 0 counts as the full transfer. Everything else
//! (walk, parse, translation, io_uring round trip, status byte, used ring, interrupt) runs as
//! for a file, which is what makes it a measure of the data path's own cost.
//!
//! Driver-controlled input never panics this thread: a malformed request gets
//! `VIRTIO_BLK_S_IOERR` or `VIRTIO_BLK_S_UNSUPP`; a corrupt ring stops the worker with
//! [`WorkerError::Broken`] after every I/O in flight has completed (no buffer is released
//! while the kernel may still write into it).

pub mod chain;
mod error;
mod exec;
pub mod live;
mod poll;
mod thread;
mod uring;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use log::{debug, warn};
use nix::sys::eventfd::EventFd;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestAddress;

use crate::backend::Backend;
use crate::blk::request::{DeviceLimits, GuestRead};
use crate::blk::{
    parse_request, DwzSegment, Request, RequestKind, Segment, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_OK,
};
use crate::memory::umem::Umem;
use crate::memory::{IovaSpace, RegionSource};
use crate::metrics::{Clock, QueueStats, Stamps};
use crate::ratelimit::RateLimit;
use chain::walk_chain;
use error::ExecError;
pub use error::{BrokenReason, RingArea, WorkerError};
use exec::Submitted;
use live::LiveQueue;
pub use thread::{spawn, WorkerHandle, WorkerOptions};
use uring::{Cqe, Reserved, Uring, Wake};

/// Token of the kick eventfd read.
pub const KICK_TOKEN: u64 = Reserved::Kick as u64;
/// Token of the stop eventfd read.
pub const STOP_TOKEN: u64 = Reserved::Stop as u64;
/// Token of the cancellations issued at exit.
pub const CANCEL_TOKEN: u64 = Reserved::Cancel as u64;

/// Most SQEs one request can have in flight at once (WRITE_ZEROES fallback pairs).
const MAX_OPS_PER_REQUEST: usize = 2 * crate::blk::config::MAX_DWZ_SEGMENTS as usize;
/// The kick and stop reads are always armed.
const ARMED_READS: usize = 3;
/// The edges of a worker that differ between VDUSE and the simulator.
pub trait QueueEdge: RegionSource + Send + 'static {
    /// Tell the driver that the used ring moved (VDUSE: `VDUSE_VQ_INJECT_IRQ`).
    fn notify(&mut self) -> io::Result<()>;

    /// Whether data buffers live in a zero-copy area the worker should register with its
    /// io_uring as fixed buffers. Asked after each drain until the answer is not
    /// [`ZeroCopy::Pending`]; `served` says whether this worker has taken a request yet.
    fn zero_copy(&mut self, served: bool) -> ZeroCopy {
        let _ = served;
        ZeroCopy::Off
    }
}

/// What an edge says of the zero-copy area ([`QueueEdge::zero_copy`]).
#[derive(Debug)]
pub enum ZeroCopy {
    /// Not known yet (VDUSE: the bounce region exists only once the driver mapped a request).
    Pending,
    /// Not used: turned off, or not possible here and not required.
    Off,
    /// In use: data buffers inside this area may be read and written as fixed buffers.
    On(Umem),
    /// Required (`--zero-copy on`) and impossible: the worker stops with this reason.
    Failed(String),
}

/// Where a queue's rings are and where processing resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSetup {
    /// Queue index (for names and logs).
    pub index: u16,
    /// Negotiated size (a power of two).
    pub size: u16,
    /// Largest size the device offered.
    pub max_size: u16,
    /// IOVA of the descriptor table.
    pub desc_addr: u64,
    /// IOVA of the avail ring.
    pub avail_addr: u64,
    /// IOVA of the used ring.
    pub used_addr: u64,
    /// Next avail index to process.
    pub next_avail: u16,
    /// Next used index to publish.
    pub next_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX negotiated.
    pub event_idx: bool,
}

/// What a worker shares with the other workers of its device.
#[derive(Debug)]
pub struct DeviceIo {
    /// The backing store.
    pub backend: Arc<Backend>,
    /// GET_ID answer (NUL padded).
    pub serial: [u8; VIRTIO_BLK_ID_BYTES],
    /// Capacity in bytes now (starts as the backend's; an online resize changes it).
    /// Workers read it once per batch.
    capacity: AtomicU64,
}

impl DeviceIo {
    /// What the workers of `backend` share.
    pub fn new(backend: Arc<Backend>, serial: [u8; VIRTIO_BLK_ID_BYTES]) -> Self {
        let capacity = AtomicU64::new(backend.capacity);
        DeviceIo {
            backend,
            serial,
            capacity,
        }
    }

    /// Capacity in bytes now.
    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Relaxed)
    }

    /// Change the capacity requests are checked against (from the next batch on).
    pub fn set_capacity(&self, bytes: u64) {
        self.capacity.store(bytes, Ordering::Relaxed);
    }

    fn limits(&self) -> DeviceLimits {
        DeviceLimits {
            capacity: self.capacity(),
            read_only: self.backend.read_only,
        }
    }
}

/// How a worker ended.
#[derive(Debug)]
pub struct WorkerExit {
    /// Where a restarted worker resumes (next avail / next used).
    pub next_avail: u16,
    /// Next used index.
    pub next_used: u16,
    /// Counters and latency.
    pub stats: QueueStats,
}

/// One request in flight, kept in the slot of its head index. (Its iovec array is owned by
/// the [`Uring`], which keeps it out of reach while an SQE references it.)
#[derive(Default)]
struct Slot {
    busy: bool,
    /// Worst-case SQEs reserved for this request.
    reserved: usize,
    /// The first failure; `None` finishes with `VIRTIO_BLK_S_OK`.
    error: Option<ExecError>,
    kind: RequestKind,
    status_addr: Option<u64>,
    data_len: u64,
    expect: u64,
    dwz: Vec<DwzSegment>,
    started: Option<Started>,
}

/// The clock readings of a request up to its submission (the rest are taken when it ends).
#[derive(Debug, Clone, Copy)]
struct Started {
    wake: u64,
    pop: u64,
    submit: Option<u64>,
}

/// Adapts the worker's IOVA space to the parser's and walker's readers.
struct MemView<'a, E> {
    space: &'a mut IovaSpace,
    edge: &'a mut E,
}

impl<E: RegionSource> GuestRead for MemView<'_, E> {
    fn read_at(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), u64> {
        self.space.read(self.edge, addr, buf).map_err(|e| e.iova())
    }
}

struct Worker<E: QueueEdge> {
    index: u16,
    /// The ring and the buffers its SQEs reference. `Drop` drains it while `space` (the
    /// driver memory the SQEs point into) is still alive, and leaks `space` if it cannot.
    uring: Uring,
    queue: Queue,
    space: IovaSpace,
    edge: E,
    device: Arc<DeviceIo>,
    limits: DeviceLimits,
    slots: Vec<Slot>,
    /// Worst-case SQEs of every admitted request (WRITE_ZEROES fallbacks double a range).
    reserved_ops: usize,
    segs: Vec<Segment>,
    req: Request,
    kick: OwnedFd,
    stop: Arc<EventFd>,
    stopping: bool,
    throttled: bool,
    used_added: bool,
    zero_range_ok: bool,
    broken: Option<BrokenReason>,
    cqes: Vec<Cqe>,
    stats: QueueStats,
    /// Busy-poll window after the last work (`serve --poll-us`); zero: never poll.
    poll: Duration,
    /// The edge has not yet said whether a zero-copy area is in use.
    zero_copy_pending: bool,
    /// Zero copy was required and is impossible: the worker stops with this reason once
    /// what it took is finished.
    zero_copy_failed: Option<String>,
    /// Where this worker started in the avail ring (it has served requests once it moved).
    first_avail: u16,
    /// One clock reading per batch: taken when a drain starts popping and when a batch of
    /// completions is reaped; requests started or finished in that batch use it.
    now: u64,
    /// The batch clock.
    clock: Clock,
    /// When the worker last woke: its wait returned with completions, or a poll turn found
    /// requests.
    wake: u64,
    /// Requests whose SQEs are queued but not yet submitted by an `io_uring_enter`.
    unsubmitted: Vec<u16>,
    /// Requests finished in this batch, waiting for the batch's publish and interrupt
    /// readings before their stages are recorded.
    done: Vec<(RequestKind, Started, u64)>,
    /// When the last reap had written its batch's used entries (taken only when it finished
    /// requests): the end of their "complete" stage, before any drain that follows.
    published_at: Option<u64>,
    /// Where a live view asks for copies of `stats`; told when the worker ends.
    live: Option<Arc<LiveQueue>>,
    /// Record per-stage spans (`--no-stage-stats` turns it off: two clock readings per
    /// batch fewer, and no stage histograms).
    stage_stats: bool,
    /// Rate limit of the backing-store error log (`exec.rs`).
    backing_log: RateLimit,
}

impl<E: QueueEdge> Drop for Worker<E> {
    /// On every exit path (errors and unwinding included) nothing may still be written by
    /// the kernel once the worker's memory is released.
    fn drop(&mut self) {
        if let Err(e) = self.uring.shutdown() {
            warn!(
                "queue {}: io_uring cannot be drained ({e}): leaking the IOVA mappings",
                self.index
            );
            std::mem::forget(std::mem::take(&mut self.space));
        }
        // An error path: the live view keeps what was counted and stops waiting for us.
        if let Some(l) = self.live.take() {
            l.retire(&self.stats);
        }
    }
}

fn setup_queue(setup: &QueueSetup) -> Result<Queue, BrokenReason> {
    let mut queue =
        Queue::new(setup.max_size.max(setup.size)).map_err(|source| BrokenReason::QueueSize {
            size: setup.max_size.max(setup.size),
            source,
        })?;
    queue
        .try_set_size(setup.size)
        .map_err(|source| BrokenReason::QueueSize {
            size: setup.size,
            source,
        })?;
    let addr = |area| move |source| BrokenReason::Address { area, source };
    queue
        .try_set_desc_table_address(GuestAddress(setup.desc_addr))
        .map_err(addr(RingArea::DescTable))?;
    queue
        .try_set_avail_ring_address(GuestAddress(setup.avail_addr))
        .map_err(addr(RingArea::AvailRing))?;
    queue
        .try_set_used_ring_address(GuestAddress(setup.used_addr))
        .map_err(addr(RingArea::UsedRing))?;
    queue.set_event_idx(setup.event_idx);
    queue.set_next_avail(setup.next_avail);
    queue.set_next_used(setup.next_used);
    queue.set_ready(true);
    Ok(queue)
}

/// Map the three ring areas up front (the used ring writable), so that every ring access
/// virtio-queue makes afterwards hits a mapping.
fn map_rings(
    setup: &QueueSetup,
    queue: &Queue,
    edge: &mut impl RegionSource,
) -> Result<IovaSpace, BrokenReason> {
    let n = u64::from(setup.size);
    let mut space = IovaSpace::new();
    let areas = [
        (RingArea::DescTable, setup.desc_addr, 16 * n, false),
        (RingArea::AvailRing, setup.avail_addr, 6 + 2 * n, false),
        (RingArea::UsedRing, setup.used_addr, 6 + 8 * n, true),
    ];
    for (area, addr, len, write) in areas {
        space
            .ensure(edge, addr, len, write)
            .map_err(|source| BrokenReason::AreaUnmapped { area, source })?;
    }
    if !queue.is_valid(space.memory()) {
        return Err(BrokenReason::InvalidAreas);
    }
    Ok(space)
}

impl<E: QueueEdge> Worker<E> {
    fn new(
        setup: QueueSetup,
        device: Arc<DeviceIo>,
        mut edge: E,
        kick: OwnedFd,
        stop: Arc<EventFd>,
        poll: Duration,
    ) -> Result<Self, WorkerError> {
        let index = setup.index;
        let uring = Uring::new(
            setup.size,
            device.backend.raw_fd(),
            device.backend.is_null(),
        )
        .map_err(|source| WorkerError::Setup {
            queue: index,
            source,
        })?;
        let broken = |reason| WorkerError::Broken {
            queue: index,
            reason,
            stats: Box::default(),
        };
        let queue = setup_queue(&setup).map_err(broken)?;
        let space = map_rings(&setup, &queue, &mut edge).map_err(broken)?;
        let limits = device.limits();
        let mut slots = Vec::with_capacity(usize::from(setup.size));
        slots.resize_with(usize::from(setup.size), Slot::default);
        let cq = uring.cq_capacity();
        Ok(Worker {
            index,
            uring,
            queue,
            space,
            edge,
            device,
            limits,
            slots,
            reserved_ops: 0,
            segs: Vec::new(),
            req: Request::default(),
            kick,
            stop,
            stopping: false,
            throttled: false,
            used_added: false,
            zero_range_ok: true,
            broken: None,
            cqes: Vec::with_capacity(cq),
            stats: QueueStats::default(),
            poll,
            zero_copy_pending: true,
            zero_copy_failed: None,
            first_avail: setup.next_avail,
            now: 0,
            clock: Clock::default(),
            wake: 0,
            unsubmitted: Vec::with_capacity(usize::from(setup.size)),
            done: Vec::with_capacity(usize::from(setup.size)),
            published_at: None,
            live: None,
            stage_stats: true,
            backing_log: RateLimit::new(exec::BACKING_LOG_INTERVAL),
        })
    }

    fn uring_err(&self, source: io::Error) -> WorkerError {
        WorkerError::Uring {
            queue: self.index,
            source,
        }
    }

    fn arm(&mut self, w: Wake) -> Result<(), WorkerError> {
        let fd = match (w, &self.live) {
            (Wake::Kick, _) => self.kick.as_raw_fd(),
            (Wake::Stop, _) => self.stop.as_raw_fd(),
            (Wake::Stats, Some(l)) => l.wake_fd().as_raw_fd(),
            (Wake::Stats, None) => return Ok(()),
        };
        self.uring.arm(w, fd).map_err(|e| self.uring_err(e))
    }

    /// Every return, `?` included, leaves the ring to `Drop`, which drains it.
    fn run(&mut self) -> Result<WorkerExit, WorkerError> {
        self.arm(Wake::Kick)?;
        self.arm(Wake::Stop)?;
        if let Some(l) = &self.live {
            l.started();
        }
        self.arm(Wake::Stats)?;
        // Kicks may have been latched before our eventfd was installed: look once.
        self.wake = self.clock.now();
        self.drain();
        self.resolve_zero_copy();
        self.notify_if_needed();
        loop {
            // Checked before waiting, not only after a wake-up: the first drain above may
            // already have found the ring corrupt, and then no kick need ever come.
            if self.broken.is_some() {
                self.stopping = true;
            }
            if self.stopping && self.uring.ops_in_flight() == 0 {
                break;
            }
            self.poll()?;
            if self.stopping && self.uring.ops_in_flight() == 0 {
                continue;
            }
            self.stamp_submit();
            self.uring.wait().map_err(|e| self.uring_err(e))?;
            let kicked = self.reap()?;
            if !self.stopping && self.broken.is_none() && (kicked || self.throttled) {
                self.drain();
                self.resolve_zero_copy();
            }
            self.notify_if_needed();
        }
        self.report_suppressed_backing_errors();
        // Cancel the eventfd reads still armed and wait for their completions.
        self.uring.shutdown().map_err(|e| self.uring_err(e))?;
        self.stats.fixed_ios = self.uring.fixed_ops();
        if let Some(l) = self.live.take() {
            l.retire(&self.stats);
        }
        let stats = std::mem::take(&mut self.stats);
        if let Some(reason) = self.zero_copy_failed.take() {
            return Err(WorkerError::ZeroCopy {
                queue: self.index,
                reason,
            });
        }
        if let Some(reason) = self.broken.take() {
            return Err(WorkerError::Broken {
                queue: self.index,
                reason,
                stats: Box::new(stats),
            });
        }
        Ok(WorkerExit {
            next_avail: self.queue.next_avail(),
            next_used: self.queue.next_used(),
            stats,
        })
    }

    /// Ask the edge about zero copy until it knows; register the area as fixed buffers once
    /// it is in use. A ring that refuses the registration keeps the vectored path (on the
    /// same memory). Required and impossible: the worker stops taking requests, finishes and
    /// publishes what it took (through the kernel's bounce pages), then ends with the reason.
    pub(super) fn resolve_zero_copy(&mut self) {
        if !self.zero_copy_pending {
            return;
        }
        let served = self.queue.next_avail() != self.first_avail;
        match self.edge.zero_copy(served) {
            ZeroCopy::Pending => return,
            ZeroCopy::Off => {}
            ZeroCopy::On(umem) => {
                if let Err(e) = self.uring.register_fixed(umem) {
                    warn!(
                        "queue {}: io_uring refused the zero-copy area as fixed buffers ({e}): \
                         reads and writes use it through iovecs",
                        self.index
                    );
                }
            }
            ZeroCopy::Failed(reason) => {
                warn!(
                    "queue {}: stopping: zero copy is required: {reason}",
                    self.index
                );
                self.zero_copy_failed = Some(reason);
                self.stopping = true;
            }
        }
        self.zero_copy_pending = false;
    }

    /// Handle every completion; returns whether the driver kicked.
    fn reap(&mut self) -> Result<bool, WorkerError> {
        self.uring.reap(&mut self.cqes);
        if !self.cqes.is_empty() {
            self.now = self.clock.now();
            self.wake = self.now;
        }
        let mut ops = 0u64;
        let mut kicked = false;
        for i in 0..self.cqes.len() {
            match self.cqes[i] {
                Cqe::Wake(Wake::Kick, res) => {
                    kicked = true;
                    self.stats.kicks += 1;
                    if res < 0 && res != -libc::EAGAIN {
                        warn!("queue {}: kick read failed: {res}", self.index);
                    }
                    if !self.stopping {
                        self.arm(Wake::Kick)?;
                    }
                }
                Cqe::Wake(Wake::Stats, res) => {
                    if res >= 0 {
                        self.answer_live();
                    }
                    if !self.stopping {
                        self.arm(Wake::Stats)?;
                    }
                }
                Cqe::Wake(Wake::Stop, res) if res == -libc::EAGAIN => self.arm(Wake::Stop)?,
                Cqe::Wake(Wake::Stop, _) => self.stopping = true,
                Cqe::Op(token, res) => {
                    ops += 1;
                    self.complete_op(token, res);
                }
            }
        }
        if ops > 0 {
            self.stats.stages.reap_batch.saturating_record(ops);
            if !self.done.is_empty() {
                self.published_at = Some(self.clock.now());
            }
        }
        Ok(kicked)
    }

    /// Copy the counters for the live view, with the gauges of this moment.
    fn answer_live(&mut self) {
        self.stats.fixed_ios = self.uring.fixed_ops();
        self.stats.in_flight = self.slots.iter().filter(|s| s.busy).count() as u64;
        if let Some(l) = &self.live {
            l.answer(&self.stats);
        }
    }

    fn mark_broken(&mut self, reason: BrokenReason) {
        if self.broken.is_none() {
            warn!(
                "queue {}: marking device broken: {}",
                self.index,
                error::Chained(&reason)
            );
            self.broken = Some(reason);
        }
    }

    /// Drain the avail ring: the canonical disable / process / re-enable loop.
    fn drain(&mut self) {
        self.throttled = false;
        loop {
            if let Err(e) = self.queue.disable_notification(self.space.memory()) {
                self.mark_broken(BrokenReason::RingFlags(e));
                return;
            }
            if !self.pop_all() {
                return;
            }
            match self.queue.enable_notification(self.space.memory()) {
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => {
                    self.mark_broken(BrokenReason::RingFlags(e));
                    return;
                }
            }
        }
    }

    /// Start every request the avail ring holds. `false` when the worker must stop looking
    /// for now: the ring is broken, or the completion queue has no room (`throttled`).
    fn pop_all(&mut self) -> bool {
        self.now = self.clock.now();
        self.limits.capacity = self.device.capacity();
        let first = self.queue.next_avail();
        let more = self.pop_each();
        let popped = self.queue.next_avail().wrapping_sub(first);
        if popped > 0 {
            self.stats
                .stages
                .drain_batch
                .saturating_record(u64::from(popped));
        }
        more
    }

    /// Stamp the requests queued since the last enter with this one's reading.
    fn stamp_submit(&mut self) {
        if self.unsubmitted.is_empty() {
            return;
        }
        let t = self.clock.now();
        for &h in &self.unsubmitted {
            if let Some(st) = self.slots[usize::from(h)].started.as_mut() {
                st.submit = Some(t);
            }
        }
        self.unsubmitted.clear();
    }

    fn pop_each(&mut self) -> bool {
        loop {
            if self.reserved_ops + MAX_OPS_PER_REQUEST + ARMED_READS > self.uring.cq_capacity() {
                self.throttled = true;
                return false;
            }
            // virtio-queue pops the head (avail index checks, next_avail); its chain
            // iterator is not used: `chain::walk_chain` reports what it would hide.
            let head = match self.queue.iter(self.space.memory()) {
                Ok(mut it) => match it.next() {
                    Some(chain) => chain.head_index(),
                    None => return true,
                },
                Err(e) => {
                    self.mark_broken(BrokenReason::AvailRing(e));
                    return false;
                }
            };
            self.start_request(head);
            if self.broken.is_some() {
                return false;
            }
        }
    }

    /// Walk the chain of `head` into `self.segs`; `false` when it was already dealt with
    /// (ring broken, or answered with a used entry of length 0).
    fn walk(&mut self, head: u16) -> bool {
        let walked = {
            let mut view = MemView {
                space: &mut self.space,
                edge: &mut self.edge,
            };
            walk_chain(
                &mut view,
                self.queue.desc_table(),
                self.queue.size(),
                head,
                &mut self.segs,
            )
        };
        match walked {
            Ok(()) => true,
            Err(kind) if kind.corrupts_ring() => {
                self.mark_broken(BrokenReason::Chain { head, kind });
                false
            }
            Err(e) => {
                // The ring is intact but the request has no status byte we can find.
                debug!("queue {}: head {head}: {e}", self.index);
                self.stats.unanswerable += 1;
                self.publish(head, 0);
                false
            }
        }
    }

    fn start_request(&mut self, head: u16) {
        let started = Started {
            wake: self.wake,
            pop: self.now,
            submit: None,
        };
        // A head still in flight is a duplicate whatever its chain looks like now: check
        // before walking, so that no path below can publish a used entry for it.
        // (An out-of-range head has no slot; the walk reports it.)
        if self.slots.get(usize::from(head)).is_some_and(|s| s.busy) {
            self.mark_broken(BrokenReason::DuplicateHead(head));
            return;
        }
        if !self.walk(head) {
            return;
        }
        let parsed = {
            let mut view = MemView {
                space: &mut self.space,
                edge: &mut self.edge,
            };
            parse_request(&self.segs, &mut view, &self.limits, &mut self.req)
        };
        // Without a writable status byte the driver could not learn the outcome: do no I/O.
        let answerable = match self.req.status_addr {
            Some(addr) => self.space.ensure(&mut self.edge, addr, 1, true).is_ok(),
            None => false,
        };
        if !answerable {
            debug!("queue {}: head {head}: no writable status byte", self.index);
            self.stats.unanswerable += 1;
            self.publish(head, 0);
            return;
        }
        let worst = match (&parsed, self.req.kind) {
            (Err(_), _) | (_, RequestKind::GetId) => 0,
            (_, RequestKind::Read | RequestKind::Write | RequestKind::Flush) => 1,
            (_, RequestKind::Discard) => self.req.dwz.len(),
            (_, RequestKind::WriteZeroes) => 2 * self.req.dwz.len(),
        };
        self.reserved_ops += worst;
        let slot = &mut self.slots[usize::from(head)];
        slot.reserved = worst;
        slot.busy = true;
        slot.error = None;
        slot.kind = self.req.kind;
        slot.status_addr = self.req.status_addr;
        slot.data_len = self.req.data_len;
        slot.started = Some(started);
        slot.dwz.clear();
        let submitted = match parsed {
            Ok(()) => self.submit_request(head),
            Err(e) => Err(ExecError::from(e)),
        };
        match submitted {
            Ok(Submitted::Queued) if self.stage_stats => self.unsubmitted.push(head),
            Ok(Submitted::Queued) => {}
            Ok(Submitted::Done) => self.finish(head),
            Err(e) => {
                self.fail(head, e);
                self.finish(head);
            }
        }
    }

    /// Write the status byte, publish the used entry, count.
    fn finish(&mut self, head: u16) {
        let idx = usize::from(head);
        let slot = &mut self.slots[idx];
        slot.busy = false;
        self.reserved_ops -= std::mem::take(&mut slot.reserved);
        let status = slot.error.take().map_or(VIRTIO_BLK_S_OK, |e| e.status());
        let kind = slot.kind;
        let data_len = slot.data_len;
        let status_addr = slot.status_addr;
        let started = slot.started.take();
        let ok = status == VIRTIO_BLK_S_OK;
        let written = status_addr
            .is_some_and(|addr| self.space.write(&mut self.edge, addr, &[status]).is_ok());
        let used_len = if written {
            let data = match kind {
                RequestKind::Read if ok => data_len,
                RequestKind::GetId if ok => VIRTIO_BLK_ID_BYTES as u64,
                _ => 0,
            };
            // Bounded by the chain's u32 lengths.
            (data + 1).min(u64::from(u32::MAX)) as u32
        } else {
            self.stats.unanswerable += 1;
            0
        };
        if ok {
            self.count_ok(kind, data_len);
        } else {
            self.stats.errors += 1;
        }
        if let Some(t) = started {
            self.stats
                .latency
                .saturating_record(self.now.saturating_sub(t.pop));
            if self.stage_stats {
                self.done.push((kind, t, self.now));
            }
        }
        self.publish(head, used_len);
    }

    fn count_ok(&mut self, kind: RequestKind, data_len: u64) {
        let s = &mut self.stats;
        match kind {
            RequestKind::Read => {
                s.reads += 1;
                s.bytes_read += data_len;
            }
            RequestKind::Write => {
                s.writes += 1;
                s.bytes_written += data_len;
            }
            RequestKind::Flush => s.flushes += 1,
            RequestKind::GetId => s.get_ids += 1,
            RequestKind::Discard => s.discards += 1,
            RequestKind::WriteZeroes => s.write_zeroes += 1,
        }
    }

    fn publish(&mut self, head: u16, used_len: u32) {
        if self.broken.is_some() {
            return;
        }
        match self.queue.add_used(self.space.memory(), head, used_len) {
            Ok(()) => self.used_added = true,
            Err(e) => self.mark_broken(BrokenReason::UsedWrite(e)),
        }
    }

    /// Inject the batch's interrupt if needed, then record the stages of the requests the
    /// batch finished (two clock readings, only when it finished any).
    fn notify_if_needed(&mut self) {
        let published_at = self.published_at.take();
        let published =
            (!self.done.is_empty()).then(|| published_at.unwrap_or_else(|| self.clock.now()));
        self.notify();
        if let Some(published) = published {
            let irq = self.clock.now();
            let stages = &mut self.stats.stages;
            // Requests of one drain finished in one reap share every reading: record each
            // run of equal ones at once.
            let mut run: Option<(RequestKind, Stamps, u64)> = None;
            for (kind, st, reaped) in self.done.drain(..) {
                let submit = st.submit.unwrap_or(st.pop);
                let stamps = Stamps {
                    wake: st.wake,
                    pop: st.pop,
                    submit,
                    reaped: reaped.max(submit),
                    published,
                    irq,
                };
                match &mut run {
                    Some((k, s, n)) if *k == kind && *s == stamps => *n += 1,
                    _ => {
                        if let Some((k, s, n)) = run.replace((kind, stamps, 1)) {
                            stages.record_n(k, &s, n);
                        }
                    }
                }
            }
            if let Some((k, s, n)) = run {
                stages.record_n(k, &s, n);
            }
        }
    }

    fn notify(&mut self) {
        if !self.used_added || self.broken.is_some() {
            return;
        }
        self.used_added = false;
        match self.queue.needs_notification(self.space.memory()) {
            Ok(true) => {
                self.stats.interrupts += 1;
                if let Err(e) = self.edge.notify() {
                    debug!("queue {}: interrupt not delivered: {e}", self.index);
                }
            }
            Ok(false) => {}
            Err(e) => self.mark_broken(BrokenReason::UsedEvent(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::uring::Referenced;
    use super::*;
    use crate::sim::blk::BlkRequest;
    use crate::sim::{SimDevice, SimDeviceConfig};

    /// A worker whose io_uring fails mid-flight returns the error with every SQE-referenced
    /// buffer still owned, and releases them only once shutdown has reaped every CQE.
    #[test]
    fn a_uring_failure_mid_flight_releases_buffers_only_after_their_cqes() {
        if !crate::sim::io_uring_available() {
            return;
        }
        let mut cfg = SimDeviceConfig::new(1 << 20);
        cfg.queue_size = 16;
        let mut d = SimDevice::create(cfg).unwrap();
        for i in 0..4 {
            // Two data descriptors: a readv whose iovec array the ring owns.
            let mut r = BlkRequest::read(i * 8, 4096);
            r.in_chunk = 2048;
            let c = r.chain(&d.mem).unwrap();
            d.queues[0].add(c).unwrap();
        }
        d.queues[0].publish().unwrap();
        let setup = d.queues[0].setup(0, 0);
        let (kick, edge) = d.queues[0].connect().unwrap();
        let stop =
            Arc::new(EventFd::from_flags(nix::sys::eventfd::EfdFlags::EFD_NONBLOCK).unwrap());
        let io = Arc::clone(d.device_io());
        let mut w = Worker::new(setup, io, edge, kick, stop, Duration::ZERO).unwrap();
        w.uring.fail_wait_after(0);
        match w.run() {
            Err(WorkerError::Uring { source, .. }) => {
                assert_eq!(source.raw_os_error(), Some(libc::EIO))
            }
            other => panic!("expected the injected io_uring error, got {other:?}"),
        }
        // Kick and stop reads plus four readvs, none of them submitted yet: all still owned.
        let live = Referenced {
            sqes: 6,
            event_bufs: 2,
            slots: 4,
        };
        assert_eq!(
            w.uring.referenced(),
            live,
            "an error path released a buffer"
        );
        w.uring.shutdown().unwrap();
        assert_eq!(w.uring.referenced(), Referenced::default());
        drop(w);
        assert!(
            d.queues[0].reap().unwrap().is_empty(),
            "the driver saw nothing of the failed worker"
        );
    }
}
