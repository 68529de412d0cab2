//! Baselines: plain asynchronous replication of dirty pages, and zero-page
//! detection with per-page LZ4.
//!
//! Both use an 8-byte header per page (`be64 offset | flags`, like QEMU).
//! Raw: header + 4096 bytes. Zero+LZ4: a zero page is the header alone;
//! otherwise header + `be16 length` + LZ4 block, or header + 4096 raw bytes
//! when LZ4 does not shrink the page.

use crate::page::{PAGE_SIZE, Page, is_zero};

const FLAG_ZERO: u64 = 0x02;
const FLAG_PAGE: u64 = 0x08;
const FLAG_LZ4: u64 = 0x80;

/// Failures while applying a baseline stream.
#[derive(Debug, thiserror::Error)]
pub enum BaselineError {
    /// The stream is malformed.
    #[error("baseline stream invalid at byte {at}: {reason}; the stream was corrupted")]
    Corrupt {
        /// Byte offset.
        at: usize,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Pages by outcome for the zero+LZ4 method.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lz4Counts {
    /// Zero pages.
    pub zero: u64,
    /// LZ4-compressed pages.
    pub compressed: u64,
    /// Pages LZ4 could not shrink.
    pub raw: u64,
}

fn header(out: &mut Vec<u8>, pfn: u64, flags: u64) {
    out.extend_from_slice(&((pfn * PAGE_SIZE as u64) | flags).to_be_bytes());
}

/// Raw method: every dirty page in full.
pub fn encode_raw(pages: &[(u64, &Page)], out: &mut Vec<u8>) {
    out.reserve(pages.len() * (8 + PAGE_SIZE));
    for &(pfn, page) in pages {
        header(out, pfn, FLAG_PAGE);
        out.extend_from_slice(page);
    }
}

/// Zero+LZ4 method.
pub fn encode_zero_lz4(pages: &[(u64, &Page)], out: &mut Vec<u8>) -> Lz4Counts {
    let mut c = Lz4Counts::default();
    let mut buf = vec![0u8; lz4_flex::block::get_maximum_output_size(PAGE_SIZE)];
    for &(pfn, page) in pages {
        if is_zero(page) {
            header(out, pfn, FLAG_ZERO);
            c.zero += 1;
            continue;
        }
        match lz4_flex::block::compress_into(page, &mut buf) {
            Ok(n) if n < PAGE_SIZE => {
                header(out, pfn, FLAG_LZ4);
                out.extend_from_slice(&(n as u16).to_be_bytes());
                out.extend_from_slice(&buf[..n]);
                c.compressed += 1;
            }
            _ => {
                header(out, pfn, FLAG_PAGE);
                out.extend_from_slice(page);
                c.raw += 1;
            }
        }
    }
    c
}

/// Apply a raw or zero+LZ4 stream to `image`. Each page is decoded into a
/// scratch buffer before it is written, so a bad page never half-applies.
pub fn apply(stream: &[u8], image: &mut [u8]) -> Result<(), BaselineError> {
    let bad = |at, reason| BaselineError::Corrupt { at, reason };
    let mut i = 0usize;
    let mut scratch = [0u8; PAGE_SIZE];
    while i < stream.len() {
        let h = stream.get(i..i + 8).ok_or(bad(i, "truncated header"))?;
        let mut w = [0u8; 8];
        w.copy_from_slice(h);
        let v = u64::from_be_bytes(w);
        i += 8;
        let off = usize::try_from(v & !(PAGE_SIZE as u64 - 1)).map_err(|_| bad(i, "offset"))?;
        let dst = image
            .get_mut(off..off.saturating_add(PAGE_SIZE))
            .ok_or(bad(i, "page outside the image"))?;
        match v & (PAGE_SIZE as u64 - 1) {
            FLAG_ZERO => dst.fill(0),
            FLAG_PAGE => {
                dst.copy_from_slice(
                    stream
                        .get(i..i + PAGE_SIZE)
                        .ok_or(bad(i, "truncated page"))?,
                );
                i += PAGE_SIZE;
            }
            FLAG_LZ4 => {
                let l = stream.get(i..i + 2).ok_or(bad(i, "truncated length"))?;
                let n = usize::from(u16::from_be_bytes([l[0], l[1]]));
                i += 2;
                let src = stream.get(i..i + n).ok_or(bad(i, "truncated block"))?;
                let got = lz4_flex::block::decompress_into(src, &mut scratch)
                    .map_err(|_| bad(i, "LZ4 block does not decompress"))?;
                if got != PAGE_SIZE {
                    return Err(bad(i, "LZ4 block is not one page"));
                }
                dst.copy_from_slice(&scratch);
                i += n;
            }
            _ => return Err(bad(i, "unknown flags")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips_and_sizes() {
        let zero = [0u8; PAGE_SIZE];
        let text: Vec<u8> = b"hello memory "
            .iter()
            .copied()
            .cycle()
            .take(PAGE_SIZE)
            .collect();
        let text: &Page = text.as_slice().try_into().expect("page");
        let mut noise = [0u8; PAGE_SIZE];
        let mut x = 0x1234_5678_9abc_def0u64;
        for b in noise.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let pages: Vec<(u64, &Page)> = vec![(0, &zero), (1, text), (3, &noise)];
        let mut raw = Vec::new();
        encode_raw(&pages, &mut raw);
        assert_eq!(raw.len(), 3 * (8 + PAGE_SIZE));
        let mut lz = Vec::new();
        let c = encode_zero_lz4(&pages, &mut lz);
        assert_eq!(
            c,
            Lz4Counts {
                zero: 1,
                compressed: 1,
                raw: 1
            }
        );
        assert!(lz.len() < 8 + (8 + 200) + 8 + PAGE_SIZE);
        for s in [&raw, &lz] {
            let mut img = vec![0xeeu8; 4 * PAGE_SIZE];
            apply(s, &mut img).expect("valid");
            assert_eq!(&img[..PAGE_SIZE], &zero[..]);
            assert_eq!(&img[PAGE_SIZE..2 * PAGE_SIZE], &text[..]);
            assert_eq!(&img[2 * PAGE_SIZE..3 * PAGE_SIZE], &[0xee; PAGE_SIZE][..]);
            assert_eq!(&img[3 * PAGE_SIZE..], &noise[..]);
        }
    }

    proptest! {
        #[test]
        fn apply_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut img = vec![0u8; 2 * PAGE_SIZE];
            let _ = apply(&data, &mut img);
        }
    }
}
