//! NBD over TLS: real clients (qemu-io, qemu-img, nbdinfo, nbdcopy) over
//! `STARTTLS`, the refusals a plaintext or wrongly certified client gets,
//! and bad input during the TLS handshake. Certificates are made per test
//! with `understudy-tls` (a cluster CA, a `localhost` server certificate,
//! QEMU-layout client directories).
#![allow(clippy::unwrap_used)] // helpers outside #[test] functions

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use understudy_block::raw::RawDisk;
use understudy_nbd_proto::Request;
use understudy_nbd_proto::reply::{encode_option, parse_option_reply, parse_simple_reply};
use understudy_nbd_proto::wire::*;
use understudy_nbd_server::{Export, NbdTls, ServerConfig};
use understudy_tls::certs::{self, IssueOptions, QemuRole};
use understudy_tls::rustls::pki_types::ServerName;
use understudy_tls::rustls::{self, ClientConnection, StreamOwned};
use understudy_tls::{load_ca, load_identity};

/// A CA, a server identity for `localhost`, and client credential
/// directories in QEMU's layout (`ca-cert.pem`, `client-cert.pem`,
/// `client-key.pem`), which libnbd's `tls-certificates=` reads too.
struct Pki {
    dir: tempfile::TempDir,
    /// A client certified by the server's CA.
    client_dir: PathBuf,
    /// A client certified by an unrelated CA (trusting both CAs, so only
    /// the server can refuse it).
    rogue_dir: PathBuf,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        certs::init_ca(&ca).unwrap();
        certs::issue(&ca, "localhost", &IssueOptions::default()).unwrap();
        let client_dir = dir.path().join("client");
        let opts = IssueOptions {
            qemu: Some((client_dir.clone(), QemuRole::Client)),
            ..IssueOptions::default()
        };
        certs::issue(&ca, "client1", &opts).unwrap();

        let other = dir.path().join("other-ca");
        certs::init_ca(&other).unwrap();
        let rogue_dir = dir.path().join("rogue");
        let opts = IssueOptions {
            qemu: Some((rogue_dir.clone(), QemuRole::Client)),
            ..IssueOptions::default()
        };
        certs::issue(&other, "client1", &opts).unwrap();
        // The rogue client trusts both CAs (qemu checks its own certificate
        // against them too): only the server can refuse it.
        let bundle = std::fs::read_to_string(ca.join("ca.pem")).unwrap()
            + &std::fs::read_to_string(other.join("ca.pem")).unwrap();
        std::fs::write(rogue_dir.join("ca-cert.pem"), bundle).unwrap();
        Self {
            dir,
            client_dir,
            rogue_dir,
        }
    }

    fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    /// Server TLS settings; with `client_certs`, clients must present a
    /// certificate from the CA.
    fn server(&self, required: bool, client_certs: bool) -> NbdTls {
        let ca_dir = self.ca_dir();
        let id = load_identity(
            &certs::cert_path(&ca_dir, "localhost"),
            &certs::key_path(&ca_dir, "localhost"),
        )
        .unwrap();
        let ca = load_ca(&ca_dir.join("ca.pem")).unwrap();
        let config = understudy_tls::server_config(&id, client_certs.then_some(&ca)).unwrap();
        NbdTls { config, required }
    }

    /// An in-process rustls client config presenting `client1`.
    fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let ca_dir = self.ca_dir();
        let id = load_identity(
            &certs::cert_path(&ca_dir, "client1"),
            &certs::key_path(&ca_dir, "client1"),
        )
        .unwrap();
        let ca = load_ca(&ca_dir.join("ca.pem")).unwrap();
        understudy_tls::client_config(&ca, Some(&id)).unwrap()
    }
}

fn tls_server(pki: &Pki, required: bool, client_certs: bool) -> TestServer {
    TestServer::start(ServerConfig {
        tls: Some(pki.server(required, client_certs)),
        handshake_timeout: Duration::from_secs(2),
        ..ServerConfig::default()
    })
}

fn creds(dir: &Path) -> String {
    format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        dir.display()
    )
}

fn image_opts(ts: &TestServer, export: &str) -> String {
    format!(
        "driver=nbd,host=127.0.0.1,port={},export={export},tls-creds=tls0,tls-hostname=localhost",
        ts.port
    )
}

/// qemu-io over TLS; returns (success, stdout+stderr).
fn qemu_io_tls(ts: &TestServer, dir: &Path, export: &str, cmds: &[&str]) -> (bool, String) {
    let (c, o) = (creds(dir), image_opts(ts, export));
    let mut args = vec!["--object", &c, "--image-opts", &o];
    for cmd in cmds {
        args.push("-c");
        args.push(cmd);
    }
    let out = run("qemu-io", &args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && !text.contains("Failed"), text)
}

fn nbds_uri(ts: &TestServer, export: &str, dir: &Path) -> String {
    format!(
        "nbds://localhost:{}/{export}?tls-certificates={}",
        ts.port,
        dir.display()
    )
}

#[test]
fn qemu_io_writes_and_reads_over_tls() {
    let pki = Pki::new();
    let ts = tls_server(&pki, true, true);
    let (path, _) = ts.add_disk("d", 8 * MIB);
    let (ok, out) = qemu_io_tls(
        &ts,
        &pki.client_dir,
        "d",
        &[
            "write -P 0xab 0 64k",
            "write -P 0xcd 1M 2M",
            "read -P 0xab 0 64k",
            "read -P 0xcd 1M 2M",
            "aio_write -P 0x5a 4M 4k",
            "aio_write -P 0x5b 5M 1M",
            "aio_flush",
            "read -P 0x5a 4M 4k",
            "read -P 0x5b 5M 1M",
        ],
    );
    assert!(ok, "qemu-io over TLS failed:\n{out}");
    assert_qemu_io_clean(&out);
    assert_eq!(read_file_range(&path, 0, 65536), vec![0xab; 65536]);
    assert_eq!(read_file_range(&path, 3 * MIB - 1, 1), vec![0xcd]);
    assert_eq!(read_file_range(&path, 5 * MIB, 4096), vec![0x5b; 4096]);
    assert!(ts.server.stats().tls_sessions >= 1);
}

#[test]
fn qemu_img_info_and_convert_over_tls() {
    let pki = Pki::new();
    let ts = tls_server(&pki, true, true);
    let (_, disk) = ts.add_disk("d", 4 * MIB);
    write_pattern(&*disk, MIB, 300 * 1024, 3);
    let (c, o) = (creds(&pki.client_dir), image_opts(&ts, "d"));
    let info: Value = serde_json::from_str(&run_ok(
        "qemu-img",
        &["info", "--output=json", "--object", &c, "--image-opts", &o],
    ))
    .unwrap();
    assert_eq!(info["virtual-size"], 4 * MIB, "{info}");
    let copy = ts.dir.path().join("copy.raw");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "--object",
            &c,
            "--image-opts",
            &o,
            "-O",
            "raw",
            copy.to_str().unwrap(),
        ],
    );
    let src = ts.dir.path().join("d.raw");
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        std::fs::read(&src).unwrap(),
        "the copy over TLS differs from the export"
    );
}

#[test]
fn nbdinfo_and_nbdcopy_over_tls() {
    let pki = Pki::new();
    let ts = tls_server(&pki, true, true);
    let (_, disk) = ts.add_disk("d", 2 * MIB);
    write_pattern(&*disk, 0, 128 * 1024, 5);
    let uri = nbds_uri(&ts, "d", &pki.client_dir);
    let info: Value = serde_json::from_str(&run_ok("nbdinfo", &["--json", &uri])).unwrap();
    assert_eq!(info["exports"][0]["export-size"], 2 * MIB, "{info}");
    assert_eq!(info["TLS"], true, "{info}");
    let copy = ts.dir.path().join("copy.raw");
    run_ok("nbdcopy", &[&uri, copy.to_str().unwrap()]);
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        std::fs::read(ts.dir.path().join("d.raw")).unwrap()
    );
    // And back: nbdcopy writes over TLS.
    let (_, _) = ts.add_disk("e", 2 * MIB);
    run_ok(
        "nbdcopy",
        &[copy.to_str().unwrap(), &nbds_uri(&ts, "e", &pki.client_dir)],
    );
    assert_eq!(
        std::fs::read(ts.dir.path().join("e.raw")).unwrap(),
        std::fs::read(&copy).unwrap()
    );
}

#[test]
fn allowed_mode_serves_plaintext_and_tls_clients() {
    let pki = Pki::new();
    let ts = tls_server(&pki, false, false);
    ts.add_disk("d", MIB);
    let out = qemu_io(&ts.uri("d"), &["write -P 0x42 0 4k", "read -P 0x42 0 4k"]);
    assert_qemu_io_clean(&out);
    let (ok, out) = qemu_io_tls(&ts, &pki.client_dir, "d", &["read -P 0x42 0 4k"]);
    assert!(ok, "{out}");
    assert_eq!(ts.server.stats().tls_sessions, 1);
}

#[test]
fn plaintext_clients_are_refused_with_tls_reqd() {
    let pki = Pki::new();
    let ts = tls_server(&pki, true, false);
    let (path, _) = ts.add_disk("d", MIB);
    // Raw: every option gets ERR_TLS_REQD, naming no export.
    let mut c = RawClient::connect(&ts.addr());
    c.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    let go = {
        let mut d = 1u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"d");
        d.extend_from_slice(&0u16.to_be_bytes());
        d
    };
    for (opt, data) in [
        (OPT_LIST, Vec::new()),
        (OPT_INFO, go.clone()),
        (OPT_GO, go.clone()),
        (OPT_STRUCTURED_REPLY, Vec::new()),
    ] {
        c.send(&encode_option(opt, &data));
        let (o, typ, msg) = c.option_reply();
        assert_eq!((o, typ), (opt, REP_ERR_TLS_REQD), "option {opt}");
        assert!(String::from_utf8_lossy(&msg).contains("TLS"));
    }
    c.send(&encode_option(OPT_ABORT, &[]));
    assert_eq!(c.option_reply().1, REP_ACK);

    // Real clients fail and say why; nothing reaches the disk.
    let bad = run("qemu-io", &["-f", "raw", "-c", "write 0 4k", &ts.uri("d")]);
    let text = String::from_utf8_lossy(&bad.stderr).to_lowercase()
        + &String::from_utf8_lossy(&bad.stdout).to_lowercase();
    assert!(text.contains("tls"), "qemu-io did not report TLS: {text}");
    let bad = run("nbdinfo", &[&ts.uri("d")]);
    assert!(!bad.status.success());
    assert_eq!(read_file_range(&path, 0, 4096), vec![0; 4096]);
    assert_eq!(ts.server.stats().writes, 0);
}

#[test]
fn downgrade_with_export_name_never_reaches_data() {
    let pki = Pki::new();
    let ts = tls_server(&pki, true, false);
    ts.add_disk("d", MIB);
    for flags in [FLAG_C_FIXED_NEWSTYLE, 0] {
        let mut c = RawClient::connect(&ts.addr());
        c.send(&flags.to_be_bytes());
        c.send(&encode_option(OPT_EXPORT_NAME, b"d"));
        // A pipelined write right behind it must not land either.
        let w = Request {
            flags: 0,
            command: CMD_WRITE,
            cookie: 1,
            offset: 0,
            length: 512,
        };
        let _ = c.s.write_all(&w.encode());
        let _ = c.s.write_all(&[0xee; 512]);
        let mut got = Vec::new();
        let _ = c.s.read_to_end(&mut got);
        assert!(
            got.is_empty(),
            "server answered a plaintext EXPORT_NAME: {got:?}"
        );
    }
    assert_eq!(ts.server.stats().writes, 0);
    assert_eq!(
        read_file_range(&ts.dir.path().join("d.raw"), 0, 512),
        vec![0; 512]
    );
}

#[test]
fn client_certificate_from_another_ca_is_refused() {
    let pki = Pki::new();
    let ts = tls_server(&pki, true, true);
    let (path, _) = ts.add_disk("d", MIB);
    let (ok, out) = qemu_io_tls(&ts, &pki.rogue_dir, "d", &["write -P 1 0 4k"]);
    assert!(!ok, "a client of another CA got in:\n{out}");
    assert!(
        !out.contains("failed validation"),
        "qemu refused its own certificate; the server was not tested:\n{out}"
    );
    let bad = run("nbdinfo", &[&nbds_uri(&ts, "d", &pki.rogue_dir)]);
    assert!(!bad.status.success());
    // No certificate at all.
    let bare = ts.dir.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    std::fs::copy(pki.client_dir.join("ca-cert.pem"), bare.join("ca-cert.pem")).unwrap();
    let bad = run("nbdinfo", &[&nbds_uri(&ts, "d", &bare)]);
    assert!(!bad.status.success());
    assert_eq!(read_file_range(&path, 0, 4096), vec![0; 4096]);
    assert!(ts.server.stats().handshakes_failed >= 3);
    // The right client still gets in.
    let (ok, out) = qemu_io_tls(&ts, &pki.client_dir, "d", &["write -P 1 0 4k"]);
    assert!(ok, "{out}");
}

/// A raw client that negotiates STARTTLS and then speaks NBD through
/// rustls.
struct TlsClient {
    s: StreamOwned<ClientConnection, TcpStream>,
}

impl TlsClient {
    /// Greeting, flags, STARTTLS (ACK), TLS handshake.
    fn connect(addr: &str, config: Arc<rustls::ClientConfig>) -> Self {
        let mut c = RawClient::connect(addr);
        c.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        c.send(&encode_option(OPT_STARTTLS, &[]));
        assert_eq!(c.option_reply().1, REP_ACK);
        let name = ServerName::try_from("localhost").unwrap();
        let conn = ClientConnection::new(config, name).unwrap();
        let mut s = StreamOwned::new(conn, c.s);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock).unwrap();
        }
        Self { s }
    }

    fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }

    fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.read_n(20);
        let h = parse_option_reply(h[..].try_into().unwrap()).unwrap();
        let d = self.read_n(h.length as usize);
        (h.option, h.typ, d)
    }

    fn go(&mut self, export: &str) {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.s.write_all(&encode_option(OPT_GO, &d)).unwrap();
        loop {
            match self.option_reply() {
                (_, REP_INFO, _) => {}
                (_, REP_ACK, _) => break,
                (_, t, m) => panic!("GO over TLS failed: {t:#x} {}", String::from_utf8_lossy(&m)),
            }
        }
    }
}

#[test]
fn pipelined_requests_over_tls_keep_their_data() {
    let pki = Pki::new();
    let ts = tls_server(&pki, true, true);
    ts.add_disk("d", 64 * MIB);
    let mut c = TlsClient::connect(&ts.addr(), pki.client_config());
    // A second STARTTLS over TLS is invalid.
    c.s.write_all(&encode_option(OPT_STARTTLS, &[])).unwrap();
    assert_eq!(c.option_reply().1, REP_ERR_INVALID);
    c.go("d");
    // Writes of mixed sizes, all in flight at once, then reads of the same.
    let sizes = [4096u32, 1 << 20, 512, 300 * 1024, 4 << 20, 65536];
    let mut wire = Vec::new();
    for (i, &len) in sizes.iter().cycle().take(24).enumerate() {
        let req = Request {
            flags: 0,
            command: CMD_WRITE,
            cookie: i as u64,
            offset: i as u64 * (2 << 20),
            length: len.min(2 << 20),
        };
        wire.extend_from_slice(&req.encode());
        wire.extend(std::iter::repeat_n(i as u8 + 1, req.length as usize));
    }
    c.s.write_all(&wire).unwrap();
    let mut done = [false; 24];
    for _ in 0..24 {
        let (err, cookie) = parse_simple_reply(c.read_n(16)[..].try_into().unwrap()).unwrap();
        assert_eq!(err, 0);
        assert!(!std::mem::replace(&mut done[cookie as usize], true));
    }
    let mut wire = Vec::new();
    for (i, &len) in sizes.iter().cycle().take(24).enumerate() {
        let req = Request {
            flags: 0,
            command: CMD_READ,
            cookie: i as u64,
            offset: i as u64 * (2 << 20),
            length: len.min(2 << 20),
        };
        wire.extend_from_slice(&req.encode());
    }
    c.s.write_all(&wire).unwrap();
    for _ in 0..24 {
        let (err, cookie) = parse_simple_reply(c.read_n(16)[..].try_into().unwrap()).unwrap();
        assert_eq!(err, 0);
        let len = sizes[cookie as usize % sizes.len()].min(2 << 20) as usize;
        let data = c.read_n(len);
        assert!(
            data.iter().all(|&b| b == cookie as u8 + 1),
            "read {cookie} returned another request's data"
        );
    }
    let disc = Request {
        flags: 0,
        command: CMD_DISC,
        cookie: 99,
        offset: 0,
        length: 0,
    };
    c.s.write_all(&disc.encode()).unwrap();
    // The server ends the TLS session cleanly (close_notify), then closes.
    let mut rest = Vec::new();
    let r = c.s.read_to_end(&mut rest);
    assert!(r.is_ok(), "no clean TLS close: {r:?}");
    assert!(rest.is_empty());
}

/// Bytes of a real ClientHello, for truncation tests.
fn client_hello(pki: &Pki) -> Vec<u8> {
    let name = ServerName::try_from("localhost").unwrap();
    let mut conn = ClientConnection::new(pki.client_config(), name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

/// Greeting, flags and an acknowledged STARTTLS on a raw socket.
fn starttls_raw(ts: &TestServer) -> RawClient {
    let mut c = RawClient::connect(&ts.addr());
    c.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    c.send(&encode_option(OPT_STARTTLS, &[]));
    assert_eq!(c.option_reply().1, REP_ACK);
    c
}

#[test]
fn garbage_truncated_and_stalled_tls_handshakes_are_dropped() {
    let pki = Pki::new();
    let ts = tls_server(&pki, true, true);
    ts.add_disk("d", MIB);
    let hello = client_hello(&pki);
    assert!(hello.len() > 100);

    // Garbage instead of a ClientHello: an alert at most, then close.
    let mut c = starttls_raw(&ts);
    c.send(&[0x42; 3000]);
    let mut got = Vec::new();
    let _ = c.s.read_to_end(&mut got);
    assert!(got.len() < 64, "answered garbage with {} bytes", got.len());

    // A record header announcing a huge record: refused, not allocated.
    let mut c = starttls_raw(&ts);
    c.send(&[0x16, 0x03, 0x01, 0xff, 0xff]);
    let _ = c.s.write_all(&[0; 1024]);
    let mut got = Vec::new();
    let _ = c.s.read_to_end(&mut got);
    assert!(
        got.len() < 64,
        "answered an oversized record with {} bytes",
        got.len()
    );

    // A ClientHello sent before the ACK arrived (pipelined) still works.
    let mut c = RawClient::connect(&ts.addr());
    let mut wire = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    wire.extend(encode_option(OPT_STARTTLS, &[]));
    wire.extend_from_slice(&hello);
    c.send(&wire);
    assert_eq!(c.option_reply().1, REP_ACK);
    let mut first = [0u8; 1];
    c.s.read_exact(&mut first).unwrap();
    assert_eq!(first[0], 0x16, "the server answered the early ClientHello");

    // Truncated ClientHellos, then the client goes away or stalls.
    for cut in [1, 5, hello.len() / 2, hello.len() - 1] {
        let mut c = starttls_raw(&ts);
        c.send(&hello[..cut]);
        drop(c);
    }
    // Measured from before the connect: the server's deadline starts later.
    let start = Instant::now();
    let mut stalled = starttls_raw(&ts);
    stalled.send(&hello[..hello.len() / 2]);
    stalled
        .s
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(stalled.closed(), "a stalled TLS handshake was not dropped");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(8),
        "dropped after {waited:?}, expected about the 2 s handshake timeout"
    );

    // Others are still served.
    let (ok, out) = qemu_io_tls(&ts, &pki.client_dir, "d", &["read -P 0 0 4k"]);
    assert!(ok, "{out}");
    assert!(ts.server.stats().handshakes_failed >= 6);
}

#[test]
fn idle_tls_connections_do_not_starve_others() {
    let pki = Pki::new();
    let ts = TestServer::start(ServerConfig {
        tls: Some(pki.server(true, true)),
        ..ServerConfig::default()
    });
    ts.add_disk("d", MIB);
    let config = pki.client_config();
    // 200 clients that finished TLS and then sit in option haggling, and
    // 50 that stopped halfway through their ClientHello.
    let idle: Vec<TlsClient> = (0..200)
        .map(|_| TlsClient::connect(&ts.addr(), config.clone()))
        .collect();
    let hello = client_hello(&pki);
    let stalled: Vec<RawClient> = (0..50)
        .map(|_| {
            let mut c = starttls_raw(&ts);
            c.send(&hello[..hello.len() / 2]);
            c
        })
        .collect();
    let start = Instant::now();
    let (ok, out) = qemu_io_tls(
        &ts,
        &pki.client_dir,
        "d",
        &["write -P 7 0 64k", "read -P 7 0 64k"],
    );
    assert!(ok, "{out}");
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "served only after {:?}",
        start.elapsed()
    );
    let mut c = TlsClient::connect(&ts.addr(), config);
    c.go("d");
    assert!(ts.server.stats().tls_sessions >= 202);
    drop((idle, stalled));
}

#[test]
fn trickling_options_over_tls_do_not_outlive_the_handshake_timeout() {
    let pki = Pki::new();
    let ts = tls_server(&pki, true, true);
    ts.add_disk("d", MIB);
    let mut c = TlsClient::connect(&ts.addr(), pki.client_config());
    // One option, sealed, then sent a byte at a time: no record ever
    // completes before the 2 s deadline.
    c.s.conn
        .writer()
        .write_all(&encode_option(OPT_LIST, &[]))
        .unwrap();
    let mut sealed = Vec::new();
    while c.s.conn.wants_write() {
        c.s.conn.write_tls(&mut sealed).unwrap();
    }
    let start = Instant::now();
    let mut cut = false;
    for b in sealed {
        if c.s.sock.write_all(&[b]).is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let waited = start.elapsed();
    assert!(cut, "the trickling client was never cut off");
    assert!(
        waited < Duration::from_secs(6),
        "cut off only after {waited:?}"
    );
}

#[test]
fn tls_over_unix_sockets() {
    let pki = Pki::new();
    let ts = tls_server(&pki, true, true);
    let (path, _) = ts.add_disk("d", MIB);
    let c = creds(&pki.client_dir);
    let o = format!(
        "driver=nbd,server.type=unix,server.path={},export=d,tls-creds=tls0,tls-hostname=localhost",
        ts.sock.display()
    );
    let out = run_ok(
        "qemu-io",
        &[
            "--object",
            &c,
            "--image-opts",
            &o,
            "-c",
            "write -P 0x3c 0 8k",
        ],
    );
    assert_qemu_io_clean(&out);
    assert_eq!(read_file_range(&path, 0, 8192), vec![0x3c; 8192]);
    let uri = format!(
        "nbds+unix:///d?socket={}&tls-certificates={}",
        ts.sock.display(),
        pki.client_dir.display()
    );
    let info: Value = serde_json::from_str(&run_ok("nbdinfo", &["--json", &uri])).unwrap();
    assert_eq!(info["exports"][0]["export-size"], MIB, "{info}");
    assert_eq!(ts.server.stats().tls_sessions, 2);
}

#[test]
fn tls_only_export_next_to_a_plaintext_one() {
    let pki = Pki::new();
    let ts = tls_server(&pki, false, true);
    ts.add_disk("open", MIB);
    let secret_path = ts.dir.path().join("secret.raw");
    let disk = Arc::new(RawDisk::create(&secret_path, MIB).unwrap());
    ts.server
        .exports()
        .insert(Export::new("secret", disk).with_tls_required(true));

    // Plaintext: the open export works, the TLS-only one is neither
    // listed nor served.
    assert_qemu_io_clean(&qemu_io(&ts.uri("open"), &["write -P 1 0 4k"]));
    let bad = run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 2 0 4k", &ts.uri("secret")],
    );
    let text = String::from_utf8_lossy(&bad.stderr).to_lowercase()
        + &String::from_utf8_lossy(&bad.stdout).to_lowercase();
    assert!(text.contains("tls"), "qemu-io did not report TLS: {text}");
    let list: Value =
        serde_json::from_str(&run_ok("nbdinfo", &["--list", "--json", &ts.uri("")])).unwrap();
    let names: Vec<&str> = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["open"], "{list}");
    assert_eq!(read_file_range(&secret_path, 0, 4096), vec![0; 4096]);

    // Over TLS both are listed and the TLS-only one is served.
    let (ok, out) = qemu_io_tls(&ts, &pki.client_dir, "secret", &["write -P 2 0 4k"]);
    assert!(ok, "{out}");
    assert_eq!(read_file_range(&secret_path, 0, 4096), vec![2; 4096]);
    let uri = format!(
        "nbds://localhost:{}/?tls-certificates={}",
        ts.port,
        pki.client_dir.display()
    );
    let list: Value =
        serde_json::from_str(&run_ok("nbdinfo", &["--list", "--json", &uri])).unwrap();
    assert_eq!(list["exports"].as_array().unwrap().len(), 2, "{list}");
}
