//! An established migration session, step by step: bulk, converge
//! (iterative rounds or mirroring), switch-over with the commit, verify.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use understudy_bitmap::{DirtyBitmap, Taken};
use understudy_block::Disk;
use understudy_copy::{Copier, CopyOptions, align_ranges, allocated, subtract};
use understudy_filter::WriteObserver;

use super::attempt::{Attempt, bitmap_err, record_err, record_handover};
use super::{
    MIGRATION_BITMAP, MigrateOptions, Mode, PeerSink, Phase, Reporter, SourceExport, SourceHooks,
};
use crate::conn::{Conn, RemoteDisk};
use crate::error::MigrationError;
use crate::observer::MigrationObserver;
use crate::record::{self, Outgoing, OwnerRecord, OwnerState};
use crate::wire::{self, Msg, Start};
use understudy_layers::{Hold, Route};

/// What the handshake settled.
pub(super) struct Plan {
    pub rec: OwnerRecord,
    pub target_node: String,
    pub migration_id: String,
    pub start: Start,
    /// The negotiated protocol version.
    pub version: u16,
    pub have: Vec<(u64, u64)>,
    pub peer_bitmap: Option<String>,
    pub gran: u64,
    pub p_bitmap: Arc<DirtyBitmap>,
}

/// The observer in the export's filter for the session; taken out (and
/// mirroring stopped) when dropped.
struct Installed<'a> {
    export: &'a SourceExport,
    obs: Arc<MigrationObserver>,
}

impl Drop for Installed<'_> {
    fn drop(&mut self) {
        self.obs.set_mirror(None);
        let o: Arc<dyn WriteObserver> = self.obs.clone();
        self.export.filter.remove_observer(&o);
    }
}

/// What the bulk copy sends.
struct BulkSet {
    todo: Vec<(u64, u64)>,
    /// The take of the peer bitmap the set came from (incremental),
    /// committed once the set is durable on the target.
    taken: Option<Taken>,
    /// Send holes and zeroes as zero ranges (the target may hold old data
    /// there).
    map: bool,
}

/// The two takes of a round: the persistent migration bitmap's and the
/// session's pending bitmap's. Committed once the data is durable on the
/// target; dropped, they merge their bits back.
struct Takes(Taken, Taken);

impl Takes {
    fn commit(self) {
        self.1.commit();
        self.0.commit();
    }
}

pub(super) struct Session<'a> {
    export: &'a SourceExport,
    opts: &'a MigrateOptions,
    hooks: &'a dyn SourceHooks,
    report: &'a Reporter<'a>,
    cancel: &'a AtomicBool,
    conn: Arc<Conn>,
    obs: Arc<MigrationObserver>,
    /// What the target lacks, precisely, from the observer's install on.
    pending: Arc<DirtyBitmap>,
    copier: Copier<'a, PeerSink>,
    plan: Plan,
    installed: Option<Installed<'a>>,
    /// Measured copy bandwidth, bytes per second.
    bw: u64,
}

impl<'a> Session<'a> {
    /// Install the observer and merge in what an earlier attempt left
    /// unsent.
    pub fn start(a: &Attempt<'a>, conn: &Arc<Conn>, plan: Plan) -> Result<Self, MigrationError> {
        let export = a.export;
        let disk: &'a dyn Disk = &*export.filter;
        let pending = Arc::new(DirtyBitmap::new(disk.size(), plan.gran).map_err(|source| {
            MigrationError::PendingBitmap {
                op: "create",
                source,
            }
        })?);
        let obs = Arc::new(MigrationObserver::new(
            pending.clone(),
            plan.version >= wire::MIRROR_ZERO_VERSION,
        ));
        export.filter.add_observer(obs.clone());
        let installed = Installed {
            export,
            obs: obs.clone(),
        };
        // Blocks an earlier attempt left unsent (after the observer is in,
        // so nothing falls between).
        pending
            .merge(&plan.p_bitmap)
            .map_err(|source| MigrationError::PendingBitmap {
                op: "merge",
                source,
            })?;
        let copy_opts = CopyOptions {
            chunk: a.opts.chunk.clamp(4096, wire::MAX_DATA),
            bandwidth: a.opts.bandwidth,
            checkpoint: a.opts.checkpoint,
            checkpoint_interval: a.opts.checkpoint_interval,
        };
        let sink = PeerSink::new(conn.clone(), obs.clone());
        let mut copier = Copier::new(disk, sink, a.report, copy_opts);
        copier.set_cancel(Some(a.cancel));
        Ok(Self {
            export,
            opts: a.opts,
            hooks: a.hooks,
            report: a.report,
            cancel: a.cancel,
            conn: conn.clone(),
            obs,
            pending,
            copier,
            plan,
            installed: Some(installed),
            bw: 0,
        })
    }

    pub fn run(mut self) -> Result<(), MigrationError> {
        self.bulk()?;
        self.converge()?;
        self.switch_over()?;
        self.verify()
    }

    fn enter(&self, phase: Phase) {
        self.report.phase(phase);
        self.fault(phase);
    }

    #[cfg(any(test, feature = "testing"))]
    fn fault(&self, phase: Phase) {
        if let Some(h) = &self.opts.fault_hook {
            (h.0)(phase);
        }
    }

    #[cfg(not(any(test, feature = "testing")))]
    fn fault(&self, _phase: Phase) {}

    fn mirror(&self) {
        self.obs.set_mirror(Some(self.conn.clone()));
        self.report.mirroring();
        self.fault(Phase::Mirroring);
    }

    /// Step 1: the initial set (allocated, changed, or differing blocks).
    fn bulk(&mut self) -> Result<(), MigrationError> {
        self.enter(Phase::Bulk);
        let t0 = Instant::now();
        let mut incremental: Option<Taken> = None;
        if self.plan.start == Start::HashResync {
            self.copier.hash_resync(self.plan.gran)?;
        } else {
            let set = self.bulk_set()?;
            incremental = set.taken;
            self.copier.bulk(&set.todo, set.map)?;
        }
        self.copier.flush()?;
        if let Some(t) = incremental {
            t.commit();
        }
        self.bw = rate(self.copier.data_bytes(), t0.elapsed());
        self.report.bandwidth(self.bw);
        Ok(())
    }

    /// What the bulk copy sends.
    fn bulk_set(&self) -> Result<BulkSet, MigrationError> {
        let store = &self.export.store;
        let plan = &self.plan;
        let take = |b: &str| store.take(b).map_err(bitmap_err("take", b));
        if plan.start == Start::Incremental {
            let b = plan
                .peer_bitmap
                .as_deref()
                .ok_or_else(|| MigrationError::Protocol {
                    reason: "target chose incremental but we offered no base".into(),
                })?;
            let t = take(b)?;
            return Ok(BulkSet {
                todo: t.dirty_ranges().collect(),
                taken: Some(t),
                map: true,
            });
        }
        // Fresh or resume.
        let resume = plan.start == Start::Resume;
        let (base, taken) = match &plan.peer_bitmap {
            Some(b) if resume && plan.rec.peer(&plan.target_node).is_some() => {
                // Resuming an incremental migration: the changed set.
                let t = take(b)?;
                (t.dirty_ranges().collect(), Some(t))
            }
            _ => {
                let disk: &dyn Disk = &*self.export.filter;
                let data = allocated(disk).map_err(|source| MigrationError::Read { source })?;
                (align_ranges(&data, plan.gran, disk.size()), None)
            }
        };
        // Blocks in the persistent bitmap are in `pending` already and go
        // with the first round.
        let p_ranges: Vec<(u64, u64)> = plan.p_bitmap.dirty_ranges().collect();
        let todo = subtract(&subtract(&base, &plan.have), &p_ranges);
        Ok(BulkSet {
            todo,
            taken,
            map: resume,
        })
    }

    /// Step 2: resend dirty blocks round by round (mirroring guest writes
    /// when asked, or when the rounds do not converge) until the rest fits
    /// in the allowed downtime.
    fn converge(&mut self) -> Result<(), MigrationError> {
        if self.opts.mode == Mode::Mirror {
            self.mirror();
        } else {
            self.enter(Phase::Iterating);
        }
        let mut rounds = 0u32;
        loop {
            let remaining = self.pending.dirty_bytes();
            self.report.waiting(remaining, &self.conn, &self.obs);
            let fits = remaining == 0
                || Duration::from_secs_f64(remaining as f64 / self.bw.max(1) as f64)
                    <= self.opts.max_downtime;
            if fits && rounds > 0 {
                return Ok(());
            }
            if rounds >= self.opts.max_rounds && !self.obs.is_mirroring() {
                tracing::info!(
                    export = %self.export.name, rounds, remaining,
                    "dirty data does not converge: mirroring guest writes from now on"
                );
                self.mirror();
            }
            if rounds >= self.opts.max_rounds.saturating_mul(4).max(20) {
                // Even mirroring cannot keep up (zeroes/discards or failures).
                return Ok(());
            }
            rounds += 1;
            self.round()?;
            self.report.round(rounds, self.bw);
        }
    }

    fn round(&mut self) -> Result<(), MigrationError> {
        let t0 = Instant::now();
        let before = self.copier.data_bytes();
        let takes = self.take_and_copy()?;
        self.copier.flush()?;
        takes.commit();
        let sent = self.copier.data_bytes() - before;
        if sent > 256 * 1024 {
            self.bw = rate(sent, t0.elapsed());
        }
        Ok(())
    }

    /// Take the persistent bitmap, then the pending one (in this order, so
    /// a write between the two is in the live persistent bitmap), and send
    /// what `pending` marks.
    fn take_and_copy(&mut self) -> Result<Takes, MigrationError> {
        let p = self
            .export
            .store
            .take(MIGRATION_BITMAP)
            .map_err(bitmap_err("take", MIGRATION_BITMAP))?;
        let q = self.copier.take_and_copy(&self.pending)?;
        Ok(Takes(p, q))
    }
}

impl Session<'_> {
    /// Step 3: hold guest I/O, send the last dirty blocks, commit, and
    /// forward the held and later requests to the new owner.
    fn switch_over(&mut self) -> Result<(), MigrationError> {
        if self.cancel.load(Ordering::SeqCst) {
            return Err(MigrationError::Cancelled);
        }
        self.enter(Phase::Switchover);
        self.plan.rec.state = OwnerState::Handing {
            to: self.plan.target_node.clone(),
            migration_id: self.plan.migration_id.clone(),
        };
        record::store(&self.export.image, &self.plan.rec).map_err(record_err)?;
        let Some(hold) = self.export.switch.hold(self.opts.drain_timeout) else {
            self.revert()?;
            return Err(MigrationError::DrainTimeout {
                ms: self.opts.drain_timeout.as_millis() as u64,
            });
        };
        self.copier.set_cancel(None);
        let takes = match self.take_and_copy() {
            Ok(t) => t,
            Err(e) => {
                hold.release(Route::Local);
                self.revert()?;
                return Err(e);
            }
        };
        self.fault(Phase::Switchover);
        let t_final = hold.since().elapsed();
        let (generation, hold) = self.commit(hold)?;
        let t_commit = hold.since().elapsed();
        let downtime = hold.release(Route::Forward(Arc::new(RemoteDisk::new(self.conn.clone()))));
        tracing::debug!(
            export = %self.export.name,
            drain_and_final_copy_us = t_final.as_micros() as u64,
            commit_us = (t_commit - t_final).as_micros() as u64,
            "switch-over timing"
        );
        self.installed = None;
        takes.commit();
        self.report.switched(downtime, &self.conn, &self.obs);
        self.handed_over(generation, downtime)
    }

    /// Back to `owner` (still migrating) after a switch-over that did not
    /// reach the commit.
    fn revert(&mut self) -> Result<(), MigrationError> {
        self.plan.rec.state = OwnerState::Owner {
            migrating: Some(Outgoing {
                to: self.plan.target_node.clone(),
                migration_id: self.plan.migration_id.clone(),
            }),
        };
        record::store(&self.export.image, &self.plan.rec).map_err(record_err)
    }

    /// Ask the target to take ownership at the next generation. On
    /// failure I/O is released: locally when the target did not commit,
    /// failing when the answer was lost (the target may own the disk now,
    /// and serving on could make two owners).
    fn commit<'h>(&mut self, hold: Hold<'h>) -> Result<(u64, Hold<'h>), MigrationError> {
        let generation = self.plan.rec.generation + 1;
        let m = Msg::Commit {
            id: self.conn.next_id(),
            generation,
        };
        match self.conn.request_borrowed("take ownership", m) {
            Ok(_) => Ok((generation, hold)),
            Err(e @ (MigrationError::Send { .. } | MigrationError::Target { .. })) => {
                // The target did not commit: we stay the owner.
                hold.release(Route::Local);
                self.revert()?;
                Err(e)
            }
            Err(e) => {
                let node = self.plan.target_node.clone();
                let msg: Arc<str> = Arc::from(format!(
                    "ownership of export {} is in doubt after a lost commit answer from node \
                     {node}: retry the migration to that node to settle it (docs/migration.md, \
                     'in doubt')",
                    self.export.name
                ));
                hold.release(Route::Fail(msg));
                Err(MigrationError::InDoubt {
                    node,
                    source: Box::new(e),
                })
            }
        }
    }

    /// The commit bookkeeping: record the handover, tell the daemon.
    fn handed_over(&mut self, generation: u64, downtime: Duration) -> Result<(), MigrationError> {
        let plan = &mut self.plan;
        record_handover(
            self.export,
            &mut plan.rec,
            &plan.target_node,
            generation,
            plan.peer_bitmap.take(),
        )?;
        self.hooks.committed(&self.export.name, &plan.target_node);
        tracing::info!(export = %self.export.name, target = %plan.target_node, generation,
            downtime_ms = downtime.as_secs_f64() * 1e3, "ownership handed over");
        Ok(())
    }

    /// Step 4 (optional): compare block hashes of both copies.
    fn verify(mut self) -> Result<(), MigrationError> {
        if !self.opts.verify {
            return Ok(());
        }
        self.enter(Phase::Verifying);
        let v = self.copier.verify(self.plan.gran)?;
        self.report.verified(v.blocks, v.mismatched, &self.conn);
        if v.mismatched > 0 {
            return Err(MigrationError::VerifyMismatch {
                mismatched: v.mismatched,
            });
        }
        Ok(())
    }
}

fn rate(bytes: u64, d: Duration) -> u64 {
    (bytes as f64 / d.as_secs_f64().max(1e-6)) as u64
}
