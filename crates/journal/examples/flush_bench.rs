//! Flush-heavy workloads on EpochDisk over RawDisk: Durable vs Ordered, and
//! RawDisk alone as the baseline. Run in release:
//!
//! ```text
//! cargo run --release -p understudy-journal --example flush_bench -- [DIR] [SECONDS]
//! ```
//!
//! DIR (default: the system temp dir) should be on the storage to measure;
//! every number includes a final sync, so Ordered is not credited for work
//! it merely postponed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use understudy_block::raw::RawDisk;
use understudy_block::{Disk, WriteOpts};
use understudy_journal::sim::Rng;
use understudy_journal::{EpochDisk, FlushPolicy, JournalConfig};

const SIZE: u64 = 1 << 30;

#[derive(Clone, Copy, Debug)]
enum Workload {
    /// One 4 KiB random write, then flush.
    SmallWriteFlush,
    /// A transaction: two 4 KiB random page writes, a 512-byte sequential
    /// log append, then flush (commit).
    DbCommit,
}

enum Setup {
    Raw,
    Epoch(FlushPolicy),
}

fn run(
    dir: &std::path::Path,
    setup: &Setup,
    w: Workload,
    secs: f64,
) -> (u64, Duration, Vec<Duration>) {
    let img = dir.join("bench.img");
    let _ = std::fs::remove_file(EpochDisk::journal_path(&img));
    let raw: Arc<dyn Disk> = Arc::new(RawDisk::create(&img, SIZE).expect("create image"));
    let mut epoch = None;
    let disk: Arc<dyn Disk> = match setup {
        Setup::Raw => raw,
        Setup::Epoch(policy) => {
            let cfg = JournalConfig {
                capacity: 256 << 20,
                policy: *policy,
                in_place_min: None,
            };
            let (d, _) =
                EpochDisk::open_path(raw, &EpochDisk::journal_path(&img), cfg).expect("open");
            let d = Arc::new(d);
            epoch = Some(Arc::clone(&d));
            d
        }
    };
    let mut rng = Rng(1);
    let page = vec![0x5Au8; 4096];
    let rec = vec![0xA5u8; 512];
    let mut log_pos = 0u64;
    let mut lat = Vec::new();
    let start = Instant::now();
    let mut txns = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        let t = Instant::now();
        match w {
            Workload::SmallWriteFlush => {
                let o = rng.below(SIZE / 4096 / 2) * 4096;
                disk.write_at(&page, o, WriteOpts::default())
                    .expect("write");
            }
            Workload::DbCommit => {
                for _ in 0..2 {
                    let o = rng.below(SIZE / 4096 / 2) * 4096;
                    disk.write_at(&page, o, WriteOpts::default())
                        .expect("write");
                }
                disk.write_at(&rec, SIZE / 2 + log_pos, WriteOpts::default())
                    .expect("log write");
                log_pos = (log_pos + 512) % (SIZE / 4);
            }
        }
        disk.flush().expect("flush");
        lat.push(t.elapsed());
        txns += 1;
    }
    // Make everything durable before stopping the clock.
    match &epoch {
        Some(d) => {
            d.sync().expect("final sync");
        }
        None => disk.flush().expect("final flush"),
    }
    let total = start.elapsed();
    drop(disk);
    if let Some(d) = epoch
        && let Ok(d) = Arc::try_unwrap(d)
    {
        d.close().expect("close");
    }
    let _ = std::fs::remove_file(&img);
    let _ = std::fs::remove_file(EpochDisk::journal_path(&img));
    lat.sort_unstable();
    (txns, total, lat)
}

fn pct(lat: &[Duration], p: f64) -> Duration {
    if lat.is_empty() {
        return Duration::ZERO;
    }
    lat[((lat.len() - 1) as f64 * p) as usize]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().map_or_else(std::env::temp_dir, PathBuf::from);
    let secs: f64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    println!("dir={} seconds/run={secs}", dir.display());
    println!("| workload | disk | commits/s | p50 flush | p99 flush | vs Durable |");
    println!("|---|---|---|---|---|---|");
    for w in [Workload::SmallWriteFlush, Workload::DbCommit] {
        let mut durable_rate = 0.0;
        for (name, setup) in [
            ("RawDisk (fdatasync per flush)", Setup::Raw),
            ("EpochDisk Durable", Setup::Epoch(FlushPolicy::Durable)),
            (
                "EpochDisk Ordered 5 s",
                Setup::Epoch(FlushPolicy::ordered()),
            ),
        ] {
            let (n, total, lat) = run(&dir, &setup, w, secs);
            let rate = n as f64 / total.as_secs_f64();
            if name == "EpochDisk Durable" {
                durable_rate = rate;
            }
            let rel = if durable_rate > 0.0 {
                format!("{:.1}x", rate / durable_rate)
            } else {
                "-".into()
            };
            println!(
                "| {w:?} | {name} | {rate:.0} | {:?} | {:?} | {rel} |",
                pct(&lat, 0.5),
                pct(&lat, 0.99)
            );
        }
    }
}
