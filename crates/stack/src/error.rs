//! [`StackError`]: one variant per check or step of opening a stack.

use std::io;
use std::path::PathBuf;

use understudy_bitmap::format::FormatError;
use understudy_bitmap::{BitmapError, StoreError};
use understudy_block::BlockError;
use understudy_journal::JournalError;

/// Why an export's stack was not opened. The validation variants (up to
/// `PersistInterval`) are returned before any file is touched.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    /// The spec has no export name.
    #[error("the export of {image} has no name: give it one")]
    NoName {
        /// Image path.
        image: PathBuf,
    },
    /// The image to open does not exist.
    #[error(
        "image {path} does not exist: create it first (e.g. `qemu-img create -f raw {path} 1G`)",
        path = path.display()
    )]
    Missing {
        /// Image path.
        path: PathBuf,
    },
    /// An image to create needs a format.
    #[error("cannot create {path} without a format: say raw or qcow2")]
    NoFormat {
        /// Image path.
        path: PathBuf,
    },
    /// A read-only export cannot have a journal.
    #[error(
        "export {export:?}: the image is read-only, so journal=on/flush=ordered cannot work; make the image writable or drop those options"
    )]
    ReadOnlyJournal {
        /// Export name.
        export: String,
    },
    /// A read-only export records no writes.
    #[error(
        "export {export:?} is read-only and cannot record writes: drop its bitmaps or readonly"
    )]
    ReadOnlyBitmaps {
        /// Export name.
        export: String,
    },
    /// A requested bitmap name is unusable.
    #[error(
        "bitmap name {bitmap:?} is invalid ({reason}): use 1 to 255 bytes of UTF-8 without control characters"
    )]
    BitmapName {
        /// The name.
        bitmap: String,
        /// Why.
        reason: &'static str,
    },
    /// A bitmap is requested twice.
    #[error("bitmap {bitmap:?} is requested twice: name each bitmap once")]
    BitmapTwice {
        /// The name.
        bitmap: String,
    },
    /// A requested granularity is unusable.
    #[error(
        "bitmap {bitmap:?} has an invalid granularity: use a power of two from 4k to 64M (default 64k)"
    )]
    Granularity {
        /// The name.
        bitmap: String,
        /// Cause.
        #[source]
        source: BitmapError,
    },
    /// The journal configuration is unusable.
    #[error("export {export:?}: invalid journal options; fix them and start again")]
    JournalConfig {
        /// Export name.
        export: String,
        /// Cause.
        #[source]
        source: JournalError,
    },
    /// The intent extent size does not suit the image.
    #[error(
        "export {export:?}: intent extent size {extent} is unusable: use a power of two from 4k up, large enough that the image has at most the format's extent count"
    )]
    IntentExtent {
        /// Export name.
        export: String,
        /// The size asked for.
        extent: u64,
        /// Cause.
        #[source]
        source: FormatError,
    },
    /// The persist interval is zero.
    #[error("export {export:?}: the bitmap persist interval must be positive (default 5s)")]
    PersistInterval {
        /// Export name.
        export: String,
    },
    /// A stale file of an earlier attempt could not be removed.
    #[error("cannot remove the stale file {path}: remove it by hand, then retry")]
    RemoveStale {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Creating the image failed.
    #[error("cannot create the image {path}: check free space and permissions")]
    Create {
        /// Image path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: BlockError,
    },
    /// Opening the image failed.
    #[error("cannot open the image {path}")]
    Open {
        /// Image path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: BlockError,
    },
    /// The image is not the size it must be.
    #[error(
        "{path} has {actual} bytes but {expected} are expected: move it away or use the right image"
    )]
    SizeMismatch {
        /// Image path.
        path: PathBuf,
        /// Its size.
        actual: u64,
        /// The size asked for.
        expected: u64,
    },
    /// A writable stack was asked for but the image opened read-only.
    #[error("{path} opened read-only: make it writable")]
    ReadOnlyImage {
        /// Image path.
        path: PathBuf,
    },
    /// Opening (and recovering) the bitmap store failed.
    #[error("cannot open the bitmaps of {path} (sidecar files next to the image)")]
    OpenStore {
        /// Image path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: StoreError,
    },
    /// A requested bitmap exists with another granularity.
    #[error(
        "bitmap {bitmap:?} of {export} exists with granularity {existing} but {requested} is asked for: use the existing granularity or remove the bitmap first"
    )]
    GranularityMismatch {
        /// Export name.
        export: String,
        /// Bitmap name.
        bitmap: String,
        /// Its granularity on disk.
        existing: u64,
        /// The granularity asked for.
        requested: u64,
    },
    /// Opening (and replaying) the epoch journal failed.
    #[error("cannot open the journal {path} of export {export:?}")]
    OpenJournal {
        /// Export name.
        export: String,
        /// Journal path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: Box<JournalError>,
    },
    /// Creating a requested bitmap failed.
    #[error("cannot create bitmap {bitmap:?}")]
    AddBitmap {
        /// Bitmap name.
        bitmap: String,
        /// Cause.
        #[source]
        source: StoreError,
    },
    /// The persister thread did not start.
    #[error(
        "cannot start the bitmap persister thread; the process may be out of threads or memory"
    )]
    SpawnPersister {
        /// Cause.
        #[source]
        source: io::Error,
    },
}
