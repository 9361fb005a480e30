//! An in-process virtio driver for testing the production queue worker.
//!
//! The worker under test is the real one ([`crate::worker::spawn`]); only its edges are
//! simulated, through [`crate::worker::QueueEdge`]:
//!
//! - [`memory::SimMemory`]: memfd-backed regions at chosen IOVAs (gaps, read-only and
//!   no-access regions allowed), mapped read-write for the driver and with the region's
//!   protection for the worker, which gets the very same mapping on each miss;
//! - [`queue::SimQueue`]: a split-ring driver (descriptor table, avail ring with `used_event`,
//!   used ring with `avail_event`) for any queue size, posting direct or indirect chains of
//!   any shape, with raw access to every ring field for hostile cases, kicking through the
//!   eventfd the worker reads and reaping used entries with a deadline;
//! - [`queue::SimIrq`]: the interrupt line the worker's `notify` raises (a count plus an
//!   eventfd), which also signals when a worker has ended;
//! - [`blk`]: virtio-blk requests by content and layout;
//! - [`device::SimDevice`]: a backing file in a private temporary directory, the memory, the
//!   queues and one worker per queue, with start, stop, restart and backing-file inspection.
//!
//! Nothing here sleeps to synchronise: waits are on eventfds, with deadlines.
//!
//! ```
//! use std::time::Duration;
//! use vduse_blkd::sim::{blk::{BlkRequest, S_OK}, device::{SimDevice, SimDeviceConfig}};
//!
//! # if !vduse_blkd::sim::io_uring_available() { return; }
//! let mut dev = SimDevice::new(SimDeviceConfig::new(1 << 20)).unwrap();
//! let w = BlkRequest::write(8, &[7u8; 512]).chain(&dev.mem).unwrap();
//! let c = dev.queues[0].run(w, Duration::from_secs(5)).unwrap();
//! assert_eq!(c.status, Some(S_OK));
//! let r = BlkRequest::read(8, 512).chain(&dev.mem).unwrap();
//! let c = dev.queues[0].run(r, Duration::from_secs(5)).unwrap();
//! assert_eq!(c.data, vec![7u8; 512]);
//! assert!(dev.shutdown().iter().all(|r| r.is_ok()));
//! ```

pub mod backed;
pub mod blk;
pub mod device;
pub mod memory;
pub mod queue;
pub mod rng;
pub mod vhost;

use std::io;

use thiserror::Error;

pub use blk::{BlkRequest, ChainBuilder, DwzSeg};
pub use device::{SimDevice, SimDeviceConfig};
pub use memory::SimMemory;
pub use queue::{
    Chain, Completion, Desc, Indirect, Posted, QueueLayout, SimEdge, SimIrq, SimQueue,
};
pub use rng::SimRng;

/// What went wrong on the driver side of the simulation.
#[derive(Debug, Error)]
pub enum SimError {
    /// The driver touched an IOVA no region covers.
    #[error("IOVA {0:#x} is not mapped")]
    Unmapped(u64),
    /// A region that cannot be placed (empty, or past the end of the IOVA space).
    #[error("bad region at IOVA {0:#x}")]
    BadRegion(u64),
    /// A region overlaps one already mapped.
    #[error("region at IOVA {0:#x} overlaps a mapped region")]
    Overlap(u64),
    /// mmap failed.
    #[error("cannot map region: {0}")]
    Map(String),
    /// The heap cannot satisfy an allocation.
    #[error("heap exhausted allocating {0} bytes")]
    OutOfMemory(u64),
    /// Not enough free descriptors.
    #[error("no {0} free descriptors")]
    NoDescriptors(usize),
    /// A chain without descriptors.
    #[error("empty chain")]
    EmptyChain,
    /// The queue has no worker connected (no kick fd).
    #[error("queue not connected to a worker")]
    NotConnected,
    /// A deadline passed.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// Something the simulation did not expect.
    #[error("{0}")]
    Unexpected(String),
    /// An OS error.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

impl From<nix::errno::Errno> for SimError {
    fn from(e: nix::errno::Errno) -> Self {
        SimError::Io(e.into())
    }
}

/// Whether this process may create an io_uring. Where the kernel blocks it (ENOSYS: built
/// without io_uring; EPERM: `kernel.io_uring_disabled`, a seccomp filter), prints why on
/// stderr once and returns false, so that tests needing a worker can skip instead of fail,
/// as the io-uring crate's own tests do. Any other error is a real failure: it panics.
pub fn io_uring_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| match io_uring::IoUring::new(2) {
        Ok(_) => true,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) => {
            eprintln!("skipping tests that need io_uring: io_uring_setup is blocked here ({e})");
            false
        }
        Err(e) => panic!("io_uring_setup failed: {e}"),
    })
}
