//! Per-export request counters (`Export::stats`) over a raw socket:
//! exact counts by op, errors, bytes, latency buckets and open
//! connections.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use understudy_nbd_proto::wire::*;
use understudy_nbd_server::{RequestOp, ServerConfig};

#[test]
fn requests_errors_bytes_and_connections_per_export() {
    let ts = TestServer::start(ServerConfig::default());
    ts.add_disk("d", MIB);
    ts.add_disk("other", MIB);
    let stats = |name: &str| ts.server.exports().get(name).unwrap().stats();
    let (mut c, _, _) = RawClient::connect_go(&ts.addr(), "d", false, &[]);
    // Counted once the server enters transmission, just after its reply.
    wait_for("the connection is counted", Duration::from_secs(10), || {
        stats("d").connections_active == 1
    });
    c.request(CMD_WRITE, 0, 1, 0, 4096);
    c.send(&[7; 4096]);
    assert_eq!(c.simple_reply(), (0, 1));
    c.request(CMD_READ, 0, 2, 0, 512);
    assert_eq!(c.simple_reply(), (0, 2));
    c.read_n(512);
    c.request(CMD_READ, 0, 3, MIB, 1); // out of bounds: refused
    assert_eq!(c.simple_reply(), (22, 3));
    c.request(CMD_WRITE_ZEROES, 0, 4, 4096, 4096);
    assert_eq!(c.simple_reply(), (0, 4));
    c.request(CMD_FLUSH, 0, 5, 0, 0);
    assert_eq!(c.simple_reply(), (0, 5));
    c.request(42, 0, 6, 0, 0); // unknown command: refused, no op to count
    assert_eq!(c.simple_reply(), (22, 6));

    let s = stats("d");
    let op = |o: RequestOp| s.ops[o as usize];
    assert_eq!(
        (op(RequestOp::Read).requests, op(RequestOp::Read).errors),
        (2, 1)
    );
    assert_eq!(
        (op(RequestOp::Write).requests, op(RequestOp::Write).errors),
        (1, 0)
    );
    assert_eq!(op(RequestOp::Zero).requests, 1);
    assert_eq!(op(RequestOp::Flush).requests, 1);
    assert_eq!(op(RequestOp::Trim).requests, 0);
    assert_eq!((s.bytes_read, s.bytes_written), (512, 4096));
    for o in s.ops {
        assert_eq!(o.latency_buckets.iter().sum::<u64>(), o.requests, "{o:?}");
        assert!(o.requests == 0 || o.latency_sum_ns > 0, "{o:?}");
    }
    // The other export saw nothing. Server-wide, refused requests are
    // counted apart from the ops.
    assert!(stats("other").ops.iter().all(|o| o.requests == 0));
    assert_eq!(ts.server.stats().reads, 1);
    assert_eq!(ts.server.stats().invalid_requests, 2);
    drop(c);
    wait_for("the connection is gone", Duration::from_secs(10), || {
        stats("d").connections_active == 0
    });
}
