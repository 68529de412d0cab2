//! The block filter: a [`Disk`] that wraps another and tells observers
//! about every write.
//!
//! ```text
//!   NBD server / migration / replication
//!                 │  Disk
//!            FilterDisk ──▶ observers, in order:
//!                 │           BitmapObserver (dirty bitmaps, crash safe)
//!                 │           … a mirror to a peer, an I/O hold gate …
//!                 │  Disk
//!        RawDisk / Qcow2Disk
//! ```
//!
//! Every write, write-zeroes and discard runs
//! `before_write` on each observer (in order) → the inner operation →
//! `after_write` on each observer (in reverse order) → return. Reads and
//! map pass straight through; flush and order run on the inner disk and
//! then past each observer's `after_flush` (a replica makes the flush
//! durable on its peer there; dirty bitmaps are crash safe through their
//! intent log, so a flush owes them nothing).
//!
//! If the inner operation fails, `after_write` still runs (with the error):
//! the range may be partly written, so the bitmaps mark it. If an observer
//! refuses in `before_write`, the inner operation is not done, the
//! observers that already accepted get `after_write` with the refusal, and
//! the caller gets an error.
//!
//! Observers can be added and removed at run time. [`FilterDisk::add_observer`]
//! waits for writes in flight, so every write that starts after it returns
//! is seen by the new observer and every earlier one has completed. Put
//! gates (observers that block in `before_write`) first, so a held write
//! holds nothing of the observers after it.
#![warn(missing_docs)]

use std::fmt;
// Only the tests (which `use super::*`) need `io` since refusals stopped
// being wrapped in `io::Error`; move this into tests.rs when convenient.
#[cfg(test)]
use std::io;
use std::sync::Arc;

use parking_lot::RwLock;
use understudy_bitmap::{BitmapStore, StoreError, WriteTicket};
use understudy_block::{
    BlockError, Disk, DiskInfo, DiskMap, DiskRead, DiskSize, DiskWrite, Epoch, Extent, Result,
    WriteOpts, ZeroOpts, check_range,
};

/// What a write does.
#[derive(Clone, Copy, Debug)]
pub enum WriteKind<'a> {
    /// Write these bytes.
    Data(&'a [u8]),
    /// Make the range read as zeroes.
    Zeroes(ZeroOpts),
    /// Discard the range.
    Discard,
}

/// A data-changing request, as observers see it.
#[derive(Clone, Copy, Debug)]
pub struct WriteOp<'a> {
    /// Start offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// What the request does.
    pub kind: WriteKind<'a>,
    /// FUA and epoch.
    pub opts: WriteOpts,
}

/// A value an observer hands from `before_write` to its `after_write`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteToken(u64);

impl WriteToken {
    /// Wrap an observer-defined value.
    pub fn new(value: u64) -> Self {
        Self(value)
    }

    /// The observer-defined value.
    pub fn get(self) -> u64 {
        self.0
    }
}

/// Why an observer refused a write.
#[derive(Debug, thiserror::Error)]
pub enum ObserverError {
    /// The dirty bitmaps could not make the write crash safe.
    #[error("cannot make the write crash safe in the dirty bitmaps")]
    Bitmaps {
        /// Cause.
        #[source]
        source: StoreError,
    },
    /// Another observer refused.
    #[error("write observer {observer} refused the write")]
    Refused {
        /// Which observer.
        observer: &'static str,
        /// Cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Something that must see every write passing the filter.
///
/// `before_write` runs before the inner operation and may block (a gate) or
/// refuse (then the write fails). `after_write` runs exactly once for every
/// `before_write` that returned `Ok`, after the inner operation (or after a
/// later observer refused), and before the write is acknowledged.
pub trait WriteObserver: Send + Sync + fmt::Debug {
    /// Called before the inner operation.
    fn before_write(&self, op: &WriteOp<'_>) -> std::result::Result<WriteToken, ObserverError>;

    /// Called after it, with its outcome.
    fn after_write(
        &self,
        op: &WriteOp<'_>,
        token: WriteToken,
        outcome: std::result::Result<(), &BlockError>,
    );

    /// Called after the inner disk completed a flush or a write-order
    /// barrier, before the caller gets its answer; an error fails the
    /// flush. A replica uses it to make a flush durable on both sides.
    /// Default: nothing.
    fn after_flush(&self, _barrier: Barrier) -> std::result::Result<(), ObserverError> {
        Ok(())
    }
}

/// What [`WriteObserver::after_flush`] follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Barrier {
    /// A flush: every completed write is durable.
    Flush,
    /// A write-order barrier that closed this epoch.
    Order(Epoch),
}

/// The dirty-bitmap observer: `begin_write` before, `complete` after
/// (whatever the outcome).
#[derive(Debug, Clone)]
pub struct BitmapObserver(pub Arc<BitmapStore>);

impl WriteObserver for BitmapObserver {
    fn before_write(&self, op: &WriteOp<'_>) -> std::result::Result<WriteToken, ObserverError> {
        let guard = self
            .0
            .begin_write(op.offset, op.len)
            .map_err(|source| ObserverError::Bitmaps { source })?;
        Ok(WriteToken(guard.into_ticket().into_raw()))
    }

    fn after_write(
        &self,
        op: &WriteOp<'_>,
        token: WriteToken,
        _outcome: std::result::Result<(), &BlockError>,
    ) {
        // Marked even on failure: the range may be partly written.
        self.0
            .complete_ticket(WriteTicket::from_raw(token.0), op.offset, op.len);
    }
}

/// Dirty runs `(len, dirty)` of bitmap `name` over `[offset, offset + len)`
/// for NBD `qemu:dirty-bitmap:NAME` block status; `None` if there is no
/// such bitmap. May cover only a prefix of the range (callers ask again).
pub fn dirty_extents(
    store: &BitmapStore,
    name: &str,
    offset: u64,
    len: u64,
) -> Option<Vec<(u64, bool)>> {
    store.dirty_extents(name, offset, len)
}

/// Tokens of one write; inline for the usual few observers.
enum Tokens {
    Inline([WriteToken; 4], usize),
    Spilled(Vec<WriteToken>),
}

impl Tokens {
    fn new(n: usize) -> Self {
        if n <= 4 {
            Tokens::Inline([WriteToken::default(); 4], 0)
        } else {
            Tokens::Spilled(Vec::with_capacity(n))
        }
    }

    fn push(&mut self, t: WriteToken) {
        match self {
            Tokens::Inline(a, n) => {
                a[*n] = t;
                *n += 1;
            }
            Tokens::Spilled(v) => v.push(t),
        }
    }

    fn as_slice(&self) -> &[WriteToken] {
        match self {
            Tokens::Inline(a, n) => &a[..*n],
            Tokens::Spilled(v) => v,
        }
    }
}

/// A disk whose writes are reported to observers (see the crate docs).
pub struct FilterDisk {
    inner: Arc<dyn Disk>,
    read_only: bool,
    observers: RwLock<Vec<Arc<dyn WriteObserver>>>,
}

impl fmt::Debug for FilterDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FilterDisk")
            .field("inner", &self.inner)
            .field("observers", &*self.observers.read())
            .finish()
    }
}

impl FilterDisk {
    /// Wrap `inner` with the dirty bitmaps of `store` as the only observer.
    pub fn new(inner: Arc<dyn Disk>, store: Arc<BitmapStore>) -> Self {
        Self::with_observers(inner, vec![Arc::new(BitmapObserver(store))])
    }

    /// Wrap `inner` with the given observers, called in this order.
    pub fn with_observers(inner: Arc<dyn Disk>, observers: Vec<Arc<dyn WriteObserver>>) -> Self {
        Self {
            read_only: inner.info().read_only,
            inner,
            observers: RwLock::new(observers),
        }
    }

    /// The wrapped disk (writes made directly to it are not observed).
    pub fn inner(&self) -> &Arc<dyn Disk> {
        &self.inner
    }

    /// Append an observer. Waits for writes in flight: every write that
    /// starts after this returns is observed.
    pub fn add_observer(&self, observer: Arc<dyn WriteObserver>) {
        self.observers.write().push(observer);
    }

    /// Insert an observer at the front (for gates). Waits like
    /// [`add_observer`](Self::add_observer).
    pub fn add_observer_first(&self, observer: Arc<dyn WriteObserver>) {
        self.observers.write().insert(0, observer);
    }

    /// Remove an observer (compared by pointer). Waits for writes in
    /// flight, so once this returns the observer sees no more calls.
    pub fn remove_observer(&self, observer: &Arc<dyn WriteObserver>) -> bool {
        let mut list = self.observers.write();
        let before = list.len();
        list.retain(|o| !Arc::ptr_eq(o, observer));
        list.len() != before
    }

    /// Number of observers.
    pub fn observer_count(&self) -> usize {
        self.observers.read().len()
    }

    fn observed(&self, op: WriteOp<'_>, io: impl FnOnce() -> Result<()>) -> Result<()> {
        check_range(op.offset, op.len, self.inner.size())?;
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        let observers = self.observers.read();
        let mut tokens = Tokens::new(observers.len());
        for (i, o) in observers.iter().enumerate() {
            match o.before_write(&op) {
                Ok(t) => tokens.push(t),
                Err(e) => {
                    tracing::debug!(offset = op.offset, len = op.len, error = %e, "write refused by an observer");
                    let err = refused(&op, e);
                    for (o, &t) in observers[..i].iter().zip(tokens.as_slice()).rev() {
                        o.after_write(&op, t, Err(&err));
                    }
                    return Err(err);
                }
            }
        }
        let result = io();
        for (o, &t) in observers.iter().zip(tokens.as_slice()).rev() {
            o.after_write(&op, t, result.as_ref().map(|_| ()));
        }
        result
    }
}

impl FilterDisk {
    /// Tell every observer a flush or barrier completed; the first refusal
    /// fails it.
    fn flushed(&self, barrier: Barrier) -> Result<()> {
        for o in self.observers.read().iter() {
            o.after_flush(barrier).map_err(|e| BlockError::Refused {
                op: match barrier {
                    Barrier::Flush => "flush",
                    Barrier::Order(_) => "order",
                },
                offset: 0,
                len: 0,
                source: Box::new(e),
            })?;
        }
        Ok(())
    }
}

/// The block error for a write an observer refused (the observer's error
/// chained as the source, so callers can still reach a `StoreError`).
fn refused(op: &WriteOp<'_>, e: ObserverError) -> BlockError {
    BlockError::Refused {
        op: match op.kind {
            WriteKind::Data(_) => "write",
            WriteKind::Zeroes(_) => "write-zeroes",
            WriteKind::Discard => "discard",
        },
        offset: op.offset,
        len: op.len,
        source: Box::new(e),
    }
}

impl DiskSize for FilterDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
}

impl DiskRead for FilterDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }
}

impl DiskWrite for FilterDisk {
    fn write_at(&self, buf: &[u8], offset: u64, opts: WriteOpts) -> Result<()> {
        let op = WriteOp {
            offset,
            len: buf.len() as u64,
            kind: WriteKind::Data(buf),
            opts,
        };
        self.observed(op, || self.inner.write_at(buf, offset, opts))
    }

    fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> Result<()> {
        let op = WriteOp {
            offset,
            len,
            kind: WriteKind::Zeroes(opts),
            opts: opts.write,
        };
        self.observed(op, || self.inner.write_zeroes(offset, len, opts))
    }

    fn discard(&self, offset: u64, len: u64, opts: WriteOpts) -> Result<()> {
        let op = WriteOp {
            offset,
            len,
            kind: WriteKind::Discard,
            opts,
        };
        self.observed(op, || self.inner.discard(offset, len, opts))
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()?;
        self.flushed(Barrier::Flush)
    }

    fn order(&self) -> Result<Epoch> {
        let epoch = self.inner.order()?;
        self.flushed(Barrier::Order(epoch))?;
        Ok(epoch)
    }
}

impl DiskMap for FilterDisk {
    fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.inner.map(offset, len)
    }
}

impl Disk for FilterDisk {
    fn info(&self) -> DiskInfo {
        self.inner.info()
    }
}

#[cfg(test)]
mod tests;
