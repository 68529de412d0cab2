//! The source's side of an established migration link: many threads send
//! (the copy loop, mirrored guest writes, forwarded requests), one thread
//! receives and hands each reply to the request that waits for it.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;

use parking_lot::Mutex;
use understudy_block::{
    BlockError, Disk, DiskInfo, DiskMap, DiskRead, DiskSize, DiskWrite, Extent, ExtentKind,
    Result as BlockResult, WriteOpts, ZeroOpts, check_range,
};
use understudy_peer::{LinkReceiver, LinkSender, PeerError};

use crate::error::MigrationError;
use crate::wire::{self, Msg, code, flags};

/// Carries a reply, or `None` when the link died (the reason is in
/// `why_dead`).
type ReplyTx = mpsc::SyncSender<Option<(u32, Vec<u8>)>>;

/// A link to the target, shared by every sender.
pub struct Conn {
    tx: LinkSender,
    pending: Mutex<HashMap<u64, ReplyTx>>,
    next_id: AtomicU64,
    dead: AtomicBool,
    why_dead: Mutex<Option<String>>,
    bytes_sent: AtomicU64,
    info: DiskInfo,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("peer", &self.tx.peer().node_id)
            .field("dead", &self.dead.load(Ordering::Relaxed))
            .finish()
    }
}

impl Conn {
    /// Wrap the link halves and start the reply thread.
    pub fn start(
        tx: LinkSender,
        mut rx: LinkReceiver,
        info: DiskInfo,
    ) -> std::io::Result<Arc<Conn>> {
        let conn = Arc::new(Conn {
            tx,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            dead: AtomicBool::new(false),
            why_dead: Mutex::new(None),
            bytes_sent: AtomicU64::new(0),
            info,
        });
        let weak = Arc::downgrade(&conn);
        std::thread::Builder::new()
            .name("migrate-replies".into())
            .spawn(move || {
                let mut buf = Vec::new();
                let why = loop {
                    let t = match rx.recv_into(&mut buf) {
                        Ok(t) => t,
                        Err(PeerError::Remote { code, message }) => {
                            break format!("the target reported error {code}: {message}");
                        }
                        Err(e) => break e.to_string(),
                    };
                    let Some(conn) = weak.upgrade() else { return };
                    match Msg::decode(t, &buf) {
                        Ok(Msg::Reply { id, code, body }) => {
                            if let Some(w) = conn.pending.lock().remove(&id) {
                                let _ = w.send(Some((code, body.to_vec())));
                            }
                        }
                        Ok(other) => {
                            break format!("unexpected {:?} from the target", other.msg_type());
                        }
                        Err(e) => break e.to_string(),
                    }
                };
                if let Some(conn) = weak.upgrade() {
                    conn.kill(why);
                }
            })?;
        Ok(conn)
    }

    fn kill(&self, why: String) {
        tracing::debug!(%why, "migration link closed");
        self.why_dead.lock().get_or_insert(why);
        self.dead.store(true, Ordering::SeqCst);
        for (_, w) in self.pending.lock().drain() {
            let _ = w.send(None);
        }
    }

    /// Whether the link is gone.
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    /// Why the link is gone.
    pub fn why_dead(&self) -> Option<String> {
        self.why_dead.lock().clone()
    }

    /// Payload bytes sent so far (data extents, mirrored and forwarded
    /// writes, plus message headers).
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }

    /// Send a message that has no reply.
    pub fn send(&self, m: &Msg<'_>) -> Result<(), MigrationError> {
        let (t, h, tail) = m
            .encode()
            .map_err(|source| MigrationError::Wire { source })?;
        self.bytes_sent
            .fetch_add((h.len() + tail.len()) as u64, Ordering::Relaxed);
        self.tx
            .send_parts(t, &[&h, tail])
            .map_err(|source| MigrationError::Send { source })
    }

    /// A fresh request id.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Send a request (`make` builds it with the id) and wait for its reply.
    /// A reply with a non-OK code becomes [`MigrationError::Target`].
    pub fn request(
        &self,
        op: &'static str,
        make: impl FnOnce(u64) -> Msg<'static>,
    ) -> Result<Vec<u8>, MigrationError> {
        self.request_borrowed(op, make(self.next_id()))
    }

    /// Like [`Conn::request`] for a message that borrows data; its id must
    /// come from [`Conn::next_id`].
    pub fn request_borrowed(
        &self,
        op: &'static str,
        m: Msg<'_>,
    ) -> Result<Vec<u8>, MigrationError> {
        let id = match &m {
            Msg::Flush { id }
            | Msg::Mirror { id, .. }
            | Msg::MirrorZero { id, .. }
            | Msg::Commit { id, .. }
            | Msg::HashReq { id, .. }
            | Msg::FwdRead { id, .. }
            | Msg::FwdWrite { id, .. }
            | Msg::FwdZero { id, .. }
            | Msg::FwdDiscard { id, .. }
            | Msg::FwdFlush { id } => *id,
            _ => {
                return Err(MigrationError::Protocol {
                    reason: format!("{:?} is not a request", m.msg_type()),
                });
            }
        };
        let (wtx, wrx) = mpsc::sync_channel(1);
        self.pending.lock().insert(id, wtx);
        if self.is_dead() {
            self.pending.lock().remove(&id);
            return Err(self.dead_error());
        }
        if let Err(e) = self.send(&m) {
            self.pending.lock().remove(&id);
            return Err(e);
        }
        match wrx.recv() {
            Ok(Some((code::OK, body))) => Ok(body),
            Ok(Some((c, body))) => Err(MigrationError::Target {
                op,
                code: c,
                message: wire::sanitize(&body),
            }),
            Ok(None) | Err(_) => Err(self.dead_error()),
        }
    }

    fn dead_error(&self) -> MigrationError {
        MigrationError::Recv {
            source: PeerError::Protocol {
                reason: self
                    .why_dead()
                    .unwrap_or_else(|| "the link is closed".into()),
            },
        }
    }

    /// Close the link cleanly.
    pub fn close(&self, reason: &str) {
        let _ = self.tx.close(reason);
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Nothing forwards over this link any more: let the target's
        // session end instead of idling on keepalives.
        let _ = self.tx.close("migration link no longer needed");
    }
}

/// The new owner's disk, reached over the migration link: what a handed-over
/// export forwards its remaining clients' requests to.
#[derive(Debug, Clone)]
pub struct RemoteDisk {
    conn: Arc<Conn>,
}

impl RemoteDisk {
    /// Forward over `conn`.
    pub fn new(conn: Arc<Conn>) -> Self {
        Self { conn }
    }
}

fn fwd_err(op: &'static str, offset: u64, len: u64, e: MigrationError) -> BlockError {
    let kind = match &e {
        MigrationError::Target { code: c, .. } if *c == code::NO_SPACE => {
            std::io::Error::from_raw_os_error(libc::ENOSPC)
        }
        _ => std::io::Error::other(e),
    };
    match op {
        "read" => BlockError::Read {
            offset,
            len,
            source: kind,
        },
        "write" => BlockError::Write {
            offset,
            len,
            source: kind,
        },
        "write-zeroes" => BlockError::WriteZeroes {
            offset,
            len,
            source: kind,
        },
        "discard" => BlockError::Discard {
            offset,
            len,
            source: kind,
        },
        _ => BlockError::Flush { source: kind },
    }
}

impl DiskSize for RemoteDisk {
    fn size(&self) -> u64 {
        self.conn.info.size
    }
}

impl DiskRead for RemoteDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        check_range(offset, buf.len() as u64, self.size())?;
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(wire::MAX_DATA);
            let off = offset + done as u64;
            let body = self
                .conn
                .request("forward a read", |id| Msg::FwdRead {
                    id,
                    offset: off,
                    len: n as u32,
                })
                .map_err(|e| fwd_err("read", off, n as u64, e))?;
            if body.len() != n {
                return Err(BlockError::Backend {
                    op: "forwarded read",
                    reason: format!("the owner returned {} bytes for {n}", body.len()),
                });
            }
            buf[done..done + n].copy_from_slice(&body);
            done += n;
        }
        Ok(())
    }
}

fn wflags(opts: WriteOpts) -> u8 {
    if opts.fua { flags::FUA } else { 0 }
}

impl DiskWrite for RemoteDisk {
    fn write_at(&self, buf: &[u8], offset: u64, opts: WriteOpts) -> BlockResult<()> {
        check_range(offset, buf.len() as u64, self.size())?;
        for (i, chunk) in buf.chunks(wire::MAX_DATA).enumerate() {
            let off = offset + (i * wire::MAX_DATA) as u64;
            let m = Msg::FwdWrite {
                id: self.conn.next_id(),
                offset: off,
                flags: wflags(opts),
                data: chunk,
            };
            self.conn
                .request_borrowed("forward a write", m)
                .map_err(|e| fwd_err("write", off, chunk.len() as u64, e))?;
        }
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> BlockResult<()> {
        check_range(offset, len, self.size())?;
        let mut f = wflags(opts.write);
        if opts.may_unmap {
            f |= flags::MAY_UNMAP;
        }
        if opts.fast_only {
            f |= flags::FAST_ONLY;
        }
        self.conn
            .request("forward a write-zeroes", |id| Msg::FwdZero {
                id,
                offset,
                len,
                flags: f,
            })
            .map(drop)
            .map_err(|e| fwd_err("write-zeroes", offset, len, e))
    }
    fn discard(&self, offset: u64, len: u64, opts: WriteOpts) -> BlockResult<()> {
        check_range(offset, len, self.size())?;
        self.conn
            .request("forward a discard", |id| Msg::FwdDiscard {
                id,
                offset,
                len,
                flags: wflags(opts),
            })
            .map(drop)
            .map_err(|e| fwd_err("discard", offset, len, e))
    }
    fn flush(&self) -> BlockResult<()> {
        self.conn
            .request("forward a flush", |id| Msg::FwdFlush { id })
            .map(drop)
            .map_err(|e| fwd_err("flush", 0, 0, e))
    }
}

impl DiskMap for RemoteDisk {
    fn map(&self, offset: u64, len: u64) -> BlockResult<Vec<Extent>> {
        check_range(offset, len, self.size())?;
        // Allocation is not forwarded: "data" is always a correct answer.
        Ok(vec![Extent {
            offset,
            len: len.max(1).min(self.size() - offset),
            kind: ExtentKind::Data,
        }])
    }
}

impl Disk for RemoteDisk {
    fn info(&self) -> DiskInfo {
        DiskInfo {
            can_discard: true,
            can_fast_zero: false,
            ..self.conn.info.clone()
        }
    }
}
