//! The control thread of one VDUSE device: the message loop on `/dev/vduse/NAME`, and worker
//! start/stop.
//!
//! Owns: the device's virtio status as we acknowledged it, the queue workers (started at
//! DRIVER_OK, stopped at reset), the saved ring positions between a quiesce and a restart,
//! and the replies to `SET_STATUS`, `GET_VQ_STATE`, `UPDATE_IOTLB` and `SET_VQ_GROUP_ASID`.
//! Must not touch: device creation/destruction or the vdpa bus (that is [`super::daemon`]).
//!
//! Rules from the kernel (see shared research, vduse-kernel.md):
//! - the status only advances if we reply OK; replying FAILED to FEATURES_OK refuses features;
//! - every reset drops kick eventfds and mappings: workers are stopped and all mappings
//!   dropped *before* the reply, and re-created at the next DRIVER_OK;
//! - `UPDATE_IOTLB` means "every cached mapping is stale": workers are quiesced (in-flight I/O
//!   completed) and restarted with empty mappings before the reply.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Sender;
use log::{debug, info, warn};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::fd::{map_region, new_eventfd, DeviceFd};
use crate::memory::{IovaRegion, RegionSource};
use crate::metrics::QueueStats;
use crate::uapi::vduse as u;
use crate::uapi::virtio as vf;
use crate::worker::{self, DeviceIo, QueueEdge, QueueSetup, WorkerError, WorkerHandle};

/// The VDUSE edges of a worker: IOTLB lookups and interrupt injection.
pub struct VduseEdge {
    dev: Arc<DeviceFd>,
    index: u32,
}

impl RegionSource for VduseEdge {
    fn region_for(&mut self, iova: u64) -> Option<IovaRegion> {
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
}

/// Events the control thread reports to the daemon.
#[derive(Debug)]
pub enum LoopEvent {
    /// A worker found the ring corrupt: the device is broken.
    Broken(String),
    /// The message loop itself failed (the kernel broke the device, or I/O on its fd failed).
    Failed(String),
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
pub fn spawn_loop(
    dev: Arc<DeviceFd>,
    io: Arc<DeviceIo>,
    cfg: LoopConfig,
    events: Sender<LoopEvent>,
) -> io::Result<LoopHandle> {
    let stop = Arc::new(EventFd::from_flags(
        EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
    )?);
    let stop2 = Arc::clone(&stop);
    let join = std::thread::Builder::new()
        .name(format!("{}-ctl", short(&cfg.name)))
        .spawn(move || {
            let mut l = MessageLoop {
                dev,
                io,
                saved: vec![None; usize::from(cfg.num_queues)],
                cfg,
                status: 0,
                workers: Vec::new(),
                stats: QueueStats::default(),
                events,
                broken: false,
            };
            if let Err(e) = l.run(&stop2) {
                let _ = l.events.send(LoopEvent::Failed(e.to_string()));
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

struct MessageLoop {
    dev: Arc<DeviceFd>,
    io: Arc<DeviceIo>,
    cfg: LoopConfig,
    status: u8,
    workers: Vec<WorkerHandle>,
    /// Ring positions (next_avail, next_used) saved by a quiesce, per queue.
    saved: Vec<Option<(u16, u16)>>,
    stats: QueueStats,
    events: Sender<LoopEvent>,
    broken: bool,
}

const POLL_MS: u16 = 200;

impl MessageLoop {
    fn run(&mut self, stop: &EventFd) -> io::Result<()> {
        loop {
            let (dev_ready, dev_err, stop_ready) = {
                let mut fds = [
                    PollFd::new(self.dev.as_fd(), PollFlags::POLLIN),
                    PollFd::new(stop.as_fd(), PollFlags::POLLIN),
                ];
                match poll(&mut fds, PollTimeout::from(POLL_MS)) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(e.into()),
                }
                let d = fds[0].revents().unwrap_or(PollFlags::empty());
                let s = fds[1].revents().unwrap_or(PollFlags::empty());
                (
                    d.contains(PollFlags::POLLIN),
                    d.intersects(PollFlags::POLLERR | PollFlags::POLLHUP),
                    s.contains(PollFlags::POLLIN),
                )
            };
            if stop_ready {
                return Ok(());
            }
            if dev_ready {
                let req = self.dev.read_request()?;
                let resp = self.handle(&req);
                self.dev.write_response(&resp)?;
            } else if dev_err {
                return Err(io::Error::other(
                    "the kernel marked the VDUSE device broken (a reply timed out)",
                ));
            }
            self.reap_dead_workers();
        }
    }

    /// Workers that ended without being asked: a corrupt ring.
    fn reap_dead_workers(&mut self) {
        let mut i = 0;
        while i < self.workers.len() {
            if self.workers[i].is_finished() {
                let w = self.workers.swap_remove(i);
                match w.stop() {
                    Ok(exit) => self.stats.merge(&exit.stats),
                    Err(e) => {
                        if let WorkerError::Broken { stats, .. } = &e {
                            self.stats.merge(stats);
                        }
                        self.broken = true;
                        let _ = self.events.send(LoopEvent::Broken(e.to_string()));
                    }
                }
            } else {
                i += 1;
            }
        }
    }

    fn handle(&mut self, req: &u::VduseDevRequest) -> u::VduseDevResponse {
        let ok = u::VduseDevResponse::new(req.request_id, u::VDUSE_REQ_RESULT_OK);
        let failed = u::VduseDevResponse::new(req.request_id, u::VDUSE_REQ_RESULT_FAILED);
        match req.req_type {
            u::VDUSE_SET_STATUS => {
                let status = req.status();
                debug!("{}: SET_STATUS {status:#x}", self.cfg.name);
                if self.set_status(status) {
                    self.status = status;
                    ok
                } else {
                    failed
                }
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
                // Every cached mapping may be stale: restart running workers with none.
                if !self.workers.is_empty() {
                    self.stop_workers(true);
                    if let Err(e) = self.start_workers() {
                        warn!(
                            "{}: cannot restart queues after IOTLB update: {e}",
                            self.cfg.name
                        );
                        return failed;
                    }
                }
                ok
            }
            u::VDUSE_SET_VQ_GROUP_ASID => {
                let (group, asid) = req.group_asid();
                // One group and one address space: the kernel already bounds-checked both.
                if group == 0 && asid == 0 {
                    ok
                } else {
                    failed
                }
            }
            other => {
                warn!("{}: unknown VDUSE request type {other}", self.cfg.name);
                failed
            }
        }
    }

    /// Act on a status change; false refuses it.
    fn set_status(&mut self, status: u8) -> bool {
        let was = self.status;
        if status == 0 {
            // Reset: stop ring processing and drop every mapping before replying.
            self.stop_workers(false);
            self.saved.iter_mut().for_each(|s| *s = None);
            return true;
        }
        if status & vf::STATUS_FAILED != 0 {
            self.stop_workers(false);
            return true;
        }
        if status & vf::STATUS_FEATURES_OK != 0 && was & vf::STATUS_FEATURES_OK == 0 {
            match self.dev.driver_features() {
                Ok(f) => {
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
                }
                Err(e) => {
                    warn!("{}: cannot read driver features: {e}", self.cfg.name);
                    return false;
                }
            }
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

    fn vq_state(&mut self, index: u32) -> Option<u16> {
        if index >= u32::from(self.cfg.num_queues) {
            return None;
        }
        // The VMM asks for the ring base when it stops the device: quiesce that queue.
        if let Some(pos) = self
            .workers
            .iter()
            .position(|w| u32::from(w.index()) == index)
        {
            let w = self.workers.swap_remove(pos);
            self.collect(w, true);
        }
        if let Some((avail, _)) = self.saved[index as usize] {
            return Some(avail);
        }
        self.dev.vq_info(index).ok().map(|i| i.split_avail_index())
    }

    fn collect(&mut self, w: WorkerHandle, keep_position: bool) {
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
                let _ = self.events.send(LoopEvent::Broken(e.to_string()));
            }
        }
    }

    /// Stop every worker; with `keep_position`, remember where each stopped.
    fn stop_workers(&mut self, keep_position: bool) {
        for w in &self.workers {
            w.request_stop();
        }
        for w in std::mem::take(&mut self.workers) {
            self.collect(w, keep_position);
        }
    }

    fn start_workers(&mut self) -> io::Result<()> {
        let features = self.dev.driver_features().map_err(io::Error::from)?;
        let event_idx = features & vf::feature_mask(vf::VIRTIO_F_EVENT_IDX) != 0;
        for q in 0..self.cfg.num_queues {
            let info = self.dev.vq_info(u32::from(q)).map_err(io::Error::from)?;
            if !info.is_ready() {
                // virtio-blk may use fewer queues than offered.
                continue;
            }
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
            let setup = QueueSetup {
                index: q,
                size,
                max_size: self.cfg.max_queue_size,
                desc_addr: info.desc_addr,
                avail_addr: info.driver_addr,
                used_addr: info.device_addr,
                next_avail,
                next_used,
                event_idx,
            };
            let kick = new_eventfd()?;
            // The kernel drops kick eventfds on every reset: install a fresh one each time.
            self.dev
                .set_kickfd(u32::from(q), kick.as_raw_fd())
                .map_err(io::Error::from)?;
            let edge = VduseEdge {
                dev: Arc::clone(&self.dev),
                index: u32::from(q),
            };
            let cpu = if self.cfg.cpus.is_empty() {
                None
            } else {
                Some(self.cfg.cpus[usize::from(q) % self.cfg.cpus.len()])
            };
            let opts = worker::WorkerOptions {
                cpu,
                name: format!("{}-q{q}", short(&self.cfg.name)),
            };
            let handle = worker::spawn(setup, Arc::clone(&self.io), edge, kick, opts)?;
            self.workers.push(handle);
            self.saved[usize::from(q)] = None;
        }
        info!(
            "{}: DRIVER_OK, {} queue(s) running (event_idx={event_idx})",
            self.cfg.name,
            self.workers.len()
        );
        Ok(())
    }
}

/// How long teardown waits for the kernel to release a device (EBUSY on destroy).
pub const DESTROY_DEADLINE: Duration = Duration::from_secs(5);
