//! Fault injection for crash tests.
//!
//! With the `testing` cargo feature (or in this crate's own tests) a
//! [`FaultHook`] in [`StoreOptions::fault_hook`] is asked at every
//! [`FaultPoint`] of the persistence protocol and may fail that step.
//! Without the feature, [`Faults`] is a zero-sized type whose checks are
//! empty inline functions: the protocol code reads the same but the
//! compiler removes every check.
//!
//! [`StoreOptions::fault_hook`]: super::StoreOptions

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
#[cfg(any(test, feature = "testing"))]
use std::sync::Arc;

use understudy_durable::Step;

use super::StoreOptions;

/// A step of the persistence protocol at which a fault can be injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultPoint {
    /// Writing an intent record to arm extents (a fault leaves half of it
    /// written: a torn record).
    IntentWrite,
    /// Before the fdatasync of an arming intent record.
    IntentSync,
    /// After the arming record is durable, before the write may proceed.
    IntentArmed,
    /// After the armed bits were cleared in memory, before draining.
    PersistCut,
    /// Writing the temporary snapshot (a fault leaves half of it written).
    SnapshotWrite,
    /// Before the fsync of the temporary snapshot.
    SnapshotSync,
    /// Before renaming the temporary snapshot over the old one.
    SnapshotRename,
    /// Before the fsync of the directory after the rename.
    SnapshotDirSync,
    /// Writing the intent record that retires extents (torn when faulted).
    RetireWrite,
    /// Before the fdatasync of the retiring intent record.
    RetireSync,
}

#[cfg(any(test, feature = "testing"))]
impl FaultPoint {
    /// Every fault point, in protocol order.
    pub const ALL: [FaultPoint; 10] = [
        FaultPoint::IntentWrite,
        FaultPoint::IntentSync,
        FaultPoint::IntentArmed,
        FaultPoint::PersistCut,
        FaultPoint::SnapshotWrite,
        FaultPoint::SnapshotSync,
        FaultPoint::SnapshotRename,
        FaultPoint::SnapshotDirSync,
        FaultPoint::RetireWrite,
        FaultPoint::RetireSync,
    ];
}

/// Fault injection for tests: called at every [`FaultPoint`]; returning
/// true makes that step fail (as an I/O error would, leaving a torn write
/// behind where the step is a write).
#[cfg(any(test, feature = "testing"))]
pub type FaultHook = Arc<dyn Fn(FaultPoint) -> bool + Send + Sync>;

/// The fault hook of one store (zero-sized without the `testing` feature).
#[derive(Default)]
pub(super) struct Faults {
    #[cfg(any(test, feature = "testing"))]
    hook: Option<FaultHook>,
}

#[cfg(any(test, feature = "testing"))]
impl Faults {
    pub(super) fn from_options(opts: &StoreOptions) -> Self {
        Self {
            hook: opts.fault_hook.clone(),
        }
    }

    /// Fail `point` if the hook says so.
    pub(super) fn check(&self, point: FaultPoint) -> io::Result<()> {
        match &self.hook {
            Some(hook) if hook(point) => {
                Err(io::Error::other(format!("injected fault at {point:?}")))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(not(any(test, feature = "testing")))]
impl Faults {
    pub(super) fn from_options(_opts: &StoreOptions) -> Self {
        Self {}
    }

    /// Never fails: fault injection is compiled out.
    #[inline(always)]
    pub(super) fn check(&self, _point: FaultPoint) -> io::Result<()> {
        Ok(())
    }
}

impl Faults {
    /// Write `bytes` at `offset`; an injected fault leaves half of them.
    pub(super) fn write_at(
        &self,
        file: &File,
        bytes: &[u8],
        offset: u64,
        point: FaultPoint,
    ) -> io::Result<()> {
        if let Err(e) = self.check(point) {
            file.write_all_at(&bytes[..bytes.len() / 2], offset)?;
            return Err(e);
        }
        file.write_all_at(bytes, offset)
    }

    /// Run ahead of each step of the atomic snapshot replacement: maps the
    /// [`Step`]s of `understudy_durable::replace_with` onto the snapshot
    /// fault points. A fault at [`Step::Write`] leaves a torn temporary
    /// `tmp` behind, as a crash in the middle of writing it would.
    pub(super) fn before_snapshot_step(
        &self,
        step: Step,
        tmp: &Path,
        bytes: &[u8],
    ) -> io::Result<()> {
        match step {
            Step::Write => {
                if let Err(e) = self.check(FaultPoint::SnapshotWrite) {
                    let f = OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .open(tmp)?;
                    f.write_all_at(&bytes[..bytes.len() / 2], 0)?;
                    return Err(e);
                }
                Ok(())
            }
            Step::SyncFile => self.check(FaultPoint::SnapshotSync),
            Step::Rename => self.check(FaultPoint::SnapshotRename),
            Step::SyncDir => self.check(FaultPoint::SnapshotDirSync),
        }
    }
}
