//! `understudy serve`: open the images, wrap each in the block filter with
//! its bitmap store, serve them over NBD, and answer the control socket.
//!
//! Stop order matters for data safety: NBD first (in-flight requests finish
//! and are acknowledged), then every disk is flushed, then every bitmap store
//! is closed cleanly (snapshot written, intent log emptied).

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use parking_lot::{Mutex, RwLock};
use serde_json::json;
use understudy_bitmap::{BitmapStore, StoreError, StoreOptions};
use understudy_block::Disk;
use understudy_journal::EpochDisk;
use understudy_migration::SourceExport;
use understudy_nbd_server::{DirtyMapSource, Export, OrderSupport, Server, ServerConfig};
use understudy_stack::{BitmapRequest, ExportStack, Opened, StackSpec};

use crate::control::proto::{
    BitmapEntry, BitmapParams, CONTROL_VERSION, DirtyRun, ExportEntry, JournalEntry, Request,
    Response,
};
use crate::control::server::{ControlServer, Handler};
use crate::spec::{ExportSpec, FlushMode, check_granularity, parse_size};

/// Arguments of `understudy serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// TCP address to listen on (repeatable). Default 127.0.0.1:10809 when
    /// neither --listen nor --socket is given.
    #[arg(long)]
    pub listen: Vec<String>,
    /// Unix socket path to listen on (repeatable).
    #[arg(long)]
    pub socket: Vec<PathBuf>,
    /// An export: name=NAME,path=IMAGE[,format=raw|qcow2][,readonly][,bitmap=NAME[:GRANULARITY]][,journal=on|off]
    /// [,flush=durable|ordered[:INTERVAL]][,journal-size=SIZE][,in-place-min=SIZE] (repeatable). A bitmap named here is created on the first start and
    /// reopened with its contents on every later start.
    ///
    /// journal=on puts an epoch journal (IMAGE.journal, keep it beside the
    /// image) under the export and offers the `understudy:order` NBD
    /// extension. flush=durable (default): an acknowledged FLUSH is on stable
    /// storage. flush=ordered[:INTERVAL] (implies journal=on; default 5s):
    /// an NBD FLUSH becomes an ordering barrier and returns at once; FUA
    /// writes and the timer make data durable. After a host crash the image
    /// is consistent (exactly the writes up to some flush, in order), but up
    /// to INTERVAL of acknowledged flushes may be lost. Use it only where
    /// losing the last seconds is acceptable. journal-size: ring size
    /// (default 128M).
    #[arg(long = "export", required_unless_present_any = ["accept_migrations", "vm_dir"])]
    pub exports: Vec<ExportSpec>,
    /// Control socket path.
    #[arg(long, default_value = crate::DEFAULT_CONTROL)]
    pub control: PathBuf,
    /// How often bitmaps are snapshotted (which also retires write-intent
    /// extents and so bounds over-marking after a crash).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub persist_interval: Duration,
    /// Write-intent extent size: after a crash, each armed extent is marked
    /// dirty whole. Smaller is tighter but costs more syncs.
    #[arg(long, default_value = "64M")]
    pub intent_extent: String,
    /// Most worker threads per NBD connection. Default: twice the number
    /// of CPUs, between 2 and 8 (more workers than that only fight the
    /// client for the CPU: on 2 cores, 4 beat 8 on 1 MiB reads by ~25%).
    #[arg(long)]
    pub workers: Option<usize>,
    /// NBD over TLS (docs/nbd.md, docs/security.md).
    #[command(flatten)]
    pub tls: crate::nbd_tls::NbdTlsArgs,
    /// Live migration (docs/migration.md).
    #[command(flatten)]
    pub migration: crate::migrate::MigrationArgs,
    /// Running VMs (docs/vm.md).
    #[command(flatten)]
    pub vm: crate::vm::VmArgs,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g.
    /// 127.0.0.1:9810). Unauthenticated: bind it to localhost or a
    /// management network (docs/security.md, "Metrics").
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
}

/// Default worker cap per connection: 2 per CPU, from 2 to 8.
fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get() * 2)
        .unwrap_or(8)
        .clamp(2, 8)
}

/// One served image.
#[derive(Debug)]
struct ExportState {
    spec: ExportSpec,
    /// The filtered disk that NBD clients write through.
    disk: Arc<dyn Disk>,
    /// `None` for read-only exports (nothing to record).
    store: Option<Arc<BitmapStore>>,
    persister: Mutex<Option<understudy_bitmap::Persister>>,
    /// The epoch journal under the filter, when `journal=on`.
    journal: Option<Arc<EpochDisk>>,
    /// The layers live migration needs (writable exports only).
    migratable: Option<understudy_migration::SourceExport>,
    /// The VM this export was opened for (`vm start` with a disk image);
    /// it is released when that VM is stopped.
    vm: Option<String>,
}

/// Durability for `NBD_CMD_ORDER` with FUA (and for FLUSH on connections
/// that negotiated ordering), whatever the flush policy. The flag: FLUSH
/// is durable (`flush=durable`).
#[derive(Debug)]
pub(crate) struct JournalSync(pub(crate) Arc<EpochDisk>, pub(crate) bool);

impl OrderSupport for JournalSync {
    fn sync_epoch(&self, epoch: understudy_block::Epoch) -> understudy_block::Result<()> {
        self.0.sync_epoch(epoch)
    }
    fn flush_is_durable(&self) -> bool {
        self.1
    }
}

/// Offers a bitmap store's bitmaps as `qemu:dirty-bitmap:NAME` contexts.
#[derive(Debug)]
struct StoreDirtyMap(Arc<BitmapStore>);

impl DirtyMapSource for StoreDirtyMap {
    fn bitmap_names(&self) -> Vec<String> {
        self.0.list().into_iter().map(|b| b.name).collect()
    }
    fn dirty_extents(&self, name: &str, offset: u64, len: u64) -> Option<Vec<(u64, bool)>> {
        self.0.dirty_extents(name, offset, len)
    }
}

/// A running server: exports, NBD listeners and the control socket.
pub struct Daemon {
    /// Exports by name: those of `--export`, then those opened for VMs
    /// (added and removed while serving).
    exports: RwLock<BTreeMap<String, Arc<ExportState>>>,
    /// Bitmap settings for exports opened while serving.
    intent_extent_size: u64,
    persist_interval: Duration,
    vms: crate::vm::VmHost,
    migration: Arc<crate::migrate::Manager>,
    replication: Arc<crate::replicate::Replicator>,
    nbd: Server,
    accept_threads: Vec<std::thread::JoinHandle<()>>,
    /// Bound TCP addresses (resolved, so port 0 shows the real port).
    pub tcp_addrs: Vec<std::net::SocketAddr>,
    stop_tx: mpsc::Sender<&'static str>,
    stop_rx: Mutex<Option<mpsc::Receiver<&'static str>>>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("exports", &self.export_names())
            .field("tcp_addrs", &self.tcp_addrs)
            .finish()
    }
}

/// The layer stack `spec` asks for, with the daemon's bitmap settings.
fn stack_spec(spec: &ExportSpec, persist_interval: Duration, intent_extent_size: u64) -> StackSpec {
    let mut s = StackSpec::new(spec.name.clone(), spec.path.clone());
    s.format = spec.format;
    s.read_only = spec.read_only;
    s.bitmaps = spec
        .bitmaps
        .iter()
        .map(|b| BitmapRequest {
            name: b.name.clone(),
            granularity: b.granularity,
        })
        .collect();
    s.journal = spec.journal.as_ref().map(|j| j.config());
    s.store = StoreOptions {
        intent_extent_size,
        ..StoreOptions::default()
    };
    s.persist_interval = persist_interval;
    s
}

/// Open one export whose `stack` spec was validated (with every other
/// export's) before any image was opened.
fn open_export(spec: &ExportSpec, stack: &StackSpec) -> Result<ExportState> {
    let in_doubt = if spec.read_only {
        crate::migrate::check_servable(&spec.path).map(|()| None)
    } else {
        crate::migrate::servable_or_in_doubt(&spec.path)
    }
    .with_context(|| format!("export {:?}", spec.name))?;
    let opened = match ExportStack::open(stack)? {
        Opened::Writable(s) => s,
        Opened::ReadOnly(r) => {
            return Ok(ExportState {
                spec: spec.clone(),
                disk: r.block,
                store: None,
                persister: Mutex::new(None),
                journal: None,
                migratable: None,
                vm: None,
            });
        }
    };
    let (migratable, persister) = SourceExport::from_stack(opened);
    if let Some(to) = in_doubt {
        // Never serve it as the owner, never refuse to start over it: I/O
        // fails until a migration to `to` asks that node who owns it.
        let msg = format!(
            "ownership of export {} is in doubt after a lost commit answer from node {to}: run \
             `understudy migrate {} --to ADDRESS-OF-{to}` to settle it (docs/migration.md)",
            spec.name, spec.name
        );
        tracing::warn!(export = %spec.name, node = %to, "{msg}");
        migratable
            .switch
            .set_route(understudy_migration::Route::Fail(Arc::from(msg)));
    }
    Ok(ExportState {
        spec: spec.clone(),
        disk: migratable.switch.clone(),
        store: Some(migratable.store.clone()),
        persister: Mutex::new(Some(persister)),
        journal: migratable.journal.clone(),
        migratable: Some(migratable),
        vm: None,
    })
}

/// The NBD export serving `st`: its filtered disk, its bitmaps as
/// `qemu:dirty-bitmap:` contexts and, with a journal, ordering.
fn nbd_export(st: &ExportState) -> Export {
    let mut e = Export::new(st.spec.name.clone(), st.disk.clone())
        .with_description(format!("understudy export of {}", st.spec.path.display()))
        .with_read_only(st.spec.read_only);
    if let Some(store) = &st.store {
        e = e.with_dirty(Arc::new(StoreDirtyMap(store.clone())));
    }
    if let Some(j) = &st.journal {
        let durable = st
            .spec
            .journal
            .as_ref()
            .is_some_and(|s| s.flush == FlushMode::Durable);
        e = e.with_ordering(Arc::new(JournalSync(j.clone(), durable)));
    }
    e
}

/// Flush an export, make its journal durable and close its bitmaps
/// cleanly. Returns whether every step succeeded (failures are logged).
fn close_export(name: &str, st: &ExportState) -> bool {
    let mut ok = true;
    if let Err(e) = st.disk.flush() {
        tracing::error!(export = %name, "final flush failed: {e}");
        ok = false;
    }
    // Under flush=ordered the flush above only orders: stop makes
    // every epoch durable and applied before the bitmaps close.
    if let Some(j) = &st.journal
        && let Err(e) = j.stop()
    {
        tracing::error!(export = %name, "closing the journal failed: {e}");
        ok = false;
    }
    if let Some(p) = st.persister.lock().take() {
        p.stop();
    }
    if let Some(store) = &st.store
        && let Err(e) = store.close()
    {
        tracing::error!(export = %name, "persisting bitmaps failed: {e}");
        ok = false;
    }
    ok
}

/// Wait (up to `limit`) until no NBD connection holds `export`: each
/// connection keeps an `Arc` of it until its last request has returned, so
/// closing the bitmaps after this cannot miss a write of a client that was
/// just killed.
fn wait_unused(name: &str, export: &Arc<Export>, limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    while Arc::strong_count(export) > 1 {
        if std::time::Instant::now() > deadline {
            tracing::warn!(
                export = %name,
                "a client is still connected {limit:?} after the export was removed; closing it anyway"
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Check every export (and the daemon-wide bitmap options) before any
/// image is opened, so a bad option never follows a journal replay.
fn validate_exports(args: &ServeArgs) -> Result<Vec<StackSpec>> {
    let intent_extent_size = parse_size(&args.intent_extent).context("--intent-extent")?;
    let mut names = std::collections::HashSet::new();
    let mut specs = Vec::new();
    for spec in &args.exports {
        if !names.insert(spec.name.as_str()) {
            bail!(
                "export name {:?} is given twice: names must be unique",
                spec.name
            );
        }
        let s = stack_spec(spec, args.persist_interval, intent_extent_size);
        s.validate()?;
        specs.push(s);
    }
    Ok(specs)
}

impl Daemon {
    /// Open every export and start listening. Returns once clients can
    /// connect.
    pub fn start(args: &ServeArgs) -> Result<Arc<Self>> {
        let tls = args.tls.build()?;
        let stacks = validate_exports(args)?;
        let mut exports = BTreeMap::new();
        for (spec, stack) in args.exports.iter().zip(&stacks) {
            exports.insert(spec.name.clone(), Arc::new(open_export(spec, stack)?));
        }
        let nbd = Server::new(ServerConfig {
            max_workers_per_connection: args.workers.unwrap_or_else(default_workers),
            tls,
            ..ServerConfig::default()
        })?;
        for st in exports.values() {
            nbd.exports().insert(nbd_export(st));
        }
        if exports.len() == 1 {
            nbd.exports()
                .set_default(exports.keys().next().map(String::as_str));
        }
        let mut listen = args.listen.clone();
        if listen.is_empty() && args.socket.is_empty() {
            listen.push("127.0.0.1:10809".into());
        }
        let mut accept_threads = Vec::new();
        let mut tcp_addrs = Vec::new();
        for addr in &listen {
            let l = TcpListener::bind(addr).with_context(|| {
                format!("cannot listen on {addr}: is the port in use? pick another with --listen")
            })?;
            tcp_addrs.push(l.local_addr()?);
            let s = nbd.clone();
            accept_threads.push(
                std::thread::Builder::new()
                    .name("nbd-accept".into())
                    .spawn(move || {
                        if let Err(e) = s.serve_tcp(l) {
                            tracing::error!("NBD TCP listener failed: {e:#}");
                        }
                    })?,
            );
        }
        for path in &args.socket {
            if path.exists() {
                std::fs::remove_file(path)
                    .with_context(|| format!("removing old socket file {}", path.display()))?;
            }
            let l = UnixListener::bind(path)
                .with_context(|| format!("cannot listen on Unix socket {}", path.display()))?;
            let s = nbd.clone();
            accept_threads.push(
                std::thread::Builder::new()
                    .name("nbd-accept".into())
                    .spawn(move || {
                        if let Err(e) = s.serve_unix(l) {
                            tracing::error!("NBD Unix listener failed: {e:#}");
                        }
                    })?,
            );
        }
        let migration = crate::migrate::Manager::start(
            &args.migration,
            &args.control,
            &nbd,
            exports.values().filter_map(|st| st.migratable.clone()),
        )?;
        let vms = crate::vm::VmHost::new(&args.vm, &args.control, args.socket.first(), &nbd)?;
        let replication = Arc::new(crate::replicate::Replicator::new(
            &nbd,
            migration.peer(),
            args.migration.accept_migrations.clone(),
            args.migration
                .received_journal
                .0
                .as_ref()
                .map(|j| j.config()),
        ));
        replication.serve_existing()?;
        let (stop_tx, stop_rx) = mpsc::channel();
        let daemon = Arc::new(Self {
            exports: RwLock::new(exports),
            intent_extent_size: parse_size(&args.intent_extent).context("--intent-extent")?,
            persist_interval: args.persist_interval,
            vms,
            migration,
            replication,
            nbd,
            accept_threads,
            tcp_addrs,
            stop_tx,
            stop_rx: Mutex::new(Some(stop_rx)),
        });
        // VM migrations and replicas arrive on the migration listener
        // (purpose dispatch).
        let weak = Arc::downgrade(&daemon);
        daemon
            .migration
            .set_link_handler(Arc::new(move |link| match weak.upgrade() {
                Some(d) => d
                    .replication
                    .accept_link(link)
                    .and_then(|link| d.vms.accept_link(link, &*d)),
                None => Some(link),
            }));
        Ok(daemon)
    }

    /// Ask the daemon to stop (from a signal or the control API).
    pub fn request_stop(&self, why: &'static str) {
        let _ = self.stop_tx.send(why);
    }

    /// Block until a stop is requested.
    pub fn wait_for_stop(&self) -> &'static str {
        let rx = self.stop_rx.lock().take();
        match rx {
            Some(rx) => rx.recv().unwrap_or("all stop senders dropped"),
            None => "already waited",
        }
    }

    /// Stop serving, flush every disk and close every bitmap store cleanly.
    /// VMs go first (their QEMU flushes its disks through NBD), releasing
    /// the exports opened for them.
    pub fn shutdown(&self) -> Result<()> {
        let mut failed = self.vms.shutdown(self);
        self.nbd.shutdown_handle().shutdown();
        self.replication.shutdown();
        self.migration.shutdown();
        for (name, st) in self.exports.read().iter() {
            if !close_export(name, st) {
                failed.push(name.clone());
            }
        }
        if !failed.is_empty() {
            bail!(
                "shutdown could not flush or persist {failed:?}; the bitmaps will be recovered as after a crash on the next start"
            );
        }
        Ok(())
    }

    /// Join the accept threads (after [`Daemon::shutdown`]).
    pub fn join(self: Arc<Self>) {
        if let Ok(mut d) = Arc::try_unwrap(self) {
            for t in d.accept_threads.drain(..) {
                let _ = t.join();
            }
            d.vms.join();
        }
    }

    /// The NBD server (for the metrics collector).
    pub(crate) fn nbd(&self) -> &Server {
        &self.nbd
    }

    /// The names of the exports (`--export` and VM disks).
    fn export_names(&self) -> Vec<String> {
        self.exports.read().keys().cloned().collect()
    }

    fn export(&self, name: &str) -> Result<Arc<ExportState>, Response> {
        self.exports.read().get(name).cloned().ok_or_else(|| {
            Response::err(
                0,
                "not_found",
                format!(
                    "no export named {name:?}; exports are {:?}",
                    self.export_names()
                ),
            )
        })
    }

    fn entries(&self) -> Vec<ExportEntry> {
        let mut out: Vec<ExportEntry> = self
            .exports
            .read()
            .values()
            .map(|st| ExportEntry {
                name: st.spec.name.clone(),
                path: st.spec.path.display().to_string(),
                format: st.disk.info().format.to_string(),
                size: st.disk.size(),
                read_only: st.spec.read_only,
                bitmaps: st
                    .store
                    .as_ref()
                    .map(|s| bitmap_entries(s))
                    .unwrap_or_default(),
                serving: st
                    .migratable
                    .as_ref()
                    .map_or("local", |m| route_name(&m.switch))
                    .into(),
                received: false,
                journal: st.journal.as_ref().map(|j| {
                    let flush = st.spec.journal.as_ref().map(|j| j.flush);
                    journal_entry(j, flush.unwrap_or(FlushMode::Durable))
                }),
                vm: st.vm.clone(),
            })
            .collect();
        // Exports that arrived by migration live in the migration manager.
        for e in self.migration.received_exports() {
            if self.exports.read().contains_key(&e.name) {
                continue;
            }
            out.push(ExportEntry {
                name: e.name.clone(),
                path: e.image.display().to_string(),
                format: e.format.to_string(),
                size: understudy_block::DiskSize::size(&*e.switch),
                read_only: false,
                bitmaps: bitmap_entries(&e.store),
                serving: route_name(&e.switch).into(),
                received: true,
                // Received disks always flush durably (the commit needs it).
                journal: e
                    .journal
                    .as_ref()
                    .map(|j| journal_entry(j, FlushMode::Durable)),
                vm: None,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The bitmap store of an export given with `--export` or received by
    /// migration.
    fn store_of(&self, export: &str) -> Result<Arc<BitmapStore>, Response> {
        if let Some(st) = self.exports.read().get(export) {
            return st.store.clone().ok_or_else(|| {
                Response::err(
                    0,
                    "unsupported",
                    format!("export {export:?} is read-only and records no writes"),
                )
            });
        }
        if let Some(e) = self
            .migration
            .received_exports()
            .into_iter()
            .find(|e| e.name == export)
        {
            return Ok(e.store);
        }
        Err(self.export(export).err().unwrap_or_else(|| {
            Response::err(0, "not_found", format!("no export named {export:?}"))
        }))
    }
}

fn journal_entry(j: &EpochDisk, flush: FlushMode) -> JournalEntry {
    let s = j.stats();
    let (flush, interval_ms) = match flush {
        FlushMode::Ordered(i) => ("ordered", Some(i.as_millis() as u64)),
        FlushMode::Durable => ("durable", None),
    };
    JournalEntry {
        flush: flush.into(),
        interval_ms,
        current_epoch: s.current_epoch,
        durable_epoch: s.durable_epoch,
        applied_epoch: s.applied_epoch,
        used: s.journal_used,
        capacity: s.journal_capacity,
    }
}

fn route_name(switch: &understudy_migration::SwitchDisk) -> &'static str {
    match switch.route() {
        understudy_migration::Route::Local => "local",
        understudy_migration::Route::Pivot(_) => "pivoted",
        understudy_migration::Route::Forward(_) => "forwarded",
        understudy_migration::Route::Fail(_) => "failed",
    }
}

fn bitmap_entries(store: &BitmapStore) -> Vec<BitmapEntry> {
    store
        .list()
        .into_iter()
        .map(|b| BitmapEntry {
            name: b.name,
            granularity: b.granularity,
            enabled: b.enabled,
            dirty_bytes: b.dirty_bytes,
            recovered: b.recovered,
        })
        .collect()
}

fn store_error(e: StoreError) -> Response {
    let msg = e.to_string();
    let code = match &e {
        StoreError::NotFound { .. } => "not_found",
        StoreError::Exists { .. } => "exists",
        _ if msg.contains("granularity") || msg.contains("name") => "invalid",
        _ => "io",
    };
    Response::err(0, code, understudy_block::error_chain(&e))
}

impl Handler for Daemon {
    fn handle(&self, req: &Request) -> Response {
        let mut resp = self.dispatch(req);
        resp.id = req.id;
        resp
    }
}

impl Daemon {
    fn dispatch(&self, req: &Request) -> Response {
        match req.method.as_str() {
            "server.info" => Response::ok(
                0,
                json!({
                    "version": env!("CARGO_PKG_VERSION"),
                    "control_version": CONTROL_VERSION,
                    "exports": self.exports.read().len(),
                    "tcp": self.tcp_addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                }),
            ),
            "export.list" => Response::ok(0, json!(self.entries())),
            "server.stop" => {
                self.request_stop("control request");
                Response::ok(0, json!({}))
            }
            m if m.starts_with("bitmap.") => self.bitmap_method(m, &req.params),
            m if m.starts_with("migration.") => self.migration.handle(m, &req.params),
            m if m.starts_with("vm.") => self.vms.handle(m, &req.params, self),
            m if m.starts_with("replicate.") => self.replication.handle(m, &req.params, self),
            m => Response::err(
                0,
                "bad_request",
                format!("unknown method {m:?}; see docs/control-api.md for the list"),
            ),
        }
    }

    fn bitmap_method(&self, method: &str, params: &serde_json::Value) -> Response {
        let p: BitmapParams = match serde_json::from_value(params.clone()) {
            Ok(p) => p,
            Err(e) => {
                return Response::err(
                    0,
                    "bad_request",
                    format!("{method} needs params {{\"export\": ..., \"name\": ...}}: {e}"),
                );
            }
        };
        let store = match self.store_of(&p.export) {
            Ok(s) => s,
            Err(r) => return r,
        };
        let store = &*store;
        if method == "bitmap.list" {
            return Response::ok(0, json!(bitmap_entries(store)));
        }
        if method == "bitmap.persist" {
            return match store.persist() {
                Ok(()) => Response::ok(0, json!({})),
                Err(e) => store_error(e),
            };
        }
        let Some(name) = p.name.as_deref() else {
            return Response::err(0, "bad_request", format!("{method} needs a \"name\""));
        };
        let r = match method {
            "bitmap.add" => {
                let g = p.granularity.unwrap_or(crate::spec::DEFAULT_GRANULARITY);
                if let Err(e) = check_granularity(g) {
                    return Response::err(0, "invalid", e.to_string());
                }
                store.add(name, g)
            }
            "bitmap.remove" => store.remove(name),
            "bitmap.clear" => store.clear(name),
            "bitmap.enable" => store.enable(name),
            "bitmap.disable" => store.disable(name),
            "bitmap.dirty" => {
                let Some(bm) = store.get(name) else {
                    return Response::err(
                        0,
                        "not_found",
                        format!("export {:?} has no bitmap {name:?}", p.export),
                    );
                };
                let runs: Vec<DirtyRun> = bm
                    .dirty_ranges()
                    .map(|(offset, len)| DirtyRun { offset, len })
                    .collect();
                return Response::ok(
                    0,
                    json!({
                        "granularity": bm.granularity(),
                        "dirty_bytes": bm.dirty_bytes(),
                        "runs": runs,
                    }),
                );
            }
            m => {
                return Response::err(
                    0,
                    "bad_request",
                    format!("unknown method {m:?}; see docs/control-api.md"),
                );
            }
        };
        match r {
            Ok(()) => Response::ok(0, json!({})),
            Err(e) => store_error(e),
        }
    }
}

/// Run `understudy serve` until SIGINT/SIGTERM or `server.stop`.
pub fn run(args: ServeArgs) -> Result<()> {
    // Handlers first: a SIGTERM that arrives while images are opened or
    // recovered is queued and honoured once serving starts, instead of
    // killing the process half-way.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("installing signal handlers")?;
    let metrics = args
        .metrics
        .as_deref()
        .map(crate::metrics::bind)
        .transpose()?;
    let daemon = Daemon::start(&args)?;
    let control = ControlServer::start(&args.control, daemon.clone())?;
    let metrics = match metrics {
        Some(listener) => {
            let m = crate::metrics::start(listener, &daemon)?;
            tracing::info!("serving metrics on http://{}/metrics", m.local_addr());
            Some(m)
        }
        None => None,
    };
    let d2 = daemon.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if signals.forever().next().is_some() {
                d2.request_stop("signal");
            }
        })?;
    for a in &daemon.tcp_addrs {
        tracing::info!("serving NBD on {a}");
    }
    for s in &args.socket {
        tracing::info!("serving NBD on unix:{}", s.display());
    }
    tracing::info!(
        "exports: {:?}; control socket {}",
        daemon.export_names(),
        args.control.display()
    );
    let why = daemon.wait_for_stop();
    tracing::info!("stopping ({why}): finishing in-flight requests, flushing, persisting bitmaps");
    control.stop();
    if let Some(m) = metrics {
        m.stop();
    }
    let r = daemon.shutdown();
    daemon.join();
    if r.is_ok() {
        tracing::info!("stopped cleanly");
    }
    r
}

impl crate::vm::ExportHost for Daemon {
    fn has_export(&self, name: &str) -> bool {
        self.exports.read().contains_key(name) || self.nbd.exports().get(name).is_some()
    }

    fn check_export(&self, spec: &ExportSpec) -> Result<()> {
        stack_spec(spec, self.persist_interval, self.intent_extent_size).validate()?;
        // Two exports of one image would corrupt it (the bitmap sidecar's
        // lock would refuse the second, but with a less helpful message).
        let wanted = std::fs::canonicalize(&spec.path).unwrap_or_else(|_| spec.path.clone());
        let same =
            |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.into()) == wanted;
        if let Some(st) = self.exports.read().values().find(|st| same(&st.spec.path)) {
            let user = st
                .vm
                .as_ref()
                .map_or(String::new(), |vm| format!(" for VM {vm}"));
            bail!(
                "{} is already served as export {}{user}; use the disk option export = {} instead, or stop its user first",
                spec.path.display(),
                st.spec.name,
                st.spec.name
            );
        }
        Ok(())
    }

    fn open_export(&self, spec: &ExportSpec, vm: &str) -> Result<()> {
        let stack = stack_spec(spec, self.persist_interval, self.intent_extent_size);
        stack.validate()?;
        let mut st = open_export(spec, &stack)?;
        st.vm = Some(vm.to_string());
        let st = Arc::new(st);
        let mut exports = self.exports.write();
        if exports.contains_key(&spec.name) || self.nbd.exports().get(&spec.name).is_some() {
            drop(exports);
            close_export(&spec.name, &st);
            bail!(
                "export {} appeared while it was being opened; pick another disk or VM name",
                spec.name
            );
        }
        self.nbd.exports().insert(nbd_export(&st));
        if let Some(m) = &st.migratable {
            self.migration.register(m.clone());
        }
        exports.insert(spec.name.clone(), st);
        tracing::info!(export = %spec.name, vm, path = %spec.path.display(), "export opened for a VM");
        Ok(())
    }

    fn migration(&self) -> Arc<crate::migrate::Manager> {
        self.migration.clone()
    }

    fn release_export(&self, name: &str) -> Result<()> {
        let st = self
            .exports
            .write()
            .remove(name)
            .with_context(|| format!("no export named {name:?} to release"))?;
        self.migration.unregister(name);
        if let Some(e) = self.nbd.exports().remove(name) {
            wait_unused(name, &e, Duration::from_secs(10));
        }
        if !close_export(name, &st) {
            bail!(
                "export {name} could not be flushed or its bitmaps closed; see the log above (its bitmaps are recovered as after a crash when next opened)"
            );
        }
        tracing::info!(export = %name, "export released");
        Ok(())
    }
}

impl crate::replicate::PrimaryHost for Daemon {
    /// The library wants the whole stack: the persister is lent to it for
    /// the call (it only reads the name, image, store and filter) and the
    /// block slot holds the filter's inner disk.
    fn start_primary(
        &self,
        name: &str,
        cfg: understudy_replication::PrimaryConfig,
    ) -> Result<understudy_replication::Primary, (&'static str, String)> {
        let st = self.export(name).map_err(|_| {
            (
                "not_found",
                format!("no export {name:?}: see `understudy export list`"),
            )
        })?;
        let (Some(src), Some(persister)) = (st.migratable.clone(), st.persister.lock().take())
        else {
            return Err((
                "unsupported",
                format!("export {name:?} is read-only: nothing to replicate"),
            ));
        };
        let stack = ExportStack {
            name: src.name,
            image: src.image,
            format: src.format,
            block: src.filter.inner().clone(),
            journal: src.journal,
            store: src.store,
            filter: src.filter,
            switch: src.switch,
            persister,
        };
        let r = understudy_replication::Primary::start(&stack, cfg);
        *st.persister.lock() = Some(stack.persister);
        r.map_err(|e| ("refused", understudy_block::error_chain(&e)))
    }
}
