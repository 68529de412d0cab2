//! One socket type for TCP and Unix connections.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::tls::{TlsReader, TlsWriter};

/// A connected stream socket.
#[derive(Debug)]
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub(crate) fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    /// Shut down one or both directions; errors (already closed) are
    /// irrelevant to every caller.
    pub(crate) fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        };
    }

    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    pub(crate) fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }
}

impl Stream {
    /// Write all of `header` and then all of `payload`. On TCP the header
    /// goes out with `MSG_MORE`, so the payload starts a fresh segment:
    /// sending a 28-byte chunk header and a 1 MiB payload in one `write`
    /// shifts every payload byte by 28 within the socket buffers, and the
    /// misaligned kernel copies cost ~25% of large-read throughput (the
    /// same split nbdkit makes).
    pub(crate) fn write_split(&mut self, header: &[u8], payload: &[u8]) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                let fd = s.as_raw_fd();
                let mut rest = header;
                while !rest.is_empty() {
                    // SAFETY: `fd` is this stream's open socket for the whole
                    // call (we hold `&mut self`), and the pointer and length
                    // describe the live slice `rest`.
                    let n = unsafe {
                        libc::send(
                            fd,
                            rest.as_ptr().cast(),
                            rest.len(),
                            libc::MSG_MORE | libc::MSG_NOSIGNAL,
                        )
                    };
                    if n < 0 {
                        let e = io::Error::last_os_error();
                        if e.kind() == io::ErrorKind::Interrupted {
                            continue;
                        }
                        return Err(e);
                    }
                    if n == 0 {
                        return Err(io::ErrorKind::WriteZero.into());
                    }
                    rest = rest.get(n as usize..).unwrap_or_default();
                }
                s.write_all(payload)
            }
            Stream::Unix(s) => {
                s.write_all(header)?;
                s.write_all(payload)
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where a connection's requests come from: the socket, or the TLS
/// session on it.
#[derive(Debug)]
pub(crate) enum ReadHalf {
    Plain(Stream),
    Tls(TlsReader),
}

impl ReadHalf {
    /// Bound reads by the handshake deadline (see `TlsReader`); plaintext
    /// reads return whatever arrives, so the caller's own checks suffice.
    pub(crate) fn set_deadline(&mut self, deadline: Option<Instant>) {
        if let ReadHalf::Tls(t) = self {
            t.set_deadline(deadline);
        }
    }
}

impl Read for ReadHalf {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ReadHalf::Plain(s) => s.read(buf),
            ReadHalf::Tls(t) => t.read(buf),
        }
    }
}

/// Where a connection's replies go: the socket, or the TLS session on it.
#[derive(Debug)]
pub(crate) enum WriteHalf {
    Plain(Stream),
    Tls(TlsWriter),
}

impl WriteHalf {
    pub(crate) fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            WriteHalf::Plain(s) => s.write_all(buf),
            WriteHalf::Tls(t) => t.write_all(buf),
        }
    }

    /// A reply whose `header` and `payload` are contiguous in memory:
    /// split on a plain socket (see [`Stream::write_split`]), one
    /// encryption under TLS, where the split buys nothing.
    pub(crate) fn write_reply(&mut self, whole: &[u8], header_len: usize) -> io::Result<()> {
        match self {
            WriteHalf::Plain(s) => {
                let (header, payload) = whole.split_at(header_len);
                s.write_split(header, payload)
            }
            WriteHalf::Tls(t) => t.write_all(whole),
        }
    }

    /// End the TLS session cleanly before the socket closes.
    pub(crate) fn close_notify(&mut self) {
        if let WriteHalf::Tls(t) = self {
            t.close_notify();
        }
    }
}
