//! The write-intent record (`IMAGE.bitmaps-intent`): two slots, each with a
//! whole record, so a torn write leaves the other one.

use super::codec::{Reader, decode_dir, encode_dir, has_trailing_bits, words_from_le};
use super::{
    DirEntry, FORMAT_VERSION, FormatError, HEADER_LEN, INTENT_CLEAN, INTENT_MAGIC, MAX_BITMAPS,
    MAX_EXTENT_SIZE, MAX_INTENT_DIR_LEN, MAX_INTENT_EXTENTS, MIN_EXTENT_SIZE, SLOT_SIZE,
    check_limit,
};

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
