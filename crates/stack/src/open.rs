//! [`ExportStack::open`]: validate, then open the layers bottom-up.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use understudy_bitmap::{BitmapStore, Persister};
use understudy_block::{Disk, Format, OpenOptions, open_disk, qcow2::Qcow2Disk, raw::RawDisk};
use understudy_filter::FilterDisk;
use understudy_journal::EpochDisk;
use understudy_layers::SwitchDisk;

use crate::{ImageSource, StackError, StackSpec};

/// The layers of an open writable export, bottom to top (see the crate
/// docs). Every handle is shared: the NBD server holds `switch`, the
/// migration reaches below it.
pub struct ExportStack {
    /// Export name.
    pub name: String,
    /// Image path (sidecars and records live beside it).
    pub image: PathBuf,
    /// Image format.
    pub format: Format,
    /// The image (after the test-only wrapper, if any).
    pub block: Arc<dyn Disk>,
    /// The epoch journal above the image, when configured.
    pub journal: Option<Arc<EpochDisk>>,
    /// The image's named bitmaps.
    pub store: Arc<BitmapStore>,
    /// The block filter: marks `store`, over the journal or the image.
    pub filter: Arc<FilterDisk>,
    /// The outermost layer, served to clients.
    pub switch: Arc<SwitchDisk>,
    /// Snapshots `store` on the spec's interval; stop it before closing
    /// the store.
    pub persister: Persister,
}

impl fmt::Debug for ExportStack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExportStack")
            .field("name", &self.name)
            .field("image", &self.image)
            .field("format", &self.format)
            .field("journal", &self.journal.is_some())
            .field("route", &self.switch.route())
            .finish()
    }
}

/// A read-only export: the image alone, nothing records writes.
#[derive(Debug, Clone)]
pub struct ReadOnlyExport {
    /// Export name.
    pub name: String,
    /// Image path.
    pub image: PathBuf,
    /// Image format.
    pub format: Format,
    /// The image, opened read-only.
    pub block: Arc<dyn Disk>,
}

/// What [`ExportStack::open`] opened.
#[derive(Debug)]
pub enum Opened {
    /// A writable export with all its layers.
    Writable(ExportStack),
    /// A read-only export (asked for, or the image opened read-only).
    ReadOnly(ReadOnlyExport),
}

impl ExportStack {
    /// Validate `spec` (touching no file), then open its layers: block,
    /// bitmap store, journal (replayed here, after every check), missing
    /// bitmaps, persister, filter, switch.
    pub fn open(spec: &StackSpec) -> Result<Opened, StackError> {
        spec.validate()?;
        let block = open_block(spec)?;
        let info = block.info();
        if spec.read_only || info.read_only {
            if spec.journal.is_some() {
                return Err(StackError::ReadOnlyJournal {
                    export: spec.name.clone(),
                });
            }
            return Ok(Opened::ReadOnly(ReadOnlyExport {
                name: spec.name.clone(),
                image: spec.image.clone(),
                format: info.format,
                block,
            }));
        }
        spec.check_intent_extent(info.size)?;
        #[cfg(any(test, feature = "testing"))]
        let block = match &spec.block_wrapper {
            Some(wrap) => wrap(block),
            None => block,
        };
        let store = open_store(spec, info.size)?;
        let upper = open_upper(spec, &block, &store).inspect_err(|_| {
            // Closed cleanly, so the next open does not treat this as a
            // crash and over-mark.
            if let Err(e) = store.close() {
                tracing::warn!(export = %spec.name, "closing the bitmaps after a failed open: {e}");
            }
        })?;
        Ok(Opened::Writable(ExportStack {
            name: spec.name.clone(),
            image: spec.image.clone(),
            format: info.format,
            block,
            journal: upper.journal,
            store,
            filter: upper.filter,
            switch: upper.switch,
            persister: upper.persister,
        }))
    }

    /// [`ExportStack::open`] for a caller that needs a writable stack (the
    /// migration target): a read-only result is an error.
    pub fn open_writable(spec: &StackSpec) -> Result<ExportStack, StackError> {
        match Self::open(spec)? {
            Opened::Writable(s) => Ok(s),
            Opened::ReadOnly(r) => Err(StackError::ReadOnlyImage { path: r.image }),
        }
    }
}

/// Open or create the image; refuse one of the wrong size.
fn open_block(spec: &StackSpec) -> Result<Arc<dyn Disk>, StackError> {
    let path = &spec.image;
    let block: Arc<dyn Disk> = match (spec.source, spec.format) {
        (ImageSource::Create { size }, Some(format)) => {
            crate::remove_stale(path)?;
            let create_err = |source| StackError::Create {
                path: path.clone(),
                source,
            };
            match format {
                Format::Raw => Arc::new(RawDisk::create(path, size).map_err(create_err)?),
                Format::Qcow2 => Arc::new(Qcow2Disk::create(path, size, None).map_err(create_err)?),
            }
        }
        (ImageSource::Create { .. }, None) => {
            return Err(StackError::NoFormat { path: path.clone() });
        }
        (ImageSource::Existing { .. }, format) => open_disk(&OpenOptions {
            path: path.clone(),
            format,
            read_only: spec.read_only,
        })
        .map_err(|source| StackError::Open {
            path: path.clone(),
            source,
        })?,
    };
    if let ImageSource::Existing {
        size: Some(expected),
    } = spec.source
        && block.size() != expected
    {
        return Err(StackError::SizeMismatch {
            path: path.clone(),
            actual: block.size(),
            expected,
        });
    }
    Ok(block)
}

/// Open (and recover) the bitmap store; refuse a requested bitmap that
/// exists with another granularity before the journal is replayed.
fn open_store(spec: &StackSpec, size: u64) -> Result<Arc<BitmapStore>, StackError> {
    let store = BitmapStore::open(&spec.image, size, spec.store.clone()).map_err(|source| {
        StackError::OpenStore {
            path: spec.image.clone(),
            source,
        }
    })?;
    let existing = store.list();
    for b in &spec.bitmaps {
        let Some(e) = existing.iter().find(|e| e.name == b.name) else {
            continue;
        };
        if e.granularity != b.granularity {
            let err = StackError::GranularityMismatch {
                export: spec.name.clone(),
                bitmap: b.name.clone(),
                existing: e.granularity,
                requested: b.granularity,
            };
            if let Err(e) = store.close() {
                tracing::warn!(export = %spec.name, "closing the bitmaps after a failed open: {e}");
            }
            return Err(err);
        }
        if e.recovered {
            tracing::warn!(
                export = %spec.name, bitmap = %b.name,
                "bitmap restored after an unclean stop; it may over-mark by up to the write-intent bound"
            );
        }
        if !e.enabled {
            tracing::info!(export = %spec.name, bitmap = %b.name, "bitmap reopened disabled, as it was left");
        }
    }
    Ok(Arc::new(store))
}

/// What sits above the bitmap store's opening.
struct Upper {
    journal: Option<Arc<EpochDisk>>,
    filter: Arc<FilterDisk>,
    switch: Arc<SwitchDisk>,
    persister: Persister,
}

/// Journal (replay), missing bitmaps, persister, filter, switch.
fn open_upper(
    spec: &StackSpec,
    block: &Arc<dyn Disk>,
    store: &Arc<BitmapStore>,
) -> Result<Upper, StackError> {
    let journal = open_journal(spec, block)?;
    for b in &spec.bitmaps {
        if store.get(&b.name).is_none() {
            store
                .add(&b.name, b.granularity)
                .map_err(|source| StackError::AddBitmap {
                    bitmap: b.name.clone(),
                    source,
                })?;
        }
    }
    let persister = store
        .spawn_persister(spec.persist_interval)
        .map_err(|source| StackError::SpawnPersister { source })?;
    let below: Arc<dyn Disk> = match &journal {
        Some(j) => j.clone(),
        None => block.clone(),
    };
    let filter = Arc::new(FilterDisk::new(below, store.clone()));
    let switch = Arc::new(SwitchDisk::new(filter.clone()));
    Ok(Upper {
        journal,
        filter,
        switch,
        persister,
    })
}

/// Open (and recover) the epoch journal beside the image when the spec
/// asks for one.
fn open_journal(
    spec: &StackSpec,
    block: &Arc<dyn Disk>,
) -> Result<Option<Arc<EpochDisk>>, StackError> {
    let Some(cfg) = &spec.journal else {
        return Ok(None);
    };
    let path = EpochDisk::journal_path(&spec.image);
    let policy = cfg.policy;
    let (disk, report) =
        EpochDisk::open_path(block.clone(), &path, cfg.clone()).map_err(|source| {
            StackError::OpenJournal {
                export: spec.name.clone(),
                path: path.clone(),
                source: Box::new(source),
            }
        })?;
    if report.dropped_records > 0 {
        tracing::warn!(
            export = %spec.name,
            replayed_epochs = report.replayed_epochs,
            dropped_records = report.dropped_records,
            last_epoch = report.last_epoch,
            "journal recovery dropped the writes of incomplete epochs (never flushed or ordered before the crash); the image holds every epoch up to last_epoch"
        );
    } else {
        tracing::info!(
            export = %spec.name,
            found_journal = report.found_journal,
            replayed_epochs = report.replayed_epochs,
            replayed_records = report.replayed_records,
            last_epoch = report.last_epoch,
            ?policy,
            "epoch journal open"
        );
    }
    Ok(Some(Arc::new(disk)))
}
