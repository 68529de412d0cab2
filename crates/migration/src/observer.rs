//! The migration's write observer, installed in the source's block filter
//! for the duration of a migration.
//!
//! * Copy mode: every write marks the in-memory `pending` bitmap (what the
//!   target lacks, precisely, for this session).
//! * Mirror mode: every data write is sent to the target and acknowledged by
//!   it before the guest's write is acknowledged, under a range lock shared
//!   with the background copy, so a background extent and a guest write of
//!   the same range reach the target in the order they hit the source disk.
//!   Write-zeroes are mirrored the same way when the target speaks protocol
//!   version 2 (`MirrorZero`). Discards (whose result depends on the
//!   format: a qcow2 overlay may expose its backing file), write-zeroes to
//!   a version-1 target, and any mirrored request that fails are marked in
//!   `pending` instead (the copy loop sends what the source then reads).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::RwLock;
use understudy_bitmap::DirtyBitmap;
use understudy_block::BlockError;
use understudy_filter::{ObserverError, WriteKind, WriteObserver, WriteOp, WriteToken};
/// Moved to `understudy-layers` (replication and views share it);
/// re-exported so this path keeps working.
pub use understudy_layers::RangeLock;

use crate::conn::Conn;
use crate::wire::{self, Msg};

/// See the module docs.
#[derive(Debug)]
pub struct MigrationObserver {
    pending: Arc<DirtyBitmap>,
    mirror: RwLock<Option<Arc<Conn>>>,
    /// Shared with the copy loop.
    pub locks: RangeLock,
    mirror_failed: AtomicBool,
    mirrored_bytes: AtomicU64,
    /// The target understands `MirrorZero`.
    zeroes: bool,
}

impl MigrationObserver {
    /// An observer marking `pending`; `zeroes`: the target understands
    /// `MirrorZero` (protocol version 2).
    pub fn new(pending: Arc<DirtyBitmap>, zeroes: bool) -> Self {
        Self {
            pending,
            mirror: RwLock::new(None),
            locks: RangeLock::default(),
            mirror_failed: AtomicBool::new(false),
            mirrored_bytes: AtomicU64::new(0),
            zeroes,
        }
    }

    fn mirrors(&self, kind: &WriteKind<'_>) -> bool {
        match kind {
            WriteKind::Data(_) => true,
            WriteKind::Zeroes(_) => self.zeroes,
            WriteKind::Discard => false,
        }
    }

    /// The pending bitmap.
    pub fn pending(&self) -> &Arc<DirtyBitmap> {
        &self.pending
    }

    /// Start (Some) or stop (None) mirroring guest writes.
    pub fn set_mirror(&self, conn: Option<Arc<Conn>>) {
        *self.mirror.write() = conn;
    }

    /// Whether guest writes are mirrored.
    pub fn is_mirroring(&self) -> bool {
        self.mirror.read().is_some()
    }

    /// Whether a mirrored write failed (the link is probably gone).
    pub fn mirror_failed(&self) -> bool {
        self.mirror_failed.load(Ordering::SeqCst)
    }

    /// Guest bytes mirrored so far.
    pub fn mirrored_bytes(&self) -> u64 {
        self.mirrored_bytes.load(Ordering::Relaxed)
    }
}

impl WriteObserver for MigrationObserver {
    fn before_write(&self, op: &WriteOp<'_>) -> Result<WriteToken, ObserverError> {
        if self.is_mirroring() && self.mirrors(&op.kind) {
            return Ok(WriteToken::new(self.locks.lock(op.offset, op.len)));
        }
        Ok(WriteToken::new(0))
    }

    fn after_write(&self, op: &WriteOp<'_>, token: WriteToken, outcome: Result<(), &BlockError>) {
        let lock = token.get();
        let mut sent = false;
        if lock != 0 {
            let conn = self.mirror.read().clone();
            if let (Some(conn), Ok(())) = (conn, outcome) {
                sent = match op.kind {
                    WriteKind::Data(data) => {
                        data.chunks(wire::MAX_DATA).enumerate().all(|(i, chunk)| {
                            let m = Msg::Mirror {
                                id: conn.next_id(),
                                offset: op.offset + (i * wire::MAX_DATA) as u64,
                                hash: wire::extent_hash(chunk),
                                data: chunk,
                            };
                            conn.request_borrowed("apply a mirrored write", m).is_ok()
                        })
                    }
                    WriteKind::Zeroes(_) => {
                        let m = Msg::MirrorZero {
                            id: conn.next_id(),
                            offset: op.offset,
                            len: op.len,
                        };
                        conn.request_borrowed("apply a mirrored write-zeroes", m)
                            .is_ok()
                    }
                    WriteKind::Discard => false,
                };
                if sent {
                    self.mirrored_bytes.fetch_add(op.len, Ordering::Relaxed);
                } else {
                    self.mirror_failed.store(true, Ordering::SeqCst);
                }
            }
        }
        if !sent {
            // Marked even when the local write failed: it may be partial.
            self.pending.mark(op.offset, op.len);
        }
        if lock != 0 {
            self.locks.unlock(lock);
        }
    }
}
