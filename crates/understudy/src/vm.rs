//! The daemon's VMs: QEMU guests whose disks the same daemon serves through
//! the block filter, over NBD on a Unix socket.
//!
//! ```text
//!   vm.start {name, spec} ─► parse spec ─► plan disks (export = NAME, or
//!     path = IMAGE to open as export VM-DISK) ─► NBD socket ─► validate
//!     (kernel, RAM dir, ...) ─► open image exports ─► Runner::start (QEMU)
//!   vm.stop {name} ─► QMP quit, then SIGKILL ─► release opened exports
//!     (flush, close bitmaps)
//!   SIGTERM ─► every VM stopped (bounded) ─► exports closed
//! ```
//!
//! Every refusal happens before QEMU starts, and exports opened for a VM
//! that then fails to start are released again.

mod cli;
mod incoming;
mod migrate;
mod spec;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, channel};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{Value, json};
use understudy_nbd_server::Server;
use understudy_vm::{
    DiskSpec, LaunchMode, Runner, RunnerConfig, StopOptions, VmError, VmEvent, VmState, VmStatus,
};

pub use cli::{VmCmd, run};

use crate::control::proto::{Response, VmDiskEntry, VmEntry, VmExit};
use crate::spec::ExportSpec;

/// `understudy serve` options for VMs.
#[derive(Debug, Clone, Args)]
pub struct VmArgs {
    /// Directory of the VMs' files: `DIR/vms/NAME/` holds each VM's QMP
    /// socket, serial log and QEMU log, and `DIR/nbd.sock` is the NBD
    /// socket QEMU reaches its disks on when --socket is not given.
    /// Default: beside the control socket, `CONTROL-STEM-vms`
    /// (`/tmp/understudy-vms` for the default control socket). With
    /// --vm-dir, `serve` needs no --export: it may host VMs only.
    #[arg(long)]
    pub vm_dir: Option<PathBuf>,
    /// Directory of guest RAM files, for specs without `paths.ram_dir`
    /// (a tmpfs, so guest RAM never reaches a real disk).
    #[arg(long, default_value = "/dev/shm")]
    pub vm_ram_dir: PathBuf,
    /// The QEMU binary VMs run with.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// Let specs with `accel = "kvm"` or `"auto"` use KVM. Off by default:
    /// a /dev/kvm that opens may still not boot guests (docs/vm.md).
    #[arg(long)]
    pub vm_allow_kvm: bool,
}

impl Default for VmArgs {
    /// The defaults of the flags (for daemons built in code, like the demo's).
    fn default() -> Self {
        Self {
            vm_dir: None,
            vm_ram_dir: PathBuf::from("/dev/shm"),
            qemu: PathBuf::from("qemu-system-x86_64"),
            vm_allow_kvm: false,
        }
    }
}

/// What the daemon does for VMs, seen from here: its exports.
pub trait ExportHost {
    /// Whether an export of that name is served.
    fn has_export(&self, name: &str) -> bool;
    /// Check an export spec without touching any file.
    fn check_export(&self, spec: &ExportSpec) -> Result<()>;
    /// Open an image through the export stack, register it (NBD, export
    /// list, bitmap methods) as opened for VM `vm`.
    fn open_export(&self, spec: &ExportSpec, vm: &str) -> Result<()>;
    /// Unregister an export opened by [`ExportHost::open_export`], flush it
    /// and close its bitmaps.
    fn release_export(&self, name: &str) -> Result<()>;
    /// The disk migration manager (peer settings, disk jobs).
    fn migration(&self) -> Arc<crate::migrate::Manager>;
}

/// A refused control request: a stable code and a message that says what
/// to do next.
#[derive(Debug)]
pub struct ApiError {
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
    fn bad_request(m: impl Into<String>) -> Self {
        Self::new("bad_request", m)
    }
    fn invalid(m: impl Into<String>) -> Self {
        Self::new("invalid", m)
    }
}

/// How a [`VmError`] is reported.
fn vm_error(e: &VmError) -> ApiError {
    let code = match e {
        VmError::Spec(_) | VmError::KvmNotAllowed { .. } | VmError::KvmUnavailable { .. } => {
            "invalid"
        }
        VmError::NameTaken { .. } | VmError::RamFileExists { .. } => "exists",
        VmError::NotFound { .. } => "not_found",
        VmError::Prepare { .. } | VmError::Thread(_) => "io",
        _ => "qemu",
    };
    let mut message = understudy_block::error_chain(e);
    if let VmError::KvmNotAllowed { .. } = e {
        message.push_str(" (this daemon allows KVM with `serve --vm-allow-kvm`)");
    }
    ApiError::new(code, message)
}

/// A disk of a running VM and the export behind it.
#[derive(Debug, Clone)]
struct DiskUse {
    export: String,
    /// Opened for the VM (released by `vm stop`).
    opened: bool,
}

/// A VM that moved to another daemon, leaving its RAM copy here: a return
/// of the same lineage at this generation or later sends only the pages
/// that differ.
#[derive(Debug, Clone)]
struct Departed {
    lineage: String,
    /// The generation the other daemon committed.
    generation: u64,
    ram_file: PathBuf,
}

/// A VM about to start: its final spec and what its disks need.
struct Plan {
    spec: understudy_vm::VmSpec,
    uses: Vec<DiskUse>,
    opens: Vec<ExportSpec>,
}

/// Params of `vm.start`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartParams {
    name: String,
    #[serde(default)]
    spec: Value,
}

/// Params of `vm.status`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusParams {
    name: String,
}

/// Params of `vm.stop`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StopParams {
    name: String,
    /// SIGKILL at once instead of QMP `quit` first.
    #[serde(default)]
    force: bool,
}

/// The daemon's VMs.
pub struct VmHost {
    runner: Arc<Runner>,
    dir: PathBuf,
    ram_dir: String,
    /// The NBD socket QEMU connects to.
    socket: PathBuf,
    /// Whether `socket` is ours to bind (no --socket was given).
    internal: bool,
    nbd: Server,
    listener: Mutex<Option<JoinHandle<()>>>,
    /// Each VM's disk exports, in spec order.
    disks: Arc<Mutex<BTreeMap<String, Vec<DiskUse>>>>,
    /// Each VM's lineage and ownership generation (migrations check them).
    owners: Arc<Mutex<BTreeMap<String, (String, u64)>>>,
    /// Outgoing migrations by VM name (the last one of each VM).
    migrations: Mutex<BTreeMap<String, Arc<Mutex<understudy_vm_migration::Progress>>>>,
    /// VMs that moved away, whose RAM copy is kept for an incremental
    /// return (removed at daemon stop or when a VM of the name starts).
    departed: Arc<Mutex<BTreeMap<String, Departed>>>,
    /// Incoming migrations by id, until their RAM link attaches.
    incoming: Mutex<BTreeMap<String, Arc<incoming::Incoming>>>,
    /// Serialises start, stop and shutdown; true once the daemon stops.
    op: Mutex<bool>,
}

impl std::fmt::Debug for VmHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmHost")
            .field("dir", &self.dir)
            .field("socket", &self.socket)
            .finish()
    }
}

/// `/tmp/understudy.sock` -> `/tmp/understudy-vms`.
fn default_dir(control: &Path) -> PathBuf {
    let stem = control
        .file_stem()
        .map_or_else(|| "understudy".into(), |s| s.to_string_lossy());
    control.with_file_name(format!("{stem}-vms"))
}

impl VmHost {
    /// The VM side of a daemon serving `nbd`. Nothing is created on disk
    /// until the first VM starts.
    pub fn new(
        args: &VmArgs,
        control: &Path,
        socket: Option<&PathBuf>,
        nbd: &Server,
    ) -> Result<Self> {
        let dir = args.vm_dir.clone().unwrap_or_else(|| default_dir(control));
        let dir = std::path::absolute(&dir)
            .with_context(|| format!("--vm-dir {}: cannot make it absolute", dir.display()))?;
        let (socket, internal) = match socket {
            Some(s) => (std::path::absolute(s).context("--socket")?, false),
            None => (dir.join("nbd.sock"), true),
        };
        let ram_dir = args.vm_ram_dir.to_str().with_context(|| {
            format!(
                "--vm-ram-dir {:?} is not UTF-8; pick another directory",
                args.vm_ram_dir
            )
        })?;
        let (tx, rx) = channel();
        std::thread::Builder::new()
            .name("vm-events".into())
            .spawn(move || log_events(&rx))?;
        let cfg = RunnerConfig {
            qemu: args.qemu.clone(),
            state_root: dir.join("vms"),
            allow_kvm: args.vm_allow_kvm,
            // QEMU greets within a second, but a loaded host under TCG is slow.
            qmp_timeout: Duration::from_secs(60),
            ..RunnerConfig::default()
        };
        Ok(Self {
            runner: Arc::new(Runner::new(cfg, Some(tx))),
            dir,
            ram_dir: ram_dir.to_string(),
            socket,
            internal,
            nbd: nbd.clone(),
            listener: Mutex::new(None),
            disks: Arc::default(),
            owners: Arc::default(),
            migrations: Mutex::default(),
            departed: Arc::default(),
            incoming: Mutex::default(),
            op: Mutex::new(false),
        })
    }

    /// Answer a `vm.*` request.
    pub fn handle(&self, method: &str, params: &Value, host: &dyn ExportHost) -> Response {
        let r = match method {
            "vm.start" => parse_params(method, params).and_then(|p| self.start(p, host)),
            "vm.list" => Ok(json!(self.entries())),
            "vm.status" => parse_params(method, params).and_then(|p| self.status(p)),
            "vm.migrate" => parse_params(method, params).and_then(|p| self.migrate(p, host)),
            "vm.stop" => parse_params(method, params).and_then(|p| self.stop(p, host)),
            m => Err(ApiError::bad_request(format!(
                "unknown method {m:?}; the VM methods are vm.start, vm.list, vm.status, vm.stop, vm.migrate (docs/control-api.md)"
            ))),
        };
        match r {
            Ok(v) => Response::ok(0, v),
            Err(e) => Response::err(0, e.code, e.message),
        }
    }

    fn start(&self, p: StartParams, host: &dyn ExportHost) -> Result<Value, ApiError> {
        let closing = self.op.lock();
        if *closing {
            return Err(ApiError::new(
                "unavailable",
                "the daemon is stopping; start the VM on a running daemon",
            ));
        }
        if self.runner.get(&p.name).is_ok() {
            return Err(ApiError::new(
                "exists",
                format!(
                    "a VM named {} already exists; `understudy vm stop {}` first or pick another name",
                    p.name, p.name
                ),
            ));
        }
        if let Some(d) = self.departed.lock().remove(&p.name) {
            // A new VM of that name: the old copy is no base for it.
            incoming::remove_ram(&d.ram_file);
        }
        let parsed = spec::parse(&p.name, spec::spec_object(p.spec)?, &self.ram_dir)?;
        let plan = self.plan(parsed, host)?;
        self.ensure_listener()
            .map_err(|e| ApiError::new("io", format!("{e:#}")))?;
        plan.spec
            .validate()
            .map_err(|e| ApiError::invalid(understudy_block::error_chain(&e)))?;
        self.open_all(&plan, host)?;
        match self.runner.start(plan.spec, LaunchMode::default()) {
            Ok(vm) => {
                self.disks.lock().insert(p.name.clone(), plan.uses);
                let lineage = uuid::Uuid::new_v4().to_string();
                self.owners.lock().insert(p.name, (lineage, 0));
                Ok(json!(self.entry(vm.status())))
            }
            Err(e) => {
                release(&plan.opens, host);
                Err(vm_error(&e))
            }
        }
    }

    /// Map each disk to an export, checking everything that needs no file:
    /// `export = NAME` is served and free, `path = IMAGE` gets a free
    /// export name `VM-DISK` and a valid export spec.
    fn plan(&self, parsed: spec::DaemonSpec, host: &dyn ExportHost) -> Result<Plan, ApiError> {
        let mut plan = Plan {
            spec: parsed.vm,
            uses: Vec::new(),
            opens: Vec::new(),
        };
        for d in parsed.disks {
            let bad = |why: &str| ApiError::invalid(format!("disk {:?}: {why}", d.name));
            let export = match (&d.export, &d.path) {
                (Some(e), None) => {
                    if d.format.is_some() || d.bitmap.is_some() {
                        return Err(bad(
                            "format and bitmap go with path = IMAGE; an export = NAME disk uses that export's",
                        ));
                    }
                    self.check_shared(e, host)?;
                    e.clone()
                }
                (None, Some(_)) => {
                    let name = format!("{}-{}", plan.spec.name, d.name);
                    if host.has_export(&name) {
                        return Err(ApiError::new(
                            "exists",
                            format!(
                                "disk {:?}: export {name} already exists on this daemon; rename the disk or the VM",
                                d.name
                            ),
                        ));
                    }
                    let es = spec::image_export(&name, &d)?;
                    host.check_export(&es).map_err(|e| bad(&format!("{e:#}")))?;
                    if plan.opens.iter().any(|o| o.path == es.path) {
                        return Err(bad(
                            "its image is another disk's too; give each disk its own image",
                        ));
                    }
                    plan.opens.push(es);
                    name
                }
                _ => {
                    return Err(bad(
                        "give either export = NAME (an export this daemon serves) or path = IMAGE (docs/vm.md)",
                    ));
                }
            };
            if plan.uses.iter().any(|u| u.export == export) {
                return Err(bad(&format!(
                    "export {export} is another disk's too; two disks on one export corrupt it"
                )));
            }
            plan.uses.push(DiskUse {
                export: export.clone(),
                opened: d.path.is_some(),
            });
            plan.spec.disks.push(DiskSpec {
                name: d.name,
                socket: self.socket.clone(),
                export: Some(export),
                readonly: d.readonly,
            });
        }
        Ok(plan)
    }

    /// An `export = NAME` disk: the export is served and no other VM has it.
    fn check_shared(&self, export: &str, host: &dyn ExportHost) -> Result<(), ApiError> {
        if !host.has_export(export) {
            return Err(ApiError::new(
                "not_found",
                format!(
                    "no export named {export:?} on this daemon; `understudy export list` shows them, or give the disk path = IMAGE"
                ),
            ));
        }
        let disks = self.disks.lock();
        if let Some((vm, _)) = disks
            .iter()
            .find(|(_, uses)| uses.iter().any(|u| u.export == export))
        {
            return Err(ApiError::new(
                "exists",
                format!(
                    "export {export} is a disk of VM {vm}; two guests writing one disk corrupt it: stop {vm} first"
                ),
            ));
        }
        Ok(())
    }

    /// Open the plan's image exports, or none: a failure releases those
    /// already opened.
    fn open_all(&self, plan: &Plan, host: &dyn ExportHost) -> Result<(), ApiError> {
        for (i, es) in plan.opens.iter().enumerate() {
            if let Err(e) = host.open_export(es, &plan.spec.name) {
                release(&plan.opens[..i], host);
                return Err(ApiError::new(
                    "io",
                    format!(
                        "cannot open {} for VM {}: {e:#}",
                        es.path.display(),
                        plan.spec.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Bind the internal NBD socket on the first VM start.
    fn ensure_listener(&self) -> Result<()> {
        let mut l = self.listener.lock();
        if !self.internal || l.is_some() {
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir).with_context(|| {
            format!(
                "cannot create the VM directory {}; check --vm-dir",
                self.dir.display()
            )
        })?;
        match std::fs::remove_file(&self.socket) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e)
                    .with_context(|| format!("removing the old socket {}", self.socket.display()));
            }
            _ => {}
        }
        let listener = UnixListener::bind(&self.socket).with_context(|| {
            format!("cannot listen on {}; check --vm-dir", self.socket.display())
        })?;
        // QEMU runs as the daemon's user; nobody else may reach the disks.
        std::fs::set_permissions(&self.socket, std::fs::Permissions::from_mode(0o600))?;
        let s = self.nbd.clone();
        *l = Some(
            std::thread::Builder::new()
                .name("nbd-accept-vm".into())
                .spawn(move || {
                    if let Err(e) = s.serve_unix(listener) {
                        tracing::error!("NBD Unix listener for VMs failed: {e:#}");
                    }
                })?,
        );
        tracing::info!("serving NBD for VMs on unix:{}", self.socket.display());
        Ok(())
    }

    fn stop(&self, p: StopParams, host: &dyn ExportHost) -> Result<Value, ApiError> {
        let _op = self.op.lock();
        let exit = self
            .runner
            .stop(&p.name, &stop_options(p.force))
            .map_err(|e| vm_error(&e))?;
        let uses = self.disks.lock().remove(&p.name).unwrap_or_default();
        let failed = self.release_uses(&p.name, &uses, host);
        if !failed.is_empty() {
            return Err(ApiError::new(
                "io",
                format!(
                    "VM {} stopped ({exit}) but exports {failed:?} could not be flushed or closed; see the daemon log (their bitmaps are recovered as after a crash when next opened)",
                    p.name
                ),
            ));
        }
        tracing::info!(vm = %p.name, "VM stopped ({exit})");
        Ok(json!({
            "name": p.name,
            "exit": vm_exit(&exit),
            "released": uses.iter().filter(|u| u.opened).map(|u| &u.export).collect::<Vec<_>>(),
        }))
    }

    /// Release the exports opened for `vm`; returns those that failed.
    fn release_uses(&self, vm: &str, uses: &[DiskUse], host: &dyn ExportHost) -> Vec<String> {
        let mut failed = Vec::new();
        for u in uses.iter().filter(|u| u.opened) {
            if let Err(e) = host.release_export(&u.export) {
                tracing::error!(vm, export = %u.export, "releasing the export failed: {e:#}");
                failed.push(u.export.clone());
            }
        }
        failed
    }

    /// Daemon shutdown: refuse new VMs, stop every VM (QMP quit, then
    /// SIGKILL, each bounded; in parallel) and release their exports.
    /// Returns the exports or VMs that did not close cleanly.
    pub fn shutdown(&self, host: &dyn ExportHost) -> Vec<String> {
        let mut closing = self.op.lock();
        *closing = true;
        // Every started VM has an entry here; runner.list() would ask each
        // QEMU for its state, which a hung one answers only after a timeout.
        let names: Vec<String> = self.disks.lock().keys().cloned().collect();
        let opts = stop_options(false);
        let results: Vec<(String, Result<_, VmError>)> = std::thread::scope(|s| {
            let hs: Vec<_> = names
                .iter()
                .map(|n| s.spawn(|| (n.clone(), self.runner.stop(n, &opts))))
                .collect();
            hs.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        let mut failed = Vec::new();
        for (name, r) in results {
            match r {
                Ok(exit) => tracing::info!(vm = %name, "VM stopped for shutdown ({exit})"),
                Err(e) => {
                    tracing::error!(vm = %name, "stopping the VM failed: {}", understudy_block::error_chain(&e));
                    failed.push(name.clone());
                }
            }
            let uses = self.disks.lock().remove(&name).unwrap_or_default();
            failed.extend(self.release_uses(&name, &uses, host));
        }
        for (_, d) in std::mem::take(&mut *self.departed.lock()) {
            incoming::remove_ram(&d.ram_file);
        }
        if self.internal && self.listener.lock().is_some() {
            let _ = std::fs::remove_file(&self.socket);
        }
        failed
    }

    /// Join the internal listener's thread (after the NBD server stopped).
    pub fn join(&mut self) {
        if let Some(t) = self.listener.get_mut().take() {
            let _ = t.join();
        }
    }

    /// `vm.status`: the VM with its last migration's progress, or only
    /// that progress once the VM has moved away.
    fn status(&self, p: StatusParams) -> Result<Value, ApiError> {
        let progress = self
            .migrations
            .lock()
            .get(&p.name)
            .map(|m| json!(*m.lock()));
        match self.runner.status(&p.name) {
            Ok(st) => {
                let mut v = json!(self.entry(st));
                if let Some(m) = progress {
                    v["migration"] = m;
                }
                Ok(v)
            }
            Err(e) => match progress {
                Some(m) => Ok(json!({"name": p.name, "state": "migrated", "migration": m})),
                None => Err(vm_error(&e)),
            },
        }
    }

    fn entries(&self) -> Vec<VmEntry> {
        self.runner
            .list()
            .into_iter()
            .map(|s| self.entry(s))
            .collect()
    }

    fn entry(&self, s: VmStatus) -> VmEntry {
        let uses = self.disks.lock().get(&s.name).cloned().unwrap_or_default();
        let (state, detail) = match &s.state {
            VmState::Running => ("running", None),
            VmState::Paused { status } => ("paused", Some(status.clone())),
            VmState::Exited(_) => ("exited", None),
            VmState::Unknown { reason } => ("unknown", Some(reason.clone())),
        };
        let show = |p: &Path| p.display().to_string();
        VmEntry {
            state: state.into(),
            detail,
            pid: s.pid,
            accel: s.accel.as_str().into(),
            cpus: s.cpus,
            memory_mib: s.memory_mib,
            started_unix_ms: s.started_unix_ms,
            uptime_ms: s.uptime_ms,
            disks: s
                .disks
                .iter()
                .map(|d| VmDiskEntry {
                    name: d.name.clone(),
                    export: d.export_name().into(),
                    socket: show(&d.socket),
                    readonly: d.readonly,
                    opened: uses.iter().any(|u| u.opened && u.export == d.export_name()),
                })
                .collect(),
            ram_file: show(&s.ram_file),
            serial_log: show(&s.serial_log),
            qemu_log: show(&s.qemu_log),
            qmp_socket: show(&s.qmp_socket),
            exit: s.exit.as_ref().map(vm_exit),
            name: s.name,
        }
    }
}

/// Release exports opened for a VM that did not start (errors logged).
fn release(opened: &[ExportSpec], host: &dyn ExportHost) {
    for es in opened {
        if let Err(e) = host.release_export(&es.name) {
            tracing::error!(export = %es.name, "releasing the export failed: {e:#}");
        }
    }
}

/// `force`: SIGKILL at once. Otherwise QMP `quit` (QEMU flushes its
/// block layer and exits) with a 5 s bound, then SIGKILL.
fn stop_options(force: bool) -> StopOptions {
    StopOptions {
        quit_timeout: if force {
            Duration::ZERO
        } else {
            Duration::from_secs(5)
        },
        ..StopOptions::default()
    }
}

fn vm_exit(x: &understudy_vm::ExitInfo) -> VmExit {
    VmExit {
        code: x.code,
        signal: x.signal,
        expected: x.expected,
        uptime_ms: x.uptime_ms,
    }
}

fn parse_params<T: serde::de::DeserializeOwned>(
    method: &str,
    params: &Value,
) -> Result<T, ApiError> {
    serde_json::from_value(params.clone()).map_err(|e| {
        ApiError::bad_request(format!(
            "{method}: bad params ({e}); see docs/control-api.md"
        ))
    })
}

/// Log each QEMU exit; one the daemon did not ask for is a warning that
/// says how to clean up.
fn log_events(rx: &Receiver<VmEvent>) {
    for ev in rx {
        if let VmEvent::Exited { name, exit } = ev {
            if exit.expected {
                tracing::info!(vm = %name, code = ?exit.code, signal = ?exit.signal, "QEMU exited ({exit})");
            } else {
                tracing::warn!(
                    vm = %name, code = ?exit.code, signal = ?exit.signal,
                    "QEMU exited on its own ({exit}); `understudy vm stop {name}` releases its disks"
                );
            }
        }
    }
}
