//! `serve --tls require`: certificates made by `understudy certs`, a real
//! TLS client (qemu-io) served, and plaintext clients refused.

mod common;

use std::path::Path;

use common::{Server, run_raw};

fn certs(dir: &Path) {
    let ca = dir.join("ca");
    let ca_s = ca.display().to_string();
    let out = run_raw(common::bin(), &["certs", "init", "--dir", &ca_s]);
    assert!(out.status.success(), "certs init: {out:?}");
    let out = run_raw(
        common::bin(),
        &["certs", "issue", "--dir", &ca_s, "localhost"],
    );
    assert!(out.status.success(), "certs issue localhost: {out:?}");
    let client = dir.join("client").display().to_string();
    let out = run_raw(
        common::bin(),
        &[
            "certs",
            "issue",
            "--dir",
            &ca_s,
            "client1",
            "--qemu-dir",
            &client,
            "--qemu-role",
            "client",
        ],
    );
    assert!(out.status.success(), "certs issue client1: {out:?}");
}

fn qemu_io(creds_dir: Option<&Path>, port: u16, cmds: &[&str]) -> (bool, String) {
    let mut args: Vec<String> = Vec::new();
    let opts = match creds_dir {
        Some(d) => {
            args.push("--object".into());
            args.push(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                d.display()
            ));
            format!(
                "driver=nbd,host=127.0.0.1,port={port},export=d,tls-creds=tls0,tls-hostname=localhost"
            )
        }
        None => format!("driver=nbd,host=127.0.0.1,port={port},export=d"),
    };
    args.push("--image-opts".into());
    args.push(opts);
    for c in cmds {
        args.push("-c".into());
        args.push((*c).into());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_raw("qemu-io", &refs);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && !text.contains("failed"), text)
}

#[test]
fn serve_requires_tls_and_serves_tls_clients() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let img = dir.path().join("d.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let ca = dir.path().join("ca");
    let export = format!("name=d,path={},bitmap=b", img.display());
    let (cert, key, ca_pem) = (
        ca.join("localhost.pem").display().to_string(),
        ca.join("localhost-key.pem").display().to_string(),
        ca.join("ca.pem").display().to_string(),
    );
    let s = Server::start(
        dir.path(),
        &[
            "--export",
            &export,
            "--tls",
            "require",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-ca",
            &ca_pem,
        ],
    );
    let client = dir.path().join("client");
    let (ok, text) = qemu_io(
        Some(&client),
        s.port,
        &["write -P 0x5a 1M 64k", "read -P 0x5a 1M 64k"],
    );
    assert!(ok, "qemu-io over TLS failed: {text}");
    // The write went through the block filter like any other.
    assert!(common::covered(&s.dirty_runs("d", "b"), 1 << 20, 64 << 10));

    let (ok, text) = qemu_io(None, s.port, &["read 0 4k"]);
    assert!(!ok, "a plaintext client was served: {text}");
    assert!(
        text.to_lowercase().contains("tls"),
        "the refusal does not name TLS: {text}"
    );
    assert!(s.stop());
}

#[test]
fn tls_flags_without_certificates_are_refused_before_serving() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let export = format!("name=d,path={}", img.display());
    let out = run_raw(
        common::bin(),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--export",
            &export,
            "--tls",
            "require",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tls-cert"), "{err}");
    let out = run_raw(
        common::bin(),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--export",
            &export,
            "--tls-cert",
            "/nonexistent",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tls on"), "{err}");
}
