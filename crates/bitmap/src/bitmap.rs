//! The in-memory dirty bitmap and its take-and-reset protocol.
//!
//! One bit per granule, stored in `AtomicU64` words so that any number of
//! writers mark concurrently without a lock (`fetch_or`). A consumer harvests
//! with [`DirtyBitmap::take`], which swaps every word to zero one at a time;
//! the harvested bits stay registered with the bitmap (so a persisted copy
//! includes them) until the [`Taken`] guard is committed or dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

/// Smallest granularity: 4 KiB.
pub const MIN_GRANULARITY: u64 = 4 << 10;
/// Largest granularity: 64 MiB.
pub const MAX_GRANULARITY: u64 = 64 << 20;
/// Default granularity: 64 KiB (a 2 TiB disk needs a 4 MiB bitmap).
pub const DEFAULT_GRANULARITY: u64 = 64 << 10;
/// Largest bitmap kept in memory: 256 MiB (2^31 granules, e.g. 128 TiB at
/// 64 KiB). Bigger disks need a larger granularity.
pub const MAX_BITMAP_BYTES: u64 = 256 << 20;

/// Errors of a single bitmap.
#[derive(Debug, thiserror::Error)]
pub enum BitmapError {
    /// The granularity is not a power of two in range.
    #[error("granularity {granularity} is invalid: use a power of two from 4 KiB to 64 MiB")]
    Granularity {
        /// Requested granularity in bytes.
        granularity: u64,
    },
    /// The bitmap would exceed [`MAX_BITMAP_BYTES`].
    #[error(
        "a bitmap of a {size}-byte disk at granularity {granularity} needs more than \
         {MAX_BITMAP_BYTES} bytes: use a larger granularity"
    )]
    TooLarge {
        /// Disk size in bytes.
        size: u64,
        /// Granularity in bytes.
        granularity: u64,
    },
    /// Two bitmaps of different disks were combined.
    #[error(
        "bitmaps cover disks of {ours} and {theirs} bytes: merge only bitmaps of the same disk"
    )]
    SizeMismatch {
        /// Size covered by this bitmap.
        ours: u64,
        /// Size covered by the other bitmap.
        theirs: u64,
    },
    /// Serialized bitmap data has the wrong length.
    #[error(
        "serialized bitmap has {got} bytes where {expected} were expected: \
         it was made for another disk size or granularity"
    )]
    Length {
        /// Bytes given.
        got: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// Serialized bitmap data has bits set past the last granule.
    #[error(
        "serialized bitmap has bits set past the end of the disk: the data is corrupt, discard it"
    )]
    TrailingBits,
    /// A second take was attempted while one is outstanding.
    #[error("a take of this bitmap is still outstanding: commit or drop the Taken guard first")]
    TakeOutstanding,
}

/// Check that `granularity` is a power of two between the limits.
pub fn check_granularity(granularity: u64) -> Result<(), BitmapError> {
    if granularity.is_power_of_two() && (MIN_GRANULARITY..=MAX_GRANULARITY).contains(&granularity) {
        Ok(())
    } else {
        Err(BitmapError::Granularity { granularity })
    }
}

/// Number of `u64` words a bitmap of `size` bytes at `granularity` needs,
/// after checking both against the limits.
pub fn words_for(size: u64, granularity: u64) -> Result<usize, BitmapError> {
    check_granularity(granularity)?;
    let granules = size.div_ceil(granularity);
    let words = granules.div_ceil(64);
    if words.saturating_mul(8) > MAX_BITMAP_BYTES {
        return Err(BitmapError::TooLarge { size, granularity });
    }
    // Bounded by MAX_BITMAP_BYTES / 8 above, so it fits a usize.
    Ok(words as usize)
}

/// Size arithmetic shared by live bitmaps and harvested copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    /// Disk size in bytes.
    pub(crate) size: u64,
    /// log2 of the granularity.
    pub(crate) shift: u32,
    /// Number of granules (bits in use).
    pub(crate) bits: u64,
}

impl Geometry {
    pub(crate) fn new(size: u64, granularity: u64) -> Result<(Self, usize), BitmapError> {
        let words = words_for(size, granularity)?;
        Ok((
            Self {
                size,
                shift: granularity.trailing_zeros(),
                bits: size.div_ceil(granularity),
            },
            words,
        ))
    }

    fn granularity(&self) -> u64 {
        1 << self.shift
    }

    /// Inclusive granule range covering `[offset, offset + len)` clipped to
    /// the disk, or `None` if nothing of it lies inside.
    fn granules(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 || offset >= self.size {
            return None;
        }
        let end = offset.saturating_add(len).min(self.size);
        Some((offset >> self.shift, (end - 1) >> self.shift))
    }

    /// Byte offset of granule `g`, clipped to the disk size.
    fn offset_of(&self, g: u64) -> u64 {
        // g <= bits and bits << shift <= size + granularity, which cannot
        // overflow because words_for bounds the granule count.
        (g << self.shift).min(self.size)
    }
}

/// Read access to bitmap words, live (atomic) or harvested (plain).
pub(crate) trait Words {
    fn word(&self, i: usize) -> u64;
}

impl Words for [AtomicU64] {
    fn word(&self, i: usize) -> u64 {
        self[i].load(Ordering::Acquire)
    }
}

impl Words for [u64] {
    fn word(&self, i: usize) -> u64 {
        self[i]
    }
}

/// Bits `lo..=hi` of a word.
fn mask(lo: u32, hi: u32) -> u64 {
    (u64::MAX >> (63 - hi)) & (u64::MAX << lo)
}

/// First granule `>= from` whose bit differs from `value`, or `geo.bits`.
fn next_change<W: Words + ?Sized>(geo: &Geometry, words: &W, from: u64, value: bool) -> u64 {
    if from >= geo.bits {
        return geo.bits;
    }
    let mut wi = (from / 64) as usize;
    let last_word = ((geo.bits - 1) / 64) as usize;
    let mut w = words.word(wi);
    if value {
        w = !w;
    }
    w &= u64::MAX << (from % 64);
    loop {
        if w != 0 {
            let g = wi as u64 * 64 + u64::from(w.trailing_zeros());
            return g.min(geo.bits);
        }
        if wi == last_word {
            return geo.bits;
        }
        wi += 1;
        w = words.word(wi);
        if value {
            w = !w;
        }
    }
}

fn is_set<W: Words + ?Sized>(geo: &Geometry, words: &W, offset: u64) -> bool {
    if offset >= geo.size {
        return false;
    }
    let g = offset >> geo.shift;
    words.word((g / 64) as usize) & (1 << (g % 64)) != 0
}

fn extents_in<W: Words + ?Sized>(
    geo: &Geometry,
    words: &W,
    offset: u64,
    len: u64,
    max: usize,
) -> Vec<(u64, bool)> {
    let mut out = Vec::new();
    if len == 0 || offset >= geo.size || max == 0 {
        return out;
    }
    let end = offset.saturating_add(len).min(geo.size);
    let mut pos = offset;
    while pos < end && out.len() < max {
        let g = pos >> geo.shift;
        let dirty = words.word((g / 64) as usize) & (1 << (g % 64)) != 0;
        let next = next_change(geo, words, g, dirty);
        let run_end = geo.offset_of(next).min(end);
        out.push((run_end - pos, dirty));
        pos = run_end;
    }
    out
}

fn dirty_bytes_in<W: Words + ?Sized>(geo: &Geometry, words: &W, nwords: usize) -> u64 {
    if geo.bits == 0 {
        return 0;
    }
    let ones: u64 = (0..nwords)
        .map(|i| u64::from(words.word(i).count_ones()))
        .sum();
    let mut bytes = ones << geo.shift;
    let last = geo.bits - 1;
    if words.word((last / 64) as usize) & (1 << (last % 64)) != 0 {
        // The last granule may extend past the end of the disk.
        bytes -= (geo.bits << geo.shift) - geo.size;
    }
    bytes
}

/// Iterator over the dirty byte ranges `(offset, len)` of a bitmap, in
/// order, each maximal and clipped to the disk.
#[derive(Debug)]
pub struct DirtyRanges<'a, W: ?Sized> {
    geo: Geometry,
    words: &'a W,
    next: u64,
}

impl<W: Words + ?Sized> Iterator for DirtyRanges<'_, W> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let start = next_change(&self.geo, self.words, self.next, false);
        if start >= self.geo.bits {
            self.next = self.geo.bits;
            return None;
        }
        let end = next_change(&self.geo, self.words, start, true);
        self.next = end;
        let off = self.geo.offset_of(start);
        Some((off, self.geo.offset_of(end) - off))
    }
}

#[derive(Debug, Default)]
struct TakeState {
    /// Bits harvested by the outstanding take, if any.
    pending: Option<Arc<[u64]>>,
    /// Bumped by `clear`, so a take from before the clear neither merges
    /// back nor drops a later take's bits.
    generation: u64,
}

/// A dirty bitmap over a disk: one bit per granule, marked lock-free.
#[derive(Debug)]
pub struct DirtyBitmap {
    geo: Geometry,
    words: Box<[AtomicU64]>,
    take: Mutex<TakeState>,
}

impl DirtyBitmap {
    /// An all-clean bitmap for a disk of `size` bytes.
    pub fn new(size: u64, granularity: u64) -> Result<Self, BitmapError> {
        let (geo, nwords) = Geometry::new(size, granularity)?;
        Ok(Self {
            geo,
            words: (0..nwords).map(|_| AtomicU64::new(0)).collect(),
            take: Mutex::new(TakeState::default()),
        })
    }

    /// Rebuild a bitmap from [`DirtyBitmap::to_bytes`] output.
    pub fn from_bytes(size: u64, granularity: u64, bytes: &[u8]) -> Result<Self, BitmapError> {
        let (geo, nwords) = Geometry::new(size, granularity)?;
        if bytes.len() != nwords * 8 {
            return Err(BitmapError::Length {
                got: bytes.len(),
                expected: nwords * 8,
            });
        }
        let words: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        Self::from_words(geo, words)
    }

    /// Rebuild a bitmap from its words; rejects bits past the last granule.
    pub(crate) fn from_words_checked(
        size: u64,
        granularity: u64,
        words: Vec<u64>,
    ) -> Result<Self, BitmapError> {
        let (geo, nwords) = Geometry::new(size, granularity)?;
        if words.len() != nwords {
            return Err(BitmapError::Length {
                got: words.len() * 8,
                expected: nwords * 8,
            });
        }
        Self::from_words(geo, words)
    }

    fn from_words(geo: Geometry, words: Vec<u64>) -> Result<Self, BitmapError> {
        if let Some(&last) = words.last() {
            let used = geo.bits % 64;
            if used != 0 && last & !mask(0, used as u32 - 1) != 0 {
                return Err(BitmapError::TrailingBits);
            }
        }
        Ok(Self {
            geo,
            words: words.into_iter().map(AtomicU64::new).collect(),
            take: Mutex::new(TakeState::default()),
        })
    }

    /// Size of the covered disk in bytes.
    pub fn size(&self) -> u64 {
        self.geo.size
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.geo.granularity()
    }

    /// Number of granules (bits).
    pub fn granules(&self) -> u64 {
        self.geo.bits
    }

    /// Mark every granule that overlaps `[offset, offset + len)` dirty. The
    /// part of the range past the end of the disk is ignored.
    ///
    /// Lock-free: one `fetch_or` per word the range touches. The `Release`
    /// pairs with the `Acquire` swap in [`take`](Self::take), so whoever
    /// harvests the bit also sees everything the writer did before marking.
    pub fn mark(&self, offset: u64, len: u64) {
        let Some((first, last)) = self.geo.granules(offset, len) else {
            return;
        };
        let (fw, lw) = ((first / 64) as usize, (last / 64) as usize);
        let (fb, lb) = ((first % 64) as u32, (last % 64) as u32);
        if fw == lw {
            self.words[fw].fetch_or(mask(fb, lb), Ordering::Release);
            return;
        }
        self.words[fw].fetch_or(mask(fb, 63), Ordering::Release);
        for w in &self.words[fw + 1..lw] {
            w.fetch_or(u64::MAX, Ordering::Release);
        }
        self.words[lw].fetch_or(mask(0, lb), Ordering::Release);
    }

    /// Mark the whole disk dirty.
    pub fn mark_all(&self) {
        self.mark(0, self.geo.size);
    }

    /// Whether the granule containing `offset` is dirty (false past the end).
    pub fn is_dirty(&self, offset: u64) -> bool {
        is_set(&self.geo, &self.words[..], offset)
    }

    /// Bytes of the disk covered by dirty granules.
    pub fn dirty_bytes(&self) -> u64 {
        dirty_bytes_in(&self.geo, &self.words[..], self.words.len())
    }

    /// Describe `[offset, offset + len)` as runs of `(len, dirty)`, clipped
    /// to the range and the disk. Empty if the range starts past the end.
    pub fn extents(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        extents_in(&self.geo, &self.words[..], offset, len, usize::MAX)
    }

    /// Like [`extents`](Self::extents) but stops after `max` runs (the
    /// runs then cover a prefix of the range; callers ask again).
    pub fn extents_capped(&self, offset: u64, len: u64, max: usize) -> Vec<(u64, bool)> {
        extents_in(&self.geo, &self.words[..], offset, len, max)
    }

    /// The dirty byte ranges, in order. Reads the live words as it goes, so
    /// concurrent marks may or may not be seen.
    pub fn dirty_ranges(&self) -> DirtyRanges<'_, [AtomicU64]> {
        DirtyRanges {
            geo: self.geo,
            words: &self.words[..],
            next: 0,
        }
    }

    /// OR the live bits of `other` into this bitmap. Bitmaps of different
    /// granularity are merged range by range (rounding outwards).
    pub fn merge(&self, other: &DirtyBitmap) -> Result<(), BitmapError> {
        if other.geo.size != self.geo.size {
            return Err(BitmapError::SizeMismatch {
                ours: self.geo.size,
                theirs: other.geo.size,
            });
        }
        if other.geo.shift == self.geo.shift {
            for (mine, theirs) in self.words.iter().zip(other.words.iter()) {
                let v = theirs.load(Ordering::Acquire);
                if v != 0 {
                    mine.fetch_or(v, Ordering::Release);
                }
            }
        } else {
            for (off, len) in other.dirty_ranges() {
                self.mark(off, len);
            }
        }
        Ok(())
    }

    /// Serialize the bits that must survive a restart: the live bits plus
    /// those of an outstanding take. Little-endian `u64` words.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.persist_words()
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect()
    }

    /// The live words ORed with an outstanding take's, as one consistent
    /// view with respect to `take`, `commit` and merge-back.
    pub(crate) fn persist_words(&self) -> Vec<u64> {
        let st = self.take.lock();
        let mut out: Vec<u64> = self
            .words
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect();
        if let Some(p) = &st.pending {
            for (o, p) in out.iter_mut().zip(p.iter()) {
                *o |= p;
            }
        }
        out
    }

    /// Reset every bit, and forget an outstanding take (its guard then
    /// neither merges back nor affects a later take).
    pub fn clear(&self) {
        let mut st = self.take.lock();
        for w in self.words.iter() {
            w.store(0, Ordering::Release);
        }
        st.pending = None;
        st.generation += 1;
    }

    /// Whether a take is outstanding.
    pub fn take_outstanding(&self) -> bool {
        self.take.lock().pending.is_some()
    }

    /// Atomically harvest and reset the bitmap.
    ///
    /// Each word is swapped to zero individually, so writers never wait. A
    /// write whose mark lands before the swap of its word is in the
    /// returned guard, one that lands after is in the live bitmap: no bit
    /// is lost, and a consumer that reads the data of the harvested granules
    /// after `take` returns sees at least what was written before each bit
    /// was marked. At most one take per bitmap may be outstanding.
    pub fn take(self: &Arc<Self>) -> Result<Taken, BitmapError> {
        let mut st = self.take.lock();
        if st.pending.is_some() {
            return Err(BitmapError::TakeOutstanding);
        }
        let bits: Arc<[u64]> = self
            .words
            .iter()
            .map(|w| w.swap(0, Ordering::AcqRel))
            .collect();
        st.pending = Some(bits.clone());
        Ok(Taken {
            bitmap: Arc::clone(self),
            bits,
            generation: st.generation,
            settled: false,
        })
    }

    fn settle(&self, bits: &[u64], generation: u64, merge_back: bool) {
        let mut st = self.take.lock();
        if st.generation != generation {
            return;
        }
        if merge_back {
            for (w, &b) in self.words.iter().zip(bits) {
                if b != 0 {
                    w.fetch_or(b, Ordering::Release);
                }
            }
        }
        st.pending = None;
    }
}

/// Bits harvested by [`DirtyBitmap::take`].
///
/// [`commit`](Taken::commit) forgets them (the consumer has copied those
/// granules). Dropping the guard without committing merges them back into
/// the live bitmap, so a failed consumer loses nothing. Until then they are
/// included whenever the bitmap is persisted.
#[derive(Debug)]
pub struct Taken {
    bitmap: Arc<DirtyBitmap>,
    bits: Arc<[u64]>,
    generation: u64,
    settled: bool,
}

impl Taken {
    /// Size of the covered disk.
    pub fn size(&self) -> u64 {
        self.bitmap.geo.size
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.bitmap.geo.granularity()
    }

    /// Whether the granule containing `offset` was harvested dirty.
    pub fn is_dirty(&self, offset: u64) -> bool {
        is_set(&self.bitmap.geo, &self.bits[..], offset)
    }

    /// Bytes covered by harvested granules.
    pub fn dirty_bytes(&self) -> u64 {
        dirty_bytes_in(&self.bitmap.geo, &self.bits[..], self.bits.len())
    }

    /// Runs of `(len, dirty)` over `[offset, offset + len)`, as for
    /// [`DirtyBitmap::extents`].
    pub fn extents(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        extents_in(&self.bitmap.geo, &self.bits[..], offset, len, usize::MAX)
    }

    /// The harvested dirty byte ranges, in order.
    pub fn dirty_ranges(&self) -> DirtyRanges<'_, [u64]> {
        DirtyRanges {
            geo: self.bitmap.geo,
            words: &self.bits[..],
            next: 0,
        }
    }

    /// Forget the harvested bits: the consumer has dealt with them.
    pub fn commit(mut self) {
        self.settled = true;
        self.bitmap.settle(&self.bits, self.generation, false);
    }

    /// Give the harvested bits back to the live bitmap (what dropping does).
    pub fn abort(self) {}
}

impl Drop for Taken {
    fn drop(&mut self) {
        if !self.settled {
            self.bitmap.settle(&self.bits, self.generation, true);
        }
    }
}

#[cfg(test)]
mod tests;
