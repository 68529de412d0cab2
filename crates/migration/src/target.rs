//! The target side: accept migration links, receive disks into a
//! directory, take ownership on commit, then serve the source's forwarded
//! requests until it closes the link.
//!
//! ```text
//! Hello ─▶ decide start (fresh / resume / incremental / hash-resync) ─▶ Welcome (+ Have)
//!   ─▶ Receiving: Data/Zero/Mirror written, Flush = durable + record progress
//!   ─▶ Commit: durable, record Owner(g+1), enable the peer bitmap, serve ─▶ Forwarding
//! link lost or Abort before Commit: keep the partial image and its progress (Receiving)
//! ```

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use parking_lot::Mutex;
use understudy_bitmap::{Persister, StoreOptions};
use understudy_block::{
    BlockError, Disk, DiskRead, DiskSize, DiskWrite, ErrorKind, Format, WriteOpts, ZeroOpts,
};
use understudy_journal::{FlushPolicy, JournalConfig};
use understudy_layers::Route;
use understudy_peer::{Link, PeerConfig, PeerError, PeerListener};
use understudy_stack::{ExportStack, ImageSource, StackError, StackSpec};

use crate::record::{self, OwnerRecord, OwnerState, PeerRecord};
use crate::source::{PURPOSE, RECEIVED_BITMAP, SourceExport, peer_bitmap_name};
use crate::wire::{self, Msg, Start, Welcome, code, flags};

/// Wraps a freshly opened target disk (tests inject faults with it).
pub type DiskWrapper = Arc<dyn Fn(Arc<dyn Disk>) -> Arc<dyn Disk> + Send + Sync>;

/// Settings of the receiving side.
#[derive(Clone)]
pub struct TargetConfig {
    /// Directory received images are created in (`NAME.img`). No default.
    pub dir: PathBuf,
    /// Peer link settings. No default.
    pub peer: PeerConfig,
    /// Bitmap store options for received images. Default: the store's.
    pub store: StoreOptions,
    /// How often the bitmaps of served received images are persisted.
    /// Default: 5 s.
    pub persist_interval: std::time::Duration,
    /// The epoch journal (`NAME.img.journal`) received images get, as
    /// `serve --export ...,journal=on` gives one. Its policy must be
    /// [`FlushPolicy::Durable`]: the commit relies on a flush being
    /// durable. Default: none (as an export without `journal=on`).
    pub journal: Option<JournalConfig>,
    /// Fault injection for tests. Default: none.
    pub disk_wrapper: Option<DiskWrapper>,
    /// Fault injection for tests: the next `Commit` meets this fault (it
    /// is taken out by that commit). Default: none.
    pub commit_fault: Option<Arc<Mutex<Option<CommitFault>>>>,
}

/// What a test makes happen at the next commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitFault {
    /// Commit, then end the session without answering (the answer is
    /// lost on the way).
    LoseAnswer,
    /// End the session before committing (the target died on receipt).
    DieBeforeCommit,
}

impl fmt::Debug for TargetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TargetConfig")
            .field("dir", &self.dir)
            .field("node_id", &self.peer.node_id)
            .finish()
    }
}

impl TargetConfig {
    /// Defaults for receiving into `dir`.
    pub fn new(dir: impl Into<PathBuf>, peer: PeerConfig) -> Self {
        Self {
            dir: dir.into(),
            peer,
            store: StoreOptions::default(),
            persist_interval: std::time::Duration::from_secs(5),
            journal: None,
            disk_wrapper: None,
            commit_fault: None,
        }
    }
}

/// How the daemon takes part.
pub trait TargetHooks: Send + Sync {
    /// An export of this name this node has open although it does not own
    /// it (handed over earlier): the candidate for an incremental return.
    fn open_copy(&self, name: &str) -> Option<SourceExport>;
    /// This node owns `export` now: offer it to clients (and to later
    /// migrations). `persister` persists its bitmaps; keep it running.
    fn serve(&self, export: SourceExport, persister: Option<Persister>);
}

/// The accept loop.
pub struct TargetService {
    addr: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for TargetService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TargetService")
            .field("addr", &self.addr)
            .finish()
    }
}

impl TargetService {
    /// Listen on `addr` and receive migrations in `cfg.dir`.
    pub fn start(
        addr: &str,
        cfg: TargetConfig,
        hooks: Arc<dyn TargetHooks>,
    ) -> Result<TargetService, PeerError> {
        std::fs::create_dir_all(&cfg.dir).map_err(|source| PeerError::Bind {
            addr: cfg.dir.display().to_string(),
            source,
        })?;
        let listener = PeerListener::bind(addr, &cfg.peer)?;
        let local = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let busy: Arc<Busy> = Arc::default();
        let thread = std::thread::Builder::new()
            .name("migrate-accept".into())
            .spawn(move || {
                while !stop2.load(Ordering::SeqCst) {
                    let stream = match listener.accept_stream() {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::warn!("peer accept failed: {e}");
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            continue;
                        }
                    };
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    let (cfg, hooks, busy) = (cfg.clone(), hooks.clone(), busy.clone());
                    let _ = std::thread::Builder::new()
                        .name("migrate-recv".into())
                        .spawn(move || match Link::accept(stream, &cfg.peer) {
                            Ok(link) => {
                                if link.peer().purpose != PURPOSE {
                                    let _ = link.send_error(
                                        understudy_peer::error_code::UNSUPPORTED,
                                        "this listener serves migrations only (purpose \"migrate\")",
                                    );
                                    return;
                                }
                                if let Err(e) = receive(link, &cfg, &*hooks, &busy) {
                                    tracing::warn!("incoming migration failed: {e}");
                                }
                            }
                            Err(e) => tracing::warn!("peer handshake refused: {e}"),
                        });
                }
            })
            .map_err(|source| PeerError::Socket { source })?;
        Ok(TargetService {
            addr: local,
            stop,
            thread: Some(thread),
        })
    }

    /// The address to migrate to.
    pub fn local_addr(&self) -> &str {
        &self.addr
    }

    /// Stop accepting (sessions in progress run on).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.addr.strip_prefix("unix:") {
            let _ = std::os::unix::net::UnixStream::connect(a);
        } else {
            let _ = std::net::TcpStream::connect(&self.addr);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Why a receive session ended early.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The source was refused (reason sent to it too).
    #[error("refused a migration: {0}")]
    Refused(String),
    /// The link failed.
    #[error("the migration link failed")]
    Link {
        /// Cause.
        #[source]
        source: PeerError,
    },
    /// The source broke the protocol.
    #[error("the source broke the migration protocol: {0}")]
    Protocol(String),
    /// Preparing the image failed.
    #[error("cannot prepare the target image {path}")]
    Image {
        /// Image.
        path: PathBuf,
        /// Cause.
        #[source]
        source: BlockError,
    },
    /// The source aborted.
    #[error("the source aborted: {0}")]
    Aborted(String),
    /// Opening the received image's layers failed.
    #[error("cannot open the layers of a received image")]
    Stack {
        /// Cause.
        #[source]
        source: StackError,
    },
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 128
        && !n.starts_with('.')
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn refuse(link: &Link, msg: String) -> TargetError {
    let _ = link.send_error(understudy_peer::error_code::REFUSED, &msg);
    TargetError::Refused(msg)
}

/// Mark only the granules wholly inside `[off, off+len)` (claiming a
/// partly received granule would make a resume skip data).
fn mark_inner(b: &understudy_bitmap::DirtyBitmap, off: u64, len: u64) {
    let g = b.granularity();
    let s = off.div_ceil(g) * g;
    let end = off + len;
    let e = if end == b.size() { end } else { end / g * g };
    if e > s {
        b.mark(s, e - s);
    }
}

/// Marks a name as being received until dropped (at the commit or the end
/// of the session).
struct Unbusy<'a>(&'a Busy, String);

impl Drop for Unbusy<'_> {
    fn drop(&mut self) {
        self.0.names.lock().remove(&self.1);
        self.0.freed.notify_all();
    }
}

/// Names being received, so two sessions never write one image.
#[derive(Debug, Default)]
pub struct Busy {
    names: Mutex<HashSet<String>>,
    freed: parking_lot::Condvar,
}

/// How long a new session waits for an earlier one of the same name to
/// notice that its link is gone (a retry usually comes right after a cut).
const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

struct Receiving<'a> {
    export: SourceExport,
    rec: OwnerRecord,
    persister: Option<Persister>,
    /// Opened by this session (closed again if it does not commit).
    owned_here: bool,
    unflushed: Vec<(u64, u64)>,
    sticky: Option<(u32, String)>,
    committed: bool,
    source_node: String,
    commit_fault: Option<Arc<Mutex<Option<CommitFault>>>>,
    /// Last, so it is dropped last: a retry that claims the name must find
    /// this session's image and bitmap store (whose lock lives as long as
    /// `export`) already closed.
    busy: Option<Unbusy<'a>>,
}

impl Receiving<'_> {
    /// Received data goes below the block filter, so the peer bitmap
    /// (enabled from the start, so the commit need not touch it) records
    /// only what changes after the commit. The other enabled bitmaps (an
    /// incremental backup's, say) are marked by hand and persisted with the
    /// progress at each flush.
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        self.export
            .filter
            .inner()
            .write_at(data, offset, WriteOpts::default())?;
        self.mark_others(offset, data.len() as u64);
        Ok(())
    }

    /// Like [`Receiving::write`], for a range that must read as zeroes.
    fn zero(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let z = ZeroOpts {
            may_unmap: true,
            ..ZeroOpts::default()
        };
        self.export.filter.inner().write_zeroes(offset, len, z)?;
        self.mark_others(offset, len);
        Ok(())
    }

    fn mark_others(&self, offset: u64, len: u64) {
        let peer_bm = peer_bitmap_name(&self.source_node);
        for b in self.export.store.list() {
            if b.enabled
                && b.name != peer_bm
                && let Some(bm) = self.export.store.get(&b.name)
            {
                bm.mark(offset, len);
            }
        }
    }
}

fn reply_code(e: &BlockError) -> u32 {
    match e.kind() {
        ErrorKind::NoSpace => code::NO_SPACE,
        ErrorKind::OutOfBounds | ErrorKind::Invalid => code::INVALID,
        ErrorKind::NotSupported => code::NOT_SUPPORTED,
        _ => code::IO,
    }
}

fn block_msg(e: &BlockError) -> String {
    let mut s = crate::source::error_chain(e);
    if e.kind() == ErrorKind::NoSpace {
        s.push_str(": the target's disk is full; free space there and retry");
    }
    s
}

/// The stack of a received image: the daemon's settings for received
/// exports (bitmap store options, persist interval, journal, test hook).
fn received_spec(
    path: &std::path::Path,
    name: &str,
    format: Option<Format>,
    source: ImageSource,
    cfg: &TargetConfig,
) -> Result<StackSpec, TargetError> {
    if let Some(JournalConfig {
        policy: FlushPolicy::Ordered { .. },
        ..
    }) = &cfg.journal
    {
        return Err(TargetError::Refused(
            "this node's journal for received disks uses ordered flushes, but a migration's \
             commit needs durable ones: give received disks a durable journal (`serve \
             --received-journal on`)"
                .into(),
        ));
    }
    let mut spec = StackSpec::new(name, path);
    spec.format = format;
    spec.source = source;
    spec.journal = cfg.journal.clone();
    spec.store = cfg.store.clone();
    spec.persist_interval = cfg.persist_interval;
    spec.block_wrapper = cfg.disk_wrapper.clone();
    Ok(spec)
}

fn open_image(
    path: &std::path::Path,
    format: Format,
    size: u64,
    create: bool,
    cfg: &TargetConfig,
    name: &str,
) -> Result<(SourceExport, Persister), TargetError> {
    // A fresh receive removes a stale partial attempt and its sidecars
    // first (the stack knows which files those are).
    let source = if create {
        ImageSource::Create { size }
    } else {
        ImageSource::Existing { size: Some(size) }
    };
    let spec = received_spec(path, name, Some(format), source, cfg)?;
    let stack = ExportStack::open_writable(&spec).map_err(|e| match e {
        StackError::SizeMismatch { path, actual, .. } => TargetError::Refused(format!(
            "{} has {actual} bytes but the source disk has {size}",
            path.display()
        )),
        source => TargetError::Stack { source },
    })?;
    Ok(SourceExport::from_stack(stack))
}

/// Open a received image that this node owns (after a restart), ready to
/// serve: its block filter, bitmap store (persister running), journal when
/// the daemon gives received images one, and switch.
pub fn open_existing(
    path: &std::path::Path,
    name: &str,
    cfg: &TargetConfig,
) -> Result<(SourceExport, Persister), TargetError> {
    let source = ImageSource::Existing { size: None };
    let spec = received_spec(path, name, None, source, cfg)?;
    let stack =
        ExportStack::open_writable(&spec).map_err(|source| TargetError::Stack { source })?;
    Ok(SourceExport::from_stack(stack))
}

/// Run one incoming migration session on `link`.
pub fn receive(
    mut link: Link,
    cfg: &TargetConfig,
    hooks: &dyn TargetHooks,
    busy: &Busy,
) -> Result<(), TargetError> {
    let source_node = link.peer().node_id.clone();
    let f = link.recv().map_err(|source| TargetError::Link { source })?;
    let hello = match Msg::decode(f.msg_type, &f.payload) {
        Ok(Msg::Hello(h)) => h,
        Ok(other) => {
            return Err(refuse(
                &link,
                format!("expected Hello first, got {:?}", other.msg_type()),
            ));
        }
        Err(e) => return Err(refuse(&link, e.to_string())),
    };
    let version =
        wire::negotiate(hello.min_version, hello.max_version).map_err(|m| refuse(&link, m))?;
    if !valid_name(&hello.name) {
        return Err(refuse(
            &link,
            format!(
                "export name {:?} cannot be a file name here: use letters, digits, '.', '_' and '-'",
                hello.name
            ),
        ));
    }
    let claimed = {
        let deadline = std::time::Instant::now() + BUSY_WAIT;
        let mut names = busy.names.lock();
        loop {
            if names.insert(hello.name.clone()) {
                break true;
            }
            if busy.freed.wait_until(&mut names, deadline).timed_out() {
                break names.insert(hello.name.clone());
            }
        }
    };
    if !claimed {
        return Err(refuse(
            &link,
            format!(
                "a migration of {} is already being received here; wait for it to end",
                hello.name
            ),
        ));
    }
    let unbusy = Unbusy(busy, hello.name.clone());
    let format = if hello.format == 1 {
        Format::Qcow2
    } else {
        Format::Raw
    };
    let mig_hex = record::id_hex(&hello.migration_id);
    let disk_hex = record::id_hex(&hello.disk_id);
    let path = cfg.dir.join(format!("{}.img", hello.name));

    // Decide how to start.
    let existing_open = hooks.open_copy(&hello.name);
    let existing_path = existing_open
        .as_ref()
        .map(|e| e.image.clone())
        .or_else(|| path.exists().then(|| path.clone()));
    let (start, rec, export, persister, owned_here) = match existing_path {
        None => {
            let (export, persister) = open_image(&path, format, hello.size, true, cfg, &hello.name)
                .map_err(|e| refuse(&link, crate::source::error_chain(&e)))?;
            (Start::Fresh, None, export, Some(persister), true)
        }
        Some(p) => {
            let rec = record::load(&p)
                .map_err(|e| refuse(&link, crate::source::error_chain(&e)))?
                .ok_or_else(|| {
                    refuse(
                        &link,
                        format!(
                            "{} exists here without an ownership record: move it away or pick \
                             another export name",
                            p.display()
                        ),
                    )
                })?;
            if rec.disk_id != disk_hex {
                return Err(refuse(
                    &link,
                    format!(
                        "this node holds a different disk named {} ({}): remove it or rename the export",
                        hello.name,
                        p.display()
                    ),
                ));
            }
            let incremental_ok =
                hello.base_generation != 0 && hello.base_generation == rec.generation;
            let start = match &rec.state {
                OwnerState::Owner { .. }
                    if rec.generation == hello.generation + 1
                        && rec
                            .peer(&source_node)
                            .is_some_and(|p| p.generation == rec.generation) =>
                {
                    // This source handed the disk to us at exactly this
                    // generation and is asking again: it lost our commit
                    // answer. Tell it the commit stands.
                    let msg = format!(
                        "this node took ownership of {} from node {source_node} at generation {}: \
                         the commit went through",
                        hello.name, rec.generation
                    );
                    let _ = link.send_error(crate::wire::refusal::COMMITTED, &msg);
                    return Err(TargetError::Refused(msg));
                }
                OwnerState::Owner { .. } => {
                    return Err(refuse(
                        &link,
                        format!(
                            "this node owns {} at generation {}: two owners are not allowed; \
                             migrate it from here instead",
                            hello.name, rec.generation
                        ),
                    ));
                }
                OwnerState::Handing { .. } => {
                    return Err(refuse(
                        &link,
                        format!(
                            "this node's copy of {} is in doubt (a handover did not finish): \
                             resolve it first (docs/migration.md)",
                            hello.name
                        ),
                    ));
                }
                OwnerState::Receiving { migration_id, .. }
                    if *migration_id == mig_hex && (rec.peers.is_empty() || incremental_ok) =>
                {
                    Start::Resume
                }
                _ if incremental_ok => Start::Incremental,
                _ => Start::HashResync,
            };
            let (export, persister, owned_here) = match existing_open {
                Some(e) => (e, None, false),
                None => {
                    let (e, p) = open_image(&p, format, hello.size, false, cfg, &hello.name)
                        .map_err(|e| refuse(&link, crate::source::error_chain(&e)))?;
                    (e, Some(p), true)
                }
            };
            (start, Some(rec), export, persister, owned_here)
        }
    };
    let store = export.store.clone();
    // Progress record: kept across attempts of the same migration only.
    let prepared = (|| -> Result<(), String> {
        if start != Start::Resume {
            if store.get(RECEIVED_BITMAP).is_some() {
                store.clear(RECEIVED_BITMAP).map_err(|e| e.to_string())?;
            } else {
                store
                    .add(RECEIVED_BITMAP, hello.granularity as u64)
                    .map_err(|e| e.to_string())?;
            }
        }
        // Marked by hand after each flush, never by the filter.
        store.disable(RECEIVED_BITMAP).map_err(|e| e.to_string())?;
        // What changes here after the commit, relative to the source.
        // Enabled and clean from now on; received data bypasses the filter
        // (see `Receiving::write`), so the commit need not touch it.
        let peer_bm = peer_bitmap_name(&source_node);
        if store.get(&peer_bm).is_some() {
            store.enable(&peer_bm).map_err(|e| e.to_string())?;
            store.clear(&peer_bm).map_err(|e| e.to_string())?;
        } else {
            store
                .add(&peer_bm, understudy_bitmap::DEFAULT_GRANULARITY)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    })();
    if let Err(e) = prepared {
        return Err(refuse(&link, format!("cannot record progress: {e}")));
    }
    let mut rec = rec.unwrap_or(OwnerRecord {
        disk_id: disk_hex.clone(),
        generation: hello.generation,
        state: OwnerState::Owner { migrating: None },
        name: hello.name.clone(),
        peers: Vec::new(),
    });
    rec.state = OwnerState::Receiving {
        from: source_node.clone(),
        migration_id: mig_hex.clone(),
    };
    if let Err(e) = record::store(&export.image, &rec) {
        return Err(refuse(&link, crate::source::error_chain(&e)));
    }
    let (t, b) = Msg::Welcome(Welcome { version, start })
        .to_vec()
        .map_err(|e| TargetError::Protocol(e.to_string()))?;
    link.send(t, &b)
        .map_err(|source| TargetError::Link { source })?;
    if start == Start::Resume {
        let have: Vec<(u64, u64)> = store
            .get(RECEIVED_BITMAP)
            .map(|b| b.dirty_ranges().collect())
            .unwrap_or_default();
        let mut chunks = have.chunks(wire::MAX_RANGES).peekable();
        if chunks.peek().is_none() {
            let (t, b) = Msg::Have {
                ranges: Vec::new(),
                last: true,
            }
            .to_vec()
            .map_err(|e| TargetError::Protocol(e.to_string()))?;
            link.send(t, &b)
                .map_err(|source| TargetError::Link { source })?;
        }
        while let Some(c) = chunks.next() {
            let (t, b) = Msg::Have {
                ranges: c.to_vec(),
                last: chunks.peek().is_none(),
            }
            .to_vec()
            .map_err(|e| TargetError::Protocol(e.to_string()))?;
            link.send(t, &b)
                .map_err(|source| TargetError::Link { source })?;
        }
    }
    tracing::info!(export = %hello.name, from = %source_node, %start, "receiving a migration");

    let mut r = Receiving {
        busy: Some(unbusy),
        export,
        rec,
        persister,
        owned_here,
        unflushed: Vec::new(),
        sticky: None,
        committed: false,
        source_node,
        commit_fault: cfg.commit_fault.clone(),
    };
    let result = session_loop(&mut link, &mut r, hooks);
    if !r.committed && r.owned_here {
        if let Some(p) = r.persister.take() {
            p.stop();
        }
        let _ = r.export.filter.flush();
        let _ = r.export.store.close();
    }
    result
}

/// Apply a mirrored guest request (not counted as received progress: the
/// source's bitmaps still hold it) and answer it; an earlier failure of
/// this session answers instead, and a failure sticks for later ones.
fn mirrored(
    link: &Link,
    r: &mut Receiving<'_>,
    id: u64,
    apply: impl FnOnce(&Receiving<'_>) -> Result<(), BlockError>,
) -> Result<(), TargetError> {
    let res = match &r.sticky {
        Some((c, m)) => Err((*c, m.clone())),
        None => apply(r).map_err(|e| (reply_code(&e), block_msg(&e))),
    };
    match res {
        Ok(()) => reply(link, id, code::OK, &[]),
        Err((c, m)) => {
            r.sticky.get_or_insert((c, m.clone()));
            reply(link, id, c, m.as_bytes())
        }
    }
}

fn reply(link: &Link, id: u64, c: u32, body: &[u8]) -> Result<(), TargetError> {
    let (t, h, tail) = Msg::Reply { id, code: c, body }
        .encode()
        .map_err(|e| TargetError::Protocol(e.to_string()))?;
    link.send_parts(t, &[&h, tail])
        .map_err(|source| TargetError::Link { source })
}

fn session_loop(
    link: &mut Link,
    r: &mut Receiving<'_>,
    hooks: &dyn TargetHooks,
) -> Result<(), TargetError> {
    let mut buf = Vec::new();
    let mut rbuf = Vec::new();
    let size = r.export.filter.size();
    loop {
        let t = match link.recv_into(&mut buf) {
            Ok(t) => t,
            Err(e) if e.is_clean_close() || matches!(e, PeerError::Disconnected) => {
                tracing::info!(export = %r.export.name, committed = r.committed, "migration link closed");
                return Ok(());
            }
            Err(source) => return Err(TargetError::Link { source }),
        };
        let msg = Msg::decode(t, &buf).map_err(|e| {
            let _ = link.send_error(understudy_peer::error_code::PROTOCOL, &e.to_string());
            TargetError::Protocol(e.to_string())
        })?;
        let in_range = |o: u64, l: u64| o.checked_add(l).is_some_and(|e| e <= size);
        match msg {
            Msg::Data { offset, hash, data }
            | Msg::Mirror {
                offset, hash, data, ..
            } if !in_range(offset, data.len() as u64) || wire::extent_hash(data) != hash => {
                let m = if in_range(offset, data.len() as u64) {
                    format!(
                        "checksum mismatch in the extent at offset {offset}: data was corrupted in transit"
                    )
                } else {
                    format!("extent at offset {offset} is outside the {size}-byte disk")
                };
                let _ = link.send_error(understudy_peer::error_code::PROTOCOL, &m);
                return Err(TargetError::Protocol(m));
            }
            Msg::Data { offset, data, .. } if !r.committed => match r.write(offset, data) {
                Ok(()) => r.unflushed.push((offset, data.len() as u64)),
                Err(e) => {
                    r.sticky.get_or_insert((reply_code(&e), block_msg(&e)));
                }
            },
            Msg::Zero { offset, len } if !r.committed && in_range(offset, len) => {
                match r.zero(offset, len) {
                    Ok(()) => r.unflushed.push((offset, len)),
                    Err(e) => {
                        r.sticky.get_or_insert((reply_code(&e), block_msg(&e)));
                    }
                }
            }
            Msg::Mirror {
                id, offset, data, ..
            } if !r.committed => mirrored(link, r, id, |r| r.write(offset, data))?,
            Msg::MirrorZero { offset, len, .. } if !in_range(offset, len) => {
                let m = format!(
                    "mirrored zero range at offset {offset} is outside the {size}-byte disk"
                );
                let _ = link.send_error(understudy_peer::error_code::PROTOCOL, &m);
                return Err(TargetError::Protocol(m));
            }
            Msg::MirrorZero { id, offset, len } if !r.committed => {
                mirrored(link, r, id, |r| r.zero(offset, len))?
            }
            Msg::Flush { id } if !r.committed => {
                let res = flush_progress(r);
                match res {
                    Ok(()) => reply(link, id, code::OK, &[])?,
                    Err((c, m)) => reply(link, id, c, m.as_bytes())?,
                }
            }
            Msg::Commit { id, generation } if !r.committed => {
                let fault = r.commit_fault.as_ref().and_then(|f| f.lock().take());
                if fault == Some(CommitFault::DieBeforeCommit) {
                    tracing::warn!(export = %r.export.name, "test fault: ending the session instead of committing");
                    return Ok(());
                }
                match commit(r, generation, hooks) {
                    Ok(()) if fault == Some(CommitFault::LoseAnswer) => {
                        after_commit(r);
                        tracing::warn!(export = %r.export.name, "test fault: dropping the commit answer");
                        return Ok(());
                    }
                    Ok(()) => {
                        reply(link, id, code::OK, &[])?;
                        after_commit(r);
                    }
                    Err((c, m)) => reply(link, id, c, m.as_bytes())?,
                }
            }
            Msg::HashReq {
                id,
                offset,
                len,
                block,
            } => {
                if !in_range(offset, len) {
                    reply(link, id, code::INVALID, b"range outside the disk")?;
                    continue;
                }
                match hash_blocks(r, offset, len, block as u64, &mut rbuf) {
                    Ok(body) => reply(link, id, code::OK, &body)?,
                    Err(e) => reply(link, id, reply_code(&e), block_msg(&e).as_bytes())?,
                }
            }
            Msg::Abort { reason } => {
                tracing::warn!(export = %r.export.name, %reason, "the source aborted the migration; the partial copy is kept for a retry");
                return Err(TargetError::Aborted(reason));
            }
            Msg::FwdRead { id, offset, len } if r.committed => {
                rbuf.resize(len as usize, 0);
                match r.export.switch.read_at(&mut rbuf, offset) {
                    Ok(()) => reply(link, id, code::OK, &rbuf)?,
                    Err(e) => reply(link, id, reply_code(&e), block_msg(&e).as_bytes())?,
                }
            }
            Msg::FwdWrite {
                id,
                offset,
                flags: f,
                data,
            } if r.committed => {
                let res = r.export.switch.write_at(data, offset, wopts(f));
                fwd_reply(link, id, res)?;
            }
            Msg::FwdZero {
                id,
                offset,
                len,
                flags: f,
            } if r.committed => {
                let z = ZeroOpts {
                    write: wopts(f),
                    may_unmap: f & flags::MAY_UNMAP != 0,
                    fast_only: f & flags::FAST_ONLY != 0,
                };
                let res = r.export.switch.write_zeroes(offset, len, z);
                fwd_reply(link, id, res)?;
            }
            Msg::FwdDiscard {
                id,
                offset,
                len,
                flags: f,
            } if r.committed => {
                let res = r.export.switch.discard(offset, len, wopts(f));
                fwd_reply(link, id, res)?;
            }
            Msg::FwdFlush { id } if r.committed => {
                let res = r.export.switch.flush();
                fwd_reply(link, id, res)?;
            }
            other => {
                let m = format!(
                    "{:?} is not allowed {} the commit",
                    other.msg_type(),
                    if r.committed { "after" } else { "before" }
                );
                let _ = link.send_error(understudy_peer::error_code::PROTOCOL, &m);
                return Err(TargetError::Protocol(m));
            }
        }
    }
}

fn wopts(f: u8) -> WriteOpts {
    WriteOpts {
        fua: f & flags::FUA != 0,
        epoch: 0,
    }
}

fn fwd_reply(link: &Link, id: u64, res: Result<(), BlockError>) -> Result<(), TargetError> {
    match res {
        Ok(()) => reply(link, id, code::OK, &[]),
        Err(e) => reply(link, id, reply_code(&e), block_msg(&e).as_bytes()),
    }
}

/// Make everything received durable, or report this session's earlier
/// failure.
fn flush_received(r: &Receiving<'_>) -> Result<(), (u32, String)> {
    if let Some(s) = &r.sticky {
        return Err(s.clone());
    }
    r.export
        .filter
        .flush()
        .map_err(|e| (reply_code(&e), block_msg(&e)))
}

fn flush_progress(r: &mut Receiving<'_>) -> Result<(), (u32, String)> {
    flush_received(r)?;
    if let Some(b) = r.export.store.get(RECEIVED_BITMAP) {
        for (o, l) in r.unflushed.drain(..) {
            mark_inner(&b, o, l);
        }
    }
    r.export
        .store
        .persist()
        .map_err(|e| (code::IO, crate::source::error_chain(&e)))
}

fn commit(
    r: &mut Receiving<'_>,
    generation: u64,
    hooks: &dyn TargetHooks,
) -> Result<(), (u32, String)> {
    let t0 = std::time::Instant::now();
    // Data durable. (The progress bitmap is not worth a sync any more.)
    flush_received(r)?;
    let t_flush = t0.elapsed();
    let io = |e: &dyn std::error::Error| (code::IO, crate::source::error_chain(e));
    let peer_bm = peer_bitmap_name(&r.source_node);
    r.rec.generation = generation;
    r.rec.state = OwnerState::Owner { migrating: None };
    r.rec.name = r.export.name.clone();
    r.rec.set_peer(PeerRecord {
        node: r.source_node.clone(),
        generation,
        bitmap: Some(peer_bm),
    });
    // The commit point: from here this node is the owner.
    record::store(&r.export.image, &r.rec).map_err(|e| io(&e))?;
    r.committed = true;
    r.busy = None;
    r.export.switch.set_route(Route::Local);
    hooks.serve(r.export.clone(), r.persister.take());
    tracing::info!(
        export = %r.export.name, generation, from = %r.source_node,
        flush_us = t_flush.as_micros() as u64,
        total_us = t0.elapsed().as_micros() as u64,
        "took ownership"
    );
    Ok(())
}

/// After the commit answer: forget the progress record.
fn after_commit(r: &Receiving<'_>) {
    if r.export.store.get(RECEIVED_BITMAP).is_some()
        && let Err(e) = r.export.store.remove(RECEIVED_BITMAP)
    {
        tracing::warn!(export = %r.export.name, "cannot drop the progress bitmap: {e}");
    }
}

fn hash_blocks(
    r: &Receiving<'_>,
    offset: u64,
    len: u64,
    block: u64,
    buf: &mut Vec<u8>,
) -> Result<Vec<u8>, BlockError> {
    let peer_bm = r
        .committed
        .then(|| r.export.store.get(&peer_bitmap_name(&r.source_node)))
        .flatten();
    buf.resize(block as usize, 0);
    let mut out = Vec::with_capacity(len.div_ceil(block) as usize);
    let mut pos = offset;
    while pos < offset + len {
        let n = block.min(offset + len - pos) as usize;
        r.export.filter.read_at(&mut buf[..n], pos)?;
        let changed = peer_bm.as_ref().is_some_and(|b| b.is_dirty(pos));
        out.push((
            wire::extent_hash(&buf[..n]),
            if changed { flags::CHANGED } else { 0 },
        ));
        pos += n as u64;
    }
    Ok(wire::encode_hashes(&out))
}
