//! Spec checks, in two steps: the spec's own rules (pure), then the host.
//!
//! Like nbdkit's validate-then-dispatch, nothing here has side effects: a
//! spec that passes can still fail to launch (QEMU may refuse an extra
//! argument), but one that fails never starts a process.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use crate::error::SpecError;
use crate::spec::{
    MAX_CPUS, MAX_MEMORY_MIB, MAX_NAME_LEN, MAX_SOCKET_PATH, MIN_MEMORY_MIB, VmSpec,
};

/// QEMU flags the runner sets itself; an `extra_args` copy would break
/// supervision (`-daemonize`, `-qmp`, `-serial`) or contradict the spec.
const MANAGED_FLAGS: &[&str] = &[
    "accel",
    "append",
    "daemonize",
    "enable-kvm",
    "incoming",
    "initrd",
    "kernel",
    "m",
    "machine",
    "M",
    "mem-path",
    "pidfile",
    "qmp",
    "qmp-pretty",
    "serial",
    "smp",
];

pub(crate) fn check_shape(s: &VmSpec) -> Result<(), SpecError> {
    check_name("VM", &s.name)?;
    if !(1..=MAX_CPUS).contains(&s.cpus) {
        return Err(SpecError::Cpus { cpus: s.cpus });
    }
    let mib = s.memory.mib();
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mib) {
        return Err(SpecError::Memory { mib });
    }
    check_machine(&s.machine)?;
    check_boot(s)?;
    check_disks(s)?;
    check_paths(s)?;
    check_extra_args(&s.extra_args)
}

/// Names end up in file names and QEMU option values.
pub(crate) fn check_name(what: &'static str, name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(SpecError::Name {
            what,
            name: name.to_string(),
        })
    }
}

fn check_machine(m: &str) -> Result<(), SpecError> {
    // A comma would let the machine string add options to `-machine`.
    let ok = !m.is_empty()
        && m.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(SpecError::Machine {
            machine: m.to_string(),
        })
    }
}

fn check_boot(s: &VmSpec) -> Result<(), SpecError> {
    let b = &s.boot;
    match (&b.kernel, &b.disk) {
        (None, None) => return Err(SpecError::NoBootSource),
        (Some(_), Some(_)) => return Err(SpecError::TwoBootSources),
        (None, Some(d)) => {
            if b.initrd.is_some() || b.append.is_some() {
                return Err(SpecError::KernelOptionWithoutKernel);
            }
            if !s.disks.iter().any(|x| &x.name == d) {
                return Err(SpecError::BootDiskUnknown { disk: d.clone() });
            }
        }
        (Some(k), None) => {
            check_path("boot.kernel", k, false)?;
            if let Some(i) = &b.initrd {
                check_path("boot.initrd", i, false)?;
            }
        }
    }
    Ok(())
}

fn check_disks(s: &VmSpec) -> Result<(), SpecError> {
    let mut seen = HashSet::new();
    for d in &s.disks {
        check_name("disk", &d.name)?;
        if !seen.insert(d.name.as_str()) {
            return Err(SpecError::DuplicateDisk {
                disk: d.name.clone(),
            });
        }
        check_path("disks.socket", &d.socket, true)?;
        check_socket_len("disks.socket", &d.socket)?;
        let e = d.export_name();
        // NBD allows 4096 bytes; QEMU's option syntax cannot carry a comma.
        if e.is_empty() || e.len() > 4096 || e.contains(',') || e.contains('\0') {
            return Err(SpecError::ExportName {
                disk: d.name.clone(),
                export: e.to_string(),
            });
        }
    }
    Ok(())
}

fn check_paths(s: &VmSpec) -> Result<(), SpecError> {
    check_path("paths.ram_dir", &s.paths.ram_dir, true)?;
    if let Some(d) = &s.paths.state_dir {
        check_path("paths.state_dir", d, true)?;
    }
    Ok(())
}

/// Paths must be absolute (the daemon's working directory is not the
/// user's) and UTF-8; those inside QEMU option strings must not hold a
/// comma, which QEMU reads as the next option.
pub(crate) fn check_path(field: &'static str, p: &Path, in_option: bool) -> Result<(), SpecError> {
    let bad = |why: &'static str| SpecError::Path {
        field,
        path: p.to_path_buf(),
        why,
    };
    let Some(s) = p.to_str() else {
        return Err(bad("is not UTF-8"));
    };
    if !p.is_absolute() {
        return Err(bad("is not absolute"));
    }
    if in_option && s.contains(',') {
        return Err(bad(
            "contains a comma, which QEMU reads as an option separator",
        ));
    }
    Ok(())
}

pub(crate) fn check_socket_len(field: &'static str, p: &Path) -> Result<(), SpecError> {
    let len = p.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(SpecError::SocketPathTooLong {
            field,
            path: p.to_path_buf(),
            len,
        });
    }
    Ok(())
}

fn check_extra_args(args: &[String]) -> Result<(), SpecError> {
    for a in args {
        // QEMU accepts both -flag and --flag.
        let flag = a.strip_prefix("--").or_else(|| a.strip_prefix('-'));
        if flag.is_some_and(|f| MANAGED_FLAGS.contains(&f)) {
            return Err(SpecError::ManagedArg { arg: a.clone() });
        }
    }
    Ok(())
}

pub(crate) fn check_host(s: &VmSpec) -> Result<(), SpecError> {
    if let Some(k) = &s.boot.kernel {
        File::open(k).map_err(|source| SpecError::Unreadable {
            field: "boot.kernel",
            path: k.clone(),
            source,
        })?;
    }
    if let Some(i) = &s.boot.initrd {
        File::open(i).map_err(|source| SpecError::Unreadable {
            field: "boot.initrd",
            path: i.clone(),
            source,
        })?;
    }
    for d in &s.disks {
        let is_socket = std::fs::metadata(&d.socket).map(|m| m.file_type().is_socket());
        match is_socket {
            Ok(true) => {}
            Ok(false) => {
                return Err(SpecError::DiskSocket {
                    disk: d.name.clone(),
                    path: d.socket.clone(),
                    source: std::io::Error::other("not a Unix socket"),
                });
            }
            Err(source) => {
                return Err(SpecError::DiskSocket {
                    disk: d.name.clone(),
                    path: d.socket.clone(),
                    source,
                });
            }
        }
    }
    check_ram_dir(s)
}

/// The RAM directory exists and can hold the RAM file (counting what an
/// existing file of the same name already occupies).
fn check_ram_dir(s: &VmSpec) -> Result<(), SpecError> {
    let dir = &s.paths.ram_dir;
    let meta = std::fs::metadata(dir).map_err(|source| SpecError::RamDir {
        path: dir.clone(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(SpecError::RamDir {
            path: dir.clone(),
            source: std::io::Error::other("not a directory"),
        });
    }
    let available = free_bytes(dir).map_err(|source| SpecError::RamDir {
        path: dir.clone(),
        source,
    })?;
    let held = std::fs::metadata(s.ram_file()).map_or(0, |m| m.blocks() * 512);
    let need = s.memory.bytes().saturating_sub(held);
    if need > available {
        return Err(SpecError::RamDirFull {
            path: dir.clone(),
            need,
            available,
        });
    }
    Ok(())
}

/// Bytes an unprivileged process may still write in the file system of `p`.
fn free_bytes(p: &Path) -> std::io::Result<u64> {
    let c = CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: statvfs is plain old data; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path that outlives the call and `st`
    // is a valid, writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}
