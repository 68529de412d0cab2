//! qcow2 backend against the real QEMU tools: images made or checked by
//! qemu-img / qemu-io must agree with what `Qcow2Disk` reads, writes and maps.
//!
//! These tests need qemu-img and qemu-io and fail (not skip) without them.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use understudy_block::qcow2::Qcow2Disk;
use understudy_block::raw::RawDisk;
use understudy_block::{
    Disk, DiskMap, DiskRead, DiskSize, DiskWrite, ErrorKind, Extent, ExtentKind, Format,
    OpenOptions, WriteOpts, ZeroOpts, coalesce, error_chain, open_disk,
};

const MIB: u64 = 1 << 20;
const CLUSTER: u64 = 65536;

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd).args(args).output().unwrap_or_else(|e| {
        panic!("{cmd} is required for these tests (apt-get install qemu-utils): {e}")
    })
}

/// Run a tool and require success; returns stdout.
fn tool(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn qemu_img_create(path: &Path, size: u64, backing: Option<(&Path, &str)>, extra: &[&str]) {
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(extra);
    if let Some((b, f)) = backing {
        args.extend_from_slice(&["-b", p(b), "-F", f]);
    }
    args.push(p(path));
    args.push(&size);
    tool("qemu-img", &args);
}

fn qemu_io(path: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(p(path));
    tool("qemu-io", &args);
}

fn qemu_img_check(path: &Path) {
    let out = run("qemu-img", &["check", "-f", "qcow2", p(path)]);
    assert!(
        out.status.success(),
        "qemu-img check {} failed ({}): {}{}",
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qemu_img_identical(a: &Path, a_fmt: &str, b: &Path, b_fmt: &str) {
    let out = run(
        "qemu-img",
        &["compare", "-f", a_fmt, "-F", b_fmt, p(a), p(b)],
    );
    assert!(
        out.status.success(),
        "qemu-img compare {} {} says they differ: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deterministic bytes that differ per seed and position.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn read_all(d: &dyn Disk) -> Vec<u8> {
    let mut buf = vec![0u8; d.size() as usize];
    d.read_at(&mut buf, 0).unwrap();
    buf
}

/// Every extent of a disk, coalesced, checking the `map` contract on the way.
fn full_map(d: &dyn Disk) -> Vec<Extent> {
    let mut all = Vec::new();
    let mut pos = 0;
    while pos < d.size() {
        let ext = d.map(pos, d.size() - pos).unwrap();
        assert!(!ext.is_empty(), "map({pos}) returned nothing");
        let mut at = pos;
        for e in &ext {
            assert_eq!(e.offset, at, "extents must be contiguous");
            assert!(e.len > 0);
            at = e.end();
        }
        assert!(at <= d.size());
        pos = at;
        all.extend(ext);
    }
    coalesce(&mut all);
    all
}

/// `qemu-img map --output=json`, classified like `ExtentKind`, coalesced.
/// Also returns, per entry, whether a host offset was reported.
fn qemu_map(path: &Path) -> (Vec<Extent>, Vec<(Extent, bool)>) {
    let out = tool(
        "qemu-img",
        &["map", "--output=json", "-f", "qcow2", p(path)],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut raw = Vec::new();
    for e in v.as_array().unwrap() {
        let data = e["data"].as_bool().unwrap();
        let zero = e["zero"].as_bool().unwrap();
        let present = e["present"].as_bool().unwrap();
        let depth = e["depth"].as_u64().unwrap();
        let kind = if data && depth > 0 {
            ExtentKind::Backing
        } else if data {
            ExtentKind::Data
        } else if !present {
            ExtentKind::Hole
        } else {
            assert!(zero, "present, no data, not zero: {e}");
            ExtentKind::Zero
        };
        let ext = Extent {
            offset: e["start"].as_u64().unwrap(),
            len: e["length"].as_u64().unwrap(),
            kind,
        };
        raw.push((ext, e.get("offset").is_some()));
    }
    let mut ext: Vec<Extent> = raw.iter().map(|(e, _)| *e).collect();
    coalesce(&mut ext);
    (ext, raw)
}

/// One data-changing request, applied identically to a qcow2 and a raw disk.
#[derive(Clone, Copy, Debug)]
enum Op {
    Write(u64, usize, u64),
    Zero { off: u64, len: u64, unmap: bool },
    Discard(u64, u64),
}

fn apply(d: &dyn Disk, op: Op) {
    match op {
        Op::Write(off, len, seed) => d
            .write_at(&pattern(seed, len), off, WriteOpts::default())
            .unwrap(),
        Op::Zero { off, len, unmap } => d
            .write_zeroes(
                off,
                len,
                ZeroOpts {
                    may_unmap: unmap,
                    ..Default::default()
                },
            )
            .unwrap(),
        Op::Discard(off, len) => d.discard(off, len, WriteOpts::default()).unwrap(),
    }
}

fn ops(size: u64) -> Vec<Op> {
    vec![
        Op::Write(0, CLUSTER as usize, 1),
        Op::Write(70_000, 5_000, 2),
        Op::Write(3 * CLUSTER - 100, 300, 3),
        Op::Write(1_000_001, 200_000, 4),
        Op::Zero {
            off: 2 * CLUSTER,
            len: 2 * CLUSTER,
            unmap: true,
        },
        Op::Zero {
            off: 1_050_000,
            len: 70_000,
            unmap: false,
        },
        Op::Discard(1_100_000, 100_000),
        Op::Discard(0, CLUSTER),
        Op::Write(size - 1, 1, 5),
        Op::Write(2 * MIB + 512, 3 * 4096, 6),
        Op::Zero {
            off: 512 * 1024,
            len: CLUSTER,
            unmap: false,
        },
        Op::Write(512 * 1024 + 1000, 10, 7),
        Op::Zero {
            off: 3 * MIB + 10,
            len: size - (3 * MIB + 10) - 7,
            unmap: true,
        },
        Op::Write(3 * MIB + 5, 20, 8),
        Op::Discard(2 * MIB + 4096, 2 * CLUSTER),
        Op::Write(1_000_000 - 3, 6, 9),
    ]
}

/// Apply `ops` to `image` (qcow2) and to a raw copy of its initial
/// contents, then require identical contents, a clean `qemu-img check`, and
/// `qemu-img compare` agreement.
fn ops_match_raw(dir: &Path, image: &Path) {
    let reference = dir.join("ref.raw");
    tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            p(image),
            p(&reference),
        ],
    );
    {
        let q = Qcow2Disk::open(image, false).unwrap();
        let r = RawDisk::open(&reference, false).unwrap();
        assert_eq!(q.size(), r.size());
        assert_eq!(read_all(&q), read_all(&r), "initial contents differ");
        for op in ops(q.size()) {
            apply(&q, op);
            apply(&r, op);
        }
        assert_eq!(read_all(&q), read_all(&r), "contents differ after the ops");
        q.flush().unwrap();
    }
    qemu_img_check(image);
    qemu_img_identical(image, "qcow2", &reference, "raw");
}

#[test]
fn writes_zeroes_discards_match_raw_without_backing() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("a.qcow2");
    qemu_img_create(&img, 4 * MIB, None, &[]);
    ops_match_raw(t.path(), &img);
}

#[test]
fn writes_zeroes_discards_match_raw_over_raw_backing() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("base.raw");
    {
        let b = RawDisk::create(&base, 4 * MIB).unwrap();
        b.write_at(&pattern(100, 3 * MIB as usize / 2), 0, WriteOpts::default())
            .unwrap();
        b.write_at(&pattern(101, 4096), 3 * MIB + 8192, WriteOpts::default())
            .unwrap();
    }
    let img = t.path().join("ov.qcow2");
    qemu_img_create(&img, 4 * MIB, Some((&base, "raw")), &[]);
    ops_match_raw(t.path(), &img);
    // The backing file must be untouched.
    let b = RawDisk::open(&base, true).unwrap();
    let mut head = vec![0u8; 3 * MIB as usize / 2];
    b.read_at(&mut head, 0).unwrap();
    assert_eq!(head, pattern(100, head.len()));
}

#[test]
fn writes_zeroes_discards_match_raw_over_qcow2_backing() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("base.qcow2");
    qemu_img_create(&base, 4 * MIB, None, &[]);
    qemu_io(
        &base,
        &[
            "write -P 0x5a 0 1M",
            "write -P 0x33 1200k 300k",
            "write -z 256k 64k",
            "write -c -P 0x77 2M 128k",
            "write -P 0x44 4032k 64k",
        ],
    );
    let img = t.path().join("ov.qcow2");
    qemu_img_create(&img, 4 * MIB, Some((&base, "qcow2")), &[]);
    ops_match_raw(t.path(), &img);
    qemu_img_check(&base);
}

#[test]
fn open_disk_detects_qcow2_and_honours_read_only() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("x.img");
    qemu_img_create(&img, MIB, None, &[]);
    qemu_io(&img, &["write -P 0xab 0 64k"]);

    let d = open_disk(&OpenOptions::new(&img)).unwrap();
    let info = d.info();
    assert_eq!(info.format, Format::Qcow2);
    assert_eq!(info.size, MIB);
    assert!(!info.read_only && info.can_discard && info.can_fast_zero);
    assert!(info.flush_covers_all_handles);
    let mut b = vec![0u8; 4096];
    d.read_at(&mut b, 4096).unwrap();
    assert!(b.iter().all(|&x| x == 0xab));
    drop(d);

    let ro = open_disk(&OpenOptions {
        read_only: true,
        ..OpenOptions::new(&img)
    })
    .unwrap();
    assert!(ro.info().read_only);
    let e = ro.write_at(&[1], 0, WriteOpts::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReadOnly);
    let e = ro.write_zeroes(0, 1, ZeroOpts::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReadOnly);
    let e = ro.discard(0, 1, WriteOpts::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReadOnly);
    ro.flush().unwrap();

    // Out-of-range requests are rejected, not clamped.
    let e = ro.read_at(&mut b, MIB - 100).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfBounds);
    assert!(ro.map(MIB, 1).is_err());

    // A raw file next to it is still raw.
    let raw = t.path().join("y.img");
    std::fs::write(&raw, vec![0u8; 4096]).unwrap();
    assert_eq!(
        open_disk(&OpenOptions::new(&raw)).unwrap().info().format,
        Format::Raw
    );
}

#[test]
fn map_agrees_with_qemu_img_map_across_a_chain() {
    let t = tempfile::tempdir().unwrap();
    // Sparse raw base: data at 1M (4K) and 3M (128K), holes elsewhere.
    let base = t.path().join("base.raw");
    {
        let b = RawDisk::create(&base, 8 * MIB).unwrap();
        b.write_at(&pattern(1, 4096), MIB, WriteOpts::default())
            .unwrap();
        b.write_at(&pattern(2, 128 * 1024), 3 * MIB, WriteOpts::default())
            .unwrap();
    }
    // Middle qcow2 on the raw base, written by qemu-io.
    let mid = t.path().join("mid.qcow2");
    qemu_img_create(&mid, 8 * MIB, Some((&base, "raw")), &[]);
    qemu_io(
        &mid,
        &[
            "write -P 0x11 0 64k",
            "write -z 64k 128k",
            "write -c -P 0x22 4M 64k",
            "write -z 3M 64k",
            "write -P 0x33 5M 192k",
        ],
    );
    // Top qcow2, larger than its backing, written by us.
    let top = t.path().join("top.qcow2");
    qemu_img_create(&top, 12 * MIB, Some((&mid, "qcow2")), &[]);
    {
        let d = Qcow2Disk::open(&top, false).unwrap();
        d.write_at(&pattern(3, 4096), 6 * MIB + 100, WriteOpts::default())
            .unwrap();
        d.write_at(&pattern(4, 70_000), 10 * MIB, WriteOpts::default())
            .unwrap();
        d.discard(0, CLUSTER, WriteOpts::default()).unwrap();
        // Data in mid at 5M..5M+192K: zero the middle cluster.
        d.write_zeroes(5 * MIB + CLUSTER, CLUSTER, ZeroOpts::default())
            .unwrap();
        d.write_zeroes(
            7 * MIB,
            2 * CLUSTER,
            ZeroOpts {
                may_unmap: true,
                ..Default::default()
            },
        )
        .unwrap();
    }

    for img in [&mid, &top] {
        let (expected, _) = qemu_map(img);
        let d = Qcow2Disk::open(img, true).unwrap();
        let ours = full_map(&d);
        assert_eq!(
            ours,
            expected,
            "map of {} differs from qemu-img",
            img.display()
        );
    }

    // Spot checks that the comparison is not vacuous.
    let d = Qcow2Disk::open(&top, true).unwrap();
    let kind_at = |off: u64| d.map(off, 1).unwrap()[0].kind;
    assert_eq!(kind_at(0), ExtentKind::Zero); // discarded over backing data
    assert_eq!(kind_at(MIB), ExtentKind::Backing); // raw base data
    assert_eq!(kind_at(2 * MIB), ExtentKind::Zero); // raw base hole
    assert_eq!(kind_at(3 * MIB), ExtentKind::Zero); // zeroed in mid
    assert_eq!(kind_at(4 * MIB), ExtentKind::Backing); // compressed in mid
    assert_eq!(kind_at(9 * MIB), ExtentKind::Hole); // past the backing's end
    assert_eq!(kind_at(10 * MIB), ExtentKind::Data);
    // A sub-range query starts where asked and stays inside it.
    let e = d.map(5 * MIB + 10, 100).unwrap();
    assert_eq!(
        e,
        vec![Extent {
            offset: 5 * MIB + 10,
            len: 100,
            kind: ExtentKind::Backing // data in mid
        }]
    );
}

#[test]
fn zeroes_keep_or_release_host_clusters_as_asked() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("z.qcow2");
    qemu_img_create(&img, 2 * MIB, None, &[]);
    {
        let d = Qcow2Disk::open(&img, false).unwrap();
        d.write_at(&pattern(9, 4 * CLUSTER as usize), 0, WriteOpts::default())
            .unwrap();
        d.write_zeroes(0, 2 * CLUSTER, ZeroOpts::default()).unwrap();
        d.write_zeroes(
            2 * CLUSTER,
            2 * CLUSTER,
            ZeroOpts {
                may_unmap: true,
                ..Default::default()
            },
        )
        .unwrap();
        let mut b = vec![1u8; 4 * CLUSTER as usize];
        d.read_at(&mut b, 0).unwrap();
        assert!(b.iter().all(|&x| x == 0));
    }
    qemu_img_check(&img);
    let (_, raw) = qemu_map(&img);
    let at = |off: u64| {
        raw.iter()
            .find(|(e, _)| e.offset <= off && off < e.end())
            .copied()
            .unwrap()
    };
    let (kept, kept_has_offset) = at(0);
    assert_eq!(kept.kind, ExtentKind::Zero);
    assert!(
        kept_has_offset,
        "may_unmap=false must keep the host cluster"
    );
    let (freed, freed_has_offset) = at(2 * CLUSTER);
    assert_eq!(freed.kind, ExtentKind::Zero);
    assert!(
        !freed_has_offset,
        "may_unmap=true must release the host cluster"
    );
}

#[test]
fn images_written_by_qemu_io_read_back() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("q.qcow2");
    qemu_img_create(&img, 4 * MIB, None, &[]);
    qemu_io(
        &img,
        &[
            "write -P 0xab 0 64k",
            "write -P 0xcd 100000 5000",
            "write -z 32k 4k",
            "write -c -P 0x11 1M 64k",
            "write -P 0xee 4194303 1",
        ],
    );
    let mut expect = vec![0u8; 4 * MIB as usize];
    expect[..65536].fill(0xab);
    expect[100_000..105_000].fill(0xcd);
    expect[32768..36864].fill(0);
    expect[MIB as usize..MIB as usize + 65536].fill(0x11);
    expect[4 * MIB as usize - 1] = 0xee;

    let d = Qcow2Disk::open(&img, false).unwrap();
    assert_eq!(read_all(&d), expect);
    // Unaligned reads straddling every kind of cluster.
    for (off, len) in [(30_000u64, 10_000usize), (99_999, 5_002), (MIB - 7, 20)] {
        let mut b = vec![0u8; len];
        d.read_at(&mut b, off).unwrap();
        assert_eq!(b, expect[off as usize..off as usize + len]);
    }

    // And the other way round: what we write, qemu-io reads.
    d.write_at(&[0x42; 3000], 2 * MIB + 17, WriteOpts::default())
        .unwrap();
    d.write_at(&[0x43; 65536], MIB + 4096, WriteOpts::default())
        .unwrap(); // into the compressed cluster
    drop(d);
    qemu_img_check(&img);
    qemu_io(
        &img,
        &[
            "read -P 0x42 2097169 3000",
            "read -P 0 2097152 17",
            "read -P 0x11 1M 4k",
            "read -P 0x43 1052672 64k",
            "read -P 0xab 0 32k",
        ],
    );
    // The verification must be able to fail.
    assert!(
        !run(
            "qemu-io",
            &["-f", "qcow2", "-c", "read -P 0x42 0 4k", p(&img)]
        )
        .status
        .success()
    );
}

#[test]
fn create_makes_images_qemu_accepts() {
    let t = tempfile::tempdir().unwrap();
    let raw_base = t.path().join("b.raw");
    std::fs::write(&raw_base, pattern(5, MIB as usize)).unwrap();
    let q_base = t.path().join("b.qcow2");
    qemu_img_create(&q_base, MIB, None, &[]);
    qemu_io(&q_base, &["write -P 0x61 64k 64k"]);

    let plain = t.path().join("plain.qcow2");
    let on_raw = t.path().join("on-raw.qcow2");
    let on_qcow2 = t.path().join("on-qcow2.qcow2");
    {
        let d = Qcow2Disk::create(&plain, 3 * MIB + 512, None).unwrap();
        assert_eq!(d.size(), 3 * MIB + 512);
        assert_eq!(d.version(), 3);
        assert!(read_all(&d).iter().all(|&x| x == 0));
        d.write_at(b"tail", 3 * MIB + 508, WriteOpts::default())
            .unwrap();

        let d = Qcow2Disk::create(&on_raw, MIB, Some((&raw_base, Format::Raw))).unwrap();
        assert_eq!(read_all(&d), pattern(5, MIB as usize));
        d.write_at(b"top", 10, WriteOpts::default()).unwrap();

        // Relative backing names resolve against the image's directory.
        let d = Qcow2Disk::create(
            &on_qcow2,
            2 * MIB,
            Some((Path::new("b.qcow2"), Format::Qcow2)),
        )
        .unwrap();
        let mut b = vec![0u8; 65536];
        d.read_at(&mut b, 65536).unwrap();
        assert!(b.iter().all(|&x| x == 0x61));
        assert_eq!(d.map(MIB, MIB).unwrap()[0].kind, ExtentKind::Hole);
    }
    for img in [&plain, &on_raw, &on_qcow2] {
        qemu_img_check(img);
    }
    let info = tool(
        "qemu-img",
        &["info", "--output=json", "--backing-chain", p(&on_qcow2)],
    );
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v[0]["backing-filename-format"], "qcow2");
    assert_eq!(v[0]["format-specific"]["data"]["compat"], "1.1");
    assert_eq!(v[1]["filename"].as_str().unwrap(), p(&q_base));
    qemu_io(&on_raw, &["read -P 0x74 10 1", "read -P 0x6f 11 1"]);
    qemu_io(&plain, &["read -P 0x74 3146236 1"]);

    // A missing backing file is an error at create time, and leaves no
    // image behind.
    let orphan = t.path().join("orphan.qcow2");
    let e =
        Qcow2Disk::create(&orphan, MIB, Some((Path::new("nope.raw"), Format::Raw))).unwrap_err();
    assert!(e.to_string().contains("nope.raw"), "{e}");
    assert!(!orphan.exists());
    // So is a backing file in the wrong format.
    let e = Qcow2Disk::create(&orphan, MIB, Some((&raw_base, Format::Qcow2))).unwrap_err();
    assert!(e.to_string().contains("qcow2"), "{e}");
    assert!(!orphan.exists());
}

#[test]
fn second_writable_open_is_refused_until_the_first_closes() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("l.qcow2");
    let d = Qcow2Disk::create(&img, MIB, None).unwrap();
    let e = Qcow2Disk::open(&img, false).unwrap_err();
    assert!(e.to_string().contains("already open"), "{e}");
    // Create must not truncate an image that is open for writing either.
    assert!(Qcow2Disk::create(&img, MIB, None).is_err());
    // Read-only observers are allowed.
    let ro = Qcow2Disk::open(&img, true).unwrap();
    drop(ro);
    drop(d);
    Qcow2Disk::open(&img, false).unwrap();
}

#[test]
fn fua_write_is_visible_to_a_fresh_reader_without_flush() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("f.qcow2");
    let d = Qcow2Disk::create(&img, 4 * MIB, None).unwrap();
    // Allocating writes change L2 tables and refcounts, which imago caches:
    // only a FUA write (or a flush) puts them in the file.
    d.write_at(&[0x5c; 8192], 2 * MIB + 3, WriteOpts::fua())
        .unwrap();
    d.write_zeroes(
        2 * MIB,
        1,
        ZeroOpts {
            write: WriteOpts::fua(),
            ..Default::default()
        },
    )
    .unwrap();
    let reader = Qcow2Disk::open(&img, true).unwrap();
    let mut b = vec![0u8; 8195];
    reader.read_at(&mut b, 2 * MIB).unwrap();
    assert_eq!(b[..3], [0, 0, 0]);
    assert!(b[3..].iter().all(|&x| x == 0x5c));
    drop(reader);
    drop(d);
    qemu_img_check(&img);
}

#[test]
fn fast_zero_only_when_no_bytes_need_writing() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("fz.qcow2");
    let d = Qcow2Disk::create(&img, 2 * MIB, None).unwrap();
    let fast = ZeroOpts {
        fast_only: true,
        ..Default::default()
    };
    d.write_at(&[7u8; 2 * CLUSTER as usize], 0, WriteOpts::default())
        .unwrap();
    // Whole clusters: fine.
    d.write_zeroes(CLUSTER, CLUSTER, fast).unwrap();
    // Partial data cluster: refused, and nothing changed.
    let e = d.write_zeroes(100, 1000, fast).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotSupported);
    let mut b = vec![0u8; 2 * CLUSTER as usize];
    d.read_at(&mut b, 0).unwrap();
    assert!(b[..CLUSTER as usize].iter().all(|&x| x == 7));
    assert!(b[CLUSTER as usize..].iter().all(|&x| x == 0));
    // Partial clusters that already read as zero: fine.
    d.write_zeroes(CLUSTER + 5, 3 * CLUSTER, fast).unwrap();
    // The slow path does the partial cluster.
    d.write_zeroes(100, 1000, ZeroOpts::default()).unwrap();
    d.read_at(&mut b[..2000], 0).unwrap();
    assert!(b[..100].iter().all(|&x| x == 7));
    assert!(b[100..1100].iter().all(|&x| x == 0));
    assert!(b[1100..2000].iter().all(|&x| x == 7));
    drop(d);
    qemu_img_check(&img);
}

#[test]
fn version2_images_work_without_zero_clusters() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("v2.qcow2");
    qemu_img_create(&img, 2 * MIB, None, &["-o", "compat=0.10"]);
    let d = Qcow2Disk::open(&img, false).unwrap();
    assert_eq!(d.version(), 2);
    let info = d.info();
    assert!(!info.can_discard && !info.can_fast_zero);
    d.write_at(&[9u8; 300_000], 1000, WriteOpts::default())
        .unwrap();
    let e = d
        .write_zeroes(
            0,
            CLUSTER,
            ZeroOpts {
                fast_only: true,
                ..Default::default()
            },
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotSupported);
    d.write_zeroes(
        50_000,
        100_000,
        ZeroOpts {
            may_unmap: true,
            ..Default::default()
        },
    )
    .unwrap();
    d.discard(200_000, 10, WriteOpts::default()).unwrap(); // advisory no-op
    let mut b = vec![0u8; 301_000];
    d.read_at(&mut b, 0).unwrap();
    assert!(b[..1000].iter().all(|&x| x == 0));
    assert!(b[1000..50_000].iter().all(|&x| x == 9));
    assert!(b[50_000..150_000].iter().all(|&x| x == 0));
    assert!(b[150_000..301_000].iter().all(|&x| x == 9));
    drop(d);
    qemu_img_check(&img);
    let info = tool("qemu-img", &["info", "--output=json", p(&img)]);
    assert!(info.contains("\"compat\": \"0.10\""), "{info}");
}

/// Overwrite `bytes` at `at` in a copy of `src`.
fn patched(dir: &Path, src: &Path, name: &str, at: u64, bytes: &[u8]) -> PathBuf {
    let mut data = std::fs::read(src).unwrap();
    let at = at as usize;
    data[at..at + bytes.len()].copy_from_slice(bytes);
    let out = dir.join(name);
    std::fs::write(&out, data).unwrap();
    out
}

#[test]
fn corrupt_and_truncated_headers_are_errors_not_panics() {
    let t = tempfile::tempdir().unwrap();
    let good = t.path().join("good.qcow2");
    qemu_img_create(&good, 4 * MIB, None, &[]);
    qemu_io(&good, &["write -P 0x99 0 128k"]);
    let bytes = std::fs::read(&good).unwrap();

    let mut must_fail: Vec<(String, PathBuf)> = Vec::new();
    for len in [0usize, 3, 4, 20, 71] {
        let f = t.path().join(format!("trunc{len}.qcow2"));
        std::fs::write(&f, &bytes[..len]).unwrap();
        must_fail.push((format!("truncated to {len}"), f));
    }
    let cases: [(&str, u64, &[u8]); 10] = [
        ("bad magic", 0, b"QFI\x00"),
        ("version 4", 4, &[0, 0, 0, 4]),
        ("version 1", 4, &[0, 0, 0, 1]),
        ("cluster_bits 30", 20, &[0, 0, 0, 30]),
        ("cluster_bits 8", 20, &[0, 0, 0, 8]),
        ("unaligned L1 offset", 40, &[0, 0, 0, 0, 0, 0, 0x10, 0x01]),
        ("unaligned refcount table", 48, &[0, 0, 0, 0, 0, 0, 0, 7]),
        ("refcount table past EOF", 48, &[0, 0, 0, 0, 0xd9, 1, 0, 0]),
        ("L1 table past EOF", 40, &[0, 0, 0, 1, 0, 0, 0, 0]),
        ("refcount_order 7", 96, &[0, 0, 0, 7]),
    ];
    for (i, (what, at, b)) in cases.iter().enumerate() {
        must_fail.push((
            what.to_string(),
            patched(t.path(), &good, &format!("c{i}.qcow2"), *at, b),
        ));
    }
    // A feature-name-table header extension with a length that is not a
    // multiple of its 48-byte entries makes imago 0.2.6 index out of
    // bounds: the panic must come back as an error.
    let ext = bytes[..4096]
        .windows(4)
        .position(|w| w == [0x68, 0x03, 0xf8, 0x57])
        .expect("qemu-img writes a feature name table");
    let f = patched(
        t.path(),
        &good,
        "featnames.qcow2",
        ext as u64 + 4,
        &[0, 0, 0, 49],
    );
    let e = Qcow2Disk::open(&f, true).unwrap_err();
    assert!(e.to_string().contains("panicked"), "{e}");
    must_fail.push(("short feature name entry".into(), f));

    for (what, f) in &must_fail {
        for ro in [true, false] {
            let e = Qcow2Disk::open(f, ro).unwrap_err();
            // Errors name the file and say what to do.
            let msg = e.to_string();
            assert!(msg.contains(f.to_str().unwrap()), "{what}: {msg}");
        }
        // The factory detects "not qcow2" for some of these: either way,
        // no panic and no qcow2 disk.
        if let Ok(d) = open_disk(&OpenOptions::new(f)) {
            assert_eq!(d.info().format, Format::Raw, "{what}");
        }
    }

    // A missing refcount block: reading is fine, but a writable open is
    // refused (the allocator would put a new block over live metadata).
    let rt = u64::from_be_bytes(bytes[48..56].try_into().unwrap());
    let f = patched(t.path(), &good, "no-refblock.qcow2", rt, &[0; 8]);
    let e = Qcow2Disk::open(&f, false).unwrap_err();
    assert!(e.to_string().contains("refcount table entry 0"), "{e}");
    let d = Qcow2Disk::open(&f, true).unwrap();
    let mut b = vec![0u8; 128 * 1024];
    d.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0x99));

    // Damage past the header that may open: any request may fail, but none
    // may panic, and the data is never silently wrong for the ones that
    // succeed on the untouched cluster.
    let odd: [(&str, u64, &[u8]); 5] = [
        ("huge L1 size", 36, &[0x7f, 0xff, 0xff, 0xff]),
        (
            "huge size",
            24,
            &[0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ),
        ("L1 beyond EOF", 40, &[0, 0, 0, 0x10, 0, 0, 0, 0]),
        ("backing name garbage", 8, &[0, 0, 0, 0, 0, 0, 0x10, 0]),
        ("L1 entry garbage", 0x30000, &[0xff; 16]),
    ];
    for (i, (what, at, b)) in odd.iter().enumerate() {
        let f = patched(t.path(), &good, &format!("o{i}.qcow2"), *at, b);
        let Ok(d) = Qcow2Disk::open(&f, false) else {
            continue;
        };
        let len = d.size().min(4 * MIB);
        let mut buf = vec![0u8; len as usize];
        let _ = d.read_at(&mut buf, 0);
        let _ = d.map(0, len);
        let _ = d.write_at(&[1; 100], 10, WriteOpts::default());
        let _ = d.flush();
        eprintln!("{what}: opened, requests returned without panicking");
    }
}

#[test]
fn backing_chain_problems_are_errors() {
    let t = tempfile::tempdir().unwrap();
    // Missing backing file.
    let orphan = t.path().join("orphan.qcow2");
    qemu_img_create(
        &orphan,
        MIB,
        Some((&t.path().join("gone.raw"), "raw")),
        &["-u"],
    );
    let e = Qcow2Disk::open(&orphan, true).unwrap_err();
    assert!(error_chain(&e).contains("gone.raw"), "{}", error_chain(&e));

    // A loop: a -> b -> a.
    let a = t.path().join("a.qcow2");
    let b = t.path().join("b.qcow2");
    qemu_img_create(&a, MIB, None, &[]);
    qemu_img_create(&b, MIB, Some((&a, "qcow2")), &[]);
    tool(
        "qemu-img",
        &[
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-b",
            p(&b),
            "-F",
            "qcow2",
            p(&a),
        ],
    );
    let e = Qcow2Disk::open(&a, true).unwrap_err();
    assert!(error_chain(&e).contains("loops"), "{}", error_chain(&e));

    // A chain deeper than the limit.
    let mut prev = t.path().join("l0.qcow2");
    qemu_img_create(&prev, MIB, None, &[]);
    for i in 1..=understudy_block::qcow2::MAX_CHAIN_DEPTH + 1 {
        let next = t.path().join(format!("l{i}.qcow2"));
        qemu_img_create(&next, MIB, Some((&prev, "qcow2")), &[]);
        prev = next;
    }
    let e = Qcow2Disk::open(&prev, true).unwrap_err();
    assert!(error_chain(&e).contains("deeper"), "{}", error_chain(&e));
    // One layer less is fine.
    let ok = t.path().join(format!(
        "l{}.qcow2",
        understudy_block::qcow2::MAX_CHAIN_DEPTH
    ));
    Qcow2Disk::open(&ok, true).unwrap();
}
