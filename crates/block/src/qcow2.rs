//! qcow2 images (with backing chains) on top of imago.
//!
//! # Concurrency
//!
//! imago's sync build is made for shared use: every I/O method of
//! `FormatAccess` takes `&self`, the driver is `Send + Sync`, and it
//! serialises what needs serialising internally (L1 table behind an
//! `RwLock`, per-L2-table write locks held from "prepare mapping" to
//! "commit mapping", a mutex around the cluster allocator). Reads, writes,
//! write-zeroes that keep allocations, mapping queries and flushes therefore
//! run concurrently on one shared handle.
//!
//! The exception is anything that *frees* clusters (discard, and
//! write-zeroes with `may_unmap`): a concurrent writer may hold a host
//! offset it looked up a moment earlier, and if that cluster is freed and
//! reused for another guest cluster, the late write lands in someone else's
//! data. imago expresses this by requiring `&mut FormatAccess` for those
//! calls. We map that onto one `RwLock`: I/O takes it shared (uncontended
//! in the common case), cluster-freeing calls take it exclusively.
//!
//! # Allocation map
//!
//! [`DiskMap::map`] follows the backing chain for each range:
//! data in this image (including compressed clusters) is
//! [`ExtentKind::Data`], data in a backing image is
//! [`ExtentKind::Backing`]; zero clusters anywhere in the chain, and holes
//! of a raw backing file, are [`ExtentKind::Zero`]; ranges unallocated in
//! every layer (or past the end of a shorter backing file) are
//! [`ExtentKind::Hole`]. This is what `qemu-img map --output=json` reports
//! as `data && depth == 0`, `data && depth > 0`, `zero && present`, and
//! `!present`.
//!
//! # Zeroes and discard
//!
//! qcow2 can only mark whole clusters as zero. Write-zeroes and discard mark
//! every fully covered cluster and write zero bytes into partially covered
//! edge clusters (unless those already read as zero). `fast_only` fails when
//! that would need zero bytes written. Version 2 images have no zero
//! clusters: write-zeroes writes zero buffers and discard is a no-op.
//!
//! # Exclusive use
//!
//! A writable open takes an exclusive `flock` on the image file, so a second
//! writable handle (in this or another understudy process) fails to open
//! instead of corrupting metadata through a second set of caches. That is
//! also what makes `flush_covers_all_handles` true: there is only one
//! writable handle, and every worker shares it. QEMU locks with byte-range
//! locks, not `flock`, so this does not keep QEMU out; do not point a
//! running VM and a writable `Qcow2Disk` at the same file.
//!
//! # Damaged images
//!
//! Before imago sees a file, the header and the placement of the refcount
//! and L1 tables are checked (imago 0.2.6 trusts them: a refcount table
//! outside the file made its allocator recurse until the stack overflowed).
//! A panic inside imago is caught, reported as an error, and the disk then
//! refuses further requests and does not write back its caches on close.
//!
//! # Costs
//!
//! FUA and flush write back imago's metadata caches and `fsync` the file;
//! imago holds its file lock exclusively during the `fsync`, so other I/O on
//! the same image waits for it.

use std::fs::File as StdFile;
use std::io;
use std::os::fd::AsRawFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use imago::StorageOpenOptions;
use imago::file::File as ImagoFile;
use imago::format::Format as ImagoFormat;
use imago::format::builder::FormatDriverBuilder;
use imago::format::gate::ImplicitOpenGate;
use imago::qcow2::Qcow2;
use imago::{FormatAccess, FormatCreateBuilder, Mapping, ShallowMapping, Storage};
use parking_lot::{
    MappedRwLockReadGuard, MappedRwLockWriteGuard, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard,
};

use crate::raw::RawDisk;
use crate::{
    BlockError, Disk, DiskInfo, DiskMap, DiskRead, DiskSize, DiskWrite, Extent, ExtentKind, Format,
    Result, WriteOpts, ZeroOpts, check_range,
};

/// An image layer as imago exposes it.
type Image = FormatAccess<ImagoFile>;

/// Deepest backing chain we open. Bounds recursion (a chain that loops
/// through files we cannot canonicalise would otherwise recurse until the
/// stack overflows) and the work per mapping query.
pub const MAX_CHAIN_DEPTH: usize = 32;

/// How long a writable open waits for another handle's lock to go away.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_millis(250);
/// Most extents one [`DiskMap::map`] call returns; callers ask again.
const MAX_MAP_EXTENTS: usize = 1024;
/// Most layer lookups one [`DiskMap::map`] call makes.
const MAX_MAP_STEPS: usize = 8192;
/// Size of the zero buffer for version 2 images' write-zeroes.
const ZERO_CHUNK: u64 = 1 << 20;
/// Bytes of the qcow2 header every version has.
const V2_HEADER_LEN: usize = 72;
/// Bytes of the version 3 header (up to and including `header_length`).
const V3_HEADER_LEN: usize = 104;
/// "QFI\xfb".
const QCOW2_MAGIC: u32 = 0x5146_49fb;

/// What we read from the image header before handing the file to imago.
#[derive(Clone, Copy, Debug)]
struct HeaderFacts {
    version: u32,
    cluster_size: u64,
}

/// A qcow2 image and its (read-only) backing chain.
#[derive(Debug)]
pub struct Qcow2Disk {
    path: PathBuf,
    /// Shared for I/O, exclusive for cluster-freeing operations (see the
    /// module docs). `None` only while being dropped.
    image: RwLock<Option<Image>>,
    size: u64,
    read_only: bool,
    header: HeaderFacts,
    /// The raw file at the bottom of the chain, if any, opened a second
    /// time so `map` can tell its holes from its data.
    raw_base: Option<(PathBuf, RawDisk)>,
    /// Set when imago panicked on this image: its internal state may be
    /// inconsistent, so every later request fails instead.
    failed: AtomicBool,
    /// Holds the `flock` of a writable open; dropped last so the lock
    /// outlives imago's final flush.
    _lock: Option<StdFile>,
}

impl Qcow2Disk {
    /// Open a qcow2 image and its backing chain (backing images are always
    /// opened read-only; a writable open locks the image file exclusively).
    pub fn open(path: &Path, read_only: bool) -> Result<Self> {
        Self::open_inner(path, read_only, None)
    }

    /// Create (or truncate) a qcow2 v3 image of `size` bytes with 64 KiB
    /// clusters and open it read-write.
    ///
    /// `backing` names a backing image and its format; the name is stored
    /// as given, so a relative path is relative to the new image's
    /// directory (as with `qemu-img create -b`). The backing image must
    /// exist: it is opened right away.
    pub fn create(path: &Path, size: u64, backing: Option<(&Path, Format)>) -> Result<Self> {
        let fmt_err = |reason: String| BlockError::Format {
            path: path.to_owned(),
            format: "qcow2",
            reason,
        };
        let backing = match backing {
            Some((p, f)) => {
                // Check before touching the target, so a typo does not
                // leave an image behind that cannot be opened.
                let resolved = path.parent().unwrap_or(Path::new(".")).join(p);
                if let Err(source) = std::fs::metadata(&resolved) {
                    return Err(BlockError::BackingMissing {
                        path: path.to_owned(),
                        backing: resolved,
                        source,
                    });
                }
                let name = p.to_str().ok_or_else(|| {
                    fmt_err(format!(
                        "backing path {} is not valid UTF-8; rename the backing file",
                        p.display()
                    ))
                })?;
                Some((name.to_owned(), f.name().to_owned()))
            }
            None => None,
        };
        let open_err = |source| BlockError::Open {
            path: path.to_owned(),
            source,
        };
        // Lock before truncating so we never destroy an image that another
        // handle has open for writing.
        let lock_file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(open_err)?;
        lock_exclusive(&lock_file).map_err(|e| locked_error(path, e))?;
        lock_file.set_len(0).map_err(open_err)?;

        let storage = ImagoFile::open(
            StorageOpenOptions::new()
                .filename(path)
                .write(true)
                .direct(false),
        )
        .map_err(open_err)?;
        let mut builder = Qcow2::<ImagoFile>::create_builder(storage).size(size);
        if let Some((name, format)) = backing {
            builder = builder.backing(name, format);
        }
        let created = catch_imago(path, "qcow2 create", || builder.create())
            .and_then(|r| {
                r.map_err(|source| BlockError::Create {
                    path: path.to_owned(),
                    format: "qcow2",
                    source,
                })
            })
            .and_then(|()| Self::open_inner(path, false, Some(lock_file)));
        if created.is_err() {
            // Do not leave a half-made image behind (we truncated or
            // created it under our lock a moment ago).
            let _ = std::fs::remove_file(path);
        }
        let disk = created?;
        tracing::debug!(path = %path.display(), size, "created qcow2 image");
        Ok(disk)
    }

    fn open_inner(path: &Path, read_only: bool, lock: Option<StdFile>) -> Result<Self> {
        let open_err = |source| BlockError::Open {
            path: path.to_owned(),
            source,
        };
        let fmt_err = |reason: String| BlockError::Format {
            path: path.to_owned(),
            format: "qcow2",
            reason,
        };
        let lock = match lock {
            Some(l) => Some(l),
            None if read_only => None,
            None => {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(open_err)?;
                lock_exclusive(&f).map_err(|e| locked_error(path, e))?;
                Some(f)
            }
        };
        let header = read_header_facts(path, !read_only).map_err(|e| match e {
            HeaderError::Io(source) => open_err(source),
            HeaderError::Invalid(reason) => fmt_err(reason),
        })?;

        let top_canonical = std::fs::canonicalize(path).map_err(open_err)?;
        let shared = Arc::new(Mutex::new(ChainLog::default()));
        let gate = ChainGate {
            depth: 0,
            read_only,
            seen: vec![top_canonical],
            log: Arc::clone(&shared),
        };
        let storage = ImagoFile::open(
            StorageOpenOptions::new()
                .filename(path)
                .write(!read_only)
                .direct(false),
        )
        .map_err(open_err)?;
        let image = catch_imago(path, "qcow2 open", || {
            Qcow2::<ImagoFile>::builder(storage)
                .write(!read_only)
                .open(gate)
                .map(FormatAccess::new)
        })?
        .map_err(|source| BlockError::Image {
            path: path.to_owned(),
            format: "qcow2",
            source,
        })?;

        let raw_base = match shared.lock().raw_base.take() {
            Some(p) => {
                let disk = RawDisk::open(&p, true)?;
                Some((p, disk))
            }
            None => None,
        };
        let size = image.size();
        tracing::debug!(
            path = %path.display(),
            size,
            version = header.version,
            cluster_size = header.cluster_size,
            read_only,
            raw_base = ?raw_base.as_ref().map(|(p, _)| p),
            "opened qcow2 image"
        );
        Ok(Self {
            path: path.to_owned(),
            image: RwLock::new(Some(image)),
            size,
            read_only,
            header,
            raw_base,
            failed: AtomicBool::new(false),
            _lock: lock,
        })
    }

    /// The image file this disk was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Cluster size in bytes (the granularity of allocation, zeroing and
    /// discard).
    pub fn cluster_size(&self) -> u64 {
        self.header.cluster_size
    }

    /// qcow2 version (2 or 3) from the image header.
    pub fn version(&self) -> u32 {
        self.header.version
    }

    /// Whether the image has zero clusters (version 3).
    fn has_zero_clusters(&self) -> bool {
        self.header.version >= 3
    }

    /// The image, for requests that may run concurrently.
    fn shared(&self) -> Result<MappedRwLockReadGuard<'_, Image>> {
        RwLockReadGuard::try_map(self.image.read(), Option::as_ref).map_err(|_| self.closed())
    }

    /// The image, alone: for requests that free clusters.
    fn exclusive(&self) -> Result<MappedRwLockWriteGuard<'_, Image>> {
        RwLockWriteGuard::try_map(self.image.write(), Option::as_mut).map_err(|_| self.closed())
    }

    fn closed(&self) -> BlockError {
        BlockError::Backend {
            op: "qcow2 request",
            reason: format!("{} is closed; reopen it", self.path.display()),
        }
    }

    /// Run an imago call, turning a panic into an error and refusing all
    /// later calls (imago's state may be half-updated).
    fn guarded<T>(&self, op: &'static str, f: impl FnOnce() -> T) -> Result<T> {
        if self.failed.load(Ordering::Acquire) {
            return Err(BlockError::Backend {
                op,
                reason: format!(
                    "an earlier request on {} failed inside imago; reopen the image after \
                     running `qemu-img check` on it",
                    self.path.display()
                ),
            });
        }
        catch_imago(&self.path, op, f).inspect_err(|_| {
            self.failed.store(true, Ordering::Release);
        })
    }

    fn check_writable(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, len, self.size)
    }

    /// Write back imago's metadata caches and fsync the image file.
    fn flush_sync(img: &Image) -> io::Result<()> {
        img.flush()?;
        img.sync()
    }

    /// Whether the partial clusters at the edges of `[offset, offset + len)`
    /// already read as zero, i.e. whether imago can zero the range without
    /// writing zero bytes. Uses imago's own notion of "reads as zero" (the
    /// one its write-zeroes consults), not ours.
    fn edges_read_zero(&self, img: &Image, offset: u64, len: u64) -> io::Result<bool> {
        let cs = self.header.cluster_size;
        let end = offset + len;
        let head_start = offset - offset % cs;
        let tail_end = end.next_multiple_of(cs).min(self.size);
        let mut edges = Vec::with_capacity(2);
        if head_start < offset {
            edges.push((head_start, offset));
        }
        if end < tail_end && !end.is_multiple_of(cs) {
            edges.push((end, tail_end));
        }
        for (mut pos, stop) in edges {
            while pos < stop {
                let (m, n) = img.get_mapping(pos, stop - pos)?;
                match m {
                    Mapping::Zero { .. } if n > 0 => pos += n,
                    _ => return Ok(false),
                }
            }
        }
        Ok(true)
    }

    /// Whether `[offset, offset + len)` covers at least one whole cluster
    /// (the last, partial cluster of the image counts as whole), i.e.
    /// whether there is anything to deallocate.
    fn covers_whole_cluster(&self, offset: u64, len: u64) -> bool {
        let cs = self.header.cluster_size;
        let end = offset + len;
        let first = offset.next_multiple_of(cs);
        let last = if end == self.size {
            end.next_multiple_of(cs)
        } else {
            end - end % cs
        };
        last > first
    }

    /// Make a range of a version 3 image read as zero: whole clusters
    /// become zero clusters (deallocated if `unmap`), partial ones get
    /// zero bytes unless they already read as zero.
    fn zero_clusters(
        &self,
        op: &'static str,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<io::Result<()>> {
        if unmap && self.covers_whole_cluster(offset, len) {
            // Frees clusters: nobody else may hold a mapping meanwhile.
            let mut img = self.exclusive()?;
            self.guarded(op, || img.discard_to_zero(offset, len))
        } else {
            // Nothing to deallocate (or keeping allocations): this never
            // invalidates another request's mapping, so it runs shared.
            let img = self.shared()?;
            self.guarded(op, || img.write_zeroes(offset, len))
        }
    }

    /// Write zero buffers (version 2 images, which have no zero clusters).
    fn write_zero_buffers(img: &Image, offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; ZERO_CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK) as usize;
            img.write(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Classify the range starting at `offset` (at most `len` bytes) by
    /// following the backing chain. Returns the kind and how many bytes
    /// (at least 1) it covers.
    fn resolve(&self, top: &Image, offset: u64, len: u64) -> io::Result<(ExtentKind, u64)> {
        let mut layer = top;
        let mut off = offset;
        let mut len = len;
        // One step per layer; the gate bounds the chain length.
        for depth in 0..=MAX_CHAIN_DEPTH {
            let data = if depth == 0 {
                ExtentKind::Data
            } else {
                ExtentKind::Backing
            };
            let (m, n) = layer.get_shallow_mapping(off, len)?;
            if n == 0 {
                // Past the end of a (shorter) backing image: reads as zero,
                // allocated nowhere.
                return Ok((ExtentKind::Hole, len));
            }
            let n = n.min(len);
            match m {
                ShallowMapping::Raw {
                    storage, offset, ..
                } => {
                    if layer.inner().format() == ImagoFormat::Raw {
                        return Ok(self.refine_raw_base(storage, offset, n));
                    }
                    return Ok((data, n));
                }
                ShallowMapping::Zero { explicit: true, .. } => return Ok((ExtentKind::Zero, n)),
                ShallowMapping::Zero {
                    explicit: false, ..
                } => return Ok((ExtentKind::Hole, n)),
                ShallowMapping::Indirect {
                    layer: next,
                    offset: next_off,
                    ..
                } => {
                    layer = next;
                    off = next_off;
                    len = n;
                }
                ShallowMapping::Eof { .. } => return Ok((ExtentKind::Hole, len)),
                // Compressed clusters and anything newer imago may add:
                // reporting data is always safe (it is copied, not skipped).
                _ => return Ok((data, n)),
            }
        }
        Err(io::Error::other(format!(
            "backing chain deeper than {MAX_CHAIN_DEPTH} layers"
        )))
    }

    /// Split a range of the raw backing file into backing data and holes.
    /// Falls back to backing data (always safe) when the file is not the
    /// one we know. A raw file is never the top layer.
    fn refine_raw_base(&self, storage: &ImagoFile, offset: u64, len: u64) -> (ExtentKind, u64) {
        let Some((path, raw)) = self.raw_base.as_ref() else {
            return (ExtentKind::Backing, len);
        };
        if storage.get_filename().as_deref() != Some(path.as_path()) {
            return (ExtentKind::Backing, len);
        }
        match raw.map(offset, len) {
            Ok(ext) => match ext.first() {
                Some(e) => {
                    let kind = match e.kind {
                        ExtentKind::Data | ExtentKind::Backing => ExtentKind::Backing,
                        // Present in the chain (the raw layer covers it)
                        // but reads as zero: what QEMU calls zero+present.
                        ExtentKind::Zero | ExtentKind::Hole => ExtentKind::Zero,
                    };
                    (kind, e.len.clamp(1, len))
                }
                None => (ExtentKind::Backing, len),
            },
            Err(e) => {
                tracing::debug!(path = %path.display(), "raw backing map failed, reporting data: {e}");
                (ExtentKind::Backing, len)
            }
        }
    }
}

impl Drop for Qcow2Disk {
    fn drop(&mut self) {
        let Some(img) = self.image.get_mut().take() else {
            return;
        };
        if !self.failed.load(Ordering::Acquire) && !self.read_only {
            // Flush here, guarded, so imago's own flush-on-drop finds
            // nothing left to do and cannot panic outside our guard.
            match catch_imago(&self.path, "qcow2 close", || img.flush()) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(path = %self.path.display(), "flushing on close failed: {e}");
                }
                Err(_) => self.failed.store(true, Ordering::Release),
            }
        }
        if self.failed.load(Ordering::Acquire) {
            // imago panicked mid-request: its cached metadata may be half
            // updated, and writing it back could corrupt the image. Leak it
            // instead (the file stays as the last successful flush left it).
            tracing::error!(
                path = %self.path.display(),
                "not writing back cached qcow2 metadata after an internal failure; \
                 run `qemu-img check` on the image"
            );
            std::mem::forget(img);
        }
    }
}

impl DiskSize for Qcow2Disk {
    fn size(&self) -> u64 {
        self.size
    }
}

impl DiskRead for Qcow2Disk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        check_range(offset, len, self.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        let img = self.shared()?;
        self.guarded("qcow2 read", || img.read(&mut *buf, offset))?
            .map_err(|source| BlockError::Read {
                offset,
                len,
                source,
            })
    }
}

impl DiskWrite for Qcow2Disk {
    fn write_at(&self, buf: &[u8], offset: u64, opts: WriteOpts) -> Result<()> {
        let len = buf.len() as u64;
        self.check_writable(offset, len)?;
        let img = self.shared()?;
        self.guarded("qcow2 write", || {
            if !buf.is_empty() {
                img.write(buf, offset)?;
            }
            if opts.fua {
                Self::flush_sync(&img)?;
            }
            Ok(())
        })?
        .map_err(|source| BlockError::Write {
            offset,
            len,
            source,
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> Result<()> {
        self.check_writable(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let err = |source| BlockError::WriteZeroes {
            offset,
            len,
            source,
        };
        if opts.fast_only {
            if !self.has_zero_clusters() {
                return Err(BlockError::NotSupported(
                    "fast write-zeroes on a qcow2 version 2 image",
                ));
            }
            let img = self.shared()?;
            let fast = self
                .guarded("qcow2 write-zeroes", || {
                    self.edges_read_zero(&img, offset, len)
                })?
                .map_err(err)?;
            if !fast {
                return Err(BlockError::NotSupported(
                    "fast write-zeroes of partial qcow2 clusters",
                ));
            }
        }
        let res = if !self.has_zero_clusters() {
            let img = self.shared()?;
            self.guarded("qcow2 write-zeroes", || {
                Self::write_zero_buffers(&img, offset, len)
            })?
        } else {
            self.zero_clusters("qcow2 write-zeroes", offset, len, opts.may_unmap)?
        };
        res.map_err(err)?;
        if opts.write.fua {
            let img = self.shared()?;
            self.guarded("qcow2 flush", || Self::flush_sync(&img))?
                .map_err(err)?;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64, opts: WriteOpts) -> Result<()> {
        self.check_writable(offset, len)?;
        if len == 0 || !self.has_zero_clusters() {
            // Discard is advisory; version 2 images cannot deallocate
            // safely, so doing nothing is the correct answer there.
            return Ok(());
        }
        let err = |source| BlockError::Discard {
            offset,
            len,
            source,
        };
        self.zero_clusters("qcow2 discard", offset, len, true)?
            .map_err(err)?;
        if opts.fua {
            let img = self.shared()?;
            self.guarded("qcow2 flush", || Self::flush_sync(&img))?
                .map_err(err)?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let img = self.shared()?;
        self.guarded("qcow2 flush", || Self::flush_sync(&img))?
            .map_err(|source| BlockError::Flush { source })
    }
}

impl DiskMap for Qcow2Disk {
    fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let end = offset + len;
        let img = self.shared()?;
        self.guarded("qcow2 map", || {
            let mut out: Vec<Extent> = Vec::new();
            let mut pos = offset;
            let mut steps = 0;
            while pos < end && steps < MAX_MAP_STEPS {
                steps += 1;
                let (kind, n) = self.resolve(&img, pos, end - pos)?;
                let n = n.clamp(1, end - pos);
                let full = out.len() == MAX_MAP_EXTENTS;
                match out.last_mut() {
                    Some(last) if last.kind == kind => last.len += n,
                    _ if full => break,
                    _ => out.push(Extent {
                        offset: pos,
                        len: n,
                        kind,
                    }),
                }
                pos += n;
            }
            Ok(out)
        })?
        .map_err(|source| BlockError::Map {
            offset,
            len,
            source,
        })
    }
}

impl Disk for Qcow2Disk {
    fn info(&self) -> DiskInfo {
        let writable_v3 = !self.read_only && self.has_zero_clusters();
        DiskInfo {
            format: Format::Qcow2,
            size: self.size,
            read_only: self.read_only,
            can_discard: writable_v3,
            can_fast_zero: writable_v3,
            // One shared imago handle per image, and the exclusive lock
            // keeps any other writable handle away.
            flush_covers_all_handles: true,
            preferred_block_size: 4096,
        }
    }
}

/// A panic inside imago, caught (see [`BlockError::Panicked`]).
#[derive(Debug, thiserror::Error)]
#[error(
    "imago panicked ({what}); the image is probably corrupt: run `qemu-img check` on it and \
     reopen it"
)]
pub struct ImagoPanic {
    /// The panic message.
    pub what: String,
}

/// Run `f`, turning a panic inside imago into an error: nothing read from
/// an image file may take the process down.
fn catch_imago<T>(path: &Path, op: &'static str, f: impl FnOnce() -> T) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        tracing::error!(op, path = %path.display(), "imago panicked: {what}");
        BlockError::Panicked {
            op,
            path: path.to_owned(),
            source: ImagoPanic { what },
        }
    })
}

/// Take an exclusive `flock` on `f`, waiting at most [`LOCK_WAIT`].
///
/// The short wait is for a lock that is on its way out: a child process
/// forked by any thread shares the descriptor (and so the lock) of a disk
/// that was just closed until the child calls exec.
fn lock_exclusive(f: &StdFile) -> io::Result<()> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        // SAFETY: flock only reads its integer arguments; the descriptor is
        // owned by `f`, which outlives the call.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        let busy = e.raw_os_error() == Some(libc::EWOULDBLOCK);
        if !(busy || e.kind() == io::ErrorKind::Interrupted)
            || std::time::Instant::now() >= deadline
        {
            return Err(e);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn locked_error(path: &Path, e: io::Error) -> BlockError {
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        BlockError::Format {
            path: path.to_owned(),
            format: "qcow2",
            reason: "the image is already open for writing by another handle; close that \
                     handle first (or open this one read-only)"
                .into(),
        }
    } else {
        BlockError::Open {
            path: path.to_owned(),
            source: e,
        }
    }
}

enum HeaderError {
    Io(io::Error),
    Invalid(String),
}

/// Read up to `buf.len()` bytes at `offset`; returns how many were read
/// (fewer only at end of file).
fn read_full_at(f: &StdFile, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Check the header and the placement of the top-level metadata before
/// imago sees the file, and return what we need from it.
///
/// imago trusts these structures: with a refcount table outside the file
/// (which reads back as zeroes) its allocator recursed until the stack
/// overflowed, and with a missing refcount block it places a new one over
/// live metadata. Both are rejected here. For writable opens every refcount
/// table entry that covers the file must point at a refcount block inside
/// it. Images written by QEMU or imago always satisfy these checks.
fn read_header_facts(path: &Path, writable: bool) -> std::result::Result<HeaderFacts, HeaderError> {
    let invalid = |what: String| {
        HeaderError::Invalid(format!(
            "{what}; the image is corrupt: run `qemu-img check -r all` on it"
        ))
    };
    let f = StdFile::open(path).map_err(HeaderError::Io)?;
    let file_len = f.metadata().map_err(HeaderError::Io)?.len();
    let mut hdr = [0u8; V3_HEADER_LEN];
    let got = read_full_at(&f, &mut hdr, 0).map_err(HeaderError::Io)?;
    if got < V2_HEADER_LEN {
        return Err(HeaderError::Invalid(format!(
            "the file is {got} bytes long, shorter than a qcow2 header ({V2_HEADER_LEN} bytes); \
             it is truncated or not a qcow2 image"
        )));
    }
    let be32 = |at: usize| u32::from_be_bytes([hdr[at], hdr[at + 1], hdr[at + 2], hdr[at + 3]]);
    let be64 = |at: usize| u64::from(be32(at)) << 32 | u64::from(be32(at + 4));
    if be32(0) != QCOW2_MAGIC {
        return Err(HeaderError::Invalid(
            "no qcow2 magic; open it as raw if it is a raw image".into(),
        ));
    }
    let version = be32(4);
    if version != 2 && version != 3 {
        return Err(HeaderError::Invalid(format!(
            "qcow2 version {version} is not supported (only 2 and 3)"
        )));
    }
    if version == 3 && got < V3_HEADER_LEN {
        return Err(invalid(format!(
            "the file is {got} bytes long, shorter than a version 3 header"
        )));
    }
    let cluster_bits = be32(20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(invalid(format!(
            "cluster_bits {cluster_bits} is outside 9..=21"
        )));
    }
    let cs = 1u64 << cluster_bits;
    let refcount_order = if version == 3 { be32(96) } else { 4 };
    if refcount_order > 6 {
        return Err(invalid(format!(
            "refcount_order {refcount_order} is above 6"
        )));
    }
    // A table of `bytes` at `off` must be cluster aligned and inside the file.
    let table_in_file =
        |name: &str, off: u64, bytes: u64| -> std::result::Result<(), HeaderError> {
            let end = off.checked_add(bytes);
            if off == 0 || !off.is_multiple_of(cs) || end.is_none_or(|e| e > file_len) {
                return Err(invalid(format!(
                    "the {name} ({bytes} bytes at offset {off}) is not a cluster-aligned range \
                 inside the {file_len}-byte file"
                )));
            }
            Ok(())
        };
    let rt_off = be64(48);
    let rt_bytes = u64::from(be32(56)) * cs;
    table_in_file("refcount table", rt_off, rt_bytes)?;
    let l1_entries = u64::from(be32(36));
    if l1_entries > 0 {
        table_in_file("L1 table", be64(40), l1_entries * 8)?;
    }
    if writable {
        // Each refcount block covers cs * 8 / refcount_bits clusters.
        let rb_clusters = (cs * 8) >> refcount_order;
        let needed = file_len.div_ceil(cs).div_ceil(rb_clusters).max(1);
        if needed * 8 > rt_bytes {
            return Err(invalid(format!(
                "the refcount table ({rt_bytes} bytes) does not cover the {file_len}-byte file"
            )));
        }
        // Bounded by the file size (checked just above), so no
        // attacker-chosen allocation.
        let mut rt = vec![0u8; (needed * 8) as usize];
        let n = read_full_at(&f, &mut rt, rt_off).map_err(HeaderError::Io)?;
        if n < rt.len() {
            return Err(invalid(
                "the refcount table is cut off by the end of the file".into(),
            ));
        }
        for (i, e) in rt.chunks_exact(8).enumerate() {
            let entry = u64::from_be_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
            let rb_off = entry & !0x1ff;
            if rb_off == 0
                || rb_off % cs != 0
                || rb_off.checked_add(cs).is_none_or(|e| e > file_len)
            {
                return Err(invalid(format!(
                    "refcount table entry {i} ({entry:#x}) does not point at a refcount block \
                     inside the file"
                )));
            }
        }
    }
    Ok(HeaderFacts {
        version,
        cluster_size: cs,
    })
}

/// What the gate learned while opening the chain.
#[derive(Debug, Default)]
struct ChainLog {
    /// Path of the raw image at the bottom of the chain.
    raw_base: Option<PathBuf>,
}

/// Opens backing images and data files on behalf of imago: bounds the chain
/// depth, refuses loops, keeps everything read-only for read-only opens,
/// and remembers the raw base image.
#[derive(Debug)]
struct ChainGate {
    depth: usize,
    read_only: bool,
    /// Canonical paths of every file opened so far on this branch.
    seen: Vec<PathBuf>,
    log: Arc<Mutex<ChainLog>>,
}

impl ImplicitOpenGate<ImagoFile> for ChainGate {
    fn open_format<F: FormatDriverBuilder<ImagoFile>>(
        &mut self,
        builder: F,
    ) -> io::Result<FormatAccess<ImagoFile>> {
        if self.depth >= MAX_CHAIN_DEPTH {
            return Err(io::Error::other(format!(
                "backing chain is deeper than {MAX_CHAIN_DEPTH} images; flatten it with \
                 `qemu-img convert` or `qemu-img rebase`"
            )));
        }
        if F::FORMAT == ImagoFormat::Raw {
            self.log.lock().raw_base = builder.get_image_path();
        }
        let child = ChainGate {
            depth: self.depth + 1,
            read_only: self.read_only,
            seen: self.seen.clone(),
            log: Arc::clone(&self.log),
        };
        builder.open(child).map(FormatAccess::new)
    }

    fn open_storage(&mut self, opts: StorageOpenOptions) -> io::Result<ImagoFile> {
        if let Some(name) = opts.get_filename() {
            let canonical = std::fs::canonicalize(name)?;
            if self.seen.contains(&canonical) {
                return Err(io::Error::other(format!(
                    "backing chain loops back to {}; fix it with `qemu-img rebase -u`",
                    canonical.display()
                )));
            }
            self.seen.push(canonical);
        }
        let opts = if self.read_only {
            opts.write(false)
        } else {
            opts
        };
        ImagoFile::open(opts)
    }
}
