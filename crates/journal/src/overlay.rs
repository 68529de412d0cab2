//! In-memory index of journaled ranges not yet applied to the image.
//!
//! Non-overlapping pieces keyed by start offset. A newer write cuts older
//! pieces (partial overlaps keep the uncovered ends). Each piece remembers
//! the sequence number of its record so that applying an old record removes
//! only what is still its own.

use std::collections::BTreeMap;
use std::sync::Arc;

/// Where the bytes of a piece come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// Bytes of a record buffer: disk offset `base` is `buf[skip]`.
    Data {
        /// Record buffer.
        buf: Arc<Vec<u8>>,
        /// Disk offset of `buf[skip]`.
        base: u64,
        /// Index in `buf` of the byte at `base`.
        skip: usize,
    },
    /// Reads as zeroes (write-zeroes or discard).
    Zero,
}

#[derive(Clone, Debug)]
struct Piece {
    end: u64,
    seq: u64,
    src: Source,
}

/// One segment of a lookup: `None` means "read the image".
pub type Segment = (u64, u64, Option<Source>);

/// The index.
#[derive(Debug, Default)]
pub struct Overlay {
    map: BTreeMap<u64, Piece>,
}

impl Overlay {
    /// Whether no range is overlaid.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Remove `[start, end)` from every piece, splitting the ones that stick out.
    fn cut(&mut self, start: u64, end: u64) {
        let keys: Vec<u64> = self
            .map
            .range(..end)
            .rev()
            .take_while(|(_, p)| p.end > start)
            .map(|(&k, _)| k)
            .collect();
        for k in keys {
            let Some(p) = self.map.remove(&k) else {
                continue;
            };
            if k < start {
                self.map.insert(
                    k,
                    Piece {
                        end: start,
                        ..p.clone()
                    },
                );
            }
            if p.end > end {
                self.map.insert(end, Piece { end: p.end, ..p });
            }
        }
    }

    /// Overlay `[start, end)` with `src`, newest wins.
    pub fn insert(&mut self, start: u64, end: u64, seq: u64, src: Source) {
        if start >= end {
            return;
        }
        self.cut(start, end);
        self.map.insert(start, Piece { end, seq, src });
    }

    /// Remove the parts of `[start, end)` that still belong to record `seq`.
    pub fn remove_seq(&mut self, start: u64, end: u64, seq: u64) {
        let keys: Vec<u64> = self
            .map
            .range(..end)
            .rev()
            .take_while(|(_, p)| p.end > start)
            .filter(|(_, p)| p.seq == seq)
            .map(|(&k, _)| k)
            .collect();
        for k in keys {
            // A piece of `seq` lies within the record's range by construction.
            self.map.remove(&k);
        }
    }

    /// Segments covering `[start, end)` in order, gaps included.
    pub fn lookup(&self, start: u64, end: u64) -> Vec<Segment> {
        let mut out = Vec::new();
        let mut pos = start;
        let first = self
            .map
            .range(..=start)
            .next_back()
            .filter(|(_, p)| p.end > start)
            .map(|(&k, _)| k)
            .unwrap_or(start);
        for (&k, p) in self.map.range(first..end) {
            if k > pos {
                out.push((pos, k, None));
                pos = k;
            }
            let e = p.end.min(end);
            if e > pos {
                out.push((pos, e, Some(p.src.clone())));
                pos = e;
            }
        }
        if pos < end {
            out.push((pos, end, None));
        }
        out
    }

    /// The first overlaid byte at or after `pos`, if any: its piece's
    /// extent clipped to start at `pos`, and whether it reads as zero.
    pub fn next_piece(&self, pos: u64) -> Option<(u64, u64, bool)> {
        if let Some((&k, p)) = self.map.range(..=pos).next_back()
            && p.end > pos
        {
            let _ = k;
            return Some((pos, p.end, matches!(p.src, Source::Zero)));
        }
        self.map
            .range(pos..)
            .next()
            .map(|(&k, p)| (k, p.end, matches!(p.src, Source::Zero)))
    }
}

/// Copy the bytes of `src` for disk range `[start, start + out.len())`.
pub fn copy_from(src: &Source, start: u64, out: &mut [u8]) {
    match src {
        Source::Zero => out.fill(0),
        Source::Data { buf, base, skip } => {
            let from = skip + (start - base) as usize;
            out.copy_from_slice(&buf[from..from + out.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const SIZE: u64 = 256;

    #[derive(Clone, Debug)]
    enum Op {
        Write(u64, u64, u8),
        Zero(u64, u64),
        Apply(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..SIZE, 1..64u64, any::<u8>()).prop_map(|(s, l, v)| Op::Write(s, l.min(SIZE - s), v)),
            (0..SIZE, 1..64u64).prop_map(|(s, l)| Op::Zero(s, l.min(SIZE - s))),
            (0usize..100).prop_map(Op::Apply),
        ]
    }

    proptest! {
        /// The overlay on top of an "image" always reads like a model that
        /// applies every write in order, whatever is applied and removed.
        #[test]
        fn overlay_matches_byte_model(ops in proptest::collection::vec(op(), 1..60)) {
            let mut ov = Overlay::default();
            let mut model = vec![0xEEu8; SIZE as usize]; // what readers must see
            let mut image = vec![0xEEu8; SIZE as usize]; // what the applier wrote
            let mut pending: Vec<(u64, u64, u64, Source)> = Vec::new();
            let mut seq = 0;
            for op in ops {
                match op {
                    Op::Write(s, l, v) if l > 0 => {
                        seq += 1;
                        // Put the data at an offset inside the buffer to exercise `skip`.
                        let mut b = vec![0u8; l as usize + 3];
                        b[3..].fill(v);
                        let src = Source::Data { buf: Arc::new(b), base: s, skip: 3 };
                        ov.insert(s, s + l, seq, src.clone());
                        pending.push((seq, s, s + l, src));
                        model[s as usize..(s + l) as usize].fill(v);
                    }
                    Op::Zero(s, l) if l > 0 => {
                        seq += 1;
                        ov.insert(s, s + l, seq, Source::Zero);
                        pending.push((seq, s, s + l, Source::Zero));
                        model[s as usize..(s + l) as usize].fill(0);
                    }
                    Op::Apply(n) => {
                        // Apply the oldest n records in order, like the writer thread.
                        let n = n.min(pending.len());
                        for (sq, s, e, src) in pending.drain(..n) {
                            copy_from(&src, s, &mut image[s as usize..e as usize]);
                            ov.remove_seq(s, e, sq);
                        }
                    }
                    _ => {}
                }
                let mut seen = vec![0u8; SIZE as usize];
                for (s, e, src) in ov.lookup(0, SIZE) {
                    let out = &mut seen[s as usize..e as usize];
                    match src {
                        None => out.copy_from_slice(&image[s as usize..e as usize]),
                        Some(src) => copy_from(&src, s, out),
                    }
                }
                prop_assert_eq!(&seen, &model);
            }
            // Applying everything leaves an empty overlay and the model image.
            for (sq, s, e, src) in pending.drain(..) {
                copy_from(&src, s, &mut image[s as usize..e as usize]);
                ov.remove_seq(s, e, sq);
            }
            prop_assert!(ov.is_empty());
            prop_assert_eq!(&image, &model);
        }

        #[test]
        fn lookup_segments_tile_the_range(ops in proptest::collection::vec(op(), 0..30), a in 0..SIZE, b in 0..SIZE) {
            let mut ov = Overlay::default();
            for (i, op) in ops.into_iter().enumerate() {
                if let Op::Write(s, l, _) | Op::Zero(s, l) = op && l > 0 {
                    ov.insert(s, s + l, i as u64, Source::Zero);
                }
            }
            let (a, b) = (a.min(b), a.max(b) + 1);
            let segs = ov.lookup(a, b);
            let mut pos = a;
            for (s, e, _) in segs {
                prop_assert_eq!(s, pos);
                prop_assert!(e > s);
                pos = e;
            }
            prop_assert_eq!(pos, b);
        }
    }
}
