//! A hostile driver against the production queue worker.
//!
//! Policy under test (src/worker/chain.rs `ChainError::corrupts_ring`, src/blk/request.rs):
//! structural corruption of the ring (descriptor loops, out-of-range indices, nested or badly
//! sized indirect tables, an avail index jump, a head posted twice while in flight) stops the
//! worker with `WorkerError::Broken`; anything else is one bad request, answered with a status
//! byte (IOERR or UNSUPP) or, when the chain has no usable status byte, with a used entry of
//! length 0, after which the worker keeps serving. Every test asserts the exact outcome, and
//! where the ring is intact, that the next valid request is served with the right data.

mod common;

use common::*;
use vduse_blkd::sim::blk::{
    header, BlkRequest, ChainBuilder, DwzSeg, POISON, S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH,
    T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES, WZ_FLAG_UNMAP,
};
use vduse_blkd::sim::device::FREE_IOVA;
use vduse_blkd::sim::memory::{PROT_NONE, PROT_RO, PROT_RW};
use vduse_blkd::sim::queue::{Desc, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use vduse_blkd::sim::{
    Chain, Completion, Indirect, Posted, QueueLayout, SimDevice, SimDeviceConfig, SimQueue,
};
use Part::{Header, Raw, Readable, Writable};

const MIB: u64 = 1 << 20;
const CAP: u64 = MIB;

/// What the driver must see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// A used entry of length 1 (status only) with this status byte.
    Status(u8),
    /// A used entry of length 0: the chain had no status byte the device could write.
    NoStatus,
}

fn dev() -> SimDevice {
    device_with(CAP, |cfg| {
        cfg.fill_seed = Some(0xbad);
        cfg.queue_size = 256;
    })
}

/// Submit `chain` on queue 0 and check the used entry's head and the exact outcome.
fn expect(dev: &mut SimDevice, chain: Chain, want: Outcome) -> Completion {
    let q = &mut dev.queues[0];
    let head = q.submit(chain).expect("submit");
    let mut done = q.wait_used(1, TIMEOUT).expect("used entry");
    assert_eq!(done.len(), 1, "exactly one used entry");
    let c = done.remove(0);
    assert!(
        c.tracked && c.head == u32::from(head),
        "used id {} for head {head}",
        c.head
    );
    match want {
        Outcome::Status(s) => assert_eq!((c.status, c.len), (Some(s), 1), "{want:?}"),
        Outcome::NoStatus => assert_eq!(c.len, 0, "{want:?}: used len"),
    }
    c
}

/// A used entry of length 1 with status `S_OK`.
const OK: Outcome = Outcome::Status(S_OK);
/// A used entry of length 1 with status `S_IOERR`.
const IOERR: Outcome = Outcome::Status(S_IOERR);
/// A used entry of length 1 with status `S_UNSUPP`.
const UNSUPP: Outcome = Outcome::Status(S_UNSUPP);

/// `expect` on a request built from content.
fn expect_req(dev: &mut SimDevice, r: BlkRequest, want: Outcome) -> Completion {
    let c = chain(dev, &r);
    expect(dev, c, want)
}

/// Submit `c` and assert that it succeeded with `len` bytes of data (used length `len + 1`).
fn expect_ok_read(d: &mut SimDevice, c: Chain, len: u32) -> Completion {
    d.queues[0].submit(c).unwrap();
    let c = d.queues[0].wait_used(1, TIMEOUT).unwrap().remove(0);
    assert_eq!((c.status, c.len), (Some(S_OK), len + 1));
    c
}

/// `expect_ok_read` on a chain built from `parts`.
fn expect_ok_read_parts(d: &mut SimDevice, parts: &[Part], len: u32) -> Completion {
    let c = chain_of(d, parts);
    expect_ok_read(d, c, len)
}

/// `expect_ok_read` on a request built from content, for all of its device-writable data.
fn expect_req_ok(d: &mut SimDevice, r: BlkRequest) -> Completion {
    let c = chain(d, &r);
    expect_ok_read(d, c, r.in_len)
}

/// `expect_req` on each request in turn, every one with the same outcome.
fn expect_each(dev: &mut SimDevice, reqs: impl IntoIterator<Item = BlkRequest>, want: Outcome) {
    for r in reqs {
        expect_req(dev, r, want);
    }
}

/// On a fresh device, run `refused` (requests the worker must refuse); then the first `len`
/// bytes of the backing file must be as they were, and the worker must still serve.
fn refused_without_writing(len: usize, refused: impl FnOnce(&mut SimDevice)) {
    let mut d = dev();
    let before = d.backing_read(0, len).unwrap();
    refused(&mut d);
    assert!(
        d.backing_read(0, len).unwrap() == before,
        "the backing file changed"
    );
    assert_serves(&mut d, 0, 8);
    finish(d);
}

/// Map `len` bytes of driver memory at `FREE_IOVA` with `prot`, filled with `POISON`.
fn map_poisoned(dev: &SimDevice, len: u64, prot: i32) {
    dev.mem.add_region(FREE_IOVA, len, prot).unwrap();
    dev.mem.fill(FREE_IOVA, len as usize, POISON).unwrap();
}

/// The driver's memory at `[addr, addr + len)` still holds only `POISON`: nothing wrote there.
fn assert_poisoned(dev: &SimDevice, addr: u64, len: usize) {
    let bytes = dev.mem.read_vec(addr, len).unwrap();
    assert!(
        bytes.iter().all(|&x| x == POISON),
        "{len} bytes at {addr:#x}"
    );
}

/// The worker ends on its own with `Broken` naming `why`, and publishes nothing more.
fn expect_broken(dev: &mut SimDevice, why: &str) {
    assert_broken(dev, 0, why);
    let late = dev.queues[0].reap().unwrap();
    assert!(
        late.is_empty(),
        "used entries after the ring broke: {late:?}"
    );
}

/// Submit `chain`, then expect the worker to break for `why` (see `expect_broken`).
fn submit_expecting_broken(dev: &mut SimDevice, chain: Chain, why: &str) {
    dev.queues[0].submit(chain).unwrap();
    expect_broken(dev, why);
}

/// Post a raw head (tracked with no buffers to free), publish, kick.
fn post_head(dev: &mut SimDevice, head: u16, descs: Vec<u16>) {
    let q = &mut dev.queues[0];
    q.add_head(
        head,
        Some(Posted {
            descs,
            ..Default::default()
        }),
    )
    .unwrap();
    publish_and_kick(q);
}

/// Write `n` fresh table slots by hand, each naming a 16-byte `t` header with NEXT set and
/// linking to `next(slots, i)`, and post the first as a head.
fn post_linked_headers(dev: &mut SimDevice, t: u32, n: usize, next: impl Fn(&[u16], usize) -> u16) {
    let h = dev.mem.alloc_bytes(&header(t, 0)).unwrap();
    let q = &mut dev.queues[0];
    let slots = q.alloc_descs(n).unwrap();
    for (i, &slot) in slots.iter().enumerate() {
        q.write_desc(slot, h, 16, DESC_F_NEXT, next(&slots, i))
            .unwrap();
    }
    post_head(dev, slots[0], slots);
}

/// On a device that has served a request, store the avail index `to(current)` raw and kick:
/// the worker must break on the avail ring.
fn expect_avail_idx_to_break(to: impl FnOnce(u16) -> u16) {
    let mut d = dev();
    assert_serves(&mut d, 0, 8);
    let q = &mut d.queues[0];
    let idx = q.avail_idx();
    q.set_avail_idx_raw(to(idx)).unwrap();
    q.kick().unwrap();
    expect_broken(&mut d, "avail ring");
}

/// One descriptor of a hand-built chain.
#[derive(Debug, Clone, Copy)]
enum Part<'a> {
    /// A device-readable heap buffer holding the header of a request of this type and sector.
    Header(u32, u64),
    /// A device-readable heap buffer holding these bytes.
    Readable(&'a [u8]),
    /// A device-writable heap buffer of this many bytes, filled with `POISON`.
    Writable(u32),
    /// This descriptor as given: no buffer is allocated for it.
    Raw(Desc),
}

/// The usual status byte: a one-byte device-writable heap buffer.
const STATUS: Part<'static> = Writable(1);

/// A direct chain of `parts`, in order, with its buffers allocated from the heap.
fn chain_of(dev: &SimDevice, parts: &[Part]) -> Chain {
    let mut b = ChainBuilder::new(&dev.mem);
    for part in parts {
        b = match *part {
            Header(t, sector) => b.readable(&header(t, sector)),
            Readable(bytes) => b.readable(bytes),
            Writable(len) => b.writable(len),
            Raw(desc) => Ok(b.desc(desc)),
        }
        .expect("heap allocation");
    }
    b.build()
}

/// A request of type `t` at `sector` whose data buffer is `data` as given, between a heap
/// header and a heap status byte.
fn raw_data_request(t: u32, sector: u64, data: Desc) -> [Part<'static>; 3] {
    [Header(t, sector), Raw(data), STATUS]
}

/// `chain` posted through an indirect table allocated from the heap.
fn via_indirect_table(chain: Chain) -> Chain {
    Chain {
        indirect: Indirect::Table,
        ..chain
    }
}

/// A chain that is one indirect descriptor naming `len` bytes at `addr`, with nothing
/// written there.
fn raw_indirect(addr: u64, len: u32) -> Chain {
    Chain {
        indirect: Indirect::Raw { addr, len },
        ..Chain::default()
    }
}

/// `expect` on a chain built from `parts`.
fn expect_parts(dev: &mut SimDevice, parts: &[Part], want: Outcome) -> Completion {
    let c = chain_of(dev, parts);
    expect(dev, c, want)
}

fn finish(dev: SimDevice) {
    let exits = shutdown_clean(dev);
    assert!(exits[0].next_avail == exits[0].next_used);
}

// ---------------------------------------------------------------------------------------
// The header
// ---------------------------------------------------------------------------------------

#[test]
fn header_too_short_is_ioerr() {
    require_io_uring!();
    let mut d = dev();
    expect_parts(&mut d, &[Readable(&header(T_IN, 0)[..15]), STATUS], IOERR);
    // No readable descriptor at all.
    expect_parts(&mut d, &[STATUS], IOERR);
    assert_serves(&mut d, 0, 8);
    finish(d);
}

#[test]
fn header_split_oddly_across_descriptors_is_served() {
    require_io_uring!();
    let mut d = dev();
    // 7-byte pieces: the header spans three descriptors, the last shared with data.
    let data = pattern(1, 1024);
    let c = expect_req(&mut d, BlkRequest::write(16, &data).out_chunk(7), OK);
    assert_eq!(c.len, 1);
    assert_eq!(d.backing_read(16 * 512, 1024).unwrap(), data);
    // One byte per descriptor, then the data.
    let hdr = header(T_IN, 16);
    let mut parts: Vec<Part> = hdr.chunks(1).map(Readable).collect();
    parts.extend([Writable(1024), STATUS]);
    assert_eq!(expect_ok_read_parts(&mut d, &parts, 1024).data, data);
    finish(d);
}

#[test]
fn header_in_a_device_writable_descriptor_is_ioerr() {
    require_io_uring!();
    let mut d = dev();
    let c = chain_of(&d, &[Writable(16), Writable(512), STATUS]);
    d.mem.write(c.descs[0].addr, &header(T_IN, 0)).unwrap();
    let c = expect(&mut d, c, IOERR);
    assert!(
        c.data[16..].iter().all(|&x| x == POISON),
        "no data was read"
    );
    assert_serves(&mut d, 0, 8);
    finish(d);
}

#[test]
fn header_at_an_unmapped_iova_is_ioerr() {
    require_io_uring!();
    let mut d = dev();
    expect_parts(
        &mut d,
        &[Raw(Desc::readable(FREE_IOVA + 0x10_0000, 16)), STATUS],
        IOERR,
    );
    assert_serves(&mut d, 0, 8);
    finish(d);
}

// ---------------------------------------------------------------------------------------
// The status byte
// ---------------------------------------------------------------------------------------

#[test]
fn status_descriptor_read_only_gets_no_status() {
    require_io_uring!();
    let mut d = dev();
    // IN whose last descriptor (the would-be status) is device-readable.
    let c = chain_of(&d, &[Header(T_IN, 0), Writable(512), Readable(&[POISON])]);
    let status_addr = c.descs[2].addr;
    let c = expect(&mut d, c, Outcome::NoStatus);
    assert_eq!(
        d.mem.read_vec(status_addr, 1).unwrap(),
        [POISON],
        "device wrote a readable buffer"
    );
    assert!(c.data.iter().all(|&x| x == POISON), "no data was read");
    // FLUSH whose only status candidate is readable.
    expect_parts(
        &mut d,
        &[Header(T_FLUSH, 0), Readable(&[POISON])],
        Outcome::NoStatus,
    );
    assert_serves(&mut d, 0, 8);
    finish(d);
}

#[test]
fn readable_descriptor_after_the_status_gets_no_status() {
    require_io_uring!();
    let mut d = dev();
    let c = chain_of(&d, &[Header(T_FLUSH, 0), Writable(1), Readable(&[0x77])]);
    let writable = c.descs[1].addr;
    let tail = c.descs[2].addr;
    expect(&mut d, c, Outcome::NoStatus);
    assert_eq!(d.mem.read_vec(tail, 1).unwrap(), [0x77]);
    assert_eq!(d.mem.read_vec(writable, 1).unwrap(), [POISON]);
    assert_serves(&mut d, 0, 8);
    finish(d);
}

#[test]
fn status_descriptor_zero_length_gets_used_len_zero() {
    require_io_uring!();
    let mut d = dev();
    let empty = Raw(Desc::writable(0, 0));
    expect_parts(&mut d, &[Header(T_FLUSH, 0), empty], Outcome::NoStatus);
    let read = [Header(T_IN, 0), Writable(512), empty];
    expect_parts(&mut d, &read, Outcome::NoStatus);
    // A write with nowhere to report its outcome must not reach the backing file.
    let before = d.backing_read(4096, 512).unwrap();
    let write = [Header(T_OUT, 8), Readable(&[0xa5; 512]), empty];
    expect_parts(&mut d, &write, Outcome::NoStatus);
    assert_eq!(
        d.backing_read(4096, 512).unwrap(),
        before,
        "unanswerable write was executed"
    );
    assert_serves(&mut d, 0, 16);
    let stats = shutdown_stats(d);
    assert_eq!(stats.unanswerable, 3);
    assert_eq!(stats.writes, 1, "only assert_serves's write ran");
}

#[test]
fn status_byte_in_read_only_memory_gets_used_len_zero() {
    require_io_uring!();
    let mut d = dev();
    d.mem.add_region(FREE_IOVA, 4096, PROT_RO).unwrap();
    d.mem.write(FREE_IOVA, &[POISON]).unwrap();
    let flush = [Header(T_FLUSH, 0), Raw(Desc::writable(FREE_IOVA, 1))];
    let c = expect_parts(&mut d, &flush, Outcome::NoStatus);
    assert_eq!(c.status, Some(POISON), "read-only memory changed");
    assert_serves(&mut d, 0, 8);
    finish(d);
}

#[test]
fn status_byte_outside_every_region_gets_used_len_zero() {
    require_io_uring!();
    let mut d = dev();
    let unmapped = Desc::writable(FREE_IOVA + 0x1234, 1);
    let read = [Header(T_IN, 0), Writable(512), Raw(unmapped)];
    expect_parts(&mut d, &read, Outcome::NoStatus);
    assert_serves(&mut d, 0, 8);
    finish(d);
}

// ---------------------------------------------------------------------------------------
// Direction, range and size of the data
// ---------------------------------------------------------------------------------------

#[test]
fn in_with_device_readable_data_is_ioerr() {
    require_io_uring!();
    let into_readable = [Header(T_IN, 0), Readable(&[1u8; 512]), STATUS];
    refused_without_writing(4096, |d| {
        expect_parts(d, &into_readable, IOERR);
    });
}

#[test]
fn out_with_device_writable_data_is_ioerr() {
    require_io_uring!();
    refused_without_writing(4096, |d| {
        let c = expect_parts(d, &[Header(T_OUT, 0), Writable(512), STATUS], IOERR);
        assert!(c.data.iter().all(|&x| x == POISON));
    });
}

#[test]
fn flush_or_get_id_with_wrong_data_is_ioerr() {
    require_io_uring!();
    let mut d = dev();
    let flush_carrying_data = [Header(T_FLUSH, 0), Readable(&[0u8; 512]), STATUS];
    expect_parts(&mut d, &flush_carrying_data, IOERR);
    let flush_asking_for_data = [Header(T_FLUSH, 0), Writable(512), STATUS];
    expect_parts(&mut d, &flush_asking_for_data, IOERR);
    let get_id_carrying_data = [
        Header(T_GET_ID, 0),
        Readable(&[0u8; 20]),
        Writable(20),
        STATUS,
    ];
    expect_parts(&mut d, &get_id_carrying_data, IOERR);
    assert_serves(&mut d, 0, 8);
    finish(d);
}

#[test]
fn sector_past_capacity_is_ioerr() {
    require_io_uring!();
    let mut d = dev();
    let last = CAP / 512;
    let before = d.backing_read(CAP - 4096, 4096).unwrap();
    let past_the_end = [
        BlkRequest::read(last, 512),
        BlkRequest::read(last - 1, 1024),
        BlkRequest::read(u64::MAX / 512, 512),
        BlkRequest::write(last, &[1; 512]),
        BlkRequest::write(last - 1, &[1; 1024]),
    ];
    expect_each(&mut d, past_the_end, IOERR);
    assert_eq!(d.backing_read(CAP - 4096, 4096).unwrap(), before);
    // Exactly up to the end is fine.
    expect_req_ok(&mut d, BlkRequest::read(last - 2, 1024));
    assert_serves(&mut d, 0, 8);
    finish(d);
}

#[test]
fn sector_times_512_plus_length_overflowing_u64_is_ioerr() {
    require_io_uring!();
    let mut d = dev();
    let s = u64::MAX / 512;
    let overflowing = [
        // sector * 512 overflows.
        BlkRequest::read(u64::MAX / 256, 512),
        BlkRequest::write(1 << 55, &[1; 512]),
        // sector * 512 fits, + length overflows.
        BlkRequest::read(s, 4096),
        BlkRequest::write_zeroes(&[seg(s, 8, 0)]),
    ];
    expect_each(&mut d, overflowing, IOERR);
    assert_serves(&mut d, 0, 8);
    finish(d);
}

#[test]
fn length_not_a_multiple_of_512_is_ioerr() {
    require_io_uring!();
    refused_without_writing(4096, |d| {
        let c = expect_req(d, BlkRequest::read(0, 100), IOERR);
        assert!(c.data.iter().all(|&x| x == POISON));
        let ragged = [
            BlkRequest::read(0, 513),
            BlkRequest::write(0, &[3; 513]),
            BlkRequest::write(0, &[3; 1]),
        ];
        expect_each(d, ragged, IOERR);
    });
}

#[test]
fn unknown_request_type_is_unsupp() {
    require_io_uring!();
    let mut d = dev();
    let unknown = [2u32, 3, 5, 9, 12, 99, u32::MAX].map(|t| BlkRequest::new(t, 0));
    expect_each(&mut d, unknown, UNSUPP);
    // With data attached, still UNSUPP.
    let mut r = BlkRequest::new(99, 0);
    r.in_len = 512;
    expect_req(&mut d, r, UNSUPP);
    assert_serves(&mut d, 0, 8);
    assert_eq!(shutdown_stats(d).errors, 8);
}

#[test]
fn zero_length_descriptors_are_skipped() {
    require_io_uring!();
    let mut d = dev();
    let data = pattern(2, 1024);
    let write = [
        Raw(Desc::readable(0, 0)),
        Header(T_OUT, 4),
        Raw(Desc::readable(0, 0)),
        Readable(&data[..512]),
        Raw(Desc::readable(FREE_IOVA, 0)),
        Readable(&data[512..]),
        Raw(Desc::writable(0, 0)),
        STATUS,
    ];
    expect_parts(&mut d, &write, OK);
    assert_eq!(d.backing_read(4 * 512, 1024).unwrap(), data);
    let read = [
        Header(T_IN, 4),
        Raw(Desc::writable(0, 0)),
        Writable(1024),
        Raw(Desc::writable(FREE_IOVA, 0)),
        STATUS,
    ];
    let c = expect_ok_read_parts(&mut d, &read, 1024);
    assert_eq!(c.data, data);
    finish(d);
}

#[test]
fn four_gib_descriptors_are_refused_without_touching_anything() {
    require_io_uring!();
    // 8 GiB sparse device, so capacity is not what refuses a 4 GiB transfer.
    let mut d = device_with(8 << 30, |cfg| cfg.queue_size = 16);
    map_poisoned(&d, 64 << 10, PROT_RW);
    // IN into len = u32::MAX: not a multiple of 512.
    let huge = Desc::writable(FREE_IOVA, u32::MAX);
    expect_parts(&mut d, &raw_data_request(T_IN, 0, huge), IOERR);
    // IN and OUT of 4 GiB - 512 whose buffer is mapped for its first 64 KiB only.
    let big = u32::MAX - 511;
    let into_big = Desc::writable(FREE_IOVA, big);
    expect_parts(&mut d, &raw_data_request(T_IN, 0, into_big), IOERR);
    assert_poisoned(&d, FREE_IOVA, 64 << 10);
    let from_big = Desc::readable(FREE_IOVA, big);
    expect_parts(&mut d, &raw_data_request(T_OUT, 0, from_big), IOERR);
    assert!(d.is_hole(0, 8 << 30).unwrap(), "nothing was written");
    // A FLUSH whose header descriptor is 4 GiB long: data where none is allowed.
    d.mem.write(FREE_IOVA, &header(T_FLUSH, 0)).unwrap();
    expect_parts(
        &mut d,
        &[Raw(Desc::readable(FREE_IOVA, u32::MAX)), STATUS],
        IOERR,
    );
    assert_serves(&mut d, 0, 8);
    finish(d);
}

#[test]
fn too_many_data_segments_is_ioerr() {
    require_io_uring!();
    // 1025 segments is one more than a readv takes (IOV_MAX).
    refused_without_writing(1025 * 512, |d| {
        let r = BlkRequest::read(0, 1025 * 512).in_chunk(512).indirect(true);
        let c = expect_req(d, r, IOERR);
        assert!(c.data.iter().all(|&x| x == POISON));
        let data = pattern(3, 1025 * 512);
        let r = BlkRequest::write(0, &data).out_chunk(512).indirect(true);
        expect_req(d, r, IOERR);
    });
}

// ---------------------------------------------------------------------------------------
// DISCARD, WRITE_ZEROES, GET_ID
// ---------------------------------------------------------------------------------------

/// A DISCARD or WRITE_ZEROES request (`t`) carrying `payload` as its segment list.
fn dwz(t: u32, payload: &[u8]) -> BlkRequest {
    let mut r = BlkRequest::new(t, 0);
    r.out = payload.to_vec();
    r
}

#[test]
fn dwz_bad_segment_count_is_ioerr() {
    require_io_uring!();
    let one = DwzSeg::payload(&[seg(0, 8, 0)]);
    let mut partial = one.clone();
    partial.extend_from_slice(&one[..8]);
    let seventeen = DwzSeg::payload(&vec![seg(0, 8, 0); 17]);
    let mut reqs = Vec::new();
    for t in [T_DISCARD, T_WRITE_ZEROES] {
        for payload in [&[][..], &one[..8], &partial, &seventeen] {
            reqs.push(dwz(t, payload));
        }
    }
    refused_without_writing(CAP as usize, |d| expect_each(d, reqs, IOERR));
}

#[test]
fn dwz_bad_flags_are_unsupp() {
    require_io_uring!();
    // UNMAP is a WRITE_ZEROES flag only; any reserved bit is refused for both.
    let cases = [
        (T_DISCARD, WZ_FLAG_UNMAP),
        (T_DISCARD, 2),
        (T_WRITE_ZEROES, 2),
        (T_WRITE_ZEROES, WZ_FLAG_UNMAP | 0x8000_0000),
    ];
    // The bad flags sit in the second of two segments: nothing at all may be done.
    let reqs = cases.map(|(t, flags)| dwz(t, &DwzSeg::payload(&[seg(0, 8, 0), seg(64, 8, flags)])));
    refused_without_writing(CAP as usize, |d| expect_each(d, reqs, UNSUPP));
}

#[test]
fn dwz_range_past_capacity_or_empty_is_ioerr() {
    require_io_uring!();
    let last = CAP / 512;
    let mut reqs = Vec::new();
    for t in [T_DISCARD, T_WRITE_ZEROES] {
        for bad in [
            seg(last, 1, 0),
            seg(last - 4, 8, 0),
            seg(0, 0, 0),
            seg(0, u32::MAX, 0),
        ] {
            reqs.push(dwz(t, &DwzSeg::payload(&[seg(0, 8, 0), bad])));
        }
    }
    refused_without_writing(CAP as usize, |d| expect_each(d, reqs, IOERR));
}

#[test]
fn get_id_with_a_short_buffer_is_ioerr() {
    require_io_uring!();
    let mut d = dev();
    let mut r = BlkRequest::get_id();
    r.in_len = 19;
    let c = expect_req(&mut d, r, IOERR);
    assert!(c.data.iter().all(|&x| x == POISON), "nothing written");
    // No buffer at all.
    expect_req(&mut d, BlkRequest::new(T_GET_ID, 0), IOERR);
    assert_serves(&mut d, 0, 8);
    finish(d);
}

#[test]
fn get_id_into_read_only_memory_is_ioerr() {
    require_io_uring!();
    let mut d = dev();
    d.mem.add_region(FREE_IOVA, 4096, PROT_RO).unwrap();
    d.mem.fill(FREE_IOVA, 20, POISON).unwrap();
    let read_only = Desc::writable(FREE_IOVA, 20);
    expect_parts(&mut d, &raw_data_request(T_GET_ID, 0, read_only), IOERR);
    assert_eq!(d.mem.read_vec(FREE_IOVA, 20).unwrap(), vec![POISON; 20]);
    assert_serves(&mut d, 0, 8);
    finish(d);
}

#[test]
fn writes_to_a_read_only_device_are_ioerr() {
    require_io_uring!();
    let mut d = device_with(CAP, |cfg| {
        cfg.read_only = true;
        cfg.fill_seed = Some(77);
    });
    let before = d.backing_read(0, CAP as usize).unwrap();
    let blocks = d.allocated_blocks().unwrap();
    let writes = [
        BlkRequest::write(0, &[1; 4096]),
        BlkRequest::discard(&[seg(0, 128, 0)]),
        BlkRequest::write_zeroes(&[seg(0, 128, 0)]),
        BlkRequest::write_zeroes(&[seg(0, 128, WZ_FLAG_UNMAP)]),
    ];
    expect_each(&mut d, writes, IOERR);
    assert!(
        d.backing_read(0, CAP as usize).unwrap() == before,
        "backing file changed"
    );
    assert_eq!(d.allocated_blocks().unwrap(), blocks);
    // Reads, FLUSH and GET_ID still work.
    let c = expect_req_ok(&mut d, BlkRequest::read(0, 4096));
    assert!(c.data == before[..4096]);
    expect_req(&mut d, BlkRequest::flush(), OK);
    run_req_ok(&mut d, 0, BlkRequest::get_id(), 21);
    assert_eq!(shutdown_stats(d).errors, 4);
}

// ---------------------------------------------------------------------------------------
// Memory: unmapped, split across regions, read-only
// ---------------------------------------------------------------------------------------

#[test]
fn data_outside_every_mapped_region_is_ioerr() {
    require_io_uring!();
    let mut d = dev();
    let before = d.backing_read(0, 4096).unwrap();
    let hole = FREE_IOVA + 0x4000_0000;
    expect_parts(
        &mut d,
        &raw_data_request(T_IN, 0, Desc::writable(hole, 4096)),
        IOERR,
    );
    expect_parts(
        &mut d,
        &raw_data_request(T_OUT, 0, Desc::readable(hole, 4096)),
        IOERR,
    );
    // Partly mapped: the first half in the heap region's last page, the rest past its end.
    d.mem.add_region(FREE_IOVA, 4096, PROT_RW).unwrap();
    let straddling = Desc::writable(FREE_IOVA + 2048, 4096);
    expect_parts(&mut d, &raw_data_request(T_IN, 0, straddling), IOERR);
    assert_eq!(d.backing_read(0, 4096).unwrap(), before);
    // The address space's very end: iova + len wraps.
    let wrapping = Desc::writable(u64::MAX - 511, 1024);
    expect_parts(&mut d, &raw_data_request(T_IN, 0, wrapping), IOERR);
    assert_serves(&mut d, 0, 8);
    finish(d);
}

#[test]
fn a_descriptor_across_a_region_boundary_is_split_and_served() {
    require_io_uring!();
    let mut d = dev();
    // Map the heap first, so that only the new regions are looked up below.
    assert_serves(&mut d, 0, 8);
    // Three adjacent regions A | B | C.
    let a = FREE_IOVA;
    let b = FREE_IOVA + 0x1000;
    let c = FREE_IOVA + 0x2000;
    for r in [a, b, c] {
        d.mem.add_region(r, 0x1000, PROT_RW).unwrap();
    }
    let lookups = d.mem.lookups();
    // The header across A | B (8 bytes in each), the data across B | C.
    d.mem.write(b - 8, &header(T_OUT, 32)).unwrap();
    let data = pattern(4, 2048);
    d.mem.write(c - 1024, &data).unwrap();
    let write = [
        Raw(Desc::readable(b - 8, 16)),
        Raw(Desc::readable(c - 1024, 2048)),
        STATUS,
    ];
    expect_parts(&mut d, &write, OK);
    assert_eq!(d.backing_read(32 * 512, 2048).unwrap(), data);
    assert_eq!(d.mem.lookups() - lookups, 3, "each region mapped once");
    // Read back into a buffer that spans the boundary the other way round.
    d.mem.fill(b - 512, 2048, POISON).unwrap();
    let read = raw_data_request(T_IN, 32, Desc::writable(b - 512, 2048));
    let c = expect_ok_read_parts(&mut d, &read, 2048);
    assert_eq!(c.data, data);
    assert_eq!(d.mem.read_vec(b - 512, 2048).unwrap(), data);
    finish(d);
}

#[test]
fn in_buffer_in_read_only_memory_is_ioerr() {
    require_io_uring!();
    let mut d = dev();
    map_poisoned(&d, 0x2000, PROT_RO);
    let read_only = Desc::writable(FREE_IOVA, 4096);
    expect_parts(&mut d, &raw_data_request(T_IN, 0, read_only), IOERR);
    assert_poisoned(&d, FREE_IOVA, 0x2000);
    // The device may read read-only memory: OUT from it works.
    let data = pattern(5, 4096);
    d.mem.write(FREE_IOVA, &data).unwrap();
    let from_read_only = Desc::readable(FREE_IOVA, 4096);
    expect_parts(&mut d, &raw_data_request(T_OUT, 8, from_read_only), OK);
    assert_eq!(d.backing_read(8 * 512, 4096).unwrap(), data);
    finish(d);
}

#[test]
fn buffers_in_no_access_memory_are_ioerr() {
    require_io_uring!();
    refused_without_writing(4096, |d| {
        d.mem.add_region(FREE_IOVA, 0x1000, PROT_NONE).unwrap();
        let no_access = Desc::readable(FREE_IOVA, 4096);
        expect_parts(d, &raw_data_request(T_OUT, 0, no_access), IOERR);
        let no_access_header = Desc::readable(FREE_IOVA, 16);
        expect_parts(d, &[Raw(no_access_header), STATUS], IOERR);
    });
}

// ---------------------------------------------------------------------------------------
// Indirect tables
// ---------------------------------------------------------------------------------------

#[test]
fn indirect_table_at_an_unmapped_iova_gets_used_len_zero() {
    require_io_uring!();
    let mut d = dev();
    expect(
        &mut d,
        raw_indirect(FREE_IOVA + 0x10_0000, 48),
        Outcome::NoStatus,
    );
    // In no-access memory: the same.
    d.mem.add_region(FREE_IOVA, 0x1000, PROT_NONE).unwrap();
    expect(&mut d, raw_indirect(FREE_IOVA, 48), Outcome::NoStatus);
    assert_serves(&mut d, 0, 8);
    assert_eq!(shutdown_stats(d).unanswerable, 2);
}

#[test]
fn indirect_table_with_a_bad_length_breaks_the_device() {
    require_io_uring!();
    for len in [0u32, 24, 17 * 1024 * 1024] {
        let mut d = dev();
        let table = d.mem.alloc(64, 16).unwrap();
        submit_expecting_broken(&mut d, raw_indirect(table, len), "indirect table length");
    }
}

#[test]
fn indirect_table_inside_an_indirect_table_breaks_the_device() {
    require_io_uring!();
    let mut d = dev();
    let inner = chain_of(&d, &[Header(T_FLUSH, 0), STATUS]);
    // The outer table's only entry is itself an indirect descriptor.
    let inner_table = d.mem.alloc(32, 16).unwrap();
    for (i, x) in inner.descs.iter().enumerate() {
        let flags = x.flags | if i == 0 { DESC_F_NEXT } else { 0 };
        d.mem
            .write(
                inner_table + 16 * i as u64,
                &Desc::encode(x.addr, x.len, flags, 1),
            )
            .unwrap();
    }
    let outer = Desc {
        addr: inner_table,
        len: 32,
        flags: DESC_F_INDIRECT,
        next: Some(0),
    };
    let c = via_indirect_table(chain_of(&d, &[Raw(outer)]));
    submit_expecting_broken(&mut d, c, "indirect table inside an indirect table");
}

#[test]
fn indirect_descriptor_loop_breaks_the_device() {
    require_io_uring!();
    let mut d = dev();
    let h = d.mem.alloc_bytes(&header(T_FLUSH, 0)).unwrap();
    let to = |next| {
        Raw(Desc {
            addr: h,
            len: 16,
            flags: DESC_F_NEXT,
            next: Some(next),
        })
    };
    let c = via_indirect_table(chain_of(&d, &[to(1), to(0)]));
    submit_expecting_broken(&mut d, c, "loop");
}

#[test]
fn indirect_next_index_out_of_range_breaks_the_device() {
    require_io_uring!();
    let mut d = dev();
    let mut c = via_indirect_table(chain_of(&d, &[Header(T_FLUSH, 0), STATUS]));
    // Two entries; the first names entry 2.
    c.descs[0].next = Some(2);
    c.descs[0].flags |= DESC_F_NEXT;
    submit_expecting_broken(&mut d, c, "next index 2");
}

#[test]
fn indirect_chain_longer_than_the_queue_is_served() {
    require_io_uring!();
    // The spec forbids chains longer than the queue, but an indirect table is bounded by its
    // own length; the worker accepts it (as QEMU does), up to IOV_MAX data segments.
    let mut d = device(8, false);
    let data = pattern(6, 32 * 512);
    let r = BlkRequest::write(0, &data).out_chunk(512).indirect(true);
    expect_req(&mut d, r, OK);
    let r = BlkRequest::read(0, 32 * 512).in_chunk(512).indirect(true);
    let c = expect_req_ok(&mut d, r);
    assert_eq!(c.data, data);
    finish(d);
}

// ---------------------------------------------------------------------------------------
// The descriptor table and the avail ring
// ---------------------------------------------------------------------------------------

#[test]
fn direct_descriptor_loop_breaks_the_device() {
    require_io_uring!();
    let mut d = dev();
    post_linked_headers(&mut d, T_FLUSH, 2, |slots, i| slots[1 - i]);
    expect_broken(&mut d, "loop");
}

#[test]
fn descriptor_pointing_at_itself_breaks_the_device() {
    require_io_uring!();
    let mut d = dev();
    post_linked_headers(&mut d, T_FLUSH, 1, |slots, _| slots[0]);
    expect_broken(&mut d, "loop");
}

#[test]
fn chain_longer_than_the_queue_breaks_the_device() {
    require_io_uring!();
    // Every descriptor of an 8-entry table in one chain, and then back to the start.
    let mut d = device(8, false);
    post_linked_headers(&mut d, T_OUT, 8, |slots, i| slots[(i + 1) % 8]);
    expect_broken(&mut d, "loop");
}

#[test]
fn chain_exactly_as_long_as_the_queue_is_served() {
    require_io_uring!();
    let mut d = device(8, false);
    let data = pattern(7, 3072);
    let r = BlkRequest::write(2, &data).out_chunk(512);
    assert_eq!(r.desc_count(), 8);
    expect_req(&mut d, r, OK);
    assert_eq!(d.queues[0].free_descs(), 8);
    assert_eq!(d.backing_read(1024, 3072).unwrap(), data);
    finish(d);
}

#[test]
fn next_index_out_of_range_breaks_the_device() {
    require_io_uring!();
    let mut d = dev();
    post_linked_headers(&mut d, T_FLUSH, 1, |_, _| 256);
    expect_broken(&mut d, "next index 256");
}

#[test]
fn head_index_out_of_range_breaks_the_device() {
    require_io_uring!();
    let mut d = dev();
    let q = &mut d.queues[0];
    q.add_head(256, None).unwrap();
    publish_and_kick(q);
    expect_broken(&mut d, "head index 256");
}

#[test]
fn avail_idx_jumping_by_more_than_the_queue_size_breaks_the_device() {
    require_io_uring!();
    expect_avail_idx_to_break(|idx| idx.wrapping_add(257));
}

#[test]
fn avail_idx_jumping_by_exactly_the_queue_size_is_served() {
    require_io_uring!();
    // A full ring of the same valid head is legal only if it is not in flight; here the
    // chains are all distinct FLUSH requests, the largest jump a driver may make.
    let mut d = device(4, false);
    for _ in 0..4 {
        let c = chain(&d, &BlkRequest::flush().indirect(true));
        d.queues[0].add(c).unwrap();
    }
    publish_and_kick(&mut d.queues[0]);
    let done = d.queues[0].wait_used(4, TIMEOUT).unwrap();
    assert!(done.iter().all(|c| c.status == Some(S_OK) && c.len == 1));
    assert_serves(&mut d, 0, 8);
    finish(d);
}

#[test]
fn same_head_posted_twice_while_in_flight_breaks_the_device() {
    require_io_uring!();
    let mut d = dev();
    let c = chain(&d, &BlkRequest::read(0, 4096));
    let q = &mut d.queues[0];
    let head = q.add(c).unwrap();
    // The read is submitted to io_uring within the same drain that finds the second copy.
    q.add_head(head, None).unwrap();
    publish_and_kick(q);
    expect_broken(&mut d, &format!("head {head} posted again while in flight"));
}

#[test]
fn same_head_posted_again_after_completion_is_served() {
    require_io_uring!();
    let mut d = dev();
    let c = chain(&d, &BlkRequest::flush());
    let mut first = c.clone();
    first.allocs.clear(); // the buffers are freed once, with the second completion
    let q = &mut d.queues[0];
    let head = q.add(first).unwrap();
    publish_and_kick(q);
    let done = q.wait_used(1, TIMEOUT).unwrap();
    assert_eq!(done[0].status, Some(S_OK));
    // The driver reposts the same descriptors (it got them back).
    let again = q.add(c).unwrap();
    assert_eq!(again, head);
    publish_and_kick(q);
    let done = q.wait_used(1, TIMEOUT).unwrap();
    assert_eq!(
        (done[0].head, done[0].status),
        (u32::from(head), Some(S_OK))
    );
    assert_serves(&mut d, 0, 8);
    finish(d);
}

/// A device with one 16-entry queue whose worker is not started yet.
fn unstarted() -> SimDevice {
    let mut cfg = SimDeviceConfig::new(CAP);
    cfg.queue_size = 16;
    SimDevice::create(cfg).unwrap()
}

/// Give a created (not yet started) device a queue 0 of `size` entries at `layout`, start
/// its worker, and expect it to stop with `Broken` naming `why`.
fn start_expecting_broken(mut d: SimDevice, size: u16, layout: QueueLayout, why: &str) {
    d.queues[0] = SimQueue::new(d.mem.clone(), 0, size, layout, false)
        .expect("driver can write its own rings");
    d.start(0, 0, 0).unwrap();
    assert_broken(&mut d, 0, why);
}

#[test]
fn rings_in_unusable_memory_break_the_device_at_start() {
    require_io_uring!();
    // Used ring in read-only memory: the device cannot publish anything.
    let d = unstarted();
    d.mem.add_region(FREE_IOVA, 0x1000, PROT_RO).unwrap();
    let mut layout = d.queues[0].layout();
    layout.used = FREE_IOVA;
    start_expecting_broken(d, 16, layout, "ring area not mapped");
    // Avail ring in memory the device may not access at all.
    let d = unstarted();
    d.mem.add_region(FREE_IOVA, 0x1000, PROT_NONE).unwrap();
    let mut layout = d.queues[0].layout();
    layout.avail = FREE_IOVA;
    start_expecting_broken(d, 16, layout, "ring area not mapped");
}

#[test]
fn device_writable_flag_on_an_indirect_descriptor_is_ignored_safely() {
    require_io_uring!();
    // INDIRECT | WRITE is forbidden for drivers; the table is still only read.
    let mut d = dev();
    let c = via_indirect_table(chain_of(&d, &[Header(T_FLUSH, 0), STATUS]));
    let q = &mut d.queues[0];
    let head = q.add(c).unwrap();
    let table = q
        .mem()
        .read_vec(q.layout().desc + 16 * u64::from(head), 16)
        .unwrap();
    let addr = u64::from_le_bytes(table[0..8].try_into().unwrap());
    q.write_desc(head, addr, 32, DESC_F_INDIRECT | DESC_F_WRITE, 0)
        .unwrap();
    publish_and_kick(q);
    let done = q.wait_used(1, TIMEOUT).unwrap();
    assert_eq!((done[0].status, done[0].len), (Some(S_OK), 1));
    assert_serves(&mut d, 0, 8);
    finish(d);
}

#[test]
fn avail_idx_moving_backwards_breaks_the_device() {
    require_io_uring!();
    expect_avail_idx_to_break(|idx| idx.wrapping_sub(1));
}

#[test]
fn broken_ring_waits_for_io_in_flight() {
    require_io_uring!();
    let mut d = dev();
    // Ten valid reads, then a looping chain, in one batch: the reads are already queued to
    // io_uring when the loop is found.
    for i in 0..10 {
        let c = chain(&d, &BlkRequest::read(i * 8, 4096));
        d.queues[0].add(c).unwrap();
    }
    post_linked_headers(&mut d, T_FLUSH, 1, |slots, _| slots[0]);
    match d.wait_exit(0, TIMEOUT).expect("worker ends") {
        Err(vduse_blkd::worker::WorkerError::Broken { reason, stats, .. }) => {
            assert!(reason.to_string().contains("loop"), "{reason}");
            assert_eq!(
                stats.reads, 10,
                "every read in flight completed before the exit"
            );
        }
        other => panic!("expected Broken, got {other:?}"),
    }
    // Nothing is published once the ring is known to be corrupt.
    assert!(d.queues[0].reap().unwrap().is_empty());
}

#[test]
fn in_buffer_overlapping_the_descriptor_table_is_served() {
    require_io_uring!();
    // The driver lends its own descriptor table as the data buffer of a read. The chain was
    // walked before the read lands, so the request completes normally.
    let mut d = dev();
    let table = d.queues[0].layout().desc;
    let read = raw_data_request(T_IN, 64, Desc::writable(table, 512));
    let c = expect_ok_read_parts(&mut d, &read, 512);
    let file = d.backing_read(64 * 512, 512).unwrap();
    assert_eq!(c.data, file);
    assert_eq!(d.mem.read_vec(table, 512).unwrap(), file);
    // The driver rewrites its descriptors for the next request, which is served.
    assert_serves(&mut d, 0, 8);
    finish(d);
}

#[test]
fn same_head_reposted_with_a_changed_chain_while_in_flight_breaks_the_device() {
    require_io_uring!();
    // Head B (an indirect read) is in flight when it is posted again; by then a GET_ID that
    // ran in between has rewritten B's table entry to name an unmapped indirect table. The
    // duplicate must be caught whatever the chain now looks like: no used entry may be
    // published for a head that is still in flight.
    let unmapped = FREE_IOVA + 0x40_0000;
    let mut serial = [0u8; 20];
    serial[0..8].copy_from_slice(&unmapped.to_le_bytes());
    serial[8..12].copy_from_slice(&48u32.to_le_bytes());
    serial[12..14].copy_from_slice(&DESC_F_INDIRECT.to_le_bytes());
    let mut d = device_with(CAP, |cfg| cfg.serial = serial);
    let read = chain(&d, &BlkRequest::read(0, 4096).indirect(true));
    let b = d.queues[0].add(read).unwrap();
    let entry = d.queues[0].layout().desc + 16 * u64::from(b);
    let get_id = chain_of(
        &d,
        &raw_data_request(T_GET_ID, 0, Desc::writable(entry, 20)),
    );
    d.queues[0].add(get_id).unwrap();
    d.queues[0].add_head(b, None).unwrap();
    publish_and_kick(&mut d.queues[0]);
    assert_broken(&mut d, 0, &format!("head {b} posted again while in flight"));
    // The GET_ID (completed before the duplicate was seen) is the only used entry.
    let used = d.queues[0].reap().unwrap();
    assert_eq!(used.len(), 1, "{used:?}");
    assert_eq!((used[0].status, used[0].len), (Some(S_OK), 21));
}

#[test]
fn bad_queue_size_or_misaligned_rings_are_refused_at_start() {
    require_io_uring!();
    // A size that is not a power of two.
    let d = unstarted();
    let layout = d.queues[0].layout();
    start_expecting_broken(d, 12, layout, "bad queue size");
    // Each ring area misaligned in turn.
    for (which, why) in [(0, "descriptor table"), (1, "avail ring"), (2, "used ring")] {
        let d = unstarted();
        let mut layout = d.queues[0].layout();
        match which {
            0 => layout.desc += 8,
            1 => layout.avail += 1,
            _ => layout.used += 2,
        }
        start_expecting_broken(d, 16, layout, why);
    }
}
