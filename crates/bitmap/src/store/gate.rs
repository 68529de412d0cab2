//! The epoch gate: a two-slot counter (sleepable-RCU style) between writers
//! and the persister.
//!
//! Every write enters the gate in [`BitmapStore::begin_write`] and exits it
//! once it has marked the bitmaps. A persist clears the armed bits, then
//! flips the gate and waits only for the writes that entered before the
//! flip (they may have seen the old armed bits); writes entering after it
//! use the other slot and are never blocked.
//!
//! [`BitmapStore::begin_write`]: super::BitmapStore::begin_write

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A word on its own cache line, so the two epoch counters do not share.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Padded(AtomicU64);

/// Two-slot epoch counter (sleepable-RCU style) that lets the persister
/// wait for every write that may have seen the old armed bits, while new
/// writes go on in the other slot and are never blocked.
#[derive(Debug, Default)]
pub(super) struct Gate {
    epoch: AtomicU64,
    active: [Padded; 2],
}

impl Gate {
    pub(super) fn enter(&self) -> usize {
        loop {
            let e = self.epoch.load(Ordering::SeqCst);
            let s = (e & 1) as usize;
            self.active[s].0.fetch_add(1, Ordering::SeqCst);
            // Re-check: if a flip happened in between, this slot may already
            // have been waited for; retry in the current one.
            if self.epoch.load(Ordering::SeqCst) == e {
                return s;
            }
            self.active[s].0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    pub(super) fn exit(&self, slot: usize) {
        let r = self.active[slot & 1]
            .0
            .fetch_update(Ordering::Release, Ordering::Relaxed, |v| v.checked_sub(1));
        if r.is_err() {
            tracing::error!(
                slot,
                "write completed twice; ignoring the second completion"
            );
        }
    }

    /// Start a new epoch and wait until every write that entered the old
    /// one has exited.
    pub(super) fn flip_and_drain(&self) {
        let old = self.epoch.fetch_add(1, Ordering::SeqCst);
        let s = (old & 1) as usize;
        let mut spins = 0u32;
        while self.active[s].0.load(Ordering::SeqCst) != 0 {
            if spins < 64 {
                std::hint::spin_loop();
            } else if spins < 256 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
            spins = spins.saturating_add(1);
        }
    }
}
