//! A threaded NBD server over understudy disks.
//!
//! ```text
//!   serve_tcp / serve_unix (accept loop, one per listener)
//!        │ one thread per connection
//!        ▼
//!   handshake (deadline: handshake_timeout) ──► ExportRegistry (RwLock, handshake only)
//!        │  optional STARTTLS: rustls session from ServerConfig::tls (tls.rs)
//!        ▼
//!   transmission: 1..=max_workers_per_connection workers share the socket
//!        reader lock ─► validate ─► Disk I/O ─► writer lock (one write per reply)
//! ```
//!
//! The data path takes no global lock: each connection has its own reader
//! and writer locks, the disk does positional I/O, and the counters in
//! [`Stats`] are relaxed atomics. See `docs/nbd.md` for the protocol
//! coverage, the limits and the multi-connection argument.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use understudy_nbd_server::{Export, Server, ServerConfig};
//! # fn f(disk: Arc<dyn understudy_block::Disk>) -> Result<(), Box<dyn std::error::Error>> {
//! let server = Server::new(ServerConfig::default())?;
//! server.exports().insert(Export::new("disk0", disk));
//! let listener = std::net::TcpListener::bind("127.0.0.1:10809")?;
//! let stop = server.shutdown_handle();
//! let s = server.clone();
//! let t = std::thread::spawn(move || s.serve_tcp(listener));
//! // ...
//! stop.shutdown();
//! t.join().expect("accept loop panicked")?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod conn;
mod dispatch;
mod export;
mod server;
mod stats;
mod stream;
mod tls;

use std::io;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::Duration;

pub use export::{DirtyMapSource, Export, ExportRegistry, MemoryDirtyMap, OrderSupport};
pub use stats::{ExportStats, LATENCY_BUCKETS_NS, OpStats, RequestOp, Stats};
pub use tls::NbdTls;

/// Server settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// Time a client has to finish the handshake; slower ones are
    /// disconnected. Idle connections in transmission are never timed out.
    /// Default: 30 s.
    pub handshake_timeout: Duration,
    /// Most worker threads serving one connection's requests in parallel.
    /// Default: 8.
    pub max_workers_per_connection: usize,
    /// A helper worker idle this long retires while another worker still
    /// waits for requests. Default: 10 s.
    pub idle_worker_timeout: Duration,
    /// A reply that cannot be written within this time closes the
    /// connection (`None`: wait forever). Default: 60 s.
    pub write_timeout: Option<Duration>,
    /// Most simultaneous connections; more are closed right after accept.
    /// Default: 4096.
    pub max_connections: usize,
    /// On shutdown, time in-flight requests get to finish before sockets
    /// are cut. Default: 10 s.
    pub shutdown_grace: Duration,
    /// NBD over TLS (`NBD_OPT_STARTTLS`): offered, or required of every
    /// client. The TLS handshake counts against `handshake_timeout`.
    /// Default: `None` (`STARTTLS` is refused with `NBD_REP_ERR_POLICY`).
    pub tls: Option<NbdTls>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(30),
            max_workers_per_connection: 8,
            idle_worker_timeout: Duration::from_secs(10),
            write_timeout: Some(Duration::from_secs(60)),
            max_connections: 4096,
            shutdown_grace: Duration::from_secs(10),
            tls: None,
        }
    }
}

impl ServerConfig {
    /// Replace values that cannot work (zero workers, zero durations,
    /// which sockets reject) with the smallest usable ones.
    pub fn sanitize(mut self) -> Self {
        let min = Duration::from_millis(1);
        self.max_workers_per_connection = self.max_workers_per_connection.max(1);
        self.max_connections = self.max_connections.max(1);
        self.handshake_timeout = self.handshake_timeout.max(min);
        self.idle_worker_timeout = self.idle_worker_timeout.max(min);
        self.write_timeout = self.write_timeout.map(|t| t.max(min));
        self
    }
}

/// Errors of the server's own operations (client misbehaviour is never an
/// error here: it only ends that client's connection).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Creating the shutdown wake-up pipe failed.
    #[error("cannot create the shutdown wake-up pipe; check the process's descriptor limit")]
    WakePipe(#[source] io::Error),
    /// The listener could not be switched to non-blocking mode.
    #[error("cannot configure the listening socket; pass a bound, listening socket")]
    Listener(#[source] io::Error),
    /// Waiting for connections failed.
    #[error("waiting for incoming connections failed")]
    Poll(#[source] io::Error),
    /// `accept` failed for a reason that will not go away.
    #[error("accepting connections failed; the listening socket is unusable, create a new one")]
    Accept(#[source] io::Error),
}

/// An NBD server. Cheap to clone; clones share exports, connections and
/// counters.
#[derive(Clone, Debug)]
pub struct Server {
    shared: Arc<server::Shared>,
}

impl Server {
    /// A server with an empty export registry.
    pub fn new(config: ServerConfig) -> Result<Self, ServerError> {
        Self::with_registry(config, Arc::new(ExportRegistry::new()))
    }

    /// A server over an existing (possibly shared) registry.
    pub fn with_registry(
        config: ServerConfig,
        registry: Arc<ExportRegistry>,
    ) -> Result<Self, ServerError> {
        Ok(Self {
            shared: Arc::new(server::Shared::new(config.sanitize(), registry)?),
        })
    }

    /// The exports; add and remove them at any time.
    pub fn exports(&self) -> &Arc<ExportRegistry> {
        &self.shared.registry
    }

    /// Current counters.
    pub fn stats(&self) -> Stats {
        self.shared.stats.snapshot()
    }

    /// A handle that stops the server.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            shared: self.shared.clone(),
        }
    }

    /// Accept TCP clients (with `TCP_NODELAY`) until shutdown.
    pub fn serve_tcp(&self, listener: TcpListener) -> Result<(), ServerError> {
        server::accept_loop(&self.shared, &listener)
    }

    /// Accept Unix-socket clients until shutdown. The socket file is left
    /// in place.
    pub fn serve_unix(&self, listener: UnixListener) -> Result<(), ServerError> {
        server::accept_loop(&self.shared, &listener)
    }
}

/// Stops a [`Server`].
#[derive(Clone, Debug)]
pub struct ShutdownHandle {
    shared: Arc<server::Shared>,
}

impl ShutdownHandle {
    /// Stop accepting, stop reading requests, let in-flight requests finish
    /// (for up to `shutdown_grace`, then cut the sockets), join every
    /// connection thread and return. Idempotent; safe from any thread.
    pub fn shutdown(&self) {
        server::shutdown(&self.shared);
    }

    /// Whether shutdown has been requested.
    pub fn is_shutting_down(&self) -> bool {
        self.shared.is_shutting_down()
    }
}

pub(crate) use understudy_block::error_chain;
