//! Checkpoint sync over the real peer link: atomic apply, a checkpoint cut
//! in the middle, reconnection, restart and crash recovery.

use std::thread;

use understudy_memsync::codec::{CodecConfig, Decoder, Encoder};
use understudy_memsync::page::PAGE_SIZE;
use understudy_memsync::sync::{
    Backup, BackupImage, MSG_CKPT_DATA, Primary, SyncConfig, SyncError, Transport,
};
use understudy_peer::{Link, PeerConfig, PeerKey};

const PAGES: u64 = 256;

fn cfg() -> SyncConfig {
    let mut c = SyncConfig::new(PAGES);
    c.codec.store_slots = 64;
    c.chunk_bytes = 1024; // many DATA frames per checkpoint
    c
}

fn links() -> (Link, Link) {
    let bytes: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(73) ^ 0x5a).collect();
    let key = PeerKey::from_bytes(&bytes).expect("key");
    let a = PeerConfig::new(key.clone()).expect("cfg");
    let b = PeerConfig::new(key).expect("cfg");
    Link::pair(&a, &b, "memsync").expect("pair")
}

fn scribble(img: &mut [u8], seed: u64, pages: usize) {
    let mut x = seed | 1;
    for _ in 0..pages {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let p = (x % PAGES) as usize;
        let off = p * PAGE_SIZE + (x >> 20) as usize % (PAGE_SIZE - 64);
        for (i, b) in img[off..off + 64].iter_mut().enumerate() {
            *b = (x >> (i % 8)) as u8 ^ i as u8;
        }
    }
}

/// A transport that kills the link after `left` checkpoint data frames.
struct Cut {
    link: Link,
    left: usize,
    fired: bool,
}

impl Transport for Cut {
    fn send_parts(&mut self, ty: u16, parts: &[&[u8]]) -> Result<(), SyncError> {
        if ty == MSG_CKPT_DATA {
            if self.left == 0 {
                self.fired = true;
                let _ = self.link.shutdown("cut for test");
                return Err(SyncError::Protocol("link cut by the test".into()));
            }
            self.left -= 1;
        }
        Transport::send_parts(&mut self.link, ty, parts)
    }
    fn recv(&mut self, buf: &mut Vec<u8>) -> Result<u16, SyncError> {
        Transport::recv(&mut self.link, buf)
    }
}

fn spawn(mut b: Backup, mut link: Link) -> thread::JoinHandle<(Backup, Result<u64, SyncError>)> {
    thread::spawn(move || {
        let r = b.serve(&mut link);
        (b, r)
    })
}

#[test]
fn cut_checkpoint_leaves_previous_one_and_reconnect_resumes() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("backup.ram");
    let c = cfg();
    let mut img = vec![0u8; PAGES as usize * PAGE_SIZE];
    scribble(&mut img, 1, 400);
    let mut primary = Primary::new(c);

    // Connection 1: initial sync and one incremental checkpoint.
    let (mut pl, bl) = links();
    let h = spawn(
        Backup::new(c, BackupImage::open(&path, PAGES, true).expect("open")).expect("backup"),
        bl,
    );
    primary.handshake(&mut pl).expect("handshake");
    let r1 = primary.checkpoint(&mut pl, &img).expect("ckpt 1");
    assert_eq!((r1.seq, r1.dirty_pages), (1, PAGES));
    scribble(&mut img, 2, 20);
    let r2 = primary.checkpoint(&mut pl, &img).expect("ckpt 2");
    assert!(r2.dirty_pages > 0 && r2.dirty_pages <= 20);
    assert!(
        r2.wire_bytes < r2.dirty_pages * 600,
        "deltas must be small: {r2:?}"
    );
    pl.shutdown("done").expect("shutdown");
    let (backup, r) = h.join().expect("join");
    assert_eq!(r.expect("clean end"), 2);
    assert_eq!(backup.image().read_all().expect("read"), img);
    let at_2 = img.clone();

    // Connection 2: the link dies in the middle of checkpoint 3.
    let (pl, bl) = links();
    let h = spawn(backup, bl);
    let mut cut = Cut {
        link: pl,
        left: 1,
        fired: false,
    };
    primary.handshake(&mut cut).expect("handshake");
    scribble(&mut img, 3, 60);
    assert!(primary.checkpoint(&mut cut, &img).is_err());
    assert!(
        cut.fired,
        "the checkpoint must span several frames and be cut after the first"
    );
    let (backup, r) = h.join().expect("join");
    assert!(r.is_err(), "a cut checkpoint must fail on the backup");
    assert_eq!(backup.image().applied_seq(), Some(2));
    assert_eq!(
        backup.image().read_all().expect("read"),
        at_2,
        "backup must stay on checkpoint 2"
    );
    assert_eq!(primary.acked_seq(), Some(2));

    // Checkpoint before a new handshake is refused.
    let (mut pl, bl) = links();
    assert!(primary.checkpoint(&mut pl, &img).is_err());
    drop(bl);

    // Connection 3: resume; the stores were reset on both sides.
    let (mut pl, bl) = links();
    let h = spawn(backup, bl);
    primary.handshake(&mut pl).expect("handshake");
    scribble(&mut img, 4, 10);
    let r3 = primary
        .checkpoint(&mut pl, &img)
        .expect("ckpt after reconnect");
    assert_eq!(r3.seq, 3);
    let changed = (0..PAGES as usize)
        .filter(|&p| {
            img[p * PAGE_SIZE..(p + 1) * PAGE_SIZE] != at_2[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
        })
        .count() as u64;
    assert_eq!(
        r3.dirty_pages, changed,
        "exactly the pages differing from checkpoint 2"
    );
    scribble(&mut img, 5, 10);
    primary.checkpoint(&mut pl, &img).expect("ckpt 4");
    pl.shutdown("done").expect("shutdown");
    let (backup, r) = h.join().expect("join");
    assert_eq!(r.expect("clean"), 2);
    assert_eq!(backup.image().read_all().expect("read"), img);
    drop(backup);

    // Backup restart: the sequence number persisted; still incremental.
    let backup =
        Backup::new(c, BackupImage::open(&path, PAGES, true).expect("reopen")).expect("backup");
    assert_eq!(backup.image().applied_seq(), Some(4));
    let (mut pl, bl) = links();
    let h = spawn(backup, bl);
    primary.handshake(&mut pl).expect("handshake");
    scribble(&mut img, 6, 3);
    let r5 = primary.checkpoint(&mut pl, &img).expect("ckpt 5");
    assert!(r5.dirty_pages <= 3);
    pl.shutdown("done").expect("shutdown");
    let (backup, _) = h.join().expect("join");
    assert_eq!(backup.image().read_all().expect("read"), img);

    // Primary restart: it has no history, so it compares page hashes and
    // sends only what differs (here: nothing but the pages changed now).
    let mut fresh = Primary::new(c);
    let (mut pl, bl) = links();
    let h = spawn(backup, bl);
    fresh.handshake(&mut pl).expect("handshake");
    scribble(&mut img, 7, 2);
    let r6 = fresh
        .checkpoint(&mut pl, &img)
        .expect("ckpt after primary restart");
    assert_eq!(r6.seq, 6);
    assert!(
        r6.dirty_pages <= 2,
        "hash resync must not resend the image: {r6:?}"
    );
    pl.shutdown("done").expect("shutdown");
    let (backup, _) = h.join().expect("join");
    assert_eq!(backup.image().read_all().expect("read"), img);
}

#[test]
fn crash_after_redo_is_replayed_on_open() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("b.ram");
    let cc = CodecConfig {
        store_slots: 8,
        ..CodecConfig::new(8)
    };
    let mut enc = Encoder::new(cc);
    let mut dec = Decoder::new(cc);
    let p = [9u8; PAGE_SIZE];
    let d = dec
        .decode(&enc.encode(7, &[(3, &p)]).expect("enc").bytes)
        .expect("dec");
    {
        let img = BackupImage::open(&path, 8, true).expect("open");
        assert_eq!(img.applied_seq(), None);
        img.write_redo(&d).expect("redo");
        // Crash: the pages were never written.
    }
    let img = BackupImage::open(&path, 8, true).expect("reopen");
    assert_eq!(img.applied_seq(), Some(7));
    let all = img.read_all().expect("read");
    assert_eq!(&all[3 * PAGE_SIZE..4 * PAGE_SIZE], &p[..]);
    assert!(all[..3 * PAGE_SIZE].iter().all(|&b| b == 0));
    assert!(!dir.path().join("b.ram.redo").exists());

    // A damaged redo file is discarded, not applied.
    std::fs::write(dir.path().join("b.ram.redo"), b"USMREDO1 garbage").expect("write");
    drop(img);
    let img = BackupImage::open(&path, 8, true).expect("reopen");
    assert_eq!(img.applied_seq(), Some(7));
    assert!(!dir.path().join("b.ram.redo").exists());
}

#[test]
fn mismatched_configuration_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = cfg();
    let mut other = c;
    other.codec.store_slots = 32;
    let (mut pl, bl) = links();
    let h = spawn(
        Backup::new(
            c,
            BackupImage::open(&dir.path().join("x"), PAGES, false).expect("open"),
        )
        .expect("b"),
        bl,
    );
    let mut primary = Primary::new(other);
    assert!(primary.handshake(&mut pl).is_err());
    let (_, r) = h.join().expect("join");
    assert!(matches!(r, Err(SyncError::Mismatch(_))));
}

#[test]
fn local_failures_have_their_own_errors() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("b.ram");
    // A backup image opened with another page count than configured.
    let img = BackupImage::open(&path, PAGES / 2, false).expect("open");
    assert!(matches!(
        Backup::new(cfg(), img),
        Err(SyncError::ImageSize {
            image_pages,
            config_pages: PAGES,
            ..
        }) if image_pages == PAGES / 2
    ));
    // A damaged state file is a local problem, not a protocol violation.
    std::fs::write(dir.path().join("b.ram.state"), b"garbage").expect("w");
    let r = BackupImage::open(&path, PAGES, false);
    assert!(matches!(r, Err(SyncError::StateDamaged { .. })), "{r:?}");
    // A redo file that cannot be written (its temporary is a directory).
    std::fs::remove_file(dir.path().join("b.ram.state")).expect("rm");
    let mut img = BackupImage::open(&path, PAGES, false).expect("open");
    std::fs::create_dir(dir.path().join("b.ram.redo.tmp")).expect("mkdir");
    let d = understudy_memsync::Decoded {
        seq: 1,
        ..Default::default()
    };
    let r = img.apply(&d);
    assert!(
        matches!(
            r,
            Err(SyncError::Persist {
                file: "redo file",
                ..
            })
        ),
        "{r:?}"
    );
    assert_eq!(img.applied_seq(), None);
    // A checkpoint before any handshake.
    let (mut pl, _bl) = links();
    let img = vec![0u8; PAGES as usize * PAGE_SIZE];
    let r = Primary::new(cfg()).checkpoint(&mut pl, &img);
    assert!(matches!(r, Err(SyncError::NoSession)), "{r:?}");
}
