#![allow(clippy::unwrap_used)]
//! The README's main command (`understudy demo`, which `scripts/demo.sh`
//! runs), `understudy demo nbd` and `understudy mem replay`, run as a user
//! would run them. The VM demo needs the guest of `scripts/guest/build.sh`:
//! without it the test prints a message and passes, unless
//! `UNDERSTUDY_REQUIRE_GUEST=1`, which makes it fail.

mod common;

use std::path::PathBuf;
use std::process::Command;

fn guest_dir() -> PathBuf {
    std::env::var_os("UNDERSTUDY_GUEST_CACHE").map_or_else(
        || {
            let home =
                std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
            home.join(".cache/understudy/guest")
        },
        PathBuf::from,
    )
}

/// The numbers after `label` on the line that has it, e.g. the two tick
/// counters of "last tick on A: 134, first on B: 135: ...".
fn numbers_after(line: &str, label: &str) -> Vec<u64> {
    line[line.find(label).unwrap() + label.len()..]
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect()
}

/// Processes whose command line mentions `needle` (the demo's RAM and
/// temporary directories are named after its pid).
fn processes_mentioning(needle: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            e.file_name().to_str()?.parse::<u32>().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(needle).then_some(cmd)
        })
        .collect()
}

#[test]
fn demo_moves_a_ticking_guest_there_and_back_and_leaves_nothing_running() {
    let g = guest_dir();
    if !g.join("vmlinuz").is_file() || !g.join("initrd.gz").is_file() {
        let required = std::env::var_os("UNDERSTUDY_REQUIRE_GUEST").is_some_and(|v| v == "1");
        assert!(
            !required,
            "guest artefacts missing in {}: run scripts/guest/build.sh",
            g.display()
        );
        eprintln!(
            "guest artefacts not built in {} (run scripts/guest/build.sh); demo not exercised",
            g.display()
        );
        // Without them the demo says exactly what to run.
        let out = Command::new(common::bin())
            .args(["--log", "warn", "demo"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("bash scripts/guest/build.sh"), "{err}");
        return;
    }
    let child = Command::new(common::bin())
        .args(["--log", "warn", "demo"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let moves: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("last tick on"))
        .collect();
    assert_eq!(moves.len(), 2, "{text}");
    for (line, (from, to)) in moves.iter().zip([("A", "B"), ("B", "A")]) {
        let n = numbers_after(line, &format!("last tick on {from}: "));
        let first_on = numbers_after(line, &format!("first on {to}: "));
        assert!(
            first_on[0] > n[0] && first_on[0] <= n[0] + 5,
            "the counter did not carry on: {line}"
        );
        assert!(line.contains("the counter carried on"), "{line}");
    }
    let second = text.split("B -> A").nth(1).unwrap();
    assert!(second.contains("(incremental"), "{text}");
    assert!(text.contains("pause seen from outside"), "{text}");
    assert!(text.contains("nothing left running"), "{text}");
    let left = processes_mentioning(&format!("understudy-demo-{pid}"));
    assert!(left.is_empty(), "left running: {left:?}");
    assert!(!PathBuf::from(format!("/dev/shm/understudy-demo-{pid}-A")).exists());
}

#[test]
fn demo_nbd_serves_writes_and_shows_the_dirty_map() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(common::bin())
        .args(["--log", "warn", "demo", "nbd", "--size", "16M", "--dir"])
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
