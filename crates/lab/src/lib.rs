//! Experiment tooling: records memory traces of real guests; not used by
//! the daemon.
//!
//! [`record()`] boots the small Linux guest that `scripts/guest/build.sh`
//! builds under QEMU (TCG) with its RAM in a shared file, runs a workload
//! in it and, every interval of guest run time, stops it over QMP
//! (`understudy-qmp`) and copies its RAM into a trace directory in the
//! format of `understudy_memsync::trace`. `understudy mem replay` then
//! measures the memory-sync methods over that trace.
//!
//! ```text
//!   guest dir (vmlinuz, initrd.gz) ──► record() ──► QEMU ◄── QMP stop / cont
//!                                          │ copy RAM file
//!                                          ▼
//!                              trace dir 0000.ram, 0001.ram, ...
//! ```
//!
//! Unlike the daemon's libraries this crate starts processes (QEMU); it
//! still reads no environment variable of its own: the caller passes the
//! guest directory, or builds it with [`guest_cache_dir`] from values it
//! read.
#![warn(missing_docs)]

mod guest;
mod record;

pub use guest::{GuestArtefacts, guest_cache_dir};
pub use record::{RecordError, RecordOptions, RecordReport, record};
