//! Which files belong to an image, and clearing them for a fresh start.

use std::io;
use std::path::{Path, PathBuf};

use understudy_journal::EpochDisk;

use crate::StackError;

/// Every file a stack keeps beside `image` (not the image itself): the
/// bitmap store's sidecars (asked of the bitmap crate) and the epoch
/// journal. Ownership records belong to the migration, not the stack.
pub fn sidecars(image: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = understudy_bitmap::sidecar_paths(image).into();
    v.push(EpochDisk::journal_path(image));
    v
}

/// Remove `image` and its [`sidecars`], as a fresh receive must: a stale
/// journal would be replayed onto the new image and stale bitmaps would
/// describe another disk. Missing files are fine.
pub fn remove_stale(image: &Path) -> Result<(), StackError> {
    for path in std::iter::once(image.to_owned()).chain(sidecars(image)) {
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::debug!(path = %path.display(), "removed a stale file"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(StackError::RemoveStale { path, source }),
        }
    }
    Ok(())
}
