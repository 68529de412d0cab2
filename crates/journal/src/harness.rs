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

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use understudy_block::{
    Disk, DiskInfo, DiskMap, DiskRead, DiskSize, DiskWrite, Epoch, Extent, Result as BResult,
    WriteOpts, ZeroOpts,
};

use crate::disk::{EpochDisk, JournalConfig, JournalStats};
use crate::error::JournalError;
use crate::sim::{Failpoint, LossMode, Rng, SimWorld};

/// One operation of a recorded workload.
#[derive(Clone, Debug)]
pub enum Op {
    /// Data written.
    Write {
        /// Offset.
        offset: u64,
        /// Data.
        data: Arc<Vec<u8>>,
    },
    /// Zeroes written.
    Zero {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Range discarded (the model reads it as zeroes).
    Discard {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Write-order barrier.
    Order,
    /// Flush.
    Flush,
}

impl Op {
    /// Whether the op changes data.
    pub fn is_data(&self) -> bool {
        matches!(
            self,
            Op::Write { .. } | Op::Zero { .. } | Op::Discard { .. }
        )
    }

    /// Apply to an in-memory image.
    pub fn apply(&self, img: &mut [u8]) {
        match self {
            Op::Write { offset, data } => {
                img[*offset as usize..*offset as usize + data.len()].copy_from_slice(data)
            }
            Op::Zero { offset, len } | Op::Discard { offset, len } => {
                img[*offset as usize..(*offset + *len) as usize].fill(0)
            }
            Op::Order | Op::Flush => {}
        }
    }

    /// Issue on a disk.
    pub fn issue(&self, d: &dyn Disk) -> BResult<()> {
        match self {
            Op::Write { offset, data } => d.write_at(data, *offset, WriteOpts::default()),
            Op::Zero { offset, len } => d.write_zeroes(*offset, *len, ZeroOpts::default()),
            Op::Discard { offset, len } => d.discard(*offset, *len, WriteOpts::default()),
            Op::Order => d.order().map(|_| ()),
            Op::Flush => d.flush(),
        }
    }

    fn range(&self) -> Option<(u64, u64)> {
        match self {
            Op::Write { offset, data } => Some((*offset, data.len() as u64)),
            Op::Zero { offset, len } | Op::Discard { offset, len } => Some((*offset, *len)),
            _ => None,
        }
    }
}

/// A disk wrapper that records every successful operation.
#[derive(Debug)]
pub struct RecordingDisk {
    inner: Arc<dyn Disk>,
    ops: Mutex<Vec<Op>>,
}

impl RecordingDisk {
    /// Wrap a disk.
    pub fn new(inner: Arc<dyn Disk>) -> Self {
        Self {
            inner,
            ops: Mutex::new(Vec::new()),
        }
    }

    /// The operations recorded so far (the list is emptied).
    pub fn take_ops(&self) -> Vec<Op> {
        std::mem::take(&mut *self.ops.lock())
    }

    fn push(&self, op: Op) {
        self.ops.lock().push(op);
    }
}

impl DiskSize for RecordingDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
}
impl DiskRead for RecordingDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BResult<()> {
        self.inner.read_at(buf, offset)
    }
}
impl DiskWrite for RecordingDisk {
    fn write_at(&self, buf: &[u8], offset: u64, opts: WriteOpts) -> BResult<()> {
        self.inner.write_at(buf, offset, opts)?;
        self.push(Op::Write {
            offset,
            data: Arc::new(buf.to_vec()),
        });
        if opts.fua {
            // FUA closes an epoch in the journal; record it as a flush.
            self.push(Op::Flush);
        }
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> BResult<()> {
        self.inner.write_zeroes(offset, len, opts)?;
        self.push(Op::Zero { offset, len });
        if opts.write.fua {
            self.push(Op::Flush);
        }
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64, opts: WriteOpts) -> BResult<()> {
        self.inner.discard(offset, len, opts)?;
        self.push(Op::Discard { offset, len });
        if opts.fua {
            self.push(Op::Flush);
        }
        Ok(())
    }
    fn flush(&self) -> BResult<()> {
        self.inner.flush()?;
        self.push(Op::Flush);
        Ok(())
    }
    fn order(&self) -> BResult<Epoch> {
        let e = self.inner.order()?;
        self.push(Op::Order);
        Ok(e)
    }
}
impl DiskMap for RecordingDisk {
    fn map(&self, offset: u64, len: u64) -> BResult<Vec<Extent>> {
        self.inner.map(offset, len)
    }
}
impl Disk for RecordingDisk {
    fn info(&self) -> DiskInfo {
        self.inner.info()
    }
}

/// The unordered baseline: a write-back cache where `order` is a no-op
/// (ordering lost) and only `flush` syncs. What a disk without the journal
/// gives a guest that relies on order.
#[derive(Debug)]
pub struct WritebackDisk(pub Arc<dyn Disk>);

impl DiskSize for WritebackDisk {
    fn size(&self) -> u64 {
        self.0.size()
    }
}
impl DiskRead for WritebackDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BResult<()> {
        self.0.read_at(buf, offset)
    }
}
impl DiskWrite for WritebackDisk {
    fn write_at(&self, buf: &[u8], offset: u64, opts: WriteOpts) -> BResult<()> {
        self.0.write_at(buf, offset, opts)
    }
    fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> BResult<()> {
        self.0.write_zeroes(offset, len, opts)
    }
    fn discard(&self, offset: u64, len: u64, opts: WriteOpts) -> BResult<()> {
        self.0.discard(offset, len, opts)
    }
    fn flush(&self) -> BResult<()> {
        self.0.flush()
    }
    fn order(&self) -> BResult<Epoch> {
        Ok(0)
    }
}
impl DiskMap for WritebackDisk {
    fn map(&self, offset: u64, len: u64) -> BResult<Vec<Extent>> {
        self.0.map(offset, len)
    }
}
impl Disk for WritebackDisk {
    fn info(&self) -> DiskInfo {
        self.0.info()
    }
}

/// Block size of the incremental image hash.
const HBLOCK: usize = 4096;

fn block_term(idx: usize, block: &[u8]) -> u64 {
    let h = xxhash_rust::xxh3::xxh3_64_with_seed(block, idx as u64);
    // Spread so that a sum of terms is a good set hash.
    h.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (h >> 29)
}

/// Order-independent hash of an image: sum of per-block terms, so a write
/// updates it in time proportional to its length.
pub fn image_hash(img: &[u8]) -> u64 {
    img.chunks(HBLOCK)
        .enumerate()
        .fold(0u64, |acc, (i, b)| acc.wrapping_add(block_term(i, b)))
}

/// The expected states of a workload: a hash after every prefix of its data
/// operations, and which prefixes are epoch boundaries.
#[derive(Debug)]
pub struct Model {
    initial: Vec<u8>,
    data_ops: Vec<Op>,
    /// `prefix_hash[p]`: hash after the first `p` data operations.
    prefix_hash: Vec<u64>,
    /// Data-op counts at the end of epochs `0, 1, 2, ...` (`boundaries[0] = 0`).
    boundaries: Vec<usize>,
    by_hash: HashMap<u64, Vec<usize>>,
    /// Data-op count covered by each flush, in stream order.
    flush_points: Vec<usize>,
}

impl Model {
    /// Build from an initial image and an op stream.
    pub fn new(initial: &[u8], ops: &[Op]) -> Self {
        let mut img = initial.to_vec();
        let mut h = image_hash(&img);
        let mut prefix_hash = vec![h];
        let mut boundaries = vec![0];
        let mut data_ops = Vec::new();
        let mut flush_points = Vec::new();
        for op in ops {
            if let Some((off, len)) = op.range() {
                let first = off as usize / HBLOCK;
                let last = ((off + len) as usize)
                    .div_ceil(HBLOCK)
                    .min(img.len().div_ceil(HBLOCK));
                for b in first..last {
                    let end = ((b + 1) * HBLOCK).min(img.len());
                    h = h.wrapping_sub(block_term(b, &img[b * HBLOCK..end]));
                }
                op.apply(&mut img);
                for b in first..last {
                    let end = ((b + 1) * HBLOCK).min(img.len());
                    h = h.wrapping_add(block_term(b, &img[b * HBLOCK..end]));
                }
                data_ops.push(op.clone());
                prefix_hash.push(h);
            } else {
                if *boundaries.last().unwrap_or(&0) != data_ops.len() {
                    boundaries.push(data_ops.len());
                }
                if matches!(op, Op::Flush) {
                    flush_points.push(data_ops.len());
                }
            }
        }
        let mut by_hash: HashMap<u64, Vec<usize>> = HashMap::new();
        for (p, &h) in prefix_hash.iter().enumerate() {
            by_hash.entry(h).or_default().push(p);
        }
        Self {
            initial: initial.to_vec(),
            data_ops,
            prefix_hash,
            boundaries,
            by_hash,
            flush_points,
        }
    }

    /// Number of epochs in the stream.
    pub fn epochs(&self) -> usize {
        self.boundaries.len() - 1
    }

    /// Number of data operations.
    pub fn data_ops(&self) -> usize {
        self.data_ops.len()
    }

    /// Data-op prefixes whose state hashes to `h`.
    pub fn prefixes_with_hash(&self, h: u64) -> &[usize] {
        self.by_hash.get(&h).map_or(&[], |v| v.as_slice())
    }

    /// Whether prefix `p` ends an epoch.
    pub fn is_boundary(&self, p: usize) -> bool {
        self.boundaries.binary_search(&p).is_ok() || p == self.data_ops.len()
    }

    /// The image after the first `p` data operations.
    pub fn state_at(&self, p: usize) -> Vec<u8> {
        let mut img = self.initial.clone();
        for op in &self.data_ops[..p] {
            op.apply(&mut img);
        }
        img
    }

    /// Hash after the first `p` data operations.
    pub fn hash_at(&self, p: usize) -> u64 {
        self.prefix_hash[p]
    }

    /// The epoch boundaries (data-op counts).
    pub fn boundaries(&self) -> &[usize] {
        &self.boundaries
    }

    /// Data operations of the epoch that starts at boundary `p`.
    fn epoch_after(&self, p: usize) -> &[Op] {
        let i = self.boundaries.partition_point(|&b| b <= p);
        let end = self
            .boundaries
            .get(i)
            .copied()
            .unwrap_or(self.data_ops.len());
        &self.data_ops[p..end]
    }
}

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
    let img = world.add_file(initial.to_vec());
    let jr = world.add_file(Vec::new());
    // (event index when the flush returned, data ops it covers)
    let mut acks: Vec<(usize, usize)> = Vec::new();
    let mut out = CrashOutcome::default();
    {
        let mut epoch_disk = None;
        let disk: Arc<dyn Disk> = match target {
            Target::Epoch(c) => {
                let (d, _) = EpochDisk::open(
                    Arc::new(world.disk(img)),
                    Arc::new(world.file(jr)),
                    c.clone(),
                )
                .expect("open on a fresh simulated journal");
                let d = Arc::new(d);
                epoch_disk = Some(Arc::clone(&d));
                d
            }
            Target::Writeback => Arc::new(WritebackDisk(Arc::new(world.disk(img)))),
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
    }
    let mut crasher = world.crasher();
    let n = crasher.len();
    let mut rng = Rng(cfg.seed);
    let mut points: Vec<usize> = if n < cfg.points {
        (0..=n).collect()
    } else {
        let mut v: Vec<usize> = (0..cfg.points / 2)
            .map(|i| i * n / (cfg.points / 2).max(1))
            .collect();
        v.extend((0..cfg.points - cfg.points / 2).map(|_| rng.below(n as u64 + 1) as usize));
        v.push(n);
        v
    };
    points.sort_unstable();
    out.events = n;
    let mut seen = std::collections::HashSet::new();
    for (i, &at) in points.iter().enumerate() {
        let mode = LossMode::ALL[i % LossMode::ALL.len()];
        let state = crasher.crash(at, mode, &mut rng);
        let recovered = match target {
            Target::Epoch(c) => match recover(&state[img], &state[jr], c) {
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
            Target::Writeback => state[img].clone(),
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
        let h = image_hash(&recovered);
        let cands: Vec<usize> = model
            .prefixes_with_hash(h)
            .iter()
            .copied()
            .filter(|&p| p >= acked)
            .filter(|&p| cfg.check == Check::AnyPrefix || model.is_boundary(p))
            .collect();
        let ok = if let Some(&p) = cands.last() {
            seen.insert(p);
            true
        } else if let Check::Ragged(min) = cfg.check {
            ragged_ok(&model, &recovered, acked, min)
        } else {
            false
        };
        let extra_res = extra(&recovered);
        if extra_res.is_err() {
            out.extra_failures += 1;
        }
        if !ok {
            out.violations.push(Violation {
                at,
                mode,
                reason: format!(
                    "image is not the state at any epoch boundary >= {acked} data ops \
                     (flush-acknowledged); it matches data-op prefixes {:?} of {}",
                    model.prefixes_with_hash(h),
                    model.data_ops()
                ),
            });
            continue;
        }
        if let Err(e) = extra_res {
            out.violations.push(Violation {
                at,
                mode,
                reason: e.to_string(),
            });
        }
    }
    out.distinct_prefixes = seen.len();
    out
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

/// Shape of a generated workload.
#[derive(Clone, Copy, Debug)]
pub struct WorkloadShape {
    /// Disk size (a multiple of 512).
    pub size: u64,
    /// Data operations to generate.
    pub ops: usize,
    /// Largest write, in 512-byte sectors.
    pub max_sectors: u64,
    /// One in `order_every` data ops is followed by an order.
    pub order_every: u64,
    /// One in `flush_every` data ops is followed by a flush.
    pub flush_every: u64,
}

/// A reproducible random workload: sector-aligned writes of distinct
/// content (so every state is distinguishable), some write-zeroes and
/// discards, orders and flushes.
pub fn random_workload(shape: WorkloadShape, seed: u64) -> Vec<Op> {
    let mut rng = Rng(seed);
    let sectors = shape.size / 512;
    let mut ops = Vec::new();
    for i in 0..shape.ops {
        let len = 1 + rng.below(shape.max_sectors.min(sectors));
        let off = rng.below(sectors - len + 1) * 512;
        let kind = rng.below(20);
        if kind == 0 {
            ops.push(Op::Zero {
                offset: off,
                len: len * 512,
            });
        } else if kind == 1 {
            ops.push(Op::Discard {
                offset: off,
                len: len * 512,
            });
        } else {
            let mut data = vec![0u8; (len * 512) as usize];
            for (j, c) in data.chunks_mut(8).enumerate() {
                let v = (i as u64) << 32 | j as u64 | 1 << 63;
                c.copy_from_slice(&v.to_le_bytes()[..c.len()]);
            }
            ops.push(Op::Write {
                offset: off,
                data: Arc::new(data),
            });
        }
        if rng.below(shape.flush_every) == 0 {
            ops.push(Op::Flush);
        } else if rng.below(shape.order_every) == 0 {
            ops.push(Op::Order);
        }
    }
    ops
}
