//! Fuzz the memsync decoders: understudy checkpoints (with a populated
//! reference store so references resolve), QEMU XBZRLE streams and the
//! baseline streams. Nothing may panic or write out of bounds, and a
//! rejected checkpoint must leave the decoder's store unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use understudy_memsync::codec::{CodecConfig, Decoder, Encoder};
use understudy_memsync::page::{PAGE_SIZE, Page};
use understudy_memsync::{baseline, xbzrle};

fuzz_target!(|data: &[u8]| {
    let mut cfg = CodecConfig::new(16);
    cfg.store_slots = 8;
    let mut enc = Encoder::new(cfg);
    let mut dec = Decoder::new(cfg);
    let pages: Vec<[u8; PAGE_SIZE]> = (0..4u8).map(|k| [k.wrapping_mul(37) | 1; PAGE_SIZE]).collect();
    let list: Vec<(u64, &Page)> = pages.iter().enumerate().map(|(i, p)| (i as u64 * 3, p)).collect();
    if let Ok(e) = enc.encode(0, &list) {
        let _ = dec.decode(&e.bytes);
    }
    let before = dec.store().digest();
    if dec.decode(data).is_err() {
        assert_eq!(before, dec.store().digest());
    }
    let mut img = vec![0u8; 4 * PAGE_SIZE];
    let _ = xbzrle::apply_pass(data, &mut img);
    let _ = baseline::apply(data, &mut img);
    let mut p = [0u8; PAGE_SIZE];
    let _ = xbzrle::decode_buffer(data, &mut p);
});
