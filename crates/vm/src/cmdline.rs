//! The QEMU command line, built by a pure function so that it can be
//! checked against golden expectations without starting anything.
//!
//! Why each flag (see also `docs/vm.md`):
//! - `-accel`: TCG unless KVM is allowed and present.
//! - `-machine M,memory-backend=mem` with `-object memory-backend-file,...,share=on`:
//!   guest RAM is the file `RAM_DIR/NAME.ram`, which understudy reads and
//!   writes from outside (memory rounds, restore from a copy).
//! - `-nodefaults -vga none -display none`: no devices the guest does not
//!   need, so the device state is small (about 366 KB instead of 970 KB).
//! - `-no-reboot`: a guest reboot or panic ends QEMU, and the runner
//!   reports the exit instead of looping.
//! - `-serial file:LOG`: the console goes to the serial log.
//! - `-qmp unix:PATH,server=on,wait=off`: the control socket (QEMU 7.2
//!   takes this form and the older `server,nowait`).
//! - `-blockdev driver=nbd,...` + `-device virtio-blk-pci`: each disk is an
//!   NBD export on a Unix socket.
//! - `-incoming defer`: a migration or failover target, fed later by QMP
//!   `migrate-incoming`.

use std::path::{Path, PathBuf};

use crate::error::SpecError;
use crate::spec::VmSpec;
use crate::validate::{check_path, check_socket_len};

/// The accelerator QEMU is started with, once `auto` is resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelKind {
    /// Software emulation.
    Tcg,
    /// Hardware virtualisation.
    Kvm,
}

impl AccelKind {
    /// The `-accel` value.
    pub fn as_str(self) -> &'static str {
        match self {
            AccelKind::Tcg => "tcg",
            AccelKind::Kvm => "kvm",
        }
    }
}

/// The files of one VM, resolved from its spec and the runner's state root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmPaths {
    /// Directory holding the files below.
    pub state_dir: PathBuf,
    /// QMP socket: `STATE_DIR/qmp.sock`.
    pub qmp_socket: PathBuf,
    /// Serial console log: `STATE_DIR/serial.log` (rewritten at each launch).
    pub serial_log: PathBuf,
    /// QEMU's stdout and stderr: `STATE_DIR/qemu.log` (appended).
    pub qemu_log: PathBuf,
    /// Guest RAM: `RAM_DIR/NAME.ram`.
    pub ram_file: PathBuf,
}

impl VmPaths {
    /// Resolve the paths: the spec's `paths.state_dir`, or `state_root/NAME`.
    /// Fails when a path cannot go on QEMU's command line.
    pub fn resolve(spec: &VmSpec, state_root: &Path) -> Result<Self, SpecError> {
        let state_dir = match &spec.paths.state_dir {
            Some(d) => d.clone(),
            None => state_root.join(&spec.name),
        };
        check_path("paths.state_dir", &state_dir, true)?;
        let p = Self {
            qmp_socket: state_dir.join("qmp.sock"),
            serial_log: state_dir.join("serial.log"),
            qemu_log: state_dir.join("qemu.log"),
            ram_file: spec.ram_file(),
            state_dir,
        };
        check_socket_len("paths.state_dir (qmp.sock in it)", &p.qmp_socket)?;
        Ok(p)
    }
}

/// How this launch differs from a plain boot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaunchMode {
    /// Add `-incoming defer`: QEMU waits for QMP `migrate-incoming` (a
    /// migration or failover target). Default: false.
    pub incoming: bool,
    /// Add `-S`: the vCPUs wait for QMP `cont`. Default: false.
    pub paused: bool,
    /// Start from the existing RAM file instead of creating it (a restore
    /// from a copy of the guest's memory). Default: false.
    pub reuse_ram: bool,
}

/// The QEMU arguments (without the binary) for `spec`. Paths are assumed
/// checked ([`VmSpec::check_shape`], [`VmPaths::resolve`]): they are UTF-8
/// and hold no commas.
pub fn qemu_args(
    spec: &VmSpec,
    paths: &VmPaths,
    accel: AccelKind,
    mode: LaunchMode,
) -> Vec<String> {
    let mib = spec.memory.mib();
    let mut a: Vec<String> = Vec::with_capacity(48);
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
    push(&["-accel", accel.as_str()]);
    push(&["-machine", &format!("{},memory-backend=mem", spec.machine)]);
    push(&["-m", &mib.to_string()]);
    push(&[
        "-object",
        &format!(
            "memory-backend-file,id=mem,size={mib}M,mem-path={},share=on",
            show(&paths.ram_file)
        ),
    ]);
    push(&["-smp", &spec.cpus.to_string()]);
    push(&[
        "-nodefaults",
        "-vga",
        "none",
        "-display",
        "none",
        "-no-reboot",
    ]);
    push(&["-serial", &format!("file:{}", show(&paths.serial_log))]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", show(&paths.qmp_socket)),
    ]);
    if let Some(k) = &spec.boot.kernel {
        push(&["-kernel", &show(k)]);
        if let Some(i) = &spec.boot.initrd {
            push(&["-initrd", &show(i)]);
        }
        push(&["-append", spec.append()]);
    }
    disk_args(spec, &mut a);
    if mode.paused {
        a.push("-S".to_string());
    }
    if mode.incoming {
        a.extend(["-incoming".to_string(), "defer".to_string()]);
    }
    a.extend(spec.extra_args.iter().cloned());
    a
}

/// `-blockdev` + `-device` per disk; node names are `d0`, `d1`, ... in
/// spec order, so two QEMUs built from one spec agree (migration needs it).
fn disk_args(spec: &VmSpec, a: &mut Vec<String>) {
    for (i, d) in spec.disks.iter().enumerate() {
        let ro = if d.readonly { ",read-only=on" } else { "" };
        a.push("-blockdev".to_string());
        a.push(format!(
            "driver=nbd,node-name=d{i},server.type=unix,server.path={},export={}{ro}",
            show(&d.socket),
            d.export_name()
        ));
        let boot = if spec.boot.disk.as_deref() == Some(d.name.as_str()) {
            ",bootindex=0"
        } else {
            ""
        };
        a.push("-device".to_string());
        a.push(format!("virtio-blk-pci,drive=d{i},id=vd{i}{boot}"));
    }
}

fn show(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}
