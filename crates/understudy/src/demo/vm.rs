//! `understudy demo` (the default): a tiny guest printing a counter on its
//! serial console moves live between two daemons on this machine and back.
//!
//! The daemons are child processes of the demo (this same binary, `serve`),
//! each in its own process group so that a Ctrl-C reaches only the demo,
//! which then stops the guest and both daemons itself: nothing is left
//! running, whatever way the demo ends. The pause is measured from outside,
//! as the guest's user sees it: a thread reads the serial logs as they grow
//! and timestamps every `TICK n` line; the largest gap during a move is the
//! pause.

use std::io::{Read, Seek};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use serde_json::{Value, json};

use crate::control::client::Client;

/// Boots, moves and stops under TCG on a loaded host are slow; anything
/// past this is a hang.
const DEADLINE: Duration = Duration::from_secs(180);
const VM: &str = "demo";

/// Arguments of the VM demo.
#[derive(Debug, Clone, Args)]
pub struct VmDemoArgs {
    /// Guest RAM.
    #[arg(long, default_value = "128M")]
    memory: String,
    /// Pause target of each move (`vm migrate --max-downtime`).
    #[arg(long, default_value = "500ms")]
    max_downtime: String,
    /// Where `scripts/guest/build.sh` put the guest kernel and initramfs
    /// (default: $UNDERSTUDY_GUEST_CACHE or ~/.cache/understudy/guest).
    #[arg(long)]
    guest_dir: Option<PathBuf>,
}

/// Run the VM demo.
pub fn run(a: &VmDemoArgs) -> Result<()> {
    let (kernel, initrd) = guest_files(a)?;
    ensure!(
        on_path("qemu-system-x86_64"),
        "qemu-system-x86_64 is not installed: run `bash scripts/install-deps.sh` (or `bash scripts/demo.sh`)"
    );
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    println!(
        "understudy demo: a tiny guest printing a counter moves live between two daemons on this machine"
    );
    let mut demo = Demo::new(stop)?;
    let played = demo.play(a, &kernel, &initrd);
    let cleaned = demo.cleanup();
    played?;
    cleaned?;
    println!("stopped the guest and both daemons; nothing left running");
    Ok(())
}

fn guest_files(a: &VmDemoArgs) -> Result<(PathBuf, PathBuf)> {
    let dir = a.guest_dir.clone().unwrap_or_else(|| {
        std::env::var_os("UNDERSTUDY_GUEST_CACHE").map_or_else(
            || {
                let home =
                    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
                home.join(".cache/understudy/guest")
            },
            PathBuf::from,
        )
    });
    let (k, i) = (dir.join("vmlinuz"), dir.join("initrd.gz"));
    if !k.is_file() || !i.is_file() {
        bail!(
            "the guest kernel and initramfs are not in {}: build them with `bash scripts/guest/build.sh` \
             (or run `bash scripts/demo.sh`, which also installs QEMU)",
            dir.display()
        );
    }
    Ok((k, i))
}

fn on_path(exe: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(exe).is_file()))
}

/// One daemon of the pair.
struct Node {
    label: &'static str,
    child: Child,
    control: PathBuf,
    peer: String,
    vm_dir: PathBuf,
    ram_dir: PathBuf,
}

/// One `TICK n` line, timestamped when the demo read it.
#[derive(Clone, Copy)]
struct Tick {
    at: Instant,
    n: u64,
    node: usize,
}

struct Demo {
    dir: PathBuf,
    nodes: Vec<Node>,
    stop: Arc<AtomicBool>,
    ticks: Arc<Mutex<Vec<Tick>>>,
    tail_stop: Arc<AtomicBool>,
    tail: Option<std::thread::JoinHandle<()>>,
    qemu_pids: Vec<u64>,
    cleaned: bool,
}

impl Demo {
    fn new(stop: Arc<AtomicBool>) -> Result<Demo> {
        let dir = std::env::temp_dir().join(format!("understudy-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut d = Demo {
            dir,
            nodes: Vec::new(),
            stop,
            ticks: Arc::default(),
            tail_stop: Arc::default(),
            tail: None,
            qemu_pids: Vec::new(),
            cleaned: false,
        };
        let key = d.dir.join("peer.key");
        write_key(&key)?;
        for label in ["A", "B"] {
            let n = start_node(&d.dir, label, &key)?;
            d.nodes.push(n);
        }
        println!(
            "  daemon A (pid {}) and daemon B (pid {}), peer link authenticated with a fresh pre-shared key",
            d.nodes[0].child.id(),
            d.nodes[1].child.id()
        );
        for n in &mut d.nodes {
            wait_ready(n)?;
        }
        Ok(d)
    }

    fn play(&mut self, a: &VmDemoArgs, kernel: &Path, initrd: &Path) -> Result<()> {
        let img = self.dir.join("root.img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(16 << 20))
            .context("creating the guest's disk image")?;
        self.ctl(
            0,
            &[
                "vm",
                "start",
                VM,
                "--kernel",
                &kernel.display().to_string(),
                "--initrd",
                &initrd.display().to_string(),
                "--append",
                "console=ttyS0 quiet panic=-1 mode=ticker",
                "--memory",
                &a.memory,
                "--disk",
                &format!("{},format=raw,name=root", img.display()),
            ],
        )?;
        let st = self.status(0)?;
        self.note_qemu(&st);
        self.start_tail(&st)?;
        let t0 = Instant::now();
        let seen = self.wait_ticks(0, 0, 20, t0)?;
        println!(
            "booted guest \"{VM}\" on A (QEMU pid {}, {} RAM, TCG, 16 MiB disk served by A): TICK {seen} and counting",
            st["pid"], a.memory
        );
        self.move_vm(0, 1, a, "")?;
        self.move_vm(1, 0, a, " (incremental: A kept its copy of the guest)")?;
        self.ctl(0, &["vm", "stop", VM])?;
        Ok(())
    }

    /// Move the guest from node `from` to node `to` and report what the
    /// serial logs show.
    fn move_vm(&mut self, from: usize, to: usize, a: &VmDemoArgs, why: &str) -> Result<()> {
        let (f, t) = (self.nodes[from].label, self.nodes[to].label);
        println!("moving it live {f} -> {t}{why} ...");
        let t0 = Instant::now();
        let peer = self.nodes[to].peer.clone();
        let out = self.ctl(
            from,
            &[
                "vm",
                "migrate",
                VM,
                "--to",
                &peer,
                "--max-downtime",
                &a.max_downtime,
                "--json",
            ],
        )?;
        let m: Value = out
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .context("`vm migrate --json` printed no progress")?;
        ensure!(m["phase"] == "completed", "the move did not complete: {m}");
        let st = self.status(to)?;
        self.note_qemu(&st);
        self.wait_ticks(to, 0, 20, t0)?;
        let (gap, last_from, on_to) = self.report(from, to, t0);
        let last_from = last_from.context("no tick was read on the source during the move")?;
        ensure!(
            on_to[0] > last_from && on_to.windows(2).all(|w| w[1] > w[0]),
            "the counter went back: last on {f} {last_from}, then on {t} {on_to:?}"
        );
        println!(
            "  last tick on {f}: {last_from}, first on {t}: {}: the counter carried on{}",
            on_to[0],
            if on_to[0] == last_from + 1 {
                " without a gap"
            } else {
                ""
            }
        );
        println!(
            "  pause seen from outside: {:.0} ms (largest gap between ticks; the daemon measured {:.0} ms)",
            gap.as_secs_f64() * 1e3,
            m["downtime_ms"].as_f64().unwrap_or(0.0)
        );
        println!(
            "  sent {} of RAM{} in {} rounds plus {} of device state, in {:.1} s",
            mib(m["ram_bytes_sent"].as_u64()),
            if m["incremental"] == true {
                " (incremental: only pages that changed)"
            } else {
                ""
            },
            m["rounds"],
            mib(m["state_bytes"].as_u64()),
            m["total_ms"].as_f64().unwrap_or(0.0) / 1e3
        );
        Ok(())
    }

    /// Largest gap between ticks since `t0`, the last tick on `from` and
    /// every tick on `to` since `t0`.
    fn report(&self, from: usize, to: usize, t0: Instant) -> (Duration, Option<u64>, Vec<u64>) {
        let ticks = lock(&self.ticks);
        let since: Vec<&Tick> = ticks.iter().filter(|k| k.at >= t0).collect();
        let gap = since
            .windows(2)
            .map(|w| w[1].at - w[0].at)
            .max()
            .unwrap_or_default();
        let last_from = since.iter().rev().find(|k| k.node == from).map(|k| k.n);
        let on_to = since.iter().filter(|k| k.node == to).map(|k| k.n).collect();
        (gap, last_from, on_to)
    }

    /// Wait until `node` printed `count` ticks above `above` since `t0`;
    /// returns the last of them.
    fn wait_ticks(&self, node: usize, above: u64, count: usize, t0: Instant) -> Result<u64> {
        loop {
            let seen: Vec<u64> = lock(&self.ticks)
                .iter()
                .filter(|k| k.node == node && k.at >= t0 && k.n > above)
                .map(|k| k.n)
                .collect();
            if seen.len() >= count.max(1) {
                return Ok(seen[seen.len() - 1]);
            }
            self.check_alive()?;
            let st = self.status(node)?;
            let serial = std::fs::read_to_string(st["serial_log"].as_str().unwrap_or(""))
                .unwrap_or_default();
            ensure!(
                !serial.contains("WORKLOAD-START idle"),
                "the guest's initramfs has no /bin/ticker: rebuild it with `bash scripts/guest/build.sh`"
            );
            ensure!(
                st["state"] == "running" && t0.elapsed() < DEADLINE,
                "no counter from the guest on {} ({st}); QEMU said:\n{}",
                self.nodes[node].label,
                std::fs::read_to_string(st["qemu_log"].as_str().unwrap_or("")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn check_alive(&self) -> Result<()> {
        ensure!(
            !self.stop.load(Ordering::Relaxed),
            "interrupted: the guest and both daemons were stopped"
        );
        Ok(())
    }

    fn note_qemu(&mut self, st: &Value) {
        if let Some(pid) = st["pid"].as_u64() {
            self.qemu_pids.push(pid);
        }
    }

    /// Follow both nodes' serial logs of the guest (same layout under each
    /// node's VM directory).
    fn start_tail(&mut self, st: &Value) -> Result<()> {
        let log = PathBuf::from(st["serial_log"].as_str().context("no serial log")?);
        let rel = log
            .strip_prefix(&self.nodes[0].vm_dir)
            .context("the serial log is outside the VM directory")?
            .to_path_buf();
        let paths: Vec<PathBuf> = self.nodes.iter().map(|n| n.vm_dir.join(&rel)).collect();
        let (ticks, stop) = (self.ticks.clone(), self.tail_stop.clone());
        self.tail = Some(std::thread::spawn(move || tail(&paths, &ticks, &stop)));
        Ok(())
    }

    fn status(&self, node: usize) -> Result<Value> {
        let mut c = Client::connect(&self.nodes[node].control)?;
        c.call("vm.status", json!({"name": VM}))
            .with_context(|| format!("vm status on {}", self.nodes[node].label))
    }

    /// Run an `understudy` client subcommand against node `node`.
    fn ctl(&self, node: usize, args: &[&str]) -> Result<String> {
        self.check_alive()?;
        let out = Command::new(std::env::current_exe()?)
            .args(["--log", "warn", args[0], "--control"])
            .arg(&self.nodes[node].control)
            .args(&args[1..])
            .output()?;
        // A Ctrl-C reaches this client too: say so rather than its silence.
        self.check_alive()?;
        ensure!(
            out.status.success(),
            "understudy {} on {} failed ({}): {}",
            args.join(" "),
            self.nodes[node].label,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Stop the guest wherever it runs, then both daemons; kill what
    /// outlives them. Idempotent.
    fn cleanup(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.cleaned, true) {
            return Ok(());
        }
        self.tail_stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.tail.take() {
            let _ = t.join();
        }
        for n in &mut self.nodes {
            stop_node(n);
        }
        let mut left = Vec::new();
        for &pid in &self.qemu_pids {
            if !wait_gone(pid, Duration::from_secs(10)) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
                left.push(pid);
            }
        }
        for n in &self.nodes {
            let _ = std::fs::remove_dir_all(&n.ram_dir);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        ensure!(
            left.is_empty(),
            "QEMU {left:?} outlived its daemon and was killed"
        );
        Ok(())
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.cleanup();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn mib(b: Option<u64>) -> String {
    let b = b.unwrap_or(0) as f64;
    if b >= 1048576.0 {
        format!("{:.1} MiB", b / 1048576.0)
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

fn write_key(path: &Path) -> Result<()> {
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .context("reading /dev/urandom")?;
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    use std::io::Write;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(format!("{hex}\n").as_bytes()))
        .with_context(|| format!("writing {}", path.display()))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start_node(dir: &Path, label: &'static str, key: &Path) -> Result<Node> {
    let d = dir.join(label);
    std::fs::create_dir_all(&d)?;
    let ram_dir = PathBuf::from(format!(
        "/dev/shm/understudy-demo-{}-{label}",
        std::process::id()
    ));
    std::fs::create_dir_all(&ram_dir).with_context(|| format!("creating {}", ram_dir.display()))?;
    let (control, vm_dir) = (d.join("control.sock"), d.join("vms"));
    let peer = format!("127.0.0.1:{}", free_port()?);
    let log = std::fs::File::create(d.join("daemon.log"))?;
    let child = Command::new(std::env::current_exe()?)
        .args(["--log", "warn", "serve", "--socket"])
        .arg(d.join("nbd.sock"))
        .arg("--control")
        .arg(&control)
        .arg("--vm-dir")
        .arg(&vm_dir)
        .arg("--vm-ram-dir")
        .arg(&ram_dir)
        .arg("--accept-migrations")
        .arg(d.join("recv"))
        .args(["--peer-listen", &peer, "--peer-key"])
        .arg(key)
        .args(["--node-id", label])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        // Its own process group: a Ctrl-C reaches the demo only, which
        // then stops the guest and the daemon in order.
        .process_group(0)
        .spawn()
        .context("starting a daemon")?;
    Ok(Node {
        label,
        child,
        control,
        peer,
        vm_dir,
        ram_dir,
    })
}

fn wait_ready(n: &mut Node) -> Result<()> {
    let t0 = Instant::now();
    loop {
        if let Some(st) = n.child.try_wait()? {
            let log = n.control.with_file_name("daemon.log");
            bail!(
                "daemon {} exited at start ({st}):\n{}",
                n.label,
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if std::os::unix::net::UnixStream::connect(&n.control).is_ok() {
            return Ok(());
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(30),
            "daemon {} did not start",
            n.label
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stop the guest if it runs on `n`, then the daemon (SIGTERM: it stops
/// its VMs and exports in order); SIGKILL if it hangs.
fn stop_node(n: &mut Node) {
    if let Ok(None) = n.child.try_wait() {
        if let Ok(mut c) = Client::connect(&n.control) {
            let _ = c.call("vm.stop", json!({"name": VM, "force": true}));
        }
        let _ = Command::new("kill")
            .args(["-TERM", &n.child.id().to_string()])
            .status();
        if !wait_gone(u64::from(n.child.id()), Duration::from_secs(30)) {
            let _ = n.child.kill();
        }
    }
    let _ = n.child.wait();
}

/// Whether process `pid` ended (or is a zombie) within `within`.
fn wait_gone(pid: u64, within: Duration) -> bool {
    let t0 = Instant::now();
    loop {
        let gone = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_or(true, |s| s.split_whitespace().nth(2) == Some("Z"));
        if gone {
            return true;
        }
        if t0.elapsed() > within {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Read the serial logs as they grow and timestamp every whole `TICK n`
/// line. A log that shrinks was started afresh (QEMU truncates it).
fn tail(paths: &[PathBuf], ticks: &Mutex<Vec<Tick>>, stop: &AtomicBool) {
    let mut pos = vec![0u64; paths.len()];
    let mut partial = vec![String::new(); paths.len()];
    while !stop.load(Ordering::Relaxed) {
        for (i, p) in paths.iter().enumerate() {
            let Ok(mut f) = std::fs::File::open(p) else {
                continue;
            };
            let len = f.metadata().map_or(0, |m| m.len());
            if len < pos[i] {
                pos[i] = 0;
                partial[i].clear();
            }
            if len == pos[i] {
                continue;
            }
            let at = Instant::now();
            let mut bytes = Vec::new();
            if f.seek(std::io::SeekFrom::Start(pos[i]))
                .and_then(|_| f.read_to_end(&mut bytes))
                .is_err()
            {
                continue;
            }
            pos[i] += bytes.len() as u64;
            partial[i].push_str(&String::from_utf8_lossy(&bytes));
            let text = std::mem::take(&mut partial[i]);
            let mut rest = text.as_str();
            while let Some(nl) = rest.find('\n') {
                let line = rest[..nl].trim();
                if let Some(n) = line.strip_prefix("TICK ").and_then(|s| s.parse().ok()) {
                    lock(ticks).push(Tick { at, n, node: i });
                }
                rest = &rest[nl + 1..];
            }
            partial[i] = rest.to_string();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
