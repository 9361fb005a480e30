//! The driver side of one queue: its rings and buffers, laid out once, and the hot loop that
//! keeps `depth` requests in flight.

use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use vm_memory::{Bytes, GuestMemoryRegion, MemoryRegionAddress};

use vduse_blkd::memory::{IovaRegion, RegionSource};
use vduse_blkd::sim::blk::{header, S_OK, T_IN, T_OUT};
use vduse_blkd::sim::device::{RING_BASE, RING_STRIDE};
use vduse_blkd::sim::memory::PROT_RW;
use vduse_blkd::sim::queue::{Desc, QueueLayout, SimIrq, SimQueue, DESC_F_INDIRECT, DESC_F_WRITE};
use vduse_blkd::sim::{SimError, SimMemory, SimRng};
use vduse_blkd::worker::{self, DeviceIo, WorkerHandle, WorkerOptions};

use crate::engine::{io_err, BenchError};
use crate::options::{BenchOptions, Pattern, WaitMode};

/// A driver that sees no completion for this long while requests are in flight gives up.
const STALL: Duration = Duration::from_secs(10);
/// Longest single wait on the interrupt line (the driver re-checks its clock after each).
const WAIT_SLICE: Duration = Duration::from_millis(50);
/// Bytes of per-request metadata: indirect table (3 × 16), header (16), status (1), padding.
pub const META: u64 = 128;
const META_HDR: u64 = 48;
const META_STATUS: u64 = 64;
const PAGE: u64 = 4096;

/// The driver side of one queue, on the hot path.
pub struct Driver {
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
    pub meta: u64,
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
pub struct Outcome {
    /// Requests completed inside the measured window.
    pub completed: u64,
    /// Requests completed with a bad used length or status byte (whole run).
    pub errors: u64,
    /// Driver-side latency of the measured requests, nanoseconds.
    pub hist: Histogram<u64>,
}

/// An empty latency histogram (1 ns .. 1 h, 3 significant digits).
pub fn latency_histogram() -> Histogram<u64> {
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
    pub fn run(
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
                self.idle(progress, outstanding, &mut spins)?;
                continue;
            }
            let now = Instant::now();
            progress = now;
            stopping |= now >= t_end;
            let window = Window {
                now,
                measured: now >= t_start && !stopping,
                stopping,
            };
            batch.clear();
            let old = self.avail_idx;
            outstanding -= self.reap(used, &window, &mut out, &mut batch)?;
            if !batch.is_empty() {
                outstanding += batch.len();
                self.publish(&batch, old)?;
            }
        }
        Ok(out)
    }

    /// Nothing new on the used ring: spin (`--wait poll`), or ask for an interrupt at the next
    /// used entry and block on the interrupt line for at most [`WAIT_SLICE`]. Fails when no
    /// completion came for [`STALL`] since `progress`, or the worker ended.
    fn idle(
        &self,
        progress: Instant,
        outstanding: usize,
        spins: &mut u32,
    ) -> Result<(), BenchError> {
        if self.wait == WaitMode::Poll {
            *spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(4096) {
                std::hint::spin_loop();
                return Ok(());
            }
        }
        if Instant::now().duration_since(progress) > STALL {
            return Err(self.stalled(format!(
                "no completion for {} s with {outstanding} requests in flight",
                STALL.as_secs()
            )));
        }
        if self.irq.exits() > 0 {
            return Err(self.stalled("the worker ended during the run"));
        }
        if self.wait == WaitMode::Poll {
            return Ok(());
        }
        // Ask for an interrupt at the next used entry, then look once more: the worker may
        // have published before it could see the request (virtqueue_enable_cb).
        self.set_used_event(self.last_used)?;
        fence(Ordering::SeqCst);
        if self.used_idx()? == self.last_used {
            self.irq.wait(WAIT_SLICE);
        }
        Ok(())
    }

    /// Take every used entry before `used`: check its length and status byte, record its
    /// latency inside the measured window, and repost its slot (into `batch`, unpublished)
    /// unless stopping. Returns how many requests completed.
    fn reap(
        &mut self,
        used: u16,
        window: &Window,
        out: &mut Outcome,
        batch: &mut Vec<usize>,
    ) -> Result<usize, BenchError> {
        let mut reaped = 0;
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
            reaped += 1;
            if len != self.expect_len || self.status(slot)? != S_OK {
                out.errors += 1;
            }
            if window.measured {
                out.completed += 1;
                let ns = window.now.duration_since(self.posted_at[slot]).as_nanos();
                out.hist.saturating_record(ns as u64);
            }
            if !window.stopping {
                self.post(slot)?;
                batch.push(slot);
            }
        }
        Ok(reaped)
    }
}

/// Where a batch of completions falls in the run.
struct Window {
    /// When the batch was seen.
    now: Instant,
    /// Inside the measured window (after the ramp, before the end).
    measured: bool,
    /// Past the end: completed requests are not reposted.
    stopping: bool,
}

/// Set up the memory, the queue and its worker for queue `q`; return the driver side.
#[allow(clippy::too_many_arguments)]
pub fn build_queue(
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
    // The queue's buffers are its worker's zero-copy area (fixed buffers), as umem is.
    mem.set_zero_copy(o.zero_copy.then_some(buf_base));
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
        poll: o.worker_poll,
        live: None,
        stage_stats: o.stage_stats,
    };
    let handle = worker::spawn(setup, Arc::clone(io), edge, kick, opts)
        .map_err(io_err("cannot start a worker"))?;
    Ok((driver, handle))
}
