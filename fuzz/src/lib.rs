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

pub mod logring;
pub mod queue;
pub mod request;
pub mod seeds;
