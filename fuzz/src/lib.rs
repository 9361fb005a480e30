//! Fuzzing support for vduse-blkd: the two targets' inputs, harnesses and seeds.
//!
//! - [`request`]: target `request`, chain walk + request parse, pure and single-threaded.
//! - [`queue`]: target `queue`, chains through the simulator to the production worker.
//! - [`seeds`]: the seed corpus, written by `cargo test` when `FUZZ_WRITE_CORPUS=1`.
//!
//! Inputs are structured types with `#[derive(Arbitrary)]`; any byte string decodes to one.
//! The checks are properties of the production code, not a second implementation of it. The
//! harnesses live here rather than in `fuzz_targets/` so that `cargo test` in this crate
//! replays the seed corpus and the saved regressions without libFuzzer.

use arbitrary::Arbitrary;
use vduse_blkd::blk::request::GuestRead;
use vduse_blkd::memory::IovaSpace;
use vduse_blkd::sim::blk::{T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES};
use vduse_blkd::sim::SimMemory;

pub mod logring;
pub mod queue;
pub mod request;
pub mod seeds;

/// A request type field: the six the device implements, or any other value (each target says
/// what it makes of [`Kind::Other`]).
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Other(u32),
}

impl Kind {
    /// One of each alternative.
    pub const EACH: [Kind; 7] = [
        Kind::In,
        Kind::Out,
        Kind::Flush,
        Kind::GetId,
        Kind::Discard,
        Kind::WriteZeroes,
        Kind::Other(3),
    ];

    /// The type field as given: an implemented type's value, or [`Kind::Other`]'s.
    pub fn value(self) -> u32 {
        match self {
            Kind::In => T_IN,
            Kind::Out => T_OUT,
            Kind::Flush => T_FLUSH,
            Kind::GetId => T_GET_ID,
            Kind::Discard => T_DISCARD,
            Kind::WriteZeroes => T_WRITE_ZEROES,
            Kind::Other(t) => t,
        }
    }
}

/// What a freshly (re)started worker sees of driver memory: an empty IOVA space that maps
/// `src`'s regions on demand, read as the worker's private `MemView` reads it.
pub struct FreshView {
    space: IovaSpace,
    src: SimMemory,
}

impl FreshView {
    pub fn new(src: &SimMemory) -> Self {
        FreshView {
            space: IovaSpace::new(),
            src: src.clone(),
        }
    }
}

impl GuestRead for FreshView {
    fn read_at(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), u64> {
        let FreshView { space, src } = self;
        space.read(src, addr, buf).map_err(|e| e.iova())
    }
}
