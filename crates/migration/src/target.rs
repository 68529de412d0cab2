//! The target side: accept migration links, receive disks into a
//! directory, take ownership on commit, then serve the source's forwarded
//! requests until it closes the link.
//!
//! ```text
//! Hello ─▶ decide start (fresh / resume / incremental / hash-resync) ─▶ Welcome (+ Have)
//!   ─▶ Receiving: Data/Zero/Mirror written, Flush = durable + record progress
//!   ─▶ Commit: durable, record Owner(g+1), enable the peer bitmap, serve ─▶ Forwarding
//! link lost or Abort before Commit: keep the partial image and its progress (Receiving)
//! ```

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

#[cfg(any(test, feature = "testing"))]
use parking_lot::Mutex;
use understudy_bitmap::{Persister, StoreError, StoreOptions};
use understudy_block::{BlockError, Format};
use understudy_journal::{FlushPolicy, JournalConfig};
use understudy_peer::{Link, PeerConfig, PeerError, PeerListener};
use understudy_stack::{ExportStack, ImageSource, StackError, StackSpec};

use crate::error::RecordError;
use crate::source::{PURPOSE, SourceExport};
use crate::wire::WireError;

mod receive;
mod session;

pub use receive::{Busy, receive};

/// Wraps a freshly opened target disk (tests inject faults with it).
#[cfg(any(test, feature = "testing"))]
pub type DiskWrapper = understudy_stack::BlockWrapper;

/// Settings of the receiving side.
#[derive(Clone)]
pub struct TargetConfig {
    /// Directory received images are created in (`NAME.img`). No default.
    pub dir: PathBuf,
    /// Peer link settings. No default.
    pub peer: PeerConfig,
    /// Bitmap store options for received images. Default: the store's.
    pub store: StoreOptions,
    /// How often the bitmaps of served received images are persisted.
    /// Default: 5 s.
    pub persist_interval: std::time::Duration,
    /// The epoch journal (`NAME.img.journal`) received images get, as
    /// `serve --export ...,journal=on` gives one. Its policy must be
    /// [`FlushPolicy::Durable`]: the commit relies on a flush being
    /// durable. Default: none (as an export without `journal=on`).
    pub journal: Option<JournalConfig>,
    /// Fault injection for tests. Default: none.
    #[cfg(any(test, feature = "testing"))]
    pub disk_wrapper: Option<DiskWrapper>,
    /// Fault injection for tests: the next `Commit` meets this fault (it
    /// is taken out by that commit). Only with the `testing` feature.
    /// Default: none.
    #[cfg(any(test, feature = "testing"))]
    pub commit_fault: Option<Arc<Mutex<Option<CommitFault>>>>,
}

/// What a test makes happen at the next commit.
#[cfg(any(test, feature = "testing"))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitFault {
    /// Commit, then end the session without answering (the answer is
    /// lost on the way).
    LoseAnswer,
    /// End the session before committing (the target died on receipt).
    DieBeforeCommit,
}

impl fmt::Debug for TargetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TargetConfig")
            .field("dir", &self.dir)
            .field("node_id", &self.peer.node_id)
            .finish()
    }
}

impl TargetConfig {
    /// Defaults for receiving into `dir`.
    pub fn new(dir: impl Into<PathBuf>, peer: PeerConfig) -> Self {
        Self {
            dir: dir.into(),
            peer,
            store: StoreOptions::default(),
            persist_interval: std::time::Duration::from_secs(5),
            journal: None,
            #[cfg(any(test, feature = "testing"))]
            disk_wrapper: None,
            #[cfg(any(test, feature = "testing"))]
            commit_fault: None,
        }
    }
}

/// How the daemon takes part.
pub trait TargetHooks: Send + Sync {
    /// An export of this name this node has open although it does not own
    /// it (handed over earlier): the candidate for an incremental return.
    fn open_copy(&self, name: &str) -> Option<SourceExport>;
    /// This node owns `export` now: offer it to clients (and to later
    /// migrations). `persister` persists its bitmaps; keep it running.
    fn serve(&self, export: SourceExport, persister: Option<Persister>);
    /// An authenticated link whose purpose is not `migrate` arrived on the
    /// listener: take it (and return `None`) if the daemon serves that
    /// purpose, or hand it back to be refused. Runs on the link's own
    /// thread. Default: refuse every other purpose.
    fn other_link(&self, link: Link) -> Option<Link> {
        Some(link)
    }
}

/// The accept loop.
pub struct TargetService {
    addr: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for TargetService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TargetService")
            .field("addr", &self.addr)
            .finish()
    }
}

impl TargetService {
    /// Listen on `addr` and receive migrations in `cfg.dir`.
    pub fn start(
        addr: &str,
        cfg: TargetConfig,
        hooks: Arc<dyn TargetHooks>,
    ) -> Result<TargetService, PeerError> {
        std::fs::create_dir_all(&cfg.dir).map_err(|source| PeerError::Bind {
            addr: cfg.dir.display().to_string(),
            source,
        })?;
        let listener = PeerListener::bind(addr, &cfg.peer)?;
        let local = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let busy: Arc<Busy> = Arc::default();
        let thread = std::thread::Builder::new()
            .name("migrate-accept".into())
            .spawn(move || {
                while !stop2.load(Ordering::SeqCst) {
                    let stream = match listener.accept_stream() {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::warn!("peer accept failed: {e}");
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            continue;
                        }
                    };
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    let (cfg, hooks, busy) = (cfg.clone(), hooks.clone(), busy.clone());
                    let _ = std::thread::Builder::new()
                        .name("migrate-recv".into())
                        .spawn(move || match Link::accept(stream, &cfg.peer) {
                            Ok(link) => {
                                if link.peer().purpose != PURPOSE {
                                    let Some(link) = hooks.other_link(link) else {
                                        return;
                                    };
                                    let _ = link.send_error(
                                        understudy_peer::error_code::UNSUPPORTED,
                                        "this listener serves migrations only (purpose \"migrate\")",
                                    );
                                    return;
                                }
                                if let Err(e) = receive(link, &cfg, &*hooks, &busy) {
                                    tracing::warn!("incoming migration failed: {e}");
                                }
                            }
                            Err(e) => tracing::warn!("peer handshake refused: {e}"),
                        });
                }
            })
            .map_err(|source| PeerError::Socket { source })?;
        Ok(TargetService {
            addr: local,
            stop,
            thread: Some(thread),
        })
    }

    /// The address to migrate to.
    pub fn local_addr(&self) -> &str {
        &self.addr
    }

    /// Stop accepting (sessions in progress run on).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.addr.strip_prefix("unix:") {
            let _ = std::os::unix::net::UnixStream::connect(a);
        } else {
            let _ = std::net::TcpStream::connect(&self.addr);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Why a receive session ended early.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The source was refused (reason sent to it too).
    #[error("refused a migration: {0}")]
    Refused(String),
    /// The link failed.
    #[error("the migration link failed")]
    Link {
        /// Cause.
        #[source]
        source: PeerError,
    },
    /// The source broke the protocol.
    #[error("the source broke the migration protocol: {0}")]
    Protocol(String),
    /// Preparing the image failed.
    #[error("cannot prepare the target image {path}")]
    Image {
        /// Image.
        path: PathBuf,
        /// Cause.
        #[source]
        source: BlockError,
    },
    /// The source aborted.
    #[error("the source aborted: {0}")]
    Aborted(String),
    /// The ownership record of the image could not be read or written.
    #[error("cannot keep the ownership record of the received image")]
    Record {
        /// Cause.
        #[source]
        source: RecordError,
    },
    /// A bitmap of the received image could not be set up.
    #[error("cannot {op} the bitmap {name} of the received image")]
    Bitmap {
        /// What was done to it (add, clear, enable, disable).
        op: &'static str,
        /// The bitmap.
        name: String,
        /// Cause.
        #[source]
        source: StoreError,
    },
    /// Opening the received image's layers failed.
    #[error("cannot open the layers of a received image")]
    Stack {
        /// Cause.
        #[source]
        source: StackError,
    },
    /// One of our own messages could not be encoded.
    #[error("cannot encode a migration message (a bug: report it with the log)")]
    Encode {
        /// Cause.
        #[source]
        source: WireError,
    },
}

/// The stack of a received image: the daemon's settings for received
/// exports (bitmap store options, persist interval, journal, test hook).
fn received_spec(
    path: &std::path::Path,
    name: &str,
    format: Option<Format>,
    source: ImageSource,
    cfg: &TargetConfig,
) -> Result<StackSpec, TargetError> {
    if let Some(JournalConfig {
        policy: FlushPolicy::Ordered { .. },
        ..
    }) = &cfg.journal
    {
        return Err(TargetError::Refused(
            "this node's journal for received disks uses ordered flushes, but a migration's \
             commit needs durable ones: give received disks a durable journal (`serve \
             --received-journal on`)"
                .into(),
        ));
    }
    let mut spec = StackSpec::new(name, path);
    spec.format = format;
    spec.source = source;
    spec.journal = cfg.journal.clone();
    spec.store = cfg.store.clone();
    spec.persist_interval = cfg.persist_interval;
    #[cfg(any(test, feature = "testing"))]
    {
        spec.block_wrapper = cfg.disk_wrapper.clone();
    }
    Ok(spec)
}

fn open_image(
    path: &std::path::Path,
    format: Format,
    size: u64,
    create: bool,
    cfg: &TargetConfig,
    name: &str,
) -> Result<(SourceExport, Persister), TargetError> {
    // A fresh receive removes a stale partial attempt and its sidecars
    // first (the stack knows which files those are).
    let source = if create {
        ImageSource::Create { size }
    } else {
        ImageSource::Existing { size: Some(size) }
    };
    let spec = received_spec(path, name, Some(format), source, cfg)?;
    let stack = ExportStack::open_writable(&spec).map_err(|e| match e {
        StackError::SizeMismatch { path, actual, .. } => TargetError::Refused(format!(
            "{} has {actual} bytes but the source disk has {size}",
            path.display()
        )),
        source => TargetError::Stack { source },
    })?;
    Ok(SourceExport::from_stack(stack))
}

/// Open a received image that this node owns (after a restart), ready to
/// serve: its block filter, bitmap store (persister running), journal when
/// the daemon gives received images one, and switch.
pub fn open_existing(
    path: &std::path::Path,
    name: &str,
    cfg: &TargetConfig,
) -> Result<(SourceExport, Persister), TargetError> {
    let source = ImageSource::Existing { size: None };
    let spec = received_spec(path, name, None, source, cfg)?;
    let stack =
        ExportStack::open_writable(&spec).map_err(|source| TargetError::Stack { source })?;
    Ok(SourceExport::from_stack(stack))
}
