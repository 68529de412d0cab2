//! QEMU's XBZRLE, modelled as QEMU 7.x implements it, as the anchor to beat.
//!
//! Behaviour reproduced (from QEMU's `migration/xbzrle.c`, `page_cache.c`
//! and the XBZRLE part of `ram.c`; reimplemented, not copied):
//!
//! * Cache: `cache_bytes / 4096` entries, rounded down to a power of two
//!   (QEMU refuses other sizes; default 64 MiB). Entry = `(addr / 4096) &
//!   (entries - 1)`: direct mapped by address only.
//! * Lookup hit = same address in the entry; a hit refreshes the entry's age
//!   to the current generation (the dirty-sync count).
//! * Insert on a miss replaces the entry unless it holds another address
//!   whose age + 2 (`CACHED_PAGE_LIFETIME`) is still above the current
//!   generation (a "fresh" page is kept); then the page is sent raw and not
//!   cached.
//! * The first pass (bulk stage, our checkpoint 0) sends everything without
//!   XBZRLE and inserts nothing. From the second pass on: zero pages are sent
//!   as zero pages and a zero page is inserted in the cache; other pages miss
//!   (insert, send raw) or hit (encode). An encoding of 0 bytes means the
//!   page is unchanged and nothing is sent; an encoding that would exceed
//!   4096 bytes overflows: the page is sent raw and the cache updated.
//! * Encoding: alternating maximal runs of unchanged / changed bytes as
//!   `uleb128(unchanged) uleb128(changed) changed-bytes(new values)`, the
//!   trailing unchanged run dropped, with QEMU's overflow checks.
//! * Bytes on the wire per page: 8-byte header (`be64 offset | flags`, with
//!   `RAM_SAVE_FLAG_CONTINUE`; the very first page also carries the block
//!   name, 1 + 6 bytes for `pc.ram`), then 1 byte for a zero page, 4096 for a
//!   normal page, or 1 (encoding flag) + 2 (`be16` length) + the encoding.
//!   Every pass ends with an 8-byte `RAM_SAVE_FLAG_EOS`.

use serde::{Deserialize, Serialize};

use crate::page::{PAGE_SIZE, Page, is_zero};

/// QEMU's default XBZRLE cache size.
pub const DEFAULT_CACHE_BYTES: u64 = 64 << 20;
/// `CACHED_PAGE_LIFETIME` in QEMU's page cache.
const CACHED_PAGE_LIFETIME: u64 = 2;

const FLAG_ZERO: u64 = 0x02;
const FLAG_PAGE: u64 = 0x08;
const FLAG_EOS: u64 = 0x10;
const FLAG_CONTINUE: u64 = 0x20;
const FLAG_XBZRLE: u64 = 0x40;
const ENCODING_FLAG_XBZRLE: u8 = 0x01;
const BLOCK_NAME: &[u8] = b"pc.ram";

/// Pages of each outcome, as QEMU's `xbzrle_counters` would show them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct XbzrleCounts {
    /// Zero pages (9 bytes each).
    pub zero: u64,
    /// Full pages: first pass and cache misses.
    pub normal: u64,
    /// Pages sent XBZRLE-encoded.
    pub xbzrle: u64,
    /// Hits whose encoding overflowed (sent raw).
    pub overflow: u64,
    /// Hits identical to the cached page (nothing sent).
    pub unchanged: u64,
}

/// Failures while applying an XBZRLE stream.
#[derive(Debug, thiserror::Error)]
pub enum XbzrleError {
    /// The stream is malformed.
    #[error("XBZRLE stream invalid at byte {at}: {reason}; the stream was corrupted")]
    Corrupt {
        /// Byte offset in the stream.
        at: usize,
        /// What is wrong.
        reason: &'static str,
    },
}

#[derive(Debug, Clone)]
struct Item {
    addr: u64,
    age: u64,
    data: Option<Box<Page>>,
}

/// QEMU's address-keyed page cache.
#[derive(Debug, Clone)]
pub struct PageCache {
    items: Vec<Item>,
}

impl PageCache {
    /// A cache of `cache_bytes`, rounded down to a power-of-two page count.
    pub fn new(cache_bytes: u64) -> Self {
        let pages = (cache_bytes / PAGE_SIZE as u64).max(1);
        let pow2 = 1u64 << (63 - pages.leading_zeros());
        let items = vec![
            Item {
                addr: u64::MAX,
                age: 0,
                data: None
            };
            pow2 as usize
        ];
        Self { items }
    }

    /// Number of entries.
    pub fn entries(&self) -> usize {
        self.items.len()
    }

    fn pos(&self, addr: u64) -> usize {
        ((addr / PAGE_SIZE as u64) & (self.items.len() as u64 - 1)) as usize
    }

    fn is_cached(&mut self, addr: u64, age: u64) -> bool {
        let p = self.pos(addr);
        let it = &mut self.items[p];
        if it.addr == addr {
            it.age = age;
            true
        } else {
            false
        }
    }

    fn insert(&mut self, addr: u64, data: &Page, age: u64) -> bool {
        let p = self.pos(addr);
        let it = &mut self.items[p];
        if it.data.is_some() && it.addr != addr && it.age + CACHED_PAGE_LIFETIME > age {
            return false;
        }
        match &mut it.data {
            Some(d) => d.copy_from_slice(data),
            None => it.data = Some(Box::new(*data)),
        }
        it.age = age;
        it.addr = addr;
        true
    }

    fn data_mut(&mut self, addr: u64) -> Option<&mut Page> {
        let p = self.pos(addr);
        self.items[p].data.as_deref_mut()
    }
}

fn put_uleb(out: &mut Vec<u8>, v: usize) -> usize {
    if v < 0x80 {
        out.push(v as u8);
        1
    } else {
        out.push((v as u8 & 0x7f) | 0x80);
        out.push((v >> 7) as u8);
        2
    }
}

fn uleb_len(v: usize) -> usize {
    if v < 0x80 { 1 } else { 2 }
}

/// XBZRLE-encode `new` against `old` into `out` with QEMU's limit `dlen`.
/// Returns `Some(0)` for identical pages (nothing appended), `Some(n)` for
/// an `n`-byte encoding, `None` on overflow (nothing appended).
pub fn encode_buffer(old: &Page, new: &Page, out: &mut Vec<u8>, dlen: usize) -> Option<usize> {
    let start = out.len();
    let mut d = 0usize;
    let mut i = 0usize;
    let n = PAGE_SIZE;
    let overflow = |out: &mut Vec<u8>| {
        out.truncate(start);
        None
    };
    while i < n {
        if d + 2 > dlen {
            return overflow(out);
        }
        let z0 = i;
        // Word-at-a-time for speed, then bytes.
        while i + 8 <= n && old[i..i + 8] == new[i..i + 8] {
            i += 8;
        }
        while i < n && old[i] == new[i] {
            i += 1;
        }
        let zrun = i - z0;
        if zrun == n {
            return Some(0);
        }
        if i == n {
            return Some(d);
        }
        d += put_uleb(out, zrun);
        if d + 2 > dlen {
            return overflow(out);
        }
        let nz0 = i;
        while i < n && old[i] != new[i] {
            i += 1;
        }
        let nzrun = i - nz0;
        if d + uleb_len(nzrun) + nzrun > dlen {
            return overflow(out);
        }
        d += put_uleb(out, nzrun);
        out.extend_from_slice(&new[nz0..i]);
        d += nzrun;
    }
    Some(d)
}

fn get_uleb(src: &[u8], at: usize) -> Option<(usize, usize)> {
    let b0 = *src.get(at)?;
    if b0 & 0x80 == 0 {
        return Some((usize::from(b0), 1));
    }
    let b1 = *src.get(at + 1)?;
    if b1 & 0x80 != 0 {
        return None;
    }
    Some((usize::from(b0 & 0x7f) | usize::from(b1) << 7, 2))
}

/// Apply an XBZRLE encoding to `page` in place, with QEMU's checks.
pub fn decode_buffer(src: &[u8], page: &mut Page) -> Result<(), XbzrleError> {
    let bad = |at, reason| XbzrleError::Corrupt { at, reason };
    let (mut i, mut d) = (0usize, 0usize);
    while i < src.len() {
        let (zrun, n) = get_uleb(src, i).ok_or(bad(i, "bad uleb128"))?;
        if i != 0 && zrun == 0 {
            return Err(bad(i, "empty unchanged run"));
        }
        i += n;
        d += zrun;
        if d > PAGE_SIZE {
            return Err(bad(i, "run past the page"));
        }
        let (nzrun, n) = get_uleb(src, i).ok_or(bad(i, "bad uleb128"))?;
        if nzrun == 0 {
            return Err(bad(i, "empty changed run"));
        }
        i += n;
        if d + nzrun > PAGE_SIZE {
            return Err(bad(i, "run past the page"));
        }
        let lit = src.get(i..i + nzrun).ok_or(bad(i, "truncated run"))?;
        page[d..d + nzrun].copy_from_slice(lit);
        i += nzrun;
        d += nzrun;
    }
    Ok(())
}

/// The sending side: cache and generation, producing QEMU's stream.
#[derive(Debug)]
pub struct XbzrleSender {
    cache: PageCache,
    generation: u64,
    enabled: bool,
    first_page: bool,
    scratch: Vec<u8>,
}

impl XbzrleSender {
    /// A sender with a cache of `cache_bytes`.
    pub fn new(cache_bytes: u64) -> Self {
        Self {
            cache: PageCache::new(cache_bytes),
            generation: 0,
            enabled: false,
            first_page: true,
            scratch: Vec::with_capacity(PAGE_SIZE),
        }
    }

    /// Number of cache entries.
    pub fn cache_entries(&self) -> usize {
        self.cache.entries()
    }

    fn header(&mut self, out: &mut Vec<u8>, pfn: u64, flags: u64) {
        let cont = if self.first_page { 0 } else { FLAG_CONTINUE };
        out.extend_from_slice(&((pfn * PAGE_SIZE as u64) | flags | cont).to_be_bytes());
        if self.first_page {
            out.push(BLOCK_NAME.len() as u8);
            out.extend_from_slice(BLOCK_NAME);
            self.first_page = false;
        }
    }

    /// Send one pass (checkpoint) over `pages`, ascending. Appends QEMU's
    /// wire stream to `out`.
    pub fn send_pass(&mut self, pages: &[(u64, &Page)], out: &mut Vec<u8>) -> XbzrleCounts {
        // One dirty-bitmap sync per pass.
        self.generation += 1;
        let mut c = XbzrleCounts::default();
        for &(pfn, page) in pages {
            let addr = pfn * PAGE_SIZE as u64;
            if is_zero(page) {
                self.header(out, pfn, FLAG_ZERO);
                out.push(0);
                if self.enabled {
                    // QEMU ignores a failed insert here.
                    let _ = self.cache.insert(addr, page, self.generation);
                }
                c.zero += 1;
                continue;
            }
            if self.enabled {
                if !self.cache.is_cached(addr, self.generation) {
                    let _ = self.cache.insert(addr, page, self.generation);
                } else if let Some(cached) = self.cache.data_mut(addr) {
                    self.scratch.clear();
                    match encode_buffer(cached, page, &mut self.scratch, PAGE_SIZE) {
                        Some(0) => {
                            c.unchanged += 1;
                            continue;
                        }
                        Some(n) => {
                            cached.copy_from_slice(page);
                            self.header(out, pfn, FLAG_XBZRLE);
                            out.push(ENCODING_FLAG_XBZRLE);
                            out.extend_from_slice(&(n as u16).to_be_bytes());
                            out.extend_from_slice(&self.scratch);
                            c.xbzrle += 1;
                            continue;
                        }
                        None => {
                            cached.copy_from_slice(page);
                            c.overflow += 1;
                        }
                    }
                }
            }
            self.header(out, pfn, FLAG_PAGE);
            out.extend_from_slice(page);
            c.normal += 1;
        }
        out.extend_from_slice(&FLAG_EOS.to_be_bytes());
        // After the first full pass QEMU enables XBZRLE.
        self.enabled = true;
        c
    }
}

/// Apply a stream produced by [`XbzrleSender::send_pass`] to `image`, as
/// QEMU's load side does (decoding onto the destination's current page).
pub fn apply_pass(stream: &[u8], image: &mut [u8]) -> Result<(), XbzrleError> {
    let bad = |at, reason| XbzrleError::Corrupt { at, reason };
    let mut i = 0usize;
    loop {
        let h = stream.get(i..i + 8).ok_or(bad(i, "truncated header"))?;
        let mut w = [0u8; 8];
        w.copy_from_slice(h);
        let v = u64::from_be_bytes(w);
        i += 8;
        let flags = v & (PAGE_SIZE as u64 - 1);
        if flags & FLAG_EOS != 0 {
            return if i == stream.len() {
                Ok(())
            } else {
                Err(bad(i, "bytes after end of pass"))
            };
        }
        if flags & FLAG_CONTINUE == 0 {
            let n = usize::from(*stream.get(i).ok_or(bad(i, "truncated block name"))?);
            if stream.get(i + 1..i + 1 + n) != Some(BLOCK_NAME) {
                return Err(bad(i, "unknown RAM block"));
            }
            i += 1 + n;
        }
        let off = usize::try_from(v & !(PAGE_SIZE as u64 - 1)).map_err(|_| bad(i, "offset"))?;
        let page: &mut Page = image
            .get_mut(off..off.saturating_add(PAGE_SIZE))
            .and_then(|s| s.try_into().ok())
            .ok_or(bad(i, "page outside the image"))?;
        match flags & !FLAG_CONTINUE {
            FLAG_ZERO => {
                let b = *stream.get(i).ok_or(bad(i, "truncated zero page"))?;
                page.fill(b);
                i += 1;
            }
            FLAG_PAGE => {
                let src = stream
                    .get(i..i + PAGE_SIZE)
                    .ok_or(bad(i, "truncated page"))?;
                page.copy_from_slice(src);
                i += PAGE_SIZE;
            }
            FLAG_XBZRLE => {
                if stream.get(i) != Some(&ENCODING_FLAG_XBZRLE) {
                    return Err(bad(i, "bad encoding flag"));
                }
                let l = stream.get(i + 1..i + 3).ok_or(bad(i, "truncated length"))?;
                let len = usize::from(u16::from_be_bytes([l[0], l[1]]));
                if len > PAGE_SIZE {
                    return Err(bad(i, "encoding longer than a page"));
                }
                i += 3;
                let enc = stream.get(i..i + len).ok_or(bad(i, "truncated encoding"))?;
                decode_buffer(enc, page)?;
                i += len;
            }
            _ => return Err(bad(i, "unknown page flags")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pg(f: impl Fn(usize) -> u8) -> Box<Page> {
        let mut p = Box::new([0u8; PAGE_SIZE]);
        for (i, b) in p.iter_mut().enumerate() {
            *b = f(i);
        }
        p
    }

    #[test]
    fn encoding_matches_qemu_layout() {
        let old = pg(|_| 1);
        let mut new = old.clone();
        new[0] = 2;
        new[1] = 3;
        new[300] = 9;
        let mut out = Vec::new();
        let n = encode_buffer(&old, &new, &mut out, PAGE_SIZE);
        // zrun 0, nzrun 2 [2,3], zrun 298 (2-byte uleb), nzrun 1 [9].
        assert_eq!(out, vec![0, 2, 2, 3, 0xaa, 0x02, 1, 9]);
        assert_eq!(n, Some(out.len()));
        assert_eq!(encode_buffer(&old, &old, &mut out, PAGE_SIZE), Some(0));
    }

    #[test]
    fn alternating_bytes_overflow() {
        let old = pg(|_| 0);
        let new = pg(|i| (i % 2) as u8);
        let mut out = Vec::new();
        assert_eq!(encode_buffer(&old, &new, &mut out, PAGE_SIZE), None);
        assert!(out.is_empty());
    }

    #[test]
    fn cache_is_direct_mapped_and_respects_lifetime() {
        let mut c = PageCache::new(2 * PAGE_SIZE as u64 + 100); // -> 2 entries
        assert_eq!(c.entries(), 2);
        let p = pg(|i| i as u8);
        assert!(c.insert(0, &p, 1));
        // Address 2 pages up maps to the same entry and the entry is fresh.
        assert!(!c.insert(2 * PAGE_SIZE as u64, &p, 2));
        assert!(c.insert(2 * PAGE_SIZE as u64, &p, 3));
        assert!(!c.is_cached(0, 3));
        assert!(c.is_cached(2 * PAGE_SIZE as u64, 3));
    }

    #[test]
    fn pass_accounting_and_round_trip() {
        let pages: Vec<Box<Page>> = (0..4u8).map(|k| pg(move |i| (i as u8) ^ k)).collect();
        let mut image = vec![0u8; 4 * PAGE_SIZE];
        let mut tx = XbzrleSender::new(DEFAULT_CACHE_BYTES);
        let refs: Vec<(u64, &Page)> = pages
            .iter()
            .enumerate()
            .map(|(i, p)| (i as u64, &**p))
            .collect();
        let mut s = Vec::new();
        let c = tx.send_pass(&refs, &mut s);
        assert_eq!(c.normal, 4);
        // 7 bytes of block name on the first page, EOS at the end.
        assert_eq!(s.len(), 4 * (8 + PAGE_SIZE) + 7 + 8);
        apply_pass(&s, &mut image).expect("valid");
        // Second pass: all miss (nothing cached in the bulk stage).
        let mut p2 = pages.clone();
        p2[1][5] ^= 0xff;
        let refs: Vec<(u64, &Page)> = p2
            .iter()
            .enumerate()
            .map(|(i, p)| (i as u64, &**p))
            .collect();
        s.clear();
        assert_eq!(tx.send_pass(&refs, &mut s).normal, 4);
        apply_pass(&s, &mut image).expect("valid");
        // Third pass: hits; page 1 unchanged, page 2 one byte.
        p2[2][7] ^= 1;
        let refs: Vec<(u64, &Page)> = p2
            .iter()
            .enumerate()
            .map(|(i, p)| (i as u64, &**p))
            .collect();
        s.clear();
        let c = tx.send_pass(&refs, &mut s);
        assert_eq!((c.unchanged, c.xbzrle), (3, 1));
        assert_eq!(s.len(), 8 + 1 + 2 + 3 + 8);
        apply_pass(&s, &mut image).expect("valid");
        assert_eq!(&image[2 * PAGE_SIZE..3 * PAGE_SIZE], &p2[2][..]);
    }

    #[test]
    fn hostile_streams_rejected() {
        let mut image = vec![0u8; PAGE_SIZE];
        assert!(apply_pass(&[], &mut image).is_err());
        let mut s = ((5 * PAGE_SIZE as u64) | FLAG_PAGE | FLAG_CONTINUE)
            .to_be_bytes()
            .to_vec();
        s.extend_from_slice(&[0; PAGE_SIZE]);
        assert!(
            apply_pass(&s, &mut image).is_err(),
            "page outside the image"
        );
        let mut p = [0u8; PAGE_SIZE];
        assert!(decode_buffer(&[0xff, 0x7f, 1, 1], &mut p).is_err());
        assert!(decode_buffer(&[0, 0], &mut p).is_err());
        assert!(decode_buffer(&[0, 5, 1], &mut p).is_err());
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(seed in any::<u64>(), edits in proptest::collection::vec((0usize..PAGE_SIZE, 1usize..40), 0..30)) {
            let old = pg(|i| (seed >> (i % 8)) as u8 ^ i as u8);
            let mut new = old.clone();
            for (at, n) in edits {
                for k in at..(at + n).min(PAGE_SIZE) {
                    new[k] = new[k].wrapping_add(1 + (k % 3) as u8);
                }
            }
            let mut out = Vec::new();
            if let Some(n) = encode_buffer(&old, &new, &mut out, PAGE_SIZE) {
                prop_assert_eq!(n, out.len());
                let mut p = old.clone();
                decode_buffer(&out, &mut p).expect("own encoding decodes");
                prop_assert_eq!(&p[..], &new[..]);
            }
        }

        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..100)) {
            let mut p = [0u8; PAGE_SIZE];
            let _ = decode_buffer(&data, &mut p);
            let mut img = vec![0u8; 2 * PAGE_SIZE];
            let _ = apply_pass(&data, &mut img);
        }
    }
}
