//! vduse-blkd: serve a file or block device as a virtio-blk device through VDUSE, with an
//! io_uring data path.
//!
//! Layers, bottom up (see ARCHITECTURE.md):
//! - [`uapi`]: kernel ABI (VDUSE ioctls and structs, vdpa netlink constants, virtio bits).
//! - [`blk`]: the virtio-blk protocol (config space, request parsing, status codes).
//! - [`memory`]: the IOVA space a worker sees.
//! - [`backend`]: the backing file or block device.
//! - [`worker`]: one thread, one virtqueue, one io_uring.
//! - [`metrics`]: per-queue counters and latency histograms.
//! - [`control`]: VDUSE control plane (negotiation, device lifecycle, message loop, vdpa bus).
//! - [`sim`]: an in-process virtio driver for tests and benchmarks.
//! - [`bench`](mod@bench): `vduse-blkd bench`, the production workers under load from the simulator.
//! - [`cli`]: the command line.
#![warn(missing_docs)]

pub mod backend;
pub mod bench;
pub mod blk;
pub mod cli;
pub mod control;
pub mod memory;
pub mod metrics;
pub mod sim;
pub mod uapi;
pub mod worker;
