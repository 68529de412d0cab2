//! The named bitmaps of one image and their crash-safe persistence.
//!
//! See the crate documentation for the write protocol and `docs/bitmaps.md`
//! for the file formats and the recovery algorithm. The store is split by
//! responsibility:
//!
//! - this file: the public store API and the registry of named bitmaps;
//! - `write.rs`: the write path ([`BitmapStore::begin_write`],
//!   [`WriteGuard`]);
//! - `intent.rs`: the write-intent log and the armed extents;
//! - `gate.rs`: the epoch gate between writers and the persister;
//! - `persist.rs`: the persist protocol (cut, drain, snapshot, retire);
//! - `snapshot.rs`: reading and atomically replacing the snapshot sidecar;
//! - `persister.rs`: the background persister thread;
//! - `recovery.rs`: opening the sidecars and recovering after a crash;
//! - `fault.rs`: fault injection for crash tests (`testing` feature);
//! - `error.rs`: [`StoreError`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::{Mutex, RwLock};

use crate::bitmap::{DirtyBitmap, Taken};
use crate::format::{self, DirEntry, MAX_BITMAPS};

mod error;
mod fault;
mod gate;
mod intent;
mod persist;
mod persister;
mod recovery;
mod snapshot;
mod write;

pub use error::StoreError;
#[cfg(any(test, feature = "testing"))]
pub use fault::{FaultHook, FaultPoint};
pub use persister::Persister;
pub use write::{WriteGuard, WriteTicket};

use fault::Faults;
use gate::Gate;
use intent::Persistence;
use persister::Signal;

/// Default intent extent: 64 MiB.
pub const DEFAULT_INTENT_EXTENT: u64 = 64 << 20;
/// Default number of armed extents above which a persist is requested.
pub const DEFAULT_ARMED_SOFT_CAP: usize = 64;
/// Most runs returned by one [`BitmapStore::dirty_extents`] call.
pub const MAX_EXTENTS_PER_QUERY: usize = 1 << 16;

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
    /// Fault injection (crash tests; only with the `testing` feature).
    /// Default: none.
    #[cfg(any(test, feature = "testing"))]
    pub fault_hook: Option<FaultHook>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            intent_extent_size: DEFAULT_INTENT_EXTENT,
            armed_soft_cap: DEFAULT_ARMED_SOFT_CAP,
            #[cfg(any(test, feature = "testing"))]
            fault_hook: None,
        }
    }
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("StoreOptions");
        d.field("intent_extent_size", &self.intent_extent_size)
            .field("armed_soft_cap", &self.armed_soft_cap);
        #[cfg(any(test, feature = "testing"))]
        d.field("fault_hook", &self.fault_hook.is_some());
        d.finish()
    }
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

#[derive(Debug, Default)]
struct Control {
    snapshot_seq: u64,
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
    faults: Faults,
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
            faults: Faults::default(),
            signal: Signal::default(),
        }
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

#[cfg(test)]
mod tests;
