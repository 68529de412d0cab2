//! Typed errors: [`SpecError`] for a spec that cannot run, [`VmError`] for
//! what failed while running one. Each message says what to do next.

use std::path::PathBuf;
use std::time::Duration;

use understudy_qmp::QmpError;

use crate::spec::{MAX_CPUS, MAX_MEMORY_MIB, MAX_NAME_LEN, MAX_SOCKET_PATH, MIN_MEMORY_MIB};

/// Why a spec was refused. Raised before any process starts.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The TOML did not parse or a field had the wrong type or name.
    #[error("VM spec is not valid; fix the field named below and retry")]
    Parse(#[source] toml::de::Error),
    /// The spec could not be written as TOML.
    #[error("VM spec cannot be written as TOML")]
    Serialize(#[source] toml::ser::Error),
    /// A VM or disk name is empty, too long or has unsafe characters.
    #[error(
        "{what} name {name:?} is not allowed; use 1 to {MAX_NAME_LEN} of A-Z a-z 0-9 . _ -, not starting with . or -"
    )]
    Name {
        /// `VM` or `disk`.
        what: &'static str,
        /// The name.
        name: String,
    },
    /// `cpus` is out of range.
    #[error("cpus = {cpus} is out of range; use 1 to {MAX_CPUS}")]
    Cpus {
        /// The value given.
        cpus: u32,
    },
    /// `memory` is out of range.
    #[error("memory = {mib} MiB is out of range; use {MIN_MEMORY_MIB} MiB to {MAX_MEMORY_MIB} MiB")]
    Memory {
        /// The value given, in MiB.
        mib: u64,
    },
    /// `machine` has characters QEMU would read as options.
    #[error("machine {machine:?} is not a machine type; use a name such as \"pc\" or \"q35\"")]
    Machine {
        /// The value given.
        machine: String,
    },
    /// Neither `boot.kernel` nor `boot.disk` is set.
    #[error("the spec does not say how to boot; set boot.kernel or boot.disk")]
    NoBootSource,
    /// Both `boot.kernel` and `boot.disk` are set.
    #[error("boot.kernel and boot.disk are both set; keep one of them")]
    TwoBootSources,
    /// `boot.initrd` or `boot.append` without `boot.kernel`.
    #[error(
        "boot.initrd and boot.append only apply to a kernel boot; set boot.kernel or remove them"
    )]
    KernelOptionWithoutKernel,
    /// `boot.disk` names no disk of the spec.
    #[error("boot.disk = {disk:?} names no disk; add it to [[disks]] or fix the name")]
    BootDiskUnknown {
        /// The name given.
        disk: String,
    },
    /// Two disks share a name.
    #[error("disk name {disk:?} is used twice; give each disk its own name")]
    DuplicateDisk {
        /// The repeated name.
        disk: String,
    },
    /// A disk's export name cannot be passed to QEMU.
    #[error(
        "disk {disk:?}: export name {export:?} is not allowed; use 1 to 4096 bytes without commas"
    )]
    ExportName {
        /// The disk.
        disk: String,
        /// The export name.
        export: String,
    },
    /// A path is relative, not UTF-8 or holds a comma.
    #[error("{field} = {path:?} {why}; give an absolute UTF-8 path without commas")]
    Path {
        /// The spec field.
        field: &'static str,
        /// The path.
        path: PathBuf,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A Unix socket path does not fit in `sun_path`.
    #[error(
        "{field} = {path:?} is {len} bytes; Unix socket paths hold at most {MAX_SOCKET_PATH}: use a shorter directory"
    )]
    SocketPathTooLong {
        /// The spec field.
        field: &'static str,
        /// The path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
    /// An extra argument is one the runner manages.
    #[error("extra_args has {arg:?}, which the runner sets itself; use the spec field instead")]
    ManagedArg {
        /// The argument.
        arg: String,
    },
    /// The kernel or initrd cannot be opened.
    #[error("{field} = {path:?} cannot be read; check the path and its permissions")]
    Unreadable {
        /// The spec field.
        field: &'static str,
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A disk's NBD socket is missing or not a socket.
    #[error(
        "disk {disk:?}: no NBD server socket at {path:?}; start the server (serve the export) first"
    )]
    DiskSocket {
        /// The disk.
        disk: String,
        /// The socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The RAM directory is missing or not a directory.
    #[error(
        "paths.ram_dir = {path:?} is not a usable directory; create it (a tmpfs such as /dev/shm)"
    )]
    RamDir {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The RAM directory has no room for the RAM file.
    #[error(
        "paths.ram_dir = {path:?} has {available} bytes free but the RAM file needs {need}; lower memory or free space"
    )]
    RamDirFull {
        /// The directory.
        path: PathBuf,
        /// Bytes needed.
        need: u64,
        /// Bytes available.
        available: u64,
    },
}

/// What failed while starting, watching or stopping a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The spec was refused; nothing was started.
    #[error("VM spec refused; nothing was started")]
    Spec(#[source] SpecError),
    /// The spec asks for KVM but the runner does not allow it.
    #[error(
        "VM {name}: accel = \"kvm\" but this runner does not allow KVM; use accel = \"tcg\" or enable KVM in the runner"
    )]
    KvmNotAllowed {
        /// The VM.
        name: String,
    },
    /// The spec asks for KVM but `/dev/kvm` does not open.
    #[error(
        "VM {name}: accel = \"kvm\" but /dev/kvm cannot be opened; use accel = \"tcg\" or \"auto\""
    )]
    KvmUnavailable {
        /// The VM.
        name: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A VM of that name is already registered.
    #[error("a VM named {name} already exists; stop it first or pick another name")]
    NameTaken {
        /// The name.
        name: String,
    },
    /// No VM of that name is registered.
    #[error("no VM named {name}; `vm list` shows the VMs")]
    NotFound {
        /// The name.
        name: String,
    },
    /// The RAM file exists although the launch was to create it.
    #[error(
        "RAM file {path:?} already exists; another VM of this name may be running: stop it, or remove the file if it is stale"
    )]
    RamFileExists {
        /// The RAM file.
        path: PathBuf,
    },
    /// The launch was to reuse a RAM file that is missing or has the wrong size.
    #[error("RAM file {path:?} cannot be reused: {why}; copy the VM's RAM there first")]
    RamFileUnusable {
        /// The RAM file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Preparing the state directory or the QEMU log failed.
    #[error("cannot prepare {path:?} for the VM; check the state directory's permissions")]
    Prepare {
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU could not be started.
    #[error("cannot start {qemu:?}; install qemu-system-x86 or set the runner's QEMU path")]
    Spawn {
        /// The QEMU binary.
        qemu: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The supervisor thread could not be started.
    #[error("cannot start the supervisor thread; the process is short of threads or memory")]
    Thread(#[source] std::io::Error),
    /// QEMU exited before its QMP socket answered.
    #[error("QEMU exited during start-up ({exit}); its log ends with:\n{log_tail}")]
    EarlyExit {
        /// How it exited.
        exit: String,
        /// End of the QEMU log.
        log_tail: String,
    },
    /// The QMP socket did not answer in time.
    #[error(
        "QEMU's QMP socket did not answer within {timeout:?}; QEMU was killed. Its log ends with:\n{log_tail}"
    )]
    QmpStartup {
        /// The limit.
        timeout: Duration,
        /// End of the QEMU log.
        log_tail: String,
        /// The last QMP error.
        #[source]
        source: QmpError,
    },
    /// A QMP command failed.
    #[error("QMP {command} failed for VM {name}; `vm status` shows whether QEMU still runs")]
    Qmp {
        /// The VM.
        name: String,
        /// The command.
        command: &'static str,
        /// Cause.
        #[source]
        source: QmpError,
    },
    /// QEMU did not exit even after SIGKILL.
    #[error(
        "QEMU (pid {pid}) did not exit within {timeout:?} of SIGKILL; it may be stuck in the kernel (check `ps -o stat -p {pid}`)"
    )]
    StopTimeout {
        /// The process.
        pid: u32,
        /// The limit.
        timeout: Duration,
    },
}
