//! Live statistics: copies of running workers' counters on request, without atomics or locks
//! on the hot path.
//!
//! Owns: one [`LiveQueue`] per queue (shared by the worker of that queue, whichever worker
//! generation it is, and the reader) and the request/answer handshake: the reader bumps
//! `wanted` and writes the queue's eventfd; the worker, which reads that eventfd through its
//! io_uring like its kick, copies its counters into `snapshot` with the generation it
//! answered. A worker that ends adds its counters to `retired`, so a view over a device
//! whose workers restarted (reset, re-attach) still counts everything. Must not touch: the
//! worker's request handling.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::metrics::QueueStats;

#[derive(Default)]
struct Shared {
    /// The worker's last copy and the generation it answered.
    snapshot: Option<(u64, QueueStats)>,
    /// Counters of workers of this queue that have ended.
    retired: QueueStats,
    /// A worker is running (and will answer).
    running: bool,
}

/// One queue's side of the live view.
pub struct LiveQueue {
    wake: EventFd,
    wanted: AtomicU64,
    shared: Mutex<Shared>,
}

impl LiveQueue {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        // Every update assigns whole fields: a poisoned lock still holds a consistent state.
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The eventfd the worker arms a read on.
    pub(crate) fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    /// Worker side: a worker of this queue starts.
    pub(crate) fn started(&self) {
        let mut s = self.lock();
        s.running = true;
        s.snapshot = None;
    }

    /// Worker side: answer the newest request with a copy of `stats`.
    pub(crate) fn answer(&self, stats: &QueueStats) {
        let gen = self.wanted.load(Ordering::Acquire);
        self.lock().snapshot = Some((gen, stats.clone()));
    }

    /// Worker side: the worker ends with these counters.
    pub(crate) fn retire(&self, stats: &QueueStats) {
        let mut s = self.lock();
        let mut ended = stats.clone();
        // A gauge of the worker that ended, not something to add up later.
        ended.in_flight = 0;
        s.retired.merge(&ended);
        s.snapshot = None;
        s.running = false;
    }
}

impl std::fmt::Debug for LiveQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveQueue")
            .field("wanted", &self.wanted.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// The live view of a device's queues.
#[derive(Debug)]
pub struct LiveStats {
    queues: Vec<Arc<LiveQueue>>,
}

impl LiveStats {
    /// A view of `n` queues.
    pub fn new(n: u16) -> io::Result<Arc<Self>> {
        let queues = (0..n)
            .map(|_| {
                Ok(Arc::new(LiveQueue {
                    wake: EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?,
                    wanted: AtomicU64::new(0),
                    shared: Mutex::new(Shared::default()),
                }))
            })
            .collect::<Result<_, nix::Error>>()
            .map_err(io::Error::from)?;
        Ok(Arc::new(LiveStats { queues }))
    }

    /// Queue `q`'s side, for its workers.
    pub fn queue(&self, q: u16) -> Option<Arc<LiveQueue>> {
        self.queues.get(usize::from(q)).cloned()
    }

    /// Every queue's counters now (retired workers plus the running one's fresh copy), each
    /// running worker asked and waited for up to `deadline`. A worker that does not answer
    /// in time (it is blocked in a long submission) is reported from its last copy.
    pub fn collect(&self, deadline: Duration) -> Vec<QueueStats> {
        let asked: Vec<Option<u64>> = self
            .queues
            .iter()
            .map(|q| {
                if !q.lock().running {
                    return None;
                }
                let gen = q.wanted.fetch_add(1, Ordering::AcqRel) + 1;
                // A full eventfd counter still wakes the worker: the error can be ignored.
                let _ = q.wake.write(1);
                Some(gen)
            })
            .collect();
        let end = Instant::now() + deadline;
        self.queues
            .iter()
            .zip(asked)
            .map(|(q, gen)| {
                loop {
                    let s = q.lock();
                    let fresh = match (&s.snapshot, gen) {
                        (_, None) => true,
                        (Some((g, _)), Some(want)) => *g >= want,
                        (None, Some(_)) => !s.running,
                    };
                    if fresh || Instant::now() >= end {
                        let mut all = s.retired.clone();
                        if let Some((_, snap)) = &s.snapshot {
                            all.merge(snap);
                        }
                        return all;
                    }
                    drop(s);
                    // Polling with a deadline: the worker answers at its next wake-up.
                    std::thread::sleep(Duration::from_micros(200));
                }
            })
            .collect()
    }
}
