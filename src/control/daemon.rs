//! The device lifecycle as the commands run it: `serve`, `list`, `del` (`probe` is
//! [`super::probe`]).
//!
//! Owns: validation of user input before anything is created, the order of creation
//! (backing → CREATE_DEV → VQ_SETUP → message loop → vdpa attach → `ready`), and teardown in
//! reverse (vdpa detach while the loop still answers → loop and workers stopped → device fd
//! closed → DESTROY_DEV), including on every error path, so nothing is left behind. Must not
//! touch: the data path (workers are started by the message loop) or argument syntax (CLI).

use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signalfd::SignalFd;
use serde::Serialize;
use thiserror::Error;

use super::api::{self, negotiate, ApiVersion, NegotiateError};
use super::device::{
    self, event_channel, spawn_loop, EventReceiver, LoopConfig, LoopEvent, LoopHandle, VduseWorkers,
};
use super::fd::{ControlFd, DeviceFd, CONTROL_PATH};
use super::netlink::{NetlinkError, VdpaNetlink};
use super::socket::{ControlSocket, Reply, Request, SocketError};
use super::sysfs;
pub use super::zerocopy::ZeroCopyMode;
use crate::backend::{Backend, BackendError, BackingSpec};
use crate::blk::{BlkConfig, BlkGeometry, VIRTIO_BLK_ID_BYTES};
use crate::metrics::QueueStats;
use crate::uapi::vduse as u;
use crate::uapi::virtio as vf;
use crate::worker::live::LiveStats;
use crate::worker::DeviceIo;

/// The largest split-ring size.
pub const MAX_QUEUE_SIZE: u32 = 32768;
/// The most queues (one worker thread each) a device may have.
pub const MAX_QUEUES: u16 = 64;
/// How long to wait for the block device to appear after attaching.
const BLOCK_DEVICE_DEADLINE: Duration = Duration::from_secs(60);

/// Which vdpa bus driver the device is handed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// `virtio_vdpa`: a `/dev/vdX` on this host.
    Virtio,
    /// `vhost_vdpa`: a `/dev/vhost-vdpa-N` for a VMM.
    Vhost,
    /// Not attached: the user runs `vdpa dev add` themselves.
    None,
}

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The backing store.
    pub backing: BackingSpec,
    /// Device name.
    pub name: String,
    /// Number of virtqueues.
    pub queues: u16,
    /// Size of each virtqueue.
    pub queue_size: u32,
    /// CPUs for the queue workers (empty: spread over the allowed CPUs).
    pub cpus: Vec<usize>,
    /// How long a worker busy-polls after its last request before it parks.
    pub poll: Duration,
    /// GET_ID answer (default: the device name).
    pub serial: Option<String>,
    /// Where to attach.
    pub attach: AttachMode,
    /// Force this VDUSE API version instead of the highest common one.
    pub api_version: Option<u64>,
    /// Our own memory as the bounce buffer, registered with io_uring (`--zero-copy`).
    pub zero_copy: ZeroCopyMode,
    /// Directory of the control socket `NAME.sock` (`--run-dir`).
    pub run_dir: PathBuf,
    /// Record per-stage latency (`--no-stage-stats` turns it off).
    pub stage_stats: bool,
}

/// Why a command failed. Each message is one line a user can act on.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// Bad device name.
    #[error("{0}")]
    Name(String),
    /// The control socket cannot be bound, or (client side) reached.
    #[error("control socket: {0}")]
    Socket(SocketError),
    /// Bad queue or device parameters.
    #[error("{0}")]
    Params(String),
    /// A kernel module is missing. The message says what to do on this host (see
    /// [`super::host::module_advice`]): `modprobe` only where it can work.
    #[error("the {module} kernel module is not loaded: {}", super::host::module_advice(.module))]
    ModuleMissing {
        /// The module.
        module: &'static str,
    },
    /// No permission.
    #[error("permission denied opening {path} (run as root)")]
    Permission {
        /// What could not be opened.
        path: String,
    },
    /// The name is in use.
    #[error("a device named {0} already exists")]
    NameTaken(String),
    /// No such device.
    #[error("no VDUSE device named {0}")]
    NoSuchDevice(String),
    /// A device is held by a running process.
    #[error("device {0} is in use (is a vduse-blkd serving it? stop it with SIGTERM)")]
    Busy(String),
    /// Backing store problem.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// API negotiation failed.
    #[error("VDUSE API negotiation failed: {0}")]
    Negotiate(#[from] NegotiateError),
    /// vdpa bus operation failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// A VDUSE ioctl failed.
    #[error("{op} failed: {errno}")]
    Ioctl {
        /// What.
        op: &'static str,
        /// The error.
        errno: Errno,
    },
    /// The device did not become usable.
    #[error("{0}")]
    Attach(String),
    /// The device was marked broken while serving.
    #[error("device broken: {0}")]
    Broken(String),
    /// Other OS errors.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> DaemonError {
    move |source| DaemonError::Io { what, source }
}

/// Check a device name the way the kernel and sysfs will see it.
pub fn validate_name(name: &str) -> Result<(), DaemonError> {
    if name.is_empty() {
        return Err(DaemonError::Name("device name must not be empty".into()));
    }
    if name.len() >= u::VDUSE_NAME_MAX {
        return Err(DaemonError::Name(format!(
            "device name is too long ({} bytes, at most {})",
            name.len(),
            u::VDUSE_NAME_MAX - 1
        )));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        || name.starts_with('.')
    {
        return Err(DaemonError::Name(format!(
            "device name {name:?} may only contain letters, digits, '-', '_' and '.' (not first)"
        )));
    }
    let vq_like =
        name.len() > 2 && name.starts_with("vq") && name[2..].bytes().all(|b| b.is_ascii_digit());
    if name == "control" || vq_like {
        return Err(DaemonError::Name(format!(
            "device name {name:?} is reserved by the kernel (it collides with /dev/vduse/control or per-queue sysfs entries)"
        )));
    }
    Ok(())
}

fn validate_params(o: &ServeOptions) -> Result<(), DaemonError> {
    let p = |s: String| Err(DaemonError::Params(s));
    if o.queues == 0 {
        return p("at least 1 queue is needed".into());
    }
    if o.queues > MAX_QUEUES {
        return p(format!(
            "too many queues: {} (at most {MAX_QUEUES})",
            o.queues
        ));
    }
    if o.queue_size > MAX_QUEUE_SIZE {
        return p(format!(
            "queue size {} is too large (at most {MAX_QUEUE_SIZE})",
            o.queue_size
        ));
    }
    if !o.queue_size.is_power_of_two() {
        return p(format!("queue size {} is not a power of two", o.queue_size));
    }
    if !matches!(o.backing.block_size, 512 | 4096) {
        return p(format!(
            "block size {} is not supported: use 512 or 4096",
            o.backing.block_size
        ));
    }
    if let Some(s) = &o.serial {
        if s.len() > VIRTIO_BLK_ID_BYTES {
            return p(format!(
                "serial is {} bytes, at most {VIRTIO_BLK_ID_BYTES}",
                s.len()
            ));
        }
    }
    if o.attach == AttachMode::Vhost && o.zero_copy == ZeroCopyMode::On {
        return p(
            "--zero-copy on needs --attach virtio: under vhost_vdpa the device sees the \
                  VM's memory, there is no bounce buffer to replace"
                .into(),
        );
    }
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    if let Some(bad) = o.cpus.iter().find(|&&c| c >= 1024) {
        return p(format!("CPU {bad} does not exist ({ncpu} available)"));
    }
    Ok(())
}

fn open_control() -> Result<ControlFd, DaemonError> {
    if !Path::new(CONTROL_PATH).exists() {
        return Err(DaemonError::ModuleMissing { module: "vduse" });
    }
    ControlFd::open().map_err(|e| match e.kind() {
        io::ErrorKind::PermissionDenied => DaemonError::Permission {
            path: CONTROL_PATH.into(),
        },
        _ => DaemonError::Io {
            what: "cannot open /dev/vduse/control",
            source: e,
        },
    })
}

fn check_attach_modules(attach: AttachMode) -> Result<(), DaemonError> {
    match attach {
        AttachMode::Virtio => {
            if !sysfs::vdpa_driver_loaded("virtio_vdpa") {
                return Err(DaemonError::ModuleMissing {
                    module: "virtio_vdpa",
                });
            }
            if !sysfs::virtio_blk_loaded() {
                return Err(DaemonError::ModuleMissing {
                    module: "virtio_blk",
                });
            }
        }
        AttachMode::Vhost => {
            if !sysfs::vdpa_driver_loaded("vhost_vdpa") {
                return Err(DaemonError::ModuleMissing {
                    module: "vhost_vdpa",
                });
            }
        }
        AttachMode::None => {}
    }
    Ok(())
}

fn name_in_use(name: &str) -> bool {
    DeviceFd::path_of(name).exists() || sysfs::on_vdpa_bus(name)
}

/// Default CPUs: the ones this process may run on.
fn allowed_cpus() -> Vec<usize> {
    core_affinity::get_core_ids()
        .map(|v| v.into_iter().map(|c| c.id).collect())
        .unwrap_or_default()
}

/// Undo creation steps on every exit path.
struct Created<'a> {
    control: &'a ControlFd,
    name: [u8; u::VDUSE_NAME_MAX],
    backend: Option<Arc<Backend>>,
    device: bool,
}

impl Created<'_> {
    fn destroy(&mut self) -> Result<(), DaemonError> {
        if !self.device {
            return Ok(());
        }
        device::destroy_dev(self.control, &self.name).map_err(|errno| DaemonError::Ioctl {
            op: "VDUSE_DESTROY_DEV",
            errno,
        })?;
        self.device = false;
        Ok(())
    }
}

impl Drop for Created<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.destroy() {
            warn!("cleanup: {e}");
        }
        if let Some(b) = self.backend.take() {
            b.remove_if_created();
        }
    }
}

/// What a finished `serve` reports.
#[derive(Debug)]
pub struct ServeReport {
    /// Merged statistics of every queue.
    pub stats: QueueStats,
}

/// Serve a device until SIGINT/SIGTERM (read from `signals`, which the caller blocked in
/// every thread) or until the device breaks. Prints the `ready` line on stdout.
///
/// The user's own input (name, parameters, backing store) is checked before the kernel is
/// touched, so the first error reported is the user's; nothing is created until the kernel
/// checks pass too.
pub fn serve(o: &ServeOptions, signals: &SignalFd) -> Result<ServeReport, DaemonError> {
    let name_buf = validate_input(o)?;
    let mut kernel = open_kernel(o)?;
    let mut s = create(
        o,
        &kernel.control,
        kernel.version,
        kernel.nl.take(),
        name_buf,
    )?;
    let result = attach_and_wait(o, &mut s, signals);
    let (stats, destroyed) = s.teardown();
    result?;
    destroyed?;
    Ok(ServeReport { stats })
}

/// Everything that can be checked without the kernel or creating anything.
fn validate_input(o: &ServeOptions) -> Result<[u8; u::VDUSE_NAME_MAX], DaemonError> {
    validate_name(&o.name)?;
    validate_params(o)?;
    let name_buf = u::vduse_name(&o.name).map_err(|e| DaemonError::Name(e.to_string()))?;
    o.backing.validate()?;
    Ok(name_buf)
}

/// What the kernel offers, checked before anything is created.
struct Kernel {
    control: ControlFd,
    nl: Option<VdpaNetlink>,
    version: ApiVersion,
}

fn open_kernel(o: &ServeOptions) -> Result<Kernel, DaemonError> {
    let mut control = open_control()?;
    check_attach_modules(o.attach)?;
    if name_in_use(&o.name) {
        return Err(DaemonError::NameTaken(o.name.clone()));
    }
    let nl = match o.attach {
        AttachMode::None => None,
        _ => Some(VdpaNetlink::connect()?),
    };
    let negotiated = match o.api_version {
        Some(v) => api::negotiate_exact(&mut control, v)?,
        None => negotiate(&mut control)?,
    };
    info!("VDUSE API {:?}", negotiated.version);
    Ok(Kernel {
        control,
        nl,
        version: negotiated.version,
    })
}

/// A device being served. Dropping it (or [`Serving::teardown`]) undoes the start in
/// reverse: vdpa detach while the loop still answers (the driver's remove path drains I/O
/// and resets the device) → loop and workers stopped → device fd closed → DESTROY_DEV
/// (retried on EBUSY until a deadline) → a backing file this run created removed, unless
/// the device was ever ready (then the file holds the user's data).
struct Serving<'a> {
    name: String,
    nl: Option<VdpaNetlink>,
    /// We put the device on the vdpa bus.
    attached: bool,
    /// The ready line was printed.
    served: bool,
    events: Option<EventReceiver>,
    lp: Option<LoopHandle>,
    dev: Option<Arc<DeviceFd>>,
    /// What the workers share (the capacity a resize changes).
    io: Option<Arc<DeviceIo>>,
    /// Removed (dropped) with the rest at teardown.
    socket: Option<ControlSocket>,
    /// The workers' live counters (`vduse-blkd stats`).
    live: Option<LiveView>,
    /// Dropped last: DESTROY_DEV and the backing file.
    created: Created<'a>,
}

impl Serving<'_> {
    /// Undo everything done so far; the queue statistics and whether DESTROY_DEV worked.
    /// A second call does nothing.
    fn teardown(&mut self) -> (QueueStats, Result<(), DaemonError>) {
        // With --attach none the user may have attached the device by hand: detach
        // whatever is on the bus.
        if self.lp.is_some() && (self.attached || sysfs::on_vdpa_bus(&self.name)) {
            let detached = match &self.nl {
                Some(nl) => nl.dev_del(&self.name),
                None => VdpaNetlink::connect().and_then(|nl| nl.dev_del(&self.name)),
            };
            if let Err(e) = detached {
                warn!("detach: {e}");
            }
            self.attached = false;
        }
        self.socket = None;
        let stats = self.lp.take().map(LoopHandle::stop).unwrap_or_default();
        self.dev = None;
        self.io = None;
        let destroyed = self.created.destroy();
        if self.served {
            // The device was usable: a file it created holds data now, whatever happens next.
            self.created.backend = None;
        }
        (stats, destroyed)
    }
}

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.teardown().1 {
            warn!("cleanup: {e}");
        }
    }
}

/// The backing store, the VDUSE device and its queues, and the message loop (which must
/// run before the device goes on the bus).
fn create<'a>(
    o: &ServeOptions,
    control: &'a ControlFd,
    version: ApiVersion,
    nl: Option<VdpaNetlink>,
    name_buf: [u8; u::VDUSE_NAME_MAX],
) -> Result<Serving<'a>, DaemonError> {
    // May create a file; removed again if the start fails.
    let backend = Arc::new(Backend::open(&o.backing)?);
    if let Err(e) = direct_without_umem(o, version, backend.direct) {
        backend.remove_if_created();
        return Err(e);
    }
    let mut s = Serving {
        name: o.name.clone(),
        nl,
        attached: false,
        served: false,
        events: None,
        lp: None,
        dev: None,
        io: None,
        socket: None,
        live: None,
        created: Created {
            control,
            name: name_buf,
            backend: Some(Arc::clone(&backend)),
            device: false,
        },
    };
    let queue_size = o.queue_size as u16; // validated <= 32768
    let blk = BlkConfig::new(BlkGeometry {
        capacity_sectors: backend.capacity / 512,
        block_size: o.backing.block_size,
        num_queues: o.queues,
        queue_size,
        read_only: backend.read_only,
    });
    let buf = dev_config(&blk, o.queues, version, name_buf)?;
    match control.create_dev(&buf) {
        Ok(()) => s.created.device = true,
        Err(Errno::EEXIST) => return Err(DaemonError::NameTaken(o.name.clone())),
        Err(errno) => {
            return Err(DaemonError::Ioctl {
                op: "VDUSE_CREATE_DEV",
                errno,
            })
        }
    }
    let dev = Arc::new(DeviceFd::open(&o.name).map_err(io_err("cannot open the VDUSE device"))?);
    s.dev = Some(Arc::clone(&dev));
    for q in 0..u32::from(o.queues) {
        dev.vq_setup(q, queue_size, 0)
            .map_err(|errno| DaemonError::Ioctl {
                op: "VDUSE_VQ_SETUP",
                errno,
            })?;
    }
    start_loop(o, &mut s, dev, backend, blk.features())?;
    Ok(s)
}

/// The `VDUSE_CREATE_DEV` argument.
fn dev_config(
    blk: &BlkConfig,
    queues: u16,
    version: ApiVersion,
    name: [u8; u::VDUSE_NAME_MAX],
) -> Result<u::DevConfigBuf, DaemonError> {
    let config = blk.to_bytes();
    let (ngroups, nas) = match version {
        ApiVersion::V0 => (0, 0),
        ApiVersion::V1 => (1, 1),
    };
    let header = u::VduseDevConfig {
        name,
        vendor_id: 0,
        device_id: vf::VIRTIO_ID_BLOCK,
        features: blk.features(),
        vq_num: u32::from(queues),
        // A power of two in [4, 4096] (7.2 requires it); the split-ring alignment.
        vq_align: 4096,
        ngroups,
        nas,
        config_size: config.len() as u32,
        ..Default::default()
    };
    u::DevConfigBuf::new(&header, &config).map_err(|e| DaemonError::Params(e.to_string()))
}

/// Start the control thread for `dev`.
fn start_loop(
    o: &ServeOptions,
    s: &mut Serving<'_>,
    dev: Arc<DeviceFd>,
    backend: Arc<Backend>,
    offered_features: u64,
) -> Result<(), DaemonError> {
    let mut serial = [0u8; VIRTIO_BLK_ID_BYTES];
    let id = o.serial.as_deref().unwrap_or(&o.name).as_bytes();
    let n = id.len().min(VIRTIO_BLK_ID_BYTES);
    serial[..n].copy_from_slice(&id[..n]);
    let io = Arc::new(DeviceIo::new(backend, serial));
    s.io = Some(Arc::clone(&io));
    let live = LiveStats::new(o.queues).map_err(io_err("cannot create the live-stats eventfds"))?;
    s.live = Some(LiveView {
        stats: Arc::clone(&live),
        base: Vec::new(),
        since: Instant::now(),
    });
    let cpus = if o.cpus.is_empty() {
        allowed_cpus()
    } else {
        o.cpus.clone()
    };
    let (tx, rx) = event_channel().map_err(io_err("cannot create the event channel"))?;
    let cfg = LoopConfig {
        name: o.name.clone(),
        num_queues: o.queues,
        max_queue_size: o.queue_size as u16,
        offered_features,
        cpus,
        poll: o.poll,
        live: Some(Arc::clone(&live)),
        stage_stats: o.stage_stats,
    };
    let workers = VduseWorkers::new(Arc::clone(&dev), io, zero_copy_for(o), o.queues);
    let lp =
        spawn_loop(dev, workers, cfg, tx).map_err(io_err("cannot start the control thread"))?;
    s.lp = Some(lp);
    s.events = Some(rx);
    Ok(())
}

/// O_DIRECT reads and writes whose buffers are the kernel's bounce pages (mmap'd from
/// `IOTLB_GET_FD`) fail with EIO on 6.12 (API 0; seen with qemu-storage-daemon's direct
/// cache too, perf/results/vm-odirect.txt) and work on 7.x. With our own memory as the
/// bounce buffer they work on both, so only an explicit `--zero-copy off` is refused there.
fn direct_without_umem(
    o: &ServeOptions,
    version: ApiVersion,
    direct: bool,
) -> Result<(), DaemonError> {
    let bounce = !matches!(o.attach, AttachMode::Vhost);
    if bounce && direct && o.zero_copy == ZeroCopyMode::Off && version == ApiVersion::V0 {
        return Err(DaemonError::Params(
            "--zero-copy off with O_DIRECT (the default for block devices, or --direct) fails \
             every request on this kernel (VDUSE API 0): keep zero copy on, or serve a file \
             without --direct"
                .into(),
        ));
    }
    Ok(())
}

/// Under vhost_vdpa there is no bounce buffer: `auto` means off (and `on` was refused).
fn zero_copy_for(o: &ServeOptions) -> ZeroCopyMode {
    match o.attach {
        AttachMode::Vhost => ZeroCopyMode::Off,
        AttachMode::Virtio | AttachMode::None => o.zero_copy,
    }
}

/// Attach, print the ready line, and serve until a signal or a fatal event.
fn attach_and_wait(
    o: &ServeOptions,
    s: &mut Serving<'_>,
    signals: &SignalFd,
) -> Result<(), DaemonError> {
    // Bound before the device is on the bus, so that it answers once `ready` is printed.
    s.socket = Some(ControlSocket::bind(&o.run_dir, &o.name).map_err(DaemonError::Socket)?);
    let dev_path = match (o.attach, s.nl.as_ref()) {
        (AttachMode::None, _) | (_, None) => "-".to_string(),
        (mode, Some(nl)) => attach(&o.name, mode, nl, &mut s.attached)?,
    };
    let mut out = io::stdout().lock();
    writeln!(out, "ready name={} dev={dev_path}", o.name)
        .and_then(|_| out.flush())
        .map_err(io_err("cannot write the ready line"))?;
    drop(out);
    // From here on the file holds the user's data: never remove it.
    s.served = true;
    let events = s.events.as_ref().expect("the loop runs before attaching");
    let socket = s.socket.as_ref().expect("bound above");
    let live = &mut s.live;
    let mut handle = |req: Request| match req {
        Request::Stats { reset } => match live.as_mut() {
            Some(v) => v.answer(&o.name, reset),
            None => Reply::refused("the device is not running"),
        },
        Request::Resize { bytes, force } => match (s.io.as_deref(), s.dev.as_deref()) {
            (Some(io), Some(dev)) => {
                let tell = |bytes: u64| {
                    dev.set_config(0, &(bytes / 512).to_le_bytes())
                        .map_err(|e| format!("cannot write the new capacity: {e}"))?;
                    match dev.inject_config_irq() {
                        // No driver running (--attach none, unbound): it reads the new
                        // size from the config space when it probes.
                        Ok(()) | Err(Errno::EINVAL) => Ok(()),
                        Err(e) => Err(format!("the driver was not told the new size: {e}")),
                    }
                };
                let r = resize(io, o.backing.block_size, bytes, force, &tell);
                if r.ok {
                    info!("{}: capacity now {bytes} bytes", o.name);
                }
                r
            }
            _ => Reply::refused("the device is not running"),
        },
    };
    wait_for_end(signals, events, socket, &mut handle)
}

/// The live view of a running device and the baseline of its current counting period.
struct LiveView {
    stats: Arc<LiveStats>,
    /// Per queue, the counters at the last reset (empty: none yet).
    base: Vec<QueueStats>,
    /// When the period began.
    since: Instant,
}

impl LiveView {
    /// Every queue's counters since the period began, and their total.
    fn answer(&mut self, name: &str, reset: bool) -> Reply {
        // The next period starts when the copies are asked for, not when they arrived.
        let asked = Instant::now();
        let now = self.stats.collect(LIVE_DEADLINE);
        let elapsed = asked.duration_since(self.since).as_secs_f64();
        let zero = QueueStats::default();
        let period: Vec<QueueStats> = now
            .iter()
            .enumerate()
            .map(|(q, s)| s.since(self.base.get(q).unwrap_or(&zero)))
            .collect();
        let mut total = QueueStats::default();
        let mut queues = Vec::new();
        for (q, s) in period.iter().enumerate() {
            total.merge(s);
            let mut j = s.live_json(elapsed);
            j["queue"] = q.into();
            queues.push(j);
        }
        let json = serde_json::json!({
            "name": name,
            "elapsed_s": (elapsed * 1000.0).round() / 1000.0,
            "total": total.live_json(elapsed),
            "queues": queues,
        });
        if reset {
            self.base = now;
            self.since = asked;
        }
        Reply {
            ok: true,
            error: None,
            capacity: None,
            stats: Some(json),
        }
    }
}

/// How long a live view waits for the workers' copies.
const LIVE_DEADLINE: Duration = Duration::from_secs(1);

/// An online resize: grow the backing, then let requests reach the new end, then tell the
/// driver (config space capacity + config interrupt); a forced shrink goes the other way
/// round, so no admitted request is checked against a capacity the file no longer has.
/// (A write admitted before a shrink may still extend the file again: that is what
/// `--force` accepts.)
fn resize(
    io: &DeviceIo,
    block_size: u32,
    bytes: u64,
    force: bool,
    tell: &dyn Fn(u64) -> Result<(), String>,
) -> Reply {
    let now = io.capacity();
    if bytes < now && !force {
        return Reply::refused(format!(
            "shrinking from {now} to {bytes} bytes discards data at the end: add --force"
        ));
    }
    // Every refusal comes before anything changes.
    if let Err(e) = io.backend.check_size_change(bytes, block_size) {
        return Reply {
            capacity: Some(now),
            ..Reply::refused(e.to_string())
        };
    }
    let set_size = || {
        io.backend
            .set_size(bytes, block_size)
            .map_err(|e| e.to_string())
    };
    let done = if bytes >= now {
        set_size().and_then(|()| {
            io.set_capacity(bytes);
            tell(bytes)
        })
    } else {
        io.set_capacity(bytes);
        tell(bytes).and_then(|()| set_size())
    };
    match done {
        Ok(()) => Reply {
            ok: true,
            error: None,
            capacity: Some(bytes),
            stats: None,
        },
        Err(e) => Reply {
            capacity: Some(io.capacity()),
            ..Reply::refused(e)
        },
    }
}

/// Put the device on the vdpa bus for `mode`'s driver; the block device's path (virtio)
/// or "-". Sets `attached` as soon as the device is on the bus.
fn attach(
    name: &str,
    mode: AttachMode,
    nl: &VdpaNetlink,
    attached: &mut bool,
) -> Result<String, DaemonError> {
    let (mine, other) = match mode {
        AttachMode::Virtio => ("virtio_vdpa", "vhost_vdpa"),
        _ => ("vhost_vdpa", "virtio_vdpa"),
    };
    // With both bus drivers loaded, keep the other from grabbing the device.
    let steer = sysfs::vdpa_driver_loaded(other);
    let autoprobe = if steer {
        Some(sysfs::set_autoprobe(false).map_err(io_err("cannot set drivers_autoprobe"))?)
    } else {
        None
    };
    let added = nl.dev_add(name);
    if let Some(was) = autoprobe {
        if let Err(e) = sysfs::set_autoprobe(was) {
            warn!("cannot restore drivers_autoprobe: {e}");
        }
    }
    added?;
    *attached = true;
    if steer || mode == AttachMode::Vhost {
        sysfs::bind(name, mine).map_err(io_err("cannot bind the vdpa device"))?;
    }
    if mode != AttachMode::Virtio {
        return Ok("-".to_string());
    }
    let path = sysfs::wait_block_device(name, BLOCK_DEVICE_DEADLINE).ok_or_else(|| {
        DaemonError::Attach(format!(
            "{name} did not become a block device within {}s",
            BLOCK_DEVICE_DEADLINE.as_secs()
        ))
    })?;
    Ok(path.display().to_string())
}

/// Block until a termination signal or a fatal device event. Sleeps in `poll` on the
/// signalfd and the event channel's eventfd: no timeout.
fn wait_for_end(
    signals: &SignalFd,
    events: &EventReceiver,
    socket: &ControlSocket,
    handle: &mut dyn FnMut(Request) -> Reply,
) -> Result<(), DaemonError> {
    loop {
        if let Some(ev) = events.try_recv() {
            return Err(match ev {
                LoopEvent::Broken(s) | LoopEvent::Failed(s) => DaemonError::Broken(s),
            });
        }
        let mut fds = [
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
            PollFd::new(events.as_fd(), PollFlags::POLLIN),
            PollFd::new(socket.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => {
                return Err(DaemonError::Io {
                    what: "poll",
                    source: e.into(),
                })
            }
        }
        let readable = |f: &PollFd| f.revents().is_some_and(|r| r.contains(PollFlags::POLLIN));
        if readable(&fds[1]) {
            // Cleared before the next try_recv: every event sent after this wakes us again.
            // A fatal event wins over a signal that arrived with it.
            events.clear();
            continue;
        }
        if readable(&fds[2]) {
            socket.serve_pending(handle);
        }
        if readable(&fds[0]) {
            if let Ok(Some(sig)) = signals.read_signal() {
                info!("signal {}: shutting down", sig.ssi_signo);
                return Ok(());
            }
        }
    }
}

/// One line of `list`.
#[derive(Debug, Serialize)]
pub struct ListEntry {
    /// Device name.
    pub name: String,
    /// On the vdpa bus.
    pub attached: bool,
    /// Bus driver.
    pub driver: Option<String>,
    /// Block device, when bound to virtio_vdpa.
    pub block_device: Option<String>,
}

/// VDUSE devices that exist now.
pub fn list() -> Result<Vec<ListEntry>, DaemonError> {
    if !Path::new(CONTROL_PATH).exists() {
        return Err(DaemonError::ModuleMissing { module: "vduse" });
    }
    let mut out = Vec::new();
    let dir = std::fs::read_dir(super::fd::VDUSE_DIR).map_err(io_err("cannot read /dev/vduse"))?;
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "control" {
            continue;
        }
        out.push(ListEntry {
            attached: sysfs::on_vdpa_bus(&name),
            driver: sysfs::bound_driver(&name),
            block_device: sysfs::block_device_of(&name).map(|b| format!("/dev/{b}")),
            name,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Remove a leftover device: detach it from the vdpa bus and destroy it.
pub fn del(name: &str) -> Result<(), DaemonError> {
    validate_name(name).map_err(|_| DaemonError::NoSuchDevice(name.to_string()))?;
    let control = open_control()?;
    if !DeviceFd::path_of(name).exists() {
        return Err(DaemonError::NoSuchDevice(name.to_string()));
    }
    if sysfs::on_vdpa_bus(name) {
        VdpaNetlink::connect()?.dev_del(name)?;
    }
    let name_buf = u::vduse_name(name).map_err(|e| DaemonError::Name(e.to_string()))?;
    match control.destroy_dev(&name_buf) {
        Ok(()) => Ok(()),
        Err(Errno::EBUSY) => Err(DaemonError::Busy(name.to_string())),
        Err(Errno::EINVAL) => Err(DaemonError::NoSuchDevice(name.to_string())),
        Err(errno) => Err(DaemonError::Ioctl {
            op: "VDUSE_DESTROY_DEV",
            errno,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for bad in ["", "vq0", "vq12", "control", "a/b", ".x", "a b"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_name(&"x".repeat(256))
            .unwrap_err()
            .to_string()
            .contains("too long"));
        assert!(validate_name("vq0")
            .unwrap_err()
            .to_string()
            .contains("reserved"));
        for good in ["vdb0", "vq", "vqa", "disk-1.a_b", &"x".repeat(255)] {
            validate_name(good).unwrap();
        }
    }

    fn opts() -> ServeOptions {
        ServeOptions {
            backing: BackingSpec {
                path: "/tmp/x".into(),
                size: None,
                read_only: false,
                direct: None,
                block_size: 512,
            },
            name: "t".into(),
            queues: 1,
            queue_size: 256,
            cpus: vec![],
            poll: Duration::ZERO,
            serial: None,
            attach: AttachMode::Virtio,
            api_version: None,
            zero_copy: ZeroCopyMode::Auto,
            run_dir: PathBuf::from(crate::control::socket::RUN_DIR),
            stage_stats: true,
        }
    }

    fn no_signals() -> SignalFd {
        SignalFd::new(&nix::sys::signal::SigSet::empty()).unwrap()
    }

    #[test]
    fn serve_reports_the_users_mistake_before_the_kernel() {
        let d = tempfile::tempdir().unwrap();
        let mut o = opts();
        o.backing.path = d.path().join("missing.img");
        let e = serve(&o, &no_signals()).unwrap_err();
        assert!(
            matches!(e, DaemonError::Backend(BackendError::NotFound(_))),
            "{e}"
        );
        o.backing.path = d.path().join("no-dir").join("x.img");
        o.backing.size = Some(1 << 20);
        let e = serve(&o, &no_signals()).unwrap_err();
        assert!(
            matches!(e, DaemonError::Backend(BackendError::Open { .. })),
            "{e}"
        );
        o.name = "vq0".into();
        let e = serve(&o, &no_signals()).unwrap_err();
        assert!(matches!(e, DaemonError::Name(_)), "name first: {e}");
        o = opts();
        o.backing.path = d.path().join("missing.img");
        o.queue_size = 100;
        let e = serve(&o, &no_signals()).unwrap_err();
        assert!(matches!(e, DaemonError::Params(_)), "params first: {e}");
    }

    #[test]
    fn serve_without_vduse_creates_no_backing_file() {
        if Path::new(CONTROL_PATH).exists() {
            return; // A machine with VDUSE would go on to create the device.
        }
        let d = tempfile::tempdir().unwrap();
        let mut o = opts();
        o.backing.path = d.path().join("new.img");
        o.backing.size = Some(1 << 20);
        let e = serve(&o, &no_signals()).unwrap_err();
        assert!(
            matches!(e, DaemonError::ModuleMissing { module: "vduse" }),
            "{e}"
        );
        assert!(!o.backing.path.exists(), "nothing is left behind");
    }

    /// The order of a resize: growing extends the file before requests may reach the new
    /// end and before the driver hears of it; a forced shrink lowers the limit and tells the
    /// driver before it truncates; refusals change nothing.
    #[test]
    fn resize_orders_file_limit_and_driver() {
        use std::cell::RefCell;
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("r.img");
        let spec = BackingSpec {
            path: path.clone(),
            size: Some(1 << 20),
            read_only: false,
            direct: None,
            block_size: 512,
        };
        let io = DeviceIo::new(Arc::new(Backend::open(&spec).unwrap()), [0; 20]);
        let seen = RefCell::new(Vec::new());
        let tell = |bytes: u64| {
            let file = std::fs::metadata(&path).unwrap().len();
            seen.borrow_mut().push((bytes, file, io.capacity()));
            Ok(())
        };
        let r = resize(&io, 512, 4 << 20, false, &tell);
        assert!(r.ok, "{r:?}");
        assert_eq!(seen.borrow()[..], [(4 << 20, 4 << 20, 4 << 20)]);
        for (bytes, force, why) in [
            (2 << 20, false, "add --force"),
            ((4 << 20) + 100, false, "multiple of the block size"),
            (0, true, "zero"),
        ] {
            let r = resize(&io, 512, bytes, force, &tell);
            assert!(!r.ok && r.error.as_deref().unwrap().contains(why), "{r:?}");
            assert_eq!(io.capacity(), 4 << 20);
            assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 << 20);
        }
        let r = resize(&io, 512, 2 << 20, true, &tell);
        assert!(r.ok, "{r:?}");
        // Told at the new size while the file still had the old one.
        assert_eq!(seen.borrow()[1], (2 << 20, 4 << 20, 2 << 20));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 2 << 20);
        let ro = DeviceIo::new(
            Arc::new(
                Backend::open(&BackingSpec {
                    read_only: true,
                    size: None,
                    ..spec
                })
                .unwrap(),
            ),
            [0; 20],
        );
        let r = resize(&ro, 512, 8 << 20, false, &tell);
        assert!(!r.ok && r.error.unwrap().contains("read-only"));
    }

    #[test]
    fn direct_io_from_kernel_bounce_pages_is_refused_only_where_it_fails() {
        let mut o = opts();
        o.zero_copy = ZeroCopyMode::Off;
        let e = direct_without_umem(&o, ApiVersion::V0, true).unwrap_err();
        assert!(e.to_string().contains("--zero-copy off"), "{e}");
        direct_without_umem(&o, ApiVersion::V1, true).unwrap();
        direct_without_umem(&o, ApiVersion::V0, false).unwrap();
        o.attach = AttachMode::Vhost;
        direct_without_umem(&o, ApiVersion::V0, true).unwrap();
        o.attach = AttachMode::Virtio;
        o.zero_copy = ZeroCopyMode::Auto;
        direct_without_umem(&o, ApiVersion::V0, true).unwrap();
    }

    #[test]
    fn params() {
        validate_params(&opts()).unwrap();
        /// Changes one option of a valid set.
        type Change = fn(&mut ServeOptions);
        let refusal = |change: Change| {
            let mut o = opts();
            change(&mut o);
            validate_params(&o).unwrap_err().to_string()
        };
        let cases: [(Change, &str); 6] = [
            (|o| o.queue_size = 100, "power of two"),
            (|o| o.queue_size = 65536, "too large"),
            (|o| o.queues = 1000, "too many queues"),
            (|o| o.backing.block_size = 1024, "512 or 4096"),
            (|o| o.serial = Some("x".repeat(21)), "serial is 21 bytes"),
            (
                |o| {
                    o.attach = AttachMode::Vhost;
                    o.zero_copy = ZeroCopyMode::On;
                },
                "--zero-copy on needs --attach virtio",
            ),
        ];
        for (change, want) in cases {
            let got = refusal(change);
            assert!(got.contains(want), "{got}");
        }
    }
}
