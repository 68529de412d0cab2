//! The `understudy:order` extension over a raw socket: negotiation, the
//! receive-order guarantee with pipelined requests on several workers,
//! write-flush with FUA, errors, and invisibility to standard clients.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{RawClient, TestServer};
use parking_lot::{Condvar, Mutex};
use understudy_block::{
    BlockError, Disk, DiskInfo, DiskMap, DiskRead, DiskSize, DiskWrite, Epoch, Extent, ExtentKind,
    Format, WriteOpts, ZeroOpts,
};
use understudy_nbd_proto::reply::parse_block_status;
use understudy_nbd_proto::wire::*;
use understudy_nbd_server::{Export, OrderSupport, ServerConfig};

const SIZE: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ev {
    WriteStart(u8),
    WriteEnd(u8),
    Order(Epoch),
}

/// An in-memory disk that logs writes (tagged by their first byte) and
/// order calls, and can make writes slow (so they are still running when
/// a barrier arrives) or make them prove that they overlap.
#[derive(Debug, Default)]
struct LogDisk {
    data: Mutex<Vec<u8>>,
    log: Mutex<Vec<Ev>>,
    epoch: AtomicU64,
    write_delay_ms: AtomicU64,
    fail_order: AtomicBool,
    /// Writes tagged this or higher (0: none) do not finish until two of
    /// them have started: they run in parallel, or (after a deadline) the
    /// log shows they did not.
    overlap_from_tag: AtomicU8,
    overlap_started: Mutex<usize>,
    overlap_cv: Condvar,
}

impl LogDisk {
    fn new() -> Arc<Self> {
        let d = Self::default();
        *d.data.lock() = vec![0; SIZE as usize];
        Arc::new(d)
    }

    /// See `overlap_from_tag`.
    fn wait_for_overlap(&self, tag: u8) {
        let from = self.overlap_from_tag.load(Ordering::Relaxed);
        if from == 0 || tag < from {
            return;
        }
        let mut started = self.overlap_started.lock();
        *started += 1;
        self.overlap_cv.notify_all();
        let deadline = Instant::now() + Duration::from_secs(10);
        while *started < 2 {
            if self
                .overlap_cv
                .wait_until(&mut started, deadline)
                .timed_out()
            {
                break; // serialised: the caller's assertion reports it
            }
        }
    }
}

impl DiskSize for LogDisk {
    fn size(&self) -> u64 {
        SIZE
    }
}

impl DiskRead for LogDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> understudy_block::Result<()> {
        let d = self.data.lock();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
}

impl DiskWrite for LogDisk {
    fn write_at(&self, buf: &[u8], offset: u64, _: WriteOpts) -> understudy_block::Result<()> {
        let tag = buf[0];
        self.log.lock().push(Ev::WriteStart(tag));
        self.wait_for_overlap(tag);
        std::thread::sleep(Duration::from_millis(
            self.write_delay_ms.load(Ordering::Relaxed),
        ));
        self.data.lock()[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        self.log.lock().push(Ev::WriteEnd(tag));
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _: ZeroOpts) -> understudy_block::Result<()> {
        self.data.lock()[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn discard(&self, _: u64, _: u64, _: WriteOpts) -> understudy_block::Result<()> {
        Ok(())
    }
    fn flush(&self) -> understudy_block::Result<()> {
        Ok(())
    }
    fn order(&self) -> understudy_block::Result<Epoch> {
        if self.fail_order.load(Ordering::Relaxed) {
            return Err(BlockError::Backend {
                op: "order",
                reason: "journal stopped (test)".into(),
            });
        }
        let e = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        self.log.lock().push(Ev::Order(e));
        Ok(e)
    }
}

impl DiskMap for LogDisk {
    fn map(&self, offset: u64, len: u64) -> understudy_block::Result<Vec<Extent>> {
        Ok(vec![Extent {
            offset,
            len,
            kind: ExtentKind::Data,
        }])
    }
}

impl Disk for LogDisk {
    fn info(&self) -> DiskInfo {
        DiskInfo {
            format: Format::Raw,
            size: SIZE,
            read_only: false,
            can_discard: true,
            can_fast_zero: true,
            flush_covers_all_handles: true,
            preferred_block_size: 4096,
        }
    }
}

/// Counts write-flushes (and remembers the last epoch); can be told to
/// fail, and to treat FLUSH as ordering only.
#[derive(Debug, Default)]
struct Syncs {
    n: AtomicU64,
    last: AtomicU64,
    fail: AtomicBool,
    flush_orders_only: AtomicBool,
}

impl OrderSupport for Syncs {
    fn sync_epoch(&self, epoch: Epoch) -> understudy_block::Result<()> {
        if self.fail.load(Ordering::Relaxed) {
            return Err(BlockError::Flush {
                source: std::io::Error::other("journal fsync failed (test)"),
            });
        }
        self.n.fetch_add(1, Ordering::SeqCst);
        self.last.store(epoch, Ordering::SeqCst);
        Ok(())
    }
    fn flush_is_durable(&self) -> bool {
        !self.flush_orders_only.load(Ordering::Relaxed)
    }
}

fn server() -> (TestServer, Arc<LogDisk>, Arc<Syncs>) {
    let srv = TestServer::start(ServerConfig {
        max_workers_per_connection: 8,
        ..ServerConfig::default()
    });
    let disk = LogDisk::new();
    let syncs = Arc::new(Syncs::default());
    srv.server
        .exports()
        .insert(Export::new("j", disk.clone() as Arc<dyn Disk>).with_ordering(syncs.clone()));
    srv.server
        .exports()
        .insert(Export::new("plain", LogDisk::new() as Arc<dyn Disk>));
    (srv, disk, syncs)
}

fn write(c: &mut RawClient, cookie: u64, offset: u64, tag: u8) {
    c.request(CMD_WRITE, 0, cookie, offset, 4096);
    c.send(&[tag; 4096]);
}

/// Read `n` simple replies; returns cookie → error.
fn replies(c: &mut RawClient, n: usize) -> std::collections::HashMap<u64, u32> {
    (0..n)
        .map(|_| {
            let (err, cookie) = c.simple_reply();
            (cookie, err)
        })
        .collect()
}

#[test]
fn order_splits_pipelined_writes_in_receive_order() {
    let (srv, disk, syncs) = server();
    disk.write_delay_ms.store(40, Ordering::Relaxed);
    disk.overlap_from_tag.store(5, Ordering::Relaxed);
    let (mut c, _, _) = RawClient::connect_go(&srv.addr(), "j", true, &["understudy:order"]);
    // Everything pipelined: four slow writes, ORDER, four more writes.
    for tag in 1..=4u8 {
        write(&mut c, u64::from(tag), u64::from(tag) * 4096, tag);
    }
    c.request(CMD_ORDER, 0, 100, 0, 0);
    for tag in 5..=8u8 {
        write(&mut c, u64::from(tag), u64::from(tag) * 4096, tag);
    }
    let r = replies(&mut c, 9);
    assert!(r.values().all(|&e| e == 0), "{r:?}");
    let log = disk.log.lock().clone();
    let at = |ev: Ev| log.iter().position(|&e| e == ev).unwrap();
    let order = at(Ev::Order(1));
    for tag in 1..=4 {
        assert!(
            at(Ev::WriteEnd(tag)) < order,
            "write {tag} received before ORDER finished after it: {log:?}"
        );
    }
    for tag in 5..=8 {
        assert!(
            at(Ev::WriteStart(tag)) > order,
            "write {tag} received after ORDER started before it: {log:?}"
        );
    }
    // The later writes ran in parallel (several workers), not one by one.
    let starts: Vec<usize> = (5..=8).map(|t| at(Ev::WriteStart(t))).collect();
    let first_end = (5..=8).map(|t| at(Ev::WriteEnd(t))).min().unwrap();
    assert!(
        starts.iter().filter(|&&s| s < first_end).count() >= 2,
        "writes after ORDER ran one at a time: {log:?}"
    );
    assert_eq!(syncs.n.load(Ordering::SeqCst), 0, "ORDER without FUA syncs");
    assert_eq!(srv.server.stats().orders, 1);
}

/// On a connection that negotiated the extension, FLUSH closes the epoch in
/// receive order as well (so it cannot split the writes pipelined after
/// it), then waits for exactly that epoch, or not at all under an ordered
/// flush policy.
#[test]
fn flush_is_a_receive_order_barrier_with_the_extension() {
    let (srv, disk, syncs) = server();
    disk.write_delay_ms.store(40, Ordering::Relaxed);
    let (mut c, _, _) = RawClient::connect_go(&srv.addr(), "j", true, &["understudy:order"]);
    for tag in 1..=3u8 {
        write(&mut c, u64::from(tag), u64::from(tag) * 4096, tag);
    }
    c.request(CMD_FLUSH, 0, 100, 0, 0);
    for tag in 4..=6u8 {
        write(&mut c, u64::from(tag), u64::from(tag) * 4096, tag);
    }
    let r = replies(&mut c, 7);
    assert!(r.values().all(|&e| e == 0), "{r:?}");
    let log = disk.log.lock().clone();
    let at = |ev: Ev| log.iter().position(|&e| e == ev).unwrap();
    let order = at(Ev::Order(1));
    assert!((1..=3).all(|t| at(Ev::WriteEnd(t)) < order), "{log:?}");
    assert!((4..=6).all(|t| at(Ev::WriteStart(t)) > order), "{log:?}");
    assert_eq!(syncs.n.load(Ordering::SeqCst), 1);
    assert_eq!(
        syncs.last.load(Ordering::SeqCst),
        1,
        "waited for its own epoch"
    );
    // Ordered policy: FLUSH orders and returns without a sync.
    syncs.flush_orders_only.store(true, Ordering::Relaxed);
    c.request(CMD_FLUSH, 0, 200, 0, 0);
    assert_eq!(c.simple_reply(), (0, 200));
    assert_eq!(disk.epoch.load(Ordering::SeqCst), 2);
    assert_eq!(syncs.n.load(Ordering::SeqCst), 1);
    // A standard connection's FLUSH is the plain `Disk::flush` (no barrier).
    let (mut s, _, _) = RawClient::connect_go(&srv.addr(), "j", false, &[]);
    s.request(CMD_FLUSH, 0, 300, 0, 0);
    assert_eq!(s.simple_reply(), (0, 300));
    assert_eq!(disk.epoch.load(Ordering::SeqCst), 2);
    assert_eq!(srv.server.stats().flushes, 3);
}

#[test]
fn order_with_fua_is_a_write_flush_and_errors_are_eio() {
    let (srv, disk, syncs) = server();
    let (mut c, flags, _) = RawClient::connect_go(&srv.addr(), "j", true, &["understudy:order"]);
    assert_ne!(flags & FLAG_SEND_FUA, 0);
    write(&mut c, 1, 0, 9);
    assert_eq!(c.simple_reply(), (0, 1));
    c.request(CMD_ORDER, CMD_FLAG_FUA, 2, 0, 0);
    assert_eq!(c.simple_reply(), (0, 2));
    assert_eq!(syncs.n.load(Ordering::SeqCst), 1);
    assert_eq!(syncs.last.load(Ordering::SeqCst), 1);
    assert_eq!(disk.epoch.load(Ordering::SeqCst), 1);

    // Bad arguments: EINVAL as a structured error chunk, nothing ordered.
    c.request(CMD_ORDER, 0, 3, 4096, 0);
    let (h, _) = c.chunk();
    assert_eq!((h.cookie, h.typ), (3, REPLY_TYPE_ERROR));
    c.request(CMD_ORDER, CMD_FLAG_NO_HOLE, 4, 0, 0);
    let (h, d) = c.chunk();
    assert_eq!((h.cookie, h.typ), (4, REPLY_TYPE_ERROR));
    assert_eq!(u32::from_be_bytes(d[..4].try_into().unwrap()), 22);
    assert_eq!(disk.epoch.load(Ordering::SeqCst), 1);

    // A failed write-flush and a failed barrier are EIO.
    syncs.fail.store(true, Ordering::Relaxed);
    c.request(CMD_ORDER, CMD_FLAG_FUA, 5, 0, 0);
    let (h, d) = c.chunk();
    assert_eq!((h.cookie, h.typ), (5, REPLY_TYPE_ERROR));
    assert_eq!(u32::from_be_bytes(d[..4].try_into().unwrap()), 5);
    disk.fail_order.store(true, Ordering::Relaxed);
    c.request(CMD_ORDER, 0, 6, 0, 0);
    let (h, d) = c.chunk();
    assert_eq!((h.cookie, h.typ), (6, REPLY_TYPE_ERROR));
    assert_eq!(u32::from_be_bytes(d[..4].try_into().unwrap()), 5);
    // The connection is still usable.
    c.request(CMD_READ, 0, 7, 0, 512);
    let (h, d) = c.chunk();
    assert_eq!((h.cookie, h.typ), (7, REPLY_TYPE_OFFSET_DATA));
    assert_eq!(d[8], 9);
}

#[test]
fn order_is_refused_unless_negotiated() {
    let (srv, disk, _) = server();
    // A standard client (no structured replies, no contexts).
    let (mut c, _, _) = RawClient::connect_go(&srv.addr(), "j", false, &[]);
    c.request(CMD_ORDER, 0, 1, 0, 0);
    assert_eq!(c.simple_reply(), (22, 1));
    // A client that selects only base:allocation.
    let (mut c, _, _) = RawClient::connect_go(&srv.addr(), "j", true, &["base:allocation"]);
    c.request(CMD_ORDER, 0, 2, 0, 0);
    let (h, d) = c.chunk();
    assert_eq!((h.cookie, h.typ), (2, REPLY_TYPE_ERROR));
    assert_eq!(u32::from_be_bytes(d[..4].try_into().unwrap()), 22);
    // An export without a journal never grants the context.
    let (mut c, _, _) = RawClient::connect_go(&srv.addr(), "plain", true, &["understudy:order"]);
    c.request(CMD_ORDER, 0, 3, 0, 0);
    let (h, _) = c.chunk();
    assert_eq!((h.cookie, h.typ), (3, REPLY_TYPE_ERROR));
    assert_eq!(disk.epoch.load(Ordering::SeqCst), 0, "no barrier was taken");
    assert_eq!(srv.server.stats().orders, 0);
}

#[test]
fn order_context_block_status_is_one_flat_extent() {
    let (srv, _, _) = server();
    let (mut c, _, _) = RawClient::connect_go(
        &srv.addr(),
        "j",
        true,
        &["understudy:order", "base:allocation"],
    );
    c.request(CMD_BLOCK_STATUS, 0, 1, 4096, 65536);
    let mut seen = Vec::new();
    loop {
        let (h, d) = c.chunk();
        assert_eq!(h.typ, REPLY_TYPE_BLOCK_STATUS);
        seen.push(parse_block_status(&d).unwrap());
        if h.flags & REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    // Context ids follow the SET order: 1 = understudy:order.
    assert_eq!(seen[0], (1, vec![(65536, 0)]));
    assert_eq!(seen[1].0, 2);
}
