//! Server-wide counters.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A snapshot of the server's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections accepted since start.
    pub connections_accepted: u64,
    /// Connections currently open.
    pub connections_active: u64,
    /// Connections refused because `max_connections` was reached.
    pub connections_rejected: u64,
    /// Handshakes that ended in an error or timeout.
    pub handshakes_failed: u64,
    /// Connections upgraded to TLS (TLS handshake completed).
    pub tls_sessions: u64,
    /// Server threads serving connections right now (one per connection
    /// plus helper workers; accept loops excluded).
    pub worker_threads: u64,
    /// `READ` requests.
    pub reads: u64,
    /// `WRITE` requests.
    pub writes: u64,
    /// `FLUSH` requests.
    pub flushes: u64,
    /// `ORDER` requests (the `understudy:order` extension).
    pub orders: u64,
    /// `TRIM` requests.
    pub trims: u64,
    /// `WRITE_ZEROES` requests.
    pub write_zeroes: u64,
    /// `BLOCK_STATUS` requests.
    pub block_status: u64,
    /// `CACHE` requests.
    pub caches: u64,
    /// `DISC` requests.
    pub disconnects: u64,
    /// Requests refused by validation (bad flags, bounds, unknown command).
    pub invalid_requests: u64,
    /// Valid requests whose I/O failed.
    pub request_errors: u64,
    /// Bytes returned by successful reads.
    pub bytes_read: u64,
    /// Bytes stored by successful writes.
    pub bytes_written: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub connections_accepted: AtomicU64,
    pub connections_active: AtomicU64,
    pub connections_rejected: AtomicU64,
    pub handshakes_failed: AtomicU64,
    pub tls_sessions: AtomicU64,
    pub worker_threads: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub orders: AtomicU64,
    pub trims: AtomicU64,
    pub write_zeroes: AtomicU64,
    pub block_status: AtomicU64,
    pub caches: AtomicU64,
    pub disconnects: AtomicU64,
    pub invalid_requests: AtomicU64,
    pub request_errors: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
}

pub(crate) fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Relaxed);
}

impl Counters {
    pub(crate) fn snapshot(&self) -> Stats {
        Stats {
            connections_accepted: self.connections_accepted.load(Relaxed),
            connections_active: self.connections_active.load(Relaxed),
            connections_rejected: self.connections_rejected.load(Relaxed),
            handshakes_failed: self.handshakes_failed.load(Relaxed),
            tls_sessions: self.tls_sessions.load(Relaxed),
            worker_threads: self.worker_threads.load(Relaxed),
            reads: self.reads.load(Relaxed),
            writes: self.writes.load(Relaxed),
            flushes: self.flushes.load(Relaxed),
            orders: self.orders.load(Relaxed),
            trims: self.trims.load(Relaxed),
            write_zeroes: self.write_zeroes.load(Relaxed),
            block_status: self.block_status.load(Relaxed),
            caches: self.caches.load(Relaxed),
            disconnects: self.disconnects.load(Relaxed),
            invalid_requests: self.invalid_requests.load(Relaxed),
            request_errors: self.request_errors.load(Relaxed),
            bytes_read: self.bytes_read.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
        }
    }
}
