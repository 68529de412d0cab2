#![allow(clippy::unwrap_used)]
//! Crash safety of dirty bitmaps: `kill -9` the server during a write storm
//! from a real client, restart it, and check that every block whose
//! contents changed is dirty, and that over-marking stays inside the
//! write-intent extents the storm touched.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Server, covered};

const MIB: u64 = 1 << 20;
const DISK: u64 = 64 * MIB;
const REGION: (u64, u64) = (16 * MIB, 16 * MIB);

fn changed_blocks(path: &std::path::Path) -> Vec<u64> {
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 4096];
    let mut out = Vec::new();
    let mut off = 0;
    while off < DISK {
        f.read_exact(&mut buf).unwrap();
        if buf.iter().any(|&b| b != 0) {
            out.push(off);
        }
        off += 4096;
    }
    out
}

#[test]
fn kill_9_during_write_storm_loses_no_dirty_block() {
    for (round, delay_ms) in [0u64, 500, 1500].into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.raw");
        std::fs::File::create(&img).unwrap().set_len(DISK).unwrap();
        let export = format!("name=disk,path={},bitmap=bk:64k", img.display());
        let srv = Server::start(dir.path(), &["--intent-extent", "1M", "--export", &export]);

        // fio writes random 4k blocks (random, never-zero data) inside the
        // region at queue depth 16 until the server dies under it.
        let mut fio = Command::new("fio")
            .args([
                "--name=storm",
                "--ioengine=nbd",
                &format!("--uri={}", srv.uri("disk")),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                &format!("--offset={}", REGION.0),
                &format!("--size={}", REGION.1),
                "--time_based",
                "--runtime=30",
                "--refill_buffers",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot run fio (run scripts/install-deps.sh)");
        // Wait until the storm is under way, then let it run a while.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let list = srv.ctl_ok(&["bitmap", "list", "disk", "--json"]);
            let v: serde_json::Value = serde_json::from_str(&list).unwrap();
            if v[0]["bitmaps"][0]["dirty_bytes"].as_u64().unwrap_or(0) > 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "fio never wrote: {}",
                srv.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        let survivor = srv.restart_args_for_check();
        srv.kill9();
        let _ = fio.wait();

        let changed = changed_blocks(&img);
        assert!(
            !changed.is_empty(),
            "round {round}: the storm wrote nothing before the kill; the test proves nothing"
        );
        let srv = survivor.start(dir.path());
        let runs = srv.dirty_runs("disk", "bk");
        for &b in &changed {
            assert!(
                covered(&runs, b, 4096),
                "round {round}: block at {b} was written but is not dirty after kill -9"
            );
        }
        // Over-marking is bounded by the armed 1 MiB intent extents, all of
        // which lie inside the region the storm wrote to.
        for &(o, l) in &runs {
            assert!(
                o >= REGION.0 && o + l <= REGION.0 + REGION.1,
                "round {round}: dirty run {o}+{l} lies outside the written region"
            );
        }
        let list = srv.ctl_ok(&["bitmap", "list", "disk", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&list).unwrap();
        assert_eq!(v[0]["bitmaps"][0]["recovered"], true, "{list}");
        eprintln!(
            "round {round}: {} blocks changed, {} bytes dirty after recovery",
            changed.len(),
            runs.iter().map(|r| r.1).sum::<u64>()
        );
        assert!(srv.stop());
    }
}
