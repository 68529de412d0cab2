use proptest::prelude::*;

use super::*;

fn entry(name: &str, shift: u32, enabled: bool, recovered: bool) -> DirEntry {
    DirEntry {
        name: name.to_owned(),
        granularity: 1 << shift,
        enabled,
        recovered,
    }
}

fn arb_snapshot() -> impl Strategy<Value = (u64, u64, bool, Vec<(DirEntry, Vec<u64>)>)> {
    (0u64..(1 << 24), any::<u64>(), any::<bool>()).prop_flat_map(|(size, seq, clean)| {
        let one = (
            "[a-zA-Z0-9ä_.-]{1,20}",
            12u32..=26,
            any::<bool>(),
            any::<bool>(),
        )
            .prop_flat_map(move |(name, shift, en, rec)| {
                let gran = 1u64 << shift;
                let granules = size.div_ceil(gran);
                let nwords = granules.div_ceil(64) as usize;
                prop::collection::vec(any::<u64>(), nwords).prop_map(move |mut w| {
                    // Clear bits past the last granule, as a live bitmap has.
                    if granules % 64 != 0
                        && let Some(last) = w.last_mut()
                    {
                        *last &= (1u64 << (granules % 64)) - 1;
                    }
                    (entry(&name, shift, en, rec), w)
                })
            });
        (
            Just(size),
            Just(seq),
            Just(clean),
            prop::collection::vec(one, 0..5).prop_map(|mut v| {
                let mut seen = std::collections::HashSet::new();
                v.retain(|(e, _)| seen.insert(e.name.clone()));
                v
            }),
        )
    })
}

proptest! {
    #[test]
    fn snapshot_round_trips((size, seq, clean, bitmaps) in arb_snapshot()) {
        let bytes = encode_snapshot(size, seq, clean, &bitmaps);
        let h = decode_snapshot_header(&bytes).unwrap();
        prop_assert_eq!(h.total_len(), bytes.len() as u64);
        let s = decode_snapshot(&bytes, Some(size)).unwrap();
        prop_assert_eq!(s.image_size, size);
        prop_assert_eq!(s.seq, seq);
        prop_assert_eq!(s.clean, clean);
        prop_assert_eq!(s.bitmaps.len(), bitmaps.len());
        for (got, (e, w)) in s.bitmaps.iter().zip(&bitmaps) {
            prop_assert_eq!(&got.entry, e);
            prop_assert_eq!(got.words.as_ref().unwrap(), w);
        }
        // Another image size is refused.
        let other = decode_snapshot(&bytes, Some(size + 1));
        prop_assert!(
            matches!(other, Err(FormatError::Mismatch { what: "image size", .. })),
            "other size accepted: {:?}",
            other
        );
    }

    #[test]
    fn snapshot_detects_any_single_byte_change(
        (size, seq, clean, bitmaps) in arb_snapshot(),
        pos in any::<prop::sample::Index>(),
        xor in 1u8..=255,
    ) {
        let mut bytes = encode_snapshot(size, seq, clean, &bitmaps);
        let i = pos.index(bytes.len());
        bytes[i] ^= xor;
        match decode_snapshot(&bytes, None) {
            Err(_) => {}
            Ok(s) => {
                // Only a data byte can leave the header and directory valid;
                // then exactly one bitmap must be flagged.
                let bad = s.bitmaps.iter().filter(|b| b.words.is_err()).count();
                prop_assert_eq!(bad, 1, "byte {} changed undetected", i);
            }
        }
    }

    #[test]
    fn snapshot_truncation_is_detected((size, seq, clean, bitmaps) in arb_snapshot(), cut in any::<prop::sample::Index>()) {
        let bytes = encode_snapshot(size, seq, clean, &bitmaps);
        let n = cut.index(bytes.len());
        prop_assert!(decode_snapshot(&bytes[..n], None).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        prop_assert!(decode_snapshot(&longer, None).is_err());
    }

    #[test]
    fn decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = decode_snapshot(&bytes, None);
        let _ = decode_intent(&bytes);
        let _ = decode_intent_file(&bytes);
        // Also with a valid magic so the deeper checks run.
        let mut b = SNAPSHOT_MAGIC.to_vec();
        b.extend_from_slice(&bytes);
        let _ = decode_snapshot(&b, None);
        let mut b = INTENT_MAGIC.to_vec();
        b.extend_from_slice(&bytes);
        let _ = decode_intent(&b);
    }

    #[test]
    fn intent_round_trips_and_detects_changes(
        size in 0u64..(1 << 40),
        shift in 20u32..=30,
        seq in any::<u64>(),
        clean in any::<bool>(),
        armed_seed in any::<u64>(),
        names in prop::collection::vec("[a-z]{1,8}", 0..4),
        pos in any::<prop::sample::Index>(),
        xor in 1u8..=255,
    ) {
        let extent_size = 1u64 << shift;
        let n = IntentRecord::extents_for(size, extent_size);
        prop_assume!(n <= MAX_INTENT_EXTENTS);
        let mut armed = vec![0u64; n.div_ceil(64) as usize];
        let mut x = armed_seed | 1;
        for _ in 0..(n.min(50)) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let e = x % n.max(1);
            armed[(e / 64) as usize] |= 1 << (e % 64);
        }
        let mut dir: Vec<DirEntry> = Vec::new();
        for (i, name) in names.iter().enumerate() {
            if !dir.iter().any(|e| &e.name == name) {
                dir.push(entry(name, 12 + i as u32, i % 2 == 0, false));
            }
        }
        let rec = IntentRecord { seq, clean, image_size: size, extent_size, armed, dir };
        let bytes = encode_intent(&rec);
        prop_assert!(bytes.len() <= SLOT_SIZE);
        prop_assert_eq!(&decode_intent(&bytes).unwrap(), &rec);
        // Leftover bytes of an older, longer record after it are ignored.
        let mut padded = bytes.clone();
        padded.extend_from_slice(&[0xAA; 100]);
        prop_assert_eq!(&decode_intent(&padded).unwrap(), &rec);
        let mut bad = bytes.clone();
        let i = pos.index(bad.len());
        bad[i] ^= xor;
        prop_assert!(decode_intent(&bad).is_err(), "byte {} changed undetected", i);
    }
}

fn record(seq: u64, armed_bit: u64) -> IntentRecord {
    let mut armed = vec![0u64; 1];
    armed[0] |= 1 << armed_bit;
    IntentRecord {
        seq,
        clean: false,
        image_size: 10 << 20,
        extent_size: 1 << 20,
        armed,
        dir: vec![entry("a", 16, true, false)],
    }
}

#[test]
fn intent_file_prefers_newest_valid_slot() {
    let mut file = vec![0u8; 2 * SLOT_SIZE];
    assert!(matches!(decode_intent_file(&file), IntentFile::Empty));
    assert!(matches!(decode_intent_file(&[]), IntentFile::Empty));
    let a = encode_intent(&record(7, 1));
    let b = encode_intent(&record(8, 2));
    file[..a.len()].copy_from_slice(&a);
    match decode_intent_file(&file[..SLOT_SIZE]) {
        IntentFile::Valid(r) => assert_eq!(r.seq, 7),
        other => panic!("{other:?}"),
    }
    file[SLOT_SIZE..SLOT_SIZE + b.len()].copy_from_slice(&b);
    match decode_intent_file(&file) {
        IntentFile::Valid(r) => {
            assert_eq!(r.seq, 8);
            assert_eq!(r.armed_extents().collect::<Vec<_>>(), vec![2]);
        }
        other => panic!("{other:?}"),
    }
    // Tear slot B (the newer): slot A wins.
    file[SLOT_SIZE + b.len() - 3] ^= 1;
    match decode_intent_file(&file) {
        IntentFile::Valid(r) => assert_eq!(r.seq, 7),
        other => panic!("{other:?}"),
    }
    // Tear A too: corrupt, not empty.
    file[5] ^= 1;
    assert!(matches!(
        decode_intent_file(&file),
        IntentFile::Corrupt { .. }
    ));
}

#[test]
fn header_limits_refuse_absurd_sizes_without_allocating() {
    let bytes = encode_snapshot(
        1 << 30,
        1,
        false,
        &[(entry("x", 16, true, false), vec![0; 256])],
    );
    // Claim 2^60 bytes of data: refused by the header check.
    let mut h = bytes[..HEADER_LEN].to_vec();
    h[40..48].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let crc = crc32c::crc32c(&h[..60]);
    h[60..64].copy_from_slice(&crc.to_le_bytes());
    assert!(matches!(
        decode_snapshot_header(&h),
        Err(FormatError::Limit {
            what: "data length",
            ..
        })
    ));
    // Claim 1000 bitmaps.
    let mut h = bytes[..HEADER_LEN].to_vec();
    h[32..36].copy_from_slice(&1000u32.to_le_bytes());
    let crc = crc32c::crc32c(&h[..60]);
    h[60..64].copy_from_slice(&crc.to_le_bytes());
    assert!(matches!(
        decode_snapshot_header(&h),
        Err(FormatError::Limit {
            what: "bitmap count",
            ..
        })
    ));
    // A huge image at a fine granularity: the entry is refused as too large
    // before any data is read.
    let huge = encode_snapshot(u64::MAX, 1, false, &[]);
    assert!(decode_snapshot(&huge, None).is_ok());
}

#[test]
fn names_are_validated() {
    assert!(validate_name("").is_err());
    assert!(validate_name(&"x".repeat(256)).is_err());
    assert!(validate_name("a\nb").is_err());
    assert!(validate_name(&"é".repeat(127)).is_ok());
    assert!(validate_name("backup-2026.11/disk0").is_ok());
}

#[test]
fn duplicate_names_are_rejected() {
    let bytes = encode_snapshot(
        1 << 20,
        1,
        false,
        &[
            (entry("a", 16, true, false), vec![0]),
            (entry("a", 16, true, false), vec![0]),
        ],
    );
    assert!(matches!(
        decode_snapshot(&bytes, None),
        Err(FormatError::DuplicateName { .. })
    ));
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Files built by hand (a Python script following docs/bitmaps.md), so the
/// documented layout and the code cannot drift apart silently.
#[test]
fn golden_files_from_the_documented_layout() {
    let snap = unhex(concat!(
        "55534249544d4150010000000000000005001000000000002a00000000000000",
        "0200000018000000300000000000000030e241610000000000000000624e62e9",
        "01006110000100c04d09e4030062c3a90c000300ddb75f590500000000000000",
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000",
    ));
    let s = decode_snapshot(&snap, Some((1 << 20) + 5)).unwrap();
    assert_eq!((s.seq, s.clean, s.bitmaps.len()), (42, false, 2));
    assert_eq!(s.bitmaps[0].entry, entry("a", 16, true, false));
    assert_eq!(s.bitmaps[0].words.as_ref().unwrap(), &vec![0b101]);
    assert_eq!(s.bitmaps[1].entry, entry("bé", 12, true, true));
    assert_eq!(s.bitmaps[1].words.as_ref().unwrap().len(), 5);
    let words: Vec<(DirEntry, Vec<u64>)> = s
        .bitmaps
        .into_iter()
        .map(|b| (b.entry, b.words.unwrap()))
        .collect();
    assert_eq!(encode_snapshot((1 << 20) + 5, 42, false, &words), snap);

    let rec = unhex(concat!(
        "5553494e54454e54010000000000000007000000000000000500100000000000",
        "12000000050000000200000010000000580000000000000000000000f932a21c",
        "090000000000000001006110000100030062c3a90c000300",
    ));
    let r = decode_intent(&rec).unwrap();
    assert_eq!((r.seq, r.clean, r.extent_size), (7, false, 1 << 18));
    assert_eq!(r.armed_extents().collect::<Vec<_>>(), vec![0, 3]);
    assert_eq!(r.dir.len(), 2);
    assert_eq!(encode_intent(&r), rec);
}
