//! Helpers shared by the simulator-driven test suites.
#![allow(dead_code)]

use std::time::Duration;

use vduse_blkd::metrics::QueueStats;
use vduse_blkd::sim::blk::{BlkRequest, DwzSeg, S_OK};
use vduse_blkd::sim::{Chain, Completion, SimDevice, SimDeviceConfig, SimQueue, SimRng};
use vduse_blkd::worker::{WorkerError, WorkerExit};

/// Return from the calling test, with a message, where this kernel blocks io_uring.
#[macro_export]
macro_rules! require_io_uring {
    () => {
        if !vduse_blkd::sim::io_uring_available() {
            return;
        }
    };
}

/// Generous: requests complete in microseconds; this only bounds a hang.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// One DISCARD / WRITE_ZEROES range.
pub fn seg(sector: u64, num_sectors: u32, flags: u32) -> DwzSeg {
    DwzSeg {
        sector,
        num_sectors,
        flags,
    }
}

/// A started device of `capacity` bytes, configured as `SimDeviceConfig::new` and then `adjust`.
pub fn device_with(capacity: u64, adjust: impl FnOnce(&mut SimDeviceConfig)) -> SimDevice {
    let mut cfg = SimDeviceConfig::new(capacity);
    adjust(&mut cfg);
    SimDevice::new(cfg).expect("simulated device")
}

/// A 1 MiB device with one queue of `queue_size`.
pub fn device(queue_size: u16, event_idx: bool) -> SimDevice {
    device_with(1 << 20, |cfg| {
        cfg.queue_size = queue_size;
        cfg.event_idx = event_idx;
    })
}

/// Submit one chain on queue `q` and wait for its single completion.
pub fn run(dev: &mut SimDevice, q: usize, chain: Chain) -> Completion {
    let c = dev.queues[q].run(chain, TIMEOUT).expect("completion");
    assert!(c.tracked, "used entry for a head not in flight: {c:?}");
    c
}

/// Build a request's chain in the device's heap.
pub fn chain(dev: &SimDevice, r: &BlkRequest) -> Chain {
    r.chain(&dev.mem).expect("chain")
}

/// Submit a request and wait for it.
pub fn run_req(dev: &mut SimDevice, q: usize, r: BlkRequest) -> Completion {
    let c = chain(dev, &r);
    run(dev, q, c)
}

/// Publish every head added to `q` and kick its worker.
pub fn publish_and_kick(q: &mut SimQueue) {
    q.publish().expect("publish");
    q.kick().expect("kick");
}

/// Submit a request, wait for it, and assert that it succeeded with used length `len`.
#[track_caller]
pub fn run_req_ok(dev: &mut SimDevice, q: usize, r: BlkRequest, len: u32) -> Completion {
    let c = run_req(dev, q, r);
    assert_eq!((c.status, c.len), (Some(S_OK), len), "used entry");
    c
}

/// Deterministic pattern for `len` bytes from `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    SimRng::new(seed).fill(&mut v);
    v
}

/// The worker of queue `q` still serves: a write then a read of a fresh pattern at `sector`,
/// checked against the backing file too.
pub fn assert_serves(dev: &mut SimDevice, q: usize, sector: u64) {
    let data = pattern(sector ^ 0x5eed, 4096);
    let c = run_req(dev, q, BlkRequest::write(sector, &data));
    assert_eq!((c.status, c.len), (Some(S_OK), 1), "follow-up write");
    let c = run_req(dev, q, BlkRequest::read(sector, 4096));
    assert_eq!((c.status, c.len), (Some(S_OK), 4097), "follow-up read");
    assert!(c.data == data, "follow-up read returned other data");
    assert_eq!(dev.backing_read(sector * 512, 4096).unwrap(), data);
}

/// Stop every worker; each must end cleanly. Returns the exits.
pub fn shutdown_clean(dev: SimDevice) -> Vec<WorkerExit> {
    dev.shutdown()
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("worker did not stop cleanly: {e:?}")))
        .collect()
}

/// Stop the worker of a one-queue device (it must end cleanly) and return its counters.
pub fn shutdown_stats(dev: SimDevice) -> QueueStats {
    let mut exits = shutdown_clean(dev);
    assert_eq!(exits.len(), 1, "a one-queue device");
    exits.remove(0).stats
}

/// Wait for the worker of queue `q` to stop on its own with `WorkerError::Broken` whose
/// reason contains `why`.
pub fn assert_broken(dev: &mut SimDevice, q: usize, why: &str) {
    match dev.wait_exit(q, TIMEOUT).expect("worker ends on its own") {
        Err(WorkerError::Broken { reason, .. }) => {
            let reason = reason.to_string();
            assert!(
                reason.contains(why),
                "broken for {reason:?}, expected {why:?}"
            )
        }
        Err(e) => panic!("worker failed other than Broken: {e:?}"),
        Ok(x) => panic!("worker exited cleanly ({x:?}), expected Broken"),
    }
}
