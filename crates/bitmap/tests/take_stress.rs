//! The take-and-reset guarantee under concurrency: writer threads keep a
//! shadow log of what they wrote and when it was acknowledged; a consumer
//! takes repeatedly and copies the harvested blocks to a replica. After each
//! committed round, every write acknowledged before the take began must be
//! in the replica; at the end the replica must equal the source.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use understudy_bitmap::{BitmapStore, DirtyBitmap, StoreOptions, Taken};

const G: u64 = 4096;
const BLOCKS: u64 = 2048;

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// How writers record a write and how the consumer harvests.
trait Tracker: Send + Sync {
    /// Run `data_write` inside the tracking protocol (mark after it).
    fn write(&self, off: u64, len: u64, data_write: &dyn Fn());
    fn take(&self) -> Taken;
}

struct Bare(Arc<DirtyBitmap>);

impl Tracker for Bare {
    fn write(&self, off: u64, len: u64, data_write: &dyn Fn()) {
        data_write();
        self.0.mark(off, len);
    }
    fn take(&self) -> Taken {
        self.0.take().unwrap()
    }
}

struct Store(Arc<BitmapStore>);

impl Tracker for Store {
    fn write(&self, off: u64, len: u64, data_write: &dyn Fn()) {
        let g = self.0.begin_write(off, len).unwrap();
        data_write();
        g.complete();
    }
    fn take(&self) -> Taken {
        self.0.take("m").unwrap()
    }
}

struct Shadow {
    /// Newest version written to each block (the "disk").
    disk: Vec<AtomicU64>,
    /// Newest version acknowledged for each block.
    acked: Vec<AtomicU64>,
    version: AtomicU64,
}

/// Rounds and writes each stress run must reach. The run is bounded by
/// work, not wall time, so a slow or loaded machine (fdatasync-bound intent
/// arming on a shared CI disk) just takes longer; `min` keeps fast machines
/// busy long enough for interleavings to vary, `max` turns a hang into a
/// failure.
const ROUNDS: u64 = 40;
const WRITES: u64 = 2000;

fn stress(tracker: Arc<dyn Tracker>, min: Duration, extra: Option<&(dyn Fn() + Sync)>) {
    let max = Duration::from_secs(120);
    let shadow = Arc::new(Shadow {
        disk: (0..BLOCKS).map(|_| AtomicU64::new(0)).collect(),
        acked: (0..BLOCKS).map(|_| AtomicU64::new(0)).collect(),
        version: AtomicU64::new(0),
    });
    let total = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3u64)
        .map(|t| {
            let (tracker, shadow, stop, total) =
                (tracker.clone(), shadow.clone(), stop.clone(), total.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ ((t + 1) * 0x9e37));
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let b = rng.below(BLOCKS);
                    let len = (1 + rng.below(4)).min(BLOCKS - b);
                    let v = shadow.version.fetch_add(1, Ordering::Relaxed) + 1;
                    tracker.write(b * G, len * G, &|| {
                        for i in b..b + len {
                            shadow.disk[i as usize].fetch_max(v, Ordering::Relaxed);
                        }
                    });
                    // Acknowledge.
                    for i in b..b + len {
                        shadow.acked[i as usize].fetch_max(v, Ordering::Release);
                    }
                    n += 1;
                    total.fetch_add(1, Ordering::Relaxed);
                }
                n
            })
        })
        .collect();

    let mut replica = vec![0u64; BLOCKS as usize];
    let copy = |t: &Taken, replica: &mut Vec<u64>, fraction: u64| {
        for (off, len) in t.dirty_ranges() {
            for b in off / G..(off + len) / G {
                if b % fraction == 0 {
                    let v = shadow.disk[b as usize].load(Ordering::Relaxed);
                    replica[b as usize] = replica[b as usize].max(v);
                }
            }
        }
    };
    let start = Instant::now();
    let mut rounds = 0u64;
    let mut checked = 0u64;
    loop {
        let enough = rounds >= ROUNDS && total.load(Ordering::Relaxed) >= WRITES;
        if (enough && start.elapsed() >= min) || start.elapsed() >= max {
            break;
        }
        rounds += 1;
        let acked_before: Vec<u64> = shadow
            .acked
            .iter()
            .map(|a| a.load(Ordering::Acquire))
            .collect();
        let t = tracker.take();
        if rounds.is_multiple_of(4) {
            // A failed round: copy part, then drop without commit.
            copy(&t, &mut replica, 3);
            drop(t);
            continue;
        }
        copy(&t, &mut replica, 1);
        t.commit();
        for b in 0..BLOCKS as usize {
            assert!(
                replica[b] >= acked_before[b],
                "round {rounds}: block {b} acked v{} before the take but replica has v{}",
                acked_before[b],
                replica[b]
            );
            checked += u64::from(acked_before[b] > 0);
        }
        if let Some(f) = extra {
            f();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let writes: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    let t = tracker.take();
    copy(&t, &mut replica, 1);
    t.commit();
    for (b, (r, d)) in replica.iter().zip(&shadow.disk).enumerate() {
        assert_eq!(
            *r,
            d.load(Ordering::Relaxed),
            "block {b} differs after the final round"
        );
    }
    assert!(
        rounds >= ROUNDS && writes >= WRITES && checked > 0,
        "too little happened in {max:?}: {rounds} rounds, {writes} writes"
    );
}

#[test]
fn take_never_misses_a_write_bare_bitmap() {
    let bm = Arc::new(DirtyBitmap::new(BLOCKS * G, G).unwrap());
    stress(Arc::new(Bare(bm)), Duration::from_millis(1500), None);
}

#[test]
fn take_never_misses_a_write_through_a_persistent_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        BitmapStore::open(
            &dir.path().join("img"),
            BLOCKS * G,
            StoreOptions {
                intent_extent_size: 64 * G,
                armed_soft_cap: 4,
                fault_hook: None,
            },
        )
        .unwrap(),
    );
    store.add("m", G).unwrap();
    store.add("other", 16 * G).unwrap();
    let s2 = store.clone();
    // Persist between rounds as well, racing the writers.
    let persist = move || s2.persist().unwrap();
    stress(
        Arc::new(Store(store.clone())),
        Duration::from_millis(1500),
        Some(&persist),
    );
    store.close().unwrap();
}
