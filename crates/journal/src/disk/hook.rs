//! What the [`EpochHook`] sees: each epoch that became durable, with its
//! writes, for replication and migration.

use std::sync::Arc;

use understudy_block::Epoch;

use super::state::EpochState;
use crate::format::{REC_HDR, RecordKind};

/// One change in a closed epoch, as handed to an [`EpochHook`].
#[derive(Clone, Debug)]
pub struct EpochWrite {
    /// Disk offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// What changed.
    pub kind: EpochWriteKind,
}

/// Kind of an [`EpochWrite`].
#[derive(Clone, Debug)]
pub enum EpochWriteKind {
    /// New data.
    Data(EpochData),
    /// Zeroes.
    Zero,
    /// Discarded (reads as zeroes here).
    Discard,
    /// Written to the image in place: read the range from the disk (it is
    /// durable in the image when the hook runs).
    InPlace,
}

/// Data of an [`EpochWrite`], shared with the journal without a copy.
#[derive(Clone)]
pub struct EpochData {
    buf: Arc<Vec<u8>>,
    len: usize,
}

impl EpochData {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[REC_HDR..REC_HDR + self.len]
    }
}

impl std::fmt::Debug for EpochData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EpochData({} bytes)", self.len)
    }
}

/// A durable epoch, in order, for replication and migration.
#[derive(Clone, Debug)]
pub struct ClosedEpoch {
    /// Epoch number.
    pub epoch: Epoch,
    /// Its changes in issue order.
    pub writes: Vec<EpochWrite>,
}

/// Called by the writer thread for every epoch that became durable in the
/// journal, in epoch order, before flush callers waiting for it are released
/// and before it is applied. It must not block for long: the writer waits
/// for it (which is also how a consumer applies back-pressure).
pub type EpochHook = Arc<dyn Fn(&ClosedEpoch) + Send + Sync>;

pub(super) fn closed_epoch(epoch: Epoch, es: &EpochState) -> ClosedEpoch {
    let mut writes: Vec<EpochWrite> = es
        .records
        .iter()
        .map(|r| EpochWrite {
            offset: r.offset,
            len: r.len,
            kind: match (r.kind, &r.buf) {
                (RecordKind::Write, Some(b)) => EpochWriteKind::Data(EpochData {
                    buf: Arc::clone(b),
                    len: r.len as usize,
                }),
                (RecordKind::Discard, _) => EpochWriteKind::Discard,
                _ => EpochWriteKind::Zero,
            },
        })
        .collect();
    writes.extend(es.in_place.iter().map(|&(offset, len)| EpochWrite {
        offset,
        len,
        kind: EpochWriteKind::InPlace,
    }));
    ClosedEpoch { epoch, writes }
}
