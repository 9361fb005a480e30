//! The null backing (`Backend::null`, `bench --backing null`) through the production worker:
//! every request kind completes with the status a file would give, and no data moves.

use std::time::Duration;

use vduse_blkd::backend::Backend;
use vduse_blkd::sim::backed::BackedQueue;
use vduse_blkd::sim::blk::{BlkRequest, DwzSeg, POISON, S_IOERR, S_OK};
use vduse_blkd::sim::Completion;

const TIMEOUT: Duration = Duration::from_secs(10);
const CAPACITY: u64 = 1 << 20;

fn run(q: &mut BackedQueue, r: BlkRequest) -> Completion {
    let chain = r.chain(&q.mem).expect("chain");
    let c = q.queue.run(chain, TIMEOUT).expect("completion");
    assert!(c.tracked, "{c:?}");
    c
}

fn null_queue(event_idx: bool) -> BackedQueue {
    let backend = Backend::null(CAPACITY, 512).expect("null backing");
    BackedQueue::new(backend, 64, event_idx, 4 << 20).expect("queue")
}

#[test]
fn null_backing_completes_reads_and_writes_with_status_ok() {
    if !vduse_blkd::sim::io_uring_available() {
        return;
    }
    for event_idx in [false, true] {
        let mut q = null_queue(event_idx);
        let c = run(&mut q, BlkRequest::write(8, &[7u8; 4096]));
        assert_eq!((c.status, c.len), (Some(S_OK), 1));
        // Multi-segment requests take the readv/writev path: a NOP all the same.
        let c = run(&mut q, BlkRequest::write(16, &[7u8; 8192]).out_chunk(1024));
        assert_eq!((c.status, c.len), (Some(S_OK), 1));
        let c = run(&mut q, BlkRequest::read(8, 4096));
        assert_eq!((c.status, c.len), (Some(S_OK), 4097));
        assert!(c.data.iter().all(|&b| b == POISON), "no data moves");
        let c = run(
            &mut q,
            BlkRequest::read(0, 8192).in_chunk(512).indirect(true),
        );
        assert_eq!((c.status, c.len), (Some(S_OK), 8193));
        for r in [
            BlkRequest::flush(),
            BlkRequest::discard(&[DwzSeg {
                sector: 0,
                num_sectors: 8,
                flags: 0,
            }]),
            BlkRequest::write_zeroes(&[DwzSeg {
                sector: 8,
                num_sectors: 8,
                flags: 0,
            }]),
        ] {
            let c = run(&mut q, r);
            assert_eq!((c.status, c.len), (Some(S_OK), 1));
        }
        // The capacity is still enforced: the parser decides before any NOP.
        let c = run(&mut q, BlkRequest::read(CAPACITY / 512, 512));
        assert_eq!(c.status, Some(S_IOERR));
        let exit = q.stop().expect("clean stop");
        let s = &exit.stats;
        assert_eq!((s.reads, s.writes, s.errors), (2, 2, 1), "{s:?}");
        assert_eq!((s.flushes, s.discards, s.write_zeroes), (1, 1, 1));
        assert_eq!(s.bytes_read, 4096 + 8192);
    }
}

#[test]
fn null_backing_serves_a_full_queue() {
    if !vduse_blkd::sim::io_uring_available() {
        return;
    }
    let mut q = null_queue(true);
    let n = q.queue.size() / 3;
    for i in 0..u64::from(n) {
        let chain = BlkRequest::read(i * 8, 4096).tag(i).chain(&q.mem).unwrap();
        q.queue.add(chain).unwrap();
    }
    q.queue.publish().unwrap();
    q.queue.kick().unwrap();
    let done = q.queue.wait_used(usize::from(n), TIMEOUT).unwrap();
    assert_eq!(done.len(), usize::from(n));
    assert!(done.iter().all(|c| c.status == Some(S_OK) && c.len == 4097));
    assert_eq!(q.mem.heap_in_use(), 0);
}
