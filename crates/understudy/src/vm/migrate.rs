//! `vm.migrate`: the source side of a whole-VM live migration (docs/vm.md).
//!
//! ```text
//!  VM link: Hello ─▶ Welcome; disk jobs start (one per disk, concurrent)
//!  RAM link: Attach, handshake; rounds while the guest runs (throttled when
//!    they do not converge) until every disk job completed and a round fits
//!  Prepare ─▶ Ready (target QEMU waits, -incoming defer) ; one more round
//!  stop ─ last round ─ migrate unix: ─ StateData*/StateEnd ─▶ Loaded
//!  Commit ─▶ Committed: the source QEMU quits.  Any failure before Commit
//!  was sent: cont on the source.  Commit sent, no answer: in doubt, paused.
//! ```

use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{Value, json};
use understudy_migration::Phase as DiskPhase;
use understudy_peer::{Link, PeerConfig};
use understudy_vm::Vm;
use understudy_vm_migration::{
    DiskInfo, Guest, Hello, Msg, PURPOSE, Phase, PrecopyConfig, Progress, RAM_PURPOSE, RamSender,
    RoundReport, Throttle, precopy, pump,
};

use super::{ApiError, ExportHost, VmHost, stop_options, vm_error};
use crate::migrate::Manager;

/// Params of `vm.migrate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MigrateParams {
    name: String,
    /// The target daemon's `--peer-listen` address.
    to: String,
    #[serde(default)]
    max_downtime_ms: Option<f64>,
}

/// The guest's vCPUs through QMP, for the throttle.
struct QmpGuest(Arc<Vm>);

impl Guest for QmpGuest {
    fn pause(&self) -> Result<(), String> {
        self.0
            .pause()
            .map_err(|e| understudy_block::error_chain(&e))
    }
    fn resume(&self) -> Result<(), String> {
        self.0
            .resume()
            .map_err(|e| understudy_block::error_chain(&e))
    }
}

/// Everything the migration thread needs.
struct Source {
    vm: Arc<Vm>,
    to: String,
    peer: PeerConfig,
    manager: Arc<Manager>,
    disks: Vec<DiskInfo>,
    cfg: PrecopyConfig,
    progress: Arc<Mutex<Progress>>,
    owner: (String, u64),
}

/// How the switch-over ended.
enum Outcome {
    Done,
    /// Commit sent, answer lost: the guest stays paused here.
    InDoubt(anyhow::Error),
}

impl VmHost {
    /// `vm.migrate`: check, then run the migration in its own thread; the
    /// answer is the first progress (follow it with `vm.status`).
    pub(super) fn migrate(
        &self,
        p: MigrateParams,
        host: &dyn ExportHost,
    ) -> Result<Value, ApiError> {
        let mut migrations = self.migrations.lock();
        if migrations
            .get(&p.name)
            .is_some_and(|m| !m.lock().phase.is_final())
        {
            return Err(ApiError::new(
                "exists",
                format!(
                    "VM {} is already migrating; watch it with `understudy vm status {}`",
                    p.name, p.name
                ),
            ));
        }
        let src = self.source(&p, host)?;
        let progress = src.progress.clone();
        let after = Departure {
            runner: self.runner.clone(),
            disks: self.disks.clone(),
            owners: self.owners.clone(),
            departed: self.departed.clone(),
        };
        std::thread::Builder::new()
            .name("vm-migrate".into())
            .spawn(move || src.run_and_report(&after))
            .map_err(|e| ApiError::new("io", format!("cannot start the migration thread: {e}")))?;
        let v = json!(*progress.lock());
        migrations.insert(p.name, progress);
        Ok(v)
    }

    /// What the migration of `p.name` needs: the VM, the peer settings,
    /// its disks' exports, its lineage.
    fn source(&self, p: &MigrateParams, host: &dyn ExportHost) -> Result<Source, ApiError> {
        let vm = self.runner.get(&p.name).map_err(|e| vm_error(&e))?;
        let manager = host.migration();
        let peer = manager.peer().ok_or_else(|| {
            ApiError::new(
                "unsupported",
                "this daemon has no --peer-key: restart it with --peer-key FILE (the key the target uses) to migrate VMs",
            )
        })?;
        let uses = self.disks.lock().get(&p.name).cloned().unwrap_or_default();
        let disks = vm
            .spec()
            .disks
            .iter()
            .zip(&uses)
            .map(|(d, u)| DiskInfo {
                name: d.name.clone(),
                export: u.export.clone(),
                readonly: d.readonly,
            })
            .collect();
        let mut cfg = PrecopyConfig::default();
        if let Some(ms) = p.max_downtime_ms {
            cfg.max_downtime = Duration::from_secs_f64(ms.max(1.0) / 1e3);
        }
        let progress = Arc::new(Mutex::new(Progress {
            vm: p.name.clone(),
            to: p.to.clone(),
            ram_bytes: vm.spec().memory.bytes(),
            ..Progress::default()
        }));
        let owner = self
            .owners
            .lock()
            .get(&p.name)
            .cloned()
            .unwrap_or_else(|| (uuid::Uuid::new_v4().to_string(), 0));
        Ok(Source {
            vm,
            to: p.to.clone(),
            peer,
            manager,
            disks,
            cfg,
            progress,
            owner,
        })
    }
}

/// The tables a VM leaves when it has moved away.
struct Departure {
    runner: Arc<understudy_vm::Runner>,
    disks: Arc<Mutex<std::collections::BTreeMap<String, Vec<super::DiskUse>>>>,
    owners: Arc<Mutex<std::collections::BTreeMap<String, (String, u64)>>>,
    departed: Arc<Mutex<std::collections::BTreeMap<String, super::Departed>>>,
}

impl Departure {
    /// The target runs the guest now: end the source QEMU, keep its RAM
    /// file as the base of an incremental return. The disks stay here,
    /// handed over, for their own incremental return.
    fn left(&self, src: &Source) {
        let name = src.vm.name().to_string();
        let ram_file = src.vm.paths().ram_file.clone();
        self.disks.lock().remove(&name);
        self.owners.lock().remove(&name);
        let opts = understudy_vm::StopOptions {
            keep_ram: true,
            ..stop_options(false)
        };
        if let Err(e) = self.runner.stop(&name, &opts) {
            tracing::error!(vm = %name, "ending the source QEMU: {}", understudy_block::error_chain(&e));
            return;
        }
        let pages = src.vm.spec().memory.bytes() / understudy_memsync::PAGE_SIZE as u64;
        match keep_copy(&ram_file, pages) {
            Ok(()) => {
                let d = super::Departed {
                    lineage: src.owner.0.clone(),
                    generation: src.owner.1 + 1,
                    ram_file,
                };
                self.departed.lock().insert(name, d);
            }
            Err(e) => {
                tracing::warn!(vm = %name, "cannot keep the RAM copy for a return: {e:#}");
                super::incoming::remove_ram(&ram_file);
            }
        }
    }
}

/// Make the RAM file a memsync backup image holding "some checkpoint": a
/// later primary that does not know it compares page hashes and sends
/// only the pages that differ.
fn keep_copy(ram_file: &std::path::Path, pages: u64) -> Result<()> {
    let mut img = understudy_memsync::sync::BackupImage::open(ram_file, pages, false)?;
    img.apply(&understudy_memsync::Decoded {
        seq: 1,
        ..Default::default()
    })?;
    Ok(())
}

impl Source {
    /// The migration thread: run, clean up after a move, report the end.
    fn run_and_report(&self, after: &Departure) {
        let name = self.vm.name().to_string();
        let t0 = Instant::now();
        let r = self.run();
        if let Ok(Outcome::Done) = &r {
            after.left(self);
        }
        let mut pr = self.progress.lock();
        pr.total_ms = t0.elapsed().as_secs_f64() * 1e3;
        match r {
            Ok(Outcome::Done) => {
                pr.phase = Phase::Completed;
                tracing::info!(vm = %name, "VM migrated");
            }
            Ok(Outcome::InDoubt(e)) => {
                pr.phase = Phase::InDoubt;
                pr.error = Some(format!("{e:#}"));
                tracing::error!(vm = %name, "VM migration in doubt: {e:#}");
            }
            Err(e) => {
                pr.phase = Phase::Failed;
                pr.error = Some(format!("{e:#}"));
                tracing::warn!(vm = %name, "VM migration failed; the VM stays here: {e:#}");
            }
        }
    }

    fn set(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut self.progress.lock());
    }

    /// The whole migration; an `Err` means the guest runs on the source.
    fn run(&self) -> Result<Outcome> {
        let name = self.vm.name().to_string();
        let mut link = Link::connect(&self.to, &self.peer, PURPOSE)
            .with_context(|| format!("connecting to {} for VM migration", self.to))?;
        let hello = Hello {
            vm: name.clone(),
            id: uuid::Uuid::new_v4().to_string(),
            spec_toml: self
                .vm
                .spec()
                .to_toml()
                .context("serialising the VM spec")?,
            ram_bytes: self.vm.spec().memory.bytes(),
            disks: self.disks.clone(),
            lineage: self.owner.0.clone(),
            generation: self.owner.1,
        };
        let tx = link.sender();
        Msg::Hello(hello.clone()).send(&tx)?;
        let Msg::Welcome { node, incremental } = Msg::recv(&mut link, "Welcome")? else {
            bail!("the target answered Hello with something else than Welcome");
        };
        self.set(|p| {
            p.target_node = Some(node.clone());
            p.incremental = incremental;
            p.phase = Phase::Precopy;
        });
        for d in &self.disks {
            self.manager
                .start_job(&d.export, &self.to, self.cfg.max_downtime)
                .map_err(|(_, m)| anyhow::anyhow!("disk {} (export {}): {m}", d.name, d.export))?;
        }
        let mut ram_link = Link::connect(&self.to, &self.peer, RAM_PURPOSE)
            .with_context(|| format!("connecting the RAM link to {}", self.to))?;
        Msg::Attach {
            vm: name.clone(),
            id: hello.id.clone(),
        }
        .send(&ram_link.sender())?;
        let mut ram = RamSender::open(&self.vm.paths().ram_file, hello.ram_bytes)?;
        ram.handshake(&mut ram_link)?;
        let guest: Arc<dyn Guest> = Arc::new(QmpGuest(self.vm.clone()));
        let throttle = Throttle::start(guest);
        let r = self.precopy(&mut ram, &mut ram_link, &throttle);
        // The guest runs (unthrottled) whatever happened.
        throttle.finish()?;
        r?;
        Msg::Prepare.send(&tx)?;
        match Msg::recv(&mut link, "Ready")? {
            Msg::Ready => {}
            _ => bail!("the target answered Prepare with something else than Ready"),
        }
        // Catch up with what the guest dirtied while the target started.
        let r = ram.round(&mut ram_link)?;
        self.record(&r);
        self.switchover(&mut link, &mut ram, ram_link)
    }

    /// Rounds until every disk job completed and a round fits the
    /// downtime (or the round limit is reached), throttling the guest
    /// after rounds that did not fit.
    fn precopy(&self, ram: &mut RamSender, link: &mut Link, throttle: &Throttle) -> Result<()> {
        let mut misses = 0;
        loop {
            let r = ram.round(link)?;
            self.record(&r);
            let fits = precopy::converged(&r, &self.cfg);
            if !fits {
                misses += 1;
            }
            throttle.set(precopy::throttle_duty(&self.cfg, misses));
            let rounds = self.progress.lock().rounds;
            self.set(|p| p.throttle_pct = throttle.duty());
            if self.disks_done()? && (fits || rounds >= self.cfg.max_rounds) {
                if !fits {
                    tracing::warn!(
                        vm = %self.vm.name(), rounds, cost_ms = r.cost().as_secs_f64() * 1e3,
                        "RAM did not converge within --max-downtime; switching over anyway"
                    );
                }
                return Ok(());
            }
        }
    }

    fn record(&self, r: &RoundReport) {
        self.set(|p| {
            p.rounds += 1;
            p.last_dirty_pages = r.dirty_pages;
            p.dirty_rate = r.dirty_rate();
            p.ram_bytes_sent += r.wire_bytes;
            if !r.transfer.is_zero() {
                p.bandwidth = (r.wire_bytes as f64 / r.transfer.as_secs_f64()) as u64;
            }
            p.scan_ms = (r.read + r.encode).as_secs_f64() * 1e3;
        });
    }

    /// Whether every disk job completed; an error if one failed.
    fn disks_done(&self) -> Result<bool> {
        let mut done = true;
        let mut phases = Vec::new();
        for d in &self.disks {
            let st = self
                .manager
                .job_status(&d.export)
                .with_context(|| format!("the migration job of export {} vanished", d.export))?;
            phases.push((d.export.clone(), format!("{:?}", st.phase).to_lowercase()));
            match st.phase {
                DiskPhase::Completed => {}
                DiskPhase::Failed | DiskPhase::Cancelled => bail!(
                    "disk {} (export {}) did not migrate: {}",
                    d.name,
                    d.export,
                    st.error.unwrap_or_default()
                ),
                _ => done = false,
            }
        }
        self.set(|p| p.disks = phases);
        Ok(done)
    }

    /// Pause, last RAM round, device state, commit. Before the Commit is
    /// sent every failure resumes the guest here.
    fn switchover(&self, link: &mut Link, ram: &mut RamSender, ram_link: Link) -> Result<Outcome> {
        self.set(|p| p.phase = Phase::Switchover);
        let sock = self.vm.paths().state_dir.join("migrate-out.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock)
            .with_context(|| format!("listening on {} for the device state", sock.display()))?;
        set_ignore_shared(&self.vm)?;
        let paused = Instant::now();
        self.vm.pause()?;
        let r = self.transfer(link, ram, ram_link, &listener);
        let _ = std::fs::remove_file(&sock);
        if let Err(e) = r {
            let _ = Msg::Abort {
                reason: format!("{e:#}"),
            }
            .send(&link.sender());
            self.vm
                .resume()
                .context("resuming the guest on the source after a failed switch-over")?;
            return Err(e);
        }
        let generation = self.owner.1 + 1;
        let commit = Msg::Commit { generation };
        if let Err(e) = commit.send(&link.sender()) {
            tracing::warn!(vm = %self.vm.name(), "sending the commit failed ({e}); asking the target");
            return self.settle(generation);
        }
        match Msg::recv(link, "Committed") {
            Ok(Msg::Committed) => {
                let ms = paused.elapsed().as_secs_f64() * 1e3;
                self.set(|p| p.downtime_ms = Some(ms));
                Ok(Outcome::Done)
            }
            Ok(_) | Err(_) => {
                tracing::warn!(vm = %self.vm.name(), "the commit's answer was lost; asking the target");
                self.settle(generation)
            }
        }
    }

    /// The commit's answer was lost (the in-doubt rule): the guest stays
    /// paused while the target is asked, on a new link, whether it owns the
    /// VM. It does: the move happened. It does not: the guest resumes here.
    /// No answer within the attempts: in doubt, still paused.
    fn settle(&self, generation: u64) -> Result<Outcome> {
        let mut last = None;
        for _ in 0..20 {
            match self.ask_owner() {
                Ok(Some(g)) if g >= generation => return Ok(Outcome::Done),
                Ok(_) => {
                    self.vm.resume().context(
                        "resuming the guest on the source after the target refused the commit",
                    )?;
                    bail!(
                        "the commit's answer was lost and the target had not committed: the guest resumed here"
                    );
                }
                Err(e) => last = Some(e),
            }
            // Give a restarting target time to come back.
            std::thread::sleep(Duration::from_millis(500));
        }
        let e = last.unwrap_or_else(|| anyhow::anyhow!("no answer"));
        Ok(Outcome::InDoubt(e.context(format!(
            "the commit's answer was lost and the target {} cannot be asked: the guest stays paused here; \
             if `understudy vm status {}` on the target shows it running, stop this copy, else `cont` it",
            self.to,
            self.vm.name()
        ))))
    }

    /// Ask the target on a new VM link whether it owns the VM.
    fn ask_owner(&self) -> Result<Option<u64>> {
        let mut link = Link::connect(&self.to, &self.peer, PURPOSE)
            .with_context(|| format!("connecting to {} to settle the commit", self.to))?;
        Msg::Query {
            vm: self.vm.name().to_string(),
            lineage: self.owner.0.clone(),
        }
        .send(&link.sender())?;
        match Msg::recv(&mut link, "Answer")? {
            Msg::Answer { generation } => Ok(generation),
            _ => bail!("the target answered Query with something else than Answer"),
        }
    }

    /// Last RAM round, then QEMU's device state over the VM link.
    fn transfer(
        &self,
        link: &mut Link,
        ram: &mut RamSender,
        mut ram_link: Link,
        listener: &UnixListener,
    ) -> Result<()> {
        let r = ram.round(&mut ram_link)?;
        self.record(&r);
        let _ = ram_link.shutdown("last checkpoint sent");
        self.vm
            .qmp()
            .execute(
                "migrate",
                Some(json!({"uri": format!("unix:{}", self.vm.paths().state_dir.join("migrate-out.sock").display())})),
            )
            .context("QMP migrate on the source")?;
        let mut stream = accept_within(listener, Duration::from_secs(60))?;
        let bytes = pump::send_stream(&mut stream, &link.sender())?;
        wait_migration(&self.vm, "source")?;
        self.set(|p| p.state_bytes = bytes);
        Msg::StateEnd { ram_seq: r.seq }.send(&link.sender())?;
        match Msg::recv(link, "Loaded")? {
            Msg::Loaded => Ok(()),
            _ => bail!("the target answered the device state with something else than Loaded"),
        }
    }
}

/// `x-ignore-shared`: the RAM is in the shared file, so QEMU's stream
/// carries the device state only.
pub(super) fn set_ignore_shared(vm: &Vm) -> Result<()> {
    vm.qmp()
        .execute(
            "migrate-set-capabilities",
            Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})),
        )
        .context("QMP migrate-set-capabilities x-ignore-shared")?;
    Ok(())
}

/// Poll `query-migrate` until QEMU's migration completed.
pub(super) fn wait_migration(vm: &Vm, side: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = vm
            .qmp()
            .execute("query-migrate", None)
            .with_context(|| format!("QMP query-migrate on the {side}"))?;
        match v["status"].as_str().unwrap_or("") {
            "completed" => return Ok(()),
            "failed" | "cancelled" => bail!(
                "QEMU's migration on the {side} {}: {}; see its QEMU log",
                v["status"].as_str().unwrap_or(""),
                v["error-desc"].as_str().unwrap_or("no detail")
            ),
            _ if Instant::now() > deadline => bail!(
                "QEMU's migration on the {side} did not complete within 60 s; see its QEMU log"
            ),
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// Accept QEMU's connection, giving up after `limit`.
fn accept_within(l: &UnixListener, limit: Duration) -> Result<std::os::unix::net::UnixStream> {
    l.set_nonblocking(true)?;
    let deadline = Instant::now() + limit;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => {
                return Err(e)
                    .context("QEMU did not connect to send its device state; see its QEMU log");
            }
        }
    }
}
