//! Executing validated requests against the disk and encoding the reply
//! into per-worker buffers (no allocation on the hot path once the buffers
//! have grown to the working size).

use understudy_block::{BlockError, Disk, Epoch, ErrorKind, ExtentKind, WriteOpts, ZeroOpts};
use understudy_nbd_proto::reply::{
    BlockStatusBuilder, error_chunk, none_chunk, offset_data_header, offset_hole_chunk,
    simple_reply,
};
use understudy_nbd_proto::wire::*;
use understudy_nbd_proto::{MetaContext, NbdErrno, Op, SelectedContext, ValidRequest};

use crate::export::{DirtyMapSource, OrderSupport};
use crate::stats::{Counters, ExportCounters, bump};

/// Structured reads at least this long ask the disk for holes first, so
/// sparse regions go out as `OFFSET_HOLE` chunks instead of zero bytes.
pub(crate) const HOLE_SCAN_MIN_READ: u32 = 64 * 1024;
/// Zero extents shorter than this are sent as data (a chunk header per
/// tiny hole would cost more than it saves).
const MIN_HOLE_CHUNK: u64 = 4096;
/// At most this many hole chunks per read; the rest is sent as data.
const MAX_HOLE_CHUNKS: usize = 64;
/// Read payloads start at this alignment in the worker buffer (the reply
/// header sits just before). Misaligned 1 MiB reads cost ~25% of
/// throughput: both kernel copies (page cache -> buffer, buffer -> socket)
/// slow down when the user address is not page aligned.
const PAYLOAD_ALIGN: usize = 4096;
/// Worker buffers larger than this are released after the request.
const RETAIN_BUFFER: usize = 4 * 1024 * 1024 + 2 * PAYLOAD_ALIGN;

#[derive(Clone, Copy, Debug)]
enum Seg {
    Data { offset: u64, len: u32 },
    Hole { offset: u64, len: u32 },
}

/// Buffers owned by one worker thread and reused for every request.
#[derive(Debug, Default)]
pub(crate) struct Worker {
    /// WRITE payloads, and READ replies (header + data in one buffer).
    pub buf: Vec<u8>,
    /// Where the current WRITE payload starts in `buf` (page aligned).
    pub payload_at: usize,
    /// Small replies, error chunks and block status chunks.
    pub out: Vec<u8>,
    plan: Vec<Seg>,
    /// The current request was answered with an error (for the
    /// per-export error counter); cleared before each request.
    pub failed: bool,
}

impl Worker {
    /// Make `buf` at least `n` bytes long. It only ever grows (until
    /// [`Worker::trim`]), so steady-state requests neither allocate nor
    /// zero-fill.
    pub(crate) fn ensure(&mut self, n: usize) {
        if self.buf.len() < n {
            self.buf.resize(n, 0);
        }
    }

    /// Make room for a reply of `n` bytes whose first `header` bytes
    /// precede a payload that must start at a [`PAYLOAD_ALIGN`] boundary
    /// in memory; returns where the reply starts in `buf`.
    pub(crate) fn ensure_aligned(&mut self, header: usize, n: usize) -> usize {
        self.ensure(n + PAYLOAD_ALIGN);
        let addr = self.buf.as_ptr() as usize + header;
        (PAYLOAD_ALIGN - addr % PAYLOAD_ALIGN) % PAYLOAD_ALIGN
    }

    /// Make room for a `WRITE` payload of `n` bytes and set
    /// [`Worker::payload_at`] so it starts at a [`PAYLOAD_ALIGN`] boundary:
    /// the socket read into the buffer and the disk's copy out of it are
    /// both cheaper from a page-aligned address, as for read replies.
    pub(crate) fn take_payload(&mut self, n: usize) {
        self.payload_at = self.ensure_aligned(0, n);
    }

    /// Release buffers grown by unusually large requests.
    pub(crate) fn trim(&mut self) {
        if self.buf.capacity() > RETAIN_BUFFER {
            self.buf = Vec::new();
        }
        if self.out.capacity() > RETAIN_BUFFER {
            self.out = Vec::new();
        }
    }
}

/// Which bytes to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReplyBuf {
    /// `worker.out`.
    Out,
    /// `worker.buf[start..end]`, whose bulk payload starts (page aligned)
    /// at `payload` (`== start` when there is no separate header).
    Buf {
        start: usize,
        payload: usize,
        end: usize,
    },
}

/// What a request runs against.
pub(crate) struct Target<'a> {
    pub disk: &'a dyn Disk,
    pub dirty: Option<&'a dyn DirtyMapSource>,
    pub ordering: Option<&'a dyn OrderSupport>,
    pub contexts: &'a [SelectedContext],
    pub structured: bool,
    pub stats: &'a Counters,
    /// The export's own counters.
    pub export: &'a ExportCounters,
}

fn command_name(command: u16) -> &'static str {
    match command {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_DISC => "disconnect",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_CACHE => "cache",
        CMD_WRITE_ZEROES => "write-zeroes",
        CMD_BLOCK_STATUS => "block-status",
        CMD_ORDER => "order",
        _ => "unknown command",
    }
}

/// The NBD errno for a block-layer failure. Out-of-bounds writes are
/// `ENOSPC`, other out-of-bounds requests `EINVAL`, as the protocol asks.
pub(crate) fn errno_for(e: &BlockError, write_like: bool) -> NbdErrno {
    match e.kind() {
        ErrorKind::Io => NbdErrno::Io,
        ErrorKind::NoSpace => NbdErrno::NoSpc,
        ErrorKind::ReadOnly => NbdErrno::Perm,
        ErrorKind::OutOfBounds if write_like => NbdErrno::NoSpc,
        ErrorKind::OutOfBounds | ErrorKind::Invalid => NbdErrno::Inval,
        // ENOTSUP is reserved for FAST_ZERO; callers handle that case.
        ErrorKind::NotSupported => NbdErrno::Io,
    }
}

fn fail(t: &Target<'_>, w: &mut Worker, cookie: u64, errno: NbdErrno, msg: &str) -> ReplyBuf {
    bump(&t.stats.request_errors, 1);
    w.failed = true;
    w.out.clear();
    if t.structured {
        error_chunk(&mut w.out, cookie, errno, msg, true);
    } else {
        w.out
            .extend_from_slice(&simple_reply(cookie, errno.as_u32()));
    }
    ReplyBuf::Out
}

fn io_fail(
    t: &Target<'_>,
    w: &mut Worker,
    cookie: u64,
    e: &BlockError,
    write_like: bool,
) -> ReplyBuf {
    let errno = errno_for(e, write_like);
    tracing::debug!(cookie, %errno, "request failed: {}", crate::error_chain(e));
    fail(t, w, cookie, errno, &crate::error_chain(e))
}

fn ok(w: &mut Worker, cookie: u64) -> ReplyBuf {
    w.out.clear();
    w.out.extend_from_slice(&simple_reply(cookie, 0));
    ReplyBuf::Out
}

/// Reply to a request that failed validation.
pub(crate) fn reject(
    t: &Target<'_>,
    w: &mut Worker,
    cookie: u64,
    command: u16,
    errno: NbdErrno,
) -> ReplyBuf {
    bump(&t.stats.invalid_requests, 1);
    w.failed = true;
    let msg = format!(
        "{} request refused with {errno}: check flags, bounds and negotiated features",
        command_name(command)
    );
    w.out.clear();
    if t.structured {
        error_chunk(&mut w.out, cookie, errno, &msg, true);
    } else {
        w.out
            .extend_from_slice(&simple_reply(cookie, errno.as_u32()));
    }
    ReplyBuf::Out
}

/// Run a validated request (never `Op::Disc`, which the connection
/// handles) with any `WRITE` payload already in `w.buf`.
pub(crate) fn execute(t: &Target<'_>, w: &mut Worker, v: ValidRequest) -> ReplyBuf {
    let cookie = v.cookie;
    let s = t.stats;
    match v.op {
        Op::Read { offset, len, df } => {
            bump(&s.reads, 1);
            read(t, w, cookie, offset, len, df)
        }
        Op::Write { offset, len, fua } => {
            bump(&s.writes, 1);
            if len == 0 {
                return ok(w, cookie);
            }
            match t.disk.write_at(
                &w.buf[w.payload_at..w.payload_at + len as usize],
                offset,
                WriteOpts { fua, epoch: 0 },
            ) {
                Ok(()) => {
                    bump(&s.bytes_written, u64::from(len));
                    bump(&t.export.bytes_written, u64::from(len));
                    ok(w, cookie)
                }
                Err(e) => io_fail(t, w, cookie, &e, true),
            }
        }
        Op::Flush => {
            bump(&s.flushes, 1);
            match t.disk.flush() {
                Ok(()) => ok(w, cookie),
                Err(e) => io_fail(t, w, cookie, &e, true),
            }
        }
        Op::Trim { offset, len, fua } => {
            bump(&s.trims, 1);
            if len == 0 {
                return ok(w, cookie);
            }
            match t
                .disk
                .discard(offset, u64::from(len), WriteOpts { fua, epoch: 0 })
            {
                // Trim is advisory: not discarding is a correct outcome.
                Ok(()) => ok(w, cookie),
                Err(e) if e.kind() == ErrorKind::NotSupported => ok(w, cookie),
                Err(e) => io_fail(t, w, cookie, &e, true),
            }
        }
        Op::Cache { .. } => {
            bump(&s.caches, 1);
            ok(w, cookie)
        }
        Op::WriteZeroes {
            offset,
            len,
            fua,
            may_unmap,
            fast_only,
        } => {
            bump(&s.write_zeroes, 1);
            if len == 0 {
                return ok(w, cookie);
            }
            let opts = ZeroOpts {
                write: WriteOpts { fua, epoch: 0 },
                may_unmap,
                fast_only,
            };
            match t.disk.write_zeroes(offset, u64::from(len), opts) {
                Ok(()) => ok(w, cookie),
                Err(e) if fast_only && e.kind() == ErrorKind::NotSupported => fail(
                    t,
                    w,
                    cookie,
                    NbdErrno::NotSup,
                    "fast write-zeroes is not possible here; write the zeroes instead",
                ),
                Err(e) => io_fail(t, w, cookie, &e, true),
            }
        }
        Op::BlockStatus {
            offset,
            len,
            req_one,
        } => {
            bump(&s.block_status, 1);
            block_status(t, w, cookie, offset, len, req_one)
        }
        // The connection closes the epoch in its receive loop and calls
        // `order`; this path only runs if a caller skipped that.
        Op::Order { fua } => order(t, w, cookie, fua, t.disk.order()),
        Op::Disc => ReplyBuf::Out,
    }
}

/// Finish an `ORDER` whose barrier (`Disk::order`, taken in the receive
/// loop) returned `barrier`: with `fua`, wait until everything before it
/// is durable; then reply.
pub(crate) fn order(
    t: &Target<'_>,
    w: &mut Worker,
    cookie: u64,
    fua: bool,
    barrier: understudy_block::Result<Epoch>,
) -> ReplyBuf {
    bump(&t.stats.orders, 1);
    finish_barrier(t, w, cookie, fua, barrier)
}

/// Finish a `FLUSH` that was taken as a barrier in the receive loop (on a
/// connection that negotiated `understudy:order`): durable exports then
/// wait for the barrier's epoch, ordered ones are done.
pub(crate) fn flush_barrier(
    t: &Target<'_>,
    w: &mut Worker,
    cookie: u64,
    barrier: understudy_block::Result<Epoch>,
) -> ReplyBuf {
    bump(&t.stats.flushes, 1);
    let durable = t.ordering.is_none_or(|o| o.flush_is_durable());
    finish_barrier(t, w, cookie, durable, barrier)
}

fn finish_barrier(
    t: &Target<'_>,
    w: &mut Worker,
    cookie: u64,
    durable: bool,
    barrier: understudy_block::Result<Epoch>,
) -> ReplyBuf {
    let epoch = match barrier {
        Ok(e) => e,
        Err(e) => return io_fail(t, w, cookie, &e, true),
    };
    if durable {
        // Without an ordering source the export never offers ORDER; a
        // full flush is still a correct write-flush.
        let synced = match t.ordering {
            Some(o) => o.sync_epoch(epoch),
            None => t.disk.flush(),
        };
        if let Err(e) = synced {
            return io_fail(t, w, cookie, &e, true);
        }
    }
    ok(w, cookie)
}

fn read(t: &Target<'_>, w: &mut Worker, cookie: u64, offset: u64, len: u32, df: bool) -> ReplyBuf {
    let n = len as usize;
    if !t.structured {
        // Header then data, one buffer, one write.
        let start = w.ensure_aligned(SIMPLE_REPLY_LEN, SIMPLE_REPLY_LEN + n);
        let data = start + SIMPLE_REPLY_LEN;
        return match t.disk.read_at(&mut w.buf[data..data + n], offset) {
            Ok(()) => {
                w.buf[start..data].copy_from_slice(&simple_reply(cookie, 0));
                bump(&t.stats.bytes_read, u64::from(len));
                bump(&t.export.bytes_read, u64::from(len));
                ReplyBuf::Buf {
                    start,
                    payload: data,
                    end: data + n,
                }
            }
            Err(e) => io_fail(t, w, cookie, &e, false),
        };
    }
    if n == 0 {
        w.out.clear();
        w.out.extend_from_slice(&none_chunk(cookie));
        return ReplyBuf::Out;
    }
    plan_read(
        t.disk,
        &mut w.plan,
        offset,
        len,
        !df && len >= HOLE_SCAN_MIN_READ,
    );
    let total: usize = w
        .plan
        .iter()
        .map(|s| match s {
            Seg::Data { len, .. } => OFFSET_DATA_HEADER_LEN + *len as usize,
            Seg::Hole { .. } => OFFSET_HOLE_CHUNK_LEN,
        })
        .sum();
    let first_header = match w.plan.first() {
        Some(Seg::Data { .. }) => OFFSET_DATA_HEADER_LEN,
        _ => OFFSET_HOLE_CHUNK_LEN,
    };
    let start = w.ensure_aligned(first_header, total);
    let Worker { buf, plan, .. } = w;
    let mut pos = start;
    let last = plan.len() - 1;
    for (i, seg) in plan.iter().enumerate() {
        let done = i == last;
        match *seg {
            Seg::Data { offset, len } => {
                let l = len as usize;
                let data = &mut buf[pos + OFFSET_DATA_HEADER_LEN..pos + OFFSET_DATA_HEADER_LEN + l];
                if let Err(e) = t.disk.read_at(data, offset) {
                    // Nothing was sent yet: replace the whole reply.
                    return io_fail(t, w, cookie, &e, false);
                }
                buf[pos..pos + OFFSET_DATA_HEADER_LEN]
                    .copy_from_slice(&offset_data_header(cookie, offset, len, done));
                pos += OFFSET_DATA_HEADER_LEN + l;
            }
            Seg::Hole { offset, len } => {
                buf[pos..pos + OFFSET_HOLE_CHUNK_LEN]
                    .copy_from_slice(&offset_hole_chunk(cookie, offset, len, done));
                pos += OFFSET_HOLE_CHUNK_LEN;
            }
        }
    }
    bump(&t.stats.bytes_read, u64::from(len));
    bump(&t.export.bytes_read, u64::from(len));
    ReplyBuf::Buf {
        start,
        payload: start + first_header,
        end: pos,
    }
}

/// Split a read into data and hole segments. Holes come from one
/// `Disk::map` call; anything it does not describe (or any map failure)
/// is read as data, which is always correct.
fn plan_read(disk: &dyn Disk, plan: &mut Vec<Seg>, offset: u64, len: u32, scan: bool) {
    plan.clear();
    let end = offset + u64::from(len);
    let mut pos = offset;
    let push_data = |plan: &mut Vec<Seg>, off: u64, l: u64| match plan.last_mut() {
        Some(Seg::Data { offset: o, len: dl }) if *o + u64::from(*dl) == off => *dl += l as u32,
        _ => plan.push(Seg::Data {
            offset: off,
            len: l as u32,
        }),
    };
    if scan && let Ok(extents) = disk.map(offset, u64::from(len)) {
        let mut holes = 0;
        for e in extents {
            if e.offset != pos || pos >= end || e.len == 0 {
                break;
            }
            let l = e.end().min(end) - pos;
            if e.kind.reads_zero() && l >= MIN_HOLE_CHUNK && holes < MAX_HOLE_CHUNKS {
                plan.push(Seg::Hole {
                    offset: pos,
                    len: l as u32,
                });
                holes += 1;
            } else {
                push_data(plan, pos, l);
            }
            pos += l;
        }
    }
    if pos < end {
        push_data(plan, pos, end - pos);
    }
}

#[derive(Debug)]
enum StatusError {
    Block(BlockError),
    NoBitmap(String),
    Empty,
}

fn block_status(
    t: &Target<'_>,
    w: &mut Worker,
    cookie: u64,
    offset: u64,
    len: u32,
    req_one: bool,
) -> ReplyBuf {
    w.out.clear();
    let n = t.contexts.len();
    for (i, ctx) in t.contexts.iter().enumerate() {
        let mut b = BlockStatusBuilder::new(&mut w.out, cookie, ctx.id, i + 1 == n, len, req_one);
        let filled = match &ctx.context {
            MetaContext::BaseAllocation => fill_allocation(t.disk, offset, &mut b),
            MetaContext::DirtyBitmap(name) => match t.dirty {
                Some(d) => fill_dirty(d, name, offset, &mut b),
                None => Err(StatusError::NoBitmap(name.clone())),
            },
            // No block-status data: one extent over the request, flags 0.
            MetaContext::Order => {
                b.push(u64::from(len), 0);
                Ok(())
            }
        };
        let r = filled.and_then(|()| b.finish().map(drop).map_err(|_| StatusError::Empty));
        if let Err(e) = r {
            let (errno, msg) = match e {
                StatusError::Block(e) => (errno_for(&e, false), crate::error_chain(&e)),
                StatusError::NoBitmap(name) => (
                    NbdErrno::Io,
                    format!(
                        "dirty bitmap {name:?} no longer exists; reconnect to see current bitmaps"
                    ),
                ),
                StatusError::Empty => (
                    NbdErrno::Io,
                    "the disk reported no extents for the range".to_string(),
                ),
            };
            w.out.clear();
            return fail(t, w, cookie, errno, &msg);
        }
    }
    ReplyBuf::Out
}

/// The NBD `base:allocation` flags for what the block layer says a range is.
///
/// A range that lives in a backing layer is reported as allocated data
/// (flags 0), as QEMU's NBD server does: `base:allocation` describes the
/// image as the client reads it, the whole chain flattened. Where in the
/// chain data lives is `qemu:allocation-depth`'s business, which we do not
/// serve; a client copying the export must copy those bytes.
pub(crate) fn allocation_flags(kind: ExtentKind) -> u32 {
    match kind {
        ExtentKind::Data | ExtentKind::Backing => 0,
        ExtentKind::Zero => STATE_ZERO,
        ExtentKind::Hole => STATE_HOLE | STATE_ZERO,
    }
}

fn fill_allocation(
    disk: &dyn Disk,
    offset: u64,
    b: &mut BlockStatusBuilder<'_>,
) -> Result<(), StatusError> {
    let mut pos = offset;
    while b.wants_more() {
        let want = u64::from(b.remaining());
        let extents = disk.map(pos, want).map_err(StatusError::Block)?;
        let start = pos;
        for e in extents {
            if e.offset != pos || e.len == 0 {
                break;
            }
            pos = e.end();
            if !b.push(e.len, allocation_flags(e.kind)) {
                return Ok(());
            }
        }
        if pos == start {
            break; // no progress: stop, the client asks again
        }
    }
    Ok(())
}

fn fill_dirty(
    src: &dyn DirtyMapSource,
    name: &str,
    offset: u64,
    b: &mut BlockStatusBuilder<'_>,
) -> Result<(), StatusError> {
    let mut pos = offset;
    while b.wants_more() {
        let want = u64::from(b.remaining());
        let runs = src
            .dirty_extents(name, pos, want)
            .ok_or_else(|| StatusError::NoBitmap(name.to_owned()))?;
        let start = pos;
        for (l, dirty) in runs {
            if l == 0 {
                continue;
            }
            pos = pos.saturating_add(l);
            if !b.push(l, if dirty { STATE_DIRTY } else { 0 }) {
                return Ok(());
            }
        }
        if pos == start {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_flags_follow_the_nbd_spec() {
        assert_eq!(allocation_flags(ExtentKind::Data), 0);
        // Backing data reads as data: allocated, not zero (as QEMU says).
        assert_eq!(allocation_flags(ExtentKind::Backing), 0);
        assert_eq!(allocation_flags(ExtentKind::Zero), STATE_ZERO);
        assert_eq!(allocation_flags(ExtentKind::Hole), STATE_HOLE | STATE_ZERO);
        assert_eq!(STATE_HOLE | STATE_ZERO, 3);
    }
}
