//! `understudy vm start|list|status|stop`: thin clients of the daemon's
//! `vm.*` control methods. The CLI builds the spec (a file, flags, or both),
//! resolves relative paths (the daemon's working directory is not the
//! user's) and sends it as a JSON object.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde_json::{Map, Value, json};

use crate::control::client::Client;
use crate::control::proto::VmEntry;

/// `understudy vm ...`.
#[derive(Debug, Subcommand)]
pub enum VmCmd {
    /// Start a VM under the daemon; its disks are served by the daemon
    /// through the block filter (docs/vm.md).
    Start(StartArgs),
    /// List the VMs.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one VM: state, pid, disks and their exports, log files.
    Status {
        /// VM name.
        name: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Stop a VM (QMP quit, then SIGKILL after 5 s) and release the
    /// exports opened for it.
    Stop {
        /// VM name.
        name: String,
        /// SIGKILL at once: QEMU does not flush, as on a power cut.
        #[arg(long)]
        force: bool,
    },
    /// Move a running VM live to another daemon with its disks, RAM and
    /// device state (docs/vm.md).
    Migrate(MigrateArgs),
}

/// `understudy vm migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// VM name.
    pub name: String,
    /// The target daemon's migration address (its --peer-listen).
    #[arg(long)]
    pub to: String,
    /// Switch over once a RAM round (and the disks) fit in this pause;
    /// a guest that dirties memory faster is throttled (stop/cont).
    #[arg(long, default_value = "300ms", value_parser = humantime::parse_duration)]
    pub max_downtime: std::time::Duration,
    /// Print progress as JSON lines (one object per line).
    #[arg(long)]
    pub json: bool,
}

/// `understudy vm start`.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// VM name: 1 to 64 of A-Z a-z 0-9 . _ - (it names the RAM file and
    /// the disk exports VM-DISK).
    pub name: String,
    /// A TOML spec (docs/vm.md); relative paths in it are relative to the
    /// file's directory. The flags below override or add to it.
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// Kernel for a direct boot.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initramfs (with --kernel).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (default: console=ttyS0 panic=-1).
    #[arg(long)]
    pub append: Option<String>,
    /// Guest RAM, e.g. 256M or 1G (default 256M).
    #[arg(long)]
    pub memory: Option<String>,
    /// Virtual CPUs (default 1).
    #[arg(long)]
    pub cpus: Option<u32>,
    /// A disk, in guest order (repeatable): an image
    /// `PATH[,format=raw|qcow2][,bitmap=NAME[:GRANULARITY]][,name=DISK][,readonly]`
    /// opened by the daemon as export VM-DISK, or an export the daemon
    /// serves: `export=NAME[,name=DISK][,readonly]`. DISK defaults to
    /// disk0, disk1, ...
    #[arg(long)]
    pub disk: Vec<String>,
    /// An extra QEMU argument, appended last (repeatable; use
    /// --qemu-arg=-flag for arguments starting with a dash).
    #[arg(long = "qemu-arg", allow_hyphen_values = true)]
    pub qemu_args: Vec<String>,
    /// Print the started VM as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Run a `vm` subcommand against the daemon at `control`.
pub fn run(control: &Path, cmd: VmCmd) -> Result<()> {
    match cmd {
        VmCmd::Start(a) => start(control, &a),
        VmCmd::List { json } => list(control, json),
        VmCmd::Migrate(a) => migrate(control, &a),
        VmCmd::Status { name, json } => {
            let r = Client::connect(control)?.call("vm.status", json!({"name": name}))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
                return Ok(());
            }
            if r["state"] == "migrated" {
                println!(
                    "VM {name} migrated away: {}",
                    migration_text(&r["migration"])
                );
                return Ok(());
            }
            let e: VmEntry = serde_json::from_value(r.clone())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&e)?);
            } else {
                println!("VM {} pid {}", e.name, e.pid);
                print_entry(&e);
            }
            Ok(())
        }
        VmCmd::Stop { name, force } => {
            let r =
                Client::connect(control)?.call("vm.stop", json!({"name": name, "force": force}))?;
            let released: Vec<String> = serde_json::from_value(r["released"].clone())?;
            println!(
                "stopped VM {name} ({}); released exports {released:?}",
                exit_text(&r["exit"])
            );
            Ok(())
        }
    }
}

/// One line of a migration's progress.
fn migration_text(m: &Value) -> String {
    let mut s = format!(
        "{} to {}: {} rounds, dirty rate {}/s, RAM sent {}{} at {}/s, device state {}",
        m["phase"].as_str().unwrap_or("?"),
        m["target_node"]
            .as_str()
            .or(m["to"].as_str())
            .unwrap_or("?"),
        m["rounds"],
        bytesize(m["dirty_rate"].as_u64()),
        bytesize(m["ram_bytes_sent"].as_u64()),
        if m["incremental"] == true {
            " (incremental)"
        } else {
            ""
        },
        bytesize(m["bandwidth"].as_u64()),
        bytesize(m["state_bytes"].as_u64()),
    );
    if m["throttle_pct"].as_u64().unwrap_or(0) > 0 {
        s.push_str(&format!(
            ", guest throttled {}% (stop/cont)",
            m["throttle_pct"]
        ));
    }
    if let Some(d) = m["downtime_ms"].as_f64() {
        s.push_str(&format!(
            ", pause {d:.1} ms, total {:.0} ms",
            m["total_ms"].as_f64().unwrap_or(0.0)
        ));
    }
    if let Some(e) = m["error"].as_str() {
        s.push_str(&format!(": {e}"));
    }
    s
}

fn bytesize(b: Option<u64>) -> String {
    let b = b.unwrap_or(0) as f64;
    if b >= 1048576.0 {
        format!("{:.1} MiB", b / 1048576.0)
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

/// `vm migrate`: start it, then follow `vm.status` until it ends.
fn migrate(control: &Path, a: &MigrateArgs) -> Result<()> {
    let mut c = Client::connect(control)?;
    c.call(
        "vm.migrate",
        json!({"name": a.name, "to": a.to, "max_downtime_ms": a.max_downtime.as_secs_f64() * 1e3}),
    )?;
    let mut last = String::new();
    let m = loop {
        let r = c.call("vm.status", json!({"name": a.name}))?;
        let m = r["migration"].clone();
        let line = if a.json {
            serde_json::to_string(&m)?
        } else {
            migration_text(&m)
        };
        if line != last {
            if a.json {
                println!("{line}");
            } else {
                eprintln!("{line}");
            }
            last = line;
        }
        let phase = m["phase"].as_str().unwrap_or("");
        if matches!(phase, "completed" | "failed" | "indoubt") {
            break m;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    match m["phase"].as_str() {
        Some("completed") => {
            if !a.json {
                println!("migrated VM {}: {}", a.name, migration_text(&m));
            }
            Ok(())
        }
        _ => bail!(
            "the migration of VM {} did not complete: {}",
            a.name,
            m["error"].as_str().unwrap_or("no detail")
        ),
    }
}

fn start(control: &Path, a: &StartArgs) -> Result<()> {
    // Build the spec before connecting: a bad file or flag is reported
    // even when no daemon runs.
    let spec = build_spec(a)?;
    let mut c = Client::connect(control)?;
    let r = c.call("vm.start", json!({"name": a.name, "spec": spec}))?;
    let e: VmEntry = serde_json::from_value(r)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&e)?);
    } else {
        println!("started VM {} (pid {})", e.name, e.pid);
        print_entry(&e);
        println!("stop it with: understudy vm stop {}", e.name);
    }
    Ok(())
}

fn list(control: &Path, json: bool) -> Result<()> {
    let r = Client::connect(control)?.call("vm.list", json!({}))?;
    let vms: Vec<VmEntry> = serde_json::from_value(r)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&vms)?);
        return Ok(());
    }
    println!(
        "{:<20} {:<18} {:>8} {:>10} {:>7} {:<5}  DISKS (EXPORTS)",
        "NAME", "STATE", "PID", "UPTIME", "MEMORY", "CPUS"
    );
    for e in &vms {
        let disks: Vec<String> = e
            .disks
            .iter()
            .map(|d| format!("{}={}", d.name, d.export))
            .collect();
        println!(
            "{:<20} {:<18} {:>8} {:>9}s {:>6}M {:<5}  {}",
            e.name,
            state_text(e),
            e.pid,
            e.uptime_ms / 1000,
            e.memory_mib,
            e.cpus,
            disks.join(" ")
        );
    }
    Ok(())
}

fn state_text(e: &VmEntry) -> String {
    match (&e.exit, &e.detail) {
        (Some(x), _) => match (x.code, x.signal) {
            (Some(c), _) => format!("exited (code {c})"),
            (None, Some(s)) => format!("exited (signal {s})"),
            _ => "exited".into(),
        },
        (None, Some(d)) => format!("{} ({d})", e.state),
        (None, None) => e.state.clone(),
    }
}

fn exit_text(x: &Value) -> String {
    match (x["code"].as_i64(), x["signal"].as_i64()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "exit status unknown".into(),
    }
}

fn print_entry(e: &VmEntry) {
    println!("  state:      {}", state_text(e));
    println!(
        "  machine:    {}, {} CPU, {} MiB",
        e.accel, e.cpus, e.memory_mib
    );
    for d in &e.disks {
        println!(
            "  disk {}: export {} on {}{}{}",
            d.name,
            d.export,
            d.socket,
            if d.readonly { " (read-only)" } else { "" },
            if d.opened {
                " (opened for this VM)"
            } else {
                ""
            }
        );
    }
    println!("  serial log: {}", e.serial_log);
    println!("  QEMU log:   {}", e.qemu_log);
    println!("  QMP:        {}", e.qmp_socket);
}

/// The spec as a JSON object: the file (if any) with its relative paths
/// resolved against its directory, then the flags.
fn build_spec(a: &StartArgs) -> Result<Map<String, Value>> {
    let mut m = match &a.spec {
        Some(p) => read_spec_file(p)?,
        None => Map::new(),
    };
    let cwd = std::env::current_dir().context("cannot read the working directory")?;
    let boot = object(&mut m, "boot")?;
    for (key, v) in [("kernel", &a.kernel), ("initrd", &a.initrd)] {
        if let Some(p) = v {
            boot.insert(key.into(), json!(cwd.join(p)));
        }
    }
    if let Some(s) = &a.append {
        boot.insert("append".into(), json!(s));
    }
    if let Some(s) = &a.memory {
        m.insert("memory".into(), json!(s));
    }
    if let Some(n) = a.cpus {
        m.insert("cpus".into(), json!(n));
    }
    let disks = array(&mut m, "disks")?;
    for d in &a.disk {
        let i = disks.len();
        disks.push(disk_flag(d, i, &cwd)?);
    }
    array(&mut m, "extra_args")?.extend(a.qemu_args.iter().map(|s| json!(s)));
    if a.spec.is_none() && a.kernel.is_none() {
        bail!(
            "nothing to boot: give --kernel KERNEL [--initrd INITRD], or --spec FILE (docs/vm.md has an example)"
        );
    }
    Ok(m)
}

/// `m[key]` as an object, created if missing.
fn object<'a>(m: &'a mut Map<String, Value>, key: &str) -> Result<&'a mut Map<String, Value>> {
    m.entry(key)
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .with_context(|| format!("the spec's {key} must be a table ([{key}])"))
}

/// `m[key]` as an array, created if missing.
fn array<'a>(m: &'a mut Map<String, Value>, key: &str) -> Result<&'a mut Vec<Value>> {
    m.entry(key)
        .or_insert_with(|| json!([]))
        .as_array_mut()
        .with_context(|| format!("the spec's {key} must be a list"))
}

fn read_spec_file(p: &Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(p)
        .with_context(|| format!("cannot read the spec file {}; check the path", p.display()))?;
    let table: toml::Table = toml::from_str(&text).with_context(|| {
        format!(
            "{} is not a valid TOML spec; fix it (docs/vm.md has an example)",
            p.display()
        )
    })?;
    let Value::Object(mut m) = serde_json::to_value(table)? else {
        bail!("{} is not a TOML table", p.display());
    };
    let base = std::path::absolute(p)?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    resolve_paths(&mut m, &base);
    Ok(m)
}

/// Make the spec's relative paths absolute against `base`.
fn resolve_paths(m: &mut Map<String, Value>, base: &Path) {
    let fix = |v: Option<&mut Value>| {
        if let Some(v) = v
            && let Some(s) = v.as_str()
            && Path::new(s).is_relative()
        {
            *v = json!(base.join(s));
        }
    };
    if let Some(b) = m.get_mut("boot").and_then(Value::as_object_mut) {
        fix(b.get_mut("kernel"));
        fix(b.get_mut("initrd"));
    }
    if let Some(p) = m.get_mut("paths").and_then(Value::as_object_mut) {
        fix(p.get_mut("ram_dir"));
        fix(p.get_mut("state_dir"));
    }
    if let Some(ds) = m.get_mut("disks").and_then(Value::as_array_mut) {
        for d in ds.iter_mut().filter_map(Value::as_object_mut) {
            fix(d.get_mut("path"));
        }
    }
}

/// One `--disk` flag as a spec disk.
fn disk_flag(s: &str, index: usize, cwd: &Path) -> Result<Value> {
    let mut d = Map::new();
    d.insert("name".into(), json!(format!("disk{index}")));
    for (i, part) in s.split(',').enumerate() {
        match part.split_once('=') {
            Some(("name", v)) => d.insert("name".into(), json!(v)),
            Some(("export", v)) => d.insert("export".into(), json!(v)),
            Some(("format", v)) => d.insert("format".into(), json!(v)),
            Some(("bitmap", v)) => d.insert("bitmap".into(), json!(v)),
            Some(("path", v)) => d.insert("path".into(), json!(cwd.join(v))),
            None if part == "readonly" || part == "ro" => d.insert("readonly".into(), json!(true)),
            None if i == 0 && !part.is_empty() => d.insert("path".into(), json!(cwd.join(part))),
            _ => bail!(
                "--disk {s:?}: unknown option {part:?}; use PATH[,format=raw|qcow2][,bitmap=NAME[:GRANULARITY]][,name=DISK][,readonly] or export=NAME[,name=DISK][,readonly]"
            ),
        };
    }
    Ok(Value::Object(d))
}
