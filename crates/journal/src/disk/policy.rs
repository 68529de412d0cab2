//! [`FlushPolicy`], and when the writer thread makes closed epochs durable
//! and applies durable ones: the policy's interval and the idle timer.

use std::time::{Duration, Instant};

use super::state::{Shared, State};

/// Apply journaled epochs after this long without new writes.
const IDLE_APPLY: Duration = Duration::from_millis(50);

/// What `flush` and FUA mean for a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushPolicy {
    /// Flush and FUA mean what NBD says: durable when acknowledged. Closed
    /// epochs are made durable as soon as they close.
    Durable,
    /// Flush becomes write-order: it returns at once, and a closed epoch
    /// becomes durable within `interval` of the flush/order that closed it
    /// (at once for a FUA write). A crash loses at most the last `interval`
    /// of flushed writes, plus writes never followed by a flush or order,
    /// but never reorders them.
    Ordered {
        /// Longest time a closed epoch stays non-durable. Default: 5 s.
        interval: Duration,
    },
}

impl FlushPolicy {
    /// `Ordered` with the default 5 s interval.
    pub fn ordered() -> Self {
        Self::Ordered {
            interval: Duration::from_secs(5),
        }
    }
}

impl Shared {
    pub(super) fn want_durable(&self, st: &State, now: Instant) -> bool {
        if st.closed_upto <= st.durable_epoch {
            return false;
        }
        match self.policy {
            FlushPolicy::Durable => true,
            FlushPolicy::Ordered { interval } => {
                st.durable_wanted > st.durable_epoch
                    || st.space_waiters > 0
                    || st.shutdown
                    || st.used() * 2 > self.cap
                    || st
                        .epochs
                        .range(st.durable_epoch + 1..)
                        .next()
                        .and_then(|(_, e)| e.closed_at)
                        .is_some_and(|t| now >= t + interval)
            }
        }
    }

    pub(super) fn want_apply(&self, st: &State, now: Instant) -> bool {
        st.durable_epoch > st.applied_epoch
            && (st.space_waiters > 0
                || st.shutdown
                || st.used() * 2 > self.cap
                || now >= st.last_activity + IDLE_APPLY)
    }

    pub(super) fn next_deadline(&self, st: &State) -> Option<Instant> {
        let mut d: Option<Instant> = None;
        let mut consider = |t: Instant| d = Some(d.map_or(t, |x| x.min(t)));
        if let FlushPolicy::Ordered { interval } = self.policy {
            // Only closed epochs: closing the open one here would split an
            // epoch at a point the guest never ordered.
            if let Some(t) = st
                .epochs
                .range(st.durable_epoch + 1..)
                .next()
                .and_then(|(_, e)| e.closed_at)
            {
                consider(t + interval);
            }
        }
        if st.durable_epoch > st.applied_epoch {
            consider(st.last_activity + IDLE_APPLY);
        }
        d
    }
}
