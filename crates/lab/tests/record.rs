//! Record a real QEMU guest and replay the trace byte for byte (when the
//! guest artefacts from scripts/guest/build.sh exist; required when
//! UNDERSTUDY_REQUIRE_GUEST=1, which CI sets).

use std::path::PathBuf;
use std::time::Duration;

use understudy_lab::{GuestArtefacts, RecordError, RecordOptions, guest_cache_dir, record};
use understudy_memsync::replay::{ReplayOptions, run};

/// Where scripts/guest/build.sh put the guest (the test, not the library,
/// reads the environment).
fn guest_dir() -> PathBuf {
    guest_cache_dir(
        std::env::var_os("UNDERSTUDY_GUEST_CACHE").as_deref(),
        std::env::var_os("HOME").as_deref(),
    )
}

#[test]
fn missing_guest_artefacts_are_reported_before_qemu_starts() {
    let d = tempfile::tempdir().expect("tmp");
    let a = GuestArtefacts::in_dir(&d.path().join("no-guest"));
    let mut o = RecordOptions::new(
        a.kernel.clone(),
        a.initrd,
        "idle",
        Duration::from_millis(100),
        1,
        d.path().join("trace"),
    );
    o.qemu = PathBuf::from("/nonexistent/qemu");
    match record(&o) {
        Err(RecordError::Missing { path }) => assert_eq!(path, a.kernel),
        other => panic!("expected Missing, got {other:?}"),
    }
    assert!(!d.path().join("trace").exists());
}

#[test]
fn real_qemu_trace_replays_byte_for_byte() {
    let g = guest_dir();
    let GuestArtefacts { kernel, initrd } = GuestArtefacts::in_dir(&g);
    let required = std::env::var_os("UNDERSTUDY_REQUIRE_GUEST").is_some_and(|v| v == "1");
    if !kernel.is_file() || !initrd.is_file() {
        assert!(
            !required,
            "guest artefacts missing in {}: run scripts/guest/build.sh",
            g.display()
        );
        eprintln!(
            "guest artefacts not built ({}); real-trace replay not exercised",
            g.display()
        );
        return;
    }
    let d = tempfile::tempdir().expect("tmp");
    let mut o = RecordOptions::new(
        kernel,
        initrd,
        "kvstore",
        Duration::from_millis(100),
        5,
        d.path().to_path_buf(),
    );
    o.warmup = Duration::from_millis(200);
    let rec = record(&o).expect("recording needs qemu-system-x86_64");
    assert_eq!(rec.images, 5);
    let r = run(d.path(), &ReplayOptions::default()).expect("replay");
    assert!(r.verified && r.checkpoints == 5);
    assert!(
        r.steady_dirty_pages > 100,
        "the workload must dirty memory: {}",
        r.steady_dirty_pages
    );
    let xb = r.method("xbzrle").expect("xbzrle");
    let us = r.method("understudy").expect("understudy");
    assert!(us.steady_bytes < xb.steady_bytes);
    assert!(us.saved_vs_raw_pct > 80.0, "{r}");
}
