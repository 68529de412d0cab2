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

/// The request kinds counted per export (`NBD_CMD_DISC` is not a request
/// that gets an answer and is not counted).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RequestOp {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`.
    Write,
    /// `NBD_CMD_WRITE_ZEROES`.
    Zero,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_BLOCK_STATUS`.
    BlockStatus,
    /// `NBD_CMD_ORDER` (the `understudy:order` extension).
    Order,
    /// `NBD_CMD_CACHE`.
    Cache,
}

impl RequestOp {
    /// Every kind, in the order of [`ExportStatsSnapshot::ops`].
    pub const ALL: [RequestOp; 8] = [
        RequestOp::Read,
        RequestOp::Write,
        RequestOp::Zero,
        RequestOp::Trim,
        RequestOp::Flush,
        RequestOp::BlockStatus,
        RequestOp::Order,
        RequestOp::Cache,
    ];

    /// A short lowercase name (`read`, `write`, `zero`, `trim`, `flush`,
    /// `block_status`, `order`, `cache`), used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestOp::Read => "read",
            RequestOp::Write => "write",
            RequestOp::Zero => "zero",
            RequestOp::Trim => "trim",
            RequestOp::Flush => "flush",
            RequestOp::BlockStatus => "block_status",
            RequestOp::Order => "order",
            RequestOp::Cache => "cache",
        }
    }

    /// The kind of a wire command; `None` for `DISC` and unknown commands.
    pub(crate) fn from_command(command: u16) -> Option<Self> {
        use understudy_nbd_proto::wire::*;
        Some(match command {
            CMD_READ => RequestOp::Read,
            CMD_WRITE => RequestOp::Write,
            CMD_WRITE_ZEROES => RequestOp::Zero,
            CMD_TRIM => RequestOp::Trim,
            CMD_FLUSH => RequestOp::Flush,
            CMD_BLOCK_STATUS => RequestOp::BlockStatus,
            CMD_ORDER => RequestOp::Order,
            CMD_CACHE => RequestOp::Cache,
            _ => return None,
        })
    }
}

/// Upper bounds (nanoseconds) of the request latency buckets: 1, 2.5, 5
/// per decade from 10 µs to 10 s, which covers a page-cache hit through a
/// stalled journal sync. A last, unbounded bucket follows.
pub const LATENCY_BUCKETS_NS: [u64; 19] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

const BUCKETS: usize = LATENCY_BUCKETS_NS.len() + 1;

/// One request kind's counters. The request count is the sum of the
/// buckets, so a histogram's count always equals the request count, even
/// in a snapshot taken while requests complete.
#[derive(Debug, Default)]
struct OpCounters {
    buckets: [AtomicU64; BUCKETS],
    sum_ns: AtomicU64,
    errors: AtomicU64,
}

/// Per-export request counters, updated with relaxed atomics on the data
/// path (no lock, no allocation).
#[derive(Debug, Default)]
pub(crate) struct ExportCounters {
    ops: [OpCounters; RequestOp::ALL.len()],
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub connections_active: AtomicU64,
}

impl ExportCounters {
    /// Count one answered request of kind `op` that took `nanos` from
    /// being read to its reply being sent.
    pub(crate) fn record(&self, op: RequestOp, nanos: u64, failed: bool) {
        let c = &self.ops[op as usize];
        let bucket = LATENCY_BUCKETS_NS.partition_point(|&b| b < nanos);
        c.buckets[bucket].fetch_add(1, Relaxed);
        c.sum_ns.fetch_add(nanos, Relaxed);
        if failed {
            c.errors.fetch_add(1, Relaxed);
        }
    }

    pub(crate) fn snapshot(&self) -> ExportStats {
        let ops = RequestOp::ALL.map(|op| {
            let c = &self.ops[op as usize];
            let buckets = std::array::from_fn(|i| c.buckets[i].load(Relaxed));
            OpStats {
                op,
                requests: buckets.iter().sum(),
                errors: c.errors.load(Relaxed),
                latency_sum_ns: c.sum_ns.load(Relaxed),
                latency_buckets: buckets,
            }
        });
        ExportStats {
            ops,
            bytes_read: self.bytes_read.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
            connections_active: self.connections_active.load(Relaxed),
        }
    }
}

/// One request kind's counts on one export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpStats {
    /// The kind.
    pub op: RequestOp,
    /// Requests answered (including refused and failed ones).
    pub requests: u64,
    /// Requests answered with an error (refused by validation or failed
    /// I/O).
    pub errors: u64,
    /// Total time from request read to reply sent, nanoseconds.
    pub latency_sum_ns: u64,
    /// Requests per latency bucket (not cumulative): bucket `i` counts
    /// latencies up to `LATENCY_BUCKETS_NS[i]` and above the previous
    /// bound; the last counts those above every bound.
    pub latency_buckets: [u64; BUCKETS],
}

/// A snapshot of one export's counters since it was added to the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportStats {
    /// Per request kind, in [`RequestOp::ALL`] order.
    pub ops: [OpStats; RequestOp::ALL.len()],
    /// Bytes returned by successful reads.
    pub bytes_read: u64,
    /// Bytes stored by successful writes.
    pub bytes_written: u64,
    /// Connections in transmission on this export right now.
    pub connections_active: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_land_in_their_buckets_and_count_as_requests() {
        let c = ExportCounters::default();
        c.record(RequestOp::Read, 1, false); // below the first bound
        c.record(RequestOp::Read, 10_000, false); // on a bound: that bucket
        c.record(RequestOp::Read, 10_001, true);
        c.record(RequestOp::Flush, 20_000_000_000, false); // above every bound
        let s = c.snapshot();
        let read = s.ops[RequestOp::Read as usize];
        assert_eq!(read.op, RequestOp::Read);
        assert_eq!((read.requests, read.errors), (3, 1));
        assert_eq!(read.latency_sum_ns, 20_002);
        assert_eq!(&read.latency_buckets[..3], &[2, 1, 0]);
        let flush = s.ops[RequestOp::Flush as usize];
        assert_eq!(flush.requests, 1);
        assert_eq!(flush.latency_buckets[BUCKETS - 1], 1);
        assert_eq!(s.ops[RequestOp::Write as usize].requests, 0);
        for (i, op) in RequestOp::ALL.into_iter().enumerate() {
            assert_eq!(op as usize, i, "ALL is in discriminant order");
            assert_eq!(RequestOp::from_command(cmd_of(op)), Some(op));
        }
    }

    fn cmd_of(op: RequestOp) -> u16 {
        use understudy_nbd_proto::wire::*;
        match op {
            RequestOp::Read => CMD_READ,
            RequestOp::Write => CMD_WRITE,
            RequestOp::Zero => CMD_WRITE_ZEROES,
            RequestOp::Trim => CMD_TRIM,
            RequestOp::Flush => CMD_FLUSH,
            RequestOp::BlockStatus => CMD_BLOCK_STATUS,
            RequestOp::Order => CMD_ORDER,
            RequestOp::Cache => CMD_CACHE,
        }
    }

    /// The data-path cost of the per-export instrumentation: two clock
    /// reads and the bucket update. Run with
    /// `cargo test -p understudy-nbd-server --lib -- --ignored --nocapture record_cost`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn record_cost() {
        let c = ExportCounters::default();
        let n = 10_000_000u32;
        let per = |t: std::time::Instant| t.elapsed().as_nanos() as f64 / f64::from(n);
        let t = std::time::Instant::now();
        for i in 0..n {
            let nanos = u64::from(std::hint::black_box(i) % 50_000);
            c.record(RequestOp::ALL[(i % 8) as usize], nanos, i % 1000 == 0);
        }
        let record = per(t);
        let t = std::time::Instant::now();
        for _ in 0..n {
            let started = std::time::Instant::now();
            std::hint::black_box(started.elapsed());
        }
        let clock = per(t);
        eprintln!("record: {record:.1} ns, clock reads: {clock:.1} ns per request");
        assert_eq!(
            c.snapshot().ops.iter().map(|o| o.requests).sum::<u64>(),
            u64::from(n)
        );
    }
}
