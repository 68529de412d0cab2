//! Real QEMU guests under TCG, with the kernel and initramfs from
//! `scripts/guest/build.sh` (and `build-fs.sh` for the disk test) in
//! `$UNDERSTUDY_GUEST_CACHE` (default `~/.cache/understudy/guest`).
//! Without them the tests print a message and pass, unless
//! `UNDERSTUDY_REQUIRE_GUEST=1`, which makes them fail.
//!
//! The tests take one lock so that at most one guest boots at a time: the
//! hosts these run on are small and TCG is CPU-bound.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use understudy_vm::{
    LaunchMode, Runner, RunnerConfig, SpecError, StopOptions, Vm, VmError, VmEvent, VmSpec, VmState,
};

/// Boot to userspace takes about 2 s on an idle host; a loaded one is far
/// slower, and anything past this is a hang.
const BOOT_DEADLINE: Duration = Duration::from_secs(300);

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

fn runner(dir: &Path) -> (Runner, Receiver<VmEvent>) {
    let (tx, rx) = channel();
    let cfg = RunnerConfig {
        state_root: dir.join("state"),
        qmp_timeout: Duration::from_secs(120),
        ..RunnerConfig::default()
    };
    (Runner::new(cfg, Some(tx)), rx)
}

fn spec(name: &str, kernel: &Path, initrd: &Path, mode: &str) -> VmSpec {
    let mut s = VmSpec::with_kernel(name, kernel);
    s.boot.initrd = Some(initrd.to_path_buf());
    s.boot.append = Some(format!("console=ttyS0 quiet panic=-1 mode={mode}"));
    s.memory = understudy_vm::MemorySize::from_mib(128);
    s
}

/// Poll the serial log until it holds `needle`; panics with both logs if
/// QEMU exits first or the deadline passes.
fn wait_serial(vm: &Vm, needle: &str) -> String {
    let t0 = Instant::now();
    loop {
        let serial = std::fs::read_to_string(&vm.paths().serial_log).unwrap_or_default();
        if serial.contains(needle) {
            eprintln!("{needle} after {:.1} s", t0.elapsed().as_secs_f64());
            return serial;
        }
        let exited = vm.exit();
        assert!(
            exited.is_none() && t0.elapsed() < BOOT_DEADLINE,
            "no {needle:?} in the serial log (exit: {exited:?}, {:?} elapsed)\nserial:\n{serial}\nqemu log:\n{}",
            t0.elapsed(),
            std::fs::read_to_string(&vm.paths().qemu_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn process_gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn boots_reports_state_and_stops_cleanly() {
    let Some((kernel, initrd)) = guest("initrd.gz", "build.sh") else {
        return;
    };
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let (runner, events) = runner(dir.path());
    let name = vm_name("boot");
    let vm = runner
        .start(spec(&name, &kernel, &initrd, "idle"), LaunchMode::default())
        .expect("start");
    let (pid, ram) = (vm.pid(), vm.paths().ram_file.clone());
    assert!(ram.is_file(), "RAM file {ram:?} missing");
    assert_eq!(std::fs::metadata(&ram).expect("ram").len(), 128 << 20);
    wait_serial(&vm, "GUEST-UP mode=idle");
    assert_eq!(vm.state(), VmState::Running);

    vm.pause().expect("pause");
    let paused = VmState::Paused {
        status: "paused".to_string(),
    };
    assert_eq!(runner.status(&name).expect("status").state, paused);
    vm.resume().expect("resume");
    let listed = runner.list();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].state, VmState::Running);
    let json = serde_json::to_value(&listed[0]).expect("json");
    assert_eq!(json["state"]["state"], "running");
    assert_eq!(json["memory_mib"], 128);
    assert_eq!(json["pid"], pid);

    assert!(matches!(
        runner.start(spec(&name, &kernel, &initrd, "idle"), LaunchMode::default()),
        Err(VmError::NameTaken { .. })
    ));
    let exit = runner.stop(&name, &StopOptions::default()).expect("stop");
    assert!(exit.expected, "{exit:?}");
    assert_eq!(exit.code, Some(0), "quit exits 0: {exit:?}");
    assert!(process_gone(pid), "QEMU {pid} still exists");
    assert!(!ram.exists(), "RAM file {ram:?} left behind");
    assert!(runner.list().is_empty());
    let ev = events.recv_timeout(Duration::from_secs(10)).expect("event");
    assert!(
        matches!(&ev, VmEvent::Exited { name: n, exit } if *n == name && exit.expected),
        "{ev:?}"
    );
    drop(vm);
}

#[test]
fn kill_9_from_outside_is_reported() {
    let Some((kernel, initrd)) = guest("initrd.gz", "build.sh") else {
        return;
    };
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let (runner, events) = runner(dir.path());
    let name = vm_name("kill");
    let vm = runner
        .start(spec(&name, &kernel, &initrd, "idle"), LaunchMode::default())
        .expect("start");
    let (pid, ram) = (vm.pid(), vm.paths().ram_file.clone());
    let st = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(st.success());

    let ev = events
        .recv_timeout(Duration::from_secs(30))
        .expect("exit event");
    let VmEvent::Exited { name: n, exit } = ev else {
        panic!("unexpected event {ev:?}")
    };
    assert_eq!(n, name);
    assert_eq!(
        (exit.signal, exit.code, exit.expected),
        (Some(9), None, false)
    );
    let status = runner.status(&name).expect("still listed");
    assert!(
        matches!(&status.state, VmState::Exited(x) if x.signal == Some(9)),
        "{status:?}"
    );
    assert_eq!(status.exit.as_ref().and_then(|x| x.signal), Some(9));
    let e = vm.pause().expect_err("QEMU is gone");
    assert!(
        matches!(
            e,
            VmError::Qmp {
                command: "stop",
                ..
            }
        ),
        "{e}"
    );
    assert!(ram.exists(), "the RAM file is kept until stop");
    let exit = runner.stop(&name, &StopOptions::default()).expect("stop");
    assert_eq!(exit.signal, Some(9));
    assert!(!ram.exists());
    drop(vm);
}

#[test]
fn bad_specs_fail_before_any_process_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (runner, _events) = runner(dir.path());
    let state = dir.path().join("state");

    let e = VmSpec::from_toml("name = \"x\"\nmemory = \"lots\"\n[boot]\nkernel = \"/k\"\n")
        .expect_err("malformed");
    assert!(matches!(e, SpecError::Parse(_)), "{e}");

    let missing = dir.path().join("no-vmlinuz");
    let e = runner
        .start(
            VmSpec::with_kernel(&vm_name("nok"), &missing),
            LaunchMode::default(),
        )
        .expect_err("missing kernel");
    assert!(
        matches!(
            e,
            VmError::Spec(SpecError::Unreadable {
                field: "boot.kernel",
                ..
            })
        ),
        "{e}"
    );
    assert!(
        !state.exists(),
        "a refused spec must not touch the state root"
    );

    let kernel = dir.path().join("vmlinuz");
    std::fs::write(&kernel, b"not a kernel").expect("write");
    let mut s = VmSpec::with_kernel(&vm_name("kvm"), &kernel);
    s.accel = understudy_vm::Accel::Kvm;
    let e = runner.start(s, LaunchMode::default()).expect_err("kvm");
    assert!(matches!(e, VmError::KvmNotAllowed { .. }), "{e}");

    let mut s = VmSpec::with_kernel(&vm_name("ram"), &kernel);
    s.paths.ram_dir = dir.path().to_path_buf();
    std::fs::write(s.ram_file(), b"stale").expect("write");
    let e = runner
        .start(s.clone(), LaunchMode::default())
        .expect_err("exists");
    assert!(matches!(e, VmError::RamFileExists { .. }), "{e}");
    let reuse = LaunchMode {
        reuse_ram: true,
        ..LaunchMode::default()
    };
    let e = runner.start(s, reuse).expect_err("wrong size");
    assert!(matches!(e, VmError::RamFileUnusable { .. }), "{e}");
    assert!(
        !state.exists(),
        "no launch got as far as the state directory"
    );
    assert!(runner.list().is_empty());

    let cfg = RunnerConfig {
        qemu: dir.path().join("no-qemu-here"),
        state_root: state.clone(),
        ..RunnerConfig::default()
    };
    let mut s = VmSpec::with_kernel(&vm_name("spawn"), &kernel);
    s.paths.ram_dir = dir.path().to_path_buf();
    let e = Vm::launch(s, &cfg, Default::default()).expect_err("spawn");
    assert!(matches!(e, VmError::Spawn { .. }), "{e}");
}

#[test]
fn qemu_refusing_an_argument_is_reported_with_its_log() {
    let Some((kernel, initrd)) = guest("initrd.gz", "build.sh") else {
        return;
    };
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let (runner, _events) = runner(dir.path());
    let mut s = spec(&vm_name("badarg"), &kernel, &initrd, "idle");
    s.extra_args = vec!["-device".into(), "no-such-device-model".into()];
    let ram = s.ram_file();
    let e = runner.start(s, LaunchMode::default()).expect_err("bad arg");
    match &e {
        VmError::EarlyExit { exit, log_tail } => {
            assert_eq!(exit, "exit code 1", "{e}");
            assert!(log_tail.contains("no-such-device-model"), "{e}");
        }
        other => panic!("expected EarlyExit, got {other}"),
    }
    assert!(
        !ram.exists(),
        "a failed launch removes the RAM file it created"
    );
    assert!(runner.list().is_empty());
}

#[test]
fn disk_over_nbd_unix_socket() {
    let Some((kernel, initrd)) = guest("initrd-fs.gz", "build-fs.sh") else {
        return;
    };
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let nbd = NbdFixture::start(dir.path());
    let (runner, events) = runner(dir.path());
    let name = vm_name("disk");
    let mut s = spec(&name, &kernel, &initrd, "fs");
    s.disks.push(understudy_vm::DiskSpec {
        name: "root".into(),
        socket: nbd.socket.clone(),
        export: Some("disk".into()),
        readonly: false,
    });
    let vm = runner.start(s, LaunchMode::default()).expect("start");

    let blocks = vm.qmp().execute("query-block", None).expect("query-block");
    let node = &blocks[0]["inserted"];
    assert_eq!(node["node-name"], "d0", "{blocks}");
    assert!(
        node["file"].as_str().is_some_and(|f| f.starts_with("nbd")),
        "{blocks}"
    );
    assert!(nbd.server.stats().connections_accepted >= 1);

    // The guest mounts /dev/vda, runs the file system workload, unmounts
    // and powers off; QEMU then exits 0 on its own.
    let ev = events
        .recv_timeout(BOOT_DEADLINE)
        .expect("guest powered off");
    let serial = std::fs::read_to_string(&vm.paths().serial_log).unwrap_or_default();
    let VmEvent::Exited { exit, .. } = ev else {
        panic!("unexpected event {ev:?}")
    };
    assert_eq!((exit.code, exit.expected), (Some(0), false), "{serial}");
    assert!(serial.contains("MOUNT-OK"), "{serial}");
    assert!(serial.contains("FSWORKLOAD-DONE"), "{serial}");
    assert!(serial.contains("UMOUNT-OK"), "{serial}");
    let st = nbd.server.stats();
    assert!(st.writes > 0 && st.flushes > 0, "{st:?}");
    runner.stop(&name, &StopOptions::default()).expect("stop");
    drop(vm);
    nbd.stop();
}

/// An in-process NBD server exporting an ext4 image on a Unix socket.
struct NbdFixture {
    server: understudy_nbd_server::Server,
    socket: PathBuf,
    accept: std::thread::JoinHandle<Result<(), understudy_nbd_server::ServerError>>,
}

impl NbdFixture {
    fn start(dir: &Path) -> Self {
        use understudy_block::Disk;
        use understudy_block::raw::RawDisk;
        use understudy_nbd_server::{Export, Server, ServerConfig};

        let img = dir.join("disk.img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(32 << 20))
            .expect("create image");
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096"])
            .arg(&img)
            .output()
            .expect("mkfs.ext4 is missing: apt-get install -y e2fsprogs");
        assert!(
            out.status.success(),
            "mkfs.ext4: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let disk: Arc<dyn Disk> = Arc::new(RawDisk::open(&img, false).expect("open image"));
        let server = Server::new(ServerConfig {
            shutdown_grace: Duration::from_secs(1),
            ..ServerConfig::default()
        })
        .expect("server");
        server.exports().insert(Export::new("disk", disk));
        let socket = dir.join("nbd.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        let s = server.clone();
        let accept = std::thread::spawn(move || s.serve_unix(listener));
        Self {
            server,
            socket,
            accept,
        }
    }

    fn stop(self) {
        self.server.shutdown_handle().shutdown();
        self.accept
            .join()
            .expect("accept loop panicked")
            .expect("accept loop");
    }
}

#[test]
fn kept_ram_feeds_an_incoming_target_and_drop_kills_qemu() {
    let Some((kernel, initrd)) = guest("initrd.gz", "build.sh") else {
        return;
    };
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let (runner, _events) = runner(dir.path());
    let name = vm_name("keep");
    let s = spec(&name, &kernel, &initrd, "idle");
    let vm = runner
        .start(s.clone(), LaunchMode::default())
        .expect("start");
    let ram = vm.paths().ram_file.clone();
    wait_serial(&vm, "GUEST-UP");
    let keep = StopOptions {
        keep_ram: true,
        ..StopOptions::default()
    };
    runner.stop(&name, &keep).expect("stop");
    drop(vm);
    assert!(ram.is_file(), "keep_ram must keep {ram:?}");

    // A migration or failover target: QEMU maps the kept RAM file and waits
    // for migrate-incoming.
    let target = LaunchMode {
        incoming: true,
        reuse_ram: true,
        ..LaunchMode::default()
    };
    let vm = runner.start(s, target).expect("incoming target");
    let pid = vm.pid();
    assert_eq!(
        vm.state(),
        VmState::Paused {
            status: "inmigrate".to_string()
        }
    );
    drop(vm);
    drop(runner);
    assert!(
        process_gone(pid),
        "dropping the runner must kill QEMU {pid}"
    );
    assert!(
        ram.is_file(),
        "a reused RAM file is not the handle's to remove"
    );
    std::fs::remove_file(&ram).expect("clean up the RAM file");
}
