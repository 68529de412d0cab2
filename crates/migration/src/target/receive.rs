//! One incoming migration up to its session: check the Hello, claim the
//! export name, open (or create) the image and decide how to start, record
//! that we are receiving, send the Welcome.

use std::collections::HashSet;
use std::path::Path;

use parking_lot::Mutex;
use understudy_bitmap::{BitmapStore, Persister};
use understudy_block::{Format, error_chain};
use understudy_peer::Link;

use super::session::Receiving;
use super::{TargetConfig, TargetError, TargetHooks, open_image};
use crate::error::RecordError;
use crate::record::{self, OwnerRecord, OwnerState};
use crate::source::{RECEIVED_BITMAP, SourceExport, peer_bitmap_name};
use crate::wire::{self, Hello, Msg, Start, Welcome};

/// Names being received, so two sessions never write one image.
#[derive(Debug, Default)]
pub struct Busy {
    names: Mutex<HashSet<String>>,
    freed: parking_lot::Condvar,
}

/// Marks a name as being received until dropped (at the commit or the end
/// of the session).
pub(super) struct Unbusy<'a>(&'a Busy, String);

impl Drop for Unbusy<'_> {
    fn drop(&mut self) {
        self.0.names.lock().remove(&self.1);
        self.0.freed.notify_all();
    }
}

/// How long a new session waits for an earlier one of the same name to
/// notice that its link is gone (a retry usually comes right after a cut).
const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The image a session receives into.
struct Opened {
    start: Start,
    /// Its record, if it had one.
    rec: Option<OwnerRecord>,
    export: SourceExport,
    persister: Option<Persister>,
    /// Opened by this session (closed again if it does not commit).
    owned_here: bool,
}

/// Run one incoming migration session on `link`.
pub fn receive(
    mut link: Link,
    cfg: &TargetConfig,
    hooks: &dyn TargetHooks,
    busy: &Busy,
) -> Result<(), TargetError> {
    let source_node = link.peer().node_id.clone();
    let (hello, version) = check_hello(&mut link)?;
    let unbusy = claim_name(&link, busy, &hello.name)?;
    let opened = open_or_prepare(&link, cfg, hooks, &hello, &source_node)?;
    let rec = record_receiving(&link, &opened, &hello, &source_node)?;
    welcome(&link, version, opened.start, &opened.export.store)?;
    tracing::info!(export = %hello.name, from = %source_node, start = %opened.start, "receiving a migration");
    let mut r = Receiving::new(
        opened.export,
        rec,
        opened.persister,
        opened.owned_here,
        source_node,
        unbusy,
    );
    #[cfg(any(test, feature = "testing"))]
    r.arm_faults(cfg);
    let result = r.session_loop(&mut link, hooks);
    r.close_uncommitted();
    result
}

fn refuse(link: &Link, msg: String) -> TargetError {
    let _ = link.send_error(understudy_peer::error_code::REFUSED, &msg);
    TargetError::Refused(msg)
}

/// Refuse with the whole chain of `e` as the reason, and fail with `e`.
fn refuse_with(link: &Link, e: TargetError) -> TargetError {
    let _ = link.send_error(understudy_peer::error_code::REFUSED, &error_chain(&e));
    e
}

/// Refuse with the record's error as the reason, and fail with it.
fn refuse_record(link: &Link, source: RecordError) -> TargetError {
    let _ = link.send_error(understudy_peer::error_code::REFUSED, &error_chain(&source));
    TargetError::Record { source }
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 128
        && !n.starts_with('.')
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// The Hello, a protocol version both speak, and a usable export name.
fn check_hello(link: &mut Link) -> Result<(Hello, u16), TargetError> {
    let f = link.recv().map_err(|source| TargetError::Link { source })?;
    let hello = match Msg::decode(f.msg_type, &f.payload) {
        Ok(Msg::Hello(h)) => h,
        Ok(other) => {
            return Err(refuse(
                link,
                format!("expected Hello first, got {:?}", other.msg_type()),
            ));
        }
        Err(e) => return Err(refuse(link, e.to_string())),
    };
    let version = wire::negotiate(hello.min_version, hello.max_version)
        .map_err(|e| refuse(link, e.to_string()))?;
    if !valid_name(&hello.name) {
        return Err(refuse(
            link,
            format!(
                "export name {:?} cannot be a file name here: use letters, digits, '.', '_' and '-'",
                hello.name
            ),
        ));
    }
    Ok((hello, version))
}

/// Wait (a while) until no other session receives `name`, and claim it.
fn claim_name<'a>(link: &Link, busy: &'a Busy, name: &str) -> Result<Unbusy<'a>, TargetError> {
    let claimed = {
        let deadline = std::time::Instant::now() + BUSY_WAIT;
        let mut names = busy.names.lock();
        loop {
            if names.insert(name.to_owned()) {
                break true;
            }
            if busy.freed.wait_until(&mut names, deadline).timed_out() {
                break names.insert(name.to_owned());
            }
        }
    };
    if !claimed {
        return Err(refuse(
            link,
            format!("a migration of {name} is already being received here; wait for it to end"),
        ));
    }
    Ok(Unbusy(busy, name.to_owned()))
}

/// A fresh image, or the existing copy (open in this daemon or on disk)
/// with the start its record allows.
fn open_or_prepare(
    link: &Link,
    cfg: &TargetConfig,
    hooks: &dyn TargetHooks,
    hello: &Hello,
    source_node: &str,
) -> Result<Opened, TargetError> {
    let format = if hello.format == 1 {
        Format::Qcow2
    } else {
        Format::Raw
    };
    let path = cfg.dir.join(format!("{}.img", hello.name));
    let existing_open = hooks.open_copy(&hello.name);
    let existing_path = existing_open
        .as_ref()
        .map(|e| e.image.clone())
        .or_else(|| path.exists().then(|| path.clone()));
    let Some(p) = existing_path else {
        let (export, persister) = open_image(&path, format, hello.size, true, cfg, &hello.name)
            .map_err(|e| refuse_with(link, e))?;
        return Ok(Opened {
            start: Start::Fresh,
            rec: None,
            export,
            persister: Some(persister),
            owned_here: true,
        });
    };
    let rec = existing_record(link, &p, hello)?;
    let start = decide_start(link, &rec, hello, source_node)?;
    let (export, persister, owned_here) = match existing_open {
        Some(e) => (e, None, false),
        None => {
            let (e, p) = open_image(&p, format, hello.size, false, cfg, &hello.name)
                .map_err(|e| refuse_with(link, e))?;
            (e, Some(p), true)
        }
    };
    Ok(Opened {
        start,
        rec: Some(rec),
        export,
        persister,
        owned_here,
    })
}

/// The record of an existing copy, which must be of the same disk.
fn existing_record(link: &Link, p: &Path, hello: &Hello) -> Result<OwnerRecord, TargetError> {
    let rec = record::load(p)
        .map_err(|source| refuse_record(link, source))?
        .ok_or_else(|| {
            refuse(
                link,
                format!(
                    "{} exists here without an ownership record: move it away or pick another \
                     export name",
                    p.display()
                ),
            )
        })?;
    if rec.disk_id != record::id_hex(&hello.disk_id) {
        return Err(refuse(
            link,
            format!(
                "this node holds a different disk named {} ({}): remove it or rename the export",
                hello.name,
                p.display()
            ),
        ));
    }
    Ok(rec)
}

/// How to start with an existing copy, from its record.
fn decide_start(
    link: &Link,
    rec: &OwnerRecord,
    hello: &Hello,
    source_node: &str,
) -> Result<Start, TargetError> {
    let incremental_ok = hello.base_generation != 0 && hello.base_generation == rec.generation;
    let start = match &rec.state {
        OwnerState::Owner { .. }
            if rec.generation == hello.generation + 1
                && rec
                    .peer(source_node)
                    .is_some_and(|p| p.generation == rec.generation) =>
        {
            // This source handed the disk to us at exactly this generation
            // and is asking again: it lost our commit answer. Tell it the
            // commit stands.
            let msg = format!(
                "this node took ownership of {} from node {source_node} at generation {}: \
                 the commit went through",
                hello.name, rec.generation
            );
            let _ = link.send_error(wire::refusal::COMMITTED, &msg);
            return Err(TargetError::Refused(msg));
        }
        OwnerState::Owner { .. } => {
            return Err(refuse(
                link,
                format!(
                    "this node owns {} at generation {}: two owners are not allowed; \
                     migrate it from here instead",
                    hello.name, rec.generation
                ),
            ));
        }
        OwnerState::Handing { .. } => {
            return Err(refuse(
                link,
                format!(
                    "this node's copy of {} is in doubt (a handover did not finish): \
                     resolve it first (docs/migration.md)",
                    hello.name
                ),
            ));
        }
        OwnerState::Receiving { migration_id, .. }
            if *migration_id == record::id_hex(&hello.migration_id)
                && (rec.peers.is_empty() || incremental_ok) =>
        {
            Start::Resume
        }
        _ if incremental_ok => Start::Incremental,
        _ => Start::HashResync,
    };
    Ok(start)
}

/// Set up the progress bitmaps and record `Receiving` durably.
fn record_receiving(
    link: &Link,
    opened: &Opened,
    hello: &Hello,
    source_node: &str,
) -> Result<OwnerRecord, TargetError> {
    let store = &opened.export.store;
    if let Err(e) = prepare_bitmaps(store, opened.start, hello.granularity as u64, source_node) {
        let msg = format!("cannot record progress: {}", error_chain(&e));
        let _ = link.send_error(understudy_peer::error_code::REFUSED, &msg);
        return Err(e);
    }
    let mut rec = opened.rec.clone().unwrap_or(OwnerRecord {
        disk_id: record::id_hex(&hello.disk_id),
        generation: hello.generation,
        state: OwnerState::Owner { migrating: None },
        name: hello.name.clone(),
        peers: Vec::new(),
    });
    rec.state = OwnerState::Receiving {
        from: source_node.to_owned(),
        migration_id: record::id_hex(&hello.migration_id),
    };
    record::store(&opened.export.image, &rec).map_err(|source| refuse_record(link, source))?;
    Ok(rec)
}

/// The progress record (kept across attempts of the same migration only)
/// and the bitmap of what changes here after the commit.
fn prepare_bitmaps(
    store: &BitmapStore,
    start: Start,
    gran: u64,
    source_node: &str,
) -> Result<(), TargetError> {
    let err = |op: &'static str, name: &str| {
        let name = name.to_owned();
        move |source| TargetError::Bitmap { op, name, source }
    };
    if start != Start::Resume {
        if store.get(RECEIVED_BITMAP).is_some() {
            store
                .clear(RECEIVED_BITMAP)
                .map_err(err("clear", RECEIVED_BITMAP))?;
        } else {
            store
                .add(RECEIVED_BITMAP, gran)
                .map_err(err("add", RECEIVED_BITMAP))?;
        }
    }
    // Marked by hand after each flush, never by the filter.
    store
        .disable(RECEIVED_BITMAP)
        .map_err(err("disable", RECEIVED_BITMAP))?;
    // What changes here after the commit, relative to the source. Enabled
    // and clean from now on; received data bypasses the filter (see
    // `Receiving::write`), so the commit need not touch it.
    let peer_bm = peer_bitmap_name(source_node);
    if store.get(&peer_bm).is_some() {
        store.enable(&peer_bm).map_err(err("enable", &peer_bm))?;
        store.clear(&peer_bm).map_err(err("clear", &peer_bm))?;
    } else {
        store
            .add(&peer_bm, understudy_bitmap::DEFAULT_GRANULARITY)
            .map_err(err("add", &peer_bm))?;
    }
    Ok(())
}

fn send(link: &Link, m: Msg<'_>) -> Result<(), TargetError> {
    let (t, b) = m
        .to_vec()
        .map_err(|source| TargetError::Encode { source })?;
    link.send(t, &b)
        .map_err(|source| TargetError::Link { source })
}

/// The Welcome and, for a resume, what this node already holds.
fn welcome(
    link: &Link,
    version: u16,
    start: Start,
    store: &BitmapStore,
) -> Result<(), TargetError> {
    send(link, Msg::Welcome(Welcome { version, start }))?;
    if start != Start::Resume {
        return Ok(());
    }
    let have: Vec<(u64, u64)> = store
        .get(RECEIVED_BITMAP)
        .map(|b| b.dirty_ranges().collect())
        .unwrap_or_default();
    let mut chunks = have.chunks(wire::MAX_RANGES).peekable();
    if chunks.peek().is_none() {
        return send(
            link,
            Msg::Have {
                ranges: Vec::new(),
                last: true,
            },
        );
    }
    while let Some(c) = chunks.next() {
        send(
            link,
            Msg::Have {
                ranges: c.to_vec(),
                last: chunks.peek().is_none(),
            },
        )?;
    }
    Ok(())
}
