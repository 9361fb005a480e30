//! Zero copy on VDUSE: our own memory as the device's bounce buffer (`VDUSE_IOTLB_REG_UMEM`).
//!
//! Owns: the one registration of a device (shared by its workers), when it is made and undone,
//! and what a worker is told ([`ZeroCopy`]). The rules come from the kernel (see
//! `shared/research/vduse-umem.md`):
//! - the bounce region exists only once the driver has mapped its first request, so the
//!   registration is made lazily, by the first worker that misses on an IOVA (which happens
//!   before it touches any data), never at DRIVER_OK;
//! - a re-attach (`vdpa dev del` + `add`) on 7.2 silently drops the user pages while
//!   `REG_UMEM` still answers EEXIST: so the registration is undone at every reset (after the
//!   workers stopped, before the reply), and an EEXIST is answered with DEREG + REG;
//! - the kernel pins the pages against `RLIMIT_MEMLOCK`, which is raised first;
//! - under vhost_vdpa the IOVA space is the VM's, without `VDUSE_IOVA_CAP_UMEM`: no zero copy.
//!
//! Must not touch: the workers' io_uring (a worker registers the area as fixed buffers itself)
//! or the message loop's policy (it calls [`UmemRegistry::reset`]).

use std::sync::{Arc, Mutex, MutexGuard};

use log::{info, warn};
use nix::errno::Errno;

use super::fd::DeviceFd;
use crate::memory::umem::{raise_memlock, Umem};
use crate::memory::IovaRegion;
use crate::uapi::vduse as u;
use crate::worker::ZeroCopy;

/// `serve --zero-copy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ZeroCopyMode {
    /// Use it where the kernel allows, else the bounce mmap.
    #[default]
    Auto,
    /// Require it: a device where the kernel refuses stops with the reason.
    On,
    /// Never: data goes through the kernel's bounce pages, mmap'd from `VDUSE_IOTLB_GET_FD`.
    Off,
}

enum State {
    /// Not tried since the last reset (or not possible yet).
    Unknown,
    /// Registered: the bounce region is `umem`.
    Registered(Umem),
    /// Not possible on this attach.
    Unavailable(String),
}

struct Inner {
    state: State,
    /// The area of an earlier attach, reused when the bounce size is the same.
    spare: Option<Umem>,
}

/// The zero-copy registration of one device, shared by its workers' edges and the control
/// thread.
pub struct UmemRegistry {
    mode: ZeroCopyMode,
    queues: u16,
    dev: Arc<DeviceFd>,
    inner: Mutex<Inner>,
}

impl UmemRegistry {
    /// The registry of `dev`, whose `queues` workers each register the area.
    pub fn new(dev: Arc<DeviceFd>, mode: ZeroCopyMode, queues: u16) -> Arc<Self> {
        Arc::new(UmemRegistry {
            mode,
            queues,
            dev,
            inner: Mutex::new(Inner {
                state: State::Unknown,
                spare: None,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves a consistent state (every field is assigned
        // whole): keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The zero-copy region covering `iova`, registering the area first if that is possible
    /// now; `None`: `iova` is not in it (or there is none) and comes from the IOTLB.
    pub fn region_for(&self, iova: u64) -> Option<IovaRegion> {
        match self.status(false) {
            ZeroCopy::On(umem) if iova < umem.len() as u64 => umem.region(0),
            _ => None,
        }
    }

    /// Register if not yet done and possible; what a worker should do. `served`: the asking
    /// worker has taken requests, so a bounce region would exist by now if the driver used
    /// one (virtio_vdpa maps every buffer through it; vhost_vdpa maps the VM's memory).
    pub fn status(&self, served: bool) -> ZeroCopy {
        if self.mode == ZeroCopyMode::Off {
            return ZeroCopy::Off;
        }
        let mut inner = self.lock();
        if matches!(inner.state, State::Unknown) {
            match self.try_register(&mut inner) {
                Ok(Some(umem)) => inner.state = State::Registered(umem),
                Ok(None) if !served => return ZeroCopy::Pending,
                r => {
                    let reason = r.err().unwrap_or_else(|| {
                        "requests came without a bounce region (the driver is not virtio_vdpa)"
                            .into()
                    });
                    if self.mode == ZeroCopyMode::Auto {
                        warn!("zero copy off: {reason}");
                    }
                    inner.state = State::Unavailable(reason);
                }
            }
        }
        match &inner.state {
            State::Registered(umem) => ZeroCopy::On(umem.clone()),
            State::Unavailable(reason) if self.mode == ZeroCopyMode::On => {
                ZeroCopy::Failed(reason.clone())
            }
            State::Unavailable(_) | State::Unknown => ZeroCopy::Off,
        }
    }

    /// `Ok(None)`: the bounce region does not exist yet.
    fn try_register(&self, inner: &mut Inner) -> Result<Option<Umem>, String> {
        let info = match self.dev.iotlb_info(0) {
            Ok(info) => info,
            Err(Errno::ENOTTY) => {
                return Err("the kernel has no VDUSE_IOTLB_GET_INFO / REG_UMEM".into())
            }
            // EINVAL: nothing mapped at IOVA 0 yet.
            Err(Errno::EINVAL) => return Ok(None),
            Err(e) => return Err(format!("VDUSE_IOTLB_GET_INFO at IOVA 0 failed: {e}")),
        };
        if info.capability & u::VDUSE_IOVA_CAP_UMEM == 0 || info.start != 0 {
            return Err(format!(
                "the IOVA region at 0 ({:#x}-{:#x}) cannot be backed by user memory (vhost_vdpa \
                 maps the VM's memory there)",
                info.start, info.last
            ));
        }
        let size = info
            .last
            .checked_add(1)
            .and_then(|s| usize::try_from(s).ok())
            .ok_or_else(|| format!("bounce region ends at {:#x}", info.last))?;
        let umem = match inner.spare.take() {
            Some(u) if u.len() == size => u,
            _ => {
                // The area, and (6.12, without CAP_IPC_LOCK) each worker's ring pinning it
                // again as fixed buffers.
                let pins = u64::from(self.queues) + 1;
                raise_memlock(pins * size as u64).map_err(|e| e.to_string())?;
                Umem::allocate(size).map_err(|e| e.to_string())?
            }
        };
        let reg = match self.dev.reg_umem(&umem) {
            // Still registered from before an attach the kernel did not tell us about.
            Err(Errno::EEXIST) => self
                .dev
                .dereg_umem(&umem)
                .and_then(|()| self.dev.reg_umem(&umem)),
            r => r,
        };
        if let Err(e) = reg {
            let hint = if e == Errno::ENOMEM {
                " (RLIMIT_MEMLOCK too low?)"
            } else {
                ""
            };
            inner.spare = Some(umem);
            return Err(format!(
                "VDUSE_IOTLB_REG_UMEM of {size} bytes failed: {e}{hint}"
            ));
        }
        info!(
            "zero copy on: {} MiB of {} registered as the bounce buffer",
            size >> 20,
            if umem.hugepages() {
                "hugetlb pages"
            } else {
                "4 KiB pages"
            }
        );
        Ok(Some(umem))
    }

    /// The device was reset and every worker has stopped: undo the registration, so that
    /// the next attach registers again (the 7.2 re-attach trap).
    pub fn reset(&self) {
        let mut inner = self.lock();
        if let State::Registered(umem) = std::mem::replace(&mut inner.state, State::Unknown) {
            if let Err(e) = self.dev.dereg_umem(&umem) {
                warn!("VDUSE_IOTLB_DEREG_UMEM failed: {e}");
            }
            inner.spare = Some(umem);
        }
    }
}
