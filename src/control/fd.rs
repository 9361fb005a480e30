//! Safe wrappers over `/dev/vduse/control` and `/dev/vduse/NAME`.
//!
//! Owns: every `unsafe` ioctl call of the control plane, each turned into a method that takes
//! and returns plain values, and the mmap of IOTLB regions. Must not touch: policy (what to
//! create, when to reply what) — that is [`super::device`] and [`super::daemon`].

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress};

use super::api::ControlOps;
use super::device::DeviceOps;
use crate::memory::umem::Umem;
use crate::memory::IovaRegion;
use crate::uapi::vduse::{self as u, VduseDevRequest, VduseDevResponse, VDUSE_MSG_SIZE};

/// Directory of VDUSE character devices.
pub const VDUSE_DIR: &str = "/dev/vduse";
/// The control device.
pub const CONTROL_PATH: &str = "/dev/vduse/control";

/// `/dev/vduse/control`.
#[derive(Debug)]
pub struct ControlFd {
    file: File,
}

impl ControlFd {
    /// Open the control device.
    pub fn open() -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(CONTROL_PATH)?;
        Ok(ControlFd { file })
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// `VDUSE_CREATE_DEV`.
    pub fn create_dev(&self, buf: &u::DevConfigBuf) -> Result<(), Errno> {
        // SAFETY: `buf` owns an aligned allocation holding the 336-byte header followed by
        // `config_size` bytes of config space, which is exactly what the kernel reads.
        unsafe { u::vduse_create_dev(self.fd(), buf.as_ptr()) }.map(drop)
    }

    /// `VDUSE_DESTROY_DEV`.
    pub fn destroy_dev(&self, name: &[u8; u::VDUSE_NAME_MAX]) -> Result<(), Errno> {
        // SAFETY: the kernel reads VDUSE_NAME_MAX bytes from a live array of that size.
        unsafe { u::vduse_destroy_dev(self.fd(), name) }.map(drop)
    }
}

impl ControlOps for ControlFd {
    fn set_api_version(&mut self, version: u64) -> Result<(), Errno> {
        // SAFETY: the kernel reads one u64 from a live local.
        unsafe { u::vduse_set_api_version(self.fd(), &version) }.map(drop)
    }

    fn get_api_version(&mut self) -> Result<u64, Errno> {
        let mut v = 0u64;
        // SAFETY: the kernel writes one u64 into a live local.
        unsafe { u::vduse_get_api_version(self.fd(), &mut v) }?;
        Ok(v)
    }

    fn get_features(&mut self) -> Result<u64, Errno> {
        let mut v = 0u64;
        // SAFETY: the kernel writes one u64 into a live local (or fails without writing).
        unsafe { u::vduse_get_features(self.fd(), &mut v) }?;
        Ok(v)
    }

    fn set_features(&mut self, features: u64) -> Result<(), Errno> {
        // SAFETY: the kernel reads one u64 from a live local.
        unsafe { u::vduse_set_features(self.fd(), &features) }.map(drop)
    }
}

/// One IOTLB entry and the file behind it.
#[derive(Debug)]
pub struct IotlbRegion {
    /// The entry as the kernel reported it.
    pub entry: u::VduseIotlbEntry,
    /// The file to mmap.
    pub file: File,
}

/// `/dev/vduse/NAME`.
#[derive(Debug)]
pub struct DeviceFd {
    file: File,
    path: PathBuf,
}

impl DeviceFd {
    /// Path of a device's node.
    pub fn path_of(name: &str) -> PathBuf {
        Path::new(VDUSE_DIR).join(name)
    }

    /// Open `/dev/vduse/NAME`.
    pub fn open(name: &str) -> io::Result<Self> {
        let path = Self::path_of(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)?;
        Ok(DeviceFd { file, path })
    }

    /// The node's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// `VDUSE_VQ_SETUP`.
    pub fn vq_setup(&self, index: u32, max_size: u16, group: u32) -> Result<(), Errno> {
        let cfg = u::VduseVqConfig {
            index,
            max_size,
            group,
            ..Default::default()
        };
        // SAFETY: the kernel reads one VduseVqConfig from a live local.
        unsafe { u::vduse_vq_setup(self.fd(), &cfg) }.map(drop)
    }

    /// `VDUSE_VQ_INJECT_IRQ`.
    pub fn inject_irq(&self, index: u32) -> Result<(), Errno> {
        // SAFETY: the kernel reads one u32 from a live local.
        unsafe { u::vduse_vq_inject_irq(self.fd(), &index) }.map(drop)
    }

    /// `VDUSE_DEV_SET_CONFIG` + `VDUSE_DEV_INJECT_CONFIG_IRQ`: change config space bytes and
    /// tell the driver.
    pub fn update_config(&self, offset: u32, bytes: &[u8]) -> Result<(), Errno> {
        self.set_config(offset, bytes)?;
        self.inject_config_irq()
    }

    /// `VDUSE_DEV_SET_CONFIG`: change `bytes` of the config space at `offset`.
    pub fn set_config(&self, offset: u32, bytes: &[u8]) -> Result<(), Errno> {
        let buf = u::config_data_buf(offset, bytes).map_err(|_| Errno::EINVAL)?;
        // SAFETY: `buf` owns the 8-byte header followed by `length` bytes, as the kernel reads.
        unsafe { u::vduse_dev_set_config(self.fd(), buf.as_ptr()) }.map(drop)
    }

    /// `VDUSE_DEV_INJECT_CONFIG_IRQ`: tell the driver the config space changed (EINVAL when
    /// no driver has set DRIVER_OK).
    pub fn inject_config_irq(&self) -> Result<(), Errno> {
        // SAFETY: no argument.
        unsafe { u::vduse_dev_inject_config_irq(self.fd()) }.map(drop)
    }

    /// `VDUSE_IOTLB_GET_FD` for the entry covering `iova`.
    pub fn iotlb_get_fd(&self, iova: u64) -> Result<IotlbRegion, Errno> {
        let mut entry = u::VduseIotlbEntry {
            start: iova,
            last: iova,
            ..Default::default()
        };
        // SAFETY: the kernel reads and writes one VduseIotlbEntry in a live local; on success
        // the return value is a new file descriptor that we own from here on.
        let fd = unsafe { u::vduse_iotlb_get_fd(self.fd(), &mut entry) }?;
        // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        Ok(IotlbRegion { entry, file })
    }

    /// `VDUSE_IOTLB_REG_UMEM`: back the bounce region (IOVA 0, its whole size) with `umem`.
    pub fn reg_umem(&self, umem: &Umem) -> Result<(), Errno> {
        let arg = umem_arg(umem);
        // SAFETY: the kernel reads one VduseIovaUmem from a live local and pins the pages of
        // `umem`, whose mapping is reference-counted: it stays mapped while any worker or the
        // registry holds it, and the pinned pages outlive an unmapping in any case.
        unsafe { u::vduse_iotlb_reg_umem(self.fd(), &arg) }.map(drop)
    }

    /// `VDUSE_IOTLB_DEREG_UMEM` of an area given to [`DeviceFd::reg_umem`].
    pub fn dereg_umem(&self, umem: &Umem) -> Result<(), Errno> {
        let arg = umem_arg(umem);
        // SAFETY: the kernel reads one VduseIovaUmem from a live local.
        unsafe { u::vduse_iotlb_dereg_umem(self.fd(), &arg) }.map(drop)
    }

    /// `VDUSE_IOTLB_GET_INFO` at IOVA `iova`: ENOTTY means the kernel lacks it.
    pub fn iotlb_info(&self, iova: u64) -> Result<u::VduseIovaInfo, Errno> {
        let mut info = u::VduseIovaInfo {
            start: iova,
            last: iova,
            ..Default::default()
        };
        // SAFETY: the kernel reads and writes one VduseIovaInfo in a live local.
        unsafe { u::vduse_iotlb_get_info(self.fd(), &mut info) }?;
        Ok(info)
    }
}

impl DeviceOps for DeviceFd {
    fn poll_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    fn read_request(&self) -> io::Result<VduseDevRequest> {
        let mut buf = [0u8; VDUSE_MSG_SIZE];
        let n = (&self.file).read(&mut buf)?;
        VduseDevRequest::from_bytes(&buf[..n])
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "short VDUSE message"))
    }

    fn write_response(&self, resp: &VduseDevResponse) -> io::Result<()> {
        let bytes = resp.to_bytes();
        let n = (&self.file).write(&bytes)?;
        if n != bytes.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short VDUSE reply",
            ));
        }
        Ok(())
    }

    fn driver_features(&self) -> Result<u64, Errno> {
        let mut v = 0u64;
        // SAFETY: the kernel writes one u64 into a live local.
        unsafe { u::vduse_dev_get_features(self.fd(), &mut v) }?;
        Ok(v)
    }

    fn vq_info(&self, index: u32) -> Result<u::VduseVqInfo, Errno> {
        let mut info = u::VduseVqInfo::for_index(index);
        // SAFETY: the kernel reads the index from and writes the info into a live local of
        // the right size.
        unsafe { u::vduse_vq_get_info(self.fd(), &mut info) }?;
        Ok(info)
    }

    fn set_kickfd(&self, index: u32, fd: RawFd) -> Result<(), Errno> {
        let ev = u::VduseVqEventfd { index, fd };
        // SAFETY: the kernel reads one VduseVqEventfd from a live local; it takes its own
        // reference on the eventfd.
        unsafe { u::vduse_vq_setup_kickfd(self.fd(), &ev) }.map(drop)
    }
}

/// The REG/DEREG argument for `umem` as the bounce region (IOVA 0, address space 0; the v0
/// layout's reserved words are the v1 `asid` and `reserved`, all zero).
fn umem_arg(umem: &Umem) -> u::VduseIovaUmem {
    u::VduseIovaUmem {
        uaddr: umem.as_ptr() as u64,
        iova: 0,
        size: umem.len() as u64,
        ..Default::default()
    }
}

/// mmap an IOTLB region with the protection its `perm` asks for (the fd itself is always
/// read-write, so the protection must come from `perm`), placed at its IOVA.
pub fn map_region(r: IotlbRegion) -> io::Result<IovaRegion> {
    let e = r.entry;
    let len = e
        .last
        .checked_sub(e.start)
        .and_then(|l| l.checked_add(1))
        .and_then(|l| usize::try_from(l).ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad IOTLB entry range"))?;
    let prot = match e.perm {
        u::VDUSE_ACCESS_RO => libc::PROT_READ,
        u::VDUSE_ACCESS_WO => libc::PROT_WRITE,
        u::VDUSE_ACCESS_RW => libc::PROT_READ | libc::PROT_WRITE,
        _ => return Err(io::Error::new(io::ErrorKind::InvalidData, "bad IOTLB perm")),
    };
    let region = MmapRegion::build(
        Some(FileOffset::new(r.file, e.offset)),
        len,
        prot,
        libc::MAP_SHARED,
    )
    .map_err(|e| io::Error::other(format!("mmap of IOTLB region failed: {e}")))?;
    IovaRegion::new(region, GuestAddress(e.start))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "IOTLB region overflows"))
}

/// A fresh non-blocking eventfd for kicks.
pub fn new_eventfd() -> io::Result<OwnedFd> {
    let efd = nix::sys::eventfd::EventFd::from_flags(
        nix::sys::eventfd::EfdFlags::EFD_CLOEXEC | nix::sys::eventfd::EfdFlags::EFD_NONBLOCK,
    )?;
    Ok(OwnedFd::from(efd))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn over(fd: impl Into<OwnedFd>) -> DeviceFd {
        DeviceFd {
            file: File::from(fd.into()),
            path: PathBuf::from("/dev/vduse/test"),
        }
    }

    #[test]
    fn messages_round_trip_and_eof_is_an_error() {
        let (rd, mut wr) = std::io::pipe().unwrap();
        let dev = over(rd);
        let mut req = VduseDevRequest {
            req_type: u::VDUSE_SET_STATUS,
            request_id: 42,
            ..Default::default()
        };
        req.payload[0] = 0x0f;
        wr.write_all(&req.to_bytes()).unwrap();
        assert_eq!(dev.read_request().unwrap(), req);
        drop(wr);
        let e = dev.read_request().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");

        let (mut rd, wr) = std::io::pipe().unwrap();
        let resp = VduseDevResponse::new(42, u::VDUSE_REQ_RESULT_FAILED);
        over(wr).write_response(&resp).unwrap();
        let mut back = [0u8; VDUSE_MSG_SIZE];
        rd.read_exact(&mut back).unwrap();
        assert_eq!(VduseDevResponse::from_bytes(&back), Some(resp));
    }
}
