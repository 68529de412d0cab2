//! Zero-run-length encoding of the XOR of two pages (understudy's delta).
//!
//! Format: a sequence of `varint(skip) varint(len) len×u8`, where `skip`
//! bytes are unchanged and the next `len` bytes are XOR values to apply.
//! `len` is at least 1; the final unchanged run is implicit. Unlike XBZRLE
//! the literal bytes are XOR values (small counters and flags XOR to small
//! numbers, which the section compressor then squeezes), and unchanged gaps
//! shorter than [`MERGE_GAP`] bytes are folded into the literal because a
//! new run header costs about as much.

use crate::page::{PAGE_SIZE, Page, get_varint, put_varint};

/// Unchanged gaps shorter than this are carried inside a literal.
const MERGE_GAP: usize = 4;

/// Append the delta turning `base` into `page` to `out`. Returns `false`
/// (with `out` truncated back) when the delta would exceed `max_len` bytes.
pub(crate) fn encode(base: &Page, page: &Page, out: &mut Vec<u8>, max_len: usize) -> bool {
    let start_len = out.len();
    let (wb, _) = base.as_chunks::<8>();
    let (wp, _) = page.as_chunks::<8>();
    let mut pos = 0usize; // first byte not yet described
    let mut i = 0usize;
    while i < PAGE_SIZE {
        // Skip equal bytes up to a word boundary, equal words, then equal
        // bytes again.
        while i < PAGE_SIZE && !i.is_multiple_of(8) && base[i] == page[i] {
            i += 1;
        }
        if i.is_multiple_of(8) {
            let mut w = i / 8;
            while w < wb.len() && wb[w] == wp[w] {
                w += 1;
            }
            i = w * 8;
        }
        while i < PAGE_SIZE && base[i] == page[i] {
            i += 1;
        }
        if i >= PAGE_SIZE {
            break;
        }
        let lit_start = i;
        let mut last_diff = i;
        while i < PAGE_SIZE {
            // Word fast paths (same result as the byte loop below): a word
            // with no equal byte extends the run; an all-equal word ends it,
            // because it holds at least MERGE_GAP equal bytes.
            if i.is_multiple_of(8) {
                let x = u64::from_ne_bytes(wb[i / 8]) ^ u64::from_ne_bytes(wp[i / 8]);
                if x == 0 {
                    break;
                }
                if !has_zero_byte(x) {
                    i += 8;
                    last_diff = i;
                    continue;
                }
            }
            if base[i] != page[i] {
                i += 1;
                last_diff = i;
            } else if i - last_diff >= MERGE_GAP {
                break;
            } else {
                i += 1;
            }
        }
        put_varint(out, (lit_start - pos) as u64);
        put_varint(out, (last_diff - lit_start) as u64);
        out.extend(
            base[lit_start..last_diff]
                .iter()
                .zip(&page[lit_start..last_diff])
                .map(|(a, b)| a ^ b),
        );
        pos = last_diff;
        i = last_diff;
        if out.len() - start_len > max_len {
            out.truncate(start_len);
            return false;
        }
    }
    true
}

/// True when some byte of `x` is zero (exact: borrows only run upwards from
/// a zero byte).
#[inline]
fn has_zero_byte(x: u64) -> bool {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    x.wrapping_sub(LO) & !x & HI != 0
}

/// Why a delta could not be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ZrleError {
    /// A varint was cut short or too long.
    Truncated,
    /// A run points past the end of the page or has length zero.
    OutOfBounds,
}

/// Apply a delta produced by [`encode`] to `page` (which holds the base).
/// On error `page` may be partly modified; callers decode into a scratch
/// copy and only publish it once the whole checkpoint verifies.
pub(crate) fn apply(page: &mut Page, mut data: &[u8]) -> Result<(), ZrleError> {
    let mut pos = 0usize;
    while !data.is_empty() {
        let (skip, n1) = get_varint(data).ok_or(ZrleError::Truncated)?;
        data = &data[n1..];
        let (len, n2) = get_varint(data).ok_or(ZrleError::Truncated)?;
        data = &data[n2..];
        let start = usize::try_from(skip)
            .ok()
            .and_then(|s| pos.checked_add(s))
            .ok_or(ZrleError::OutOfBounds)?;
        let len = usize::try_from(len).map_err(|_| ZrleError::OutOfBounds)?;
        let end = start.checked_add(len).ok_or(ZrleError::OutOfBounds)?;
        if len == 0 || end > PAGE_SIZE {
            return Err(ZrleError::OutOfBounds);
        }
        let lit = data.get(..len).ok_or(ZrleError::Truncated)?;
        for (d, x) in page[start..end].iter_mut().zip(lit) {
            *d ^= x;
        }
        data = &data[len..];
        pos = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn page_from(v: &[u8]) -> Box<Page> {
        let mut p = Box::new([0u8; PAGE_SIZE]);
        for (i, b) in v.iter().enumerate() {
            p[i % PAGE_SIZE] = *b;
        }
        p
    }

    /// Byte-at-a-time version of [`encode`] (no size limit).
    fn reference(base: &Page, page: &Page) -> Vec<u8> {
        let mut out = Vec::new();
        let (mut pos, mut i) = (0usize, 0usize);
        loop {
            while i < PAGE_SIZE && base[i] == page[i] {
                i += 1;
            }
            if i >= PAGE_SIZE {
                return out;
            }
            let (start, mut last) = (i, i);
            while i < PAGE_SIZE {
                if base[i] != page[i] {
                    i += 1;
                    last = i;
                } else if i - last >= MERGE_GAP {
                    break;
                } else {
                    i += 1;
                }
            }
            put_varint(&mut out, (start - pos) as u64);
            put_varint(&mut out, (last - start) as u64);
            out.extend((start..last).map(|k| base[k] ^ page[k]));
            pos = last;
            i = last;
        }
    }

    #[test]
    fn zero_byte_test_is_exact() {
        for k in 0..8 {
            let x = !(0xffu64 << (8 * k));
            assert!(has_zero_byte(x & !(0xffu64 << (8 * k))));
            assert!(has_zero_byte(0x0100_0000_0000_0000u64.rotate_left(8 * k)));
        }
        assert!(!has_zero_byte(0x0101_0101_0101_0101));
        assert!(!has_zero_byte(u64::MAX));
        assert!(!has_zero_byte(0x8080_8080_8080_8080));
        assert!(has_zero_byte(0));
    }

    #[test]
    fn identical_pages_encode_to_nothing() {
        let p = page_from(&[1, 2, 3, 4, 5]);
        let mut out = Vec::new();
        assert!(encode(&p, &p, &mut out, 10));
        assert!(out.is_empty());
    }

    #[test]
    fn single_byte_change_is_tiny() {
        let a = page_from(&[7; 4096]);
        let mut b = a.clone();
        b[1000] = 9;
        let mut out = Vec::new();
        assert!(encode(&a, &b, &mut out, 100));
        // skip=1000 (2 bytes), len=1, one XOR byte.
        assert_eq!(out, vec![0xe8, 0x07, 1, 7 ^ 9]);
        let mut c = a.clone();
        apply(&mut c, &out).expect("valid delta");
        assert_eq!(c, b);
    }

    #[test]
    fn limit_is_respected_and_output_restored() {
        let a = Box::new([0u8; PAGE_SIZE]);
        let b = Box::new([0xa5u8; PAGE_SIZE]);
        let mut out = vec![42];
        assert!(!encode(&a, &b, &mut out, 100));
        assert_eq!(out, vec![42]);
    }

    #[test]
    fn hostile_deltas_are_rejected() {
        let mut p = Box::new([0u8; PAGE_SIZE]);
        // Zero-length literal.
        assert_eq!(apply(&mut p, &[0, 0]), Err(ZrleError::OutOfBounds));
        // Run past the end: skip 4095, len 2.
        assert_eq!(
            apply(&mut p, &[0xff, 0x1f, 2, 1, 1]),
            Err(ZrleError::OutOfBounds)
        );
        // Literal bytes missing.
        assert_eq!(apply(&mut p, &[0, 3, 1]), Err(ZrleError::Truncated));
        // Varint cut.
        assert_eq!(apply(&mut p, &[0x80]), Err(ZrleError::Truncated));
        // Huge skip must not overflow.
        let mut huge = vec![0xff; 9];
        huge.push(0x01);
        huge.push(1);
        huge.push(1);
        assert_eq!(apply(&mut p, &huge), Err(ZrleError::OutOfBounds));
    }

    proptest! {
        #[test]
        fn round_trip(base in proptest::collection::vec(any::<u8>(), PAGE_SIZE),
                      edits in proptest::collection::vec((0usize..PAGE_SIZE, any::<u8>(), 1usize..64), 0..40)) {
            let a = page_from(&base);
            let mut b = a.clone();
            for (at, v, n) in edits {
                for k in at..(at + n).min(PAGE_SIZE) {
                    b[k] = v.wrapping_add(k as u8);
                }
            }
            let mut out = Vec::new();
            prop_assert!(encode(&a, &b, &mut out, 3 * PAGE_SIZE));
            let mut c = a.clone();
            prop_assert!(apply(&mut c, &out).is_ok());
            prop_assert_eq!(&c[..], &b[..]);
        }

        /// The word fast paths give exactly the byte-at-a-time result.
        #[test]
        fn matches_byte_at_a_time_reference(
            base in proptest::collection::vec(any::<u8>(), PAGE_SIZE),
            edits in proptest::collection::vec((0usize..PAGE_SIZE, 1usize..40, any::<bool>()), 0..60),
        ) {
            let a = page_from(&base);
            let mut b = a.clone();
            for (at, n, sparse) in edits {
                for k in at..(at + n).min(PAGE_SIZE) {
                    // Sparse edits leave equal bytes inside changed words.
                    if !sparse || k % 3 == 0 {
                        b[k] = !b[k];
                    }
                }
            }
            let mut fast = Vec::new();
            prop_assert!(encode(&a, &b, &mut fast, 3 * PAGE_SIZE));
            prop_assert_eq!(fast, reference(&a, &b));
        }

        #[test]
        fn apply_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut p = Box::new([0u8; PAGE_SIZE]);
            let _ = apply(&mut p, &data);
        }
    }
}
