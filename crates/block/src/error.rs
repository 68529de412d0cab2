use std::io;
use std::path::PathBuf;

/// What kind of failure a [`BlockError`] is, for mapping onto protocol
/// error codes (NBD errno values) without matching every variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Generic I/O failure.
    Io,
    /// The device ran out of space.
    NoSpace,
    /// The disk is read-only.
    ReadOnly,
    /// Request outside the disk.
    OutOfBounds,
    /// The request itself is invalid.
    Invalid,
    /// The operation (or its fast path) is not supported.
    NotSupported,
}

/// Errors of the block layer: one variant per failed operation.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// Opening an image failed.
    #[error("cannot open image {path}: check that it exists and is readable")]
    Open {
        /// Image path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The image format could not be recognised or opened.
    #[error("cannot open {path} as {format}: {reason}")]
    Format {
        /// Image path.
        path: PathBuf,
        /// Format that was tried.
        format: &'static str,
        /// What went wrong, in words.
        reason: String,
    },
    /// Creating an image failed.
    #[error(
        "cannot create {format} image {path}: check that its directory is writable and has free space"
    )]
    Create {
        /// Image path.
        path: PathBuf,
        /// Format being created.
        format: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The backing image named for a new image cannot be found.
    #[error(
        "backing image {backing} of {path} is not accessible; a relative name is taken \
         relative to the new image's directory"
    )]
    BackingMissing {
        /// Image being created.
        path: PathBuf,
        /// Backing image, resolved against the new image's directory.
        backing: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The image (or its backing chain) could not be opened by the format
    /// driver.
    #[error(
        "cannot open {path} as {format}: run `qemu-img check` on the image and its backing chain"
    )]
    Image {
        /// Image path.
        path: PathBuf,
        /// Format that was tried.
        format: &'static str,
        /// Cause, from the format driver.
        #[source]
        source: io::Error,
    },
    /// The format driver panicked; the disk refuses further requests.
    #[error("{op} on {path} panicked inside the format driver")]
    Panicked {
        /// Operation.
        op: &'static str,
        /// Image path.
        path: PathBuf,
        /// The panic.
        #[source]
        source: crate::qcow2::ImagoPanic,
    },
    /// A write was refused before it reached the disk (a write observer
    /// above it said no).
    #[error("{op} of {len} bytes at offset {offset} was refused before reaching the disk")]
    Refused {
        /// Operation: "write", "write-zeroes" or "discard".
        op: &'static str,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Who refused and why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Reading failed.
    #[error("read of {len} bytes at offset {offset} failed")]
    Read {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Writing failed.
    #[error("write of {len} bytes at offset {offset} failed")]
    Write {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Write-zeroes failed.
    #[error("write-zeroes of {len} bytes at offset {offset} failed")]
    WriteZeroes {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Discard failed.
    #[error("discard of {len} bytes at offset {offset} failed")]
    Discard {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Flush failed.
    #[error("flush failed")]
    Flush {
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Querying allocation failed.
    #[error("allocation map of {len} bytes at offset {offset} failed")]
    Map {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A request reached outside the disk.
    #[error("range {offset}+{len} is outside the disk of {size} bytes")]
    OutOfBounds {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Disk size.
        size: u64,
    },
    /// A write reached a read-only disk.
    #[error("the disk is read-only")]
    ReadOnly,
    /// The requested operation or fast path is not available.
    #[error("{0} is not supported by this disk")]
    NotSupported(&'static str),
    /// A backend-specific failure that has no `io::Error`.
    #[error("{op} failed: {reason}")]
    Backend {
        /// Operation.
        op: &'static str,
        /// Reason in words.
        reason: String,
    },
}

impl BlockError {
    /// Classify the error.
    pub fn kind(&self) -> ErrorKind {
        let io_kind = |e: &io::Error| match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::NoSpace,
            Some(libc::EROFS) | Some(libc::EPERM) | Some(libc::EACCES) => ErrorKind::ReadOnly,
            Some(libc::EINVAL) => ErrorKind::Invalid,
            Some(libc::EOPNOTSUPP) => ErrorKind::NotSupported,
            _ => ErrorKind::Io,
        };
        match self {
            BlockError::Read { source, .. }
            | BlockError::Write { source, .. }
            | BlockError::WriteZeroes { source, .. }
            | BlockError::Discard { source, .. }
            | BlockError::Flush { source }
            | BlockError::Map { source, .. }
            | BlockError::Open { source, .. } => io_kind(source),
            // Whatever the cause, these are I/O failures to a client.
            BlockError::Format { .. }
            | BlockError::Backend { .. }
            | BlockError::Create { .. }
            | BlockError::BackingMissing { .. }
            | BlockError::Image { .. }
            | BlockError::Panicked { .. }
            | BlockError::Refused { .. } => ErrorKind::Io,
            BlockError::OutOfBounds { .. } => ErrorKind::OutOfBounds,
            BlockError::ReadOnly => ErrorKind::ReadOnly,
            BlockError::NotSupported(_) => ErrorKind::NotSupported,
        }
    }
}
