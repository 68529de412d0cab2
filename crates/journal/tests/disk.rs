//! EpochDisk on real files and in-process behaviour: reads through the
//! overlay, recovery from copied files, bad journals, hooks, concurrency,
//! policies, fail-stop.

use std::sync::Arc;
use std::time::{Duration, Instant};

use understudy_block::raw::RawDisk;
use understudy_block::{Disk, DiskRead, DiskWrite, WriteOpts, ZeroOpts};
use understudy_journal::sim::{Failpoint, Rng, SimOp, SimWorld};
use understudy_journal::{
    ClosedEpoch, EpochDisk, EpochWriteKind, FlushPolicy, JournalConfig, JournalError,
};

const SIZE: u64 = 1 << 20;

fn raw(dir: &tempfile::TempDir, name: &str) -> (std::path::PathBuf, Arc<dyn Disk>) {
    let p = dir.path().join(name);
    let d = RawDisk::create(&p, SIZE).expect("create image");
    (p, Arc::new(d))
}

fn ordered_long() -> JournalConfig {
    JournalConfig {
        capacity: 4 << 20,
        policy: FlushPolicy::Ordered {
            interval: Duration::from_secs(3600),
        },
        in_place_min: None,
    }
}

#[test]
fn reads_see_newest_data_through_partial_overlaps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (p, img) = raw(&dir, "a.img");
    let (d, rep) =
        EpochDisk::open_path(img, &EpochDisk::journal_path(&p), ordered_long()).expect("open");
    assert!(!rep.found_journal);
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = Rng(42);
    for i in 0..400u64 {
        let len = 1 + rng.below(20_000);
        let off = rng.below(SIZE - len);
        let (o, l) = (off as usize, len as usize);
        match rng.below(10) {
            0 => {
                d.write_zeroes(off, len, ZeroOpts::default()).expect("zero");
                model[o..o + l].fill(0);
            }
            1 => {
                d.order().expect("order");
            }
            _ => {
                let b: Vec<u8> = (0..len).map(|j| (i * 7 + j) as u8).collect();
                d.write_at(&b, off, WriteOpts::default()).expect("write");
                model[o..o + l].copy_from_slice(&b);
            }
        }
        let rl = 1 + rng.below(30_000);
        let ro = rng.below(SIZE - rl);
        let mut got = vec![0u8; rl as usize];
        d.read_at(&mut got, ro).expect("read");
        assert_eq!(
            got,
            model[ro as usize..(ro + rl) as usize],
            "read {ro}+{rl} after op {i}"
        );
    }
    d.close().expect("close");
    // Everything was applied to the image on close.
    let img = RawDisk::open(&p, true).expect("reopen");
    let mut all = vec![0u8; SIZE as usize];
    img.read_at(&mut all, 0).expect("read");
    assert!(all == model, "image differs after close");
}

#[test]
fn recovery_from_a_copy_taken_while_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (p, img) = raw(&dir, "b.img");
    let jp = EpochDisk::journal_path(&p);
    let (d, _) = EpochDisk::open_path(img, &jp, ordered_long()).expect("open");
    d.write_at(&[1u8; 8192], 0, WriteOpts::default())
        .expect("write");
    d.order().expect("order");
    d.write_at(&[2u8; 4096], 4096, WriteOpts::default())
        .expect("write");
    let synced = d.sync().expect("sync");
    assert_eq!(synced, 2);
    assert_eq!(d.durable_epoch(), 2);
    // Not applied yet (long interval, no pressure): the data is only in the
    // journal. Copy both files as a crash would leave them.
    d.write_at(&[3u8; 4096], 0, WriteOpts::default())
        .expect("write");
    let (cp, cj) = (dir.path().join("c.img"), dir.path().join("c.img.journal"));
    std::fs::copy(&p, &cp).expect("copy image");
    std::fs::copy(&jp, &cj).expect("copy journal");
    drop(d);
    let img2: Arc<dyn Disk> = Arc::new(RawDisk::open(&cp, false).expect("open copy"));
    let (d2, rep) = EpochDisk::open_path(Arc::clone(&img2), &cj, ordered_long()).expect("recover");
    assert!(rep.found_journal);
    assert_eq!(rep.last_epoch, 2, "{rep:?}");
    assert_eq!(rep.replayed_epochs, 2);
    assert_eq!(
        rep.dropped_records, 1,
        "the unordered, unflushed third write is dropped"
    );
    let mut b = vec![0u8; 8192];
    img2.read_at(&mut b, 0).expect("read");
    assert!(b[..4096].iter().all(|&x| x == 1) && b[4096..].iter().all(|&x| x == 2));
    // New epochs continue after the recovered ones.
    d2.write_at(&[9u8; 512], 0, WriteOpts::default())
        .expect("write");
    assert_eq!(d2.order().expect("order"), 3);
}

#[test]
fn bad_journals_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (p, img) = raw(&dir, "d.img");
    let jp = EpochDisk::journal_path(&p);
    std::fs::write(&jp, vec![0xA5u8; 20_000]).expect("write garbage");
    let e = EpochDisk::open_path(Arc::clone(&img), &jp, ordered_long()).expect_err("garbage");
    assert!(matches!(e, JournalError::NoValidHeader), "{e}");
    // A blank header area (crash while creating) is a fresh journal.
    std::fs::write(&jp, vec![0u8; 20_000]).expect("write zeros");
    let (d, rep) = EpochDisk::open_path(Arc::clone(&img), &jp, ordered_long()).expect("blank");
    assert!(!rep.found_journal);
    d.close().expect("close");
    // Wrong image size.
    let other: Arc<dyn Disk> =
        Arc::new(RawDisk::create(&dir.path().join("e.img"), SIZE * 2).expect("create"));
    let e = EpochDisk::open_path(other, &jp, ordered_long()).expect_err("size");
    assert!(matches!(e, JournalError::ImageSizeMismatch { .. }), "{e}");
    // Truncated ring.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&jp)
        .expect("open");
    f.set_len(10_000).expect("truncate");
    let e = EpochDisk::open_path(img, &jp, ordered_long()).expect_err("truncated");
    assert!(matches!(e, JournalError::Truncated { .. }), "{e}");
    // Bad config.
    let e = JournalConfig {
        capacity: 1000,
        ..Default::default()
    }
    .sanitize()
    .expect_err("capacity");
    assert!(e.to_string().contains("multiple of 512"));
}

#[test]
fn hook_sees_durable_epochs_in_order_with_their_data() {
    let w = SimWorld::new();
    let img = w.add_file(vec![0u8; SIZE as usize]);
    let jr = w.add_file(Vec::new());
    let (d, _) = EpochDisk::open(
        Arc::new(w.disk(img)),
        Arc::new(w.file(jr)),
        JournalConfig {
            capacity: 1 << 20,
            ..Default::default()
        },
    )
    .expect("open");
    let seen: Arc<parking_lot::Mutex<Vec<ClosedEpoch>>> = Arc::default();
    let s2 = Arc::clone(&seen);
    d.set_epoch_hook(Some(Arc::new(move |c: &ClosedEpoch| {
        s2.lock().push(c.clone())
    })));
    for e in 1..=20u8 {
        d.write_at(&[e; 1024], u64::from(e) * 4096, WriteOpts::default())
            .expect("write");
        d.discard(0, 512, WriteOpts::default()).expect("discard");
        d.order().expect("order");
    }
    d.sync().expect("sync");
    let seen = seen.lock();
    let epochs: Vec<u64> = seen.iter().map(|c| c.epoch).collect();
    assert_eq!(epochs, (1..=20).collect::<Vec<_>>());
    for c in seen.iter() {
        assert_eq!(c.writes.len(), 2);
        assert_eq!(c.writes[0].offset, c.epoch * 4096);
        match &c.writes[0].kind {
            EpochWriteKind::Data(b) => assert_eq!(b.as_slice(), &[c.epoch as u8; 1024][..]),
            k => panic!("unexpected {k:?}"),
        }
        assert!(matches!(c.writes[1].kind, EpochWriteKind::Discard));
    }
}

#[test]
fn concurrent_writers_orders_and_flushes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (p, img) = raw(&dir, "f.img");
    let cfg = JournalConfig {
        capacity: 256 << 10,
        policy: FlushPolicy::Durable,
        in_place_min: Some(16 << 10),
    };
    let (d, _) = EpochDisk::open_path(img, &EpochDisk::journal_path(&p), cfg).expect("open");
    let d = Arc::new(d);
    let region = SIZE / 4;
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let d = Arc::clone(&d);
            std::thread::spawn(move || {
                let mut rng = Rng(t);
                for i in 0..150u64 {
                    let len = 512 * (1 + rng.below(64));
                    let off = t * region + rng.below((region - len) / 512) * 512;
                    let v = (t * 50 + i % 50) as u8;
                    d.write_at(&vec![v; len as usize], off, WriteOpts::default())
                        .expect("write");
                    let mut back = vec![0u8; len as usize];
                    d.read_at(&mut back, off).expect("read");
                    assert!(back.iter().all(|&x| x == v), "read-your-write");
                    match i % 7 {
                        0 => d.flush().expect("flush"),
                        1 | 2 => {
                            d.order().expect("order");
                        }
                        _ => {}
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    let s = d.stats();
    assert!(s.durable_epoch > 0 && s.journal_used <= 256 << 10, "{s:?}");
    let d = Arc::try_unwrap(d).expect("sole owner");
    d.close().expect("close");
}

#[test]
fn ordered_flush_returns_before_durability_and_timer_catches_up() {
    let w = SimWorld::new();
    let img = w.add_file(vec![0u8; SIZE as usize]);
    let jr = w.add_file(Vec::new());
    let cfg = JournalConfig {
        capacity: 1 << 20,
        policy: FlushPolicy::Ordered {
            // Long enough that a descheduled test thread cannot see the
            // timer fire between the flush and the check below.
            interval: Duration::from_secs(2),
        },
        in_place_min: None,
    };
    let (d, _) = EpochDisk::open(Arc::new(w.disk(img)), Arc::new(w.file(jr)), cfg).expect("open");
    d.write_at(&[1u8; 4096], 0, WriteOpts::default())
        .expect("write");
    let t = Instant::now();
    d.flush().expect("flush");
    assert_eq!(
        d.durable_epoch(),
        0,
        "ordered flush must not wait for durability"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.durable_epoch() < 1 {
        assert!(
            Instant::now() < deadline,
            "timer never made the epoch durable"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(t.elapsed() >= Duration::from_millis(500));
    // FUA makes its write durable at once, whatever the policy.
    d.write_at(&[2u8; 4096], 0, WriteOpts::fua()).expect("fua");
    assert_eq!(d.durable_epoch(), 2);
}

#[test]
fn an_io_error_stops_the_disk_instead_of_losing_writes() {
    let w = SimWorld::new();
    let img = w.add_file(vec![0u8; SIZE as usize]);
    let jr = w.add_file(Vec::new());
    let (d, _) = EpochDisk::open(
        Arc::new(w.disk(img)),
        Arc::new(w.file(jr)),
        JournalConfig {
            capacity: 1 << 20,
            ..Default::default()
        },
    )
    .expect("open");
    d.write_at(&[1u8; 4096], 0, WriteOpts::default())
        .expect("write");
    d.flush().expect("flush");
    w.add_failpoint(Failpoint {
        file: Some(1),
        op: SimOp::Sync,
        nth: 0,
        sticky: false,
    });
    d.write_at(&[2u8; 4096], 0, WriteOpts::default())
        .expect("write");
    let e = d.flush().expect_err("fsync failed");
    assert!(e.to_string().contains("flush"), "{e}");
    // Even though the next sync would work, the disk stays stopped.
    assert!(d.write_at(&[3u8; 512], 0, WriteOpts::default()).is_err());
    assert!(d.order().is_err());
    assert!(d.flush().is_err());
    let mut b = [0u8; 4];
    d.read_at(&mut b, 0).expect("reads still work");
    assert!(matches!(d.close(), Err(JournalError::Failed { .. })));
}

/// `stop` on a shared disk: everything reaches the image, later writes,
/// orders and flushes fail at once (no hang on a missing writer), reads
/// still work, and a second `stop` gives the same answer.
#[test]
fn stop_while_shared_applies_everything_and_refuses_later_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (p, img) = raw(&dir, "s.img");
    let (d, _) =
        EpochDisk::open_path(img, &EpochDisk::journal_path(&p), ordered_long()).expect("open");
    let d = Arc::new(d);
    let shared: Arc<dyn Disk> = d.clone();
    shared
        .write_at(&[7u8; 4096], 8192, WriteOpts::default())
        .expect("write");
    shared.order().expect("order");
    shared
        .write_at(&[8u8; 512], 0, WriteOpts::default())
        .expect("write");
    d.stop().expect("stop");
    d.stop().expect("second stop");
    let t = Instant::now();
    assert!(
        shared
            .write_at(&[9u8; 512], 0, WriteOpts::default())
            .is_err()
    );
    assert!(shared.order().is_err());
    assert!(shared.flush().is_err());
    assert!(d.sync().is_err());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "calls after stop hung"
    );
    let mut b = [0u8; 512];
    shared.read_at(&mut b, 0).expect("read after stop");
    assert_eq!(b, [8u8; 512]);
    let raw = RawDisk::open(&p, true).expect("reopen");
    raw.read_at(&mut b, 0).expect("read image");
    assert_eq!(b, [8u8; 512], "the open epoch was applied by stop");
    raw.read_at(&mut b, 8192).expect("read image");
    assert_eq!(b, [7u8; 512]);
    drop(shared);
    drop(d);
}

/// `sync_epoch` makes exactly the epochs up to the barrier durable and does
/// not close the open epoch (unlike `sync`, which would split it).
#[test]
fn sync_epoch_waits_for_the_barrier_without_closing_the_open_epoch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (p, img) = raw(&dir, "e.img");
    let (d, _) =
        EpochDisk::open_path(img, &EpochDisk::journal_path(&p), ordered_long()).expect("open");
    d.write_at(&[1u8; 4096], 0, WriteOpts::default())
        .expect("write");
    let e = d.order().expect("order");
    d.write_at(&[2u8; 4096], 4096, WriteOpts::default())
        .expect("write");
    assert_eq!(d.durable_epoch(), 0, "ordered with a 1 h interval");
    d.sync_epoch(e).expect("sync_epoch");
    let st = d.stats();
    assert_eq!(st.durable_epoch, e);
    assert_eq!(st.current_epoch, e + 1, "the open epoch was closed");
    // An epoch that is still open is closed first, then made durable.
    d.sync_epoch(e + 1).expect("sync open epoch");
    assert_eq!(d.durable_epoch(), e + 1);
    d.stop().expect("stop");
    assert!(d.sync_epoch(e + 5).is_err(), "after stop");
}
