//! The source side: one migration job per export.
//!
//! ```text
//! Connecting ─▶ Bulk ─▶ Iterating ─┬─▶ Switchover ─▶ (Verifying) ─▶ Completed
//!                  │        ▲  │    │        │
//!                  │        └──┘    │        └─ commit refused / link broke ─▶ Failed (A owner)
//!                  └─(mirror)─▶ Mirroring ─┘
//! any phase: link/disk error, cancel ─▶ Failed / Cancelled (A stays owner; retry resumes)
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use understudy_bitmap::BitmapStore;
use understudy_block::Format;
use understudy_filter::FilterDisk;
use understudy_peer::PeerConfig;

use crate::error::{MigrationError, ParseModeError};
use understudy_layers::SwitchDisk;

mod attempt;
mod peer_sink;
mod report;
mod session;

pub use peer_sink::PeerSink;
pub use report::Reporter;
pub use understudy_copy::{align_ranges, subtract};

/// Name of the persistent bitmap of blocks the target may lack.
pub const MIGRATION_BITMAP: &str = "understudy-migration";
/// Name of the target's persistent record of the ranges it holds.
pub const RECEIVED_BITMAP: &str = "understudy-received";
/// Peer-link purpose of migration links.
pub const PURPOSE: &str = "migrate";

/// The bitmap that records what changed on this copy since it was last
/// identical to the copy on `node`.
pub fn peer_bitmap_name(node: &str) -> String {
    format!("understudy-peer:{node}")
}

/// How guest writes are handled after the bulk copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Iterative copy of dirty blocks; switch to mirroring when it does not
    /// converge.
    #[default]
    Precopy,
    /// Mirror every guest write from the end of the bulk copy.
    Mirror,
}

impl std::str::FromStr for Mode {
    type Err = ParseModeError;
    fn from_str(s: &str) -> Result<Self, ParseModeError> {
        match s {
            "precopy" => Ok(Mode::Precopy),
            "mirror" => Ok(Mode::Mirror),
            o => Err(ParseModeError { given: o.into() }),
        }
    }
}

/// Settings of one migration.
#[derive(Clone, Debug)]
pub struct MigrateOptions {
    /// Target peer address (`host:port` or `unix:/path`). No default.
    pub to: String,
    /// Peer link settings (key, node id). No default.
    pub peer: PeerConfig,
    /// Switch over once the remaining dirty data can be sent within this.
    /// Default: 50 ms.
    pub max_downtime: Duration,
    /// Copy mode. Default: precopy.
    pub mode: Mode,
    /// Bytes per second for bulk and iterative copy (`None`: unlimited).
    /// Default: unlimited.
    pub bandwidth: Option<u64>,
    /// Compare block hashes of both sides after switch-over. Default: off.
    pub verify: bool,
    /// Iterative rounds before falling back to mirroring. Default: 5.
    pub max_rounds: u32,
    /// Bytes per data message. Default: 1 MiB.
    pub chunk: usize,
    /// How long in-flight I/O may take to drain at switch-over. Default: 5 s.
    pub drain_timeout: Duration,
    /// During the bulk copy, make the target durable (and record its
    /// progress, so a retry resumes there) after this many bytes...
    /// Default: 64 MiB.
    pub checkpoint: u64,
    /// ...or after this long, whichever comes first. Default: 1 s.
    pub checkpoint_interval: Duration,
    /// Called on entering each phase, and with `Phase::Switchover` again
    /// right before the commit is sent (tests inject faults here; only with
    /// the `testing` feature). Default: none.
    #[cfg(any(test, feature = "testing"))]
    pub fault_hook: Option<FaultHook>,
}

/// See [`MigrateOptions::fault_hook`].
#[cfg(any(test, feature = "testing"))]
#[derive(Clone)]
pub struct FaultHook(pub Arc<dyn Fn(Phase) + Send + Sync>);

#[cfg(any(test, feature = "testing"))]
impl std::fmt::Debug for FaultHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FaultHook")
    }
}

impl MigrateOptions {
    /// Defaults for a migration to `to`.
    pub fn new(to: impl Into<String>, peer: PeerConfig) -> Self {
        Self {
            to: to.into(),
            peer,
            max_downtime: Duration::from_millis(50),
            mode: Mode::Precopy,
            bandwidth: None,
            verify: false,
            max_rounds: 5,
            chunk: 1 << 20,
            drain_timeout: Duration::from_secs(5),
            checkpoint: 64 << 20,
            checkpoint_interval: Duration::from_secs(1),
            #[cfg(any(test, feature = "testing"))]
            fault_hook: None,
        }
    }
}

/// An export as the migration sees it: the layers it needs access to.
#[derive(Debug, Clone)]
pub struct SourceExport {
    /// Export name.
    pub name: String,
    /// Image path (the ownership record lives beside it).
    pub image: PathBuf,
    /// Image format.
    pub format: Format,
    /// The outermost layer, served to clients.
    pub switch: Arc<SwitchDisk>,
    /// The block filter below it.
    pub filter: Arc<FilterDisk>,
    /// The image's bitmap store.
    pub store: Arc<BitmapStore>,
    /// The epoch journal between the filter and the image, if any.
    pub journal: Option<Arc<understudy_journal::EpochDisk>>,
}

/// Phase of a migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Opening the link.
    Connecting,
    /// Copying allocated (or changed) extents.
    Bulk,
    /// Resending dirty blocks round by round.
    Iterating,
    /// Guest writes are mirrored; catching up.
    Mirroring,
    /// I/O held; last blocks and commit.
    Switchover,
    /// Comparing block hashes.
    Verifying,
    /// Done: the target owns the export.
    Completed,
    /// Stopped with an error; the source is still the owner.
    Failed,
    /// Cancelled; the source is still the owner.
    Cancelled,
}

impl Phase {
    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed | Phase::Cancelled)
    }
}

/// Progress and result of a migration (`migration.status`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    /// Export.
    pub export: String,
    /// Target address.
    pub target: String,
    /// Target node id, once known.
    pub target_node: Option<String>,
    /// Phase.
    pub phase: Phase,
    /// How the target started (fresh, resume, incremental, hash-resync).
    pub start: Option<String>,
    /// Current (final, once done) mode.
    pub mode: Mode,
    /// Iterative rounds done.
    pub rounds: u32,
    /// Bytes of the initial set (allocated, or changed for incremental).
    pub bulk_bytes: u64,
    /// Of which copied so far.
    pub bulk_done: u64,
    /// Data bytes sent as extents (bulk + rounds + final).
    pub data_bytes: u64,
    /// Guest bytes mirrored.
    pub mirrored_bytes: u64,
    /// All bytes sent on the link (payloads incl. headers).
    pub bytes_sent: u64,
    /// Dirty bytes waiting.
    pub dirty_bytes: u64,
    /// Measured copy bandwidth, bytes per second.
    pub bandwidth: u64,
    /// I/O hold time at switch-over, ms.
    pub downtime_ms: Option<f64>,
    /// Time since start, ms.
    pub total_ms: f64,
    /// Blocks compared by --verify.
    pub verified_blocks: u64,
    /// Blocks that differed.
    pub mismatched_blocks: u64,
    /// Error, if failed.
    pub error: Option<String>,
    /// Whether a retry may succeed.
    pub retryable: bool,
    /// How an ownership left in doubt by a lost commit answer was settled
    /// at the start of this attempt, if it was.
    #[serde(default)]
    pub settled: Option<String>,
}

impl Status {
    fn new(export: &str, target: &str) -> Self {
        Self {
            export: export.into(),
            target: target.into(),
            target_node: None,
            phase: Phase::Connecting,
            start: None,
            mode: Mode::Precopy,
            rounds: 0,
            bulk_bytes: 0,
            bulk_done: 0,
            data_bytes: 0,
            mirrored_bytes: 0,
            bytes_sent: 0,
            dirty_bytes: 0,
            bandwidth: 0,
            downtime_ms: None,
            total_ms: 0.0,
            verified_blocks: 0,
            mismatched_blocks: 0,
            error: None,
            retryable: false,
            settled: None,
        }
    }
}

/// Told about the commit, so the daemon stops offering the export to new
/// clients (they go to the new owner).
pub trait SourceHooks: Send + Sync {
    /// The target owns `export` now; existing clients are forwarded.
    fn committed(&self, export: &str, target_node: &str);
}

/// Hooks that do nothing.
#[derive(Debug, Default)]
pub struct NoHooks;

impl SourceHooks for NoHooks {
    fn committed(&self, _export: &str, _target_node: &str) {}
}

/// A running migration.
pub struct Job {
    status: Arc<Mutex<Status>>,
    cancel: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<Result<Status, MigrationError>>>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("status", &self.status())
            .finish()
    }
}

impl Job {
    /// Start migrating `export` on a thread of its own.
    pub fn start(
        export: SourceExport,
        opts: MigrateOptions,
        hooks: Arc<dyn SourceHooks>,
    ) -> std::io::Result<Job> {
        let status = Arc::new(Mutex::new(Status::new(&export.name, &opts.to)));
        let cancel = Arc::new(AtomicBool::new(false));
        let (s2, c2) = (status.clone(), cancel.clone());
        let thread = std::thread::Builder::new()
            .name(format!("migrate-{}", export.name))
            .spawn(move || migrate(&export, &opts, &*hooks, &s2, &c2))?;
        Ok(Job {
            status,
            cancel,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// A snapshot of the progress.
    pub fn status(&self) -> Status {
        self.status.lock().clone()
    }

    /// Ask the job to stop (it stops at the next extent; not once the
    /// switch-over has begun).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// Whether the job has ended.
    pub fn is_finished(&self) -> bool {
        self.status().phase.is_final()
    }

    /// Wait for the end; `None` if already waited for.
    pub fn wait(&self) -> Option<Result<Status, MigrationError>> {
        let t = self.thread.lock().take()?;
        Some(t.join().unwrap_or(Err(MigrationError::Panicked {
            thread: "migration",
        })))
    }
}

/// Run a migration to completion on this thread. `status` is kept up to
/// date; setting `cancel` stops it before the switch-over.
pub fn migrate(
    export: &SourceExport,
    opts: &MigrateOptions,
    hooks: &dyn SourceHooks,
    status: &Mutex<Status>,
    cancel: &AtomicBool,
) -> Result<Status, MigrationError> {
    let report = Reporter::new(status);
    let r = attempt::Attempt {
        export,
        opts,
        hooks,
        report: &report,
        cancel,
    }
    .run();
    let out = report.finish(&export.name, &r);
    r.map(|()| out)
}

pub use understudy_block::error_chain;
