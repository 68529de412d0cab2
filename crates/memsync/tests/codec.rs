//! Codec round trips, hostile input and lockstep of the mirrored stores.

use proptest::prelude::*;
use understudy_memsync::codec::{CodecConfig, CodecError, Compression, Decoder, Encoder};
use understudy_memsync::page::{PAGE_SIZE, Page};

fn cfg(pages: u64, slots: u32) -> CodecConfig {
    let mut c = CodecConfig::new(pages);
    c.store_slots = slots;
    c
}

/// Deterministic pseudo-random bytes.
fn fill(seed: u64, out: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for b in out {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

/// A memory image and its evolution.
struct Mem {
    img: Vec<u8>,
}

impl Mem {
    fn new(pages: usize) -> Self {
        Self {
            img: vec![0; pages * PAGE_SIZE],
        }
    }
    fn page_mut(&mut self, p: usize) -> &mut [u8] {
        &mut self.img[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
    }
    fn all(&self) -> Vec<(u64, &Page)> {
        self.list(
            &(0..self.img.len() / PAGE_SIZE)
                .map(|p| p as u64)
                .collect::<Vec<_>>(),
        )
    }
    fn list(&self, pfns: &[u64]) -> Vec<(u64, &Page)> {
        pfns.iter()
            .map(|&p| {
                let s = &self.img[p as usize * PAGE_SIZE..(p as usize + 1) * PAGE_SIZE];
                (p, <&Page>::try_from(s).expect("page"))
            })
            .collect()
    }
}

/// Apply decoded pages to a backup image.
fn apply(backup: &mut [u8], d: &understudy_memsync::Decoded) {
    for (pfn, p) in d.pages() {
        backup[pfn as usize * PAGE_SIZE..(pfn as usize + 1) * PAGE_SIZE].copy_from_slice(p);
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// Overwrite a few bytes of a page.
    Poke {
        page: usize,
        at: usize,
        len: usize,
        seed: u64,
    },
    /// Copy page `from` to `to` (duplicate / move).
    Copy { from: usize, to: usize },
    /// Copy and then modify a little (partly rewritten copy).
    CopyEdit { from: usize, to: usize, at: usize },
    /// Zero a page.
    Zero { page: usize },
    /// Fill a page with fresh random data.
    Fresh { page: usize, seed: u64 },
}

fn op(pages: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..pages, 0..PAGE_SIZE, 1usize..200, any::<u64>()).prop_map(|(page, at, len, seed)| Op::Poke { page, at, len, seed }),
        2 => (0..pages, 0..pages).prop_map(|(from, to)| Op::Copy { from, to }),
        2 => (0..pages, 0..pages, 0..PAGE_SIZE).prop_map(|(from, to, at)| Op::CopyEdit { from, to, at }),
        1 => (0..pages).prop_map(|page| Op::Zero { page }),
        1 => (0..pages, any::<u64>()).prop_map(|(page, seed)| Op::Fresh { page, seed }),
    ]
}

fn run_op(m: &mut Mem, o: &Op) -> Vec<u64> {
    match *o {
        Op::Poke {
            page,
            at,
            len,
            seed,
        } => {
            let end = (at + len).min(PAGE_SIZE);
            fill(seed, &mut m.page_mut(page)[at..end]);
            vec![page as u64]
        }
        Op::Copy { from, to } => {
            let src = m.page_mut(from).to_vec();
            m.page_mut(to).copy_from_slice(&src);
            vec![to as u64]
        }
        Op::CopyEdit { from, to, at } => {
            let src = m.page_mut(from).to_vec();
            let p = m.page_mut(to);
            p.copy_from_slice(&src);
            p[at] = p[at].wrapping_add(1);
            vec![to as u64]
        }
        Op::Zero { page } => {
            m.page_mut(page).fill(0);
            vec![page as u64]
        }
        Op::Fresh { page, seed } => {
            fill(seed, m.page_mut(page));
            vec![page as u64]
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    /// Random workloads over several checkpoints, small stores so eviction
    /// happens: every checkpoint rebuilds exactly and both stores stay in
    /// lockstep.
    #[test]
    fn round_trip_with_moves_duplicates_and_eviction(
        slots in 1u32..12,
        ckpts in proptest::collection::vec(proptest::collection::vec(op(24), 0..20), 1..6),
        ctrl in prop_oneof![Just(Compression::None), Just(Compression::Lz4), Just(Compression::Zstd(1))],
        lit in prop_oneof![Just(Compression::None), Just(Compression::Lz4), Just(Compression::Zstd(1)), Just(Compression::Zstd(3))],
    ) {
        let pages = 24;
        let mut c = cfg(pages as u64, slots);
        c.control = ctrl;
        c.literal = lit;
        let mut enc = Encoder::new(c);
        let mut dec = Decoder::new(c);
        // A second encoder writing into one reused, dirty buffer must
        // produce the same bytes as the allocating path.
        let mut enc2 = Encoder::new(c);
        let mut reused = vec![0x5au8; 3 * PAGE_SIZE];
        let mut m = Mem::new(pages);
        for p in 0..pages {
            fill(p as u64 + 1, &mut m.page_mut(p)[..(p * 97) % PAGE_SIZE]);
        }
        let mut backup = vec![0xa5u8; m.img.len()];
        let e = enc.encode(0, &m.all()).expect("encode");
        let st = enc2.encode_into(0, &m.all(), &mut reused).expect("encode_into");
        prop_assert_eq!(&reused, &e.bytes);
        prop_assert_eq!(st.kinds, e.kinds);
        apply(&mut backup, &dec.decode(&e.bytes).expect("decode"));
        prop_assert_eq!(&backup, &m.img);
        for (seq, ops) in ckpts.iter().enumerate() {
            let mut dirty: Vec<u64> = ops.iter().flat_map(|o| run_op(&mut m, o)).collect();
            dirty.sort_unstable();
            dirty.dedup();
            let e = enc.encode(seq as u64 + 1, &m.list(&dirty)).expect("encode");
            let st = enc2.encode_into(seq as u64 + 1, &m.list(&dirty), &mut reused).expect("encode_into");
            prop_assert_eq!(&reused, &e.bytes);
            prop_assert_eq!((st.control_raw, st.literal_raw), (e.control_raw, e.literal_raw));
            prop_assert_eq!(e.kinds.total(), dirty.len() as u64);
            let d = dec.decode(&e.bytes).expect("decode");
            prop_assert_eq!(d.kinds, e.kinds);
            apply(&mut backup, &d);
            prop_assert_eq!(&backup, &m.img);
            prop_assert_eq!(enc.store().digest(), dec.store().digest());
        }
    }

    /// Any mutation of a valid checkpoint is rejected or decodes to exactly
    /// the original pages (a mutation in an unused bit), and a rejected
    /// checkpoint leaves the decoder's store unchanged.
    #[test]
    fn mutations_are_rejected_without_side_effects(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let pages = 16;
        let c = cfg(pages as u64, 8);
        let mut enc = Encoder::new(c);
        let mut dec = Decoder::new(c);
        let mut m = Mem::new(pages);
        for p in 0..pages {
            fill(p as u64 * 7 + 3, &mut m.page_mut(p)[..1000]);
        }
        let e0 = enc.encode(0, &m.all()).expect("encode");
        dec.decode(&e0.bytes).expect("decode");
        for p in [1usize, 5, 9] {
            m.page_mut(p)[10] ^= 0x55;
        }
        let src = m.page_mut(2).to_vec();
        m.page_mut(12).copy_from_slice(&src);
        let e1 = enc.encode(1, &m.list(&[1, 5, 9, 12])).expect("encode");
        let before = dec.store().digest();

        let mut bad = e1.bytes.clone();
        for (i, x) in &flips {
            let at = i.index(bad.len());
            bad[at] ^= x;
        }
        match dec.decode(&bad) {
            Ok(d) => {
                // Only possible when the flip hit the reserved header byte.
                prop_assert_eq!(d.pfns, vec![1, 5, 9, 12]);
                prop_assert_eq!(dec.store().digest(), enc.store().digest());
                return Ok(());
            }
            Err(_) => prop_assert_eq!(dec.store().digest(), before),
        }
        let truncated = &e1.bytes[..cut.index(e1.bytes.len())];
        prop_assert!(dec.decode(truncated).is_err());
        prop_assert_eq!(dec.store().digest(), before);
        // The untouched checkpoint still applies afterwards.
        let d = dec.decode(&e1.bytes).expect("decode");
        prop_assert_eq!(d.pfns, vec![1, 5, 9, 12]);
    }

    #[test]
    fn decoder_never_panics_on_garbage(data in proptest::collection::vec(any::<u8>(), 0..400), hdr in any::<bool>()) {
        let c = cfg(64, 4);
        let mut dec = Decoder::new(c);
        let mut d = data;
        if hdr && d.len() >= 56 {
            d[..4].copy_from_slice(b"UMSC");
            d[4] = 1;
            d[20..24].copy_from_slice(&4u32.to_le_bytes());
        }
        let _ = dec.decode(&d);
    }
}

#[test]
fn content_match_beats_same_address() {
    // Page 7 becomes a near copy of page 3: the codec must find page 3.
    let c = cfg(16, 64);
    let mut enc = Encoder::new(c);
    let mut dec = Decoder::new(c);
    let mut m = Mem::new(16);
    for p in 0..16 {
        fill(p as u64 + 100, m.page_mut(p));
    }
    let e = enc.encode(0, &m.all()).expect("encode");
    dec.decode(&e.bytes).expect("decode");
    let src = m.page_mut(3).to_vec();
    m.page_mut(7).copy_from_slice(&src);
    m.page_mut(7)[2000] ^= 1;
    m.page_mut(9).copy_from_slice(&src);
    let e = enc.encode(1, &m.list(&[7, 9])).expect("encode");
    assert_eq!(e.kinds.delta_content_match, 1);
    assert_eq!(e.kinds.duplicate, 1);
    assert!(
        e.bytes.len() < 120,
        "near copy + exact copy cost {} bytes",
        e.bytes.len()
    );
    let d = dec.decode(&e.bytes).expect("decode");
    assert_eq!(d.data[..PAGE_SIZE], m.img[7 * PAGE_SIZE..8 * PAGE_SIZE]);
    assert_eq!(d.data[PAGE_SIZE..], m.img[9 * PAGE_SIZE..10 * PAGE_SIZE]);
}

#[test]
fn encoder_rejects_bad_input_and_decoder_checks_config() {
    let c = cfg(4, 4);
    let mut enc = Encoder::new(c);
    let p = [1u8; PAGE_SIZE];
    assert!(matches!(
        enc.encode(0, &[(2, &p), (1, &p)]),
        Err(CodecError::UnsortedPages { pfn: 1 })
    ));
    assert!(matches!(
        enc.encode(0, &[(4, &p)]),
        Err(CodecError::PageOutOfRange { .. })
    ));
    let e = enc.encode(0, &[(1, &p)]).expect("encode");
    let mut other = Decoder::new(cfg(4, 8));
    assert!(matches!(
        other.decode(&e.bytes),
        Err(CodecError::StoreMismatch { .. })
    ));
    let mut small = Decoder::new(cfg(1, 4));
    assert!(small.decode(&e.bytes).is_err());
}

#[test]
fn checksum_catches_diverged_stores() {
    // If the stores diverge (a bug or a missed reset), the rebuilt page is
    // wrong and verification must refuse it.
    let c = cfg(4, 4);
    let mut enc = Encoder::new(c);
    let mut dec = Decoder::new(c);
    let mut a = [3u8; PAGE_SIZE];
    let e = enc.encode(0, &[(0, &a)]).expect("encode");
    dec.decode(&e.bytes).expect("decode");
    // Diverge: the decoder sees a different version of page 0.
    let mut b = [3u8; PAGE_SIZE];
    b[5] = 9;
    let mut dec2 = Decoder::new(c);
    let e_b = Encoder::new(c).encode(0, &[(0, &b)]).expect("encode");
    dec2.decode(&e_b.bytes).expect("decode");
    a[100] = 1;
    let e = enc.encode(1, &[(0, &a)]).expect("encode");
    assert!(matches!(
        dec2.decode(&e.bytes),
        Err(CodecError::ChecksumMismatch { seq: 1 })
    ));
    assert!(dec.decode(&e.bytes).is_ok());
}

/// The default literal method is zstd; a literal section zstd cannot shrink
/// (fresh random pages) is stored instead, and both decode.
#[test]
fn literal_section_is_zstd_by_default_and_stored_when_incompressible() {
    let c = cfg(8, 16);
    assert_eq!(c.literal, Compression::Zstd(1));
    let mut enc = Encoder::new(c);
    let mut dec = Decoder::new(c);
    let mut m = Mem::new(8);
    // Text-like pages: compressible, no base anywhere.
    for p in 0..4 {
        for (i, b) in m.page_mut(p).iter_mut().enumerate() {
            *b = b"the quick brown fox jumps over the lazy dog "[(i * (p + 1)) % 44];
        }
    }
    let e = enc.encode(0, &m.list(&[0, 1, 2, 3])).expect("encode");
    assert_eq!(e.kinds.literal, 4);
    assert_eq!(e.bytes[6], 2, "literal section compressed with zstd");
    assert!(e.bytes.len() < PAGE_SIZE, "4 text pages shrink well");
    assert_eq!(
        dec.decode(&e.bytes).expect("decode").data,
        m.img[..4 * PAGE_SIZE]
    );
    // Fresh random pages: zstd does not help, the section is stored.
    for p in 4..8 {
        fill(p as u64 * 31 + 7, m.page_mut(p));
    }
    let e = enc.encode(1, &m.list(&[4, 5, 6, 7])).expect("encode");
    assert_eq!(e.kinds.literal, 4);
    assert_eq!(e.bytes[6], 0, "incompressible literal section is stored");
    assert_eq!(e.literal_raw, 4 * PAGE_SIZE);
    assert_eq!(
        dec.decode(&e.bytes).expect("decode").data,
        m.img[4 * PAGE_SIZE..]
    );
    assert_eq!(enc.store().digest(), dec.store().digest());
}

/// A same-address delta whose slot an earlier record of the same checkpoint
/// evicted: the in-place commit must fall back to a full copy on both sides.
#[test]
fn same_address_delta_after_its_slot_was_evicted() {
    let c = cfg(4, 2);
    let mut enc = Encoder::new(c);
    let mut dec = Decoder::new(c);
    let mut m = Mem::new(4);
    fill(1, m.page_mut(1));
    fill(2, m.page_mut(2));
    let e = enc.encode(0, &m.list(&[1, 2])).expect("encode");
    dec.decode(&e.bytes).expect("decode");
    let slot1 = enc.store().slot_of(1).expect("stored");
    // Page 0 is new and comes first: CLOCK evicts page 1's slot (slot 0)
    // before page 1's own record, a small delta, is committed.
    fill(3, m.page_mut(0));
    m.page_mut(1)[100] ^= 1;
    let e = enc.encode(1, &m.list(&[0, 1])).expect("encode");
    assert_eq!(e.kinds.delta_same_address, 1);
    assert_eq!(
        enc.store().slot_of(0),
        Some(slot1),
        "page 0 took page 1's slot"
    );
    let d = dec.decode(&e.bytes).expect("decode");
    assert_eq!(enc.store().digest(), dec.store().digest());
    let s1 = enc.store().slot_of(1).expect("page 1 stored again");
    assert_ne!(s1, slot1);
    assert_eq!(
        enc.store().get(s1).expect("slot")[..],
        m.img[PAGE_SIZE..2 * PAGE_SIZE]
    );
    assert_eq!(d.data, m.img[..2 * PAGE_SIZE]);
    // The next checkpoint uses both stores and still verifies.
    m.page_mut(1)[200] ^= 1;
    let e = enc.encode(2, &m.list(&[1])).expect("encode");
    assert_eq!(e.kinds.delta_same_address, 1);
    let d = dec.decode(&e.bytes).expect("decode");
    assert_eq!(d.data, m.img[PAGE_SIZE..2 * PAGE_SIZE]);
}
