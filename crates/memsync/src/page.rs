//! Page-level helpers shared by every method: zero tests, word diffs,
//! varints and a cheap hasher for integer keys.

use std::hash::{BuildHasherDefault, Hasher};

/// Size of a guest page in bytes. Every method works on 4 KiB pages.
pub const PAGE_SIZE: usize = 4096;

/// One page of memory.
pub type Page = [u8; PAGE_SIZE];

/// A page of zeroes, for comparisons and as a decode base.
pub static ZERO_PAGE: Page = [0u8; PAGE_SIZE];

/// True when every byte of `page` is zero.
#[inline]
pub fn is_zero(page: &[u8]) -> bool {
    let (words, rest) = page.as_chunks::<8>();
    // OR-fold in blocks so the compiler vectorises; the per-block exit keeps
    // non-zero pages (the common case) cheap.
    rest.iter().all(|&b| b == 0)
        && words
            .chunks(32)
            .all(|blk| blk.iter().fold(0u64, |acc, w| acc | u64::from_ne_bytes(*w)) == 0)
}

/// Number of 8-byte words in which `a` and `b` differ, stopping early once
/// the count exceeds `limit` (the result is then some value > `limit`).
#[inline]
pub(crate) fn diff_words(a: &Page, b: &Page, limit: usize) -> usize {
    let (wa, _) = a.as_chunks::<8>();
    let (wb, _) = b.as_chunks::<8>();
    let mut n = 0usize;
    for (ca, cb) in wa.chunks(64).zip(wb.chunks(64)) {
        n += ca
            .iter()
            .zip(cb)
            .map(|(x, y)| usize::from(u64::from_ne_bytes(*x) != u64::from_ne_bytes(*y)))
            .sum::<usize>();
        if n > limit {
            return n;
        }
    }
    n
}

/// Append `v` as an unsigned LEB128 varint.
#[inline]
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Read an unsigned LEB128 varint of at most 10 bytes. Returns the value
/// and the number of bytes consumed, or `None` when the input is truncated
/// or the varint overflows 64 bits.
#[inline]
pub(crate) fn get_varint(buf: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &b) in buf.iter().enumerate().take(10) {
        let part = u64::from(b & 0x7f);
        if i == 9 && part > 1 {
            return None;
        }
        v |= part << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// A hasher for keys that are already well mixed (fingerprints) or small
/// integers (page numbers): one multiply, no SipHash.
#[derive(Default, Clone, Copy, Debug)]
pub(crate) struct MixHasher(u64);

impl Hasher for MixHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (v ^ (v >> 29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }
}

/// `HashMap` builder using [`MixHasher`].
pub(crate) type MixState = BuildHasherDefault<MixHasher>;

/// View a page-sized slice as a page. Callers slice at page boundaries.
#[inline]
pub(crate) fn as_page(s: &[u8]) -> &Page {
    s.try_into().unwrap_or(&ZERO_PAGE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn zero_detection() {
        let mut p = [0u8; PAGE_SIZE];
        assert!(is_zero(&p));
        p[4095] = 1;
        assert!(!is_zero(&p));
        p[4095] = 0;
        p[0] = 0x80;
        assert!(!is_zero(&p));
        assert!(is_zero(&[0u8; 13]));
        assert!(!is_zero(&[0, 0, 0, 1]));
    }

    #[test]
    fn diff_words_counts_and_stops_early() {
        let a = [0u8; PAGE_SIZE];
        let mut b = [0u8; PAGE_SIZE];
        assert_eq!(diff_words(&a, &b, usize::MAX), 0);
        b[0] = 1;
        b[7] = 1; // same word
        b[8] = 1;
        b[4095] = 9;
        assert_eq!(diff_words(&a, &b, usize::MAX), 3);
        let all = [0xffu8; PAGE_SIZE];
        assert!(diff_words(&a, &all, 10) > 10);
    }

    proptest! {
        #[test]
        fn varint_round_trip(v: u64) {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            prop_assert_eq!(get_varint(&out), Some((v, out.len())));
            // Every strict prefix is truncated.
            for cut in 0..out.len() {
                prop_assert_eq!(get_varint(&out[..cut]), None);
            }
        }

        #[test]
        fn varint_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..16)) {
            if let Some((_, n)) = get_varint(&bytes) {
                prop_assert!(n <= bytes.len() && n <= 10);
            }
        }
    }
}
