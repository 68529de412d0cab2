//! On-disk formats: the bitmap snapshot (`IMAGE.bitmaps`) and the
//! write-intent record (`IMAGE.bitmaps-intent`). Pure encode/decode over
//! byte slices, so they can be fuzzed; the byte-by-byte layout is in
//! `docs/bitmaps.md`.
//!
//! Every decoder bounds every count and length before using it and never
//! allocates more than the input it was given (plus the bitmap words that
//! the input itself contains).

use crate::bitmap::{MAX_GRANULARITY, MIN_GRANULARITY, words_for};

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

/// One bitmap of a decoded snapshot. A data checksum failure affects only
/// that bitmap, so it is reported per bitmap.
#[derive(Debug)]
pub struct SnapshotBitmap {
    /// Metadata.
    pub entry: DirEntry,
    /// The words, or why they are unusable.
    pub words: Result<Vec<u64>, FormatError>,
}

/// A decoded snapshot file.
#[derive(Debug)]
pub struct Snapshot {
    /// Image size the bitmaps cover.
    pub image_size: u64,
    /// Persist generation.
    pub seq: u64,
    /// Written by a clean shutdown.
    pub clean: bool,
    /// The bitmaps, in directory order.
    pub bitmaps: Vec<SnapshotBitmap>,
}

/// A little-endian reader over a slice that never panics.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, pos: 0, what }
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(FormatError::Truncated {
                what: self.what,
                need: self.pos as u64 + n as u64,
                have: self.buf.len() as u64,
            }),
        }
    }

    fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.bytes(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, FormatError> {
        let b = self.bytes(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, FormatError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.bytes(4)?);
        Ok(u32::from_le_bytes(a))
    }

    fn u64(&mut self) -> Result<u64, FormatError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.bytes(8)?);
        Ok(u64::from_le_bytes(a))
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
}

fn words_from_le(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_le_bytes(a)
        })
        .collect()
}

fn align8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

/// Whether any bit at index `>= used` is set in `words`.
fn has_trailing_bits(words: &[u64], used: u64) -> bool {
    let full = (used / 64) as usize;
    let rem = used % 64;
    words.iter().enumerate().any(|(i, &w)| {
        if i < full {
            false
        } else if i == full && rem != 0 {
            w >> rem != 0
        } else {
            w != 0
        }
    })
}

fn encode_dir(entries: &[(&DirEntry, Option<u32>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (e, crc) in entries {
        out.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
        out.extend_from_slice(e.name.as_bytes());
        out.push(e.granularity.trailing_zeros() as u8);
        out.push(0);
        out.extend_from_slice(&e.flags().to_le_bytes());
        if let Some(crc) = crc {
            out.extend_from_slice(&crc.to_le_bytes());
        }
    }
    out
}

/// Decode `count` directory entries filling `dir` exactly. Returns the
/// entries and, for snapshots, each entry's data CRC.
fn decode_dir(
    dir: &[u8],
    count: usize,
    with_crc: bool,
    what: &'static str,
) -> Result<Vec<(DirEntry, u32)>, FormatError> {
    let mut r = Reader::new(dir, what);
    let mut out: Vec<(DirEntry, u32)> = Vec::with_capacity(count.min(MAX_BITMAPS));
    for index in 0..count {
        let len = usize::from(r.u16()?);
        if len == 0 || len > MAX_NAME_LEN {
            return Err(FormatError::Name {
                index,
                reason: "its length is not 1 to 255 bytes",
            });
        }
        let name = std::str::from_utf8(r.bytes(len)?).map_err(|_| FormatError::Name {
            index,
            reason: "it is not UTF-8",
        })?;
        validate_name(name).map_err(|reason| FormatError::Name { index, reason })?;
        let log2 = r.u8()?;
        if !(MIN_GRANULARITY.trailing_zeros()..=MAX_GRANULARITY.trailing_zeros())
            .contains(&u32::from(log2))
        {
            return Err(FormatError::Size {
                what: "granularity",
                log2,
            });
        }
        let reserved = r.u8()?;
        let flags = r.u16()?;
        if reserved != 0 || flags & !(ENTRY_ENABLED | ENTRY_RECOVERED) != 0 {
            return Err(FormatError::Reserved { what });
        }
        let crc = if with_crc { r.u32()? } else { 0 };
        if out.iter().any(|(e, _)| e.name == name) {
            return Err(FormatError::DuplicateName {
                name: name.to_owned(),
            });
        }
        out.push((
            DirEntry {
                name: name.to_owned(),
                granularity: 1 << log2,
                enabled: flags & ENTRY_ENABLED != 0,
                recovered: flags & ENTRY_RECOVERED != 0,
            },
            crc,
        ));
    }
    if r.remaining() != 0 {
        return Err(FormatError::Trailing {
            what,
            extra: r.remaining() as u64,
        });
    }
    Ok(out)
}

/// Bytes of bitmap data for one bitmap.
fn data_len_for(image_size: u64, granularity: u64) -> Result<u64, FormatError> {
    words_for(image_size, granularity)
        .map(|w| w as u64 * 8)
        .map_err(|_| FormatError::TooLarge {
            image_size,
            granularity,
        })
}

/// Encode a snapshot. `bitmaps` pairs each entry with its words, which
/// must have the length [`crate::words_for`] gives for `image_size`.
pub fn encode_snapshot(
    image_size: u64,
    seq: u64,
    clean: bool,
    bitmaps: &[(DirEntry, Vec<u64>)],
) -> Vec<u8> {
    let data: Vec<Vec<u8>> = bitmaps
        .iter()
        .map(|(_, w)| w.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let crcs: Vec<u32> = data.iter().map(|d| crc32c::crc32c(d)).collect();
    let dir = encode_dir(
        &bitmaps
            .iter()
            .zip(&crcs)
            .map(|((e, _), &c)| (e, Some(c)))
            .collect::<Vec<_>>(),
    );
    let data_len: usize = data.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(HEADER_LEN + align8(dir.len()) + data_len);
    out.extend_from_slice(&SNAPSHOT_MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(if clean { SNAPSHOT_CLEAN } else { 0 }).to_le_bytes());
    out.extend_from_slice(&image_size.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&(bitmaps.len() as u32).to_le_bytes());
    out.extend_from_slice(&(dir.len() as u32).to_le_bytes());
    out.extend_from_slice(&(data_len as u64).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&dir).to_le_bytes());
    out.extend_from_slice(&[0u8; 8]);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&dir);
    out.resize(HEADER_LEN + align8(dir.len()), 0);
    for d in data {
        out.extend_from_slice(&d);
    }
    out
}

/// Validated fields of a snapshot header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// Image size.
    pub image_size: u64,
    /// Persist generation.
    pub seq: u64,
    /// Clean-shutdown flag.
    pub clean: bool,
    count: usize,
    dir_len: usize,
    data_len: u64,
    dir_crc: u32,
}

impl SnapshotHeader {
    /// Exact length of the whole file this header describes.
    pub fn total_len(&self) -> u64 {
        (HEADER_LEN + align8(self.dir_len)) as u64 + self.data_len
    }
}

/// Decode and check a snapshot header (the first [`HEADER_LEN`] bytes).
/// Bounds the directory and data lengths: the data can be no larger than
/// `count` bitmaps at the finest granularity for the recorded image size.
pub fn decode_snapshot_header(bytes: &[u8]) -> Result<SnapshotHeader, FormatError> {
    const WHAT: &str = "snapshot header";
    let mut r = Reader::new(bytes, WHAT);
    if r.bytes(8)? != SNAPSHOT_MAGIC {
        return Err(FormatError::Magic { what: WHAT });
    }
    let version = r.u32()?;
    let flags = r.u32()?;
    let image_size = r.u64()?;
    let seq = r.u64()?;
    let count = r.u32()?;
    let dir_len = r.u32()?;
    let data_len = r.u64()?;
    let dir_crc = r.u32()?;
    let reserved = r.u64()?;
    let crc = r.u32()?;
    if crc32c::crc32c(&bytes[..60]) != crc {
        return Err(FormatError::Checksum { what: WHAT });
    }
    if version != FORMAT_VERSION {
        return Err(FormatError::Version {
            what: WHAT,
            version,
        });
    }
    if flags & !SNAPSHOT_CLEAN != 0 || reserved != 0 {
        return Err(FormatError::Reserved { what: WHAT });
    }
    check_limit("bitmap count", count.into(), MAX_BITMAPS as u64)?;
    check_limit(
        "directory length",
        dir_len.into(),
        MAX_SNAPSHOT_DIR_LEN as u64,
    )?;
    // Finest granularity gives the largest bitmap; too-large geometries are
    // rejected per entry later, so clamp to the in-memory limit here.
    let per_bitmap = MIN_GRANULARITY
        .checked_mul(64)
        .map(|bits_per_word| image_size.div_ceil(bits_per_word).saturating_mul(8))
        .unwrap_or(u64::MAX)
        .min(crate::bitmap::MAX_BITMAP_BYTES);
    let max_data = per_bitmap.saturating_mul(count.into());
    check_limit("data length", data_len, max_data)?;
    Ok(SnapshotHeader {
        image_size,
        seq,
        clean: flags & SNAPSHOT_CLEAN != 0,
        count: count as usize,
        dir_len: dir_len as usize,
        data_len,
        dir_crc,
    })
}

/// Decode a whole snapshot file. With `expected_image_size`, a snapshot of
/// another size is rejected ([`FormatError::Mismatch`] on "image size").
pub fn decode_snapshot(
    bytes: &[u8],
    expected_image_size: Option<u64>,
) -> Result<Snapshot, FormatError> {
    const WHAT: &str = "snapshot";
    let h = decode_snapshot_header(bytes)?;
    if let Some(exp) = expected_image_size
        && exp != h.image_size
    {
        return Err(FormatError::Mismatch {
            what: "image size",
            found: h.image_size,
            expected: exp,
        });
    }
    let total = h.total_len();
    if (bytes.len() as u64) < total {
        return Err(FormatError::Truncated {
            what: WHAT,
            need: total,
            have: bytes.len() as u64,
        });
    }
    if bytes.len() as u64 > total {
        return Err(FormatError::Trailing {
            what: WHAT,
            extra: bytes.len() as u64 - total,
        });
    }
    let dir = &bytes[HEADER_LEN..HEADER_LEN + h.dir_len];
    if crc32c::crc32c(dir) != h.dir_crc {
        return Err(FormatError::Checksum {
            what: "snapshot directory",
        });
    }
    let entries = decode_dir(dir, h.count, true, "snapshot directory")?;
    if bytes[HEADER_LEN + h.dir_len..HEADER_LEN + align8(h.dir_len)]
        .iter()
        .any(|&b| b != 0)
    {
        return Err(FormatError::Reserved {
            what: "snapshot directory padding",
        });
    }
    let mut lens = Vec::with_capacity(entries.len());
    let mut sum: u64 = 0;
    for (e, _) in &entries {
        let l = data_len_for(h.image_size, e.granularity)?;
        sum = sum.saturating_add(l);
        lens.push(l as usize);
    }
    if sum != h.data_len {
        return Err(FormatError::Mismatch {
            what: "data length",
            found: h.data_len,
            expected: sum,
        });
    }
    let mut pos = HEADER_LEN + align8(h.dir_len);
    let mut bitmaps = Vec::with_capacity(entries.len());
    for ((entry, crc), len) in entries.into_iter().zip(lens) {
        // In bounds: the total length was checked against the sum above.
        let data = &bytes[pos..pos + len];
        pos += len;
        let words = if crc32c::crc32c(data) != crc {
            Err(FormatError::Checksum {
                what: "bitmap data",
            })
        } else {
            let w = words_from_le(data);
            if has_trailing_bits(&w, h.image_size.div_ceil(entry.granularity)) {
                Err(FormatError::TrailingBits {
                    what: "bitmap data",
                })
            } else {
                Ok(w)
            }
        };
        bitmaps.push(SnapshotBitmap { entry, words });
    }
    Ok(Snapshot {
        image_size: h.image_size,
        seq: h.seq,
        clean: h.clean,
        bitmaps,
    })
}

/// One write-intent record: which intent extents may have writes that the
/// snapshot does not show, plus a copy of the bitmap directory (used when
/// the snapshot itself is lost).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IntentRecord {
    /// Sequence number; the valid slot with the highest wins.
    pub seq: u64,
    /// Written by a clean shutdown.
    pub clean: bool,
    /// Image size.
    pub image_size: u64,
    /// Bytes per intent extent (a power of two).
    pub extent_size: u64,
    /// Armed extents, one bit each, `n_extents.div_ceil(64)` words.
    pub armed: Vec<u64>,
    /// Bitmap directory.
    pub dir: Vec<DirEntry>,
}

impl IntentRecord {
    /// Number of intent extents for `image_size` at `extent_size`.
    pub fn extents_for(image_size: u64, extent_size: u64) -> u64 {
        image_size.div_ceil(extent_size)
    }

    /// Indexes of the armed extents.
    pub fn armed_extents(&self) -> impl Iterator<Item = u64> + '_ {
        self.armed.iter().enumerate().flat_map(|(i, &w)| {
            (0..64u64)
                .filter(move |b| w & (1 << b) != 0)
                .map(move |b| i as u64 * 64 + b)
        })
    }
}

/// Check an intent extent size against the limits for an image.
pub fn check_extent_size(image_size: u64, extent_size: u64) -> Result<(), FormatError> {
    if !extent_size.is_power_of_two() || !(MIN_EXTENT_SIZE..=MAX_EXTENT_SIZE).contains(&extent_size)
    {
        return Err(FormatError::Size {
            what: "intent extent size",
            log2: extent_size.trailing_zeros().min(255) as u8,
        });
    }
    let n = IntentRecord::extents_for(image_size, extent_size);
    check_limit("intent extent count", n, MAX_INTENT_EXTENTS)?;
    Ok(())
}

/// Encode an intent record. The result is at most [`SLOT_SIZE`] bytes for
/// any record that satisfies the limits.
pub fn encode_intent(rec: &IntentRecord) -> Vec<u8> {
    let dir = encode_dir(&rec.dir.iter().map(|e| (e, None)).collect::<Vec<_>>());
    let n_extents = IntentRecord::extents_for(rec.image_size, rec.extent_size);
    let armed_len = rec.armed.len() * 8;
    let record_len = HEADER_LEN + armed_len + dir.len();
    let mut out = Vec::with_capacity(record_len);
    out.extend_from_slice(&INTENT_MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(if rec.clean { INTENT_CLEAN } else { 0 }).to_le_bytes());
    out.extend_from_slice(&rec.seq.to_le_bytes());
    out.extend_from_slice(&rec.image_size.to_le_bytes());
    out.push(rec.extent_size.trailing_zeros() as u8);
    out.extend_from_slice(&[0u8; 3]);
    out.extend_from_slice(&(n_extents as u32).to_le_bytes());
    out.extend_from_slice(&(rec.dir.len() as u32).to_le_bytes());
    out.extend_from_slice(&(dir.len() as u32).to_le_bytes());
    out.extend_from_slice(&(record_len as u32).to_le_bytes());
    out.extend_from_slice(&[0u8; 8]);
    out.extend_from_slice(&[0u8; 4]);
    for w in &rec.armed {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out.extend_from_slice(&dir);
    let crc = crc32c::crc32c(&out);
    out[60..64].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Decode one intent record from the start of `slot` (bytes after the
/// record's declared length are ignored: they are left over from older,
/// longer records).
pub fn decode_intent(slot: &[u8]) -> Result<IntentRecord, FormatError> {
    const WHAT: &str = "intent record";
    let mut r = Reader::new(slot, WHAT);
    if r.bytes(8)? != INTENT_MAGIC {
        return Err(FormatError::Magic { what: WHAT });
    }
    let version = r.u32()?;
    let flags = r.u32()?;
    let seq = r.u64()?;
    let image_size = r.u64()?;
    let extent_log2 = r.u8()?;
    let reserved_a = r.bytes(3)?;
    let n_extents = r.u32()?;
    let count = r.u32()?;
    let dir_len = r.u32()?;
    let record_len = r.u32()? as usize;
    let reserved_b = r.u64()?;
    let crc = r.u32()?;
    if record_len < HEADER_LEN || record_len > SLOT_SIZE.min(slot.len()) {
        return Err(FormatError::Truncated {
            what: WHAT,
            need: record_len as u64,
            have: slot.len().min(SLOT_SIZE) as u64,
        });
    }
    let mut crc_input = slot[..record_len].to_vec();
    crc_input[60..64].fill(0);
    if crc32c::crc32c(&crc_input) != crc {
        return Err(FormatError::Checksum { what: WHAT });
    }
    if version != FORMAT_VERSION {
        return Err(FormatError::Version {
            what: WHAT,
            version,
        });
    }
    if flags & !INTENT_CLEAN != 0 || reserved_a.iter().any(|&b| b != 0) || reserved_b != 0 {
        return Err(FormatError::Reserved { what: WHAT });
    }
    if u32::from(extent_log2) >= 64 {
        return Err(FormatError::Size {
            what: "intent extent size",
            log2: extent_log2,
        });
    }
    let extent_size = 1u64 << extent_log2;
    check_extent_size(image_size, extent_size)?;
    let expected_extents = IntentRecord::extents_for(image_size, extent_size);
    if u64::from(n_extents) != expected_extents {
        return Err(FormatError::Mismatch {
            what: "intent extent count",
            found: n_extents.into(),
            expected: expected_extents,
        });
    }
    check_limit("bitmap count", count.into(), MAX_BITMAPS as u64)?;
    check_limit(
        "directory length",
        dir_len.into(),
        MAX_INTENT_DIR_LEN as u64,
    )?;
    let armed_len = expected_extents.div_ceil(64) as usize * 8;
    let expected_len = HEADER_LEN + armed_len + dir_len as usize;
    if record_len != expected_len {
        return Err(FormatError::Mismatch {
            what: "intent record length",
            found: record_len as u64,
            expected: expected_len as u64,
        });
    }
    let body = &slot[HEADER_LEN..record_len];
    let armed = words_from_le(&body[..armed_len]);
    if has_trailing_bits(&armed, expected_extents) {
        return Err(FormatError::TrailingBits { what: WHAT });
    }
    let dir = decode_dir(
        &body[armed_len..],
        count as usize,
        false,
        "intent directory",
    )?
    .into_iter()
    .map(|(e, _)| e)
    .collect();
    Ok(IntentRecord {
        seq,
        clean: flags & INTENT_CLEAN != 0,
        image_size,
        extent_size,
        armed,
        dir,
    })
}

/// What the intent file holds.
#[derive(Debug)]
pub enum IntentFile {
    /// No record was ever written (missing or empty file).
    Empty,
    /// The newest valid record.
    Valid(IntentRecord),
    /// Bytes are present but neither slot holds a valid record.
    Corrupt {
        /// Why slot A was rejected.
        a: FormatError,
        /// Why slot B was rejected.
        b: FormatError,
    },
}

/// Pick the newest valid record of an intent file's bytes (slot A at 0,
/// slot B at [`SLOT_SIZE`]).
pub fn decode_intent_file(bytes: &[u8]) -> IntentFile {
    if bytes.iter().all(|&b| b == 0) {
        return IntentFile::Empty;
    }
    let a = decode_intent(&bytes[..bytes.len().min(SLOT_SIZE)]);
    let b = if bytes.len() > SLOT_SIZE {
        decode_intent(&bytes[SLOT_SIZE..bytes.len().min(2 * SLOT_SIZE)])
    } else {
        Err(FormatError::Truncated {
            what: "intent record",
            need: HEADER_LEN as u64,
            have: 0,
        })
    };
    match (a, b) {
        (Ok(a), Ok(b)) => IntentFile::Valid(if b.seq > a.seq { b } else { a }),
        (Ok(r), Err(_)) | (Err(_), Ok(r)) => IntentFile::Valid(r),
        (Err(a), Err(b)) => IntentFile::Corrupt { a, b },
    }
}

#[cfg(test)]
mod tests;
