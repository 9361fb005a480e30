//! The worker thread: spawning, pinning, stopping and joining it.

use std::io;
use std::os::fd::OwnedFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use log::{debug, warn};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::live::LiveQueue;
use super::{DeviceIo, QueueEdge, QueueSetup, Worker, WorkerError, WorkerExit};

/// `PR_SET_IO_FLUSHER` (linux/prctl.h, 5.6+); not exported by the libc crate.
const PR_SET_IO_FLUSHER: libc::c_int = 57;

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
    /// Busy-poll window after the last work (zero: park at once).
    pub poll: Duration,
    /// Where a live view asks for this queue's counters (`None`: no live view).
    pub live: Option<Arc<LiveQueue>>,
    /// Record where each request's time goes, per stage (off: totals only).
    pub stage_stats: bool,
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
                let mut w = Worker::new(setup, device, edge, kick, stop2, opts.poll)?;
                w.live = opts.live;
                w.stage_stats = opts.stage_stats;
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
