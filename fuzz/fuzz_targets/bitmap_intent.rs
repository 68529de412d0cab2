//! The write-intent record parser (`IMAGE.bitmaps-intent`): must never
//! panic, and an accepted record must survive an encode/decode round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use understudy_bitmap::format::{IntentFile, decode_intent, decode_intent_file, encode_intent};

fuzz_target!(|data: &[u8]| {
    if let IntentFile::Valid(rec) = decode_intent_file(data) {
        let bytes = encode_intent(&rec);
        assert_eq!(decode_intent(&bytes).as_ref(), Ok(&rec));
    }
});
