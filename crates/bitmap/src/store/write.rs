//! The write path: declaring a write before it is issued and marking the
//! bitmaps once it is done (see the crate documentation for the protocol).

use std::sync::atomic::Ordering;

use super::{BitmapStore, StoreError};

impl BitmapStore {
    /// Declare a write of `[offset, offset + len)` that is about to be
    /// issued. When this returns `Ok`, the write is crash safe: whatever
    /// happens next, the range will be found dirty after a restart. Do the
    /// data write only after this returns `Ok`, then call
    /// [`WriteGuard::complete`] before acknowledging it.
    ///
    /// Cheap unless the range enters an intent extent that is not armed:
    /// then one intent record is written and fdatasync'ed.
    pub fn begin_write(&self, offset: u64, len: u64) -> Result<WriteGuard<'_>, StoreError> {
        let slot = self.gate.enter();
        if self.closed.load(Ordering::SeqCst) {
            self.gate.exit(slot);
            return Err(StoreError::Closed);
        }
        if let Some(p) = &self.persist
            && len > 0
            && offset < self.size
        {
            let end = offset.saturating_add(len).min(self.size);
            let (first, last) = (offset >> p.extent_shift, (end - 1) >> p.extent_shift);
            if !p.all_armed(first, last)
                && let Err(e) = self.arm(p, first, last)
            {
                self.gate.exit(slot);
                return Err(e);
            }
        }
        Ok(WriteGuard {
            store: self,
            slot,
            offset,
            len,
            done: false,
        })
    }

    /// Complete a write begun with [`begin_write`](Self::begin_write) and
    /// turned into a ticket: marks every enabled bitmap. Call exactly once
    /// per ticket, with the same range.
    pub fn complete_ticket(&self, ticket: WriteTicket, offset: u64, len: u64) {
        self.finish(ticket.0 as usize, offset, len);
    }

    fn finish(&self, slot: usize, offset: u64, len: u64) {
        if len > 0 {
            for e in self.bitmaps.read().iter() {
                if e.enabled.load(Ordering::Acquire) {
                    e.bitmap.mark(offset, len);
                }
            }
        }
        self.gate.exit(slot);
    }
}

/// A declared write (see [`BitmapStore::begin_write`]). Completing it, or
/// dropping it, marks the range in every enabled bitmap; a write that
/// failed may have partly reached the disk, so it is marked too.
#[derive(Debug)]
#[must_use = "complete the guard after the data write"]
pub struct WriteGuard<'a> {
    store: &'a BitmapStore,
    slot: usize,
    offset: u64,
    len: u64,
    done: bool,
}

impl WriteGuard<'_> {
    /// Mark the range in every enabled bitmap. Call after the data write
    /// and before acknowledging it.
    pub fn complete(mut self) {
        self.done = true;
        self.store.finish(self.slot, self.offset, self.len);
    }

    /// Detach the guard from its borrow, for callers that keep a plain
    /// token between the two halves of a write; finish it with
    /// [`BitmapStore::complete_ticket`].
    pub fn into_ticket(mut self) -> WriteTicket {
        self.done = true;
        WriteTicket(self.slot as u64)
    }
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.done = true;
            self.store.finish(self.slot, self.offset, self.len);
        }
    }
}

/// A begun write detached from its guard (see [`WriteGuard::into_ticket`]).
#[derive(Debug, PartialEq, Eq)]
pub struct WriteTicket(u64);

impl WriteTicket {
    /// The ticket as a plain number, for observer tokens.
    pub fn into_raw(self) -> u64 {
        self.0
    }

    /// Rebuild a ticket from [`into_raw`](Self::into_raw).
    pub fn from_raw(raw: u64) -> Self {
        Self(raw & 1)
    }
}
