//! qcow2 images (with backing chains) on top of imago.

use std::path::Path;

use crate::{
    BlockError, Disk, DiskInfo, DiskMap, DiskRead, DiskSize, DiskWrite, Extent, Format, Result,
    WriteOpts, ZeroOpts,
};

/// A qcow2 image. PLACEHOLDER: being implemented.
#[derive(Debug)]
pub struct Qcow2Disk {
    size: u64,
}

impl Qcow2Disk {
    /// Open a qcow2 image and its backing chain.
    pub fn open(path: &Path, _read_only: bool) -> Result<Self> {
        Err(BlockError::Format {
            path: path.to_owned(),
            format: "qcow2",
            reason: "qcow2 support is not built yet".into(),
        })
    }
}

impl DiskSize for Qcow2Disk {
    fn size(&self) -> u64 {
        self.size
    }
}
impl DiskRead for Qcow2Disk {
    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> Result<()> {
        Err(BlockError::NotSupported("qcow2"))
    }
}
impl DiskWrite for Qcow2Disk {
    fn write_at(&self, _buf: &[u8], _offset: u64, _opts: WriteOpts) -> Result<()> {
        Err(BlockError::NotSupported("qcow2"))
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _opts: ZeroOpts) -> Result<()> {
        Err(BlockError::NotSupported("qcow2"))
    }
    fn discard(&self, _offset: u64, _len: u64, _opts: WriteOpts) -> Result<()> {
        Err(BlockError::NotSupported("qcow2"))
    }
    fn flush(&self) -> Result<()> {
        Err(BlockError::NotSupported("qcow2"))
    }
}
impl DiskMap for Qcow2Disk {
    fn map(&self, _offset: u64, _len: u64) -> Result<Vec<Extent>> {
        Err(BlockError::NotSupported("qcow2"))
    }
}
impl Disk for Qcow2Disk {
    fn info(&self) -> DiskInfo {
        DiskInfo {
            format: Format::Qcow2,
            size: self.size,
            read_only: true,
            can_discard: false,
            can_fast_zero: false,
            flush_covers_all_handles: true,
            preferred_block_size: 4096,
        }
    }
}
