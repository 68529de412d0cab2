//! The block layer: what a virtual disk can do, and the backends that do it.
//!
//! It knows nothing of NBD, bitmaps or peers. Everything above it (the block
//! filter, the NBD server, migration, replication) talks to a disk through
//! the small capability traits below, composed into [`Disk`]:
//!
//! ```text
//!             DiskSize
//!        ┌───────┼────────┐
//!    DiskRead DiskWrite DiskMap
//!        └───────┼────────┘
//!              Disk  (+ info(), Send + Sync)
//!         ┌──────┴──────┐
//!     RawDisk       Qcow2Disk        (backends, chosen by open_disk)
//! ```
//!
//! Every method takes `&self`: a disk is shared by many I/O workers at once
//! and each backend is responsible for its own concurrency (the raw backend
//! uses positional I/O on one descriptor and holds no lock on the data path).
//!
//! Every write carries [`WriteOpts`], which includes the [`Epoch`] the write
//! belongs to. Backends that do not journal ignore it; the epoch journal
//! (ordering and flush primitives) uses it without changing this interface.
#![warn(missing_docs)]

mod error;
mod extent;
mod factory;
pub mod qcow2;
pub mod raw;

pub use error::{BlockError, ErrorKind};
pub use extent::{Extent, ExtentKind, coalesce};
pub use factory::{Format, OpenOptions, UnknownFormat, detect_format, open_disk};

/// Sequence number of a write-ordering epoch.
///
/// Writes in epoch `n` are ordered after every write of epochs `< n`. Epoch 0
/// means "no ordering information" and is what callers that do not use the
/// ordering primitives pass.
pub type Epoch = u64;

/// Options that travel with every data-changing request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteOpts {
    /// Force unit access: the write must be on stable storage before the
    /// call returns.
    pub fua: bool,
    /// The ordering epoch the write belongs to.
    pub epoch: Epoch,
}

impl WriteOpts {
    /// Options with FUA set.
    pub fn fua() -> Self {
        Self {
            fua: true,
            epoch: 0,
        }
    }
}

/// Options for [`DiskWrite::write_zeroes`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroOpts {
    /// FUA and epoch, as for a write.
    pub write: WriteOpts,
    /// The backend may deallocate the range (punch a hole) instead of
    /// writing zeroes. When false the range must stay allocated.
    pub may_unmap: bool,
    /// Fail with [`ErrorKind::NotSupported`] instead of falling back to a
    /// slow path (writing zero buffers).
    pub fast_only: bool,
}

/// Static facts about an open disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    /// Image format.
    pub format: Format,
    /// Virtual size in bytes.
    pub size: u64,
    /// Whether writes are refused.
    pub read_only: bool,
    /// Whether discard can actually deallocate (otherwise it is a no-op).
    pub can_discard: bool,
    /// Whether write-zeroes has a fast path (no zero buffers written).
    pub can_fast_zero: bool,
    /// Whether a flush through any handle of this disk makes writes done
    /// through every other handle durable (the NBD multi-conn promise).
    pub flush_covers_all_handles: bool,
    /// Preferred I/O granularity in bytes (a power of two).
    pub preferred_block_size: u32,
}

/// Result type of the block layer.
pub type Result<T, E = BlockError> = std::result::Result<T, E>;

/// The virtual size of a disk.
pub trait DiskSize {
    /// Size in bytes.
    fn size(&self) -> u64;
}

/// Reading.
pub trait DiskRead: DiskSize {
    /// Fill `buf` with the bytes at `offset`. The whole range must lie inside
    /// the disk; callers validate bounds first ([`check_range`]).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
}

/// Changing contents and durability.
pub trait DiskWrite: DiskSize {
    /// Write `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64, opts: WriteOpts) -> Result<()>;
    /// Make `len` bytes at `offset` read as zero.
    fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> Result<()>;
    /// Tell the backend the range is no longer needed. Contents of the range
    /// are unspecified afterwards (raw and qcow2 read zeroes there).
    fn discard(&self, offset: u64, len: u64, opts: WriteOpts) -> Result<()>;
    /// Make every completed write durable.
    fn flush(&self) -> Result<()>;

    /// Write-order barrier: every write completed before this call reaches
    /// stable storage before any write issued after it. Returns the epoch
    /// that was closed. Backends without an epoch journal get ordering from
    /// a full flush, which is correct but pays for durability.
    fn order(&self) -> Result<Epoch> {
        self.flush()?;
        Ok(0)
    }
}

/// Allocation status, for NBD `base:allocation` and for sparse copies.
pub trait DiskMap: DiskSize {
    /// Describe `[offset, offset + len)` as a list of extents that start at
    /// `offset`, are contiguous, and cover at least one byte. The list may
    /// stop before `offset + len` (callers ask again), but never extends past
    /// the end of the disk.
    fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>>;
}

/// A virtual disk: every capability, shareable between threads.
pub trait Disk: DiskRead + DiskWrite + DiskMap + Send + Sync + std::fmt::Debug {
    /// Static facts about the disk.
    fn info(&self) -> DiskInfo;
}

/// An error and all its sources on one line (`outer: cause: root cause`),
/// for log lines and for messages sent to clients and peers.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Check that `[offset, offset + len)` lies inside a disk of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfBounds { offset, len, size }),
    }
}
