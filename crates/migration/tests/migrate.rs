//! Two daemons on loopback in one process, a real NBD client (qemu-io)
//! writing through the source during migration, images compared with
//! qemu-img.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use understudy_migration::record::{self, OwnerState};
use understudy_migration::{FaultHook, Job, MigrateOptions, Mode, Phase, Status};

const SIZE: u64 = 32 << 20;

struct World {
    _tmp: tempfile::TempDir,
    a: Arc<Node>,
    b: Arc<Node>,
    b_addr: String,
    img: std::path::PathBuf,
    expected: std::path::PathBuf,
}

fn world() -> World {
    let tmp = tempfile::tempdir().unwrap();
    let a = Node::start("node-a", &tmp.path().join("a"));
    let b = Node::start("node-b", &tmp.path().join("b"));
    let img = tmp.path().join("a").join("vm.img");
    create_raw(&img, SIZE);
    seed(&img);
    let expected = tmp.path().join("expected.img");
    std::fs::copy(&img, &expected).unwrap();
    a.add_export("vm", &img);
    let b_addr = b.listen(KEY);
    World {
        _tmp: tmp,
        a,
        b,
        b_addr,
        img,
        expected,
    }
}

fn run(node: &Arc<Node>, export: &str, opts: MigrateOptions) -> Result<Status, String> {
    let job = Job::start(node.export(export), opts, node.clone()).unwrap();
    job.wait().unwrap().map_err(|e| {
        let s = job.status();
        format!("{e} (status: {s:?})")
    })
}

fn check_owned_by_b(w: &World) {
    let ra = record::load(&w.img).unwrap().unwrap();
    assert!(matches!(ra.state, OwnerState::HandedOver { ref to } if to == "node-b"));
    assert!(record::check_servable(&w.img).is_err());
    let rb = record::load(&w.b.dir.join("vm.img")).unwrap().unwrap();
    assert!(matches!(rb.state, OwnerState::Owner { .. }));
    assert_eq!(rb.generation, ra.generation);
    assert_eq!(rb.disk_id, ra.disk_id);
    assert!(!w.a.export("vm").switch.is_local());
    assert!(
        w.a.nbd.exports().get("vm").is_none(),
        "new clients must go to B"
    );
    assert!(w.b.nbd.exports().get("vm").is_some());
}

/// A writer keeps writing through A before, during and after the
/// switch-over (its connection is forwarded to B); B ends up with exactly
/// what it wrote, and its final reads see its writes.
fn under_writes(
    n: usize,
    len: u64,
    sleep_ms: u64,
    tweak: impl FnOnce(&mut MigrateOptions),
) -> (World, Status) {
    let w = world();
    let cmds = writer_script(n as u64 * 7919 + len, n, len, sleep_ms, SIZE);
    let writer = spawn_running_writer(&w.img, w.a.nbd_url("vm"), cmds.clone());
    let mut opts = w.a.opts(&w.b_addr);
    tweak(&mut opts);
    let st = run(&w.a, "vm", opts).unwrap();
    writer.join().unwrap();
    expected_image(&w.expected, &cmds);
    assert_same(&w.expected, &w.b.dir.join("vm.img"));
    check_owned_by_b(&w);
    assert_eq!(st.phase, Phase::Completed);
    assert!(st.downtime_ms.is_some());
    (w, st)
}

#[test]
fn slow_writer_precopy_converges() {
    let (_w, st) = under_writes(150, 64 << 10, 4, |_| {});
    assert_eq!(st.mode, Mode::Precopy, "{st:?}");
    assert_eq!(st.start.as_deref(), Some("fresh"));
    // Sent no more than the allocated data (8.06 MiB) plus what the writer
    // dirtied (150 x 64 KiB) plus slack for the last granule of each extent.
    assert!(st.data_bytes <= (9 << 20) + 150 * (64 << 10), "{st:?}");
    assert!(st.data_bytes >= 8 << 20, "{st:?}");
}

#[test]
fn heavy_writer_forces_mirroring() {
    let (_w, st) = under_writes(400, 256 << 10, 0, |o| {
        o.max_rounds = 1;
        o.max_downtime = Duration::from_micros(1);
    });
    assert_eq!(st.mode, Mode::Mirror, "{st:?}");
}

#[test]
fn mirror_mode_from_the_end_of_bulk() {
    let (_w, st) = under_writes(200, 64 << 10, 1, |o| {
        o.mode = Mode::Mirror;
        o.verify = true;
    });
    assert_eq!(st.mode, Mode::Mirror);
    assert!(
        st.verified_blocks > 0 && st.mismatched_blocks == 0,
        "{st:?}"
    );
}

#[test]
fn migrate_back_sends_only_what_changed() {
    let w = world();
    let st = run(&w.a, "vm", w.a.opts(&w.b_addr)).unwrap();
    assert_eq!(st.start.as_deref(), Some("fresh"));
    // Change 5 x 64 KiB on B (through its NBD export).
    let changes: Vec<String> = (0..5)
        .map(|i| format!("write -P {} {} 64k", 0x40 + i, (3 + i * 5) << 20))
        .collect();
    qemu_io(&w.b.nbd_url("vm"), &changes);
    expected_image(&w.expected, &changes);
    let a_addr = w.a.listen(KEY);
    let back = run(&w.b, "vm", w.b.opts(&a_addr)).unwrap();
    assert_eq!(back.start.as_deref(), Some("incremental"), "{back:?}");
    assert!(back.data_bytes <= 5 * (64 << 10), "{back:?}");
    assert!(back.data_bytes >= 5 * (64 << 10), "{back:?}");
    // Whole-link overhead stays small: headers, flushes, commit.
    assert!(back.bytes_sent <= back.data_bytes + 16 * 1024, "{back:?}");
    assert_same(&w.expected, &w.img);
    // A owns it again, at a higher generation; B handed it over.
    let ra = record::load(&w.img).unwrap().unwrap();
    let rb = record::load(&w.b.dir.join("vm.img")).unwrap().unwrap();
    assert!(matches!(ra.state, OwnerState::Owner { .. }));
    assert!(matches!(rb.state, OwnerState::HandedOver { .. }));
    assert_eq!(ra.generation, 3);
    assert!(w.a.export("vm").switch.is_local());
    // And once more to B: incremental again, nothing changed.
    let again = run(&w.a, "vm", w.a.opts(&w.b_addr)).unwrap();
    assert_eq!(again.start.as_deref(), Some("incremental"));
    assert_eq!(again.data_bytes, 0, "{again:?}");
}

#[test]
fn diverged_copy_falls_back_to_hash_resync() {
    let w = world();
    run(&w.a, "vm", w.a.opts(&w.b_addr)).unwrap();
    qemu_io(&w.b.nbd_url("vm"), &["write -P 0x77 1M 64k".into()]);
    expected_image(&w.expected, &["write -P 0x77 1M 64k".into()]);
    // Lose B's record of what changed: B no longer knows the base.
    let b_img = w.b.dir.join("vm.img");
    let mut rb = record::load(&b_img).unwrap().unwrap();
    rb.peers.clear();
    record::store(&b_img, &rb).unwrap();
    let a_addr = w.a.listen(KEY);
    let back = run(&w.b, "vm", w.b.opts(&a_addr)).unwrap();
    assert_eq!(back.start.as_deref(), Some("hash-resync"), "{back:?}");
    assert!(back.data_bytes <= 2 * (64 << 10), "{back:?}");
    assert_same(&w.expected, &w.img);
}

/// Cut the link when `phase` starts; A keeps serving and owning, and a
/// retry over a working link completes.
fn cut_in(phase: Phase, mode: Mode) {
    let w = world();
    let cmds = writer_script(phase as u64 + 11, 250, 64 << 10, 3, SIZE);
    let writer = spawn_running_writer(&w.img, w.a.nbd_url("vm"), cmds.clone());
    let proxy = Proxy::start(&w.b_addr);
    let cutter = Arc::new(proxy.cutter());
    let bytes = proxy.bytes.clone();
    let fired = Arc::new(AtomicBool::new(false));
    let f2 = fired.clone();
    let mut opts = w.a.opts(&proxy.addr);
    opts.mode = mode;
    opts.checkpoint = 1 << 20;
    opts.fault_hook = Some(FaultHook(Arc::new(move |p| {
        if p == phase && !f2.swap(true, Ordering::SeqCst) {
            if p == Phase::Bulk {
                // Let half of the bulk through first.
                let (bytes, cutter) = (bytes.clone(), cutter.clone());
                std::thread::spawn(move || cut_after(&bytes, 4 << 20, &*cutter));
            } else {
                cutter();
            }
        }
    })));
    if phase == Phase::Bulk {
        opts.bandwidth = Some(40 << 20);
    }
    let job = Job::start(w.a.export("vm"), opts, w.a.clone()).unwrap();
    let err = job
        .wait()
        .unwrap()
        .expect_err("the cut must fail the migration");
    let first = job.status();
    assert_eq!(first.phase, Phase::Failed);
    assert!(first.retryable, "{first:?}");
    assert!(fired.load(Ordering::SeqCst));
    assert!(
        w.a.export("vm").switch.is_local(),
        "A must stay the owner: {err}"
    );
    let ra = record::load(&w.img).unwrap().unwrap();
    assert!(matches!(ra.state, OwnerState::Owner { .. }), "{ra:?}");
    assert!(w.a.nbd.exports().get("vm").is_some());
    // Retry directly.
    let mut opts = w.a.opts(&w.b_addr);
    opts.mode = mode;
    let st = run(&w.a, "vm", opts).unwrap();
    assert_eq!(st.start.as_deref(), Some("resume"), "{st:?}");
    if phase != Phase::Bulk {
        // The bulk was complete before the cut. The resume's bulk may only
        // pick up a block the writer was writing into a hole right then
        // (allocated on disk, not yet marked in the bitmap, which happens
        // after the data write): qemu-io has one 64 KiB write in flight.
        assert!(
            st.bulk_bytes <= 2 * (64 << 10),
            "bulk was complete before the cut: {st:?}"
        );
    } else {
        // At least the 4 MiB that got through before the cut are not resent.
        assert!(
            st.bulk_bytes + (3 << 20) <= first.bulk_bytes,
            "resume must not start from zero: {first:?} then {st:?}"
        );
    }
    writer.join().unwrap();
    expected_image(&w.expected, &cmds);
    assert_same(&w.expected, &w.b.dir.join("vm.img"));
    check_owned_by_b(&w);
}

#[test]
fn link_cut_in_bulk() {
    cut_in(Phase::Bulk, Mode::Precopy);
}

#[test]
fn link_cut_while_iterating() {
    cut_in(Phase::Iterating, Mode::Precopy);
}

#[test]
fn link_cut_while_mirroring() {
    cut_in(Phase::Mirroring, Mode::Mirror);
}

#[test]
fn link_cut_at_switchover() {
    cut_in(Phase::Switchover, Mode::Precopy);
}

/// B goes away mid-bulk (its service and sessions stop, as if killed) and
/// comes back from its directory: the retry resumes from B's record.
#[test]
fn target_restart_resumes() {
    let w = world();
    let proxy = Proxy::start(&w.b_addr);
    let cutter = Arc::new(proxy.cutter());
    let bytes = proxy.bytes.clone();
    let b = w.b.clone();
    let mut opts = w.a.opts(&proxy.addr);
    opts.checkpoint = 1 << 20;
    opts.bandwidth = Some(40 << 20);
    opts.fault_hook = Some(FaultHook(Arc::new(move |p| {
        if p == Phase::Bulk {
            let (bytes, cutter, b) = (bytes.clone(), cutter.clone(), b.clone());
            std::thread::spawn(move || {
                cut_after(&bytes, 4 << 20, &|| {
                    cutter();
                    b.stop_listening();
                })
            });
        }
    })));
    run(&w.a, "vm", opts).expect_err("B died");
    // B's partial copy is not servable.
    let b_img = w.b.dir.join("vm.img");
    assert!(record::check_servable(&b_img).is_err());
    wait_sidecar_free(&b_img);
    let b2 = Node::start("node-b", &w.b.dir);
    let addr = b2.listen(KEY);
    let st = run(&w.a, "vm", w.a.opts(&addr)).unwrap();
    assert_eq!(st.start.as_deref(), Some("resume"));
    assert!(st.bulk_bytes < 6 << 20, "{st:?}");
    assert_same(&w.expected, &b_img);
}

#[test]
fn wrong_key_is_refused_and_a_keeps_serving() {
    let w = world();
    let other = Node::start("node-c", &w.b.dir.join("../c"));
    let addr = other.listen(b"a-completely-different-key-0123456789abcdef");
    let err = run(&w.a, "vm", w.a.opts(&addr)).unwrap_err();
    assert!(err.contains("same --peer-key"), "{err}");
    qemu_io(
        &w.a.nbd_url("vm"),
        &["write -P 5 0 64k".into(), "read -P 5 0 64k".into()],
    );
    assert!(w.a.export("vm").switch.is_local());
}

#[test]
fn wrong_version_is_refused_with_an_explanation() {
    let w = world();
    let link =
        understudy_peer::Link::connect(&w.b_addr, &peer_cfg("node-x", KEY), "migrate").unwrap();
    let hello = understudy_migration::wire::Hello {
        min_version: 7,
        max_version: 9,
        migration_id: [1; 16],
        disk_id: [2; 16],
        generation: 1,
        base_generation: 0,
        size: SIZE,
        format: 0,
        granularity: 65536,
        name: "vm".into(),
    };
    let (t, b) = understudy_migration::wire::Msg::Hello(hello)
        .to_vec()
        .unwrap();
    link.send(t, &b).unwrap();
    let (_tx, mut rx) = link.split();
    match rx.recv() {
        Err(understudy_peer::PeerError::Remote { message, .. }) => {
            assert!(
                message.contains("7..9") && message.contains("upgrade"),
                "{message}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(
        !w.b.dir.join("vm.img").exists(),
        "nothing created for a refused source"
    );
}

#[test]
fn full_disk_on_target_fails_cleanly_then_retry_completes() {
    use std::sync::atomic::AtomicU64;
    let w = world();
    w.b.stop_listening();
    let budget = Arc::new(AtomicU64::new(3 << 20));
    let full = Arc::new(AtomicBool::new(true));
    let (b2, f2) = (budget.clone(), full.clone());
    let wrap: understudy_migration::DiskWrapper =
        Arc::new(move |d| Arc::new(EnospcDisk(d, b2.clone(), f2.clone())) as _);
    let addr = w.b.listen_with(KEY, Some(wrap));
    let mut opts = w.a.opts(&addr);
    opts.checkpoint = 1 << 20;
    let err = run(&w.a, "vm", opts).unwrap_err();
    assert!(err.contains("full"), "{err}");
    assert!(w.a.export("vm").switch.is_local());
    qemu_io(&w.a.nbd_url("vm"), &["write -P 9 5M 64k".into()]);
    expected_image(&w.expected, &["write -P 9 5M 64k".into()]);
    // Space freed: the retry resumes and completes.
    full.store(false, Ordering::SeqCst);
    let st = run(&w.a, "vm", w.a.opts(&addr)).unwrap();
    assert_eq!(st.start.as_deref(), Some("resume"));
    assert_same(&w.expected, &w.b.dir.join("vm.img"));
}

#[test]
fn verify_detects_a_corrupted_target() {
    let w = world();
    let b_img = w.b.dir.join("vm.img");
    let mut opts = w.a.opts(&w.b_addr);
    opts.verify = true;
    let p = b_img.clone();
    opts.fault_hook = Some(FaultHook(Arc::new(move |ph| {
        if ph == Phase::Verifying {
            corrupt(&p, 9 << 20);
        }
    })));
    let err = run(&w.a, "vm", opts).unwrap_err();
    assert!(err.contains("1 blocks that differ"), "{err}");
}

fn cut_after(bytes: &std::sync::atomic::AtomicU64, n: u64, cut: &dyn Fn()) {
    let t = std::time::Instant::now();
    while bytes.load(Ordering::Relaxed) < n && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(1));
    }
    cut();
}

fn corrupt(p: &Path, off: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_at(b"garbage", off).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn handed_over_export_refuses_a_second_migration() {
    let w = world();
    run(&w.a, "vm", w.a.opts(&w.b_addr)).unwrap();
    let err = run(&w.a, "vm", w.a.opts(&w.b_addr)).unwrap_err();
    assert!(err.contains("does not own"), "{err}");
}

/// A disk that runs out of space after a budget while `full` is set.
#[derive(Debug)]
struct EnospcDisk(
    Arc<dyn understudy_block::Disk>,
    Arc<std::sync::atomic::AtomicU64>,
    Arc<AtomicBool>,
);

mod enospc {
    use std::sync::atomic::Ordering;

    use understudy_block::*;

    use super::EnospcDisk;

    impl DiskSize for EnospcDisk {
        fn size(&self) -> u64 {
            self.0.size()
        }
    }
    impl DiskRead for EnospcDisk {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            self.0.read_at(buf, offset)
        }
    }
    impl DiskWrite for EnospcDisk {
        fn write_at(&self, buf: &[u8], offset: u64, opts: WriteOpts) -> Result<()> {
            let left = self.1.load(Ordering::SeqCst);
            if self.2.load(Ordering::SeqCst) && left < buf.len() as u64 {
                return Err(BlockError::Write {
                    offset,
                    len: buf.len() as u64,
                    source: std::io::Error::from_raw_os_error(libc_enospc()),
                });
            }
            self.1
                .fetch_sub(left.min(buf.len() as u64), Ordering::SeqCst);
            self.0.write_at(buf, offset, opts)
        }
        fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> Result<()> {
            self.0.write_zeroes(offset, len, opts)
        }
        fn discard(&self, offset: u64, len: u64, opts: WriteOpts) -> Result<()> {
            self.0.discard(offset, len, opts)
        }
        fn flush(&self) -> Result<()> {
            self.0.flush()
        }
    }
    impl DiskMap for EnospcDisk {
        fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
            self.0.map(offset, len)
        }
    }
    impl Disk for EnospcDisk {
        fn info(&self) -> DiskInfo {
            self.0.info()
        }
    }
    fn libc_enospc() -> i32 {
        28
    }
}

/// A client stays connected to A while the disk goes to B and straight back
/// (its requests are forwarded A → B, and B's commit back to A must not
/// wait on them: this deadlocked once).
#[test]
fn ping_pong_under_a_forwarded_client() {
    let w = world();
    let a_addr = w.a.listen(KEY);
    let cmds = writer_script(99, 400, 64 << 10, 2, SIZE);
    let writer = spawn_running_writer(&w.img, w.a.nbd_url("vm"), cmds.clone());
    let there = run(&w.a, "vm", w.a.opts(&w.b_addr)).unwrap();
    assert_eq!(there.start.as_deref(), Some("fresh"));
    let back = run(&w.b, "vm", w.b.opts(&a_addr)).unwrap();
    assert_eq!(back.start.as_deref(), Some("incremental"), "{back:?}");
    let again = run(&w.a, "vm", w.a.opts(&w.b_addr)).unwrap();
    assert_eq!(again.start.as_deref(), Some("incremental"), "{again:?}");
    writer.join().unwrap();
    expected_image(&w.expected, &cmds);
    assert_same(&w.expected, &w.b.dir.join("vm.img"));
}

/// The commit reached B and B took ownership, but its answer never came
/// back: A is in doubt and fails I/O rather than risk two owners. Retrying
/// the migration to B settles it: B says the commit stands, A records the
/// handover, and a later migrate-back is incremental as after any commit.
#[test]
fn lost_commit_answer_is_settled_by_a_retry_when_the_target_committed() {
    let w = world();
    w.b.stop_listening();
    let b_addr =
        w.b.listen_with_commit_fault(KEY, understudy_migration::CommitFault::LoseAnswer);
    let err = run(&w.a, "vm", w.a.opts(&b_addr)).expect_err("the answer was lost");
    assert!(err.contains("in doubt") && err.contains("retry"), "{err}");
    let ra = record::load(&w.img).unwrap().unwrap();
    assert!(
        matches!(ra.state, OwnerState::Handing { .. }),
        "{ra:?} after {err}"
    );
    assert!(!w.a.export("vm").switch.is_local(), "A must not serve on");
    let url = w.a.nbd_url("vm");
    let out = tool("qemu-io")
        .args(["-f", "raw", "-c", "read 0 4k", &url])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("error")
            || String::from_utf8_lossy(&out.stderr).contains("error")
            || !out.status.success(),
        "I/O on A must fail while ownership is in doubt"
    );
    let rb = record::load(&w.b.dir.join("vm.img")).unwrap().unwrap();
    assert!(matches!(rb.state, OwnerState::Owner { .. }));

    // A retry to a different node is refused with the node to use.
    let c_dir = w._tmp.path().join("c");
    let c = Node::start("node-c", &c_dir);
    let c_addr = c.listen(KEY);
    let e = run(&w.a, "vm", w.a.opts(&c_addr)).expect_err("wrong node");
    assert!(e.contains("node-b"), "{e}");

    let st = run(&w.a, "vm", w.a.opts(&b_addr)).expect("settled");
    assert_eq!(st.phase, Phase::Completed);
    assert_eq!(st.start.as_deref(), Some("settled"));
    assert!(
        st.settled.as_deref().unwrap().contains("committed"),
        "{st:?}"
    );
    assert_eq!(st.data_bytes, 0);
    check_owned_by_b(&w);
    assert_same(&w.expected, &w.b.dir.join("vm.img"));

    // Back to A: incremental, nothing changed.
    let a_addr = w.a.listen(KEY);
    let back = run(&w.b, "vm", w.b.opts(&a_addr)).unwrap();
    assert_eq!(back.start.as_deref(), Some("incremental"), "{back:?}");
    assert_eq!(back.data_bytes, 0, "{back:?}");
}

/// B died on receipt of the commit, before committing: A is in doubt; a
/// retry finds B still receiving, so A is the owner again, its clients get
/// their disk back, and the migration resumes and completes.
#[test]
fn lost_commit_answer_is_settled_by_a_retry_when_the_target_did_not_commit() {
    let w = world();
    w.b.stop_listening();
    let b_addr =
        w.b.listen_with_commit_fault(KEY, understudy_migration::CommitFault::DieBeforeCommit);
    run(&w.a, "vm", w.a.opts(&b_addr)).expect_err("no answer");
    let ra = record::load(&w.img).unwrap().unwrap();
    assert!(matches!(ra.state, OwnerState::Handing { .. }), "{ra:?}");
    assert!(!w.a.export("vm").switch.is_local());
    let rb = record::load(&w.b.dir.join("vm.img")).unwrap().unwrap();
    assert!(matches!(rb.state, OwnerState::Receiving { .. }), "{rb:?}");

    // The retry settles (A keeps the disk) and then finishes the move.
    let st = run(&w.a, "vm", w.a.opts(&b_addr)).expect("resumed");
    assert!(st.settled.as_deref().unwrap().contains("kept"), "{st:?}");
    assert_eq!(st.start.as_deref(), Some("resume"), "{st:?}");
    assert!(
        st.bulk_bytes == 0,
        "everything was sent before the commit: {st:?}"
    );
    check_owned_by_b(&w);
    assert_same(&w.expected, &w.b.dir.join("vm.img"));
}

/// In mirror mode a guest write-zeroes reaches B (`MirrorZero`, protocol
/// version 2) before the guest sees it acknowledged, like a data write.
#[test]
fn mirror_mode_mirrors_write_zeroes() {
    let w = world();
    let mut cmds = Vec::new();
    for i in 0..150u64 {
        let off = (i * 7 % 60) * (512 << 10);
        cmds.push(format!("write -z {off} 512k"));
        cmds.push("sleep 4".into());
    }
    let writer = spawn_running_writer(&w.img, w.a.nbd_url("vm"), cmds.clone());
    // Every guest write marks this bitmap; it shows when writes happen.
    let store = w.a.export("vm").store;
    store.add("probe", 64 << 10).unwrap();
    let mut opts = w.a.opts(&w.b_addr);
    opts.mode = Mode::Mirror;
    // Stay in the mirroring phase until guest write-zeroes certainly
    // arrived while mirroring (the hook runs on the job thread once
    // mirroring is on): qemu-io writes one request at a time, so the second
    // write seen after the hook started began after mirroring did.
    opts.fault_hook = Some(FaultHook(Arc::new(move |p| {
        if p == Phase::Mirroring {
            for _ in 0..2 {
                store.clear("probe").unwrap();
                let bm = store.get("probe").unwrap();
                let t = std::time::Instant::now();
                // Without a write for this long the assertion below fails.
                while bm.dirty_bytes() == 0 && t.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    })));
    let st = run(&w.a, "vm", opts).unwrap();
    writer.join().unwrap();
    expected_image(&w.expected, &cmds);
    assert_same(&w.expected, &w.b.dir.join("vm.img"));
    check_owned_by_b(&w);
    assert_eq!(st.mode, Mode::Mirror);
    // Only write-zeroes ran during the migration: whatever was mirrored
    // was a write-zeroes.
    assert!(st.mirrored_bytes >= 512 << 10, "{st:?}");
}
