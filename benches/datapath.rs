//! Microbenchmarks of the queue worker's per-request steps, each with the production code:
//!
//! - `parse`: [`blk::parse_request`] of a read and a write chain (header read included);
//! - `chain`: [`worker::chain::walk_chain`] of a direct and an indirect three-descriptor chain
//!   reading through an [`IovaSpace`] (as the worker does), then
//!   [`IovaSpace::translate`] of its data buffer; and `translate` alone;
//! - `complete`: the status byte write plus used-ring publication and the EVENT_IDX check
//!   (virtio-queue's `add_used` + `needs_notification` on the worker's IOVA memory: the calls
//!   `Worker::finish` / `notify_if_needed` make; the worker itself is private), and the whole
//!   round trip of one request through the simulator and a production worker on the null
//!   backing (post, kick, io_uring NOP, used entry, interrupt, reap).
//!
//! Run with `cargo bench --bench datapath` (add `-- --quick` for a short run).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use vduse_blkd::backend::Backend;
use vduse_blkd::blk::request::{DeviceLimits, GuestRead};
use vduse_blkd::blk::{parse_request, Request, Segment};
use vduse_blkd::memory::IovaSpace;
use vduse_blkd::sim::backed::BackedQueue;
use vduse_blkd::sim::blk::{header, BlkRequest, S_OK, T_IN, T_OUT};
use vduse_blkd::sim::memory::PROT_RW;
use vduse_blkd::sim::queue::{Desc, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use vduse_blkd::sim::SimMemory;
use vduse_blkd::worker::chain::walk_chain;

const LIMITS: DeviceLimits = DeviceLimits {
    capacity: 1 << 30,
    read_only: false,
};

/// IOVA layout of the chain benches: a descriptor table, an indirect table, a header, a
/// 4 KiB data buffer and a status byte, all in one region.
const BASE: u64 = 0x10_0000;
const TABLE: u64 = BASE;
const INDIRECT: u64 = BASE + 0x1000;
const HDR: u64 = BASE + 0x2000;
const STATUS: u64 = BASE + 0x2010;
const DATA: u64 = BASE + 0x3000;
const USED_RING: u64 = BASE + 0x8000;
const AVAIL_RING: u64 = BASE + 0x9000;

/// A flat byte array at an IOVA, for the parser.
struct Flat {
    base: u64,
    bytes: Vec<u8>,
}

impl GuestRead for Flat {
    fn read_at(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), u64> {
        let off = addr.checked_sub(self.base).ok_or(addr)? as usize;
        let src = self.bytes.get(off..off + buf.len()).ok_or(addr)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

fn bench_parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Elements(1));
    for (name, kind, data_write) in [("read_4k", T_IN, true), ("write_4k", T_OUT, false)] {
        let mut bytes = vec![0u8; 0x4000];
        bytes[..16].copy_from_slice(&header(kind, 2048));
        let mut mem = Flat { base: HDR, bytes };
        let segs = [
            Segment {
                addr: HDR,
                len: 16,
                write: false,
            },
            Segment {
                addr: DATA,
                len: 4096,
                write: data_write,
            },
            Segment {
                addr: STATUS,
                len: 1,
                write: true,
            },
        ];
        let mut req = Request::default();
        g.bench_function(name, |b| {
            b.iter(|| {
                let r = parse_request(black_box(&segs), &mut mem, &LIMITS, &mut req);
                assert!(r.is_ok());
                black_box(req.data_len)
            })
        });
    }
    g.finish();
}

/// The worker's view of descriptor memory: reads through its IOVA space.
struct View<'a> {
    space: &'a mut IovaSpace,
    src: &'a mut SimMemory,
}

impl GuestRead for View<'_> {
    fn read_at(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), u64> {
        self.space.read(self.src, addr, buf).map_err(|e| e.iova())
    }
}

/// A memory with the chain layout written, and a warm IOVA space over it.
fn chain_memory() -> (SimMemory, IovaSpace) {
    let mem = SimMemory::new();
    mem.add_region(BASE, 0x10000, PROT_RW).unwrap();
    let descs = [
        Desc::encode(HDR, 16, DESC_F_NEXT, 1),
        Desc::encode(DATA, 4096, DESC_F_NEXT | DESC_F_WRITE, 2),
        Desc::encode(STATUS, 1, DESC_F_WRITE, 0),
    ];
    for (i, d) in descs.iter().enumerate() {
        mem.write(TABLE + 16 * i as u64, d).unwrap();
        mem.write(INDIRECT + 16 * i as u64, d).unwrap();
    }
    mem.write(
        TABLE + 16 * 3,
        &Desc::encode(INDIRECT, 48, DESC_F_INDIRECT, 0),
    )
    .unwrap();
    mem.write(HDR, &header(T_IN, 8)).unwrap();
    let mut space = IovaSpace::new();
    let mut src = mem.clone();
    space.ensure(&mut src, BASE, 0x10000, true).unwrap();
    (mem, space)
}

fn bench_chain(c: &mut Criterion) {
    let (mem, mut space) = chain_memory();
    let mut src = mem.clone();
    let mut g = c.benchmark_group("chain");
    g.throughput(Throughput::Elements(1));
    let mut segs = Vec::new();
    let mut iov: Vec<libc::iovec> = Vec::new();
    for (name, head) in [
        ("walk_translate_direct", 0u16),
        ("walk_translate_indirect", 3),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut view = View {
                    space: &mut space,
                    src: &mut src,
                };
                walk_chain(&mut view, TABLE, 4, black_box(head), &mut segs).unwrap();
                iov.clear();
                let d = segs[1];
                space
                    .translate(&mut src, d.addr, u64::from(d.len), true, &mut iov)
                    .unwrap();
                black_box(iov.len())
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("translate");
    g.throughput(Throughput::Elements(1));
    for (name, len) in [("4k", 4096u64), ("32k", 32768)] {
        g.bench_function(name, |b| {
            b.iter(|| {
                iov.clear();
                space
                    .translate(&mut src, black_box(DATA), len, true, &mut iov)
                    .unwrap();
                black_box(iov.len())
            })
        });
    }
    g.finish();
}

fn bench_complete(c: &mut Criterion) {
    let (mem, mut space) = chain_memory();
    let mut src = mem.clone();
    let size = 256u16;
    let mut q = Queue::new(size).unwrap();
    q.try_set_desc_table_address(GuestAddress(TABLE)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(AVAIL_RING))
        .unwrap();
    q.try_set_used_ring_address(GuestAddress(USED_RING))
        .unwrap();
    q.set_event_idx(true);
    q.set_ready(true);
    assert!(q.is_valid(space.memory()));
    let mut g = c.benchmark_group("complete");
    g.throughput(Throughput::Elements(1));
    g.bench_function("status_add_used_needs_notification", |b| {
        b.iter(|| {
            space.write(&mut src, STATUS, &[S_OK]).unwrap();
            q.add_used(space.memory(), black_box(3), 4097).unwrap();
            black_box(q.needs_notification(space.memory()).unwrap())
        })
    });

    // The whole path for one request: the simulator's general-purpose driver (mutex per ring
    // access, poll(2) on the interrupt eventfd) is part of what this measures.
    let backend = Backend::null(1 << 30, 512).unwrap();
    let mut bq = BackedQueue::new(backend, 256, true, 1 << 20).unwrap();
    let mut chain = BlkRequest::read(8, 4096).chain(&bq.mem).unwrap();
    // Keep the buffers for every iteration instead of freeing them at each completion.
    chain.allocs.clear();
    g.bench_function("sim_round_trip_null_read_4k", |b| {
        b.iter(|| {
            let done = bq
                .queue
                .run(chain.clone(), Duration::from_secs(10))
                .unwrap();
            assert_eq!(done.status, Some(S_OK));
            black_box(done.len)
        })
    });
    g.finish();
}

criterion_group!(benches, bench_parse, bench_chain, bench_complete);
criterion_main!(benches);
