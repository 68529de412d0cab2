//! Whole-VM live migration between understudy daemons, without the daemon:
//! the messages of the VM link, the RAM pre-copy loop (hash-scan dirty
//! detection, content-patch checkpoints, convergence and stop/cont
//! throttling) and the device-state pump that carries QEMU's migration
//! stream as frames over the authenticated peer link.
//!
//! ```text
//!  source daemon                                   target daemon
//!  VM link (purpose "vm-migrate") ── Hello ──────▶ check, RAM file, Welcome
//!  disk jobs (purpose "migrate", one per disk) ──▶ receive, commit (forwarding)
//!  RAM link (purpose "vm-ram") ── Attach, memsync checkpoints ─▶ BackupImage(RAM file)
//!  VM link ── Prepare ──▶ QEMU -incoming defer -S on the RAM file ── Ready
//!  stop, last checkpoint, `migrate unix:` ─ StateData* / StateEnd ─▶ migrate-incoming
//!          ◀── Loaded ── Commit ─▶ ownership record ── Committed ◀── ; cont on target
//! ```
//!
//! The daemon glue (QMP, the disk jobs, the registry of VMs) lives in the
//! `understudy` binary crate; docs/vm.md has the protocol and its failure
//! rules.
#![warn(missing_docs)]

mod error;
pub mod precopy;
pub mod pump;
pub mod wire;

pub use error::VmMigrationError;
pub use precopy::{Guest, PrecopyConfig, RamSender, RoundReport, Throttle};
pub use wire::{DiskInfo, Hello, Msg, PURPOSE, Phase, Progress, RAM_PURPOSE};
