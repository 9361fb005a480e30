//! Functional tests of the production queue worker, driven by the in-process simulator:
//! every request type, data integrity against a reference model, multi-queue, EVENT_IDX,
//! indirect descriptors, full queues, every queue size, DISCARD / WRITE_ZEROES segment
//! lists, and stop / resume with I/O in flight.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use vduse_blkd::sim::blk::{BlkRequest, DwzSeg, POISON, S_IOERR, S_OK, WZ_FLAG_UNMAP};
use vduse_blkd::sim::queue::USED_F_NO_NOTIFY;
use vduse_blkd::sim::{Completion, SimDevice, SimDeviceConfig, SimQueue, SimRng};

const MIB: u64 = 1 << 20;

/// Add every request, publish once, kick once, and wait for all of them; completions are
/// returned in request order (by tag).
fn run_batch(q: &mut SimQueue, reqs: Vec<BlkRequest>) -> Vec<Completion> {
    let n = reqs.len();
    for (i, r) in reqs.into_iter().enumerate() {
        let c = r.tag(i as u64).chain(q.mem()).expect("chain");
        q.add(c).expect("add");
    }
    publish_and_kick(q);
    let mut done = q.wait_used(n, TIMEOUT).expect("completions");
    assert_eq!(done.len(), n);
    assert!(done.iter().all(|c| c.tracked), "stray used entry");
    done.sort_by_key(|c| c.tag);
    done
}

// ---------------------------------------------------------------------------------------
// Request types
// ---------------------------------------------------------------------------------------

#[test]
fn read_and_write_single_and_multi_segment() {
    require_io_uring!();
    let mut dev = device_with(MIB, |cfg| cfg.fill_seed = Some(1));
    let before = dev.backing_read(0, MIB as usize).unwrap();

    // IN: one data descriptor; used len = data + status.
    let c = run_req_ok(&mut dev, 0, BlkRequest::read(3, 1536), 1537);
    assert!(c.data == before[3 * 512..3 * 512 + 1536]);

    // IN: data split into odd pieces, status sharing the last data descriptor.
    let r = BlkRequest::read(100, 8192)
        .in_chunk(1000)
        .status_shared(true);
    let c = run_req_ok(&mut dev, 0, r, 8193);
    assert!(c.data == before[100 * 512..100 * 512 + 8192]);

    // OUT: header and data split into 100-byte pieces (the header spans descriptors, and
    // header and data share one).
    let data = pattern(7, 4096);
    run_req_ok(&mut dev, 0, BlkRequest::write(40, &data).out_chunk(100), 1);
    assert_eq!(dev.backing_read(40 * 512, 4096).unwrap(), data);

    // A zero-length read is a no-op that succeeds.
    run_req_ok(&mut dev, 0, BlkRequest::read(0, 0), 1);

    // The last sector of the device.
    let c = run_req(&mut dev, 0, BlkRequest::write(MIB / 512 - 1, &[9u8; 512]));
    assert_eq!(c.status, Some(S_OK));
    let c = run_req(&mut dev, 0, BlkRequest::read(MIB / 512 - 1, 512));
    assert_eq!((c.status, c.data), (Some(S_OK), vec![9u8; 512]));

    let stats = shutdown_stats(dev);
    assert_eq!(stats.reads, 4);
    assert_eq!(stats.writes, 2);
    assert_eq!(stats.errors, 0);
    assert_eq!(stats.bytes_read, 1536 + 8192 + 512);
}

#[test]
fn flush_succeeds() {
    require_io_uring!();
    let mut dev = device(16, false);
    run_req_ok(&mut dev, 0, BlkRequest::flush(), 1);
    assert_eq!(shutdown_stats(dev).flushes, 1);
}

#[test]
fn get_id_returns_the_serial() {
    require_io_uring!();
    let mut dev = device_with(MIB, |cfg| cfg.serial = *b"0123456789abcdefghij");
    let c = run_req_ok(&mut dev, 0, BlkRequest::get_id(), 21);
    assert_eq!(c.data, b"0123456789abcdefghij");

    // A larger buffer split in pieces: 20 bytes are written, the rest is untouched.
    let mut r = BlkRequest::get_id().in_chunk(7);
    r.in_len = 64;
    let c = run_req_ok(&mut dev, 0, r, 21);
    assert_eq!(&c.data[..20], b"0123456789abcdefghij");
    assert!(c.data[20..].iter().all(|&b| b == POISON));
    shutdown_clean(dev);
}

/// The backing file reads as zeroes over `[offset, offset + len)`; `what` names the range.
#[track_caller]
fn assert_zeroed(dev: &SimDevice, offset: u64, len: usize, what: &str) {
    let bytes = dev.backing_read(offset, len).unwrap();
    assert!(bytes.iter().all(|&b| b == 0), "{what} not zeroed");
}

/// `segs` all read as zeroes in the backing file.
fn assert_segments_zeroed(dev: &SimDevice, segs: &[DwzSeg], what: &str) {
    for s in segs {
        let len = s.num_sectors as usize * 512;
        assert_zeroed(dev, s.sector * 512, len, &format!("{what}: {s:?}"));
    }
}

/// `/dev/shm`, a tmpfs (which has no FALLOC_FL_ZERO_RANGE), or `None` with a note if absent.
fn tmpfs_dir() -> Option<PathBuf> {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("no /dev/shm: fallback not exercised");
        return None;
    }
    Some(shm.to_path_buf())
}

/// Write a pattern over `[sector, sector + n)` through the device.
fn fill_range(dev: &mut SimDevice, sector: u64, bytes: usize, seed: u64) {
    let c = run_req(dev, 0, BlkRequest::write(sector, &pattern(seed, bytes)));
    assert_eq!(c.status, Some(S_OK));
    let c = run_req(dev, 0, BlkRequest::flush());
    assert_eq!(c.status, Some(S_OK));
}

#[test]
fn discard_punches_a_hole() {
    require_io_uring!();
    let mut dev = device(16, false);
    fill_range(&mut dev, 128, 64 << 10, 3);
    assert!(!dev.is_hole(128 * 512, 64 << 10).unwrap());
    run_req_ok(&mut dev, 0, BlkRequest::discard(&[seg(128, 128, 0)]), 1);
    assert!(dev.is_hole(128 * 512, 64 << 10).unwrap());
    assert_zeroed(&dev, 128 * 512, 64 << 10, "the discarded range");
    assert_eq!(shutdown_stats(dev).discards, 1);
}

#[test]
fn write_zeroes_with_unmap_leaves_a_hole() {
    require_io_uring!();
    let mut dev = device(16, false);
    fill_range(&mut dev, 256, 64 << 10, 4);
    let unmap = [seg(256, 128, WZ_FLAG_UNMAP)];
    run_req_ok(&mut dev, 0, BlkRequest::write_zeroes(&unmap), 1);
    assert!(dev.is_hole(256 * 512, 64 << 10).unwrap());
    assert_zeroed(&dev, 256 * 512, 64 << 10, "the unmapped range");
    shutdown_clean(dev);
}

#[test]
fn write_zeroes_without_unmap_zeroes_and_keeps_blocks() {
    require_io_uring!();
    let mut dev = device(16, false);
    fill_range(&mut dev, 256, 64 << 10, 5);
    let blocks = dev.allocated_blocks().unwrap();
    run_req_ok(
        &mut dev,
        0,
        BlkRequest::write_zeroes(&[seg(256, 128, 0)]),
        1,
    );
    assert_zeroed(&dev, 256 * 512, 64 << 10, "the range");
    assert!(
        dev.allocated_blocks().unwrap() >= blocks,
        "WRITE_ZEROES without UNMAP deallocated blocks"
    );
    // The bytes around the range are untouched.
    let around = dev.backing_read(255 * 512, 512).unwrap();
    assert!(
        around.iter().all(|&b| b == 0),
        "sector 255 was never written"
    );
    let after = dev.backing_read(384 * 512, 512).unwrap();
    assert!(after.iter().all(|&b| b == 0));
    assert_eq!(shutdown_stats(dev).write_zeroes, 1);
}

/// tmpfs has no FALLOC_FL_ZERO_RANGE: WRITE_ZEROES must fall back (punch + allocate).
#[test]
fn write_zeroes_falls_back_where_zero_range_is_unsupported() {
    require_io_uring!();
    let Some(shm) = tmpfs_dir() else {
        return;
    };
    let mut dev = device_with(MIB, |cfg| {
        cfg.dir = Some(shm);
        cfg.fill_seed = Some(6);
    });
    let segs = [seg(0, 8, 0), seg(64, 16, WZ_FLAG_UNMAP), seg(200, 8, 0)];
    let c = run_req(&mut dev, 0, BlkRequest::write_zeroes(&segs));
    assert_eq!(c.status, Some(S_OK));
    assert_segments_zeroed(&dev, &segs, "segment");
    // A second request after the worker learned ZERO_RANGE is unsupported.
    let c = run_req(&mut dev, 0, BlkRequest::write_zeroes(&[seg(300, 8, 0)]));
    assert_eq!(c.status, Some(S_OK));
    assert_zeroed(&dev, 300 * 512, 4096, "the second request's range");
    // Untouched data stays.
    assert_ne!(dev.backing_read(8 * 512, 512).unwrap(), vec![0u8; 512]);
    shutdown_clean(dev);
}

#[test]
fn discard_and_write_zeroes_segment_lists() {
    require_io_uring!();
    let mut dev = device_with(4 * MIB, |cfg| cfg.fill_seed = Some(8));
    let one = [seg(8, 8, 0)];
    let sixteen: Vec<DwzSeg> = (0..16)
        .map(|i| seg(1024 + i * 64, 8 + i as u32, 0))
        .collect();
    let seventeen: Vec<DwzSeg> = (0..17).map(|i| seg(4096 + i * 64, 8, 0)).collect();

    for (name, segs) in [("one", &one[..]), ("sixteen", &sixteen[..])] {
        let c = run_req(&mut dev, 0, BlkRequest::write_zeroes(segs));
        assert_eq!((c.status, c.len), (Some(S_OK), 1), "{name}");
        assert_segments_zeroed(&dev, segs, name);
        let c = run_req(&mut dev, 0, BlkRequest::discard(segs));
        assert_eq!(c.status, Some(S_OK), "{name} discard");
    }
    // The segment list may be split across descriptors anywhere.
    let c = run_req(
        &mut dev,
        0,
        BlkRequest::write_zeroes(&sixteen).out_chunk(24),
    );
    assert_eq!(c.status, Some(S_OK));

    let before = dev.backing_read(4096 * 512, 17 * 64 * 512).unwrap();
    for r in [
        BlkRequest::write_zeroes(&seventeen),
        BlkRequest::discard(&seventeen),
    ] {
        let c = run_req(&mut dev, 0, r);
        assert_eq!(
            (c.status, c.len),
            (Some(S_IOERR), 1),
            "17 segments are refused"
        );
    }
    assert_eq!(dev.backing_read(4096 * 512, 17 * 64 * 512).unwrap(), before);
    let stats = shutdown_stats(dev);
    assert_eq!(stats.write_zeroes, 3);
    assert_eq!(stats.discards, 2);
    assert_eq!(stats.errors, 2);
}

// ---------------------------------------------------------------------------------------
// Data integrity against a reference model
// ---------------------------------------------------------------------------------------

/// Random batches of non-overlapping reads, writes and write-zeroes in `[base, base+len)`
/// sectors of the device, in varied layouts; every read and the model are checked.
/// Returns the number of requests completed.
fn workload(
    q: &mut SimQueue,
    model: &mut [u8],
    base: u64,
    rng: &mut SimRng,
    rounds: usize,
    max_batch: u64,
    honour_suppression: bool,
) -> usize {
    let sectors = model.len() as u64 / 512;
    let mut total = 0;
    for _ in 0..rounds {
        let want = rng.range(1, max_batch);
        let mut taken: Vec<(u64, u64)> = Vec::new();
        let mut expect: Vec<(u32, u64, Option<Vec<u8>>)> = Vec::new();
        let mut desc_budget = q.free_descs();
        while (expect.len() as u64) < want {
            let n = rng.range(1, 32);
            let s = rng.below(sectors - n + 1);
            if taken.iter().any(|&(a, b)| s < b && a < s + n) {
                continue;
            }
            let kind = rng.below(20);
            let mut r = match kind {
                0..=8 => BlkRequest::read(base + s, (n * 512) as u32),
                9..=17 => {
                    let mut data = vec![0u8; (n * 512) as usize];
                    rng.fill(&mut data);
                    BlkRequest::write(base + s, &data)
                }
                18 => {
                    let flags = if rng.one_in(2) { WZ_FLAG_UNMAP } else { 0 };
                    BlkRequest::write_zeroes(&[seg(base + s, n as u32, flags)])
                }
                _ => BlkRequest::flush(),
            };
            r.out_chunk = [0, 0, 512, 100, 4096][rng.below(5) as usize];
            r.in_chunk = [0, 0, 512, 1000, 4096][rng.below(5) as usize];
            r.status_shared = rng.one_in(4);
            r.indirect = rng.one_in(4);
            let need = r.desc_count();
            if need > desc_budget {
                if desc_budget == 0 {
                    break;
                }
                r.indirect = true;
            }
            desc_budget -= r.desc_count();
            if r.type_ != 4 {
                taken.push((s, s + n));
            }
            let off = (s * 512) as usize;
            let len = (n * 512) as usize;
            let exp = match r.type_ {
                0 => Some(model[off..off + len].to_vec()),
                _ => None,
            };
            match r.type_ {
                1 => model[off..off + len].copy_from_slice(&r.out),
                13 => model[off..off + len].fill(0),
                _ => {}
            }
            let tag = expect.len() as u64;
            let c = r.tag(tag).chain(q.mem()).expect("chain");
            q.add(c).expect("add");
            expect.push((kind as u32, n, exp));
        }
        if expect.is_empty() {
            continue;
        }
        if honour_suppression {
            q.publish_and_notify().unwrap();
        } else {
            publish_and_kick(q);
        }
        let done = q.wait_used(expect.len(), TIMEOUT).expect("batch completes");
        assert_eq!(done.len(), expect.len());
        for c in done {
            assert!(c.tracked, "stray used entry {c:?}");
            assert_eq!(c.status, Some(S_OK), "request {} failed", c.tag);
            let (_, n, exp) = &expect[c.tag as usize];
            if let Some(exp) = exp {
                assert_eq!(c.len as u64, n * 512 + 1);
                assert!(&c.data == exp, "read {} returned other data", c.tag);
            } else {
                assert_eq!(c.len, 1);
            }
        }
        total += expect.len();
    }
    total
}

fn random_io_against_model(event_idx: bool, seed: u64) {
    let cap = 8 * MIB;
    let mut dev = device_with(cap, |cfg| {
        cfg.queue_size = 128;
        cfg.event_idx = event_idx;
        cfg.fill_seed = Some(seed);
    });
    let mut model = dev.backing_read(0, cap as usize).unwrap();
    let mut rng = SimRng::new(seed.wrapping_mul(31));
    let q = &mut dev.queues[0];
    let n = workload(q, &mut model, 0, &mut rng, 100, 40, false);
    let n2 = workload(q, &mut model, 0, &mut rng, 100, 40, true);
    assert!(
        dev.backing_read(0, cap as usize).unwrap() == model,
        "backing file differs from the model"
    );
    assert_eq!(dev.mem.heap_in_use(), 0, "driver leaked buffers");
    let exits = shutdown_clean(dev);
    assert_eq!(usize::from(exits[0].next_used), n + n2);
    assert_eq!(exits[0].next_avail, exits[0].next_used);
    assert_eq!(exits[0].stats.errors, 0);
}

#[test]
fn random_io_matches_reference_model() {
    require_io_uring!();
    random_io_against_model(false, 0x5eed_0001);
}

#[test]
fn random_io_matches_reference_model_with_event_idx() {
    require_io_uring!();
    random_io_against_model(true, 0x5eed_0002);
}

#[test]
fn multi_queue_workers_share_one_file() {
    require_io_uring!();
    let cap = 4 * MIB;
    for queues in [2u16, 4] {
        let mut dev = device_with(cap, |cfg| {
            cfg.queues = queues;
            cfg.queue_size = 64;
            cfg.event_idx = queues == 4;
            cfg.fill_seed = Some(u64::from(queues));
        });
        let mut model = dev.backing_read(0, cap as usize).unwrap();
        let span = model.len() / usize::from(queues);
        let counts: Vec<usize> = std::thread::scope(|s| {
            let handles: Vec<_> = dev
                .queues
                .iter_mut()
                .zip(model.chunks_mut(span))
                .enumerate()
                .map(|(i, (q, m))| {
                    s.spawn(move || {
                        let mut rng = SimRng::new(1000 + i as u64);
                        let base = (i * span / 512) as u64;
                        workload(q, m, base, &mut rng, 60, 16, i % 2 == 1)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(
            dev.backing_read(0, cap as usize).unwrap() == model,
            "backing file differs"
        );
        let exits = shutdown_clean(dev);
        for (i, x) in exits.iter().enumerate() {
            assert_eq!(usize::from(x.next_used), counts[i], "queue {i}");
            assert_eq!(x.stats.errors, 0);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Notifications
// ---------------------------------------------------------------------------------------

#[test]
fn event_idx_suppresses_and_delivers_interrupts() {
    require_io_uring!();
    let mut dev = device(64, true);
    let irq = std::sync::Arc::clone(dev.queues[0].irq());
    dev.queues[0].set_auto_used_event(false);

    // used_event far ahead: the interrupt for 0 -> 1 is suppressed.
    dev.queues[0].set_used_event(100).unwrap();
    let c = run_req(&mut dev, 0, BlkRequest::flush());
    assert_eq!(c.status, Some(S_OK));

    // used_event = 1: the driver wants to hear when the used index passes 1.
    dev.queues[0].set_used_event(1).unwrap();
    let c = run_req(&mut dev, 0, BlkRequest::flush());
    assert_eq!(c.status, Some(S_OK));
    irq.wait_count(1, std::time::Instant::now() + TIMEOUT)
        .unwrap();

    // A batch of 10 with used_event in the middle: exactly one more interrupt.
    dev.queues[0].set_used_event(2 + 4).unwrap();
    let reqs = (0..10).map(|i| BlkRequest::read(i * 8, 4096)).collect();
    let done = run_batch(&mut dev.queues[0], reqs);
    assert!(done.iter().all(|c| c.status == Some(S_OK)));
    irq.wait_count(2, std::time::Instant::now() + TIMEOUT)
        .unwrap();

    // Idle, the worker asks to be kicked for the very next request.
    assert_eq!(
        dev.queues[0].avail_event().unwrap(),
        dev.queues[0].avail_idx()
    );

    // used_event behind the used index (already passed): no interrupt.
    dev.queues[0].set_used_event(0).unwrap();
    let c = run_req(&mut dev, 0, BlkRequest::flush());
    assert_eq!(c.status, Some(S_OK));

    assert_eq!(
        shutdown_stats(dev).interrupts,
        2,
        "exactly the two wanted interrupts"
    );
    assert_eq!(irq.count(), 2);
}

#[test]
fn without_event_idx_every_batch_interrupts() {
    require_io_uring!();
    let mut dev = device(64, false);
    for i in 0..5 {
        let c = run_req(&mut dev, 0, BlkRequest::read(i, 512));
        assert_eq!(c.status, Some(S_OK));
    }
    let irq = std::sync::Arc::clone(dev.queues[0].irq());
    irq.wait_count(5, std::time::Instant::now() + TIMEOUT)
        .unwrap();
    // Idle, notifications are enabled (no NO_NOTIFY flag).
    assert_eq!(dev.queues[0].used_flags().unwrap() & USED_F_NO_NOTIFY, 0);
    assert_eq!(shutdown_stats(dev).interrupts, 5);
    assert_eq!(irq.count(), 5);
}

#[test]
fn kick_suppression_never_loses_a_request() {
    require_io_uring!();
    // Publish one request at a time as fast as possible, kicking only when the device asks.
    for event_idx in [false, true] {
        let mut dev = device(32, event_idx);
        let q = &mut dev.queues[0];
        let mut outstanding = 0usize;
        let mut done = 0usize;
        for i in 0..400u64 {
            let c = BlkRequest::read(i % 64, 512)
                .indirect(true)
                .chain(q.mem())
                .unwrap();
            q.add(c).unwrap();
            q.publish_and_notify().unwrap();
            outstanding += 1;
            if outstanding == 16 {
                let got = q
                    .wait_used(1, TIMEOUT)
                    .expect("a completion without a kick");
                outstanding -= got.len();
                done += got.len();
            }
        }
        done += q.wait_used(outstanding, TIMEOUT).expect("the rest").len();
        assert_eq!(done, 400);
        let (sent, skipped) = q.kick_counts();
        assert_eq!(sent + skipped, 400);
        shutdown_clean(dev);
    }
}

// ---------------------------------------------------------------------------------------
// Indirect, full queues, queue sizes
// ---------------------------------------------------------------------------------------

#[test]
fn indirect_descriptors() {
    require_io_uring!();
    let mut dev = device(8, true);
    let data = pattern(11, 16 << 10);
    let r = BlkRequest::write(64, &data).out_chunk(4096).indirect(true);
    let c = run_req(&mut dev, 0, r);
    assert_eq!(c.status, Some(S_OK));
    let r = BlkRequest::read(64, 16 << 10).in_chunk(512).indirect(true);
    assert_eq!(r.desc_count(), 1);
    let c = run_req_ok(&mut dev, 0, r, (16 << 10) + 1);
    assert!(c.data == data);
    // 1024 data segments is the most one request may carry (IOV_MAX).
    let r = BlkRequest::read(0, 1024 * 512).in_chunk(512).indirect(true);
    let c = run_req(&mut dev, 0, r);
    assert_eq!(c.status, Some(S_OK));
    shutdown_clean(dev);
}

#[test]
fn full_queue_every_descriptor_in_flight() {
    require_io_uring!();
    // Direct: 128 two-descriptor reads fill a 256-entry table.
    let mut dev = device_with(4 * MIB, |cfg| cfg.fill_seed = Some(12));
    let content = dev.backing_read(0, 4 * MIB as usize).unwrap();
    let reqs: Vec<BlkRequest> = (0..128)
        .map(|i| BlkRequest::read(i * 16, 4096).status_shared(true))
        .collect();
    assert!(reqs.iter().all(|r| r.desc_count() == 2));
    for (i, r) in reqs.iter().enumerate() {
        let c = r.clone().tag(i as u64).chain(&dev.mem).unwrap();
        dev.queues[0].add(c).unwrap();
    }
    assert_eq!(dev.queues[0].free_descs(), 0);
    let q = &mut dev.queues[0];
    publish_and_kick(q);
    let done = q.wait_used(128, TIMEOUT).unwrap();
    for c in &done {
        assert_eq!(c.status, Some(S_OK));
        let off = c.tag as usize * 16 * 512;
        assert!(c.data == content[off..off + 4096]);
    }
    // Indirect: 256 one-descriptor writes.
    let reqs: Vec<BlkRequest> = (0..256)
        .map(|i| BlkRequest::write(i * 8, &pattern(i, 4096)).indirect(true))
        .collect();
    let done = run_batch(&mut dev.queues[0], reqs);
    assert!(done.iter().all(|c| c.status == Some(S_OK)));
    for i in 0..256 {
        assert_eq!(dev.backing_read(i * 4096, 4096).unwrap(), pattern(i, 4096));
    }
    assert_eq!(dev.queues[0].free_descs(), 256);
    shutdown_clean(dev);
}

/// Run 32 WRITE_ZEROES requests of 16 ranges each (range `i` zeroes 4 KiB at sector
/// `16 * i`) as one batch on a pre-filled device: all succeed, every range is zero, the 512
/// bytes after each are not, and the worker counted 32.
fn run_sixteen_range_write_zeroes(mut dev: SimDevice, reqs: Vec<BlkRequest>) {
    let done = run_batch(&mut dev.queues[0], reqs);
    assert!(done.iter().all(|c| c.status == Some(S_OK)));
    for i in 0..512u64 {
        assert_zeroed(&dev, i * 16 * 512, 4096, &format!("range {i}"));
        let kept = dev.backing_read(i * 16 * 512 + 4096, 512).unwrap();
        assert!(
            kept.iter().any(|&b| b != 0),
            "data after range {i} was zeroed"
        );
    }
    assert_eq!(shutdown_stats(dev).write_zeroes, 32);
}

#[test]
fn full_queue_of_sixteen_segment_write_zeroes_is_throttled_not_lost() {
    require_io_uring!();
    // 32 requests x 16 ranges = 512 fallocate ops, more than the worker's CQ holds at once.
    let dev = device_with(4 * MIB, |cfg| {
        cfg.queue_size = 32;
        cfg.fill_seed = Some(13);
    });
    let reqs: Vec<BlkRequest> = (0..32u64)
        .map(|r| {
            let segs: Vec<DwzSeg> = (0..16)
                .map(|s| {
                    seg(
                        (r * 16 + s) * 16,
                        8,
                        if s % 2 == 0 { WZ_FLAG_UNMAP } else { 0 },
                    )
                })
                .collect();
            BlkRequest::write_zeroes(&segs).indirect(true)
        })
        .collect();
    run_sixteen_range_write_zeroes(dev, reqs);
}

#[test]
fn every_queue_size_serves_requests() {
    require_io_uring!();
    let mut size = 1u16;
    loop {
        let mut dev = device(size, size.is_multiple_of(4));
        // Small rings need indirect tables for three-descriptor requests.
        let ind = size < 4;
        let n = (u64::from(size) * 2 + 1).min(6);
        for i in 0..n {
            let data = pattern(u64::from(size) * 100 + i, 1024);
            let c = run_req(&mut dev, 0, BlkRequest::write(i * 2, &data).indirect(ind));
            assert_eq!(c.status, Some(S_OK), "size {size}");
            let c = run_req(&mut dev, 0, BlkRequest::read(i * 2, 1024).indirect(ind));
            assert_eq!((c.status, &c.data), (Some(S_OK), &data), "size {size}");
        }
        let c = run_req(&mut dev, 0, BlkRequest::flush().indirect(ind));
        assert_eq!(c.status, Some(S_OK));
        let exits = shutdown_clean(dev);
        assert_eq!(u64::from(exits[0].next_used), 2 * n + 1, "size {size}");
        if size == 32768 {
            break;
        }
        size *= 2;
    }
}

#[test]
fn ring_indices_wrap_around() {
    require_io_uring!();
    for size in [1u16, 4, 256] {
        let mut cfg = SimDeviceConfig::new(MIB);
        cfg.queue_size = size;
        cfg.event_idx = size == 4;
        let mut dev = SimDevice::create(cfg).unwrap();
        let start = u16::MAX - 5;
        dev.queues[0].rebase(start).unwrap();
        dev.start(0, start, start).unwrap();
        for i in 0..12u64 {
            let data = pattern(i, 512);
            let c = run_req(&mut dev, 0, BlkRequest::write(i, &data).indirect(true));
            assert_eq!(c.status, Some(S_OK));
        }
        let exits = shutdown_clean(dev);
        assert_eq!(exits[0].next_used, start.wrapping_add(12));
        assert_eq!(exits[0].next_avail, start.wrapping_add(12));
    }
}

// ---------------------------------------------------------------------------------------
// Stop and resume
// ---------------------------------------------------------------------------------------

/// Post `n` tagged indirect writes of 4 KiB at `4 KiB * tag`.
fn add_writes(q: &mut SimQueue, tags: std::ops::Range<u64>) {
    for t in tags {
        let c = BlkRequest::write(t * 8, &pattern(t, 4096))
            .indirect(true)
            .tag(t)
            .chain(q.mem())
            .unwrap();
        q.add(c).unwrap();
    }
}

fn check_all_once(done: &[Completion], n: u64) {
    let mut seen: HashMap<u64, usize> = HashMap::new();
    for c in done {
        assert!(c.tracked, "used entry for a head not in flight: {c:?}");
        assert_eq!(c.status, Some(S_OK));
        *seen.entry(c.tag).or_default() += 1;
    }
    for t in 0..n {
        assert_eq!(
            seen.get(&t),
            Some(&1),
            "request {t} completed {:?} times",
            seen.get(&t)
        );
    }
    assert_eq!(done.len() as u64, n);
}

#[test]
fn stop_and_resume_without_loss_deterministic() {
    require_io_uring!();
    let mut dev = device_with(4 * MIB, |cfg| cfg.queue_size = 64);
    let q = &mut dev.queues[0];
    add_writes(q, 0..30);
    publish_and_kick(q);
    let mut done = q.wait_used(1, TIMEOUT).unwrap();
    // Published but not kicked: the worker never looks at these before it stops.
    add_writes(q, 30..60);
    q.publish().unwrap();
    let exit = dev.stop(0).expect("clean stop");
    assert_eq!(
        exit.next_avail, 30,
        "every kicked request was popped, no other"
    );
    assert_eq!(
        exit.next_used, 30,
        "every popped request completed before exit"
    );
    done.extend(dev.queues[0].reap().unwrap());
    assert_eq!(done.len(), 30);
    // A new worker resumes where the old one stopped and picks up the rest by itself.
    dev.start(0, exit.next_avail, exit.next_used).unwrap();
    done.extend(dev.queues[0].wait_used(30, TIMEOUT).unwrap());
    check_all_once(&done, 60);
    for t in 0..60 {
        assert_eq!(dev.backing_read(t * 4096, 4096).unwrap(), pattern(t, 4096));
    }
    let exits = shutdown_clean(dev);
    assert_eq!((exits[0].next_avail, exits[0].next_used), (60, 60));
    assert_eq!(exits[0].stats.writes, 30);
}

#[test]
fn stop_with_io_in_flight_resumes_without_loss() {
    require_io_uring!();
    let mut dev = device_with(4 * MIB, |cfg| cfg.queue_size = 64);
    let mut base = 0u64;
    let mut resumed_with_backlog = 0;
    for round in 0..20u64 {
        let q = &mut dev.queues[0];
        add_writes(q, base..base + 32);
        publish_and_kick(q);
        add_writes(q, base + 32..base + 64);
        publish_and_kick(q);
        // Stop at once: some requests may be in flight, some not yet popped.
        let exit = dev.stop(0).expect("clean stop");
        assert_eq!(
            exit.next_avail, exit.next_used,
            "round {round}: popped but unfinished"
        );
        let mut done = dev.queues[0].reap().unwrap();
        let finished = exit
            .next_used
            .wrapping_sub(dev.queues[0].last_used().wrapping_sub(done.len() as u16));
        assert_eq!(
            usize::from(finished),
            done.len(),
            "round {round}: used ring vs exit"
        );
        let backlog = dev.queues[0].avail_idx().wrapping_sub(exit.next_avail);
        if backlog > 0 {
            resumed_with_backlog += 1;
        }
        dev.start(0, exit.next_avail, exit.next_used).unwrap();
        done.extend(
            dev.queues[0]
                .wait_used(usize::from(backlog), TIMEOUT)
                .unwrap(),
        );
        let rebased: Vec<Completion> = done
            .into_iter()
            .map(|mut c| {
                c.tag -= base;
                c
            })
            .collect();
        check_all_once(&rebased, 64);
        for t in base..base + 64 {
            assert_eq!(dev.backing_read(t * 4096, 4096).unwrap(), pattern(t, 4096));
        }
        base += 64;
        if base * 4096 >= 4 * MIB {
            base = 0;
        }
    }
    eprintln!("{resumed_with_backlog}/20 rounds stopped with requests not yet popped");
    shutdown_clean(dev);
}

/// On tmpfs every WRITE_ZEROES range fails ZERO_RANGE and is re-queued as a punch +
/// allocate pair, doubling the operations in flight behind the throttle's back.
#[test]
fn write_zeroes_fallback_with_a_full_queue() {
    require_io_uring!();
    let Some(shm) = tmpfs_dir() else {
        return;
    };
    let dev = device_with(4 * MIB, |cfg| {
        cfg.dir = Some(shm);
        cfg.queue_size = 32;
        cfg.fill_seed = Some(14);
    });
    let reqs: Vec<BlkRequest> = (0..32u64)
        .map(|r| {
            let segs: Vec<DwzSeg> = (0..16).map(|s| seg((r * 16 + s) * 16, 8, 0)).collect();
            BlkRequest::write_zeroes(&segs).indirect(true)
        })
        .collect();
    run_sixteen_range_write_zeroes(dev, reqs);
}

#[test]
fn full_queue_at_the_largest_size() {
    require_io_uring!();
    // 32768 requests in flight at once, one descriptor each (indirect): more than the
    // worker's submission queue holds, so it must submit in the middle of a drain.
    let mut dev = device_with(16 * MIB, |cfg| {
        cfg.queue_size = 32768;
        cfg.event_idx = true;
        cfg.fill_seed = Some(15);
    });
    let content = dev.backing_read(0, 16 * MIB as usize).unwrap();
    let q = &mut dev.queues[0];
    for i in 0..32768u64 {
        let c = BlkRequest::read(i, 512)
            .indirect(true)
            .tag(i)
            .chain(q.mem())
            .unwrap();
        q.add(c).unwrap();
    }
    assert_eq!(q.free_descs(), 0);
    publish_and_kick(q);
    let done = q.wait_used(32768, TIMEOUT).unwrap();
    assert_eq!(done.len(), 32768);
    for c in &done {
        assert_eq!((c.status, c.len), (Some(S_OK), 513));
        let off = c.tag as usize * 512;
        assert!(c.data == content[off..off + 512], "read {}", c.tag);
    }
    let exits = shutdown_clean(dev);
    assert_eq!(exits[0].next_used, 32768);
}

/// With a poll window the worker watches the ring with notifications off: after the first
/// request the driver finds them suppressed and need not kick, and every byte still arrives.
#[test]
fn a_polling_worker_serves_without_kicks() {
    require_io_uring!();
    for event_idx in [false, true] {
        // A window far longer than the test: the worker never parks between requests.
        let mut dev = device_with(1 << 20, |cfg| {
            cfg.event_idx = event_idx;
            cfg.poll = Duration::from_secs(5);
        });
        for i in 0..64u64 {
            let data = pattern(i, 4096);
            let c = chain(&dev, &BlkRequest::write(i * 8, &data));
            let q = &mut dev.queues[0];
            q.add(c).unwrap();
            q.publish_and_notify().unwrap();
            let done = q.wait_used(1, TIMEOUT).unwrap();
            assert_eq!(done[0].status, Some(S_OK), "write {i}");
            assert_eq!(dev.backing_read(i * 4096, 4096).unwrap(), data, "write {i}");
        }
        let (kicks, suppressed) = dev.queues[0].kick_counts();
        // The first request wakes the parked worker; with EVENT_IDX one more kick may come
        // (the avail_event of the last re-enable).
        assert!(
            kicks <= 2 && suppressed >= 62,
            "event_idx {event_idx}: {kicks} kicks, {suppressed} suppressed"
        );
        assert_serves(&mut dev, 0, 1000);
        shutdown_clean(dev);
    }
}

/// With a zero-copy area (the simulator's stand-in for VDUSE's registered umem) one-segment
/// reads and writes are io_uring fixed-buffer operations and multi-segment ones stay vectored
/// on the same memory; every byte arrives either way, and without the area nothing is fixed.
#[test]
fn zero_copy_uses_fixed_buffers_for_one_segment_and_vectors_for_more() {
    require_io_uring!();
    for zero_copy in [true, false] {
        let mut dev = device_with(1 << 20, |cfg| cfg.zero_copy = zero_copy);
        // One-segment write and read. The worker asks about zero copy after its first drain,
        // which may already have started the write the vectored way (as the request whose
        // mapping creates VDUSE's bounce region does): one or two fixed I/Os.
        assert_serves(&mut dev, 0, 1000);
        let mut one_segment = 0;
        for i in 0..16u64 {
            let data = pattern(i, 8192);
            // 0: the header alone, then the payload in one descriptor.
            let chunk = if i % 2 == 0 { 0 } else { 2048 };
            one_segment += u64::from(chunk == 0) * 2;
            let c = run_req(
                &mut dev,
                0,
                BlkRequest::write(i * 16, &data).out_chunk(chunk),
            );
            assert_eq!(c.status, Some(S_OK), "write {i}");
            let c = run_req(&mut dev, 0, BlkRequest::read(i * 16, 8192).in_chunk(chunk));
            assert_eq!(c.status, Some(S_OK), "read {i}");
            assert!(c.data == data, "read {i} returned other data");
            assert_eq!(dev.backing_read(i * 16 * 512, 8192).unwrap(), data);
        }
        let stats = shutdown_stats(dev);
        let want = if zero_copy {
            one_segment + 1..=one_segment + 2
        } else {
            0..=0
        };
        assert!(
            want.contains(&stats.fixed_ios),
            "zero_copy {zero_copy}: {} fixed-buffer I/Os, want {want:?}",
            stats.fixed_ios
        );
    }
}

/// Every finished request is counted in every stage, under its kind, and no stage's
/// quantiles exceed the total's (each span is part of the request's total).
#[test]
fn every_request_is_recorded_in_every_stage() {
    use vduse_blkd::metrics::{kind_index, Stage, STAGES};
    require_io_uring!();
    let mut dev = device_with(1 << 20, |cfg| cfg.queue_size = 64);
    for i in 0..40u64 {
        let data = pattern(i, 4096);
        // Batches of four: several requests per drain and per reap.
        for j in 0..4 {
            let c = chain(&dev, &BlkRequest::write((i * 4 + j) * 8, &data));
            dev.queues[0].add(c).unwrap();
        }
        let q = &mut dev.queues[0];
        q.publish_and_notify().unwrap();
        let done = q.wait_used(4, TIMEOUT).unwrap();
        assert!(done.iter().all(|c| c.status == Some(S_OK)));
    }
    run_req_ok(&mut dev, 0, BlkRequest::read(0, 4096), 4097);
    let stats = shutdown_stats(dev);
    let st = &stats.stages;
    for (si, stage) in STAGES.iter().enumerate() {
        let writes = st.spans[si][kind_index(vduse_blkd::blk::RequestKind::Write)].len();
        let reads = st.spans[si][kind_index(vduse_blkd::blk::RequestKind::Read)].len();
        assert_eq!((writes, reads), (160, 1), "stage {stage:?}");
    }
    let total = st.stage(Stage::Total);
    for stage in &STAGES[..5] {
        let h = st.stage(*stage);
        for q in [0.5, 0.99, 1.0] {
            let (part, all) = (h.value_at_quantile(q), total.value_at_quantile(q));
            // Two significant digits: equal values may round 1% apart.
            assert!(
                part <= all + all / 50,
                "{stage:?} q{q}: {part} ns > total {all} ns"
            );
        }
    }
    assert!(!st.drain_batch.is_empty() && !st.reap_batch.is_empty());
    assert!(
        st.drain_batch.max() >= 2,
        "batches of four never drained together"
    );
}

/// A live view gets fresh copies from running workers without stopping them, and keeps what
/// a worker counted after it stopped and another started on the same queue.
#[test]
fn a_live_view_sees_running_and_restarted_workers() {
    use vduse_blkd::worker::live::LiveStats;
    require_io_uring!();
    let live = LiveStats::new(2).unwrap();
    let mut dev = device_with(1 << 20, |cfg| {
        cfg.queues = 2;
        cfg.live = Some(std::sync::Arc::clone(&live));
    });
    let deadline = Duration::from_secs(10);
    for i in 0..10 {
        run_req_ok(&mut dev, 0, BlkRequest::read(i * 8, 4096), 4097);
    }
    run_req_ok(&mut dev, 1, BlkRequest::read(0, 4096), 4097);
    let now = live.collect(deadline);
    assert_eq!((now[0].reads, now[1].reads), (10, 1));
    assert_eq!(
        now[0].stages.stage(vduse_blkd::metrics::Stage::Total).len(),
        10
    );
    // Queue 0's worker stops and a new one starts where it left off.
    let exit = dev.stop(0).expect("clean stop");
    dev.start(0, exit.next_avail, exit.next_used).unwrap();
    run_req_ok(&mut dev, 0, BlkRequest::read(0, 4096), 4097);
    let later = live.collect(deadline);
    assert_eq!((later[0].reads, later[1].reads), (11, 1));
    shutdown_clean(dev);
    let after = live.collect(deadline);
    assert_eq!(
        (after[0].reads, after[1].reads),
        (11, 1),
        "retired counts stay"
    );
}
