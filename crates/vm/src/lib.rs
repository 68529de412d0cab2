//! Run QEMU guests for understudy: a validated spec, the QEMU command line,
//! a supervised process with its QMP session, and a registry of VMs.
//!
//! ```text
//!   VmSpec (TOML) ─validate─► Vm::launch ─► QEMU ─┬─ QMP socket ◄── Vm::qmp / state / stop
//!                                                ├─ serial log, QEMU log
//!                                                ├─ RAM file (RAM_DIR/NAME.ram, share=on)
//!                                                └─ disks: NBD on Unix sockets
//!   Runner: name ─► Arc<Vm>, start / list / status / stop (VmStatus is JSON-ready)
//! ```
//!
//! The library reads no environment and no configuration file: the caller
//! (the daemon) passes the spec text or struct and a [`RunnerConfig`].
//! `docs/vm.md` documents the spec, the flags and the limits.
//!
//! ```no_run
//! # fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use understudy_vm::{LaunchMode, Runner, RunnerConfig, StopOptions, VmSpec};
//! let spec = VmSpec::from_toml(
//!     r#"
//!     name = "demo"
//!     memory = "128M"
//!     [boot]
//!     kernel = "/srv/vmlinuz"
//!     initrd = "/srv/initrd.gz"
//!     "#,
//! )?;
//! let runner = Runner::new(RunnerConfig::default(), None);
//! let vm = runner.start(spec, LaunchMode::default())?;
//! println!("{}", serde_json::to_string(&vm.status())?);
//! runner.stop("demo", &StopOptions::default())?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod cmdline;
mod error;
mod process;
mod runner;
mod spec;
mod validate;
mod vm;

pub use cmdline::{AccelKind, LaunchMode, VmPaths, qemu_args};
pub use error::{SpecError, VmError};
pub use process::{ExitInfo, VmEvent};
pub use runner::{Runner, RunnerConfig, VmStatus};
pub use spec::{
    Accel, Boot, DEFAULT_APPEND, DiskSpec, MAX_CPUS, MAX_MEMORY_MIB, MAX_NAME_LEN, MAX_SOCKET_PATH,
    MIN_MEMORY_MIB, MemorySize, PathsSpec, VmSpec,
};
pub use vm::{LaunchOptions, StopOptions, Vm, VmState};
