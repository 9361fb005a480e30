//! A whole simulated device: a backing file in a private temporary directory, the driver's
//! memory, one [`SimQueue`] per queue and one production worker per queue.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::unistd::{lseek, Whence};

use super::memory::SimMemory;
use super::queue::{QueueLayout, SimQueue};
use super::rng::SimRng;
use super::SimError;
use crate::backend::{Backend, BackingSpec};
use crate::blk::VIRTIO_BLK_ID_BYTES;
use crate::worker::live::LiveStats;
use crate::worker::{self, DeviceIo, WorkerError, WorkerExit, WorkerHandle, WorkerOptions};

/// IOVA of queue 0's rings; queue `i` is [`RING_STRIDE`] further on.
pub const RING_BASE: u64 = 0x1000_0000;
/// Distance between the ring regions of consecutive queues.
pub const RING_STRIDE: u64 = 0x100_0000;
/// IOVA of the buffer heap.
pub const HEAP_BASE: u64 = 0x1_0000_0000;
/// IOVAs from here on are never used by [`SimDevice`]: tests place their own regions there.
pub const FREE_IOVA: u64 = 0x10_0000_0000;

/// A temporary directory removed on drop.
#[derive(Debug)]
pub struct SimDir {
    path: PathBuf,
}

impl SimDir {
    /// A new empty directory under `base` (the system temporary directory if `None`).
    pub fn new(base: Option<&Path>) -> io::Result<Self> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let base = base.map_or_else(std::env::temp_dir, Path::to_path_buf);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        loop {
            let n = SEQ.fetch_add(1, Ordering::Relaxed);
            let path = base.join(format!("vduse-blkd-sim-{}-{nanos}-{n}", std::process::id()));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(SimDir { path }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SimDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// What device to simulate.
#[derive(Debug, Clone)]
pub struct SimDeviceConfig {
    /// Capacity in bytes (a multiple of 512).
    pub capacity: u64,
    /// Open the backing file read-only (the device refuses writes).
    pub read_only: bool,
    /// Number of queues, each with its own worker.
    pub queues: u16,
    /// Size of every queue (a power of two, 1..=32768).
    pub queue_size: u16,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
    /// GET_ID answer.
    pub serial: [u8; VIRTIO_BLK_ID_BYTES],
    /// Bytes of buffer heap.
    pub heap_len: u64,
    /// Directory to create the backing file's temporary directory in (default: the system
    /// temporary directory). A tmpfs directory exercises the WRITE_ZEROES fallbacks.
    pub dir: Option<PathBuf>,
    /// Fill the backing file with pseudo-random bytes from this seed (`None`: sparse zeros).
    pub fill_seed: Option<u64>,
    /// The workers' busy-poll window (`serve --poll-us`; zero: no polling).
    pub poll: Duration,
    /// Offer the buffer heap to the workers as a zero-copy area (fixed buffers), as a
    /// registered umem is on VDUSE.
    pub zero_copy: bool,
    /// A live view the workers answer, as `serve`'s do.
    pub live: Option<Arc<LiveStats>>,
    /// Workers time each request's stages (`serve --no-stage-stats` turns it off).
    pub stage_stats: bool,
}

impl SimDeviceConfig {
    /// One queue of 256 entries, no EVENT_IDX, 64 MiB heap, sparse file of `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES];
        serial[..8].copy_from_slice(b"sim-blk0");
        SimDeviceConfig {
            capacity,
            read_only: false,
            queues: 1,
            queue_size: 256,
            event_idx: false,
            serial,
            heap_len: 64 << 20,
            dir: None,
            fill_seed: None,
            poll: Duration::ZERO,
            zero_copy: false,
            live: None,
            stage_stats: true,
        }
    }
}

/// A backing file, driver memory, queues and their workers.
///
/// Dropping it stops every worker still running and panics if one of them had panicked (so a
/// test that forgets to check still fails).
pub struct SimDevice {
    /// The driver's memory (rings at [`RING_BASE`], heap at [`HEAP_BASE`]).
    pub mem: SimMemory,
    /// The driver side of each queue.
    pub queues: Vec<SimQueue>,
    workers: Vec<Option<WorkerHandle>>,
    exits_seen: Vec<u64>,
    io: Arc<DeviceIo>,
    file: File,
    path: PathBuf,
    cfg: SimDeviceConfig,
    _dir: SimDir,
}

impl SimDevice {
    /// Create the device and start one worker per queue at index 0.
    pub fn new(cfg: SimDeviceConfig) -> Result<Self, SimError> {
        let mut d = Self::create(cfg)?;
        for q in 0..d.queues.len() {
            d.start(q, 0, 0)?;
        }
        Ok(d)
    }

    /// Create the device without starting workers (to rearrange rings first).
    pub fn create(cfg: SimDeviceConfig) -> Result<Self, SimError> {
        let dir = SimDir::new(cfg.dir.as_deref())?;
        let path = dir.path().join("disk.img");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        file.set_len(cfg.capacity)?;
        if let Some(seed) = cfg.fill_seed {
            let mut rng = SimRng::new(seed);
            let mut buf = vec![0u8; 1 << 20];
            let mut off = 0;
            while off < cfg.capacity {
                let n = (cfg.capacity - off).min(buf.len() as u64) as usize;
                rng.fill(&mut buf[..n]);
                file.write_all_at(&buf[..n], off)?;
                off += n as u64;
            }
        }
        let backend = Backend::open(&BackingSpec {
            path: path.clone(),
            size: None,
            read_only: cfg.read_only,
            direct: Some(false),
            block_size: 512,
        })
        .map_err(|e| SimError::Unexpected(e.to_string()))?;
        let io = Arc::new(DeviceIo::new(Arc::new(backend), cfg.serial));
        let mem = SimMemory::new();
        mem.add_heap(HEAP_BASE, cfg.heap_len)?;
        mem.set_zero_copy(cfg.zero_copy.then_some(HEAP_BASE));
        let mut queues = Vec::new();
        for q in 0..cfg.queues {
            let base = RING_BASE + u64::from(q) * RING_STRIDE;
            let (layout, len) = QueueLayout::contiguous(base, cfg.queue_size);
            mem.add_region(base, len.div_ceil(4096) * 4096, super::memory::PROT_RW)?;
            queues.push(SimQueue::new(
                mem.clone(),
                q,
                cfg.queue_size,
                layout,
                cfg.event_idx,
            )?);
        }
        let n = queues.len();
        Ok(SimDevice {
            mem,
            queues,
            workers: (0..n).map(|_| None).collect(),
            exits_seen: vec![0; n],
            io,
            file,
            path,
            cfg,
            _dir: dir,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SimDeviceConfig {
        &self.cfg
    }

    /// What the workers share (backing store, serial).
    pub fn device_io(&self) -> &Arc<DeviceIo> {
        &self.io
    }

    /// Path of the backing file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Start (or restart) the worker of queue `q` at the given ring indices.
    pub fn start(&mut self, q: usize, next_avail: u16, next_used: u16) -> Result<(), SimError> {
        if self.workers[q].is_some() {
            return Err(SimError::Unexpected(format!(
                "queue {q} already has a worker"
            )));
        }
        let queue = &mut self.queues[q];
        let setup = queue.setup(next_avail, next_used);
        let (kick, edge) = queue.connect()?;
        self.exits_seen[q] = queue.irq().exits();
        let opts = WorkerOptions {
            cpu: None,
            name: format!("sim_q{q}"),
            poll: self.cfg.poll,
            live: u16::try_from(q)
                .ok()
                .and_then(|q| self.cfg.live.as_ref()?.queue(q)),
            stage_stats: self.cfg.stage_stats,
        };
        let h = worker::spawn(setup, Arc::clone(&self.io), edge, kick, opts)?;
        self.workers[q] = Some(h);
        Ok(())
    }

    /// Whether queue `q` has a worker handle (running or ended but not yet joined).
    pub fn has_worker(&self, q: usize) -> bool {
        self.workers[q].is_some()
    }

    /// Stop the worker of queue `q` (it finishes what is in flight) and return how it ended.
    ///
    /// # Panics
    /// If queue `q` has no worker.
    pub fn stop(&mut self, q: usize) -> Result<WorkerExit, WorkerError> {
        let h = self.workers[q].take().expect("queue has a worker");
        h.stop()
    }

    /// Wait (up to `timeout`) for the worker of queue `q` to end on its own, e.g. after the
    /// driver broke the ring, and return how it ended.
    pub fn wait_exit(
        &mut self,
        q: usize,
        timeout: Duration,
    ) -> Result<Result<WorkerExit, WorkerError>, SimError> {
        let want = self.exits_seen[q] + 1;
        self.queues[q]
            .irq()
            .wait_exits(want, Instant::now() + timeout)?;
        Ok(self.stop(q))
    }

    /// Whether the worker of queue `q` ended without being asked (non-blocking).
    pub fn worker_gone(&self, q: usize) -> bool {
        self.queues[q].irq().exits() > self.exits_seen[q]
    }

    /// Stop every worker and return how each ended (queues without a worker are skipped).
    pub fn shutdown(mut self) -> Vec<Result<WorkerExit, WorkerError>> {
        let mut out = Vec::new();
        for q in 0..self.workers.len() {
            if self.workers[q].is_some() {
                out.push(self.stop(q));
            }
        }
        out
    }

    /// Read `len` bytes of the backing file at `off` (through the test's own descriptor).
    pub fn backing_read(&self, off: u64, len: usize) -> Result<Vec<u8>, SimError> {
        let mut v = vec![0u8; len];
        self.file.read_exact_at(&mut v, off)?;
        Ok(v)
    }

    /// Write the backing file directly (to prepare contents).
    pub fn backing_write(&self, off: u64, data: &[u8]) -> Result<(), SimError> {
        self.file.write_all_at(data, off)?;
        Ok(())
    }

    /// Whether `[off, off+len)` of the backing file is entirely a hole (`SEEK_DATA`).
    pub fn is_hole(&self, off: u64, len: u64) -> Result<bool, SimError> {
        let off_t = i64::try_from(off).map_err(|_| SimError::BadRegion(off))?;
        match lseek(&self.file, off_t, Whence::SeekData) {
            Ok(data) => Ok(data as u64 >= off + len),
            Err(nix::errno::Errno::ENXIO) => Ok(true),
            Err(e) => Err(SimError::Io(e.into())),
        }
    }

    /// 512-byte blocks allocated to the backing file (`st_blocks`).
    pub fn allocated_blocks(&self) -> Result<u64, SimError> {
        Ok(self.file.metadata()?.blocks())
    }
}

impl Drop for SimDevice {
    fn drop(&mut self) {
        let mut panicked = Vec::new();
        for (q, w) in self.workers.iter_mut().enumerate() {
            if let Some(h) = w.take() {
                if let Err(WorkerError::Panicked(_)) = h.stop() {
                    panicked.push(q);
                }
            }
        }
        if !panicked.is_empty() && !std::thread::panicking() {
            panic!("worker(s) of queue(s) {panicked:?} panicked");
        }
    }
}
