//! Target `queue`: requests through the simulator to the production worker (see
//! `vduse_blkd_fuzz::queue`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vduse_blkd_fuzz::queue::fuzz(data));
