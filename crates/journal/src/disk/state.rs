//! The state shared by writers, readers and the writer thread, behind one
//! lock, and how a failure is remembered and reported.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};
use understudy_block::{BlockError, Disk, Epoch};

use super::hook::EpochHook;
use super::policy::FlushPolicy;
use crate::format::RecordKind;
use crate::log::LogFile;
use crate::overlay::Overlay;

/// Granularity of the "is this range referenced by a live record" map that
/// decides whether a write may go in place.
const CHUNK: u64 = 64 * 1024;

/// Counters and positions, for monitoring and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JournalStats {
    /// The open epoch.
    pub current_epoch: Epoch,
    /// Every epoch up to this one is durable.
    pub durable_epoch: Epoch,
    /// Every epoch up to this one is in the image.
    pub applied_epoch: Epoch,
    /// Ring bytes in use.
    pub journal_used: u64,
    /// Ring size.
    pub journal_capacity: u64,
    /// Records appended (data, markers, closes, pads).
    pub records: u64,
    /// Payload bytes appended.
    pub journaled_bytes: u64,
    /// Writes that went to the image in place.
    pub in_place_writes: u64,
    /// Journal fsyncs.
    pub journal_syncs: u64,
    /// Image fsyncs.
    pub image_syncs: u64,
    /// Epochs closed because the ring was full (not by the caller).
    pub forced_closes: u64,
    /// Times a writer waited for ring space.
    pub space_waits: u64,
}

#[derive(Debug)]
pub(super) struct Pending {
    pub(super) seq: u64,
    pub(super) kind: RecordKind,
    pub(super) flags: u8,
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) buf: Option<Arc<Vec<u8>>>,
}

#[derive(Debug, Default)]
pub(super) struct EpochState {
    pub(super) records: Vec<Pending>,
    /// Records of the epoch (data and markers), for the close record.
    pub(super) count: u64,
    pub(super) inflight: u32,
    pub(super) in_place: Vec<(u64, u64)>,
    pub(super) closed_at: Option<Instant>,
}

#[derive(Debug)]
pub(super) struct Live {
    pub(super) pos: u64,
    pub(super) seq: u64,
    pub(super) epoch: Epoch,
    /// Chunk range referenced, for data records.
    pub(super) chunks: Option<(u64, u64)>,
}

#[derive(Clone, Debug)]
pub(super) struct Failure {
    pub(super) errno: Option<i32>,
    pub(super) what: String,
}

impl Failure {
    pub(super) fn io(&self) -> io::Error {
        match self.errno {
            Some(e) => io::Error::from_raw_os_error(e),
            None => io::Error::other(self.what.clone()),
        }
    }
}

#[derive(Debug)]
pub(super) struct State {
    pub(super) cur_epoch: Epoch,
    pub(super) closed_upto: Epoch,
    pub(super) durable_epoch: Epoch,
    pub(super) applied_epoch: Epoch,
    /// Every epoch up to this one is applied and its ring space released.
    pub(super) reclaimed_epoch: Epoch,
    pub(super) epochs: BTreeMap<Epoch, EpochState>,
    pub(super) overlay: Overlay,
    pub(super) live: VecDeque<Live>,
    pub(super) chunk_refs: HashMap<u64, u32>,
    pub(super) head: u64,
    pub(super) tail: u64,
    pub(super) next_seq: u64,
    pub(super) close_reserved: u64,
    pub(super) generation: u64,
    pub(super) failed: Option<Failure>,
    /// Set by [`EpochDisk::stop`]: the failure (if any) it reported.
    pub(super) stopped: Option<Option<Failure>>,
    pub(super) shutdown: bool,
    pub(super) durable_wanted: Epoch,
    pub(super) space_waiters: usize,
    pub(super) last_activity: Instant,
    pub(super) stats: JournalStats,
}

impl State {
    /// A fresh state after recovery: every epoch up to `base` is in the
    /// image and the ring is empty.
    pub(super) fn new(base: Epoch, generation: u64, capacity: u64) -> Self {
        Self {
            cur_epoch: base + 1,
            closed_upto: base,
            durable_epoch: base,
            applied_epoch: base,
            reclaimed_epoch: base,
            epochs: BTreeMap::new(),
            overlay: Overlay::default(),
            live: VecDeque::new(),
            chunk_refs: HashMap::new(),
            head: 0,
            tail: 0,
            next_seq: 1,
            close_reserved: 0,
            generation,
            failed: None,
            stopped: None,
            shutdown: false,
            durable_wanted: base,
            space_waiters: 0,
            last_activity: Instant::now(),
            stats: JournalStats {
                journal_capacity: capacity,
                ..Default::default()
            },
        }
    }

    pub(super) fn used(&self) -> u64 {
        self.head - self.tail
    }

    /// Close the open epoch if it has records. Returns the closed epoch.
    pub(super) fn close(&mut self) -> Option<Epoch> {
        let e = self.cur_epoch;
        let st = self.epochs.get_mut(&e)?;
        st.closed_at = Some(Instant::now());
        self.closed_upto = e;
        self.cur_epoch = e + 1;
        Some(e)
    }

    pub(super) fn chunks_free(&self, offset: u64, len: u64) -> bool {
        let (a, b) = chunk_range(offset, len);
        (a..b).all(|c| !self.chunk_refs.contains_key(&c))
    }

    pub(super) fn fail(&mut self, what: String, e: &io::Error) {
        if self.failed.is_none() {
            tracing::error!("epoch journal stopped: {what}: {e}");
            self.failed = Some(Failure {
                errno: e.raw_os_error(),
                what,
            });
        }
    }
}

pub(super) fn chunk_range(offset: u64, len: u64) -> (u64, u64) {
    (offset / CHUNK, (offset + len).div_ceil(CHUNK))
}

pub(super) struct Shared {
    pub(super) inner: Arc<dyn Disk>,
    pub(super) log: Arc<dyn LogFile>,
    pub(super) policy: FlushPolicy,
    pub(super) in_place_min: Option<u64>,
    pub(super) cap: u64,
    pub(super) max_payload: u64,
    pub(super) log_id: u64,
    pub(super) image_size: u64,
    pub(super) st: Mutex<State>,
    pub(super) cv_writer: Condvar,
    pub(super) cv_durable: Condvar,
    pub(super) cv_space: Condvar,
    pub(super) hook: Mutex<Option<EpochHook>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("inner", &self.inner)
            .field("log", &self.log)
            .field("policy", &self.policy)
            .field("cap", &self.cap)
            .finish_non_exhaustive()
    }
}

pub(super) const CLOSED: &str = "the disk was closed";

pub(super) fn failed_err(f: &Failure, op: &'static str) -> BlockError {
    if f.errno.is_none() && f.what == CLOSED {
        return BlockError::Backend {
            op,
            reason: "the epoch journal is closed (the server is shutting down); reopen the disk to write again".into(),
        };
    }
    let source = f.io();
    match op {
        "flush" => BlockError::Flush { source },
        _ => BlockError::Backend {
            op,
            reason: format!(
                "the epoch journal stopped after an I/O error ({}: {source}); reopen the disk to recover",
                f.what
            ),
        },
    }
}

impl Shared {
    pub(super) fn wake_all(&self) {
        self.cv_writer.notify_all();
        self.cv_durable.notify_all();
        self.cv_space.notify_all();
    }
}
