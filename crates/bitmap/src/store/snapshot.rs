//! The snapshot sidecar `IMAGE.bitmaps`: every bitmap's words, written
//! whole and replaced atomically (`understudy_durable::replace_with`:
//! `IMAGE.bitmaps.tmp`, fsync, rename, directory fsync), read back at open.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use understudy_durable::{Durability, ReplaceError};

use super::intent::Persistence;
use super::{BitmapStore, StoreError};
use crate::format::{self, FormatError, HEADER_LEN, Snapshot};

/// What was found in the snapshot file at open.
pub(super) enum SnapState {
    Missing,
    Valid(Snapshot),
    Corrupt(FormatError),
}

pub(super) fn read_snapshot(path: &Path, image_size: u64) -> Result<SnapState, StoreError> {
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

impl BitmapStore {
    /// Replace the snapshot with `bytes`, atomically and durably.
    pub(super) fn write_snapshot(&self, p: &Persistence, bytes: &[u8]) -> Result<(), ReplaceError> {
        // `replace_with` writes `IMAGE.bitmaps.tmp`, the name the store
        // always used, so a temporary an older version left behind is just
        // overwritten; an injected fault at its write tears that same file.
        let tmp = understudy_durable::temp_path(&p.snapshot_path);
        understudy_durable::replace_with(&p.snapshot_path, bytes, Durability::Durable, |step| {
            self.faults.before_snapshot_step(step, &tmp, bytes)
        })
    }
}
