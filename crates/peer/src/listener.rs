//! Accepting and authenticating incoming links.

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

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

impl Drop for PeerListener {
    fn drop(&mut self) {
        if let Socket::Unix(_, path) = &self.socket {
            let _ = std::fs::remove_file(path);
        }
    }
}
