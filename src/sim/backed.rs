//! One simulated queue served by a production worker over a backend the caller opened, for
//! tests and benches that need a backing [`super::SimDevice`] does not make (it always
//! creates its own temporary file), such as [`Backend::null`].
//!
//! The layout is [`super::SimDevice`]'s: rings at [`RING_BASE`], a buffer heap at
//! [`HEAP_BASE`]; requests are built with [`super::blk::BlkRequest`] against [`BackedQueue::mem`].

use std::sync::Arc;
use std::time::Duration;

use super::device::{HEAP_BASE, RING_BASE};
use super::memory::{SimMemory, PROT_RW};
use super::queue::{QueueLayout, SimQueue};
use super::SimError;
use crate::backend::Backend;
use crate::blk::VIRTIO_BLK_ID_BYTES;
use crate::worker::{self, DeviceIo, WorkerError, WorkerExit, WorkerHandle, WorkerOptions};

/// A queue, its memory and the worker serving it from a caller-chosen backend.
///
/// Dropping it stops the worker.
pub struct BackedQueue {
    /// The driver's memory (rings at [`RING_BASE`], heap at [`HEAP_BASE`]).
    pub mem: SimMemory,
    /// The driver side of the queue.
    pub queue: SimQueue,
    worker: Option<WorkerHandle>,
}

impl BackedQueue {
    /// Map the rings and a heap of `heap_len` bytes, and start a worker (unpinned) serving
    /// `backend` on a queue of `queue_size` entries.
    pub fn new(
        backend: Backend,
        queue_size: u16,
        event_idx: bool,
        heap_len: u64,
    ) -> Result<Self, SimError> {
        let mem = SimMemory::new();
        mem.add_heap(HEAP_BASE, heap_len)?;
        let (layout, len) = QueueLayout::contiguous(RING_BASE, queue_size);
        mem.add_region(RING_BASE, len.div_ceil(4096) * 4096, PROT_RW)?;
        let mut queue = SimQueue::new(mem.clone(), 0, queue_size, layout, event_idx)?;
        let setup = queue.setup(0, 0);
        let (kick, edge) = queue.connect()?;
        let io = Arc::new(DeviceIo::new(Arc::new(backend), [0u8; VIRTIO_BLK_ID_BYTES]));
        let opts = WorkerOptions {
            cpu: None,
            name: "sim_backed_q0".into(),
            poll: Duration::ZERO,
            live: None,
            stage_stats: true,
        };
        let worker = worker::spawn(setup, io, edge, kick, opts)?;
        Ok(BackedQueue {
            mem,
            queue,
            worker: Some(worker),
        })
    }

    /// Stop the worker (it finishes what is in flight) and return how it ended.
    pub fn stop(mut self) -> Result<WorkerExit, WorkerError> {
        match self.worker.take() {
            Some(h) => h.stop(),
            None => Err(WorkerError::Panicked(0)),
        }
    }
}

impl Drop for BackedQueue {
    fn drop(&mut self) {
        if let Some(h) = self.worker.take() {
            let _ = h.stop();
        }
    }
}
