//! [`EpochDisk`]: a [`Disk`] with write-order and write-flush.
//!
//! ```text
//!  writers ──append──▶ journal ring (page cache, no fsync) ──┐
//!     │                                                      │ writer thread, in epoch order:
//!     └──overlay (in-memory index, newest wins) ◀── reads    │  1. [image fsync if in-place writes]
//!                                                            │  2. close records, journal fsync  → durable
//!  large writes, when allowed ──in place──▶ image            │  3. apply to image, image fsync   → applied
//!                                                            │  4. header (new tail), journal fsync → space reclaimed
//! ```
//!
//! Architecture invariant: a byte reaches the image only (a) from a record
//! of an epoch whose closing record is durable, or (b) in place, when every
//! earlier epoch is durable and no live record overlaps the range. Recovery
//! replays exactly the epochs whose closing record survived, so the image
//! after a crash is a prefix of the epoch sequence (docs/ordering.md).
//!
//! Split by responsibility:
//! - this file: [`EpochDisk`], opening it and its public operations;
//! - `config.rs`: [`JournalConfig`] and its checks;
//! - `policy.rs`: [`FlushPolicy`] and when the writer thread acts on it;
//! - `state.rs`: the shared state behind the lock, and failures;
//! - `ring.rs`: appending records to the ring, with back-pressure;
//! - `in_place.rs`: the in-place write rule of semantic journaling;
//! - `writer.rs`: the writer thread (close, fsync, apply, reclaim);
//! - `hook.rs`: the durable epochs handed to an [`EpochHook`];
//! - `recovery.rs`: replaying a journal at open;
//! - `requests.rs`: the [`Disk`] traits on top of all that.

use std::fs::OpenOptions as FsOpenOptions;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};
use understudy_block::{Disk, Epoch, Result as BResult};

use crate::error::JournalError;
use crate::format::{Header, RING_START, max_payload};
use crate::log::LogFile;

mod config;
mod hook;
mod in_place;
mod policy;
mod recovery;
mod requests;
mod ring;
mod state;
mod writer;

pub use config::JournalConfig;
pub use hook::{ClosedEpoch, EpochData, EpochHook, EpochWrite, EpochWriteKind};
pub use policy::FlushPolicy;
pub use recovery::RecoveryReport;
pub use state::JournalStats;

use recovery::recover;
use state::{CLOSED, Failure, Shared, State, failed_err};
use writer::{write_header, writer_main};

/// A disk with an epoch journal: write-order and write-flush primitives
/// with prefix consistency after a crash.
#[derive(Debug)]
pub struct EpochDisk {
    sh: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

fn random_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish() | 1
}

impl EpochDisk {
    /// The journal path used beside an image: `IMAGE.journal`.
    pub fn journal_path(image: &Path) -> PathBuf {
        let mut s = image.as_os_str().to_owned();
        s.push(".journal");
        PathBuf::from(s)
    }

    /// Open (creating if needed) the journal file at `path` for `inner`,
    /// recovering after a crash.
    pub fn open_path(
        inner: Arc<dyn Disk>,
        path: &Path,
        config: JournalConfig,
    ) -> Result<(Self, RecoveryReport), JournalError> {
        let f = FsOpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| JournalError::OpenFile {
                path: path.to_owned(),
                source,
            })?;
        Self::open(inner, Arc::new(f), config)
    }

    /// Open on any [`LogFile`]: replay the complete epochs of an existing
    /// journal onto `inner`, drop incomplete ones, reset the journal, start
    /// the writer thread.
    pub fn open(
        inner: Arc<dyn Disk>,
        log: Arc<dyn LogFile>,
        config: JournalConfig,
    ) -> Result<(Self, RecoveryReport), JournalError> {
        config.sanitize()?;
        let image_size = inner.size();
        let (report, len, generation) = recover(&*inner, &*log)?;
        let needed = RING_START + config.capacity;
        if len < needed {
            log.set_len(needed)
                .map_err(|source| JournalError::Reset { source })?;
        }
        let log_id = random_id();
        let generation = generation + 1;
        let header = Header {
            log_id,
            generation,
            capacity: config.capacity,
            image_size,
            tail: 0,
            tail_seq: 1,
            base_epoch: report.last_epoch,
        };
        write_header(&*log, &header).map_err(|source| JournalError::Reset { source })?;
        let base = report.last_epoch;
        let st = State::new(base, generation, config.capacity);
        let sh = Arc::new(Shared {
            inner,
            log,
            policy: config.policy,
            in_place_min: config.in_place_min,
            cap: config.capacity,
            max_payload: max_payload(config.capacity),
            log_id,
            image_size,
            st: Mutex::new(st),
            cv_writer: Condvar::new(),
            cv_durable: Condvar::new(),
            cv_space: Condvar::new(),
            hook: Mutex::new(None),
        });
        let sh2 = Arc::clone(&sh);
        let writer = std::thread::Builder::new()
            .name("epoch-journal".into())
            .spawn(move || writer_main(&sh2))
            .map_err(|source| JournalError::SpawnWriter { source })?;
        tracing::info!(
            epoch = base,
            replayed = report.replayed_epochs,
            dropped = report.dropped_records,
            "epoch journal open"
        );
        Ok((
            Self {
                sh,
                writer: Mutex::new(Some(writer)),
            },
            report,
        ))
    }

    /// The wrapped image.
    pub fn inner(&self) -> &Arc<dyn Disk> {
        &self.sh.inner
    }

    /// Counters and positions.
    pub fn stats(&self) -> JournalStats {
        let st = self.sh.st.lock();
        JournalStats {
            current_epoch: st.cur_epoch,
            durable_epoch: st.durable_epoch,
            applied_epoch: st.applied_epoch,
            journal_used: st.used(),
            ..st.stats.clone()
        }
    }

    /// Every epoch up to the returned one is durable.
    pub fn durable_epoch(&self) -> Epoch {
        self.sh.st.lock().durable_epoch
    }

    /// Install the hook that sees every durable epoch (replaces any earlier
    /// one). Epochs that became durable before it was installed are not
    /// replayed to it.
    pub fn set_epoch_hook(&self, hook: Option<EpochHook>) {
        *self.sh.hook.lock() = hook;
    }

    /// Close the open epoch and wait until it and every earlier one is
    /// durable, whatever the policy (the `Durable` meaning of flush).
    pub fn sync(&self) -> BResult<Epoch> {
        let e = {
            let mut st = self.sh.st.lock();
            if let Some(f) = &st.failed {
                return Err(failed_err(f, "flush"));
            }
            st.close();
            st.closed_upto
        };
        self.wait_durable(e)?;
        Ok(e)
    }

    /// Wait until `epoch` and every earlier epoch are durable, closing
    /// `epoch` first if it is still the open one. With the epoch returned by
    /// [`DiskWrite::order`] this is a write-flush of exactly the writes
    /// before that barrier: unlike [`EpochDisk::sync`] it adds no epoch
    /// boundary of its own (which could split writes issued after the
    /// barrier).
    pub fn sync_epoch(&self, epoch: Epoch) -> BResult<()> {
        {
            let st = self.sh.st.lock();
            if let Some(f) = &st.failed {
                return Err(failed_err(f, "flush"));
            }
        }
        self.fua(epoch)
    }

    /// Stop the writer after making everything durable and applied; report
    /// whether the disk had failed.
    pub fn close(self) -> Result<(), JournalError> {
        self.stop()
    }

    /// Like [`EpochDisk::close`] for a disk that is still shared (for
    /// example wrapped by a filter that an NBD export holds): make
    /// everything durable and applied and stop the writer thread. Later
    /// writes, orders and flushes fail instead of waiting for a writer that
    /// is gone; reads keep working. Calling it again returns the same result.
    pub fn stop(&self) -> Result<(), JournalError> {
        self.shutdown();
        let mut st = self.sh.st.lock();
        if st.stopped.is_none() {
            let before = st.failed.clone();
            if st.failed.is_none() {
                st.failed = Some(Failure {
                    errno: None,
                    what: CLOSED.into(),
                });
            }
            st.stopped = Some(before);
        }
        match st.stopped.as_ref().and_then(Option::as_ref) {
            Some(f) => Err(JournalError::Failed {
                reason: format!("{}: {}", f.what, f.io()),
            }),
            None => Ok(()),
        }
    }

    fn shutdown(&self) {
        let Some(h) = self.writer.lock().take() else {
            return;
        };
        {
            let mut st = self.sh.st.lock();
            st.shutdown = true;
            st.close();
        }
        self.sh.cv_writer.notify_all();
        if h.join().is_err() {
            tracing::error!("epoch journal writer thread panicked");
        }
    }

    fn wait_durable(&self, e: Epoch) -> BResult<()> {
        let mut st = self.sh.st.lock();
        if e > st.durable_wanted {
            st.durable_wanted = e;
            self.sh.cv_writer.notify_one();
        }
        while st.durable_epoch < e {
            if let Some(f) = &st.failed {
                return Err(failed_err(f, "flush"));
            }
            self.sh.cv_durable.wait(&mut st);
        }
        Ok(())
    }
    /// After a FUA request of `epoch`: make it durable.
    fn fua(&self, epoch: Epoch) -> BResult<()> {
        {
            let mut st = self.sh.st.lock();
            if st.cur_epoch == epoch {
                st.close();
            }
        }
        self.wait_durable(epoch)
    }
}

impl Drop for EpochDisk {
    fn drop(&mut self) {
        self.shutdown();
    }
}
