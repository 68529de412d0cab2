//! Accepting and authenticating incoming links.

use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};

use crate::config::PeerConfig;
use crate::error::PeerError;
use crate::handshake::PeerHello;
use crate::link::Link;
use crate::stream::Stream;

/// A listening socket that hands out authenticated links.
#[derive(Debug)]
pub struct PeerListener {
    socket: Socket,
    cfg: PeerConfig,
}

#[derive(Debug)]
enum Socket {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl PeerListener {
    /// Listen on `addr`: `host:port` (port 0 picks a free one) or
    /// `unix:/path` (the socket file is removed when the listener is
    /// dropped).
    pub fn bind(addr: &str, cfg: &PeerConfig) -> Result<PeerListener, PeerError> {
        cfg.validate()?;
        let err = |source| PeerError::Bind {
            addr: addr.to_string(),
            source,
        };
        let socket = match addr.strip_prefix("unix:") {
            Some(path) => Socket::Unix(UnixListener::bind(path).map_err(err)?, path.into()),
            None => Socket::Tcp(TcpListener::bind(addr).map_err(err)?),
        };
        Ok(PeerListener {
            socket,
            cfg: cfg.clone(),
        })
    }

    /// The address to give to [`Link::connect`].
    pub fn local_addr(&self) -> Result<String, PeerError> {
        match &self.socket {
            Socket::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .map_err(|source| PeerError::Socket { source }),
            Socket::Unix(_, path) => Ok(format!("unix:{}", path.display())),
        }
    }

    /// Accept one connection without authenticating it, for callers that
    /// run handshakes on their own threads ([`Link::accept`]) so that slow
    /// clients do not delay others.
    pub fn accept_stream(&self) -> Result<Box<dyn Stream>, PeerError> {
        let err = |source| PeerError::Accept { source };
        Ok(match &self.socket {
            Socket::Tcp(l) => {
                let (s, _) = l.accept().map_err(err)?;
                s.set_nodelay(true)
                    .map_err(|source| PeerError::Socket { source })?;
                Box::new(s)
            }
            Socket::Unix(l, _) => Box::new(l.accept().map_err(err)?.0),
        })
    }

    /// Accept one connection and authenticate it, within the configured
    /// handshake timeout. A failed handshake returns its error (and is
    /// logged); the listener stays usable, so call again.
    pub fn accept(&self) -> Result<(Link, PeerHello), PeerError> {
        let stream = self.accept_stream()?;
        let link = Link::accept(stream, &self.cfg)?;
        let hello = link.peer().clone();
        Ok((link, hello))
    }
}

/// Default cap on concurrent handshakes of [`PeerListener::spawn_acceptor`].
pub const DEFAULT_MAX_HANDSHAKES: usize = 1024;

impl PeerListener {
    /// Accept on a thread of its own and authenticate every connection on
    /// a thread of its own, so slow, stalled or malicious clients (each
    /// bounded by the handshake timeout) never delay a real peer. At most
    /// `max_handshakes` run at once; a connection beyond that is closed at
    /// once (logged), which bounds threads and memory. Each authenticated
    /// link goes to `on_link`, on its handshake thread.
    pub fn spawn_acceptor<F>(self, max_handshakes: usize, on_link: F) -> Result<Acceptor, PeerError>
    where
        F: Fn(Link) + Send + Sync + 'static,
    {
        let addr = self.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name("peer-accept".into())
            .spawn(move || accept_loop(&self, max_handshakes, &stop2, Arc::new(on_link)))
            .map_err(|source| PeerError::AcceptThread { source })?;
        Ok(Acceptor {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

fn accept_loop(
    listener: &PeerListener,
    max_handshakes: usize,
    stop: &AtomicBool,
    on_link: Arc<dyn Fn(Link) + Send + Sync>,
) {
    let in_flight = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::SeqCst) {
        let stream = match listener.accept_stream() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "peer accept failed");
                // Out of file descriptors and the like: do not spin.
                thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
        };
        if stop.load(Ordering::SeqCst) {
            return;
        }
        if in_flight.fetch_add(1, Ordering::SeqCst) >= max_handshakes {
            in_flight.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(
                remote = %stream.describe(),
                max_handshakes,
                "too many peer handshakes in progress; closing the new connection"
            );
            continue;
        }
        let (cfg, on_link, count) = (
            listener.cfg.clone(),
            Arc::clone(&on_link),
            Arc::clone(&in_flight),
        );
        let spawned = thread::Builder::new()
            .name("peer-handshake".into())
            .spawn(move || {
                let result = Link::accept(stream, &cfg);
                count.fetch_sub(1, Ordering::SeqCst);
                // Failures are logged by Link::accept.
                if let Ok(link) = result {
                    on_link(link);
                }
            });
        if let Err(e) = spawned {
            in_flight.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(error = %e, "cannot start a peer handshake thread");
        }
    }
}

/// A running [`PeerListener::spawn_acceptor`]; dropping it stops accepting
/// (handshakes in progress finish on their own).
#[derive(Debug)]
pub struct Acceptor {
    addr: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Acceptor {
    /// The address peers connect to.
    pub fn local_addr(&self) -> &str {
        &self.addr
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept with a connection of our own.
        let woke = match self.addr.strip_prefix("unix:") {
            Some(path) => UnixStream::connect(path).is_ok(),
            None => TcpStream::connect(&self.addr).is_ok(),
        };
        if let (true, Some(t)) = (woke, self.thread.take()) {
            let _ = t.join();
        }
    }
}

impl Drop for PeerListener {
    fn drop(&mut self) {
        if let Socket::Unix(_, path) = &self.socket {
            let _ = std::fs::remove_file(path);
        }
    }
}
