//! `understudy migrate` between two real daemons on loopback, with a real
//! NBD client (qemu-io) connected to the source across the switch-over.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const KEY_HEX: &str = "3f9c1a7e5b2d4c6e8f0a1b3c5d7e9f1a2b4c6d8e0f1a3b5c7d9e1f2a4b6c8d0e";

fn key(dir: &Path, name: &str, hex: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, format!("{hex}\n")).unwrap();
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    p.display().to_string()
}

fn qemu_io(target: &str, cmds: &[String]) -> std::process::Output {
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(target.into());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    run_raw("qemu-io", &a)
}

fn qemu_io_ok(target: &str, cmds: &[String]) {
    let out = qemu_io(target, cmds);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("error"),
        "qemu-io {target}: {text}"
    );
}

/// Poll `cond` until it holds; fail the test with `what` after 30 s.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let t = std::time::Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "timed out waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `len` bytes of the raw image at `off`.
fn region(image: &Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0; len];
    std::fs::File::open(image)
        .unwrap()
        .read_exact_at(&mut buf, off)
        .unwrap();
    buf
}

fn compare(a: &Path, b: &Path) {
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ],
    );
}

struct Pair {
    a: Server,
    b: Server,
    b_peer: String,
    img: std::path::PathBuf,
    expected: std::path::PathBuf,
    b_img: std::path::PathBuf,
}

fn pair(dir: &Path) -> Pair {
    let k = key(dir, "peer.key", KEY_HEX);
    let img = dir.join("vm.img");
    run(
        "qemu-img",
        &["create", "-f", "raw", img.to_str().unwrap(), "24M"],
    );
    qemu_io_ok(
        img.to_str().unwrap(),
        &["write -P 0x5a 0 3M".into(), "write -P 0x6b 10M 2M".into()],
    );
    let expected = dir.join("expected.img");
    std::fs::copy(&img, &expected).unwrap();
    let a_peer = format!("127.0.0.1:{}", free_port());
    let a = Server::start(
        dir,
        &[
            "--export",
            &format!("name=vm,path={}", img.display()),
            "--peer-key",
            &k,
            "--node-id",
            "node-a",
            "--accept-migrations",
            dir.join("a-in").to_str().unwrap(),
            "--peer-listen",
            &a_peer,
        ],
    );
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
    let b_img = dir.join("b-in").join("vm.img");
    Pair {
        a,
        b,
        b_peer,
        img,
        expected,
        b_img,
    }
}

#[test]
fn migrate_with_a_connected_client_then_back_incrementally() {
    let tmp = tempfile::tempdir().unwrap();
    let p = pair(tmp.path());
    // A client connected to A through the whole migration: writes, sleeps,
    // and finally reads back what it wrote.
    let mut cmds = Vec::new();
    for i in 0..120u64 {
        cmds.push(format!(
            "write -P {} {} 64k",
            i % 200 + 1,
            (i * 7 % 300) * 65536
        ));
        cmds.push("sleep 5".into());
    }
    for i in 0..120u64 {
        // Only the last write of each offset is checked.
        if (i + 1..120).all(|j| j * 7 % 300 != i * 7 % 300) {
            cmds.push(format!(
                "read -P {} {} 64k",
                i % 200 + 1,
                (i * 7 % 300) * 65536
            ));
        }
    }
    let uri = p.a.uri("vm");
    let c2 = cmds.clone();
    let before = region(&p.img, 0, 64 << 10);
    let writer = std::thread::spawn(move || qemu_io_ok(&uri, &c2));
    // The client is running once its first write (64 KiB at 0) shows.
    wait_until("the client's first write is visible in the image", || {
        region(&p.img, 0, 64 << 10) != before || writer.is_finished()
    });
    let out =
        p.a.ctl_ok(&["migrate", "vm", "--to", &p.b_peer, "--json", "--verify"]);
    let last: serde_json::Value =
        serde_json::from_str(out.lines().last().expect("JSON lines")).unwrap();
    assert_eq!(last["phase"], "completed", "{out}");
    assert_eq!(last["start"], "fresh");
    // A downtime was measured (its size is a benchmark's business).
    assert!(last["downtime_ms"].as_f64().is_some(), "{last}");
    assert!(last["verified_blocks"].as_u64().unwrap() > 0, "{last}");
    assert_eq!(last["mismatched_blocks"], 0);
    writer.join().unwrap();
    let w: Vec<String> = cmds
        .iter()
        .filter(|c| c.starts_with("write"))
        .cloned()
        .collect();
    qemu_io_ok(p.expected.to_str().unwrap(), &w);
    compare(&p.expected, &p.b_img);
    // New clients: A no longer offers the export, B does.
    assert!(
        !qemu_io(&p.a.uri("vm"), &["read 0 4k".into()])
            .status
            .success()
    );
    qemu_io_ok(&p.b.uri("vm"), &["read -P 0x6b 10M 64k".into()]);
    // Both servers say so, and B's copy has bitmaps a user can manage.
    let list = |s: &Server| -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_str(&s.ctl_ok(&["export", "list", "--json"])).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "vm")
            .cloned()
            .unwrap_or_else(|| panic!("no vm in {v}"))
    };
    let on_a = list(&p.a);
    assert_eq!(on_a["serving"], "forwarded", "{on_a}");
    assert_eq!(on_a["received"], false, "{on_a}");
    let on_b = list(&p.b);
    assert_eq!(on_b["serving"], "local", "{on_b}");
    assert_eq!(on_b["received"], true, "{on_b}");
    assert_eq!(on_b["size"], on_a["size"]);
    assert!(p.b.ctl_ok(&["export", "list"]).contains("vm"));
    p.b.ctl_ok(&["bitmap", "add", "vm", "backup"]);
    qemu_io_ok(&p.b.uri("vm"), &["write -P 0x44 22M 64k".into()]);
    qemu_io_ok(
        p.expected.to_str().unwrap(),
        &["write -P 0x44 22M 64k".into()],
    );
    assert_eq!(p.b.dirty_runs("vm", "backup"), vec![(22 << 20, 64 << 10)]);

    // Change a little on B, then move it back to A: only that is sent.
    qemu_io_ok(&p.b.uri("vm"), &["write -P 0x33 20M 128k".into()]);
    qemu_io_ok(
        p.expected.to_str().unwrap(),
        &["write -P 0x33 20M 128k".into()],
    );
    let a_peer = p.a.args[p.a.args.iter().position(|a| a == "--peer-listen").unwrap() + 1].clone();
    let out = p.b.ctl_ok(&["migrate", "vm", "--to", &a_peer, "--json"]);
    let back: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(back["phase"], "completed", "{out}");
    assert_eq!(back["start"], "incremental", "{back}");
    // B changed 192 KiB plus whatever the forwarded client wrote after the
    // commit; the seed data (5 MiB) is not sent again.
    let sent = back["data_bytes"].as_u64().unwrap();
    assert!(
        (192 << 10..=(192 << 10) + 120 * (64 << 10)).contains(&sent),
        "{back}"
    );
    compare(&p.expected, &p.img);
    qemu_io_ok(&p.a.uri("vm"), &["read -P 0x33 20M 128k".into()]);
    // Now with no client: to B sends nothing, back to A sends exactly the
    // change made on B.
    let out = p.a.ctl_ok(&["migrate", "vm", "--to", &p.b_peer, "--json"]);
    let there: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(there["start"], "incremental", "{there}");
    assert_eq!(there["data_bytes"], 0, "{there}");
    qemu_io_ok(&p.b.uri("vm"), &["write -P 0x44 1M 128k".into()]);
    qemu_io_ok(
        p.expected.to_str().unwrap(),
        &["write -P 0x44 1M 128k".into()],
    );
    let out = p.b.ctl_ok(&["migrate", "vm", "--to", &a_peer, "--json"]);
    let back: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(back["data_bytes"], 128 * 1024, "{back}");
    compare(&p.expected, &p.img);
    assert!(p.a.stop());
    assert!(p.b.stop());
}

#[test]
fn ownership_survives_restarts_and_bad_keys_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let p = pair(tmp.path());
    // Wrong key: refused with an explanation, A keeps serving.
    let bad_key = key(tmp.path(), "other.key", &KEY_HEX.replace('3', "4"));
    let c = Server::start(
        tmp.path(),
        &[
            "--accept-migrations",
            tmp.path().join("c-in").to_str().unwrap(),
            "--peer-listen",
            &format!("127.0.0.1:{}", free_port()),
            "--peer-key",
            &bad_key,
            "--node-id",
            "node-c",
        ],
    );
    let c_peer = c.args[c.args.iter().position(|a| a == "--peer-listen").unwrap() + 1].clone();
    let out = p.a.ctl(&["migrate", "vm", "--to", &c_peer]);
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(text.contains("same --peer-key"), "{text}");
    qemu_io_ok(&p.a.uri("vm"), &["read -P 0x5a 0 4k".into()]);

    p.a.ctl_ok(&["migrate", "vm", "--to", &p.b_peer]);
    // A restarted with the handed-over image refuses to serve it.
    let a_args = p.a.args.clone();
    assert!(p.a.stop());
    let out = run_raw(
        bin(),
        &a_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("handed over to node node-b"), "{err}");
    // B restarted serves what it owns.
    let again = p.b.restart_args_for_check();
    assert!(p.b.stop());
    let b2 = again.start(tmp.path());
    qemu_io_ok(&b2.uri("vm"), &["read -P 0x6b 10M 64k".into()]);
    assert!(b2.stop());
    drop(c);
    let _ = p.img;
}

/// A lost commit answer, then a restart of A: A starts anyway (it used to
/// refuse), serves nothing from the image (I/O fails, `export list` says
/// `failed`), and `understudy migrate` to B settles it: B had committed,
/// so the handover stands.
#[test]
fn restarted_in_doubt_source_is_settled_by_migrate() {
    use understudy_migration::record::{self, OwnerState};
    let tmp = tempfile::tempdir().unwrap();
    let p = pair(tmp.path());
    p.a.ctl_ok(&["migrate", "vm", "--to", &p.b_peer]);
    let again = p.a.restart_args_for_check();
    assert!(p.a.stop());
    // Make A's record what a lost commit answer leaves: `handing`, at the
    // generation before the commit.
    let mut ra = record::load(&p.img).unwrap().unwrap();
    ra.generation -= 1;
    ra.state = OwnerState::Handing {
        to: "node-b".into(),
        migration_id: record::new_id_hex(),
    };
    record::store(&p.img, &ra).unwrap();

    let a2 = again.start(tmp.path());
    let v: serde_json::Value =
        serde_json::from_str(&a2.ctl_ok(&["export", "list", "--json"])).unwrap();
    assert_eq!(v[0]["serving"], "failed", "{v}");
    assert!(
        !qemu_io(&a2.uri("vm"), &["read 0 4k".into()])
            .status
            .success(),
        "an image in doubt must not be served"
    );
    assert!(a2.log_text().contains("in doubt"), "{}", a2.log_text());

    let out = a2.ctl_ok(&["migrate", "vm", "--to", &p.b_peer, "--json"]);
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["phase"], "completed", "{out}");
    assert_eq!(last["start"], "settled", "{out}");
    let ra = record::load(&p.img).unwrap().unwrap();
    assert!(
        matches!(ra.state, OwnerState::HandedOver { ref to } if to == "node-b"),
        "{ra:?}"
    );
    // B still owns and serves it.
    qemu_io_ok(&p.b.uri("vm"), &["read -P 0x6b 10M 64k".into()]);
    assert!(a2.stop());
}

/// B is killed (SIGKILL) in the middle of the bulk copy: A stays the owner
/// and keeps serving; B comes back and the retry resumes from what B had
/// made durable.
#[test]
fn target_killed_mid_bulk_then_retry_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let p = pair(tmp.path());
    let b_again = p.b.restart_args_for_check();
    let ctl = p.a.control.display().to_string();
    let to = p.b_peer.clone();
    // 5 MiB allocated at 2 MiB/s: about 2.5 s of bulk.
    let mut job = std::process::Command::new(bin())
        .args([
            "migrate",
            "vm",
            "--to",
            &to,
            "--control",
            &ctl,
            "--bandwidth",
            "2M",
            "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Kill B while the bulk is still running but past its first
    // checkpoint (every second, or 2 MiB at this rate): B has made some of
    // it durable.
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(job.stdout.take().unwrap()));
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let st: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        let in_bulk = st["phase"] == "bulk" && st["bulk_done"].as_u64().unwrap() >= 3 << 20;
        seen.push(st);
        if in_bulk {
            break;
        }
    }
    assert!(
        seen.last().is_some_and(|st| st["phase"] == "bulk"),
        "the migration left the bulk phase before 3 MiB were copied: {seen:?}"
    );
    p.b.kill9();
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    let out = std::process::Output {
        status: job.wait().unwrap(),
        stdout: rest.join("\n").into_bytes(),
        stderr: Vec::new(),
    };
    assert!(!out.status.success());
    let last: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(last["phase"], "failed", "{last}");
    assert_eq!(last["retryable"], true, "{last}");
    // A still serves and owns the disk; writes go on.
    qemu_io_ok(&p.a.uri("vm"), &["write -P 0x21 6M 64k".into()]);
    qemu_io_ok(
        p.expected.to_str().unwrap(),
        &["write -P 0x21 6M 64k".into()],
    );
    let b = b_again.start(tmp.path());
    let out = p.a.ctl_ok(&["migrate", "vm", "--to", &p.b_peer, "--json"]);
    let st: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(st["phase"], "completed", "{st}");
    assert_eq!(st["start"], "resume", "{st}");
    assert!(
        st["bulk_bytes"].as_u64().unwrap() < 5 << 20,
        "the retry must not start from zero: {st}"
    );
    compare(&p.expected, &p.b_img);
    assert!(p.a.stop());
    assert!(b.stop());
}

/// `understudy certs` makes a CA and node certificates; two daemons whose
/// peer links run over mutual TLS migrate a disk byte-exact, and a node
/// certified by another CA is refused.
#[test]
fn migrate_over_mutual_tls_and_refuse_a_foreign_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = dir.join("ca").display().to_string();
    let other = dir.join("other-ca").display().to_string();
    run(bin(), &["certs", "init", "--dir", &ca]);
    run(bin(), &["certs", "init", "--dir", &other]);
    for (d, node) in [(&ca, "node-a"), (&ca, "node-b"), (&other, "node-c")] {
        run(bin(), &["certs", "issue", "--dir", d, node]);
    }
    let tls = |d: &str, node: &str| -> Vec<String> {
        vec![
            "--peer-tls-cert".into(),
            format!("{d}/{node}.pem"),
            "--peer-tls-key".into(),
            format!("{d}/{node}-key.pem"),
            "--peer-tls-ca".into(),
            format!("{d}/ca.pem"),
        ]
    };
    let img = dir.join("vm.img");
    run(
        "qemu-img",
        &["create", "-f", "raw", img.to_str().unwrap(), "16M"],
    );
    qemu_io_ok(img.to_str().unwrap(), &["write -P 0x3d 1M 2M".into()]);
    let expected = dir.join("expected.img");
    std::fs::copy(&img, &expected).unwrap();
    let start = |extra: Vec<String>| {
        let refs: Vec<&str> = extra.iter().map(String::as_str).collect();
        Server::start(dir, &refs)
    };
    let mut a_args = vec![
        "--export".to_string(),
        format!("name=vm,path={}", img.display()),
    ];
    a_args.extend(tls(&ca, "node-a"));
    let a = start(a_args);
    let peer_of = |name: &str| -> (String, Vec<String>) {
        let addr = format!("127.0.0.1:{}", free_port());
        let args = vec![
            "--accept-migrations".into(),
            dir.join(format!("{name}-in")).display().to_string(),
            "--peer-listen".into(),
            addr.clone(),
        ];
        (addr, args)
    };
    let (c_peer, mut c_args) = peer_of("c");
    c_args.extend(tls(&other, "node-c"));
    let c = start(c_args);
    let out = a.ctl(&["migrate", "vm", "--to", &c_peer]);
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "a foreign CA was accepted: {text}");
    qemu_io_ok(&a.uri("vm"), &["read -P 0x3d 1M 4k".into()]);

    let (b_peer, mut b_args) = peer_of("b");
    b_args.extend(tls(&ca, "node-b"));
    let b = start(b_args);
    a.ctl_ok(&["migrate", "vm", "--to", &b_peer]);
    qemu_io_ok(&b.uri("vm"), &["read -P 0x3d 1M 2M".into()]);
    compare(&expected, &dir.join("b-in").join("vm.img"));
    assert!(b.stop());
    assert!(a.stop());
    drop(c);
}
