//! The worker's errors: why a worker stopped ([`WorkerError`], with [`BrokenReason`] for a
//! corrupt ring) and why one request failed ([`ExecError`], mapped exhaustively to a status
//! byte).

use std::error::Error as StdError;
use std::fmt;
use std::io;

use thiserror::Error;

use super::chain::ChainError;
use super::uring::Op;
use crate::blk::{RequestError, VIRTIO_BLK_S_IOERR};
use crate::memory::MemoryError;
use crate::metrics::{BackingFailure, QueueStats};

/// Why a worker stopped other than on request.
#[derive(Debug, Error)]
pub enum WorkerError {
    /// The driver corrupted the ring; the device must be marked broken.
    #[error("queue {queue}: ring is corrupt: {reason}")]
    Broken {
        /// Queue index.
        queue: u16,
        /// What was wrong.
        reason: BrokenReason,
        /// Counters up to the failure.
        stats: Box<QueueStats>,
    },
    /// Setting up the ring or the thread failed.
    #[error("queue {queue}: setup failed")]
    Setup {
        /// Queue index.
        queue: u16,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// io_uring itself failed.
    #[error("queue {queue}: io_uring failed")]
    Uring {
        /// Queue index.
        queue: u16,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Zero copy was required (`--zero-copy on`) and the kernel refused it.
    #[error("queue {queue}: zero copy is not possible here: {reason}")]
    ZeroCopy {
        /// Queue index.
        queue: u16,
        /// What refused it.
        reason: String,
    },
    /// The worker thread panicked (a bug, never driver input).
    #[error("queue {0}: worker panicked")]
    Panicked(u16),
}

/// A ring area, for [`BrokenReason`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingArea {
    /// The descriptor table.
    DescTable,
    /// The avail ring.
    AvailRing,
    /// The used ring.
    UsedRing,
}

impl fmt::Display for RingArea {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RingArea::DescTable => "descriptor table",
            RingArea::AvailRing => "avail ring",
            RingArea::UsedRing => "used ring",
        })
    }
}

/// How the driver corrupted a ring (the kind is part of the message; lower-layer errors are
/// sources).
#[derive(Debug, Error)]
pub enum BrokenReason {
    /// The negotiated queue size is not usable.
    #[error("bad queue size {size}")]
    QueueSize {
        /// The size.
        size: u16,
        /// What virtio-queue said.
        #[source]
        source: virtio_queue::Error,
    },
    /// A ring address is misaligned or otherwise refused.
    #[error("bad {area} address")]
    Address {
        /// Which area.
        area: RingArea,
        /// What virtio-queue said.
        #[source]
        source: virtio_queue::Error,
    },
    /// A ring area is not mapped (with the access it needs).
    #[error("ring area not mapped: {area}")]
    AreaUnmapped {
        /// Which area.
        area: RingArea,
        /// The mapping failure.
        #[source]
        source: MemoryError,
    },
    /// virtio-queue refuses the ring areas as a whole.
    #[error("ring areas are invalid")]
    InvalidAreas,
    /// A descriptor chain is structurally malformed.
    #[error("head {head}: {kind}")]
    Chain {
        /// The chain's head index.
        head: u16,
        /// The malformation (one that corrupts the ring).
        kind: ChainError,
    },
    /// A head the device still owns was posted again.
    #[error("head {0} posted again while in flight")]
    DuplicateHead(u16),
    /// The avail ring cannot be read or its index jumped.
    #[error("avail ring is unusable")]
    AvailRing(#[source] virtio_queue::Error),
    /// A used entry cannot be written.
    #[error("cannot publish used entry")]
    UsedWrite(#[source] virtio_queue::Error),
    /// The used ring flags / avail_event cannot be written.
    #[error("cannot write ring flags")]
    RingFlags(#[source] virtio_queue::Error),
    /// `used_event` cannot be read.
    #[error("cannot read used_event")]
    UsedEvent(#[source] virtio_queue::Error),
}

/// Why one request failed. [`ExecError::status`] is the byte the driver sees.
#[derive(Debug, Error)]
pub(crate) enum ExecError {
    /// Parsing refused the request.
    #[error("malformed request")]
    Request(#[source] RequestError),
    /// A data buffer cannot be translated for the needed access.
    #[error("data buffer is not usable")]
    Translate(#[source] MemoryError),
    /// More host pieces than one readv/writev takes.
    #[error("{0} iovecs exceed IOV_MAX")]
    TooManyIovecs(usize),
    /// The slot's iovec array is still referenced by an SQE (a bug, never driver input).
    #[error("slot still has I/O in flight")]
    Busy,
    /// The GET_ID buffer cannot be written.
    #[error("cannot write the GET_ID buffer")]
    IdWrite(#[source] MemoryError),
    /// io_uring took no SQE for this operation.
    #[error("cannot queue {op:?}")]
    Queue {
        /// The operation.
        op: Op,
        /// Why the push failed.
        #[source]
        source: io::Error,
    },
    /// The operation's CQE reported an error.
    #[error("{op:?} failed")]
    Io {
        /// The operation.
        op: Op,
        /// The CQE's errno.
        #[source]
        source: io::Error,
    },
    /// A read or write moved fewer bytes than asked.
    #[error("transferred {got} of {want} bytes")]
    Short {
        /// Bytes moved.
        got: u64,
        /// Bytes asked for.
        want: u64,
    },
}

impl From<RequestError> for ExecError {
    fn from(e: RequestError) -> Self {
        ExecError::Request(e)
    }
}

impl ExecError {
    /// The status byte reported to the driver. Exhaustive on purpose: a new error must choose.
    pub(crate) fn status(&self) -> u8 {
        match self {
            ExecError::Request(e) => e.status(),
            ExecError::Translate(_)
            | ExecError::TooManyIovecs(_)
            | ExecError::Busy
            | ExecError::IdWrite(_)
            | ExecError::Queue { .. }
            | ExecError::Io { .. }
            | ExecError::Short { .. } => VIRTIO_BLK_S_IOERR,
        }
    }
}

impl ExecError {
    /// Whether the backing store failed the request, and how (for counters and the
    /// rate-limited log). `None`: the driver's request or our own queueing failed, not the
    /// store. Exhaustive on purpose, like [`ExecError::status`].
    pub(crate) fn backing_failure(&self) -> Option<BackingFailure> {
        match self {
            ExecError::Io { source, .. } => Some(match source.raw_os_error() {
                Some(libc::EIO) => BackingFailure::Eio,
                Some(libc::ENOSPC | libc::EDQUOT) => BackingFailure::NoSpace,
                _ => BackingFailure::Other,
            }),
            ExecError::Short { .. } => Some(BackingFailure::Short),
            ExecError::Request(_)
            | ExecError::Translate(_)
            | ExecError::TooManyIovecs(_)
            | ExecError::Busy
            | ExecError::IdWrite(_)
            | ExecError::Queue { .. } => None,
        }
    }
}

/// Displays an error and each of its sources, `": "`-separated (for logs).
pub(crate) struct Chained<'a>(pub(crate) &'a dyn StdError);

impl fmt::Display for Chained<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(e) = next {
            write!(f, ": {e}")?;
            next = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP};

    #[test]
    fn statuses_and_errno_survive() {
        let e = ExecError::Io {
            op: Op::Flush,
            source: io::Error::from_raw_os_error(libc::ENOSPC),
        };
        assert_eq!(e.status(), VIRTIO_BLK_S_IOERR);
        let text = Chained(&e).to_string();
        assert!(text.starts_with("Flush failed: "), "{text}");
        assert!(
            text.contains(&io::Error::from_raw_os_error(libc::ENOSPC).to_string()),
            "{text}"
        );
        assert_eq!(
            ExecError::from(RequestError::UnsupportedType(7)).status(),
            VIRTIO_BLK_S_UNSUPP
        );
    }

    #[test]
    fn backing_failures_by_errno_and_only_from_the_store() {
        let io = |errno| ExecError::Io {
            op: Op::Rw,
            source: io::Error::from_raw_os_error(errno),
        };
        assert_eq!(io(libc::EIO).backing_failure(), Some(BackingFailure::Eio));
        assert_eq!(
            io(libc::ENOSPC).backing_failure(),
            Some(BackingFailure::NoSpace)
        );
        assert_eq!(
            io(libc::EDQUOT).backing_failure(),
            Some(BackingFailure::NoSpace)
        );
        assert_eq!(
            io(libc::EBADF).backing_failure(),
            Some(BackingFailure::Other)
        );
        let short = ExecError::Short { got: 0, want: 4096 };
        assert_eq!(short.backing_failure(), Some(BackingFailure::Short));
        assert_eq!(short.status(), VIRTIO_BLK_S_IOERR);
        // Not the store's doing: a refused request, our own queueing.
        assert_eq!(
            ExecError::from(RequestError::UnsupportedType(7)).backing_failure(),
            None
        );
        let queue = ExecError::Queue {
            op: Op::Rw,
            source: io::Error::from_raw_os_error(libc::EBUSY),
        };
        assert_eq!(queue.backing_failure(), None);
        assert_eq!(ExecError::TooManyIovecs(2000).backing_failure(), None);
    }
}
