//! General I/O layers that sit above an export's block filter and that
//! several features share (migration today; replication and copy-on-write
//! views next).
//!
//! * [`SwitchDisk`]: the outermost layer of every writable export. It can
//!   hold all I/O, and route it to the export's own disk, to another local
//!   disk (a pivot) or to any other [`understudy_block::Disk`] (forwarding).
//! * [`RangeLock`]: byte-range locks, so two writers of the same range (a
//!   background copy and a mirrored guest write, say) reach a destination
//!   in the order they hit the source.
//!
//! Neither knows about migration, peers or bitmaps.
#![warn(missing_docs)]

mod range_lock;
mod switch;

pub use range_lock::RangeLock;
pub use switch::{Hold, Route, SwitchDisk};
