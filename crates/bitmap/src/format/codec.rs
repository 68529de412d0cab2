//! Byte-level helpers shared by both files: a bounds-checked little-endian
//! reader, bitmap words, and the directory encoding.

use super::{
    DirEntry, ENTRY_ENABLED, ENTRY_RECOVERED, FormatError, MAX_BITMAPS, MAX_NAME_LEN, validate_name,
};
use crate::bitmap::{MAX_GRANULARITY, MIN_GRANULARITY, words_for};

/// A little-endian reader over a slice that never panics.
pub(super) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, pos: 0, what }
    }

    pub(super) fn bytes(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
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

    pub(super) fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.bytes(1)?[0])
    }

    pub(super) fn u16(&mut self) -> Result<u16, FormatError> {
        let b = self.bytes(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub(super) fn u32(&mut self) -> Result<u32, FormatError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.bytes(4)?);
        Ok(u32::from_le_bytes(a))
    }

    pub(super) fn u64(&mut self) -> Result<u64, FormatError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.bytes(8)?);
        Ok(u64::from_le_bytes(a))
    }

    pub(super) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
}

pub(super) fn words_from_le(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_le_bytes(a)
        })
        .collect()
}

pub(super) fn align8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

/// Whether any bit at index `>= used` is set in `words`.
pub(super) fn has_trailing_bits(words: &[u64], used: u64) -> bool {
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

pub(super) fn encode_dir(entries: &[(&DirEntry, Option<u32>)]) -> Vec<u8> {
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
pub(super) fn decode_dir(
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
pub(super) fn data_len_for(image_size: u64, granularity: u64) -> Result<u64, FormatError> {
    words_for(image_size, granularity)
        .map(|w| w as u64 * 8)
        .map_err(|_| FormatError::TooLarge {
            image_size,
            granularity,
        })
}
