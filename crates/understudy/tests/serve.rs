#![allow(clippy::unwrap_used)]
//! `understudy serve` driven by real, independent NBD clients: qemu-io,
//! qemu-img, nbdinfo and nbdcopy.

mod common;

use common::{Server, covered, run, run_raw};

const MIB: u64 = 1 << 20;

fn raw_image(dir: &std::path::Path, name: &str, size: u64) -> String {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    p.display().to_string()
}

/// The same qemu-io commands applied to a local file and, over NBD, to the
/// served image give identical images; the bitmap marks exactly the
/// granules those commands touched.
#[test]
fn qemu_io_writes_match_local_reference_and_bitmap() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "disk.raw", 64 * MIB);
    let reference = raw_image(dir.path(), "ref.raw", 64 * MIB);
    let srv = Server::start(
        dir.path(),
        &["--export", &format!("name=disk,path={img},bitmap=b:64k")],
    );
    // Aligned, unaligned, zeroes, discard, and parallel aio writes.
    let cmds = [
        "write -P 0xab 0 64k",
        "write -P 0xcd 1000000 5555",
        "write -P 0x11 8M 1M",
        "write -z 8M 64k",
        "discard 9M 128k",
        "aio_write -P 0x22 20M 4k",
        "aio_write -P 0x33 21M 4k",
        "aio_flush",
        "write -P 0x44 63M 1M",
    ];
    let mut nbd_args = vec!["-f", "raw"];
    let mut ref_args = vec!["-f", "raw"];
    for c in &cmds {
        nbd_args.extend(["-c", c]);
        ref_args.extend(["-c", c]);
    }
    let uri = srv.uri("disk");
    nbd_args.push(&uri);
    ref_args.push(&reference);
    run("qemu-io", &nbd_args);
    run("qemu-io", &ref_args);

    // Read back over NBD with pattern checks (qemu-io fails on mismatch).
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "read -P 0xcd 1000000 5555",
            "-c",
            "read -P 0 8M 64k",
            "-c",
            "read -P 0 9M 128k",
            "-c",
            "read -P 0x11 8454144 65536",
            "-c",
            "read -P 0x44 63M 1M",
            &uri,
        ],
    );
    let info = run("qemu-img", &["info", "--output=json", &uri]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["virtual-size"].as_u64(), Some(64 * MIB));
    let cmp = run_raw(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &reference, &uri],
    );
    assert!(
        cmp.status.success(),
        "images differ: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );

    // Allocation map: the written data is reported as data, the tail of an
    // untouched region as zero.
    let map = run("qemu-img", &["map", "--output=json", "-f", "raw", &uri]);
    let map: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    let data_at = |off: u64| {
        map.iter().any(|e| {
            let s = e["start"].as_u64().unwrap();
            let l = e["length"].as_u64().unwrap();
            e["data"].as_bool() == Some(true) && s <= off && off < s + l
        })
    };
    assert!(data_at(0) && data_at(63 * MIB));
    assert!(
        !data_at(40 * MIB),
        "untouched range reported as data: {map:?}"
    );

    // Dirty bitmap over NBD and over the control API agree and cover every
    // touched granule, and nothing far away.
    let runs = srv.dirty_runs("disk", "b");
    for (off, len) in [
        (0, 65536),
        (1_000_000, 5555),
        (8 * MIB, MIB),
        (20 * MIB, 4096),
        (21 * MIB, 4096),
        (63 * MIB, MIB),
    ] {
        assert!(
            covered(&runs, off, len),
            "{off}+{len} not dirty in {runs:?}"
        );
    }
    assert!(!covered(&runs, 40 * MIB, 4096));
    let total: u64 = runs.iter().map(|r| r.1).sum();
    // 64k; one granule for the unaligned write; 8M..9M+128k (write, zero,
    // discard); two aio granules; the last 1M.
    assert_eq!(
        runs,
        vec![
            (0, 65536),
            (983040, 65536),
            (8 * MIB, MIB + 131072),
            (20 * MIB, 65536),
            (21 * MIB, 65536),
            (63 * MIB, MIB)
        ]
    );
    let nbd_map = run("nbdinfo", &["--map=qemu:dirty-bitmap:b", "--json", &uri]);
    let nbd_map: serde_json::Value = serde_json::from_str(&nbd_map).unwrap();
    let nbd_dirty: u64 = nbd_map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"].as_u64() == Some(1))
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(
        nbd_dirty, total,
        "NBD dirty context disagrees with the control API"
    );

    let list = run(
        "nbdinfo",
        &["--list", &format!("nbd://127.0.0.1:{}", srv.port)],
    );
    assert!(list.contains("disk"), "{list}");
    assert!(srv.stop(), "server did not stop cleanly");
}

/// nbdcopy both ways, and a second export on the same server.
#[test]
fn nbdcopy_roundtrip_and_multiple_exports() {
    let dir = tempfile::tempdir().unwrap();
    let a = raw_image(dir.path(), "a.raw", 32 * MIB);
    let b = raw_image(dir.path(), "b.raw", 32 * MIB);
    let src = dir.path().join("src.raw");
    let data: Vec<u8> = (0..32 * MIB as usize)
        .map(|i| (i * 7 / 4096) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    let sock = dir.path().join("nbd.sock");
    let srv = Server::start(
        dir.path(),
        &[
            "--export",
            &format!("name=a,path={a}"),
            "--export",
            &format!("name=b,path={b},format=raw"),
            "--socket",
            &sock.display().to_string(),
        ],
    );
    run("nbdcopy", &[&src.display().to_string(), &srv.uri("a")]);
    // Copy a -> b through the server (over the Unix socket for b).
    let unix_b = format!("nbd+unix:///b?socket={}", sock.display());
    run("nbdcopy", &[&srv.uri("a"), &unix_b]);
    let out = dir.path().join("out.raw");
    run("nbdcopy", &[&unix_b, &out.display().to_string()]);
    assert!(
        std::fs::read(&out).unwrap() == data,
        "round trip changed the data"
    );
    assert!(srv.stop());
}

/// A qcow2 overlay on a raw base, made by qemu-img, served and written
/// through; qemu-img check passes afterwards and the data is right.
#[test]
fn qcow2_overlay_on_raw_base() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0x5au8; 8 * MIB as usize]).unwrap();
    let ov = dir.path().join("overlay.qcow2").display().to_string();
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &base.display().to_string(),
            "-F",
            "raw",
            &ov,
        ],
    );
    let srv = Server::start(
        dir.path(),
        &["--export", &format!("name=vm,path={ov},bitmap=inc")],
    );
    let uri = srv.uri("vm");
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x77 1M 64k",
            "-c",
            "write -P 0x78 3000 100",
            &uri,
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x5a 0 3000",
            "-c",
            "read -P 0x78 3000 100",
            "-c",
            "read -P 0x77 1M 64k",
            "-c",
            "read -P 0x5a 2M 1M",
            &uri,
        ],
    );
    let runs = srv.dirty_runs("vm", "inc");
    assert!(covered(&runs, MIB, 65536) && covered(&runs, 3000, 100));
    assert!(srv.stop());
    run("qemu-img", &["check", "-q", &ov]);
    let info = run("qemu-img", &["info", "--backing-chain", &ov]);
    assert!(info.contains("base.raw"), "{info}");
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-r",
            "-c",
            "read -P 0x77 1M 64k",
            "-c",
            "read -P 0x5a 2M 1M",
            &ov,
        ],
    );
}

/// The bitmap commands of the control API, and persistence across a clean
/// restart (exact contents, not recovered).
#[test]
fn bitmap_commands_and_clean_restart() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "d.raw", 16 * MIB);
    let srv = Server::start(
        dir.path(),
        &["--export", &format!("name=d,path={img},bitmap=keep")],
    );
    srv.ctl_ok(&["bitmap", "add", "d", "extra", "--granularity", "4k"]);
    let dup = srv.ctl(&["bitmap", "add", "d", "extra"]);
    assert!(!dup.status.success());
    assert!(String::from_utf8_lossy(&dup.stderr).contains("exists"));
    let bad = srv.ctl(&["bitmap", "add", "d", "x", "--granularity", "3k"]);
    assert!(!bad.status.success());
    srv.ctl_ok(&["bitmap", "add", "d", "off"]);
    srv.ctl_ok(&["bitmap", "disable", "d", "off"]);
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 4096 4096", &srv.uri("d")],
    );
    assert_eq!(srv.dirty_runs("d", "extra"), vec![(4096, 4096)]);
    assert_eq!(srv.dirty_runs("d", "keep"), vec![(0, 65536)]);
    assert!(
        srv.dirty_runs("d", "off").is_empty(),
        "disabled bitmap recorded a write"
    );
    srv.ctl_ok(&["bitmap", "enable", "d", "off"]);
    srv.ctl_ok(&["bitmap", "clear", "d", "keep"]);
    assert!(srv.dirty_runs("d", "keep").is_empty());
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 2 1M 4096", &srv.uri("d")],
    );
    let list = srv.ctl_ok(&["bitmap", "list", "d", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(v[0]["bitmaps"].as_array().unwrap().len(), 3);
    srv.ctl_ok(&["bitmap", "remove", "d", "off"]);
    assert!(srv.stop());

    let srv = Server::start(
        dir.path(),
        &["--export", &format!("name=d,path={img},bitmap=keep")],
    );
    assert_eq!(srv.dirty_runs("d", "keep"), vec![(MIB, 65536)]);
    assert_eq!(
        srv.dirty_runs("d", "extra"),
        vec![(4096, 4096), (MIB, 4096)]
    );
    let list = srv.ctl_ok(&["bitmap", "list", "d", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let bms = v[0]["bitmaps"].as_array().unwrap();
    assert_eq!(bms.len(), 2, "removed bitmap came back: {bms:?}");
    assert!(bms.iter().all(|b| b["recovered"] == false), "{bms:?}");
    assert!(srv.stop());
}

/// Read-only exports refuse writes and record nothing; bad command lines
/// fail with a message that says what to do.
#[test]
fn readonly_export_and_startup_errors() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "ro.raw", 4 * MIB);
    let srv = Server::start(
        dir.path(),
        &["--export", &format!("name=ro,path={img},readonly")],
    );
    let out = run_raw(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 0 4k", &srv.uri("ro")],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success()
            || text.contains("denied")
            || text.contains("read-only")
            || text.contains("failed"),
        "write to a read-only export succeeded: {text}"
    );
    run(
        "qemu-io",
        &["-f", "raw", "-r", "-c", "read -P 0 0 4k", &srv.uri("ro")],
    );

    let missing = dir.path().join("nope.raw").display().to_string();
    let port = srv.port.to_string();
    for (args, expect) in [
        (
            vec![
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--export",
                &format!("name=x,path={missing}"),
            ],
            "does not exist",
        ),
        (
            vec![
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--control",
                "/tmp/understudy-test-unused.sock",
                "--export",
                &format!("name=x,path={img}"),
            ],
            "in use",
        ),
        (
            vec!["serve", "--export", "path=a,bogus=1"],
            "unknown --export option",
        ),
    ] {
        let out = std::process::Command::new(common::bin())
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(expect),
            "{args:?}: expected {expect:?} in {err}"
        );
    }
    assert!(srv.stop());
}
