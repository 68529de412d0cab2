//! The peer link over TLS 1.3 with mutual certificates.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use understudy_peer::understudy_tls::certs::{self, IssueOptions, Validity};
use understudy_peer::understudy_tls::{CertProblem, TlsError};
use understudy_peer::{Link, PeerAuth, PeerConfig, PeerError, PeerListener};

const HANDSHAKE: Duration = Duration::from_secs(2);

/// A CA with the given nodes issued.
fn cluster(nodes: &[&str]) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    certs::init_ca(t.path()).unwrap();
    for n in nodes {
        certs::issue(t.path(), n, &IssueOptions::default()).unwrap();
    }
    t
}

/// Node `node`'s TLS config from `dir`, trusting the CA in `ca_dir`.
fn tls_cfg_ca(dir: &Path, node: &str, ca_dir: &Path) -> PeerConfig {
    let mut c = PeerConfig::from_tls_files(
        &certs::cert_path(dir, node),
        &certs::key_path(dir, node),
        &ca_dir.join("ca.pem"),
    )
    .unwrap();
    c.handshake_timeout = HANDSHAKE;
    c.read_timeout = Some(Duration::from_secs(10));
    c.write_timeout = Some(Duration::from_secs(10));
    c.keepalive = Some(Duration::from_secs(2));
    c
}

fn tls_cfg(dir: &Path, node: &str) -> PeerConfig {
    tls_cfg_ca(dir, node, dir)
}

fn serve_one(cfg: PeerConfig) -> (String, thread::JoinHandle<Result<Link, PeerError>>) {
    common::serve_one(cfg)
}

fn pattern(seed: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) as u8)
        .collect()
}

fn cert_problem(e: &PeerError) -> Option<&CertProblem> {
    match e {
        PeerError::Tls { source } => match &**source {
            TlsError::PeerCertificate { problem } => Some(problem),
            _ => None,
        },
        _ => None,
    }
}

fn refused_ours(e: &PeerError) -> bool {
    matches!(e, PeerError::Tls { source } if matches!(**source, TlsError::PeerRefusedOurs { .. }))
}

#[test]
fn two_nodes_exchange_frames_both_ways_concurrently() {
    let t = cluster(&["node-a", "node-b"]);
    let (addr, h) = serve_one(tls_cfg(t.path(), "node-b"));
    let client =
        Link::connect_to_node(&addr, "node-b", &tls_cfg(t.path(), "node-a"), "migrate").unwrap();
    let server = h.join().unwrap().unwrap();
    assert_eq!(client.peer().node_id, "node-b");
    assert_eq!(server.peer().node_id, "node-a");
    assert!(format!("{:?}", tls_cfg(t.path(), "node-a").auth).starts_with("Tls"));

    // Small, odd-sized and 8 MiB frames, both directions at once.
    let sizes: Vec<usize> = (0..40)
        .map(|i| match i % 4 {
            0 => 0,
            1 => 1 + i * 37,
            2 => 70_000 + i,
            _ => 8 << 20,
        })
        .collect();
    let run = |link: Link, seed: u32| {
        let sizes = sizes.clone();
        thread::spawn(move || {
            let (tx, mut rx) = link.split();
            let sizes2 = sizes.clone();
            let sender = thread::spawn(move || {
                for (i, len) in sizes2.iter().enumerate() {
                    tx.send(0x0101, &pattern(seed + i as u32, *len)).unwrap();
                }
                tx
            });
            let peer_seed = if seed == 0 { 1000 } else { 0 };
            for (i, len) in sizes.iter().enumerate() {
                let f = rx.recv().unwrap();
                assert_eq!(f.msg_type, 0x0101);
                assert_eq!(f.payload.len(), *len);
                assert!(
                    f.payload == pattern(peer_seed + i as u32, *len),
                    "frame {i}"
                );
            }
            sender.join().unwrap()
        })
    };
    let a = run(client, 0);
    let b = run(server, 1000);
    let (_ta, _tb) = (a.join().unwrap(), b.join().unwrap());
}

#[test]
fn connect_without_a_name_returns_the_authenticated_node() {
    let t = cluster(&["node-a", "node-b"]);
    let (addr, h) = serve_one(tls_cfg(t.path(), "node-b"));
    let mut client = Link::connect(&addr, &tls_cfg(t.path(), "node-a"), "migrate").unwrap();
    let server = h.join().unwrap().unwrap();
    assert_eq!(client.peer().node_id, "node-b");
    server.send(0x0101, b"over tls").unwrap();
    assert_eq!(client.recv().unwrap().payload, b"over tls");
    // Clean close works through close_notify too.
    server.shutdown("done").unwrap();
    assert!(client.recv().unwrap_err().is_clean_close());
}

#[test]
fn wrong_name_is_refused_by_the_dialler() {
    let t = cluster(&["node-a", "node-b"]);
    let (addr, h) = serve_one(tls_cfg(t.path(), "node-b"));
    let e = Link::connect_to_node(&addr, "node-c", &tls_cfg(t.path(), "node-a"), "migrate")
        .unwrap_err();
    match cert_problem(&e) {
        Some(CertProblem::WrongName {
            expected,
            presented,
        }) => {
            assert_eq!(expected, "node-c");
            assert_eq!(presented, &["node-b".to_string()]);
        }
        _ => panic!("{e:?}"),
    }
    assert!(e.is_handshake_rejection());
    let se = h.join().unwrap().unwrap_err();
    assert!(refused_ours(&se), "{se:?}");
}

#[test]
fn a_node_id_its_certificate_does_not_name_is_refused_locally() {
    let t = cluster(&["node-a"]);
    let mut c = tls_cfg(t.path(), "node-a");
    c.node_id = "node-z".into();
    let e = c.validate().unwrap_err();
    assert!(
        e.to_string().contains("not a name in our certificate"),
        "{e}"
    );
}

#[test]
fn wrong_ca_is_refused_on_the_checking_side() {
    let t = cluster(&["node-a", "node-b"]);
    let other = cluster(&["node-x"]);
    // A server from another CA: the client refuses it.
    let (addr, h) = serve_one(tls_cfg_ca(other.path(), "node-x", t.path()));
    let e = Link::connect(&addr, &tls_cfg(t.path(), "node-a"), "migrate").unwrap_err();
    assert_eq!(cert_problem(&e), Some(&CertProblem::UnknownCa), "{e:?}");
    let se = h.join().unwrap().unwrap_err();
    assert!(refused_ours(&se), "{se:?}");
    // A client from another CA: the server refuses it.
    let (addr, h) = serve_one(tls_cfg(t.path(), "node-b"));
    let e = Link::connect(
        &addr,
        &tls_cfg_ca(other.path(), "node-x", t.path()),
        "migrate",
    )
    .unwrap_err();
    let se = h.join().unwrap().unwrap_err();
    assert_eq!(cert_problem(&se), Some(&CertProblem::UnknownCa), "{se:?}");
    assert!(refused_ours(&e), "{e:?}");
}

#[test]
fn expired_certificates_are_refused_on_the_checking_side() {
    let t = cluster(&["node-a", "node-b"]);
    let long_ago = SystemTime::now() - Duration::from_secs(40 * 86_400);
    let expired = IssueOptions {
        validity: Validity {
            not_before: long_ago,
            not_after: long_ago + Duration::from_secs(86_400),
        },
        qemu: None,
    };
    certs::issue(t.path(), "old-node", &expired).unwrap();
    let (addr, h) = serve_one(tls_cfg(t.path(), "old-node"));
    let e = Link::connect(&addr, &tls_cfg(t.path(), "node-a"), "migrate").unwrap_err();
    assert_eq!(cert_problem(&e), Some(&CertProblem::Expired), "{e:?}");
    assert!(format!("{:?}", anyhow_chain(&e)).contains("expired"));
    assert!(refused_ours(&h.join().unwrap().unwrap_err()));

    let (addr, h) = serve_one(tls_cfg(t.path(), "node-b"));
    let e = Link::connect(&addr, &tls_cfg(t.path(), "old-node"), "migrate").unwrap_err();
    let se = h.join().unwrap().unwrap_err();
    assert_eq!(cert_problem(&se), Some(&CertProblem::Expired), "{se:?}");
    assert!(refused_ours(&e), "{e:?}");
}

/// The error and its sources, as one string.
fn anyhow_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[test]
fn psk_and_tls_peers_refuse_each_other_clearly() {
    let t = cluster(&["node-a", "node-b"]);
    // A PSK peer dialling a TLS listener.
    let (addr, h) = serve_one(tls_cfg(t.path(), "node-b"));
    let started = Instant::now();
    let e = Link::connect(&addr, &common::cfg("psk-node", 0), "migrate").unwrap_err();
    let se = h.join().unwrap().unwrap_err();
    assert!(
        matches!(&se, PeerError::NotTls { hint, .. } if hint.contains("pre-shared")),
        "{se:?}"
    );
    assert!(se.to_string().contains("--peer-tls"), "{se}");
    assert!(
        matches!(
            e,
            PeerError::HandshakeClosed | PeerError::HandshakeIo { .. }
        ),
        "{e:?}"
    );
    // A TLS peer dialling a PSK listener.
    let (addr, h) = serve_one(common::cfg("psk-node", 0));
    let e = Link::connect(&addr, &tls_cfg(t.path(), "node-a"), "migrate").unwrap_err();
    let se = h.join().unwrap().unwrap_err();
    assert!(matches!(se, PeerError::PeerSpeaksTls), "{se:?}");
    assert!(se.to_string().contains("NOT encrypted"), "{se}");
    assert!(
        matches!(&e, PeerError::NotTls { .. } | PeerError::HandshakeClosed),
        "{e:?}"
    );
    assert!(
        started.elapsed() < HANDSHAKE,
        "refusals must not wait for a timeout"
    );
    // PSK configs say what they are.
    let psk = common::cfg("psk-node", 0);
    assert!(matches!(psk.auth, PeerAuth::Psk(_)));
    assert!(format!("{psk:?}").contains("NOT encrypted"));
}

/// A listener authenticating each connection on its own thread, sending
/// every link's peer node id down a channel.
fn acceptor(cfg: PeerConfig) -> (understudy_peer::Acceptor, mpsc::Receiver<String>) {
    let listener = PeerListener::bind("127.0.0.1:0", &cfg).unwrap();
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let acc = listener
        .spawn_acceptor(understudy_peer::DEFAULT_MAX_HANDSHAKES, move |link| {
            let _ = tx.lock().unwrap().send(link.peer().node_id.clone());
        })
        .unwrap();
    (acc, rx)
}

#[test]
fn bad_clients_are_dropped_while_a_real_peer_is_served() {
    let t = cluster(&["node-a", "node-b"]);
    let (acc, links) = acceptor(tls_cfg(t.path(), "node-b"));
    let addr = acc.local_addr().to_string();
    // Garbage.
    let mut garbage = TcpStream::connect(&addr).unwrap();
    garbage.write_all(&[0x42; 300]).unwrap();
    // A truncated ClientHello: a record header promising more than comes.
    let mut truncated = TcpStream::connect(&addr).unwrap();
    truncated
        .write_all(&[
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ])
        .unwrap();
    // A client that stalls after its ClientHello.
    let stalled = TcpStream::connect(&addr).unwrap();
    let start = Instant::now();
    let client = Link::connect(&addr, &tls_cfg(t.path(), "node-a"), "migrate").unwrap();
    assert_eq!(client.peer().node_id, "node-b");
    assert_eq!(
        links.recv_timeout(Duration::from_secs(5)).unwrap(),
        "node-a"
    );
    assert!(
        start.elapsed() < HANDSHAKE,
        "the real peer waited for bad ones"
    );
    // Every bad client is dropped within the handshake timeout.
    for (name, mut s) in [
        ("garbage", garbage),
        ("truncated", truncated),
        ("stalled", stalled),
    ] {
        s.set_read_timeout(Some(HANDSHAKE * 3)).unwrap();
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + HANDSHAKE * 3;
        loop {
            match std::io::Read::read(&mut s, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => assert!(Instant::now() < deadline, "{name} not dropped"),
            }
        }
        assert!(
            start.elapsed() < HANDSHAKE + Duration::from_secs(2),
            "{name} held for {:?}",
            start.elapsed()
        );
    }
}

#[test]
fn hundreds_of_idle_connections_do_not_stop_a_real_peer() {
    let t = cluster(&["node-a", "node-b"]);
    let mut cfg = tls_cfg(t.path(), "node-b");
    cfg.handshake_timeout = Duration::from_secs(20);
    let (acc, links) = acceptor(cfg);
    let addr = acc.local_addr().to_string();
    let idle: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    let start = Instant::now();
    let client = Link::connect(&addr, &tls_cfg(t.path(), "node-a"), "migrate").unwrap();
    assert_eq!(client.peer().node_id, "node-b");
    assert_eq!(
        links.recv_timeout(Duration::from_secs(10)).unwrap(),
        "node-a"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    drop(idle);
}

#[test]
fn connect_to_node_checks_the_hello_in_psk_mode_too() {
    let (addr, h) = serve_one(common::cfg("psk-b", 0));
    let e = Link::connect_to_node(&addr, "psk-c", &common::cfg("psk-a", 0), "migrate").unwrap_err();
    assert!(
        matches!(&e, PeerError::UnexpectedPeer { expected, got } if expected == "psk-c" && got == "psk-b"),
        "{e:?}"
    );
    // The listener is told why.
    let mut server = h.join().unwrap().unwrap();
    match server.recv().unwrap_err() {
        PeerError::Remote { message, .. } => assert!(message.contains("psk-c"), "{message}"),
        other => panic!("{other:?}"),
    }
    let (addr, h) = serve_one(common::cfg("psk-b", 0));
    let ok = Link::connect_to_node(&addr, "psk-b", &common::cfg("psk-a", 0), "migrate").unwrap();
    assert_eq!(ok.peer().node_id, "psk-b");
    h.join().unwrap().unwrap();
}
