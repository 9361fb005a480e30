//! A failing backing store, driven by the in-process simulator against the production
//! worker: a file truncated underneath the device and a filesystem that runs full. Only the
//! requests the store fails get `VIRTIO_BLK_S_IOERR`; the rest succeed, the worker keeps
//! serving, and the queue's counters say what failed and why.
//! (EIO itself needs a failing device: the VM suite's `backing-eio` case.)

mod common;

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use vduse_blkd::metrics::BackingErrors;
use vduse_blkd::sim::blk::{BlkRequest, S_IOERR, S_OK};
use vduse_blkd::sim::device::SimDir;
use vduse_blkd::sim::SimDevice;

const KIB: u64 = 1024;

/// Write `len` bytes of pattern `seed` at byte `off` through queue 0; the status.
fn write_at(dev: &mut SimDevice, off: u64, len: usize, seed: u64) -> Option<u8> {
    run_req(dev, 0, BlkRequest::write(off / 512, &pattern(seed, len))).status
}

#[test]
fn a_file_truncated_underneath_fails_only_the_requests_past_its_new_end() {
    require_io_uring!();
    let mut dev = device(16, false);
    // 1 MiB of data, then the file is cut to 512 KiB behind the worker's back.
    for i in 0..4 {
        assert_eq!(write_at(&mut dev, i * 256 * KIB, 256 << 10, i), Some(S_OK));
    }
    OpenOptions::new()
        .write(true)
        .open(dev.path())
        .unwrap()
        .set_len(512 * KIB)
        .unwrap();
    // Below the new end: served, with the data written before.
    let c = run_req(&mut dev, 0, BlkRequest::read(256 * KIB / 512, 64 << 10));
    assert_eq!((c.status, c.len), (Some(S_OK), (64 << 10) + 1));
    assert!(c.data[..] == pattern(1, 256 << 10)[..64 << 10]);
    // Past it, and across it: IOERR (the data is gone), no data length.
    let c = run_req(&mut dev, 0, BlkRequest::read(768 * KIB / 512, 4096));
    assert_eq!((c.status, c.len), (Some(S_IOERR), 1), "read past the end");
    let c = run_req(&mut dev, 0, BlkRequest::read((512 - 4) * KIB / 512, 8192));
    assert_eq!((c.status, c.len), (Some(S_IOERR), 1), "read across the end");
    // A write past the end lands (the file grows again) and reads back.
    assert_eq!(write_at(&mut dev, 900 * KIB, 4096, 9), Some(S_OK));
    let c = run_req_ok(&mut dev, 0, BlkRequest::read(900 * KIB / 512, 4096), 4097);
    assert!(c.data == pattern(9, 4096));
    assert_serves(&mut dev, 0, 8);
    let stats = shutdown_stats(dev);
    assert_eq!(stats.errors, 2, "only the two reads past the end failed");
    let want = BackingErrors {
        short: 2,
        ..BackingErrors::default()
    };
    assert_eq!(stats.backing, want);
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted and removed on drop.
struct SmallFs {
    dir: PathBuf,
}

impl SmallFs {
    /// `None` (with a note) where this process may not mount (not root, a container).
    fn mount(size: &str) -> Option<SmallFs> {
        let base = SimDir::new(None).ok()?;
        let dir = base.path().to_path_buf();
        std::mem::forget(base); // removed by our own drop, after the unmount
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "vduse-blkd-test",
            ])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("cannot mount a tmpfs here: the ENOSPC case is not exercised");
            let _ = std::fs::remove_dir(&dir);
            return None;
        }
        Some(SmallFs { dir })
    }

    fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for SmallFs {
    /// A closed io_uring drops its file references asynchronously, so the filesystem can be
    /// busy for a moment after the worker is gone: retry until a deadline, then detach it.
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            let mut c = Command::new("umount");
            if lazy {
                c.arg("-l");
            }
            c.arg(&self.dir)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !umount(false) {
            if Instant::now() >= deadline {
                umount(true);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_full_filesystem_fails_only_writes_that_need_new_blocks() {
    require_io_uring!();
    // 1 MiB sparse file on a 128 KiB filesystem: room for at most 32 written pages.
    let Some(fs) = SmallFs::mount("128k") else {
        return;
    };
    let mut dev = device_with(1 << 20, |cfg| {
        cfg.queue_size = 16;
        cfg.dir = Some(fs.path().to_path_buf());
    });
    let blocks = 64u64;
    let mut ok = Vec::new();
    let mut failed = 0u64;
    for b in 0..blocks {
        match write_at(&mut dev, b * 4096, 4096, b) {
            Some(S_OK) => ok.push(b),
            Some(S_IOERR) => failed += 1,
            other => panic!("write of block {b}: status {other:?}"),
        }
    }
    assert!(
        failed >= blocks / 2,
        "only {failed} of {blocks} writes failed on a 128 KiB filesystem"
    );
    assert!(
        !ok.is_empty(),
        "no write succeeded before the filesystem was full"
    );
    // Blocks that exist are still served: overwrite one, read every one back.
    let first = ok[0];
    assert_eq!(write_at(&mut dev, first * 4096, 4096, 1000), Some(S_OK));
    for &b in &ok {
        let seed = if b == first { 1000 } else { b };
        let c = run_req_ok(&mut dev, 0, BlkRequest::read(b * 8, 4096), 4097);
        assert!(
            c.data == pattern(seed, 4096),
            "block {b} reads back other data"
        );
    }
    // A hole reads as zeroes (no allocation needed).
    let c = run_req_ok(&mut dev, 0, BlkRequest::read((blocks + 10) * 8, 4096), 4097);
    assert!(c.data.iter().all(|&x| x == 0));
    // Free room by discarding written blocks: the failed writes now succeed.
    for &b in ok.iter().take(4) {
        run_req_ok(&mut dev, 0, BlkRequest::discard(&[seg(b * 8, 8, 0)]), 1);
    }
    let retry = blocks - 1;
    assert_eq!(write_at(&mut dev, retry * 4096, 4096, 77), Some(S_OK));
    let c = run_req_ok(&mut dev, 0, BlkRequest::read(retry * 8, 4096), 4097);
    assert!(c.data == pattern(77, 4096));
    let stats = shutdown_stats(dev);
    assert_eq!(stats.errors, failed);
    // ENOSPC, or a short write where a multi-page copy ran out midway: nothing else.
    let b = stats.backing;
    assert_eq!(b.total(), failed, "{b:?}");
    assert_eq!((b.eio, b.other), (0, 0), "{b:?}");
    assert!(b.no_space > 0, "no ENOSPC counted: {b:?}");
    drop(fs);
}
