//! Target `request`: chain walk + request parse (see `vduse_blkd_fuzz::request`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vduse_blkd_fuzz::request::fuzz(data));
