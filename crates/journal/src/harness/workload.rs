//! Workloads: the [`Op`] stream, a disk that records it, the write-back
//! baseline that ignores `order`, and random workload generation.

use std::sync::Arc;

use parking_lot::Mutex;
use understudy_block::{
    Disk, DiskInfo, DiskMap, DiskRead, DiskSize, DiskWrite, Epoch, Extent, Result as BResult,
    WriteOpts, ZeroOpts,
};

use crate::sim::Rng;

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

    pub(super) fn range(&self) -> Option<(u64, u64)> {
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
