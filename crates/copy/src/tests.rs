//! The engine driven into local sinks.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use understudy_bitmap::DirtyBitmap;
use understudy_block::raw::RawDisk;
use understudy_block::{BlockError, Disk, WriteOpts};

use super::*;

const SIZE: u64 = 8 << 20;
const GRAN: u64 = 64 << 10;

fn disk(dir: &tempfile::TempDir, name: &str) -> Arc<dyn Disk> {
    Arc::new(RawDisk::create(&dir.path().join(name), SIZE).unwrap())
}

fn fill(d: &dyn Disk, off: u64, len: u64, byte: u8) {
    d.write_at(&vec![byte; len as usize], off, WriteOpts::default())
        .unwrap();
}

fn same(a: &dyn Disk, b: &dyn Disk) -> bool {
    let (mut x, mut y) = (vec![0; SIZE as usize], vec![0; SIZE as usize]);
    a.read_at(&mut x, 0).unwrap();
    b.read_at(&mut y, 0).unwrap();
    x == y
}

/// A sink that records what reaches it and passes it on.
#[derive(Debug)]
struct Recorder<S> {
    inner: S,
    writes: Vec<(u64, u64)>,
    zeroes: Vec<(u64, u64)>,
    flushes: u32,
    fail_writes: bool,
}

impl<S> Recorder<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            writes: Vec::new(),
            zeroes: Vec::new(),
            flushes: 0,
            fail_writes: false,
        }
    }
}

fn merged(v: &[(u64, u64)]) -> Vec<(u64, u64)> {
    align_ranges(v, 1, u64::MAX)
}

impl<S: CopySink<Error = BlockError>> CopySink for Recorder<S> {
    type Error = BlockError;
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        if self.fail_writes {
            return Err(BlockError::Backend {
                op: "write",
                reason: "test fault".into(),
            });
        }
        self.writes.push((offset, data.len() as u64));
        self.inner.write(offset, data)
    }
    fn zero(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.zeroes.push((offset, len));
        self.inner.zero(offset, len)
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        self.flushes += 1;
        self.inner.flush()
    }
    fn hashes(&mut self, offset: u64, len: u64, block: u64) -> Result<Vec<BlockHash>, BlockError> {
        self.inner.hashes(offset, len, block)
    }
}

/// Counts events.
#[derive(Debug, Default)]
struct Counts(Mutex<(u64, u64, u64)>);

impl Progress for Counts {
    fn report(&self, e: CopyEvent) {
        let mut c = self.0.lock().unwrap();
        match e {
            CopyEvent::Planned { bytes } => c.0 += bytes,
            CopyEvent::Done { bytes } => c.1 += bytes,
            CopyEvent::Data { bytes } => c.2 += bytes,
        }
    }
}

#[test]
fn bulk_of_a_sparse_disk_copies_exactly_the_allocated_data() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (disk(&dir, "src"), disk(&dir, "dst"));
    fill(&*dst, 3 << 20, 4096, 0xee); // garbage where the source has a hole
    fill(&*src, 0, GRAN, 1);
    fill(&*src, 1 << 20, 2 * GRAN, 2);
    fill(&*src, 5 << 20, GRAN, 3);
    let todo = align_ranges(&allocated(&*src).unwrap(), GRAN, SIZE);
    let progress = Counts::default();
    let mut c = Copier::new(
        &*src,
        Recorder::new(DiskSink::new(dst.clone())),
        &progress,
        CopyOptions::new(1 << 20),
    );
    c.bulk(&todo, true).unwrap();
    c.flush().unwrap();
    let want = vec![(0, GRAN), (1 << 20, 2 * GRAN), (5 << 20, GRAN)];
    assert_eq!(merged(&c.sink().writes), want);
    assert_eq!(c.data_bytes(), 4 * GRAN);
    assert_eq!(*progress.0.lock().unwrap(), (4 * GRAN, 4 * GRAN, 4 * GRAN));
    // Only data went; the hole at 3 MiB was not in the plan.
    let mut b = vec![0; 4096];
    dst.read_at(&mut b, 3 << 20).unwrap();
    assert_eq!(b, vec![0xee; 4096]);
}

#[test]
fn a_mapped_copy_sends_holes_as_zero_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (disk(&dir, "src"), disk(&dir, "dst"));
    fill(&*src, 0, GRAN, 1);
    fill(&*dst, 2 << 20, GRAN, 9);
    let progress = NoProgress;
    let mut c = Copier::new(
        &*src,
        Recorder::new(DiskSink::new(dst.clone())),
        &progress,
        CopyOptions::new(1 << 20),
    );
    c.copy(0, SIZE, true).unwrap();
    assert_eq!(merged(&c.sink().writes), vec![(0, GRAN)]);
    assert_eq!(merged(&c.sink().zeroes), vec![(GRAN, SIZE - GRAN)]);
    assert!(same(&*src, &*dst));
}

#[test]
fn a_round_copies_exactly_what_was_marked() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (disk(&dir, "src"), disk(&dir, "dst"));
    fill(&*src, 0, SIZE, 7);
    let dirty = Arc::new(DirtyBitmap::new(SIZE, GRAN).unwrap());
    dirty.mark(GRAN, 10);
    dirty.mark(4 << 20, 3 * GRAN);
    let mut c = Copier::new(
        &*src,
        Recorder::new(DiskSink::new(dst)),
        &NoProgress,
        CopyOptions::new(1 << 20),
    );
    assert_eq!(c.round(&dirty).unwrap(), 4 * GRAN);
    assert_eq!(
        merged(&c.sink().writes),
        vec![(GRAN, GRAN), (4 << 20, 3 * GRAN)]
    );
    assert_eq!(c.sink().flushes, 1);
    assert_eq!(
        dirty.dirty_bytes(),
        0,
        "a committed round clears what it sent"
    );
}

#[test]
fn a_failed_round_gives_the_bits_back() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (disk(&dir, "src"), disk(&dir, "dst"));
    let dirty = Arc::new(DirtyBitmap::new(SIZE, GRAN).unwrap());
    fill(&*src, 0, GRAN, 7);
    dirty.mark(0, GRAN);
    let mut sink = Recorder::new(DiskSink::new(dst));
    sink.fail_writes = true;
    let mut c = Copier::new(&*src, sink, &NoProgress, CopyOptions::new(1 << 20));
    assert!(matches!(
        c.round(&dirty),
        Err(CopyError::Write { offset: 0, .. })
    ));
    assert_eq!(dirty.dirty_bytes(), GRAN);
}

#[test]
fn hash_resync_sends_only_the_blocks_that_differ() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (disk(&dir, "src"), disk(&dir, "dst"));
    fill(&*src, 0, SIZE, 5);
    fill(&*dst, 0, SIZE, 5);
    fill(&*dst, 3 * GRAN + 100, 10, 6);
    fill(&*src, 100 * GRAN, 1, 8);
    let progress = Counts::default();
    let mut c = Copier::new(
        &*src,
        Recorder::new(DiskSink::new(dst.clone())),
        &progress,
        CopyOptions::new(1 << 20),
    );
    c.hash_resync(GRAN).unwrap();
    assert_eq!(
        merged(&c.sink().writes),
        vec![(3 * GRAN, GRAN), (100 * GRAN, GRAN)]
    );
    assert_eq!(progress.0.lock().unwrap().1, SIZE);
    assert!(same(&*src, &*dst));
}

#[test]
fn verify_detects_a_difference() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (disk(&dir, "src"), disk(&dir, "dst"));
    fill(&*src, 0, 2 * GRAN, 5);
    let mut c = Copier::new(
        &*src,
        DiskSink::new(dst.clone()),
        &NoProgress,
        CopyOptions::new(1 << 20),
    );
    c.copy(0, SIZE, true).unwrap();
    let blocks = SIZE / GRAN;
    assert_eq!(
        c.verify(GRAN).unwrap(),
        Verified {
            blocks,
            mismatched: 0
        }
    );
    fill(&*dst, 7 * GRAN, 1, 1);
    assert_eq!(
        c.verify(GRAN).unwrap(),
        Verified {
            blocks,
            mismatched: 1
        }
    );
}

#[test]
fn cancel_stops_before_the_next_piece() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (disk(&dir, "src"), disk(&dir, "dst"));
    let cancel = AtomicBool::new(true);
    let mut c = Copier::new(
        &*src,
        DiskSink::new(dst),
        &NoProgress,
        CopyOptions::new(1 << 20),
    );
    c.set_cancel(Some(&cancel));
    assert!(matches!(c.copy(0, SIZE, false), Err(CopyError::Cancelled)));
    c.set_cancel(None);
    assert_eq!(c.copy(0, GRAN, false).unwrap(), GRAN);
}

/// A clock that only moves when slept on, recording each sleep.
#[derive(Debug, Clone, Default)]
struct FakeClock(Arc<Mutex<(Duration, Vec<Duration>)>>);

impl Clock for FakeClock {
    fn elapsed(&self) -> Duration {
        self.0.lock().unwrap().0
    }
    fn sleep(&mut self, d: Duration) {
        let mut s = self.0.lock().unwrap();
        s.0 += d;
        s.1.push(d);
    }
}

#[test]
fn throttle_keeps_to_the_rate() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (disk(&dir, "src"), disk(&dir, "dst"));
    let clock = FakeClock::default();
    let rate = 2 << 20;
    let throttle = Throttle::with_clock(Some(rate), Box::new(clock.clone()));
    let mut c = Copier::with_throttle(
        &*src,
        DiskSink::new(dst),
        &NoProgress,
        CopyOptions::new(256 << 10),
        throttle,
    );
    c.copy(0, SIZE, false).unwrap();
    let (elapsed, sleeps) = clock.0.lock().unwrap().clone();
    // 8 MiB at 2 MiB/s: 4 s of (fake) time, one sleep per 256 KiB piece.
    assert_eq!(sleeps.len() as u64, SIZE / (256 << 10));
    assert_eq!(elapsed.as_millis(), 4000);
    // Unlimited: no sleeps at all.
    let clock = FakeClock::default();
    let throttle = Throttle::with_clock(None, Box::new(clock.clone()));
    let mut c = Copier::with_throttle(
        &*src,
        DiskSink::new(disk(&dir, "d2")),
        &NoProgress,
        CopyOptions::new(256 << 10),
        throttle,
    );
    c.copy(0, SIZE, false).unwrap();
    assert!(clock.0.lock().unwrap().1.is_empty());
}

fn model(v: &[(u64, u64)], n: u64) -> Vec<bool> {
    let mut m = vec![false; n as usize];
    for &(o, l) in v {
        for i in o..(o + l).min(n) {
            m[i as usize] = true;
        }
    }
    m
}

fn normalize(v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut v: Vec<_> = v.into_iter().filter(|r| r.1 > 0).collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (o, l) in v {
        match out.last_mut() {
            Some(last) if last.0 + last.1 >= o => last.1 = last.1.max(o + l - last.0),
            _ => out.push((o, l)),
        }
    }
    out
}

proptest! {
    #[test]
    fn subtract_matches_model(a in proptest::collection::vec((0u64..200, 0u64..40), 0..10),
                              b in proptest::collection::vec((0u64..200, 0u64..40), 0..10)) {
        let a = normalize(a);
        let b = normalize(b);
        let got = model(&subtract(&a, &b), 256);
        let ma = model(&a, 256);
        let mb = model(&b, 256);
        let want: Vec<bool> = ma.iter().zip(&mb).map(|(x, y)| *x && !*y).collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn align_covers_and_is_aligned(a in proptest::collection::vec((0u64..950, 1u64..100), 0..10)) {
        let a = normalize(a);
        let al = align_ranges(&a, 16, 1050);
        let ma = model(&a, 1100);
        let mal = model(&al, 1100);
        for i in 0..1100 {
            prop_assert!(!ma[i] || mal[i], "not covered at {}", i);
        }
        for &(o, l) in &al {
            prop_assert_eq!(o % 16, 0);
            prop_assert!((o + l) % 16 == 0 || o + l == 1050);
        }
    }
}
