use std::io;
use std::path::PathBuf;

use understudy_block::BlockError;

/// Errors of opening, recovering and closing an epoch journal: one variant
/// per failed operation.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The configuration is unusable.
    #[error("invalid journal configuration: {reason}")]
    Config {
        /// What is wrong and what to use instead.
        reason: String,
    },
    /// Opening or creating the journal file failed.
    #[error("cannot open journal file {path}: check the directory exists and is writable")]
    OpenFile {
        /// Journal path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Reading the journal during recovery failed.
    #[error(
        "cannot read the journal at byte {offset}: the device may be failing; copy the journal before retrying"
    )]
    Read {
        /// File offset.
        offset: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The file is not empty but neither header slot is valid.
    #[error(
        "the journal has no valid header: it is not an understudy journal or both headers are damaged; move it aside to open the image without it (its unapplied writes are lost)"
    )]
    NoValidHeader,
    /// The journal belongs to an image of another size.
    #[error(
        "the journal was written for an image of {journal} bytes but the image has {image}: use the journal that belongs to this image"
    )]
    ImageSizeMismatch {
        /// Size recorded in the journal.
        journal: u64,
        /// Size of the image.
        image: u64,
    },
    /// The file is shorter than its header says.
    #[error(
        "the journal is truncated ({file_len} bytes, header needs {needed}): restore it from a copy or move it aside (its unapplied writes are lost)"
    )]
    Truncated {
        /// File length.
        file_len: u64,
        /// Length the header implies.
        needed: u64,
    },
    /// Replaying a recovered record onto the image failed.
    #[error(
        "replaying epoch {epoch} onto the image failed; the journal is kept, fix the image storage and open again"
    )]
    Replay {
        /// Epoch being replayed.
        epoch: u64,
        /// Cause.
        #[source]
        source: BlockError,
    },
    /// Making the replayed image durable failed.
    #[error(
        "flushing the image after replay failed; the journal is kept, fix the image storage and open again"
    )]
    ReplayFlush {
        /// Cause.
        #[source]
        source: BlockError,
    },
    /// Writing the fresh journal header failed.
    #[error(
        "cannot reset the journal after recovery; check free space on the journal's file system"
    )]
    Reset {
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Starting the background writer thread failed.
    #[error("cannot start the journal writer thread; the process may be out of threads or memory")]
    SpawnWriter {
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The disk failed earlier (an I/O error on the journal or image) and
    /// could not be closed cleanly.
    #[error(
        "the journal stopped after an I/O error ({reason}); reopen the image to recover the durable epochs"
    )]
    Failed {
        /// The original failure in words.
        reason: String,
    },
}
