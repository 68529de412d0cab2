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
//!             └─ after commit: Route::Forward(RemoteDisk) ── forwarded requests ─▶ SwitchDisk of B
//! ```
//!
//! Both ends work on an export's layer stack as `understudy-stack` opens it
//! (block, optional epoch journal, filter with the bitmap store, switch):
//! the daemon opens its `--export`s with it, and the target opens received
//! images with it (fresh, resumed, or owned after a restart; with the
//! journal the daemon configures for received disks). [`SourceExport`] is
//! the migration's view of such a stack ([`SourceExport::from_stack`]).
//! The general layers it steers, [`SwitchDisk`] (hold, forward) and
//! [`observer::RangeLock`], live in `understudy-layers` and are
//! re-exported here. The copying itself (bulk, dirty rounds, throttle,
//! hash resync, verify) is `understudy-copy`'s engine driven into a
//! [`source::PeerSink`].
//!
//! * [`wire`]: the messages, sans-I/O, bounded, with a hash per extent.
//! * [`record`]: the ownership/generation record beside each image.
//! * [`source`]: the migration job (bulk, iterate or mirror, switch-over,
//!   verify) and its [`Status`]; the copying itself is `understudy-copy`'s
//!   engine driven into a [`PeerSink`].
//! * [`target`]: the receiving service.
//! * [`observer`]: the write observer that marks or mirrors guest writes.
//!
//! Fault injection for tests (`MigrateOptions::fault_hook`,
//! `TargetConfig::commit_fault`) exists only with the `testing` feature.
//!
//! The protocol, both state machines, the ownership rules and the failure
//! cases are in `docs/migration.md`.
#![warn(missing_docs)]

pub mod conn;
mod error;
mod export;
pub mod observer;
pub mod record;
pub mod source;
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
#[cfg(any(test, feature = "testing"))]
pub use target::{CommitFault, DiskWrapper};
pub use target::{TargetConfig, TargetError, TargetHooks, TargetService, open_existing};
pub use understudy_layers::{Hold, Route, SwitchDisk};
