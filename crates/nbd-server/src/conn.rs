//! One client connection: the handshake, then workers that share the
//! socket nbdkit-style.
//!
//! ```text
//!  worker loop:  lock reader ─► read header (+ WRITE payload) ─► validate ─► unlock
//!                     ▲             (spawn a helper if nobody else waits on the reader)
//!                     │                                   │
//!                     └──── lock writer ◄─ one write ◄── do the I/O
//! ```
//!
//! A connection starts with one worker (the connection's own thread).
//! When a worker takes a request and no other worker is waiting to read,
//! it spawns another, up to `max_workers_per_connection`, so pipelined
//! requests run in parallel while an idle connection costs one thread.
//! Helpers that stay idle for `idle_worker_timeout` while another worker
//! waits retire. Replies may leave out of order; each goes out with one
//! `write` under the writer lock so replies never interleave.
//!
//! After `NBD_OPT_STARTTLS` the reader and writer halves wrap one rustls
//! session (`tls.rs`); the worker model above is unchanged.
//!
//! `ORDER` (the `understudy:order` extension) is the one request handled
//! partly under the reader lock: the worker that read it waits until every
//! write-like request this connection received earlier has been handed to
//! the disk, then calls `Disk::order()`, and only then lets the next request
//! be read. So writes received before the ORDER belong to the closed epoch
//! even while other workers still run them, and writes received after it to
//! a later one. Write tracking is only switched on for connections that
//! negotiated the extension.

use std::io::{self, BufRead, BufReader, Read};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use understudy_block::Epoch;
use understudy_nbd_proto::wire::REQUEST_HEADER_LEN;
use understudy_nbd_proto::{
    Event, Handshake, HandshakeError, MAX_REQUEST_LEN, NbdErrno, Negotiated, Op, Request,
    RequestError, SelectedContext, TlsPolicy, TransmissionInfo, ValidRequest, validate_request,
};

use crate::dispatch::{self, ReplyBuf, Target, Worker};
use crate::export::{Catalog, Export};
use crate::server::{Shared, WORKER_STACK};
use crate::stats::{RequestOp, bump};
use crate::stream::{ReadHalf, Stream, WriteHalf};
use crate::tls::{self, NbdTls, TlsError, TlsReader, TlsWriter};

/// Read buffer per connection: several pipelined small requests (or one
/// small write with its payload) per `read` system call.
const READ_BUFFER: usize = 64 * 1024;
/// Replies with a payload at least this long send their header separately
/// (see `Stream::write_split`); below it one write is cheaper.
const SPLIT_SEND_MIN: usize = 32 * 1024;

/// Why a connection ended abnormally (for the debug log).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    /// Socket options or cloning failed.
    #[error("cannot set up the client socket")]
    Setup(#[source] io::Error),
    /// The client did not finish the handshake in time.
    #[error("handshake not finished within the handshake timeout; the client is too slow or stuck")]
    HandshakeTimeout,
    /// The client went away during the handshake.
    #[error("client closed the connection during the handshake")]
    HandshakeEof,
    /// Reading or writing failed during the handshake.
    #[error("handshake I/O failed")]
    HandshakeIo(#[source] io::Error),
    /// The client broke the handshake protocol.
    #[error("handshake refused")]
    Handshake(#[source] HandshakeError),
    /// The upgrade to TLS after `NBD_OPT_STARTTLS` failed.
    #[error("TLS upgrade failed")]
    Tls(#[source] TlsError),
}

/// A connection's two directions during the handshake; both are replaced
/// at the TLS upgrade.
struct Link {
    reader: BufReader<ReadHalf>,
    writer: WriteHalf,
}

/// Lock, ignoring poisoning: nothing panics while holding these locks, and
/// the protected socket state stays consistent regardless.
fn lock<T>(m: &std::sync::Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Serve one accepted connection until it ends.
pub(crate) fn serve(shared: &Arc<Shared>, id: u64, stream: Stream) -> Result<(), ConnError> {
    let control = stream.try_clone().map_err(ConnError::Setup)?;
    let mut link = Link {
        reader: BufReader::with_capacity(
            READ_BUFFER,
            ReadHalf::Plain(stream.try_clone().map_err(ConnError::Setup)?),
        ),
        writer: WriteHalf::Plain(stream),
    };
    let Some(neg) = handshake(shared, &control, &mut link)? else {
        tracing::debug!(conn = id, "client aborted the handshake");
        return Ok(());
    };
    tracing::debug!(
        conn = id,
        export = %neg.name,
        structured = neg.structured,
        contexts = neg.contexts.len(),
        via_go = neg.via_go,
        "entering transmission"
    );
    // Idle clients are legitimate; the read timeout only lets helper
    // workers notice they are idle. (Timeouts belong to the socket, which
    // every handle shares.)
    link.reader.get_mut().set_deadline(None);
    control
        .set_read_timeout(Some(shared.config.idle_worker_timeout))
        .and_then(|()| control.set_write_timeout(shared.config.write_timeout))
        .map_err(ConnError::Setup)?;
    // Counted down when the last worker drops the connection (Conn::drop).
    bump(&neg.export.counters.connections_active, 1);
    let conn = Arc::new(Conn {
        id,
        shared: shared.clone(),
        info: neg.transmission(),
        export: neg.export,
        structured: neg.structured,
        contexts: neg.contexts,
        reader: std::sync::Mutex::new(link.reader),
        writer: std::sync::Mutex::new(link.writer),
        control,
        closing: AtomicBool::new(false),
        inflight_writes: Mutex::new(0),
        writes_drained: Condvar::new(),
        waiting: AtomicUsize::new(1),
        workers: AtomicUsize::new(1),
        handles: Mutex::new(Vec::new()),
    });
    conn.worker_loop(true);
    conn.teardown();
    Ok(())
}

fn handshake(
    shared: &Shared,
    socket: &Stream,
    link: &mut Link,
) -> Result<Option<Negotiated<Arc<Export>>>, ConnError> {
    let timeout = shared.config.handshake_timeout;
    let deadline = Instant::now() + timeout;
    socket
        .set_write_timeout(Some(timeout))
        .map_err(ConnError::Setup)?;
    let tls = shared.config.tls.as_ref();
    let mut hs = Handshake::with_tls(tls.map_or(TlsPolicy::Off, NbdTls::policy));
    link.writer
        .write_all(&hs.greeting())
        .map_err(ConnError::HandshakeIo)?;
    let catalog = Catalog(&shared.registry);
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ConnError::HandshakeTimeout);
        }
        socket
            .set_read_timeout(Some(left))
            .map_err(ConnError::Setup)?;
        let input = match link.reader.fill_buf() {
            Ok([]) => return Err(ConnError::HandshakeEof),
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if is_timeout(&e) => return Err(ConnError::HandshakeTimeout),
            Err(e) => return Err(ConnError::HandshakeIo(e)),
        };
        let result = hs.feed(input, &catalog, &mut out);
        // Send what was produced even when the handshake failed.
        if !out.is_empty() {
            link.writer
                .write_all(&out)
                .map_err(ConnError::HandshakeIo)?;
            out.clear();
        }
        let progress = result.map_err(ConnError::Handshake)?;
        link.reader.consume(progress.consumed);
        match progress.event {
            None => {}
            Some(Event::Abort) => return Ok(None),
            Some(Event::Transmission(n)) => return Ok(Some(n)),
            Some(Event::StartTls) => {
                // The state machine only acknowledges STARTTLS with a policy.
                let Some(tls) = tls else {
                    return Err(ConnError::Tls(TlsError::NotConfigured));
                };
                upgrade(link, socket, &tls.config, deadline)?;
                hs.tls_established();
                bump(&shared.stats.tls_sessions, 1);
            }
        }
    }
}

/// Run the TLS handshake and switch both halves of `link` to it.
fn upgrade(
    link: &mut Link,
    socket: &Stream,
    config: &Arc<rustls::ServerConfig>,
    deadline: Instant,
) -> Result<(), ConnError> {
    // Bytes the client sent after STARTTLS (its ClientHello, when it did
    // not wait for the ACK); at most READ_BUFFER.
    let early = link.reader.buffer().to_vec();
    let mut wsock = socket.try_clone().map_err(ConnError::Setup)?;
    let session = tls::accept(config, &mut wsock, &early, deadline).map_err(ConnError::Tls)?;
    let rsock = socket.try_clone().map_err(ConnError::Setup)?;
    let mut reader = TlsReader::new(rsock, Arc::clone(&session));
    reader.set_deadline(Some(deadline));
    link.reader = BufReader::with_capacity(READ_BUFFER, ReadHalf::Tls(reader));
    link.writer = WriteHalf::Tls(TlsWriter::new(wsock, session));
    Ok(())
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.export
            .counters
            .connections_active
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// A write-like request in flight (see [`Conn::begin_write`]).
struct WriteGuard<'a>(&'a Conn);

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        let mut n = self.0.inflight_writes.lock();
        *n -= 1;
        if *n == 0 {
            self.0.writes_drained.notify_all();
        }
    }
}

/// Why the reading side stopped.
#[derive(Debug)]
enum End {
    Eof,
    Io(io::Error),
    Unsync(RequestError),
    PayloadTooLarge(Request),
    EofInPayload(Request),
}

enum Incoming {
    Request(Request, Result<ValidRequest, NbdErrno>),
    /// The read timed out before any byte of a header arrived.
    Idle,
    End(End),
}

/// Read exactly `buf.len()` bytes, riding out the idle read timeout.
fn read_full(r: &mut impl Read, mut buf: &mut [u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match r.read(buf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted || is_timeout(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn read_request(reader: &mut impl BufRead, w: &mut Worker, info: &TransmissionInfo) -> Incoming {
    // Wait for the first byte separately: a timeout here loses nothing.
    loop {
        match reader.fill_buf() {
            Ok([]) => return Incoming::End(End::Eof),
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return Incoming::Idle,
            Err(e) => return Incoming::End(End::Io(e)),
        }
    }
    let mut hdr = [0u8; REQUEST_HEADER_LEN];
    if let Err(e) = read_full(reader, &mut hdr) {
        return Incoming::End(End::Io(e));
    }
    let req = match Request::parse(&hdr) {
        Ok(r) => r,
        Err(e) => return Incoming::End(End::Unsync(e)),
    };
    let payload = req.payload_len();
    if payload > MAX_REQUEST_LEN {
        // Skipping up to 4 GiB to resynchronise is not worth it.
        return Incoming::End(End::PayloadTooLarge(req));
    }
    if payload > 0 {
        w.take_payload(payload as usize);
        let at = w.payload_at;
        if read_full(reader, &mut w.buf[at..at + payload as usize]).is_err() {
            return Incoming::End(End::EofInPayload(req));
        }
    }
    Incoming::Request(req, validate_request(&req, info))
}

pub(crate) struct Conn {
    id: u64,
    shared: Arc<Shared>,
    export: Arc<Export>,
    info: TransmissionInfo,
    structured: bool,
    contexts: Vec<SelectedContext>,
    // std mutexes: futex-based with a short spin and no `sched_yield`,
    // which measured cheaper than parking_lot's spinning on 2 cores.
    reader: std::sync::Mutex<BufReader<ReadHalf>>,
    writer: std::sync::Mutex<WriteHalf>,
    /// A handle used only to shut the socket down.
    control: Stream,
    /// No more requests are read once set.
    closing: AtomicBool,
    /// Write-like requests read but not yet returned from the disk (only
    /// counted when `info.order`).
    inflight_writes: Mutex<u64>,
    /// Signalled when `inflight_writes` drops to zero.
    writes_drained: Condvar,
    /// Workers waiting for (or holding) the reader without a request.
    waiting: AtomicUsize,
    /// Live workers, including the connection thread.
    workers: AtomicUsize,
    handles: Mutex<Vec<JoinHandle<()>>>,
}

impl Conn {
    fn target(&self) -> Target<'_> {
        Target {
            disk: &*self.export.disk,
            dirty: self.export.dirty.as_deref(),
            ordering: self.export.ordering.as_deref(),
            contexts: &self.contexts,
            structured: self.structured,
            stats: &self.shared.stats,
            export: &self.export.counters,
        }
    }

    /// Stop reading; optionally cut the socket so blocked readers and
    /// writers return.
    fn close(&self, how: Option<Shutdown>) {
        self.closing.store(true, Ordering::Release);
        if let Some(how) = how {
            self.control.shutdown(how);
        }
    }

    /// Leave the pool if someone else is waiting to read. The connection
    /// thread never retires.
    fn try_retire(&self) -> bool {
        self.waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n > 1).then(|| n - 1)
            })
            .is_ok()
    }

    fn worker_loop(self: &Arc<Self>, primary: bool) {
        let mut w = Worker::default();
        loop {
            // Idle helpers retire when their read times out (below), one
            // turn at the reader per `idle_worker_timeout`.
            let mut reader = lock(&self.reader);
            if self.closing.load(Ordering::Acquire) {
                drop(reader);
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                return;
            }
            let (req, valid) = match read_request(&mut *reader, &mut w, &self.info) {
                Incoming::Request(r, v) => (r, v),
                Incoming::Idle => {
                    drop(reader);
                    if !primary && self.try_retire() {
                        return;
                    }
                    if primary && self.waiting.load(Ordering::Acquire) > 1 {
                        // The mutex is not fair: step aside so a parked idle
                        // helper gets the reader, times out and retires.
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    continue;
                }
                Incoming::End(end) => {
                    self.close(None);
                    drop(reader);
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                    self.on_end(&mut w, end);
                    return;
                }
            };
            if matches!(valid, Ok(ValidRequest { op: Op::Disc, .. })) {
                // Soft disconnect: read nothing more; in-flight requests
                // finish before the connection thread closes the socket.
                bump(&self.shared.stats.disconnects, 1);
                tracing::debug!(conn = self.id, "client sent NBD_CMD_DISC");
                self.close(None);
                drop(reader);
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                return;
            }
            // Still under the reader lock: the barrier and the write count
            // follow request-receive order.
            let mut barrier = None;
            let mut tracked = None;
            match &valid {
                Ok(ValidRequest {
                    op: Op::Order { .. },
                    ..
                }) => barrier = Some(self.order_barrier()),
                // With the extension, FLUSH is a barrier in receive order
                // too: closing the epoch later, from a worker, could split
                // the requests received after it.
                Ok(ValidRequest { op: Op::Flush, .. }) if self.info.order => {
                    barrier = Some(self.order_barrier())
                }
                Ok(ValidRequest {
                    op: Op::Write { .. } | Op::WriteZeroes { .. } | Op::Trim { .. },
                    ..
                }) if self.info.order => tracked = Some(self.begin_write()),
                _ => {}
            }
            drop(reader);
            // Latency runs from the request being read (payload included)
            // to its reply being sent.
            let started = Instant::now();
            w.failed = false;
            if self.waiting.fetch_sub(1, Ordering::AcqRel) == 1 {
                self.maybe_spawn();
            }
            let t = self.target();
            let reply = match valid {
                Ok(ValidRequest {
                    cookie,
                    op: Op::Order { fua },
                }) => {
                    let barrier = match barrier {
                        Some(b) => b,
                        None => t.disk.order(),
                    };
                    dispatch::order(&t, &mut w, cookie, fua, barrier)
                }
                Ok(ValidRequest {
                    cookie,
                    op: Op::Flush,
                }) if barrier.is_some() => {
                    let barrier = barrier.unwrap_or_else(|| t.disk.order());
                    dispatch::flush_barrier(&t, &mut w, cookie, barrier)
                }
                Ok(v) => {
                    let r = dispatch::execute(&t, &mut w, v);
                    // The disk has assigned the write its epoch.
                    drop(tracked);
                    r
                }
                Err(errno) => {
                    tracing::trace!(conn = self.id, ?req, %errno, "request refused");
                    dispatch::reject(&t, &mut w, req.cookie, req.command, errno)
                }
            };
            self.send(&w, reply);
            if let Some(op) = RequestOp::from_command(req.command) {
                let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                self.export.counters.record(op, nanos, w.failed);
            }
            w.trim();
            self.waiting.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Count a write-like request as in flight until the guard drops.
    fn begin_write(&self) -> WriteGuard<'_> {
        *self.inflight_writes.lock() += 1;
        WriteGuard(self)
    }

    /// The ORDER barrier, called under the reader lock: wait until every
    /// earlier write-like request of this connection has returned from the
    /// disk, then close the epoch. The wait stalls reading for at most the
    /// duration of those writes (a FUA write among them: one journal sync).
    fn order_barrier(&self) -> understudy_block::Result<Epoch> {
        let mut n = self.inflight_writes.lock();
        while *n > 0 {
            self.writes_drained.wait(&mut n);
        }
        drop(n);
        self.export.disk.order()
    }

    fn send(&self, w: &Worker, reply: ReplyBuf) {
        let mut s = lock(&self.writer);
        let r = match reply {
            ReplyBuf::Out if w.out.is_empty() => return,
            ReplyBuf::Out => s.write_all(&w.out),
            ReplyBuf::Buf {
                start,
                payload,
                end,
            } if end - payload >= SPLIT_SEND_MIN => {
                s.write_reply(&w.buf[start..end], payload - start)
            }
            // Small replies: one write, one segment.
            ReplyBuf::Buf { start, end, .. } => s.write_all(&w.buf[start..end]),
        };
        if let Err(e) = r {
            drop(s);
            tracing::debug!(conn = self.id, "sending a reply failed, closing: {e}");
            self.close(Some(Shutdown::Both));
        }
    }

    fn on_end(&self, w: &mut Worker, end: End) {
        match end {
            End::Eof => tracing::debug!(conn = self.id, "client closed the connection"),
            End::Io(e) => tracing::debug!(conn = self.id, "reading from the client failed: {e}"),
            End::Unsync(e) => tracing::debug!(conn = self.id, "closing: {e}"),
            End::EofInPayload(r) => tracing::debug!(
                conn = self.id,
                cookie = r.cookie,
                "client vanished in the middle of a write payload; nothing was written"
            ),
            End::PayloadTooLarge(r) => {
                tracing::debug!(
                    conn = self.id,
                    len = r.length,
                    "write payload above {MAX_REQUEST_LEN} bytes cannot be skipped; closing"
                );
                bump(&self.shared.stats.invalid_requests, 1);
                let t = self.target();
                let reply = dispatch::reject(&t, w, r.cookie, r.command, NbdErrno::Overflow);
                self.send(w, reply);
                self.control.shutdown(Shutdown::Both);
            }
        }
    }

    fn maybe_spawn(self: &Arc<Self>) {
        let mut handles = self.handles.lock();
        if self.closing.load(Ordering::Acquire)
            || self.workers.load(Ordering::Acquire) >= self.shared.config.max_workers_per_connection
        {
            return;
        }
        // Finished helpers have exited; dropping their handles is enough.
        handles.retain(|h| !h.is_finished());
        self.workers.fetch_add(1, Ordering::AcqRel);
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let conn = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn{}", self.id))
            .stack_size(WORKER_STACK)
            .spawn(move || {
                bump(&conn.shared.stats.worker_threads, 1);
                conn.worker_loop(false);
                conn.workers.fetch_sub(1, Ordering::AcqRel);
                conn.shared
                    .stats
                    .worker_threads
                    .fetch_sub(1, Ordering::Relaxed);
            });
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                self.workers.fetch_sub(1, Ordering::AcqRel);
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                tracing::debug!(
                    conn = self.id,
                    "cannot spawn a worker, continuing with fewer: {e}"
                );
            }
        }
    }

    /// Wait for every helper (and so every in-flight request) to finish,
    /// then close the socket.
    fn teardown(&self) {
        // Helpers blocked in a read (holding the reader) must be woken.
        self.control.shutdown(Shutdown::Read);
        loop {
            let hs: Vec<JoinHandle<()>> = std::mem::take(&mut *self.handles.lock());
            if hs.is_empty() {
                break;
            }
            for h in hs {
                let _ = h.join();
            }
        }
        // A client that stopped reading must not hold the thread here.
        let _ = self.control.set_write_timeout(Some(Duration::from_secs(1)));
        lock(&self.writer).close_notify();
        self.control.shutdown(Shutdown::Both);
        tracing::debug!(conn = self.id, "connection closed");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use understudy_block::{
        Disk, DiskInfo, DiskMap, DiskRead, DiskSize, DiskWrite, Extent, ExtentKind, Format,
        WriteOpts, ZeroOpts,
    };
    use understudy_nbd_proto::wire::{CMD_WRITE, FLAG_HAS_FLAGS};

    use super::*;
    use crate::stats::{Counters, ExportCounters};

    const SIZE: u64 = 4 << 20;

    /// A disk that records where each write's buffer starts in memory.
    #[derive(Debug, Default)]
    struct AlignProbe {
        /// (address % 4096, length, first byte) per write.
        writes: StdMutex<Vec<(usize, usize, u8)>>,
    }

    impl DiskSize for AlignProbe {
        fn size(&self) -> u64 {
            SIZE
        }
    }
    impl DiskRead for AlignProbe {
        fn read_at(&self, buf: &mut [u8], _offset: u64) -> understudy_block::Result<()> {
            buf.fill(0);
            Ok(())
        }
    }
    impl DiskWrite for AlignProbe {
        fn write_at(
            &self,
            buf: &[u8],
            _offset: u64,
            _o: WriteOpts,
        ) -> understudy_block::Result<()> {
            let addr = buf.as_ptr() as usize % 4096;
            self.writes.lock().unwrap().push((addr, buf.len(), buf[0]));
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64, _: ZeroOpts) -> understudy_block::Result<()> {
            Ok(())
        }
        fn discard(&self, _: u64, _: u64, _: WriteOpts) -> understudy_block::Result<()> {
            Ok(())
        }
        fn flush(&self) -> understudy_block::Result<()> {
            Ok(())
        }
    }
    impl DiskMap for AlignProbe {
        fn map(&self, offset: u64, len: u64) -> understudy_block::Result<Vec<Extent>> {
            Ok(vec![Extent {
                offset,
                len,
                kind: ExtentKind::Data,
            }])
        }
    }
    impl Disk for AlignProbe {
        fn info(&self) -> DiskInfo {
            DiskInfo {
                format: Format::Raw,
                size: SIZE,
                read_only: false,
                can_discard: false,
                can_fast_zero: false,
                flush_covers_all_handles: true,
                preferred_block_size: 4096,
            }
        }
    }

    /// Receive one WRITE of `len` bytes of `fill` through `read_request`
    /// and run it, as a worker does.
    fn receive_write(disk: &AlignProbe, w: &mut Worker, len: u32, fill: u8) {
        let req = Request {
            flags: 0,
            command: CMD_WRITE,
            cookie: 7,
            offset: 0,
            length: len,
        };
        let mut wire = req.encode().to_vec();
        wire.resize(wire.len() + len as usize, fill);
        let info = TransmissionInfo {
            size: SIZE,
            flags: FLAG_HAS_FLAGS,
            structured: false,
            has_meta_contexts: false,
            order: false,
        };
        let Incoming::Request(_, Ok(valid)) = read_request(&mut &wire[..], w, &info) else {
            panic!("a well-formed WRITE of {len} bytes was not accepted");
        };
        let stats = Counters::default();
        let export = ExportCounters::default();
        let t = Target {
            disk,
            dirty: None,
            ordering: None,
            contexts: &[],
            structured: false,
            stats: &stats,
            export: &export,
        };
        assert_eq!(dispatch::execute(&t, w, valid), ReplyBuf::Out);
    }

    #[test]
    fn large_write_payloads_reach_the_disk_page_aligned() {
        let disk = AlignProbe::default();
        let mut w = Worker::default();
        // Odd sizes first, so the buffer was grown and reused unaligned.
        receive_write(&disk, &mut w, 1000, 1);
        receive_write(&disk, &mut w, 1 << 20, 2);
        receive_write(&disk, &mut w, 3, 3);
        receive_write(&disk, &mut w, (2 << 20) + 512, 4);
        let writes = disk.writes.lock().unwrap();
        assert_eq!(writes.len(), 4);
        for (i, &(addr, len, first)) in writes.iter().enumerate() {
            assert_eq!(first, i as u8 + 1, "write {i} carried the wrong payload");
            assert_eq!(
                addr, 0,
                "payload of write {i} ({len} bytes) is not page aligned"
            );
        }
    }
}
