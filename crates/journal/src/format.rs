//! The journal file format, byte by byte (see `docs/ordering.md`).
//!
//! ```text
//! offset 0      header slot A (4096 bytes, first 80 used)
//! offset 4096   header slot B
//! offset 8192   ring of `capacity` bytes: records, each 512-aligned
//! ```
//!
//! All integers are little-endian. Every header and record carries a CRC32C.
//! Encoding and decoding are pure functions so they can be fuzzed and
//! property-tested without any I/O.

/// Size of one header slot.
pub const HEADER_SLOT: u64 = 4096;
/// Where the record ring starts in the file.
pub const RING_START: u64 = 2 * HEADER_SLOT;
/// Records are aligned to this many bytes inside the ring.
pub const REC_ALIGN: u64 = 512;
/// Size of a record header.
pub const REC_HDR: usize = 64;
/// Header magic.
pub const HEADER_MAGIC: [u8; 8] = *b"UNDRJRNL";
/// Record magic.
pub const RECORD_MAGIC: [u8; 4] = *b"UJRC";
/// Format version written and understood.
pub const VERSION: u32 = 1;
/// Smallest ring accepted.
pub const MIN_CAPACITY: u64 = 64 * 1024;
/// Largest ring accepted (a sanity bound on a value read from the file).
pub const MAX_CAPACITY: u64 = 64 << 30;
/// Upper bound on one record's payload, whatever the ring size.
pub const MAX_PAYLOAD: u64 = 32 << 20;
/// Encoded size of the used part of a header slot.
pub const HEADER_LEN: usize = 80;

/// Largest payload a record may carry in a ring of `capacity` bytes: a
/// quarter of the ring (so several writers always make progress), capped.
pub fn max_payload(capacity: u64) -> u64 {
    let quarter = (capacity / 4) / REC_ALIGN * REC_ALIGN;
    quarter.saturating_sub(REC_HDR as u64).min(MAX_PAYLOAD)
}

/// Round `n` up to the record alignment.
pub fn align_up(n: u64) -> u64 {
    n.div_ceil(REC_ALIGN) * REC_ALIGN
}

/// Kind of a journal record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    /// Data write: the payload is the data.
    Write = 1,
    /// Write-zeroes of `len` bytes (flag bit 0: the range may be unmapped).
    Zero = 2,
    /// Discard of `len` bytes.
    Discard = 3,
    /// Marker: a write of this epoch went to the image in place.
    InPlace = 4,
    /// Closes epoch `epoch`; `len` is the number of records of that epoch.
    Close = 5,
    /// Filler up to the end of the ring; the next record starts the lap.
    Pad = 6,
}

impl RecordKind {
    /// Decode a kind byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Write,
            2 => Self::Zero,
            3 => Self::Discard,
            4 => Self::InPlace,
            5 => Self::Close,
            6 => Self::Pad,
            _ => return None,
        })
    }

    /// Whether the record changes the image when replayed.
    pub fn is_data(self) -> bool {
        matches!(self, Self::Write | Self::Zero | Self::Discard)
    }
}

/// Flag bit of a [`RecordKind::Zero`] record: the range may be unmapped.
pub const FLAG_MAY_UNMAP: u8 = 1;

/// A decoded record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// Kind.
    pub kind: RecordKind,
    /// Kind-specific flags.
    pub flags: u8,
    /// Journal instance the record belongs to (changes on every reset).
    pub log_id: u64,
    /// Position in the record sequence (consecutive, from the header's `tail_seq`).
    pub seq: u64,
    /// Epoch the record belongs to (for `Close`, the epoch it closes).
    pub epoch: u64,
    /// Disk offset (0 for `Close` and `Pad`).
    pub offset: u64,
    /// Disk length affected (for `Close`, the record count of the epoch).
    pub len: u64,
    /// Bytes of payload after the 64-byte header.
    pub payload_len: u32,
    /// Bytes the record occupies in the ring (512-aligned, includes padding).
    pub total_len: u32,
    /// CRC32C of the payload.
    pub payload_crc: u32,
}

/// Why bytes are not a valid record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordDefect {
    /// Too few bytes.
    Short,
    /// Magic does not match (unwritten or foreign space).
    Magic,
    /// Header CRC mismatch (torn or corrupt).
    Crc,
    /// Unknown kind byte.
    Kind,
    /// Lengths are inconsistent.
    Lengths,
}

impl RecordHeader {
    /// Encode into the first 64 bytes of `out`.
    pub fn encode(&self, out: &mut [u8]) {
        let out = &mut out[..REC_HDR];
        out[0..4].copy_from_slice(&RECORD_MAGIC);
        out[4] = self.kind as u8;
        out[5] = self.flags;
        out[6..8].copy_from_slice(&[0, 0]);
        out[8..16].copy_from_slice(&self.log_id.to_le_bytes());
        out[16..24].copy_from_slice(&self.seq.to_le_bytes());
        out[24..32].copy_from_slice(&self.epoch.to_le_bytes());
        out[32..40].copy_from_slice(&self.offset.to_le_bytes());
        out[40..48].copy_from_slice(&self.len.to_le_bytes());
        out[48..52].copy_from_slice(&self.payload_len.to_le_bytes());
        out[52..56].copy_from_slice(&self.total_len.to_le_bytes());
        out[56..60].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32c::crc32c(&out[..60]);
        out[60..64].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decode and validate a header: magic, CRC, kind, and length
    /// consistency (`payload_len + 64 <= total_len`, `total_len` aligned and
    /// non-zero). Never panics.
    pub fn decode(buf: &[u8]) -> Result<Self, RecordDefect> {
        let b = buf.get(..REC_HDR).ok_or(RecordDefect::Short)?;
        if b[0..4] != RECORD_MAGIC {
            return Err(RecordDefect::Magic);
        }
        if crc32c::crc32c(&b[..60]) != le32(&b[60..64]) {
            return Err(RecordDefect::Crc);
        }
        let kind = RecordKind::from_u8(b[4]).ok_or(RecordDefect::Kind)?;
        let h = Self {
            kind,
            flags: b[5],
            log_id: le64(&b[8..16]),
            seq: le64(&b[16..24]),
            epoch: le64(&b[24..32]),
            offset: le64(&b[32..40]),
            len: le64(&b[40..48]),
            payload_len: le32(&b[48..52]),
            total_len: le32(&b[52..56]),
            payload_crc: le32(&b[56..60]),
        };
        let total = u64::from(h.total_len);
        if total == 0
            || !total.is_multiple_of(REC_ALIGN)
            || u64::from(h.payload_len) + REC_HDR as u64 > total
            || (kind == RecordKind::Write && u64::from(h.payload_len) != h.len)
            || (kind != RecordKind::Write && h.payload_len != 0)
        {
            return Err(RecordDefect::Lengths);
        }
        Ok(h)
    }
}

/// The journal header (one per slot; the valid slot with the highest
/// generation wins).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Journal instance; records with another id are ignored.
    pub log_id: u64,
    /// Slot write counter.
    pub generation: u64,
    /// Ring size in bytes.
    pub capacity: u64,
    /// Size of the image the journal belongs to.
    pub image_size: u64,
    /// Logical ring position of the oldest live record.
    pub tail: u64,
    /// Sequence number of the record at `tail`.
    pub tail_seq: u64,
    /// Every epoch `<= base_epoch` is durable in the image.
    pub base_epoch: u64,
}

/// Why a header slot is not valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderDefect {
    /// Too few bytes.
    Short,
    /// Not our magic.
    Magic,
    /// CRC mismatch.
    Crc,
    /// A version this code does not understand.
    Version(u32),
    /// Ring size outside the accepted bounds or misaligned.
    Capacity,
}

impl Header {
    /// Encode into the first [`HEADER_LEN`] bytes of `out`.
    pub fn encode(&self, out: &mut [u8]) {
        let out = &mut out[..HEADER_LEN];
        out[0..8].copy_from_slice(&HEADER_MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&(HEADER_SLOT as u32).to_le_bytes());
        out[16..24].copy_from_slice(&self.log_id.to_le_bytes());
        out[24..32].copy_from_slice(&self.generation.to_le_bytes());
        out[32..40].copy_from_slice(&self.capacity.to_le_bytes());
        out[40..48].copy_from_slice(&self.image_size.to_le_bytes());
        out[48..56].copy_from_slice(&self.tail.to_le_bytes());
        out[56..64].copy_from_slice(&self.tail_seq.to_le_bytes());
        out[64..72].copy_from_slice(&self.base_epoch.to_le_bytes());
        out[72..76].copy_from_slice(&0u32.to_le_bytes());
        let crc = crc32c::crc32c(&out[..76]);
        out[76..80].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decode and validate one slot. Never panics.
    pub fn decode(buf: &[u8]) -> Result<Self, HeaderDefect> {
        let b = buf.get(..HEADER_LEN).ok_or(HeaderDefect::Short)?;
        if b[0..8] != HEADER_MAGIC {
            return Err(HeaderDefect::Magic);
        }
        if crc32c::crc32c(&b[..76]) != le32(&b[76..80]) {
            return Err(HeaderDefect::Crc);
        }
        let version = le32(&b[8..12]);
        if version != VERSION {
            return Err(HeaderDefect::Version(version));
        }
        let h = Self {
            log_id: le64(&b[16..24]),
            generation: le64(&b[24..32]),
            capacity: le64(&b[32..40]),
            image_size: le64(&b[40..48]),
            tail: le64(&b[48..56]),
            tail_seq: le64(&b[56..64]),
            base_epoch: le64(&b[64..72]),
        };
        if !(MIN_CAPACITY..=MAX_CAPACITY).contains(&h.capacity)
            || !h.capacity.is_multiple_of(REC_ALIGN)
        {
            return Err(HeaderDefect::Capacity);
        }
        Ok(h)
    }
}

/// Physical file offset of logical ring position `pos`.
pub fn phys(pos: u64, capacity: u64) -> u64 {
    RING_START + pos % capacity
}

fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn kind() -> impl Strategy<Value = RecordKind> {
        (1u8..=6).prop_map(|k| RecordKind::from_u8(k).expect("valid kind"))
    }

    prop_compose! {
        fn record()(kind in kind(), flags in any::<u8>(), log_id in any::<u64>(), seq in any::<u64>(),
                    epoch in any::<u64>(), offset in any::<u64>(), len in 0u64..1_000_000,
                    extra in 0u32..4, crc in any::<u32>()) -> RecordHeader {
            let payload_len = if kind == RecordKind::Write { len as u32 } else { 0 };
            let len = if kind == RecordKind::Write { u64::from(payload_len) } else { len };
            let total_len = (align_up(u64::from(payload_len) + REC_HDR as u64) as u32) + extra * 512;
            RecordHeader { kind, flags, log_id, seq, epoch, offset, len, payload_len, total_len, payload_crc: crc }
        }
    }

    proptest! {
        #[test]
        fn record_roundtrip(h in record()) {
            let mut b = [0u8; REC_HDR];
            h.encode(&mut b);
            prop_assert_eq!(RecordHeader::decode(&b), Ok(h));
        }

        #[test]
        fn record_any_bit_flip_is_rejected(h in record(), bit in 0usize..(REC_HDR * 8)) {
            let mut b = [0u8; REC_HDR];
            h.encode(&mut b);
            b[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(RecordHeader::decode(&b).is_err());
        }

        #[test]
        fn record_decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = RecordHeader::decode(&b);
        }

        #[test]
        fn header_roundtrip(log_id in any::<u64>(), generation in any::<u64>(), cap in 128u64..1000,
                            image_size in any::<u64>(), tail in any::<u64>(), tail_seq in any::<u64>(),
                            base_epoch in any::<u64>(), bit in 0usize..(HEADER_LEN * 8)) {
            let h = Header { log_id, generation, capacity: cap * 512, image_size, tail, tail_seq, base_epoch };
            let mut b = [0u8; HEADER_LEN];
            h.encode(&mut b);
            prop_assert_eq!(Header::decode(&b), Ok(h));
            b[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(Header::decode(&b).is_err());
        }

        #[test]
        fn max_payload_fits_a_quarter(cap in (MIN_CAPACITY / 512)..(MAX_CAPACITY / 512)) {
            let cap = cap * 512;
            let m = max_payload(cap);
            prop_assert!(m > 0);
            prop_assert!(align_up(m + REC_HDR as u64) <= cap / 4);
            prop_assert!(m <= MAX_PAYLOAD);
        }
    }

    #[test]
    fn rejects_inconsistent_lengths() {
        let mut h = RecordHeader {
            kind: RecordKind::Write,
            flags: 0,
            log_id: 1,
            seq: 1,
            epoch: 1,
            offset: 0,
            len: 4096,
            payload_len: 4096,
            total_len: 4096,
            payload_crc: 0,
        };
        let mut b = [0u8; REC_HDR];
        h.encode(&mut b);
        assert_eq!(RecordHeader::decode(&b), Err(RecordDefect::Lengths));
        h.total_len = 4608;
        h.len = 4095;
        h.encode(&mut b);
        assert_eq!(RecordHeader::decode(&b), Err(RecordDefect::Lengths));
        h.kind = RecordKind::Close;
        h.encode(&mut b);
        assert_eq!(RecordHeader::decode(&b), Err(RecordDefect::Lengths));
    }
}
