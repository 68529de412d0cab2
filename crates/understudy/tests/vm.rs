#![allow(clippy::unwrap_used)]
//! `understudy vm ...` against a real daemon running real QEMU guests under
//! TCG, with the kernel and initramfs from `scripts/guest/build.sh` (and
//! `build-fs.sh` for the disk workload) in `$UNDERSTUDY_GUEST_CACHE`
//! (default `~/.cache/understudy/guest`). Without them the guest tests
//! print a message and pass, unless `UNDERSTUDY_REQUIRE_GUEST=1`, which
//! makes them fail. The refusal tests need no guest.
//!
//! One lock keeps to one guest at a time: TCG is CPU-bound and the hosts
//! these run on are small.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::Server;
use serde_json::Value;

/// Boot to userspace takes about 2 s on an idle host; a loaded one is far
/// slower, and anything past this is a hang.
const DEADLINE: Duration = Duration::from_secs(300);

static ONE_GUEST: Mutex<()> = Mutex::new(());

fn guest_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("UNDERSTUDY_GUEST_CACHE") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/understudy/guest")
}

/// The kernel and the initramfs `initrd`, or `None` (with a message) when
/// they are not built and not required.
fn guest(initrd: &str, script: &str) -> Option<(PathBuf, PathBuf)> {
    let g = guest_dir();
    let (k, i) = (g.join("vmlinuz"), g.join(initrd));
    if k.is_file() && i.is_file() {
        return Some((k, i));
    }
    let required = std::env::var_os("UNDERSTUDY_REQUIRE_GUEST").is_some_and(|v| v == "1");
    assert!(
        !required,
        "guest artefacts missing in {}: run scripts/guest/{script}",
        g.display()
    );
    eprintln!(
        "guest artefacts not built in {} (run scripts/guest/{script}); test not exercised",
        g.display()
    );
    None
}

/// A VM name unique to this test process (the RAM file is in /dev/shm).
fn vm_name(tag: &str) -> String {
    format!("ut-{tag}-{}", std::process::id())
}

/// A daemon with one `--export` (`base`, a 4 MiB raw image) and its VM
/// directory beside its control socket in `dir`.
fn daemon(dir: &Path) -> Server {
    let base = dir.join("base.img");
    std::fs::File::create(&base)
        .and_then(|f| f.set_len(4 << 20))
        .unwrap();
    let export = format!("name=base,path={},format=raw", base.display());
    Server::start(dir, &["--export", &export])
}

fn raw_image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .and_then(|f| f.set_len(size))
        .unwrap();
    p
}

fn json_of(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn status(s: &Server, name: &str) -> Value {
    json_of(&s.ctl_ok(&["vm", "status", name, "--json"]))
}

fn vm_names(s: &Server) -> Vec<String> {
    let v = json_of(&s.ctl_ok(&["vm", "list", "--json"]));
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect()
}

/// Exports by name, from `export list --json`.
fn exports(s: &Server) -> Vec<Value> {
    json_of(&s.ctl_ok(&["export", "list", "--json"]))
        .as_array()
        .unwrap()
        .clone()
}

fn export_names(s: &Server) -> Vec<String> {
    exports(s)
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect()
}

/// Whether a QEMU process of this VM runs (its command line names the
/// VM's RAM file).
fn qemu_running(name: &str) -> bool {
    let needle = format!("/{name}.ram");
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
    })
}

fn process_gone(pid: u64) -> bool {
    // A zombie still has /proc/PID; its state is Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_or(true, |s| s.split_whitespace().nth(2) == Some("Z"))
}

/// Poll the VM's serial log until it holds `needle`; panics with the logs
/// if QEMU exits first or the deadline passes.
fn wait_serial(s: &Server, name: &str, needle: &str) -> String {
    let t0 = Instant::now();
    loop {
        let st = status(s, name);
        let serial_log = st["serial_log"].as_str().unwrap().to_string();
        let serial = std::fs::read_to_string(&serial_log).unwrap_or_default();
        if serial.contains(needle) {
            eprintln!("{needle} after {:.1} s", t0.elapsed().as_secs_f64());
            return serial;
        }
        assert!(
            st["state"] != "exited" && t0.elapsed() < DEADLINE,
            "no {needle:?} in the serial log ({st}, {:?} elapsed)\nserial:\n{serial}\nqemu log:\n{}",
            t0.elapsed(),
            std::fs::read_to_string(st["qemu_log"].as_str().unwrap()).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Poll `vm status` until the VM has exited; returns the status.
fn wait_exited(s: &Server, name: &str) -> Value {
    let t0 = Instant::now();
    loop {
        let st = status(s, name);
        if st["state"] == "exited" {
            return st;
        }
        assert!(t0.elapsed() < DEADLINE, "VM {name} did not exit: {st}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn start_args<'a>(
    name: &'a str,
    kernel: &'a str,
    initrd: &'a str,
    append: &'a str,
) -> Vec<&'a str> {
    vec![
        "vm", "start", name, "--kernel", kernel, "--initrd", initrd, "--append", append,
        "--memory", "128M",
    ]
}

#[test]
fn vm_runs_with_daemon_served_disks_and_stop_releases_them() {
    let Some((kernel, initrd)) = guest("initrd.gz", "build.sh") else {
        return;
    };
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let s = daemon(dir.path());
    let name = vm_name("run");
    let img = raw_image(dir.path(), "root.img", 16 << 20);
    let disk = format!("{},format=raw,bitmap=b,name=root", img.display());
    let (k, i) = (kernel.display().to_string(), initrd.display().to_string());
    let mut args = start_args(&name, &k, &i, "console=ttyS0 quiet panic=-1 mode=idle");
    args.extend(["--disk", &disk, "--disk", "export=base,name=data"]);
    let out = s.ctl_ok(&args);
    assert!(out.contains("started VM"), "{out}");
    wait_serial(&s, &name, "GUEST-UP mode=idle");

    let st = status(&s, &name);
    assert_eq!(st["state"], "running", "{st}");
    let pid = st["pid"].as_u64().unwrap();
    assert!(!process_gone(pid), "QEMU {pid} is not running: {st}");
    let own = format!("{name}-root");
    assert_eq!(st["disks"][0]["export"], own.as_str(), "{st}");
    assert_eq!(st["disks"][0]["opened"], true, "{st}");
    assert_eq!(st["disks"][1]["export"], "base", "{st}");
    assert_eq!(st["disks"][1]["opened"], false, "{st}");
    assert_eq!(vm_names(&s), vec![name.clone()]);
    let list = exports(&s);
    let e = list.iter().find(|e| e["name"] == own.as_str()).unwrap();
    assert_eq!(e["vm"], name.as_str(), "{e}");
    assert_eq!(e["bitmaps"][0]["name"], "b", "{e}");
    // QEMU is connected to both exports through the daemon's socket.
    let qemu_log = std::fs::read_to_string(st["qemu_log"].as_str().unwrap()).unwrap();
    assert!(qemu_log.contains(&format!("export={own}")), "{qemu_log}");

    let out = s.ctl_ok(&["vm", "stop", &name]);
    assert!(out.contains(&own), "{out}");
    assert!(process_gone(pid), "QEMU {pid} survived vm stop");
    assert!(vm_names(&s).is_empty());
    let names = export_names(&s);
    assert!(!names.contains(&own), "{names:?}");
    assert!(names.contains(&"base".to_string()), "{names:?}");
    assert!(!Path::new(&format!("/dev/shm/{name}.ram")).exists());
    assert!(s.stop(), "the daemon did not stop cleanly");
}

#[test]
fn guest_disk_writes_go_through_the_block_filter() {
    let Some((kernel, initrd)) = guest("initrd-fs.gz", "build-fs.sh") else {
        return;
    };
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "fs.img", 32 << 20);
    common::run(
        "mkfs.ext4",
        &["-q", "-F", "-b", "4096", img.to_str().unwrap()],
    );
    // A spec file with a relative disk path: resolved against its directory.
    let spec = dir.path().join("vm.toml");
    std::fs::write(
        &spec,
        format!(
            r#"memory = "128M"
[boot]
kernel = "{}"
initrd = "{}"
append = "console=ttyS0 quiet panic=-1"

[[disks]]
name = "root"
path = "fs.img"
format = "raw"
bitmap = "b:4k"
"#,
            kernel.display(),
            initrd.display()
        ),
    )
    .unwrap();
    let s = daemon(dir.path());
    let name = vm_name("fs");
    let own = format!("{name}-root");
    s.ctl_ok(&["vm", "start", &name, "--spec", spec.to_str().unwrap()]);
    wait_serial(&s, &name, "GUEST-UP mode=fs");
    // The guest mounts ext4, runs fsworkload, unmounts and powers off.
    let st = wait_exited(&s, &name);
    let serial = std::fs::read_to_string(st["serial_log"].as_str().unwrap()).unwrap();
    assert_eq!(st["exit"]["code"], 0, "{st}\n{serial}");
    assert_eq!(st["exit"]["expected"], false, "{st}");
    assert!(serial.contains("FSWORKLOAD-DONE"), "{serial}");
    assert!(serial.contains("UMOUNT-OK"), "{serial}");
    // Every write went through the daemon's filter: the bitmap saw them.
    let runs = s.dirty_runs(&own, "b");
    let dirty: u64 = runs.iter().map(|r| r.1).sum();
    assert!(dirty > 0, "no dirty blocks on {own}: {runs:?}");
    // An exited VM keeps its export until vm stop.
    assert!(export_names(&s).contains(&own));
    s.ctl_ok(&["vm", "stop", &name]);
    assert!(!export_names(&s).contains(&own));
    assert!(s.stop());
    // Released cleanly: the file system on the image is intact.
    common::run("e2fsck", &["-f", "-n", img.to_str().unwrap()]);
}

#[test]
fn qemu_killed_from_outside_is_reported_with_its_signal() {
    let Some((kernel, initrd)) = guest("initrd.gz", "build.sh") else {
        return;
    };
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    // A daemon that only hosts VMs: --vm-dir and no --export.
    let vm_dir = dir.path().join("vms");
    let s = Server::start(dir.path(), &["--vm-dir", vm_dir.to_str().unwrap()]);
    let name = vm_name("kill");
    let img = raw_image(dir.path(), "k.img", 8 << 20);
    let disk = img.display().to_string();
    let (k, i) = (kernel.display().to_string(), initrd.display().to_string());
    let mut args = start_args(&name, &k, &i, "console=ttyS0 quiet panic=-1 mode=idle");
    args.extend(["--disk", &disk]);
    s.ctl_ok(&args);
    let st = status(&s, &name);
    let socket = vm_dir.join("nbd.sock");
    assert_eq!(st["disks"][0]["socket"], socket.to_str().unwrap(), "{st}");
    let pid = st["pid"].as_u64().unwrap();
    common::run("kill", &["-9", &pid.to_string()]);

    let st = wait_exited(&s, &name);
    assert_eq!(st["exit"]["signal"], 9, "{st}");
    assert_eq!(st["exit"]["expected"], false, "{st}");
    let list = s.ctl_ok(&["vm", "list"]);
    assert!(list.contains("exited (signal 9)"), "{list}");
    assert!(
        s.log_text().contains("QEMU exited on its own"),
        "{}",
        s.log_text()
    );
    // The disk stays served until vm stop, which releases it.
    let own = format!("{name}-disk0");
    assert!(export_names(&s).contains(&own));
    s.ctl_ok(&["vm", "stop", &name]);
    assert!(!export_names(&s).contains(&own));
    assert!(vm_names(&s).is_empty());
    assert!(s.stop());
}

/// Refusals need no guest: they all happen before QEMU runs, or QEMU
/// refuses its arguments at once.
#[test]
fn bad_specs_are_refused_before_qemu_and_leave_no_export() {
    let dir = tempfile::tempdir().unwrap();
    let s = daemon(dir.path());
    let name = vm_name("bad");
    let img = raw_image(dir.path(), "b.img", 8 << 20);
    let disk = format!("{},bitmap=b", img.display());
    let before = export_names(&s);
    let refused = |args: &[&str], expect: &str| {
        let out = s.ctl(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(err.contains(expect), "{args:?}: {err}");
        assert!(!qemu_running(&name), "{args:?} left a QEMU running");
        assert_eq!(export_names(&s), before, "{args:?} left an export");
        assert!(vm_names(&s).is_empty(), "{args:?} left a VM");
        err
    };

    // A missing kernel, with an image disk that must not stay open.
    let missing = dir.path().join("no-such-vmlinuz");
    let m = missing.display().to_string();
    let err = refused(
        &["vm", "start", &name, "--kernel", &m, "--disk", &disk],
        "boot.kernel",
    );
    assert!(err.contains("cannot be read"), "{err}");
    // Nothing to boot at all.
    refused(&["vm", "start", &name], "--kernel");
    // A typo in a spec file.
    let spec = dir.path().join("typo.toml");
    std::fs::write(&spec, format!("[boot]\nkernal = \"{m}\"\n")).unwrap();
    refused(
        &["vm", "start", &name, "--spec", spec.to_str().unwrap()],
        "kernal",
    );
    // KVM, which this daemon does not allow: the image's export is
    // opened, then released.
    std::fs::write(
        &spec,
        format!(
            "accel = \"kvm\"\n[boot]\nkernel = \"/bin/sh\"\n[[disks]]\nname = \"d\"\npath = \"{}\"\n",
            img.display()
        ),
    )
    .unwrap();
    refused(
        &["vm", "start", &name, "--spec", spec.to_str().unwrap()],
        "--vm-allow-kvm",
    );
    // Not TOML.
    std::fs::write(&spec, "memory = \n").unwrap();
    refused(
        &["vm", "start", &name, "--spec", spec.to_str().unwrap()],
        "not a valid TOML spec",
    );
    // A disk with both an export and a path; an unknown export.
    refused(
        &[
            "vm",
            "start",
            &name,
            "--kernel",
            "/bin/sh",
            "--disk",
            "export=base,path=/x",
        ],
        "either export",
    );
    refused(
        &[
            "vm",
            "start",
            &name,
            "--kernel",
            "/bin/sh",
            "--disk",
            "export=nope",
        ],
        "no export named",
    );
    // Two disks on one export.
    refused(
        &[
            "vm",
            "start",
            &name,
            "--kernel",
            "/bin/sh",
            "--disk",
            "export=base",
            "--disk",
            "export=base",
        ],
        "another disk's too",
    );
    // An image this daemon already serves.
    let base = dir.path().join("base.img").display().to_string();
    refused(
        &["vm", "start", &name, "--kernel", "/bin/sh", "--disk", &base],
        "already served as export base",
    );
    // Out-of-range memory.
    refused(
        &[
            "vm", "start", &name, "--kernel", "/bin/sh", "--memory", "1M",
        ],
        "memory",
    );
    // QEMU refuses an argument: it exits at once, the export is released
    // and the error quotes QEMU's log.
    let err = refused(
        &[
            "vm",
            "start",
            &name,
            "--kernel",
            "/bin/sh",
            "--disk",
            &disk,
            "--qemu-arg=-no-such-flag",
        ],
        "no-such-flag",
    );
    assert!(err.contains("QEMU"), "{err}");
    assert!(!Path::new(&format!("/dev/shm/{name}.ram")).exists());
    assert!(s.stop());
}

#[test]
fn sigterm_stops_the_daemons_vms_first() {
    let Some((kernel, initrd)) = guest("initrd.gz", "build.sh") else {
        return;
    };
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let s = daemon(dir.path());
    let name = vm_name("term");
    let img = raw_image(dir.path(), "t.img", 8 << 20);
    let disk = format!("{},bitmap=b", img.display());
    let (k, i) = (kernel.display().to_string(), initrd.display().to_string());
    let mut args = start_args(&name, &k, &i, "console=ttyS0 quiet panic=-1 mode=idle");
    args.extend(["--disk", &disk]);
    s.ctl_ok(&args);
    let pid = status(&s, &name)["pid"].as_u64().unwrap();
    let log = s.log.clone();
    assert!(s.stop(), "the daemon did not stop cleanly");
    assert!(process_gone(pid), "QEMU {pid} outlived the daemon");
    assert!(!qemu_running(&name));
    assert!(!Path::new(&format!("/dev/shm/{name}.ram")).exists());
    let text = std::fs::read_to_string(log).unwrap();
    assert!(text.contains("VM stopped for shutdown"), "{text}");
    // The bitmap store was closed cleanly: a new daemon serving the image
    // does not report it recovered.
    let export = format!("name=t,path={},format=raw,bitmap=b", img.display());
    let s2 = Server::start(dir.path(), &["--export", &export]);
    let e = exports(&s2);
    assert_eq!(e[0]["bitmaps"][0]["recovered"], false, "{e:?}");
    assert!(s2.stop());
}
