//! Memory images and dirty-page detection.
//!
//! An image is the guest's RAM as a flat file (QEMU
//! `memory-backend-file,share=on`) or any byte slice of whole pages. Dirty
//! pages are found either by comparing per-page hashes with the previous
//! checkpoint, or from an explicit dirty bitmap (KVM dirty log, vm-memory
//! `AtomicBitmap`), in which case only the pages it names are re-hashed.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use xxhash_rust::xxh3::xxh3_128;

use crate::page::{PAGE_SIZE, Page, as_page};

/// Largest image this crate loads into memory (guards against reading a
/// wrong file). 64 GiB.
pub const MAX_IMAGE_BYTES: u64 = 64 << 30;

/// Failures reading images or bitmaps.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image file could not be opened or read.
    #[error("cannot read memory image {path}; check the path and permissions")]
    Read {
        /// File.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Size not a positive multiple of the page size or too large.
    #[error(
        "memory image {path} has {len} bytes, not a non-empty multiple of {PAGE_SIZE} up to {max}; is it a raw RAM image?"
    )]
    BadSize {
        /// File.
        path: String,
        /// Its length.
        len: u64,
        /// Limit.
        max: u64,
    },
    /// Image size changed between checkpoints.
    #[error(
        "image has {got} pages but the tracker was set up for {want}; the guest RAM size must not change"
    )]
    SizeChanged {
        /// Pages now.
        got: usize,
        /// Pages before.
        want: usize,
    },
    /// Bitmap too short for the image.
    #[error("dirty bitmap covers {bits} pages but the image has {pages}; pass one bit per page")]
    BitmapTooShort {
        /// Bits given.
        bits: usize,
        /// Pages needed.
        pages: usize,
    },
}

/// Read a whole image file into `buf` (reused between checkpoints).
pub fn load(path: &Path, max: u64, buf: &mut Vec<u8>) -> Result<(), ImageError> {
    let p = path.display().to_string();
    let mut f = File::open(path).map_err(|source| ImageError::Read {
        path: p.clone(),
        source,
    })?;
    let len = f
        .metadata()
        .map_err(|source| ImageError::Read {
            path: p.clone(),
            source,
        })?
        .len();
    if len == 0 || len % PAGE_SIZE as u64 != 0 || len > max.min(MAX_IMAGE_BYTES) {
        return Err(ImageError::BadSize { path: p, len, max });
    }
    buf.clear();
    buf.reserve(len as usize);
    f.by_ref()
        .take(len)
        .read_to_end(buf)
        .map_err(|source| ImageError::Read {
            path: p.clone(),
            source,
        })?;
    if buf.len() as u64 != len {
        return Err(ImageError::BadSize {
            path: p,
            len: buf.len() as u64,
            max,
        });
    }
    Ok(())
}

/// Page `pfn` of `image`.
pub fn page(image: &[u8], pfn: u64) -> &Page {
    let at = pfn as usize * PAGE_SIZE;
    as_page(&image[at..at + PAGE_SIZE])
}

/// The (page number, contents) list for `pfns`.
pub fn pages<'a>(image: &'a [u8], pfns: &[u64]) -> Vec<(u64, &'a Page)> {
    pfns.iter().map(|&p| (p, page(image, p))).collect()
}

/// Hash of one page (128-bit: a collision would silently drop a change).
pub fn page_hash(p: &[u8]) -> u128 {
    xxh3_128(p)
}

/// Finds dirty pages of successive checkpoints of one image.
#[derive(Debug, Default, Clone)]
pub struct DirtyTracker {
    hashes: Vec<u128>,
}

impl DirtyTracker {
    /// A tracker with no history: the first scan reports every page.
    pub fn new() -> Self {
        Self::default()
    }

    /// A tracker whose history is `hashes` (e.g. what the backup holds).
    pub fn from_hashes(hashes: Vec<u128>) -> Self {
        Self { hashes }
    }

    /// Per-page hashes of the last checkpoint.
    pub fn hashes(&self) -> &[u128] {
        &self.hashes
    }

    /// Compare `image` with the last checkpoint by hashing every page;
    /// returns the ascending list of changed pages and remembers `image`.
    pub fn scan(&mut self, image: &[u8]) -> Result<Vec<u64>, ImageError> {
        let n = image.len() / PAGE_SIZE;
        let fresh = self.hashes.is_empty();
        if !fresh && self.hashes.len() != n {
            return Err(ImageError::SizeChanged {
                got: n,
                want: self.hashes.len(),
            });
        }
        if fresh {
            self.hashes = image.chunks_exact(PAGE_SIZE).map(page_hash).collect();
            return Ok((0..n as u64).collect());
        }
        let mut dirty = Vec::new();
        for (i, (p, h)) in image
            .chunks_exact(PAGE_SIZE)
            .zip(self.hashes.iter_mut())
            .enumerate()
        {
            let nh = page_hash(p);
            if nh != *h {
                *h = nh;
                dirty.push(i as u64);
            }
        }
        Ok(dirty)
    }

    /// Dirty pages from an explicit bitmap (bit `i` of word `i / 64` = page
    /// `i`), without hashing the whole image. When the tracker has history
    /// the named pages are re-hashed so a later [`scan`](Self::scan) stays
    /// correct.
    pub fn from_bitmap(&mut self, image: &[u8], bitmap: &[u64]) -> Result<Vec<u64>, ImageError> {
        let n = image.len() / PAGE_SIZE;
        if bitmap.len().saturating_mul(64) < n {
            return Err(ImageError::BitmapTooShort {
                bits: bitmap.len() * 64,
                pages: n,
            });
        }
        let mut dirty = Vec::new();
        for (w, &bits) in bitmap.iter().enumerate() {
            let mut b = bits;
            while b != 0 {
                let i = w * 64 + b.trailing_zeros() as usize;
                b &= b - 1;
                if i < n {
                    dirty.push(i as u64);
                }
            }
        }
        if self.hashes.len() == n {
            for &p in &dirty {
                self.hashes[p as usize] = page_hash(page(image, p));
            }
        }
        Ok(dirty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_finds_exactly_the_changed_pages() {
        let mut img = vec![0u8; 8 * PAGE_SIZE];
        let mut t = DirtyTracker::new();
        assert_eq!(t.scan(&img).expect("scan").len(), 8);
        assert!(t.scan(&img).expect("scan").is_empty());
        img[3 * PAGE_SIZE + 17] = 1;
        img[7 * PAGE_SIZE] = 1;
        assert_eq!(t.scan(&img).expect("scan"), vec![3, 7]);
        assert!(t.scan(&img[..PAGE_SIZE]).is_err());
    }

    #[test]
    fn bitmap_names_pages_and_keeps_hashes_current() {
        let mut img = vec![0u8; 70 * PAGE_SIZE];
        let mut t = DirtyTracker::new();
        t.scan(&img).expect("scan");
        img[65 * PAGE_SIZE] = 5;
        let bm = [1u64 << 2, 1u64 << 1];
        assert_eq!(t.from_bitmap(&img, &bm).expect("bitmap"), vec![2, 65]);
        // Page 65 was re-hashed: a scan now sees nothing new.
        assert!(t.scan(&img).expect("scan").is_empty());
        assert!(t.from_bitmap(&img, &[0]).is_err());
    }

    #[test]
    fn load_rejects_bad_sizes() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("x.ram");
        std::fs::write(&p, [0u8; 100]).expect("write");
        let mut buf = Vec::new();
        assert!(matches!(
            load(&p, MAX_IMAGE_BYTES, &mut buf),
            Err(ImageError::BadSize { .. })
        ));
        std::fs::write(&p, vec![7u8; 2 * PAGE_SIZE]).expect("write");
        load(&p, MAX_IMAGE_BYTES, &mut buf).expect("load");
        assert_eq!(buf.len(), 2 * PAGE_SIZE);
        assert!(load(&p, PAGE_SIZE as u64, &mut buf).is_err());
    }
}
