//! The copy engine's sink on the source: the migration link to the target.

use std::sync::Arc;

use understudy_copy::{BlockHash, CopyError, CopySink};
use understudy_peer::PeerError;

use crate::conn::Conn;
use crate::error::MigrationError;
use crate::observer::MigrationObserver;
use crate::wire::{self, Msg};

/// Sends copied extents to the target as `Data`/`Zero` messages, under the
/// observer's range lock (so a mirrored guest write of the same range is
/// ordered against them), and asks the target for flushes and hashes.
#[derive(Debug, Clone)]
pub struct PeerSink {
    conn: Arc<Conn>,
    obs: Arc<MigrationObserver>,
}

impl PeerSink {
    /// Send over `conn`, locking ranges in `obs`.
    pub fn new(conn: Arc<Conn>, obs: Arc<MigrationObserver>) -> Self {
        Self { conn, obs }
    }
}

impl CopySink for PeerSink {
    type Error = MigrationError;

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), MigrationError> {
        self.conn.send(&Msg::Data {
            offset,
            hash: wire::extent_hash(data),
            data,
        })
    }

    fn zero(&mut self, offset: u64, len: u64) -> Result<(), MigrationError> {
        self.conn.send(&Msg::Zero { offset, len })
    }

    fn flush(&mut self) -> Result<(), MigrationError> {
        self.conn
            .request("make the copy durable", |id| Msg::Flush { id })
            .map(drop)
    }

    fn hashes(
        &mut self,
        offset: u64,
        len: u64,
        block: u64,
    ) -> Result<Vec<BlockHash>, MigrationError> {
        let body = self.conn.request("hash blocks", |id| Msg::HashReq {
            id,
            offset,
            len,
            block: block as u32,
        })?;
        let v = wire::decode_hashes(&body).map_err(|source| MigrationError::Wire { source })?;
        Ok(v.into_iter()
            .map(|(hash, f)| BlockHash {
                hash,
                changed: f & wire::flags::CHANGED != 0,
            })
            .collect())
    }

    fn check(&self) -> Result<(), MigrationError> {
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

    fn lock(&mut self, offset: u64, len: u64) -> u64 {
        self.obs.locks.lock(offset, len)
    }

    fn unlock(&mut self, token: u64) {
        self.obs.locks.unlock(token);
    }
}

/// A failed copy over the link, as the migration reports it: the sink's own
/// errors as they were, the source disk's as [`MigrationError::Read`].
impl From<CopyError<MigrationError>> for MigrationError {
    fn from(e: CopyError<MigrationError>) -> Self {
        match e {
            CopyError::Map { source, .. } | CopyError::Read { source, .. } => {
                MigrationError::Read { source }
            }
            CopyError::Write { source, .. }
            | CopyError::Zero { source, .. }
            | CopyError::Flush { source }
            | CopyError::Hashes { source, .. }
            | CopyError::Sink { source } => source,
            CopyError::HashCount { expected, got } => MigrationError::Protocol {
                reason: format!("asked for {expected} hashes, got {got}"),
            },
            CopyError::Take { source } => MigrationError::PendingBitmap { op: "take", source },
            CopyError::Cancelled => MigrationError::Cancelled,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_errors_keep_the_migration_meaning() {
        let sink_err = CopyError::Sink {
            source: MigrationError::Recv {
                source: PeerError::Disconnected,
            },
        };
        let e = MigrationError::from(sink_err);
        assert!(matches!(e, MigrationError::Recv { .. }) && e.is_retryable());
        let e = MigrationError::from(CopyError::<MigrationError>::Cancelled);
        assert!(matches!(e, MigrationError::Cancelled));
        let e = MigrationError::from(CopyError::<MigrationError>::HashCount {
            expected: 3,
            got: 2,
        });
        assert!(e.to_string().contains("asked for 3 hashes, got 2"), "{e}");
        let take = CopyError::<MigrationError>::Take {
            source: understudy_bitmap::BitmapError::TakeOutstanding,
        };
        let e = MigrationError::from(take);
        assert!(!e.to_string().contains("protocol"), "a local failure: {e}");
    }

    #[test]
    fn an_unknown_mode_says_what_to_use() {
        let e = "fast".parse::<crate::Mode>().expect_err("not a mode");
        assert!(e.to_string().contains("precopy or mirror"), "{e}");
    }
}
