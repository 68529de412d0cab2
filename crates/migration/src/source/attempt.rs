//! One attempt of a migration up to the established session: the
//! ownership record, the link, the handshake (which may settle an
//! ownership left in doubt), then the [`Session`].

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use understudy_bitmap::{DEFAULT_GRANULARITY, DirtyBitmap};
use understudy_block::{Disk, Format};
use understudy_peer::{Link, LinkReceiver, LinkSender, PeerError};

use super::session::{Plan, Session};
use super::{MIGRATION_BITMAP, MigrateOptions, PURPOSE, Reporter, SourceExport, SourceHooks};
use crate::conn::Conn;
use crate::error::{MigrationError, RecordError};
use crate::record::{self, Outgoing, OwnerRecord, OwnerState};
use crate::wire::{self, Hello, MAX_VERSION, MIN_VERSION, Msg, Start, Welcome};
use understudy_layers::Route;

pub(super) fn bitmap_err(
    op: &'static str,
    name: &str,
) -> impl FnOnce(understudy_bitmap::StoreError) -> MigrationError {
    let name = name.to_owned();
    move |source| MigrationError::Bitmap { op, name, source }
}

pub(super) fn record_err(source: RecordError) -> MigrationError {
    MigrationError::Record { source }
}

/// The node of an interrupted handover (`handing`), whose commit answer
/// was lost.
type InDoubt = Option<String>;

/// What the source offers in its Hello, decided before sending it.
struct Claim {
    migration_id: String,
    /// `Owner { migrating }`: the record once the target has answered.
    owning: OwnerState,
    p_bitmap: Arc<DirtyBitmap>,
    gran: u64,
    peer_bitmap: Option<String>,
    base_generation: u64,
}

/// The target takes part: how it starts, what it already holds (resume),
/// and the link.
struct Welcomed {
    welcome: Welcome,
    have: Vec<(u64, u64)>,
    tx: LinkSender,
    rx: LinkReceiver,
}

pub(super) struct Attempt<'a> {
    pub export: &'a SourceExport,
    pub opts: &'a MigrateOptions,
    pub hooks: &'a dyn SourceHooks,
    pub report: &'a Reporter<'a>,
    pub cancel: &'a AtomicBool,
}

impl<'a> Attempt<'a> {
    pub fn run(&self) -> Result<(), MigrationError> {
        let (mut rec, in_doubt) = self.load_record()?;
        let link = self.connect(&in_doubt)?;
        let target_node = link.peer().node_id.clone();
        let claim = self.claim(&mut rec, &target_node, in_doubt.is_some())?;
        let hello = self.hello(&rec, &claim);
        // `None`: the target had committed the handover whose answer was lost.
        let Some(Welcomed {
            welcome,
            have,
            tx,
            rx,
        }) = self.handshake(link, hello, &mut rec, &target_node, &claim, &in_doubt)?
        else {
            return Ok(());
        };
        let disk: &dyn Disk = &*self.export.filter;
        let conn = Conn::start(tx, rx, disk.info()).map_err(|source| MigrationError::Spawn {
            thread: "migration reply",
            source,
        })?;
        let plan = Plan {
            rec,
            target_node,
            migration_id: claim.migration_id,
            start: welcome.start,
            version: welcome.version,
            have,
            peer_bitmap: claim.peer_bitmap,
            gran: claim.gran,
            p_bitmap: claim.p_bitmap,
        };
        let result = Session::start(self, &conn, plan).and_then(Session::run);
        if let Err(e) = &result
            && self.export.switch.is_local()
        {
            let _ = conn.send(&Msg::Abort {
                reason: super::error_chain(e),
            });
            conn.close("migration stopped");
        }
        result
    }

    /// The ownership record, and the node a lost commit answer left it in
    /// doubt with. Retrying to that node settles who owns the disk, so it
    /// is allowed while I/O fails.
    fn load_record(&self) -> Result<(OwnerRecord, InDoubt), MigrationError> {
        let export = self.export;
        let rec = record::load_or_create(&export.image, &export.name).map_err(record_err)?;
        let in_doubt = match &rec.state {
            OwnerState::Handing { to, .. } => Some(to.clone()),
            _ => None,
        };
        if in_doubt.is_none() {
            if !export.switch.is_local() {
                return Err(MigrationError::NotMigratable {
                    name: export.name.clone(),
                    reason: "this node does not own it (it was handed over)".into(),
                });
            }
            rec.check_servable(&export.image).map_err(record_err)?;
        }
        Ok((rec, in_doubt))
    }

    fn connect(&self, in_doubt: &InDoubt) -> Result<Link, MigrationError> {
        let opts = self.opts;
        let link = Link::connect(&opts.to, &opts.peer, PURPOSE).map_err(|source| {
            MigrationError::Connect {
                addr: opts.to.clone(),
                source,
            }
        })?;
        let target_node = &link.peer().node_id;
        self.report.target_node(target_node);
        if let Some(to) = in_doubt
            && to != target_node
        {
            return Err(MigrationError::NotMigratable {
                name: self.export.name.clone(),
                reason: format!(
                    "ownership is in doubt after a lost commit answer from node {to}, and {} is \
                     node {target_node}: retry the migration to node {to} so the two sides can \
                     settle it",
                    opts.to
                ),
            });
        }
        Ok(link)
    }

    /// Resume an interrupted attempt to the same target, or start afresh
    /// with a new migration bitmap; record that we are migrating.
    fn claim(
        &self,
        rec: &mut OwnerRecord,
        target_node: &str,
        in_doubt: bool,
    ) -> Result<Claim, MigrationError> {
        let store = &self.export.store;
        let resumable = store.get(MIGRATION_BITMAP).is_some();
        let migration_id = match &rec.state {
            OwnerState::Owner { migrating: Some(o) } if o.to == target_node && resumable => {
                o.migration_id.clone()
            }
            OwnerState::Handing { to, migration_id } if to == target_node && resumable => {
                migration_id.clone()
            }
            _ => {
                if resumable {
                    store
                        .remove(MIGRATION_BITMAP)
                        .map_err(bitmap_err("remove", MIGRATION_BITMAP))?;
                }
                store
                    .add(MIGRATION_BITMAP, DEFAULT_GRANULARITY)
                    .map_err(bitmap_err("add", MIGRATION_BITMAP))?;
                record::new_id_hex()
            }
        };
        store
            .enable(MIGRATION_BITMAP)
            .map_err(bitmap_err("enable", MIGRATION_BITMAP))?;
        let owning = OwnerState::Owner {
            migrating: Some(Outgoing {
                to: target_node.to_owned(),
                migration_id: migration_id.clone(),
            }),
        };
        // In doubt, the record stays `handing` until the target has said
        // whether it committed.
        if !in_doubt {
            rec.state = owning.clone();
            record::store(&self.export.image, rec).map_err(record_err)?;
        }
        let p_bitmap = store
            .get(MIGRATION_BITMAP)
            .ok_or(MigrationError::MissingBitmap {
                name: MIGRATION_BITMAP,
            })?;
        let (peer_bitmap, base_generation) = self.base(rec, target_node);
        Ok(Claim {
            migration_id,
            owning,
            gran: p_bitmap.granularity(),
            p_bitmap,
            peer_bitmap,
            base_generation,
        })
    }

    /// What we know about the target's copy, for an incremental migration:
    /// the bitmap of what changed here since, and the generation it was
    /// identical at (0: nothing known).
    fn base(&self, rec: &OwnerRecord, target_node: &str) -> (Option<String>, u64) {
        let store = &self.export.store;
        let peer_rec = rec.peer(target_node);
        let peer_bitmap = peer_rec
            .and_then(|p| p.bitmap.clone())
            .filter(|b| store.get(b).is_some());
        let base_generation = match (peer_rec, &peer_bitmap) {
            (Some(p), Some(_)) => p.generation,
            _ => 0,
        };
        (peer_bitmap, base_generation)
    }

    fn hello(&self, rec: &OwnerRecord, claim: &Claim) -> Hello {
        Hello {
            min_version: MIN_VERSION,
            max_version: MAX_VERSION,
            migration_id: record::id_bytes(&claim.migration_id),
            disk_id: record::id_bytes(&rec.disk_id),
            generation: rec.generation,
            base_generation: claim.base_generation,
            size: (&*self.export.filter as &dyn Disk).size(),
            format: match self.export.format {
                Format::Raw => 0,
                Format::Qcow2 => 1,
            },
            granularity: claim.gran as u32,
            name: self.export.name.clone(),
        }
    }

    /// Send the Hello and read the answer. In doubt, the answer settles
    /// who owns the disk.
    fn handshake(
        &self,
        link: Link,
        hello: Hello,
        rec: &mut OwnerRecord,
        target_node: &str,
        claim: &Claim,
        in_doubt: &InDoubt,
    ) -> Result<Option<Welcomed>, MigrationError> {
        let (t, bytes) = Msg::Hello(hello)
            .to_vec()
            .map_err(|source| MigrationError::Wire { source })?;
        link.send(t, &bytes)
            .map_err(|source| MigrationError::Send { source })?;
        let (tx, mut rx) = link.split();
        let (t, buf) = match recv_frame(&mut rx) {
            Err(PeerError::Remote { code, message })
                if code == wire::refusal::COMMITTED && in_doubt.is_some() =>
            {
                // The target did commit: the handover happened.
                self.settle_handed_over(rec, target_node, &message)?;
                return Ok(None);
            }
            first => first.map_err(recv_err)?,
        };
        if in_doubt.is_some() {
            self.regain_ownership(rec, target_node, &claim.owning)?;
        }
        let welcome =
            match Msg::decode(t, &buf).map_err(|source| MigrationError::Wire { source })? {
                Msg::Welcome(w) => w,
                other => {
                    return Err(MigrationError::Protocol {
                        reason: format!("expected Welcome, got {:?}", other.msg_type()),
                    });
                }
            };
        if !(MIN_VERSION..=MAX_VERSION).contains(&welcome.version) {
            return Err(MigrationError::Protocol {
                reason: format!("target chose version {} we do not speak", welcome.version),
            });
        }
        let have = if welcome.start == Start::Resume {
            self.read_have(&mut rx, claim.gran)?
        } else {
            Vec::new()
        };
        self.report.start(welcome.start.to_string());
        tracing::info!(export = %self.export.name, target = %target_node, start = %welcome.start, "migration started");
        Ok(Some(Welcomed {
            welcome,
            have,
            tx,
            rx,
        }))
    }

    /// The ranges a resuming target already holds, sorted.
    fn read_have(
        &self,
        rx: &mut LinkReceiver,
        gran: u64,
    ) -> Result<Vec<(u64, u64)>, MigrationError> {
        let size = (&*self.export.filter as &dyn Disk).size();
        let mut have = Vec::new();
        loop {
            let (t, buf) = recv_frame(rx).map_err(recv_err)?;
            match Msg::decode(t, &buf).map_err(|source| MigrationError::Wire { source })? {
                Msg::Have { ranges, last } => {
                    if have.len() + ranges.len() > (size / gran + 1) as usize {
                        return Err(MigrationError::Protocol {
                            reason: "more Have ranges than the disk has blocks".into(),
                        });
                    }
                    have.extend(ranges);
                    if last {
                        break;
                    }
                }
                other => {
                    return Err(MigrationError::Protocol {
                        reason: format!("expected Have, got {:?}", other.msg_type()),
                    });
                }
            }
        }
        have.sort_unstable();
        Ok(have)
    }

    /// The target answered a Hello for this disk without owning it: the
    /// commit never took effect there, so this node is the owner again and
    /// its clients get their disk back while the migration resumes.
    fn regain_ownership(
        &self,
        rec: &mut OwnerRecord,
        target_node: &str,
        owning: &OwnerState,
    ) -> Result<(), MigrationError> {
        rec.state = owning.clone();
        record::store(&self.export.image, rec).map_err(record_err)?;
        self.export.switch.set_route(Route::Local);
        tracing::warn!(export = %self.export.name, target = %target_node,
            "ownership was in doubt; the target never committed, so this node owns the disk again");
        self.report
            .settled("target had not committed; this node kept the disk".into());
        Ok(())
    }

    /// The target says it committed the handover whose answer this node
    /// lost: record the handover (as a completed commit would have) and
    /// stop serving.
    fn settle_handed_over(
        &self,
        rec: &mut OwnerRecord,
        target_node: &str,
        message: &str,
    ) -> Result<(), MigrationError> {
        let export = self.export;
        let peer_bitmap = rec.peer(target_node).and_then(|p| p.bitmap.clone());
        let generation = rec.generation + 1;
        record_handover(export, rec, target_node, generation, peer_bitmap)?;
        export.switch.set_route(Route::Fail(Arc::from(format!(
            "export {} was handed over to node {target_node} (generation {}): reconnect to that node",
            export.name, rec.generation
        ))));
        self.hooks.committed(&export.name, target_node);
        tracing::warn!(export = %export.name, target = %target_node, generation = rec.generation,
            "ownership was in doubt; the target had committed, so the handover stands: {message}");
        self.report.settled(format!(
            "target had committed generation {}; the handover stands",
            rec.generation
        ));
        self.report.start("settled".into());
        Ok(())
    }
}

/// One frame from the target, with the peer's error code kept.
fn recv_frame(rx: &mut LinkReceiver) -> Result<(u16, Vec<u8>), PeerError> {
    let mut buf = Vec::new();
    rx.recv_into(&mut buf).map(|t| (t, buf))
}

/// A refusal (the target's message) or a broken link.
fn recv_err(e: PeerError) -> MigrationError {
    match e {
        PeerError::Remote { message, .. } => MigrationError::Refused { message },
        source => MigrationError::Recv { source },
    }
}

/// After the target committed `generation`: record the handover durably
/// and drop the bitmaps that only served the migration.
pub(super) fn record_handover(
    export: &SourceExport,
    rec: &mut OwnerRecord,
    target_node: &str,
    generation: u64,
    peer_bitmap: Option<String>,
) -> Result<(), MigrationError> {
    rec.generation = generation;
    rec.state = OwnerState::HandedOver {
        to: target_node.to_owned(),
    };
    rec.set_peer(record::PeerRecord {
        node: target_node.to_owned(),
        generation,
        bitmap: None,
    });
    record::store(&export.image, rec).map_err(record_err)?;
    for b in [Some(MIGRATION_BITMAP.to_owned()), peer_bitmap]
        .into_iter()
        .flatten()
    {
        if export.store.get(&b).is_some()
            && let Err(e) = export.store.remove(&b)
        {
            tracing::warn!(bitmap = %b, "cannot remove a migration bitmap after the handover: {e}");
        }
    }
    Ok(())
}
