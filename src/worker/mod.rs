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
//! `user_data` keyspace: the low 16 bits are the slot (the chain's head index, dense and
//! `< queue size`), bits 16..24 the operation kind (`Op`), bits 24..40 the DISCARD /
//! WRITE_ZEROES segment index. [`KICK_TOKEN`] and [`STOP_TOKEN`] have bit 63 set, which no
//! request token has.
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

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use io_uring::{opcode, squeue, types, IoUring};
use log::{debug, warn};
use nix::sys::eventfd::{EfdFlags, EventFd};
use thiserror::Error;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestAddress;

use crate::backend::Backend;
use crate::blk::request::{DeviceLimits, GuestRead};
use crate::blk::{
    parse_request, DwzSegment, Request, RequestKind, Segment, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
};
use crate::memory::{IovaSpace, RegionSource};
use crate::metrics::QueueStats;
use chain::{walk_chain, DescRead};

/// `PR_SET_IO_FLUSHER` (linux/prctl.h, 5.6+); not exported by the libc crate.
const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// Token of the kick eventfd read.
pub const KICK_TOKEN: u64 = 1 << 63;
/// Token of the stop eventfd read.
pub const STOP_TOKEN: u64 = (1 << 63) | 1;
/// Token of the cancellations issued at exit.
pub const CANCEL_TOKEN: u64 = (1 << 63) | 2;
const _: () = assert!(KICK_TOKEN & 0xff_ffff_ffff == 0 && STOP_TOKEN != KICK_TOKEN);

/// Most SQEs one request can have in flight at once (WRITE_ZEROES fallback pairs).
const MAX_OPS_PER_REQUEST: usize = 2 * crate::blk::config::MAX_DWZ_SEGMENTS as usize;
/// The kick and stop reads are always armed.
const ARMED_READS: usize = 2;
/// `IOV_MAX`: the most iovecs one readv/writev takes.
const IOV_MAX: usize = 1024;

/// The operation a completion belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    /// read/readv/write/writev.
    Rw = 0,
    /// fsync(DATASYNC).
    Flush = 1,
    /// DISCARD: fallocate(PUNCH_HOLE|KEEP_SIZE); EOPNOTSUPP is not an error (a hint).
    Discard = 2,
    /// WRITE_ZEROES with unmap: PUNCH_HOLE; on EOPNOTSUPP fall back to ZeroRange.
    WzPunch = 3,
    /// WRITE_ZEROES: ZERO_RANGE; on EOPNOTSUPP fall back to a punch + allocate pair.
    WzZero = 4,
    /// The punch half of the fallback pair (linked to the next).
    WzPairPunch = 5,
    /// The allocate half of the fallback pair.
    WzPairAlloc = 6,
}

impl Op {
    fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            0 => Op::Rw,
            1 => Op::Flush,
            2 => Op::Discard,
            3 => Op::WzPunch,
            4 => Op::WzZero,
            5 => Op::WzPairPunch,
            6 => Op::WzPairAlloc,
            _ => return None,
        })
    }
}

fn token(slot: u16, op: Op, seg: usize) -> u64 {
    u64::from(slot) | (u64::from(op as u8) << 16) | ((seg as u64 & 0xffff) << 24)
}

fn untoken(t: u64) -> (u16, Option<Op>, usize) {
    (
        (t & 0xffff) as u16,
        Op::from_u8(((t >> 16) & 0xff) as u8),
        ((t >> 24) & 0xffff) as usize,
    )
}

/// The edges of a worker that differ between VDUSE and the simulator.
pub trait QueueEdge: RegionSource + Send + 'static {
    /// Tell the driver that the used ring moved (VDUSE: `VDUSE_VQ_INJECT_IRQ`).
    fn notify(&mut self) -> io::Result<()>;
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
}

impl DeviceIo {
    fn limits(&self) -> DeviceLimits {
        DeviceLimits {
            capacity: self.backend.capacity,
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

/// Why a worker stopped other than on request.
#[derive(Debug, Error)]
pub enum WorkerError {
    /// The driver corrupted the ring; the device must be marked broken.
    #[error("queue {queue}: ring is corrupt: {reason}")]
    Broken {
        /// Queue index.
        queue: u16,
        /// What was wrong.
        reason: String,
        /// Counters up to the failure.
        stats: Box<QueueStats>,
    },
    /// Setting up the ring or the thread failed.
    #[error("queue {queue}: setup failed: {source}")]
    Setup {
        /// Queue index.
        queue: u16,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// io_uring itself failed.
    #[error("queue {queue}: io_uring failed: {source}")]
    Uring {
        /// Queue index.
        queue: u16,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The worker thread panicked (a bug, never driver input).
    #[error("queue {0}: worker panicked")]
    Panicked(u16),
}

/// A running worker.
pub struct WorkerHandle {
    stop: Arc<EventFd>,
    join: Option<JoinHandle<Result<WorkerExit, WorkerError>>>,
    index: u16,
}

impl WorkerHandle {
    /// Queue index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Ask the worker to stop taking requests, finish those in flight, and exit.
    pub fn request_stop(&self) {
        if let Err(e) = self.stop.write(1) {
            warn!("queue {}: cannot signal stop: {e}", self.index);
        }
    }

    /// Whether the thread has ended (for a broken queue, without being asked).
    pub fn is_finished(&self) -> bool {
        self.join.as_ref().is_none_or(|j| j.is_finished())
    }

    /// Stop and wait for the worker.
    pub fn stop(mut self) -> Result<WorkerExit, WorkerError> {
        self.request_stop();
        self.join_inner()
    }

    fn join_inner(&mut self) -> Result<WorkerExit, WorkerError> {
        match self.join.take() {
            Some(j) => j.join().unwrap_or(Err(WorkerError::Panicked(self.index))),
            None => Err(WorkerError::Panicked(self.index)),
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        if self.join.is_some() {
            self.request_stop();
            let _ = self.join_inner();
        }
    }
}

/// Options for [`spawn`].
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// CPU to pin the thread to.
    pub cpu: Option<usize>,
    /// Thread name.
    pub name: String,
}

/// Start a worker thread for one queue. `kick` is the eventfd the driver's notifications
/// arrive on; the worker owns it from now on.
pub fn spawn<E: QueueEdge>(
    setup: QueueSetup,
    device: Arc<DeviceIo>,
    edge: E,
    kick: OwnedFd,
    opts: WorkerOptions,
) -> io::Result<WorkerHandle> {
    let stop = Arc::new(EventFd::from_flags(
        EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
    )?);
    let stop2 = Arc::clone(&stop);
    let index = setup.index;
    let join = std::thread::Builder::new()
        .name(opts.name.clone())
        .spawn(move || {
            catch_unwind(AssertUnwindSafe(|| {
                thread_setup(&opts, index);
                let mut w = Worker::new(setup, device, edge, kick, stop2)?;
                w.run()
            }))
            .unwrap_or(Err(WorkerError::Panicked(index)))
        })?;
    Ok(WorkerHandle {
        stop,
        join: Some(join),
        index,
    })
}

fn thread_setup(opts: &WorkerOptions, index: u16) {
    if let Some(cpu) = opts.cpu {
        if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
            warn!("queue {index}: cannot pin to CPU {cpu}");
        }
    }
    // PR_SET_IO_FLUSHER: this thread writes back for the block layer; keep memory reclaim from
    // recursing into it. Needs CAP_SYS_RESOURCE.
    // SAFETY: prctl with PR_SET_IO_FLUSHER takes four integer arguments and touches no memory.
    let rc = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
    if rc != 0 {
        debug!(
            "queue {index}: PR_SET_IO_FLUSHER refused: {}",
            io::Error::last_os_error()
        );
    }
}

/// One request in flight, kept in the slot of its head index.
#[derive(Default)]
struct Slot {
    busy: bool,
    /// Worst-case SQEs reserved for this request.
    reserved: usize,
    pending: u32,
    failed: bool,
    kind: RequestKind,
    status_addr: Option<u64>,
    data_len: u64,
    expect: u64,
    iov: Vec<libc::iovec>,
    dwz: Vec<DwzSegment>,
    started: Option<Instant>,
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

impl<E: RegionSource> DescRead for MemView<'_, E> {
    fn read_desc(&mut self, addr: u64) -> Option<Descriptor> {
        let mut raw = [0u8; 16];
        self.space.read(self.edge, addr, &mut raw).ok()?;
        let a = u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes"));
        let l = u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes"));
        let f = u16::from_le_bytes(raw[12..14].try_into().expect("2 bytes"));
        let n = u16::from_le_bytes(raw[14..16].try_into().expect("2 bytes"));
        Some(Descriptor::new(a, l, f, n))
    }
}

struct Worker<E: QueueEdge> {
    index: u16,
    ring: IoUring,
    queue: Queue,
    space: IovaSpace,
    edge: E,
    device: Arc<DeviceIo>,
    limits: DeviceLimits,
    slots: Vec<Slot>,
    ops_in_flight: usize,
    /// Worst-case SQEs of every admitted request (WRITE_ZEROES fallbacks double a range).
    reserved_ops: usize,
    op_capacity: usize,
    segs: Vec<Segment>,
    req: Request,
    kick: OwnedFd,
    stop: Arc<EventFd>,
    kick_buf: Box<u64>,
    stop_buf: Box<u64>,
    kick_armed: bool,
    stop_armed: bool,
    stopping: bool,
    throttled: bool,
    used_added: bool,
    zero_range_ok: bool,
    /// The backing is null: queue NOPs instead of I/O (see the module docs).
    null: bool,
    broken: Option<String>,
    cqes: Vec<(u64, i32)>,
    stats: QueueStats,
}

fn ring_for(size: u16) -> io::Result<(IoUring, usize)> {
    let sq = u32::from(size).clamp(32, 4096).next_power_of_two();
    let cq = (u32::from(size) * 2 + 64)
        .next_power_of_two()
        .clamp(64, 65536);
    let build = |defer: bool| {
        let mut b = IoUring::builder();
        b.setup_cqsize(cq);
        if defer {
            b.setup_single_issuer().setup_defer_taskrun();
        }
        b.build(sq)
    };
    // DEFER_TASKRUN (6.1+) keeps completion work on this thread; older kernels refuse it.
    let ring = match build(true) {
        Ok(r) => r,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => build(false)?,
        Err(e) => return Err(e),
    };
    Ok((ring, cq as usize))
}

impl<E: QueueEdge> Worker<E> {
    fn new(
        setup: QueueSetup,
        device: Arc<DeviceIo>,
        mut edge: E,
        kick: OwnedFd,
        stop: Arc<EventFd>,
    ) -> Result<Self, WorkerError> {
        let index = setup.index;
        let serr = |source| WorkerError::Setup {
            queue: index,
            source,
        };
        let (ring, cq) = ring_for(setup.size).map_err(serr)?;
        ring.submitter()
            .register_files(&[device.backend.raw_fd()])
            .map_err(serr)?;
        let broken = |reason: String| WorkerError::Broken {
            queue: index,
            reason,
            stats: Box::default(),
        };
        let mut queue = Queue::new(setup.max_size.max(setup.size))
            .map_err(|e| broken(format!("bad queue size: {e}")))?;
        queue
            .try_set_size(setup.size)
            .map_err(|e| broken(format!("bad queue size {}: {e}", setup.size)))?;
        queue
            .try_set_desc_table_address(GuestAddress(setup.desc_addr))
            .map_err(|e| broken(format!("bad descriptor table address: {e}")))?;
        queue
            .try_set_avail_ring_address(GuestAddress(setup.avail_addr))
            .map_err(|e| broken(format!("bad avail ring address: {e}")))?;
        queue
            .try_set_used_ring_address(GuestAddress(setup.used_addr))
            .map_err(|e| broken(format!("bad used ring address: {e}")))?;
        queue.set_event_idx(setup.event_idx);
        queue.set_next_avail(setup.next_avail);
        queue.set_next_used(setup.next_used);
        queue.set_ready(true);
        // Map the three ring areas up front (the used ring writable), so that every ring
        // access virtio-queue makes afterwards hits a mapping.
        let n = u64::from(setup.size);
        let mut space = IovaSpace::new();
        let areas = [
            (setup.desc_addr, 16 * n, false),
            (setup.avail_addr, 6 + 2 * n, false),
            (setup.used_addr, 6 + 8 * n, true),
        ];
        for (addr, len, write) in areas {
            space
                .ensure(&mut edge, addr, len, write)
                .map_err(|e| broken(format!("ring area not mapped: {e}")))?;
        }
        if !queue.is_valid(space.memory()) {
            return Err(broken("ring areas are invalid".into()));
        }
        let limits = device.limits();
        let null = device.backend.is_null();
        let mut slots = Vec::with_capacity(usize::from(setup.size));
        slots.resize_with(usize::from(setup.size), Slot::default);
        Ok(Worker {
            index,
            ring,
            queue,
            space,
            edge,
            device,
            limits,
            slots,
            ops_in_flight: 0,
            reserved_ops: 0,
            op_capacity: cq,
            segs: Vec::new(),
            req: Request::default(),
            kick,
            stop,
            kick_buf: Box::new(0),
            stop_buf: Box::new(0),
            kick_armed: false,
            stop_armed: false,
            stopping: false,
            throttled: false,
            used_added: false,
            zero_range_ok: true,
            null,
            broken: None,
            cqes: Vec::with_capacity(cq),
            stats: QueueStats::default(),
        })
    }

    fn uring_err(&self, source: io::Error) -> WorkerError {
        WorkerError::Uring {
            queue: self.index,
            source,
        }
    }

    /// Push one SQE, submitting first if the submission queue is full.
    fn push(&mut self, sqe: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every buffer an SQE points to (eventfd read buffers owned by `self`,
            // iovec arrays and data in `self.slots` / `self.space`) stays alive and unmoved
            // until its CQE is reaped: slots are only reused after their last CQE, the space
            // only drops regions when no I/O is in flight, and `run` waits for all CQEs
            // before returning.
            let pushed = unsafe { self.ring.submission().push(sqe) };
            if pushed.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    fn arm_kick(&mut self) -> io::Result<()> {
        let sqe = opcode::Read::new(
            types::Fd(self.kick.as_raw_fd()),
            (&mut *self.kick_buf as *mut u64).cast(),
            8,
        )
        .build()
        .user_data(KICK_TOKEN);
        self.push(&sqe)?;
        self.kick_armed = true;
        Ok(())
    }

    fn arm_stop(&mut self) -> io::Result<()> {
        let fd: RawFd = self.stop.as_raw_fd();
        let sqe = opcode::Read::new(types::Fd(fd), (&mut *self.stop_buf as *mut u64).cast(), 8)
            .build()
            .user_data(STOP_TOKEN);
        self.push(&sqe)?;
        self.stop_armed = true;
        Ok(())
    }

    fn run(&mut self) -> Result<WorkerExit, WorkerError> {
        self.arm_kick().map_err(|e| self.uring_err(e))?;
        self.arm_stop().map_err(|e| self.uring_err(e))?;
        // Kicks may have been latched before our eventfd was installed: look once.
        self.drain();
        self.notify_if_needed();
        loop {
            // Checked before waiting, not only after a wake-up: the first drain above may
            // already have found the ring corrupt, and then no kick need ever come.
            if self.broken.is_some() {
                self.stopping = true;
            }
            if self.stopping && self.ops_in_flight == 0 {
                break;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(self.uring_err(e)),
            }
            self.cqes.clear();
            self.cqes
                .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            let mut kicked = false;
            for i in 0..self.cqes.len() {
                let (ud, res) = self.cqes[i];
                match ud {
                    KICK_TOKEN => {
                        self.kick_armed = false;
                        kicked = true;
                        self.stats.kicks += 1;
                        if res < 0 && res != -libc::EAGAIN {
                            warn!("queue {}: kick read failed: {res}", self.index);
                        }
                        if !self.stopping {
                            self.arm_kick().map_err(|e| self.uring_err(e))?;
                        }
                    }
                    STOP_TOKEN => {
                        self.stop_armed = false;
                        if res == -libc::EAGAIN {
                            self.arm_stop().map_err(|e| self.uring_err(e))?;
                        } else {
                            self.stopping = true;
                        }
                    }
                    _ => self.complete_op(ud, res),
                }
            }
            if !self.stopping && self.broken.is_none() && (kicked || self.throttled) {
                self.drain();
            }
            self.notify_if_needed();
        }
        self.cancel_armed_reads()?;
        let stats = std::mem::take(&mut self.stats);
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

    /// Cancel the eventfd reads still armed and wait for their completions, so the kernel
    /// never writes into `kick_buf` / `stop_buf` after this worker is gone.
    fn cancel_armed_reads(&mut self) -> Result<(), WorkerError> {
        let mut expected = 0usize;
        for (armed, tok) in [(self.kick_armed, KICK_TOKEN), (self.stop_armed, STOP_TOKEN)] {
            if armed {
                let sqe = opcode::AsyncCancel::new(tok)
                    .build()
                    .user_data(CANCEL_TOKEN);
                self.push(&sqe).map_err(|e| self.uring_err(e))?;
                expected += 2;
            }
        }
        while expected > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(self.uring_err(e)),
            }
            for c in self.ring.completion() {
                match c.user_data() {
                    KICK_TOKEN | STOP_TOKEN | CANCEL_TOKEN => expected = expected.saturating_sub(1),
                    other => warn!("queue {}: late completion {other:#x}", self.index),
                }
            }
        }
        self.kick_armed = false;
        self.stop_armed = false;
        Ok(())
    }

    fn mark_broken(&mut self, reason: String) {
        if self.broken.is_none() {
            warn!("queue {}: marking device broken: {reason}", self.index);
            self.broken = Some(reason);
        }
    }

    /// Drain the avail ring: the canonical disable / process / re-enable loop.
    fn drain(&mut self) {
        self.throttled = false;
        loop {
            if let Err(e) = self.queue.disable_notification(self.space.memory()) {
                self.mark_broken(format!("cannot write ring flags: {e}"));
                return;
            }
            loop {
                if self.reserved_ops + MAX_OPS_PER_REQUEST + ARMED_READS > self.op_capacity {
                    self.throttled = true;
                    break;
                }
                let head = match self.queue.iter(self.space.memory()) {
                    Ok(mut it) => match it.next() {
                        Some(chain) => chain.head_index(),
                        None => break,
                    },
                    Err(e) => {
                        self.mark_broken(format!("avail ring: {e}"));
                        return;
                    }
                };
                self.start_request(head);
                if self.broken.is_some() {
                    return;
                }
            }
            if self.throttled {
                return;
            }
            match self.queue.enable_notification(self.space.memory()) {
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => {
                    self.mark_broken(format!("cannot write ring flags: {e}"));
                    return;
                }
            }
        }
    }

    fn start_request(&mut self, head: u16) {
        let started = Instant::now();
        // A head still in flight is a duplicate whatever its chain looks like now: check
        // before walking, so that no path below can publish a used entry for it.
        // (An out-of-range head has no slot; the walk reports it.)
        if self.slots.get(usize::from(head)).is_some_and(|s| s.busy) {
            self.mark_broken(format!("head {head} posted again while in flight"));
            return;
        }
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
            Ok(()) => {}
            Err(e) if e.corrupts_ring() => {
                self.mark_broken(format!("head {head}: {e}"));
                return;
            }
            Err(e) => {
                // The ring is intact but the request has no status byte we can find.
                debug!("queue {}: head {head}: {e}", self.index);
                self.stats.unanswerable += 1;
                self.publish(head, 0);
                return;
            }
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
        slot.pending = 0;
        slot.failed = false;
        slot.kind = self.req.kind;
        slot.status_addr = self.req.status_addr;
        slot.data_len = self.req.data_len;
        slot.started = Some(started);
        slot.iov.clear();
        slot.dwz.clear();
        match parsed {
            Ok(()) => {
                if let Err(status) = self.submit_request(head) {
                    self.finish(head, status);
                }
            }
            Err(e) => {
                debug!("queue {}: head {head}: {e}", self.index);
                self.finish(head, e.status());
            }
        }
    }

    /// Queue the SQEs of the parsed request in `self.req` for slot `head`, or return the
    /// status to complete it with right away.
    fn submit_request(&mut self, head: u16) -> Result<(), u8> {
        let kind = self.req.kind;
        match kind {
            RequestKind::Read | RequestKind::Write => {
                let write = kind == RequestKind::Write;
                if self.req.data_len == 0 {
                    return Err(VIRTIO_BLK_S_OK);
                }
                let mut iov = std::mem::take(&mut self.slots[usize::from(head)].iov);
                for d in &self.req.data {
                    // A device-readable buffer (OUT) is read by us; IN buffers are written.
                    if let Err(e) = self.space.translate(
                        &mut self.edge,
                        d.addr,
                        u64::from(d.len),
                        !write,
                        &mut iov,
                    ) {
                        debug!("queue {}: head {head}: {e}", self.index);
                        self.slots[usize::from(head)].iov = iov;
                        return Err(VIRTIO_BLK_S_IOERR);
                    }
                }
                if iov.len() > IOV_MAX {
                    self.slots[usize::from(head)].iov = iov;
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                let off = self.req.offset;
                let fd = types::Fixed(0);
                let tok = token(head, Op::Rw, 0);
                let sqe = match (write, iov.len()) {
                    (false, 1) => {
                        opcode::Read::new(fd, iov[0].iov_base.cast(), iov[0].iov_len as u32)
                            .offset(off)
                            .build()
                    }
                    (true, 1) => {
                        opcode::Write::new(fd, iov[0].iov_base.cast(), iov[0].iov_len as u32)
                            .offset(off)
                            .build()
                    }
                    (false, n) => opcode::Readv::new(fd, iov.as_ptr(), n as u32)
                        .offset(off)
                        .build(),
                    (true, n) => opcode::Writev::new(fd, iov.as_ptr(), n as u32)
                        .offset(off)
                        .build(),
                };
                let slot = &mut self.slots[usize::from(head)];
                slot.expect = self.req.data_len;
                slot.iov = iov;
                self.queue_op(head, &sqe.user_data(tok))
            }
            RequestKind::Flush => {
                let sqe = opcode::Fsync::new(types::Fixed(0))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
                    .user_data(token(head, Op::Flush, 0));
                self.queue_op(head, &sqe)
            }
            RequestKind::GetId => {
                let serial = self.device.serial;
                let mut done = 0usize;
                for d in &self.req.data {
                    let len = d.len as usize;
                    if self
                        .space
                        .write(&mut self.edge, d.addr, &serial[done..done + len])
                        .is_err()
                    {
                        return Err(VIRTIO_BLK_S_IOERR);
                    }
                    done += len;
                }
                Err(VIRTIO_BLK_S_OK)
            }
            RequestKind::Discard | RequestKind::WriteZeroes => {
                let dwz = std::mem::take(&mut self.req.dwz);
                let mut result = Ok(());
                for (i, s) in dwz.iter().enumerate() {
                    let op = match (kind, s.unmap, self.zero_range_ok) {
                        (RequestKind::Discard, _, _) => Op::Discard,
                        (_, true, _) => Op::WzPunch,
                        (_, false, true) => Op::WzZero,
                        (_, false, false) => Op::WzPairPunch,
                    };
                    result = self.queue_dwz(head, i, *s, op);
                    if result.is_err() {
                        break;
                    }
                }
                self.slots[usize::from(head)].dwz.extend_from_slice(&dwz);
                self.req.dwz = dwz;
                result
            }
        }
    }

    fn queue_dwz(&mut self, head: u16, i: usize, s: DwzSegment, op: Op) -> Result<(), u8> {
        let fd = types::Fixed(0);
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        let falloc = |mode: i32, op: Op| {
            opcode::Fallocate::new(fd, s.len)
                .offset(s.offset)
                .mode(mode)
                .build()
                .user_data(token(head, op, i))
        };
        match op {
            Op::Discard | Op::WzPunch => {
                self.queue_op(head, &falloc(libc::FALLOC_FL_PUNCH_HOLE | keep, op))
            }
            Op::WzZero => self.queue_op(head, &falloc(libc::FALLOC_FL_ZERO_RANGE | keep, op)),
            Op::WzPairPunch | Op::WzPairAlloc => {
                let punch = falloc(libc::FALLOC_FL_PUNCH_HOLE | keep, Op::WzPairPunch)
                    .flags(squeue::Flags::IO_LINK);
                self.queue_op(head, &punch)?;
                self.queue_op(head, &falloc(keep, Op::WzPairAlloc))
            }
            Op::Rw | Op::Flush => Err(VIRTIO_BLK_S_IOERR),
        }
    }

    fn queue_op(&mut self, head: u16, sqe: &squeue::Entry) -> Result<(), u8> {
        let nop;
        let sqe = if self.null {
            nop = opcode::Nop::new().build().user_data(sqe.get_user_data());
            &nop
        } else {
            sqe
        };
        match self.push(sqe) {
            Ok(()) => {
                self.slots[usize::from(head)].pending += 1;
                self.ops_in_flight += 1;
                Ok(())
            }
            Err(e) => {
                warn!("queue {}: cannot queue I/O: {e}", self.index);
                if self.slots[usize::from(head)].pending > 0 {
                    // Earlier ops of this request are in flight: fail it when they land.
                    self.slots[usize::from(head)].failed = true;
                    Ok(())
                } else {
                    Err(VIRTIO_BLK_S_IOERR)
                }
            }
        }
    }

    fn complete_op(&mut self, ud: u64, res: i32) {
        let (head, op, seg) = untoken(ud);
        let Some(op) = op else {
            warn!(
                "queue {}: completion with unknown token {ud:#x}",
                self.index
            );
            return;
        };
        let idx = usize::from(head);
        if idx >= self.slots.len() || !self.slots[idx].busy || self.slots[idx].pending == 0 {
            warn!("queue {}: stray completion {ud:#x}", self.index);
            return;
        }
        self.ops_in_flight -= 1;
        self.slots[idx].pending -= 1;
        let ok = match op {
            // A null backing's NOP completes with 0: that is its whole transfer.
            Op::Rw if self.null => res == 0,
            Op::Rw => res >= 0 && res as u64 == self.slots[idx].expect,
            Op::Flush | Op::WzPairPunch | Op::WzPairAlloc => res >= 0,
            Op::Discard => res >= 0 || res == -libc::EOPNOTSUPP,
            Op::WzPunch | Op::WzZero if res == -libc::EOPNOTSUPP => {
                let next = if op == Op::WzPunch {
                    Op::WzZero
                } else {
                    self.zero_range_ok = false;
                    Op::WzPairPunch
                };
                match self.slots[idx].dwz.get(seg).copied() {
                    Some(s) => self.queue_dwz(head, seg, s, next).is_ok(),
                    None => false,
                }
            }
            Op::WzPunch | Op::WzZero => res >= 0,
        };
        if !ok {
            if res < 0 {
                debug!(
                    "queue {}: head {head}: {op:?} failed: {}",
                    self.index,
                    io::Error::from_raw_os_error(-res)
                );
            }
            self.slots[idx].failed = true;
        }
        if self.slots[idx].pending == 0 {
            let status = if self.slots[idx].failed {
                VIRTIO_BLK_S_IOERR
            } else {
                VIRTIO_BLK_S_OK
            };
            self.finish(head, status);
        }
    }

    /// Write the status byte, publish the used entry, count.
    fn finish(&mut self, head: u16, status: u8) {
        let idx = usize::from(head);
        let slot = &mut self.slots[idx];
        slot.busy = false;
        self.reserved_ops -= std::mem::take(&mut slot.reserved);
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
        } else {
            self.stats.errors += 1;
        }
        if let Some(t) = started {
            self.stats
                .latency
                .saturating_record(t.elapsed().as_nanos() as u64);
        }
        self.publish(head, used_len);
    }

    fn publish(&mut self, head: u16, used_len: u32) {
        if self.broken.is_some() {
            return;
        }
        match self.queue.add_used(self.space.memory(), head, used_len) {
            Ok(()) => self.used_added = true,
            Err(e) => self.mark_broken(format!("cannot publish used entry: {e}")),
        }
    }

    fn notify_if_needed(&mut self) {
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
            Err(e) => self.mark_broken(format!("cannot read used_event: {e}")),
        }
    }
}
