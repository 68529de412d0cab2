//! The single entry point that turns a path into a [`Disk`].

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::{BlockError, Disk, Result};

/// Image formats understood by the block layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// A plain file or block device, byte for byte.
    Raw,
    /// QEMU copy-on-write v2/v3, with backing chains.
    Qcow2,
}

impl Format {
    /// Lower-case name as used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A format name that is neither `raw` nor `qcow2`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown image format {name:?}: use raw or qcow2")]
pub struct UnknownFormat {
    /// The name given.
    pub name: String,
}

impl std::str::FromStr for Format {
    type Err = UnknownFormat;
    fn from_str(s: &str) -> std::result::Result<Self, UnknownFormat> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            other => Err(UnknownFormat {
                name: other.to_owned(),
            }),
        }
    }
}

/// How to open an image.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Image path.
    pub path: PathBuf,
    /// Format; `None` detects it from the image's first bytes.
    pub format: Option<Format>,
    /// Refuse writes.
    pub read_only: bool,
}

impl OpenOptions {
    /// Options for a read-write open with format detection.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            format: None,
            read_only: false,
        }
    }
}

/// The qcow2 magic, "QFI\xfb".
const QCOW2_MAGIC: [u8; 4] = [b'Q', b'F', b'I', 0xfb];

/// Detect an image's format from its first bytes. Anything that is not
/// qcow2 is raw (as QEMU does, but without probing raw for safety: a raw
/// image whose guest wrote a qcow2 header is only misread if the caller
/// does not pass `format=raw`).
pub fn detect_format(path: &Path) -> Result<Format> {
    let mut f = std::fs::File::open(path).map_err(|source| BlockError::Open {
        path: path.to_owned(),
        source,
    })?;
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match f.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(BlockError::Open {
                    path: path.to_owned(),
                    source,
                });
            }
        }
    }
    Ok(if got == 4 && magic == QCOW2_MAGIC {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

/// Open an image, detecting its format unless one is given.
pub fn open_disk(opts: &OpenOptions) -> Result<Arc<dyn Disk>> {
    let format = match opts.format {
        Some(f) => f,
        None => detect_format(&opts.path)?,
    };
    tracing::debug!(path = %opts.path.display(), %format, read_only = opts.read_only, "opening image");
    Ok(match format {
        Format::Raw => Arc::new(crate::raw::RawDisk::open(&opts.path, opts.read_only)?),
        Format::Qcow2 => Arc::new(crate::qcow2::Qcow2Disk::open(&opts.path, opts.read_only)?),
    })
}
