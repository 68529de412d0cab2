//! Codec-only timing over a recorded trace, for profiling (`perf record`).
//! Loads the dirty pages of every checkpoint first, then encodes and
//! decodes them with understudy's codec only, so that a profile shows the
//! codec and nothing else.
//!
//! `cargo run --release -p understudy-memsync --example codec_profile -- TRACE [ROUNDS]`
//! (`CODEC_LITERAL=lz4|none|zstdN` overrides the literal-section method).

use std::path::PathBuf;
use std::time::Duration;

use understudy_memsync::codec::{CodecConfig, Compression, Decoded, Decoder, Encoder};
use understudy_memsync::image::{DirtyTracker, pages};
use understudy_memsync::page::PAGE_SIZE;
use understudy_memsync::replay::thread_cpu_time;
use understudy_memsync::store::RefStore;
use understudy_memsync::trace::Trace;

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next().map(PathBuf::from) else {
        eprintln!("usage: codec_profile TRACE_DIR [ROUNDS]");
        std::process::exit(2);
    };
    let rounds: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1);
    let trace = match Trace::open(&dir) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("cannot open trace: {e}");
            std::process::exit(1);
        }
    };
    // Checkpoints as (pfns, page bytes).
    let mut cps: Vec<(Vec<u64>, Vec<u8>)> = Vec::new();
    let mut tracker = DirtyTracker::new();
    let mut cur = Vec::new();
    for i in 0..trace.len() {
        if let Err(e) = trace.read(i, u64::MAX, &mut cur) {
            eprintln!("cannot read image {i}: {e}");
            std::process::exit(1);
        }
        let dirty = match tracker.scan(&cur) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("scan failed: {e}");
                std::process::exit(1);
            }
        };
        let ps = pages(&cur, &dirty);
        let mut data = Vec::with_capacity(ps.len() * PAGE_SIZE);
        for (_, p) in &ps {
            data.extend_from_slice(&p[..]);
        }
        cps.push((ps.iter().map(|(n, _)| *n).collect(), data));
    }
    let image_pages = trace.image_len() / PAGE_SIZE as u64;
    let mut cfg = CodecConfig::new(image_pages);
    cfg.store_slots = RefStore::slots_for_budget(64 << 20);
    // CODEC_LITERAL=lz4|none|zstdN overrides the literal-section method.
    match std::env::var("CODEC_LITERAL").as_deref() {
        Ok("lz4") => cfg.literal = Compression::Lz4,
        Ok("none") => cfg.literal = Compression::None,
        Ok(z) if z.starts_with("zstd") => {
            cfg.literal = Compression::Zstd(z[4..].parse().unwrap_or(1));
        }
        _ => {}
    }
    let steady_bytes: u64 = cps.iter().skip(1).map(|c| c.1.len() as u64).sum();
    for round in 0..rounds {
        let mut enc = Encoder::new(cfg);
        let mut dec = Decoder::new(cfg);
        let mut out = Decoded::default();
        let mut bytes = Vec::new();
        let (mut te, mut td) = (Duration::ZERO, Duration::ZERO);
        let mut wire = 0u64;
        for (ck, (pfns, data)) in cps.iter().enumerate() {
            let list: Vec<(u64, &[u8; PAGE_SIZE])> = pfns
                .iter()
                .zip(data.chunks_exact(PAGE_SIZE))
                .map(|(&n, p)| (n, p.try_into().expect("page")))
                .collect();
            let t0 = thread_cpu_time();
            enc.encode_into(ck as u64, &list, &mut bytes)
                .expect("encode");
            let t1 = thread_cpu_time();
            dec.decode_into(&bytes, &mut out).expect("decode");
            let t2 = thread_cpu_time();
            assert_eq!(out.data, *data, "checkpoint {ck} differs");
            if ck == 0 && std::env::var_os("CODEC_PROFILE_MARK").is_some() {
                // For `perf record -k CLOCK_MONOTONIC`: samples after this
                // instant are the steady state.
                eprintln!("steady-from {:.6}", monotonic());
            }
            if ck > 0 {
                te += t1 - t0;
                td += t2 - t1;
                wire += bytes.len() as u64;
            }
        }
        println!(
            "round {round}: steady {:.1} MiB -> {:.2} MiB ({:.1}% saved), encode {:.0} MB/s, decode {:.0} MB/s",
            steady_bytes as f64 / 1048576.0,
            wire as f64 / 1048576.0,
            100.0 * (1.0 - wire as f64 / steady_bytes.max(1) as f64),
            steady_bytes as f64 / te.as_secs_f64() / 1e6,
            steady_bytes as f64 / td.as_secs_f64() / 1e6,
        );
    }
}

/// Seconds on CLOCK_MONOTONIC, the clock `perf record -k CLOCK_MONOTONIC`
/// stamps samples with.
fn monotonic() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the call writes only it.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}
