//! Bindings for `<linux/vduse.h>` as shipped in Linux 7.2 (VDUSE API versions 0 and 1).
//!
//! Owns: the constants, `#[repr(C)]` structs, ioctl request numbers and nix-generated ioctl
//! wrappers of the VDUSE uAPI, the byte encoding of the 152-byte control messages read from and
//! written to `/dev/vduse/$NAME`, and the heap buffers for the two ioctls that carry a flexible
//! array (`VDUSE_CREATE_DEV`, `VDUSE_DEV_SET_CONFIG`). Must not touch: file descriptors, device
//! state, threads or policy (which API version to ask for, which features to offer) — callers own
//! those. Every struct here is plain data; nothing in this module opens, reads or writes anything.
//!
//! Ground truth is Debian's `linux-libc-dev` 7.2.13 `linux/vduse.h`. The unit tests pin every
//! struct size, field offset and ioctl number to the values a C program compiled against that
//! header printed on x86_64.
//!
//! Layout notes:
//! * API v1 (7.x series; present in 7.2) carved `ngroups`/`nas` out of
//!   `vduse_dev_config.reserved`, `group` out of `vduse_vq_config.reserved`, and `asid` out of
//!   the reserved words of `vduse_iova_umem` and `vduse_iova_info`. Sizes did not change; a v0
//!   kernel treats those fields as reserved and requires them to be zero, which is what
//!   [`Default`] gives.
//! * `vduse_iotlb_entry_v2` is the final, flattened 80-byte form ("vduse: avoid adding implicit
//!   padding"); the 88-byte form that embedded `struct vduse_iotlb_entry` was never accepted by a
//!   7.2 kernel.
//! * The anonymous unions in `vduse_vq_info`, `vduse_dev_request` and `vduse_dev_response` are
//!   modelled as plain word arrays with safe accessors, so no `unsafe` union reads are needed.

use std::fmt;
use std::marker::PhantomData;

use nix::{
    ioctl_none, ioctl_read, ioctl_readwrite, ioctl_write_ptr, request_code_none, request_code_read,
    request_code_readwrite, request_code_write,
};

/// The ioctl "type" byte of every VDUSE ioctl (`VDUSE_BASE`).
pub const VDUSE_BASE: u8 = 0x81;

/// API version 0: one virtqueue group, one address space (`VDUSE_API_VERSION`).
pub const VDUSE_API_VERSION_0: u64 = 0;
/// API version 1: virtqueue groups and address-space IDs (`VDUSE_API_VERSION_1`, Linux 7.0+).
pub const VDUSE_API_VERSION_1: u64 = 1;

/// Size of a VDUSE device name buffer, including the terminating NUL (`VDUSE_NAME_MAX`).
pub const VDUSE_NAME_MAX: usize = 256;

/// Request type: report the state of a virtqueue (`VDUSE_GET_VQ_STATE`).
pub const VDUSE_GET_VQ_STATE: u32 = 0;
/// Request type: the driver writes the device status (`VDUSE_SET_STATUS`).
pub const VDUSE_SET_STATUS: u32 = 1;
/// Request type: the IOTLB changed in a range; drop cached mappings (`VDUSE_UPDATE_IOTLB`).
pub const VDUSE_UPDATE_IOTLB: u32 = 2;
/// Request type: a virtqueue group moves to another address space (`VDUSE_SET_VQ_GROUP_ASID`,
/// API v1 only).
pub const VDUSE_SET_VQ_GROUP_ASID: u32 = 3;
/// Request type: a virtqueue is enabled or disabled (`VDUSE_SET_VQ_READY`, Linux 7.3; sent
/// only when `VDUSE_F_QUEUE_READY` was set with `VDUSE_SET_FEATURES`).
pub const VDUSE_SET_VQ_READY: u32 = 4;
/// Request type: stop processing and complete what is in flight (`VDUSE_SUSPEND`, Linux
/// 7.3; sent only when `VDUSE_F_SUSPEND` was set). There is no resume: a reset follows.
pub const VDUSE_SUSPEND: u32 = 5;

/// Optional VDUSE feature bit (Linux 7.3, `VDUSE_GET_FEATURES`): `VDUSE_SET_VQ_READY`
/// requests.
pub const VDUSE_F_QUEUE_READY: u32 = 0;
/// Optional VDUSE feature bit (Linux 7.3): `VDUSE_SUSPEND` requests.
pub const VDUSE_F_SUSPEND: u32 = 1;

/// Response result: the request was handled (`VDUSE_REQ_RESULT_OK`).
pub const VDUSE_REQ_RESULT_OK: u32 = 0;
/// Response result: the request was refused (`VDUSE_REQ_RESULT_FAILED`).
pub const VDUSE_REQ_RESULT_FAILED: u32 = 1;

/// IOTLB permission: the device may only read the region (`VDUSE_ACCESS_RO`).
pub const VDUSE_ACCESS_RO: u8 = 1;
/// IOTLB permission: the device may only write the region (`VDUSE_ACCESS_WO`).
pub const VDUSE_ACCESS_WO: u8 = 2;
/// IOTLB permission: the device may read and write the region (`VDUSE_ACCESS_RW`).
pub const VDUSE_ACCESS_RW: u8 = 3;

/// IOVA capability: the region can be backed by user memory via `VDUSE_IOTLB_REG_UMEM`
/// (`VDUSE_IOVA_CAP_UMEM`).
pub const VDUSE_IOVA_CAP_UMEM: u64 = 1;

/// `VduseVqEventfd::fd` value that removes a kick eventfd (`VDUSE_EVENTFD_DEASSIGN`).
pub const VDUSE_EVENTFD_DEASSIGN: i32 = -1;

/// Size in bytes of [`VduseDevRequest`] and [`VduseDevResponse`] on the wire.
pub const VDUSE_MSG_SIZE: usize = 152;

// ---------------------------------------------------------------------------------------------
// Structs
// ---------------------------------------------------------------------------------------------

/// `struct vduse_dev_config` without its flexible `config[]` tail (336 bytes).
///
/// Passed to `VDUSE_CREATE_DEV` through [`DevConfigBuf`], which appends the config space.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct VduseDevConfig {
    /// Device name, NUL terminated (the kernel forces `name[255] = 0`).
    pub name: [u8; VDUSE_NAME_MAX],
    /// virtio vendor ID.
    pub vendor_id: u32,
    /// virtio device ID (`VIRTIO_ID_BLOCK` for us).
    pub device_id: u32,
    /// virtio feature bits the device offers.
    pub features: u64,
    /// Number of virtqueues.
    pub vq_num: u32,
    /// Alignment of virtqueue metadata (7.2: a power of two in [4, 4096]).
    pub vq_align: u32,
    /// Number of virtqueue groups (API v1: in [1, 0xffff]; API v0: must be 0).
    pub ngroups: u32,
    /// Number of address spaces (API v1: in [1, 0xffff]; API v0: must be 0).
    pub nas: u32,
    /// Must be zero. (An earlier proposal turned `reserved[0..2]` into a `u64 vduse_features`;
    /// what Linux 7.3 merged has no such field: optional features go through
    /// `VDUSE_SET_FEATURES` on the control fd instead.)
    pub reserved: [u32; 11],
    /// Size of the config space that follows the header.
    pub config_size: u32,
}

impl Default for VduseDevConfig {
    fn default() -> Self {
        Self {
            name: [0; VDUSE_NAME_MAX],
            vendor_id: 0,
            device_id: 0,
            features: 0,
            vq_num: 0,
            vq_align: 0,
            ngroups: 0,
            nas: 0,
            reserved: [0; 11],
            config_size: 0,
        }
    }
}

impl fmt::Debug for VduseDevConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VduseDevConfig")
            .field("name", &name_to_string(&self.name))
            .field("vendor_id", &self.vendor_id)
            .field("device_id", &self.device_id)
            .field("features", &format_args!("{:#x}", self.features))
            .field("vq_num", &self.vq_num)
            .field("vq_align", &self.vq_align)
            .field("ngroups", &self.ngroups)
            .field("nas", &self.nas)
            .field("reserved", &self.reserved)
            .field("config_size", &self.config_size)
            .finish()
    }
}

impl VduseDevConfig {
    /// Size of the header in bytes (`offsetof(struct vduse_dev_config, config)`).
    pub const SIZE: usize = 336;

    /// Serialize the header in native byte order, exactly as the kernel reads it.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut w = ByteWriter::<{ Self::SIZE }>::new();
        w.put(&self.name);
        w.u32(self.vendor_id);
        w.u32(self.device_id);
        w.u64(self.features);
        w.u32(self.vq_num);
        w.u32(self.vq_align);
        w.u32(self.ngroups);
        w.u32(self.nas);
        for r in self.reserved {
            w.u32(r);
        }
        w.u32(self.config_size);
        w.finish()
    }

    /// The device name up to its first NUL, lossily decoded as UTF-8.
    pub fn name_str(&self) -> String {
        name_to_string(&self.name)
    }
}

/// Why a string cannot be used as a VDUSE device name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty (the kernel rejects `name[0] == 0` with EINVAL).
    #[error("the device name is empty")]
    Empty,
    /// The name does not fit in `VDUSE_NAME_MAX - 1` bytes.
    #[error("the device name is longer than {} bytes", VDUSE_NAME_MAX - 1)]
    TooLong,
    /// The name contains a NUL byte or a `/` (it becomes the path `/dev/vduse/NAME`).
    #[error("the device name contains a NUL byte or '/'")]
    BadChar,
}

/// Encode `name` as a NUL-padded `char[VDUSE_NAME_MAX]`, as `VDUSE_CREATE_DEV` (in
/// [`VduseDevConfig::name`]) and `VDUSE_DESTROY_DEV` expect it.
pub fn vduse_name(name: &str) -> Result<[u8; VDUSE_NAME_MAX], NameError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() {
        return Err(NameError::Empty);
    }
    if bytes.len() >= VDUSE_NAME_MAX {
        return Err(NameError::TooLong);
    }
    if bytes.iter().any(|&b| b == 0 || b == b'/') {
        return Err(NameError::BadChar);
    }
    let mut out = [0u8; VDUSE_NAME_MAX];
    out[..bytes.len()].copy_from_slice(bytes);
    Ok(out)
}

fn name_to_string(name: &[u8]) -> String {
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    String::from_utf8_lossy(&name[..end]).into_owned()
}

/// `struct vduse_vq_config` (32 bytes), argument of `VDUSE_VQ_SETUP`. API v1 layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VduseVqConfig {
    /// Virtqueue index.
    pub index: u32,
    /// Maximum queue size (a power of two ≤ 32768 for split rings).
    pub max_size: u16,
    /// Must be zero.
    pub reserved1: u16,
    /// Virtqueue group (API v1, `< ngroups`); a v0 kernel sees this as reserved: keep it 0.
    pub group: u32,
    /// Must be zero.
    pub reserved2: [u16; 10],
}

/// `struct vduse_vq_state_split`: the split-ring state (2 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VduseVqStateSplit {
    /// The next available-ring index the device will read.
    pub avail_index: u16,
}

/// `struct vduse_vq_state_packed`: the packed-ring state (8 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VduseVqStatePacked {
    /// Last driver ring wrap counter observed by the device.
    pub last_avail_counter: u16,
    /// Device available index.
    pub last_avail_idx: u16,
    /// Device ring wrap counter.
    pub last_used_counter: u16,
    /// Used index.
    pub last_used_idx: u16,
}

impl VduseVqStatePacked {
    fn from_words(w: [u16; 4]) -> Self {
        Self {
            last_avail_counter: w[0],
            last_avail_idx: w[1],
            last_used_counter: w[2],
            last_used_idx: w[3],
        }
    }

    fn to_words(self) -> [u16; 4] {
        [
            self.last_avail_counter,
            self.last_avail_idx,
            self.last_used_counter,
            self.last_used_idx,
        ]
    }
}

/// `struct vduse_vq_info` (48 bytes), argument of `VDUSE_VQ_GET_INFO`.
///
/// The C union `{ split; packed; }` is the `state` field; read it with
/// [`split_avail_index`](Self::split_avail_index) or [`packed_state`](Self::packed_state).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VduseVqInfo {
    /// Virtqueue index (set by the caller).
    pub index: u32,
    /// Queue size the driver chose.
    pub num: u32,
    /// IOVA of the descriptor area.
    pub desc_addr: u64,
    /// IOVA of the driver (available) area.
    pub driver_addr: u64,
    /// IOVA of the device (used) area.
    pub device_addr: u64,
    /// The `split`/`packed` union, as four native-endian `u16`s.
    pub state: [u16; 4],
    /// Non-zero when the driver has enabled the queue.
    pub ready: u8,
}

impl VduseVqInfo {
    /// A request for the information of queue `index`.
    pub fn for_index(index: u32) -> Self {
        Self {
            index,
            ..Self::default()
        }
    }

    /// `split.avail_index`: the available index the driver set (split rings).
    pub fn split_avail_index(&self) -> u16 {
        self.state[0]
    }

    /// The `packed` member of the union (packed rings).
    pub fn packed_state(&self) -> VduseVqStatePacked {
        VduseVqStatePacked::from_words(self.state)
    }

    /// Whether the driver has enabled the queue.
    pub fn is_ready(&self) -> bool {
        self.ready != 0
    }
}

/// `struct vduse_vq_eventfd` (8 bytes), argument of `VDUSE_VQ_SETUP_KICKFD`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VduseVqEventfd {
    /// Virtqueue index.
    pub index: u32,
    /// An eventfd, or [`VDUSE_EVENTFD_DEASSIGN`].
    pub fd: i32,
}

/// `struct vduse_iotlb_entry` (32 bytes), argument of `VDUSE_IOTLB_GET_FD`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VduseIotlbEntry {
    /// mmap offset to use on the returned fd.
    pub offset: u64,
    /// First IOVA of the region.
    pub start: u64,
    /// Last IOVA of the region (inclusive).
    pub last: u64,
    /// `VDUSE_ACCESS_*`.
    pub perm: u8,
}

/// `struct vduse_iotlb_entry_v2` (80 bytes, final flattened layout), argument of
/// `VDUSE_IOTLB_GET_FD2` (API v1 only).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VduseIotlbEntryV2 {
    /// mmap offset to use on the returned fd.
    pub offset: u64,
    /// First IOVA of the region.
    pub start: u64,
    /// Last IOVA of the region (inclusive).
    pub last: u64,
    /// `VDUSE_ACCESS_*`.
    pub perm: u8,
    /// Explicit padding; must be zero.
    pub padding: [u8; 7],
    /// Address space the IOVA belongs to.
    pub asid: u32,
    /// Must be zero.
    pub reserved: [u32; 11],
}

/// `struct vduse_iova_umem` (48 bytes, API v1 layout), argument of `VDUSE_IOTLB_REG_UMEM` and
/// `VDUSE_IOTLB_DEREG_UMEM`. v0 had `reserved[3]` (u64) where v1 has `asid` + `reserved[5]`;
/// a v0 kernel requires `asid == 0`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VduseIovaUmem {
    /// Page-aligned user address of the memory.
    pub uaddr: u64,
    /// First IOVA of the region (0: the bounce region).
    pub iova: u64,
    /// Size of the region (must equal the bounce size).
    pub size: u64,
    /// Address space (API v1).
    pub asid: u32,
    /// Must be zero.
    pub reserved: [u32; 5],
}

/// `struct vduse_iova_info` (48 bytes, API v1 layout), argument of `VDUSE_IOTLB_GET_INFO`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VduseIovaInfo {
    /// First IOVA of the region.
    pub start: u64,
    /// Last IOVA of the region (inclusive).
    pub last: u64,
    /// `VDUSE_IOVA_CAP_*` bits.
    pub capability: u64,
    /// Address space (API v1; must be 0 under v0).
    pub asid: u32,
    /// Must be zero.
    pub reserved: [u32; 5],
}

/// `struct vduse_config_data` without its flexible `buffer[]` tail (8 bytes). Passed to
/// `VDUSE_DEV_SET_CONFIG` through [`ConfigDataBuf`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VduseConfigData {
    /// Offset into the config space.
    pub offset: u32,
    /// Number of bytes that follow the header.
    pub length: u32,
}

/// `struct vduse_dev_request` (152 bytes), read from `/dev/vduse/$NAME`.
///
/// The C union is `payload`; decode it with the accessor that matches `req_type`.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VduseDevRequest {
    /// `VDUSE_GET_VQ_STATE`, `VDUSE_SET_STATUS`, `VDUSE_UPDATE_IOTLB`,
    /// `VDUSE_SET_VQ_GROUP_ASID`, `VDUSE_SET_VQ_READY` or `VDUSE_SUSPEND`.
    pub req_type: u32,
    /// Identifier to echo in the response.
    pub request_id: u32,
    /// Reserved.
    pub reserved: [u32; 4],
    /// The request union, as 32 native-endian words.
    pub payload: [u32; 32],
}

impl VduseDevRequest {
    /// Decode a request from the bytes `read(2)` returned. `None` if `bytes` is shorter than
    /// [`VDUSE_MSG_SIZE`]; extra bytes are ignored.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let (req_type, request_id, reserved, payload) = decode_message(bytes)?;
        Some(Self {
            req_type,
            request_id,
            reserved,
            payload,
        })
    }

    /// Encode the request as the kernel would (used by tests and simulators).
    pub fn to_bytes(&self) -> [u8; VDUSE_MSG_SIZE] {
        encode_message(
            self.req_type,
            self.request_id,
            &self.reserved,
            &self.payload,
        )
    }

    fn payload_bytes(&self) -> [u8; 128] {
        let mut w = ByteWriter::<128>::new();
        for v in self.payload {
            w.u32(v);
        }
        w.finish()
    }

    fn payload_u64(&self, byte_off: usize) -> u64 {
        let b = self.payload_bytes();
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[byte_off..byte_off + 8]);
        u64::from_ne_bytes(a)
    }

    /// `s.status` of a `VDUSE_SET_STATUS` request.
    pub fn status(&self) -> u8 {
        self.payload_bytes()[0]
    }

    /// `vq_state.index` of a `VDUSE_GET_VQ_STATE` request.
    pub fn vq_index(&self) -> u32 {
        self.payload[0]
    }

    /// `iova.{start, last}` of a `VDUSE_UPDATE_IOTLB` request (inclusive range).
    pub fn iova_range(&self) -> (u64, u64) {
        (self.payload_u64(0), self.payload_u64(8))
    }

    /// `iova_v2.{start, last, asid}` of a `VDUSE_UPDATE_IOTLB` request under API v1.
    pub fn iova_range_v2(&self) -> (u64, u64, u32) {
        (self.payload_u64(0), self.payload_u64(8), self.payload[4])
    }

    /// `vq_group_asid.{group, asid}` of a `VDUSE_SET_VQ_GROUP_ASID` request.
    pub fn group_asid(&self) -> (u32, u32) {
        (self.payload[0], self.payload[1])
    }

    /// `vq_ready.{num, ready}` of a `VDUSE_SET_VQ_READY` request (Linux 7.3).
    pub fn vq_ready(&self) -> (u32, bool) {
        (self.payload[0], self.payload[1] != 0)
    }
}

/// `struct vduse_dev_response` (152 bytes), written to `/dev/vduse/$NAME`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VduseDevResponse {
    /// The `request_id` of the request being answered.
    pub request_id: u32,
    /// `VDUSE_REQ_RESULT_OK` or `VDUSE_REQ_RESULT_FAILED`.
    pub result: u32,
    /// Must be zero (the kernel rejects the write otherwise).
    pub reserved: [u32; 4],
    /// The response union, as 32 native-endian words.
    pub payload: [u32; 32],
}

impl VduseDevResponse {
    /// A response with an empty payload.
    pub fn new(request_id: u32, result: u32) -> Self {
        Self {
            request_id,
            result,
            ..Self::default()
        }
    }

    /// Set `vq_state = { index, split.avail_index }` (reply to `VDUSE_GET_VQ_STATE`, split ring).
    pub fn with_split_vq_state(mut self, index: u32, avail_index: u16) -> Self {
        self.set_vq_state(index, [avail_index, 0, 0, 0]);
        self
    }

    /// Set `vq_state = { index, packed }` (reply to `VDUSE_GET_VQ_STATE`, packed ring).
    pub fn with_packed_vq_state(mut self, index: u32, packed: VduseVqStatePacked) -> Self {
        self.set_vq_state(index, packed.to_words());
        self
    }

    fn set_vq_state(&mut self, index: u32, state: [u16; 4]) {
        // `struct vduse_vq_state` is { u32 index; union (4 x u16) } at the start of the payload.
        self.payload[0] = index;
        self.payload[1] = u32_from_u16s(state[0], state[1]);
        self.payload[2] = u32_from_u16s(state[2], state[3]);
    }

    /// Decode a response (used by tests and simulators). `None` if `bytes` is too short.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let (request_id, result, reserved, payload) = decode_message(bytes)?;
        Some(Self {
            request_id,
            result,
            reserved,
            payload,
        })
    }

    /// Encode the response for `write(2)`.
    pub fn to_bytes(&self) -> [u8; VDUSE_MSG_SIZE] {
        encode_message(self.request_id, self.result, &self.reserved, &self.payload)
    }
}

/// Requests and responses share one wire shape: two `u32`s, the reserved words, the payload.
type Message<const R: usize, const P: usize> = (u32, u32, [u32; R], [u32; P]);

fn decode_message<const R: usize, const P: usize>(bytes: &[u8]) -> Option<Message<R, P>> {
    let bytes: &[u8; VDUSE_MSG_SIZE] = bytes.get(..VDUSE_MSG_SIZE)?.try_into().ok()?;
    let mut r = ByteReader::new(bytes);
    let a = r.u32();
    let b = r.u32();
    let reserved = std::array::from_fn(|_| r.u32());
    let payload = std::array::from_fn(|_| r.u32());
    Some((a, b, reserved, payload))
}

fn encode_message<const R: usize, const P: usize>(
    a: u32,
    b: u32,
    reserved: &[u32; R],
    payload: &[u32; P],
) -> [u8; VDUSE_MSG_SIZE] {
    let mut w = ByteWriter::<VDUSE_MSG_SIZE>::new();
    w.u32(a);
    w.u32(b);
    for &v in reserved.iter().chain(payload) {
        w.u32(v);
    }
    w.finish()
}

/// A `u32` whose in-memory bytes are `lo` followed by `hi` (two adjacent native `u16`s).
fn u32_from_u16s(lo: u16, hi: u16) -> u32 {
    let a = lo.to_ne_bytes();
    let b = hi.to_ne_bytes();
    u32::from_ne_bytes([a[0], a[1], b[0], b[1]])
}

// ---------------------------------------------------------------------------------------------
// Flexible-array buffers
// ---------------------------------------------------------------------------------------------

/// A byte string stored in 8-byte aligned heap memory, so that a pointer to its start can be
/// handed to an ioctl that expects a struct with 8-byte alignment.
#[derive(Clone)]
struct AlignedBytes {
    words: Vec<u64>,
    len: usize,
}

impl AlignedBytes {
    fn new(bytes: &[u8]) -> Self {
        let words = bytes
            .chunks(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a[..c.len()].copy_from_slice(c);
                u64::from_ne_bytes(a)
            })
            .collect();
        Self {
            words,
            len: bytes.len(),
        }
    }

    fn as_ptr(&self) -> *const u8 {
        self.words.as_ptr().cast()
    }

    fn to_vec(&self) -> Vec<u8> {
        let mut v: Vec<u8> = self.words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        v.truncate(self.len);
        v
    }
}

/// Why a flexible-array buffer could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("config blob of {0} bytes does not fit in a u32 length")]
pub struct ConfigTooLarge(pub usize);

/// A `#[repr(C)]` ioctl header `H` immediately followed by variable-length bytes (a flexible
/// array member), in one 8-byte aligned heap buffer that the kernel reads through one pointer.
pub struct HeaderBuf<H> {
    buf: AlignedBytes,
    header: PhantomData<H>,
}

impl<H> Clone for HeaderBuf<H> {
    fn clone(&self) -> Self {
        Self {
            buf: self.buf.clone(),
            header: PhantomData,
        }
    }
}

impl<H> HeaderBuf<H> {
    fn from_bytes(bytes: &[u8]) -> Self {
        Self {
            buf: AlignedBytes::new(bytes),
            header: PhantomData,
        }
    }

    /// Pointer for the ioctl. Valid (and 8-byte aligned) for [`Self::len`] bytes while `self`
    /// is alive and not mutated.
    pub fn as_ptr(&self) -> *const H {
        self.buf.as_ptr().cast()
    }

    /// Total length in bytes: header plus trailing bytes.
    pub fn len(&self) -> usize {
        self.buf.len
    }

    /// Always false: every header is at least 8 bytes.
    pub fn is_empty(&self) -> bool {
        self.buf.len == 0
    }

    /// A copy of the bytes the kernel will read.
    pub fn to_vec(&self) -> Vec<u8> {
        self.buf.to_vec()
    }
}

/// The argument of `VDUSE_CREATE_DEV`: a [`VduseDevConfig`] header immediately followed by the
/// device config space.
///
/// The kernel copies the 336-byte header, then `config_size` more bytes from the same pointer
/// (it rejects `config_size > PAGE_SIZE` with EINVAL).
pub type DevConfigBuf = HeaderBuf<VduseDevConfig>;

impl DevConfigBuf {
    /// Build the buffer. `header.config_size` is replaced by `config.len()`.
    pub fn new(header: &VduseDevConfig, config: &[u8]) -> Result<Self, ConfigTooLarge> {
        let config_size = u32::try_from(config.len()).map_err(|_| ConfigTooLarge(config.len()))?;
        let mut header = *header;
        header.config_size = config_size;
        let mut bytes = Vec::with_capacity(VduseDevConfig::SIZE + config.len());
        bytes.extend_from_slice(&header.to_bytes());
        bytes.extend_from_slice(config);
        Ok(Self::from_bytes(&bytes))
    }
}

/// The argument of `VDUSE_DEV_SET_CONFIG`: a [`VduseConfigData`] header followed by the bytes to
/// write into the config space.
pub type ConfigDataBuf = HeaderBuf<VduseConfigData>;

/// Build the `VDUSE_DEV_SET_CONFIG` argument that writes `bytes` at `offset` of the config
/// space. The kernel requires `bytes` to be non-empty and `offset + len <= config_size`.
pub fn config_data_buf(offset: u32, bytes: &[u8]) -> Result<ConfigDataBuf, ConfigTooLarge> {
    let length = u32::try_from(bytes.len()).map_err(|_| ConfigTooLarge(bytes.len()))?;
    let mut v = Vec::with_capacity(8 + bytes.len());
    v.extend_from_slice(&offset.to_ne_bytes());
    v.extend_from_slice(&length.to_ne_bytes());
    v.extend_from_slice(bytes);
    Ok(ConfigDataBuf::from_bytes(&v))
}

// ---------------------------------------------------------------------------------------------
// Native-endian byte (de)serialization helpers
// ---------------------------------------------------------------------------------------------

struct ByteWriter<const N: usize> {
    buf: [u8; N],
    pos: usize,
}

impl<const N: usize> ByteWriter<N> {
    fn new() -> Self {
        Self {
            buf: [0; N],
            pos: 0,
        }
    }

    fn put(&mut self, b: &[u8]) {
        self.buf[self.pos..self.pos + b.len()].copy_from_slice(b);
        self.pos += b.len();
    }

    fn u32(&mut self, v: u32) {
        self.put(&v.to_ne_bytes());
    }

    fn u64(&mut self, v: u64) {
        self.put(&v.to_ne_bytes());
    }

    fn finish(self) -> [u8; N] {
        debug_assert_eq!(self.pos, N, "serialized size mismatch");
        self.buf
    }
}

struct ByteReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> ByteReader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn u32(&mut self) -> u32 {
        let mut a = [0u8; 4];
        a.copy_from_slice(&self.buf[self.pos..self.pos + 4]);
        self.pos += 4;
        u32::from_ne_bytes(a)
    }
}

// ---------------------------------------------------------------------------------------------
// ioctl numbers
// ---------------------------------------------------------------------------------------------

/// Request number of `VDUSE_GET_API_VERSION` (control fd).
pub const VDUSE_GET_API_VERSION_IOCTL: libc::c_ulong =
    request_code_read!(VDUSE_BASE, 0x00, size_of::<u64>()) as libc::c_ulong;
/// Request number of `VDUSE_SET_API_VERSION` (control fd).
pub const VDUSE_SET_API_VERSION_IOCTL: libc::c_ulong =
    request_code_write!(VDUSE_BASE, 0x01, size_of::<u64>()) as libc::c_ulong;
/// Request number of `VDUSE_CREATE_DEV` (control fd).
pub const VDUSE_CREATE_DEV_IOCTL: libc::c_ulong =
    request_code_write!(VDUSE_BASE, 0x02, size_of::<VduseDevConfig>()) as libc::c_ulong;
/// Request number of `VDUSE_DESTROY_DEV` (control fd).
pub const VDUSE_DESTROY_DEV_IOCTL: libc::c_ulong =
    request_code_write!(VDUSE_BASE, 0x03, VDUSE_NAME_MAX) as libc::c_ulong;
/// Request number of `VDUSE_GET_FEATURES` (control fd, Linux 7.3).
pub const VDUSE_GET_FEATURES_IOCTL: libc::c_ulong =
    request_code_read!(VDUSE_BASE, 0x04, size_of::<u64>()) as libc::c_ulong;
/// Request number of `VDUSE_SET_FEATURES` (control fd, Linux 7.3).
pub const VDUSE_SET_FEATURES_IOCTL: libc::c_ulong =
    request_code_write!(VDUSE_BASE, 0x05, size_of::<u64>()) as libc::c_ulong;
/// Request number of `VDUSE_IOTLB_GET_FD` (device fd).
pub const VDUSE_IOTLB_GET_FD_IOCTL: libc::c_ulong =
    request_code_readwrite!(VDUSE_BASE, 0x10, size_of::<VduseIotlbEntry>()) as libc::c_ulong;
/// Request number of `VDUSE_DEV_GET_FEATURES` (device fd).
pub const VDUSE_DEV_GET_FEATURES_IOCTL: libc::c_ulong =
    request_code_read!(VDUSE_BASE, 0x11, size_of::<u64>()) as libc::c_ulong;
/// Request number of `VDUSE_DEV_SET_CONFIG` (device fd).
pub const VDUSE_DEV_SET_CONFIG_IOCTL: libc::c_ulong =
    request_code_write!(VDUSE_BASE, 0x12, size_of::<VduseConfigData>()) as libc::c_ulong;
/// Request number of `VDUSE_DEV_INJECT_CONFIG_IRQ` (device fd).
pub const VDUSE_DEV_INJECT_CONFIG_IRQ_IOCTL: libc::c_ulong =
    request_code_none!(VDUSE_BASE, 0x13) as libc::c_ulong;
/// Request number of `VDUSE_VQ_SETUP` (device fd).
pub const VDUSE_VQ_SETUP_IOCTL: libc::c_ulong =
    request_code_write!(VDUSE_BASE, 0x14, size_of::<VduseVqConfig>()) as libc::c_ulong;
/// Request number of `VDUSE_VQ_GET_INFO` (device fd).
pub const VDUSE_VQ_GET_INFO_IOCTL: libc::c_ulong =
    request_code_readwrite!(VDUSE_BASE, 0x15, size_of::<VduseVqInfo>()) as libc::c_ulong;
/// Request number of `VDUSE_VQ_SETUP_KICKFD` (device fd).
pub const VDUSE_VQ_SETUP_KICKFD_IOCTL: libc::c_ulong =
    request_code_write!(VDUSE_BASE, 0x16, size_of::<VduseVqEventfd>()) as libc::c_ulong;
/// Request number of `VDUSE_VQ_INJECT_IRQ` (device fd).
pub const VDUSE_VQ_INJECT_IRQ_IOCTL: libc::c_ulong =
    request_code_write!(VDUSE_BASE, 0x17, size_of::<u32>()) as libc::c_ulong;
/// Request number of `VDUSE_IOTLB_REG_UMEM` (device fd).
pub const VDUSE_IOTLB_REG_UMEM_IOCTL: libc::c_ulong =
    request_code_write!(VDUSE_BASE, 0x18, size_of::<VduseIovaUmem>()) as libc::c_ulong;
/// Request number of `VDUSE_IOTLB_DEREG_UMEM` (device fd).
pub const VDUSE_IOTLB_DEREG_UMEM_IOCTL: libc::c_ulong =
    request_code_write!(VDUSE_BASE, 0x19, size_of::<VduseIovaUmem>()) as libc::c_ulong;
/// Request number of `VDUSE_IOTLB_GET_INFO` (device fd).
pub const VDUSE_IOTLB_GET_INFO_IOCTL: libc::c_ulong =
    request_code_readwrite!(VDUSE_BASE, 0x1a, size_of::<VduseIovaInfo>()) as libc::c_ulong;
/// Request number of `VDUSE_IOTLB_GET_FD2` (device fd, API v1 only).
pub const VDUSE_IOTLB_GET_FD2_IOCTL: libc::c_ulong =
    request_code_readwrite!(VDUSE_BASE, 0x1b, size_of::<VduseIotlbEntryV2>()) as libc::c_ulong;

// ---------------------------------------------------------------------------------------------
// ioctl wrappers
// ---------------------------------------------------------------------------------------------

ioctl_read!(
    /// `VDUSE_GET_API_VERSION` on `/dev/vduse/control`.
    ///
    /// On 7.x a control fd that has not set a version switches to API v1 when asked; always call
    /// [`vduse_set_api_version`] explicitly instead of relying on the default.
    ///
    /// # Safety
    /// `fd` must be an open `/dev/vduse/control` descriptor and `data` must point to a writable,
    /// aligned `u64`.
    vduse_get_api_version,
    VDUSE_BASE,
    0x00,
    u64
);

ioctl_write_ptr!(
    /// `VDUSE_SET_API_VERSION` on `/dev/vduse/control` (0 or 1; EINVAL for unknown versions).
    ///
    /// # Safety
    /// `fd` must be an open `/dev/vduse/control` descriptor and `data` must point to a readable,
    /// aligned `u64`.
    vduse_set_api_version,
    VDUSE_BASE,
    0x01,
    u64
);

ioctl_write_ptr!(
    /// `VDUSE_CREATE_DEV` on `/dev/vduse/control`. Pass [`DevConfigBuf::as_ptr`].
    ///
    /// # Safety
    /// `fd` must be an open `/dev/vduse/control` descriptor and `data` must point to a
    /// [`VduseDevConfig`] that is followed in the same allocation by `config_size` readable bytes
    /// (which [`DevConfigBuf`] guarantees).
    vduse_create_dev,
    VDUSE_BASE,
    0x02,
    VduseDevConfig
);

ioctl_write_ptr!(
    /// `VDUSE_DESTROY_DEV` on `/dev/vduse/control`, with a name built by [`vduse_name`].
    /// EBUSY while the device is attached to the vdpa bus or its fd is open.
    ///
    /// # Safety
    /// `fd` must be an open `/dev/vduse/control` descriptor and `data` must point to a readable
    /// `[u8; VDUSE_NAME_MAX]`.
    vduse_destroy_dev,
    VDUSE_BASE,
    0x03,
    [u8; VDUSE_NAME_MAX]
);

ioctl_read!(
    /// `VDUSE_GET_FEATURES` on `/dev/vduse/control`: the bitmap of optional VDUSE features
    /// (`VDUSE_F_QUEUE_READY` = bit 0, `VDUSE_F_SUSPEND` = bit 1) the kernel supports.
    ///
    /// Merged in Linux 7.3 (`_IOR(VDUSE_BASE, 0x04, __u64)` = 0x80088104, checked against
    /// Debian's `linux-libc-dev` 7.3~rc7-1~exp1). Kernels before 7.3 answer EINVAL (the
    /// control fd's default case); treat EINVAL or ENOTTY as "no optional features".
    ///
    /// # Safety
    /// `fd` must be an open `/dev/vduse/control` descriptor and `data` must point to a writable,
    /// aligned `u64`.
    vduse_get_features,
    VDUSE_BASE,
    0x04,
    u64
);

ioctl_write_ptr!(
    /// `VDUSE_SET_FEATURES` on `/dev/vduse/control` (Linux 7.3): the optional features the
    /// devices created on this fd use, a subset of what `VDUSE_GET_FEATURES` offered.
    ///
    /// # Safety
    /// `fd` must be an open `/dev/vduse/control` descriptor and `data` must point to a
    /// readable, aligned `u64`.
    vduse_set_features,
    VDUSE_BASE,
    0x05,
    u64
);

ioctl_readwrite!(
    /// `VDUSE_IOTLB_GET_FD`: returns a new fd for the first IOTLB region overlapping
    /// `[start, last]` and fills in the region's real bounds, offset and permission.
    ///
    /// # Safety
    /// `fd` must be an open VDUSE device descriptor and `data` must point to a writable
    /// [`VduseIotlbEntry`]. The returned fd is owned by the caller.
    vduse_iotlb_get_fd,
    VDUSE_BASE,
    0x10,
    VduseIotlbEntry
);

ioctl_read!(
    /// `VDUSE_DEV_GET_FEATURES`: the features the driver accepted (valid after FEATURES_OK).
    ///
    /// # Safety
    /// `fd` must be an open VDUSE device descriptor and `data` must point to a writable, aligned
    /// `u64`.
    vduse_dev_get_features,
    VDUSE_BASE,
    0x11,
    u64
);

ioctl_write_ptr!(
    /// `VDUSE_DEV_SET_CONFIG`: update part of the config space. Pass [`ConfigDataBuf::as_ptr`].
    ///
    /// # Safety
    /// `fd` must be an open VDUSE device descriptor and `data` must point to a
    /// [`VduseConfigData`] followed in the same allocation by `length` readable bytes (which
    /// [`config_data_buf`] guarantees).
    vduse_dev_set_config,
    VDUSE_BASE,
    0x12,
    VduseConfigData
);

ioctl_none!(
    /// `VDUSE_DEV_INJECT_CONFIG_IRQ`: tell the driver the config space changed (needs
    /// DRIVER_OK).
    ///
    /// # Safety
    /// `fd` must be an open VDUSE device descriptor.
    vduse_dev_inject_config_irq,
    VDUSE_BASE,
    0x13
);

ioctl_write_ptr!(
    /// `VDUSE_VQ_SETUP`: declare one virtqueue. Every queue must be set up before the device is
    /// added to the vdpa bus.
    ///
    /// # Safety
    /// `fd` must be an open VDUSE device descriptor and `data` must point to a readable
    /// [`VduseVqConfig`].
    vduse_vq_setup,
    VDUSE_BASE,
    0x14,
    VduseVqConfig
);

ioctl_readwrite!(
    /// `VDUSE_VQ_GET_INFO`: what the driver programmed for queue `data.index`.
    ///
    /// # Safety
    /// `fd` must be an open VDUSE device descriptor and `data` must point to a writable
    /// [`VduseVqInfo`].
    vduse_vq_get_info,
    VDUSE_BASE,
    0x15,
    VduseVqInfo
);

ioctl_write_ptr!(
    /// `VDUSE_VQ_SETUP_KICKFD`: install (or, with [`VDUSE_EVENTFD_DEASSIGN`], remove) a queue's
    /// kick eventfd. Reset drops it; re-install after every DRIVER_OK.
    ///
    /// # Safety
    /// `fd` must be an open VDUSE device descriptor and `data` must point to a readable
    /// [`VduseVqEventfd`] whose `fd` is an eventfd or `VDUSE_EVENTFD_DEASSIGN`.
    vduse_vq_setup_kickfd,
    VDUSE_BASE,
    0x16,
    VduseVqEventfd
);

ioctl_write_ptr!(
    /// `VDUSE_VQ_INJECT_IRQ`: signal the used ring of queue `*data` to the driver.
    ///
    /// # Safety
    /// `fd` must be an open VDUSE device descriptor and `data` must point to a readable, aligned
    /// `u32` queue index.
    vduse_vq_inject_irq,
    VDUSE_BASE,
    0x17,
    u32
);

ioctl_write_ptr!(
    /// `VDUSE_IOTLB_REG_UMEM`: back the bounce region with user memory.
    ///
    /// # Safety
    /// `fd` must be an open VDUSE device descriptor and `data` must point to a readable
    /// [`VduseIovaUmem`] whose `uaddr..uaddr+size` is memory the caller keeps mapped until it is
    /// deregistered or the device fd is closed.
    vduse_iotlb_reg_umem,
    VDUSE_BASE,
    0x18,
    VduseIovaUmem
);

ioctl_write_ptr!(
    /// `VDUSE_IOTLB_DEREG_UMEM`: stop using the registered user memory.
    ///
    /// # Safety
    /// `fd` must be an open VDUSE device descriptor and `data` must point to a readable
    /// [`VduseIovaUmem`].
    vduse_iotlb_dereg_umem,
    VDUSE_BASE,
    0x19,
    VduseIovaUmem
);

ioctl_readwrite!(
    /// `VDUSE_IOTLB_GET_INFO`: bounds and capabilities of the first region overlapping
    /// `[start, last]`.
    ///
    /// # Safety
    /// `fd` must be an open VDUSE device descriptor and `data` must point to a writable
    /// [`VduseIovaInfo`].
    vduse_iotlb_get_info,
    VDUSE_BASE,
    0x1a,
    VduseIovaInfo
);

ioctl_readwrite!(
    /// `VDUSE_IOTLB_GET_FD2`: like [`vduse_iotlb_get_fd`] with an address space (API v1 only;
    /// ENOTTY under v0).
    ///
    /// # Safety
    /// `fd` must be an open VDUSE device descriptor and `data` must point to a writable
    /// [`VduseIotlbEntryV2`]. The returned fd is owned by the caller.
    vduse_iotlb_get_fd2,
    VDUSE_BASE,
    0x1b,
    VduseIotlbEntryV2
);

#[cfg(test)]
mod tests {
    use std::mem::offset_of;

    use super::*;

    /// `assert_layout!(T, SIZE; field: OFFSET, ...)`: the size of `T` and each field's
    /// offset, as the kernel header has them.
    macro_rules! assert_layout {
        ($t:ty, $size:expr; $($f:ident: $off:expr),+ $(,)?) => {
            assert_eq!(size_of::<$t>(), $size, "size of {}", stringify!($t));
            assert_offsets!($t; $($f: $off),+);
        };
    }

    /// `assert_offsets!(T; field: OFFSET, ...)`: each field's offset in `T`.
    macro_rules! assert_offsets {
        ($t:ty; $($f:ident: $off:expr),+ $(,)?) => {
            $(assert_eq!(offset_of!($t, $f), $off, "{}.{}", stringify!($t), stringify!($f));)+
        };
    }

    /// Values printed by a C program compiled against Debian linux-libc-dev 7.2.13
    /// `linux/vduse.h` on x86_64 (`printf("0x%lx", VDUSE_...)`).
    #[test]
    fn ioctl_numbers_match_linux_7_2() {
        let cases: [(libc::c_ulong, libc::c_ulong); 18] = [
            (VDUSE_GET_API_VERSION_IOCTL, 0x8008_8100),
            (VDUSE_SET_API_VERSION_IOCTL, 0x4008_8101),
            (VDUSE_CREATE_DEV_IOCTL, 0x4150_8102),
            (VDUSE_DESTROY_DEV_IOCTL, 0x4100_8103),
            // 7.3 (linux-libc-dev 7.3~rc7-1~exp1): GET_FEATURES, SET_FEATURES
            (VDUSE_GET_FEATURES_IOCTL, 0x8008_8104),
            (VDUSE_SET_FEATURES_IOCTL, 0x4008_8105),
            (VDUSE_IOTLB_GET_FD_IOCTL, 0xc020_8110),
            (VDUSE_DEV_GET_FEATURES_IOCTL, 0x8008_8111),
            (VDUSE_DEV_SET_CONFIG_IOCTL, 0x4008_8112),
            (VDUSE_DEV_INJECT_CONFIG_IRQ_IOCTL, 0x8113),
            (VDUSE_VQ_SETUP_IOCTL, 0x4020_8114),
            (VDUSE_VQ_GET_INFO_IOCTL, 0xc030_8115),
            (VDUSE_VQ_SETUP_KICKFD_IOCTL, 0x4008_8116),
            (VDUSE_VQ_INJECT_IRQ_IOCTL, 0x4004_8117),
            (VDUSE_IOTLB_REG_UMEM_IOCTL, 0x4030_8118),
            (VDUSE_IOTLB_DEREG_UMEM_IOCTL, 0x4030_8119),
            (VDUSE_IOTLB_GET_INFO_IOCTL, 0xc030_811a),
            (VDUSE_IOTLB_GET_FD2_IOCTL, 0xc050_811b),
        ];
        for (i, (got, want)) in cases.iter().enumerate() {
            assert_eq!(got, want, "case {i}: {got:#x} != {want:#x}");
        }
    }

    /// The same numbers recomputed with nix's request-code macros from the struct types the
    /// wrappers use, so a layout change in a struct shows up here.
    #[test]
    fn ioctl_numbers_from_struct_types() {
        assert_eq!(
            request_code_read!(VDUSE_BASE, 0x00, size_of::<u64>()),
            0x8008_8100
        );
        assert_eq!(
            request_code_write!(VDUSE_BASE, 0x01, size_of::<u64>()),
            0x4008_8101
        );
        assert_eq!(
            request_code_write!(VDUSE_BASE, 0x02, size_of::<VduseDevConfig>()),
            0x4150_8102
        );
        assert_eq!(
            request_code_write!(VDUSE_BASE, 0x03, size_of::<[u8; VDUSE_NAME_MAX]>()),
            0x4100_8103
        );
        assert_eq!(
            request_code_read!(VDUSE_BASE, 0x04, size_of::<u64>()),
            0x8008_8104
        );
        assert_eq!(
            request_code_readwrite!(VDUSE_BASE, 0x10, size_of::<VduseIotlbEntry>()),
            0xc020_8110
        );
        assert_eq!(
            request_code_read!(VDUSE_BASE, 0x11, size_of::<u64>()),
            0x8008_8111
        );
        assert_eq!(
            request_code_write!(VDUSE_BASE, 0x12, size_of::<VduseConfigData>()),
            0x4008_8112
        );
        assert_eq!(request_code_none!(VDUSE_BASE, 0x13), 0x8113);
        assert_eq!(
            request_code_write!(VDUSE_BASE, 0x14, size_of::<VduseVqConfig>()),
            0x4020_8114
        );
        assert_eq!(
            request_code_readwrite!(VDUSE_BASE, 0x15, size_of::<VduseVqInfo>()),
            0xc030_8115
        );
        assert_eq!(
            request_code_write!(VDUSE_BASE, 0x16, size_of::<VduseVqEventfd>()),
            0x4008_8116
        );
        assert_eq!(
            request_code_write!(VDUSE_BASE, 0x17, size_of::<u32>()),
            0x4004_8117
        );
        assert_eq!(
            request_code_write!(VDUSE_BASE, 0x18, size_of::<VduseIovaUmem>()),
            0x4030_8118
        );
        assert_eq!(
            request_code_write!(VDUSE_BASE, 0x19, size_of::<VduseIovaUmem>()),
            0x4030_8119
        );
        assert_eq!(
            request_code_readwrite!(VDUSE_BASE, 0x1a, size_of::<VduseIovaInfo>()),
            0xc030_811a
        );
        assert_eq!(
            request_code_readwrite!(VDUSE_BASE, 0x1b, size_of::<VduseIotlbEntryV2>()),
            0xc050_811b
        );
    }

    #[test]
    fn constants_match_linux_7_2() {
        assert_eq!(VDUSE_BASE, 0x81);
        assert_eq!(VDUSE_API_VERSION_0, 0);
        assert_eq!(VDUSE_API_VERSION_1, 1);
        assert_eq!(VDUSE_NAME_MAX, 256);
        assert_eq!(
            [
                VDUSE_GET_VQ_STATE,
                VDUSE_SET_STATUS,
                VDUSE_UPDATE_IOTLB,
                VDUSE_SET_VQ_GROUP_ASID
            ],
            [0, 1, 2, 3]
        );
        assert_eq!([VDUSE_REQ_RESULT_OK, VDUSE_REQ_RESULT_FAILED], [0, 1]);
        assert_eq!(
            [VDUSE_ACCESS_RO, VDUSE_ACCESS_WO, VDUSE_ACCESS_RW],
            [1, 2, 3]
        );
        assert_eq!(VDUSE_IOVA_CAP_UMEM, 1);
        assert_eq!(VDUSE_EVENTFD_DEASSIGN, -1);
        assert_eq!(VDUSE_MSG_SIZE, 152);
    }

    #[test]
    fn dev_config_layout() {
        assert_eq!(size_of::<VduseDevConfig>(), 336);
        assert_eq!(VduseDevConfig::SIZE, 336);
        assert_eq!(align_of::<VduseDevConfig>(), 8);
        assert_offsets!(VduseDevConfig; name: 0, vendor_id: 256, device_id: 260, features: 264, vq_num: 272, vq_align: 276, ngroups: 280, nas: 284, reserved: 288, config_size: 332);
    }

    #[test]
    fn small_struct_layouts() {
        assert_layout!(VduseIotlbEntry, 32; offset: 0, start: 8, last: 16, perm: 24);

        assert_layout!(VduseConfigData, 8; offset: 0, length: 4);

        assert_layout!(VduseVqConfig, 32;
            index: 0,
            max_size: 4,
            reserved1: 6,
            group: 8,
            reserved2: 12,
        );

        assert_layout!(VduseVqStateSplit, 2; avail_index: 0);
        assert_layout!(VduseVqStatePacked, 8;
            last_avail_counter: 0,
            last_avail_idx: 2,
            last_used_counter: 4,
            last_used_idx: 6,
        );

        assert_layout!(VduseVqInfo, 48;
            index: 0,
            num: 4,
            desc_addr: 8,
            driver_addr: 16,
            device_addr: 24,
            state: 32,
            ready: 40,
        );

        assert_layout!(VduseVqEventfd, 8; index: 0, fd: 4);

        assert_layout!(VduseIovaUmem, 48; uaddr: 0, iova: 8, size: 16, asid: 24, reserved: 28);

        assert_layout!(VduseIovaInfo, 48;
            start: 0,
            last: 8,
            capability: 16,
            asid: 24,
            reserved: 28,
        );

        assert_layout!(VduseIotlbEntryV2, 80;
            offset: 0,
            start: 8,
            last: 16,
            perm: 24,
            padding: 25,
            asid: 32,
            reserved: 36,
        );
    }

    #[test]
    fn message_layouts() {
        assert_eq!(size_of::<VduseDevRequest>(), 152);
        assert_eq!(align_of::<VduseDevRequest>(), 8);
        assert_offsets!(VduseDevRequest; req_type: 0, request_id: 4, reserved: 8, payload: 24);

        assert_eq!(size_of::<VduseDevResponse>(), 152);
        assert_eq!(align_of::<VduseDevResponse>(), 4);
        assert_offsets!(VduseDevResponse; request_id: 0, result: 4, reserved: 8, payload: 24);
    }

    fn request_bytes(req_type: u32, id: u32, payload: &[(usize, &[u8])]) -> [u8; 152] {
        let mut b = [0u8; 152];
        b[0..4].copy_from_slice(&req_type.to_ne_bytes());
        b[4..8].copy_from_slice(&id.to_ne_bytes());
        for (off, bytes) in payload {
            b[*off..*off + bytes.len()].copy_from_slice(bytes);
        }
        b
    }

    /// Byte offsets below are the C `offsetof` values: `s` 24, `vq_state.index` 24, `iova.last`
    /// 32, `iova_v2.asid` 40, `vq_group_asid.asid` 28.
    #[test]
    fn request_accessors_read_c_offsets() {
        let b = request_bytes(VDUSE_SET_STATUS, 7, &[(24, &[0x0f])]);
        let r = VduseDevRequest::from_bytes(&b).unwrap();
        assert_eq!(
            (r.req_type, r.request_id, r.status()),
            (VDUSE_SET_STATUS, 7, 0x0f)
        );
        assert_eq!(r.to_bytes(), b);

        let b = request_bytes(VDUSE_GET_VQ_STATE, 8, &[(24, &3u32.to_ne_bytes())]);
        assert_eq!(VduseDevRequest::from_bytes(&b).unwrap().vq_index(), 3);

        let b = request_bytes(
            VDUSE_UPDATE_IOTLB,
            9,
            &[
                (24, &0x1122_3344_5566_7788u64.to_ne_bytes()),
                (32, &u64::MAX.to_ne_bytes()),
                (40, &5u32.to_ne_bytes()),
            ],
        );
        let r = VduseDevRequest::from_bytes(&b).unwrap();
        assert_eq!(r.iova_range(), (0x1122_3344_5566_7788, u64::MAX));
        assert_eq!(r.iova_range_v2(), (0x1122_3344_5566_7788, u64::MAX, 5));

        let b = request_bytes(
            VDUSE_SET_VQ_GROUP_ASID,
            10,
            &[(24, &2u32.to_ne_bytes()), (28, &1u32.to_ne_bytes())],
        );
        assert_eq!(
            VduseDevRequest::from_bytes(&b).unwrap().group_asid(),
            (2, 1)
        );

        assert!(VduseDevRequest::from_bytes(&b[..151]).is_none());
    }

    /// C offsets: `vq_state.index` 24, `vq_state.split.avail_index` 28,
    /// `vq_state.packed.last_used_idx` 34.
    #[test]
    fn response_constructors_write_c_offsets() {
        let r = VduseDevResponse::new(42, VDUSE_REQ_RESULT_FAILED);
        let b = r.to_bytes();
        assert_eq!(&b[0..4], &42u32.to_ne_bytes());
        assert_eq!(&b[4..8], &1u32.to_ne_bytes());
        assert!(b[8..].iter().all(|&x| x == 0));

        let b = VduseDevResponse::new(1, VDUSE_REQ_RESULT_OK)
            .with_split_vq_state(2, 0xabcd)
            .to_bytes();
        assert_eq!(&b[24..28], &2u32.to_ne_bytes());
        assert_eq!(&b[28..30], &0xabcdu16.to_ne_bytes());
        assert!(b[30..].iter().all(|&x| x == 0));

        let packed = VduseVqStatePacked {
            last_avail_counter: 1,
            last_avail_idx: 0x10,
            last_used_counter: 1,
            last_used_idx: 0x7fff,
        };
        let r = VduseDevResponse::new(1, VDUSE_REQ_RESULT_OK).with_packed_vq_state(0, packed);
        let b = r.to_bytes();
        assert_eq!(&b[28..30], &1u16.to_ne_bytes());
        assert_eq!(&b[30..32], &0x10u16.to_ne_bytes());
        assert_eq!(&b[32..34], &1u16.to_ne_bytes());
        assert_eq!(&b[34..36], &0x7fffu16.to_ne_bytes());
        assert_eq!(VduseDevResponse::from_bytes(&b), Some(r));
    }

    #[test]
    fn vq_info_union_accessors() {
        let info = VduseVqInfo {
            state: [5, 6, 7, 8],
            ready: 1,
            ..VduseVqInfo::for_index(3)
        };
        assert_eq!(info.index, 3);
        assert_eq!(info.split_avail_index(), 5);
        assert_eq!(
            info.packed_state(),
            VduseVqStatePacked {
                last_avail_counter: 5,
                last_avail_idx: 6,
                last_used_counter: 7,
                last_used_idx: 8
            }
        );
        assert!(info.is_ready());
    }

    #[test]
    fn dev_config_buf_is_header_then_config() {
        let header = VduseDevConfig {
            name: vduse_name("vduse-blk0").unwrap(),
            vendor_id: 0x1af4,
            device_id: 2,
            features: 1 << 33,
            vq_num: 1,
            vq_align: 4096,
            config_size: 999, // replaced by the real length
            ..VduseDevConfig::default()
        };
        let config: Vec<u8> = (0..60u8).collect();
        let buf = DevConfigBuf::new(&header, &config).unwrap();
        assert_eq!(buf.len(), 336 + 60);
        assert!(!buf.is_empty());
        assert_eq!(buf.as_ptr() as usize % align_of::<VduseDevConfig>(), 0);
        let bytes = buf.to_vec();
        assert_eq!(&bytes[0..11], b"vduse-blk0\0");
        assert_eq!(&bytes[256..260], &0x1af4u32.to_ne_bytes());
        assert_eq!(&bytes[260..264], &2u32.to_ne_bytes());
        assert_eq!(&bytes[264..272], &(1u64 << 33).to_ne_bytes());
        assert_eq!(&bytes[272..276], &1u32.to_ne_bytes());
        assert_eq!(&bytes[276..280], &4096u32.to_ne_bytes());
        assert!(bytes[280..332].iter().all(|&b| b == 0));
        assert_eq!(&bytes[332..336], &60u32.to_ne_bytes());
        assert_eq!(&bytes[336..], &config[..]);
        assert!(format!("{header:?}").contains("\"vduse-blk0\""));
        assert_eq!(header.name_str(), "vduse-blk0");
    }

    #[test]
    fn config_data_buf_is_header_then_bytes() {
        let buf = config_data_buf(8, &[1, 2, 3]).unwrap();
        assert_eq!(buf.len(), 11);
        assert!(!buf.is_empty());
        assert_eq!(buf.as_ptr() as usize % 8, 0);
        let b = buf.to_vec();
        assert_eq!(&b[0..4], &8u32.to_ne_bytes());
        assert_eq!(&b[4..8], &3u32.to_ne_bytes());
        assert_eq!(&b[8..], &[1, 2, 3]);
    }

    #[test]
    fn name_validation() {
        assert_eq!(vduse_name(""), Err(NameError::Empty));
        assert_eq!(vduse_name(&"x".repeat(256)), Err(NameError::TooLong));
        assert!(vduse_name(&"x".repeat(255)).is_ok());
        assert_eq!(vduse_name("a/b"), Err(NameError::BadChar));
        assert_eq!(vduse_name("a\0b"), Err(NameError::BadChar));
        let n = vduse_name("blk").unwrap();
        assert_eq!(&n[..4], b"blk\0");
        assert!(n[3..].iter().all(|&b| b == 0));
    }

    #[test]
    fn defaults_are_zero() {
        assert!(VduseDevConfig::default().to_bytes().iter().all(|&b| b == 0));
        assert!(VduseDevRequest::default()
            .to_bytes()
            .iter()
            .all(|&b| b == 0));
        assert_eq!(VduseVqConfig::default().group, 0);
        assert_eq!(VduseIotlbEntryV2::default().reserved, [0; 11]);
    }
}
