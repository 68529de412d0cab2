//! On-disk formats: the bitmap snapshot (`IMAGE.bitmaps`) and the
//! write-intent record (`IMAGE.bitmaps-intent`). Pure encode/decode over
//! byte slices, so they can be fuzzed; the byte-by-byte layout is in
//! `docs/bitmaps.md`.
//!
//! Every decoder bounds every count and length before using it and never
//! allocates more than the input it was given (plus the bitmap words that
//! the input itself contains).
//!
//! - this file: limits, flags, [`FormatError`] and the directory entry
//!   both files carry;
//! - `codec.rs`: the byte reader and the directory encoding they share;
//! - `snapshot.rs`: the snapshot file;
//! - `intent.rs`: the intent record and the two-slot intent file.

mod codec;
mod intent;
mod snapshot;

pub use intent::{
    IntentFile, IntentRecord, check_extent_size, decode_intent, decode_intent_file, encode_intent,
};
pub use snapshot::{
    Snapshot, SnapshotBitmap, SnapshotHeader, decode_snapshot, decode_snapshot_header,
    encode_snapshot,
};

/// Magic of the snapshot file.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"USBITMAP";
/// Magic of an intent record.
pub const INTENT_MAGIC: [u8; 8] = *b"USINTENT";
/// The only format version written and read.
pub const FORMAT_VERSION: u32 = 1;
/// Length of the snapshot header and of the intent record header.
pub const HEADER_LEN: usize = 64;
/// Most bitmaps per image.
pub const MAX_BITMAPS: usize = 64;
/// Longest bitmap name in bytes.
pub const MAX_NAME_LEN: usize = 255;
/// Fixed bytes of a snapshot directory entry besides the name.
const SNAP_ENTRY_FIXED: usize = 2 + 1 + 1 + 2 + 4;
/// Fixed bytes of an intent directory entry besides the name.
const INTENT_ENTRY_FIXED: usize = 2 + 1 + 1 + 2;
/// Longest snapshot directory.
pub const MAX_SNAPSHOT_DIR_LEN: usize = MAX_BITMAPS * (SNAP_ENTRY_FIXED + MAX_NAME_LEN);
/// Longest intent directory.
pub const MAX_INTENT_DIR_LEN: usize = MAX_BITMAPS * (INTENT_ENTRY_FIXED + MAX_NAME_LEN);
/// Most intent extents per image (128 KiB of armed bits per record).
pub const MAX_INTENT_EXTENTS: u64 = 1 << 20;
/// Smallest intent extent: 4 KiB.
pub const MIN_EXTENT_SIZE: u64 = 4 << 10;
/// Largest intent extent: 1 TiB.
pub const MAX_EXTENT_SIZE: u64 = 1 << 40;
/// Size of each of the two record slots of the intent file. A record never
/// exceeds it, so slot B's position is known even when slot A is torn.
pub const SLOT_SIZE: usize = 160 << 10;

/// Snapshot header flag: written by a clean shutdown.
pub const SNAPSHOT_CLEAN: u32 = 1;
/// Intent record flag: written by a clean shutdown (no write in flight,
/// nothing armed).
pub const INTENT_CLEAN: u32 = 1;
/// Directory entry flag: the bitmap records writes.
pub const ENTRY_ENABLED: u16 = 1;
/// Directory entry flag: the bitmap was completed from the intent log (or
/// wholly dirtied) after an unclean stop, so it may over-mark.
pub const ENTRY_RECOVERED: u16 = 2;

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Fewer bytes than the structure needs.
    #[error("{what} is truncated: {need} bytes needed, {have} present")]
    Truncated {
        /// Structure.
        what: &'static str,
        /// Bytes needed.
        need: u64,
        /// Bytes present.
        have: u64,
    },
    /// More bytes than the structure declares.
    #[error("{what} has {extra} unexpected trailing bytes")]
    Trailing {
        /// Structure.
        what: &'static str,
        /// Extra bytes.
        extra: u64,
    },
    /// Wrong magic.
    #[error("{what} has the wrong magic number (not an understudy file of this kind)")]
    Magic {
        /// Structure.
        what: &'static str,
    },
    /// Unknown version.
    #[error("{what} has format version {version}, this build reads only version {FORMAT_VERSION}")]
    Version {
        /// Structure.
        what: &'static str,
        /// Version found.
        version: u32,
    },
    /// A checksum did not match.
    #[error("{what} checksum mismatch (torn write or corruption)")]
    Checksum {
        /// Structure.
        what: &'static str,
    },
    /// A field that must be zero was not, or an unknown flag was set.
    #[error("{what} has unknown flags or non-zero reserved bytes")]
    Reserved {
        /// Structure.
        what: &'static str,
    },
    /// A count or length is over its limit.
    #[error("{what} is {value}, over the limit of {max}")]
    Limit {
        /// Field.
        what: &'static str,
        /// Value found.
        value: u64,
        /// Limit.
        max: u64,
    },
    /// A field disagrees with what the other fields imply.
    #[error("{what} is {found}, expected {expected}")]
    Mismatch {
        /// Field.
        what: &'static str,
        /// Value found.
        found: u64,
        /// Value implied.
        expected: u64,
    },
    /// A bitmap name is invalid.
    #[error("bitmap name #{index} is invalid: {reason}")]
    Name {
        /// Directory index.
        index: usize,
        /// Why.
        reason: &'static str,
    },
    /// Two directory entries have the same name.
    #[error("bitmap name {name:?} appears twice")]
    DuplicateName {
        /// The name.
        name: String,
    },
    /// A granularity or extent size is out of range.
    #[error("{what} 2^{log2} is out of range")]
    Size {
        /// Field.
        what: &'static str,
        /// log2 found.
        log2: u8,
    },
    /// A bitmap at this granularity would be too large for the image size.
    #[error(
        "a bitmap at granularity {granularity} for a {image_size}-byte image exceeds the size limit"
    )]
    TooLarge {
        /// Image size.
        image_size: u64,
        /// Granularity.
        granularity: u64,
    },
    /// Bits are set past the last granule or extent.
    #[error("{what} has bits set past its end")]
    TrailingBits {
        /// Structure.
        what: &'static str,
    },
}

/// Refuse a count or length read from a file that is over its limit.
fn check_limit(what: &'static str, value: u64, max: u64) -> Result<(), FormatError> {
    if value > max {
        return Err(FormatError::Limit { what, value, max });
    }
    Ok(())
}

/// Check a bitmap name: 1 to 255 bytes of UTF-8 without control
/// characters (it becomes part of an NBD meta-context name).
pub fn validate_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("it is longer than 255 bytes");
    }
    if name.chars().any(char::is_control) {
        return Err("it contains control characters");
    }
    Ok(())
}

/// One bitmap's metadata, as stored in both files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// Name.
    pub name: String,
    /// Granularity in bytes.
    pub granularity: u64,
    /// Whether writes are recorded.
    pub enabled: bool,
    /// Whether the contents were completed by recovery.
    pub recovered: bool,
}

impl DirEntry {
    fn flags(&self) -> u16 {
        (if self.enabled { ENTRY_ENABLED } else { 0 })
            | (if self.recovered { ENTRY_RECOVERED } else { 0 })
    }
}

#[cfg(test)]
mod tests;
