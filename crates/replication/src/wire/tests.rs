use proptest::prelude::*;

use super::*;

fn arb_gens() -> impl Strategy<Value = Generations> {
    (
        any::<u64>(),
        any::<u64>(),
        proptest::collection::vec(any::<u64>(), 0..=MAX_HISTORY),
    )
        .prop_map(|(current, bitmap, history)| Generations {
            current,
            bitmap,
            history,
        })
}

fn arb_copy() -> impl Strategy<Value = CopyInfo> {
    (arb_gens(), any::<bool>(), any::<u64>(), any::<u64>()).prop_map(|(gens, c, b, p)| CopyInfo {
        gens,
        crashed_primary: c,
        changed_bytes: b,
        promoted_at_ms: p,
    })
}

/// Messages without borrowed data, plus a data buffer for `Write`.
fn arb_msg() -> impl Strategy<Value = (u8, Msg<'static>, Vec<u8>)> {
    let mode = prop_oneof![Just(Mode::Sync), Just(Mode::Async), Just(Mode::Epoch)];
    prop_oneof![
        (
            any::<u16>(),
            any::<u16>(),
            mode,
            any::<u64>(),
            "[a-z]{1,40}",
            arb_copy()
        )
            .prop_map(|(min_version, max_version, mode, size, name, copy)| (
                0,
                Msg::Hello(Hello {
                    min_version,
                    max_version,
                    mode,
                    size,
                    name,
                    copy
                }),
                vec![]
            )),
        (any::<u16>(), any::<u64>(), arb_copy()).prop_map(|(version, instance, copy)| (
            0,
            Msg::Welcome(Welcome {
                version,
                instance,
                copy
            }),
            vec![]
        )),
        (
            any::<u64>(),
            0u64..1 << 40,
            0u8..=flags::ALL,
            proptest::collection::vec(any::<u8>(), 0..2048)
        )
            .prop_map(|(seq, offset, f, data)| (
                f,
                Msg::Flush {
                    seq: offset.wrapping_add(seq)
                },
                data
            )),
        (any::<u64>(), 0u64..1 << 40, 0u64..1 << 40, 0u8..=flags::ALL).prop_map(
            |(seq, offset, len, flags)| (
                0,
                Msg::Zero {
                    seq,
                    offset,
                    len,
                    flags
                },
                vec![]
            )
        ),
        (any::<u64>(), any::<u64>()).prop_map(|(seq, epoch)| (
            0,
            Msg::EpochClose { seq, epoch },
            vec![]
        )),
        (any::<u64>(), arb_gens()).prop_map(|(seq, gens)| (
            0,
            Msg::ResyncDone { seq, gens },
            vec![]
        )),
        (any::<u64>(), 0u64..1 << 40, 0u64..1 << 24, 9u32..16).prop_map(|(seq, offset, len, b)| (
            0,
            Msg::HashReq {
                seq,
                offset,
                len,
                block: 1 << b
            },
            vec![]
        )),
        (
            any::<u64>(),
            proptest::collection::vec(any::<u64>(), 0..300)
        )
            .prop_map(|(seq, hashes)| (0, Msg::Hashes { seq, hashes }, vec![])),
        (any::<u64>(), any::<u32>(), "[ -~]{0,100}").prop_map(|(seq, code, text)| (
            0,
            Msg::Ack { seq, code, text },
            vec![]
        )),
    ]
}

proptest! {
    #[test]
    fn messages_round_trip((f, m, data) in arb_msg()) {
        // The Flush arm also carries a Write with real data.
        if let Msg::Flush { seq } = m {
            let w = Msg::Write { seq, offset: seq >> 1, flags: f, hash: extent_hash(&data), data: &data };
            let (t, bytes) = w.to_vec().expect("encodes");
            prop_assert_eq!(Msg::decode(t, &bytes).expect("decodes"), w);
        }
        let (t, bytes) = m.to_vec().expect("encodes");
        prop_assert_eq!(Msg::decode(t, &bytes).expect("decodes"), m.clone());
        // Every strict prefix is refused (never a panic, never a message).
        for cut in 0..bytes.len() {
            if let Ok(d) = Msg::decode(t, &bytes[..cut]) {
                // Only a Write can end anywhere (its data is the tail), and
                // then the hash catches the cut.
                prop_assert!(false, "prefix {} decoded as {:?}", cut, d);
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(t in 0x0300u16..0x0400, bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(m) = Msg::decode(t, &bytes) {
            let (t2, again) = m.to_vec().expect("a decoded message re-encodes");
            prop_assert_eq!(t, t2);
            prop_assert_eq!(Msg::decode(t2, &again).expect("re-decodes"), m);
        }
    }
}

#[test]
fn a_corrupted_write_is_refused() {
    let data = vec![7u8; 4096];
    let w = Msg::Write {
        seq: 1,
        offset: 0,
        flags: 0,
        hash: extent_hash(&data),
        data: &data,
    };
    let (t, mut bytes) = w.to_vec().expect("encodes");
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    assert_eq!(
        Msg::decode(t, &bytes),
        Err(WireError::Hash { what: "Write" })
    );
}

#[test]
fn bounds_are_checked_before_allocation() {
    // A Hashes frame that claims 65 536 hashes but carries none.
    let mut b = 1u64.to_be_bytes().to_vec();
    b.extend_from_slice(&65_536u32.to_be_bytes());
    assert_eq!(
        Msg::decode(MsgType::Hashes as u16, &b),
        Err(WireError::Truncated { what: "Hashes" })
    );
    let mut b = 1u64.to_be_bytes().to_vec();
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        Msg::decode(MsgType::Hashes as u16, &b),
        Err(WireError::Bounds { .. })
    ));
    // A hash request for more blocks than one answer may carry.
    let req = Msg::HashReq {
        seq: 1,
        offset: 0,
        len: (MAX_HASHES as u64 + 1) * 512,
        block: 512,
    };
    let (t, bytes) = req.to_vec().expect("encodes");
    assert!(matches!(
        Msg::decode(t, &bytes),
        Err(WireError::Bounds { .. })
    ));
    // Unknown flags, zero block, overflowing range, unknown type.
    let z = Msg::Zero {
        seq: 1,
        offset: u64::MAX,
        len: 2,
        flags: 0,
    };
    let (t, bytes) = z.to_vec().expect("encodes");
    assert!(matches!(
        Msg::decode(t, &bytes),
        Err(WireError::Invalid { .. })
    ));
    let z = Msg::Zero {
        seq: 1,
        offset: 0,
        len: 2,
        flags: 0x80,
    };
    let (t, bytes) = z.to_vec().expect("encodes");
    assert!(matches!(
        Msg::decode(t, &bytes),
        Err(WireError::Invalid { .. })
    ));
    assert_eq!(
        Msg::decode(0x0300, &[]),
        Err(WireError::UnknownType(0x0300))
    );
    assert_eq!(
        Msg::decode(0x03aa, &[]),
        Err(WireError::UnknownType(0x03aa))
    );
    let big = vec![0u8; MAX_DATA + 1];
    let w = Msg::Write {
        seq: 1,
        offset: 0,
        flags: 0,
        hash: 0,
        data: &big,
    };
    assert!(w.encode().is_err());
}

#[test]
fn versions_and_modes() {
    assert_eq!(negotiate(1, 1), Ok(1));
    assert_eq!(negotiate(1, 9), Ok(MAX_VERSION));
    assert!(negotiate(2, 3).is_err());
    assert!(negotiate(1, 0).is_err());
    for m in [Mode::Sync, Mode::Async, Mode::Epoch] {
        assert_eq!(m.to_string().parse::<Mode>(), Ok(m));
    }
    assert!("fast".parse::<Mode>().is_err());
}
