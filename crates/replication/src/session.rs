//! The primary's side of one connection: numbered sends, the receiver
//! thread that collects the backup's acks, and the copy engine's sink over
//! it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use understudy_copy::{BlockHash, CopySink};
use understudy_layers::RangeLock;
use understudy_peer::{LinkReceiver, LinkSender, PeerError};

use crate::error::ReplicationError;
use crate::wire::{self, Msg, MsgType};

/// What the receiver thread learnt.
#[derive(Debug, Default)]
struct Acks {
    /// Everything up to here is applied on the backup.
    acked: u64,
    /// Why the session ended, once it did.
    failed: Option<String>,
    /// Answers to hash requests, by sequence number.
    hashes: HashMap<u64, Vec<u64>>,
    /// Sent messages that carry bytes the lag counts: (seq, bytes).
    inflight: VecDeque<(u64, u64)>,
    /// Ranges sent and not yet safe on the backup: (seq, offset, len).
    unsafe_ranges: VecDeque<(u64, u64, u64)>,
    /// Epoch mode: sequence numbers of the epoch closes and flushes sent;
    /// only their acks make earlier ranges safe (the backup drops an open
    /// epoch when the link goes).
    points: VecDeque<u64>,
}

/// One connected session of a primary (see the module docs).
#[derive(Debug)]
pub(crate) struct Session {
    tx: LinkSender,
    /// The next sequence number; held while a message is numbered and
    /// sent, so the wire order is the sequence order.
    next: Mutex<u64>,
    acks: Mutex<Acks>,
    cv: Condvar,
    dead: AtomicBool,
    /// Bytes accepted for the backup and not yet acknowledged by it.
    pub(crate) lag: Arc<AtomicU64>,
    ack_timeout: Duration,
    receiver: Mutex<Option<JoinHandle<()>>>,
    /// Ranges become safe only at acked flush points (epoch mode).
    by_points: bool,
}

impl Session {
    /// Start the receiver thread over `rx`; the first message sent gets
    /// sequence number 1.
    pub(crate) fn start(
        tx: LinkSender,
        rx: LinkReceiver,
        lag: Arc<AtomicU64>,
        ack_timeout: Duration,
        by_points: bool,
    ) -> Result<Arc<Session>, ReplicationError> {
        let s = Arc::new(Session {
            tx,
            next: Mutex::new(1),
            acks: Mutex::new(Acks::default()),
            cv: Condvar::new(),
            dead: AtomicBool::new(false),
            lag,
            ack_timeout,
            receiver: Mutex::new(None),
            by_points,
        });
        let weak = Arc::downgrade(&s);
        let h = std::thread::Builder::new()
            .name("replica-acks".into())
            .spawn(move || receive_loop(rx, weak))
            .map_err(|source| ReplicationError::Thread {
                name: "replica-acks",
                source,
            })?;
        *s.receiver.lock() = Some(h);
        Ok(s)
    }

    /// Whether the session ended.
    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    /// Why it ended, if it did.
    pub(crate) fn why_dead(&self) -> Option<String> {
        self.acks.lock().failed.clone()
    }

    /// End the session (idempotent): wake every waiter and close the link.
    pub(crate) fn fail(&self, why: &str) {
        {
            let mut a = self.acks.lock();
            if a.failed.is_none() {
                tracing::warn!(reason = why, "replication session ended");
                a.failed = Some(why.to_owned());
            }
        }
        self.dead.store(true, Ordering::SeqCst);
        self.cv.notify_all();
        let _ = self.tx.close(why);
    }

    fn dead_err(&self) -> ReplicationError {
        ReplicationError::Recv {
            source: PeerError::Protocol {
                reason: self.why_dead().unwrap_or_else(|| "session ended".into()),
            },
        }
    }

    /// Number and send one message; `lag_bytes` are counted as lag until
    /// it is acknowledged. Returns its sequence number.
    pub(crate) fn send<'a>(
        &self,
        lag_bytes: u64,
        build: impl FnOnce(u64) -> Msg<'a>,
    ) -> Result<u64, ReplicationError> {
        if self.is_dead() {
            return Err(self.dead_err());
        }
        let mut next = self.next.lock();
        let seq = *next;
        let m = build(seq);
        let (t, head, tail) = m
            .encode()
            .map_err(|source| ReplicationError::Wire { source })?;
        {
            let mut a = self.acks.lock();
            if lag_bytes > 0 {
                a.inflight.push_back((seq, lag_bytes));
            }
            match m {
                Msg::Write { offset, data, .. } => {
                    a.unsafe_ranges.push_back((seq, offset, data.len() as u64));
                }
                Msg::Zero { offset, len, .. } => a.unsafe_ranges.push_back((seq, offset, len)),
                // Only an epoch close applies the backup's open epoch.
                Msg::EpochClose { .. } => a.points.push_back(seq),
                _ => {}
            }
        }
        if let Err(source) = self.tx.send_parts(t, &[&head, tail]) {
            drop(next);
            self.fail(&format!("send failed: {source}"));
            return Err(ReplicationError::Send { source });
        }
        *next += 1;
        Ok(seq)
    }

    /// Ranges sent that the backup may not hold (not acknowledged, or in
    /// epoch mode not followed by an acknowledged epoch close).
    pub(crate) fn unsafe_ranges(&self) -> Vec<(u64, u64)> {
        self.acks
            .lock()
            .unsafe_ranges
            .iter()
            .map(|&(_, o, l)| (o, l))
            .collect()
    }

    /// The last sequence number acknowledged.
    pub(crate) fn acked(&self) -> u64 {
        self.acks.lock().acked
    }

    /// Wait until `seq` is acknowledged (ack timeout: the session ends).
    pub(crate) fn wait(&self, seq: u64) -> Result<(), ReplicationError> {
        let deadline = Instant::now() + self.ack_timeout;
        let mut a = self.acks.lock();
        while a.acked < seq {
            if a.failed.is_some() {
                drop(a);
                return Err(self.dead_err());
            }
            if self.cv.wait_until(&mut a, deadline).timed_out() && a.acked < seq {
                drop(a);
                let ms = self.ack_timeout.as_millis() as u64;
                self.fail(&format!("no ack within {ms} ms"));
                return Err(ReplicationError::Timeout { ms });
            }
        }
        Ok(())
    }

    /// Send and wait for the ack.
    pub(crate) fn request<'a>(
        &self,
        build: impl FnOnce(u64) -> Msg<'a>,
    ) -> Result<u64, ReplicationError> {
        let seq = self.send(0, build)?;
        self.wait(seq)?;
        Ok(seq)
    }

    /// Ask for the hashes of `[offset, offset + len)` in `block`s.
    pub(crate) fn hashes(
        &self,
        offset: u64,
        len: u64,
        block: u32,
    ) -> Result<Vec<u64>, ReplicationError> {
        let seq = self.request(|seq| Msg::HashReq {
            seq,
            offset,
            len,
            block,
        })?;
        self.acks
            .lock()
            .hashes
            .remove(&seq)
            .ok_or_else(|| ReplicationError::Protocol {
                reason: format!("request {seq} was acknowledged without its hashes"),
            })
    }

    /// Stop: close the link and join the receiver.
    pub(crate) fn shutdown(&self, why: &str) {
        self.fail(why);
        if let Some(h) = self.receiver.lock().take()
            && h.join().is_err()
        {
            tracing::error!("replication ack thread panicked");
        }
    }

    fn on_message(&self, t: u16, payload: &[u8]) -> Result<(), String> {
        let m = Msg::decode(t, payload).map_err(|e| format!("bad message from the backup: {e}"))?;
        let mut a = self.acks.lock();
        match m {
            Msg::Ack { seq, code, text } => {
                if code != wire::code::OK {
                    return Err(format!(
                        "the backup failed request {seq} (code {code}): {text}"
                    ));
                }
                if seq > a.acked {
                    a.acked = seq;
                }
                let mut freed = 0;
                while a.inflight.front().is_some_and(|&(s, _)| s <= seq) {
                    freed += a.inflight.pop_front().map_or(0, |(_, b)| b);
                }
                let mut safe = if self.by_points { 0 } else { seq };
                while a.points.front().is_some_and(|&p| p <= seq) {
                    safe = safe.max(a.points.pop_front().unwrap_or(0));
                }
                while a.unsafe_ranges.front().is_some_and(|&(s, _, _)| s <= safe) {
                    a.unsafe_ranges.pop_front();
                }
                if freed > 0 {
                    self.lag.fetch_sub(freed, Ordering::SeqCst);
                }
            }
            Msg::Hashes { seq, hashes } => {
                a.hashes.insert(seq, hashes);
            }
            other => {
                return Err(format!("unexpected {:?} from the backup", other.msg_type()));
            }
        }
        drop(a);
        self.cv.notify_all();
        Ok(())
    }
}

fn receive_loop(mut rx: LinkReceiver, session: std::sync::Weak<Session>) {
    let mut buf = Vec::new();
    loop {
        let r = rx.recv_into(&mut buf);
        let Some(s) = session.upgrade() else {
            return;
        };
        let outcome = match r {
            Ok(t) if t == MsgType::Invalid as u16 => Err("invalid message type".to_string()),
            Ok(t) => s.on_message(t, &buf),
            Err(PeerError::Remote { code, message }) => {
                Err(format!("the backup refused (code {code}): {message}"))
            }
            Err(e) => Err(format!("link lost: {e}")),
        };
        if let Err(why) = outcome {
            s.fail(&why);
            return;
        }
    }
}

/// The copy engine's sink on the primary: `Write`/`Zero` messages over the
/// session (under the observer's range locks, so a guest write of the same
/// range is ordered against them), flushes and hash requests that wait for
/// the backup. With `checksum`, each extent's block hashes are compared
/// with the backup's first and only differing blocks travel.
#[derive(Debug)]
pub(crate) struct SessionSink {
    pub(crate) session: Arc<Session>,
    pub(crate) locks: Arc<RangeLock>,
    pub(crate) checksum: Option<u32>,
    /// Data bytes actually sent.
    pub(crate) sent: Arc<AtomicU64>,
}

impl SessionSink {
    fn send_data(&self, offset: u64, data: &[u8]) -> Result<(), ReplicationError> {
        for (i, chunk) in data.chunks(wire::MAX_DATA).enumerate() {
            let off = offset + (i * wire::MAX_DATA) as u64;
            self.session.send(0, |seq| Msg::Write {
                seq,
                offset: off,
                flags: 0,
                hash: wire::extent_hash(chunk),
                data: chunk,
            })?;
            self.sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl CopySink for SessionSink {
    type Error = ReplicationError;

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ReplicationError> {
        let Some(block) = self.checksum else {
            return self.send_data(offset, data);
        };
        let theirs = self.session.hashes(offset, data.len() as u64, block)?;
        for (i, piece) in data.chunks(block as usize).enumerate() {
            if theirs.get(i) != Some(&wire::extent_hash(piece)) {
                self.send_data(offset + i as u64 * u64::from(block), piece)?;
            }
        }
        Ok(())
    }

    fn zero(&mut self, offset: u64, len: u64) -> Result<(), ReplicationError> {
        self.session
            .send(0, |seq| Msg::Zero {
                seq,
                offset,
                len,
                flags: wire::flags::MAY_UNMAP,
            })
            .map(drop)
    }

    fn flush(&mut self) -> Result<(), ReplicationError> {
        self.session.request(|seq| Msg::Flush { seq }).map(drop)
    }

    fn hashes(
        &mut self,
        offset: u64,
        len: u64,
        block: u64,
    ) -> Result<Vec<BlockHash>, ReplicationError> {
        let block = u32::try_from(block).map_err(|_| ReplicationError::Protocol {
            reason: format!("hash block {block} too large"),
        })?;
        Ok(self
            .session
            .hashes(offset, len, block)?
            .into_iter()
            .map(|hash| BlockHash {
                hash,
                changed: false,
            })
            .collect())
    }

    fn check(&self) -> Result<(), ReplicationError> {
        if self.session.is_dead() {
            return Err(self.session.dead_err());
        }
        Ok(())
    }

    fn lock(&mut self, offset: u64, len: u64) -> u64 {
        self.locks.lock(offset, len)
    }

    fn unlock(&mut self, token: u64) {
        self.locks.unlock(token);
    }
}
