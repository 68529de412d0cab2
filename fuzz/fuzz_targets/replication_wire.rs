//! Replication messages and generation records: arbitrary bytes must never
//! panic, and whatever decodes must re-encode to something that decodes to
//! the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use understudy_replication::generation;
use understudy_replication::wire::Msg;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    // Message types of the replication range only.
    let t = 0x0300 | u16::from(data[0]);
    let payload = &data[2..];
    if let Ok(m) = Msg::decode(t, payload) {
        let (t2, bytes) = m.to_vec().expect("a decoded message re-encodes");
        assert_eq!(t, t2);
        let again = Msg::decode(t2, &bytes).expect("a re-encoded message decodes");
        assert_eq!(m, again);
    }
    if let Ok(r) = generation::decode(payload) {
        assert_eq!(generation::decode(&generation::encode(&r)).ok(), Some(r));
    }
});
