//! Adaptive busy polling (`serve --poll-us N`): after its last piece of work a worker keeps
//! looking at the avail ring and its completion queue, with the driver's notifications
//! suppressed, for up to N µs before it turns them back on and parks in `io_uring_enter`.
//! Work keeps it spinning; an idle queue costs one window of CPU and then nothing.
//!
//! Owns: the poll window and its loop. Must not touch: request handling (it calls the
//! worker's own `pop_all`, `reap` and `notify_if_needed`), the ring's memory.

use std::sync::atomic::Ordering;
use std::time::Instant;

use virtio_queue::QueueT;

use super::{BrokenReason, QueueEdge, Worker, WorkerError};

impl<E: QueueEdge> Worker<E> {
    /// Spin until the window passes with nothing to do, then re-enable notifications (and
    /// serve what arrived meanwhile) so that the caller can park. Returns at once when the
    /// window is zero, the worker is stopping, or the ring is broken.
    pub(super) fn poll(&mut self) -> Result<(), WorkerError> {
        if self.poll.is_zero() || self.stopping || self.broken.is_some() {
            return Ok(());
        }
        // With EVENT_IDX this leaves `avail_event` where the last drain set it: the driver
        // kicks once more at most; without, it sets VRING_USED_F_NO_NOTIFY.
        if let Err(e) = self.queue.disable_notification(self.space.memory()) {
            self.mark_broken(BrokenReason::RingFlags(e));
            return Ok(());
        }
        let mut last_work = Instant::now();
        loop {
            let mut worked = false;
            self.stamp_submit();
            self.uring.submit().map_err(|e| self.uring_err(e))?;
            if self.uring.has_completions() {
                self.reap()?;
                worked = true;
            }
            if self.stopping || self.broken.is_some() {
                return Ok(());
            }
            if self.throttled || self.avail_pending() {
                // New requests, or ones held back for CQ room: either way there is work.
                self.throttled = false;
                self.wake = self.clock.now();
                self.pop_all();
                self.resolve_zero_copy();
                worked = true;
                if self.broken.is_some() {
                    return Ok(());
                }
            }
            self.notify_if_needed();
            let now = Instant::now();
            if worked {
                last_work = now;
            } else if now.duration_since(last_work) >= self.poll {
                break;
            }
            // Not a bare spin: a driver or another worker may need this CPU (a virtual
            // machine's vCPUs, a shared host); on an idle CPU the yield returns at once.
            std::thread::yield_now();
        }
        // Notifications back on, with the recheck that closes the race against a driver
        // that added a request just before.
        self.drain();
        self.notify_if_needed();
        Ok(())
    }

    /// Whether the driver has published requests we have not popped (an unreadable avail
    /// index counts as "yes": `pop_all` then reports the ring broken).
    fn avail_pending(&self) -> bool {
        self.queue
            .avail_idx(self.space.memory(), Ordering::Acquire)
            .map_or(true, |idx| idx.0 != self.queue.next_avail())
    }
}
