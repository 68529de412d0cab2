//! [`ReplicaObserver`]: the primary's write observer, installed in the
//! export's block filter after the bitmap observer.
//!
//! Because the filter runs `after_write` in reverse order, this observer
//! has dealt with a write (sent it, queued it, or marked `pending`) before
//! the per-peer persistent bitmap marks it. So a take of the persistent
//! bitmap holds only writes that are already on their way to the backup or
//! in `pending`: the session commits such a take once `pending` is empty
//! and a flush point sent after the take is acknowledged.
//!
//! * Not streaming (disconnected, resyncing): every write marks `pending`,
//!   the in-memory set the next copy round sends.
//! * `sync`: the write is sent from the writer's thread and acknowledged
//!   to the client only after the backup acknowledged it; a flush waits
//!   for the backup's flush.
//! * `async` / `epoch`: the write is copied into the send queue, unless the
//!   backup already lags by `max_lag` bytes: then it marks `pending` and
//!   the session catches up with the copy engine once the queue drained.
//!   In `epoch` mode every flush and write-order barrier queues an
//!   `EpochClose`.
//!
//! Streaming writes hold a range lock from `before_write` until they are
//! sent or queued; the copy engine takes the same locks around each piece
//! it reads and sends, so the two reach the backup in the order they hit
//! the primary's disk.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};
use understudy_bitmap::DirtyBitmap;
use understudy_block::BlockError;
use understudy_filter::{Barrier, ObserverError, WriteKind, WriteObserver, WriteOp, WriteToken};
use understudy_layers::RangeLock;

use crate::generation::{self, GenRecord};
use crate::session::Session;
use crate::wire::{self, Mode, Msg};

/// One queued item for the backup (async and epoch modes).
#[derive(Debug)]
pub(crate) enum Item {
    /// A write's bytes.
    Write {
        offset: u64,
        flags: u8,
        data: Vec<u8>,
    },
    /// A write-zeroes.
    Zero { offset: u64, len: u64, flags: u8 },
    /// An epoch ends (epoch mode).
    EpochClose { epoch: u64 },
}

impl Item {
    fn bytes(&self) -> u64 {
        match self {
            Item::Write { data, .. } => data.len() as u64,
            Item::Zero { .. } | Item::EpochClose { .. } => 0,
        }
    }
}

/// The send queue, shared by the observer (producer) and the session
/// (consumer). Items carry their enqueue index.
#[derive(Debug, Default)]
pub(crate) struct Queue {
    pub(crate) items: Mutex<VecDeque<(u64, Item)>>,
    pub(crate) cv: Condvar,
    pub(crate) enqueued: AtomicU64,
}

impl Queue {
    fn push(&self, item: Item) {
        let mut q = self.items.lock();
        let idx = self.enqueued.fetch_add(1, Ordering::SeqCst) + 1;
        q.push_back((idx, item));
        drop(q);
        self.cv.notify_all();
    }
}

/// Where writes go now.
#[derive(Debug, Clone)]
pub(crate) enum Stream {
    /// Nowhere: mark `pending`.
    Off,
    /// To this session (sync: sent directly; async/epoch: queued).
    On(Arc<Session>),
}

/// See the module docs.
#[derive(Debug)]
pub struct ReplicaObserver {
    mode: Mode,
    max_lag: u64,
    pub(crate) stream: RwLock<Stream>,
    pub(crate) pending: Arc<DirtyBitmap>,
    pub(crate) locks: Arc<RangeLock>,
    pub(crate) queue: Queue,
    /// Bytes queued or sent and not yet acknowledged.
    pub(crate) lag: Arc<AtomicU64>,
    /// A write was diverted to `pending` because of the lag bound.
    pub(crate) behind: AtomicBool,
    epochs: AtomicU64,
    /// The generation record, shared with the primary.
    pub(crate) record: Arc<parking_lot::Mutex<GenRecord>>,
    image: PathBuf,
    /// The backup holds this copy's current generation (its bitmap id is
    /// 0): a write that does not reach the backup diverges, so a new
    /// generation starts first (before it, or at least before it is
    /// acknowledged when its sending failed).
    pub(crate) shared_gens: AtomicBool,
    /// The time bound on the lag, if any.
    max_lag_time: Option<Duration>,
    /// Bytes ever queued.
    enqueued_bytes: AtomicU64,
    /// `(enqueued_bytes after a write, when it was queued)` of the writes
    /// not yet acknowledged, oldest first (for the time bound).
    times: parking_lot::Mutex<VecDeque<(u64, Instant)>>,
    /// How often writes fell back to the bitmap because of a lag bound.
    pub(crate) behind_events: AtomicU64,
}

impl ReplicaObserver {
    pub(crate) fn new(
        mode: Mode,
        (max_lag, max_lag_time): (u64, Option<Duration>),
        pending: Arc<DirtyBitmap>,
        record: Arc<parking_lot::Mutex<GenRecord>>,
        image: PathBuf,
    ) -> Self {
        let rotate = record.lock().gens.bitmap == 0;
        Self {
            record,
            image,
            shared_gens: AtomicBool::new(rotate),
            max_lag_time,
            enqueued_bytes: AtomicU64::new(0),
            times: parking_lot::Mutex::new(VecDeque::new()),
            behind_events: AtomicU64::new(0),
            mode,
            max_lag,
            stream: RwLock::new(Stream::Off),
            pending,
            locks: Arc::new(RangeLock::default()),
            queue: Queue::default(),
            lag: Arc::new(AtomicU64::new(0)),
            behind: AtomicBool::new(false),
            epochs: AtomicU64::new(0),
        }
    }

    /// Bytes accepted for the backup and not yet acknowledged by it.
    pub fn lag_bytes(&self) -> u64 {
        self.lag.load(Ordering::SeqCst)
    }

    /// Bytes the backup lacks beyond the stream (copied by the next round).
    pub fn pending_bytes(&self) -> u64 {
        self.pending.dirty_bytes()
    }

    /// Start a new generation, durably, before the first diverging write.
    fn rotate(&self) -> Result<(), ObserverError> {
        let mut rec = self.record.lock();
        if !self.shared_gens.load(Ordering::SeqCst) {
            return Ok(());
        }
        let before = rec.gens.clone();
        rec.gens.new_current(generation::new_id());
        if let Err(e) = generation::store(&self.image, &rec) {
            rec.gens = before;
            return Err(ObserverError::Refused {
                observer: "replica",
                source: Box::new(e),
            });
        }
        self.shared_gens.store(false, Ordering::SeqCst);
        tracing::info!("first write without the backup: new generation");
        Ok(())
    }

    fn session(&self) -> Option<Arc<Session>> {
        match &*self.stream.read() {
            Stream::On(s) if !s.is_dead() => Some(s.clone()),
            _ => None,
        }
    }

    /// Send a write now and wait for the backup (sync mode).
    fn send_sync(&self, s: &Session, op: &WriteOp<'_>) -> bool {
        let fua = if op.opts.fua { wire::flags::FUA } else { 0 };
        let last = match op.kind {
            WriteKind::Data(data) => {
                let mut last = Ok(0);
                for (i, chunk) in data.chunks(wire::MAX_DATA).enumerate() {
                    let offset = op.offset + (i * wire::MAX_DATA) as u64;
                    last = s.send(0, |seq| Msg::Write {
                        seq,
                        offset,
                        flags: fua,
                        hash: wire::extent_hash(chunk),
                        data: chunk,
                    });
                    if last.is_err() {
                        break;
                    }
                }
                last
            }
            WriteKind::Zeroes(z) => s.send(0, |seq| Msg::Zero {
                seq,
                offset: op.offset,
                len: op.len,
                flags: fua
                    | if z.may_unmap {
                        wire::flags::MAY_UNMAP
                    } else {
                        0
                    },
            }),
            WriteKind::Discard => return false,
        };
        last.and_then(|seq| s.wait(seq)).is_ok()
    }

    /// Queue a write (async, epoch); false when over the lag bound.
    /// Whether the oldest write not yet acknowledged was queued longer
    /// ago than the time bound.
    fn over_time(&self) -> bool {
        let Some(max) = self.max_lag_time else {
            return false;
        };
        let acked = self
            .enqueued_bytes
            .load(Ordering::SeqCst)
            .saturating_sub(self.lag.load(Ordering::SeqCst));
        let mut t = self.times.lock();
        while t.front().is_some_and(|&(total, _)| total <= acked) {
            t.pop_front();
        }
        t.front().is_some_and(|&(_, at)| at.elapsed() > max)
    }

    fn enqueue(&self, op: &WriteOp<'_>) -> bool {
        if self.lag.load(Ordering::SeqCst) + op.len > self.max_lag || self.over_time() {
            if !self.behind.swap(true, Ordering::SeqCst) {
                self.behind_events.fetch_add(1, Ordering::SeqCst);
                tracing::info!(
                    lag = self.lag_bytes(),
                    max_lag = self.max_lag,
                    "replica behind: tracking in the bitmap until it catches up"
                );
            }
            return false;
        }
        let fua = if op.opts.fua { wire::flags::FUA } else { 0 };
        let item = match op.kind {
            WriteKind::Data(data) => Item::Write {
                offset: op.offset,
                flags: fua,
                data: data.to_vec(),
            },
            WriteKind::Zeroes(z) => Item::Zero {
                offset: op.offset,
                len: op.len,
                flags: fua
                    | if z.may_unmap {
                        wire::flags::MAY_UNMAP
                    } else {
                        0
                    },
            },
            WriteKind::Discard => return false,
        };
        let bytes = item.bytes();
        self.lag.fetch_add(bytes, Ordering::SeqCst);
        if self.max_lag_time.is_some() && bytes > 0 {
            let total = self.enqueued_bytes.fetch_add(bytes, Ordering::SeqCst) + bytes;
            self.times.lock().push_back((total, Instant::now()));
        }
        self.queue.push(item);
        true
    }
}

impl WriteObserver for ReplicaObserver {
    fn before_write(&self, op: &WriteOp<'_>) -> Result<WriteToken, ObserverError> {
        let streams = !matches!(op.kind, WriteKind::Discard) && self.session().is_some();
        if !streams && self.shared_gens.load(Ordering::SeqCst) {
            self.rotate()?;
        }
        if streams {
            return Ok(WriteToken::new(self.locks.lock(op.offset, op.len)));
        }
        Ok(WriteToken::new(0))
    }

    fn after_write(&self, op: &WriteOp<'_>, token: WriteToken, outcome: Result<(), &BlockError>) {
        let lock = token.get();
        let mut done = false;
        if lock != 0
            && outcome.is_ok()
            && let Some(s) = self.session()
        {
            done = match self.mode {
                Mode::Sync => self.send_sync(&s, op),
                Mode::Async | Mode::Epoch => self.enqueue(op),
            };
        }
        if !done {
            // Also when the local write failed: it may be partial.
            self.pending.mark(op.offset, op.len);
            // A write queued behind the lag bound still reaches the backup
            // in this session (a catch-up round): no divergence.
            if self.shared_gens.load(Ordering::SeqCst)
                && self.session().is_none()
                && let Err(e) = self.rotate()
            {
                tracing::error!(error = %e, "cannot start a new generation; a failover may discard this write");
            }
        }
        if lock != 0 {
            self.locks.unlock(lock);
        }
    }

    fn after_flush(&self, barrier: Barrier) -> Result<(), ObserverError> {
        let Some(s) = self.session() else {
            return Ok(());
        };
        match (self.mode, barrier) {
            // The primary keeps serving when the backup is gone: a failed
            // remote flush ends the session (the writes stay in the
            // persistent bitmap, so they are resent), it does not fail the
            // client's flush.
            (Mode::Sync, Barrier::Flush) if s.request(|seq| Msg::Flush { seq }).is_err() => {
                tracing::warn!("backup flush failed; the primary goes on alone");
            }
            (Mode::Epoch, _) => {
                let epoch = self.epochs.fetch_add(1, Ordering::SeqCst) + 1;
                self.queue.push(Item::EpochClose { epoch });
            }
            _ => {}
        }
        Ok(())
    }
}
