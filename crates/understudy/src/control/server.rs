//! Control socket listener: one thread per connection, requests answered in
//! order. Lines are bounded by [`MAX_LINE`]; a longer line closes the
//! connection without buffering it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use anyhow::{Context, Result};

use super::proto::{MAX_LINE, Request, Response};

/// Answers control requests.
pub trait Handler: Send + Sync + 'static {
    /// Handle one request.
    fn handle(&self, req: &Request) -> Response;
}

/// A running control listener.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Bind `path` (replacing a stale socket file) and serve `handler`.
    pub fn start(path: &Path, handler: Arc<dyn Handler>) -> Result<Self> {
        if path.exists() {
            // A live server would answer; a stale socket file would not.
            if UnixStream::connect(path).is_ok() {
                anyhow::bail!(
                    "control socket {} is in use by another running server: stop it or pass a different --control path",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale control socket {}", path.display()))?;
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("binding control socket {}", path.display()))?;
        // Control can remove bitmaps and stop the server: owner only.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop2.load(Ordering::Acquire) {
                        break;
                    }
                    match conn {
                        Ok(conn) => {
                            let h = handler.clone();
                            let _ = std::thread::Builder::new()
                                .name("control-conn".into())
                                .spawn(move || serve_conn(conn, &*h));
                        }
                        Err(e) => tracing::warn!("control accept failed: {e}"),
                    }
                }
            })?;
        Ok(Self {
            path: path.to_owned(),
            stop,
            thread: Some(thread),
        })
    }

    /// Stop listening and remove the socket file.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept loop.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_conn(conn: UnixStream, handler: &dyn Handler) {
    let Ok(write_half) = conn.try_clone() else {
        return;
    };
    let mut writer = std::io::BufWriter::new(write_half);
    let mut reader = BufReader::new(conn);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) => return,
            Ok(_) if line.len() > MAX_LINE => {
                let _ = write_response(
                    &mut writer,
                    &Response::err(0, "bad_request", "request line too long (max 1 MiB)"),
                );
                return;
            }
            Ok(_) => {}
            Err(_) => return,
        }
        let resp = match serde_json::from_slice::<Request>(&line) {
            Ok(req) => {
                tracing::debug!(method = %req.method, "control request");
                handler.handle(&req)
            }
            Err(e) => Response::err(
                0,
                "bad_request",
                format!(
                    "malformed request: {e}; send one JSON object per line, see docs/control-api.md"
                ),
            ),
        };
        if write_response(&mut writer, &resp).is_err() {
            return;
        }
    }
}

fn write_response(w: &mut impl Write, resp: &Response) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(resp).map_err(std::io::Error::other)?;
    out.push(b'\n');
    w.write_all(&out)?;
    w.flush()
}
