//! The write-intent log: which intent extents may hold writes that are not
//! yet in the snapshot.
//!
//! `IMAGE.bitmaps-intent` holds two record slots written alternately, so a
//! torn write leaves the previous record intact. A write that enters an
//! extent which is not armed first rewrites the record with that extent
//! armed and fdatasyncs it (the slow path of
//! [`BitmapStore::begin_write`]); every later write there sees the
//! fast-path armed bit and does no syscall. A persist retires the extents
//! its snapshot covers (see `persist.rs`).

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;

use super::fault::FaultPoint;
use super::{BitmapStore, StoreError};
use crate::format::{self, DirEntry, IntentRecord, SLOT_SIZE};

#[derive(Debug)]
pub(super) struct IntentState {
    pub(super) file: File,
    /// Sequence number of the newest record written.
    pub(super) seq: u64,
    /// Armed set of the newest record written (a superset of the fast-path
    /// bits).
    pub(super) durable: Vec<u64>,
    /// Directory carried by every record.
    pub(super) dir: Vec<DirEntry>,
}

/// The sidecars of a persistent store and its armed intent extents.
#[derive(Debug)]
pub(super) struct Persistence {
    pub(super) snapshot_path: PathBuf,
    pub(super) intent_path: PathBuf,
    pub(super) extent_shift: u32,
    /// Fast-path armed bits, one per intent extent.
    pub(super) armed: Box<[AtomicU64]>,
    pub(super) armed_count: AtomicUsize,
    pub(super) soft_cap: usize,
    pub(super) intent: Mutex<IntentState>,
}

impl Persistence {
    fn is_armed(&self, e: u64) -> bool {
        self.armed[(e / 64) as usize].load(Ordering::SeqCst) & (1 << (e % 64)) != 0
    }

    pub(super) fn all_armed(&self, first: u64, last: u64) -> bool {
        (first..=last).all(|e| self.is_armed(e))
    }
}

impl BitmapStore {
    /// Write the next intent record into the slot after the newest one and
    /// make it durable.
    pub(super) fn write_intent(
        &self,
        st: &mut IntentState,
        clean: bool,
        write_point: FaultPoint,
        sync_point: FaultPoint,
    ) -> io::Result<()> {
        let rec = IntentRecord {
            seq: st.seq + 1,
            clean,
            image_size: self.size,
            extent_size: self.persist.as_ref().map_or(0, |p| 1 << p.extent_shift),
            armed: st.durable.clone(),
            dir: st.dir.clone(),
        };
        let bytes = format::encode_intent(&rec);
        let offset = (rec.seq % 2) * SLOT_SIZE as u64;
        self.faults
            .write_at(&st.file, &bytes, offset, write_point)?;
        self.faults.check(sync_point)?;
        st.file.sync_data()?;
        st.seq = rec.seq;
        Ok(())
    }

    /// Arm intent extents `first..=last` (slow path of `begin_write`).
    pub(super) fn arm(&self, p: &Persistence, first: u64, last: u64) -> Result<(), StoreError> {
        let mut st = p.intent.lock();
        let newly: Vec<u64> = (first..=last).filter(|&e| !p.is_armed(e)).collect();
        if newly.is_empty() {
            return Ok(());
        }
        for &e in &newly {
            st.durable[(e / 64) as usize] |= 1 << (e % 64);
        }
        let arm_err = |source| StoreError::Arm {
            path: p.intent_path.clone(),
            source,
        };
        self.write_intent(
            &mut st,
            false,
            FaultPoint::IntentWrite,
            FaultPoint::IntentSync,
        )
        .map_err(arm_err)?;
        self.faults
            .check(FaultPoint::IntentArmed)
            .map_err(arm_err)?;
        for &e in &newly {
            p.armed[(e / 64) as usize].fetch_or(1 << (e % 64), Ordering::SeqCst);
        }
        let n = p.armed_count.fetch_add(newly.len(), Ordering::Relaxed) + newly.len();
        drop(st);
        tracing::trace!(first, last, armed = n, "armed intent extents");
        if n > p.soft_cap {
            self.signal.wake();
        }
        Ok(())
    }
}
