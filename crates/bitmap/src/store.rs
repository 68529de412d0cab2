//! The named bitmaps of one image and their crash-safe persistence.
//!
//! See the crate documentation for the write protocol and `docs/bitmaps.md`
//! for the file formats and the recovery algorithm.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::{Condvar, Mutex, RwLock};

use crate::bitmap::{BitmapError, DirtyBitmap, Taken};
use crate::format::{
    self, DirEntry, FormatError, HEADER_LEN, IntentFile, IntentRecord, MAX_BITMAPS, SLOT_SIZE,
    Snapshot,
};

/// Default intent extent: 64 MiB.
pub const DEFAULT_INTENT_EXTENT: u64 = 64 << 20;
/// Default number of armed extents above which a persist is requested.
pub const DEFAULT_ARMED_SOFT_CAP: usize = 64;
/// Most runs returned by one [`BitmapStore::dirty_extents`] call.
pub const MAX_EXTENTS_PER_QUERY: usize = 1 << 16;

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
pub type FaultHook = Arc<dyn Fn(FaultPoint) -> bool + Send + Sync>;

/// Options of a persistent store.
#[derive(Clone)]
pub struct StoreOptions {
    /// Bytes per intent extent, a power of two from 4 KiB to 1 TiB.
    /// Smaller extents bound over-marking after a crash more tightly but
    /// need more arming syncs. Default: 64 MiB.
    pub intent_extent_size: u64,
    /// Armed extents above which the store asks its persister to run
    /// early ([`BitmapStore::needs_persist`]). Default: 64.
    pub armed_soft_cap: usize,
    /// Fault injection (tests only). Default: none.
    pub fault_hook: Option<FaultHook>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            intent_extent_size: DEFAULT_INTENT_EXTENT,
            armed_soft_cap: DEFAULT_ARMED_SOFT_CAP,
            fault_hook: None,
        }
    }
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions")
            .field("intent_extent_size", &self.intent_extent_size)
            .field("armed_soft_cap", &self.armed_soft_cap)
            .field("fault_hook", &self.fault_hook.is_some())
            .finish()
    }
}

/// Errors of the bitmap store: one variant per failed operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A bitmap name was refused.
    #[error(
        "bitmap name {name:?} is invalid ({reason}): use 1 to 255 bytes of UTF-8 without control characters"
    )]
    InvalidName {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// `add` of a name that exists.
    #[error("bitmap {name:?} already exists: remove it first or pick another name")]
    Exists {
        /// The name.
        name: String,
    },
    /// An operation named a bitmap that does not exist.
    #[error("no bitmap named {name:?}: list the bitmaps to see which exist")]
    NotFound {
        /// The name.
        name: String,
    },
    /// `add` beyond [`MAX_BITMAPS`].
    #[error("an image can have at most {MAX_BITMAPS} bitmaps: remove one first")]
    TooMany,
    /// Creating a bitmap failed.
    #[error("cannot create bitmap {name:?}")]
    Create {
        /// The name.
        name: String,
        /// Cause.
        #[source]
        source: BitmapError,
    },
    /// Taking a bitmap failed.
    #[error("cannot take bitmap {name:?}")]
    Take {
        /// The name.
        name: String,
        /// Cause.
        #[source]
        source: BitmapError,
    },
    /// The store options do not suit the image.
    #[error(
        "invalid bitmap store options: pick an intent extent size that is a power of two and large enough for the image"
    )]
    Options {
        /// Cause.
        #[source]
        source: FormatError,
    },
    /// Opening or creating a sidecar file failed.
    #[error("cannot open bitmap sidecar {path}: check the directory exists and is writable")]
    Open {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Another process holds the sidecar.
    #[error("bitmap sidecar {path} is in use by another process: stop it first")]
    Locked {
        /// The file.
        path: PathBuf,
    },
    /// Reading a sidecar file failed.
    #[error("cannot read bitmap sidecar {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The snapshot is unreadable and nothing else names the bitmaps.
    #[error(
        "bitmap snapshot {path} is corrupt and the intent log does not list the bitmaps: \
         move it aside to start with no bitmaps (consumers then need a full copy)"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: FormatError,
    },
    /// The sidecar belongs to an image of another size.
    #[error(
        "bitmap sidecar {path} was made for an image of {recorded} bytes but the image has \
         {actual}: if the image was resized, delete the .bitmaps and .bitmaps-intent files \
         (the bitmaps are lost; consumers need a full copy)"
    )]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// Size recorded in the file.
        recorded: u64,
        /// Size of the image.
        actual: u64,
    },
    /// Arming intent extents before a write failed; the write must not be
    /// done.
    #[error(
        "cannot record write intent in {path}: the write was refused; check the disk holding the image"
    )]
    Arm {
        /// The intent file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Writing the snapshot failed. The change that asked for it, if any,
    /// is in effect in memory but not yet durable.
    #[error(
        "cannot write bitmap snapshot {path}: the bitmaps stay crash safe through the intent log; retry persist"
    )]
    Persist {
        /// The snapshot file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Rewriting the intent record after a snapshot failed.
    #[error("cannot rewrite intent log {path}: extents stay armed (safe); retry persist")]
    Retire {
        /// The intent file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The store was closed.
    #[error("the bitmap store is closed: reopen it")]
    Closed,
}

/// What [`BitmapStore::list`] reports for a bitmap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Whether writes are recorded.
    pub enabled: bool,
    /// Bytes covered by dirty granules (live bits only).
    pub dirty_bytes: u64,
    /// Whether the contents were completed after an unclean stop (they may
    /// over-mark). Cleared by [`BitmapStore::clear`].
    pub recovered: bool,
    /// Whether a take is outstanding.
    pub taken: bool,
}

#[derive(Debug)]
struct Entry {
    name: String,
    bitmap: Arc<DirtyBitmap>,
    enabled: AtomicBool,
    recovered: AtomicBool,
}

impl Entry {
    fn dir_entry(&self) -> DirEntry {
        DirEntry {
            name: self.name.clone(),
            granularity: self.bitmap.granularity(),
            enabled: self.enabled.load(Ordering::Acquire),
            recovered: self.recovered.load(Ordering::Acquire),
        }
    }
}

/// A word on its own cache line, so the two epoch counters do not share.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Padded(AtomicU64);

/// Two-slot epoch counter (sleepable-RCU style) that lets the persister
/// wait for every write that may have seen the old armed bits, while new
/// writes go on in the other slot and are never blocked.
#[derive(Debug, Default)]
struct Gate {
    epoch: AtomicU64,
    active: [Padded; 2],
}

impl Gate {
    fn enter(&self) -> usize {
        loop {
            let e = self.epoch.load(Ordering::SeqCst);
            let s = (e & 1) as usize;
            self.active[s].0.fetch_add(1, Ordering::SeqCst);
            // Re-check: if a flip happened in between, this slot may already
            // have been waited for; retry in the current one.
            if self.epoch.load(Ordering::SeqCst) == e {
                return s;
            }
            self.active[s].0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn exit(&self, slot: usize) {
        let r = self.active[slot & 1]
            .0
            .fetch_update(Ordering::Release, Ordering::Relaxed, |v| v.checked_sub(1));
        if r.is_err() {
            tracing::error!(
                slot,
                "write completed twice; ignoring the second completion"
            );
        }
    }

    /// Start a new epoch and wait until every write that entered the old
    /// one has exited.
    fn flip_and_drain(&self) {
        let old = self.epoch.fetch_add(1, Ordering::SeqCst);
        let s = (old & 1) as usize;
        let mut spins = 0u32;
        while self.active[s].0.load(Ordering::SeqCst) != 0 {
            if spins < 64 {
                std::hint::spin_loop();
            } else if spins < 256 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
            spins = spins.saturating_add(1);
        }
    }
}

#[derive(Debug)]
struct IntentState {
    file: File,
    /// Sequence number of the newest record written.
    seq: u64,
    /// Armed set of the newest record written (a superset of the fast-path
    /// bits).
    durable: Vec<u64>,
    /// Directory carried by every record.
    dir: Vec<DirEntry>,
}

#[derive(Debug)]
struct Persistence {
    snapshot_path: PathBuf,
    tmp_path: PathBuf,
    intent_path: PathBuf,
    dir_path: PathBuf,
    extent_shift: u32,
    /// Fast-path armed bits, one per intent extent.
    armed: Box<[AtomicU64]>,
    armed_count: AtomicUsize,
    soft_cap: usize,
    intent: Mutex<IntentState>,
}

impl Persistence {
    fn is_armed(&self, e: u64) -> bool {
        self.armed[(e / 64) as usize].load(Ordering::SeqCst) & (1 << (e % 64)) != 0
    }

    fn all_armed(&self, first: u64, last: u64) -> bool {
        (first..=last).all(|e| self.is_armed(e))
    }
}

#[derive(Debug, Default)]
struct Control {
    snapshot_seq: u64,
}

/// Wakes persister threads early (armed set over the cap, or shutdown).
#[derive(Debug, Default)]
struct Signal {
    wake: Mutex<bool>,
    cv: Condvar,
}

impl Signal {
    fn wake(&self) {
        *self.wake.lock() = true;
        self.cv.notify_all();
    }

    fn notify_stop(&self) {
        let _w = self.wake.lock();
        self.cv.notify_all();
    }
}

/// The named dirty bitmaps of one image.
///
/// Writers call [`begin_write`](Self::begin_write) before the data write
/// and [`WriteGuard::complete`] after it (before acknowledging it). Do not
/// call [`persist`](Self::persist), [`close`](Self::close) or a
/// configuration method while holding a [`WriteGuard`]: they wait for
/// in-flight writes.
pub struct BitmapStore {
    size: u64,
    bitmaps: RwLock<Vec<Arc<Entry>>>,
    control: Mutex<Control>,
    gate: Gate,
    closed: AtomicBool,
    persist: Option<Persistence>,
    fault: Option<FaultHook>,
    signal: Signal,
}

impl std::fmt::Debug for BitmapStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BitmapStore")
            .field("size", &self.size)
            .field("bitmaps", &self.bitmaps.read().len())
            .field(
                "snapshot",
                &self.persist.as_ref().map(|p| p.snapshot_path.clone()),
            )
            .finish()
    }
}

fn sidecar(image: &Path, suffix: &str) -> PathBuf {
    let mut name: OsString = image.file_name().map(OsString::from).unwrap_or_default();
    name.push(suffix);
    image.with_file_name(name)
}

enum SnapState {
    Missing,
    Valid(Snapshot),
    Corrupt(FormatError),
}

fn read_snapshot(path: &Path, image_size: u64) -> Result<SnapState, StoreError> {
    let read_err = |source| StoreError::Read {
        path: path.to_owned(),
        source,
    };
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(SnapState::Missing),
        Err(e) => return Err(read_err(e)),
    };
    let file_len = f.metadata().map_err(read_err)?.len();
    let mut header = Vec::with_capacity(HEADER_LEN);
    (&mut f)
        .take(HEADER_LEN as u64)
        .read_to_end(&mut header)
        .map_err(read_err)?;
    let h = match format::decode_snapshot_header(&header) {
        Ok(h) => h,
        Err(e) => return Ok(SnapState::Corrupt(e)),
    };
    if h.image_size != image_size {
        return Err(StoreError::SizeMismatch {
            path: path.to_owned(),
            recorded: h.image_size,
            actual: image_size,
        });
    }
    if h.total_len() != file_len {
        return Ok(SnapState::Corrupt(FormatError::Mismatch {
            what: "snapshot file length",
            found: file_len,
            expected: h.total_len(),
        }));
    }
    // Bounded: the header limits the length by the caller's image size.
    let mut bytes = header;
    f.take(file_len - HEADER_LEN as u64)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    Ok(match format::decode_snapshot(&bytes, Some(image_size)) {
        Ok(s) => SnapState::Valid(s),
        Err(e) => SnapState::Corrupt(e),
    })
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl BitmapStore {
    /// A store without persistence (bitmaps are lost on exit).
    pub fn in_memory(image_size: u64) -> Self {
        Self {
            size: image_size,
            bitmaps: RwLock::new(Vec::new()),
            control: Mutex::new(Control::default()),
            gate: Gate::default(),
            closed: AtomicBool::new(false),
            persist: None,
            fault: None,
            signal: Signal::default(),
        }
    }

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
        let snapshot_path = sidecar(image_path, ".bitmaps");
        let intent_path = sidecar(image_path, ".bitmaps-intent");
        let tmp_path = sidecar(image_path, ".bitmaps.tmp");
        let dir_path = match image_path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
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
            .open(&intent_path)
            .map_err(open_err(&intent_path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked { path: intent_path });
            }
            Err(fs::TryLockError::Error(e)) => return Err(open_err(&intent_path)(e)),
        }
        if !existed {
            fsync_dir(&dir_path).map_err(open_err(&dir_path))?;
        }
        let mut intent_bytes = Vec::new();
        (&mut file)
            .take(2 * SLOT_SIZE as u64)
            .read_to_end(&mut intent_bytes)
            .map_err(|source| StoreError::Read {
                path: intent_path.clone(),
                source,
            })?;
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
        let (entries, snapshot_seq) = Self::recover(&snapshot_path, image_size, &intent, snap)?;

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
                tmp_path,
                intent_path,
                dir_path,
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
            fault: opts.fault_hook,
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

    /// Build the bitmaps from what is on disk, applying the intent log
    /// after an unclean stop.
    fn recover(
        snapshot_path: &Path,
        size: u64,
        intent: &IntentFile,
        snap: SnapState,
    ) -> Result<(Vec<Entry>, u64), StoreError> {
        let new_entry = |e: &DirEntry, bitmap: DirtyBitmap, recovered: bool| Entry {
            name: e.name.clone(),
            bitmap: Arc::new(bitmap),
            enabled: AtomicBool::new(e.enabled),
            recovered: AtomicBool::new(recovered),
        };
        let all_dirty = |e: &DirEntry| -> Result<DirtyBitmap, StoreError> {
            let b = DirtyBitmap::new(size, e.granularity).map_err(|source| StoreError::Create {
                name: e.name.clone(),
                source,
            })?;
            b.mark_all();
            Ok(b)
        };
        let snapshot_clean;
        let mut seq = 0;
        let mut entries = Vec::new();
        match snap {
            SnapState::Valid(s) => {
                snapshot_clean = s.clean;
                seq = s.seq;
                for b in s.bitmaps {
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
                            entries.push(new_entry(&b.entry, all_dirty(&b.entry)?, true));
                        }
                    }
                }
            }
            SnapState::Missing | SnapState::Corrupt(_) => {
                snapshot_clean = false;
                let problem = match &snap {
                    SnapState::Corrupt(e) => Some(e.clone()),
                    _ => None,
                };
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
                            entries.push(new_entry(e, all_dirty(e)?, true));
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
            }
        }
        let unclean = match intent {
            IntentFile::Valid(r) => !r.clean,
            IntentFile::Empty => !snapshot_clean && !entries.is_empty(),
            IntentFile::Corrupt { .. } => true,
        };
        if unclean {
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
        Ok((entries, seq))
    }

    /// Size of the image the bitmaps cover.
    pub fn image_size(&self) -> u64 {
        self.size
    }

    /// Whether the store writes sidecar files.
    pub fn is_persistent(&self) -> bool {
        self.persist.is_some()
    }

    /// Bytes per intent extent (`None` for an in-memory store).
    pub fn intent_extent_size(&self) -> Option<u64> {
        self.persist.as_ref().map(|p| 1u64 << p.extent_shift)
    }

    /// Intent extents armed since the last persist.
    pub fn armed_extents(&self) -> usize {
        self.persist
            .as_ref()
            .map_or(0, |p| p.armed_count.load(Ordering::Relaxed))
    }

    /// Whether the armed set is over the soft cap (persist soon to bound
    /// over-marking after a crash).
    pub fn needs_persist(&self) -> bool {
        self.persist
            .as_ref()
            .is_some_and(|p| p.armed_count.load(Ordering::Relaxed) > p.soft_cap)
    }

    fn fault(&self, point: FaultPoint) -> io::Result<()> {
        match &self.fault {
            Some(hook) if hook(point) => {
                Err(io::Error::other(format!("injected fault at {point:?}")))
            }
            _ => Ok(()),
        }
    }

    /// Write `bytes` at `offset`; an injected fault leaves half of them.
    fn write_at(
        &self,
        file: &File,
        bytes: &[u8],
        offset: u64,
        point: FaultPoint,
    ) -> io::Result<()> {
        if let Err(e) = self.fault(point) {
            file.write_all_at(&bytes[..bytes.len() / 2], offset)?;
            return Err(e);
        }
        file.write_all_at(bytes, offset)
    }

    /// Write the next intent record into the slot after the newest one and
    /// make it durable.
    fn write_intent(
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
        self.write_at(&st.file, &bytes, offset, write_point)?;
        self.fault(sync_point)?;
        st.file.sync_data()?;
        st.seq = rec.seq;
        Ok(())
    }

    /// Arm intent extents `first..=last` (slow path of `begin_write`).
    fn arm(&self, p: &Persistence, first: u64, last: u64) -> Result<(), StoreError> {
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
        self.fault(FaultPoint::IntentArmed).map_err(arm_err)?;
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

    /// Declare a write of `[offset, offset + len)` that is about to be
    /// issued. When this returns `Ok`, the write is crash safe: whatever
    /// happens next, the range will be found dirty after a restart. Do the
    /// data write only after this returns `Ok`, then call
    /// [`WriteGuard::complete`] before acknowledging it.
    ///
    /// Cheap unless the range enters an intent extent that is not armed:
    /// then one intent record is written and fdatasync'ed.
    pub fn begin_write(&self, offset: u64, len: u64) -> Result<WriteGuard<'_>, StoreError> {
        let slot = self.gate.enter();
        if self.closed.load(Ordering::SeqCst) {
            self.gate.exit(slot);
            return Err(StoreError::Closed);
        }
        if let Some(p) = &self.persist
            && len > 0
            && offset < self.size
        {
            let end = offset.saturating_add(len).min(self.size);
            let (first, last) = (offset >> p.extent_shift, (end - 1) >> p.extent_shift);
            if !p.all_armed(first, last)
                && let Err(e) = self.arm(p, first, last)
            {
                self.gate.exit(slot);
                return Err(e);
            }
        }
        Ok(WriteGuard {
            store: self,
            slot,
            offset,
            len,
            done: false,
        })
    }

    /// Complete a write begun with [`begin_write`](Self::begin_write) and
    /// turned into a ticket: marks every enabled bitmap. Call exactly once
    /// per ticket, with the same range.
    pub fn complete_ticket(&self, ticket: WriteTicket, offset: u64, len: u64) {
        self.finish(ticket.0 as usize, offset, len);
    }

    fn finish(&self, slot: usize, offset: u64, len: u64) {
        if len > 0 {
            for e in self.bitmaps.read().iter() {
                if e.enabled.load(Ordering::Acquire) {
                    e.bitmap.mark(offset, len);
                }
            }
        }
        self.gate.exit(slot);
    }

    fn find(&self, name: &str) -> Result<Arc<Entry>, StoreError> {
        self.bitmaps
            .read()
            .iter()
            .find(|e| e.name == name)
            .cloned()
            .ok_or_else(|| StoreError::NotFound {
                name: name.to_owned(),
            })
    }

    /// Run a configuration change under the control lock, then persist.
    /// The change stays in effect in memory even if persisting fails.
    fn configure<T>(
        &self,
        change: impl FnOnce(&Self) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut ctl = self.control.lock();
        if self.closed.load(Ordering::SeqCst) {
            return Err(StoreError::Closed);
        }
        let out = change(self)?;
        self.persist_locked(&mut ctl, false)?;
        Ok(out)
    }

    /// Add an enabled, clean bitmap. Persisted before returning.
    pub fn add(&self, name: &str, granularity: u64) -> Result<(), StoreError> {
        format::validate_name(name).map_err(|reason| StoreError::InvalidName {
            name: name.to_owned(),
            reason,
        })?;
        let bitmap =
            DirtyBitmap::new(self.size, granularity).map_err(|source| StoreError::Create {
                name: name.to_owned(),
                source,
            })?;
        self.configure(|s| {
            let mut list = s.bitmaps.write();
            if list.iter().any(|e| e.name == name) {
                return Err(StoreError::Exists {
                    name: name.to_owned(),
                });
            }
            if list.len() >= MAX_BITMAPS {
                return Err(StoreError::TooMany);
            }
            list.push(Arc::new(Entry {
                name: name.to_owned(),
                bitmap: Arc::new(bitmap),
                enabled: AtomicBool::new(true),
                recovered: AtomicBool::new(false),
            }));
            Ok(())
        })
    }

    /// Remove a bitmap. An outstanding [`Taken`] of it stays usable but
    /// settles into the detached bitmap. Persisted before returning.
    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        self.configure(|s| {
            let mut list = s.bitmaps.write();
            let before = list.len();
            list.retain(|e| e.name != name);
            if list.len() == before {
                return Err(StoreError::NotFound {
                    name: name.to_owned(),
                });
            }
            Ok(())
        })
    }

    fn set_enabled(&self, name: &str, enabled: bool) -> Result<(), StoreError> {
        self.configure(|s| {
            s.find(name)?.enabled.store(enabled, Ordering::SeqCst);
            Ok(())
        })
    }

    /// Start recording writes in a bitmap. Persisted before returning.
    pub fn enable(&self, name: &str) -> Result<(), StoreError> {
        self.set_enabled(name, true)
    }

    /// Stop recording writes in a bitmap (its bits are kept). Persisted
    /// before returning.
    pub fn disable(&self, name: &str) -> Result<(), StoreError> {
        self.set_enabled(name, false)
    }

    /// Reset a bitmap to clean (forgetting an outstanding take). Persisted
    /// before returning.
    pub fn clear(&self, name: &str) -> Result<(), StoreError> {
        self.configure(|s| {
            let e = s.find(name)?;
            e.bitmap.clear();
            e.recovered.store(false, Ordering::SeqCst);
            Ok(())
        })
    }

    /// Every bitmap, in creation order.
    pub fn list(&self) -> Vec<BitmapInfo> {
        self.bitmaps
            .read()
            .iter()
            .map(|e| BitmapInfo {
                name: e.name.clone(),
                granularity: e.bitmap.granularity(),
                enabled: e.enabled.load(Ordering::Acquire),
                dirty_bytes: e.bitmap.dirty_bytes(),
                recovered: e.recovered.load(Ordering::Acquire),
                taken: e.bitmap.take_outstanding(),
            })
            .collect()
    }

    /// The bitmap called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<DirtyBitmap>> {
        self.find(name).ok().map(|e| Arc::clone(&e.bitmap))
    }

    /// Harvest and reset a bitmap (see [`DirtyBitmap::take`]).
    pub fn take(&self, name: &str) -> Result<Taken, StoreError> {
        self.find(name)?
            .bitmap
            .take()
            .map_err(|source| StoreError::Take {
                name: name.to_owned(),
                source,
            })
    }

    /// Dirty runs `(len, dirty)` of bitmap `name` over `[offset, offset +
    /// len)`, for NBD `qemu:dirty-bitmap:NAME` block status. `None` if no
    /// such bitmap. At most [`MAX_EXTENTS_PER_QUERY`] runs: they may cover
    /// only a prefix of the range (callers ask again).
    pub fn dirty_extents(&self, name: &str, offset: u64, len: u64) -> Option<Vec<(u64, bool)>> {
        let b = self.get(name)?;
        Some(b.extents_capped(offset, len, MAX_EXTENTS_PER_QUERY))
    }

    /// Write a snapshot of every bitmap (including outstanding takes), then
    /// retire the intent extents it covers. Call it periodically and when
    /// [`needs_persist`](Self::needs_persist) says so. A no-op for an
    /// in-memory or closed store.
    pub fn persist(&self) -> Result<(), StoreError> {
        let mut ctl = self.control.lock();
        if self.closed.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.persist_locked(&mut ctl, false)
    }

    /// Clean shutdown: refuse new writes, wait for in-flight ones, write a
    /// clean snapshot and a clean intent record. Later writes fail with
    /// [`StoreError::Closed`].
    pub fn close(&self) -> Result<(), StoreError> {
        let mut ctl = self.control.lock();
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        if let Err(e) = self.persist_locked(&mut ctl, true) {
            // Stay open so the caller can retry; the state on disk is the
            // unclean one, which is safe.
            self.closed.store(false, Ordering::SeqCst);
            return Err(e);
        }
        self.signal.notify_stop();
        Ok(())
    }

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
    fn persist_locked(&self, ctl: &mut Control, clean: bool) -> Result<(), StoreError> {
        let Some(p) = &self.persist else {
            return Ok(());
        };
        let persist_err = |source| StoreError::Persist {
            path: p.snapshot_path.clone(),
            source,
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
        self.fault(FaultPoint::PersistCut).map_err(persist_err)?;
        self.gate.flip_and_drain();

        let bitmaps: Vec<(DirEntry, Vec<u64>)> = self
            .bitmaps
            .read()
            .iter()
            .map(|e| (e.dir_entry(), e.bitmap.persist_words()))
            .collect();
        ctl.snapshot_seq += 1;
        let bytes = format::encode_snapshot(self.size, ctl.snapshot_seq, clean, &bitmaps);
        self.write_snapshot(p, &bytes).map_err(persist_err)?;

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

    fn write_snapshot(&self, p: &Persistence, bytes: &[u8]) -> io::Result<()> {
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p.tmp_path)?;
        self.write_at(&f, bytes, 0, FaultPoint::SnapshotWrite)?;
        self.fault(FaultPoint::SnapshotSync)?;
        f.sync_all()?;
        drop(f);
        self.fault(FaultPoint::SnapshotRename)?;
        fs::rename(&p.tmp_path, &p.snapshot_path)?;
        self.fault(FaultPoint::SnapshotDirSync)?;
        fsync_dir(&p.dir_path)
    }

    /// Start a thread that persists every `interval`, and early whenever
    /// the armed set exceeds the soft cap. Failures are logged and retried
    /// at the next tick. The thread stops when the handle is stopped or
    /// dropped, or when the store is closed.
    pub fn spawn_persister(self: &Arc<Self>, interval: Duration) -> io::Result<Persister> {
        let store = Arc::clone(self);
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name("bitmap-persist".into())
            .spawn(move || {
                let stopped = || stop2.load(Ordering::SeqCst) || store.closed.load(Ordering::SeqCst);
                loop {
                    {
                        let mut wake = store.signal.wake.lock();
                        if !*wake && !stopped() {
                            store.signal.cv.wait_for(&mut wake, interval);
                        }
                        if stopped() {
                            return;
                        }
                        *wake = false;
                    }
                    if let Err(error) = store.persist() {
                        tracing::warn!(%error, "periodic bitmap persist failed; retrying at the next tick");
                    }
                }
            })?;
        Ok(Persister {
            store: Arc::clone(self),
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for BitmapStore {
    fn drop(&mut self) {
        if self.persist.is_some() && !self.closed.load(Ordering::SeqCst) {
            tracing::warn!(
                "bitmap store dropped without close(): the next open treats this as an unclean stop"
            );
        }
    }
}

/// Handle of the thread started by [`BitmapStore::spawn_persister`].
#[derive(Debug)]
pub struct Persister {
    store: Arc<BitmapStore>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Persister {
    /// Stop the thread and wait for it (after its current persist).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.store.signal.notify_stop();
        if let Some(h) = self.handle.take()
            && h.join().is_err()
        {
            tracing::error!("bitmap persister thread panicked");
        }
    }
}

impl Drop for Persister {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A declared write (see [`BitmapStore::begin_write`]). Completing it, or
/// dropping it, marks the range in every enabled bitmap; a write that
/// failed may have partly reached the disk, so it is marked too.
#[derive(Debug)]
#[must_use = "complete the guard after the data write"]
pub struct WriteGuard<'a> {
    store: &'a BitmapStore,
    slot: usize,
    offset: u64,
    len: u64,
    done: bool,
}

impl WriteGuard<'_> {
    /// Mark the range in every enabled bitmap. Call after the data write
    /// and before acknowledging it.
    pub fn complete(mut self) {
        self.done = true;
        self.store.finish(self.slot, self.offset, self.len);
    }

    /// Detach the guard from its borrow, for callers that keep a plain
    /// token between the two halves of a write; finish it with
    /// [`BitmapStore::complete_ticket`].
    pub fn into_ticket(mut self) -> WriteTicket {
        self.done = true;
        WriteTicket(self.slot as u64)
    }
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.done = true;
            self.store.finish(self.slot, self.offset, self.len);
        }
    }
}

/// A begun write detached from its guard (see [`WriteGuard::into_ticket`]).
#[derive(Debug, PartialEq, Eq)]
pub struct WriteTicket(u64);

impl WriteTicket {
    /// The ticket as a plain number, for observer tokens.
    pub fn into_raw(self) -> u64 {
        self.0
    }

    /// Rebuild a ticket from [`into_raw`](Self::into_raw).
    pub fn from_raw(raw: u64) -> Self {
        Self(raw & 1)
    }
}

#[cfg(test)]
mod tests;
