//! The backing store: a regular file or a block device, validated and opened.
//!
//! Owns: the checks a user gets one clear line for (missing, wrong type, zero or unaligned
//! size), sparse creation of a new file, O_DIRECT, and the capacity; and the null backing
//! ([`Backend::null`]) that benchmarks use to measure the data path without a file. Must not
//! touch: VDUSE, virtio or io_uring (workers register the file descriptor with their own
//! rings).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// What kind of object backs the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingKind {
    /// A regular file.
    File,
    /// A block device.
    BlockDevice,
    /// No storage at all (`bench --backing null`): workers complete every request with an
    /// io_uring NOP instead of touching a file, so a benchmark measures the whole data path
    /// (ring, chain walk, parsing, translation, io_uring, completion) without data movement.
    /// Reads leave the driver's buffers as they were; writes are dropped.
    Null,
}

/// What the user asked for.
#[derive(Debug, Clone)]
pub struct BackingSpec {
    /// Path of the file or block device.
    pub path: PathBuf,
    /// Size to create a missing file with (bytes); must match an existing file if given.
    pub size: Option<u64>,
    /// Open read-only.
    pub read_only: bool,
    /// O_DIRECT: `None` means the default (on for block devices, off for files).
    pub direct: Option<bool>,
    /// Logical block size the device advertises.
    pub block_size: u32,
}

/// Why the backing store cannot be used.
#[derive(Debug, Error)]
pub enum BackendError {
    /// The path does not exist and no size was given to create it.
    #[error("backing file {0} does not exist (give --size to create it)")]
    NotFound(PathBuf),
    /// Neither a regular file nor a block device.
    #[error("backing {0} is not a regular file or block device")]
    WrongType(PathBuf),
    /// Opening, creating or sizing failed.
    #[error("cannot open backing {path}: {source}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Capacity zero.
    #[error("size must not be zero")]
    ZeroSize,
    /// Capacity not a multiple of the block size.
    #[error("size {size} is not a multiple of the block size {block_size}")]
    Unaligned {
        /// Size in bytes.
        size: u64,
        /// Block size.
        block_size: u32,
    },
    /// An existing file's size differs from `--size`.
    #[error("backing file {path} exists with size {existing}, not the requested {requested} (omit --size to use it as it is)")]
    SizeMismatch {
        /// The path.
        path: PathBuf,
        /// Its size.
        existing: u64,
        /// The requested size.
        requested: u64,
    },
    /// An online resize that this backing cannot take.
    #[error("cannot resize {path}: {why}")]
    Resize {
        /// The path.
        path: PathBuf,
        /// Why not.
        why: String,
    },
}

/// An open backing store.
#[derive(Debug)]
pub struct Backend {
    file: File,
    /// Capacity in bytes (a multiple of the block size).
    pub capacity: u64,
    /// Refuse writes.
    pub read_only: bool,
    /// File or block device.
    pub kind: BackingKind,
    /// Opened with O_DIRECT.
    pub direct: bool,
    /// The path it was opened from.
    pub path: PathBuf,
    /// Whether this call created the file (so a failed start can remove it).
    pub created: bool,
}

nix::ioctl_read!(
    /// `BLKGETSIZE64`: the size of a block device in bytes.
    blkgetsize64,
    0x12,
    114,
    u64
);

fn block_device_size(f: &File) -> io::Result<u64> {
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live local;
    // the fd is a valid open block device for the duration of the call.
    unsafe { blkgetsize64(f.as_raw_fd(), &mut size) }.map_err(io::Error::from)?;
    Ok(size)
}

/// A capacity must be non-zero and a multiple of the block size.
pub fn check_size(size: u64, block_size: u32) -> Result<(), BackendError> {
    if size == 0 {
        return Err(BackendError::ZeroSize);
    }
    if !size.is_multiple_of(u64::from(block_size)) {
        return Err(BackendError::Unaligned { size, block_size });
    }
    Ok(())
}

impl BackingSpec {
    /// Check what [`Backend::open`] checks, without creating or changing anything, so that
    /// a caller can report the user's mistake before it touches anything else. An existing
    /// file or device is opened with the access asked for and its size checked; for a file
    /// that `open` would create, the requested size and the directory it goes in are.
    pub fn validate(&self) -> Result<(), BackendError> {
        let open_err = |source| BackendError::Open {
            path: self.path.clone(),
            source,
        };
        if let Some(size) = self.size {
            check_size(size, self.block_size)?;
        }
        let meta = match std::fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if self.size.is_none() || self.read_only {
                    return Err(BackendError::NotFound(self.path.clone()));
                }
                let dir = self
                    .path
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                let access = nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK;
                return nix::unistd::access(dir, access).map_err(|e| open_err(e.into()));
            }
            Err(e) => return Err(open_err(e)),
        };
        let kind = match meta.file_type() {
            t if t.is_file() => BackingKind::File,
            t if t.is_block_device() => BackingKind::BlockDevice,
            _ => return Err(BackendError::WrongType(self.path.clone())),
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!self.read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(&self.path)
            .map_err(open_err)?;
        let capacity = match kind {
            BackingKind::BlockDevice => block_device_size(&file).map_err(open_err)?,
            _ => meta.len(),
        };
        match self.size {
            Some(requested) if kind == BackingKind::File && requested != capacity => {
                Err(BackendError::SizeMismatch {
                    path: self.path.clone(),
                    existing: capacity,
                    requested,
                })
            }
            _ => check_size(capacity, self.block_size),
        }
    }
}

impl Backend {
    /// Validate and open (or create) the backing store.
    pub fn open(spec: &BackingSpec) -> Result<Self, BackendError> {
        let path = spec.path.clone();
        let open_err = |source| BackendError::Open {
            path: path.clone(),
            source,
        };
        if let Some(size) = spec.size {
            check_size(size, spec.block_size)?;
        }
        let meta = match std::fs::metadata(&path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(open_err(e)),
        };
        let (kind, created) = match &meta {
            None if spec.size.is_none() => return Err(BackendError::NotFound(path)),
            None if spec.read_only => return Err(BackendError::NotFound(path)),
            None => (BackingKind::File, true),
            Some(m) if m.file_type().is_file() => (BackingKind::File, false),
            Some(m) if m.file_type().is_block_device() => (BackingKind::BlockDevice, false),
            Some(_) => return Err(BackendError::WrongType(path)),
        };
        let direct = spec.direct.unwrap_or(kind == BackingKind::BlockDevice);
        let mut opts = OpenOptions::new();
        opts.read(true).write(!spec.read_only);
        if created {
            opts.create_new(true);
        }
        let mut flags = libc::O_CLOEXEC;
        if direct {
            flags |= libc::O_DIRECT;
        }
        opts.custom_flags(flags);
        let file = opts.open(&path).map_err(open_err)?;
        let cleanup = |e: BackendError| {
            if created {
                let _ = std::fs::remove_file(&path);
            }
            e
        };
        let capacity = match kind {
            BackingKind::BlockDevice => {
                block_device_size(&file).map_err(|e| cleanup(open_err(e)))?
            }
            BackingKind::File if created => {
                let size = spec.size.expect("created files have a size");
                file.set_len(size).map_err(|e| cleanup(open_err(e)))?;
                size
            }
            BackingKind::File => {
                let existing = file.metadata().map_err(open_err)?.len();
                if let Some(requested) = spec.size {
                    if requested != existing {
                        return Err(BackendError::SizeMismatch {
                            path,
                            existing,
                            requested,
                        });
                    }
                }
                existing
            }
            // `kind` comes from the path's metadata above: a file or a block device.
            BackingKind::Null => unreachable!("Backend::open never opens the null backing"),
        };
        check_size(capacity, spec.block_size).map_err(cleanup)?;
        Ok(Backend {
            file,
            capacity,
            read_only: spec.read_only,
            kind,
            direct,
            path: spec.path.clone(),
            created,
        })
    }

    /// A null backing of `capacity` bytes (see [`BackingKind::Null`]). It holds `/dev/null`
    /// open so that workers can still register a file with their rings; nothing is ever
    /// read from or written to it.
    pub fn null(capacity: u64, block_size: u32) -> Result<Self, BackendError> {
        check_size(capacity, block_size)?;
        let path = PathBuf::from("/dev/null");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|source| BackendError::Open {
                path: path.clone(),
                source,
            })?;
        Ok(Backend {
            file,
            capacity,
            read_only: false,
            kind: BackingKind::Null,
            direct: false,
            path,
            created: false,
        })
    }

    /// Whether this is the null backing.
    pub fn is_null(&self) -> bool {
        self.kind == BackingKind::Null
    }

    /// The file descriptor (workers register it with their rings).
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Make the backing `bytes` long for an online resize: a file is extended or truncated
    /// (sparse); a block device cannot be resized from here, but one that was grown
    /// underneath (an LV extended) is taken at its new size. `bytes` is checked against
    /// `block_size` first.
    pub fn set_size(&self, bytes: u64, block_size: u32) -> Result<(), BackendError> {
        self.check_size_change(bytes, block_size)?;
        match self.kind {
            BackingKind::File => self.file.set_len(bytes).map_err(|e| BackendError::Resize {
                path: self.path.clone(),
                why: format!("cannot set the file's length: {e}"),
            }),
            BackingKind::BlockDevice | BackingKind::Null => Ok(()),
        }
    }

    /// Whether [`Backend::set_size`] to `bytes` would be accepted, changing nothing.
    pub fn check_size_change(&self, bytes: u64, block_size: u32) -> Result<(), BackendError> {
        check_size(bytes, block_size)?;
        let refuse = |why: String| BackendError::Resize {
            path: self.path.clone(),
            why,
        };
        if self.read_only {
            return Err(refuse("the device is read-only".into()));
        }
        match self.kind {
            BackingKind::File => Ok(()),
            BackingKind::BlockDevice => {
                let now = block_device_size(&self.file).map_err(|e| refuse(e.to_string()))?;
                if now == bytes {
                    Ok(())
                } else {
                    Err(refuse(format!(
                        "a block device's size is its own ({now} bytes now): grow the device \
                         first, then resize to its size"
                    )))
                }
            }
            BackingKind::Null => Err(refuse("the null backing has no size to change".into())),
        }
    }

    /// Remove the file if this process created it (start-up failed after opening).
    pub fn remove_if_created(&self) {
        if self.created {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(path: PathBuf, size: Option<u64>) -> BackingSpec {
        BackingSpec {
            path,
            size,
            read_only: false,
            direct: None,
            block_size: 512,
        }
    }

    #[test]
    fn creates_sparse_and_reopens() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("disk.img");
        let b = Backend::open(&spec(p.clone(), Some(1 << 20))).unwrap();
        assert!(b.created);
        assert_eq!(b.capacity, 1 << 20);
        drop(b);
        let b = Backend::open(&spec(p.clone(), None)).unwrap();
        assert!(!b.created);
        assert!(matches!(
            Backend::open(&spec(p, Some(2 << 20))),
            Err(BackendError::SizeMismatch { .. })
        ));
    }

    #[test]
    fn null_backing_has_a_capacity_and_no_file() {
        let b = Backend::null(1 << 30, 512).unwrap();
        assert!(b.is_null());
        assert_eq!(
            (b.capacity, b.read_only, b.created),
            (1 << 30, false, false)
        );
        assert!(b.raw_fd() >= 0);
        b.remove_if_created();
        assert!(Path::new("/dev/null").exists());
        assert!(matches!(Backend::null(0, 512), Err(BackendError::ZeroSize)));
        assert!(matches!(
            Backend::null(1000, 512),
            Err(BackendError::Unaligned { .. })
        ));
    }

    #[test]
    fn validate_checks_what_open_would_and_creates_nothing() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("new.img");
        spec(p.clone(), Some(1 << 20)).validate().unwrap();
        assert!(!p.exists(), "validate must not create the file");
        assert!(matches!(
            spec(p.clone(), None).validate(),
            Err(BackendError::NotFound(_))
        ));
        let mut ro = spec(p.clone(), Some(1 << 20));
        ro.read_only = true;
        assert!(matches!(ro.validate(), Err(BackendError::NotFound(_))));
        assert!(matches!(
            spec(p.clone(), Some(1000)).validate(),
            Err(BackendError::Unaligned { .. })
        ));
        let nodir = d.path().join("no-such-dir").join("x.img");
        assert!(matches!(
            spec(nodir.clone(), Some(1 << 20)).validate(),
            Err(BackendError::Open { .. })
        ));
        assert!(!nodir.exists());
        assert!(matches!(
            spec(d.path().to_path_buf(), None).validate(),
            Err(BackendError::WrongType(_))
        ));
        drop(Backend::open(&spec(p.clone(), Some(1 << 20))).unwrap());
        spec(p.clone(), None).validate().unwrap();
        spec(p.clone(), Some(1 << 20)).validate().unwrap();
        assert!(matches!(
            spec(p.clone(), Some(2 << 20)).validate(),
            Err(BackendError::SizeMismatch { .. })
        ));
        let odd = d.path().join("odd.img");
        std::fs::write(&odd, [0u8; 1000]).unwrap();
        assert!(matches!(
            spec(odd, None).validate(),
            Err(BackendError::Unaligned { .. })
        ));
    }

    #[test]
    fn bad_input_is_refused_and_nothing_is_created() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("missing.img");
        let msg = Backend::open(&spec(p.clone(), None))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("does not exist"), "{msg}");
        assert!(matches!(
            Backend::open(&spec(p.clone(), Some(0))),
            Err(BackendError::ZeroSize)
        ));
        assert!(matches!(
            Backend::open(&spec(p.clone(), Some(1000))),
            Err(BackendError::Unaligned { .. })
        ));
        assert!(!p.exists());
        let msg = Backend::open(&spec(d.path().to_path_buf(), None))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("not a regular file or block device"), "{msg}");
        let empty = d.path().join("empty.img");
        File::create(&empty).unwrap();
        assert!(matches!(
            Backend::open(&spec(empty, None)),
            Err(BackendError::ZeroSize)
        ));
    }
}
