#![allow(clippy::unwrap_used)]
//! `understudy certs init|issue` as an operator runs them.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn certs(args: &[&str], dir: &Path) -> Output {
    Command::new(common::bin())
        .args(["--log", "warn", "certs"])
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// `openssl verify -CAfile` (skipped when openssl is not installed).
fn openssl_verifies(ca: &Path, cert: &Path) -> Option<bool> {
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(ca)
        .arg(cert)
        .output()
        .ok()?;
    Some(out.status.success())
}

#[test]
fn init_and_issue_write_verifiable_certificates_with_private_keys() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("pki");
    ok(&certs(&["init"], &dir));
    assert_eq!(mode(&dir.join("ca-key.pem")), 0o600);
    assert!(dir.join("ca.pem").exists());
    let q = t.path().join("qemu");
    let text = ok(&certs(
        &[
            "issue",
            "host-a",
            "--days",
            "30",
            "--qemu-dir",
            q.to_str().unwrap(),
            "--qemu-role",
            "server",
        ],
        &dir,
    ));
    assert!(text.contains("host-a.pem"), "{text}");
    assert_eq!(mode(&dir.join("host-a-key.pem")), 0o600);
    assert_eq!(mode(&q.join("server-key.pem")), 0o600);
    for f in ["ca-cert.pem", "server-cert.pem"] {
        assert!(q.join(f).exists(), "{f}");
    }
    ok(&certs(&["issue", "host-b"], &dir));
    match openssl_verifies(&dir.join("ca.pem"), &dir.join("host-a.pem")) {
        Some(v) => {
            assert!(v, "openssl refused host-a.pem");
            assert_eq!(
                openssl_verifies(&dir.join("ca.pem"), &dir.join("host-b.pem")),
                Some(true)
            );
            assert_eq!(
                openssl_verifies(&q.join("ca-cert.pem"), &q.join("server-cert.pem")),
                Some(true)
            );
        }
        None => eprintln!("openssl not installed: skipping openssl verify"),
    }
    // A second init would orphan every certificate: refused.
    let out = certs(&["init"], &dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to overwrite"), "{err}");
    // Issuing without a CA says how to make one.
    let out = certs(&["issue", "host-c"], &t.path().join("nothing"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("certs init"), "{err}");
}
