//! The control thread of one VDUSE device: the message loop on `/dev/vduse/NAME`, and worker
//! start/stop.
//!
//! Owns: the device's virtio status as we acknowledged it, the queue workers (started at
//! DRIVER_OK, stopped at reset), the saved ring positions between a quiesce and a restart,
//! and the replies to `SET_STATUS`, `GET_VQ_STATE`, `UPDATE_IOTLB`, `SET_VQ_GROUP_ASID`,
//! and (Linux 7.3, where negotiated) `SET_VQ_READY` and `SUSPEND`.
//! Must not touch: device creation/destruction or the vdpa bus (that is [`super::daemon`]).
//!
//! Rules from the kernel (see shared research, vduse-kernel.md):
//! - the status only advances if we reply OK; replying FAILED to FEATURES_OK refuses features;
//! - every reset drops kick eventfds and mappings: workers are stopped and all mappings
//!   dropped *before* the reply, and re-created at the next DRIVER_OK;
//! - `UPDATE_IOTLB` means "every cached mapping is stale": workers are quiesced (in-flight I/O
//!   completed) and restarted with empty mappings before the reply.
//! - `SET_VQ_READY` (7.3, `VDUSE_F_QUEUE_READY`): the kernel sets the queue's ready flag only
//!   after our reply, and marks the device broken if we refuse. Disabling a running queue
//!   quiesces that one worker and keeps its position; enabling it after DRIVER_OK starts it
//!   again from there (the ring was never reset). Before DRIVER_OK it is only recorded by the
//!   kernel: DRIVER_OK starts the queues it reports ready.
//! - `SUSPEND` (7.3, `VDUSE_F_SUSPEND`): every worker completes what it fetched, publishes the
//!   used entries and injects its interrupt *before* the reply, because once the kernel has
//!   our reply it ignores kicks and refuses interrupts. Nothing resumes a suspended device but
//!   a reset.
//!
//! The loop reaches the device only through [`DeviceOps`] (the real one is
//! [`DeviceFd`]) and starts workers only through [`QueueWorkers`] (the real one is
//! [`VduseWorkers`]), so it is unit-tested against a scripted fake device. It never wakes on a
//! timer: it sleeps in `poll` on the device fd, its stop eventfd and an eventfd every worker
//! signals as it ends ([`ExitToken`]).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::{debug, info, warn};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::fd::{map_region, new_eventfd, ControlFd, DeviceFd};
use super::zerocopy::{UmemRegistry, ZeroCopyMode};
use crate::memory::{IovaRegion, RegionSource};
use crate::metrics::QueueStats;
use crate::uapi::vduse as u;
use crate::uapi::virtio as vf;
use crate::worker::live::LiveStats;
use crate::worker::{
    self, DeviceIo, QueueEdge, QueueSetup, WorkerError, WorkerExit, WorkerHandle, WorkerOptions,
    ZeroCopy,
};

/// The operations on `/dev/vduse/NAME` that the message loop uses. [`DeviceFd`] is the real
/// one; the unit tests drive the loop with a scripted fake.
pub trait DeviceOps: Send + Sync + 'static {
    /// The fd to poll: readable when a request is pending, POLLERR/POLLHUP when the kernel
    /// marked the device broken.
    fn poll_fd(&self) -> BorrowedFd<'_>;
    /// Read one request (called after poll reported it readable).
    fn read_request(&self) -> io::Result<u::VduseDevRequest>;
    /// Write one reply.
    fn write_response(&self, resp: &u::VduseDevResponse) -> io::Result<()>;
    /// `VDUSE_DEV_GET_FEATURES`: the features the driver negotiated.
    fn driver_features(&self) -> Result<u64, Errno>;
    /// `VDUSE_VQ_GET_INFO`.
    fn vq_info(&self, index: u32) -> Result<u::VduseVqInfo, Errno>;
    /// `VDUSE_VQ_SETUP_KICKFD`: the kernel takes its own reference on `fd`.
    fn set_kickfd(&self, index: u32, fd: RawFd) -> Result<(), Errno>;
}

/// A running queue worker as the loop sees it.
pub trait QueueWorker {
    /// Queue index.
    fn index(&self) -> u16;
    /// Ask it to finish in-flight requests and exit (without waiting).
    fn request_stop(&self);
    /// Stop it and wait for it.
    fn stop(self) -> Result<WorkerExit, WorkerError>;
}

impl QueueWorker for WorkerHandle {
    fn index(&self) -> u16 {
        WorkerHandle::index(self)
    }

    fn request_stop(&self) {
        WorkerHandle::request_stop(self)
    }

    fn stop(self) -> Result<WorkerExit, WorkerError> {
        WorkerHandle::stop(self)
    }
}

/// Starts queue workers for the loop. [`VduseWorkers`] is the real one.
pub trait QueueWorkers: Send + 'static {
    /// What a started worker is.
    type Worker: QueueWorker;
    /// Start a worker as `start` describes.
    fn start(&mut self, start: WorkerStart) -> io::Result<Self::Worker>;
    /// The device was reset and every worker has stopped: drop what an attach set up.
    fn reset(&mut self) {}
}

/// Everything a queue worker is started with.
pub struct WorkerStart {
    /// The queue: index, size, ring addresses, position.
    pub setup: QueueSetup,
    /// The queue's kick eventfd, already given to the kernel.
    pub kick: OwnedFd,
    /// CPU, thread name and busy-poll window.
    pub opts: WorkerOptions,
    /// Must be moved into the worker and dropped only when it ends: that is how the loop
    /// learns that a worker stopped without being asked (a corrupt ring).
    pub exit: ExitToken,
}

/// Dropped by a worker as it ends: marks it ended and wakes the message loop.
pub struct ExitToken {
    ended: Arc<AtomicBool>,
    wake: Arc<EventFd>,
}

impl Drop for ExitToken {
    fn drop(&mut self) {
        self.ended.store(true, Ordering::SeqCst);
        if let Err(e) = self.wake.write(1) {
            warn!("cannot wake the message loop after a worker ended: {e}");
        }
    }
}

/// The real workers: [`worker::spawn`] threads whose edges are the VDUSE device.
pub struct VduseWorkers {
    dev: Arc<DeviceFd>,
    io: Arc<DeviceIo>,
    umem: Arc<UmemRegistry>,
}

impl VduseWorkers {
    /// Workers on `dev` serving `io`, with zero copy as `zero_copy` says.
    pub fn new(
        dev: Arc<DeviceFd>,
        io: Arc<DeviceIo>,
        zero_copy: ZeroCopyMode,
        queues: u16,
    ) -> Self {
        let umem = UmemRegistry::new(Arc::clone(&dev), zero_copy, queues);
        VduseWorkers { dev, io, umem }
    }
}

impl QueueWorkers for VduseWorkers {
    type Worker = WorkerHandle;

    fn start(&mut self, start: WorkerStart) -> io::Result<WorkerHandle> {
        let WorkerStart {
            setup,
            kick,
            opts,
            exit,
        } = start;
        let edge = VduseEdge {
            dev: Arc::clone(&self.dev),
            umem: Arc::clone(&self.umem),
            index: u32::from(setup.index),
            _exit: exit,
        };
        worker::spawn(setup, Arc::clone(&self.io), edge, kick, opts)
    }

    fn reset(&mut self) {
        self.umem.reset();
    }
}

/// The VDUSE edges of a worker: IOTLB lookups and interrupt injection.
pub struct VduseEdge {
    dev: Arc<DeviceFd>,
    umem: Arc<UmemRegistry>,
    index: u32,
    /// Dropped with the edge, i.e. when the worker ends.
    _exit: ExitToken,
}

impl RegionSource for VduseEdge {
    fn region_for(&mut self, iova: u64) -> Option<IovaRegion> {
        // Before any bounce IOVA is mapped from the kernel's pages: once a request exists the
        // registration can be made, and then the bounce region is our memory.
        if let Some(region) = self.umem.region_for(iova) {
            return Some(region);
        }
        let r = match self.dev.iotlb_get_fd(iova) {
            Ok(r) => r,
            Err(e) => {
                debug!("queue {}: no IOTLB entry for {iova:#x}: {e}", self.index);
                return None;
            }
        };
        match map_region(r) {
            Ok(region) => Some(region),
            Err(e) => {
                warn!(
                    "queue {}: cannot map IOTLB region for {iova:#x}: {e}",
                    self.index
                );
                None
            }
        }
    }
}

impl QueueEdge for VduseEdge {
    fn notify(&mut self) -> io::Result<()> {
        self.dev.inject_irq(self.index).map_err(io::Error::from)
    }

    fn zero_copy(&mut self, served: bool) -> ZeroCopy {
        self.umem.status(served)
    }
}

/// What the control thread needs to run a device.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    /// Device name (for thread names and logs).
    pub name: String,
    /// Number of virtqueues.
    pub num_queues: u16,
    /// The largest queue size offered.
    pub max_queue_size: u16,
    /// The device features we offered (to check the driver's choice at FEATURES_OK).
    pub offered_features: u64,
    /// CPUs to pin queue workers to, round robin (empty: no pinning).
    pub cpus: Vec<usize>,
    /// The workers' busy-poll window (zero: park at once).
    pub poll: Duration,
    /// The live view the workers answer (`vduse-blkd stats`).
    pub live: Option<Arc<LiveStats>>,
    /// Workers record per-stage spans (`serve --no-stage-stats` turns it off).
    pub stage_stats: bool,
}

/// Events the control thread reports to the daemon.
#[derive(Debug)]
pub enum LoopEvent {
    /// A worker found the ring corrupt: the device is broken.
    Broken(String),
    /// The message loop itself failed (the kernel broke the device, or I/O on its fd failed).
    Failed(String),
}

/// The sending side of the loop's event channel: every event also signals an eventfd, so
/// the receiver can sleep in `poll` next to other fds (a channel has no fd of its own).
#[derive(Clone)]
pub struct EventSender {
    tx: Sender<LoopEvent>,
    ready: Arc<EventFd>,
}

impl EventSender {
    /// Queue `ev`, then wake the receiver.
    pub fn send(&self, ev: LoopEvent) {
        // Send first: a receiver woken by the eventfd must find the event in the channel.
        let _ = self.tx.send(ev);
        if let Err(e) = self.ready.write(1) {
            warn!("cannot signal a control-thread event: {e}");
        }
    }
}

/// The receiving side of the loop's event channel.
pub struct EventReceiver {
    rx: Receiver<LoopEvent>,
    ready: Arc<EventFd>,
}

impl EventReceiver {
    /// The next queued event, if any.
    pub fn try_recv(&self) -> Option<LoopEvent> {
        self.rx.try_recv().ok()
    }

    /// Poll this for POLLIN: readable when an event was sent since the last [`Self::clear`].
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.ready.as_fd()
    }

    /// Reset the readiness (call before draining with [`Self::try_recv`]).
    pub fn clear(&self) {
        // EAGAIN: nothing was pending; the eventfd is non-blocking.
        let _ = self.ready.read();
    }
}

/// A new event channel.
pub fn event_channel() -> io::Result<(EventSender, EventReceiver)> {
    let ready = Arc::new(nonblocking_eventfd()?);
    let (tx, rx) = crossbeam_channel::unbounded();
    Ok((
        EventSender {
            tx,
            ready: Arc::clone(&ready),
        },
        EventReceiver { rx, ready },
    ))
}

fn nonblocking_eventfd() -> io::Result<EventFd> {
    Ok(EventFd::from_flags(
        EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
    )?)
}

/// A running control thread.
pub struct LoopHandle {
    stop: Arc<EventFd>,
    join: Option<JoinHandle<QueueStats>>,
}

impl LoopHandle {
    /// Stop the loop (and every worker) and return the merged queue statistics.
    pub fn stop(mut self) -> QueueStats {
        self.shutdown()
    }

    fn shutdown(&mut self) -> QueueStats {
        let _ = self.stop.write(1);
        match self.join.take() {
            Some(j) => j.join().unwrap_or_default(),
            None => QueueStats::default(),
        }
    }
}

impl Drop for LoopHandle {
    fn drop(&mut self) {
        if self.join.is_some() {
            self.shutdown();
        }
    }
}

/// Start the control thread. It must be running before the device is added to the vdpa bus:
/// the kernel probes the driver synchronously inside `VDPA_CMD_DEV_NEW` and waits for our
/// replies.
pub fn spawn_loop<D: DeviceOps, W: QueueWorkers>(
    dev: Arc<D>,
    workers: W,
    cfg: LoopConfig,
    events: EventSender,
) -> io::Result<LoopHandle> {
    let stop = Arc::new(nonblocking_eventfd()?);
    let stop2 = Arc::clone(&stop);
    let worker_exit = Arc::new(nonblocking_eventfd()?);
    let join = std::thread::Builder::new()
        .name(format!("{}-ctl", short(&cfg.name)))
        .spawn(move || {
            let mut l = MessageLoop::new(dev, workers, cfg, events, worker_exit);
            if let Err(e) = l.run(&stop2) {
                l.events.send(LoopEvent::Failed(e.to_string()));
            }
            l.stop_workers(false);
            l.stats
        })?;
    Ok(LoopHandle {
        stop,
        join: Some(join),
    })
}

fn short(name: &str) -> String {
    name.chars().take(10).collect()
}

/// A started worker and the flag its [`ExitToken`] sets when it ends.
struct Running<H> {
    handle: H,
    ended: Arc<AtomicBool>,
}

struct MessageLoop<D: DeviceOps, W: QueueWorkers> {
    dev: Arc<D>,
    spawner: W,
    cfg: LoopConfig,
    status: u8,
    workers: Vec<Running<W::Worker>>,
    /// Signalled by every [`ExitToken`] as its worker ends.
    worker_exit: Arc<EventFd>,
    /// Ring positions (next_avail, next_used) saved by a quiesce, per queue.
    saved: Vec<Option<(u16, u16)>>,
    stats: QueueStats,
    events: EventSender,
    broken: bool,
    /// A `SUSPEND` was answered: no queue runs again until a reset.
    suspended: bool,
}

/// What one `poll` of the loop found.
struct Ready {
    request: bool,
    broken: bool,
    stop: bool,
    worker_exit: bool,
}

impl<D: DeviceOps, W: QueueWorkers> MessageLoop<D, W> {
    fn new(
        dev: Arc<D>,
        spawner: W,
        cfg: LoopConfig,
        events: EventSender,
        worker_exit: Arc<EventFd>,
    ) -> Self {
        MessageLoop {
            dev,
            spawner,
            saved: vec![None; usize::from(cfg.num_queues)],
            cfg,
            status: 0,
            workers: Vec::new(),
            worker_exit,
            stats: QueueStats::default(),
            events,
            broken: false,
            suspended: false,
        }
    }

    /// Serve messages until `stop` is signalled (Ok) or the device fails (Err).
    fn run(&mut self, stop: &EventFd) -> io::Result<()> {
        loop {
            let ready = match self.wait(stop) {
                Ok(r) => r,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            if ready.stop {
                return Ok(());
            }
            if ready.worker_exit {
                // EAGAIN: already drained; the eventfd is non-blocking.
                let _ = self.worker_exit.read();
            }
            if ready.request {
                let req = self.dev.read_request()?;
                let resp = self.handle(&req);
                self.dev.write_response(&resp)?;
            } else if ready.broken {
                return Err(io::Error::other(
                    "the kernel marked the VDUSE device broken (a reply timed out)",
                ));
            }
            self.reap_dead_workers();
        }
    }

    /// Sleep until a request, a stop, a worker's end or a broken device; no timeout.
    fn wait(&self, stop: &EventFd) -> Result<Ready, Errno> {
        let mut fds = [
            PollFd::new(self.dev.poll_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.worker_exit.as_fd(), PollFlags::POLLIN),
        ];
        poll(&mut fds, PollTimeout::NONE)?;
        let got =
            |i: usize, f: PollFlags| fds[i].revents().unwrap_or(PollFlags::empty()).intersects(f);
        Ok(Ready {
            request: got(0, PollFlags::POLLIN),
            broken: got(0, PollFlags::POLLERR | PollFlags::POLLHUP),
            stop: got(1, PollFlags::POLLIN),
            worker_exit: got(2, PollFlags::POLLIN),
        })
    }

    /// Workers that ended without being asked: a corrupt ring.
    fn reap_dead_workers(&mut self) {
        let mut i = 0;
        while i < self.workers.len() {
            if self.workers[i].ended.load(Ordering::SeqCst) {
                let w = self.workers.swap_remove(i);
                self.collect(w.handle, false);
            } else {
                i += 1;
            }
        }
    }

    fn handle(&mut self, req: &u::VduseDevRequest) -> u::VduseDevResponse {
        let ok = u::VduseDevResponse::new(req.request_id, u::VDUSE_REQ_RESULT_OK);
        let failed = u::VduseDevResponse::new(req.request_id, u::VDUSE_REQ_RESULT_FAILED);
        let reply = |done: bool| if done { ok } else { failed };
        match req.req_type {
            u::VDUSE_SET_STATUS => {
                let status = req.status();
                debug!("{}: SET_STATUS {status:#x}", self.cfg.name);
                let done = self.set_status(status);
                if done {
                    self.status = status;
                }
                reply(done)
            }
            u::VDUSE_GET_VQ_STATE => {
                let index = req.vq_index();
                let avail = self.vq_state(index);
                debug!("{}: GET_VQ_STATE {index} -> {avail:?}", self.cfg.name);
                match avail {
                    Some(a) => ok.with_split_vq_state(index, a),
                    None => failed,
                }
            }
            u::VDUSE_UPDATE_IOTLB => {
                let (start, last) = req.iova_range();
                debug!("{}: UPDATE_IOTLB [{start:#x}, {last:#x}]", self.cfg.name);
                reply(self.update_iotlb())
            }
            u::VDUSE_SET_VQ_READY => {
                let (index, ready) = req.vq_ready();
                debug!("{}: SET_VQ_READY {index} {ready}", self.cfg.name);
                reply(self.set_vq_ready(index, ready))
            }
            u::VDUSE_SUSPEND => {
                debug!("{}: SUSPEND", self.cfg.name);
                reply(self.suspend())
            }
            u::VDUSE_SET_VQ_GROUP_ASID => {
                let (group, asid) = req.group_asid();
                // One group and one address space: the kernel already bounds-checked both.
                reply(group == 0 && asid == 0)
            }
            other => {
                warn!("{}: unknown VDUSE request type {other}", self.cfg.name);
                failed
            }
        }
    }

    /// Every cached mapping may be stale: restart the running workers (and only those) with
    /// none.
    fn update_iotlb(&mut self) -> bool {
        let mut running: Vec<u16> = self.workers.iter().map(|w| w.handle.index()).collect();
        if running.is_empty() {
            return true;
        }
        running.sort_unstable();
        self.stop_workers(true);
        if self.broken {
            return false;
        }
        let restarted = self.event_idx().and_then(|event_idx| {
            running
                .iter()
                .try_for_each(|&q| self.start_queue(q, event_idx))
        });
        if let Err(e) = restarted {
            warn!(
                "{}: cannot restart queues after IOTLB update: {e}",
                self.cfg.name
            );
            self.stop_workers(true);
            return false;
        }
        true
    }

    /// `SET_VQ_READY`: stop or start that one queue; the others run on untouched.
    fn set_vq_ready(&mut self, index: u32, ready: bool) -> bool {
        let Some(q) = u16::try_from(index)
            .ok()
            .filter(|q| *q < self.cfg.num_queues)
        else {
            return false;
        };
        let running = self.workers.iter().position(|w| w.handle.index() == q);
        match (ready, running) {
            (false, Some(pos)) => {
                let w = self.workers.swap_remove(pos);
                self.collect(w.handle, true);
                !self.broken
            }
            (true, None)
                if self.status & vf::STATUS_DRIVER_OK != 0 && !self.suspended && !self.broken =>
            {
                // The kernel still reports the queue not ready: it flips the flag only after
                // this reply, so start it without looking at `VduseVqInfo::ready`.
                match self.event_idx().and_then(|e| self.start_queue(q, e)) {
                    Ok(()) => true,
                    Err(e) => {
                        warn!("{}: cannot start queue {q}: {e}", self.cfg.name);
                        false
                    }
                }
            }
            // Already in that state, or not running yet (DRIVER_OK will look).
            _ => true,
        }
    }

    /// `SUSPEND`: complete everything in flight, publish it, then stay parked until reset.
    fn suspend(&mut self) -> bool {
        self.stop_workers(true);
        self.suspended = true;
        !self.broken
    }

    /// Act on a status change; false refuses it.
    fn set_status(&mut self, status: u8) -> bool {
        let was = self.status;
        if status == 0 {
            // Reset: stop ring processing and drop every mapping before replying.
            self.stop_workers(false);
            self.spawner.reset();
            self.saved.iter_mut().for_each(|s| *s = None);
            self.suspended = false;
            return true;
        }
        if status & vf::STATUS_FAILED != 0 {
            self.stop_workers(false);
            return true;
        }
        if status & vf::STATUS_FEATURES_OK != 0
            && was & vf::STATUS_FEATURES_OK == 0
            && !self.features_acceptable()
        {
            return false;
        }
        if status & vf::STATUS_DRIVER_OK != 0 && was & vf::STATUS_DRIVER_OK == 0 {
            if self.broken {
                return false;
            }
            if let Err(e) = self.start_workers() {
                warn!("{}: cannot start queues: {e}", self.cfg.name);
                self.stop_workers(false);
                return false;
            }
        }
        true
    }

    /// FEATURES_OK: the driver may only pick what we offered, and must pick VERSION_1 and
    /// ACCESS_PLATFORM.
    fn features_acceptable(&self) -> bool {
        let f = match self.dev.driver_features() {
            Ok(f) => f,
            Err(e) => {
                warn!("{}: cannot read driver features: {e}", self.cfg.name);
                return false;
            }
        };
        let unknown = f & !self.cfg.offered_features;
        let needed = vf::feature_mask(vf::VIRTIO_F_VERSION_1)
            | vf::feature_mask(vf::VIRTIO_F_ACCESS_PLATFORM);
        if unknown != 0 || f & needed != needed {
            warn!(
                "{}: refusing driver features {f:#x} (unknown {unknown:#x})",
                self.cfg.name
            );
            return false;
        }
        true
    }

    fn vq_state(&mut self, index: u32) -> Option<u16> {
        if index >= u32::from(self.cfg.num_queues) {
            return None;
        }
        // The VMM asks for the ring base when it stops the device: quiesce that queue.
        if let Some(pos) = self
            .workers
            .iter()
            .position(|w| u32::from(w.handle.index()) == index)
        {
            let w = self.workers.swap_remove(pos);
            self.collect(w.handle, true);
        }
        if let Some((avail, _)) = self.saved[index as usize] {
            return Some(avail);
        }
        self.dev.vq_info(index).ok().map(|i| i.split_avail_index())
    }

    fn collect(&mut self, w: W::Worker, keep_position: bool) {
        let index = usize::from(w.index());
        match w.stop() {
            Ok(exit) => {
                self.stats.merge(&exit.stats);
                if keep_position {
                    self.saved[index] = Some((exit.next_avail, exit.next_used));
                }
            }
            Err(e) => {
                if let WorkerError::Broken { stats, .. } = &e {
                    self.stats.merge(stats);
                }
                self.broken = true;
                self.events.send(LoopEvent::Broken(with_causes(&e)));
            }
        }
    }

    /// Stop every worker; with `keep_position`, remember where each stopped.
    fn stop_workers(&mut self, keep_position: bool) {
        for w in &self.workers {
            w.handle.request_stop();
        }
        for w in std::mem::take(&mut self.workers) {
            self.collect(w.handle, keep_position);
        }
    }

    /// Whether the driver negotiated `VIRTIO_F_EVENT_IDX`.
    fn event_idx(&self) -> io::Result<bool> {
        let features = self.dev.driver_features().map_err(io::Error::from)?;
        Ok(features & vf::feature_mask(vf::VIRTIO_F_EVENT_IDX) != 0)
    }

    /// DRIVER_OK: start every queue the kernel reports ready.
    fn start_workers(&mut self) -> io::Result<()> {
        let event_idx = self.event_idx()?;
        for q in 0..self.cfg.num_queues {
            let info = self.dev.vq_info(u32::from(q)).map_err(io::Error::from)?;
            if !info.is_ready() {
                // virtio-blk may use fewer queues than offered.
                continue;
            }
            self.start_queue_at(q, &info, event_idx)?;
        }
        info!(
            "{}: DRIVER_OK, {} queue(s) running (event_idx={event_idx})",
            self.cfg.name,
            self.workers.len()
        );
        Ok(())
    }

    /// Start queue `q` from the driver's current info (and a position saved by a quiesce).
    fn start_queue(&mut self, q: u16, event_idx: bool) -> io::Result<()> {
        let info = self.dev.vq_info(u32::from(q)).map_err(io::Error::from)?;
        self.start_queue_at(q, &info, event_idx)
    }

    fn start_queue_at(&mut self, q: u16, info: &u::VduseVqInfo, event_idx: bool) -> io::Result<()> {
        let setup = self.queue_setup(q, info, event_idx)?;
        self.start_worker(setup)?;
        self.saved[usize::from(q)] = None;
        Ok(())
    }

    /// Where queue `q` is, from the driver's info and a position saved by a quiesce.
    fn queue_setup(
        &self,
        q: u16,
        info: &u::VduseVqInfo,
        event_idx: bool,
    ) -> io::Result<QueueSetup> {
        let size = u16::try_from(info.num)
            .ok()
            .filter(|n| n.is_power_of_two() && *n <= self.cfg.max_queue_size)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("queue {q}: driver chose size {}", info.num),
                )
            })?;
        let (next_avail, next_used) = self.saved[usize::from(q)]
            .unwrap_or((info.split_avail_index(), info.split_avail_index()));
        Ok(QueueSetup {
            index: q,
            size,
            max_size: self.cfg.max_queue_size,
            desc_addr: info.desc_addr,
            avail_addr: info.driver_addr,
            used_addr: info.device_addr,
            next_avail,
            next_used,
            event_idx,
        })
    }

    /// Install a fresh kick eventfd for the queue and start its worker.
    fn start_worker(&mut self, setup: QueueSetup) -> io::Result<()> {
        let q = setup.index;
        let kick = new_eventfd()?;
        // The kernel drops kick eventfds on every reset: install a fresh one each time.
        self.dev
            .set_kickfd(u32::from(q), kick.as_raw_fd())
            .map_err(io::Error::from)?;
        let cpu = if self.cfg.cpus.is_empty() {
            None
        } else {
            Some(self.cfg.cpus[usize::from(q) % self.cfg.cpus.len()])
        };
        let opts = WorkerOptions {
            cpu,
            name: format!("{}-q{q}", short(&self.cfg.name)),
            poll: self.cfg.poll,
            live: self.cfg.live.as_ref().and_then(|l| l.queue(q)),
            stage_stats: self.cfg.stage_stats,
        };
        let ended = Arc::new(AtomicBool::new(false));
        let exit = ExitToken {
            ended: Arc::clone(&ended),
            wake: Arc::clone(&self.worker_exit),
        };
        let handle = self.spawner.start(WorkerStart {
            setup,
            kick,
            opts,
            exit,
        })?;
        self.workers.push(Running { handle, ended });
        Ok(())
    }
}

/// How long teardown waits for the kernel to release a device (EBUSY on destroy).
pub const DESTROY_DEADLINE: Duration = Duration::from_secs(5);

/// `VDUSE_DESTROY_DEV` of `name`, retried while the kernel answers EBUSY, for at most
/// [`DESTROY_DEADLINE`]: the kernel drops its reference to a closed device fd asynchronously.
pub fn destroy_dev(control: &ControlFd, name: &[u8; u::VDUSE_NAME_MAX]) -> Result<(), Errno> {
    let end = Instant::now() + DESTROY_DEADLINE;
    loop {
        match control.destroy_dev(name) {
            Err(Errno::EBUSY) if Instant::now() < end => {
                std::thread::sleep(Duration::from_millis(20))
            }
            done => return done,
        }
    }
}

#[cfg(test)]
mod tests;

/// An error and its `source()` chain on one line ("a: b: c"), for the operator's message
/// (the worker's errors keep their causes as sources, not in their own text).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}
