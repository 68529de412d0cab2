//! Crash harness in the spirit of dm-log-writes and CrashMonkey.
//!
//! 1. Record a workload's stream of writes, orders and flushes
//!    ([`RecordingDisk`], or build the [`Op`] list directly).
//! 2. Run it on a disk over simulated storage ([`crate::sim`]), noting when
//!    each flush was acknowledged.
//! 3. For many crash points and loss patterns, take the crash state, recover
//!    (open the journal again), and check the image against the model: it
//!    must equal the state after some epoch boundary `k` (prefix
//!    consistency), with `k` at or after the last acknowledged flush.
//!
//! The same harness runs a plain write-back disk that ignores `order`
//! ([`WritebackDisk`]) to show that the check does catch lost ordering.

use std::sync::Arc;

use understudy_block::Disk;

use crate::disk::{EpochDisk, JournalConfig, JournalStats};
use crate::error::JournalError;
use crate::sim::{Failpoint, FileId, LossMode, Rng, SimWorld};

mod model;
mod workload;

pub use model::{Model, image_hash};
pub use workload::{Op, RecordingDisk, WorkloadShape, WritebackDisk, random_workload};

/// What must hold for a recovered image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// Equal to the state at an epoch boundary (the guarantee).
    Strict,
    /// Equal to the state after some prefix of writes (when back-pressure
    /// may split epochs: every split point is an extra boundary).
    AnyPrefix,
    /// As `Strict`, or an epoch boundary state plus some sectors of the
    /// next epoch's writes of at least this many bytes (semantic journaling).
    Ragged(u64),
}

/// The disk under test.
#[derive(Clone, Debug)]
pub enum Target {
    /// [`EpochDisk`] with this configuration.
    Epoch(JournalConfig),
    /// [`WritebackDisk`]: no journal, `order` is a no-op.
    Writeback,
}

/// Crash-test parameters.
#[derive(Clone, Debug)]
pub struct CrashConfig {
    /// Crash points to check (all if the run has fewer events).
    pub points: usize,
    /// Seed of the crash-state generator.
    pub seed: u64,
    /// Whether an acknowledged flush promises durability (false under
    /// `FlushPolicy::Ordered`, where flush only orders).
    pub flush_is_durable: bool,
    /// Check to apply.
    pub check: Check,
    /// Failpoints armed while the workload runs; the workload stops at the
    /// first error.
    pub failpoints: Vec<Failpoint>,
}

impl CrashConfig {
    /// `points` crash points, durable flushes, strict check, no failpoints.
    pub fn new(points: usize, seed: u64) -> Self {
        Self {
            points,
            seed,
            flush_is_durable: true,
            check: Check::Strict,
            failpoints: Vec::new(),
        }
    }
}

/// A failed check.
#[derive(Clone, Debug)]
pub struct Violation {
    /// Crash point (event index).
    pub at: usize,
    /// Loss pattern.
    pub mode: LossMode,
    /// What was wrong.
    pub reason: String,
}

/// Why the image check given to [`crash_test`] rejected a recovered image.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ImageCheckError {
    /// The checker could not run (a tool is missing, a scratch file could
    /// not be written): the image was not judged.
    #[error("cannot run the image check ({0}): install the checker and free scratch space")]
    Unavailable(String),
    /// The checker ran and found the image inconsistent.
    #[error("the recovered image is inconsistent: {0}")]
    Inconsistent(String),
}

/// Result of [`crash_test`].
#[derive(Clone, Debug, Default)]
pub struct CrashOutcome {
    /// Storage events in the run.
    pub events: usize,
    /// Crash states checked.
    pub checked: usize,
    /// Violations found.
    pub violations: Vec<Violation>,
    /// How many recovered images matched each data-op prefix (shows that
    /// crashes land in many different places).
    pub distinct_prefixes: usize,
    /// Journal statistics at the end of the workload (epoch target only).
    pub stats: Option<JournalStats>,
    /// The first error the workload got (with failpoints armed).
    pub first_error: Option<String>,
    /// Operations issued successfully.
    pub ops_done: usize,
    /// Recovered images the `extra` check rejected (it runs on every
    /// recovered image, including those that failed the prefix check).
    pub extra_failures: usize,
}

/// Run `ops` on `target` over simulated storage, then check crash states.
/// `extra` is called on every recovered image (e.g. to run `e2fsck`); an
/// `Err` counts as a violation.
pub fn crash_test(
    initial: &[u8],
    ops: &[Op],
    target: &Target,
    cfg: &CrashConfig,
    mut extra: impl FnMut(&[u8]) -> Result<(), ImageCheckError>,
) -> CrashOutcome {
    let model = Model::new(initial, ops);
    let world = SimWorld::new();
    let files = Files {
        img: world.add_file(initial.to_vec()),
        jr: world.add_file(Vec::new()),
    };
    let mut out = CrashOutcome::default();
    let acks = run_workload(&world, files, ops, target, &model, cfg, &mut out);
    let mut crasher = world.crasher();
    let n = crasher.len();
    let mut rng = Rng(cfg.seed);
    let points = crash_points(n, cfg.points, &mut rng);
    out.events = n;
    let mut seen = std::collections::HashSet::new();
    for (i, &at) in points.iter().enumerate() {
        let mode = LossMode::ALL[i % LossMode::ALL.len()];
        let state = crasher.crash(at, mode, &mut rng);
        let recovered = match target {
            Target::Epoch(c) => match recover(&state[files.img], &state[files.jr], c) {
                Ok(r) => r,
                Err(e) => {
                    out.violations.push(Violation {
                        at,
                        mode,
                        reason: format!("recovery failed: {e}"),
                    });
                    continue;
                }
            },
            Target::Writeback => state[files.img].clone(),
        };
        out.checked += 1;
        let acked = if cfg.flush_is_durable {
            acks.iter()
                .filter(|(ev, _)| *ev <= at)
                .map(|&(_, p)| p)
                .max()
                .unwrap_or(0)
        } else {
            0
        };
        let prefix = matching_prefix(&model, cfg, &recovered, acked);
        if let Some(p) = prefix {
            seen.insert(p);
        }
        let ok = prefix.is_some()
            || matches!(cfg.check, Check::Ragged(min) if ragged_ok(&model, &recovered, acked, min));
        let extra_res = extra(&recovered);
        if extra_res.is_err() {
            out.extra_failures += 1;
        }
        let reason = if !ok {
            let h = image_hash(&recovered);
            format!(
                "image is not the state at any epoch boundary >= {acked} data ops \
                 (flush-acknowledged); it matches data-op prefixes {:?} of {}",
                model.prefixes_with_hash(h),
                model.data_ops()
            )
        } else if let Err(e) = extra_res {
            e.to_string()
        } else {
            continue;
        };
        out.violations.push(Violation { at, mode, reason });
    }
    out.distinct_prefixes = seen.len();
    out
}

/// The image and journal files of a crash test's simulated world.
#[derive(Clone, Copy)]
struct Files {
    img: FileId,
    jr: FileId,
}

/// Issue `ops` on `target` (failpoints armed), then stop it cleanly.
/// Returns, per acknowledged flush, the event index when it returned and
/// the data ops it covers.
fn run_workload(
    world: &Arc<SimWorld>,
    files: Files,
    ops: &[Op],
    target: &Target,
    model: &Model,
    cfg: &CrashConfig,
    out: &mut CrashOutcome,
) -> Vec<(usize, usize)> {
    let mut acks = Vec::new();
    let mut epoch_disk = None;
    let disk: Arc<dyn Disk> = match target {
        Target::Epoch(c) => {
            let (d, _) = EpochDisk::open(
                Arc::new(world.disk(files.img)),
                Arc::new(world.file(files.jr)),
                c.clone(),
            )
            .expect("open on a fresh simulated journal");
            let d = Arc::new(d);
            epoch_disk = Some(Arc::clone(&d));
            d
        }
        Target::Writeback => Arc::new(WritebackDisk(Arc::new(world.disk(files.img)))),
    };
    for fp in &cfg.failpoints {
        world.add_failpoint(*fp);
    }
    let mut flushes = model.flush_points.iter();
    for op in ops {
        if let Err(e) = op.issue(&*disk) {
            out.first_error = Some(e.to_string());
            break;
        }
        out.ops_done += 1;
        if matches!(op, Op::Flush) {
            let p = flushes.next().copied().unwrap_or(0);
            acks.push((world.event_count(), p));
        }
    }
    // A clean stop applies what is left to the image, so an image
    // failpoint that the writer thread had not reached while the
    // workload ran (it applies in the background, on its own schedule)
    // still surfaces, here, instead of depending on timing. The stop's
    // own events become crash points too.
    if out.first_error.is_none()
        && let Some(d) = &epoch_disk
        && let Err(e) = d.stop()
    {
        out.first_error = Some(format!("at stop: {e}"));
    }
    out.stats = epoch_disk.as_ref().map(|d| d.stats());
    drop(epoch_disk);
    drop(disk);
    world.clear_failpoints();
    acks
}

/// Which of `n` storage events to crash at: `points` of them, half evenly
/// spaced and half random, always including the end (every event when
/// there are fewer than `points`).
fn crash_points(n: usize, points: usize, rng: &mut Rng) -> Vec<usize> {
    let mut v: Vec<usize> = if n < points {
        (0..=n).collect()
    } else {
        let mut v: Vec<usize> = (0..points / 2)
            .map(|i| i * n / (points / 2).max(1))
            .collect();
        v.extend((0..points - points / 2).map(|_| rng.below(n as u64 + 1) as usize));
        v.push(n);
        v
    };
    v.sort_unstable();
    v
}

/// The latest data-op prefix at or after `acked` whose state `recovered`
/// equals and that the check allows (an epoch boundary unless any prefix
/// will do).
fn matching_prefix(
    model: &Model,
    cfg: &CrashConfig,
    recovered: &[u8],
    acked: usize,
) -> Option<usize> {
    let h = image_hash(recovered);
    model
        .prefixes_with_hash(h)
        .iter()
        .copied()
        .rfind(|&p| p >= acked && (cfg.check == Check::AnyPrefix || model.is_boundary(p)))
}

/// Recover a crash state: open the journal on the image, close it, return
/// the image.
pub fn recover(image: &[u8], journal: &[u8], cfg: &JournalConfig) -> Result<Vec<u8>, JournalError> {
    let w = SimWorld::new();
    let img = w.add_file(image.to_vec());
    let jr = w.add_file(journal.to_vec());
    let (d, _) = EpochDisk::open(Arc::new(w.disk(img)), Arc::new(w.file(jr)), cfg.clone())?;
    d.close()?;
    Ok(w.contents(img))
}

/// Whether `img` is a boundary state plus sectors of the next epoch's large
/// writes (each differing sector equals the data of one such write).
fn ragged_ok(model: &Model, img: &[u8], acked: usize, min: u64) -> bool {
    for &p in model.boundaries().iter().rev().filter(|&&p| p >= acked) {
        let base = model.state_at(p);
        let next = model.epoch_after(p);
        let ok = (0..img.len()).step_by(512).all(|s| {
            let e = (s + 512).min(img.len());
            if img[s..e] == base[s..e] {
                return true;
            }
            next.iter().any(|op| match op {
                Op::Write { offset, data } if data.len() as u64 >= min => {
                    let (o, l) = (*offset as usize, data.len());
                    o <= s && e <= o + l && img[s..e] == data[s - o..e - o]
                }
                _ => false,
            })
        });
        if ok {
            return true;
        }
    }
    false
}
