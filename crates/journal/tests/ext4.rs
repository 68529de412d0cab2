//! A real file system on the journal. `mkfs.ext4` formats a raw image, then
//! a series of `debugfs -w` commands (mkdir, write, symlink, link, rm, ...)
//! change it. The write stream is captured by diffing the image before and
//! after each command (512-byte granularity, runs coalesced): each command
//! becomes one epoch, followed by an order (and every third by a flush).
//!
//! What the capture contains, honestly: the blocks each command changed,
//! not the order in which debugfs wrote them (debugfs writes in place and
//! does not use the ext4 journal), so each command is one epoch of
//! unordered writes. The test checks that crash states recovered by the
//! journal are epoch prefixes and that `e2fsck -fn` reports every one of
//! them clean; and that the same stream on a write-back cache without
//! ordering leaves images that `e2fsck` rejects.
//!
//! Needs e2fsprogs (mkfs.ext4, debugfs, e2fsck): the test fails without them.
//! `UNDERSTUDY_CRASH_POINTS=N` checks N crash points (default 40).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use understudy_journal::harness::{Check, CrashConfig, ImageCheckError, Op, Target, crash_test};
use understudy_journal::{FlushPolicy, JournalConfig};

const SIZE: usize = 8 << 20;

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (install e2fsprogs): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn e2fsck_clean(dir: &Path, img: &[u8]) -> Result<(), ImageCheckError> {
    let p = dir.join("check.img");
    std::fs::write(&p, img).map_err(|e| ImageCheckError::Unavailable(e.to_string()))?;
    let out = Command::new("e2fsck")
        .args(["-fn"])
        .arg(&p)
        .output()
        .map_err(|e| ImageCheckError::Unavailable(format!("cannot run e2fsck: {e}")))?;
    match out.status.code() {
        Some(0) => Ok(()),
        c => Err(ImageCheckError::Inconsistent(format!(
            "e2fsck exit {c:?}: {}",
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| !l.starts_with("Pass") && !l.starts_with("e2fsck"))
                .take(4)
                .collect::<Vec<_>>()
                .join(" | ")
        ))),
    }
}

/// Writes that turn `a` into `b`: runs of differing 512-byte sectors.
fn diff(a: &[u8], b: &[u8]) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut s = 0;
    while s < a.len() {
        if a[s..s + 512] == b[s..s + 512] {
            s += 512;
            continue;
        }
        let start = s;
        while s < a.len() && a[s..s + 512] != b[s..s + 512] {
            s += 512;
        }
        ops.push(Op::Write {
            offset: start as u64,
            data: Arc::new(b[start..s].to_vec()),
        });
    }
    ops
}

fn capture(dir: &Path) -> (Vec<u8>, Vec<Op>, usize) {
    let img = dir.join("fs.img");
    std::fs::write(&img, vec![0u8; SIZE]).expect("create image");
    run(Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-b",
            "1024",
            "-N",
            "256",
            "-E",
            "lazy_itable_init=0",
        ])
        .arg(&img));
    for (name, len) in [("small", 700usize), ("mid", 20_000), ("big", 300_000)] {
        let data: Vec<u8> = (0..len).map(|i| (i * 31 % 253) as u8).collect();
        std::fs::write(dir.join(name), data).expect("host file");
    }
    let h = |n: &str| dir.join(n).display().to_string();
    // One group = one epoch: commands that are only consistent together
    // (debugfs `ln`/`unlink` do not touch the link count) share one.
    let groups: Vec<Vec<String>> = vec![
        vec!["mkdir /a".into()],
        vec!["mkdir /a/b".into()],
        vec![format!("write {} /a/small", h("small"))],
        vec![format!("write {} /a/b/mid", h("mid"))],
        vec![format!("write {} /big", h("big"))],
        vec!["symlink /a/link /a/b/mid".into()],
        vec!["mkdir /c".into()],
        vec![format!("write {} /c/one", h("mid"))],
        vec![format!("write {} /c/two", h("small"))],
        vec![
            "ln /a/small /c/hard".into(),
            "sif /a/small links_count 2".into(),
        ],
        vec!["rm /big".into()],
        vec!["mkdir /c/d".into()],
        vec![format!("write {} /c/d/big2", h("big"))],
        vec!["unlink /c/hard".into(), "sif /a/small links_count 1".into()],
        vec!["rm /c/one".into()],
        vec![format!("write {} /a/again", h("mid"))],
        vec!["rm /c/two".into()],
        vec!["rm /c/d/big2".into(), "rmdir /c/d".into()],
    ];
    let initial = std::fs::read(&img).expect("read image");
    e2fsck_clean(dir, &initial).expect("fresh file system is clean");
    let mut prev = initial.clone();
    let mut ops = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        for c in g {
            run(Command::new("debugfs").args(["-w", "-R", c]).arg(&img));
        }
        let cur = std::fs::read(&img).expect("read image");
        // The premise of the test: every epoch boundary is a clean state.
        e2fsck_clean(dir, &cur).unwrap_or_else(|e| panic!("after {g:?}: {e}"));
        ops.extend(diff(&prev, &cur));
        ops.push(if i % 3 == 2 { Op::Flush } else { Op::Order });
        prev = cur;
    }
    (initial, ops, groups.len())
}

fn points() -> usize {
    std::env::var("UNDERSTUDY_CRASH_POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40)
}

#[test]
fn ext4_stays_clean_after_crashes_with_ordering_and_not_without() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (initial, ops, epochs) = capture(dir.path());
    let writes = ops.iter().filter(|o| o.is_data()).count();
    let bytes: usize = ops
        .iter()
        .map(|o| match o {
            Op::Write { data, .. } => data.len(),
            _ => 0,
        })
        .sum();
    eprintln!("captured {epochs} epochs, {writes} writes, {bytes} bytes");
    assert!(
        writes > epochs,
        "the capture should hold several writes per command"
    );

    for policy in [
        FlushPolicy::Durable,
        FlushPolicy::Ordered {
            interval: std::time::Duration::from_millis(2),
        },
    ] {
        let t = Target::Epoch(JournalConfig {
            capacity: 1 << 20,
            policy,
            in_place_min: None,
        });
        let mut c = CrashConfig::new(points(), 5);
        c.flush_is_durable = policy == FlushPolicy::Durable;
        c.check = Check::Strict;
        let out = crash_test(&initial, &ops, &t, &c, |img| e2fsck_clean(dir.path(), img));
        eprintln!(
            "{policy:?}: {} events, {} crash states, {} distinct epoch states",
            out.events, out.checked, out.distinct_prefixes
        );
        assert!(
            out.violations.is_empty(),
            "{policy:?}: {:#?}",
            &out.violations[..out.violations.len().min(3)]
        );
        // Ordered makes epochs durable in few batches on a run this short.
        let want = if policy == FlushPolicy::Durable { 4 } else { 2 };
        assert!(out.distinct_prefixes >= want, "{policy:?}: {out:?}");
    }

    let mut c = CrashConfig::new(points(), 5);
    c.check = Check::Strict;
    let out = crash_test(&initial, &ops, &Target::Writeback, &c, |img| {
        e2fsck_clean(dir.path(), img)
    });
    eprintln!(
        "writeback: {} crash states, {} not an epoch prefix, {} rejected by e2fsck",
        out.checked,
        out.violations.len(),
        out.extra_failures
    );
    assert!(
        out.extra_failures > 0,
        "without ordering some crash state must be corrupt"
    );
}
