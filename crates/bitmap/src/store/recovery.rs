//! Opening a persistent store: the sidecar files, their lock, and recovery
//! of the bitmaps after an unclean stop.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use parking_lot::{Mutex, RwLock};

use super::fault::Faults;
use super::gate::Gate;
use super::intent::{IntentState, Persistence};
use super::persister::Signal;
use super::snapshot::{SnapState, read_snapshot};
use super::{BitmapStore, Control, Entry, StoreError, StoreOptions};
use crate::bitmap::DirtyBitmap;
use crate::format::{
    self, DirEntry, FormatError, IntentFile, IntentRecord, SLOT_SIZE, SnapshotBitmap,
};

/// Open, lock and read the intent log (creating it, durably, if needed).
fn open_intent_log(image_path: &Path, intent_path: &Path) -> Result<(File, Vec<u8>), StoreError> {
    let open_err = |path: &Path| {
        let path = path.to_owned();
        move |source| StoreError::Open { path, source }
    };
    let existed = intent_path.exists();
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(intent_path)
        .map_err(open_err(intent_path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            return Err(StoreError::Locked {
                path: intent_path.to_owned(),
            });
        }
        Err(fs::TryLockError::Error(e)) => return Err(open_err(intent_path)(e)),
    }
    if !existed {
        let dir_path = understudy_durable::parent_dir(image_path);
        understudy_durable::sync_dir(&dir_path).map_err(open_err(&dir_path))?;
    }
    let mut intent_bytes = Vec::new();
    (&mut file)
        .take(2 * SLOT_SIZE as u64)
        .read_to_end(&mut intent_bytes)
        .map_err(|source| StoreError::Read {
            path: intent_path.to_owned(),
            source,
        })?;
    Ok((file, intent_bytes))
}

pub(super) fn sidecar(image: &Path, suffix: &str) -> PathBuf {
    let mut name: OsString = image.file_name().map(OsString::from).unwrap_or_default();
    name.push(suffix);
    image.with_file_name(name)
}

impl BitmapStore {
    /// Create or reopen the sidecars of `image_path` (`IMAGE.bitmaps` and
    /// `IMAGE.bitmaps-intent`) for an image of `image_size` bytes.
    ///
    /// After an unclean stop, every intent extent that was armed is marked
    /// in every bitmap that was enabled (and those bitmaps report
    /// `recovered`). A missing or corrupt snapshot makes the bitmaps the
    /// intent log lists wholly dirty. The recovered state is persisted
    /// before this returns.
    pub fn open(
        image_path: &Path,
        image_size: u64,
        opts: StoreOptions,
    ) -> Result<Self, StoreError> {
        format::check_extent_size(image_size, opts.intent_extent_size)
            .map_err(|source| StoreError::Options { source })?;
        let snapshot_path = sidecar(image_path, crate::SNAPSHOT_SUFFIX);
        let intent_path = sidecar(image_path, crate::INTENT_SUFFIX);
        let (file, intent_bytes) = open_intent_log(image_path, &intent_path)?;
        let intent = format::decode_intent_file(&intent_bytes);
        if let IntentFile::Valid(rec) = &intent
            && rec.image_size != image_size
        {
            return Err(StoreError::SizeMismatch {
                path: intent_path,
                recorded: rec.image_size,
                actual: image_size,
            });
        }
        let snap = read_snapshot(&snapshot_path, image_size)?;
        let (entries, snapshot_seq) = recover(&snapshot_path, image_size, &intent, snap)?;

        let n_extents = IntentRecord::extents_for(image_size, opts.intent_extent_size);
        let nwords = n_extents.div_ceil(64) as usize;
        let seq = match &intent {
            IntentFile::Valid(r) => r.seq,
            _ => 0,
        };
        let store = Self {
            size: image_size,
            bitmaps: RwLock::new(entries.into_iter().map(Arc::new).collect()),
            control: Mutex::new(Control { snapshot_seq }),
            gate: Gate::default(),
            closed: AtomicBool::new(false),
            persist: Some(Persistence {
                snapshot_path,
                intent_path,
                extent_shift: opts.intent_extent_size.trailing_zeros(),
                armed: (0..nwords).map(|_| AtomicU64::new(0)).collect(),
                armed_count: AtomicUsize::new(0),
                soft_cap: opts.armed_soft_cap,
                intent: Mutex::new(IntentState {
                    file,
                    seq,
                    durable: vec![0; nwords],
                    dir: Vec::new(),
                }),
            }),
            faults: Faults::from_options(&opts),
            signal: Signal::default(),
        };
        // Make the recovered state the durable one (snapshot first, then an
        // empty, not-clean intent record that says "running").
        {
            let mut ctl = store.control.lock();
            store.persist_locked(&mut ctl, false)?;
        }
        Ok(store)
    }
}

/// Build the bitmaps from what is on disk, applying the intent log after an
/// unclean stop. Returns them and the snapshot's sequence number.
fn recover(
    snapshot_path: &Path,
    size: u64,
    intent: &IntentFile,
    snap: SnapState,
) -> Result<(Vec<Entry>, u64), StoreError> {
    let (entries, seq, snapshot_clean) = match snap {
        SnapState::Valid(s) => {
            let (seq, clean) = (s.seq, s.clean);
            (from_snapshot(size, s.bitmaps)?, seq, clean)
        }
        SnapState::Missing => (from_intent(snapshot_path, size, intent, None)?, 0, false),
        SnapState::Corrupt(e) => (from_intent(snapshot_path, size, intent, Some(e))?, 0, false),
    };
    let unclean = match intent {
        IntentFile::Valid(r) => !r.clean,
        IntentFile::Empty => !snapshot_clean && !entries.is_empty(),
        IntentFile::Corrupt { .. } => true,
    };
    if unclean {
        mark_unclean_stop(&entries, intent);
    }
    Ok((entries, seq))
}

fn new_entry(e: &DirEntry, bitmap: DirtyBitmap, recovered: bool) -> Entry {
    Entry {
        name: e.name.clone(),
        bitmap: Arc::new(bitmap),
        enabled: AtomicBool::new(e.enabled),
        recovered: AtomicBool::new(recovered),
    }
}

/// A bitmap with every bit set, for `e` when its contents are lost.
fn all_dirty(size: u64, e: &DirEntry) -> Result<DirtyBitmap, StoreError> {
    let b = DirtyBitmap::new(size, e.granularity).map_err(|source| StoreError::Create {
        name: e.name.clone(),
        source,
    })?;
    b.mark_all();
    Ok(b)
}

/// The bitmaps of a valid snapshot; one whose data is unusable is marked
/// wholly dirty.
fn from_snapshot(size: u64, bitmaps: Vec<SnapshotBitmap>) -> Result<Vec<Entry>, StoreError> {
    let mut entries = Vec::with_capacity(bitmaps.len());
    for b in bitmaps {
        let words = match b.words {
            Ok(w) => DirtyBitmap::from_words_checked(size, b.entry.granularity, w)
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match words {
            Ok(bm) => {
                let rec = b.entry.recovered;
                entries.push(new_entry(&b.entry, bm, rec));
            }
            Err(error) => {
                tracing::warn!(
                    bitmap = %b.entry.name, %error,
                    "bitmap data in the snapshot is unusable; marking the bitmap wholly dirty"
                );
                entries.push(new_entry(&b.entry, all_dirty(size, &b.entry)?, true));
            }
        }
    }
    Ok(entries)
}

/// Without a usable snapshot (`problem` says why, `None` if it is
/// missing), the bitmaps the intent log names, wholly dirty.
fn from_intent(
    snapshot_path: &Path,
    size: u64,
    intent: &IntentFile,
    problem: Option<FormatError>,
) -> Result<Vec<Entry>, StoreError> {
    let mut entries = Vec::new();
    match intent {
        IntentFile::Valid(rec) => {
            if !rec.dir.is_empty() || problem.is_some() {
                tracing::warn!(
                    path = %snapshot_path.display(),
                    problem = ?problem,
                    bitmaps = rec.dir.len(),
                    "bitmap snapshot is missing or corrupt; the bitmaps named by the \
                     intent log are marked wholly dirty"
                );
            }
            for e in &rec.dir {
                entries.push(new_entry(e, all_dirty(size, e)?, true));
            }
        }
        IntentFile::Empty | IntentFile::Corrupt { .. } => {
            if let Some(source) = problem {
                return Err(StoreError::Corrupt {
                    path: snapshot_path.to_owned(),
                    source,
                });
            }
            if let IntentFile::Corrupt { a, b } = intent {
                tracing::warn!(
                    slot_a = %a, slot_b = %b,
                    "intent log is corrupt and there is no snapshot; starting with no bitmaps"
                );
            }
        }
    }
    Ok(entries)
}

/// After an unclean stop: mark every armed intent extent (or, without a
/// usable intent log, everything) in every enabled bitmap, and flag those
/// bitmaps as recovered.
fn mark_unclean_stop(entries: &[Entry], intent: &IntentFile) {
    let enabled: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.enabled.load(Ordering::Relaxed))
        .collect();
    match intent {
        IntentFile::Valid(rec) => {
            let mut armed = 0u64;
            for ext in rec.armed_extents() {
                armed += 1;
                let off = ext.saturating_mul(rec.extent_size);
                for e in &enabled {
                    e.bitmap.mark(off, rec.extent_size);
                }
            }
            tracing::warn!(
                armed_extents = armed,
                extent_size = rec.extent_size,
                bitmaps = enabled.len(),
                "unclean stop: marking every armed intent extent dirty in every enabled bitmap"
            );
        }
        IntentFile::Empty | IntentFile::Corrupt { .. } => {
            tracing::warn!(
                bitmaps = enabled.len(),
                "unclean stop without a usable intent log: marking every enabled bitmap wholly dirty"
            );
            for e in &enabled {
                e.bitmap.mark_all();
            }
        }
    }
    for e in &enabled {
        e.recovered.store(true, Ordering::Relaxed);
    }
}
