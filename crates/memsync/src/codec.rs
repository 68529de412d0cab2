//! understudy's checkpoint codec (sans-I/O): content patches against a
//! mirrored reference store.
//!
//! An [`Encoder`] turns the dirty pages of one checkpoint into one byte
//! string; a [`Decoder`] with the same [`CodecConfig`] turns it back into the
//! pages, verifies a checksum over the rebuilt checkpoint and only then
//! updates its reference store. The byte format is documented in
//! `docs/memory-sync.md`; in short:
//!
//! ```text
//! header (56 B) | control section (compressed) | literal section (compressed)
//! control record = tag [varint gap] [varint slot] [varint len + delta]
//! tag = kind (3 bits) | min(gap, 31) << 3,   gap = pfn - previous pfn - 1
//! ```

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use crate::page::{
    PAGE_SIZE, Page, ZERO_PAGE, as_page, diff_words, get_varint, is_zero, put_varint,
};
use crate::store::{FP_CHUNKS, MAX_CANDIDATES, RefStore, fingerprints};
use crate::zrle;

/// Magic at the start of every encoded checkpoint.
pub const MAGIC: [u8; 4] = *b"UMSC";
/// Format version written and accepted.
pub const VERSION: u8 = 1;
/// Fixed header length.
pub const HEADER_LEN: usize = 56;

const KIND_ZERO: u8 = 0;
const KIND_DUP_ADDR: u8 = 1;
const KIND_DUP_SLOT: u8 = 2;
const KIND_DELTA_ADDR: u8 = 3;
const KIND_DELTA_SLOT: u8 = 4;
const KIND_LITERAL: u8 = 5;
const GAP_ESCAPE: u64 = 31;

/// A delta longer than this is not worth it: send the page as a literal.
const MAX_DELTA: usize = 3 * PAGE_SIZE / 4;
/// Candidates differing in more words than this are not tried as bases.
const MAX_DIFF_WORDS: usize = PAGE_SIZE / 8 / 2;
/// A same-address base differing in at most this many words is taken
/// without searching for content matches.
const GOOD_ENOUGH_WORDS: usize = 2;
/// Largest control record: tag, gap, slot, length and a maximal delta.
const MAX_RECORD: usize = 1 + 10 + 5 + 5 + MAX_DELTA;

/// How a section is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// Stored as is.
    None,
    /// LZ4 block format.
    Lz4,
    /// Zstandard at the given level (1 is fast; higher trades speed).
    Zstd(i32),
}

impl Compression {
    fn id(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Lz4 => 1,
            Compression::Zstd(_) => 2,
        }
    }
}

/// Parameters both sides must agree on (sent in the sync handshake).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodecConfig {
    /// Reference store size in pages. Default: 16384 (64 MiB, the same
    /// budget as QEMU's default XBZRLE cache).
    pub store_slots: u32,
    /// Number of pages in the memory image; page numbers must be below it.
    pub image_pages: u64,
    /// Compression of the control section (headers and deltas). Default:
    /// zstd level 1. Decoders accept any method.
    pub control: Compression,
    /// Compression of the literal section (whole pages). Default: zstd
    /// level 1: on the recorded traces it writes 35-73% fewer literal
    /// bytes than LZ4 at 0.66-0.95x its speed, and it passes
    /// incompressible data at several GB/s (see `BENCHMARKS.md (memory checkpoint sync)`).
    /// Choose [`Compression::Lz4`] when encode CPU matters more than link
    /// bytes.
    pub literal: Compression,
}

impl CodecConfig {
    /// Defaults for an image of `image_pages` pages.
    pub fn new(image_pages: u64) -> Self {
        Self {
            store_slots: 16384,
            image_pages,
            control: Compression::Zstd(1),
            literal: Compression::Zstd(1),
        }
    }
}

/// How many pages of each kind a checkpoint carried.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindCounts {
    /// All-zero pages (tag only).
    pub zero: u64,
    /// Exact copies of a stored page (tag and slot only).
    pub duplicate: u64,
    /// XOR deltas against the page's own previous version.
    pub delta_same_address: u64,
    /// XOR deltas against a different page found by content.
    pub delta_content_match: u64,
    /// Whole pages in the literal section.
    pub literal: u64,
}

impl KindCounts {
    /// Total pages.
    pub fn total(&self) -> u64 {
        self.zero
            + self.duplicate
            + self.delta_same_address
            + self.delta_content_match
            + self.literal
    }

    /// Add another count.
    pub fn add(&mut self, o: &KindCounts) {
        self.zero += o.zero;
        self.duplicate += o.duplicate;
        self.delta_same_address += o.delta_same_address;
        self.delta_content_match += o.delta_content_match;
        self.literal += o.literal;
    }
}

/// Failures of the codec. Decoding errors leave the decoder's store
/// untouched; the caller drops the checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Encoder input not strictly ascending.
    #[error(
        "dirty pages must be given in strictly ascending page order (page {pfn}); sort and deduplicate them"
    )]
    UnsortedPages {
        /// Offending page number.
        pfn: u64,
    },
    /// A page number beyond the image.
    #[error("page {pfn} is outside the {pages}-page image; check the image size both sides use")]
    PageOutOfRange {
        /// Offending page number.
        pfn: u64,
        /// Image size in pages.
        pages: u64,
    },
    /// Section compression failed.
    #[error("compressing a checkpoint section failed; retry with compression disabled")]
    Compress(#[source] std::io::Error),
    /// Input shorter than a header.
    #[error(
        "checkpoint of {len} bytes is shorter than its header; the sender or link truncated it"
    )]
    TooShort {
        /// Bytes received.
        len: usize,
    },
    /// Wrong magic.
    #[error(
        "not an understudy checkpoint (bad magic); check that both sides run understudy memsync"
    )]
    BadMagic,
    /// Unknown version.
    #[error(
        "checkpoint format version {0} is not supported (this build reads {VERSION}); upgrade the older side"
    )]
    UnsupportedVersion(u8),
    /// Unknown compression method id.
    #[error("unknown compression method {0}; upgrade the backup")]
    UnknownMethod(u8),
    /// Store sizes differ.
    #[error(
        "encoder uses {theirs} store slots but this decoder has {ours}; both sides must be configured alike"
    )]
    StoreMismatch {
        /// This side.
        ours: u32,
        /// The sender.
        theirs: u32,
    },
    /// Too many pages.
    #[error(
        "checkpoint claims {count} pages but the image has only {max}; the sender is misconfigured or hostile"
    )]
    TooManyPages {
        /// Claimed.
        count: u64,
        /// Allowed.
        max: u64,
    },
    /// Section lengths inconsistent.
    #[error(
        "checkpoint section lengths are inconsistent ({what}); the data was corrupted in transit"
    )]
    BadLength {
        /// Which length.
        what: &'static str,
    },
    /// LZ4 section could not be decompressed.
    #[error("LZ4 section does not decompress; the data was corrupted in transit")]
    Lz4(#[source] lz4_flex::block::DecompressError),
    /// Zstd section could not be decompressed.
    #[error("zstd section does not decompress; the data was corrupted in transit")]
    Zstd(#[source] std::io::Error),
    /// A record is malformed or names a missing base.
    #[error(
        "record {record} is invalid: {reason}; the data was corrupted or the reference stores diverged (reconnect to reset them)"
    )]
    Corrupt {
        /// Record index.
        record: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// Rebuilt pages do not match the sender's checksum.
    #[error(
        "checkpoint {seq} failed verification (checksum over rebuilt pages differs); it was not applied, reconnect to resynchronise"
    )]
    ChecksumMismatch {
        /// Checkpoint sequence number.
        seq: u64,
    },
}

/// Result of encoding one checkpoint.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// The wire bytes.
    pub bytes: Vec<u8>,
    /// Pages by kind.
    pub kinds: KindCounts,
    /// Uncompressed control section length.
    pub control_raw: usize,
    /// Uncompressed literal section length.
    pub literal_raw: usize,
}

/// What [`Encoder::encode_into`] wrote, besides the bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EncodeStats {
    /// Pages by kind.
    pub kinds: KindCounts,
    /// Uncompressed control section length.
    pub control_raw: usize,
    /// Uncompressed literal section length.
    pub literal_raw: usize,
}

#[derive(Clone, Copy, Debug)]
struct RecordMeta {
    pfn: u64,
    kind: u8,
    base: u32,
    /// Where this record's delta lies in the raw control section.
    delta: (u32, u32),
    /// Fingerprints computed while choosing (encoder only).
    fps: Option<[u64; FP_CHUNKS]>,
}
const NO_BASE: u32 = u32::MAX;

/// Checkpoint encoder (primary side).
#[derive(Debug)]
pub struct Encoder {
    cfg: CodecConfig,
    store: RefStore,
    ctrl: Vec<u8>,
    lit: Vec<u8>,
    delta: Vec<u8>,
    cand: Vec<u32>,
    /// Per-record metadata, reused across checkpoints.
    metas: Vec<RecordMeta>,
    zstd: Option<ZstdBox>,
}

/// `zstd::bulk::Compressor` is not `Debug`.
struct ZstdBox(zstd::bulk::Compressor<'static>);
impl std::fmt::Debug for ZstdBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ZstdCompressor")
    }
}

impl Encoder {
    /// New encoder with an empty reference store.
    pub fn new(cfg: CodecConfig) -> Self {
        Self {
            cfg,
            store: RefStore::new(cfg.store_slots, true),
            ctrl: Vec::new(),
            lit: Vec::new(),
            delta: Vec::new(),
            cand: Vec::with_capacity(MAX_CANDIDATES),
            metas: Vec::new(),
            zstd: None,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &CodecConfig {
        &self.cfg
    }

    /// The mirrored reference store (for lockstep checks).
    pub fn store(&self) -> &RefStore {
        &self.store
    }

    /// Empty the reference store (after a reconnect both sides do this).
    pub fn reset(&mut self) {
        self.store.reset();
    }

    /// Encode checkpoint `seq` made of `pages` (strictly ascending page
    /// numbers with their new contents), then commit them to the store.
    pub fn encode(&mut self, seq: u64, pages: &[(u64, &Page)]) -> Result<Encoded, CodecError> {
        let mut bytes = Vec::new();
        let st = self.encode_into(seq, pages, &mut bytes)?;
        Ok(Encoded {
            bytes,
            kinds: st.kinds,
            control_raw: st.control_raw,
            literal_raw: st.literal_raw,
        })
    }

    /// [`encode`](Self::encode) into `out` (cleared first). Reusing `out`
    /// across checkpoints saves an allocation and its page faults per
    /// checkpoint, which is measurable at these speeds. On error `out`
    /// holds garbage and the store is unchanged.
    pub fn encode_into(
        &mut self,
        seq: u64,
        pages: &[(u64, &Page)],
        out: &mut Vec<u8>,
    ) -> Result<EncodeStats, CodecError> {
        let mut prev: Option<u64> = None;
        for &(pfn, _) in pages {
            if pfn >= self.cfg.image_pages {
                return Err(CodecError::PageOutOfRange {
                    pfn,
                    pages: self.cfg.image_pages,
                });
            }
            if prev.is_some_and(|p| pfn <= p) {
                return Err(CodecError::UnsortedPages { pfn });
            }
            prev = Some(pfn);
        }
        self.ctrl.clear();
        self.lit.clear();
        let mut metas = std::mem::take(&mut self.metas);
        metas.clear();
        let mut kinds = KindCounts::default();
        let mut sum = Xxh3::new();
        sum.update(&seq.to_le_bytes());
        let mut next_pfn = 0u64; // previous pfn + 1
        for &(pfn, page) in pages {
            sum.update(&pfn.to_le_bytes());
            sum.update(page);
            let gap = pfn - next_pfn;
            next_pfn = pfn + 1;
            let (kind, base, fps) = self.choose(pfn, page);
            let tag = kind | (gap.min(GAP_ESCAPE) as u8) << 3;
            self.ctrl.push(tag);
            if gap >= GAP_ESCAPE {
                put_varint(&mut self.ctrl, gap);
            }
            let mut delta = (0, 0);
            match kind {
                KIND_ZERO => kinds.zero += 1,
                KIND_DUP_ADDR => kinds.duplicate += 1,
                KIND_DUP_SLOT => {
                    kinds.duplicate += 1;
                    put_varint(&mut self.ctrl, u64::from(base));
                }
                KIND_DELTA_ADDR => {
                    kinds.delta_same_address += 1;
                    put_varint(&mut self.ctrl, self.delta.len() as u64);
                    delta = (self.ctrl.len() as u32, self.delta.len() as u32);
                    self.ctrl.extend_from_slice(&self.delta);
                }
                KIND_DELTA_SLOT => {
                    kinds.delta_content_match += 1;
                    put_varint(&mut self.ctrl, u64::from(base));
                    put_varint(&mut self.ctrl, self.delta.len() as u64);
                    self.ctrl.extend_from_slice(&self.delta);
                }
                _ => {
                    kinds.literal += 1;
                    self.lit.extend_from_slice(page);
                }
            }
            metas.push(RecordMeta {
                pfn,
                kind,
                base,
                delta,
                fps,
            });
        }
        let checksum = sum.digest128();
        // Header with placeholder lengths; the sections are compressed
        // straight into `out` behind it (no intermediate copy).
        out.clear();
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&[0, 0, 0]); // methods, reserved: patched below
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(&(pages.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.cfg.store_slots.to_le_bytes());
        out.extend_from_slice(&[0u8; 16]); // section lengths: patched below
        out.extend_from_slice(&checksum.to_le_bytes());
        debug_assert_eq!(out.len(), HEADER_LEN);
        let r = (|| {
            let cm = compress_append(self.cfg.control, &self.ctrl, &mut self.zstd, out)?;
            let ctrl_enc = out.len() - HEADER_LEN;
            let lm = compress_append(self.cfg.literal, &self.lit, &mut self.zstd, out)?;
            let lit_enc = out.len() - HEADER_LEN - ctrl_enc;
            Ok::<_, CodecError>((cm, lm, ctrl_enc, lit_enc))
        })();
        let (cm, lm, ctrl_enc, lit_enc) = match r {
            Ok(v) => v,
            Err(e) => {
                self.metas = metas;
                return Err(e);
            }
        };
        out[5] = cm;
        out[6] = lm;
        for (i, n) in [self.ctrl.len(), ctrl_enc, self.lit.len(), lit_enc]
            .into_iter()
            .enumerate()
        {
            out[24 + 4 * i..28 + 4 * i].copy_from_slice(&(n as u32).to_le_bytes());
        }

        for (m, &(_, page)) in metas.iter().zip(pages) {
            commit_record(&mut self.store, m, page, &self.ctrl);
        }
        self.metas = metas;
        Ok(EncodeStats {
            kinds,
            control_raw: self.ctrl.len(),
            literal_raw: self.lit.len(),
        })
    }

    /// Pick the cheapest representation; leaves a delta in `self.delta`.
    fn choose(&mut self, pfn: u64, page: &Page) -> (u8, u32, Option<[u64; FP_CHUNKS]>) {
        if is_zero(page) {
            return (KIND_ZERO, NO_BASE, None);
        }
        let fps = fingerprints(page);
        let addr_slot = self.store.slot_of(pfn);
        let mut best = NO_BASE;
        let mut best_diff = MAX_DIFF_WORDS + 1;
        // The page's own previous version first: when it differs in only a
        // few words no other base can be much better, skip the search.
        if let Some(s) = addr_slot
            && let Some(base) = self.store.get(s)
        {
            let d = diff_words(base, page, best_diff);
            if d < best_diff {
                best = s;
                best_diff = d;
            }
        }
        if best_diff > GOOD_ENOUGH_WORDS {
            self.store.candidates(pfn, &fps, &mut self.cand);
            for &s in &self.cand {
                if Some(s) == addr_slot {
                    continue;
                }
                let Some(base) = self.store.get(s) else {
                    continue;
                };
                let d = diff_words(base, page, best_diff);
                if d < best_diff {
                    best = s;
                    best_diff = d;
                    if d == 0 {
                        break;
                    }
                }
            }
        }
        if best == NO_BASE {
            return (KIND_LITERAL, NO_BASE, Some(fps));
        }
        let same = addr_slot == Some(best);
        if best_diff == 0 {
            return (
                if same { KIND_DUP_ADDR } else { KIND_DUP_SLOT },
                best,
                Some(fps),
            );
        }
        self.delta.clear();
        let base = self.store.get(best).unwrap_or(&ZERO_PAGE);
        if zrle::encode(base, page, &mut self.delta, MAX_DELTA) {
            (
                if same {
                    KIND_DELTA_ADDR
                } else {
                    KIND_DELTA_SLOT
                },
                best,
                Some(fps),
            )
        } else {
            (KIND_LITERAL, NO_BASE, Some(fps))
        }
    }
}

/// Commit one record to the store (both sides, in record order). `ctrl`
/// is the raw control section the record's delta range points into.
fn commit_record(store: &mut RefStore, m: &RecordMeta, page: &Page, ctrl: &[u8]) {
    if m.base != NO_BASE {
        store.touch(m.base);
    }
    match m.kind {
        KIND_ZERO => {}
        // The page's own slot holds the base: patch it in place.
        KIND_DUP_ADDR | KIND_DELTA_ADDR => {
            let (at, len) = (m.delta.0 as usize, m.delta.1 as usize);
            let delta = ctrl.get(at..at + len).unwrap_or_default();
            store.commit_in_place(m.pfn, m.base, delta, page, m.fps.as_ref());
        }
        _ => store.commit_with(m.pfn, page, m.fps.as_ref()),
    }
}

/// Append `data` to `out`, compressed with `method`, or stored when that
/// does not help. Returns the method id written in the header.
fn compress_append(
    method: Compression,
    data: &[u8],
    zstd_ctx: &mut Option<ZstdBox>,
    out: &mut Vec<u8>,
) -> Result<u8, CodecError> {
    let start = out.len();
    let stored = |out: &mut Vec<u8>| {
        out.truncate(start);
        out.extend_from_slice(data);
        Ok(0)
    };
    if data.is_empty() {
        return Ok(0);
    }
    match method {
        Compression::None => return stored(out),
        Compression::Lz4 => {
            out.resize(
                start + lz4_flex::block::get_maximum_output_size(data.len()),
                0,
            );
            match lz4_flex::block::compress_into(data, &mut out[start..]) {
                Ok(n) => out.truncate(start + n),
                Err(_) => return stored(out),
            }
        }
        Compression::Zstd(level) => {
            if zstd_ctx.is_none() {
                *zstd_ctx = Some(ZstdBox(
                    zstd::bulk::Compressor::new(level).map_err(CodecError::Compress)?,
                ));
            }
            let ctx = zstd_ctx.as_mut().map(|z| &mut z.0).ok_or_else(|| {
                CodecError::Compress(std::io::Error::other("zstd context missing"))
            })?;
            ctx.set_compression_level(level)
                .map_err(CodecError::Compress)?;
            out.reserve(zstd::zstd_safe::compress_bound(data.len()));
            // The cursor makes zstd write behind what `out` already holds.
            let mut cur = std::io::Cursor::new(&mut *out);
            cur.set_position(start as u64);
            ctx.compress_to_buffer(data, &mut cur)
                .map_err(CodecError::Compress)?;
        }
    }
    // Only when it helps.
    if out.len() - start < data.len() {
        Ok(method.id())
    } else {
        stored(out)
    }
}

/// A verified, rebuilt checkpoint, ready to be applied.
#[derive(Debug, Clone, Default)]
pub struct Decoded {
    /// Checkpoint sequence number.
    pub seq: u64,
    /// Page numbers, ascending.
    pub pfns: Vec<u64>,
    /// New contents, `PAGE_SIZE` bytes per entry of `pfns`.
    pub data: Vec<u8>,
    /// Pages by kind.
    pub kinds: KindCounts,
}

impl Decoded {
    /// The pages with their numbers.
    pub fn pages(&self) -> impl Iterator<Item = (u64, &Page)> {
        self.pfns
            .iter()
            .copied()
            .zip(self.data.chunks_exact(PAGE_SIZE).map(as_page))
    }
}

/// Checkpoint decoder (backup side).
#[derive(Debug)]
pub struct Decoder {
    cfg: CodecConfig,
    store: RefStore,
    ctrl_buf: Vec<u8>,
    lit_buf: Vec<u8>,
    bases: Vec<(u8, u32, (u32, u32))>,
    zstd: Option<ZstdDBox>,
}

/// `zstd::bulk::Decompressor` is not `Debug`.
struct ZstdDBox(zstd::bulk::Decompressor<'static>);
impl std::fmt::Debug for ZstdDBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ZstdDecompressor")
    }
}

struct Header {
    cm: u8,
    lm: u8,
    seq: u64,
    count: u64,
    ctrl_raw: usize,
    ctrl_enc: usize,
    lit_raw: usize,
    checksum: u128,
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

impl Decoder {
    /// New decoder with an empty reference store.
    pub fn new(cfg: CodecConfig) -> Self {
        Self {
            cfg,
            store: RefStore::new(cfg.store_slots, false),
            ctrl_buf: Vec::new(),
            lit_buf: Vec::new(),
            bases: Vec::new(),
            zstd: None,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &CodecConfig {
        &self.cfg
    }

    /// The mirrored reference store (for lockstep checks).
    pub fn store(&self) -> &RefStore {
        &self.store
    }

    /// Empty the reference store (after a reconnect both sides do this).
    pub fn reset(&mut self) {
        self.store.reset();
    }

    fn header(&self, b: &[u8]) -> Result<Header, CodecError> {
        if b.len() < HEADER_LEN {
            return Err(CodecError::TooShort { len: b.len() });
        }
        if b[..4] != MAGIC {
            return Err(CodecError::BadMagic);
        }
        if b[4] != VERSION {
            return Err(CodecError::UnsupportedVersion(b[4]));
        }
        let (cm, lm) = (b[5], b[6]);
        for m in [cm, lm] {
            if m > 2 {
                return Err(CodecError::UnknownMethod(m));
            }
        }
        let mut s = [0u8; 8];
        s.copy_from_slice(&b[8..16]);
        let seq = u64::from_le_bytes(s);
        let count = u64::from(le_u32(b, 16));
        let slots = le_u32(b, 20);
        if slots != self.cfg.store_slots {
            return Err(CodecError::StoreMismatch {
                ours: self.cfg.store_slots,
                theirs: slots,
            });
        }
        if count > self.cfg.image_pages {
            return Err(CodecError::TooManyPages {
                count,
                max: self.cfg.image_pages,
            });
        }
        let [ctrl_raw, ctrl_enc, lit_raw, lit_enc] =
            [24, 28, 32, 36].map(|at| le_u32(b, at) as usize);
        let mut c = [0u8; 16];
        c.copy_from_slice(&b[40..56]);
        let checksum = u128::from_le_bytes(c);
        let count_us = count as usize;
        if ctrl_raw < count_us || ctrl_raw > count_us.saturating_mul(MAX_RECORD) {
            return Err(CodecError::BadLength {
                what: "control section",
            });
        }
        if lit_raw % PAGE_SIZE != 0 || lit_raw > count_us.saturating_mul(PAGE_SIZE) {
            return Err(CodecError::BadLength {
                what: "literal section",
            });
        }
        if HEADER_LEN as u64 + ctrl_enc as u64 + lit_enc as u64 != b.len() as u64 {
            return Err(CodecError::BadLength { what: "total" });
        }
        Ok(Header {
            cm,
            lm,
            seq,
            count,
            ctrl_raw,
            ctrl_enc,
            lit_raw,
            checksum,
        })
    }

    /// Decode and verify one checkpoint. On success the reference store has
    /// been updated and the returned pages must be applied; on error nothing
    /// changed.
    pub fn decode(&mut self, bytes: &[u8]) -> Result<Decoded, CodecError> {
        let mut out = Decoded::default();
        self.decode_into(bytes, &mut out)?;
        Ok(out)
    }

    /// [`decode`](Self::decode) into `out`, reusing its buffers (no page
    /// faults for fresh allocations at every checkpoint). On error `out`
    /// holds garbage and the store is unchanged.
    pub fn decode_into(&mut self, bytes: &[u8], out: &mut Decoded) -> Result<(), CodecError> {
        let h = self.header(bytes)?;
        let ctrl_src = &bytes[HEADER_LEN..HEADER_LEN + h.ctrl_enc];
        let lit_src = &bytes[HEADER_LEN + h.ctrl_enc..];
        let mut ctrl_buf = std::mem::take(&mut self.ctrl_buf);
        let mut lit_buf = std::mem::take(&mut self.lit_buf);
        let mut bases = std::mem::take(&mut self.bases);
        let r = (|| {
            let ctrl = decompress(h.cm, ctrl_src, h.ctrl_raw, &mut ctrl_buf, &mut self.zstd)?;
            let lit = decompress(h.lm, lit_src, h.lit_raw, &mut lit_buf, &mut self.zstd)?;
            self.rebuild(&h, ctrl, lit, out, &mut bases)
        })();
        self.ctrl_buf = ctrl_buf;
        self.lit_buf = lit_buf;
        self.bases = bases;
        r
    }

    fn rebuild(
        &mut self,
        h: &Header,
        ctrl: &[u8],
        lit: &[u8],
        out: &mut Decoded,
        bases: &mut Vec<(u8, u32, (u32, u32))>,
    ) -> Result<(), CodecError> {
        out.seq = h.seq;
        out.pfns.clear();
        out.data.clear();
        out.kinds = KindCounts::default();
        bases.clear();
        let mut sum = Xxh3::new();
        sum.update(&h.seq.to_le_bytes());
        let (mut cp, mut lp) = (0usize, 0usize);
        let mut next_pfn = 0u64;
        for rec in 0..h.count {
            let bad = |reason| CodecError::Corrupt {
                record: rec,
                reason,
            };
            let varint = |cp: &mut usize| -> Result<u64, CodecError> {
                let (v, n) = get_varint(&ctrl[*cp..]).ok_or(bad("truncated varint"))?;
                *cp += n;
                Ok(v)
            };
            let tag = *ctrl.get(cp).ok_or(bad("control section ends early"))?;
            cp += 1;
            let kind = tag & 7;
            let mut gap = u64::from(tag >> 3);
            if gap == GAP_ESCAPE {
                gap = varint(&mut cp)?;
            }
            let pfn = next_pfn
                .checked_add(gap)
                .ok_or(bad("page number overflows"))?;
            if pfn >= self.cfg.image_pages {
                return Err(bad("page number beyond the image"));
            }
            next_pfn = pfn + 1;
            let start = out.data.len();
            let mut base = NO_BASE;
            let mut delta_at = (0, 0);
            match kind {
                KIND_ZERO => {
                    out.data.resize(start + PAGE_SIZE, 0);
                    out.kinds.zero += 1;
                }
                KIND_DUP_ADDR | KIND_DELTA_ADDR | KIND_DUP_SLOT | KIND_DELTA_SLOT => {
                    base = if kind == KIND_DUP_ADDR || kind == KIND_DELTA_ADDR {
                        self.store
                            .slot_of(pfn)
                            .ok_or(bad("no stored version of this page"))?
                    } else {
                        u32::try_from(varint(&mut cp)?).map_err(|_| bad("slot out of range"))?
                    };
                    let src = self.store.get(base).ok_or(bad("slot is empty"))?;
                    out.data.extend_from_slice(src);
                    if kind == KIND_DELTA_ADDR || kind == KIND_DELTA_SLOT {
                        let len = varint(&mut cp)?;
                        if len == 0 || len > MAX_DELTA as u64 {
                            return Err(bad("delta length out of range"));
                        }
                        let len = len as usize;
                        let delta = ctrl.get(cp..cp + len).ok_or(bad("delta truncated"))?;
                        // Fits: the raw control section is below 4 GiB.
                        delta_at = (cp as u32, len as u32);
                        cp += len;
                        let page: &mut Page = (&mut out.data[start..start + PAGE_SIZE])
                            .try_into()
                            .map_err(|_| bad("internal page slice"))?;
                        zrle::apply(page, delta).map_err(|_| bad("delta does not fit the page"))?;
                        if kind == KIND_DELTA_ADDR {
                            out.kinds.delta_same_address += 1;
                        } else {
                            out.kinds.delta_content_match += 1;
                        }
                    } else {
                        out.kinds.duplicate += 1;
                    }
                }
                KIND_LITERAL => {
                    let src = lit
                        .get(lp..lp + PAGE_SIZE)
                        .ok_or(bad("literal section ends early"))?;
                    lp += PAGE_SIZE;
                    out.data.extend_from_slice(src);
                    out.kinds.literal += 1;
                }
                _ => return Err(bad("unknown record kind")),
            }
            sum.update(&pfn.to_le_bytes());
            sum.update(&out.data[start..]);
            out.pfns.push(pfn);
            bases.push((kind, base, delta_at));
        }
        if cp != ctrl.len() || lp != lit.len() {
            return Err(CodecError::BadLength {
                what: "trailing bytes after the last record",
            });
        }
        if sum.digest128() != h.checksum {
            return Err(CodecError::ChecksumMismatch { seq: h.seq });
        }
        for ((pfn, page), &(kind, base, delta)) in out.pages().zip(bases.iter()) {
            commit_record(
                &mut self.store,
                &RecordMeta {
                    pfn,
                    kind,
                    base,
                    delta,
                    fps: None,
                },
                page,
                ctrl,
            );
        }
        Ok(())
    }
}

fn decompress<'a>(
    method: u8,
    src: &'a [u8],
    raw: usize,
    buf: &'a mut Vec<u8>,
    zstd_ctx: &mut Option<ZstdDBox>,
) -> Result<&'a [u8], CodecError> {
    match method {
        0 => {
            if src.len() != raw {
                return Err(CodecError::BadLength {
                    what: "stored section",
                });
            }
            return Ok(src);
        }
        1 => {
            buf.clear();
            buf.resize(raw, 0);
            let n = lz4_flex::block::decompress_into(src, buf).map_err(CodecError::Lz4)?;
            buf.truncate(n);
        }
        _ => {
            if zstd_ctx.is_none() {
                *zstd_ctx = Some(ZstdDBox(
                    zstd::bulk::Decompressor::new().map_err(CodecError::Zstd)?,
                ));
            }
            let ctx = zstd_ctx
                .as_mut()
                .map(|z| &mut z.0)
                .ok_or_else(|| CodecError::Zstd(std::io::Error::other("zstd context missing")))?;
            buf.clear();
            buf.reserve(raw);
            // Output beyond `raw` (the spare capacity may be larger) is
            // caught by the length check below.
            ctx.decompress_to_buffer(src, buf)
                .map_err(CodecError::Zstd)?;
        }
    }
    if buf.len() != raw {
        return Err(CodecError::BadLength {
            what: "decompressed section",
        });
    }
    Ok(buf)
}
