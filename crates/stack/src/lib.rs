//! The one place an export's layer stack is assembled.
//!
//! `serve --export` and the migration target (a received image, fresh or
//! reopened after a restart) both call [`ExportStack::open`], so both get
//! the same layers, in the same order, with the same checks:
//!
//! ```text
//!   clients / forwarded requests
//!             │
//!   ┌─────────▼─────────┐
//!   │ SwitchDisk        │ (understudy-layers) hold, pivot, forward, fail
//!   ├───────────────────┤
//!   │ FilterDisk        │──marks──▶ BitmapStore ── IMAGE.bitmaps, IMAGE.bitmaps-intent
//!   ├───────────────────┤                           (persister thread: snapshot on a timer)
//!   │ EpochDisk (opt.)  │ ── IMAGE.journal (replayed on open)
//!   ├───────────────────┤
//!   │ block             │ open_disk() or create; a test-only wrapper may sit on it
//!   └───────────────────┘
//! ```
//!
//! Opening runs in two phases. [`StackSpec::validate`] checks every option
//! (path, format, read-only, bitmap names and granularities, journal
//! configuration, intent extent size, persist interval) and touches no
//! file. Only then are the layers opened bottom-up: block, bitmap store
//! (its own crash recovery; an existing bitmap of another granularity is
//! refused here, before the journal), journal (replay), missing bitmaps
//! added, persister, filter, switch. A read-only image gets the block layer
//! alone ([`Opened::ReadOnly`]): nothing records its writes.
//!
//! [`sidecars`] names every file that belongs to an image besides the image
//! itself; [`remove_stale`] clears them for a fresh receive.
#![warn(missing_docs)]

mod error;
mod open;
mod sidecars;
mod spec;
#[cfg(test)]
mod tests;

pub use error::StackError;
pub use open::{ExportStack, Opened, ReadOnlyExport};
pub use sidecars::{remove_stale, sidecars};
#[cfg(any(test, feature = "testing"))]
pub use spec::BlockWrapper;
pub use spec::{BitmapRequest, ImageSource, StackSpec};
