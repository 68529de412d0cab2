//! One variant per failed operation; the sink's own error chained.

use understudy_bitmap::BitmapError;
use understudy_block::BlockError;

/// A failed copy. `E` is the sink's error type.
#[derive(Debug, thiserror::Error)]
pub enum CopyError<E: std::error::Error + 'static> {
    /// Asking the source disk which ranges hold data failed.
    #[error("cannot map the allocation of the source disk at {offset} (+{len})")]
    Map {
        /// Start of the range.
        offset: u64,
        /// Its length.
        len: u64,
        /// Cause.
        #[source]
        source: BlockError,
    },
    /// Reading the source disk failed.
    #[error("cannot read the source disk at {offset} (+{len})")]
    Read {
        /// Start of the range.
        offset: u64,
        /// Its length.
        len: u64,
        /// Cause.
        #[source]
        source: BlockError,
    },
    /// The sink refused data.
    #[error("cannot write {len} bytes at {offset} to the copy")]
    Write {
        /// Start of the range.
        offset: u64,
        /// Its length.
        len: u64,
        /// Cause.
        #[source]
        source: E,
    },
    /// The sink refused a zero range.
    #[error("cannot zero {len} bytes at {offset} on the copy")]
    Zero {
        /// Start of the range.
        offset: u64,
        /// Its length.
        len: u64,
        /// Cause.
        #[source]
        source: E,
    },
    /// The sink could not make the copy durable.
    #[error("cannot make the copy durable")]
    Flush {
        /// Cause.
        #[source]
        source: E,
    },
    /// The sink could not hash its blocks.
    #[error("cannot hash the copy's blocks at {offset} (+{len})")]
    Hashes {
        /// Start of the range.
        offset: u64,
        /// Its length.
        len: u64,
        /// Cause.
        #[source]
        source: E,
    },
    /// The sink answered a hash request with the wrong number of hashes.
    #[error("asked for {expected} hashes, got {got}")]
    HashCount {
        /// Hashes asked for.
        expected: u64,
        /// Hashes received.
        got: u64,
    },
    /// The sink can no longer take data (checked before each piece).
    #[error("the copy can no longer be written")]
    Sink {
        /// Cause.
        #[source]
        source: E,
    },
    /// Taking the dirty bitmap failed.
    #[error("cannot take the dirty bitmap for a copy round")]
    Take {
        /// Cause.
        #[source]
        source: BitmapError,
    },
    /// The caller cancelled the copy.
    #[error("the copy was cancelled")]
    Cancelled,
}
