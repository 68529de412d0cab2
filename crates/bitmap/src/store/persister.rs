//! The background persister: a thread that persists on a timer, and early
//! when the armed set grows over the soft cap.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::BitmapStore;

/// Wakes persister threads early (armed set over the cap, or shutdown).
#[derive(Debug, Default)]
pub(super) struct Signal {
    wake: Mutex<bool>,
    cv: Condvar,
}

impl Signal {
    pub(super) fn wake(&self) {
        *self.wake.lock() = true;
        self.cv.notify_all();
    }

    pub(super) fn notify_stop(&self) {
        let _w = self.wake.lock();
        self.cv.notify_all();
    }
}

impl BitmapStore {
    /// Start a thread that persists every `interval`, and early whenever
    /// the armed set exceeds the soft cap. Failures are logged and retried
    /// at the next tick. The thread stops when the handle is stopped or
    /// dropped, or when the store is closed.
    pub fn spawn_persister(self: &Arc<Self>, interval: Duration) -> io::Result<Persister> {
        let store = Arc::clone(self);
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name("bitmap-persist".into())
            .spawn(move || {
                let stopped = || stop2.load(Ordering::SeqCst) || store.closed.load(Ordering::SeqCst);
                loop {
                    {
                        let mut wake = store.signal.wake.lock();
                        if !*wake && !stopped() {
                            store.signal.cv.wait_for(&mut wake, interval);
                        }
                        if stopped() {
                            return;
                        }
                        *wake = false;
                    }
                    if let Err(error) = store.persist() {
                        tracing::warn!(%error, "periodic bitmap persist failed; retrying at the next tick");
                    }
                }
            })?;
        Ok(Persister {
            store: Arc::clone(self),
            stop,
            handle: Some(handle),
        })
    }
}

/// Handle of the thread started by [`BitmapStore::spawn_persister`].
#[derive(Debug)]
pub struct Persister {
    store: Arc<BitmapStore>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Persister {
    /// Stop the thread and wait for it (after its current persist).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.store.signal.notify_stop();
        if let Some(h) = self.handle.take()
            && h.join().is_err()
        {
            tracing::error!("bitmap persister thread panicked");
        }
    }
}

impl Drop for Persister {
    fn drop(&mut self) {
        self.shutdown();
    }
}
