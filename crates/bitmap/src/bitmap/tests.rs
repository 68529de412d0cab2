use std::collections::BTreeSet;

use proptest::prelude::*;

use super::*;

/// The reference: a set of dirty granule indexes.
#[derive(Clone, Debug, Default)]
struct Model {
    size: u64,
    gran: u64,
    set: BTreeSet<u64>,
}

impl Model {
    fn new(size: u64, gran: u64) -> Self {
        Self {
            size,
            gran,
            set: BTreeSet::new(),
        }
    }

    fn mark(&mut self, off: u64, len: u64) {
        if len == 0 || off >= self.size {
            return;
        }
        let end = (off + len).min(self.size);
        for g in off / self.gran..=(end - 1) / self.gran {
            self.set.insert(g);
        }
    }

    fn dirty(&self, off: u64) -> bool {
        off < self.size && self.set.contains(&(off / self.gran))
    }

    fn dirty_bytes(&self) -> u64 {
        self.set
            .iter()
            .map(|&g| ((g + 1) * self.gran).min(self.size) - g * self.gran)
            .sum()
    }

    /// Runs computed granule by granule, merged when the state repeats.
    fn extents(&self, off: u64, len: u64) -> Vec<(u64, bool)> {
        let mut out: Vec<(u64, bool)> = Vec::new();
        if len == 0 || off >= self.size {
            return out;
        }
        let end = (off + len).min(self.size);
        let mut pos = off;
        while pos < end {
            let g = pos / self.gran;
            let gend = ((g + 1) * self.gran).min(end);
            let d = self.set.contains(&g);
            match out.last_mut() {
                Some((l, state)) if *state == d => *l += gend - pos,
                _ => out.push((gend - pos, d)),
            }
            pos = gend;
        }
        out
    }

    fn ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &g in &self.set {
            let start = g * self.gran;
            let end = ((g + 1) * self.gran).min(self.size);
            match out.last_mut() {
                Some((o, l)) if *o + *l == start => *l = end - *o,
                _ => out.push((start, end - start)),
            }
        }
        out
    }
}

fn geometry() -> impl Strategy<Value = (u64, u64)> {
    // Sizes that are and are not granule multiples, from empty to a few
    // hundred granules (several words, partial last word).
    (12u32..=16).prop_flat_map(|shift| {
        let gran = 1u64 << shift;
        (0u64..300 * gran).prop_map(move |size| (size, gran))
    })
}

fn ops(size: u64) -> impl Strategy<Value = Vec<(u64, u64)>> {
    let lim = size + 70_000;
    prop::collection::vec((0..lim, 0..lim / 4 + 1), 0..40)
}

fn check_equal(bm: &DirtyBitmap, m: &Model) {
    assert_eq!(bm.dirty_bytes(), m.dirty_bytes(), "dirty_bytes");
    assert_eq!(bm.dirty_ranges().collect::<Vec<_>>(), m.ranges(), "ranges");
    assert_eq!(
        bm.extents(0, u64::MAX),
        m.extents(0, u64::MAX),
        "all extents"
    );
    for g in 0..bm.granules() {
        assert_eq!(bm.is_dirty(g * m.gran), m.dirty(g * m.gran), "granule {g}");
    }
}

proptest! {
    #[test]
    fn mark_matches_model(((size, gran), seq) in geometry().prop_flat_map(|(s, g)| (Just((s, g)), ops(s)))) {
        let bm = DirtyBitmap::new(size, gran).unwrap();
        let mut m = Model::new(size, gran);
        for (off, len) in seq {
            bm.mark(off, len);
            m.mark(off, len);
        }
        check_equal(&bm, &m);
        prop_assert!(!bm.is_dirty(size));
        prop_assert!(!bm.is_dirty(u64::MAX));
    }

    #[test]
    fn extents_are_clipped_and_match(
        ((size, gran), seq, q) in geometry().prop_flat_map(|(s, g)| {
            (Just((s, g)), ops(s), prop::collection::vec((0..s + 70_000, 0..s + 70_000), 1..10))
        })
    ) {
        let bm = DirtyBitmap::new(size, gran).unwrap();
        let mut m = Model::new(size, gran);
        for (off, len) in seq {
            bm.mark(off, len);
            m.mark(off, len);
        }
        for (off, len) in q {
            let got = bm.extents(off, len);
            prop_assert_eq!(&got, &m.extents(off, len));
            // Clipped: the runs cover exactly the part of the range inside
            // the disk, never cross it, and alternate in state.
            let want: u64 = if off >= size { 0 } else { (off + len).min(size) - off };
            prop_assert_eq!(got.iter().map(|e| e.0).sum::<u64>(), want);
            prop_assert!(got.iter().all(|e| e.0 > 0));
            prop_assert!(got.windows(2).all(|w| w[0].1 != w[1].1));
            // A cap keeps a prefix of the same answer.
            let capped = bm.extents_capped(off, len, 2);
            prop_assert_eq!(&capped[..], &got[..got.len().min(2)]);
        }
    }

    #[test]
    fn serialization_round_trips(((size, gran), seq) in geometry().prop_flat_map(|(s, g)| (Just((s, g)), ops(s)))) {
        let bm = DirtyBitmap::new(size, gran).unwrap();
        let mut m = Model::new(size, gran);
        for (off, len) in seq {
            bm.mark(off, len);
            m.mark(off, len);
        }
        let bytes = bm.to_bytes();
        let back = DirtyBitmap::from_bytes(size, gran, &bytes).unwrap();
        check_equal(&back, &m);
        // Another geometry must refuse the bytes (unless lengths agree by
        // chance, which the trailing-bit check may still catch).
        if !bytes.is_empty() {
            prop_assert!(DirtyBitmap::from_bytes(size, gran, &bytes[1..]).is_err());
        }
    }

    #[test]
    fn merge_is_union(
        ((size, gran), a, b, other_shift) in geometry().prop_flat_map(|(s, g)| (Just((s, g)), ops(s), ops(s), 12u32..=17))
    ) {
        let x = DirtyBitmap::new(size, gran).unwrap();
        let y = DirtyBitmap::new(size, 1 << other_shift).unwrap();
        let mut m = Model::new(size, gran);
        for (off, len) in a {
            x.mark(off, len);
            m.mark(off, len);
        }
        for (off, len) in b {
            y.mark(off, len);
            // Merging rounds y's granules outwards to x's granularity.
            if len > 0 && off < size {
                let yg = 1u64 << other_shift;
                let s = off / yg * yg;
                let e = ((off + len).min(size)).div_ceil(yg) * yg;
                m.mark(s, e - s);
            }
        }
        x.merge(&y).unwrap();
        check_equal(&x, &m);
    }

    #[test]
    fn take_commit_and_abort_follow_model(
        ((size, gran), before, during, abort) in geometry().prop_flat_map(|(s, g)| (Just((s, g)), ops(s), ops(s), any::<bool>()))
    ) {
        let bm = Arc::new(DirtyBitmap::new(size, gran).unwrap());
        let mut m = Model::new(size, gran);
        for (off, len) in before {
            bm.mark(off, len);
            m.mark(off, len);
        }
        let taken = bm.take().unwrap();
        prop_assert_eq!(taken.dirty_ranges().collect::<Vec<_>>(), m.ranges());
        prop_assert_eq!(taken.dirty_bytes(), m.dirty_bytes());
        prop_assert_eq!(bm.dirty_bytes(), 0);
        prop_assert!(matches!(bm.take(), Err(BitmapError::TakeOutstanding)));
        let mut live = Model::new(size, gran);
        for (off, len) in during {
            bm.mark(off, len);
            live.mark(off, len);
        }
        // Persisted view = live | taken while the take is outstanding.
        let mut union = live.clone();
        union.set.extend(m.set.iter().copied());
        let persisted = DirtyBitmap::from_bytes(size, gran, &bm.to_bytes()).unwrap();
        check_equal(&persisted, &union);
        if abort {
            drop(taken);
            check_equal(&bm, &union);
        } else {
            taken.commit();
            check_equal(&bm, &live);
        }
        prop_assert!(!bm.take_outstanding());
    }
}

#[test]
fn granularity_limits() {
    for g in [0, 1, 2048, 4095, 4097, 3 << 12, 128 << 20] {
        assert!(
            matches!(
                DirtyBitmap::new(1 << 20, g),
                Err(BitmapError::Granularity { .. })
            ),
            "{g}"
        );
    }
    for g in [4096, 65536, 64 << 20] {
        DirtyBitmap::new(1 << 30, g).unwrap();
    }
    // 2^31 granules is the limit; one more granule is refused without
    // allocating anything.
    assert!(matches!(
        DirtyBitmap::new((1u64 << 31) * 4096 + 1, 4096),
        Err(BitmapError::TooLarge { .. })
    ));
    assert!(matches!(
        DirtyBitmap::new(u64::MAX, 4096),
        Err(BitmapError::TooLarge { .. })
    ));
    assert_eq!(words_for((1u64 << 31) * 4096, 4096).unwrap(), 1 << 25);
}

#[test]
fn trailing_bits_are_rejected() {
    // 3 granules: bits 3..63 of the only word must be clear.
    let mut bytes = vec![0u8; 8];
    bytes[0] = 0b1000;
    assert!(matches!(
        DirtyBitmap::from_bytes(3 * 4096, 4096, &bytes),
        Err(BitmapError::TrailingBits)
    ));
    bytes[0] = 0b0111;
    let bm = DirtyBitmap::from_bytes(3 * 4096, 4096, &bytes).unwrap();
    assert_eq!(bm.dirty_bytes(), 3 * 4096);
}

#[test]
fn clear_forgets_outstanding_take() {
    let bm = Arc::new(DirtyBitmap::new(1 << 20, 4096).unwrap());
    bm.mark(0, 4096);
    let t = bm.take().unwrap();
    bm.clear();
    assert!(!bm.take_outstanding());
    bm.mark(8192, 1);
    let t2 = bm.take().unwrap();
    // The stale guard must neither merge back nor drop t2's pending bits.
    drop(t);
    assert!(!bm.is_dirty(0));
    assert!(bm.take_outstanding());
    assert_eq!(bm.to_bytes()[0], 0b100);
    t2.commit();
    assert_eq!(bm.dirty_bytes(), 0);
}

#[test]
fn partial_last_granule_counts_only_disk_bytes() {
    let bm = DirtyBitmap::new(10_000, 4096).unwrap();
    bm.mark(9_999, 100);
    assert_eq!(bm.dirty_bytes(), 10_000 - 8192);
    assert_eq!(
        bm.extents(0, 20_000),
        vec![(8192, false), (10_000 - 8192, true)]
    );
    assert_eq!(
        bm.dirty_ranges().collect::<Vec<_>>(),
        vec![(8192, 10_000 - 8192)]
    );
}
