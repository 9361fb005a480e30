//! A userspace vhost-vdpa driver: the simulator's memory and split rings, handed to a device
//! that the kernel bound to `vhost_vdpa` (`/dev/vhost-vdpa-N`).
//!
//! This is what a VMM does with a vDPA device, in miniature (QEMU's vhost-vdpa backend): own
//! the memory, map it into the device's IOTLB, negotiate features, set up each vring (size,
//! addresses, base, kick and call eventfds, enable) and set DRIVER_OK. Requests are then
//! posted through [`SimQueue`] exactly as against an in-process worker, but every byte now
//! crosses the kernel: vhost_vdpa turns the IOTLB writes into VDUSE `UPDATE_IOTLB` messages,
//! the kick eventfd into a VDUSE kick, and `VDUSE_VQ_INJECT_IRQ` into the call eventfd.
//! The ioctls are rust-vmm's `vhost` crate (`vhost_kern::vdpa`).
//!
//! The memory is [`SimMemory`]: memfd-backed and `MAP_SHARED`, which vhost_vdpa needs (VDUSE's
//! `IOTLB_GET_FD` hands the device the very file the client mapped; anonymous or private
//! memory gives the device no entries at all).
//!
//! Owns: the vhost-vdpa fd, the driver-side queues and memory. Must not touch: anything of
//! the daemon; it talks to it only through the kernel. Used by the `vduse-blkd-vhost` tool.

use std::os::fd::{IntoRawFd, OwnedFd};
use std::sync::Arc;

use thiserror::Error;
use vhost::vdpa::VhostVdpa;
use vhost::vhost_kern::vdpa::VhostKernVdpa;
use vhost::vhost_kern::VhostKernFeatures;
use vhost::{VhostBackend, VringConfigData};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::memory::{SimMemory, PROT_RW};
use super::queue::{QueueLayout, SimQueue};
use super::SimError;
use crate::blk as b;
use crate::uapi::virtio as vf;

/// `VHOST_BACKEND_F_IOTLB_MSG_V2` (`linux/vhost_types.h`): IOTLB updates as `vhost_msg_v2`.
pub const BACKEND_F_IOTLB_MSG_V2: u64 = 1 << 1;
/// `VHOST_BACKEND_F_SUSPEND`: the device can be suspended (`VHOST_VDPA_SUSPEND`).
pub const BACKEND_F_SUSPEND: u64 = 1 << 4;

/// Where the driver's memory starts in the IOVA space (any address works; not 0, so that a
/// zeroed descriptor points nowhere).
pub const MEM_IOVA: u64 = 0x10_0000;

/// What went wrong driving the device.
#[derive(Debug, Error)]
pub enum VhostError {
    /// A vhost-vdpa ioctl failed.
    #[error("{op}")]
    Ioctl {
        /// Which step.
        op: &'static str,
        /// The crate's error (with the errno).
        #[source]
        source: vhost::Error,
    },
    /// The driver side (memory, rings) failed.
    #[error(transparent)]
    Sim(#[from] SimError),
    /// The device is not what this driver can drive.
    #[error("{0}")]
    Unsupported(String),
}

fn ioctl(op: &'static str) -> impl FnOnce(vhost::Error) -> VhostError {
    move |source| VhostError::Ioctl { op, source }
}

/// How to set the device up.
#[derive(Debug, Clone)]
pub struct VhostConfig {
    /// `/dev/vhost-vdpa-N`.
    pub path: String,
    /// Queues to set up (at most the device's; 0 means all of them).
    pub queues: u16,
    /// Queue size (at most the device's maximum).
    pub queue_size: u16,
    /// Bytes of driver memory for rings and buffers.
    pub mem_size: u64,
    /// Negotiate `VIRTIO_F_EVENT_IDX` if the device offers it.
    pub event_idx: bool,
}

impl VhostConfig {
    /// Every queue of the device at `path`, 128 entries each, 32 MiB of memory, EVENT_IDX.
    pub fn new(path: &str) -> Self {
        VhostConfig {
            path: path.to_owned(),
            queues: 0,
            queue_size: 128,
            mem_size: 32 << 20,
            event_idx: true,
        }
    }
}

/// A virtio-blk device driven through vhost-vdpa, DRIVER_OK set.
pub struct VhostDriver {
    vdpa: VhostKernVdpa<Arc<GuestMemoryMmap<()>>>,
    /// The driver's memory (rings and request buffers).
    pub mem: SimMemory,
    /// The driver side of each vring set up, by index.
    pub queues: Vec<SimQueue>,
    /// The device's capacity in 512-byte sectors.
    pub capacity: u64,
    /// The features negotiated.
    pub features: u64,
    /// The vhost backend features acknowledged.
    pub backend_features: u64,
}

/// The virtio-blk features this driver accepts when offered.
fn wanted_features(event_idx: bool) -> u64 {
    let mut f = vf::feature_mask(vf::VIRTIO_F_VERSION_1)
        | vf::feature_mask(vf::VIRTIO_F_ACCESS_PLATFORM)
        | vf::feature_mask(vf::VIRTIO_F_INDIRECT_DESC)
        | vf::feature_mask(b::VIRTIO_BLK_F_FLUSH)
        | vf::feature_mask(b::VIRTIO_BLK_F_MQ)
        | vf::feature_mask(b::VIRTIO_BLK_F_BLK_SIZE)
        | vf::feature_mask(b::VIRTIO_BLK_F_SEG_MAX);
    if event_idx {
        f |= vf::feature_mask(vf::VIRTIO_F_EVENT_IDX);
    }
    f
}

/// A kernel-ready eventfd from one of the queue's.
fn vmm_eventfd(fd: OwnedFd) -> EventFd {
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` is an eventfd we own and give up here (`into_raw_fd`), so the new
    // `EventFd` is its only owner and closes it exactly once.
    unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) }
}

impl VhostDriver {
    /// Open the device, map memory, negotiate, set up the queues and set DRIVER_OK.
    pub fn open(cfg: &VhostConfig) -> Result<Self, VhostError> {
        let mut vdpa = VhostKernVdpa::new(&cfg.path, Arc::new(GuestMemoryMmap::<()>::default()))
            .map_err(ioctl("open"))?;
        vdpa.set_owner().map_err(ioctl("VHOST_SET_OWNER"))?;
        let offered = vdpa
            .get_backend_features()
            .map_err(ioctl("VHOST_GET_BACKEND_FEATURES"))?;
        if offered & BACKEND_F_IOTLB_MSG_V2 == 0 {
            return Err(VhostError::Unsupported(format!(
                "backend features {offered:#x} lack IOTLB_MSG_V2"
            )));
        }
        let backend_features = offered & (BACKEND_F_IOTLB_MSG_V2 | BACKEND_F_SUSPEND);
        vdpa.set_backend_features(backend_features)
            .map_err(ioctl("VHOST_SET_BACKEND_FEATURES"))?;
        let id = vdpa
            .get_device_id()
            .map_err(ioctl("VHOST_VDPA_GET_DEVICE_ID"))?;
        if id != vf::VIRTIO_ID_BLOCK {
            return Err(VhostError::Unsupported(format!(
                "device ID {id}, not a block device"
            )));
        }
        let mut d = VhostDriver {
            vdpa,
            mem: SimMemory::new(),
            queues: Vec::new(),
            capacity: 0,
            features: 0,
            backend_features,
        };
        d.mem.add_heap(MEM_IOVA, cfg.mem_size)?;
        d.map_memory()?;
        d.negotiate(cfg)?;
        d.setup_queues(cfg)?;
        d.set_status(
            vf::STATUS_ACKNOWLEDGE
                | vf::STATUS_DRIVER
                | vf::STATUS_FEATURES_OK
                | vf::STATUS_DRIVER_OK,
        )?;
        Ok(d)
    }

    fn set_status(&self, status: u8) -> Result<(), VhostError> {
        self.vdpa
            .set_status(status)
            .map_err(ioctl("VHOST_VDPA_SET_STATUS"))?;
        let got = self
            .vdpa
            .get_status()
            .map_err(ioctl("VHOST_VDPA_GET_STATUS"))?;
        if got != status {
            return Err(VhostError::Unsupported(format!(
                "device status {got:#x} after setting {status:#x}"
            )));
        }
        Ok(())
    }

    /// Every region of the driver's memory, read-write, into the device's IOTLB.
    fn map_memory(&self) -> Result<(), VhostError> {
        for (iova, len, host) in self.mem.driver_mappings() {
            self.vdpa
                .dma_map(iova, len, host, false)
                .map_err(ioctl("IOTLB update (map)"))?;
        }
        Ok(())
    }

    fn negotiate(&mut self, cfg: &VhostConfig) -> Result<(), VhostError> {
        self.set_status(0)?;
        self.set_status(vf::STATUS_ACKNOWLEDGE)?;
        self.set_status(vf::STATUS_ACKNOWLEDGE | vf::STATUS_DRIVER)?;
        let offered = self
            .vdpa
            .get_features()
            .map_err(ioctl("VHOST_GET_FEATURES"))?;
        let needed = vf::feature_mask(vf::VIRTIO_F_VERSION_1)
            | vf::feature_mask(vf::VIRTIO_F_ACCESS_PLATFORM);
        if offered & needed != needed {
            return Err(VhostError::Unsupported(format!(
                "device features {offered:#x} lack VERSION_1/ACCESS_PLATFORM"
            )));
        }
        self.features = offered & wanted_features(cfg.event_idx);
        self.vdpa
            .set_features(self.features)
            .map_err(ioctl("VHOST_SET_FEATURES"))?;
        self.set_status(vf::STATUS_ACKNOWLEDGE | vf::STATUS_DRIVER | vf::STATUS_FEATURES_OK)?;
        let mut cap = [0u8; 8];
        self.vdpa
            .get_config(0, &mut cap)
            .map_err(ioctl("VHOST_VDPA_GET_CONFIG"))?;
        self.capacity = u64::from_le_bytes(cap);
        Ok(())
    }

    fn setup_queues(&mut self, cfg: &VhostConfig) -> Result<(), VhostError> {
        let count = self
            .vdpa
            .get_vqs_count()
            .map_err(ioctl("VHOST_VDPA_GET_VQS_COUNT"))?;
        let count = u16::try_from(count).unwrap_or(u16::MAX);
        let n = if cfg.queues == 0 {
            count
        } else {
            cfg.queues.min(count)
        };
        let max = self
            .vdpa
            .get_vring_num()
            .map_err(ioctl("VHOST_VDPA_GET_VRING_NUM"))?;
        let size = cfg.queue_size.min(max);
        if !size.is_power_of_two() {
            return Err(VhostError::Unsupported(format!(
                "queue size {size} (device maximum {max})"
            )));
        }
        let event_idx = self.features & vf::feature_mask(vf::VIRTIO_F_EVENT_IDX) != 0;
        for q in 0..n {
            let (_, len) = QueueLayout::contiguous(0, size);
            let base = self.mem.alloc(len, 4096)?;
            let (layout, _) = QueueLayout::contiguous(base, size);
            let mut sq = SimQueue::new(self.mem.clone(), q, size, layout, event_idx)?;
            let (kick, call) = sq.connect_kernel()?;
            let i = usize::from(q);
            self.vdpa
                .set_vring_num(i, size)
                .map_err(ioctl("VHOST_SET_VRING_NUM"))?;
            let ring = VringConfigData {
                queue_max_size: max,
                queue_size: size,
                flags: 0,
                desc_table_addr: layout.desc,
                used_ring_addr: layout.used,
                avail_ring_addr: layout.avail,
                log_addr: None,
            };
            // The inherent method: vDPA takes IOVAs as they are (the trait's would translate
            // them through a guest memory map).
            VhostKernVdpa::set_vring_addr(&self.vdpa, i, &ring)
                .map_err(ioctl("VHOST_SET_VRING_ADDR"))?;
            self.vdpa
                .set_vring_base(i, 0)
                .map_err(ioctl("VHOST_SET_VRING_BASE"))?;
            self.vdpa
                .set_vring_kick(i, &vmm_eventfd(kick))
                .map_err(ioctl("VHOST_SET_VRING_KICK"))?;
            self.vdpa
                .set_vring_call(i, &vmm_eventfd(call))
                .map_err(ioctl("VHOST_SET_VRING_CALL"))?;
            self.set_queue_enabled(q, true)?;
            self.queues.push(sq);
        }
        Ok(())
    }

    /// Add `len` bytes of read-write driver memory at `iova` and map them into the device's
    /// IOTLB (one `VHOST_IOTLB_UPDATE`: the device's daemon sees one `VDUSE_UPDATE_IOTLB`).
    pub fn map_region(&self, iova: u64, len: u64) -> Result<(), VhostError> {
        self.mem.add_region(iova, len, PROT_RW)?;
        let (_, _, host) = self
            .mem
            .driver_mappings()
            .into_iter()
            .find(|&(at, ..)| at == iova)
            .ok_or(SimError::BadRegion(iova))?;
        self.vdpa
            .dma_map(iova, len, host, false)
            .map_err(ioctl("IOTLB update (map)"))
    }

    /// Remove the mapping at `[iova, iova + len)` from the device's IOTLB
    /// (`VHOST_IOTLB_INVALIDATE`); the driver keeps the memory. vhost drops every IOTLB entry
    /// that overlaps the range, so name exactly one [`Self::map_region`] mapping.
    pub fn unmap_region(&self, iova: u64, len: u64) -> Result<(), VhostError> {
        self.vdpa
            .dma_unmap(iova, len)
            .map_err(ioctl("IOTLB invalidate (unmap)"))
    }

    /// `VHOST_VDPA_SET_VRING_ENABLE`.
    pub fn set_queue_enabled(&self, q: u16, on: bool) -> Result<(), VhostError> {
        self.vdpa
            .set_vring_enable(usize::from(q), on)
            .map_err(ioctl("VHOST_VDPA_SET_VRING_ENABLE"))
    }

    /// `VHOST_VDPA_SUSPEND` (the device must have offered `VHOST_BACKEND_F_SUSPEND`).
    pub fn suspend(&self) -> Result<(), VhostError> {
        if self.backend_features & BACKEND_F_SUSPEND == 0 {
            return Err(VhostError::Unsupported(
                "the device does not offer VHOST_BACKEND_F_SUSPEND".into(),
            ));
        }
        self.vdpa.suspend().map_err(ioctl("VHOST_VDPA_SUSPEND"))
    }

    /// `VHOST_GET_VRING_BASE`: where the device says queue `q` is (its next avail index).
    pub fn vring_base(&self, q: u16) -> Result<u32, VhostError> {
        self.vdpa
            .get_vring_base(usize::from(q))
            .map_err(ioctl("VHOST_GET_VRING_BASE"))
    }

    /// The vhost backend features acknowledged (for reports).
    pub fn acked_backend_features(&self) -> u64 {
        self.vdpa.get_backend_features_acked()
    }

    /// Reset the device (status 0). The queues are unusable afterwards.
    pub fn reset(&self) -> Result<(), VhostError> {
        self.set_status(0)
    }
}
