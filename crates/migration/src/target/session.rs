//! A receive session after the Welcome: one handler per message, before
//! the commit (data, zeroes, mirrored writes, flushes, the commit) and
//! after it (the source's forwarded requests).

#[cfg(any(test, feature = "testing"))]
use std::sync::Arc;

#[cfg(any(test, feature = "testing"))]
use parking_lot::Mutex;
use understudy_bitmap::Persister;
use understudy_block::{
    BlockError, DiskRead, DiskSize, DiskWrite, ErrorKind, WriteOpts, ZeroOpts, error_chain,
};
use understudy_peer::{Link, PeerError};

#[cfg(any(test, feature = "testing"))]
use super::CommitFault;
#[cfg(any(test, feature = "testing"))]
use super::TargetConfig;
use super::receive::Unbusy;
use super::{TargetError, TargetHooks};
use crate::record::{self, OwnerRecord, OwnerState, PeerRecord};
use crate::source::{RECEIVED_BITMAP, SourceExport, peer_bitmap_name};
use crate::wire::{self, Msg, code, flags};
use understudy_layers::Route;

/// Whether the session goes on after a message (`Break`: it ends).
type Flow = std::ops::ControlFlow<()>;

/// A failed request, as the source is told: reply code and message.
#[derive(Debug, Clone)]
struct Failed {
    code: u32,
    message: String,
}

impl Failed {
    fn block(e: &BlockError) -> Self {
        Self {
            code: reply_code(e),
            message: block_msg(e),
        }
    }

    fn io(e: &dyn std::error::Error) -> Self {
        Self {
            code: code::IO,
            message: error_chain(e),
        }
    }
}

/// What makes a message break the protocol whatever the session's state.
#[derive(Debug, thiserror::Error)]
enum Violation {
    #[error("extent at offset {offset} is outside the {size}-byte disk")]
    Outside { offset: u64, size: u64 },
    #[error("checksum mismatch in the extent at offset {offset}: data was corrupted in transit")]
    Checksum { offset: u64 },
    #[error("mirrored zero range at offset {offset} is outside the {size}-byte disk")]
    ZeroOutside { offset: u64, size: u64 },
}

pub(super) struct Receiving<'a> {
    export: SourceExport,
    rec: OwnerRecord,
    persister: Option<Persister>,
    /// Opened by this session (closed again if it does not commit).
    owned_here: bool,
    unflushed: Vec<(u64, u64)>,
    sticky: Option<Failed>,
    committed: bool,
    source_node: String,
    #[cfg(any(test, feature = "testing"))]
    commit_fault: Option<Arc<Mutex<Option<CommitFault>>>>,
    /// Reused for reads.
    rbuf: Vec<u8>,
    /// Last, so it is dropped last: a retry that claims the name must find
    /// this session's image and bitmap store (whose lock lives as long as
    /// `export`) already closed.
    busy: Option<Unbusy<'a>>,
}

impl<'a> Receiving<'a> {
    pub fn new(
        export: SourceExport,
        rec: OwnerRecord,
        persister: Option<Persister>,
        owned_here: bool,
        source_node: String,
        busy: Unbusy<'a>,
    ) -> Self {
        Self {
            export,
            rec,
            persister,
            owned_here,
            unflushed: Vec::new(),
            sticky: None,
            committed: false,
            source_node,
            #[cfg(any(test, feature = "testing"))]
            commit_fault: None,
            rbuf: Vec::new(),
            busy: Some(busy),
        }
    }

    /// Arm the fault `cfg` holds for the next commit.
    #[cfg(any(test, feature = "testing"))]
    pub fn arm_faults(&mut self, cfg: &TargetConfig) {
        self.commit_fault = cfg.commit_fault.clone();
    }

    /// After the session: an image this session opened and did not commit
    /// is closed (its progress kept for a retry).
    pub fn close_uncommitted(&mut self) {
        if self.committed || !self.owned_here {
            return;
        }
        if let Some(p) = self.persister.take() {
            p.stop();
        }
        if let Err(e) = self.export.filter.flush() {
            tracing::warn!(export = %self.export.name,
                "cannot flush the partial copy at the end of the session (a retry resends what \
                 was not made durable): {}", error_chain(&e));
        }
        let _ = self.export.store.close();
    }

    pub fn session_loop(
        &mut self,
        link: &mut Link,
        hooks: &dyn TargetHooks,
    ) -> Result<(), TargetError> {
        let mut buf = Vec::new();
        loop {
            let t = match link.recv_into(&mut buf) {
                Ok(t) => t,
                Err(e) if e.is_clean_close() || matches!(e, PeerError::Disconnected) => {
                    tracing::info!(export = %self.export.name, committed = self.committed, "migration link closed");
                    return Ok(());
                }
                Err(source) => return Err(TargetError::Link { source }),
            };
            let msg = Msg::decode(t, &buf).map_err(|e| protocol(link, e.to_string()))?;
            if self.handle(link, msg, hooks)?.is_break() {
                return Ok(());
            }
        }
    }

    fn in_range(&self, o: u64, l: u64) -> bool {
        o.checked_add(l)
            .is_some_and(|e| e <= self.export.filter.size())
    }

    /// Extents whose range or hash is wrong end the session.
    fn validate(&self, msg: &Msg<'_>) -> Result<(), Violation> {
        let size = self.export.filter.size();
        match *msg {
            Msg::Data { offset, hash, data }
            | Msg::Mirror {
                offset, hash, data, ..
            } => {
                if !self.in_range(offset, data.len() as u64) {
                    return Err(Violation::Outside { offset, size });
                }
                if wire::extent_hash(data) != hash {
                    return Err(Violation::Checksum { offset });
                }
            }
            Msg::MirrorZero { offset, len, .. } if !self.in_range(offset, len) => {
                return Err(Violation::ZeroOutside { offset, size });
            }
            _ => {}
        }
        Ok(())
    }

    fn handle(
        &mut self,
        link: &Link,
        msg: Msg<'_>,
        hooks: &dyn TargetHooks,
    ) -> Result<Flow, TargetError> {
        self.validate(&msg)
            .map_err(|v| protocol(link, v.to_string()))?;
        match msg {
            Msg::HashReq {
                id,
                offset,
                len,
                block,
            } => self.on_hash_req(link, id, offset, len, block as u64),
            Msg::Abort { reason } => {
                tracing::warn!(export = %self.export.name, %reason, "the source aborted the migration; the partial copy is kept for a retry");
                Err(TargetError::Aborted(reason))
            }
            m if self.committed => self.forwarded(link, m),
            m => self.receiving(link, m, hooks),
        }
    }

    fn not_allowed(&self, link: &Link, m: &Msg<'_>) -> TargetError {
        let when = if self.committed { "after" } else { "before" };
        protocol(
            link,
            format!("{:?} is not allowed {when} the commit", m.msg_type()),
        )
    }
}

impl Receiving<'_> {
    /// Before the commit: the copy arrives.
    fn receiving(
        &mut self,
        link: &Link,
        m: Msg<'_>,
        hooks: &dyn TargetHooks,
    ) -> Result<Flow, TargetError> {
        match m {
            Msg::Data { offset, data, .. } => {
                let r = self.write(offset, data);
                self.received(offset, data.len() as u64, r);
            }
            Msg::Zero { offset, len } if self.in_range(offset, len) => {
                let r = self.zero(offset, len);
                self.received(offset, len, r);
            }
            Msg::Mirror {
                id, offset, data, ..
            } => self.mirrored(link, id, |r| r.write(offset, data))?,
            Msg::MirrorZero { id, offset, len } => {
                self.mirrored(link, id, |r| r.zero(offset, len))?
            }
            Msg::Flush { id } => {
                let res = self.flush_progress();
                answer(link, id, res)?;
            }
            Msg::Commit { id, generation } => return self.on_commit(link, id, generation, hooks),
            other => return Err(self.not_allowed(link, &other)),
        }
        Ok(Flow::Continue(()))
    }

    /// A received extent is progress once flushed; a failure is answered
    /// at the next flush or commit.
    fn received(&mut self, offset: u64, len: u64, r: Result<(), BlockError>) {
        match r {
            Ok(()) => self.unflushed.push((offset, len)),
            Err(e) => {
                self.sticky.get_or_insert(Failed::block(&e));
            }
        }
    }

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

    /// Apply a mirrored guest request (not counted as received progress:
    /// the source's bitmaps still hold it) and answer it; an earlier
    /// failure of this session answers instead, and a failure sticks for
    /// later ones.
    fn mirrored(
        &mut self,
        link: &Link,
        id: u64,
        apply: impl FnOnce(&Self) -> Result<(), BlockError>,
    ) -> Result<(), TargetError> {
        let res = match &self.sticky {
            Some(s) => Err(s.clone()),
            None => apply(self).map_err(|e| Failed::block(&e)),
        };
        if let Err(s) = &res {
            self.sticky.get_or_insert(s.clone());
        }
        answer(link, id, res)
    }

    /// Make everything received durable, or report this session's earlier
    /// failure.
    fn flush_received(&self) -> Result<(), Failed> {
        if let Some(s) = &self.sticky {
            return Err(s.clone());
        }
        self.export.filter.flush().map_err(|e| Failed::block(&e))
    }

    fn flush_progress(&mut self) -> Result<(), Failed> {
        self.flush_received()?;
        if let Some(b) = self.export.store.get(RECEIVED_BITMAP) {
            for (o, l) in self.unflushed.drain(..) {
                mark_inner(&b, o, l);
            }
        }
        self.export.store.persist().map_err(|e| Failed::io(&e))
    }
}

impl Receiving<'_> {
    /// The commit, with the test fault armed for it, if any.
    fn on_commit(
        &mut self,
        link: &Link,
        id: u64,
        generation: u64,
        hooks: &dyn TargetHooks,
    ) -> Result<Flow, TargetError> {
        #[cfg(any(test, feature = "testing"))]
        let fault = self.commit_fault.as_ref().and_then(|f| f.lock().take());
        #[cfg(any(test, feature = "testing"))]
        if fault == Some(CommitFault::DieBeforeCommit) {
            tracing::warn!(export = %self.export.name, "test fault: ending the session instead of committing");
            return Ok(Flow::Break(()));
        }
        let res = self.commit(generation, hooks);
        #[cfg(any(test, feature = "testing"))]
        if res.is_ok() && fault == Some(CommitFault::LoseAnswer) {
            self.after_commit();
            tracing::warn!(export = %self.export.name, "test fault: dropping the commit answer");
            return Ok(Flow::Break(()));
        }
        let ok = res.is_ok();
        answer(link, id, res)?;
        if ok {
            self.after_commit();
        }
        Ok(Flow::Continue(()))
    }

    fn commit(&mut self, generation: u64, hooks: &dyn TargetHooks) -> Result<(), Failed> {
        let t0 = std::time::Instant::now();
        // Data durable. (The progress bitmap is not worth a sync any more.)
        self.flush_received()?;
        let t_flush = t0.elapsed();
        let peer_bm = peer_bitmap_name(&self.source_node);
        self.rec.generation = generation;
        self.rec.state = OwnerState::Owner { migrating: None };
        self.rec.name = self.export.name.clone();
        self.rec.set_peer(PeerRecord {
            node: self.source_node.clone(),
            generation,
            bitmap: Some(peer_bm),
        });
        // The commit point: from here this node is the owner.
        record::store(&self.export.image, &self.rec).map_err(|e| Failed::io(&e))?;
        self.committed = true;
        self.busy = None;
        self.export.switch.set_route(Route::Local);
        hooks.serve(self.export.clone(), self.persister.take());
        tracing::info!(
            export = %self.export.name, generation, from = %self.source_node,
            flush_us = t_flush.as_micros() as u64,
            total_us = t0.elapsed().as_micros() as u64,
            "took ownership"
        );
        Ok(())
    }

    /// After the commit answer: forget the progress record.
    fn after_commit(&self) {
        if self.export.store.get(RECEIVED_BITMAP).is_some()
            && let Err(e) = self.export.store.remove(RECEIVED_BITMAP)
        {
            tracing::warn!(export = %self.export.name, "cannot drop the progress bitmap: {e}");
        }
    }

    fn on_hash_req(
        &mut self,
        link: &Link,
        id: u64,
        offset: u64,
        len: u64,
        block: u64,
    ) -> Result<Flow, TargetError> {
        if !self.in_range(offset, len) {
            reply(link, id, code::INVALID, b"range outside the disk")?;
        } else {
            let res = self.hash_blocks(offset, len, block);
            match res {
                Ok(body) => reply(link, id, code::OK, &body)?,
                Err(e) => reply(link, id, reply_code(&e), block_msg(&e).as_bytes())?,
            }
        }
        Ok(Flow::Continue(()))
    }

    fn hash_blocks(&mut self, offset: u64, len: u64, block: u64) -> Result<Vec<u8>, BlockError> {
        let peer_bm = self
            .committed
            .then(|| self.export.store.get(&peer_bitmap_name(&self.source_node)))
            .flatten();
        let buf = &mut self.rbuf;
        buf.resize(block as usize, 0);
        let mut out = Vec::with_capacity(len.div_ceil(block) as usize);
        let mut pos = offset;
        while pos < offset + len {
            let n = block.min(offset + len - pos) as usize;
            self.export.filter.read_at(&mut buf[..n], pos)?;
            let changed = peer_bm.as_ref().is_some_and(|b| b.is_dirty(pos));
            out.push((
                wire::extent_hash(&buf[..n]),
                if changed { flags::CHANGED } else { 0 },
            ));
            pos += n as u64;
        }
        Ok(wire::encode_hashes(&out))
    }

    /// After the commit: the source forwards its clients' requests.
    fn forwarded(&mut self, link: &Link, m: Msg<'_>) -> Result<Flow, TargetError> {
        let sw = &self.export.switch;
        match m {
            Msg::FwdRead { id, offset, len } => {
                self.rbuf.resize(len as usize, 0);
                match sw.read_at(&mut self.rbuf, offset) {
                    Ok(()) => reply(link, id, code::OK, &self.rbuf)?,
                    Err(e) => reply(link, id, reply_code(&e), block_msg(&e).as_bytes())?,
                }
            }
            Msg::FwdWrite {
                id,
                offset,
                flags: f,
                data,
            } => fwd_reply(link, id, sw.write_at(data, offset, wopts(f)))?,
            Msg::FwdZero {
                id,
                offset,
                len,
                flags: f,
            } => {
                let z = ZeroOpts {
                    write: wopts(f),
                    may_unmap: f & flags::MAY_UNMAP != 0,
                    fast_only: f & flags::FAST_ONLY != 0,
                };
                fwd_reply(link, id, sw.write_zeroes(offset, len, z))?
            }
            Msg::FwdDiscard {
                id,
                offset,
                len,
                flags: f,
            } => fwd_reply(link, id, sw.discard(offset, len, wopts(f)))?,
            Msg::FwdFlush { id } => fwd_reply(link, id, sw.flush())?,
            other => return Err(self.not_allowed(link, &other)),
        }
        Ok(Flow::Continue(()))
    }
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

fn reply_code(e: &BlockError) -> u32 {
    match e.kind() {
        ErrorKind::NoSpace => code::NO_SPACE,
        ErrorKind::OutOfBounds | ErrorKind::Invalid => code::INVALID,
        ErrorKind::NotSupported => code::NOT_SUPPORTED,
        _ => code::IO,
    }
}

fn block_msg(e: &BlockError) -> String {
    let mut s = error_chain(e);
    if e.kind() == ErrorKind::NoSpace {
        s.push_str(": the target's disk is full; free space there and retry");
    }
    s
}

fn wopts(f: u8) -> WriteOpts {
    WriteOpts {
        fua: f & flags::FUA != 0,
        epoch: 0,
    }
}

fn reply(link: &Link, id: u64, c: u32, body: &[u8]) -> Result<(), TargetError> {
    let (t, h, tail) = Msg::Reply { id, code: c, body }
        .encode()
        .map_err(|source| TargetError::Encode { source })?;
    link.send_parts(t, &[&h, tail])
        .map_err(|source| TargetError::Link { source })
}

/// OK, or the failure's code and message.
fn answer(link: &Link, id: u64, res: Result<(), Failed>) -> Result<(), TargetError> {
    match res {
        Ok(()) => reply(link, id, code::OK, &[]),
        Err(f) => reply(link, id, f.code, f.message.as_bytes()),
    }
}

fn fwd_reply(link: &Link, id: u64, res: Result<(), BlockError>) -> Result<(), TargetError> {
    answer(link, id, res.map_err(|e| Failed::block(&e)))
}

/// End the session for a protocol violation, telling the source why.
fn protocol(link: &Link, m: String) -> TargetError {
    let _ = link.send_error(understudy_peer::error_code::PROTOCOL, &m);
    TargetError::Protocol(m)
}
