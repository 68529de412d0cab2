//! A primary and a backup in one process, over a real loopback peer link,
//! on real image files. Every wait is for an observable state, with a
//! deadline.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use understudy_block::{Disk, DiskRead, DiskWrite, Format, WriteOpts, ZeroOpts};
use understudy_journal::JournalConfig;
use understudy_peer::{Link, PeerConfig, PeerKey, PeerListener};
use understudy_replication::generation::{self, Decision};
use understudy_replication::wire::{self, CopyInfo, Hello, Msg};
use understudy_replication::{
    Backup, BackupConfig, Mode, PURPOSE, Primary, PrimaryConfig, State, Status,
};
use understudy_stack::{ExportStack, ImageSource, StackSpec};

const SIZE: u64 = 16 << 20;
const BLOCK: u64 = 64 << 10;
const DEADLINE: Duration = Duration::from_secs(60);

fn link_cfg(node: &str) -> PeerConfig {
    let key = PeerKey::from_bytes(&(0..32u8).collect::<Vec<_>>()).expect("key");
    let mut c = PeerConfig::new(key).expect("config");
    c.node_id = node.into();
    c
}

fn stack(dir: &Path, name: &str, journal: bool) -> ExportStack {
    let mut spec = StackSpec::new(name, dir.join(format!("{name}.img")));
    spec.format = Some(Format::Raw);
    spec.source = ImageSource::Create { size: SIZE };
    if journal {
        spec.journal = Some(JournalConfig {
            capacity: 64 << 20,
            ..JournalConfig::default()
        });
    }
    ExportStack::open_writable(&spec).expect("open stack")
}

/// A backup listening on loopback, serving sessions one after another.
struct BackupNode {
    backup: Arc<Backup>,
    addr: String,
    _thread: JoinHandle<()>,
}

fn backup_node(dir: &Path, journal: bool, cfg: BackupConfig) -> BackupNode {
    serve_backup(stack(dir, "b", journal), cfg, "node-b")
}

fn serve_backup(stack: ExportStack, cfg: BackupConfig, node: &str) -> BackupNode {
    let backup = Arc::new(Backup::open(stack, cfg).expect("backup"));
    let listener = PeerListener::bind("127.0.0.1:0", &link_cfg(node)).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let b = backup.clone();
    let thread = std::thread::spawn(move || {
        // One thread per session, as a daemon serves them: a reconnecting
        // primary must not wait behind its own stale session.
        while let Ok((link, _)) = listener.accept() {
            let b = b.clone();
            std::thread::spawn(move || {
                if let Err(e) = b.serve(link) {
                    eprintln!("backup session: {e}");
                }
            });
        }
    });
    BackupNode {
        backup,
        addr,
        _thread: thread,
    }
}

fn primary_cfg(mode: Mode, addr: &str) -> PrimaryConfig {
    let mut c = PrimaryConfig::new(mode, addr, link_cfg("node-a"));
    c.reconnect_min = Duration::from_millis(20);
    c.reconnect_max = Duration::from_millis(200);
    c.clean_interval = Duration::from_millis(100);
    c
}

fn read_all(d: &dyn Disk) -> Vec<u8> {
    let mut v = vec![0u8; d.size() as usize];
    d.read_at(&mut v, 0).expect("read");
    v
}

fn block_of(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..BLOCK)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn wait(p: &Primary, what: &str, pred: impl Fn(&Status) -> bool) -> Status {
    let st = p.wait_for(DEADLINE, &pred);
    assert!(pred(&st), "{what}: not reached within {DEADLINE:?}: {st:?}");
    st
}

fn in_sync(s: &Status) -> bool {
    s.state == State::InSync && s.lag_bytes == 0 && s.pending_bytes == 0
}

/// Wait until the backup reads exactly what the primary reads.
fn wait_equal(primary: &dyn Disk, backup: &dyn Disk) {
    wait_equal_as("", primary, backup);
}

fn wait_equal_as(what: &str, primary: &dyn Disk, backup: &dyn Disk) {
    let deadline = Instant::now() + DEADLINE;
    let want = read_all(primary);
    loop {
        let got = read_all(backup);
        if got == want {
            return;
        }
        if Instant::now() >= deadline {
            let at = got.iter().zip(&want).position(|(g, w)| g != w);
            panic!("{what}: the backup never matched the primary (first difference at {at:?})");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes `n` random aligned blocks through the client path, flushing now
/// and then; returns the blocks written.
fn writer(disk: Arc<dyn Disk>, seed: u64, n: u64) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for i in 0..n {
            let s = seed * 1_000_003 + i;
            let off = (s.wrapping_mul(2_654_435_761) % (SIZE / BLOCK)) * BLOCK;
            disk.write_at(&block_of(s), off, WriteOpts::default())
                .expect("write");
            if i % 16 == 15 {
                disk.flush().expect("flush");
            }
        }
        disk.flush().expect("flush");
    })
}

fn seed_primary(a: &ExportStack) {
    for i in 0..32 {
        a.switch
            .write_at(&block_of(900 + i), i * 3 * BLOCK, WriteOpts::default())
            .expect("seed");
    }
}

#[test]
fn every_mode_moves_data_byte_exact_under_a_concurrent_writer() {
    for mode in [Mode::Sync, Mode::Async, Mode::Epoch] {
        let dir = tempfile::tempdir().expect("tmp");
        let a = stack(dir.path(), "a", false);
        seed_primary(&a);
        let b = backup_node(dir.path(), mode == Mode::Epoch, BackupConfig::default());
        let mut cfg = primary_cfg(mode, &b.addr);
        // Small enough that async and epoch fall behind and catch up.
        cfg.max_lag = 1 << 20;
        let p = Primary::start(&a, cfg).expect("start");
        let w = writer(a.switch.clone(), 1, 400);
        // A cut in the middle of the stream: the primary reconnects alone.
        wait(&p, "first session", |s| {
            s.sessions >= 1 && s.state != State::Connecting
        });
        p.cut_link();
        w.join().expect("writer");
        let st = wait(&p, "in sync", in_sync);
        assert!(in_sync(&st), "{mode}: never in sync: {st:?}");
        wait_equal_as(&mode.to_string(), &*a.block, &*b.backup.stack().switch);
        assert!(
            st.sessions >= 2,
            "{mode}: the cut link was not reconnected: {st:?}"
        );
        // Both records agree on the generation.
        let pa = generation::load(&a.image).expect("load").expect("record");
        assert_eq!(pa.gens, b.backup.record().gens, "{mode}");
        p.stop().expect("stop");
    }
}

#[test]
fn sync_mode_holds_every_write_acknowledged_before_a_crash() {
    let dir = tempfile::tempdir().expect("tmp");
    let a = stack(dir.path(), "a", false);
    let b = backup_node(dir.path(), false, BackupConfig::default());
    let p = Primary::start(&a, primary_cfg(Mode::Sync, &b.addr)).expect("start");
    wait(&p, "in sync", in_sync);
    let acked = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (disk, log, halt) = (a.switch.clone(), acked.clone(), stop.clone());
    let w = std::thread::spawn(move || {
        let mut i = 0u64;
        while !halt.load(Ordering::SeqCst) {
            let off = (i % (SIZE / BLOCK)) * BLOCK;
            disk.write_at(&block_of(i), off, WriteOpts::default())
                .expect("write");
            log.lock().push((Instant::now(), off, i));
            i += 1;
        }
    });
    // Let some writes through, then "crash" the primary: its link dies and
    // nothing more reaches the backup.
    let deadline = Instant::now() + DEADLINE;
    while acked.lock().len() < 200 {
        assert!(Instant::now() < deadline, "writes do not complete");
        std::thread::yield_now();
    }
    let crash = Instant::now();
    p.disconnect();
    stop.store(true, Ordering::SeqCst);
    w.join().expect("writer");
    let backup = b.backup.stack().switch.clone();
    let mut latest = std::collections::HashMap::new();
    for &(at, off, i) in acked.lock().iter() {
        if at < crash {
            latest.insert(off, i);
        }
    }
    assert!(latest.len() >= 100, "too few writes before the crash");
    for (off, i) in latest {
        let mut buf = vec![0u8; BLOCK as usize];
        backup.read_at(&mut buf, off).expect("read");
        // The block holds the last write acknowledged before the crash or
        // one after it, never an older one.
        let ok = (i..i + 10_000).any(|j| buf == block_of(j));
        assert!(
            ok,
            "block at {off} lost write {i} acknowledged before the crash"
        );
    }
}

#[test]
fn epoch_mode_backup_is_always_at_an_epoch_boundary() {
    let dir = tempfile::tempdir().expect("tmp");
    let a = stack(dir.path(), "a", false);
    let b = backup_node(dir.path(), true, BackupConfig::default());
    let p = Primary::start(&a, primary_cfg(Mode::Epoch, &b.addr)).expect("start");
    wait(&p, "in sync", in_sync);
    let mut model = read_all(&*a.block);
    let mut boundaries = std::collections::HashSet::new();
    boundaries.insert(xxhash_rust::xxh3::xxh3_64(&model));
    let epochs_before = b.backup.stats().epochs;
    for i in 0..300u64 {
        let off = ((i * 7919) % (SIZE / BLOCK)) * BLOCK;
        let data = block_of(5000 + i);
        a.switch
            .write_at(&data, off, WriteOpts::default())
            .expect("write");
        model[off as usize..(off + BLOCK) as usize].copy_from_slice(&data);
        if i % 5 == 4 {
            a.switch.flush().expect("flush");
            boundaries.insert(xxhash_rust::xxh3::xxh3_64(&model));
        }
        if i == 237 {
            // The abrupt stop, in the middle of an epoch.
            p.disconnect();
        }
    }
    let deadline = Instant::now() + DEADLINE;
    while b.backup.is_serving() {
        assert!(
            Instant::now() < deadline,
            "the backup never noticed the stop"
        );
        std::thread::yield_now();
    }
    let got = xxhash_rust::xxh3::xxh3_64(&read_all(&*b.backup.stack().switch));
    assert!(
        boundaries.contains(&got),
        "the backup holds a state that is no epoch boundary"
    );
    assert!(
        b.backup.stats().epochs > epochs_before,
        "no epoch was applied"
    );
}

#[test]
fn a_resync_after_a_link_cut_sends_only_what_changed() {
    let dir = tempfile::tempdir().expect("tmp");
    let a = stack(dir.path(), "a", false);
    seed_primary(&a);
    let b = backup_node(dir.path(), false, BackupConfig::default());
    let p = Primary::start(&a, primary_cfg(Mode::Async, &b.addr)).expect("start");
    wait(&p, "in sync", in_sync);
    p.disconnect();
    wait(&p, "disconnected", |s| s.state == State::Disconnected);
    let before = p.status().resync_bytes;
    let changed = 40u64;
    for i in 0..changed {
        a.switch
            .write_at(
                &block_of(70_000 + i),
                (i * 5 + 1) * BLOCK,
                WriteOpts::default(),
            )
            .expect("write");
    }
    p.reconnect();
    let st = wait(&p, "resynced", in_sync);
    assert!(in_sync(&st), "{st:?}");
    wait_equal(&*a.block, &*b.backup.stack().switch);
    let sent = st.resync_bytes - before;
    let bound = changed * BLOCK * 105 / 100;
    assert!(
        sent <= bound,
        "resync sent {sent} bytes for {} changed",
        changed * BLOCK
    );
    assert!(sent >= changed * BLOCK, "resync sent only {sent} bytes");
}

#[test]
fn split_brain_is_reported_and_changes_nothing_without_a_policy() {
    let dir = tempfile::tempdir().expect("tmp");
    let a = stack(dir.path(), "a", false);
    let b = backup_node(dir.path(), false, BackupConfig::default());
    let p = Primary::start(&a, primary_cfg(Mode::Sync, &b.addr)).expect("start");
    wait(&p, "in sync", in_sync);
    // Partition: both sides become primary and write.
    p.disconnect();
    let deadline = Instant::now() + DEADLINE;
    while b.backup.is_serving() {
        assert!(
            Instant::now() < deadline,
            "the backup never noticed the partition"
        );
        std::thread::yield_now();
    }
    b.backup.promote().expect("promote");
    a.switch
        .write_at(&block_of(1), 0, WriteOpts::default())
        .expect("write a");
    b.backup
        .stack()
        .switch
        .write_at(&block_of(2), BLOCK, WriteOpts::default())
        .expect("write b");
    let (ia, ib) = (read_all(&*a.block), read_all(&*b.backup.stack().switch));
    // Heal the partition.
    p.reconnect();
    let st = wait(&p, "refused", |s| matches!(s.state, State::Refused(_)));
    assert_eq!(
        st.state,
        State::Refused(Decision::SplitBrain { recoverable: true }),
        "{st:?}"
    );
    assert!(
        st.last_error
            .as_deref()
            .unwrap_or("")
            .contains("generation records refuse")
    );
    assert_eq!(read_all(&*a.block), ia, "the primary's data changed");
    assert_eq!(
        read_all(&*b.backup.stack().switch),
        ib,
        "the backup's data changed"
    );
    assert!(
        generation::load(&a.image)
            .expect("load")
            .expect("rec")
            .split_brain
    );
    assert!(b.backup.record().split_brain);
}

#[test]
fn a_split_brain_policy_discards_the_younger_primary() {
    let dir = tempfile::tempdir().expect("tmp");
    let a = stack(dir.path(), "a", false);
    let policy = generation::AfterSplitBrain::DiscardYounger;
    let bcfg = BackupConfig {
        after_split_brain: policy.clone(),
        ..BackupConfig::default()
    };
    let b = backup_node(dir.path(), false, bcfg);
    let mut cfg = primary_cfg(Mode::Sync, &b.addr);
    cfg.after_split_brain = policy;
    let p = Primary::start(&a, cfg).expect("start");
    wait(&p, "in sync", in_sync);
    p.disconnect();
    let deadline = Instant::now() + DEADLINE;
    while b.backup.is_serving() {
        assert!(
            Instant::now() < deadline,
            "the backup never noticed the partition"
        );
        std::thread::yield_now();
    }
    b.backup.promote().expect("promote");
    a.switch
        .write_at(&block_of(1), 0, WriteOpts::default())
        .expect("write a");
    b.backup
        .stack()
        .switch
        .write_at(&block_of(2), BLOCK, WriteOpts::default())
        .expect("write b");
    p.reconnect();
    wait(&p, "resolved", in_sync);
    // The backup, promoted last, lost its write and is a backup again.
    wait_equal(&*a.block, &*b.backup.stack().switch);
    assert_eq!(b.backup.record().role, generation::Role::Backup);
    assert!(
        b.backup
            .stack()
            .switch
            .write_at(&block_of(3), 0, WriteOpts::default())
            .is_err()
    );
}

#[test]
fn a_crashed_primary_resyncs_what_it_wrote_while_disconnected() {
    let dir = tempfile::tempdir().expect("tmp");
    let a = stack(dir.path(), "a", false);
    let b = backup_node(dir.path(), false, BackupConfig::default());
    let p = Primary::start(&a, primary_cfg(Mode::Async, &b.addr)).expect("start");
    wait(&p, "in sync", in_sync);
    p.disconnect();
    wait(&p, "disconnected", |s| s.state == State::Disconnected);
    for i in 0..10 {
        a.switch
            .write_at(
                &block_of(60_000 + i),
                (i * 11 + 2) * BLOCK,
                WriteOpts::default(),
            )
            .expect("write");
    }
    let want = read_all(&*a.block);
    // kill -9, as far as one process can: the replica stops without
    // touching its record (which a crash leaves saying "primary running"),
    // and the bitmaps are dropped without a clean close.
    let rec = generation::load(&a.image).expect("load").expect("record");
    p.stop().expect("stop");
    generation::store(&a.image, &rec).expect("restore the crashed record");
    let ExportStack {
        persister,
        store,
        filter,
        switch,
        journal,
        block,
        ..
    } = a;
    persister.stop();
    drop((store, filter, switch, journal, block));
    let mut spec = StackSpec::new("a", dir.path().join("a.img"));
    spec.source = ImageSource::Existing { size: Some(SIZE) };
    let a = ExportStack::open_writable(&spec).expect("reopen");
    assert_eq!(read_all(&*a.block), want);
    let rec = generation::load(&a.image).expect("load").expect("record");
    assert!(rec.primary_open, "the crash is visible in the record");
    let p = Primary::start(&a, primary_cfg(Mode::Async, &b.addr)).expect("restart");
    let st = wait(&p, "resynced", in_sync);
    wait_equal(&*a.block, &*b.backup.stack().switch);
    // Only the marked blocks (plus the write-intent over-marking) moved.
    assert!(st.resync_bytes < SIZE / 2, "{st:?}");
}

#[test]
fn async_lag_stays_within_its_bound() {
    let dir = tempfile::tempdir().expect("tmp");
    let a = stack(dir.path(), "a", false);
    let b = backup_node(dir.path(), false, BackupConfig::default());
    let mut cfg = primary_cfg(Mode::Async, &b.addr);
    cfg.max_lag = 512 << 10;
    let p = Primary::start(&a, cfg).expect("start");
    wait(&p, "in sync", in_sync);
    let w = writer(a.switch.clone(), 3, 600);
    let mut max_seen = 0;
    while !w.is_finished() {
        max_seen = max_seen.max(p.status().lag_bytes);
        std::thread::yield_now();
    }
    w.join().expect("writer");
    assert!(max_seen <= 512 << 10, "lag {max_seen} over the bound");
    wait(&p, "in sync", in_sync);
    wait_equal(&*a.block, &*b.backup.stack().switch);
}

#[test]
fn failover_then_reprotect_resyncs_only_what_changed() {
    let dir = tempfile::tempdir().expect("tmp");
    let a = stack(dir.path(), "a", false);
    seed_primary(&a);
    let b = backup_node(dir.path(), false, BackupConfig::default());
    let p = Primary::start(&a, primary_cfg(Mode::Sync, &b.addr)).expect("start");
    wait(&p, "in sync", in_sync);
    // The primary goes away; the backup is promoted and serves writes.
    p.stop().expect("stop");
    let deadline = Instant::now() + DEADLINE;
    while b.backup.is_serving() {
        assert!(Instant::now() < deadline, "the backup never noticed");
        std::thread::yield_now();
    }
    b.backup.promote().expect("promote");
    let changed = 12u64;
    for i in 0..changed {
        b.backup
            .stack()
            .switch
            .write_at(
                &block_of(90_000 + i),
                (i * 7 + 3) * BLOCK,
                WriteOpts::default(),
            )
            .expect("write on the new primary");
    }
    // Re-protect: the old primary comes back as the backup of the new one.
    let old = serve_backup(a, BackupConfig::default(), "node-a");
    let mut cfg = PrimaryConfig::new(Mode::Sync, &old.addr, link_cfg("node-b"));
    cfg.reconnect_min = Duration::from_millis(20);
    let q = Primary::start(b.backup.stack(), cfg).expect("start the new primary");
    let st = wait(&q, "re-protected", in_sync);
    wait_equal(&*b.backup.stack().block, &*old.backup.stack().switch);
    assert!(
        st.resync_bytes <= changed * BLOCK * 105 / 100,
        "re-protect sent {} bytes for {} changed",
        st.resync_bytes,
        changed * BLOCK
    );
    assert_eq!(old.backup.record().role, generation::Role::Backup);
    assert_eq!(old.backup.record().gens, st.gens);
}

/// A disk that fails writes with ENOSPC while `full` is set, and takes
/// `delay` per write (a slow device).
#[derive(Debug)]
struct FullDisk {
    inner: Arc<dyn Disk>,
    full: Arc<AtomicBool>,
    delay: Duration,
}

impl FullDisk {
    fn check(&self, offset: u64, len: u64) -> understudy_block::Result<()> {
        std::thread::sleep(self.delay);
        if self.full.load(Ordering::SeqCst) {
            return Err(understudy_block::BlockError::Write {
                offset,
                len,
                source: std::io::Error::from_raw_os_error(28),
            });
        }
        Ok(())
    }
}

impl understudy_block::DiskSize for FullDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
}
impl DiskRead for FullDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> understudy_block::Result<()> {
        self.inner.read_at(buf, offset)
    }
}
impl DiskWrite for FullDisk {
    fn write_at(&self, buf: &[u8], offset: u64, o: WriteOpts) -> understudy_block::Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.inner.write_at(buf, offset, o)
    }
    fn write_zeroes(&self, offset: u64, len: u64, z: ZeroOpts) -> understudy_block::Result<()> {
        self.check(offset, len)?;
        self.inner.write_zeroes(offset, len, z)
    }
    fn discard(&self, offset: u64, len: u64, o: WriteOpts) -> understudy_block::Result<()> {
        self.inner.discard(offset, len, o)
    }
    fn flush(&self) -> understudy_block::Result<()> {
        self.inner.flush()
    }
}
impl understudy_block::DiskMap for FullDisk {
    fn map(
        &self,
        offset: u64,
        len: u64,
    ) -> understudy_block::Result<Vec<understudy_block::Extent>> {
        self.inner.map(offset, len)
    }
}
impl Disk for FullDisk {
    fn info(&self) -> understudy_block::DiskInfo {
        self.inner.info()
    }
}

#[test]
fn a_full_backup_disk_loses_nothing_and_is_reported() {
    let dir = tempfile::tempdir().expect("tmp");
    let a = stack(dir.path(), "a", false);
    let full = Arc::new(AtomicBool::new(false));
    let mut spec = StackSpec::new("b", dir.path().join("b.img"));
    spec.format = Some(Format::Raw);
    spec.source = ImageSource::Create { size: SIZE };
    let f = full.clone();
    spec.block_wrapper = Some(Arc::new(move |inner| {
        Arc::new(FullDisk {
            inner,
            full: f.clone(),
            delay: Duration::ZERO,
        }) as Arc<dyn Disk>
    }));
    let b = serve_backup(
        ExportStack::open_writable(&spec).expect("open"),
        BackupConfig::default(),
        "node-b",
    );
    let p = Primary::start(&a, primary_cfg(Mode::Sync, &b.addr)).expect("start");
    wait(&p, "in sync", in_sync);
    full.store(true, Ordering::SeqCst);
    for i in 0..8 {
        a.switch
            .write_at(&block_of(50_000 + i), i * 2 * BLOCK, WriteOpts::default())
            .expect("the primary keeps serving");
    }
    let st = wait(&p, "reported", |s| {
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("code 1"))
    });
    assert_ne!(st.state, State::InSync, "{st:?}");
    full.store(false, Ordering::SeqCst);
    wait(&p, "in sync again", in_sync);
    wait_equal(&*a.block, &*b.backup.stack().switch);
}

#[test]
fn online_verify_reports_and_repairs_differing_blocks() {
    let dir = tempfile::tempdir().expect("tmp");
    let a = stack(dir.path(), "a", false);
    seed_primary(&a);
    let b = backup_node(dir.path(), false, BackupConfig::default());
    let p = Primary::start(&a, primary_cfg(Mode::Sync, &b.addr)).expect("start");
    wait(&p, "in sync", in_sync);
    assert!(p.verify(false).expect("verify").differing.is_empty());
    // Damage the backup behind the replica's back.
    b.backup
        .stack()
        .block
        .write_at(&block_of(31_337), 5 * BLOCK, WriteOpts::default())
        .expect("damage");
    let r = p.verify(true).expect("verify");
    assert_eq!(r.differing, vec![(5 * BLOCK, BLOCK)]);
    assert_eq!(r.blocks, SIZE / BLOCK);
    wait(&p, "repaired", in_sync);
    wait_equal(&*a.block, &*b.backup.stack().switch);
    assert!(p.verify(false).expect("verify").differing.is_empty());
}

#[test]
fn an_epoch_larger_than_the_buffer_spills_and_recovers_consistency() {
    let dir = tempfile::tempdir().expect("tmp");
    let a = stack(dir.path(), "a", false);
    seed_primary(&a);
    let cfg = BackupConfig {
        max_epoch_bytes: 256 << 10,
        ..BackupConfig::default()
    };
    let b = backup_node(dir.path(), true, cfg);
    let p = Primary::start(&a, primary_cfg(Mode::Epoch, &b.addr)).expect("start");
    wait(&p, "in sync", in_sync);
    wait_equal(&*a.block, &*b.backup.stack().switch);
    // The 2 MiB initial sync spilled; the closing epoch made the copy
    // consistent again, so it may be promoted.
    assert_eq!(b.backup.record().resync, None);
}

#[test]
fn async_falls_behind_on_the_time_bound_and_catches_up() {
    let dir = tempfile::tempdir().expect("tmp");
    let a = stack(dir.path(), "a", false);
    let mut spec = StackSpec::new("b", dir.path().join("b.img"));
    spec.format = Some(Format::Raw);
    spec.source = ImageSource::Create { size: SIZE };
    spec.block_wrapper = Some(Arc::new(|inner| {
        Arc::new(FullDisk {
            inner,
            full: Arc::new(AtomicBool::new(false)),
            delay: Duration::from_millis(2),
        }) as Arc<dyn Disk>
    }));
    let b = serve_backup(
        ExportStack::open_writable(&spec).expect("open"),
        BackupConfig::default(),
        "node-b",
    );
    let mut cfg = primary_cfg(Mode::Async, &b.addr);
    cfg.max_lag_time = Some(Duration::from_millis(5));
    let p = Primary::start(&a, cfg).expect("start");
    wait(&p, "in sync", in_sync);
    writer(a.switch.clone(), 9, 200).join().expect("writer");
    let st = wait(&p, "caught up", in_sync);
    assert!(
        st.fell_behind > 0,
        "a 2 ms disk never exceeded a 5 ms bound: {st:?}"
    );
    wait_equal(&*a.block, &*b.backup.stack().switch);
}

/// A session from `node` that has sent its hello and then goes quiet
/// without closing the link (a vanished primary, as the backup sees it).
fn stale_session(addr: &str, node: &str) -> Result<Link, String> {
    let mut link = Link::connect(addr, &link_cfg(node), PURPOSE).map_err(|e| e.to_string())?;
    let hello = Msg::Hello(Hello {
        min_version: wire::MIN_VERSION,
        max_version: wire::MAX_VERSION,
        mode: Mode::Async,
        size: SIZE,
        name: "a".into(),
        copy: CopyInfo {
            gens: generation::Generations::fresh(12_345),
            ..CopyInfo::default()
        },
    });
    let (t, body, _) = hello.encode().map_err(|e| e.to_string())?;
    link.send(t, &body).map_err(|e| e.to_string())?;
    link.recv().map_err(|e| e.to_string())?;
    Ok(link)
}

#[test]
fn a_reconnecting_primary_supersedes_its_stale_session() {
    let dir = tempfile::tempdir().expect("tmp");
    let a = stack(dir.path(), "a", false);
    seed_primary(&a);
    let b = backup_node(dir.path(), false, BackupConfig::default());
    let stale = stale_session(&b.addr, "node-a").expect("stale session");
    let deadline = Instant::now() + DEADLINE;
    while !b.backup.is_serving() {
        assert!(Instant::now() < deadline, "the stale session never started");
        std::thread::yield_now();
    }
    // Another node is refused while it runs...
    let err = stale_session(&b.addr, "node-c").expect_err("busy");
    assert!(err.contains("another primary"), "{err}");
    // ...but the same primary, reconnecting, takes over at once.
    let p = Primary::start(&a, primary_cfg(Mode::Sync, &b.addr)).expect("start");
    wait(&p, "in sync", in_sync);
    wait_equal(&*a.block, &*b.backup.stack().switch);
    drop(stale);
    // An operator can end a session whose primary is gone, then promote.
    p.disconnect();
    b.backup.end_session();
    b.backup
        .promote()
        .expect("promote after ending the session");
}

#[test]
fn a_backup_refuses_client_writes_until_promoted() {
    let dir = tempfile::tempdir().expect("tmp");
    let b = Backup::open(stack(dir.path(), "b", false), BackupConfig::default()).expect("open");
    let sw = b.stack().switch.clone();
    assert!(sw.write_at(&[1u8; 512], 0, WriteOpts::default()).is_err());
    let mut buf = [9u8; 512];
    sw.read_at(&mut buf, 0).expect("reads work");
    b.promote().expect("promote");
    sw.write_at(&[1u8; 512], 0, WriteOpts::default())
        .expect("writable after promotion");
    let rec = b.record();
    assert_eq!(rec.role, generation::Role::Primary);
    assert_ne!(rec.gens.current, 0);
}

#[test]
fn an_interrupted_resync_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().expect("tmp");
    let a = stack(dir.path(), "a", false);
    let b = backup_node(dir.path(), false, BackupConfig::default());
    let mut cfg = primary_cfg(Mode::Async, &b.addr);
    cfg.resync_checkpoint = 1 << 20;
    cfg.resync_bandwidth = Some(8 << 20);
    let p = Primary::start(&a, cfg).expect("start");
    wait(&p, "in sync", in_sync);
    p.disconnect();
    wait(&p, "disconnected", |s| s.state == State::Disconnected);
    let changed = 8u64 << 20;
    for i in 0..changed / BLOCK {
        a.switch
            .write_at(&block_of(80_000 + i), i * BLOCK, WriteOpts::default())
            .expect("write");
    }
    let before = p.status();
    p.reconnect();
    wait(&p, "resync under way", |s| {
        s.resync_bytes - before.resync_bytes >= 3 << 20
    });
    p.cut_link();
    let st = wait(&p, "resynced", in_sync);
    wait_equal(&*a.block, &*b.backup.stack().switch);
    assert!(st.sessions >= before.sessions + 2, "{st:?}");
    let sent = st.resync_bytes - before.resync_bytes;
    // At most the piece in flight when the link was cut is sent twice.
    assert!(
        sent <= changed + (2 << 20),
        "an interrupted resync started over: {sent} bytes for {changed}"
    );
}

#[test]
fn a_checksum_resync_sends_only_blocks_that_differ() {
    let dir = tempfile::tempdir().expect("tmp");
    let a = stack(dir.path(), "a", false);
    seed_primary(&a);
    // A backup that already holds the same data but one block, with no
    // record: the connect is a full sync, by hashes.
    let b = backup_node(dir.path(), false, BackupConfig::default());
    let image = read_all(&*a.block);
    let bb = &b.backup.stack().block;
    bb.write_at(&image, 0, WriteOpts::default()).expect("copy");
    bb.write_at(&block_of(4242), 3 * BLOCK, WriteOpts::default())
        .expect("write");
    let p = Primary::start(&a, primary_cfg(Mode::Sync, &b.addr)).expect("start");
    let st = wait(&p, "in sync", in_sync);
    wait_equal(&*a.block, &*b.backup.stack().switch);
    assert_eq!(st.resync_bytes, BLOCK, "{st:?}");
}
