//! Executing a parsed request: the SQEs it queues and how their completions decide its
//! outcome ([`ExecError`] or success).

use std::io;
use std::time::{Duration, Instant};

use super::error::{Chained, ExecError};
use super::uring::{OpToken, Rejected, IOV_MAX};
use super::{QueueEdge, Worker};
use crate::blk::{DwzSegment, RequestKind};

pub(crate) use super::uring::Op;

/// A queue logs at most one backing-store error per interval (a failing disk would
/// otherwise log every request); the counters see them all.
pub(super) const BACKING_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// How submitting a request went, when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Submitted {
    /// SQEs are in flight; the last CQE finishes the request.
    Queued,
    /// Nothing to wait for (an empty transfer, GET_ID): finish it now.
    Done,
}

/// The first SQE(s) of one DISCARD / WRITE_ZEROES range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dwz {
    /// fallocate(PUNCH_HOLE) for DISCARD.
    Discard,
    /// fallocate(PUNCH_HOLE) for WRITE_ZEROES with unmap.
    Punch,
    /// fallocate(ZERO_RANGE).
    Zero,
    /// A linked punch + allocate pair.
    Pair,
}

impl<E: QueueEdge> Worker<E> {
    /// Queue the SQEs of the parsed request in `self.req` for slot `head`.
    pub(super) fn submit_request(&mut self, head: u16) -> Result<Submitted, ExecError> {
        match self.req.kind {
            RequestKind::Read => self.submit_rw(head, false),
            RequestKind::Write => self.submit_rw(head, true),
            RequestKind::Flush => {
                let r = self.uring.push_fsync(OpToken::new(head, Op::Flush, 0));
                self.queued(head, r).map(|()| Submitted::Queued)
            }
            RequestKind::GetId => {
                let serial = self.device.serial;
                let mut done = 0usize;
                for d in &self.req.data {
                    let len = d.len as usize;
                    self.space
                        .write(&mut self.edge, d.addr, &serial[done..done + len])
                        .map_err(ExecError::IdWrite)?;
                    done += len;
                }
                Ok(Submitted::Done)
            }
            RequestKind::Discard | RequestKind::WriteZeroes => self.submit_dwz(head),
        }
    }

    fn submit_rw(&mut self, head: u16, write: bool) -> Result<Submitted, ExecError> {
        if self.req.data_len == 0 {
            return Ok(Submitted::Done);
        }
        let iov = self.uring.iovecs(head).ok_or(ExecError::Busy)?;
        for d in &self.req.data {
            // A device-readable buffer (OUT) is read by us; IN buffers are written.
            self.space
                .translate(&mut self.edge, d.addr, u64::from(d.len), !write, iov)
                .map_err(ExecError::Translate)?;
        }
        if iov.len() > IOV_MAX {
            return Err(ExecError::TooManyIovecs(iov.len()));
        }
        self.slots[usize::from(head)].expect = self.req.data_len;
        let token = OpToken::new(head, Op::Rw, 0);
        // SAFETY: the iovecs point into regions held by `self.space`, which is never cleared
        // and outlives every CQE: `Worker::drop` shuts the ring down first and leaks the
        // space if the ring cannot be drained.
        let r = unsafe { self.uring.push_rw(token, write, self.req.offset) };
        self.queued(head, r).map(|()| Submitted::Queued)
    }

    fn submit_dwz(&mut self, head: u16) -> Result<Submitted, ExecError> {
        let discard = self.req.kind == RequestKind::Discard;
        let dwz = std::mem::take(&mut self.req.dwz);
        let mut result = Ok(Submitted::Queued);
        for (i, s) in dwz.iter().enumerate() {
            let first = match (discard, s.unmap, self.zero_range_ok) {
                (true, _, _) => Dwz::Discard,
                (false, true, _) => Dwz::Punch,
                (false, false, true) => Dwz::Zero,
                (false, false, false) => Dwz::Pair,
            };
            if let Err(e) = self.queue_dwz(head, i, *s, first) {
                result = Err(e);
                break;
            }
        }
        self.slots[usize::from(head)].dwz.extend_from_slice(&dwz);
        self.req.dwz = dwz;
        result
    }

    fn queue_dwz(&mut self, head: u16, i: usize, s: DwzSegment, how: Dwz) -> Result<(), ExecError> {
        // At most MAX_DWZ_SEGMENTS (16) ranges: the index fits the token's 16 bits.
        let seg = i as u16;
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        let punch = libc::FALLOC_FL_PUNCH_HOLE | keep;
        let (op, mode) = match how {
            Dwz::Discard => (Op::Discard, punch),
            Dwz::Punch => (Op::WzPunch, punch),
            Dwz::Zero => (Op::WzZero, libc::FALLOC_FL_ZERO_RANGE | keep),
            Dwz::Pair => {
                let r = self.uring.push_fallocate_pair(
                    (OpToken::new(head, Op::WzPairPunch, seg), punch),
                    (OpToken::new(head, Op::WzPairAlloc, seg), keep),
                    s.offset,
                    s.len,
                );
                return self.queued(head, r);
            }
        };
        let r = self
            .uring
            .push_fallocate(OpToken::new(head, op, seg), s.offset, s.len, mode);
        self.queued(head, r)
    }

    /// A push that failed fails the request: now if nothing of it is in flight, else when
    /// its last CQE lands.
    fn queued(&mut self, head: u16, r: Result<(), Rejected>) -> Result<(), ExecError> {
        let Err(Rejected { token, source }) = r else {
            return Ok(());
        };
        let op = token.op().unwrap_or(Op::Rw);
        log::warn!("queue {}: cannot queue I/O: {source}", self.index);
        let e = ExecError::Queue { op, source };
        if self.uring.pending(head) > 0 {
            self.fail(head, e);
            Ok(())
        } else {
            Err(e)
        }
    }

    /// Record the first error of the request in slot `head`. A backing-store failure is
    /// counted once per request and logged at most once per [`BACKING_LOG_INTERVAL`] per
    /// queue, with the number of those not logged in between.
    pub(super) fn fail(&mut self, head: u16, e: ExecError) {
        log::debug!("queue {}: head {head}: {}", self.index, Chained(&e));
        if self.slots[usize::from(head)].error.is_some() {
            return;
        }
        if let Some(f) = e.backing_failure() {
            self.stats.backing.count(f);
            if let Some(skipped) = self.backing_log.allow(Instant::now()) {
                let more = match skipped {
                    0 => String::new(),
                    n => format!(" ({n} more since the last report)"),
                };
                log::warn!(
                    "queue {}: backing store error: {}{more}",
                    self.index,
                    Chained(&e)
                );
            }
        }
        self.slots[usize::from(head)].error = Some(e);
    }

    /// At exit: say how many backing-store errors the rate limit kept out of the log.
    pub(super) fn report_suppressed_backing_errors(&mut self) {
        let n = self.backing_log.take_suppressed();
        if n > 0 {
            log::warn!(
                "queue {}: {n} more backing store errors since the last report",
                self.index
            );
        }
    }

    /// One request CQE: record its outcome; the last one of the request finishes it.
    pub(super) fn complete_op(&mut self, token: OpToken, res: i32) {
        let head = token.slot();
        let Some(op) = token.op() else {
            log::warn!(
                "queue {}: completion with unknown token {:#x}",
                self.index,
                token.raw()
            );
            return;
        };
        if !self.slots.get(usize::from(head)).is_some_and(|s| s.busy) {
            log::warn!("queue {}: stray completion {:#x}", self.index, token.raw());
            return;
        }
        if let Err(e) = self.outcome(head, op, token.seg(), res) {
            self.fail(head, e);
        }
        if self.uring.pending(head) == 0 {
            self.finish(head);
        }
    }

    fn outcome(&mut self, head: u16, op: Op, seg: usize, res: i32) -> Result<(), ExecError> {
        let errno = || ExecError::Io {
            op,
            source: io::Error::from_raw_os_error(-res),
        };
        match op {
            Op::Rw if res < 0 => Err(errno()),
            Op::Rw => {
                let (got, want) = (res as u64, self.slots[usize::from(head)].expect);
                // A null backing's NOP completes with 0: that is its whole transfer.
                let full = if self.uring.is_null() {
                    got == 0
                } else {
                    got == want
                };
                if full {
                    Ok(())
                } else {
                    Err(ExecError::Short { got, want })
                }
            }
            Op::Discard if res == -libc::EOPNOTSUPP => Ok(()),
            Op::WzPunch | Op::WzZero if res == -libc::EOPNOTSUPP => self.fall_back(head, op, seg),
            Op::Flush
            | Op::Discard
            | Op::WzPunch
            | Op::WzZero
            | Op::WzPairPunch
            | Op::WzPairAlloc => {
                if res >= 0 {
                    Ok(())
                } else {
                    Err(errno())
                }
            }
        }
    }

    /// The backing refused a WRITE_ZEROES method: queue the next one for range `seg`.
    fn fall_back(&mut self, head: u16, op: Op, seg: usize) -> Result<(), ExecError> {
        let next = if op == Op::WzPunch {
            Dwz::Zero
        } else {
            self.zero_range_ok = false;
            Dwz::Pair
        };
        match self.slots[usize::from(head)].dwz.get(seg).copied() {
            Some(s) => self.queue_dwz(head, seg, s, next),
            None => Err(ExecError::Io {
                op,
                source: io::Error::from_raw_os_error(libc::EOPNOTSUPP),
            }),
        }
    }
}
