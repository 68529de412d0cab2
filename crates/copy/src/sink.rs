//! Where a copy goes.

use std::sync::Arc;

use understudy_block::{BlockError, Disk, WriteOpts, ZeroOpts};

/// The hash the engine compares blocks with: xxh3-64 (the hash the
/// migration wire carries, so a peer's hashes compare directly).
pub fn block_hash(data: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(data)
}

/// A sink's hash of one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHash {
    /// [`block_hash`] of the block's content.
    pub hash: u64,
    /// The sink changed this block on its own since it was last identical
    /// to the source (verify skips it).
    pub changed: bool,
}

/// The receiving end of a copy.
pub trait CopySink {
    /// The sink's error.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Store `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), Self::Error>;

    /// Make `[offset, offset + len)` read as zeroes.
    fn zero(&mut self, offset: u64, len: u64) -> Result<(), Self::Error>;

    /// Make everything written so far durable.
    fn flush(&mut self) -> Result<(), Self::Error>;

    /// The hashes of `[offset, offset + len)` in blocks of `block` bytes
    /// (the last one may be shorter), in order.
    fn hashes(&mut self, offset: u64, len: u64, block: u64) -> Result<Vec<BlockHash>, Self::Error>;

    /// Whether the sink can still take data; checked before each piece so
    /// a dead sink stops the copy early. Default: always.
    fn check(&self) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Called before a range is read from the source and sent here, with
    /// [`CopySink::unlock`] after: a sink that also receives writes from
    /// elsewhere (mirrored guest writes) locks the range so both arrive in
    /// the order they hit the source. Default: no lock.
    fn lock(&mut self, _offset: u64, _len: u64) -> u64 {
        0
    }

    /// Release what [`CopySink::lock`] returned.
    fn unlock(&mut self, _token: u64) {}
}

/// A sink that is a local disk.
#[derive(Debug, Clone)]
pub struct DiskSink {
    disk: Arc<dyn Disk>,
    buf: Vec<u8>,
}

impl DiskSink {
    /// Copy into `disk`.
    pub fn new(disk: Arc<dyn Disk>) -> Self {
        Self {
            disk,
            buf: Vec::new(),
        }
    }

    /// The disk written to.
    pub fn disk(&self) -> &Arc<dyn Disk> {
        &self.disk
    }
}

impl CopySink for DiskSink {
    type Error = BlockError;

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        self.disk.write_at(data, offset, WriteOpts::default())
    }

    fn zero(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        let z = ZeroOpts {
            may_unmap: true,
            ..ZeroOpts::default()
        };
        self.disk.write_zeroes(offset, len, z)
    }

    fn flush(&mut self) -> Result<(), BlockError> {
        self.disk.flush()
    }

    fn hashes(&mut self, offset: u64, len: u64, block: u64) -> Result<Vec<BlockHash>, BlockError> {
        local_hashes(&*self.disk, offset, len, block, &mut self.buf)
    }
}

/// Hash `[offset, offset + len)` of `disk` in `block`-byte blocks.
pub(crate) fn local_hashes(
    disk: &dyn Disk,
    offset: u64,
    len: u64,
    block: u64,
    buf: &mut Vec<u8>,
) -> Result<Vec<BlockHash>, BlockError> {
    buf.resize(block as usize, 0);
    let mut out = Vec::with_capacity(len.div_ceil(block) as usize);
    let mut pos = offset;
    while pos < offset + len {
        let n = block.min(offset + len - pos) as usize;
        disk.read_at(&mut buf[..n], pos)?;
        out.push(BlockHash {
            hash: block_hash(&buf[..n]),
            changed: false,
        });
        pos += n as u64;
    }
    Ok(out)
}
