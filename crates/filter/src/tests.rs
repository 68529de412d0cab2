use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;
use proptest::prelude::*;
use understudy_bitmap::StoreOptions;
use understudy_block::raw::RawDisk;
use understudy_block::{ExtentKind, Format};

use super::*;

const MIB: u64 = 1 << 20;

fn raw(dir: &tempfile::TempDir, size: u64) -> Arc<dyn Disk> {
    Arc::new(RawDisk::create(&dir.path().join("disk.raw"), size).unwrap())
}

/// Granules of `g` bytes covering a range clipped to `size`.
fn granules(off: u64, len: u64, g: u64, size: u64) -> Vec<u64> {
    if len == 0 || off >= size {
        return vec![];
    }
    let end = (off + len).min(size);
    (off / g..=(end - 1) / g).collect()
}

fn dirty_set(store: &BitmapStore, name: &str) -> BTreeSet<u64> {
    let b = store.get(name).unwrap();
    let g = b.granularity();
    b.dirty_ranges()
        .flat_map(|(o, l)| (o / g)..(o + l).div_ceil(g))
        .collect()
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, u64),
    Zero(u64, u64, bool),
    Discard(u64, u64),
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Writes, write-zeroes and discards through the filter over a real raw
    /// file mark exactly the covered granules of every enabled bitmap, none
    /// of a disabled one, and reach the disk unchanged.
    #[test]
    fn marks_exactly_the_covered_granules(ops in prop::collection::vec(
        (0u8..3, 0u64..4 * MIB, 1u64..300_000, any::<bool>()).prop_map(|(k, o, l, u)| match k {
            0 => Op::Write(o, l),
            1 => Op::Zero(o, l, u),
            _ => Op::Discard(o, l),
        }),
        1..25,
    )) {
        let size = 4 * MIB + 1000;
        let dir = tempfile::tempdir().unwrap();
        let inner = raw(&dir, size);
        let store = Arc::new(BitmapStore::in_memory(size));
        store.add("fine", 4096).unwrap();
        store.add("coarse", MIB).unwrap();
        store.add("off", 4096).unwrap();
        store.disable("off").unwrap();
        let f = FilterDisk::new(inner.clone(), store.clone());
        let mut model = vec![0u8; size as usize];
        let mut fine = BTreeSet::new();
        let mut coarse = BTreeSet::new();
        for (i, op) in ops.iter().enumerate() {
            let (off, len) = match *op {
                Op::Write(o, l) | Op::Zero(o, l, _) | Op::Discard(o, l) => (o, l.min(size - o)),
            };
            match *op {
                Op::Write(..) => {
                    let buf = vec![(i as u8) | 1; len as usize];
                    f.write_at(&buf, off, WriteOpts::default()).unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&buf);
                }
                Op::Zero(_, _, unmap) => {
                    let z = ZeroOpts { may_unmap: unmap, ..ZeroOpts::default() };
                    f.write_zeroes(off, len, z).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                Op::Discard(..) => {
                    f.discard(off, len, WriteOpts::default()).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
            }
            fine.extend(granules(off, len, 4096, size));
            coarse.extend(granules(off, len, MIB, size));
        }
        prop_assert_eq!(dirty_set(&store, "fine"), fine);
        prop_assert_eq!(dirty_set(&store, "coarse"), coarse);
        prop_assert!(dirty_set(&store, "off").is_empty());
        let mut back = vec![0u8; size as usize];
        f.read_at(&mut back, 0).unwrap();
        prop_assert!(back == model, "data through the filter differs");
    }
}

/// An in-memory disk that can fail writes and counts pass-through calls.
#[derive(Debug)]
struct MemDisk {
    data: Mutex<Vec<u8>>,
    fail_writes: AtomicBool,
    read_only: bool,
    flushes: AtomicUsize,
    orders: AtomicUsize,
}

impl MemDisk {
    fn new(size: usize) -> Arc<Self> {
        Arc::new(Self {
            data: Mutex::new(vec![0; size]),
            fail_writes: AtomicBool::new(false),
            read_only: false,
            flushes: AtomicUsize::new(0),
            orders: AtomicUsize::new(0),
        })
    }

    fn failure(&self, offset: u64, len: u64) -> Result<()> {
        if self.fail_writes.load(Ordering::SeqCst) {
            // Half written, then an error: what a short write looks like.
            let mut d = self.data.lock();
            let half = (len / 2) as usize;
            d[offset as usize..offset as usize + half].fill(0xEE);
            return Err(BlockError::Write {
                offset,
                len,
                source: io::Error::from_raw_os_error(libc_eio()),
            });
        }
        Ok(())
    }
}

fn libc_eio() -> i32 {
    5
}

impl DiskSize for MemDisk {
    fn size(&self) -> u64 {
        self.data.lock().len() as u64
    }
}

impl DiskRead for MemDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size())?;
        let d = self.data.lock();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
}

impl DiskWrite for MemDisk {
    fn write_at(&self, buf: &[u8], offset: u64, _opts: WriteOpts) -> Result<()> {
        self.failure(offset, buf.len() as u64)?;
        self.data.lock()[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _opts: ZeroOpts) -> Result<()> {
        self.failure(offset, len)?;
        self.data.lock()[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64, opts: WriteOpts) -> Result<()> {
        self.write_zeroes(
            offset,
            len,
            ZeroOpts {
                write: opts,
                ..ZeroOpts::default()
            },
        )
    }

    fn flush(&self) -> Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn order(&self) -> Result<Epoch> {
        Ok(self.orders.fetch_add(1, Ordering::SeqCst) as u64 + 100)
    }
}

impl DiskMap for MemDisk {
    fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        Ok(vec![Extent {
            offset,
            len,
            kind: ExtentKind::Data,
        }])
    }
}

impl Disk for MemDisk {
    fn info(&self) -> DiskInfo {
        DiskInfo {
            format: Format::Raw,
            size: self.size(),
            read_only: self.read_only,
            can_discard: true,
            can_fast_zero: true,
            flush_covers_all_handles: true,
            preferred_block_size: 4096,
        }
    }
}

/// Records calls; refuses when told to.
#[derive(Debug, Default)]
struct Recorder {
    name: &'static str,
    log: Arc<Mutex<Vec<String>>>,
    refuse: AtomicBool,
    next: AtomicU64,
}

impl WriteObserver for Recorder {
    fn before_write(&self, op: &WriteOp<'_>) -> std::result::Result<WriteToken, ObserverError> {
        if self.refuse.load(Ordering::SeqCst) {
            self.log.lock().push(format!("{} refuse", self.name));
            return Err(ObserverError::Refused {
                observer: self.name,
                source: "peer unreachable".into(),
            });
        }
        let t = self.next.fetch_add(1, Ordering::SeqCst) + 7;
        self.log.lock().push(format!(
            "{} before {}+{} t{t}",
            self.name, op.offset, op.len
        ));
        Ok(WriteToken::new(t))
    }

    fn after_write(
        &self,
        op: &WriteOp<'_>,
        token: WriteToken,
        outcome: std::result::Result<(), &BlockError>,
    ) {
        self.log.lock().push(format!(
            "{} after {}+{} t{} {}",
            self.name,
            op.offset,
            op.len,
            token.get(),
            if outcome.is_ok() { "ok" } else { "err" }
        ));
    }
}

#[test]
fn inner_failure_still_marks() {
    let disk = MemDisk::new(MIB as usize);
    let store = Arc::new(BitmapStore::in_memory(MIB));
    store.add("a", 4096).unwrap();
    let f = FilterDisk::new(disk.clone(), store.clone());
    disk.fail_writes.store(true, Ordering::SeqCst);
    assert!(
        f.write_at(&[1; 10_000], 8192, WriteOpts::default())
            .is_err()
    );
    assert!(f.write_zeroes(100_000, 1, ZeroOpts::default()).is_err());
    assert!(f.discard(200_000, 4096, WriteOpts::default()).is_err());
    assert_eq!(
        store.get("a").unwrap().dirty_ranges().collect::<Vec<_>>(),
        vec![(8192, 12288), (98304, 4096), (196_608, 8192)]
    );
}

#[test]
fn out_of_bounds_and_read_only_do_not_mark() {
    let store = Arc::new(BitmapStore::in_memory(MIB));
    store.add("a", 4096).unwrap();
    let f = FilterDisk::new(MemDisk::new(MIB as usize), store.clone());
    assert!(matches!(
        f.write_at(&[1; 10], MIB - 5, WriteOpts::default()),
        Err(BlockError::OutOfBounds { .. })
    ));
    assert!(f.discard(u64::MAX, 2, WriteOpts::default()).is_err());
    let ro = Arc::new(MemDisk {
        read_only: true,
        ..Arc::into_inner(MemDisk::new(MIB as usize)).unwrap()
    });
    let f2 = FilterDisk::new(ro, store.clone());
    assert!(matches!(
        f2.write_at(&[1; 10], 0, WriteOpts::default()),
        Err(BlockError::ReadOnly)
    ));
    assert_eq!(store.get("a").unwrap().dirty_bytes(), 0);
}

#[test]
fn observers_run_in_order_and_unwind_on_refusal() {
    let disk = MemDisk::new(MIB as usize);
    let log = Arc::new(Mutex::new(Vec::new()));
    let a = Arc::new(Recorder {
        name: "a",
        log: log.clone(),
        ..Default::default()
    });
    let b = Arc::new(Recorder {
        name: "b",
        log: log.clone(),
        ..Default::default()
    });
    let f = FilterDisk::with_observers(disk.clone(), vec![a.clone(), b.clone()]);
    f.write_at(&[9; 4], 16, WriteOpts::default()).unwrap();
    assert_eq!(
        *log.lock(),
        vec![
            "a before 16+4 t7",
            "b before 16+4 t7",
            "b after 16+4 t7 ok",
            "a after 16+4 t7 ok"
        ]
    );
    log.lock().clear();
    b.refuse.store(true, Ordering::SeqCst);
    let e = f.write_at(&[9; 4], 32, WriteOpts::default()).unwrap_err();
    // The refusal is chained, not flattened.
    let src = std::error::Error::source(&e).unwrap();
    assert!(src.to_string().contains("refused"), "{src}");
    assert_eq!(
        *log.lock(),
        vec!["a before 32+4 t8", "b refuse", "a after 32+4 t8 err"]
    );
    let mut buf = [0u8; 4];
    disk.read_at(&mut buf, 32).unwrap();
    assert_eq!(buf, [0; 4], "refused write reached the disk");

    // Remove and add at run time.
    let b_dyn: Arc<dyn WriteObserver> = b.clone();
    assert!(f.remove_observer(&b_dyn));
    assert!(!f.remove_observer(&b_dyn));
    assert_eq!(f.observer_count(), 1);
    f.write_at(&[9; 4], 32, WriteOpts::default()).unwrap();
    f.add_observer_first(b_dyn);
    b.refuse.store(false, Ordering::SeqCst);
    log.lock().clear();
    f.discard(0, 8, WriteOpts::default()).unwrap();
    assert_eq!(log.lock()[0], "b before 0+8 t8");
}

/// A refusal after the bitmap observer releases the bitmap store's write
/// slot: a persist afterwards must not hang, and the range is marked.
#[test]
fn refusal_after_bitmaps_releases_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        BitmapStore::open(
            &dir.path().join("img"),
            MIB,
            StoreOptions {
                intent_extent_size: 64 << 10,
                ..StoreOptions::default()
            },
        )
        .unwrap(),
    );
    store.add("a", 4096).unwrap();
    let refuser = Arc::new(Recorder {
        name: "mirror",
        refuse: AtomicBool::new(true),
        ..Default::default()
    });
    let f = FilterDisk::with_observers(
        MemDisk::new(MIB as usize),
        vec![Arc::new(BitmapObserver(store.clone())), refuser],
    );
    assert!(f.write_at(&[1; 100], 4096, WriteOpts::default()).is_err());
    store.persist().unwrap();
    assert!(store.get("a").unwrap().is_dirty(4096));
    store.close().unwrap();
    // After close, the bitmap observer refuses writes.
    let f2 = FilterDisk::new(MemDisk::new(MIB as usize), store.clone());
    let e = f2.write_at(&[1], 0, WriteOpts::default()).unwrap_err();
    assert!(format!("{:?}", e).contains("Closed"), "{e:?}");
}

#[test]
fn reads_map_flush_and_order_pass_through() {
    let disk = MemDisk::new(MIB as usize);
    disk.data.lock()[10] = 42;
    let store = Arc::new(BitmapStore::in_memory(MIB));
    store.add("a", 4096).unwrap();
    let f = FilterDisk::new(disk.clone(), store.clone());
    let mut b = [0u8; 1];
    f.read_at(&mut b, 10).unwrap();
    assert_eq!(b[0], 42);
    f.flush().unwrap();
    assert_eq!(disk.flushes.load(Ordering::SeqCst), 1);
    assert_eq!(f.order().unwrap(), 100);
    assert_eq!(disk.orders.load(Ordering::SeqCst), 1);
    assert_eq!(
        disk.flushes.load(Ordering::SeqCst),
        1,
        "order became a flush"
    );
    assert_eq!(f.map(0, 10).unwrap().len(), 1);
    assert_eq!(f.size(), MIB);
    assert_eq!(f.info(), disk.info());
    assert_eq!(store.get("a").unwrap().dirty_bytes(), 0);
    assert_eq!(
        dirty_extents(&store, "a", 0, 8192).unwrap(),
        vec![(8192, false)]
    );
    assert!(dirty_extents(&store, "nope", 0, 1).is_none());
}

/// Writers stamp versions into blocks of a real raw file through the
/// filter while a consumer takes the bitmap and copies harvested blocks
/// from the disk; persists race too. The replica must equal the disk at
/// the end, and every write acked before a take must be in the replica
/// after that round.
#[test]
fn concurrent_writes_and_takes_lose_nothing() {
    const G: u64 = 4096;
    const BLOCKS: u64 = 512;
    let dir = tempfile::tempdir().unwrap();
    let inner = raw(&dir, BLOCKS * G);
    let store = Arc::new(
        BitmapStore::open(
            &dir.path().join("disk.raw"),
            BLOCKS * G,
            StoreOptions {
                intent_extent_size: 16 * G,
                armed_soft_cap: 4,
                fault_hook: None,
            },
        )
        .unwrap(),
    );
    store.add("mig", G).unwrap();
    store.add("backup", 16 * G).unwrap();
    store.add("x", 64 * G).unwrap();
    let f = Arc::new(FilterDisk::new(inner.clone(), store.clone()));
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..BLOCKS).map(|_| AtomicU64::new(0)).collect());
    let version = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3u64)
        .map(|t| {
            let (f, acked, version, stop) =
                (f.clone(), acked.clone(), version.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (t + 1);
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // One writer per block residue, so versions per block
                    // only grow.
                    let b = (x % (BLOCKS / 3)) * 3 + t;
                    let v = version.fetch_add(1, Ordering::SeqCst) + 1;
                    let mut buf = vec![0u8; G as usize];
                    buf[..8].copy_from_slice(&v.to_le_bytes());
                    f.write_at(&buf, b * G, WriteOpts::default()).unwrap();
                    acked[b as usize].store(v, Ordering::Release);
                    n += 1;
                }
                n
            })
        })
        .collect();
    let read_version = |b: u64| {
        let mut buf = [0u8; 8];
        inner.read_at(&mut buf, b * G).unwrap();
        u64::from_le_bytes(buf)
    };
    let mut replica = vec![0u64; BLOCKS as usize];
    let start = std::time::Instant::now();
    let mut rounds = 0;
    while start.elapsed() < std::time::Duration::from_millis(1200) {
        rounds += 1;
        let before: Vec<u64> = acked.iter().map(|a| a.load(Ordering::Acquire)).collect();
        let t = store.take("mig").unwrap();
        for (off, len) in t.dirty_ranges() {
            for b in off / G..(off + len) / G {
                replica[b as usize] = read_version(b);
            }
        }
        if rounds % 3 == 0 {
            drop(t); // failed round: bits go back
        } else {
            t.commit();
            for (b, (&r, &a)) in replica.iter().zip(&before).enumerate() {
                assert!(r >= a, "round {rounds}: block {b} acked v{a}, replica v{r}");
            }
        }
        if rounds % 5 == 0 {
            store.persist().unwrap();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let writes: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    let t = store.take("mig").unwrap();
    for (off, len) in t.dirty_ranges() {
        for b in off / G..(off + len) / G {
            replica[b as usize] = read_version(b);
        }
    }
    t.commit();
    for (b, &r) in replica.iter().enumerate() {
        assert_eq!(r, read_version(b as u64), "block {b}");
    }
    assert!(
        rounds > 10 && writes > 300,
        "{rounds} rounds, {writes} writes"
    );
    // The other bitmaps saw every written block.
    let backup = store.get("backup").unwrap();
    for b in 0..BLOCKS {
        if read_version(b) != 0 {
            assert!(backup.is_dirty(b * G), "backup missed block {b}");
        }
    }
    store.close().unwrap();
}
