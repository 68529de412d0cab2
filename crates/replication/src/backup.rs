//! [`Backup`]: apply a primary's stream to a local export stack.
//!
//! ```text
//!   Link ─▶ Hello ─▶ decide() ─▶ refused: peer Error, nothing changes
//!                       │
//!                       ▼ Welcome
//!        ┌──────────▶ apply loop ──────────────────────────────────────┐
//!        │  Write/Zero    sync, async: written below the filter          │
//!        │                epoch: buffered until the epoch's close        │
//!        │  EpochClose    buffered writes → journal, flush (one epoch)   │
//!        │  Flush         flush                                          │
//!        │  ResyncDone    flush, take the primary's generations, record  │
//!        │  HashReq       Hashes                                         │
//!        └── Ack(seq) after each; link lost: the open epoch is dropped ──┘
//! ```
//!
//! The primary's writes are applied below the block filter, so the
//! backup's own per-peer bitmap records only what is written after a
//! promotion. Clients see the copy read-only (writes fail) until
//! [`Backup::promote`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use understudy_block::{
    BlockError, Disk, DiskInfo, DiskMap, DiskRead, DiskSize, DiskWrite, Epoch, Extent, WriteOpts,
    ZeroOpts,
};
use understudy_layers::Route;
use understudy_peer::{Link, LinkSender, PeerError, error_code};
use understudy_stack::ExportStack;

use crate::error::ReplicationError;
use crate::generation::{
    self, AfterSplitBrain, Decision, Direction, GenRecord, GenState, Generations, Resolution,
    ResyncMarker, Role, SplitFacts,
};
use crate::primary::{BITMAP, DEFAULT_GRANULARITY};
use crate::wire::{self, CopyInfo, Hello, Mode, Msg, Welcome};

/// How a [`Backup`] applies a stream.
#[derive(Clone, Debug)]
pub struct BackupConfig {
    /// This node's id (the peer link's), which a `discard-node` policy
    /// names. Default: empty (such a policy never picks this node).
    pub node_id: String,
    /// What to do after a split brain (both sides must agree). Default:
    /// disconnect.
    pub after_split_brain: AfterSplitBrain,
    /// Epoch mode: most bytes of one epoch held in memory before they go to
    /// the journal unclosed (the image is then not crash-consistent until
    /// the epoch closes). Keep it under half the journal capacity.
    /// Default: 32 MiB.
    pub max_epoch_bytes: u64,
}

impl Default for BackupConfig {
    fn default() -> Self {
        Self {
            node_id: String::new(),
            after_split_brain: AfterSplitBrain::Disconnect,
            max_epoch_bytes: 32 << 20,
        }
    }
}

/// Counters of a backup.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackupStats {
    /// Sessions accepted.
    pub sessions: u64,
    /// Epochs applied (epoch mode).
    pub epochs: u64,
    /// Sequence number of the last message applied in the current or last
    /// session.
    pub last_seq: u64,
}

/// A backup copy (see the module docs).
#[derive(Debug)]
pub struct Backup {
    stack: ExportStack,
    /// The disk the stream is applied to: below the filter (the journal
    /// when there is one, else the image).
    disk: Arc<dyn Disk>,
    cfg: BackupConfig,
    record: Mutex<GenRecord>,
    /// The running session: its id and the primary's node id. A session
    /// that is no longer current (superseded by its own primary's
    /// reconnect, or ended) applies nothing more.
    current: Mutex<Option<(u64, String)>>,
    next_session: AtomicU64,
    /// Held while a message is applied (and during a handshake), so a
    /// superseded session cannot interleave with the new one.
    apply_lock: Mutex<()>,
    /// This run's random id (see [`Welcome::instance`]).
    instance: u64,
    sessions: AtomicU64,
    epochs: AtomicU64,
    last_seq: AtomicU64,
}

/// A read-only view of a disk: what clients of a backup see.
#[derive(Debug)]
pub struct ReadOnlyView(pub Arc<dyn Disk>);

impl DiskSize for ReadOnlyView {
    fn size(&self) -> u64 {
        self.0.size()
    }
}
impl DiskRead for ReadOnlyView {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> understudy_block::Result<()> {
        self.0.read_at(buf, offset)
    }
}
impl DiskWrite for ReadOnlyView {
    fn write_at(&self, _b: &[u8], _o: u64, _w: WriteOpts) -> understudy_block::Result<()> {
        Err(BlockError::ReadOnly)
    }
    fn write_zeroes(&self, _o: u64, _l: u64, _z: ZeroOpts) -> understudy_block::Result<()> {
        Err(BlockError::ReadOnly)
    }
    fn discard(&self, _o: u64, _l: u64, _w: WriteOpts) -> understudy_block::Result<()> {
        Err(BlockError::ReadOnly)
    }
    fn flush(&self) -> understudy_block::Result<()> {
        Ok(())
    }
    fn order(&self) -> understudy_block::Result<Epoch> {
        Ok(0)
    }
}
impl DiskMap for ReadOnlyView {
    fn map(&self, offset: u64, len: u64) -> understudy_block::Result<Vec<Extent>> {
        self.0.map(offset, len)
    }
}
impl Disk for ReadOnlyView {
    fn info(&self) -> DiskInfo {
        DiskInfo {
            read_only: true,
            ..self.0.info()
        }
    }
}

/// A buffered operation of the open epoch.
enum Pending {
    Write { offset: u64, data: Vec<u8> },
    Zero { offset: u64, len: u64, unmap: bool },
}

/// State of one session's apply loop.
struct Apply {
    mode: Mode,
    peer: String,
    /// The stream starts with a resync: mark the copy inconsistent when
    /// data first arrives (sync, async) or an epoch spills (epoch).
    resync: bool,
    marked: bool,
    epoch: Vec<Pending>,
    epoch_bytes: u64,
    spilled: bool,
    buf: Vec<u8>,
}

impl Backup {
    /// Serve `stack` as a backup: load (or create) its record and route
    /// client writes to failure (reads still work).
    pub fn open(stack: ExportStack, cfg: BackupConfig) -> Result<Backup, ReplicationError> {
        let rec_err = |source| ReplicationError::Record { source };
        let record = match generation::load(&stack.image).map_err(rec_err)? {
            Some(r) => r,
            None => {
                let r = GenRecord::new(&stack.name, Role::Backup, Generations::default());
                generation::store(&stack.image, &r).map_err(rec_err)?;
                r
            }
        };
        let disk = stack.filter.inner().clone();
        stack
            .switch
            .set_route(Route::Pivot(Arc::new(ReadOnlyView(stack.filter.clone()))));
        Ok(Backup {
            stack,
            disk,
            cfg,
            record: Mutex::new(record),
            current: Mutex::new(None),
            next_session: AtomicU64::new(0),
            apply_lock: Mutex::new(()),
            instance: generation::new_id(),
            sessions: AtomicU64::new(0),
            epochs: AtomicU64::new(0),
            last_seq: AtomicU64::new(0),
        })
    }

    /// The export stack (its switch is what clients are served).
    pub fn stack(&self) -> &ExportStack {
        &self.stack
    }

    /// The generation record.
    pub fn record(&self) -> GenRecord {
        self.record.lock().clone()
    }

    /// Counters.
    pub fn stats(&self) -> BackupStats {
        BackupStats {
            sessions: self.sessions.load(Ordering::SeqCst),
            epochs: self.epochs.load(Ordering::SeqCst),
            last_seq: self.last_seq.load(Ordering::SeqCst),
        }
    }

    /// Whether a primary is connected.
    pub fn is_serving(&self) -> bool {
        self.current.lock().is_some()
    }

    /// End the running session (an operator's disconnect, or a session
    /// whose primary vanished without closing the link): it applies
    /// nothing more, and [`Backup::promote`] is possible.
    pub fn end_session(&self) {
        let _g = self.apply_lock.lock();
        *self.current.lock() = None;
    }

    fn is_current(&self, id: u64) -> bool {
        self.current.lock().as_ref().is_some_and(|(i, _)| *i == id)
    }

    /// Give the stack back (a backup that is not promoted stays read-only).
    pub fn into_stack(self) -> ExportStack {
        self.stack
    }

    /// Run one replication session on this thread until the link ends. A
    /// session refused by the generations changes nothing and returns
    /// [`ReplicationError::Refused`]; a lost link returns `Ok` (the open
    /// epoch, in epoch mode, is dropped).
    ///
    /// A new connection from the primary of the running session supersedes
    /// it (the primary runs one session at a time, so the old one is dead
    /// even if this side has not noticed); one from another node is refused
    /// with `BUSY`.
    pub fn serve(&self, link: Link) -> Result<(), ReplicationError> {
        self.serve_with(link, None)
    }

    /// [`Backup::serve`] for a link whose hello was already read with
    /// [`recv_hello`] (a daemon needs its export name and size to open the
    /// copy before there is a `Backup`).
    pub fn serve_after_hello(&self, link: Link, hello: Hello) -> Result<(), ReplicationError> {
        self.serve_with(link, Some(hello))
    }

    fn serve_with(&self, link: Link, hello: Option<Hello>) -> Result<(), ReplicationError> {
        let peer = link.peer().node_id.clone();
        let id = {
            let mut cur = self.current.lock();
            if let Some((_, p)) = &*cur {
                if *p != peer {
                    let _ = link.send_error(
                        error_code::BUSY,
                        "another primary is replicating to this backup",
                    );
                    return Err(ReplicationError::Protocol {
                        reason: format!("{peer} was refused: {p} is replicating here"),
                    });
                }
                tracing::warn!(
                    peer,
                    "the primary reconnected: its old session is superseded"
                );
            }
            let id = self.next_session.fetch_add(1, Ordering::SeqCst) + 1;
            *cur = Some((id, peer));
            id
        };
        self.sessions.fetch_add(1, Ordering::SeqCst);
        let r = self.serve_inner(link, id, hello);
        let mut cur = self.current.lock();
        if cur.as_ref().is_some_and(|(i, _)| *i == id) {
            *cur = None;
        }
        r
    }

    fn serve_inner(
        &self,
        mut link: Link,
        id: u64,
        hello: Option<Hello>,
    ) -> Result<(), ReplicationError> {
        let (mode, resync) = {
            let _g = self.apply_lock.lock();
            if !self.is_current(id) {
                return Ok(());
            }
            self.handshake(&mut link, hello)?
        };
        let peer = link.peer().node_id.clone();
        let (tx, mut rx) = link.split();
        let mut st = Apply {
            mode,
            peer,
            resync,
            marked: false,
            epoch: Vec::new(),
            epoch_bytes: 0,
            spilled: false,
            buf: Vec::new(),
        };
        let mut frame = Vec::new();
        loop {
            let t = match rx.recv_into(&mut frame) {
                Ok(t) => t,
                Err(PeerError::PeerClosed { .. } | PeerError::Disconnected) => return Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, "replication link lost");
                    return Ok(());
                }
            };
            let m = match Msg::decode(t, &frame) {
                Ok(m) => m,
                Err(source) => {
                    let _ = tx.send_error(error_code::PROTOCOL, &source.to_string());
                    return Err(ReplicationError::Wire { source });
                }
            };
            let seq = m.seq().unwrap_or(0);
            let _g = self.apply_lock.lock();
            if !self.is_current(id) {
                tracing::info!("a superseded replication session ends");
                return Ok(());
            }
            if let Err(e) = self.apply(&mut st, &tx, m) {
                let _ = ack(&tx, seq, failure_code(&e), &e.to_string());
                return Err(e);
            }
            self.last_seq.store(seq, Ordering::SeqCst);
            ack(&tx, seq, wire::code::OK, "")?;
        }
    }

    /// Hello, version and size, welcome, generations: the mode and whether
    /// a resync follows, or a refusal (sent to the primary too).
    fn handshake(
        &self,
        link: &mut Link,
        hello: Option<Hello>,
    ) -> Result<(Mode, bool), ReplicationError> {
        let hello = match hello {
            Some(h) => h,
            None => recv_hello(link)?,
        };
        let refuse = |link: &Link, e: ReplicationError| {
            let _ = link.send_error(error_code::REFUSED, &e.to_string());
            e
        };
        let version = self.check_hello(&hello).map_err(|e| refuse(link, e))?;
        // The welcome goes out even when the generations refuse, so the
        // primary reaches the same decision from the same facts and
        // reports it; then the refusal follows.
        let welcome = Msg::Welcome(Welcome {
            version,
            instance: self.instance,
            copy: self.copy_info(),
        });
        let (t, body, _) = welcome
            .encode()
            .map_err(|source| ReplicationError::Wire { source })?;
        link.send(t, &body)
            .map_err(|source| ReplicationError::Send { source })?;
        let peer = link.peer().node_id.clone();
        let resync = self.admit(&hello, &peer).map_err(|e| refuse(link, e))?;
        self.demote()?;
        Ok((hello.mode, resync))
    }

    fn copy_info(&self) -> CopyInfo {
        let rec = self.record.lock();
        CopyInfo {
            gens: rec.gens.clone(),
            crashed_primary: false,
            changed_bytes: self.stack.store.get(BITMAP).map_or(0, |b| b.dirty_bytes()),
            promoted_at_ms: rec.promoted_at_ms,
        }
    }

    /// Check the hello's version and size; returns the version.
    fn check_hello(&self, hello: &Hello) -> Result<u16, ReplicationError> {
        let version = wire::negotiate(hello.min_version, hello.max_version)
            .map_err(|source| ReplicationError::Wire { source })?;
        let size = self.disk.size();
        if hello.size != size {
            return Err(ReplicationError::SizeMismatch {
                primary: hello.size,
                backup: size,
            });
        }
        Ok(version)
    }

    /// What the generations allow: whether a resync follows, or a refusal.
    fn admit(&self, hello: &Hello, peer: &str) -> Result<bool, ReplicationError> {
        let mine = self.record.lock().state(false);
        let theirs = GenState {
            gens: hello.copy.gens.clone(),
            crashed_primary: hello.copy.crashed_primary,
        };
        let decision = generation::decide(&mine, &theirs);
        tracing::info!(?decision, peer, "replication connect decision (backup)");
        let resync = match decision {
            Decision::NoSync => false,
            Decision::SyncFromBitmap {
                direction: Direction::FromPeer,
            }
            | Decision::FullSync {
                direction: Direction::FromPeer,
            } => true,
            Decision::SplitBrain { recoverable: true } if self.policy_discards_me(hello, peer) => {
                true
            }
            _ => {
                if matches!(decision, Decision::SplitBrain { .. }) {
                    tracing::error!(
                        ?decision,
                        "split brain detected; nothing is overwritten without an after-split-brain policy"
                    );
                    let mut rec = self.record.lock();
                    rec.split_brain = true;
                    generation::store(&self.stack.image, &rec)
                        .map_err(|source| ReplicationError::Record { source })?;
                }
                return Err(ReplicationError::Refused { decision });
            }
        };
        Ok(resync)
    }

    fn policy_discards_me(&self, hello: &Hello, peer: &str) -> bool {
        let info = self.copy_info();
        let mine = SplitFacts {
            node: self.cfg.node_id.clone(),
            changed_bytes: info.changed_bytes,
            promoted_at_ms: info.promoted_at_ms,
        };
        let theirs = SplitFacts {
            node: peer.to_owned(),
            changed_bytes: hello.copy.changed_bytes,
            promoted_at_ms: hello.copy.promoted_at_ms,
        };
        generation::resolve_split_brain(&self.cfg.after_split_brain, &mine, &theirs)
            == Resolution::DiscardLocal
    }

    /// A promoted copy that accepted a primary (its changes were
    /// discarded by a policy, or it is re-protected) is a backup again:
    /// client writes fail from here on.
    fn demote(&self) -> Result<(), ReplicationError> {
        let mut rec = self.record.lock();
        if rec.role == Role::Backup {
            return Ok(());
        }
        tracing::warn!(export = %rec.name, "a promoted copy accepted a primary: it is a backup again");
        self.stack
            .switch
            .set_route(Route::Pivot(Arc::new(ReadOnlyView(
                self.stack.filter.clone(),
            ))));
        rec.role = Role::Backup;
        generation::store(&self.stack.image, &rec)
            .map_err(|source| ReplicationError::Record { source })
    }

    /// Set the "resync in progress" marker once (the copy is not
    /// consistent until the resync ends).
    fn mark_inconsistent(&self, st: &mut Apply) -> Result<(), ReplicationError> {
        if st.marked {
            return Ok(());
        }
        st.marked = true;
        let mut rec = self.record.lock();
        rec.resync = Some(ResyncMarker {
            peer: st.peer.clone(),
            source: false,
        });
        generation::store(&self.stack.image, &rec)
            .map_err(|source| ReplicationError::Record { source })
    }

    /// Apply one message (the caller acks it).
    fn apply(&self, st: &mut Apply, tx: &LinkSender, m: Msg<'_>) -> Result<(), ReplicationError> {
        match m {
            Msg::Write {
                offset,
                flags,
                data,
                ..
            } => self.apply_write(st, offset, flags, data),
            Msg::Zero {
                offset, len, flags, ..
            } => {
                let unmap = flags & wire::flags::MAY_UNMAP != 0;
                if st.mode == Mode::Epoch && !st.spilled {
                    st.epoch.push(Pending::Zero { offset, len, unmap });
                    return Ok(());
                }
                if st.resync {
                    self.mark_inconsistent(st)?;
                }
                self.zero(offset, len, unmap)
            }
            // In epoch mode neither a flush nor the end of a resync applies
            // the open epoch: only its close does.
            Msg::Flush { .. } => self.flush("flush"),
            Msg::EpochClose { .. } => self.close_epoch(st),
            Msg::ResyncDone { gens, .. } => self.resync_done(st, &gens),
            Msg::HashReq {
                seq,
                offset,
                len,
                block,
            } => {
                let hashes = self.hashes(st, offset, len, block)?;
                let (t, body, _) = Msg::Hashes { seq, hashes }
                    .encode()
                    .map_err(|source| ReplicationError::Wire { source })?;
                tx.send(t, &body)
                    .map_err(|source| ReplicationError::Send { source })
            }
            other => Err(ReplicationError::Protocol {
                reason: format!("unexpected {:?} from the primary", other.msg_type()),
            }),
        }
    }

    fn flush(&self, op: &'static str) -> Result<(), ReplicationError> {
        self.disk
            .flush()
            .map_err(|source| ReplicationError::Disk { op, source })
    }

    /// A write: buffered in the open epoch (epoch mode), else written.
    fn apply_write(
        &self,
        st: &mut Apply,
        offset: u64,
        flags: u8,
        data: &[u8],
    ) -> Result<(), ReplicationError> {
        if st.mode == Mode::Epoch && !st.spilled {
            st.epoch_bytes += data.len() as u64;
            st.epoch.push(Pending::Write {
                offset,
                data: data.to_vec(),
            });
            return self.maybe_spill(st);
        }
        if st.resync {
            self.mark_inconsistent(st)?;
        }
        let opts = WriteOpts {
            fua: flags & wire::flags::FUA != 0,
            epoch: 0,
        };
        self.disk
            .write_at(data, offset, opts)
            .map_err(|source| ReplicationError::Disk {
                op: "write",
                source,
            })?;
        if st.spilled {
            // The copy is marked inconsistent already: close journal
            // epochs as it fills, so one huge epoch (a full resync) cannot
            // outgrow the journal.
            st.epoch_bytes += data.len() as u64;
            if st.epoch_bytes > self.cfg.max_epoch_bytes {
                st.epoch_bytes = 0;
                self.flush("apply a spilled epoch")?;
            }
        }
        Ok(())
    }

    /// The open epoch goes into the journal and is closed and flushed as
    /// one journal epoch.
    fn close_epoch(&self, st: &mut Apply) -> Result<(), ReplicationError> {
        self.apply_epoch(st)?;
        self.flush("close an epoch")?;
        self.epochs.fetch_add(1, Ordering::SeqCst);
        st.spilled = false;
        if st.marked {
            // In epoch mode the marker means "an epoch spilled": this
            // close made the image consistent again.
            st.marked = false;
            let mut rec = self.record.lock();
            rec.resync = None;
            generation::store(&self.stack.image, &rec)
                .map_err(|source| ReplicationError::Record { source })?;
        }
        Ok(())
    }

    /// The resync is complete: take the primary's generations.
    fn resync_done(&self, st: &mut Apply, gens: &Generations) -> Result<(), ReplicationError> {
        self.flush("flush")?;
        let mut rec = self.record.lock();
        rec.gens.sync_done_target(gens);
        rec.resync = None;
        rec.split_brain = false;
        rec.peer = Some(st.peer.clone());
        rec.role = Role::Backup;
        generation::store(&self.stack.image, &rec)
            .map_err(|source| ReplicationError::Record { source })?;
        st.resync = false;
        st.marked = false;
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64, unmap: bool) -> Result<(), ReplicationError> {
        let z = ZeroOpts {
            may_unmap: unmap,
            ..ZeroOpts::default()
        };
        self.disk
            .write_zeroes(offset, len, z)
            .map_err(|source| ReplicationError::Disk {
                op: "write zeroes",
                source,
            })
    }

    /// An epoch too large to hold goes to the journal unclosed: the copy
    /// is then inconsistent until the epoch closes (recorded, so a
    /// promotion refuses it).
    fn maybe_spill(&self, st: &mut Apply) -> Result<(), ReplicationError> {
        if st.epoch_bytes <= self.cfg.max_epoch_bytes {
            return Ok(());
        }
        tracing::warn!(
            bytes = st.epoch_bytes,
            "epoch larger than max_epoch_bytes: applying it unclosed"
        );
        self.mark_inconsistent(st)?;
        st.resync = true;
        self.apply_epoch(st)?;
        st.spilled = true;
        Ok(())
    }

    /// Write the buffered operations of the open epoch.
    fn apply_epoch(&self, st: &mut Apply) -> Result<(), ReplicationError> {
        for p in st.epoch.drain(..) {
            match p {
                Pending::Write { offset, data } => self
                    .disk
                    .write_at(&data, offset, WriteOpts::default())
                    .map_err(|source| ReplicationError::Disk {
                        op: "write",
                        source,
                    })?,
                Pending::Zero { offset, len, unmap } => self.zero(offset, len, unmap)?,
            }
        }
        st.epoch_bytes = 0;
        Ok(())
    }

    fn hashes(
        &self,
        st: &mut Apply,
        offset: u64,
        len: u64,
        block: u32,
    ) -> Result<Vec<u64>, ReplicationError> {
        let end = offset.saturating_add(len).min(self.disk.size());
        let mut out = Vec::with_capacity(len.div_ceil(u64::from(block)) as usize);
        let mut pos = offset;
        while pos < end {
            let n = u64::from(block).min(end - pos) as usize;
            st.buf.resize(n, 0);
            self.disk
                .read_at(&mut st.buf[..n], pos)
                .map_err(|source| ReplicationError::Disk { op: "hash", source })?;
            out.push(wire::extent_hash(&st.buf[..n]));
            pos += n as u64;
        }
        Ok(out)
    }

    /// Make this copy writable (manual failover): refused while a session
    /// runs or a resync left the copy inconsistent. Starts a new generation
    /// (the old one becomes the bitmap id), clears the per-peer bitmap so
    /// it records what is written from now on, and routes client I/O to
    /// the stack's own disk.
    pub fn promote(&self) -> Result<(), ReplicationError> {
        let _g = self.apply_lock.lock();
        if self.current.lock().is_some() {
            return Err(ReplicationError::Role {
                role: Role::Backup,
                what: "a primary is connected; stop it, or end its session (end_session) if it is gone, before promoting",
            });
        }
        let mut rec = self.record.lock();
        if rec.resync.is_some() {
            return Err(ReplicationError::Role {
                role: rec.role,
                what: "its data is mid-resync and inconsistent; resync it from the primary first",
            });
        }
        let store = &self.stack.store;
        let bitmap_err =
            |source: Box<dyn std::error::Error + Send + Sync>| ReplicationError::Bitmap {
                name: BITMAP.into(),
                source,
            };
        if store.get(BITMAP).is_none() {
            store
                .add(BITMAP, DEFAULT_GRANULARITY)
                .map_err(|e| bitmap_err(Box::new(e)))?;
        }
        store.clear(BITMAP).map_err(|e| bitmap_err(Box::new(e)))?;
        rec.gens.new_current(generation::new_id());
        rec.role = Role::Primary;
        rec.promoted_at_ms = generation::now_ms();
        generation::store(&self.stack.image, &rec)
            .map_err(|source| ReplicationError::Record { source })?;
        self.stack.switch.set_route(Route::Local);
        tracing::info!(export = %rec.name, "backup promoted");
        Ok(())
    }
}

/// The `Ack` code for a failed request.
fn failure_code(e: &ReplicationError) -> u32 {
    match e {
        ReplicationError::Disk { source, .. }
            if source.kind() == understudy_block::ErrorKind::NoSpace =>
        {
            wire::code::NO_SPACE
        }
        ReplicationError::Disk { .. } => wire::code::IO,
        _ => wire::code::INVALID,
    }
}

fn ack(tx: &LinkSender, seq: u64, code: u32, text: &str) -> Result<(), ReplicationError> {
    let text = understudy_peer::wire::truncate_utf8(text, wire::MAX_TEXT);
    let (t, body, _) = Msg::Ack {
        seq,
        code,
        text: text.to_owned(),
    }
    .encode()
    .map_err(|source| ReplicationError::Wire { source })?;
    tx.send(t, &body)
        .map_err(|source| ReplicationError::Send { source })
}

/// Read a primary's first message, its hello (see
/// [`Backup::serve_after_hello`]); a link that starts otherwise gets a
/// protocol error.
pub fn recv_hello(link: &mut Link) -> Result<Hello, ReplicationError> {
    let frame = link
        .recv()
        .map_err(|source| ReplicationError::Recv { source })?;
    let hello = match Msg::decode(frame.msg_type, &frame.payload) {
        Ok(Msg::Hello(h)) => h,
        Ok(other) => {
            let reason = format!("expected a hello, got {:?}", other.msg_type());
            let _ = link.send_error(error_code::PROTOCOL, &reason);
            return Err(ReplicationError::Protocol { reason });
        }
        Err(source) => {
            let _ = link.send_error(error_code::PROTOCOL, &source.to_string());
            return Err(ReplicationError::Wire { source });
        }
    };
    Ok(hello)
}
