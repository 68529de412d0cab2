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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::OpenOptions as FsOpenOptions;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};
use understudy_block::{
    BlockError, Disk, DiskInfo, DiskMap, DiskRead, DiskSize, DiskWrite, Epoch, Extent, ExtentKind,
    Result as BResult, WriteOpts, ZeroOpts, check_range,
};

use crate::error::JournalError;
use crate::format::{
    FLAG_MAY_UNMAP, HEADER_LEN, HEADER_SLOT, Header, MAX_CAPACITY, MIN_CAPACITY, REC_ALIGN,
    REC_HDR, RING_START, RecordHeader, RecordKind, align_up, max_payload, phys,
};
use crate::log::LogFile;
use crate::overlay::{Overlay, Source, copy_from};
use crate::scan;

/// Granularity of the "is this range referenced by a live record" map that
/// decides whether a write may go in place.
const CHUNK: u64 = 64 * 1024;
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

/// Configuration of an [`EpochDisk`].
#[derive(Clone, Debug)]
pub struct JournalConfig {
    /// Bytes of the record ring (a multiple of 512, 64 KiB ..= 64 GiB). It
    /// also bounds the memory of the read overlay. Default: 128 MiB.
    pub capacity: u64,
    /// Flush policy. Default: [`FlushPolicy::Durable`].
    pub policy: FlushPolicy,
    /// Semantic journaling: data writes of at least this many bytes may go
    /// to the image in place when ordering allows. `None` journals every
    /// write (strict prefix consistency). Default: `None`.
    pub in_place_min: Option<u64>,
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self {
            capacity: 128 << 20,
            policy: FlushPolicy::Durable,
            in_place_min: None,
        }
    }
}

impl JournalConfig {
    /// Check the values; the error says which value to use instead.
    pub fn sanitize(&self) -> Result<(), JournalError> {
        if !(MIN_CAPACITY..=MAX_CAPACITY).contains(&self.capacity)
            || !self.capacity.is_multiple_of(REC_ALIGN)
        {
            return Err(JournalError::Config {
                reason: format!(
                    "capacity {} must be a multiple of 512 between {MIN_CAPACITY} and {MAX_CAPACITY}",
                    self.capacity
                ),
            });
        }
        if let FlushPolicy::Ordered { interval } = self.policy
            && interval.is_zero()
        {
            return Err(JournalError::Config {
                reason: "the ordered flush interval must be positive (default 5 s)".into(),
            });
        }
        if self.in_place_min == Some(0) {
            return Err(JournalError::Config {
                reason: "in_place_min must be positive (e.g. 65536) or unset".into(),
            });
        }
        Ok(())
    }
}

/// What happened when the journal was opened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// A journal with a valid header was found.
    pub found_journal: bool,
    /// Epochs replayed onto the image.
    pub replayed_epochs: u64,
    /// Data records replayed.
    pub replayed_records: u64,
    /// Valid records of incomplete epochs that were dropped.
    pub dropped_records: u64,
    /// Every epoch up to this one is in the image; new epochs follow it.
    pub last_epoch: Epoch,
}

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

/// One change in a closed epoch, as handed to an [`EpochHook`].
#[derive(Clone, Debug)]
pub struct EpochWrite {
    /// Disk offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// What changed.
    pub kind: EpochWriteKind,
}

/// Kind of an [`EpochWrite`].
#[derive(Clone, Debug)]
pub enum EpochWriteKind {
    /// New data.
    Data(EpochData),
    /// Zeroes.
    Zero,
    /// Discarded (reads as zeroes here).
    Discard,
    /// Written to the image in place: read the range from the disk (it is
    /// durable in the image when the hook runs).
    InPlace,
}

/// Data of an [`EpochWrite`], shared with the journal without a copy.
#[derive(Clone)]
pub struct EpochData {
    buf: Arc<Vec<u8>>,
    len: usize,
}

impl EpochData {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[REC_HDR..REC_HDR + self.len]
    }
}

impl std::fmt::Debug for EpochData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EpochData({} bytes)", self.len)
    }
}

/// A durable epoch, in order, for replication and migration.
#[derive(Clone, Debug)]
pub struct ClosedEpoch {
    /// Epoch number.
    pub epoch: Epoch,
    /// Its changes in issue order.
    pub writes: Vec<EpochWrite>,
}

/// Called by the writer thread for every epoch that became durable in the
/// journal, in epoch order, before flush callers waiting for it are released
/// and before it is applied. It must not block for long: the writer waits
/// for it (which is also how a consumer applies back-pressure).
pub type EpochHook = Arc<dyn Fn(&ClosedEpoch) + Send + Sync>;

#[derive(Debug)]
struct Pending {
    seq: u64,
    kind: RecordKind,
    flags: u8,
    offset: u64,
    len: u64,
    buf: Option<Arc<Vec<u8>>>,
}

#[derive(Debug, Default)]
struct EpochState {
    records: Vec<Pending>,
    /// Records of the epoch (data and markers), for the close record.
    count: u64,
    inflight: u32,
    in_place: Vec<(u64, u64)>,
    closed_at: Option<Instant>,
}

#[derive(Debug)]
struct Live {
    pos: u64,
    seq: u64,
    epoch: Epoch,
    /// Chunk range referenced, for data records.
    chunks: Option<(u64, u64)>,
}

#[derive(Clone, Debug)]
struct Failure {
    errno: Option<i32>,
    what: String,
}

impl Failure {
    fn io(&self) -> io::Error {
        match self.errno {
            Some(e) => io::Error::from_raw_os_error(e),
            None => io::Error::other(self.what.clone()),
        }
    }
}

#[derive(Debug)]
struct State {
    cur_epoch: Epoch,
    closed_upto: Epoch,
    durable_epoch: Epoch,
    applied_epoch: Epoch,
    /// Every epoch up to this one is applied and its ring space released.
    reclaimed_epoch: Epoch,
    epochs: BTreeMap<Epoch, EpochState>,
    overlay: Overlay,
    live: VecDeque<Live>,
    chunk_refs: HashMap<u64, u32>,
    head: u64,
    tail: u64,
    next_seq: u64,
    close_reserved: u64,
    generation: u64,
    failed: Option<Failure>,
    /// Set by [`EpochDisk::stop`]: the failure (if any) it reported.
    stopped: Option<Option<Failure>>,
    shutdown: bool,
    durable_wanted: Epoch,
    space_waiters: usize,
    last_activity: Instant,
    stats: JournalStats,
}

impl State {
    fn used(&self) -> u64 {
        self.head - self.tail
    }

    /// Close the open epoch if it has records. Returns the closed epoch.
    fn close(&mut self) -> Option<Epoch> {
        let e = self.cur_epoch;
        let st = self.epochs.get_mut(&e)?;
        st.closed_at = Some(Instant::now());
        self.closed_upto = e;
        self.cur_epoch = e + 1;
        Some(e)
    }

    fn chunks_free(&self, offset: u64, len: u64) -> bool {
        let (a, b) = chunk_range(offset, len);
        (a..b).all(|c| !self.chunk_refs.contains_key(&c))
    }

    fn fail(&mut self, what: String, e: &io::Error) {
        if self.failed.is_none() {
            tracing::error!("epoch journal stopped: {what}: {e}");
            self.failed = Some(Failure {
                errno: e.raw_os_error(),
                what,
            });
        }
    }
}

fn chunk_range(offset: u64, len: u64) -> (u64, u64) {
    (offset / CHUNK, (offset + len).div_ceil(CHUNK))
}

struct Shared {
    inner: Arc<dyn Disk>,
    log: Arc<dyn LogFile>,
    policy: FlushPolicy,
    in_place_min: Option<u64>,
    cap: u64,
    max_payload: u64,
    log_id: u64,
    image_size: u64,
    st: Mutex<State>,
    cv_writer: Condvar,
    cv_durable: Condvar,
    cv_space: Condvar,
    hook: Mutex<Option<EpochHook>>,
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

/// A disk with an epoch journal: write-order and write-flush primitives
/// with prefix consistency after a crash.
#[derive(Debug)]
pub struct EpochDisk {
    sh: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// The pseudo-failure that marks a stopped disk.
const CLOSED: &str = "the disk was closed";

fn failed_err(f: &Failure, op: &'static str) -> BlockError {
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
        let read_err = |source| JournalError::Read { offset: 0, source };
        let len = log.len().map_err(read_err)?;
        let mut report = RecoveryReport::default();
        let mut generation = 0;
        if len > 0 {
            match scan::scan(&*log)? {
                Some(s) => {
                    if s.header.image_size != image_size {
                        return Err(JournalError::ImageSizeMismatch {
                            journal: s.header.image_size,
                            image: image_size,
                        });
                    }
                    report = replay(&*inner, &*log, &s)?;
                    generation = s.header.generation;
                }
                None if !header_area_blank(&*log, len)? => return Err(JournalError::NoValidHeader),
                // Crashed while creating the journal: nothing to recover.
                None => {}
            }
        }
        let needed = RING_START + config.capacity;
        if len < needed {
            log.set_len(needed)
                .map_err(|source| JournalError::Reset { source })?;
        }
        let log_id = random_id();
        generation += 1;
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
        let st = State {
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
                journal_capacity: config.capacity,
                ..Default::default()
            },
        };
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

    /// Append one record (after waiting for ring space) and return its epoch.
    fn append(
        &self,
        kind: RecordKind,
        flags: u8,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
    ) -> BResult<Epoch> {
        let sh = &*self.sh;
        let payload_len = data.map_or(0, |d| d.len());
        let total = align_up((REC_HDR + payload_len) as u64);
        let mut buf = vec![0u8; total as usize];
        let mut payload_crc = 0;
        if let Some(d) = data {
            buf[REC_HDR..REC_HDR + d.len()].copy_from_slice(d);
            payload_crc = crc32c::crc32c(d);
        }
        let mut st = sh.st.lock();
        let (pad, epoch, seq, pos) = loop {
            if let Some(f) = &st.failed {
                return Err(failed_err(f, "write"));
            }
            let to_end = sh.cap - st.head % sh.cap;
            let pad = if total > to_end { to_end } else { 0 };
            let first = !st.epochs.contains_key(&st.cur_epoch);
            let close = if first { REC_ALIGN } else { 0 };
            if st.used() + pad + total + st.close_reserved + close <= sh.cap {
                let epoch = st.cur_epoch;
                let mut pad_at = None;
                if pad > 0 {
                    pad_at = Some((st.next_seq, st.head, pad));
                    let live = Live {
                        pos: st.head,
                        seq: st.next_seq,
                        epoch,
                        chunks: None,
                    };
                    st.live.push_back(live);
                    st.next_seq += 1;
                    st.head += pad;
                    st.stats.records += 1;
                }
                let (seq, pos) = (st.next_seq, st.head);
                st.next_seq += 1;
                st.head += total;
                break (pad_at, epoch, seq, pos);
            }
            // Back-pressure. The open epoch may hold the space that is
            // needed: close it so the writer can make it durable and apply
            // it (an extra order point never breaks the guarantee).
            // Only when nothing closed is left to apply and reclaim:
            // otherwise waiting for the writer frees space without
            // splitting the epoch.
            if st.closed_upto == st.reclaimed_epoch && st.close().is_some() {
                st.stats.forced_closes += 1;
            }
            st.stats.space_waits += 1;
            st.space_waiters += 1;
            sh.cv_writer.notify_one();
            sh.cv_space.wait(&mut st);
            st.space_waiters -= 1;
        };
        let h = RecordHeader {
            kind,
            flags,
            log_id: sh.log_id,
            seq,
            epoch,
            offset,
            len,
            payload_len: payload_len as u32,
            total_len: total as u32,
            payload_crc,
        };
        h.encode(&mut buf);
        let buf = Arc::new(buf);
        let chunks = kind.is_data().then(|| chunk_range(offset, len));
        st.live.push_back(Live {
            pos,
            seq,
            epoch,
            chunks,
        });
        if let Some((a, b)) = chunks {
            for c in a..b {
                *st.chunk_refs.entry(c).or_default() += 1;
            }
        }
        let src = match kind {
            RecordKind::Write => Some(Source::Data {
                buf: Arc::clone(&buf),
                base: offset,
                skip: REC_HDR,
            }),
            RecordKind::Zero | RecordKind::Discard => Some(Source::Zero),
            _ => None,
        };
        if let Some(src) = src {
            st.overlay.insert(offset, offset + len, seq, src);
        }
        if !st.epochs.contains_key(&epoch) {
            st.close_reserved += REC_ALIGN;
        }
        let es = st.epochs.entry(epoch).or_default();
        es.inflight += 1;
        es.count += 1;
        es.records.push(Pending {
            seq,
            kind,
            flags,
            offset,
            len,
            buf: (kind == RecordKind::Write).then(|| Arc::clone(&buf)),
        });
        st.stats.records += 1;
        st.stats.journaled_bytes += payload_len as u64;
        st.last_activity = Instant::now();
        drop(st);

        let mut res = Ok(());
        if let Some((pseq, ppos, plen)) = pad {
            let mut pb = [0u8; REC_HDR];
            RecordHeader {
                kind: RecordKind::Pad,
                flags: 0,
                log_id: sh.log_id,
                seq: pseq,
                epoch,
                offset: 0,
                len: 0,
                payload_len: 0,
                total_len: plen as u32,
                payload_crc: 0,
            }
            .encode(&mut pb);
            res = sh.log.write_at(&pb, phys(ppos, sh.cap));
        }
        if res.is_ok() {
            res = sh.log.write_at(&buf, phys(pos, sh.cap));
        }
        self.finish(epoch, res, "journal append")
    }

    /// Bookkeeping after a record's I/O: count it done, record a failure.
    fn finish(&self, epoch: Epoch, res: io::Result<()>, what: &str) -> BResult<Epoch> {
        let mut st = self.sh.st.lock();
        if let Some(es) = st.epochs.get_mut(&epoch) {
            es.inflight -= 1;
        }
        if let Err(e) = &res {
            st.fail(what.to_owned(), e);
            self.sh.wake_all();
        } else if epoch <= st.closed_upto {
            self.sh.cv_writer.notify_one();
        }
        match &st.failed {
            Some(f) => Err(failed_err(f, "write")),
            None => Ok(epoch),
        }
    }

    /// Try the in-place path. `Ok(None)`: not allowed now, journal it.
    fn write_in_place(&self, buf: &[u8], offset: u64) -> BResult<Option<Epoch>> {
        let sh = &*self.sh;
        let len = buf.len() as u64;
        let mut st = sh.st.lock();
        if let Some(f) = &st.failed {
            return Err(failed_err(f, "write"));
        }
        let first = !st.epochs.contains_key(&st.cur_epoch);
        let close = if first { REC_ALIGN } else { 0 };
        // The rule (docs/ordering.md, "Classification"): every earlier epoch
        // is durable, and no record recovery could replay touches the range.
        let allowed = st.durable_epoch + 1 == st.cur_epoch
            && st.chunks_free(offset, len)
            && st.used() + REC_ALIGN + st.close_reserved + close <= sh.cap;
        if !allowed {
            return Ok(None);
        }
        // A marker record (512 bytes always fit before the ring end).
        let epoch = st.cur_epoch;
        let (seq, pos) = (st.next_seq, st.head);
        st.next_seq += 1;
        st.head += REC_ALIGN;
        st.live.push_back(Live {
            pos,
            seq,
            epoch,
            chunks: None,
        });
        if first {
            st.close_reserved += REC_ALIGN;
        }
        let es = st.epochs.entry(epoch).or_default();
        es.inflight += 1;
        es.count += 1;
        es.in_place.push((offset, len));
        st.stats.records += 1;
        st.stats.in_place_writes += 1;
        st.last_activity = Instant::now();
        drop(st);
        let mut mb = vec![0u8; REC_ALIGN as usize];
        RecordHeader {
            kind: RecordKind::InPlace,
            flags: 0,
            log_id: sh.log_id,
            seq,
            epoch,
            offset,
            len,
            payload_len: 0,
            total_len: REC_ALIGN as u32,
            payload_crc: 0,
        }
        .encode(&mut mb);
        let mut res = sh.log.write_at(&mb, phys(pos, sh.cap));
        if res.is_ok()
            && let Err(e) = sh.inner.write_at(buf, offset, WriteOpts::default())
        {
            res = Err(io::Error::other(e.to_string()));
        }
        self.finish(epoch, res, "in-place write").map(Some)
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

impl Shared {
    fn wake_all(&self) {
        self.cv_writer.notify_all();
        self.cv_durable.notify_all();
        self.cv_space.notify_all();
    }

    fn want_durable(&self, st: &State, now: Instant) -> bool {
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

    fn want_apply(&self, st: &State, now: Instant) -> bool {
        st.durable_epoch > st.applied_epoch
            && (st.space_waiters > 0
                || st.shutdown
                || st.used() * 2 > self.cap
                || now >= st.last_activity + IDLE_APPLY)
    }

    /// Highest closed epoch whose records (and those of every earlier
    /// epoch) are all written.
    fn ready_target(&self, st: &State) -> Epoch {
        let mut t = st.durable_epoch;
        for (&e, es) in st.epochs.range(st.durable_epoch + 1..=st.closed_upto) {
            if es.inflight > 0 {
                break;
            }
            t = e;
        }
        t
    }

    fn next_deadline(&self, st: &State) -> Option<Instant> {
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

    /// Write the closing records of `(durable, target]`, fsync the journal
    /// (after an image fsync if any of them wrote in place).
    fn make_durable(&self, st: &mut MutexGuard<'_, State>, target: Epoch) -> io::Result<()> {
        let from = st.durable_epoch + 1;
        let mut in_place = false;
        let mut closes = Vec::new();
        for (&e, es) in st.epochs.range(from..=target) {
            in_place |= !es.in_place.is_empty();
            closes.push((e, es.count));
        }
        let mut runs: Vec<(u64, Vec<u8>)> = Vec::new();
        for (e, count) in closes {
            let (seq, pos) = (st.next_seq, st.head);
            st.next_seq += 1;
            st.head += REC_ALIGN;
            st.close_reserved -= REC_ALIGN;
            st.stats.records += 1;
            st.live.push_back(Live {
                pos,
                seq,
                epoch: e,
                chunks: None,
            });
            let mut b = vec![0u8; REC_ALIGN as usize];
            RecordHeader {
                kind: RecordKind::Close,
                flags: 0,
                log_id: self.log_id,
                seq,
                epoch: e,
                offset: 0,
                len: count,
                payload_len: 0,
                total_len: REC_ALIGN as u32,
                payload_crc: 0,
            }
            .encode(&mut b);
            let p = phys(pos, self.cap);
            match runs.last_mut() {
                Some((start, run)) if *start + run.len() as u64 == p => run.extend_from_slice(&b),
                _ => runs.push((p, b)),
            }
        }
        let hook = self.hook.lock().clone();
        let closed: Vec<ClosedEpoch> = match &hook {
            Some(_) => st
                .epochs
                .range(from..=target)
                .map(|(&e, es)| closed_epoch(e, es))
                .collect(),
            None => Vec::new(),
        };
        let res = MutexGuard::unlocked(st, || -> io::Result<()> {
            if in_place {
                self.inner
                    .flush()
                    .map_err(|e| io::Error::other(e.to_string()))?;
            }
            for (p, run) in &runs {
                self.log.write_at(run, *p)?;
            }
            self.log.sync()
        });
        if in_place {
            st.stats.image_syncs += 1;
        }
        st.stats.journal_syncs += 1;
        res?;
        // The hook runs before flush callers are released: an acknowledged
        // flush implies the hook has seen its epoch (a synchronous
        // replication hook makes flush wait for the replica).
        if let Some(h) = hook {
            MutexGuard::unlocked(st, || {
                for c in &closed {
                    h(c);
                }
            });
        }
        st.durable_epoch = target;
        self.cv_durable.notify_all();
        Ok(())
    }

    /// Apply every durable epoch to the image, fsync it, then reclaim the
    /// ring space of applied epochs.
    fn apply(&self, st: &mut MutexGuard<'_, State>) -> io::Result<()> {
        let target = st.durable_epoch;
        let keys: Vec<Epoch> = st.epochs.range(..=target).map(|(&e, _)| e).collect();
        let mut recs = Vec::new();
        for e in keys {
            if let Some(es) = st.epochs.remove(&e) {
                recs.extend(es.records);
            }
        }
        let res = MutexGuard::unlocked(st, || -> BResult<()> {
            for r in &recs {
                match r.kind {
                    RecordKind::Write => {
                        let b = r.buf.as_deref().map_or(&[][..], |b| &b[REC_HDR..]);
                        let n = (r.len as usize).min(b.len());
                        self.inner
                            .write_at(&b[..n], r.offset, WriteOpts::default())?;
                    }
                    RecordKind::Zero => self.inner.write_zeroes(
                        r.offset,
                        r.len,
                        ZeroOpts {
                            may_unmap: r.flags & FLAG_MAY_UNMAP != 0,
                            ..Default::default()
                        },
                    )?,
                    RecordKind::Discard => {
                        self.inner.discard(r.offset, r.len, WriteOpts::default())?
                    }
                    _ => {}
                }
            }
            self.inner.flush()
        });
        st.stats.image_syncs += 1;
        res.map_err(|e| io::Error::other(e.to_string()))?;
        for r in &recs {
            st.overlay.remove_seq(r.offset, r.offset + r.len, r.seq);
        }
        st.applied_epoch = target;
        // Reclaim: the image holds every epoch <= target durably.
        let mut freed = Vec::new();
        while st.live.front().is_some_and(|l| l.epoch <= target) {
            freed.extend(st.live.pop_front());
        }
        if freed.is_empty() {
            st.reclaimed_epoch = target;
            self.cv_space.notify_all();
            return Ok(());
        }
        let (tail, tail_seq) = st
            .live
            .front()
            .map_or((st.head, st.next_seq), |l| (l.pos, l.seq));
        st.generation += 1;
        let header = Header {
            log_id: self.log_id,
            generation: st.generation,
            capacity: self.cap,
            image_size: self.image_size,
            tail,
            tail_seq,
            base_epoch: target,
        };
        let res = MutexGuard::unlocked(st, || write_header(&*self.log, &header));
        st.stats.journal_syncs += 1;
        res?;
        // Only now may the space be reused and the ranges written in place:
        // before the header is durable, recovery would still replay them.
        st.tail = tail;
        st.reclaimed_epoch = target;
        for l in freed {
            if let Some((a, b)) = l.chunks {
                for c in a..b {
                    if let Some(n) = st.chunk_refs.get_mut(&c) {
                        *n -= 1;
                        if *n == 0 {
                            st.chunk_refs.remove(&c);
                        }
                    }
                }
            }
        }
        self.cv_space.notify_all();
        Ok(())
    }
}

fn closed_epoch(epoch: Epoch, es: &EpochState) -> ClosedEpoch {
    let mut writes: Vec<EpochWrite> = es
        .records
        .iter()
        .map(|r| EpochWrite {
            offset: r.offset,
            len: r.len,
            kind: match (r.kind, &r.buf) {
                (RecordKind::Write, Some(b)) => EpochWriteKind::Data(EpochData {
                    buf: Arc::clone(b),
                    len: r.len as usize,
                }),
                (RecordKind::Discard, _) => EpochWriteKind::Discard,
                _ => EpochWriteKind::Zero,
            },
        })
        .collect();
    writes.extend(es.in_place.iter().map(|&(offset, len)| EpochWrite {
        offset,
        len,
        kind: EpochWriteKind::InPlace,
    }));
    ClosedEpoch { epoch, writes }
}

fn writer_main(sh: &Shared) {
    let mut st = sh.st.lock();
    loop {
        if st.failed.is_some() {
            sh.wake_all();
            if st.shutdown {
                break;
            }
            sh.cv_writer.wait(&mut st);
            continue;
        }
        let now = Instant::now();
        if sh.want_durable(&st, now) {
            let target = sh.ready_target(&st);
            if target > st.durable_epoch {
                if let Err(e) = sh.make_durable(&mut st, target) {
                    st.fail("journal close/fsync".into(), &e);
                }
                continue;
            }
            // Writes of a closed epoch are still in flight; `finish` wakes us.
            sh.cv_writer.wait(&mut st);
            continue;
        }
        if sh.want_apply(&st, now) {
            if let Err(e) = sh.apply(&mut st) {
                st.fail("apply to image".into(), &e);
            }
            continue;
        }
        if st.shutdown && st.closed_upto == st.applied_epoch && st.cur_epoch == st.closed_upto + 1 {
            break;
        }
        match sh.next_deadline(&st) {
            Some(d) => {
                sh.cv_writer.wait_until(&mut st, d);
            }
            None => sh.cv_writer.wait(&mut st),
        }
    }
    sh.wake_all();
}

fn write_header(log: &dyn LogFile, h: &Header) -> io::Result<()> {
    let mut b = vec![0u8; HEADER_SLOT as usize];
    h.encode(&mut b);
    log.write_at(&b, (h.generation % 2) * HEADER_SLOT)?;
    log.sync()
}

fn header_area_blank(log: &dyn LogFile, len: u64) -> Result<bool, JournalError> {
    let n = len.min(RING_START) as usize;
    let mut b = vec![0u8; n];
    log.read_at(&mut b, 0)
        .map_err(|source| JournalError::Read { offset: 0, source })?;
    Ok(b.iter().all(|&x| x == 0) || n < HEADER_LEN)
}

fn replay(
    inner: &dyn Disk,
    log: &dyn LogFile,
    s: &scan::Scan,
) -> Result<RecoveryReport, JournalError> {
    let mut rep = RecoveryReport {
        found_journal: true,
        last_epoch: s.complete,
        replayed_epochs: s.complete - s.header.base_epoch,
        ..Default::default()
    };
    rep.dropped_records = s
        .records
        .iter()
        .filter(|r| r.header.kind.is_data() && r.header.epoch > s.complete)
        .count() as u64;
    let size = inner.size();
    let mut buf = Vec::new();
    for r in s.replay_set() {
        let h = &r.header;
        let epoch = h.epoch;
        let err = |source| JournalError::Replay { epoch, source };
        check_range(h.offset, h.len, size).map_err(err)?;
        match h.kind {
            RecordKind::Write => {
                let off = phys(r.pos, s.header.capacity) + REC_HDR as u64;
                // Bounded by the scan: payload_len <= total_len <= capacity.
                buf.resize(h.payload_len as usize, 0);
                log.read_at(&mut buf, off)
                    .map_err(|source| JournalError::Read {
                        offset: off,
                        source,
                    })?;
                if crc32c::crc32c(&buf) != h.payload_crc {
                    return Err(JournalError::Read {
                        offset: off,
                        source: io::Error::new(
                            io::ErrorKind::InvalidData,
                            "payload changed between scan and replay",
                        ),
                    });
                }
                inner
                    .write_at(&buf, h.offset, WriteOpts::default())
                    .map_err(err)?;
            }
            RecordKind::Zero => inner
                .write_zeroes(
                    h.offset,
                    h.len,
                    ZeroOpts {
                        may_unmap: h.flags & FLAG_MAY_UNMAP != 0,
                        ..Default::default()
                    },
                )
                .map_err(err)?,
            RecordKind::Discard => inner
                .discard(h.offset, h.len, WriteOpts::default())
                .map_err(err)?,
            _ => continue,
        }
        rep.replayed_records += 1;
    }
    inner
        .flush()
        .map_err(|source| JournalError::ReplayFlush { source })?;
    Ok(rep)
}

impl DiskSize for EpochDisk {
    fn size(&self) -> u64 {
        self.sh.image_size
    }
}

impl DiskRead for EpochDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BResult<()> {
        let len = buf.len() as u64;
        check_range(offset, len, self.sh.image_size)?;
        let segs = self.sh.st.lock().overlay.lookup(offset, offset + len);
        for (s, e, src) in segs {
            let out = &mut buf[(s - offset) as usize..(e - offset) as usize];
            match src {
                Some(src) => copy_from(&src, s, out),
                None => self.sh.inner.read_at(out, s)?,
            }
        }
        Ok(())
    }
}

impl DiskWrite for EpochDisk {
    fn write_at(&self, buf: &[u8], offset: u64, opts: WriteOpts) -> BResult<()> {
        check_range(offset, buf.len() as u64, self.sh.image_size)?;
        if self.sh.inner.info().read_only {
            return Err(BlockError::ReadOnly);
        }
        if buf.is_empty() {
            return Ok(());
        }
        let mut epoch = None;
        if let Some(min) = self.sh.in_place_min
            && buf.len() as u64 >= min
        {
            epoch = self.write_in_place(buf, offset)?;
        }
        let epoch = match epoch {
            Some(e) => e,
            None => {
                let mut e = 0;
                let step = self.sh.max_payload as usize;
                for (i, chunk) in buf.chunks(step).enumerate() {
                    let off = offset + (i * step) as u64;
                    e = self.append(RecordKind::Write, 0, off, chunk.len() as u64, Some(chunk))?;
                }
                e
            }
        };
        if opts.fua {
            self.fua(epoch)?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> BResult<()> {
        check_range(offset, len, self.sh.image_size)?;
        if len == 0 {
            return Ok(());
        }
        let flags = if opts.may_unmap { FLAG_MAY_UNMAP } else { 0 };
        let e = self.append(RecordKind::Zero, flags, offset, len, None)?;
        if opts.write.fua {
            self.fua(e)?;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64, opts: WriteOpts) -> BResult<()> {
        check_range(offset, len, self.sh.image_size)?;
        if len == 0 {
            return Ok(());
        }
        let e = self.append(RecordKind::Discard, 0, offset, len, None)?;
        if opts.fua {
            self.fua(e)?;
        }
        Ok(())
    }

    fn flush(&self) -> BResult<()> {
        match self.sh.policy {
            FlushPolicy::Durable => self.sync().map(|_| ()),
            FlushPolicy::Ordered { .. } => self.order().map(|_| ()),
        }
    }

    fn order(&self) -> BResult<Epoch> {
        let mut st = self.sh.st.lock();
        if let Some(f) = &st.failed {
            return Err(failed_err(f, "order"));
        }
        let had_pending = st.closed_upto > st.durable_epoch;
        let e = st.close().unwrap_or(st.closed_upto);
        // Under Ordered the writer only has to hear of the first epoch
        // waiting for durability (its interval deadline counts from that
        // epoch, which a later close does not move) and of a ring past its
        // high-water mark. Waking it on every order cost a context switch
        // and a contended lock per NBD FLUSH.
        let wake = match self.sh.policy {
            FlushPolicy::Durable => true,
            FlushPolicy::Ordered { .. } => !had_pending || st.used() * 2 > self.sh.cap,
        };
        if wake {
            self.sh.cv_writer.notify_one();
        }
        Ok(e)
    }
}

impl DiskMap for EpochDisk {
    fn map(&self, offset: u64, len: u64) -> BResult<Vec<Extent>> {
        check_range(offset, len, self.sh.image_size)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let end = offset + len;
        let next = self.sh.st.lock().overlay.next_piece(offset);
        let limit = match next {
            Some((s, e, zero)) if s <= offset => {
                let kind = if zero {
                    ExtentKind::Zero
                } else {
                    ExtentKind::Data
                };
                return Ok(vec![Extent {
                    offset,
                    len: e.min(end) - offset,
                    kind,
                }]);
            }
            Some((s, _, _)) if s < end => s,
            _ => end,
        };
        let mut v = self.sh.inner.map(offset, limit - offset)?;
        v.retain_mut(|x| {
            if x.offset >= limit {
                return false;
            }
            x.len = x.len.min(limit - x.offset);
            true
        });
        Ok(v)
    }
}

impl Disk for EpochDisk {
    fn info(&self) -> DiskInfo {
        DiskInfo {
            // One journal serves every handle of this disk.
            flush_covers_all_handles: true,
            can_fast_zero: true,
            ..self.sh.inner.info()
        }
    }
}
