//! [`SwitchDisk`]: the outermost layer of a migratable export. It can hold
//! all I/O (switch-over) and re-route it to another disk (forwarding to the
//! new owner after the commit).
//!
//! ```text
//!   NBD connections ──▶ SwitchDisk ──route──▶ FilterDisk ──▶ raw/qcow2   (owner)
//!                            │         └────▶ RemoteDisk ──▶ peer link   (handed over)
//!                            └── hold(): write lock — new requests wait, in-flight drain
//! ```
//!
//! Every local request holds the route's read lock for its duration, so
//! taking the write lock both waits for in-flight requests and holds new
//! ones (the lock is writer-preferring). Held requests are not failed: they
//! run on whatever route is set when the hold ends. Forwarded requests drop
//! the lock before they go out: they may wait on the other node, which may
//! itself be waiting to commit to us (a migration back).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{RwLock, RwLockWriteGuard};
use understudy_block::{
    BlockError, Disk, DiskInfo, DiskMap, DiskRead, DiskSize, DiskWrite, Epoch, Extent, Result,
    WriteOpts, ZeroOpts,
};

/// Where requests go.
#[derive(Clone)]
pub enum Route {
    /// The local disk (this node owns the export).
    Local,
    /// Another disk, normally a [`crate::RemoteDisk`] to the new owner.
    Forward(Arc<dyn Disk>),
    /// Nowhere: every request fails with this message (ownership in doubt).
    Fail(Arc<str>),
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Route::Local => f.write_str("Local"),
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
    /// Route everything to `local`.
    pub fn new(local: Arc<dyn Disk>) -> Self {
        Self {
            local,
            route: RwLock::new(Route::Local),
            held_ns_total: AtomicU64::new(0),
        }
    }

    /// The local disk (normally the block filter).
    pub fn local(&self) -> &Arc<dyn Disk> {
        &self.local
    }

    /// The current route.
    pub fn route(&self) -> Route {
        self.route.read().clone()
    }

    /// Whether requests go to the local disk.
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
