//! The blocking link over TCP loopback: concurrency, large payloads,
//! keepalive, shutdown.

// Helpers outside #[test] functions unwrap too: a failure there is a test
// failure.
#![allow(clippy::unwrap_used)]

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::{cfg, serve_one};
use understudy_peer::{Link, PeerError, wire::DEFAULT_MAX_PAYLOAD};

fn connected(purpose: &str) -> (Link, Link) {
    let (addr, h) = serve_one(cfg("server", 0));
    let client = Link::connect(&addr, &cfg("client", 0), purpose).unwrap();
    (client, h.join().unwrap().unwrap())
}

/// Payload that identifies its sender and position, so corruption, loss
/// and reordering are all visible.
fn payload(thread: u8, i: u32, len: usize) -> Vec<u8> {
    let mut p = vec![thread; len.max(5)];
    p[1..5].copy_from_slice(&i.to_be_bytes());
    for (k, b) in p.iter_mut().enumerate().skip(5) {
        *b = (k as u32).wrapping_mul(2_654_435_761).wrapping_add(i) as u8 ^ thread;
    }
    p
}

#[test]
fn concurrent_send_and_recv_from_two_threads_each_side() {
    const N: u32 = 300;
    let (client, server) = connected("migrate");
    let (ctx, mut crx) = client.split();
    let (stx, mut srx) = server.split();

    // Client: one thread sends N frames while another receives N echoes.
    let sender = thread::spawn(move || {
        for i in 0..N {
            ctx.send(0x0101, &payload(1, i, 100 + (i as usize * 37) % 5000))
                .unwrap();
        }
        ctx
    });
    // Server: echo everything back, from a receive thread into the shared
    // sender, while a second server thread sends its own stream.
    let stx2 = stx.clone();
    let echo = thread::spawn(move || {
        for _ in 0..N {
            let f = srx.recv().unwrap();
            stx.send(0x0102, &f.payload).unwrap();
        }
        srx
    });
    let extra = thread::spawn(move || {
        for i in 0..N {
            stx2.send(0x0103, &payload(2, i, 64)).unwrap();
        }
    });
    let (mut echoes, mut extras) = (0u32, 0u32);
    let mut buf = Vec::new();
    while echoes < N || extras < N {
        let t = crx.recv_into(&mut buf).unwrap();
        match t {
            0x0102 => {
                assert_eq!(buf, payload(1, echoes, 100 + (echoes as usize * 37) % 5000));
                echoes += 1;
            }
            0x0103 => {
                assert_eq!(buf, payload(2, extras, 64));
                extras += 1;
            }
            other => panic!("unexpected type {other:#x}"),
        }
    }
    sender.join().unwrap();
    echo.join().unwrap();
    extra.join().unwrap();
}

#[test]
fn many_threads_share_one_sender_without_interleaving_frames() {
    let (client, mut server) = connected("migrate");
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let tx = client.sender();
            thread::spawn(move || {
                for i in 0..50 {
                    tx.send(0x0100 + u16::from(t), &payload(t, i, 20_000))
                        .unwrap();
                }
            })
        })
        .collect();
    let mut next = [0u32; 4];
    for _ in 0..200 {
        let f = server.recv().unwrap();
        let t = (f.msg_type - 0x0100) as usize;
        // Per-sender order is kept and every frame arrives whole.
        assert_eq!(f.payload, payload(t as u8, next[t], 20_000));
        next[t] += 1;
    }
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(next, [50; 4]);
}

#[test]
fn large_payloads_round_trip_whole_and_in_parts() {
    let (client, mut server) = connected("migrate");
    let big: Vec<u8> = (0..DEFAULT_MAX_PAYLOAD as usize)
        .map(|i| (i * 7 + i / 4096) as u8)
        .collect();
    let tx = client.sender();
    let data = big.clone();
    let writer = thread::spawn(move || {
        tx.send(0x0101, &data).unwrap();
        // A service header plus a 16 MiB chunk, sent without copying.
        let (head, rest) = data.split_at(64 * 1024);
        tx.send_parts(0x0102, &[head, &rest[..1 << 20], &rest[1 << 20..]])
            .unwrap();
    });
    let f = server.recv().unwrap();
    assert_eq!(f.msg_type, 0x0101);
    assert!(f.payload == big, "16 MiB payload differs");
    let mut buf = Vec::new();
    assert_eq!(server.recv_into(&mut buf).unwrap(), 0x0102);
    assert!(buf == big, "payload sent in parts differs");
    writer.join().unwrap();
    // A reused buffer shrinks to the next frame's length.
    client.send(0x0101, b"tiny").unwrap();
    server.recv_into(&mut buf).unwrap();
    assert_eq!(buf, b"tiny");
}

#[test]
fn keepalives_keep_an_idle_link_alive_and_silence_still_times_out() {
    let mut a = cfg("a", 0);
    let mut b = cfg("b", 0);
    for c in [&mut a, &mut b] {
        c.read_timeout = Some(Duration::from_millis(1000));
        c.keepalive = Some(Duration::from_millis(100));
    }
    let (la, mut lb) = Link::pair(&a, &b, "memsync").unwrap();
    // Idle for three read timeouts, then a real frame.
    let tx = la.sender();
    let t = thread::spawn(move || {
        thread::sleep(Duration::from_millis(3000));
        tx.send(0x0201, b"late but alive").unwrap();
    });
    assert_eq!(lb.recv().unwrap().payload, b"late but alive");
    t.join().unwrap();

    // Without keepalives the same idle period is a timeout.
    for c in [&mut a, &mut b] {
        c.keepalive = None;
    }
    let (_la, mut lb) = Link::pair(&a, &b, "memsync").unwrap();
    let start = Instant::now();
    assert!(matches!(lb.recv(), Err(PeerError::RecvTimeout { .. })));
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn shutdown_says_goodbye_and_kills_the_sender() {
    let (client, mut server) = connected("migrate");
    client.send(0x0101, b"last data").unwrap();
    client.shutdown("migration complete").unwrap();
    assert_eq!(server.recv().unwrap().payload, b"last data");
    let e = server.recv().unwrap_err();
    assert!(e.is_clean_close(), "{e:?}");
    assert!(e.to_string().contains("migration complete"));
    assert!(matches!(
        client.send(0x0101, b"x"),
        Err(PeerError::LinkDead)
    ));
    assert!(matches!(server.recv(), Err(PeerError::LinkDead)));
}

#[test]
fn half_close_lets_the_other_direction_finish() {
    let (client, server) = connected("migrate");
    let (ctx, mut crx) = client.split();
    let (stx, mut srx) = server.split();
    ctx.close("no more requests").unwrap();
    assert!(srx.recv().unwrap_err().is_clean_close());
    stx.send(0x0101, b"final reply").unwrap();
    assert_eq!(crx.recv().unwrap().payload, b"final reply");
}

#[test]
fn dropped_peer_is_a_disconnect_not_a_hang() {
    let (client, mut server) = connected("migrate");
    drop(client);
    let start = Instant::now();
    let e = server.recv().unwrap_err();
    assert!(matches!(e, PeerError::Disconnected), "{e:?}");
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn send_error_reaches_the_peer_as_remote() {
    let (client, mut server) = connected("migrate");
    client
        .send_error(
            understudy_peer::error_code::REFUSED,
            "target disk is smaller",
        )
        .unwrap();
    client.send(0x0101, b"still usable").unwrap();
    let e = server.recv().unwrap_err();
    assert_eq!(
        e.to_string(),
        "peer reported error 4: target disk is smaller"
    );
    assert_eq!(server.recv().unwrap().payload, b"still usable");
}
