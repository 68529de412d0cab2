//! The blocking link: the sans-I/O handshake and frame codec driven over a
//! [`Stream`].
//!
//! A [`Link`] is a [`LinkSender`] plus a [`LinkReceiver`] over two handles
//! to one connection. The sender is cheap to clone and can be used from
//! many threads (frames are written whole, one at a time); the receiver
//! belongs to one thread. A keepalive thread per link sends a keepalive
//! frame when no frame was sent for the configured interval.

use std::io::{self, BufReader, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError, Weak};
use std::thread;
use std::time::{Duration, Instant};

use crate::config::{PeerAuth, PeerConfig};
use crate::error::PeerError;
use crate::frame::{Opener, Sealer};
use crate::handshake::{Handshake, HandshakeParams, PeerHello, Role, random_nonce};
use crate::key::PeerKey;
use crate::stream::{Stream, is_timeout};
use crate::wire::{self, HEADER_LEN, MAC_LEN, MAX_CONTROL_TEXT, MsgType, Service, truncate_utf8};

/// Purpose string the accepting side announces (the initiator's purpose is
/// the one that selects a service).
pub const RESPONDER_PURPOSE: &str = "listener";

/// Read buffer size: large enough that small frames cost one read call.
const READ_BUFFER: usize = 64 * 1024;

/// A received application frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Message type (in a service's range).
    pub msg_type: u16,
    /// Payload.
    pub payload: Vec<u8>,
}

/// An authenticated connection to a peer.
#[derive(Debug)]
pub struct Link {
    tx: LinkSender,
    rx: LinkReceiver,
}

impl Link {
    /// Connect to `addr` (`host:port`, or `unix:/path`) and authenticate.
    /// `purpose` names the service wanted (for example `migrate`).
    ///
    /// Any node the key (PSK) or the CA (TLS) admits is accepted; over TLS
    /// its certificate must name the node id in its hello. The
    /// authenticated node id is [`Link::peer`]`().node_id`: check it, or
    /// use [`Link::connect_to_node`] when you know whom you dial.
    pub fn connect(addr: &str, cfg: &PeerConfig, purpose: &str) -> Result<Link, PeerError> {
        cfg.validate()?;
        let stream = connect_stream(addr, cfg.connect_timeout)?;
        Link::connect_stream(stream, cfg, purpose)
    }

    /// Like [`Link::connect`], but the peer must be node `node`: over TLS
    /// its certificate must name `node` (checked during the handshake,
    /// before we present anything but our certificate); in both modes its
    /// hello must announce `node`, else [`PeerError::UnexpectedPeer`].
    pub fn connect_to_node(
        addr: &str,
        node: &str,
        cfg: &PeerConfig,
        purpose: &str,
    ) -> Result<Link, PeerError> {
        cfg.validate()?;
        let stream = connect_stream(addr, cfg.connect_timeout)?;
        establish(stream, cfg, Role::Initiator, purpose, Some(node))
    }

    /// Authenticate as the initiator over an already connected stream.
    pub fn connect_stream(
        stream: Box<dyn Stream>,
        cfg: &PeerConfig,
        purpose: &str,
    ) -> Result<Link, PeerError> {
        establish(stream, cfg, Role::Initiator, purpose, None)
    }

    /// Authenticate as the responder over an accepted stream. The peer's
    /// hello (node id, purpose, version) is in [`Link::peer`]; over TLS
    /// that node id is one its certificate names.
    pub fn accept(stream: Box<dyn Stream>, cfg: &PeerConfig) -> Result<Link, PeerError> {
        establish(stream, cfg, Role::Responder, RESPONDER_PURPOSE, None)
    }

    /// Two links connected to each other over a Unix socket pair, for tests
    /// of code that talks over a link. `a` initiates with `purpose`.
    pub fn pair(a: &PeerConfig, b: &PeerConfig, purpose: &str) -> Result<(Link, Link), PeerError> {
        let (sa, sb) = UnixStream::pair().map_err(|source| PeerError::Socket { source })?;
        let b = b.clone();
        let responder = thread::spawn(move || Link::accept(Box::new(sb), &b));
        let la = Link::connect_stream(Box::new(sa), a, purpose);
        let lb = responder.join().map_err(|_| PeerError::Protocol {
            reason: "responder thread panicked".into(),
        })?;
        Ok((la?, lb?))
    }

    /// What the peer announced.
    pub fn peer(&self) -> &PeerHello {
        &self.rx.peer
    }

    /// Send one frame.
    pub fn send(&self, msg_type: u16, payload: &[u8]) -> Result<(), PeerError> {
        self.tx.send(msg_type, payload)
    }

    /// Send one frame whose payload is the concatenation of `parts`,
    /// without copying them.
    pub fn send_parts(&self, msg_type: u16, parts: &[&[u8]]) -> Result<(), PeerError> {
        self.tx.send_parts(msg_type, parts)
    }

    /// Report an error to the peer (it gets [`PeerError::Remote`]).
    pub fn send_error(&self, code: u32, message: &str) -> Result<(), PeerError> {
        self.tx.send_error(code, message)
    }

    /// Receive the next application frame.
    pub fn recv(&mut self) -> Result<Frame, PeerError> {
        self.rx.recv()
    }

    /// Receive the next application frame into `buf` (reused across calls
    /// to avoid an allocation per frame). Returns the message type.
    pub fn recv_into(&mut self, buf: &mut Vec<u8>) -> Result<u16, PeerError> {
        self.rx.recv_into(buf)
    }

    /// Another handle for sending, usable from another thread.
    pub fn sender(&self) -> LinkSender {
        self.tx.clone()
    }

    /// Split into a sending and a receiving half, for two threads.
    pub fn split(self) -> (LinkSender, LinkReceiver) {
        (self.tx, self.rx)
    }

    /// Say goodbye and close the connection in both directions.
    pub fn shutdown(&self, reason: &str) -> Result<(), PeerError> {
        self.tx.close(reason)?;
        self.rx
            .reader
            .get_ref()
            .shutdown(Shutdown::Both)
            .or_else(ignore_not_connected)
            .map_err(|source| PeerError::Shutdown { source })
    }
}

/// The sending half of a link. Clones share the connection; each frame is
/// written whole.
#[derive(Clone, Debug)]
pub struct LinkSender {
    shared: Arc<SendShared>,
}

#[derive(Debug)]
struct SendShared {
    state: Mutex<SendState>,
    peer: Arc<PeerHello>,
    write_timeout: Option<Duration>,
    keepalive: Arc<KeepaliveCtl>,
}

impl Drop for SendShared {
    fn drop(&mut self) {
        self.keepalive.stop();
    }
}

#[derive(Debug)]
struct SendState {
    stream: Box<dyn Stream>,
    sealer: Sealer,
    /// Set once a write failed or the link was closed: the stream may hold
    /// half a frame.
    dead: bool,
    last_send: Instant,
}

impl LinkSender {
    /// What the peer announced.
    pub fn peer(&self) -> &PeerHello {
        &self.shared.peer
    }

    /// Send one frame. `msg_type` must be in a service range (0x0100 and
    /// up); the payload may be at most the peer's `max_payload`.
    pub fn send(&self, msg_type: u16, payload: &[u8]) -> Result<(), PeerError> {
        self.send_parts(msg_type, &[payload])
    }

    /// Send one frame made of `parts`, without copying them.
    pub fn send_parts(&self, msg_type: u16, parts: &[&[u8]]) -> Result<(), PeerError> {
        if !matches!(
            Service::of(msg_type),
            Some(s) if s != Service::Link
        ) {
            return Err(PeerError::ReservedType { msg_type });
        }
        self.send_raw(msg_type, parts)
    }

    /// Report an error to the peer.
    pub fn send_error(&self, code: u32, message: &str) -> Result<(), PeerError> {
        self.send_raw(MsgType::Error.into(), &[&wire::encode_error(code, message)])
    }

    /// Say goodbye and shut down our sending direction. The peer's receiver
    /// gets [`PeerError::PeerClosed`] with `reason`; ours keeps working
    /// until the peer closes too.
    pub fn close(&self, reason: &str) -> Result<(), PeerError> {
        let mut st = self.lock()?;
        if st.dead {
            return Ok(());
        }
        let text = truncate_utf8(reason, MAX_CONTROL_TEXT);
        let sent = write_frame(
            &mut st,
            MsgType::Goodbye.into(),
            &[text.as_bytes()],
            self.shared.write_timeout,
        );
        st.dead = true;
        let shut = st
            .stream
            .shutdown(Shutdown::Write)
            .or_else(ignore_not_connected)
            .map_err(|source| PeerError::Shutdown { source });
        sent.and(shut)
    }

    fn send_raw(&self, msg_type: u16, parts: &[&[u8]]) -> Result<(), PeerError> {
        let mut st = self.lock()?;
        write_frame(&mut st, msg_type, parts, self.shared.write_timeout)
    }

    fn lock(&self) -> Result<MutexGuard<'_, SendState>, PeerError> {
        // A panic while writing may have left half a frame on the wire.
        self.shared.state.lock().map_err(|_| PeerError::LinkDead)
    }
}

/// Seal and write one frame. A payload over the peer's limit is refused
/// before anything is written; any write failure kills the sender.
fn write_frame(
    st: &mut SendState,
    msg_type: u16,
    parts: &[&[u8]],
    write_timeout: Option<Duration>,
) -> Result<(), PeerError> {
    if st.dead {
        return Err(PeerError::LinkDead);
    }
    let sealed = st.sealer.seal(msg_type, parts)?;
    let mut slices = Vec::with_capacity(parts.len() + 2);
    slices.push(IoSlice::new(&sealed.header));
    slices.extend(
        parts
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| IoSlice::new(p)),
    );
    slices.push(IoSlice::new(&sealed.mac));
    let result = write_all_vectored(&mut st.stream, &mut slices).and_then(|()| st.stream.flush());
    match result {
        Ok(()) => {
            st.last_send = Instant::now();
            Ok(())
        }
        Err(e) => {
            st.dead = true;
            Err(match write_timeout {
                Some(after) if is_timeout(&e) => PeerError::SendTimeout { after },
                _ => PeerError::Send { source: e },
            })
        }
    }
}

/// `write_all` for a list of buffers: one `writev` per attempt, so a frame
/// normally costs one system call and no copy.
fn write_all_vectored(w: &mut dyn Write, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn ignore_not_connected(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotConnected {
        Ok(())
    } else {
        Err(e)
    }
}

/// The receiving half of a link.
#[derive(Debug)]
pub struct LinkReceiver {
    reader: BufReader<Box<dyn Stream>>,
    opener: Opener,
    peer: Arc<PeerHello>,
    read_timeout: Option<Duration>,
    dead: bool,
}

impl LinkReceiver {
    /// What the peer announced.
    pub fn peer(&self) -> &PeerHello {
        &self.peer
    }

    /// Receive the next application frame.
    ///
    /// Keepalives are consumed here. A peer's Error message comes back as
    /// [`PeerError::Remote`] (the link stays usable); a Goodbye as
    /// [`PeerError::PeerClosed`]. Every other error kills the receiver.
    pub fn recv(&mut self) -> Result<Frame, PeerError> {
        let mut payload = Vec::new();
        let msg_type = self.recv_into(&mut payload)?;
        Ok(Frame { msg_type, payload })
    }

    /// Like [`LinkReceiver::recv`], reusing `buf` for the payload.
    pub fn recv_into(&mut self, buf: &mut Vec<u8>) -> Result<u16, PeerError> {
        if self.dead {
            return Err(PeerError::LinkDead);
        }
        let r = self.recv_inner(buf);
        if let Err(e) = &r
            && !matches!(e, PeerError::Remote { .. })
        {
            self.dead = true;
        }
        r
    }

    fn recv_inner(&mut self, buf: &mut Vec<u8>) -> Result<u16, PeerError> {
        loop {
            let mut header = [0u8; HEADER_LEN];
            match read_full(&mut self.reader, &mut header) {
                Ok(HEADER_LEN) => {}
                Ok(0) => return Err(PeerError::Disconnected),
                Ok(_) => return Err(PeerError::Truncated),
                Err(e) => return Err(self.io_error(e)),
            }
            let h = self.opener.open_header(&header)?;
            let len = h.len as usize;
            // Bounded by our max_payload (checked in open_header).
            if buf.len() < len {
                buf.resize(len, 0);
            } else {
                buf.truncate(len);
            }
            let mut mac = [0u8; MAC_LEN];
            for part in [&mut buf[..], &mut mac[..]] {
                match read_full(&mut self.reader, part) {
                    Ok(n) if n == part.len() => {}
                    Ok(_) => return Err(PeerError::Truncated),
                    Err(e) => return Err(self.io_error(e)),
                }
            }
            self.opener.open_payload(buf, &mac)?;
            match MsgType::from_u16(h.msg_type) {
                None if h.msg_type > 0x00ff => return Ok(h.msg_type),
                Some(MsgType::Keepalive) => continue,
                Some(MsgType::Goodbye) => {
                    return Err(PeerError::PeerClosed {
                        reason: wire::sanitize_text(buf),
                    });
                }
                Some(MsgType::Error) => {
                    let (code, message) =
                        wire::decode_error(buf).map_err(|e| PeerError::Protocol {
                            reason: e.to_string(),
                        })?;
                    return Err(PeerError::Remote { code, message });
                }
                Some(MsgType::Invalid) | None => {
                    return Err(PeerError::Protocol {
                        reason: format!("unknown link message type {:#06x}", h.msg_type),
                    });
                }
            }
        }
    }

    fn io_error(&self, e: io::Error) -> PeerError {
        match self.read_timeout {
            Some(after) if is_timeout(&e) => PeerError::RecvTimeout { after },
            _ => PeerError::Recv { source: e },
        }
    }
}

/// Fill `buf` unless the stream ends first; returns the bytes read (less
/// than `buf.len()` only at end of stream).
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Stops the keepalive thread when the sender goes away.
#[derive(Debug, Default)]
struct KeepaliveCtl {
    stopped: Mutex<bool>,
    cv: Condvar,
}

impl KeepaliveCtl {
    fn stop(&self) {
        if let Ok(mut s) = self.stopped.lock() {
            *s = true;
        }
        self.cv.notify_all();
    }
}

fn keepalive_loop(shared: Weak<SendShared>, ctl: Arc<KeepaliveCtl>, interval: Duration) {
    // Checking four times per interval keeps the longest silence at about
    // 1.25 intervals.
    let tick = interval / 4;
    loop {
        {
            let Ok(stopped) = ctl.stopped.lock() else {
                return;
            };
            let Ok((stopped, _)) = ctl.cv.wait_timeout_while(stopped, tick, |s| !*s) else {
                return;
            };
            if *stopped {
                return;
            }
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut st = match shared.state.try_lock() {
            Ok(st) => st,
            // Another thread is sending: that traffic is the keepalive.
            Err(TryLockError::WouldBlock) => continue,
            Err(TryLockError::Poisoned(_)) => return,
        };
        if st.dead {
            return;
        }
        if st.last_send.elapsed() >= interval
            && let Err(e) = write_frame(
                &mut st,
                MsgType::Keepalive.into(),
                &[],
                shared.write_timeout,
            )
        {
            tracing::debug!(error = %e, "keepalive failed; stopping keepalives");
            return;
        }
    }
}

/// Open a stream to `host:port` or `unix:/path`.
pub(crate) fn connect_stream(addr: &str, timeout: Duration) -> Result<Box<dyn Stream>, PeerError> {
    let err = |source| PeerError::Connect {
        addr: addr.to_string(),
        source,
    };
    if let Some(path) = addr.strip_prefix("unix:") {
        return Ok(Box::new(UnixStream::connect(path).map_err(err)?));
    }
    let mut last = io::Error::new(io::ErrorKind::NotFound, "address resolved to nothing");
    for sa in addr.to_socket_addrs().map_err(err)? {
        match TcpStream::connect_timeout(&sa, timeout) {
            Ok(s) => {
                s.set_nodelay(true)
                    .map_err(|source| PeerError::Socket { source })?;
                return Ok(Box::new(s));
            }
            Err(e) => last = e,
        }
    }
    Err(err(last))
}

/// A transport ready for the hello exchange: the stream, the key the
/// exchange proves, and (over TLS) the peer's verified chain.
struct Transport {
    stream: Box<dyn Stream>,
    key: PeerKey,
    chain: Option<Chain>,
}

/// A peer's verified certificate chain, end-entity first.
type Chain = Vec<understudy_tls::rustls::pki_types::CertificateDer<'static>>;

/// Wrap `stream` in TLS when configured. Over TLS the hello exchange runs
/// on keying material exported from the TLS session, so its proofs bind
/// the hellos to the session both certificates authenticated.
fn transport(
    stream: Box<dyn Stream>,
    cfg: &PeerConfig,
    role: Role,
    expected: Option<&str>,
    deadline: Instant,
) -> Result<Transport, PeerError> {
    match &cfg.auth {
        PeerAuth::Psk(key) => Ok(Transport {
            stream,
            key: key.clone(),
            chain: None,
        }),
        PeerAuth::Tls(tls) => {
            let est = crate::tls::handshake(
                stream,
                tls,
                role,
                expected,
                deadline,
                cfg.handshake_timeout,
            )?;
            Ok(Transport {
                stream: Box::new(est.stream),
                key: PeerKey::from_bytes(&est.secret)?,
                chain: Some(est.chain),
            })
        }
    }
}

/// Run the handshake over `stream` and build the link.
fn establish(
    stream: Box<dyn Stream>,
    cfg: &PeerConfig,
    role: Role,
    purpose: &str,
    expected: Option<&str>,
) -> Result<Link, PeerError> {
    cfg.validate()?;
    let remote = stream.describe();
    let deadline = Instant::now() + cfg.handshake_timeout;
    let (link, chain) = match handshake(stream, cfg, role, purpose, expected, deadline) {
        Ok(done) => done,
        Err(e) => {
            tracing::warn!(
                remote = %remote,
                role = ?role,
                error = %error_chain(&e),
                "peer handshake failed"
            );
            return Err(e);
        }
    };
    let peer = link.peer().node_id.clone();
    let mut refused = None;
    if let Some(chain) = &chain
        && let Err(source) = understudy_tls::check_peer_name(chain, &peer)
    {
        // Over TLS the certificate must name the node the hello claims.
        refused = Some(PeerError::Tls {
            source: Box::new(source),
        });
    }
    if refused.is_none()
        && let Some(exp) = expected
        && !peer.eq_ignore_ascii_case(exp)
    {
        refused = Some(PeerError::UnexpectedPeer {
            expected: exp.to_string(),
            got: peer.clone(),
        });
    }
    if let Some(e) = refused {
        tracing::warn!(
            remote = %remote,
            role = ?role,
            error = %error_chain(&e),
            "peer handshake failed"
        );
        // Tell the peer why before hanging up, best effort.
        let _ = link.send_error(crate::wire::error_code::REFUSED, &e.to_string());
        let _ = link.tx.close("refused");
        return Err(e);
    }
    tracing::info!(
        remote = %remote,
        peer_node = %peer,
        purpose = %link.peer().purpose,
        version = link.peer().version,
        security = cfg.auth.describe(),
        "peer link established"
    );
    Ok(link)
}

/// An error and its sources on one line, for logs (TLS errors say what was
/// wrong with which certificate in their source).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

/// The handshake proper: transport, hello exchange, link halves.
fn handshake(
    stream: Box<dyn Stream>,
    cfg: &PeerConfig,
    role: Role,
    purpose: &str,
    expected: Option<&str>,
    deadline: Instant,
) -> Result<(Link, Option<Chain>), PeerError> {
    let Transport { stream, key, chain } = transport(stream, cfg, role, expected, deadline)?;
    let params = HandshakeParams::new(role, &cfg.node_id, purpose, cfg.max_payload);
    let mut hs = Handshake::new(params, &key, random_nonce()?)?;
    let socket_err = |source| PeerError::Socket { source };
    let mut writer = stream.try_clone_stream().map_err(socket_err)?;
    let mut reader = BufReader::with_capacity(READ_BUFFER, stream);
    let result = drive_handshake(
        &mut hs,
        &mut reader,
        &mut writer,
        deadline,
        cfg.handshake_timeout,
    );
    if let Err(e) = result {
        let _ = writer.shutdown(Shutdown::Both);
        return Err(e);
    }
    let mut session = hs.into_session()?;
    if chain.is_some() {
        session.sealer.transport_authenticated();
        session.opener.transport_authenticated();
    }
    writer
        .set_write_timeout(cfg.write_timeout)
        .map_err(socket_err)?;
    reader
        .get_ref()
        .set_read_timeout(cfg.read_timeout)
        .map_err(socket_err)?;
    let peer = Arc::new(session.peer);
    let ctl = Arc::new(KeepaliveCtl::default());
    let shared = Arc::new(SendShared {
        state: Mutex::new(SendState {
            stream: writer,
            sealer: session.sealer,
            dead: false,
            last_send: Instant::now(),
        }),
        peer: Arc::clone(&peer),
        write_timeout: cfg.write_timeout,
        keepalive: Arc::clone(&ctl),
    });
    if let Some(interval) = cfg.keepalive {
        let weak = Arc::downgrade(&shared);
        thread::Builder::new()
            .name("peer-keepalive".into())
            .spawn(move || keepalive_loop(weak, ctl, interval))
            .map_err(|source| PeerError::KeepaliveThread { source })?;
    }
    let link = Link {
        tx: LinkSender { shared },
        rx: LinkReceiver {
            reader,
            opener: session.opener,
            peer,
            read_timeout: cfg.read_timeout,
            dead: false,
        },
    };
    Ok((link, chain))
}

/// Move handshake bytes until it finishes, fails or the deadline passes.
fn drive_handshake(
    hs: &mut Handshake,
    reader: &mut BufReader<Box<dyn Stream>>,
    writer: &mut Box<dyn Stream>,
    deadline: Instant,
    timeout: Duration,
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
        } else if e
            .get_ref()
            .is_some_and(|r| r.is::<understudy_tls::TlsError>())
        {
            // The TLS layer refused something after its handshake (for a
            // client: the server's verdict on our certificate).
            match e
                .into_inner()
                .map(|r| r.downcast::<understudy_tls::TlsError>())
            {
                Some(Ok(source)) => PeerError::Tls { source },
                _ => PeerError::HandshakeClosed,
            }
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
    let mut inbuf = Vec::new();
    loop {
        let out = hs.take_output();
        if !out.is_empty() {
            writer
                .set_write_timeout(Some(remaining()?))
                .map_err(socket_err)?;
            writer
                .write_all(&out)
                .and_then(|()| writer.flush())
                .map_err(io_err)?;
        }
        if hs.is_done() {
            return Ok(());
        }
        // At most one hello (1034 bytes) is wanted at a time. The timeout
        // is renewed before every read so that a peer trickling one byte at
        // a time still cannot outlast the deadline.
        inbuf.resize(hs.wants(), 0);
        let mut got = 0;
        while got < inbuf.len() {
            reader
                .get_ref()
                .set_read_timeout(Some(remaining()?))
                .map_err(socket_err)?;
            match reader.read(&mut inbuf[got..]) {
                Ok(0) => return Err(PeerError::HandshakeClosed),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(e)),
            }
        }
        hs.feed(&inbuf)?;
    }
}
