//! Crash-safe dirty bitmaps.
//!
//! Every write to a VM disk is marked in every enabled named bitmap of the
//! image. Consumers (incremental backup over NBD `qemu:dirty-bitmap:NAME`,
//! live migration, replication resync) read and reset them. Unlike QEMU's
//! persistent bitmaps, these survive `kill -9` or power loss: after an
//! unclean stop, every block written (acknowledged or not) since the bitmap
//! was last cleared is still marked. Over-marking is allowed, and bounded;
//! under-marking never happens.
//!
//! ```text
//!  BitmapStore (one image)
//!  ├── named DirtyBitmaps ── Vec<AtomicU64>, lock-free mark, take()/Taken
//!  ├── write-intent log  ── IMAGE.bitmaps-intent (A/B record slots)
//!  └── snapshot          ── IMAGE.bitmaps (temp + fsync + rename)
//! ```
//!
//! # Write protocol (what the block filter does)
//!
//! 1. [`BitmapStore::begin_write`]: if the write touches an intent extent
//!    that is not armed, arm it: rewrite the intent record and fdatasync it.
//!    Otherwise one atomic load per extent, no syscall.
//! 2. The data write.
//! 3. [`WriteGuard::complete`]: `fetch_or` into every enabled bitmap.
//! 4. Acknowledge the write.
//!
//! So a crash at any point leaves each issued write either in the snapshot
//! or inside an armed extent, which recovery marks dirty.
//!
//! # Take and reset
//!
//! [`DirtyBitmap::take`] swaps every word out atomically (per word). A write
//! acknowledged after `take` is in the live bitmap; one in flight during it
//! is in at least one of the two; a consumer that reads the harvested blocks
//! after `take` never misses new data. Dropping the [`Taken`] guard without
//! [`Taken::commit`] merges the bits back, and outstanding taken bits are
//! included in every snapshot.
//!
//! # Persisting
//!
//! [`BitmapStore::persist`] (on a timer, or when the armed set exceeds a
//! cap; see [`BitmapStore::spawn_persister`]) writes a snapshot and then
//! retires the armed extents. Writers are never blocked by it: an epoch gate
//! makes the persister wait only for writes that could have seen the old
//! armed bits.
//!
//! `docs/bitmaps.md` has the byte layout of both files, the recovery
//! algorithm and the over-mark bound.
//!
//! # Crash tests
//!
//! With the cargo feature `testing` (off by default), `StoreOptions` has a
//! `fault_hook` that may fail any step of the persistence protocol
//! (`FaultPoint`). Production builds have neither, and pay nothing for
//! them.
#![warn(missing_docs)]

mod bitmap;
pub mod format;
mod store;

pub use bitmap::{
    BitmapError, DEFAULT_GRANULARITY, DirtyBitmap, DirtyRanges, MAX_BITMAP_BYTES, MAX_GRANULARITY,
    MIN_GRANULARITY, Taken, check_granularity, words_for,
};
pub use store::{
    BitmapInfo, BitmapStore, DEFAULT_ARMED_SOFT_CAP, DEFAULT_INTENT_EXTENT, MAX_EXTENTS_PER_QUERY,
    Persister, StoreError, StoreOptions, WriteGuard, WriteTicket,
};
#[cfg(any(test, feature = "testing"))]
pub use store::{FaultHook, FaultPoint};

/// Suffix of the snapshot sidecar (`IMAGE.bitmaps`).
pub const SNAPSHOT_SUFFIX: &str = ".bitmaps";
/// Suffix of the write-intent log (`IMAGE.bitmaps-intent`).
pub const INTENT_SUFFIX: &str = ".bitmaps-intent";
/// Suffix of the snapshot's temporary file (`understudy_durable::temp_path`
/// of the snapshot).
pub const SNAPSHOT_TMP_SUFFIX: &str = ".bitmaps.tmp";

/// The sidecar files a persistent [`BitmapStore`] keeps beside
/// `image`: the snapshot (`IMAGE.bitmaps`), the write-intent log
/// (`IMAGE.bitmaps-intent`) and the snapshot's temporary file
/// (`IMAGE.bitmaps.tmp`). For callers that move or remove an image with
/// its bitmaps; the store itself opens exactly these names.
pub fn sidecar_paths(image: &std::path::Path) -> [std::path::PathBuf; 3] {
    [SNAPSHOT_SUFFIX, INTENT_SUFFIX, SNAPSHOT_TMP_SUFFIX].map(|suffix| {
        let mut name = image.file_name().unwrap_or_default().to_owned();
        name.push(suffix);
        image.with_file_name(name)
    })
}

#[cfg(test)]
mod sidecar_tests {
    #[test]
    fn sidecar_paths_sit_beside_the_image() {
        let p = super::sidecar_paths(std::path::Path::new("/d/vm.img"));
        assert_eq!(
            p.map(|p| p.display().to_string()),
            [
                "/d/vm.img.bitmaps",
                "/d/vm.img.bitmaps-intent",
                "/d/vm.img.bitmaps.tmp"
            ]
        );
    }
}
