use proptest::prelude::*;

use super::*;

fn roundtrip(m: &Msg<'_>) {
    let (t, bytes) = m.to_vec().expect("encodable");
    let back = Msg::decode(t, &bytes).expect("decodable");
    assert_eq!(&back, m);
}

#[test]
fn hello_layout_is_fixed() {
    let h = Hello {
        min_version: 1,
        max_version: 1,
        migration_id: [7; 16],
        disk_id: [9; 16],
        generation: 3,
        base_generation: 2,
        size: 1 << 20,
        format: 1,
        granularity: 65536,
        name: "vm0".into(),
    };
    let (t, b) = Msg::Hello(h.clone()).to_vec().expect("encode");
    assert_eq!(t, 0x0101);
    assert_eq!(&b[0..4], &[0, 1, 0, 1]);
    assert_eq!(&b[4..20], &[7; 16]);
    assert_eq!(&b[20..36], &[9; 16]);
    assert_eq!(b[60], 1, "format byte");
    assert_eq!(b[65], 3, "name length");
    assert_eq!(&b[66..], b"vm0");
    roundtrip(&Msg::Hello(h));
}

#[test]
fn hello_ignores_appended_fields_but_rejects_bad_ones() {
    let h = Hello {
        min_version: 1,
        max_version: 2,
        migration_id: [1; 16],
        disk_id: [2; 16],
        generation: 1,
        base_generation: 0,
        size: 4096,
        format: 0,
        granularity: 4096,
        name: "d".into(),
    };
    let (t, mut b) = Msg::Hello(h).to_vec().expect("encode");
    b.extend_from_slice(b"future");
    assert!(Msg::decode(t, &b).is_ok());
    let mut bad = b.clone();
    bad[60] = 7; // format
    assert!(matches!(
        Msg::decode(t, &bad),
        Err(WireError::Invalid {
            field: "format",
            ..
        })
    ));
    let mut bad = b.clone();
    bad[61..65].copy_from_slice(&3000u32.to_be_bytes());
    assert!(
        Msg::decode(t, &bad).is_err(),
        "granularity not a power of two"
    );
    let mut bad = b;
    bad[0..4].copy_from_slice(&[0, 3, 0, 2]);
    assert!(Msg::decode(t, &bad).is_err(), "min > max");
}

#[test]
fn oversize_fields_are_refused_both_ways() {
    let big = vec![0u8; MAX_DATA + 1];
    assert!(
        Msg::Data {
            offset: 0,
            hash: 0,
            data: &big
        }
        .encode()
        .is_err()
    );
    let mut p = vec![0u8; 16];
    p.extend_from_slice(&big);
    assert!(matches!(
        Msg::decode(MsgType::Data as u16, &p),
        Err(WireError::Bounds { .. })
    ));
    // A Have claiming more ranges than the payload holds is refused before
    // allocating.
    let mut have = vec![1u8];
    have.extend_from_slice(&(MAX_RANGES as u32).to_be_bytes());
    assert!(matches!(
        Msg::decode(MsgType::Have as u16, &have),
        Err(WireError::Truncated { .. })
    ));
    have[1..5].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        Msg::decode(MsgType::Have as u16, &have),
        Err(WireError::Bounds { .. })
    ));
    // Hash requests are bounded by the number of blocks.
    let m = Msg::HashReq {
        id: 1,
        offset: 0,
        len: (MAX_HASHES as u64 + 1) * 4096,
        block: 4096,
    };
    let (t, b) = m.to_vec().expect("encode");
    assert!(Msg::decode(t, &b).is_err());
    assert!(decode_hashes(&u32::MAX.to_be_bytes()).is_err());
}

#[test]
fn ranges_that_overflow_are_refused() {
    let m = Msg::Zero {
        offset: u64::MAX - 1,
        len: 5,
    };
    let (t, b) = m.to_vec().expect("encode");
    assert!(Msg::decode(t, &b).is_err());
}

#[test]
fn negotiation_names_both_ranges() {
    assert_eq!(negotiate(1, 5), Ok(MAX_VERSION));
    assert_eq!(negotiate(1, 1), Ok(1), "a version-1 source still works");
    let e = negotiate(MAX_VERSION + 1, MAX_VERSION + 3)
        .expect_err("no overlap")
        .to_string();
    assert!(
        e.contains(&format!("{}..{}", MAX_VERSION + 1, MAX_VERSION + 3))
            && e.contains(&format!("{MIN_VERSION}..{MAX_VERSION}")),
        "{e}"
    );
}

#[test]
fn unknown_and_invalid_types_are_refused() {
    assert!(Msg::decode(0x0100, &[]).is_err());
    assert!(Msg::decode(0x01ee, &[]).is_err());
    assert!(Msg::decode(0x0200, &[]).is_err());
}

fn any_msg() -> impl Strategy<Value = (u16, Vec<u8>)> {
    let data = proptest::collection::vec(any::<u8>(), 1..300);
    prop_oneof![
        (
            any::<[u8; 16]>(),
            any::<[u8; 16]>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            0u8..2,
            9u32..27,
            "[a-z0-9_-]{1,40}"
        )
            .prop_map(|(m, d, g, b, s, f, gr, n)| Msg::Hello(Hello {
                min_version: 1,
                max_version: 3,
                migration_id: m,
                disk_id: d,
                generation: g,
                base_generation: b,
                size: s,
                format: f,
                granularity: 1 << gr,
                name: n,
            })
            .to_vec()
            .expect("encode")),
        (any::<u16>(), 0u8..4).prop_map(|(v, s)| Msg::Welcome(Welcome {
            version: v,
            start: Start::from_u8(s).expect("valid")
        })
        .to_vec()
        .expect("encode")),
        (
            proptest::collection::vec((0u64..1 << 40, 0u64..1 << 30), 0..50),
            any::<bool>()
        )
            .prop_map(|(ranges, last)| Msg::Have { ranges, last }.to_vec().expect("encode")),
        (0u64..1 << 50, data.clone()).prop_map(|(o, d)| Msg::Data {
            offset: o,
            hash: extent_hash(&d),
            data: &d
        }
        .to_vec()
        .expect("encode")),
        (any::<u64>(), 0u64..1 << 50, data.clone()).prop_map(|(id, o, d)| Msg::Mirror {
            id,
            offset: o,
            hash: extent_hash(&d),
            data: &d
        }
        .to_vec()
        .expect("encode")),
        (0u64..1 << 50, 0u64..1 << 40)
            .prop_map(|(offset, len)| Msg::Zero { offset, len }.to_vec().expect("encode")),
        (any::<u64>(), 0u64..1 << 50, 0u64..1 << 40).prop_map(|(id, offset, len)| {
            Msg::MirrorZero { id, offset, len }
                .to_vec()
                .expect("encode")
        }),
        any::<u64>().prop_map(|id| Msg::Flush { id }.to_vec().expect("encode")),
        (any::<u64>(), any::<u64>())
            .prop_map(|(id, generation)| Msg::Commit { id, generation }.to_vec().expect("encode")),
        "[ -~]{0,80}".prop_map(|reason| Msg::Abort { reason }.to_vec().expect("encode")),
        (any::<u64>(), 0u64..1 << 40, 0u64..1 << 24, 12u32..20).prop_map(|(id, o, l, b)| {
            Msg::HashReq {
                id,
                offset: o,
                len: l,
                block: 1 << b,
            }
            .to_vec()
            .expect("encode")
        }),
        (any::<u64>(), 0u64..1 << 40, 0u32..1 << 20).prop_map(|(id, offset, len)| Msg::FwdRead {
            id,
            offset,
            len
        }
        .to_vec()
        .expect("encode")),
        (any::<u64>(), 0u64..1 << 40, any::<u8>(), data.clone()).prop_map(|(id, o, f, d)| {
            Msg::FwdWrite {
                id,
                offset: o,
                flags: f,
                data: &d,
            }
            .to_vec()
            .expect("encode")
        }),
        (
            any::<u64>(),
            0u64..1 << 40,
            0u64..1 << 30,
            any::<u8>(),
            any::<bool>()
        )
            .prop_map(|(id, offset, len, flags, z)| if z {
                Msg::FwdZero {
                    id,
                    offset,
                    len,
                    flags,
                }
            } else {
                Msg::FwdDiscard {
                    id,
                    offset,
                    len,
                    flags,
                }
            }
            .to_vec()
            .expect("encode")),
        any::<u64>().prop_map(|id| Msg::FwdFlush { id }.to_vec().expect("encode")),
        (any::<u64>(), any::<u32>(), data).prop_map(|(id, code, d)| Msg::Reply {
            id,
            code,
            body: &d
        }
        .to_vec()
        .expect("encode")),
    ]
}

proptest! {
    #[test]
    fn every_message_roundtrips((t, bytes) in any_msg()) {
        let m = Msg::decode(t, &bytes).expect("decode what we encoded");
        let (t2, again) = m.to_vec().expect("re-encode");
        prop_assert_eq!(t, t2);
        prop_assert_eq!(bytes, again);
    }

    #[test]
    fn whatever_decodes_reencodes_to_the_same(t in 0x0100u16..0x0200, bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(m) = Msg::decode(t, &bytes) {
            let (t2, again) = m.to_vec().expect("re-encode");
            prop_assert_eq!(t, t2);
            prop_assert_eq!(Msg::decode(t2, &again).expect("decode again"), m);
        }
    }

    #[test]
    fn decode_never_panics(t in 0x0100u16..0x0200, bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = Msg::decode(t, &bytes);
        let _ = decode_hashes(&bytes);
    }

    #[test]
    fn truncation_is_detected((t, bytes) in any_msg(), cut in 1usize..40) {
        // Messages with a trailing variable part (data, text, reply body)
        // may legitimately decode shorter; everything else must refuse.
        let fixed = !matches!(
            MsgType::from_u16(t),
            Some(MsgType::Data | MsgType::Mirror | MsgType::Abort | MsgType::Reply
                | MsgType::FwdWrite | MsgType::Hello)
        );
        if fixed && cut <= bytes.len() {
            prop_assert!(Msg::decode(t, &bytes[..bytes.len() - cut]).is_err());
        }
    }

    #[test]
    fn hashes_roundtrip(entries in proptest::collection::vec((any::<u64>(), any::<u8>()), 0..100)) {
        let b = encode_hashes(&entries);
        prop_assert_eq!(decode_hashes(&b).expect("decode"), entries);
    }
}
