//! I/O errors injected at the journal's and the image's write and sync
//! points: the disk must stop (fail-stop, no silent loss), and every crash
//! state taken around the failure must still recover to an epoch prefix
//! that keeps every acknowledged flush.

use understudy_journal::harness::{
    CrashConfig, Target, WorkloadShape, crash_test, random_workload,
};
use understudy_journal::sim::{Failpoint, SimOp};
use understudy_journal::{FlushPolicy, JournalConfig};

const IMAGE: usize = 0;
const JOURNAL: usize = 1;

fn run(fp: Failpoint, seed: u64) {
    let shape = WorkloadShape {
        size: 256 << 10,
        ops: 200,
        max_sectors: 16,
        order_every: 3,
        flush_every: 10,
    };
    let ops = random_workload(shape, seed);
    let t = Target::Epoch(JournalConfig {
        capacity: 128 << 10,
        policy: FlushPolicy::Durable,
        in_place_min: None,
    });
    let mut c = CrashConfig::new(60, seed);
    c.failpoints = vec![fp];
    let out = crash_test(&vec![7u8; 256 << 10], &ops, &t, &c, |_| Ok(()));
    assert!(
        out.first_error.is_some(),
        "failpoint {fp:?} never surfaced: {out:?}"
    );
    // The error stopped the workload, or (image failpoints the background
    // writer reached only at the final stop) surfaced at the stop.
    assert!(
        out.ops_done < ops.len()
            || out
                .first_error
                .as_deref()
                .is_some_and(|e| e.starts_with("at stop")),
        "{out:?}"
    );
    assert!(
        out.violations.is_empty(),
        "{fp:?}: {:#?}",
        &out.violations[..out.violations.len().min(3)]
    );
}

#[test]
fn journal_write_failures() {
    for (i, nth) in [0u64, 7, 60, 150].into_iter().enumerate() {
        run(
            Failpoint {
                file: Some(JOURNAL),
                op: SimOp::Write,
                nth,
                sticky: i % 2 == 0,
            },
            i as u64,
        );
    }
}

#[test]
fn journal_fsync_failures() {
    // Sync 0 is the header written at open; later ones are epoch closes and
    // reclaim headers.
    for (i, nth) in [1u64, 5, 30].into_iter().enumerate() {
        run(
            Failpoint {
                file: Some(JOURNAL),
                op: SimOp::Sync,
                nth,
                sticky: false,
            },
            10 + i as u64,
        );
    }
}

#[test]
fn image_write_and_fsync_failures() {
    run(
        Failpoint {
            file: Some(IMAGE),
            op: SimOp::Write,
            nth: 20,
            sticky: true,
        },
        20,
    );
    run(
        Failpoint {
            file: Some(IMAGE),
            op: SimOp::Sync,
            nth: 1,
            sticky: false,
        },
        21,
    );
}
