//! Certificates made by `certs` verify, and wrong ones are refused with
//! their own error, in in-memory TLS 1.3 handshakes.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use understudy_tls::certs::{self, IssueOptions, QemuRole, Validity};
use understudy_tls::rustls::pki_types::ServerName;
use understudy_tls::rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};
use understudy_tls::{
    CertProblem, Identity, TlsError, check_peer_name, classify, client_config,
    client_config_any_node, load_ca, load_identity, server_config,
};

fn identity(dir: &Path, node: &str) -> Identity {
    load_identity(&certs::cert_path(dir, node), &certs::key_path(dir, node)).unwrap()
}

fn cluster(nodes: &[&str]) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    certs::init_ca(t.path()).unwrap();
    for n in nodes {
        certs::issue(t.path(), n, &IssueOptions::default()).unwrap();
    }
    t
}

/// Run a handshake in memory; each side's error, classified.
fn handshake(
    client: Arc<ClientConfig>,
    name: &str,
    server: Arc<ServerConfig>,
) -> (
    Result<ClientConnection, TlsError>,
    Result<ServerConnection, TlsError>,
) {
    let mut c =
        ClientConnection::new(client, ServerName::try_from(name.to_string()).unwrap()).unwrap();
    let mut s = ServerConnection::new(server).unwrap();
    let (mut c_err, mut s_err) = (None, None);
    for _ in 0..20 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() && s_err.is_none() {
            s.read_tls(&mut &buf[..]).unwrap();
            if let Err(e) = s.process_new_packets() {
                s_err = Some(classify(e, None));
            }
        }
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() && c_err.is_none() {
            c.read_tls(&mut &buf[..]).unwrap();
            if let Err(e) = c.process_new_packets() {
                c_err = Some(classify(e, Some(name)));
            }
        }
        if !c.is_handshaking() && !s.is_handshaking() {
            break;
        }
    }
    (c_err.map_or(Ok(c), Err), s_err.map_or(Ok(s), Err))
}

#[test]
fn a_chain_verifies_both_ways_and_names_are_checked() {
    let t = cluster(&["node-a", "node-b"]);
    let ca = load_ca(&t.path().join("ca.pem")).unwrap();
    let (a, b) = (identity(t.path(), "node-a"), identity(t.path(), "node-b"));
    assert_eq!(a.names(), vec!["node-a".to_string()]);
    let (c, s) = handshake(
        client_config(&ca, Some(&a)).unwrap(),
        "node-b",
        server_config(&b, Some(&ca)).unwrap(),
    );
    let (_c, s) = (c.unwrap(), s.unwrap());
    let chain = s.peer_certificates().unwrap();
    check_peer_name(chain, "node-a").unwrap();
    match check_peer_name(chain, "node-c").unwrap_err() {
        TlsError::PeerCertificate {
            problem:
                CertProblem::WrongName {
                    expected,
                    presented,
                },
        } => {
            assert_eq!(expected, "node-c");
            assert_eq!(presented, vec!["node-a".to_string()]);
        }
        e => panic!("{e}"),
    }
}

#[test]
fn wrong_name_is_refused_by_the_client_with_its_error() {
    let t = cluster(&["node-a", "node-b"]);
    let ca = load_ca(&t.path().join("ca.pem")).unwrap();
    let (a, b) = (identity(t.path(), "node-a"), identity(t.path(), "node-b"));
    let (c, s) = handshake(
        client_config(&ca, Some(&a)).unwrap(),
        "node-x",
        server_config(&b, Some(&ca)).unwrap(),
    );
    let e = c.unwrap_err();
    assert!(
        matches!(&e, TlsError::PeerCertificate { problem: CertProblem::WrongName { expected, .. } } if expected == "node-x"),
        "{e:?}"
    );
    assert!(e.to_string().contains("node-x"), "{e}");
    assert!(matches!(s.unwrap_err(), TlsError::PeerRefusedOurs { .. }));
    // Any-node mode accepts it and leaves the name to the caller.
    let (c, s) = handshake(
        client_config_any_node(&ca, Some(&a)).unwrap(),
        understudy_tls::PLACEHOLDER_SERVER_NAME,
        server_config(&b, Some(&ca)).unwrap(),
    );
    let c = c.unwrap();
    s.unwrap();
    check_peer_name(c.peer_certificates().unwrap(), "node-b").unwrap();
}

#[test]
fn wrong_ca_is_refused_on_both_sides() {
    let t = cluster(&["node-a"]);
    let other = cluster(&["node-b"]);
    let ca = load_ca(&t.path().join("ca.pem")).unwrap();
    let a = identity(t.path(), "node-a");
    let stranger = identity(other.path(), "node-b");
    // Server from another CA: the client refuses it.
    let (c, s) = handshake(
        client_config(&ca, Some(&a)).unwrap(),
        "node-b",
        server_config(&stranger, Some(&ca)).unwrap(),
    );
    let e = c.unwrap_err();
    assert!(
        matches!(
            &e,
            TlsError::PeerCertificate {
                problem: CertProblem::UnknownCa
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("not signed by our CA"), "{e}");
    let e = s.unwrap_err();
    assert!(matches!(e, TlsError::PeerRefusedOurs { .. }), "{e:?}");
    // Client from another CA: the server refuses it.
    let (c, s) = handshake(
        client_config_any_node(&ca, Some(&stranger)).unwrap(),
        understudy_tls::PLACEHOLDER_SERVER_NAME,
        server_config(&a, Some(&ca)).unwrap(),
    );
    let e = s.unwrap_err();
    assert!(
        matches!(
            &e,
            TlsError::PeerCertificate {
                problem: CertProblem::UnknownCa
            }
        ),
        "{e:?}"
    );
    assert!(matches!(c.unwrap_err(), TlsError::PeerRefusedOurs { .. }));
}

#[test]
fn expired_certificates_are_refused_on_both_sides() {
    let t = cluster(&["node-a"]);
    let long_ago = SystemTime::now() - Duration::from_secs(30 * 86_400);
    let expired = IssueOptions {
        validity: Validity {
            not_before: long_ago,
            not_after: long_ago + Duration::from_secs(86_400),
        },
        qemu: None,
    };
    certs::issue(t.path(), "old-node", &expired).unwrap();
    let ca = load_ca(&t.path().join("ca.pem")).unwrap();
    let (a, old) = (identity(t.path(), "node-a"), identity(t.path(), "old-node"));
    let (c, s) = handshake(
        client_config(&ca, Some(&a)).unwrap(),
        "old-node",
        server_config(&old, Some(&ca)).unwrap(),
    );
    let e = c.unwrap_err();
    assert!(
        matches!(
            &e,
            TlsError::PeerCertificate {
                problem: CertProblem::Expired
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("expired"), "{e}");
    assert!(matches!(s.unwrap_err(), TlsError::PeerRefusedOurs { .. }));
    let (c, s) = handshake(
        client_config(&ca, Some(&old)).unwrap(),
        "node-a",
        server_config(&a, Some(&ca)).unwrap(),
    );
    assert!(matches!(
        s.unwrap_err(),
        TlsError::PeerCertificate {
            problem: CertProblem::Expired
        }
    ));
    let e = c.unwrap_err();
    assert!(
        matches!(&e, TlsError::PeerRefusedOurs { alert } if alert.contains("Expired")),
        "{e:?}"
    );
}

#[test]
fn missing_and_mismatched_files_say_what_to_do() {
    let t = cluster(&["node-a", "node-b"]);
    let e = load_identity(&t.path().join("nope.pem"), &t.path().join("nope-key.pem")).unwrap_err();
    assert!(matches!(e, TlsError::Read { .. }));
    assert!(e.to_string().contains("understudy certs issue"), "{e}");
    std::fs::write(t.path().join("empty.pem"), "hello\n").unwrap();
    let e = load_ca(&t.path().join("empty.pem")).unwrap_err();
    assert!(matches!(e, TlsError::NoCertificate { .. }), "{e:?}");
    let e = load_identity(&t.path().join("node-a.pem"), &t.path().join("empty.pem")).unwrap_err();
    assert!(matches!(e, TlsError::NoKey { .. }), "{e:?}");
    let e = load_identity(
        &t.path().join("node-a.pem"),
        &t.path().join("node-b-key.pem"),
    )
    .unwrap_err();
    assert!(matches!(e, TlsError::BadKey { .. }), "{e:?}");
    let e = certs::init_ca(t.path()).unwrap_err();
    assert!(matches!(e, TlsError::CaExists { .. }), "{e:?}");
    let e = certs::issue(t.path(), "bad name", &IssueOptions::default()).unwrap_err();
    assert!(matches!(e, TlsError::BadName { .. }), "{e:?}");
}

#[test]
fn keys_are_owner_only_and_qemu_layout_is_written() {
    let t = cluster(&[]);
    let q = t.path().join("qemu");
    let opts = IssueOptions {
        qemu: Some((q.clone(), QemuRole::Server)),
        ..IssueOptions::default()
    };
    let files = certs::issue(t.path(), "nbd-host", &opts).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&files.key), 0o600);
    assert_eq!(mode(&t.path().join("ca-key.pem")), 0o600);
    for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
        assert!(q.join(f).exists(), "{f}");
    }
    assert_eq!(mode(&q.join("server-key.pem")), 0o600);
    load_identity(&q.join("server-cert.pem"), &q.join("server-key.pem")).unwrap();
    load_ca(&q.join("ca-cert.pem")).unwrap();
}
