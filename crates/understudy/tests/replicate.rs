//! `understudy replicate` between two real daemons on loopback: sync
//! replication under a real NBD client (qemu-io), a read-only backup, then
//! kill -9 of the primary, promotion, and every acknowledged write read
//! back through the backup.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const KEY_HEX: &str = "3f9c1a7e5b2d4c6e8f0a1b3c5d7e9f1a2b4c6d8e0f1a3b5c7d9e1f2a4b6c8d0e";

fn key(dir: &Path) -> String {
    let p = dir.join("peer.key");
    std::fs::write(&p, format!("{KEY_HEX}\n")).unwrap();
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    p.display().to_string()
}

/// qemu-io on `target`; whether every command succeeded, and its output.
fn qemu_io(target: &str, cmds: &[&str]) -> (bool, String) {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(target);
    let out = run_raw("qemu-io", &args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = out.status.success() && !text.contains("failed") && !text.contains("error");
    (ok, text)
}

fn qemu_io_ok(target: &str, cmds: &[&str]) {
    let (ok, text) = qemu_io(target, cmds);
    assert!(ok, "qemu-io {target}: {text}");
}

fn status(s: &Server, export: &str) -> serde_json::Value {
    let out = s.ctl_ok(&["replicate", "status", export, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0].clone()
}

/// Poll `cond` until it holds; fail with `what` after 30 s.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let t = std::time::Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "timed out waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

const WRITES: &[&str] = &[
    "write -P 0x11 0 1M",
    "write -P 0x22 5M 64k",
    "write -P 0x33 9M 2M",
    "write -z 1M 512k",
];
const READS: &[&str] = &[
    "read -P 0x5a 1536k 512k",
    "read -P 0x11 0 1M",
    "read -P 0x0 1M 512k",
    "read -P 0x22 5M 64k",
    "read -P 0x33 9M 2M",
];

#[test]
fn sync_replication_then_failover_keeps_every_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let k = key(dir);
    let img = dir.join("vm.img");
    run(
        "qemu-img",
        &["create", "-f", "raw", img.to_str().unwrap(), "16M"],
    );
    qemu_io_ok(img.to_str().unwrap(), &["write -P 0x5a 0 2M"]);
    let b_peer = format!("127.0.0.1:{}", free_port());
    let b = Server::start(
        dir,
        &[
            "--accept-migrations",
            dir.join("b-in").to_str().unwrap(),
            "--peer-listen",
            &b_peer,
            "--peer-key",
            &k,
            "--node-id",
            "node-b",
        ],
    );
    let a = Server::start(
        dir,
        &[
            "--export",
            &format!("name=vm,path={}", img.display()),
            "--peer-key",
            &k,
            "--node-id",
            "node-a",
        ],
    );
    a.ctl_ok(&[
        "replicate",
        "start",
        "vm",
        "--to",
        &b_peer,
        "--mode",
        "sync",
    ]);
    wait_until("the replica is in sync", || {
        status(&a, "vm")["state"] == "in_sync"
    });
    for w in WRITES {
        qemu_io_ok(&a.uri("vm"), &[w]);
    }
    let st = status(&a, "vm");
    assert_eq!(st["state"], "in_sync", "{st}");
    assert_eq!(st["split_brain"], false);
    let bst = status(&b, "vm");
    assert_eq!(
        (bst["role"].as_str(), bst["state"].as_str()),
        (Some("backup"), Some("connected")),
        "{bst}"
    );
    let b_img = dir.join("b-in").join("vm.img");
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            img.to_str().unwrap(),
            b_img.to_str().unwrap(),
        ],
    );
    let v = a.ctl_ok(&["replicate", "verify", "vm"]);
    assert!(v.contains(" 0 differing"), "{v}");

    // The backup is read-only for clients until promoted.
    let (ok, text) = qemu_io(&b.uri("vm"), &["write -P 0x77 0 4k"]);
    assert!(!ok, "a write to the backup succeeded: {text}");
    qemu_io_ok(&b.uri("vm"), READS);
    // Nor promoted while its primary is connected.
    let out = b.ctl(&["replicate", "promote", "vm"]);
    assert!(!out.status.success(), "promoted with a connected primary");

    a.kill9();
    wait_until("the backup notices the primary is gone", || {
        status(&b, "vm")["state"] == "waiting"
    });
    b.ctl_ok(&["replicate", "promote", "vm"]);
    assert_eq!(status(&b, "vm")["role"], "primary");
    qemu_io_ok(&b.uri("vm"), READS);
    qemu_io_ok(
        &b.uri("vm"),
        &["write -P 0x44 12M 64k", "read -P 0x44 12M 64k"],
    );
    assert!(b.stop(), "the promoted backup did not stop cleanly");
}

/// async and epoch: the backup catches up after the client's writes (the
/// client's final flush closes the last epoch) and reads the same as the
/// primary through its own NBD export (an epoch backup through its journal).
#[test]
fn async_and_epoch_replicas_catch_up() {
    for mode in ["async", "epoch"] {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let k = key(dir);
        let img = dir.join("vm.img");
        run(
            "qemu-img",
            &["create", "-f", "raw", img.to_str().unwrap(), "16M"],
        );
        qemu_io_ok(img.to_str().unwrap(), &["write -P 0x5a 0 2M"]);
        let b_peer = format!("127.0.0.1:{}", free_port());
        let b = Server::start(
            dir,
            &[
                "--accept-migrations",
                dir.join("b-in").to_str().unwrap(),
                "--peer-listen",
                &b_peer,
                "--peer-key",
                &k,
                "--node-id",
                "node-b",
                "--received-journal",
                "on",
            ],
        );
        let a = Server::start(
            dir,
            &[
                "--export",
                &format!("name=vm,path={}", img.display()),
                "--peer-key",
                &k,
                "--node-id",
                "node-a",
            ],
        );
        a.ctl_ok(&[
            "replicate",
            "start",
            "vm",
            "--to",
            &b_peer,
            "--mode",
            mode,
            "--max-lag",
            "1M",
        ]);
        for w in WRITES {
            qemu_io_ok(&a.uri("vm"), &[w]);
        }
        wait_until("the replica caught up", || {
            let st = status(&a, "vm");
            st["state"] == "in_sync" && st["lag_bytes"] == 0 && st["pending_bytes"] == 0
        });
        assert_eq!(status(&a, "vm")["mode"], mode);
        run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                img.to_str().unwrap(),
                &b.uri("vm"),
            ],
        );
        qemu_io_ok(&b.uri("vm"), READS);
        let v = a.ctl_ok(&["replicate", "verify", "vm"]);
        assert!(v.contains(" 0 differing"), "{mode}: {v}");
        assert!(a.stop(), "{mode}: the primary did not stop cleanly");
        assert!(b.stop(), "{mode}: the backup did not stop cleanly");
    }
}
