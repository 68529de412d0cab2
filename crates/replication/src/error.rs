//! Errors of the replication crate: one enum per concern, a variant per
//! failed operation, the cause chained.

use std::io;
use std::path::PathBuf;

use understudy_block::BlockError;
use understudy_durable::ReplaceError;
use understudy_peer::PeerError;

use crate::generation::Decision;
use crate::wire::WireError;

/// Why generation-record bytes could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// No newline ends the header.
    #[error("no header line")]
    NoHeader,
    /// The header is not UTF-8.
    #[error("header is not text")]
    HeaderNotText,
    /// The header is not `MAGIC CRC`.
    #[error("malformed header")]
    MalformedHeader,
    /// Another format (or version).
    #[error("unknown magic {found:?} (this build reads USREP1)")]
    Magic {
        /// The magic found (at most 16 characters of it).
        found: String,
    },
    /// The checksum is not hex.
    #[error("malformed checksum")]
    MalformedChecksum,
    /// The body does not match its checksum.
    #[error("checksum mismatch (torn or edited file)")]
    Checksum,
    /// The body is not a record.
    #[error("malformed JSON")]
    Json {
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// The history holds more ids than any record writes.
    #[error("{len} history ids (at most {max})", max = crate::generation::HISTORY_LEN)]
    History {
        /// How many.
        len: usize,
    },
    /// The file is larger than any record.
    #[error("larger than {max} bytes")]
    TooLarge {
        /// The cap.
        max: u64,
    },
}

/// A generation record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Reading the record failed.
    #[error("cannot read the replica record {path}: check its permissions")]
    Read {
        /// Record path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Writing the record failed.
    #[error("cannot write the replica record {path}: check free space and permissions")]
    Write {
        /// Record path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: ReplaceError,
    },
    /// The record is damaged.
    #[error(
        "the replica record {path} is damaged: compare both copies with `understudy replicate \
         verify`, then delete the record of the copy to discard (it is fully resynced)"
    )]
    Corrupt {
        /// Record path.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: DecodeError,
    },
}

/// A replication operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The generation record failed.
    #[error("the replica's generation record failed")]
    Record {
        /// Cause.
        #[source]
        source: RecordError,
    },
    /// Sending to the peer failed.
    #[error("cannot send to the replication peer; the primary keeps serving and marks changes")]
    Send {
        /// Cause.
        #[source]
        source: PeerError,
    },
    /// Receiving from the peer failed.
    #[error("lost the replication peer; the primary keeps serving and resyncs on reconnect")]
    Recv {
        /// Cause.
        #[source]
        source: PeerError,
    },
    /// Connecting to the peer failed.
    #[error("cannot connect to the replication peer {addr}; retrying with backoff")]
    Connect {
        /// Peer address.
        addr: String,
        /// Cause.
        #[source]
        source: PeerError,
    },
    /// A message did not decode.
    #[error("the replication peer sent a bad message: check both sides run the same release")]
    Wire {
        /// Cause.
        #[source]
        source: WireError,
    },
    /// The peer broke the protocol.
    #[error("replication protocol violation: {reason}")]
    Protocol {
        /// What happened.
        reason: String,
    },
    /// The peer reported a failure.
    #[error(
        "the backup failed to apply a request (code {code}): {message}; check its disk and log"
    )]
    Peer {
        /// Reply code.
        code: u32,
        /// The peer's text.
        message: String,
    },
    /// The peer did not answer in time.
    #[error("the replication peer did not answer within {ms} ms; reconnecting")]
    Timeout {
        /// Limit.
        ms: u64,
    },
    /// The generations refused the connection.
    #[error(
        "the generation records refuse this pair ({decision:?}): nothing was overwritten; see \
         docs/replication.md for how to resolve it (an after-split-brain policy, or a full \
         resync of the copy to discard)"
    )]
    Refused {
        /// What the records said.
        decision: Decision,
    },
    /// The two copies are not of the same size.
    #[error(
        "the backup image has {backup} bytes, the primary {primary}: create it with the same size"
    )]
    SizeMismatch {
        /// Primary size.
        primary: u64,
        /// Backup size.
        backup: u64,
    },
    /// A local disk operation failed.
    #[error("{op} on the local copy failed")]
    Disk {
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: BlockError,
    },
    /// The per-peer bitmap is missing or could not be taken.
    #[error("the per-peer bitmap {name} is unusable; remove the replica and start it again")]
    Bitmap {
        /// Bitmap name.
        name: String,
        /// Cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A copy-engine pass failed.
    #[error("the resync copy failed")]
    Copy {
        /// Cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A thread could not be started.
    #[error("cannot start the replication thread {name}")]
    Thread {
        /// Thread name.
        name: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The replica was stopped.
    #[error("the replica was stopped")]
    Stopped,
    /// This copy is not in the role the operation needs.
    #[error("this copy is {role:?}; {what}")]
    Role {
        /// The current role.
        role: crate::generation::Role,
        /// What to do.
        what: &'static str,
    },
}
