//! The target side of a whole-VM live migration: the VM link and the RAM
//! link arrive on the daemon's migration listener (`--accept-migrations`),
//! dispatched by purpose (docs/vm.md).
//!
//! ```text
//!  Hello ─ checks, RAM file created ─▶ Welcome
//!  RAM link: Attach ─ memsync Backup into the RAM file until the source closes it
//!  Prepare ─ disks served here? ─ QEMU -incoming defer -S on the RAM file ─▶ Ready
//!  StateData* ─▶ QEMU's migrate-incoming socket ; StateEnd ─ RAM at that seq?
//!    ─ QEMU loaded? ─▶ Loaded
//!  Commit ─ ownership record ─▶ Committed ─ cont
//!  link lost or Abort before Commit: QEMU killed, RAM file removed
//! ```

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use parking_lot::{Condvar, Mutex};
use serde_json::json;
use understudy_memsync::PAGE_SIZE;
use understudy_memsync::sync::{Backup, BackupImage};
use understudy_peer::Link;
use understudy_vm::{LaunchMode, VmSpec};
use understudy_vm_migration::{Hello, Msg, PURPOSE, RAM_PURPOSE, precopy, pump};

use super::migrate::{set_ignore_shared, wait_migration};
use super::{DiskUse, ExportHost, VmHost, stop_options};

/// An incoming migration waiting for (or running) its RAM link.
#[derive(Debug)]
pub(super) struct Incoming {
    vm: String,
    ram_file: PathBuf,
    pages: u64,
    /// Set when the RAM link ended: the checkpoint the file holds, or why
    /// it failed.
    done: Mutex<Option<Result<Option<u64>, String>>>,
    cv: Condvar,
}

impl VmHost {
    /// A peer link from the migration listener: taken if it is a VM
    /// migration's, handed back otherwise.
    pub fn accept_link(&self, link: Link, host: &dyn ExportHost) -> Option<Link> {
        let purpose = link.peer().purpose.clone();
        match purpose.as_str() {
            PURPOSE => {
                if let Err(e) = self.receive(link, host) {
                    tracing::warn!("incoming VM migration failed: {e:#}");
                }
                None
            }
            RAM_PURPOSE => {
                if let Err(e) = self.receive_ram(link) {
                    tracing::warn!("incoming VM RAM link failed: {e:#}");
                }
                None
            }
            _ => Some(link),
        }
    }

    fn receive_ram(&self, mut link: Link) -> Result<()> {
        let Msg::Attach { vm, id } = Msg::recv(&mut link, "Attach")? else {
            bail!("the RAM link did not start with Attach");
        };
        let inc = self
            .incoming
            .lock()
            .get(&id)
            .cloned()
            .with_context(|| format!("no incoming migration {id} of VM {vm}"))?;
        let r = (|| -> Result<Option<u64>> {
            let img = BackupImage::open(&inc.ram_file, inc.pages, false)?;
            let mut backup = Backup::new(precopy::sync_config(inc.pages), img)?;
            backup.serve(&mut link)?;
            Ok(backup.image().applied_seq())
        })();
        let out = r.as_ref().map(|s| *s).map_err(|e| format!("{e:#}"));
        *inc.done.lock() = Some(out);
        inc.cv.notify_all();
        r.map(|_| ())
    }

    /// The VM link: everything up to the commit; any failure before it
    /// removes what was prepared here.
    fn receive(&self, mut link: Link, host: &dyn ExportHost) -> Result<()> {
        let hello = match Msg::recv(&mut link, "Hello")? {
            Msg::Hello(h) => h,
            Msg::Query { vm, lineage } => return self.answer(&link, &vm, &lineage),
            _ => bail!("the VM link did not start with Hello or Query"),
        };
        let tx = link.sender();
        let (spec, incremental) = match self.check_hello(&hello) {
            Ok(s) => s,
            Err(e) => {
                let _ = Msg::Abort {
                    reason: format!("{e:#}"),
                }
                .send(&tx);
                return Err(e);
            }
        };
        let inc = Arc::new(Incoming {
            vm: hello.vm.clone(),
            ram_file: spec.ram_file(),
            pages: hello.ram_bytes / PAGE_SIZE as u64,
            done: Mutex::new(None),
            cv: Condvar::new(),
        });
        self.incoming.lock().insert(hello.id.clone(), inc.clone());
        let r = self.receive_inner(&mut link, &hello, (spec, incremental), &inc, host);
        self.incoming.lock().remove(&hello.id);
        // Either the copy runs here now or it is removed below.
        self.departed.lock().remove(&hello.vm);
        if let Err(e) = &r {
            let _ = Msg::Abort {
                reason: format!("{e:#}"),
            }
            .send(&tx);
            if self.runner.stop(&hello.vm, &stop_options(true)).is_err() {
                // It never started: remove the RAM file ourselves.
            }
            remove_ram(&inc.ram_file);
        }
        r
    }

    /// The spec as it runs here (this daemon's RAM directory, state
    /// directory and NBD socket), and whether the RAM file here is an older
    /// copy of this VM to update (an incremental return).
    fn check_hello(&self, h: &Hello) -> Result<(VmSpec, bool)> {
        if *self.op.lock() {
            bail!("the target daemon is stopping");
        }
        if self.runner.get(&h.vm).is_ok() {
            bail!("a VM named {} already runs on the target", h.vm);
        }
        let mut spec = VmSpec::from_toml(&h.spec_toml).context("the VM's spec")?;
        spec.paths.ram_dir = PathBuf::from(&self.ram_dir);
        spec.paths.state_dir = None;
        for d in &mut spec.disks {
            d.socket = self.socket.clone();
        }
        if spec.memory.bytes() != h.ram_bytes {
            bail!("the spec's memory differs from the announced RAM size");
        }
        let ram = spec.ram_file();
        let own_copy = self.departed.lock().get(&h.vm).is_some_and(|d| {
            d.lineage == h.lineage
                && d.generation <= h.generation
                && d.ram_file == ram
                && std::fs::metadata(&ram).is_ok_and(|m| m.len() == h.ram_bytes)
        });
        if own_copy {
            return Ok((spec, true));
        }
        if ram.exists() {
            bail!(
                "the RAM file {} exists on the target (another VM of that name, or both daemons share a RAM directory: give them different --vm-ram-dir)",
                ram.display()
            );
        }
        std::fs::File::create_new(&ram)
            .and_then(|f| f.set_len(h.ram_bytes))
            .with_context(|| format!("creating the RAM file {}", ram.display()))?;
        Ok((spec, false))
    }

    fn receive_inner(
        &self,
        link: &mut Link,
        hello: &Hello,
        (spec, incremental): (VmSpec, bool),
        inc: &Incoming,
        host: &dyn ExportHost,
    ) -> Result<()> {
        let tx = link.sender();
        let node = host
            .migration()
            .peer()
            .map(|p| p.node_id)
            .unwrap_or_default();
        Msg::Welcome { node, incremental }.send(&tx)?;
        match Msg::recv(link, "Prepare")? {
            Msg::Prepare => {}
            _ => bail!("expected Prepare"),
        }
        let (vm, sock) = self.start_receiving_qemu(hello, spec, host)?;
        Msg::Ready.send(&tx)?;
        let mut stream = connect_within(&sock, Duration::from_secs(60))?;
        let (bytes, ram_seq) = pump::recv_stream(link, &mut stream)?;
        drop(stream);
        let applied = wait_ram(inc, Duration::from_secs(60))?;
        if applied != Some(ram_seq) {
            bail!("the RAM file holds checkpoint {applied:?}, the source's last is {ram_seq}");
        }
        wait_migration(&vm, "target")?;
        tracing::info!(vm = %hello.vm, state_bytes = bytes, ram_seq, "device state loaded");
        Msg::Loaded.send(&tx)?;
        let Msg::Commit { generation } = Msg::recv(link, "Commit")? else {
            bail!("expected Commit");
        };
        self.commit(hello, generation, &vm.paths().state_dir)?;
        // QEMU owns the RAM file now: memsync's record of it is stale.
        let _ = std::fs::remove_file(side(&inc.ram_file, ".state"));
        // The VM is ours from here on, whether the answer arrives or not
        // (a source that lost it asks with Query).
        if let Err(e) = Msg::Committed.send(&tx) {
            tracing::warn!(vm = %hello.vm, "the commit's answer did not go out ({e}); the VM runs here");
        }
        if let Err(e) = vm.resume() {
            tracing::error!(vm = %hello.vm, "cont after the commit failed: {}", understudy_block::error_chain(&e));
        }
        tracing::info!(vm = %hello.vm, generation, "VM migrated here and running");
        Ok(())
    }

    /// The receiving QEMU: on the RAM file, with the disks this daemon
    /// now serves, paused, listening for the device state on a Unix socket
    /// of its state directory (returned).
    fn start_receiving_qemu(
        &self,
        hello: &Hello,
        spec: VmSpec,
        host: &dyn ExportHost,
    ) -> Result<(Arc<understudy_vm::Vm>, PathBuf)> {
        for d in &hello.disks {
            if !host.has_export(&d.export) {
                bail!(
                    "disk {} (export {}) is not served on the target after its migration",
                    d.name,
                    d.export
                );
            }
        }
        self.ensure_listener()?;
        let mode = LaunchMode {
            incoming: true,
            paused: true,
            reuse_ram: true,
        };
        let vm = self.runner.start(spec, mode)?;
        set_ignore_shared(&vm)?;
        let sock = vm.paths().state_dir.join("migrate-in.sock");
        vm.qmp()
            .execute(
                "migrate-incoming",
                Some(json!({"uri": format!("unix:{}", sock.display())})),
            )
            .context("QMP migrate-incoming on the target")?;
        Ok((vm, sock))
    }

    /// Answer a source that lost the commit's answer: once no migration of
    /// `vm` is in progress here, whether this daemon owns it.
    fn answer(&self, link: &Link, vm: &str, lineage: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.incoming.lock().values().any(|i| i.vm == vm) {
            if Instant::now() > deadline {
                bail!("a migration of VM {vm} is still in progress here; ask again later");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let generation = match self.owners.lock().get(vm) {
            Some((l, g)) if l == lineage && self.runner.get(vm).is_ok() => Some(*g),
            _ => None,
        };
        tracing::info!(vm, ?generation, "answered an ownership query");
        Msg::Answer { generation }.send(&link.sender())?;
        Ok(())
    }

    /// The VM is owned here from now on: its record on disk, its disks and
    /// lineage in the tables.
    fn commit(&self, h: &Hello, generation: u64, state_dir: &Path) -> Result<()> {
        let record =
            json!({"vm": h.vm, "lineage": h.lineage, "generation": generation, "owner": true});
        understudy_durable::replace(&state_dir.join("owner.json"), record.to_string().as_bytes())
            .context("writing the VM's ownership record")?;
        let uses = h
            .disks
            .iter()
            .map(|d| DiskUse {
                export: d.export.clone(),
                opened: false,
            })
            .collect();
        self.disks.lock().insert(h.vm.clone(), uses);
        self.owners
            .lock()
            .insert(h.vm.clone(), (h.lineage.clone(), generation));
        Ok(())
    }
}

/// Wait until the RAM link ended; the checkpoint the RAM file holds.
fn wait_ram(inc: &Incoming, limit: Duration) -> Result<Option<u64>> {
    let deadline = Instant::now() + limit;
    let mut done = inc.done.lock();
    while done.is_none() {
        if inc.cv.wait_until(&mut done, deadline).timed_out() {
            bail!("the RAM link of VM {} did not finish", inc.vm);
        }
    }
    match done.clone() {
        Some(Ok(s)) => Ok(s),
        Some(Err(e)) => bail!("the RAM link failed: {e}"),
        None => bail!("the RAM link did not finish"),
    }
}

fn connect_within(path: &Path, limit: Duration) -> Result<UnixStream> {
    let deadline = Instant::now() + limit;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "the target QEMU does not listen on {}; see its QEMU log",
                        path.display()
                    )
                });
            }
        }
    }
}

fn side(p: &Path, ext: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(ext);
    PathBuf::from(s)
}

/// Remove a RAM file and memsync's side files.
pub(super) fn remove_ram(p: &Path) {
    for ext in ["", ".state", ".redo", ".state.tmp", ".redo.tmp"] {
        let _ = std::fs::remove_file(side(p, ext));
    }
}
