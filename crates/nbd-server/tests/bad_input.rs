//! Malformed and hostile input over raw sockets: the offending client gets
//! an error or is disconnected, nothing panics, other clients carry on.
#![allow(clippy::unwrap_used)] // helpers outside #[test] functions

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use understudy_nbd_proto::reply::{encode_option, parse_block_status, parse_error_payload};
use understudy_nbd_proto::wire::*;
use understudy_nbd_proto::{MAX_OPTION_LEN, MAX_REQUEST_LEN};
use understudy_nbd_server::ServerConfig;

fn server() -> TestServer {
    TestServer::start(ServerConfig::default())
}

/// The server still works for a well-behaved client.
fn still_serving(ts: &TestServer) {
    let (mut c, _, _) = RawClient::connect_go(&ts.addr(), "d", false, &[]);
    c.request(CMD_READ, 0, 77, 0, 512);
    assert_eq!(c.simple_reply(), (0, 77));
    c.read_n(512);
}

#[test]
fn garbage_instead_of_client_flags_or_options() {
    let ts = server();
    ts.add_disk("d", MIB);
    // Unknown client flag bits.
    let mut c = RawClient::connect(&ts.addr());
    c.send(&0xffff_ffffu32.to_be_bytes());
    assert!(c.closed());
    // Bad option magic.
    let mut c = RawClient::connect(&ts.addr());
    c.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(c.closed());
    still_serving(&ts);
    assert!(ts.server.stats().handshakes_failed >= 2);
}

#[test]
fn huge_option_lengths() {
    let ts = server();
    ts.add_disk("d", MIB);
    // 4 GiB announced: closed at once, nothing allocated or awaited.
    let mut c = RawClient::connect(&ts.addr());
    c.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    let mut h = IHAVEOPT.to_be_bytes().to_vec();
    h.extend_from_slice(&OPT_GO.to_be_bytes());
    h.extend_from_slice(&u32::MAX.to_be_bytes());
    c.send(&h);
    assert!(c.closed());
    // Slightly over the limit: skipped, refused with TOO_BIG, still in sync.
    let mut c = RawClient::connect(&ts.addr());
    c.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    c.send(&encode_option(
        OPT_GO,
        &vec![0u8; MAX_OPTION_LEN as usize + 100],
    ));
    let (opt, typ, _) = c.option_reply();
    assert_eq!((opt, typ), (OPT_GO, REP_ERR_TOO_BIG));
    c.send(&encode_option(OPT_LIST, &[]));
    assert_eq!(c.option_reply().1, REP_SERVER);
    assert_eq!(c.option_reply().1, REP_ACK);
    still_serving(&ts);
}

#[test]
fn huge_request_lengths() {
    let ts = server();
    ts.add_disk("d", 64 * MIB);
    let (mut c, _, _) = RawClient::connect_go(&ts.addr(), "d", false, &[]);
    // Oversized read: EOVERFLOW, connection stays usable.
    c.request(CMD_READ, 0, 1, 0, MAX_REQUEST_LEN + 1);
    assert_eq!(c.simple_reply(), (75, 1));
    c.request(CMD_READ, 0, 2, 0, 16);
    assert_eq!(c.simple_reply(), (0, 2));
    c.read_n(16);
    // Payload-free commands may exceed the payload limit.
    c.request(CMD_WRITE_ZEROES, 0, 3, 0, 48 << 20);
    assert_eq!(c.simple_reply(), (0, 3));
    // Oversized write: the payload cannot be skipped, so the server closes.
    c.request(CMD_WRITE, 0, 4, 0, u32::MAX);
    c.send(&[0u8; 4096]);
    let (err, cookie) = c.simple_reply();
    assert_eq!((err, cookie), (75, 4));
    assert!(c.closed());
    still_serving(&ts);
}

#[test]
fn out_of_bounds_and_bad_commands_get_errors_and_service_continues() {
    let ts = server();
    let (path, _) = ts.add_disk("d", MIB);
    let (mut c, flags, size) = RawClient::connect_go(&ts.addr(), "d", false, &[]);
    assert_eq!(size, MIB);
    assert_ne!(flags & FLAG_SEND_FLUSH, 0);
    let cases: &[(u16, u16, u64, u32, u32)] = &[
        (CMD_READ, 0, MIB - 1, 2, 22),
        (CMD_READ, 0, u64::MAX, 1, 22),
        (CMD_TRIM, 0, MIB, 1, 22),
        (CMD_WRITE_ZEROES, 0, MIB - 100, 101, 28),
        (CMD_BLOCK_STATUS, 0, 0, 512, 22), // no context negotiated
        (CMD_FLUSH, 0, 1, 0, 22),
        (42, 0, 0, 0, 22),                   // unknown command
        (CMD_READ, 1 << 12, 0, 512, 22),     // unknown flag
        (CMD_READ, CMD_FLAG_DF, 0, 512, 22), // DF without structured replies
    ];
    for (i, &(cmd, fl, off, len, errno)) in cases.iter().enumerate() {
        c.request(cmd, fl, i as u64, off, len);
        assert_eq!(c.simple_reply(), (errno, i as u64), "case {i}");
    }
    // Out-of-bounds write: payload consumed, ENOSPC, nothing written.
    c.request(CMD_WRITE, 0, 100, MIB - 10, 20);
    c.send(&[0xee; 20]);
    assert_eq!(c.simple_reply(), (28, 100));
    assert_eq!(read_file_range(&path, MIB - 10, 10), vec![0; 10]);
    // The stream is still in sync.
    c.request(CMD_WRITE, CMD_FLAG_FUA, 101, 0, 4);
    c.send(b"abcd");
    assert_eq!(c.simple_reply(), (0, 101));
    assert_eq!(read_file_range(&path, 0, 4), b"abcd");
    assert!(ts.server.stats().invalid_requests > cases.len() as u64);
    // Structured replies carry the error in an ERROR chunk with a message.
    let (mut c, _, _) = RawClient::connect_go(&ts.addr(), "d", true, &[]);
    c.request(CMD_READ, 0, 5, MIB, 1);
    let (h, d) = c.chunk();
    assert_eq!(
        (h.typ, h.flags, h.cookie),
        (REPLY_TYPE_ERROR, REPLY_FLAG_DONE, 5)
    );
    let (err, msg) = parse_error_payload(&d).unwrap();
    assert_eq!(err, 22);
    assert!(msg.contains("read"), "{msg}");
    // A garbage header is fatal.
    c.send(&[0x55; 28]);
    assert!(c.closed());
}

#[test]
fn disconnect_mid_write_payload_writes_nothing() {
    let ts = server();
    let (path, _) = ts.add_disk("d", MIB);
    let (mut c, _, _) = RawClient::connect_go(&ts.addr(), "d", false, &[]);
    c.request(CMD_WRITE, 0, 1, 4096, 65536);
    c.send(&[0xab; 30000]);
    drop(c);
    // Once the server has closed the connection, nothing more can reach
    // the disk: check that nothing did.
    wait_for(
        "the server to close the connection cut mid-payload",
        Duration::from_secs(10),
        || ts.server.stats().connections_active == 0,
    );
    assert_eq!(read_file_range(&path, 4096, 65536), vec![0; 65536]);
    assert_eq!(ts.server.stats().writes, 0);
    still_serving(&ts);
}

#[test]
fn handshake_timeout_kills_slow_clients() {
    let cfg = ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let ts = TestServer::start(cfg);
    ts.add_disk("d", MIB);
    let start = Instant::now();
    let mut c = RawClient::connect(&ts.addr());
    // Drip-feed: one byte of the client flags, then nothing.
    c.send(&[0]);
    assert!(c.closed());
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // Transmission-phase idleness is not a timeout.
    let (mut c, _, _) = RawClient::connect_go(&ts.addr(), "d", false, &[]);
    std::thread::sleep(Duration::from_millis(600));
    c.request(CMD_FLUSH, 0, 9, 0, 0);
    assert_eq!(c.simple_reply(), (0, 9));
}

#[test]
fn idle_connections_cost_one_thread_and_do_not_block_others() {
    let ts = server();
    ts.add_disk("d", 4 * MIB);
    let before = thread_count();
    // Half of them stuck before the handshake, half idle in transmission.
    let mut idle = Vec::new();
    for i in 0..200 {
        if i % 2 == 0 {
            let mut s = TcpStream::connect(ts.addr()).unwrap();
            s.write_all(&[0, 0]).unwrap();
            idle.push(s);
        } else {
            idle.push(RawClient::connect_go(&ts.addr(), "d", false, &[]).0.s);
        }
    }
    let start = Instant::now();
    wait_for(
        "the server to count 200 open connections",
        Duration::from_secs(5),
        || ts.server.stats().connections_active >= 200,
    );
    assert_eq!(ts.server.stats().connections_active, 200);
    let with_idle = thread_count();
    assert!(
        with_idle - before <= 205,
        "{before} -> {with_idle} threads for 200 idle connections"
    );
    // Another client works normally meanwhile.
    let out = qemu_io(&ts.uri("d"), &["write -P 0x42 0 1M", "read -P 0x42 0 1M"]);
    assert_qemu_io_clean(&out);
    assert!(start.elapsed() < Duration::from_secs(10));
    drop(idle);
}

#[test]
fn pipelined_requests_all_answered_and_disc_waits_for_them() {
    let ts = server();
    let (_, disk) = ts.add_disk("d", 8 * MIB);
    write_pattern(&*disk, 0, 8 * MIB as usize, 3);
    let (mut c, _, _) = RawClient::connect_go(&ts.addr(), "d", false, &[]);
    // 64 reads in one burst, then DISC: every read is answered, then EOF.
    let mut batch = Vec::new();
    for i in 0..64u64 {
        let r = understudy_nbd_proto::Request {
            flags: 0,
            command: CMD_READ,
            cookie: 1000 + i,
            offset: i * 65536,
            length: 65536,
        };
        batch.extend_from_slice(&r.encode());
    }
    let disc = understudy_nbd_proto::Request {
        flags: 0,
        command: CMD_DISC,
        cookie: 0,
        offset: 0,
        length: 0,
    };
    batch.extend_from_slice(&disc.encode());
    c.send(&batch);
    let mut seen = [false; 64];
    for _ in 0..64 {
        let (err, cookie) = c.simple_reply();
        assert_eq!(err, 0);
        let i = (cookie - 1000) as usize;
        assert!(!seen[i], "duplicate reply");
        seen[i] = true;
        let data = c.read_n(65536);
        let mut expect = vec![0u8; 65536];
        disk.read_at(&mut expect, i as u64 * 65536).unwrap();
        assert!(data == expect, "wrong data for cookie {cookie}");
    }
    assert!(c.closed());
    assert_eq!(ts.server.stats().disconnects, 1);
}

#[test]
fn structured_reads_use_holes_and_block_status_honours_req_one() {
    let ts = server();
    let (_, disk) = ts.add_disk("d", 4 * MIB);
    write_pattern(&*disk, MIB, 64 * 1024, 5);
    let (mut c, flags, _) = RawClient::connect_go(&ts.addr(), "d", true, &["base:allocation"]);
    assert_ne!(flags & FLAG_SEND_DF, 0);
    // 2 MiB read over hole + data + hole: reassemble and compare.
    c.request(CMD_READ, 0, 1, 0, 2 * MIB as u32);
    let mut got = vec![0xffu8; 2 * MIB as usize];
    let mut covered = 0u64;
    let mut holes = 0;
    loop {
        let (h, d) = c.chunk();
        assert_eq!(h.cookie, 1);
        let off = u64::from_be_bytes(d[..8].try_into().unwrap());
        match h.typ {
            REPLY_TYPE_OFFSET_DATA => {
                got[off as usize..off as usize + d.len() - 8].copy_from_slice(&d[8..]);
                covered += d.len() as u64 - 8;
            }
            REPLY_TYPE_OFFSET_HOLE => {
                let l = u32::from_be_bytes(d[8..12].try_into().unwrap()) as usize;
                got[off as usize..off as usize + l].fill(0);
                covered += l as u64;
                holes += 1;
            }
            t => panic!("unexpected chunk type {t}"),
        }
        if h.flags & REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    assert_eq!(covered, 2 * MIB);
    assert!(holes >= 1, "sparse ranges should be sent as holes");
    let mut expect = vec![0u8; 2 * MIB as usize];
    disk.read_at(&mut expect, 0).unwrap();
    assert!(got == expect);
    // DF: exactly one data chunk.
    c.request(CMD_READ, CMD_FLAG_DF, 2, 0, 2 * MIB as u32);
    let (h, d) = c.chunk();
    assert_eq!(
        (h.typ, h.flags & REPLY_FLAG_DONE, d.len()),
        (
            REPLY_TYPE_OFFSET_DATA,
            REPLY_FLAG_DONE,
            2 * MIB as usize + 8
        )
    );
    // Block status: several extents, or one with REQ_ONE.
    c.request(CMD_BLOCK_STATUS, 0, 3, 0, 4 * MIB as u32);
    let (h, d) = c.chunk();
    assert_eq!((h.typ, h.flags), (REPLY_TYPE_BLOCK_STATUS, REPLY_FLAG_DONE));
    let (_, ext) = parse_block_status(&d).unwrap();
    assert!(ext.len() >= 3, "{ext:?}");
    assert_eq!(ext.iter().map(|e| u64::from(e.0)).sum::<u64>(), 4 * MIB);
    c.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 4, 0, 4 * MIB as u32);
    let (_, d) = c.chunk();
    let (_, ext) = parse_block_status(&d).unwrap();
    assert_eq!(ext.len(), 1);
    assert_eq!(ext[0].1, STATE_HOLE | STATE_ZERO);
    assert!(u64::from(ext[0].0) <= MIB);
}

#[test]
fn exports_change_at_runtime_and_shutdown_closes_idle_clients() {
    let mut ts = server();
    ts.add_disk("d", MIB);
    let (mut idle, _, _) = RawClient::connect_go(&ts.addr(), "d", false, &[]);
    let removed = ts.server.exports().remove("d").unwrap();
    // A connection opened before removal keeps working.
    idle.request(CMD_READ, 0, 1, 0, 8);
    assert_eq!(idle.simple_reply(), (0, 1));
    idle.read_n(8);
    // New handshakes no longer see it.
    let mut c = RawClient::connect(&ts.addr());
    c.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    let mut d = 1u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"d");
    d.extend_from_slice(&0u16.to_be_bytes());
    c.send(&encode_option(OPT_GO, &d));
    assert_eq!(c.option_reply().1, REP_ERR_UNKNOWN);
    ts.server.exports().insert_arc(removed);
    c.send(&encode_option(OPT_GO, &d));
    assert_eq!(c.option_reply().1, REP_INFO);

    let start = Instant::now();
    ts.stop();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "shutdown took {:?}",
        start.elapsed()
    );
    assert!(idle.closed());
    assert_eq!(ts.server.stats().connections_active, 0);
    // The listener was closed when its accept loop returned.
    assert!(TcpStream::connect(ts.addr()).is_err());
}
