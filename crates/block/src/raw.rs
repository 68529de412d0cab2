//! Raw image files.
//!
//! One descriptor shared by every worker through positional I/O
//! (`pread`/`pwrite`), so the data path takes no lock. Sparse files are
//! first-class: allocation comes from `SEEK_DATA`/`SEEK_HOLE`, write-zeroes
//! and discard use `fallocate`.

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::{
    BlockError, Disk, DiskInfo, DiskMap, DiskRead, DiskSize, DiskWrite, Extent, ExtentKind, Format,
    Result, WriteOpts, ZeroOpts, check_range,
};

/// A raw image file.
#[derive(Debug)]
pub struct RawDisk {
    file: File,
    size: u64,
    read_only: bool,
    /// Whether fallocate punch-hole/zero-range work on this file system;
    /// probed lazily and remembered.
    fallocate_ok: std::sync::atomic::AtomicBool,
    /// Whether the descriptor is a block device (no SEEK_DATA).
    is_block_device: bool,
}

impl RawDisk {
    /// Open a raw image. Block devices are supported; their size comes from
    /// seeking to the end.
    pub fn open(path: &Path, read_only: bool) -> Result<Self> {
        let file = FsOpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_owned(),
                source,
            })?;
        Self::from_file(file, read_only).map_err(|source| BlockError::Open {
            path: path.to_owned(),
            source,
        })
    }

    /// Wrap an already open file.
    pub fn from_file(file: File, read_only: bool) -> io::Result<Self> {
        use std::os::unix::fs::FileTypeExt;
        let meta = file.metadata()?;
        let is_block_device = meta.file_type().is_block_device();
        let size = if is_block_device {
            use std::io::Seek;
            (&file).seek(io::SeekFrom::End(0))?
        } else {
            meta.len()
        };
        Ok(Self {
            file,
            size,
            read_only,
            fallocate_ok: std::sync::atomic::AtomicBool::new(!is_block_device),
            is_block_device,
        })
    }

    /// Create (or truncate) a sparse raw image of `size` bytes.
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        let file = FsOpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .and_then(|f| f.set_len(size).map(|()| f))
            .map_err(|source| BlockError::Open {
                path: path.to_owned(),
                source,
            })?;
        Self::from_file(file, false).map_err(|source| BlockError::Open {
            path: path.to_owned(),
            source,
        })
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let l =
            libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: fallocate only reads its integer arguments; the descriptor
        // is owned by self and open for the duration of the call.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Write zero buffers (slow path).
    fn write_zero_buffers(&self, offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK) as usize;
            self.file.write_all_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: lseek only reads its integer arguments. Concurrent lseek
        // calls race on the file offset, but every data access uses
        // positional I/O, so the shared offset is never relied on.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        }
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

impl DiskSize for RawDisk {
    fn size(&self) -> u64 {
        self.size
    }
}

impl DiskRead for RawDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| BlockError::Read {
                offset,
                len: buf.len() as u64,
                source,
            })
    }
}

impl DiskWrite for RawDisk {
    fn write_at(&self, buf: &[u8], offset: u64, opts: WriteOpts) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, buf.len() as u64, self.size)?;
        let len = buf.len() as u64;
        self.file
            .write_all_at(buf, offset)
            .and_then(|()| if opts.fua { self.sync_data() } else { Ok(()) })
            .map_err(|source| BlockError::Write {
                offset,
                len,
                source,
            })
    }

    fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> Result<()> {
        use std::sync::atomic::Ordering;
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        let err = |source| BlockError::WriteZeroes {
            offset,
            len,
            source,
        };
        let mut done = false;
        if self.fallocate_ok.load(Ordering::Relaxed) {
            let mode = if opts.may_unmap {
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            } else {
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
            };
            match self.fallocate(mode, offset, len) {
                Ok(()) => done = true,
                Err(e) if is_unsupported(&e) => {
                    tracing::debug!("fallocate mode {mode:#x} unsupported, falling back: {e}");
                    // Punch-hole may still work when zero-range does not;
                    // remember only a complete failure.
                    if !opts.may_unmap
                        && self
                            .fallocate(
                                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                                offset,
                                len,
                            )
                            .is_ok()
                    {
                        // Punching reads back as zero; re-allocate so the
                        // range stays allocated as the caller asked.
                        match self.fallocate(libc::FALLOC_FL_KEEP_SIZE, offset, len) {
                            Ok(()) => done = true,
                            Err(e) => return Err(err(e)),
                        }
                    } else {
                        self.fallocate_ok.store(false, Ordering::Relaxed);
                    }
                }
                Err(e) => return Err(err(e)),
            }
        }
        if !done {
            if opts.fast_only {
                return Err(BlockError::NotSupported("fast write-zeroes"));
            }
            self.write_zero_buffers(offset, len).map_err(err)?;
        }
        if opts.write.fua {
            self.sync_data().map_err(err)?;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64, opts: WriteOpts) -> Result<()> {
        use std::sync::atomic::Ordering;
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, len, self.size)?;
        if len == 0 || !self.fallocate_ok.load(Ordering::Relaxed) {
            // Discard is advisory: doing nothing is correct.
            return Ok(());
        }
        let err = |source| BlockError::Discard {
            offset,
            len,
            source,
        };
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => {}
            Err(e) if is_unsupported(&e) => return Ok(()),
            Err(e) => return Err(err(e)),
        }
        if opts.fua {
            self.sync_data().map_err(err)?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.sync_data()
            .map_err(|source| BlockError::Flush { source })
    }
}

impl DiskMap for RawDisk {
    fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(offset, len, self.size)?;
        let end = offset + len;
        if len == 0 {
            return Ok(Vec::new());
        }
        if self.is_block_device {
            return Ok(vec![Extent {
                offset,
                len,
                kind: ExtentKind::Data,
            }]);
        }
        let err = |source| BlockError::Map {
            offset,
            len,
            source,
        };
        // Fast path for fully allocated images (the common case for VM
        // disks): one fstat instead of two lseeks, which walk the extent
        // tree and serialise on the shared descriptor's position lock.
        // st_blocks also counts metadata blocks, so a file with a few small
        // holes may take this path too; reporting a hole as data is always
        // allowed (it only costs sparseness), never the reverse.
        {
            use std::os::unix::fs::MetadataExt;
            if self
                .file
                .metadata()
                .map_err(err)?
                .blocks()
                .saturating_mul(512)
                >= self.size
            {
                return Ok(vec![Extent {
                    offset,
                    len,
                    kind: ExtentKind::Data,
                }]);
            }
        }
        let mut out = Vec::new();
        let mut pos = offset;
        // Bound the work per call: callers ask again for the rest.
        while pos < end && out.len() < 1024 {
            let data = self.seek(pos, libc::SEEK_DATA).map_err(err)?;
            match data {
                None => {
                    out.push(Extent {
                        offset: pos,
                        len: end - pos,
                        kind: ExtentKind::Hole,
                    });
                    pos = end;
                }
                Some(d) if d > pos => {
                    let hole_end = d.min(end);
                    out.push(Extent {
                        offset: pos,
                        len: hole_end - pos,
                        kind: ExtentKind::Hole,
                    });
                    pos = hole_end;
                }
                Some(_) => {
                    let hole = self
                        .seek(pos, libc::SEEK_HOLE)
                        .map_err(err)?
                        .unwrap_or(self.size);
                    let data_end = hole.min(end).max(pos + 1);
                    out.push(Extent {
                        offset: pos,
                        len: data_end - pos,
                        kind: ExtentKind::Data,
                    });
                    pos = data_end;
                }
            }
        }
        Ok(out)
    }
}

impl Disk for RawDisk {
    fn info(&self) -> DiskInfo {
        DiskInfo {
            format: Format::Raw,
            size: self.size,
            read_only: self.read_only,
            can_discard: !self.is_block_device,
            can_fast_zero: self.fallocate_ok.load(std::sync::atomic::Ordering::Relaxed),
            flush_covers_all_handles: true,
            preferred_block_size: 4096,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(size: u64) -> (tempfile::TempDir, RawDisk) {
        let dir = tempfile::tempdir().unwrap();
        let d = RawDisk::create(&dir.path().join("d.raw"), size).unwrap();
        (dir, d)
    }

    #[test]
    fn write_read_roundtrip_and_bounds() {
        let (_t, d) = disk(1 << 20);
        d.write_at(&[7u8; 4096], 8192, WriteOpts::default())
            .unwrap();
        let mut b = [0u8; 4096];
        d.read_at(&mut b, 8192).unwrap();
        assert_eq!(b, [7u8; 4096]);
        assert_eq!(
            d.read_at(&mut b, (1 << 20) - 100).unwrap_err().kind(),
            crate::ErrorKind::OutOfBounds
        );
        assert!(d.write_at(&b, u64::MAX - 10, WriteOpts::default()).is_err());
    }

    #[test]
    fn map_reports_holes_and_data() {
        let (_t, d) = disk(4 << 20);
        d.write_at(&[1u8; 65536], 1 << 20, WriteOpts::default())
            .unwrap();
        let mut all = Vec::new();
        let mut pos = 0;
        while pos < d.size() {
            let ext = d.map(pos, d.size() - pos).unwrap();
            assert!(!ext.is_empty());
            assert_eq!(ext[0].offset, pos);
            pos = ext.last().unwrap().end();
            all.extend(ext);
        }
        crate::coalesce(&mut all);
        assert!(all.iter().any(|e| e.kind == ExtentKind::Data
            && e.offset <= 1 << 20
            && e.end() >= (1 << 20) + 65536));
        assert_eq!(all.first().unwrap().kind, ExtentKind::Hole);
    }

    #[test]
    fn fully_allocated_file_maps_as_one_data_extent_until_a_hole_is_punched() {
        let (t, d) = disk(1 << 20);
        d.write_at(&vec![5u8; 1 << 20], 0, WriteOpts::default())
            .unwrap();
        d.flush().unwrap();
        let ext = d.map(4096, 8192).unwrap();
        assert_eq!(
            ext,
            vec![Extent {
                offset: 4096,
                len: 8192,
                kind: ExtentKind::Data
            }]
        );
        // Punch a large hole: allocation drops below the size, and the map
        // reports the hole again.
        d.discard(0, 512 << 10, WriteOpts::default()).unwrap();
        let ext = d.map(0, 4096).unwrap();
        assert_eq!(ext[0].kind, ExtentKind::Hole, "{ext:?}");
        drop(t);
    }

    #[test]
    fn zeroes_and_discard_read_back_zero() {
        let (_t, d) = disk(1 << 20);
        d.write_at(&[9u8; 65536], 0, WriteOpts::default()).unwrap();
        d.write_zeroes(
            4096,
            8192,
            ZeroOpts {
                may_unmap: false,
                ..Default::default()
            },
        )
        .unwrap();
        d.discard(32768, 32768, WriteOpts::default()).unwrap();
        let mut b = vec![0u8; 65536];
        d.read_at(&mut b, 0).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 9));
        assert!(b[4096..12288].iter().all(|&x| x == 0));
        assert!(b[12288..32768].iter().all(|&x| x == 9));
        assert!(b[32768..].iter().all(|&x| x == 0));
    }
}
