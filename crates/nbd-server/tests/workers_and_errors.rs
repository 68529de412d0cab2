//! Worker pool growth and retirement, and block-layer failures mapped to
//! NBD errors (with a fault-injecting disk).
#![allow(clippy::unwrap_used)] // helpers outside #[test] functions

mod common;

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

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
    wait_for(
        "idle helper workers to retire",
        Duration::from_secs(10),
        || threads() <= 1,
    );
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

/// Large replies go out as a header write plus an aligned payload write,
/// from worker buffers whose layout changes with every request; pipelined
/// reads of odd sizes and offsets, with and without structured replies,
/// sparse and not, must still arrive byte-exact and matched to their
/// cookies. Large writes land byte-exact too.
#[test]
fn large_pipelined_reads_and_writes_are_byte_exact() {
    let cfg = ServerConfig {
        max_workers_per_connection: 4,
        ..ServerConfig::default()
    };
    let ts = TestServer::start(cfg);
    let size = 16 * MIB;
    let (path, disk) = ts.add_disk("d", size);
    // Data in [1 MiB, 5 MiB) and [9 MiB, 9 MiB + 100 KiB); holes elsewhere.
    write_pattern(&*disk, MIB, 4 * MIB as usize, 3);
    write_pattern(&*disk, 9 * MIB, 100 << 10, 7);
    disk.flush().unwrap();
    let reads: &[(u64, u32)] = &[
        (0, 4 << 20),
        (512, (1 << 20) + 1),
        (MIB - 3, 33 << 10),
        (5 * MIB - 4096, 8 << 20),
        (9 * MIB + 1, 64 << 10),
        (3 * MIB + 17, 32 << 20),
        (0, 31 << 10),
    ];
    for structured in [false, true] {
        let (mut c, _, _) = RawClient::connect_go(&ts.addr(), "d", structured, &[]);
        let mut expected = std::collections::HashMap::new();
        for (i, &(off, len)) in reads.iter().enumerate() {
            let len = len.min((size - off) as u32);
            c.request(CMD_READ, 0, i as u64, off, len);
            expected.insert(i as u64, read_file_range(&path, off, len as usize));
        }
        // Replies may come in any order; each must be whole and exact.
        let mut got: std::collections::HashMap<u64, Vec<u8>> = Default::default();
        let mut done = std::collections::HashSet::new();
        while done.len() < reads.len() {
            if structured {
                let (h, d) = c.chunk();
                let i = h.cookie as usize;
                let (off, _) = reads[i];
                let buf = got
                    .entry(h.cookie)
                    .or_insert_with(|| vec![0xAA; expected[&h.cookie].len()]);
                let at = u64::from_be_bytes(d[..8].try_into().unwrap()) - off;
                match h.typ {
                    REPLY_TYPE_OFFSET_DATA => {
                        buf[at as usize..at as usize + d.len() - 8].copy_from_slice(&d[8..]);
                    }
                    REPLY_TYPE_OFFSET_HOLE => {
                        let l = u32::from_be_bytes(d[8..12].try_into().unwrap()) as usize;
                        buf[at as usize..at as usize + l].fill(0);
                    }
                    t => panic!("unexpected chunk type {t}"),
                }
                if h.flags & REPLY_FLAG_DONE != 0 {
                    done.insert(h.cookie);
                }
            } else {
                let (err, cookie) = c.simple_reply();
                assert_eq!(err, 0);
                let d = c.read_n(expected[&cookie].len());
                got.insert(cookie, d);
                done.insert(cookie);
            }
        }
        for (cookie, want) in &expected {
            assert!(
                got[cookie] == *want,
                "read {cookie} (structured {structured}) differs"
            );
        }
    }
    // Pipelined large writes at odd offsets, then a flush.
    let (mut c, _, _) = RawClient::connect_go(&ts.addr(), "d", true, &[]);
    let writes: &[(u64, usize, u8)] = &[
        (7, 1 << 20, 11),
        (6 * MIB + 4095, 3 << 20, 12),
        (12 * MIB, 40 << 10, 13),
    ];
    for (i, &(off, len, seed)) in writes.iter().enumerate() {
        let data: Vec<u8> = (0..len).map(|j| (j as u8) ^ seed).collect();
        c.request(CMD_WRITE, 0, 100 + i as u64, off, len as u32);
        c.send(&data);
    }
    let mut acked = std::collections::HashSet::new();
    for _ in writes {
        // Writes get simple replies even with structured replies on.
        let (err, cookie) = c.simple_reply();
        assert_eq!(err, 0);
        acked.insert(cookie);
    }
    assert_eq!(acked.len(), writes.len());
    for &(off, len, seed) in writes {
        let want: Vec<u8> = (0..len).map(|j| (j as u8) ^ seed).collect();
        assert!(read_file_range(&path, off, len) == want, "write at {off}");
    }
}
