//! The snapshot file `IMAGE.bitmaps`: a header, a directory, and each
//! bitmap's words with their own CRC.

use super::codec::{
    Reader, align8, data_len_for, decode_dir, encode_dir, has_trailing_bits, words_from_le,
};
use super::{
    DirEntry, FORMAT_VERSION, FormatError, HEADER_LEN, MAX_BITMAPS, MAX_SNAPSHOT_DIR_LEN,
    SNAPSHOT_CLEAN, SNAPSHOT_MAGIC, check_limit,
};
use crate::bitmap::MIN_GRANULARITY;

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
