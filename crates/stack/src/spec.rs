//! What to open: [`StackSpec`], and its validation (which touches no file).

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
#[cfg(any(test, feature = "testing"))]
use std::sync::Arc;
use std::time::Duration;

use understudy_bitmap::StoreOptions;
#[cfg(any(test, feature = "testing"))]
use understudy_block::Disk;
use understudy_block::Format;
use understudy_journal::JournalConfig;

use crate::StackError;

/// Wraps the block layer right after it is opened (tests inject faults
/// with it; the journal and filter then sit above the wrapped disk).
#[cfg(any(test, feature = "testing"))]
pub type BlockWrapper = Arc<dyn Fn(Arc<dyn Disk>) -> Arc<dyn Disk> + Send + Sync>;

/// A named bitmap the export must have: created on the first open,
/// reopened with its contents later.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapRequest {
    /// Name (1 to 255 bytes).
    pub name: String,
    /// Bytes per bit (a power of two, 4 KiB to 64 MiB).
    pub granularity: u64,
}

/// Where the block layer comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageSource {
    /// Open the image at the spec's path, which must exist. With `size`,
    /// an image of another size is refused before anything else opens.
    Existing {
        /// The size the image must have, if any.
        size: Option<u64>,
    },
    /// Create the image (the migration target's fresh receive): the image
    /// and its [`crate::sidecars`] are removed first. Needs a format.
    Create {
        /// Virtual size in bytes.
        size: u64,
    },
}

/// Everything [`crate::ExportStack::open`] needs. Build it with
/// [`StackSpec::new`] and set the fields that differ from the defaults.
#[derive(Clone)]
pub struct StackSpec {
    /// Export name (for logs and errors). No default.
    pub name: String,
    /// Image path; the sidecars live beside it. No default.
    pub image: PathBuf,
    /// Image format; `None` detects it (an existing image only). Default:
    /// `None`.
    pub format: Option<Format>,
    /// Open or create the image. Default: an existing image of any size.
    pub source: ImageSource,
    /// Serve the image read-only: only the block layer is opened. Default:
    /// false.
    pub read_only: bool,
    /// Bitmaps created on the first open. Default: none.
    pub bitmaps: Vec<BitmapRequest>,
    /// The epoch journal (`IMAGE.journal`), if any. Default: none.
    pub journal: Option<JournalConfig>,
    /// Bitmap store options (intent extent size, fault hook). Default: the
    /// store's.
    pub store: StoreOptions,
    /// How often the persister snapshots the bitmaps. Default: 5 s.
    pub persist_interval: Duration,
    /// Test-only fault injection on the block layer (only with the
    /// `testing` feature). Default: none.
    #[cfg(any(test, feature = "testing"))]
    pub block_wrapper: Option<BlockWrapper>,
}

impl fmt::Debug for StackSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StackSpec")
            .field("name", &self.name)
            .field("image", &self.image)
            .field("format", &self.format)
            .field("source", &self.source)
            .field("read_only", &self.read_only)
            .field("bitmaps", &self.bitmaps)
            .field("journal", &self.journal)
            .field("store", &self.store)
            .field("persist_interval", &self.persist_interval)
            .finish_non_exhaustive()
    }
}

impl StackSpec {
    /// Defaults for the existing image `image` served as `name`.
    pub fn new(name: impl Into<String>, image: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            image: image.into(),
            format: None,
            source: ImageSource::Existing { size: None },
            read_only: false,
            bitmaps: Vec::new(),
            journal: None,
            store: StoreOptions::default(),
            persist_interval: Duration::from_secs(5),
            #[cfg(any(test, feature = "testing"))]
            block_wrapper: None,
        }
    }

    /// Check every option without touching any file. The checks that
    /// need the image's size (when the spec does not give it) run again
    /// once the block layer is open, before anything is written.
    pub fn validate(&self) -> Result<(), StackError> {
        let name = || self.name.clone();
        if self.name.is_empty() {
            return Err(StackError::NoName {
                image: self.image.clone(),
            });
        }
        match self.source {
            ImageSource::Existing { .. } if !self.image.exists() => {
                return Err(StackError::Missing {
                    path: self.image.clone(),
                });
            }
            ImageSource::Create { .. } if self.format.is_none() => {
                return Err(StackError::NoFormat {
                    path: self.image.clone(),
                });
            }
            _ => {}
        }
        if self.read_only {
            if self.journal.is_some() {
                return Err(StackError::ReadOnlyJournal { export: name() });
            }
            if !self.bitmaps.is_empty() {
                return Err(StackError::ReadOnlyBitmaps { export: name() });
            }
            return Ok(());
        }
        self.validate_bitmaps()?;
        if let Some(j) = &self.journal {
            j.sanitize().map_err(|source| StackError::JournalConfig {
                export: name(),
                source,
            })?;
        }
        let size = match self.source {
            ImageSource::Existing { size } => size,
            ImageSource::Create { size } => Some(size),
        };
        self.check_intent_extent(size.unwrap_or(0))?;
        if self.persist_interval.is_zero() {
            return Err(StackError::PersistInterval { export: name() });
        }
        Ok(())
    }

    fn validate_bitmaps(&self) -> Result<(), StackError> {
        let mut seen = HashSet::new();
        for b in &self.bitmaps {
            understudy_bitmap::format::validate_name(&b.name).map_err(|reason| {
                StackError::BitmapName {
                    bitmap: b.name.clone(),
                    reason,
                }
            })?;
            if !seen.insert(b.name.as_str()) {
                return Err(StackError::BitmapTwice {
                    bitmap: b.name.clone(),
                });
            }
            understudy_bitmap::check_granularity(b.granularity).map_err(|source| {
                StackError::Granularity {
                    bitmap: b.name.clone(),
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// The intent extent size must suit an image of `size` bytes (0: check
    /// only what does not depend on the size).
    pub(crate) fn check_intent_extent(&self, size: u64) -> Result<(), StackError> {
        understudy_bitmap::format::check_extent_size(size, self.store.intent_extent_size).map_err(
            |source| StackError::IntentExtent {
                export: self.name.clone(),
                extent: self.store.intent_extent_size,
                source,
            },
        )
    }
}
