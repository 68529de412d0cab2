//! Exports, the runtime registry of exports, and the dirty-map interface.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::sync::Arc;

use crate::stats::{ExportCounters, ExportStats};
use parking_lot::{Mutex, RwLock};
use understudy_block::{Disk, Epoch};
use understudy_nbd_proto::meta::QEMU_DIRTY_BITMAP_PREFIX;
use understudy_nbd_proto::wire::*;
use understudy_nbd_proto::{
    BlockSize, ExportCatalog, ExportDescriptor, Listing, MAX_REQUEST_LEN, MetaContext,
};

/// Source of dirty-block information, offered to clients as
/// `qemu:dirty-bitmap:NAME` metadata contexts.
pub trait DirtyMapSource: Send + Sync + Debug {
    /// Names of the bitmaps to offer.
    fn bitmap_names(&self) -> Vec<String>;
    /// Dirty state of `[offset, offset + len)` as contiguous `(length,
    /// dirty)` runs starting at `offset`. The runs may stop early (the
    /// server asks again) or run past the range (the server clamps).
    /// `None` if the bitmap does not exist (any more).
    fn dirty_extents(&self, name: &str, offset: u64, len: u64) -> Option<Vec<(u64, bool)>>;
}

/// The write-order extension of an export (`understudy:order`, see
/// `docs/ordering.md`). The barrier itself is `Disk::order` on the export's
/// disk, taken in request-receive order; this adds durability for a given
/// barrier without closing another epoch (which could split the requests
/// received after it).
pub trait OrderSupport: Send + Sync + Debug {
    /// Return once `epoch` (as returned by `Disk::order`) and every earlier
    /// epoch are durable: the write-flush of `ORDER` with `FUA`.
    fn sync_epoch(&self, epoch: Epoch) -> understudy_block::Result<()>;
    /// Whether NBD `FLUSH` must also wait for durability (`flush=durable`)
    /// or only orders (`flush=ordered`).
    fn flush_is_durable(&self) -> bool;
}

/// One named disk offered over NBD.
#[derive(Debug)]
pub struct Export {
    /// Export name clients ask for.
    pub name: String,
    /// Description shown by `nbdinfo --list`.
    pub description: String,
    /// The disk.
    pub disk: Arc<dyn Disk>,
    /// Refuse writes even if the disk allows them.
    pub read_only: bool,
    /// Dirty bitmaps to offer as metadata contexts.
    pub dirty: Option<Arc<dyn DirtyMapSource>>,
    /// Offer `understudy:order` and accept `CMD_ORDER` (writable exports
    /// only). `None` for disks without an epoch journal.
    pub ordering: Option<Arc<dyn OrderSupport>>,
    /// Serve only to clients that upgraded to TLS, even when the server
    /// also serves plaintext (`NbdTls::required == false`). Plaintext
    /// clients get `NBD_REP_ERR_TLS_REQD` and do not see it listed.
    pub tls_required: bool,
    /// Request counters of this export (see [`Export::stats`]).
    pub(crate) counters: ExportCounters,
}

impl Export {
    /// This export's request counters since it was created.
    pub fn stats(&self) -> ExportStats {
        self.counters.snapshot()
    }

    /// A writable export without description or bitmaps.
    pub fn new(name: impl Into<String>, disk: Arc<dyn Disk>) -> Self {
        Self {
            name: name.into(),
            description: String::new(),
            disk,
            read_only: false,
            dirty: None,
            ordering: None,
            tls_required: false,
            counters: ExportCounters::default(),
        }
    }

    /// Serve only over TLS (see [`Export::tls_required`]).
    pub fn with_tls_required(mut self, tls_required: bool) -> Self {
        self.tls_required = tls_required;
        self
    }

    /// Set the description.
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// Make the export read-only (or not).
    pub fn with_read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Offer the bitmaps of `dirty`.
    pub fn with_dirty(mut self, dirty: Arc<dyn DirtyMapSource>) -> Self {
        self.dirty = Some(dirty);
        self
    }

    /// Offer the write-order extension; `ordering` provides write-flush.
    pub fn with_ordering(mut self, ordering: Arc<dyn OrderSupport>) -> Self {
        self.ordering = Some(ordering);
        self
    }

    /// What a handshake tells clients about this export right now.
    pub(crate) fn descriptor(&self) -> ExportDescriptor {
        let info = self.disk.info();
        let ro = self.read_only || info.read_only;
        let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE;
        if ro {
            flags |= FLAG_READ_ONLY;
        } else {
            flags |= FLAG_SEND_WRITE_ZEROES;
            if info.can_discard {
                flags |= FLAG_SEND_TRIM;
            }
            if info.can_fast_zero {
                flags |= FLAG_SEND_FAST_ZERO;
            }
        }
        // Multi-conn: every connection to an export shares the one disk
        // object, and its flush covers writes made through any handle (for
        // raw: one descriptor, flush = fdatasync of it). Read-only exports
        // have nothing to flush.
        if ro || info.flush_covers_all_handles {
            flags |= FLAG_CAN_MULTI_CONN;
        }
        let preferred = info.preferred_block_size;
        let preferred =
            if preferred.is_power_of_two() && (512..=MAX_REQUEST_LEN).contains(&preferred) {
                preferred
            } else {
                4096
            };
        let mut contexts = vec![MetaContext::BaseAllocation];
        if let Some(d) = &self.dirty {
            contexts.extend(
                d.bitmap_names()
                    .into_iter()
                    .filter(|n| {
                        !n.is_empty() && n.len() + QEMU_DIRTY_BITMAP_PREFIX.len() <= MAX_STRING_LEN
                    })
                    .map(MetaContext::DirtyBitmap),
            );
        }
        // Only clients that ask for it by name ever select it.
        if !ro && self.ordering.is_some() {
            contexts.push(MetaContext::Order);
        }
        ExportDescriptor {
            name: self.name.clone(),
            description: self.description.clone(),
            size: self.disk.size(),
            flags,
            block_size: BlockSize {
                min: 1,
                preferred,
                max: MAX_REQUEST_LEN,
            },
            contexts,
            tls_only: self.tls_required,
        }
    }
}

#[derive(Debug, Default)]
struct Registry {
    exports: HashMap<String, Arc<Export>>,
    default: Option<String>,
}

/// Exports by name. Changes apply to handshakes that start afterwards;
/// connections already transmitting keep the export they opened.
#[derive(Debug, Default)]
pub struct ExportRegistry {
    inner: RwLock<Registry>,
}

impl ExportRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add or replace an export; returns the export it replaced.
    pub fn insert(&self, export: Export) -> Option<Arc<Export>> {
        self.insert_arc(Arc::new(export))
    }

    /// Add or replace an already shared export.
    pub fn insert_arc(&self, export: Arc<Export>) -> Option<Arc<Export>> {
        tracing::debug!(name = %export.name, "export added");
        self.inner
            .write()
            .exports
            .insert(export.name.clone(), export)
    }

    /// Remove an export; returns it if it existed.
    pub fn remove(&self, name: &str) -> Option<Arc<Export>> {
        let mut r = self.inner.write();
        if r.default.as_deref() == Some(name) {
            r.default = None;
        }
        tracing::debug!(name, "export removed");
        r.exports.remove(name)
    }

    /// The export with exactly this name.
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        self.inner.read().exports.get(name).cloned()
    }

    /// Choose which export the empty name `""` selects (`None`: only an
    /// export literally named `""`, or the only export if there is one).
    pub fn set_default(&self, name: Option<&str>) {
        self.inner.write().default = name.map(str::to_owned);
    }

    /// Resolve a client-supplied name: an exact match first; for `""`, the
    /// default export, else the only export.
    pub fn resolve(&self, name: &str) -> Option<Arc<Export>> {
        let r = self.inner.read();
        if let Some(e) = r.exports.get(name) {
            return Some(e.clone());
        }
        if !name.is_empty() {
            return None;
        }
        if let Some(d) = &r.default {
            return r.exports.get(d).cloned();
        }
        if r.exports.len() == 1 {
            return r.exports.values().next().cloned();
        }
        None
    }

    /// Export names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.inner.read().exports.keys().cloned().collect();
        v.sort();
        v
    }

    /// Number of exports.
    pub fn len(&self) -> usize {
        self.inner.read().exports.len()
    }

    /// Whether there are no exports.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The registry as the handshake sees it.
pub(crate) struct Catalog<'a>(pub &'a ExportRegistry);

impl ExportCatalog for Catalog<'_> {
    type Handle = Arc<Export>;

    fn lookup(&self, name: &str) -> Option<(ExportDescriptor, Arc<Export>)> {
        let e = self.0.resolve(name)?;
        Some((e.descriptor(), e))
    }

    fn list(&self, f: &mut dyn FnMut(Listing<'_>)) {
        let exports: Vec<Arc<Export>> = {
            let r = self.0.inner.read();
            let mut v: Vec<_> = r.exports.values().cloned().collect();
            v.sort_by(|a, b| a.name.cmp(&b.name));
            v
        };
        for e in exports {
            f(Listing {
                name: &e.name,
                description: &e.description,
                tls_only: e.tls_required,
            });
        }
    }
}

/// A simple in-memory [`DirtyMapSource`]: named bitmaps of fixed
/// granularity, for tests and examples.
#[derive(Debug)]
pub struct MemoryDirtyMap {
    size: u64,
    granularity: u64,
    maps: Mutex<BTreeMap<String, Vec<bool>>>,
}

impl MemoryDirtyMap {
    /// Bitmaps covering `size` bytes in blocks of `granularity` bytes
    /// (treated as at least 1).
    pub fn new(size: u64, granularity: u64) -> Self {
        Self {
            size,
            granularity: granularity.max(1),
            maps: Mutex::new(BTreeMap::new()),
        }
    }

    /// Add an all-clean bitmap.
    pub fn add_bitmap(&self, name: &str) {
        let blocks = self.size.div_ceil(self.granularity) as usize;
        self.maps
            .lock()
            .insert(name.to_owned(), vec![false; blocks]);
    }

    /// Remove a bitmap.
    pub fn remove_bitmap(&self, name: &str) {
        self.maps.lock().remove(name);
    }

    /// Mark every block touching `[offset, offset + len)` dirty.
    pub fn mark_dirty(&self, name: &str, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let g = self.granularity;
        let end = offset.saturating_add(len).min(self.size);
        if let Some(m) = self.maps.lock().get_mut(name) {
            for b in (offset / g)..end.div_ceil(g) {
                if let Some(bit) = m.get_mut(b as usize) {
                    *bit = true;
                }
            }
        }
    }
}

impl DirtyMapSource for MemoryDirtyMap {
    fn bitmap_names(&self) -> Vec<String> {
        self.maps.lock().keys().cloned().collect()
    }

    fn dirty_extents(&self, name: &str, offset: u64, len: u64) -> Option<Vec<(u64, bool)>> {
        let maps = self.maps.lock();
        let m = maps.get(name)?;
        let end = offset.saturating_add(len).min(self.size);
        let g = self.granularity;
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let block = pos / g;
            let block_end = ((block + 1) * g).min(end);
            let dirty = m.get(block as usize).copied().unwrap_or(false);
            match out.last_mut() {
                Some((l, d)) if *d == dirty => *l += block_end - pos,
                _ => out.push((block_end - pos, dirty)),
            }
            pos = block_end;
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(dir: &tempfile::TempDir, name: &str) -> Arc<dyn Disk> {
        Arc::new(understudy_block::raw::RawDisk::create(&dir.path().join(name), 4096).unwrap())
    }

    #[test]
    fn default_export_resolution() {
        let dir = tempfile::tempdir().unwrap();
        let r = ExportRegistry::new();
        assert!(r.resolve("").is_none());
        r.insert(Export::new("a", disk(&dir, "a")));
        // A single export is the default.
        assert_eq!(r.resolve("").unwrap().name, "a");
        r.insert(Export::new("b", disk(&dir, "b")));
        assert!(r.resolve("").is_none(), "two exports and no default");
        r.set_default(Some("b"));
        assert_eq!(r.resolve("").unwrap().name, "b");
        assert_eq!(r.resolve("a").unwrap().name, "a");
        assert!(r.resolve("c").is_none());
        // An export literally named "" wins for the empty name.
        r.insert(Export::new("", disk(&dir, "empty")));
        assert_eq!(r.resolve("").unwrap().name, "");
        r.remove("");
        // Removing the default clears it.
        assert!(r.remove("b").is_some());
        assert_eq!(r.resolve("").unwrap().name, "a");
        assert_eq!(r.names(), vec!["a".to_string()]);
    }

    #[test]
    fn descriptor_flags_follow_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let e = Export::new("a", disk(&dir, "a"));
        let d = e.descriptor();
        assert_eq!(d.size, 4096);
        assert_ne!(d.flags & FLAG_CAN_MULTI_CONN, 0);
        assert_ne!(d.flags & FLAG_SEND_WRITE_ZEROES, 0);
        assert_eq!(d.flags & FLAG_READ_ONLY, 0);
        assert_eq!(
            d.block_size,
            BlockSize {
                min: 1,
                preferred: 4096,
                max: MAX_REQUEST_LEN
            }
        );
        assert_eq!(d.contexts, vec![MetaContext::BaseAllocation]);
        let ro = Export::new("r", disk(&dir, "r"))
            .with_read_only(true)
            .descriptor();
        assert_ne!(ro.flags & FLAG_READ_ONLY, 0);
        assert_eq!(
            ro.flags & (FLAG_SEND_WRITE_ZEROES | FLAG_SEND_TRIM | FLAG_SEND_FAST_ZERO),
            0
        );
        let m = Arc::new(MemoryDirtyMap::new(4096, 512));
        m.add_bitmap("x");
        let with = Export::new("w", disk(&dir, "w")).with_dirty(m).descriptor();
        assert_eq!(with.contexts[1], MetaContext::DirtyBitmap("x".into()));
    }

    #[derive(Debug)]
    struct NoSync;
    impl OrderSupport for NoSync {
        fn sync_epoch(&self, _: Epoch) -> understudy_block::Result<()> {
            Ok(())
        }
        fn flush_is_durable(&self) -> bool {
            true
        }
    }

    #[test]
    fn order_context_only_on_writable_ordering_exports() {
        let dir = tempfile::tempdir().unwrap();
        let plain = Export::new("p", disk(&dir, "p")).descriptor();
        assert!(!plain.contexts.contains(&MetaContext::Order));
        let j = Export::new("j", disk(&dir, "j")).with_ordering(Arc::new(NoSync));
        assert_eq!(j.descriptor().contexts.last(), Some(&MetaContext::Order));
        let ro = j.with_read_only(true).descriptor();
        assert!(!ro.contexts.contains(&MetaContext::Order));
    }

    #[test]
    fn memory_dirty_map_runs() {
        let m = MemoryDirtyMap::new(10_000, 1000);
        m.add_bitmap("x");
        m.mark_dirty("x", 1500, 1); // block 1
        m.mark_dirty("x", 3999, 2); // blocks 3 and 4
        assert_eq!(
            m.dirty_extents("x", 500, 9500).unwrap(),
            vec![
                (500, false),
                (1000, true),
                (1000, false),
                (2000, true),
                (5000, false)
            ]
        );
        assert_eq!(m.dirty_extents("x", 1200, 100).unwrap(), vec![(100, true)]);
        assert!(m.dirty_extents("y", 0, 1).is_none());
        assert_eq!(m.bitmap_names(), vec!["x".to_string()]);
        m.remove_bitmap("x");
        assert!(m.dirty_extents("x", 0, 1).is_none());
    }
}
