//! The server driven by real NBD clients: qemu-img, qemu-io, nbdinfo,
//! nbdcopy. Each tool must be installed; a missing one fails the test.
#![allow(clippy::unwrap_used)] // helpers outside #[test] functions

mod common;

use std::sync::Arc;

use common::*;
use serde_json::Value;
use understudy_block::{DiskWrite, WriteOpts};
use understudy_nbd_server::{MemoryDirtyMap, ServerConfig};

#[test]
fn qemu_img_info_and_map() {
    let ts = TestServer::start(ServerConfig::default());
    let (_, disk) = ts.add_disk("d", 16 * MIB);
    write_pattern(&*disk, 2 * MIB, 256 * 1024, 7);
    write_pattern(&*disk, 10 * MIB, 64 * 1024, 9);

    for target in [ts.uri("d"), ts.unix_uri("d")] {
        let info: Value =
            serde_json::from_str(&run_ok("qemu-img", &["info", "--output=json", &target])).unwrap();
        assert_eq!(info["virtual-size"], 16 * MIB, "{info}");
    }
    let map: Value = serde_json::from_str(&run_ok(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &ts.uri("d")],
    ))
    .unwrap();
    let extents = map.as_array().unwrap();
    let covers = |off: u64, data: bool| {
        extents.iter().any(|e| {
            let s = e["start"].as_u64().unwrap();
            let l = e["length"].as_u64().unwrap();
            s <= off && off < s + l && e["data"].as_bool().unwrap() == data
        })
    };
    assert!(
        covers(2 * MIB, true) && covers(2 * MIB + 255 * 1024, true) && covers(10 * MIB, true),
        "{map}"
    );
    assert!(
        covers(0, false) && covers(5 * MIB, false) && covers(15 * MIB, false),
        "{map}"
    );
    let total: u64 = extents.iter().map(|e| e["length"].as_u64().unwrap()).sum();
    assert_eq!(total, 16 * MIB);
}

#[test]
fn qemu_io_patterns_discard_zero_and_aio() {
    let ts = TestServer::start(ServerConfig::default());
    let (path, disk) = ts.add_disk("d", 8 * MIB);
    let t = ts.uri("d");
    // Aligned and unaligned writes, read back with pattern verification.
    let out = qemu_io(
        &t,
        &[
            "write -P 0xab 0 64k",
            "write -P 0xcd 65537 3000",
            "write -P 0x11 1048575 2",
            "read -P 0xab 0 64k",
            "read -P 0xcd 65537 3000",
            "read -P 0x11 1048575 2",
            "read -P 0 65536 1",
            "read -P 0 68537 100",
        ],
    );
    assert_qemu_io_clean(&out);
    // The bytes really are in the file.
    assert_eq!(read_file_range(&path, 65537, 3000), vec![0xcd; 3000]);
    assert_eq!(read_file_range(&path, 65536, 1), vec![0]);
    assert_eq!(read_file_range(&path, 1048575, 2), vec![0x11; 2]);

    // A wrong expectation must be reported (the check above can fail).
    let bad = run("qemu-io", &["-f", "raw", "-c", "read -P 0x99 0 4k", &t]);
    let bad = String::from_utf8_lossy(&bad.stdout).to_lowercase();
    assert!(bad.contains("pattern verification failed"), "{bad}");

    // Discard and write-zeroes (punching and not punching holes).
    let out = qemu_io(
        &t,
        &[
            "write -P 0x55 1M 1M",
            "discard 1M 512k",
            "write -z 1536k 256k",
            "write -z -u 1792k 256k",
            "read -P 0 1536k 512k",
            "read -P 0x55 0x180000 0",
        ],
    );
    assert_qemu_io_clean(&out);
    let mut b = vec![1u8; 512 * 1024];
    disk.read_at(&mut b, 1536 * 1024).unwrap();
    assert!(b.iter().all(|&x| x == 0));

    // Parallel requests on one connection.
    let out = qemu_io(
        &t,
        &[
            "aio_write -P 0x21 2M 128k",
            "aio_write -P 0x22 3M 128k",
            "aio_write -P 0x23 4M 4k",
            "aio_flush",
            "aio_read -P 0x21 2M 128k",
            "aio_read -P 0x22 3M 128k",
            "aio_read -P 0x23 4M 4k",
            "aio_flush",
        ],
    );
    assert_qemu_io_clean(&out);
    assert_eq!(read_file_range(&path, 3 * MIB, 4), vec![0x22; 4]);
    let s = ts.server.stats();
    assert!(
        s.writes >= 6 && s.reads >= 9 && s.flushes >= 1 && s.write_zeroes >= 2,
        "{s:?}"
    );
    assert!(
        s.bytes_written >= 64 * 1024 + 3000 + 2 + MIB + 260 * 1024,
        "{s:?}"
    );
}

#[test]
fn qemu_img_convert_and_compare_both_directions() {
    let ts = TestServer::start(ServerConfig::default());
    ts.add_disk("d", 8 * MIB);
    let src = ts.dir.path().join("src.raw");
    // Mixed content: data, a hole, more data, unaligned tail.
    let mut content = vec![0u8; 8 * MIB as usize];
    for (i, b) in content.iter_mut().enumerate() {
        if !(2 * MIB as usize..5 * MIB as usize).contains(&i) {
            *b = (i % 251) as u8;
        }
    }
    std::fs::write(&src, &content).unwrap();
    let t = ts.uri("d");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &t,
        ],
    );
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &t,
        ],
    );
    let back = ts.dir.path().join("back.raw");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &t,
            back.to_str().unwrap(),
        ],
    );
    assert_eq!(std::fs::read(&back).unwrap(), content);
    // compare must notice a difference.
    content[12345] ^= 0xff;
    std::fs::write(&src, &content).unwrap();
    let out = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &t,
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn nbdinfo_list_and_map() {
    let ts = TestServer::start(ServerConfig::default());
    let (_, a) = ts.add_disk("alpha", 4 * MIB);
    ts.add_disk("beta", MIB);
    write_pattern(&*a, MIB, 128 * 1024, 1);

    let list: Value =
        serde_json::from_str(&run_ok("nbdinfo", &["--list", "--json", &ts.uri("")])).unwrap();
    let exports = list["exports"].as_array().unwrap();
    let names: Vec<&str> = exports
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alpha", "beta"], "{list}");
    assert_eq!(exports[0]["description"], "test disk alpha");
    assert_eq!(exports[0]["export-size"], 4 * MIB);
    assert_eq!(exports[1]["export-size"], MIB);
    assert_eq!(exports[0]["can_multi_conn"], true, "{list}");
    assert_eq!(exports[0]["is_read_only"], false);

    let map: Value =
        serde_json::from_str(&run_ok("nbdinfo", &["--map", "--json", &ts.uri("alpha")])).unwrap();
    let ext = map.as_array().unwrap();
    let kind_at = |off: u64| {
        ext.iter()
            .find(|e| {
                let o = e["offset"].as_u64().unwrap();
                o <= off && off < o + e["length"].as_u64().unwrap()
            })
            .map(|e| e["type"].as_u64().unwrap())
    };
    assert_eq!(kind_at(MIB), Some(0), "{map}");
    assert_eq!(kind_at(0), Some(3), "{map}");
    assert_eq!(kind_at(3 * MIB), Some(3), "{map}");
    let total: u64 = ext.iter().map(|e| e["length"].as_u64().unwrap()).sum();
    assert_eq!(total, 4 * MIB);
}

#[test]
fn nbdinfo_maps_dirty_bitmaps() {
    let ts = TestServer::start(ServerConfig::default());
    let map = Arc::new(MemoryDirtyMap::new(4 * MIB, 64 * 1024));
    map.add_bitmap("b0");
    map.add_bitmap("b1");
    map.mark_dirty("b0", 64 * 1024, 1); // block 1
    map.mark_dirty("b0", 3 * MIB, 200 * 1024); // 4 blocks
    map.mark_dirty("b1", 0, 4 * MIB);
    ts.add_disk_with_bitmaps("d", 4 * MIB, map.clone());

    let ctx = run_ok("nbdinfo", &["--json", &ts.uri("d")]);
    let ctx: Value = serde_json::from_str(&ctx).unwrap();
    let contexts = ctx["exports"][0]["contexts"].as_array().unwrap();
    let names: Vec<&str> = contexts.iter().map(|c| c.as_str().unwrap()).collect();
    assert!(names.contains(&"base:allocation"), "{ctx}");
    assert!(
        names.contains(&"qemu:dirty-bitmap:b0") && names.contains(&"qemu:dirty-bitmap:b1"),
        "{ctx}"
    );

    let out = run_ok(
        "nbdinfo",
        &["--map=qemu:dirty-bitmap:b0", "--json", &ts.uri("d")],
    );
    let ext: Value = serde_json::from_str(&out).unwrap();
    let got: Vec<(u64, u64, u64)> = ext
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect();
    let k = 64 * 1024;
    assert_eq!(
        got,
        vec![
            (0, k, 0),
            (k, k, 1),
            (2 * k, 3 * MIB - 2 * k, 0),
            (3 * MIB, 4 * k, 1),
            (3 * MIB + 4 * k, MIB - 4 * k, 0)
        ]
    );
    let out = run_ok(
        "nbdinfo",
        &["--map=qemu:dirty-bitmap:b1", "--json", &ts.uri("d")],
    );
    let ext: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(ext.as_array().unwrap().len(), 1, "{ext}");
    assert_eq!(ext[0]["type"], 1);
    // A bitmap that does not exist cannot be mapped.
    let out = run("nbdinfo", &["--map=qemu:dirty-bitmap:zz", &ts.uri("d")]);
    assert!(!out.status.success());
}

#[test]
fn nbdcopy_both_directions() {
    let ts = TestServer::start(ServerConfig::default());
    let (path, _) = ts.add_disk("d", 6 * MIB);
    let src = ts.dir.path().join("src.raw");
    let content: Vec<u8> = (0..6 * MIB as usize)
        .map(|i| ((i * 7) % 253) as u8)
        .collect();
    std::fs::write(&src, &content).unwrap();
    run_ok("nbdcopy", &[src.to_str().unwrap(), &ts.uri("d")]);
    assert_eq!(std::fs::read(&path).unwrap(), content);
    let dst = ts.dir.path().join("dst.raw");
    run_ok("nbdcopy", &[&ts.unix_uri("d"), dst.to_str().unwrap()]);
    assert_eq!(std::fs::read(&dst).unwrap(), content);
    // Several connections at once (multi-conn is advertised).
    let dst2 = ts.dir.path().join("dst2.raw");
    run_ok(
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=16",
            &ts.uri("d"),
            dst2.to_str().unwrap(),
        ],
    );
    assert_eq!(std::fs::read(&dst2).unwrap(), content);
}

#[test]
fn concurrent_clients_on_separate_regions() {
    let ts = TestServer::start(ServerConfig::default());
    let (path, _) = ts.add_disk("d", 8 * MIB);
    let t = ts.uri("d");
    let handles: Vec<_> = (0..6u64)
        .map(|i| {
            let t = t.clone();
            std::thread::spawn(move || {
                let off = format!("{}", i * MIB);
                let w = format!("write -P {} {off} 1M", 0x30 + i);
                let r = format!("read -P {} {off} 1M", 0x30 + i);
                qemu_io(&t, &[&w, "flush", &r])
            })
        })
        .collect();
    for h in handles {
        assert_qemu_io_clean(&h.join().unwrap());
    }
    for i in 0..6u64 {
        assert_eq!(
            read_file_range(&path, i * MIB + 4096, 16),
            vec![0x30 + i as u8; 16]
        );
    }
    assert!(ts.server.stats().connections_accepted >= 6);
}

#[test]
fn read_only_export_refuses_writes() {
    let ts = TestServer::start(ServerConfig::default());
    let dir = &ts.dir;
    let path = dir.path().join("ro.raw");
    let disk = understudy_block::raw::RawDisk::create(&path, MIB).unwrap();
    disk.write_at(&[0x77; 4096], 0, WriteOpts::default())
        .unwrap();
    ts.server
        .exports()
        .insert(understudy_nbd_server::Export::new("ro", Arc::new(disk)).with_read_only(true));
    // qemu sees NBD_FLAG_READ_ONLY and refuses a read-write open.
    let out = run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 0 4k", &ts.uri("ro")],
    );
    let text = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        !out.status.success() && text.contains("permission denied"),
        "{text}"
    );
    assert_eq!(read_file_range(&path, 0, 4096), vec![0x77; 4096]);
    let ok = run_ok(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x77 0 4k", &ts.uri("ro")],
    );
    assert_qemu_io_clean(&ok);
    let info: Value = serde_json::from_str(&run_ok("nbdinfo", &["--json", &ts.uri("ro")])).unwrap();
    assert_eq!(info["exports"][0]["is_read_only"], true);
    // Disk content is untouched after all that.
    let mut b = [0u8; 4096];
    ts.server
        .exports()
        .get("ro")
        .unwrap()
        .disk
        .read_at(&mut b, 0)
        .unwrap();
    assert_eq!(b, [0x77; 4096]);
}

/// A qcow2 overlay: data in the backing file is reported as allocated
/// data (type 0), like data in the overlay itself, as QEMU's server does;
/// only ranges that read as zero carry the zero/hole bits.
#[test]
fn nbdinfo_maps_backing_data_of_a_qcow2_overlay_as_data() {
    use understudy_block::qcow2::Qcow2Disk;
    use understudy_block::raw::RawDisk;
    use understudy_block::{Disk, DiskMap};
    use understudy_nbd_server::Export;

    let ts = TestServer::start(ServerConfig::default());
    let base = ts.dir.path().join("base.raw");
    let b = RawDisk::create(&base, 4 * MIB).unwrap();
    write_pattern(&b, MIB, 128 * 1024, 1);
    drop(b);
    let top = ts.dir.path().join("top.qcow2");
    let d = Qcow2Disk::create(&top, 4 * MIB, Some((&base, understudy_block::Format::Raw))).unwrap();
    write_pattern(&d, 2 * MIB, 64 * 1024, 2);
    // Sanity: the block layer does tell the two apart.
    assert_eq!(
        d.map(MIB, 1).unwrap()[0].kind,
        understudy_block::ExtentKind::Backing
    );
    assert_eq!(
        d.map(2 * MIB, 1).unwrap()[0].kind,
        understudy_block::ExtentKind::Data
    );
    let disk: Arc<dyn Disk> = Arc::new(d);
    ts.server.exports().insert(Export::new("overlay", disk));

    let map: Value =
        serde_json::from_str(&run_ok("nbdinfo", &["--map", "--json", &ts.uri("overlay")])).unwrap();
    let ext = map.as_array().unwrap();
    let kind_at = |off: u64| {
        ext.iter()
            .find(|e| {
                let o = e["offset"].as_u64().unwrap();
                o <= off && off < o + e["length"].as_u64().unwrap()
            })
            .map(|e| e["type"].as_u64().unwrap())
    };
    assert_eq!(kind_at(MIB), Some(0), "backing data: {map}");
    assert_eq!(kind_at(2 * MIB), Some(0), "overlay data: {map}");
    // A hole of the raw backing file: present in the chain, reads as zero.
    assert_eq!(kind_at(3 * MIB), Some(2), "backing hole: {map}");
    let total: u64 = ext.iter().map(|e| e["length"].as_u64().unwrap()).sum();
    assert_eq!(total, 4 * MIB);
}
