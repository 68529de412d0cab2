//! Continuous disk replication to a backup host.
//!
//! ```text
//!  clients ─▶ SwitchDisk ─▶ FilterDisk ──observers──▶ BitmapObserver: per-peer bitmap "replica:PEER"
//!                              │           └────────▶ ReplicaObserver ── sync: send, wait for the ack
//!                              │                        │                async/epoch: queue ─▶ sender thread
//!                              ▼                        ▼
//!                       journal / image          peer Link (0x03xx frames) ──▶ Backup: its own ExportStack
//!                                                                              (journal in epoch mode),
//!                                                                              writes refused until promoted
//! ```
//!
//! * [`generation`]: the generation record of each copy and the pure connect
//!   decision ([`generation::decide`]) and split-brain policies.
//! * [`wire`]: the sans-I/O messages.
//! * [`Primary`]: installs a [`ReplicaObserver`] on an export's filter and
//!   runs a session thread per connection (handshake, resync from the
//!   per-peer bitmap through the copy engine, then streaming), reconnecting
//!   with backoff.
//! * [`Backup`]: applies a primary's stream to its own export stack.
//!
//! The modes, generation rules, state machines and failure table are in
//! `docs/replication.md`.
#![warn(missing_docs)]

mod backup;
mod error;
pub mod generation;
mod observer;
mod primary;
mod session;
pub mod wire;

pub use backup::{Backup, BackupConfig, BackupStats, ReadOnlyView, recv_hello};
pub use error::{DecodeError, RecordError, ReplicationError};
pub use observer::ReplicaObserver;
pub use primary::{
    BITMAP, DEFAULT_GRANULARITY, PURPOSE, Primary, PrimaryConfig, State, Status, VerifyReport,
};
pub use wire::{Hello, Mode};
