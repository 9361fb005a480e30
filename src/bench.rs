//! `vduse-blkd bench`: a load generator that drives the production queue workers through the
//! in-process driver simulator, with no kernel VDUSE device involved.
//!
//! Owns: the benchmark's setup (backing, simulated memory, one production worker per queue
//! started with [`worker::spawn`]), its driver threads (one per queue), CPU pinning of both,
//! the measurement window, and the [`BenchReport`]. Must not touch: the worker's internals
//! (it is driven only through its ring, kick eventfd and interrupt line, as a kernel would)
//! or the simulator's internals (only its public API).
//!
//! Each driver thread keeps `depth` requests in flight on its queue: it posts them, publishes
//! the avail index, kicks when `avail_event` asks for it (EVENT_IDX, as a Linux guest
//! negotiates it), and when the used ring is empty asks for an interrupt on the next entry
//! (`used_event`), re-checks, and blocks on the interrupt eventfd. Every completed request is
//! checked (used length and status byte) and reposted at a new random offset (aligned to the
//! block size, from a fixed seed). Latency is driver-side: from the avail-index store that
//! published the request to the moment the driver saw its used entry.
//!
//! The simulator's [`SimQueue`] provides the connection (kick eventfd, interrupt line,
//! [`crate::worker::QueueSetup`]), but the hot path writes the rings directly through the
//! region the simulator's memory hands out, with every request's descriptors and buffers laid
//! out once at setup: `SimQueue`'s general posting (a mutex per ring access, heap allocation per
//! request) would make the driver, not the worker, the thing measured. Requests are three
//! descriptors (header, data, status) behind one indirect descriptor by default, the layout a
//! Linux virtio_blk driver uses when VIRTIO_RING_F_INDIRECT_DESC is negotiated.

use std::fmt;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use thiserror::Error;
use vm_memory::{Bytes, GuestMemoryRegion, MemoryRegionAddress};

use crate::backend::{Backend, BackendError, BackingSpec};
use crate::blk::VIRTIO_BLK_ID_BYTES;
use crate::memory::{IovaRegion, RegionSource};
use crate::metrics::QueueStats;
use crate::sim::blk::{header, S_OK, T_IN, T_OUT};
use crate::sim::device::{HEAP_BASE, RING_BASE, RING_STRIDE};
use crate::sim::memory::PROT_RW;
use crate::sim::queue::{Desc, QueueLayout, SimIrq, SimQueue, DESC_F_INDIRECT, DESC_F_WRITE};
use crate::sim::{SimError, SimMemory, SimRng};
use crate::worker::{self, DeviceIo, WorkerError, WorkerHandle, WorkerOptions};

/// Largest block size a request may carry.
pub const MAX_BS: u32 = 1 << 20;
/// Largest queue depth.
pub const MAX_DEPTH: u16 = 4096;
/// Capacity of the null backing when `--size` is not given.
pub const NULL_DEFAULT_CAPACITY: u64 = 1 << 40;
/// A driver that sees no completion for this long while requests are in flight gives up.
const STALL: Duration = Duration::from_secs(10);
/// Longest single wait on the interrupt line (the driver re-checks its clock after each).
const WAIT_SLICE: Duration = Duration::from_millis(50);
/// Bytes of per-request metadata: indirect table (3 × 16), header (16), status (1), padding.
const META: u64 = 128;
const META_HDR: u64 = 48;
const META_STATUS: u64 = 64;
const PAGE: u64 = 4096;

/// The access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Random reads of `bs` bytes.
    RandRead,
    /// Random writes of `bs` bytes.
    RandWrite,
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
        })
    }
}

/// What the workers serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BenchBacking {
    /// No storage: every request completes with an io_uring NOP.
    Null,
    /// A regular file or block device.
    Path(PathBuf),
}

impl BenchBacking {
    /// `null` is the null backing; anything else is a path.
    pub fn parse(s: &str) -> Self {
        if s == "null" {
            BenchBacking::Null
        } else {
            BenchBacking::Path(PathBuf::from(s))
        }
    }
}

impl fmt::Display for BenchBacking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BenchBacking::Null => f.write_str("null"),
            BenchBacking::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

/// How a driver waits for completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WaitMode {
    /// Ask for an interrupt at the next used entry (`used_event`) and block on the interrupt
    /// eventfd, as a guest driver does: every batch costs a worker → driver wake-up.
    Irq,
    /// Spin on the used index and never ask for interrupts (a polling guest): the driver's
    /// wake-up cost is gone, so the worker is what limits. Needs a CPU of its own.
    Poll,
}

impl fmt::Display for WaitMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WaitMode::Irq => "irq",
            WaitMode::Poll => "poll",
        })
    }
}

/// Where threads run, over the `n` CPUs this process may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pinning {
    /// [`Pinning::Same`] when drivers wait for interrupts, [`Pinning::Split`] when they poll
    /// (a spinning driver must not share its worker's CPU). Why same-CPU for interrupts: on a
    /// virtual machine a wake-up across CPUs goes through the hypervisor (an IPI to a halted
    /// vCPU); on the 2-vCPU machine perf/RESULTS.md was measured on it costs ~25 µs against
    /// ~2.3 µs on one CPU (`perf/wakeup`), and a queue pays two wake-ups per batch.
    Auto,
    /// Worker and driver of queue `q` both on CPU `q % n`.
    Same,
    /// Worker of queue `q` on CPU `q % n`, its driver on CPU `(q + 1) % n`, as a guest's vCPU
    /// and the host's I/O thread would be on a host with CPUs to spare.
    Split,
    /// Workers round robin over the first list, drivers over the second.
    Lists(Vec<usize>, Vec<usize>),
    /// Leave placement to the scheduler.
    None,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The backing.
    pub backing: BenchBacking,
    /// Size of a file to create (sparse), or of the null device; must match an existing file.
    pub size: Option<u64>,
    /// Open the backing with O_DIRECT.
    pub direct: bool,
    /// Write the whole file with pseudo-random data before measuring.
    pub prefill: bool,
    /// Queues (one worker and one driver thread each).
    pub queues: u16,
    /// Requests each driver keeps in flight.
    pub depth: u16,
    /// Bytes per request (a multiple of 512).
    pub bs: u32,
    /// Access pattern.
    pub rw: Pattern,
    /// Measured time.
    pub seconds: Duration,
    /// Unmeasured time before it (warm-up).
    pub ramp: Duration,
    /// Seed of the offsets (queue `q` uses `seed + q`).
    pub seed: u64,
    /// Post each request as one indirect descriptor (true) or three direct ones (false).
    pub indirect: bool,
    /// How drivers wait for completions.
    pub wait: WaitMode,
    /// CPU placement.
    pub pinning: Pinning,
}

impl BenchOptions {
    /// Defaults for everything but the backing: 1 queue, depth 32, 4 KiB random reads for
    /// 5 s, no ramp, seed 1, indirect chains, automatic pinning.
    pub fn new(backing: BenchBacking) -> Self {
        BenchOptions {
            backing,
            size: None,
            direct: false,
            prefill: false,
            queues: 1,
            depth: 32,
            bs: 4096,
            rw: Pattern::RandRead,
            seconds: Duration::from_secs(5),
            ramp: Duration::ZERO,
            seed: 1,
            indirect: true,
            wait: WaitMode::Irq,
            pinning: Pinning::Auto,
        }
    }
}

/// The result. The first eleven fields are the stable JSON keys.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Requests completed per second in the measured window, all queues.
    pub iops: f64,
    /// MiB per second (`iops * bs / 2^20`).
    pub mib_s: f64,
    /// Driver-side latency percentiles (publish → used entry seen), microseconds.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Queues.
    pub queues: u16,
    /// Depth per queue.
    pub depth: u16,
    /// Bytes per request.
    pub bs: u32,
    /// Access pattern.
    pub rw: Pattern,
    /// `null` or the path.
    pub backing: String,
    /// Length of the measured window.
    pub seconds: f64,
    /// O_DIRECT was used.
    pub direct: bool,
    /// `indirect` or `direct` descriptor chains.
    pub chains: &'static str,
    /// How the drivers waited: `irq` or `poll`.
    pub wait: WaitMode,
    /// Requests completed in the window.
    pub requests: u64,
    /// Requests completed with a bad status or used length (any at all is a failure).
    pub errors: u64,
    /// Kicks the workers woke up for, whole run.
    pub kicks: u64,
    /// Interrupts the workers raised, whole run.
    pub interrupts: u64,
    /// Worker-side latency (avail pop → used publication), whole run, microseconds.
    pub worker_p50_us: f64,
    /// Worker-side 99th percentile.
    pub worker_p99_us: f64,
    /// Worker-side 99.9th percentile.
    pub worker_p999_us: f64,
    /// CPU of each queue's worker (empty: not pinned).
    pub worker_cpus: Vec<usize>,
    /// CPU of each queue's driver (empty: not pinned).
    pub driver_cpus: Vec<usize>,
}

/// Why a benchmark could not run or finish.
#[derive(Debug, Error)]
pub enum BenchError {
    /// A parameter is out of range.
    #[error("{0}")]
    Invalid(String),
    /// The backing cannot be used.
    #[error(transparent)]
    Backing(#[from] BackendError),
    /// The simulator failed.
    #[error("simulator: {0}")]
    Sim(#[from] SimError),
    /// An OS call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A queue stopped completing requests.
    #[error("queue {queue}: {why}")]
    Stalled {
        /// Queue index.
        queue: u16,
        /// What was seen.
        why: String,
    },
    /// A worker ended with an error.
    #[error(transparent)]
    Worker(#[from] WorkerError),
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> BenchError {
    move |source| BenchError::Io { what, source }
}

fn validate(o: &BenchOptions) -> Result<(), BenchError> {
    let bad = |m: String| Err(BenchError::Invalid(m));
    if o.queues == 0 || o.queues > 64 {
        return bad(format!("--queues must be 1..=64, not {}", o.queues));
    }
    if o.depth == 0 || o.depth > MAX_DEPTH {
        return bad(format!("--depth must be 1..={MAX_DEPTH}, not {}", o.depth));
    }
    if o.bs < 512 || o.bs > MAX_BS || !o.bs.is_multiple_of(512) {
        return bad(format!(
            "--bs must be a multiple of 512 up to {MAX_BS}, not {}",
            o.bs
        ));
    }
    if o.seconds.is_zero() {
        return bad("--seconds must be positive".into());
    }
    if o.prefill && o.backing == BenchBacking::Null {
        return bad("--prefill needs a file backing".into());
    }
    Ok(())
}

/// Write the whole backing file with pseudo-random data (not through O_DIRECT), then sync.
fn prefill(path: &std::path::Path, capacity: u64, seed: u64) -> Result<(), BenchError> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err("cannot open the backing to prefill it"))?;
    let mut rng = SimRng::new(seed ^ 0x9e37_79b9);
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < capacity {
        let n = (capacity - off).min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all_at(&buf[..n], off)
            .map_err(io_err("cannot prefill the backing"))?;
        off += n as u64;
    }
    f.sync_data()
        .map_err(io_err("cannot sync the prefilled backing"))
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    core_affinity::get_core_ids()
        .map(|v| v.into_iter().map(|c| c.id).collect())
        .unwrap_or_default()
}

fn placement(p: &Pinning, queues: u16, wait: WaitMode) -> (Vec<usize>, Vec<usize>) {
    let pick = |list: &[usize], q: usize| list[q % list.len()];
    match p {
        Pinning::None => (Vec::new(), Vec::new()),
        Pinning::Lists(w, d) if !w.is_empty() && !d.is_empty() => {
            let n = usize::from(queues);
            (
                (0..n).map(|q| pick(w, q)).collect(),
                (0..n).map(|q| pick(d, q)).collect(),
            )
        }
        Pinning::Lists(..) => (Vec::new(), Vec::new()),
        Pinning::Auto if wait == WaitMode::Poll => placement(&Pinning::Split, queues, wait),
        Pinning::Auto => placement(&Pinning::Same, queues, wait),
        Pinning::Same | Pinning::Split => {
            let cpus = allowed_cpus();
            if cpus.is_empty() {
                return (Vec::new(), Vec::new());
            }
            let shift = usize::from(*p == Pinning::Split);
            let n = usize::from(queues);
            (
                (0..n).map(|q| pick(&cpus, q)).collect(),
                (0..n).map(|q| pick(&cpus, q + shift)).collect(),
            )
        }
    }
}

/// Open (or create, or make) the backing; warn about reading holes.
fn open_backing(o: &BenchOptions, warn: &mut dyn FnMut(String)) -> Result<Backend, BenchError> {
    let path = match &o.backing {
        BenchBacking::Null => {
            return Ok(Backend::null(o.size.unwrap_or(NULL_DEFAULT_CAPACITY), 512)?)
        }
        BenchBacking::Path(p) => p.clone(),
    };
    let b = Backend::open(&BackingSpec {
        path: path.clone(),
        size: o.size,
        read_only: false,
        direct: Some(o.direct),
        block_size: 512,
    })?;
    if o.prefill {
        warn(format!(
            "prefilling {} ({} MiB)",
            path.display(),
            b.capacity >> 20
        ));
        prefill(&path, b.capacity, o.seed)?;
    } else if o.rw == Pattern::RandRead {
        let meta = std::fs::metadata(&path).map_err(io_err("cannot stat the backing"))?;
        if meta.file_type().is_file() && meta.blocks() * 512 < b.capacity {
            warn(format!(
                "warning: {} is sparse ({} of {} MiB allocated): random reads of holes touch no \
                 storage; write it first or pass --prefill",
                path.display(),
                (meta.blocks() * 512) >> 20,
                b.capacity >> 20
            ));
        }
    }
    if u64::from(o.bs) > b.capacity {
        return Err(BenchError::Invalid(format!(
            "--bs {} is larger than the backing ({} bytes)",
            o.bs, b.capacity
        )));
    }
    Ok(b)
}

/// The driver side of one queue, on the hot path.
struct Driver {
    index: u16,
    queue: SimQueue,
    irq: Arc<SimIrq>,
    /// The ring region (read-write) and its IOVA.
    rings: IovaRegion,
    ring_base: u64,
    layout: QueueLayout,
    size: u16,
    /// The buffer region (read-write) and its IOVA.
    bufs: IovaRegion,
    buf_base: u64,
    /// Offset of the per-request metadata in the buffer region.
    meta: u64,
    depth: usize,
    bs: u32,
    indirect: bool,
    wait: WaitMode,
    expect_len: u32,
    blocks: u64,
    rng: SimRng,
    avail_idx: u16,
    last_used: u16,
    posted_at: Vec<Instant>,
    in_flight: Vec<bool>,
}

/// What one driver measured.
struct Outcome {
    completed: u64,
    errors: u64,
    hist: Histogram<u64>,
}

fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("static histogram bounds are valid")
}

impl Driver {
    fn ring_at(&self, iova: u64) -> MemoryRegionAddress {
        MemoryRegionAddress(iova - self.ring_base)
    }

    fn meta_at(&self, slot: usize) -> u64 {
        self.meta + slot as u64 * META
    }

    /// Write the descriptors of every request once; they never change.
    fn lay_out(&self, write: bool, fill_seed: u64) -> Result<(), SimError> {
        let data_flags = if write { 0 } else { DESC_F_WRITE };
        let kind = if write { T_OUT } else { T_IN };
        let put = |region: &IovaRegion, off: u64, b: &[u8]| {
            region
                .write_slice(b, MemoryRegionAddress(off))
                .map_err(|_| SimError::Unmapped(off))
        };
        let mut fill = vec![0u8; self.bs as usize];
        let mut rng = SimRng::new(fill_seed);
        for s in 0..self.depth {
            let meta = self.meta_at(s);
            let data = self.buf_base + s as u64 * u64::from(self.bs);
            let hdr = self.buf_base + meta + META_HDR;
            let status = self.buf_base + meta + META_STATUS;
            put(&self.bufs, meta + META_HDR, &header(kind, 0))?;
            if write {
                rng.fill(&mut fill);
                put(&self.bufs, s as u64 * u64::from(self.bs), &fill)?;
            }
            let descs = [
                (hdr, 16u32, 0u16),
                (data, self.bs, data_flags),
                (status, 1, DESC_F_WRITE),
            ];
            if self.indirect {
                for (i, &(a, l, f)) in descs.iter().enumerate() {
                    let next_flag = if i < 2 { 1 } else { 0 };
                    let enc = Desc::encode(a, l, f | next_flag, (i + 1) as u16 % 3);
                    put(&self.bufs, meta + 16 * i as u64, &enc)?;
                }
                let table = self.buf_base + meta;
                self.queue
                    .write_desc(s as u16, table, 48, DESC_F_INDIRECT, 0)?;
            } else {
                let first = 3 * s as u16;
                for (i, &(a, l, f)) in descs.iter().enumerate() {
                    let next_flag = if i < 2 { 1 } else { 0 };
                    self.queue.write_desc(
                        first + i as u16,
                        a,
                        l,
                        f | next_flag,
                        first + i as u16 + 1,
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Pick a new offset for `slot` and put its head in the next avail entry (unpublished).
    fn post(&mut self, slot: usize) -> Result<(), SimError> {
        let sector = self.rng.below(self.blocks) * u64::from(self.bs / 512);
        let meta = self.meta_at(slot);
        let err = |_| SimError::Unmapped(meta);
        self.bufs
            .write_obj(sector.to_le(), MemoryRegionAddress(meta + META_HDR + 8))
            .map_err(err)?;
        self.bufs
            .write_obj(0xffu8, MemoryRegionAddress(meta + META_STATUS))
            .map_err(err)?;
        let head = if self.indirect { slot } else { 3 * slot } as u16;
        let at = self.layout.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.rings
            .write_obj(head.to_le(), self.ring_at(at))
            .map_err(|_| SimError::Unmapped(at))?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.in_flight[slot] = true;
        Ok(())
    }

    /// Publish every posted head (release), stamp their post time, kick if the worker asked.
    fn publish(&mut self, slots: &[usize], old: u16) -> Result<(), SimError> {
        let now = Instant::now();
        for &s in slots {
            self.posted_at[s] = now;
        }
        let new = self.avail_idx;
        let at = self.layout.avail + 2;
        self.rings
            .store(new.to_le(), self.ring_at(at), Ordering::Release)
            .map_err(|_| SimError::Unmapped(at))?;
        // The index store must be visible before the worker's suppression state is read (the
        // worker does the mirror image: write avail_event, fence, read the index).
        fence(Ordering::SeqCst);
        let at = self.layout.used + 4 + 8 * u64::from(self.size);
        let event = u16::from_le(
            self.rings
                .load(self.ring_at(at), Ordering::SeqCst)
                .map_err(|_| SimError::Unmapped(at))?,
        );
        if new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old) {
            self.queue.kick()?;
        }
        Ok(())
    }

    fn used_idx(&self) -> Result<u16, SimError> {
        let at = self.layout.used + 2;
        self.rings
            .load(self.ring_at(at), Ordering::Acquire)
            .map(u16::from_le)
            .map_err(|_| SimError::Unmapped(at))
    }

    fn set_used_event(&self, v: u16) -> Result<(), SimError> {
        let at = self.layout.avail + 4 + 2 * u64::from(self.size);
        self.rings
            .store(v.to_le(), self.ring_at(at), Ordering::SeqCst)
            .map_err(|_| SimError::Unmapped(at))
    }

    /// The used element at `idx`: (id, len).
    fn used_elem(&self, idx: u16) -> Result<(u32, u32), SimError> {
        let at = self.layout.used + 4 + 8 * u64::from(idx % self.size);
        let v: u64 = self
            .rings
            .read_obj(self.ring_at(at))
            .map_err(|_| SimError::Unmapped(at))?;
        let v = u64::from_le(v);
        Ok((v as u32, (v >> 32) as u32))
    }

    fn status(&self, slot: usize) -> Result<u8, SimError> {
        let at = self.meta_at(slot) + META_STATUS;
        self.bufs
            .read_obj(MemoryRegionAddress(at))
            .map_err(|_| SimError::Unmapped(at))
    }

    fn stalled(&self, why: impl Into<String>) -> BenchError {
        BenchError::Stalled {
            queue: self.index,
            why: why.into(),
        }
    }

    /// Run until `ramp + seconds` have passed after the start barrier, then let the requests
    /// in flight finish.
    fn run(
        mut self,
        start: &Barrier,
        ramp: Duration,
        seconds: Duration,
    ) -> Result<Outcome, BenchError> {
        let mut out = Outcome {
            completed: 0,
            errors: 0,
            hist: latency_histogram(),
        };
        let mut batch: Vec<usize> = (0..self.depth).collect();
        start.wait();
        let t0 = Instant::now();
        let t_start = t0 + ramp;
        let t_end = t_start + seconds;
        for s in 0..self.depth {
            self.post(s)?;
        }
        self.publish(&batch, 0)?;
        let mut outstanding = self.depth;
        let mut stopping = false;
        let mut progress = t0;
        let mut spins = 0u32;
        loop {
            let used = self.used_idx()?;
            if used == self.last_used {
                if outstanding == 0 {
                    break;
                }
                if self.wait == WaitMode::Poll {
                    spins = spins.wrapping_add(1);
                    if !spins.is_multiple_of(4096) {
                        std::hint::spin_loop();
                        continue;
                    }
                }
                let now = Instant::now();
                if now.duration_since(progress) > STALL {
                    return Err(self.stalled(format!(
                        "no completion for {} s with {outstanding} requests in flight",
                        STALL.as_secs()
                    )));
                }
                if self.irq.exits() > 0 {
                    return Err(self.stalled("the worker ended during the run"));
                }
                if self.wait == WaitMode::Poll {
                    continue;
                }
                // Ask for an interrupt at the next used entry, then look once more: the worker
                // may have published before it could see the request (virtqueue_enable_cb).
                self.set_used_event(self.last_used)?;
                fence(Ordering::SeqCst);
                if self.used_idx()? == self.last_used {
                    self.irq.wait(WAIT_SLICE);
                }
                continue;
            }
            let now = Instant::now();
            progress = now;
            stopping |= now >= t_end;
            let measured = now >= t_start && !stopping;
            batch.clear();
            let old = self.avail_idx;
            while self.last_used != used {
                let (id, len) = self.used_elem(self.last_used)?;
                self.last_used = self.last_used.wrapping_add(1);
                let slot = if self.indirect {
                    id as usize
                } else {
                    id as usize / 3
                };
                if slot >= self.depth || !self.in_flight[slot] {
                    return Err(self.stalled(format!("used entry for head {id}, not in flight")));
                }
                self.in_flight[slot] = false;
                outstanding -= 1;
                if len != self.expect_len || self.status(slot)? != S_OK {
                    out.errors += 1;
                }
                if measured {
                    out.completed += 1;
                    let ns = now.duration_since(self.posted_at[slot]).as_nanos();
                    out.hist.saturating_record(ns as u64);
                }
                if !stopping {
                    self.post(slot)?;
                    batch.push(slot);
                }
            }
            if !batch.is_empty() {
                outstanding += batch.len();
                self.publish(&batch, old)?;
            }
        }
        Ok(out)
    }
}

/// Set up the memory, the queue and its worker for queue `q`; return the driver side.
#[allow(clippy::too_many_arguments)]
fn build_queue(
    o: &BenchOptions,
    mem: &SimMemory,
    q: u16,
    buf_base: u64,
    queue_size: u16,
    io: &Arc<DeviceIo>,
    cpu: Option<usize>,
    capacity: u64,
) -> Result<(Driver, WorkerHandle), BenchError> {
    let ring_base = RING_BASE + u64::from(q) * RING_STRIDE;
    let (layout, len) = QueueLayout::contiguous(ring_base, queue_size);
    mem.add_region(ring_base, len.div_ceil(PAGE) * PAGE, PROT_RW)?;
    let depth = usize::from(o.depth);
    let meta = (depth as u64 * u64::from(o.bs)).div_ceil(PAGE) * PAGE;
    let buf_len = meta + (depth as u64 * META).div_ceil(PAGE) * PAGE;
    mem.add_region(buf_base, buf_len, PROT_RW)?;
    let mut source = mem.clone();
    let region = |src: &mut SimMemory, iova| {
        src.region_for(iova)
            .ok_or(BenchError::Sim(SimError::Unmapped(iova)))
    };
    let rings = region(&mut source, ring_base)?;
    let bufs = region(&mut source, buf_base)?;
    debug_assert_eq!(bufs.len(), buf_len);
    let queue = SimQueue::new(mem.clone(), q, queue_size, layout, true)?;
    let irq = Arc::clone(queue.irq());
    let write = o.rw == Pattern::RandWrite;
    let mut driver = Driver {
        index: q,
        queue,
        irq,
        rings,
        ring_base,
        layout,
        size: queue_size,
        bufs,
        buf_base,
        meta,
        depth,
        bs: o.bs,
        indirect: o.indirect,
        wait: o.wait,
        expect_len: if write { 1 } else { o.bs + 1 },
        blocks: capacity / u64::from(o.bs),
        rng: SimRng::new(o.seed.wrapping_add(u64::from(q))),
        avail_idx: 0,
        last_used: 0,
        posted_at: vec![Instant::now(); depth],
        in_flight: vec![false; depth],
    };
    driver.lay_out(write, o.seed.wrapping_add(0x100 + u64::from(q)))?;
    let setup = driver.queue.setup(0, 0);
    let (kick, edge) = driver.queue.connect()?;
    let opts = WorkerOptions {
        cpu,
        name: format!("bench_q{q}"),
    };
    let handle = worker::spawn(setup, Arc::clone(io), edge, kick, opts)
        .map_err(io_err("cannot start a worker"))?;
    Ok((driver, handle))
}

fn pin_current(cpu: Option<usize>) {
    if let Some(id) = cpu {
        if !core_affinity::set_for_current(core_affinity::CoreId { id }) {
            log::warn!("bench driver: cannot pin to CPU {id}");
        }
    }
}

fn us(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// Run a benchmark. `note` receives progress and warnings (one line each) for stderr.
pub fn run(o: &BenchOptions, note: &mut dyn FnMut(String)) -> Result<BenchReport, BenchError> {
    validate(o)?;
    let backend = open_backing(o, note)?;
    let capacity = backend.capacity;
    let direct = backend.direct;
    let mut serial = [0u8; VIRTIO_BLK_ID_BYTES];
    serial[..16].copy_from_slice(b"vduse-blkd-bench");
    let io = Arc::new(DeviceIo {
        backend: Arc::new(backend),
        serial,
    });
    let per_request = if o.indirect { 1 } else { 3 };
    let queue_size = (usize::from(o.depth) * per_request)
        .next_power_of_two()
        .max(256);
    let queue_size = u16::try_from(queue_size)
        .ok()
        .filter(|&s| s <= 32768)
        .ok_or_else(|| {
            BenchError::Invalid(format!("--depth {} needs too large a queue", o.depth))
        })?;
    let (worker_cpus, driver_cpus) = placement(&o.pinning, o.queues, o.wait);
    let mem = SimMemory::new();
    let mut drivers = Vec::new();
    let mut workers = Vec::new();
    let mut buf_base = HEAP_BASE;
    for q in 0..o.queues {
        let cpu = worker_cpus.get(usize::from(q)).copied();
        let (d, h) = build_queue(o, &mem, q, buf_base, queue_size, &io, cpu, capacity)?;
        buf_base += (d.meta + u64::from(o.depth) * META).div_ceil(1 << 21) * (1 << 21);
        drivers.push(d);
        workers.push(h);
    }
    let start = Arc::new(Barrier::new(drivers.len()));
    let mut threads = Vec::new();
    for (q, d) in drivers.into_iter().enumerate() {
        let start = Arc::clone(&start);
        let cpu = driver_cpus.get(q).copied();
        let (ramp, seconds) = (o.ramp, o.seconds);
        let t = std::thread::Builder::new()
            .name(format!("bench_drv{q}"))
            .spawn(move || {
                pin_current(cpu);
                d.run(&start, ramp, seconds)
            })
            .map_err(io_err("cannot start a driver thread"))?;
        threads.push(t);
    }
    let mut hist = latency_histogram();
    let (mut completed, mut errors) = (0u64, 0u64);
    let mut first_err = None;
    for t in threads {
        match t.join() {
            Ok(Ok(r)) => {
                completed += r.completed;
                errors += r.errors;
                // Same bounds on both sides: adding cannot fail.
                let _ = hist.add(&r.hist);
            }
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert(BenchError::Invalid("a driver thread panicked".into()));
            }
        }
    }
    let mut stats = QueueStats::default();
    for h in workers {
        match h.stop() {
            Ok(exit) => stats.merge(&exit.stats),
            Err(e) => {
                first_err.get_or_insert(BenchError::Worker(e));
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    let secs = o.seconds.as_secs_f64();
    let iops = completed as f64 / secs;
    let w = stats.summary();
    Ok(BenchReport {
        iops,
        mib_s: iops * f64::from(o.bs) / f64::from(1u32 << 20),
        p50_us: us(&hist, 0.5),
        p99_us: us(&hist, 0.99),
        p999_us: us(&hist, 0.999),
        queues: o.queues,
        depth: o.depth,
        bs: o.bs,
        rw: o.rw,
        backing: o.backing.to_string(),
        seconds: secs,
        direct,
        chains: if o.indirect { "indirect" } else { "direct" },
        wait: o.wait,
        requests: completed,
        errors,
        kicks: stats.kicks,
        interrupts: stats.interrupts,
        worker_p50_us: w.p50_us,
        worker_p99_us: w.p99_us,
        worker_p999_us: w.p999_us,
        worker_cpus,
        driver_cpus,
    })
}

impl BenchReport {
    /// The human-readable summary.
    pub fn human(&self) -> String {
        let cpus = |v: &[usize]| {
            if v.is_empty() {
                "unpinned".to_string()
            } else {
                v.iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            }
        };
        format!(
            "{rw} bs={bs} depth={depth} queues={queues} backing={backing}{direct} chains={chains} \
             wait={wait} {secs:.1} s\n\
             iops {iops:.0}  MiB/s {mib:.1}  requests {req}  errors {err}\n\
             latency (driver: publish -> used seen) us: p50 {p50:.2}  p99 {p99:.2}  p99.9 {p999:.2}\n\
             latency (worker: pop -> used published) us: p50 {wp50:.2}  p99 {wp99:.2}  p99.9 {wp999:.2}\n\
             kicks {kicks}  interrupts {irqs}  worker cpus {wc}  driver cpus {dc}",
            rw = self.rw,
            bs = self.bs,
            depth = self.depth,
            queues = self.queues,
            backing = self.backing,
            direct = if self.direct { " (O_DIRECT)" } else { "" },
            chains = self.chains,
            wait = self.wait,
            secs = self.seconds,
            iops = self.iops,
            mib = self.mib_s,
            req = self.requests,
            err = self.errors,
            p50 = self.p50_us,
            p99 = self.p99_us,
            p999 = self.p999_us,
            wp50 = self.worker_p50_us,
            wp99 = self.worker_p99_us,
            wp999 = self.worker_p999_us,
            kicks = self.kicks,
            irqs = self.interrupts,
            wc = cpus(&self.worker_cpus),
            dc = cpus(&self.driver_cpus),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick(backing: BenchBacking, rw: Pattern) -> BenchOptions {
        let mut o = BenchOptions::new(backing);
        o.rw = rw;
        o.depth = 8;
        o.seconds = Duration::from_millis(200);
        o.pinning = Pinning::None;
        o
    }

    #[test]
    fn null_backing_completes_reads_and_writes() {
        for rw in [Pattern::RandRead, Pattern::RandWrite] {
            let r = run(&quick(BenchBacking::Null, rw), &mut |_| {}).unwrap();
            assert_eq!(r.errors, 0, "{r:?}");
            assert!(r.requests > 0 && r.iops > 0.0, "{r:?}");
            assert!(r.p50_us > 0.0 && r.p50_us <= r.p99_us && r.p99_us <= r.p999_us);
        }
    }

    #[test]
    fn file_backing_two_queues_direct_chains() {
        let d = tempfile::tempdir().unwrap();
        let mut o = quick(
            BenchBacking::Path(d.path().join("f.img")),
            Pattern::RandRead,
        );
        o.size = Some(8 << 20);
        let mut notes = Vec::new();
        let r = run(&o, &mut |n| notes.push(n)).unwrap();
        assert_eq!(r.errors, 0, "{r:?}");
        assert!(notes.iter().any(|n| n.contains("sparse")), "{notes:?}");
        o.rw = Pattern::RandWrite;
        o.queues = 2;
        o.indirect = false;
        let r = run(&o, &mut |_| {}).unwrap();
        assert_eq!(r.errors, 0, "{r:?}");
        assert!(r.requests > 0 && r.chains == "direct");
        o.rw = Pattern::RandRead;
        o.prefill = true;
        notes.clear();
        let r = run(&o, &mut |n| notes.push(n)).unwrap();
        assert_eq!(r.errors, 0, "{r:?}");
        assert!(notes.iter().any(|n| n.contains("prefilling")), "{notes:?}");
        assert!(!notes.iter().any(|n| n.contains("sparse")), "{notes:?}");
    }

    #[test]
    fn bad_parameters_are_refused() {
        let mut o = quick(BenchBacking::Null, Pattern::RandRead);
        o.bs = 1000;
        assert!(matches!(run(&o, &mut |_| {}), Err(BenchError::Invalid(_))));
        o.bs = 4096;
        o.depth = 0;
        assert!(matches!(run(&o, &mut |_| {}), Err(BenchError::Invalid(_))));
        o.depth = 1;
        o.prefill = true;
        assert!(matches!(run(&o, &mut |_| {}), Err(BenchError::Invalid(_))));
    }

    #[test]
    fn placements() {
        let n = allowed_cpus().len();
        let (w, d) = placement(&Pinning::Auto, 2, WaitMode::Irq);
        assert_eq!(w, d, "interrupt-waiting drivers share their worker's CPU");
        let (w, d) = placement(&Pinning::Auto, 2, WaitMode::Poll);
        if n >= 2 {
            assert_eq!(w.len(), 2);
            assert!(w.iter().zip(&d).all(|(a, b)| a != b), "{w:?} {d:?}");
        }
        assert_eq!(placement(&Pinning::Split, 2, WaitMode::Irq), (w, d));
        let (w, d) = placement(&Pinning::Lists(vec![3], vec![5, 6]), 2, WaitMode::Irq);
        assert_eq!((w, d), (vec![3, 3], vec![5, 6]));
    }
}
