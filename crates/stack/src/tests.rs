//! The stack's promises: validate before touching files, one write path
//! through every layer, bitmaps recovered on reopen, stale files removed.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use understudy_bitmap::StoreOptions;
use understudy_block::{DiskRead, DiskWrite, Format, WriteOpts};
use understudy_journal::JournalConfig;

use crate::{BitmapRequest, ExportStack, ImageSource, Opened, StackError, StackSpec, sidecars};

const SIZE: u64 = 4 << 20;

fn journal() -> JournalConfig {
    JournalConfig {
        capacity: 1 << 20,
        ..JournalConfig::default()
    }
}

/// A spec creating a raw image with a journal and bitmap "b".
fn fresh(dir: &Path) -> StackSpec {
    let mut s = StackSpec::new("vm", dir.join("vm.img"));
    s.format = Some(Format::Raw);
    s.source = ImageSource::Create { size: SIZE };
    s.bitmaps = vec![BitmapRequest {
        name: "b".into(),
        granularity: 64 << 10,
    }];
    s.journal = Some(journal());
    s.store = StoreOptions {
        intent_extent_size: 1 << 20,
        ..StoreOptions::default()
    };
    s.persist_interval = Duration::from_secs(3600);
    s
}

/// The same stack, reopened.
fn existing(dir: &Path) -> StackSpec {
    let mut s = fresh(dir);
    s.source = ImageSource::Existing { size: Some(SIZE) };
    s
}

/// Stop the stack as `serve` does: flush, journal, persister, bitmaps.
fn close(stack: ExportStack) {
    stack.switch.flush().unwrap();
    if let Some(j) = &stack.journal {
        j.stop().unwrap();
    }
    stack.persister.stop();
    stack.store.close().unwrap();
}

/// Every file of the image, with its bytes (`None`: absent).
fn files(image: &Path) -> Vec<(PathBuf, Option<Vec<u8>>)> {
    std::iter::once(image.to_owned())
        .chain(sidecars(image))
        .map(|p| {
            let bytes = std::fs::read(&p).ok();
            (p, bytes)
        })
        .collect()
}

#[test]
fn fresh_stack_round_trips_a_write_through_every_layer() {
    let dir = tempfile::tempdir().unwrap();
    let stack = ExportStack::open_writable(&fresh(dir.path())).unwrap();
    assert!(stack.journal.is_some());
    let data = vec![0x5a; 8192];
    stack
        .switch
        .write_at(&data, 1 << 20, WriteOpts::default())
        .unwrap();
    let mut back = vec![0; 8192];
    stack.switch.read_at(&mut back, 1 << 20).unwrap();
    assert_eq!(back, data);
    let b = stack.store.get("b").unwrap();
    assert!(b.is_dirty(1 << 20));
    assert_eq!(b.dirty_bytes(), 64 << 10);
    let image = stack.image.clone();
    close(stack);
    // Applied to the image itself once the journal stopped.
    let raw = std::fs::read(&image).unwrap();
    assert_eq!(&raw[1 << 20..(1 << 20) + 8192], &data[..]);
    // The sidecars the stack names are the ones the layers wrote.
    for p in sidecars(&image) {
        let tmp = p.to_string_lossy().ends_with(".tmp");
        assert_eq!(p.exists(), !tmp, "{}", p.display());
    }
}

#[test]
fn reopened_stack_recovers_its_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    let stack = ExportStack::open_writable(&fresh(dir.path())).unwrap();
    stack
        .switch
        .write_at(&[1; 4096], 0, WriteOpts::default())
        .unwrap();
    close(stack);
    let stack = ExportStack::open_writable(&existing(dir.path())).unwrap();
    let b = stack.store.get("b").unwrap();
    assert!(b.is_dirty(0));
    assert_eq!(b.dirty_bytes(), 64 << 10);
    // An unclean stop (no close): the armed intent extent is recovered.
    stack
        .switch
        .write_at(&[2; 4096], 3 << 20, WriteOpts::default())
        .unwrap();
    stack.switch.flush().unwrap();
    stack.persister.stop();
    drop((stack.store, stack.filter, stack.switch, stack.journal));
    let stack = ExportStack::open_writable(&existing(dir.path())).unwrap();
    let info = stack.store.list();
    assert!(info[0].recovered, "{info:?}");
    let b = stack.store.get("b").unwrap();
    assert!(b.is_dirty(0) && b.is_dirty(3 << 20));
    let mut back = [0; 4096];
    stack.switch.read_at(&mut back, 3 << 20).unwrap();
    assert_eq!(back, [2; 4096]);
    close(stack);
}

#[test]
fn bad_options_are_refused_before_any_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    let stack = ExportStack::open_writable(&fresh(dir.path())).unwrap();
    stack
        .switch
        .write_at(&[7; 4096], 0, WriteOpts::default())
        .unwrap();
    let image = stack.image.clone();
    close(stack);
    let before = files(&image);
    assert!(before.iter().filter(|(_, b)| b.is_some()).count() >= 4);

    let mut bad = existing(dir.path());
    bad.store.intent_extent_size = 3000;
    let e = ExportStack::open(&bad).unwrap_err();
    assert!(matches!(e, StackError::IntentExtent { .. }), "{e:?}");
    let mut bad = existing(dir.path());
    bad.journal = Some(JournalConfig {
        capacity: 1000,
        ..journal()
    });
    let e = ExportStack::open(&bad).unwrap_err();
    assert!(matches!(e, StackError::JournalConfig { .. }), "{e:?}");
    let mut bad = existing(dir.path());
    bad.bitmaps[0].granularity = 3 << 10;
    let e = ExportStack::open(&bad).unwrap_err();
    assert!(matches!(e, StackError::Granularity { .. }), "{e:?}");
    let mut bad = existing(dir.path());
    bad.persist_interval = Duration::ZERO;
    let e = ExportStack::open(&bad).unwrap_err();
    assert!(matches!(e, StackError::PersistInterval { .. }), "{e:?}");
    let mut bad = existing(dir.path());
    bad.read_only = true;
    let e = ExportStack::open(&bad).unwrap_err();
    assert!(matches!(e, StackError::ReadOnlyJournal { .. }), "{e:?}");
    let mut bad = existing(dir.path());
    bad.source = ImageSource::Existing {
        size: Some(SIZE * 2),
    };
    let e = ExportStack::open(&bad).unwrap_err();
    assert!(matches!(e, StackError::SizeMismatch { .. }), "{e:?}");
    assert_eq!(files(&image), before, "a refused open changed a file");

    // A bitmap of another granularity is found in the store, which opens
    // before the journal: the image and journal are still untouched.
    let mut bad = existing(dir.path());
    bad.bitmaps[0].granularity = 4 << 10;
    let e = ExportStack::open(&bad).unwrap_err();
    assert!(matches!(e, StackError::GranularityMismatch { .. }), "{e:?}");
    let after = files(&image);
    let journal_path = understudy_journal::EpochDisk::journal_path(&image);
    for (p, bytes) in [
        &after[0],
        after.iter().find(|(p, _)| *p == journal_path).unwrap(),
    ] {
        let old = before.iter().find(|(q, _)| q == p).unwrap();
        assert_eq!(bytes, &old.1, "{} changed", p.display());
    }
    // The bitmaps were closed cleanly: nothing is recovered next time.
    let stack = ExportStack::open_writable(&existing(dir.path())).unwrap();
    assert!(!stack.store.list()[0].recovered);
    close(stack);
}

#[test]
fn missing_image_and_read_only_are_told_apart() {
    let dir = tempfile::tempdir().unwrap();
    let e = ExportStack::open(&StackSpec::new("x", dir.path().join("nope"))).unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    assert!(!dir.path().join("nope").exists());
    let stack = ExportStack::open_writable(&fresh(dir.path())).unwrap();
    close(stack);
    let mut ro = StackSpec::new("vm", dir.path().join("vm.img"));
    ro.read_only = true;
    match ExportStack::open(&ro).unwrap() {
        Opened::ReadOnly(r) => assert!(r.block.info().read_only),
        Opened::Writable(_) => panic!("a read-only spec opened writable"),
    }
}

#[test]
fn remove_stale_clears_the_image_and_every_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    let stack = ExportStack::open_writable(&fresh(dir.path())).unwrap();
    stack
        .switch
        .write_at(&[9; 4096], 0, WriteOpts::default())
        .unwrap();
    let image = stack.image.clone();
    close(stack);
    std::fs::write(sidecars(&image)[2].clone(), b"stale tmp").unwrap();
    assert!(files(&image).iter().all(|(_, b)| b.is_some()));
    crate::remove_stale(&image).unwrap();
    assert!(files(&image).iter().all(|(_, b)| b.is_none()));
    // Nothing to remove is fine.
    crate::remove_stale(&image).unwrap();

    // A fresh create over stale files starts clean: no old bitmap bits.
    let stack = ExportStack::open_writable(&fresh(dir.path())).unwrap();
    stack
        .switch
        .write_at(&[9; 4096], 0, WriteOpts::default())
        .unwrap();
    close(stack);
    let stack = ExportStack::open_writable(&fresh(dir.path())).unwrap();
    assert_eq!(stack.store.get("b").unwrap().dirty_bytes(), 0);
    let mut back = [1; 4096];
    stack.switch.read_at(&mut back, 0).unwrap();
    assert_eq!(back, [0; 4096]);
    close(stack);
}
