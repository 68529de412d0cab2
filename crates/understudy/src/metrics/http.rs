//! A deliberately small HTTP/1.1 responder for scrapes: `GET /metrics`
//! and nothing else. Each connection gets one answer and is closed; the
//! request head is capped at [`MAX_HEAD`] and must arrive within
//! [`IO_TIMEOUT`], a reply write that stalls that long ends the
//! connection, and at most [`MAX_SCRAPES`] are answered at once (more are
//! closed unanswered). No tokio/hyper: scrapes are rare and small.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
use prometheus_client::registry::Registry;

/// Largest request head (request line and headers) read.
const MAX_HEAD: usize = 8 * 1024;
/// Scrapes answered at the same time.
const MAX_SCRAPES: usize = 4;
/// Read and write timeout of a scrape connection.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Bind the metrics address; done before any image is opened so a taken
/// port fails the start cleanly.
pub fn bind(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr).with_context(|| {
        format!(
            "cannot listen for metrics on {addr}: is the port in use? pick another with --metrics"
        )
    })
}

#[derive(Debug)]
struct Shared {
    registry: Registry,
    active: AtomicUsize,
    stop: AtomicBool,
}

/// A running `/metrics` listener.
#[derive(Debug)]
pub struct Endpoint {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Endpoint {
    /// Answer scrapes on `listener` (from [`bind`]) with `registry`.
    pub fn start(listener: TcpListener, registry: Registry) -> Result<Self> {
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            registry,
            active: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("metrics-accept".into())
            .spawn(move || accept_loop(&listener, &sh))?;
        Ok(Self {
            addr,
            shared,
            thread: Some(thread),
        })
    }

    /// The bound address (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting scrapes. Scrapes in progress finish on their own
    /// (within [`IO_TIMEOUT`]).
    pub fn stop(mut self) {
        self.shared.stop.store(true, Ordering::Release);
        // Wake the blocking accept with a connection of our own.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
            });
        }
        if TcpStream::connect_timeout(&wake, Duration::from_secs(1)).is_err() {
            tracing::warn!("cannot wake the metrics listener; leaving its thread behind");
            return;
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors, an aborted connection: transient.
                tracing::debug!("metrics: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if shared.active.fetch_add(1, Ordering::AcqRel) >= MAX_SCRAPES {
            shared.active.fetch_sub(1, Ordering::AcqRel);
            tracing::debug!("metrics: {MAX_SCRAPES} scrapes already running; closing a new one");
            continue;
        }
        let sh = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("metrics-scrape".into())
            .spawn(move || {
                answer(stream, &sh.registry);
                sh.active.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            shared.active.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!("metrics: cannot start a scrape thread: {e}");
        }
    }
}

/// Why no request could be read.
enum HeadError {
    TooLarge,
    /// Closed, timed out or failed: nobody to answer.
    Gone,
}

/// Read the request head (up to the blank line) into `buf` within
/// [`IO_TIMEOUT`] in total (a client trickling bytes gets no longer);
/// returns its length.
fn read_head(stream: &mut TcpStream, buf: &mut [u8; MAX_HEAD]) -> Result<usize, HeadError> {
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut len = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return Err(HeadError::Gone);
        }
        let n = match stream.read(&mut buf[len..]) {
            Ok(0) | Err(_) => return Err(HeadError::Gone),
            Ok(n) => n,
        };
        // Only the new bytes (and 3 before them) can complete the end.
        let from = len.saturating_sub(3);
        len += n;
        if let Some(end) = head_end(&buf[from..len]) {
            return Ok(from + end);
        }
        if len == buf.len() {
            return Err(HeadError::TooLarge);
        }
    }
}

fn head_end(b: &[u8]) -> Option<usize> {
    (0..b.len()).find(|&i| b[i..].starts_with(b"\r\n\r\n") || b[i..].starts_with(b"\n\n"))
}

fn answer(mut stream: TcpStream, registry: &Registry) {
    if stream.set_write_timeout(Some(IO_TIMEOUT)).is_err() {
        return;
    }
    let mut buf = [0u8; MAX_HEAD];
    let (status, body) = match read_head(&mut stream, &mut buf) {
        Err(HeadError::Gone) => return,
        Err(HeadError::TooLarge) => ("431 Request Header Fields Too Large", false),
        Ok(n) => route(&buf[..n]),
    };
    let body = if body {
        super::render(registry)
    } else {
        format!("{status}\n")
    };
    let ctype = if status.starts_with("200") {
        CONTENT_TYPE
    } else {
        "text/plain; charset=utf-8"
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if let Err(e) = stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body.as_bytes()))
    {
        tracing::debug!("metrics: sending the answer failed: {e}");
    }
}

/// The status for a request head, and whether the metrics are the body.
fn route(head: &[u8]) -> (&'static str, bool) {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut parts = line.trim_ascii().split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return ("400 Bad Request", false);
    };
    if !version.starts_with(b"HTTP/1.") {
        return ("400 Bad Request", false);
    }
    if method != b"GET" {
        return ("405 Method Not Allowed", false);
    }
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    if path != b"/metrics" {
        return ("404 Not Found", false);
    }
    ("200 OK", true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").0,
            "200 OK"
        );
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n").0, "200 OK");
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n").0, "404 Not Found");
        assert_eq!(
            route(b"POST /metrics HTTP/1.1\r\n\r\n").0,
            "405 Method Not Allowed"
        );
        assert_eq!(route(b"\x00\xff garbage\r\n\r\n").0, "400 Bad Request");
        assert_eq!(
            route(b"GET /metrics SPDY/3 extra\r\n\r\n").0,
            "400 Bad Request"
        );
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nrest"), Some(14));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n"), None);
    }
}
