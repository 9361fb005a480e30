//! uAPI
pub mod vdpa;
pub mod vduse;
pub mod virtio;
