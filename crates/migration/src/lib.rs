//! Live migration of a disk between understudy daemons.
//!
//! A disk served by one daemon (the source, "A") moves to another (the
//! target, "B") while its clients keep writing, and can later move back
//! sending only what changed:
//!
//! ```text
//!  source (owner)                                   target
//!  NBD ─▶ SwitchDisk ─▶ FilterDisk ─▶ image         PeerListener ─▶ receive() ─▶ DIR/NAME.img
//!             │             └─ MigrationObserver ──── peer link (PSK, MAC) ───▶ write, flush, commit
//!             └─ after commit: RemoteDisk ─────────── forwarded requests ──────▶ SwitchDisk of B
//! ```
//!
//! * [`wire`]: the messages, sans-I/O, bounded, with a hash per extent.
//! * [`record`]: the ownership/generation record beside each image.
//! * [`source`]: the migration job (bulk, iterate or mirror, switch-over,
//!   verify) and its [`Status`]; the copying itself is `understudy-copy`'s
//!   engine driven into a [`PeerSink`].
//! * [`target`]: the receiving service.
//! * [`SwitchDisk`]: holds and re-routes an export's I/O.
//!
//! Fault injection for tests (`MigrateOptions::fault_hook`,
//! `TargetConfig::commit_fault`) exists only with the `testing` feature.
//!
//! The protocol, both state machines, the ownership rules and the failure
//! cases are in `docs/migration.md`.
#![warn(missing_docs)]

pub mod conn;
mod error;
pub mod observer;
pub mod record;
pub mod source;
mod switch;
pub mod target;
pub mod wire;

pub use conn::{Conn, RemoteDisk};
pub use error::{MigrationError, ParseModeError, RecordError};
#[cfg(any(test, feature = "testing"))]
pub use source::FaultHook;
pub use source::{
    Job, MIGRATION_BITMAP, MigrateOptions, Mode, NoHooks, PURPOSE, PeerSink, Phase,
    RECEIVED_BITMAP, Reporter, SourceExport, SourceHooks, Status, migrate, peer_bitmap_name,
};
pub use switch::{Hold, Route, SwitchDisk};
#[cfg(any(test, feature = "testing"))]
pub use target::CommitFault;
pub use target::{
    DiskWrapper, TargetConfig, TargetError, TargetHooks, TargetService, open_existing,
};
