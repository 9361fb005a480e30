//! The sysfs side of the vdpa bus and VDUSE: which modules are loaded, driver binding, and
//! finding the block device a VDUSE device became.
//!
//! Owns: reads and writes under `/sys/bus/vdpa`, `/sys/bus/virtio` and `/sys/class/vduse`.
//! Must not touch: netlink (see [`super::netlink`]) or the VDUSE fds.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const VDPA_BUS: &str = "/sys/bus/vdpa";

/// Whether a vdpa bus driver (`virtio_vdpa` or `vhost_vdpa`) is registered.
pub fn vdpa_driver_loaded(driver: &str) -> bool {
    Path::new(VDPA_BUS).join("drivers").join(driver).exists()
}

/// Whether the virtio_blk driver is registered (module loaded or built in).
pub fn virtio_blk_loaded() -> bool {
    Path::new("/sys/bus/virtio/drivers/virtio_blk").exists()
}

/// The vdpa device directory of `name`.
pub fn vdpa_device_dir(name: &str) -> PathBuf {
    Path::new(VDPA_BUS).join("devices").join(name)
}

/// Whether `name` is on the vdpa bus.
pub fn on_vdpa_bus(name: &str) -> bool {
    vdpa_device_dir(name).exists()
}

/// The driver `name` is bound to, if any.
pub fn bound_driver(name: &str) -> Option<String> {
    fs::read_link(vdpa_device_dir(name).join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
}

/// The block device (`vdX`) that virtio_blk made of vdpa device `name`, if any.
pub fn block_device_of(name: &str) -> Option<String> {
    for entry in fs::read_dir(vdpa_device_dir(name)).ok()?.flatten() {
        let fname = entry.file_name();
        if !fname.to_string_lossy().starts_with("virtio") {
            continue;
        }
        if let Ok(blocks) = fs::read_dir(entry.path().join("block")) {
            if let Some(b) = blocks.flatten().next() {
                return Some(b.file_name().to_string_lossy().into_owned());
            }
        }
    }
    None
}

/// Poll (with a deadline) until `name`'s block device exists and its /dev node is there.
pub fn wait_block_device(name: &str, deadline: Duration) -> Option<PathBuf> {
    let end = Instant::now() + deadline;
    loop {
        if let Some(b) = block_device_of(name) {
            let node = Path::new("/dev").join(&b);
            if node.exists() {
                return Some(node);
            }
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Set `/sys/bus/vdpa/drivers_autoprobe`; returns the previous value.
pub fn set_autoprobe(on: bool) -> io::Result<bool> {
    let p = Path::new(VDPA_BUS).join("drivers_autoprobe");
    let was = fs::read_to_string(&p)?.trim() == "1";
    fs::write(&p, if on { "1" } else { "0" })?;
    Ok(was)
}

/// Bind `name` to `driver` through `driver_override` + `drivers_probe`.
pub fn bind(name: &str, driver: &str) -> io::Result<()> {
    fs::write(vdpa_device_dir(name).join("driver_override"), driver)?;
    fs::write(Path::new(VDPA_BUS).join("drivers_probe"), name)
}

/// `/sys/class/vduse/NAME/bounce_size`, when the kernel has it.
pub fn bounce_size(name: &str) -> Option<u64> {
    fs::read_to_string(Path::new("/sys/class/vduse").join(name).join("bounce_size"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}
