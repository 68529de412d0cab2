//! [`Primary`]: replicate an open export to a backup.
//!
//! ```text
//!            start ──▶ Connecting ──connect + hello/welcome──▶ decide()
//!              ▲          ▲   │ (backoff)                        │
//!              │          │   ▼                                  ├── refused ──▶ Refused (operator)
//!              │          └── link lost ◀── Resyncing ◀──────────┘
//!              │                   │            │ rounds over `pending` (copy engine)
//!              │                   │            ▼ flush point acked, pending empty
//!              │                   └───────  InSync  (ResyncDone: both take the same generations)
//! ```
//!
//! A connector thread connects with backoff and runs one session at a
//! time on itself; each session has a receiver thread for the acks. The
//! session thread is the only one that sends in async and epoch mode (the
//! queue, copy rounds, flush points); in sync mode the writers' threads
//! also send. See `docs/replication.md` for the semantics of each mode.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use understudy_bitmap::{BitmapStore, DirtyBitmap, Taken};
use understudy_copy::{Copier, CopyOptions, NoProgress};
use understudy_filter::{FilterDisk, WriteObserver};
use understudy_peer::{Link, PeerConfig, PeerError};
use understudy_stack::ExportStack;

use crate::error::ReplicationError;
use crate::generation::{
    self, AfterSplitBrain, Decision, Direction, GenRecord, GenState, Generations, Resolution, Role,
    SplitFacts,
};
use crate::observer::{Item, ReplicaObserver, Stream};
use crate::session::{Session, SessionSink};
use crate::wire::{self, CopyInfo, Hello, Mode, Msg};

/// The per-peer persistent bitmap's name in the export's bitmap store.
pub const BITMAP: &str = "replica";
/// Its granularity when the replica creates it.
pub const DEFAULT_GRANULARITY: u64 = 64 * 1024;
/// The link purpose a primary announces.
pub const PURPOSE: &str = "replicate";

/// How a [`Primary`] replicates.
#[derive(Clone, Debug)]
pub struct PrimaryConfig {
    /// Mode. No default.
    pub mode: Mode,
    /// The backup's peer address (`host:port` or `unix:/path`). No default.
    pub peer_addr: String,
    /// The peer link settings (key, node id, timeouts). No default.
    pub link: PeerConfig,
    /// async/epoch: most bytes queued or in flight before writes fall back
    /// to bitmap tracking. Default: 64 MiB.
    pub max_lag: u64,
    /// async/epoch: the longest a queued write may wait for the backup's
    /// ack before writes fall back to bitmap tracking (`None`: no time
    /// bound). Default: none.
    pub max_lag_time: Option<Duration>,
    /// Compare block hashes before sending resync data (after a crash, or
    /// when the backup may already hold most of it). A full sync always
    /// does. Default: false.
    pub checksum: bool,
    /// What to do after a split brain. Default: disconnect.
    pub after_split_brain: AfterSplitBrain,
    /// How long a sent request may wait for its ack before the session is
    /// dropped. Default: 10 s.
    pub ack_timeout: Duration,
    /// First reconnect delay, doubled up to `reconnect_max`. Default: 100 ms.
    pub reconnect_min: Duration,
    /// Longest reconnect delay. Default: 5 s.
    pub reconnect_max: Duration,
    /// How often the persistent bitmap is cleared of what the backup holds
    /// durably. Default: 1 s.
    pub clean_interval: Duration,
    /// Largest piece the copy engine reads and sends. Default: 1 MiB.
    pub chunk: usize,
    /// A resync flushes the backup after this many bytes, so an
    /// interrupted resync resumes from there. Default: 16 MiB.
    pub resync_checkpoint: u64,
    /// Resync rate limit in bytes per second (`None`: unlimited; streamed
    /// writes are never limited). Default: unlimited.
    pub resync_bandwidth: Option<u64>,
    /// Granularity of the per-peer bitmap if it is created. Default: 64 KiB.
    pub granularity: u64,
}

impl PrimaryConfig {
    /// Defaults for replicating in `mode` to `peer_addr` over `link`.
    pub fn new(mode: Mode, peer_addr: impl Into<String>, link: PeerConfig) -> Self {
        Self {
            mode,
            peer_addr: peer_addr.into(),
            link,
            max_lag: 64 << 20,
            max_lag_time: None,
            checksum: false,
            after_split_brain: AfterSplitBrain::Disconnect,
            ack_timeout: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            clean_interval: Duration::from_secs(1),
            chunk: 1 << 20,
            resync_checkpoint: 16 << 20,
            resync_bandwidth: None,
            granularity: DEFAULT_GRANULARITY,
        }
    }
}

/// Where a primary stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// Not connected; trying (with backoff) unless disconnected on request.
    Connecting,
    /// Disconnected on request ([`Primary::disconnect`]); writes are
    /// tracked until [`Primary::reconnect`].
    Disconnected,
    /// Connected; copying what the backup lacks.
    Resyncing,
    /// Connected; the backup holds everything but the stream in flight.
    InSync,
    /// The generations refused the pair; nothing was overwritten. The
    /// operator must resolve it (no reconnects until then).
    Refused(Decision),
    /// Stopped.
    Stopped,
}

/// A snapshot of a primary's progress.
#[derive(Clone, Debug)]
pub struct Status {
    /// Where it stands.
    pub state: State,
    /// Mode.
    pub mode: Mode,
    /// Bytes queued or sent and not acknowledged.
    pub lag_bytes: u64,
    /// Bytes the backup lacks beyond the stream.
    pub pending_bytes: u64,
    /// Data bytes sent by resync rounds (not counting streamed writes).
    pub resync_bytes: u64,
    /// Sessions started.
    pub sessions: u64,
    /// How often async/epoch writes fell back to the bitmap because the
    /// backup lagged past a bound.
    pub fell_behind: u64,
    /// Why the last session or connect failed.
    pub last_error: Option<String>,
    /// This copy's generations.
    pub gens: Generations,
}

struct Shared {
    cfg: PrimaryConfig,
    image: PathBuf,
    filter: Arc<FilterDisk>,
    persistent: Arc<DirtyBitmap>,
    obs: Arc<ReplicaObserver>,
    obs_dyn: Arc<dyn WriteObserver>,
    record: Arc<Mutex<GenRecord>>,
    crashed: bool,
    status: Mutex<Status>,
    status_cv: Condvar,
    stop: AtomicBool,
    paused: AtomicBool,
    wake: (Mutex<()>, Condvar),
    current: Mutex<Option<Arc<Session>>>,
    resync_sent: Arc<AtomicU64>,
    /// The backup instance of the last session.
    backup_instance: Mutex<Option<u64>>,
}

/// A replicating primary (see the module docs).
pub struct Primary {
    sh: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Primary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Primary")
            .field("image", &self.sh.image)
            .field("status", &*self.sh.status.lock())
            .finish()
    }
}

/// A filter observer that does nothing: adding and removing it waits for
/// the writes in flight (a drain).
#[derive(Debug)]
struct Drain;

impl WriteObserver for Drain {
    fn before_write(
        &self,
        _op: &understudy_filter::WriteOp<'_>,
    ) -> Result<understudy_filter::WriteToken, understudy_filter::ObserverError> {
        Ok(understudy_filter::WriteToken::default())
    }
    fn after_write(
        &self,
        _op: &understudy_filter::WriteOp<'_>,
        _token: understudy_filter::WriteToken,
        _outcome: Result<(), &understudy_block::BlockError>,
    ) {
    }
}

/// Wait until every write in flight in `filter` has completed.
fn drain(filter: &FilterDisk) {
    let d: Arc<dyn WriteObserver> = Arc::new(Drain);
    filter.add_observer(d.clone());
    filter.remove_observer(&d);
}

/// The per-peer bitmap of `store`, created if missing.
fn peer_bitmap(
    store: &BitmapStore,
    granularity: u64,
) -> Result<Arc<DirtyBitmap>, ReplicationError> {
    let err = |source: Box<dyn std::error::Error + Send + Sync>| ReplicationError::Bitmap {
        name: BITMAP.into(),
        source,
    };
    if store.get(BITMAP).is_none() {
        store
            .add(BITMAP, granularity)
            .map_err(|e| err(Box::new(e)))?;
    }
    store
        .get(BITMAP)
        .ok_or_else(|| err("it vanished after it was added".into()))
}

/// Load the record of a primary (creating it) and note an unclean stop.
/// The first write without the backup starts a new generation (see the
/// observer).
fn open_record(stack: &ExportStack) -> Result<(GenRecord, bool), ReplicationError> {
    let rec_err = |source| ReplicationError::Record { source };
    let mut rec = generation::load(&stack.image)
        .map_err(rec_err)?
        .unwrap_or_else(|| {
            GenRecord::new(
                &stack.name,
                Role::Primary,
                Generations::fresh(generation::new_id()),
            )
        });
    if rec.role == Role::Backup {
        return Err(ReplicationError::Role {
            role: rec.role,
            what: "promote it before replicating from it",
        });
    }
    let crashed = rec.primary_open;
    rec.primary_open = true;
    generation::store(&stack.image, &rec).map_err(rec_err)?;
    Ok((rec, crashed))
}

impl Primary {
    /// Start replicating `stack` as configured: install the observer on
    /// its filter and start connecting. Writes are tracked from here on,
    /// connected or not.
    pub fn start(stack: &ExportStack, cfg: PrimaryConfig) -> Result<Primary, ReplicationError> {
        let persistent = peer_bitmap(&stack.store, cfg.granularity)?;
        let size = understudy_block::DiskSize::size(&*stack.filter);
        let pending = Arc::new(
            DirtyBitmap::new(size, persistent.granularity()).map_err(|e| {
                ReplicationError::Bitmap {
                    name: "pending".into(),
                    source: Box::new(e),
                }
            })?,
        );
        let (record, crashed) = open_record(stack)?;
        let record = Arc::new(Mutex::new(record));
        let obs = Arc::new(ReplicaObserver::new(
            cfg.mode,
            (cfg.max_lag, cfg.max_lag_time),
            pending,
            record.clone(),
            stack.image.clone(),
        ));
        let obs_dyn: Arc<dyn WriteObserver> = obs.clone();
        stack.filter.add_observer(obs_dyn.clone());
        let status = Status {
            state: State::Connecting,
            mode: cfg.mode,
            lag_bytes: 0,
            pending_bytes: 0,
            resync_bytes: 0,
            sessions: 0,
            fell_behind: 0,
            last_error: None,
            gens: record.lock().gens.clone(),
        };
        let sh = Arc::new(Shared {
            cfg,
            image: stack.image.clone(),
            filter: stack.filter.clone(),
            persistent,
            obs,
            obs_dyn,
            record,
            crashed,
            status: Mutex::new(status),
            status_cv: Condvar::new(),
            stop: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            wake: (Mutex::new(()), Condvar::new()),
            current: Mutex::new(None),
            resync_sent: Arc::new(AtomicU64::new(0)),
            backup_instance: Mutex::new(None),
        });
        let sh2 = sh.clone();
        let h = std::thread::Builder::new()
            .name("replica-primary".into())
            .spawn(move || sh2.connector())
            .map_err(|source| ReplicationError::Thread {
                name: "replica-primary",
                source,
            })?;
        Ok(Primary {
            sh,
            thread: Mutex::new(Some(h)),
        })
    }

    /// The current status.
    pub fn status(&self) -> Status {
        self.sh.status()
    }

    /// Wait until `pred` holds for the status, or `timeout` passes; returns
    /// the last status either way (check it).
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&Status) -> bool) -> Status {
        let deadline = Instant::now() + timeout;
        let mut st = self.sh.status.lock();
        loop {
            self.sh.refresh(&mut st);
            if pred(&st) || Instant::now() >= deadline {
                let mut out = st.clone();
                drop(st);
                out.gens = self.sh.record.lock().gens.clone();
                return out;
            }
            // Counters change without a notification: look again soon.
            let step = Instant::now() + Duration::from_millis(20);
            self.sh.status_cv.wait_until(&mut st, step.min(deadline));
        }
    }

    /// Close an epoch now (epoch mode: the VM layer's checkpoint). Returns
    /// the local epoch number (0 without a local journal).
    pub fn close_epoch(&self) -> Result<u64, ReplicationError> {
        use understudy_block::DiskWrite;
        self.sh
            .filter
            .order()
            .map_err(|source| ReplicationError::Disk {
                op: "close an epoch",
                source,
            })
    }

    /// Drop the current connection and stay disconnected until
    /// [`Primary::reconnect`] (writes are tracked meanwhile).
    pub fn disconnect(&self) {
        self.sh.paused.store(true, Ordering::SeqCst);
        self.sh.cut("disconnected on request");
    }

    /// Connect again after [`Primary::disconnect`] or a refusal.
    pub fn reconnect(&self) {
        self.sh.paused.store(false, Ordering::SeqCst);
        {
            let mut st = self.sh.status.lock();
            if matches!(st.state, State::Refused(_)) {
                st.state = State::Connecting;
            }
        }
        self.sh.wake.1.notify_all();
    }

    /// Close the current connection's socket as a network failure would;
    /// the primary reconnects with backoff.
    pub fn cut_link(&self) {
        self.sh.cut("link cut");
    }

    /// Online verify: compare the block hashes (per bitmap granule) of both
    /// copies over the live session and report the ranges that differ,
    /// checking each mismatch twice so a block rewritten during the pass
    /// is not reported. With `repair`, the differing ranges are marked for
    /// the next copy round. Needs the pair in sync.
    pub fn verify(&self, repair: bool) -> Result<VerifyReport, ReplicationError> {
        let session = self.sh.current.lock().clone();
        let Some(s) = session.filter(|_| self.sh.status.lock().state == State::InSync) else {
            return Err(ReplicationError::Role {
                role: Role::Primary,
                what: "verify needs the pair in sync; wait for it (status) and retry",
            });
        };
        let block = self.sh.persistent.granularity();
        let size = understudy_block::DiskSize::size(&*self.sh.filter);
        let mut report = VerifyReport::default();
        let mut off = 0;
        while off < size {
            let len = (wire::MAX_HASHES as u64 * block)
                .min(size - off)
                .min(64 << 20);
            let differ = self.sh.differing(&s, off, len, block)?;
            report.blocks += len.div_ceil(block);
            for (o, l) in differ {
                // Looked at again: a block written meanwhile now matches.
                if !self.sh.differing(&s, o, l, block)?.is_empty() {
                    report.differing.push((o, l));
                }
            }
            off += len;
        }
        if repair {
            for &(o, l) in &report.differing {
                self.sh.obs.pending.mark(o, l);
            }
        }
        Ok(report)
    }

    /// Stop replicating: end the session, remove the observer, and record
    /// a clean stop.
    pub fn stop(self) -> Result<(), ReplicationError> {
        self.sh.stop.store(true, Ordering::SeqCst);
        self.sh.cut("primary stopping");
        self.sh.wake.1.notify_all();
        if let Some(h) = self.thread.lock().take()
            && h.join().is_err()
        {
            tracing::error!("replication primary thread panicked");
        }
        self.sh.filter.remove_observer(&self.sh.obs_dyn);
        let mut rec = self.sh.record.lock();
        rec.primary_open = false;
        generation::store(&self.sh.image, &rec)
            .map_err(|source| ReplicationError::Record { source })?;
        self.sh.set_state(State::Stopped);
        Ok(())
    }
}

/// What [`Primary::verify`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Blocks compared.
    pub blocks: u64,
    /// Ranges `(offset, len)` whose contents differ on the backup.
    pub differing: Vec<(u64, u64)>,
}

impl Shared {
    /// The blocks of `[off, off + len)` whose hashes differ on the backup.
    fn differing(
        &self,
        s: &Session,
        off: u64,
        len: u64,
        block: u64,
    ) -> Result<Vec<(u64, u64)>, ReplicationError> {
        use understudy_block::DiskRead;
        let theirs = s.hashes(off, len, block as u32)?;
        let mut buf = vec![0u8; block as usize];
        let mut out = Vec::new();
        let mut pos = off;
        for h in theirs {
            let n = block.min(off + len - pos);
            let b = &mut buf[..n as usize];
            self.filter
                .read_at(b, pos)
                .map_err(|source| ReplicationError::Disk {
                    op: "read for verify",
                    source,
                })?;
            if wire::extent_hash(b) != h {
                out.push((pos, n));
            }
            pos += n;
        }
        Ok(out)
    }

    /// Lock order: `record` before `status`, never the other way.
    fn status(&self) -> Status {
        let gens = self.record.lock().gens.clone();
        let mut st = self.status.lock();
        self.refresh(&mut st);
        st.gens = gens;
        st.clone()
    }

    fn refresh(&self, st: &mut Status) {
        st.lag_bytes = self.obs.lag_bytes();
        st.pending_bytes = self.obs.pending_bytes();
        st.resync_bytes = self.resync_sent.load(Ordering::Relaxed);
        st.fell_behind = self.obs.behind_events.load(Ordering::SeqCst);
    }

    fn set_state(&self, state: State) {
        self.status.lock().state = state;
        self.status_cv.notify_all();
    }

    fn set_error(&self, e: &ReplicationError) {
        let mut text = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            text.push_str(": ");
            text.push_str(&s.to_string());
            src = s.source();
        }
        self.status.lock().last_error = Some(text);
        self.status_cv.notify_all();
    }

    fn cut(&self, why: &str) {
        if let Some(s) = self.current.lock().clone() {
            s.fail(why);
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Sleep up to `d`, waking early on stop, reconnect or disconnect.
    fn pause_for(&self, d: Duration) {
        let mut g = self.wake.0.lock();
        if !self.stopping() {
            self.wake.1.wait_for(&mut g, d);
        }
    }

    fn connector(self: Arc<Self>) {
        let mut backoff = self.cfg.reconnect_min;
        while !self.stopping() {
            let refused = matches!(self.status.lock().state, State::Refused(_));
            if refused {
                self.pause_for(Duration::from_secs(1));
                continue;
            }
            if self.paused.load(Ordering::SeqCst) {
                self.set_state(State::Disconnected);
                self.pause_for(Duration::from_secs(1));
                continue;
            }
            self.set_state(State::Connecting);
            let link = match Link::connect(&self.cfg.peer_addr, &self.cfg.link, PURPOSE) {
                Ok(l) => l,
                Err(source) => {
                    self.set_error(&ReplicationError::Connect {
                        addr: self.cfg.peer_addr.clone(),
                        source,
                    });
                    self.pause_for(backoff);
                    backoff = (backoff * 2).min(self.cfg.reconnect_max);
                    continue;
                }
            };
            self.status.lock().sessions += 1;
            let result = self.run_session(link);
            // A session that got the pair in sync earns a quick reconnect;
            // one that failed before backs off like a failed connect.
            if self.status.lock().state == State::InSync {
                backoff = self.cfg.reconnect_min;
            } else {
                backoff = (backoff * 2).min(self.cfg.reconnect_max);
            }
            self.end_session();
            self.set_state(State::Connecting);
            if let Err(e) = result {
                tracing::warn!(error = %e, "replication session ended");
                self.set_error(&e);
                if let ReplicationError::Refused { decision } = e {
                    self.set_state(State::Refused(decision));
                } else {
                    self.pause_for(backoff);
                }
            }
        }
    }

    fn copy_info(&self, rec: &GenRecord) -> CopyInfo {
        CopyInfo {
            gens: rec.gens.clone(),
            crashed_primary: self.crashed,
            changed_bytes: self.persistent.dirty_bytes(),
            promoted_at_ms: rec.promoted_at_ms,
        }
    }

    /// Hello, welcome, and what the generations allow: `Ok((full,
    /// instance))` for a sync from this copy (full: every block, by hash)
    /// to the backup instance `instance`.
    fn handshake(&self, link: &mut Link) -> Result<(bool, u64), ReplicationError> {
        let rec = self.record.lock().clone();
        let hello = Msg::Hello(Hello {
            min_version: wire::MIN_VERSION,
            max_version: wire::MAX_VERSION,
            mode: self.cfg.mode,
            size: understudy_block::DiskSize::size(&*self.filter),
            name: rec.name.clone(),
            copy: self.copy_info(&rec),
        });
        let (t, body, _) = hello
            .encode()
            .map_err(|source| ReplicationError::Wire { source })?;
        link.send(t, &body)
            .map_err(|source| ReplicationError::Send { source })?;
        let frame = link.recv().map_err(|source| match source {
            PeerError::Remote { code, message } => ReplicationError::Peer { code, message },
            source => ReplicationError::Recv { source },
        })?;
        let welcome = match Msg::decode(frame.msg_type, &frame.payload) {
            Ok(Msg::Welcome(w)) => w,
            Ok(other) => {
                return Err(ReplicationError::Protocol {
                    reason: format!("expected a welcome, got {:?}", other.msg_type()),
                });
            }
            Err(source) => return Err(ReplicationError::Wire { source }),
        };
        let peer = GenState {
            gens: welcome.copy.gens.clone(),
            crashed_primary: welcome.copy.crashed_primary,
        };
        let decision = generation::decide(&rec.state(self.crashed), &peer);
        tracing::info!(?decision, peer = %link.peer().node_id, "replication connect decision");
        let full = self.plan(decision, &rec, &link.peer().node_id, &welcome.copy)?;
        let mut rec = self.record.lock();
        rec.peer = Some(link.peer().node_id.clone());
        rec.resync = Some(generation::ResyncMarker {
            peer: link.peer().node_id.clone(),
            source: true,
        });
        generation::store(&self.image, &rec)
            .map_err(|source| ReplicationError::Record { source })?;
        Ok((full, welcome.instance))
    }

    /// What this copy does with `decision`: `Ok(full)` to sync the peer
    /// (full: every block, by hash), or the refusal.
    fn plan(
        &self,
        decision: Decision,
        rec: &GenRecord,
        peer_node: &str,
        peer: &CopyInfo,
    ) -> Result<bool, ReplicationError> {
        match decision {
            Decision::NoSync
            | Decision::SyncFromBitmap {
                direction: Direction::ToPeer,
            } => Ok(false),
            Decision::FullSync {
                direction: Direction::ToPeer,
            } => Ok(true),
            Decision::SplitBrain { recoverable: true } => {
                let mine = SplitFacts {
                    node: self.cfg.link.node_id.clone(),
                    changed_bytes: self.persistent.dirty_bytes(),
                    promoted_at_ms: rec.promoted_at_ms,
                };
                let theirs = SplitFacts {
                    node: peer_node.to_owned(),
                    changed_bytes: peer.changed_bytes,
                    promoted_at_ms: peer.promoted_at_ms,
                };
                match generation::resolve_split_brain(&self.cfg.after_split_brain, &mine, &theirs) {
                    Resolution::DiscardPeer => Ok(true),
                    _ => Err(self.refuse(decision)),
                }
            }
            _ => Err(self.refuse(decision)),
        }
    }

    fn refuse(&self, decision: Decision) -> ReplicationError {
        if matches!(decision, Decision::SplitBrain { .. }) {
            tracing::error!(
                ?decision,
                "split brain detected; nothing is overwritten without an after-split-brain policy"
            );
            let mut rec = self.record.lock();
            rec.split_brain = true;
            if let Err(e) = generation::store(&self.image, &rec) {
                tracing::warn!(error = %e, "cannot record the split brain");
            }
        }
        ReplicationError::Refused { decision }
    }

    fn run_session(&self, mut link: Link) -> Result<(), ReplicationError> {
        let (full, instance) = self.handshake(&mut link)?;
        let (tx, rx) = link.split();
        let epochs = self.cfg.mode == Mode::Epoch;
        let session = Session::start(tx, rx, self.obs.lag.clone(), self.cfg.ack_timeout, epochs)?;
        *self.current.lock() = Some(session.clone());
        // `pending` covers everything a backup instance we streamed to
        // before may lack; another instance (or our own restart) may lack
        // anything since the last clean of the persistent bitmap.
        let mut last = self.backup_instance.lock();
        if *last != Some(instance) {
            merge(&self.obs.pending, &self.persistent)?;
            *last = Some(instance);
        }
        drop(last);
        if full {
            self.obs.pending.mark_all();
        }
        let checksum = (full || self.cfg.checksum).then_some(self.persistent.granularity() as u32);
        *self.obs.stream.write() = Stream::On(session.clone());
        // Every write that missed the switch has marked `pending` now.
        drain(&self.filter);
        self.set_state(State::Resyncing);
        let mut lp = LoopState {
            round_end: self.obs.queue.enqueued.load(Ordering::SeqCst),
            clean: None,
            in_sync: false,
            owe_close: false,
            last_clean: Instant::now(),
            checksum,
        };
        while !self.stopping() && !self.paused.load(Ordering::SeqCst) {
            if session.is_dead() {
                return Err(ReplicationError::Recv {
                    source: PeerError::Protocol {
                        reason: session.why_dead().unwrap_or_default(),
                    },
                });
            }
            self.send_queued(&session, &mut lp)?;
            if self.obs.pending.dirty_bytes() > 0 {
                lp.clean = None;
                self.round(&session, lp.checksum)?;
                lp.round_end = self.obs.queue.enqueued.load(Ordering::SeqCst);
                continue;
            }
            self.obs.behind.store(false, Ordering::SeqCst);
            if lp.owe_close {
                // A close was merged away: close one now, or the backup
                // would sit on the last writes until the client's next
                // flush.
                lp.owe_close = false;
                self.close_local_epoch()?;
            }
            self.clean(&session, &mut lp)?;
            let mut q = self.obs.queue.items.lock();
            if q.is_empty() {
                self.obs
                    .queue
                    .cv
                    .wait_for(&mut q, Duration::from_millis(10));
            }
        }
        Ok(())
    }

    /// Send everything queued. An `EpochClose` is dropped (its epoch merges
    /// into the next) while the backup lacks writes outside the stream or
    /// a copy round read data after it was queued.
    fn send_queued(&self, s: &Session, lp: &mut LoopState) -> Result<(), ReplicationError> {
        loop {
            let Some((idx, item)) = self.obs.queue.items.lock().pop_front() else {
                return Ok(());
            };
            match item {
                Item::Write {
                    offset,
                    flags,
                    data,
                } => {
                    // A failed send may not have recorded the range as
                    // unsafe: it goes back to `pending` here.
                    s.send(data.len() as u64, |seq| Msg::Write {
                        seq,
                        offset,
                        flags,
                        hash: wire::extent_hash(&data),
                        data: &data,
                    })
                    .inspect_err(|_| self.obs.pending.mark(offset, data.len() as u64))?;
                }
                Item::Zero { offset, len, flags } => {
                    s.send(0, |seq| Msg::Zero {
                        seq,
                        offset,
                        len,
                        flags,
                    })
                    .inspect_err(|_| self.obs.pending.mark(offset, len))?;
                }
                Item::EpochClose { epoch } => {
                    if idx <= lp.round_end || self.obs.pending.dirty_bytes() > 0 {
                        lp.owe_close = true;
                        continue;
                    }
                    let seq = s.send(0, |seq| Msg::EpochClose { seq, epoch })?;
                    if let Some(c) = &mut lp.clean
                        && c.seq.is_none()
                        && idx > c.idx
                    {
                        c.seq = Some(seq);
                    }
                }
            }
        }
    }

    /// One copy round over `pending`, flushed at checkpoints: when it is
    /// interrupted, only what was not yet durable on the backup goes back
    /// into `pending`, so the next session resumes where this one stopped.
    /// In epoch mode the round is not flushed on its own (a flush would
    /// close an epoch on the backup in the middle of the round): it becomes
    /// durable with the next epoch close, and the persistent bitmap keeps
    /// its bits until then.
    fn round(&self, s: &Arc<Session>, checksum: Option<u32>) -> Result<(), ReplicationError> {
        let sink = SessionSink {
            session: s.clone(),
            locks: self.obs.locks.clone(),
            checksum,
            sent: self.resync_sent.clone(),
        };
        let mut opts = CopyOptions::new(self.cfg.chunk);
        opts.bandwidth = self.cfg.resync_bandwidth;
        let mut copier = Copier::new(&*self.filter, sink, &NoProgress, opts);
        copier.set_cancel(Some(&self.stop));
        let taken = self
            .obs
            .pending
            .take()
            .map_err(|e| ReplicationError::Bitmap {
                name: "pending".into(),
                source: Box::new(e),
            })?;
        let pieces = split(taken.dirty_ranges(), self.cfg.resync_checkpoint);
        let flushes = self.cfg.mode != Mode::Epoch;
        let mut durable = 0;
        let mut since = 0;
        let mut result = Ok(());
        for (i, &(o, l)) in pieces.iter().enumerate() {
            result = copier.copy(o, l, true).map(drop);
            since += l;
            if result.is_ok() && flushes && since >= self.cfg.resync_checkpoint {
                result = copier.flush();
                durable = i + 1;
                since = 0;
            }
            if result.is_err() {
                break;
            }
        }
        if result.is_ok() && flushes {
            result = copier.flush();
        }
        if result.is_ok() {
            durable = pieces.len();
        }
        taken.commit();
        for &(o, l) in &pieces[durable..] {
            self.obs.pending.mark(o, l);
        }
        result.map_err(|e| ReplicationError::Copy {
            source: Box::new(e),
        })
    }

    /// Clear the persistent bitmap of what the backup holds durably, and
    /// finish the resync the first time that succeeds (see the observer's
    /// module docs for why this is safe).
    fn clean(&self, s: &Session, lp: &mut LoopState) -> Result<(), ReplicationError> {
        if let Some(c) = &lp.clean {
            if c.seq.is_some_and(|seq| s.acked() >= seq) {
                let c = lp.clean.take().expect("checked just above");
                if self.obs.pending.dirty_bytes() == 0 {
                    c.taken.commit();
                    lp.last_clean = Instant::now();
                    if !lp.in_sync {
                        self.finish_resync(s)?;
                        lp.in_sync = true;
                    }
                }
            }
            return Ok(());
        }
        if lp.in_sync && lp.last_clean.elapsed() < self.cfg.clean_interval {
            return Ok(());
        }
        let Ok(taken) = self.persistent.take() else {
            return Ok(());
        };
        if self.obs.pending.dirty_bytes() > 0 {
            return Ok(());
        }
        let idx = self.obs.queue.enqueued.load(Ordering::SeqCst);
        let seq = match self.cfg.mode {
            Mode::Epoch => None,
            Mode::Sync | Mode::Async => {
                // Writes marked before the take may still be queued: send
                // them first, so the flush comes after every one of them.
                self.send_queued(s, lp)?;
                Some(s.send(0, |seq| Msg::Flush { seq })?)
            }
        };
        lp.clean = Some(Clean { taken, idx, seq });
        if self.cfg.mode == Mode::Epoch && !lp.in_sync {
            // Close an epoch now rather than wait for the client's next
            // flush, so the resync can finish.
            self.close_local_epoch()?;
        }
        Ok(())
    }

    /// A write-order barrier on the export: in epoch mode the observer
    /// queues an `EpochClose` for it.
    fn close_local_epoch(&self) -> Result<(), ReplicationError> {
        use understudy_block::DiskWrite;
        self.filter
            .order()
            .map(drop)
            .map_err(|source| ReplicationError::Disk {
                op: "close an epoch",
                source,
            })
    }

    /// Both copies now hold the same data: the backup takes this copy's
    /// generations first (so a crash in between leaves equal currents and
    /// at worst a bitmap resync), then this copy records them.
    fn finish_resync(&self, s: &Session) -> Result<(), ReplicationError> {
        let mut gens = self.record.lock().gens.clone();
        gens.sync_done_source();
        s.request(|seq| Msg::ResyncDone {
            seq,
            gens: gens.clone(),
        })?;
        let mut rec = self.record.lock();
        rec.gens = gens;
        rec.resync = None;
        rec.split_brain = false;
        generation::store(&self.image, &rec)
            .map_err(|source| ReplicationError::Record { source })?;
        self.obs.shared_gens.store(true, Ordering::SeqCst);
        let mut st = self.status.lock();
        st.gens = rec.gens.clone();
        st.state = State::InSync;
        drop(st);
        self.status_cv.notify_all();
        tracing::info!("replica in sync");
        Ok(())
    }

    /// After a session: stop streaming, put what the backup may lack (the
    /// unsafe ranges and the queue) back into `pending`. (The first write
    /// that no longer reaches the backup starts a new generation: see the
    /// observer.)
    fn end_session(&self) {
        *self.obs.stream.write() = Stream::Off;
        let session = self.current.lock().take();
        if let Some(s) = &session {
            // Sync writers waiting for an ack give up (and mark `pending`)
            // instead of holding up the drain.
            s.fail("session over");
        }
        drain(&self.filter);
        if let Some(s) = session {
            s.shutdown("session over");
            for (o, l) in s.unsafe_ranges() {
                self.obs.pending.mark(o, l);
            }
        }
        for (_, item) in self.obs.queue.items.lock().drain(..) {
            match item {
                Item::Write { offset, data, .. } => {
                    self.obs.pending.mark(offset, data.len() as u64)
                }
                Item::Zero { offset, len, .. } => self.obs.pending.mark(offset, len),
                Item::EpochClose { .. } => {}
            }
        }
        self.obs.lag.store(0, Ordering::SeqCst);
        let rec = self.record.lock();
        self.status.lock().gens = rec.gens.clone();
    }
}

/// Dirty ranges cut into pieces of at most `max` bytes.
fn split(ranges: impl Iterator<Item = (u64, u64)>, max: u64) -> Vec<(u64, u64)> {
    let max = max.max(1);
    let mut out = Vec::new();
    for (mut o, mut l) in ranges {
        while l > 0 {
            let n = l.min(max);
            out.push((o, n));
            o += n;
            l -= n;
        }
    }
    out
}

fn merge(into: &DirtyBitmap, from: &DirtyBitmap) -> Result<(), ReplicationError> {
    into.merge(from).map_err(|e| ReplicationError::Bitmap {
        name: BITMAP.into(),
        source: Box::new(e),
    })
}

/// A take of the persistent bitmap waiting for a flush point.
struct Clean {
    taken: Taken,
    /// Queue items up to this index were queued before the take.
    idx: u64,
    /// The flush point that makes the take's writes durable on the backup.
    seq: Option<u64>,
}

struct LoopState {
    /// Queue index when the last copy round ended.
    round_end: u64,
    clean: Option<Clean>,
    in_sync: bool,
    /// An epoch close was merged into the next one; none was queued since.
    owe_close: bool,
    last_clean: Instant,
    checksum: Option<u32>,
}
