//! [`StoreError`]: one variant per failed operation of the store.

use std::io;
use std::path::PathBuf;

use understudy_durable::ReplaceError;

use crate::bitmap::BitmapError;
use crate::format::{FormatError, MAX_BITMAPS};

/// Errors of the bitmap store: one variant per failed operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A bitmap name was refused.
    #[error(
        "bitmap name {name:?} is invalid ({reason}): use 1 to 255 bytes of UTF-8 without control characters"
    )]
    InvalidName {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// `add` of a name that exists.
    #[error("bitmap {name:?} already exists: remove it first or pick another name")]
    Exists {
        /// The name.
        name: String,
    },
    /// An operation named a bitmap that does not exist.
    #[error("no bitmap named {name:?}: list the bitmaps to see which exist")]
    NotFound {
        /// The name.
        name: String,
    },
    /// `add` beyond [`MAX_BITMAPS`].
    #[error("an image can have at most {MAX_BITMAPS} bitmaps: remove one first")]
    TooMany,
    /// Creating a bitmap failed.
    #[error("cannot create bitmap {name:?}")]
    Create {
        /// The name.
        name: String,
        /// Cause.
        #[source]
        source: BitmapError,
    },
    /// Taking a bitmap failed.
    #[error("cannot take bitmap {name:?}")]
    Take {
        /// The name.
        name: String,
        /// Cause.
        #[source]
        source: BitmapError,
    },
    /// The store options do not suit the image.
    #[error(
        "invalid bitmap store options: pick an intent extent size that is a power of two and large enough for the image"
    )]
    Options {
        /// Cause.
        #[source]
        source: FormatError,
    },
    /// Opening or creating a sidecar file failed.
    #[error("cannot open bitmap sidecar {path}: check the directory exists and is writable")]
    Open {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Another process holds the sidecar.
    #[error("bitmap sidecar {path} is in use by another process: stop it first")]
    Locked {
        /// The file.
        path: PathBuf,
    },
    /// Reading a sidecar file failed.
    #[error("cannot read bitmap sidecar {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The snapshot is unreadable and nothing else names the bitmaps.
    #[error(
        "bitmap snapshot {path} is corrupt and the intent log does not list the bitmaps: \
         move it aside to start with no bitmaps (consumers then need a full copy)"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: FormatError,
    },
    /// The sidecar belongs to an image of another size.
    #[error(
        "bitmap sidecar {path} was made for an image of {recorded} bytes but the image has \
         {actual}: if the image was resized, delete the .bitmaps and .bitmaps-intent files \
         (the bitmaps are lost; consumers need a full copy)"
    )]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// Size recorded in the file.
        recorded: u64,
        /// Size of the image.
        actual: u64,
    },
    /// Arming intent extents before a write failed; the write must not be
    /// done.
    #[error(
        "cannot record write intent in {path}: the write was refused; check the disk holding the image"
    )]
    Arm {
        /// The intent file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Writing the snapshot failed. The change that asked for it, if any,
    /// is in effect in memory but not yet durable.
    #[error(
        "cannot write bitmap snapshot {path}: the bitmaps stay crash safe through the intent log; retry persist"
    )]
    Persist {
        /// The snapshot file.
        path: PathBuf,
        /// The step of the atomic replacement that failed.
        #[source]
        source: ReplaceError,
    },
    /// Rewriting the intent record after a snapshot failed.
    #[error("cannot rewrite intent log {path}: extents stay armed (safe); retry persist")]
    Retire {
        /// The intent file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The store was closed.
    #[error("the bitmap store is closed: reopen it")]
    Closed,
}
