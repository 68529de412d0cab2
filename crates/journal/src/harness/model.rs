//! The model of a workload: the image hash after every prefix of its data
//! operations, and which prefixes are epoch boundaries.

use std::collections::HashMap;

use super::workload::Op;

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
    pub(super) flush_points: Vec<usize>,
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
    pub(super) fn epoch_after(&self, p: usize) -> &[Op] {
        let i = self.boundaries.partition_point(|&b| b <= p);
        let end = self
            .boundaries
            .get(i)
            .copied()
            .unwrap_or(self.data_ops.len());
        &self.data_ops[p..end]
    }
}
