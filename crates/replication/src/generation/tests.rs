use proptest::prelude::*;

use super::*;

fn st(current: u64, bitmap: u64, history: &[u64]) -> GenState {
    GenState {
        gens: Generations {
            current,
            bitmap,
            history: history.to_vec(),
        },
        crashed_primary: false,
    }
}

fn crashed(mut s: GenState) -> GenState {
    s.crashed_primary = true;
    s
}

/// Every connect case, each with the rule that decides it.
#[test]
fn every_connect_case() {
    use Decision::*;
    use Direction::*;
    let cases: Vec<(&str, GenState, GenState, Decision)> = vec![
        ("both never held data", st(0, 0, &[]), st(0, 0, &[]), NoSync),
        (
            "I am empty",
            st(0, 0, &[]),
            st(5, 0, &[]),
            FullSync {
                direction: FromPeer,
            },
        ),
        (
            "the peer is empty",
            st(5, 0, &[]),
            st(0, 0, &[]),
            FullSync { direction: ToPeer },
        ),
        ("same current", st(5, 0, &[1]), st(5, 0, &[1]), NoSync),
        (
            "same current, bitmaps differ",
            st(5, 3, &[]),
            st(5, 0, &[]),
            NoSync,
        ),
        (
            "same current, I crashed as primary",
            crashed(st(5, 0, &[])),
            st(5, 0, &[]),
            SyncFromBitmap { direction: ToPeer },
        ),
        (
            "same current, the peer crashed as primary",
            st(5, 0, &[]),
            crashed(st(5, 0, &[])),
            SyncFromBitmap {
                direction: FromPeer,
            },
        ),
        (
            "same current, both crashed as primary",
            crashed(st(5, 0, &[])),
            crashed(st(5, 0, &[])),
            SplitBrain { recoverable: true },
        ),
        (
            "the peer went on with a bitmap from my current",
            st(5, 0, &[]),
            st(6, 5, &[]),
            SyncFromBitmap {
                direction: FromPeer,
            },
        ),
        (
            "I went on with a bitmap from the peer's current",
            st(6, 5, &[]),
            st(5, 0, &[]),
            SyncFromBitmap { direction: ToPeer },
        ),
        (
            "bitmaps point at each other",
            st(6, 5, &[]),
            st(5, 6, &[]),
            SplitBrain { recoverable: false },
        ),
        (
            "my current is in the peer's history",
            st(4, 0, &[]),
            st(6, 5, &[4]),
            FullSync {
                direction: FromPeer,
            },
        ),
        (
            "the peer's current is in my history",
            st(6, 5, &[4]),
            st(4, 0, &[]),
            FullSync { direction: ToPeer },
        ),
        (
            "each current in the other's history",
            st(4, 0, &[6]),
            st(6, 0, &[4]),
            SplitBrain { recoverable: false },
        ),
        (
            "both went on from one state",
            st(6, 5, &[]),
            st(7, 5, &[]),
            SplitBrain { recoverable: true },
        ),
        (
            "a common id only in the histories",
            st(6, 5, &[2]),
            st(8, 7, &[2]),
            SplitBrain { recoverable: false },
        ),
        (
            "my bitmap id in the peer's history",
            st(6, 5, &[]),
            st(8, 7, &[5]),
            SplitBrain { recoverable: false },
        ),
        (
            "nothing in common",
            st(6, 5, &[4]),
            st(9, 8, &[7]),
            Unrelated,
        ),
        (
            "nothing in common, no bitmaps",
            st(6, 0, &[]),
            st(9, 0, &[]),
            Unrelated,
        ),
    ];
    for (name, local, peer, want) in cases {
        assert_eq!(decide(&local, &peer), want, "{name}");
        assert_eq!(decide(&peer, &local), want.mirror(), "{name} (mirrored)");
    }
}

/// The life of a pair, step by step, with the decision at each reconnect.
#[test]
fn a_pair_through_disconnect_failover_and_split_brain() {
    use Decision::*;
    use Direction::*;
    // Initial full sync: the primary has data, the backup none.
    let mut p = Generations::fresh(10);
    let mut b = Generations::default();
    let s = |g: &Generations| GenState {
        gens: g.clone(),
        crashed_primary: false,
    };
    assert_eq!(decide(&s(&p), &s(&b)), FullSync { direction: ToPeer });
    b.sync_done_target(&p);
    p.sync_done_source();
    assert_eq!(decide(&s(&p), &s(&b)), NoSync);
    // Link cut: the primary goes on alone.
    p.new_current(11);
    assert_eq!(decide(&s(&p), &s(&b)), SyncFromBitmap { direction: ToPeer });
    b.sync_done_target(&p);
    p.sync_done_source();
    assert_eq!(decide(&s(&p), &s(&b)), NoSync);
    // Failover: the backup is promoted while the primary is down; the old
    // primary comes back and is the target of a bitmap resync.
    b.new_current(12);
    assert_eq!(
        decide(&s(&p), &s(&b)),
        SyncFromBitmap {
            direction: FromPeer
        }
    );
    // A stale old primary that tries to be the source is refused by the
    // generations: from its own view it is the target.
    assert_ne!(decide(&s(&p), &s(&b)), SyncFromBitmap { direction: ToPeer });
    p.sync_done_target(&b);
    b.sync_done_source();
    // Partition with both promoted: split brain, recoverable by policy.
    let (mut x, mut y) = (p.clone(), b.clone());
    x.new_current(13);
    y.new_current(14);
    assert_eq!(decide(&s(&x), &s(&y)), SplitBrain { recoverable: true });
    // One of them is promoted again: still split brain, no longer by policy.
    y.new_current(15);
    assert_eq!(decide(&s(&x), &s(&y)), SplitBrain { recoverable: false });
}

#[test]
fn history_is_bounded_and_new_current_keeps_lineage() {
    let mut g = Generations::fresh(1);
    for id in 2..20 {
        g.new_current(id);
        assert!(g.history.len() <= HISTORY_LEN);
        assert_eq!(g.bitmap, id - 1);
    }
    assert_eq!(g.history.first(), Some(&17));
}

fn arb_state() -> impl Strategy<Value = GenState> {
    // Few distinct ids, so that the rules' equalities happen often.
    (
        0u64..6,
        0u64..6,
        proptest::collection::vec(1u64..6, 0..=HISTORY_LEN),
        any::<bool>(),
    )
        .prop_map(|(current, bitmap, history, crashed_primary)| GenState {
            gens: Generations {
                current,
                bitmap,
                history,
            },
            crashed_primary,
        })
}

proptest! {
    #[test]
    fn decide_is_symmetric(a in arb_state(), b in arb_state()) {
        prop_assert_eq!(decide(&a, &b), decide(&b, &a).mirror());
    }

    #[test]
    fn never_no_sync_when_currents_differ(a in arb_state(), b in arb_state()) {
        if a.gens.current != b.gens.current {
            prop_assert_ne!(decide(&a, &b), Decision::NoSync);
        }
    }

    #[test]
    fn split_brain_policies_are_symmetric(
        ca in 0u64..3, cb in 0u64..3, pa in 0u64..3, pb in 0u64..3,
        na in "[ab]", nb in "[ab]", which in 0usize..5,
    ) {
        let policy = match which {
            0 => AfterSplitBrain::Disconnect,
            1 => AfterSplitBrain::DiscardYounger,
            2 => AfterSplitBrain::DiscardZeroChanges,
            3 => AfterSplitBrain::DiscardNode("a".into()),
            _ => AfterSplitBrain::DiscardNode("c".into()),
        };
        let a = SplitFacts { node: na, changed_bytes: ca, promoted_at_ms: pa };
        let b = SplitFacts { node: nb, changed_bytes: cb, promoted_at_ms: pb };
        prop_assert_eq!(
            resolve_split_brain(&policy, &a, &b),
            resolve_split_brain(&policy, &b, &a).mirror()
        );
    }

    #[test]
    fn records_round_trip(a in arb_state(), open in any::<bool>()) {
        let mut r = GenRecord::new("vm", Role::Backup, a.gens);
        r.primary_open = open;
        r.peer = Some("node-b".into());
        r.resync = Some(ResyncMarker { peer: "node-b".into(), source: false });
        prop_assert_eq!(decode(&encode(&r)).expect("decodes"), r);
    }
}

#[test]
fn split_brain_policies() {
    use Resolution::*;
    let f = |node: &str, changed_bytes, promoted_at_ms| SplitFacts {
        node: node.into(),
        changed_bytes,
        promoted_at_ms,
    };
    let (a, b) = (f("a", 4096, 100), f("b", 0, 200));
    let r = |p: &str| resolve_split_brain(&p.parse().expect("policy"), &a, &b);
    assert_eq!(r("disconnect"), Disconnect);
    assert_eq!(r("discard-younger"), DiscardPeer);
    assert_eq!(r("discard-zero-changes"), DiscardPeer);
    assert_eq!(r("discard-node a"), DiscardLocal);
    assert_eq!(r("discard-node=b"), DiscardPeer);
    assert_eq!(r("discard-node c"), Disconnect);
    let both = (f("a", 1, 5), f("b", 1, 5));
    for p in ["discard-younger", "discard-zero-changes"] {
        let p: AfterSplitBrain = p.parse().expect("policy");
        assert_eq!(resolve_split_brain(&p, &both.0, &both.1), Disconnect, "{p}");
    }
    let e = "discard-older"
        .parse::<AfterSplitBrain>()
        .expect_err("unknown");
    assert!(e.to_string().contains("discard-node NODE"), "{e}");
    assert!("discard-node".parse::<AfterSplitBrain>().is_err());
    for p in [
        "disconnect",
        "discard-younger",
        "discard-zero-changes",
        "discard-node x",
    ] {
        assert_eq!(p.parse::<AfterSplitBrain>().expect("policy").to_string(), p);
    }
}

#[test]
fn records_store_load_and_refuse_damage() {
    let dir = tempfile::tempdir().expect("tmp");
    let img = dir.path().join("d.img");
    assert!(load(&img).expect("load").is_none());
    let r = GenRecord::new("d", Role::Primary, Generations::fresh(new_id()));
    store(&img, &r).expect("store");
    assert_eq!(load(&img).expect("load"), Some(r.clone()));
    let mut bytes = encode(&r);
    let n = bytes.len();
    bytes[n - 3] ^= 1;
    std::fs::write(record_path(&img), &bytes).expect("write");
    let e = load(&img).expect_err("damaged");
    assert!(e.to_string().contains("damaged"), "{e}");
}
