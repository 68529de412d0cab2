//! Crash-consistent virtual disks: write-order and write-flush on an epoch
//! journal.
//!
//! A guest file system orders its writes (a journal commit after the data it
//! describes) but a virtual disk offers only flush, which also pays for
//! durability. [`EpochDisk`] wraps any [`understudy_block::Disk`] and adds:
//!
//! - **write-order** ([`DiskWrite::order`](understudy_block::DiskWrite::order)):
//!   closes the current epoch and returns at once, without an fsync;
//! - **write-flush** ([`EpochDisk::sync`], or `flush` under
//!   [`FlushPolicy::Durable`]): closes the epoch and returns once it and
//!   every earlier epoch are durable.
//!
//! Guarantee (prefix consistency): after a crash at any instant the image
//! holds exactly the writes of epochs `1..=k` for some `k`, none of a later
//! epoch, and `k` is at least the last epoch closed by an acknowledged
//! flush. With semantic journaling enabled ([`JournalConfig::in_place_min`])
//! the in-place writes of epoch `k + 1` may additionally be present, in
//! part; see `docs/ordering.md` for the argument.
//!
//! Code map:
//! - [`format`]: the journal file format (pure encode/decode);
//! - [`scan`]: reading a journal back, deciding which epochs are complete;
//! - `disk/`: [`EpochDisk`], split by responsibility (configuration, flush
//!   policy, ring, in-place writes, writer thread, recovery; see its docs);
//! - [`sim`]: a simulated page cache with failpoints, for crash tests;
//! - [`harness`]: recording write streams and checking crash states.
#![warn(missing_docs)]

mod disk;
mod error;
pub mod format;
pub mod harness;
mod log;
mod overlay;
pub mod scan;
pub mod sim;

pub use disk::{
    ClosedEpoch, EpochData, EpochDisk, EpochHook, EpochWrite, EpochWriteKind, FlushPolicy,
    JournalConfig, JournalStats, RecoveryReport,
};
pub use error::JournalError;
pub use log::LogFile;
