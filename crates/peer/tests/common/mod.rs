//! Helpers shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use understudy_peer::{
    Handshake, HandshakeParams, Link, PeerAuth, PeerConfig, PeerError, PeerKey, PeerListener, Role,
    Session, random_nonce,
};

pub fn key(seed: u8) -> PeerKey {
    let bytes: Vec<u8> = (0..40u8).map(|i| i.wrapping_mul(31) ^ seed).collect();
    PeerKey::from_bytes(&bytes).unwrap()
}

/// A config with short timeouts so failure tests finish quickly.
pub fn cfg(node: &str, seed: u8) -> PeerConfig {
    let mut c = PeerConfig::new(key(seed)).unwrap();
    c.node_id = node.into();
    c.handshake_timeout = Duration::from_secs(5);
    c.read_timeout = Some(Duration::from_secs(10));
    c.write_timeout = Some(Duration::from_secs(10));
    c.keepalive = Some(Duration::from_secs(2));
    c
}

/// A listener on a free loopback port, accepting one link on a thread.
pub fn serve_one(cfg: PeerConfig) -> (String, JoinHandle<Result<Link, PeerError>>) {
    let listener = PeerListener::bind("127.0.0.1:0", &cfg).unwrap();
    let addr = listener.local_addr().unwrap();
    let h = thread::spawn(move || listener.accept().map(|(link, _)| link));
    (addr, h)
}

/// A connected raw TCP pair: (our end, the end a real `Link` uses).
pub fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    (a, b)
}

/// Run the real handshake by hand over a raw stream: the test then holds
/// the session keys and can put any bytes on the wire.
pub fn manual_handshake(s: &mut TcpStream, key: &PeerKey, role: Role, node: &str) -> Session {
    let mut hs = Handshake::new(
        HandshakeParams::new(role, node, "migrate", 1 << 20),
        key,
        random_nonce().unwrap(),
    )
    .unwrap();
    loop {
        let out = hs.take_output();
        s.write_all(&out).unwrap();
        if hs.is_done() {
            break;
        }
        let mut buf = vec![0u8; hs.wants()];
        s.read_exact(&mut buf).unwrap();
        hs.feed(&buf).unwrap();
    }
    hs.into_session().unwrap()
}

/// A real responder link on one end of a TCP pair and an evil initiator
/// (holding the session) on the other.
pub fn evil_initiator(cfg: PeerConfig) -> (TcpStream, Session, Link) {
    let (mut evil, real) = tcp_pair();
    let PeerAuth::Psk(k) = cfg.auth.clone() else {
        panic!("evil_initiator needs a pre-shared-key config");
    };
    let h = thread::spawn(move || Link::accept(Box::new(real), &cfg));
    let session = manual_handshake(&mut evil, &k, Role::Initiator, "evil");
    (evil, session, h.join().unwrap().unwrap())
}
