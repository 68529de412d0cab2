//! The persist protocol: snapshot every bitmap, then retire the intent
//! extents the snapshot covers, without blocking writers.

use std::sync::atomic::Ordering;

use understudy_durable::{ReplaceError, Step};

use super::fault::FaultPoint;
use super::{BitmapStore, Control, StoreError};
use crate::format::{self, DirEntry};

impl BitmapStore {
    /// The persist protocol; the caller holds the control lock.
    ///
    /// 1. Under the intent lock, clear every fast-path armed bit (the cut).
    /// 2. Flip the gate and wait for every write that entered before the
    ///    flip: those may have seen the old armed bits, and all of them
    ///    must have marked before the snapshot is taken. Writes entering
    ///    after the flip see the cleared bits and re-arm.
    /// 3. Snapshot every bitmap (live | taken) and write it durably
    ///    (temp file, fsync, rename, directory fsync).
    /// 4. Rewrite the intent record with only the extents armed since the
    ///    cut. Until then the old record (a superset) stays in force.
    pub(super) fn persist_locked(&self, ctl: &mut Control, clean: bool) -> Result<(), StoreError> {
        let Some(p) = &self.persist else {
            return Ok(());
        };
        let dir: Vec<DirEntry> = self.bitmaps.read().iter().map(|e| e.dir_entry()).collect();
        {
            let mut st = p.intent.lock();
            for w in p.armed.iter() {
                w.store(0, Ordering::SeqCst);
            }
            p.armed_count.store(0, Ordering::Relaxed);
            st.dir = dir;
        }
        self.faults
            .check(FaultPoint::PersistCut)
            .map_err(|source| StoreError::Persist {
                path: p.snapshot_path.clone(),
                // A fault at the cut stops the persist before the first
                // step of the snapshot replacement.
                source: ReplaceError {
                    step: Step::Write,
                    path: understudy_durable::temp_path(&p.snapshot_path),
                    source,
                },
            })?;
        self.gate.flip_and_drain();

        let bitmaps: Vec<(DirEntry, Vec<u64>)> = self
            .bitmaps
            .read()
            .iter()
            .map(|e| (e.dir_entry(), e.bitmap.persist_words()))
            .collect();
        ctl.snapshot_seq += 1;
        let bytes = format::encode_snapshot(self.size, ctl.snapshot_seq, clean, &bitmaps);
        self.write_snapshot(p, &bytes)
            .map_err(|source| StoreError::Persist {
                path: p.snapshot_path.clone(),
                source,
            })?;

        let mut st = p.intent.lock();
        st.durable = if clean {
            vec![0; p.armed.len()]
        } else {
            p.armed.iter().map(|w| w.load(Ordering::SeqCst)).collect()
        };
        st.dir = bitmaps.into_iter().map(|(e, _)| e).collect();
        self.write_intent(
            &mut st,
            clean,
            FaultPoint::RetireWrite,
            FaultPoint::RetireSync,
        )
        .map_err(|source| StoreError::Retire {
            path: p.intent_path.clone(),
            source,
        })?;
        tracing::debug!(
            seq = ctl.snapshot_seq,
            bytes = bytes.len(),
            still_armed = p.armed_count.load(Ordering::Relaxed),
            clean,
            "persisted bitmaps"
        );
        Ok(())
    }
}
