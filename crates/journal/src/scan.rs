//! Reading a journal back: choose the header, walk the records, decide which
//! epochs are complete. Used by recovery and by tools; bounded by the ring
//! size whatever the file contains, and it never panics on bad input.

use crate::error::JournalError;
use crate::format::{
    HEADER_LEN, HEADER_SLOT, Header, REC_HDR, RING_START, RecordDefect, RecordHeader, RecordKind,
    phys,
};
use crate::log::LogFile;

/// Why the walk stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// A whole ring was read.
    RingEnd,
    /// The next slot holds no valid record (unwritten, torn or corrupt).
    Invalid(RecordDefect),
    /// A valid record from another journal instance (an earlier lap or a
    /// journal that was reset).
    ForeignLog,
    /// A valid record whose sequence number is not the next one.
    SeqGap,
    /// The record's length runs past the end of the ring.
    Overrun,
    /// The payload does not match its CRC (torn data).
    PayloadCrc,
}

/// A record found by the walk (payloads are not kept; replay re-reads them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScannedRecord {
    /// Decoded header.
    pub header: RecordHeader,
    /// Logical ring position.
    pub pos: u64,
}

/// Result of a scan.
#[derive(Clone, Debug)]
pub struct Scan {
    /// The header that was used.
    pub header: Header,
    /// Every valid record from the tail, in sequence order.
    pub records: Vec<ScannedRecord>,
    /// Why the walk stopped.
    pub stop: StopReason,
    /// Highest epoch such that every epoch in `base_epoch+1..=complete` has
    /// a valid closing record with a matching record count.
    pub complete: u64,
}

impl Scan {
    /// Records to replay: data records of complete epochs above the base,
    /// in sequence order.
    pub fn replay_set(&self) -> impl Iterator<Item = &ScannedRecord> {
        let (base, complete) = (self.header.base_epoch, self.complete);
        self.records.iter().filter(move |r| {
            r.header.kind.is_data() && r.header.epoch > base && r.header.epoch <= complete
        })
    }
}

fn read(log: &dyn LogFile, buf: &mut [u8], offset: u64) -> Result<(), JournalError> {
    log.read_at(buf, offset)
        .map_err(|source| JournalError::Read { offset, source })
}

/// Pick the valid header slot with the highest generation. `Ok(None)` when
/// neither slot is valid.
pub fn read_header(log: &dyn LogFile) -> Result<Option<Header>, JournalError> {
    let len = log
        .len()
        .map_err(|source| JournalError::Read { offset: 0, source })?;
    let mut best: Option<Header> = None;
    for slot in 0..2u64 {
        let off = slot * HEADER_SLOT;
        if off + HEADER_LEN as u64 > len {
            continue;
        }
        let mut b = [0u8; HEADER_LEN];
        read(log, &mut b, off)?;
        if let Ok(h) = Header::decode(&b)
            && best.is_none_or(|x| h.generation > x.generation)
        {
            best = Some(h);
        }
    }
    Ok(best)
}

/// Scan a journal. `Ok(None)` when neither header slot is valid.
pub fn scan(log: &dyn LogFile) -> Result<Option<Scan>, JournalError> {
    let Some(header) = read_header(log)? else {
        return Ok(None);
    };
    let cap = header.capacity;
    let file_len = log
        .len()
        .map_err(|source| JournalError::Read { offset: 0, source })?;
    let needed = RING_START + cap;
    if file_len < needed {
        return Err(JournalError::Truncated { file_len, needed });
    }
    let mut records = Vec::new();
    let mut pos = header.tail;
    let mut seq = header.tail_seq;
    let mut payload = Vec::new();
    let stop = loop {
        let walked = pos.wrapping_sub(header.tail);
        if walked >= cap {
            break StopReason::RingEnd;
        }
        let p = phys(pos, cap);
        let mut hb = [0u8; REC_HDR];
        read(log, &mut hb, p)?;
        let h = match RecordHeader::decode(&hb) {
            Ok(h) => h,
            Err(d) => break StopReason::Invalid(d),
        };
        if h.log_id != header.log_id {
            break StopReason::ForeignLog;
        }
        if h.seq != seq {
            break StopReason::SeqGap;
        }
        let total = u64::from(h.total_len);
        let to_ring_end = cap - pos % cap;
        if total > to_ring_end || walked + total > cap {
            break StopReason::Overrun;
        }
        if h.payload_len > 0 {
            // Bounded: total_len <= remaining ring, and the ring size was
            // bounded when the header was decoded.
            payload.resize(h.payload_len as usize, 0);
            read(log, &mut payload, p + REC_HDR as u64)?;
            if crc32c::crc32c(&payload) != h.payload_crc {
                break StopReason::PayloadCrc;
            }
        }
        records.push(ScannedRecord { header: h, pos });
        pos += total;
        seq = seq.wrapping_add(1);
    };
    let complete = complete_epochs(&header, &records);
    Ok(Some(Scan {
        header,
        records,
        stop,
        complete,
    }))
}

/// The highest epoch `k` such that every epoch in `base+1..=k` is closed by
/// a valid record whose count matches the records seen for that epoch.
fn complete_epochs(header: &Header, records: &[ScannedRecord]) -> u64 {
    use std::collections::HashMap;
    let mut counts: HashMap<u64, u64> = HashMap::new();
    let mut complete = header.base_epoch;
    let mut broken = false;
    for r in records {
        let h = &r.header;
        match h.kind {
            RecordKind::Pad => {}
            RecordKind::Close => {
                if broken || h.epoch <= header.base_epoch {
                    continue;
                }
                let seen = counts.get(&h.epoch).copied().unwrap_or(0);
                if h.epoch == complete.wrapping_add(1) && seen == h.len {
                    complete = h.epoch;
                } else {
                    // Closes are written in epoch order by one thread; a gap
                    // or a count mismatch means damage: trust nothing later.
                    broken = true;
                }
            }
            _ => *counts.entry(h.epoch).or_default() += 1,
        }
    }
    complete
}
