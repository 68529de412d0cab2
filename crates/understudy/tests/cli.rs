#![allow(clippy::unwrap_used)]
//! The README's main command (`understudy demo`) and `understudy mem
//! replay`, run as a user would run them.

mod common;

use std::process::Command;

#[test]
fn demo_serves_writes_and_shows_the_dirty_map() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(common::bin())
        .args(["--log", "warn", "demo", "--size", "16M", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("contents match"), "{text}");
    // The four writes of the demo on a 16 MiB disk, granularity 64 KiB:
    // 0, 1 MiB (4 granules), the middle (1), the last 64 KiB.
    assert!(text.contains("458752 bytes marked dirty"), "{text}");
    assert!(dir.path().join("demo.raw.bitmaps").exists());
}

#[test]
fn mem_replay_verifies_a_trace_and_reports_every_method() {
    let dir = tempfile::tempdir().unwrap();
    // Three 1 MiB checkpoints: a few small edits and one page copied
    // elsewhere between each.
    let mut img: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for i in 0..3usize {
        std::fs::write(dir.path().join(format!("{i:04}.ram")), &img).unwrap();
        for b in &mut img[i * 8192..i * 8192 + 100] {
            *b = b.wrapping_add(1);
        }
        img.copy_within(0..4096, 500 * 1024);
    }
    let out = Command::new(common::bin())
        .args(["--log", "warn", "mem", "replay", "--json"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["checkpoints"], 3, "{v}");
    assert_eq!(v["verified"], true, "{v}");
    let names: Vec<&str> = v["methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["raw", "zero+lz4", "xbzrle", "understudy"]);

    // A trace with images of different sizes is refused with a message.
    std::fs::write(dir.path().join("0003.ram"), [0u8; 4096]).unwrap();
    let bad = Command::new(common::bin())
        .args(["--log", "warn", "mem", "replay"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(!bad.stderr.is_empty());
}
