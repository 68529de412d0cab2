//! [`RangeLock`]: byte-range locks for a few holders at a time.

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Condvar, Mutex};

/// Byte-range locks (few holders at a time: a linear scan is fine).
///
/// A lock of `[offset, offset + len)` waits while any overlapping range is
/// held. A zero-length lock covers one byte, so it still orders against a
/// write of that offset.
#[derive(Debug, Default)]
pub struct RangeLock {
    held: Mutex<Vec<(u64, u64, u64)>>,
    cv: Condvar,
    next: AtomicU64,
}

impl RangeLock {
    /// Lock `[offset, offset + len)`; returns the id to unlock with (never
    /// 0, so callers may use 0 for "no lock taken").
    pub fn lock(&self, offset: u64, len: u64) -> u64 {
        let end = offset.saturating_add(len.max(1));
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let mut h = self.held.lock();
        while h.iter().any(|&(s, e, _)| s < end && offset < e) {
            self.cv.wait(&mut h);
        }
        h.push((offset, end, id));
        id
    }

    /// Unlock.
    pub fn unlock(&self, id: u64) {
        let mut h = self.held.lock();
        h.retain(|&(_, _, i)| i != id);
        drop(h);
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn disjoint_ranges_do_not_wait() {
        let l = RangeLock::default();
        let a = l.lock(0, 4096);
        let b = l.lock(4096, 4096);
        assert_ne!(a, 0);
        assert_ne!(a, b);
        l.unlock(a);
        l.unlock(b);
    }

    #[test]
    fn overlapping_range_waits_for_unlock() {
        let l = Arc::new(RangeLock::default());
        let first = l.lock(0, 8192);
        let (tx, rx) = mpsc::channel();
        let l2 = l.clone();
        let t = std::thread::spawn(move || {
            let id = l2.lock(4096, 1);
            tx.send(()).ok();
            l2.unlock(id);
        });
        // Still held: the second locker cannot have got it.
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        l.unlock(first);
        assert!(rx.recv_timeout(Duration::from_secs(10)).is_ok());
        t.join().ok();
    }
}
