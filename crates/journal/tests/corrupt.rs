//! Recovery of damaged journals: a real journal (records of several epochs
//! not yet applied) with random byte ranges overwritten must recover
//! without panicking, and what it recovers must still be an epoch prefix
//! (CRCs and sequence numbers stop the walk at the damage).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use proptest::prelude::*;
use understudy_journal::harness::{Model, Op, WorkloadShape, image_hash, random_workload};
use understudy_journal::sim::SimWorld;
use understudy_journal::{EpochDisk, FlushPolicy, JournalConfig};

const SIZE: u64 = 128 << 10;

fn cfg() -> JournalConfig {
    JournalConfig {
        capacity: 256 << 10,
        policy: FlushPolicy::Ordered {
            interval: Duration::from_secs(3600),
        },
        in_place_min: None,
    }
}

/// (initial image, image after the run, journal after the run, ops)
type Fixture = (Vec<u8>, Vec<u8>, Vec<u8>, Vec<Op>);

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let shape = WorkloadShape {
            size: SIZE,
            ops: 40,
            max_sectors: 8,
            order_every: 2,
            flush_every: 1000,
        };
        let ops = random_workload(shape, 99);
        let initial = vec![3u8; SIZE as usize];
        let w = SimWorld::new();
        let img = w.add_file(initial.clone());
        let jr = w.add_file(Vec::new());
        let (d, _) =
            EpochDisk::open(Arc::new(w.disk(img)), Arc::new(w.file(jr)), cfg()).expect("open");
        for op in &ops {
            op.issue(&d).expect("op");
        }
        // Durable in the journal, not applied: `sync` then snapshot.
        d.sync().expect("sync");
        let snap = (initial, w.contents(img), w.contents(jr), ops);
        drop(d);
        snap
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn damaged_journal_recovers_to_a_prefix_or_refuses(
        hits in proptest::collection::vec((0usize..300_000, 1usize..600, any::<u8>()), 1..6)
    ) {
        let (initial, image, journal, ops) = fixture();
        let mut j = journal.clone();
        for (at, len, v) in hits {
            let at = at % j.len();
            let end = (at + len).min(j.len());
            j[at..end].fill(v);
        }
        let model = Model::new(initial, ops);
        if let Ok(img) = understudy_journal::harness::recover(image, &j, &cfg()) {
            let h = image_hash(&img);
            let ok = model.prefixes_with_hash(h).iter().any(|&p| model.is_boundary(p));
            prop_assert!(ok, "recovered image is not an epoch prefix");
        }
    }
}

#[test]
fn fixture_journal_holds_unapplied_epochs() {
    let (initial, image, journal, ops) = fixture();
    // The image itself has not changed yet: everything is in the journal.
    assert_eq!(image, initial);
    let model = Model::new(initial, ops);
    let rec = understudy_journal::harness::recover(image, journal, &cfg()).expect("recover");
    assert_eq!(image_hash(&rec), model.hash_at(model.data_ops()));
}
