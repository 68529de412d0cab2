//! The bitmap snapshot parser (`IMAGE.bitmaps`): must never panic or
//! allocate beyond its input, and whatever it accepts must re-encode to the
//! same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use understudy_bitmap::format::{decode_snapshot, encode_snapshot};

fuzz_target!(|data: &[u8]| {
    let Ok(snap) = decode_snapshot(data, None) else {
        return;
    };
    let mut bitmaps = Vec::with_capacity(snap.bitmaps.len());
    for b in snap.bitmaps {
        match b.words {
            Ok(w) => bitmaps.push((b.entry, w)),
            // A bitmap with bad data cannot be re-encoded identically.
            Err(_) => return,
        }
    }
    let again = encode_snapshot(snap.image_size, snap.seq, snap.clean, &bitmaps);
    assert_eq!(again, data, "accepted snapshot does not re-encode identically");
});
