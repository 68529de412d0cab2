//! The reference store: page versions the backup holds, mirrored exactly by
//! the encoder (primary) and the decoder (backup).
//!
//! Architecture invariant: after the same sequence of [`RefStore::commit`]
//! and [`RefStore::touch`] calls, two stores with the same capacity hold the
//! same pages in the same slots. Nothing else changes a store. Both sides
//! call them only for checkpoints that verified, in record order.
//!
//! * Slots: `capacity` pages of 4 KiB (the memory budget), allocated lazily.
//! * Address index: page number -> slot holding the latest version of that
//!   page that went through the store.
//! * Content index (encoder only, derived): fingerprints of
//!   [`FP_CHUNKS`] sampled 64-byte chunks -> slot. It lets a page match a
//!   different page with similar content (copied, moved, partly rewritten).
//!   The decoder never needs it because records name slots explicitly.
//! * Eviction: CLOCK (second chance) over slots. A slot's reference bit is
//!   set when the slot is written or used as a delta/duplicate base; the hand
//!   clears bits until it finds a clear one. Deterministic on both sides.

use std::collections::HashMap;

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::page::{MixState, PAGE_SIZE, Page, as_page, is_zero};

/// Number of sampled chunks fingerprinted per page.
pub const FP_CHUNKS: usize = 8;
/// Size of a sampled chunk.
const FP_CHUNK_LEN: usize = 64;
/// Distance between sampled chunks.
const FP_STRIDE: usize = PAGE_SIZE / FP_CHUNKS;
/// Marker for "no fingerprint" (an all-zero chunk says nothing).
const NO_FP: u64 = 0;
const NO_SLOT: u32 = u32::MAX;

/// Fingerprints of the sampled chunks of a page. All-zero chunks get
/// [`NO_FP`] because every sparse page would otherwise match every other.
pub(crate) fn fingerprints(page: &Page) -> [u64; FP_CHUNKS] {
    let mut fps = [NO_FP; FP_CHUNKS];
    for (k, fp) in fps.iter_mut().enumerate() {
        let off = k * FP_STRIDE;
        let chunk = &page[off..off + FP_CHUNK_LEN];
        if !is_zero(chunk) {
            // The seed binds the position: a match means "same bytes at the
            // same offset", which is what an XOR delta can exploit.
            let h = xxh3_64_with_seed(chunk, k as u64);
            *fp = if h == NO_FP { 1 } else { h };
        }
    }
    fps
}

/// Up to this many candidate slots are returned by [`RefStore::candidates`].
pub(crate) const MAX_CANDIDATES: usize = FP_CHUNKS + 1;

/// Bounded store of reference pages. See the module docs for the rules.
#[derive(Debug)]
pub struct RefStore {
    capacity: u32,
    data: Vec<u8>,
    slot_pfn: Vec<u64>,
    referenced: Vec<bool>,
    hand: u32,
    by_pfn: HashMap<u64, u32, MixState>,
    content: Option<ContentIndex>,
}

#[derive(Debug, Default)]
struct ContentIndex {
    map: HashMap<u64, u32, MixState>,
    slot_fps: Vec<[u64; FP_CHUNKS]>,
}

impl RefStore {
    /// A store of `capacity` slots (at least 1). `content_index` is needed
    /// by encoders only.
    pub fn new(capacity: u32, content_index: bool) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            // Zeroed allocation is lazy (the kernel maps pages on first
            // touch), so the budget costs memory only as slots fill; doing
            // it once avoids re-copying the store as a Vec grows.
            data: vec![0u8; capacity as usize * PAGE_SIZE],
            slot_pfn: Vec::new(),
            referenced: Vec::new(),
            hand: 0,
            by_pfn: HashMap::default(),
            content: content_index.then(ContentIndex::default),
        }
    }

    /// Slots for a memory budget in bytes (at least one slot).
    pub fn slots_for_budget(budget_bytes: u64) -> u32 {
        u32::try_from(budget_bytes / PAGE_SIZE as u64)
            .unwrap_or(u32::MAX - 1)
            .max(1)
    }

    /// Maximum number of slots.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Slots currently holding a page.
    pub fn len(&self) -> u32 {
        self.slot_pfn.len() as u32
    }

    /// True when no page has been stored yet.
    pub fn is_empty(&self) -> bool {
        self.slot_pfn.is_empty()
    }

    /// Forget everything (both sides do this on every new connection).
    pub fn reset(&mut self) {
        let content = self.content.is_some();
        *self = Self::new(self.capacity, content);
    }

    /// The page in `slot`, if that slot is in use.
    pub fn get(&self, slot: u32) -> Option<&Page> {
        let s = slot as usize;
        if s >= self.slot_pfn.len() {
            return None;
        }
        Some(as_page(&self.data[s * PAGE_SIZE..(s + 1) * PAGE_SIZE]))
    }

    /// Slot holding the latest stored version of page `pfn`.
    pub fn slot_of(&self, pfn: u64) -> Option<u32> {
        self.by_pfn.get(&pfn).copied()
    }

    /// Candidate slots for `page` at `pfn`: the address slot first, then
    /// content matches ordered by how many fingerprints agree.
    pub(crate) fn candidates(&self, pfn: u64, fps: &[u64; FP_CHUNKS], out: &mut Vec<u32>) {
        out.clear();
        if let Some(s) = self.slot_of(pfn) {
            out.push(s);
        }
        let Some(ci) = &self.content else { return };
        let mut votes: [(u32, u8); FP_CHUNKS] = [(NO_SLOT, 0); FP_CHUNKS];
        let mut n = 0;
        for fp in fps.iter().filter(|&&f| f != NO_FP) {
            if let Some(&s) = ci.map.get(fp) {
                if let Some(v) = votes[..n].iter_mut().find(|v| v.0 == s) {
                    v.1 += 1;
                } else {
                    votes[n] = (s, 1);
                    n += 1;
                }
            }
        }
        votes[..n].sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        for &(s, _) in &votes[..n] {
            if !out.contains(&s) {
                out.push(s);
            }
        }
    }

    /// Mark `slot` as recently useful (used as a base by a record).
    pub fn touch(&mut self, slot: u32) {
        if let Some(r) = self.referenced.get_mut(slot as usize) {
            *r = true;
        }
    }

    /// Record that the backup now holds `page` at `pfn`: overwrite the
    /// page's own slot, or take a free slot, or evict by CLOCK.
    pub fn commit(&mut self, pfn: u64, page: &Page) {
        self.commit_with(pfn, page, None);
    }

    /// [`commit`](Self::commit) with the page's fingerprints when the caller
    /// already computed them.
    pub(crate) fn commit_with(&mut self, pfn: u64, page: &Page, fps: Option<&[u64; FP_CHUNKS]>) {
        let slot = match self.slot_of(pfn) {
            // Re-indexed below, only where the fingerprints changed.
            Some(s) => s,
            None => {
                let s = if self.len() < self.capacity {
                    let s = self.len();
                    self.slot_pfn.push(pfn);
                    self.referenced.push(false);
                    if let Some(ci) = &mut self.content {
                        ci.slot_fps.push([NO_FP; FP_CHUNKS]);
                    }
                    s
                } else {
                    let victim = self.evict();
                    self.unindex(victim);
                    let old = self.slot_pfn[victim as usize];
                    self.by_pfn.remove(&old);
                    victim
                };
                self.by_pfn.insert(pfn, s);
                s
            }
        };
        let i = slot as usize;
        self.slot_pfn[i] = pfn;
        self.referenced[i] = true;
        self.data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].copy_from_slice(page);
        self.reindex(slot, page, fps);
    }

    /// Point the content index at `slot`'s new contents `page`.
    fn reindex(&mut self, slot: u32, page: &Page, fps: Option<&[u64; FP_CHUNKS]>) {
        let i = slot as usize;
        if let Some(ci) = &mut self.content {
            let new = fps.copied().unwrap_or_else(|| fingerprints(page));
            let old = std::mem::replace(&mut ci.slot_fps[i], new);
            // A page rewritten in place mostly keeps its fingerprints:
            // remove only the ones that changed (a fresh or evicted slot
            // has none left). The inserts below make "latest slot wins"
            // hold for the unchanged ones too.
            for (o, n) in old.iter().zip(&new) {
                if o != n && *o != NO_FP && ci.map.get(o) == Some(&slot) {
                    ci.map.remove(o);
                }
            }
            for &fp in new.iter().filter(|&&f| f != NO_FP) {
                ci.map.insert(fp, slot);
            }
        }
    }

    /// [`commit_with`](Self::commit_with) for a page that was encoded
    /// against its own stored version in `base`: a duplicate (`delta`
    /// empty) or an XOR delta. While `base` is still the page's address
    /// slot, it holds exactly that base, so the delta is applied in place:
    /// only the changed cache lines are touched instead of copying 4 KiB
    /// from a page that has long left the cache. The result is the same as
    /// `commit_with(pfn, page, fps)` in every respect; the delta must be
    /// one that [`zrle::encode`](crate::zrle) made from base to `page`.
    pub(crate) fn commit_in_place(
        &mut self,
        pfn: u64,
        base: u32,
        delta: &[u8],
        page: &Page,
        fps: Option<&[u64; FP_CHUNKS]>,
    ) {
        // An earlier commit of this checkpoint may have evicted the slot.
        if self.slot_of(pfn) != Some(base) {
            return self.commit_with(pfn, page, fps);
        }
        let i = base as usize;
        let range = i * PAGE_SIZE..(i + 1) * PAGE_SIZE;
        let applied = match <&mut Page>::try_from(&mut self.data[range.clone()]) {
            Ok(slot) => crate::zrle::apply(slot, delta).is_ok(),
            Err(_) => false,
        };
        if !applied {
            // Not reachable for deltas this crate made and checked; stay
            // correct anyway.
            self.data[range.clone()].copy_from_slice(page);
        }
        debug_assert!(self.data[range] == page[..]);
        self.referenced[i] = true;
        self.reindex(base, page, fps);
    }

    fn evict(&mut self) -> u32 {
        loop {
            let h = self.hand as usize;
            self.hand = (self.hand + 1) % self.capacity;
            if self.referenced[h] {
                self.referenced[h] = false;
            } else {
                return h as u32;
            }
        }
    }

    fn unindex(&mut self, slot: u32) {
        if let Some(ci) = &mut self.content {
            let fps = std::mem::replace(&mut ci.slot_fps[slot as usize], [NO_FP; FP_CHUNKS]);
            for fp in fps.iter().filter(|&&f| f != NO_FP) {
                if ci.map.get(fp) == Some(&slot) {
                    ci.map.remove(fp);
                }
            }
        }
    }

    /// A digest of the slots, their pages and the CLOCK state, for tests
    /// that check two stores evolved in lockstep.
    pub fn digest(&self) -> u64 {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(&self.data[..self.slot_pfn.len() * PAGE_SIZE]);
        for (p, r) in self.slot_pfn.iter().zip(&self.referenced) {
            h.update(&p.to_le_bytes());
            h.update(&[u8::from(*r)]);
        }
        h.update(&self.hand.to_le_bytes());
        h.digest()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(tag: u8) -> Box<Page> {
        let mut p = Box::new([0u8; PAGE_SIZE]);
        for (i, b) in p.iter_mut().enumerate() {
            *b = tag.wrapping_add((i / 64) as u8);
        }
        p
    }

    #[test]
    fn address_index_tracks_latest_version() {
        let mut s = RefStore::new(4, true);
        s.commit(10, &page(1));
        s.commit(10, &page(2));
        assert_eq!(s.len(), 1);
        let slot = s.slot_of(10).expect("indexed");
        assert_eq!(s.get(slot).expect("present")[..], page(2)[..]);
    }

    #[test]
    fn clock_evicts_unreferenced_first_and_both_sides_agree() {
        let mut a = RefStore::new(3, true);
        let mut b = RefStore::new(3, false);
        for st in [&mut a, &mut b] {
            st.commit(1, &page(1));
            st.commit(2, &page(2));
            st.commit(3, &page(3));
            // Full: first eviction sweeps all bits clear and takes slot 0.
            st.commit(4, &page(4));
            assert_eq!(st.slot_of(1), None);
            assert_eq!(st.slot_of(4), Some(0));
            // Page 2 is used as a base: it survives the next eviction.
            st.touch(1);
            st.commit(5, &page(5));
            assert_eq!(st.slot_of(3), None);
            assert_eq!(st.slot_of(2), Some(1));
        }
        assert_eq!(a.digest(), b.digest());
    }

    #[test]
    fn content_index_finds_copies_at_other_addresses() {
        let mut s = RefStore::new(8, true);
        s.commit(5, &page(9));
        let mut moved = page(9);
        moved[100] ^= 1; // partly rewritten copy
        let mut out = Vec::new();
        s.candidates(77, &fingerprints(&moved), &mut out);
        assert_eq!(out, vec![s.slot_of(5).expect("stored")]);
        // A sparse page has no fingerprints and matches nothing by content.
        let sparse = Box::new([0u8; PAGE_SIZE]);
        s.candidates(78, &fingerprints(&sparse), &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn rewrite_in_place_reindexes_changed_chunks_and_latest_slot_wins() {
        let mut s = RefStore::new(4, true);
        let mut out = Vec::new();
        s.commit(1, &page(3));
        let a = s.slot_of(1).expect("stored");
        // Rewrite chunk 0 in place: the old chunk-0 fingerprint must go,
        // the new one must point at the slot.
        let old = page(3);
        let mut new = page(3);
        new[..64].fill(0x77);
        s.commit(1, &new);
        assert_eq!(s.slot_of(1), Some(a));
        let mut probe = Box::new([0u8; PAGE_SIZE]);
        probe[..64].copy_from_slice(&old[..64]);
        s.candidates(9, &fingerprints(&probe), &mut out);
        assert!(out.is_empty(), "stale fingerprint of a rewritten chunk");
        probe[..64].copy_from_slice(&new[..64]);
        s.candidates(9, &fingerprints(&probe), &mut out);
        assert_eq!(out, vec![a]);
        // The same content committed at another page takes the index ...
        s.commit(2, &new);
        let b = s.slot_of(2).expect("stored");
        s.candidates(9, &fingerprints(&new), &mut out);
        assert_eq!(out, vec![b]);
        // ... and rewriting page 1 with unchanged content takes it back.
        s.commit(1, &new);
        s.candidates(9, &fingerprints(&new), &mut out);
        assert_eq!(out, vec![a]);
    }

    #[test]
    fn evicted_content_is_unindexed() {
        let mut s = RefStore::new(1, true);
        s.commit(1, &page(1));
        s.commit(2, &page(2));
        let mut out = Vec::new();
        s.candidates(3, &fingerprints(&page(1)), &mut out);
        assert!(
            out.is_empty(),
            "stale fingerprints must not point at reused slots"
        );
    }
}
