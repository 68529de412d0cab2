//! Handshake state machine: arbitrary bytes, fed in arbitrary chunks, as
//! either role, must never panic, never consume more than offered, and
//! never authenticate without the key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use understudy_peer::{Handshake, HandshakeParams, PeerKey, Role};

const KEY: [u8; 32] = *b"fuzzing key, not a secret 0123!!";

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let key = PeerKey::from_bytes(&KEY).expect("valid key");
    let role = if ctl & 1 == 0 {
        Role::Initiator
    } else {
        Role::Responder
    };
    let mut hs = Handshake::new(
        HandshakeParams::new(role, "fuzz", "migrate", 1 << 20),
        &key,
        [ctl; 32],
    )
    .expect("valid params");
    let _hello = hs.take_output();

    // Optionally start with a genuine hello from the other role, so the
    // fuzzer spends its effort on the proof step.
    if ctl & 2 != 0 {
        let other = if role == Role::Initiator {
            Role::Responder
        } else {
            Role::Initiator
        };
        let mut peer = Handshake::new(
            HandshakeParams::new(other, "peer", "migrate", 1 << 20),
            &key,
            [!ctl; 32],
        )
        .expect("valid params");
        let hello = peer.take_output();
        hs.feed(&hello).expect("genuine hello accepted");
    }

    let chunk = usize::from(ctl >> 2) + 1;
    for piece in rest.chunks(chunk) {
        match hs.feed(piece) {
            Ok(n) => assert!(n <= piece.len()),
            Err(_) => {
                assert_eq!(hs.wants(), 0);
                assert!(!hs.is_done());
                return;
            }
        }
        if hs.is_done() {
            break;
        }
    }
    // Random bytes cannot forge a 256-bit proof.
    if hs.is_done() {
        panic!("handshake completed from fuzzer bytes");
    }
});
