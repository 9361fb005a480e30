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
//! - [`ratelimit`]: at most one log line per interval for repeated failures.
//! - [`control`]: VDUSE control plane (negotiation, device lifecycle, message loop, vdpa bus).
//! - [`cli`]: the command line.
//!
//! Test harness, behind the `test-utils` feature (off in the daemon build; on for `cargo test`,
//! `cargo bench` and the fuzz crate):
//! - `sim`: an in-process virtio driver for tests and benchmarks. The
//!   `vduse-blkd-bench` binary (`src/bin/vduse-blkd-bench/`) drives the production workers
//!   through it.
#![warn(missing_docs)]

pub mod backend;
pub mod blk;
pub mod cli;
pub mod control;
pub mod memory;
pub mod metrics;
pub mod ratelimit;
#[cfg(any(test, feature = "test-utils"))]
pub mod sim;
pub mod uapi;
pub mod worker;
