//! The driver side of one split virtqueue.
//!
//! [`SimQueue`] lays out the descriptor table, the avail ring (with `used_event`) and the used
//! ring (with `avail_event`) at chosen IOVAs, keeps the free descriptor list, posts chains
//! (direct or through an indirect table), publishes the avail index with release ordering,
//! kicks through the eventfd the worker reads, and reaps used entries, reading back each
//! request's status byte and device-written data. Raw accessors let a test write any
//! descriptor, any avail entry and any avail index.
//!
//! Interrupts arrive through [`SimIrq`], which the worker's [`SimEdge`] raises.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::memory::SimMemory;
use super::SimError;
use crate::memory::umem::Umem;
use crate::memory::{IovaRegion, RegionSource};
use crate::worker::{QueueEdge, QueueSetup, ZeroCopy};

/// `VRING_DESC_F_NEXT`.
pub const DESC_F_NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`: device-writable.
pub const DESC_F_WRITE: u16 = 2;
/// `VRING_DESC_F_INDIRECT`.
pub const DESC_F_INDIRECT: u16 = 4;
/// `VRING_USED_F_NO_NOTIFY`: the device asks not to be kicked.
pub const USED_F_NO_NOTIFY: u16 = 1;

/// Interrupt state shared by a queue's driver and its worker's edge, plus the signal that
/// the worker is gone (its edge was dropped).
pub struct SimIrq {
    count: AtomicU64,
    efd: EventFd,
    exits: AtomicU64,
    exit_efd: EventFd,
}

fn wait_fd(fd: &EventFd, timeout: Duration) -> bool {
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    let t = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
    let ready = matches!(poll(&mut fds, t), Ok(n) if n > 0);
    ready && fd.read().is_ok()
}

impl SimIrq {
    /// A fresh interrupt line with count 0.
    pub fn new() -> io::Result<Arc<Self>> {
        let efd = || EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK);
        Ok(Arc::new(SimIrq {
            count: AtomicU64::new(0),
            efd: efd()?,
            exits: AtomicU64::new(0),
            exit_efd: efd()?,
        }))
    }

    /// Workers (edges) that have gone away on this line so far.
    pub fn exits(&self) -> u64 {
        self.exits.load(Ordering::SeqCst)
    }

    /// Wait until at least `n` workers have gone away on this line, or `deadline`.
    pub fn wait_exits(&self, n: u64, deadline: Instant) -> Result<(), SimError> {
        while self.exits() < n {
            let now = Instant::now();
            if now >= deadline {
                return Err(SimError::Timeout("worker exit"));
            }
            wait_fd(
                &self.exit_efd,
                (deadline - now).min(Duration::from_millis(50)),
            );
        }
        Ok(())
    }

    /// Interrupts raised so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Raise one interrupt (what the worker's `notify` does).
    pub fn raise(&self) -> io::Result<()> {
        self.count.fetch_add(1, Ordering::SeqCst);
        self.efd.write(1).map(|_| ()).map_err(io::Error::from)
    }

    /// Wait until an interrupt is pending or `timeout` passes; clears it. Returns whether one
    /// was pending.
    pub fn wait(&self, timeout: Duration) -> bool {
        wait_fd(&self.efd, timeout)
    }

    /// Wait until at least `n` interrupts in total have been raised, or `deadline`.
    pub fn wait_count(&self, n: u64, deadline: Instant) -> Result<(), SimError> {
        while self.count() < n {
            let now = Instant::now();
            if now >= deadline {
                return Err(SimError::Timeout("interrupt"));
            }
            self.wait((deadline - now).min(Duration::from_millis(50)));
        }
        Ok(())
    }
}

/// The simulator's [`QueueEdge`]: regions come from a [`SimMemory`], interrupts go to a
/// [`SimIrq`].
pub struct SimEdge {
    /// Where regions come from.
    pub mem: SimMemory,
    /// Where interrupts go.
    pub irq: Arc<SimIrq>,
    /// The zero-copy area offered when the edge was made ([`SimMemory::set_zero_copy`]).
    pub umem: Option<Umem>,
}

impl RegionSource for SimEdge {
    fn region_for(&mut self, iova: u64) -> Option<IovaRegion> {
        self.mem.region_for(iova)
    }
}

impl QueueEdge for SimEdge {
    fn notify(&mut self) -> io::Result<()> {
        self.irq.raise()
    }

    fn zero_copy(&mut self, _served: bool) -> ZeroCopy {
        self.mem
            .zero_copy_area()
            .map_or(ZeroCopy::Off, ZeroCopy::On)
    }
}

impl Drop for SimEdge {
    /// The worker owns its edge until its thread ends, so this is the worker's exit signal.
    fn drop(&mut self) {
        self.irq.exits.fetch_add(1, Ordering::SeqCst);
        let _ = self.irq.exit_efd.write(1);
    }
}

/// Where the three ring areas of a queue live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLayout {
    /// Descriptor table (16-byte aligned, `16 * size` bytes).
    pub desc: u64,
    /// Avail ring (2-byte aligned, `6 + 2 * size` bytes, `used_event` last).
    pub avail: u64,
    /// Used ring (4-byte aligned, `6 + 8 * size` bytes, `avail_event` last).
    pub used: u64,
}

impl QueueLayout {
    /// Bytes of the descriptor table, avail ring and used ring for `size`.
    pub fn area_sizes(size: u16) -> (u64, u64, u64) {
        let n = u64::from(size);
        (16 * n, 6 + 2 * n, 6 + 8 * n)
    }

    /// The legacy layout from `base`: table, avail right after, used on the next 4 KiB
    /// boundary. Returns the layout and the total length.
    pub fn contiguous(base: u64, size: u16) -> (Self, u64) {
        let (d, a, u) = Self::area_sizes(size);
        let avail = base + d;
        let used = (avail + a).div_ceil(4096) * 4096;
        (
            QueueLayout {
                desc: base,
                avail,
                used,
            },
            used + u - base,
        )
    }
}

/// One descriptor a test wants in a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    /// IOVA of the buffer.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Flags. `DESC_F_NEXT` is added for every descriptor but the last when `next` is `None`.
    pub flags: u16,
    /// `None`: link to the following descriptor of the chain. `Some(n)`: write exactly `flags`
    /// and `next = n` (for hostile chains).
    pub next: Option<u16>,
}

impl Desc {
    /// A device-readable descriptor.
    pub fn readable(addr: u64, len: u32) -> Self {
        Desc {
            addr,
            len,
            flags: 0,
            next: None,
        }
    }

    /// A device-writable descriptor.
    pub fn writable(addr: u64, len: u32) -> Self {
        Desc {
            addr,
            len,
            flags: DESC_F_WRITE,
            next: None,
        }
    }

    /// Whether the device may write the buffer.
    pub fn is_write(&self) -> bool {
        self.flags & DESC_F_WRITE != 0
    }

    /// The 16-byte wire form with the given flags and next.
    pub fn encode(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        b
    }
}

/// How a chain reaches the descriptor table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Indirect {
    /// Every descriptor in the queue's table.
    #[default]
    Direct,
    /// One table descriptor pointing at an indirect table allocated from the heap.
    Table,
    /// One table descriptor pointing at an indirect table written at this IOVA.
    TableAt(u64),
    /// One table descriptor `{addr, len, INDIRECT}` with nothing written there (the chain's
    /// own descriptors are ignored): for unmapped or malformed tables.
    Raw {
        /// IOVA the descriptor names.
        addr: u64,
        /// Length the descriptor names.
        len: u32,
    },
}

/// A chain ready to post: descriptors plus what the driver must free when it completes.
#[derive(Debug, Clone, Default)]
pub struct Chain {
    /// The descriptors, in chain order.
    pub descs: Vec<Desc>,
    /// Direct or indirect.
    pub indirect: Indirect,
    /// Heap allocations `(addr, len)` to free on completion.
    pub allocs: Vec<(u64, u64)>,
    /// A value the test gets back in the [`Completion`].
    pub tag: u64,
}

impl Chain {
    /// Where the driver expects the status byte: the last byte of the last descriptor, if it
    /// is device-writable and not empty.
    pub fn status_addr(&self) -> Option<u64> {
        let last = self.descs.last()?;
        if !last.is_write() || last.len == 0 {
            return None;
        }
        // A hostile chain may end past u64::MAX: then there is no status byte to find.
        last.addr.checked_add(u64::from(last.len) - 1)
    }

    /// The device-writable data ranges (every writable descriptor, the status byte excluded).
    pub fn data_in(&self) -> Vec<(u64, u32)> {
        let status = self.status_addr().is_some();
        let n = self.descs.len();
        self.descs
            .iter()
            .enumerate()
            .filter(|(_, d)| d.is_write())
            .map(|(i, d)| {
                let len = if status && i + 1 == n {
                    d.len - 1
                } else {
                    d.len
                };
                (d.addr, len)
            })
            .filter(|&(_, l)| l > 0)
            .collect()
    }
}

/// What the driver remembers about a posted head until its used entry arrives.
#[derive(Debug, Clone, Default)]
pub struct Posted {
    /// Descriptor indices to return to the free list.
    pub descs: Vec<u16>,
    /// Heap allocations to free.
    pub allocs: Vec<(u64, u64)>,
    /// Where the status byte is, if any.
    pub status_addr: Option<u64>,
    /// Device-writable data ranges to read back.
    pub data_in: Vec<(u64, u32)>,
    /// The chain's tag.
    pub tag: u64,
}

/// One used entry, as the driver saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The id field of the used element (a head index, if the device behaves).
    pub head: u32,
    /// The len field of the used element.
    pub len: u32,
    /// The status byte (read from the chain's status address), if the chain had one.
    pub status: Option<u8>,
    /// The device-writable data bytes, concatenated (status byte excluded; buffers the driver
    /// cannot read back, being outside every region, are left out).
    pub data: Vec<u8>,
    /// The chain's tag.
    pub tag: u64,
    /// Whether the head was one this driver had in flight (false: a stray or repeated entry).
    pub tracked: bool,
}

/// The driver side of one split virtqueue.
pub struct SimQueue {
    mem: SimMemory,
    index: u16,
    size: u16,
    layout: QueueLayout,
    event_idx: bool,
    free: Vec<u16>,
    /// Next avail index to fill.
    avail_idx: u16,
    /// Avail index last published.
    published: u16,
    /// Next used index to read.
    last_used: u16,
    posted: Vec<Option<Posted>>,
    kick: Option<File>,
    irq: Arc<SimIrq>,
    kicks: u64,
    kicks_suppressed: u64,
    auto_used_event: bool,
}

impl SimQueue {
    /// A queue of `size` entries (a power of two, 1..=32768) whose rings are at `layout`
    /// (which must be mapped read-write); zeroes the ring areas.
    pub fn new(
        mem: SimMemory,
        index: u16,
        size: u16,
        layout: QueueLayout,
        event_idx: bool,
    ) -> Result<Self, SimError> {
        let (d, a, u) = QueueLayout::area_sizes(size);
        mem.fill(layout.desc, d as usize, 0)?;
        mem.fill(layout.avail, a as usize, 0)?;
        mem.fill(layout.used, u as usize, 0)?;
        let mut posted = Vec::new();
        posted.resize_with(usize::from(size), || None);
        Ok(SimQueue {
            mem,
            index,
            size,
            layout,
            event_idx,
            free: (0..size).rev().collect(),
            avail_idx: 0,
            published: 0,
            last_used: 0,
            posted,
            kick: None,
            irq: SimIrq::new()?,
            kicks: 0,
            kicks_suppressed: 0,
            auto_used_event: true,
        })
    }

    /// Create the kick eventfd and interrupt line for a (new) worker: returns the worker's
    /// kick fd and edge. The driver keeps a duplicate of the kick fd.
    pub fn connect(&mut self) -> Result<(OwnedFd, SimEdge), SimError> {
        let efd: OwnedFd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC)?.into();
        self.kick = Some(File::from(efd.try_clone()?));
        Ok((
            efd,
            SimEdge {
                mem: self.mem.clone(),
                irq: Arc::clone(&self.irq),
                umem: self.mem.zero_copy_area(),
            },
        ))
    }

    /// Connect to a device in the kernel (vhost-vdpa) instead of an in-process worker:
    /// returns the kick eventfd for the kernel to read and the call eventfd it signals. The
    /// driver keeps its own duplicates, so [`SimQueue::kick`] and [`SimQueue::wait_used`] work
    /// as with a worker (the interrupt count stays 0: the kernel signals the eventfd only).
    pub fn connect_kernel(&mut self) -> Result<(OwnedFd, OwnedFd), SimError> {
        let efd: OwnedFd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC)?.into();
        self.kick = Some(File::from(efd.try_clone()?));
        let call = self.irq.efd.as_fd().try_clone_to_owned()?;
        Ok((efd, call))
    }

    /// The [`QueueSetup`] for a worker resuming at the given indices.
    pub fn setup(&self, next_avail: u16, next_used: u16) -> QueueSetup {
        QueueSetup {
            index: self.index,
            size: self.size,
            max_size: self.size,
            desc_addr: self.layout.desc,
            avail_addr: self.layout.avail,
            used_addr: self.layout.used,
            next_avail,
            next_used,
            event_idx: self.event_idx,
        }
    }

    /// The memory the queue lives in.
    pub fn mem(&self) -> &SimMemory {
        &self.mem
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Ring addresses.
    pub fn layout(&self) -> QueueLayout {
        self.layout
    }

    /// The interrupt line.
    pub fn irq(&self) -> &Arc<SimIrq> {
        &self.irq
    }

    /// Free descriptors left.
    pub fn free_descs(&self) -> usize {
        self.free.len()
    }

    /// Heads posted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.posted.iter().filter(|p| p.is_some()).count()
    }

    /// Next avail index the driver will fill (its shadow copy).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Next used index the driver will read.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// Kicks sent and kicks skipped because the device asked not to be notified.
    pub fn kick_counts(&self) -> (u64, u64) {
        (self.kicks, self.kicks_suppressed)
    }

    /// Pretend `idx` requests have already gone through this (idle, fresh) ring, to test
    /// index wrap-around: sets the driver's indices and the ring's avail and used index
    /// fields. Start the worker with `next_avail = next_used = idx`.
    pub fn rebase(&mut self, idx: u16) -> Result<(), SimError> {
        if self.in_flight() != 0 {
            return Err(SimError::Unexpected(
                "rebase with requests in flight".into(),
            ));
        }
        self.mem
            .store_u16(self.layout.used + 2, idx, Ordering::Release)?;
        self.avail_idx = idx;
        self.last_used = idx;
        self.set_avail_idx_raw(idx)
    }

    // ---- raw ring access ----

    /// Take `n` descriptor indices off the free list.
    pub fn alloc_descs(&mut self, n: usize) -> Result<Vec<u16>, SimError> {
        if self.free.len() < n {
            return Err(SimError::NoDescriptors(n));
        }
        let at = self.free.len() - n;
        let mut v = self.free.split_off(at);
        v.reverse();
        Ok(v)
    }

    /// Write descriptor `index` of the table (any index, any content).
    pub fn write_desc(
        &self,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<(), SimError> {
        self.mem.write(
            self.layout.desc + 16 * u64::from(index),
            &Desc::encode(addr, len, flags, next),
        )
    }

    /// Write `head` into the next avail slot (no tracking, not published). `track` is what
    /// the driver will match the used entry against, if anything.
    pub fn add_head(&mut self, head: u16, track: Option<Posted>) -> Result<(), SimError> {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write(self.layout.avail + 4 + 2 * slot, &head.to_le_bytes())?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        if let (Some(p), Some(s)) = (track, self.posted.get_mut(usize::from(head))) {
            *s = Some(p);
        }
        Ok(())
    }

    /// Store a raw avail index (release), whatever the driver's shadow says.
    pub fn set_avail_idx_raw(&mut self, idx: u16) -> Result<(), SimError> {
        self.mem
            .store_u16(self.layout.avail + 2, idx, Ordering::Release)?;
        self.published = idx;
        Ok(())
    }

    /// Whether [`SimQueue::wait_used`] writes `used_event` before it sleeps (as a driver
    /// re-enabling callbacks does: "interrupt me for the next entry"). On by default; turn it
    /// off to control `used_event` by hand.
    pub fn set_auto_used_event(&mut self, on: bool) {
        self.auto_used_event = on;
    }

    /// Write `used_event` (the used index after which the driver wants an interrupt).
    pub fn set_used_event(&self, v: u16) -> Result<(), SimError> {
        let at = self.layout.avail + 4 + 2 * u64::from(self.size);
        self.mem.store_u16(at, v, Ordering::SeqCst)
    }

    /// Read `avail_event` (the avail index after which the device wants a kick).
    pub fn avail_event(&self) -> Result<u16, SimError> {
        let at = self.layout.used + 4 + 8 * u64::from(self.size);
        self.mem.load_u16(at, Ordering::SeqCst)
    }

    /// Read the used ring flags.
    pub fn used_flags(&self) -> Result<u16, SimError> {
        self.mem.load_u16(self.layout.used, Ordering::SeqCst)
    }

    /// Read the used index the device published (acquire).
    pub fn used_idx(&self) -> Result<u16, SimError> {
        self.mem.load_u16(self.layout.used + 2, Ordering::Acquire)
    }

    // ---- posting ----

    /// Write `chain` into the table (or an indirect table) and its head into the next avail
    /// slot; not yet published. Returns the head index.
    pub fn add(&mut self, chain: Chain) -> Result<u16, SimError> {
        let n = chain.descs.len();
        if n == 0 && !matches!(chain.indirect, Indirect::Raw { .. }) {
            return Err(SimError::EmptyChain);
        }
        let mut allocs = chain.allocs.clone();
        let head;
        let descs;
        match chain.indirect {
            Indirect::Direct => {
                descs = self.alloc_descs(n)?;
                for (i, d) in chain.descs.iter().enumerate() {
                    let (flags, next) = link(d, i, n, |j| descs[j]);
                    self.write_desc(descs[i], d.addr, d.len, flags, next)?;
                }
                head = descs[0];
            }
            Indirect::Table | Indirect::TableAt(_) => {
                let len = 16 * n as u64;
                let table = match chain.indirect {
                    Indirect::TableAt(a) => a,
                    _ => {
                        let a = self.mem.alloc(len, 16)?;
                        allocs.push((a, len));
                        a
                    }
                };
                let mut raw = Vec::with_capacity(len as usize);
                for (i, d) in chain.descs.iter().enumerate() {
                    let (flags, next) = link(d, i, n, |j| j as u16);
                    raw.extend_from_slice(&Desc::encode(d.addr, d.len, flags, next));
                }
                self.mem.write(table, &raw)?;
                descs = self.alloc_descs(1)?;
                head = descs[0];
                let len32 = u32::try_from(len).map_err(|_| SimError::EmptyChain)?;
                self.write_desc(head, table, len32, DESC_F_INDIRECT, 0)?;
            }
            Indirect::Raw { addr, len } => {
                descs = self.alloc_descs(1)?;
                head = descs[0];
                self.write_desc(head, addr, len, DESC_F_INDIRECT, 0)?;
            }
        }
        let posted = Posted {
            descs,
            allocs,
            status_addr: chain.status_addr(),
            data_in: chain.data_in(),
            tag: chain.tag,
        };
        self.add_head(head, Some(posted))?;
        Ok(head)
    }

    /// Publish every added head: store the avail index with release ordering.
    pub fn publish(&mut self) -> Result<(), SimError> {
        let idx = self.avail_idx;
        self.set_avail_idx_raw(idx)
    }

    /// Kick the worker unconditionally.
    pub fn kick(&mut self) -> Result<(), SimError> {
        let f = self.kick.as_mut().ok_or(SimError::NotConnected)?;
        f.write_all(&1u64.to_ne_bytes())?;
        self.kicks += 1;
        Ok(())
    }

    /// Publish, then kick only if the device asked for it: with EVENT_IDX by `avail_event`
    /// (`vring_need_event`), without by the used ring's `NO_NOTIFY` flag. Returns whether it
    /// kicked.
    pub fn publish_and_notify(&mut self) -> Result<bool, SimError> {
        let old = self.published;
        self.publish()?;
        let new = self.published;
        // The avail index store must be visible before we read the device's suppression
        // state (the device does the mirror image: write the state, fence, read the index).
        fence(Ordering::SeqCst);
        let needed = if self.event_idx {
            let event = self.avail_event()?;
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            self.used_flags()? & USED_F_NO_NOTIFY == 0
        };
        if needed {
            self.kick()?;
        } else {
            self.kicks_suppressed += 1;
        }
        Ok(needed)
    }

    /// Add, publish and kick one chain.
    pub fn submit(&mut self, chain: Chain) -> Result<u16, SimError> {
        let head = self.add(chain)?;
        self.publish()?;
        self.kick()?;
        Ok(head)
    }

    // ---- completions ----

    /// Read every new used entry, return the descriptors and buffers of tracked heads.
    pub fn reap(&mut self) -> Result<Vec<Completion>, SimError> {
        let used = self.used_idx()?;
        let mut out = Vec::new();
        while self.last_used != used {
            let slot = u64::from(self.last_used % self.size);
            let at = self.layout.used + 4 + 8 * slot;
            let id = self.mem.read_u32(at)?;
            let len = self.mem.read_u32(at + 4)?;
            self.last_used = self.last_used.wrapping_add(1);
            let posted = usize::try_from(id)
                .ok()
                .and_then(|i| self.posted.get_mut(i))
                .and_then(Option::take);
            let Some(p) = posted else {
                out.push(Completion {
                    head: id,
                    len,
                    status: None,
                    data: Vec::new(),
                    tag: 0,
                    tracked: false,
                });
                continue;
            };
            let status = match p.status_addr {
                Some(a) => self.mem.read_vec(a, 1).ok().map(|b| b[0]),
                None => None,
            };
            let mut data = Vec::new();
            for &(a, l) in &p.data_in {
                // Hostile chains may name buffers that are not (entirely) mapped.
                if self.mem.is_mapped(a, u64::from(l)) {
                    data.extend_from_slice(&self.mem.read_vec(a, l as usize)?);
                }
            }
            for &(a, l) in &p.allocs {
                self.mem.free(a, l);
            }
            // Reversed, so that the next allocation hands out the same indices in the same order.
            self.free.extend(p.descs.iter().rev().copied());
            out.push(Completion {
                head: id,
                len,
                status,
                data,
                tag: p.tag,
                tracked: true,
            });
        }
        Ok(out)
    }

    /// Reap until `n` entries have arrived or `timeout` passes. Waits on the interrupt line
    /// (with EVENT_IDX, after asking for an interrupt on the next entry unless
    /// [`SimQueue::set_auto_used_event`] turned that off), and polls the used ring every few
    /// milliseconds in case interrupts are suppressed.
    pub fn wait_used(&mut self, n: usize, timeout: Duration) -> Result<Vec<Completion>, SimError> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(n);
        loop {
            out.extend(self.reap()?);
            if out.len() >= n {
                return Ok(out);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(SimError::Timeout("used entries"));
            }
            if self.event_idx && self.auto_used_event {
                self.set_used_event(self.last_used)?;
                // The device may have published past `last_used` before it could see the
                // new used_event: look again before sleeping (virtqueue_enable_cb's recheck).
                fence(Ordering::SeqCst);
                if self.used_idx()? != self.last_used {
                    continue;
                }
            }
            self.irq
                .wait((deadline - now).min(Duration::from_millis(2)));
        }
    }

    /// Submit one chain and wait for its completion (which must be the only one).
    pub fn run(&mut self, chain: Chain, timeout: Duration) -> Result<Completion, SimError> {
        self.submit(chain)?;
        let mut v = self.wait_used(1, timeout)?;
        if v.len() != 1 {
            return Err(SimError::Unexpected(format!(
                "{} used entries, wanted 1",
                v.len()
            )));
        }
        Ok(v.remove(0))
    }
}

/// Flags and next of descriptor `i` of `n` in a chain whose position `j` has index `idx(j)`.
fn link(d: &Desc, i: usize, n: usize, idx: impl Fn(usize) -> u16) -> (u16, u16) {
    match d.next {
        Some(next) => (d.flags, next),
        None if i + 1 < n => (d.flags | DESC_F_NEXT, idx(i + 1)),
        None => (d.flags, 0),
    }
}
