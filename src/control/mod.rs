//! The control plane: everything on `/dev/vduse/control`, `/dev/vduse/NAME` and the vdpa bus.
//!
//! - [`api`]: API-version and optional-feature negotiation (behind a trait, unit-tested
//!   against fake 6.12 / 7.2 / future kernels).
//! - [`fd`]: safe wrappers over the VDUSE ioctls and messages.
//! - [`device`]: the control thread: message loop, worker start/stop.
//! - [`netlink`]: vdpa generic netlink (attach/detach without the `vdpa` binary).
//! - [`sysfs`]: modules, driver binding, finding `/dev/vdX`.
//! - [`host`]: what the kernel lacks and advice that works on this host (kernel config,
//!   module files, `modprobe`).
//! - [`daemon`]: the commands' lifecycles (`serve`, `list`, `del`).
//! - [`probe`]: `probe`: what the kernel offers and what is missing.
//! - [`socket`]: the control socket (`RUN_DIR/NAME.sock`) and its client.
//! - [`zerocopy`]: our own memory as the bounce buffer (`REG_UMEM`), shared by a device's
//!   workers.
//!
//! Must not touch: the data path beyond starting and stopping workers.
pub mod api;
pub mod daemon;
pub mod device;
pub mod fd;
pub mod host;
pub mod netlink;
pub mod probe;
pub mod socket;
pub mod sysfs;
pub mod zerocopy;
