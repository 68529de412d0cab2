//! Handshake over real sockets: success, rejection, and misbehaving peers.

// Helpers outside #[test] functions unwrap too: a failure there is a test
// failure.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use common::{cfg, key, serve_one, tcp_pair};
use understudy_peer::wire::{HELLO_PREFIX_LEN, Hello, VersionRange, negotiate};
use understudy_peer::{Link, PeerError, PeerListener, RESPONDER_PURPOSE, random_nonce};

#[test]
fn handshake_succeeds_and_exposes_both_hellos() {
    let mut server_cfg = cfg("target-1", 0);
    server_cfg.max_payload = 64 * 1024;
    let (addr, h) = serve_one(server_cfg);
    let client = Link::connect(&addr, &cfg("source-1", 0), "migrate").unwrap();
    let mut server = h.join().unwrap().unwrap();

    assert_eq!(server.peer().node_id, "source-1");
    assert_eq!(server.peer().purpose, "migrate");
    assert_eq!(server.peer().version, 1);
    assert_eq!(client.peer().node_id, "target-1");
    assert_eq!(client.peer().purpose, RESPONDER_PURPOSE);
    assert_eq!(client.peer().max_payload, 64 * 1024);

    client.send(0x0101, b"ping from source").unwrap();
    let f = server.recv().unwrap();
    assert_eq!(
        (f.msg_type, &f.payload[..]),
        (0x0101, &b"ping from source"[..])
    );
}

#[test]
fn wrong_key_fails_on_both_sides_with_a_clear_message() {
    // Both directions: the listener holding the other key, and vice versa.
    for (client_seed, server_seed) in [(1u8, 2u8), (2, 1)] {
        let (addr, h) = serve_one(cfg("server", server_seed));
        let client_err = Link::connect(&addr, &cfg("client", client_seed), "memsync").unwrap_err();
        let server_err = h.join().unwrap().unwrap_err();
        for e in [&client_err, &server_err] {
            assert!(matches!(e, PeerError::Authentication), "{e:?}");
            assert_eq!(
                e.to_string(),
                "peer failed authentication: check that both sides use the same --peer-key file"
            );
            assert!(e.is_handshake_rejection());
        }
    }
}

#[test]
fn version_mismatch_names_both_ranges_on_both_sides() {
    // A "future" peer speaking 3..4, written by hand.
    let (mut future, real) = tcp_pair();
    let h = thread::spawn(move || Link::accept(Box::new(real), &cfg("today", 0)));
    let hello = Hello {
        versions: VersionRange { min: 3, max: 4 },
        nonce: random_nonce().unwrap(),
        max_payload: 1 << 20,
        node_id: "tomorrow".into(),
        purpose: "migrate".into(),
        extensions: b"future extension".to_vec(),
    };
    future.write_all(&hello.encode().unwrap()).unwrap();
    let real_err = h.join().unwrap().unwrap_err();
    assert_eq!(
        real_err.to_string(),
        "peer speaks protocol versions 3..4, we speak 1..1: upgrade the older side"
    );
    // The future side reads our hello and reaches the mirror conclusion.
    let mut prefix = [0u8; HELLO_PREFIX_LEN];
    future.read_exact(&mut prefix).unwrap();
    let mut body = vec![0u8; Hello::decode_prefix(&prefix).unwrap()];
    future.read_exact(&mut body).unwrap();
    let ours = Hello::decode_body(&body).unwrap();
    let their_err = negotiate(hello.versions, ours.versions).unwrap_err();
    assert_eq!(
        their_err.to_string(),
        "peer speaks protocol versions 1..1, we speak 3..4: upgrade the older side"
    );
    // And the real side closed the connection without a proof.
    let mut rest = Vec::new();
    future.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{} bytes after the hello", rest.len());
}

#[test]
fn truncated_handshakes_are_reported_as_closed() {
    let good = Hello {
        versions: VersionRange::SUPPORTED,
        nonce: [9; 32],
        max_payload: 1 << 20,
        node_id: "cut".into(),
        purpose: "migrate".into(),
        extensions: vec![],
    }
    .encode()
    .unwrap();
    // Cut inside the prefix, inside the body, and after the whole hello
    // (before the proof).
    for cut in [5, good.len() - 3, good.len()] {
        let (mut fake, real) = tcp_pair();
        let h = thread::spawn(move || Link::accept(Box::new(real), &cfg("real", 0)));
        fake.write_all(&good[..cut]).unwrap();
        fake.shutdown(std::net::Shutdown::Write).unwrap();
        let e = h.join().unwrap().unwrap_err();
        assert!(matches!(e, PeerError::HandshakeClosed), "cut {cut}: {e:?}");
    }
}

#[test]
fn garbage_peers_are_refused() {
    // An HTTP server answering our connect.
    let (mut fake, real) = tcp_pair();
    let h = thread::spawn(move || Link::connect_stream(Box::new(real), &cfg("c", 0), "migrate"));
    fake.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap();
    let e = h.join().unwrap().unwrap_err();
    assert!(
        matches!(e, PeerError::BadMagic { got } if &got == b"HTTP/1.1"),
        "{e:?}"
    );
    assert!(e.to_string().contains("check the address and port"));

    // Right magic, absurd body length.
    let (mut fake, real) = tcp_pair();
    let h = thread::spawn(move || Link::accept(Box::new(real), &cfg("s", 0)));
    fake.write_all(b"USTDYPR1\xff\xff").unwrap();
    let e = h.join().unwrap().unwrap_err();
    assert!(matches!(e, PeerError::MalformedHello { .. }), "{e:?}");

    // Valid hello, then a garbage proof.
    let (mut fake, real) = tcp_pair();
    let h = thread::spawn(move || Link::accept(Box::new(real), &cfg("s", 0)));
    let hello = Hello {
        versions: VersionRange::SUPPORTED,
        nonce: [1; 32],
        max_payload: 1 << 20,
        node_id: "g".into(),
        purpose: "migrate".into(),
        extensions: vec![],
    };
    fake.write_all(&hello.encode().unwrap()).unwrap();
    fake.write_all(&[0xa5; 32]).unwrap();
    let e = h.join().unwrap().unwrap_err();
    assert!(matches!(e, PeerError::Authentication), "{e:?}");
}

#[test]
fn silent_client_cannot_hold_the_listener() {
    let mut c = cfg("server", 0);
    c.handshake_timeout = Duration::from_millis(300);
    let listener = PeerListener::bind("127.0.0.1:0", &c).unwrap();
    let addr = listener.local_addr().unwrap();
    let _silent = TcpStream::connect(&addr).unwrap();
    let start = Instant::now();
    let e = listener.accept().unwrap_err();
    let took = start.elapsed();
    assert!(matches!(e, PeerError::HandshakeTimeout { .. }), "{e:?}");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );

    // The listener still accepts a proper client afterwards.
    let h = thread::spawn(move || listener.accept());
    let client = Link::connect(&addr, &cfg("client", 0), "migrate").unwrap();
    let (_server, hello) = h.join().unwrap().unwrap();
    assert_eq!(hello.node_id, "client");
    drop(client);
}

#[test]
fn slow_trickling_client_is_cut_off_by_the_handshake_deadline() {
    // One byte every 100 ms: each read succeeds, but the whole handshake
    // must still end at the deadline.
    let (mut fake, real) = tcp_pair();
    let mut c = cfg("s", 0);
    c.handshake_timeout = Duration::from_millis(400);
    let h = thread::spawn(move || Link::accept(Box::new(real), &c));
    let start = Instant::now();
    let trickle = thread::spawn(move || {
        for b in b"USTDYPR1" {
            if fake.write_all(&[*b]).is_err() {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
    });
    let e = h.join().unwrap().unwrap_err();
    assert!(matches!(e, PeerError::HandshakeTimeout { .. }), "{e:?}");
    assert!(start.elapsed() < Duration::from_secs(2));
    trickle.join().unwrap();
}

#[test]
fn connecting_to_nothing_fails_clearly() {
    let free = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let e = Link::connect(&free.to_string(), &cfg("c", 0), "migrate").unwrap_err();
    assert!(matches!(e, PeerError::Connect { .. }), "{e:?}");
    assert!(e.to_string().contains("check that its daemon runs"));
}

#[test]
fn same_node_id_on_both_sides_is_refused() {
    let (addr, h) = serve_one(cfg("twin", 0));
    let e = Link::connect(&addr, &cfg("twin", 0), "migrate").unwrap_err();
    assert!(matches!(e, PeerError::SelfConnection { .. }), "{e:?}");
    assert!(matches!(
        h.join().unwrap(),
        Err(PeerError::SelfConnection { .. })
    ));
}

#[test]
fn unix_socket_listener_and_connect() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("unix:{}", dir.path().join("peer.sock").display());
    let listener = PeerListener::bind(&addr, &cfg("s", 0)).unwrap();
    assert_eq!(listener.local_addr().unwrap(), addr);
    let h = thread::spawn(move || listener.accept());
    let client = Link::connect(&addr, &cfg("c", 0), "memsync").unwrap();
    let (mut server, hello) = h.join().unwrap().unwrap();
    assert_eq!(hello.purpose, "memsync");
    client.send(0x0201, b"page").unwrap();
    assert_eq!(server.recv().unwrap().payload, b"page");
    // The socket file is removed with the listener.
    assert!(!dir.path().join("peer.sock").exists());
}

#[test]
fn invalid_purpose_is_refused_before_connecting_anything() {
    let (a, b) = tcp_pair();
    drop(b);
    let e = Link::connect_stream(Box::new(a), &cfg("c", 0), "Not A Purpose").unwrap_err();
    assert!(matches!(e, PeerError::Config { .. }), "{e:?}");
    let _ = key(0);
}
