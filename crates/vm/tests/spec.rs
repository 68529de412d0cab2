//! Spec parsing and every validation error, without starting QEMU.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use understudy_vm::{Accel, DEFAULT_APPEND, MemorySize, RunnerConfig, SpecError, VmPaths, VmSpec};

/// A directory with a kernel, an initrd and a listening NBD-like socket,
/// so that the host checks pass unless a test breaks one on purpose.
struct Fixture {
    dir: tempfile::TempDir,
    _listener: UnixListener,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("vmlinuz"), b"kernel").expect("kernel");
        std::fs::write(dir.path().join("initrd.gz"), b"initrd").expect("initrd");
        std::fs::create_dir(dir.path().join("ram")).expect("ram dir");
        let listener = UnixListener::bind(dir.path().join("nbd.sock")).expect("bind");
        Self {
            dir,
            _listener: listener,
        }
    }
    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    /// A full, valid spec as TOML, with `extra` appended at top level
    /// before the tables.
    fn toml(&self, top: &str, boot: &str, disks: &str) -> String {
        format!(
            "name = \"t1\"\nmemory = \"64M\"\n{top}\n\
             [paths]\nram_dir = \"{ram}\"\n\
             [boot]\n{boot}\n{disks}",
            ram = self.p("ram").display()
        )
    }
    fn kernel_boot(&self) -> String {
        format!(
            "kernel = \"{}\"\ninitrd = \"{}\"",
            self.p("vmlinuz").display(),
            self.p("initrd.gz").display()
        )
    }
    fn disk(&self, name: &str) -> String {
        format!(
            "[[disks]]\nname = \"{name}\"\nsocket = \"{}\"\n",
            self.p("nbd.sock").display()
        )
    }
    fn valid(&self) -> VmSpec {
        let s = VmSpec::from_toml(&self.toml("", &self.kernel_boot(), &self.disk("root")))
            .expect("parse");
        s.validate().expect("valid");
        s
    }
}

#[test]
fn parses_a_full_spec_with_defaults() {
    let f = Fixture::new();
    let s = f.valid();
    assert_eq!(s.name, "t1");
    assert_eq!(s.cpus, 1);
    assert_eq!(s.memory, MemorySize::from_mib(64));
    assert_eq!(s.machine, "pc");
    assert_eq!(s.accel, Accel::Tcg);
    assert_eq!(s.append(), DEFAULT_APPEND);
    assert_eq!(s.disks.len(), 1);
    assert_eq!(s.disks[0].export_name(), "root");
    assert!(!s.disks[0].readonly);
    assert!(s.extra_args.is_empty());
    assert_eq!(s.ram_file(), f.p("ram").join("t1.ram"));
    // Round trip through TOML.
    let again = VmSpec::from_toml(&s.to_toml().expect("to toml")).expect("reparse");
    assert_eq!(again, s);
}

#[test]
fn defaults_for_a_minimal_spec() {
    let s = VmSpec::from_toml("name = \"m\"\n[boot]\nkernel = \"/k\"\n").expect("parse");
    assert_eq!(s.memory, MemorySize::from_mib(256));
    assert_eq!(s.paths.ram_dir, Path::new("/dev/shm"));
    assert_eq!(s.paths.state_dir, None);
    let p = VmPaths::resolve(&s, Path::new("/run/u")).expect("paths");
    assert_eq!(p.state_dir, Path::new("/run/u/m"));
    assert_eq!(p.qmp_socket, Path::new("/run/u/m/qmp.sock"));
    assert_eq!(p.serial_log, Path::new("/run/u/m/serial.log"));
    assert_eq!(p.qemu_log, Path::new("/run/u/m/qemu.log"));
    assert_eq!(p.ram_file, Path::new("/dev/shm/m.ram"));
    assert_eq!(
        RunnerConfig::default().state_root,
        Path::new("/run/understudy/vms")
    );
}

#[test]
fn memory_sizes() {
    for (text, mib) in [
        ("256", 256),
        ("\"256\"", 256),
        ("\"256M\"", 256),
        ("\"256mib\"", 256),
        ("\"1G\"", 1024),
        ("\"2 GiB\"", 2048),
    ] {
        let s = VmSpec::from_toml(&format!(
            "name = \"m\"\nmemory = {text}\n[boot]\nkernel = \"/k\"\n"
        ))
        .unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(s.memory.mib(), mib, "{text}");
    }
    for bad in ["\"256K\"", "\"lots\"", "-5", "\"\"", "1.5"] {
        let r = VmSpec::from_toml(&format!(
            "name = \"m\"\nmemory = {bad}\n[boot]\nkernel = \"/k\"\n"
        ));
        assert!(matches!(r, Err(SpecError::Parse(_))), "{bad}: {r:?}");
    }
}

#[test]
fn parse_errors_name_the_field() {
    let cases = [
        (
            "name = \"m\"\n[boot]\nkernel = \"/k\"\nkernal = \"/k\"\n",
            "kernal",
        ),
        ("name = \"m\"\ncpu = 2\n[boot]\nkernel = \"/k\"\n", "cpu"),
        (
            "name = \"m\"\naccel = \"xen\"\n[boot]\nkernel = \"/k\"\n",
            "xen",
        ),
        ("name = \"m\"\n", "boot"),
        ("name = \"m\"\n[boot\n", "boot"),
    ];
    for (text, needle) in cases {
        let e = VmSpec::from_toml(text).expect_err(text);
        let full = format!("{e}: {}", std::error::Error::source(&e).expect("source"));
        assert!(full.contains(needle), "{text:?}: {full}");
    }
}

/// Parse `text` (which must parse) and validate it.
fn check(text: &str) -> Result<(), SpecError> {
    VmSpec::from_toml(text).expect("parse").validate()
}

#[test]
fn shape_errors() {
    let f = Fixture::new();
    let kb = f.kernel_boot();
    let disk = f.disk("root");
    let err = |top: &str, boot: &str, disks: &str| check(&f.toml(top, boot, disks)).expect_err(top);

    let e = check(&f.toml("", &kb, "").replace("\"t1\"", "\"../x\"")).expect_err("name");
    assert!(matches!(e, SpecError::Name { what: "VM", .. }), "{e}");
    for bad in ["", ".hidden", "-x", "a b", "a/b", &"n".repeat(65)] {
        let e = check(&f.toml("", &kb, "").replace("\"t1\"", &format!("{bad:?}"))).expect_err(bad);
        assert!(matches!(e, SpecError::Name { .. }), "{bad}: {e}");
    }
    assert!(matches!(
        err("cpus = 0", &kb, ""),
        SpecError::Cpus { cpus: 0 }
    ));
    assert!(matches!(
        err("cpus = 65", &kb, ""),
        SpecError::Cpus { cpus: 65 }
    ));
    let toml = f.toml("", &kb, "");
    let e = check(&toml.replace("\"64M\"", "8")).expect_err("small");
    assert!(matches!(e, SpecError::Memory { mib: 8 }), "{e}");
    let e = check(&toml.replace("\"64M\"", "\"65G\"")).expect_err("big");
    assert!(matches!(e, SpecError::Memory { mib: 66560 }), "{e}");
    let e = err("machine = \"pc,accel=kvm\"", &kb, "");
    assert!(matches!(e, SpecError::Machine { .. }), "{e}");
    assert!(matches!(err("", "", ""), SpecError::NoBootSource));
    let both = format!("{kb}\ndisk = \"root\"");
    assert!(matches!(err("", &both, &disk), SpecError::TwoBootSources));
    let e = err("", "disk = \"root\"\nappend = \"x\"", &disk);
    assert!(matches!(e, SpecError::KernelOptionWithoutKernel), "{e}");
    let e = err("", "disk = \"nope\"", &disk);
    assert!(matches!(e, SpecError::BootDiskUnknown { .. }), "{e}");
    check(&f.toml("", "disk = \"root\"", &disk)).expect("boot disk is valid");
}

#[test]
fn disk_and_path_errors() {
    let f = Fixture::new();
    let kb = f.kernel_boot();
    let err = |top: &str, boot: &str, disks: &str| check(&f.toml(top, boot, disks)).expect_err(top);

    let two = format!("{}{}", f.disk("root"), f.disk("root"));
    let e = err("", &kb, &two);
    assert!(matches!(e, SpecError::DuplicateDisk { .. }), "{e}");
    let e = err("", &kb, &f.disk("bad name"));
    assert!(matches!(e, SpecError::Name { what: "disk", .. }), "{e}");
    let e = err("", &kb, &format!("{}export = \"a,b\"\n", f.disk("root")));
    assert!(matches!(e, SpecError::ExportName { .. }), "{e}");
    let e = err("", "kernel = \"vmlinuz\"", "");
    assert!(
        matches!(
            e,
            SpecError::Path {
                field: "boot.kernel",
                ..
            }
        ),
        "{e}"
    );
    let e = err("", &kb, "[[disks]]\nname = \"r\"\nsocket = \"nbd.sock\"\n");
    assert!(
        matches!(
            e,
            SpecError::Path {
                field: "disks.socket",
                ..
            }
        ),
        "{e}"
    );
    let long = format!("/tmp/{}/nbd.sock", "d".repeat(110));
    let e = err(
        "",
        &kb,
        &format!("[[disks]]\nname = \"r\"\nsocket = \"{long}\"\n"),
    );
    assert!(matches!(e, SpecError::SocketPathTooLong { .. }), "{e}");
    let toml = f.toml("", &kb, "");
    let ram = f.p("ram").display().to_string();
    let e = check(&toml.replace(&ram, "/tmp/a,b")).expect_err("comma");
    assert!(
        matches!(
            e,
            SpecError::Path {
                field: "paths.ram_dir",
                ..
            }
        ),
        "{e}"
    );
    for arg in ["-qmp", "--serial", "-daemonize", "-m", "-incoming"] {
        let e = err(&format!("extra_args = [\"-s\", \"{arg}\", \"x\"]"), &kb, "");
        assert!(
            matches!(&e, SpecError::ManagedArg { arg: a } if a == arg),
            "{arg}: {e}"
        );
    }
    check(&f.toml("extra_args = [\"-device\", \"virtio-rng-pci\"]", &kb, "")).expect("ok");
}

#[test]
fn host_errors() {
    let f = Fixture::new();
    let kb = f.kernel_boot();
    let err = |boot: &str, disks: &str| check(&f.toml("", boot, disks)).expect_err(boot);

    let missing = format!("kernel = \"{}\"", f.p("nope").display());
    let e = err(&missing, "");
    assert!(
        matches!(
            e,
            SpecError::Unreadable {
                field: "boot.kernel",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("cannot be read"), "{e}");
    let no_initrd = format!(
        "{}\ninitrd = \"/nonexistent/initrd\"",
        &kb[..kb.find('\n').expect("nl")]
    );
    let e = err(&no_initrd, "");
    assert!(
        matches!(
            e,
            SpecError::Unreadable {
                field: "boot.initrd",
                ..
            }
        ),
        "{e}"
    );

    let gone = format!(
        "[[disks]]\nname = \"r\"\nsocket = \"{}\"\n",
        f.p("gone.sock").display()
    );
    let e = err(&kb, &gone);
    assert!(matches!(e, SpecError::DiskSocket { .. }), "{e}");
    let file = format!(
        "[[disks]]\nname = \"r\"\nsocket = \"{}\"\n",
        f.p("vmlinuz").display()
    );
    assert!(matches!(err(&kb, &file), SpecError::DiskSocket { .. }));

    let toml = f.toml("", &kb, "");
    let ram = f.p("ram").display().to_string();
    let e = check(&toml.replace(&ram, &f.p("noram").display().to_string())).expect_err("ram");
    assert!(matches!(e, SpecError::RamDir { .. }), "{e}");
    let e = check(&toml.replace(&ram, &f.p("vmlinuz").display().to_string())).expect_err("ram");
    assert!(matches!(e, SpecError::RamDir { .. }), "{e}");
}

#[test]
fn ram_dir_without_room() {
    let f = Fixture::new();
    let toml = f
        .toml("", &f.kernel_boot(), "")
        .replace("\"64M\"", "\"64G\"")
        .replace(&f.p("ram").display().to_string(), "/dev/shm");
    match check(&toml) {
        Err(SpecError::RamDirFull {
            need, available, ..
        }) => {
            assert_eq!(need, 64 << 30);
            assert!(available < need);
        }
        Ok(()) => eprintln!("/dev/shm has 64 GiB free; RamDirFull not exercised"),
        Err(e) => panic!("expected RamDirFull, got {e}"),
    }
}

#[test]
fn state_dir_socket_too_long() {
    let f = Fixture::new();
    let s = f.valid();
    let long = PathBuf::from(format!("/tmp/{}", "s".repeat(100)));
    let e = VmPaths::resolve(&s, &long).expect_err("long");
    assert!(matches!(e, SpecError::SocketPathTooLong { .. }), "{e}");
    let e = VmPaths::resolve(&s, Path::new("relative")).expect_err("relative");
    assert!(matches!(e, SpecError::Path { .. }), "{e}");
}
