//! The virtio-blk protocol: device configuration space, feature bits, request parsing and
//! status codes.
//!
//! Owns: the bytes of `struct virtio_blk_config`, the feature set we offer, and the pure
//! translation of a flattened descriptor chain into a [`Request`] (or a [`RequestError`] that
//! maps to a virtio status byte). Must not touch: files, io_uring, VDUSE file descriptors or
//! threads. Everything here is a pure function of its inputs so that tests and the fuzzer can
//! drive it without a kernel.

pub mod config;
pub mod request;

pub use config::{BlkConfig, BlkGeometry};
pub use request::{
    parse_request, DataSeg, DwzSegment, Request, RequestError, RequestKind, Segment, SECTOR_SHIFT,
    SECTOR_SIZE,
};

/// Every `linux/virtio_blk.h` name (request types, feature bits, flags, structs), from
/// `virtio-bindings`: the one definition. The few below narrow a `u32` to the type it travels
/// as; they shadow the glob.
pub use virtio_bindings::virtio_blk::*;

use virtio_bindings::virtio_blk as vb;

/// `VIRTIO_BLK_S_OK`: the request succeeded (a status byte).
pub const VIRTIO_BLK_S_OK: u8 = vb::VIRTIO_BLK_S_OK as u8;
/// `VIRTIO_BLK_S_IOERR`: the request failed (bad request or backing I/O error).
pub const VIRTIO_BLK_S_IOERR: u8 = vb::VIRTIO_BLK_S_IOERR as u8;
/// `VIRTIO_BLK_S_UNSUPP`: the request type or a flag is not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = vb::VIRTIO_BLK_S_UNSUPP as u8;

/// Bytes written into a GET_ID buffer (`VIRTIO_BLK_ID_BYTES`), as a length.
pub const VIRTIO_BLK_ID_BYTES: usize = vb::VIRTIO_BLK_ID_BYTES as usize;
