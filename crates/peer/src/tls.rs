//! The TLS 1.3 transport of a link: mutual certificate authentication,
//! then the usual hello exchange inside the encrypted channel.
//!
//! A link is used by two threads at once (a sender and a receiver), but a
//! rustls connection is one object. [`TlsStream`] shares it behind a mutex
//! that is held only for in-memory work (encrypting a chunk, decrypting
//! what was read); socket I/O happens outside it:
//!
//! * the reader reads raw bytes from its own socket handle without any
//!   lock, then locks to decrypt them;
//! * a writer takes the send lock (which orders records on the wire), locks
//!   the connection to encrypt at most [`WRITE_CHUNK`] bytes, unlocks, and
//!   writes the records to the socket still holding the send lock;
//! * post-handshake output the reader causes (a TLS 1.3 key update answer,
//!   an alert) is queued inside the connection and goes out with the next
//!   write; the reader also flushes it itself when no write is in progress
//!   (`try_lock`, so the reader never waits for a blocked writer). The
//!   link's keepalive bounds how long it can wait. Session tickets are
//!   disabled on the server, so nothing else arrives after the handshake.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use understudy_tls::rustls::pki_types::{CertificateDer, ServerName};
use understudy_tls::rustls::{
    ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection,
};
use understudy_tls::{Ca, Identity, TlsError};

use crate::error::PeerError;
use crate::handshake::Role;
use crate::stream::{Stream, is_timeout};

/// Plaintext encrypted per lock hold: bounds the sender's buffer and how
/// long the receiver may wait for the lock (AES-GCM does 1 MiB in a few
/// hundred microseconds). Large enough that a 1 MiB frame costs one lock
/// hold and one write system call, which matters for the copy rate.
pub(crate) const WRITE_CHUNK: usize = 1024 * 1024;
/// Raw bytes read from the socket per call: as large as a bulk frame, so
/// the receiver makes few system calls and wake-ups per frame (256 KiB
/// cost about 15% more CPU per byte on loopback). The receiver decrypts
/// at most this much per lock hold, as a writer encrypts [`WRITE_CHUNK`].
const RAW_READ: usize = 1024 * 1024;
/// Label of the keying material the hello exchange runs on (RFC 8446
/// exporter): the key proofs then bind the hellos to this TLS session.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-understudy-peer-link-v1";

/// This node's certificate and the cluster CA, with the rustls
/// configurations built from them.
#[derive(Clone)]
pub struct TlsPeer {
    identity: Identity,
    ca: Ca,
    server: Arc<ServerConfig>,
    client_expected: Arc<ClientConfig>,
    client_any: Arc<ClientConfig>,
}

impl fmt::Debug for TlsPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsPeer")
            .field("identity", &self.identity)
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

impl TlsPeer {
    /// Build the configurations: TLS 1.3 only, client certificates required
    /// and checked against `ca`.
    pub fn new(identity: Identity, ca: Ca) -> Result<TlsPeer, PeerError> {
        let setup = |e| PeerError::TlsSetup {
            source: Box::new(e),
        };
        let server = understudy_tls::server_config(&identity, Some(&ca)).map_err(setup)?;
        let client_expected = understudy_tls::client_config(&ca, Some(&identity)).map_err(setup)?;
        let client_any =
            understudy_tls::client_config_any_node(&ca, Some(&identity)).map_err(setup)?;
        Ok(TlsPeer {
            identity,
            ca,
            server,
            client_expected,
            client_any,
        })
    }

    /// Load this node's certificate (`NODE.pem`), key (`NODE-key.pem`) and
    /// the cluster CA (`ca.pem`).
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<TlsPeer, PeerError> {
        let setup = |e| PeerError::TlsSetup {
            source: Box::new(e),
        };
        let identity = understudy_tls::load_identity(cert, key).map_err(setup)?;
        let ca = understudy_tls::load_ca(ca).map_err(setup)?;
        TlsPeer::new(identity, ca)
    }

    /// This node's certificate and key.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The CA peers must chain to.
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// The names in our certificate.
    pub fn names(&self) -> Vec<String> {
        self.identity.names()
    }

    /// The first name in our certificate: our node id.
    pub fn node_name(&self) -> Option<String> {
        self.names().into_iter().next()
    }
}

/// What a finished TLS handshake hands to the hello exchange.
pub(crate) struct Established {
    pub(crate) stream: TlsStream,
    /// The peer's verified chain, end-entity first.
    pub(crate) chain: Vec<CertificateDer<'static>>,
    /// Keying material exported from the session.
    pub(crate) secret: [u8; 32],
}

/// Run the TLS handshake over `io` before `deadline`. The initiator checks
/// that the server's certificate names `expected` (any node from the CA
/// when `None`; the caller checks the name against the hello then).
pub(crate) fn handshake(
    mut io: Box<dyn Stream>,
    tls: &TlsPeer,
    role: Role,
    expected: Option<&str>,
    deadline: Instant,
    timeout: Duration,
) -> Result<Established, PeerError> {
    let mut conn: Connection = match role {
        Role::Initiator => {
            let (cfg, name) = match expected {
                Some(n) => (&tls.client_expected, n),
                None => (&tls.client_any, understudy_tls::PLACEHOLDER_SERVER_NAME),
            };
            let name = ServerName::try_from(name.to_string()).map_err(|_| PeerError::Config {
                reason: format!("{name:?} is not a node name (a DNS name) a certificate can carry"),
            })?;
            ClientConnection::new(Arc::clone(cfg), name)
                .map_err(|e| tls_err(e, expected))?
                .into()
        }
        Role::Responder => ServerConnection::new(Arc::clone(&tls.server))
            .map_err(|e| tls_err(e, expected))?
            .into(),
    };
    drive(&mut conn, &mut io, deadline, timeout, expected)?;
    let chain = conn
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect::<Vec<_>>())
        .filter(|c| !c.is_empty())
        .ok_or_else(|| PeerError::Tls {
            source: Box::new(TlsError::NoPeerCertificate),
        })?;
    let secret = conn
        .export_keying_material([0u8; 32], EXPORTER_LABEL, None)
        .map_err(|e| tls_err(e, expected))?;
    // Large frames are encrypted in WRITE_CHUNK pieces; the default 64 KiB
    // limit on queued records would refuse part of a chunk.
    conn.set_buffer_limit(None);
    Ok(Established {
        stream: TlsStream::new(conn, io),
        chain,
        secret,
    })
}

fn tls_err(e: understudy_tls::rustls::Error, expected: Option<&str>) -> PeerError {
    PeerError::Tls {
        source: Box::new(understudy_tls::classify(e, expected)),
    }
}

/// Move handshake records until the handshake is done, fails, or the
/// deadline passes (renewed before every read, so a peer trickling bytes
/// cannot outlast it).
fn drive(
    conn: &mut Connection,
    io: &mut Box<dyn Stream>,
    deadline: Instant,
    timeout: Duration,
    expected: Option<&str>,
) -> Result<(), PeerError> {
    let timed_out = || PeerError::HandshakeTimeout { after: timeout };
    let remaining = || {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(timed_out())
        } else {
            Ok(left)
        }
    };
    let io_err = |e: io::Error| {
        if is_timeout(&e) {
            timed_out()
        } else if matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
        ) {
            PeerError::HandshakeClosed
        } else {
            PeerError::HandshakeIo { source: e }
        }
    };
    let socket_err = |source| PeerError::Socket { source };
    let mut first = true;
    loop {
        while conn.wants_write() {
            io.set_write_timeout(Some(remaining()?))
                .map_err(socket_err)?;
            conn.write_tls(io).map_err(io_err)?;
        }
        if !conn.is_handshaking() {
            return Ok(());
        }
        io.set_read_timeout(Some(remaining()?))
            .map_err(socket_err)?;
        if first {
            // Look at the first bytes ourselves, to tell a pre-shared-key
            // peer (or anything else) from a TLS one.
            let head = read_head(io, &remaining, &io_err)?;
            check_head(&head)?;
            conn.read_tls(&mut &head[..]).map_err(io_err)?;
            first = false;
        } else if conn.read_tls(io).map_err(io_err)? == 0 {
            return Err(PeerError::HandshakeClosed);
        }
        if let Err(e) = conn.process_new_packets() {
            say_why(conn, io);
            return Err(tls_err(e, expected));
        }
    }
}

/// Send the alert rustls queued, so the peer learns why (best effort),
/// then read and drop what it already sent for a moment: closing a socket
/// with unread data makes the kernel send a reset, which can destroy the
/// alert before the peer reads it.
fn say_why(conn: &mut Connection, io: &mut Box<dyn Stream>) {
    let _ = io.set_write_timeout(Some(LINGER));
    while conn.wants_write() {
        if conn.write_tls(io).is_err() {
            return;
        }
    }
    let _ = io.shutdown(Shutdown::Write);
    let _ = io.set_read_timeout(Some(LINGER));
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        if !matches!(io.read(&mut sink), Ok(n) if n > 0) {
            return;
        }
    }
}

/// How long [`say_why`] waits on the peer: short, so a refused client
/// cannot hold the accepting thread.
const LINGER: Duration = Duration::from_millis(200);

/// The first three bytes (a TLS record header starts with content type
/// and major version), each read under the deadline.
fn read_head(
    io: &mut Box<dyn Stream>,
    remaining: &dyn Fn() -> Result<Duration, PeerError>,
    io_err: &dyn Fn(io::Error) -> PeerError,
) -> Result<[u8; 3], PeerError> {
    let mut head = [0u8; 3];
    let mut got = 0;
    while got < head.len() {
        io.set_read_timeout(Some(remaining()?))
            .map_err(|source| PeerError::Socket { source })?;
        match io.read(&mut head[got..]) {
            Ok(0) => return Err(PeerError::HandshakeClosed),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(e)),
        }
    }
    Ok(head)
}

fn check_head(head: &[u8; 3]) -> Result<(), PeerError> {
    // Handshake (0x16) or alert (0x15) record, protocol major version 3.
    if matches!(head[0], 0x15 | 0x16) && head[1] == 0x03 {
        return Ok(());
    }
    let hint = if head[..] == crate::wire::MAGIC[..3] {
        ": the pre-shared-key link's hello"
    } else {
        ""
    };
    Err(PeerError::NotTls {
        got: head.to_vec(),
        hint,
    })
}

/// One connection's rustls state, shared by the handles of a link.
struct Shared {
    conn: Mutex<Connection>,
    /// Held while records are written, so they reach the socket in the
    /// order they were made.
    send: Mutex<()>,
}

/// A handle to a TLS connection; see the module documentation for how two
/// threads share it.
pub(crate) struct TlsStream {
    shared: Arc<Shared>,
    io: Box<dyn Stream>,
    /// Raw bytes read but not yet handed to rustls: `raw[start..end]`.
    raw: Vec<u8>,
    start: usize,
    end: usize,
    /// Reused buffer for records on their way out.
    out: Vec<u8>,
}

impl fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsStream")
            .field("io", &self.io)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> io::Result<MutexGuard<'_, T>> {
    // A panic mid-record leaves the stream unusable.
    m.lock()
        .map_err(|_| io::Error::other("TLS connection state poisoned by a panic"))
}

/// Move every queued record into `out`.
fn drain(conn: &mut Connection, out: &mut Vec<u8>) -> io::Result<()> {
    while conn.wants_write() {
        conn.write_tls(out)?;
    }
    Ok(())
}

impl TlsStream {
    fn new(conn: Connection, io: Box<dyn Stream>) -> TlsStream {
        TlsStream::handle(
            Arc::new(Shared {
                conn: Mutex::new(conn),
                send: Mutex::new(()),
            }),
            io,
        )
    }

    fn handle(shared: Arc<Shared>, io: Box<dyn Stream>) -> TlsStream {
        TlsStream {
            shared,
            io,
            raw: Vec::new(),
            start: 0,
            end: 0,
            out: Vec::new(),
        }
    }

    /// Write what rustls queued on its own (key update answers, alerts,
    /// close_notify) unless a writer is busy: it will send them.
    fn flush_queued(&mut self) -> io::Result<()> {
        let Ok(_order) = self.shared.send.try_lock() else {
            return Ok(());
        };
        self.out.clear();
        drain(&mut *lock(&self.shared.conn)?, &mut self.out)?;
        self.io.write_all(&self.out)
    }
}

impl TlsStream {
    /// Under one hold of the lock, hand out plaintext, feeding buffered
    /// raw bytes to rustls as needed, until `buf` is full or the raw bytes
    /// are used up. Returns what to return from `read` (if anything: 0 is
    /// the peer's close_notify) and whether rustls has output queued.
    fn decrypt_into(&mut self, buf: &mut [u8]) -> io::Result<(Option<usize>, bool)> {
        let mut conn = lock(&self.shared.conn)?;
        let mut filled = 0;
        loop {
            match conn.reader().read(&mut buf[filled..]) {
                Ok(0) if filled == 0 => return Ok((Some(0), conn.wants_write())),
                Ok(0) => break,
                Ok(n) => {
                    filled += n;
                    if filled == buf.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) if filled > 0 => break,
                Err(e) => return Err(e),
            }
            if self.start == self.end {
                break;
            }
            // The plaintext buffer is empty here (the read above drained
            // it into `buf`), so rustls takes more.
            let mut pending = &self.raw[self.start..self.end];
            self.start += conn.read_tls(&mut pending)?;
            if let Err(e) = conn.process_new_packets() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    understudy_tls::classify(e, None),
                ));
            }
        }
        Ok(((filled > 0).then_some(filled), conn.wants_write()))
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let (got, queued) = self.decrypt_into(buf)?;
            if queued {
                self.flush_queued()?;
            }
            if let Some(n) = got {
                return Ok(n);
            }
            // Nothing buffered: wait for the network, holding no lock.
            self.raw.resize(RAW_READ, 0);
            let n = self.io.read(&mut self.raw)?;
            if n == 0 {
                // The frame layer tells a clean end (between frames) from a
                // truncated one.
                return Ok(0);
            }
            (self.start, self.end) = (0, n);
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // Up to WRITE_CHUNK bytes of the given slices, so one frame's
        // header, payload and MAC share records and system calls.
        let mut budget = WRITE_CHUNK;
        let mut chunk = Vec::with_capacity(bufs.len());
        for b in bufs {
            if budget == 0 {
                break;
            }
            let take = b.len().min(budget);
            if take > 0 {
                chunk.push(IoSlice::new(&b[..take]));
                budget -= take;
            }
        }
        if chunk.is_empty() {
            return Ok(0);
        }
        let shared = Arc::clone(&self.shared);
        let _order = lock(&shared.send)?;
        self.out.clear();
        let n = {
            let mut conn = lock(&shared.conn)?;
            let n = conn.writer().write_vectored(&chunk)?;
            drain(&mut conn, &mut self.out)?;
            n
        };
        self.io.write_all(&self.out)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Every write goes to the socket before it returns.
        Ok(())
    }
}

impl Stream for TlsStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.io.set_read_timeout(timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.io.set_write_timeout(timeout)
    }
    fn try_clone_stream(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(TlsStream::handle(
            Arc::clone(&self.shared),
            self.io.try_clone_stream()?,
        )))
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        if how != Shutdown::Read {
            // Best effort close_notify; the frame layer's goodbye already
            // said why.
            let _ = self.send_close_notify();
        }
        self.io.shutdown(how)
    }
    fn describe(&self) -> String {
        format!("tls:{}", self.io.describe())
    }
}

impl TlsStream {
    fn send_close_notify(&self) -> io::Result<()> {
        let _order = lock(&self.shared.send)?;
        let mut out = Vec::new();
        {
            let mut conn = lock(&self.shared.conn)?;
            conn.send_close_notify();
            drain(&mut conn, &mut out)?;
        }
        let mut io = self.io.try_clone_stream()?;
        io.write_all(&out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::net::UnixStream;
    use std::thread;

    use understudy_tls::certs::{self, IssueOptions};

    use super::*;

    fn peer(dir: &Path, node: &str) -> TlsPeer {
        TlsPeer::load(
            &certs::cert_path(dir, node),
            &certs::key_path(dir, node),
            &dir.join("ca.pem"),
        )
        .unwrap()
    }

    fn pair() -> (TlsStream, TlsStream) {
        let t = tempfile::tempdir().unwrap();
        certs::init_ca(t.path()).unwrap();
        for n in ["node-a", "node-b"] {
            certs::issue(t.path(), n, &IssueOptions::default()).unwrap();
        }
        let (a, b) = (peer(t.path(), "node-a"), peer(t.path(), "node-b"));
        let (sa, sb) = UnixStream::pair().unwrap();
        let timeout = Duration::from_secs(5);
        let deadline = Instant::now() + timeout;
        let server = thread::spawn(move || {
            handshake(Box::new(sb), &b, Role::Responder, None, deadline, timeout)
        });
        let c = handshake(
            Box::new(sa),
            &a,
            Role::Initiator,
            Some("node-b"),
            deadline,
            timeout,
        )
        .unwrap();
        let s = server.join().unwrap().unwrap();
        assert_eq!(
            understudy_tls::peer_names(&s.chain[0]),
            vec!["node-a".to_string()]
        );
        (c.stream, s.stream)
    }

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    /// Send `n` chunks through `w` while the other side reads them, with a
    /// key update requested by `updater` halfway.
    fn pump(w: &mut TlsStream, r: &mut dyn Stream, seed: u8, updater: &Shared) {
        let chunk = pattern(seed, 300_000);
        thread::scope(|s| {
            s.spawn(|| {
                let mut buf = vec![0u8; chunk.len()];
                for _ in 0..8 {
                    r.read_exact(&mut buf).unwrap();
                    assert!(buf == chunk);
                }
            });
            for i in 0..8 {
                if i == 4 {
                    updater.conn.lock().unwrap().refresh_traffic_keys().unwrap();
                }
                w.write_all(&chunk).unwrap();
            }
        });
    }

    #[test]
    fn key_updates_mid_stream_keep_both_directions_working() {
        let (mut c, mut s) = pair();
        let mut c_rx = c.try_clone_stream().unwrap();
        let mut s_rx = s.try_clone_stream().unwrap();
        let (cs, ss) = (Arc::clone(&c.shared), Arc::clone(&s.shared));
        thread::scope(|scope| {
            // Both directions at once; each side asks the other for a key
            // update mid-stream, which the other's reader must answer.
            scope.spawn(|| pump(&mut c, &mut *s_rx, 1, &cs));
            scope.spawn(|| pump(&mut s, &mut *c_rx, 2, &ss));
        });
    }

    #[test]
    fn links_negotiate_aes_128_gcm() {
        // The cheapest suite with AES-NI; the copy rate depends on it.
        let (c, s) = pair();
        for side in [&c, &s] {
            let conn = side.shared.conn.lock().unwrap();
            let suite = conn.negotiated_cipher_suite().unwrap().suite();
            assert_eq!(
                suite,
                understudy_tls::rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
            );
        }
    }

    #[test]
    fn close_notify_ends_the_peer_reader_cleanly() {
        let (c, mut s) = pair();
        c.shutdown(Shutdown::Write).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(s.read(&mut buf).unwrap(), 0);
    }
}
