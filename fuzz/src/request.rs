//! Target `request`: `worker::chain::walk_chain` then `blk::parse_request`, as the worker calls
//! them, over a fixed set of simulator regions. Pure and single-threaded.
//!
//! The input ([`RequestInput`], derived with `arbitrary`) is a request header, an optional
//! DISCARD/WRITE_ZEROES payload and a list of descriptors; [`build`] lays them out in memory.
//! Nothing here re-implements the parser: the checks are properties any correct walk and parse
//! must have (see `fuzz/README.md`).

use std::cell::RefCell;

use arbitrary::{Arbitrary, Unstructured};
use vduse_blkd::blk::config::{MAX_DWZ_SECTORS, MAX_DWZ_SEGMENTS};
use vduse_blkd::blk::request::{DeviceLimits, RequestError};
use vduse_blkd::blk::{parse_request, Request, RequestKind, Segment};
use vduse_blkd::sim::blk::{header, S_IOERR, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT};
use vduse_blkd::sim::blk::{T_WRITE_ZEROES, WZ_FLAG_UNMAP};
use vduse_blkd::sim::memory::{PROT_NONE, PROT_RO, PROT_RW};
use vduse_blkd::sim::queue::{Desc, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use vduse_blkd::sim::SimMemory;
use vduse_blkd::worker::chain::{walk_chain, ChainError};

use crate::{FreshView, Kind};

/// Read-write region (64 KiB): descriptor table, indirect table, then the buffer area.
const MAIN: u64 = 0x1_0000;
const MAIN_LEN: u64 = 0x1_0000;
const TABLE: u64 = MAIN;
const ITABLE: u64 = MAIN + 0x1000;
/// Header, payload and data buffers ([`Addr::Next`] walks through it).
const BUF: u64 = MAIN + 0x2000;
/// A read-write page right after `MAIN`, so that a buffer may cross from one region into another.
const NEXT: u64 = MAIN + MAIN_LEN;
const RO: u64 = 0x3_0000;
const NOACC: u64 = RO + 0x1000;
/// Nothing is mapped from here up.
const UNMAPPED: u64 = 0x4_0000;
const PAGE: u64 = 0x1000;

/// Where a descriptor points. The first alternative is the well-formed one.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Addr {
    /// Right after the previous descriptor's buffer (the first one starts at the header).
    Next,
    /// The read-only page.
    Ro(u16),
    /// The no-access page.
    NoAccess(u16),
    /// Unmapped memory.
    Unmapped(u16),
    /// `n` bytes before the end of `MAIN` (crossing into the next page) or of `NEXT`
    /// (crossing into unmapped memory), by the low bit.
    RegionEnd(u8),
    /// Inside the descriptor table.
    Table(u8),
    /// `u64::MAX - n`.
    NearMax(u16),
    Raw(u64),
}

/// A descriptor's length.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Len {
    /// The 16-byte header.
    Header,
    /// `n % 9` sectors.
    Sectors(u8),
    /// One byte: a status byte.
    Status,
    /// `n % 9` sectors and the status byte.
    SectorsAndStatus(u8),
    /// The whole DISCARD/WRITE_ZEROES payload.
    Payload,
    /// A GET_ID buffer and its status byte.
    IdAndStatus,
    Small(u8),
    Raw(u32),
}

/// Where a descriptor's `next` goes (only meaningful when it has NEXT).
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Next {
    Following,
    Index(u16),
    Itself,
}

/// One descriptor of the chain, written at table (or indirect table) index = its position.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct DescSpec {
    pub addr: Addr,
    pub len: Len,
    pub write: bool,
    /// Extra flag bits: INDIRECT on a data descriptor, NEXT on the last one.
    pub odd: Option<(bool, bool)>,
    pub next: Next,
}

/// A sector: mostly small, near the end of the device, or where `× 512` overflows.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Sector {
    Small(u8),
    FromEnd(u8),
    Overflow(u8),
    Raw(u64),
}

/// One DISCARD/WRITE_ZEROES range.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct Range {
    pub sector: Sector,
    /// Sectors: `n % 64`, or `MAX_DWZ_SECTORS + (n - 64)` past 64 (0 and just over the limit
    /// included).
    pub count: u8,
    pub unmap: bool,
    pub other_flags: Option<u32>,
}

/// How the head descriptor is indirect, if it is.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum IndirectAt {
    /// The indirect table, with its exact length.
    Table,
    /// The indirect table, any length.
    TableLen(u32),
    /// Unreadable: in no-access or unmapped memory.
    NoAccess,
    Unmapped,
}

/// Where the descriptor table is.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum TableAt {
    Main,
    ReadOnly,
    NoAccess,
    Unmapped,
}

/// One input of target `request`.
#[derive(Arbitrary, Debug, Clone)]
pub struct RequestInput {
    /// The header's type (`Other`: any value, implemented or not).
    pub ty: Kind,
    pub sector: Sector,
    /// Capacity `(n + 1) * 8` sectors.
    pub capacity: u8,
    pub read_only: bool,
    /// Queue size `1 << (n % 9)`, at least the chain's length unless `small_queue`.
    pub size_log2: u8,
    pub small_queue: bool,
    /// Head index, when not 0.
    pub head: Option<u16>,
    pub table: TableAt,
    pub indirect: Option<IndirectAt>,
    /// At most 17 used ([`MAX_DWZ_SEGMENTS`] + 1).
    pub ranges: Vec<Range>,
    /// At most 32 used.
    pub descs: Vec<DescSpec>,
}

impl RequestInput {
    fn capacity(&self) -> u64 {
        (u64::from(self.capacity) + 1) * 8 * 512
    }

    fn sector_value(&self, s: Sector) -> u64 {
        let cap = self.capacity() / 512;
        match s {
            Sector::Small(n) => u64::from(n),
            Sector::FromEnd(n) => cap.wrapping_sub(u64::from(n)),
            Sector::Overflow(n) => (u64::MAX / 512)
                .wrapping_add(u64::from(n) % 4)
                .wrapping_sub(1),
            Sector::Raw(v) => v,
        }
    }

    fn ranges(&self) -> &[Range] {
        &self.ranges[..self.ranges.len().min(MAX_DWZ_SEGMENTS as usize + 1)]
    }

    fn descs(&self) -> &[DescSpec] {
        &self.descs[..self.descs.len().min(32)]
    }

    /// The header and payload bytes at [`BUF`].
    fn blob(&self) -> Vec<u8> {
        let mut b = header(self.ty.value(), self.sector_value(self.sector)).to_vec();
        for r in self.ranges() {
            let count = match r.count {
                n @ 0..=63 => u32::from(n),
                n => MAX_DWZ_SECTORS + u32::from(n) - 64,
            };
            let flags = (u32::from(r.unmap) * WZ_FLAG_UNMAP) | r.other_flags.unwrap_or(0);
            b.extend_from_slice(&self.sector_value(r.sector).to_le_bytes());
            b.extend_from_slice(&count.to_le_bytes());
            b.extend_from_slice(&flags.to_le_bytes());
        }
        b
    }
}

/// The memory an input is built in: the regions above, zeroed.
fn memory() -> SimMemory {
    let m = SimMemory::new();
    m.add_region(MAIN, MAIN_LEN, PROT_RW).expect("main region");
    m.add_region(NEXT, PAGE, PROT_RW).expect("next region");
    m.add_region(RO, PAGE, PROT_RO).expect("read-only region");
    m.add_region(NOACC, PAGE, PROT_NONE)
        .expect("no-access region");
    m
}

/// What [`build`] laid out.
pub struct Built {
    pub table: u64,
    pub size: u16,
    pub head: u16,
}

/// Lay `input` out in `mem` (already zeroed): the blob at [`BUF`], the descriptors in the table
/// or, for an indirect head, in the indirect table.
pub fn build(mem: &SimMemory, input: &RequestInput) -> Built {
    let blob = input.blob();
    mem.write(BUF, &blob).expect("blob fits");
    let descs = input.descs();
    let n = descs.len();
    let size_log2 = u32::from(input.size_log2 % 9);
    let mut size = 1u16 << size_log2;
    if !input.small_queue {
        while usize::from(size) < n.max(1) && size < 256 {
            size *= 2;
        }
    }
    let table = match input.table {
        TableAt::Main => TABLE,
        TableAt::ReadOnly => RO,
        TableAt::NoAccess => NOACC,
        TableAt::Unmapped => UNMAPPED,
    };
    let mut cursor = BUF;
    let mut raw = Vec::with_capacity(16 * n);
    for (i, d) in descs.iter().enumerate() {
        let len = match d.len {
            Len::Header => 16,
            Len::Sectors(s) => 512 * u32::from(s % 9),
            Len::Status => 1,
            Len::SectorsAndStatus(s) => 512 * u32::from(s % 9) + 1,
            Len::Payload => blob.len() as u32 - 16,
            Len::IdAndStatus => 21,
            Len::Small(s) => u32::from(s),
            Len::Raw(l) => l,
        };
        let addr = match d.addr {
            Addr::Next => cursor,
            Addr::Ro(o) => RO + u64::from(o) % PAGE,
            Addr::NoAccess(o) => NOACC + u64::from(o) % PAGE,
            Addr::Unmapped(o) => UNMAPPED + u64::from(o),
            Addr::RegionEnd(b) if b & 1 == 0 => NEXT - u64::from(b / 2),
            Addr::RegionEnd(b) => NEXT + PAGE - u64::from(b / 2),
            Addr::Table(o) => TABLE + u64::from(o),
            Addr::NearMax(b) => u64::MAX - u64::from(b),
            Addr::Raw(a) => a,
        };
        cursor = addr.wrapping_add(u64::from(len));
        let (indirect, next_on_last) = d.odd.unwrap_or((false, false));
        let last = i + 1 == n;
        let mut flags =
            (u16::from(d.write) * DESC_F_WRITE) | (u16::from(indirect) * DESC_F_INDIRECT);
        if !last || next_on_last {
            flags |= DESC_F_NEXT;
        }
        let next = match d.next {
            Next::Following => i as u16 + 1,
            Next::Index(j) => j,
            Next::Itself => i as u16,
        };
        raw.extend_from_slice(&Desc::encode(addr, len, flags, next));
    }
    let head = input.head.unwrap_or(0);
    match input.indirect {
        None => {
            let _ = mem.write(table, &raw);
        }
        Some(at) => {
            mem.write(ITABLE, &raw).expect("indirect table fits");
            let (addr, len) = match at {
                IndirectAt::Table => (ITABLE, raw.len() as u32),
                IndirectAt::TableLen(l) => (ITABLE, l),
                IndirectAt::NoAccess => (NOACC, raw.len() as u32),
                IndirectAt::Unmapped => (UNMAPPED, raw.len() as u32),
            };
            let slot = table.wrapping_add(16 * u64::from(head));
            let _ = mem.write(slot, &Desc::encode(addr, len, DESC_F_INDIRECT, 0));
        }
    }
    Built { table, size, head }
}

struct State {
    mem: SimMemory,
    zeros: Vec<u8>,
    segs: Vec<Segment>,
    /// Reused across inputs, as the worker reuses its `Request`.
    dirty: Request,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

/// Decode `data` (any bytes) and run it.
pub fn fuzz(data: &[u8]) {
    if let Ok(input) = RequestInput::arbitrary_take_rest(Unstructured::new(data)) {
        run(&input);
    }
}

/// How an input ended (for the seed tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Walk(ChainError),
    Rejected(RequestError),
    Accepted(RequestKind),
}

/// Run one input and check every property (panics on a violation).
pub fn run(input: &RequestInput) -> Outcome {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let s = s.get_or_insert_with(|| State {
            mem: memory(),
            zeros: vec![0u8; MAIN_LEN as usize],
            segs: Vec::new(),
            dirty: Request::default(),
        });
        for (base, len) in [(MAIN, MAIN_LEN), (NEXT, PAGE), (RO, PAGE)] {
            s.mem
                .write(base, &s.zeros[..len as usize])
                .expect("zero region");
        }
        run_in(s, input)
    })
}

fn run_in(s: &mut State, input: &RequestInput) -> Outcome {
    let b = build(&s.mem, input);
    let limits = DeviceLimits {
        capacity: input.capacity(),
        read_only: input.read_only,
    };
    // A fresh IOVA space per input, as a (re)started worker has.
    let mut view = FreshView::new(&s.mem);
    let walked = walk_chain(&mut view, b.table, b.size, b.head, &mut s.segs);
    check_walk(&b, &walked);
    // The walk is a function of memory: again, the same segments.
    let mut again = Vec::new();
    let twice = walk_chain(&mut view, b.table, b.size, b.head, &mut again);
    assert_eq!(
        (&walked, &s.segs),
        (&twice, &again),
        "the walk is not repeatable"
    );
    if let Err(e) = walked {
        return Outcome::Walk(e);
    }
    let mut req = Request::default();
    let res = parse_request(&s.segs, &mut view, &limits, &mut req);
    let again = parse_request(&s.segs, &mut view, &limits, &mut s.dirty);
    assert_eq!(
        res, again,
        "the result depends on the Request's previous state"
    );
    assert_eq!(
        (
            req.status_addr,
            req.kind,
            req.offset,
            &req.data,
            req.data_len,
            &req.dwz
        ),
        (
            s.dirty.status_addr,
            s.dirty.kind,
            s.dirty.offset,
            &s.dirty.data,
            s.dirty.data_len,
            &s.dirty.dwz
        ),
        "the parsed request depends on the Request's previous state"
    );
    // The status byte is the last byte of the last descriptor, if that one is device-writable
    // and not empty (on success and on every error: the worker answers through it).
    let status = s
        .segs
        .last()
        .filter(|l| l.write && l.len > 0)
        .and_then(|l| l.addr.checked_add(u64::from(l.len) - 1));
    assert_eq!(req.status_addr, status, "status address");
    match res {
        Err(e) => {
            assert!(matches!(e.status(), S_IOERR | S_UNSUPP), "{e:?} answers OK");
            Outcome::Rejected(e)
        }
        Ok(()) => {
            check_accepted(&s.mem, &s.segs, &limits, &req);
            Outcome::Accepted(req.kind)
        }
    }
}

/// Properties of a walk: a head out of range is named as such only when it is, and an
/// accepted head lies inside the table.
fn check_walk(b: &Built, walked: &Result<(), ChainError>) {
    match walked {
        Err(ChainError::HeadOutOfRange(h)) => assert!(*h >= b.size && *h == b.head),
        Err(_) => {}
        Ok(()) => assert!(
            b.head < b.size,
            "head {} outside a table of {}",
            b.head,
            b.size
        ),
    }
}

/// Properties of an accepted request, from the spec and the header read back directly.
fn check_accepted(mem: &SimMemory, segs: &[Segment], limits: &DeviceLimits, req: &Request) {
    let first = segs.first().expect("an accepted chain has a header");
    let mut hdr = [0u8; 16];
    // The header may span descriptors; read it as the driver wrote it, piece by piece.
    let mut got = 0;
    for s in segs.iter().take_while(|s| !s.write) {
        let take = (s.len as usize).min(16 - got);
        mem.read(s.addr, &mut hdr[got..got + take])
            .expect("accepted header is readable");
        got += take;
        if got == 16 {
            break;
        }
    }
    assert_eq!(got, 16, "accepted without a full header (first {first:?})");
    let ty = u32::from_le_bytes(hdr[0..4].try_into().expect("4"));
    let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8"));
    let want = match ty {
        T_IN => RequestKind::Read,
        T_OUT => RequestKind::Write,
        T_FLUSH => RequestKind::Flush,
        T_GET_ID => RequestKind::GetId,
        T_DISCARD => RequestKind::Discard,
        T_WRITE_ZEROES => RequestKind::WriteZeroes,
        t => panic!("type {t} accepted"),
    };
    assert_eq!(req.kind, want, "kind");
    let writes = matches!(
        req.kind,
        RequestKind::Write | RequestKind::Discard | RequestKind::WriteZeroes
    );
    assert!(
        !(writes && limits.read_only),
        "write accepted on a read-only device"
    );
    assert_eq!(
        req.data.iter().map(|d| u64::from(d.len)).sum::<u64>(),
        req.data_len
    );
    // Data lies inside the chain, in the direction of the transfer.
    let dev_writes = matches!(req.kind, RequestKind::Read | RequestKind::GetId);
    for d in &req.data {
        assert!(d.len > 0, "empty data segment");
        assert!(
            segs.iter().any(|s| s.write == dev_writes
                && d.addr >= s.addr
                && u128::from(d.addr) + u128::from(d.len)
                    <= u128::from(s.addr) + u128::from(s.len)),
            "data {d:?} not inside one descriptor of the right direction"
        );
    }
    match req.kind {
        RequestKind::Read | RequestKind::Write => {
            assert_eq!(Some(req.offset), sector.checked_mul(512), "offset");
            assert_eq!(req.data_len % 512, 0, "unaligned data accepted");
            assert!(
                req.offset + req.data_len <= limits.capacity,
                "past the capacity"
            );
        }
        RequestKind::GetId => assert_eq!(req.data_len, 20),
        RequestKind::Flush => assert!(req.data.is_empty(), "flush with data"),
        RequestKind::Discard | RequestKind::WriteZeroes => {
            assert!(
                (1..=MAX_DWZ_SEGMENTS as usize).contains(&req.dwz.len()),
                "range count"
            );
            for r in &req.dwz {
                assert!(
                    r.len > 0 && r.len <= u64::from(MAX_DWZ_SECTORS) * 512,
                    "{r:?}"
                );
                assert!(
                    r.offset % 512 == 0 && r.offset + r.len <= limits.capacity,
                    "{r:?}"
                );
                assert!(
                    !(r.unmap && req.kind == RequestKind::Discard),
                    "discard with UNMAP"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(len: Len, write: bool) -> DescSpec {
        DescSpec {
            addr: Addr::Next,
            len,
            write,
            odd: None,
            next: Next::Following,
        }
    }

    fn input(ty: Kind, descs: Vec<DescSpec>) -> RequestInput {
        RequestInput {
            ty,
            sector: Sector::Small(1),
            capacity: 7,
            read_only: false,
            size_log2: 0,
            small_queue: false,
            head: None,
            table: TableAt::Main,
            indirect: None,
            ranges: Vec::new(),
            descs,
        }
    }

    /// The builder's default path is a well-formed request, which the parser accepts.
    #[test]
    fn a_well_formed_read_is_accepted() {
        let i = input(
            Kind::In,
            vec![
                desc(Len::Header, false),
                desc(Len::SectorsAndStatus(2), true),
            ],
        );
        let mem = memory();
        let b = build(&mem, &i);
        let mut segs = Vec::new();
        let mut view = FreshView::new(&mem);
        walk_chain(&mut view, b.table, b.size, b.head, &mut segs).expect("walk");
        let mut req = Request::default();
        let limits = DeviceLimits {
            capacity: i.capacity(),
            read_only: false,
        };
        parse_request(&segs, &mut view, &limits, &mut req).expect("parse");
        assert_eq!(
            (req.kind, req.offset, req.data_len),
            (RequestKind::Read, 512, 1024)
        );
        assert_eq!(req.status_addr, Some(BUF + 16 + 1024));
        run(&i);
    }

    /// A property fires on a wrong parse: here, a request the checker must reject.
    #[test]
    #[should_panic(expected = "write accepted on a read-only device")]
    fn check_accepted_catches_a_write_on_a_read_only_device() {
        let i = input(
            Kind::Out,
            vec![desc(Len::Header, false), desc(Len::Status, true)],
        );
        let mem = memory();
        build(&mem, &i);
        let segs = [
            Segment {
                addr: BUF,
                len: 16,
                write: false,
            },
            Segment {
                addr: BUF + 16,
                len: 1,
                write: true,
            },
        ];
        let req = Request {
            kind: RequestKind::Write,
            ..Request::default()
        };
        check_accepted(
            &mem,
            &segs,
            &DeviceLimits {
                capacity: 1 << 20,
                read_only: true,
            },
            &req,
        );
    }
}
