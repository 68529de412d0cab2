//! A registry of running VMs by name, shaped for a control API:
//! `start`, `list`, `status`, `stop`, each returning serialisable values.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;

use crate::cmdline::{AccelKind, LaunchMode};
use crate::error::VmError;
use crate::process::{ExitInfo, VmEvent};
use crate::spec::{DiskSpec, VmSpec};
use crate::vm::{LaunchOptions, StopOptions, Vm, VmState};

/// Settings shared by every VM of a runner (the daemon's, not the spec's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunnerConfig {
    /// QEMU binary, a path or a name looked up in `PATH`.
    /// Default: `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// Parent of each VM's state directory (`STATE_ROOT/NAME`) when the
    /// spec gives none. Default: `/run/understudy/vms`.
    pub state_root: PathBuf,
    /// Whether `accel = "kvm"` or `"auto"` may use KVM. Default: false,
    /// since a `/dev/kvm` that opens may still not boot guests (this
    /// project's CI host has one).
    pub allow_kvm: bool,
    /// Limit for QEMU to open its QMP socket and greet. Default: 30 s
    /// (QEMU starts in well under a second, but a loaded host is slow).
    pub qmp_timeout: Duration,
    /// Limit for each QMP answer. Default: 10 s.
    pub command_timeout: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            qemu: PathBuf::from("qemu-system-x86_64"),
            state_root: PathBuf::from("/run/understudy/vms"),
            allow_kvm: false,
            qmp_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(10),
        }
    }
}

/// One VM as `vm status` and `vm list` report it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VmStatus {
    /// Name.
    pub name: String,
    /// What it is doing.
    pub state: VmState,
    /// QEMU's process id (gone once exited).
    pub pid: u32,
    /// Accelerator.
    pub accel: AccelKind,
    /// Launch time, Unix milliseconds.
    pub started_unix_ms: u64,
    /// Time since launch, milliseconds.
    pub uptime_ms: u64,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// Disks, as in the spec.
    pub disks: Vec<DiskSpec>,
    /// Guest RAM file.
    pub ram_file: PathBuf,
    /// Serial console log.
    pub serial_log: PathBuf,
    /// QEMU's own output.
    pub qemu_log: PathBuf,
    /// QMP socket.
    pub qmp_socket: PathBuf,
    /// How QEMU ended, once it has.
    pub exit: Option<ExitInfo>,
}

/// VMs by name. An exited VM stays listed (state `exited`) until it is
/// stopped, so that its exit can be read; its RAM file is kept until then.
#[derive(Debug)]
pub struct Runner {
    cfg: RunnerConfig,
    events: Option<Sender<VmEvent>>,
    vms: Mutex<BTreeMap<String, Arc<Vm>>>,
    /// Names being launched: reserved, so a second start of the same name
    /// fails at once instead of racing the first.
    starting: Mutex<BTreeSet<String>>,
}

impl Runner {
    /// A runner; `events` receives every VM's [`VmEvent`]s.
    pub fn new(cfg: RunnerConfig, events: Option<Sender<VmEvent>>) -> Self {
        Self {
            cfg,
            events,
            vms: Mutex::new(BTreeMap::new()),
            starting: Mutex::new(BTreeSet::new()),
        }
    }

    /// The runner's settings.
    pub fn config(&self) -> &RunnerConfig {
        &self.cfg
    }

    /// Launch `spec` under its name; refuses a name in use.
    pub fn start(&self, spec: VmSpec, mode: LaunchMode) -> Result<Arc<Vm>, VmError> {
        let name = spec.name.clone();
        self.reserve(&name)?;
        let opts = LaunchOptions {
            mode,
            events: self.events.clone(),
        };
        let launched = Vm::launch(spec, &self.cfg, opts).map(Arc::new);
        // Insert before releasing the reservation: the name is never free
        // in between.
        if let Ok(vm) = &launched {
            self.vms.lock().insert(name.clone(), Arc::clone(vm));
        }
        self.starting.lock().remove(&name);
        launched
    }

    fn reserve(&self, name: &str) -> Result<(), VmError> {
        let mut starting = self.starting.lock();
        if self.vms.lock().contains_key(name) || !starting.insert(name.to_string()) {
            return Err(VmError::NameTaken {
                name: name.to_string(),
            });
        }
        Ok(())
    }

    /// The VM named `name`, for QMP access and migration.
    pub fn get(&self, name: &str) -> Result<Arc<Vm>, VmError> {
        self.vms
            .lock()
            .get(name)
            .cloned()
            .ok_or_else(|| VmError::NotFound {
                name: name.to_string(),
            })
    }

    /// Status of every VM, by name.
    pub fn list(&self) -> Vec<VmStatus> {
        // Query outside the registry lock: a status may wait on QMP.
        let vms: Vec<Arc<Vm>> = self.vms.lock().values().cloned().collect();
        vms.iter().map(|v| v.status()).collect()
    }

    /// Status of one VM.
    pub fn status(&self, name: &str) -> Result<VmStatus, VmError> {
        Ok(self.get(name)?.status())
    }

    /// Stop a VM and forget it. If stopping fails, it stays registered.
    pub fn stop(&self, name: &str, opts: &StopOptions) -> Result<ExitInfo, VmError> {
        let vm = self
            .vms
            .lock()
            .remove(name)
            .ok_or_else(|| VmError::NotFound {
                name: name.to_string(),
            })?;
        match vm.stop(opts) {
            Ok(x) => Ok(x),
            Err(e) => {
                self.vms.lock().insert(name.to_string(), vm);
                Err(e)
            }
        }
    }

    /// Stop every VM (daemon shutdown); returns each failure by name.
    pub fn stop_all(&self, opts: &StopOptions) -> Vec<(String, VmError)> {
        let names: Vec<String> = self.vms.lock().keys().cloned().collect();
        names
            .into_iter()
            .filter_map(|n| self.stop(&n, opts).err().map(|e| (n, e)))
            .collect()
    }
}
