//! Live disk migration in the daemon and on the command line.
//!
//! * `serve --accept-migrations DIR --peer-listen ADDR --peer-key FILE`
//!   receives disks into DIR and serves them once they are committed
//!   (and again after a restart).
//! * `migration.start` / `migration.status` / `migration.cancel` on the
//!   control socket drive [`understudy_migration::Job`]s.
//! * `understudy migrate EXPORT --to HOST:PORT` is a client of those
//!   methods with a progress bar (or JSON lines).
//!
//! See docs/migration.md.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::json;
use understudy_bitmap::Persister;
use understudy_migration::{
    Job, MigrateOptions, Mode, Phase, Route, SourceExport, SourceHooks, Status, TargetConfig,
    TargetHooks, TargetService, record,
};
use understudy_nbd_server::{Export, Server};
use understudy_peer::{PeerConfig, PeerKey};

use crate::control::proto::Response;

/// Migration options of `understudy serve`.
#[derive(Debug, Clone, Default, Args)]
pub struct MigrationArgs {
    /// Receive migrated disks into this directory (as NAME.img) and serve
    /// the ones this node owns, also after a restart. Needs --peer-listen
    /// and --peer-key.
    #[arg(long, value_name = "DIR")]
    pub accept_migrations: Option<PathBuf>,
    /// Address for incoming migration links (host:port).
    #[arg(long, value_name = "ADDR", requires = "accept_migrations")]
    pub peer_listen: Option<String>,
    /// Pre-shared key file for migration links (both ends use the same;
    /// create one with 32 random bytes, e.g. `head -c32 /dev/urandom | xxd -p -c64`).
    /// Authenticates peers but does NOT encrypt the link: prefer
    /// --peer-tls-cert/--peer-tls-key/--peer-tls-ca (docs/security.md).
    #[arg(long, value_name = "FILE", conflicts_with = "peer_tls_cert")]
    pub peer_key: Option<PathBuf>,
    /// This node's certificate (PEM, from `understudy certs issue`): peer
    /// links run over TLS 1.3 with mutual certificate authentication.
    #[arg(long, value_name = "FILE", requires_all = ["peer_tls_key", "peer_tls_ca"])]
    pub peer_tls_cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "peer_tls_cert")]
    pub peer_tls_key: Option<PathBuf>,
    /// The cluster CA (PEM): only peers whose certificate chains to it are
    /// accepted.
    #[arg(long, value_name = "FILE", requires = "peer_tls_cert")]
    pub peer_tls_ca: Option<PathBuf>,
    /// This node's id on peer links; must be stable across restarts and
    /// differ between nodes. Default: hostname plus a hash of --control.
    #[arg(long)]
    pub node_id: Option<String>,
    /// The epoch journal of received disks (NAME.img.journal): off, on,
    /// or on,journal-size=SIZE,in-place-min=SIZE. Their FLUSH is always
    /// durable: the migration's commit relies on it.
    #[arg(
        long,
        value_name = "SPEC",
        default_value = "off",
        requires = "accept_migrations"
    )]
    pub received_journal: crate::spec::ReceivedJournal,
}

/// The peer-link settings from `serve`'s flags: TLS when a certificate is
/// given (the node id defaults to the certificate's name), PSK with
/// --peer-key, none otherwise.
fn peer_config(args: &MigrationArgs, control: &Path) -> Result<Option<PeerConfig>> {
    let mut cfg = match (&args.peer_tls_cert, &args.peer_tls_key, &args.peer_tls_ca) {
        (Some(cert), Some(key), Some(ca)) => PeerConfig::from_tls_files(cert, key, ca)
            .with_context(|| format!("loading the peer TLS identity {}", cert.display()))?,
        _ => match &args.peer_key {
            Some(path) => {
                let mut cfg = PeerConfig::new(PeerKey::load(path)?)?;
                cfg.node_id = default_node_id(control);
                cfg
            }
            None => return Ok(None),
        },
    };
    if let Some(id) = &args.node_id {
        cfg.node_id = id.clone();
    }
    cfg.validate()?;
    Ok(Some(cfg))
}

/// Refuse to serve an image that was handed over (or is in doubt, or
/// partial); the error says what to do.
pub fn check_servable(image: &Path) -> Result<()> {
    record::check_servable(image).map_err(|e| anyhow::anyhow!(e))
}

/// `Ok(Some(node))` when a lost commit answer to `node` left `image` in
/// doubt: it is opened with failing I/O until `understudy migrate` to that
/// node settles who owns it. `Ok(None)` when it may be served; an error
/// (saying what to do) otherwise.
pub fn servable_or_in_doubt(image: &Path) -> Result<Option<String>> {
    match record::load(image).map_err(|e| anyhow::anyhow!(e))? {
        None => Ok(None),
        Some(r) => match &r.state {
            record::OwnerState::Handing { to, .. } => Ok(Some(to.clone())),
            _ => r
                .check_servable(image)
                .map(|()| None)
                .map_err(|e| anyhow::anyhow!(e)),
        },
    }
}

fn default_node_id(control: &Path) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(40)
        .collect();
    let tag = crc32c::crc32c(control.as_os_str().as_encoded_bytes());
    format!("{host}-{tag:08x}")
}

/// The daemon's migration state: its migratable exports, running jobs,
/// and the receiving service.
pub struct Manager {
    nbd: Server,
    exports: Mutex<HashMap<String, SourceExport>>,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    peer: Option<PeerConfig>,
    target: Mutex<Option<TargetService>>,
    persisters: Mutex<Vec<Persister>>,
    /// Exports served from the migration directory (closed at shutdown).
    received: Mutex<Vec<String>>,
    /// Takes peer links of other purposes (VM migrations).
    link_handler: Mutex<Option<LinkHandler>>,
}

/// What the daemon does with a peer link of a purpose other than `migrate`:
/// `None` when taken, the link back when refused.
pub type LinkHandler =
    Arc<dyn Fn(understudy_peer::Link) -> Option<understudy_peer::Link> + Send + Sync>;

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("exports", &self.exports.lock().keys().collect::<Vec<_>>())
            .finish()
    }
}

impl TargetHooks for Manager {
    fn open_copy(&self, name: &str) -> Option<SourceExport> {
        self.exports
            .lock()
            .get(name)
            .filter(|e| !e.switch.is_local())
            .cloned()
    }

    fn serve(&self, export: SourceExport, persister: Option<Persister>) {
        let mut e = Export::new(export.name.clone(), export.switch.clone())
            .with_description(format!("understudy export of {}", export.image.display()));
        if let Some(j) = &export.journal {
            // As a journaled --export: received disks flush durably.
            e = e.with_ordering(Arc::new(crate::serve::JournalSync(j.clone(), true)));
        }
        self.nbd.exports().insert(e);
        if let Some(p) = persister {
            self.persisters.lock().push(p);
            self.received.lock().push(export.name.clone());
        }
        self.exports.lock().insert(export.name.clone(), export);
    }

    fn other_link(&self, link: understudy_peer::Link) -> Option<understudy_peer::Link> {
        let h = self.link_handler.lock().clone();
        match h {
            Some(h) => h(link),
            None => Some(link),
        }
    }
}

impl Manager {
    /// Exports received by migration and served from the migration
    /// directory (the daemon's own `--export`s are not among them).
    pub fn received_exports(&self) -> Vec<SourceExport> {
        let received = self.received.lock().clone();
        let exports = self.exports.lock();
        received
            .iter()
            .filter_map(|n| exports.get(n).cloned())
            .collect()
    }

    /// Make an export opened while serving (a VM's disk) migratable.
    pub fn register(&self, export: SourceExport) {
        self.exports.lock().insert(export.name.clone(), export);
    }

    /// Forget an export [`Manager::register`]ed, unless a migration job of
    /// it runs or it was handed over (it then stays for forwarding and an
    /// incremental return).
    pub fn unregister(&self, name: &str) {
        let running = self.jobs.lock().get(name).is_some_and(|j| !j.is_finished());
        let mut exports = self.exports.lock();
        if !running && exports.get(name).is_some_and(|e| e.switch.is_local()) {
            exports.remove(name);
        }
    }

    /// The peer link settings (`--peer-key`), if any.
    pub fn peer(&self) -> Option<PeerConfig> {
        self.peer.clone()
    }

    /// Route peer links of other purposes to `h` (VM migrations).
    pub fn set_link_handler(&self, h: LinkHandler) {
        *self.link_handler.lock() = Some(h);
    }

    /// Start a disk migration job of `export` (as `migration.start`).
    pub fn start_job(
        &self,
        export: &str,
        to: &str,
        max_downtime: Duration,
    ) -> Result<Status, (&'static str, String)> {
        let v = self.handle_inner(
            "migration.start",
            &json!({"export": export, "to": to, "max_downtime_ms": max_downtime.as_secs_f64() * 1e3}),
        )?;
        serde_json::from_value(v).map_err(|e| ("internal", e.to_string()))
    }

    /// The status of the last migration job of `export`.
    pub fn job_status(&self, export: &str) -> Option<Status> {
        self.jobs.lock().get(export).map(|j| j.status())
    }

    /// Set up migration for the daemon: register `exports`, serve the owned
    /// images in the migration directory and start listening for peers.
    pub fn start(
        args: &MigrationArgs,
        control: &Path,
        nbd: &Server,
        exports: impl IntoIterator<Item = SourceExport>,
    ) -> Result<Arc<Manager>> {
        let peer = peer_config(args, control)?;
        let target_cfg = match (&args.accept_migrations, &peer) {
            (Some(dir), Some(p)) => {
                let mut cfg = TargetConfig::new(dir.clone(), p.clone());
                cfg.journal = args.received_journal.0.as_ref().map(|j| j.config());
                Some(cfg)
            }
            (Some(_), None) => bail!(
                "--accept-migrations needs peer credentials: --peer-tls-cert/--peer-tls-key/\
                 --peer-tls-ca (see `understudy certs`), or --peer-key FILE (the same key file \
                 as the sending server)"
            ),
            _ => None,
        };
        let m = Arc::new(Manager {
            nbd: nbd.clone(),
            exports: Mutex::new(exports.into_iter().map(|e| (e.name.clone(), e)).collect()),
            jobs: Mutex::default(),
            peer,
            target: Mutex::default(),
            persisters: Mutex::default(),
            received: Mutex::default(),
            link_handler: Mutex::default(),
        });
        if let Some(cfg) = target_cfg {
            std::fs::create_dir_all(&cfg.dir).with_context(|| {
                format!("creating the migration directory {}", cfg.dir.display())
            })?;
            m.serve_owned_in(&cfg)?;
            let addr = args.peer_listen.clone().ok_or_else(|| {
                anyhow::anyhow!(
                    "--accept-migrations needs --peer-listen HOST:PORT for incoming links"
                )
            })?;
            let svc = TargetService::start(&addr, cfg.clone(), m.clone())
                .with_context(|| format!("listening for migrations on {addr}"))?;
            tracing::info!(
                addr = svc.local_addr(), dir = %cfg.dir.display(), node_id = %cfg.peer.node_id,
                "accepting migrations"
            );
            *m.target.lock() = Some(svc);
        }
        Ok(m)
    }

    /// Serve every image in the directory whose record says this node owns it.
    fn serve_owned_in(&self, cfg: &TargetConfig) -> Result<()> {
        let rd = std::fs::read_dir(&cfg.dir)
            .with_context(|| format!("reading the migration directory {}", cfg.dir.display()))?;
        for entry in rd {
            let path = entry?.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".img"))
                .map(str::to_owned)
            else {
                continue;
            };
            match record::load(&path) {
                Ok(Some(r)) if matches!(r.state, record::OwnerState::Owner { .. }) => {
                    if self.exports.lock().contains_key(&name) {
                        bail!(
                            "export {name:?} is both given with --export and owned in {}: remove one",
                            cfg.dir.display()
                        );
                    }
                    let (e, p) = understudy_migration::open_existing(&path, &name, cfg)
                        .with_context(|| {
                            format!("opening the received image {}", path.display())
                        })?;
                    tracing::info!(export = %name, generation = r.generation, "serving a received disk");
                    self.serve(e, Some(p));
                }
                Ok(Some(r)) => {
                    tracing::info!(export = %name, state = ?r.state, "not serving (not the owner)");
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(image = %path.display(), "skipping: {e}"),
            }
        }
        Ok(())
    }

    /// Stop listening and close what the manager opened. Exports that were
    /// handed over stop forwarding.
    pub fn shutdown(&self) {
        if let Some(t) = self.target.lock().take() {
            t.stop();
        }
        for j in self.jobs.lock().values() {
            j.cancel();
        }
        for e in self.exports.lock().values() {
            if !e.switch.is_local() {
                // Nothing is served any more: the daemon's final flush must
                // not go over a link that may be gone.
                e.switch.set_route(Route::Local);
            }
        }
        for p in self.persisters.lock().drain(..) {
            p.stop();
        }
        let received = std::mem::take(&mut *self.received.lock());
        for name in received {
            if let Some(e) = self.exports.lock().get(&name) {
                use understudy_block::DiskWrite;
                if let Err(err) = e.filter.flush() {
                    tracing::error!(export = %name, "final flush failed: {err}");
                }
                // Every epoch durable and applied before the bitmaps close.
                if let Some(j) = &e.journal
                    && let Err(err) = j.stop()
                {
                    tracing::error!(export = %name, "closing the journal failed: {err}");
                }
                if let Err(err) = e.store.close() {
                    tracing::error!(export = %name, "persisting bitmaps failed: {err}");
                }
            }
        }
    }

    /// Answer a `migration.*` control request.
    pub fn handle(&self, method: &str, params: &serde_json::Value) -> Response {
        match self.handle_inner(method, params) {
            Ok(v) => Response::ok(0, v),
            Err((code, msg)) => Response::err(0, code, msg),
        }
    }

    fn handle_inner(
        &self,
        method: &str,
        params: &serde_json::Value,
    ) -> Result<serde_json::Value, (&'static str, String)> {
        let bad = |m: String| ("bad_request", m);
        match method {
            "migration.start" => {
                let p: StartParams = serde_json::from_value(params.clone()).map_err(|e| {
                    bad(format!(
                        "migration.start needs {{\"export\": NAME, \"to\": \"HOST:PORT\", ...}}: {e}"
                    ))
                })?;
                let peer = self.peer.clone().ok_or((
                    "unsupported",
                    "this server has no --peer-key: restart it with --peer-key FILE (the key \
                     the target uses) to migrate"
                        .to_owned(),
                ))?;
                let export = self.exports.lock().get(&p.export).cloned().ok_or_else(|| {
                    (
                        "not_found",
                        format!(
                            "no migratable export {:?} (read-only exports cannot migrate); exports are {:?}",
                            p.export,
                            self.exports.lock().keys().collect::<Vec<_>>()
                        ),
                    )
                })?;
                let mut jobs = self.jobs.lock();
                if let Some(j) = jobs.get(&p.export)
                    && !j.is_finished()
                {
                    return Err((
                        "exists",
                        format!(
                            "a migration of {} is already running: watch it with migration.status or stop it with migration.cancel",
                            p.export
                        ),
                    ));
                }
                let mut opts = MigrateOptions::new(p.to.clone(), peer);
                if let Some(ms) = p.max_downtime_ms {
                    opts.max_downtime = Duration::from_secs_f64(ms.max(0.0) / 1e3);
                }
                if let Some(m) = &p.mode {
                    opts.mode = m
                        .parse()
                        .map_err(|e: understudy_migration::ParseModeError| {
                            ("invalid", e.to_string())
                        })?;
                }
                opts.bandwidth = p.bandwidth.filter(|&b| b > 0);
                opts.verify = p.verify;
                if let Some(r) = p.max_rounds {
                    opts.max_rounds = r;
                }
                let hooks: Arc<dyn SourceHooks> = self.self_arc();
                let job = Job::start(export, opts, hooks).map_err(|e| ("io", e.to_string()))?;
                let status = job.status();
                jobs.insert(p.export.clone(), Arc::new(job));
                Ok(json!(status))
            }
            "migration.status" => {
                let p: ExportParam = serde_json::from_value(params.clone()).map_err(|e| {
                    bad(format!(
                        "migration.status takes {{\"export\": NAME}} (optional): {e}"
                    ))
                })?;
                let jobs = self.jobs.lock();
                match p.export {
                    Some(name) => jobs.get(&name).map(|j| json!(j.status())).ok_or((
                        "not_found",
                        format!("no migration of {name:?} has been started on this server"),
                    )),
                    None => Ok(json!(
                        jobs.values().map(|j| j.status()).collect::<Vec<Status>>()
                    )),
                }
            }
            "migration.cancel" => {
                let p: ExportParam = serde_json::from_value(params.clone()).map_err(|e| {
                    bad(format!("migration.cancel needs {{\"export\": NAME}}: {e}"))
                })?;
                let name = p
                    .export
                    .ok_or_else(|| bad("migration.cancel needs an \"export\"".into()))?;
                let jobs = self.jobs.lock();
                let j = jobs
                    .get(&name)
                    .ok_or(("not_found", format!("no migration of {name:?} is running")))?;
                j.cancel();
                Ok(json!(j.status()))
            }
            m => Err(bad(format!(
                "unknown method {m:?}: migration.start, migration.status, migration.cancel"
            ))),
        }
    }

    fn self_arc(&self) -> Arc<dyn SourceHooks> {
        Arc::new(CommitHook(self.nbd.clone()))
    }
}

/// Removes a handed-over export from the NBD registry (the manager's
/// [`SourceHooks`] without a reference cycle).
#[derive(Debug)]
struct CommitHook(Server);

impl SourceHooks for CommitHook {
    fn committed(&self, export: &str, target_node: &str) {
        self.0.exports().remove(export);
        tracing::info!(
            export,
            target_node,
            "export handed over; existing clients are forwarded"
        );
    }
}

#[derive(Debug, Deserialize)]
struct StartParams {
    export: String,
    to: String,
    #[serde(default)]
    max_downtime_ms: Option<f64>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    bandwidth: Option<u64>,
    #[serde(default)]
    verify: bool,
    #[serde(default)]
    max_rounds: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct ExportParam {
    #[serde(default)]
    export: Option<String>,
}

/// Arguments of `understudy migrate`.
#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// Export to move.
    pub export: String,
    /// Migration address of the target server (its --peer-listen).
    #[arg(long)]
    pub to: String,
    /// Switch over once the remaining dirty data fits in this pause.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    pub max_downtime: Duration,
    /// precopy: iterate, mirror if it does not converge; mirror: mirror
    /// guest writes from the end of the bulk copy.
    #[arg(long, default_value = "precopy")]
    pub mode: Mode,
    /// Copy bandwidth limit in bytes per second (K/M/G suffixes).
    #[arg(long)]
    pub bandwidth: Option<String>,
    /// Compare block hashes of both copies after the switch-over.
    #[arg(long)]
    pub verify: bool,
    /// Control socket of the source server.
    #[arg(long, default_value = crate::DEFAULT_CONTROL)]
    pub control: PathBuf,
    /// Print progress as JSON lines (one status object per line).
    #[arg(long)]
    pub json: bool,
}

/// Run `understudy migrate`.
pub fn run(args: MigrateArgs) -> Result<()> {
    let mut c = crate::control::client::Client::connect(&args.control)?;
    let bandwidth = args
        .bandwidth
        .as_deref()
        .map(crate::spec::parse_size)
        .transpose()?;
    let mode = match args.mode {
        Mode::Precopy => "precopy",
        Mode::Mirror => "mirror",
    };
    c.call(
        "migration.start",
        json!({
            "export": args.export,
            "to": args.to,
            "max_downtime_ms": args.max_downtime.as_secs_f64() * 1e3,
            "mode": mode,
            "bandwidth": bandwidth,
            "verify": args.verify,
        }),
    )?;
    let bar = (!args.json && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg:<12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let status = loop {
        let v = c.call("migration.status", json!({"export": args.export}))?;
        let st: Status = serde_json::from_value(v).context("the server sent a malformed status")?;
        if args.json {
            println!("{}", serde_json::to_string(&st)?);
        } else if let Some(b) = &bar {
            b.set_length(st.bulk_bytes.max(1));
            b.set_position(st.bulk_done);
            b.set_message(format!("{:?} r{}", st.phase, st.rounds).to_lowercase());
        }
        if st.phase.is_final() {
            break st;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if !args.json {
        print_summary(&status);
    }
    match status.phase {
        Phase::Completed => Ok(()),
        _ => bail!(
            "{}",
            status
                .error
                .unwrap_or_else(|| "the migration did not complete".into())
        ),
    }
}

fn print_summary(st: &Status) {
    if let Some(s) = &st.settled {
        println!(
            "ownership of {} was in doubt after a lost commit answer: {s}",
            st.export
        );
    }
    match st.phase {
        Phase::Completed => {
            println!(
                "migrated {} to {} ({}): downtime {:.1} ms, total {:.0} ms, {} data bytes ({} on the link), {} rounds, final mode {:?}",
                st.export,
                st.target_node.as_deref().unwrap_or(&st.target),
                st.start.as_deref().unwrap_or("?"),
                st.downtime_ms.unwrap_or(0.0),
                st.total_ms,
                st.data_bytes,
                st.bytes_sent,
                st.rounds,
                st.mode,
            );
            if st.verified_blocks > 0 {
                println!(
                    "verified {} blocks: {} differ",
                    st.verified_blocks, st.mismatched_blocks
                );
            }
        }
        _ => println!(
            "migration of {} {:?}: {}{}",
            st.export,
            st.phase,
            st.error.as_deref().unwrap_or(""),
            if st.retryable {
                " (retry resumes where it stopped)"
            } else {
                ""
            }
        ),
    }
}
