//! One running VM: launch, state, stop.
//!
//! ```text
//!   launch ──► validate ──► resolve accel + paths ──► prepare files
//!          ──► spawn QEMU ──► supervisor thread ──► QMP handshake ──► Vm
//!
//!   state:  Running ◄──cont/stop──► Paused{status}
//!              │                       │
//!              └────── QEMU ends ──────┴──► Exited{code|signal}
//! ```
//!
//! Every QEMU exit, asked for or not, is recorded by the supervisor thread
//! and sent as [`VmEvent::Exited`]; an unexpected one is logged as a
//! warning. Dropping a [`Vm`] kills QEMU, so no process outlives its
//! handle.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, MutexGuard};
use serde::Serialize;
use understudy_qmp::{Qmp, QmpError};

use crate::cmdline::{AccelKind, LaunchMode, VmPaths, qemu_args};
use crate::error::VmError;
use crate::process::{ExitInfo, Supervised, VmEvent};
use crate::runner::{RunnerConfig, VmStatus};
use crate::spec::{Accel, VmSpec};

/// How many bytes of the QEMU log an error quotes.
const LOG_TAIL: u64 = 2000;

/// What a VM is doing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum VmState {
    /// QEMU runs and the vCPUs run.
    Running,
    /// QEMU runs but the vCPUs do not; `status` is QMP's run state
    /// (`paused`, `inmigrate`, `postmigrate`, `prelaunch`, ...).
    Paused {
        /// QMP `query-status` run state.
        status: String,
    },
    /// QEMU has ended.
    Exited(ExitInfo),
    /// QEMU runs but did not answer `query-status` (busy with another
    /// command, or hung).
    Unknown {
        /// Why.
        reason: String,
    },
}

/// Options for one launch.
#[derive(Clone, Debug, Default)]
pub struct LaunchOptions {
    /// Incoming, paused, RAM reuse. Default: a plain boot.
    pub mode: LaunchMode,
    /// Where [`VmEvent`]s go. Default: nowhere (they are still logged).
    pub events: Option<Sender<VmEvent>>,
}

/// How to stop a VM. Each step runs only if the previous one did not end
/// QEMU; the last is SIGKILL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StopOptions {
    /// Ask the guest to power off (ACPI, QMP `system_powerdown`) and wait
    /// this long. Default: `None` (skipped: a guest without ACPI handling,
    /// like the test initramfs, ignores it).
    pub powerdown_timeout: Option<Duration>,
    /// Ask QEMU to exit (QMP `quit`) and wait this long. Default: 5 s.
    pub quit_timeout: Duration,
    /// After SIGKILL, wait this long before giving up. Default: 10 s.
    pub kill_timeout: Duration,
    /// Keep the RAM file (a migration or failover source needs it).
    /// Default: false (removed).
    pub keep_ram: bool,
}

impl Default for StopOptions {
    fn default() -> Self {
        Self {
            powerdown_timeout: None,
            quit_timeout: Duration::from_secs(5),
            kill_timeout: Duration::from_secs(10),
            keep_ram: false,
        }
    }
}

/// A QEMU process running one VM, with its QMP session.
#[derive(Debug)]
pub struct Vm {
    spec: VmSpec,
    paths: VmPaths,
    accel: AccelKind,
    started: Instant,
    started_unix_ms: u64,
    command_timeout: Duration,
    /// Dropped (killing QEMU) before the RAM file is removed.
    proc: Supervised,
    qmp: Mutex<Qmp>,
    /// Whether dropping the handle removes the RAM file: only if this
    /// launch created it and no stop kept it.
    remove_ram_on_drop: AtomicBool,
}

impl Vm {
    /// Validate `spec`, start QEMU and complete the QMP handshake. A spec
    /// error returns before any process starts; a failure after the spawn
    /// kills QEMU and quotes the end of its log.
    pub fn launch(spec: VmSpec, cfg: &RunnerConfig, opts: LaunchOptions) -> Result<Vm, VmError> {
        spec.validate().map_err(VmError::Spec)?;
        let accel = resolve_accel(&spec, cfg.allow_kvm)?;
        let paths = VmPaths::resolve(&spec, &cfg.state_root).map_err(VmError::Spec)?;
        prepare(&spec, &paths, opts.mode)?;
        let args = qemu_args(&spec, &paths, accel, opts.mode);
        let proc = spawn(&spec.name, cfg, &paths, &args, opts.events)?;
        let created_ram = !opts.mode.reuse_ram;
        let qmp = match connect_qmp(&proc, &paths, cfg.qmp_timeout, cfg.command_timeout) {
            Ok(q) => q,
            Err(e) => {
                drop(proc);
                if created_ram {
                    remove_quietly(&paths.ram_file);
                }
                return Err(e);
            }
        };
        tracing::info!(vm = %spec.name, pid = proc.pid(), accel = accel.as_str(), "VM started");
        Ok(Vm {
            started: Instant::now(),
            started_unix_ms: unix_ms(),
            command_timeout: cfg.command_timeout,
            remove_ram_on_drop: AtomicBool::new(created_ram),
            spec,
            paths,
            accel,
            proc,
            qmp: Mutex::new(qmp),
        })
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }
    /// The spec it was launched from.
    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }
    /// Its files.
    pub fn paths(&self) -> &VmPaths {
        &self.paths
    }
    /// The accelerator QEMU runs with.
    pub fn accel(&self) -> AccelKind {
        self.accel
    }
    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
    /// Time since the launch completed.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
    /// How QEMU ended, if it has.
    pub fn exit(&self) -> Option<ExitInfo> {
        self.proc.exit()
    }
    /// Wait up to `timeout` for QEMU to end.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitInfo> {
        self.proc.wait_exit(timeout)
    }

    /// The QMP session, for `stop`, `cont`, `migrate` and the like. Holding
    /// it blocks [`Vm::state`] and [`Vm::stop`]'s `quit` (which falls back
    /// to SIGKILL after its timeout).
    pub fn qmp(&self) -> MutexGuard<'_, Qmp> {
        self.qmp.lock()
    }

    /// Pause the vCPUs (QMP `stop`).
    pub fn pause(&self) -> Result<(), VmError> {
        self.qmp()
            .stop()
            .map_err(|source| self.qmp_error("stop", source))
    }

    /// Resume the vCPUs (QMP `cont`).
    pub fn resume(&self) -> Result<(), VmError> {
        self.qmp()
            .cont()
            .map_err(|source| self.qmp_error("cont", source))
    }

    fn qmp_error(&self, command: &'static str, source: QmpError) -> VmError {
        VmError::Qmp {
            name: self.spec.name.clone(),
            command,
            source,
        }
    }

    /// What the VM is doing: exited (from the supervisor), else QMP's run
    /// state.
    pub fn state(&self) -> VmState {
        if let Some(e) = self.exit() {
            return VmState::Exited(e);
        }
        let Some(mut q) = self.qmp.try_lock_for(self.command_timeout) else {
            return VmState::Unknown {
                reason: "the QMP session is busy with another command".to_string(),
            };
        };
        match q.status() {
            Ok(s) if s == "running" => VmState::Running,
            Ok(status) => VmState::Paused { status },
            // A QMP failure is most often QEMU dying: give the supervisor
            // a moment to record it.
            Err(e) => match self.wait_exit(Duration::from_millis(500)) {
                Some(x) => VmState::Exited(x),
                None => VmState::Unknown {
                    reason: e.to_string(),
                },
            },
        }
    }

    /// Stop QEMU: powerdown (if asked), `quit`, then SIGKILL, each bounded;
    /// then remove the RAM file unless `opts.keep_ram`. Also cleans up a VM
    /// that has already exited.
    pub fn stop(&self, opts: &StopOptions) -> Result<ExitInfo, VmError> {
        self.proc.expect_exit();
        if opts.keep_ram {
            self.remove_ram_on_drop.store(false, Ordering::SeqCst);
        }
        let exit = match self.ask_to_exit(opts) {
            Some(x) => x,
            None => {
                tracing::warn!(vm = %self.spec.name, pid = self.pid(), "QEMU ignored quit; sending SIGKILL");
                self.proc.kill();
                self.wait_exit(opts.kill_timeout)
                    .ok_or(VmError::StopTimeout {
                        pid: self.pid(),
                        timeout: opts.kill_timeout,
                    })?
            }
        };
        remove_quietly(&self.paths.qmp_socket);
        if !opts.keep_ram {
            remove_quietly(&self.paths.ram_file);
            self.remove_ram_on_drop.store(false, Ordering::SeqCst);
        }
        Ok(exit)
    }

    /// Powerdown then quit, each bounded; the exit if QEMU ended.
    fn ask_to_exit(&self, opts: &StopOptions) -> Option<ExitInfo> {
        if let Some(x) = self.exit() {
            return Some(x);
        }
        if let Some(t) = opts.powerdown_timeout {
            self.try_command("system_powerdown", t);
            if let Some(x) = self.wait_exit(t) {
                return Some(x);
            }
        }
        self.try_command("quit", opts.quit_timeout);
        self.wait_exit(opts.quit_timeout)
    }

    /// Send `command` if the QMP session frees up within `wait`; failures
    /// are logged only, since the caller escalates anyway.
    fn try_command(&self, command: &'static str, wait: Duration) {
        let Some(mut q) = self.qmp.try_lock_for(wait) else {
            tracing::warn!(vm = %self.spec.name, command, "QMP busy; skipping");
            return;
        };
        match q.execute(command, None) {
            Ok(_) | Err(QmpError::Closed) => {}
            Err(e) => {
                tracing::debug!(vm = %self.spec.name, command, error = %e, "QMP command failed")
            }
        }
    }

    /// A snapshot for `vm status` / `vm list`.
    pub fn status(&self) -> VmStatus {
        let state = self.state();
        let exit = match &state {
            VmState::Exited(x) => Some(x.clone()),
            _ => None,
        };
        VmStatus {
            name: self.spec.name.clone(),
            state,
            pid: self.pid(),
            accel: self.accel,
            started_unix_ms: self.started_unix_ms,
            uptime_ms: u64::try_from(self.uptime().as_millis()).unwrap_or(u64::MAX),
            cpus: self.spec.cpus,
            memory_mib: self.spec.memory.mib(),
            disks: self.spec.disks.clone(),
            ram_file: self.paths.ram_file.clone(),
            serial_log: self.paths.serial_log.clone(),
            qemu_log: self.paths.qemu_log.clone(),
            qmp_socket: self.paths.qmp_socket.clone(),
            exit,
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.exit().is_none() {
            tracing::info!(vm = %self.spec.name, pid = self.pid(), "VM handle dropped; killing QEMU");
        }
        self.proc.expect_exit();
        self.proc.kill();
        // Removing the RAM file of a live QEMU would only unlink it; wait
        // for the supervisor to see the exit first.
        if self.proc.wait_exit(Duration::from_secs(10)).is_some()
            && self.remove_ram_on_drop.load(Ordering::SeqCst)
        {
            remove_quietly(&self.paths.ram_file);
        }
        remove_quietly(&self.paths.qmp_socket);
    }
}

/// TCG, or KVM when the spec asks for it (or `auto`), the runner allows it
/// and `/dev/kvm` opens.
fn resolve_accel(spec: &VmSpec, allow_kvm: bool) -> Result<AccelKind, VmError> {
    let open = || OpenOptions::new().read(true).write(true).open("/dev/kvm");
    match spec.accel {
        Accel::Tcg => Ok(AccelKind::Tcg),
        Accel::Auto if allow_kvm && open().is_ok() => Ok(AccelKind::Kvm),
        Accel::Auto => Ok(AccelKind::Tcg),
        Accel::Kvm if !allow_kvm => Err(VmError::KvmNotAllowed {
            name: spec.name.clone(),
        }),
        Accel::Kvm => open()
            .map(|_| AccelKind::Kvm)
            .map_err(|source| VmError::KvmUnavailable {
                name: spec.name.clone(),
                source,
            }),
    }
}

/// Check the RAM file against the launch mode, then create the state
/// directory and clear a stale QMP socket (in that order, so that a refused
/// launch leaves nothing behind).
fn prepare(spec: &VmSpec, paths: &VmPaths, mode: LaunchMode) -> Result<(), VmError> {
    check_ram_file(spec, paths, mode)?;
    let prep = |path: &Path| {
        let path = path.to_path_buf();
        move |source| VmError::Prepare { path, source }
    };
    std::fs::create_dir_all(&paths.state_dir).map_err(prep(&paths.state_dir))?;
    match std::fs::remove_file(&paths.qmp_socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(prep(&paths.qmp_socket)(e)),
        _ => Ok(()),
    }
}

/// A new launch must not find a RAM file (another VM of that name may use
/// it); a reusing one needs it at the spec's size.
fn check_ram_file(spec: &VmSpec, paths: &VmPaths, mode: LaunchMode) -> Result<(), VmError> {
    let existing = std::fs::metadata(&paths.ram_file).ok();
    let unusable = |why: String| VmError::RamFileUnusable {
        path: paths.ram_file.clone(),
        why,
    };
    match (mode.reuse_ram, existing) {
        (false, Some(_)) => Err(VmError::RamFileExists {
            path: paths.ram_file.clone(),
        }),
        (false, None) => Ok(()),
        (true, None) => Err(unusable("it does not exist".to_string())),
        (true, Some(m)) if m.len() != spec.memory.bytes() => Err(unusable(format!(
            "it has {} bytes, the spec's memory is {} bytes",
            m.len(),
            spec.memory.bytes()
        ))),
        (true, Some(_)) => Ok(()),
    }
}

/// Start QEMU with its output appended to the QEMU log, and its supervisor.
fn spawn(
    name: &str,
    cfg: &RunnerConfig,
    paths: &VmPaths,
    args: &[String],
    events: Option<Sender<VmEvent>>,
) -> Result<Supervised, VmError> {
    let prep = |source| VmError::Prepare {
        path: paths.qemu_log.clone(),
        source,
    };
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&paths.qemu_log)
        .map_err(prep)?;
    writeln!(log, "--- {} launch: {:?} {args:?}", unix_ms(), cfg.qemu).map_err(prep)?;
    let err = log.try_clone().map_err(prep)?;
    let child = Command::new(&cfg.qemu)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
        .map_err(|source| VmError::Spawn {
            qemu: cfg.qemu.clone(),
            source,
        })?;
    tracing::debug!(vm = name, pid = child.id(), ?args, "QEMU spawned");
    Supervised::start(child, name.to_string(), events).map_err(|(e, mut child)| {
        let _ = child.kill();
        let _ = child.wait();
        VmError::Thread(e)
    })
}

/// Connect to the QMP socket until it answers, QEMU exits, or `timeout`.
fn connect_qmp(
    proc: &Supervised,
    paths: &VmPaths,
    timeout: Duration,
    command_timeout: Duration,
) -> Result<Qmp, VmError> {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = UnixStream::connect(&paths.qmp_socket)
            .map_err(QmpError::Socket)
            .and_then(Qmp::from_stream)
            .and_then(|mut q| q.set_timeout(command_timeout).map(|()| q));
        let err = match attempt {
            Ok(q) => return Ok(q),
            Err(e) => e,
        };
        // Poll the exit rather than sleep: a QEMU that dies at once (a bad
        // extra argument) is reported as soon as it is reaped.
        if let Some(x) = proc.wait_exit(Duration::from_millis(25)) {
            return Err(VmError::EarlyExit {
                exit: x.to_string(),
                log_tail: tail(&paths.qemu_log),
            });
        }
        if Instant::now() >= deadline {
            return Err(VmError::QmpStartup {
                timeout,
                log_tail: tail(&paths.qemu_log),
                source: err,
            });
        }
    }
}

/// The last [`LOG_TAIL`] bytes of a log, for error messages.
pub(crate) fn tail(p: &Path) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = File::open(p)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    read().unwrap_or_else(|e| format!("(cannot read {}: {e})", p.display()))
}

fn remove_quietly(p: &Path) {
    if let Err(e) = std::fs::remove_file(p)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %p.display(), error = %e, "cannot remove file");
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
