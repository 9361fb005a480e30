//! Parsing a virtio-blk request out of a flattened descriptor chain.
//!
//! The chain arrives as a list of [`Segment`]s (IOVA, length, device-writable?) in chain order,
//! indirect tables already expanded. The layout rule follows the virtio 1.x spec ("the device
//! MUST NOT make assumptions about the particular arrangement of descriptors"): the request
//! header is the first 16 device-readable bytes, the status is the last byte of the chain
//! (which must be device-writable), and the data is what lies between. Device-readable
//! descriptors after a device-writable one make the request malformed; if the chain ends in
//! one, it has no status byte at all.
//!
//! Every outcome is decided here, before any I/O: a [`Request`] ready to execute, or a
//! [`RequestError`] whose [`RequestError::status`] is the byte the driver will see.

use thiserror::Error;

use super::config::{MAX_DWZ_SECTORS, MAX_DWZ_SEGMENTS};
pub use super::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
use super::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};

/// Sector size of the virtio-blk protocol (always 512, whatever the block size).
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;

const HDR_LEN: u64 = 16;
const DWZ_SEG_LEN: u64 = 16;

/// One descriptor of a chain, as the walker found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// IOVA of the buffer.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (`VIRTQ_DESC_F_WRITE`).
    pub write: bool,
}

/// A piece of the request's data area, in IOVA space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataSeg {
    /// IOVA.
    pub addr: u64,
    /// Length in bytes (never zero).
    pub len: u32,
}

/// One range of a DISCARD or WRITE_ZEROES request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DwzSegment {
    /// Byte offset in the device.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// WRITE_ZEROES only: the device may deallocate the range.
    pub unmap: bool,
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RequestKind {
    /// `VIRTIO_BLK_T_IN`: read from the device into the data area.
    #[default]
    Read,
    /// `VIRTIO_BLK_T_OUT`: write the data area to the device.
    Write,
    /// `VIRTIO_BLK_T_FLUSH`.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`: write the serial into the data area.
    GetId,
    /// `VIRTIO_BLK_T_DISCARD`.
    Discard,
    /// `VIRTIO_BLK_T_WRITE_ZEROES`.
    WriteZeroes,
}

/// A parsed request. Reused across requests by the worker (no allocation per request once the
/// vectors have grown).
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// What to do.
    pub kind: RequestKind,
    /// Byte offset in the device (Read/Write).
    pub offset: u64,
    /// Data area (Read/Write/GetId), in chain order.
    pub data: Vec<DataSeg>,
    /// Total bytes in `data`.
    pub data_len: u64,
    /// Ranges of a DISCARD or WRITE_ZEROES request.
    pub dwz: Vec<DwzSegment>,
    /// IOVA of the status byte, when the chain has one (the last byte of its last descriptor,
    /// if that descriptor is device-writable and not empty).
    pub status_addr: Option<u64>,
}

/// Limits that depend on the device, not on the request.
#[derive(Debug, Clone, Copy)]
pub struct DeviceLimits {
    /// Capacity in bytes.
    pub capacity: u64,
    /// Whether writes are refused.
    pub read_only: bool,
}

/// Why a request is refused. Each maps to exactly one status byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum RequestError {
    /// Fewer than 16 device-readable bytes: no room for the header.
    #[error("request header is shorter than 16 bytes")]
    HeaderTooShort,
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// The data direction does not fit the request type.
    #[error("data direction does not match the request type")]
    WrongDirection,
    /// The request type carries no data but data was attached.
    #[error("unexpected data for this request type")]
    UnexpectedData,
    /// Sector arithmetic overflowed u64.
    #[error("sector arithmetic overflows")]
    Overflow,
    /// The request reaches past the end of the device.
    #[error("request reaches past the end of the device")]
    BeyondCapacity,
    /// The data length is not a multiple of 512 bytes.
    #[error("data length is not a multiple of 512")]
    Unaligned,
    /// Unknown request type.
    #[error("unsupported request type {0}")]
    UnsupportedType(u32),
    /// A write-type request on a read-only device.
    #[error("write to a read-only device")]
    ReadOnly,
    /// DISCARD/WRITE_ZEROES payload is not 1..=16 whole segments.
    #[error("bad discard/write-zeroes segment count")]
    BadSegmentCount,
    /// DISCARD/WRITE_ZEROES with reserved or disallowed flags.
    #[error("unsupported discard/write-zeroes flags {0:#x}")]
    BadSegmentFlags(u32),
    /// A DISCARD/WRITE_ZEROES range that is empty or too large.
    #[error("bad discard/write-zeroes range")]
    BadSegmentRange,
    /// GET_ID with a buffer shorter than 20 bytes.
    #[error("GET_ID buffer shorter than 20 bytes")]
    ShortIdBuffer,
    /// Reading the header or the segment list from driver memory failed.
    #[error("unreadable request memory at IOVA {0:#x}")]
    Memory(u64),
}

impl RequestError {
    /// The status byte reported to the driver. Exhaustive on purpose: a new error must choose.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::UnsupportedType(_) | RequestError::BadSegmentFlags(_) => {
                VIRTIO_BLK_S_UNSUPP
            }
            RequestError::HeaderTooShort
            | RequestError::ReadableAfterWritable
            | RequestError::WrongDirection
            | RequestError::UnexpectedData
            | RequestError::Overflow
            | RequestError::BeyondCapacity
            | RequestError::Unaligned
            | RequestError::ReadOnly
            | RequestError::BadSegmentCount
            | RequestError::BadSegmentRange
            | RequestError::ShortIdBuffer
            | RequestError::Memory(_) => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// Reads driver memory by IOVA. The worker's implementation maps IOVA regions lazily.
pub trait GuestRead {
    /// Fill `buf` from IOVA `addr`; on failure return the IOVA that could not be read.
    fn read_at(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), u64>;
}

/// Iterate the byte ranges `[from, from+len)` of the concatenation of `segs`.
fn slice_ranges(segs: &[Segment], mut from: u64, mut len: u64, mut f: impl FnMut(u64, u32)) {
    for s in segs {
        if len == 0 {
            break;
        }
        let slen = u64::from(s.len);
        if from >= slen {
            from -= slen;
            continue;
        }
        let take = (slen - from).min(len);
        // `take <= s.len`, so it fits in u32; `from < s.len` keeps the addition in range of
        // what the driver described (overflow is checked by the caller's translation).
        f(s.addr.wrapping_add(from), take as u32);
        len -= take;
        from = 0;
    }
}

fn read_span(
    mem: &mut impl GuestRead,
    segs: &[Segment],
    from: u64,
    buf: &mut [u8],
) -> Result<(), RequestError> {
    let mut done = 0usize;
    let mut err = None;
    slice_ranges(segs, from, buf.len() as u64, |addr, len| {
        if err.is_some() {
            return;
        }
        let end = done + len as usize;
        if let Err(a) = mem.read_at(addr, &mut buf[done..end]) {
            err = Some(RequestError::Memory(a));
        }
        done = end;
    });
    err.map_or(Ok(()), Err)
}

/// A chain split at its first device-writable descriptor, with the header's sector.
#[derive(Clone, Copy)]
struct Layout<'a> {
    readable: &'a [Segment],
    writable: &'a [Segment],
    /// Device-readable bytes after the header.
    data_out: u64,
    /// Device-writable bytes before the status byte.
    data_in: u64,
    sector: u64,
}

/// Parse `segs` into `req`. `req.status_addr` is set whenever the chain has a status byte,
/// even when parsing fails, so the caller can report the error.
pub fn parse_request(
    segs: &[Segment],
    mem: &mut impl GuestRead,
    limits: &DeviceLimits,
    req: &mut Request,
) -> Result<(), RequestError> {
    req.data.clear();
    req.dwz.clear();
    req.data_len = 0;
    req.offset = 0;
    req.status_addr = None;
    req.kind = RequestKind::default();

    let n_read = segs.iter().take_while(|s| !s.write).count();
    let (readable, writable) = segs.split_at(n_read);
    // The status byte must be device-writable: a chain that ends in a device-readable
    // descriptor has none (never write into memory the driver lent us to read).
    if let Some(last) = writable.last() {
        if last.write && last.len > 0 {
            req.status_addr = last.addr.checked_add(u64::from(last.len) - 1);
        }
    }
    if writable.iter().any(|s| !s.write) {
        return Err(RequestError::ReadableAfterWritable);
    }
    let readable_len: u64 = readable.iter().map(|s| u64::from(s.len)).sum();
    let writable_len: u64 = writable.iter().map(|s| u64::from(s.len)).sum();
    if readable_len < HDR_LEN {
        return Err(RequestError::HeaderTooShort);
    }
    let mut hdr = [0u8; HDR_LEN as usize];
    read_span(mem, readable, 0, &mut hdr)?;
    let req_type = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes"));

    let data_out = readable_len - HDR_LEN;
    // The status byte is not data; without a status byte the writable part is all data.
    let data_in = writable_len.saturating_sub(u64::from(req.status_addr.is_some()));

    let l = Layout {
        readable,
        writable,
        data_out,
        data_in,
        sector,
    };
    match req_type {
        VIRTIO_BLK_T_IN => parse_rw(RequestKind::Read, &l, limits, req),
        VIRTIO_BLK_T_OUT => parse_rw(RequestKind::Write, &l, limits, req),
        VIRTIO_BLK_T_FLUSH => {
            req.kind = RequestKind::Flush;
            if data_out != 0 || data_in != 0 {
                return Err(RequestError::UnexpectedData);
            }
            Ok(())
        }
        VIRTIO_BLK_T_GET_ID => parse_get_id(&l, req),
        VIRTIO_BLK_T_DISCARD => parse_dwz(RequestKind::Discard, mem, &l, limits, req),
        VIRTIO_BLK_T_WRITE_ZEROES => parse_dwz(RequestKind::WriteZeroes, mem, &l, limits, req),
        other => Err(RequestError::UnsupportedType(other)),
    }
}

fn parse_rw(
    kind: RequestKind,
    l: &Layout<'_>,
    limits: &DeviceLimits,
    req: &mut Request,
) -> Result<(), RequestError> {
    req.kind = kind;
    let write = kind == RequestKind::Write;
    let (len, wrong) = if write {
        (l.data_out, l.data_in)
    } else {
        (l.data_in, l.data_out)
    };
    if wrong != 0 {
        return Err(RequestError::WrongDirection);
    }
    if write && limits.read_only {
        return Err(RequestError::ReadOnly);
    }
    if len % SECTOR_SIZE != 0 {
        return Err(RequestError::Unaligned);
    }
    req.offset = byte_offset(l.sector, len, limits)?;
    req.data_len = len;
    let (src, from) = if write {
        (l.readable, HDR_LEN)
    } else {
        (l.writable, 0)
    };
    let data = &mut req.data;
    slice_ranges(src, from, len, |addr, l| {
        data.push(DataSeg { addr, len: l })
    });
    Ok(())
}

/// The byte offset of `len` bytes at `sector`, checked to lie inside the device.
fn byte_offset(sector: u64, len: u64, limits: &DeviceLimits) -> Result<u64, RequestError> {
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(RequestError::Overflow)?;
    let end = offset.checked_add(len).ok_or(RequestError::Overflow)?;
    if end > limits.capacity {
        return Err(RequestError::BeyondCapacity);
    }
    Ok(offset)
}

fn parse_get_id(l: &Layout<'_>, req: &mut Request) -> Result<(), RequestError> {
    let Layout {
        writable,
        data_out,
        data_in,
        ..
    } = *l;
    req.kind = RequestKind::GetId;
    if data_out != 0 {
        return Err(RequestError::WrongDirection);
    }
    if data_in < VIRTIO_BLK_ID_BYTES as u64 {
        return Err(RequestError::ShortIdBuffer);
    }
    req.data_len = VIRTIO_BLK_ID_BYTES as u64;
    let data = &mut req.data;
    slice_ranges(writable, 0, VIRTIO_BLK_ID_BYTES as u64, |addr, l| {
        data.push(DataSeg { addr, len: l })
    });
    Ok(())
}

fn parse_dwz(
    kind: RequestKind,
    mem: &mut impl GuestRead,
    l: &Layout<'_>,
    limits: &DeviceLimits,
    req: &mut Request,
) -> Result<(), RequestError> {
    req.kind = kind;
    let discard = kind == RequestKind::Discard;
    let data_out = l.data_out;
    if l.data_in != 0 {
        return Err(RequestError::WrongDirection);
    }
    if limits.read_only {
        return Err(RequestError::ReadOnly);
    }
    if data_out == 0
        || !data_out.is_multiple_of(DWZ_SEG_LEN)
        || data_out / DWZ_SEG_LEN > u64::from(MAX_DWZ_SEGMENTS)
    {
        return Err(RequestError::BadSegmentCount);
    }
    let allowed_flags = if discard {
        0
    } else {
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    };
    for i in 0..data_out / DWZ_SEG_LEN {
        let mut raw = [0u8; DWZ_SEG_LEN as usize];
        read_span(mem, l.readable, HDR_LEN + i * DWZ_SEG_LEN, &mut raw)?;
        let sector = u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes"));
        let num = u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes"));
        let flags = u32::from_le_bytes(raw[12..16].try_into().expect("4 bytes"));
        if flags & !allowed_flags != 0 {
            return Err(RequestError::BadSegmentFlags(flags));
        }
        if num == 0 || num > MAX_DWZ_SECTORS {
            return Err(RequestError::BadSegmentRange);
        }
        let len = u64::from(num) << SECTOR_SHIFT;
        let offset = byte_offset(sector, len, limits)?;
        req.dwz.push(DwzSegment {
            offset,
            len,
            unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A sparse byte map standing in for driver memory.
    #[derive(Default)]
    struct Mem(BTreeMap<u64, u8>);
    impl Mem {
        fn put(&mut self, addr: u64, bytes: &[u8]) {
            for (i, b) in bytes.iter().enumerate() {
                self.0.insert(addr + i as u64, *b);
            }
        }
    }
    impl GuestRead for Mem {
        fn read_at(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), u64> {
            for (i, b) in buf.iter_mut().enumerate() {
                let a = addr + i as u64;
                *b = *self.0.get(&a).ok_or(a)?;
            }
            Ok(())
        }
    }

    fn hdr(t: u32, sector: u64) -> Vec<u8> {
        let mut v = t.to_le_bytes().to_vec();
        v.extend_from_slice(&0u32.to_le_bytes());
        v.extend_from_slice(&sector.to_le_bytes());
        v
    }
    const LIM: DeviceLimits = DeviceLimits {
        capacity: 1 << 20,
        read_only: false,
    };
    fn seg(addr: u64, len: u32, write: bool) -> Segment {
        Segment { addr, len, write }
    }
    fn parse(
        segs: &[Segment],
        mem: &mut Mem,
        lim: &DeviceLimits,
    ) -> (Request, Result<(), RequestError>) {
        let mut r = Request::default();
        let res = parse_request(segs, mem, lim, &mut r);
        (r, res)
    }

    #[test]
    fn read_request_canonical_layout() {
        let mut m = Mem::default();
        m.put(0x1000, &hdr(VIRTIO_BLK_T_IN, 8));
        let segs = [
            seg(0x1000, 16, false),
            seg(0x2000, 4096, true),
            seg(0x3000, 1, true),
        ];
        let (r, res) = parse(&segs, &mut m, &LIM);
        res.unwrap();
        assert_eq!(r.kind, RequestKind::Read);
        assert_eq!(r.offset, 4096);
        assert_eq!(
            r.data,
            vec![DataSeg {
                addr: 0x2000,
                len: 4096
            }]
        );
        assert_eq!(r.status_addr, Some(0x3000));
    }

    #[test]
    fn header_split_oddly_and_data_sharing_descriptors() {
        let mut m = Mem::default();
        let h = hdr(VIRTIO_BLK_T_OUT, 1);
        m.put(0x1000, &h[..3]);
        m.put(0x5000, &h[3..]);
        // header tail and 512 data bytes share one descriptor; status shares with nothing.
        let segs = [
            seg(0x1000, 3, false),
            seg(0x5000, 13 + 512, false),
            seg(0x9000, 1, true),
        ];
        let (r, res) = parse(&segs, &mut m, &LIM);
        res.unwrap();
        assert_eq!(r.kind, RequestKind::Write);
        assert_eq!(
            r.data,
            vec![DataSeg {
                addr: 0x5000 + 13,
                len: 512
            }]
        );
    }

    #[test]
    fn status_is_the_last_byte_of_a_longer_writable_descriptor() {
        let mut m = Mem::default();
        m.put(0x1000, &hdr(VIRTIO_BLK_T_IN, 0));
        let segs = [seg(0x1000, 16, false), seg(0x2000, 513, true)];
        let (r, res) = parse(&segs, &mut m, &LIM);
        res.unwrap();
        assert_eq!(
            r.data,
            vec![DataSeg {
                addr: 0x2000,
                len: 512
            }]
        );
        assert_eq!(r.status_addr, Some(0x2000 + 512));
    }

    #[test]
    fn refusals_map_to_their_status() {
        let mut m = Mem::default();
        m.put(0x1000, &hdr(VIRTIO_BLK_T_IN, 0));
        m.put(0x1100, &hdr(VIRTIO_BLK_T_OUT, (1 << 20) / 512));
        m.put(0x1200, &hdr(99, 0));
        m.put(0x1300, &hdr(VIRTIO_BLK_T_OUT, u64::MAX / 256));
        let st = seg(0x3000, 1, true);
        let cases: Vec<(Vec<Segment>, RequestError)> = vec![
            (
                vec![seg(0x1000, 15, false), st],
                RequestError::HeaderTooShort,
            ),
            (
                vec![seg(0x1000, 16, true), st],
                RequestError::HeaderTooShort,
            ),
            (
                vec![seg(0x1000, 16, false), seg(0x2000, 512, false), st],
                RequestError::WrongDirection,
            ),
            (
                vec![seg(0x1000, 16, false), seg(0x2000, 100, true), st],
                RequestError::Unaligned,
            ),
            (
                vec![seg(0x1100, 16, false), seg(0x2000, 512, false), st],
                RequestError::BeyondCapacity,
            ),
            (
                vec![seg(0x1300, 16, false), seg(0x2000, 512, false), st],
                RequestError::Overflow,
            ),
            (
                vec![seg(0x1200, 16, false), st],
                RequestError::UnsupportedType(99),
            ),
            (
                vec![seg(0x1000, 16, false), st, seg(0x4000, 1, false)],
                RequestError::ReadableAfterWritable,
            ),
            (
                vec![seg(0x7000, 16, false), st],
                RequestError::Memory(0x7000),
            ),
        ];
        for (segs, want) in cases {
            let (r, res) = parse(&segs, &mut m, &LIM);
            assert_eq!(res, Err(want), "{segs:?}");
            if want == RequestError::ReadableAfterWritable {
                assert_eq!(r.status_addr, None, "status must not be a readable byte");
            } else {
                assert_eq!(r.status_addr, Some(0x3000));
            }
        }
        assert_eq!(
            RequestError::UnsupportedType(99).status(),
            VIRTIO_BLK_S_UNSUPP
        );
        assert_eq!(RequestError::Unaligned.status(), VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn no_status_when_last_writable_is_empty_or_absent() {
        let mut m = Mem::default();
        m.put(0x1000, &hdr(VIRTIO_BLK_T_FLUSH, 0));
        let (r, res) = parse(
            &[seg(0x1000, 16, false), seg(0x3000, 0, true)],
            &mut m,
            &LIM,
        );
        assert_eq!(r.status_addr, None);
        res.unwrap();
        let (r, _) = parse(&[seg(0x1000, 16, false)], &mut m, &LIM);
        assert_eq!(r.status_addr, None);
    }

    #[test]
    fn read_only_refuses_writes_but_not_reads_or_flush() {
        let ro = DeviceLimits {
            capacity: 1 << 20,
            read_only: true,
        };
        let mut m = Mem::default();
        m.put(0x1000, &hdr(VIRTIO_BLK_T_OUT, 0));
        m.put(0x1100, &hdr(VIRTIO_BLK_T_FLUSH, 0));
        let st = seg(0x3000, 1, true);
        let (_, res) = parse(
            &[seg(0x1000, 16, false), seg(0x2000, 512, false), st],
            &mut m,
            &ro,
        );
        assert_eq!(res, Err(RequestError::ReadOnly));
        let (_, res) = parse(&[seg(0x1100, 16, false), st], &mut m, &ro);
        res.unwrap();
    }

    #[test]
    fn discard_and_write_zeroes_segments() {
        let mut m = Mem::default();
        let mut p = hdr(VIRTIO_BLK_T_WRITE_ZEROES, 0);
        for (s, n, f) in [(0u64, 8u32, 1u32), (64, 16, 0)] {
            p.extend_from_slice(&s.to_le_bytes());
            p.extend_from_slice(&n.to_le_bytes());
            p.extend_from_slice(&f.to_le_bytes());
        }
        m.put(0x1000, &p);
        let st = seg(0x3000, 1, true);
        let (r, res) = parse(&[seg(0x1000, 48, false), st], &mut m, &LIM);
        res.unwrap();
        assert_eq!(r.kind, RequestKind::WriteZeroes);
        assert_eq!(
            r.dwz,
            vec![
                DwzSegment {
                    offset: 0,
                    len: 4096,
                    unmap: true
                },
                DwzSegment {
                    offset: 64 * 512,
                    len: 8192,
                    unmap: false
                }
            ]
        );
        // The same payload as DISCARD: the unmap flag is not allowed there.
        m.put(0x1000, &VIRTIO_BLK_T_DISCARD.to_le_bytes());
        let (_, res) = parse(&[seg(0x1000, 48, false), st], &mut m, &LIM);
        assert_eq!(res, Err(RequestError::BadSegmentFlags(1)));
        assert_eq!(res.unwrap_err().status(), VIRTIO_BLK_S_UNSUPP);
        // Partial segment.
        let (_, res) = parse(&[seg(0x1000, 40, false), st], &mut m, &LIM);
        assert_eq!(res, Err(RequestError::BadSegmentCount));
    }

    #[test]
    fn get_id_needs_twenty_bytes() {
        let mut m = Mem::default();
        m.put(0x1000, &hdr(VIRTIO_BLK_T_GET_ID, 0));
        let mut get_id = |id_len| {
            let segs = [
                seg(0x1000, 16, false),
                seg(0x2000, id_len, true),
                seg(0x3000, 1, true),
            ];
            parse(&segs, &mut m, &LIM)
        };
        assert_eq!(get_id(10).1, Err(RequestError::ShortIdBuffer));
        let (r, res) = get_id(20);
        res.unwrap();
        assert_eq!(
            r.data,
            vec![DataSeg {
                addr: 0x2000,
                len: 20
            }]
        );
    }
}
