//! Errors: one variant per failed operation, causes chained.

use std::io;
use std::path::PathBuf;

use understudy_bitmap::{BitmapError, StoreError};
use understudy_block::BlockError;
use understudy_peer::PeerError;

use understudy_durable::ReplaceError;

use crate::record::DecodeError;
use crate::wire::WireError;

/// Errors of the ownership record.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Reading the record failed.
    #[error("cannot read the ownership record {path}: check its permissions")]
    Read {
        /// Record path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Writing the record failed.
    #[error("cannot write the ownership record {path}: check free space and permissions")]
    Write {
        /// Record path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: ReplaceError,
    },
    /// The record is damaged.
    #[error(
        "the ownership record {path} is damaged: restore it from the other host's copy of the \
         disk or, if this copy is known to be the only one, delete it"
    )]
    Corrupt {
        /// Record path.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: DecodeError,
    },
    /// The image was handed over to another host.
    #[error(
        "image {image} was handed over to node {to} at generation {generation} and is no longer \
         the owner: serve the disk from that node, or migrate it back here with `understudy \
         migrate NAME --to THIS-HOST` run against that node"
    )]
    HandedOver {
        /// Image.
        image: PathBuf,
        /// New owner.
        to: String,
        /// Generation of the handover.
        generation: u64,
    },
    /// A handover was in progress when this process stopped.
    #[error(
        "image {image} was being handed over to node {to} when this server stopped, and the \
         outcome is unknown: serve it writable (`understudy serve` opens it with failing I/O) \
         and run `understudy migrate NAME --to` node {to}'s peer address, which asks that node \
         and settles it"
    )]
    InDoubt {
        /// Image.
        image: PathBuf,
        /// Target node.
        to: String,
    },
    /// The image is a partial copy being received.
    #[error(
        "image {image} is a partial copy still being received from node {from}: retry the \
         migration on that node to finish it"
    )]
    Partial {
        /// Image.
        image: PathBuf,
        /// Source node.
        from: String,
    },
}

/// A `--mode` that is neither `precopy` nor `mirror`.
#[derive(Debug, thiserror::Error)]
#[error("unknown mode {given:?}: use precopy or mirror")]
pub struct ParseModeError {
    /// What was given.
    pub given: String,
}

/// Errors of a migration, on the source side.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The commit went out and its answer did not come back.
    #[error(
        "the answer to the commit from node {node} was lost, so ownership is in doubt and I/O \
         on this node fails: retry the migration to node {node} to settle it (it asks the \
         target whether it committed)"
    )]
    InDoubt {
        /// Target node id.
        node: String,
        /// Cause.
        #[source]
        source: Box<MigrationError>,
    },
    /// Connecting or authenticating to the target failed.
    #[error("cannot open a peer link to {addr}")]
    Connect {
        /// Target address.
        addr: String,
        /// Cause.
        #[source]
        source: PeerError,
    },
    /// Sending to the target failed.
    #[error("sending to the target failed: the link broke; retry resumes where it stopped")]
    Send {
        /// Cause.
        #[source]
        source: PeerError,
    },
    /// Receiving from the target failed.
    #[error("the link to the target broke; retry resumes where it stopped")]
    Recv {
        /// Cause.
        #[source]
        source: PeerError,
    },
    /// The target refused the migration.
    #[error("the target refused the migration: {message}")]
    Refused {
        /// The target's explanation.
        message: String,
    },
    /// The target failed a request.
    #[error("the target failed to {op}: {message}")]
    Target {
        /// What was asked.
        op: &'static str,
        /// Reply code.
        code: u32,
        /// The target's explanation.
        message: String,
    },
    /// The target sent something that breaks the protocol.
    #[error("the target broke the migration protocol: {reason}")]
    Protocol {
        /// What was wrong.
        reason: String,
    },
    /// A message could not be decoded or encoded.
    #[error("bad migration message")]
    Wire {
        /// Cause.
        #[source]
        source: WireError,
    },
    /// Reading the source disk failed.
    #[error("reading the source disk failed; the migration stopped and the source keeps serving")]
    Read {
        /// Cause.
        #[source]
        source: BlockError,
    },
    /// A persistent bitmap of the export could not be changed.
    #[error("cannot {op} the bitmap {name} of the export; the source keeps serving")]
    Bitmap {
        /// What was done to it (add, remove, enable, take).
        op: &'static str,
        /// The bitmap.
        name: String,
        /// Cause.
        #[source]
        source: StoreError,
    },
    /// The migration bitmap was missing right after it was set up.
    #[error("the bitmap {name} vanished while the migration set it up: retry the migration")]
    MissingBitmap {
        /// The bitmap.
        name: &'static str,
    },
    /// The session's in-memory bitmap of blocks the target lacks failed.
    #[error("cannot {op} the in-memory bitmap of blocks the target lacks; retry the migration")]
    PendingBitmap {
        /// What was done to it (create, merge, take).
        op: &'static str,
        /// Cause.
        #[source]
        source: BitmapError,
    },
    /// A thread of the migration could not be started.
    #[error("cannot start the {thread} thread: the system is short of resources; retry later")]
    Spawn {
        /// Which thread.
        thread: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A thread of the migration panicked.
    #[error(
        "the {thread} thread panicked, which is a bug: report it with the log; the source keeps \
         serving unless the switch-over had begun"
    )]
    Panicked {
        /// Which thread.
        thread: &'static str,
    },
    /// The ownership record could not be updated.
    #[error("cannot update the ownership record")]
    Record {
        /// Cause.
        #[source]
        source: RecordError,
    },
    /// In-flight I/O did not drain in time.
    #[error(
        "in-flight I/O did not drain within {ms} ms at switch-over; the source keeps serving, \
         retry later or raise the drain limit"
    )]
    DrainTimeout {
        /// Limit.
        ms: u64,
    },
    /// The migration was cancelled.
    #[error("the migration was cancelled; the source keeps serving and a retry resumes")]
    Cancelled,
    /// The export cannot be migrated.
    #[error("export {name} cannot be migrated: {reason}")]
    NotMigratable {
        /// Export.
        name: String,
        /// Why.
        reason: String,
    },
    /// Verification found differences.
    #[error(
        "verification found {mismatched} blocks that differ between source and target: the \
         target is the owner now; inspect it (both copies are kept)"
    )]
    VerifyMismatch {
        /// Blocks that differ.
        mismatched: u64,
    },
}

impl MigrationError {
    /// Whether retrying with the same settings may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            MigrationError::Connect { source, .. } => !source.is_handshake_rejection(),
            MigrationError::Send { .. }
            | MigrationError::Recv { .. }
            | MigrationError::DrainTimeout { .. }
            | MigrationError::Spawn { .. }
            | MigrationError::InDoubt { .. }
            | MigrationError::Cancelled => true,
            MigrationError::Target { code, .. } => *code == crate::wire::code::NO_SPACE,
            _ => false,
        }
    }
}
