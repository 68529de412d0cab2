//! Wire format of the control API: JSON, one object per line, over a Unix
//! socket. See docs/control-api.md.

use serde::{Deserialize, Serialize};

/// Longest request line accepted (bytes). Longer lines close the connection.
pub const MAX_LINE: usize = 1 << 20;

/// Version of the control protocol, reported by `server.info`.
pub const CONTROL_VERSION: u32 = 1;

/// A request: `{"id": 1, "method": "bitmap.add", "params": {...}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    /// Echoed in the response so clients can pipeline.
    #[serde(default)]
    pub id: u64,
    /// Method name, `noun.verb`.
    pub method: String,
    /// Method parameters.
    #[serde(default)]
    pub params: serde_json::Value,
}

/// A response: exactly one per request, in request order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// The request's id.
    pub id: u64,
    /// Whether `result` (true) or `error` (false) is present.
    pub ok: bool,
    /// Method result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// Failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

/// Why a request failed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable machine-readable code: `bad_request`, `not_found`, `exists`,
    /// `invalid`, `io`, `unsupported`.
    pub code: String,
    /// What happened and what to do next.
    pub message: String,
}

impl Response {
    /// Success.
    pub fn ok(id: u64, result: serde_json::Value) -> Self {
        Self {
            id,
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    /// Failure.
    pub fn err(id: u64, code: &str, message: impl Into<String>) -> Self {
        Self {
            id,
            ok: false,
            result: None,
            error: Some(ErrorBody {
                code: code.to_owned(),
                message: message.into(),
            }),
        }
    }
}

/// Params of the `bitmap.*` methods.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BitmapParams {
    /// Export name.
    pub export: String,
    /// Bitmap name (absent for `bitmap.list`).
    #[serde(default)]
    pub name: Option<String>,
    /// Granularity in bytes, for `bitmap.add`.
    #[serde(default)]
    pub granularity: Option<u64>,
}

/// One bitmap, as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BitmapEntry {
    /// Name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Whether writes are recorded.
    pub enabled: bool,
    /// Bytes marked dirty.
    pub dirty_bytes: u64,
    /// Whether the bitmap was restored after an unclean stop (and so may
    /// over-mark by up to the write-intent bound).
    pub recovered: bool,
}

/// One export, as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportEntry {
    /// Name.
    pub name: String,
    /// Image path.
    pub path: String,
    /// Image format.
    pub format: String,
    /// Virtual size.
    pub size: u64,
    /// Read-only.
    pub read_only: bool,
    /// Bitmaps.
    pub bitmaps: Vec<BitmapEntry>,
    /// Where requests go: `local` (this server owns the image),
    /// `forwarded` (migrated away; requests go to the new owner until the
    /// clients reconnect there) or `failed` (ownership in doubt, requests
    /// fail; see docs/migration.md).
    #[serde(default = "local_route")]
    pub serving: String,
    /// The export arrived here by live migration (`--accept-migrations`).
    #[serde(default)]
    pub received: bool,
    /// The epoch journal, for `journal=on` / `flush=ordered` exports.
    #[serde(default)]
    pub journal: Option<JournalEntry>,
    /// The VM this export was opened for (`vm start` with a disk image);
    /// `vm stop` releases it.
    #[serde(default)]
    pub vm: Option<String>,
}

fn local_route() -> String {
    "local".into()
}

/// The epoch journal of an export, as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalEntry {
    /// `durable` or `ordered`.
    pub flush: String,
    /// For `ordered`: closed epochs become durable within this many ms.
    pub interval_ms: Option<u64>,
    /// The open epoch.
    pub current_epoch: u64,
    /// Every epoch up to this one is durable.
    pub durable_epoch: u64,
    /// Every epoch up to this one is applied to the image.
    pub applied_epoch: u64,
    /// Journal bytes in use.
    pub used: u64,
    /// Journal size.
    pub capacity: u64,
}

/// A run of the dirty map.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct DirtyRun {
    /// Offset.
    pub offset: u64,
    /// Length.
    pub len: u64,
}

/// One VM, as `vm.list`, `vm.status` and `vm.start` report it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmEntry {
    /// Name.
    pub name: String,
    /// `running`, `paused`, `exited` or `unknown` (QMP did not answer).
    pub state: String,
    /// QMP's run state when `paused` (`paused`, `inmigrate`, ...), the
    /// reason when `unknown`.
    #[serde(default)]
    pub detail: Option<String>,
    /// QEMU's process id (gone once exited).
    pub pid: u32,
    /// `tcg` or `kvm`.
    pub accel: String,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// Launch time, Unix milliseconds.
    pub started_unix_ms: u64,
    /// Time since launch, milliseconds.
    pub uptime_ms: u64,
    /// Disks, in guest order (`/dev/vda`, ...).
    pub disks: Vec<VmDiskEntry>,
    /// Guest RAM file.
    pub ram_file: String,
    /// Serial console log.
    pub serial_log: String,
    /// QEMU's own output.
    pub qemu_log: String,
    /// QMP socket.
    pub qmp_socket: String,
    /// How QEMU ended, once `state` is `exited`.
    #[serde(default)]
    pub exit: Option<VmExit>,
}

/// One disk of a VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmDiskEntry {
    /// The disk's name in the spec.
    pub name: String,
    /// The daemon export QEMU reads and writes through the block filter.
    pub export: String,
    /// The NBD Unix socket QEMU is connected to.
    pub socket: String,
    /// Attached read-only.
    pub readonly: bool,
    /// The export was opened for this VM (`path = IMAGE`) and is released
    /// by `vm.stop`; false for `export = NAME` disks, which stay served.
    pub opened: bool,
}

/// How a VM's QEMU ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmExit {
    /// Exit code, when QEMU exited on its own (0 after a guest power-off).
    pub code: Option<i32>,
    /// Signal number, when a signal killed it (9 for SIGKILL).
    pub signal: Option<i32>,
    /// Whether a stop was asked for; false means QEMU died on its own or
    /// was killed from outside.
    pub expected: bool,
    /// How long it ran, milliseconds.
    pub uptime_ms: u64,
}
