//! Measures what the filter with three enabled dirty bitmaps costs per
//! write, compared with the bare disk and with a filter with no observers.
//!
//! `cargo run -p understudy-filter --example filter_overhead --profile test`
//! (add `-- WRITES THREADS` to change the defaults: 100000 writes, 1 thread).

use std::sync::Arc;
use std::time::Instant;

use understudy_bitmap::{BitmapStore, StoreOptions};
use understudy_block::raw::RawDisk;
use understudy_block::{Disk, WriteOpts};
use understudy_filter::FilterDisk;

const SIZE: u64 = 1 << 30;
const BS: usize = 4096;

fn run(disk: &Arc<dyn Disk>, writes: u64, threads: u64) -> f64 {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let disk = disk.clone();
            s.spawn(move || {
                let buf = vec![0x5Au8; BS];
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (t + 1);
                for _ in 0..writes / threads {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Random 4 KiB writes within a 64 MiB working set (one
                    // intent extent is armed once, then the fast path).
                    let off = (x % (64 << 20)) / BS as u64 * BS as u64;
                    disk.write_at(&buf, off, WriteOpts::default())
                        .expect("write");
                }
            });
        }
    });
    start.elapsed().as_nanos() as f64 / writes as f64
}

fn main() {
    let mut args = std::env::args().skip(1);
    let writes: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let threads: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.raw");
    let raw: Arc<dyn Disk> = Arc::new(RawDisk::create(&path, SIZE).expect("create"));
    let empty: Arc<dyn Disk> = Arc::new(FilterDisk::with_observers(raw.clone(), vec![]));
    let store =
        Arc::new(BitmapStore::open(&path, SIZE, StoreOptions::default()).expect("open store"));
    for (name, g) in [("backup", 65536), ("migration", 4096), ("resync", 1 << 20)] {
        store.add(name, g).expect("add");
    }
    let three: Arc<dyn Disk> = Arc::new(FilterDisk::new(raw.clone(), store.clone()));
    // Warm the page cache and arm the intent extent.
    run(&raw, writes / 4, threads);
    run(&three, writes / 4, threads);
    let (mut r, mut e, mut t) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..5 {
        r.push(run(&raw, writes, threads));
        e.push(run(&empty, writes, threads));
        t.push(run(&three, writes, threads));
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (r, e, t) = (med(&mut r), med(&mut e), med(&mut t));
    println!("{writes} x 4 KiB writes, {threads} thread(s), median of 5 runs:");
    println!("  raw disk               {r:8.0} ns/write");
    println!(
        "  filter, no observers   {e:8.0} ns/write ({:+.1}%)",
        (e / r - 1.0) * 100.0
    );
    println!(
        "  filter, 3 bitmaps      {t:8.0} ns/write ({:+.1}%)",
        (t / r - 1.0) * 100.0
    );
    // The bitmap path alone, without the disk: begin_write + complete.
    let n = writes * 10;
    let start = Instant::now();
    let mut x = 1u64;
    for _ in 0..n {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        let off = (x >> 20) % (64 << 20) / BS as u64 * BS as u64;
        store.begin_write(off, BS as u64).expect("begin").complete();
    }
    let b = start.elapsed().as_nanos() as f64 / n as f64;
    println!("  begin_write+complete   {b:8.0} ns/write (3 bitmaps, no I/O)");
    store.close().expect("close");
}
