//! The IOVA address space a queue worker sees: driver buffers and rings, mapped into this
//! process.
//!
//! Owns: the set of mapped regions (vm-memory `GuestMemoryMmap` keyed by IOVA), lazy mapping of
//! misses through a [`RegionSource`], and translation of IOVA ranges into host `iovec`s with an
//! access check. Must not touch: VDUSE ioctls (a [`RegionSource`] supplies regions), virtio
//! semantics, or I/O. All raw host pointers handed out here point into regions this space keeps
//! alive; callers must keep the space (and so the regions) alive until the kernel is done with
//! the pointers.
//!
//! [`umem`] is the zero-copy area: our own memory the kernel uses as its bounce buffer.

pub mod umem;

use std::sync::Arc;

use thiserror::Error;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress,
};

/// The collection of mapped regions, keyed by IOVA.
pub type IovaMemory = GuestMemoryMmap<()>;
/// One mapped region.
pub type IovaRegion = GuestRegionMmap<()>;

/// Why an IOVA range cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum MemoryError {
    /// No region covers this IOVA, and none could be mapped.
    #[error("IOVA {0:#x} is not mapped")]
    Unmapped(u64),
    /// The region is mapped without the needed access.
    #[error("IOVA {iova:#x} is not mapped for {}", if *write { "writing" } else { "reading" })]
    Access {
        /// The IOVA.
        iova: u64,
        /// Whether write access was needed.
        write: bool,
    },
    /// `iova + len` overflows.
    #[error("IOVA range at {0:#x} overflows")]
    Overflow(u64),
    /// A newly mapped region overlaps one already held.
    #[error("IOVA region at {0:#x} overlaps a mapped region")]
    Overlap(u64),
}

impl MemoryError {
    /// The IOVA the error is about.
    pub fn iova(&self) -> u64 {
        match *self {
            MemoryError::Unmapped(a)
            | MemoryError::Access { iova: a, .. }
            | MemoryError::Overflow(a)
            | MemoryError::Overlap(a) => a,
        }
    }
}

/// Supplies the region covering an IOVA on a miss (VDUSE: `VDUSE_IOTLB_GET_FD` + mmap; the
/// simulator: its own memory).
pub trait RegionSource {
    /// The region that covers `iova`, or `None` if the IOVA is not mapped at all.
    fn region_for(&mut self, iova: u64) -> Option<IovaRegion>;
}

/// A [`RegionSource`] with nothing behind it: every miss stays a miss.
pub struct NoRegions;
impl RegionSource for NoRegions {
    fn region_for(&mut self, _iova: u64) -> Option<IovaRegion> {
        None
    }
}

fn covers(r: &IovaRegion, iova: u64) -> bool {
    r.start_addr().0 <= iova && iova <= r.last_addr().0
}

/// The mapped IOVA space of one worker.
#[derive(Default)]
pub struct IovaSpace {
    mem: IovaMemory,
    /// The same regions as `mem`, as the `Arc`s a lookup can keep.
    regions: Vec<Arc<IovaRegion>>,
    /// The region the last lookup found: most accesses of a request (and of the next one)
    /// fall in the same region, so a hit skips the search.
    last: Option<Arc<IovaRegion>>,
}

impl IovaSpace {
    /// An empty space.
    pub fn new() -> Self {
        Self::default()
    }

    /// The regions, for the queue layer's ring accesses.
    pub fn memory(&self) -> &IovaMemory {
        &self.mem
    }

    /// Drop every mapping.
    pub fn clear(&mut self) {
        self.mem = IovaMemory::default();
        self.regions.clear();
        self.last = None;
    }

    /// Add a region.
    pub fn insert(&mut self, region: IovaRegion) -> Result<(), MemoryError> {
        self.insert_arc(Arc::new(region))
    }

    fn insert_arc(&mut self, region: Arc<IovaRegion>) -> Result<(), MemoryError> {
        let start = region.start_addr().0;
        self.mem = self
            .mem
            .insert_region(Arc::clone(&region))
            .map_err(|_| MemoryError::Overlap(start))?;
        self.regions.push(region);
        Ok(())
    }

    fn region_at(
        &mut self,
        src: &mut dyn RegionSource,
        iova: u64,
    ) -> Result<Arc<IovaRegion>, MemoryError> {
        if let Some(r) = &self.last {
            if covers(r, iova) {
                return Ok(Arc::clone(r));
            }
        }
        let found = self
            .regions
            .iter()
            .find(|r| covers(r, iova))
            .map(Arc::clone);
        let region = match found {
            Some(r) => r,
            None => {
                let region = src.region_for(iova).ok_or(MemoryError::Unmapped(iova))?;
                if !covers(&region, iova) {
                    return Err(MemoryError::Unmapped(iova));
                }
                let region = Arc::new(region);
                self.insert_arc(Arc::clone(&region))?;
                region
            }
        };
        self.last = Some(Arc::clone(&region));
        Ok(region)
    }

    /// Walk `[iova, iova+len)` region by region, mapping misses, checking access, and call
    /// `f(host_ptr, len)` for each piece.
    fn walk(
        &mut self,
        src: &mut dyn RegionSource,
        iova: u64,
        len: u64,
        write: bool,
        mut f: impl FnMut(*mut u8, usize),
    ) -> Result<(), MemoryError> {
        iova.checked_add(len).ok_or(MemoryError::Overflow(iova))?;
        let mut at = iova;
        let mut left = len;
        while left > 0 {
            let region = self.region_at(src, at)?;
            let prot = region.prot();
            let needed = if write {
                libc::PROT_WRITE
            } else {
                libc::PROT_READ
            };
            if prot & needed == 0 {
                return Err(MemoryError::Access { iova: at, write });
            }
            let off = at - region.start_addr().0;
            let avail = region.len() - off;
            let take = avail.min(left);
            let ptr = region
                .get_host_address(MemoryRegionAddress(off))
                .map_err(|_| MemoryError::Unmapped(at))?;
            // `take <= region.len()`, which is a usize-sized mapping.
            f(ptr, take as usize);
            at += take;
            left -= take;
        }
        Ok(())
    }

    /// Make sure `[iova, iova+len)` is mapped with the given access.
    pub fn ensure(
        &mut self,
        src: &mut dyn RegionSource,
        iova: u64,
        len: u64,
        write: bool,
    ) -> Result<(), MemoryError> {
        self.walk(src, iova, len, write, |_, _| {})
    }

    /// Append the host ranges of `[iova, iova+len)` to `out`.
    pub fn translate(
        &mut self,
        src: &mut dyn RegionSource,
        iova: u64,
        len: u64,
        write: bool,
        out: &mut Vec<libc::iovec>,
    ) -> Result<(), MemoryError> {
        self.walk(src, iova, len, write, |p, l| {
            out.push(libc::iovec {
                iov_base: p.cast(),
                iov_len: l,
            })
        })
    }

    /// Copy `buf.len()` bytes from IOVA `iova`.
    pub fn read(
        &mut self,
        src: &mut dyn RegionSource,
        iova: u64,
        buf: &mut [u8],
    ) -> Result<(), MemoryError> {
        if let Some((r, off)) = self.within_one(src, iova, buf.len(), false)? {
            return r
                .read_slice(buf, MemoryRegionAddress(off))
                .map_err(|_| MemoryError::Unmapped(iova));
        }
        self.ensure(src, iova, buf.len() as u64, false)?;
        self.mem
            .read_slice(buf, GuestAddress(iova))
            .map_err(|_| MemoryError::Unmapped(iova))
    }

    /// Copy `buf` to IOVA `iova`.
    pub fn write(
        &mut self,
        src: &mut dyn RegionSource,
        iova: u64,
        buf: &[u8],
    ) -> Result<(), MemoryError> {
        if let Some((r, off)) = self.within_one(src, iova, buf.len(), true)? {
            return r
                .write_slice(buf, MemoryRegionAddress(off))
                .map_err(|_| MemoryError::Unmapped(iova));
        }
        self.ensure(src, iova, buf.len() as u64, true)?;
        self.mem
            .write_slice(buf, GuestAddress(iova))
            .map_err(|_| MemoryError::Unmapped(iova))
    }

    /// The region and offset of `[iova, iova+len)` if one region holds all of it with the
    /// access needed; `None` if it spans regions (the caller then goes piece by piece).
    fn within_one(
        &mut self,
        src: &mut dyn RegionSource,
        iova: u64,
        len: usize,
        write: bool,
    ) -> Result<Option<(Arc<IovaRegion>, u64)>, MemoryError> {
        if len == 0 {
            return Ok(None);
        }
        let r = self.region_at(src, iova)?;
        if r.prot()
            & if write {
                libc::PROT_WRITE
            } else {
                libc::PROT_READ
            }
            == 0
        {
            return Err(MemoryError::Access { iova, write });
        }
        let off = iova - r.start_addr().0;
        let fits = off
            .checked_add(len as u64)
            .is_some_and(|end| end <= r.len());
        Ok(fits.then_some((r, off)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::mmap::MmapRegion;

    fn region(base: u64, len: usize, prot: i32) -> IovaRegion {
        let m = MmapRegion::<()>::build(None, len, prot, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS)
            .unwrap();
        IovaRegion::new(m, GuestAddress(base)).unwrap()
    }

    struct Lazy(Vec<(u64, usize, i32)>, usize);
    impl RegionSource for Lazy {
        fn region_for(&mut self, iova: u64) -> Option<IovaRegion> {
            self.1 += 1;
            self.0
                .iter()
                .find(|(b, l, _)| *b <= iova && iova < b + *l as u64)
                .map(|&(b, l, p)| region(b, l, p))
        }
    }

    #[test]
    fn misses_are_mapped_once_and_ranges_split_at_region_edges() {
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let mut src = Lazy(vec![(0x10000, 0x1000, rw), (0x11000, 0x1000, rw)], 0);
        let mut s = IovaSpace::new();
        let mut iov = Vec::new();
        s.translate(&mut src, 0x10800, 0x1000, true, &mut iov)
            .unwrap();
        assert_eq!(iov.len(), 2);
        assert_eq!(iov[0].iov_len + iov[1].iov_len, 0x1000);
        assert_eq!(src.1, 2);
        s.write(&mut src, 0x10ffe, &[1, 2, 3, 4]).unwrap();
        let mut b = [0u8; 4];
        s.read(&mut src, 0x10ffe, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        assert_eq!(src.1, 2, "no further mapping calls");
    }

    #[test]
    fn access_and_holes_are_refused() {
        let mut src = Lazy(vec![(0x10000, 0x1000, libc::PROT_READ)], 0);
        let mut s = IovaSpace::new();
        assert_eq!(
            s.write(&mut src, 0x10000, &[0]),
            Err(MemoryError::Access {
                iova: 0x10000,
                write: true
            })
        );
        assert_eq!(
            s.ensure(&mut src, 0x10f00, 0x200, false),
            Err(MemoryError::Unmapped(0x11000))
        );
        assert_eq!(
            s.ensure(&mut src, u64::MAX - 2, 4, false),
            Err(MemoryError::Overflow(u64::MAX - 2))
        );
        assert_eq!(
            s.ensure(&mut NoRegions, 0x20000, 1, false),
            Err(MemoryError::Unmapped(0x20000))
        );
    }
}
