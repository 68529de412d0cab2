//! The copy engine: make a sink hold what a source disk holds.
//!
//! ```text
//!  source: &dyn Disk ──▶ Copier ──▶ S: CopySink ── PeerSink (migration: the peer link)
//!                          │  │                  └─ DiskSink (a local Arc<dyn Disk>)
//!       DirtyBitmap ◀─ take┘  └─▶ &dyn Progress (bytes planned / done / sent)
//! ```
//!
//! [`Copier`] knows how to copy, not what for: a bulk copy of a list of
//! ranges (holes and zeroes sent as zero ranges), rounds that take a dirty
//! bitmap and copy what it marks (the caller commits the take once the
//! sink is durable), a rate limit, a hash resync that sends only the blocks
//! whose hashes differ, and a verify pass. The range helpers
//! ([`subtract`], [`align_ranges`], [`allocated`]) plan what to copy.
//!
//! The migration drives it into its peer link; [`DiskSink`] drives it into
//! a local disk (merging a view, re-protecting a copy).
#![warn(missing_docs)]

mod engine;
mod error;
mod progress;
mod ranges;
mod sink;
mod throttle;

pub use engine::{Copier, CopyOptions, HASH_BATCH, Verified};
pub use error::CopyError;
pub use progress::{CopyEvent, NoProgress, Progress};
pub use ranges::{align_ranges, allocated, subtract};
pub use sink::{BlockHash, CopySink, DiskSink, block_hash};
pub use throttle::{Clock, SystemClock, Throttle};

#[cfg(test)]
mod tests;
