//! NBD over TLS: the server side of `NBD_OPT_STARTTLS` with rustls.
//!
//! ```text
//!  STARTTLS acknowledged (plaintext) ─► accept(): TLS handshake on the socket,
//!                                       bounded by the NBD handshake deadline
//!        │ one rustls ServerConnection per connection, behind a mutex
//!        ▼
//!  TlsReader (holder of the reader lock)      TlsWriter (holder of the writer lock)
//!    socket read  ── no session lock ──         session lock: encrypt ≤ 256 KiB into a
//!    session lock: decrypt, copy plaintext      private buffer, unlock; then socket write
//! ```
//!
//! Workers share a connection as in plaintext: one reads requests while
//! others write replies. The rustls session is the only shared state; its
//! mutex is held to decrypt what one socket read returned or to encrypt
//! one bounded piece of a reply, never across blocking I/O, so a reader
//! waiting for the next request never holds up a reply. Ciphertext leaves
//! in the order it was produced because the writer lock (held across
//! encrypt-and-send) serialises writers, and anything the reader caused
//! rustls to queue (alerts, key-update replies) goes out with the next
//! reply.
//!
//! Memory per connection is fixed: a 32 KiB ciphertext buffer for reads,
//! at most [`WRITE_PIECE`] plus record overhead for writes, and what
//! rustls bounds itself (one record of 16 KiB plus overhead, handshake
//! messages capped by rustls). No length chosen by the client sizes an
//! allocation here.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use rustls::ServerConnection;

use crate::stream::Stream;

/// TLS settings of a server.
#[derive(Clone, Debug)]
pub struct NbdTls {
    /// Certificate, key and (for client-certificate checking) a client
    /// verifier; built by the caller, for example with `understudy-tls`.
    /// Clients that present no certificate, or one the verifier rejects,
    /// fail the TLS handshake and are disconnected.
    pub config: Arc<rustls::ServerConfig>,
    /// Refuse plaintext clients (the protocol's FORCEDTLS): every option
    /// but `STARTTLS` and `ABORT` gets `NBD_REP_ERR_TLS_REQD` until TLS is
    /// up. When false, TLS is offered and plaintext clients are served.
    pub required: bool,
}

/// Equal when both name the same rustls configuration (by pointer: rustls
/// configs cannot be compared) and the same policy.
impl PartialEq for NbdTls {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.config, &other.config) && self.required == other.required
    }
}

impl Eq for NbdTls {}

impl NbdTls {
    /// The handshake policy these settings mean.
    pub(crate) fn policy(&self) -> understudy_nbd_proto::TlsPolicy {
        if self.required {
            understudy_nbd_proto::TlsPolicy::Required
        } else {
            understudy_nbd_proto::TlsPolicy::Allowed
        }
    }
}

/// Why the TLS upgrade failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    /// The handshake acknowledged STARTTLS on a server without TLS (a
    /// bug: the policy and the configuration disagree).
    #[error("STARTTLS was acknowledged but the server has no TLS configuration; report this bug")]
    NotConfigured,
    /// rustls refused to create a session from the configuration.
    #[error("cannot start a TLS session; check the server's TLS configuration")]
    Session(#[source] rustls::Error),
    /// The client broke the TLS handshake (bad ClientHello, wrong or
    /// missing client certificate, unsupported parameters).
    #[error("TLS handshake refused")]
    Handshake(#[source] rustls::Error),
    /// The client went away during the TLS handshake.
    #[error("client closed the connection during the TLS handshake")]
    Eof,
    /// The TLS handshake did not finish before the NBD handshake deadline.
    #[error(
        "TLS handshake not finished within the handshake timeout; the client is too slow or stuck"
    )]
    Timeout,
    /// Socket I/O failed during the TLS handshake.
    #[error("TLS handshake I/O failed")]
    Io(#[source] io::Error),
}

/// Largest piece of a reply encrypted under the session lock at once, so
/// a 32 MiB read reply neither doubles its memory nor holds the lock long.
pub(crate) const WRITE_PIECE: usize = 256 * 1024;
/// Ciphertext read from the socket per system call.
const READ_PIECE: usize = 32 * 1024;

/// One connection's rustls session, shared by its reader and writers.
#[derive(Debug)]
pub(crate) struct Session(Mutex<ServerConnection>);

impl Session {
    fn lock(&self) -> MutexGuard<'_, ServerConnection> {
        // Nothing panics while holding it; rustls state stays consistent.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Run the server side of the TLS handshake on `sock`, right after the
/// plaintext `STARTTLS` acknowledgement. `early` holds bytes the client
/// sent after its `STARTTLS` that were already read (the start of its
/// ClientHello). Every read waits at most until `deadline`.
pub(crate) fn accept(
    config: &Arc<rustls::ServerConfig>,
    sock: &mut Stream,
    early: &[u8],
    deadline: Instant,
) -> Result<Arc<Session>, TlsError> {
    let mut tls = ServerConnection::new(Arc::clone(config)).map_err(TlsError::Session)?;
    let mut early = early;
    while !early.is_empty() {
        let n = tls.read_tls(&mut early).map_err(TlsError::Io)?;
        process(&mut tls, sock)?;
        if n == 0 {
            break;
        }
    }
    while tls.is_handshaking() {
        while tls.wants_write() {
            tls.write_tls(sock).map_err(TlsError::Io)?;
        }
        if !tls.is_handshaking() {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TlsError::Timeout);
        }
        sock.set_read_timeout(Some(left)).map_err(TlsError::Io)?;
        match tls.read_tls(sock) {
            Ok(0) => return Err(TlsError::Eof),
            Ok(_) => process(&mut tls, sock)?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return Err(TlsError::Timeout),
            Err(e) => return Err(TlsError::Io(e)),
        }
    }
    // The last flight and session tickets.
    while tls.wants_write() {
        tls.write_tls(sock).map_err(TlsError::Io)?;
    }
    // Pieces are bounded by the writer (WRITE_PIECE), not by rustls.
    tls.set_buffer_limit(None);
    tracing::debug!(
        version = ?tls.protocol_version(),
        suite = ?tls.negotiated_cipher_suite().map(|s| s.suite()),
        client_certificate = tls.peer_certificates().is_some(),
        "TLS established"
    );
    Ok(Arc::new(Session(Mutex::new(tls))))
}

/// Process received records; on failure send rustls's alert (best effort:
/// the connection closes either way).
fn process(tls: &mut ServerConnection, sock: &mut Stream) -> Result<(), TlsError> {
    if let Err(e) = tls.process_new_packets() {
        let _ = tls.write_tls(sock);
        return Err(TlsError::Handshake(e));
    }
    Ok(())
}

/// The reading side of a TLS connection: plaintext out, ciphertext from
/// its own handle of the socket.
#[derive(Debug)]
pub(crate) struct TlsReader {
    sock: Stream,
    session: Arc<Session>,
    cipher: Box<[u8]>,
    pos: usize,
    len: usize,
    /// During the NBD handshake: no socket read may wait past this, so a
    /// client trickling a record byte by byte cannot outlive the deadline.
    deadline: Option<Instant>,
}

impl TlsReader {
    pub(crate) fn new(sock: Stream, session: Arc<Session>) -> Self {
        Self {
            sock,
            session,
            cipher: vec![0; READ_PIECE].into_boxed_slice(),
            pos: 0,
            len: 0,
            deadline: None,
        }
    }

    /// Bound every socket read by `deadline` (`None`: only the socket's
    /// own read timeout applies).
    pub(crate) fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    /// Plaintext already decrypted, or decrypt buffered ciphertext record
    /// by record until some appears. `None`: more ciphertext is needed.
    fn try_plaintext(&mut self, buf: &mut [u8]) -> Option<io::Result<usize>> {
        let mut tls = self.session.lock();
        loop {
            match tls.reader().read(buf) {
                // Ok(0) is the client's close_notify: end of stream.
                Ok(n) => return Some(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Some(Err(e)),
            }
            if self.pos == self.len {
                return None;
            }
            let n = match tls.read_tls(&mut &self.cipher[self.pos..self.len]) {
                Ok(n) => n,
                Err(e) => return Some(Err(e)),
            };
            self.pos += n;
            if let Err(e) = tls.process_new_packets() {
                return Some(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
            if n == 0 {
                return Some(Err(io::ErrorKind::InvalidData.into()));
            }
        }
    }
}

impl Read for TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if let Some(r) = self.try_plaintext(buf) {
                return r;
            }
            if let Some(deadline) = self.deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                self.sock.set_read_timeout(Some(left))?;
            }
            // No lock held: a reader waiting for the next request must not
            // hold up replies. Timeouts reach the caller; bytes read so far
            // stay in rustls.
            let n = self.sock.read(&mut self.cipher)?;
            if n == 0 {
                return Ok(0);
            }
            self.pos = 0;
            self.len = n;
        }
    }
}

/// The writing side of a TLS connection.
#[derive(Debug)]
pub(crate) struct TlsWriter {
    sock: Stream,
    session: Arc<Session>,
    cipher: Vec<u8>,
}

impl TlsWriter {
    pub(crate) fn new(sock: Stream, session: Arc<Session>) -> Self {
        Self {
            sock,
            session,
            cipher: Vec::new(),
        }
    }

    /// Encrypt and send all of `data`, one bounded piece at a time.
    pub(crate) fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        loop {
            let piece = &data[..data.len().min(WRITE_PIECE)];
            self.cipher.clear();
            let n = {
                let mut tls = self.session.lock();
                let n = tls.writer().write(piece)?;
                while tls.wants_write() {
                    tls.write_tls(&mut self.cipher)?;
                }
                n
            };
            self.sock.write_all(&self.cipher)?;
            data = &data[n..];
            if data.is_empty() {
                break;
            }
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
        }
        if self.cipher.capacity() > 2 * WRITE_PIECE {
            self.cipher = Vec::new();
        }
        Ok(())
    }

    /// Send `close_notify` (best effort, before the socket is closed).
    pub(crate) fn close_notify(&mut self) {
        self.cipher.clear();
        {
            let mut tls = self.session.lock();
            tls.send_close_notify();
            while tls.wants_write() {
                if tls.write_tls(&mut self.cipher).is_err() {
                    break;
                }
            }
        }
        let _ = self.sock.write_all(&self.cipher);
    }
}
