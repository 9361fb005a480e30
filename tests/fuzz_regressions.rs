//! Inputs the fuzzers (fuzz/) found, as plain tests against the production worker.

mod common;

use common::*;
use vduse_blkd::sim::{SimDevice, SimDeviceConfig};

/// A ring that is already corrupt when the worker starts: the worker's first drain (before
/// its first `io_uring_enter`) marks it broken, and it must still exit promptly, without
/// waiting for a kick that never comes. (fuzz target `queue`: a ring edit right after a
/// restart, published without a kick because the new worker had notifications disabled.)
#[test]
fn ring_corrupt_before_the_first_submit_still_ends_the_worker() {
    require_io_uring!();
    let mut cfg = SimDeviceConfig::new(1 << 20);
    cfg.queue_size = 16;
    let mut dev = SimDevice::create(cfg).expect("device");
    let q = &mut dev.queues[0];
    q.add_head(16, None).expect("avail entry");
    q.publish().expect("publish");
    dev.start(0, 0, 0).expect("start");
    assert_broken(&mut dev, 0, "head index 16");
}
