//! Traces: a directory of equally sized raw memory images `0000.ram`,
//! `0001.ram`, ... in checkpoint order.

use std::path::{Path, PathBuf};

use crate::image::{self, ImageError};
use crate::page::PAGE_SIZE;

/// Failures opening or writing a trace.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The directory could not be listed.
    #[error("cannot list trace directory {path}; check that it exists")]
    List {
        /// Directory.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// No images.
    #[error(
        "trace directory {path} holds no NNNN.ram images; record one with scripts/guest/record.sh"
    )]
    Empty {
        /// Directory.
        path: String,
    },
    /// Numbering has a hole.
    #[error(
        "trace {path} is missing image {missing:04}.ram; images must be numbered 0000, 0001, ... without gaps"
    )]
    Gap {
        /// Directory.
        path: String,
        /// Missing index.
        missing: usize,
    },
    /// Sizes differ.
    #[error(
        "trace image {file} has {len} bytes but the first image has {first}; all images must have the same size"
    )]
    SizeMismatch {
        /// File.
        file: String,
        /// Its size.
        len: u64,
        /// Size of image 0.
        first: u64,
    },
    /// An image could not be read.
    #[error("reading trace image failed")]
    Image(#[source] ImageError),
    /// Writing an image failed.
    #[error("cannot write trace image {path}; check free space")]
    Write {
        /// File.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// An opened trace.
#[derive(Debug, Clone)]
pub struct Trace {
    dir: PathBuf,
    files: Vec<PathBuf>,
    image_len: u64,
}

/// File name of image `i`.
pub fn image_name(i: usize) -> String {
    format!("{i:04}.ram")
}

impl Trace {
    /// Open `dir`, checking numbering and sizes.
    pub fn open(dir: &Path) -> Result<Self, TraceError> {
        let ds = dir.display().to_string();
        let mut idx = Vec::new();
        for e in std::fs::read_dir(dir).map_err(|source| TraceError::List {
            path: ds.clone(),
            source,
        })? {
            let e = e.map_err(|source| TraceError::List {
                path: ds.clone(),
                source,
            })?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(stem) = name.strip_suffix(".ram")
                && stem.len() >= 4
                && stem.bytes().all(|b| b.is_ascii_digit())
                && let Ok(i) = stem.parse::<usize>()
            {
                idx.push((i, e.path()));
            }
        }
        if idx.is_empty() {
            return Err(TraceError::Empty { path: ds });
        }
        idx.sort();
        let mut files = Vec::with_capacity(idx.len());
        let mut first = None;
        for (want, (i, p)) in idx.into_iter().enumerate() {
            if i != want {
                return Err(TraceError::Gap {
                    path: ds,
                    missing: want,
                });
            }
            let len = std::fs::metadata(&p)
                .map_err(|source| TraceError::List {
                    path: p.display().to_string(),
                    source,
                })?
                .len();
            let f = *first.get_or_insert(len);
            if len != f || len == 0 || len % PAGE_SIZE as u64 != 0 {
                return Err(TraceError::SizeMismatch {
                    file: p.display().to_string(),
                    len,
                    first: f,
                });
            }
            files.push(p);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            image_len: first.unwrap_or(0),
        })
    }

    /// Directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Never true for an opened trace.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Bytes per image.
    pub fn image_len(&self) -> u64 {
        self.image_len
    }

    /// Read image `i` into `buf`.
    pub fn read(&self, i: usize, max: u64, buf: &mut Vec<u8>) -> Result<(), TraceError> {
        let p = self.files.get(i).ok_or_else(|| TraceError::Gap {
            path: self.dir.display().to_string(),
            missing: i,
        })?;
        image::load(p, max, buf).map_err(TraceError::Image)
    }
}

/// Write `image` as image `i` of the trace in `dir`.
pub fn write_image(dir: &Path, i: usize, image: &[u8]) -> Result<(), TraceError> {
    let p = dir.join(image_name(i));
    std::fs::write(&p, image).map_err(|source| TraceError::Write {
        path: p.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_checks_numbering_and_sizes() {
        let d = tempfile::tempdir().expect("tmp");
        assert!(matches!(
            Trace::open(d.path()),
            Err(TraceError::Empty { .. })
        ));
        write_image(d.path(), 0, &[1u8; PAGE_SIZE]).expect("w");
        write_image(d.path(), 1, &[2u8; PAGE_SIZE]).expect("w");
        std::fs::write(d.path().join("notes.txt"), "x").expect("w");
        let t = Trace::open(d.path()).expect("open");
        assert_eq!((t.len(), t.image_len()), (2, PAGE_SIZE as u64));
        let mut b = Vec::new();
        t.read(1, u64::MAX, &mut b).expect("read");
        assert_eq!(b[0], 2);
        write_image(d.path(), 3, &[2u8; PAGE_SIZE]).expect("w");
        assert!(matches!(
            Trace::open(d.path()),
            Err(TraceError::Gap { missing: 2, .. })
        ));
        write_image(d.path(), 2, &[2u8; 2 * PAGE_SIZE]).expect("w");
        assert!(matches!(
            Trace::open(d.path()),
            Err(TraceError::SizeMismatch { .. })
        ));
    }
}
