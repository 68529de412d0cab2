//! Continuous replication in the daemon and on the command line
//! (docs/replication.md).
//!
//! * A daemon with `--accept-migrations DIR` takes peer links of purpose
//!   `replicate` and keeps the replica in `DIR/NAME.img`, served read-only
//!   under the export name until `replicate.promote`.
//! * `replicate.start` installs a [`Primary`] on one of the daemon's
//!   exports; `replicate.status`, `replicate.verify` report on it.
//! * `understudy replicate ...` is a client of those methods.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{Value, json};
use understudy_block::{DiskWrite, Format};
use understudy_journal::JournalConfig;
use understudy_migration::Route;
use understudy_nbd_server::{Export, Server};
use understudy_peer::{Link, PeerConfig};
use understudy_replication::generation::{self, Role};
use understudy_replication::{
    Backup, BackupConfig, Hello, Mode, PURPOSE, Primary, PrimaryConfig, State, recv_hello,
};
use understudy_stack::{ExportStack, ImageSource, StackSpec};

use crate::control::proto::Response;

/// A control error: code and message.
type CtlError = (&'static str, String);

/// Opens a `Primary` on one of the daemon's exports (the daemon owns the
/// export stacks).
pub trait PrimaryHost {
    /// Start `cfg` on export `name`.
    fn start_primary(&self, name: &str, cfg: PrimaryConfig) -> Result<Primary, CtlError>;
}

struct Running {
    /// Shared so a long verify does not hold the table's lock.
    primary: Arc<Primary>,
    to: String,
}

/// The daemon's replicas: primaries it runs and backups it receives.
pub struct Replicator {
    nbd: Server,
    peer: Option<PeerConfig>,
    /// Where received replicas live (`--accept-migrations`).
    dir: Option<PathBuf>,
    journal: Option<JournalConfig>,
    primaries: Mutex<BTreeMap<String, Running>>,
    backups: Mutex<BTreeMap<String, Arc<Backup>>>,
}

impl std::fmt::Debug for Replicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicator")
            .field(
                "primaries",
                &self.primaries.lock().keys().collect::<Vec<_>>(),
            )
            .field("backups", &self.backups.lock().keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Replicator {
    /// A replicator for a daemon serving `nbd`, with its peer settings and
    /// (when it accepts replicas) its receive directory and journal.
    pub fn new(
        nbd: &Server,
        peer: Option<PeerConfig>,
        dir: Option<PathBuf>,
        journal: Option<JournalConfig>,
    ) -> Self {
        Self {
            nbd: nbd.clone(),
            peer,
            dir,
            journal,
            primaries: Mutex::default(),
            backups: Mutex::default(),
        }
    }

    /// Take a peer link of purpose `replicate` (served on its own thread);
    /// give any other link back.
    pub fn accept_link(self: &Arc<Self>, link: Link) -> Option<Link> {
        if link.peer().purpose != PURPOSE {
            return Some(link);
        }
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("replica-backup".into())
            .spawn(move || me.serve_link(link));
        if let Err(e) = spawned {
            tracing::error!("cannot start a replication session thread: {e}");
        }
        None
    }

    fn serve_link(&self, mut link: Link) {
        let peer = link.peer().node_id.clone();
        let hello = match recv_hello(&mut link) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(peer, "replication link refused: {e}");
                return;
            }
        };
        let backup = match self.backup_for(&hello) {
            Ok(b) => b,
            Err(e) => {
                let msg = format!("{e:#}");
                tracing::warn!(peer, export = %hello.name, "replica refused: {msg}");
                let _ = link.send_error(understudy_peer::error_code::REFUSED, &msg);
                return;
            }
        };
        let name = hello.name.clone();
        tracing::info!(peer, export = %name, mode = ?hello.mode, "replication session starts");
        match backup.serve_after_hello(link, hello) {
            Ok(()) => tracing::info!(peer, export = %name, "replication session ended"),
            Err(e) => tracing::warn!(peer, export = %name, "replication session failed: {e}"),
        }
    }

    /// The backup of `hello.name`: the open one, or `DIR/NAME.img` opened
    /// (created at the primary's size when missing) and served read-only.
    fn backup_for(&self, hello: &Hello) -> Result<Arc<Backup>> {
        let mut backups = self.backups.lock();
        if let Some(b) = backups.get(&hello.name) {
            return Ok(b.clone());
        }
        let Some(dir) = &self.dir else {
            bail!("this server does not accept replicas: start it with --accept-migrations DIR");
        };
        let name = &hello.name;
        if name.is_empty() || name.starts_with('.') || name.contains(['/', '\0']) {
            bail!("export name {name:?} cannot be a file name: rename the export on the primary");
        }
        if self.nbd.exports().get(name).is_some() {
            bail!("this server already serves an export {name:?}: replicate it under another name");
        }
        if hello.mode == Mode::Epoch && self.journal.is_none() {
            bail!(
                "epoch replication needs a journal on the backup: start it with --received-journal on"
            );
        }
        let image = dir.join(format!("{name}.img"));
        let source = if image.exists() {
            ImageSource::Existing {
                size: Some(hello.size),
            }
        } else {
            ImageSource::Create { size: hello.size }
        };
        self.open_backup(&mut backups, name, image, source)
    }

    /// Open `image` as the replica `name`, serve it (read-only unless its
    /// record says it was promoted) and remember it.
    fn open_backup(
        &self,
        backups: &mut BTreeMap<String, Arc<Backup>>,
        name: &str,
        image: PathBuf,
        source: ImageSource,
    ) -> Result<Arc<Backup>> {
        let mut spec = StackSpec::new(name, image.clone());
        spec.format = Some(Format::Raw);
        spec.source = source;
        spec.journal = self.journal.clone();
        let stack = ExportStack::open_writable(&spec)?;
        let cfg = BackupConfig {
            node_id: self
                .peer
                .as_ref()
                .map(|p| p.node_id.clone())
                .unwrap_or_default(),
            ..BackupConfig::default()
        };
        let backup = Arc::new(Backup::open(stack, cfg)?);
        if backup.record().role == Role::Primary {
            // Promoted before a restart: it stays writable (a primary
            // connecting to it is refused by the generations).
            backup.stack().switch.set_route(Route::Local);
        }
        let export = Export::new(name.to_owned(), backup.stack().switch.clone())
            .with_description(format!("understudy replica {}", image.display()));
        self.nbd.exports().insert(export);
        backups.insert(name.to_owned(), backup.clone());
        tracing::info!(export = %name, image = %image.display(), role = ?backup.record().role, "serving a replica");
        Ok(backup)
    }

    /// Serve the replicas in the receive directory (after a restart):
    /// every `NAME.img` with a replication record.
    pub fn serve_existing(&self) -> Result<()> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        let mut backups = self.backups.lock();
        let rd = std::fs::read_dir(dir)
            .with_context(|| format!("reading the replica directory {}", dir.display()))?;
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
            match generation::load(&path) {
                Ok(Some(_)) => {
                    self.open_backup(
                        &mut backups,
                        &name,
                        path,
                        ImageSource::Existing { size: None },
                    )
                    .with_context(|| format!("opening the replica {name:?}"))?;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(image = %path.display(), "skipping: {e}"),
            }
        }
        Ok(())
    }

    /// Answer a `replicate.*` control request.
    pub fn handle(&self, method: &str, params: &Value, host: &dyn PrimaryHost) -> Response {
        let r = match method {
            "replicate.start" => self.start(params, host),
            "replicate.status" => self.status(params),
            "replicate.promote" => self.promote(params),
            "replicate.verify" => self.verify(params),
            m => Err((
                "bad_request",
                format!("unknown method {m:?}; see docs/control-api.md for the list"),
            )),
        };
        match r {
            Ok(v) => Response::ok(0, v),
            Err((code, msg)) => Response::err(0, code, msg),
        }
    }

    fn start(&self, params: &Value, host: &dyn PrimaryHost) -> Result<Value, CtlError> {
        let p: StartParams = parse(
            params,
            "{\"export\": NAME, \"to\": \"HOST:PORT\", \"mode\": \"sync\"|\"async\"|\"epoch\", \"max_lag\": BYTES?}",
        )?;
        let peer = self.peer.clone().ok_or((
            "unsupported",
            "this server has no peer credentials: restart it with --peer-key FILE or \
             --peer-tls-cert/--peer-tls-key/--peer-tls-ca to replicate"
                .to_owned(),
        ))?;
        let mode = match p.mode.as_str() {
            "sync" => Mode::Sync,
            "async" => Mode::Async,
            "epoch" => Mode::Epoch,
            m => {
                return Err((
                    "bad_request",
                    format!("unknown mode {m:?}: use sync, async or epoch"),
                ));
            }
        };
        let mut primaries = self.primaries.lock();
        if primaries.contains_key(&p.export) {
            return Err((
                "busy",
                format!("export {:?} is already replicating", p.export),
            ));
        }
        let mut cfg = PrimaryConfig::new(mode, p.to.clone(), peer);
        if let Some(lag) = p.max_lag {
            cfg.max_lag = lag;
        }
        let primary = Arc::new(host.start_primary(&p.export, cfg)?);
        let v = primary_status(&p.export, &p.to, &primary);
        primaries.insert(p.export, Running { primary, to: p.to });
        Ok(v)
    }

    fn status(&self, params: &Value) -> Result<Value, CtlError> {
        let p: ExportParam = parse(params, "{\"export\": NAME?}")?;
        let want = |n: &str| p.export.as_deref().is_none_or(|e| e == n);
        let mut out = Vec::new();
        for (n, r) in self.primaries.lock().iter().filter(|(n, _)| want(n)) {
            out.push(primary_status(n, &r.to, &r.primary));
        }
        for (n, b) in self.backups.lock().iter().filter(|(n, _)| want(n)) {
            out.push(backup_status(n, b));
        }
        if let (Some(e), true) = (&p.export, out.is_empty()) {
            return Err(("not_found", format!("export {e:?} is not replicated here")));
        }
        Ok(Value::Array(out))
    }

    fn promote(&self, params: &Value) -> Result<Value, CtlError> {
        let p: PromoteParams = parse(params, "{\"export\": NAME, \"force\": BOOL?}")?;
        let b = self.backups.lock().get(&p.export).cloned().ok_or_else(|| {
            (
                "not_found",
                format!("no replica {:?} on this server", p.export),
            )
        })?;
        if b.is_serving() {
            if !p.force {
                return Err((
                    "busy",
                    "a primary is still connected: stop it first, or pass force when it is \
                     gone but its link has not timed out"
                        .to_owned(),
                ));
            }
            b.end_session();
        }
        b.promote()
            .map_err(|e| ("refused", understudy_block::error_chain(&e)))?;
        tracing::info!(export = %p.export, "replica promoted: clients may write");
        Ok(backup_status(&p.export, &b))
    }

    fn verify(&self, params: &Value) -> Result<Value, CtlError> {
        let p: VerifyParams = parse(params, "{\"export\": NAME, \"repair\": BOOL?}")?;
        let primary = self
            .primaries
            .lock()
            .get(&p.export)
            .map(|r| r.primary.clone())
            .ok_or_else(|| {
                (
                    "not_found",
                    format!(
                        "export {:?} has no running replication here (verify runs on the primary)",
                        p.export
                    ),
                )
            })?;
        let rep = primary
            .verify(p.repair)
            .map_err(|e| ("io", understudy_block::error_chain(&e)))?;
        Ok(
            json!({"export": p.export, "blocks": rep.blocks, "differing": rep.differing, "repaired": p.repair}),
        )
    }

    /// Stop the primaries (their records say they stopped cleanly) and
    /// close the backups' stacks.
    pub fn shutdown(&self) {
        let primaries = std::mem::take(&mut *self.primaries.lock());
        for (name, r) in primaries {
            // A verify still running holds a clone: that primary is left
            // to the process exit, and its record then says it crashed (a
            // bitmap resync at the next start, nothing lost).
            match Arc::try_unwrap(r.primary).map(Primary::stop) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(export = %name, "stopping replication failed: {e}"),
                Err(_) => {
                    tracing::warn!(export = %name, "a verify is running: replication not stopped cleanly")
                }
            }
        }
        let backups = std::mem::take(&mut *self.backups.lock());
        for (name, b) in backups {
            b.end_session();
            let s = b.stack();
            if let Err(e) = s.filter.flush() {
                tracing::error!(export = %name, "final flush of the replica failed: {e}");
            }
            if let Some(j) = &s.journal
                && let Err(e) = j.stop()
            {
                tracing::error!(export = %name, "closing the replica's journal failed: {e}");
            }
            if let Err(e) = s.store.close() {
                tracing::error!(export = %name, "persisting the replica's bitmaps failed: {e}");
            }
        }
    }
}

fn parse<T: for<'de> Deserialize<'de>>(params: &Value, shape: &str) -> Result<T, CtlError> {
    serde_json::from_value(params.clone())
        .map_err(|e| ("bad_request", format!("expected params {shape}: {e}")))
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Sync => "sync",
        Mode::Async => "async",
        Mode::Epoch => "epoch",
    }
}

fn primary_status(name: &str, to: &str, p: &Primary) -> Value {
    let st = p.status();
    let state = match &st.state {
        State::Connecting => "connecting".to_owned(),
        State::Disconnected => "disconnected".to_owned(),
        State::Resyncing => "resyncing".to_owned(),
        State::InSync => "in_sync".to_owned(),
        State::Stopped => "stopped".to_owned(),
        State::Refused(d) => format!("refused: {d:?}"),
    };
    let split_brain = matches!(
        &st.state,
        State::Refused(understudy_replication::generation::Decision::SplitBrain { .. })
    );
    json!({
        "export": name, "role": "primary", "peer": to, "mode": mode_name(st.mode),
        "state": state, "lag_bytes": st.lag_bytes, "pending_bytes": st.pending_bytes,
        "resync_bytes": st.resync_bytes, "sessions": st.sessions,
        "fell_behind": st.fell_behind, "last_error": st.last_error,
        "split_brain": split_brain,
    })
}

fn backup_status(name: &str, b: &Backup) -> Value {
    let rec = b.record();
    let stats = b.stats();
    let role = match rec.role {
        Role::Primary => "primary",
        Role::Backup => "backup",
    };
    let state = match (role, b.is_serving()) {
        ("primary", _) => "promoted",
        (_, true) => "connected",
        _ => "waiting",
    };
    json!({
        "export": name, "role": role, "peer": rec.peer, "state": state,
        "resync_in_progress": rec.resync.is_some(), "split_brain": rec.split_brain,
        "sessions": stats.sessions, "epochs": stats.epochs, "last_seq": stats.last_seq,
    })
}

#[derive(Deserialize)]
struct StartParams {
    export: String,
    to: String,
    mode: String,
    #[serde(default)]
    max_lag: Option<u64>,
}

#[derive(Deserialize)]
struct ExportParam {
    #[serde(default)]
    export: Option<String>,
}

#[derive(Deserialize)]
struct PromoteParams {
    export: String,
    #[serde(default)]
    force: bool,
}

#[derive(Deserialize)]
struct VerifyParams {
    export: String,
    #[serde(default)]
    repair: bool,
}

/// `understudy replicate ...`.
#[derive(Debug, Subcommand)]
pub enum ReplicateCmd {
    /// Start replicating an export of this server to a backup server (its
    /// --peer-listen address; it needs --accept-migrations).
    Start {
        /// Export to replicate.
        export: String,
        /// The backup's peer address (HOST:PORT).
        #[arg(long)]
        to: String,
        /// sync: acknowledged once the backup wrote it; async: the backup
        /// lags by at most --max-lag; epoch: the backup applies whole
        /// flush-to-flush epochs (docs/replication.md).
        #[arg(long, value_parser = ["sync", "async", "epoch"])]
        mode: String,
        /// async/epoch: how far the backup may lag (e.g. 64M).
        #[arg(long)]
        max_lag: Option<String>,
    },
    /// Role, peer, mode, state, lag and split-brain flag of replicated exports.
    Status {
        /// Only this export.
        export: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make a replica writable (manual failover), on the backup server.
    Promote {
        /// The replica's export name.
        export: String,
        /// End a session whose primary is gone but whose link has not
        /// timed out yet. Only when the primary is really down.
        #[arg(long)]
        force: bool,
    },
    /// Compare both copies block by block (on the primary).
    Verify {
        /// Export to verify.
        export: String,
        /// Resend the differing blocks.
        #[arg(long)]
        repair: bool,
    },
}

/// Run `understudy replicate ...` against the server at `control`.
pub fn run(control: &std::path::Path, cmd: ReplicateCmd) -> Result<()> {
    let mut c = crate::control::client::Client::connect(control)?;
    match cmd {
        ReplicateCmd::Start {
            export,
            to,
            mode,
            max_lag,
        } => {
            let max_lag = max_lag
                .as_deref()
                .map(crate::spec::parse_size)
                .transpose()?;
            let v = c.call(
                "replicate.start",
                json!({"export": export, "to": to, "mode": mode, "max_lag": max_lag}),
            )?;
            println!("replicating {export} to {to} ({mode}): {}", v["state"]);
        }
        ReplicateCmd::Status { export, json } => {
            let v = c.call("replicate.status", json!({ "export": export }))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for e in v.as_array().into_iter().flatten() {
                    println!(
                        "{} {} peer={} mode={} state={} lag={} split_brain={}",
                        e["export"],
                        e["role"],
                        e["peer"],
                        e["mode"],
                        e["state"],
                        e["lag_bytes"],
                        e["split_brain"]
                    );
                }
            }
        }
        ReplicateCmd::Promote { export, force } => {
            c.call(
                "replicate.promote",
                json!({"export": export, "force": force}),
            )?;
            println!("{export} promoted: it is writable now");
        }
        ReplicateCmd::Verify { export, repair } => {
            let v = c.call(
                "replicate.verify",
                json!({"export": export, "repair": repair}),
            )?;
            let diff = v["differing"].as_array().map_or(0, Vec::len);
            println!(
                "{export}: {} blocks compared, {diff} differing ranges",
                v["blocks"]
            );
            if diff > 0 && !repair {
                bail!("the copies differ: run again with --repair to resend those ranges");
            }
        }
    }
    Ok(())
}
