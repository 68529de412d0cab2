//! Frame decoder: arbitrary bytes must never panic, and a sealed frame must
//! open exactly when it is unmodified.
#![no_main]

use libfuzzer_sys::fuzz_target;
use understudy_peer::{Decoded, HandshakeParams, PeerKey, Role, handshake_in_memory};

const KEY: [u8; 32] = *b"fuzzing key, not a secret 0123!!";

fuzz_target!(|data: &[u8]| {
    let key = PeerKey::from_bytes(&KEY).expect("valid key");
    let (mut a, mut b) = handshake_in_memory(
        HandshakeParams::new(Role::Initiator, "fuzz-a", "migrate", 64 * 1024),
        HandshakeParams::new(Role::Responder, "fuzz-b", "listener", 64 * 1024),
        &key,
        &key,
        ([1; 32], [2; 32]),
    )
    .expect("handshake");

    // 1. Arbitrary bytes straight into the opener.
    let mut pos = 0;
    while pos < data.len() {
        match b.opener.decode(&data[pos..]) {
            Ok(Decoded::Frame { consumed, .. }) => pos += consumed,
            _ => break,
        }
    }

    // 2. The input as a payload, sealed in two parts, then optionally
    //    corrupted at a position chosen by the input.
    let Some((&ctl, payload)) = data.split_first() else {
        return;
    };
    let split = usize::from(ctl) % (payload.len() + 1);
    let msg_type = 0x0100 | u16::from(ctl);
    let sealed = a
        .sealer
        .seal(msg_type, &[&payload[..split], &payload[split..]])
        .expect("within limit");
    let mut frame = Vec::new();
    frame.extend_from_slice(&sealed.header);
    frame.extend_from_slice(payload);
    frame.extend_from_slice(&sealed.mac);
    let corrupt = ctl & 0x80 != 0;
    if corrupt {
        let at = usize::from(ctl) * 7 % frame.len();
        frame[at] ^= 1 << (ctl % 8);
    }
    let mut opener = handshake_in_memory(
        HandshakeParams::new(Role::Initiator, "fuzz-a", "migrate", 64 * 1024),
        HandshakeParams::new(Role::Responder, "fuzz-b", "listener", 64 * 1024),
        &key,
        &key,
        ([1; 32], [2; 32]),
    )
    .expect("handshake")
    .1
    .opener;
    match opener.decode(&frame) {
        Ok(Decoded::Frame {
            msg_type: t,
            payload: p,
            consumed,
        }) => {
            assert!(!corrupt, "corrupted frame accepted");
            assert_eq!((t, p, consumed), (msg_type, payload, frame.len()));
        }
        Ok(Decoded::NeedMore(_)) => assert!(corrupt, "intact frame incomplete"),
        Err(_) => assert!(corrupt, "intact frame rejected"),
    }
});
