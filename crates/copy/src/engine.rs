//! [`Copier`]: copies ranges of a source disk into a [`CopySink`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use understudy_bitmap::{DirtyBitmap, Taken};
use understudy_block::Disk;

use crate::error::CopyError;
use crate::progress::{CopyEvent, Progress};
use crate::sink::{BlockHash, CopySink, local_hashes};
use crate::throttle::Throttle;

/// Blocks per hash request of [`Copier::hash_resync`] and [`Copier::verify`].
pub const HASH_BATCH: u64 = 4096;

/// How a [`Copier`] copies.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// Largest piece read and written at once. No default.
    pub chunk: usize,
    /// Bytes per second (`None`: unlimited). Default: unlimited.
    pub bandwidth: Option<u64>,
    /// During [`Copier::bulk`], flush the sink after this many bytes...
    /// Default: 64 MiB.
    pub checkpoint: u64,
    /// ...or after this long, whichever comes first. Default: 1 s.
    pub checkpoint_interval: Duration,
}

impl CopyOptions {
    /// Defaults, with pieces of `chunk` bytes.
    pub fn new(chunk: usize) -> Self {
        Self {
            chunk,
            bandwidth: None,
            checkpoint: 64 << 20,
            checkpoint_interval: Duration::from_secs(1),
        }
    }
}

/// What [`Copier::verify`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Verified {
    /// Blocks compared (blocks the sink changed on its own are skipped).
    pub blocks: u64,
    /// Of which differed.
    pub mismatched: u64,
}

type R<T, S> = Result<T, CopyError<<S as CopySink>::Error>>;

/// Copies from `source` into a sink `S`, honouring the rate limit and a
/// cancel flag, and reporting to a [`Progress`].
pub struct Copier<'a, S: CopySink> {
    source: &'a dyn Disk,
    sink: S,
    progress: &'a dyn Progress,
    cancel: Option<&'a AtomicBool>,
    opts: CopyOptions,
    throttle: Throttle,
    buf: Vec<u8>,
    data_bytes: u64,
}

impl<S: CopySink> std::fmt::Debug for Copier<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Copier")
            .field("opts", &self.opts)
            .field("data_bytes", &self.data_bytes)
            .finish()
    }
}

impl<'a, S: CopySink> Copier<'a, S> {
    /// Copy from `source` into `sink` with `opts` on the real clock.
    pub fn new(
        source: &'a dyn Disk,
        sink: S,
        progress: &'a dyn Progress,
        opts: CopyOptions,
    ) -> Self {
        let throttle = Throttle::new(opts.bandwidth);
        Self::with_throttle(source, sink, progress, opts, throttle)
    }

    /// Like [`Copier::new`] with a given throttle (tests pass one on a
    /// fake clock); `opts.bandwidth` is ignored.
    pub fn with_throttle(
        source: &'a dyn Disk,
        sink: S,
        progress: &'a dyn Progress,
        opts: CopyOptions,
        throttle: Throttle,
    ) -> Self {
        Self {
            source,
            sink,
            progress,
            cancel: None,
            opts,
            throttle,
            buf: Vec::new(),
            data_bytes: 0,
        }
    }

    /// Stop with [`CopyError::Cancelled`] before the next piece once `flag`
    /// is set (`None`: never, as during a switch-over).
    pub fn set_cancel(&mut self, flag: Option<&'a AtomicBool>) {
        self.cancel = flag;
    }

    /// The sink.
    pub fn sink(&self) -> &S {
        &self.sink
    }

    /// Data bytes written to the sink so far.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// Give the sink back.
    pub fn into_sink(self) -> S {
        self.sink
    }

    fn check(&self) -> R<(), S> {
        if self.cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
            return Err(CopyError::Cancelled);
        }
        self.sink
            .check()
            .map_err(|source| CopyError::Sink { source })
    }

    /// Copy `[off, off + len)`; returns the data bytes written. With `map`,
    /// parts that read as zeroes go as zero ranges; without, everything is
    /// read and written as data.
    pub fn copy(&mut self, off: u64, len: u64, map: bool) -> R<u64, S> {
        let end = off + len;
        let mut pos = off;
        let mut sent = 0;
        while pos < end {
            self.check()?;
            let n = (end - pos).min(self.opts.chunk as u64);
            let extents = if map {
                self.source.map(pos, n).map_err(|source| CopyError::Map {
                    offset: pos,
                    len: n,
                    source,
                })?
            } else {
                Vec::new()
            };
            let (data, n) = match extents.first() {
                Some(e) if e.len > 0 => (!e.kind.reads_zero(), e.len.min(end - pos)),
                _ => (true, n),
            };
            let lock = self.sink.lock(pos, n);
            let r = self.piece(pos, n, data);
            self.sink.unlock(lock);
            r?;
            if data {
                sent += n;
                self.throttle.account(n);
                self.data_bytes += n;
                self.progress.report(CopyEvent::Data { bytes: n });
            }
            pos += n;
        }
        Ok(sent)
    }

    fn piece(&mut self, pos: u64, n: u64, data: bool) -> R<(), S> {
        if !data {
            return self.sink.zero(pos, n).map_err(|source| CopyError::Zero {
                offset: pos,
                len: n,
                source,
            });
        }
        self.buf.resize(n as usize, 0);
        self.source
            .read_at(&mut self.buf, pos)
            .map_err(|source| CopyError::Read {
                offset: pos,
                len: n,
                source,
            })?;
        self.sink
            .write(pos, &self.buf)
            .map_err(|source| CopyError::Write {
                offset: pos,
                len: n,
                source,
            })
    }

    /// Make the sink durable.
    pub fn flush(&mut self) -> R<(), S> {
        self.sink
            .flush()
            .map_err(|source| CopyError::Flush { source })
    }

    /// Copy every range of `todo`, flushing the sink at each checkpoint
    /// (so an interrupted copy can resume from what is durable).
    pub fn bulk(&mut self, todo: &[(u64, u64)], map: bool) -> R<(), S> {
        self.progress.report(CopyEvent::Planned {
            bytes: todo.iter().map(|r| r.1).sum(),
        });
        let mut since = 0;
        let mut last = self.throttle.elapsed();
        // Split so checkpoints fall inside large extents too.
        let piece = self.opts.checkpoint.clamp(1, 1 << 20);
        for &(o, l) in todo {
            let mut pos = o;
            while pos < o + l {
                let n = (o + l - pos).min(piece);
                self.copy(pos, n, map)?;
                self.progress.report(CopyEvent::Done { bytes: n });
                since += n;
                pos += n;
                let now = self.throttle.elapsed();
                if since >= self.opts.checkpoint
                    || now.saturating_sub(last) >= self.opts.checkpoint_interval
                {
                    self.flush()?;
                    since = 0;
                    last = now;
                }
            }
        }
        Ok(())
    }

    /// Take `dirty` and copy what it marks. The caller commits the take
    /// once the sink holds the data durably; dropping it merges the bits
    /// back, so a failed round loses nothing.
    pub fn take_and_copy(&mut self, dirty: &Arc<DirtyBitmap>) -> R<Taken, S> {
        let taken = dirty.take().map_err(|source| CopyError::Take { source })?;
        let ranges: Vec<(u64, u64)> = taken.dirty_ranges().collect();
        for (o, l) in ranges {
            self.copy(o, l, true)?;
        }
        Ok(taken)
    }

    /// One whole round: take `dirty`, copy, flush, commit the take.
    /// Returns the data bytes written.
    pub fn round(&mut self, dirty: &Arc<DirtyBitmap>) -> R<u64, S> {
        let before = self.data_bytes;
        let taken = self.take_and_copy(dirty)?;
        self.flush()?;
        taken.commit();
        Ok(self.data_bytes - before)
    }

    fn batch(&mut self, off: u64, len: u64, block: u64) -> R<(Vec<BlockHash>, Vec<BlockHash>), S> {
        let theirs = self
            .sink
            .hashes(off, len, block)
            .map_err(|source| CopyError::Hashes {
                offset: off,
                len,
                source,
            })?;
        let expected = len.div_ceil(block);
        if theirs.len() as u64 != expected {
            return Err(CopyError::HashCount {
                expected,
                got: theirs.len() as u64,
            });
        }
        let ours = local_hashes(self.source, off, len, block, &mut self.buf).map_err(|source| {
            CopyError::Read {
                offset: off,
                len,
                source,
            }
        })?;
        Ok((ours, theirs))
    }

    /// Compare the hashes of every `block` on both sides and copy the
    /// blocks that differ.
    pub fn hash_resync(&mut self, block: u64) -> R<(), S> {
        let size = self.source.size();
        self.progress.report(CopyEvent::Planned { bytes: size });
        let mut off = 0;
        while off < size {
            self.check()?;
            let len = (HASH_BATCH * block).min(size - off);
            let (ours, theirs) = self.batch(off, len, block)?;
            for (i, (h, t)) in ours.iter().zip(&theirs).enumerate() {
                if h.hash != t.hash {
                    let o = off + i as u64 * block;
                    self.copy(o, block.min(size - o), true)?;
                }
            }
            self.progress.report(CopyEvent::Done { bytes: len });
            off += len;
        }
        Ok(())
    }

    /// Compare the hashes of every `block` on both sides (blocks the sink
    /// marks changed are skipped) and count the ones that differ.
    pub fn verify(&mut self, block: u64) -> R<Verified, S> {
        let size = self.source.size();
        let mut v = Verified::default();
        let mut off = 0;
        while off < size {
            let len = (HASH_BATCH * block).min(size - off);
            let (ours, theirs) = self.batch(off, len, block)?;
            for (i, (h, t)) in ours.iter().zip(&theirs).enumerate() {
                if t.changed {
                    continue;
                }
                v.blocks += 1;
                if h.hash != t.hash {
                    v.mismatched += 1;
                    tracing::error!(offset = off + i as u64 * block, "verify: block differs");
                }
            }
            off += len;
        }
        Ok(v)
    }
}
