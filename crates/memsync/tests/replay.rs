//! Replay over a synthetic trace. The replay of a real QEMU recording is
//! in the `understudy-lab` crate's tests, next to the recorder.

use std::path::Path;

use understudy_memsync::page::PAGE_SIZE;
use understudy_memsync::replay::{PageStats, ReplayOptions, run};
use understudy_memsync::trace::write_image;

fn fill(seed: u64, out: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for b in out {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

/// A trace with in-place updates, page copies (fork-like) and zeroing.
fn synthetic(dir: &Path, pages: usize, images: usize) {
    let mut img = vec![0u8; pages * PAGE_SIZE];
    for p in 0..pages / 2 {
        fill(p as u64 + 1, &mut img[p * PAGE_SIZE..p * PAGE_SIZE + 1500]);
    }
    for i in 0..images {
        write_image(dir, i, &img).expect("write");
        for k in 0..40 {
            let p = (i * 37 + k * 11) % (pages / 2);
            let at = p * PAGE_SIZE + (k * 97) % 1400;
            img[at..at + 8].copy_from_slice(&((i * 1000 + k) as u64).to_le_bytes());
        }
        // Copy-on-write style: a near copy of a page lands elsewhere.
        for k in 0..10 {
            let src = (i * 5 + k) % (pages / 2);
            let dst = pages / 2 + (i * 13 + k * 7) % (pages / 2);
            let page = img[src * PAGE_SIZE..(src + 1) * PAGE_SIZE].to_vec();
            img[dst * PAGE_SIZE..(dst + 1) * PAGE_SIZE].copy_from_slice(&page);
            img[dst * PAGE_SIZE + 3] ^= 0x40;
        }
        let z = pages / 2 + (i * 3) % (pages / 2);
        img[z * PAGE_SIZE..(z + 1) * PAGE_SIZE].fill(0);
    }
}

#[test]
fn synthetic_trace_replays_and_understudy_wins() {
    let d = tempfile::tempdir().expect("tmp");
    synthetic(d.path(), 512, 8);
    let opts = ReplayOptions {
        store_budget_bytes: 1 << 20,
        xbzrle_cache_bytes: 1 << 20,
        ..ReplayOptions::default()
    };
    let r = run(d.path(), &opts).expect("replay");
    assert!(r.verified);
    assert_eq!(r.checkpoints, 8);
    assert_eq!(r.per_checkpoint.len(), 8);
    assert_eq!(r.per_checkpoint[0].dirty_pages, 512);
    let raw = r.method("raw").expect("raw");
    let xb = r.method("xbzrle").expect("xbzrle");
    let us = r.method("understudy").expect("understudy");
    assert_eq!(
        raw.steady_bytes,
        r.steady_dirty_pages * (8 + PAGE_SIZE as u64)
    );
    assert!(
        us.steady_bytes < xb.steady_bytes,
        "understudy {} vs xbzrle {}",
        us.steady_bytes,
        xb.steady_bytes
    );
    assert!(us.saved_vs_raw_pct > 90.0, "{}", us.saved_vs_raw_pct);
    match &us.pages {
        PageStats::Understudy(k) => {
            assert!(
                k.delta_content_match + k.duplicate > 0,
                "copies must be found by content: {k:?}"
            );
            assert_eq!(k.total(), r.steady_dirty_pages);
        }
        other => panic!("wrong stats {other:?}"),
    }
    // The report prints and serialises.
    let text = r.to_string();
    assert!(text.contains("understudy") && text.contains("verified"));
    let json = serde_json::to_string(&r).expect("json");
    assert!(json.contains("\"saved_vs_raw_pct\""));
    // Stride halves the checkpoints.
    let r2 = run(
        d.path(),
        &ReplayOptions {
            stride: 2,
            ..opts.clone()
        },
    )
    .expect("replay");
    assert_eq!(r2.checkpoints, 4);
    assert!(run(d.path(), &ReplayOptions { stride: 0, ..opts }).is_err());
}
