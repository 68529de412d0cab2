//! [`SwitchDisk`]: the outermost layer of a writable export. It can hold
//! all I/O (a switch-over) and route it elsewhere.
//!
//! ```text
//!                      ┌── Local ────────▶ the stack's own disk (its filter)   drained by hold()
//!   NBD connections ──▶ SwitchDisk ── Pivot(d) ─────▶ another local stack's disk   drained by hold()
//!     (and forwarded    │  └── Forward(d) ────▶ any Disk: a RemoteDisk to the   not drained
//!      requests)        │                       new owner, a replica, a view
//!                       ├── Fail(msg) ───────▶ every request fails (ownership in doubt)
//!                       └── hold(): write lock — new requests wait, in-flight local ones drain;
//!                           Hold::release(route) sets the route the held requests then take
//! ```
//!
//! The route lives in one writer-preferring `RwLock`. Every request takes
//! its read lock once (the whole hot-path cost, as before the route could
//! pivot), so taking the write lock both waits for in-flight requests and
//! holds new ones. "Held" is therefore not a route but a [`Hold`] guard:
//! held requests are never failed, they run on whatever route is set when
//! the hold ends.
//!
//! `Local` and `Pivot` requests keep the read lock for their duration (a
//! hold drains them). `Forward` requests drop it before they go out: they
//! may wait on another node, which may itself be waiting to commit to us
//! (a migration back). A pivot is for a disk of this host that takes over
//! the export (a merged copy-on-write view, a promoted replica); the
//! export's size and [`DiskInfo`] stay those of the stack's own disk, so a
//! pivot target must have the same size.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{RwLock, RwLockWriteGuard};
use understudy_block::{
    BlockError, Disk, DiskInfo, DiskMap, DiskRead, DiskSize, DiskWrite, Epoch, Extent, Result,
    WriteOpts, ZeroOpts,
};

/// Where requests go (see the module docs).
#[derive(Clone)]
pub enum Route {
    /// The stack's own disk (normally its block filter).
    Local,
    /// Another disk of this host that takes over the export's I/O, like
    /// the stack's own one (requests are drained by a hold). Same size as
    /// the stack's own disk.
    Pivot(Arc<dyn Disk>),
    /// Any other disk (the migration's `RemoteDisk` to the new owner, a
    /// replica): requests are not drained by a hold.
    Forward(Arc<dyn Disk>),
    /// Nowhere: every request fails with this message (ownership in doubt).
    Fail(Arc<str>),
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Route::Local => f.write_str("Local"),
            Route::Pivot(d) => write!(f, "Pivot({d:?})"),
            Route::Forward(d) => write!(f, "Forward({d:?})"),
            Route::Fail(m) => write!(f, "Fail({m})"),
        }
    }
}

/// A disk whose requests can be held and re-routed (see the module docs).
pub struct SwitchDisk {
    local: Arc<dyn Disk>,
    route: RwLock<Route>,
    held_ns_total: AtomicU64,
}

impl fmt::Debug for SwitchDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SwitchDisk")
            .field("local", &self.local)
            .field("route", &*self.route.read())
            .finish()
    }
}

/// All I/O of a [`SwitchDisk`] is held while this lives.
pub struct Hold<'a> {
    guard: RwLockWriteGuard<'a, Route>,
    since: Instant,
    owner: &'a SwitchDisk,
}

impl fmt::Debug for Hold<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hold").field("since", &self.since).finish()
    }
}

impl Hold<'_> {
    /// Set the route the held requests (and all later ones) take, and
    /// release them. Returns how long I/O was held.
    pub fn release(mut self, route: Route) -> Duration {
        *self.guard = route;
        let held = self.since.elapsed();
        self.owner
            .held_ns_total
            .fetch_add(held.as_nanos() as u64, Ordering::Relaxed);
        held
    }

    /// When the hold started (new requests were held from then on).
    pub fn since(&self) -> Instant {
        self.since
    }
}

impl SwitchDisk {
    /// Route everything to `local` (the stack's own disk).
    pub fn new(local: Arc<dyn Disk>) -> Self {
        Self {
            local,
            route: RwLock::new(Route::Local),
            held_ns_total: AtomicU64::new(0),
        }
    }

    /// The stack's own disk (normally the block filter), whatever the route.
    pub fn local(&self) -> &Arc<dyn Disk> {
        &self.local
    }

    /// The current route.
    pub fn route(&self) -> Route {
        self.route.read().clone()
    }

    /// Whether requests go to the stack's own disk (not pivoted, forwarded
    /// or failed).
    pub fn is_local(&self) -> bool {
        matches!(*self.route.read(), Route::Local)
    }

    /// Change the route (waits for in-flight requests).
    pub fn set_route(&self, route: Route) {
        *self.route.write() = route;
    }

    /// Hold new requests and wait up to `drain` for in-flight ones. `None`
    /// if they did not drain in time (nothing is held then).
    pub fn hold(&self, drain: Duration) -> Option<Hold<'_>> {
        // New requests block from the moment we wait (the lock prefers
        // writers), so the hold, and the downtime, starts here.
        let since = Instant::now();
        let guard = self.route.try_write_for(drain)?;
        Some(Hold {
            guard,
            since,
            owner: self,
        })
    }

    /// Total time I/O has been held, over all holds.
    pub fn held_total(&self) -> Duration {
        Duration::from_nanos(self.held_ns_total.load(Ordering::Relaxed))
    }

    fn with<T>(&self, f: impl FnOnce(&dyn Disk) -> Result<T>) -> Result<T> {
        let r = self.route.read();
        match &*r {
            Route::Local => f(&*self.local),
            Route::Pivot(d) => f(&**d),
            Route::Forward(d) => {
                // A forwarded request may wait on the other node, which may
                // be waiting on us (migrating back): do not hold the route
                // across it. Only local I/O is drained by a hold.
                let d = d.clone();
                drop(r);
                f(&*d)
            }
            Route::Fail(m) => Err(BlockError::Backend {
                op: "I/O",
                reason: m.to_string(),
            }),
        }
    }
}

impl DiskSize for SwitchDisk {
    fn size(&self) -> u64 {
        self.local.size()
    }
}

impl DiskRead for SwitchDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.with(|d| d.read_at(buf, offset))
    }
}

impl DiskWrite for SwitchDisk {
    fn write_at(&self, buf: &[u8], offset: u64, opts: WriteOpts) -> Result<()> {
        self.with(|d| d.write_at(buf, offset, opts))
    }
    fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> Result<()> {
        self.with(|d| d.write_zeroes(offset, len, opts))
    }
    fn discard(&self, offset: u64, len: u64, opts: WriteOpts) -> Result<()> {
        self.with(|d| d.discard(offset, len, opts))
    }
    fn flush(&self) -> Result<()> {
        self.with(|d| d.flush())
    }
    fn order(&self) -> Result<Epoch> {
        self.with(|d| d.order())
    }
}

impl DiskMap for SwitchDisk {
    fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.with(|d| d.map(offset, len))
    }
}

impl Disk for SwitchDisk {
    fn info(&self) -> DiskInfo {
        self.local.info()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::mpsc;

    use understudy_block::raw::RawDisk;

    use super::*;

    const SIZE: u64 = 1 << 20;

    fn disk(dir: &tempfile::TempDir, name: &str) -> Arc<dyn Disk> {
        Arc::new(RawDisk::create(&dir.path().join(name), SIZE).unwrap())
    }

    fn byte_at(d: &dyn Disk, offset: u64) -> u8 {
        let mut b = [0u8; 1];
        d.read_at(&mut b, offset).unwrap();
        b[0]
    }

    #[test]
    fn routes_local_pivot_forward_and_fail() {
        let dir = tempfile::tempdir().unwrap();
        let (own, other, remote) = (disk(&dir, "a"), disk(&dir, "b"), disk(&dir, "c"));
        let s = SwitchDisk::new(own.clone());
        let w = WriteOpts::default();
        s.write_at(&[1], 0, w).unwrap();
        assert_eq!(byte_at(&*own, 0), 1);
        assert!(s.is_local());

        s.set_route(Route::Pivot(other.clone()));
        s.write_at(&[2], 0, w).unwrap();
        assert_eq!((byte_at(&*own, 0), byte_at(&*other, 0)), (1, 2));
        assert!(!s.is_local());

        s.set_route(Route::Forward(remote.clone()));
        s.write_at(&[3], 0, w).unwrap();
        assert_eq!(byte_at(&*remote, 0), 3);
        assert_eq!(s.size(), SIZE);

        s.set_route(Route::Fail(Arc::from("ownership in doubt")));
        let e = s.write_at(&[4], 0, w).unwrap_err();
        assert!(e.to_string().contains("I/O"), "{e}");
        assert!(format!("{e:?}").contains("ownership in doubt"));
    }

    #[test]
    fn hold_waits_for_release_and_takes_the_new_route() {
        let dir = tempfile::tempdir().unwrap();
        let (own, other) = (disk(&dir, "a"), disk(&dir, "b"));
        let s = Arc::new(SwitchDisk::new(own.clone()));
        let hold = s.hold(Duration::from_secs(5)).unwrap();
        let (tx, rx) = mpsc::channel();
        let s2 = s.clone();
        let t = std::thread::spawn(move || {
            s2.write_at(&[7], 4096, WriteOpts::default()).unwrap();
            tx.send(()).unwrap();
        });
        // Held, not failed: the write has not happened anywhere yet.
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        assert_eq!(byte_at(&*own, 4096), 0);
        hold.release(Route::Pivot(other.clone()));
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        t.join().unwrap();
        assert_eq!((byte_at(&*own, 4096), byte_at(&*other, 4096)), (0, 7));
        assert!(s.held_total() > Duration::ZERO);
    }
}
