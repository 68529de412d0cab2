//! Recovery at open: replay the complete epochs of a journal onto the
//! image; drop the records of incomplete ones.

use std::io;

use understudy_block::{Disk, Epoch, WriteOpts, ZeroOpts, check_range};

use crate::error::JournalError;
use crate::format::{FLAG_MAY_UNMAP, HEADER_LEN, REC_HDR, RING_START, RecordKind, phys};
use crate::log::LogFile;
use crate::scan;

/// What happened when the journal was opened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// A journal with a valid header was found.
    pub found_journal: bool,
    /// Epochs replayed onto the image.
    pub replayed_epochs: u64,
    /// Data records replayed.
    pub replayed_records: u64,
    /// Valid records of incomplete epochs that were dropped.
    pub dropped_records: u64,
    /// Every epoch up to this one is in the image; new epochs follow it.
    pub last_epoch: Epoch,
}

/// Replay an existing journal (if `log` holds one) onto `inner`. Returns
/// what was replayed, the journal's length and its header generation
/// (0 for a new journal).
pub(super) fn recover(
    inner: &dyn Disk,
    log: &dyn LogFile,
) -> Result<(RecoveryReport, u64, u64), JournalError> {
    let image_size = inner.size();
    let len = log
        .len()
        .map_err(|source| JournalError::Read { offset: 0, source })?;
    if len == 0 {
        return Ok((RecoveryReport::default(), len, 0));
    }
    match scan::scan(log)? {
        Some(s) => {
            if s.header.image_size != image_size {
                return Err(JournalError::ImageSizeMismatch {
                    journal: s.header.image_size,
                    image: image_size,
                });
            }
            let report = replay(inner, log, &s)?;
            Ok((report, len, s.header.generation))
        }
        None if !header_area_blank(log, len)? => Err(JournalError::NoValidHeader),
        // Crashed while creating the journal: nothing to recover.
        None => Ok((RecoveryReport::default(), len, 0)),
    }
}

fn header_area_blank(log: &dyn LogFile, len: u64) -> Result<bool, JournalError> {
    let n = len.min(RING_START) as usize;
    let mut b = vec![0u8; n];
    log.read_at(&mut b, 0)
        .map_err(|source| JournalError::Read { offset: 0, source })?;
    Ok(b.iter().all(|&x| x == 0) || n < HEADER_LEN)
}

fn replay(
    inner: &dyn Disk,
    log: &dyn LogFile,
    s: &scan::Scan,
) -> Result<RecoveryReport, JournalError> {
    let mut rep = RecoveryReport {
        found_journal: true,
        last_epoch: s.complete,
        replayed_epochs: s.complete - s.header.base_epoch,
        ..Default::default()
    };
    rep.dropped_records = s
        .records
        .iter()
        .filter(|r| r.header.kind.is_data() && r.header.epoch > s.complete)
        .count() as u64;
    let size = inner.size();
    let mut buf = Vec::new();
    for r in s.replay_set() {
        let h = &r.header;
        let epoch = h.epoch;
        let err = |source| JournalError::Replay { epoch, source };
        check_range(h.offset, h.len, size).map_err(err)?;
        match h.kind {
            RecordKind::Write => {
                let off = phys(r.pos, s.header.capacity) + REC_HDR as u64;
                // Bounded by the scan: payload_len <= total_len <= capacity.
                buf.resize(h.payload_len as usize, 0);
                log.read_at(&mut buf, off)
                    .map_err(|source| JournalError::Read {
                        offset: off,
                        source,
                    })?;
                if crc32c::crc32c(&buf) != h.payload_crc {
                    return Err(JournalError::Read {
                        offset: off,
                        source: io::Error::new(
                            io::ErrorKind::InvalidData,
                            "payload changed between scan and replay",
                        ),
                    });
                }
                inner
                    .write_at(&buf, h.offset, WriteOpts::default())
                    .map_err(err)?;
            }
            RecordKind::Zero => inner
                .write_zeroes(
                    h.offset,
                    h.len,
                    ZeroOpts {
                        may_unmap: h.flags & FLAG_MAY_UNMAP != 0,
                        ..Default::default()
                    },
                )
                .map_err(err)?,
            RecordKind::Discard => inner
                .discard(h.offset, h.len, WriteOpts::default())
                .map_err(err)?,
            _ => continue,
        }
        rep.replayed_records += 1;
    }
    inner
        .flush()
        .map_err(|source| JournalError::ReplayFlush { source })?;
    Ok(rep)
}
