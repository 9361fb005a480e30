//! Fuzzing support for vduse-blkd: the input formats of the two targets, their harnesses
//! and the reference model they check the production code against.
//!
//! - [`wire`]: the byte format. Inputs are read field by field through arbitrary's
//!   [`Unstructured`](arbitrary::Unstructured) (integers are little-endian, missing bytes read as
//!   zero, so every byte string is a valid input); [`wire::Writer`] is the inverse, used to write
//!   the seed corpus.
//! - [`model`]: an independent walker of descriptor chains over the simulator's memory, the
//!   oracle for `worker::chain::walk_chain` and for which inputs may break a ring.
//! - [`request`]: target `request`, chain walk + request parse, pure and single-threaded.
//! - [`queue`]: target `queue`, requests through the simulator to the production worker.
//! - [`seeds`]: the seed corpus, written by `cargo test` when `FUZZ_WRITE_CORPUS=1`.
//!
//! The harnesses live here rather than in `fuzz_targets/` so that `cargo test` in this crate
//! replays the seed corpus (and any saved crash) without libFuzzer.

pub mod logring;
pub mod model;
pub mod queue;
pub mod request;
pub mod seeds;
pub mod wire;
