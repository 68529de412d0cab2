use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::time::Duration;

use super::recovery::sidecar;
use super::*;
use crate::format::SLOT_SIZE;

const MIB: u64 = 1 << 20;

fn opts(extent: u64) -> StoreOptions {
    StoreOptions {
        intent_extent_size: extent,
        ..StoreOptions::default()
    }
}

fn image(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("disk.img")
}

fn write(store: &BitmapStore, off: u64, len: u64) {
    store.begin_write(off, len).unwrap().complete();
}

/// Counts calls per fault point and fires once a chosen point has been
/// reached `n` times; from then on every point fails (the process is dead:
/// nothing more reaches the disk).
#[derive(Default)]
struct Crasher {
    counts: Mutex<HashMap<FaultPoint, u32>>,
    target: Option<(FaultPoint, u32)>,
    fired: AtomicBool,
}

impl Crasher {
    fn hook(self: &Arc<Self>) -> FaultHook {
        let me = Arc::clone(self);
        Arc::new(move |p| {
            if me.fired.load(Ordering::SeqCst) {
                return true;
            }
            let mut c = me.counts.lock();
            let n = c.entry(p).or_default();
            *n += 1;
            if me.target == Some((p, *n)) {
                me.fired.store(true, Ordering::SeqCst);
                return true;
            }
            false
        })
    }

    fn count(&self, p: FaultPoint) -> u32 {
        self.counts.lock().get(&p).copied().unwrap_or(0)
    }
}

#[test]
fn configuration_and_listing() {
    let s = BitmapStore::in_memory(100 * MIB);
    s.add("a", 65536).unwrap();
    s.add("b", 4096).unwrap();
    assert!(matches!(s.add("a", 65536), Err(StoreError::Exists { .. })));
    assert!(matches!(
        s.add("", 65536),
        Err(StoreError::InvalidName { .. })
    ));
    assert!(matches!(
        s.add("x\0", 65536),
        Err(StoreError::InvalidName { .. })
    ));
    assert!(matches!(s.add("c", 1000), Err(StoreError::Create { .. })));
    assert!(matches!(s.remove("zz"), Err(StoreError::NotFound { .. })));
    s.disable("b").unwrap();
    write(&s, 4096 * 3, 10);
    let l = s.list();
    assert_eq!(l.len(), 2);
    assert_eq!(
        (l[0].name.as_str(), l[0].dirty_bytes, l[0].enabled),
        ("a", 65536, true)
    );
    assert_eq!(
        (l[1].name.as_str(), l[1].dirty_bytes, l[1].enabled),
        ("b", 0, false)
    );
    s.enable("b").unwrap();
    write(&s, 4096 * 3, 10);
    assert_eq!(s.get("b").unwrap().dirty_bytes(), 4096);
    assert_eq!(
        s.dirty_extents("b", 0, 5 * 4096).unwrap(),
        vec![(3 * 4096, false), (4096, true), (4096, false)]
    );
    assert!(s.dirty_extents("nope", 0, 1).is_none());
    s.clear("a").unwrap();
    assert_eq!(s.get("a").unwrap().dirty_bytes(), 0);
    s.remove("a").unwrap();
    assert_eq!(s.list().len(), 1);
    for i in 1..MAX_BITMAPS {
        s.add(&format!("n{i}"), 65536).unwrap();
    }
    assert!(matches!(
        s.add("one-too-many", 65536),
        Err(StoreError::TooMany)
    ));
    s.close().unwrap();
    assert!(matches!(s.begin_write(0, 1), Err(StoreError::Closed)));
    assert!(matches!(s.add("late", 65536), Err(StoreError::Closed)));
}

#[test]
fn clean_close_round_trips_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir);
    {
        let s = BitmapStore::open(&img, 64 * MIB + 123, opts(MIB)).unwrap();
        s.add("a", 65536).unwrap();
        s.add("b", 4096).unwrap();
        s.disable("b").unwrap();
        write(&s, 10 * MIB + 5, 70_000);
        write(&s, 64 * MIB + 100, 1000); // the partial last granule
        s.close().unwrap();
    }
    let s = BitmapStore::open(&img, 64 * MIB + 123, opts(MIB)).unwrap();
    let l = s.list();
    assert_eq!(l.len(), 2);
    assert!(l.iter().all(|b| !b.recovered));
    assert!(!l[1].enabled);
    let a = s.get("a").unwrap();
    assert_eq!(
        a.dirty_ranges().collect::<Vec<_>>(),
        vec![(10 * MIB, 2 * 65536), (64 * MIB, 123)]
    );
    assert_eq!(s.get("b").unwrap().dirty_bytes(), 0);
    // A clean reopen leaves nothing armed.
    assert_eq!(s.armed_extents(), 0);
}

#[test]
fn unclean_stop_marks_armed_extents_only() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir);
    {
        let s = BitmapStore::open(&img, 64 * MIB, opts(MIB)).unwrap();
        s.add("a", 65536).unwrap();
        s.add("off", 65536).unwrap();
        s.disable("off").unwrap();
        write(&s, 3 * MIB + 4096, 1);
        s.persist().unwrap();
        write(&s, 7 * MIB, 65536);
        // Crash: in-flight write never completed.
        std::mem::forget(s.begin_write(20 * MIB + 1, 1).unwrap());
        drop(s);
    }
    let s = BitmapStore::open(&img, 64 * MIB, opts(MIB)).unwrap();
    let a = s.get("a").unwrap();
    // Snapshot bit (exact) + both armed extents (whole).
    assert_eq!(
        a.dirty_ranges().collect::<Vec<_>>(),
        vec![(3 * MIB, 65536), (7 * MIB, MIB), (20 * MIB, MIB)]
    );
    let l = s.list();
    assert!(l[0].recovered);
    // Disabled bitmaps are not completed from the intent log.
    assert_eq!(l[1].dirty_bytes, 0);
    assert!(!l[1].recovered);
    // Recovery was made durable: another crash right away loses nothing
    // and adds nothing.
    drop(s);
    let s = BitmapStore::open(&img, 64 * MIB, opts(MIB)).unwrap();
    assert_eq!(s.get("a").unwrap().dirty_bytes(), 65536 + 2 * MIB);
    // Clearing drops the recovered flag.
    s.clear("a").unwrap();
    assert!(!s.list()[0].recovered);
}

#[test]
fn armed_extents_cost_no_io_and_persist_retires_them() {
    let dir = tempfile::tempdir().unwrap();
    let c = Arc::new(Crasher::default());
    let s = BitmapStore::open(
        &image(&dir),
        64 * MIB,
        StoreOptions {
            intent_extent_size: MIB,
            armed_soft_cap: 2,
            fault_hook: Some(c.hook()),
        },
    )
    .unwrap();
    s.add("a", 65536).unwrap();
    let base = c.count(FaultPoint::IntentWrite);
    write(&s, 0, 4096);
    assert_eq!(c.count(FaultPoint::IntentWrite), base + 1);
    for i in 0..100 {
        write(&s, i * 8192, 4096);
    }
    assert_eq!(
        c.count(FaultPoint::IntentWrite),
        base + 1,
        "armed extent re-armed"
    );
    // One write over three extents arms the two new ones with one record.
    write(&s, MIB - 1, MIB + 2);
    assert_eq!(c.count(FaultPoint::IntentWrite), base + 2);
    assert_eq!(s.armed_extents(), 3);
    assert!(s.needs_persist());
    s.persist().unwrap();
    assert_eq!(s.armed_extents(), 0);
    assert!(!s.needs_persist());
    write(&s, 0, 1);
    assert_eq!(c.count(FaultPoint::IntentWrite), base + 3);
    assert!(c.count(FaultPoint::RetireWrite) >= 1);
}

#[test]
fn outstanding_take_survives_a_crash_and_commit_drops_bits() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir);
    {
        let s = BitmapStore::open(&img, 64 * MIB, opts(MIB)).unwrap();
        s.add("m", 65536).unwrap();
        write(&s, 5 * MIB, 1);
        s.persist().unwrap();
        let t = s.take("m").unwrap();
        assert!(t.is_dirty(5 * MIB));
        assert!(matches!(s.take("m"), Err(StoreError::Take { .. })));
        assert!(s.list()[0].taken);
        // The snapshot taken now must still hold the taken bits.
        s.persist().unwrap();
        std::mem::forget(t);
        drop(s);
    }
    {
        let s = BitmapStore::open(&img, 64 * MIB, opts(MIB)).unwrap();
        assert!(s.get("m").unwrap().is_dirty(5 * MIB));
        let t = s.take("m").unwrap();
        t.commit();
        s.close().unwrap();
    }
    let s = BitmapStore::open(&img, 64 * MIB, opts(MIB)).unwrap();
    assert_eq!(s.get("m").unwrap().dirty_bytes(), 0);
}

#[test]
fn second_open_is_refused_while_locked() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir);
    let s = BitmapStore::open(&img, 64 * MIB, opts(MIB)).unwrap();
    assert!(matches!(
        BitmapStore::open(&img, 64 * MIB, opts(MIB)),
        Err(StoreError::Locked { .. })
    ));
    s.close().unwrap();
    drop(s);
    BitmapStore::open(&img, 64 * MIB, opts(MIB)).unwrap();
}

#[test]
fn other_image_size_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir);
    let s = BitmapStore::open(&img, 64 * MIB, opts(MIB)).unwrap();
    s.add("a", 65536).unwrap();
    s.close().unwrap();
    drop(s);
    let e = BitmapStore::open(&img, 128 * MIB, opts(MIB)).unwrap_err();
    assert!(
        matches!(e, StoreError::SizeMismatch { recorded, actual, .. } if recorded == 64 * MIB && actual == 128 * MIB),
        "{e}"
    );
    assert!(e.to_string().contains("resized"));
}

#[test]
fn bad_options_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for ext in [0, 1000, 2048, 3 * MIB] {
        assert!(matches!(
            BitmapStore::open(&image(&dir), 64 * MIB, opts(ext)),
            Err(StoreError::Options { .. })
        ));
    }
    // Too many extents for the record.
    assert!(matches!(
        BitmapStore::open(&image(&dir), 1 << 40, opts(4096)),
        Err(StoreError::Options { .. })
    ));
}

fn corrupt_byte(path: &Path, at: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, at).unwrap();
}

fn setup_two_bitmaps(img: &Path) {
    let s = BitmapStore::open(img, 64 * MIB, opts(MIB)).unwrap();
    s.add("a", 65536).unwrap();
    s.add("b", 4096).unwrap();
    s.disable("b").unwrap();
    write(&s, 0, 1);
    s.close().unwrap();
}

#[test]
fn corrupt_or_missing_snapshot_makes_listed_bitmaps_wholly_dirty() {
    for damage in ["header", "data", "missing", "truncated"] {
        let dir = tempfile::tempdir().unwrap();
        let img = image(&dir);
        setup_two_bitmaps(&img);
        let snap = sidecar(&img, ".bitmaps");
        let len = fs::metadata(&snap).unwrap().len();
        match damage {
            "header" => corrupt_byte(&snap, 20),
            "data" => corrupt_byte(&snap, len - 1),
            "missing" => fs::remove_file(&snap).unwrap(),
            _ => OpenOptions::new()
                .write(true)
                .open(&snap)
                .unwrap()
                .set_len(len - 8)
                .unwrap(),
        }
        let s = BitmapStore::open(&img, 64 * MIB, opts(MIB)).unwrap();
        let l = s.list();
        assert_eq!(l.len(), 2, "{damage}");
        let b = &l[1];
        if damage == "data" {
            // Only "b" (the last data) is hit; "a" is intact.
            assert_eq!(l[0].dirty_bytes, 65536, "{damage}");
            assert!(!l[0].recovered);
        } else {
            assert_eq!(l[0].dirty_bytes, 64 * MIB, "{damage}");
            assert!(l[0].recovered);
        }
        assert_eq!(b.dirty_bytes, 64 * MIB, "{damage}");
        assert!(b.recovered && !b.enabled, "{damage}");
    }
}

#[test]
fn corrupt_snapshot_without_intent_log_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir);
    setup_two_bitmaps(&img);
    corrupt_byte(&sidecar(&img, ".bitmaps"), 3);
    fs::remove_file(sidecar(&img, ".bitmaps-intent")).unwrap();
    let e = BitmapStore::open(&img, 64 * MIB, opts(MIB)).unwrap_err();
    assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("move it aside"));
}

#[test]
fn lost_intent_log_after_unclean_stop_dirties_everything() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir);
    {
        let s = BitmapStore::open(&img, 64 * MIB, opts(MIB)).unwrap();
        s.add("a", 65536).unwrap();
        write(&s, 0, 1);
        drop(s);
    }
    fs::remove_file(sidecar(&img, ".bitmaps-intent")).unwrap();
    let s = BitmapStore::open(&img, 64 * MIB, opts(MIB)).unwrap();
    assert_eq!(s.get("a").unwrap().dirty_bytes(), 64 * MIB);
    assert!(s.list()[0].recovered);

    // Both intent slots torn: same.
    drop(s);
    let ip = sidecar(&img, ".bitmaps-intent");
    corrupt_byte(&ip, 10);
    corrupt_byte(&ip, SLOT_SIZE as u64 + 10);
    let s = BitmapStore::open(&img, 64 * MIB, opts(MIB)).unwrap();
    assert_eq!(s.get("a").unwrap().dirty_bytes(), 64 * MIB);
}

// ---------------------------------------------------------------------
// Crash at every step of the protocol.

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const SIZE: u64 = 32 * MIB + 4096 * 3;
const BITMAPS: [(&str, u64); 3] = [("a", 65536), ("b", 4096), ("c", MIB)];

#[derive(Default, Debug)]
struct ModelBitmap {
    enabled: bool,
    /// Byte ranges that must be dirty after recovery.
    required: Vec<(u64, u64)>,
    taken: Option<Vec<(u64, u64)>>,
}

/// Run a random scenario against a store, stopping at the first failed
/// operation (the injected crash) or, with `crash_mid_write`, at a random
/// write left in flight. Returns the model and every range ever
/// written (for the over-mark bound).
fn run_scenario(
    store: &BitmapStore,
    seed: u64,
    ops: usize,
    crashed: &dyn Fn() -> bool,
    crash_mid_write: bool,
) -> (BTreeMap<&'static str, ModelBitmap>, Vec<(u64, u64)>) {
    let mut rng = Rng(seed | 1);
    let mut model: BTreeMap<&str, ModelBitmap> = BTreeMap::new();
    let mut takens: HashMap<&str, Taken> = HashMap::new();
    let mut written = Vec::new();
    for (name, g) in BITMAPS {
        if store.add(name, g).is_err() {
            return (model, written);
        }
        model.insert(
            name,
            ModelBitmap {
                enabled: true,
                ..Default::default()
            },
        );
    }
    for _ in 0..ops {
        let name = BITMAPS[rng.below(3) as usize].0;
        let ok = match rng.below(20) {
            0..=11 => {
                let off = rng.below(SIZE + MIB);
                let max = if rng.below(4) == 0 { 3 * MIB } else { 70_000 };
                let len = 1 + rng.below(max);
                // Attempted writes may arm extents even when they fail.
                written.push((off, len));
                match store.begin_write(off, len) {
                    Ok(g) => {
                        for m in model.values_mut().filter(|m| m.enabled) {
                            m.required.push((off, len));
                        }
                        if crash_mid_write && rng.below(40) == 0 {
                            // Crash in the middle of the data write.
                            std::mem::forget(g);
                            return (model, written);
                        }
                        g.complete();
                        true
                    }
                    Err(_) => false,
                }
            }
            12 | 13 => store.persist().is_ok(),
            14 => {
                if takens.contains_key(name) {
                    true
                } else {
                    match store.take(name) {
                        Ok(t) => {
                            let m = model.get_mut(name).unwrap();
                            m.taken = Some(std::mem::take(&mut m.required));
                            takens.insert(name, t);
                            true
                        }
                        Err(_) => false,
                    }
                }
            }
            15 => {
                if let Some(t) = takens.remove(name) {
                    let m = model.get_mut(name).unwrap();
                    if rng.below(2) == 0 {
                        t.commit();
                        m.taken = None;
                    } else {
                        drop(t);
                        let back = m.taken.take().unwrap();
                        m.required.extend(back);
                    }
                }
                true
            }
            16 => {
                // Once asked for, a clear may or may not be durable after a
                // crash; either is correct, so nothing stays required.
                let r = store.clear(name);
                let m = model.get_mut(name).unwrap();
                m.required.clear();
                m.taken = None;
                takens.remove(name);
                r.is_ok()
            }
            17 => {
                let r = store.disable(name);
                model.get_mut(name).unwrap().enabled = false;
                r.is_ok()
            }
            _ => {
                let r = store.enable(name);
                // Only once it is durable may writes be required in it.
                if r.is_ok() {
                    model.get_mut(name).unwrap().enabled = true;
                }
                r.is_ok()
            }
        };
        if !ok || crashed() {
            break;
        }
    }
    // Outstanding takes die with the process.
    for (_, t) in takens {
        std::mem::forget(t);
    }
    (model, written)
}

/// Check a reopened store against the model: nothing required is clean, and
/// nothing outside an extent that was ever written is dirty.
fn check_recovered(
    store: &BitmapStore,
    model: &BTreeMap<&str, ModelBitmap>,
    written: &[(u64, u64)],
    ctx: &str,
) {
    let ext = MIB;
    let mut touched = BTreeSet::new();
    for &(off, len) in written {
        if off >= SIZE {
            continue;
        }
        let end = (off + len).min(SIZE);
        for e in off / ext..=(end - 1) / ext {
            touched.insert(e);
        }
    }
    for (name, m) in model {
        let b = store
            .get(name)
            .unwrap_or_else(|| panic!("{ctx}: bitmap {name} lost"));
        let g = b.granularity();
        for &(off, len) in m.required.iter().chain(m.taken.iter().flatten()) {
            if off >= SIZE {
                continue;
            }
            let end = (off + len).min(SIZE);
            let mut p = off / g * g;
            while p < end {
                assert!(
                    b.is_dirty(p),
                    "{ctx}: bitmap {name} lost write {off}+{len} at {p}"
                );
                p += g;
            }
        }
        for (off, len) in b.dirty_ranges() {
            let (first, last) = (off / ext, (off + len - 1) / ext);
            // Granules coarser than an extent may straddle; compare at the
            // coarser of the two.
            let unit = (g / ext).max(1);
            for e in first..=last {
                let lo = e / unit * unit;
                assert!(
                    (lo..lo + unit).any(|x| touched.contains(&x)),
                    "{ctx}: bitmap {name} over-marks extent {e} that was never written"
                );
            }
        }
    }
}

fn crash_run(point: Option<(FaultPoint, u32)>, seed: u64) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir);
    let c = Arc::new(Crasher {
        target: point,
        ..Default::default()
    });
    let ctx = format!("crash at {point:?} seed {seed}");
    let (model, written) = {
        let s = match BitmapStore::open(
            &img,
            SIZE,
            StoreOptions {
                intent_extent_size: MIB,
                armed_soft_cap: 4,
                fault_hook: Some(c.hook()),
            },
        ) {
            Ok(s) => s,
            // Crashed while creating the store: nothing was promised.
            Err(_) => return true,
        };
        let crashed = || c.fired.load(Ordering::SeqCst);
        let r = run_scenario(&s, seed, 120, &crashed, point.is_none());
        drop(s);
        r
    };
    let s = BitmapStore::open(&img, SIZE, opts(MIB)).unwrap_or_else(|e| panic!("{ctx}: {e}"));
    check_recovered(&s, &model, &written, &ctx);
    c.fired.load(Ordering::SeqCst)
}

#[test]
fn crash_at_every_step_never_under_marks() {
    let mut missed = Vec::new();
    for point in FaultPoint::ALL {
        for n in [1, 2, 4, 9] {
            for seed in [0x9e37_79b9, 0x1234_5678_9abc] {
                if !crash_run(Some((point, n)), seed + u64::from(n)) {
                    missed.push((point, n));
                }
            }
        }
    }
    // Every step must actually be reached (at least its first occurrences),
    // or the test proves little.
    for point in FaultPoint::ALL {
        assert!(
            !missed.contains(&(point, 1)) && !missed.contains(&(point, 2)),
            "{point:?} never reached; missed: {missed:?}"
        );
    }
    assert!(
        missed.len() <= 4,
        "too many crash points not reached: {missed:?}"
    );
}

#[test]
fn crash_in_the_middle_of_a_write_never_under_marks() {
    for seed in 1..12u64 {
        assert!(!crash_run(None, seed * 7919));
    }
}

/// Injected I/O errors (not crashes): the store keeps running after a
/// persist fails at any step, and a later crash still loses nothing.
#[test]
fn failed_persists_leave_the_store_safe() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir);
    // Index into FaultPoint::ALL of the step that fails; usize::MAX: none.
    let failing = Arc::new(AtomicUsize::new(usize::MAX));
    let f2 = Arc::clone(&failing);
    let hook: FaultHook =
        Arc::new(move |p| FaultPoint::ALL.get(f2.load(Ordering::SeqCst)) == Some(&p));
    let s = BitmapStore::open(
        &img,
        SIZE,
        StoreOptions {
            intent_extent_size: MIB,
            armed_soft_cap: 4,
            fault_hook: Some(hook),
        },
    )
    .unwrap();
    s.add("a", 65536).unwrap();
    write(&s, 0, 1);
    let persist_steps = 3..FaultPoint::ALL.len();
    for (i, step) in persist_steps.clone().chain(persist_steps).enumerate() {
        failing.store(step, Ordering::SeqCst);
        assert!(s.persist().is_err(), "{:?}", FaultPoint::ALL[step]);
        failing.store(usize::MAX, Ordering::SeqCst);
        write(&s, (i as u64 + 1) * MIB + 7, 1);
    }
    // A failed arm refuses the write.
    for step in 0..3 {
        failing.store(step, Ordering::SeqCst);
        assert!(matches!(
            s.begin_write(25 * MIB + step as u64 * MIB, 1),
            Err(StoreError::Arm { .. })
        ));
    }
    failing.store(usize::MAX, Ordering::SeqCst);
    write(&s, 31 * MIB, 1);
    drop(s);
    let s = BitmapStore::open(&img, SIZE, opts(MIB)).unwrap();
    let a = s.get("a").unwrap();
    assert!(a.is_dirty(0));
    for i in 1..=14 {
        assert!(a.is_dirty(i * MIB + 7), "extent {i}");
    }
    assert!(a.is_dirty(31 * MIB));
}

/// Writers, a persister and a taker race while a crash is injected at a
/// random step; every write whose `begin_write` succeeded must be dirty
/// after reopening.
#[test]
fn concurrent_crash_never_under_marks() {
    for round in 0..6u64 {
        let dir = tempfile::tempdir().unwrap();
        let img = image(&dir);
        let point = FaultPoint::ALL[(round as usize * 3) % FaultPoint::ALL.len()];
        let c = Arc::new(Crasher {
            target: Some((point, 3 + round as u32)),
            ..Default::default()
        });
        let s = Arc::new(
            BitmapStore::open(
                &img,
                SIZE,
                StoreOptions {
                    intent_extent_size: MIB,
                    armed_soft_cap: 3,
                    fault_hook: Some(c.hook()),
                },
            )
            .unwrap(),
        );
        s.add("a", 65536).unwrap();
        s.add("t", 4096).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..3)
            .map(|t| {
                let (s, stop) = (Arc::clone(&s), Arc::clone(&stop));
                std::thread::spawn(move || {
                    let mut rng = Rng(0xabcdef + t * 977 + round);
                    let mut done = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let off = rng.below(SIZE);
                        let len = 1 + rng.below(200_000);
                        if let Ok(g) = s.begin_write(off, len) {
                            done.push((off, len));
                            g.complete();
                        }
                    }
                    done
                })
            })
            .collect();
        let persister = {
            let (s, stop) = (Arc::clone(&s), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = s.persist();
                    // Takes that are always aborted must lose nothing.
                    if let Ok(t) = s.take("t") {
                        std::thread::yield_now();
                        drop(t);
                    }
                }
            })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while !c.fired.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        // Writes after the crash keep being recorded until the threads
        // stop; those that passed begin_write are covered too (their
        // extents were armed before the crash).
        stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for w in writers {
            all.extend(w.join().unwrap());
        }
        persister.join().unwrap();
        assert!(
            c.fired.load(Ordering::SeqCst),
            "round {round}: {point:?} never reached"
        );
        drop(s);
        let s = BitmapStore::open(&img, SIZE, opts(MIB)).unwrap();
        for name in ["a", "t"] {
            let b = s.get(name).unwrap();
            for &(off, len) in &all {
                let end = (off + len).min(SIZE);
                let g = b.granularity();
                let mut p = off / g * g;
                while p < end {
                    assert!(
                        b.is_dirty(p),
                        "round {round} {point:?}: {name} lost {off}+{len}"
                    );
                    p += g;
                }
            }
        }
    }
}

#[test]
fn persister_runs_early_when_the_armed_set_passes_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(
        BitmapStore::open(
            &image(&dir),
            64 * MIB,
            StoreOptions {
                intent_extent_size: MIB,
                armed_soft_cap: 2,
                fault_hook: None,
            },
        )
        .unwrap(),
    );
    s.add("a", 65536).unwrap();
    let p = s.spawn_persister(Duration::from_secs(3600)).unwrap();
    write(&s, 0, 1);
    write(&s, MIB, 1);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(s.armed_extents(), 2, "persisted below the cap");
    write(&s, 2 * MIB, 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.armed_extents() != 0 {
        assert!(std::time::Instant::now() < deadline, "persister never woke");
        std::thread::sleep(Duration::from_millis(5));
    }
    p.stop();
    s.close().unwrap();
}

#[test]
fn recovery_uses_the_recorded_extent_size() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir);
    {
        let s = BitmapStore::open(&img, 64 * MIB, opts(4 * MIB)).unwrap();
        s.add("a", 65536).unwrap();
        write(&s, 9 * MIB, 1);
        drop(s);
    }
    // Reopened with smaller extents: the crash is still replayed with the
    // 4 MiB extents that were armed.
    let s = BitmapStore::open(&img, 64 * MIB, opts(MIB)).unwrap();
    assert_eq!(
        s.get("a").unwrap().dirty_ranges().collect::<Vec<_>>(),
        vec![(8 * MIB, 4 * MIB)]
    );
    assert_eq!(s.intent_extent_size(), Some(MIB));
}
