//! Worker pool growth and retirement, and block-layer failures mapped to
//! NBD errors (with a fault-injecting disk).
#![allow(clippy::unwrap_used)] // helpers outside #[test] functions

mod common;

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use understudy_block::{
    BlockError, Disk, DiskInfo, DiskMap, DiskRead, DiskSize, DiskWrite, Extent, Format, WriteOpts,
    ZeroOpts, raw::RawDisk,
};
use understudy_nbd_proto::reply::parse_error_payload;
use understudy_nbd_proto::wire::*;
use understudy_nbd_server::{Export, ServerConfig};

#[test]
fn helpers_spawn_under_pipelining_and_retire_when_idle() {
    let cfg = ServerConfig {
        idle_worker_timeout: Duration::from_millis(150),
        max_workers_per_connection: 4,
        ..ServerConfig::default()
    };
    let ts = TestServer::start(cfg);
    ts.add_disk("d", 8 * MIB);
    let (mut c, _, _) = RawClient::connect_go(&ts.addr(), "d", false, &[]);
    let threads = || ts.server.stats().worker_threads;
    assert_eq!(threads(), 1, "an idle connection costs one thread");
    // Slow-ish requests in a burst make the pool grow.
    let mut peak = 1;
    for round in 0..20u64 {
        let mut batch = Vec::new();
        for i in 0..16u64 {
            let r = understudy_nbd_proto::Request {
                flags: CMD_FLAG_FUA,
                command: CMD_WRITE,
                cookie: round * 100 + i,
                offset: i * 65536,
                length: 65536,
            };
            batch.extend_from_slice(&r.encode());
            batch.extend_from_slice(&[round as u8; 65536]);
        }
        c.send(&batch);
        for _ in 0..16 {
            assert_eq!(c.simple_reply().0, 0);
        }
        peak = peak.max(threads());
    }
    assert!(peak > 1, "no helper was ever spawned");
    assert!(peak <= 4, "more than max_workers_per_connection: {peak}");
    // Idle: helpers retire back to the connection thread alone.
    let start = Instant::now();
    while threads() > 1 && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(threads(), 1, "helpers did not retire");
    // And the connection still works with one worker.
    c.request(CMD_READ, 0, 1, 0, 4);
    assert_eq!(c.simple_reply(), (0, 1));
    assert_eq!(c.read_n(4), vec![19; 4]);
}

/// A raw disk whose operations can be made to fail.
#[derive(Debug)]
struct FaultyDisk {
    inner: RawDisk,
    fail_io: AtomicBool,
    fail_nospace: AtomicBool,
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(5) // EIO
}

impl DiskSize for FaultyDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
}

impl DiskRead for FaultyDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> understudy_block::Result<()> {
        if self.fail_io.load(Ordering::Relaxed) {
            return Err(BlockError::Read {
                offset,
                len: buf.len() as u64,
                source: eio(),
            });
        }
        self.inner.read_at(buf, offset)
    }
}

impl DiskWrite for FaultyDisk {
    fn write_at(&self, buf: &[u8], offset: u64, opts: WriteOpts) -> understudy_block::Result<()> {
        if self.fail_nospace.load(Ordering::Relaxed) {
            return Err(BlockError::Write {
                offset,
                len: buf.len() as u64,
                source: io::Error::from_raw_os_error(28),
            });
        }
        self.inner.write_at(buf, offset, opts)
    }
    fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> understudy_block::Result<()> {
        if opts.fast_only {
            return Err(BlockError::NotSupported("fast write-zeroes"));
        }
        self.inner.write_zeroes(offset, len, opts)
    }
    fn discard(&self, _offset: u64, _len: u64, _opts: WriteOpts) -> understudy_block::Result<()> {
        Err(BlockError::NotSupported("discard"))
    }
    fn flush(&self) -> understudy_block::Result<()> {
        if self.fail_io.load(Ordering::Relaxed) {
            return Err(BlockError::Flush { source: eio() });
        }
        self.inner.flush()
    }
}

impl DiskMap for FaultyDisk {
    fn map(&self, offset: u64, len: u64) -> understudy_block::Result<Vec<Extent>> {
        if self.fail_io.load(Ordering::Relaxed) {
            return Err(BlockError::Map {
                offset,
                len,
                source: eio(),
            });
        }
        self.inner.map(offset, len)
    }
}

impl Disk for FaultyDisk {
    fn info(&self) -> DiskInfo {
        DiskInfo {
            format: Format::Raw,
            size: self.size(),
            read_only: false,
            can_discard: true,
            can_fast_zero: true,
            flush_covers_all_handles: false,
            preferred_block_size: 3000, // not a power of two: must be sanitised
        }
    }
}

#[test]
fn disk_failures_map_to_nbd_errors() {
    let ts = TestServer::start(ServerConfig::default());
    let disk = Arc::new(FaultyDisk {
        inner: RawDisk::create(&ts.dir.path().join("f.raw"), MIB).unwrap(),
        fail_io: AtomicBool::new(false),
        fail_nospace: AtomicBool::new(false),
    });
    ts.server.exports().insert(Export::new("f", disk.clone()));

    let (mut c, flags, _) = RawClient::connect_go(&ts.addr(), "f", false, &[]);
    assert_eq!(
        flags & FLAG_CAN_MULTI_CONN,
        0,
        "multi-conn needs flush_covers_all_handles"
    );
    assert_ne!(flags & FLAG_SEND_FAST_ZERO, 0);
    // FAST_ZERO that cannot be fast: ENOTSUP; without the flag: success.
    c.request(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 1, 0, 4096);
    assert_eq!(c.simple_reply(), (95, 1));
    c.request(CMD_WRITE_ZEROES, 0, 2, 0, 4096);
    assert_eq!(c.simple_reply(), (0, 2));
    // Trim the disk cannot do is still a success (advisory).
    c.request(CMD_TRIM, 0, 3, 0, 4096);
    assert_eq!(c.simple_reply(), (0, 3));
    // ENOSPC from the disk.
    disk.fail_nospace.store(true, Ordering::Relaxed);
    c.request(CMD_WRITE, 0, 4, 0, 8);
    c.send(&[1; 8]);
    assert_eq!(c.simple_reply(), (28, 4));
    disk.fail_nospace.store(false, Ordering::Relaxed);
    // EIO on read and flush; simple read errors carry no payload.
    disk.fail_io.store(true, Ordering::Relaxed);
    c.request(CMD_READ, 0, 5, 0, 4096);
    assert_eq!(c.simple_reply(), (5, 5));
    c.request(CMD_FLUSH, 0, 6, 0, 0);
    assert_eq!(c.simple_reply(), (5, 6));
    disk.fail_io.store(false, Ordering::Relaxed);
    c.request(CMD_READ, 0, 7, 0, 4);
    assert_eq!(c.simple_reply(), (0, 7));
    assert_eq!(c.read_n(4), vec![0; 4]);

    // Structured: errors become ERROR chunks with the cause in the message,
    // for reads (also large ones that scan for holes) and block status.
    let (mut c, _, _) = RawClient::connect_go(&ts.addr(), "f", true, &["base:allocation"]);
    disk.fail_io.store(true, Ordering::Relaxed);
    for (cookie, cmd, len) in [
        (10, CMD_READ, 4096u32),
        (11, CMD_READ, MIB as u32),
        (12, CMD_BLOCK_STATUS, 4096),
    ] {
        c.request(cmd, 0, cookie, 0, len);
        let (h, d) = c.chunk();
        assert_eq!(
            (h.typ, h.flags, h.cookie),
            (REPLY_TYPE_ERROR, REPLY_FLAG_DONE, cookie)
        );
        let (err, msg) = parse_error_payload(&d).unwrap();
        assert_eq!(err, 5, "{msg}");
        assert!(msg.contains("Input/output error"), "{msg}");
    }
    disk.fail_io.store(false, Ordering::Relaxed);
    assert!(ts.server.stats().request_errors >= 7);
}
