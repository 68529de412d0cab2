//! Listeners, connection bookkeeping and shutdown.

use std::collections::HashMap;
use std::io::{self, PipeReader, PipeWriter, Write};
use std::net::{Shutdown, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::stats::{Counters, bump};
use crate::stream::Stream;
use crate::{ExportRegistry, ServerConfig, ServerError, conn};

/// Stack size of connection and worker threads: they keep their buffers on
/// the heap, so hundreds of idle connections stay cheap.
pub(crate) const WORKER_STACK: usize = 512 * 1024;

#[derive(Debug)]
struct ConnEntry {
    control: Stream,
    thread: Option<JoinHandle<()>>,
}

/// State shared by listeners, connections and the shutdown handle.
#[derive(Debug)]
pub(crate) struct Shared {
    pub config: ServerConfig,
    pub registry: Arc<ExportRegistry>,
    pub stats: Counters,
    shutting_down: AtomicBool,
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, ConnEntry>>,
    /// Live connection threads; signalled when one ends.
    active: Mutex<usize>,
    active_cv: Condvar,
    /// Running accept loops; signalled when one returns.
    loops: Mutex<usize>,
    loops_cv: Condvar,
    /// Written once at shutdown; never read, so it stays readable and
    /// every `poll` in every accept loop wakes up.
    wake_rx: PipeReader,
    wake_tx: Mutex<PipeWriter>,
}

impl Shared {
    pub(crate) fn new(
        config: ServerConfig,
        registry: Arc<ExportRegistry>,
    ) -> Result<Self, ServerError> {
        let (wake_rx, wake_tx) = io::pipe().map_err(ServerError::WakePipe)?;
        Ok(Self {
            config,
            registry,
            stats: Counters::default(),
            shutting_down: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            conns: Mutex::new(HashMap::new()),
            active: Mutex::new(0),
            active_cv: Condvar::new(),
            loops: Mutex::new(0),
            loops_cv: Condvar::new(),
            wake_rx,
            wake_tx: Mutex::new(wake_tx),
        })
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }
}

/// Listener operations shared by TCP and Unix sockets.
pub(crate) trait Listener: AsRawFd {
    fn set_nonblocking(&self, nb: bool) -> io::Result<()>;
    fn accept_stream(&self) -> io::Result<(Stream, String)>;
}

impl Listener for TcpListener {
    fn set_nonblocking(&self, nb: bool) -> io::Result<()> {
        TcpListener::set_nonblocking(self, nb)
    }
    fn accept_stream(&self) -> io::Result<(Stream, String)> {
        let (s, peer) = self.accept()?;
        s.set_nonblocking(false)?;
        // Replies are whole messages written at once; never delay them.
        s.set_nodelay(true)?;
        Ok((Stream::Tcp(s), peer.to_string()))
    }
}

impl Listener for UnixListener {
    fn set_nonblocking(&self, nb: bool) -> io::Result<()> {
        UnixListener::set_nonblocking(self, nb)
    }
    fn accept_stream(&self) -> io::Result<(Stream, String)> {
        let (s, _) = self.accept()?;
        s.set_nonblocking(false)?;
        Ok((Stream::Unix(s), "unix".to_string()))
    }
}

/// Block until `listener` or `wake` is readable.
fn wait_readable(listener: RawFd, wake: RawFd) -> io::Result<()> {
    let mut fds = [
        libc::pollfd {
            fd: listener,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is a valid, initialised array of two pollfd structs that
    // outlives the call, and the count passed matches its length.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

/// Accept errors that say nothing about the listener itself.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNABORTED)
            | Some(libc::EPROTO)
            | Some(libc::EMFILE)
            | Some(libc::ENFILE)
            | Some(libc::ENOBUFS)
            | Some(libc::ENOMEM)
            | Some(libc::EPERM)
            | Some(libc::EINTR)
    )
}

struct LoopGuard<'a>(&'a Shared);

impl Drop for LoopGuard<'_> {
    fn drop(&mut self) {
        let mut n = self.0.loops.lock();
        *n -= 1;
        self.0.loops_cv.notify_all();
    }
}

pub(crate) fn accept_loop(
    shared: &Arc<Shared>,
    listener: &dyn Listener,
) -> Result<(), ServerError> {
    listener
        .set_nonblocking(true)
        .map_err(ServerError::Listener)?;
    *shared.loops.lock() += 1;
    let _guard = LoopGuard(shared);
    tracing::debug!("accepting connections");
    while !shared.is_shutting_down() {
        wait_readable(listener.as_raw_fd(), shared.wake_rx.as_raw_fd())
            .map_err(ServerError::Poll)?;
        loop {
            if shared.is_shutting_down() {
                break;
            }
            match listener.accept_stream() {
                Ok((stream, peer)) => spawn_connection(shared, stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if is_transient(&e) => {
                    tracing::debug!("accept failed, continuing: {e}");
                    // Out of descriptors: back off instead of spinning.
                    std::thread::sleep(Duration::from_millis(10));
                    break;
                }
                Err(e) => return Err(ServerError::Accept(e)),
            }
        }
    }
    tracing::debug!("stopped accepting connections");
    Ok(())
}

fn spawn_connection(shared: &Arc<Shared>, stream: Stream, peer: String) {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let control = match stream.try_clone() {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(conn = id, %peer, "cannot clone the client socket, dropping it: {e}");
            return;
        }
    };
    let mut conns = shared.conns.lock();
    if shared.is_shutting_down() {
        return;
    }
    {
        let mut active = shared.active.lock();
        if *active >= shared.config.max_connections {
            bump(&shared.stats.connections_rejected, 1);
            tracing::debug!(conn = id, %peer, "connection limit reached, refusing client");
            return;
        }
        *active += 1;
    }
    bump(&shared.stats.connections_accepted, 1);
    bump(&shared.stats.connections_active, 1);
    tracing::debug!(conn = id, %peer, "connection accepted");
    conns.insert(
        id,
        ConnEntry {
            control,
            thread: None,
        },
    );
    let sh = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name(format!("nbd-conn{id}"))
        .stack_size(WORKER_STACK)
        .spawn(move || {
            bump(&sh.stats.worker_threads, 1);
            if let Err(e) = conn::serve(&sh, id, stream) {
                bump(&sh.stats.handshakes_failed, 1);
                tracing::debug!(conn = id, "connection ended: {}", crate::error_chain(&e));
            }
            // Dropping our own handle detaches this (finishing) thread.
            sh.conns.lock().remove(&id);
            sh.stats.worker_threads.fetch_sub(1, Ordering::Relaxed);
            sh.stats.connections_active.fetch_sub(1, Ordering::Relaxed);
            let mut active = sh.active.lock();
            *active -= 1;
            sh.active_cv.notify_all();
        });
    match spawned {
        Ok(h) => {
            if let Some(e) = conns.get_mut(&id) {
                e.thread = Some(h);
            }
        }
        Err(e) => {
            tracing::debug!(
                conn = id,
                "cannot spawn a connection thread, dropping the client: {e}"
            );
            conns.remove(&id);
            shared
                .stats
                .connections_active
                .fetch_sub(1, Ordering::Relaxed);
            *shared.active.lock() -= 1;
        }
    }
}

pub(crate) fn shutdown(shared: &Shared) {
    if shared.shutting_down.swap(true, Ordering::AcqRel) {
        tracing::debug!("shutdown already requested; waiting for it");
    } else {
        tracing::debug!("shutting down the NBD server");
        if let Err(e) = shared.wake_tx.lock().write_all(&[1]) {
            tracing::debug!("cannot wake accept loops: {e}");
        }
    }
    {
        let mut n = shared.loops.lock();
        while *n > 0 {
            shared.loops_cv.wait(&mut n);
        }
    }
    // Stop reading requests; in-flight ones still get their replies.
    for e in shared.conns.lock().values() {
        e.control.shutdown(Shutdown::Read);
    }
    let deadline = Instant::now() + shared.config.shutdown_grace;
    {
        let mut active = shared.active.lock();
        while *active > 0 {
            if shared
                .active_cv
                .wait_until(&mut active, deadline)
                .timed_out()
            {
                break;
            }
        }
    }
    // Whatever is still running is stuck writing to a client that does not
    // read: cut it off.
    let entries: Vec<ConnEntry> = shared.conns.lock().drain().map(|(_, e)| e).collect();
    for e in &entries {
        e.control.shutdown(Shutdown::Both);
    }
    for e in entries {
        if let Some(t) = e.thread {
            let _ = t.join();
        }
    }
    let mut active = shared.active.lock();
    while *active > 0 {
        shared.active_cv.wait(&mut active);
    }
    tracing::debug!("NBD server stopped");
}
