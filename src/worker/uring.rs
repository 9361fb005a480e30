//! The worker's io_uring and every worker-owned buffer its SQEs point into.
//!
//! Ownership contract (what makes "the kernel writes into freed memory" impossible here):
//!
//! - The memory an SQE may reference that the worker owns lives in [`Uring`]: the two eventfd
//!   read buffers and one iovec array per slot. A buffer is *referenced* from the push of its
//!   SQE until [`Uring::reap`] hands back that SQE's CQE; while referenced it cannot be reached
//!   mutably ([`Uring::iovecs`] returns `None`) and is never freed.
//! - Driver memory (the data buffers the iovecs point at) belongs to the worker's IOVA space:
//!   [`Uring::push_rw`] is `unsafe` and its caller keeps those pages mapped until the CQE.
//! - A push never loses an operation: on failure it comes back in [`Rejected`] and nothing is
//!   referenced.
//! - [`Uring::shutdown`] (also run by `Drop`) cancels everything still in flight
//!   (`IORING_ASYNC_CANCEL_ANY`, 5.19+; on older kernels the eventfd reads by token, file I/O
//!   then completes on its own) and waits for every CQE. If `io_uring_enter` fails while it
//!   waits, the owned buffers are leaked instead of freed.
//!
//! `user_data` keyspace: a request token ([`OpToken`]) packs the slot (bits 0..16, the chain's
//! head index), the operation ([`Op`], bits 16..24) and the DISCARD / WRITE_ZEROES range
//! (bits 24..40). Reserved tokens ([`Reserved`]) have bit 63 set; the const assertions below
//! prove that no request token can reach it. [`classify`] is the one decoder.

use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::RawFd;

use io_uring::types::CancelBuilder;
use io_uring::{opcode, squeue, types, IoUring, Probe};
use log::{debug, warn};

use crate::memory::umem::Umem;

/// Set in every reserved token and in no request token.
const RESERVED_BIT: u64 = 1 << 63;
const OP_SHIFT: u32 = 16;
const SEG_SHIFT: u32 = 24;
/// Every bit a request token can occupy: slot (16), op (8), range (16).
const REQUEST_MASK: u64 = (1 << (SEG_SHIFT + 16)) - 1;
const _: () = assert!(REQUEST_MASK & RESERVED_BIT == 0);
// `Op` is `repr(u8)`: with slot and range at their maxima a token stays inside the mask.
const _: () = assert!(OpToken::new(u16::MAX, Op::LAST, u16::MAX).0 & !REQUEST_MASK == 0);
const _: () = assert!(Reserved::Kick as u64 & RESERVED_BIT != 0);
const _: () = assert!(Reserved::Stop as u64 & RESERVED_BIT != 0);
const _: () = assert!(Reserved::Cancel as u64 & RESERVED_BIT != 0);
const _: () = assert!(Reserved::Stats as u64 & RESERVED_BIT != 0);

/// `IOV_MAX`: the most iovecs one readv/writev takes.
pub(crate) const IOV_MAX: usize = 1024;

/// The operation a request completion belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Op {
    /// read/readv/write/writev.
    Rw = 0,
    /// fsync(DATASYNC).
    Flush = 1,
    /// DISCARD: fallocate(PUNCH_HOLE|KEEP_SIZE); EOPNOTSUPP is not an error (a hint).
    Discard = 2,
    /// WRITE_ZEROES with unmap: PUNCH_HOLE; on EOPNOTSUPP fall back to ZeroRange.
    WzPunch = 3,
    /// WRITE_ZEROES: ZERO_RANGE; on EOPNOTSUPP fall back to a punch + allocate pair.
    WzZero = 4,
    /// The punch half of the fallback pair (linked to the next).
    WzPairPunch = 5,
    /// The allocate half of the fallback pair.
    WzPairAlloc = 6,
}

impl Op {
    const LAST: Op = Op::WzPairAlloc;

    fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            0 => Op::Rw,
            1 => Op::Flush,
            2 => Op::Discard,
            3 => Op::WzPunch,
            4 => Op::WzZero,
            5 => Op::WzPairPunch,
            6 => Op::WzPairAlloc,
            _ => return None,
        })
    }
}

/// The `user_data` of a request's SQE. Built only from a slot, an [`Op`] and a range index,
/// so bit 63 is never set (see the const assertions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OpToken(u64);

impl OpToken {
    pub(crate) const fn new(slot: u16, op: Op, seg: u16) -> Self {
        OpToken(slot as u64 | (op as u64) << OP_SHIFT | (seg as u64) << SEG_SHIFT)
    }

    pub(crate) fn slot(self) -> u16 {
        self.0 as u16
    }

    /// `None` only for a token this module did not build (a bug, never driver input).
    pub(crate) fn op(self) -> Option<Op> {
        Op::from_u8((self.0 >> OP_SHIFT) as u8)
    }

    pub(crate) fn seg(self) -> usize {
        usize::from((self.0 >> SEG_SHIFT) as u16)
    }

    pub(crate) fn raw(self) -> u64 {
        self.0
    }
}

/// Tokens of the worker's own SQEs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub(crate) enum Reserved {
    /// The kick eventfd read.
    Kick = RESERVED_BIT,
    /// The stop eventfd read.
    Stop = RESERVED_BIT | 1,
    /// Cancellations issued by [`Uring::shutdown`].
    Cancel = RESERVED_BIT | 2,
    /// The live-stats eventfd read.
    Stats = RESERVED_BIT | 3,
}

/// The eventfds read through the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// The driver's kick.
    Kick = 0,
    /// The control thread's stop request.
    Stop = 1,
    /// A live view asks for a copy of the counters.
    Stats = 2,
}

/// Every [`Wake`].
const WAKES: [Wake; 3] = [Wake::Kick, Wake::Stop, Wake::Stats];

impl Wake {
    fn token(self) -> Reserved {
        match self {
            Wake::Kick => Reserved::Kick,
            Wake::Stop => Reserved::Stop,
            Wake::Stats => Reserved::Stats,
        }
    }
}

/// What a `user_data` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Token {
    Op(OpToken),
    Reserved(Reserved),
    /// Bit 63 set but no reserved value: never pushed by us.
    Unknown(u64),
}

/// The one decoder of `user_data`.
pub(crate) fn classify(ud: u64) -> Token {
    if ud & RESERVED_BIT == 0 {
        return Token::Op(OpToken(ud & REQUEST_MASK));
    }
    match ud {
        x if x == Reserved::Kick as u64 => Token::Reserved(Reserved::Kick),
        x if x == Reserved::Stop as u64 => Token::Reserved(Reserved::Stop),
        x if x == Reserved::Cancel as u64 => Token::Reserved(Reserved::Cancel),
        x if x == Reserved::Stats as u64 => Token::Reserved(Reserved::Stats),
        other => Token::Unknown(other),
    }
}

/// A completion handed to the worker (cancellations stay inside [`Uring`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cqe {
    Op(OpToken, i32),
    Wake(Wake, i32),
}

/// A push that did not happen: the operation comes back, nothing is referenced.
#[derive(Debug)]
pub(crate) struct Rejected {
    pub(crate) token: OpToken,
    pub(crate) source: io::Error,
}

/// What SQEs in flight reference right now (for tests and the exit log).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Referenced {
    /// SQEs pushed whose CQE is not reaped (requests, eventfd reads, cancellations).
    pub(crate) sqes: usize,
    /// Eventfd read buffers armed.
    pub(crate) event_bufs: usize,
    /// Slots with at least one SQE in flight (their iovec arrays).
    pub(crate) slots: usize,
}

/// Memory SQEs point into. Freed only once nothing is in flight.
struct Buffers {
    /// Eventfd reads land here, indexed by [`Wake`]. Boxed: the address must not move.
    events: Box<[u64; 3]>,
    /// One iovec array per slot.
    iovs: Vec<Vec<libc::iovec>>,
}

/// One worker's io_uring (see the module docs for the ownership contract).
pub(crate) struct Uring {
    ring: IoUring,
    bufs: ManuallyDrop<Buffers>,
    armed: [bool; 3],
    /// Per slot: SQEs pushed whose CQE is not reaped.
    pending: Vec<u32>,
    /// Every SQE pushed whose CQE is not reaped.
    in_flight: usize,
    /// Request SQEs among `in_flight`.
    ops: usize,
    cq_capacity: usize,
    /// The backing is null: every request SQE becomes a NOP with the same token.
    null: bool,
    /// `shutdown` failed once: the buffers are leaked and the ring is not waited on again.
    poisoned: bool,
    /// The zero-copy area, registered as fixed buffers (slot i = its i-th GiB). Declared after
    /// `ring`, so the mapping outlives the ring that references it.
    fixed: Option<Umem>,
    /// The kernel has READ_FIXED and WRITE_FIXED.
    fixed_ok: bool,
    /// Reads and writes queued on fixed buffers.
    fixed_ops: u64,
    /// Test hook: fail the wait after this many successful ones.
    #[cfg(test)]
    fail_wait_after: Option<usize>,
}

fn ring_for(size: u16) -> io::Result<(IoUring, usize)> {
    let sq = u32::from(size).clamp(32, 4096).next_power_of_two();
    let cq = (u32::from(size) * 2 + 64)
        .next_power_of_two()
        .clamp(64, 65536);
    let build = |defer: bool| {
        let mut b = IoUring::builder();
        b.setup_cqsize(cq);
        if defer {
            // TASKRUN_FLAG: the kernel flags deferred completions in the SQ ring, so that a
            // polling worker knows when an enter is needed to get them (`Uring::submit`).
            b.setup_single_issuer()
                .setup_defer_taskrun()
                .setup_taskrun_flag();
        }
        b.build(sq)
    };
    // DEFER_TASKRUN (6.1+) keeps completion work on this thread; older kernels refuse it.
    let ring = match build(true) {
        Ok(r) => r,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => build(false)?,
        Err(e) => return Err(e),
    };
    Ok((ring, cq as usize))
}

/// Every opcode a worker queues without a fallback, by name.
const REQUIRED_OPS: [(u8, &str); 8] = [
    (opcode::Nop::CODE, "NOP"),
    (opcode::Read::CODE, "READ"),
    (opcode::Write::CODE, "WRITE"),
    (opcode::Readv::CODE, "READV"),
    (opcode::Writev::CODE, "WRITEV"),
    (opcode::Fsync::CODE, "FSYNC"),
    (opcode::Fallocate::CODE, "FALLOCATE"),
    (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
];

/// Ask the kernel which opcodes it has: a missing required one is a clear error at start
/// (not an EINVAL per request later); returns whether the fixed-buffer forms exist.
fn probe(ring: &IoUring) -> io::Result<bool> {
    let mut p = Probe::new();
    ring.submitter().register_probe(&mut p).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("io_uring cannot tell its opcodes (IORING_REGISTER_PROBE: {e}; Linux 5.6+)"),
        )
    })?;
    let missing: Vec<&str> = REQUIRED_OPS
        .iter()
        .filter(|(op, _)| !p.is_supported(*op))
        .map(|(_, name)| *name)
        .collect();
    if !missing.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "this kernel's io_uring lacks IORING_OP_{}",
                missing.join(", IORING_OP_")
            ),
        ));
    }
    Ok(p.is_supported(opcode::ReadFixed::CODE) && p.is_supported(opcode::WriteFixed::CODE))
}

impl Uring {
    /// A ring for a queue of `size` slots, with `backing` registered as fixed file 0.
    pub(crate) fn new(size: u16, backing: RawFd, null: bool) -> io::Result<Self> {
        let (ring, cq_capacity) = ring_for(size)?;
        let fixed_ok = probe(&ring)?;
        ring.submitter().register_files(&[backing])?;
        let slots = usize::from(size);
        Ok(Uring {
            ring,
            bufs: ManuallyDrop::new(Buffers {
                events: Box::new([0; 3]),
                iovs: vec![Vec::new(); slots],
            }),
            armed: [false; 3],
            pending: vec![0; slots],
            in_flight: 0,
            ops: 0,
            cq_capacity,
            null,
            poisoned: false,
            fixed: None,
            fixed_ok,
            fixed_ops: 0,
            #[cfg(test)]
            fail_wait_after: None,
        })
    }

    /// Register `umem` as this ring's fixed buffers: from now on a one-segment read or write
    /// inside it is a `READ_FIXED` / `WRITE_FIXED`.
    pub(crate) fn register_fixed(&mut self, umem: Umem) -> io::Result<()> {
        if self.fixed.is_some() {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        if !self.fixed_ok {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this kernel's io_uring has no READ_FIXED / WRITE_FIXED",
            ));
        }
        let slots = umem.fixed_slots();
        // SAFETY: every iovec covers part of `umem`'s mapping, which `self.fixed` keeps alive
        // until after the ring is dropped (field order); the kernel pins the pages besides.
        unsafe { self.ring.submitter().register_buffers(&slots) }?;
        self.fixed = Some(umem);
        Ok(())
    }

    /// Reads and writes queued on fixed buffers so far.
    pub(crate) fn fixed_ops(&self) -> u64 {
        self.fixed_ops
    }

    /// The fixed-buffer slot that holds all of `iov`, if the zero-copy area is registered.
    fn fixed_slot(&self, iov: &libc::iovec) -> Option<u16> {
        self.fixed
            .as_ref()?
            .slot_of(iov.iov_base.cast(), iov.iov_len)
    }

    /// Completions the CQ holds; the worker keeps its worst case below this.
    pub(crate) fn cq_capacity(&self) -> usize {
        self.cq_capacity
    }

    /// Whether every request SQE is a NOP.
    pub(crate) fn is_null(&self) -> bool {
        self.null
    }

    /// Request SQEs in flight.
    pub(crate) fn ops_in_flight(&self) -> usize {
        self.ops
    }

    /// Request SQEs of `slot` in flight.
    pub(crate) fn pending(&self, slot: u16) -> u32 {
        self.pending.get(usize::from(slot)).copied().unwrap_or(0)
    }

    pub(crate) fn referenced(&self) -> Referenced {
        Referenced {
            sqes: self.in_flight,
            event_bufs: self.armed.iter().filter(|a| **a).count(),
            slots: self.pending.iter().filter(|p| **p > 0).count(),
        }
    }

    /// The iovec array of `slot`, emptied, unless an SQE in flight references it.
    pub(crate) fn iovecs(&mut self, slot: u16) -> Option<&mut Vec<libc::iovec>> {
        let idx = usize::from(slot);
        if self.pending.get(idx).is_none_or(|p| *p > 0) {
            return None;
        }
        let iov = &mut self.bufs.iovs[idx];
        iov.clear();
        Some(iov)
    }

    /// Push one SQE, submitting first if the submission queue is full.
    ///
    /// # Safety
    /// Every buffer `sqe` points to stays valid and unmoved until its CQE is reaped.
    unsafe fn push_entry(&mut self, sqe: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the caller guarantees the buffers `sqe` points to outlive its CQE.
            let pushed = unsafe { self.ring.submission().push(sqe) };
            if pushed.is_ok() {
                self.in_flight += 1;
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    fn push_request(&mut self, token: OpToken, sqe: squeue::Entry) -> Result<(), Rejected> {
        let sqe = if self.null {
            opcode::Nop::new().build()
        } else {
            sqe
        };
        let sqe = sqe.user_data(token.raw());
        // SAFETY: callers build `sqe` either without pointers (fsync, fallocate, NOP) or, in
        // `push_rw`, from the slot's iovec array (owned here, referenced until the CQE) and
        // driver memory covered by `push_rw`'s own contract.
        match unsafe { self.push_entry(&sqe) } {
            Ok(()) => {
                self.pending[usize::from(token.slot())] += 1;
                self.ops += 1;
                Ok(())
            }
            Err(source) => Err(Rejected { token, source }),
        }
    }

    /// Queue a read or write of the slot's iovec array (filled through [`Uring::iovecs`]) at
    /// byte `offset` of the backing.
    ///
    /// # Safety
    /// Every iovec of the slot points to memory that stays mapped until this token's CQE is
    /// reaped or the ring is shut down.
    pub(crate) unsafe fn push_rw(
        &mut self,
        token: OpToken,
        write: bool,
        offset: u64,
    ) -> Result<(), Rejected> {
        let fd = types::Fixed(0);
        let iov = &self.bufs.iovs[usize::from(token.slot())];
        let fixed = match iov.as_slice() {
            [one] => self.fixed_slot(one).map(|slot| (*one, slot)),
            _ => None,
        };
        if let Some((one, slot)) = fixed {
            let (ptr, len) = (one.iov_base.cast(), one.iov_len as u32);
            let sqe = if write {
                opcode::WriteFixed::new(fd, ptr, len, slot)
                    .offset(offset)
                    .build()
            } else {
                opcode::ReadFixed::new(fd, ptr, len, slot)
                    .offset(offset)
                    .build()
            };
            let r = self.push_request(token, sqe);
            if r.is_ok() && !self.null {
                self.fixed_ops += 1;
            }
            return r;
        }
        let sqe = match (write, iov.as_slice()) {
            (false, [one]) => opcode::Read::new(fd, one.iov_base.cast(), one.iov_len as u32)
                .offset(offset)
                .build(),
            (true, [one]) => opcode::Write::new(fd, one.iov_base.cast(), one.iov_len as u32)
                .offset(offset)
                .build(),
            (false, v) => opcode::Readv::new(fd, v.as_ptr(), v.len() as u32)
                .offset(offset)
                .build(),
            (true, v) => opcode::Writev::new(fd, v.as_ptr(), v.len() as u32)
                .offset(offset)
                .build(),
        };
        self.push_request(token, sqe)
    }

    /// Queue fsync(DATASYNC) of the backing.
    pub(crate) fn push_fsync(&mut self, token: OpToken) -> Result<(), Rejected> {
        let sqe = opcode::Fsync::new(types::Fixed(0))
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        self.push_request(token, sqe)
    }

    /// Queue fallocate(`mode`) of `[offset, offset+len)`.
    pub(crate) fn push_fallocate(
        &mut self,
        token: OpToken,
        offset: u64,
        len: u64,
        mode: i32,
    ) -> Result<(), Rejected> {
        self.push_request(token, fallocate(offset, len, mode))
    }

    /// Queue two fallocates of `[offset, offset+len)`, the second linked after the first
    /// (`IO_LINK`: it runs only once the first succeeded). Room for both is made first, so
    /// that the pair is never split by a submission (a link that ends a submission would
    /// let the second run on its own) and a refusal can only come before anything is queued:
    /// a linked SQE never dangles onto some later, unrelated one.
    pub(crate) fn push_fallocate_pair(
        &mut self,
        first: (OpToken, i32),
        second: (OpToken, i32),
        offset: u64,
        len: u64,
    ) -> Result<(), Rejected> {
        loop {
            let sq = self.ring.submission();
            if sq.capacity() - sq.len() >= 2 {
                break;
            }
            drop(sq);
            if let Err(source) = self.ring.submit() {
                return Err(Rejected {
                    token: first.0,
                    source,
                });
            }
        }
        let linked = fallocate(offset, len, first.1).flags(squeue::Flags::IO_LINK);
        self.push_request(first.0, linked)?;
        // Cannot fail: the room was made above and nothing was submitted in between.
        self.push_request(second.0, fallocate(offset, len, second.1))
    }

    /// Arm the read of eventfd `fd` into its buffer.
    pub(crate) fn arm(&mut self, w: Wake, fd: RawFd) -> io::Result<()> {
        let buf: *mut u64 = &mut self.bufs.events[w as usize];
        let sqe = opcode::Read::new(types::Fd(fd), buf.cast(), 8)
            .build()
            .user_data(w.token() as u64);
        // SAFETY: `buf` is in `self.bufs`, boxed (it does not move) and freed only after
        // every CQE is reaped (or leaked).
        unsafe { self.push_entry(&sqe) }?;
        self.armed[w as usize] = true;
        Ok(())
    }

    /// Submit what is queued and wait for at least one completion. An interrupted or
    /// CQ-busy wait is not an error: the caller reaps whatever is there.
    pub(crate) fn wait(&mut self) -> io::Result<()> {
        #[cfg(test)]
        if let Some(n) = self.fail_wait_after.as_mut() {
            if *n == 0 {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            *n -= 1;
        }
        self.enter(1)
    }

    /// Submit what is queued and wait for `want` completions (0: none). An interrupted or
    /// CQ-busy enter is not an error.
    fn enter(&mut self, want: usize) -> io::Result<()> {
        match self.ring.submit_and_wait(want) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Submit what is queued and collect deferred completions, without waiting; no system
    /// call when there is neither (a polling worker calls this in its loop).
    pub(crate) fn submit(&mut self) -> io::Result<()> {
        let idle = {
            let sq = self.ring.submission();
            sq.is_empty() && !sq.taskrun() && !sq.cq_overflow()
        };
        if idle {
            return Ok(());
        }
        self.enter(0)
    }

    /// Whether completions are waiting to be reaped.
    pub(crate) fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Move every completion into `out` (cleared first), releasing what its SQE referenced.
    pub(crate) fn reap(&mut self, out: &mut Vec<Cqe>) {
        out.clear();
        let mut cancel_unsupported = false;
        for c in self.ring.completion() {
            // Every CQE answers exactly one SQE pushed here (none is multishot).
            self.in_flight = self.in_flight.saturating_sub(1);
            let res = c.result();
            let cqe = match classify(c.user_data()) {
                Token::Op(t) => match self.pending.get_mut(usize::from(t.slot())) {
                    Some(p) if *p > 0 => {
                        *p -= 1;
                        self.ops -= 1;
                        Cqe::Op(t, res)
                    }
                    _ => {
                        warn!("stray completion {:#x}", t.raw());
                        continue;
                    }
                },
                Token::Reserved(Reserved::Cancel) => {
                    cancel_unsupported |= res == -libc::EINVAL;
                    continue;
                }
                Token::Reserved(Reserved::Kick) => {
                    self.armed[Wake::Kick as usize] = false;
                    Cqe::Wake(Wake::Kick, res)
                }
                Token::Reserved(Reserved::Stop) => {
                    self.armed[Wake::Stop as usize] = false;
                    Cqe::Wake(Wake::Stop, res)
                }
                Token::Reserved(Reserved::Stats) => {
                    self.armed[Wake::Stats as usize] = false;
                    Cqe::Wake(Wake::Stats, res)
                }
                Token::Unknown(ud) => {
                    warn!("completion with unknown token {ud:#x}");
                    continue;
                }
            };
            out.push(cqe);
        }
        if cancel_unsupported {
            // Before 5.19 there is no CANCEL_ANY: cancel the eventfd reads by token (file
            // I/O completes on its own).
            self.cancel_wake_reads();
        }
    }

    fn push_cancel(&mut self, sqe: squeue::Entry) {
        let sqe = sqe.user_data(Reserved::Cancel as u64);
        // SAFETY: a cancellation points to no memory.
        if let Err(e) = unsafe { self.push_entry(&sqe) } {
            warn!("cannot queue a cancellation: {e}");
        }
    }

    fn cancel_wake_reads(&mut self) {
        for w in WAKES {
            if self.armed[w as usize] {
                self.push_cancel(opcode::AsyncCancel::new(w.token() as u64).build());
            }
        }
    }

    /// Cancel everything in flight and wait for every CQE, dropping request completions.
    /// Idempotent; after an error it fails at once (the buffers are then leaked by `Drop`).
    pub(crate) fn shutdown(&mut self) -> io::Result<()> {
        if self.poisoned {
            return Err(io::Error::other("io_uring could not be drained"));
        }
        if self.in_flight == 0 {
            return Ok(());
        }
        self.push_cancel(opcode::AsyncCancel2::new(CancelBuilder::any()).build());
        let mut cqes = Vec::new();
        while self.in_flight > 0 {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                self.poisoned = true;
                return Err(e);
            }
            self.reap(&mut cqes);
            for c in &cqes {
                if let Cqe::Op(t, res) = c {
                    debug!("completion {:#x} ({res}) dropped at shutdown", t.raw());
                }
            }
        }
        Ok(())
    }

    /// Test hook: the `n+1`-th [`Uring::wait`] fails with EIO (and every one after it).
    #[cfg(test)]
    pub(crate) fn fail_wait_after(&mut self, n: usize) {
        self.fail_wait_after = Some(n);
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        match self.shutdown() {
            // SAFETY: nothing in flight references `bufs` any more, and it is not used again.
            Ok(()) => unsafe { ManuallyDrop::drop(&mut self.bufs) },
            Err(e) => warn!(
                "io_uring cannot be drained ({e}): leaking its buffers ({:?} still referenced)",
                self.referenced()
            ),
        }
    }
}

/// An fallocate(`mode`) SQE of `[offset, offset+len)` on the registered backing.
fn fallocate(offset: u64, len: u64, mode: i32) -> squeue::Entry {
    opcode::Fallocate::new(types::Fixed(0), len)
        .offset(offset)
        .mode(mode)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, OwnedFd};

    fn pipe() -> (OwnedFd, OwnedFd) {
        nix::unistd::pipe().unwrap()
    }

    #[test]
    fn a_linked_pair_is_never_split_by_a_full_submission_queue() {
        if !crate::sim::io_uring_available() {
            return;
        }
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        let mut u = Uring::new(2, f.as_raw_fd(), false).unwrap();
        // Leave exactly one free SQE.
        let cap = u.ring.submission().capacity();
        for i in 0..cap - 1 {
            u.push_fsync(OpToken::new(0, Op::Flush, i as u16)).unwrap();
        }
        assert_eq!(u.ring.submission().len(), cap - 1);
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        u.push_fallocate_pair(
            (
                OpToken::new(1, Op::WzPairPunch, 0),
                libc::FALLOC_FL_PUNCH_HOLE | keep,
            ),
            (OpToken::new(1, Op::WzPairAlloc, 0), keep),
            0,
            4096,
        )
        .unwrap();
        // The fsyncs went in a submission of their own; the pair waits, together, for the next.
        assert_eq!(u.ring.submission().len(), 2);
        assert_eq!(u.pending(1), 2);
        u.shutdown().unwrap();
    }

    #[test]
    fn request_tokens_round_trip_and_never_look_reserved() {
        let t = OpToken::new(0xffff, Op::WzPairAlloc, 15);
        assert_eq!(
            (t.slot(), t.op(), t.seg()),
            (0xffff, Some(Op::WzPairAlloc), 15)
        );
        assert_eq!(classify(t.raw()), Token::Op(t));
        assert_eq!(
            classify(Reserved::Stop as u64),
            Token::Reserved(Reserved::Stop)
        );
        assert_eq!(classify(RESERVED_BIT | 9), Token::Unknown(RESERVED_BIT | 9));
    }

    #[test]
    fn a_failed_wait_releases_nothing_and_shutdown_waits_for_every_cqe() {
        if !crate::sim::io_uring_available() {
            return;
        }
        // A read from an empty pipe into a slot's iovec, and an eventfd read: neither can
        // complete on its own.
        let (rx, tx) = pipe();
        let efd = nix::sys::eventfd::EventFd::new().unwrap();
        let mut u = Uring::new(4, rx.as_raw_fd(), false).unwrap();
        let mut data = vec![0u8; 8];
        u.iovecs(1).unwrap().push(libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        });
        // SAFETY: `data` outlives the ring's shutdown below.
        unsafe { u.push_rw(OpToken::new(1, Op::Rw, 0), false, 0) }.unwrap();
        u.arm(Wake::Kick, efd.as_raw_fd()).unwrap();
        let live = Referenced {
            sqes: 2,
            event_bufs: 1,
            slots: 1,
        };
        assert_eq!(u.referenced(), live);
        assert!(
            u.iovecs(1).is_none(),
            "a referenced iovec array is out of reach"
        );
        u.fail_wait_after(0);
        assert_eq!(u.wait().unwrap_err().raw_os_error(), Some(libc::EIO));
        let mut cqes = Vec::new();
        u.reap(&mut cqes);
        assert!(cqes.is_empty());
        assert_eq!(u.referenced(), live, "an error path released a buffer");
        u.shutdown().unwrap();
        assert_eq!(u.referenced(), Referenced::default());
        assert!(u.iovecs(1).is_some());
        // The cancelled read no longer owns `data`: bytes written now stay in the pipe.
        nix::unistd::write(&tx, b"12345678").unwrap();
        let mut back = [0u8; 8];
        assert_eq!(nix::unistd::read(&rx, &mut back).unwrap(), 8);
        assert_eq!((&back, data.as_slice()), (b"12345678", &[0u8; 8][..]));
        drop(u);
    }

    #[test]
    fn drop_drains_what_is_in_flight() {
        if !crate::sim::io_uring_available() {
            return;
        }
        let (rx, tx) = pipe();
        let mut u = Uring::new(2, rx.as_raw_fd(), false).unwrap();
        u.arm(Wake::Stop, rx.as_raw_fd()).unwrap();
        u.ring.submit().unwrap();
        drop(u);
        // Had the read outlived the ring, it could take these bytes.
        nix::unistd::write(&tx, b"x").unwrap();
        let mut back = [0u8; 1];
        assert_eq!(nix::unistd::read(&rx, &mut back).unwrap(), 1);
    }
}
