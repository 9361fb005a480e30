//! virtio-blk requests as a driver builds them.
//!
//! [`BlkRequest`] describes a request by its wire content (type, sector, device-readable
//! payload, device-writable length) and how to lay it out (descriptor sizes, indirect), and
//! turns it into a [`Chain`] with buffers allocated from the simulator's heap.
//! [`ChainBuilder`] builds arbitrary chains, including ones no driver should post.

use super::memory::SimMemory;
use super::queue::{Chain, Desc, Indirect};
use super::SimError;

/// `VIRTIO_BLK_T_IN`.
pub const T_IN: u32 = 0;
/// `VIRTIO_BLK_T_OUT`.
pub const T_OUT: u32 = 1;
/// `VIRTIO_BLK_T_FLUSH`.
pub const T_FLUSH: u32 = 4;
/// `VIRTIO_BLK_T_GET_ID`.
pub const T_GET_ID: u32 = 8;
/// `VIRTIO_BLK_T_DISCARD`.
pub const T_DISCARD: u32 = 11;
/// `VIRTIO_BLK_T_WRITE_ZEROES`.
pub const T_WRITE_ZEROES: u32 = 13;
/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`.
pub const WZ_FLAG_UNMAP: u32 = 1;

/// `VIRTIO_BLK_S_OK`.
pub const S_OK: u8 = 0;
/// `VIRTIO_BLK_S_IOERR`.
pub const S_IOERR: u8 = 1;
/// `VIRTIO_BLK_S_UNSUPP`.
pub const S_UNSUPP: u8 = 2;

/// What the driver fills device-writable buffers with before posting, so that a byte the
/// device did not write is recognisable.
pub const POISON: u8 = 0xa5;

/// The 16-byte request header (`struct virtio_blk_outhdr`).
pub fn header(type_: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&type_.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// One DISCARD / WRITE_ZEROES range (`struct virtio_blk_discard_write_zeroes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DwzSeg {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// Flags (`WZ_FLAG_UNMAP`).
    pub flags: u32,
}

impl DwzSeg {
    /// The 16-byte wire form.
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.sector.to_le_bytes());
        b[8..12].copy_from_slice(&self.num_sectors.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b
    }

    /// The payload of a request carrying `segs`.
    pub fn payload(segs: &[DwzSeg]) -> Vec<u8> {
        segs.iter().flat_map(|s| s.encode()).collect()
    }
}

/// Builds a chain descriptor by descriptor, allocating buffers from the heap.
pub struct ChainBuilder<'a> {
    mem: &'a SimMemory,
    chain: Chain,
}

impl<'a> ChainBuilder<'a> {
    /// An empty direct chain.
    pub fn new(mem: &'a SimMemory) -> Self {
        ChainBuilder {
            mem,
            chain: Chain::default(),
        }
    }

    /// Append a device-readable buffer holding `bytes`.
    pub fn readable(mut self, bytes: &[u8]) -> Result<Self, SimError> {
        let a = self.mem.alloc_bytes(bytes)?;
        self.chain.allocs.push((a, bytes.len() as u64));
        self.chain.descs.push(Desc::readable(a, bytes.len() as u32));
        Ok(self)
    }

    /// Append a device-writable buffer of `len` bytes, filled with [`POISON`].
    pub fn writable(mut self, len: u32) -> Result<Self, SimError> {
        let a = self.mem.alloc(u64::from(len), 16)?;
        self.mem.fill(a, len as usize, POISON)?;
        self.chain.allocs.push((a, u64::from(len)));
        self.chain.descs.push(Desc::writable(a, len));
        Ok(self)
    }

    /// Append a descriptor as given (no allocation).
    pub fn desc(mut self, d: Desc) -> Self {
        self.chain.descs.push(d);
        self
    }

    /// Post through an indirect table (or a raw indirect descriptor).
    pub fn indirect(mut self, ind: Indirect) -> Self {
        self.chain.indirect = ind;
        self
    }

    /// Tag the chain.
    pub fn tag(mut self, tag: u64) -> Self {
        self.chain.tag = tag;
        self
    }

    /// The chain so far (for editing before [`ChainBuilder::build`]).
    pub fn chain_mut(&mut self) -> &mut Chain {
        &mut self.chain
    }

    /// The finished chain.
    pub fn build(self) -> Chain {
        self.chain
    }
}

/// A virtio-blk request by content and layout.
#[derive(Debug, Clone, Default)]
pub struct BlkRequest {
    /// Request type.
    pub type_: u32,
    /// Header sector.
    pub sector: u64,
    /// Device-readable bytes after the header (OUT data, DISCARD/WRITE_ZEROES ranges).
    pub out: Vec<u8>,
    /// Device-writable bytes before the status byte (IN data, GET_ID buffer).
    pub in_len: u32,
    /// Split the header + out bytes into descriptors of at most this many bytes (0: the
    /// header alone, then the payload in one descriptor).
    pub out_chunk: u32,
    /// Split the in bytes into descriptors of at most this many bytes (0: one).
    pub in_chunk: u32,
    /// Put the status byte in the last data descriptor instead of its own.
    pub status_shared: bool,
    /// Post through an indirect table.
    pub indirect: bool,
    /// Tag returned in the completion.
    pub tag: u64,
}

impl BlkRequest {
    /// A request of `type_` at `sector`, no payload.
    pub fn new(type_: u32, sector: u64) -> Self {
        BlkRequest {
            type_,
            sector,
            ..Default::default()
        }
    }

    /// `VIRTIO_BLK_T_IN` of `len` bytes at `sector`.
    pub fn read(sector: u64, len: u32) -> Self {
        BlkRequest {
            in_len: len,
            ..Self::new(T_IN, sector)
        }
    }

    /// `VIRTIO_BLK_T_OUT` of `data` at `sector`.
    pub fn write(sector: u64, data: &[u8]) -> Self {
        BlkRequest {
            out: data.to_vec(),
            ..Self::new(T_OUT, sector)
        }
    }

    /// `VIRTIO_BLK_T_FLUSH`.
    pub fn flush() -> Self {
        Self::new(T_FLUSH, 0)
    }

    /// `VIRTIO_BLK_T_GET_ID` with a 20-byte buffer.
    pub fn get_id() -> Self {
        BlkRequest {
            in_len: 20,
            ..Self::new(T_GET_ID, 0)
        }
    }

    /// `VIRTIO_BLK_T_DISCARD` of `segs`.
    pub fn discard(segs: &[DwzSeg]) -> Self {
        BlkRequest {
            out: DwzSeg::payload(segs),
            ..Self::new(T_DISCARD, 0)
        }
    }

    /// `VIRTIO_BLK_T_WRITE_ZEROES` of `segs`.
    pub fn write_zeroes(segs: &[DwzSeg]) -> Self {
        BlkRequest {
            out: DwzSeg::payload(segs),
            ..Self::new(T_WRITE_ZEROES, 0)
        }
    }

    /// Split device-readable data into descriptors of at most `chunk` bytes.
    pub fn out_chunk(mut self, chunk: u32) -> Self {
        self.out_chunk = chunk;
        self
    }

    /// Split device-writable data into descriptors of at most `chunk` bytes.
    pub fn in_chunk(mut self, chunk: u32) -> Self {
        self.in_chunk = chunk;
        self
    }

    /// Post through an indirect table.
    pub fn indirect(mut self, yes: bool) -> Self {
        self.indirect = yes;
        self
    }

    /// Share the status byte's descriptor with the last data bytes.
    pub fn status_shared(mut self, yes: bool) -> Self {
        self.status_shared = yes;
        self
    }

    /// Tag the request.
    pub fn tag(mut self, tag: u64) -> Self {
        self.tag = tag;
        self
    }

    /// Descriptors needed (direct) for this layout.
    pub fn desc_count(&self) -> usize {
        let out_total = 16 + self.out.len();
        let outs = if self.out_chunk == 0 {
            1 + usize::from(!self.out.is_empty())
        } else {
            out_total.div_ceil(self.out_chunk as usize)
        };
        let ins = match (self.in_len, self.in_chunk) {
            (0, _) => 0,
            (_, 0) => 1,
            (n, c) => (n as usize).div_ceil(c as usize),
        };
        if self.indirect {
            1
        } else {
            outs + ins + usize::from(!self.status_shared || self.in_len == 0)
        }
    }

    /// Lay the request out in heap buffers.
    pub fn chain(&self, mem: &SimMemory) -> Result<Chain, SimError> {
        let mut b = ChainBuilder::new(mem).tag(self.tag);
        let mut bytes = header(self.type_, self.sector).to_vec();
        bytes.extend_from_slice(&self.out);
        if self.out_chunk == 0 {
            b = b.readable(&bytes[..16])?;
            if !self.out.is_empty() {
                b = b.readable(&self.out)?;
            }
        } else {
            for piece in bytes.chunks(self.out_chunk as usize) {
                b = b.readable(piece)?;
            }
        }
        let shared = self.status_shared && self.in_len > 0;
        let mut left = self.in_len;
        let chunk = if self.in_chunk == 0 {
            self.in_len
        } else {
            self.in_chunk
        };
        while left > 0 {
            let take = left.min(chunk);
            left -= take;
            let extra = u32::from(shared && left == 0);
            b = b.writable(take + extra)?;
        }
        if !shared {
            b = b.writable(1)?;
        }
        if self.indirect {
            b = b.indirect(Indirect::Table);
        }
        Ok(b.build())
    }
}
