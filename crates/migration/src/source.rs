//! The source side: one migration job per export.
//!
//! ```text
//! Connecting ─▶ Bulk ─▶ Iterating ─┬─▶ Switchover ─▶ (Verifying) ─▶ Completed
//!                  │        ▲  │    │        │
//!                  │        └──┘    │        └─ commit refused / link broke ─▶ Failed (A owner)
//!                  └─(mirror)─▶ Mirroring ─┘
//! any phase: link/disk error, cancel ─▶ Failed / Cancelled (A stays owner; retry resumes)
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use understudy_bitmap::{BitmapStore, DEFAULT_GRANULARITY, DirtyBitmap, StoreError, Taken};
use understudy_block::{Disk, ExtentKind, Format};
use understudy_filter::{FilterDisk, WriteObserver};
use understudy_layers::{Route, SwitchDisk};
use understudy_peer::{Link, PeerConfig, PeerError};

use crate::conn::{Conn, RemoteDisk};
use crate::error::MigrationError;
use crate::observer::MigrationObserver;
use crate::record::{self, Outgoing, OwnerState, PeerRecord};
use crate::wire::{self, Hello, MAX_VERSION, MIN_VERSION, Msg, Start};

/// Name of the persistent bitmap of blocks the target may lack.
pub const MIGRATION_BITMAP: &str = "understudy-migration";
/// Name of the target's persistent record of the ranges it holds.
pub const RECEIVED_BITMAP: &str = "understudy-received";
/// Peer-link purpose of migration links.
pub const PURPOSE: &str = "migrate";

/// The bitmap that records what changed on this copy since it was last
/// identical to the copy on `node`.
pub fn peer_bitmap_name(node: &str) -> String {
    format!("understudy-peer:{node}")
}

/// How guest writes are handled after the bulk copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Iterative copy of dirty blocks; switch to mirroring when it does not
    /// converge.
    #[default]
    Precopy,
    /// Mirror every guest write from the end of the bulk copy.
    Mirror,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "precopy" => Ok(Mode::Precopy),
            "mirror" => Ok(Mode::Mirror),
            o => Err(format!("unknown mode {o:?}: use precopy or mirror")),
        }
    }
}

/// Settings of one migration.
#[derive(Clone, Debug)]
pub struct MigrateOptions {
    /// Target peer address (`host:port` or `unix:/path`). No default.
    pub to: String,
    /// Peer link settings (key, node id). No default.
    pub peer: PeerConfig,
    /// Switch over once the remaining dirty data can be sent within this.
    /// Default: 50 ms.
    pub max_downtime: Duration,
    /// Copy mode. Default: precopy.
    pub mode: Mode,
    /// Bytes per second for bulk and iterative copy (`None`: unlimited).
    /// Default: unlimited.
    pub bandwidth: Option<u64>,
    /// Compare block hashes of both sides after switch-over. Default: off.
    pub verify: bool,
    /// Iterative rounds before falling back to mirroring. Default: 5.
    pub max_rounds: u32,
    /// Bytes per data message. Default: 1 MiB.
    pub chunk: usize,
    /// How long in-flight I/O may take to drain at switch-over. Default: 5 s.
    pub drain_timeout: Duration,
    /// During the bulk copy, make the target durable (and record its
    /// progress, so a retry resumes there) after this many bytes...
    /// Default: 64 MiB.
    pub checkpoint: u64,
    /// ...or after this long, whichever comes first. Default: 1 s.
    pub checkpoint_interval: Duration,
    /// Called on entering each phase, and with `Phase::Switchover` again
    /// right before the commit is sent (tests inject faults here).
    /// Default: none.
    pub fault_hook: Option<FaultHook>,
}

/// See [`MigrateOptions::fault_hook`].
#[derive(Clone)]
pub struct FaultHook(pub Arc<dyn Fn(Phase) + Send + Sync>);

impl std::fmt::Debug for FaultHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FaultHook")
    }
}

impl MigrateOptions {
    /// Defaults for a migration to `to`.
    pub fn new(to: impl Into<String>, peer: PeerConfig) -> Self {
        Self {
            to: to.into(),
            peer,
            max_downtime: Duration::from_millis(50),
            mode: Mode::Precopy,
            bandwidth: None,
            verify: false,
            max_rounds: 5,
            chunk: 1 << 20,
            drain_timeout: Duration::from_secs(5),
            checkpoint: 64 << 20,
            checkpoint_interval: Duration::from_secs(1),
            fault_hook: None,
        }
    }
}

/// An export as the migration sees it: the layers it needs access to.
#[derive(Debug, Clone)]
pub struct SourceExport {
    /// Export name.
    pub name: String,
    /// Image path (the ownership record lives beside it).
    pub image: PathBuf,
    /// Image format.
    pub format: Format,
    /// The outermost layer, served to clients.
    pub switch: Arc<SwitchDisk>,
    /// The block filter below it.
    pub filter: Arc<FilterDisk>,
    /// The image's bitmap store.
    pub store: Arc<BitmapStore>,
    /// The epoch journal between the filter and the image, if any.
    pub journal: Option<Arc<understudy_journal::EpochDisk>>,
}

/// Phase of a migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Opening the link.
    Connecting,
    /// Copying allocated (or changed) extents.
    Bulk,
    /// Resending dirty blocks round by round.
    Iterating,
    /// Guest writes are mirrored; catching up.
    Mirroring,
    /// I/O held; last blocks and commit.
    Switchover,
    /// Comparing block hashes.
    Verifying,
    /// Done: the target owns the export.
    Completed,
    /// Stopped with an error; the source is still the owner.
    Failed,
    /// Cancelled; the source is still the owner.
    Cancelled,
}

impl Phase {
    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed | Phase::Cancelled)
    }
}

/// Progress and result of a migration (`migration.status`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    /// Export.
    pub export: String,
    /// Target address.
    pub target: String,
    /// Target node id, once known.
    pub target_node: Option<String>,
    /// Phase.
    pub phase: Phase,
    /// How the target started (fresh, resume, incremental, hash-resync).
    pub start: Option<String>,
    /// Current (final, once done) mode.
    pub mode: Mode,
    /// Iterative rounds done.
    pub rounds: u32,
    /// Bytes of the initial set (allocated, or changed for incremental).
    pub bulk_bytes: u64,
    /// Of which copied so far.
    pub bulk_done: u64,
    /// Data bytes sent as extents (bulk + rounds + final).
    pub data_bytes: u64,
    /// Guest bytes mirrored.
    pub mirrored_bytes: u64,
    /// All bytes sent on the link (payloads incl. headers).
    pub bytes_sent: u64,
    /// Dirty bytes waiting.
    pub dirty_bytes: u64,
    /// Measured copy bandwidth, bytes per second.
    pub bandwidth: u64,
    /// I/O hold time at switch-over, ms.
    pub downtime_ms: Option<f64>,
    /// Time since start, ms.
    pub total_ms: f64,
    /// Blocks compared by --verify.
    pub verified_blocks: u64,
    /// Blocks that differed.
    pub mismatched_blocks: u64,
    /// Error, if failed.
    pub error: Option<String>,
    /// Whether a retry may succeed.
    pub retryable: bool,
    /// How an ownership left in doubt by a lost commit answer was settled
    /// at the start of this attempt, if it was.
    #[serde(default)]
    pub settled: Option<String>,
}

impl Status {
    fn new(export: &str, target: &str) -> Self {
        Self {
            export: export.into(),
            target: target.into(),
            target_node: None,
            phase: Phase::Connecting,
            start: None,
            mode: Mode::Precopy,
            rounds: 0,
            bulk_bytes: 0,
            bulk_done: 0,
            data_bytes: 0,
            mirrored_bytes: 0,
            bytes_sent: 0,
            dirty_bytes: 0,
            bandwidth: 0,
            downtime_ms: None,
            total_ms: 0.0,
            verified_blocks: 0,
            mismatched_blocks: 0,
            error: None,
            retryable: false,
            settled: None,
        }
    }
}

/// Told about the commit, so the daemon stops offering the export to new
/// clients (they go to the new owner).
pub trait SourceHooks: Send + Sync {
    /// The target owns `export` now; existing clients are forwarded.
    fn committed(&self, export: &str, target_node: &str);
}

/// Hooks that do nothing.
#[derive(Debug, Default)]
pub struct NoHooks;

impl SourceHooks for NoHooks {
    fn committed(&self, _export: &str, _target_node: &str) {}
}

/// A running migration.
pub struct Job {
    status: Arc<Mutex<Status>>,
    cancel: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<Result<Status, MigrationError>>>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("status", &*self.status.lock())
            .finish()
    }
}

impl Job {
    /// Start migrating `export` on a thread of its own.
    pub fn start(
        export: SourceExport,
        opts: MigrateOptions,
        hooks: Arc<dyn SourceHooks>,
    ) -> std::io::Result<Job> {
        let status = Arc::new(Mutex::new(Status::new(&export.name, &opts.to)));
        let cancel = Arc::new(AtomicBool::new(false));
        let (s2, c2) = (status.clone(), cancel.clone());
        let thread = std::thread::Builder::new()
            .name(format!("migrate-{}", export.name))
            .spawn(move || migrate(&export, &opts, &*hooks, &s2, &c2))?;
        Ok(Job {
            status,
            cancel,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// A snapshot of the progress.
    pub fn status(&self) -> Status {
        self.status.lock().clone()
    }

    /// Ask the job to stop (it stops at the next extent; not once the
    /// switch-over has begun).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// Whether the job has ended.
    pub fn is_finished(&self) -> bool {
        self.status.lock().phase.is_final()
    }

    /// Wait for the end; `None` if already waited for.
    pub fn wait(&self) -> Option<Result<Status, MigrationError>> {
        let t = self.thread.lock().take()?;
        Some(t.join().unwrap_or_else(|_| {
            Err(MigrationError::Protocol {
                reason: "the migration thread panicked".into(),
            })
        }))
    }
}

/// Run a migration to completion on this thread. `status` is kept up to
/// date; setting `cancel` stops it before the switch-over.
pub fn migrate(
    export: &SourceExport,
    opts: &MigrateOptions,
    hooks: &dyn SourceHooks,
    status: &Mutex<Status>,
    cancel: &AtomicBool,
) -> Result<Status, MigrationError> {
    let started = Instant::now();
    let r = run(export, opts, hooks, status, cancel, started);
    let mut st = status.lock();
    st.total_ms = started.elapsed().as_secs_f64() * 1e3;
    match &r {
        Ok(()) => {
            st.phase = Phase::Completed;
            tracing::info!(
                export = %export.name, downtime_ms = ?st.downtime_ms, total_ms = st.total_ms,
                bytes = st.bytes_sent, rounds = st.rounds, mode = ?st.mode,
                "migration completed"
            );
        }
        Err(e) => {
            st.phase = if matches!(e, MigrationError::Cancelled) {
                Phase::Cancelled
            } else {
                Phase::Failed
            };
            st.retryable = e.is_retryable();
            st.error = Some(error_chain(e));
            tracing::warn!(export = %export.name, error = %st.error.as_deref().unwrap_or(""), "migration stopped");
        }
    }
    let out = st.clone();
    drop(st);
    r.map(|()| out)
}

pub use understudy_block::error_chain;

fn bitmap_err(source: StoreError) -> MigrationError {
    MigrationError::Bitmap { source }
}

fn record_err(source: crate::error::RecordError) -> MigrationError {
    MigrationError::Record { source }
}

/// Sorted, merged ranges minus sorted, merged ranges.
pub fn subtract(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut j = 0;
    for &(mut s, l) in a {
        let e = s + l;
        while j < b.len() && b[j].0 + b[j].1 <= s {
            j += 1;
        }
        let mut k = j;
        while s < e {
            match b.get(k) {
                Some(&(bs, bl)) if bs < e => {
                    if bs > s {
                        out.push((s, bs - s));
                    }
                    s = s.max(bs + bl);
                    k += 1;
                }
                _ => {
                    out.push((s, e - s));
                    break;
                }
            }
        }
    }
    out
}

/// Expand ranges outward to `gran` boundaries (clamped to `size`) and merge.
pub fn align_ranges(v: &[(u64, u64)], gran: u64, size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(o, l) in v {
        if l == 0 {
            continue;
        }
        let s = o / gran * gran;
        let e = (o + l).div_ceil(gran).saturating_mul(gran).min(size);
        match out.last_mut() {
            Some(last) if last.0 + last.1 >= s => last.1 = last.1.max(e - last.0),
            _ => out.push((s, e - s)),
        }
    }
    out
}

fn allocated(disk: &dyn Disk) -> Result<Vec<(u64, u64)>, MigrationError> {
    let size = disk.size();
    let mut out = Vec::new();
    let mut off = 0;
    while off < size {
        let ext = disk
            .map(off, size - off)
            .map_err(|source| MigrationError::Read { source })?;
        if ext.is_empty() {
            break;
        }
        for e in &ext {
            if e.kind.needs_copy() {
                out.push((e.offset, e.len));
            }
        }
        off = ext.last().map_or(size, |e| e.end()).max(off + 1);
    }
    Ok(out)
}

/// Copies extents to the target, honouring the bandwidth limit and cancel.
struct Copier<'a> {
    conn: &'a Conn,
    disk: &'a dyn Disk,
    obs: &'a MigrationObserver,
    chunk: usize,
    bandwidth: Option<u64>,
    cancel: &'a AtomicBool,
    status: &'a Mutex<Status>,
    buf: Vec<u8>,
    limiter_start: Instant,
    limiter_bytes: u64,
    honour_cancel: bool,
    checkpoint: u64,
    checkpoint_interval: Duration,
}

impl Copier<'_> {
    fn check(&self) -> Result<(), MigrationError> {
        if self.honour_cancel && self.cancel.load(Ordering::SeqCst) {
            return Err(MigrationError::Cancelled);
        }
        if self.obs.mirror_failed() || self.conn.is_dead() {
            return Err(MigrationError::Recv {
                source: PeerError::Protocol {
                    reason: self
                        .conn
                        .why_dead()
                        .unwrap_or_else(|| "a mirrored write failed".into()),
                },
            });
        }
        Ok(())
    }

    fn throttle(&mut self, n: u64) {
        let Some(bw) = self.bandwidth else { return };
        self.limiter_bytes += n;
        let due = Duration::from_secs_f64(self.limiter_bytes as f64 / bw.max(1) as f64);
        let el = self.limiter_start.elapsed();
        if due > el {
            std::thread::sleep(due - el);
        }
    }

    /// Send `[off, off+len)`. With `map`, zero/hole parts go as `Zero`
    /// messages; without, everything is read and sent as data.
    fn copy(&mut self, off: u64, len: u64, map: bool) -> Result<u64, MigrationError> {
        let end = off + len;
        let mut pos = off;
        let mut sent = 0;
        while pos < end {
            self.check()?;
            let n = (end - pos).min(self.chunk as u64);
            let extents = if map {
                self.disk
                    .map(pos, n)
                    .map_err(|source| MigrationError::Read { source })?
            } else {
                Vec::new()
            };
            let (kind, n) = match extents.first() {
                Some(e) if e.len > 0 => (e.kind, e.len.min(end - pos)),
                _ => (ExtentKind::Data, n),
            };
            let lock = self.obs.locks.lock(pos, n);
            let r = if kind.needs_copy() {
                self.buf.resize(n as usize, 0);
                self.disk
                    .read_at(&mut self.buf, pos)
                    .map_err(|source| MigrationError::Read { source })
                    .and_then(|()| {
                        self.conn.send(&Msg::Data {
                            offset: pos,
                            hash: wire::extent_hash(&self.buf),
                            data: &self.buf,
                        })
                    })
            } else {
                self.conn.send(&Msg::Zero {
                    offset: pos,
                    len: n,
                })
            };
            self.obs.locks.unlock(lock);
            r?;
            if kind.needs_copy() {
                sent += n;
                self.throttle(n);
                self.status.lock().data_bytes += n;
            }
            pos += n;
        }
        Ok(sent)
    }

    fn flush(&self) -> Result<(), MigrationError> {
        self.conn
            .request("make the copy durable", |id| Msg::Flush { id })
            .map(drop)
    }
}

fn set_phase(status: &Mutex<Status>, p: Phase) {
    status.lock().phase = p;
}

fn fault(opts: &MigrateOptions, p: Phase) {
    if let Some(h) = &opts.fault_hook {
        (h.0)(p);
    }
}

/// Everything set up for one attempt; torn down on failure by `Drop`.
struct Session<'a> {
    export: &'a SourceExport,
    obs: Arc<MigrationObserver>,
    installed: bool,
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        self.obs.set_mirror(None);
        if self.installed {
            let o: Arc<dyn WriteObserver> = self.obs.clone();
            self.export.filter.remove_observer(&o);
        }
    }
}

/// One frame from the target, with the peer's error code kept.
fn recv_frame(rx: &mut understudy_peer::LinkReceiver) -> Result<(u16, Vec<u8>), PeerError> {
    let mut buf = Vec::new();
    rx.recv_into(&mut buf).map(|t| (t, buf))
}

/// A refusal (the target's message) or a broken link.
fn recv_err(e: PeerError) -> MigrationError {
    match e {
        PeerError::Remote { message, .. } => MigrationError::Refused { message },
        source => MigrationError::Recv { source },
    }
}

/// Take the persistent and the pending bitmap and send what `pending`
/// marks. The caller commits both takes once the data is durable on the
/// target; dropping them merges the bits back.
fn take_and_copy(
    store: &BitmapStore,
    pending: &Arc<DirtyBitmap>,
    copier: &mut Copier<'_>,
) -> Result<(Taken, Taken), MigrationError> {
    let p_taken = store.take(MIGRATION_BITMAP).map_err(bitmap_err)?;
    let q = pending.take().map_err(|e| MigrationError::Protocol {
        reason: e.to_string(),
    })?;
    let ranges: Vec<(u64, u64)> = q.dirty_ranges().collect();
    for (o, l) in ranges {
        copier.copy(o, l, true)?;
    }
    Ok((p_taken, q))
}

/// After the target committed `generation`: record the handover durably
/// and drop the bitmaps that only served the migration.
fn record_handover(
    export: &SourceExport,
    rec: &mut record::OwnerRecord,
    target_node: &str,
    generation: u64,
    peer_bitmap: Option<String>,
) -> Result<(), MigrationError> {
    rec.generation = generation;
    rec.state = OwnerState::HandedOver {
        to: target_node.to_owned(),
    };
    rec.set_peer(PeerRecord {
        node: target_node.to_owned(),
        generation,
        bitmap: None,
    });
    record::store(&export.image, rec).map_err(record_err)?;
    for b in [Some(MIGRATION_BITMAP.to_owned()), peer_bitmap]
        .into_iter()
        .flatten()
    {
        if export.store.get(&b).is_some()
            && let Err(e) = export.store.remove(&b)
        {
            tracing::warn!(bitmap = %b, "cannot remove a migration bitmap after the handover: {e}");
        }
    }
    Ok(())
}

/// The target says it committed the handover whose answer this node lost:
/// record the handover (as a completed commit would have) and stop serving.
fn settle_handed_over(
    export: &SourceExport,
    hooks: &dyn SourceHooks,
    status: &Mutex<Status>,
    mut rec: record::OwnerRecord,
    target_node: &str,
    message: &str,
) -> Result<(), MigrationError> {
    let peer_bitmap = rec.peer(target_node).and_then(|p| p.bitmap.clone());
    let generation = rec.generation + 1;
    record_handover(export, &mut rec, target_node, generation, peer_bitmap)?;
    export.switch.set_route(Route::Fail(Arc::from(format!(
        "export {} was handed over to node {target_node} (generation {}): reconnect to that node",
        export.name, rec.generation
    ))));
    hooks.committed(&export.name, target_node);
    tracing::warn!(export = %export.name, target = %target_node, generation = rec.generation,
        "ownership was in doubt; the target had committed, so the handover stands: {message}");
    let mut st = status.lock();
    st.settled = Some(format!(
        "target had committed generation {}; the handover stands",
        rec.generation
    ));
    st.start = Some("settled".into());
    Ok(())
}

fn run(
    export: &SourceExport,
    opts: &MigrateOptions,
    hooks: &dyn SourceHooks,
    status: &Mutex<Status>,
    cancel: &AtomicBool,
    started: Instant,
) -> Result<(), MigrationError> {
    let mut rec = record::load_or_create(&export.image, &export.name).map_err(record_err)?;
    // A commit whose answer was lost: retrying to the same target settles
    // who owns the disk (below), so it is allowed while I/O fails.
    let in_doubt = match &rec.state {
        OwnerState::Handing { to, migration_id } => Some((to.clone(), migration_id.clone())),
        _ => None,
    };
    if in_doubt.is_none() {
        if !export.switch.is_local() {
            return Err(MigrationError::NotMigratable {
                name: export.name.clone(),
                reason: "this node does not own it (it was handed over)".into(),
            });
        }
        rec.check_servable(&export.image).map_err(record_err)?;
    }
    let disk: &dyn Disk = &*export.filter;
    let size = disk.size();

    let link =
        Link::connect(&opts.to, &opts.peer, PURPOSE).map_err(|source| MigrationError::Connect {
            addr: opts.to.clone(),
            source,
        })?;
    let target_node = link.peer().node_id.clone();
    status.lock().target_node = Some(target_node.clone());
    if let Some((to, _)) = &in_doubt
        && *to != target_node
    {
        return Err(MigrationError::NotMigratable {
            name: export.name.clone(),
            reason: format!(
                "ownership is in doubt after a lost commit answer from node {to}, and {} is node \
                 {target_node}: retry the migration to node {to} so the two sides can settle it",
                opts.to
            ),
        });
    }

    // Same target as an interrupted attempt: resume it.
    let store = &export.store;
    let migration_id = match &rec.state {
        OwnerState::Owner { migrating: Some(o) }
            if o.to == target_node && store.get(MIGRATION_BITMAP).is_some() =>
        {
            o.migration_id.clone()
        }
        OwnerState::Handing { to, migration_id }
            if *to == target_node && store.get(MIGRATION_BITMAP).is_some() =>
        {
            migration_id.clone()
        }
        _ => {
            if store.get(MIGRATION_BITMAP).is_some() {
                store.remove(MIGRATION_BITMAP).map_err(bitmap_err)?;
            }
            store
                .add(MIGRATION_BITMAP, DEFAULT_GRANULARITY)
                .map_err(bitmap_err)?;
            record::new_id_hex()
        }
    };
    store.enable(MIGRATION_BITMAP).map_err(bitmap_err)?;
    let owning = OwnerState::Owner {
        migrating: Some(Outgoing {
            to: target_node.clone(),
            migration_id: migration_id.clone(),
        }),
    };
    // In doubt, the record stays `handing` until the target has said
    // whether it committed.
    if in_doubt.is_none() {
        rec.state = owning.clone();
        record::store(&export.image, &rec).map_err(record_err)?;
    }
    let p_bitmap = store
        .get(MIGRATION_BITMAP)
        .ok_or_else(|| MigrationError::Protocol {
            reason: "migration bitmap vanished".into(),
        })?;
    let gran = p_bitmap.granularity();

    // What we know about the target's copy, for an incremental migration.
    let peer_rec = rec.peer(&target_node).cloned();
    let peer_bitmap = peer_rec
        .as_ref()
        .and_then(|p| p.bitmap.clone())
        .filter(|b| store.get(b).is_some());
    let base_generation = match (&peer_rec, &peer_bitmap) {
        (Some(p), Some(_)) => p.generation,
        _ => 0,
    };

    let hello = Hello {
        min_version: MIN_VERSION,
        max_version: MAX_VERSION,
        migration_id: record::id_bytes(&migration_id),
        disk_id: record::id_bytes(&rec.disk_id),
        generation: rec.generation,
        base_generation,
        size,
        format: match export.format {
            Format::Raw => 0,
            Format::Qcow2 => 1,
        },
        granularity: gran as u32,
        name: export.name.clone(),
    };
    let (t, bytes) = Msg::Hello(hello)
        .to_vec()
        .map_err(|source| MigrationError::Wire { source })?;
    link.send(t, &bytes)
        .map_err(|source| MigrationError::Send { source })?;
    let (tx, mut rx) = link.split();
    let recv = |rx: &mut understudy_peer::LinkReceiver| recv_frame(rx).map_err(recv_err);
    let (t, buf) = match recv_frame(&mut rx) {
        Err(PeerError::Remote { code, message })
            if code == wire::refusal::COMMITTED && in_doubt.is_some() =>
        {
            // The target did commit: the handover happened.
            return settle_handed_over(export, hooks, status, rec, &target_node, &message);
        }
        first => first.map_err(recv_err)?,
    };
    if in_doubt.is_some() {
        // The target answered a Hello for this disk without owning it: the
        // commit never took effect there, so this node is the owner again
        // and its clients get their disk back while the migration resumes.
        rec.state = owning;
        record::store(&export.image, &rec).map_err(record_err)?;
        export.switch.set_route(Route::Local);
        tracing::warn!(export = %export.name, target = %target_node,
            "ownership was in doubt; the target never committed, so this node owns the disk again");
        status.lock().settled = Some("target had not committed; this node kept the disk".into());
    }
    let welcome = match Msg::decode(t, &buf).map_err(|source| MigrationError::Wire { source })? {
        Msg::Welcome(w) => w,
        other => {
            return Err(MigrationError::Protocol {
                reason: format!("expected Welcome, got {:?}", other.msg_type()),
            });
        }
    };
    if !(MIN_VERSION..=MAX_VERSION).contains(&welcome.version) {
        return Err(MigrationError::Protocol {
            reason: format!("target chose version {} we do not speak", welcome.version),
        });
    }
    let mut have = Vec::new();
    if welcome.start == Start::Resume {
        loop {
            let (t, buf) = recv(&mut rx)?;
            match Msg::decode(t, &buf).map_err(|source| MigrationError::Wire { source })? {
                Msg::Have { ranges, last } => {
                    if have.len() + ranges.len() > (size / gran + 1) as usize {
                        return Err(MigrationError::Protocol {
                            reason: "more Have ranges than the disk has blocks".into(),
                        });
                    }
                    have.extend(ranges);
                    if last {
                        break;
                    }
                }
                other => {
                    return Err(MigrationError::Protocol {
                        reason: format!("expected Have, got {:?}", other.msg_type()),
                    });
                }
            }
        }
        have.sort_unstable();
    }
    status.lock().start = Some(welcome.start.to_string());
    tracing::info!(export = %export.name, target = %target_node, start = %welcome.start, "migration started");

    let conn = Conn::start(tx, rx, disk.info()).map_err(|e| MigrationError::Send {
        source: PeerError::Socket { source: e },
    })?;
    let result = run_session(
        export,
        opts,
        hooks,
        status,
        cancel,
        started,
        &conn,
        SessionPlan {
            rec,
            target_node,
            migration_id,
            start: welcome.start,
            version: welcome.version,
            have,
            peer_bitmap,
            gran,
            p_bitmap,
        },
    );
    if result.is_err() && export.switch.is_local() {
        let _ = conn.send(&Msg::Abort {
            reason: result
                .as_ref()
                .err()
                .map(|e| error_chain(e))
                .unwrap_or_default(),
        });
        conn.close("migration stopped");
    }
    result
}

struct SessionPlan {
    rec: record::OwnerRecord,
    target_node: String,
    migration_id: String,
    start: Start,
    /// The negotiated protocol version.
    version: u16,
    have: Vec<(u64, u64)>,
    peer_bitmap: Option<String>,
    gran: u64,
    p_bitmap: Arc<DirtyBitmap>,
}

#[allow(clippy::too_many_arguments)]
fn run_session(
    export: &SourceExport,
    opts: &MigrateOptions,
    hooks: &dyn SourceHooks,
    status: &Mutex<Status>,
    cancel: &AtomicBool,
    started: Instant,
    conn: &Arc<Conn>,
    plan: SessionPlan,
) -> Result<(), MigrationError> {
    let SessionPlan {
        mut rec,
        target_node,
        migration_id,
        start,
        version,
        have,
        peer_bitmap,
        gran,
        p_bitmap,
    } = plan;
    let store = &export.store;
    let disk: &dyn Disk = &*export.filter;
    let size = disk.size();

    // Pending = what the target lacks, precisely, from now on.
    let pending = Arc::new(
        DirtyBitmap::new(size, gran).map_err(|e| MigrationError::Protocol {
            reason: e.to_string(),
        })?,
    );
    let obs = Arc::new(MigrationObserver::new(
        pending.clone(),
        version >= wire::MIRROR_ZERO_VERSION,
    ));
    export.filter.add_observer(obs.clone());
    let session = Session {
        export,
        obs: obs.clone(),
        installed: true,
    };
    // Blocks an earlier attempt left unsent (after the observer is in, so
    // nothing falls between).
    pending
        .merge(&p_bitmap)
        .map_err(|e| MigrationError::Protocol {
            reason: e.to_string(),
        })?;

    let mut copier = Copier {
        conn,
        disk,
        obs: &obs,
        chunk: opts.chunk.clamp(4096, wire::MAX_DATA),
        bandwidth: opts.bandwidth,
        cancel,
        status,
        buf: Vec::new(),
        limiter_start: Instant::now(),
        limiter_bytes: 0,
        honour_cancel: true,
        checkpoint: opts.checkpoint,
        checkpoint_interval: opts.checkpoint_interval,
    };

    // 1. Bulk.
    set_phase(status, Phase::Bulk);
    fault(opts, Phase::Bulk);
    let mut incremental_taken: Option<Taken> = None;
    let t0 = Instant::now();
    match start {
        Start::Fresh | Start::Resume => {
            let base = match (&peer_bitmap, start) {
                (Some(b), Start::Resume) if rec.peer(&target_node).is_some() => {
                    // Resuming an incremental migration: the changed set.
                    let t = store.take(b).map_err(bitmap_err)?;
                    let v: Vec<(u64, u64)> = t.dirty_ranges().collect();
                    incremental_taken = Some(t);
                    v
                }
                _ => align_ranges(&allocated(disk)?, gran, size),
            };
            // Blocks in the persistent bitmap are in `pending` already and
            // go with the first round.
            let p_ranges: Vec<(u64, u64)> = p_bitmap.dirty_ranges().collect();
            let todo = subtract(&subtract(&base, &have), &p_ranges);
            bulk(&mut copier, status, &todo, start == Start::Resume)?;
        }
        Start::Incremental => {
            let b = peer_bitmap
                .as_deref()
                .ok_or_else(|| MigrationError::Protocol {
                    reason: "target chose incremental but we offered no base".into(),
                })?;
            let t = store.take(b).map_err(bitmap_err)?;
            let todo: Vec<(u64, u64)> = t.dirty_ranges().collect();
            incremental_taken = Some(t);
            bulk(&mut copier, status, &todo, true)?;
        }
        Start::HashResync => {
            hash_resync(&mut copier, status, gran, size)?;
        }
    }
    copier.flush()?;
    if let Some(t) = incremental_taken.take() {
        t.commit();
    }
    let mut bw = rate(status.lock().data_bytes, t0.elapsed());
    status.lock().bandwidth = bw;

    // 2. Iterate (or mirror).
    if opts.mode == Mode::Mirror {
        obs.set_mirror(Some(conn.clone()));
        let mut st = status.lock();
        st.mode = Mode::Mirror;
        st.phase = Phase::Mirroring;
        drop(st);
        fault(opts, Phase::Mirroring);
    } else {
        set_phase(status, Phase::Iterating);
        fault(opts, Phase::Iterating);
    }
    let mut rounds = 0u32;
    loop {
        let remaining = pending.dirty_bytes();
        {
            let mut st = status.lock();
            st.dirty_bytes = remaining;
            st.bytes_sent = conn.bytes_sent();
            st.mirrored_bytes = obs.mirrored_bytes();
            st.total_ms = started.elapsed().as_secs_f64() * 1e3;
        }
        let fits = remaining == 0
            || Duration::from_secs_f64(remaining as f64 / bw.max(1) as f64) <= opts.max_downtime;
        if fits && rounds > 0 {
            break;
        }
        if rounds >= opts.max_rounds && !obs.is_mirroring() {
            tracing::info!(
                export = %export.name, rounds, remaining,
                "dirty data does not converge: mirroring guest writes from now on"
            );
            obs.set_mirror(Some(conn.clone()));
            let mut st = status.lock();
            st.mode = Mode::Mirror;
            st.phase = Phase::Mirroring;
            drop(st);
            fault(opts, Phase::Mirroring);
        }
        if rounds >= opts.max_rounds.saturating_mul(4).max(20) {
            // Even mirroring cannot keep up (zeroes/discards or failures).
            break;
        }
        rounds += 1;
        let tr = Instant::now();
        let before = status.lock().data_bytes;
        let (p_taken, q) = take_and_copy(store, &pending, &mut copier)?;
        copier.flush()?;
        q.commit();
        p_taken.commit();
        let sent = status.lock().data_bytes - before;
        if sent > 256 * 1024 {
            bw = rate(sent, tr.elapsed());
        }
        let mut st = status.lock();
        st.rounds = rounds;
        st.bandwidth = bw;
    }

    // 3. Switch-over.
    if cancel.load(Ordering::SeqCst) {
        return Err(MigrationError::Cancelled);
    }
    set_phase(status, Phase::Switchover);
    fault(opts, Phase::Switchover);
    rec.state = OwnerState::Handing {
        to: target_node.clone(),
        migration_id: migration_id.clone(),
    };
    record::store(&export.image, &rec).map_err(record_err)?;
    let revert = |rec: &mut record::OwnerRecord| {
        rec.state = OwnerState::Owner {
            migrating: Some(Outgoing {
                to: target_node.clone(),
                migration_id: migration_id.clone(),
            }),
        };
        record::store(&export.image, rec).map_err(record_err)
    };
    let Some(hold) = export.switch.hold(opts.drain_timeout) else {
        revert(&mut rec)?;
        return Err(MigrationError::DrainTimeout {
            ms: opts.drain_timeout.as_millis() as u64,
        });
    };
    copier.honour_cancel = false;
    let (p_taken, q) = match take_and_copy(store, &pending, &mut copier) {
        Ok(x) => x,
        Err(e) => {
            hold.release(Route::Local);
            revert(&mut rec)?;
            return Err(e);
        }
    };
    fault(opts, Phase::Switchover);
    let t_final = hold.since().elapsed();
    let new_gen = rec.generation + 1;
    let commit_id = conn.next_id();
    let commit = conn.request_borrowed(
        "take ownership",
        Msg::Commit {
            id: commit_id,
            generation: new_gen,
        },
    );
    match commit {
        Ok(_) => {}
        Err(e @ (MigrationError::Send { .. } | MigrationError::Target { .. })) => {
            // The target did not commit: we stay the owner.
            hold.release(Route::Local);
            revert(&mut rec)?;
            return Err(e);
        }
        Err(e) => {
            // The commit went out and its answer did not come back: the
            // target may own the disk now. Serving on could make two owners.
            let msg: Arc<str> = Arc::from(format!(
                "ownership of export {} is in doubt after a lost commit answer from node \
                 {target_node}: retry the migration to that node to settle it (docs/migration.md, \
                 'in doubt')",
                export.name
            ));
            hold.release(Route::Fail(msg));
            return Err(MigrationError::InDoubt {
                node: target_node.clone(),
                source: Box::new(e),
            });
        }
    }
    let t_commit = hold.since().elapsed();
    let downtime = hold.release(Route::Forward(Arc::new(RemoteDisk::new(conn.clone()))));
    tracing::debug!(
        export = %export.name,
        drain_and_final_copy_us = t_final.as_micros() as u64,
        commit_us = (t_commit - t_final).as_micros() as u64,
        "switch-over timing"
    );
    drop(session);
    p_taken.commit();
    q.commit();
    {
        let mut st = status.lock();
        st.downtime_ms = Some(downtime.as_secs_f64() * 1e3);
        st.dirty_bytes = 0;
        st.bytes_sent = conn.bytes_sent();
        st.mirrored_bytes = obs.mirrored_bytes();
    }
    record_handover(export, &mut rec, &target_node, new_gen, peer_bitmap)?;
    hooks.committed(&export.name, &target_node);
    tracing::info!(export = %export.name, target = %target_node, generation = new_gen,
        downtime_ms = downtime.as_secs_f64() * 1e3, "ownership handed over");

    // 4. Verify.
    if opts.verify {
        set_phase(status, Phase::Verifying);
        fault(opts, Phase::Verifying);
        let (blocks, bad) = verify(conn, disk, gran, size)?;
        let mut st = status.lock();
        st.verified_blocks = blocks;
        st.mismatched_blocks = bad;
        st.bytes_sent = conn.bytes_sent();
        if bad > 0 {
            return Err(MigrationError::VerifyMismatch { mismatched: bad });
        }
    }
    Ok(())
}

fn rate(bytes: u64, d: Duration) -> u64 {
    (bytes as f64 / d.as_secs_f64().max(1e-6)) as u64
}

fn bulk(
    copier: &mut Copier<'_>,
    status: &Mutex<Status>,
    todo: &[(u64, u64)],
    map: bool,
) -> Result<(), MigrationError> {
    status.lock().bulk_bytes = todo.iter().map(|r| r.1).sum();
    let mut since = 0;
    let mut last = Instant::now();
    // Split so checkpoints fall inside large extents too.
    let piece = copier.checkpoint.clamp(1, 1 << 20);
    for &(o, l) in todo {
        let mut pos = o;
        while pos < o + l {
            let n = (o + l - pos).min(piece);
            copier.copy(pos, n, map)?;
            status.lock().bulk_done += n;
            since += n;
            pos += n;
            if since >= copier.checkpoint || last.elapsed() >= copier.checkpoint_interval {
                copier.flush()?;
                since = 0;
                last = Instant::now();
            }
        }
    }
    Ok(())
}

/// Blocks per hash request.
const HASH_BATCH: u64 = 4096;

fn local_hashes(
    disk: &dyn Disk,
    off: u64,
    len: u64,
    block: u64,
) -> Result<Vec<u64>, MigrationError> {
    let mut buf = vec![0u8; block as usize];
    let mut out = Vec::with_capacity(len.div_ceil(block) as usize);
    let mut pos = off;
    while pos < off + len {
        let n = block.min(off + len - pos) as usize;
        disk.read_at(&mut buf[..n], pos)
            .map_err(|source| MigrationError::Read { source })?;
        out.push(wire::extent_hash(&buf[..n]));
        pos += n as u64;
    }
    Ok(out)
}

fn remote_hashes(
    conn: &Conn,
    off: u64,
    len: u64,
    block: u64,
) -> Result<Vec<(u64, u8)>, MigrationError> {
    let body = conn.request("hash blocks", |id| Msg::HashReq {
        id,
        offset: off,
        len,
        block: block as u32,
    })?;
    let v = wire::decode_hashes(&body).map_err(|source| MigrationError::Wire { source })?;
    if v.len() as u64 != len.div_ceil(block) {
        return Err(MigrationError::Protocol {
            reason: format!("asked for {} hashes, got {}", len.div_ceil(block), v.len()),
        });
    }
    Ok(v)
}

fn hash_resync(
    copier: &mut Copier<'_>,
    status: &Mutex<Status>,
    gran: u64,
    size: u64,
) -> Result<(), MigrationError> {
    status.lock().bulk_bytes = size;
    let mut off = 0;
    while off < size {
        copier.check()?;
        let len = (HASH_BATCH * gran).min(size - off);
        let theirs = remote_hashes(copier.conn, off, len, gran)?;
        let ours = local_hashes(copier.disk, off, len, gran)?;
        for (i, (h, (t, _))) in ours.iter().zip(&theirs).enumerate() {
            if h != t {
                let o = off + i as u64 * gran;
                copier.copy(o, gran.min(size - o), true)?;
            }
        }
        status.lock().bulk_done += len;
        off += len;
    }
    Ok(())
}

fn verify(
    conn: &Conn,
    disk: &dyn Disk,
    gran: u64,
    size: u64,
) -> Result<(u64, u64), MigrationError> {
    let (mut blocks, mut bad) = (0, 0);
    let mut off = 0;
    while off < size {
        let len = (HASH_BATCH * gran).min(size - off);
        let theirs = remote_hashes(conn, off, len, gran)?;
        let ours = local_hashes(disk, off, len, gran)?;
        for (i, (h, (t, f))) in ours.iter().zip(&theirs).enumerate() {
            if f & wire::flags::CHANGED != 0 {
                continue;
            }
            blocks += 1;
            if h != t {
                bad += 1;
                tracing::error!(offset = off + i as u64 * gran, "verify: block differs");
            }
        }
        off += len;
    }
    Ok((blocks, bad))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn model(v: &[(u64, u64)], n: u64) -> Vec<bool> {
        let mut m = vec![false; n as usize];
        for &(o, l) in v {
            for i in o..(o + l).min(n) {
                m[i as usize] = true;
            }
        }
        m
    }

    fn normalize(v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
        let mut v: Vec<_> = v.into_iter().filter(|r| r.1 > 0).collect();
        v.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (o, l) in v {
            match out.last_mut() {
                Some(last) if last.0 + last.1 >= o => last.1 = last.1.max(o + l - last.0),
                _ => out.push((o, l)),
            }
        }
        out
    }

    proptest! {
        #[test]
        fn subtract_matches_model(a in proptest::collection::vec((0u64..200, 0u64..40), 0..10),
                                  b in proptest::collection::vec((0u64..200, 0u64..40), 0..10)) {
            let a = normalize(a);
            let b = normalize(b);
            let got = model(&subtract(&a, &b), 256);
            let ma = model(&a, 256);
            let mb = model(&b, 256);
            let want: Vec<bool> = ma.iter().zip(&mb).map(|(x, y)| *x && !*y).collect();
            prop_assert_eq!(got, want);
        }

        #[test]
        fn align_covers_and_is_aligned(a in proptest::collection::vec((0u64..950, 1u64..100), 0..10)) {
            let a = normalize(a);
            let al = align_ranges(&a, 16, 1050);
            let ma = model(&a, 1100);
            let mal = model(&al, 1100);
            for i in 0..1100 {
                prop_assert!(!ma[i] || mal[i], "not covered at {}", i);
            }
            for &(o, l) in &al {
                prop_assert_eq!(o % 16, 0);
                prop_assert!((o + l) % 16 == 0 || o + l == 1050);
            }
        }
    }
}
