//! The transport under a link: any blocking byte stream that can be cloned
//! into a reading and a writing handle and that supports timeouts.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// A connected, blocking byte stream a [`crate::Link`] runs over.
///
/// Implemented for TCP and Unix sockets. A TLS stream (a later issue) can
/// implement it too; the contract is that [`Stream::try_clone_stream`]
/// returns a second handle to the same connection such that one thread may
/// read through one handle while another writes through the other.
pub trait Stream: Read + Write + Send + fmt::Debug {
    /// Limit how long one read may block (`None`: forever).
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// Limit how long one write may block (`None`: forever).
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// A second handle to the same connection.
    fn try_clone_stream(&self) -> io::Result<Box<dyn Stream>>;
    /// Shut down reading, writing or both, for every handle.
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;
    /// The remote address, for logs.
    fn describe(&self) -> String;
}

impl Stream for TcpStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, timeout)
    }
    fn try_clone_stream(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        TcpStream::shutdown(self, how)
    }
    fn describe(&self) -> String {
        self.peer_addr()
            .map_or_else(|_| "tcp:?".to_string(), |a| a.to_string())
    }
}

impl Stream for UnixStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, timeout)
    }
    fn try_clone_stream(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        UnixStream::shutdown(self, how)
    }
    fn describe(&self) -> String {
        match self.peer_addr() {
            Ok(a) => match a.as_pathname() {
                Some(p) => format!("unix:{}", p.display()),
                None => "unix:(unnamed)".to_string(),
            },
            Err(_) => "unix:?".to_string(),
        }
    }
}

/// Whether an I/O error is a socket timeout (Linux reports `WouldBlock`
/// for an expired `SO_RCVTIMEO`/`SO_SNDTIMEO`).
pub(crate) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}
