//! The zero-copy area: memory of our own that the kernel uses as the device's bounce buffer
//! (`VDUSE_IOTLB_REG_UMEM`) and that each worker registers with its io_uring as fixed buffers.
//!
//! Owns: allocating the area (2 MiB hugetlb pages when the system has them reserved, else 4 KiB
//! pages), raising `RLIMIT_MEMLOCK` so the kernel may pin it, cutting it into fixed-buffer slots
//! of at most 1 GiB, and telling which slot a host range lies in. Must not touch: VDUSE ioctls
//! (the control plane registers the area) or io_uring (the worker registers the slots).
//!
//! The mapping is held by an `Arc`: every IOVA region and every worker that points into it keeps
//! it alive, so nothing the kernel may still write into is unmapped under it.

use std::io;
use std::sync::Arc;

use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};
use vm_memory::mmap::MmapRegion;
use vm_memory::GuestAddress;

use super::IovaRegion;

/// Largest fixed buffer io_uring takes in one slot.
pub const FIXED_SLOT_MAX: usize = 1 << 30;
/// The hugetlb page size tried first.
const HUGE_PAGE: usize = 2 << 20;

/// A page-aligned, read-write area of host memory shared with the kernel.
#[derive(Debug, Clone)]
pub struct Umem {
    map: Arc<MmapRegion<()>>,
    hugepages: bool,
}

impl Umem {
    /// Allocate `len` bytes (a multiple of the page size): hugetlb pages if `len` is a
    /// multiple of 2 MiB and enough are reserved, else ordinary anonymous pages.
    pub fn allocate(len: usize) -> io::Result<Umem> {
        let page = page_size();
        if len == 0 || !len.is_multiple_of(page) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("umem size {len} is not a positive multiple of the page size {page}"),
            ));
        }
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        if len.is_multiple_of(HUGE_PAGE) {
            if let Ok(map) = MmapRegion::build(None, len, prot, anon | libc::MAP_HUGETLB) {
                return Ok(Umem {
                    map: Arc::new(map),
                    hugepages: true,
                });
            }
        }
        let map = MmapRegion::build(None, len, prot, anon)
            .map_err(|e| io::Error::other(format!("cannot allocate {len} bytes of umem: {e}")))?;
        Ok(Umem {
            map: Arc::new(map),
            hugepages: false,
        })
    }

    /// An area over a mapping someone else made (the simulator's driver memory).
    pub fn over(map: Arc<MmapRegion<()>>) -> Umem {
        Umem {
            map,
            hugepages: false,
        }
    }

    /// Start of the area.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.map.size()
    }

    /// Whether the area has no bytes (never true for an allocated one).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether it is made of hugetlb pages.
    pub fn hugepages(&self) -> bool {
        self.hugepages
    }

    /// The area as an IOVA region starting at `iova` (the bounce region starts at 0).
    pub fn region(&self, iova: u64) -> Option<IovaRegion> {
        IovaRegion::with_arc(Arc::clone(&self.map), GuestAddress(iova))
    }

    /// The area cut into io_uring fixed-buffer slots: slot `i` is `[i GiB, (i+1) GiB)`.
    pub fn fixed_slots(&self) -> Vec<libc::iovec> {
        let base = self.as_ptr();
        (0..self.len())
            .step_by(FIXED_SLOT_MAX)
            .map(|off| libc::iovec {
                // `off < len`: inside the mapping.
                iov_base: base.wrapping_add(off).cast(),
                iov_len: (self.len() - off).min(FIXED_SLOT_MAX),
            })
            .collect()
    }

    /// The slot that holds all of `[ptr, ptr+len)`, if one does.
    pub fn slot_of(&self, ptr: *const u8, len: usize) -> Option<u16> {
        let off = (ptr as usize).checked_sub(self.as_ptr() as usize)?;
        let end = off.checked_add(len)?;
        if end > self.len() {
            return None;
        }
        let slot = off / FIXED_SLOT_MAX;
        if end > (slot + 1) * FIXED_SLOT_MAX {
            return None;
        }
        u16::try_from(slot).ok()
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf reads a constant of the running system; no memory is involved.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).unwrap_or(4096)
}

/// Make sure this process may pin `bytes` more memory: raise `RLIMIT_MEMLOCK` to unlimited if
/// we may (CAP_SYS_RESOURCE), else the soft limit to the hard one. Returns the soft limit now
/// in force, or the error that says why it is still too low.
pub fn raise_memlock(bytes: u64) -> io::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_MEMLOCK).map_err(io::Error::from)?;
    if soft == RLIM_INFINITY || soft >= bytes {
        return Ok(soft);
    }
    if setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY).is_ok() {
        return Ok(RLIM_INFINITY);
    }
    if hard == RLIM_INFINITY || hard >= bytes {
        setrlimit(Resource::RLIMIT_MEMLOCK, hard, hard).map_err(io::Error::from)?;
        return Ok(hard);
    }
    Err(io::Error::other(format!(
        "RLIMIT_MEMLOCK is {soft} bytes (hard limit {hard}), the zero-copy area needs {bytes}: \
         raise it (ulimit -l, LimitMEMLOCK=) or run with CAP_SYS_RESOURCE"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryRegion, MemoryRegionAddress};

    #[test]
    fn slots_cover_the_area_and_ranges_find_theirs() {
        let u = Umem::allocate(8 << 20).unwrap();
        let slots = u.fixed_slots();
        assert_eq!(slots.len(), 1);
        assert_eq!(slots[0].iov_base.cast::<u8>(), u.as_ptr());
        assert_eq!(slots[0].iov_len, 8 << 20);
        let p = u.as_ptr();
        assert_eq!(u.slot_of(p, 4096), Some(0));
        assert_eq!(u.slot_of(p.wrapping_add((8 << 20) - 512), 512), Some(0));
        assert_eq!(u.slot_of(p.wrapping_add((8 << 20) - 512), 513), None);
        assert_eq!(u.slot_of(p.wrapping_sub(1), 2), None);
        assert_eq!(u.slot_of(p.wrapping_add(usize::MAX / 2), 1), None);
    }

    #[test]
    fn the_region_is_the_same_memory() {
        let u = Umem::allocate(1 << 20).unwrap();
        let r = u.region(0).unwrap();
        r.write_slice(&[7, 8, 9], MemoryRegionAddress(4096))
            .unwrap();
        // SAFETY: 4096 + 3 < 1 MiB, inside the mapping `u` keeps alive.
        let got = unsafe { std::slice::from_raw_parts(u.as_ptr().add(4096), 3) };
        assert_eq!(got, [7, 8, 9]);
        assert_eq!(r.len(), 1 << 20);
    }

    #[test]
    fn sizes_that_are_not_pages_are_refused() {
        assert!(Umem::allocate(0).is_err());
        assert!(Umem::allocate(4097).is_err());
    }

    #[test]
    fn memlock_already_high_enough_is_left_alone() {
        let (soft, _) = getrlimit(Resource::RLIMIT_MEMLOCK).unwrap();
        assert_eq!(raise_memlock(0).unwrap(), soft);
    }
}
